"""Checking train.py's flags before any work is spent, and adopting a resumed run's flags
(the decoding flags' check serves lora_min.evaluate too).

Every check names the flag at fault in a one-line ConfigError; train.py prints it and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from lora_min.data import SPLIT_FILES, E2EFormatError, encode_prompt, group_references, load_split, resolve_e2e_dir
from lora_min.decode import check_settings
from lora_min.model import LORA_TARGETS, GPTConfig
from lora_min.runlog import format_bytes
from lora_min.weights import HUB_NAMES

# Flags that decide what the model learns. Resuming adopts them from the run's run.json;
# giving one with a different value is refused.
# (--grad-accum and --precision change float rounding: the resumed run would not be bitwise the same.)
RUN_FLAGS = ("demo", "model", "data_dir", "text", "full", "lora_targets", "lora_r", "lora_alpha", "lora_dropout",
             "lr", "weight_decay", "beta1", "beta2", "adam_eps", "warmup_steps", "epochs", "max_steps",
             "batch_size", "grad_accum", "precision", "label_smoothing", "max_len", "grad_clip", "seed")


class ConfigError(Exception):
    """A bad flag, path or combination, found before any training starts."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except for on/off switches and flags whose help explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The flags (dest names) given on the command line, as opposed to left at their defaults.

    argparse fills in a default only for names the namespace does not hold yet, so parsing into
    a namespace that holds a marker for every name leaves the marker wherever no flag was given.
    """
    unset = object()
    names = vars(parser.parse_args(argv))
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(parsed).items() if value is not unset}


def flag(name: str) -> str:
    """The command-line spelling of a dest name: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def check_decoding_flags(beam_size: int, max_new_tokens: int, length_penalty: float, no_repeat_ngram_size: int,
                         batch_size: int, batch_flag: str) -> None:
    """decode.check_settings, with its message naming the flag (`batch_flag` for batch_size)."""
    try:
        check_settings(beam_size, max_new_tokens, length_penalty, no_repeat_ngram_size, batch_size)
    except ValueError as err:
        name, problem = str(err).split(" ", 1)
        raise ConfigError(f"{batch_flag if name == 'batch_size' else flag(name)} {problem}") from None


def adopt_run_config(args: argparse.Namespace, explicit: set[str]) -> None:
    """--resume: take the run's flags from its run.json; refuse explicit flags that differ."""
    run_json = Path(args.out) / "run.json"
    if not run_json.is_file():
        raise ConfigError(f"--resume: {args.out} has a checkpoint but no run.json with the run's flags")
    try:
        saved = json.loads(run_json.read_text())
    except (ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON
        raise ConfigError(f"{run_json}: not valid JSON ({err}); it cannot be resumed, start afresh with "
                          "--overwrite") from None
    missing = [name for name in RUN_FLAGS if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise ConfigError(f"{run_json}: lacks {', '.join(map(flag, missing))}; it cannot be resumed, start "
                          "afresh with --overwrite")
    for name in RUN_FLAGS:
        if name in explicit and getattr(args, name) != saved[name]:
            raise ConfigError(f"{flag(name)} {getattr(args, name)} differs from the run being resumed "
                              f"({saved[name]} in {run_json}); drop the flag to keep the run's value")
        setattr(args, name, saved[name])


def validate_args(args: argparse.Namespace, explicit: set[str], world_size: int = 1) -> None:
    """Every check of values, combinations and paths, before any training: raises ConfigError naming the flag."""
    positive = ["lr", "batch_size", "grad_accum", "epochs", "max_len", "lora_r", "lora_alpha", "log_every"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ConfigError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    non_negative = ["weight_decay", "adam_eps", "warmup_steps", "max_steps", "grad_clip", "dev_every",
                    "dev_limit", "save_every", "eval_limit"]
    for name in non_negative:
        if getattr(args, name) < 0:
            raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("lora_dropout", "label_smoothing", "beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(args, name)}")
    check_decoding_flags(args.beam_size, args.max_new_tokens, args.length_penalty, args.no_repeat_ngram_size,
                         args.eval_batch_size, "--eval-batch-size")
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
        raise ConfigError(f"--full trains all weights without LoRA; drop {', '.join(map(flag, lora_flags))}")
    if args.demo and "model" in explicit:
        raise ConfigError("--demo uses a small random model; drop --model (or drop --demo to train --model)")
    if args.resume and args.overwrite and "overwrite" in explicit:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; choose one")
    if args.no_eval and explicit & {"eval_split", "eval_limit", "beam_size", "length_penalty",
                                    "no_repeat_ngram_size", "max_new_tokens", "eval_batch_size"}:
        raise ConfigError("--no-eval skips decoding; drop the --eval-*/beam flags or drop --no-eval")

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
    """--out must be a writable folder; it may hold a run only with --resume or --overwrite."""
    out = Path(args.out)
    # Create nothing yet (a run that fails before training must leave no empty folder): try
    # writing in the deepest folder of --out that exists.
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out} is not a writable folder ({err.strerror}); choose another --out") from None
    has_run = (out / "run.json").is_file()
    if args.resume and not (out / "resume.pt").is_file():
        raise ConfigError(f"--resume: {out} holds no checkpoint (resume.pt); check --out, or drop --resume")
    if has_run and not args.resume and not args.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite to "
                          "start afresh, or choose another --out")


def check_decoding_fits(args: argparse.Namespace, config: GPTConfig, device: torch.device) -> None:
    """The decoding after training needs a readable --eval-split and must fit the model's positions
    and the device's memory; say so now rather than after hours of training."""
    try:
        mrs = [mr for mr, _ in group_references(load_split(args.eval_split, args.data_dir, download=False))]
    except (OSError, E2EFormatError) as err:
        raise ConfigError(str(err)) from None
    longest_prompt = max(len(encode_prompt(mr, args.text)) for mr in mrs[:args.eval_limit or None])
    if args.max_new_tokens + longest_prompt > config.block_size:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} plus the longest {args.eval_split} prompt "
                          f"({longest_prompt} tokens) exceeds the model's {config.block_size} positions; use at "
                          f"most {config.block_size - longest_prompt}")
    # Each beam holds keys and values for every layer and position, and a few vocabulary-wide
    # float32 rows (logits, log-probabilities, candidates).
    beams = args.eval_batch_size * args.beam_size
    cache_bytes = 2 if args.precision in ("bf16", "fp16") else 4  # the KV cache is kept in the compute dtype
    per_beam = (2 * config.n_layer * (longest_prompt + args.max_new_tokens) * config.n_embd * cache_bytes
                + 3 * config.vocab_size * 4)
    memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if beams * per_beam > memory:
        raise ConfigError(f"--beam-size {args.beam_size} x --eval-batch-size {args.eval_batch_size} = {beams:,} beams "
                          f"need about {format_bytes(beams * per_beam)} to decode, more than the "
                          f"{format_bytes(memory)} of {device}; lower --beam-size or --eval-batch-size")
