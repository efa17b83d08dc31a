"""The course runs on a GPT-2-shaped model with GPT-2's own tokenizer, not only on toy-ioi.

Every notebook's first code cell loads ``toy-ioi``; a learner changes that one line to load
``"gpt2"``. GPT-2 cannot be downloaded here, so this test does the next best thing: it builds
a **random-weight GPT-2** (``GPT2LMHeadModel``) with GPT-2 small's 12 heads per layer and its
50,257-token vocabulary (but 6 layers and a small ``d_model``, to stay fast) and **GPT-2's own
tokenizer** (``patchwidgets.gpt2_tokenizer``: the real vocabulary and merges, shipped with the
package). Names are single tokens and landmarks several (" Colosseum" is four), as the notebooks
say; ``test_the_notebooks_claims_about_gpt2_tokens`` reads those claims from the notebooks'
prose and checks each one on the tokenizer.

Each notebook then runs top to bottom in a kernel, its model line pointed at that model
folder, and must execute without an error. This catches hard-coded positions and heads, answers
or landmarks that are several tokens long, and ``.numpy()`` on tensors that are not on the CPU
(the model runs on the CPU here; the notebooks call ``.cpu()`` first so that they run on a GPU
too). What is left out, and why:

* the ``grading.check_*`` cells: they run the learner's function on their own toy-ioi setup,
  whatever the notebook's model is, and are tested in ``tests/test_grading.py``;
* the refusal to normalise by a degenerate gap (``patchwidgets.metrics.check_normalization``)
  is switched off in the kernel: on random weights the clean and corrupted runs hardly differ,
  so refusing would be right, and would stop the run this test is about.

The numbers a random model produces mean nothing; only that every cell runs is checked.

Not run here: the code of a section that loads ``toy-ioi-deep`` itself (05's section 6 measures
that checkpoint's heads, whatever model the rest of the notebook uses), and ``10_ioi_circuit``. It loads ``toy-ioi-deep`` and is a case study of one trained
circuit: it picks the heads it studies by the thresholds of Wang et al.'s definitions (a direct
effect of 5% of the logit difference, copy scores, attention to a role), and a random-weight
model has no head that meets them, so the cells after the selection would study empty lists.
Its model line still switches to ``"gpt2"`` (in GPT-2 small Wang et al. found heads of every class);
its code reads positions from the tokens (``ioi_circuit.roles``) and sizes from ``model.cfg``,
and its checks run on toy-ioi-deep whatever the notebook loads (tests/test_grading_circuit.py).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE_STUDIES = {"10_ioi_circuit"}  # one trained checkpoint's circuit (module docstring)
NOTEBOOKS = [p for p in [*sorted((ROOT / "tutorials").glob("*.ipynb")), *sorted((ROOT / "solutions").glob("*.ipynb"))]
             if p.stem not in CASE_STUDIES]
MODEL_LINE = 'patchwidgets.load_model("toy-ioi")'
DEEP_LINE = 'load_model("toy-ioi-deep")'  # a section that loads it studies that checkpoint (docstring)
CHECK_CALL = re.compile(r"\bgrading\.check_\w+\s*\(")
# GPT-2 small has 12 heads in each of 12 layers; 6 layers keep the whole run near three minutes on
# one CPU thread and still put heads and layers where toy-ioi (4 layers x 8 heads) has none.
GPT2_SMALL_SHAPE = {"n_layer": 6, "n_head": 12}
SMALL = {"n_embd": 96, "n_positions": 64}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}


def build_gpt2_like(folder: Path) -> Path:
    """A random-weight GPT2LMHeadModel with GPT-2's tokenizer, saved as an HF checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from patchwidgets.gpt2_tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(model_max_length=SMALL["n_positions"])
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=SMALL["n_positions"], n_embd=SMALL["n_embd"],
                        initializer_range=0.1, **GPT2_SMALL_SHAPE)  # bos/eos: 50256, as GPT-2's
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory) -> Path:
    return build_gpt2_like(tmp_path_factory.mktemp("gpt2-like"))


def test_the_saved_tokenizer_is_gpt2s(gpt2_like):
    """What the notebooks load from the folder is GPT-2's tokenizer (ids checked against OpenAI's
    algorithm in tests/test_gpt2_tokenizer.py), with the names single tokens as in GPT-2."""
    from transformers import AutoTokenizer

    from patchwidgets import datasets

    tokenizer = AutoTokenizer.from_pretrained(gpt2_like)
    assert tokenizer("When Mary and John")["input_ids"] == [2215, 5335, 290, 1757]
    assert all(len(tokenizer(" " + name)["input_ids"]) == 1 for name in datasets.NAMES)


def _prose(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


#: Claims about how GPT-2 tokenizes a word: '" Colosseum" is four tokens', 'GPT-2's four " Colosseum" tokens'.
TOKEN_CLAIMS = [re.compile(r'"( [^"]+)" is (\w+) tokens?'), re.compile(r"GPT-2's (\w+) \"( [^\"]+)\" tokens")]


def test_the_notebooks_claims_about_gpt2_tokens():
    """Every "<word> is N tokens" in the course's prose holds for GPT-2's tokenizer, and so do the
    general claims (GPT-2 splits most landmarks; the names are single tokens)."""
    from patchwidgets import datasets
    from patchwidgets.gpt2_tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    n_tokens = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    claims = []
    for path in NOTEBOOKS:
        text = _prose(path)
        claims += [(path.name, word, count) for word, count in TOKEN_CLAIMS[0].findall(text)]
        claims += [(path.name, word, count) for count, word in TOKEN_CLAIMS[1].findall(text)]
    assert claims, "no claim about GPT-2's tokens found: the patterns no longer match the prose"
    for where, word, count in claims:
        assert n_tokens(word) == NUMBERS.get(count, count), f"{where}: {word!r} is not {count} tokens in GPT-2"
    six = _prose(ROOT / "solutions" / "06_corrupted_prompts.ipynb")
    assert "GPT-2 splits most of them" in six and "In GPT-2 most landmarks are several tokens long" in six
    landmarks = [n_tokens(" " + landmark) for landmark, _ in datasets.FACTS]
    assert sum(n > 1 for n in landmarks) > len(landmarks) / 2
    assert all(n_tokens(" " + name) == 1 for name in datasets.NAMES)


def pointed_at(nb, model_dir: Path):
    """A copy of ``nb`` that loads ``model_dir``, without check cells, without the code of sections
    that study toy-ioi-deep, and without the gap refusal."""
    nb = nbformat.from_dict(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert MODEL_LINE in code[0].source, "the first code cell must load toy-ioi in one line"
    code[0].source = code[0].source.replace(MODEL_LINE, f'patchwidgets.load_model({str(model_dir)!r}, device="cpu")')
    prelude = ('import os\nos.environ["HF_HUB_OFFLINE"] = "1"\nimport patchwidgets.metrics\n'
               "patchwidgets.metrics.check_normalization = lambda *args, **kwargs: None  # random weights: no gap")
    cells = [nbformat.v4.new_code_cell(prelude)]
    for section in _sections(nb.cells):
        case_study = any(c.cell_type == "code" and DEEP_LINE in c.source for c in section)
        cells += [c for c in section if c.cell_type == "markdown"
                  or not (case_study or CHECK_CALL.search(c.source))]
    nb.cells = cells
    return nb


def _sections(cells):
    """The cells split at each ``## `` heading (a heading starts its section)."""
    sections: list[list] = [[]]
    for cell in cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            sections.append([])
        sections[-1].append(cell)
    return sections


def test_only_the_deep_case_study_section_is_left_out():
    """The sections left out of the GPT-2-shaped run are exactly 05's section 6: a notebook that
    loads toy-ioi-deep anywhere else would otherwise lose that section's code without a word."""
    left_out = []
    for path in NOTEBOOKS:
        for section in _sections(nbformat.read(path, as_version=4).cells):
            if any(c.cell_type == "code" and DEEP_LINE in c.source for c in section):
                left_out.append((path.stem, section[0].source.splitlines()[0]))
    assert left_out == [("05_noising_denoising", "## 6. Compensation in a trained model: toy-ioi-deep")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.name}" for p in NOTEBOOKS])
def test_notebook_runs_on_a_gpt2_shaped_model(path, gpt2_like):
    from nbclient import NotebookClient

    nb = pointed_at(nbformat.read(path, as_version=4), gpt2_like)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"{path.name} took {elapsed:.0f} s on the GPT-2-shaped model (threads: {env_threads})"
