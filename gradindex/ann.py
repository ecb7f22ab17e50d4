"""The stage-1 FAISS index: choosing its type from N and a memory budget, training, adding, searching.

Always inner product (the whitened-gradient identity makes influence an inner product). IVF assigns by
inner product to centroids; its recall is measured by ``gradindex eval`` rather than assumed, and on
whitened gradients it is poor (README, index types). The standard L2 reduction (x ↦ [x, sqrt(M² − |x|²)])
was tried and dropped: on 3,000 benchmark gradients it lifted IVF's stage-1 recall from 0.58 to 0.99,
but at 100,000 its lists were so unbalanced that a query was slower than the exhaustive scan and the
planted facts' supporters were no longer found.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterator

import numpy as np

from .errors import GradIndexError

DEFAULT_MAX_MEMORY = 4 * 2**30
TRAIN_BYTES = 256 * 2**20  # the float32 training sample held at once (64 KiB codes: 2,048 rows, not 1.3 GB)


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise GradIndexError("faiss is not installed: pip install 'gradindex[cpu]' (or [gpu])") from None
    return faiss


def choose_key(n: int, dim: int, max_memory: int = DEFAULT_MAX_MEMORY) -> str:
    """An exhaustive scan of 1-bit RaBitQ codes while they fit the budget, IVF over them above it; both after
    a randomized Hadamard rotation ("HR").

    Whitened gradients are near-isotropic across rows, so data-oblivious codes lose least (README, stage 1);
    but a code's energy sits in its leading entries, which one bit per entry renders badly until the
    rotation spreads it (on the quick example, opponents' exact top-10 inside the top 300: 0.90 → 0.99).
    RaBitQ's code is a bit per dimension plus two floats, a sixteenth of the float16 codes the shards hold,
    and the cascade rescores its candidates from those shards.
    """
    padded = 1 << max(0, dim - 1).bit_length()
    if n * (padded // 8 + 8) <= max_memory:
        return "HR,RaBitQ"
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    return f"HR,IVF{nlist},RaBitQ"


def default_nprobe(key: str) -> int:
    """A quarter of the lists: whitened gradients cluster weakly, so IVF needs a wide probe."""
    nlist = _nlist(key)
    return max(1, nlist // 4) if nlist else 0


def _nlist(key: str) -> int:
    ivf = [part for part in key.split(",") if part.startswith("IVF") and part[3:].isdigit()]
    return int(ivf[0][3:]) if ivf else 0


def make_index(key: str, dim: int):
    """An empty inner-product index of factory string ``key`` (a clear error for a key faiss cannot parse:
    the builder asks before computing any shard)."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        # faiss prefixes its message with the C++ function and source line: keep only what it says
        said = re.sub(r"^Error in .* at \S+:\d+: ", "", str(e).strip().splitlines()[-1])
        raise GradIndexError(f"faiss cannot make index {key!r}: {said}") from None


def build_index(
    key: str,
    dim: int,
    n: int,
    chunks: Callable[[], Iterator[np.ndarray]],
    sample: Callable[[np.ndarray], np.ndarray],
    *,
    seed: int = 0,
    use_gpu: bool = False,
    progress: Callable[[int], None] | None = None,
):
    """Build ``key`` over n vectors given by ``chunks()`` (float32 blocks in row order).

    ``sample(rows)`` returns the vectors of the given rows: the quantizer is trained on a uniform
    random sample, never on the first rows of a possibly sorted corpus.
    """
    faiss = faiss_module()
    index = make_index(key, dim)
    work = _to_gpu(index) if use_gpu else index
    if not index.is_trained:
        nlist = _nlist(key)
        # IVF needs its 64 rows per list; otherwise (RaBitQ's centre) 10,000 rows, fewer where they would pass TRAIN_BYTES
        n_train = min(n, max(64 * nlist, min(10_000, TRAIN_BYTES // (4 * dim))))
        rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        train = np.ascontiguousarray(sample(rows), dtype=np.float32)
        if len(train) < max(nlist, 1):
            raise GradIndexError(f"index {key!r} needs at least {nlist} rows to train, the data has {n}")
        work.train(train)
    for block in chunks():
        work.add(np.ascontiguousarray(block, dtype=np.float32))
        if progress:
            progress(len(block))
    index = _to_cpu(work) if use_gpu else work
    if _nlist(key):
        faiss.extract_index_ivf(index).nprobe = default_nprobe(key)
    return index


def gpu_available() -> bool:
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _to_gpu(index):
    global _GPU_RESOURCES
    faiss = faiss_module()
    try:
        _GPU_RESOURCES = _GPU_RESOURCES or faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except (RuntimeError, AttributeError):  # index types without a GPU version stay on the CPU
        return index


def _to_cpu(index):
    faiss = faiss_module()
    return faiss.index_gpu_to_cpu(index) if type(index).__name__.startswith("Gpu") else index


def load_index(path, use_gpu: bool = False, mmap: bool = False):
    """The index at ``path``; ``mmap``: flat codes (RaBitQ's) stay in the file's pages, which the kernel may drop
    and re-read, instead of a copy in anonymous memory (reading one also held two copies for a moment)."""
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap and not use_gpu else 0)
    except RuntimeError as e:
        raise GradIndexError(f"cannot read FAISS index {path}: {str(e).strip().splitlines()[-1]}") from None
    return _to_gpu(index) if use_gpu else index


def save_index(index, path) -> None:
    faiss_module().write_index(_to_cpu(index), str(path))


def excluding(rows: np.ndarray):
    """A FAISS selector of every id but ``rows`` (the removed ones), or None when there are none."""
    if len(rows) == 0:
        return None
    faiss = faiss_module()
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    selector = faiss.IDSelectorNot(batch)
    selector.referenced = batch  # the C++ selector points at it: keep it alive as long as the selector
    return selector


def search(index, vectors: np.ndarray, k: int, nprobe: int | None = None, selector=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores, rows), each (Q, k); rows are -1 where fewer than k were found.

    ``nprobe`` (and ``selector``, from :func:`excluding`) apply to this search only: they are passed with the
    call, never set on the shared index, so one query's setting cannot leak into the next one or into another thread.
    """
    faiss = faiss_module()
    ivf = bool(nprobe) and _is_ivf(index)
    if not ivf and selector is None:
        params = None
    elif ivf:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe), sel=selector) if selector is not None else faiss.SearchParametersIVF(nprobe=int(nprobe))
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(np.ascontiguousarray(vectors, dtype=np.float32), k, params=params)


def _is_ivf(index) -> bool:
    try:
        faiss_module().extract_index_ivf(index)
        return True
    except RuntimeError:
        return False
