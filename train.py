"""Fine-tune GPT-2 with LoRA on the E2E NLG Challenge, then decode and score the test set.

    python train.py                                  # the paper's GPT-2 (124M) run on E2E
    python train.py --model gpt2-medium              # the paper's Table 3 row (GPT-2 M)
    python train.py --full                           # full fine-tuning, the paper's FT baseline
    python train.py --demo                           # a pipeline check on any CPU, no download
    torchrun --nproc_per_node=4 train.py             # data parallel on 4 GPUs
    python train.py --resume --out runs/e2e-gpt2-lora   # continue an interrupted run exactly

The defaults are the paper's recipe (Hu et al., 2021, Table 11, as run by microsoft/LoRA's
examples/NLG/README.md); `--help` lists them. This file is the recipe: the flags, the model, the
optimizer and schedule, the training loop, the dev loss, and decoding + scoring at the end. The
plumbing lives in lora_min/: data.py (batches), checkpoint.py (save and resume exactly),
runlog.py (progress line, log.jsonl, loss.png), distributed.py (devices, torchrun), flags.py
(checks of the flags, before any work is spent).

Where the time goes: the LM head (768 x 50257) runs only at the positions that carry loss (the
reference tokens), batches hold examples of similar length, AdamW is the fused kernel, and on
CUDA it uses bf16 autocast (fp16 with a grad scaler on GPUs without bf16) with the frozen base
kept in bf16, TF32 and SDPA flash attention. On a GPU add --compile: an eager step issues
thousands of small kernels and waits on their launches (benchmarks/gpu.py measures both).

What lands in --out: run.json (all flags), adapter.safetensors (LoRA tensors + metadata;
--full: model.safetensors + config.json in the official layout), resume.pt (optimizer, step,
RNG states, data position), log.jsonl (every logged step), loss.png (with matplotlib),
summary.json, eval/ (generated text and scores), and .lock (while a run holds the folder, a
second run on it is refused).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lora_min.checkpoint import (StopSignal, load_checkpoint, lock_out_dir, save_checkpoint, start_fresh,
                                 weights_path)
from lora_min.data import (TEXTS, E2EFormatError, Example, Position, ensure_e2e, global_batches, iterate_batches,
                           load_split, loss_tokens, make_examples, masked_lm_loss, micro_batches, num_batches,
                           resolve_e2e_dir)
from lora_min.device import DEVICES, HALF_DTYPES, PRECISIONS, autocast_for, pick_device, pick_precision
from lora_min.distributed import Dist, all_reduce_sum, barrier, init_distributed, leave, peak_memory_bytes
from lora_min.demo import DEMO, load_base
from lora_min.evaluate import evaluate_split
from lora_min.fileio import atomic_write_text
from lora_min.flags import (ConfigError, HelpFormatter, adopt_run_config, check_decoding_fits, check_out_dir,
                            given_flags, validate_args)
from lora_min.metrics import format_scores
from lora_min.model import GPT, LORA_TARGETS, GPTConfig, LoRAConfig, count_trainable
from lora_min.runlog import Progress, append_log, format_bytes, format_duration, plot_losses, truncate_log
from lora_min.weights import HUB_NAMES, files_to_download, resolve_checkpoint

# How long the other processes of a torchrun job wait while rank 0 downloads the weights:
# gpt2-xl is 6.4 GB, two hours at 1 MB/s.
DOWNLOAD_TIMEOUT = timedelta(hours=2)
# What --demo changes unless the flag is given: the demo's random base (lora_min/demo.py), a short
# run with a larger learning rate, so the loss visibly falls within a few dozen steps, and a small
# slice of dev and test (decoding 20 MRs takes less time than the training).
DEMO_DEFAULTS = dict(model=DEMO, data_dir="demo", out="runs/demo", max_steps=60, warmup_steps=6, lr=1e-2,
                     log_every=5, dev_every=30, save_every=30, dev_limit=100, eval_limit=20)
DEMO_BANNER = """\
==============================================================================
 DEMO: a pipeline check with a small, RANDOMLY INITIALISED GPT-2-shaped model.
 It trains LoRA for a few dozen steps on {data}, then decodes and scores
 like a real run. The text and the scores are meaningless. For the paper's
 experiment run `python train.py` (downloads GPT-2 and the E2E data).
=============================================================================="""


# -----------------------------------------------------------------------------
# Flags: the paper's Table 11 values are the defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune GPT-2 with LoRA on E2E (Hu et al., 2021), then decode and score the test set.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="gpt2",
                   help=f"base model: one of {', '.join(HUB_NAMES)} (downloaded once), or a local "
                        "model.safetensors / pytorch_model.bin or a folder holding one")
    g.add_argument("--data-dir", default=None,
                   help="folder with the E2E CSVs (trainset.csv, devset.csv, testset_w_refs.csv); 'demo' is "
                        "the small set in data/demo. Default: $LORA_MIN_E2E_DIR, else data/e2e (downloaded)")
    g.add_argument("--text", default="paper", choices=TEXTS,
                   help="paper: the text the paper trained and scored on (microsoft/LoRA's data/e2e/*.txt, "
                        "rebuilt from the CSVs: 'Blue Spice . It 's £ 20 - 25'); raw-csv: the CSV text as it is")
    g.add_argument("--out", default=None,
                   help="output folder for checkpoints, logs and scores (default: runs/e2e-<model>-lora or -full)")
    g.add_argument("--demo", action="store_true",
                   help="pipeline check: a small random GPT-2-shaped model, the demo data, 60 steps, then "
                        "decoding and scoring; no download, about 40 s of CPU time (README: measured times)")
    g = p.add_argument_group("LoRA (paper Table 11)")
    g.add_argument("--full", action="store_true",
                   help="train all weights instead of LoRA (the paper's FT baseline); no --lora-* flags then")
    g.add_argument("--lora-targets", default="q,v",
                   help=f"comma-separated projections to adapt, from {','.join(LORA_TARGETS)}")
    g.add_argument("--lora-r", type=int, default=4, help="rank r of each update B A")
    g.add_argument("--lora-alpha", type=float, default=32, help="the update is scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the input of A")
    g = p.add_argument_group("optimisation (paper Table 11)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")  # microsoft/LoRA: --adam_beta2 0.999
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")  # microsoft/LoRA's default
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warmup steps, then linear decay to 0")
    g.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps (0: run all epochs); the schedule decays to 0 here")
    g.add_argument("--batch-size", type=int, default=8,
                   help="examples per optimizer step, summed over processes and accumulation micro-batches")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="split each batch into this many micro-batches (same result, less memory)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    # microsoft/LoRA: --seq_len 512
    g.add_argument("--max-len", type=int, default=512, help="longest training sequence in tokens (longer ones are cut)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off, as the paper)")
    # microsoft/LoRA's E2E script: --random_seed 110
    g.add_argument("--seed", type=int, default=110, help="seed of initialisation, data order and dropout")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA GPUs that support it, fp16 with a grad scaler on older "
                        "ones, fp32 on CPU and MPS (bf16 and fp16 also run on the CPU, where only CPUs with "
                        "bfloat16 instructions gain from them)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: the way to run on a GPU, where an eager step is launch-bound "
                        "(thousands of small kernels); a minute or two to compile, and on the CPU no faster")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% more compute")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="print and log the loss every N steps")
    g.add_argument("--dev-every", type=int, default=2000,
                   help="dev-set loss every N steps and at the end (0: only at the end)")
    g.add_argument("--dev-limit", type=int, default=0, help="dev loss on the first N dev examples (0: all)")
    g.add_argument("--save-every", type=int, default=1000,
                   help="checkpoint every N steps and at the end (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    g = p.add_argument_group("evaluation after training (paper Table 11: beam 10, length penalty 0.9)")
    g.add_argument("--no-eval", action="store_true", help="stop after training")
    g.add_argument("--eval-split", default="test", choices=["test", "dev"], help="split to decode and score")
    g.add_argument("--eval-limit", type=int, default=0, help="decode only the first N MRs (0: all)")
    g.add_argument("--beam-size", type=int, default=10, help="beam width")
    g.add_argument("--length-penalty", type=float, default=0.9, help="beam scores are divided by length**this")
    g.add_argument("--no-repeat-ngram-size", type=int, default=4, help="never repeat an n-gram of this size")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest generated text in tokens")
    g.add_argument("--eval-batch-size", type=int, default=8, help="MRs decoded at once (each with --beam-size beams)")
    return p



def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse the command line; returns the flags and the set of those given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, explicit = parser.parse_args(argv), given_flags(parser, argv)
    if args.demo:
        for name, value in DEMO_DEFAULTS.items():
            if name not in explicit:
                setattr(args, name, value)
        args.overwrite = args.overwrite or not args.resume  # re-running the demo starts afresh
    if args.out is None:
        args.out = f"runs/e2e-{Path(args.model).stem}-{'full' if args.full else 'lora'}"
    return args, explicit


# -----------------------------------------------------------------------------
# Model, optimizer, schedule


def build_model(args: argparse.Namespace) -> GPT:
    """The base model with LoRA on --lora-targets (or without LoRA, all weights trainable, for --full)."""
    lora = None if args.full else LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                             targets=tuple(args.lora_targets.split(",")))
    return load_base(args.model, lora)  # --demo: random weights, a pipeline check, not a language model


def make_optimizer(model: GPT, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on every trainable tensor, as microsoft/LoRA does (its no_decay_bias is off).
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps,
                             weight_decay=args.weight_decay, fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to peak_lr over
    warmup_steps, then linear decay that would reach 0 at total_steps (microsoft/LoRA's
    get_linear_schedule_with_warmup, shifted by one so that no step runs at lr 0)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# -----------------------------------------------------------------------------
# One step, and the dev loss


def train_step(model: torch.nn.Module, micro: list, n_loss_tokens: int, args: argparse.Namespace,
               dist: Dist, device: torch.device, autocast, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one global batch; gradients
    accumulate in .grad. Returns this process's part of the batch's loss (a 0-d tensor).

    The loss of a batch is the mean over all its loss tokens (as microsoft/LoRA's). Each
    micro-batch's mean is weighted by its share of those tokens, so the gradient is the same
    however the batch is split over micro-batches and processes (DDP averages gradients over
    processes, hence the factor world_size).
    """
    loss_sum = torch.zeros((), device=device)
    for i, (input_ids, targets, loss_mask, n_tokens) in enumerate(micro):
        input_ids, targets, loss_mask = input_ids.to(device), targets.to(device), loss_mask.to(device)
        # DDP all-reduces gradients in backward; with accumulation only the last micro-batch must.
        last = i == len(micro) - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast:
                logits = model(input_ids, logits_mask=loss_mask)  # (N, vocab): only where there is loss
            loss = masked_lm_loss(logits, targets, loss_mask, args.label_smoothing)
            share = n_tokens / n_loss_tokens
            scaler.scale(loss * (share * dist.world_size)).backward()
        loss_sum += loss.detach() * share
    return loss_sum


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip)
    scaler.step(optimizer)  # with fp16: skips the step if a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate_loss(model: GPT, examples: Sequence[Example], args: argparse.Namespace, dist: Dist,
                  device: torch.device, autocast) -> float:
    """Mean loss per reference token on `examples`, without label smoothing (so exp(loss) is the
    perplexity); each process takes its share of every batch."""
    model.eval()
    totals = torch.zeros(2, device=device)  # (sum of token losses, tokens)
    for input_ids, targets, loss_mask in iterate_batches(examples, args.batch_size, shuffle=False,
                                                         rank=dist.rank, world_size=dist.world_size):
        input_ids, targets, loss_mask = input_ids.to(device), targets.to(device), loss_mask.to(device)
        with autocast:
            logits = model(input_ids, logits_mask=loss_mask)
        n = loss_mask.sum()
        totals += torch.stack([masked_lm_loss(logits, targets, loss_mask) * n, n.float()])
    model.train()
    loss_sum, n_tokens = all_reduce_sum(totals, dist).tolist()
    return loss_sum / n_tokens


# -----------------------------------------------------------------------------
# The run


def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()
    args, explicit = parse_args(argv)
    dist = init_distributed(args.device)
    say = print if dist.is_main else (lambda *a, **k: None)
    try:
        if args.resume:
            check_out_dir(args)
            adopt_run_config(args, explicit)
        validate_args(args, explicit, dist.world_size)
        with lock_out_dir(args.out) if dist.is_main else nullcontext():
            check_out_dir(args)  # again, holding --out: another run may have started in it meanwhile
            device = pick_device(args.device, dist.local_rank)
            # run.json records what auto became, so that a resumed run computes in the same precision.
            args.precision = precision = pick_precision(args.precision, device)
            train_examples, dev_examples, model = prepare(args, dist, say)
            if not args.no_eval:
                check_decoding_fits(args, model.config, device)
            return run_training(args, dist, say, started, model, device, precision, train_examples, dev_examples)
    except ConfigError as err:
        say(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing a checkpoint, log or result failed: a full disk, a lost mount
        resume = (f"then `python train.py --resume --out {args.out}` continues from the last checkpoint"
                  if (Path(args.out) / "resume.pt").is_file() else "then run again")
        say(f"train.py: error: {err.filename or args.out}: {err.strerror or err}; {resume}", file=sys.stderr)
        return 1
    finally:
        leave(dist)


def load_examples(args: argparse.Namespace, split: str, dist: Dist) -> list[Example]:
    if dist.is_main:  # only rank 0 downloads (when the default folder is empty); the others wait
        ensure_e2e(args.data_dir)
    barrier(dist)
    examples, n_truncated = make_examples(load_split(split, args.data_dir, download=False), args.max_len, args.text)
    if n_truncated and dist.is_main:
        print(f"note: {n_truncated} {split} examples are longer than --max-len {args.max_len} and were cut")
    return examples


def prepare(args: argparse.Namespace, dist: Dist, say) -> tuple[list[Example], list[Example], GPT]:
    """Read the data and build the model. Unreadable data or weights (or a failed download) are
    the user's to fix: a ConfigError naming the file, before training."""
    if args.demo:
        say(DEMO_BANNER.format(data=resolve_e2e_dir(args.data_dir)))
        if not args.resume and (Path(args.out) / "run.json").is_file():
            say(f"note: replacing the earlier demo run in {args.out} (give --out to keep both)")
    try:  # data first: it is quick, and a bad file fails before a model is downloaded
        train_examples = load_examples(args, "train", dist)
        dev_examples = load_examples(args, "dev", dist)[:args.dev_limit or None]
    except E2EFormatError as err:  # a malformed CSV
        raise ConfigError(str(err)) from None
    except OSError as err:  # a missing CSV, a failed download: say what else is still to get, all at once
        raise ConfigError(f"{err} {files_to_download(args.model)}".rstrip()) from None
    torch.manual_seed(args.seed)  # the same LoRA initialisation in every process
    if args.demo:
        model = build_model(args)
    else:
        try:
            if dist.is_main:  # rank 0 downloads the weights (if needed), the others wait
                resolve_checkpoint(args.model)
            barrier(dist, timeout=DOWNLOAD_TIMEOUT)
            model = build_model(args)
        except (OSError, ValueError, KeyError) as err:  # an unreadable or mismatched checkpoint
            raise ConfigError(err.args[0] if isinstance(err, KeyError) else str(err)) from None
    if model.config.block_size < args.max_len:
        raise ConfigError(f"--max-len {args.max_len} is longer than the model's {model.config.block_size} "
                          "positions; lower --max-len")
    return train_examples, dev_examples, model


def run_training(args: argparse.Namespace, dist: Dist, say, started: float, model: GPT, device: torch.device,
                 precision: str, train_examples: list[Example], dev_examples: list[Example]) -> int:
    out = Path(args.out)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any float32 matmul
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling, bf16 not
    if precision in HALF_DTYPES:  # what LoRA freezes is kept in bf16/fp16; A, B and AdamW's state stay float32
        model.cast_frozen_base(HALF_DTYPES[precision])
    model.to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    optimizer = make_optimizer(model, args, device)

    steps_per_epoch = num_batches(len(train_examples), args.batch_size, world_size=dist.world_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    log_path = out / "log.jsonl"

    step, position = 0, Position()
    if args.resume:
        step, position = load_checkpoint(model, optimizer, scaler, args, dist, device)
        if dist.is_main:
            try:
                truncate_log(log_path, step)
            except ValueError as err:  # a damaged line before the last
                raise ConfigError(str(err)) from None
        say(f"resumed {out} at step {step} (epoch {position.epoch + 1}, batch {position.batch})")
    else:
        torch.manual_seed(args.seed + dist.rank)  # dropout: a different stream in every process
        if dist.is_main:
            start_fresh(args)

    n_trainable, n_params = count_trainable(model), sum(p.numel() for p in model.parameters())
    epochs = math.ceil(total_steps / steps_per_epoch)  # the epochs this run starts (--max-steps may cut them)
    c = model.config
    say(f"model: {args.model}{f' (random weights, {c.n_layer} layers, {c.n_embd} wide)' if args.demo else ''}, "
        f"{'full fine-tuning' if args.full else 'LoRA on ' + args.lora_targets + f', r={args.lora_r}'}, "
        f"{n_trainable:,} of {n_params:,} parameters trainable ({100 * n_trainable / n_params:.2f}%)")
    say(f"data: {len(train_examples):,} training examples, {steps_per_epoch:,} steps per epoch; this run: "
        f"{total_steps:,} steps ({total_steps / steps_per_epoch:.3g} epochs); device {device}, {precision}, "
        f"{dist.world_size} process(es)")

    train_model: torch.nn.Module = model
    if args.compile:
        # Bucketed batches come in many lengths: compile once for any length, not once per length.
        train_model = torch.compile(train_model, dynamic=True)
    if dist.enabled:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    stop, progress = StopSignal(), Progress(total_steps)
    last_loss, dev_loss, saved_step = float("nan"), None, step
    try:
        for position, batch in global_batches(train_examples, args.batch_size, args.epochs, seed=args.seed,
                                              start=position, world_size=dist.world_size):
            if step >= total_steps:
                break
            t0 = time.time()
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches(train_examples, batch, dist.rank, dist.world_size, args.grad_accum)
            loss = train_step(train_model, micro, loss_tokens(train_examples, batch), args, dist, device,
                              autocast, scaler)
            # One all-reduce carries the loss and whether any process was asked to stop.
            stop_vote = torch.tensor(float(stop.signum > 0), device=device)
            loss, stop_votes = all_reduce_sum(torch.stack([loss.float(), stop_vote]), dist).tolist()
            if not math.isfinite(loss):
                kept = (f"the last good checkpoint (step {saved_step}) is kept in {out}" if saved_step
                        else "no checkpoint was saved yet")
                say(f"train.py: error: the loss is {loss} at step {step + 1}; stopping without saving: {kept}. "
                    "Lower --lr, use --precision bf16 or fp32, or set --grad-clip", file=sys.stderr)
                return 1
            optimizer_step(optimizer, scaler, args.grad_clip)
            step, position, last_loss = step + 1, Position(position.epoch, position.batch + 1), loss
            progress.add(time.time() - t0, sum(len(train_examples[i].input_ids) - 1 for i in batch))

            if step % args.log_every == 0 or step == total_steps:
                record = dict(step=step, epoch=position.epoch + 1, loss=loss, lr=lr,
                              tokens_per_s=progress.take_tokens_per_s(), elapsed_s=time.time() - started)
                say(progress.line(record, epochs), flush=True)
                if dist.is_main:
                    append_log(log_path, record)
            if (args.dev_every and step % args.dev_every == 0) or step == total_steps:
                dev_loss = evaluate_loss(model, dev_examples, args, dist, device, autocast)
                say(f"dev loss {dev_loss:.4f} (perplexity {math.exp(min(dev_loss, 50)):.2f}) at step {step}",
                    flush=True)
                if dist.is_main:
                    append_log(log_path, dict(step=step, dev_loss=dev_loss))
            if stop_votes or (args.save_every and step % args.save_every == 0) or step == total_steps:
                save_checkpoint(model, optimizer, scaler, step, position, args, dist, device)
                saved_step = step
                say(f"checkpoint saved at step {step}: {weights_path(args)}, {out / 'resume.pt'}", flush=True)
            if stop_votes:
                say(f"stopped by signal at step {step}/{total_steps}; continue with: python train.py --resume "
                    f"--out {out}", flush=True)
                return 128 + (stop.signum or signal.SIGTERM)
    finally:
        stop.restore()

    peak = peak_memory_bytes(device)
    leave(dist)  # decoding and scoring run on one process
    if not dist.is_main:
        return 0
    summary = dict(steps=step, final_train_loss=last_loss, final_dev_loss=dev_loss, trainable_params=n_trainable,
                   total_params=n_params, peak_memory_bytes=peak, train_seconds=progress.seconds)
    return finish(model, args, summary, device, autocast, started)


def finish(model: GPT, args: argparse.Namespace, summary: dict, device: torch.device, autocast,
           started: float) -> int:
    """The summary, the loss curve, then decoding and scores; writes summary.json."""
    out, weights = Path(args.out), weights_path(args)
    summary.update(weights_file=str(weights), weights_bytes=weights.stat().st_size)
    plotted = plot_losses(out / "log.jsonl", out / "loss.png")
    n_trainable, n_params, peak = summary["trainable_params"], summary["total_params"], summary["peak_memory_bytes"]
    print(f"\ndone: {summary['steps']} steps, training {format_duration(summary['train_seconds'])}, "
          f"wall {format_duration(time.time() - started)}")
    print(f"trainable parameters: {n_trainable:,} of {n_params:,} ({100 * n_trainable / n_params:.2f}%)")
    print(f"{'model' if args.full else 'adapter'} on disk: {weights} ({format_bytes(summary['weights_bytes'])})")
    print(f"peak memory: {format_bytes(peak) if peak else 'unknown'} "
          f"({'CUDA tensors' if device.type == 'cuda' else 'process resident set'})")
    print(f"loss curve: {out / 'loss.png' if plotted else 'not drawn (pip install matplotlib)'}")
    if args.demo and not args.full:
        print(f"(the loss starts near ln {model.config.vocab_size} = {math.log(model.config.vocab_size):.1f}, "
              "a uniform guess over GPT-2's tokens; a few dozen LoRA steps on random weights lower it only a "
              "little: the demo checks that the pipeline runs, not that it learns)")
    if not args.no_eval:
        try:
            summary["eval"] = run_evaluation(model, args, autocast)
        except KeyboardInterrupt:
            print(f"\nevaluation interrupted; the trained weights are in {weights}", file=sys.stderr)
            return 130
    summary["wall_seconds"] = time.time() - started
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out / 'summary.json'} (wall time {format_duration(summary['wall_seconds'])})")
    if args.demo:
        print(f"\nnext, with this adapter (offline, on the demo base and data it names):\n"
              f"  python -m lora_min.evaluate --adapter {weights}          # decode and score again\n"
              f"  python -m lora_min.adapters export-merged {weights} {out / 'merged'}   # a Hugging Face checkpoint\n"
              f"then the paper's experiment (downloads GPT-2 and the E2E data): python train.py")
    return 0


def run_evaluation(model: GPT, args: argparse.Namespace, autocast) -> dict:
    """Decode --eval-split with beam search and score it with the five E2E metrics, as the paper's
    scorer (measure_scores.py -p) and as the E2E challenge's (Perl mteval) computes them."""
    model.eval()
    model.merge_lora()  # fold B A into the weights: decoding costs what the base model costs (Section 4.1)
    print(f"decoding {args.eval_split} with beam size {args.beam_size}" +
          (f" (first {args.eval_limit} MRs)" if args.eval_limit else ""), flush=True)
    with autocast:
        scores = evaluate_split(model, resolve_e2e_dir(args.data_dir), split=args.eval_split,
                                out_dir=Path(args.out) / "eval", beam_size=args.beam_size,
                                max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                no_repeat_ngram_size=args.no_repeat_ngram_size, batch_size=args.eval_batch_size,
                                limit=args.eval_limit or None, text=args.text)
    print(f"scores on {args.eval_split} (generated text and scores.json in {Path(args.out) / 'eval'}):")
    print(format_scores(scores["scores"], official=scores["scores_perl"]))
    if (note := what_was_trained(args, model.config)) is not None:
        print(note)
    return scores


def what_was_trained(args: argparse.Namespace, config: GPTConfig) -> str | None:
    """What the scores of a run that is not the paper's can tell, in one line: LoRA on the demo's
    random base, a model trained from scratch, or a small pretrained base (tutorials chapter 8)."""
    steps = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epochs"
    if args.demo and not args.full:
        return ("(LoRA on the demo's random base, which knows no language: these scores only show that the "
                "pipeline runs)")
    if args.demo:
        return (f"(the demo model trained from scratch, all its weights from random, for {steps}: the scores "
                "are what it learned from this data alone, without pretraining)")
    if config.size_name() is None:
        how = "fully fine-tuned" if args.full else "adapted with LoRA"
        return (f"(a small base, {args.model} ({config.n_layer} layers, {config.n_embd} wide), {how} for {steps}: "
                "real scores of a miniature, not comparable with the paper's GPT-2 M)")
    return None


if __name__ == "__main__":
    sys.exit(main())
