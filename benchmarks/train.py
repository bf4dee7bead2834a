"""Training speed and memory: lora-min against transformers + peft, and LoRA against full fine-tuning.

    python benchmarks/train.py                 # all three tables, Markdown, ~15 minutes on 2 CPU cores
    python benchmarks/train.py --only step     # just (a); also: --only e2e, --only full
    python benchmarks/train.py --threads 1     # pin torch's threads (on a busy machine)

(a) One LoRA training step (issue 2): the gpt2 (124M) configuration, batch 8 x 64 tokens,
    float32, logits at every position, random weights shared by both. Ours: GPT with LoRA on
    q and v. Reference: transformers' GPT2LMHeadModel + peft LoRA on the fused c_attn
    (fan_in_fan_out=True; peft cannot adapt q and v alone inside c_attn). Both r=4, alpha=32,
    LoRA dropout 0.1, AdamW, no base-model dropout. Time: median over interleaved repeats.
    Memory: what backward keeps (tensors saved for backward, counted once per storage, model
    weights excluded), plus gradients and AdamW state.
(b) End-to-end E2E training (issue 4): the examples of the first --batches batches a real
    train.py run trains on (the official train set, length-bucketed over all of it; the demo
    data when the real set is absent), each loop as it would really run. Ours: train.py's own
    functions (those batches, LM head only where there is loss). Reference: the standard
    transformers + peft loop over the same examples (shuffled batches padded to their longest
    example, labels -100 on prompt and padding, loss from the model).
(c) LoRA against --full (issue 4): `train.py --model <random gpt2 weights> --batch-size 8`
    run for a few steps as a subprocess; tokens/s from its log, and its peak resident memory.

Other programs competing for the CPU slow both sides alike (the repeats are interleaved),
but the absolute figures want a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (the training script: its loop is what (b) measures)
from lora_min.data import DEMO_DIR, EOT, batch_plan, load_split, loss_tokens, make_examples, micro_batches  # noqa: E402
from lora_min.distributed import Dist  # noqa: E402
from lora_min.hf_interop import export_merged  # noqa: E402
from lora_min.model import GPT, GPTConfig, LoRAConfig, count_trainable  # noqa: E402


# --------------------------------------------------------------------------- the two models

def reference_and_ours(lora_dropout: float = 0.1, seed: int = 0):
    """transformers GPT2LMHeadModel + peft LoRA, and our GPT with LoRA, on the same random gpt2 weights."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    hf = transformers.GPT2LMHeadModel(hf_config)
    ours = GPT(GPTConfig.from_name("gpt2"), LoRAConfig(r=4, alpha=32, dropout=lora_dropout, targets=("q", "v")))
    ours.load_base_weights(hf.state_dict(), source="transformers GPT2LMHeadModel")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=32, lora_dropout=lora_dropout,
                                               target_modules=["c_attn"], fan_in_fan_out=True))
    return peft_model.train(), ours.train()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)


# --------------------------------------------------------------------------- (a) one step

def saved_for_backward_bytes(model: torch.nn.Module, forward) -> tuple[torch.Tensor, int]:
    """Run forward() and count the bytes autograd keeps for backward: every saved tensor's
    storage once (views share it), leaving out the model's own weights (they exist anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    return loss, sum(storages.values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    adam = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return grads, adam


def bench_step(repeats: int) -> str:
    peft_model, ours = reference_and_ours()
    torch.manual_seed(1)
    idx = torch.randint(0, 50257, (8, 64))
    targets = torch.randint(0, 50257, (8, 64))
    opt_peft, opt_ours = adamw(peft_model), adamw(ours)

    def forward_peft():
        return peft_model(input_ids=idx, labels=idx).loss  # HF shifts the labels itself

    def forward_ours():
        logits = ours(idx)  # (8, 64, 50257): full logits, like the reference
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def step(model, forward, optimizer):
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    runs = {"lora-min": (ours, forward_ours, opt_ours), "transformers + peft": (peft_model, forward_peft, opt_peft)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: allocator, kernels, optimizer state
        step(*run)
        step(*run)
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(step, *run)[:2])

    rows = []
    for name, (model, forward, optimizer) in runs.items():
        optimizer.zero_grad(set_to_none=True)
        loss, activations = saved_for_backward_bytes(model, forward)
        loss.backward()
        grads, adam = state_bytes(model, optimizer)
        wall, cpu = (statistics.median(t) for t in zip(*times[name]))
        rows.append((name, wall, cpu, count_trainable(model), activations, grads, adam))
    lines = [f"Median of {repeats} interleaved steps.", "",
             "| implementation | time per step | CPU time per step | trainable params | saved for backward "
             "| gradients | AdamW state | total |", "|---|---|---|---|---|---|---|---|"]
    for name, wall, cpu, n, act, grads, adam in rows:
        lines.append(f"| {name} | {wall * 1000:,.0f} ms | {cpu * 1000:,.0f} ms | {n:,} | {mb(act)} | {mb(grads)} "
                     f"| {mb(adam)} | {mb(act + grads + adam)} |")
    return "\n".join(lines)


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, result) of fn(*args). On a busy machine CPU
    time is the steadier figure: it leaves out the time other programs hold the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# --------------------------------------------------------------------------- (b) E2E end to end

def e2e_dir() -> tuple[Path, str]:
    env = os.environ.get("LORA_MIN_E2E_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "e2e"]:
        if (candidate / "trainset.csv").is_file():
            return candidate, "real E2E"
    return DEMO_DIR, "the demo set (real E2E not found)"


def bench_e2e(n_batches: int, repeats: int) -> str:
    data_dir, what = e2e_dir()
    all_examples, _ = make_examples(load_split("train", data_dir, download=False))
    # The batches train.py runs first (its default --seed, epoch 0, length-bucketed over the whole
    # training set), and the reference loop gets the very same examples, shuffled as usual.
    first_batches = batch_plan([len(ex.input_ids) for ex in all_examples], 8, seed=110)[:n_batches]
    examples = [all_examples[i] for batch in first_batches for i in batch]
    plan, start = [], 0  # the same batches, as indices into `examples`
    for batch in first_batches:
        plan.append(list(range(start, start + len(batch))))
        start += len(batch)
    peft_model, ours = reference_and_ours()
    opt_peft, opt_ours = adamw(peft_model), adamw(ours)
    args = train.parse_args(["--batch-size", "8"])[0]  # the recipe's flags (label smoothing 0.1, ...)
    dist, device, scaler = Dist(), torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)

    def epoch_ours(seed: int, n_batches: int | None = None) -> tuple[int, int, int]:
        """train.py's loop: bucketed batches, logits only at loss positions (`seed`: unused,
        the batches are train.py's). Returns (real, computed, LM-head) positions."""
        real = positions = head = 0
        for batch in plan[:n_batches]:
            micro = micro_batches(examples, batch, dist.rank, dist.world_size, args.grad_accum)
            n_loss_tokens = loss_tokens(examples, batch)
            train.train_step(ours, micro, n_loss_tokens, args, dist, device, nullcontext(), scaler)
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
            input_ids = micro[0][0]  # (B, T): one micro-batch, T = longest example - 1
            real += sum(len(examples[i].input_ids) - 1 for i in batch)
            positions += input_ids.numel()
            head += n_loss_tokens  # the LM head runs only where there is loss
        return real, positions, head

    def epoch_reference(seed: int, n_batches: int | None = None) -> tuple[int, int, int]:
        """The standard loop: shuffled batches, dynamic padding, labels -100 on prompt and pad."""
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        real = positions = head = 0
        for start in range(0, len(order), 8)[:n_batches]:
            batch = [examples[i] for i in order[start:start + 8]]
            width = max(len(ex.input_ids) for ex in batch)
            input_ids = torch.full((len(batch), width), EOT)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for b, ex in enumerate(batch):
                n = len(ex.input_ids)
                input_ids[b, :n] = torch.tensor(ex.input_ids)
                attention_mask[b, :n] = 1
                labels[b, ex.n_prompt:n] = input_ids[b, ex.n_prompt:n]
            loss = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            opt_peft.step()
            opt_peft.zero_grad(set_to_none=True)
            real += int(attention_mask.sum())
            positions += input_ids.numel()
            head += input_ids.numel()  # the model computes logits at every position
        return real, positions, head

    runs = {"lora-min (train.py loop)": epoch_ours, "transformers + peft, standard loop": epoch_reference}
    for run in runs.values():
        run(seed=0, n_batches=2)  # warm-up
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    counts = {}
    for r in range(repeats):
        for name, run in runs.items():
            wall_s, cpu_s, counts[name] = timed(run, r)
            seconds[name].append((wall_s, cpu_s))

    lines = [f"{len(examples)} examples from {what} (the first {len(plan)} batches of a train.py run), batch 8, "
             f"gpt2 (124M) config, LoRA r=4, float32; median of {repeats} interleaved passes over them.", "",
             "| loop | examples/s | examples per CPU-second | padding positions | positions per example: "
             "blocks, LM head | speed-up (wall, CPU) |",
             "|---|---|---|---|---|---|"]
    reference = [statistics.median(t) for t in zip(*seconds["transformers + peft, standard loop"])]
    for name in runs:
        wall, cpu = (statistics.median(t) for t in zip(*seconds[name]))
        real, positions, head = counts[name]
        lines.append(f"| {name} | {len(examples) / wall:.2f} | {len(examples) / cpu:.2f} | "
                     f"{100 * (1 - real / positions):.0f}% | "
                     f"{positions / len(examples):.1f}, {head / len(examples):.1f} "
                     f"| {reference[0] / wall:.2f}x, {reference[1] / cpu:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- (c) LoRA vs full

def bench_full(steps: int, repeats: int) -> str:
    data_dir, what = e2e_dir()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = GPT(GPTConfig.from_name("gpt2"))
        export_merged(base, tmp)  # model.safetensors + config.json in the official layout
        del base
        results: dict[str, list[tuple[float, int, int]]] = {"LoRA (q, v, r=4)": [], "full fine-tuning": []}
        for r in range(repeats):
            for name in results:
                out = Path(tmp) / f"run-{r}-{'full' if 'full' in name else 'lora'}"
                cmd = [sys.executable, str(REPO / "train.py"), "--model", str(Path(tmp) / "model.safetensors"),
                       "--data-dir", str(data_dir), "--batch-size", "8", "--max-steps", str(steps),
                       "--warmup-steps", "1", "--no-eval", "--dev-every", "0", "--dev-limit", "8",
                       "--log-every", "1", "--out", str(out)] + (["--full"] if "full" in name else [])
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if done.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
                log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                tokens_per_s = statistics.median(rec["tokens_per_s"] for rec in log
                                                 if "loss" in rec and rec["step"] > 1)
                summary = json.loads((out / "summary.json").read_text())
                results[name].append((tokens_per_s, summary["peak_memory_bytes"], summary["trainable_params"]))
    lines = [f"gpt2 (124M) configuration, random weights, batch 8 of {what}, {steps} steps per run (the first "
             f"left out), median of {repeats} interleaved runs; memory is the process's peak resident set.", "",
             "| mode | trainable params | tokens/s | peak memory | of which gradients + AdamW state |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        n_trainable = runs[0][2]
        lines.append(f"| {name} | {n_trainable:,} | {statistics.median(r[0] for r in runs):,.0f} | "
                     f"{statistics.median(r[1] for r in runs) / 1e9:.2f} GB | {mb(3 * 4 * n_trainable)} |")
    lines += ["", "Gradients + AdamW state: 3 float32 numbers per trainable parameter (gradient, exp_avg, "
              "exp_avg_sq). The peak also holds the 0.5 GB of weights, twice while they are loaded."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["step", "e2e", "full"], help="run one table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of (a) and (b)")
    parser.add_argument("--batches", type=int, default=12, help="batches of 8 E2E examples per pass in (b)")
    parser.add_argument("--full-steps", type=int, default=6, help="steps per train.py run in (c)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the train.py subprocesses of (c)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.only in (None, "step"):
        print("## (a) One LoRA training step: gpt2 config, batch 8 x 64 tokens, float32, full logits\n")
        print(bench_step(args.repeats), "\n", flush=True)
    if args.only in (None, "e2e"):
        print("## (b) End-to-end E2E training speed\n")
        print(bench_e2e(args.batches, max(1, args.repeats // 2)), "\n", flush=True)
    if args.only in (None, "full"):
        print("## (c) LoRA against full fine-tuning (train.py)\n")
        print(bench_full(args.full_steps, 2), "\n", flush=True)


if __name__ == "__main__":
    main()
