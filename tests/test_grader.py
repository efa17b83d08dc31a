"""``patchwidgets grade``: the score comes from checks the grader runs itself, in its own
process, on the learner's functions; nothing a notebook does can pass an exercise for it.

Each kernel start costs seconds, so each notebook below is graded once (a module fixture) and
the tests read its report: one test per cheat, each on its own exercise.
"""

import json
import re
import shutil
import textwrap
from pathlib import Path

import nbformat
import pytest

from patchwidgets import cli, grading
from patchwidgets.grading import _common, _notebook, _wire
from patchwidgets.grading.grader import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_NOTEBOOKS = sorted((ROOT / "exercises").glob("*.ipynb"))
ORIGINAL_COMPARE = _common.compare


def write_notebook(path, notebook_id, *sources):
    """A learner's notebook: code cells, and the course metadata make_exercises.py writes."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["patchwidgets"] = {"notebook": notebook_id}
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(s).strip()) for s in sources]
    nbformat.write(nb, path)
    return path


def statuses(report):
    return {e.name: e.status for e in report.exercises}


def row(report, name):
    return next(e for e in report.exercises if e.name == name)


# ------------------------------------------------------------------------------- cheats

@pytest.fixture(scope="module")
def cheats(tmp_path_factory):
    """02_metrics with a wrong answer to every exercise but one, each behind a different cheat
    (the old grader, which ran the notebook's check cells and read their output, passed all)."""
    path = write_notebook(
        tmp_path_factory.mktemp("cheats") / "not_02_metrics.ipynb", "02_metrics",
        """
        import torch
        from patchwidgets import grading
        from patchwidgets.grading import _common
        """,
        # monkeypatching grading.check_...
        """
        def logit_diff(logits, correct, incorrect):
            return torch.zeros(len(correct))
        """,
        "grading.check_logit_diff = lambda fn, *a, **k: print('✅ logit_diff: passed (trust me)')",
        "grading.check_logit_diff(logit_diff)",
        # a check cell that prints the pass line
        """
        def normalized_metric(patched, target, source):
            return patched.mean()
        """,
        "print('✅ normalized_metric: passed (x)') if True else grading.check_normalized_metric(normalized_metric)",
        # a local check_..., defined and called in one cell
        """
        def noising_metric(patched, clean, corrupted):
            return torch.tensor(0.5)


        def check_noising_metric(fn):
            print('✅ noising_metric: passed (x)')


        check_noising_metric(noising_metric)
        """,
        # the comparison the check imports, replaced
        """
        def logprob(logits, correct):
            return torch.zeros(len(correct))
        """,
        "from patchwidgets.grading import check_metrics\ncheck_metrics.compare = lambda name, got, *a, **k: got",
        "grading.check_logprob(logprob)",
        # a function that replaces the comparison while the check is running it
        """
        def prob(logits, correct):
            import patchwidgets.grading.check_metrics as c
            c.compare = lambda name, got, *a, **k: got
            return torch.zeros(len(correct))
        """,
        "grading.check_prob(prob)",
        # a return value that would run code in whatever process unpickled it
        """
        class Payload:
            def __reduce__(self):
                return (exec, ("import patchwidgets.grading._common as c; c.compare = lambda n, got, *a, **k: got",))


        def rank(logits, correct):
            return Payload()
        """,
        # an honest, right answer
        """
        def kl(p, q):
            p, q = p.log_softmax(-1), q.log_softmax(-1)
            return (p.exp() * (p - q)).sum(-1)
        """,
    )
    return grade_notebook(path, exercise_timeout=120)


def test_cheats_notebook_is_recognised_by_its_metadata(cheats):
    assert cheats.course_notebook == "02_metrics" and cheats.found_by == "metadata"
    assert list(statuses(cheats)) == grading.EXERCISES["02_metrics"]


def test_monkeypatched_check_does_not_pass(cheats):
    assert row(cheats, "logit_diff").status == "failed"
    assert "First mismatch at prompt 0" in row(cheats, "logit_diff").detail


def test_check_cell_printing_the_pass_line_does_not_pass(cheats):
    assert row(cheats, "normalized_metric").status == "failed"


def test_local_check_function_does_not_pass(cheats):
    assert row(cheats, "noising_metric").status == "failed"


def test_replaced_compare_does_not_pass(cheats):
    assert row(cheats, "logprob").status == "failed"


def test_function_that_replaces_compare_when_called_does_not_pass(cheats):
    assert row(cheats, "prob").status == "failed"


@pytest.fixture(scope="module")
def sweep_cheats(tmp_path_factory):
    """The issue's case: `_common.compare = lambda ...: got` and an all-zero head_every."""
    path = write_notebook(
        tmp_path_factory.mktemp("sweeps") / "04_attention_heads.ipynb", "04_attention_heads",
        """
        import torch
        from patchwidgets import grading
        from patchwidgets.grading import _common
        """,
        """
        def get_act_patch_head_every(model, corrupted_tokens, clean_cache, metric):
            return torch.zeros(5, model.cfg.n_layers, model.cfg.n_heads)
        """,
        "_common.compare = lambda name, got, *a, **k: got",
        "grading.check_get_act_patch_head_every(get_act_patch_head_every)",
        """
        def get_act_patch_head_out(model, corrupted_tokens, clean_cache, metric):
            _common.compare = lambda name, got, *a, **k: got
            return torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        """,
        "grading.check_get_act_patch_head_out(get_act_patch_head_out)",
    )
    return grade_notebook(path, exercise_timeout=120)


def test_replaced_common_compare_does_not_pass_a_zero_sweep(sweep_cheats):
    assert row(sweep_cheats, "get_act_patch_head_every").status == "failed"
    assert "Every value is 0" in row(sweep_cheats, "get_act_patch_head_every").detail


def test_sweep_that_replaces_common_compare_when_called_does_not_pass(sweep_cheats):
    assert row(sweep_cheats, "get_act_patch_head_out").status == "failed"
    assert statuses(sweep_cheats)["mean_attention"] == "missing"


def test_return_value_cannot_run_code_in_the_grader(cheats):
    assert row(cheats, "rank").status == "failed"
    assert "expected a tensor, got Payload" in row(cheats, "rank").detail
    assert _common.compare is ORIGINAL_COMPARE


def test_right_answer_passes_among_the_cheats(cheats):
    assert row(cheats, "kl").status == "passed"
    assert cheats.passed == 1 and not cheats.all_passed


@pytest.fixture(scope="module")
def nnsight_answers(tmp_path_factory):
    """09_nnsight: the exercises take an nnsight model, which the grader names and the learner's
    kernel rebuilds (it cannot travel by pickle). One right answer, two classic mistakes, one
    exercise left out."""
    pytest.importorskip("nnsight")
    path = write_notebook(
        tmp_path_factory.mktemp("nnsight") / "mine.ipynb", "09_nnsight",
        "import torch",
        """
        def record_resid_pre(lm, tokens):
            with lm.trace(tokens):
                resid = torch.stack([lm.transformer.h[layer].input for layer in range(len(lm.transformer.h))]).save()
            return resid
        """,
        """
        def patch_resid_pre(lm, corrupted_tokens, clean_resid, layer, position):
            with lm.trace(corrupted_tokens):
                lm.transformer.h[layer].output[:, position] = clean_resid[layer][:, position]
                logits = lm.lm_head.output[:, -1].save()
            return logits
        """,
        """
        def last_logits(lm, tokens):
            with lm.trace(tokens):
                logits = lm.lm_head.output.save()
            return logits
        """,
    )
    return grade_notebook(path, exercise_timeout=300)


def test_nnsight_exercises_are_graded_in_the_learners_kernel(nnsight_answers):
    assert statuses(nnsight_answers) == {"record_resid_pre": "passed", "patch_resid_pre": "failed",
                                         "resid_pre_sweep": "missing", "last_logits": "failed"}
    assert "resid_post" in row(nnsight_answers, "patch_resid_pre").detail
    assert "logits_to_keep=1" in row(nnsight_answers, "last_logits").detail
    assert nnsight_answers.other_errors == []


# ------------------------------------------------------------------------------- a learner's copy

@pytest.fixture(scope="module")
def renamed_copy(tmp_path_factory):
    """exercises/03 saved as homework.ipynb, every check cell deleted, the last exercise's cell
    deleted too; one exercise right, one with a classic mistake (resid_post), one left a stub."""
    nb = nbformat.read(ROOT / "exercises" / "03_residual_stream.ipynb", as_version=4)
    kept = []
    for cell in nb.cells:
        if _notebook.is_self_check(cell.source) or "def get_act_patch_block_every(" in cell.source:
            continue
        if "def patch_position(" in cell.source:
            cell.source = cell.source.replace(
                "    raise NotImplementedError()",
                "    activation[:, position] = source_cache[hook.name][:, position]\n    return activation")
        if "def get_act_patch_resid_pre(" in cell.source:
            cell.source = cell.source.replace("    raise NotImplementedError()", textwrap.indent(textwrap.dedent("""\
                for layer in range(n_layers):
                    for position in range(seq_len):
                        hook_fn = functools.partial(patch_position, position=position, source_cache=clean_cache)
                        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(f'blocks.{layer}.hook_resid_post', hook_fn)])
                        results[layer, position] = metric(logits)
                return results"""), "    "))
        kept.append(cell)
    nb.cells = kept
    path = tmp_path_factory.mktemp("copy") / "homework.ipynb"
    nbformat.write(nb, path)
    return path, grade_notebook(path)


def test_renamed_copy_without_check_cells_lists_every_exercise(renamed_copy):
    path, report = renamed_copy
    assert report.course_notebook == "03_residual_stream" and report.found_by == "metadata"
    assert statuses(report) == {"patch_position": "passed", "patched_run": "not attempted",
                                "get_act_patch_resid_pre": "failed", "get_act_patch_block_every": "missing"}
    assert report.other_errors == []
    assert nbformat.read(path, as_version=4).metadata["patchwidgets"]["notebook"] == "03_residual_stream"


def test_table_and_json_keep_the_whole_diagnosis(renamed_copy, capsys):
    path, report = renamed_copy
    detail = row(report, "get_act_patch_resid_pre").detail
    assert re.match(r"get_act_patch_resid_pre: \d+ of 60 values differ", detail)
    assert "Your values match what you get when you patch resid_post instead of resid_pre." in detail
    table = cli.format_report(report)
    for line in detail.splitlines():
        assert line in table
    assert "Score: 1/4 passed (1 failed, 1 not attempted, 1 missing)" in table


# ------------------------------------------------------------------------------- time limits

@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    path = write_notebook(
        tmp_path_factory.mktemp("slow") / "slow.ipynb", "02_metrics",
        "import time, torch",
        "time.sleep(600)  # a cell past the cell limit",
        """
        def logit_diff(logits, correct, incorrect):
            while True:  # past the exercise limit
                pass
        """,
        """
        def normalized_metric(patched, target, source):
            while True:  # ignores the interrupt: the kernel must be restarted
                try:
                    time.sleep(0.1)
                except KeyboardInterrupt:
                    pass
        """,
        """
        def noising_metric(patched, clean, corrupted):
            return (patched.mean() - clean.mean()) / (corrupted.mean() - clean.mean())
        """,
    )
    return grade_notebook(path, timeout=20, exercise_timeout=3)


def test_a_slow_cell_is_interrupted_and_the_next_cells_run(slow):
    assert slow.other_errors == ["cell 1: ran longer than 20 s and was interrupted"]
    assert statuses(slow)["noising_metric"] == "passed"  # defined after the slow cell


def test_a_slow_exercise_is_marked_and_grading_goes_on(slow):
    assert statuses(slow) == {"logit_diff": "timed out", "normalized_metric": "timed out", "noising_metric": "passed",
                              "logprob": "missing", "prob": "missing", "rank": "missing", "kl": "missing"}
    assert "ran longer than 3 s" in row(slow, "logit_diff").detail
    assert slow.aborted == ""


# ------------------------------------------------------------------------------- exit status

def test_exit_status(tmp_path, capsys):
    solved = write_notebook(tmp_path / "solved.ipynb", "06_corrupted_prompts", """
        from patchwidgets import grading
        swap_names, abc_corruption = grading.reference_swap_names, grading.reference_abc_corruption
        """)
    assert cli.main(["grade", str(solved)]) == 0
    assert "Score: 2/2 passed" in capsys.readouterr().out

    half = write_notebook(tmp_path / "half.ipynb", "06_corrupted_prompts", """
        from patchwidgets import grading
        swap_names = grading.reference_swap_names
        def abc_corruption(prompt, io, s, x, y, z):
            return prompt
        """)
    assert cli.main(["grade", str(half), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["passed"], report["total"]) == (1, 2)
    assert "\n" in report["exercises"][1]["detail"]  # every line of the diagnosis
    assert cli.main(["grade", str(half), "--score-only"]) == 0
    capsys.readouterr()

    stranger = tmp_path / "stranger.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), stranger)
    assert cli.main(["grade", str(stranger)]) == 2
    assert "not a course notebook" in capsys.readouterr().err
    assert cli.main(["grade", "no/such/notebook.ipynb"]) == 2
    assert "no such notebook" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the pieces

def test_self_check_cells():
    assert _notebook.is_self_check("grading.check_logit_diff(logit_diff)")
    assert _notebook.is_self_check("# run me\ncheck_kl(kl)\n")
    assert not _notebook.is_self_check("print('✅ kl: passed') if True else grading.check_kl(kl)")
    assert not _notebook.is_self_check("def kl(p, q):\n    return p\ncheck_kl(kl)")
    assert not _notebook.is_self_check("check_kl(kl")  # a syntax error runs, and fails, in the kernel


def test_wire_reads_data_and_never_objects(tmp_path):
    import torch

    class Mine:
        def __reduce__(self):
            raise AssertionError("never pickled")

    encoder = _wire.Encoder()
    value = {"t": torch.arange(3), ("a", 1): {1, 2}, "x": [None, 1.5, "s", Mine()]}
    encoder.save(str(tmp_path / "answer"), {"value": encoder.encode(value)})
    decoder = _wire.Decoder(str(tmp_path / "answer"))
    back = decoder.decode(decoder.message["value"])
    assert torch.equal(back["t"], torch.arange(3)) and back[("a", 1)] == {1, 2}
    assert back["x"][:3] == [None, 1.5, "s"] and type(back["x"][3]).__name__ == "Mine"
    with pytest.raises(_wire.WireError):
        decoder.decode({"kind": "not tagged"})


# ------------------------------------------------------------------------------- shipped notebooks

@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.name for p in EXERCISE_NOTEBOOKS])
def test_shipped_exercise_notebook_runs_and_grades_not_attempted(path, capsys):
    """As shipped, an exercise notebook runs through; the only errors are the stubs'."""
    assert cli.main(["grade", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["course_notebook"] == path.stem and report["found_by"] == "metadata"
    assert {e["name"]: e["status"] for e in report["exercises"]} == {
        name: "not attempted" for name in grading.EXERCISES[path.stem]}
    assert report["other_errors"] == [] and report["aborted"] == ""


def test_nnsight_solution_notebook_grades_all_passed(capsys):
    pytest.importorskip("nnsight")
    assert cli.main(["grade", str(ROOT / "solutions" / "09_nnsight.ipynb")]) == 0
    assert "Score: 4/4 passed" in capsys.readouterr().out


def test_circuit_solution_notebook_grades_all_passed(tmp_path, capsys):
    """10_ioi_circuit's checks hand the learner's functions toy-ioi-deep (and Roles, prompt dicts):
    the grader names the model and the learner's kernel builds its own (``("deep_model",)``).
    Graded: the solution's set-up, exercise and check cells, the analysis between them left out
    (it takes most of a minute; nbval runs the whole notebook, and the shipped exercise notebook
    runs through above)."""
    solution = nbformat.read(ROOT / "solutions" / "10_ioi_circuit.ipynb", as_version=4)
    code = [cell for cell in solution.cells if cell.cell_type == "code"]
    keep = code[:2] + [cell for cell in code if "# BEGIN SOLUTION" in cell.source or "grading.check_" in cell.source]
    n = len(grading.EXERCISES["10_ioi_circuit"])
    assert n == 7 and sum("grading.check_" in cell.source for cell in keep) == n
    solution.cells = keep
    path = tmp_path / "10_ioi_circuit.ipynb"
    nbformat.write(solution, path)
    assert cli.main(["grade", str(path)]) == 0
    assert f"Score: {n}/{n} passed" in capsys.readouterr().out


def test_solution_notebook_grades_all_passed(capsys):
    assert cli.main(["grade", str(ROOT / "solutions" / "03_residual_stream.ipynb")]) == 0
    out = capsys.readouterr().out
    assert "Score: 4/4 passed" in out and "found by file name" in out


def test_copied_solution_passes_under_any_name(tmp_path, capsys):
    """A learner's exercise notebook with the solutions filled in: solutions/02 with the exercise
    notebook's metadata, saved under another name."""
    solution = nbformat.read(ROOT / "solutions" / "02_metrics.ipynb", as_version=4)
    solution.metadata["patchwidgets"] = nbformat.read(
        ROOT / "exercises" / "02_metrics.ipynb", as_version=4).metadata["patchwidgets"]
    path = tmp_path / "mine.ipynb"
    nbformat.write(solution, path)
    shutil.copy(path, tmp_path / "backup.ipynb")
    assert cli.main(["grade", str(path)]) == 0
    n = len(grading.EXERCISES["02_metrics"])
    assert f"Score: {n}/{n} passed" in capsys.readouterr().out
    assert path.read_bytes() == (tmp_path / "backup.ipynb").read_bytes()  # the file is left alone
