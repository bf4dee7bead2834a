"""The run log: human-readable sizes and durations, and log.jsonl cut back on resume."""
from __future__ import annotations

import io
import json

import pytest

from lora_min.runlog import append_log, format_bytes, format_duration, plot_losses, show_progress, truncate_log


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (9_300, "9.3 kB"),
                                     (548_105_000, "548.1 MB"), (3.2e12, "3200.0 GB")])
def test_format_bytes_uses_si_units(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.9, "0:00:59"), (61, "0:01:01"), (3 * 3600 + 62, "3:01:02")])
def test_format_duration_is_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_truncate_log_drops_the_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    for step in range(1, 7):
        append_log(path, {"step": step, "loss": 1.0 / step})
    append_log(path, {"step": 4, "dev_loss": 0.5})
    truncate_log(path, 4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == (
        [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "dev_loss": 0.5}])


def test_loss_plot_starts_at_zero(tmp_path, monkeypatch):
    """A 2% drop near 10.5 must look like 2% of the plot's height, not fill it."""
    plt = pytest.importorskip("matplotlib.pyplot")
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    for step, loss in [(5, 10.62), (10, 10.5), (15, 10.41)]:
        append_log(tmp_path / "log.jsonl", {"step": step, "loss": loss})
    append_log(tmp_path / "log.jsonl", {"step": 15, "dev_loss": 10.4})
    assert plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png") and (tmp_path / "loss.png").is_file()
    bottom, top = closed[0].axes[0].get_ylim()
    assert bottom == 0 and top == pytest.approx(1.1 * 10.62)


def test_truncate_log_drops_a_half_written_last_line_with_a_warning(tmp_path, capsys):
    """A kill in the middle of an append leaves a torn last line; resuming must not fail on it."""
    path = tmp_path / "log.jsonl"
    for step in range(1, 4):
        append_log(path, {"step": step, "loss": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')
    truncate_log(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert f"{path}, line 4: dropped a half-written record" in capsys.readouterr().err


def test_truncate_log_names_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a log record"):
        truncate_log(path, 3)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_ends_it_when_done():
    term = Terminal()
    for done in range(1, 21):
        show_progress(term, f"{done}/20", done, 20, previous=done - 1)
    assert term.getvalue().count("\r") == 20 and term.getvalue().count("\n") == 1
    assert term.getvalue().endswith("\r20/20\n")


@pytest.mark.parametrize("step", [1, 3, 7])
def test_progress_in_a_log_file_is_a_line_per_tenth_and_the_last(step):
    log = io.StringIO()
    total, previous = 100, 0
    for done in [*range(step, total, step), total]:
        show_progress(log, f"{done}/{total}", done, total, previous)
        previous = done
    lines = log.getvalue().splitlines()
    assert lines[-1] == "100/100" and "\r" not in log.getvalue()
    assert [int(line.split("/")[0]) * 10 // total for line in lines] == list(range(1, 11))  # one per tenth
