"""Serpentine tiling of a stage area (row by row, alternating direction)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One stage position of a tiling: row and column in the grid, centre in µm."""

    index: int
    row: int
    col: int
    x_um: float
    y_um: float


def normalize_area(area_um, limits_um=None) -> tuple[float, float, float, float]:
    """Return ``(x_min, y_min, x_max, y_max)`` from two corners, clipped to the stage limits.

    Parameters
    ----------
    area_um : sequence of 4 floats
        Two opposite corners ``(x0, y0, x1, y1)`` in any order.
    limits_um : sequence of 4 floats, optional
        Stage limits ``(x_min, y_min, x_max, y_max)``.

    Raises
    ------
    ValueError
        If the area has no width or height, or lies wholly outside the limits.
    """
    if len(area_um) != 4:
        raise ValueError(f"area must be X0,Y0,X1,Y1, got {area_um!r}")
    x0, y0, x1, y1 = (float(v) for v in area_um)
    box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    if limits_um is not None:
        lx0, ly0, lx1, ly1 = (float(v) for v in limits_um)
        clipped = (max(box[0], lx0), max(box[1], ly0), min(box[2], lx1), min(box[3], ly1))
        if clipped[0] > clipped[2] or clipped[1] > clipped[3]:
            raise ValueError(f"area {box} lies outside the stage limits {tuple(limits_um)}")
        box = clipped
    return box


def _centres(lo: float, hi: float, field_um: float, step_um: float) -> list[float]:
    # Enough fields to cover [lo, hi], the grid centred on the area.
    extent = hi - lo
    n = 1 if extent <= field_um else int(math.ceil((extent - field_um) / step_um - 1e-9)) + 1
    first = (lo + hi) / 2 - (n - 1) * step_um / 2
    return [first + i * step_um for i in range(n)]


def serpentine(area_um, *, field_um: tuple[float, float], step_um: tuple[float, float],
               limits_um=None) -> list[Tile]:
    """Tile centres covering an area, in serpentine order.

    Rows run along x; row 0 is at the smallest y and goes towards +x, row 1 back towards
    −x, and so on, so the stage never makes a long return move.

    Parameters
    ----------
    area_um : sequence of 4 floats
        Corners ``(x0, y0, x1, y1)`` in µm (see :func:`normalize_area`).
    field_um : (float, float)
        Width and height of one field in µm.
    step_um : (float, float)
        Centre-to-centre spacing in x and y (field minus overlap), > 0.
    limits_um : sequence of 4 floats, optional
        Stage limits; the area is clipped to them and every centre is kept inside.

    Returns
    -------
    list of Tile

    Examples
    --------
    >>> [(t.row, t.col) for t in serpentine((0, 0, 2, 2), field_um=(1, 1), step_um=(1, 1))]
    [(0, 0), (0, 1), (1, 1), (1, 0)]
    """
    if min(step_um) <= 0 or min(field_um) <= 0:
        raise ValueError(f"field_um {field_um} and step_um {step_um} must be > 0")
    x_min, y_min, x_max, y_max = normalize_area(area_um, limits_um)
    xs = _centres(x_min, x_max, field_um[0], step_um[0])
    ys = _centres(y_min, y_max, field_um[1], step_um[1])
    if limits_um is not None:
        lx0, ly0, lx1, ly1 = limits_um
        xs = [min(max(x, lx0), lx1) for x in xs]
        ys = [min(max(y, ly0), ly1) for y in ys]
    tiles = []
    for row, y in enumerate(ys):
        cols = range(len(xs)) if row % 2 == 0 else range(len(xs) - 1, -1, -1)
        for col in cols:
            tiles.append(Tile(len(tiles), row, col, xs[col], y))
    return tiles
