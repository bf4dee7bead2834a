"""The tutorials never rot: every chapter runs at its small size and prints what it says.

Each chapter is executed by tutorials/run.py exactly as a reader would run it, with figures
written to a temporary folder (the committed ones are left alone). The runner's own rules
(output blocks, `...`, `numbers vary`, --update) are tested on small made-up chapters.
"""
import importlib.util
import io
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
_spec = importlib.util.spec_from_file_location("tutorials_run", TUTORIALS / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["tutorials_run"] = run  # dataclasses look their module up there
_spec.loader.exec_module(run)

CHAPTERS = run.all_chapters()
FIGURE_LINK = re.compile(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)")


def test_all_eight_chapters_are_there():
    assert [p.name[:2] for p in CHAPTERS] == ["01", "02", "03", "04", "05", "06", "07", "08"]


# Chapters that train every toy setting five times (claims must hold across runs): about 25 and
# 50 seconds of CPU, so they run with the slow tests; chapter 8 runs train.py nine times (about 70 s
# of CPU, and METEOR's Java nine times).
FIVE_RUN_CHAPTERS = {"04_pretrain_then_adapt", "07_rank_deficiency", "08_table3_on_a_laptop"}


@pytest.mark.parametrize("chapter", [pytest.param(p, marks=pytest.mark.slow) if p.stem in FIVE_RUN_CHAPTERS else p
                                     for p in CHAPTERS], ids=lambda p: p.stem)
def test_chapter_runs_and_prints_what_it_says(chapter, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MIN_TUTORIAL_SIZE", "small")
    monkeypatch.setenv("LORA_MIN_TUTORIAL_FIGURES", str(tmp_path))
    result = run.run_chapter(chapter)
    assert result.ok, run.report(result)
    # Every figure the chapter shows is committed, and the chapter's own code drew it.
    for name in FIGURE_LINK.findall(chapter.read_text(encoding="utf-8")):
        assert (TUTORIALS / "figures" / name).is_file(), f"{chapter.name} shows figures/{name}, not committed"
        assert (tmp_path / name).is_file(), f"{chapter.name} shows figures/{name} but its code did not write it"


def test_readme_lists_every_chapter():
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        assert f"({chapter.name})" in readme, f"tutorials/README.md does not link {chapter.name}"


# --------------------------------------------------------------------------- the runner


@pytest.mark.parametrize("expected, got, numbers_vary, matches", [
    ("a\nb", "a\nb\n", False, True),
    ("a  \n\nb\n", "a\n\nb", False, True),  # trailing spaces and end blank lines are ignored
    ("a\nb", "a\nc", False, False),
    ("took ... ms", "took 12.5 ms", False, True),
    ("took ... ms", "took 12.5 s", False, False),
    ("start\n...\nend", "start\nx\ny\nend", False, True),  # ... spans lines
    ("ab...ba", "aba", False, False),  # the two ends may not overlap
    ("x ... y ... z", "x 1 y 2 z", False, True),
    ("loss 0.52 after 100 steps", "loss 0.61 after 100 steps", True, True),
    ("loss   0.52", "loss 10.25", True, True),  # column widths follow the numbers
    ("loss 0.52 after 100 steps", "loss 0.52 after 100 epochs", True, False),
    ("loss 0.52", "loss 0.61", False, False),
])
def test_output_matching(expected, got, numbers_vary, matches):
    assert run.output_matches(expected, got, numbers_vary) is matches


def write_chapter(folder: Path, text: str) -> Path:
    path = folder / "99_test.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_mismatch_missing_output_and_update(tmp_path):
    chapter = write_chapter(tmp_path, (
        "# T\n\n```python\nx = 2\nprint(x * 21)\n```\n\n```text\n41\n```\n\n"
        "Prose.\n\n```python\nprint('new')\n```\n\n"
        "```python\ny = 1  # prints nothing, needs no output block\n```\n\n"
        "More prose.\n\n```text\na prose block, not an output block\n```\n"))
    result = run.run_chapter(chapter)
    assert not result.ok
    assert [(m.line, m.expected, m.got.strip()) for m in result.mismatches] == [
        (3, "41\n", "42"), (14, None, "new")]

    run.run_chapter(chapter, update=True)
    text = chapter.read_text(encoding="utf-8")
    assert "```text\n42\n```" in text and "```text\nnew\n```" in text
    assert "a prose block, not an output block" in text and "Prose." in text
    assert run.run_chapter(chapter).ok


def test_update_keeps_matching_ellipsis_and_refreshes_varying_output(tmp_path):
    chapter = write_chapter(tmp_path, (
        "```python\nprint('took 3.2 ms')\n```\n\n```text\ntook ... ms\n```\n\n"
        "```python\nprint('accuracy 0.97')\n```\n\n<!-- numbers vary -->\n```text\naccuracy 0.50\n```\n\n"
        "```python\nprint('gibberish')\n```\n\n<!-- output varies -->\n```text\nother words\n```\n"))
    assert run.run_chapter(chapter).ok
    run.run_chapter(chapter, update=True)
    text = chapter.read_text(encoding="utf-8")
    assert "took ... ms" in text
    assert "<!-- numbers vary -->\n```text\naccuracy 0.97\n```" in text
    assert "<!-- output varies -->\n```text\ngibberish\n```" in text


def test_numbers_vary_still_checks_the_words(tmp_path):
    chapter = write_chapter(tmp_path, (
        "```python\nprint('accuracy 0.97')\n```\n\n<!-- numbers vary -->\n```text\nloss 0.97\n```\n"))
    assert not run.run_chapter(chapter).ok


def test_an_exception_names_the_block_and_stops(tmp_path):
    chapter = write_chapter(tmp_path, (
        "```python\nprint('before')\n```\n\n```text\nbefore\n```\n\n"
        "```python\nraise ValueError('boom')\n```\n\n```python\nprint('never runs')\n```\n"))
    result = run.run_chapter(chapter)
    assert not result.ok
    assert "block at line 9" in result.error and "ValueError: boom" in result.error
    assert result.outputs == ["before\n"]


def test_blocks_share_one_namespace_and_run_in_tutorials(tmp_path):
    chapter = write_chapter(tmp_path, (
        "```python\nimport os\nfrom pathlib import Path\nhere = Path(os.getcwd()).name\n```\n\n"
        "```python\nimport toy\nprint(here, toy.VOCAB_SIZE)\n```\n\n```text\ntutorials 11\n```\n"))
    assert run.run_chapter(chapter).ok


def test_unclosed_code_block_is_reported_with_its_line(tmp_path):
    chapter = write_chapter(tmp_path, "text\n\n```python\nprint(1)\n")
    with pytest.raises(ValueError, match="line 3: code block is never closed"):
        run.run_chapter(chapter)


def test_echo_shows_each_block_output_as_it_runs(tmp_path):
    chapter = write_chapter(tmp_path, (
        "```python\nprint('first')\n```\n\n```text\nfirst\n```\n\n"
        "```python\nprint('partial')\nraise ValueError('boom')\n```\n"))
    shown = io.StringIO()
    result = run.run_chapter(chapter, echo=shown)
    # Shown while running: even what a failing block printed before it raised.
    assert shown.getvalue() == ("--- 99_test.md, code block at line 1\nfirst\n"
                                "--- 99_test.md, code block at line 9\npartial\n")
    assert result.outputs == ["first\n"] and "ValueError: boom" in result.error


def test_verbose_flag_prints_the_chapter_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_MIN_TUTORIAL_SIZE", "small")  # main() sets it; restored afterwards
    chapter = write_chapter(tmp_path, "```python\nprint(6 * 7)\n```\n\n```text\n42\n```\n")
    assert run.main([str(chapter)]) == 0
    assert "42" not in capsys.readouterr().out  # quiet by default: only the verdict
    assert run.main(["-v", str(chapter)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 99_test.md, code block at line 1\n42\nok  99_test.md")


def test_toy_claim_asserts_at_small_size_and_reports_at_laptop(monkeypatch, capsys):
    sys.path.insert(0, str(TUTORIALS))
    try:
        import toy
    finally:
        sys.path.remove(str(TUTORIALS))
    monkeypatch.setenv("LORA_MIN_TUTORIAL_SIZE", "small")
    toy.claim(True, "holds")
    with pytest.raises(AssertionError, match="LoRA wins"):
        toy.claim(False, "LoRA wins")
    monkeypatch.setenv("LORA_MIN_TUTORIAL_SIZE", "laptop")
    toy.claim(True, "holds")
    toy.claim(False, "LoRA wins")
    assert capsys.readouterr().out == "at this size, not so: LoRA wins\n"


# --------------------------------------------------------------------------- chapter 8's recorded run


def test_chapter_8_shows_a_run_of_the_runner_as_committed():
    """tutorials/table3_laptop.json, the laptop-size run chapter 8 prints, is table3.json exactly as
    `python tutorials/table3_laptop.py` wrote it: its settings are the runner's laptop size, every
    method ran for every seed with the train.py command the runner gives, and its times are one
    command's. Change SIZES["laptop"], METHODS or train_command and this fails until the run is redone."""
    sys.path.insert(0, str(TUTORIALS))
    try:
        import table3_laptop as t3
    finally:
        sys.path.remove(str(TUTORIALS))
    record = json.loads((TUTORIALS / "table3_laptop.json").read_text())
    size = replace(t3.SIZES["laptop"], data_dir=record["settings"]["data_dir"])
    assert record["settings"] == json.loads(json.dumps(t3.table_settings(size)))
    assert record["pretraining"]["settings"] == json.loads(json.dumps(t3.pretraining_settings(size)))
    out = Path("runs/table3/laptop")  # the runner's default --out
    commands = {(r["method"], r["seed"]): r["command"] for r in record["runs"]}
    assert len(commands) == len(record["runs"]) == len(t3.METHODS) * len(size.seeds)
    for method in t3.METHODS:
        for seed in size.seeds:
            base = out / (f"random-seed{seed}" if method == "scratch" else "base")
            argv = t3.train_command(method, seed, base, size, out)
            assert commands[method, seed] == "python train.py " + " ".join(argv)
    # one command's wall clock covers the pretraining and every run it started (2 workers at most)
    assert record["wall_seconds"] >= record["pretraining"]["seconds"]
    assert record["cpu_seconds"] >= record["pretraining"]["cpu_seconds"] + sum(r["cpu_seconds"] for r in record["runs"])
