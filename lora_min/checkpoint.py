"""Checkpoints of a train.py run, and resuming one exactly.

--out holds two things: the weights the run produces (adapter.safetensors, or with --full the
whole model as model.safetensors + config.json in the official layout) and resume.pt, which
holds everything else a resumed run needs to continue bitwise as if never stopped: the trainable
tensors, the optimizer and grad-scaler state, the step, the data position and every process's
RNG state. Both are written atomically; a SIGINT/SIGTERM makes the loop save and exit.
"""
from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import torch
import torch.distributed as torch_dist

from lora_min.adapters import save_adapter
from lora_min.data import Position
from lora_min.distributed import Dist, barrier
from lora_min.fileio import atomic_write_bytes, atomic_write_text
from lora_min.hf_interop import export_merged
from lora_min.model import GPT

# Everything a run writes into --out (eval/ aside); a fresh run removes what an earlier one left.
RUN_FILES = ("run.json", "resume.pt", "adapter.safetensors", "model.safetensors", "config.json",
             "log.jsonl", "loss.png", "summary.json")


def start_fresh(args: argparse.Namespace) -> None:
    """A new run in --out: nothing of an earlier one may be mistaken for ours; run.json keeps the flags."""
    out = Path(args.out)
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
        base = "random demo model (train.py --demo)" if args.demo else args.model
        save_adapter(model, weights_path(args), base_model=base,
                     extra_metadata={"step": str(step), "seed": str(args.seed)})
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
