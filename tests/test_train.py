"""train.py: exact resume after SIGKILL, data parallel == one process, the loss falls, bad flags
fail fast, NaN stops the run, --full writes the official layout, and the --demo smoke test.

Every run uses the --demo model (4 layers, width 128, random weights) on data/demo, for a few
steps, so the whole file takes well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lora_min.metrics
import train  # the script at the top of the repository (pyproject's pytest `pythonpath`)
from lora_min import adapters, data, evaluate
from lora_min.adapters import load_adapter, model_from_adapter, read_adapter_metadata
from lora_min.data import (DEMO_DIR, Example, Position, encode_example, global_batches, group_references, load_split,
                           read_e2e_csv, references_for_scoring)
from lora_min.demo import DEMO_CONFIG
from lora_min.device import HALF_DTYPES
from lora_min.distributed import Dist
from lora_min.download import DownloadError
from lora_min.model import GPT, GPTConfig, lora_state_dict
from lora_min.weights import read_safetensors

REPO = Path(__file__).resolve().parents[1]

# A short, quick run: the demo model, batch 4, no decoding at the end.
TINY = ["--demo", "--batch-size", "4", "--no-eval", "--dev-every", "0", "--dev-limit", "16", "--log-every", "1"]


def run_script(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


# --------------------------------------------------------------------------- the schedule

def test_lr_warms_up_linearly_then_decays_linearly_to_zero():
    lrs = [train.lr_at(s, 1.0, warmup_steps=4, total_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:] == pytest.approx([1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert all(lr > 0 for lr in lrs)  # no step is wasted at lr 0
    assert train.lr_at(12, 1.0, 4, 12) == 0.0


def test_given_flags_are_the_ones_on_the_command_line():
    args, explicit = train.parse_args(["--demo", "--lr", "2e-4", "--no-eval"])
    assert explicit == {"demo", "lr", "no_eval"}  # --lr counts although it is given at its default
    assert args.lr == 2e-4 and args.max_steps == 60  # the demo's default for a flag not given


def test_a_resumed_stream_continues_with_the_very_batches_an_uninterrupted_one_sees():
    examples = [Example(tuple(range(1, 3 + i % 11)) + (50256,), 2) for i in range(37)]
    whole = list(global_batches(examples, 4, 3, seed=5, start=Position()))
    assert len(whole) == 3 * 10 and sorted(i for _, b in whole[:10] for i in b) == list(range(37))
    resumed = list(global_batches(examples, 4, 3, seed=5, start=Position(1, 3)))
    assert resumed == whole[13:]


# --------------------------------------------------------------------------- learning

def test_loss_goes_down_over_a_few_dozen_steps(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "30", "--warmup-steps", "3", "--lr", "1e-2", "--out", str(out)]) == 0
    losses = list(train_losses(out).values())
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_gradient_accumulation_and_checkpointing_give_the_same_steps(tmp_path):
    """A batch of 4 in one piece, in 3 micro-batches (sizes 1, 1, 2), or with activations
    recomputed in backward: the same losses and the same adapter, to float32 rounding."""
    common = TINY + ["--max-steps", "3", "--lora-dropout", "0"]
    variants = {"plain": [], "accumulated": ["--grad-accum", "3"], "checkpointed": ["--grad-checkpointing"]}
    for name, flags in variants.items():
        assert train.main(common + flags + ["--out", str(tmp_path / name)]) == 0
    expected, _ = read_safetensors(tmp_path / "plain" / "adapter.safetensors")
    for name in ("accumulated", "checkpointed"):
        assert train_losses(tmp_path / name) == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)
        actual, _ = read_safetensors(tmp_path / name / "adapter.safetensors")
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compile_trains_the_same_steps_as_eager(tmp_path):
    """--compile (torch.compile; on the CPU it needs a C++ compiler and ~20 s to compile) gives
    the eager run's losses and adapter, to float32 rounding. Two steps at a high learning rate, so
    that B (zero at first) has moved and A has a gradient in the second step."""
    common = TINY + ["--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-2", "--lora-dropout", "0",
                     "--dev-limit", "4"]
    for name, flags in {"eager": [], "compiled": ["--compile"]}.items():
        assert train.main(common + flags + ["--out", str(tmp_path / name)]) == 0
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)
    expected, _ = read_safetensors(tmp_path / "eager" / "adapter.safetensors")
    actual, _ = read_safetensors(tmp_path / "compiled" / "adapter.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:  # Adam divides by sqrt(v): where a gradient is near 0, its rounding moves a weight by
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5)  # up to ~1e-3 x lr


# --------------------------------------------------------------------------- exact resume

def start_and_interrupt(args: list[str], when: str, signum: int) -> int:
    """Run train.py, send `signum` as soon as it prints a line starting with `when` (spaces
    collapsed); return its exit code."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if " ".join(line.split()).startswith(when):
            proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=120)


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    run = TINY + ["--max-steps", "16", "--save-every", "4"]  # LoRA dropout stays on: RNG state matters
    full, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    resume = run + ["--out", str(interrupted), "--resume"]

    # 1. SIGKILL right after the first checkpoint: no chance to save, the steps since are lost.
    assert start_and_interrupt(run + ["--out", str(interrupted)], "checkpoint saved at step 4",
                               signal.SIGKILL) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(interrupted / "resume.pt", weights_only=True)["step"]
    assert 4 <= killed_at < 16
    # 2. Resume, then SIGTERM (what Ctrl-C or a cluster's scheduler sends): it saves and exits.
    assert start_and_interrupt(resume, f"step {killed_at + 2}/16", signal.SIGTERM) == 128 + signal.SIGTERM
    stopped_at = torch.load(interrupted / "resume.pt", weights_only=True)["step"]
    assert killed_at + 2 <= stopped_at < 16
    # 3. Resume to the end.
    finished = run_script(resume)
    assert finished.returncode == 0, finished.stderr
    assert f"resumed {interrupted} at step {stopped_at}" in finished.stdout

    uninterrupted = run_script(run + ["--out", str(full)])
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected, _ = read_safetensors(full / "adapter.safetensors")
    actual, _ = read_safetensors(interrupted / "adapter.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # The log is continuous too: records after the last checkpoint were dropped on resume.
    assert train_losses(interrupted) == train_losses(full)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run (fp32, no accumulation) to copy and tamper with."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(TINY + ["--max-steps", "2", "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("flag, value", [("--lr", "0.5"), ("--grad-accum", "2"), ("--precision", "fp16")])
def test_resume_refuses_a_flag_that_changes_the_run(finished_run, tmp_path, capsys, flag, value):
    """--grad-accum and --precision change float rounding, so the result would differ from the
    uninterrupted run's; --precision fp16 on an fp32 run would also find no grad-scaler state."""
    out = copy_of(finished_run, tmp_path)
    assert train.main(TINY + ["--max-steps", "2", "--out", str(out), "--resume", flag, value]) == 2
    assert f"{flag} {value} differs from the run being resumed" in capsys.readouterr().err


def rename_lora(trainable: dict, old: str, new: str) -> dict:
    return {k.replace(f".lora.{old}.", f".lora.{new}."): v for k, v in trainable.items()}


@pytest.mark.parametrize("tamper, problem", [
    (lambda t: rename_lora(t, "v", "k"), "holds 'h.0.attn.lora.k.A', which this run does not train"),  # a q,k run's
    (lambda t: {}, "has no tensor 'h.0.attn.lora.q.A', which this run trains"),
    (lambda t: {**t, "h.3.attn.lora.v.B": torch.zeros(128, 8)}, "'h.3.attn.lora.v.B' is (128, 8) torch.float32 there, "
                                                                "but (128, 4) torch.float32 in this run"),
    (lambda t: {k: v.half() for k, v in t.items()}, "torch.float16 there, but (4, 128) torch.float32 in this run"),
])
def test_resume_refuses_a_checkpoint_whose_tensors_do_not_fit(finished_run, tmp_path, capsys, tamper, problem):
    out = copy_of(finished_run, tmp_path)
    state = torch.load(out / "resume.pt", weights_only=True)
    state["trainable"] = tamper(state["trainable"])
    torch.save(state, out / "resume.pt")
    assert train.main(TINY + ["--max-steps", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'resume.pt'}: " in err and problem in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, damage, problem", [
    ("resume.pt", lambda b: b[: len(b) // 2], "not a readable PyTorch checkpoint"),
    ("resume.pt", lambda b: b"garbage" * 100, "holds something other than tensors"),
    ("run.json", lambda b: b[: len(b) // 2], "not valid JSON"),
    ("run.json", lambda b: b"{}", "lacks --demo, --model"),
])
def test_a_damaged_checkpoint_or_run_json_is_named(finished_run, tmp_path, capsys, name, damage, problem):
    out = copy_of(finished_run, tmp_path)
    (out / name).write_bytes(damage((out / name).read_bytes()))
    assert train.main(TINY + ["--max-steps", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out / name}: " in err and problem in err and len(err.strip().splitlines()) == 1


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    """Two runs 0.5 s apart would both pass the 'already holds a run' check and interleave their
    files: the first holds a lock on --out (here the test holds it, as another process would)."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        assert train.main(TINY + ["--max-steps", "1", "--out", str(out)]) == 2
        assert f"--out {out} is in use by another run (process 4242)" in capsys.readouterr().err
        assert not (out / "run.json").exists()
        assert (out / ".lock").read_text() == "4242\n"  # the refused run leaves the other run's lock file alone
    # Released (as the kernel does when that process ends): a run may start, and releases it in turn.
    assert train.main(TINY + ["--max-steps", "1", "--out", str(out)]) == 0
    with open(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_full_disk_is_one_line_that_says_resume_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save_on_a_disk_that_fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_disk_that_fills_up)
    assert train.main(TINY + ["--max-steps", "4", "--save-every", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"{out / 'resume.pt'}: No space left on device; then `python train.py --resume --out {out}` "
            "continues from the last checkpoint") in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 2  # the last checkpoint is intact


# --------------------------------------------------------------------------- data parallel

@pytest.mark.slow
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every batch of 8; the loss of
    every step, the dev loss and the adapter match one process within float32 rounding
    (the all-reduce sums gradients in another order): losses to 1e-5 relative, adapter
    entries to 1e-3 relative (1e-5 absolute near zero). Adam divides by sqrt(v), so the order's
    rounding in a small gradient moves a weight by far more than float32's 1e-7; a DDP bug (say,
    gradients summed, not averaged) moves them by tens of percent."""
    run = TINY + ["--batch-size", "8", "--max-steps", "4", "--lora-dropout", "0", "--dev-every", "2",
                  "--dev-limit", "24"]
    one = run_script(run + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          "--master-addr=127.0.0.1", f"--master-port={free_port()}", "train.py",
                          *run, "--out", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout

    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two]
    for a, b in zip(log_one, log_two):
        key = "loss" if "loss" in a else "dev_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5)
    a, _ = read_safetensors(tmp_path / "one" / "adapter.safetensors")
    b, _ = read_safetensors(tmp_path / "two" / "adapter.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
        assert a[name].abs().max() > 1e-4  # B moved away from zero: the comparison means something


def prepare_while_rank_0_downloads(rank: int, port: int, model_path: str, out: str) -> None:
    """One process of a 2-process gloo job whose collectives time out after 2 s, as NCCL's do after
    10 minutes; rank 0's download of the weights takes 4 s."""
    from datetime import timedelta

    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch_dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    resolve_checkpoint = train.resolve_checkpoint
    train.resolve_checkpoint = lambda name: time.sleep(4) or resolve_checkpoint(name)
    args, _ = train.parse_args(["--model", model_path, "--data-dir", "demo", "--out", out])
    _, _, model = train.prepare(args, train.Dist(rank, 2, rank), say=print)
    assert model.config.n_layer == 1
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_other_processes_wait_for_rank_0s_download_beyond_the_jobs_timeout(tmp_path):
    from lora_min.hf_interop import export_merged

    export_merged(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8)), tmp_path / "base")
    torch.multiprocessing.spawn(prepare_while_rank_0_downloads, nprocs=2,
                                args=(free_port(), str(tmp_path / "base"), str(tmp_path / "out")))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- mixed precision

def loss_with_events(multiply_at: int | None = None, by: float = 1e30, sigterm_at: int | None = None):
    """train.masked_lm_loss, but its `multiply_at`-th call returns the loss times `by` (1e30: fp16
    gradients overflow; nan: a diverged run) and its `sigterm_at`-th call sends this process
    SIGTERM (as Ctrl-C or a cluster's scheduler would; the run saves after that step and exits)."""
    real, calls = train.masked_lm_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        if calls["n"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return value * by if calls["n"] == multiply_at else value
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32_and_resumes_exactly(tmp_path, monkeypatch, precision):
    """The autocast and grad-scaler code that CUDA runs use, run on the CPU. The losses stay near
    float32's, and a run stopped by SIGTERM resumes to bitwise the same adapter. With fp16, step 1's
    gradients overflow on purpose: the scaler must skip that step and halve its scale, and the
    resumed run must go on with the halved scale (a wrong scale changes fp16 rounding). Few steps:
    this CPU has no bfloat16 or float16 arithmetic, so they run ~20x slower than float32."""
    run = TINY + ["--max-steps", "3", "--dev-limit", "4"]
    overflow_at = 1 if precision == "fp16" else None
    assert train.main(run + ["--out", str(tmp_path / "fp32")]) == 0
    monkeypatch.setattr(train, "masked_lm_loss", loss_with_events(overflow_at))
    trained, make_optimizer = [], train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda model, *args: trained.append(model) or make_optimizer(model, *args))
    assert train.main(run + ["--precision", precision, "--out", str(tmp_path / "whole")]) == 0
    # The frozen base trained in bf16/fp16 (GPT.cast_frozen_base), LoRA's A and B in float32.
    dtypes = {name: p.dtype for name, p in trained[0].named_parameters()}
    assert {dtypes[n] for n in dtypes if ".c_" in n or n == "wte.weight"} == {HALF_DTYPES[precision]}
    assert {dtypes[n] for n in dtypes if ".lora." in n} == {torch.float32}
    monkeypatch.setattr(train, "masked_lm_loss", loss_with_events(overflow_at, sigterm_at=2))
    stopped = run + ["--precision", precision, "--out", str(tmp_path / "stopped")]
    assert train.main(stopped) == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "stopped" / "resume.pt", weights_only=True)["step"] == 2
    assert train.main(stopped + ["--resume"]) == 0

    fp32, whole = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "whole")
    assert whole.keys() == fp32.keys() == {1, 2, 3}
    for step in fp32.keys() - {overflow_at}:
        assert whole[step] == pytest.approx(fp32[step], rel=2e-2), step
    assert train_losses(tmp_path / "stopped") == whole
    expected, _ = read_safetensors(tmp_path / "whole" / "adapter.safetensors")
    actual, _ = read_safetensors(tmp_path / "stopped" / "adapter.safetensors")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    if precision == "fp16":
        for out in ("whole", "stopped"):
            scaler = torch.load(tmp_path / out / "resume.pt", weights_only=True)["scaler"]
            assert scaler["scale"] == 2.0**16 / 2, (out, scaler)  # the default 65536, halved once


# --------------------------------------------------------------------------- failures

def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "masked_lm_loss", loss_with_events(multiply_at=7, by=float("nan")))
    out = tmp_path / "run"
    assert train.main(TINY + ["--max-steps", "10", "--save-every", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 7" in err and "last good checkpoint (step 6)" in err

    saved = torch.load(out / "resume.pt", weights_only=True)
    assert saved["step"] == 6
    model = train.build_model(train.parse_args(TINY)[0])
    load_adapter(model, out / "adapter.safetensors")
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(tensor, saved["trainable"][name]) and torch.isfinite(tensor).all()
    assert max(train_losses(out)) == 6  # nothing was logged for the bad step


def make_file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/gpt2.safetensors", "--data-dir", "demo"], "--model '/no/such/gpt2.safetensors' is neither"),
    (["--data-dir", "{tmp}/empty"], "--data-dir"),
    (["--demo", "--out", "{tmp}/a-file/run"], "--out"),
    (["--demo", "--full", "--lora-r", "8"], "--full trains all weights without LoRA; drop --lora-r"),
    (["--demo", "--model", "gpt2"], "--demo uses a small random model"),
    (["--demo", "--resume", "--out", "{tmp}/nothing-here"], "--resume"),
    (["--demo", "--batch-size", "0"], "--batch-size must be positive"),
    (["--demo", "--batch-size", "2", "--grad-accum", "4"], "--batch-size 2 is smaller than"),
    (["--demo", "--lora-targets", "q,x"], "--lora-targets"),
    (["--demo", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--demo", "--no-eval", "--beam-size", "4"], "--no-eval skips decoding"),
    (["--demo", "--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
    (["--demo", "--max-new-tokens", "1024"], "--max-new-tokens 1024 plus the longest test prompt"),
    (["--demo", "--beam-size", "100000"], "--beam-size 100000 x --eval-batch-size 8 = 800,000 beams need about"),
    (["--demo", "--beam-size", "0"], "--beam-size must be a positive integer, got 0"),
    (["--demo", "--eval-batch-size", "0"], "--eval-batch-size must be a positive integer"),
    pytest.param(["--demo", "--device", "cuda"], "--device cuda: no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
])
def test_bad_flags_fail_before_training_naming_the_flag(tmp_path, capsys, flags, message):
    (tmp_path / "empty").mkdir()
    make_file(tmp_path / "a-file")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    assert train.main(flags + out) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty"]  # no --out folder was made


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused_and_auto_picks_fp16(tmp_path, monkeypatch, capsys):
    """T4, V100, RTX 20xx: torch.cuda.is_bf16_supported() is True there unless asked without emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.main(TINY + ["--precision", "bf16", "--out", str(tmp_path / "out")]) == 2
    assert "--precision bf16: this GPU has no bfloat16" in capsys.readouterr().err
    picked = []  # what main hands the training loop, with --precision auto
    monkeypatch.setattr(train, "prepare", lambda *args: ([], [], None))
    monkeypatch.setattr(train, "run_training", lambda args, dist, say, started, model, device, precision, *rest:
                        picked.append((device, precision)) or 0)
    assert train.main(TINY + ["--out", str(tmp_path / "out")]) == 0
    assert picked == [(torch.device("cuda:0"), "fp16")]


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert train.main(["--model", "gpt2", "--data-dir", "demo", "--out", str(out)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, problem", [
    ("trainset.csv", 'mr,ref\n"name[Juniper], eatType[pub",A pub.\n', "line 2: malformed MR"),
    ("trainset.csv", "mr,ref\n", "line 2: no rows after the header"),  # would train 0 steps
    ("devset.csv", "mr,ref\n", "line 2: no rows after the header"),  # the dev loss would divide by 0
    ("testset_w_refs.csv", "mr,ref\n", "line 2: no rows after the header"),  # found only after training
])
def test_a_malformed_or_empty_data_file_is_named_before_training(tmp_path, capsys, name, content, problem):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        (data / split).write_bytes((DEMO_DIR / split).read_bytes())
    (data / name).write_text(content)
    assert train.main(["--demo", "--data-dir", str(data), "--out", str(tmp_path / "out")]) == 2
    assert f"{data / name}, {problem}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_a_bug_is_not_reported_as_a_bad_flag(tmp_path, monkeypatch):
    """Only the user's data, weights and flags become one-line errors; our own KeyError is a traceback."""
    def broken_build_model(args):
        raise KeyError("a bug in lora-min")

    monkeypatch.setattr(train, "build_model", broken_build_model)
    with pytest.raises(KeyError, match="a bug in lora-min"):
        train.main(TINY + ["--max-steps", "1", "--out", str(tmp_path / "run")])


def test_a_malformed_number_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--lr", "fast"])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err


# --------------------------------------------------------------------------- full fine-tuning

def test_full_fine_tuning_trains_every_weight_and_saves_the_official_layout(tmp_path):
    out = tmp_path / "full"
    assert train.main(["--demo", "--full", "--batch-size", "4", "--no-eval", "--max-steps", "2",
                       "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]
    # model.safetensors is in the official layout: from_pretrained (which transposes the
    # Conv1D weights) must give back exactly the trained weights, square c_proj included.
    loaded = GPT.from_pretrained(out / "model.safetensors").state_dict()
    trained = torch.load(out / "resume.pt", weights_only=True)["trainable"]
    assert trained.keys() == loaded.keys() - {"lm_head.weight"}  # the LM head is tied to wte
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name


# --------------------------------------------------------------------------- the demo

@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    """`python train.py --demo`, shortened: train, save, plot, decode and score."""
    out = tmp_path / "demo"
    result = run_script(["--demo", "--max-steps", "6", "--dev-limit", "16", "--eval-limit", "3", "--beam-size", "2",
                         "--max-new-tokens", "8", "--out", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pipeline check" in result.stdout and "RANDOMLY INITIALISED" in result.stdout
    for name in ("run.json", "adapter.safetensors", "resume.pt", "log.jsonl", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    umask = os.umask(0o022)
    os.umask(umask)
    for path in out.rglob("*"):  # every output readable as the umask allows (mkstemp alone gives 0o600)
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["peak_memory_bytes"] > 0
    assert 30_000 < summary["weights_bytes"] < 50_000  # 4 layers x (q, v) x (A + B) of r=4 x 128, float32
    # both conventions, the paper's (-p) and the E2E challenge's (Perl), and which is which
    for scores in (summary["eval"]["scores"], summary["eval"]["scores_perl"]):
        assert set(scores) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert summary["eval"]["text"] == "paper"
    assert "BLEU" in result.stdout and (out / "eval" / "predictions.txt").is_file()
    assert "measure_scores.py -p" in result.stdout and "Perl" in result.stdout
    assert "step 6/6 | epoch 1/1 |" in result.stdout  # the steps and epochs this run does, not --epochs
    assert "this run: 6 steps (0.15 epochs)" in result.stdout
    assert json.loads((out / "run.json").read_text())["model"] == "demo"
    assert f"python -m lora_min.evaluate --adapter {out / 'adapter.safetensors'}" in result.stdout


def test_the_closing_line_says_what_was_trained():
    """A random base with LoRA, a model trained from scratch, or a small pretrained base (issue 19):
    only the first one's scores are meaningless."""
    def note(argv, config=DEMO_CONFIG):
        return train.what_was_trained(train.parse_args(argv)[0], config)

    assert "only show that the pipeline runs" in note(["--demo"])
    scratch = note(["--demo", "--full", "--max-steps", "3000"])
    assert "from scratch" in scratch and "3000 steps" in scratch and "pipeline" not in scratch
    small = note(["--model", "runs/table3/laptop/base", "--full", "--max-steps", "300"])
    assert "small base, runs/table3/laptop/base (4 layers, 128 wide), fully fine-tuned for 300 steps" in small
    assert "adapted with LoRA for 5 epochs" in note(["--model", "tiny"])
    assert note(["--model", "gpt2-medium"], GPTConfig(n_layer=24, n_head=16, n_embd=1024)) is None


def test_text_flag_trains_on_the_papers_text_or_the_csv_text():
    paper, raw = (train.load_examples(train.parse_args(TINY + flags)[0], "train", Dist())
                  for flags in ([], ["--text", "raw-csv"]))
    mr, ref = load_split("train", "demo")[0]
    assert paper[0] == encode_example(mr, ref, "paper") and raw[0] == encode_example(mr, ref, "raw-csv")
    assert paper[0] != raw[0] and len(paper) == len(raw)


def test_the_demo_adapter_goes_through_every_adapter_command(tmp_path, monkeypatch, capsys):
    """The commands the demo suggests, and the other adapter commands, on the demo's own output."""
    out = tmp_path / "demo"
    assert train.main(TINY + ["--max-steps", "2", "--out", str(out)]) == 0
    adapter = out / "adapter.safetensors"
    metadata = read_adapter_metadata(adapter)
    assert (metadata["base_model"], metadata["data_dir"], metadata["text"]) == ("demo", "demo", "paper")

    monkeypatch.setattr(lora_min.metrics, "meteor", lambda hyps, refs: (None, "not run in this test"))
    monkeypatch.setenv("LORA_MIN_E2E_DIR", str(tmp_path / "no-such-folder"))  # the adapter's data_dir wins
    assert evaluate.main(["--adapter", str(adapter), "--limit", "2", "--beam-size", "2",
                          "--max-new-tokens", "4"]) == 0
    first_refs = references_for_scoring(group_references(read_e2e_csv(DEMO_DIR / "testset_w_refs.csv"))[0][1])
    assert (out / "eval" / "references.txt").read_text().split("\n\n")[0].splitlines() == first_refs

    adapters.main(["export-merged", str(adapter), str(tmp_path / "merged")])
    adapters.main(["export-peft", str(adapter), str(tmp_path / "peft")])
    adapters.main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back.safetensors")])
    tokens = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():
        expected = model_from_adapter(adapter).eval()(tokens)
        assert torch.allclose(GPT.from_pretrained(tmp_path / "merged").eval()(tokens), expected, atol=1e-5)
        assert torch.equal(model_from_adapter(tmp_path / "back.safetensors").eval()(tokens), expected)


def test_a_second_demo_says_it_replaces_the_first(tmp_path, capsys):
    out = ["--max-steps", "1", "--out", str(tmp_path / "demo")]
    assert train.main(TINY + out) == 0
    assert "replacing" not in capsys.readouterr().out
    assert train.main(TINY + out) == 0
    assert f"note: replacing the earlier demo run in {tmp_path / 'demo'} (give --out to keep both)" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_on_the_real_e2e_data_too(e2e_dir, tmp_path, capsys):
    out = tmp_path / "demo-e2e"
    assert train.main(TINY + ["--data-dir", str(e2e_dir), "--max-steps", "2", "--out", str(out)]) == 0
    assert "42,061 training examples" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["data_dir"] == str(e2e_dir)
    assert len(train_losses(out)) == 2


def test_an_offline_first_run_names_the_data_and_the_weights_at_once(tmp_path, monkeypatch, capsys):
    """Not one missing piece per run: the data error also says which GPT-2 files are still to come."""
    def offline(url, dest, *, hint="", **kwargs):
        raise DownloadError(f"could not download {url} to {dest}: no network. {hint}")

    monkeypatch.delenv("LORA_MIN_E2E_DIR", raising=False)
    monkeypatch.setattr(data, "DEFAULT_E2E_DIR", tmp_path / "data" / "e2e")
    monkeypatch.setattr(data, "download_file", offline)
    monkeypatch.setenv("LORA_MIN_CACHE", str(tmp_path / "cache"))
    assert train.main(["--out", str(tmp_path / "runs" / "first")]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "To get the data by hand" in err
    assert ("Still to download for gpt2: config.json and model.safetensors from "
            f"https://huggingface.co/openai-community/gpt2/resolve/main/ into {tmp_path / 'cache' / 'gpt2'}/.") in err
    assert list(tmp_path.iterdir()) == []  # and no empty data, cache or run folder is left behind
