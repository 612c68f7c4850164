"""Segment nanoparticles in one electron micrograph.

The steps follow what microscopists use (autoSTEM, ANTEMA; SCIENCE.md §1–2), with two
additions that matter for weak-contrast particles (polystyrene, silica) on a mottled film:
a background that follows the film locally, and outlines moved to where each edge really is.

1. Replace non-finite pixels; give up early (empty labels) on constant, all-NaN or tiny frames.
2. Orient the frame (particles positive): polarity from the skew of a flattened frame (dark
   particles in bright-field, bright ones in HAADF) unless the caller says which; bright-field
   contrast is linearised with −log(I / background).
3. Denoise with a Gaussian whose width grows as the dose falls.
4. Detect with hysteresis against a background fitted without the particles (normalised
   convolution), first frame-wide, then at a scale set by the size of the particles found, so
   film mottle and uneven illumination do not decide what is a particle. Both levels are set
   in units of the background's own spread (film texture plus noise): the outline level at 3σ,
   the seed level from the threshold method (Li by default, as autoSTEM) clipped to 5–8σ.
5. Refine every outline: the edge profile averaged along each particle's outline is fitted
   with blurred curved (sphere, rod) and flat (cube) edge models, all particles at once (one
   least-squares grid search per size class), and each particle is re-thresholded at the
   level its model has at the true edge.
6. Fill holes, despeckle by size in nm, drop regions that do not stand out of the background,
   remove particles touching the frame border.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from scipy import ndimage as ndi, sparse, spatial, special
from scipy.sparse import csgraph
from skimage import filters, measure, morphology, segmentation
from threadpoolctl import threadpool_limits  # comes with scikit-learn
from ._checks import check_pixel_nm

__all__ = ["segment", "flatten_background", "detect_polarity", "THRESHOLDS"]

class _NoConvergence(ValueError):
    """Li's iteration did not settle."""


_LI_MAX_ITER = 500


def _threshold_li(values):
    """Li's threshold with a bound on its iterations: on some frames (a bright-field frame
    taken as bright particles) the float iteration cycles for ever above its tolerance."""
    count = iter(range(_LI_MAX_ITER))

    def bound(_):
        if next(count, None) is None:
            raise _NoConvergence("threshold_li did not converge")

    return filters.threshold_li(values, iter_callback=bound)


#: Named threshold methods; ``segment(threshold=...)`` also accepts any callable
#: ``f(values) -> float``.
THRESHOLDS: dict[str, Callable[[np.ndarray], float]] = {
    "li": _threshold_li,
    "otsu": filters.threshold_otsu,
    "yen": filters.threshold_yen,
    "triangle": filters.threshold_triangle,
}

_MIN_SIDE_PX = 16  # below this a frame cannot hold a measurable, non-border particle
_LOW_SIGMAS = 3.0  # hysteresis outline level, in units of the background spread
_SEED_SIGMAS = (5.0, 8.0)  # the seed level (threshold method) is clipped to this range
_TARGET_SNR = 16.0  # the fainter particles' peak over smoothed noise, the denoising target
_STATS_PX = 512 * 512  # background statistics from at most about this many pixels
_SMALL_AREA_QUANTILE = 25.0  # "the smaller particles": this percentile of region areas
# a frame holds particles when its strongest peaks this many background spreads beyond the
# deepest dip of the texture on the other side (on bare film the two sides' extremes are
# alike: where noise sets them ~1 spread apart in about one frame in six, 2 in a few per cent)
_NULL_MARGIN = 2.0
# ... and this share beyond it: where the film's texture, not noise, sets the extremes (HAADF
# film at a few per cent), the two sides' maxima differ by ~10-20% of their height
_NULL_RATIO = 0.5
# film patches (HAADF carbon/polymer texture) that pass the seed level: fainter than this
# fraction of the frame's typical region peak AND less convex than this solidity; judged
# only with at least _FILM_MIN_REGIONS regions (a typical peak needs several particles)
_FILM_PEAK_FRACTION = 0.5
_FILM_SOLIDITY = 0.9
_FILM_MIN_REGIONS = 3


def segment(image, pixel_nm, *, polarity="auto", threshold="li", min_size_nm=0.5,
            min_area_px=12, smooth_px=None, flatten=True, refine_edges=True,
            clear_border=True):
    """Label the particles of one micrograph.

    Parameters
    ----------
    image : (M, N) array_like
        The frame, raw counts or any real values. Non-finite pixels are ignored.
    pixel_nm : float
        Pixel size in nm.
    polarity : {"auto", "dark", "bright"}, optional
        ``"dark"``: particles darker than the background (bright-field TEM); ``"bright"``:
        brighter (HAADF-STEM); ``"auto"`` detects it from the skew of the flattened frame.
    threshold : {"li", "otsu", "yen", "triangle"} or callable, optional
        Seed level of the hysteresis detection, computed on the flattened, denoised frame
        (particles positive) and clipped to 5–8 background standard deviations; a callable
        takes those values and returns the level.
    min_size_nm : float, optional
        Regions with an equivalent circular diameter below this are removed (despeckle), and
        holes below it are filled. Default 0.5 nm (ANTEMA).
    min_area_px : int, optional
        Regions smaller than this many pixels are removed whatever the pixel size, because they
        cannot be measured (noise specks at low magnification).
    smooth_px : float, optional
        Gaussian denoising width in pixels. Default: chosen from the frame's noise level.
    flatten : bool, optional
        Subtract a background fitted without the particles (film, uneven illumination).
    refine_edges : bool, optional
        Move each outline to the true edge found by fitting edge models.
    clear_border : bool or tuple of 4 bool, optional
        Remove particles the frame border crops; a tuple ``(top, bottom, left, right)``
        clears only those sides (a strip of a larger frame: its cut edges are not borders).

    Returns
    -------
    labels : (M, N) ndarray of int32
        0 is background, 1..n the particles (touching particles share a label until
        :func:`particlewatch.analysis.separate.separate` splits them).

    References
    ----------
    .. [1] Slater et al., Microsc. Microanal. 26 (2020), autoSTEM.
    .. [2] Gumbiowski et al., Nanoscale Adv. 5 (2023), ANTEMA.

    Examples
    --------
    >>> yy, xx = np.mgrid[:128, :128]
    >>> img = 100.0 - 60.0 * ((yy - 64) ** 2 + (xx - 64) ** 2 < 20 ** 2)
    >>> labels = segment(img, 0.5)
    >>> int(labels.max()), abs(int((labels == 1).sum()) - 1257) < 20
    (1, True)
    """
    img, valid = _validate_image(image, pixel_nm, polarity)
    empty = np.zeros(np.shape(image)[:2] if np.ndim(image) >= 2 else (0, 0), np.int32)
    if img is None:
        return empty
    thresh_fn = _threshold_function(threshold)
    oriented, pol, log = _oriented(img, valid, polarity=polarity, flatten=flatten)
    if oriented is None:
        return empty
    if smooth_px is not None:
        sigma = edge_sigma = float(smooth_px)
    else:
        sigma, edge_sigma = _auto_sigma(oriented)
    smooth = (ndi.gaussian_filter(oriented, sigma, mode="nearest") if sigma > 0
              else oriented.copy())
    min_area = max(int(min_area_px), int(np.ceil(np.pi / 4 * (min_size_nm / pixel_nm) ** 2)))
    found = _detect(oriented, smooth, valid, thresh_fn=thresh_fn, min_area=min_area,
                    sigma=sigma, flatten=flatten)

    def other_side():
        # with the polarity guessed (auto), the other one; with it given, nothing
        if polarity != "auto":
            return empty
        return segment(image, pixel_nm, polarity="bright" if pol == "dark" else "dark",
                       threshold=threshold, min_size_nm=min_size_nm, min_area_px=min_area_px,
                       smooth_px=smooth_px, flatten=flatten, refine_edges=refine_edges,
                       clear_border=clear_border)

    if found is None:  # nothing on this side
        return other_side()
    labels, spread, low, depth = found  # oriented and smooth are now flattened in place
    labels = _merge_islands(labels, smooth)
    if log:
        # a texture alike on both sides in intensity (HAADF film taken for dark particles)
        # is not in −log(I): its dark side is stretched. The dip, as deep a darkening.
        depth = float(-np.log(max(2.0 - np.exp(depth), 1e-6)))
    if refine_edges:
        # the outlines were drawn at the detection width; the edges are placed on the
        # frame smoothed at the particles' own width (narrower on a frame of few particles)
        edge_smooth = smooth if edge_sigma == sigma else (
            ndi.gaussian_filter(oriented, edge_sigma, mode="nearest") if edge_sigma > 0
            else oriented.copy())
        noise = _noise_sigma(oriented) / (2.0 * np.sqrt(np.pi) * max(edge_sigma, 0.5))
        labels, blur = _refine_edges(labels, edge_smooth, oriented, valid, sigma=edge_sigma,
                                     noise=noise, outline_sigma=sigma)
    else:
        blur = 1.0
    sides = _border_sides(clear_border)
    if any(sides):
        # per particle (seed) before touching ones join: a faint bridge to a cropped
        # neighbour must not take a whole particle away
        labels = _clear_border(labels, sides)
        labels = _clear_invalid_border(labels, valid)
    labels = _join_overlapping(labels, smooth, float(np.hypot(blur, sigma)))
    labels = _drop_small(labels, min_area)  # first: a dropped sliver must not leave a hole
    labels = _fill_label_holes(labels)
    labels = _drop_insignificant(labels, smooth, spread)
    labels = _drop_film_patches(labels, smooth)
    if smooth[labels > 0].max(initial=-np.inf) <= \
            max(depth + _NULL_MARGIN * spread, (1.0 + _NULL_RATIO) * depth):
        # nothing stands out beyond what the background's texture reaches on its other
        # side: a frame of bare film (its patches are not particles), or particles too few
        # to decide the polarity (the histogram's tails are the film's) on the other side
        return other_side()
    if any(sides):
        labels = _clear_border(labels, sides)
    return _relabel(labels)


def _border_sides(clear_border):
    """``clear_border`` as four flags (top, bottom, left, right)."""
    if isinstance(clear_border, (bool, np.bool_)):
        return (bool(clear_border),) * 4
    sides = tuple(bool(v) for v in clear_border)
    if len(sides) != 4:
        raise ValueError(f"clear_border must be a bool or 4 flags (top, bottom, left, right), "
                         f"not {clear_border!r}")
    return sides


# -- input checks ---------------------------------------------------------------------------

def _validate_image(image, pixel_nm, polarity):
    """Return a float32 copy with non-finite pixels filled, and the finite mask, or (None, None)
    for a frame without usable content."""
    if polarity not in ("auto", "dark", "bright"):
        raise ValueError(f"polarity {polarity!r} must be 'auto', 'dark' or 'bright'")
    pixel_nm = check_pixel_nm(pixel_nm)
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"image (shape {arr.shape}) must be 2-D")
    if min(arr.shape) < _MIN_SIDE_PX or not np.issubdtype(arr.dtype, np.number):
        return None, None
    img = arr.astype(np.float32)  # always a copy: never change the caller's array
    valid = np.isfinite(img)
    if not valid.any():
        return None, None
    finite = img[valid]
    lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        return None, None
    if not valid.all():
        img[~valid] = np.median(finite)
    return img, valid


def _threshold_function(threshold):
    if callable(threshold):
        return threshold
    try:
        return THRESHOLDS[threshold]
    except (KeyError, TypeError):
        raise ValueError(f"threshold {threshold!r} must be one of {sorted(THRESHOLDS)} "
                         "or a callable") from None


def _safe_threshold(fn, values):
    if values.size == 0 or not values.max() > values.min():
        return None
    try:
        level = float(fn(values))
    except ValueError:  # e.g. Otsu on a single-valued image
        return None
    return level if np.isfinite(level) else None


# -- background and polarity ----------------------------------------------------------------

def _downsample_factor(shape, target_px=256):
    return max(1, min(shape) // target_px)


def _block_mean(image, factor):
    if factor == 1:
        return image.astype(np.float32, copy=True)
    m, n = (s // factor * factor for s in image.shape)
    # one axis at a time: far faster than a mean over a 4-D view
    rows = image[:m, :n].reshape(m // factor, factor, n).sum(axis=1, dtype=np.float32)
    cols = rows.reshape(m // factor, n // factor, factor).sum(axis=2)
    return cols * np.float32(1.0 / factor ** 2)


def _upsample(small, shape):
    """Bilinear upsampling of a block-averaged image (block centres at half a block in),
    separable: rows of the small image first, then the full-size pass once."""
    small = np.asarray(small, dtype=np.float32)
    rows = _linear_weights(shape[0], small.shape[0])
    cols = _linear_weights(shape[1], small.shape[1])
    i0, t = rows
    tall = small[i0] * (1 - t)[:, None] + small[np.minimum(i0 + 1, small.shape[0] - 1)] * t[:, None]
    j0, u = cols
    j1 = np.minimum(j0 + 1, small.shape[1] - 1)
    return (tall[:, j0] * (1 - u) + tall[:, j1] * u).astype(np.float32, copy=False)


def _linear_weights(n_out, n_in):
    """Source index and weight of each output pixel for grid-mode linear interpolation,
    clamped at the edges (nearest)."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    i0 = np.minimum(pos.astype(np.int64), max(n_in - 2, 0))
    return i0, (pos - i0).astype(np.float32)


def flatten_background(image, *, exclude=None, scale_px=None):
    """Estimate the large-scale background (uneven illumination) of a frame.

    The frame is block-averaged (about four blocks per Gaussian width, at least 16 blocks a
    side) and smoothed with a wide Gaussian by normalised convolution, so pixels in ``exclude`` (particles) do not pull the background.

    Parameters
    ----------
    image : (M, N) ndarray
        The frame.
    exclude : (M, N) ndarray of bool, optional
        Pixels to leave out of the fit (particles).
    scale_px : float, optional
        Gaussian width of the background in full-resolution pixels. Default: 1/8 of the
        shorter side, far larger than any particle that can be measured whole in the frame.

    Returns
    -------
    background : (M, N) ndarray of float32
    """
    image = np.asarray(image, dtype=np.float32)
    if scale_px is None:
        scale_px = min(image.shape) / 8.0
    factor = max(1, min(int(scale_px / 4.0), min(image.shape) // 16))
    sigma = max(1.0, scale_px / factor)
    small = _block_mean(image, factor)
    if exclude is None:
        weight = np.ones_like(small)
    else:
        weight = 1.0 - _block_mean(exclude.astype(np.float32), factor)
    num = ndi.gaussian_filter(small * weight, sigma, mode="nearest")
    den = ndi.gaussian_filter(weight, sigma, mode="nearest")
    fallback = float(np.median(small))
    with np.errstate(invalid="ignore", divide="ignore"):
        bg_small = np.where(den > 1e-3, num / np.maximum(den, 1e-12), fallback)
    return _upsample(bg_small.astype(np.float32), image.shape)


def detect_polarity(flat):
    """Return ``"dark"`` or ``"bright"``: the side on which the flattened frame has its tail.

    Particles are a minority of pixels that sit far on one side of the background; noise is
    symmetric. The decision uses lightly smoothed values so shot noise does not decide it.

    Parameters
    ----------
    flat : (M, N) ndarray
        Background-subtracted frame.

    Returns
    -------
    str
    """
    flat = np.asarray(flat, dtype=np.float32)
    factor = _downsample_factor(flat.shape, target_px=512)
    small = _block_mean(flat, factor)
    small = ndi.gaussian_filter(small, 1.0)
    p1, med, p99 = np.percentile(small, [0.5, 50, 99.5])
    return "dark" if (med - p1) > (p99 - med) else "bright"


def _oriented(img, valid, *, polarity, flatten):
    """The frame with particles positive: −log(I / background) for dark particles (linear in
    thickness, which the edge models assume), ``I − background`` for bright ones; the
    polarity taken, and whether the log was."""
    if flatten:
        bg = flatten_background(img)
    else:
        bg = np.full_like(img, np.median(_subsample(img, valid)))
    flat = img - bg
    pol = detect_polarity(flat) if polarity == "auto" else polarity
    if pol == "dark" and float(np.min(bg)) > 0 and float(np.median(_subsample(img, valid))) > 0:
        # Bright-field amplitude contrast is exp(−thickness/λ).
        pos = img > 0
        floor = 0.5 * float(np.min(img[valid & pos])) if pos.any() else 0.5
        oriented = np.log(bg / np.maximum(img, floor), dtype=np.float32)
        log = True
    else:
        log = False
        oriented = flat if pol == "bright" else -flat
    oriented = oriented.astype(np.float32, copy=False)
    oriented[~valid] = 0.0
    if not oriented.max() > oriented.min():
        return None, pol, log
    return oriented, pol, log


def _masked_background(image, exclude, sigma_px):
    """Smooth background of ``image`` at Gaussian width ``sigma_px``, ignoring ``exclude``.

    Normalised convolution on a block-averaged copy (about four blocks per ``sigma_px``, so
    the cost hardly depends on the scale); where the excluded area is wider than the scale,
    a four times wider estimate fills in.
    """
    factor = max(1, int(sigma_px / 4.0))
    small = _block_mean(image, factor)
    s = max(sigma_px / factor, 0.5)
    if exclude is None:
        bg_small = ndi.gaussian_filter(small, s, mode="nearest")
        return _upsample(bg_small, image.shape)
    weight = 1.0 - _block_mean(exclude.astype(np.float32), factor)
    weight = np.where(weight > 0.999, 1.0, 0.0).astype(np.float32)  # partly covered blocks out
    num = ndi.gaussian_filter(small * weight, s, mode="nearest")
    den = ndi.gaussian_filter(weight, s, mode="nearest")
    # the four times wider estimate on four times coarser blocks (same cost as the first)
    k = 4 if min(small.shape) >= 64 else 1
    num4 = ndi.gaussian_filter(_block_mean(small * weight, k), 4 * s / k, mode="nearest")
    den4 = ndi.gaussian_filter(_block_mean(weight, k), 4 * s / k, mode="nearest")
    fallback = float(np.median(small[weight > 0])) if (weight > 0).any() else float(
        np.median(small))
    with np.errstate(invalid="ignore", divide="ignore"):
        wide = np.where(den4 > 1e-3, num4 / den4, fallback).astype(np.float32)
        if k > 1:
            wide = _upsample(wide, small.shape)
        bg_small = np.where(den > 0.05, num / den, wide)
    return _upsample(bg_small.astype(np.float32), image.shape)


def _subsample(values2d, valid):
    step = max(1, int(np.sqrt(values2d.size / _STATS_PX)))
    v = values2d[::step, ::step]
    return v[valid[::step, ::step]]


def _hysteresis(flat, valid, *, low, high, min_area):
    """Regions above ``low`` that reach ``high`` and hold ``min_area`` pixels, holes filled."""
    mask = _fill_holes((flat > low) & valid)
    labels, n = ndi.label(mask)
    if n == 0:
        return labels, 0
    peak = _label_max(flat, labels, n)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = np.zeros(n + 1, bool)
    keep[1:] = (peak > high) & (area >= min_area)
    remap = np.zeros(n + 1, np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    return remap[labels], int(keep.sum())


def _split_at_seeds(labels, flat, high, min_area, h):
    """Split regions holding several seeds by a watershed of ``flat`` from those seeds, so
    that neighbouring particles bridged by the low level of the hysteresis (or by blur) get
    their own outlines and edge fits; :func:`_join_overlapping` joins overlapping ones again
    afterwards.

    A seed is a regional maximum above ``high`` (a particle's core, not a bump on its edge)
    that stands ``h`` (a few background spreads: not noise), and a tenth of the region's
    peak, above the pass to any higher one (:func:`_seeds`). Only regions large enough for
    two particles are looked at; the watershed runs in each split region's bounding box.
    """
    n = int(labels.max())
    if n == 0:
        return labels
    area = np.bincount(labels.ravel(), minlength=n + 1)
    peak = np.concatenate([[-np.inf], _label_max(flat, labels, n)])
    # shot noise on a bright particle exceeds the background's: a seed must also stand
    # a tenth of the region's peak out (a touching neighbour's valley is far deeper)
    h_lab = np.maximum(h, 0.1 * peak)
    todo = (area >= 2 * min_area) & (peak - high >= h_lab)  # else at most one seed
    todo[0] = False
    if not todo.any():
        return labels
    seed_px, seed_lab = _seeds(labels, flat, high, h_lab, todo, peak)
    if seed_px.size == 0:
        return labels
    out = labels.copy()
    next_label = n + 1
    objects = ndi.find_objects(labels)
    bounds = np.flatnonzero(np.r_[True, seed_lab[1:] != seed_lab[:-1], True])
    for i0, i1 in zip(bounds[:-1], bounds[1:]):
        lab = int(seed_lab[i0])
        sl = objects[lab - 1]
        region = labels[sl] == lab
        r, c = np.divmod(seed_px[i0:i1], labels.shape[1])
        markers = np.zeros(region.shape, np.int32)
        markers[r - sl[0].start, c - sl[1].start] = np.arange(1, i1 - i0 + 1)
        parts = segmentation.watershed(-flat[sl], markers, mask=region)
        view = out[sl]
        view[region] = np.where(parts[region] > 1, parts[region] + next_label - 2, lab)
        next_label += i1 - i0 - 1
    return out


def _line_min(fr, lab_flat, width, a, b, la):
    """Minimum of ``fr`` (a raveled frame of row length ``width``) along the straight,
    8-connected pixel line from pixel ``a`` to pixel ``b`` (raveled indices), for many
    lines at once; a step outside label ``la`` counts as −inf (the path left the region)."""
    r0, c0 = np.divmod(a, width)
    r1, c1 = np.divmod(b, width)
    steps = np.maximum(np.abs(r1 - r0), np.abs(c1 - c0))  # ≤ 1 px per axis and step
    reps = steps + 1
    which = np.repeat(np.arange(a.size), reps)
    start = np.cumsum(reps) - reps
    t = (np.arange(which.size) - start[which]) / np.maximum(steps[which], 1)
    rr = np.rint(r0[which] + t * (r1 - r0)[which]).astype(np.int64)
    cc = np.rint(c0[which] + t * (c1 - c0)[which]).astype(np.int64)
    pix = rr * width + cc
    vals = np.where(lab_flat[pix] == la[which], fr[pix], -np.inf)
    return np.minimum.reduceat(vals, start)


def _seeds(labels, flat, high, h_lab, todo, peak, *, k=8):
    """The seeds of the regions marked ``todo`` that hold more than one: raveled pixel
    indices and labels, sorted by label, each region's highest pixel first.

    A seed is a local maximum above ``high`` from which every path to a higher point dips
    more than ``h_lab`` (per label) below it: an h-maximum. The straight (8-connected)
    line to a higher local maximum is one such path; a maximum with a line to a higher one
    that stays within ``h_lab`` is no seed. That rejects the noise bumps on a particle's
    dome at the cost of a few line samples each, where the exact h-maximum transform (a
    grey reconstruction) costs milliseconds per region. Each region's highest pixel is a
    seed; every other maximum is tested against the ``k`` nearest higher ones of its region
    (short lines, where a bump finds the dome it sits on), the few left against the top.
    ``peak`` is each label's maximum (index 0: background).
    """
    width = labels.shape[1]
    empty = np.zeros(0, np.int64)
    idx = np.flatnonzero((flat > high) & todo[labels])
    if idx.size == 0:
        return empty, empty
    fr = flat.ravel()
    lab_flat = labels.ravel()
    lab = lab_flat[idx]
    v = fr[idx]
    # local maxima (ties kept), one neighbour at a time on the shrinking set of survivors
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        r, c = np.divmod(idx, width)
        ok = fr[np.clip(r + dr, 0, labels.shape[0] - 1) * width
                + np.clip(c + dc, 0, width - 1)] <= v
        idx, lab, v = idx[ok], lab[ok], v[ok]
    # each region's highest pixel (the first, on a plateau)
    at_top = np.flatnonzero(v == peak[lab])
    _, first = np.unique(lab[at_top], return_index=True)
    top_of = np.zeros(todo.size, np.int64)
    top_of[lab[at_top[first]]] = idx[at_top[first]]
    cand = idx != top_of[lab]
    if not cand.any():
        return empty, empty
    # the k nearest maxima of the same region (regions far apart on a third axis)
    r, c = np.divmod(idx, width)
    pts = np.column_stack([r, c, lab.astype(np.float64) * 4.0 * sum(labels.shape)])
    kk = min(k + 1, idx.size)
    dist, nb = spatial.cKDTree(pts).query(pts[cand], k=kk,
                                          distance_upper_bound=2.0 * sum(labels.shape))
    ci = np.repeat(np.flatnonzero(cand), kk)
    nb = nb.ravel()
    real = nb < idx.size
    pi, qi = ci[real], nb[real]
    higher = (v[qi] > v[pi]) | ((v[qi] == v[pi]) & (idx[qi] < idx[pi]))
    pi, qi = pi[higher], qi[higher]
    if pi.size:
        flat_dip = v[pi] - _line_min(fr, lab_flat, width, idx[pi], idx[qi], lab[pi]) < \
            h_lab[lab[pi]]
        cand[pi[flat_dip]] = False
    # the survivors against the region's top
    ci = np.flatnonzero(cand)
    dip = v[ci] - _line_min(fr, lab_flat, width, idx[ci], top_of[lab[ci]], lab[ci])
    ci = ci[dip >= h_lab[lab[ci]]]
    if ci.size == 0:
        return empty, empty
    multi = np.unique(lab[ci])
    s_idx = np.concatenate([top_of[multi], idx[ci]])
    s_lab = np.concatenate([multi, lab[ci]])
    order = np.argsort(s_lab, kind="stable")  # the top first: it keeps the region's label
    return s_idx[order], s_lab[order]


def _label_max(values, labels, n):
    """Maximum of ``values`` over each label 1..n (−inf for an empty label); one unbuffered
    ufunc pass instead of ``ndimage.maximum``'s sort of the whole frame."""
    fg = labels > 0
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, labels[fg], values[fg].astype(np.float64))
    return out[1:]


def _typical_radius(labels, q=50.0):
    """Equivalent radius (px) of the labelled regions at area percentile ``q`` (the median
    by default; a sequence of percentiles gives a list, from one count of the areas)."""
    area = np.bincount(labels.ravel())[1:]
    area = area[area > 0]
    if np.ndim(q):
        return [float(np.sqrt(np.percentile(area, p) / np.pi)) if area.size else None
                for p in q]
    return float(np.sqrt(np.percentile(area, q) / np.pi)) if area.size else None


def _detect(oriented, smooth, valid, *, thresh_fn, min_area, sigma, flatten):
    """Hysteresis detection against a background fitted without the particles.

    Round 1 flattens with a frame-wide background (1/8 of the shorter side); the particles it
    finds set the scale of the background of rounds 2 and 3, which leaves them (dilated by
    half their median radius) out. The scale is twice the radius of the smaller particles
    (the lower quartile of region areas), not of the median region: a finer background
    takes out more of the film's mottle, which is what limits the faintest (and smallest)
    particles, and in a crowded mixture the median region is a large particle or a touching
    group (PS50 among PS100: the median radius doubled the scale and lowered the PS50's peaks
    from ~7 to ~5.5 background spreads, at the seed level). Larger particles lose nothing:
    they are left out of the fit, and the normalised convolution fills in under them.
    Rounds 1 and 2 only place the particles to leave out, so they run on a 2× block-averaged
    frame (a quarter of the pixels).
    ``oriented`` and ``smooth`` are flattened in place. Returns ``(labels, spread, low)`` or
    None when nothing is found: ``spread`` is the background's standard deviation in
    ``smooth``, ``low`` the outline level.
    """
    side = float(min(smooth.shape))
    f = 2 if flatten and side >= 128 else 1
    coarse = (_block_mean(smooth, f), _block_mean(valid.astype(np.float32), f) > 0.999)
    mask, radius, small_r, dips = None, None, None, None
    for rnd in range(3 if flatten else 1):
        final = rnd == 2 or not flatten
        img, ok, k = (smooth, valid, 1) if final else (coarse[0], coarse[1], f)
        if mask is not None and mask.shape != img.shape:
            mask = _expand_mask(mask, k_from=f, shape=img.shape)
        if not flatten:
            bg = np.float32(np.median(_subsample(smooth, valid)))
        elif mask is None:
            bg = _masked_background(img, None, side / 8.0 / k)
        else:
            scale = np.clip(2.0 * small_r, 4.0 * sigma + 4.0, side / 8.0) / k
            margin = int(np.ceil((0.5 * radius + 2.0 * sigma + 1.0) / k))
            exclude = _dilate(mask, margin) | ~ok
            if dips is not None:
                # the background's own dips are left out too, as the particles are: the
                # texture's two sides stay alike, so its dips can stand for its bumps
                exclude |= _dilate(_expand_mask(dips, k_from=f, shape=img.shape)
                                   if dips.shape != img.shape else dips, margin)
            bg = _masked_background(img, exclude, scale)
        flat = img - bg
        values = _subsample(flat, ok)
        centre, spread = _background_stats(values)
        if not spread > 0:
            spread = max(_noise_sigma(img), 1e-12)
        level = _safe_threshold(thresh_fn, values)
        lo_seed, hi_seed = centre + _SEED_SIGMAS[0] * spread, centre + _SEED_SIGMAS[1] * spread
        high = lo_seed if level is None else float(np.clip(level, lo_seed, hi_seed))
        low = centre + _LOW_SIGMAS * spread
        labels, n = _hysteresis(flat, ok, low=low, high=high,
                                min_area=max(1, min_area // (k * k)))
        if n == 0:
            if final:
                return None
            mask, radius = None, None  # the full-resolution round decides alone
            continue
        mask = labels > 0
        radius, small_r = (r * k for r in _typical_radius(labels, (50.0, _SMALL_AREA_QUANTILE)))
        margin = int(np.ceil((0.5 * radius + 2.0 * sigma + 1.0) / k))
        dips, depth = _dips(flat, ok, mask, centre=centre, low=low,
                            min_area=max(1, min_area // (k * k)), margin=margin)
        if final and flatten:
            labels = _weak_particles(labels, flat, ok, low=low,
                                     seed=centre + _WEAK_SEED_SIGMAS * spread,
                                     high=high, small_r=small_r, radius=radius,
                                     min_area=min_area)
    labels = _split_at_seeds(labels, flat, high, min_area, _LOW_SIGMAS * spread)
    # only particles that merely touch stay split (blur: the smoothing and ~1 px of optics)
    labels = _join_overlapping(labels, flat, float(np.hypot(1.0, sigma)))
    labels = _relabel(labels)
    oriented -= bg + centre
    smooth -= bg + centre
    oriented[~valid] = 0.0
    smooth[~valid] = 0.0
    return labels, spread, low - centre, depth


_WEAK_SEED_SIGMAS = 3.5  # a particle-shaped region may peak this far out (not 5σ)
_WEAK_SOLIDITY = 0.9  # ... when it is as convex as a particle, unlike the film's patches
_WEAK_SIZE = (0.4, 1.5)  # ... and sized like the frame's particles (radius range, see below)
# ... and its final outline reaches down its own edge: mean at most this fraction of the peak
# (a sphere's projection averages 2/3 of its peak over its disc before blur, less after; a
# patch of film whose outline is the 3σ outline level under a peak below 5σ averages more)
_WEAK_MEAN_RATIO = 0.6


def _weak_particles(labels, flat, valid, *, low, seed, high, small_r, radius, min_area):
    """Add the faint particles that miss the seed level: regions above ``low`` peaking
    between ``seed`` and ``high`` that look like the frame's particles.

    The seed level (5σ at least) keeps the film's texture out, but the thinner members of
    a weak-contrast population (smaller polystyrene spheres, low dose) peak at 3.5–5σ and were
    lost whole. What sets them apart from the film's patches at that level is their shape
    and size, not their height: a particle's region is convex (solidity ≥ 0.9, as in
    :func:`_drop_film_patches`) and its equivalent radius lies between half the smaller
    particles' (``small_r``, the area quartile) and 1.5× the median (``radius``), while
    texture above ``low`` is ragged. The film's deepest dip is no bar here: at low dose
    it reaches the faint particles' height (4.2σ against 4.0σ on ps50 BF at ¼ dose), and
    only the shape tells them apart; the frame-level null test still applies.

    Returns ``labels`` with the accepted regions appended (new labels after the last).
    """
    if small_r is None or radius is None or not seed < high \
            or int(labels.max()) < _FILM_MIN_REGIONS:
        return labels  # a frame of one or two particles: too few to say what one looks like
    cand, n = ndi.label(_fill_holes((flat > low) & valid & (labels == 0)))
    if n == 0:
        return labels
    peak = _label_max(flat, cand, n)
    area = np.bincount(cand.ravel(), minlength=n + 1)[1:]
    r_eq = np.sqrt(area / np.pi)
    maybe = np.flatnonzero((peak > seed) & (peak <= high) & (area >= min_area)
                           & (r_eq >= _WEAK_SIZE[0] * small_r)
                           & (r_eq <= _WEAK_SIZE[1] * radius)) + 1
    if maybe.size == 0:
        return labels
    # a region touching one already found is its halo or bridge, not a particle
    touching = np.unique(cand[ndi.binary_dilation(labels > 0) & (cand > 0)])
    maybe = np.setdiff1d(maybe, touching)
    if maybe.size == 0:
        return labels
    keep = np.zeros(n + 1, bool)
    for region in measure.regionprops(np.where(np.isin(cand, maybe), cand, 0)):
        keep[region.label] = region.solidity >= _WEAK_SOLIDITY
    if not keep.any():
        return labels
    remap = np.zeros(n + 1, labels.dtype)
    remap[keep] = np.arange(1, int(keep.sum()) + 1) + int(labels.max())
    return np.where(labels > 0, labels, remap[cand])


def _dips(flat, valid, mask, *, centre, low, min_area, margin):
    """The background's own extremes on the side opposite the particles, and the deepest.

    Film texture (thickness mottle, carbon grain) and noise are symmetric about the
    background: for every bump of the film there are dips of the same kind. The dips that
    reach as far below the background as the outline level is above it (``low``, at least
    ``min_area`` pixels), away from the particles (``mask`` dilated by ``margin``: halos,
    fringes and gaps between particles are the particles' doing), show how far the texture
    alone reaches in this frame. Returns the dip mask and the deepest dip's depth below
    ``centre`` (0 without dips).
    """
    mirror = 2.0 * centre - flat
    dips, n = _hysteresis(mirror, valid, low=low, high=low, min_area=min_area)
    if n == 0:
        return dips > 0, 0.0
    near = np.unique(dips[_dilate(mask, margin) & (dips > 0)])
    keep = np.ones(n + 1, bool)
    keep[near] = False
    keep[0] = False
    if not keep.any():
        return np.zeros(flat.shape, bool), 0.0
    depth = _label_max(mirror, dips, n)[keep[1:]].max() - centre
    return keep[dips], float(depth)


def _expand_mask(small, *, k_from, shape):
    """Blow a block-averaged mask back up to ``shape`` (uncovered remainder: False)."""
    big = np.repeat(np.repeat(small, k_from, axis=0), k_from, axis=1)
    out = np.zeros(shape, bool)
    out[:big.shape[0], :big.shape[1]] = big
    return out


def _dilate(mask, margin_px):
    """Binary dilation by about ``margin_px`` (a distance threshold: cheap for wide margins)."""
    if margin_px <= 3:
        return ndi.binary_dilation(mask, iterations=max(1, margin_px))
    factor = max(1, margin_px // 4)
    small = _block_mean(mask.astype(np.float32), factor) > 0
    small = ndi.binary_dilation(small, iterations=int(np.ceil(margin_px / factor)))
    big = np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)
    out = np.ones(mask.shape, bool)  # the uncovered remainder (shape not a multiple): excluded
    out[:big.shape[0], :big.shape[1]] = big
    return out | mask


def _background_stats(values):
    """Centre and spread of the background in an oriented frame (particles positive).

    The mode is found on a histogram; the spread comes from the side below it, which holds
    only background (noise, film texture), so particles cannot inflate it.
    """
    values = values[np.isfinite(values)]
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi > lo:
        return float(lo), 0.0
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(float), 2.0)
    k = int(np.argmax(hist))
    mode = 0.5 * (edges[k] + edges[k + 1])
    below = mode - values[values < mode]
    if below.size < 16:
        return mode, 0.0
    return mode, float(np.percentile(below, 68.27))


def _noise_sigma(image):
    """Robust per-pixel noise level from differences of horizontal neighbours."""
    step = max(1, image.shape[0] // 512)  # a few hundred rows hold enough pairs
    d = np.diff(image[::step], axis=1)
    d = d[:, ::2] if d.shape[1] > 2 else d  # independent pairs
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / np.sqrt(2.0))


def _auto_sigma(oriented):
    """Gaussian denoising widths, for detection and for the edge fit: 1 px at high dose,
    more as shot noise approaches contrast.

    The contrast is that of the fainter particles' own peaks (:func:`_peak_contrast`), so
    the width depends on the noise and on what the particles look like, not on how many
    of them the frame holds (a crowd of strong particles asks for too little for the faint
    ones beside them). Detection takes it from at least three clear peaks, else from the
    frame's bright tail: on a frame of one or two particles that falls into the background
    and asks for up to 4 px, which over-smooths the particles but keeps the film's patches
    (HAADF film at normal width: 5-6σ patches beside the particles) below the seed level.
    The edge fit takes the clear peaks there are, one is enough: it places the edges of
    particles already found, and 4 px of smoothing on a lone strong particle left it
    5-15% large.
    """
    noise = _noise_sigma(oriented)
    if noise <= 0:
        return 1.0, 1.0
    few, contrast = _peak_contrast(oriented)
    tail = None
    if contrast is None or few:  # no three clear particles: the frame's bright tail
        factor = _downsample_factor(oriented.shape, target_px=512)
        small = ndi.gaussian_filter(_block_mean(oriented, factor), 1.0)
        p50, p995 = np.percentile(small, [50, 99.5])
        tail = max(float(p995 - p50), 1e-12)

    def width(c):
        # After a Gaussian of width s the noise falls by 2*sqrt(pi)*s.
        return float(np.clip(_TARGET_SNR / (2.0 * np.sqrt(np.pi) * c / noise), 1.0, 4.0))

    detect = width(tail if tail is not None else contrast)
    return detect, (width(contrast) if contrast is not None else detect)


_PEAK_SIGMAS = 6.0  # a particle's peak stands this many background spreads out (not noise)
# one width serves the frame: it is chosen for the faintest tenth of the clear peaks. A
# quarter was not faint enough in crowded mixtures: a strong population (and the extra
# maxima of its touching groups) outnumbers a faint one there, and the faint one's peaks sit
# near the 6σ cut, so PS50 among PS100 were under a quarter of the peaks counted and got the
# PS100's width (1.0 px instead of 1.5) and a seed level above a tenth of them.
_PEAK_QUANTILE = 10.0


_PEAK_BORDER_PX = 6  # px of the (≤ 512 px) copy next to the frame border where no peak counts


def _peak_contrast(oriented):
    """Contrast of the fainter particles: a low percentile of the heights of the local
    maxima that stand clearly out of the background, on a copy smoothed to about 2 px
    whatever the frame size (block means, then a Gaussian), None when none does; and
    whether fewer than three stand out (frame border included).

    One clear peak is enough: a frame of one or two particles has its particles' contrast
    as much as a crowded one (the frame-wide fallback of :func:`_auto_sigma` falls into the
    background there and asks for 4 px of smoothing instead of 1). Maxima within ``_PEAK_BORDER_PX`` of the frame border (the tail of a
    particle the border crops, and the background fit's edge, lift the outer rows by a few
    spreads: 6σ peaks on the border beside 80σ particles made a lone particle's frame look
    faint) are no particle's.
    """
    factor = _downsample_factor(oriented.shape, target_px=512)
    small = ndi.gaussian_filter(_block_mean(oriented, factor), max(2.0 / factor, 0.5))
    centre, spread = _background_stats(small.ravel())
    if not spread > 0:
        return True, None
    peaks = (small == ndi.maximum_filter(small, size=5)) & \
        (small > centre + _PEAK_SIGMAS * spread)
    # fewer than three clear peaks (border or not) is a frame of few particles
    few = int(peaks.sum()) < 3
    b = _PEAK_BORDER_PX
    if min(small.shape) > 4 * b:
        peaks[:b] = peaks[-b:] = False
        peaks[:, :b] = peaks[:, -b:] = False
    heights = small[peaks] - centre
    if heights.size == 0:
        return few, None
    return few, float(np.percentile(heights, _PEAK_QUANTILE))


# -- clean-up -------------------------------------------------------------------------------

def _clean(mask, min_area, *, fill_holes):
    if fill_holes:
        # Projected particles are simply connected; hollow capsules are measured by their
        # outer outline (the hole is measured separately as the shell).
        mask = _fill_holes(mask)
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _pass_fraction(radius_px, blur_px):
    """Pass height (as a share of the lower peak) above which two neighbours overlap.

    Two blurred spheres that just touch have a pass of about 0.81, 0.59, 0.45 and 0.25 of
    their peak at radius / blur = 1.5, 2.5, 5 and 20, two that overlap by a tenth of their
    diameter 0.95, 0.76, 0.72 and 0.75 (computed for solid spheres under a Gaussian blur);
    the boundary runs midway between them.
    """
    x = np.maximum(radius_px / max(blur_px, 0.3), 1.0)
    return 0.55 + 0.33 * (1.5 / x) ** 2.2


def _join_overlapping(labels, smooth, blur_px):
    """Give adjacent particles one label where they overlap; keep those that only touch apart.

    Detection splits regions holding several seeds; after edge refinement such neighbours
    are adjacent. Projected thickness (and so contrast) falls to zero where two particles
    only touch, leaving a valley between them once blurred, while particles that overlap
    have a pass nearly as high as their peaks (:func:`_pass_fraction`, from the smaller
    one's radius and the blur ``blur_px``). The overlapping ones are joined so that
    :func:`~particlewatch.analysis.separate.separate` can share their overlap; the touching
    ones keep their own labels (their outlines are known from the valley).
    """
    n = int(labels.max())
    if n < 2:
        return labels
    peak = np.concatenate([[0.0], _label_max(smooth, labels, n)])
    radius = np.sqrt(np.bincount(labels.ravel(), minlength=n + 1) / np.pi)
    rows, cols, passes = [], [], []
    for a, b, va, vb in ((labels[:, :-1], labels[:, 1:], smooth[:, :-1], smooth[:, 1:]),
                         (labels[:-1], labels[1:], smooth[:-1], smooth[1:])):
        edge = (a != b) & (a > 0) & (b > 0)
        if edge.any():
            rows.append(a[edge])
            cols.append(b[edge])
            passes.append(np.minimum(va[edge], vb[edge]))
    if not rows:
        return labels
    la, lb = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
    pv = np.concatenate(passes).astype(np.float64)
    lo, hi = np.minimum(la, lb), np.maximum(la, lb)
    key = lo * (n + 1) + hi
    order = np.argsort(key, kind="stable")
    key, pv = key[order], pv[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    saddle = np.maximum.reduceat(pv, first)  # highest pass along each shared boundary
    ka, kb = key[first] // (n + 1), key[first] % (n + 1)
    frac = _pass_fraction(np.minimum(radius[ka], radius[kb]), blur_px)
    join = saddle > frac * np.minimum(peak[ka], peak[kb])
    if not join.any():
        return labels
    graph = sparse.coo_matrix((np.ones(int(join.sum())), (ka[join], kb[join])),
                              shape=(n + 1, n + 1))
    _, comp = csgraph.connected_components(graph, directed=False)
    lut = (comp + 1).astype(np.int32)
    lut[0] = 0
    return lut[labels]


def _fill_label_holes(labels):
    """Fill the holes of the particle mask (projected particles are simply connected;
    hollow capsules are measured by their outer outline); a hole pixel takes the label of
    the nearest particle pixel, computed in each hole's bounding box only."""
    fg = labels > 0
    holes = _fill_holes(fg) & ~fg
    if not holes.any():
        return labels
    out = labels.copy()
    hl, nh = ndi.label(holes)
    for sl in ndi.find_objects(hl):
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        box = out[sl]
        iy, ix = ndi.distance_transform_edt(box == 0, return_distances=False,
                                            return_indices=True)
        fill = holes[sl]
        box[fill] = box[iy[fill], ix[fill]]
    return out


def _merge_islands(labels, signal, *, chunk=512):
    """Merge regions that lie inside another region's hole, and are fainter than it, into it.

    A hollow capsule's hole is filled as part of its region, but the film inside a ring can
    stand above the threshold by itself (a defocused bright-field image darkens a capsule's
    interior): those patches came out as regions of their own inside the capsule, which was
    then boxed as an agglomerate or measured by its patches. A region fainter than the ring
    that encloses it is such a patch; one thicker than its encloser is a particle lying over
    another (an overlap adds thickness) and stays apart.

    Parameters
    ----------
    labels : (M, N) ndarray of int
    signal : (M, N) ndarray
        The oriented, smoothed frame (particles positive).
    chunk : int, optional
        Regions compared at once when looking for boxes inside boxes (bounds the memory).

    Returns
    -------
    (M, N) ndarray of int
        The labels with such patches, and the background enclosed with them, given to the
        enclosing region.
    """
    n = int(labels.max())
    if n < 2:
        return labels
    slices = ndi.find_objects(labels)
    box = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] if s is not None
                    else [0, 0, 0, 0] for s in slices])
    present = np.array([s is not None for s in slices])
    # an encloser's box holds an island's box with a pixel to spare on every side
    holders = []
    for j0 in range(0, n, chunk):
        bj = box[j0:j0 + chunk, None, :]
        inside = ((box[None, :, 0] > bj[..., 0]) & (box[None, :, 1] > bj[..., 1])
                  & (box[None, :, 2] < bj[..., 2]) & (box[None, :, 3] < bj[..., 3])
                  & present[None, :])
        holders.extend(j0 + np.flatnonzero(inside.any(1) & present[j0:j0 + chunk]))
    if not holders:
        return labels
    means = ndi.mean(signal, labels, np.arange(1, n + 1))
    out = labels.copy()
    for j in holders:
        sl = slices[j]
        crop = labels[sl]
        own = crop == j + 1
        enclosed = _fill_holes(own) & ~own
        if not enclosed.any():
            continue
        inner = np.unique(crop[enclosed])
        inner = inner[inner > 0]
        # whole islands only (none reaching past the ring), fainter than the ring
        outside = np.unique(crop[~enclosed])
        fainter = inner[~np.isin(inner, outside) & (means[inner - 1] < means[j])]
        if fainter.size:
            take = enclosed & (np.isin(crop, fainter) | (crop == 0))
            out[sl][take] = j + 1
    return out


def _drop_small(labels, min_area):
    """Remove labels of fewer than ``min_area`` pixels."""
    n = int(labels.max())
    if n == 0:
        return labels
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def _relabel_clean(labels, min_area):
    """Fill holes, then label connected regions of at least ``min_area`` pixels 1..n."""
    out, n = ndi.label(_fill_holes(labels > 0))
    if n == 0:
        return out
    keep = np.bincount(out.ravel(), minlength=n + 1) >= min_area
    keep[0] = False
    return _relabel(np.where(keep[out], out, 0))


def _fill_holes(mask):
    """``binary_fill_holes`` by one labelling of the background: holes are the background
    parts (4-connected) that do not reach the frame border."""
    bg, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    outer = np.zeros(n + 1, bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        outer[edge] = True
    outer[0] = True
    return mask | ~outer[bg]


_OVERSHOOT_PX = 1  # rows an outline may overreach a particle's true edge at the border
# a contact this close to the particle's widest row is a flat cut (or face), not a cap: a
# sphere overreaching by one row touches with 2·sqrt(2r) px, under 0.9 of 2r for r > 2.5 px
_FLAT_CONTACT = 0.9


def _clear_border(labels, sides=(True, True, True, True)):
    """Remove the labels of particles that the frame border (the ``sides`` flagged: top,
    bottom, left, right) crops.

    An outline that reaches the border does not prove a cropped particle: a particle whose
    edge lies a pixel or less inside the frame reaches it through blur and noise, with a
    short contact. Projected spheres, rods and cubes are centrally symmetric, so the width
    of a whole particle's outline at the border is met again as far from its opposite edge
    as the outline overreaches the border; a particle is cropped when more than
    ``_OVERSHOOT_PX`` rows (or columns) at its far side are narrower than its contact. A
    particle touching two borders (a corner) is always removed.
    """
    n = int(labels.max())
    if n == 0:
        return labels
    sides_px = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
    touch = np.zeros((4, n + 1), bool)
    for k, edge in enumerate(sides_px):
        touch[k, edge] = True
    touch[:, 0] = False
    touch &= np.array(sides, bool)[:, None]  # sides not flagged are cuts, not borders
    hits = touch.sum(0)
    drop = hits > 1
    objects = ndi.find_objects(labels)
    for lab in np.flatnonzero(hits == 1):
        k = int(np.argmax(touch[:, lab]))
        mask = labels[objects[lab - 1]] == lab
        # rows counted from the border inward
        mask = (mask, mask[::-1], mask.T, mask.T[::-1])[k]
        width = mask.sum(axis=1)
        far = width[::-1]
        # a whole particle is wider inside than at an overreaching contact; a flat side
        # along the border (a cropped cap, a cube's face) gives no measure of the crop
        drop[lab] = (int(np.argmax(far >= width[0])) > _OVERSHOOT_PX
                     or width[0] >= _FLAT_CONTACT * width.max())
    drop[0] = False
    return np.where(drop[labels], 0, labels) if drop.any() else labels


def _relabel(labels):
    """Renumber the labels present as 1..n (int32), keeping their order."""
    n = int(labels.max()) if labels.size else 0
    present = np.zeros(n + 1, bool)
    present[labels.ravel()] = True
    present[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels]


def _drop_insignificant(labels, flat, spread):
    """Remove regions that do not peak at the seed level (``_SEED_SIGMAS[0]`` background
    spreads) once their outlines are final (edge refinement and joins may have moved them).

    A threshold always cuts something out of a blank frame; a real particle's peak stands
    out of the background's spread (film texture plus noise). The region's mean is no test:
    over an outline at the true edge it is 2/3 of a sphere's peak before blur and less after,
    so a mean floor at the outline level (3σ) dropped faint particles the seed level had
    found (one isolated PS50 in ten in crowded ps-bimodal frames), and on bare film the
    peak alone already finds nothing. A region peaking between ``_WEAK_SEED_SIGMAS`` spreads
    and the seed level stays when it is convex, sized like the frame's clear particles
    (:func:`_weak_particles`) and has an edge of its own (mean at most
    ``_WEAK_MEAN_RATIO`` of its peak; measured on ¼-dose BF ps50/ps-bimodal/capsules:
    particles 0.48–0.66, film patches 0.62–0.84). Checked on frames it was not set on
    (seeds 21–24, four other stage positions, 1024²), ¼-dose BF recall/precision of ps50 at
    0.5 / 0.6 / 0.7: .967/.998, .974/.997, .976/.992 (0.6 holds); ps100, ps-bimodal and
    HAADF unchanged by it; capsules' recall rises to .907 at 0.7 (.885 at 0.6: rings).
    """
    n = int(labels.max())
    if n == 0 or not spread > 0:
        return labels
    keep = np.zeros(n + 1, bool)
    peak = _label_max(flat, labels, n)
    keep[1:] = peak > _SEED_SIGMAS[0] * spread
    # faint particles that :func:`_weak_particles` let in pass on the same terms, judged
    # on their final outline against the frame's clear particles
    weak = np.flatnonzero(~keep[1:] & (peak > _WEAK_SEED_SIGMAS * spread)) + 1
    if weak.size and keep[1:].sum() >= _FILM_MIN_REGIONS:
        clear = np.where(keep[labels], labels, 0)
        small_r, radius = _typical_radius(clear, (_SMALL_AREA_QUANTILE, 50.0))
        area = np.bincount(labels.ravel(), minlength=n + 1)
        for region in measure.regionprops(np.where(np.isin(labels, weak), labels, 0),
                                          intensity_image=flat):
            r_eq = np.sqrt(area[region.label] / np.pi)
            keep[region.label] = (region.solidity >= _WEAK_SOLIDITY
                                  and _WEAK_SIZE[0] * small_r <= r_eq <= _WEAK_SIZE[1] * radius
                                  and region.intensity_mean
                                  <= _WEAK_MEAN_RATIO * peak[region.label - 1])
    return np.where(keep[labels], labels, 0)


def _drop_film_patches(labels, flat):
    """Remove faint, irregular regions: film texture among particles.

    On a HAADF frame of weak-contrast particles (polystyrene on carbon) the film's thicker
    patches can pass the seed level, and no test on the region alone separates them (they
    stand as far above the film's deepest dip as a real low-dose particle). Two properties
    together do: a patch peaks at well under the frame's typical particle (measured: 0.35–0.41
    of the median region peak on ps100 HAADF; real particles ≥ 0.35 on mixed-size frames, so
    the peak alone cannot decide), and its outline follows the texture, not a convex particle
    (solidity 0.56–0.87; real particles fainter than 0.6 of the median: ≥ 0.90, agglomerates,
    which are less convex, peak at the typical level). A region is dropped only when both
    hold, and only on a frame with enough regions for a typical peak.

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Labelled regions, 0 the background.
    flat : (M, N) ndarray of float
        The flattened, denoised frame, particles positive.

    Returns
    -------
    (M, N) ndarray of int
        ``labels`` with the film patches set to 0 (other labels unchanged).
    """
    n = int(labels.max())
    if n < _FILM_MIN_REGIONS:
        return labels
    peak = _label_max(flat, labels, n)
    present = np.isfinite(peak)
    if present.sum() < _FILM_MIN_REGIONS:
        return labels
    faint = np.flatnonzero(present & (peak < _FILM_PEAK_FRACTION
                                      * np.median(peak[present]))) + 1
    if faint.size == 0:
        return labels
    drop = np.zeros(n + 1, bool)
    for region in measure.regionprops(np.where(np.isin(labels, faint), labels, 0)):
        drop[region.label] = region.solidity < _FILM_SOLIDITY
    return np.where(drop[labels], 0, labels) if drop.any() else labels


def _clear_invalid_border(labels, valid):
    """Also drop particles that touch a non-finite (missing) area: they are cropped too."""
    if valid.all():
        return labels
    ring = ndi.binary_dilation(~valid) & (labels > 0)
    bad = np.unique(labels[ring])
    if bad.size:
        labels = np.where(np.isin(labels, bad), 0, labels)
    return labels


_E_STEP = 0.1    # px, resolution of the fitted edge position
_SHIFTS = np.arange(-4.0, 10.0 + 1e-9, _E_STEP)  # px, candidate edge positions (1 px smoothing)
# px of extra reach inward per px of smoothing beyond 1: the outline of a strong particle
# (the 3σ level of its blurred edge) lies ~2 blur widths outside its edge
_SHIFT_PER_SIGMA = 2.0
_BIN_PX = 0.25   # px, bin width of the edge profile
_SIGMAS = np.array([0.5, 0.8, 1.1, 1.5, 2.0, 2.7, 3.5])  # candidate blur widths (px)
_FINE_PX = 0.1   # px, sampling of the model profiles
_MODEL_HALF_PX = 48.0
_RHO_STEP = 1.08  # relative step of the radius classes that share one set of models
_LEVEL_NOISE = 1.0  # edge levels closer than this many noise levels to background: shift
_REACH_PX = 1.5  # px beyond the fitted edge a threshold may take an outline
_FLAT_EVIDENCE = 9.0  # χ² a flat edge must gain over a curved one to be chosen
_COARSE = 5  # the first fit pass tries every 5th edge position


@functools.lru_cache(maxsize=256)
def _blurred_profiles(rho_q, sigma_key):
    """Blurred curved and flat edge profiles on a fine grid, for a radius quantised to
    0.25 px (cached: particles of one frame share a few radius classes).

    Two edge kinds: a curved solid (sphere, rod: projected thickness sqrt(2ρs − s²) at depth s
    inside the edge) and a flat one (cube lying on a face: a step). ``sigma_key`` is a tuple of
    blur widths (px). Returns the grid (signed distance, negative inside) and an array
    (kind, sigma, grid).
    """
    rho = rho_q * 0.25
    grid = np.arange(-_MODEL_HALF_PX, _MODEL_HALF_PX + _FINE_PX / 2, _FINE_PX)
    depth = -grid
    curved = np.sqrt(np.clip(2 * rho * depth - depth ** 2, 0.0, None))
    curved[depth > rho] = rho
    # the step's edge exactly at 0 (half height on the sample there), as the level assumes
    step = np.where(depth > 0, rho, 0.0) + np.where(np.abs(depth) < _FINE_PX / 2, rho / 2, 0.0)
    out = np.empty((2, len(sigma_key), len(grid)))
    for k, base in enumerate((curved, step)):
        for j, sg in enumerate(sigma_key):
            out[k, j] = ndi.gaussian_filter1d(base, sg / _FINE_PX, mode="nearest")
    return grid, out


def _edge_models(rho, xs, shifts, sigmas):
    """Model profiles (kind, sigma, shift, bin) at signed distances ``xs`` for edge shifts."""
    rho_q = max(1, int(round(rho * 4)))
    grid, prof = _blurred_profiles(rho_q, tuple(float(x) for x in sigmas))
    pos = np.clip(xs[None, :] - shifts[:, None], grid[0], grid[-1])
    # linear interpolation on the regular grid, vectorised over kinds and sigmas
    f = (pos - grid[0]) / _FINE_PX
    i0 = np.clip(f.astype(int), 0, len(grid) - 2)
    t = f - i0
    return prof[:, :, i0] * (1 - t) + prof[:, :, i0 + 1] * t


def _rho_classes(rho):
    """Quantise radii (px): 0.25 px steps below 6 px, relative steps of 4% above."""
    rho = np.maximum(rho, 1.0)
    fine = np.round(rho * 4) / 4
    coarse = 6.0 * _RHO_STEP ** np.round(np.log(rho / 6.0) / np.log(_RHO_STEP))
    return np.where(rho < 6.0, fine, coarse)


def _fit_class(xs, counts, sums, stats, rq, shifts, sigmas, totals, turn, shell):
    """Least-squares fit of one radius class's profiles against every (kind, sigma, shift)
    model; return, per particle and (kind, sigma), the residual, best shift, level at the
    true edge and background.

    The level is the value the smoothed frame (blur ``totals``, in two dimensions) has at
    the true edge: that of the edge model bent round a disc of the particle's mean radius
    of curvature, perimeter / 2π (``turn`` = π / perimeter per particle; see
    :func:`_disc_edge_level`), hollow where ``shell`` (px, per particle) is positive."""
    sw, sy, syy = stats
    models = _edge_models(float(rq), xs, shifts, sigmas)
    shape = models.shape[:2]
    flat_models = models.reshape(-1, xs.size)  # (kind · sigma · shift, bins)
    swm = counts @ flat_models.T
    swmm = counts @ (flat_models ** 2).T
    sym = sums @ flat_models.T
    swg, syg = sw[:, None], sy[:, None]
    cov = sym - syg * swm / swg
    var = swmm - swm ** 2 / swg
    with np.errstate(invalid="ignore", divide="ignore"):
        a = cov / var
        r = syy[:, None] - syg ** 2 / swg - a * cov
    r[~(a > 0) | ~(var > 1e-12)] = np.inf
    r = r.reshape(len(sw), *shape, shifts.size)
    je = np.argmin(r, axis=-1)  # best edge position per (kind, sigma)

    def pick(v):
        return np.take_along_axis(v.reshape(r.shape), je[..., None], axis=-1)[..., 0]

    a_k = pick(a)
    b_k = (sy[:, None, None] - a_k * pick(swm)) / sw[:, None, None]
    level = np.empty((len(sw), 2, totals.size))
    # curved edges (spheres, rods): the model bent round the mean radius of curvature
    rcq = _rho_classes(np.maximum(0.5 / np.maximum(turn, 1e-6), float(rq)))
    shq = np.round(np.clip(shell, 0.0, float(rq)) * 2) / 2  # 0.5 px classes
    for rc, sh in set(zip(rcq.tolist(), shq.tolist())):
        level[(rcq == rc) & (shq == sh), 0] = [
            _disc_edge_level(float(rq), float(rc), float(t), sh) for t in totals]
    # flat edges (cubes): their curvature sits in the corners, where a disc of the mean
    # radius is no model; the blurred step a first-order offset σ²·turn outside its edge
    offset = np.minimum(turn[:, None] * totals[None, :] ** 2, _MAX_CURVE_PX)
    level[:, 1] = float(rq) * 0.5 * special.erfc(offset / (np.sqrt(2.0) * totals[None, :]))
    return pick(r), shifts[je], a_k * level + b_k, b_k


def _fit_profiles(xs, counts, sums, rho, sigma, curved=None, turn=None, outline_sigma=None):
    """Fit every particle's edge profile at once; return edge level, edge shift, background.

    ``counts`` and ``sums`` (particles × bins) hold each particle's profile of the flattened,
    unsmoothed frame over signed distances ``xs`` from its current outline. For every model
    (curved or flat edge, blur width, edge position) the amplitude and background follow by
    weighted least squares, for all particles of one radius class in a few matrix products.
    The blur is one for the whole frame (the optics blur every particle alike): the width that
    fits all particles best, weighing each by its own noise, found on a coarse grid of edge
    positions; with it each particle takes its best edge position on the fine grid, and the
    flat edge only where it fits clearly better than the curved one (weak, noisy profiles
    cannot tell them apart, and most particles are round). The model's value at the true
    edge, once blurred like the smoothed frame (extra width ``sigma``) and corrected for the
    curvature of the outline (``turn`` = π / perimeter per particle, px⁻¹; see
    :func:`_disc_edge_level`), is the level to threshold at (NaN where no model fits); the shift (px) is where the edge is from the
    current outline, the background the model's level far outside; last, whether each
    particle took the curved model (not the flat one).
    """
    n = counts.shape[0]
    curved_only = curved
    turn = np.zeros(n) if turn is None else np.asarray(turn, dtype=float)
    sw = counts.sum(1)
    sy = sums.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        syy = np.where(counts > 0, sums ** 2 / np.maximum(counts, 1), 0.0).sum(1)
    nbins = (counts > 0).sum(1)
    hollow_rows = np.zeros(n, bool) if curved is None else np.asarray(curved, bool)
    inner_x = xs[np.argmax(counts > 0, axis=1)]
    usable = nbins >= 8
    shift = np.zeros(n)
    sigmas = _SIGMAS
    # pass 1: all blur widths, coarse edge positions (picks the frame's blur and a first
    # edge for the radius of curvature); pass 2: that blur only, fine edge positions
    all_shifts = _shift_grid(sigma if outline_sigma is None else outline_sigma)
    for shifts in (all_shifts[::_COARSE], all_shifts):
        shape = (2, sigmas.size)
        totals = np.round(np.hypot(sigmas, sigma), 2)
        resid = np.full((n,) + shape, np.inf)
        best_shift = np.zeros((n,) + shape)
        level_at = np.full((n,) + shape, np.nan)
        base_at = np.full((n,) + shape, np.nan)
        classes = _rho_classes(rho + shift)
        # a hollow particle's shell: from its edge in to the peak of its profile (where the
        # fit's profile begins, :func:`_cut_hollow`)
        shell = np.zeros(n)
        for j in np.flatnonzero(hollow_rows):
            shell[j] = _shell_from_peak(float(classes[j]), float(shift[j] - inner_x[j]),
                                        round(float(np.hypot(sigmas[0], _HOLLOW_SMOOTH_PX)), 1))
        if hollow_rows.sum() >= 3:
            # one particle's profile peak is noisy, and a thin shell lowers the level far
            # more than a thick one raises it: the frame's median (capsules of one batch
            # share a shell thickness) where there are several
            shell[hollow_rows] = np.median(shell[hollow_rows])
        for rq in np.unique(classes[usable]):
            g = np.flatnonzero(usable & (classes == rq))
            out = _fit_class(xs, counts[g], sums[g], (sw[g], sy[g], syy[g]), rq, shifts,
                             sigmas, totals, turn[g], shell[g])
            resid[g], best_shift[g], level_at[g], base_at[g] = out
        # noise per particle from its best fit; χ² of every (kind, sigma) in those units
        rmin = resid.reshape(n, -1).min(1)
        ok = usable & np.isfinite(rmin)
        if not ok.any():
            return np.full(n, np.nan), np.zeros(n), np.zeros(n), 1.0, np.zeros(n, bool)
        noise2 = np.maximum(rmin / np.maximum(nbins - 4, 1), 1e-30)
        with np.errstate(invalid="ignore"):
            chi = (resid - rmin[:, None, None]) / noise2[:, None, None]
        chi[~ok] = 0.0
        frame_chi = np.where(np.isfinite(chi), chi, 1e6).min(1).sum(0)  # per sigma
        js = int(np.argmin(frame_chi))
        curved_chi, flat = chi[:, 0, js], chi[:, 1, js]
        with np.errstate(invalid="ignore"):
            kind = np.where(curved_chi - flat > _FLAT_EVIDENCE, 1, 0)
        if curved_only is not None:
            kind[curved_only] = 0
        rows = np.arange(n)
        shift = np.where(ok, best_shift[rows, kind, js], 0.0)
        ok &= np.isfinite(resid[rows, kind, js])
        level = np.where(ok, level_at[rows, kind, js], np.nan)
        base = np.where(ok, base_at[rows, kind, js], 0.0)
        sigmas = np.array([_vertex(sigmas, frame_chi, js)])
    return level, shift, base, float(sigmas[0]), kind == 0


def _shift_grid(sigma):
    """Candidate edge positions (px from the current outline) for smoothing ``sigma``.

    The outline detection draws lies outside the true edge by about two widths of the total
    blur for a strong particle (its 3σ level far down the blurred edge): with wide smoothing
    (low dose, or few particles whose contrast is hard to judge) the edge can be further
    inside than the 4 px that serve 1 px smoothing, and a fit stopped at the end of the grid
    leaves the particle large. The grid reaches ``_SHIFT_PER_SIGMA`` px further in per px of
    smoothing beyond 1, in steps of half a pixel so the coarse pass's positions stay on it.
    """
    extra = 0.5 * np.ceil(2.0 * _SHIFT_PER_SIGMA * max(float(sigma) - 1.0, 0.0))
    if extra == 0:
        return _SHIFTS
    return np.round(np.arange(_SHIFTS[0] - extra, _SHIFTS[-1] + 1e-9, _E_STEP), 6)


def _vertex(x, y, k):
    """The minimum of the parabola through the points ``k - 1, k, k + 1`` of ``y`` over
    ``x`` (rounded to 0.05, kept between the neighbours of ``x[k]``); ``x[k]`` at an end.

    The frame's blur is chosen on a coarse grid of widths (0.3 px steps or more) whose
    χ² sum is smooth: the vertex gives the width between grid points, where the nearest
    grid point alone jumps by a whole step (and the level with it) on a small change."""
    if k == 0 or k == len(x) - 1 or not np.all(np.isfinite(y[k - 1:k + 2])):
        return float(x[k])
    (x0, x1, x2), (y0, y1, y2) = x[k - 1:k + 2], y[k - 1:k + 2]
    # Lagrange form on uneven steps: vertex of the interpolating parabola
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    v = x1 - 0.5 * num / den if den != 0 else x1
    return round(float(np.round(np.clip(v, x0, x2) / 0.05) * 0.05), 2)


_MAX_CURVE_PX = 2.0  # px, cap of a flat edge's curvature offset (tiny, ragged outlines)
_RADIAL_STEP_PX = 0.05  # px, quadrature step of the radial blur


@functools.lru_cache(maxsize=4096)
def _disc_edge_level(rho, rc, total, shell=0.0):
    """Value at the edge of the curved edge model bent round a disc of radius
    ``rc`` (px), after a two-dimensional Gaussian blur of width ``total`` (px); unit
    amplitude as in :func:`_blurred_profiles` (thickness ``rho`` far inside).

    A blur in two dimensions lowers a particle's value at its edge where the outline
    curves (the iso-contour through the edge moves inward by about σ²·κ/2, κ the
    curvature), which a profile model in one dimension (signed distance to the outline)
    does not know. Any simple closed outline turns by 2π, so its mean radius of curvature
    is perimeter / 2π; for a disc of that radius the blurred value at its edge follows
    exactly from the radial (Hankel) form of the Gaussian, a Rice kernel:
    g(r) = ∫ f(r') r'/σ² · exp(−(r − r')²/2σ²) · I0e(r·r'/σ²) dr'. Exact for spheres and
    discs; for rods and cubes it keeps the correction right to first order, where a
    first-order offset alone leaves round particles ~1% small at σ/r ≈ 0.4.

    A hollow sphere (capsule; ``shell`` > 0, px) is the sphere less a concentric one
    ``shell`` smaller: its hole lowers the blurred edge once the blur reaches it.
    """
    if not rc > 0:
        return 0.0  # a disc of no radius: nothing at its edge
    s2 = total * total
    lo = max(0.0, rc - 7.0 * total)
    rp = np.arange(lo, rc + _RADIAL_STEP_PX / 2, _RADIAL_STEP_PX)
    depth = rc - rp
    curved = np.sqrt(np.clip(2 * rho * depth - depth ** 2, 0.0, None))
    curved[depth > rho] = rho
    if shell > 0:
        inner = depth - shell
        curved -= np.sqrt(np.clip(2 * (rho - shell) * inner - inner ** 2, 0.0, None))
        curved[inner > rho - shell] -= rho - shell
    kernel = rp / s2 * np.exp(-(rc - rp) ** 2 / (2 * s2)) * special.i0e(rc * rp / s2)
    kernel[[0, -1]] *= 0.5  # trapezoid rule
    kernel *= _RADIAL_STEP_PX
    # deeper than 7 widths inside, the kernel is below e^-24: left out
    return float(curved @ kernel)


def _turn(labels, n):
    """π / perimeter (px⁻¹) of each label 1..n, the perimeter from the label's horizontal and
    vertical boundary crossings (π/4 of their count: exact on average over orientations).

    π / perimeter is half the outline's mean curvature (any simple closed outline turns by
    2π), which sets how much a two-dimensional blur lowers the particle's value at its edge
    (:func:`_disc_edge_level`)."""
    crossings = np.zeros(n + 1)
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        edge = a != b
        crossings += np.bincount(a[edge], minlength=n + 1)
        crossings += np.bincount(b[edge], minlength=n + 1)
    # pixels on the frame border close the outline there too
    for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        crossings += np.bincount(side, minlength=n + 1)
    perimeter = np.pi / 4.0 * crossings[1:]
    return np.pi / np.maximum(perimeter, 1.0)


# a particle whose centre is fainter than this share of its brightest ring is hollow: a
# solid sphere's, rod's or cube's centre is at least as thick as any ring inside its
# outline, a capsule's with a shell up to half its radius under ~0.6 of its ring's peak
_HOLLOW_DROP = 0.75


def _ring_peak(xs, counts, sums):
    """Per particle, the highest mean over a ring of its inside (the edge profile binned by
    signed distance, lightly smoothed): averaged along the whole outline, so noise hardly
    lifts it, where a maximum over single pixels rises with the noise."""
    w = counts * (xs < 0)[None, :]
    num = ndi.gaussian_filter1d(sums * (xs < 0)[None, :], 2.0, axis=1, mode="constant")
    den = ndi.gaussian_filter1d(w, 2.0, axis=1, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        # bins of a few pixels only (the very centre) are too noisy to be the peak
        mean = np.where(den > 0.05 * w.max(1, keepdims=True), num / den, -np.inf)
    return mean.max(1)


def _hollow(lab, signed, values, rho, ring_peak):
    """Which particles are hollow (capsules): their deepest pixels (the centre) are far
    fainter than their brightest ring (``ring_peak``, :func:`_ring_peak`); solid spheres,
    rods and cubes are thickest there in projection. ``lab``, ``signed`` and ``values``
    (smoothed frame) are given for every pixel inside a particle (``lab`` > 0), ``rho``
    per particle."""
    n = rho.size
    deep = -signed >= (rho - 1.5)[lab - 1]
    area = np.maximum(np.bincount(lab[deep], minlength=n + 1)[1:], 1)
    centre = np.bincount(lab[deep], weights=values[deep], minlength=n + 1)[1:] / area
    return (ring_peak > 0) & (centre < _HOLLOW_DROP * ring_peak) & (rho >= 4.0)


_HOLLOW_SMOOTH_PX = 1.0  # px, smoothing of the mean profile whose peak marks the hole


@functools.lru_cache(maxsize=1024)
def _shell_depths(rho_q, width):
    """Shell thicknesses (px, 0.25 px steps up to ``rho_q``) and the depth inside the edge
    at which each one's projected profile peaks once blurred by ``width`` (px): the cusp at
    the hole's rim is steep inside and gentle outside, so blur moves the peak outward."""
    grid = np.arange(0.0, rho_q + 3.0 * width, _FINE_PX)
    # up to 3/4 of the radius: thicker shells leave too small a hole to peak at its rim
    shells = np.arange(0.5, max(0.75 * rho_q, 0.75), 0.25)
    depths = np.empty(shells.size)
    for i, t in enumerate(shells):
        outer = np.sqrt(np.clip(2 * rho_q * grid - grid ** 2, 0.0, None))
        inner = grid - t
        prof = outer - np.sqrt(np.clip(2 * (rho_q - t) * inner - inner ** 2, 0.0, None))
        prof = np.concatenate([np.zeros(int(4 * width / _FINE_PX) + 1), prof])
        prof = ndi.gaussian_filter1d(prof, width / _FINE_PX, mode="nearest")
        depths[i] = (np.argmax(prof) - int(4 * width / _FINE_PX) - 1) * _FINE_PX
    return shells, depths


def _shell_from_peak(rho_q, peak_depth, width):
    """Shell thickness (px) of a hollow particle whose smoothed profile peaks
    ``peak_depth`` px inside its edge (:func:`_shell_depths`)."""
    shells, depths = _shell_depths(rho_q, width)
    order = np.argsort(depths, kind="stable")
    return float(np.interp(peak_depth, depths[order], shells[order]))


def _cut_hollow(xs, counts, sums, hollow):
    """Leave out, per hollow particle, the inner part of its edge profile.

    The edge models rise monotonically inward (solid spheres, rods, cubes). A hollow
    particle (capsule) is thickest in projection just inside its hole, and its profile falls
    into the hole; fitted whole it pulls the fitted edge inward. For the particles marked
    ``hollow`` the bins inside the peak of the mean profile (lightly smoothed) are left out
    of the fit, which then sees the outer edge of the shell only: there the projected
    thickness is that of a solid sphere.
    """
    rows = np.flatnonzero(hollow)
    if rows.size == 0 or not (xs < 0).any():
        return counts, sums
    c, sm = counts[rows], sums[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(c > 0, sm / np.maximum(c, 1e-12), 0.0)
    w = (c > 0).astype(float)
    num = ndi.gaussian_filter1d(mean * w, _HOLLOW_SMOOTH_PX / _BIN_PX, axis=1, mode="nearest")
    den = ndi.gaussian_filter1d(w, _HOLLOW_SMOOTH_PX / _BIN_PX, axis=1, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where((den > 0.2) & (xs[None, :] < 0) & (c > 0), num / den, -np.inf)
    k_peak = np.argmax(prof, axis=1)
    counts, sums = counts.copy(), sums.copy()
    for r, k in zip(rows, k_peak):
        counts[r, :k] = 0.0
        sums[r, :k] = 0.0
    return counts, sums


def _max4(values):
    """Maximum over each pixel and its four neighbours (slices, no filter machinery)."""
    out = values.copy()
    np.maximum(out[1:], values[:-1], out=out[1:])
    np.maximum(out[:-1], values[1:], out=out[:-1])
    np.maximum(out[:, 1:], values[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], values[:, 1:], out=out[:, :-1])
    return out


def _edt(mask):
    """``ndi.distance_transform_edt(mask, return_indices=True)``, the same values: the
    distances from the nearest-zero indices in integers (exact), where scipy takes them
    through float64 arrays of the whole frame (as long again as the transform itself)."""
    iy, ix = ndi.distance_transform_edt(mask, return_distances=False, return_indices=True)
    dy = iy - np.arange(mask.shape[0], dtype=np.int32)[:, None]
    dx = ix - np.arange(mask.shape[1], dtype=np.int32)[None, :]
    d2 = dy * dy
    d2 += dx * dx
    return np.sqrt(d2, dtype=np.float64), (iy, ix)


def _signed_distance(labels, reach):
    """Signed distance (px) from the nearest outline (negative inside) of every pixel inside
    a particle or within its reach outside, and the label of the particle it belongs to
    (its own, or the nearest one outside).

    One Euclidean distance transform, to the ring of pixels just outside the particles; the
    result is kept for those pixels only (raveled indices ``px``, ``signed``, ``owner``),
    so what follows works on a fraction of the frame. ``reach(rho)`` gives the reach (px)
    per label (index 0 unused) from the particles' radii ``rho`` (deepest inside distance,
    px), which are returned too. Returns None without particles.
    """
    inside = labels > 0
    ring_owner = _max4(labels)
    ring = (ring_owner > 0) & ~inside
    if not ring.any():
        return None
    d, (iy, ix) = _edt(~ring)
    rho = np.maximum(_label_max(d, labels, int(labels.max())), 1.0)
    out_px = reach(rho)
    near = d <= float(np.max(out_px))
    near |= inside
    px = np.flatnonzero(near)
    dist = d.ravel()[px].astype(np.float32)
    lab = labels.ravel()[px]
    ins = lab > 0
    nearest = iy.ravel()[px] * labels.shape[1] + ix.ravel()[px]
    owner = np.where(ins, lab, ring_owner.ravel()[nearest])
    signed = np.where(ins, np.float32(0.5) - dist, dist + np.float32(0.5))
    keep = ins | (signed <= out_px[owner])
    return px[keep], signed[keep], owner[keep], rho


def _refine_edges(labels, smooth, raw, valid, *, sigma, noise, outline_sigma=None):
    """Re-threshold each particle at the level its fitted edge model has at the true edge.

    A plain threshold, or the half-contrast level, sits inside the edge of a sphere or rod,
    whose projected thickness falls to zero like sqrt(depth); by how much depends on contrast,
    blur and size. Fitting the edge profile averaged along the particle's whole outline (so
    shot noise averages out) with blurred edge models locates the edge to a fraction of a
    pixel whatever the dose or contrast. ``smooth`` and ``raw`` are flattened (background 0).

    Where that level is within ``_LEVEL_NOISE`` noise levels (``noise``: the pixel noise of
    ``smooth``) of the background, a threshold there would follow the noise; such particles
    (faint, low dose) keep the shape of their outline, moved out by the fitted edge shift
    (iso-contours of a blurred sphere, rod or cube are offsets of its outline). Particles
    whose fit fails keep their outline. ``outline_sigma`` (px, default ``sigma``) is the
    smoothing the outlines were drawn at: the profile and the edge positions tried reach
    further inward when it is wider than ``sigma``, that of ``smooth``.
    """
    n = int(labels.max())
    if n == 0:
        return labels, 1.0
    # the outlines were drawn at ``outline_sigma``: the edge may be that far inside them
    outline_sigma = sigma if outline_sigma is None else max(sigma, outline_sigma)
    band = 3.0 + 3.0 * max(outline_sigma, 1.0)

    def outer_band(rho):
        # past the true edge into the background, wider for big particles
        return np.concatenate([[0.0], band + 0.3 * rho]).astype(np.float32)

    found = _signed_distance(labels, outer_band)
    if found is None:
        return labels, 1.0
    px, signed, owner, rho = found
    w_in = np.concatenate([[0.0], np.minimum(rho, band)]).astype(np.float32)
    w_out = outer_band(rho)
    ok = valid.ravel()[px]
    sm = smooth.ravel()[px]
    sel = ok & (signed >= -w_in[owner])
    lab = owner[sel]
    x = signed[sel]
    lo = -float(w_in.max())
    nb = int(np.ceil((float(w_out.max()) - lo) / _BIN_PX)) + 1
    key = lab.astype(np.int64) * nb + ((x - lo) / _BIN_PX).astype(np.int64)
    counts = np.bincount(key, minlength=(n + 1) * nb).reshape(n + 1, nb)[1:].astype(float)
    sums = np.bincount(key, weights=raw.ravel()[px[sel]],
                       minlength=(n + 1) * nb).reshape(n + 1, nb)[1:]
    xs = lo + (np.arange(nb) + 0.5) * _BIN_PX
    inside = signed < 0
    hollow = _hollow(owner[inside], signed[inside], sm[inside], rho,
                     _ring_peak(xs, counts, sums))
    counts, sums = _cut_hollow(xs, counts, sums, hollow)
    with threadpool_limits(1):  # many small products: BLAS threads only add contention
        level, shift, base, blur, round_ = _fit_profiles(
            xs, counts, sums, rho, sigma, curved=hollow, turn=_turn(labels, n),
            outline_sigma=outline_sigma)
    by_level = np.isfinite(level) & (level - base > _LEVEL_NOISE * noise)
    px_level = _member_levels(labels, px, owner, rho, level, base, shift,
                              by_level & round_ & ~hollow, hollow=by_level & hollow,
                              total=float(np.round(np.hypot(blur, sigma), 2)),
                              floor=base + _LEVEL_NOISE * noise,
                              around=(signed, np.where(ok, sm, np.nan),
                                      noise * noise * 4.0 * np.pi * max(sigma, 0.5) ** 2))
    level = np.concatenate([[np.inf], np.where(by_level, level, np.inf)]).astype(np.float32)
    lev = level[owner]
    if px_level is not None:
        at, value = px_level
        lev[at] = value
    # a threshold shapes the outline, but only near the fitted edge: noise and neighbours
    # cannot pull it further out
    reach = np.concatenate([[0.0], shift + _REACH_PX]).astype(np.float32)
    offset = np.concatenate([[0.0], np.where(by_level, -np.inf, shift)]).astype(np.float32)
    terr = ok & (signed <= np.minimum(w_out, reach)[owner])
    new = terr & ((sm > lev) | (signed < offset[owner]))
    # Keep, per particle, only the pieces overlapping the original particle.
    grown = np.zeros(labels.shape, bool)
    grown.ravel()[px[new]] = True
    pieces, _ = ndi.label(grown)
    piece = pieces.ravel()[px]
    keep = np.zeros(int(pieces.max()) + 1, bool)
    keep[piece[inside & new]] = True
    keep[0] = False
    out = np.zeros(labels.shape, np.int32)
    take = new & keep[piece]
    out.ravel()[px[take]] = owner[take]
    return out, blur


_MERGED_AREA = 1.1  # area / (π ρ²) above which a region may hold several particles
_MEMBER_H_PX = 1.5  # px, a member's inscribed radius stands this far above its neck
_MIN_MEMBER_PX = 1.0  # px, a member's inscribed radius at the fitted edge, at least
_FAR_BLURS = 2.0  # the background beside a member: this many blur widths beyond its edge
_MIN_FAR_PX = 12  # pixels of that background a member needs for a level of its own


def _member_levels(labels, px, owner, rho, level, base, shift, curved, *, total, floor,
                   around=None, hollow=None):
    """Edge level per pixel of each member of a region holding several touching particles.

    Detection keeps touching particles in one region where blur and low contrast leave no
    valley deep enough for a seed of their own (PS50 beside PS100), and the region's edge
    fit is dominated by the largest member: its level, the value a blurred sphere of the
    largest member's radius has at its edge, cuts a smaller member short (its edge value is
    lower: thinner near its edge, and its outline curves more). The members are the
    regional maxima of the region's inscribed-circle radius (the distance transform) that
    stand ``_MEMBER_H_PX`` above the neck to the others; each region pixel (and each
    pixel of the band outside it) goes to the member its distance-transform watershed
    gives, and gets the level of the region's fitted amplitude and background at a disc
    of that member's radius (:func:`_disc_edge_level`), never below ``floor`` (noise). The
    largest member keeps the region's level. Only round (curved-model) regions of area
    above ``_MERGED_AREA`` times their largest inscribed disc are looked at.

    The region's fitted background is an average along its whole outline, but a group spans
    several particle widths, across which the film's texture (and what is left of uneven
    illumination) drifts by a fair share of a weak particle's contrast: a member on the
    brighter side then grows, its partner on the darker side shrinks (PS50 BF pairs: the
    outline ±1 px off, correlation 0.7 with that drift). With ``around`` = ``(signed,
    values, noise_area)`` (signed distance to the outline and the smoothed frame, NaN where
    invalid, per ``px``; the frame's noise variance times its correlation area), each member's level and floor move by how far the median of the band
    beside it (more than ``_FAR_BLURS`` blur widths beyond the fitted edge, where the edge
    has faded) stands from the members' mean (:func:`_member_drift`); a member with fewer
    than ``_MIN_FAR_PX`` such pixels keeps the region's background.

    ``hollow`` (bool per label, optional) adds hollow regions (capsules). Their members
    keep the region's level (no disc model of a shell) but for two corrections: the drift
    above, and their contrast. A shell's contrast is its own (its thickness varies from
    capsule to capsule), and at one level the stronger member's outline reaches past its
    edge while the weaker one's stops short (capsule pairs: the member grown by > 5% stood
    1.3 px out all round, its partner on its edge). With ``around``, each hollow member's
    level is scaled by its contrast relative to the other members
    (:func:`_member_contrast`). A solid member's contrast follows from its radius, which
    its disc level already takes.

    Returns ``(indices into px, levels)`` or None when no region has several members.
    """
    n = rho.size
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if hollow is not None:
        curved = curved | hollow
    todo = np.flatnonzero(curved & np.isfinite(level) &
                          (area > _MERGED_AREA * np.pi * rho ** 2) & (rho >= 3.0))
    if todo.size == 0:
        return None
    objects = ndi.find_objects(labels)
    width = labels.shape[1]
    boxes = []
    for j in todo:
        sl = objects[j]
        pad = int(np.ceil(rho[j] * 0.3 + 10.0))
        boxes.append((max(sl[0].start - pad, 0), min(sl[0].stop + pad, labels.shape[0]),
                      max(sl[1].start - pad, 0), min(sl[1].stop + pad, width)))
    found = _members(labels, todo, boxes)
    r_px, c_px = np.divmod(px, width)
    sel_at, sel_val = [], []
    # the band pixels of the regions looked at, grouped by owner (in ``px`` order): a sort
    # of those only, not of the whole band
    looked = np.zeros(n + 1, bool)
    looked[todo + 1] = True
    order = np.flatnonzero(looked[owner])
    order = order[np.argsort(owner[order], kind="stable")]
    starts = np.searchsorted(owner[order], np.arange(n + 2))
    for j, (r0, r1, c0, c1), (region, dist, markers, m) in zip(todo, boxes, found):
        lab = j + 1
        if m < 2:
            continue
        parts = segmentation.watershed(-dist, markers, mask=region)
        r_part = np.zeros(m + 1)  # each member's deepest distance (one ufunc pass)
        np.maximum.at(r_part, parts[region], dist[region])
        r_part = r_part[1:] + shift[j]
        big = float(r_part.max())
        e_big = _disc_edge_level(float(_rho_classes(big)), big, total)
        is_hollow = hollow is not None and bool(hollow[j])
        e_part = np.full(m, e_big) if is_hollow else np.array(
            [_disc_edge_level(float(_rho_classes(r)), float(r), total) for r in r_part])
        amp = (level[j] - base[j]) / max(e_big, 1e-12)
        lv = base[j] + amp * e_part
        # a member the fitted edge leaves (almost) nothing of (the edge inside the outline
        # by more than its inscribed radius: a bump of a blurred outline) is no particle of
        # its own: it keeps the region's level
        lv[(r_part >= big) | (r_part < _MIN_MEMBER_PX)] = level[j]
        # every pixel of the band: the member of its nearest region pixel
        iy, ix = ndi.distance_transform_edt(parts == 0, return_distances=False,
                                            return_indices=True)
        near = parts[iy, ix]
        at = order[starts[lab]:starts[lab + 1]]
        rr, cc = r_px[at] - r0, c_px[at] - c0
        inb = (rr >= 0) & (rr < r1 - r0) & (cc >= 0) & (cc < c1 - c0)
        at = at[inb]
        member = near[rr[inb], cc[inb]]
        drift = np.zeros(m)
        if around is not None:
            drift = _member_drift(around[0][at], around[1][at], member, m,
                                  beyond=float(shift[j]) + _FAR_BLURS * total,
                                  noise_area=around[2])
        if around is not None and is_hollow:
            # a shell's contrast is its own (its thickness varies from capsule to capsule);
            # a solid particle's follows from its radius, which the disc level has taken
            gain = _member_contrast(around[0][at], around[1][at], member, m,
                                    depth=_INNER_PX + 2.0 * total, ground=base[j] + drift,
                                    expected=lv - base[j], noise_area=around[2])
            lv = base[j] + gain * (lv - base[j])
        lv = np.maximum(lv + drift, floor[j] + drift)
        sel_at.append(at)
        sel_val.append(lv[member - 1])
    if not sel_at:
        return None
    return np.concatenate(sel_at), np.concatenate(sel_val).astype(np.float32)


def _member_drift(signed, values, member, m, *, beyond, noise_area=0.0):
    """Per member 1..m, the median of ``values`` over its band pixels further than
    ``beyond`` px outside the region (``signed`` > ``beyond``; NaN values left out), less
    the mean of those medians weighted by pixel count (the region's own background level,
    which its fit has already taken); 0 for a member with fewer than ``_MIN_FAR_PX``.

    Medians: a faint neighbour the detection missed, or another particle's blurred tail,
    takes a few pixels of the band and would pull a mean up. At low dose a band of a few
    correlation areas is noisy: each drift is shrunk by d² / (d² + u²), u² its variance
    from the noise (``noise_area``: the smoothed frame's noise variance times its
    correlation area 4πσ², over the pixel count, times (π/2) for a median), so noise alone
    does not move a member's outline."""
    far = (signed > beyond) & np.isfinite(values)
    med, cnt = np.zeros(m), np.zeros(m)
    for k in range(m):
        sel = far & (member == k + 1)
        cnt[k] = np.count_nonzero(sel)
        if cnt[k] >= _MIN_FAR_PX:
            med[k] = float(np.median(values[sel]))
    has = cnt >= _MIN_FAR_PX
    if has.sum() < 2:
        return np.zeros(m)
    d = np.where(has, med - np.average(med[has], weights=cnt[has]), 0.0)
    u2 = np.pi / 2.0 * float(noise_area) / np.maximum(cnt, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has & (d * d > 0), d * d * d / (d * d + u2), 0.0)


_INNER_PX = 0.5  # px inside the outline where a member's contrast band starts ...
_CONTRAST_CLIP = (0.67, 1.5)  # ... and the range of its contrast over the predicted one


def _member_contrast(signed, values, member, m, *, depth, ground, expected, noise_area=0.0):
    """Per member 1..m, its contrast relative to the others, as a factor on its level.

    The median of ``values`` over its pixels from ``_INNER_PX`` to ``depth`` px inside the
    outline (``signed``; NaN values left out), less its background ``ground`` (per member),
    over ``expected`` (per member: the model's contrast at its edge, which grows with its
    radius), divided by the members' mean of that ratio weighted by pixel count. Each
    ratio's departure from 1 is shrunk by d² / (d² + u²), u² its variance from the noise
    (as :func:`_member_drift`), and clipped to ``_CONTRAST_CLIP``; a member with fewer
    than ``_MIN_FAR_PX`` pixels, or a region with fewer than two such members, gets 1.
    """
    band = (signed < -_INNER_PX) & (signed >= -depth) & np.isfinite(values)
    ratio, cnt, obs = np.ones(m), np.zeros(m), np.zeros(m)
    for k in range(m):
        sel = band & (member == k + 1)
        cnt[k] = np.count_nonzero(sel)
        if cnt[k] >= _MIN_FAR_PX:
            obs[k] = float(np.median(values[sel])) - float(ground[k])
    expected = np.asarray(expected, float)
    has = (cnt >= _MIN_FAR_PX) & (obs > 0) & (expected > 0)
    if has.sum() < 2:
        return np.ones(m)
    ratio[has] = obs[has] / expected[has]
    ratio[has] /= np.average(ratio[has], weights=cnt[has])
    d = np.where(has, ratio - 1.0, 0.0)
    # the noise of a median of cnt pixels, relative to the member's contrast
    u2 = np.pi / 2.0 * float(noise_area) / np.maximum(cnt, 1.0) / np.maximum(obs, 1e-12) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        shrunk = np.where(has & (d * d > 0), d * d * d / (d * d + u2), 0.0)
    return np.clip(1.0 + shrunk, *_CONTRAST_CLIP)


def _members(labels, todo, boxes):
    """Per label ``todo[i] + 1`` in its box ``(r0, r1, c0, c1)``: the region mask, its
    distance transform, its members (h-maxima of the distance, ``_MEMBER_H_PX``, labelled
    in raster order) and their count.

    Most regions hold one particle, and the boxes are mostly padding. So each region's own
    bounding box, one zero pixel round it, is packed side by side with the others into one
    canvas, transformed at once and put back into its box; only regions whose distance has
    two separate high points (:func:`_tops`) go on to the h-maxima (``m`` is 1 for the
    others), found from their tops alone (:func:`_top_maxima`, where the grey
    reconstruction behind ``h_maxima`` sorted every pixel of them: a third of segment's
    time on a crowded frame). That is exact: a region pixel's nearest zero is in its own
    ring-bounded box, as in its padded box. Regions reaching the frame border (their padded
    box has no zero beyond them there) are transformed one by one.
    """
    shape = labels.shape
    objects = ndi.find_objects(labels)
    out = [None] * len(boxes)
    packed = []
    for i, j in enumerate(todo):
        sl = objects[j]
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == shape[0] or \
                sl[1].stop == shape[1]:
            r0, r1, c0, c1 = boxes[i]
            region = labels[r0:r1, c0:c1] == j + 1
            dist = ndi.distance_transform_edt(region)
            if ndi.label(_tops(dist), np.ones((3, 3), bool))[1] < 2:
                out[i] = (region, dist, np.zeros(region.shape, np.int32), 1)
                continue
            markers, m = ndi.label(morphology.h_maxima(dist, _MEMBER_H_PX) & region)
            out[i] = (region, dist, markers, m)
        else:
            packed.append(i)
    if not packed:
        return out
    tight = [objects[todo[i]] for i in packed]
    canvas, where = _pack([labels[sl] == todo[i] + 1 for i, sl in zip(packed, tight)])
    dist = _edt(canvas)[0]
    # the tops stand 2 px inside their region, so their window stays in their own box
    groups, _ = ndi.label(_tops(dist), np.ones((3, 3), bool))
    two = [np.unique(groups[sl]).size > 2 for sl in where]  # 0 and at least two groups
    for k, (i, sl, src) in enumerate(zip(packed, tight, where)):
        r0, r1, c0, c1 = boxes[i]
        dst = (slice(sl[0].start - r0, sl[0].stop - r0), slice(sl[1].start - c0, sl[1].stop - c0))
        region = np.zeros((r1 - r0, c1 - c0), bool)
        region[dst] = canvas[src]
        d = np.zeros(region.shape)
        d[dst] = dist[src]
        markers = np.zeros(region.shape, np.int32)
        if not two[k]:
            out[i] = (region, d, markers, 1)
            continue
        # h-maxima labelled as ``ndi.label(h_maxima(...))`` does (4-connected, raster order)
        mk, m = ndi.label(_top_maxima(dist[src], groups[src]) & canvas[src])
        markers[dst] = mk
        out[i] = (region, d, markers, m)
    return out


def _top_maxima(dist, groups):
    """``h_maxima(dist, _MEMBER_H_PX)`` (as a bool mask) of one region's distance transform,
    ``dist`` (zero outside the region), from its tops ``groups`` (the 8-connected groups of
    :func:`_tops`, labelled) alone.

    An h-maximum pixel is one that is the highest of the 8-connected component of
    ``dist > its value - h`` holding it (no path to a higher pixel dips less than h); such
    a pixel stands above h (else that component is the whole canvas, zeros included) and no
    pixel within two is higher (:func:`_tops`), so it is a top, and a group of tops (one
    plateau value) either is an h-maximum or is not. One labelling per group, on the
    region's box, where the reconstruction sorts every pixel. The threshold never ties a
    value: distances are square roots of integers, and none differs from another by
    exactly h = 1.5.
    """
    out = np.zeros(dist.shape, bool)
    eight = np.ones((3, 3), bool)
    for g in np.unique(groups)[1:]:
        at = groups == g
        first = np.argmax(at)  # raveled index of one of the group's pixels
        v = dist.flat[first]  # neighbouring tops are equal: one plateau value
        comp, _ = ndi.label(dist > v - _MEMBER_H_PX, eight)
        if dist[comp == comp.flat[first]].max() <= v:
            out |= at
    return out


def _tops(dist):
    """Pixels of ``dist`` (a distance transform) that may lie in an h-maximum of height
    ``_MEMBER_H_PX``: no pixel within two (5 × 5 window) is higher, since the path through
    the pixel between them dips at most sqrt(2) < ``_MEMBER_H_PX`` (a distance is
    1-Lipschitz), and they stand at least that high. Distinct h-maxima lie in distinct
    8-connected groups of these (neighbouring tops are equal: one plateau), so a region
    with fewer than two groups has fewer than two members."""
    return (dist == ndi.maximum_filter(dist, size=5)) & (dist >= _MEMBER_H_PX)


def _pack(masks):
    """Put each mask, one zero pixel round it, side by side into one canvas; return the
    canvas and each mask's slices in it."""
    heights = np.array([m.shape[0] + 2 for m in masks])
    widths = np.array([m.shape[1] + 2 for m in masks])
    at, shape = _shelf_pack(heights, widths)
    canvas = np.zeros(shape, bool)
    where = []
    for m, (y, x) in zip(masks, at):
        sl = (slice(y + 1, y + 1 + m.shape[0]), slice(x + 1, x + 1 + m.shape[1]))
        canvas[sl] = m
        where.append(sl)
    return canvas, where


def _shelf_pack(heights, widths, *, gap=1):
    """Top-left corners ``(row, col)`` of boxes packed in shelves (tallest first) into a
    canvas about as wide as it is tall, ``gap`` zeros apart; and the canvas shape."""
    side = max(int(np.sqrt(float(np.sum((heights + gap) * (widths + gap))))),
               int(widths.max()) + gap)
    at = np.zeros((heights.size, 2), np.int64)
    y = x = shelf = 0
    for i in np.argsort(-heights, kind="stable"):
        if x + widths[i] > side:
            y, x, shelf = y + shelf + gap, 0, 0
        at[i] = y, x
        x += int(widths[i]) + gap
        shelf = max(shelf, int(heights[i]))
    return at, (y + shelf, side)
