"""What the grading tests share: a check passes (one PASS line), fails (naming the mistake)."""
import re

import pytest

from patchwidgets import grading
from patchwidgets.grading import GradingError


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
