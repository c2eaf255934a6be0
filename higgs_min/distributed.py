"""torch.distributed for the trainer: torchrun's environment, a few collectives, no magic.

One process without torchrun needs no process group: every helper here then
works on local values. Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set) we use nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_arg: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read torchrun's environment and join the process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA device is available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_arg == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cpu or cuda, got {device_arg!r}")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (identity without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on any rank (e.g. a SIGTERM seen by one)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_main(obj):
    """Rank 0's Python object on every rank (e.g. the outcome of a save)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's Python object, in rank order, on every rank ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
