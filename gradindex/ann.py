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
from typing import Callable, Iterator

import numpy as np

from .errors import GradIndexError

DEFAULT_MAX_MEMORY = 4 * 2**30


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise GradIndexError("faiss is not installed: pip install 'gradindex[cpu]' (or [gpu])") from None
    return faiss


def choose_key(n: int, dim: int, max_memory: int = DEFAULT_MAX_MEMORY) -> str:
    """Exhaustive search while the vectors fit the budget, IVF with SQ8 or PQ above it.

    The exhaustive index holds the stored float16 vectors as they are ("SQfp16"): on the 100k benchmark
    it found the same candidates as a float32 IndexFlatIP in 123 ms instead of 183 ms per query, at half
    the memory. ``--index-key Flat`` still picks IndexFlatIP (faster for large batches of queries).
    """
    if n * dim * 2 <= max_memory:
        return "SQfp16"
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    if n * dim <= max_memory:
        return f"IVF{nlist},SQ8"
    budget = max(1, max_memory // n)  # bytes per vector for PQ codes (8 bits per sub-quantizer)
    m = max((d for d in range(1, min(budget, dim) + 1) if dim % d == 0), default=1)
    return f"IVF{nlist},PQ{m}"


def default_nprobe(key: str) -> int:
    """A quarter of the lists: whitened gradients cluster weakly, so IVF needs a wide probe."""
    nlist = _nlist(key)
    return max(1, nlist // 4) if nlist else 0


def _nlist(key: str) -> int:
    head = key.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


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
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise GradIndexError(f"faiss cannot make index {key!r}: {str(e).strip().splitlines()[-1]}") from None
    work = _to_gpu(index) if use_gpu else index
    if not index.is_trained:
        nlist = _nlist(key) or 256
        n_train = min(n, max(64 * nlist, 10_000))
        rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        train = np.ascontiguousarray(sample(rows), dtype=np.float32)
        if len(train) < nlist:
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


def load_index(path, use_gpu: bool = False):
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise GradIndexError(f"cannot read FAISS index {path}: {str(e).strip().splitlines()[-1]}") from None
    return _to_gpu(index) if use_gpu else index


def save_index(index, path) -> None:
    faiss_module().write_index(_to_cpu(index), str(path))


def search(index, vectors: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores, rows), each (Q, k); rows are -1 where fewer than k were found.

    ``nprobe`` applies to this search only: it is passed with the call, never set on the shared index,
    so one query's setting cannot leak into the next one or into another thread.
    """
    faiss = faiss_module()
    params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe and _is_ivf(index) else None
    return index.search(np.ascontiguousarray(vectors, dtype=np.float32), k, params=params)


def _is_ivf(index) -> bool:
    try:
        faiss_module().extract_index_ivf(index)
        return True
    except RuntimeError:
        return False
