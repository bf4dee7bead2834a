"""Devices, mixed precision and torchrun processes for train.py.

Without torchrun there is one process (rank 0 of 1) and every helper here is a no-op. Under
torchrun, each process joins the job (nccl between GPUs, gloo between CPU processes) and
DistributedDataParallel averages gradients; train.py all-reduces what it prints.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from lora_min.flags import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: auto picks cuda, then mps, then cpu; a device that is not there is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's MPS backend is not available; use --device cpu (or auto)")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision: auto is bf16 on CUDA GPUs that have it, fp16 on older ones, else fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16") and device.type == "mps":
        raise ConfigError(f"--precision {precision}: mixed precision runs on CUDA or the CPU, not on MPS; use fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16; use fp16 (or auto)")
    return precision


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


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


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
