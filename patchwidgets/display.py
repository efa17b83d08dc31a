"""Numbers as a notebook shows them: rounded, and without negative zeros.

A table of patching results holds many values that are zero up to float noise: ``-3e-08`` on
one CPU, ``+2e-08`` on another. Rounded to two decimals they print as ``-0.00`` and ``0.00``,
and pandas pads a whole column differently for the minus sign. :func:`rounded` rounds and
then adds ``0.0``, which turns ``-0.0`` into ``0.0`` (IEEE 754: ``-0.0 + 0.0 == +0.0``), so the
same result prints the same on every machine. The course's stored outputs rely on this.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DECIMALS = 2


def rounded(values: Any, decimals: int = DECIMALS) -> Any:
    """``values`` rounded to ``decimals`` places with negative zeros removed.

    Takes a pandas ``DataFrame`` or ``Series`` (non-numeric columns are left alone), a torch
    tensor, a NumPy array, a float, or a dict or list of these; returns the same kind. Tables
    and arrays come back as float64: a float32 81.12 would print as ``81.120003``.
    """
    import pandas as pd

    if isinstance(values, pd.DataFrame):
        out = values.copy()
        for name in out.columns:
            if pd.api.types.is_float_dtype(out[name]):
                out[name] = out[name].astype("float64").round(decimals) + 0.0
        return out
    if isinstance(values, pd.Series):
        return values.astype("float64").round(decimals) + 0.0 if pd.api.types.is_float_dtype(values) else values.copy()
    if isinstance(values, torch.Tensor):
        return values.round(decimals=decimals) + 0.0 if values.is_floating_point() else values.clone()
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.floating):
            return values.copy()
        return values.astype(np.float64).round(decimals) + 0.0
    if isinstance(values, float):
        return round(values, decimals) + 0.0
    if isinstance(values, dict):
        return {k: rounded(v, decimals) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(rounded(v, decimals) for v in values)
    return values
