"""Adapter figures on the gpt2 (124M) configuration: file size, swap time, mixed-batch speed.

    python benchmarks/adapters.py [--repeats 30] [--threads N]

  * size on disk of an r=4 q,v adapter (the paper's E2E setting), ours and as PEFT exports it;
  * set_adapter between 4 resident adapters; entering/leaving disable_adapters and mixed_adapters;
  * one forward pass of a batch of 8 rows using 4 adapters (2 rows each) with mixed_adapters,
    against running each adapter's 2 rows as its own batch after set_adapter, and against the
    plain base model on all 8 rows (the cost with no LoRA at all): a 64-token prefill, and one
    decoding step on a KV cache holding 64 tokens.

Random weights (timings do not depend on values). The variants are interleaved, in a new order
each repeat, and medians reported, so other load on the machine hits them all alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_min.adapters import add_adapter, disable_adapters, export_peft, mixed_adapters, save_adapter, set_adapter
from lora_min.model import GPT, GPTConfig, KVCache, LoRAConfig, lora_state_dict

BATCH, N_ADAPTERS, PROMPT_LEN = 8, 4, 64


def random_adapter(model: GPT, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in lora_state_dict(model).items()}


def file_sizes(model: GPT) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a.safetensors")
        export_peft(Path(tmp) / "peft", lora_state_dict(model), model.lora_config)
        return {"lora-min adapter file": (Path(tmp) / "a.safetensors").stat().st_size,
                "PEFT adapter_model.safetensors": (Path(tmp) / "peft" / "adapter_model.safetensors").stat().st_size}


def median_us(fn, n_inner: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n_inner):
            fn()
        times.append((time.perf_counter() - start) / n_inner)
    return statistics.median(times) * 1e6


ROW_NAMES = [f"a{i // (BATCH // N_ADAPTERS)}" for i in range(BATCH)]  # a0 a0 a1 a1 a2 a2 a3 a3


def swap_times(model: GPT, repeats: int) -> dict[str, float]:
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    turn = iter(range(10**9))

    def swap() -> None:
        set_adapter(model, names[next(turn) % N_ADAPTERS])

    def disable() -> None:
        with disable_adapters(model):
            pass

    def mix() -> None:
        with mixed_adapters(model, ROW_NAMES):  # stacks each layer's A and B once per batch
            pass

    return {"set_adapter": median_us(swap, 200, repeats),
            "disable_adapters enter+exit": median_us(disable, 200, repeats),
            "mixed_adapters enter+exit (8 rows)": median_us(mix, 20, repeats)}


def seconds(model: GPT, idx: torch.Tensor, cached: bool) -> float:
    """A prompt's forward pass over idx (logits at the last position only, as decoding needs);
    or, cached, one decoding step after a (not timed) prefill of idx."""
    last = torch.zeros_like(idx, dtype=torch.bool)
    last[:, -1] = True
    if cached:
        cache = KVCache(model.config, idx.size(0), idx.size(1) + 1)
        model(idx, cache=cache, logits_mask=last)
        start = time.perf_counter()
        model(idx[:, -1:], cache=cache)
    else:
        start = time.perf_counter()
        model(idx, logits_mask=last)
    return time.perf_counter() - start


def forward_variants(model: GPT, cached: bool):
    """name -> a function timing one batch of BATCH rows run the way the name says."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (BATCH, PROMPT_LEN), generator=g)
    per_adapter = BATCH // N_ADAPTERS

    def mixed() -> float:
        with mixed_adapters(model, ROW_NAMES):
            return seconds(model, prompt, cached)

    def separate() -> float:
        total = 0.0
        for i in range(N_ADAPTERS):
            start = time.perf_counter()
            set_adapter(model, f"a{i}")
            total += time.perf_counter() - start
            total += seconds(model, prompt[i * per_adapter : (i + 1) * per_adapter], cached)
        return total

    def base() -> float:
        with disable_adapters(model):
            return seconds(model, prompt, cached)

    return {"mixed (1 batch of 8)": mixed, "separate (4 batches of 2)": separate, "base model, no LoRA": base}


@torch.inference_mode()
def forward_times(model: GPT, cached: bool, repeats: int) -> dict[str, float]:
    variants = forward_variants(model, cached)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            times[name].append(variants[name]())
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2"), LoRAConfig(r=4, alpha=32, targets=("q", "v"))).eval()
    for i in range(N_ADAPTERS):
        add_adapter(model, f"a{i}", random_adapter(model, i))
    set_adapter(model, "a0")
    print(f"gpt2 configuration, r=4 on q,v; torch {torch.__version__}, {torch.get_num_threads()} threads")

    for name, size in file_sizes(model).items():
        print(f"{name:34s} {size:>10,} bytes ({size / 1024:.1f} KiB)")
    for name, us in swap_times(model, args.repeats).items():
        print(f"{name:34s} {us:10.1f} us (median)")
    for cached, label in [(False, f"forward, {PROMPT_LEN}-token prompt"), (True, f"decode step, {PROMPT_LEN} cached")]:
        for name, ms in forward_times(model, cached, args.repeats).items():
            print(f"{label}: {name:28s} {ms:8.2f} ms (median)")


if __name__ == "__main__":
    main()
