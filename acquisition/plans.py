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

from .focus import FocusModel, fit_gaussian, noise_floor, parabola_vertex, sharpness
from .protocol import Frame, validate_mode
from .segments import (Segment, SegmentCheckCalibration, check_segments, focus_window,
                       record_has_particles, record_particle_peaks)
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
        Defocus range of the first sweep.
    steps : int
        Images per sweep (at most 7 by design).
    max_rounds : int
        Sweeps before giving up (each shifted or narrowed after the last).
    quick_steps : int
        Images of the quick check around a predicted focus (3).
    quick_step_um : float or None
        Spacing of the quick check; None: the width of the last fitted sharpness curve.
    radius_px : float
        Ring radius of the sharpness metric.
    empty_factor : float
        A sweep whose sharpness never exceeds ``empty_factor`` × the noise floor is an empty
        area.
    refocus_distance_um : float
        Measure focus again when the nearest measurement is farther than this, however
        well the focus model predicts (bending and ripples of the film).
    tolerance_um : float
        Measure focus again where the focus model's uncertainty
        (:meth:`~.focus.FocusModel.uncertainty_um`) exceeds this; a fraction of the depth
        of field.
    measurement_sd_um : float
        Assumed scatter of one focus measurement (for the model's uncertainty).
    max_slope : float
        Steepest focus slope (µm per µm of stage travel; 0.01 = 10 mrad of specimen tilt)
        assumed before three measurements fix a plane.
    """

    span_um: float = 1.2
    steps: int = 7
    max_rounds: int = 4
    quick_steps: int = 3
    quick_step_um: float | None = None
    radius_px: float = 6.0
    empty_factor: float = 6.0
    refocus_distance_um: float = 4.0
    tolerance_um: float = 0.02
    measurement_sd_um: float = 0.008
    max_slope: float = 0.01

    def __post_init__(self):
        if not 4 <= self.steps <= 15:
            raise ValueError(f"steps must be between 4 and 15, got {self.steps}")
        if not self.span_um > 0:
            raise ValueError(f"span_um must be > 0, got {self.span_um}")
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
    ``images`` counts the images taken; ``width_um`` is the fitted sharpness-curve sigma.
    """

    defocus_um: float
    status: str
    images: int
    width_um: float = math.nan
    method: str = "sweep"
    sweeps: tuple = field(default=(), repr=False)


def _sweep(center: float, span: float, steps: int, metric, window=None) -> Plan:
    defoci = np.linspace(center - span / 2, center + span / 2, steps)
    values = []
    shape = None
    for d in defoci:
        yield SetDefocus(float(d))
        frame = yield Snap("focus")
        image = frame.image if window is None else frame.image[window]
        shape = image.shape
        values.append(metric(image))
    return defoci, np.asarray(values), shape


def autofocus(*, center_um: float = 0.0, settings: FocusSettings = FocusSettings(),
              metric: Callable[[np.ndarray], float] | None = None,
              window: tuple[slice, slice] | None = None) -> Plan:
    """Find best focus by defocus sweeps, autocorrelation sharpness and a Gaussian fit.

    Each round takes ``settings.steps`` images evenly over ``span`` around ``center``, fits
    a Gaussian to sharpness vs defocus, then:

    - a peak at the sweep edge (the sharpest image is the first or last) shifts the sweep
      by most of a span that way;
    - a curve flatter than the sweep (fitted width > span) is taken as "far from focus":
      the next sweep is three times wider, centred on the sharpest image;
    - a curve much narrower than the steps (under-sampled) zooms in on the fitted centre;
    - otherwise the fitted centre is the answer.

    A sweep with no sharpness above the noise floor is an empty area (status ``empty``).
    Ends with the defocus set to the answer.

    Parameters
    ----------
    center_um : float
        Centre of the first sweep (the current or predicted focus).
    settings : FocusSettings
    metric : callable, optional
        ``image -> sharpness``; default :func:`~.focus.sharpness` with ``settings.radius_px``.
    window : (slice, slice), optional
        Measure sharpness on this part of each image only (where the particles are, see
        :func:`~.segments.focus_window`); the noise floor is that of the window.

    Returns
    -------
    FocusResult
        (the generator's return value: ``result = yield from autofocus(...)``)
    """
    metric = metric or (lambda image: sharpness(image, radius_px=settings.radius_px))
    center, span = float(center_um), float(settings.span_um)
    images = 0
    sweeps = []
    best_d, best_s = center, -math.inf
    for _ in range(settings.max_rounds):
        defoci, values, shape = yield from _sweep(center, span, settings.steps, metric, window)
        images += len(defoci)
        sweeps.append((tuple(defoci.tolist()), tuple(values.tolist())))
        i_max = int(np.argmax(values))
        if values[i_max] > best_s:
            best_d, best_s = float(defoci[i_max]), float(values[i_max])
        floor = noise_floor(shape)
        if values.max() < settings.empty_factor * floor and best_s < settings.empty_factor * floor:
            if len(sweeps) == 1 and values.max() > 2 * floor:
                # Faint structure, nothing sharp: widen once in case focus is far away.
                span *= 3
                continue
            yield SetDefocus(float(center_um))
            return FocusResult(float(center_um), "empty", images, sweeps=tuple(sweeps))
        step = span / (settings.steps - 1)
        fit = fit_gaussian(defoci, values)
        if i_max in (0, len(defoci) - 1):
            direction = -1 if i_max == 0 else 1
            center = float(defoci[i_max]) + direction * 0.4 * span
            continue
        if not fit.ok or fit.sigma > span:
            center = float(defoci[i_max])
            span = span * 3 if fit.ok else span
            continue
        if fit.sigma < 0.5 * step or not defoci[0] <= fit.center <= defoci[-1]:
            # Under-sampled peak: sweep again over +-3 widths of what was seen.
            center = float(fit.center) if defoci[0] <= fit.center <= defoci[-1] else best_d
            span = max(6 * max(fit.sigma, step / 4), 2 * step)
            continue
        yield SetDefocus(fit.center)
        return FocusResult(fit.center, "ok", images, fit.sigma, "sweep", tuple(sweeps))
    yield SetDefocus(best_d)
    return FocusResult(best_d, "failed", images, sweeps=tuple(sweeps))


def quick_focus(*, predicted_um: float, step_um: float, settings: FocusSettings = FocusSettings(),
                metric: Callable[[np.ndarray], float] | None = None,
                window: tuple[slice, slice] | None = None) -> Plan:
    """Check a predicted focus with three images and correct it, or fall back to a sweep.

    Images at ``predicted - step``, ``predicted``, ``predicted + step``; a Gaussian is a
    parabola in ``log(sharpness)``, so its vertex is the corrected focus. If the middle image
    is not the sharpest (focus lies outside the bracket) or the sharpness is at the noise
    floor, a full :func:`autofocus` sweep starts from the best of the three.

    Returns
    -------
    FocusResult
        ``method`` is ``"quick"`` when three images sufficed.
    """
    metric = metric or (lambda image: sharpness(image, radius_px=settings.radius_px))
    defoci, values, shape = yield from _sweep(predicted_um, 2 * step_um, 3, metric, window)
    floor = noise_floor(shape)
    i_max = int(np.argmax(values))
    if i_max == 1 and values.min() > settings.empty_factor * floor:
        vertex = parabola_vertex(defoci, np.log(values))
        if vertex is not None and abs(vertex - predicted_um) <= step_um:
            yield SetDefocus(vertex)
            return FocusResult(vertex, "ok", 3, float(step_um), "quick")
    result = yield from autofocus(center_um=float(defoci[i_max]), settings=settings, metric=metric,
                                  window=window)
    return FocusResult(result.defocus_um, result.status, result.images + 3, result.width_um,
                       "quick+sweep", result.sweeps)


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


def _inside(x_um: float, y_um: float, limits_um) -> bool:
    if limits_um is None:
        return True
    x0, y0, x1, y1 = limits_um
    return x0 <= x_um <= x1 and y0 <= y_um <= y1


def _focus_here(x_um: float, y_um: float, model: FocusModel, width_um: float | None,
                settings: FocusSettings, *, fallback_um: float = 0.0, window=None) -> Plan:
    predicted = model.predict(x_um, y_um)
    if predicted is not None and width_um:
        step = settings.quick_step_um or width_um
        result = yield from quick_focus(predicted_um=predicted, step_um=step, settings=settings,
                                        window=window)
    else:
        result = yield from autofocus(center_um=predicted if predicted is not None
                                      else fallback_um, settings=settings, window=window)
    return result


def _log_focus(result: FocusResult, x_um: float, y_um: float, model: FocusModel,
               width_um: float | None, focus_log: list) -> float | None:
    """Add a focus measurement to the model and the log; return the sharpness width to use
    for quick checks from now on."""
    focus_log.append((x_um, y_um, result.defocus_um, result.status, result.images))
    if result.status == "ok":
        model.add(x_um, y_um, result.defocus_um)
        if result.method == "sweep" and math.isfinite(result.width_um):
            return result.width_um
    return width_um


def _already_done(xy, done_um, record_field_um) -> bool:
    reach = 0.5 * min(record_field_um)
    return any(math.dist(xy, d) < reach for d in done_um)


def acquire_area(tiles: list[Tile], *, record_field_um: tuple[float, float],
                 focus: FocusSettings = FocusSettings(),
                 segments: SegmentSettings = SegmentSettings(),
                 target_defocus_um: float = 0.0, start_defocus_um: float = 0.0,
                 limits_um: tuple[float, float, float, float] | None = None,
                 done_um: Sequence[tuple[float, float]] = ()) -> Plan:
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
    resumed run never images the same particles twice.

    The survey is not trusted blindly (``segments.calibrate``, see
    :class:`~.segments.SegmentCheckCalibration`): until enough segments were compared,
    segments the survey calls empty are recorded too, and every record frame is checked for
    particles at record resolution (:func:`~.segments.record_has_particles`). A survey-empty
    segment whose record shows particles switches skipping off for the rest of the run (all
    segments are recorded and saved); a survey-empty check frame that shows nothing is not
    saved and counts as skipped. Once skipping is on, one in ``spot_check_every`` skipped
    segments is still recorded and checked the same way.

    Yields :class:`Report` with ``state``, ``tile``, ``tiles``, ``skipped_segments``,
    ``defocus_um``, ``focus`` (one ``(x_um, y_um, focus_um, status, images)`` per autofocus),
    ``segment_check`` (``calibrating``, ``on``, ``off``) and ``segment_check_note`` (one
    line saying why), and a :class:`Checkpoint` after every saved frame and at the start of
    every tile.

    Returns
    -------
    dict
        ``{"focus": [(x_um, y_um, focus_um, status, images), ...], "skipped_segments",
        "acquired_segments", "focus_images", "tiles_visited", "segment_check"}``
        (``segment_check``: :meth:`~.segments.SegmentCheckCalibration.summary`, or None).
    """
    model = FocusModel()
    width_um: float | None = None
    skipped = acquired = focus_images = visited = 0
    focus_log = []
    unfocusable: list[tuple[float, float]] = []
    calibration = segments.calibration()

    def check_fields() -> dict:
        if calibration is None:
            return {"segment_check": "on", "segment_check_note":
                    "segment check on (not calibrated: the survey is trusted)"}
        return {"segment_check": calibration.state,
                "segment_check_note": calibration.note(),
                "segment_check_counts": calibration.summary()}

    yield Report(check_fields())
    for tile in tiles:
        yield Checkpoint()
        visited += 1
        yield Report({"state": "surveying", "tile": tile.index + 1, "tiles": len(tiles)})
        yield Move(tile.x_um, tile.y_um)
        yield SetMode("survey")
        if len(model):
            yield SetDefocus(model.predict(tile.x_um, tile.y_um) + target_defocus_um)
        elif start_defocus_um is not None:
            yield SetDefocus(float(start_defocus_um))
        survey = yield Snap("survey")
        found: list[Segment] = check_segments(
            survey.image, survey.pixel_nm, segment_um=record_field_um,
            overlap=segments.overlap, threshold_sigma=segments.threshold_sigma,
            min_size_nm=segments.min_size_nm, polarity=segments.polarity)
        centre = {id(s): (survey.stage_x_um + s.dx_um, survey.stage_y_um + s.dy_um)
                  for s in found}
        eligible = [s for s in found if _inside(*centre[id(s)], limits_um)
                    and not _already_done(centre[id(s)], done_um, record_field_um)]
        # Survey-empty segments are recorded too while the check calibrates, after it was
        # switched off, and as spot checks (decided in serpentine order, one by one).
        chosen = [s for s in eligible if s.has_particles
                  or (calibration is not None and calibration.record_anyway())]
        skipped += len(found) - len(chosen)
        yield Report({"skipped_segments": skipped})
        if not chosen:
            continue
        yield SetMode("record")
        tried: set[int] = set()  # focus sites that came out empty in this tile
        for seg in chosen:
            x, y = centre[id(seg)]
            if focus.needs_focus(model, x, y):
                # Survey-occupied sites nearby first, most particles first.
                near = [s for s in chosen if id(s) not in tried and s.has_particles
                        and math.dist(centre[id(s)], (x, y)) <= min(focus.reach_um, focus.refocus_distance_um / 2)]
                for site in sorted(near, key=lambda s: -s.particles)[:2]:
                    yield Report({"state": "focusing"})
                    fx, fy = centre[id(site)]
                    yield Move(fx, fy)
                    result = yield from _focus_here(fx, fy, model, width_um, focus)
                    focus_images += result.images
                    width_um = _log_focus(result, fx, fy, model, width_um, focus_log)
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
            peaks = np.zeros((0, 2), int)
            # where focusing on a record's particles failed (too few, too faint), trying
            # again close by would fail the same way: those records keep the best guess
            if focus.needs_focus(model, x, y) and not any(
                    math.dist((x, y), p) < focus.refocus_distance_um / 2 for p in unfocusable):
                peaks = record_particle_peaks(
                    frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
                    threshold_sigma=segments.threshold_sigma, min_size_nm=segments.min_size_nm,
                    polarity=segments.polarity, margin=0.0)
            if len(peaks):
                # Focus was not known here (the survey showed nothing to focus on nearby, or
                # focusing there failed): this record, taken at the best guess, shows
                # particles, so focus on them and record again. A record that shows nothing
                # needs no focus: it is judged as it is, and no segment is ever left out for
                # want of focus.
                yield Report({"state": "focusing"})
                result = yield from _focus_here(
                    x, y, model, width_um, focus, fallback_um=best - target_defocus_um,
                    window=focus_window(frame.image.shape, peaks))
                result = dataclasses.replace(result, images=result.images + 1)  # + the probe
                focus_images += result.images
                width_um = _log_focus(result, x, y, model, width_um, focus_log)
                yield Report({"focus": focus_log[-1], "defocus_um": result.defocus_um})
                if result.status == "ok":
                    best = model.predict(x, y) + target_defocus_um
                    yield SetDefocus(best)
                    yield Report({"state": "recording", "defocus_um": best})
                    frame = yield Snap("record")
                else:  # the probe, out of focus but with particles, is kept as the record
                    unfocusable.append((x, y))
            keep = True
            if calibration is not None and calibration.state != "off":
                # Compare the survey's verdict with what the record shows.
                seen = record_has_particles(
                    frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
                    threshold_sigma=segments.threshold_sigma,
                    min_size_nm=segments.min_size_nm, polarity=segments.polarity,
                    margin=segments.overlap / 2) > 0
                calibration.add(survey_occupied=seg.has_particles, record_occupied=seen)
                # A survey-empty check frame is data if particles are anywhere in it (its
                # border band, not counted against the survey, included).
                keep = seg.has_particles or seen or record_has_particles(
                    frame.image, frame.pixel_nm, bin_px=segments.record_bin_px,
                    threshold_sigma=segments.threshold_sigma,
                    min_size_nm=segments.min_size_nm, polarity=segments.polarity,
                    margin=0.0) > 0
                yield Report(check_fields())
            if not keep:
                skipped += 1
                yield Report({"skipped_segments": skipped})
                continue
            yield Save(frame, tile.index, (seg.row, seg.col))
            acquired += 1
            yield Checkpoint()
    return {"focus": focus_log, "skipped_segments": skipped, "acquired_segments": acquired,
            "focus_images": focus_images, "tiles_visited": visited,
            "segment_check": calibration.summary() if calibration is not None else None}
