"""The runner: executes plans against a microscope, saves frames, stops on request.

``run_acquisition`` is the whole acquisition controller in-process: it tiles the area,
runs :func:`~.plans.acquire_area`, writes every frame atomically (``frame_00001.mrc`` + its
``.mdoc``, numbering on after frames already in the folder) on a writer thread so saving is
off the critical path, checks for a stop request after every frame, reports its state
through a callback, and leaves the acquisition's description (``acquisition.json``) and a
SerialEM navigator of the acquired positions (``positions.nav``) next to the data.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..frames import write_frame
from .navigator import NavPosition, read_navigator, write_navigator
from .plans import (AreaProgress, Checkpoint, FocusSettings, Move, Plan, Report, Save,
                    SegmentSettings, SetDefocus, SetMode, Snap, acquire_area)
from .protocol import Frame, Microscope
from .stopping import StopConditions
from .tiling import Tile, serpentine

log = logging.getLogger("particlewatch.acquisition")

FRAME_PATTERN = re.compile(r"^frame_(\d{5,})\.mrc$")
NAV_NAME = "positions.nav"


def next_frame_number(folder: str | os.PathLike) -> int:
    """The number after the highest ``frame_NNNNN.mrc`` in ``folder`` (1 if none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 1
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := FRAME_PATTERN.match(p.name))]
    return max(numbers, default=0) + 1


def frame_name(number: int) -> str:
    """``frame_00001.mrc`` for 1."""
    return f"frame_{number:05d}.mrc"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


class FrameWriter:
    """Writes frames on a background thread (or inline), in submission order.

    Parameters
    ----------
    folder : path-like
    threaded : bool
        False writes in the caller's thread (simpler to debug, slower acquisition).

    Notes
    -----
    An error in the writer thread is raised by the next :meth:`submit` or by :meth:`close`,
    so a full disk stops the acquisition instead of being lost.
    """

    def __init__(self, folder: str | os.PathLike, *, threaded: bool = True,
                 max_queue: int = 8) -> None:
        self.folder = Path(folder)
        self.written: list[Path] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread = None
        if threaded:
            # Bounded so a slow disk throttles acquisition instead of filling memory.
            self._queue = queue.Queue(maxsize=max_queue)
            self._thread = threading.Thread(target=self._work, name="frame-writer", daemon=True)
            self._thread.start()

    def _write(self, path: Path, frame: Frame) -> None:
        write_frame(path, frame.image, pixel_nm=frame.pixel_nm, section=frame.mdoc_section())
        if frame.truth is not None:
            _write_json_atomic(path.parent / "truth" / (path.stem + ".json"), frame.truth)
        self.written.append(path)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write(*item)
            except BaseException as exc:  # kept and re-raised in the acquiring thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, path: Path, frame: Frame) -> None:
        """Queue ``frame`` for writing to ``path`` (written at once when not threaded)."""
        self._raise_pending()
        if self._queue is None:
            self._write(path, frame)
        else:
            self._queue.put((path, frame))

    def close(self) -> None:
        """Wait for every queued frame to be written; raise a writer error if one happened."""
        if self._queue is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_pending()


@dataclass(frozen=True)
class AcquisitionDescription:
    """What was asked for and how: saved as ``acquisition.json`` next to the frames."""

    area_um: tuple[float, float, float, float]
    backend: str
    sample: str | None
    seed: int | None
    overlap: float
    target_defocus_um: float
    max_frames: int | None
    time_limit_s: float | None
    stop_on: str | None
    focus: FocusSettings
    segments: SegmentSettings
    record_pixel_nm: float
    survey_pixel_nm: float
    record_field_um: tuple[float, float]
    survey_field_um: tuple[float, float]
    tile_step_um: tuple[float, float]
    tiles: int
    first_frame: str
    started: str
    schema_version: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AcquisitionReport:
    """Outcome of :func:`run_acquisition`.

    ``instrument_s`` is the microscope's clock over the run (simulated time for the
    simulator); ``stop_reason`` is ``finished``, ``max_frames``, ``time_limit``,
    ``stop_requested``, ``interrupted`` or ``converged``. ``segment_check`` is what the
    segment check learnt about itself (:meth:`~.segments.SegmentCheckCalibration.summary`,
    also in ``acquisition.json``; None when it was not calibrated). ``progress`` is what
    the run did (:class:`~.plans.AreaProgress`): pass it to the next ``run_acquisition`` on
    the same area (a session's next round) to go on where this one stopped.
    """

    out_dir: Path
    frames: tuple[Path, ...]
    tiles: int
    tiles_visited: int
    skipped_segments: int
    focus_images: int
    survey_images: int
    instrument_s: float
    wall_s: float
    stop_reason: str
    nav_path: Path | None
    description_path: Path
    focus_log: tuple = field(default=(), repr=False)
    segment_check: dict | None = None
    progress: AreaProgress | None = field(default=None, repr=False)

    @property
    def frames_saved(self) -> int:
        return len(self.frames)

    @property
    def seconds_per_frame(self) -> float:
        """Instrument seconds per saved frame (nan before the first frame)."""
        return self.instrument_s / self.frames_saved if self.frames_saved else math.nan

    @property
    def focus_images_per_frame(self) -> float:
        return self.focus_images / self.frames_saved if self.frames_saved else math.nan


STATE_FIELDS = ("state", "stage_x_um", "stage_y_um", "defocus_um", "tile", "tiles",
                "skipped_segments", "frames_saved", "focus_images", "segment_check",
                "segment_check_note")


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    path = folder / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = folder / f"{stem}_{n}{suffix}"
        n += 1
    return path


#: What must match for an earlier run's ``acquisition.json`` to describe the same tiles.
_SAME_PLAN = ("area_um", "overlap", "record_field_um", "tile_step_um", "tiles", "segments",
              "sample", "seed", "backend")


def earlier_progress(folder: Path, description: Mapping,
                     segments: SegmentSettings) -> AreaProgress | None:
    """What the latest earlier run on the same area and tiles left in ``folder``
    (its ``acquisition*.json``'s ``progress``), or None.

    Each run starts from the one before it, so the latest holds everything done so far.
    A run with other tiles or segment settings describes other segments: not taken.
    """
    best = None
    for path in folder.glob("acquisition*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged description is no evidence of work done
        if "progress" not in data or any(
                json.loads(json.dumps(description[k], default=_json_default)) != data.get(k)
                for k in _SAME_PLAN):
            continue
        key = (str(data.get("started", "")), path.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, data["progress"])
    return AreaProgress.from_dict(best[1], segments) if best is not None else None


#: Particles' contrast by detector: they add material, so they take electrons out of a
#: bright-field image and scatter more into an annular dark-field one.
_DETECTOR_POLARITY = {"bf": "dark", "tem": "dark", "haadf": "bright", "adf": "bright",
                      "df": "bright"}


def detector_polarity(scope, segments: SegmentSettings) -> SegmentSettings:
    """``segments`` with the particles' contrast set from the microscope's detector where the
    backend says which it is (the optional ``detector`` attribute of
    :class:`~.protocol.Microscope`: ``"bf"``, ``"haadf"``, ...) and the settings leave it to
    ``"auto"``; unchanged otherwise (the plan then learns the contrast from its records).

    Why: with the contrast unknown the record check looks on both sides of the background,
    and on bare film (nothing to learn the contrast from) the film's mottle of the wrong sign
    raised alarms that turned skipping off: empty sample, 512 px, seed 0, skip 35/17% (bright
    field, sparse/medium areas) and 36/51% (HAADF) with ``"auto"``, 99.7/99.1% and 99.7/99.4%
    with the detector's contrast."""
    detector = getattr(scope, "detector", None)
    polarity = _DETECTOR_POLARITY.get(str(detector).lower()) if detector else None
    if segments.polarity != "auto" or polarity is None:
        return segments
    return dataclasses.replace(segments, polarity=polarity)


def plan_tiles(scope: Microscope, area_um, *, overlap: float = 0.1
               ) -> tuple[list[Tile], tuple[float, float], tuple[float, float]]:
    """Serpentine survey positions for an area, spaced so record segments tile it evenly.

    A survey field holds ``n`` record segments per axis spaced by ``record × (1 −
    overlap)``; survey positions are ``n`` segment steps apart so the segments of
    neighbouring tiles continue the same grid.

    Returns
    -------
    tiles, record_field_um, tile_step_um
    """
    record = scope.field_of_view_um("record")
    survey = scope.field_of_view_um("survey")
    step, covered = [], []
    for rec, sur in zip(record, survey):
        seg_step = rec * (1 - overlap)
        n = 1 if sur <= rec else int(math.floor((sur - rec) / seg_step + 1e-9)) + 1
        step.append(n * seg_step)
        covered.append((n - 1) * seg_step + rec)
    tiles = serpentine(area_um, field_um=tuple(covered), step_um=tuple(step),
                       limits_um=scope.stage_limits_um)
    return tiles, tuple(record), tuple(step)


def run_plan(plan: Plan, scope: Microscope, *,
             handle: Callable[[Any], tuple[bool, Any]] | None = None) -> Any:
    """Execute a plan's commands on ``scope`` and return the plan's return value.

    ``handle(command) -> (handled, result)`` may take over any command (the acquisition
    runner handles :class:`Save`, :class:`Report` and :class:`Checkpoint`); a handler that
    raises :class:`StopPlan` closes the plan cleanly and ``run_plan`` returns None.
    """
    result = None
    try:
        while True:
            command = plan.send(result)
            if handle is not None:
                handled, result = handle(command)
                if handled:
                    continue
            result = execute(scope, command)
    except StopIteration as done:
        return done.value
    except StopPlan:
        plan.close()
        return None


class StopPlan(Exception):
    """Raised by a command handler to end a plan at a checkpoint."""


def execute(scope: Microscope, command) -> Any:
    """Carry out one plan command on the microscope; return what the plan gets back."""
    match command:
        case Move(x_um=x, y_um=y):
            scope.move_stage(x, y)
            return None
        case SetDefocus(defocus_um=d):
            scope.set_defocus(d)
            return None
        case SetMode(mode=m):
            scope.set_mode(m)
            return None
        case Snap():
            return scope.acquire()
        case Save() | Report() | Checkpoint():
            return None  # bookkeeping: nothing for the microscope to do
        case _:
            raise TypeError(f"unknown plan command {command!r}")


def run_acquisition(scope: Microscope, out_dir: str | os.PathLike, *, area_um,
                    overlap: float = 0.1, max_frames: int | None = None,
                    time_limit_s: float | None = None, stop=None, stop_on: str | None = None,
                    on_state: Callable[[dict], None] | None = None,
                    focus: FocusSettings = FocusSettings(),
                    segments: SegmentSettings = SegmentSettings(),
                    target_defocus_um: float = 0.0, threaded_writer: bool = True,
                    handle_sigint: bool = True, throttle: Callable[[], None] | None = None,
                    backend: str | None = None,
                    sample: str | None = None, seed: int | None = None,
                    progress: AreaProgress | None = None) -> AcquisitionReport:
    """Acquire frames over a stage area until it is covered or a stop is requested.

    Parameters
    ----------
    scope : Microscope
        A backend (simulated or SerialEM).
    out_dir : path-like
        Folder for ``frame_NNNNN.mrc`` (+ ``.mdoc``), ``acquisition.json``,
        ``positions.nav``, and, for the simulator, ``truth/frame_NNNNN.json``. Frames already
        there are kept and numbering continues after them.
    area_um : 4 floats
        Corners ``(x0, y0, x1, y1)`` of the stage area in µm.
    overlap : float
        Fractional overlap of neighbouring record fields.
    max_frames, time_limit_s, stop, stop_on, handle_sigint
        Stop conditions (see :class:`~.stopping.StopConditions`); checked after every frame
        and before every tile, so a stop always leaves complete frames.
    on_state : callable, optional
        Called with a dict of :data:`STATE_FIELDS` (plus ``clock_s``, ``stop_reason``)
        whenever the state changes. ``segment_check`` is ``calibrating``, ``on`` or
        ``off`` and ``segment_check_note`` says why (e.g. "segment check off: 3 of 20
        occupied segments looked empty in the survey (particles too faint at survey
        magnification)"); the same line is logged on ``particlewatch.acquisition``.
    focus, segments : FocusSettings, SegmentSettings
        ``segments.polarity`` ``"auto"`` takes the particles' contrast from the backend's
        ``detector`` where it names one (:func:`detector_polarity`).
    target_defocus_um : float
        Defocus added to best focus for the recorded frames.
    threaded_writer : bool
        Save frames on a writer thread.
    throttle : callable, optional
        Called at every checkpoint (before each tile and after each saved frame); it may
        block, e.g. to keep a fast simulated microscope from running far ahead of analysis.
    backend, sample, seed : optional
        Recorded in ``acquisition.json``.
    progress : AreaProgress, optional
        What an earlier run on the same area did (``AcquisitionReport.progress``): its done
        tiles are not surveyed again and its focus model and segment-check calibration go
        on. Without it, the latest earlier ``acquisition*.json`` in ``out_dir`` made for the
        same tiles is read instead (a resumed run after a restart), its focus model checked
        once before use. The progress of this run is kept in its own ``acquisition.json``.

    Returns
    -------
    AcquisitionReport
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    segments = detector_polarity(scope, segments)  # recorded in acquisition.json as used
    tiles, record_field, tile_step = plan_tiles(scope, area_um, overlap=overlap)
    number = next_frame_number(out)
    description = AcquisitionDescription(
        area_um=tuple(float(v) for v in area_um), backend=backend or type(scope).__name__,
        sample=sample, seed=seed, overlap=overlap, target_defocus_um=target_defocus_um,
        max_frames=max_frames, time_limit_s=time_limit_s, stop_on=stop_on, focus=focus,
        segments=segments, record_pixel_nm=scope.pixel_nm("record"),
        survey_pixel_nm=scope.pixel_nm("survey"), record_field_um=record_field,
        survey_field_um=scope.field_of_view_um("survey"), tile_step_um=tile_step,
        tiles=len(tiles), first_frame=frame_name(number),
        started=_dt.datetime.now().isoformat(timespec="seconds"))
    description_path = _free_name(out, "acquisition", ".json")
    _write_json_atomic(description_path, description.to_dict())

    nav_path = out / NAV_NAME
    positions = read_navigator(nav_path) if nav_path.exists() else []
    state: dict[str, Any] = {"state": "starting", "stage_x_um": None, "stage_y_um": None,
                             "defocus_um": None, "tile": 0, "tiles": len(tiles),
                             "skipped_segments": 0, "frames_saved": 0, "focus_images": 0,
                             "survey_images": 0, "clock_s": 0.0, "stop_reason": None,
                             "segment_check": None, "segment_check_note": None}
    check_counts: dict[str, Any] = {}

    if progress is None:
        progress = earlier_progress(out, description.to_dict(), segments)
    if progress is None:
        progress = AreaProgress.start(segments)
    written_tiles = [len(progress.tiles_done)]
    navigated = [len(positions)]

    def write_positions() -> None:
        # only frames already on disk (renamed into place by the writer): after a hard kill
        # the next run takes again what is not listed, and skips what is
        on_disk = [p for p in positions if (out / f"{p.label}.mrc").exists()]
        if len(on_disk) != navigated[0]:
            write_navigator(nav_path, on_disk)
            navigated[0] = len(on_disk)

    def write_description() -> None:
        data = description.to_dict()
        if check_counts:
            data["segment_check"] = dict(check_counts)
        data["progress"] = progress.to_dict()
        written_tiles[0] = len(progress.tiles_done)
        _write_json_atomic(description_path, data)
    clock0, wall0 = scope.clock_s, time.monotonic()
    saved: list[Path] = []
    focus_log: list = []
    conditions = StopConditions(stop=stop, max_frames=max_frames, time_limit_s=time_limit_s,
                                stop_on=stop_on, handle_sigint=handle_sigint)
    writer = FrameWriter(out, threaded=threaded_writer)

    def publish() -> None:
        state["clock_s"] = scope.clock_s - clock0
        if on_state is not None:
            on_state(dict(state))

    def handle(command):
        nonlocal number
        match command:
            case Report(fields=f):
                f = dict(f)
                if "focus" in f:
                    entry = f.pop("focus")
                    focus_log.append(entry)
                    # images spent on this measurement, a discarded probe record included
                    state["focus_images"] += int(entry[4])
                if "segment_check_counts" in f:
                    check_counts.clear()
                    check_counts.update(f.pop("segment_check_counts"))
                if "segment_check" in f and f["segment_check"] != state["segment_check"]:
                    # said once per change, and kept with the data
                    level = logging.WARNING if f["segment_check"] == "off" else logging.INFO
                    log.log(level, "%s", f.get("segment_check_note") or f["segment_check"])
                    if check_counts:
                        write_description()
                state.update(f)
                publish()
                return True, None
            case Checkpoint():
                if len(progress.tiles_done) != written_tiles[0]:
                    write_description()  # a tile was finished: kept for a resumed run
                write_positions()  # frames saved so far, for a run resumed after a kill
                if throttle is not None:
                    throttle()
                reason = conditions.reason(len(saved))
                if reason:
                    state["stop_reason"] = reason
                    raise StopPlan(reason)
                return True, None
            case Save(frame=frame, tile=tile, segment=seg):
                path = out / frame_name(number)
                number += 1
                writer.submit(path, frame)
                saved.append(path)
                positions.append(NavPosition(path.stem, frame.stage_x_um, frame.stage_y_um,
                                             note=f"tile {tile} segment {seg[0]} {seg[1]} "
                                                  f"defocus {frame.defocus_um:.3f}"))
                state["frames_saved"] = len(saved)
                publish()
                return True, path
            case Snap(purpose=purpose):
                frame = execute(scope, command)
                if purpose == "survey":
                    state["survey_images"] += 1
                return True, frame
            case Move(x_um=x, y_um=y):
                execute(scope, command)
                state["stage_x_um"], state["stage_y_um"] = x, y
                return True, None
            case SetDefocus(defocus_um=d):
                execute(scope, command)
                state["defocus_um"] = d
                return True, None
        return False, None

    done_um = [(p.x_um, p.y_um) for p in positions]
    plan = acquire_area(tiles, record_field_um=record_field, focus=focus, segments=segments,
                        done_um=done_um, progress=progress,
                        target_defocus_um=target_defocus_um, start_defocus_um=scope.defocus(),
                        limits_um=scope.stage_limits_um)
    state["state"] = "running"
    publish()
    result = None
    try:
        with conditions:
            result = run_plan(plan, scope, handle=handle)
    finally:
        writer.close()
        write_description()
        if positions:
            write_navigator(nav_path, positions)
    if result is not None:
        state["stop_reason"] = "finished"
    state["state"] = "stopped" if state["stop_reason"] != "finished" else "done"
    publish()
    return AcquisitionReport(
        out_dir=out, frames=tuple(saved), tiles=len(tiles),
        tiles_visited=int(state["tile"] or 0), skipped_segments=int(state["skipped_segments"]),
        focus_images=int(state["focus_images"]), survey_images=int(state["survey_images"]),
        instrument_s=float(scope.clock_s - clock0), wall_s=time.monotonic() - wall0,
        stop_reason=str(state["stop_reason"]), nav_path=nav_path if positions else None,
        description_path=description_path, focus_log=tuple(focus_log),
        segment_check=dict(check_counts) or None, progress=progress)
