"""Ground truth of a frame: every particle it shows, measured exactly.

The format is INTERFACE.md's truth file. Two particles *overlap* when their outlines overlap
or come closer than one pixel (then they touch in the image and segmentation sees one
region). A particle *touches the edge* when its outline reaches the outermost row or column of
pixels (what ``skimage.segmentation.clear_border`` removes).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from . import shapes
from .render import FrameGeometry

SCHEMA_VERSION = 1
_OUTLINE_POINTS = 48


def overlapping_pairs(table, *, gap_nm: float) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of particles whose outlines overlap or are < ``gap_nm`` apart.

    Parameters
    ----------
    table : dict of ndarray
        Particle table (see :mod:`.specimen`).
    gap_nm : float
        Distance under which two particles count as touching.

    Returns
    -------
    ndarray, int, shape (n_pairs, 2)
    """
    n = len(table["x_nm"])
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    xy = np.column_stack([table["x_nm"], table["y_nm"]])
    radius = table["feret_max_nm"] / 2.0  # circumradius of every shape
    pairs = cKDTree(xy).query_pairs(2.0 * radius.max() + gap_nm, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.hypot(xy[i, 0] - xy[j, 0], xy[i, 1] - xy[j, 1])
    pairs = pairs[d <= radius[i] + radius[j] + gap_nm]
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    round_ = np.isin(table["shape"], (shapes.SPHERE, shapes.CAPSULE))
    i, j = pairs[:, 0], pairs[:, 1]
    d = np.hypot(xy[i, 0] - xy[j, 0], xy[i, 1] - xy[j, 1])
    # the circle of radius feret_min / 2 about the centre lies inside every shape, so
    # pairs that close surely overlap; discs need nothing else (that circle is the disc)
    inner = table["feret_min_nm"] / 2.0
    hit = (round_[i] & round_[j]) | (d <= inner[i] + inner[j] + gap_nm)
    other = np.flatnonzero(~hit)
    if other.size:
        sub = pairs[other]
        hit[other] = (_outline_in(table, sub[:, 0], sub[:, 1], gap_nm)
                      | _outline_in(table, sub[:, 1], sub[:, 0], gap_nm))
    return pairs[hit]


def _outline_in(table, src, dst, gap_nm) -> np.ndarray:
    """For each pair, whether any outline point of particle ``src`` lies in grown ``dst``."""
    out = np.zeros(len(src), dtype=bool)
    for code_s in np.unique(table["shape"][src]):
        for code_d in np.unique(table["shape"][dst]):
            sel = np.flatnonzero((table["shape"][src] == code_s)
                                 & (table["shape"][dst] == code_d))
            if sel.size == 0:
                continue
            s, d = src[sel], dst[sel]
            pts = shapes.outline(int(code_s), a=table["a_nm"][s], b=table["b_nm"][s],
                                 p=table["p"][s], angle=table["angle"][s],
                                 n=_OUTLINE_POINTS)
            dx = pts[..., 0] + (table["x_nm"][s] - table["x_nm"][d])[:, None]
            dy = pts[..., 1] + (table["y_nm"][s] - table["y_nm"][d])[:, None]
            col = {k: table[c][d][:, None] for k, c in
                   (("a", "a_nm"), ("b", "b_nm"), ("p", "p"), ("angle", "angle"))}
            out[sel] = shapes.inside(int(code_d), dx, dy, grow=gap_nm, **col).any(axis=1)
    return out


def visible(table, geom: FrameGeometry) -> np.ndarray:
    """True for particles whose outline reaches into the frame (not just their bounding box).

    Discs are tested exactly (distance from the centre to the frame rectangle); other shapes
    by their outline points and centre, which is exact enough for particles far smaller
    than the frame.
    """
    x_px, y_px = geom.to_px(table["x_nm"], table["y_nm"])
    lo_x, lo_y, hi_x, hi_y = -0.5, -0.5, geom.width - 0.5, geom.height - 0.5
    # distance from the centre to the frame rectangle, in nm (0 inside)
    dx = np.maximum(np.maximum(lo_x - x_px, x_px - hi_x), 0.0) * geom.pixel_nm
    dy = np.maximum(np.maximum(lo_y - y_px, y_px - hi_y), 0.0) * geom.pixel_nm
    dist = np.hypot(dx, dy)
    show = dist <= table["feret_min_nm"] / 2.0  # the inscribed circle already reaches in
    unsure = np.flatnonzero(~show & (dist <= table["feret_max_nm"] / 2.0)
                            & ~np.isin(table["shape"], (shapes.SPHERE, shapes.CAPSULE)))
    for code in np.unique(table["shape"][unsure]):
        sel = unsure[table["shape"][unsure] == code]
        pts = shapes.outline(int(code), a=table["a_nm"][sel], b=table["b_nm"][sel],
                             p=table["p"][sel], angle=table["angle"][sel], n=_OUTLINE_POINTS)
        px = x_px[sel][:, None] + pts[..., 0] / geom.pixel_nm
        py = y_px[sel][:, None] + pts[..., 1] / geom.pixel_nm
        show[sel] = ((px >= lo_x) & (px <= hi_x) & (py >= lo_y) & (py <= hi_y)).any(axis=1)
    return show


def frame_truth(table, geom: FrameGeometry, *, sample: str, detector: str, dose: float,
                defocus_um: float, extra=None) -> dict:
    """The truth dict of a frame showing the particles in ``table``.

    Parameters
    ----------
    table : dict of ndarray
        The particles whose bounding boxes meet the frame.
    geom : FrameGeometry
    sample, detector : str
    dose : float
        Electrons per pixel.
    defocus_um : float
        The defocus the frame was taken at.
    extra : mapping, optional
        More top-level keys (e.g. ``true_focus_um``, ``mode``).

    Returns
    -------
    dict
        ``schema_version``, ``pixel_nm``, ``defocus_um``, ``stage_x_um``, ``stage_y_um``,
        ``sample``, ``detector``, ``dose`` and ``particles`` (INTERFACE.md).
    """
    pix = geom.pixel_nm
    x_px, y_px = geom.to_px(table["x_nm"], table["y_nm"])
    hx, hy = table["hx_nm"] / pix, table["hy_nm"] / pix
    # the outermost pixel row/column spans [-0.5, 0.5] and [size - 1.5, size - 0.5]
    edge = ((x_px - hx < 0.5) | (x_px + hx > geom.width - 1.5)
            | (y_px - hy < 0.5) | (y_px + hy > geom.height - 1.5))
    neighbours: list[list[int]] = [[] for _ in range(len(x_px))]
    for i, j in overlapping_pairs(table, gap_nm=pix).tolist():
        neighbours[i].append(j)
        neighbours[j].append(i)
    columns = {
        "x_px": np.round(x_px, 3).tolist(),
        "y_px": np.round(y_px, 3).tolist(),
        "population": table["population"].tolist(),
        "shape": [shapes.SHAPES[c] for c in table["shape"].tolist()],
        "ecd_nm": np.round(table["ecd_nm"], 4).tolist(),
        "feret_max_nm": np.round(table["feret_max_nm"], 4).tolist(),
        "feret_min_nm": np.round(table["feret_min_nm"], 4).tolist(),
        "area_nm2": np.round(table["area_nm2"], 3).tolist(),
        "angle_deg": np.round(np.degrees(table["angle"]), 2).tolist(),
        "touches_edge": edge.tolist(),
        "overlaps": [sorted(n) for n in neighbours],
    }
    names = list(columns)
    particles = [dict(zip(names, row)) for row in zip(*columns.values())]
    shell = np.round(table["shell_nm"], 4).tolist()
    corner = np.round(table["p"], 3).tolist()
    for k, row in enumerate(particles):
        if row["shape"] == "capsule":
            row["shell_nm"] = shell[k]
        elif row["shape"] == "cube":
            row["p"] = corner[k]
    truth = {
        "schema_version": SCHEMA_VERSION,
        "pixel_nm": pix,
        "defocus_um": float(defocus_um),
        "stage_x_um": geom.center_x_nm / 1000.0,
        "stage_y_um": geom.center_y_nm / 1000.0,
        "sample": sample,
        "detector": detector,
        "dose": float(dose),
        "width_px": geom.width,
        "height_px": geom.height,
    }
    truth.update(extra or {})
    truth["particles"] = particles
    return truth
