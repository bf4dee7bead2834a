"""lora_min/device.py: the device and precision train.py and evaluate pick, checked on a CPU with a
mocked torch.cuda (what a GPU machine would report)."""
import pytest
import torch

from lora_min.device import autocast_for, pick_device, pick_precision
from lora_min.flags import ConfigError


def fake_gpu(monkeypatch, *, bf16: str) -> None:
    """A visible CUDA GPU. bf16: 'native' (Ampere and newer), 'emulated' (T4, V100, RTX 20xx:
    torch.cuda.is_bf16_supported() says True unless asked including_emulation=False), or 'none'."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return bf16 == "native" or (bf16 == "emulated" and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_picks_the_gpu_when_there_is_one(monkeypatch):
    fake_gpu(monkeypatch, bf16="native")
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("auto", local_rank=3) == torch.device("cuda:3")
    assert pick_device("cpu") == torch.device("cpu")


def test_auto_picks_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU"):
        pick_device("cuda")


@pytest.mark.parametrize("bf16, expected", [("native", "bf16"), ("emulated", "fp16"), ("none", "fp16")])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_in_bf16(monkeypatch, bf16, expected):
    fake_gpu(monkeypatch, bf16=bf16)
    assert pick_precision("auto", torch.device("cuda:0")) == expected
    assert pick_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("bf16", ["emulated", "none"])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_refused(monkeypatch, bf16):
    fake_gpu(monkeypatch, bf16=bf16)
    with pytest.raises(ConfigError, match="--precision bf16: this GPU has no bfloat16"):
        pick_precision("bf16", torch.device("cuda:0"))
    assert pick_precision("fp16", torch.device("cuda:0")) == "fp16"


def test_mixed_precision_is_refused_on_mps():
    with pytest.raises(ConfigError, match="--precision fp16: mixed precision runs on CUDA or the CPU"):
        pick_precision("fp16", torch.device("mps"))
    assert pick_precision("auto", torch.device("mps")) == "fp32"


def test_autocast_runs_matmuls_in_the_precision():
    x = torch.randn(2, 3)
    for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        with autocast_for(precision, torch.device("cpu")):
            assert (x @ x.t()).dtype == dtype
