"""Acquisition plans: generators that describe microscope actions as typed commands.

A plan yields commands (:class:`Move`, :class:`SetDefocus`, :class:`SetMode`, :class:`Snap`,
:class:`Save`, :class:`Report`, :class:`Checkpoint`); the runner executes each one against a
:class:`~.protocol.Microscope` and sends the result back into the plan (``frame = yield
Snap("focus")``). A plan is therefore tested without hardware by stepping through it and
answering its commands, as bluesky does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np

from .focus import (FocusModel, band_sharpness, fit_focus_curve, local_band_sharpness,
                    next_focus_image, noise_floor, parabola_vertex, sharpness_and_noise)
from .protocol import Frame, validate_mode
from .segments import (Segment, SegmentCheckCalibration, film_only, focus_window,
                       particle_region, peaks_inside, record_particles, record_polarity,
                       survey_detections, survey_segments)
from .tiling import Tile


# --- commands ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Move:
    """Move the stage to ``(x_um, y_um)``. Result: None."""

    x_um: float
    y_um: float


@dataclass(frozen=True)
class SetDefocus:
    """Set the defocus in µm. Result: None."""

    defocus_um: float


@dataclass(frozen=True)
class SetMode:
    """Choose ``"record"`` or ``"survey"`` imaging. Result: None."""

    mode: str

    def __post_init__(self):
        validate_mode(self.mode)


@dataclass(frozen=True)
class Snap:
    """Acquire an image in the current mode. ``purpose`` (focus, survey, record) is for
    counting. Result: a :class:`~.protocol.Frame`."""

    purpose: str


@dataclass(frozen=True)
class Save:
    """Save a frame to disk. Result: the path, or None when the runner does not save."""

    frame: Frame
    tile: int = -1
    segment: tuple[int, int] = (-1, -1)


@dataclass(frozen=True)
class Report:
    """Update the acquisition state shown to the user (``state``, ``tile``, ...). Result: None."""

    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """A point between frames where the runner may stop the plan. Result: None."""


Command = Move | SetDefocus | SetMode | Snap | Save | Report | Checkpoint
Plan = Generator[Command, Any, Any]


# --- autofocus ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FocusSettings:
    """How to find focus.

    Attributes
    ----------
    span_um : float
        Defocus range of the first (coarse) sweep.
    steps : int
        Images of the coarse sweep (5: the fewest that fit the focus curve's five
        parameters; at least 5).
    max_rounds : int
        Coarse sweeps before giving up (the first, and those shifted or widened after it).
    max_images : int
        The most images one :func:`autofocus` takes (coarse sweeps and refining images
        together). Refining images are taken one at a time until the fitted centre's
        standard error reaches ``measurement_sd_um``, so a noisy curve (weak specimen, low
        dose, small frames) gets more of them and a clean one none; this only bounds the
        cost where the precision cannot be reached (the result then says how precise it
        is, ``FocusResult.center_sd_um``).
    quick_steps : int
        Images of the quick check around a predicted focus (3).
    refine_steps : int
        Images of each refining step of :func:`quick_focus` over the flanks of a peak found
        but not yet pinned to ``measurement_sd_um`` (:func:`autofocus` refines one image at
        a time, up to ``max_images``).
    quick_step_um : float or None
        Spacing of the quick check; None: from the shape of the last fitted focus curve.
    radius_px : float
        Ring radius of the ``"ring"`` sharpness metric.
    metric : {"local", "band", "ring"}
        Sharpness measure: ``"local"`` (:class:`LocalSharpness`: band-pass energy around the
        particles the first sweep shows, :func:`~.focus.local_band_sharpness`; default; the
        whole frame's ``"band"`` where it shows none), ``"band"``
        (:func:`~.focus.band_sharpness`, power at the length
        scales defocus blurs over the whole frame, noise removed) or ``"ring"``
        (:func:`~.focus.sharpness`, the autoSTEM-style autocorrelation peak over a ring).
    empty_factor : float
        A quick check without a known curve shape needs sharpness above ``empty_factor`` ×
        its noise in all three images.
    refocus_distance_um : float
        Measure focus again when the nearest measurement is farther than this, however
        well the focus model predicts (bending and ripples of the film).
    tolerance_um : float
        Measure focus again where the focus model's uncertainty
        (:meth:`~.focus.FocusModel.uncertainty_um`) exceeds this; a fraction of the depth
        of field.
    measurement_sd_um : float
        Precision one focus measurement must reach (the standard error of the fitted
        centre; refining images are taken until it does), and so the scatter the focus model
        assumes for it. 0.012 µm is 0.4 of the simulator's 30 nm depth of field (a
        measurement then lands within the depth of field ~98% of the time); set it to about
        0.4 × the instrument's depth of field at record magnification.
    max_slope : float
        Steepest focus slope (µm per µm of stage travel; 0.01 = 10 mrad of specimen tilt)
        assumed before three measurements fix a plane.
    """

    span_um: float = 1.2
    steps: int = 5
    max_rounds: int = 5
    max_images: int = 20
    quick_steps: int = 3
    refine_steps: int = 2
    quick_step_um: float | None = None
    radius_px: float = 6.0
    metric: str = "local"
    empty_factor: float = 6.0
    refocus_distance_um: float = 4.0
    tolerance_um: float = 0.02
    measurement_sd_um: float = 0.012
    max_slope: float = 0.01

    def __post_init__(self):
        if not 5 <= self.steps <= 15:
            raise ValueError(f"steps must be between 5 and 15, got {self.steps}")
        if not self.span_um > 0:
            raise ValueError(f"span_um must be > 0, got {self.span_um}")
        if self.metric not in ("local", "band", "ring"):
            raise ValueError(f"metric must be 'local', 'band' or 'ring', got {self.metric!r}")
        if not 2 <= self.refine_steps <= 7:
            raise ValueError(f"refine_steps must be between 2 and 7, got {self.refine_steps}")
        if not self.max_images >= self.steps:
            raise ValueError(f"max_images ({self.max_images}) must be at least steps "
                             f"({self.steps})")
        if self.quick_steps != 3:
            raise ValueError(f"quick_steps must be 3, got {self.quick_steps}")
        if not 0 <= self.measurement_sd_um < self.tolerance_um:
            raise ValueError(f"measurement_sd_um ({self.measurement_sd_um}) must be in "
                             f"[0, tolerance_um ({self.tolerance_um}))")

    @property
    def reach_um(self) -> float:
        """How far one measurement is trusted before a plane is fixed: where
        ``measurement_sd_um + max_slope × distance`` reaches ``tolerance_um``."""
        if self.max_slope <= 0:
            return self.refocus_distance_um
        return min(self.refocus_distance_um,
                   (self.tolerance_um - self.measurement_sd_um) / self.max_slope)

    def needs_focus(self, model: FocusModel, x_um: float, y_um: float) -> bool:
        """Whether focus must be measured before recording at ``(x_um, y_um)``."""
        if model.distance(x_um, y_um) > self.refocus_distance_um:
            return True
        return model.uncertainty_um(x_um, y_um, measurement_sd_um=self.measurement_sd_um,
                                    max_slope=self.max_slope) > self.tolerance_um


@dataclass(frozen=True)
class FocusResult:
    """Outcome of an autofocus plan.

    ``status`` is ``"ok"``, ``"empty"`` (no structure to focus on) or ``"failed"`` (no
    trustworthy peak after ``max_rounds`` sweeps); ``defocus_um`` is the best focus found
    (for ``failed``, the sharpest image's defocus; for ``empty``, the starting value).
    ``images`` counts the images taken; ``width_um`` and ``power`` are the fitted focus
    curve's shape (:func:`~.focus.focus_curve`) and ``center_sd_um`` the standard error of
    the answer.
    """

    defocus_um: float
    status: str
    images: int
    width_um: float = math.nan
    method: str = "sweep"
    sweeps: tuple = field(default=(), repr=False)
    power: float = math.nan
    center_sd_um: float = math.nan


def _measure(metric, image) -> tuple[float, float]:
    """``(sharpness, its noise)``; a metric returning a bare number gets the noise floor."""
    value = metric(image)
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), noise_floor(image.shape)


def _sweep(defoci, metric, window=None) -> Plan:
    """Take one image at each defocus and measure them.

    A metric with a ``fix(images, pixel_nm)`` method decides where to measure from the
    images it is given (see :class:`LocalSharpness`); it may return their measurements when
    it took them already, so no image is measured twice. Returns ``(defoci, values, noise,
    earlier)``: ``earlier`` is the metric's ``remeasured`` (new values of the images before
    this sweep, when it just chose new pixels) or None.
    """
    images, pixel_nm = [], None
    for d in defoci:
        yield SetDefocus(float(d))
        frame = yield Snap("focus")
        images.append(np.asarray(frame.image if window is None else frame.image[window]))
        pixel_nm = getattr(frame, "pixel_nm", None)
    fix = getattr(metric, "fix", None)
    measured = fix(images, pixel_nm) if fix is not None else None
    if measured is None:
        measured = [_measure(metric, image) for image in images]
    return (np.asarray(defoci, dtype=np.float64), np.asarray([m[0] for m in measured]),
            np.asarray([m[1] for m in measured]), getattr(metric, "remeasured", None))


def _merged(xs, ys, sds, d, v, sd, earlier):
    """All points of a focus run after a sweep: the earlier ones (re-measured where the
    metric just chose new pixels: ``earlier`` holds their new values, the last of them in
    order; any older, not re-measured, are dropped as no longer comparable) and the new."""
    if earlier:
        k = min(len(earlier), xs.size)
        e = np.asarray(earlier[len(earlier) - k:], dtype=np.float64).reshape(-1, 2)
        xs, ys, sds = xs[xs.size - k:], e[:, 0], e[:, 1]
    return np.r_[xs, d], np.r_[ys, v], np.r_[sds, sd]


class LocalSharpness:
    """Sharpness measured around the particles (:func:`~.focus.local_band_sharpness`).

    Where the particles are is decided once per focus run, so every image of the run is
    measured on the same pixels: given (``mask``: a record taken here just before showed
    them, see :func:`~.segments.particle_region`), or from the run's first sweep, as the
    union of :func:`~.segments.particle_region` over its images (a weak specimen shows its
    particles only near focus, and on a sparse frame each particle seen adds signal faster
    than the noise of its pixels). Without particles (an empty or featureless area), the
    whole frame's :func:`~.focus.band_sharpness`.

    Parameters
    ----------
    margin_px : float
        Margin around the particles (defocus blur spreads them over a sweep).
    sigmas_px : (float, float)
        Band-pass of :func:`~.focus.local_band_sharpness`.
    mask : array_like of bool, optional
        The pixels to measure on, fixed from the start (at least 64).

    Raises
    ------
    ValueError
        From a call on an image whose shape differs from the mask's (a window or frame
        size changed within one focus run: its values would not compare), or for a given
        ``mask`` of fewer than 64 pixels.
    """

    def __init__(self, *, margin_px: float = 8.0, sigmas_px: tuple[float, float] = (1.0, 3.0),
                 mask=None):
        self.margin_px = float(margin_px)
        self.sigmas_px = sigmas_px
        self.mask: np.ndarray | None = None
        self.fixed = False
        # images measured on the whole frame while no particles were seen (re-measured on
        # the particles' pixels once a later sweep shows them), and those new values
        self._unseen: list[np.ndarray] = []
        self.remeasured: list[tuple[float, float]] | None = None
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.ndim != 2 or int(mask.sum()) < 64:
                raise ValueError(f"mask must be 2-D with at least 64 pixels set, got shape "
                                 f"{mask.shape} with {int(mask.sum())}")
            self.mask, self.fixed = mask.copy(), True

    def fix(self, images, pixel_nm) -> list[tuple[float, float]] | None:
        """Choose the pixels to measure on (until chosen) and measure ``images``.

        The first sweep that shows particles decides; images of earlier sweeps (measured on
        the whole frame, as nothing showed where the particles are) are then measured again
        on those pixels, into :attr:`remeasured`, so the run's values stay comparable.

        Returns
        -------
        list of (value, noise) or None
            The images' sharpness (None once the pixels are chosen: the caller measures).
        """
        self.remeasured = None
        if self.fixed:
            return None
        if pixel_nm is not None and images:
            shapes = {np.shape(image) for image in images}
            if len(shapes) != 1:
                raise ValueError(f"images of one sweep must share a shape, got {sorted(shapes)}")
            union = None
            for image in images:
                region = particle_region(image, float(pixel_nm), margin_px=self.margin_px)
                if region is not None:
                    union = region if union is None else union | region
            if union is not None and union.sum() >= 64:
                self.mask, self.fixed = union, True
                if self._unseen:
                    self.remeasured = [self(image) for image in self._unseen]
                self._unseen = []
                return [self(image) for image in images]
        # nothing seen yet: keep the images (single precision; the latest 16 at most) to
        # measure them again when particles show
        self._unseen = (self._unseen + [np.asarray(i, dtype=np.float32) for i in images])[-16:]
        return [self(image) for image in images]

    def __call__(self, image) -> tuple[float, float]:
        if self.mask is None:
            return band_sharpness(image)
        if self.mask.shape != np.shape(image):
            raise ValueError(f"image (shape {np.shape(image)}) must have the shape of the "
                             f"focus run's mask (shape {self.mask.shape})")
        return local_band_sharpness(image, self.mask, sigmas_px=self.sigmas_px)


def _flank_um(width_um: float, power: float) -> float:
    """Distance from the centre of :func:`~.focus.focus_curve` to its steepest point, where
    one image says most about where the centre is."""
    return float(width_um) / math.sqrt(2.0 * float(power) + 1.0)


def _refine_at(fit, xs, sds, *, shape_known: bool = False) -> float:
    """The defocus of the next refining image: where it pins the fitted centre best
    (:func:`~.focus.next_focus_image`), or the flank on the side with fewer images when the
    fit gives no usable information matrix."""
    try:
        return next_focus_image(fit, xs, sds, shape_known=shape_known)[0]
    except (ValueError, np.linalg.LinAlgError):
        half = _flank_um(fit.width, fit.power) if math.isfinite(fit.width) else np.ptp(xs) / 8
        side = -1.0 if np.sum(xs < fit.center) <= np.sum(xs > fit.center) else 1.0
        return float(fit.center + side * half)


def _flank_offsets(n: int) -> np.ndarray:
    """``n`` refining positions in units of the flank distance: alternately on the lower
    and upper flank (a symmetric pair pins the centre, whatever the curve's height)."""
    return np.resize(np.array([-1.0, 1.0]), n)


def _default_metric(settings, region=None, window=None):
    if settings.metric == "local":
        # a new one per focus run: its pixels are this area's
        if region is not None:
            region = np.asarray(region, dtype=bool)
            region = region if window is None else region[window]
            if region.sum() >= 64:  # the particles a record here showed: no new search
                return LocalSharpness(mask=region)
        return LocalSharpness()
    if settings.metric == "band":
        return band_sharpness
    return lambda image: sharpness_and_noise(image, radius_px=settings.radius_px)


def autofocus(*, center_um: float = 0.0, settings: FocusSettings = FocusSettings(),
              metric: Callable[[np.ndarray], float] | None = None,
              window: tuple[slice, slice] | None = None, prior=None,
              widen: bool = True, region=None) -> Plan:
    """Find best focus by defocus sweeps, autocorrelation sharpness and a fitted focus curve.

    Each round takes images over a defocus range and fits :func:`~.focus.focus_curve` (a
    symmetric peak whose flanks fall as a power of the blur width) to *all* images so far,
    each weighted by its noise (:func:`~.focus.sharpness_and_noise`), then checks the fit
    (:func:`~.focus.fit_focus_curve`) and:

    - ``flat`` (no change above the noise): the first time, images halfway between the
      last sweep's (a weak specimen's narrow peak may lie between two of them, and only
      images near focus show its particles, see :class:`LocalSharpness`); the second time,
      sweep three times wider around the same centre (focus may be far away); after that,
      the area is ``empty`` when no
      image showed structure above its noise, else the focus ``failed`` (too weak a
      specimen for these images: the caller keeps what it has rather than judge the area
      empty);
    - ``edge`` (the peak is not bracketed): shift by most of a span towards the sharper end;
    - a trustworthy fit whose centre is known to ``settings.measurement_sd_um``: done;
    - a trustworthy fit whose centre is not yet that precise (weak contrast, low dose, small
      frames), or a peak narrower than the samples around it (``under-sampled``) whose
      centre lies inside the range: one more image where it pins the centre best
      (:func:`~.focus.next_focus_image`: mostly on the flanks, where sharpness changes
      fastest with defocus, on the side the images so far leave least pinned), and fit
      again: the run stops at the first image that brings the centre's standard error to
      ``settings.measurement_sd_um`` (a refining round is ``settings.refine_steps`` such
      images; rounds and sweeps together are at most ``settings.max_rounds``). An
      ``under-sampled`` centre outside the range: a coarse sweep again around the sharpest
      image.

    Ends with the defocus set to the answer.

    Parameters
    ----------
    center_um : float
        Centre of the first sweep (the current or predicted focus).
    settings : FocusSettings
    metric : callable, optional
        ``image -> sharpness`` or ``image -> (sharpness, noise)``; default
        :func:`~.focus.sharpness_and_noise` with ``settings.radius_px``. A bare number is
        given the noise floor of a structureless image as its noise.
    window : (slice, slice), optional
        Measure sharpness on this part of each image only (where the particles are, see
        :func:`~.segments.focus_window`).
    prior : tuple of arrays, optional
        ``(defoci, values, noise)`` measured just before at the same place (a quick check's
        three images), fitted together with the new ones.
    widen : bool
        Whether a flat sweep (after the look between its images) is followed by one three
        times wider (focus may be far away). False where focus is known to be near the first
        sweep (a quick check around a trusted prediction showed nothing): the search then
        ends there.
    region : array_like of bool, optional
        Where the particles are in the frame (:func:`~.segments.particle_region` of a
        record taken here just before, full frame shape; cut to ``window`` here), for the
        default ``"local"`` metric: the focus run measures there instead of searching its
        first sweep for particles again. Ignored with fewer than 64 pixels (in the window).

    Returns
    -------
    FocusResult
        (the generator's return value: ``result = yield from autofocus(...)``)
    """
    metric = metric or _default_metric(settings, region, window)
    center, span = float(center_um), float(settings.span_um)
    xs, ys, sds = ([np.asarray(a, dtype=np.float64) for a in prior] if prior is not None
                   else [np.zeros(0), np.zeros(0), np.zeros(0)])
    images = 0
    sweeps = []
    widened = not widen
    defoci = coarse = np.linspace(center - span / 2, center + span / 2, settings.steps)
    fit = good = None
    sweeps_done = 1  # coarse sweeps so far
    interleaved = False
    while True:
        d, v, sd, earlier = yield from _sweep(defoci, metric, window)
        images += len(d)
        sweeps.append((tuple(d.tolist()), tuple(v.tolist())))
        xs, ys, sds = _merged(xs, ys, sds, d, v, sd, earlier)
        if earlier:
            good = None  # values on other pixels: not comparable with the new ones
        if xs.size < 5:  # too few comparable values for a fit (a foreign prior dropped)
            defoci = coarse = np.linspace(center - span / 2, center + span / 2, settings.steps)
            continue
        fit = fit_focus_curve(xs, ys, sds)
        if fit.ok and (good is None or fit.center_sd <= good.center_sd):
            good = fit  # a later, noisier look must not throw away a peak already found
        best_d = float(xs[int(np.argmax(ys))])
        if fit.ok and fit.center_sd <= settings.measurement_sd_um:
            break
        if images >= settings.max_images:
            break
        # a peak found (or seen between two samples too far apart to give its width, its
        # centre inside the range): one image at a time where it pins the centre best
        # (mostly the flanks, where sharpness changes fastest), refitting after each and
        # stopping as soon as the centre is known to measurement_sd_um
        if fit.ok or (fit.reason == "under-sampled"
                      and float(xs.min()) < fit.center < float(xs.max())):
            defoci = np.array([_refine_at(fit, xs, sds)])
            continue
        if sweeps_done >= settings.max_rounds or images + settings.steps > settings.max_images:
            break
        sweeps_done += 1
        step = span / (len(defoci) - 1) if len(defoci) > 1 else span
        if fit.reason == "flat" and not interleaved:
            # a weak specimen's peak can be narrower than the steps and fall between them
            # (its particles show only near focus): look between the samples before
            # looking farther away or calling the area empty
            interleaved = True
            last = np.sort(coarse)
            defoci = (last[:-1] + last[1:]) / 2
            continue
        if fit.reason == "flat":
            if widened and good is not None:
                break
            if widened and not np.any(ys > 5 * sds):
                # no image shows structure above its noise: nothing to focus on
                yield SetDefocus(float(center_um))
                return FocusResult(float(center_um), "empty", images, sweeps=tuple(sweeps))
            if widened:
                break  # structure, but no peak stands out of the noise: failed, not empty
            widened = True
            span *= 3
        elif fit.reason == "edge":
            # towards the sharper end of everything seen (the last look may be one image)
            lo_x, hi_x = float(xs.min()), float(xs.max())
            up = ys[np.argmax(xs)] > ys[np.argmin(xs)]
            center = (hi_x if up else lo_x) + (0.4 if up else -0.4) * span
        elif fit.reason == "under-sampled":
            center = best_d  # its centre lies outside what was seen (else refined above)
            span = max(6 * max(fit.width, step / 4), 2 * step)
        else:  # the fit itself failed: look again, wider, around the sharpest image
            center, span = best_d, span * 2
        defoci = coarse = np.linspace(center - span / 2, center + span / 2, settings.steps)
    if good is not None:
        yield SetDefocus(good.center)
        return FocusResult(good.center, "ok", images, good.width, "sweep", tuple(sweeps),
                           good.power, good.center_sd)
    best_d = float(xs[int(np.argmax(ys))])
    yield SetDefocus(best_d)
    return FocusResult(best_d, "failed", images, sweeps=tuple(sweeps))


def quick_focus(*, predicted_um: float, step_um: float, power: float | None = None,
                settings: FocusSettings = FocusSettings(),
                metric: Callable[[np.ndarray], float] | None = None,
                window: tuple[slice, slice] | None = None, region=None) -> Plan:
    """Check a predicted focus with three images and correct it, or go on to a sweep.

    With the focus curve's shape known from an earlier sweep nearby (``step_um`` its width,
    ``power`` its power: both depend on the optics and the specimen's texture, not on where
    focus is), three images at the predicted focus and on its two steepest flanks fix the
    curve's centre, height and offset (:func:`~.focus.fit_focus_curve` with the shape
    fixed). While the centre is not yet known to ``settings.measurement_sd_um`` (weak
    contrast, small frames), or the three images do not bracket it (the prediction was off
    by more than a flank: the fit with the known shape still says where the peak lies),
    images on the flanks of the fitted centre are added, at most ``2 * refine_steps`` (7
    images; one image at a time where it pins the centre best,
    :func:`~.focus.next_focus_image`, once the fit is trustworthy; a pair on the flanks of
    where an off prediction puts the peak). Without ``power``, images at ``predicted ±
    step_um`` and a parabola through ``log(sharpness)`` (a Gaussian's shape). When the images
    do not bracket the peak (``edge``), show no peak (``flat``) or do not reach the
    precision, :func:`autofocus` goes on from the sharpest image, reusing them.

    Returns
    -------
    FocusResult
        ``method`` is ``"quick"`` when no sweep was needed (3 images, or a few more to refine).
    """
    metric = metric or _default_metric(settings, region, window)
    step = _flank_um(step_um, power) if power is not None else float(step_um)
    defoci, values, noise, _ = yield from _sweep(
        np.array([predicted_um - step, predicted_um, predicted_um + step]), metric, window)
    images = 3
    if power is not None:
        fit = fit_focus_curve(defoci, values, noise, width=step_um, power=power)
        # at most 2 x refine_steps more (7 images in all by default, the budget
        # for a focus), one at a time while the fit is trustworthy
        while images < 3 + 2 * settings.refine_steps:
            if fit.ok and fit.center_sd <= settings.measurement_sd_um:
                break
            if fit.ok:
                # where one more image pins the centre best (the flank least pinned yet)
                d, v, sd, earlier = yield from _sweep(
                    [_refine_at(fit, defoci, noise, shape_known=True)], metric, window)
            elif (fit.reason == "edge" and math.isfinite(fit.center)
                  and images + settings.refine_steps <= 3 + 2 * settings.refine_steps):
                # the prediction was off by more than a flank: the known shape still says
                # where the peak lies; look there (at most three flanks beyond the sharpest)
                sharpest = float(defoci[int(np.argmax(values))])
                center = float(np.clip(fit.center, sharpest - 3 * step, sharpest + 3 * step))
                d, v, sd, earlier = yield from _sweep(center + step * _flank_offsets(
                    settings.refine_steps), metric, window)
            else:
                break
            images += len(d)
            defoci, values, noise = _merged(defoci, values, noise, d, v, sd, earlier)
            fit = fit_focus_curve(defoci, values, noise, width=step_um, power=power)
        if fit.ok and fit.center_sd <= settings.measurement_sd_um:
            yield SetDefocus(fit.center)
            return FocusResult(fit.center, "ok", images, float(step_um), "quick", (), power,
                               fit.center_sd)
    else:
        i_max = int(np.argmax(values))
        if i_max == 1 and values.min() > settings.empty_factor * noise.max():
            vertex = parabola_vertex(defoci, np.log(values))
            if vertex is not None and abs(vertex - predicted_um) <= step:
                yield SetDefocus(vertex)
                return FocusResult(vertex, "ok", 3, float(step_um), "quick")
    i_max = int(np.argmax(values))
    # three images around a prediction with no structure above their noise: one coarse
    # sweep there decides (ten more images of a far-out search would mostly confirm nothing)
    near = power is not None and not np.any(values > 3.0 * noise)
    result = yield from autofocus(center_um=float(predicted_um if near else defoci[i_max]),
                                  settings=settings, metric=metric, window=window,
                                  prior=(defoci, values, noise), widen=not near)
    return dataclasses.replace(result, images=result.images + images, method="quick+sweep")


# --- the whole acquisition ----------------------------------------------------------------

@dataclass(frozen=True)
class SegmentSettings:
    """How survey images are divided and checked (see :func:`~.segments.check_segments`).

    ``calibrate`` makes the check measure its own sensitivity during the run (see
    :class:`~.segments.SegmentCheckCalibration`, whose tolerances and spot-check interval
    these fields set); False trusts the survey from the first segment (the autoSTEM way).
    ``record_bin_px`` is the binning of :func:`~.segments.record_has_particles`.
    """

    overlap: float = 0.1
    threshold_sigma: float = 5.0
    min_size_nm: float = 2.0
    polarity: str = "auto"
    calibrate: bool = True
    miss_tolerance: float = 0.05
    empty_tolerance: float = 0.01
    confidence: float = 0.95
    spot_check_every: int = 20
    record_bin_px: int = 4

    def calibration(self) -> SegmentCheckCalibration | None:
        """A fresh calibration for a run (None when ``calibrate`` is off)."""
        if not self.calibrate:
            return None
        return SegmentCheckCalibration(
            miss_tolerance=self.miss_tolerance, empty_tolerance=self.empty_tolerance,
            confidence=self.confidence, spot_check_every=self.spot_check_every)


@dataclass
class AreaProgress:
    """What the acquisition of an area has done so far: what a resumed run or a session's
    next round carries over instead of starting again at tile 1.

    :func:`acquire_area` updates it in place as it goes, so a run stopped at any checkpoint
    leaves it describing exactly what was done up to there.

    Attributes
    ----------
    tiles_done : set of int
        Tiles (``Tile.index``) whose every segment was decided (recorded, skipped, outside
        the stage limits or done before): never surveyed again.
    model : FocusModel
        The focus measurements so far.
    measurements : list of (x_um, y_um, focus_um, sd_um)
        The same measurements, JSON-ready (``sd_um`` None when unknown).
    shape : (width_um, power) or None
        The last sweep's focus curve, for quick checks.
    calibration : SegmentCheckCalibration or None
        The segment check's evidence about the survey's sensitivity.
    verify_focus : bool
        The focus model comes from an earlier run (read from ``acquisition.json``): the
        specimen may have been refocused or moved since, so focus is measured before the
        first record, and the old measurements are dropped if it disagrees with them.
    survey : tuple or None
        In-process only: ``(tile index, survey frame, segments, labels)`` of the tile being
        worked on when the run stopped, so the next round goes on with it without a new
        survey; ``decided`` holds that tile's segments ``(row, col)`` already decided.
    polarity : str or None
        The particles' contrast (``"dark"``, ``"bright"``) learnt in the run where
        ``SegmentSettings.polarity`` is ``"auto"`` (see :func:`_vote_polarity`); None
        while unknown. ``polarity_votes`` counts the records that voted.
    """

    tiles_done: set = field(default_factory=set)
    model: FocusModel = field(default_factory=FocusModel)
    measurements: list = field(default_factory=list)
    shape: tuple | None = None
    calibration: SegmentCheckCalibration | None = None
    verify_focus: bool = False
    survey: tuple | None = None
    decided: set = field(default_factory=set)
    polarity: str | None = None
    polarity_votes: dict = field(default_factory=lambda: {"dark": 0, "bright": 0})

    @classmethod
    def start(cls, segments: SegmentSettings) -> "AreaProgress":
        """Nothing done yet: an empty focus model and a fresh calibration."""
        return cls(calibration=segments.calibration())

    def to_dict(self) -> dict:
        """JSON-ready (for ``acquisition.json``); the in-process survey is left out."""
        return {"tiles_done": sorted(int(t) for t in self.tiles_done),
                "focus_measurements": [list(m) for m in self.measurements],
                "focus_curve": list(self.shape) if self.shape is not None else None,
                "segment_check": (self.calibration.summary()
                                  if self.calibration is not None else None),
                "polarity": self.polarity, "polarity_votes": dict(self.polarity_votes)}

    @classmethod
    def from_dict(cls, data: Mapping, segments: SegmentSettings) -> "AreaProgress":
        """What an earlier run on the same area left in its ``acquisition.json``.

        The calibration is taken only when made with the same settings; the focus model is
        taken but verified before use (``verify_focus``)."""
        progress = cls.start(segments)
        progress.tiles_done = {int(t) for t in data.get("tiles_done", ())}
        for x, y, f, sd in data.get("focus_measurements", ()):
            progress.model.add(x, y, f, sd_um=sd)
            progress.measurements.append((float(x), float(y), float(f), sd))
        progress.verify_focus = len(progress.model) > 0
        curve = data.get("focus_curve")
        progress.shape = tuple(float(v) for v in curve) if curve else None
        check = data.get("segment_check")
        if progress.calibration is not None and check:
            progress.calibration.restore(check)
        if data.get("polarity") in ("dark", "bright"):
            progress.polarity = data["polarity"]
        votes = data.get("polarity_votes") or {}
        progress.polarity_votes = {k: int(votes.get(k, 0)) for k in ("dark", "bright")}
        return progress


#: Records whose particles agree with the survey that must show one contrast before the
#: run's particle contrast is taken as known, and the share of them allowed to disagree.
_POLARITY_VOTES, _POLARITY_DISSENT = 3, 0.1


def _vote_polarity(progress: AreaProgress, vote: str | None) -> None:
    """Count a record's particle contrast (:func:`~.segments.record_polarity`, on a segment
    the survey and the record agree holds particles: real particles, not film); the run's
    contrast is known once ``_POLARITY_VOTES`` records agree with few dissenting.

    Why it matters: film texture has both signs, so a check that looks on both sides of the
    background (``"auto"``) raises twice the film alarms, and the film's mottle repeats in
    the confirmation record: every alarm that survived confirmation and the film test in
    whole plan runs (empty, au10, ps50; bright field and HAADF) was of the wrong contrast,
    while the real alarms (PS50 the survey missed) were all of the right one."""
    if vote not in ("dark", "bright") or progress.polarity is not None:
        return
    progress.polarity_votes[vote] = progress.polarity_votes.get(vote, 0) + 1
    total = sum(progress.polarity_votes.values())
    if progress.polarity_votes[vote] >= _POLARITY_VOTES \
            and progress.polarity_votes[vote] >= (1 - _POLARITY_DISSENT) * total:
        progress.polarity = vote


def _faint_particles(calibration: SegmentCheckCalibration) -> bool:
    """Whether the run has shown particles near the record check's detection limit: the
    survey missed particles that the record check saw (``particles_missed``, or a whole
    occupied segment, ``missed``).

    Why: the particles the survey misses are the faint ones (small, low contrast: PS50 in
    a PS50 + PS100 mixture), and the record check, a few times more sensitive, finds them
    barely: PS50 at focus peaks 0.4-1.2x its seed level (256 px records, bright field and
    HAADF), so it misses some outright. Then a blank record is no proof of an empty field,
    and dropping it on that word lost occupied segments the survey had also missed."""
    return calibration.particles_missed > 0 or calibration.missed > 0


def _inside(x_um: float, y_um: float, limits_um) -> bool:
    if limits_um is None:
        return True
    x0, y0, x1, y1 = limits_um
    return x0 <= x_um <= x1 and y0 <= y_um <= y1


def _focus_here(x_um: float, y_um: float, model: FocusModel, shape: tuple | None,
                settings: FocusSettings, *, fallback_um: float = 0.0, window=None,
                region=None) -> Plan:
    predicted = model.predict(x_um, y_um)
    if predicted is not None and shape:
        width, power = shape
        result = yield from quick_focus(predicted_um=predicted,
                                        step_um=settings.quick_step_um or width,
                                        power=None if settings.quick_step_um else power,
                                        settings=settings, window=window, region=region)
    else:
        result = yield from autofocus(center_um=predicted if predicted is not None
                                      else fallback_um, settings=settings, window=window,
                                      region=region)
    return result


def _log_focus(result: FocusResult, x_um: float, y_um: float, model: FocusModel,
               shape: tuple | None, focus_log: list, settings: FocusSettings,
               measurements: list | None = None) -> tuple | None:
    """Add a focus measurement to the model and the log (and to ``measurements``, JSON-ready,
    see :class:`AreaProgress`); return the focus curve's shape ``(width, power)`` to use for
    quick checks from now on."""
    focus_log.append((x_um, y_um, result.defocus_um, result.status, result.images))
    if result.status == "ok":
        # a fit's standard error below half the precision asked for is not trusted (drift,
        # the curve model's own misfit): the model never assumes better than that
        sd = result.center_sd_um
        sd = max(sd, settings.measurement_sd_um / 2) if math.isfinite(sd) else None
        model.add(x_um, y_um, result.defocus_um, sd_um=sd)
        if measurements is not None:
            measurements.append((float(x_um), float(y_um), float(result.defocus_um), sd))
        if result.method != "quick" and math.isfinite(result.width_um) \
                and math.isfinite(result.power):
            return (result.width_um, result.power)
    return shape


def _check_carried_focus(progress: AreaProgress, result: FocusResult, x_um: float,
                         y_um: float, settings: FocusSettings) -> None:
    """The first focus measured after resuming from ``acquisition.json`` decides whether the
    earlier run's focus model still holds: it is kept when the new measurement lies within
    the combined errors (2 sd) of its prediction, else dropped (the specimen was refocused
    or moved between the runs), and the run goes on with the new measurement alone."""
    if not progress.verify_focus or result.status != "ok":
        return
    progress.verify_focus = False
    predicted = progress.model.predict(x_um, y_um)
    if predicted is None:
        return
    model_sd = progress.model.uncertainty_um(x_um, y_um,
                                             measurement_sd_um=settings.measurement_sd_um,
                                             max_slope=settings.max_slope)
    sd = result.center_sd_um if math.isfinite(result.center_sd_um) \
        else settings.measurement_sd_um
    if abs(result.defocus_um - predicted) > 2 * math.hypot(model_sd, sd):
        progress.model = FocusModel()
        progress.measurements.clear()
        progress.shape = None  # the curve's shape came from the same earlier specimen


def _already_done(xy, done_um, record_field_um) -> bool:
    reach = 0.5 * min(record_field_um)
    return any(math.dist(xy, d) < reach for d in done_um)


def acquire_area(tiles: list[Tile], *, record_field_um: tuple[float, float],
                 focus: FocusSettings = FocusSettings(),
                 segments: SegmentSettings = SegmentSettings(),
                 target_defocus_um: float = 0.0, start_defocus_um: float = 0.0,
                 limits_um: tuple[float, float, float, float] | None = None,
                 done_um: Sequence[tuple[float, float]] = (),
                 progress: AreaProgress | None = None) -> Plan:
    """The autoSTEM loop, faster: survey, check segments, focus only where needed, record.

    For each tile in order: move there, take a survey image and find the record-sized
    segments with particles (a tile without any costs no focusing). Then for each occupied
    segment: if no focus was measured within ``focus.refocus_distance_um``, measure it at the
    nearby occupied segment with the most particles (a three-image check when earlier
    measurements predict focus, else a sweep; an empty result tries the next candidate);
    then move to the segment and record it at the focus that the plane model of all
    measurements predicts there, plus ``target_defocus_um``. Segments whose centre lies
    outside ``limits_um`` (stage limits), or for which no focus could be found at all, are
    skipped. Segments whose centre lies within half a record field of a position in
    ``done_um`` (frames an earlier, interrupted run saved) are not acquired again, so a
    resumed run never images the same particles twice. ``progress`` (an
    :class:`AreaProgress`, updated in place) carries what an earlier run or round did: its
    done tiles are not surveyed again, the tile it stopped in goes on with its survey when
    that was kept (in-process), and the focus model, focus curve and segment-check
    calibration go on from where they were.

    The survey is not trusted blindly (``segments.calibrate``, see
    :class:`~.segments.SegmentCheckCalibration`): until enough segments were compared,
    segments the survey calls empty are recorded too, and every record frame is checked for
    particles at record resolution (:func:`~.segments.record_has_particles`). A survey-empty
    segment whose record shows particles switches skipping off for the rest of the run (all
    segments are recorded and saved); a survey-empty check frame that shows nothing is not
    saved and counts as skipped. Once skipping is on, one in ``spot_check_every`` skipped
    segments is still recorded and checked the same way. A survey-empty segment whose record
    shows particles gets one confirmation record of the same field before it counts against
    the survey (a false alarm of the record check does not repeat in a fresh exposure;
    particles do); the first frame is kept either way. A record that shows nothing but was
    taken where focus is not known (no measurement within ``focus.refocus_distance_um``), or
    once the survey has missed particles that the record check saw (:func:`_faint_particles`:
    faint particles, at the record check's limit too), is no evidence: where the survey saw
    particles in the tile, or has missed a segment before, it is saved unjudged and not
    counted, so no segment is left out for want of focus or on a blind check's word. With
    ``segments.polarity`` ``"auto"``, the particles' contrast is learnt from the first
    records where survey and record agree there are particles (:func:`_vote_polarity`,
    ``progress.polarity``); from then on the survey, the record check and the film test
    look on that side of the background only (film alarms of the other sign are not raised).

    Yields :class:`Report` with ``state``, ``tile``, ``tiles``, ``skipped_segments``,
    ``defocus_um``, ``focus`` (one ``(x_um, y_um, focus_um, status, images)`` per autofocus),
    ``segment_check`` (``calibrating``, ``on``, ``off``) and ``segment_check_note`` (one
    line saying why), and a :class:`Checkpoint` after every saved frame and at the start of
    every tile.

    Returns
    -------
    dict
        ``{"focus": [(x_um, y_um, focus_um, status, images), ...], "skipped_segments",
        "acquired_segments", "focus_images", "tiles_visited", "confirmations",
        "segment_check"}`` (``confirmations``: confirmation records taken)
        (``segment_check``: :meth:`~.segments.SegmentCheckCalibration.summary`, or None).
    """
    progress = progress if progress is not None else AreaProgress.start(segments)
    model = progress.model
    shape: tuple | None = progress.shape  # the last sweep's focus curve (width, power)
    skipped = acquired = focus_images = visited = 0
    focus_log = []
    unfocusable: list[tuple[float, float]] = []
    calibration = progress.calibration
    confirmations = 0

    def log_focus(result: FocusResult, x_um: float, y_um: float) -> None:
        nonlocal model, shape
        _check_carried_focus(progress, result, x_um, y_um, focus)
        model, shape = progress.model, progress.shape
        shape = progress.shape = _log_focus(result, x_um, y_um, model, shape, focus_log,
                                            focus, progress.measurements)

    def needs_focus(x_um: float, y_um: float) -> bool:
        # a focus model carried from an earlier run is checked once before it is used
        return progress.verify_focus or focus.needs_focus(model, x_um, y_um)

    def polarity() -> str:
        # the particles' contrast, once the run has learnt it (film alarms of the other
        # sign are then never raised)
        if segments.polarity != "auto":
            return segments.polarity
        return progress.polarity or "auto"

    def particle_peaks(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        # every peak of the frame (margin 0) and its particle: one search answers the focus
        # probe's and the record check's questions (its counted part: peaks_inside) and
        # which particles the survey saw (survey_detections)
        return record_particles(
            frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
            threshold_sigma=segments.threshold_sigma, min_size_nm=segments.min_size_nm,
            polarity=polarity())

    def counted(peaks: np.ndarray, frame: Frame) -> bool:
        return len(peaks_inside(peaks, frame.image.shape, margin=segments.overlap / 2,
                                bin_px=segments.record_bin_px)) > 0

    def check_fields() -> dict:
        if calibration is None:
            return {"segment_check": "on", "segment_check_note":
                    "segment check on (not calibrated: the survey is trusted)"}
        return {"segment_check": calibration.state,
                "segment_check_note": calibration.note(),
                "segment_check_counts": calibration.summary()}

    yield Report(check_fields())
    for tile in tiles:
        if tile.index in progress.tiles_done:
            continue  # every segment decided in an earlier run or round: no new survey
        yield Checkpoint()
        visited += 1
        yield Report({"state": "surveying", "tile": tile.index + 1, "tiles": len(tiles)})
        found: list[Segment]
        if progress.survey is not None and progress.survey[0] == tile.index:
            # the round before stopped in this tile: its survey still describes it
            survey, found, survey_labels = progress.survey[1:]
        else:
            yield Move(tile.x_um, tile.y_um)
            yield SetMode("survey")
            if len(model):
                yield SetDefocus(model.predict(tile.x_um, tile.y_um) + target_defocus_um)
            elif start_defocus_um is not None:
                yield SetDefocus(float(start_defocus_um))
            survey = yield Snap("survey")
            found, survey_labels = survey_segments(
                survey.image, survey.pixel_nm, segment_um=record_field_um,
                overlap=segments.overlap, threshold_sigma=segments.threshold_sigma,
                min_size_nm=segments.min_size_nm, polarity=polarity())
            progress.survey = (tile.index, survey, found, survey_labels)
            progress.decided = set()
        centre = {id(s): (survey.stage_x_um + s.dx_um, survey.stage_y_um + s.dy_um)
                  for s in found}
        inside = [s for s in found if _inside(*centre[id(s)], limits_um)]
        eligible = [s for s in inside
                    if (s.row, s.col) not in progress.decided
                    and not _already_done(centre[id(s)], done_um, record_field_um)]
        # Survey-empty segments are recorded too while the check calibrates, after it was
        # switched off, and as spot checks: each decided when its turn comes (serpentine
        # order), so that what the records before it showed about the survey (segments and
        # particles it saw and missed) counts already within the tile.
        chosen = list(eligible)
        # segments an earlier run saved are done, not skipped; those outside the stage
        # limits are counted once, with the tile's survey
        if not progress.decided:
            skipped += len(found) - len(inside)
            progress.decided.update((s.row, s.col) for s in found if s not in inside)
        yield Report({"skipped_segments": skipped})
        recording = False
        tried: set[int] = set()  # focus sites that came out empty in this tile
        for seg in chosen:
            if not seg.has_particles and not (calibration is not None
                                              and calibration.record_anyway()):
                skipped += 1
                progress.decided.add((seg.row, seg.col))
                yield Report({"skipped_segments": skipped})
                continue
            if not recording:
                yield SetMode("record")
                recording = True
            x, y = centre[id(seg)]
            if needs_focus(x, y):
                # Survey-occupied sites nearby first, most particles first.
                near = [s for s in chosen if id(s) not in tried and s.has_particles
                        and math.dist(centre[id(s)], (x, y)) <= min(focus.reach_um, focus.refocus_distance_um / 2)]
                for site in sorted(near, key=lambda s: -s.particles)[:2]:
                    yield Report({"state": "focusing"})
                    fx, fy = centre[id(site)]
                    yield Move(fx, fy)
                    result = yield from _focus_here(fx, fy, model, shape, focus)
                    focus_images += result.images
                    log_focus(result, fx, fy)
                    yield Report({"focus": focus_log[-1], "defocus_um": result.defocus_um})
                    if result.status == "ok":
                        break
                    tried.add(id(site))
            yield Report({"state": "recording"})
            yield Move(x, y)
            guess = model.predict(x, y) if len(model) else start_defocus_um
            best = (guess if guess is not None else 0.0) + target_defocus_um
            yield SetDefocus(best)
            yield Report({"defocus_um": best})
            frame = yield Snap("record")
            peaks = objects = None  # every particle peak of `frame`, once it was searched
            # where focusing on a record's particles failed (too few, too faint), trying
            # again close by would fail the same way: those records keep the best guess
            if needs_focus(x, y) and not any(
                    math.dist((x, y), p) < focus.refocus_distance_um / 2 for p in unfocusable):
                peaks, objects = particle_peaks(frame)
            if peaks is not None and len(peaks):
                # Focus was not known here (the survey showed nothing to focus on nearby, or
                # focusing there failed): this record, taken at the best guess, shows
                # particles, so focus on them and record again. A record that shows nothing
                # needs no focus: it is judged as it is, and no segment is ever left out for
                # want of focus.
                yield Report({"state": "focusing"})
                # focus is measured on the probe's particles themselves (their region, not
                # a window around them: fewer images on sparse weak samples, e.g. ps-bimodal
                # BF 2048 px 7.2 -> 6.3 per autofocus)
                region = particle_region(
                    frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
                    threshold_sigma=segments.threshold_sigma,
                    min_size_nm=segments.min_size_nm, polarity=polarity())
                result = yield from _focus_here(
                    x, y, model, shape, focus, fallback_um=best - target_defocus_um,
                    window=focus_window(frame.image.shape, peaks) if region is None else None,
                    region=region)
                result = dataclasses.replace(result, images=result.images + 1)  # + the probe
                focus_images += result.images
                log_focus(result, x, y)
                yield Report({"focus": focus_log[-1], "defocus_um": result.defocus_um})
                if result.status == "ok":
                    best = model.predict(x, y) + target_defocus_um
                    yield SetDefocus(best)
                    yield Report({"state": "recording", "defocus_um": best})
                    frame = yield Snap("record")
                    peaks = objects = None
                else:  # the probe, out of focus but with particles, is kept as the record
                    unfocusable.append((x, y))
            # whether focus was known near this record at all: a weak specimen (PS, silica in
            # bright field) recorded far from focus can look empty although it is not; within
            # refocus_distance_um of a measurement the prediction is off by a few depths of
            # field at most, which blurs particles but does not hide them
            focused = (not progress.verify_focus
                       and model.distance(x, y) <= focus.refocus_distance_um)
            keep = True
            if calibration is not None and calibration.state != "off":
                # Compare the survey's verdict with what the record shows.
                if peaks is None:
                    peaks, objects = particle_peaks(frame)
                seen = counted(peaks, frame)
                anywhere = len(peaks) > 0
                if seen and seg.has_particles and polarity() == "auto":
                    _vote_polarity(progress, record_polarity(
                        frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
                        threshold_sigma=segments.threshold_sigma,
                        min_size_nm=segments.min_size_nm, margin=segments.overlap / 2))
                if seen and not seg.has_particles:
                    # The survey missed particles, or the record check saw noise: one
                    # confirmation record decides (a false alarm does not repeat in a fresh
                    # exposure; particles do). Both frames were of the same field.
                    yield Report({"state": "confirming"})
                    confirm = yield Snap("record")
                    seen = counted(particle_peaks(confirm)[0], confirm)
                    confirmations += 1
                    # the film's mottle is fixed to the specimen, so its alarms repeat: the
                    # segmentation's test (a region standing beyond the film's deepest dip
                    # on the other polarity) decides. It only clears the survey; the frame
                    # with the peaks is kept whatever it says (never dropped on its word)
                    if seen and film_only(confirm.image, confirm.pixel_nm,
                                          polarity=polarity(),
                                          margin=segments.overlap / 2,
                                          bin_px=segments.record_bin_px):
                        seen = False
                # A blank record is no evidence where the particles may be too faint for the
                # record check: where the survey saw particles in this tile, or has missed
                # them before, it is kept unjudged (never left out) and not counted against
                # the survey when focus was not known here (a weak specimen far from focus
                # looks empty), or when the survey has missed particles the record check
                # saw (_faint_particles: the specimen holds particles at the survey's limit,
                # and the faintest of those are at the record check's limit too).
                unjudged = not anywhere and (not focused or _faint_particles(calibration)) \
                    and (any(s.has_particles for s in found) or calibration.missed > 0)
                if not unjudged:
                    # which of the record's particles the survey saw: per-particle evidence
                    # of its sensitivity from every record, occupied segments' included
                    checked, unseen = (survey_detections(
                        survey_labels, survey.pixel_nm, seg, peaks, objects,
                        frame.image.shape, frame.pixel_nm, margin=segments.overlap / 2,
                        bin_px=segments.record_bin_px)
                        if calibration.state == "calibrating" and seen else (0, 0))
                    calibration.add(survey_occupied=seg.has_particles, record_occupied=seen,
                                    particles_checked=checked, particles_missed=unseen)
                # A survey-empty check frame is data if particles are anywhere in it (its
                # border band, not counted against the survey, included); one that shows
                # nothing is dropped like a skipped segment. (Keeping every blank check frame
                # once the survey had missed a particle cost ps100 BF 6-17 points of skip
                # rate and saved no occupied segment in any bench run: the record check sees
                # what the survey misses, which is what calibration relies on anyway.)
                keep = seg.has_particles or anywhere or unjudged
                yield Report(check_fields())
            progress.decided.add((seg.row, seg.col))
            if not keep:
                skipped += 1
                yield Report({"skipped_segments": skipped})
                continue
            yield Save(frame, tile.index, (seg.row, seg.col))
            acquired += 1
            yield Checkpoint()
        progress.tiles_done.add(tile.index)
        progress.survey, progress.decided = None, set()
    return {"focus": focus_log, "skipped_segments": skipped, "acquired_segments": acquired,
            "focus_images": focus_images, "tiles_visited": visited,
            "confirmations": confirmations,
            "segment_check": calibration.summary() if calibration is not None else None}
