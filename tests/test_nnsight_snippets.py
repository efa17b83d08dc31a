"""Every documented snippet that builds an nnsight model runs, and gives the bridge's numbers.

The snippets are read from README.md and from the course notebooks (``solutions/``,
``tutorials/``, ``exercises/``): every fenced ``python`` block of the README, and every
notebook's code cells up to its last one, that builds an nnsight model (``LanguageModel(`` or
``backend="nnsight"``). Each one is made runnable offline, then run as written in a fresh
Python process:

* the model name of every model-building call (``LanguageModel``, ``TransformersModel``,
  ``load_model``) becomes the bundled toy-ioi folder: the Hub cannot be reached here, and the
  folder is what a user's local checkpoint or a Hub download looks like;
* ``remote=True`` is removed from every sweep (NDIF cannot be reached either). Where a snippet
  says it runs on NDIF, the test first requires every sweep in it to pass ``remote=True``:
  ``tests/test_nnsight.py`` checks that the flag reaches every trace.

The process records each ``pw.patch`` / ``pw.attribution_patch`` call (its arguments and
every metric's grid; the functions themselves run unchanged). The test then requires that the
snippet exits 0, that it swept an nnsight model, and that the same call on the bundled model
loaded as a TransformerBridge (an independent implementation: TransformerLens hooks) gives the
same grids to 1e-5.

So the README's prompts must be words toy-ioi knows: its tokenizer is word-level and refuses
unknown words.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnsight")

import patchwidgets as pw  # noqa: E402
from patchwidgets.loading import list_models, model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIRS = ("solutions", "tutorials", "exercises")
ATOL = 1e-5

#: What marks a snippet that builds an nnsight model.
BUILDS_NNSIGHT = re.compile(r"""LanguageModel\(|backend\s*=\s*["']nnsight["']""")
#: Calls whose first argument names the model to build.
BUILDERS = {"LanguageModel", "TransformersModel", "load_model"}
#: Calls that sweep a model (``remote=`` belongs to these).
SWEEPS = {"patch", "attribution_patch", "path_patch"}


@dataclass
class Snippet:
    where: str   # "README.md:417", "solutions/09_x.ipynb"
    code: str

    @property
    def says_ndif(self) -> bool:
        """Whether the snippet says it runs on NDIF (in code or comments)."""
        return "NDIF" in self.code or "remote=True" in self.code


def readme_snippets(text: str, name: str = "README.md") -> list[Snippet]:
    """The fenced ``python`` blocks of a markdown text that build an nnsight model."""
    snippets = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        if BUILDS_NNSIGHT.search(match.group(1)):
            line = text.count("\n", 0, match.start()) + 1
            snippets.append(Snippet(f"{name}:{line}", match.group(1)))
    return snippets


def notebook_paths() -> list[Path]:
    return sorted(p for d in NOTEBOOK_DIRS for p in (REPO / d).glob("*.ipynb"))


def notebook_snippet(path: Path) -> Snippet | None:
    """A notebook's code cells up to the last one that builds an nnsight model (later cells may
    need earlier ones), IPython magics and shell lines left out; None if no cell builds one."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    last = max((i for i, s in enumerate(sources) if BUILDS_NNSIGHT.search(s)), default=None)
    if last is None:
        return None
    lines = [line for s in sources[:last + 1] for line in s.splitlines()
             if not line.lstrip().startswith(("%", "!"))]
    return Snippet(str(path.relative_to(REPO)), "\n".join(lines) + "\n")


def all_snippets() -> list[Snippet]:
    snippets = readme_snippets((REPO / "README.md").read_text())
    snippets += [s for s in map(notebook_snippet, notebook_paths()) if s is not None]
    return snippets


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


@dataclass
class Offline:
    code: str               # the snippet, runnable offline
    models: list[str]       # the model names it built, as written
    remote: list[bool]      # per sweep call: did it pass remote=True?
    recorded: int           # how many of those calls are patch / attribution_patch


def make_offline(snippet: Snippet) -> Offline:
    """The snippet with toy-ioi for every model name and without ``remote=`` (see the module
    docstring)."""
    tree = ast.parse(snippet.code)
    models: list[str] = []
    remote: list[bool] = []
    recorded = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _called_name(node)
        if name in BUILDERS and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            models.append(node.args[0].value)
            if node.args[0].value not in list_models():
                node.args[0] = ast.Constant(str(model_path("toy-ioi")))
        elif name in SWEEPS:
            flag = [k for k in node.keywords if k.arg == "remote"]
            remote.append(bool(flag) and isinstance(flag[0].value, ast.Constant) and flag[0].value.value is True)
            recorded += name != "path_patch"
            node.keywords = [k for k in node.keywords if k.arg != "remote"]
    return Offline(ast.unparse(tree), models, remote, recorded)


#: Run before the snippet: record every sweep (arguments and grids), functions unchanged.
PRELUDE = """
import patchwidgets as _pw
from patchwidgets.nnsight_backend import is_nnsight_model as _is_nnsight_model
_records = []

def _recording(fn, name):
    def sweep(model, *args, **kwargs):
        result = fn(model, *args, **kwargs)
        _records.append({"fn": name, "nnsight": _is_nnsight_model(model), "args": args,
                         "kwargs": kwargs, "sites": result.sites, "shape": result.shape,
                         "grids": {m: result.grid(m) for m in result.metrics}})
        return result
    return sweep

for _name in ("patch", "attribution_patch"):
    setattr(_pw, _name, _recording(getattr(_pw, _name), _name))
"""

EPILOGUE = """
import torch as _torch
_torch.save(_records, {out!r})
"""


def run_snippet(snippet: Snippet, tmp_path: Path) -> tuple[Offline, list[dict]]:
    offline = make_offline(snippet)
    out = tmp_path / "records.pt"
    script = tmp_path / "snippet.py"
    script.write_text(PRELUDE + "\n# --- the snippet\n" + offline.code + "\n" + EPILOGUE.format(out=str(out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (f"{snippet.where} fails when run (toy-ioi for the model, no remote=):\n"
                                  f"{offline.code}\n--- stderr:\n{done.stderr[-4000:]}")
    return offline, torch.load(out, weights_only=False)


SNIPPETS = all_snippets()


def test_snippets_are_found():
    """The README's nnsight section has a snippet, and it is the one that runs on NDIF; the
    notebooks were read, and 09_nnsight's solution and exercise copies are among the snippets."""
    readme = [s for s in SNIPPETS if s.where.startswith("README.md")]
    assert readme, "no README snippet builds an nnsight model"
    assert any(s.says_ndif for s in readme), "no README snippet runs on NDIF (remote=True)"
    assert len(notebook_paths()) >= 10
    assert {"solutions/09_nnsight.ipynb", "exercises/09_nnsight.ipynb"} <= {s.where for s in SNIPPETS}
    # The extraction itself: a block without the marker is not taken, one with it is.
    text = "```python\nimport patchwidgets as pw\n```\n\n```python\nm = pw.load_model('x', backend='nnsight')\n```\n"
    assert [s.where for s in readme_snippets(text, "x.md")] == ["x.md:5"]


@pytest.fixture(scope="module")
def bridge():
    return pw.load_model("toy-ioi", device="cpu")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_snippet_runs_and_matches_bridge(snippet, bridge, tmp_path):
    offline = make_offline(snippet)
    assert offline.models, f"{snippet.where}: no model-building call with a model name found"
    assert offline.remote, f"{snippet.where}: builds an nnsight model but sweeps nothing"
    if snippet.says_ndif:
        assert all(offline.remote), (f"{snippet.where} says it runs on NDIF, but not every sweep in it "
                                     f"passes remote=True: {offline.remote}")

    _, records = run_snippet(snippet, tmp_path)
    assert len(records) >= offline.recorded, "a sweep of the snippet did not run"
    for record in records:
        assert record["nnsight"], f"{snippet.where}: {record['fn']} was given a model that is not nnsight's"
        expected = getattr(pw, record["fn"])(bridge, *record["args"], **record["kwargs"])
        assert record["sites"] == expected.sites and record["shape"] == expected.shape
        assert set(record["grids"]) == set(expected.metrics)
        for metric, grid in record["grids"].items():
            torch.testing.assert_close(grid, expected.grid(metric), atol=ATOL, rtol=0,
                                       msg=f"{snippet.where} {record['fn']} {metric}")
        # (Something was measured: a grid of zeros would also agree.)
        assert max(g.abs().max().item() for g in record["grids"].values()) > 1e-2


def test_offline_rewrite():
    """What the rewrite changes: model names (not bundled ones) and remote=, nothing else."""
    code = textwrap.dedent("""
        import patchwidgets as pw
        from nnsight import LanguageModel
        a = LanguageModel("meta-llama/Llama-3.1-8B", dispatch=True)
        b = pw.load_model("toy-ioi", backend="nnsight")
        r = pw.patch(a, "x", "y", (" a", " b"), site="head_out", remote=True)
        s = pw.attribution_patch(b, "x", "y", (" a", " b"))
    """)
    offline = make_offline(Snippet("t", code))
    assert offline.models == ["meta-llama/Llama-3.1-8B", "toy-ioi"]
    assert offline.remote == [True, False]
    assert "remote" not in offline.code and "meta-llama" not in offline.code
    assert f"LanguageModel({str(model_path('toy-ioi'))!r}, dispatch=True)" in offline.code
    assert "pw.load_model('toy-ioi', backend='nnsight')" in offline.code
