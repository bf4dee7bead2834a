"""Checkpoints of a train.py run, and resuming one exactly.

--out holds two things: the weights the run produces (adapter.safetensors, or with --full the
whole model as model.safetensors + config.json in the official layout) and resume.pt, which
holds everything else a resumed run needs to continue bitwise as if never stopped: the trainable
tensors, the optimizer and grad-scaler state, the step, the data position and every process's
RNG state. Both are written atomically; a SIGINT/SIGTERM makes the loop save and exit.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

from lora_min.adapters import save_adapter
from lora_min.data import Position
from lora_min.distributed import Dist, barrier
from lora_min.fileio import atomic_write_bytes, atomic_write_text, folder_for
from lora_min.flags import ConfigError
from lora_min.hf_interop import export_merged
from lora_min.model import GPT
from lora_min.weights import torch_load

# Everything a run writes into --out (eval/ aside); a fresh run removes what an earlier one left.
RUN_FILES = ("run.json", "resume.pt", "adapter.safetensors", "model.safetensors", "config.json",
             "log.jsonl", "loss.png", "summary.json")
RESUME_KEYS = ("step", "epoch", "batch", "trainable", "optimizer", "scaler", "rng", "world_size")


def start_fresh(args: argparse.Namespace) -> None:
    """A new run in --out: nothing of an earlier one may be mistaken for ours; run.json keeps the flags."""
    out = Path(args.out)
    # train.main's lock_out_dir has made it already (and removes it if the run fails before this).
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "run.json", json.dumps(vars(args), indent=2) + "\n")


def weights_path(args: argparse.Namespace) -> Path:
    return Path(args.out) / ("model.safetensors" if args.full else "adapter.safetensors")


def save_weights(model: GPT, args: argparse.Namespace, step: int) -> Path:
    """What the run produces: the adapter (LoRA tensors + JSON metadata), or with --full the
    whole model in the official layout with a config.json beside it."""
    if args.full:
        export_merged(model, args.out, metadata={"step": str(step)})
    else:
        # What lora_min.evaluate takes as its defaults for this adapter.
        trained_on = {"text": args.text} | ({} if args.data_dir is None else {"data_dir": str(args.data_dir)})
        save_adapter(model, weights_path(args), base_model=args.model,
                     extra_metadata={"step": str(step), "seed": str(args.seed), **trained_on})
    return weights_path(args)


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
    barrier(dist)


def load_checkpoint(model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    args: argparse.Namespace, dist: Dist, device: torch.device) -> tuple[int, Position]:
    """Restore weights, optimizer, grad scaler and RNG from resume.pt; returns (step, data position).
    A file that does not fit this run exactly (another run's, or damaged) is refused, naming it."""
    path = Path(args.out) / "resume.pt"
    try:
        state = torch_load(path, map_location=device)
    except ValueError as err:
        raise ConfigError(f"{err}; start afresh with --overwrite") from None
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f"{path}: lacks {', '.join(missing)}; start afresh with --overwrite")
    check_trainable(model, state["trainable"], path)
    model.load_state_dict(state["trainable"], strict=False)  # exactly the trainable tensors, checked above
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: its optimizer or grad-scaler state does not fit this run: "
                          f"{str(err).splitlines()[0]}") from None
    if state["world_size"] == dist.world_size:
        set_rng_state({k: v.cpu() for k, v in state["rng"][dist.rank].items()}, device)
    else:
        torch.manual_seed(args.seed + 1000 * state["step"] + dist.rank)
        if dist.is_main:
            print(f"note: the checkpoint was written by {state['world_size']} process(es), this run has "
                  f"{dist.world_size}; dropout draws new random numbers, so the run continues, but not "
                  "bitwise as it would have")
    return state["step"], Position(state["epoch"], state["batch"])


def check_trainable(model: GPT, saved: object, path: Path) -> None:
    """resume.pt must hold every tensor this run trains, with its shape and dtype, and nothing else."""
    ours = trainable_state(model)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: 'trainable' is not a dict of tensors")
    for name in sorted(ours.keys() | saved.keys()):
        if name not in saved:
            problem = f"has no tensor {name!r}, which this run trains"
        elif name not in ours:
            problem = f"holds {name!r}, which this run does not train"
        elif not isinstance(saved[name], torch.Tensor):
            problem = f"{name!r} is a {type(saved[name]).__name__}, not a tensor"
        elif (saved[name].shape, saved[name].dtype) != (ours[name].shape, ours[name].dtype):
            problem = (f"{name!r} is {tuple(saved[name].shape)} {saved[name].dtype} there, but "
                       f"{tuple(ours[name].shape)} {ours[name].dtype} in this run")
        else:
            continue
        raise ConfigError(f"{path}: {problem}; it does not belong to the run in {path.parent / 'run.json'}")


@contextmanager
def lock_out_dir(out: str | Path) -> Iterator[None]:
    """Hold --out for the run: a second run started on the same folder is refused, naming the first
    one's process, instead of both writing its files. The kernel drops the lock when the process
    ends, however it ends (flock on a file inside --out; the file keeps the holder's pid)."""
    out = Path(out)
    path = out / ".lock"
    with folder_for(out), open(path, "a+") as f:  # folder_for: a failed run leaves no empty folder behind
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the lock file is the other run's: leave it as it is
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(f"--out {out} is in use by another run (process {holder}); wait for it to "
                              "end, or choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        except BaseException:
            if [p.name for p in out.iterdir()] == [".lock"]:  # our run failed before writing anything
                path.unlink()
            raise


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
