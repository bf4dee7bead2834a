"""What a run prints and keeps: progress lines, log.jsonl, the loss plot, and human-readable
byte counts and durations (one home for each, used by training, decoding and downloads)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from lora_min.fileio import atomic_write_bytes, atomic_write_text


def format_bytes(n: float) -> str:
    """Bytes as a short human-readable string in SI units, e.g. '512 B', '9.3 kB', '548.1 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def show_progress(stream: TextIO, line: str, done: int, total: int | None, previous: int) -> None:
    """Show `line`, which reports `done` of `total` units (None: unknown; `previous`: `done` at the
    last call): on a terminal, one line rewritten in place; in a log file, a new line at every tenth
    of the way and at the end instead."""
    finished = total is not None and done >= total
    if stream.isatty():
        print("\r" + line, end="\n" if finished else "", file=stream, flush=True)
    elif finished or (total and done * 10 // total != previous * 10 // total):
        print(line, file=stream, flush=True)


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
        """Tokens per second since the last call."""
        rate = self.window_tokens / max(self.window_seconds, 1e-9)
        self.window_seconds, self.window_tokens = 0.0, 0
        return rate

    def eta(self, step: int) -> float:
        return self.seconds / max(self.steps, 1) * (self.total_steps - step)

    def line(self, record: dict, epochs: int) -> str:
        """'step 10/20 | epoch 1/5 | loss 10.6842 | lr 6.11e-03 | 1,494 tok/s | elapsed 0:00:02 | ETA 0:00:02'"""
        step, total = record["step"], self.total_steps
        return (f"step {step:>{len(str(total))}}/{total} | epoch {record['epoch']}/{epochs} | "
                f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
                f"elapsed {format_duration(record['elapsed_s'])} | ETA {format_duration(self.eta(step))}")


def append_log(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # e.g. ENOSPC when the buffer is flushed: say which file
        err.filename = err.filename or str(path)
        raise


def truncate_log(path: Path, step: int) -> None:
    """On resume: drop the records a killed run wrote after its last checkpoint, and a last line
    that a kill cut in half (with a warning). Raises ValueError naming a line damaged otherwise."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line else None
            if record is not None and record["step"] <= step:
                kept.append(line)
        except (ValueError, TypeError, KeyError):  # not JSON, or not a record with a step
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a log record; fix or delete the line") from None
            # A torn append: the process was killed while writing this line.
            print(f"warning: {path}, line {number}: dropped a half-written record (the run was killed while "
                  "writing it)", file=sys.stderr)
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
    # From zero, so that a drop looks as large as it is (a 2% drop, 2% of the height); the legend
    # goes below the curves, where a falling loss leaves room.
    ax.set_ylim(0, 1.1 * max(loss for _, loss in train_points + dev) if train_points + dev else None)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True
