"""``particlewatch acquire``: the acquisition controller alone, with a progress display."""

from __future__ import annotations

import sys
from typing import Mapping

from .backends import SerialEMMicroscope, SimulatedMicroscope
from .protocol import MicroscopeError
from .runner import AcquisitionReport, run_acquisition

#: Side of the default acquisition area (µm), centred on the stage.
DEFAULT_AREA_SIDE_UM = 20.0


def default_area(limits_um, side_um: float = DEFAULT_AREA_SIDE_UM):
    """A square of ``side_um`` at the centre of the stage limits."""
    x0, y0, x1, y1 = limits_um
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side_um / 2, cy - side_um / 2, cx + side_um / 2, cy + side_um / 2)


def make_scope(args):
    """The backend named by ``args.backend`` (``MicroscopeError`` with a one-line reason)."""
    detector = getattr(args, "detector", None)
    if args.backend == "simulated":
        return SimulatedMicroscope.create(args.sample, seed=args.seed,
                                          **({"detector": detector} if detector else {}))
    return SerialEMMicroscope(connect=True, ip=args.serialem_ip, port=args.serialem_port,
                              detector=detector)


def _state_line(state: Mapping) -> str:
    def num(key, fmt):
        value = state.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    return (f"{state.get('state', '')}  tile {state.get('tile') or 0}/{state.get('tiles') or 0}"
            f"  stage ({num('stage_x_um', '.1f')}, {num('stage_y_um', '.1f')}) µm"
            f"  defocus {num('defocus_um', '+.3f')} µm  skipped {state.get('skipped_segments', 0)}"
            f"  focus images {state.get('focus_images', 0)}")


def summary_line(report: AcquisitionReport) -> str:
    """One line for the end of a run."""
    return (f"{report.frames_saved} frames in {report.out_dir} ({report.stop_reason}); "
            f"{report.tiles_visited}/{report.tiles} tiles, {report.skipped_segments} empty "
            f"segments skipped, {report.focus_images} focus images, "
            f"{report.seconds_per_frame:.1f} instrument s/frame"
            + (f"; {report.segment_check['note']}"
               if (report.segment_check or {}).get("note") else ""))


def main(args) -> int:
    """Run ``particlewatch acquire`` from parsed arguments; returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    try:
        scope = make_scope(args)
    except MicroscopeError as exc:
        print(f"particlewatch acquire: error: {exc}", file=sys.stderr)
        return 1
    area = args.area or default_area(scope.stage_limits_um)
    console = Console(stderr=True)
    columns = [TextColumn("[bold]frames"), MofNCompleteColumn() if args.max_frames else
               TextColumn("{task.completed}"), BarColumn(), TextColumn("{task.fields[line]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("acquire", total=args.max_frames, line="starting")

        def on_state(state: dict) -> None:
            progress.update(task, completed=state.get("frames_saved", 0),
                            line=_state_line(state))

        try:
            report = run_acquisition(
                scope, args.out, area_um=area, max_frames=args.max_frames,
                stop_on=args.stop_on, on_state=on_state, backend=args.backend,
                sample=args.sample if args.backend == "simulated" else None,
                seed=args.seed if args.backend == "simulated" else None)
        except MicroscopeError as exc:
            print(f"particlewatch acquire: error: {exc}", file=sys.stderr)
            return 1
    print(summary_line(report))
    return 0
