"""The child process of the grader: runs a submission on the inputs the grader chose.

    python -I child.py CHECKS_FILE SUBMISSION_FILE LIBRARY_DIR MEMORY_BYTES    (started by grade.py only)

It runs in an empty working folder that holds `inputs.pt` (the cases: which probe to run on
which inputs) and a copy of the submission. It imports torch, lora_min and the assignment's
checks, installs an audit hook, imports the submission, runs every case in order and writes
each case's outputs to `results/<i>.pt` as it goes. It decides nothing: the grader reads the
outputs back and compares them with the reference in its own process. Everything here may be
tampered with by the submission; that can only change the outputs the grader then judges.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

VIOLATION = "GRADER-VIOLATION:"  # a line the grader looks for in the child's output
STUDENT_MODULE = "submission"


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path.name}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def describe(err: BaseException, student_file: str) -> str:
    """One line: what went wrong, and where in the student's file if it happened there."""
    if isinstance(err, NotImplementedError):
        return "not implemented yet (raise NotImplementedError)"
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).name == student_file]
    if frames:
        text += f" (at {student_file}, line {frames[-1].lineno})"
    return text


def plain(value):
    """The outputs as tensors, numbers, strings and containers of them (what the grader loads)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return f"<a {type(value).__name__}>"


def run_case(student: ModuleType, probe, inputs: dict, student_file: str) -> dict:
    """{"outputs": ...} from the probe, or {"error": one line}. The same seed before every case."""
    import torch
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return {"outputs": plain(probe(student, **inputs))}
    except BaseException as err:  # the student's bug (even sys.exit) costs this case only
        return {"error": describe(err, student_file)}


def install_audit_hook(workdir: str, private_dir: str) -> None:
    """Refuse, and report, what a submission has no business doing (see README: not a sandbox).

    Writes outside `workdir`, reads under `private_dir` (the solutions), new processes, signals
    to others, native code through ctypes, sockets, changing folder or limits, and the gc
    tricks that could reach this hook's state.
    Only builtins and str methods are used inside the hook, so monkeypatching os.path or
    posixpath cannot change what it allows.
    """
    workdir, private_dir = workdir.rstrip("/") + "/", private_dir.rstrip("/") + "/"
    write_stderr, fspath, isinstance_, str_, bytes_ = os.write, os.fspath, isinstance, str, bytes
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    forbidden = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                           "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
                           "socket.connect", "socket.bind", "socket.sendto", "gc.get_objects", "gc.get_referrers",
                           "gc.get_referents", "sys.addaudithook", "os.truncate", "os.symlink", "os.link",
                           "os.chdir", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                           "resource.prlimit"})
    path_events = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
                             "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"})

    def absolute(path) -> str:
        path = fspath(path)
        if isinstance_(path, bytes_):
            path = path.decode(errors="replace")
        if not path.startswith("/"):
            path = workdir + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        return "/" + "/".join(parts)

    def refuse(what: str) -> None:
        write_stderr(2, f"\n{VIOLATION} {what}\n".encode())
        raise PermissionError(f"the grader does not allow this: {what}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance_(path, int):
                return
            where = absolute(path)
            writing = any(c in str_(mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and not (where + "/").startswith(workdir):
                refuse(f"writing {where} (outside the submission's working folder)")
            if (where + "/").startswith(private_dir):
                refuse(f"reading {where} (the reference solutions)")
        elif event in path_events:
            for path in args[:2]:
                if isinstance_(path, (str_, bytes_)) and not (absolute(path) + "/").startswith(workdir):
                    refuse(f"{event} on {absolute(path)} (outside the submission's working folder)")
        elif event in forbidden:
            refuse(f"{event} (not allowed in a submission)")

    sys.addaudithook(hook)


def limit_memory(extra: int) -> None:
    """Address space: what this process holds now (Python, torch, lora_min) plus `extra`, for good:
    lowering a hard limit cannot be undone. Linux only (macOS does not enforce it)."""
    import resource
    status = Path("/proc/self/status")
    if status.exists():
        now = int(status.read_text().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (now + extra, now + extra))


def main() -> int:
    checks_file, submission, library_dir, memory = sys.argv[1:5]
    # python -I left out the script's folder, PYTHONPATH and the user's site-packages. Put the
    # grader's lora_min first, and drop any folder from which the solutions could be imported.
    sys.path.insert(0, library_dir)
    assignments_dir = str(Path(checks_file).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if not (Path(p) / "tutorials" / "assignments").exists()
                   and not str(Path(p).resolve()).startswith(assignments_dir)]
    import torch  # paid before the clock of any case starts
    torch.set_num_threads(1)
    cases = torch.load("inputs.pt", weights_only=True)
    load_module("grading_common", Path(checks_file).parent / "common.py")  # the checks import it by this name
    checks = load_module("grading_checks", Path(checks_file))
    getattr(checks, "warm_up", lambda: None)()  # what torch loads on first use, before any case's clock
    Path("results").mkdir()
    limit_memory(int(memory))
    # The checks and this file stay readable: torch reads the source of the frames on the stack.
    install_audit_hook(os.getcwd(), str(Path(assignments_dir) / "solutions"))
    student_file = Path(submission).name
    try:
        student = load_module(STUDENT_MODULE, Path(submission))
    except BaseException as err:  # SystemExit and KeyboardInterrupt too: the import failed
        print(f"could not import the file: {describe(err, student_file)}", file=sys.stderr)
        traceback.print_exc()
        return 3
    Path("imported").touch()
    for i, case in enumerate(cases):
        result = run_case(student, getattr(checks, case["probe"]), case["inputs"], student_file)
        torch.save(result, f"results/{i}.tmp")
        os.replace(f"results/{i}.tmp", f"results/{i}.pt")  # the grader never reads a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
