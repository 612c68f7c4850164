"""The main job: acquisition, live analysis and dashboard together, stopping on convergence.

``particlewatch session --out DIR`` saves frames into ``DIR/frames`` (the durable queue),
runs the daemon on that folder with its outputs in ``DIR``, and shows the dashboard. The
daemon publishes ``converged`` on its statistics stream; the acquisition controller listens on
that stream and stops after the frame in hand. Every frame saved is then analysed before the
report (``DIR/report.md``) is written. Running the same command with the same ``DIR`` resumes:
the daemon's ledger knows which frames are done and acquisition continues numbering.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from particlewatch import SCHEMA_VERSION, __version__

#: Side of the square stage area (µm) a session tiles, centred on the grid: far more than
#: any sample needs before it converges, so in practice convergence or --max-frames stops it.
SESSION_AREA_UM = 40.0


def _free_tcp_port_block(host: str = "127.0.0.1", *, first: int = 5556, count: int = 4) -> int:
    """The first port P >= ``first`` with P..P+count-1 all free (the daemon binds P..P+3)."""
    for base in range(first, first + 400, count):
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free TCP ports on {host} from {first}")


def centred_area_um(limits_um, side_um: float) -> tuple[float, float, float, float]:
    """A square of ``side_um`` at the centre of the stage limits, clipped to them."""
    x0, y0, x1, y1 = limits_um
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, side_um / 2
    return (max(x0, cx - half), max(y0, cy - half), min(x1, cx + half), min(y1, cy + half))


def make_microscope(backend: str, *, sample: str, seed: int, size_px: int | None = None,
                    ip: str = "127.0.0.1", port: int = 48888):
    """The acquisition backend: the simulated microscope or a connection to SerialEM."""
    from particlewatch.acquisition.backends import SerialEMMicroscope, SimulatedMicroscope

    if backend == "simulated":
        options = {} if size_px is None else {"size_px": size_px}
        return SimulatedMicroscope.create(sample, seed=seed, **options)
    if backend == "serialem":
        return SerialEMMicroscope(connect=True, ip=ip, port=port)
    raise ValueError(f"unknown backend {backend!r}; use simulated or serialem")


@dataclass
class SessionResult:
    """What a session did, for the report."""

    out_dir: Path
    summary: dict | None
    stop_reason: str
    frames_saved: int
    wall_s: float
    acquisition: Any = None
    settings: dict = field(default_factory=dict)


class _Progress:
    """Latest acquisition state and stream messages, shared between threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acquisition: dict = {}
        self.stats: dict | None = None
        self.errors: list[str] = []

    def on_state(self, state: dict) -> None:
        with self.lock:
            self.acquisition = dict(state)

    def on_message(self, message: dict) -> None:
        with self.lock:
            kind = message.get("type")
            if kind in ("stats", "converged"):
                self.stats = message
            elif kind == "error":
                self.errors.append(str(message.get("error") or message.get("message"))[:200])
            elif kind == "frame" and message.get("status") == "failed":
                self.errors.append(f"{message.get('path')}: {message.get('reason')}")
            self.errors = self.errors[-3:]

    def snapshot(self) -> tuple[dict | None, dict, list[str]]:
        with self.lock:
            return self.stats, dict(self.acquisition), list(self.errors)


def _follow_stream(endpoint: str, progress: _Progress, stop: threading.Event) -> None:
    """Subscribe to the daemon's stream and keep ``progress`` current until ``stop``."""
    import zmq

    from particlewatch.dashboard import decode_message

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    try:
        while not stop.is_set():
            if sock.poll(200):
                try:
                    progress.on_message(decode_message(sock.recv()))
                except ValueError as exc:
                    progress.on_message({"type": "error", "error": f"stream: {exc}"})
    finally:
        sock.close()


def _progress_line(stats: dict | None, acquisition: dict) -> str:
    frames = acquisition.get("frames_saved", 0)
    if not stats:
        return f"frames saved {frames}, waiting for the first analysis"
    pops = ", ".join(
        f"P{p['id']} {p['mean_ecd_nm']:.1f} nm n={p['n']} ±{(p.get('ci95_rel') or 0) * 100:.1f}%"
        for p in stats.get("populations", []) if p.get("mean_ecd_nm") is not None)
    return (f"frames saved {frames}, analysed {stats.get('frames_ok', 0)}, failed "
            f"{stats.get('frames_failed', 0)}, particles {stats.get('particles', 0)}: {pops}")


def run_session(out_dir: str | os.PathLike, *, sample: str = "au10", precision: float = 0.01,
                max_frames: int | None = None, seed: int = 0, backend: str = "simulated",
                workers: int | None = None, stats_endpoint: str | None = None,
                dashboard: bool = True, area_um=None, size_px: int | None = None,
                console=None) -> SessionResult:
    """Run acquisition and the live daemon until the statistics converge.

    Parameters
    ----------
    out_dir : path-like
        Session folder: ``frames/`` (with ``truth/`` for the simulator), the daemon's outputs
        and ledger, and ``report.md``. An existing session folder is resumed.
    sample, seed, backend : str, int, str
        The simulated specimen (ignored by the SerialEM backend) and the backend.
    precision : float
        Wanted 95% CI half-width of every population's mean size, relative to the mean.
    max_frames : int, optional
        Stop after this many new frames even if not converged.
    workers : int, optional
        Analysis worker processes (default: the number of cores).
    stats_endpoint : str, optional
        Where the daemon publishes (default: the first free ports from 5556 on 127.0.0.1).
    dashboard : bool
        Show the live rich dashboard; otherwise print a progress line per update.
    area_um : 4 floats, optional
        Stage area to tile (default: a ``SESSION_AREA_UM`` square at the grid centre).
    size_px : int, optional
        Frame width of the simulated camera (default: the simulator's, 2048).
    """
    from rich.console import Console
    from rich.live import Live

    from particlewatch.acquisition.runner import run_acquisition
    from particlewatch.daemon.pipeline import Daemon
    from particlewatch.dashboard import render

    console = console or Console(stderr=False)
    out = Path(out_dir)
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    if stats_endpoint is None:
        stats_endpoint = f"tcp://127.0.0.1:{_free_tcp_port_block()}"
    settings = {"sample": sample, "precision": precision, "max_frames": max_frames,
                "seed": seed, "backend": backend, "workers": workers,
                "stats_endpoint": stats_endpoint, "size_px": size_px,
                "particlewatch": __version__}

    t0 = time.monotonic()
    scope = make_microscope(backend, sample=sample, seed=seed, size_px=size_px)
    area = tuple(area_um) if area_um else centred_area_um(scope.stage_limits_um,
                                                          SESSION_AREA_UM)
    settings["area_um"] = area
    daemon = Daemon(frames_dir, out, workers=workers, stats_endpoint=stats_endpoint,
                    precision=precision, seed=seed).start()
    stats_at = daemon.endpoints["stats"] if hasattr(daemon, "endpoints") else stats_endpoint

    progress = _Progress()
    stop_stream = threading.Event()
    stop_acquisition = threading.Event()
    follower = threading.Thread(target=_follow_stream, args=(stats_at, progress, stop_stream),
                                name="session-stream", daemon=True)
    follower.start()

    outcome: dict[str, Any] = {}
    max_ahead = daemon.n_workers + 1
    saved_before = sum(1 for _ in frames_dir.glob("frame_*.mrc"))

    def throttle() -> None:
        # The simulated microscope acquires faster than real time; holding it while more
        # than `max_ahead` frames wait for analysis keeps the stop decision timely (a real
        # microscope is slower than analysis, so this never waits there).
        while not stop_acquisition.is_set():
            status = daemon.status()
            done = status.get("frames_ok", 0) + status.get("frames_failed", 0)
            saved = saved_before + progress.snapshot()[1].get("frames_saved", 0)
            if saved - done < max_ahead or daemon.wait_converged(0):
                return
            time.sleep(0.1)

    def acquire() -> None:
        try:
            outcome["report"] = run_acquisition(
                scope, frames_dir, area_um=area, max_frames=max_frames, stop=stop_acquisition,
                stop_on=stats_at, on_state=progress.on_state, handle_sigint=False,
                throttle=throttle,
                backend=backend, sample=sample, seed=seed)
        except BaseException as exc:  # reported in the main thread
            outcome["error"] = exc

    acquisition = threading.Thread(target=acquire, name="session-acquisition", daemon=True)
    stop_reason = None
    try:
        acquisition.start()
        if dashboard:
            with Live(render(None), console=console, refresh_per_second=4) as live:
                while acquisition.is_alive():
                    acquisition.join(0.25)
                    stats, acq, errors = progress.snapshot()
                    live.update(render(stats, acq, errors=errors, width=console.width))
                stats, acq, errors = progress.snapshot()
                live.update(render(stats, {**acq, "state": "analysing the last frames"},
                                   errors=errors, width=console.width))
                _drain(daemon, frames_dir)
                live.update(render(daemon.summary, {**acq, "state": "done"}, errors=errors,
                                   width=console.width))
        else:
            last_line = ""
            while acquisition.is_alive():
                acquisition.join(0.5)
                stats, acq, _ = progress.snapshot()
                line = _progress_line(stats, acq)
                if line != last_line:
                    console.print(line, highlight=False)
                    last_line = line
            _drain(daemon, frames_dir)
    except KeyboardInterrupt:
        stop_reason = "interrupted by the user (Ctrl-C)"
        stop_acquisition.set()
        acquisition.join(120)
        _drain(daemon, frames_dir, timeout_s=120)
    finally:
        stop_stream.set()
        follower.join(5)
        summary = daemon.summary
        daemon.stop()
    if "error" in outcome:
        raise outcome["error"]
    report = outcome.get("report")
    if stop_reason is None:
        stop_reason = _explain_stop(report, summary)
    result = SessionResult(out_dir=out, summary=summary, stop_reason=stop_reason,
                           frames_saved=report.frames_saved if report else 0,
                           wall_s=time.monotonic() - t0, acquisition=report,
                           settings=settings)
    write_overlays(out, frames_dir)
    write_report(result)
    return result


#: Overlays a session writes at the end: enough to judge the segmentation by eye.
SESSION_OVERLAYS = 3


def write_overlays(out: Path, frames_dir: Path, *, count: int = SESSION_OVERLAYS) -> list[Path]:
    """Overlay PNGs for the first ``count`` frames analysed ok, coloured by final population.

    The frames are analysed again (analysis is deterministic, so particle ids match
    ``particles.csv``, which the daemon rewrote with the final population labels).
    """
    import csv

    from particlewatch.analysis.outputs import write_overlay
    from particlewatch.analysis.pipeline import analyze_frame

    frames_csv, particles_csv = out / "frames.csv", out / "particles.csv"
    if not (frames_csv.exists() and particles_csv.exists()):
        return []
    with open(frames_csv, newline="") as fh:
        ok = [row for row in csv.DictReader(fh) if row.get("status") == "ok"][:count]
    wanted = {row["frame"] for row in ok}
    populations: dict[str, dict[int, int]] = {name: {} for name in wanted}
    with open(particles_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["frame"] in wanted and row.get("population", "") not in ("", None):
                populations[row["frame"]][int(row["particle_id"])] = int(row["population"])
    written = []
    for row in ok:
        path = Path(row["path"])
        if not path.is_absolute():
            path = frames_dir / path.name
        result = analyze_frame(path)
        if result.status != "ok" or result.image is None or result.labels is None:
            continue
        target = out / "overlays" / f"{row['frame']}.png"
        write_overlay(target, result.image, result.labels,
                      populations=populations[row["frame"]],
                      agglomerate_boxes=result.agglomerate_boxes)
        written.append(target)
    return written


def _drain(daemon, frames_dir: Path, *, timeout_s: float = 600.0) -> None:
    """Wait until the daemon has analysed every frame in the folder (earlier runs included)."""
    from particlewatch.frames import is_temporary_name

    saved = [p for p in frames_dir.glob("frame_*.mrc") if not is_temporary_name(p)]
    daemon.wait_idle(timeout_s, frames=len(saved))


def _explain_stop(report, summary: dict | None) -> str:
    reason = getattr(report, "stop_reason", None) or "unknown"
    summary = summary or {}
    final = (summary.get("convergence") or {}).get("reason", "")
    if reason == "converged":
        text = (f"the statistics converged after {report.frames_saved} frames "
                "(the daemon's converged message stopped acquisition)")
        if not summary.get("converged") and final:
            # frames already saved when the message came were analysed too
            text += f"; with every saved frame analysed the final check says: {final}"
        return text
    if reason == "finished":
        return "the stage area was covered before the statistics converged"
    if reason == "max_frames":
        return "the frame limit (--max-frames) was reached" + (f"; {final}" if final else "")
    return reason


def write_report(result: SessionResult) -> Path:
    """Write ``report.md`` (numbers, settings, time, why it stopped) into the session folder."""
    summary = result.summary or {}
    report = result.acquisition
    lines = [
        "# particlewatch session report", "",
        f"- finished: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- stopped because: {result.stop_reason}",
        f"- converged: {bool(summary.get('converged'))} (precision asked: "
        f"±{result.settings.get('precision', 0) * 100:g}% of each mean size, 95% CI)",
        f"- frames saved: {result.frames_saved}; analysed ok: {summary.get('frames_ok', 0)}; "
        f"failed: {summary.get('frames_failed', 0)}; particles: {summary.get('particles', 0)}",
        f"- wall time: {result.wall_s / 60:.1f} min",
    ]
    if report is not None:
        lines.append(
            f"- microscope time (simulated time model for the simulator): "
            f"{report.instrument_s / 60:.1f} min, {report.seconds_per_frame:.1f} s per frame, "
            f"{report.focus_images_per_frame:.1f} focus images per frame, "
            f"{report.skipped_segments} empty segments skipped")
    lines += ["", "## Populations", "",
              "| population | shape | n | fraction | mean ECD nm | 95% CI nm | sd nm | σ/μ | "
              "PDI | z-average nm | Feret max × min nm |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(value, spec):
        return "–" if value is None else format(value, spec)

    for pop in summary.get("populations", []):
        ci = pop.get("ci95_nm") or [None, None]
        lines.append(
            f"| P{pop.get('id')} | {pop.get('shape', '')} | {pop.get('n')} | "
            f"{num(pop.get('fraction'), '.3f')} | {num(pop.get('mean_ecd_nm'), '.2f')} | "
            f"{num(ci[0], '.2f')} – {num(ci[1], '.2f')} | {num(pop.get('sd_ecd_nm'), '.2f')} | "
            f"{num(pop.get('cv'), '.3f')} | {num(pop.get('pdi'), '.4f')} | "
            f"{num(pop.get('z_average_nm'), '.2f')} | {num(pop.get('mean_feret_max_nm'), '.1f')}"
            f" × {num(pop.get('mean_feret_min_nm'), '.1f')} |")
    reason = (summary.get("convergence") or {}).get("reason")
    if reason:
        lines += ["", f"Convergence: {reason}"]
    lines += ["", "## Files", "",
              "- `summary.json`, `particles.csv`, `frames.csv`: the numbers",
              "- `histogram.png`: size distribution per population", 
              "- `overlays/`: segmentation outlines on frames",
              "- `frames/`: the frames (MRC + .mdoc) and `positions.nav` for SerialEM", "",
              "## Settings", "", "```json",
              json.dumps(result.settings, indent=2, default=str), "```", ""]
    path = result.out_dir / "report.md"
    tmp = path.with_name(".report.md.part")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(args) -> int:
    """``particlewatch session``."""
    result = run_session(args.out, sample=args.sample, precision=args.precision,
                         max_frames=args.max_frames, seed=args.seed, backend=args.backend,
                         workers=args.workers, stats_endpoint=args.stats,
                         dashboard=not args.no_dashboard, size_px=args.size)
    print(f"session in {result.out_dir}: {result.stop_reason}; "
          f"{result.frames_saved} frames in {result.wall_s / 60:.1f} min; "
          f"report {result.out_dir / 'report.md'}", file=sys.stderr)
    return 0
