"""Generate ``exercises/`` from ``solutions/``: one source, two notebooks.

Solution notebooks are the only ones written by hand. Inside them, markers say what the
learner's copy leaves out (the same idea as nbgrader's and ARENA's solution blocks):

Code cells::

    def get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric):
        \"\"\"The docstring stays.\"\"\"
        # BEGIN SOLUTION
        # EXERCISE: results = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        ...solution code...
        # END SOLUTION

becomes, in the exercise notebook::

    def get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric):
        \"\"\"The docstring stays.\"\"\"
        results = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        raise NotImplementedError()

Every ``# EXERCISE: `` line inside a block becomes that line of code (at the marker's
indentation plus whatever follows the marker), and ``raise NotImplementedError()`` is added
at the block's indentation unless one of those lines already raises.

Markdown cells: ``<!-- BEGIN SOLUTION -->`` ... ``<!-- END SOLUTION -->`` is dropped, and a
line ``<!-- EXERCISE: text -->`` becomes ``text``.

Each code cell that had a solution block is followed, in the exercise notebook, by a generated
markdown cell holding the solution in a collapsed ``<details>`` block.

Metadata for the grader (``patchwidgets grade``, see ``patchwidgets/grading/_notebook.py``):
the notebook gets ``{"patchwidgets": {"notebook": <file stem>, "exercises": [...]}}``, each
exercise cell (a solution-block cell followed by a ``check_<name>(...)`` cell)
``{"patchwidgets": {"exercise": <name>, "check": "check_<name>"}}`` and each such check cell
``{"patchwidgets": {"self_check": <name>}}``. With it the grader recognises a learner's copy
under any file name and lists every exercise, even one whose cells were deleted.

Exercise notebooks are stored without outputs or execution counts; solution notebooks keep
the outputs from their last run.

Usage (from the repository root)::

    python scripts/make_exercises.py            # write exercises/*.ipynb
    python scripts/make_exercises.py --check    # exit 1 if exercises/ is out of date
    python scripts/make_exercises.py --execute  # first re-run solutions/ and tutorials/ in place
                                                # (stores fresh outputs), then write exercises/
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
TUTORIALS = ROOT / "tutorials"

BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
STUB = re.compile(r"^\s*# EXERCISE: ?(.*)$")
MD_BEGIN = re.compile(r"^\s*<!-- BEGIN SOLUTION -->\s*$")
MD_END = re.compile(r"^\s*<!-- END SOLUTION -->\s*$")
MD_STUB = re.compile(r"^(\s*)<!-- EXERCISE: (.*?) -->\s*$")
SOLUTION_SUMMARY = "<details><summary>Solution</summary>"
HINT_SUMMARY = "<details><summary>Hint"
CHECK_CALL = re.compile(r"\bcheck_(\w+)\s*\(")
META = "patchwidgets"


class MarkerError(ValueError):
    """Unbalanced or misplaced solution markers."""


def strip_code(source: str, where: str = "") -> str:
    """The exercise version of one code cell's source."""
    out: list[str] = []
    indent: str | None = None
    stubs: list[str] = []
    for number, line in enumerate(source.split("\n"), 1):
        begin = BEGIN.match(line)
        if begin:
            if indent is not None:
                raise MarkerError(f"{where} line {number}: BEGIN SOLUTION inside another solution block")
            indent, stubs = begin.group(1), []
            continue
        if END.match(line):
            if indent is None:
                raise MarkerError(f"{where} line {number}: END SOLUTION without BEGIN SOLUTION")
            out.extend(indent + s for s in stubs)
            if not any(re.match(r"\s*raise\b", s) for s in stubs):
                out.append(indent + "raise NotImplementedError()")
            indent = None
            continue
        if indent is not None:
            stub = STUB.match(line)
            if stub:
                # Keep any indentation between the marker's and the comment's own.
                extra = line[len(indent):len(line) - len(line.lstrip())] if line.startswith(indent) else ""
                stubs.append(extra + stub.group(1))
            continue
        if STUB.match(line):
            raise MarkerError(f"{where} line {number}: '# EXERCISE:' outside a solution block")
        out.append(line)
    if indent is not None:
        raise MarkerError(f"{where}: BEGIN SOLUTION without END SOLUTION")
    return "\n".join(out)


def strip_markdown(source: str, where: str = "") -> str:
    """The exercise version of one markdown cell's source."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.split("\n"), 1):
        if MD_BEGIN.match(line):
            if inside:
                raise MarkerError(f"{where} line {number}: nested BEGIN SOLUTION")
            inside = True
            continue
        if MD_END.match(line):
            if not inside:
                raise MarkerError(f"{where} line {number}: END SOLUTION without BEGIN SOLUTION")
            inside = False
            continue
        if inside:
            continue
        stub = MD_STUB.match(line)
        out.append(stub.group(1) + stub.group(2) if stub else line)
    if inside:
        raise MarkerError(f"{where}: BEGIN SOLUTION without END SOLUTION")
    return "\n".join(out)


def solution_code(source: str) -> str:
    """A code cell's source as the solution reads, without the marker lines."""
    return "\n".join(line for line in source.split("\n")
                     if not (BEGIN.match(line) or END.match(line) or STUB.match(line)))


def solution_dropdown(source: str, cell_id: str) -> nbformat.NotebookNode:
    """The collapsed "Solution" markdown cell that follows an exercise cell."""
    cell = nbformat.v4.new_markdown_cell(
        f"{SOLUTION_SUMMARY}\n\n```python\n{solution_code(source)}\n```\n</details>")
    cell.id = f"{cell_id}-solution"[:64]
    return cell


def make_exercise(solution: nbformat.NotebookNode, name: str = "") -> nbformat.NotebookNode:
    """The exercise notebook for one solution notebook (a new object; the input is unchanged).

    Each exercise cell gets a collapsed "Solution" cell, so the exercise notebook works on its
    own (Colab, a single download). It goes after the exercise's self-check cell and the
    hints that follow it, so the hints come first.
    """
    nb = copy.deepcopy(solution)
    out = []
    pending = None  # the solution cell waiting to be placed
    state = ""
    exercise_cell = None  # the exercise cell whose check cell comes next
    exercises = []
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        if cell.cell_type == "code":
            original = cell.source
            cell.source = strip_code(original, where)
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown":
            original = cell.source
            cell.source = strip_markdown(cell.source, where)
        if pending is not None:
            if state == "check" and cell.cell_type == "code" and CHECK_CALL.search(cell.source):
                _tag_exercise(exercise_cell, cell, CHECK_CALL.search(cell.source).group(1), exercises)
                out.append(cell)
                state = "hints"
                continue
            if state == "hints" and cell.cell_type == "markdown" and cell.source.lstrip().startswith(HINT_SUMMARY):
                out.append(cell)
                continue
            out.append(pending)
            pending = None
        out.append(cell)
        if cell.cell_type == "code" and cell.source != original:
            pending, state = solution_dropdown(original, cell.get("id") or f"cell{i}"), "check"
            exercise_cell = cell
    if pending is not None:
        out.append(pending)
    nb.cells = out
    if name or exercises:
        nb.metadata[META] = {**({"notebook": Path(name).stem} if name else {}), "exercises": exercises}
    return nb


def _tag_exercise(exercise_cell, check_cell, exercise: str, exercises: list) -> None:
    """Name the exercise on its cell and on its check cell, if the cell defines it."""
    if not re.search(rf"^\s*def {re.escape(exercise)}\(", exercise_cell.source, re.M):
        return
    exercise_cell.metadata[META] = {"exercise": exercise, "check": f"check_{exercise}"}
    check_cell.metadata[META] = {"self_check": exercise}
    exercises.append(exercise)


def exercise_text(solution_path: Path) -> str:
    """What ``exercises/<name>.ipynb`` must contain for ``solutions/<name>.ipynb``."""
    solution = nbformat.read(solution_path, as_version=4)
    return nbformat.writes(make_exercise(solution, solution_path.name)) + "\n"


def solution_paths() -> list[Path]:
    return sorted(SOLUTIONS.glob("*.ipynb"))


def out_of_date() -> list[str]:
    """Problems that ``--check`` reports: stale, missing or orphaned exercise notebooks."""
    problems = []
    wanted = {p.name for p in solution_paths()}
    for path in solution_paths():
        target = EXERCISES / path.name
        if not target.exists():
            problems.append(f"exercises/{path.name} is missing")
        elif target.read_text(encoding="utf-8") != exercise_text(path):
            problems.append(f"exercises/{path.name} differs from what solutions/{path.name} generates")
    for path in sorted(EXERCISES.glob("*.ipynb")):
        if path.name not in wanted:
            problems.append(f"exercises/{path.name} has no solutions/{path.name}")
    return problems


#: Cell tag of outputs that depend on the machine or on dependency versions (not stored).
MACHINE_DEPENDENT = "machine-dependent"


def execute_in_place(path: Path, timeout: int = 600) -> None:
    """Run a notebook top to bottom and store its outputs (stops at the first error)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata.pop("execution", None)
            # Engine counters and the like: shown when the notebook runs, never stored, since
            # they depend on the machine and the installed versions.
            if MACHINE_DEPENDENT in cell.metadata.get("tags", []):
                cell.outputs = []
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that exercises/ is up to date")
    parser.add_argument("--execute", action="store_true",
                        help="re-run solutions/ and tutorials/ in place before generating exercises/")
    parser.add_argument("names", nargs="*", help="only these notebooks (file names or stems)")
    args = parser.parse_args(argv)

    if args.check:
        problems = out_of_date()
        for p in problems:
            print(p)
        if problems:
            print("run: python scripts/make_exercises.py")
        return 1 if problems else 0

    def selected(paths):
        if not args.names:
            return list(paths)
        keep = {n.removesuffix(".ipynb") for n in args.names}
        return [p for p in paths if p.stem in keep]

    if args.execute:
        os.environ.setdefault("TQDM_DISABLE", "1")
        for path in selected([*solution_paths(), *sorted(TUTORIALS.glob("*.ipynb"))]):
            print(f"executing {path.relative_to(ROOT)}", flush=True)
            execute_in_place(path)

    EXERCISES.mkdir(exist_ok=True)
    for path in selected(solution_paths()):
        target = EXERCISES / path.name
        text = exercise_text(path)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote exercises/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
