"""Process groups for training: one code path for a single process, torchrun on CPUs (gloo) and GPUs (nccl).

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Without it the run is a single
process with world size 1 and nothing is initialised. Under torchrun each rank takes GPU LOCAL_RANK when CUDA is
asked for (or available), else the CPU with gloo. Only rank 0 prints, shows progress bars and writes files.
Collectives give up after `MEMSPLICE_DIST_TIMEOUT_S` seconds (default 1800), so a rank that never arrives ends the
run with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import pick_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """"nccl", "gloo", or None for a single process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, pick_device(device), None)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = pick_device(device)
    if wanted.type == "cuda":
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_timeout())
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank, world, local, dev, backend)


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("MEMSPLICE_DIST_TIMEOUT_S", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"MEMSPLICE_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over ranks (in place on a copy); identity for a single process."""
    if not info.distributed:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(info: DistInfo, obj):
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
