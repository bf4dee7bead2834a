"""benchmarks/gpu.py: its FLOP count, checked against torch's own counter on small models; and on a
machine without a GPU it says so and exits 0."""
import importlib.util

import pytest
import torch
from torch.utils import flop_counter

from conftest import REPO
from lora_min.data import masked_lm_loss
from lora_min.model import GPT, GPTConfig, LoRAConfig

spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)

aten = torch.ops.aten
# torch's counter knows the CUDA attention kernels; count the CPU one the same way (all four
# backward products, as the CUDA kernels compute them).
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v),
}


@pytest.mark.parametrize("n_layer, n_head, n_embd, r, targets, batch, seq_len, n_prompt", [
    (2, 2, 32, 4, ("q", "v"), 3, 10, 4),  # the paper's targets
    (3, 4, 64, 2, ("q", "k", "v"), 2, 16, 9),
    (1, 1, 16, 8, ("k",), 1, 5, 1),
])
def test_step_flops_match_torchs_flop_counter(n_layer, n_head, n_embd, r, targets, batch, seq_len, n_prompt):
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=97, block_size=32)
    model = GPT(config, LoRAConfig(r=r, targets=targets)).train()
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    loss_mask[:, n_prompt:] = True
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        masked_lm_loss(model(idx, logits_mask=loss_mask), idx, loss_mask, 0.1).backward()
    n_loss = int(loss_mask.sum())
    assert gpu.step_flops(config, r, len(targets), batch, seq_len, n_loss) == counter.get_total_flops()


def test_gpt2_medium_arithmetic():
    # By hand, per position: 24 layers of 12 C^2 weights, 2 FLOPs each forward and 2 backward, but
    # layer 0's c_attn (3 C^2) gets no input gradient; LoRA 2 targets x (4 + 8) C r, less 2 C r each in
    # layer 0; attention 14 T C per layer; the LM head 4 C V at the 256 positions with loss.
    C, T, r = 1024, 64, 4
    per_position = 4 * 24 * 12 * C * C - 2 * 3 * C * C + 2 * (24 * 12 - 2) * C * r + 24 * 14 * T * C
    expected = 512 * per_position + 256 * 4 * C * 50257
    flops = gpu.step_flops(GPTConfig.from_name("gpt2-medium"), r=r, n_targets=2, batch=8, seq_len=T, n_loss=256)
    assert flops == expected
    assert 1.3e9 < flops / 512 < 1.4e9  # GFLOP per position


def test_the_memory_model_matches_what_autograd_keeps():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=256)
    model = GPT(config, gpu.LORA).train()
    model.cast_frozen_base(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    idx, targets, loss_mask = gpu.batch_like_e2e(2, 32, config.vocab_size, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx, logits_mask=loss_mask)
        masked_lm_loss(logits, targets, loss_mask, 0.1)
    estimate = gpu.saved_for_backward(config, 2, 32, int(loss_mask.sum()))
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.05)


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU here" in out and "GFLOP per position" in out


@pytest.mark.parametrize("build", [gpu.ours, gpu.reference])
def test_each_implementations_step_runs(monkeypatch, build):
    """The timed loop, run on the CPU in bf16 with torch.cuda's clocks and counters stubbed out."""
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: 23)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 123)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16)
    device = torch.device("cpu")
    data = gpu.batch_like_e2e(2, 8, config.vocab_size, device)
    seconds, peak = gpu.measure(build, config, "bf16", device, data, compiled=False, warmup=1, steps=2)
    assert seconds > 0 and peak == 100
