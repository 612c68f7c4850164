"""The simulated microscope: stage, focus, two magnifications, detector, dose and clock.

Numbers chosen (and why):

* **Modes**: ``record`` at the sample's pixel size (smallest population ≈ 20 px across);
  ``survey`` at 6× that pixel and the same pixel count, so one survey frame spans 6 × 6
  record fields (the segments of the autoSTEM check). The survey gets 4× the record dose per
  pixel (a larger pixel collects more electrons at the same beam current).
* **Focus**: ``defocus`` is the objective setting in µm, 0 = eucentric focus. The film is in
  focus at :meth:`SimScope.true_focus_um`, which varies smoothly over the grid (see
  :mod:`.specimen`). Blur is Gaussian with
  ``σ_px = sqrt(σ0² + (α·|defocus − true focus| / pixel)²)``, σ0 = 0.6 px (detector and
  optics), and α set so that at ``depth_of_field_um`` = 0.03 µm off focus the defocus term is
  σ0/2 in the record mode (σ grows by only 12%: "essentially in focus"). At 0.2 µm off, σ is
  ~2.4 px; at 1 µm, ~12 px. α is a convergence angle, the same in both modes, so the survey
  (larger pixels) blurs fewer pixels.
* **Time**: stage travel at 20 µm/s plus 1.5 s settling after any move; 0.1 s per defocus
  change; 1 s to switch modes; exposure 1 s (record) or 0.5 s (survey); readout 0.05 s per
  megapixel. Everything adds up in :attr:`SimScope.clock_s`; nothing sleeps.
* **Illumination**: a linear gradient of up to ±6% across the field in a direction fixed per
  seed, and 4% vignetting at the corners.
* **Film**: a carbon film mottle of 1.5% (bright-field transmission) or 10% (HAADF film signal),
  correlated over ~40 nm, fixed to the stage position so a revisited spot looks the same.
* **Magnification**: a 15 µm camera pixel, ``magnification = 15 000 nm / pixel_nm``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import render
from .samples import MATERIALS, MATERIAL_NAMES, SampleSpec
from .specimen import Specimen, take
from .truth import frame_truth, visible

MODES = ("record", "survey")
DETECTORS = ("bf", "haadf")
SURVEY_FACTOR = 6
SURVEY_DOSE_FACTOR = 4.0
DEPTH_OF_FIELD_UM = 0.03
SIGMA0_PX = 0.6
STAGE_SPEED_UM_S = 20.0
STAGE_SETTLE_S = 1.5
DEFOCUS_CHANGE_S = 0.1
MODE_SWITCH_S = 1.0
EXPOSURE_S = {"record": 1.0, "survey": 0.5}
READOUT_S_PER_MPX = 0.05
CAMERA_PIXEL_NM = 15_000.0
_HAADF_FILM = 0.1
_FILM_AMPLITUDE = {"bf": 0.015, "haadf": 0.10}
_FILM_CORRELATION_NM = 40.0
_SUPERSAMPLE = {"record": 3, "survey": 2}


@dataclass
class SimImage:
    """One simulated exposure.

    Attributes
    ----------
    image : ndarray, uint16, 2-D
        Detector counts.
    pixel_nm : float
    mode : str
    stage_x_um, stage_y_um : float
        Stage position at the frame's centre.
    defocus_um : float
        Objective defocus setting when the frame was taken.
    magnification : float
    exposure_s : float
    truth : dict
        Ground truth in INTERFACE.md's truth-file format. It is computed on first access
        (from ``truth_source``, a dict or a function returning one), so survey frames of
        tens of thousands of particles cost nothing extra when only the image is used.
    """

    image: np.ndarray
    pixel_nm: float
    mode: str
    stage_x_um: float
    stage_y_um: float
    defocus_um: float
    magnification: float
    exposure_s: float
    truth_source: dict | Callable[[], dict] = field(repr=False, compare=False)

    @functools.cached_property
    def truth(self) -> dict:
        """The frame's ground truth (see the class docstring)."""
        source = self.truth_source
        return source() if callable(source) else source

    def mdoc_section(self) -> dict:
        """Keys of the frame's ``.mdoc`` ``[ZValue = 0]`` section, as SerialEM writes them."""
        return {
            "StagePosition": (self.stage_x_um, self.stage_y_um),
            "StageZ": 0.0,
            "Magnification": int(round(self.magnification)),
            "Defocus": self.defocus_um,
            "ExposureTime": self.exposure_s,
            "Binning": 1,
        }


class SimScope:
    """A simulated electron microscope over a :class:`~.specimen.Specimen`.

    Parameters
    ----------
    sample : str or SampleSpec
        The specimen's sample (see :data:`~.samples.SAMPLES`).
    seed : int
        Seeds the specimen, the film and the noise: the same calls give the same frames.
    detector : {"bf", "haadf"}, optional
        Default: the sample's usual detector.
    dose : float, optional
        Electrons per pixel in record mode; default: the sample's for the detector.
    size_px : int
        Frame width and height in pixels.
    record_pixel_nm : float, optional
        Record-mode pixel size; default: the sample's.

    Examples
    --------
    >>> scope = SimScope("au10", seed=1, size_px=256)
    >>> scope.move_stage(1.0, 2.0)
    >>> scope.set_defocus(scope.true_focus_um())
    >>> frame = scope.snap()
    >>> frame.image.shape, frame.image.dtype
    ((256, 256), dtype('uint16'))
    """

    def __init__(self, sample: str | SampleSpec = "au10", *, seed: int = 0,
                 detector: str | None = None, dose: float | None = None,
                 size_px: int = 2048, record_pixel_nm: float | None = None):
        self.specimen = Specimen(sample, seed=seed)
        self.sample: SampleSpec = self.specimen.sample
        self.seed = int(seed)
        self.detector = detector or self.sample.detector
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        self.dose = float(dose if dose is not None else self.sample.dose[self.detector])
        if not self.dose > 0:
            raise ValueError(f"dose must be > 0 electrons per pixel, got {dose!r}")
        self.size_px = int(size_px)
        if self.size_px < 8:
            raise ValueError(f"size_px must be >= 8, got {size_px!r}")
        self._record_pixel_nm = float(record_pixel_nm or self.sample.pixel_nm)
        if not self._record_pixel_nm > 0:
            raise ValueError(f"record_pixel_nm must be > 0, got {record_pixel_nm!r}")
        self.depth_of_field_um = DEPTH_OF_FIELD_UM
        # convergence angle (rad): the defocus blur is σ0/2 px at the depth of field
        self._alpha = SIGMA0_PX * self._record_pixel_nm / (2.0 * DEPTH_OF_FIELD_UM * 1000.0)
        beam = np.random.default_rng([self.seed, 5])
        self._gradient = tuple(beam.uniform(-0.06, 0.06, 2))
        self._x_um, self._y_um = 0.0, 0.0
        self._defocus_um = 0.0
        self._mode = "record"
        self._snaps = 0
        self.clock_s = 0.0

    # ---- stage -----------------------------------------------------------------------
    @property
    def stage_limits_um(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the stage in µm (the grid square)."""
        return tuple(self.specimen.extent_um)

    def move_stage(self, x_um: float, y_um: float) -> None:
        """Move the stage to ``(x_um, y_um)``; costs travel and settling time.

        Raises
        ------
        ValueError
            When the position lies outside :attr:`stage_limits_um`.
        """
        x_um, y_um = float(x_um), float(y_um)
        x0, y0, x1, y1 = self.stage_limits_um
        if not (x0 <= x_um <= x1 and y0 <= y_um <= y1):
            raise ValueError(f"stage position ({x_um:g}, {y_um:g}) µm is outside the limits "
                             f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g} µm")
        distance = float(np.hypot(x_um - self._x_um, y_um - self._y_um))
        if distance > 0:
            self.clock_s += distance / STAGE_SPEED_UM_S + STAGE_SETTLE_S
        self._x_um, self._y_um = x_um, y_um

    def stage_position(self) -> tuple[float, float]:
        """The current stage position ``(x_um, y_um)``."""
        return self._x_um, self._y_um

    # ---- focus -----------------------------------------------------------------------
    def set_defocus(self, um: float) -> None:
        """Set the objective defocus in µm (0 = eucentric focus)."""
        um = float(um)
        if not np.isfinite(um):
            raise ValueError(f"defocus must be a finite number of µm, got {um!r}")
        if um != self._defocus_um:
            self.clock_s += DEFOCUS_CHANGE_S
        self._defocus_um = um

    def defocus(self) -> float:
        """The objective defocus setting in µm."""
        return self._defocus_um

    def true_focus_um(self, x_um: float | None = None, y_um: float | None = None) -> float:
        """Defocus at which the film is sharp, at ``(x_um, y_um)`` or the stage position."""
        x = self._x_um if x_um is None else x_um
        y = self._y_um if y_um is None else y_um
        return float(self.specimen.true_focus_um(x, y))

    def blur_sigma_px(self, mode: str | None = None) -> float:
        """Gaussian blur (px) an image taken now in ``mode`` would have."""
        pix = self.pixel_nm(mode)
        error_nm = abs(self._defocus_um - self.true_focus_um()) * 1000.0
        return float(np.hypot(SIGMA0_PX, self._alpha * error_nm / pix))

    # ---- magnification ---------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"record"`` (analysis frames) or ``"survey"`` (low magnification)."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch between ``"record"`` and ``"survey"``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != self._mode:
            self.clock_s += MODE_SWITCH_S
        self._mode = mode

    def pixel_nm(self, mode: str | None = None) -> float:
        """Pixel size (nm) of ``mode`` (default: the current mode)."""
        mode = mode or self._mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        factor = SURVEY_FACTOR if mode == "survey" else 1
        return self._record_pixel_nm * factor

    def field_of_view_um(self, mode: str | None = None) -> float:
        """Width (= height) of a frame in µm in ``mode``."""
        return self.pixel_nm(mode) * self.size_px / 1000.0

    def magnification(self, mode: str | None = None) -> float:
        """Nominal magnification of ``mode`` (a 15 µm camera pixel)."""
        return CAMERA_PIXEL_NM / self.pixel_nm(mode)

    # ---- imaging ---------------------------------------------------------------------
    def snap(self, *, noise: bool = True) -> SimImage:
        """Expose one frame in the current mode at the current stage position and focus.

        Parameters
        ----------
        noise : bool
            False gives the expected counts (float32, no shot noise) for checks.

        Returns
        -------
        SimImage
        """
        mode = self._mode
        pix = self.pixel_nm(mode)
        geom = render.FrameGeometry(self._x_um * 1000.0, self._y_um * 1000.0, pix,
                                    self.size_px, self.size_px)
        table = self.specimen.particles_in(*geom.bounds_nm())
        table = take(table, visible(table, geom))
        dose = self.dose * (SURVEY_DOSE_FACTOR if mode == "survey" else 1.0)
        sigma = self.blur_sigma_px(mode)
        mean = self._expected_counts(table, geom, dose=dose, sigma_px=sigma,
                                     supersample=_SUPERSAMPLE[mode])
        self._snaps += 1
        if noise:
            rng = np.random.default_rng([self.seed, 13, self._snaps])
            image = render.shot_noise(mean, rng=rng)
        else:
            image = mean
        exposure = EXPOSURE_S[mode]
        self.clock_s += exposure + READOUT_S_PER_MPX * self.size_px ** 2 / 1e6
        truth = functools.partial(
            frame_truth, table, geom, sample=self.sample.name, detector=self.detector,
            dose=dose, defocus_um=self._defocus_um,
            extra={"mode": mode, "true_focus_um": self.true_focus_um(),
                   "blur_sigma_px": round(sigma, 4), "seed": self.seed})
        return SimImage(image=image, pixel_nm=pix, mode=mode, stage_x_um=self._x_um,
                        stage_y_um=self._y_um, defocus_um=self._defocus_um,
                        magnification=self.magnification(mode), exposure_s=exposure,
                        truth_source=truth)

    def _expected_counts(self, table, geom, *, dose, sigma_px, supersample):
        """Noise-free counts: particles' projected thickness through the detector model."""
        shape = (geom.height, geom.width)
        material = [MATERIAL_NAMES[m] for m in table["material"]]
        tex_rng = np.random.default_rng([self.seed, 3, MODES.index(self._mode),
                                         int(round(geom.center_x_nm)) + (1 << 40),
                                         int(round(geom.center_y_nm)) + (1 << 40)])
        film, step = render.coarse_noise(shape, rng=tex_rng,
                                         correlation_px=_FILM_CORRELATION_NM / geom.pixel_nm)
        film *= _FILM_AMPLITUDE[self.detector]
        # beam and film are smooth: build them on the coarse nodes, interpolate once
        beam = dose * render.illumination(
            render.node_coordinates(film.shape[1], step)[None, :],
            render.node_coordinates(film.shape[0], step)[:, None], shape,
            gradient=self._gradient, vignette=0.04)
        has_particles = len(table["x_nm"]) > 0
        if self.detector == "bf":
            background = render.upsample(beam * np.exp(-film), shape, step)
            if not has_particles:
                return background
            weights = np.array([1.0 / MATERIALS[m]["bf_mfp_nm"] for m in material])
            absorbance = render.project(table, geom, weights=weights,
                                        supersample=supersample)
            # blur the particles' shadow (what the optics spreads), not the flat background
            shadow = render.blur(-np.expm1(-absorbance), sigma_px)
            np.subtract(1.0, shadow, out=shadow)
            shadow *= background
            return shadow
        background = render.upsample(beam * _HAADF_FILM * (1.0 + film), shape, step)
        if not has_particles:
            return background
        # the beam hardly changes across one particle: take it at each particle's centre
        x_px, y_px = geom.to_px(table["x_nm"], table["y_nm"])
        weights = np.array([MATERIALS[m]["haadf_per_nm"] for m in material]) * dose * (
            render.illumination(x_px, y_px, shape, gradient=self._gradient, vignette=0.04))
        signal = render.blur(render.project(table, geom, weights=weights,
                                            supersample=supersample), sigma_px)
        signal += background
        return signal
