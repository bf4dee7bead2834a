"""Where to compute and in what precision: one choice, shared by train.py and lora_min.evaluate.

    device = pick_device("auto")               # cuda, then mps, then cpu
    precision = pick_precision("auto", device)  # bf16 on GPUs with bfloat16 tensor cores, fp16 on
                                                # older GPUs (with a grad scaler when training), fp32 elsewhere
    with autocast_for(precision, device):
        logits = model(idx)

Mixed precision here is autocast: matmuls run in bf16/fp16, while LayerNorm, softmax and the
loss stay in float32, as do the trainable weights and the optimizer (see GPT.cast_frozen_base
for the frozen ones).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from lora_min.flags import ConfigError

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda, then mps, then cpu. local_rank: which GPU, for one process per GPU (torchrun).
    A device that is not there is a ConfigError naming --device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's MPS backend is not available; use --device cpu (or auto)")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def gpu_has_bf16() -> bool:
    # including_emulation=False: pre-Ampere GPUs (T4, V100, RTX 20xx) only emulate bfloat16,
    # slowly, and the default (True) would report them as supporting it.
    return torch.cuda.is_bf16_supported(including_emulation=False)


def pick_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs with bfloat16 tensor cores, fp16 on older GPUs, fp32 on CPU and MPS.
    bf16 and fp16 also run on the CPU (which tests that code). A combination that cannot run
    is a ConfigError naming --precision."""
    if name == "auto":
        return ("bf16" if gpu_has_bf16() else "fp16") if device.type == "cuda" else "fp32"
    if name in HALF_DTYPES and device.type == "mps":
        raise ConfigError(f"--precision {name}: mixed precision runs on CUDA or the CPU, not on MPS; use fp32")
    if name == "bf16" and device.type == "cuda" and not gpu_has_bf16():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 tensor cores; use fp16 (or auto)")
    return name


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """The context that runs a forward pass in `precision` on `device` (fp32: does nothing)."""
    if precision not in HALF_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[precision])
