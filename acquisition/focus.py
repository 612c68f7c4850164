"""Focus measurement: autocorrelation sharpness, a Gaussian fit of sharpness vs defocus,
and a plane model that predicts focus from neighbouring tiles.

Pure functions of arrays; the autofocus *plan* that drives the microscope is in
:mod:`.plans`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


def _validate_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 16:
        raise ValueError(f"image must be 2-D and at least 16 px wide, got shape {image.shape}")
    return image


def autocorrelation(image, *, window: bool = True) -> np.ndarray:
    """Normalised autocorrelation of an image, zero lag at the centre.

    Parameters
    ----------
    image : array_like, 2-D
        The image; not modified.
    window : bool, optional
        Multiply by a Hann window first, so the wrap-around jump at the image borders does
        not count as a sharp edge.

    Returns
    -------
    ndarray of float64
        ``ac[dy, dx]`` shifted so that zero lag is at ``(rows // 2, cols // 2)``; divided by
        the number of pixels, so ``ac`` at zero lag is the (windowed) variance.
    """
    a = _validate_image(image).astype(np.float64)
    a = a - a.mean()
    if window:
        a = a * np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
        a = a - a.mean()
    spectrum = np.fft.rfft2(a)
    ac = np.fft.irfft2(spectrum * spectrum.conj(), s=a.shape) / a.size
    return np.fft.fftshift(ac)


def sharpness(image, *, radius_px: float = 4.0, window: bool = True) -> float:
    """Focus sharpness from the height of the autocorrelation peak over its surroundings.

    See :func:`sharpness_and_noise`, which also estimates the value's noise.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> abs(sharpness(rng.normal(size=(128, 128)))) < 0.05
    True
    """
    return sharpness_and_noise(image, radius_px=radius_px, window=window)[0]


def sharpness_and_noise(image, *, radius_px: float = 4.0,
                        window: bool = True) -> tuple[float, float]:
    """Focus sharpness from the height of the autocorrelation peak over its surroundings.

    White (shot) noise adds only to the zero-lag value of the autocorrelation, so that
    value is replaced by a linear extrapolation from lags 1 and 2 (the noise-free peak).
    The sharpness is that peak minus the mean autocorrelation on a ring at ``radius_px``,
    divided by the image variance: the fraction of the variance at length scales below
    ``radius_px``. Blur widens the autocorrelation and lowers it; noise alone gives ~0.

    Parameters
    ----------
    image : array_like, 2-D
    radius_px : float, optional
        Ring radius in pixels; a few pixels, smaller than the particles.
    window : bool, optional
        See :func:`autocorrelation`.

    Returns
    -------
    value : float
        Dimensionless, ~0 for noise or a blank image, larger when sharper.
    noise : float
        Estimated standard deviation of ``value`` from shot noise alone (another exposure of
        the same area at the same focus would differ by about this much). The white-noise
        variance ``v`` is the zero-lag excess ``ac0 - peak``; the extrapolated peak carries
        noise x noise products of about ``v * sqrt(5/2) / sqrt(N_eff)`` and the cross terms
        of noise with the fine structure about ``sqrt(2 v (peak - ring)) / sqrt(N_eff)``.
        This is what a fit of sharpness vs defocus weighs its points by and what tells a real
        change of sharpness from scatter, on any detector and dose.

    References
    ----------
    Slater et al., Microsc. Microanal. 26 (2020), "autoSTEM" (autocorrelation sharpness).
    """
    ac = autocorrelation(image, window=window)
    cy, cx = ac.shape[0] // 2, ac.shape[1] // 2
    ac0 = ac[cy, cx]
    floor = noise_floor(ac.shape)
    if not ac0 > 0:  # constant image: no structure at all
        return 0.0, floor
    lag1 = (ac[cy - 1, cx] + ac[cy + 1, cx] + ac[cy, cx - 1] + ac[cy, cx + 1]) / 4.0
    lag2 = (ac[cy - 2, cx] + ac[cy + 2, cx] + ac[cy, cx - 2] + ac[cy, cx + 2]) / 4.0
    peak = max(2.0 * lag1 - lag2, lag1)
    r = max(float(radius_px), 2.0)
    k = int(math.ceil(r + 1))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    ring = np.abs(np.hypot(yy, xx) - r) < 0.5
    ring_mean = ac[cy - k:cy + k + 1, cx - k:cx + k + 1][ring].mean()
    value = float((peak - ring_mean) / ac0)
    noise_fraction = min(max((ac0 - peak) / ac0, 0.0), 1.0)
    noise = floor * math.sqrt(2.5 * noise_fraction ** 2 + 2.0 * noise_fraction * max(value, 0.0))
    return value, float(max(noise, 0.05 * floor))


def band_sharpness(image, *, band: tuple[float, float] = (0.05, 0.15),
                   noise_band: float = 0.42, window: bool = True) -> tuple[float, float]:
    """Focus sharpness as the image's power in a band of length scales, white noise removed.

    The power spectrum is the Fourier transform of the autocorrelation (Wiener-Khinchin), so
    this is the autocorrelation measure of :func:`sharpness` restricted to the length scales
    that defocus blurs: a Gaussian blur of ``s`` px keeps ``exp(-2 pi² s² f²)`` of the power
    at ``f`` cycles/px, so the band 0.05-0.15 cycles/px (periods 7-20 px) loses most of its
    power between 1 and 3 px of blur, the range that tells focus from 0.1-0.3 µm off. Shot
    and detector noise are white: their level is the median power beyond ``noise_band``
    cycles/px (where a focused image has little structure) and is subtracted. Averaging
    tens of thousands of Fourier modes makes the estimate several times less noisy than the
    few lags of :func:`sharpness`, which matters for weak-contrast specimens (polystyrene,
    silica in bright field) whose whole defocus signal is a few percent of the noise.

    Parameters
    ----------
    image : array_like, 2-D
    band : (float, float)
        Spatial frequencies in cycles per pixel.
    noise_band : float
        Frequencies above this (cycles/px) measure the white-noise level.
    window : bool
        Hann window first (no wrap-around edges).

    Returns
    -------
    value : float
        Band power over the squared mean intensity (so dose and beam current cancel), times
        1e6; ~0 for noise or a blank image.
    noise : float
        Estimated standard deviation of ``value`` (the band's total power over the square
        root of the number of independent Fourier modes in it; a Hann window correlates
        neighbouring modes, about 3 per independent one).

    References
    ----------
    Groen, Young & Ligthart, Cytometry 6 (1985) (band-pass focus functions); Vollath,
    J. Microsc. 147 (1987) (autocorrelation focus functions).
    """
    a = _validate_image(image).astype(np.float64)
    mean = float(a.mean())
    if not mean > 0:
        return 0.0, 1.0
    a = a - mean
    gain = 1.0
    if window:
        w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
        a = a * w
        a = a - a.mean()
        gain = float(np.mean(w ** 2))
    power = np.abs(np.fft.rfft2(a)) ** 2 / (a.size * gain)
    f = np.hypot(np.fft.fftfreq(a.shape[0])[:, None], np.fft.rfftfreq(a.shape[1])[None, :])
    in_band = power[(f >= band[0]) & (f < band[1])]
    high = power[f > noise_band]
    if in_band.size < 8 or high.size < 8:
        raise ValueError(f"image of shape {a.shape} is too small for band {band}")
    # the median of exponentially distributed powers is ln 2 times their mean
    noise_level = float(np.median(high)) / math.log(2.0)
    scale = 1e6 / mean ** 2
    value = (float(in_band.mean()) - noise_level) * scale
    sd = float(in_band.mean()) * math.sqrt(3.0 / in_band.size) * scale
    return value, sd


@functools.lru_cache(maxsize=16)
def _band_kernel_sums(sigmas_px: tuple[float, float]) -> tuple[float, float, float, float]:
    """For white noise through the difference of Gaussians ``sigmas_px`` and through the
    high-pass ``1 - G(1 px)``: the two kernels' sums of squares (noise variance gains), and
    the band kernel's normalised autocorrelation summed squared and absolute (how many
    neighbouring filtered pixels one noise pixel correlates)."""
    from scipy import ndimage as ndi

    half = int(math.ceil(4 * max(sigmas_px))) + 2
    delta = np.zeros((2 * half + 1, 2 * half + 1))
    delta[half, half] = 1.0
    band = (ndi.gaussian_filter(delta, sigmas_px[0], mode="constant")
            - ndi.gaussian_filter(delta, sigmas_px[1], mode="constant"))
    high = delta - ndi.gaussian_filter(delta, 1.0, mode="constant")
    band_gain = float(np.sum(band ** 2))
    rho = ndi.correlate(band, band, mode="constant") / band_gain
    return band_gain, float(np.sum(high ** 2)), float(np.sum(rho ** 2)), \
        float(np.sum(np.abs(rho)))


def local_band_sharpness(image, mask, *, sigmas_px: tuple[float, float] = (1.0, 3.0)
                         ) -> tuple[float, float]:
    """Focus sharpness measured where the particles are: band-pass energy inside ``mask``.

    :func:`band_sharpness` averages over the whole frame, so on a sparse frame of a weak
    specimen the few particles' signal drowns in the shot noise of the empty film around
    them: the noise of a band-power estimate grows with the area measured, the particles'
    signal does not. Here the frame is band-passed (a difference of Gaussians of
    ``sigmas_px``, the length scales defocus blurs, as :func:`band_sharpness`'s band) and
    the mean squared result is taken inside ``mask`` (the particles and a margin for blur),
    less the white noise's share, which is known from the noise variance (the median
    absolute deviation of a 1 px high-pass of the frame) and the filter's gain. A mask of a
    twentieth of the frame measures the same signal with about 4-5 times the SNR.

    Parameters
    ----------
    image : array_like, 2-D
    mask : array_like of bool, same shape
        Where to measure (at least 64 pixels); fixed for all images of one focus run, so
        their values compare.
    sigmas_px : (float, float)
        Inner and outer Gaussian widths of the band-pass, in pixels.

    Returns
    -------
    value : float
        Band energy over the squared mean intensity of the frame (dose cancels), times
        1e6; ~0 for noise.
    noise : float
        Estimated standard deviation of ``value``: ``2 v²`` (noise x noise) and ``4 v s``
        (noise x signal) per filtered pixel, ``v`` the filtered noise variance and ``s`` the
        signal energy, over the number of independent filtered pixels in the mask.
    """
    from scipy import ndimage as ndi

    a = _validate_image(image).astype(np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != a.shape:
        raise ValueError(f"mask (shape {mask.shape}) must have the same shape as image "
                         f"(shape {a.shape})")
    n = int(mask.sum())
    if n < 64:
        raise ValueError(f"mask must hold at least 64 pixels, got {n}")
    mean = float(a.mean())
    if not mean > 0:
        return 0.0, 1.0
    sigmas = (float(sigmas_px[0]), float(sigmas_px[1]))
    band_gain, high_gain, rho2, rho1 = _band_kernel_sums(sigmas)
    band = (ndi.gaussian_filter(a, sigmas[0], mode="reflect")
            - ndi.gaussian_filter(a, sigmas[1], mode="reflect"))
    high = a - ndi.gaussian_filter(a, 1.0, mode="reflect")
    # white-noise variance per pixel where it is measured (shot noise grows with the counts:
    # over bright HAADF particles it is larger than over the film): the high-pass holds
    # little else, and a robust spread leaves the particles' edges out
    inside = high[mask]
    v = (1.4826 * float(np.median(np.abs(inside - np.median(inside))))) ** 2 / high_gain
    v_band = v * band_gain
    energy = float(np.mean(band[mask] ** 2))
    signal = max(energy - v_band, 0.0)
    variance = (2.0 * v_band ** 2 + 4.0 * v_band * signal) * rho2 / n
    scale = 1e6 / mean ** 2
    return (energy - v_band) * scale, max(math.sqrt(variance), 1e-12) * scale


def noise_floor(shape: tuple[int, int]) -> float:
    """Typical sharpness spread of a structureless (pure noise) image of this shape.

    The autocorrelation at a non-zero lag of ``N`` pixels of white noise scatters by about
    ``1/sqrt(N)`` of the variance; the Hann window leaves about ``N/4`` effective pixels.
    """
    n_eff = max(shape[0] * shape[1] / 4.0, 1.0)
    return 1.0 / math.sqrt(n_eff)


@dataclass(frozen=True)
class GaussianFit:
    """Result of :func:`fit_gaussian`: ``offset + amplitude * exp(-(x-center)²/(2 sigma²))``.

    ``ok`` is False when the fit failed or is not a peak; ``reason`` says why.
    """

    center: float
    sigma: float
    amplitude: float
    offset: float
    ok: bool
    reason: str = ""


def gaussian(x, center, sigma, amplitude, offset):
    """A Gaussian peak on a constant offset (the model of :func:`fit_gaussian`)."""
    x = np.asarray(x, dtype=np.float64)
    return offset + amplitude * np.exp(-0.5 * ((x - center) / sigma) ** 2)


def fit_gaussian(x, y) -> GaussianFit:
    """Fit a Gaussian peak plus offset to sharpness ``y`` vs defocus ``x``.

    Parameters
    ----------
    x, y : array_like, 1-D, same length >= 4
        Defocus values (any order) and their sharpness.

    Returns
    -------
    GaussianFit
        ``ok`` is False (with a ``reason``) when ``curve_fit`` fails, the amplitude is not
        positive, or the values are all equal. The centre may lie outside ``x``; callers
        decide whether to trust a centre at or beyond the sweep edge.
    """
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 4:
        raise ValueError(f"x (shape {x.shape}) and y (shape {y.shape}) must be 1-D, equal "
                         "length >= 4")
    order = np.argsort(x)
    x, y = x[order], y[order]
    span = float(x[-1] - x[0])
    step = span / (x.size - 1)
    lo, hi = float(y.min()), float(y.max())
    i_max = int(np.argmax(y))
    if not np.all(np.isfinite(y)) or hi - lo <= 0 or span <= 0:
        return GaussianFit(float(x[i_max]), math.nan, 0.0, lo, False, "flat or invalid values")
    # Start from the sampled maximum and half-maximum width.
    above = x[y >= lo + 0.5 * (hi - lo)]
    sigma0 = max(float(above[-1] - above[0]) / 2.355, step / 2)
    p0 = (float(x[i_max]), sigma0, hi - lo, lo)
    bounds = ([x[0] - 2 * span, step / 8, 0.0, lo - (hi - lo)],
              [x[-1] + 2 * span, 20 * span, 10 * (hi - lo) + 1e-12, hi])
    try:
        popt, _ = curve_fit(gaussian, x, y, p0=p0, bounds=bounds, maxfev=4000)
    except (RuntimeError, ValueError) as exc:
        return GaussianFit(float(x[i_max]), math.nan, 0.0, lo, False, f"fit failed: {exc}")
    center, sigma, amplitude, offset = (float(v) for v in popt)
    if not amplitude > 0:
        return GaussianFit(center, sigma, amplitude, offset, False, "no peak")
    return GaussianFit(center, sigma, amplitude, offset, True)


@dataclass(frozen=True)
class FocusCurveFit:
    """Result of :func:`fit_focus_curve`: ``offset + amplitude * (1 + ((x - center) /
    width)²) ** -power``.

    ``center_sd`` is the standard error of the centre (from the points' noise); ``ok`` is
    False when the fit failed or a sanity check did not pass, and ``reason`` then names the
    check: ``"flat"`` (no change of sharpness above the noise in the sampled range),
    ``"edge"`` (the peak is not bracketed: centre outside the sampled range or one flank
    not seen), ``"under-sampled"`` (peak narrower than the steps), or ``"fit failed: ..."``.
    """

    center: float
    center_sd: float
    width: float
    power: float
    amplitude: float
    offset: float
    ok: bool
    reason: str = ""
    significance: float = 0.0


def focus_curve(x, center, width, amplitude, offset, power):
    """Sharpness vs defocus as a blur-width power law (the model of :func:`fit_focus_curve`).

    The blur of a defocused image adds in quadrature to the instrument's own resolution
    (probe size or detector and lens spread): ``s(x)² = s0² + (α (x - center))²`` for a
    convergence (or illumination) semi-angle ``α``, on real microscopes as in the simulator.
    A specimen whose fine-scale power falls off as a power of the spatial frequency (most
    textures and particle edges do) loses sharpness as a power of the blur width, so
    ``sharpness = offset + amplitude * (s0 / s)^(2 power) = offset + amplitude *
    (1 + ((x - center) / width)²)^-power`` with ``width = s0 / α``: a symmetric peak whose
    flanks fall off as a power, not a Gaussian's. ``power`` large approaches a Gaussian;
    ``power = 1`` is a Lorentzian. A Gaussian fitted to such a flat-topped, long-tailed curve
    puts its centre wherever the samples are lopsided, which is what the fit of the flanks
    must not do.
    """
    x = np.asarray(x, dtype=np.float64)
    return offset + amplitude * (1.0 + ((x - center) / width) ** 2) ** (-power)


def fit_focus_curve(x, y, sd, *, width=None, power=None) -> FocusCurveFit:
    """Fit :func:`focus_curve` to sharpness ``y`` (noise ``sd``) vs defocus ``x``, and check it.

    The centre comes mostly from the flanks, where sharpness changes fastest with defocus;
    the top of the peak is flat within a few depths of field and says little. The fit is
    weighted by the points' noise, and its centre's standard error says whether more images
    are needed.

    Parameters
    ----------
    x, y, sd : array_like, 1-D, same length
        Defocus values (any order, repeats allowed), their sharpness and its noise (standard
        deviations, > 0).
    width, power : float, optional
        Fix the peak's shape (known from an earlier sweep nearby: it depends on the optics
        and the specimen's texture, not on where focus is): then three points suffice.

    Returns
    -------
    FocusCurveFit
        Sanity checks, in order: the peak must explain the points better than a flat line
        by a chi² of at least 20 (``significance`` >= 4.5: curvature significant against
        the noise, else ``flat``; with ``width`` and ``power`` fixed, every point above 5
        times its noise also passes); the
        centre must lie inside the sampled range with sharpness falling by at least 2 standard
        errors towards both ends (``edge``: otherwise the centre is extrapolated from one
        flank); a free width must be at least a third of the sampling step
        (``under-sampled``).
    """
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sd = np.broadcast_to(np.asarray(sd, dtype=np.float64), y.shape)
    fixed = width is not None and power is not None
    need = 3 if fixed else 5
    if x.shape != y.shape or x.ndim != 1 or x.size < need:
        raise ValueError(f"x (shape {x.shape}) and y (shape {y.shape}) must be 1-D, equal "
                         f"length >= {need}")
    if not np.all(sd > 0):
        raise ValueError("sd must be > 0")
    order = np.argsort(x)
    x, y, sd = x[order], y[order], sd[order]
    x0, x1 = float(x[0]), float(x[-1])
    span = x1 - x0
    nan = math.nan
    if not (np.all(np.isfinite(y)) and span > 0):
        return FocusCurveFit(nan, nan, nan, nan, 0.0, nan, False, "fit failed: invalid values")
    step = span / max(len(np.unique(x)) - 1, 1)
    lo, hi = float(y.min()), float(y.max())
    amp = max(hi - lo, float(sd.min()))
    i_max = int(np.argmax(y))
    # start from the sharpest sample and the half-maximum width of what was seen
    above = x[y >= lo + 0.5 * (hi - lo)]
    w0 = max(float(above[-1] - above[0]) / 2, step / 2)
    if fixed:
        def model(xx, c, a, b):
            return focus_curve(xx, c, width, a, b, power)
        p0 = (float(x[i_max]), amp, lo)
        bounds = ([x0 - span, 0.0, lo - 10 * amp], [x1 + span, 20 * amp, hi + amp])
    else:
        def model(xx, c, w, a, b, p):
            return focus_curve(xx, c, w, a, b, p)
        p0 = (float(x[i_max]), min(max(w0, step / 3), 2 * span), amp, lo, 1.0)
        bounds = ([x0 - span, step / 8, 0.0, lo - 10 * amp, 0.3],
                  [x1 + span, 10 * span, 20 * amp, hi + amp, 6.0])
    try:
        popt, pcov = curve_fit(model, x, y, p0=p0, sigma=sd, absolute_sigma=True,
                               bounds=bounds, maxfev=5000)
    except (RuntimeError, ValueError) as exc:
        return FocusCurveFit(float(x[i_max]), nan, nan, nan, 0.0, nan, False,
                             f"fit failed: {exc}")
    if fixed:
        c, a, b = (float(v) for v in popt)
        w, p = float(width), float(power)
    else:
        c, w, a, b, p = (float(v) for v in popt)
    residual = (y - model(x, *popt)) / sd
    dof = x.size - len(popt)
    # points scattering more than their estimated noise (texture the model misses, drift)
    # widen the centre's error accordingly
    scale = math.sqrt(max(float(residual @ residual) / dof, 1.0)) if dof > 0 else 1.0
    c_sd = float(math.sqrt(max(pcov[0, 0], 0.0))) * scale if np.all(np.isfinite(pcov)) else nan
    # significance: how much better the peak explains the points than a flat line, in
    # standard deviations (sqrt of the chi² gained); the peak's parameters trade off
    # against each other, so its fitted height alone is no test. A flat curve is an empty
    # area or focus far outside the range.
    w_pts = 1.0 / sd ** 2
    flat = (y - float(np.sum(w_pts * y) / np.sum(w_pts))) / sd
    gain = float(flat @ flat - residual @ residual) / scale ** 2
    significance = math.sqrt(max(gain, 0.0))
    fit = dict(center=c, center_sd=c_sd, width=w, power=p, amplitude=a, offset=b,
               significance=significance)
    # with the shape known, images that all show structure well above their noise carry
    # the centre in how the flanks differ, even where the curvature over them is slight
    # (images close to the top); the centre's standard error then says how well
    structured = fixed and bool(np.all(y > 5.0 * sd))
    if significance < 4.5 and not structured:
        return FocusCurveFit(**fit, ok=False, reason="flat")
    # the peak must be bracketed: the centre inside the range and sharpness seen falling on
    # both sides of it (else its position is extrapolated from one flank)
    noise = float(np.median(sd)) * scale
    top = float(model(np.array([c]), *popt)[0])
    drops = (top - float(model(np.array([x0]), *popt)[0]),
             top - float(model(np.array([x1]), *popt)[0]))
    if not x0 <= c <= x1 or min(drops) < 2.0 * noise:
        return FocusCurveFit(**fit, ok=False, reason="edge")
    # the peak must be resolved where it is: the samples bracketing the centre no farther
    # apart than 3 widths (a uniform sweep: its step; refining images added near the peak
    # resolve it however coarse the first sweep was)
    ux = np.unique(x)
    below, above_c = ux[ux <= c], ux[ux >= c]
    gap = float(above_c[0] - below[-1]) if below.size and above_c.size else step
    if not fixed and w < gap / 3:
        return FocusCurveFit(**fit, ok=False, reason="under-sampled")
    if not math.isfinite(c_sd):
        return FocusCurveFit(**fit, ok=False, reason="fit failed: no covariance")
    return FocusCurveFit(**fit, ok=True)


def _curve_jacobian(x, params) -> np.ndarray:
    """Derivatives of :func:`focus_curve` at ``x`` by its parameters ``(center, width,
    amplitude, offset, power)`` (central differences, steps relative to each parameter)."""
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(params, dtype=np.float64)
    steps = np.array([1e-4 * p[1], 1e-4 * p[1], 1e-4 * max(abs(p[2]), 1e-12),
                      1e-4 * max(abs(p[2]), 1e-12), 1e-4 * p[4]])
    cols = []
    for k, h in enumerate(steps):
        up, down = p.copy(), p.copy()
        up[k] += h
        down[k] -= h
        cols.append((focus_curve(x, *up[:4], up[4]) - focus_curve(x, *down[:4], down[4]))
                    / (2 * h))
    return np.column_stack(cols)


def next_focus_image(fit: FocusCurveFit, x, sd, *, candidates=None,
                     shape_known: bool = False) -> tuple[float, float]:
    """Where one more image says most about the centre of a fitted focus curve.

    Sequential c-optimal design: for each candidate defocus the centre's variance after
    adding one image there is predicted from the fit's Fisher information (the curve's
    derivatives by its five parameters at every image so far, each weighed by its noise)
    plus the candidate's row, and the candidate with the smallest variance wins. This puts
    images on the steepest flanks and on whichever side the samples so far leave the centre
    least pinned (a lone flank image is paired on the other side, since the height and
    width then cancel), and says in advance what the image will bring, so a focus run can
    stop as soon as its centre is known well enough, one image at a time rather than in
    fixed pairs.

    Parameters
    ----------
    fit : FocusCurveFit
        A fit of :func:`focus_curve` to ``x`` (by :func:`fit_focus_curve`).
    x, sd : array_like, 1-D
        Defocus of every image so far and its sharpness noise.
    candidates : array_like, optional
        Defocus values to choose from; default 41 values over the centre ± 4 flank
        distances (:func:`focus_curve`'s steepest points).
    shape_known : bool
        The fit had ``width`` and ``power`` fixed (:func:`fit_focus_curve`'s three-parameter
        form): only centre, amplitude and offset are uncertain.

    Returns
    -------
    defocus : float
        The best candidate.
    center_sd : float
        The centre's standard error predicted with that image added (same scale as
        ``fit.center_sd``).
    """
    x = np.asarray(x, dtype=np.float64)
    sd = np.broadcast_to(np.asarray(sd, dtype=np.float64), x.shape)
    params = (fit.center, fit.width, fit.amplitude, fit.offset, fit.power)
    if not all(math.isfinite(v) for v in params) or not fit.width > 0:
        raise ValueError(f"fit has no usable shape: {fit}")
    flank = fit.width / math.sqrt(2.0 * fit.power + 1.0)
    if candidates is None:
        candidates = fit.center + flank * np.linspace(-4.0, 4.0, 41)
    candidates = np.asarray(candidates, dtype=np.float64).ravel()
    free = [0, 2, 3] if shape_known else [0, 1, 2, 3, 4]
    j = _curve_jacobian(x, params)[:, free]
    info = j.T @ (j / sd[:, None] ** 2)
    # the new image's noise: that of the image nearest to it in sharpness (noise grows
    # with the signal measured)
    y_seen = focus_curve(x, *params[:4], params[4])
    y_new = focus_curve(candidates, *params[:4], params[4])
    sd_new = sd[np.argmin(np.abs(y_seen[None, :] - y_new[:, None]), axis=1)]
    j_new = _curve_jacobian(candidates, params)[:, free]
    # inflate as the fit did (points scattering beyond their noise)
    base = math.sqrt(max(float(np.linalg.pinv(info)[0, 0]), 1e-300))
    scale = fit.center_sd / base if math.isfinite(fit.center_sd) and fit.center_sd > 0 else 1.0
    variance = np.array([np.linalg.pinv(info + np.outer(r, r) / s ** 2)[0, 0]
                         for r, s in zip(j_new, sd_new)])
    best = int(np.argmin(variance))
    return float(candidates[best]), float(math.sqrt(max(variance[best], 0.0)) * max(scale, 1.0))


def parabola_vertex(x, y) -> float | None:
    """Vertex of the parabola through three points, or None if it opens upward.

    Used on ``log(sharpness)`` for a three-image focus check: a Gaussian is a parabola in
    the log, so three points fix its centre exactly.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size != 3 or y.size != 3:
        raise ValueError(f"need exactly 3 points, got {x.size} and {y.size}")
    a, b, _ = np.polyfit(x, y, 2)
    if not a < 0:
        return None
    return float(-b / (2 * a))


class FocusModel:
    """Best focus measured at stage positions, and a prediction for a new position.

    With three or more non-collinear points a least-squares plane ``f = a + b x + c y`` is
    used (a tilted, flat specimen), refitted without outliers from five points on; with
    fewer, or when the plane is steeper than ``max_plane_slope`` (µm of focus per µm of
    stage, default 0.1: no specimen is tilted that much; such a plane extrapolates
    measurements that are too close together or one that is wrong), the nearest
    measurement.
    """

    def __init__(self, *, max_plane_slope: float = 0.1) -> None:
        # a plane steeper than this (0.1 µm/µm: a 6° specimen tilt) is not a specimen but
        # measurements too close together, or one wrong, extrapolated: use the nearest
        if not max_plane_slope > 0:
            raise ValueError(f"max_plane_slope must be > 0, got {max_plane_slope}")
        self.max_plane_slope = float(max_plane_slope)
        self._points: list[tuple[float, float, float]] = []
        self._sds: list[float] = []  # each measurement's standard error (nan: unknown)

    def __len__(self) -> int:
        return len(self._points)

    @property
    def points(self) -> list[tuple[float, float, float]]:
        """``(x_um, y_um, focus_um)`` measured so far."""
        return list(self._points)

    def add(self, x_um: float, y_um: float, focus_um: float, *,
            sd_um: float | None = None) -> None:
        """Record a measured best focus at a stage position, with its standard error
        ``sd_um`` when known (a fitted focus curve's centre error); an unknown one is taken
        as the ``measurement_sd_um`` of :meth:`uncertainty_um`."""
        self._points.append((float(x_um), float(y_um), float(focus_um)))
        sd = math.nan if sd_um is None else float(sd_um)
        if sd < 0:
            raise ValueError(f"sd_um must be >= 0, got {sd_um}")
        self._sds.append(sd)

    def distance(self, x_um: float, y_um: float) -> float:
        """Distance in µm to the nearest measurement (infinite before the first)."""
        if not self._points:
            return math.inf
        p = np.asarray(self._points)
        return float(np.min(np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)))

    def _plane(self, points) -> np.ndarray | None:
        p = np.asarray(points, dtype=np.float64)
        a = np.column_stack([np.ones(len(p)), p[:, 0], p[:, 1]])
        coef, _, rank, _ = np.linalg.lstsq(a, p[:, 2], rcond=None)
        if rank != 3 or math.hypot(coef[1], coef[2]) > self.max_plane_slope:
            return None
        return coef

    def _plane_points(self) -> np.ndarray | None:
        """The recent points a plane is fitted to, or None when they do not fix a plane."""
        recent = np.asarray(self._points[-12:], dtype=np.float64)
        if len(recent) < 3:
            return None
        xy = recent[:, :2] - recent[:, :2].mean(axis=0)
        if np.linalg.svd(xy, compute_uv=False)[-1] <= 1e-9:
            return None  # collinear: the slope across the line is unknown
        return recent

    def uncertainty_um(self, x_um: float, y_um: float, *, measurement_sd_um: float,
                       max_slope: float) -> float:
        """How far the prediction at ``(x_um, y_um)`` may be from the truth (about 1 sd).

        Before a plane is fixed (fewer than three non-collinear points) the nearest
        measurement is used, so its error plus the steepest expected focus slope times the
        distance; with a plane, the measurement error scaled by the fit's leverage at the
        point (large when extrapolating beyond points that are close together).

        Parameters
        ----------
        x_um, y_um : float
        measurement_sd_um : float
            Scatter of a focus measurement added without its own ``sd_um``.
        max_slope : float
            Steepest focus change per stage distance (µm/µm) a specimen is assumed to have.

        Returns
        -------
        float
            Infinite before the first measurement.
        """
        if not self._points:
            return math.inf
        sds = np.asarray(self._sds, dtype=np.float64)
        sds = np.where(np.isfinite(sds), sds, measurement_sd_um)
        recent = self._plane_points()
        if recent is None or self._plane(recent) is None:
            p = np.asarray(self._points)
            nearest = int(np.argmin(np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)))
            return float(sds[nearest]) + max_slope * self.distance(x_um, y_um)
        # weighted least-squares variance of the plane at the point (each measurement by
        # its own error), plus one typical measurement's scatter (what no plane explains)
        w = 1.0 / np.maximum(sds[-len(recent):], 1e-6) ** 2
        a = np.column_stack([np.ones(len(recent)), recent[:, 0], recent[:, 1]])
        q = np.array([1.0, x_um, y_um])
        variance = float(q @ np.linalg.pinv(a.T @ (a * w[:, None])) @ q)
        typical = float(np.median(sds[-len(recent):]))
        return math.sqrt(max(variance, 0.0) + typical ** 2)

    def predict(self, x_um: float, y_um: float) -> float | None:
        """Predicted best focus at ``(x_um, y_um)``, or None before any measurement.

        Uses the most recent 12 points, so that a slowly bending specimen is followed.
        """
        if not self._points:
            return None
        recent = self._points[-12:]
        if len(recent) >= 3:
            coef = self._plane(recent)
            if coef is not None and len(recent) >= 5:
                # One noisy measurement must not tilt the plane: refit without outliers.
                p = np.asarray(recent)
                residual = p[:, 2] - (coef[0] + coef[1] * p[:, 0] + coef[2] * p[:, 1])
                spread = max(3 * 1.4826 * np.median(np.abs(residual)), 0.01)
                keep = np.abs(residual) <= spread
                if keep.sum() >= 3 and not keep.all():
                    refit = self._plane(p[keep])
                    coef = refit if refit is not None else coef
            if coef is not None:
                return float(coef[0] + coef[1] * x_um + coef[2] * y_um)
        p = np.asarray(recent)
        nearest = int(np.argmin(np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)))
        return float(p[nearest, 2])
