"""The autograder of the course assignments in this folder.

    python tutorials/assignments/grade.py assignment1 path/to/assignment1_lora_layer.py
    python tutorials/assignments/grade.py --class submissions/ --csv grades.csv
    python tutorials/assignments/grade.py --list

An assignment is a list of checks, each worth some points (checks/assignmentN_*.py). The
submission runs in a child process (python -I, an empty working folder, a scrubbed environment,
limits on CPU time, memory, open files and processes, the solutions out of reach, killed from
outside on a wall-clock limit): it only computes outputs on inputs this process chose, and this
process compares them with lora-min's own implementation or a brute-force answer. What the
submission does to torch, to the checks or to its own exit status changes no verdict. What this
does not stop is in README.md ("What the grader guarantees").

Exit status: 0 for full marks, 1 for anything less, 2 for bad usage. The score line is printed
by this process: `score: P/T` is the last line.
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO

if os.name != "posix":
    sys.exit("the grader needs Linux or macOS (on Windows, run it in WSL)")
import resource  # POSIX only

HERE = Path(__file__).resolve().parent
if (HERE.parents[1] / "lora_min").is_dir():  # grade against this checkout's lora_min, even as a script
    sys.path.insert(0, str(HERE.parents[1]))

import lora_min  # the reference; the child imports this same copy
import torch

CHECKS_DIR = HERE / "checks"
CHILD = HERE / "child.py"
VIOLATION = "GRADER-VIOLATION:"  # what child.py writes when it refuses something


@dataclass(frozen=True)
class Limits:
    """How much a submission may use. A case that returns nothing for `case_s` is stopped, its
    check fails, and grading goes on in a fresh child; `total_s` bounds the whole assignment."""
    import_s: float = 60.0  # starting Python, importing torch and the submission (a busy machine is slow)
    case_s: float = 20.0
    total_s: float = 120.0
    memory_bytes: int = 2 << 30  # address space on top of Python + torch (~0.8 GB for a CPU build, more with CUDA)
    open_files: int = 256
    file_bytes: int = 64 << 20
    processes: int = 64  # on top of the user's own (threads count too); root is exempt by the OS


LIMITS = Limits()


# -----------------------------------------------------------------------------
# The assignments and their checks


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assignment_files() -> dict[str, Path]:
    """{"assignment1": checks/assignment1_lora_layer.py, ...}, in order."""
    files = sorted(CHECKS_DIR.glob("assignment*.py"), key=lambda p: int(p.name.split("_")[0][len("assignment"):]))
    return {path.name.split("_")[0]: path for path in files}


ASSIGNMENTS = assignment_files()


def load_checks(assignment: str) -> ModuleType:
    """The assignment's checks file: TITLE, CHECKS and the probes."""
    load_module("grading_common", CHECKS_DIR / "common.py")
    return load_module("grading_checks", ASSIGNMENTS[assignment])


def starter(assignment: str) -> Path:
    return HERE / ASSIGNMENTS[assignment].name


# -----------------------------------------------------------------------------
# Scores


@dataclass
class CheckResult:
    key: str  # the check's cases function without "_cases": "forward_formula"
    name: str
    points: int
    passed: bool
    reason: str = ""


@dataclass
class Score:
    assignment: str
    title: str
    results: list[CheckResult] = field(default_factory=list)
    load_error: str = ""  # the file did not import: nothing was graded
    violations: list[str] = field(default_factory=list)  # refused actions: the score is 0
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return 0 if self.violations else sum(r.points for r in self.results if r.passed)

    @property
    def total(self) -> int:
        return sum(r.points for r in self.results)


def verdict(case, result: dict | None) -> str:
    """"" if the case passed, else why not (one line)."""
    if result is None:
        return "not run"
    try:
        if "error" in result:  # the child's words: one printable line, so it cannot fake a score line
            return "".join(c for c in str(result["error"]).strip().split("\n")[0] if c.isprintable())[:300] or "error"
        case.verify(result["outputs"])
    except AssertionError as err:  # a Failure (or a plain assert) in the verdict
        return str(err)
    except Exception as err:  # outputs of the wrong kind (a list for a tensor, ...)
        return f"the outputs are not what the assignment asks for ({type(err).__name__}: {err})"
    return ""


def score_checks(score: Score, checks: list, cases: list[list], results: list[list[dict | None]],
                 source: str) -> None:
    for check, check_cases, check_results in zip(checks, cases, results):
        failures = [(case, reason) for case, result in zip(check_cases, check_results)
                    if (reason := verdict(case, result))]
        reason = ""
        if check.source_rule is not None and not failures:
            try:
                check.source_rule(source)
            except AssertionError as err:
                reason = str(err)
        if failures:
            case, why = failures[0]
            reason = why
            if not why.startswith(("not implemented", "not run")):
                reason += f"\n        failing case: {case.label}"
            if len(check_cases) > 1 and len(failures) < len(check_cases):
                reason += f"  ({len(failures)} of {len(check_cases)} cases fail)"
        score.results.append(CheckResult(check.cases.__name__.removesuffix("_cases"), check.name, check.points, not reason,
                                          reason))


# -----------------------------------------------------------------------------
# Running a submission: in a child process (always, for grading), or here (for the test suite)


def kernel_limits(limits: Limits) -> list[tuple[int, int]]:
    """(resource, value) pairs: CPU seconds, open files, file size, core dumps, processes. The
    child limits its address space itself, once it knows what torch took (child.limit_memory)."""
    return [(resource.RLIMIT_CPU, int(limits.total_s) + 5),
            (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_FSIZE, limits.file_bytes),
            (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, threads_of_this_user() + limits.processes)]


def limit(pid: int, limits: Limits) -> None:
    """Kernel limits on the child, set from here as soon as it exists (it spends its first
    second importing torch, long before the submission runs); it cannot raise them (the audit
    hook refuses resource.setrlimit, which root could otherwise use). Linux only (prlimit)."""
    for which, value in kernel_limits(limits):
        resource.prlimit(pid, which, (value, value))


def limit_myself(pairs: list[tuple[int, int]]) -> None:
    """The same limits where there is no prlimit (macOS), set by the child before it starts
    Python; best effort, as macOS does not enforce every one of them."""
    for which, value in pairs:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def threads_of_this_user() -> int:
    uid, count = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nUid:\t{uid}\t" in text:
            count += int(text.split("\nThreads:\t")[1].split("\n")[0])
    return count


def child_environment(workdir: Path) -> dict[str, str]:
    """Nothing of the grader's environment: no tokens, no PYTHONPATH, one thread."""
    return {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_child(checks_file: Path, submission: Path, cases: list, limits: Limits, deadline: float,
              ) -> tuple[list[dict | None], str, str]:
    """One child process over `cases`, in order. Returns (results, log, how it stopped):
    results[i] is None from the first case that never finished; how it stopped is "" (done),
    "import" (did not import), "import-timeout", "timeout" (stuck in a case), "died" or "deadline"."""
    root = Path(tempfile.mkdtemp(prefix="lora-min-grade-"))
    try:
        workdir, library = root / "work", root / "lib"
        workdir.mkdir()
        library.mkdir()
        (library / "lora_min").symlink_to(Path(lora_min.__file__).parent)
        shutil.copyfile(submission, workdir / submission.name)
        torch.save([{"probe": case.probe.__name__, "inputs": case.inputs} for case in cases], workdir / "inputs.pt")
        prlimit = hasattr(resource, "prlimit")  # Linux
        pairs = [] if prlimit else kernel_limits(limits)
        preexec = (lambda: limit_myself(pairs)) if pairs else None
        with open(root / "child.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-I", str(CHILD), str(checks_file), str(workdir / submission.name), str(library),
                 str(limits.memory_bytes)],
                cwd=workdir, env=child_environment(workdir), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
            try:
                if prlimit:
                    limit(process.pid, limits)
            except ProcessLookupError:
                pass  # it is gone already
            stopped = watch(process, workdir, len(cases), limits, deadline)
        results = []
        for i in range(len(cases)):
            try:  # weights_only: the file is the submission's to forge, never to run code in here
                results.append(torch.load(workdir / "results" / f"{i}.pt", weights_only=True))
            except FileNotFoundError:
                break
            except Exception as err:
                results.append({"error": f"the child's output could not be read ({type(err).__name__})"})
        results += [None] * (len(cases) - len(results))
        log_text = (root / "child.log").read_bytes()[-100_000:].decode(errors="replace")
        if stopped == "" and None in results:
            stopped = "died" if (workdir / "imported").exists() else "import"
        return results, log_text, stopped
    finally:
        shutil.rmtree(root, ignore_errors=True)


def watch(process: subprocess.Popen, workdir: Path, n_cases: int, limits: Limits, deadline: float) -> str:
    """Wait for the child; kill its whole process group when it overruns. Returns how it stopped."""
    started = time.monotonic()
    last_progress = None  # when the submission finished importing, then when a case last finished
    done = 0
    try:
        while process.poll() is None:
            time.sleep(0.05)
            now = time.monotonic()
            if last_progress is None and (workdir / "imported").exists():
                last_progress = now
            while last_progress is not None and (workdir / "results" / f"{done}.pt").exists():
                done, last_progress = done + 1, now
            if done == n_cases:
                return ""  # every output is in: whatever the child still does, it is killed
            if now > deadline:
                return "deadline"
            if last_progress is None and now - started > limits.import_s:
                return "import-timeout"
            if last_progress is not None and now - last_progress > limits.case_s and done < n_cases:
                return "timeout"
        return ""
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its children too; SIGKILL cannot be caught
        except ProcessLookupError:
            pass
        process.wait()


def run_isolated(assignment: str, submission: Path, flat: list, limits: Limits
                 ) -> tuple[list[dict | None], str, list[str]]:
    """Every case in child processes: a fresh child after a case that hangs or kills its child.
    Returns (results, load_error, violations)."""
    start = time.monotonic()
    deadline = start + limits.total_s
    results: list[dict | None] = [None] * len(flat)
    todo = list(range(len(flat)))
    violations: list[str] = []
    while todo:
        got, log, stopped = run_child(ASSIGNMENTS[assignment], submission, [flat[i][1] for i in todo], limits,
                                      deadline)
        violations += [line.split(VIOLATION, 1)[1].strip() for line in log.splitlines() if VIOLATION in line]
        if stopped in ("import", "import-timeout", "deadline") and not any(got):
            if stopped == "deadline":
                return results, f"grading took longer than {limits.total_s:.0f} s", violations
            return results, import_error(log, limits, started_late=stopped == "import-timeout"), violations
        for i, result in zip(todo, got):
            results[i] = result
        todo = [i for i in todo if results[i] is None]
        if not todo:
            break
        if stopped == "deadline":
            for i in todo:
                results[i] = {"error": f"grading ran out of time ({limits.total_s:.0f} s for the assignment)"}
            break
        # The first unfinished case hung or killed its child: it fails, and so do the rest of
        # its check (their points are lost anyway), and a fresh child runs the other checks.
        stuck_check = flat[todo[0]][0]
        why = (f"took longer than {limits.case_s:.0f} s (an endless loop?)" if stopped == "timeout"
               else "the process ended during this case (it exited, crashed or ran out of memory)")
        for i in todo:
            if flat[i][0] == stuck_check:
                results[i] = {"error": why}
        todo = [i for i in todo if results[i] is None]
    return results, "", violations


def import_error(log: str, limits: Limits, started_late: bool) -> str:
    lines = [line for line in log.splitlines() if line.startswith("could not import the file: ")]
    if lines:
        return lines[-1][len("could not import the file: "):]
    if started_late:
        return f"importing the file took longer than {limits.import_s:.0f} s (an endless loop at import?)"
    return "the file ended the grading process while it was imported (sys.exit or os._exit?)"


def run_here(submission: Path, checks: ModuleType, flat: list) -> tuple[list[dict | None], str, list[str]]:
    """The child's work, in this process, without its protections: for the test suite, which
    grades the trusted solutions and planted mistakes many times. Same probes, same verdicts."""
    child = load_module("grading_child", CHILD)
    try:
        student = child.load_module(child.STUDENT_MODULE, submission)
    except Exception as err:
        return [None] * len(flat), child.describe(err, submission.name), []
    try:
        return [child.run_case(student, case.probe, case.inputs, submission.name) for _, case in flat], "", []
    finally:
        sys.modules.pop(child.STUDENT_MODULE, None)


def reference_imports(source: str, allowed: frozenset[str]) -> list[str]:
    """Imports of lora_min, the reference the checks compare with, beyond what the starter uses."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # the import reports it
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [f"line {node.lineno} imports {name}, the reference it is graded against: write it yourself"
                  for name in names if name.split(".")[0] == "lora_min" and name not in allowed]
    return found


def grade(assignment: str, submission: str | Path, limits: Limits = LIMITS, isolated: bool = True) -> Score:
    """Run every check of `assignment` on the file `submission`."""
    start = time.monotonic()
    submission = Path(submission)
    checks = load_checks(assignment)
    cases = [check.cases() for check in checks.CHECKS]
    flat = [(c, case) for c, check_cases in enumerate(cases) for case in check_cases]
    if isolated:
        results, load_error, violations = run_isolated(assignment, submission, flat, limits)
    else:
        results, load_error, violations = run_here(submission, checks, flat)
    source = submission.read_text(encoding="utf-8", errors="replace")
    violations += reference_imports(source, getattr(checks, "ALLOWED_IMPORTS", frozenset()))
    score = Score(assignment, checks.TITLE, load_error=load_error, violations=violations)
    per_check: list[list[dict | None]] = [[] for _ in cases]
    for (c, _), result in zip(flat, results):
        per_check[c].append(result if not load_error else {"error": "the file did not import"})
    score_checks(score, checks.CHECKS, cases, per_check, source)
    if load_error:
        for result in score.results:
            result.reason = "the file did not import"
    score.seconds = time.monotonic() - start
    return score


# -----------------------------------------------------------------------------
# Reports


def report(score: Score, path: str | Path, out: TextIO) -> None:
    print(f"{score.assignment}: {score.title} ({path})", file=out)
    if score.load_error:
        print(f"  could not import the file: {score.load_error}", file=out)
    for violation in dict.fromkeys(score.violations):
        print(f"  violation: {violation}", file=out)
    if score.violations:
        print("  a submission that does what the grader refuses scores 0", file=out)
    width = len(str(max(r.points for r in score.results)))
    for result in score.results:
        points = result.points if result.passed and not score.violations else 0
        print(f"  [{points:>{width}}/{result.points}] {result.name}", file=out)
        if result.reason:
            print(f"        {result.reason}", file=out)
    print(f"score: {score.points}/{score.total}", file=out)


def grade_class(folder: Path, jobs: int, limits: Limits) -> list[tuple[str, str, Score | None]]:
    """Every student folder in `folder`, every assignment whose starter file name it holds."""
    students = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    work = [(student, name) for student in students for name in ASSIGNMENTS]

    def one(item):
        student, name = item
        found = sorted(student.rglob(starter(name).name))
        return student.name, name, grade(name, found[0], limits) if found else None

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each grading waits on its own child
        return list(pool.map(one, work))


def write_csv(rows: list[tuple[str, str, Score | None]], path: Path) -> None:
    n_checks = max((len(s.results) for _, _, s in rows if s), default=0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "points", "total", "note"] + [f"check {i + 1}" for i in range(n_checks)])
        for student, name, score in rows:
            if score is None:
                writer.writerow([student, name, 0, "", "no submission"])
                continue
            note = "; ".join(["violation: " + v for v in dict.fromkeys(score.violations)]
                             + (["did not import: " + score.load_error] if score.load_error else []))
            verdicts = [f"{r.points if r.passed else 0}/{r.points}" + ("" if r.passed else f" {r.reason.splitlines()[0]}")
                        for r in score.results]
            writer.writerow([student, name, score.points, score.total, note] + verdicts)


def class_report(rows: list[tuple[str, str, Score | None]], out: TextIO) -> None:
    for name in ASSIGNMENTS:
        scores = [(student, s) for student, n, s in rows if n == name]
        graded = [(student, s) for student, s in scores if s is not None]
        if not graded:
            continue
        points = [s.points for _, s in graded]
        total = graded[0][1].total
        print(f"{name}: {graded[0][1].title}: {len(graded)} of {len(scores)} students submitted; "
              f"mean {sum(points) / len(points):.1f}/{total}, {points.count(total)} full marks", file=out)
        for c, result in enumerate(graded[0][1].results):
            passed = sum(s.results[c].passed for _, s in graded)
            print(f"  {passed:3}/{len(graded)} pass  {result.name}", file=out)
        for student, s in graded:
            if s.violations or s.load_error:
                print(f"  {student}: {'violation' if s.violations else 'did not import'}: "
                      f"{(s.violations or [s.load_error])[0]}", file=out)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tutorials/assignments/grade.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", nargs="?", help=f"one of: {', '.join(ASSIGNMENTS)}")
    parser.add_argument("student_file", nargs="?", help="the student's .py file")
    parser.add_argument("--list", action="store_true", help="list the assignments and their starter files")
    parser.add_argument("--class", dest="class_dir", metavar="FOLDER",
                        help="grade a class: FOLDER holds one folder per student (e.g. GitHub Classroom's clones)")
    parser.add_argument("--csv", default="grades.csv", help="with --class: where to write the grades (grades.csv)")
    parser.add_argument("--jobs", type=int, default=1, help="with --class: submissions graded at once (1)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.list:
        for name in ASSIGNMENTS:
            checks = load_checks(name)
            total = sum(check.points for check in checks.CHECKS)
            print(f"{name}  {checks.TITLE:38} {total:2} points  starter: {starter(name)}")
        return 0
    if args.class_dir:
        folder = Path(args.class_dir)
        if not folder.is_dir():
            print(f"error: {folder}: no such folder", file=sys.stderr)
            return 2
        rows = grade_class(folder, max(1, args.jobs), LIMITS)
        write_csv(rows, Path(args.csv))
        text = io.StringIO()
        class_report(rows, text)
        Path(args.csv).with_suffix(".report.txt").write_text(text.getvalue(), encoding="utf-8")
        print(text.getvalue(), end="")
        print(f"wrote {args.csv} and {Path(args.csv).with_suffix('.report.txt')}")
        return 0
    if args.assignment not in ASSIGNMENTS or args.student_file is None:
        parser.print_usage(sys.stderr)
        print(f"error: give an assignment ({', '.join(ASSIGNMENTS)}) and a student file", file=sys.stderr)
        return 2
    if not Path(args.student_file).is_file():
        print(f"error: {args.student_file}: no such file", file=sys.stderr)
        return 2
    score = grade(args.assignment, args.student_file)
    report(score, args.student_file, sys.stdout)
    return 0 if score.points == score.total else 1


if __name__ == "__main__":
    sys.exit(main())
