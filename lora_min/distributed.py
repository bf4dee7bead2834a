"""torchrun processes for train.py (the device and precision each one uses: lora_min/device.py).

Without torchrun there is one process (rank 0 of 1) and every helper here is a no-op. Under
torchrun, each process joins the job (nccl between GPUs, gloo between CPU processes) and
DistributedDataParallel averages gradients; train.py all-reduces what it prints.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from lora_min.device import pick_device


@dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun job, if any: nccl between GPUs, gloo between CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), world_size, local_rank)


def all_reduce_sum(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(values)
    return values


def barrier(dist: Dist, timeout: timedelta | None = None) -> None:
    """Wait until every process gets here. `timeout`: for a long wait, such as the others waiting
    while rank 0 downloads gpt2-xl (6.4 GB), longer than the job's default (NCCL: 10 minutes, which
    a link under ~11 MB/s would exceed); this wait then runs in a gloo group made with it."""
    if dist.enabled:
        torch_dist.barrier(group=torch_dist.new_group(backend="gloo", timeout=timeout) if timeout else None)


def leave(dist: Dist) -> None:
    """Leave the torchrun job (decoding and scoring run on one process)."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated by tensors on CUDA; elsewhere the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
