"""This process's place in a torchrun job: joining (or starting) the process group,
barriers, rank-0-only steps whose errors every rank raises, and leaving it."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.distributed as dist


def launch_rank() -> int:
    """This process's rank as torchrun's environment gives it (0 outside torchrun), readable
    before any process group exists (tokenizing a corpus, the command line's messages)."""
    return int(os.environ.get("RANK", "0"))


def show_progress(progress: bool | None, rank: int | None = None) -> bool:
    """Whether to draw a progress bar: only on rank 0 (``rank``, default the launch rank), and
    with ``progress=None`` only when stderr is a terminal."""
    if (launch_rank() if rank is None else rank) != 0:
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


class ProcessGroup:
    """This process's place in a torchrun job; a single process is rank 0 of 1."""

    def __init__(self, rank: int, world_size: int, created: bool):
        self.rank = rank
        self.world_size = world_size
        self.created = created

    @classmethod
    def join(cls, device: torch.device) -> "ProcessGroup":
        """Use the script's process group, or start one from torchrun's environment."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), created=False)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or not dist.is_available():
            return cls(0, 1, created=False)
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None
                                  else int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), created=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def run_on_rank0(self, function: Callable[[], None]) -> None:
        """Run on rank 0 only; every rank raises the error rank 0 got, if any."""
        error = None
        if self.rank == 0:
            try:
                function()
            except Exception as caught:  # every rank raises it
                error = caught
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise error

    def check_same(self, value: str, what: str) -> None:
        """Raise on every rank unless ``value`` is the same on all of them."""
        if self.world_size == 1:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            odd = next(rank for rank, v in enumerate(values) if v != values[0])
            raise ValueError(
                f"extract: {what} differ between rank 0 and rank {odd}; seed the initialisation "
                "(torch.manual_seed) or load the same weights on every rank"
            )

    def leave(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
