"""Write the student notebooks from their solutions: notebooks/solutions/NN_*.ipynb -> notebooks/NN_*.ipynb.

    python notebooks/make_student.py            # rewrite every student notebook that has a solution
    python notebooks/make_student.py --check    # exit 1 if a student notebook is out of date (a test runs this)

The solution notebook is the source. In its code cells, every block between a line ``# BEGIN SOLUTION`` and a
line ``# END SOLUTION`` becomes ``raise NotImplementedError(...)`` at the same indentation, and a check line
``assert check_...(...)`` loses its ``assert``: the ``tinyrefine.exercises`` checks report a stub that still
raises NotImplementedError as "not attempted yet" instead of failing, so a student notebook runs top to bottom
(CI executes both versions with nbmake). Everything else is copied unchanged.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"


def strip_solutions(source: str, where: str) -> str:
    out, skipping, count = [], False, 0
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN:
            if skipping:
                raise ValueError(f"{where}: nested {BEGIN}")
            skipping, count = True, count + 1
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError(\"exercise: replace this line\")\n")
        elif stripped == END:
            if not skipping:
                raise ValueError(f"{where}: {END} without {BEGIN}")
            skipping = False
        elif not skipping:
            out.append(re.sub(r"^assert (check_\w+\()", r"\1", line))
    if skipping:
        raise ValueError(f"{where}: {BEGIN} without {END}")
    return "".join(out)


def student_version(solution: dict, name: str) -> dict:
    notebook = json.loads(json.dumps(solution))
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            cell["source"] = strip_solutions(source, f"{name} cell {i}").splitlines(keepends=True)
    return notebook


def dumps(notebook: dict) -> str:
    """The repo's storage format: no outputs, sources as lists of lines, ASCII escapes, indent 1."""
    return json.dumps(notebook, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report student notebooks that are out of date")
    args = parser.parse_args()
    stale = []
    for path in sorted((HERE / "solutions").glob("*.ipynb")):
        text = dumps(student_version(json.loads(path.read_text()), path.name))
        target = HERE / path.name
        if not target.exists() or target.read_text() != text:
            stale.append(target.name)
            if not args.check:
                target.write_text(text)
    if args.check and stale:
        print("out of date (run python notebooks/make_student.py):", ", ".join(stale))
        return 1
    print(("up to date" if args.check else "written: " + (", ".join(stale) or "nothing changed")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
