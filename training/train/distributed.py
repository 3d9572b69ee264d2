"""Many processes through HF Accelerate (``accelerate launch``), one process without it.

The loop asks only four things: how many ranks, which one am I, average these gradients, wait for
everyone. Each rank takes its slice of every global batch, so N processes with batch b train
exactly like one process with batch N*b.
"""

from __future__ import annotations

import os

import torch


class Dist:
    """Single process: every collective is the identity."""

    world = 1
    rank = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across ranks, in place."""

    def barrier(self) -> None:
        """Wait until every rank gets here; a single process returns at once."""


class AccelerateDist(Dist):
    """Ranks set up by ``accelerate launch`` (NCCL on GPUs, gloo on CPUs)."""

    def __init__(self, cpu: bool = False):
        from accelerate import PartialState

        self.state = PartialState(cpu=cpu)
        self.world = self.state.num_processes
        self.rank = self.state.process_index
        self.device = self.state.device

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` across ranks in place, with one all-reduce over a flat buffer."""
        if self.world == 1 or not tensors:
            return
        from accelerate.utils import reduce

        # One all-reduce per step over a flat buffer, not one per LoRA tensor.
        flat = reduce(torch.cat([t.detach().reshape(-1) for t in tensors]), reduction="mean")
        for t, r in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(r.view_as(t))

    def barrier(self) -> None:
        """Wait until every rank gets here (Accelerate's ``wait_for_everyone``)."""
        self.state.wait_for_everyone()


def launched_distributed() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current(cpu: bool = False) -> Dist:
    """An :class:`AccelerateDist` when launched with several processes, else a single-process :class:`Dist`."""
    return AccelerateDist(cpu=cpu) if launched_distributed() else Dist()
