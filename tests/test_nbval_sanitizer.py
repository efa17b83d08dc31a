"""The stored notebook outputs must catch a wrong number and forgive machine noise.

`make test` runs nbval on solutions/ and tutorials/ with tests/nbval_sanitize.cfg. That file
decides what counts as "the same output": too loose and a wrong result passes, too strict
and a new CPU or library version fails CI on last-bit noise. Both directions are checked
here, the first one end to end: a copy of a solution notebook with one stored number moved
by 0.04 must fail nbval, in that cell and no other.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANITIZER = ROOT / "tests" / "nbval_sanitize.cfg"


def sanitize(text: str) -> str:
    """Apply the config the way nbval does: every (regex, replace) pair, in file order."""
    pairs = re.findall(r"^regex: (.*)$\n^replace: (.*)$", SANITIZER.read_text(), flags=re.MULTILINE)
    assert pairs, "no rules found in the sanitizer config"
    for regex, replace in pairs:
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize("stored,fresh", [
    ("L0H0  0.93", "L0H0  0.9312"),                      # digits past the second decimal
    ("layer   -0.00  1.00", "layer    0.00  1.00"),      # a zero's sign and the padding it moves
    ("tensor([-0., 1.])", "tensor([0., 1.])"),
    ("<td>-0.00</td>", "<td>0.00</td>"),
    ("error 6.5395965e-05", "error -3.1e-06"),           # zero at two decimals, in any notation
    ("at 0x7f3a2b1c9d40>", "at 0x55d0e1f2a3b4>"),
])
def test_machine_noise_is_forgiven(stored, fresh):
    assert sanitize(stored) == sanitize(fresh)


@pytest.mark.parametrize("stored,wrong", [
    ("L0H0  0.93", "L0H0  0.97"),
    ("clean LD 11.60", "clean LD 11.68"),
    ("correlation 0.99", "correlation 0.95"),
    ("prob 0.50", "prob 0.54"),
    ("-0.05", "0.05"),                                    # a sign that is not a zero's
    ("1.50e+02", "9.50e+02"),
    ("0.0012", "0.0123"),                                 # 0.00 vs 0.01
])
def test_a_change_at_the_second_decimal_fails(stored, wrong):
    assert sanitize(stored) != sanitize(wrong)


def _mutate_one_number(notebook: dict) -> int:
    """Add 0.04 to the first two-decimal number printed by a code cell; return that cell's
    index among code cells (nbval's "Cell N"). Only numbers whose second decimal is at most 5
    are taken, so the first decimal stays the same: a one-decimal sanitizer would pass it."""
    number = re.compile(r"(?<![\d.])(\d+)\.(\d)([0-5])(?![\d.])")
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for n, cell in enumerate(code_cells):
        if "NBVAL_IGNORE_OUTPUT" in "".join(cell["source"]):
            continue
        for output in cell.get("outputs", []):
            if output["output_type"] != "stream":
                continue
            text = "".join(output["text"])
            match = number.search(text)
            if match:
                old = match.group(0)
                new = f"{int(match.group(1))}.{match.group(2)}{int(match.group(3)) + 4}"
                output["text"] = text[:match.start()] + new + text[match.end():]
                return n
    raise AssertionError("no printed two-decimal number to change")


@pytest.mark.slow
def test_nbval_fails_on_a_stored_number_changed_by_0_04(tmp_path):
    notebook = json.loads((ROOT / "solutions" / "03_residual_stream.ipynb").read_text())
    cell = _mutate_one_number(notebook)
    copy = tmp_path / "mutated.ipynb"
    copy.write_text(json.dumps(notebook))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", str(copy), "-q", "-p", "no:cacheprovider",
         "--nbval-sanitize-with", str(SANITIZER), "--rootdir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    report = run.stdout + run.stderr
    failed = re.findall(r"FAILED \S*::Cell (\d+)", report)
    # Exactly the mutated cell fails, so the failure is the number's and not, say, a kernel's.
    assert run.returncode != 0 and failed == [str(cell)], report[-3000:]
    assert "Cell outputs differ" in report


def test_kernel_set_and_thread_count_reach_torch():
    """scripts/nbval_matrix.sh and `make test` vary the CPU kernel set and the thread count
    through the environment; this fails if torch stops reading either variable."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    env = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["DEFAULT", "1"], out.stdout + out.stderr
