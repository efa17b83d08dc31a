"""Grade a course notebook without trusting anything it does.

A notebook's own check cells prove nothing to a grader: the notebook can print the pass line
itself, replace ``grading.check_...`` or ``_common.compare`` with something that always
agrees, or define its own ``check_...``. So the grader keeps two processes apart:

1. **The learner's kernel** runs the notebook's cells top to bottom, skipping the cells that
   only call ``check_...(...)``. Nothing it prints is read. A cell that runs past ``timeout``
   is interrupted and the next one runs.
2. **The grader's own process** (the one that imported this module) then, for each exercise
   the notebook should have (:mod:`._notebook`), takes the check from
   :data:`patchwidgets.grading.CHECKS` (captured when it imported the package, before any of
   the learner's code ran) and calls it with a :class:`._remote.RemoteFunction`: each call of
   the "learner's function" runs in the kernel, on the grader's arguments, and only the
   answer comes back, as data (:mod:`._wire`). The check, the reference answers and the
   comparison all run here, where the learner's code never does.

Each exercise has ``exercise_timeout`` seconds of the learner's code; past it the kernel is
interrupted (restarted, and the notebook run again, if it does not respond), the exercise is
marked "timed out" and grading goes on. A kernel that dies is restarted the same way.

This is not a sandbox: the notebook runs as the user who grades it and could rewrite files
on disk, including the installed package. The grader imports every module its checks use and
loads the bundled model *before* the kernel starts, so rewritten files are not read; for
untrusted submissions, grade inside a container.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._common import PASS_MARK, GradingError, sweep_setup
from ._kernel import CellTimeout, KernelDied, KernelSession
from ._notebook import identify, is_self_check
from ._remote import Channel, ExerciseTimeout, RemoteFunction
from ._wire import WireError

PASSED, FAILED, NOT_ATTEMPTED, MISSING, TIMED_OUT, NOT_RUN = (
    "passed", "failed", "not attempted", "missing", "timed out", "not run")


class NotACourseNotebook(ValueError):
    """Neither the notebook's metadata nor its file name names a course notebook."""


@dataclass
class ExerciseResult:
    name: str
    status: str
    detail: str = ""  # the check's whole message, every line of it
    cell: int | None = None  # the cell that defines the exercise, when there is one
    seconds: float = 0.0


@dataclass
class GradeReport:
    notebook: str
    course_notebook: str  # which course notebook it is (e.g. "03_residual_stream")
    found_by: str  # how that was decided: "metadata", "cell metadata" or "file name"
    exercises: list[ExerciseResult]
    seconds: float
    other_errors: list[str] = field(default_factory=list)  # errors in the learner's other cells
    aborted: str = ""  # why grading stopped early, if it did

    @property
    def passed(self) -> int:
        return sum(e.status == PASSED for e in self.exercises)

    @property
    def total(self) -> int:
        return len(self.exercises)

    @property
    def all_passed(self) -> bool:
        return self.passed == self.total and not self.aborted

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.exercises:
            out[e.status] = out.get(e.status, 0) + 1
        return out


def _prepare() -> None:
    """Import what the checks import lazily and build the shared setup, before the learner's
    code runs (see the module docstring)."""
    from .. import attribution, datasets, loading, metrics, patching, path_patching  # noqa: F401
    from . import CHECKS  # noqa: F401

    sweep_setup()


def grade_notebook(path: str | os.PathLike, timeout: int = 600, exercise_timeout: int = 300,
                   kernel_name: str | None = None) -> GradeReport:
    """Run the notebook at ``path`` in a kernel and grade each exercise from this process.

    ``timeout`` limits each of the notebook's cells, ``exercise_timeout`` the learner's code
    within one exercise's check. The file is not modified.
    """
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    course = identify(nb, path)
    if not course.notebook_id:
        raise NotACourseNotebook(
            f"{path} is not a course notebook: no patchwidgets metadata, and its file name is none of "
            "the course's (02_metrics, 03_residual_stream, ...)")
    _prepare()
    cells = [(i, c.source) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and c.source.strip() and not is_self_check(c.source)]
    kernel_name = kernel_name or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    start = time.perf_counter()
    results: list[ExerciseResult] = []
    aborted = ""
    with tempfile.TemporaryDirectory(prefix="patchwidgets-grade-") as scratch, \
            KernelSession(kernel_name, cwd=str(path.parent.resolve())) as kernel:
        other_errors = _run_cells(kernel, cells, timeout)
        channel = Channel(kernel, scratch)
        for name in course.exercises:
            if aborted:
                results.append(ExerciseResult(name, NOT_RUN, aborted, course.exercise_cells.get(name)))
                continue
            result, kernel_state = _grade_exercise(channel, name, exercise_timeout)
            result.cell = course.exercise_cells.get(name)
            results.append(result)
            if kernel_state != "ok":
                aborted = _recover(kernel, cells, timeout, kernel_state)
    return GradeReport(str(path), course.notebook_id, course.found_by, results,
                       time.perf_counter() - start, other_errors, aborted)


def _run_cells(kernel: KernelSession, cells: list[tuple[int, str]], timeout: int) -> list[str]:
    """Run the learner's cells; return the errors other than a stub's NotImplementedError.

    A cell that runs past ``timeout`` is removed from ``cells``, so that a kernel restarted
    later (see :func:`_recover`) does not wait for it a second time.
    """
    errors = []
    for index, source in list(cells):
        try:
            reply = kernel.run(source, timeout)
        except CellTimeout:
            errors.append(f"cell {index}: ran longer than {timeout} s and was interrupted")
            cells.remove((index, source))
            if not kernel.responsive():
                kernel.restart()
                errors.append(f"cell {index}: the kernel did not respond after the interrupt and was restarted")
            continue
        except KernelDied:
            errors.append(f"cell {index}: the kernel died; restarted it for the next cells")
            kernel.restart()
            continue
        if reply.status == "error" and reply.ename != "NotImplementedError":
            errors.append(f"cell {index}: {reply.ename}: {reply.evalue}")
    return errors


def _grade_exercise(channel: Channel, name: str, exercise_timeout: int) -> tuple[ExerciseResult, str]:
    """One exercise's result, and the kernel's state afterwards: "ok", "interrupted" or "dead"."""
    from . import CHECKS

    channel.deadline = time.monotonic() + exercise_timeout
    start = time.perf_counter()

    def result(status: str, detail: str = "") -> ExerciseResult:
        return ExerciseResult(name, status, detail, seconds=round(time.perf_counter() - start, 2))

    try:
        kind, value, globals_read = channel.describe(name)
        if kind == "missing":
            return result(MISSING, f"the notebook does not define {name}"), "ok"
        target = RemoteFunction(channel, name, globals_read) if kind == "callable" else value
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), torch.no_grad():
            CHECKS[name](target)
        line = printed.getvalue().strip().splitlines()[-1] if printed.getvalue().strip() else ""
        return result(PASSED, line.removeprefix(PASS_MARK).strip()), "ok"
    except NotImplementedError:
        return result(NOT_ATTEMPTED, f"{name} still raises NotImplementedError"), "ok"
    except GradingError as err:
        return result(FAILED, str(err)), "ok"
    except ExerciseTimeout:
        return result(TIMED_OUT, f"the learner's code ran longer than {exercise_timeout} s in this "
                                 "exercise's check and was interrupted"), "interrupted"
    except KernelDied:
        return result(FAILED, f"the kernel died while {name} ran (did it call exit(), or run out of memory?)"), "dead"
    except WireError as err:
        return result(FAILED, f"the grader could not get an answer from the notebook's kernel: {err}"), "ok"
    except Exception as err:  # a check that broke on an answer it did not foresee
        return result(FAILED, f"the check could not judge the answer: {type(err).__name__}: {err}"), "ok"


def _recover(kernel: KernelSession, cells: list[tuple[int, str]], timeout: int, state: str) -> str:
    """Bring the kernel back after a timeout or a death; "" on success, else why grading stops."""
    if state == "interrupted" and kernel.responsive():
        return ""
    try:
        kernel.restart()
        _run_cells(kernel, cells, timeout)
    except Exception as err:  # pragma: no cover - a kernel that cannot even restart
        return f"the kernel could not be restarted: {type(err).__name__}: {err}"
    return ""
