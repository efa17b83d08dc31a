"""The ``patchwidgets`` console command.

``patchwidgets grade NOTEBOOK`` runs a course notebook from top to bottom without a browser
(nbclient; an error in one cell does not stop the run) and reports, for each exercise, whether
its self-check passed, failed, or was not attempted (the stub still raises
``NotImplementedError``), with a total score. The notebook file itself is not modified.

An exercise is found through its self-check cell: a cell that calls
``check_<exercise>(...)`` from :mod:`patchwidgets.grading`. A check that passes prints one line
starting with :data:`patchwidgets.grading.PASS_MARK`; anything else is read from the cell's
error output. Exercises listed for the notebook in :data:`patchwidgets.grading.EXERCISES`
whose self-check cell is missing are reported as missing.

Exit status: 0 when the notebook ran (whatever the score), 2 when it could not be run at all
(file not found, not a notebook, no kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

PASSED, FAILED, NOT_ATTEMPTED, MISSING, NOT_RUN = "passed", "failed", "not attempted", "missing", "not run"

_CHECK_CALL = re.compile(r"\bcheck_(\w+)\s*\(")


@dataclass
class ExerciseResult:
    name: str
    status: str
    detail: str = ""
    cell: int | None = None  # index of the self-check cell in the notebook


@dataclass
class GradeReport:
    notebook: str
    exercises: list[ExerciseResult]
    seconds: float
    other_errors: list[str] = field(default_factory=list)  # errors outside self-check cells
    aborted: str = ""  # why the run stopped early (a timeout, a dead kernel), if it did

    @property
    def passed(self) -> int:
        return sum(e.status == PASSED for e in self.exercises)

    @property
    def total(self) -> int:
        return len(self.exercises)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.exercises:
            out[e.status] = out.get(e.status, 0) + 1
        return out


def _code_without_comments(source: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def _cell_text(outputs: list) -> str:
    text = []
    for out in outputs:
        if out.get("output_type") == "stream":
            text.append(out.get("text", ""))
        elif out.get("output_type") in ("display_data", "execute_result"):
            text.append(out.get("data", {}).get("text/plain", ""))
    return "".join(text)


def _cell_error(outputs: list) -> tuple[str, str] | None:
    for out in outputs:
        if out.get("output_type") == "error":
            return out.get("ename", "Error"), out.get("evalue", "")
    return None


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def exercises_in(nb) -> list[tuple[int, str]]:
    """``(cell index, exercise name)`` for every self-check call in the notebook, in order."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for name in _CHECK_CALL.findall(_code_without_comments(cell.source)):
            found.append((i, name))
    return found


def grade_executed(nb, notebook_name: str = "", expected: Sequence[str] | None = None) -> GradeReport:
    """Read the statuses off a notebook that has already been executed."""
    from .grading import PASS_MARK

    results: list[ExerciseResult] = []
    seen = set()
    check_cells = set()
    for index, name in exercises_in(nb):
        check_cells.add(index)
        if name in seen:
            continue
        seen.add(name)
        cell = nb.cells[index]
        outputs = cell.get("outputs", [])
        text = _cell_text(outputs)
        error = _cell_error(outputs)
        if re.search(rf"^{re.escape(PASS_MARK)} {re.escape(name)}: passed", text, re.M):
            results.append(ExerciseResult(name, PASSED, cell=index))
        elif cell.get("execution_count") is None and not outputs:
            results.append(ExerciseResult(name, NOT_RUN, "the cell did not run", cell=index))
        elif error and error[0] == "NotImplementedError":
            results.append(ExerciseResult(name, NOT_ATTEMPTED, cell=index))
        elif error:
            results.append(ExerciseResult(name, FAILED, f"{error[0]}: {_first_line(error[1])}", cell=index))
        else:
            results.append(ExerciseResult(name, FAILED, "the self-check printed no result", cell=index))
    for name in expected or ():
        if name not in seen:
            results.append(ExerciseResult(name, MISSING, "its self-check cell is not in the notebook"))
    other = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and i not in check_cells:
            error = _cell_error(cell.get("outputs", []))
            if error and error[0] != "NotImplementedError":
                other.append(f"cell {i}: {error[0]}: {_first_line(error[1])}")
    return GradeReport(notebook_name, results, 0.0, other)


def grade_notebook(path: str | os.PathLike, timeout: int = 600, kernel_name: str | None = None) -> GradeReport:
    """Execute the notebook at ``path`` headless (errors do not stop it) and grade it."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from .grading import EXERCISES

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    kernel = kernel_name or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel, allow_errors=True, record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    aborted = ""
    start = time.perf_counter()
    try:
        # The kernel process's own stderr (start-up warnings) is not the notebook's output.
        client.execute(stderr=subprocess.DEVNULL)
    except CellTimeoutError as err:
        aborted = f"a cell ran longer than {timeout} s: {_first_line(str(err))}"
    except DeadKernelError as err:
        aborted = f"the kernel died: {_first_line(str(err))}"
    seconds = time.perf_counter() - start
    report = grade_executed(nb, str(path), EXERCISES.get(path.stem))
    report.seconds = seconds
    report.aborted = aborted
    return report


def format_report(report: GradeReport) -> str:
    lines = [f"Grading {report.notebook} (ran in {report.seconds:.1f} s)", ""]
    if report.exercises:
        width = max(len("exercise"), *(len(e.name) for e in report.exercises))
        lines.append(f"  {'#':>2}  {'exercise':<{width}}  status")
        for k, e in enumerate(report.exercises, 1):
            status = e.status + (f": {e.detail}" if e.detail and e.status != PASSED else "")
            lines.append(f"  {k:>2}  {e.name:<{width}}  {status}")
    else:
        lines.append("  no self-check cells found (cells calling check_...(...) from patchwidgets.grading)")
    if report.other_errors:
        lines += ["", "Errors outside the self-checks:"] + [f"  {e}" for e in report.other_errors]
    if report.aborted:
        lines += ["", f"The run stopped early: {report.aborted}"]
    counts = report.counts()
    rest = ", ".join(f"{counts[s]} {s}" for s in (FAILED, NOT_ATTEMPTED, MISSING, NOT_RUN) if counts.get(s))
    lines += ["", f"Score: {report.passed}/{report.total} passed" + (f" ({rest})" if rest else "")]
    return "\n".join(lines)


def _grade_command(args: argparse.Namespace) -> int:
    path = Path(args.notebook)
    if not path.is_file():
        print(f"patchwidgets grade: no such notebook: {path}", file=sys.stderr)
        return 2
    try:
        report = grade_notebook(path, timeout=args.timeout, kernel_name=args.kernel)
    except Exception as err:  # not a notebook, no such kernel, ...
        print(f"patchwidgets grade: could not run {path}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.json:
        data = asdict(report)
        data.update(passed=report.passed, total=report.total)
        print(json.dumps(data, indent=2))
    else:
        print(format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="patchwidgets", description="patchwidgets command-line tools")
    parser.add_argument("--version", action="version", version=f"patchwidgets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    grade = sub.add_parser(
        "grade", help="run a course notebook headless and score its exercises",
        description="Run NOTEBOOK from top to bottom (errors do not stop the run) and print, for "
                    "each exercise, passed / failed / not attempted, and a total score.")
    grade.add_argument("notebook", help="path to an .ipynb file, e.g. exercises/03_residual_stream.ipynb")
    grade.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default 600)")
    grade.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's, or python3)")
    grade.add_argument("--json", action="store_true", help="print the report as JSON")
    grade.set_defaults(func=_grade_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
