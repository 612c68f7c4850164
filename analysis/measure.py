"""Measure labelled particles in nm: size, shape and intensity, one row per label.

Everything is computed for all particles at once (pixel sums with ``bincount``, outlines as
dense arrays). Outlines are sub-pixel: one point on every pixel edge between a particle and
anything else, placed where the lightly smoothed image crosses the particle's own edge level
(the mean of the grey levels on either side of its outline). That level follows the label it
starts from, so an outline wholly facing the background is then moved onto the particle's own
edge, fitted on the frame: its profile across the outline against a flat or a curved body's
projected thickness (through the detector: linear for bright particles, Beer-Lambert for dark
ones) convolved with the frame's blur (see :func:`_edge_shifts`); such a particle's area is
that outline's. A pixel outline, and even more a
noisy one, has a known bias: its caliper maximum grows and its minimum shrinks with every bump,
and its perimeter grows with the staircase. So each outline that is star-shaped about its
centroid is written as a radius r(θ), resampled on a regular grid of angles and denoised in
Fourier space: each harmonic keeps the share of its power that stands above the particle's own
noise floor (estimated from its upper harmonics), so a circle stays a circle (no shrinkage), a
rod's or a cube's strong even harmonics stay, and the noise goes. Feret diameters, convex-hull
perimeter and area come from the support function of these outlines (projections on 90
directions, the minimum refined to 0.1°): the true caliper width, not a moment-based axis.
Across an elongated outline's straight parallel sides (a rod's) the width comes from line fits
along them instead, since a caliper there takes the largest of the noise left on a side. A
particle split from a touching or overlapping group has an outline partly shared with a
neighbour, where the image shows no edge: r(θ) is taken from its free (background-facing)
points alone and completed across the shared arcs by its own low-order harmonics, and its
area comes from that outline. A particle that is not star-shaped (low solidity) is traced with
:func:`skimage.measure.find_contours` instead. Definitions follow ANTEMA (SCIENCE.md §2):
circularity = 4πA/P² (A and P of the same outline), convexity = convex-hull perimeter /
perimeter, solidity = area / convex-hull area.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from scipy.special import fdtri, i0e, ndtri
from skimage import measure as skmeasure
from ._checks import check_pixel_nm

__all__ = ["measure", "COLUMNS", "feret_diameters", "outline"]

#: Columns of the table returned by :func:`measure`, in order.
COLUMNS = ("particle_id", "x_px", "y_px", "area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm",
           "perimeter_nm", "circularity", "convexity", "solidity", "aspect_ratio",
           "major_axis_nm", "minor_axis_nm", "shell_nm", "mean_intensity", "total_intensity",
           "contrast", "signal")

_INT_COLUMNS = ("particle_id",)
_OUTLINE_SIGMA = 0.7  # px; removes the staircase, rounds a corner by far less than a pixel
_STAR_SOLIDITY = 0.9  # below this the angle-ordered outline may fold back: trace it instead
_BG_BLOCK = 4  # px; the background map is built on blocks of this size
# image smoothing for sub-pixel edge points: σ = 1 px (rod width error least)
_BINOMIAL = np.array([1, 4, 6, 4, 1], np.float32) / 16
_MIN_POINTS = 8  # fewer outline points than this: a speck, no shape to speak of
_KEEP_ABOVE_NOISE = 5.0  # harmonic power / noise floor needed to keep a harmonic
_KEY_STRIDE = 32.0  # angle keys of successive particles are this far apart (> 4π + margin)


def measure(labels, image, pixel_nm, *, masks=None, exact=()):
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
    exact : iterable of int, optional
        Labels whose extent (their mask, or their pixels in ``labels``) is a fitted model of
        the whole particle (:attr:`~particlewatch.analysis.separate.Separation.exact`: rods
        fitted as stadiums, a hidden end included). They are measured as they are: where
        they meet a neighbour the outline is the model's, not rebuilt from the free outline
        (which knows nothing of an end hidden under the neighbour and cuts it short), and
        their area is their pixel count. Everything else is measured as for any label.

    Returns
    -------
    table : dict of str to ndarray
        One row per label present, sorted by label, with the :data:`COLUMNS`:
        ``particle_id`` (the label), ``x_px``/``y_px`` (centroid column/row), sizes in nm,
        dimensionless shape factors, ``aspect_ratio`` = Feret max / Feret min, ``shell_nm``
        (shell thickness of a hollow particle, NaN otherwise); intensities in raw image units:
        ``mean_intensity`` and ``total_intensity`` (mean and sum of the particle's pixels),
        ``contrast`` (``mean_intensity`` minus the local background: negative for dark
        particles) and ``signal`` (the background-subtracted integrated intensity,
        |Σ (pixel − background)|, positive in bright-field and HAADF alike; it scales with
        the projected mass, so a merged pair has about twice a single particle's).

    References
    ----------
    .. [1] Gumbiowski et al., "Automated analysis of transmission electron micrographs of
       metallic nanoparticles by machine learning", Nanoscale Adv. (2023).

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> lab = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).astype(int)
    >>> t = measure(lab, 1.0 - 0.5 * lab, 0.5)
    >>> int(t["particle_id"][0]), abs(float(t["ecd_nm"][0]) - 15.0) < 0.2
    (1, True)
    """
    labels, image, pixel_nm, masks = _validate_inputs(labels, image, pixel_nm, masks)
    exact = np.unique(np.asarray(list(exact), dtype=np.int64))
    smooth = _edge_image(image)
    main, edge_model = _measure_labels(labels, image, smooth, skip=masks.keys(), exact=exact)
    parts = [main]
    if masks:
        sheet, sheet_image, offsets = _mosaic(masks, image)
        # a mask's outline is refined on the frame itself: where it faces the background the
        # image has an edge, where it crosses a neighbour it has none (see _edge_points)
        # (the frame's edge model is the one its other particles showed: a few masks
        # alone give an erratic blur)
        part, _ = _measure_labels(sheet, sheet_image, smooth,
                                  frame=(labels, offsets, _smooth_noise(smooth, labels), image),
                                  exact=exact, edge_model=edge_model)
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
        "total_intensity": t["total_i"], "contrast": t["contrast"], "signal": t["signal"],
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
    # float32 keeps every count of a 16-bit detector exactly and halves the memory traffic
    return labels.astype(np.int32, copy=False), np.asarray(image, np.float32), pixel_nm, masks


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
    sheet_image = np.zeros(sheet.shape, image.dtype)
    offsets = np.zeros((max(masks) + 1, 2))
    for lab, r0, c0, m, r, c in places:
        h, w = m.shape
        sheet[r:r + h, c:c + w][m] = lab
        sheet_image[r:r + h, c:c + w] = image[r0:r0 + h, c0:c0 + w]
        offsets[lab] = (r0 - r, c0 - c)
    return sheet, sheet_image, offsets


def _measure_labels(labels, image, smooth, *, skip=(), frame=None, exact=(), edge_model=None):
    """Geometry and intensities of every label in ``labels`` except ``skip``, as arrays,
    and the frame's edge model (see :func:`_edge_shifts`; None where nothing was fitted).

    ``smooth``: the frame's :func:`_edge_image`, for sub-pixel outline points (see
    :func:`_edge_points`). ``frame``: for the mosaic of overlapping masks, ``(frame_labels,
    offsets, noise, frame_image)`` (offsets[label] added to mosaic coordinates gives frame
    coordinates; noise: :func:`_smooth_noise`), so each outline point is refined on the frame
    and told free (facing the background) or shared, and its edge profile is read there.
    ``edge_model``: the frame's edge model found on its other particles, used as it is.
    A particle whose outline is partly shared (it touches or overlaps a neighbour) takes its
    area from its reconstructed outline (see :func:`_outline_geometry`), not from its pixels:
    where neighbours overlap its mask is a guess, where they touch the cut is one. Labels in
    ``exact`` (fitted models of the whole particle) are taken as they are.
    """
    h, w = labels.shape
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    n = int(lab.max()) + 1 if lab.size else 1
    area = np.bincount(lab, minlength=n).astype(float)
    present = area > 0
    present[0] = False
    if skip:
        present[[k for k in skip if k < n]] = False
    ids = np.flatnonzero(present)
    y, x = np.divmod(idx, w)
    safe = np.maximum(area, 1)
    cy = np.bincount(lab, y, n) / safe
    cx = np.bincount(lab, x, n) / safe
    # second moments about the centroid; a pixel adds 1/12 of its own extent
    myy = np.bincount(lab, y.astype(float) ** 2, n) / safe - cy * cy + 1 / 12
    mxx = np.bincount(lab, x.astype(float) ** 2, n) / safe - cx * cx + 1 / 12
    mxy = np.bincount(lab, y.astype(float) * x, n) / safe - cy * cx
    half = np.sqrt(((myy - mxx) / 2) ** 2 + mxy ** 2)
    major = 4 * np.sqrt(np.clip((myy + mxx) / 2 + half, 0, None))
    minor = 4 * np.sqrt(np.clip((myy + mxx) / 2 - half, 0, None))
    vals = image.ravel()[idx].astype(np.float64)
    finite = np.isfinite(vals)
    if not finite.all():
        vals = np.where(finite, vals, 0.0)
    total_i = np.bincount(lab, vals, n)
    count_i = np.bincount(lab, finite, n) if not finite.all() else area
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_i = np.where(count_i > 0, total_i / np.maximum(count_i, 1), np.nan)
    # mean grey level through the centre and over the rest of the disc: a hollow particle's
    # centre is closer to the background than its ring (see _add_background_and_shell)
    rel = ((y - cy[lab]) ** 2 + (x - cx[lab]) ** 2) * (np.pi / safe)[lab]  # (ρ / R)²
    centre = rel < 0.25 ** 2
    ring = (rel >= 0.3 ** 2) & (rel < 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_centre = np.bincount(lab, centre, n)
        i_centre = np.bincount(lab, np.where(centre, vals, 0.0), n) / n_centre
        i_ring = np.bincount(lab, np.where(ring, vals, 0.0), n) / np.bincount(lab, ring, n)

    geo = _outline_geometry(labels, ids, cy, cx, smooth, frame,
                            core=(i_centre[ids], n_centre[ids]), raw=image,
                            exact=np.isin(ids, exact) if len(exact) else None,
                            edge_model=edge_model)
    # a shared outline is rebuilt, a fitted one placed on the particle's own edge: their
    # polygons, not the label's pixels, give the area
    a = np.where(geo["shared"] | geo["fitted"], geo["poly_area"], area[ids])
    perim = geo["perimeter"]
    with np.errstate(invalid="ignore", divide="ignore"):
        # area and perimeter of the same outline: a circle gives 1 whatever its edge level
        circ = np.where(perim > 0, 4 * np.pi * geo["poly_area"] / perim ** 2, np.nan)
        conv = np.where(perim > 0, np.minimum(geo["hull_perimeter"] / perim, 1.0), np.nan)
        sol = np.where(geo["hull_area"] > 0,
                       np.minimum(geo["poly_area"] / geo["hull_area"], 1.0), 1.0)
        aspect = np.where(geo["feret_min"] > 0, geo["feret_max"] / geo["feret_min"], np.nan)
    return {"particle_id": ids, "y": cy[ids], "x": cx[ids],
            "area": a, "ecd": 2 * np.sqrt(a / np.pi), "feret_max": geo["feret_max"],
            "feret_min": geo["feret_min"], "perimeter": perim, "circularity": circ,
            "convexity": conv, "solidity": sol, "aspect": aspect, "major": major[ids],
            "minor": minor[ids], "mean_i": mean_i[ids], "total_i": total_i[ids],
            "count_i": count_i[ids], "i_centre": i_centre[ids], "i_ring": i_ring[ids]}, \
        geo["edge_model"]


def _edge_image(image):
    """The image lightly smoothed for sub-pixel edge points; non-finite pixels take the median
    so they do not spread.

    The kernel is the binomial [1, 4, 6, 4, 1] / 16 along each axis: a Gaussian of σ = 1 px
    to within 1% of the peak, at a fraction of the cost (along the rows by
    :func:`scipy.ndimage.correlate1d`, down the columns by shifted sums, which for a C-ordered
    image is several times faster than a strided filter).
    """
    finite = np.isfinite(image)
    if not finite.all():
        fill = float(np.median(image[finite])) if finite.any() else 0.0
        image = np.where(finite, image, fill)
    rows = ndi.correlate1d(image.astype(np.float32, copy=False), _BINOMIAL, axis=1,
                           mode="nearest")
    p = np.pad(rows, ((2, 2), (0, 0)), mode="edge")
    del rows
    # in place, one scratch frame: a 4096² frame's temporaries are 64 MB each, and fresh
    # ones cost more than the arithmetic (page faults)
    out = p[:-4] + p[4:]
    out *= _BINOMIAL[0]
    tmp = np.add(p[1:-3], p[3:-1])
    tmp *= _BINOMIAL[1]
    out += tmp
    np.multiply(p[2:-2], _BINOMIAL[2], out=tmp)
    out += tmp
    return out


def _smooth_noise(smooth, labels):
    """Standard deviation of the noise of the smoothed frame, from its background.

    Differences of background pixels 5 px apart along rows (beyond the smoothing kernel's
    reach, so their noise is independent): σ = MAD·1.4826 / √2. Every 4th row is enough, and
    on frames larger than 1024² rows further apart, so that about 2¹⁸ differences are taken
    (the MAD's relative error is then ~0.2%; its two medians were the costliest step here).
    """
    stride = max(4, int(np.ceil(smooth.shape[0] * smooth.shape[1] / 2 ** 18)))
    a, b = smooth[::stride, :-5], smooth[::stride, 5:]
    bg = (labels[::stride, :-5] == 0) & (labels[::stride, 5:] == 0)
    d = (a - b)[bg]
    if d.size < 100:
        return 0.0
    return float(1.4826 / np.sqrt(2) * np.median(np.abs(d - np.median(d))))


def _edge_points(labels, smooth=None, frame=None, *, axes=False):
    """One point per pixel edge between a label and anything else.

    Without ``smooth`` the point is the edge's midpoint. With it (the smoothed frame) the point
    slides along the line joining the two pixel centres to where ``smooth`` crosses the
    particle's edge level, the mean of the values on either side of its free outline; it stays
    between the two centres. An edge is *free* when the pixel outside it is background in the
    frame; one facing another particle (touching, or inside an overlapping neighbour) is
    *shared*: the image has no edge there, so its point stays at the pixel edge's midpoint and
    the outline is reconstructed across it (:func:`_outline_geometry`). ``frame``:
    ``(frame_labels, offsets, noise)`` when ``labels`` is the mosaic of :func:`_mosaic`
    (see :func:`_measure_labels`).

    Returns
    -------
    lab, row, col : ndarray
        Label and point (in ``labels``' coordinates) of each edge.
    free : ndarray of bool
    inside : tuple of ndarray, only with ``axes``
        ``(row, col, drow, dcol)``: the edge's inside pixel and the unit step out of it.
    """
    p = np.pad(labels, 1)
    width = p.shape[1]
    pf = p.ravel()
    labs, inner, outer = [], [], []
    # on the flat padded image a vertical neighbour is `width` away, a horizontal one 1 away
    # (the padding keeps rows apart), so both searches are one-dimensional
    for step in (width, 1):
        i = np.flatnonzero(pf[:-step] != pf[step:])
        a, b = pf[i], pf[i + step]
        for lab, ins, out in ((a, i, i + step), (b, i + step, i)):
            keep = lab > 0
            labs.append(lab[keep])
            inner.append(ins[keep])
            outer.append(out[keep])
    lab, inner, outer = np.concatenate(labs), np.concatenate(inner), np.concatenate(outer)
    ri, ci = np.divmod(inner, width)
    dr, dc = np.divmod(outer - inner + width + 1, width)  # towards the outside: -1, 0 or 1
    dr, dc = dr - 1, dc - 1
    ri, ci = ri - 1, ci - 1  # unpadded coordinates of the inside pixel
    frac = np.full(lab.size, 0.5)
    if frame is None:
        free = pf[outer] == 0
    else:
        frame_labels, offsets = frame[:2]
        h, w = frame_labels.shape
        fr = ri + offsets[lab, 0].astype(np.intp)
        fc = ci + offsets[lab, 1].astype(np.intp)
        free = frame_labels[np.clip(fr + dr, 0, h - 1), np.clip(fc + dc, 0, w - 1)] == 0
    if smooth is not None and lab.size:
        if frame is None:
            vf = np.pad(smooth, 1, mode="edge").ravel()
            vin, vout = vf[inner].astype(np.float64), vf[outer].astype(np.float64)
        else:
            h, w = smooth.shape
            vin = smooth[np.clip(fr, 0, h - 1), np.clip(fc, 0, w - 1)].astype(np.float64)
            vout = smooth[np.clip(fr + dr, 0, h - 1), np.clip(fc + dc, 0, w - 1)].astype(np.float64)
        n = int(lab.max()) + 1
        # the edge level from free edges only: across a shared one both sides are particle
        level = (np.bincount(lab, np.where(free, vin + vout, 0.0), n)
                 / np.maximum(2 * np.bincount(lab, free, n), 1))
        step = vin - vout
        reach = None
        if frame is not None:
            # a split piece's mask is regrown from an eroded marker, so where it faces no
            # neighbour it may still stop short of the particle's edge (a cube's corners come
            # back rounded by the erosion depth): there the outside pixel still lies on the
            # particle's side of its edge level. Those edges leave the level, and their
            # points are sought further out (_march_out)
            sign = np.sign(np.bincount(lab, np.where(free, step, 0.0), n))[lab]
            # short only where significantly so: the outside pixel lies beyond the level by
            # more than the smoothed frame's noise allows (z standard deviations). On a faint,
            # noisy particle (polystyrene, silica at low dose) a pixel beyond the level is
            # mostly noise, and marching out from it would grow the particle
            noise = frame[2]
            short = free & (sign * (vout - level[lab]) > _SHORT_Z * noise)
            if short.any():
                good = free & ~short
                level = (np.bincount(lab, np.where(good, vin + vout, 0.0), n)
                         / np.maximum(2 * np.bincount(lab, good, n), 1))
                short &= sign * (vout - level[lab]) > 0
                reach, found = _march_out(frame_labels, smooth, lab, fr, fc, dr, dc,
                                          level[lab], sign, short, noise)
                free = free & (~short | found)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (vin - level[lab]) / step
        frac = np.where(np.isfinite(f) & free, np.clip(f, 0.0, 1.0), 0.5)
        if reach is not None:
            frac = np.where(short & free, reach, frac)
    if axes:
        return lab, ri + frac * dr, ci + frac * dc, free, (ri, ci, dr, dc)
    return lab, ri + frac * dr, ci + frac * dc, free


# a split piece's edge is sought beyond its mask only where the outside pixel lies beyond the
# level by this many standard deviations of the smoothed frame's noise (one-sided 0.13%)
_SHORT_Z = 3.0
_DROP_PX = 2  # the image must have fallen clearly below the level this far past the crossing
_DROP_Z = 3.0  # ... by this many noise standard deviations
_SIDE_PX = 2  # a ray passing another particle this close (across it) runs along a neck
_MARCH_PX = 16  # furthest a split piece's edge is sought beyond its mask (px)


def _march_out(frame_labels, smooth, lab, fr, fc, dr, dc, level, sign, which, noise):
    """Where the image crosses the edge level beyond a mask's edge, along the edge's normal.

    For the edges ``which`` (inside pixel at frame ``fr, fc``, outward step ``dr, dc``), the
    pixel centres 1, 2, … :data:`_MARCH_PX` steps out are scanned until the smoothed frame
    falls to the particle's edge level (``sign``: +1 bright, -1 dark). The scan gives up
    where it enters another particle's pixels (a neighbour: the edge there is unknown), passes
    one within :data:`_SIDE_PX` across the ray (a neck, where both particles' blurred edges
    hold the image near the level) or leaves the frame. A crossing counts only where it is
    an edge and not noise: :data:`_DROP_PX` further out the image lies below the level by
    more than :data:`_DROP_Z` × ``noise`` (the smoothed frame's noise). So a faint particle
    at low dose, whose edge does not stand out of its noise, is left as its mask has it.
    Any point of the edge's iso-line is a point of the outline, so an axis-aligned scan is
    as good as a radial one.

    Returns
    -------
    reach : ndarray
        Distance (in steps from the inside pixel) of the crossing, for every edge (1 where
        none was sought).
    found : ndarray of bool
        ``which`` edges whose crossing was found.
    """
    idx = np.flatnonzero(which)
    reach = np.ones(lab.size)
    found = np.zeros(lab.size, bool)
    if idx.size == 0:
        return reach, found
    h, w = smooth.shape
    t = np.arange(1, _MARCH_PX + _DROP_PX + 1)
    rows = fr[idx, None] + dr[idx, None] * t
    cols = fc[idx, None] + dc[idx, None] * t
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rr, cc = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    mine = lab[idx, None]
    other = frame_labels[rr, cc]
    blocked = ~inside | ((other != 0) & (other != mine))
    # a ray that runs past a neighbour (within _SIDE_PX across it) is in a neck between
    # two particles, where the blurred edges of both keep the image near the level
    for side in (-_SIDE_PX, _SIDE_PX):
        o = frame_labels[np.clip(rr + side * dc[idx, None], 0, h - 1),
                         np.clip(cc + side * dr[idx, None], 0, w - 1)]
        blocked |= (o != 0) & (o != mine)
    v = sign[idx, None] * (smooth[rr, cc].astype(np.float64) - level[idx, None])
    below = (v <= 0) & ~blocked
    below[:, _MARCH_PX:] = False
    # the first step at or below the level, before any blocked one
    first_below = np.where(below.any(1), below.argmax(1), _MARCH_PX)
    first_blocked = np.where(blocked.any(1), blocked.argmax(1), _MARCH_PX + _DROP_PX)
    # an edge, not noise: _DROP_PX beyond the crossing the image has fallen clearly
    # (significantly against the noise) below the level, and nothing blocks the way there
    after = np.minimum(first_below + _DROP_PX, t.size - 1)
    drop = -v[np.arange(idx.size), after] > _DROP_Z * noise
    ok = (first_below < first_blocked) & (first_below > 0) & drop & (after < first_blocked)
    j = first_below[ok]
    k = np.flatnonzero(ok)
    v0, v1 = v[k, j - 1], v[k, j]
    # linear between the last pixel above the level (t = j) and the first below (t = j + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip(v0 / (v0 - v1), 0.0, 1.0)
    reach[idx[k]] = t[j - 1] + np.where(np.isfinite(frac), frac, 0.5)
    found[idx[k]] = True
    return reach, found


def _outline_geometry(labels, ids, cy, cx, smooth=None, frame=None, exact=None, core=None,
                      raw=None, edge_model=None):
    """Perimeter, polygon and hull area, hull perimeter and Feret diameters (px) of ``ids``.

    An outline partly shared with a neighbour (see :func:`_edge_points`) is written as r(θ)
    from its free points only and completed across the shared arcs by its own low-order
    harmonics (:func:`_fill_gaps`): a convex particle's outline is smooth, and the cut or the
    overlap says nothing about where its edge runs. ``shared`` in the result marks those
    outlines (when too little of an outline is free, the mask is used as it is). ``exact``:
    bool per id, outlines that are fitted models of the whole particle, never completed (their
    shared points stay on the model's pixel edges). ``edge_model``: passed to
    :func:`_edge_shifts`, whose model is returned as ``edge_model`` (None when no edge was
    fitted).
    """
    k = len(ids)
    res = {name: np.zeros(k) for name in ("perimeter", "poly_area", "hull_area",
                                          "hull_perimeter", "feret_max", "feret_min")}
    res["shared"] = np.zeros(k, bool)
    res["fitted"] = np.zeros(k, bool)
    res["edge_model"] = edge_model
    if k == 0:
        return res
    fit_edges = smooth is not None and raw is not None and core is not None
    if fit_edges:
        lab, y, x, free, axes = _edge_points(labels, smooth, frame, axes=True)
    else:
        lab, y, x, free = _edge_points(labels, smooth, frame)
    row = np.full(int(labels.max()) + 1, -1)
    row[ids] = np.arange(k)
    seg = row[lab]
    keep = seg >= 0
    seg, y, x, free = seg[keep], y[keep] - cy[lab[keep]], x[keep] - cx[lab[keep]], free[keep]
    counts = np.bincount(seg, minlength=k)
    ang = np.arctan2(y, x)
    order = np.argsort(seg * _KEY_STRIDE + ang, kind="stable")
    seg, y, x, ang, free = seg[order], y[order], x[order], ang[order], free[order]
    if fit_edges:
        axes = tuple(a[keep][order] for a in axes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_free = np.bincount(seg, free, k)
    fill = (n_free < counts) & (n_free >= _MIN_FREE * counts) & (n_free >= _MIN_POINTS)
    if exact is not None:
        fill &= ~exact
    res["shared"] = fill
    if fill.any():
        # the free points alone, still in (particle, angle) order
        f_seg, f_ang = seg[free], ang[free]
        f_counts = n_free.astype(int)
        f_starts = np.concatenate([[0], np.cumsum(f_counts)[:-1]])
    few = counts < _MIN_POINTS
    # the raw angle-ordered polygon tells star-shaped outlines from folded ones
    nxt = np.arange(len(seg)) + 1
    nxt[np.cumsum(counts)[counts > 0] - 1] = starts[counts > 0]
    cross = x * y[nxt] - y * x[nxt]
    raw_area = np.zeros(k)
    raw_area[counts > 0] = np.abs(np.add.reduceat(cross, starts[counts > 0])) / 2
    radius = np.hypot(y, x)
    groups = []
    for m, sel in _size_groups(counts, few):
        r = _resample_polar(seg, ang, radius, starts, counts, sel, m)
        part = fill[sel]
        if part.any():
            s = sel[part]
            known = _resample_polar(seg, ang, free.astype(float), starts, counts, s, m) > 0.5
            r_free = _resample_polar(f_seg, f_ang, radius[free], f_starts, f_counts, s, m)
            r[part] = _fill_gaps(r_free, known)
        groups.append((m, sel, _denoise_radius(r)))
    if fit_edges and groups:
        # outlines facing the background, wholly or (touching or overlapping a neighbour)
        # enough to be rebuilt; samples stop at anything that is not the particle's own
        # pixels inside or the frame's background outside
        alone = ~few & (fill | (n_free == counts))
        if exact is not None:
            alone &= ~exact
        shift, res["fitted"], res["edge_model"] = _edge_shifts(
            labels, smooth, ids, cy, cx, seg, axes, groups, alone, core, raw, frame=frame,
            model=edge_model)
    for m, sel, r in groups:
        if res["fitted"][sel].any():
            # the outline moved δ along its normal: r(θ) by δ / cos ψ (tan ψ = r' / r)
            slope = (np.roll(r, -1, 1) - np.roll(r, 1, 1)) * (m / (4 * np.pi))
            r = r + shift[sel][:, None] * np.hypot(r, slope) / np.maximum(r, 1e-9)
        theta = np.linspace(-np.pi, np.pi, m, endpoint=False)
        py, px = r * np.sin(theta), r * np.cos(theta)
        dy, dx = np.roll(py, -1, axis=1) - py, np.roll(px, -1, axis=1) - px
        res["perimeter"][sel] = np.hypot(dy, dx).sum(1)
        res["poly_area"][sel] = np.abs((px * np.roll(py, -1, axis=1)
                                        - py * np.roll(px, -1, axis=1)).sum(1)) / 2
        for name, value in _support_geometry(py, px).items():
            res[name][sel] = value
    res["perimeter"][few] = np.maximum(counts[few], 1.0)
    res["poly_area"][few] = res["hull_area"][few] = raw_area[few]
    res["hull_perimeter"][few] = res["perimeter"][few]
    res["feret_max"][few] = res["feret_min"][few] = np.sqrt(4 * raw_area[few] / np.pi)
    # not star-shaped about the centroid: the angle order zigzags, so trace it. A fitted
    # outline was moved δ outwards: its hull before the move, by Steiner's formula for a
    # convex body (A + P δ + π δ²), is what the raw points' polygon compares with
    hull_before = res["hull_area"]
    if res["fitted"].any():
        d = np.where(res["fitted"], shift, 0.0)
        hull_before = hull_before - res["hull_perimeter"] * d - np.pi * d * d
    folded = ~few & (res["hull_area"] > 0) & (raw_area < _STAR_SOLIDITY * hull_before)
    # every label's box in one pass over the frame (one pass per folded particle grows as
    # the frame's pixels times its particles)
    boxes = ndi.find_objects(labels) if folded.any() else []
    for i in np.flatnonzero(folded):
        exact = _traced_outline(labels, ids[i], boxes[ids[i] - 1])
        res["perimeter"][i] = _polygon_length(exact)
        res["poly_area"][i] = _shoelace(exact)
        hull_pts, res["hull_perimeter"][i], res["hull_area"][i] = _hull(exact)
        res["feret_max"][i], res["feret_min"][i] = feret_diameters(hull_pts)
    return res


def _size_groups(counts, few):
    """Particles grouped by the number of angles their outline is resampled on.

    About one angle per two outline points (a power of two, at least 32): fine enough for the
    corners the image shows, coarse enough that neighbouring samples share few points.
    """
    m = 2 ** np.ceil(np.log2(np.maximum(counts, 2) / 2)).astype(int)
    m = np.clip(m, 32, 2048)
    for size in np.unique(m[~few]):
        yield int(size), np.flatnonzero((m == size) & ~few)


def _resample_polar(seg, ang, radius, starts, counts, sel, m):
    """Radius of the outlines ``sel`` at ``m`` regular angles from -π, as a (len(sel), m) array.

    The points of all particles are sorted on one key (particle × stride + angle); each
    outline gets a copy of its last point one turn back and of its first one turn on, so one
    :func:`numpy.interp` call interpolates every outline around its full circle.
    """
    first = starts[sel]
    last = first + counts[sel] - 1
    pick = _ranges(first, counts[sel])
    which = np.repeat(np.arange(len(sel)), counts[sel])
    key = which * _KEY_STRIDE + ang[pick]
    base = np.arange(len(sel)) * _KEY_STRIDE
    xp = np.concatenate([base + ang[last] - 2 * np.pi, key, base + ang[first] + 2 * np.pi])
    fp = np.concatenate([radius[last], radius[pick], radius[first]])
    order = np.argsort(xp, kind="stable")
    theta = np.linspace(-np.pi, np.pi, m, endpoint=False)
    query = (base[:, None] + theta[None, :]).ravel()
    return np.interp(query, xp[order], fp[order]).reshape(len(sel), m)


def _fill_gaps(r, known):
    """Complete regularly sampled radii r(θ) across their unknown arcs.

    Harmonics 0 … :data:`_FILL_ORDER` are fitted to each row's known samples by least squares
    and the fit replaces the unknown samples. Harmonic 1 (a centroid off the particle's
    centre) is free; harmonics k ≥ 2 (an ellipse, a rod, a cube's corners) carry a small ridge
    growing as k², relative to the known samples' weight, so a short known arc cannot
    extrapolate into a spurious elongation, while a well-sampled shape keeps its own.

    Parameters
    ----------
    r : (K, M) ndarray
        Radii at M regular angles from -π (unknown samples may hold anything finite).
    known : (K, M) ndarray of bool

    Returns
    -------
    (K, M) ndarray
    """
    m = r.shape[1]
    theta = np.linspace(-np.pi, np.pi, m, endpoint=False)
    k = np.arange(1, _FILL_ORDER + 1)
    basis = np.concatenate([np.ones((m, 1)), np.cos(np.outer(theta, k)),
                            np.sin(np.outer(theta, k))], axis=1)  # (M, P)
    w = known.astype(float)
    gram = np.einsum("km,mi,mj->kij", w, basis, basis)
    ridge = np.where(k >= 2, _FILL_RIDGE * k.astype(float) ** 2, 0.0)
    penalty = np.concatenate([[0.0], ridge, ridge])
    gram += np.diag(penalty)[None] * w.sum(1)[:, None, None]
    rhs = (w * r) @ basis
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    return np.where(known, r, coef @ basis.T)


# ---- the particle's own edge ------------------------------------------------------------
# Where the image crosses "half contrast" is the edge of a flat particle (a cube seen face-on)
# only. A sphere's projected thickness rises from zero as the square root of the depth below
# its outline, so once blurred its edge lies well below half contrast, and the more so the
# smaller the particle is next to the blur; a dense particle's bright-field shadow saturates
# (Beer-Lambert) and sits in between. So the edge is fitted: the frame's pixels across each
# outline, pooled per particle as a function of the distance along the outline's normal (with
# the mean over its central disc as one more point), are matched by background + amplitude ×
# (edge profile ⊛ blur), the profile moved by δ. The
# profile is the particle's own: a flat body's step, or a curved convex body's thickness
# ((d/R)(2 − d/R))^½ at depth d (R its half-width: a sphere's radius, a rod's half-width),
# taken through the detector: linear for bright (dark-field) particles, 1 − exp(−κ·t/t_max)
# for dark (bright-field) ones, κ from the particle's own deepest shadow. Flat or curved and
# the frame's blur are chosen once per frame, on its particles pooled; δ per particle, kept
# where its standard error is within _MAX_SHIFT_SE and shrunk by it (a loose fit moves the
# outline less). Hollow particles are left as they were.
_BAND_PX = 5  # samples reach this far either side of the outline (px)
_BAND_BIN = 0.25  # bin width of the pooled profiles (px)
_SHIFT_GRID = np.arange(-2.0, 2.0001, 0.2)  # δ tried (px); a best δ at either end is no fit
_KAPPA_GRID = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0])
_OPTICS_SIGMA = (0.0, 0.4, 0.7, 1.0, 1.4, 2.0, 2.8)  # the frame's blur tried (px)
_FRAME_FIT_MAX = 32  # particles the frame's profile and blur are chosen on
_REF_ANGLES = 64  # angles of the reference outline the samples' distances are taken from
_PIXEL_VAR = 1.0 / 12  # variance of a pixel's own box (the detector integrates over it)
_MAX_SHIFT_SE = 0.3  # px; a fitted δ less certain than this leaves the outline as it was
_LOOSE_SE = 0.15  # px; a δ less certain than this is a loose fit (see _HOLLOW_HINT_Z)
_LOOSE_MAX_INFLATION = 2.0  # noise variance inflation beyond which loose fits are dropped
_MIN_SPREAD_PX = 0.1  # px; least spread of the outlines' offsets from the edge (the prior's)
_HOLLOW_Z = 3.0  # a contrast falling inwards by this many standard errors: hollow, not fitted
# ... and by this many, for a loose fit: a hollow particle fitted as a solid body errs by
# several %, a solid one left unfitted by ~1%, so a loose fit needs less to be dropped
_HOLLOW_HINT_Z = 1.0


def _edge_shifts(labels, smooth, ids, cy, cx, seg, axes, groups, alone, core, raw, *,
                 frame=None, model=None):
    """Outward shift (px) of each outline ``r(θ)`` onto its particle's fitted edge.

    Parameters
    ----------
    labels, smooth, raw : (M, N) ndarray
        The label image, the smoothed frame (:func:`_edge_image`, for the band's noise) and
        the frame itself: the profiles are fitted on its pixels, whose noise is independent
        (the smoothed frame's is not, which would overweight the band against the centre).
    ids, cy, cx : ndarray
        Labels measured and every label's centroid.
    seg : ndarray of int
        Row in ``ids`` of each edge point; ``axes`` its inside pixel and outward unit step
        (from :func:`_edge_points`).
    groups : list of (int, ndarray, ndarray)
        ``(m, rows, r)``: outlines ``r`` sampled at ``m`` regular angles from -π.
    alone : ndarray of bool
        Outlines that may be fitted: facing the background wholly, or enough to be rebuilt
        (a shared outline's profiles stop at its neighbour's pixels).
    core : (ndarray, ndarray)
        Mean grey level over each particle's central disc (radius a quarter of its
        equivalent radius: its deepest shadow in bright field) and that disc's pixels. It
        takes part in the fit as one more point of the profile, at the body's full depth:
        a curved body's centre stands well above its band, a flat one's does not, which
        tells the two apart where the band alone cannot (a faint particle).
    frame : tuple, optional
        For the mosaic of masks (see :func:`_measure_labels`): the profiles are read on the
        frame, inside where the frame gives the pixel to the particle, outside on its
        background.
    model : (int, float), optional
        The frame's edge model, ``(kind, sigma)``: flat (0) or curved (1) edges and the blur
        (px). Fitted here (on up to ``_FRAME_FIT_MAX`` particles) when not given.

    Returns
    -------
    shift : ndarray
        Per row of ``ids``; 0 where not fitted.
    fitted : ndarray of bool
    model : (int, float) or None
        The edge model used (``model`` when given; None when nothing could be fitted).
    """
    k = len(ids)
    shift, fitted = np.zeros(k), np.zeros(k, bool)
    ri, ci, dr, dc = axes
    # edges whose axis runs within 45° of the ray from the centroid: their pixels run across
    # the outline (an oblique axis mostly meets pixels the others sample already)
    ey = ri + 0.5 * dr - cy[ids[seg]]
    ex = ci + 0.5 * dc - cx[ids[seg]]
    pick = np.flatnonzero(alone[seg] & (2 * (dr * ey + dc * ex) ** 2 >= ey * ey + ex * ex))
    if not pick.size:
        return shift, fitted, model
    # reference outline of each fitted particle: its smallest radius (the body's half-width)
    # and its perimeter
    which = np.flatnonzero(alone)
    q_of = np.full(k, -1)
    q_of[which] = np.arange(which.size)
    half_width, perimeter = np.zeros(which.size), np.zeros(which.size)
    # each outline on _REF_ANGLES angles (a denoised outline is smooth at that spacing), with
    # the cosine of its normal's lean from the ray, cos ψ = r / sqrt(r² + r'²) (a rod's sides)
    ref = np.zeros((which.size, _REF_ANGLES), np.float32)
    lean = np.ones((which.size, _REF_ANGLES), np.float32)
    for m, sel, r in groups:
        mine = alone[sel]
        if not mine.any():
            continue
        rr = r[mine]
        theta = np.linspace(-np.pi, np.pi, m, endpoint=False)
        py, px = rr * np.sin(theta), rr * np.cos(theta)
        q = q_of[sel[mine]]
        perimeter[q] = np.hypot(np.roll(py, -1, 1) - py, np.roll(px, -1, 1) - px).sum(1)
        half_width[q] = rr.min(1)
        slope = (np.roll(rr, -1, 1) - np.roll(rr, 1, 1)) * (m / (4 * np.pi))
        cos_psi = rr / np.maximum(np.hypot(rr, slope), 1e-9)
        if m >= _REF_ANGLES:
            ref[q], lean[q] = rr[:, ::m // _REF_ANGLES], cos_psi[:, ::m // _REF_ANGLES]
        else:  # m = _REF_ANGLES / 2: halfway samples interpolated
            ref[q, ::2], lean[q, ::2] = rr, cos_psi
            ref[q, 1::2] = (rr + np.roll(rr, -1, 1)) / 2
            lean[q, 1::2] = (cos_psi + np.roll(cos_psi, -1, 1)) / 2
    # samples: pixels along each edge point's axis, inside the particle or in the background
    steps = np.arange(-_BAND_PX + 1, _BAND_PX + 1)
    p_seg = seg[pick]
    h, w = labels.shape
    rows = ri[pick, None] + dr[pick, None] * steps
    cols = ci[pick, None] + dc[pick, None] * steps
    if frame is None:
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        at = np.where(ok, rows * w + cols, 0)
        lv = labels.ravel()[at]
        ok &= np.where(steps <= 0, lv == ids[p_seg, None], lv == 0)
    else:
        # a mask of the mosaic: its samples are taken on the frame, inside only where the
        # frame gives the pixel to this particle (not the overlap a neighbour owns)
        inside = np.zeros(rows.shape, bool)
        ok_sheet = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        inside[ok_sheet] = labels[rows[ok_sheet], cols[ok_sheet]] == \
            np.broadcast_to(ids[p_seg, None], rows.shape)[ok_sheet]
        frame_labels, offsets, raw = frame[0], frame[1], frame[3]
        lab_of = np.broadcast_to(ids[p_seg, None], rows.shape)
        rows = rows + offsets[lab_of, 0].astype(np.intp)
        cols = cols + offsets[lab_of, 1].astype(np.intp)
        h, w = frame_labels.shape
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        at = np.where(ok, rows * w + cols, 0)
        lv = frame_labels.ravel()[at]
        ok &= np.where(steps <= 0, inside & (lv == lab_of), lv == 0)
    owner = np.broadcast_to(p_seg[:, None], rows.shape)[ok]
    at = at[ok]
    # offsets from the centroid, per edge point and step (no per-sample gathers)
    y = (ri[pick] - cy[ids[p_seg]])[:, None] + dr[pick, None] * steps
    x = (ci[pick] - cx[ids[p_seg]])[:, None] + dc[pick, None] * steps
    # single precision: sub-pixel distances need no more, and it halves the time here
    y, x = y[ok].astype(np.float32), x[ok].astype(np.float32)
    rho = np.hypot(y, x)
    t = np.arctan2(y, x)
    t += np.float32(np.pi)
    t *= np.float32(_REF_ANGLES / (2 * np.pi))
    i0 = t.astype(np.int32)
    t -= i0
    q = q_of[owner]
    base = q * _REF_ANGLES
    i1 = base + ((i0 + 1) & (_REF_ANGLES - 1))
    i0 = base + (i0 & (_REF_ANGLES - 1))
    flat_ref = ref.ravel()
    r0 = flat_ref[i0]
    r_ref = r0 + (flat_ref[i1] - r0) * t
    cos_psi = lean.ravel()[i0]
    # distance from the outline along its normal, binned per particle
    s = (rho - r_ref) * cos_psi
    n_bins = int(round(2 * _BAND_PX / _BAND_BIN))
    b = ((s + _BAND_PX) * (1 / _BAND_BIN)).astype(int)
    use = (s > -_BAND_PX) & (b < n_bins)
    flat = q[use] * n_bins + b[use]
    size = which.size * n_bins
    v = raw.ravel()[at[use]].astype(np.float64)
    counts = np.bincount(flat, minlength=size).reshape(which.size, n_bins).astype(float)
    sums = np.bincount(flat, v, size).reshape(which.size, n_bins)
    squares = np.bincount(flat, v * v, size).reshape(which.size, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    centres = -_BAND_PX + (np.arange(n_bins) + 0.5) * _BAND_BIN
    inside, outside = centres < 0, centres > 0
    # enough of a profile on both sides of the outline to fit
    usable = ((counts[:, centres < -1] > 0).sum(1) >= 4) \
        & ((counts[:, centres > 1] > 0).sum(1) >= 4)
    # an outline that comes within half a pixel of the centroid (or passes beyond it: a bent
    # or hollow-looking region) is no body seen from its centre; the profile model needs one
    usable &= half_width > 0.5
    mean_in = sums[:, inside].sum(1) / np.maximum(counts[:, inside].sum(1), 1)
    mean_out = sums[:, outside].sum(1) / np.maximum(counts[:, outside].sum(1), 1)
    sign = np.sign(mean_in - mean_out)
    # a hollow particle (a capsule) is no solid body: its edge is left as it was. Its centre,
    # the hole, lies below the band's inner end, where a solid body's lies above (curved) or
    # level with it (flat). Pixel noise from the scatter in the bins
    scatter = np.maximum(squares - sums * prof, 0).sum(1)
    noise = np.sqrt(scatter / np.maximum(counts.sum(1) - n_bins, 1))
    deep = centres < -_BAND_PX + 1
    n_deep = counts[:, deep].sum(1)
    deep_mean = sign * sums[:, deep].sum(1) / np.maximum(n_deep, 1)
    core_val = np.asarray(core[0], float)[which]
    core_w = np.asarray(core[1], float)[which]  # its pixels, as the band's samples count
    usable &= np.isfinite(core_val) & (core_w > 0)
    dip = deep_mean - sign * core_val
    dip_se = noise * np.sqrt(1 / np.maximum(n_deep, 1) + 1 / np.maximum(core_w, 1))
    # a loosely fitted edge needs only a hint of a hole to be dropped (see _LOOSE_SE)
    hint = (n_deep > 0) & (dip > _HOLLOW_HINT_Z * dip_se)
    usable &= ~((n_deep > 0) & (dip > _HOLLOW_Z * dip_se))
    if not usable.any():
        return shift, fitted, model
    # the detector: bright particles (dark-field) linear in thickness; dark ones cast a
    # shadow 1 − exp(−κ t / t_max), κ from the particle's deepest shadow
    bg = sums[:, centres > _BAND_PX - 1.5].sum(1) / np.maximum(
        counts[:, centres > _BAND_PX - 1.5].sum(1), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shadow = np.clip(1 - core_val / bg, 0.0, 1 - np.exp(-_KAPPA_GRID[-1]))
    kappa = np.where(sign < 0, -np.log1p(-shadow), 0.0)
    kappa = np.where(np.isfinite(kappa), kappa, 0.0)
    dome = 1 + np.argmin(np.abs(kappa[:, None] - _KAPPA_GRID[None, :]), axis=1)
    # the central disc's radius in units of the half-width, and a sphere's mean thickness
    # over it (relative to its centre's): (2 / 3a²)(1 − (1 − a²)^(3/2))
    area = np.zeros(which.size)
    area[:] = 0.5 * (ref.astype(float) ** 2).sum(1) * (2 * np.pi / _REF_ANGLES)
    a2 = np.clip(0.0625 * area / np.pi / np.maximum(half_width, 1e-9) ** 2, 1e-6, 1.0)
    mean_t = (2 / (3 * a2)) * (1 - (1 - a2) ** 1.5)
    kap = _KAPPA_GRID[dome - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        dome_core = np.where(kap > 0, np.expm1(-kap * mean_t) / np.expm1(-kap), mean_t)
    core_model = {0: np.ones(which.size), 1: dome_core}
    cand = np.flatnonzero(usable)
    if model is None:
        kind, sig = _edge_model(prof, counts, centres, half_width, dome,
                                (core_val, core_w, core_model), cand)
    else:
        kind, sig = model
    shape = (np.zeros(which.size, int), dome)[kind]
    point = (core_val[cand], core_w[cand], core_model[kind][cand])
    _, delta, se, good = _fit_edge(prof[cand], counts[cand], centres, half_width[cand],
                                   shape[cand], sig, core=point)
    if kind == 1:
        # a curved edge's profile scales with the body's half-width, which the reference
        # outline gave δ off: once more with the half-width on the fitted edge
        _, delta, se, good = _fit_edge(prof[cand], counts[cand], centres,
                                       np.maximum(half_width[cand] + np.where(good, delta, 0),
                                                  0.5), shape[cand], sig, core=point)
    # the standard error assumed independent pixels; a detector's correlated noise (scan
    # lines, a camera's point spread) moves pooled profiles together: inflate it by as much
    inflation = _noise_inflation(raw, labels if frame is None else frame[0])
    se = se * np.sqrt(inflation)
    # a loose fit is kept only on a body with no hint of a hole, and in nearly white noise:
    # correlated noise also sways the frame's choice of edge model, which no particle's
    # standard error holds, and a wrong model moves every outline alike
    loose_ok = ~hint[cand] & (inflation <= _LOOSE_MAX_INFLATION)
    good &= (se <= _MAX_SHIFT_SE) & ((se <= _LOOSE_SE) | loose_ok)
    # δ is the edge's offset from an outline that is itself near the edge; shrunk towards
    # it by its uncertainty (the posterior mean under a normal prior of variance τ², τ² the
    # spread of the frame's fitted δ beyond their noise): a loose fit moves an outline by
    # what it can tell, a tight one as far as it says
    if good.any():
        tau2 = max(np.mean(delta[good] ** 2 - se[good] ** 2), _MIN_SPREAD_PX ** 2)
        delta = np.where(good, delta * tau2 / (tau2 + se * se), 0.0)
    # the fit is 1-D across the edge; a curved edge blurred in 2-D reads σ²·κ/2 further in
    # (κ its curvature), which averages to π·σ²/perimeter around a convex outline
    delta = delta + np.pi * sig * sig / perimeter[cand]
    rows_ids = which[cand[good]]
    shift[rows_ids] = delta[good]
    fitted[rows_ids] = True
    return shift, fitted, (kind, sig)


def _edge_model(prof, counts, centres, half_width, dome, core, cand):
    """The frame's edge model ``(kind, sigma)``: flat (0) or curved (1) edges, and the blur
    (px), fitted on up to ``_FRAME_FIT_MAX`` of the particles ``cand`` (rows of the profiles;
    see :func:`_edge_shifts`). ``core``: ``(value, weight, {kind: model})`` per row.
    """
    core_val, core_w, core_model = core
    sub = cand[np.linspace(0, cand.size - 1, min(cand.size, _FRAME_FIT_MAX)).astype(int)]
    sigmas = np.sqrt(np.square(_OPTICS_SIGMA) + _PIXEL_VAR)
    sse = np.stack([_fit_edge(prof[sub], counts[sub], centres, half_width[sub], shape[sub],
                              sigmas, shifts=_SHIFT_GRID[::2],
                              core=(core_val[sub], core_w[sub], core_model[kind][sub]))[0]
                    for kind, shape in enumerate((np.zeros(len(prof), int), dome))])
    # each particle's misfit relative to its own best: one bright, badly fitting particle
    # (a neighbour in its band, a tilted cube) would otherwise choose the frame's model alone
    sse = np.where(np.isfinite(sse), sse, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = sse / np.nanmin(sse, axis=(0, 2), keepdims=True)
    total = np.nansum(np.where(np.isfinite(rel), rel, np.nan), axis=1)  # (kind, S)
    kind, i = np.unravel_index(int(np.argmin(total)), total.shape)
    return int(kind), float(_vertex(sigmas, total[kind], int(i)))


_BLOCK_PX = 4  # side of the background blocks whose means show the noise's correlation


def _noise_inflation(raw, labels, *, max_px=1024):
    """How much more a mean of neighbouring pixels varies than if the noise were white.

    ``B²·var(difference of adjacent B×B block means) / var(difference of pixels B apart)``
    on the background (robust variances, both differences taken over the same distance so
    a slow background cancels alike): 1 for white noise, larger where the noise is
    correlated over a few pixels (scan lines, a detector's point spread). At least 1.

    Parameters
    ----------
    raw : (M, N) ndarray
        The frame.
    labels : (M, N) ndarray of int
        Particles (non-zero), kept out with a margin.
    max_px : int
        Side of the central crop looked at (enough pixels for the estimate).
    """
    b = _BLOCK_PX
    h, w = labels.shape
    r0, c0 = max((h - max_px) // 2, 0), max((w - max_px) // 2, 0)
    hh, ww = (min(h, max_px) // b) * b, (min(w, max_px) // b) * b
    if hh < 2 * b or ww < 2 * b:
        return 1.0
    img = np.asarray(raw[r0:r0 + hh, c0:c0 + ww], float)
    free = ~ndi.binary_dilation(labels[r0:r0 + hh, c0:c0 + ww] > 0, iterations=2)
    blocks = img.reshape(hh // b, b, ww // b, b).mean(axis=(1, 3))
    clear = free.reshape(hh // b, b, ww // b, b).all(axis=(1, 3))
    pair = clear[:, :-1] & clear[:, 1:]
    pix = free[:, :-b] & free[:, b:]
    if pair.sum() < 50 or pix.sum() < 500:
        return 1.0

    def robust_var(d):
        return (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2

    per_pixel = robust_var((img[:, b:] - img[:, :-b])[pix])
    if not per_pixel > 0:
        return 1.0
    blockwise = robust_var((blocks[:, 1:] - blocks[:, :-1])[pair])
    return max(1.0, b * b * blockwise / per_pixel)


def _vertex(x, y, i):
    """The minimum of the parabola through (x, y) at i − 1, i, i + 1, kept between them (x[i]
    where i is at an end or the three points do not curve upwards)."""
    if i == 0 or i == len(x) - 1:
        return float(x[i])
    (x0, x1, x2), (y0, y1, y2) = x[i - 1:i + 2], y[i - 1:i + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if not a > 0:
        return float(x1)
    return float(np.clip(-b / (2 * a), x0, x2))


def _fit_edge(prof, counts, centres, half_width, shape, sigma, shifts=_SHIFT_GRID, core=None):
    """Fit ``background + amplitude × edge(s − δ)`` to pooled edge profiles.

    Parameters
    ----------
    prof, counts : (Q, B) ndarray
        Mean frame value and sample count per bin of distance ``centres`` (px,
        outwards) from each particle's reference outline.
    half_width : (Q,) ndarray
        The body's half-width (px), the R of a curved edge profile.
    shape : (Q,) ndarray of int
        Row of :func:`_edge_table`'s table: 0 flat, 1 + j curved with κ = ``_KAPPA_GRID[j]``.
    sigma : float or (S,) ndarray
        Total blur (px) of the frame (optics and the pixel's box); with an array every
        result has a column per blur.

    shifts : ndarray
        The δ grid (px, evenly spaced).
    core : tuple of (Q,) ndarray, optional
        ``(value, weight, model)``: one more point per particle, its central disc, whose
        model value does not depend on δ.

    Returns
    -------
    sse : (Q,) ndarray
        Weighted residual sum of squares at the best δ, at the parabola's vertex between
        grid steps (inf where no δ fits).
    delta, se : (Q,) ndarray
        Outward shift of the edge from the reference outline (px), refined between grid
        steps, and its standard error (from the residual and the curvature of the fit).
    good : (Q,) ndarray of bool
        Best δ inside the grid with an amplitude of the particle's contrast sign.
    """
    x_grid, rho_grid, table = _edge_table()
    sig = np.atleast_1d(np.asarray(sigma, float))
    n_sig, n_shift = sig.size, shifts.size
    # every blur's δ grid side by side: (S·D) shifts
    # half-width / σ between the table's rows, linearly in its logarithm: (Q, S)
    pos = np.interp(np.log(half_width[:, None] / sig[None, :]), np.log(rho_grid),
                    np.arange(rho_grid.size))
    rho_i = np.minimum(pos.astype(int), rho_grid.size - 2)
    rho_w = pos - rho_i
    # depth / σ of each bin for each δ is the same for every particle: (S, D, B)
    x = (shifts[None, :, None] - centres[None, None, :]) / sig[:, None, None]
    t = np.clip((x - x_grid[0]) / (x_grid[1] - x_grid[0]), 0, x_grid.size - 1.001)
    i0 = t.astype(int)
    f = t - i0
    model = np.empty((len(prof), n_sig, n_shift, centres.size))
    for k in range(n_sig):
        w = rho_w[:, k, None]
        curves = table[shape, rho_i[:, k]] * (1 - w) + table[shape, rho_i[:, k] + 1] * w
        model[:, k] = np.take(curves, i0[k], axis=1) * (1 - f[k])
        model[:, k] += np.take(curves, i0[k] + 1, axis=1) * f[k]
    model = model.reshape(len(prof), n_sig * n_shift, centres.size)
    wy = counts * prof
    sw = counts.sum(1)[:, None]
    sy, syy = wy.sum(1)[:, None], (wy * prof).sum(1)[:, None]
    sm = np.einsum("qb,qdb->qd", counts, model)
    smy = np.einsum("qb,qdb->qd", wy, model)
    smm = np.einsum("qb,qdb->qd", counts, model * model)
    if core is not None:
        cv, cw, cm = (np.asarray(a, float)[:, None] for a in core)
        sw, sy, syy = sw + cw, sy + cw * cv, syy + cw * cv * cv
        sm, smy, smm = sm + cw * cm, smy + cw * cm * cv, smm + cw * cm * cm
    det = smm * sw - sm * sm
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = (smy * sw - sm * sy) / det
        off = (sy - amp * sm) / sw
        sse = syy - amp * smy - off * sy
    # the amplitude's sign is the particle's: its inner band against its outer one
    inner = (counts * prof)[:, centres < 0].sum(1) / np.maximum(counts[:, centres < 0].sum(1), 1)
    outer = (counts * prof)[:, centres > 0].sum(1) / np.maximum(counts[:, centres > 0].sum(1), 1)
    sign = np.sign(inner - outer)
    sse = np.where((det > 0) & (amp * sign[:, None] > 0) & np.isfinite(sse), sse, np.inf)
    sse = sse.reshape(len(prof), n_sig, n_shift)
    j = np.argmin(sse, axis=2)
    q, k = np.indices(j.shape)
    e0 = sse[q, k, j]
    good = np.isfinite(e0) & (j > 0) & (j < n_shift - 1)
    el = sse[q, k, np.clip(j - 1, 0, None)]
    er = sse[q, k, np.clip(j + 1, None, n_shift - 1)]
    step_px = shifts[1] - shifts[0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        curv = el - 2 * e0 + er
        # vertex of the parabola through the best grid point and its neighbours
        step = 0.5 * (el - er) / curv
        # SSE ≈ e0 + c (δ − δ̂)², c = curv / 2 step²; var δ̂ = residual variance / c
        dof = np.maximum((counts > 0).sum(1) - 3, 1)[:, None]
        se = np.sqrt(np.maximum(e0, 0) / dof / (curv / (2 * step_px ** 2)))
    good &= np.isfinite(step) & (curv > 0)
    step = np.where(good, np.clip(step, -0.5, 0.5), 0.0)
    delta = shifts[j] + step * step_px
    with np.errstate(invalid="ignore"):  # inf - inf where no δ fits: not used (good False)
        e0 = np.where(good, e0 - 0.25 * step * (el - er), e0)
    se = np.where(good, se, np.inf)
    if np.ndim(sigma) == 0:
        return e0[:, 0], delta[:, 0], se[:, 0], good[:, 0]
    return e0, delta, se, good


@functools.lru_cache(maxsize=1)
def _edge_table():
    """Blurred edge profiles against depth / σ (negative outside the particle), for each
    half-width / σ on a log grid: row 0 a flat body's step, row 1 + j a curved body's
    thickness (u (2 − u))^½ (u = depth / half-width, at most 1) through the detector,
    1 − exp(−κ t) normalised (κ = ``_KAPPA_GRID[j]``, 0 linear), each convolved with a unit
    Gaussian.

    Returns
    -------
    x_grid : (X,) ndarray
    rho_grid : (P,) ndarray
    table : (1 + len(_KAPPA_GRID), P, X) ndarray
    """
    # depths / σ reach (band + largest shift) / smallest blur, and the Gaussian 6 beyond
    reach = (_BAND_PX + _SHIFT_GRID[-1]) / np.sqrt(_OPTICS_SIGMA[0] ** 2 + _PIXEL_VAR)
    h = 0.04
    y = (np.arange(int((reach + 6) / h)) + 0.5) * h  # depth / σ inside the particle
    x_grid = np.arange(-reach, reach + h / 2, h)
    rho_grid = np.geomspace(0.5, 100.0, 40)
    kernel = np.exp(-0.5 * (x_grid[:, None] - y[None, :]) ** 2) * (h / np.sqrt(2 * np.pi))
    u = np.minimum(y[None, :] / rho_grid[:, None], 1.0)
    thick = np.sqrt(u * (2 - u))
    rows = [np.ones_like(thick)]
    for kappa in _KAPPA_GRID:
        rows.append(thick if kappa == 0 else -np.expm1(-kappa * thick) / -np.expm1(-kappa))
    return x_grid, rho_grid, np.stack([r @ kernel.T for r in rows])


_MIN_FREE = 0.3  # share of an outline that must face the background to reconstruct the rest
_FILL_ORDER = 4
# ridge per k² on harmonics k ≥ 2; larger ridges round cubes off (split cubes' ECD −4% at
# 0.03), none lets a short free arc extrapolate into an ellipse (18% of split au10 with
# aspect ratio > 1.15 at 0)
_FILL_RIDGE = 3e-3


def _ranges(first, counts):
    """Concatenated ``arange(f, f + c)`` for every pair: the indices of whole outlines."""
    total = int(counts.sum())
    offsets = np.repeat(first - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total) + offsets


def _denoise_radius(r):
    """Keep the harmonics of each row of a regularly sampled radius r(θ) that stand clear of
    that outline's own noise.

    The noise of a pixel outline is red: its power falls about as 1/k² with the harmonic k
    (a bump spans a few pixels whatever the particle's size), so the noise floor of an outline
    is N(k) = N₀/k², N₀ estimated from k²·power over harmonics 2 … M/2 by their lower quartile
    (robust to the few strong harmonics of a shape: a rod's even ones, a cube's every fourth;
    the quartile of an exponential is 0.288 of its mean). A harmonic is kept whole when its
    power exceeds :data:`_KEEP_ABOVE_NOISE` × N(k) (pure noise does that with probability
    e⁻⁵ ≈ 0.7%) and dropped otherwise: shape harmonics pass unshrunk, so rods and cubes keep
    their length and corners, and a noisy circle becomes a circle again — without the noise,
    whose extremes bias a caliper (Feret max up, Feret min down, perimeter up). Harmonic 0,
    the mean radius, is never touched.
    """
    m = r.shape[1]
    c = np.fft.rfft(r, axis=1)
    power = c.real ** 2 + c.imag ** 2
    k2 = np.maximum(np.arange(c.shape[1], dtype=float), 1.0) ** 2
    band = power[:, 2:m // 2] * k2[2:m // 2]
    noise = np.quantile(band, 0.25, axis=1, keepdims=True) / -np.log(0.75) / k2
    keep = power > _KEEP_ABOVE_NOISE * noise
    keep[:, 0] = True
    return np.fft.irfft(np.where(keep, c, 0), n=m, axis=1)


_N_DIRS = 45  # caliper directions over 180° (4° apart): outlines are smooth by now
_FINE_DIRS = np.deg2rad(np.linspace(-4.0, 4.0, 41))  # refinement around the coarse minimum
_BLOCK_VALUES = 4_000_000  # projections computed at once (memory: particles × points × dirs)


def _support_geometry(y, x):
    """Convex-hull perimeter and area and Feret max/min of many closed outlines at once.

    ``y``, ``x``: (K, M) outline points about each particle's centroid. The support function
    h(θ) (largest projection on direction θ) over 90 directions gives the hull as the polygon
    of its support lines (a circle's perimeter to 4e-4 at 4° steps) and the caliper widths
    w(θ) = h(θ) + h(θ + π), whose maximum is smooth (a 2° miss loses 6e-4); the minimum can be
    sharp (a rod's flat sides) and is refined on a 0.2° grid ±4° around the coarse one.
    """
    k, m = y.shape
    theta = np.linspace(0.0, np.pi, _N_DIRS, endpoint=False)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    hi = np.empty((k, _N_DIRS))
    lo = np.empty((k, _N_DIRS))
    step = max(1, _BLOCK_VALUES // (m * _N_DIRS))
    for b0 in range(0, k, step):
        b1 = min(k, b0 + step)
        pts = np.stack([x[b0:b1], y[b0:b1]], axis=-1).astype(np.float32)
        proj = pts @ np.stack([cos_t, sin_t]).astype(np.float32)
        hi[b0:b1] = proj.max(axis=1)
        lo[b0:b1] = proj.min(axis=1)
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
    # refine the minimum only, rotating each outline once so the fine directions need no
    # trigonometry per point
    centre = theta[np.argmin(width, axis=1)][:, None]
    along = x * np.cos(centre) + y * np.sin(centre)
    across = y * np.cos(centre) - x * np.sin(centre)
    best = width.min(axis=1)
    turn = np.zeros(k)  # angle from the coarse minimum to the refined one
    cos_d, sin_d = np.cos(_FINE_DIRS), np.sin(_FINE_DIRS)
    step = max(1, _BLOCK_VALUES // (m * len(_FINE_DIRS)))
    for b0 in range(0, k, step):
        b1 = min(k, b0 + step)
        proj = (np.stack([along[b0:b1], across[b0:b1]], axis=-1).astype(np.float32)
                @ np.stack([cos_d, sin_d]).astype(np.float32))
        w = proj.max(axis=1) - proj.min(axis=1)
        j = w.argmin(axis=1)
        wj = w[np.arange(b1 - b0), j]
        finer = wj < best[b0:b1]
        best[b0:b1] = np.where(finer, wj, best[b0:b1])
        turn[b0:b1] = np.where(finer, _FINE_DIRS[j], 0.0)
    res["feret_max"] = width.max(axis=1)
    res["feret_min"] = _straight_side_width(along, across, turn, best, res["feret_max"])
    return res


def _straight_side_width(along, across, turn, caliper, length):
    """Width across straight parallel sides from line fits, not from their largest bump.

    The caliper across a flat side is the largest projection of all its points: every bit
    of noise left on the side raises it (a rod's width +2 to +4%, worse at low dose), while
    a round outline touches its caliper at a point and is not affected. So where the
    outline has a straight section, the part of its extent that two round ends of the width
    cannot reach (|v| < (length − width)/2 along the sides, v = 0 at the centroid), each
    side is fitted with u = a + b·v + c·v² (u: position across, in the direction of the
    minimum caliper) on the inner half of that section, away from where the ends start to
    bend, and the width is the two fits' distance at the centroid. The fit averages the
    noise instead of taking its maximum; the curvature term keeps an ellipse's or a bowed
    side's width where the middle has it. Outlines with too few points there (round ones,
    whose straight section is empty) keep the caliper, and the fit never exceeds it.
    """
    k, m = along.shape
    ang = np.arctan2(across, along) - turn[:, None]  # rotate by the refined direction
    rad = np.hypot(along, across)
    u, v = rad * np.cos(ang), rad * np.sin(ang)
    half = _SIDE_BAND * np.clip(length - caliper, 0.0, None)[:, None] / 2
    band = np.abs(v) < half
    out = caliper.copy()
    fits = []
    for side in (u > 0, u < 0):
        w = (band & side).astype(float)
        n = w.sum(1)
        # weighted least squares for each outline at once: normal equations of (1, v, v²)
        s = [(w * v ** p).sum(1) for p in range(5)]
        t = [(w * u * v ** p).sum(1) for p in range(3)]
        gram = np.stack([np.stack(s[i:i + 3], -1) for i in range(3)], -2)
        ok = n >= _SIDE_POINTS
        gram[~ok] = np.eye(3)
        a = np.linalg.solve(gram, np.stack(t, -1)[..., None])[:, 0, 0]
        fits.append((a, ok))
    (top, ok1), (bottom, ok2) = fits
    ok = ok1 & ok2
    out[ok] = np.minimum(caliper[ok], (top - bottom)[ok])
    return out


_SIDE_BAND = 0.5  # share of a straight section (of length − width) that is fitted
_SIDE_POINTS = 8  # outline samples needed on each side for a fit of three parameters


def _traced_outline(labels, lab, box):
    """Outline (frame coordinates) of label ``lab`` whose bounding box is ``box`` (the slices
    :func:`scipy.ndimage.find_objects` gives it)."""
    return outline(labels[box] == lab) + [box[0].start, box[1].start]


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


def _background_map(labels, image, areas):
    """Local background level: a normalised convolution of the pixels outside every particle.

    Built on blocks of :data:`_BG_BLOCK` px with a Gaussian a few particle radii wide, so it is
    cheap on a whole frame and follows uneven illumination; returns a function (rows, cols) ->
    background, NaN where no background is near.
    """
    b = _BG_BLOCK
    h, w = labels.shape
    hb, wb = -(-h // b), -(-w // b)
    blocks = lambda a: _block_sums(a, b)  # noqa: E731
    # whole blocks that hold no particle pixel and have none in a neighbouring block: clear
    # of the particles' blurred edges by at least one block, at the cost of a 512² filter
    # instead of a full-frame dilation
    clear = ndi.maximum_filter(blocks(labels > 0), size=3, mode="nearest") == 0
    finite = np.isfinite(image)
    if finite.all():
        wsum = np.where(clear, float(b * b), 0.0)
        if h % b or w % b:  # partial blocks at the far edges
            wsum *= blocks(np.ones(image.shape, bool)) / (b * b)
        vsum = np.where(clear, blocks(image), 0.0)
    else:
        wsum = np.where(clear, blocks(finite), 0.0)
        vsum = np.where(clear, blocks(np.where(finite, image, 0)), 0.0)
    radius = np.sqrt(np.median(areas[areas > 0]) / np.pi) if np.any(areas > 0) else 4.0
    sigma = max(2.0, 2.0 * radius / b)
    # truncated at 3σ (not 4σ): the weights left out are 0.3% and cancel in num / den
    num = ndi.gaussian_filter(vsum, sigma, mode="nearest", truncate=3.0)
    den = ndi.gaussian_filter(wsum, sigma, mode="nearest", truncate=3.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(den > 0.05 * b * b, num / den, np.nan)

    def at(rows, cols):
        r = np.clip(np.round((np.asarray(rows) - (b - 1) / 2) / b).astype(int), 0, hb - 1)
        c = np.clip(np.round((np.asarray(cols) - (b - 1) / 2) / b).astype(int), 0, wb - 1)
        return level[r, c]

    return at


def _block_sums(a, b):
    """Sums of ``a`` over b × b blocks (the last row/column of blocks may be partial), float64.

    One axis at a time: far faster than one reduction over two strided axes.
    """
    h, w = a.shape
    hb, wb = -(-h // b), -(-w // b)
    if a.dtype == bool:
        a = a.view(np.uint8)
    if (h, w) != (hb * b, wb * b):
        a = np.pad(a, ((0, hb * b - h), (0, wb * b - w)))
    acc = np.float32 if a.dtype.kind == "f" else np.int32
    return (a.reshape(hb, b, wb * b).sum(1, dtype=acc).reshape(hb, wb, b).sum(2)
            .astype(np.float64))


def _shoelace(pts):
    y, x = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _add_background_and_shell(t, labels, image):
    """Fill ``contrast``, ``signal`` and ``shell`` (px) of table ``t`` in place."""
    n = len(t["particle_id"])
    t["contrast"] = np.full(n, np.nan)
    t["signal"] = np.full(n, np.nan)
    t["shell"] = np.full(n, np.nan)
    if n == 0:
        return
    bg = _background_map(labels, image, t["area"])(t["y"], t["x"])
    t["contrast"] = t["mean_i"] - bg
    # |Σ (I − background)| over the particle's pixels: positive for dark and bright alike
    t["signal"] = np.abs(t["contrast"]) * t["count_i"]
    # Only round particles big enough to show a hollow core get the shell test, and only
    # those whose centre does not stand out from the background clearly more than their
    # ring: through a solid sphere's centre the signal is ~1.6 × its ring's mean (a hollow
    # one's is below it), so this cheap screen loses no hollow particle; the decision itself
    # is the significance test of _hollow.
    sign = np.sign(t["contrast"])
    with np.errstate(invalid="ignore"):
        hollowish = sign * (t["i_centre"] - bg) < 1.2 * sign * (t["i_ring"] - bg)
    cand = np.flatnonzero((t["circularity"] > 0.8) & (t["aspect"] < 1.3) & np.isfinite(bg)
                          & (sign != 0) & (t["ecd"] >= _SHELL_MIN_PX) & hollowish)
    if cand.size == 0:
        return
    radius = t["ecd"][cand] / 2
    sums, counts, noise, noise_bins = _radial_profiles(
        labels, image, t["particle_id"][cand], t["y"][cand], t["x"][cand], radius, bg[cand],
        sign[cand])
    hollow, prof, n = _hollow(sums, counts, noise, noise_bins)
    if hollow.any():
        outer, inner = _fit_shell(prof[hollow], n[hollow], radius[hollow])
        t["shell"][cand[hollow]] = (outer - inner) * radius[hollow]


_SHELL_MIN_PX = 12  # ECD below which a hole cannot be told from the blur
_BIN = 0.05  # radial profile bins, in units of the particle's radius R
_REACH = 1.3  # the profile runs to this × R: the outer edge and some background
_N_BINS = int(round(_REACH / _BIN))
# bins inside 0.9 R, clear of the blurred outer edge: the noise and roundness tests use these
_INNER_BINS = (np.arange(_N_BINS) + 1) * _BIN <= 0.9
_SECTORS = 16  # a ring of up to 8 particles shows as azimuthal structure at this resolution
_RIM_TEMPLATES = (0.4, 0.5, 0.6, 0.7, 0.8)  # hole radii / R of the hollowness filters
_HOLLOW_FALSE_RATE = 1e-4  # per solid particle, from its own noise
_MIN_DIP = 0.1  # a hole lowers the centre's signal by at least this fraction of the rim's
_ROUND_FALSE_RATE = 1e-3  # a round particle called lumpy by its own noise
_MAX_LUMP = 0.25  # azimuthal spread (RMS) a round shell may show next to its dip
# bins beyond 1.15 R (past a blurred outline's edge): a shell's tail there is alike in
# every direction
_OUTER_BINS = np.arange(_N_BINS) * _BIN >= 1.15 - 1e-9
# a sector's outer excess over the others' counts at this many noise standard deviations
# (one-sided 3e-5 per sector, ~5e-4 over 16)
_SPILL_Z = 4.0


def _radial_profiles(labels, image, ids, yc, xc, radius, bg, sign):
    """Radial profiles of the thickness signal of many round particles, in bins of ρ / R.

    Each particle's disc out to :data:`_REACH` × R (R its equivalent radius) is cut into
    :data:`_SECTORS` sectors about its centroid; a sector that meets another particle's pixels or
    the frame's edge is left out, so a neighbour (touching or overlapping) never adds to
    the profile. The signal is linear in the projected thickness: −log(I / bg) for dark
    particles (Beer–Lambert), (I − bg) for bright ones.

    Returns
    -------
    sums, counts : (K, S, B) ndarray
        Summed signal and number of pixels in each sector and bin of width :data:`_BIN` R
        (a sector left out has no pixels).
    noise, noise_bins : (K,) ndarray
        Standard deviation of one pixel's signal inside 0.9 R: the pooled scatter of the
        pixels about their own sector-and-bin's mean, and about their bin's mean over all
        sectors (conservative: a slightly off-centre or not quite round particle adds to
        it; and far more degrees of freedom on a small particle).
    """
    k = len(ids)
    owner, rows, cols, fy, fx, rho = _disc_pixels(yc, xc, _REACH * radius)
    # 16 sectors of 22.5° without trigonometry: the octant from the signs and the larger
    # coordinate, then which half of it (tan 22.5° = 0.4142)
    ay, ax = np.abs(fy), np.abs(fx)
    sector = owner * _SECTORS + ((fy >= 0) * 8 + (fx >= 0) * 4 + (ay > ax) * 2
                                 + (np.minimum(ay, ax) < 0.41421356 * np.maximum(ay, ax)))
    inside = (rows >= 0) & (rows < labels.shape[0]) & (cols >= 0) & (cols < labels.shape[1])
    lab = np.zeros(rows.shape, labels.dtype)
    lab[inside] = labels[rows[inside], cols[inside]]
    bad = ~inside | ((lab != 0) & (lab != ids[owner]))
    vals = np.full(rows.shape, np.nan, np.float64)
    vals[inside] = image[rows[inside], cols[inside]]
    bad |= ~np.isfinite(vals)
    bad_sector = np.bincount(sector, bad, _SECTORS * k) > 0
    use = ~bad_sector[sector]
    owner, rho, vals = owner[use], rho[use], vals[use]
    b = bg[owner]
    dark = sign[owner] < 0
    with np.errstate(invalid="ignore", divide="ignore"):
        # a dark pixel at or below zero counts (deep shadow at very low dose) is clipped to
        # half a count rather than dropped
        signal = np.where(dark, -np.log(np.maximum(vals, 0.5) / b), vals - b)
    bins = np.minimum((rho / radius[owner] / _BIN).astype(int), _N_BINS - 1)
    # per sector (for the roundness check of _hollow) and per bin
    flat = sector[use] * _N_BINS + bins
    size = _SECTORS * k * _N_BINS
    counts = np.bincount(flat, minlength=size).reshape(k, _SECTORS, _N_BINS)
    sums = np.bincount(flat, signal, size).reshape(k, _SECTORS, _N_BINS)
    squares = np.bincount(flat, signal * signal, size).reshape(k, _SECTORS, _N_BINS)
    inner = _INNER_BINS
    noise = []
    # scatter about each cell's own mean (sector × bin: pixel noise alone, for the roundness
    # F test) and about each bin's mean over all sectors (noise plus any azimuthal
    # structure: conservative, and with many more degrees of freedom, for the rise test)
    for n, total, sq in ((counts, sums, squares),
                         (counts.sum(1, keepdims=True), sums.sum(1, keepdims=True),
                          squares.sum(1, keepdims=True))):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
            scatter = (sq - total * mean)[:, :, inner].sum((1, 2))
            dof = np.maximum(n[:, :, inner] - 1, 0).sum((1, 2))
            noise.append(np.sqrt(np.maximum(scatter, 0) / dof))
    return sums, counts, noise[0], noise[1]


def _disc_pixels(yc, xc, reach):
    """The pixels of every disc (centre ``yc, xc``, radius ``reach``), with their offsets.

    Discs whose boxes have the same size are done together: the offsets along rows and along
    columns are per disc and row (or column), only their distance needs every pixel. Each
    disc's pixels come in row-major order; the discs come grouped by box size (the callers
    sum per disc, and a disc's own order is all that fixes its floating-point sums).

    Returns
    -------
    owner, rows, cols : ndarray of int
        Disc index and frame pixel of each pixel within ``reach`` of its disc's centre.
    fy, fx, rho : ndarray of float
        The pixel's offset from the centre and its distance.
    """
    half = np.ceil(reach).astype(int) + 1
    r0, c0 = np.floor(yc).astype(int), np.floor(xc).astype(int)
    parts = []
    for h in np.unique(half):
        g = np.flatnonzero(half == h)
        d = np.arange(-h, h + 1)
        rows, cols = r0[g, None] + d, c0[g, None] + d  # (discs, 2h + 1) each
        fy, fx = rows - yc[g, None], cols - xc[g, None]
        rho = np.hypot(fy[:, :, None], fx[:, None, :])
        disc, i, j = np.nonzero(rho < reach[g, None, None])
        parts.append((g[disc], rows[disc, i], cols[disc, j], fy[disc, i], fx[disc, j],
                      rho[disc, i, j]))
    return tuple(np.concatenate(a) for a in zip(*parts))


def _hollow(sums, counts, noise, noise_bins):
    """Which particles are hollow: their radial profile rises from the centre outwards,
    significantly and in every direction.

    The projected thickness of a convex, centrally symmetric solid (sphere, cube, rod seen
    from any side) is a concave function that peaks at the centre, so its radial profile
    never rises outwards. A hollow shell's rises from its hole to its inner radius q·R. For
    each q of :data:`_RIM_TEMPLATES` the test takes the contrast
    L = Σ n_b (m_b − m̄) y_b over the bins inside q·R (y_b the measured mean of bin b, n_b its
    pixels, m_b the rising profile of a shell with that hole, m̄ its n-weighted mean). Its
    partial sums from the centre are never positive, so for any profile that does not rise
    outwards E[L] ≤ 0 (summation by parts); for a shell it is the matched filter. A particle
    is hollow when

    * some L stands above zero by more than z standard deviations (the particle's own pixel
      noise), z such that a flat-topped solid, the worst case, passes by chance with
      probability at most :data:`_HOLLOW_FALSE_RATE` (Bonferroni over the templates);
    * the fitted rise is at least :data:`_MIN_DIP` of the rim's level (a noise-free solid,
      or the small biases of the background and the log, are no hole);
    * it is round: its sectors' profiles inside 0.9 R do not differ significantly (F test
      at :data:`_ROUND_FALSE_RATE`), or their spread is under :data:`_MAX_LUMP` of the
      dip. A ring of solid particles that segmentation left as one label dips in its
      middle too, but only towards its members;
    * at least half its sectors were free of neighbours.

    Parameters
    ----------
    sums, counts : (K, S, B) ndarray
        From :func:`_radial_profiles`.
    noise, noise_bins : (K,) ndarray
        One pixel's noise: within sectors (the F test) and within bins (the rise test).

    Returns
    -------
    hollow : (K,) ndarray of bool
    prof, n : (K, B) ndarray
        The radial profile over all sectors (mean signal per bin, 0 where empty) and its
        pixels per bin (for :func:`_fit_shell`).
    """
    z = -ndtri(_HOLLOW_FALSE_RATE / len(_RIM_TEMPLATES))
    n = counts.sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(n > 0, sums.sum(1) / n, 0.0)
    best = np.full(len(prof), -np.inf)
    dip = np.zeros(len(prof))
    for m in _rim_templates():
        score, slope, level = _rise(prof, n, m)
        with np.errstate(invalid="ignore", divide="ignore"):
            rise = slope * (m.max() - m[m > 0].min())
            score = np.where(rise >= _MIN_DIP * level, score / noise_bins, -np.inf)
            better = score > best
        best = np.where(better, score, best)
        dip = np.where(better, rise, dip)
    # a shell is round: the sectors' profiles inside 0.9 R differ by noise only (an F test
    # of the between-sector against the within-sector scatter), or by little next to the
    # dip; a ring of solid particles left as one label dips in its middle too, but only
    # where its members are
    inner = _INNER_BINS
    on = counts[:, :, inner].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (on * (sums[:, :, inner] / on - prof[:, None, inner]) ** 2)
        between = np.where(on > 0, between, 0.0).sum((1, 2))
        dof_between = np.maximum((on > 0).sum(1) - 1, 0).sum(1)
        dof_within = np.maximum(on - 1, 0).sum((1, 2))
        f_ratio = between / dof_between / noise ** 2
        lumpy = f_ratio > fdtri(np.maximum(dof_between, 1), np.maximum(dof_within, 1),
                                1 - _ROUND_FALSE_RATE)
        spread = np.sqrt(np.maximum(between - dof_between * noise ** 2, 0) / on.sum((1, 2)))
        lumpy &= spread > _MAX_LUMP * dip
        # ... and it ends at its outline alike in every direction: past the blurred edge
        # (_OUTER_BINS) no sector holds clearly more than the others. A ring of particles
        # (rods crossing in a square) that separation covered with a fitted disc goes on
        # beyond it where its members stick out; an unlabelled neighbour does the same, and
        # then the background the shell fit assumes is not there either
        out_n = counts[:, :, _OUTER_BINS].sum(2).astype(float)
        out_mean = sums[:, :, _OUTER_BINS].sum(2) / out_n
        ring_mean = sums[:, :, _OUTER_BINS].sum((1, 2)) / out_n.sum(1)
        excess = out_mean - ring_mean[:, None]
        spill = (out_n > 0) & (excess > _MAX_LUMP * dip[:, None]) \
            & (excess > _SPILL_Z * noise[:, None] / np.sqrt(out_n))
        lumpy |= spill.any(1)
    used = (counts.sum(2) > 0).sum(1)
    return (best > z) & (used >= _SECTORS // 2) & ~lumpy, prof, n


def _rise(prof, n, m):
    """Weighted regression of profiles on a rising template over the template's bins.

    Returns the contrast's size in noise units per unit pixel noise (slope·sqrt(Σn(m−m̄)²)),
    the slope and the fitted level at the template's top.
    """
    region = m > 0  # bins inside the hole's edge, where the template rises
    nr = n * region
    total = nr.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mbar = (nr * m).sum(1, keepdims=True) / total
        c = nr * (m - mbar)
        sxx = (c * (m - mbar)).sum(1)
        slope = (c * prof).sum(1) / sxx
        level = (nr * prof).sum(1) / total[:, 0] + slope * (m.max() - mbar[:, 0])
    return slope * np.sqrt(sxx), slope, level


@functools.lru_cache(maxsize=1)
def _rim_templates():
    """Binned rising profiles of shells (q of :data:`_RIM_TEMPLATES`), 0 beyond the rise.

    The projected thickness of a shell (outer radius 1, inner q) a little blurred (0.05 R),
    cut at the bin holding q·R and made non-decreasing (the filter's partial sums must not
    turn positive); positive inside the cut, 0 outside it (so 0 marks the bins left out).
    """
    # only the blur of the templates: a frame whose candidates all prove solid never needs
    # the whole grid of _shell_models (six blurs)
    params, models = _shell_block(_RIM_BLUR)
    out = []
    for q in _RIM_TEMPLATES:
        k = int(np.argmin(np.abs(params[:, 0] - 1.0) + np.abs(params[:, 1] - q)
                          + np.abs(params[:, 2] - _RIM_BLUR)))
        m = np.maximum.accumulate(models[k])
        m[int(q / _BIN) + 1:] = 0.0
        out.append(m + (m > 0) * 1e-9)
    return out


def _fit_shell(prof, counts, radius):
    """Outer and inner radius (in units of R) of hollow particles from their radial profiles.

    The profile is fitted by weighted least squares (weights: pixels per bin) with
    ``amplitude × model + offset`` for every model of :func:`_shell_models` (projected
    thickness of a spherical shell, blurred), the offset taking up any error of the local
    background; the best model per particle gives its radii. The blur (in px) and the
    outline's offset from the outer edge (s) are properties of the frame and of its
    segmentation, not of one particle: with :data:`_POOL_MIN` or more hollow particles
    their medians are taken and each particle refitted with only its hole free, which
    steadies the low-dose fits.
    """
    params, models = _shell_models()
    w = counts.astype(float)
    if len(prof) < _POOL_MIN:
        return _best_shell(prof, w, params, models)[:2]
    # the frame's blur and outline offset from a first fit with everything free
    outer, inner, blur = _best_shell(prof, w, params, models)
    s_grid, q_grid, b_grid = (np.unique(params[:, j]) for j in range(3))
    s_i = np.argmin(np.abs(s_grid - np.median(outer)))
    blur_px = np.median(blur * radius)
    # nearest blur on the grid for each particle's own radius (log scale)
    b_i = np.argmin(np.abs(np.log(b_grid)[None, :] - np.log(blur_px / radius)[:, None]), axis=1)
    # params run blur-major, then s, then q (see _shell_models)
    rows = (b_i[:, None] * len(s_grid) + s_i) * len(q_grid) + np.arange(len(q_grid))
    return _best_shell(prof, w, params[rows], models[rows])[:2]


def _best_shell(prof, w, params, models):
    """Best (s, q·s, b) per profile by weighted least squares with amplitude and offset.

    ``params``/``models``: (M, 3)/(M, B) shared by all profiles, or (K, M, 3)/(K, M, B)
    one set per profile.
    """
    shared = models.ndim == 2
    mm = "pb,mb->pm" if shared else "pb,pmb->pm"
    wy = w * prof
    sw, sy, syy = w.sum(1)[:, None], wy.sum(1)[:, None], (wy * prof).sum(1)[:, None]
    sm = np.einsum(mm, w, models) if not shared else w @ models.T
    smm = np.einsum(mm, w, models * models) if not shared else w @ (models * models).T
    smy = np.einsum(mm, wy, models) if not shared else wy @ models.T
    det = smm * sw - sm * sm
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = (smy * sw - sm * sy) / det
        off = (sy - amp * sm) / sw
        rss = syy - amp * smy - off * sy
    rss = np.where((amp > 0) & (det > 0), rss, np.inf)
    best = np.argmin(rss, axis=1)
    got = params[best] if shared else params[np.arange(len(prof)), best]
    return got[:, 0], got[:, 0] * got[:, 1], got[:, 2]


_POOL_MIN = 5  # hollow particles in a frame from which its blur and outline offset are pooled


@functools.lru_cache(maxsize=1)
def _shell_models():
    """Binned radial profiles of blurred spherical shells, in units of the measured radius R.

    A shell of outer radius s and inner radius q·s projects to the thickness
    t(ρ) = sqrt(s² − ρ²) − sqrt((q·s)² − ρ²) (each term zero where its root is imaginary).
    The frame's blur (optics, pixel, a centroid a little off) is a 2-D Gaussian of width b;
    for a radial profile that is the Hankel-type integral
    (t ∗ G)(ρ) = ∫ t(ρ') (ρ'/b²) exp(−(ρ − ρ')² / 2b²) I0e(ρρ'/b²) dρ'.
    Each model is averaged over the bins of :func:`_radial_profiles` (area-weighted, as its
    pixels are). Grids: s 0.94–1.10 (the measured outline may sit a little inside the faint
    outer rim), q 0.30–0.97, b 0.015–0.18 R (a sharp 20 px capsule to a blurred small one).

    Returns
    -------
    params : (M, 3) ndarray
        (s, q, b) of each model.
    models : (M, B) ndarray
    """
    blocks = [_shell_block(b) for b in _BLUR_GRID]
    return (np.concatenate([p for p, _ in blocks]), np.concatenate([m for _, m in blocks]))


_BLUR_GRID = (0.015, 0.03, 0.05, 0.08, 0.12, 0.18)  # blur b of the shell models, in R
_RIM_BLUR = 0.05  # blur of the hollowness templates (an element of _BLUR_GRID)


@functools.lru_cache(maxsize=len(_BLUR_GRID))
def _shell_block(b):
    """The models of :func:`_shell_models` for one blur ``b``: (params, models), s-major."""
    h, src, dst, average, s, q, thick = _shell_thickness()
    kernel = (h * src / b ** 2) * np.exp(-(dst[:, None] - src) ** 2 / (2 * b * b)) \
        * i0e(dst[:, None] * src / (b * b))
    return np.column_stack([s, q, np.full(s.size, b)]), thick @ (average @ kernel).T


@functools.lru_cache(maxsize=1)
def _shell_thickness():
    """What every blur's models share: the radial grids (step h; ρ' ``src``, ρ ``dst``), the
    bin-averaging matrix, the (s, q) grid and the projected thickness of each shell on ``src``.
    """
    h = 1.0 / 400
    src = (np.arange(int(round(1.12 / h))) + 0.5) * h  # ρ' (the shells lie inside 1.10)
    dst = (np.arange(int(round(_REACH / h))) + 0.5) * h  # ρ, binned below
    bins = np.minimum((dst / _BIN).astype(int), _N_BINS - 1)
    average = np.zeros((_N_BINS, dst.size))
    average[bins, np.arange(dst.size)] = dst
    average /= average.sum(1, keepdims=True)
    s_grid = np.arange(0.94, 1.1001, 0.02)
    q_grid = np.arange(0.30, 0.9701, 0.01)
    s, q = (a.ravel() for a in np.meshgrid(s_grid, q_grid, indexing="ij"))
    r2 = src ** 2
    thick = (np.sqrt(np.clip(s[:, None] ** 2 - r2, 0, None))
             - np.sqrt(np.clip((q * s)[:, None] ** 2 - r2, 0, None)))
    return h, src, dst, average, s, q, thick
