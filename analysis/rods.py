"""Split touching, crossing and stacked rods into single rods of the frame's rod width.

UECS (:mod:`.separate`) assumes round-ish convex members: two crossing rods erode to one convex
core at the crossing, two rods lying side by side form one convex slab, so rod groups end up
as agglomerates or as one particle. Rods have a property spheres lack: every rod of a sample
has nearly the same width, and it is measured well on the isolated rods of the same frame
(:func:`rod_radius_px`). A group is then decomposed into stadiums (spherocylinder projections)
of that width:

- *axis candidates*: a rod's axis is a straight segment along which a disc of the rod's radius
  fits inside the region. The admissible centres are the region's distance transform above
  that radius (less a tolerance for the width spread); every maximal straight run of them, in
  directions 6° apart and then 3° either side of each pick, is a candidate axis (a Hough
  transform restricted to admissible segments).
- *selection*: the outline of the region must be explained by the outlines of its rods. Each
  candidate explains the outline pixels lying at the rod radius from its axis; candidates are
  picked greedily by the outline they newly explain (the region's straight sides pick the
  axes: in a side-by-side pair the two off-centre axes explain a side each, the centre line
  none).
- *refinement*: each rod's axis end points and radius are fitted (robust least squares) to the
  outline pixels it explains, so its length and width are its own, not the frame's.
- *consistency*: a rod's own model outline must lie on the region's outline or be hidden inside
  another rod (where two rods cross or touch); a stadium laid across a sphere, or a rod that
  explains a side only by accident, fails and is dropped.

Each rod's mask is its stadium within the region: it may overlap a neighbour's (a crossing is
shared, as UECS regrowth shares a lens). What the rods leave unexplained and that is thick
enough to hold a particle is returned as boxes (the caller reports them as agglomerates): no
part is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError, cKDTree

__all__ = ["RodSplit", "rod_geometry_px", "rod_radius_px", "split_rods", "rods_instead",
           "rods_and_discs",
           "stadium_distance", "unexplained_boxes"]

# Directions of candidate axes, coarse to fine: 6° steps, then 3° either side of each pick's
# direction (a 40 px axis tilted by 1.5° is off by 0.5 px at its ends, inside the admissible
# band; the fit refines it). The fine search sees few directions: about half the work of 3°
# steps everywhere.
_COARSE_DEG = 6.0
_FINE_DEG = 3.0
# Tolerance on the radius of admissible axis points: rods of a sample vary in width (~10%) and
# a digitised edge by ±0.5 px. Thinner than the frame's radius by up to 3 SD of that spread
# plus the edge (a rod 20% thin has no axis point deeper than 0.8 r: it was left as an
# agglomerate beside the rod it crosses); thicker by 2 SD (a wider rod is a slab of two).
_RADIUS_TOL_FRAC = 0.2
_RADIUS_TOL_LO_FRAC = 0.3
_RADIUS_TOL_PX = 1.0
# Consecutive admissible pixels along a line of one direction are at most √2 apart.
_RUN_GAP_PX = 1.5
# An outline pixel centre lies on average half a pixel inside the true edge.
_EDGE_INSET_PX = 0.5
# A model outline point is on the region's outline when an outline pixel is this close.
_ON_OUTLINE_PX = 1.5
# A rod is kept when this share of its model outline lies on the region's outline or inside
# another rod.
_CONSISTENT = 0.8
# A pick must newly explain at least this many outline pixels (× the radius): about half the
# perimeter of one end cap and a bit of side.
_MIN_GAIN_RADII = 3.0
_MAX_RODS = 16
# Two rods sharing more than this share of the smaller one's area are one fat rod seen as two
# (side by side they share nothing, crossing a small lens).
_MAX_SHARED = 0.5
# A region UECS explained fully is handed to rods only when they explain this share of its
# outline with at least two rods and leave nothing unexplained.
_REPLACE_EXPLAINED = 0.9
# Regions rounder than this are single particles (separate's _SKIP_ROUNDNESS).
_ROUND = 0.9
# Unexplained parts thinner than this (inscribed radius, px) are blur fillets where rods meet.
_REST_DEPTH_PX = 2.0
# Isolated rods for the frame's width: convex (notch under this, px) and elongated.
_CONVEX_PX = 1.5
_MIN_ASPECT = 2.0
_MIN_RODS = 5
# A rod longer than this many times the frame's typical length is two rods end to end (or
# overlapping along one line): a monodisperse sample's rods (CV ~10%) are never 5 SD long.
_TOO_LONG = 1.5
# Where the region's depth along such a rod's axis dips below this share of the radius, two
# caps meet (the neck of rods touching end to end): they are cut there.
_NECK = 0.8
_MIN_RADIUS_PX = 1.5  # split_rods needs a radius above 1 px and room for its tolerances
_CAP = 1.0 - np.pi / 4  # a stadium's area is w·L - (1 - π/4)·w² (L tip to tip)


@dataclass
class RodSplit:
    """Result of :func:`split_rods` (all in the coordinates of the mask it was given).

    Attributes
    ----------
    pieces : list of (M, N) ndarray of bool
        Each rod's full extent within the region (overlapping at crossings).
    owner : (M, N) ndarray of int
        Index of the rod each region pixel belongs to in a label image (the rod whose edge it
        lies deepest inside; blur fillets where rods meet go to the nearest rod); -1 outside
        the region and in unexplained parts.
    rest : list of tuple of int
        ``(row0, col0, row1, col1)`` of every part of the region no rod explains that could hold
        a particle (report as agglomerates).
    axes : (k, 2, 2) ndarray of float
        Each rod's axis end points ``((row, col), (row, col))``.
    radii : (k,) ndarray of float
        Each rod's fitted radius (px, half its width).
    explained : float
        Share of the region's outline pixels that lie on some rod's outline.
    """

    pieces: list
    owner: np.ndarray
    rest: list = field(default_factory=list)
    axes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 2)))
    radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    explained: float = 0.0


def stadium_distance(points, a, b):
    """Distance of ``points`` (n, 2) from the segment ``a``–``b``.

    A stadium of radius ``r`` about the segment is ``stadium_distance(p, a, b) <= r``.

    Examples
    --------
    >>> stadium_distance(np.array([[0.0, 5.0], [3.0, 12.0]]), np.array([0.0, 0.0]),
    ...                  np.array([0.0, 10.0])).round(3).tolist()
    [0.0, 3.606]
    """
    points = np.asarray(points, float)
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    n2 = float(ab @ ab)
    t = np.zeros(len(points)) if n2 == 0 else np.clip((points - a) @ ab / n2, 0.0, 1.0)
    return np.hypot(*(points - a - t[:, None] * ab).T)


def _segment_sq_distances(points, a, b):
    """Squared distances (C, n) of ``points`` (n, 2) from C segments ``a``–``b`` (C, 2).

    ``|p - a - t·ab|² = |p - a|² - 2·t·s + t²·|ab|²`` with ``s = (p - a)·ab`` and ``t`` the
    clipped projection ``s / |ab|²``: the cross terms are matrix products, and no square
    root is taken (callers compare with squared bounds). Coordinates are centred first so
    float32 keeps ~1e-3 px² of precision.
    """
    c = points.mean(axis=0)
    p = (points - c).astype(np.float32)
    a = (a - c).astype(np.float32)
    ab = (b - c).astype(np.float32) - a
    n2 = np.maximum((ab ** 2).sum(1), np.float32(1e-12))[:, None]
    s = ab @ p.T - (a * ab).sum(1)[:, None]
    pa2 = (p ** 2).sum(1)[None, :] - 2 * (a @ p.T) + (a ** 2).sum(1)[:, None]
    t = np.clip(s / n2, 0.0, 1.0)
    d2 = pa2 - t * (2 * s - t * n2)
    return np.maximum(d2, 0.0, out=d2)


def _boundary(mask):
    """Outline pixels (8-connected contour) of ``mask`` as (n, 2) float (row, col)."""
    inner = ndi.binary_erosion(mask, border_value=0)
    return np.argwhere(mask & ~inner).astype(float)


def rod_radius_px(labels, *, min_aspect=_MIN_ASPECT, min_rods=_MIN_RODS):
    """The frame's rod radius (px, half the width) from its isolated convex elongated regions.

    The radius of :func:`rod_geometry_px`; see there.

    Examples
    --------
    >>> yy, xx = np.mgrid[:120, :200]
    >>> labels = np.zeros((120, 200), int)
    >>> for k in range(6):  # stadiums of radius 6, axis 30 px long
    ...     cy, cx = 20 + 40 * (k // 3), 30 + 60 * (k % 3)
    ...     d = np.hypot(yy - cy, np.clip(np.abs(xx - cx) - 15, 0, None))
    ...     labels[d <= 6] = k + 1
    >>> round(rod_radius_px(labels), 1)  # pixel centres within 6: the edge is ~6.5 out
    6.2
    """
    geometry = rod_geometry_px(labels, min_aspect=min_aspect, min_rods=min_rods)
    return None if geometry is None else geometry[0]


def rod_geometry_px(labels, *, min_aspect=_MIN_ASPECT, min_rods=_MIN_RODS):
    """The frame's rod radius and length (px) from its isolated convex elongated regions.

    A stadium of width ``w`` and tip-to-tip length ``L`` has area ``w·L - (1 - π/4)·w²``; with
    the region's pixel count and caliper length this gives ``w`` without any edge-position
    model, so the radius is consistent with the masks the rods are cut from (whatever edge
    level segmentation used). Regions with a notch (touching particles) or an aspect ratio
    under ``min_aspect`` (spheres, cubes, end-on rods) do not count.

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Segmented regions (0 background).
    min_aspect : float, optional
        Length / width a region needs to count as a rod.
    min_rods : int, optional
        Fewer such regions than this: the frame holds no rods to learn from (None).

    Returns
    -------
    (float, float) or None
        Median radius (half the width) and median tip-to-tip length of the frame's isolated
        rods, or None.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels (shape {labels.shape}) must be 2-D")
    widths, lengths = [], []
    # every label's outline (pixels with a 4-neighbour of another label) in one pass
    p = np.pad(labels, 1)
    c = p[1:-1, 1:-1]
    edge = (c > 0) & ((c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2])
                      | (c != p[1:-1, 2:]))
    rc = np.argwhere(edge)
    lab = c[edge]
    order = np.argsort(lab, kind="stable")
    rc, lab = rc[order].astype(float), lab[order]
    ids, starts, counts = np.unique(lab, return_index=True, return_counts=True)
    if not len(ids):
        return None
    areas = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)[ids]
    # an upper bound of each caliper length from the outline's extents along 0°, 45°, 90° and
    # 135° (every direction is within 22.5° of one): regions that cannot reach ``min_aspect``
    # even at that length (spheres, cubes) skip the convex hull
    ext = np.zeros(len(ids))
    for proj, scale in ((rc[:, 0], 1.0), (rc[:, 1], 1.0), (rc.sum(1), np.sqrt(0.5)),
                        (rc[:, 0] - rc[:, 1], np.sqrt(0.5))):
        ext = np.maximum(ext, scale * (np.maximum.reduceat(proj, starts)
                                       - np.minimum.reduceat(proj, starts)))
    bound = ext / np.cos(np.pi / 8) + 1.0
    disc = bound * bound - 4 * _CAP * areas
    w_min = (bound - np.sqrt(np.maximum(disc, 0.0))) / (2 * _CAP)
    # a region cut by the image's edge (or a strip's cut) is no whole rod: its length lies
    border = np.zeros(int(ids.max()) + 1, bool)
    border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    maybe = (areas >= 30) & (disc > 0) & (bound >= min_aspect * w_min) & ~border[ids]
    for i in np.flatnonzero(maybe):
        pts = rc[starts[i]:starts[i] + counts[i]]
        area = int(areas[i])
        try:
            hull = ConvexHull(pts)
        except (QhullError, ValueError):
            continue
        eq = hull.equations
        notch = float((-(pts @ eq[:, :2].T + eq[:, 2])).min(axis=1).max())
        if notch > _CONVEX_PX:
            continue
        v = pts[hull.vertices]
        # pixel centres: the caliper of the pixels themselves is about one pixel more
        length = float(np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1)).max()) + 1.0
        disc = length * length - 4 * _CAP * area
        if disc <= 0:
            continue
        w = (length - np.sqrt(disc)) / (2 * _CAP)
        if length >= min_aspect * w:
            widths.append(w)
            lengths.append(length)
    if len(widths) < min_rods:
        return None
    radius = float(np.median(widths)) / 2
    if radius < _MIN_RADIUS_PX:
        return None  # rods a few pixels wide (or scratches): too thin to fit stadiums to
    return radius, float(np.median(lengths))


def _candidates(admissible, min_len, angles):
    """Maximal straight runs of admissible pixels in each direction of ``angles`` (radians).

    Returns the end points ``a``, ``b`` (C, 2) and each run in its direction's frame, ``runs``
    (C, 4): direction index into ``angles``, offset across (an integer line), start and end
    along it.
    """
    none = np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 4))
    pts = np.argwhere(admissible).astype(float)
    if len(pts) < 2:
        return none
    # every direction at once: one sort of (direction, line, position along it)
    d = np.column_stack([np.sin(angles), np.cos(angles)])  # (row, col) direction of the axis
    nrm = np.column_stack([np.cos(angles), -np.sin(angles)])
    u = (pts @ d.T).T  # (directions, points)
    line = np.round(pts @ nrm.T).T
    # sort each direction's points by line, then position: one float key per point (lines
    # ``span`` apart, more than any position range), a row-wise sort, ten times faster than
    # a lexsort of the three keys
    span = 2.0 * (np.ptp(u) + 2.0)
    order = np.argsort(line * span + u, axis=1)
    u = np.take_along_axis(u, order, axis=1).ravel()
    line = np.take_along_axis(line, order, axis=1).ravel().astype(np.int64)
    ang = np.repeat(np.arange(len(angles)), len(pts))
    brk = np.flatnonzero((np.diff(ang) != 0) | (np.diff(line) != 0)
                         | (np.diff(u) > _RUN_GAP_PX))
    first = np.concatenate([[0], brk + 1])
    last = np.concatenate([brk, [len(u) - 1]])
    keep = u[last] - u[first] >= min_len
    if not keep.any():
        return none
    first, last = first[keep], last[keep]
    k = ang[first]
    base = line[first][:, None] * nrm[k]
    a = base + u[first][:, None] * d[k]
    b = base + u[last][:, None] * d[k]
    # runs of neighbouring lines and directions nearly coincide: one per 1 px cell of both
    # end points (the fit refines the axis; the greedy pick needs one near each axis); the
    # cells as one integer each, in the order of their (a_row, a_col, b_row, b_col)
    cell = np.round(np.column_stack([a, b])).astype(np.int64)
    cell -= cell.min(axis=0)
    span = cell.max(axis=0) + 1
    key = ((cell[:, 0] * span[1] + cell[:, 1]) * span[2] + cell[:, 2]) * span[3] + cell[:, 3]
    runs = np.column_stack([k, line[first], u[first], u[last]])
    _, one = np.unique(key, return_index=True)
    return a[one], b[one], runs[one]


def _band_pairs(outline, runs, lo, hi, angles):
    """Which outline points lie within ``lo``..``hi`` of which candidate axis.

    Returns (candidate index, outline point index, distance) of every such pair. In each
    direction's frame (along ``u``, across ``v``) a point within ``hi`` of a run on line
    ``v0`` from ``u1`` to ``u2`` lies in the box ``|v - v0| <= hi``, ``u1 - hi <= u <= u2 +
    hi``. The points are sorted by (direction, integer ``v``, ``u``), so each candidate meets
    only the points of its box (one sorted range per integer ``v``): a small fraction of the
    dense candidates × outline work.
    """
    d = np.column_stack([np.sin(angles), np.cos(angles)])
    nrm = np.column_stack([np.cos(angles), -np.sin(angles)])
    u = (outline @ d.T).T  # (directions, points): along and across each direction
    v = (outline @ nrm.T).T
    vbin = np.floor(v)
    vmin = float(min(vbin.min(), np.floor(runs[:, 1].min() - hi)))
    nv = float(max(vbin.max(), np.floor(runs[:, 1].max() + hi)) - vmin + 1)
    umin = float(min(u.min(), runs[:, 2].min() - hi)) - 1.0
    span = float(max(u.max(), runs[:, 3].max() + hi)) - umin + 1.0
    row = np.arange(len(angles))[:, None] * nv
    key = ((row + vbin - vmin) * span + (u - umin)).ravel()
    order = np.argsort(key)
    key = key[order]
    # each candidate's integer lines (the same count for all: its line is an integer)
    k = runs[:, 0]
    lines = np.floor(runs[:, 1:2] - hi) + np.arange(int(np.floor(hi)) * 2 + 2)[None, :]
    lines = lines[:, lines[0] - runs[0, 1] <= hi]
    base = ((k[:, None] * nv + lines - vmin) * span)
    i0 = np.searchsorted(key, (base + (runs[:, 2:3] - hi - umin)).ravel(), side="left")
    i1 = np.searchsorted(key, (base + (runs[:, 3:4] + hi - umin)).ravel(), side="right")
    counts = i1 - i0
    cand = np.repeat(np.repeat(np.arange(len(runs)), lines.shape[1]), counts)
    pos = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - i0, counts)
    point = order[pos] % outline.shape[0]
    kc = k[cand].astype(np.int64)
    along = u[kc, point]
    gap = np.maximum(np.maximum(runs[cand, 2] - along, along - runs[cand, 3]), 0.0)
    across = v[kc, point] - runs[cand, 1]
    dist = np.sqrt(across * across + gap * gap)
    on = (dist >= lo) & (dist <= hi)
    return cand[on], point[on], dist[on]


def _fit_rod(pts, a, b, r, *, max_iter=40):
    """Axis end points and radius of the stadium whose outline best fits ``pts``.

    Robust least squares (soft-L1 loss, scale 1 px: a neighbour's outline pixels among
    ``pts`` pull little) by Levenberg-Marquardt on the reweighted normal equations. Five
    parameters and a few hundred points: scipy's ``least_squares`` reaches the same minimum,
    but its per-call overhead (~5 ms) is ten times the arithmetic, and the fit runs for
    every rod of every group in every frame.
    """
    if len(pts) < 6:
        return a, b, r
    pts = np.asarray(pts, float)

    def residuals(q):
        ab = q[2:4] - q[:2]
        n2 = max(float(ab @ ab), 1e-12)
        t = np.clip((pts - q[:2]) @ ab / n2, 0.0, 1.0)
        off = pts - q[:2] - t[:, None] * ab
        d = np.maximum(np.hypot(off[:, 0], off[:, 1]), 1e-9)
        return d - q[4], t, off / d[:, None]

    def cost(f):
        return float(np.sum(np.sqrt(1.0 + f * f) - 1.0))

    q = np.r_[a, b, r].astype(float)
    f, t, n = residuals(q)
    c = cost(f)
    lam = 1e-3
    for _ in range(max_iter):
        # the nearest axis point moves with the end points by (1 - t, t) (envelope theorem)
        jac = np.column_stack([-(1 - t)[:, None] * n, -t[:, None] * n, -np.ones(len(t))])
        w = 1.0 / np.sqrt(1.0 + f * f)  # soft-L1: rho'(f^2)
        jw = jac * w[:, None]
        h = jac.T @ jw
        g = jw.T @ f
        while True:
            try:
                step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-9), -g)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                qn = q + step
                fn, tn, nn = residuals(qn)
                cn = cost(fn)
                if cn <= c:
                    break
            lam *= 10.0
            if lam > 1e8:
                step = None
                break
        if step is None:
            break
        done = c - cn <= 1e-4 * max(c, 1e-12) or float(np.abs(step).max()) < 1e-2
        q, f, t, n, c = qn, fn, tn, nn, cn
        lam = max(lam / 10.0, 1e-9)
        if done:
            break
    if not np.all(np.isfinite(q)) or q[4] <= 0.5 * r or q[4] >= 2 * r:
        return a, b, r
    return q[:2], q[2:4], q[4]


def _hidden_ends(pts, a, b, rho, length_px):
    """Axis end points with each end hidden under another rod placed within its hidden stretch.

    An end is *free* when its cap shows on the region's outline (enough of ``pts``, the
    outline pixels this rod explains, lie beyond the axis end). A hidden end (a T or an end
    under a crossing rod) leaves its tip anywhere between where the rod's sides stop being
    seen and the far side of the rod covering it (where the admissible axis ran out). The tip
    goes where the frame's typical length ``length_px`` puts it, clipped to that stretch, or
    in its middle without a typical length.
    """
    ab = b - a
    axis = float(np.hypot(*ab))
    if axis < 1e-6 or len(pts) < 6:
        return a, b
    d = ab / axis
    s = (pts - a) @ d
    lateral = np.abs((pts - a) @ np.array([-d[1], d[0]]))
    side = s[(s >= 0) & (s <= axis) & (lateral >= 0.5 * rho)]
    if not side.size:
        return a, b
    need = 0.4 * np.pi * rho  # points on a half circle of the cap, ~π·rho of them
    free_a = np.count_nonzero(s < 0) >= need
    free_b = np.count_nonzero(s > axis) >= need
    if free_a and free_b:
        return a, b
    # tips, along the axis from a: a free tip lies a radius beyond its axis end; a hidden
    # one between where the sides are first seen and a radius beyond the admissible run's end
    lo_a, hi_a = (-rho, -rho) if free_a else (-rho, float(side.min()))
    lo_b, hi_b = (axis + rho, axis + rho) if free_b else (float(side.max()), axis + rho)
    if length_px is None:
        tip_a = (lo_a + hi_a) / 2 if not free_a else lo_a
        tip_b = (lo_b + hi_b) / 2 if not free_b else lo_b
    elif free_a:
        tip_a, tip_b = lo_a, float(np.clip(lo_a + length_px, lo_b, hi_b))
    elif free_b:
        tip_b, tip_a = lo_b, float(np.clip(lo_b - length_px, lo_a, hi_a))
    else:  # both hidden: the typical length about the middle of what is seen
        mid = (hi_a + lo_b) / 2
        tip_a = float(np.clip(mid - length_px / 2, lo_a, hi_a))
        tip_b = float(np.clip(mid + length_px / 2, lo_b, hi_b))
    # axis ends lie a radius inside the tips (never crossing: a round particle at worst)
    ea, eb = tip_a + rho, tip_b - rho
    if eb < ea:
        ea = eb = (ea + eb) / 2
    return a + ea * d, a + eb * d



def _collinear_pair(a, b, rho, depth, length_px):
    """Two rods for one fitted rod too long to be one: rods end to end or overlapping in line.

    ``a``, ``b``, ``rho`` are the fitted axis end points and radius; ``depth`` the region's
    distance transform. Where the depth along the axis dips below :data:`_NECK` of the radius
    away from the caps, two end caps meet (the neck of rods touching end to end): each rod
    runs from its own tip to the neck. Without a neck it stays one rod: rods overlapping in
    line by more than about a radius look like one long rod, and cutting every long rod at
    the typical length would cut a polydisperse sample's long rods in two.

    Returns
    -------
    list of (ndarray, ndarray)
        The two rods' axis end points, or ``[(a, b)]`` when the rod is not too long.
    """
    ab = b - a
    axis = float(np.hypot(*ab))
    whole = axis + 2 * rho
    if length_px is None or whole <= _TOO_LONG * length_px or axis < 1e-6:
        return [(a, b)]
    d = ab / axis
    # the depth along the axis, one sample a pixel, off the caps (a cap's depth falls anyway)
    s = np.arange(rho, axis - rho + 1e-9, 1.0)
    if len(s):
        pts = a + s[:, None] * d
        rc = np.clip(np.round(pts).astype(int), 0, np.array(depth.shape) - 1)
        prof = ndi.gaussian_filter1d(depth[rc[:, 0], rc[:, 1]], 1.0)
        k = int(np.argmin(prof))
    if not len(s) or prof[k] >= _NECK * rho:
        # no neck: length alone is no evidence of two rods (a real sample's long tail, or
        # one rod longer than most, would be cut in two), so it stays one
        return [(a, b)]
    cut = float(s[k])
    # each rod's tip at the neck: its axis end a radius back (never past its own start)
    ends = [(0.0, max(cut - rho, 0.0)), (min(cut + rho, axis), axis)]
    return [(a + e0 * d, a + e1 * d) for e0, e1 in ends]


def _model_outline(a, b, rho):
    """Points (about 1 px apart) on the outline of the stadium of radius ``rho`` about a–b."""
    ab = b - a
    length = float(np.hypot(*ab))
    d = ab / length if length > 0 else np.array([1.0, 0.0])
    nrm = np.array([-d[1], d[0]])
    s = np.linspace(0.0, length, max(int(np.ceil(length)), 1) + 1)[:, None]
    sides = [a + s * d + rho * nrm, a + s * d - rho * nrm]
    ncap = max(int(np.ceil(np.pi * rho)), 4)
    phi = np.linspace(-np.pi / 2, np.pi / 2, ncap)[:, None]
    caps = [b + rho * (np.cos(phi) * d + np.sin(phi) * nrm),
            a - rho * (np.cos(phi) * d + np.sin(phi) * nrm)]
    return np.concatenate(sides + caps)


def _consistent(axes, radii, inside, tree, region):
    """Indices of the rods that survive the consistency check, dropping the worst first.

    A rod's score is the share of its model outline on the region's outline or hidden in
    another kept rod (where two rods cross or touch, the hidden side runs along the other's
    edge); a model point outside the region (the fit ran beyond it) is not hidden by anything.
    A rod mostly inside another at least as large is a duplicate (score 0). The worst rod is
    dropped until every score reaches :data:`_CONSISTENT`. What does not depend on which rods
    are kept (model outlines, which points each rod hides, pairwise overlaps) is computed once.
    """
    n = len(axes)
    on, inreg, hidden = [], [], []
    for k in range(n):
        q = _model_outline(*axes[k], radii[k] + _EDGE_INSET_PX - 0.5)
        near, _ = tree.query(q, distance_upper_bound=_ON_OUTLINE_PX + 1e-9)
        rc = np.round(q).astype(int)
        out = ((rc < 0) | (rc >= np.array(region.shape))).any(axis=1)
        rc = np.clip(rc, 0, np.array(region.shape) - 1)
        on.append(np.isfinite(near))
        inreg.append(~out & region[rc[:, 0], rc[:, 1]])
        hidden.append(np.stack([np.zeros(len(q), bool) if j == k else
                                stadium_distance(q, *axes[j]) <= radii[j] + _ON_OUTLINE_PX
                                for j in range(n)]))
    area = np.count_nonzero(inside, axis=1)
    f = inside.astype(np.float32)
    shared = f @ f.T  # pixel counts (exact in float32 below 2**24)
    own = np.maximum(area, 1)
    dup = (shared > _MAX_SHARED * own[:, None]) & (area[None, :] >= own[:, None])
    np.fill_diagonal(dup, False)
    keep = list(range(n))
    while keep:
        scores = []
        for k in keep:
            others = [j for j in keep if j != k]
            ok = on[k] | hidden[k][others].any(axis=0) if others else on[k].copy()
            ok &= inreg[k] | on[k]
            score = float(ok.mean())
            scores.append(min(score, 0.0) if dup[k, others].any() else score)
        worst = int(np.argmin(scores))
        if scores[worst] >= _CONSISTENT:
            break
        keep.pop(worst)
    return keep


def unexplained_boxes(rest, min_px):
    """Boxes of the parts of ``rest`` that could hold a particle (not slivers).

    Parameters
    ----------
    rest : (M, N) ndarray of bool
        What no particle of a region explains.
    min_px : float
        Parts smaller than this many pixels are left out.

    Returns
    -------
    list of tuple of int
        ``(row0, col0, row1, col1)`` (in ``rest``'s coordinates) of every part of at least
        ``min_px`` pixels and more than ``_REST_DEPTH_PX`` thick (inscribed radius): thinner
        parts are the pixelation and blur left between split particles and a ragged outline
        (the fillet where two particles meet), not a particle. Depths are those of the part
        alone (outside ``rest`` counts as background, at its edges too). Shared by
        :mod:`.separate` (UECS pieces) and :func:`split_rods`.

    Examples
    --------
    >>> rest = np.zeros((20, 40), bool)
    >>> rest[2:12, 2:12] = True   # a 10 px square: could hold a particle
    >>> rest[15:17, 5:35] = True  # a 2 px sliver: no
    >>> unexplained_boxes(rest, 30)
    [(2, 2, 12, 12)]
    """
    rows, cols = np.flatnonzero(rest.any(axis=1)), np.flatnonzero(rest.any(axis=0))
    if rows.size == 0 or np.count_nonzero(rest) < min_px:
        return []
    # on the parts' bounding box with a free pixel around it (the work is the parts', not the
    # whole crop's)
    r0, c0 = int(rows[0]) - 1, int(cols[0]) - 1
    part = np.pad(rest[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    lab, n = ndi.label(part)
    depth = ndi.distance_transform_edt(part)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    deepest = ndi.maximum(depth, lab, np.arange(1, n + 1))
    return [(r0 + sl[0].start, c0 + sl[1].start, r0 + sl[0].stop, c0 + sl[1].stop)
            for k, sl in enumerate(ndi.find_objects(lab))
            if sl is not None and sizes[k + 1] >= min_px and deepest[k] > _REST_DEPTH_PX]


def _greedy(cand, point, closeness, n_cand, n_outline, min_gain):
    """Candidates picked one by one by the outline points they newly explain.

    ``cand``, ``point``, ``closeness``: the (candidate, outline point) pairs of
    :func:`_band_pairs` and how near the point lies to the candidate's rim (ties). Returns the
    picks and which outline points they explain.
    """
    done = np.zeros(n_outline, bool)
    picked = []
    while len(picked) < _MAX_RODS and len(cand):
        free = ~done[point]
        gain = np.bincount(cand[free], minlength=n_cand)
        score = gain + np.bincount(cand[free], closeness[free], minlength=n_cand) * 1e-3
        best = int(np.argmax(score))
        if gain[best] < min_gain:
            break
        picked.append(best)
        done[point[cand == best]] = True
    return picked, done


def split_rods(mask, radius_px, *, length_px=None, min_px=30):
    """Decompose one region into rods of about the given radius.

    Parameters
    ----------
    mask : (M, N) ndarray of bool
        One region (a touching group), e.g. a crop of the segmentation.
    radius_px : float
        The frame's rod radius, half the width (see :func:`rod_radius_px`), as measured on the
        same kind of masks.
    length_px : float, optional
        The frame's typical rod length tip to tip (:func:`rod_geometry_px`): where a rod's
        end is hidden under another rod, its tip is put where this length places it within
        the hidden stretch (without it, in the middle of that stretch).
    min_px : int, optional
        Unexplained parts smaller than this are not reported.

    Returns
    -------
    RodSplit or None
        None when no rod fits the region (no admissible axis, or none consistent).

    Examples
    --------
    >>> yy, xx = np.mgrid[:80, :80]
    >>> p = np.column_stack([yy.ravel(), xx.ravel()]).astype(float)
    >>> a = stadium_distance(p, (40, 20), (40, 60)).reshape(80, 80) <= 6
    >>> b = stadium_distance(p, (20, 40), (60, 40)).reshape(80, 80) <= 6
    >>> s = split_rods(a | b, 6.0)
    >>> len(s.pieces), s.rest
    (2, [])
    >>> sorted(round(float(np.hypot(*(q - p)))) for p, q in s.axes)  # axes, caps excluded
    [39, 39]
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask (shape {mask.shape}) must be 2-D")
    r = float(radius_px)
    if not np.isfinite(r) or r <= 1.0:
        raise ValueError(f"radius_px {radius_px!r} must be a number above 1")
    if not mask.any():
        return None
    # work on the region's box with a free margin (distances and outlines as in the frame)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, c0 = rows[0] - 1, cols[0] - 1
    m = np.zeros((rows[-1] - rows[0] + 3, cols[-1] - cols[0] + 3), bool)
    m[1:-1, 1:-1] = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    depth = ndi.distance_transform_edt(m)
    tol = max(_RADIUS_TOL_PX, _RADIUS_TOL_FRAC * r)
    tol_lo = max(_RADIUS_TOL_PX, _RADIUS_TOL_LO_FRAC * r)
    # the axis of a digitised band of width 2r lies ~0.25 px deeper than r on average
    admissible = depth >= r + 0.25 - tol_lo
    outline = _boundary(m)
    rim = r - _EDGE_INSET_PX  # outline pixels of a rod lie about here from its axis
    min_gain = _MIN_GAIN_RADII * r

    def search(angles):
        """Candidates in ``angles`` and their (candidate, outline point, closeness) pairs."""
        a, b, runs = _candidates(admissible, r, angles)
        if not len(a):
            return (a, b, np.zeros(0, int), np.zeros(0, int), np.zeros(0, int),
                    np.zeros(0))
        # the outline band stays narrow (a wide one gathers a crossing neighbour's notch); a
        # thin rod's outline, ~0.8 r out, still lies in it
        cand, point, dist = _band_pairs(outline, runs, max(rim - tol, 0.0), rim + tol, angles)
        # a candidate's gain only shrinks as the picks explain more: one that explains too
        # little of the whole outline is never picked (its score, gain + closeness·1e-3 with
        # closeness at most the gain, stays under that of any candidate the loop could pick)
        alive = np.bincount(cand, minlength=len(a)) >= min_gain
        keep = np.flatnonzero(alive)
        index = np.full(len(a), -1)
        index[keep] = np.arange(len(keep))
        sel = alive[cand]
        return (a[keep], b[keep], runs[keep, 0], index[cand[sel]], point[sel],
                1.0 - np.abs(dist[sel] - rim) / (2 * tol))

    coarse = np.deg2rad(np.arange(0.0, 180.0, _COARSE_DEG))
    a, b, ang, cand, point, closeness = search(coarse)
    picked, done = _greedy(cand, point, closeness, len(a), len(outline), min_gain)
    if not picked:
        return None
    # the fine directions beside each pick's, searched anew and picked among with the coarse
    fine = np.unique(np.round(coarse[ang[picked].astype(int)][:, None]
                              + np.deg2rad([-_FINE_DEG, _FINE_DEG]), 9) % np.pi)
    fa, fb, _, fcand, fpoint, fclose = search(fine)
    if len(fa):
        a, b = np.concatenate([a, fa]), np.concatenate([b, fb])
        cand = np.concatenate([cand, fcand + len(a) - len(fa)])
        point, closeness = np.concatenate([point, fpoint]), np.concatenate([closeness, fclose])
        picked, done = _greedy(cand, point, closeness, len(a), len(outline), min_gain)
    axes = np.stack([a[picked], b[picked]], axis=1)
    radii = np.full(len(picked), r - _EDGE_INSET_PX)
    # each outline pixel explained by a pick fits the rod whose outline it lies closest to
    dev = np.abs(np.sqrt(_segment_sq_distances(outline, a[picked], b[picked])) - rim)
    mine = np.where(done, np.argmin(dev, axis=0), -1)
    for k in range(len(picked)):
        # a few steps straighten a tilted candidate; the refit below converges
        axes[k, 0], axes[k, 1], radii[k] = _fit_rod(outline[mine == k], axes[k, 0], axes[k, 1],
                                                   radii[k], max_iter=3)
    # once more with the explained outline pixels nearest each fitted rod: a candidate tilted by a
    # direction step (the admissible band of a thin-rod tolerance holds one) misses part of
    # its rod's sides, and the fit from those alone stays tilted
    dev = np.abs(np.sqrt(_segment_sq_distances(outline, axes[:, 0], axes[:, 1]))
                 - radii[:, None])
    # (a round piece, a sphere among rods, takes every outline pixel near its circle: the
    # rods' bands about the candidates in it hold only part of it)
    near = dev <= np.maximum(tol, _RADIUS_TOL_FRAC * radii)[:, None]
    near &= done | (np.hypot(*(axes[:, 1] - axes[:, 0]).T) < radii)[:, None]
    mine = np.where(near.any(axis=0), np.argmin(np.where(near, dev, np.inf), axis=0), -1)
    fitted, fitted_r = [], []
    for k in range(len(picked)):
        pa, pb, rho = _fit_rod(outline[mine == k], axes[k, 0], axes[k, 1], radii[k])
        pa, pb = _hidden_ends(outline[mine == k], pa, pb, rho, length_px)
        # one axis along two rods in line (end to end, or ends overlapping): two rods
        for ends in _collinear_pair(pa, pb, rho, depth, length_px):
            fitted.append(np.stack(ends))
            fitted_r.append(rho)
    axes, radii = np.array(fitted, float).reshape(-1, 2, 2), np.array(fitted_r, float)
    # a rod is as wide as the frame's rods (within the tolerances, half a pixel for the fit);
    # a wider piece is kept only when round (axis shorter than its radius): a sphere touching
    # the rods, fitted by its own outline. An elongated wide one is a slab of rods or a fit
    # that swelled onto a neighbour's outline.
    axis_px = np.hypot(*(axes[:, 1] - axes[:, 0]).T)
    fits = (radii >= rim - tol_lo - 0.5) & ((radii <= rim + tol + 0.5) | (axis_px < radii))
    if not fits.any():
        return None
    axes, radii = axes[fits], radii[fits]
    # radii now hold the fitted outline-pixel radius; the rod's edge lies half a pixel out
    radii = radii + _EDGE_INSET_PX
    pix = np.argwhere(m).astype(float)
    # how far each region pixel lies outside each rod's edge (negative inside)
    over = np.stack([stadium_distance(pix, *ax) - rho for ax, rho in zip(axes, radii)])
    keep = _consistent(axes, radii, over <= 0, cKDTree(outline), m)
    if not keep:
        return None
    axes, radii, over = axes[keep], radii[keep], over[keep]
    # a pixel centre within half a pixel (+ a quarter for the fit) of a rod's edge is the rod's
    inside = over <= 0.25
    rest = np.zeros(m.shape, bool)
    rest[tuple(pix[~inside.any(axis=0)].astype(int).T)] = True
    boxes = unexplained_boxes(rest, min_px)
    blocked = np.zeros(m.shape, bool)
    for y0, x0, y1, x1 in boxes:
        blocked[y0:y1, x0:x1] |= rest[y0:y1, x0:x1]
    own = np.full(m.shape, -1)
    idx = tuple(pix.astype(int).T)
    own[idx] = np.argmin(over, axis=0)
    own[blocked] = -1
    pieces = []
    for k in range(len(axes)):
        piece = np.zeros(m.shape, bool)
        piece[idx] = inside[k]
        pieces.append(piece)
    explained_pts = np.zeros(len(outline), bool)
    for ax, rho in zip(axes, radii):
        explained_pts |= np.abs(stadium_distance(outline, *ax) - (rho - _EDGE_INSET_PX)) <= tol
    # back to the caller's coordinates
    full_pieces = []
    for piece in pieces:
        out = np.zeros(mask.shape, bool)
        out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = piece[1:-1, 1:-1]
        full_pieces.append(out)
    owner = np.full(mask.shape, -1)
    owner[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = own[1:-1, 1:-1]
    shift = np.array([r0, c0], float)
    rest_boxes = [(max(y0 + r0, 0), max(x0 + c0, 0), min(y1 + r0, mask.shape[0]),
                   min(x1 + c0, mask.shape[1])) for y0, x0, y1, x1 in boxes]
    return RodSplit(full_pieces, owner, rest_boxes, axes + shift, radii,
                    float(explained_pts.mean()))


def rods_instead(mask, radius_px, *, pieces, rest, length_px=None, min_px=30,
                 fit_disc=None):
    """The rod split of a region when it explains the region better than UECS, else None.

    The decision :func:`~particlewatch.analysis.separate.separate` takes for every region of
    a frame that holds rods (``radius_px`` from :func:`rod_radius_px` not None):

    - UECS left part of the region unexplained (an agglomerate: the crossing of two rods
      erodes to one convex core; a pile): the rods win when they leave fewer pixels
      unexplained;
    - UECS explained the whole region (one convex particle: two rods side by side; or pieces
      regrown from markers that cut rods short): the rods win when at least two of them
      explain nearly all of its outline (:data:`_REPLACE_EXPLAINED`) and leave nothing
      unexplained. A sphere or a single rod keeps UECS's result.

    With ``fit_disc``, round particles wider than the rods (spheres in a mixed sample) are
    fitted first (:func:`rods_and_discs`) and the rods split what they leave; that
    decomposition is weighed by the same rules (holding at least one rod) and wins over
    the rods alone when it leaves less unexplained.

    Parameters
    ----------
    mask : (M, N) ndarray of bool
        The region.
    radius_px : float
        The frame's rod radius (:func:`rod_radius_px`).
    pieces : list of (M, N) ndarray of bool
        UECS's particles in the region (full extents; ``[mask]`` for one particle).
    rest : list of tuple of int
        UECS's unexplained boxes ``(row0, col0, row1, col1)`` in the mask's coordinates.
    length_px : float, optional
        The frame's typical rod length (:func:`rod_geometry_px`), for hidden ends.
    min_px : int, optional
        Smallest unexplained part reported (``separate``'s ``min_marker_px``).
    fit_disc : callable, optional
        ``fit_disc(points, mask, (lo, hi)) -> (disc, score) | None``: the disc within
        ``mask`` whose circle, of a radius between ``lo`` and ``hi``, runs through most of
        the outline ``points`` (``separate``'s consensus fit), score the depth inside it. Without it, rods only.

    Returns
    -------
    RodSplit or None
        Discs, when any, follow the rods in ``pieces`` (``axes`` and ``radii`` are the
        rods').
    """
    mask = np.asarray(mask, bool)
    if not rest and len(pieces) < 2:
        # one particle: handed to rods only when too thick for one rod (side by side)
        depth = ndi.distance_transform_edt(np.pad(mask, 1))
        r = float(radius_px)
        if depth.max() <= r + 0.25 + max(_RADIUS_TOL_PX, _RADIUS_TOL_FRAC * r) and not (
                _too_long(mask, length_px)):
            # (one rod thick, but too long for one: rods end to end, handed on)
            return None
        # ... and not round: a sphere is no slab of rods (separate's edge-count roundness;
        # two rods side by side score ~0.7)
        p = np.pad(mask, 1)
        edges = np.count_nonzero(p[:, 1:] != p[:, :-1]) + np.count_nonzero(p[1:] != p[:-1])
        if 4 * np.pi * np.count_nonzero(mask) / (edges * np.pi / 4) ** 2 > _ROUND:
            return None
    splits = [split_rods(mask, radius_px, length_px=length_px, min_px=min_px)]
    if fit_disc is not None:
        splits.append(rods_and_discs(mask, radius_px, fit_disc=fit_disc,
                                     length_px=length_px, min_px=min_px))
    splits = [sp for sp in splits if sp is not None and len(sp.radii)]
    if not splits:
        return None
    # the decomposition leaving least unexplained; on a tie the one with discs (a round
    # stadium laid over a sphere takes the rod's outline beside it: its width is off)
    left = [_unexplained(mask, sp.pieces, sp.rest) for sp in splits]
    split = splits[len(left) - 1 - int(np.argmin(left[::-1]))]
    if rest:
        return split if min(left) < _unexplained(mask, pieces, rest) else None
    if len(split.pieces) >= 2 and not split.rest and split.explained >= _REPLACE_EXPLAINED:
        return split
    return None



def _too_long(mask, length_px):
    """Whether the region's caliper length exceeds :data:`_TOO_LONG` typical rod lengths."""
    if length_px is None:
        return False
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    limit = _TOO_LONG * float(length_px)
    # the box's diagonal bounds the caliper: most regions stop here
    if np.hypot(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) <= limit:
        return False
    pts = _boundary(mask).astype(float)
    try:
        v = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        return False
    # pixel centres: the pixels' own caliper is about one pixel more (as rod_geometry_px)
    return float(np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1)).max()) + 1.0 > limit


def rods_and_discs(mask, radius_px, *, fit_disc, length_px=None, min_px=30, max_discs=3):
    """One region as round particles wider than the rods plus rods (a mixed sample).

    A sphere touching a rod defeats both splits alone: UECS cannot cut the rod's straight
    sides into convex members of the right size, and the rods laid over the sphere are short
    stadiums of the rods' width (or none) that leave the rest of it unexplained. The sphere
    shows itself as a circular arc of the region's outline of a radius clearly above the
    rods' (a rod's end cap is a circle of the rods' radius): ``fit_disc`` takes the disc of
    the best-supported circle among the outline points no disc explains yet, up to
    ``max_discs`` times; the rods are then split (:func:`split_rods`) in what the discs leave.

    Returns
    -------
    RodSplit or None
        None when no disc wider than the rods is found or no rod fits the rest. ``pieces``
        holds the rods, then the discs; a pixel in a rod and a disc is the rod's in
        ``owner`` (a rod's hidden end under a sphere is the model's, the sphere keeps its
        own outline); ``explained`` counts outline pixels on a rod or on a disc's circle.
    """
    mask = np.asarray(mask, bool)
    r = float(radius_px)
    wider = r + max(_RADIUS_TOL_PX, _RADIUS_TOL_FRAC * r) + 1.0
    outline = _boundary(mask)
    tol = max(_RADIUS_TOL_PX, _RADIUS_TOL_FRAC * r)
    free = np.ones(len(outline), bool)
    discs, on_disc = [], np.zeros(len(outline), bool)
    # a disc inside the region is no wider than the region's thickest part
    widest = float(ndi.distance_transform_edt(np.pad(mask, 1)).max()) + 1.0
    for _ in range(max_discs):
        fit = fit_disc(outline[free].astype(int), mask, (wider, widest))
        if fit is None:
            break
        disc, score = fit
        # the score is the depth inside the disc: its largest value is the disc's radius
        # (a quarter pixel of pixelation aside)
        rr, cc = np.nonzero(disc)
        depth = score[rr, cc]
        rho = float(depth.max()) - 0.5  # (the disc reaches half a pixel beyond the circle)
        if rho < wider:
            break
        cy, cx = rr[np.argmax(depth)], cc[np.argmax(depth)]
        on = np.abs(np.hypot(outline[:, 0] - cy, outline[:, 1] - cx) - rho) <= tol
        discs.append(disc)
        on_disc |= on
        free &= ~on
    if not discs:
        return None
    taken = np.any(discs, axis=0)
    remainder = mask & ~taken
    if np.count_nonzero(remainder) < min_px:
        return None
    split = split_rods(remainder, radius_px, length_px=length_px, min_px=min_px)
    if split is None:
        return None
    # each rod's extent is its stadium in the whole region: where it runs under a sphere
    # the model's, not cut at the disc
    pix = np.argwhere(mask)
    rods_ = []
    near = ndi.binary_dilation(taken, iterations=2)
    axes, radii = split.axes.copy(), split.radii.copy()
    for k, (ax, rho) in enumerate(zip(axes, radii)):
        # an end that stops at a sphere is hidden under it: the rod has the frame's typical
        # length there (as under a crossing rod), never less than it shows
        if length_px is None:
            continue
        d = ax[1] - ax[0]
        n = float(np.hypot(*d))
        if n < 1e-9:
            continue
        u = d / n
        full = max(float(length_px) - 2 * rho, n)
        for end, other, sign in ((1, 0, 1.0), (0, 1, -1.0)):
            tip = np.round(ax[end] + sign * u * rho).astype(int)
            tip = np.clip(tip, 0, np.array(mask.shape) - 1)
            if near[tuple(tip)]:
                ax[end] = ax[other] + sign * u * full
                break
    for ax, rho in zip(axes, radii):
        piece = np.zeros(mask.shape, bool)
        piece[tuple(pix[stadium_distance(pix.astype(float), *ax) <= rho].T)] = True
        rods_.append(piece)
    pieces = rods_ + discs
    owner = split.owner.copy()
    for k, disc in enumerate(discs):
        owner[disc & (owner < 0)] = len(split.pieces) + k
    covered = np.any(pieces, axis=0)
    on_rod = np.zeros(len(outline), bool)
    for ax, rho in zip(axes, radii):
        on_rod |= np.abs(stadium_distance(outline, *ax) - (rho - _EDGE_INSET_PX)) <= tol
    return RodSplit(pieces, owner, unexplained_boxes(mask & ~covered, min_px), axes,
                    radii, float(np.mean(on_rod | on_disc)))


def _unexplained(mask, pieces, boxes):
    """Region pixels inside ``boxes`` that no piece covers."""
    covered = np.zeros(mask.shape, bool)
    for p in pieces:
        covered |= p
    left = np.zeros(mask.shape, bool)
    for r0, c0, r1, c1 in boxes:
        left[r0:r1, c0:c1] = True
    return int(np.count_nonzero(left & mask & ~covered))
