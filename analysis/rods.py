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
  120 directions, is a candidate axis (a Hough transform restricted to admissible segments).
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
from scipy.optimize import least_squares
from scipy.spatial import ConvexHull, QhullError, cKDTree

__all__ = ["RodSplit", "rod_geometry_px", "rod_radius_px", "split_rods", "rods_instead", "stadium_distance"]

# Directions of candidate axes: 3° steps. A 40 px axis tilted by half a step is off by 0.5 px
# at its ends, inside the admissible band (2 × the tolerance below wide); the fit refines it.
_ANGLES = np.deg2rad(np.arange(0.0, 180.0, 3.0))
# Tolerance on the radius of admissible axis points: rods of a sample vary in width (~10%) and
# a digitised edge by ±0.5 px.
_RADIUS_TOL_FRAC = 0.2
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


def _segment_distances(points, a, b):
    """Distances (C, n) of ``points`` (n, 2) from C segments ``a``–``b`` (C, 2)."""
    ab = (b - a).astype(np.float32)
    n2 = np.maximum((ab ** 2).sum(1), 1e-12)[:, None]
    # row and column parts separately: (C, n) float32 arrays, no (C, n, 2) temporaries
    ry = points[None, :, 0].astype(np.float32) - a[:, None, 0].astype(np.float32)
    rx = points[None, :, 1].astype(np.float32) - a[:, None, 1].astype(np.float32)
    t = np.clip((ry * ab[:, :1] + rx * ab[:, 1:]) / n2, 0.0, 1.0)
    ry -= t * ab[:, :1]
    rx -= t * ab[:, 1:]
    return np.hypot(ry, rx)


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
    for k, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        crop = np.pad(labels[sl] == k + 1, 1)
        area = int(np.count_nonzero(crop))
        if area < 30:
            continue
        pts = _boundary(crop)
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
    return float(np.median(widths)) / 2, float(np.median(lengths))


def _candidates(admissible, min_len):
    """Maximal straight runs of admissible pixels in every direction: (a, b) end points."""
    pts = np.argwhere(admissible).astype(float)
    if len(pts) < 2:
        return np.zeros((0, 2)), np.zeros((0, 2))
    starts, ends = [], []
    for th in _ANGLES:
        d = np.array([np.sin(th), np.cos(th)])  # (row, col) direction of the axis
        nrm = np.array([np.cos(th), -np.sin(th)])
        u = pts @ d
        line = np.round(pts @ nrm).astype(int)
        order = np.lexsort((u, line))
        u, line = u[order], line[order]
        brk = np.flatnonzero((np.diff(line) != 0) | (np.diff(u) > _RUN_GAP_PX))
        first = np.concatenate([[0], brk + 1])
        last = np.concatenate([brk, [len(u) - 1]])
        keep = u[last] - u[first] >= min_len
        if not keep.any():
            continue
        first, last = first[keep], last[keep]
        base = line[first][:, None] * nrm[None]
        starts.append(base + u[first][:, None] * d[None])
        ends.append(base + u[last][:, None] * d[None])
    if not starts:
        return np.zeros((0, 2)), np.zeros((0, 2))
    a, b = np.concatenate(starts), np.concatenate(ends)
    # runs of neighbouring lines and directions nearly coincide: one per 1 px cell of both
    # end points (the fit refines the axis; the greedy pick needs one near each axis)
    key = np.round(np.column_stack([a, b])).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return a[first], b[first]


def _fit_rod(pts, a, b, r):
    """Axis end points and radius of the stadium whose outline best fits ``pts``."""
    if len(pts) < 6:
        return a, b, r

    def parts(q):
        ab = q[2:4] - q[:2]
        n2 = max(float(ab @ ab), 1e-12)
        t = np.clip((pts - q[:2]) @ ab / n2, 0.0, 1.0)
        off = pts - q[:2] - t[:, None] * ab
        d = np.maximum(np.hypot(off[:, 0], off[:, 1]), 1e-9)
        return t, off / d[:, None], d

    def resid(q):
        return parts(q)[2] - q[4]

    def jac(q):
        # the nearest axis point moves with the end points by (1 - t, t) (envelope theorem)
        t, n, _ = parts(q)
        return np.column_stack([-(1 - t)[:, None] * n, -t[:, None] * n, -np.ones(len(t))])

    q0 = np.r_[a, b, r]
    fit = least_squares(resid, q0, jac=jac, loss="soft_l1", f_scale=1.0, max_nfev=40)
    q = fit.x
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


def _consistency(k, axes, radii, tree, inside):
    """Share of rod ``k``'s model outline on the region's outline or hidden in another rod."""
    a, b = axes[k]
    q = _model_outline(a, b, radii[k] + _EDGE_INSET_PX - 0.5)
    near, _ = tree.query(q, distance_upper_bound=_ON_OUTLINE_PX + 1e-9)
    ok = np.isfinite(near)
    for j in range(len(axes)):
        if j != k and not ok.all():
            # (touching rods: the hidden side runs along the other's edge)
            ok |= stadium_distance(q, *axes[j]) <= radii[j] + _ON_OUTLINE_PX
    # a model point out of the region (the fit ran beyond it) is not hidden by anything
    rc = np.round(q).astype(int)
    out = ((rc < 0) | (rc >= np.array(inside.shape))).any(axis=1)
    rc = np.clip(rc, 0, np.array(inside.shape) - 1)
    ok &= ~out & inside[rc[:, 0], rc[:, 1]] | np.isfinite(near)
    return float(ok.mean())


def _rest_boxes(rest, min_px):
    """Boxes of the parts of ``rest`` that could hold a particle (not slivers)."""
    lab, n = ndi.label(rest)
    if n == 0:
        return []
    depth = ndi.distance_transform_edt(np.pad(rest, 1))[1:-1, 1:-1]
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    deepest = ndi.maximum(depth, lab, np.arange(1, n + 1))
    return [(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
            for k, sl in enumerate(ndi.find_objects(lab))
            if sl is not None and sizes[k + 1] >= min_px and deepest[k] > _REST_DEPTH_PX]


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
    # the axis of a digitised band of width 2r lies ~0.25 px deeper than r on average
    admissible = depth >= r + 0.25 - tol
    a, b = _candidates(admissible, min_len=r)
    if not len(a):
        return None
    outline = _boundary(m)
    dist = _segment_distances(outline, a, b)
    on = np.abs(dist - (r - _EDGE_INSET_PX)) <= tol
    closeness = np.where(on, 1.0 - np.abs(dist - (r - _EDGE_INSET_PX)) / (2 * tol), 0.0)
    done = np.zeros(len(outline), bool)
    picked = []
    min_gain = _MIN_GAIN_RADII * r
    while len(picked) < _MAX_RODS:
        gain = on[:, ~done].sum(axis=1)
        best = int(np.argmax(gain + closeness[:, ~done].sum(axis=1) * 1e-3))
        if gain[best] < min_gain:
            break
        picked.append(best)
        done |= on[best]
    if not picked:
        return None
    axes = np.stack([a[picked], b[picked]], axis=1)
    radii = np.full(len(picked), r - _EDGE_INSET_PX)
    # each outline pixel fits the rod whose outline it lies closest to
    res = np.abs(dist[picked] - radii[:, None])
    mine = np.where(on[picked].any(axis=0), np.argmin(res, axis=0), -1)
    for k in range(len(picked)):
        pa, pb, rho = _fit_rod(outline[mine == k], axes[k, 0], axes[k, 1], radii[k])
        axes[k] = _hidden_ends(outline[mine == k], pa, pb, rho, length_px)
        radii[k] = rho
    # radii now hold the fitted outline-pixel radius; the rod's edge lies half a pixel out
    radii = radii + _EDGE_INSET_PX
    tree = cKDTree(outline)
    pix = np.argwhere(m).astype(float)
    inside = np.stack([stadium_distance(pix, *ax) <= rho for ax, rho in zip(axes, radii)])
    keep = list(range(len(axes)))
    while keep:
        scores = [_consistency(i, axes[keep], radii[keep], tree, m) for i in range(len(keep))]
        for i, k in enumerate(keep):  # mostly inside another (larger) rod: a duplicate
            own = max(int(np.count_nonzero(inside[k])), 1)
            for j in keep:
                if j != k and (np.count_nonzero(inside[k] & inside[j]) > _MAX_SHARED * own
                               and np.count_nonzero(inside[j]) >= own):
                    scores[i] = min(scores[i], 0.0)
        worst = int(np.argmin(scores))
        if scores[worst] >= _CONSISTENT:
            break
        keep.pop(worst)
    if not keep:
        return None
    axes, radii = axes[keep], radii[keep]
    over = np.stack([stadium_distance(pix, *ax) - rho for ax, rho in zip(axes, radii)])
    # a pixel centre within half a pixel (+ a quarter for the fit) of a rod's edge is the rod's
    inside = over <= 0.25
    rest = np.zeros(m.shape, bool)
    rest[tuple(pix[~inside.any(axis=0)].astype(int).T)] = True
    boxes = _rest_boxes(rest, min_px)
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


def rods_instead(mask, radius_px, *, pieces, rest, length_px=None, min_px=30):
    """The rod split of a region when it explains the region better than UECS, else None.

    The decision :func:`~particlewatch.analysis.separate.separate` takes for every region of
    a frame that holds rods (``radius_px`` from :func:`rod_radius_px` not None):

    - UECS left part of the region unexplained (an agglomerate: the crossing of two rods
      erodes to one convex core; a pile): the rods win when they leave fewer pixels
      unexplained;
    - UECS explained the whole region (one convex particle: two rods side by side; or pieces
      regrown from markers that cut rods short): the rods win when at least two of them
      explain nearly all of its outline (:data:`_REPLACE_EXPLAINED`) and leave nothing
      unexplained. A sphere, a single rod or a sphere touching a rod keeps UECS's result.

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

    Returns
    -------
    RodSplit or None
    """
    mask = np.asarray(mask, bool)
    if not rest and len(pieces) < 2:
        # one particle: handed to rods only when too thick for one rod (side by side)
        depth = ndi.distance_transform_edt(np.pad(mask, 1))
        r = float(radius_px)
        if depth.max() <= r + 0.25 + max(_RADIUS_TOL_PX, _RADIUS_TOL_FRAC * r):
            return None
        # ... and not round: a sphere is no slab of rods (separate's edge-count roundness;
        # two rods side by side score ~0.7)
        p = np.pad(mask, 1)
        edges = np.count_nonzero(p[:, 1:] != p[:, :-1]) + np.count_nonzero(p[1:] != p[:-1])
        if 4 * np.pi * np.count_nonzero(mask) / (edges * np.pi / 4) ** 2 > _ROUND:
            return None
    split = split_rods(mask, radius_px, length_px=length_px, min_px=min_px)
    if split is None:
        return None
    ours = _unexplained(mask, split.pieces, split.rest)
    if rest:
        return split if ours < _unexplained(mask, pieces, rest) else None
    if len(split.pieces) >= 2 and not split.rest and split.explained >= _REPLACE_EXPLAINED:
        return split
    return None


def _unexplained(mask, pieces, boxes):
    """Region pixels inside ``boxes`` that no piece covers."""
    covered = np.zeros(mask.shape, bool)
    for p in pieces:
        covered |= p
    left = np.zeros(mask.shape, bool)
    for r0, c0, r1, c1 in boxes:
        left[r0:r1, c0:c1] = True
    return int(np.count_nonzero(left & mask & ~covered))
