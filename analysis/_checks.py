"""Input checks shared by the analysis functions."""

from __future__ import annotations

import numpy as np


def check_pixel_nm(pixel_nm) -> float:
    """``pixel_nm`` as a float, or ``ValueError`` naming the bad value."""
    try:
        value = float(pixel_nm)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number")
    return value
