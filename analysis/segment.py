"""Segment nanoparticles in one electron micrograph.

The steps follow what microscopists use (autoSTEM, ANTEMA; SCIENCE.md §1–2), with one addition
that matters for weak-contrast particles: after a global threshold finds the particles, each
outline is moved to where the edge really is, the iso-intensity level of the strongest gradient
around that particle, so the size does not depend on contrast, dose or the threshold method.

1. Replace non-finite pixels; give up early (empty labels) on constant, all-NaN or tiny frames.
2. Flatten uneven illumination with a large-scale background fitted on a downsampled frame,
   excluding the particles found in a first pass (normalised convolution).
3. Detect polarity (dark particles in bright-field, bright ones in HAADF) from the skew of the
   flattened frame, unless the caller says which.
4. Denoise with a Gaussian whose width grows as the dose falls (low-dose frames).
5. Threshold (Li by default, as autoSTEM; Otsu or any callable).
6. Refine every outline to the gradient-weighted iso-level around it.
7. Fill holes, despeckle by size in nm, remove particles touching the frame border.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation

__all__ = ["segment", "flatten_background", "detect_polarity", "THRESHOLDS"]

#: Named threshold methods; ``segment(threshold=...)`` also accepts any callable
#: ``f(image) -> float``.
THRESHOLDS: dict[str, Callable[[np.ndarray], float]] = {
    "li": filters.threshold_li,
    "otsu": filters.threshold_otsu,
    "yen": filters.threshold_yen,
    "triangle": filters.threshold_triangle,
}

_MIN_SIDE_PX = 16  # below this a frame cannot hold a measurable, non-border particle


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
        Global threshold on the flattened, denoised frame (particles made positive); a callable
        takes that image and returns the threshold value.
    min_size_nm : float, optional
        Regions with an equivalent circular diameter below this are removed (despeckle), and
        holes below it are filled. Default 0.5 nm (ANTEMA).
    min_area_px : int, optional
        Regions smaller than this many pixels are removed whatever the pixel size, because they
        cannot be measured (noise specks at low magnification).
    smooth_px : float, optional
        Gaussian denoising width in pixels. Default: chosen from the frame's noise level.
    flatten : bool, optional
        Subtract a large-scale background first (uneven illumination).
    refine_edges : bool, optional
        Move each outline to the gradient-weighted iso-level around it.
    clear_border : bool, optional
        Remove particles touching the frame border (they are cropped).

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
    oriented, sign = _oriented_flat(img, valid, polarity=polarity, flatten=flatten)
    if oriented is None:
        return empty
    sigma = float(smooth_px) if smooth_px is not None else _auto_sigma(oriented)
    smooth = ndi.gaussian_filter(oriented, sigma, mode="nearest") if sigma > 0 else oriented
    level = _safe_threshold(thresh_fn, smooth[valid])
    if level is None:
        return empty
    # A histogram threshold cuts through the noise when particles are faint or absent; never
    # go below 4 standard deviations of the background (which also keeps blank frames blank).
    centre, spread = _background_stats(smooth[valid])
    level = max(level, centre + 4.0 * spread)
    mask = (smooth > level) & valid
    min_area = max(int(min_area_px), int(np.ceil(np.pi / 4 * (min_size_nm / pixel_nm) ** 2)))
    mask = _clean(mask, min_area, fill_holes=True)
    labels, n = ndi.label(mask)
    if n == 0:
        return empty
    labels = _drop_insignificant(labels, smooth, valid)
    if refine_edges:
        for _ in range(2):  # the second pass re-centres the edge band on the moved outline
            labels = _refine_edges(labels, smooth, valid, sigma=sigma, fallback=level,
                                    raw=oriented)
            labels = _relabel_clean(labels, min_area)
            if labels.max() == 0:
                return empty
    labels = _drop_insignificant(labels, smooth, valid)
    if clear_border:
        labels = segmentation.clear_border(labels)
        labels = _clear_invalid_border(labels, valid)
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32, copy=False)


# -- input checks ---------------------------------------------------------------------------

def _validate_image(image, pixel_nm, polarity):
    """Return a float32 copy with non-finite pixels filled, and the finite mask, or (None, None)
    for a frame without usable content."""
    if polarity not in ("auto", "dark", "bright"):
        raise ValueError(f"polarity {polarity!r} must be 'auto', 'dark' or 'bright'")
    try:
        pixel_nm = float(pixel_nm)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number") from None
    if not np.isfinite(pixel_nm) or pixel_nm <= 0:
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number")
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
    blocks = image[:m, :n].reshape(m // factor, factor, n // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _upsample(small, shape):
    zoom = (shape[0] / small.shape[0], shape[1] / small.shape[1])
    # Block centres sit half a block in; ndi.zoom with grid_mode maps them correctly.
    big = ndi.zoom(small, zoom, order=1, mode="nearest", grid_mode=True)
    if big.shape != tuple(shape):  # rounding: pad with edge values
        out = np.empty(shape, np.float32)
        h, w = min(shape[0], big.shape[0]), min(shape[1], big.shape[1])
        out[:h, :w] = big[:h, :w]
        out[h:, :] = out[h - 1:h, :]
        out[:, w:] = out[:, w - 1:w]
        big = out
    return big


def flatten_background(image, *, exclude=None, scale_px=None):
    """Estimate the large-scale background (uneven illumination) of a frame.

    The frame is block-averaged to about 256 pixels a side and smoothed with a wide Gaussian by
    normalised convolution, so pixels in ``exclude`` (particles) do not pull the background.

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
    factor = _downsample_factor(image.shape)
    if scale_px is None:
        scale_px = min(image.shape) / 8.0
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


def _oriented_flat(img, valid, *, polarity, flatten):
    """Flattened frame with particles positive, and the sign used (+1 bright, -1 dark)."""
    if flatten:
        bg = flatten_background(img)
    else:
        bg = np.full_like(img, np.median(img[valid]))
    flat = img - bg
    pol = detect_polarity(flat) if polarity == "auto" else polarity
    sign = 1.0 if pol == "bright" else -1.0
    oriented = sign * flat
    if flatten:
        # Refit the background without the particles: pixels standing out of the background
        # noise (estimated from the particle-free side of the histogram) are excluded. Dense
        # weak-contrast specimens (polystyrene) need a few rounds.
        for _ in range(3):
            rough = ndi.gaussian_filter(oriented, 2.0)
            centre, spread = _background_stats(rough[valid])
            part = ndi.binary_dilation(rough > centre + 2.0 * spread, iterations=3)
            bg = flatten_background(img, exclude=part | ~valid)
            oriented = sign * (img - bg)
    if sign < 0 and float(np.min(bg)) > 0 and float(np.median(img[valid])) > 0:
        # Bright-field amplitude contrast is exp(−thickness/λ): −log(I/background) is linear
        # in thickness, which the edge model assumes (matters for strongly scattering gold).
        floor = 0.5 * float(np.min(img[valid & (img > 0)])) if (img > 0).any() else 0.5
        oriented = -np.log(np.maximum(img, floor) / bg)
    oriented[~valid] = 0.0
    if not oriented.max() > oriented.min():
        return None, sign
    return oriented, sign


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
    d = np.diff(image[:, ::1], axis=1)
    d = d[:, ::2] if d.shape[1] > 2 else d  # independent pairs
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / np.sqrt(2.0))


def _auto_sigma(oriented):
    """Gaussian denoising width: 1 px at high dose, more as shot noise approaches contrast."""
    noise = _noise_sigma(oriented)
    if noise <= 0:
        return 1.0
    # Contrast scale: the particle tail of the (block-averaged) frame.
    factor = _downsample_factor(oriented.shape, target_px=512)
    small = _block_mean(oriented, factor)
    small = ndi.gaussian_filter(small, 1.0)
    p50, p995 = np.percentile(small, [50, 99.5])
    contrast = max(float(p995 - p50), 1e-12)
    snr = contrast / noise
    # After a Gaussian of width s the noise falls by 2*sqrt(pi)*s; aim for SNR ≈ 8 there.
    sigma = 8.0 / (2.0 * np.sqrt(np.pi) * snr)
    return float(np.clip(sigma, 1.0, 4.0))


# -- clean-up -------------------------------------------------------------------------------

def _clean(mask, min_area, *, fill_holes):
    if fill_holes:
        # Projected particles are simply connected; hollow capsules are measured by their
        # outer outline (the hole is measured separately as the shell).
        mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _relabel_clean(labels, min_area):
    mask = _clean(labels > 0, min_area, fill_holes=True)
    # Keep the refined labels where they exist; filled holes take their surrounding label.
    out, _ = ndi.label(mask)
    return out


def _drop_insignificant(labels, smooth, valid):
    """Remove regions whose mean signal is indistinguishable from background noise.

    A threshold always cuts something out of a blank frame; real particles stand several noise
    levels above the background on average over their area.
    """
    n = int(labels.max())
    if n == 0:
        return labels
    bg = (labels == 0) & valid
    if bg.sum() < 16:
        return labels
    bvals = smooth[bg]
    med = float(np.median(bvals))
    noise = float(1.4826 * np.median(np.abs(bvals - med)))
    if noise <= 0:
        return labels
    idx = np.arange(1, n + 1)
    means = ndi.mean(smooth, labels, idx)
    peaks = ndi.maximum(smooth, labels, idx)
    keep = np.zeros(n + 1, bool)
    keep[1:] = ((means - med) > 3.0 * noise) & ((peaks - med) > 6.0 * noise)
    return np.where(keep[labels], labels, 0)


def _clear_invalid_border(labels, valid):
    """Also drop particles that touch a non-finite (missing) area: they are cropped too."""
    if valid.all():
        return labels
    ring = ndi.binary_dilation(~valid) & (labels > 0)
    bad = np.unique(labels[ring])
    if bad.size:
        labels = np.where(np.isin(labels, bad), 0, labels)
    return labels


# -- edge refinement ------------------------------------------------------------------------

_E_STEP = 0.1    # px, resolution of the fitted edge position
_BIN_PX = 0.25   # px, bin width of the edge profile
_SIGMAS = np.array([0.5, 0.8, 1.1, 1.5, 2.0, 2.7, 3.5])  # candidate blur widths (px)


_FINE_PX = 0.1   # px, sampling of the model profiles
_MODEL_HALF_PX = 24.0


@functools.lru_cache(maxsize=512)
def _blurred_profiles(rho_q, sigma_key):
    """Blurred curved and flat edge profiles on a fine grid, for a radius quantised to
    0.25 px (cached: particles of one frame share a few radii).

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
    step = np.where(depth > 0, rho, 0.0)
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


def _fit_edge(x, v, rho, smooth_sigma):
    """Fit one particle's edge profile; return the level of the smoothed image at its edge.

    ``x``: signed distances (px) of band pixels from the current outline, ``v``: their values
    in the (unsmoothed) oriented frame. The profile averaged over the whole outline is fitted
    with blurred curved and flat edge models (shift, blur and kind by grid search, amplitude
    and background by least squares); the true edge is where the model's thickness falls to
    zero, and the returned level is the fitted model there once blurred like the image that
    is thresholded.
    """
    nb = int(np.ceil((x.max() - x.min()) / _BIN_PX)) + 1
    idx = ((x - x.min()) / _BIN_PX).astype(int)
    counts = np.bincount(idx, minlength=nb).astype(float)
    sums = np.bincount(idx, weights=v, minlength=nb)
    ok = counts > 0
    if ok.sum() < 6:
        return None
    xs = (np.arange(nb) + 0.5) * _BIN_PX + x.min()
    xs, prof, w = xs[ok], sums[ok] / counts[ok], counts[ok]
    shifts = np.arange(-3.0, 8.0 + 1e-9, _E_STEP)
    sw = w.sum()
    pp = (prof * w).sum() / sw
    dp = prof - pp
    for _ in range(2):  # the radius of curvature follows the edge found
        models = _edge_models(rho, xs, shifts, _SIGMAS)
        # Weighted least squares of prof ≈ a·m + b for every model at once.
        mp = (models * w).sum(-1) / sw
        dm = models - mp[..., None]
        var = (dm * dm * w).sum(-1)
        cov = (dm * dp * w).sum(-1)
        a = cov / np.maximum(var, 1e-12)
        resid = ((dp - a[..., None] * dm) ** 2 * w).sum(-1)
        resid[a <= 0] = np.inf
        kind, js, je = np.unravel_index(int(np.argmin(resid)), resid.shape)
        if not np.isfinite(resid[kind, js, je]):
            return None
        new_rho = max(rho + shifts[je], 1.0)
        if abs(new_rho - rho) < 0.25:
            break
        rho, xs = new_rho, xs - shifts[je]  # re-centre on the edge just found
        shifts = np.arange(-3.0, 3.0 + 1e-9, _E_STEP)
    b = pp - a[kind, js, je] * mp[kind, js, je]
    # Level at the true edge after the extra smoothing applied to the thresholded image.
    total = float(np.hypot(_SIGMAS[js], smooth_sigma))
    edge = _edge_models(rho, np.array([0.0]), np.array([0.0]), np.array([round(total, 2)]))
    return float(a[kind, js, je] * edge[kind, 0, 0, 0] + b)


def _refine_edges(labels, smooth, valid, *, sigma, fallback, raw=None):
    """Re-threshold each particle at the intensity its fitted edge model has at the true edge.

    A plain threshold, or the half-contrast level, sits inside the edge of a sphere or rod,
    whose projected thickness falls to zero like sqrt(depth); by how much depends on contrast,
    blur and size. Fitting the edge profile averaged along the particle's whole outline (so
    shot noise averages out) with blurred curved and flat edge models locates the edge to a
    fraction of a pixel whatever the dose or contrast.
    """
    inside = labels > 0
    if raw is None:
        raw = smooth
    band_px = 3.0 + 3.0 * max(sigma, 1.0)
    dist_out, (iy, ix) = ndi.distance_transform_edt(~inside, return_indices=True)
    owner = labels[iy, ix]  # nearest particle of every pixel (its territory)
    dist_in = ndi.distance_transform_edt(inside)
    n = int(labels.max())
    rho = ndi.maximum(dist_in, labels, np.arange(1, n + 1))
    signed = np.where(inside, 0.5 - dist_in, dist_out - 0.5)
    band = (np.abs(signed) <= band_px) & valid
    # the band inside a particle is no deeper than its own radius
    lab_b = owner[band]
    x_b = signed[band]
    v_b = raw[band]
    keep = x_b >= -np.asarray(np.concatenate([[0.0], rho]))[lab_b]
    lab_b, x_b, v_b = lab_b[keep], x_b[keep], v_b[keep]
    order = np.argsort(lab_b, kind="stable")
    lab_b, x_b, v_b = lab_b[order], x_b[order], v_b[order]
    bounds = np.searchsorted(lab_b, np.arange(1, n + 2))
    level = np.full(n + 1, fallback, dtype=np.float64)
    for i in range(1, n + 1):
        lo, hi = bounds[i - 1], bounds[i]
        if hi - lo < 12:
            continue
        lev = _fit_edge(x_b[lo:hi], v_b[lo:hi], max(float(rho[i - 1]), 1.0), sigma)
        if lev is not None:
            level[i] = lev
    level[0] = np.inf
    territory = owner * (dist_out <= 2.0 * band_px)
    new = (territory > 0) & (smooth > level[territory]) & valid
    # Keep, per territory, only the pieces overlapping the original particle.
    pieces, _ = ndi.label(new)
    hit = np.unique(pieces[inside & new])
    keep = np.zeros(int(pieces.max()) + 1, bool)
    keep[hit] = True
    keep[0] = False
    return np.where(keep[pieces], territory, 0).astype(np.int32)
