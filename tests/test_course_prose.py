"""Every number the course's prose quotes comes from the run.

nbval (``pytest --nbval solutions tutorials``) checks that each notebook's stored outputs are
what the code computes today. This test closes the chain: every decimal number written in a
markdown cell (answers, "expected output" tables, reading guides) must appear, at the prose's
precision, among that notebook's stored outputs, or as a constant in its code. A retrained
model or a changed default then fails here instead of leaving the prose quietly wrong.

Not checked: the "On GPT-2 small" and "References" cells (head names such as 9.9 and arXiv
numbers are facts from the literature, not results of the run), and text in backticks (code).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [*sorted((ROOT / "tutorials").glob("*.ipynb")), *sorted((ROOT / "solutions").glob("*.ipynb"))]
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?!\w)(?!\.\d)")
LITERATURE = ("## On GPT-2", "## References")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text)]


def quoted_numbers(nb) -> list[tuple[int, str]]:
    """(cell index, number as written) for every decimal number in the notebook's prose."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown" or cell.source.lstrip().startswith(LITERATURE):
            continue
        text = re.sub(r"`[^`]*`", "", cell.source)
        found += [(i, x) for x in NUMBER.findall(text)]
    return found


def computed_numbers(nb) -> list[float]:
    """Every number in the stored outputs (text and plain-text reprs), and the code's constants."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        texts.append(cell.source)
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            texts.append(str(out.get("data", {}).get("text/plain", "")))
    return _numbers("\n".join(texts))


def backed(written: str, values: list[float]) -> bool:
    decimals = len(written.split(".")[1])
    target = float(written)
    return any(abs(round(v, decimals) - target) < 1e-9 or abs(round(abs(v), decimals) - abs(target)) < 1e-9
               for v in values)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.name}" for p in NOTEBOOKS])
def test_every_number_in_the_prose_is_in_the_outputs(path):
    nb = nbformat.read(path, as_version=4)
    values = computed_numbers(nb)
    missing = [f"cell {i}: {x}" for i, x in quoted_numbers(nb) if not backed(x, values)]
    assert not missing, ("numbers in the prose that no stored output shows (print them from code, or "
                         "re-execute the notebook and update the prose): " + ", ".join(missing))


def test_the_check_catches_a_stale_number():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output("stream", text="restored 0.93\n")]),
        nbformat.v4.new_markdown_cell("It restores 0.93, and later 0.87."),
        nbformat.v4.new_markdown_cell("## On GPT-2 small\n\nHead 9.9 is a name mover."),
    ])
    values = computed_numbers(nb)
    assert [x for _, x in quoted_numbers(nb) if not backed(x, values)] == ["0.87"]


#: A KL measured from any run but the clean one, written as a definition (the mistakes the checks
#: name, such as "KL(patched || clean)", have the clean run second and are not matched).
OTHER_KL = re.compile(r"KL\((source|corrupted|target)[^|)]*\|\|")


def test_one_definition_of_kl_everywhere():
    """The course, the package and the README define KL one way: KL(clean || patched), the clean
    run the reference in both directions. (Notebook 05 and its check once used KL(source || patched),
    which differs from notebook 02's when noising.)"""
    texts = {str(p.relative_to(ROOT)): "\n".join(c.source for c in nbformat.read(p, as_version=4).cells)
             for d in ("solutions", "exercises", "tutorials") for p in sorted((ROOT / d).glob("*.ipynb"))}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "patchwidgets").rglob("*.py"))})
    texts["README.md"] = (ROOT / "README.md").read_text()
    found = [f"{where}: {m.group(0)}" for where, text in texts.items() for m in OTHER_KL.finditer(text)]
    assert not found, "KL defined from another run than the clean one: " + ", ".join(found)
    assert OTHER_KL.search("kl is KL(source || patched)") and not OTHER_KL.search("KL(patched || clean)")
    assert "KL(clean || patched)" in texts["solutions/02_metrics.ipynb"]
    assert "KL(clean || patched)" in texts["solutions/05_noising_denoising.ipynb"]
