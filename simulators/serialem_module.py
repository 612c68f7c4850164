"""A stand-in for SerialEM's Python module ``serialem``, driving a :class:`SimScope`.

Same function names, argument order, return shapes and exceptions as the real module (a
C socket client of SerialEM), for the subset particlewatch uses, so code written for
SerialEM runs unchanged against the simulator::

    from particlewatch.simulators import serialem_module
    serialem_module.attach(SimScope("au10", seed=0))
    sys.modules["serialem"] = serialem_module
    import serialem
    serialem.ConnectToSEM(48888, "127.0.0.1")
    serialem.Record()
    image = numpy.asarray(serialem.bufferImage("A"))

Conventions copied from SerialEM: stage in µm, defocus in µm, pixel sizes in nm; values come
back as a float or a tuple of floats; acquisitions go into buffer A and push the older
images to B, C, ...; parameter sets are ``V``iew (the survey), ``F``ocus, ``T``rial,
``R``ecord, ``P``review and ``S``earch, the last five at the record magnification here.
Errors raise :class:`SEMerror` (a failed command), :class:`SEMmoduleError` (no connection)
or :class:`SEMexited`. ``attach`` and ``detach`` are this module's own additions.
"""

from __future__ import annotations

import string

import numpy as np


class SEMerror(Exception):
    """A SerialEM script command failed (as raised by the real module)."""


class SEMmoduleError(Exception):
    """The module is not connected to SerialEM, or the connection broke."""


class SEMexited(Exception):
    """The script was stopped or ``Exit`` was called."""


#: Parameter-set letters and their indices in SerialEM (View 0, Focus 1, Trial 2, Record 3,
#: Preview 4, Search 5).
_SETS = {"V": 0, "F": 1, "T": 2, "R": 3, "P": 4, "S": 5}
_SURVEY_SETS = {"V", "S"}
_BUFFERS = string.ascii_uppercase[:20]


class _State:
    def __init__(self) -> None:
        self.scope = None
        self.connected = False
        self.buffers: list = []  # index 0 is buffer A
        self.clock_zero_s = 0.0
        self.exited = False


_state = _State()


def attach(scope) -> None:
    """Use ``scope`` (a ``SimScope``) as the microscope behind this module; resets state."""
    _state.__init__()
    _state.scope = scope


def detach() -> None:
    """Forget the attached scope; further calls raise :class:`SEMmoduleError`."""
    _state.__init__()


def _scope():
    if _state.exited:
        raise SEMexited("script exited")
    if _state.scope is None:
        raise SEMmoduleError("not connected to SerialEM (no simulated scope attached)")
    return _state.scope


def _set_letter(value) -> str:
    letter = str(value).strip().upper()[:1] if isinstance(value, str) else None
    if isinstance(value, (int, np.integer)):
        for key, idx in _SETS.items():
            if idx == int(value):
                return key
    if letter not in _SETS:
        raise SEMerror(f"invalid parameter set {value!r}; use V, F, T, R, P or S")
    return letter


def _mode_of(letter: str) -> str:
    return "survey" if letter in _SURVEY_SETS else "record"


def _buffer_index(buf) -> int:
    if buf is None:
        return 0
    if isinstance(buf, (int, np.integer)):
        idx = int(buf)
    else:
        text = str(buf).strip().upper()
        if len(text) != 1 or text not in _BUFFERS:
            raise SEMerror(f"invalid buffer {buf!r}")
        idx = _BUFFERS.index(text)
    if idx >= len(_state.buffers):
        raise SEMerror(f"there is no image in buffer {_BUFFERS[idx] if idx < 20 else idx}")
    return idx


# --- connection -------------------------------------------------------------------------

def ConnectToSEM(port: int = 48888, ip: str = "127.0.0.1") -> None:
    """Connect to SerialEM's socket; here, succeeds when a scope is attached."""
    if _state.scope is None:
        raise SEMmoduleError(f"Could not connect to SerialEM at {ip}:{port}")
    _state.connected = True


def Exit(*args) -> None:
    """End the script: every later call raises :class:`SEMexited`."""
    _state.exited = True
    raise SEMexited("Exit called")


def Echo(*args) -> None:
    """Print the arguments in the log window (here: stdout)."""
    _scope()
    print(" ".join(str(a) for a in args))


def Delay(amount: float, unit: str = "sec") -> None:
    """Wait; advances the simulated clock when the scope allows it, else does nothing."""
    scope = _scope()
    factor = {"msec": 1e-3, "ms": 1e-3, "sec": 1.0, "s": 1.0, "min": 60.0}.get(str(unit), 1.0)
    if hasattr(scope, "advance_clock"):
        scope.advance_clock(float(amount) * factor)


def ReportClock() -> float:
    """Seconds since ``ResetClock`` (simulated instrument time)."""
    return float(_scope().clock_s) - _state.clock_zero_s


def ResetClock() -> None:
    """Start the script clock from zero."""
    _state.clock_zero_s = float(_scope().clock_s)


# --- stage --------------------------------------------------------------------------------

def _move(x: float, y: float) -> None:
    scope = _scope()
    x0, y0, x1, y1 = scope.stage_limits_um
    if not (x0 <= x <= x1 and y0 <= y <= y1):
        raise SEMerror(f"Stage move to {x:.3f}, {y:.3f} is outside the stage limits")
    try:
        scope.move_stage(float(x), float(y))
    except ValueError as exc:
        raise SEMerror(str(exc)) from None


def MoveStageTo(x: float, y: float, z: float | None = None) -> None:
    """Move the stage to ``(x, y)`` µm; ``z`` is accepted and must be 0 (no height axis)."""
    if z is not None and abs(float(z)) > 1e-9:
        raise SEMerror("the simulated stage has no Z axis")
    _move(float(x), float(y))


def MoveStage(dx: float, dy: float, dz: float | None = None) -> None:
    """Move the stage by ``(dx, dy)`` µm."""
    x, y = _scope().stage_position()[:2]
    MoveStageTo(x + float(dx), y + float(dy), dz)


def ReportStageXYZ() -> tuple[float, float, float]:
    """The stage position ``(x, y, z)`` in µm."""
    x, y = _scope().stage_position()[:2]
    return (float(x), float(y), 0.0)


# --- focus --------------------------------------------------------------------------------

def SetDefocus(value: float) -> None:
    """Set the defocus (µm, relative to the eucentric standard focus)."""
    _scope().set_defocus(float(value))


def ChangeFocus(delta: float) -> None:
    """Change the defocus by ``delta`` µm."""
    scope = _scope()
    scope.set_defocus(float(scope.defocus()) + float(delta))


def ReportDefocus() -> float:
    """The defocus in µm."""
    return float(_scope().defocus())


# --- acquisition --------------------------------------------------------------------------

def _acquire(letter: str) -> None:
    scope = _scope()
    scope.set_mode(_mode_of(letter))
    snap = scope.snap()
    _state.buffers.insert(0, (snap, letter))
    del _state.buffers[len(_BUFFERS):]


def Record() -> None:
    """Acquire with the Record parameters into buffer A."""
    _acquire("R")


def View() -> None:
    """Acquire with the View parameters (low magnification survey) into buffer A."""
    _acquire("V")


def Search() -> None:
    """Acquire with the Search parameters (as View here) into buffer A."""
    _acquire("S")


def Trial() -> None:
    """Acquire with the Trial parameters into buffer A."""
    _acquire("T")


def Focus() -> None:
    """Acquire with the Focus parameters into buffer A."""
    _acquire("F")


def Preview() -> None:
    """Acquire with the Preview parameters into buffer A."""
    _acquire("P")


def bufferImage(buf="A"):
    """The image in a buffer as a read-only buffer-protocol object (``numpy.asarray`` it)."""
    snap, _ = _state.buffers[_buffer_index(buf)]
    view = memoryview(np.ascontiguousarray(snap.image))
    return view.toreadonly()


def ImageProperties(buf="A") -> tuple:
    """``(sizeX, sizeY, binning, exposure_s, pixel_nm, parameterSetIndex)`` of a buffer."""
    _scope()
    snap, letter = _state.buffers[_buffer_index(buf)]
    rows, cols = np.shape(snap.image)
    return (float(cols), float(rows), 1.0, float(snap.exposure_s), float(snap.pixel_nm),
            float(_SETS[letter]))


def ReportMeanCounts(buf="A") -> float:
    """Mean of the image in a buffer."""
    snap, _ = _state.buffers[_buffer_index(buf)]
    return float(np.mean(snap.image))


def ReportCurrentPixelSize(param_set="R") -> float:
    """Pixel size in nm of a parameter set at its magnification (binning included)."""
    return float(_scope().pixel_nm(_mode_of(_set_letter(param_set))))


def ReportBinning(param_set="R") -> float:
    """Binning of a parameter set (always 1 here)."""
    _set_letter(param_set)
    _scope()
    return 1.0


def CameraProperties(camera=None, mag_index=None) -> tuple:
    """``(sizeX, sizeY, rotationFlip, physicalPixel_um, pixel_nm, cameraNumber)``.

    The pixel size is the Record set's; the camera is square as in the simulator.
    """
    scope = _scope()
    pixel_nm = float(scope.pixel_nm("record"))
    fov = scope.field_of_view_um("record")
    width_um = float(fov if np.ndim(fov) == 0 else fov[0])
    height_um = float(fov if np.ndim(fov) == 0 else fov[1])
    size_x = float(round(width_um * 1000.0 / pixel_nm))
    size_y = float(round(height_um * 1000.0 / pixel_nm))
    return (size_x, size_y, 0.0, 5.0, pixel_nm, 0.0)


def ReportMag() -> tuple:
    """``(magnification, isEFTEMorSTEMflag)`` of the last acquisition's magnification."""
    scope = _scope()
    if _state.buffers:
        snap, _ = _state.buffers[0]
        return (float(snap.magnification), 0.0)
    mag = getattr(scope, "magnification", None)
    mag = mag() if callable(mag) else mag
    if mag is None:
        raise SEMerror("no magnification known before the first image")
    return (float(mag), 0.0)


def SaveToOtherFile(buf: str, file_type: str, compression: str, path: str) -> None:
    """Save a buffer to ``path`` as a single-image file (``MRC`` only here), with .mdoc."""
    from ..frames import write_frame

    if str(file_type).upper() != "MRC":
        raise SEMerror(f"file type {file_type!r} is not supported by the simulator; use MRC")
    if str(compression).upper() not in ("NONE", "0", ""):
        raise SEMerror(f"compression {compression!r} is not supported by the simulator")
    snap, _ = _state.buffers[_buffer_index(buf)]
    write_frame(path, np.asarray(snap.image), pixel_nm=float(snap.pixel_nm), section={
        "StagePosition": (float(snap.stage_x_um), float(snap.stage_y_um)),
        "Defocus": float(snap.defocus_um),
        "Magnification": int(round(float(snap.magnification))),
        "ExposureTime": float(snap.exposure_s)})

