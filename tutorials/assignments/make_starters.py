"""Write the student files (assignmentN_*.py) from the solutions (solutions/assignmentN_*.py).

Every region from a `# BEGIN SOLUTION` line to its `# END SOLUTION` line becomes the single
line `raise NotImplementedError  # YOUR CODE HERE`, at the same indentation; everything else is
copied. Run it after editing a solution:  python tutorials/assignments/make_starters.py
tests/test_assignments.py checks that the committed student files are what this writes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from lora_min.fileio import atomic_write_text

HERE = Path(__file__).resolve().parent
SOLUTION = re.compile(r"^( *)# BEGIN SOLUTION\n.*?^ *# END SOLUTION\n", re.MULTILINE | re.DOTALL)


def starter_text(solution: str) -> str:
    return SOLUTION.sub(r"\1raise NotImplementedError  # YOUR CODE HERE\n", solution)


def main() -> int:
    for solution in sorted((HERE / "solutions").glob("assignment*.py")):
        text = solution.read_text(encoding="utf-8")
        if text.count("# BEGIN SOLUTION") != text.count("# END SOLUTION"):
            sys.exit(f"{solution}: unbalanced BEGIN/END SOLUTION markers")
        atomic_write_text(HERE / solution.name, starter_text(text))
        print(f"wrote {HERE.name}/{solution.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
