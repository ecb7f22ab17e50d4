"""Which part of a build this process does: the whole of it, part i of n by hand (``--shard i/n``), or
one rank of a ``torchrun`` launch, where rank 0 leads (places the factors, writes the index)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import GradIndexError


@dataclass(frozen=True)
class Part:
    number: int = 0
    count: int = 1
    distributed: bool = False  # a torchrun rank: barriers synchronise the ranks
    whole: bool = True  # the whole build in this process: it also writes the FAISS index and manifest

    @classmethod
    def of(cls, shard: tuple[int, int] | None = None) -> "Part":
        """Part ``shard=(i, n)``; without it, this torchrun rank when launched by torchrun, else the whole build."""
        if shard is not None:
            if not 0 <= shard[0] < shard[1]:
                raise GradIndexError(f"shard must be i/n with 0 <= i < n, got {shard[0]}/{shard[1]}")
            return cls(shard[0], shard[1], distributed=False, whole=False)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only barriers travel between ranks; gloo works with or without GPUs
        return cls(dist.get_rank(), dist.get_world_size(), distributed=True, whole=False)

    @property
    def leader(self) -> bool:
        """Places the factors and the build config; every hand-built part leads its own folder."""
        return not self.distributed or self.number == 0

    @property
    def writes_index(self) -> bool:
        return self.whole or (self.distributed and self.leader)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.number

    def device(self, device: str) -> str:
        """A torchrun rank on CUDA uses its own GPU."""
        if self.distributed and device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            return f"cuda:{os.environ['LOCAL_RANK']}"
        return device

    def sum(self, tensor):
        """``tensor`` summed over the ranks, in place (gloo reduces on the CPU); this process's own when not distributed."""
        if self.distributed:
            import torch.distributed as dist

            total = tensor.cpu()
            dist.all_reduce(total)
            tensor.copy_(total)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
