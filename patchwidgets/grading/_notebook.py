"""Which course notebook a file is, which exercises it holds, and which cells are self-checks.

``scripts/make_exercises.py`` writes this into every exercise notebook it generates:

* notebook metadata ``{"patchwidgets": {"notebook": "03_residual_stream", "exercises": [...]}}``;
* on each exercise cell ``{"patchwidgets": {"exercise": "patch_position", "check": "check_patch_position"}}``;
* on each self-check cell ``{"patchwidgets": {"self_check": "patch_position"}}``.

So a learner's copy is recognised whatever its file name, and an exercise whose cell or check
cell was deleted is still listed (as missing). The list of exercises the grader expects comes
from :data:`patchwidgets.grading.EXERCISES` for the notebook named in the metadata; when the
metadata is gone, from the exercise cells' metadata, and last from the file name.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._common import EXERCISES

META = "patchwidgets"
_CHECK_CALL = re.compile(r"\bcheck_(\w+)\s*\(")


@dataclass
class CourseNotebook:
    notebook_id: str  # "" when the notebook is not recognised
    exercises: list[str]
    found_by: str  # "metadata", "cell metadata", "file name" or ""
    exercise_cells: dict[str, int] = field(default_factory=dict)  # where each exercise is defined


def identify(nb, path: str | Path = "") -> CourseNotebook:
    """The course notebook ``nb`` is a copy of (see the module docstring)."""
    notebook_id = str(nb.metadata.get(META, {}).get("notebook", ""))
    tagged = [(i, str(c.metadata[META]["exercise"])) for i, c in enumerate(nb.cells)
              if isinstance(c.metadata.get(META), dict) and "exercise" in c.metadata[META]]
    if notebook_id in EXERCISES:
        course = CourseNotebook(notebook_id, list(EXERCISES[notebook_id]), "metadata")
    elif any(name in EXERCISES[nid] for _, name in tagged for nid in EXERCISES):
        notebook_id = next(nid for _, name in tagged for nid in EXERCISES if name in EXERCISES[nid])
        course = CourseNotebook(notebook_id, list(EXERCISES[notebook_id]), "cell metadata")
    elif Path(path).stem in EXERCISES:
        notebook_id = Path(path).stem
        course = CourseNotebook(notebook_id, list(EXERCISES[notebook_id]), "file name")
    else:
        return CourseNotebook("", [], "")
    for i, name in tagged:
        course.exercise_cells.setdefault(name, i)
    for name in course.exercises:  # untagged copies: the cell that defines the function
        if name not in course.exercise_cells:
            for i, cell in enumerate(nb.cells):
                if cell.cell_type == "code" and re.search(rf"^\s*def {re.escape(name)}\(", cell.source, re.M):
                    course.exercise_cells[name] = i
                    break
    return course


def is_self_check(source: str) -> bool:
    """Whether a cell does nothing but call ``check_...(...)`` functions.

    The grader skips such cells: it calls every check itself. Any other cell runs, whatever it
    contains (a cell that prints a pass line or replaces a check runs too, and changes nothing:
    the grader neither reads the notebook's output nor uses its checks).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    if not tree.body:
        return False
    for statement in tree.body:
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not isinstance(call, ast.Call):
            return False
        func = call.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if not called.startswith("check_"):
            return False
    return True


def _code_without_comments(source: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def exercises_in(nb) -> list[tuple[int, str]]:
    """``(cell index, exercise name)`` for every self-check call in the notebook, in order."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for name in _CHECK_CALL.findall(_code_without_comments(cell.source)):
            found.append((i, name))
    return found
