"""The ``patchwidgets`` console command.

``patchwidgets grade NOTEBOOK`` runs a course notebook headless and reports, for each exercise,
whether it passed, failed (with the check's whole diagnosis), was not attempted (the stub still
raises ``NotImplementedError``), is missing (the notebook does not define it) or timed out, with
a total score. The notebook's own check cells are neither run nor read: the grader calls every
check itself, from its own process, on the learner's functions (see
:mod:`patchwidgets.grading.grader`). The notebook file is not modified.

Exit status: 0 when every exercise passed, 1 when one did not (0 with ``--score-only``, which
only reports the score), 2 when the notebook could not be graded at all (file not found, not a
notebook, not a course notebook, no kernel).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from .grading._notebook import exercises_in  # noqa: F401  (the course tests use it)
from .grading.grader import (  # noqa: F401  (re-exported: the grader's statuses and report)
    FAILED, MISSING, NOT_ATTEMPTED, NOT_RUN, PASSED, TIMED_OUT, ExerciseResult, GradeReport, grade_notebook)


def format_report(report: GradeReport) -> str:
    """The report as a table; a failure's message keeps all its lines, indented under it."""
    found = f", found by {report.found_by}" if report.found_by != "metadata" else ""
    lines = [f"Grading {report.notebook} as {report.course_notebook}{found} (ran in {report.seconds:.1f} s)", ""]
    width = max(len("exercise"), *(len(e.name) for e in report.exercises)) if report.exercises else 8
    lines.append(f"  {'#':>2}  {'exercise':<{width}}  status")
    indent = " " * (2 + 2 + 2 + width + 2 + 2)
    for k, e in enumerate(report.exercises, 1):
        detail = e.detail.splitlines() if e.status != PASSED else []
        status = e.status + (f": {detail[0]}" if detail else "")
        lines.append(f"  {k:>2}  {e.name:<{width}}  {status}")
        lines += [indent + line for line in detail[1:]]
    if report.other_errors:
        lines += ["", "Errors in the notebook's other cells:"] + [f"  {e}" for e in report.other_errors]
    if report.aborted:
        lines += ["", f"Grading stopped early: {report.aborted}"]
    counts = report.counts()
    rest = ", ".join(f"{counts[s]} {s}" for s in (FAILED, NOT_ATTEMPTED, MISSING, TIMED_OUT, NOT_RUN) if counts.get(s))
    lines += ["", f"Score: {report.passed}/{report.total} passed" + (f" ({rest})" if rest else "")]
    return "\n".join(lines)


def _grade_command(args: argparse.Namespace) -> int:
    path = Path(args.notebook)
    if not path.is_file():
        print(f"patchwidgets grade: no such notebook: {path}", file=sys.stderr)
        return 2
    try:
        report = grade_notebook(path, timeout=args.timeout, exercise_timeout=args.exercise_timeout,
                                kernel_name=args.kernel)
    except Exception as err:  # not a notebook, not a course notebook, no such kernel, ...
        print(f"patchwidgets grade: could not grade {path}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.json:
        data = asdict(report)
        data.update(passed=report.passed, total=report.total)
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if args.score_only or report.all_passed else 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="patchwidgets", description="patchwidgets command-line tools")
    parser.add_argument("--version", action="version", version=f"patchwidgets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    grade = sub.add_parser(
        "grade", help="run a course notebook headless and score its exercises",
        description="Run NOTEBOOK's cells in a kernel (errors do not stop the run; its check cells are "
                    "skipped), then call every exercise's check from this process and print, for each, "
                    "passed / failed / not attempted / missing / timed out, and a total score. "
                    "Exit status 0 when all passed, 1 when not, 2 when the notebook cannot be graded.")
    grade.add_argument("notebook", help="path to an .ipynb file, e.g. exercises/03_residual_stream.ipynb")
    grade.add_argument("--timeout", type=int, default=600, help="seconds one notebook cell may run (default 600)")
    grade.add_argument("--exercise-timeout", type=int, default=300,
                       help="seconds the learner's code may run within one exercise's check (default 300)")
    grade.add_argument("--score-only", action="store_true",
                       help="exit 0 whatever the score (only a notebook that cannot be graded exits 2)")
    grade.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's, or python3)")
    grade.add_argument("--json", action="store_true", help="print the report as JSON")
    grade.set_defaults(func=_grade_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
