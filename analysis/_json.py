"""JSON-safe conversion shared by the statistics summary and the output writers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def json_safe(obj):
    """Plain Python types for ``json.dumps(..., allow_nan=False)``: NaN and ±inf as ``None``,
    numpy scalars and arrays as Python numbers and lists, paths as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
