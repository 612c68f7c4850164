"""What a plan needs from a microscope: a small ``Protocol`` and the frame it returns.

Two backends satisfy it (:mod:`.backends`): the simulated scope and SerialEM. Plans never
talk to a backend directly; they yield commands (:mod:`.plans`) that the runner executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The two imaging modes a plan uses: low-magnification survey and high-magnification record.
MODES = ("record", "survey")


class MicroscopeError(RuntimeError):
    """A microscope command failed (stage limit, lost connection, SerialEM error)."""


@dataclass(frozen=True)
class Frame:
    """One acquired image with the metadata a saved frame needs.

    Attributes
    ----------
    image : ndarray
        2-D counts.
    pixel_nm : float
        Pixel size at the specimen in nm.
    mode : str
        ``"record"`` or ``"survey"``.
    stage_x_um, stage_y_um : float
        Stage position of the image centre in µm.
    defocus_um : float
        Defocus setting in µm when the image was taken.
    magnification : float
        Nominal magnification.
    exposure_s : float
        Exposure time in seconds.
    truth : dict or None
        Ground truth when a simulator took the image, else None. Plans never use it.
    """

    image: np.ndarray
    pixel_nm: float
    mode: str
    stage_x_um: float
    stage_y_um: float
    defocus_um: float
    magnification: float
    exposure_s: float
    truth: dict | None = field(default=None, repr=False, compare=False)

    @property
    def field_of_view_um(self) -> tuple[float, float]:
        """Width and height of the image in µm."""
        rows, cols = self.image.shape
        return (cols * self.pixel_nm / 1000.0, rows * self.pixel_nm / 1000.0)

    def mdoc_section(self) -> dict[str, Any]:
        """The ``[ZValue = 0]`` keys of this frame's ``.mdoc`` (SerialEM names and units)."""
        return {
            "StagePosition": (float(self.stage_x_um), float(self.stage_y_um)),
            "Defocus": float(self.defocus_um),
            "Magnification": int(round(self.magnification)),
            "ExposureTime": float(self.exposure_s),
        }


@runtime_checkable
class Microscope(Protocol):
    """The operations an acquisition plan needs; stage in µm, defocus in µm.

    ``acquire`` takes an image in the current mode. ``clock_s`` is the instrument's time in
    seconds (simulated time for the simulator), used for timing reports.

    Optional (not required for ``isinstance``): ``detector``, the imaging detector's kind
    (``"bf"`` bright field, ``"haadf"`` annular dark field) or None when the backend cannot
    tell; it sets the particles' contrast for the segment check (``runner.detector_polarity``).
    """

    @property
    def stage_limits_um(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` reachable stage positions."""
        ...

    def move_stage(self, x_um: float, y_um: float) -> None: ...

    def stage_position(self) -> tuple[float, float]: ...

    def set_defocus(self, defocus_um: float) -> None: ...

    def defocus(self) -> float: ...

    def set_mode(self, mode: str) -> None: ...

    def acquire(self) -> Frame: ...

    def pixel_nm(self, mode: str | None = None) -> float: ...

    def field_of_view_um(self, mode: str | None = None) -> tuple[float, float]: ...

    @property
    def clock_s(self) -> float: ...


def validate_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode
