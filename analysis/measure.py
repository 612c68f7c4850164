"""Measure labelled particles in nm: size, shape and intensity, one row per label.

Everything that can be is computed for all particles at once (pixel sums with ``bincount``).
Outlines are sub-pixel: one point on every pixel edge between a particle and anything else,
placed where the lightly smoothed image crosses the particle's own edge level (the mean of the
grey levels on either side of its outline, so the area hardly moves but the pixel staircase
and the quantisation noise go), ordered by angle about the centroid and smoothed along the
outline; a particle whose outline is not star-shaped about its centroid (low solidity) is
traced with :func:`skimage.measure.find_contours` instead. Feret diameters, convex-hull
perimeter and area come for all particles at once from the support function (the outline
projected on 90 directions with one matrix product per block, reduced per particle), the
minimum refined to 0.1° around the coarse one: the true minimum caliper width, not a
moment-based axis. Definitions follow ANTEMA (SCIENCE.md §2): circularity = 4πA/P², convexity =
convex-hull perimeter / perimeter, solidity = area / convex-hull area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage import measure as skmeasure
from ._checks import check_pixel_nm

__all__ = ["measure", "COLUMNS", "feret_diameters", "outline"]

#: Columns of the table returned by :func:`measure`, in order.
COLUMNS = ("particle_id", "x_px", "y_px", "area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm",
           "perimeter_nm", "circularity", "convexity", "solidity", "aspect_ratio",
           "major_axis_nm", "minor_axis_nm", "shell_nm", "mean_intensity", "total_intensity",
           "contrast")

_INT_COLUMNS = ("particle_id",)
_OUTLINE_SIGMA = 0.7  # px; removes the staircase, rounds a corner by far less than a pixel
_STAR_SOLIDITY = 0.9  # below this the angle-ordered outline may fold back: trace it instead
_BG_BLOCK = 4  # px; the background map is built on blocks of this size
_SMOOTH_PASSES = 1  # on top of the sub-pixel edge points; more shrinks Feret min (au10, ps100)
_EDGE_SIGMA = 1.0  # px; image smoothing for sub-pixel edge points (rod width error least)


def measure(labels, image, pixel_nm, *, masks=None):
    """Measure every labelled particle.

    Parameters
    ----------
    labels : (M, N) ndarray of int
        0 background, positive integers particles (as from ``segment`` / ``separate``).
    image : (M, N) ndarray
        The frame the labels came from (for intensities and the shell of hollow particles).
    pixel_nm : float
        Pixel size in nm.
    masks : dict of int to (int, int, ndarray of bool), optional
        ``label -> (row0, col0, mask)``: the full extent of particles that overlap a neighbour
        (:attr:`~particlewatch.analysis.separate.Separation.masks`); such a particle is
        measured from its mask, not from its pixels in ``labels``.

    Returns
    -------
    table : dict of str to ndarray
        One row per label present, sorted by label, with the :data:`COLUMNS`:
        ``particle_id`` (the label), ``x_px``/``y_px`` (centroid column/row), sizes in nm,
        dimensionless shape factors, ``aspect_ratio`` = Feret max / Feret min, ``shell_nm``
        (shell thickness of a hollow particle, NaN otherwise), ``mean_intensity`` and
        ``total_intensity`` (raw image units) and ``contrast`` (mean inside minus local
        background).

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> lab = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).astype(int)
    >>> t = measure(lab, 1.0 - 0.5 * lab, 0.5)
    >>> int(t["particle_id"][0]), abs(float(t["ecd_nm"][0]) - 15.0) < 0.2
    (1, True)
    """
    labels, image, pixel_nm, masks = _validate_inputs(labels, image, pixel_nm, masks)
    parts = [_measure_labels(labels, image, skip=masks.keys())]
    if masks:
        sheet, sheet_image, offsets = _mosaic(masks, image)
        part = _measure_labels(sheet, sheet_image, subpixel=False)
        shift = offsets[part["particle_id"]]
        part["y"] = part["y"] + shift[:, 0]
        part["x"] = part["x"] + shift[:, 1]
        parts.append(part)
    t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(t["particle_id"], kind="stable")
    t = {k: v[order] for k, v in t.items()}
    _add_background_and_shell(t, labels, image)
    p = pixel_nm
    table = {
        "particle_id": t["particle_id"].astype(np.int64),
        "x_px": t["x"], "y_px": t["y"],
        "area_nm2": t["area"] * p * p, "ecd_nm": t["ecd"] * p,
        "feret_max_nm": t["feret_max"] * p, "feret_min_nm": t["feret_min"] * p,
        "perimeter_nm": t["perimeter"] * p,
        "circularity": t["circularity"], "convexity": t["convexity"],
        "solidity": t["solidity"], "aspect_ratio": t["aspect"],
        "major_axis_nm": t["major"] * p, "minor_axis_nm": t["minor"] * p,
        "shell_nm": t["shell"] * p, "mean_intensity": t["mean_i"],
        "total_intensity": t["total_i"], "contrast": t["contrast"],
    }
    return {name: np.asarray(table[name], dtype=np.int64 if name in _INT_COLUMNS
                             else np.float64) for name in COLUMNS}


def _validate_inputs(labels, image, pixel_nm, masks):
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels (shape {labels.shape}) must be 2-D")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels (dtype {labels.dtype}) must be an integer label image")
    image = np.asarray(image)
    if image.shape != labels.shape:
        raise ValueError(f"image (shape {image.shape}) must have the same shape as labels "
                         f"(shape {labels.shape})")
    pixel_nm = check_pixel_nm(pixel_nm)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    masks = dict(masks or {})
    for lab, entry in masks.items():
        r0, c0, mask = entry
        mask = np.asarray(mask, bool)
        if (mask.ndim != 2 or r0 < 0 or c0 < 0 or r0 + mask.shape[0] > labels.shape[0]
                or c0 + mask.shape[1] > labels.shape[1]):
            raise ValueError(f"masks[{lab}] (corner ({r0}, {c0}), shape {mask.shape}) must lie "
                             f"inside labels (shape {labels.shape})")
        masks[int(lab)] = (int(r0), int(c0), mask)
    return labels.astype(np.int32, copy=False), np.asarray(image, np.float64), pixel_nm, masks


def _mosaic(masks, image):
    """Lay overlapping particle masks side by side (1 px apart) so one pass measures them all.

    Returns the label sheet, the matching image sheet and, per label, the (row, col) to add to
    sheet coordinates to get frame coordinates.
    """
    items = sorted(masks.items(), key=lambda kv: -kv[1][2].shape[0])
    width = max(256, max(m.shape[1] for _, (_, _, m) in items) + 2)
    places, row, col, shelf = [], 1, 1, 0
    for lab, (r0, c0, m) in items:  # shelf packing, tallest first
        h, w = m.shape
        if col + w + 1 > width:
            row, col, shelf = row + shelf + 1, 1, 0
        places.append((lab, r0, c0, m, row, col))
        col += w + 1
        shelf = max(shelf, h)
    sheet = np.zeros((row + shelf + 1, width), np.int32)
    sheet_image = np.zeros(sheet.shape)
    offsets = np.zeros((max(masks) + 1, 2))
    for lab, r0, c0, m, r, c in places:
        h, w = m.shape
        sheet[r:r + h, c:c + w][m] = lab
        sheet_image[r:r + h, c:c + w] = image[r0:r0 + h, c0:c0 + w]
        offsets[lab] = (r0 - r, c0 - c)
    return sheet, sheet_image, offsets


def _measure_labels(labels, image, *, skip=(), subpixel=True):
    """Geometry and intensities of every label in ``labels`` except ``skip``, as arrays.

    ``subpixel``: place outline points on the image's edge level (see :func:`_edge_points`);
    off for the mosaic of overlapping masks, whose outline crosses the neighbour's interior.
    """
    h, w = labels.shape
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    n = int(labels.max()) + 1 if labels.size else 1
    area = np.bincount(lab, minlength=n).astype(float)
    present = area > 0
    present[0] = False
    if skip:
        present[[k for k in skip if k < n]] = False
    ids = np.flatnonzero(present)
    y, x = (idx // w).astype(float), (idx % w).astype(float)
    safe = np.maximum(area, 1)
    cy = np.bincount(lab, y, n) / safe
    cx = np.bincount(lab, x, n) / safe
    dy, dx = y - cy[lab], x - cx[lab]
    # second moments about the centroid; a pixel adds 1/12 of its own extent
    myy = np.bincount(lab, dy * dy, n) / safe + 1 / 12
    mxx = np.bincount(lab, dx * dx, n) / safe + 1 / 12
    mxy = np.bincount(lab, dy * dx, n) / safe
    half = np.sqrt(((myy - mxx) / 2) ** 2 + mxy ** 2)
    major = 4 * np.sqrt(np.clip((myy + mxx) / 2 + half, 0, None))
    minor = 4 * np.sqrt(np.clip((myy + mxx) / 2 - half, 0, None))
    vals = image.ravel()[idx]
    finite = np.isfinite(vals)
    total_i = np.bincount(lab, np.where(finite, vals, 0.0), n)
    count_i = np.bincount(lab, finite.astype(float), n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_i = np.where(count_i > 0, total_i / np.maximum(count_i, 1), np.nan)

    smooth = _edge_image(image) if subpixel else None
    geo = _outline_geometry(labels, ids, cy, cx, smooth)
    a = area[ids]
    perim = geo["perimeter"]
    with np.errstate(invalid="ignore", divide="ignore"):
        circ = np.where(perim > 0, 4 * np.pi * a / perim ** 2, np.nan)
        conv = np.where(perim > 0, np.minimum(geo["hull_perimeter"] / perim, 1.0), np.nan)
        sol = np.where(geo["hull_area"] > 0,
                       np.minimum(geo["poly_area"] / geo["hull_area"], 1.0), 1.0)
        aspect = np.where(geo["feret_min"] > 0, geo["feret_max"] / geo["feret_min"], np.nan)
    return {"particle_id": ids, "y": cy[ids], "x": cx[ids],
            "area": a, "ecd": 2 * np.sqrt(a / np.pi), "feret_max": geo["feret_max"],
            "feret_min": geo["feret_min"], "perimeter": perim, "circularity": circ,
            "convexity": conv, "solidity": sol, "aspect": aspect, "major": major[ids],
            "minor": minor[ids], "mean_i": mean_i[ids], "total_i": total_i[ids]}


def _edge_image(image):
    """The image lightly smoothed (σ = :data:`_EDGE_SIGMA` px) for sub-pixel edge points;
    non-finite pixels take the median so they do not spread."""
    finite = np.isfinite(image)
    fill = float(np.median(image[finite])) if finite.any() else 0.0
    return ndi.gaussian_filter(np.where(finite, image, fill).astype(np.float32), _EDGE_SIGMA)


def _edge_points(labels, smooth=None):
    """One point per pixel edge between a label and anything else: (label, row, col) arrays.

    Without ``smooth`` the point is the edge's midpoint. With it (a smoothed image of the same
    shape) the point slides along the line joining the two pixel centres to where ``smooth``
    crosses the particle's edge level, the mean of the values on either side of its outline;
    it stays between the two centres.
    """
    p = np.pad(labels, 1)
    v = None if smooth is None else np.pad(smooth, 1, mode="edge")
    cols = {"lab": [], "ri": [], "ci": [], "dr": [], "dc": [], "vin": [], "vout": []}
    for axis in (0, 1):
        a = p[:-1, :] if axis == 0 else p[:, :-1]
        b = p[1:, :] if axis == 0 else p[:, 1:]
        r, c = np.nonzero(a != b)
        dr, dc = (1, 0) if axis == 0 else (0, 1)
        for lab, ri, ci, sign in ((a[r, c], r, c, 1), (b[r, c], r + dr, c + dc, -1)):
            keep = lab > 0
            ri, ci = ri[keep], ci[keep]
            cols["lab"].append(lab[keep])
            cols["ri"].append(ri - 1)  # inside pixel, unpadded coordinates
            cols["ci"].append(ci - 1)
            cols["dr"].append(np.full(ri.size, sign * dr, np.int8))  # towards the outside
            cols["dc"].append(np.full(ri.size, sign * dc, np.int8))
            if v is not None:
                cols["vin"].append(v[ri, ci])
                cols["vout"].append(v[ri + sign * dr, ci + sign * dc])
    lab = np.concatenate(cols["lab"])
    ri, ci = np.concatenate(cols["ri"]), np.concatenate(cols["ci"])
    dr, dc = np.concatenate(cols["dr"]), np.concatenate(cols["dc"])
    frac = np.full(lab.size, 0.5)
    if v is not None and lab.size:
        vin, vout = np.concatenate(cols["vin"]), np.concatenate(cols["vout"])
        n = int(lab.max()) + 1
        level = np.bincount(lab, vin + vout, n) / np.maximum(2 * np.bincount(lab, minlength=n), 1)
        step = vin - vout
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (vin - level[lab]) / step
        frac = np.where(np.isfinite(f), np.clip(f, 0.0, 1.0), 0.5)
    return lab, ri + frac * dr, ci + frac * dc


def _outline_geometry(labels, ids, cy, cx, smooth=None):
    """Perimeter, polygon and hull area, hull perimeter and Feret diameters (px) of ``ids``."""
    k = len(ids)
    res = {name: np.zeros(k) for name in ("perimeter", "poly_area", "hull_area",
                                          "hull_perimeter", "feret_max", "feret_min")}
    if k == 0:
        return res
    lab, y, x = _edge_points(labels, smooth)
    wanted = np.zeros(int(labels.max()) + 1, bool)
    wanted[ids] = True
    keep = wanted[lab]
    lab, y, x = lab[keep], y[keep], x[keep]
    ang = np.arctan2(y - cy[lab], x - cx[lab])
    order = np.lexsort((ang, lab))
    lab, y, x = lab[order], y[order], x[order]
    starts = np.searchsorted(lab, ids)
    ends = np.searchsorted(lab, ids, side="right")
    # neighbours along each closed outline
    pos = np.arange(len(lab))
    seg = np.repeat(np.arange(k), ends - starts)
    length = (ends - starts)[seg]
    local = pos - starts[seg]
    prev = starts[seg] + (local - 1) % length
    nxt = starts[seg] + (local + 1) % length
    for _ in range(_SMOOTH_PASSES):  # [1, 2, 1] / 4: the staircase goes, corners barely round
        y = (y[prev] + 2 * y + y[nxt]) / 4
        x = (x[prev] + 2 * x + x[nxt]) / 4
    step = np.hypot(y[nxt] - y, x[nxt] - x)
    res["perimeter"] = np.add.reduceat(step, starts)
    # about each particle's centroid: the shoelace sum and the projections stay well scaled
    yc, xc = y - cy[lab], x - cx[lab]
    cross = xc * yc[nxt] - yc * xc[nxt]
    res["poly_area"] = np.abs(np.add.reduceat(cross, starts)) / 2
    hull = _support_geometry(yc, xc, starts, seg)
    for name in ("hull_perimeter", "hull_area", "feret_max", "feret_min"):
        res[name] = hull[name]
    few = (ends - starts) < 3
    res["hull_perimeter"][few] = res["perimeter"][few]
    res["hull_area"][few] = res["poly_area"][few]
    res["feret_max"][few] = res["feret_min"][few] = 1.0
    # not star-shaped about the centroid: the angle order may zigzag, so trace it
    folded = ~few & (res["hull_area"] > 0) & (res["poly_area"] < _STAR_SOLIDITY * res["hull_area"])
    for i in np.flatnonzero(folded):
        exact = _traced_outline(labels, ids[i])
        res["perimeter"][i] = _polygon_length(exact)
        res["poly_area"][i] = _shoelace(exact)
        hull_pts, res["hull_perimeter"][i], res["hull_area"][i] = _hull(exact)
        res["feret_max"][i], res["feret_min"][i] = feret_diameters(hull_pts)
    return res


_N_DIRS = 90  # coarse caliper directions over 180° (2° apart)
_FINE_DIRS = np.deg2rad(np.linspace(-2.0, 2.0, 41))  # refinement around the coarse extreme
_BLOCK_POINTS = 200_000  # outline points projected at once (memory: points × directions)


def _support_geometry(y, x, starts, seg):
    """Convex-hull perimeter and area and Feret max/min of many outlines at once.

    ``y``, ``x`` are outline points grouped by particle (``starts``: first index of each,
    ``seg``: the particle of each point). The support function h(θ) (largest projection on
    direction θ) over 180 directions gives the hull as the polygon of its support lines (exact
    to 1e-4 in area and perimeter for any convex shape at 2° steps) and the caliper widths
    w(θ) = h(θ) + h(θ + π); the minimum is refined on a 0.1° grid ±2° around the coarse one.
    """
    k = len(starts)
    theta = np.linspace(0.0, np.pi, _N_DIRS, endpoint=False)
    hi = np.empty((k, _N_DIRS))
    lo = np.empty((k, _N_DIRS))
    # blocks of whole particles so one reduceat covers each
    bounds = list(range(0, k, max(1, k * _BLOCK_POINTS // max(len(y), 1)))) + [k]
    ends = np.append(starts[1:], len(y))
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        if b0 >= b1:
            continue
        p0, p1 = starts[b0], ends[b1 - 1]
        proj = np.outer(x[p0:p1], np.cos(theta)) + np.outer(y[p0:p1], np.sin(theta))
        hi[b0:b1] = np.maximum.reduceat(proj, starts[b0:b1] - p0)
        lo[b0:b1] = np.minimum.reduceat(proj, starts[b0:b1] - p0)
    width = hi - lo
    # support polygon: h over the full circle, θ_j = j·2°, vertex j between lines j and j+1
    h = np.concatenate([hi, -lo], axis=1)
    phi = np.linspace(0.0, 2 * np.pi, 2 * _N_DIRS, endpoint=False)
    h1 = np.roll(h, -1, axis=1)
    s = np.sin(phi[1] - phi[0])
    vx = (h * np.sin(np.roll(phi, -1)) - h1 * np.sin(phi)) / s
    vy = (h1 * np.cos(phi) - h * np.cos(np.roll(phi, -1))) / s
    vx1, vy1 = np.roll(vx, -1, axis=1), np.roll(vy, -1, axis=1)
    res = {"hull_perimeter": np.hypot(vx1 - vx, vy1 - vy).sum(1),
           "hull_area": np.abs((vx * vy1 - vy * vx1).sum(1)) / 2}
    # w(θ) is smooth at its maximum (2° steps lose < 2e-4) but can have a sharp minimum
    # (a rod's flat sides): refine the minimum only, by rotating each outline once so the
    # fine directions need no trigonometry per point
    centre = theta[np.argmin(width, axis=1)]
    best = width.min(axis=1)
    cos_d, sin_d = np.cos(_FINE_DIRS), np.sin(_FINE_DIRS)
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        if b0 >= b1:
            continue
        p0, p1 = starts[b0], ends[b1 - 1]
        c = centre[seg[p0:p1]]
        along = x[p0:p1] * np.cos(c) + y[p0:p1] * np.sin(c)
        across = y[p0:p1] * np.cos(c) - x[p0:p1] * np.sin(c)
        proj = np.outer(along, cos_d) + np.outer(across, sin_d)
        w = (np.maximum.reduceat(proj, starts[b0:b1] - p0)
             - np.minimum.reduceat(proj, starts[b0:b1] - p0))
        best[b0:b1] = np.minimum(best[b0:b1], w.min(axis=1))
    res["feret_min"] = best
    res["feret_max"] = width.max(axis=1)
    return res


def _traced_outline(labels, lab):
    sl = ndi.find_objects((labels == lab).astype(np.int8))[0]
    pts = outline(labels[sl] == lab)
    return pts + [sl[0].start, sl[1].start]


def outline(mask):
    """Sub-pixel outer outline of a binary mask, as (K, 2) row/col points of a closed polygon.

    Parameters
    ----------
    mask : (M, N) ndarray of bool
        One particle (holes are ignored: the outer outline is returned).

    Returns
    -------
    points : (K, 2) ndarray of float
        Points along the outline in the mask's pixel coordinates (pixel centres at integers).
    """
    padded = np.pad(mask.astype(np.float32), 2)
    soft = ndi.gaussian_filter(padded, _OUTLINE_SIGMA, mode="constant")
    contours = skmeasure.find_contours(soft, 0.5)
    if not contours:
        return np.zeros((0, 2))
    longest = max(contours, key=len)
    return longest - 2.0


def _polygon_length(points):
    d = np.diff(np.vstack([points, points[:1]]), axis=0)
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def _hull(points):
    """Convex hull vertices (counter-clockwise), perimeter and area of a point set."""
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return points, _polygon_length(points), 0.0
    # In 2-D qhull's "area" is the perimeter and "volume" the enclosed area.
    return points[hull.vertices], float(hull.area), float(hull.volume)


def feret_diameters(hull_points):
    """Maximum and minimum Feret (caliper) diameters of a convex polygon.

    The minimum caliper width of a convex polygon is attained with one caliper flush with an
    edge (rotating calipers), so testing every hull edge gives it exactly.

    Parameters
    ----------
    hull_points : (K, 2) ndarray
        Convex hull vertices in order.

    Returns
    -------
    feret_max, feret_min : float
        In the units of the points.
    """
    p = np.asarray(hull_points, dtype=float)
    if len(p) < 3:
        if len(p) == 2:
            return float(np.hypot(*(p[1] - p[0]))), 0.0
        return 0.0, 0.0
    diff = p[:, None, :] - p[None, :, :]
    feret_max = float(np.sqrt((diff ** 2).sum(-1).max()))
    edges = np.roll(p, -1, axis=0) - p
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    good = lengths > 1e-12
    normals = np.stack([-edges[good, 1], edges[good, 0]], axis=1) / lengths[good, None]
    # Distance of every vertex from each edge's line; the width across that edge is the max.
    dist = np.abs(np.einsum("ekd,ed->ek", p[None, :, :] - p[good][:, None, :], normals))
    feret_min = float(dist.max(axis=1).min()) if dist.size else 0.0
    return feret_max, feret_min


def _background_map(labels, image):
    """Local background level: a normalised convolution of the pixels outside every particle.

    Built on blocks of :data:`_BG_BLOCK` px with a Gaussian a few particle radii wide, so it is
    cheap on a whole frame and follows uneven illumination; returns a function (rows, cols) ->
    background, NaN where no background is near.
    """
    b = _BG_BLOCK
    h, w = labels.shape
    hb, wb = -(-h // b), -(-w // b)
    bg = (labels == 0) & np.isfinite(image)
    # stay clear of the particles' blurred edges
    bg &= ~ndi.binary_dilation(labels > 0, iterations=2)
    pad = ((0, hb * b - h), (0, wb * b - w))
    wsum = np.pad(bg, pad).reshape(hb, b, wb, b).sum(axis=(1, 3)).astype(float)
    vsum = np.pad(np.where(bg, image, 0.0), pad).reshape(hb, b, wb, b).sum(axis=(1, 3))
    areas = np.bincount(labels.ravel())[1:]
    radius = np.sqrt(np.median(areas[areas > 0]) / np.pi) if np.any(areas > 0) else 4.0
    sigma = max(2.0, 2.0 * radius / b)
    num = ndi.gaussian_filter(vsum, sigma, mode="nearest")
    den = ndi.gaussian_filter(wsum, sigma, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(den > 0.05 * b * b, num / den, np.nan)

    def at(rows, cols):
        r = np.clip(np.round((np.asarray(rows) - (b - 1) / 2) / b).astype(int), 0, hb - 1)
        c = np.clip(np.round((np.asarray(cols) - (b - 1) / 2) / b).astype(int), 0, wb - 1)
        return level[r, c]

    return at


def _add_background_and_shell(t, labels, image):
    """Fill ``contrast`` and ``shell`` (px) of table ``t`` in place."""
    n = len(t["particle_id"])
    t["contrast"] = np.full(n, np.nan)
    t["shell"] = np.full(n, np.nan)
    if n == 0:
        return
    bg = _background_map(labels, image)(t["y"], t["x"])
    t["contrast"] = t["mean_i"] - bg
    # Only round particles big enough to show a hollow core, whose centre stands out less
    # from the background than the particle as a whole, get the shell fit.
    cand = np.flatnonzero((t["circularity"] > 0.8) & (t["aspect"] < 1.3) & np.isfinite(bg)
                          & (t["ecd"] >= 12))
    if cand.size == 0:
        return
    for i in cand:
        lab = int(t["particle_id"][i])
        r = t["ecd"][i] / 2
        r0 = max(int(np.floor(t["y"][i] - r)) - 2, 0)
        c0 = max(int(np.floor(t["x"][i] - r)) - 2, 0)
        r1 = min(int(np.ceil(t["y"][i] + r)) + 3, labels.shape[0])
        c1 = min(int(np.ceil(t["x"][i] + r)) + 3, labels.shape[1])
        mask = labels[r0:r1, c0:c1] == lab
        if mask.sum() < 0.5 * t["area"][i]:  # an overlapping particle: use its disc
            yy, xx = np.mgrid[r0:r1, c0:c1]
            mask = (yy - t["y"][i]) ** 2 + (xx - t["x"][i]) ** 2 < r * r
        t["shell"][i] = _shell_thickness(image[r0:r1, c0:c1], mask, t["y"][i] - r0,
                                         t["x"][i] - c0, r, bg[i])


def _shoelace(pts):
    y, x = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shell_thickness(img, mask, yc, xc, radius, bg):
    """Shell thickness (px) of a hollow round particle, NaN if it is not hollow.

    The projected thickness of a hollow sphere (outer radius R, inner r) at distance ρ from its
    centre is sqrt(R²−ρ²) − sqrt(r²−ρ²) (second term zero outside r). Its radial profile dips in
    the centre and peaks at ρ = r; fitting that family (R near the measured radius, since a
    thresholded outline sits a little inside the faint outer rim, and r) to the measured
    profile gives the shell R − r. Bright-field amplitude contrast is linearised by
    −log(I / background).
    """
    reach = 1.15 * radius
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    rho_all = np.hypot(yy - yc, xx - xc)
    # the disc out to just past the outline, where no other particle is
    use = (rho_all < reach) & (mask | (rho_all >= radius))
    vals = img[use]
    rho = rho_all[use]
    if bg > 0 and np.nanmean(vals) < bg and np.all(vals > 0):
        signal = -np.log(vals / bg)  # dark particles: Beer–Lambert, linear in thickness
    else:
        signal = np.abs(vals - bg)
    nb = int(np.ceil(reach))
    bins = np.minimum(rho.astype(int), nb - 1)
    counts = np.bincount(bins, minlength=nb)
    sums = np.bincount(bins, weights=signal, minlength=nb)
    ok = counts > 0
    prof = np.where(ok, sums / np.maximum(counts, 1), 0.0)
    centres = np.arange(nb) + 0.5
    centre = prof[centres < 0.25 * radius]
    ring = prof[(centres >= 0.3 * radius) & (centres < radius) & ok]
    if centre.size == 0 or ring.size == 0:
        return np.nan
    peak = float(np.max(ndi.uniform_filter1d(ring, 3)))
    if peak <= 0 or float(np.mean(centre)) > 0.75 * peak:
        return np.nan  # solid: a hollow shell is much thinner through its centre than its rim
    wgt = counts.astype(float)
    best = (np.inf, np.nan, np.nan)
    for outer in radius * np.linspace(0.96, 1.12, 9):
        r_in = np.linspace(0.2, 0.98, 79)[:, None] * outer
        model = (np.sqrt(np.clip(outer ** 2 - centres[None, :] ** 2, 0, None))
                 - np.sqrt(np.clip(r_in ** 2 - centres[None, :] ** 2, 0, None)))
        num = (model * prof * wgt).sum(1)
        den = (model * model * wgt).sum(1)
        amp = num / np.maximum(den, 1e-12)
        resid = ((prof[None, :] - amp[:, None] * model) ** 2 * wgt).sum(1)
        k = int(np.argmin(resid))
        if resid[k] < best[0]:
            best = (resid[k], outer, r_in[k, 0])
    _, outer, inner = best
    if inner <= 0.21 * outer:
        return np.nan  # the best "shell" is a solid sphere
    return float(outer - inner)
