"""The course assignments and their grader (tutorials/assignments/grade.py) can never drift apart,
and the grader cannot be fooled by the code it grades.

* every reference solution gets full marks, every untouched student file gets zero;
* the student files are exactly the solutions with the solution regions blanked out;
* common mistakes (written into copies of the solutions) lose exactly the points they should;
* messages name the inputs and say what is wrong (NaN, an empty selection, per-sequence means);
* submissions that attack the grader (fake a score, patch torch, import the solution, loop,
  swallow timeouts, allocate 4.4 GB, write outside their folder) score 0 or are reported, in time;
* the command line and class grading report scores, exit codes and a CSV as documented.

Most tests grade in this process (`isolated=False`: the same probes and verdicts, without a
child process per grading); the attacks need the child and are slow on a 2-core machine, so
all but a few run with `-m slow`.
"""
import csv
import importlib.util
import io
import sys
import time
from pathlib import Path

import pytest

ASSIGNMENTS_DIR = Path(__file__).resolve().parents[1] / "tutorials" / "assignments"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


grade = load("assignments_grade", ASSIGNMENTS_DIR / "grade.py")
NAMES = list(grade.ASSIGNMENTS)
QUICK = grade.Limits(import_s=60, case_s=10, total_s=90)  # the attacks' limits


def solution_path(name: str) -> Path:
    return ASSIGNMENTS_DIR / "solutions" / grade.starter(name).name


def starter_path(name: str) -> Path:
    return grade.starter(name)


def failed(score) -> dict[str, str]:
    return {r.key: r.reason for r in score.results if not r.passed}


def write(tmp_path: Path, name: str, text: str) -> Path:
    """A submission, under the file name of the assignment's starter."""
    path = tmp_path / grade.starter(name).name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_gets_full_marks(name):
    score = grade.grade(name, solution_path(name), isolated=False)
    assert score.points == score.total and not failed(score), failed(score)


@pytest.mark.parametrize("name", NAMES)
def test_untouched_student_file_gets_zero(name):
    score = grade.grade(name, starter_path(name), isolated=False)
    assert not score.load_error
    assert score.points == 0
    assert all("not implemented" in r.reason for r in score.results)


def load_make_starters():
    return load("make_starters", ASSIGNMENTS_DIR / "make_starters.py")


@pytest.mark.parametrize("name", NAMES)
def test_student_file_is_the_solution_with_blanks(name):
    solution = solution_path(name).read_text(encoding="utf-8")
    assert solution.count("# BEGIN SOLUTION") == solution.count("# END SOLUTION") >= 1
    expected = load_make_starters().starter_text(solution)
    assert starter_path(name).read_text(encoding="utf-8") == expected, (
        f"{starter_path(name).name} is out of date: run python tutorials/assignments/make_starters.py")
    assert "BEGIN SOLUTION" not in expected and "raise NotImplementedError  # YOUR CODE HERE" in expected


def test_every_assignment_has_a_starter_a_solution_and_a_line_in_the_guide():
    starters = sorted(p.name for p in ASSIGNMENTS_DIR.glob("assignment*.py"))
    assert starters == sorted(grade.starter(name).name for name in NAMES)
    assert starters == sorted(p.name for p in (ASSIGNMENTS_DIR / "solutions").glob("assignment*.py"))
    readme = (ASSIGNMENTS_DIR / "README.md").read_text(encoding="utf-8")
    for name in starters:
        assert name in readme, f"the instructor guide does not mention {name}"


# --------------------------------------------------------------------------- common mistakes

MISTAKES = [  # (assignment, text in the solution, replacement, checks that must fail)
    ("assignment1", "nn.init.zeros_(self.B)", "nn.init.normal_(self.B)", {"init_is_base"}),  # both random
    ("assignment1", "nn.init.kaiming_uniform_(self.A, a=5**0.5)", "nn.init.zeros_(self.A)",  # both zero
     {"init_gradients"}),
    ("assignment1", "(x @ self.A.T @ self.B.T) * self.scale", "(x @ self.A.T @ self.B.T) * self.scale * self.A.shape[0]",
     {"forward_formula", "forward_gradient"}),  # alpha instead of alpha / r
    ("assignment1", "(x @ self.A.T @ self.B.T) * self.scale", "x @ (self.scale * self.B @ self.A).T",
     {"never_forms_BA"}),  # right answer, the expensive way
    ("assignment2", "        if self.merged:\n            return\n", "", {"merge_twice"}),  # merging twice adds twice
    ("assignment2", "weight.copy_((weight.float() + delta).to(weight.dtype))", "weight.add_(delta.to(weight.dtype))",
     {"half_precision"}),  # rounds the update, then the sum: two roundings
    ("assignment2", "        if not self.merged:\n            return\n", "", {"unmerge_unmerged"}),
    ("assignment3", "p.numel() for p in model.parameters() if p.requires_grad",
     "p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad",  # tied twice
     {"count", "count_shared"}),
    ("assignment3", "    return embeddings + n_layer * block + layer_norm\n", "    return embeddings + n_layer * block\n",
     {"gpt2_formula"}),  # forgot ln_f
    ("assignment4", "torch.log_softmax(logits[loss_mask].float(), dim=-1)",
     "torch.log(torch.softmax(logits[loss_mask].float(), dim=-1))", {"stable"}),
    ("assignment4", "    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()\n",
     ("    per_token = (1 - label_smoothing) * nll + label_smoothing * uniform\n"
      "    rows = loss_mask.nonzero()[:, 0]\n"
      "    per_row = torch.zeros(len(loss_mask)).index_add(0, rows, per_token) / loss_mask.sum(1).clamp(min=1)\n"
      "    return per_row[loss_mask.any(1)].mean()\n"),  # mean of per-sequence means
     {"per_token_mean"}),
    ("assignment4", "uniform = -log_probs.mean(dim=-1)", "uniform = -log_probs.sum(dim=-1)", {"smoothed"}),
    ("assignment4", "    log_probs = torch.log_softmax(logits[loss_mask].float(), dim=-1)  # (N, V), stable\n",
     ("    log_probs = -torch.nn.functional.cross_entropy(  # log p[v] as minus the NLL of target v\n"
      "        logits[loss_mask].float().repeat_interleave(logits.shape[-1], 0),\n"
      "        torch.arange(logits.shape[-1]).repeat(int(loss_mask.sum())), reduction='none',\n"
      "    ).view(-1, logits.shape[-1])\n"),
     {"from_log_probs"}),
    ("assignment5", "candidates = beam_scores[:, None] + log_probs", "candidates = log_probs",
     {"best", "consistent", "first_step"}),  # forgot the beams' scores
    ("assignment5", "topk(beam_size)", "topk(beam_size, sorted=False)", {"sorted"}),
    ("assignment6", ".tril(diagonal=S - T)", ".tril()", {"offset", "incremental"}),
    ("assignment6", "torch.softmax(scores, dim=-1) @ v", "(scores.exp() / scores.exp().sum(-1, keepdim=True)) @ v",
     {"stable"}),
    ("assignment7", "param.requires_grad = method == \"full\" or \".lora.\" in name", "param.requires_grad = True",
     {"trainable_lora"}),  # forgot to freeze the pretrained weights
    ("assignment7", "return [param for param in model.parameters() if param.requires_grad]",
     "return [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]",
     {"trainable_full"}),  # the tied embedding twice
    ("assignment7", "torch.optim.AdamW(params, lr=lr, weight_decay=0.0)", "torch.optim.AdamW(params, lr=lr)",
     {"lora_adapt", "full_adapt"}),  # AdamW's default weight decay, 0.01
    ("assignment7", "        losses.append(loss.item())\n",
     "        losses.append(masked_lm_loss(model(input_ids), targets, loss_mask).item())\n",
     {"losses"}),  # the loss after the step
    ("assignment8", "scale[k][:, None, None]", "scale[0]", {"own_scale"}),
    ("assignment8", "A[k].transpose(1, 2)) @ B[k].transpose(1, 2)", "A[k[0]].T) @ B[k[0]].T", {"mixed_rows", "no_adapter"}),
    ("assignment8", "    return torch.where((adapter >= 0)[:, None, None], h + update, h)\n",
     "    return h + update\n", {"no_adapter"}),  # -1 picked an adapter
    ("assignment8", "update = (x @ A[k].transpose(1, 2)) @ B[k].transpose(1, 2)",
     "update = x @ (B[k] @ A[k]).transpose(1, 2)", {"never_forms_BA"}),
    ("assignment9", "torch.minimum(i, j)", "j", {"same", "everywhere"}),  # divided by j
    ("assignment9", "overlap = (U1 @ U2.T) ** 2", "overlap = (U1 @ U2.T).abs()",
     {"shape", "diagonal", "everywhere"}),  # not squared
]


def plant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    solution = solution_path(name).read_text(encoding="utf-8")
    assert old in solution, "the mistake no longer applies to the solution; update this test"
    return write(tmp_path, name, solution.replace(old, new))


@pytest.mark.parametrize("mistake", MISTAKES, ids=[f"{m[0]}-{'-'.join(sorted(m[3]))}" for m in MISTAKES])
def test_a_common_mistake_loses_exactly_its_points(tmp_path, mistake):
    name, old, new, must_fail = mistake
    score = grade.grade(name, plant(tmp_path, name, old, new), isolated=False)
    assert set(failed(score)) == must_fail, failed(score)
    assert all(failed(score).values())  # every failure says why
    assert score.points == score.total - sum(r.points for r in score.results if r.key in must_fail)


# --------------------------------------------------------------------------- messages


def test_a_failing_case_names_its_inputs(tmp_path):
    student = plant(tmp_path, "assignment1", "(x @ self.A.T @ self.B.T) * self.scale",
                    "(x @ self.A.T @ self.B.T) * self.scale * self.A.shape[0]")
    reason = failed(grade.grade("assignment1", student, isolated=False))["forward_formula"]
    assert "forward vs W0 x + b + (alpha/r) B A x: largest difference" in reason
    assert "failing case: n_in=3, n_out=2, r=4, alpha=16.0, seed=1" in reason  # r = 1 passes: the first to fail
    assert "cases fail)" in reason and "hypothesis" not in reason.lower()


def test_a_shifted_loss_mask_is_reported_as_nan_and_as_changing_with_unmasked_positions(tmp_path):
    # The mask of the *next* position: with one token in the mask at the end, nothing is selected.
    student = plant(tmp_path, "assignment4", "    log_probs = torch.log_softmax(logits[loss_mask].float(), dim=-1)",
                    "    loss_mask = torch.roll(loss_mask, 1, dims=1)\n"
                    "    loss_mask[:, 0] = False\n"
                    "    log_probs = torch.log_softmax(logits[loss_mask].float(), dim=-1)")
    reasons = failed(grade.grade("assignment4", student, isolated=False))
    assert "NaN in 1 of 1 entries, where the answer is finite (a mean over nothing, or 0/0?)" in reasons["plain"]
    assert "outside_mask" in reasons and "not per sequence" not in reasons.get("per_token_mean", "")
    assert "ExceptionGroup" not in str(reasons) and "core.py" not in str(reasons)


def test_the_per_sequence_mean_is_named_only_when_that_is_the_mistake(tmp_path):
    student = plant(tmp_path, "assignment4", "    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()\n",
                    "    per_token = (1 - label_smoothing) * nll + label_smoothing * uniform\n"
                    "    rows = loss_mask.nonzero()[:, 0]\n"
                    "    per_row = torch.zeros(len(loss_mask)).index_add(0, rows, per_token) / loss_mask.sum(1).clamp(min=1)\n"
                    "    return per_row[loss_mask.any(1)].mean()\n")
    assert "the mean of the per-sequence means" in failed(grade.grade("assignment4", student, isolated=False))[
        "per_token_mean"]


def test_the_instructor_guide_shows_the_grader_s_real_output(tmp_path):
    readme = (ASSIGNMENTS_DIR / "README.md").read_text(encoding="utf-8")
    shown = readme.split("$ python grade.py assignment6 assignment6_kv_cache.py\n")[1].split("```")[0]
    student = plant(tmp_path, "assignment6", ".tril(diagonal=S - T)", ".tril()")
    out = io.StringIO()
    grade.report(grade.grade("assignment6", student, isolated=False), student.name, out)
    assert out.getvalue() == shown


def test_calling_lora_min_instead_of_writing_it_is_a_violation(tmp_path):
    student = write(tmp_path, "assignment4", "from lora_min.data import masked_lm_loss\n")
    score = grade.grade("assignment4", student, isolated=False)
    assert score.points == 0 and score.violations == [
        "line 1 imports lora_min.data.masked_lm_loss, the reference it is graded against: write it yourself"]


def test_log_of_softmax_is_named_when_large_logits_break_it(tmp_path):
    student = plant(tmp_path, "assignment4", "torch.log_softmax(logits[loss_mask].float(), dim=-1)",
                    "torch.log(torch.softmax(logits[loss_mask].float(), dim=-1))")
    reason = failed(grade.grade("assignment4", student, isolated=False))["stable"]
    assert reason.startswith("the loss is nan for logits of size ~1000, where the answer is finite: log(softmax) underflows")


def test_a_crash_names_the_student_line(tmp_path):
    student = write(tmp_path, "assignment3", "def count_trainable(model):\n    return model.no_such_thing\n")
    reason = failed(grade.grade("assignment3", student, isolated=False))["count"]
    assert "AttributeError" in reason and f"(at {student.name}, line 2)" in reason


# --------------------------------------------------------------------------- the command line


def test_cli_full_marks_exit_0_in_a_child_process(capsys):
    assert grade.main(["assignment5", str(solution_path("assignment5"))]) == 0
    out = capsys.readouterr().out
    assert "[3/3] keeps the beam_size best (beam, token) candidates" in out
    assert out.strip().endswith("score: 8/8")


def test_cli_file_that_does_not_import(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grade, "grade", lambda *a, **k: GRADE(*a, **k, isolated=False))
    assert grade.main(["assignment5", str(write(tmp_path, "assignment5", "def beam_step(:\n"))]) == 1
    out = capsys.readouterr().out
    assert "could not import the file: SyntaxError" in out and out.strip().endswith("score: 0/8")


GRADE = grade.grade


@pytest.mark.parametrize("argv", [[], ["assignment99", "x.py"], ["assignment1"], ["assignment1", "/no/such/file.py"],
                                  ["--class", "/no/such/folder"]])
def test_cli_bad_usage_exit_2(argv, capsys):
    assert grade.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_list(capsys):
    assert grade.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def test_class_grading_writes_a_csv_and_a_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grade, "grade", lambda *a, **k: GRADE(*a, **k, isolated=False))
    for student, source in (("ada", solution_path("assignment5")), ("bob", starter_path("assignment5"))):
        (tmp_path / "class" / student).mkdir(parents=True)
        (tmp_path / "class" / student / source.name).write_text(source.read_text())
    (tmp_path / "class" / "cy").mkdir()  # submitted nothing
    out_csv = tmp_path / "grades.csv"
    assert grade.main(["--class", str(tmp_path / "class"), "--csv", str(out_csv)]) == 0
    rows = [row for row in csv.DictReader(out_csv.open()) if row["assignment"] == "assignment5"]
    assert [(r["student"], r["points"], r["total"]) for r in rows] == [("ada", "8", "8"), ("bob", "0", "8"), ("cy", "0", "")]
    assert rows[0]["check 1"] == "3/3" and rows[1]["check 1"].startswith("0/3 not implemented")
    assert rows[2]["note"] == "no submission"
    report = out_csv.with_suffix(".report.txt").read_text()
    assert "assignment5: one beam search step: 2 of 3 students submitted; mean 4.0/8, 1 full marks" in report
    assert "    1/2 pass  best first" in report
    assert report in capsys.readouterr().out


# --------------------------------------------------------------------------- attacks on the grader


def test_a_fake_score_and_exit_0_at_import_score_0(tmp_path, capsys):
    student = write(tmp_path, "assignment5", "import sys\nprint('score: 8/8')\nsys.exit(0)\n")
    assert grade.main(["assignment5", str(student)]) == 1
    out = capsys.readouterr().out
    assert "could not import the file: SystemExit: 0" in out and out.strip().splitlines()[-1] == "score: 0/8"


@pytest.mark.slow
def test_os_exit_0_at_import_scores_0(tmp_path):
    score = grade.grade("assignment5", write(tmp_path, "assignment5", "import os\nprint('score: 8/8')\nos._exit(0)\n"),
                        QUICK)
    assert score.points == 0 and "ended the grading process" in score.load_error


@pytest.mark.slow
def test_patching_torch_and_the_checks_in_the_child_changes_no_verdict(tmp_path):
    wrong = solution_path("assignment1").read_text().replace("* self.scale\n", "* self.scale * 2\n")
    student = write(tmp_path, "assignment1", wrong + (
        "\nimport sys\n"
        "torch.allclose = lambda *a, **k: True\n"
        "torch.equal = lambda *a, **k: True\n"
        "torch.Tensor.__eq__ = lambda *a, **k: True\n"
        "for module in list(sys.modules.values()):\n"
        "    for name in ('close', 'equal', 'verify', 'Failure'):\n"
        "        if hasattr(module, name) and module.__name__.startswith('grading'):\n"
        "            setattr(module, name, lambda *a, **k: None)\n"))
    score = grade.grade("assignment1", student, QUICK)
    assert set(failed(score)) == {"forward_formula", "forward_gradient"}, failed(score)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["package", "path"])
def test_importing_the_reference_solution_scores_0(tmp_path, how):
    attack = {"package": "from tutorials.assignments.solutions.assignment5_beam_step import beam_step\n",
              "path": f"import sys\nsys.path.insert(0, {str(ASSIGNMENTS_DIR / 'solutions')!r})\n"
                      "from assignment5_beam_step import beam_step\n"}[how]
    score = grade.grade("assignment5", write(tmp_path, "assignment5", attack), QUICK)
    assert score.points == 0 and score.load_error
    if how == "path":
        assert any("reading" in v and "assignment5_beam_step.py" in v for v in score.violations)


@pytest.mark.slow
def test_an_endless_loop_at_import_is_stopped_within_the_limit(tmp_path):
    limits = grade.Limits(import_s=20, case_s=5, total_s=60)
    start = time.monotonic()
    score = grade.grade("assignment5", write(tmp_path, "assignment5", "while True:\n    pass\n"), limits)
    assert time.monotonic() - start < limits.import_s + 10
    assert score.points == 0 and "took longer than 20 s" in score.load_error


@pytest.mark.slow
def test_a_loop_that_swallows_timeouts_fails_its_check_and_grading_goes_on(tmp_path):
    limits = grade.Limits(import_s=60, case_s=5, total_s=120)
    student = plant(tmp_path, "assignment3", "    return n_layer * len(targets) * (r * n_embd + n_embd * r)\n",
                    "    import signal\n    signal.alarm(0)\n    while True:\n        try:\n            pass\n"
                    "        except BaseException:\n            pass\n")
    student.write_text("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + student.read_text())
    start = time.monotonic()
    score = grade.grade("assignment3", student, limits)
    assert time.monotonic() - start < limits.total_s
    assert list(failed(score)) == ["lora_formula"] and "took longer than 5 s" in failed(score)["lora_formula"]
    assert score.points == score.total - 2


@pytest.mark.slow
def test_a_thread_that_never_ends_does_not_hold_the_grader(tmp_path):
    solution = solution_path("assignment5").read_text()
    student = write(tmp_path, "assignment5", solution + "\nimport threading\n"
                    "threading.Thread(target=lambda: [None for _ in iter(int, 1)]).start()\n")
    start = time.monotonic()
    score = grade.grade("assignment5", student, QUICK)
    assert score.points == score.total and time.monotonic() - start < QUICK.import_s


@pytest.mark.slow
def test_allocating_4_4_gb_fails_without_hurting_the_grader(tmp_path):
    score = grade.grade("assignment5", write(tmp_path, "assignment5", "import torch\nx = torch.ones(1_100_000_000)\n"),
                        QUICK)
    assert score.points == 0 and "can't allocate memory" in score.load_error, score.load_error


@pytest.mark.slow
def test_writing_outside_its_folder_is_refused_and_reported(tmp_path):
    target = tmp_path / "written-by-the-submission"
    solution = solution_path("assignment5").read_text()
    student = write(tmp_path, "assignment5", solution.replace(
        "    # BEGIN SOLUTION\n", f"    # BEGIN SOLUTION\n    open({str(target)!r}, 'w').write('pwned')\n"))
    score = grade.grade("assignment5", student, QUICK)
    assert not target.exists()
    assert score.points == 0 and any(f"writing {target}" in v for v in score.violations)


@pytest.mark.slow
@pytest.mark.parametrize("attack, refused", [
    ("import os\nos.chdir('/tmp')\nopen('written-by-the-submission', 'w')\n", "os.chdir"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "os.kill"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", "resource.setrlimit"),
    ("import subprocess\nsubprocess.run(['true'])\n", "subprocess.Popen"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "socket.connect"),
], ids=["chdir", "kill-the-grader", "raise-limits", "subprocess", "socket"])
def test_what_a_submission_has_no_business_doing_is_refused_and_reported(tmp_path, attack, refused):
    score = grade.grade("assignment5", write(tmp_path, "assignment5", attack), QUICK)
    assert score.points == 0 and any(refused in v for v in score.violations), (score.load_error, score.violations)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_gets_full_marks_in_a_child_process(name):
    score = grade.grade(name, solution_path(name))
    assert score.points == score.total and not score.violations, (failed(score), score.violations)
