"""The course notebooks: exercises in sync with solutions, and the shape every notebook must have.

Executing the notebooks is tested elsewhere: solutions and tutorials with nbval
(``pytest --nbval solutions tutorials --nbval-sanitize-with tests/nbval_sanitize.cfg``), and the
exercise notebooks as shipped through the grader in ``tests/test_grading.py``.
"""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

from patchwidgets import grading
from patchwidgets.cli import exercises_in

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
ALL = [*TUTORIALS, *SOLUTIONS, *EXERCISES]
MODEL_SWITCH = '# model = patchwidgets.load_model("gpt2")  # online'


def _load_script():
    spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "scripts" / "make_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_exercises = _load_script()


def _read(path):
    return nbformat.read(path, as_version=4)


def _ids(paths):
    return [f"{p.parent.name}/{p.name}" for p in paths]


# ------------------------------------------------------------------------------- in sync


def test_exercises_are_generated_from_solutions():
    problems = make_exercises.out_of_date()
    assert not problems, "\n".join(problems) + "\nrun: python scripts/make_exercises.py"


def test_every_solution_has_an_exercise_and_a_registry_entry():
    assert [p.name for p in SOLUTIONS] == [p.name for p in EXERCISES]
    assert {p.stem for p in SOLUTIONS} == set(grading.EXERCISES)
    assert (ROOT / "tutorials" / "01_quickstart.ipynb").exists()


# ------------------------------------------------------------------------------- the generator


def test_solution_block_becomes_stub_lines_and_raise():
    source = (
        "def f(x):\n"
        '    """Doc."""\n'
        "    # BEGIN SOLUTION\n"
        "    # EXERCISE: y = 0\n"
        "    # EXERCISE: for i in range(3):\n"
        "    # EXERCISE:     pass\n"
        "    y = x + 1\n"
        "    return y\n"
        "    # END SOLUTION\n"
        "\n"
        "print(f)"
    )
    assert make_exercises.strip_code(source) == (
        "def f(x):\n"
        '    """Doc."""\n'
        "    y = 0\n"
        "    for i in range(3):\n"
        "        pass\n"
        "    raise NotImplementedError()\n"
        "\n"
        "print(f)"
    )


def test_stub_that_raises_itself_gets_no_second_raise():
    source = "# BEGIN SOLUTION\n# EXERCISE: raise NotImplementedError('write me')\nx = 1\n# END SOLUTION"
    assert make_exercises.strip_code(source) == "raise NotImplementedError('write me')"


def test_code_without_markers_is_unchanged():
    source = "import torch\n\nx = torch.zeros(3)  # a comment\nx"
    assert make_exercises.strip_code(source) == source


@pytest.mark.parametrize("source", [
    "# BEGIN SOLUTION\nx = 1",
    "x = 1\n# END SOLUTION",
    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION",
    "# EXERCISE: x = 1",
])
def test_unbalanced_markers_are_errors(source):
    with pytest.raises(make_exercises.MarkerError):
        make_exercises.strip_code(source)


def test_markdown_markers():
    source = "# Title\n<!-- BEGIN SOLUTION -->\nsolution text\n<!-- END SOLUTION -->\n<!-- EXERCISE: exercise text -->\nend"
    assert make_exercises.strip_markdown(source) == "# Title\nexercise text\nend"


def test_make_exercise_clears_outputs_and_keeps_the_solution():
    code = nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", execution_count=3,
                                     outputs=[nbformat.v4.new_output("stream", text="hi")])
    nb = nbformat.v4.new_notebook(cells=[code])
    exercise = make_exercises.make_exercise(nb)
    assert exercise.cells[0].source == "raise NotImplementedError()"
    assert exercise.cells[0].outputs == [] and exercise.cells[0].execution_count is None
    assert nb.cells[0].source.startswith("# BEGIN SOLUTION") and nb.cells[0].outputs
    # the solution follows in a collapsed markdown cell, without the markers
    assert exercise.cells[1].cell_type == "markdown"
    assert exercise.cells[1].source == "<details><summary>Solution</summary>\n\n```python\nx = 1\n```\n</details>"


def test_solution_dropdown_goes_after_the_check_and_its_hints():
    cells = [
        nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"),
        nbformat.v4.new_code_cell("grading.check_f(f)"),
        nbformat.v4.new_markdown_cell("<details><summary>Hint</summary>\nthink\n</details>"),
        nbformat.v4.new_markdown_cell("## Next section"),
    ]
    exercise = make_exercises.make_exercise(nbformat.v4.new_notebook(cells=cells))
    kinds = [c.source.split("\n")[0] for c in exercise.cells]
    assert kinds == ["def f():", "grading.check_f(f)", "<details><summary>Hint</summary>",
                     "<details><summary>Solution</summary>", "## Next section"]
    assert "    return 1" in exercise.cells[3].source and "BEGIN" not in exercise.cells[3].source


def test_check_mode_reports_a_stale_exercise(tmp_path, monkeypatch):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 1\n# END SOLUTION")])
    nbformat.write(nb, tmp_path / "solutions" / "a.ipynb")
    monkeypatch.setattr(make_exercises, "SOLUTIONS", tmp_path / "solutions")
    monkeypatch.setattr(make_exercises, "EXERCISES", tmp_path / "exercises")
    assert make_exercises.main(["--check"]) == 1
    assert make_exercises.main([]) == 0
    assert make_exercises.main(["--check"]) == 0
    (tmp_path / "exercises" / "a.ipynb").write_text("{}")
    assert make_exercises.main(["--check"]) == 1
    (tmp_path / "exercises" / "orphan.ipynb").write_text("{}")
    assert "orphan" in " ".join(make_exercises.out_of_date())


# ------------------------------------------------------------------------------- every notebook


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_first_code_cell_switches_model_in_one_line(path):
    first = next(c for c in _read(path).cells if c.cell_type == "code")
    # 10_ioi_circuit studies the circuit of the deeper bundled checkpoint; every other notebook uses toy-ioi.
    model = "toy-ioi-deep" if path.stem == "10_ioi_circuit" else "toy-ioi"
    assert f'load_model("{model}")' in first.source
    assert MODEL_SWITCH in first.source


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_notebooks_are_small(path):
    assert path.stat().st_size < 400_000, f"{path.name} is {path.stat().st_size} bytes"


@pytest.mark.parametrize("path", [*TUTORIALS, *SOLUTIONS], ids=_ids([*TUTORIALS, *SOLUTIONS]))
def test_stored_outputs_are_complete_and_clean(path):
    nb = _read(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell {i} was not executed: run scripts/make_exercises.py --execute"
        for out in cell.outputs:
            assert out.output_type != "error", f"cell {i} stored an error"
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            assert "it/s]" not in text and "%|" not in text, f"cell {i} stored a progress bar"
            assert "text/html" not in out.get("data", {}) or "<script" not in out["data"]["text/html"] or \
                "plotly" not in out["data"]["text/html"], f"cell {i} embeds plotly.js"
    assert "widgets" not in nb.metadata, "widget state is stored in the notebook: it bloats the file"


@pytest.mark.parametrize("path", EXERCISES, ids=_ids(EXERCISES))
def test_exercise_notebooks_have_no_outputs_and_no_markers(path):
    nb = _read(path)
    text = "\n".join(c.source for c in nb.cells)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text and "# EXERCISE:" not in text
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", EXERCISES, ids=_ids(EXERCISES))
def test_exercise_notebook_structure(path):
    nb = _read(path)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Learning objectives" in markdown
    assert "<details>" in markdown and "<summary>" in markdown
    checks = [name for _, name in exercises_in(nb)]
    assert checks == grading.EXERCISES[path.stem], "self-check cells do not match grading.EXERCISES"
    for name in checks:
        assert callable(getattr(grading, f"check_{name}")), name
    # every exercise is a function stub followed, in the next code cell, by its self-check
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    for name in checks:
        k = next(i for i, src in enumerate(code) if re.search(rf"\bcheck_{name}\(", src))
        assert "raise NotImplementedError()" in code[k - 1], f"the cell before check_{name} has no stub"
        assert re.search(rf"\bdef {name}\(", code[k - 1]), f"the cell before check_{name} does not define {name}"


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_no_placeholders_left(path):
    text = "\n".join(c.source for c in _read(path).cells)
    assert not re.search(r"\{\{[A-Z_]+\}\}", text), "an unfilled {{PLACEHOLDER}}"


def test_solutions_and_exercises_share_text():
    # Markdown is the same in both versions except for the solution-only header lines.
    for sol, ex in zip(SOLUTIONS, EXERCISES):
        s = [c for c in _read(sol).cells if c.cell_type == "markdown"]
        e = [c for c in _read(ex).cells if c.cell_type == "markdown"
             and not c.source.startswith(make_exercises.SOLUTION_SUMMARY)]
        assert len(s) == len(e)
        assert sum(a.source != b.source for a, b in zip(s, e)) <= 1


MACHINE_TEXT = re.compile(r"'(prefix_skipped|resumed|forward_passes|skipped_noop|logits_shortcut)'|(?<![\d.])-0\.0+(?![\d.]*[1-9])")


@pytest.mark.parametrize("path", sorted([*ROOT.glob("solutions/*.ipynb"), *ROOT.glob("tutorials/*.ipynb")]),
                         ids=lambda p: p.name)
def test_stored_outputs_hold_no_machine_dependent_text(path):
    """Engine counters (which depend on the CPU and installed versions) and negative zeros are
    never stored, not even in cells nbval ignores: a reader of the saved notebook sees them."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join("".join(v) for k, v in out.get("data", {}).items()
                                                          if k.startswith("text/"))
            found = MACHINE_TEXT.search(text)
            assert found is None, f"{path.name} cell {i}: {found.group(0)!r} in a stored output"
