"""Measure labelled particles in nm: size, shape and intensity, one row per label.

Outlines are traced with sub-pixel marching squares on the lightly smoothed mask, so perimeter,
convexity and Feret diameters are not inflated by the pixel staircase; the minimum Feret
diameter is the true minimum caliper width over the convex hull (rotating calipers), not a
moment-based axis. Definitions follow ANTEMA (SCIENCE.md §2): circularity = 4πA/P², convexity =
convex-hull perimeter / perimeter, solidity = area / convex-hull area.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage import measure as skmeasure

__all__ = ["measure", "COLUMNS", "feret_diameters", "outline"]

#: Columns of the table returned by :func:`measure`, in order.
COLUMNS = ("particle_id", "x_px", "y_px", "area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm",
           "perimeter_nm", "circularity", "convexity", "solidity", "aspect_ratio",
           "major_axis_nm", "minor_axis_nm", "shell_nm", "mean_intensity", "total_intensity",
           "contrast")

_INT_COLUMNS = ("particle_id",)
_OUTLINE_SIGMA = 0.7  # px; removes the staircase, rounds a corner by far less than a pixel


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
    labels, image, pixel_nm = _validate_inputs(labels, image, pixel_nm)
    objects = ndi.find_objects(labels)
    rows = []
    for index, sl in enumerate(objects):
        if sl is None:
            continue
        lab = index + 1
        if masks and lab in masks:
            r0, c0, m = masks[lab]
            sl = (slice(r0, r0 + m.shape[0]), slice(c0, c0 + m.shape[1]))
            own = np.zeros_like(labels)
            own[sl] = np.where(m, lab, 0)
            rows.append(_measure_one(own, image, lab, sl, pixel_nm))
            continue
        rows.append(_measure_one(labels, image, lab, sl, pixel_nm))
    table = {}
    for j, name in enumerate(COLUMNS):
        dtype = np.int64 if name in _INT_COLUMNS else np.float64
        table[name] = np.array([r[j] for r in rows], dtype=dtype)
    return table


def _validate_inputs(labels, image, pixel_nm):
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels (shape {labels.shape}) must be 2-D")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels (dtype {labels.dtype}) must be an integer label image")
    image = np.asarray(image)
    if image.shape != labels.shape:
        raise ValueError(f"image (shape {image.shape}) must have the same shape as labels "
                         f"(shape {labels.shape})")
    try:
        pixel_nm = float(pixel_nm)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number") from None
    if not np.isfinite(pixel_nm) or pixel_nm <= 0:
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    return labels.astype(np.int32, copy=False), image, pixel_nm


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


def _axes(coords):
    """Major and minor axis lengths (px) of the ellipse with the region's second moments."""
    if len(coords) < 2:
        return 1.0, 1.0
    cov = np.cov(coords, rowvar=False, bias=True) + np.eye(2) / 12.0  # pixels have extent
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    ev = np.clip(ev, 0.0, None)
    return 4.0 * np.sqrt(ev[0]), 4.0 * np.sqrt(ev[1])


def _measure_one(labels, image, lab, sl, pixel_nm):
    pad = 4
    r0 = max(sl[0].start - pad, 0)
    c0 = max(sl[1].start - pad, 0)
    r1 = min(sl[0].stop + pad, labels.shape[0])
    c1 = min(sl[1].stop + pad, labels.shape[1])
    crop = labels[r0:r1, c0:c1]
    mask = crop == lab
    rr, cc = np.nonzero(mask)
    area_px = float(rr.size)
    y_c, x_c = rr.mean() + r0, cc.mean() + c0
    pts = outline(mask)
    if len(pts) >= 3:
        perimeter_px = _polygon_length(pts)
        hull_pts, hull_perim, hull_area = _hull(pts)
        poly_area = _shoelace(pts)
        feret_max, feret_min = feret_diameters(hull_pts)
    else:  # a region of one or two pixels
        perimeter_px, hull_perim, hull_area, poly_area = 4.0, 4.0, 1.0, 1.0
        feret_max = feret_min = 1.0
    major, minor = _axes(np.column_stack([rr, cc]).astype(float))
    ecd_px = 2.0 * np.sqrt(area_px / np.pi)
    circularity = 4.0 * np.pi * area_px / perimeter_px ** 2 if perimeter_px > 0 else np.nan
    convexity = min(hull_perim / perimeter_px, 1.0) if perimeter_px > 0 else np.nan
    solidity = min(poly_area / hull_area, 1.0) if hull_area > 0 else 1.0
    aspect = feret_max / feret_min if feret_min > 0 else np.nan

    img_crop = np.asarray(image[r0:r1, c0:c1], dtype=np.float64)
    inside = img_crop[mask]
    mean_i = float(np.nanmean(inside)) if inside.size else np.nan
    total_i = float(np.nansum(inside))
    bg = _local_background(labels, image, sl, ecd_px)
    contrast = mean_i - bg if np.isfinite(bg) else np.nan
    shell_px = np.nan
    if circularity > 0.8 and aspect < 1.3 and np.isfinite(bg) and ecd_px >= 12:
        shell_px = _shell_thickness(img_crop, mask, y_c - r0, x_c - c0, ecd_px / 2.0, bg)
    p = pixel_nm
    return (lab, x_c, y_c, area_px * p * p, ecd_px * p, feret_max * p, feret_min * p,
            perimeter_px * p, circularity, convexity, solidity, aspect, major * p, minor * p,
            shell_px * p, mean_i, total_i, contrast)


def _shoelace(pts):
    y, x = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _local_background(labels, image, sl, ecd_px):
    """Median of the image in a ring around the particle, away from every particle."""
    gap = 2 + int(round(0.1 * ecd_px))
    width = max(4, int(round(0.3 * ecd_px)))
    reach = gap + width
    r0 = max(sl[0].start - reach, 0)
    c0 = max(sl[1].start - reach, 0)
    r1 = min(sl[0].stop + reach, labels.shape[0])
    c1 = min(sl[1].stop + reach, labels.shape[1])
    crop = labels[r0:r1, c0:c1]
    lab_here = labels[sl][labels[sl] > 0]
    any_particle = crop > 0
    dist = ndi.distance_transform_edt(~any_particle)
    ring = (dist > gap) & (dist <= reach)
    vals = np.asarray(image[r0:r1, c0:c1], dtype=np.float64)[ring]
    vals = vals[np.isfinite(vals)]
    if vals.size < 8 or lab_here.size == 0:
        return np.nan
    return float(np.median(vals))


def _shell_thickness(img, mask, yc, xc, radius, bg):
    """Shell thickness (px) of a hollow round particle, NaN if it is not hollow.

    The projected thickness of a hollow sphere (outer radius R, inner r) at distance ρ from its
    centre is sqrt(R²−ρ²) − sqrt(r²−ρ²) (second term zero outside r). Its radial profile dips in
    the centre and peaks at ρ = r; fitting that family to the measured profile gives r, and the
    shell is R − r. Bright-field amplitude contrast is linearised by −log(I / background).
    """
    rr, cc = np.nonzero(mask)
    vals = img[rr, cc]
    if bg > 0 and np.nanmean(vals) < bg and np.all(vals > 0):
        signal = -np.log(vals / bg)  # dark particles: Beer–Lambert, linear in thickness
    else:
        signal = np.abs(vals - bg)
    rho = np.hypot(rr - yc, cc - xc)
    nb = int(np.ceil(radius))
    bins = np.minimum(rho.astype(int), nb - 1)
    counts = np.bincount(bins, minlength=nb)
    sums = np.bincount(bins, weights=signal, minlength=nb)
    ok = counts > 0
    prof = np.where(ok, sums / np.maximum(counts, 1), 0.0)
    centres = np.arange(nb) + 0.5
    centre = prof[centres < 0.25 * radius]
    ring = prof[(centres >= 0.3 * radius) & ok]
    if centre.size == 0 or ring.size == 0:
        return np.nan
    peak = float(np.max(ndi.uniform_filter1d(ring, 3)))
    if peak <= 0 or float(np.mean(centre)) > 0.6 * peak:
        return np.nan  # solid: a hollow shell is much thinner through its centre than its rim
    fractions = np.linspace(0.2, 0.98, 79)
    r_in = fractions[:, None] * radius
    model = (np.sqrt(np.clip(radius ** 2 - centres[None, :] ** 2, 0, None))
             - np.sqrt(np.clip(r_in ** 2 - centres[None, :] ** 2, 0, None)))
    wgt = counts.astype(float)
    num = (model * prof * wgt).sum(1)
    den = (model * model * wgt).sum(1)
    amp = num / np.maximum(den, 1e-12)
    resid = ((prof[None, :] - amp[:, None] * model) ** 2 * wgt).sum(1)
    best = int(np.argmin(resid))
    return float(radius - r_in[best, 0])
