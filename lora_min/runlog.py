"""What a training run prints and keeps: the progress line, log.jsonl, the loss plot, and
human-readable byte counts and durations."""
from __future__ import annotations

import json
from pathlib import Path

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
    # From zero, so that a drop looks as large as it is (a 2% drop, 2% of the height); the legend
    # goes below the curves, where a falling loss leaves room.
    ax.set_ylim(0, 1.1 * max(loss for _, loss in train_points + dev) if train_points + dev else None)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True
