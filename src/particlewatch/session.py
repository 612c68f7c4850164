"""The main job: acquisition, live analysis and dashboard together, stopping on convergence.

``particlewatch session --out DIR`` saves frames into ``DIR/frames`` (the durable queue),
runs the daemon on that folder with its outputs in ``DIR``, and shows the dashboard. The
daemon publishes ``converged`` on its statistics stream; the acquisition controller listens on
that stream and stops after the frame in hand. Every frame saved is then analysed before the
report (``DIR/report.md``) is written. Running the same command with the same ``DIR`` resumes:
the daemon's ledger knows which frames are done and acquisition continues numbering.

The acquisition's state (stage position, focus, tile i of n, skipped segments, frames saved,
focus images, what it is doing) is published as ``acquisition`` messages on a PUB socket of
its own (statistics port + 4, written to ``DIR/session.json``), so ``particlewatch dashboard``
in another terminal shows the same as the session's own dashboard.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from particlewatch import SCHEMA_VERSION, __version__

log = logging.getLogger(__name__)

#: Side of the square stage area (µm) a session tiles, centred on the grid: far more than
#: any sample needs before it converges, so in practice convergence or --max-frames stops it.
SESSION_AREA_UM = 40.0


def _free_tcp_port_block(host: str = "127.0.0.1", *, first: int = 5556, count: int = 5) -> int:
    """The first port P >= ``first`` with P..P+count-1 all free (the daemon binds P..P+3,
    the session's acquisition stream P+4)."""
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


class AcquisitionPublisher:
    """Publish the acquisition's whole state as ``acquisition`` messages (JSON, never deltas).

    An XPUB socket, so that a dashboard that subscribes late gets the latest state at once
    (the zguide's last-value cache), not only at the next change; the state is also sent
    on every change and at least every ``heartbeat_s``, which tells a dashboard the session
    is alive. Every send happens on the publisher's own thread (ZeroMQ sockets are not
    thread-safe); :meth:`update` may be called from any thread.

    Parameters
    ----------
    endpoint : str
        Where to bind, e.g. ``tcp://127.0.0.1:5560`` (port 0: a free port).
    allow_remote : bool
        Allow binding to an address other than 127.0.0.1.
    extra : mapping, optional
        Fields added to every message (``sample``, ``backend``, ``frames_earlier``); read
        at every send, so the caller may update them (a session's later rounds).
    heartbeat_s : float
    context : zmq.Context, optional
    """

    def __init__(self, endpoint: str, *, allow_remote: bool = False, extra=None,
                 heartbeat_s: float | None = None, context=None) -> None:
        import zmq

        from particlewatch.daemon.pipeline import check_bind_allowed
        from particlewatch.dashboard import ACQUISITION_HEARTBEAT_S

        check_bind_allowed(endpoint, allow_remote=allow_remote)
        self._zmq = zmq
        self.heartbeat_s = ACQUISITION_HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self._extra = extra if extra is not None else {}
        self._socket = (context or zmq.Context.instance()).socket(zmq.XPUB)
        # every subscription comes through, not only the first for a topic
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._socket.setsockopt(zmq.LINGER, 500)  # the last state still goes out on close
        scheme, _, rest = endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme == "tcp" and port == "0":
            endpoint = f"tcp://{host}:*"
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._state: dict | None = None
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="acquisition-publisher",
                                        daemon=True)
        self._thread.start()

    def update(self, runner_state: dict, /, **fields) -> None:
        """Take the runner's state (its ``on_state`` callback), plus ``fields`` over it."""
        with self._lock:
            self._state = {**(self._state or {}), **dict(runner_state), **fields}
        self._changed.set()

    def latest(self) -> dict | None:
        """The message that would be sent now (None before the first state)."""
        from particlewatch.daemon.messages import acquisition_message

        with self._lock:
            if self._state is None:
                return None
            state = dict(self._state)
        return acquisition_message(state, **dict(self._extra),
                                   elapsed_s=time.monotonic() - self._t0)

    def _send(self) -> None:
        from particlewatch.daemon.messages import encode

        message = self.latest()
        if message is not None:
            self._socket.send(encode(message))
            self.sent += 1

    def _run(self) -> None:
        zmq = self._zmq
        last = 0.0
        while not self._stop.is_set():
            # short polls: a change made on another thread is sent within 50 ms
            if self._socket.poll(50):
                joined = False
                while True:
                    try:
                        event = self._socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    joined |= event[:1] == b"\x01"  # a subscription (b"\x00": gone)
                if joined:
                    self._changed.set()
            now = time.monotonic()
            if self._changed.is_set() or now - last >= self.heartbeat_s:
                self._changed.clear()
                self._send()
                last = now
        self._send()  # the final state
        self._socket.close()

    def close(self) -> None:
        """Send the final state and close."""
        self._stop.set()
        self._thread.join(5)


def _follow_stream(endpoint: str, state, stop: threading.Event) -> None:
    """Keep ``state`` (a :class:`DashboardState`) current from the daemon's stream."""
    from particlewatch.dashboard import StreamFollower

    follower = StreamFollower(state)
    follower.connect(stats=endpoint)
    try:
        while not stop.is_set():
            follower.poll(200)
    finally:
        follower.close()


def _open_publisher(stats_endpoint: str, *, allow_remote: bool, extra: dict):
    """The acquisition publisher on the statistics port + 4, or on a free port (then only
    ``session.json`` tells where) when that one is taken or there is no such port."""
    import zmq

    from particlewatch.dashboard import acquisition_endpoint_for

    wanted = acquisition_endpoint_for(stats_endpoint)
    if wanted is not None:
        try:
            return AcquisitionPublisher(wanted, allow_remote=allow_remote, extra=extra)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
    scheme, _, rest = stats_endpoint.partition("://")
    host = rest.rpartition(":")[0] if scheme == "tcp" else "127.0.0.1"
    publisher = AcquisitionPublisher(f"tcp://{host}:0", allow_remote=allow_remote, extra=extra)
    if wanted is not None:
        log.warning("%s is taken: the acquisition state is published on %s (see "
                    "session.json)", wanted, publisher.endpoint)
    return publisher


def _write_session_json(out: Path, info: dict) -> Path:
    """``OUT/session.json``: where the session publishes (read by ``dashboard --out``)."""
    path = out / "session.json"
    tmp = out / ".session.json.part"
    tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=1))
    os.replace(tmp, path)
    return path


def _progress_line(stats: dict | None, acquisition: dict) -> str:
    # this run's frames and those of earlier runs and rounds, as the dashboard counts them
    frames = (acquisition.get("frames_saved") or 0) + (acquisition.get("frames_earlier") or 0)
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
                allow_remote: bool = False, console=None) -> SessionResult:
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
    allow_remote : bool
        Allow the daemon's and the acquisition stream's sockets to bind to addresses other
        than 127.0.0.1 (given by ``stats_endpoint``).

    The acquisition's state is published on the statistics port + 4 (or a free port if
    that one is taken) and written with the statistics endpoint to ``DIR/session.json``.
    """
    from rich.console import Console
    from rich.live import Live

    from particlewatch.acquisition.runner import run_acquisition
    from particlewatch.daemon.pipeline import Daemon
    from particlewatch.dashboard import DashboardState

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
                    precision=precision, seed=seed, allow_remote=allow_remote).start()
    stats_at = daemon.endpoints["stats"] if hasattr(daemon, "endpoints") else stats_endpoint
    saved_before = sum(1 for _ in frames_dir.glob("frame_*.mrc"))
    # what the session adds to the runner's state, here and on remote dashboards
    session_fields = {"sample": sample if backend == "simulated" else None,
                      "backend": backend, "frames_earlier": saved_before}
    try:
        publisher = _open_publisher(stats_at, allow_remote=allow_remote, extra=session_fields)
    except BaseException:
        daemon.stop()
        raise
    settings["acquisition_endpoint"] = publisher.endpoint
    _write_session_json(out, {
        "pid": os.getpid(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "sample": sample, "backend": backend,
        "endpoints": {"acquisition": publisher.endpoint, "stats": stats_at}})

    view = DashboardState()
    stop_stream = threading.Event()
    stop_acquisition = threading.Event()
    follower = threading.Thread(target=_follow_stream, args=(stats_at, view, stop_stream),
                                name="session-stream", daemon=True)
    follower.start()

    def on_state(state: dict) -> None:
        view.on_acquisition_state({**state, **session_fields})
        publisher.update(state)

    def set_state(text: str) -> None:
        # what the session does after acquisition, shown here and on remote dashboards
        view.on_acquisition_state({**(view.snapshot()[1] or {}), "state": text})
        publisher.update({}, state=text)

    outcome: dict[str, Any] = {}
    max_ahead = daemon.n_workers + 1

    def throttle() -> None:
        # The simulated microscope acquires faster than real time; holding it while more
        # than `max_ahead` frames wait for analysis keeps the stop decision timely (a real
        # microscope is slower than analysis, so this never waits there).
        while not stop_acquisition.is_set():
            status = daemon.status()
            done = status.get("frames_ok", 0) + status.get("frames_failed", 0)
            saved = session_fields["frames_earlier"] + (
                (view.snapshot()[1] or {}).get("frames_saved") or 0)
            if saved - done < max_ahead or daemon.wait_converged(0):
                return
            time.sleep(0.1)

    def acquire() -> None:
        rounds = []
        try:
            while True:
                if rounds:  # the runner counts its own frames from 0 again
                    session_fields["frames_earlier"] += rounds[-1].frames_saved
                left = None if max_frames is None else max_frames - sum(
                    r.frames_saved for r in rounds)
                if left is not None and left <= 0:
                    return
                rounds.append(run_acquisition(
                    scope, frames_dir, area_um=area, max_frames=left, stop=stop_acquisition,
                    stop_on=stats_at, on_state=on_state, handle_sigint=False,
                    throttle=throttle,
                    backend=backend, sample=sample, seed=seed,
                    # the next round goes on where this one stopped: no tile surveyed
                    # again, the focus model and the segment check's calibration kept
                    progress=rounds[-1].progress if rounds else None))
                outcome["report"] = combine_reports(rounds)
                if rounds[-1].stop_reason != "converged" or stop_acquisition.is_set():
                    return
                # Frames saved while the converged message travelled are analysed too, and
                # can undo it; the verdict that counts is the final one over every frame.
                set_state("analysing the last frames")
                if not _drain(daemon, frames_dir, stop=stop_acquisition):
                    return  # Ctrl-C: the main thread finishes up
                final = daemon.settle()
                if not final or final.get("converged") or stop_acquisition.is_set():
                    return
                reason = (final.get("convergence") or {}).get("reason", "")
                log.info("with every saved frame analysed: %s; acquisition resumes", reason)
                outcome["resumed"] = outcome.get("resumed", 0) + 1
                set_state("resuming: not converged once every frame was analysed")
        except BaseException as exc:  # reported in the main thread
            outcome["error"] = exc
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            view.add_error(f"acquisition: {text}")
            publisher.update({}, state="failed", error=text)

    def draw(live) -> None:
        live.update(view.render(width=console.width, height=console.height))

    acquisition = threading.Thread(target=acquire, name="session-acquisition", daemon=True)
    stop_reason = None
    try:
        acquisition.start()
        if dashboard:
            with Live(view.render(width=console.width, height=console.height),
                      console=console, refresh_per_second=4) as live:
                while acquisition.is_alive():
                    acquisition.join(0.25)
                    draw(live)
                if "error" not in outcome:
                    set_state("analysing the last frames")
                draw(live)
                _drain(daemon, frames_dir)
                if daemon.summary:
                    view.on_message({"type": "stats", **daemon.summary})
                if "error" not in outcome:
                    set_state("done")
                draw(live)
        else:
            last_line = ""
            while acquisition.is_alive():
                acquisition.join(0.5)
                stats, acq, _ = view.snapshot()
                line = _progress_line(stats, acq or {})
                if line != last_line:
                    console.print(line, highlight=False)
                    last_line = line
            if "error" not in outcome:
                set_state("analysing the last frames")
            _drain(daemon, frames_dir)
            if "error" not in outcome:
                set_state("done")
    except KeyboardInterrupt:
        stop_reason = "interrupted by the user (Ctrl-C)"
        set_state("interrupted")
        stop_acquisition.set()
        acquisition.join(120)
        _drain(daemon, frames_dir, timeout_s=120)
    finally:
        stop_stream.set()
        follower.join(5)
        try:
            daemon.stop()
        finally:
            publisher.close()
        # the final statistics (every frame, canonical order): what summary.json holds
        summary = daemon.summary
    if "error" in outcome:
        raise outcome["error"]
    report = outcome.get("report")
    if stop_reason is None:
        stop_reason = _explain_stop(report, summary, resumed=outcome.get("resumed", 0))
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


def _drain(daemon, frames_dir: Path, *, timeout_s: float = 600.0, stop=None) -> bool:
    """Wait until the daemon has analysed every frame in the folder (earlier runs included);
    False when ``stop`` (an Event) was set or the time ran out first."""
    from particlewatch.frames import is_temporary_name

    saved = [p for p in frames_dir.glob("frame_*.mrc") if not is_temporary_name(p)]
    deadline = time.monotonic() + timeout_s
    while (stop is None or not stop.is_set()) and daemon.running:
        if daemon.wait_idle(min(1.0, max(deadline - time.monotonic(), 0.0)),
                            frames=len(saved)):
            return True
        if time.monotonic() >= deadline:
            return False
    return False


def combine_reports(rounds: list) -> Any:
    """One :class:`AcquisitionReport` for the acquisition rounds of one session (a round
    ends when the statistics converge; the next resumes when later frames undid that)."""
    import dataclasses

    last = rounds[-1]
    if len(rounds) == 1:
        return last
    return dataclasses.replace(
        last,
        frames=tuple(p for r in rounds for p in r.frames),
        tiles_visited=max(r.tiles_visited for r in rounds),
        skipped_segments=sum(r.skipped_segments for r in rounds),
        focus_images=sum(r.focus_images for r in rounds),
        survey_images=sum(r.survey_images for r in rounds),
        instrument_s=sum(r.instrument_s for r in rounds),
        wall_s=sum(r.wall_s for r in rounds),
        focus_log=tuple(e for r in rounds for e in r.focus_log))


def _explain_stop(report, summary: dict | None, *, resumed: int = 0) -> str:
    reason = getattr(report, "stop_reason", None) or "unknown"
    summary = summary or {}
    final = (summary.get("convergence") or {}).get("reason", "")
    again = (f"; acquisition resumed {resumed} time(s) because frames analysed after a "
             f"converged message undid it" if resumed else "")
    if reason == "converged":
        text = (f"the statistics converged after {report.frames_saved} frames "
                "(the daemon's converged message stopped acquisition)")
        if not summary.get("converged") and final:
            # only when the session was cut short while checking the last frames
            text += f"; with every saved frame analysed the final check says: {final}"
        return text + again
    if reason == "finished":
        return "the stage area was covered before the statistics converged" + again
    if reason == "max_frames":
        return ("the frame limit (--max-frames) was reached" + (f"; {final}" if final else "")
                + again)
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
                         dashboard=not args.no_dashboard, size_px=args.size,
                         allow_remote=getattr(args, "allow_remote", False))
    print(f"session in {result.out_dir}: {result.stop_reason}; "
          f"{result.frames_saved} frames in {result.wall_s / 60:.1f} min; "
          f"report {result.out_dir / 'report.md'}", file=sys.stderr)
    return 0
