"""Microscope backends: the simulated scope and SerialEM (through its ``serialem`` module).

Both satisfy :class:`~.protocol.Microscope`. The SerialEM backend uses only SerialEM's own
Python functions (``MoveStageTo``, ``ReportStageXYZ``, ``SetDefocus``, ``ReportDefocus``,
``Record``, ``View``, ``bufferImage``, ``ImageProperties``, ``ReportCurrentPixelSize``,
``CameraProperties``, ``ReportMag``, ``ReportClock``), so it runs unchanged against
``particlewatch.simulators.serialem_module`` installed as ``serialem``.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np

from .protocol import Frame, MicroscopeError, validate_mode


def _pair(value) -> tuple[float, float]:
    """A field of view given as one number (square) or a pair, as ``(width, height)``."""
    if np.ndim(value) == 0:
        return (float(value), float(value))
    w, h = value
    return (float(w), float(h))


class SimulatedMicroscope:
    """A :class:`~.protocol.Microscope` over a :class:`particlewatch.simulators.scope.SimScope`.

    Parameters
    ----------
    scope : SimScope
        The simulated instrument; its clock counts stage travel, exposures and readouts.
    """

    def __init__(self, scope) -> None:
        self.scope = scope

    @classmethod
    def create(cls, sample: str = "au10", *, seed: int = 0, **options) -> "SimulatedMicroscope":
        """Build the simulated scope for ``sample`` and ``seed`` and wrap it."""
        from ..simulators.scope import SimScope

        return cls(SimScope(sample, seed=seed, **options))

    @property
    def stage_limits_um(self) -> tuple[float, float, float, float]:
        return tuple(float(v) for v in self.scope.stage_limits_um)

    def move_stage(self, x_um: float, y_um: float) -> None:
        try:
            self.scope.move_stage(float(x_um), float(y_um))
        except ValueError as exc:
            raise MicroscopeError(f"cannot move stage to ({x_um:.2f}, {y_um:.2f}) µm: {exc}") from exc

    def stage_position(self) -> tuple[float, float]:
        x, y = self.scope.stage_position()[:2]
        return (float(x), float(y))

    def set_defocus(self, defocus_um: float) -> None:
        self.scope.set_defocus(float(defocus_um))

    def defocus(self) -> float:
        return float(self.scope.defocus())

    def set_mode(self, mode: str) -> None:
        self.scope.set_mode(validate_mode(mode))

    def acquire(self) -> Frame:
        snap = self.scope.snap()
        return Frame(image=np.asarray(snap.image), pixel_nm=float(snap.pixel_nm),
                     mode=str(snap.mode), stage_x_um=float(snap.stage_x_um),
                     stage_y_um=float(snap.stage_y_um), defocus_um=float(snap.defocus_um),
                     magnification=float(snap.magnification),
                     exposure_s=float(snap.exposure_s),
                     # only record frames are saved; a survey's truth would be computed
                     # for nothing (it is lazy and costs most on the wide survey field)
                     truth=snap.truth if snap.mode == "record" else None)

    def pixel_nm(self, mode: str | None = None) -> float:
        return float(self.scope.pixel_nm(mode))

    def field_of_view_um(self, mode: str | None = None) -> tuple[float, float]:
        return _pair(self.scope.field_of_view_um(mode))

    @property
    def clock_s(self) -> float:
        return float(self.scope.clock_s)

    @property
    def detector(self) -> str:
        """The simulated detector (``"bf"`` or ``"haadf"``): it sets the particles' contrast."""
        return str(self.scope.detector)


#: SerialEM parameter sets used for the two modes: View for the survey, Record for frames.
_PARAMETER_SETS = {"survey": "V", "record": "R"}


class SerialEMMicroscope:
    """A :class:`~.protocol.Microscope` driving SerialEM through its ``serialem`` module.

    Parameters
    ----------
    sem : module, optional
        The ``serialem`` module (imported if not given).
    connect : bool
        Call ``ConnectToSEM(port, ip)`` first, as an external Python process must.
    ip, port : str, int
        SerialEM's socket (its default port is 48888).
    stage_limits_um : 4 floats
        Stage limits to respect; SerialEM has no call that reports them.
    detector : {"bf", "haadf"} or None
        The imaging detector, when the user names it (``detector`` attribute; it sets the
        particles' contrast for the segment check); None: the acquisition learns the
        contrast from its first records.

    Raises
    ------
    MicroscopeError
        If the module cannot be imported or the connection fails (a one-line reason).
    """

    def __init__(self, sem=None, *, connect: bool = False, ip: str = "127.0.0.1",
                 port: int = 48888,
                 stage_limits_um: tuple[float, float, float, float] = (-990.0, -990.0, 990.0, 990.0),
                 detector: str | None = None) -> None:
        if sem is None:
            try:
                sem = importlib.import_module("serialem")
            except ImportError as exc:
                raise MicroscopeError(
                    "cannot import SerialEM's Python module 'serialem' (install it from "
                    "SerialEM's PythonModules folder or run inside SerialEM): "
                    f"{exc}") from None
        self.sem = sem
        self._errors = tuple(getattr(sem, name) for name in
                             ("SEMerror", "SEMmoduleError", "SEMexited") if hasattr(sem, name))
        self._limits = tuple(float(v) for v in stage_limits_um)
        self.detector = detector
        self._mode = "record"
        if connect:
            try:
                sem.ConnectToSEM(int(port), str(ip))
            except self._errors + (OSError,) as exc:
                raise MicroscopeError(f"cannot connect to SerialEM at {ip}:{port}: {exc}") from None

    def _call(self, name: str, *args) -> Any:
        try:
            return getattr(self.sem, name)(*args)
        except self._errors as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MicroscopeError(f"SerialEM {name}{args}: {detail}") from exc

    @property
    def stage_limits_um(self) -> tuple[float, float, float, float]:
        return self._limits

    def move_stage(self, x_um: float, y_um: float) -> None:
        x0, y0, x1, y1 = self._limits
        if not (x0 <= x_um <= x1 and y0 <= y_um <= y1):
            raise MicroscopeError(f"stage target ({x_um:.2f}, {y_um:.2f}) µm is outside the "
                                  f"limits {self._limits}")
        self._call("MoveStageTo", float(x_um), float(y_um))

    def stage_position(self) -> tuple[float, float]:
        x, y, _ = self._call("ReportStageXYZ")
        return (float(x), float(y))

    def set_defocus(self, defocus_um: float) -> None:
        self._call("SetDefocus", float(defocus_um))

    def defocus(self) -> float:
        return float(self._call("ReportDefocus"))

    def set_mode(self, mode: str) -> None:
        # SerialEM has no mode state: the mode picks View or Record at the next acquire.
        self._mode = validate_mode(mode)

    def acquire(self) -> Frame:
        self._call("View" if self._mode == "survey" else "Record")
        image = np.array(np.asarray(self._call("bufferImage", "A")))
        size_x, size_y, binning, exposure_s, pixel_nm, _ = self._call("ImageProperties", "A")
        x, y, _ = self._call("ReportStageXYZ")
        mag = self._call("ReportMag")
        mag = mag[0] if isinstance(mag, (tuple, list)) else mag
        return Frame(image=image, pixel_nm=float(pixel_nm), mode=self._mode,
                     stage_x_um=float(x), stage_y_um=float(y),
                     defocus_um=float(self._call("ReportDefocus")),
                     magnification=float(mag), exposure_s=float(exposure_s))

    def pixel_nm(self, mode: str | None = None) -> float:
        return float(self._call("ReportCurrentPixelSize",
                                _PARAMETER_SETS[validate_mode(mode or self._mode)]))

    def field_of_view_um(self, mode: str | None = None) -> tuple[float, float]:
        # CameraProperties gives the camera size in (unbinned) pixels; the set's pixel size
        # is binned, so the field is camera pixels × pixel size / binning.
        props = self._call("CameraProperties")
        size_x, size_y = float(props[0]), float(props[1])
        pixel_nm = self.pixel_nm(mode)
        binning = float(self._call("ReportBinning",
                                   _PARAMETER_SETS[validate_mode(mode or self._mode)]))
        return (size_x / binning * pixel_nm / 1000.0, size_y / binning * pixel_nm / 1000.0)

    @property
    def clock_s(self) -> float:
        # ReportClock: seconds since SerialEM's script clock was reset.
        try:
            return float(self._call("ReportClock"))
        except (AttributeError, MicroscopeError):
            return time.monotonic()
