"""torchrun / DDP glue: the same script runs single-process or under `torchrun --nproc-per-node N`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    """Rank 0's value on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(requested: str, d: Dist) -> str:
    """`auto` picks CUDA when present; under torchrun each rank takes its LOCAL_RANK GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            from hashret.errors import Unavailable

            raise Unavailable("--device cuda | no CUDA device is visible: use --device cpu")
        if requested == "cuda" and d.enabled:
            requested = f"cuda:{d.local_rank}"
        torch.cuda.set_device(torch.device(requested))
    return requested
