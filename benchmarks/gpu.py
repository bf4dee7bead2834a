"""The paper's training step on one CUDA GPU: tokens/s, MFU and peak memory, eager and compiled,
lora-min side by side with transformers + peft.

    python benchmarks/gpu.py                      # gpt2-medium (the paper's GPT-2 M), 30 timed steps
    python benchmarks/gpu.py --model gpt2-xl --steps 10

What runs: train.py's recipe (LoRA r=4, alpha 32, dropout 0.1 on q and v; AdamW; label smoothing
0.1; bf16 autocast, fp16 on GPUs without bfloat16; frozen base kept in that precision) on random
weights of the chosen size and random tokens shaped like E2E batches: --batch-size sequences of
--seq-len positions, the loss on the last half (E2E: 52 positions per example on average, 47% of
them with loss). Ours computes the LM head only where there is loss, as train.py does. The
reference is transformers' GPT2LMHeadModel (base in the same precision) + peft LoRA on the fused
c_attn (peft cannot adapt q and v alone inside it), loss from the model (labels -100 on the prompt):
the standard loop. Each is timed eager and under torch.compile.

MFU (model FLOPs utilization) = the recipe's FLOPs per step (`step_flops`, the same count for both
implementations: work the reference does beyond it, like logits at every position, counts as
waste) / step time / the GPU's peak dense bf16 (or fp16) tensor-core rate.

On a machine without a CUDA GPU it prints the FLOP arithmetic, says so, and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_min.data import masked_lm_loss  # noqa: E402
from lora_min.device import HALF_DTYPES, autocast_for, pick_precision  # noqa: E402
from lora_min.model import GPT, GPTConfig, LoRAConfig  # noqa: E402

# The recipe (train.py's defaults, the paper's Table 11).
LORA = LoRAConfig(r=4, alpha=32, dropout=0.1, targets=("q", "v"))
LR, WEIGHT_DECAY, BETAS, EPS, LABEL_SMOOTHING = 2e-4, 0.01, (0.9, 0.999), 1e-6, 0.1

# Peak dense tensor-core TFLOP/s in bf16 (fp16 for GPUs without bf16), from NVIDIA's data sheets;
# matched against torch.cuda.get_device_name(). Other GPUs: pass --peak-tflops.
# (First match wins: "H100 PCIe" before "H100", "L40S" before "L4".)
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121,
               "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65}


# --------------------------------------------------------------------------- FLOP arithmetic

def step_flops(config: GPTConfig, r: int, n_targets: int, batch: int, seq_len: int, n_loss: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one LoRA training step, forward and backward, with LoRA of
    rank r on n_targets of q, k, v; batch x seq_len positions, n_loss of them with loss (LM head).

    Counted as torch.utils.flop_counter counts them (attention over all seq_len keys, causal or not).
    Per position and layer, with C = n_embd and T = seq_len:
      forward   24 C^2 (c_attn 6, c_proj 2, c_fc 8, mlp c_proj 8)  +  4 C r per target  +  4 T C (QK^T, AV)
      backward  the same 24 C^2 for the input gradients (frozen weights get none)  +  8 C r per target
                (gradients of A, B, A x and x)  +  10 T C (attention: QK^T again, then four gradients)
    except that layer 0's input carries no gradient (the embeddings are frozen): no 6 C^2 for
    c_attn's input gradient there, nor 2 C r per target for LoRA's. The LM head (C x vocab, tied
    and frozen) runs at the n_loss positions only: 2 C V forward, 2 C V for its input gradient.
    Weight decay, LayerNorm, GELU, softmax and the optimizer are not matmuls and are left out.
    """
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, seq_len
    positions = batch * seq_len
    forward = L * (24 * C * C + 4 * C * r * n_targets + 4 * T * C)
    backward = L * (24 * C * C + 8 * C * r * n_targets + 10 * T * C) - (6 * C * C + 2 * C * r * n_targets)
    return positions * (forward + backward) + n_loss * 4 * C * V


# E2E's training set as train.py runs it: 42,061 examples of 52.3 positions on average, 24.8 of them
# with loss; the longest is 112 positions. The paper's 5 epochs at batch 8 are 26,290 steps.
E2E_EXAMPLES, E2E_POSITIONS, E2E_LOSS_POSITIONS, E2E_LONGEST, EPOCHS = 42_061, 52.3, 24.8, 112, 5
# Bytes autograd keeps for backward per layer and position, in units of n_embd, under bf16
# autocast with the frozen base in bf16: measured with torch.autograd.graph.saved_tensors_hooks on
# the CPU for all four sizes (40.4 n_embd each; CUDA's dropout masks are 1 byte, not 4, so a GPU
# keeps a little less). Per position with loss: the float32 log-probabilities, 4 bytes x vocab.
SAVED_BYTES_PER_LAYER_POSITION_PER_EMBD = 40.4


def estimate_memory(config: GPTConfig, r: int, n_targets: int, batch: int, seq_len: int, n_loss: int) -> float:
    """Bytes a bf16 training step needs at its peak (an estimate): the frozen weights in bf16, the
    LoRA weights with their gradients and AdamW state in float32, what backward keeps, and the
    gradient of the logits (float32 and bf16) at the positions with loss."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    matmul_weights = V * C + L * 12 * C * C  # bf16 (GPT.cast_frozen_base)
    other_weights = config.block_size * C + L * 13 * C + 2 * C  # position embedding, LayerNorms, biases
    lora = L * n_targets * 2 * r * C
    return (2 * matmul_weights + 4 * other_weights + 16 * lora + saved_for_backward(config, batch, seq_len, n_loss)
            + n_loss * 6 * V)


def saved_for_backward(config: GPTConfig, batch: int, seq_len: int, n_loss: int) -> float:
    """Bytes autograd keeps for backward in a bf16 step (see SAVED_BYTES_PER_LAYER_POSITION_PER_EMBD)."""
    per_position = config.n_layer * SAVED_BYTES_PER_LAYER_POSITION_PER_EMBD * config.n_embd
    return batch * seq_len * per_position + n_loss * 4 * config.vocab_size


def estimate_table(peak_tflops: dict[str, float], mfu: float = 0.4) -> str:
    """Per GPT-2 size: memory at batch 8 of E2E's longest examples, and the paper's 5 epochs at `mfu`."""
    gpus = list(peak_tflops)
    lines = [f"| model | memory, batch 8 x {E2E_LONGEST} positions | " +
             " | ".join(f"5 epochs at {mfu:.0%} MFU on {gpu}" for gpu in gpus) + " |",
             "|---" * (2 + len(gpus)) + "|"]
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        config = GPTConfig.from_name(name)
        memory = estimate_memory(config, LORA.r, len(LORA.targets), 8, E2E_LONGEST, 8 * E2E_LONGEST // 2)
        per_position = step_flops(config, LORA.r, len(LORA.targets), 1, round(E2E_POSITIONS), 0) / round(E2E_POSITIONS)
        head = 4 * config.n_embd * config.vocab_size * E2E_LOSS_POSITIONS
        total = EPOCHS * E2E_EXAMPLES * (E2E_POSITIONS * per_position + head)
        times = [total / (mfu * tflops * 1e12) for tflops in peak_tflops.values()]
        lines.append(f"| {name} | {memory / 2**30:.1f} GiB | " + " | ".join(f"{t / 60:.1f} min" for t in times) + " |")
    return "\n".join(lines)


def count_ops(n_layer: int, precision: str) -> tuple[int, int]:
    """(aten operations, of which views) that one eager training step of ours dispatches (forward,
    loss, backward; the fused AdamW step adds one), counted on the CPU. Every one is a dispatch
    on the host and, views aside, a kernel launch on a GPU. The count depends on the number of
    layers, not on the width or the batch, so a narrow model gives the count of a wide one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "t", "transpose", "split", "unsqueeze", "expand", "detach", "alias", "slice"}
    counts = {"all": 0, "views": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["all"] += 1
            counts["views"] += func.overloadpacket.__name__ in views
            return func(*args, **(kwargs or {}))

    config = GPTConfig(n_layer=n_layer, n_head=2, n_embd=32)
    device = torch.device("cpu")
    model, loss = ours(config, precision, device, batch_like_e2e(1, 16, config.vocab_size, device))
    loss(model).backward()  # the first step allocates what later ones reuse
    model.zero_grad(set_to_none=True)
    with Counter():
        loss(model).backward()
    return counts["all"], counts["views"]


# --------------------------------------------------------------------------- the two implementations

def batch_like_e2e(batch: int, seq_len: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq_len), generator=g)
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    loss_mask[:, seq_len // 2:] = True  # prompt, then the reference that carries the loss
    return idx.to(device), targets.to(device), loss_mask.to(device)


def ours(config: GPTConfig, precision: str, device: torch.device, data):
    """lora-min as train.py runs it: returns (model, step function)."""
    model = GPT(config, LORA)
    if precision in HALF_DTYPES:
        model.cast_frozen_base(HALF_DTYPES[precision])
    model.to(device).train()
    idx, targets, loss_mask = data

    def loss(m):
        with autocast_for(precision, device):
            logits = m(idx, logits_mask=loss_mask)  # (N, vocab): only where there is loss
        return masked_lm_loss(logits, targets, loss_mask, LABEL_SMOOTHING)

    return model, loss


def reference(config: GPTConfig, precision: str, device: torch.device, data):
    """transformers GPT2LMHeadModel + peft LoRA, the standard loop: returns (model, step function)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_config = transformers.GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    hf = transformers.GPT2LMHeadModel(hf_config)
    if precision in HALF_DTYPES:
        hf.to(HALF_DTYPES[precision])  # peft keeps its adapters in float32 (autocast_adapter_dtype)
    model = get_peft_model(hf, LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                          target_modules=["c_attn"], fan_in_fan_out=True)).to(device).train()
    idx, _, loss_mask = data
    labels = torch.where(loss_mask, idx, -100)

    def loss(m):
        with autocast_for(precision, device):
            return m(input_ids=idx, labels=labels).loss

    return model, loss


def measure(build, config: GPTConfig, precision: str, device: torch.device, data, compiled: bool,
            warmup: int, steps: int) -> tuple[float, int]:
    """(median seconds per optimizer step, peak bytes allocated: weights, activations, gradients and
    optimizer state) over `steps` steps after `warmup`."""
    torch.manual_seed(0)
    before = torch.cuda.memory_allocated(device)  # the batch, and anything earlier runs left
    torch.cuda.reset_peak_memory_stats(device)
    model, loss = build(config, precision, device, data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    run = torch.compile(model, dynamic=True) if compiled else model  # as train.py --compile: any length
    seconds = []
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        scaler.scale(loss(run)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, loss, run, optimizer
    torch._dynamo.reset()  # compiled code keeps the model alive
    torch.cuda.empty_cache()
    return statistics.median(seconds), peak


# --------------------------------------------------------------------------- command line

def peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2-medium", help="shapes of this GPT-2 size (random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64, help="positions per sequence (the loss on the last half)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s (default: from its name)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers + peft")
    args = p.parse_args(argv)

    config = GPTConfig.from_name(args.model)
    n_loss = args.batch_size * (args.seq_len - args.seq_len // 2)
    flops = step_flops(config, LORA.r, len(LORA.targets), args.batch_size, args.seq_len, n_loss)
    positions = args.batch_size * args.seq_len
    print(f"{args.model}: LoRA r={LORA.r} on {','.join(LORA.targets)}, batch {args.batch_size} x {args.seq_len} "
          f"positions, loss on {n_loss}: {flops / 1e9:,.1f} GFLOP per step, {flops / positions / 1e9:.3f} GFLOP "
          "per position (benchmarks/gpu.py step_flops)")
    for precision in ("fp32", "bf16"):
        n_ops, n_views = count_ops(config.n_layer, precision)
        print(f"an eager {precision} step dispatches {n_ops:,} aten operations, {n_ops - n_views:,} of them "
              "besides views (counted on the CPU: count_ops)")
    print("\nEstimates (the arithmetic above and the memory model in estimate_memory; E2E as train.py runs it):\n")
    print(estimate_table({"A100": PEAK_TFLOPS["A100"], "H100": PEAK_TFLOPS["H100"]}), "\n")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure. Run this on a machine with one.")
        return 0

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    precision = pick_precision("auto", device)
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or peak_tflops(name)
    print(f"{name}, torch {torch.__version__}, {precision}; peak {peak or '?'} TFLOP/s dense "
          f"{'(pass --peak-tflops for MFU)' if peak is None else ''}\n")
    data = batch_like_e2e(args.batch_size, args.seq_len, config.vocab_size, device)
    runs = [("lora-min", ours)] + ([] if args.no_reference else [("transformers + peft", reference)])
    print("| implementation | mode | ms per step | tokens/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|")
    for label, build in runs:
        for compiled in (False, True):
            seconds, peak_bytes = measure(build, config, precision, device, data, compiled, args.warmup, args.steps)
            mfu = f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "?"
            print(f"| {label} | {'compiled' if compiled else 'eager'} | {seconds * 1e3:.1f} | "
                  f"{positions / seconds:,.0f} | {mfu} | {peak_bytes / 2**30:.2f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
