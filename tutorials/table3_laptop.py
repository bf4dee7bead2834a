"""Table 3 of the LoRA paper in miniature, on a laptop's CPU: pretrain a small GPT, then adapt it.

    python tutorials/table3_laptop.py --data-dir ../shared/e2e   # the chapter's table (its "Time": 40 min
                                                                 # on a slow 2-core VM)
    python tutorials/table3_laptop.py --size small               # the test suite's size: demo data, 4 min

What it does (chapter 8, tutorials/08_table3_on_a_laptop.md, explains why):
1. Pretrain a GPT of the demo's shape (4 layers, 128 wide, GPT-2's tokenizer) as a plain language
   model on the E2E *training references alone*, each a document "<|endoftext|> text <|endoftext|>".
   It never sees an MR: it learns the language of restaurant descriptions, not the task of writing
   one from an MR. This stands in for GPT-2's pretraining on WebText. Cached in <out>/base.
2. Adapt it to MR -> text with train.py (the recipe itself, not a copy), the same steps each way:
   LoRA (r=4 on W_q and W_v, the paper's recipe), full fine-tuning (FT), and training a random
   model of the same shape from scratch.
3. Decode the first test MRs with the paper's beam search (train.py's), score them as the paper did
   (measure_scores.py -p), over several seeds, and print the table next to the paper's Table 3.
The runs go to --jobs worker processes of one thread each (a model this small keeps one core busy
better than two threads do); from-scratch runs start while the base is still pretraining.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py sits at the top of the repository
import train
from lora_min.data import (EOT, Example, Position, encode_reference, global_batches, load_split, loss_tokens,
                           micro_batches)
from lora_min.demo import DEMO_CONFIG
from lora_min.distributed import Dist
from lora_min.fileio import atomic_write_text
from lora_min.hf_interop import export_merged
from lora_min.metrics import METRICS
from lora_min.model import GPT, GPTConfig
from lora_min.runlog import format_bytes, format_duration


@dataclass(frozen=True)
class Size:
    config: GPTConfig
    data_dir: str | None  # None: train.py's default (data/e2e, downloaded once)
    pretrain_steps: int
    adapt_steps: int
    eval_limit: int  # decode the first N test MRs
    seeds: tuple[int, ...]


SIZES = {
    "laptop": Size(DEMO_CONFIG, None, pretrain_steps=1000, adapt_steps=300, eval_limit=100, seeds=(1, 2, 3)),
    "small": Size(GPTConfig(n_layer=2, n_head=2, n_embd=64), "demo", pretrain_steps=60, adapt_steps=20,
                  eval_limit=6, seeds=(1, 2, 3)),
}
BATCH_SIZE = 8  # the paper's (Table 11)
PRETRAIN_LR = 1e-3
# Peak learning rates. The paper's 2e-4 is for GPT-2 M over 5 epochs; a model this small, trained
# for a few hundred steps, needs larger ones. LoRA's update is scaled by alpha/r = 8 and starts at
# zero, and it usually wants a larger rate than full training: these are picked, and checked on one
# seed in chapter 8 (LoRA's dev loss moves by 0.05 over 2e-3 to 2e-2).
METHODS = {"LoRA": dict(full=False, lr=5e-3), "FT": dict(full=True, lr=1e-3), "scratch": dict(full=True, lr=1e-3)}

# The paper's Table 3, GPT-2 M rows (Hu et al., 2021): trainable parameters and the five metrics
# (BLEU, METEOR, ROUGE-L x100 as printed there).
PAPER_TABLE3 = {
    "FT": dict(trainable="354.92M", BLEU=68.2, NIST=8.62, METEOR=46.2, ROUGE_L=71.0, CIDEr=2.47),
    "LoRA": dict(trainable="0.35M", BLEU=70.4, NIST=8.85, METEOR=46.8, ROUGE_L=71.8, CIDEr=2.53),
}


# -----------------------------------------------------------------------------
# 1. Pretraining: a plain language model on text that is not the task's pairs


def cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (METEOR's Java), user + sys."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pretraining_text(data_dir: str | None) -> list[Example]:
    """Each distinct training reference as a document: <|endoftext|> text <|endoftext|>. The loss
    is on every token after the first, as in GPT-2's pretraining (Example's n_prompt = 1)."""
    references = sorted({ref for _, ref in load_split("train", data_dir)})
    return [Example((EOT, *encode_reference(ref)), 1) for ref in references]


def pretraining_settings(size: Size) -> dict:
    """What the pretrained base depends on: a cached base with other settings is made again."""
    return dict(config=asdict(size.config), data_dir=size.data_dir, steps=size.pretrain_steps, lr=PRETRAIN_LR,
                batch_size=BATCH_SIZE, seed=0)


def pretrain(size: Size, out: Path, progress: bool = True) -> Path:
    """The pretrained base in <out>/base (config.json + model.safetensors, GPT-2's layout), made
    once: a later call with the same settings reuses it. `progress`: print a line every 10%."""
    say = print if progress else (lambda *args, **kwargs: None)
    folder = out / "base"
    settings = pretraining_settings(size)
    if (folder / "model.safetensors").is_file() and (folder / "pretraining.json").is_file():
        if json.loads((folder / "pretraining.json").read_text())["settings"] == settings:
            say(f"pretrained base: {folder} (cached)")
            return folder
    examples = pretraining_text(size.data_dir)
    args, _ = train.parse_args(["--full", "--lr", str(PRETRAIN_LR), "--batch-size", str(BATCH_SIZE)])
    torch.manual_seed(0)
    model = GPT(size.config)
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    scaler, dist, cpu = torch.amp.GradScaler("cpu", enabled=False), Dist(), torch.device("cpu")
    say(f"pretraining a {size.config.n_layer}x{size.config.n_embd} GPT ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {len(examples):,} training references, no MRs: {size.pretrain_steps} steps")
    started, cpu_started, step, losses = time.time(), cpu_seconds(), 0, []
    warmup = max(1, size.pretrain_steps // 20)
    for _, batch in global_batches(examples, BATCH_SIZE, epochs=10**6, seed=0, start=Position()):
        if step == size.pretrain_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, PRETRAIN_LR, warmup, size.pretrain_steps)
        micro = micro_batches(examples, batch, 0, 1, 1)
        losses.append(train.train_step(model, micro, loss_tokens(examples, batch), args, dist, cpu,
                                       contextlib.nullcontext(), scaler).item())
        train.optimizer_step(optimizer, scaler, grad_clip=0.0)
        step += 1
        if step % max(1, size.pretrain_steps // 10) == 0 or step == size.pretrain_steps:
            recent = losses[-max(1, size.pretrain_steps // 10):]
            say(f"  pretraining step {step}/{size.pretrain_steps}: loss {sum(recent) / len(recent):.3f}, "
                f"elapsed {format_duration(time.time() - started)}", flush=True)
    export_merged(model, folder)
    record = dict(settings=settings, final_loss=sum(losses[-10:]) / len(losses[-10:]), seconds=time.time() - started,
                  cpu_seconds=cpu_seconds() - cpu_started)
    atomic_write_text(folder / "pretraining.json", json.dumps(record, indent=2) + "\n")
    return folder


def random_base(size: Size, seed: int, out: Path) -> Path:
    """A model of the same shape with GPT-2's random initialisation, drawn from `seed`: the
    'from scratch' runs start here (each seed from its own draw)."""
    folder = out / f"random-seed{seed}"
    torch.manual_seed(seed)
    export_merged(GPT(size.config), folder)
    return folder


# -----------------------------------------------------------------------------
# 2. Adaptation with train.py, and 3. decoding and scoring (train.py does both)


def run_folder(method: str, seed: int, out: Path) -> Path:
    return out / f"{method}-seed{seed}"


def train_command(method: str, seed: int, base: Path, size: Size, out: Path) -> list[str]:
    """train.py's arguments for one run: `method` on `base` for size.adapt_steps steps, then beam
    search on the first size.eval_limit test MRs, into run_folder."""
    argv = ["--model", str(base), "--out", str(run_folder(method, seed, out)), "--overwrite", "--seed", str(seed),
            "--max-steps", str(size.adapt_steps), "--warmup-steps", str(max(1, size.adapt_steps // 10)),
            "--lr", str(METHODS[method]["lr"]), "--batch-size", str(BATCH_SIZE),
            "--log-every", str(max(1, size.adapt_steps // 5)), "--dev-every", "0", "--dev-limit", "100",
            "--save-every", "0", "--eval-limit", str(size.eval_limit)]
    argv += ["--full"] if METHODS[method]["full"] else []
    return argv + (["--data-dir", size.data_dir] if size.data_dir else [])


def adapt(method: str, seed: int, base: Path, size: Size, out: Path, progress: bool = True) -> dict:
    """One train.py run (train_command), then the paper's scores. Returns what the table needs.
    train.py's own log is in the run's folder (log.jsonl, summary.json, eval/); `progress`: say
    when the run starts."""
    argv, run_dir = train_command(method, seed, base, size, out), run_folder(method, seed, out)
    done = run_dir / "table3_run.json"  # this run's row, kept so that an interrupted table resumes
    if done.is_file() and json.loads(done.read_text())["command"] == "python train.py " + " ".join(argv):
        return json.loads(done.read_text())
    if progress:
        print(f"  {method}, seed {seed}: training for {size.adapt_steps} steps, then decoding {size.eval_limit} "
              f"test MRs", flush=True)
    printed, started, cpu_started = io.StringIO(), time.time(), cpu_seconds()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        exit_code = train.main(argv)
    if exit_code != 0:
        raise RuntimeError(f"python train.py {' '.join(argv)} failed ({exit_code}):\n{printed.getvalue()}")
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = summary["eval"]
    row = dict(method=method, seed=seed, command="python train.py " + " ".join(argv),
                trainable=summary["trainable_params"], total=summary["total_params"],
                # AdamW keeps two float32 numbers (m and v) per trainable parameter
                optimizer_bytes=2 * 4 * summary["trainable_params"],
                weights_bytes=summary["weights_bytes"], train_seconds=summary["train_seconds"],
                decode_seconds=evaluation["decode_seconds"], scores=evaluation["scores"],
                wall_seconds=time.time() - started, cpu_seconds=cpu_seconds() - cpu_started,
                example=(run_dir / "eval" / "predictions.txt").read_text().splitlines()[0])
    atomic_write_text(done, json.dumps(row, indent=2) + "\n")
    return row


def cpu_name() -> str:
    """The processor's model name where Linux says it, else the architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def table_settings(size: Size) -> dict:
    """Everything the table's runs depend on, as table3.json records it."""
    return dict(asdict(size), batch_size=BATCH_SIZE, pretrain_lr=PRETRAIN_LR, methods=METHODS)


def one_thread() -> None:
    """Each worker computes with one thread: --jobs workers then share the cores without
    oversubscribing them."""
    torch.set_num_threads(1)


def run_table(size_name: str = "laptop", data_dir: str | None = None, out: str | Path = "runs/table3",
              seeds: Sequence[int] | None = None, jobs: int = 2, progress: bool = True) -> dict:
    """The whole table: pretraining (cached), then every method for every seed, on `jobs` worker
    processes. Returns (and writes to <out>/table3.json) the runs, the settings, and the wall
    clock and CPU time this call took."""
    size = SIZES[size_name]
    if data_dir is not None:
        size = replace(size, data_dir=data_dir)
    if seeds is not None:
        size = replace(size, seeds=tuple(seeds))
    out = Path(out) / size_name
    say = print if progress else (lambda *args, **kwargs: None)
    started, cpu_started, runs = time.time(), cpu_seconds(), []
    n_runs = len(size.seeds) * len(METHODS)
    # spawn, not fork: a forked child of a process that has used torch's thread pool can hang
    pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), initializer=one_thread)
    try:
        # From scratch needs no pretrained base: those runs go first, beside the pretraining.
        pending = {pool.submit(pretrain, size, out, progress): "pretraining"}
        for seed in size.seeds:
            pending[pool.submit(adapt, "scratch", seed, random_base(size, seed, out), size, out, progress)] = \
                ("scratch", seed)
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                if job == "pretraining":
                    base = future.result()
                    pending |= {pool.submit(adapt, method, seed, base, size, out, progress): (method, seed)
                                for seed in size.seeds for method in METHODS if method != "scratch"}
                    continue
                runs.append(future.result())
                say(f"[{len(runs)}/{n_runs}] {job[0]}, seed {job[1]}: BLEU {100 * runs[-1]['scores']['BLEU']:.1f} "
                    f"({format_duration(runs[-1]['wall_seconds'])}); elapsed {format_duration(time.time() - started)}",
                    flush=True)
    finally:  # a failed run stops the table: the runs still queued are not started
        pool.shutdown(cancel_futures=True)
    runs.sort(key=lambda r: (r["seed"], list(METHODS).index(r["method"])))
    result = dict(size=size_name, settings=table_settings(size),
                  pretraining=json.loads((base / "pretraining.json").read_text()), runs=runs,
                  # this call's, with the workers and METEOR's Java; a cached base or run costs nothing here
                  wall_seconds=time.time() - started, cpu_seconds=cpu_seconds() - cpu_started,
                  machine=f"{cpu_name()}, {os.cpu_count()} CPUs, {jobs} worker processes of one torch "
                          f"thread, torch {torch.__version__}")
    atomic_write_text(out / "table3.json", json.dumps(result, indent=2) + "\n")
    return result


# -----------------------------------------------------------------------------
# The table


def spread(values: Sequence[float]) -> str:
    """mean ± standard deviation over the seeds (sample standard deviation)."""
    if any(math.isnan(v) for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f}±{sd:.1f}" if max(values) > 10 else f"{statistics.mean(values):.2f}±{sd:.2f}"


def on_paper_scale(name: str, value: float | None) -> float:
    """BLEU, METEOR and ROUGE-L x100, as Table 3 prints them."""
    if value is None:
        return float("nan")
    return 100 * value if name in ("BLEU", "METEOR", "ROUGE_L") else value


def format_table(result: dict) -> str:
    """The paper's GPT-2 M rows, then ours as mean ± standard deviation over the seeds."""
    header = f"{'':<22}{'trainable':>11}" + "".join(f"{name.replace('_', '-'):>12}" for name in METRICS)
    rows = [header]
    for method, paper in PAPER_TABLE3.items():
        rows.append(f"{'paper, GPT-2 M ' + method:<22}{paper['trainable']:>11}"
                    + "".join(f"{paper[name]:>12}" for name in METRICS))
    config = result["settings"]["config"]
    shape = f"{config['n_layer']}x{config['n_embd']}"
    for method in METHODS:
        runs = [r for r in result["runs"] if r["method"] == method]
        rows.append(f"{'here, ' + shape + ' ' + method:<22}{runs[0]['trainable']:>11,}"
                    + "".join(f"{spread([on_paper_scale(n, r['scores'][n]) for r in runs]):>12}" for n in METRICS))
    seeds = result["settings"]["seeds"]
    rows.append(f"(here: mean±sd over seeds {', '.join(map(str, seeds))}; first {result['settings']['eval_limit']} "
                f"test MRs; {result['settings']['adapt_steps']} steps each, after {result['settings']['pretrain_steps']} "
                f"steps of pretraining)")
    return "\n".join(rows)


def format_runs(result: dict) -> str:
    """One line per run: the scores and what LoRA's claims are about (size on disk, optimizer
    state, decoding time with the update merged)."""
    rows = [f"{'run':<16}" + "".join(f"{name.replace('_', '-'):>8}" for name in METRICS)
            + f"{'weights file':>14}{'AdamW state':>13}{'train s':>9}{'decode s':>10}"]
    for r in result["runs"]:
        rows.append(f"{r['method'] + ', seed ' + str(r['seed']):<16}"
                    + "".join(f"{on_paper_scale(n, r['scores'][n]):>8.2f}" for n in METRICS)
                    + f"{format_bytes(r['weights_bytes']):>14}{format_bytes(r['optimizer_bytes']):>13}"
                    + f"{r['train_seconds']:>9.0f}{r['decode_seconds']:>10.0f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="laptop")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the E2E CSVs (default: the size's: data/e2e, downloaded, or 'demo')")
    parser.add_argument("--out", default="runs/table3", help="where the base, the runs and table3.json go")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=None,
                        help="comma-separated seeds (default: 1,2,3); finished runs in --out are reused")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one thread each (default: 2, or 1 on one core); each may hold "
                             "up to 2 GB while METEOR's Java scores")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    result = run_table(args.size, args.data_dir, args.out, args.seeds, args.jobs)
    print(format_table(result))
    print()
    print(format_runs(result))
    print(f"\nthis command: {format_duration(result['wall_seconds'])} of wall clock, "
          f"{format_duration(result['cpu_seconds'])} of CPU ({result['machine']}); "
          f"everything in {Path(args.out) / args.size}/table3.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
