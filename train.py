"""Fine-tune GPT-2 with LoRA on the E2E NLG Challenge, then decode and score the test set.

    python train.py                                  # the paper's GPT-2 (124M) run on E2E
    python train.py --model gpt2-medium              # the paper's Table 3 row (GPT-2 M)
    python train.py --full                           # full fine-tuning, the paper's FT baseline
    python train.py --demo                           # a 1-minute pipeline check on any CPU
    torchrun --nproc_per_node=4 train.py             # data parallel on 4 GPUs
    python train.py --resume --out runs/e2e-gpt2-lora   # continue an interrupted run exactly

The defaults are the paper's recipe (Hu et al., 2021, Table 11, as run by microsoft/LoRA's
examples/NLG/README.md):

    flag                    default    paper (Table 11, E2E)
    --lora-targets          q,v        adapt W_q and W_v (Section 4.2)
    --lora-r                4          r_q = r_v = 4
    --lora-alpha            32         LoRA alpha 32 (the update is scaled by alpha / r)
    --lora-dropout          0.1        dropout prob 0.1
    --lr                    2e-4       learning rate 0.0002
    --weight-decay          0.01       weight decay 0.01 (AdamW)
    --beta1/--beta2         0.9/0.999  (microsoft/LoRA: --adam_beta2 0.999)
    --adam-eps              1e-6       (microsoft/LoRA's default adam_epislon)
    --warmup-steps          500        warmup steps 500, then linear decay to 0
    --batch-size            8          batch size 8
    --epochs                5          5 epochs
    --label-smoothing       0.1        label smooth 0.1
    --max-len               512        (microsoft/LoRA: --seq_len 512)
    --seed                  110        (microsoft/LoRA's E2E script: --random_seed 110)
    --beam-size             10         inference: beam size 10
    --length-penalty        0.9        length penalty 0.9
    --no-repeat-ngram-size  4          no repeat ngram size 4

Where the time goes, and why this loop is fast: the LM head (768 x 50257) runs only at the
positions that carry loss (the reference tokens; prompt and padding skip it), batches hold
examples of similar length (lora_min/data.py), AdamW is the fused kernel, and on CUDA it uses
bf16 autocast (fp16 with a grad scaler on GPUs without bf16), TF32 and SDPA flash attention (and
torch.compile with --compile). --precision bf16/fp16 runs on the CPU too, which tests that code.

What lands in --out: run.json (all flags), adapter.safetensors (LoRA tensors + metadata;
--full: model.safetensors + config.json in the official layout), resume.pt (optimizer, step,
RNG states, data position), log.jsonl (every logged step), loss.png (with matplotlib),
summary.json, and eval/ (generated text and scores).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lora_min.adapters import save_adapter
from lora_min.data import (SPLIT_FILES, Example, batch_plan, collate, ensure_e2e, iterate_batches,
                           load_split, make_examples, masked_lm_loss, num_batches, resolve_e2e_dir, shard)
from lora_min.evaluate import evaluate_split
from lora_min.metrics import format_scores
from lora_min.model import (CONV1D_WEIGHTS, GPT, LORA_TARGETS, GPTConfig, LoRAConfig, count_trainable,
                            is_lora_param)
from lora_min.weights import HUB_NAMES, resolve_checkpoint, write_safetensors

# The demo's model: GPT-2's tokenizer, vocabulary and layout, but 4 thin layers with random weights.
DEMO_CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=128)
# What --demo changes unless the flag is given: a short run with a larger learning rate, so the
# loss visibly falls within a few dozen steps, and a small slice of dev and test.
DEMO_DEFAULTS = dict(data_dir="demo", out="runs/demo", max_steps=60, warmup_steps=6, lr=1e-2,
                     log_every=5, dev_every=30, save_every=30, dev_limit=100, eval_limit=40)

# Flags that decide what the model learns. Resuming adopts them from the run's run.json;
# giving one with a different value is refused.
RUN_FLAGS = ("demo", "model", "data_dir", "full", "lora_targets", "lora_r", "lora_alpha", "lora_dropout",
             "lr", "weight_decay", "beta1", "beta2", "adam_eps", "warmup_steps", "epochs", "max_steps",
             "batch_size", "label_smoothing", "max_len", "grad_clip", "seed")


class ConfigError(Exception):
    """A bad flag, path or combination, found before any training starts."""


# -----------------------------------------------------------------------------
# Flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except for on/off switches and flags whose help explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


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
    g.add_argument("--out", default=None,
                   help="output folder for checkpoints, logs and scores (default: runs/e2e-<model>-lora or -full)")
    g.add_argument("--demo", action="store_true",
                   help="pipeline check: a small random GPT-2-shaped model, the demo data, 60 steps, then "
                        "decoding and scoring; under 2 minutes on 2 CPU cores, no download")
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
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warmup steps, then linear decay to 0")
    g.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps (0: run all epochs); the schedule decays to 0 here")
    g.add_argument("--batch-size", type=int, default=8,
                   help="examples per optimizer step, summed over processes and accumulation micro-batches")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="split each batch into this many micro-batches (same result, less memory)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    g.add_argument("--max-len", type=int, default=512, help="longest training sequence in tokens (longer ones are cut)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off, as the paper)")
    g.add_argument("--seed", type=int, default=110, help="seed of initialisation, data order and dropout")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA GPUs that support it, fp16 with a grad scaler on older "
                        "ones, fp32 on CPU and MPS (bf16 and fp16 also run on the CPU, where only CPUs with "
                        "bfloat16 instructions gain from them)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: for CUDA; slow to start, and on the CPU no faster (see README)")
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


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The flags (argparse dest names) given on the command line, as opposed to defaulted."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:  # a default of SUPPRESS leaves absent flags out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse the command line; returns the flags and the set of those given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    if args.demo:
        for name, value in DEMO_DEFAULTS.items():
            if name not in explicit:
                setattr(args, name, value)
        args.overwrite = args.overwrite or not args.resume  # re-running the demo starts afresh
    if args.out is None:
        args.out = f"runs/e2e-{Path(args.model).stem}-{'full' if args.full else 'lora'}"
    return args, explicit


def adopt_run_config(args: argparse.Namespace, explicit: set[str]) -> None:
    """--resume: take the run's flags from its run.json; refuse explicit flags that differ."""
    run_json = Path(args.out) / "run.json"
    if not run_json.is_file():
        raise ConfigError(f"--resume: {args.out} has a checkpoint but no run.json with the run's flags")
    saved = json.loads(run_json.read_text())
    for name in RUN_FLAGS:
        if name in explicit and getattr(args, name) != saved[name]:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run being "
                              f"resumed in {args.out} ({saved[name]}); drop the flag to keep the run's value")
        setattr(args, name, saved[name])


def validate_args(args: argparse.Namespace, explicit: set[str], world_size: int = 1) -> None:
    """Every check that can fail, before any training: raises ConfigError naming the flag."""
    positive = ["lr", "batch_size", "grad_accum", "epochs", "max_len", "lora_r", "lora_alpha", "log_every",
                "beam_size", "max_new_tokens", "eval_batch_size"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    non_negative = ["weight_decay", "adam_eps", "warmup_steps", "max_steps", "grad_clip", "dev_every",
                    "dev_limit", "save_every", "eval_limit", "no_repeat_ngram_size"]
    for name in non_negative:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("lora_dropout", "label_smoothing", "beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    targets = [t for t in args.lora_targets.split(",") if t]
    if not targets or any(t not in LORA_TARGETS for t in targets) or len(set(targets)) != len(targets):
        raise ConfigError(f"--lora-targets must be distinct entries of {','.join(LORA_TARGETS)} separated by "
                          f"commas, got {args.lora_targets!r}")
    if args.batch_size < world_size * args.grad_accum:
        raise ConfigError(f"--batch-size {args.batch_size} is smaller than {world_size} process(es) x "
                          f"--grad-accum {args.grad_accum}: every micro-batch needs at least one example")

    # Combinations.
    lora_flags = sorted(f for f in explicit if f.startswith("lora_"))
    if args.full and lora_flags:
        given = ", ".join("--" + f.replace("_", "-") for f in lora_flags)
        raise ConfigError(f"--full trains all weights without LoRA; drop {given}")
    if args.demo and "model" in explicit:
        raise ConfigError("--demo uses a small random model; drop --model (or drop --demo to train --model)")
    if args.resume and args.overwrite and "overwrite" in explicit:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; choose one")
    if args.no_eval and explicit & {"eval_split", "eval_limit", "beam_size", "length_penalty",
                                    "no_repeat_ngram_size", "max_new_tokens", "eval_batch_size"}:
        raise ConfigError("--no-eval skips decoding; drop the --eval-*/beam flags or drop --no-eval")

    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    if precision in ("bf16", "fp16") and device.type == "mps":
        raise ConfigError(f"--precision {precision}: mixed precision runs on CUDA or the CPU, not on MPS; use fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16; use fp16 (or auto)")

    # Paths.
    if not args.demo and not (args.model in HUB_NAMES or Path(args.model).expanduser().exists()):
        raise ConfigError(f"--model {args.model!r} is neither a GPT-2 name ({', '.join(HUB_NAMES)}) nor an "
                          "existing file or folder")
    model_path = Path(args.model).expanduser()
    if not args.demo and model_path.is_dir() and not any(
            (model_path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"--model {args.model}: the folder holds neither model.safetensors nor pytorch_model.bin")
    data_dir = resolve_e2e_dir(args.data_dir)
    # Only the default folder is downloaded into; a folder the user names must already hold the data.
    if args.data_dir is not None or os.environ.get("LORA_MIN_E2E_DIR"):
        needed = ["train", "dev"] + ([] if args.no_eval else [args.eval_split])
        missing = [SPLIT_FILES[s] for s in dict.fromkeys(needed) if not (data_dir / SPLIT_FILES[s]).is_file()]
        if missing:
            raise ConfigError(f"--data-dir {data_dir} (or $LORA_MIN_E2E_DIR) lacks {', '.join(missing)}; point it "
                              "at the folder with the E2E CSVs, or leave both unset to download them to data/e2e")
    check_out_dir(args)


def check_out_dir(args: argparse.Namespace) -> None:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out} is not a writable folder ({err.strerror}); choose another --out") from None
    has_run = (out / "run.json").is_file()
    if args.resume and not (out / "resume.pt").is_file():
        raise ConfigError(f"--resume: {out} holds no checkpoint (resume.pt); check --out, or drop --resume")
    if has_run and not args.resume and not args.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to "
                          "start afresh, or choose another --out")


# -----------------------------------------------------------------------------
# Devices and processes


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's MPS backend is not available; use --device cpu (or auto)")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


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


# -----------------------------------------------------------------------------
# Model, optimizer, schedule


def build_model(args: argparse.Namespace) -> GPT:
    """The base model with LoRA on --lora-targets (or without LoRA, all weights trainable, for --full)."""
    lora = None if args.full else LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                             targets=tuple(args.lora_targets.split(",")))
    if args.demo:
        return GPT(DEMO_CONFIG, lora)  # random weights: a pipeline check, not a language model
    return GPT.from_pretrained(args.model, lora=lora)


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
# Data


@dataclass
class Position:
    """Where the data stream stands: the next global batch is batch `batch` of epoch `epoch`."""
    epoch: int = 0
    batch: int = 0


def load_examples(args: argparse.Namespace, split: str, dist: Dist) -> list[Example]:
    # Only rank 0 downloads (when the default folder is empty); the others wait, then read.
    if dist.is_main:
        ensure_e2e(args.data_dir)
    if dist.enabled:
        torch_dist.barrier()
    examples, n_truncated = make_examples(load_split(split, args.data_dir, download=False), args.max_len)
    if n_truncated and dist.is_main:
        print(f"note: {n_truncated} {split} examples are longer than --max-len {args.max_len} and were cut")
    return examples


def global_batches(examples: Sequence[Example], args: argparse.Namespace, start: Position,
                   world_size: int) -> Iterator[tuple[Position, list[int]]]:
    """(position, example indices) of every global batch from `start` to the end of the last epoch.

    The order depends only on (--seed, epoch) (see data.batch_plan), so a resumed run, or a
    run with another number of processes, sees the very same batches.
    """
    lengths = [len(ex.input_ids) for ex in examples]
    for epoch in range(start.epoch, args.epochs):
        plan = batch_plan(lengths, args.batch_size, seed=args.seed, epoch=epoch, world_size=world_size)
        for index in range(start.batch if epoch == start.epoch else 0, len(plan)):
            yield Position(epoch, index), plan[index]


def micro_batches(examples: Sequence[Example], batch: list[int], args: argparse.Namespace, dist: Dist,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """This process's part of a global batch, cut into --grad-accum micro-batches:
    (input_ids, targets, loss_mask, number of loss tokens) each, on `device`."""
    mine = shard(batch, dist.rank, dist.world_size)
    pieces = [shard(mine, i, args.grad_accum) for i in range(args.grad_accum)]
    result = []
    for piece in pieces:
        if piece:
            input_ids, targets, loss_mask = collate([examples[i] for i in piece])
            result.append((input_ids.to(device), targets.to(device), loss_mask.to(device), int(loss_mask.sum())))
    return result


def loss_tokens(examples: Sequence[Example], batch: list[int]) -> int:
    """Target tokens that carry loss in a batch: each example's reference and final <|endoftext|>."""
    return sum(len(examples[i].input_ids) - examples[i].n_prompt for i in batch)


# -----------------------------------------------------------------------------
# One step, and the dev loss


def train_step(model: torch.nn.Module, micro: list, n_loss_tokens: int, args: argparse.Namespace,
               dist: Dist, autocast, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one global batch; gradients
    accumulate in .grad. Returns this process's part of the batch's loss (a 0-d tensor).

    The loss of a batch is the mean over all its loss tokens (as microsoft/LoRA's). Each
    micro-batch's mean is weighted by its share of those tokens, so the gradient is the same
    however the batch is split over micro-batches and processes (DDP averages gradients over
    processes, hence the factor world_size).
    """
    loss_sum = torch.zeros((), device=micro[0][0].device)
    for i, (input_ids, targets, loss_mask, n_tokens) in enumerate(micro):
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
# Checkpoints: the weights (adapter, or the full model) and a separate resume state


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # no-op after a successful os.replace


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def official_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The base weights under the official checkpoints' names and layout (the four Conv1D weights
    per block stored (in, out)), so that GPT.from_pretrained and transformers read our file
    exactly as they read the published one. The tied LM head is left out, as there."""
    return {name: tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
            for name, tensor in model.state_dict().items()
            if name != "lm_head.weight" and not is_lora_param(name)}


def weights_path(args: argparse.Namespace) -> Path:
    return Path(args.out) / ("model.safetensors" if args.full else "adapter.safetensors")


def save_weights(model: GPT, args: argparse.Namespace, step: int) -> Path:
    """What the run produces: the adapter (LoRA tensors + JSON metadata), or with --full the
    whole model in the official layout with a config.json beside it."""
    path = weights_path(args)
    if args.full:
        c = model.config
        hf_config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=c.n_embd, vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size)
        atomic_write_text(path.parent / "config.json", json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(path, official_state_dict(model), {"format": "pt", "step": str(step)})
    else:
        base = "random demo model (train.py --demo)" if args.demo else args.model
        save_adapter(model, path, base_model=base, extra_metadata={"step": str(step), "seed": str(args.seed)})
    return path


def trainable_state(model: GPT) -> dict[str, torch.Tensor]:
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in names}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    # Dropout is the only randomness after initialisation; the data order has its own generator
    # seeded by (seed, epoch) and needs no state.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                    position: Position, args: argparse.Namespace, dist: Dist, device: torch.device) -> None:
    """Write the weights and resume.pt (every process takes part: each one's RNG state is kept)."""
    rng_states = [rng_state(device)]
    if dist.enabled:
        rng_states = [None] * dist.world_size
        torch_dist.all_gather_object(rng_states, rng_state(device))
    if dist.is_main:
        # resume.pt carries the trainable weights too, so it is complete on its own even if a
        # kill falls between writing it and writing the adapter.
        state = {"step": step, "epoch": position.epoch, "batch": position.batch,
                 "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_states, "world_size": dist.world_size}
        atomic_write_bytes(Path(args.out) / "resume.pt", lambda f: torch.save(state, f))
        save_weights(model, args, step)
    if dist.enabled:
        torch_dist.barrier()


def load_checkpoint(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    args: argparse.Namespace, dist: Dist, device: torch.device) -> tuple[int, Position]:
    """Restore weights, optimizer, grad scaler and RNG from resume.pt; returns (step, data position)."""
    state = torch.load(Path(args.out) / "resume.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if state["world_size"] == dist.world_size:
        set_rng_state({k: v.cpu() for k, v in state["rng"][dist.rank].items()}, device)
    else:
        torch.manual_seed(args.seed + 1000 * state["step"] + dist.rank)
        if dist.is_main:
            print(f"note: the checkpoint was written by {state['world_size']} process(es), this run has "
                  f"{dist.world_size}; dropout draws new random numbers, so the run continues, but not "
                  "bitwise as it would have")
    return state["step"], Position(state["epoch"], state["batch"])


# -----------------------------------------------------------------------------
# Progress, logs and the summary


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """On resume: drop the records a killed run wrote after its last checkpoint."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Training and dev loss against steps, as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in records if "dev_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train loss (label-smoothed)")
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


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


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


DEMO_BANNER = """\
==============================================================================
 DEMO: a pipeline check with a small, RANDOMLY INITIALISED GPT-2-shaped model.
 It trains LoRA for a few dozen steps on {data}, then decodes and scores
 like a real run. The text and the scores are meaningless. For the paper's
 experiment run `python train.py` (downloads GPT-2 and the E2E data).
=============================================================================="""


# -----------------------------------------------------------------------------
# Stopping cleanly on Ctrl-C / SIGTERM


class StopSignal:
    """Remembers a SIGINT/SIGTERM; the loop checks it after each step, saves and exits.
    A second signal acts as usual (Ctrl-C twice quits at once)."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# The run


class Progress:
    """Timing of the training steps (evaluation and checkpoints left out): tokens/s and ETA."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.seconds = 0.0  # in training steps, this session
        self.steps = 0
        self.window_seconds, self.window_tokens = 0.0, 0  # since the last printed line

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.steps += 1
        self.window_seconds += seconds
        self.window_tokens += tokens

    def take_tokens_per_s(self) -> float:
        rate = self.window_tokens / max(self.window_seconds, 1e-9)
        self.window_seconds, self.window_tokens = 0.0, 0
        return rate

    def eta(self, step: int) -> float:
        return self.seconds / max(self.steps, 1) * (self.total_steps - step)


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
        train_examples, dev_examples, model = prepare(args, dist, say)
        return run_training(args, dist, say, started, model, train_examples, dev_examples)
    except ConfigError as err:
        say(f"train.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def prepare(args: argparse.Namespace, dist: Dist, say) -> tuple[list[Example], list[Example], GPT]:
    """Read the data and build the model; any failure becomes a ConfigError, before training."""
    if args.demo:
        say(DEMO_BANNER.format(data=resolve_e2e_dir(args.data_dir)))
    try:
        # Data first: it is quick, and a bad file fails before a model is downloaded.
        train_examples = load_examples(args, "train", dist)
        dev_examples = load_examples(args, "dev", dist)[:args.dev_limit or None]
        if dist.enabled and not args.demo:  # rank 0 downloads the weights (if needed), the others wait
            if dist.is_main:
                resolve_checkpoint(args.model)
            torch_dist.barrier()
        torch.manual_seed(args.seed)  # the same LoRA initialisation in every process
        model = build_model(args)
    except (OSError, ValueError, KeyError) as err:  # unreadable data or weights, a failed download
        raise ConfigError(err.args[0] if isinstance(err, KeyError) else str(err)) from None
    if model.config.block_size < args.max_len:
        raise ConfigError(f"--max-len {args.max_len} is longer than the model's {model.config.block_size} "
                          "positions; lower --max-len")
    return train_examples, dev_examples, model


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip)
    scaler.step(optimizer)  # with fp16: skips the step if a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def run_training(args: argparse.Namespace, dist: Dist, say, started: float, model: GPT,
                 train_examples: list[Example], dev_examples: list[Example]) -> int:
    out = Path(args.out)
    device = pick_device(args.device, dist.local_rank)
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any float32 matmul
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling, bf16 not
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
            truncate_log(log_path, step)
        say(f"resumed {out} at step {step} (epoch {position.epoch + 1}, batch {position.batch})")
    else:
        torch.manual_seed(args.seed + dist.rank)  # dropout: a different stream in every process
        if dist.is_main:  # a fresh run: nothing of an earlier one in --out may be mistaken for ours
            for name in ("run.json", "resume.pt", "adapter.safetensors", "model.safetensors", "config.json",
                         "log.jsonl", "loss.png", "summary.json"):
                (out / name).unlink(missing_ok=True)
            atomic_write_text(out / "run.json", json.dumps(vars(args), indent=2) + "\n")

    n_trainable, n_params = count_trainable(model), sum(p.numel() for p in model.parameters())
    say(f"model: {'demo (random) ' + str(DEMO_CONFIG) if args.demo else args.model}, "
        f"{'full fine-tuning' if args.full else 'LoRA on ' + args.lora_targets + f', r={args.lora_r}'}, "
        f"{n_trainable:,} of {n_params:,} parameters trainable ({100 * n_trainable / n_params:.2f}%)")
    say(f"data: {len(train_examples):,} training examples, {steps_per_epoch:,} steps per epoch, "
        f"{total_steps:,} steps; device {device}, {precision}, {dist.world_size} process(es)")

    train_model: torch.nn.Module = model
    if args.compile:
        # Bucketed batches come in many lengths: compile once for any length, not once per length.
        train_model = torch.compile(train_model, dynamic=True)
    if dist.enabled:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    stop = StopSignal()
    progress = Progress(total_steps)
    last_loss, dev_loss, saved_step = float("nan"), None, step
    try:
        for position, batch in global_batches(train_examples, args, position, dist.world_size):
            if step >= total_steps:
                break
            t0 = time.time()
            lr = lr_at(step, args.lr, args.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches(train_examples, batch, args, dist, device)
            loss = train_step(train_model, micro, loss_tokens(train_examples, batch), args, dist, autocast, scaler)
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
            step += 1
            position = Position(position.epoch, position.batch + 1)
            progress.add(time.time() - t0, sum(len(train_examples[i].input_ids) - 1 for i in batch))
            last_loss = loss

            if step % args.log_every == 0 or step == total_steps:
                tokens_per_s = progress.take_tokens_per_s()
                say(f"step {step:>{len(str(total_steps))}}/{total_steps} | epoch {position.epoch + 1}/{args.epochs} | "
                    f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
                    f"elapsed {format_duration(time.time() - started)} | ETA {format_duration(progress.eta(step))}",
                    flush=True)
                if dist.is_main:
                    append_log(log_path, dict(step=step, epoch=position.epoch + 1, loss=loss, lr=lr,
                                              tokens_per_s=tokens_per_s, elapsed_s=time.time() - started))
            if (args.dev_every and step % args.dev_every == 0) or step == total_steps:
                dev_loss = evaluate_loss(model, dev_examples, args, dist, device, autocast)
                perplexity = math.exp(min(dev_loss, 50))
                say(f"dev loss {dev_loss:.4f} (perplexity {perplexity:.2f}) at step {step}", flush=True)
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
    if dist.enabled:  # decoding and scoring run on one process
        torch_dist.destroy_process_group()
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
    if not args.no_eval:
        try:
            summary["eval"] = run_evaluation(model, args, autocast)
        except KeyboardInterrupt:
            print(f"\nevaluation interrupted; the trained weights are in {weights}", file=sys.stderr)
            return 130
    summary["wall_seconds"] = time.time() - started
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out / 'summary.json'} (wall time {format_duration(summary['wall_seconds'])})")
    return 0


def run_evaluation(model: GPT, args: argparse.Namespace, autocast) -> dict:
    """Decode --eval-split with beam search and score it with the five E2E metrics."""
    model.eval()
    model.merge_lora()  # fold B A into the weights: decoding costs what the base model costs (Section 4.1)
    print(f"decoding {args.eval_split} with beam size {args.beam_size}" +
          (f" (first {args.eval_limit} MRs)" if args.eval_limit else ""), flush=True)
    with autocast:
        scores = evaluate_split(model, resolve_e2e_dir(args.data_dir), split=args.eval_split,
                                out_dir=Path(args.out) / "eval", beam_size=args.beam_size,
                                max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                no_repeat_ngram_size=args.no_repeat_ngram_size, batch_size=args.eval_batch_size,
                                limit=args.eval_limit or None)
    print(f"scores on {args.eval_split} (generated text and scores.json in {Path(args.out) / 'eval'}):")
    print(format_scores(scores))
    if args.demo:
        print("(a random model: these scores only show that the pipeline runs)")
    return scores


if __name__ == "__main__":
    sys.exit(main())
