"""Data-parallel training across processes and machines, launched by ``torchrun``.

``torchrun --nproc_per_node N -m wbdit train ...`` starts N processes per machine and sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each; ``setup`` joins them into
a process group (NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on CPU). Without
those variables, or with one process, everything here is a no-op and training is unchanged.

How ``wbdit.trainer.train`` splits the work, so that N processes follow the same trajectory
as one process with the same global batch (up to float summation order):

- every rank reads the same global batch order (``wbdit.batches.CellBatches``, a pure function
  of seed and epoch) and keeps its ``shard`` of rows: ``batch_size / world_size`` cells;
- t, noise and label dropout are drawn for the whole global batch from a generator with the
  same seed and state on every rank, and each rank keeps its rows;
- DistributedDataParallel averages gradients, so each step applies the global-batch
  gradient; the logged loss is ``mean`` over ranks;
- rank 0 alone writes checkpoints and logs (``is_main``), the others wait at a ``barrier``.
  A checkpoint holds the unwrapped model, optimizer and generator states, which are the same
  on every rank, so a run can resume with any number of processes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank in [0, world_size) and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, logs and progress (rank 0)."""
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """This rank's rows of a global batch: ``global_batch / world_size`` consecutive rows."""
        if global_batch % self.world_size:
            raise ValueError(
                f"batch size {global_batch} (the global batch) is not divisible by "
                f"the {self.world_size} processes; choose a multiple of {self.world_size}"
            )
        per = global_batch // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: Tensor) -> Tensor:
        """Average of a 0-d or n-d tensor over ranks (detached); ``value`` itself on one process."""
        if self.world_size == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op on one process)."""
        if self.world_size > 1 and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        elif self.world_size > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (rank 0's weights broadcast to all); itself on one process."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment, if any; return this rank's ``Dist``.

    With WORLD_SIZE > 1 and no group yet, initializes one (NCCL when ``device`` is CUDA, gloo
    otherwise) and destroys it at exit. A CUDA ``device`` without an index becomes
    ``cuda:LOCAL_RANK``. A group initialized by the caller is used as it is.
    """
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return Dist(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
        atexit.register(teardown)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Dist(device, dist.get_rank(), dist.get_world_size())


def teardown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def default_device() -> torch.device:
    """The device training and sampling use unless told: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
