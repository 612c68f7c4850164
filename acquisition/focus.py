"""Focus measurement: autocorrelation sharpness, a Gaussian fit of sharpness vs defocus,
and a plane model that predicts focus from neighbouring tiles.

Pure functions of arrays; the autofocus *plan* that drives the microscope is in
:mod:`.plans`.
"""

from __future__ import annotations

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
    float
        Dimensionless, ~0 for noise or a blank image, larger when sharper.

    References
    ----------
    Slater et al., Microsc. Microanal. 26 (2020), "autoSTEM" (autocorrelation sharpness).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> abs(sharpness(rng.normal(size=(128, 128)))) < 0.05
    True
    """
    ac = autocorrelation(image, window=window)
    cy, cx = ac.shape[0] // 2, ac.shape[1] // 2
    ac0 = ac[cy, cx]
    if not ac0 > 0:  # constant image: no structure at all
        return 0.0
    lag1 = (ac[cy - 1, cx] + ac[cy + 1, cx] + ac[cy, cx - 1] + ac[cy, cx + 1]) / 4.0
    lag2 = (ac[cy - 2, cx] + ac[cy + 2, cx] + ac[cy, cx - 2] + ac[cy, cx + 2]) / 4.0
    peak = max(2.0 * lag1 - lag2, lag1)
    r = max(float(radius_px), 2.0)
    k = int(math.ceil(r + 1))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    ring = np.abs(np.hypot(yy, xx) - r) < 0.5
    ring_mean = ac[cy - k:cy + k + 1, cx - k:cx + k + 1][ring].mean()
    return float((peak - ring_mean) / ac0)


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
    fewer, the nearest measurement.
    """

    def __init__(self) -> None:
        self._points: list[tuple[float, float, float]] = []

    def __len__(self) -> int:
        return len(self._points)

    @property
    def points(self) -> list[tuple[float, float, float]]:
        """``(x_um, y_um, focus_um)`` measured so far."""
        return list(self._points)

    def add(self, x_um: float, y_um: float, focus_um: float) -> None:
        """Record a measured best focus at a stage position."""
        self._points.append((float(x_um), float(y_um), float(focus_um)))

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
        return coef if rank == 3 else None

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
            Scatter of one focus measurement.
        max_slope : float
            Steepest focus change per stage distance (µm/µm) a specimen is assumed to have.

        Returns
        -------
        float
            Infinite before the first measurement.
        """
        if not self._points:
            return math.inf
        recent = self._plane_points()
        if recent is None:
            return measurement_sd_um + max_slope * self.distance(x_um, y_um)
        a = np.column_stack([np.ones(len(recent)), recent[:, 0], recent[:, 1]])
        q = np.array([1.0, x_um, y_um])
        leverage = float(q @ np.linalg.pinv(a.T @ a) @ q)
        return measurement_sd_um * math.sqrt(1.0 + leverage)

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
                    coef = self._plane(p[keep]) if self._plane(p[keep]) is not None else coef
            if coef is not None:
                return float(coef[0] + coef[1] * x_um + coef[2] * y_um)
        p = np.asarray(recent)
        nearest = int(np.argmin(np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)))
        return float(p[nearest, 2])
