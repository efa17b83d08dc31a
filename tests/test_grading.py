"""The self-checks must pass right answers and fail wrong ones, saying where; the grader CLI
must tell passed, failed and not attempted apart on real notebooks."""

import functools
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch

from patchwidgets import cli, grading
from patchwidgets.grading import GradingError

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_NOTEBOOKS = sorted((ROOT / "exercises").glob("*.ipynb"))


@pytest.fixture(scope="module")
def setup():
    return grading._sweep_setup()


def passes(check, fn, capsys):
    check(fn)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(grading.PASS_MARK), lines


def fails(check, fn, *patterns):
    with pytest.raises(GradingError) as err:
        check(fn)
    for p in patterns:
        assert re.search(p, str(err.value)), f"{p!r} not in:\n{err.value}"
    return str(err.value)


def stub(*args, **kwargs):
    raise NotImplementedError()


# ------------------------------------------------------------------------------- 02_metrics

def rows(x):
    return torch.arange(x.shape[0])


def test_logit_diff(capsys):
    passes(grading.check_logit_diff, lambda l, c, i: l[rows(l), c] - l[rows(l), i], capsys)
    fails(grading.check_logit_diff, lambda l, c, i: l[rows(l), i] - l[rows(l), c], "First mismatch at prompt 0")
    fails(grading.check_logit_diff, lambda l, c, i: l[:, c] - l[:, i], r"expected a tensor of shape \(\d+,\)")


def test_normalized_and_noising_metric(capsys):
    good = lambda p, t, s: (p.mean() - t.mean()) / (s.mean() - t.mean())  # noqa: E731
    passes(grading.check_normalized_metric, good, capsys)
    fails(grading.check_normalized_metric, lambda p, t, s: ((p - t) / (s - t)).mean(), "mean gap")
    fails(grading.check_normalized_metric, lambda p, t, s: (p - t) / (s - t), "one number")
    passes(grading.check_noising_metric, lambda p, clean, corr: good(p, clean, corr), capsys)
    fails(grading.check_noising_metric, lambda p, clean, corr: good(p, corr, clean), "1 minus the expected")


def test_probability_metrics(capsys):
    passes(grading.check_logprob, lambda l, c: l.log_softmax(-1)[rows(l), c], capsys)
    fails(grading.check_logprob, lambda l, c: l.softmax(-1)[rows(l), c])
    passes(grading.check_prob, lambda l, c: l.softmax(-1)[rows(l), c], capsys)
    fails(grading.check_prob, lambda l, c: l[rows(l), c].exp())
    passes(grading.check_rank, lambda l, c: 1 + (l > l[rows(l), c][:, None]).sum(-1), capsys)
    fails(grading.check_rank, lambda l, c: (l > l[rows(l), c][:, None]).sum(-1), "0-based")
    fails(grading.check_rank, lambda l, c: 1 + (l >= l[rows(l), c][:, None]).sum(-1))


def test_kl(capsys):
    def kl(p, q):
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    passes(grading.check_kl, kl, capsys)
    fails(grading.check_kl, lambda p, q: kl(q, p), r"KL\(patched \|\| clean\)")
    fails(grading.check_kl, lambda p, q: kl(p, q).sum(), "shape")


# ------------------------------------------------------------------------------- hooks

def test_patch_position(capsys):
    def good(act, hook, position, cache):
        act[:, position] = cache[hook.name][:, position]
        return act

    def in_place_only(act, hook, position, cache):
        act[:, position] = cache[hook.name][:, position]

    def next_position(act, hook, position, cache):
        act[:, position + 1] = cache[hook.name][:, position + 1]
        return act

    def everything(act, hook, position, cache):
        return cache[hook.name]

    def first_prompt_only(act, hook, position, cache):
        act[0, position] = cache[hook.name][0, position]
        return act

    passes(grading.check_patch_position, good, capsys)
    passes(grading.check_patch_position, in_place_only, capsys)
    fails(grading.check_patch_position, next_position, "only position 3")
    fails(grading.check_patch_position, everything, "whole activation")
    fails(grading.check_patch_position, lambda act, hook, p, c: act, "unchanged")
    fails(grading.check_patch_position, first_prompt_only, r"index \(1, 3, 0\)")


def test_patch_head_vector(capsys):
    def good(act, hook, head, cache):
        act[:, :, head] = cache[hook.name][:, :, head]
        return act

    def position_axis(act, hook, head, cache):
        act[:, head] = cache[hook.name][:, head]
        return act

    passes(grading.check_patch_head_vector, good, capsys)
    fails(grading.check_patch_head_vector, position_axis, "head 2 at every position")


# ------------------------------------------------------------------------------- sweeps

def library(setup, site, direction="denoising"):
    grid = grading._library_grid(setup, site, direction)
    return lambda model, corrupted_tokens, clean_cache, metric: grid.clone()


def test_resid_pre_hand_written_solution_passes(capsys):
    """A real hook-by-hook implementation (plain forward passes) agrees with the engine."""
    def patch_position(act, hook, position, cache):
        act[:, position] = cache[hook.name][:, position]
        return act

    def sweep(model, corrupted_tokens, clean_cache, metric):
        out = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        with torch.no_grad():
            for layer in range(model.cfg.n_layers):
                for pos in range(corrupted_tokens.shape[1]):
                    fn = functools.partial(patch_position, position=pos, cache=clean_cache)
                    out[layer, pos] = metric(model.run_with_hooks(
                        corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", fn)]))
        return out

    passes(grading.check_get_act_patch_resid_pre, sweep, capsys)


def test_resid_pre_wrong_answers(setup, capsys):
    passes(grading.check_get_act_patch_resid_pre, library(setup, "resid_pre"), capsys)
    fails(grading.check_get_act_patch_resid_pre, library(setup, "resid_post"), "patch resid_post instead")
    fails(grading.check_get_act_patch_resid_pre, library(setup, "resid_pre", "noising"), r"\(noising\)")
    grid = grading._library_grid(setup, "resid_pre")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: grid.T, "transposed")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: torch.zeros_like(grid), "Everything you returned is 0")
    # One wrong cell: the message names its layer, position and token.
    s2 = int((setup.batch.clean_tokens[0] != setup.batch.corrupted_tokens[0]).nonzero()[0])
    wrong = grid.clone()
    wrong[1, s2] += 0.5
    message = fails(grading.check_get_act_patch_resid_pre, lambda *a: wrong,
                    rf"First mismatch at layer 1, pos {s2} \(' John'\)", "1 of 60 values differ")
    assert "expected" in message and "got" in message
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        grading.check_get_act_patch_resid_pre(stub)


def test_block_every(setup, capsys):
    passes(grading.check_get_act_patch_block_every, library(setup, "block"), capsys)
    grid = grading._library_grid(setup, "block")
    fails(grading.check_get_act_patch_block_every, lambda *a: grid[[0, 2, 1]], "mlp_out, attn_out")
    fails(grading.check_get_act_patch_block_every, lambda *a: grid[0], r"shape \(3, 4, 15\)")


def test_head_sweeps(setup, capsys):
    passes(grading.check_get_act_patch_head_out, library(setup, "head_out"), capsys)
    fails(grading.check_get_act_patch_head_out, library(setup, "head_v"), "hook_v")
    passes(grading.check_get_act_patch_head_out_by_pos, library(setup, "head_out_by_pos"), capsys)
    by_pos = grading._library_grid(setup, "head_out_by_pos")
    fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: by_pos.permute(0, 2, 1), "shape")
    wrong = by_pos.clone()
    wrong[2, 14, 5] = 9.0
    fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: wrong,
          r"layer 2, pos 14 \(' to'\), head 5: expected -?\d+\.\d+, got 9\.0000")
    passes(grading.check_get_act_patch_head_every, library(setup, "heads_every"), capsys)
    every = grading._library_grid(setup, "heads_every").clone()
    every[4] = every[0]  # the pattern panel copied from the output panel
    fails(grading.check_get_act_patch_head_every, lambda *a: every, "component 4 \\(pattern\\)")


def test_mean_attention(capsys):
    passes(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][:, h].mean(0), capsys)
    fails(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][:, h], "shape")
    fails(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][0, h])


# ------------------------------------------------------------------------------- 05 gates

def test_gates(capsys):
    passes(grading.check_or_gate, torch.maximum, capsys)
    fails(grading.check_or_gate, lambda a, b: a + b, "torch.maximum")
    fails(grading.check_or_gate, lambda a, b: a * b, "AND gate")

    truth = {"and": {"denoising": {"C"}, "noising": {"A", "B", "C"}},
             "or": {"denoising": {"A", "B", "C"}, "noising": {"C"}}}
    passes(grading.check_gate_predictions, lambda: truth, capsys)
    flipped = {"and": truth["or"], "or": truth["and"]}
    fails(grading.check_gate_predictions, lambda: flipped, "AND gate, denoising")
    fails(grading.check_gate_predictions, lambda: {"and": {}}, "missing")


def gate_effects(model, direction, swap=False):
    clean, corrupted = grading.GATE_CLEAN, grading.GATE_CORRUPTED
    target, source = (corrupted, clean) if (direction == "denoising") != swap else (clean, corrupted)
    _, cache = model.run_with_cache(source)
    ld = lambda logits: float(logits[0, -1, 1] - logits[0, -1, 0])  # noqa: E731
    out = {}
    for comp in "ABC":
        patched = model.run_with_hooks(target, fwd_hooks=[(f"hook_{comp.lower()}", lambda a, hook: cache[hook.name])])
        out[comp] = (ld(patched) - ld(model(target))) / (ld(model(source)) - ld(model(target)))
    return out


def test_patch_gate_components(capsys):
    passes(grading.check_patch_gate_components, gate_effects, capsys)
    fails(grading.check_patch_gate_components, functools.partial(gate_effects, swap=True), "AND gate, denoising")
    fails(grading.check_patch_gate_components, lambda m, d: [0, 0, 1], "dict")


def test_classify_component(capsys):
    def good(d, n, threshold=0.5):
        return {(True, True): "necessary and sufficient", (True, False): "sufficient but not necessary",
                (False, True): "necessary but not sufficient", (False, False): "neither"}[(d >= threshold, n >= threshold)]

    def strict(d, n, threshold=0.5):
        return good(d - 1e-9, n - 1e-9, threshold)

    def swapped(d, n, threshold=0.5):
        return good(n, d, threshold)

    passes(grading.check_classify_component, good, capsys)
    fails(grading.check_classify_component, strict, ">= 0.5")
    fails(grading.check_classify_component, swapped, "sufficiency")


# ------------------------------------------------------------------------------- 06 prompts

def test_swap_names(capsys):
    passes(grading.check_swap_names, grading.reference_swap_names, capsys)
    fails(grading.check_swap_names, lambda p, a, b: p.replace(a, b).replace(b, a), "placeholder")
    fails(grading.check_swap_names, lambda p, a, b: p.replace(a, "#").replace(b, a).replace("#", b), "Samuel")


def test_abc_corruption(capsys):
    passes(grading.check_abc_corruption, grading.reference_abc_corruption, capsys)
    fails(grading.check_abc_corruption, lambda p, io, s, x, y, z: p.replace(io, x).replace(s, y), "only the first one")


def test_stubs_are_not_attempted_and_non_functions_fail():
    for check in [grading.check_logit_diff, grading.check_patch_position, grading.check_or_gate,
                  grading.check_swap_names, grading.check_gate_predictions]:
        with pytest.raises(NotImplementedError):
            check(stub)
    with pytest.raises(GradingError, match="expected a function"):
        grading.check_logit_diff(42)


def test_ioi_batch_is_deterministic_and_equal_length():
    a, b = grading.ioi_batch(n=8), grading.ioi_batch(n=8)
    assert a.clean == b.clean and a.corrupted == b.corrupted
    assert a.clean_tokens.shape == a.corrupted_tokens.shape == (8, 15)
    assert a.clean[0] == "When Mary and John went to the store, John gave a drink to"
    assert (a.clean_tokens != a.corrupted_tokens).sum(1).tolist() == [1] * 8


# ------------------------------------------------------------------------------- the grader

def make_notebook(cells):
    nb = nbformat.v4.new_notebook()
    for source, outputs in cells:
        cell = nbformat.v4.new_code_cell(source, execution_count=1)
        cell.outputs = [nbformat.from_dict(o) for o in outputs]
        nb.cells.append(cell)
    return nb


def test_grade_executed_reads_statuses():
    nb = make_notebook([
        ("grading.check_logit_diff(logit_diff)",
         [{"output_type": "stream", "name": "stdout", "text": "✅ logit_diff: passed (x)\n"}]),
        ("grading.check_prob(prob)",
         [{"output_type": "error", "ename": "NotImplementedError", "evalue": "prob is not implemented", "traceback": []}]),
        ("grading.check_rank(rank)",
         [{"output_type": "error", "ename": "GradingError", "evalue": "rank: your ranks are 0-based", "traceback": []}]),
        ("# grading.check_kl(kl)  (commented out: not a self-check)", []),
        ("1 / 0", [{"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": []}]),
    ])
    report = cli.grade_executed(nb, "x.ipynb", expected=["logit_diff", "prob", "rank", "kl"])
    assert [(e.name, e.status) for e in report.exercises] == [
        ("logit_diff", "passed"), ("prob", "not attempted"), ("rank", "failed"), ("kl", "missing")]
    assert "0-based" in report.exercises[2].detail
    assert report.other_errors == ["cell 4: ZeroDivisionError: division by zero"]
    text = cli.format_report(report)
    assert "Score: 1/4 passed (1 failed, 1 not attempted, 1 missing)" in text


def test_cli_missing_file(capsys):
    assert cli.main(["grade", "no/such/notebook.ipynb"]) == 2
    assert "no such notebook" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.name for p in EXERCISE_NOTEBOOKS])
def test_shipped_exercise_notebook_runs_and_grades_not_attempted(path, capsys):
    """As shipped, an exercise notebook runs through; the only errors are the stubs'."""
    assert cli.main(["grade", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    statuses = {e["name"]: e["status"] for e in report["exercises"]}
    assert statuses == {name: "not attempted" for name in grading.EXERCISES[path.stem]}
    assert report["other_errors"] == [] and report["aborted"] == ""
    assert report["passed"] == 0 and report["total"] == len(statuses)


def test_solution_notebook_grades_all_passed(capsys):
    assert cli.main(["grade", str(ROOT / "solutions" / "03_residual_stream.ipynb")]) == 0
    out = capsys.readouterr().out
    assert "Score: 3/3 passed" in out
    assert "not attempted" not in out and "failed" not in out


def test_partly_solved_notebook(tmp_path, capsys):
    """A learner's copy with one right, one wrong and one untouched exercise."""
    path = tmp_path / "03_residual_stream.ipynb"
    shutil.copy(ROOT / "exercises" / "03_residual_stream.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "def patch_position(" in cell.source:
            cell.source = cell.source.replace(
                "    raise NotImplementedError()",
                "    activation[:, position] = source_cache[hook.name][:, position]\n    return activation")
        if "def get_act_patch_resid_pre(" in cell.source:  # patches resid_post: a classic mistake
            cell.source = cell.source.replace("    raise NotImplementedError()", (
                "    for layer in range(n_layers):\n"
                "        for position in range(seq_len):\n"
                "            hook_fn = functools.partial(patch_position, position=position, source_cache=clean_cache)\n"
                "            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(f'blocks.{layer}.hook_resid_post', hook_fn)])\n"
                "            results[layer, position] = metric(logits)\n"
                "    return results"))
    nbformat.write(nb, path)
    assert cli.main(["grade", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"patch_position\s+passed", out)
    assert re.search(r"get_act_patch_resid_pre\s+failed: GradingError: get_act_patch_resid_pre: \d+ of 60", out)
    assert re.search(r"get_act_patch_block_every\s+not attempted", out)
    assert "Score: 1/3 passed (1 failed, 1 not attempted)" in out
    assert nbformat.read(path, as_version=4).cells[0].source == nb.cells[0].source  # file left alone


# ------------------------------------------------------------------------------- 07 / 08

def test_path_patch_to_logits(setup, capsys):
    def library_path(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading._library_path(setup, sender, freeze_mlps=freeze_mlps)

    def plain_patching(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading._library_grid(setup, "head_out")[sender]

    def mlps_never_frozen(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading._library_path(setup, sender)

    passes(grading.check_path_patch_to_logits, library_path, capsys)
    fails(grading.check_path_patch_to_logits, plain_patching, "sender L0H0", "plain activation patching")
    fails(grading.check_path_patch_to_logits, mlps_never_frozen, "freeze_mlps=True", "MLP outputs must be frozen")
    with pytest.raises(NotImplementedError):
        grading.check_path_patch_to_logits(stub)


def test_path_patch_to_queries(setup, capsys):
    def library_path(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender, receivers=receivers, receiver_input="q")

    def to_logits(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender)

    def to_values(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender, receivers=receivers, receiver_input="v")

    passes(grading.check_path_patch_to_queries, library_path, capsys)
    fails(grading.check_path_patch_to_queries, to_logits, "path to the logits")
    fails(grading.check_path_patch_to_queries, to_values, r"L0H0 -> queries of L1H0")
    fails(grading.check_path_patch_to_queries, lambda *a: torch.zeros(2), "one number")


def test_attribution_checks(setup, capsys):
    head_est = grading._library_attribution(setup, "head_out")
    resid_est = grading._library_attribution(setup, "resid_pre")
    passes(grading.check_attribution_head_out, lambda *a: head_est.clone(), capsys)
    fails(grading.check_attribution_head_out, lambda *a: -head_est, r"\(corrupted - clean\)")
    fails(grading.check_attribution_head_out, lambda *a: grading._library_grid(setup, "head_out"),
          "exact patching result", r"layer 0, head 0")
    passes(grading.check_attribution_resid_pre, lambda *a: resid_est.clone(), capsys)
    fails(grading.check_attribution_resid_pre, lambda *a: resid_est.T, "transposed")
    with pytest.raises(NotImplementedError):
        grading.check_attribution_resid_pre(stub)
