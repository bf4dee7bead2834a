"""The course assignments and their grader (lora_min/grade.py) can never drift apart.

* every reference solution gets full marks, every untouched student file gets zero;
* the student files are exactly the solutions with the solution regions blanked out;
* common mistakes (written into copies of the solutions) lose exactly the points they should,
  so each check has teeth;
* the command line reports scores and exit codes as documented.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

from lora_min import grade

ASSIGNMENTS_DIR = Path(__file__).resolve().parents[1] / "tutorials" / "assignments"
NAMES = list(grade.ASSIGNMENTS)


@pytest.fixture(autouse=True)
def fast_failures(request, monkeypatch):
    """Skip hypothesis's shrinking of failing inputs (seconds per failing check), except in the
    test that checks the failing example shown to students."""
    if "failing_example" not in request.node.name:
        monkeypatch.setattr(grade, "SHRINK_FAILURES", False)


def solution_path(name: str) -> Path:
    return ASSIGNMENTS_DIR / "solutions" / grade.ASSIGNMENTS[name].starter


def starter_path(name: str) -> Path:
    return ASSIGNMENTS_DIR / grade.ASSIGNMENTS[name].starter


@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_gets_full_marks(name):
    score = grade.grade(name, solution_path(name))
    failures = [(r.check.name, r.reason) for r in score.results if not r.passed]
    assert score.points == score.total and not failures, failures


@pytest.mark.parametrize("name", NAMES)
def test_untouched_student_file_gets_zero(name):
    score = grade.grade(name, starter_path(name))
    assert not score.load_error
    assert score.points == 0
    assert all("not implemented" in r.reason for r in score.results)


def load_make_starters():
    spec = importlib.util.spec_from_file_location("make_starters", ASSIGNMENTS_DIR / "make_starters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_student_file_is_the_solution_with_blanks(name):
    solution = solution_path(name).read_text(encoding="utf-8")
    assert solution.count("# BEGIN SOLUTION") == solution.count("# END SOLUTION") >= 1
    expected = load_make_starters().starter_text(solution)
    assert starter_path(name).read_text(encoding="utf-8") == expected, (
        f"{starter_path(name).name} is out of date: run python tutorials/assignments/make_starters.py")
    assert "BEGIN SOLUTION" not in expected and "raise NotImplementedError  # YOUR CODE HERE" in expected


def test_every_assignment_has_a_starter_and_a_solution():
    assert sorted(p.name for p in ASSIGNMENTS_DIR.glob("assignment*.py")) == sorted(
        a.starter for a in grade.ASSIGNMENTS.values())
    readme = (ASSIGNMENTS_DIR / "README.md").read_text(encoding="utf-8")
    for assignment in grade.ASSIGNMENTS.values():
        assert assignment.starter in readme, f"the instructor guide does not mention {assignment.starter}"


# --------------------------------------------------------------------------- common mistakes

MISTAKES = [  # (assignment, text in the solution, replacement, checks that must fail[, that may fail])
    ("assignment1", "nn.init.zeros_(self.B)", "nn.init.normal_(self.B)",  # both random
     {"check_init_is_base"}),
    ("assignment1", "nn.init.kaiming_uniform_(self.A, a=5**0.5)", "nn.init.zeros_(self.A)",  # both zero
     {"check_init_lets_gradients_flow"}),
    ("assignment1", "(x @ self.A.T @ self.B.T) * self.scale", "(x @ self.A.T @ self.B.T) * self.scale * self.A.shape[0]",
     {"check_forward_formula", "check_forward_gradients"}),  # alpha instead of alpha / r
    ("assignment1", "(x @ self.A.T @ self.B.T) * self.scale", "x @ (self.scale * self.B @ self.A).T",
     {"check_forward_never_forms_BA"}),  # right answer, the expensive way
    ("assignment2", "        if self.merged:\n            return\n", "",  # merging twice adds twice
     {"check_merge_twice"}),
    ("assignment2", "weight.copy_((weight.float() + delta).to(weight.dtype))", "weight.add_(delta.to(weight.dtype))",
     {"check_merge_half_precision"}),  # rounds the update, then the sum: two roundings
    ("assignment3", "p.numel() for p in model.parameters() if p.requires_grad",
     "p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad",  # tied twice
     {"check_count_trainable", "check_count_shared_once"}),
    ("assignment3", "    return embeddings + n_layer * block + layer_norm\n", "    return embeddings + n_layer * block\n",
     {"check_gpt2_formula"}),  # forgot ln_f
    ("assignment4", "torch.log_softmax(logits[loss_mask].float(), dim=-1)",
     "torch.log(torch.softmax(logits[loss_mask].float(), dim=-1))", {"check_loss_stable"}),
    ("assignment4", "    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()\n",
     ("    per_token = (1 - label_smoothing) * nll + label_smoothing * uniform\n"
      "    rows = loss_mask.nonzero()[:, 0]\n"
      "    per_row = torch.zeros(len(loss_mask)).index_add(0, rows, per_token) / loss_mask.sum(1).clamp(min=1)\n"
      "    return per_row[loss_mask.any(1)].mean()\n"),  # mean of per-sequence means
     {"check_loss_plain", "check_loss_smoothed", "check_loss_averages_tokens", "check_loss_from_log_probs"},
     {"check_loss_stable"}),  # its 10 examples may or may not have rows of unequal length
    ("assignment4", "    log_probs = torch.log_softmax(logits[loss_mask].float(), dim=-1)  # (N, V), stable\n",
     ("    log_probs = -torch.nn.functional.cross_entropy(  # log p[v] as minus the NLL of target v\n"
      "        logits[loss_mask].float().repeat_interleave(logits.shape[-1], 0),\n"
      "        torch.arange(logits.shape[-1]).repeat(int(loss_mask.sum())), reduction='none',\n"
      "    ).view(-1, logits.shape[-1])\n"),
     {"check_loss_from_log_probs"}),
    ("assignment5", "candidates = beam_scores[:, None] + log_probs", "candidates = log_probs",
     {"check_beam_best", "check_beam_consistent", "check_beam_first_step"}),  # forgot the beams' scores
    ("assignment6", ".tril(diagonal=S - T)", ".tril()", {"check_attention_offset", "check_incremental_decoding"}),
    ("assignment6", "torch.softmax(scores, dim=-1) @ v", "(scores.exp() / scores.exp().sum(-1, keepdim=True)) @ v",
     {"check_attention_stable"}),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[f"{m[0]}-{'-'.join(sorted(m[3]))}" for m in MISTAKES])
def test_a_common_mistake_loses_exactly_its_points(tmp_path, mistake):
    name, old, new, must_fail = mistake[:4]
    may_fail = mistake[4] if len(mistake) > 4 else set()
    solution = solution_path(name).read_text(encoding="utf-8")
    assert old in solution, "the mistake no longer applies to the solution; update this test"
    student = tmp_path / "student.py"
    student.write_text(solution.replace(old, new), encoding="utf-8")
    score = grade.grade(name, student)
    failed = {r.check.run.__name__ for r in score.results if not r.passed}
    assert must_fail <= failed <= must_fail | may_fail, [(r.check.name, r.reason) for r in score.results if not r.passed]
    assert all(r.reason for r in score.results if not r.passed)  # every failure says why


# --------------------------------------------------------------------------- the command line


def test_cli_full_marks_exit_0(capsys):
    assert grade.main(["assignment5", str(solution_path("assignment5"))]) == 0
    out = capsys.readouterr().out
    assert "[3/3] keeps the beam_size best (beam, token) candidates" in out
    assert out.strip().endswith("score: 8/8")


def test_cli_partial_marks_exit_1_and_show_the_failing_example(tmp_path, capsys):
    student = tmp_path / "student.py"
    student.write_text(solution_path("assignment6").read_text().replace(".tril(diagonal=S - T)", ".tril()"))
    assert grade.main(["assignment6", str(student)]) == 1
    out = capsys.readouterr().out
    assert "[0/2] the last T of S positions: the causal mask is offset" in out
    assert "failing example:" in out and "score: 4/9" in out


def test_cli_file_that_does_not_import(tmp_path, capsys):
    student = tmp_path / "student.py"
    student.write_text("def beam_step(:\n")
    assert grade.main(["assignment5", str(student)]) == 1
    out = capsys.readouterr().out
    assert "could not import the file: SyntaxError" in out and "score: 0/8" in out


def test_cli_crash_names_the_student_line(tmp_path, capsys):
    student = tmp_path / "student.py"
    student.write_text("def count_trainable(model):\n    return model.no_such_thing\n")
    assert grade.main(["assignment3", str(student)]) == 1
    assert "AttributeError" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["assignment9", "x.py"], ["assignment1"], ["assignment1", "/no/such/file.py"]])
def test_cli_bad_usage_exit_2(argv, capsys):
    assert grade.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_list(capsys):
    assert grade.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


@pytest.mark.skipif(not hasattr(grade.signal, "SIGALRM"), reason="needs SIGALRM (not on Windows)")
def test_an_endless_loop_fails_its_check_and_grading_goes_on(tmp_path, monkeypatch):
    # Long enough that no honest check times out on a busy CI machine; the loop never ends.
    monkeypatch.setattr(grade, "TIME_LIMIT_S", 10)
    student = tmp_path / "student.py"
    student.write_text(solution_path("assignment3").read_text().replace(
        "    return n_layer * len(targets) * (r * n_embd + n_embd * r)\n", "    while True:\n        pass\n"))
    score = grade.grade("assignment3", student)
    failed = {r.check.run.__name__: r.reason for r in score.results if not r.passed}
    assert list(failed) == ["check_lora_formula"] and "TimeoutError" in failed["check_lora_formula"]
    assert score.points == score.total - 2


def test_grading_does_not_leak_the_student_module():
    grade.grade("assignment5", solution_path("assignment5"))
    assert not any(name.startswith("student_") for name in sys.modules)
