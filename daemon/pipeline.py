"""The daemon: folder -> ledger -> PUSH -> workers -> PULL -> statistics -> PUB.

One thread (the *loop*) owns every ZeroMQ socket and the ledger, following the zguide's
ventilator/worker/sink: the daemon binds the stable sockets (task PUSH, result PULL, stats
PUB, control REP) and workers connect, so workers on other hosts can join with
``particlewatch worker --connect tcp://HOST:TASKPORT``. Watchdog's observer thread only puts
paths into a queue. Each result is made durable in the ledger before it enters the running
statistics, the outputs and the stream, so a restart after ``kill -9`` rebuilds exactly the
state that had been published (see :mod:`.ledger`).

Endpoints: given the stats endpoint ``tcp://H:P``, control defaults to ``P+1``, tasks to
``P+2`` and results to ``P+3``; a port ``*`` or ``0`` picks free ports (see
:attr:`Daemon.endpoints`, also written to ``OUT/daemon.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket as _socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import messages
from .ledger import Entry, Ledger
from .watcher import Arrivals, FolderEvents, classify_name, scan_folder, FRAME_SUFFIXES
from .worker import failed_result, load_callable, run_worker

log = logging.getLogger("particlewatch.daemon")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
OUTPUT_NAMES = ("particles.csv", "frames.csv", "summary.json", "histogram.png", "daemon.json")
#: Seconds between a worker's bye and its tasks going out again (its pipe closes meanwhile).
_LEAVING_GRACE_S = 0.3


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 4 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _split_endpoint(endpoint: str) -> tuple[str, str, str]:
    """``tcp://host:port`` -> (``tcp``, host, port)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint such as tcp://127.0.0.1:5556")
    host, _, port = rest.rpartition(":")
    return scheme, host, port


def derive_endpoints(stats: str, *, control: str | None = None, tasks: str | None = None,
                     results: str | None = None) -> dict[str, str]:
    """Fill in the endpoints not given from the stats endpoint (ports P+1, P+2, P+3)."""
    scheme, host, port = _split_endpoint(stats)
    out = {"stats": stats}
    for key, given, offset in (("control", control, 1), ("tasks", tasks, 2),
                               ("results", results, 3)):
        if given:
            out[key] = given
        elif scheme != "tcp":
            raise ValueError(f"give the {key} endpoint explicitly for {stats!r}")
        elif port in ("*", "0"):
            out[key] = f"tcp://{host}:*"
        else:
            out[key] = f"tcp://{host}:{int(port) + offset}"
    return out


def check_bind_allowed(endpoint: str, *, allow_remote: bool) -> None:
    """Refuse to bind a TCP socket outside 127.0.0.1 unless remote access was asked for."""
    scheme, host, _ = _split_endpoint(endpoint)
    if scheme == "tcp" and host not in LOCAL_HOSTS and not allow_remote:
        raise ValueError(f"binding {endpoint} would accept connections from other hosts; "
                         "use 127.0.0.1 or pass --allow-remote")


def _bind(sock, endpoint: str) -> str:
    scheme, host, port = _split_endpoint(endpoint)
    if scheme == "tcp" and port == "0":
        endpoint = f"tcp://{host}:*"
    sock.bind(endpoint)
    return sock.getsockopt_string(__import__("zmq").LAST_ENDPOINT)


def _default_statistics(*, precision: float, seed: int):
    from ..analysis.statistics import RunningStatistics

    return RunningStatistics(precision=precision, seed=seed)


@dataclass
class _SettleRequest:
    """A :meth:`Daemon.settle` call waiting for the daemon thread, and its answer."""

    done: threading.Event = field(default_factory=threading.Event)
    summary: dict | None = None


class Outputs:
    """The files in ``--out DIR``, written by :mod:`particlewatch.analysis.outputs`.

    ``frames.csv`` and ``particles.csv`` are appended frame by frame (population cells empty)
    and rewritten whole, atomically, after a restart or a replaced result and at stop (then
    with the final population of every particle); ``summary.json`` and ``histogram.png`` are
    replaced atomically.
    """

    def __init__(self, out_dir: Path):
        from ..analysis import outputs

        self.out_dir = out_dir
        self._outputs = outputs

    def append(self, result: dict) -> None:
        """Append one frame's rows to frames.csv and particles.csv."""
        self._outputs.append_frame_rows(self.out_dir, [result])

    def rewrite(self, results: list[dict], stats) -> None:
        """Rewrite frames.csv from ``results`` and particles.csv from ``stats``."""
        self._outputs.write_frames(self.out_dir, results)
        self._outputs.write_particles(self.out_dir, stats.table, stats.labels)

    def summary(self, summary: dict) -> None:
        """Replace summary.json."""
        self._outputs.write_summary(self.out_dir, summary)

    def histogram(self, stats, summary: dict) -> None:
        """Replace histogram.png."""
        self._outputs.write_histogram(self.out_dir / "histogram.png", stats.table,
                                      stats.labels, summary)


class _Painter:
    """Draws histogram.png in a thread so that matplotlib never holds up ingest.

    Only the newest request is kept: a picture nobody will see is never drawn.
    ``cpu_s`` is the CPU time the last picture took (the thread's own).
    """

    def __init__(self, draw: Callable):
        self._draw = draw
        self.cpu_s = 0.0
        self._cond = threading.Condition()
        self._job = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="particlewatch-histogram",
                                        daemon=True)
        self._thread.start()

    def submit(self, stats, summary: dict) -> None:
        """Ask for a new picture of ``stats`` (its current table and labels)."""
        with self._cond:
            self._job = (_Snapshot(dict(stats.table), stats.labels), summary)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job, self._job = self._job, None
            start = time.thread_time()
            try:
                self._draw(*job)
            except Exception:  # a failed picture must not stop the daemon
                log.exception("histogram.png not written")
            self.cpu_s = time.thread_time() - start

    def close(self) -> None:
        """Draw what is asked for, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(120)


@dataclass(frozen=True)
class _Snapshot:
    """The table and labels of a RunningStatistics at one moment."""

    table: dict
    labels: Any


@dataclass
class _Worker:
    """A worker heard from (``hello``) and what it is doing."""

    last_seen: float
    task: str | None = None  # id of the task it started
    heartbeat_s: float | None = None  # how often it promised a heartbeat (None: never)


@dataclass
class _Task:
    """A task sent to the workers and not yet answered."""

    name: str
    sent: float
    sha256: str  # the content the task is for: a failure is recorded against this version
    strip: int | None = None  # the strip's index, None for a whole frame


@dataclass
class _Split:
    """A frame analysed as strips: what is planned, sent and back (in memory only: after a
    restart the ledger still says ``running`` and the frame is analysed again)."""

    entry: Entry
    token: str  # task ids of this plan start with it
    strips: list
    results: dict = field(default_factory=dict)  # index -> StripResult
    unsent: list = field(default_factory=list)  # indices to (re)send
    sends: dict = field(default_factory=dict)  # index -> times sent


@dataclass
class DaemonConfig:
    """Settings of a :class:`Daemon` (see there)."""

    workers: int | None = None
    stats_endpoint: str = "tcp://127.0.0.1:5556"
    control_endpoint: str | None = None
    task_endpoint: str | None = None
    result_endpoint: str | None = None
    precision: float = 0.01
    seed: int = 0
    pixel_nm: float | None = None
    min_size_nm: float | None = None
    separate: str = "uecs"
    polarity: str = "auto"
    polling: bool = False
    allow_remote: bool = False
    analyze: Any = None
    worker_mode: str = "process"
    ship_frames: bool | None = None
    settle_s: float = 0.25
    stall_timeout_s: float = 60.0
    no_mdoc_grace_s: float = 1.0
    task_timeout_s: float = 600.0
    heartbeat_liveness: int = 5
    worker_heartbeat_s: float = 1.0
    max_attempts: int = 3
    rescan_s: float = 2.0
    strip_min_px: int | None = None
    strip_when: str = "idle"
    strip_margin_px: int | None = None
    histogram_interval_s: float = 5.0
    stats_interval_s: float = 2.0
    ledger_path: str | None = None
    statistics: Callable | None = None
    outputs: Callable | None = None


class Daemon:
    """The live analysis daemon.

    Parameters
    ----------
    folder : path-like
        Folder the frames arrive in (watched non-recursively).
    out_dir : path-like
        Outputs (particles.csv, frames.csv, summary.json, histogram.png), the ledger
        ``ledger.sqlite`` and ``daemon.json`` (the bound endpoints). Restarting with the
        same ``out_dir`` resumes.
    workers : int, optional
        Local analysis worker processes (default ``os.cpu_count()``); 0 for none (remote
        workers only).
    stats_endpoint, control_endpoint, task_endpoint, result_endpoint : str, optional
        Where to bind; see the module docstring for the defaults.
    precision, seed : float, int
        Passed to the running statistics.
    pixel_nm, min_size_nm, separate, polarity : optional
        Passed to the analysis of each frame.
    polling : bool
        Poll the folder (network shares).
    allow_remote : bool
        Allow binding to addresses other than 127.0.0.1; frames are then shipped to workers
        with each task (``ship_frames``) so that remote workers need no shared folder.
    analyze : callable or str, optional
        ``analyze(path, **options) -> FrameResult | dict``; a ``"module:function"`` string
        for worker processes, any callable with ``worker_mode="thread"``. Default: the real
        analysis.
    worker_mode : {"process", "thread"}
        Local workers as child processes (parallel) or threads (tests).
    settle_s, stall_timeout_s, no_mdoc_grace_s : float
        Completeness rules (see :class:`.watcher.Arrivals`).
    task_timeout_s, max_attempts : float, int
        A frame sent to a worker with no result after ``task_timeout_s`` is sent again, up to
        ``max_attempts`` times, then recorded failed.
    heartbeat_liveness : int
        A worker that promised heartbeats (``heartbeat_s`` in its hello) and is silent for
        this many of them is taken for dead: the frame it held and the tasks queued to it
        go to the other workers at once (``task_timeout_s`` stays the last resort for
        workers that send none).
    worker_heartbeat_s : float
        How often the local workers send theirs (remote ones: ``particlewatch worker
        --heartbeat-s``).
    rescan_s : float
        Period of the folder rescan that backs up watchdog.
    strip_min_px : int or None
        Frames of at least this many pixels (MRC or TIFF, whose size the header gives) are
        analysed as horizontal strips by several workers at once and merged
        (:mod:`particlewatch.analysis.strips`); None (default) never splits. Only with the
        default analysis. Off by default: it lowers latency only where workers have free
        cores (many-core hosts, remote workers), costs throughput for the margins, and each
        strip fits its own background and threshold (sparse frames differ slightly).
    strip_when : {"idle", "always"}
        Split only when workers would otherwise idle (fewer frames waiting or running than
        workers), or every large frame (the same split for the same frame on every run).
    strip_margin_px : int, optional
        Rows analysed beyond each cut (default: from the frame size, see
        :func:`particlewatch.analysis.strips.default_margin_px`).
    histogram_interval_s, stats_interval_s : float
        Least time between two histogram.png writes (longer where drawing would take more
        than 5% of a core); period of repeated ``stats`` messages
        while idle (for late subscribers).
    statistics : callable, optional
        ``statistics(precision=, seed=)`` -> a RunningStatistics; default the analysis one.
    outputs : callable, optional
        ``outputs(out_dir)`` -> an :class:`Outputs`-like writer; default :class:`Outputs`.

    Examples
    --------
    >>> daemon = Daemon("frames", "out", workers=2)          # doctest: +SKIP
    >>> daemon.start(); daemon.wait_converged(600); daemon.stop()   # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, out_dir: str | os.PathLike, **options):
        self.config = DaemonConfig(**options)
        cfg = self.config
        self.folder = Path(folder).resolve()
        self.out_dir = Path(out_dir).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
        if cfg.strip_when not in ("idle", "always"):
            raise ValueError(f"strip_when must be 'idle' or 'always', not {cfg.strip_when!r}")
        if cfg.strip_min_px is not None and int(cfg.strip_min_px) < 1:
            raise ValueError(f"strip_min_px must be >= 1 or None, not {cfg.strip_min_px!r}")
        if cfg.worker_mode not in ("process", "thread"):
            raise ValueError(f"worker_mode must be 'process' or 'thread', not {cfg.worker_mode!r}")
        if cfg.worker_mode == "process" and cfg.analyze is not None and not isinstance(
                cfg.analyze, str):
            raise ValueError("worker processes need analyze as a 'module:function' string")
        self.n_workers = (os.cpu_count() or 1) if cfg.workers is None else int(cfg.workers)
        self.endpoints = derive_endpoints(cfg.stats_endpoint, control=cfg.control_endpoint,
                                          tasks=cfg.task_endpoint, results=cfg.result_endpoint)
        for endpoint in self.endpoints.values():
            check_bind_allowed(endpoint, allow_remote=cfg.allow_remote)
        self.ship_frames = cfg.allow_remote if cfg.ship_frames is None else cfg.ship_frames
        self.options = {"pixel_nm": cfg.pixel_nm, "min_size_nm": cfg.min_size_nm,
                        "separate": cfg.separate, "polarity": cfg.polarity}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._converged = threading.Event()
        self._settle_requests: list[_SettleRequest] = []
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._summary: dict | None = None
        self._status: dict = {}

    # --- public API ----------------------------------------------------------------------
    def start(self, *, timeout_s: float = 60.0) -> "Daemon":
        """Run the daemon in a background thread; return once its sockets are bound."""
        if self._thread is not None:
            raise RuntimeError("daemon already started")
        self._thread = threading.Thread(target=self._run_catching, name="particlewatch-daemon",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"daemon did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start()/stop() in the caller's thread
            self._error = exc
            log.exception("daemon stopped by an error")
            self._ready.set()

    def stop(self, *, timeout_s: float = 60.0) -> None:
        """Ask the daemon to stop, finish its outputs, and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"daemon did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error

    def wait_converged(self, timeout: float | None = None) -> bool:
        """Block until the statistics converge (True) or ``timeout`` seconds pass (False).

        Frames analysed after convergence can undo it (a frame unlike the others widens a
        fraction's interval); the flag then clears, and a ``converged`` message is sent
        again when the statistics converge again.
        """
        return self._converged.wait(timeout)

    def settle(self, timeout: float | None = 60.0) -> dict | None:
        """Recompute the statistics as :meth:`stop` will (every frame done, in name order)
        and return that summary; convergence is announced or withdrawn accordingly.

        What a session decides on after the last frame is analysed: the stop verdict then
        agrees with the final report, whatever order the workers finished in.

        Raises
        ------
        TimeoutError
            The daemon did not answer within ``timeout`` seconds.
        """
        request = _SettleRequest()
        with self._lock:
            self._settle_requests.append(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        # short waits: a daemon that stops or dies meanwhile answers no request
        while not request.done.wait(0.1):
            if self._error is not None:
                raise self._error
            if not self.running:
                raise RuntimeError("the daemon is not running: nothing to settle")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not settle its statistics within {timeout} s")
        return request.summary

    def wait_idle(self, timeout: float | None = None, *, frames: int | None = None) -> bool:
        """Block until nothing is waiting, pending or running (and, if given, at least
        ``frames`` frames are done); False after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                status = dict(self._status)
            done = status.get("frames_ok", 0) + status.get("frames_failed", 0)
            if status.get("idle") and (frames is None or done >= frames):
                return True
            if self._thread is not None and not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        """Whether the daemon's thread is running (started and not stopped or dead)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def summary(self) -> dict | None:
        """The latest statistics summary (as published), or None before the first frame."""
        with self._lock:
            return self._summary

    def status(self) -> dict:
        """Counts per status, queue, workers, endpoints (as the ``status`` request answers)."""
        with self._lock:
            return dict(self._status)

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Run in the calling thread until :meth:`stop` or a ``stop`` request."""
        import zmq

        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ledger_path = Path(cfg.ledger_path) if cfg.ledger_path else self.out_dir / "ledger.sqlite"
        self.ledger = Ledger(ledger_path, folder=self.folder)
        self._exclude = [ledger_path, Path(str(ledger_path) + "-wal"),
                         Path(str(ledger_path) + "-shm")]
        self._outputs = (cfg.outputs or Outputs)(self.out_dir)
        self._painter = _Painter(self._outputs.histogram)
        self._new_stats = cfg.statistics or _default_statistics
        ctx = zmq.Context()
        self._ctx = ctx
        sockets = []

        def make(kind, key, **options):
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            for name, value in options.items():  # before bind: pipes take them when made
                sock.setsockopt(getattr(zmq, name), value)
            sockets.append(sock)
            self.endpoints[key] = _bind(sock, self.endpoints[key])
            return sock

        self._events = None
        self._procs: list[subprocess.Popen] = []
        # workers that exit before their first message (a broken install, an import error):
        # said once on the stream and respawned with a growing delay, not in a tight loop
        self._failed_starts = 0
        self._respawn_due: list[float] = []
        self._threads: list[threading.Thread] = []
        self._worker_stop = threading.Event()
        try:
            self._pub = make(zmq.PUB, "stats")
            self._control = ctx.socket(zmq.REP)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.setsockopt(zmq.MAXMSGSIZE, messages.HARD_CONTROL_BYTES)
            sockets.append(self._control)
            self.endpoints["control"] = _bind(self._control, self.endpoints["control"])
            # SNDHWM 1: when a worker's pipe is full, PUSH moves on to the next worker
            self._tasks = make(zmq.PUSH, "tasks", SNDHWM=1)
            self._results = make(zmq.PULL, "results", MAXMSGSIZE=messages.MAX_RESULT_BYTES)
            self._recover()
            self._events = FolderEvents(self.folder, polling=cfg.polling)
            self._events.start()
            self._start_workers()
            self._write_daemon_json()  # tells other processes the daemon is up
            self._ready.set()
            self._loop(zmq)
            self._finish()
        finally:
            self._ready.set()
            self._painter.close()
            if self._events is not None:
                self._events.stop()
            self._stop_workers()
            for sock in sockets:
                sock.close(linger=0)
            ctx.term()
            self.ledger.close()

    def _write_daemon_json(self) -> None:
        info = {"schema_version": 1, "pid": os.getpid(), "folder": str(self.folder),
                "endpoints": self.endpoints}
        tmp = self.out_dir / ".daemon.json.part"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.out_dir / "daemon.json")

    def _recover(self) -> None:
        """Rebuild statistics and outputs from the ledger; re-send unfinished frames."""
        requeued = self.ledger.requeue_all_running()
        if requeued:
            log.info("%d frame(s) were being analysed when the daemon stopped: sent again",
                     requeued)
        self._arrivals = Arrivals(settle_s=self.config.settle_s,
                                  stall_timeout_s=self.config.stall_timeout_s,
                                  no_mdoc_grace_s=self.config.no_mdoc_grace_s)
        self._known = self.ledger.identities()
        self._in_flight: dict[str, _Task] = {}  # task id -> task
        self._splits: dict[str, _Split] = {}  # name -> its strips, while analysed in strips
        self._whole: dict[str, str] = {}  # name -> why its strips fell back to a whole frame
        self._workers_seen: dict[str, _Worker] = {}
        self._announced_converged = False
        self._histogram_due = False
        self._dirty = False
        self._last_histogram = 0.0
        self._last_stats = 0.0
        self._next_rescan = 0.0
        self._next_expiry = 0.0
        # tasks of workers that said bye, sent again once their pipes are surely closed
        self._leaving: list[tuple[float, str | None]] = []
        # workers that said bye, and when: a heartbeat from another socket may come after
        self._said_bye: dict[str, float] = {}
        self._rebuild_statistics(order="done", rewrite=True)
        if self._summary_now is not None and self._stats_converged():
            # a restart after convergence: the flag holds, and repeated stats messages say so
            self._announced_converged = True
            self._converged.set()

    def _rebuild_statistics(self, *, order: str, rewrite: bool) -> None:
        stats = self._new_stats(precision=self.config.precision, seed=self.config.seed)
        results = []
        self._in_stats: set[str] = set()
        for entry in self.ledger.done(order=order):
            results.append(entry.result)
            self._in_stats.add(entry.name)
            if entry.status == "ok":
                stats.add(entry.result["frame"], entry.result.get("particles") or {})
        self._stats = stats
        self._summary_now = None
        if results:
            self._summary_now = self._make_summary()
        if rewrite and (results or (self.out_dir / "frames.csv").exists()):
            self._outputs.rewrite(results, stats)
            if self._summary_now is not None:
                self._outputs.summary(self._summary_now)
                self._outputs.histogram(stats, self._summary_now)
        with self._lock:
            self._summary = self._summary_now

    def _make_summary(self) -> dict:
        counts = self.ledger.counts()
        return messages.to_jsonable(self._stats.summary(frames_ok=counts["ok"],
                                                        frames_failed=counts["failed"]))

    def _stats_converged(self) -> bool:
        return bool(self._summary_now and self._summary_now.get("converged"))

    def _loop(self, zmq) -> None:
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(50))
            now = time.monotonic()
            if self._results in events:
                for _ in range(64):  # bounded, so control and the watcher get their turn
                    try:
                        parts = self._results.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_worker_message(parts)
            if self._control in events:
                self._on_control(self._control.recv_multipart())
            for path in self._events.drain():
                self._nominate(path, now)
            if now >= self._next_rescan:
                self._rescan(now)
                self._next_rescan = now + self.config.rescan_s
            for arrival in self._arrivals.look(time.monotonic()):
                self._admit(arrival)
            if self._leaving and now >= self._leaving[0][0]:
                due = [task for at, task in self._leaving if at <= now]
                self._leaving = [(at, task) for at, task in self._leaving if at > now]
                for task in due:
                    self._requeue_unstarted(also=task)
            if now >= self._next_expiry:
                self._expire(now)
                self._supervise_workers()
                self._check_heartbeats(now)
                self._next_expiry = now + 0.5
            self._flush()
            self._settle()
            self._dispatch(zmq)
            self._periodic(now)

    # --- ingest --------------------------------------------------------------------------
    def _nominate(self, path: Path, now: float, st: os.stat_result | None = None) -> None:
        if path.parent != self.folder or path in self._arrivals:
            return
        kind = classify_name(path)
        if kind == "ignore":
            if path.name.lower().endswith(".mdoc"):  # a late .mdoc: look at its frame again
                frame = path.with_name(path.name[:-5])
                if frame in self._arrivals:
                    self._arrivals.nominate(frame, now)
            return
        if path.name in OUTPUT_NAMES and self.out_dir == self.folder:
            return
        if path in self._exclude:
            return
        try:
            st = st or os.stat(path)
        except OSError:
            return
        if self._known.get(path.name) == (st.st_size, st.st_mtime_ns):
            return  # known content: nothing to do
        self._arrivals.nominate(path, now)

    def _rescan(self, now: float) -> None:
        for path, st in scan_folder(self.folder, exclude=self._exclude):
            self._nominate(path, now, st)

    def _admit(self, arrival) -> None:
        if arrival.reason == "gone":
            return
        name = arrival.path.name
        try:
            digest = sha256_file(arrival.path)
            st = os.stat(arrival.path)
        except OSError as exc:
            log.warning("%s: cannot read (%s); will look again", arrival.path, exc)
            return
        if (st.st_size, st.st_mtime_ns) != (arrival.size, arrival.mtime_ns):
            self._arrivals.nominate(arrival.path, time.monotonic())  # changed while hashing
            return
        self._known[name] = (st.st_size, st.st_mtime_ns)
        reason = arrival.reason
        if not reason and classify_name(name) == "unsupported":
            reason = (f"unsupported file type {arrival.path.suffix or '(none)'!r}; frames are "
                      f"{' '.join(FRAME_SUFFIXES)}")
        if reason:
            reason = f"{arrival.path}: {reason}"
            result = failed_result(name, str(arrival.path), reason)
            result["stage"] = "discovery"
            if self.ledger.fail_discovery(name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                          sha256=digest, reason=reason, result=result):
                self._forget(name)
                log.warning("%s", reason)
                self._on_done(name, result)
            return
        action = self.ledger.admit(name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                   sha256=digest)
        if action == "modified":
            log.info("%s: content changed; analysing it again", arrival.path)
            self._forget(name)

    # --- workers -------------------------------------------------------------------------
    def _max_in_flight(self) -> int:
        # two per worker that said hello: one analysed, one queued (PUSH round-robins, so
        # more would pile up behind a slow worker while another idles)
        return 2 * max(len(self._workers_seen), 1)

    def _worker_count(self) -> int:
        return max(self.n_workers, len(self._workers_seen))

    def _dispatch(self, zmq) -> None:
        for split in list(self._splits.values()):  # strips to (re)send come first: older work
            if not self._send_unsent(zmq, split, limit=True):
                return
        room = self._max_in_flight() - len(self._in_flight)
        if room <= 0:
            return
        for entry in self.ledger.pending(room):
            if len(self._in_flight) >= self._max_in_flight():
                return
            if entry.attempts >= self.config.max_attempts:
                self._give_up(entry)
                continue
            task_id = f"{entry.id}.{entry.attempts + 1}.{uuid.uuid4().hex[:8]}"
            plan = self._plan_split(entry)
            if plan:
                self.ledger.mark_running(entry.name, task_id=task_id)
                split = _Split(entry=entry, token=task_id, strips=plan,
                               unsent=[s.index for s in plan])
                self._splits[entry.name] = split
                log.info("%s: analysed as %d strips", entry.name, len(plan))
                if not self._send_unsent(zmq, split, limit=False):
                    return
                continue
            sent = self._send(zmq, entry, task_id)
            if sent is None:
                continue
            if not sent:  # no worker connected yet
                return
            self.ledger.mark_running(entry.name, task_id=task_id)
            self._in_flight[task_id] = _Task(entry.name, time.monotonic(), entry.sha256)

    def _send(self, zmq, entry: Entry, task_id: str, strip: dict | None = None) -> bool | None:
        """Send one task; False when no worker takes it now, None when the frame cannot be
        read to ship it."""
        path = self.folder / entry.name
        header = {"type": "task", "task_id": task_id, "name": entry.name, "path": str(path),
                  "size": entry.size, "mtime_ns": entry.mtime_ns, "sha256": entry.sha256,
                  "options": self.options, "mdoc": False}
        if strip is not None:
            header["strip"] = strip
        parts: list[bytes] = []
        if self.ship_frames:
            try:
                parts.append(path.read_bytes())
                mdoc = Path(str(path) + ".mdoc")
                if mdoc.exists():
                    parts.append(mdoc.read_bytes())
                    header["mdoc"] = True
            except OSError as exc:
                log.warning("%s: cannot read to ship (%s)", path, exc)
                return None
        try:
            self._tasks.send_multipart([messages.encode(header), *parts], zmq.NOBLOCK,
                                       copy=False)
        except zmq.Again:
            return False
        return True

    def _plan_split(self, entry: Entry) -> list:
        """The strips to analyse ``entry`` as, or [] to analyse it whole."""
        cfg = self.config
        if cfg.strip_min_px is None or cfg.analyze is not None or entry.name in self._whole:
            return []
        from ..analysis.strips import frame_shape, plan_strips

        shape = frame_shape(self.folder / entry.name)
        if shape is None or shape[0] * shape[1] < cfg.strip_min_px:
            return []
        workers = self._worker_count()
        if cfg.strip_when == "idle":
            frames = self.ledger.counts()["pending"] + len(
                {t.name for t in self._in_flight.values()})
            if frames >= workers:  # every worker has a frame of its own: no idle worker
                return []
        plan = plan_strips(shape, workers, margin_px=cfg.strip_margin_px)
        return plan if len(plan) > 1 else []

    def _send_unsent(self, zmq, split: _Split, *, limit: bool) -> bool:
        """Send the strips of ``split`` not sent yet (all of a new plan: they are meant for
        idle workers; resent ones within the in-flight limit). False when no worker takes
        one now."""
        while split.unsent and self._splits.get(split.entry.name) is split:
            if limit and len(self._in_flight) >= self._max_in_flight():
                return True
            if not self._send_strip(zmq, split, split.unsent[0]):
                return False
            if split.unsent:
                split.unsent.pop(0)
        return True

    def _send_strip(self, zmq, split: _Split, index: int) -> bool:
        """Send strip ``index`` of ``split``; False when no worker takes it now."""
        if split.sends.get(index, 0) >= self.config.max_attempts:
            self._fail(split.entry, f"{self.folder / split.entry.name}: strip {index}: no "
                                    f"result after {split.sends[index]} attempt(s) (worker "
                                    f"died or took over {self.config.task_timeout_s:g} s)")
            return True
        split.sends[index] = split.sends.get(index, 0) + 1
        task_id = f"{split.token}.s{index}.{split.sends[index]}"
        sent = self._send(zmq, split.entry, task_id, split.strips[index].to_dict())
        if sent is None:  # unreadable now: the frame is analysed whole, and fails there
            split.sends[index] -= 1
            self._fall_back(split.entry.name, "frame not readable to ship its strips")
            return True
        if not sent:
            split.sends[index] -= 1
            return False
        self._in_flight[task_id] = _Task(split.entry.name, time.monotonic(), split.entry.sha256,
                                         strip=index)
        return True

    def _forget(self, name: str) -> None:
        """Drop every task, strip and fallback note of ``name`` (done or changed)."""
        for task_id in [t for t, task in self._in_flight.items() if task.name == name]:
            del self._in_flight[task_id]
        self._splits.pop(name, None)
        self._whole.pop(name, None)

    def _give_up(self, entry: Entry) -> None:
        self._fail(entry, f"{self.folder / entry.name}: no result after {entry.attempts} "
                          f"attempt(s) (worker died or took over "
                          f"{self.config.task_timeout_s:g} s)")

    def _fail(self, entry: Entry, reason: str) -> None:
        result = failed_result(entry.name, str(self.folder / entry.name), reason)
        self._forget(entry.name)
        if self.ledger.finish(entry.name, sha256=entry.sha256, status="failed", reason=reason,
                              result=result) is not None:
            log.error("%s", reason)
            self._on_done(entry.name, result)

    def _fall_back(self, name: str, why: str) -> None:
        """Analyse a split frame whole after all (a strip failed or a margin was too small)."""
        log.info("%s: analysed whole instead of in strips: %s", name, why)
        self._forget(name)
        self._whole[name] = why
        self.ledger.requeue(name)

    def _expire(self, now: float) -> None:
        for task_id, task in list(self._in_flight.items()):
            if now - task.sent > self.config.task_timeout_s:
                log.warning("%s: no result for %.0f s; sending it again", task.name,
                            now - task.sent)
                self._requeue(task_id)

    def _requeue_unstarted(self, *, also: str | None = None) -> None:
        """Send again every task no living worker has started (and ``also``)."""
        started = {w.task for w in self._workers_seen.values() if w.task}
        for task_id in list(self._in_flight):
            if task_id not in started or task_id == also:
                self._requeue(task_id)

    def _requeue(self, task_id: str) -> None:
        """Send a task again: a whole frame through the ledger, a strip from its split."""
        task = self._in_flight.pop(task_id, None)
        if task is None:
            return
        if task.strip is None:
            self.ledger.requeue(task.name)
            return
        split = self._splits.get(task.name)
        if (split is not None and task.strip not in split.results
                and task.strip not in split.unsent
                and not any(t.name == task.name and t.strip == task.strip
                            for t in self._in_flight.values())):
            split.unsent.append(task.strip)

    def _worker_command(self) -> list[str]:
        cmd = [sys.executable, "-m", "particlewatch.daemon.worker",
               "--tasks", self._connectable(self.endpoints["tasks"]),
               "--results", self._connectable(self.endpoints["results"]),
               "--parent-pid", str(os.getpid()),
               "--heartbeat-s", repr(float(self.config.worker_heartbeat_s))]
        if isinstance(self.config.analyze, str):
            cmd += ["--analyze", self.config.analyze]
        return cmd

    @staticmethod
    def _connectable(endpoint: str) -> str:
        scheme, host, port = _split_endpoint(endpoint)
        if scheme == "tcp" and host in ("0.0.0.0", "*", "[::]"):
            return f"tcp://127.0.0.1:{port}"
        return endpoint

    def _start_workers(self) -> None:
        for _ in range(self.n_workers):
            self._spawn_worker()

    def _spawn_worker(self) -> None:
        if self.config.worker_mode == "process":
            self._procs.append(subprocess.Popen(self._worker_command(), stdin=subprocess.DEVNULL))
            return
        analyze = self.config.analyze
        if isinstance(analyze, str):
            analyze = load_callable(analyze)
        thread = threading.Thread(
            target=run_worker, daemon=True, name="particlewatch-worker",
            args=(self._connectable(self.endpoints["tasks"]),
                  self._connectable(self.endpoints["results"])),
            kwargs={"analyze": analyze, "stop": self._worker_stop, "poll_ms": 100,
                    "heartbeat_s": self.config.worker_heartbeat_s})
        thread.start()
        self._threads.append(thread)

    def _supervise_workers(self) -> None:
        """Replace local worker processes that died; re-send what they were analysing."""
        for proc in list(self._procs):
            code = proc.poll()
            if code is None:
                continue
            self._procs.remove(proc)
            prefix = f"{_socket.gethostname()}:{proc.pid}:"
            ever_started = any(w.startswith(prefix) for w in self._workers_seen)
            for wid in [w for w in self._workers_seen if w.startswith(prefix)]:
                worker = self._workers_seen.pop(wid)
                task = self._in_flight.get(worker.task or "")
                if task is not None:
                    log.warning("%s%s: its worker (pid %d) died with code %s; sending it again",
                                task.name, "" if task.strip is None else f" strip {task.strip}",
                                proc.pid, code)
            # Tasks queued for the dead worker are lost with it, and PUSH does not say which
            # those were: send again every task no living worker has started. A duplicate
            # result is ignored by the ledger, a lost frame would be waited for until timeout.
            self._requeue_unstarted()
            if self._stop.is_set():
                continue
            if ever_started:
                self._failed_starts = 0
                self._spawn_worker()
                continue
            self._failed_starts += 1
            delay_s = min(30.0, 0.5 * 2 ** self._failed_starts)
            if self._failed_starts in (1, 3) or self._failed_starts % 10 == 0:
                self._report_error(
                    f"worker process {proc.pid} exited with code {code} before taking work "
                    f"({self._failed_starts} in a row; its error is on the daemon's stderr); "
                    f"starting another in {delay_s:.0f} s")
            self._respawn_due.append(time.monotonic() + delay_s)
        now = time.monotonic()
        for due in [t for t in self._respawn_due if t <= now]:
            self._respawn_due.remove(due)
            if not self._stop.is_set():
                self._spawn_worker()

    def _stop_workers(self) -> None:
        self._worker_stop.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(5)

    def _on_worker_message(self, parts: list[bytes]) -> None:
        try:
            if len(parts) != 1:
                raise messages.MessageError(f"worker message has {len(parts)} parts, expected 1")
            msg = messages.validate_worker_message(
                messages.decode(parts[0], max_bytes=messages.MAX_RESULT_BYTES))
        except messages.MessageError as exc:
            self._on_bad_worker_message(parts, exc)
            return
        now = time.monotonic()
        if msg["type"] == "heartbeat" and msg["worker"] in self._said_bye:
            return  # sent from its own socket before the bye, overtaken by it
        worker = self._workers_seen.setdefault(msg["worker"], _Worker(last_seen=now))
        worker.last_seen = now
        if "heartbeat_s" in msg:
            worker.heartbeat_s = msg["heartbeat_s"]
        if msg["type"] == "bye":
            self._workers_seen.pop(msg["worker"], None)
            self._said_bye[msg["worker"]] = now
            if worker.task is not None and worker.task in self._in_flight:
                # stopped mid-frame (Ctrl-C on a remote worker): the frame would otherwise
                # wait task_timeout_s; its queued tasks went with its socket, as for a
                # local worker that died
                log.warning("worker %s left during task %s; sending again what it held",
                            msg["worker"], worker.task)
                # not at once: until the daemon's socket has seen the worker's task pipe
                # close, a task sent now could go down it and be lost with it
                self._leaving.append((now + _LEAVING_GRACE_S, worker.task))
        elif msg["type"] == "started":
            lost = worker.task
            worker.task = msg["task_id"]
            if lost is not None and lost != msg["task_id"] and lost in self._in_flight:
                # One worker's messages arrive in the order sent, and a worker sends each
                # task's result before it starts the next: that result was dropped (not
                # JSON, too large, or it never reached us). Waiting would wait for ever.
                self._task_failed(lost, f"worker {msg['worker']} went on to another task "
                                        "without a valid result for it (see the daemon's "
                                        "log for the message dropped)")
        elif msg["type"] == "result":
            worker.task = None
            task = self._in_flight.get(msg["task_id"])
            if task is not None and (task.name, task.sha256) != (msg["name"], msg["sha256"]):
                self._task_failed(msg["task_id"], f"worker {msg['worker']} sent a result for "
                                                  f"{msg['name']} to this frame's task")
                return
            self._on_result(msg)

    def _check_heartbeats(self, now: float) -> None:
        """Take a worker silent for ``heartbeat_liveness`` of its heartbeats for dead (killed,
        its host gone): what it held goes to the others, as on a bye, instead of waiting
        ``task_timeout_s``. A worker that speaks again is simply heard again; its result,
        should one still come, is counted once like any other."""
        liveness = self.config.heartbeat_liveness
        for wid, worker in list(self._workers_seen.items()):
            if worker.heartbeat_s is None or \
                    now - worker.last_seen <= worker.heartbeat_s * liveness:
                continue
            self._workers_seen.pop(wid)
            log.warning("worker %s silent for %.1f s (heartbeat every %g s): taken for dead%s",
                        wid, now - worker.last_seen, worker.heartbeat_s,
                        f"; sending task {worker.task} again" if worker.task else "")
            # its queued tasks went with it too: after the grace a bye gets (its pipe closed)
            self._leaving.append((now + _LEAVING_GRACE_S,
                                  worker.task if worker.task in self._in_flight else None))
        for wid, at in list(self._said_bye.items()):
            if now - at > 60.0:
                del self._said_bye[wid]

    def _on_bad_worker_message(self, parts: list[bytes], exc: Exception) -> None:
        """A worker message that fails the check: if it is a result whose task we know, that
        frame (or strip) fails with the reason; the daemon goes on either way."""
        self._report_error(f"bad message from a worker ignored: {exc}")
        try:
            raw = json.loads(parts[0]) if len(parts[0]) <= messages.MAX_RESULT_BYTES else None
        except (ValueError, UnicodeDecodeError, IndexError):
            return
        if not isinstance(raw, dict) or raw.get("type") != "result":
            return
        task_id, worker_id = raw.get("task_id"), raw.get("worker")
        if isinstance(worker_id, str) and worker_id in self._workers_seen:
            self._workers_seen[worker_id].task = None
        task = self._in_flight.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            return
        if (raw.get("name"), raw.get("sha256")) != (task.name, task.sha256):
            # as for a valid result: a message that names another frame (or none) fails no
            # frame on its say-so
            log.warning("invalid result for task %s names %r, not %s: no frame failed",
                        task_id, raw.get("name"), task.name)
            return
        who = f"worker {worker_id}" if isinstance(worker_id, str) else "a worker"
        self._task_failed(task_id, f"{who} sent an invalid result: {exc}")

    def _task_failed(self, task_id: str, why: str) -> None:
        """Task ``task_id`` will bring no usable result: a whole frame is recorded failed
        (against the content the task was for), a strip's frame is analysed whole instead."""
        task = self._in_flight.pop(task_id, None)
        if task is None:
            return
        if task.strip is not None:
            if task.name in self._splits:
                self._fall_back(task.name, f"strip {task.strip}: {why}")
            return
        path = self.folder / task.name
        reason = f"{path}: {why}"
        result = failed_result(task.name, str(path), reason)
        if self.ledger.finish(task.name, sha256=task.sha256, status="failed", reason=reason,
                              result=result) is None:
            return  # already done, or the file changed since: nothing to record
        log.error("%s", reason)
        self._forget(task.name)
        self._on_done(task.name, result)

    def _on_result(self, msg: dict) -> None:
        name = msg["name"]
        result = dict(msg["result"])
        result["path"] = str(self.folder / name)
        result["frame"] = result.get("frame") or Path(name).stem
        if "strip" in result:
            self._on_strip_result(msg, result)
            return
        self._in_flight.pop(msg["task_id"], None)
        if name in self._whole:
            result.setdefault("warnings", []).append(
                f"analysed whole, not in strips: {self._whole[name]}")
        try:
            self._check_result(result)
        except (ValueError, TypeError, KeyError) as exc:  # another version: the frame fails
            result = failed_result(name, result["path"],
                                   f"{result['path']}: worker {msg['worker']} sent an invalid "
                                   f"result: {exc}")
        reason = result.get("reason")
        if result["status"] == "failed" and not reason:
            reason = result["reason"] = f"{result['path']}: analysis failed (no reason given)"
        seq = self.ledger.finish(name, sha256=msg["sha256"], status=result["status"],
                                 reason=reason, result=result)
        if seq is None:
            log.info("%s: result of task %s ignored (already done or content changed)",
                     name, msg["task_id"])
            return
        self._forget(name)
        self._on_done(name, result)

    def _on_strip_result(self, msg: dict, result: dict) -> None:
        """Keep one strip's result; when all are in, merge them and finish the frame (or
        analyse it whole after all)."""
        from ..analysis.strips import StripResult, merge_strips

        name = msg["name"]
        task = self._in_flight.pop(msg["task_id"], None)
        split = self._splits.get(name)
        if (split is None or not msg["task_id"].startswith(split.token + ".s")
                or msg["sha256"] != split.entry.sha256):
            log.info("%s: strip result of task %s ignored (not of the current plan)", name,
                     msg["task_id"])
            return
        try:
            strip_result = StripResult.from_message(result)
        except (ValueError, TypeError, KeyError) as exc:
            self._fall_back(name, f"worker {msg['worker']} sent an invalid strip result: {exc}")
            return
        index = strip_result.strip.index
        if (index >= len(split.strips) or strip_result.strip != split.strips[index]
                or (task is not None and task.strip != index)):
            self._fall_back(name, f"worker {msg['worker']} sent strip {index} of another plan")
            return
        split.results.setdefault(index, strip_result)
        if index in split.unsent:
            split.unsent.remove(index)
        if len(split.results) < len(split.strips):
            return
        try:
            merged, why = merge_strips(list(split.results.values()))
        except ValueError as exc:
            merged, why = None, str(exc)
        if merged is None:
            self._fall_back(name, why)
            return
        merged_msg = messages.to_jsonable(merged.to_message())
        merged_msg["path"] = str(self.folder / name)
        seq = self.ledger.finish(name, sha256=split.entry.sha256, status="ok", reason=None,
                                 result=merged_msg)
        self._forget(name)
        if seq is None:
            log.info("%s: merged strips ignored (already done or content changed)", name)
            return
        self._on_done(name, merged_msg)

    @staticmethod
    def _check_result(result: dict) -> None:
        """Raise ValueError unless ``result`` is a valid ``FrameResult`` message."""
        try:
            from ..analysis.pipeline import FrameResult
        except ImportError:  # results of an injected analysis are checked by messages only
            return
        FrameResult.from_message(result)

    # --- results -> statistics, outputs, stream ------------------------------------------
    def _on_done(self, name: str, result: dict) -> None:
        """A frame is done (its result already durable in the ledger): count it, append its
        rows, announce it. The summary follows in :meth:`_flush`, once per batch."""
        if name in self._in_stats:  # a new result replaces an old one: start over
            self._rebuild_statistics(order="done", rewrite=True)
        else:
            self._in_stats.add(name)
            if result["status"] == "ok":
                self._stats.add(result["frame"], result.get("particles") or {})
            self._outputs.append(result)
        self._dirty = True
        frame_msg = {"type": "frame", "frame": result["frame"], "path": result["path"],
                     "status": result["status"], "reason": result.get("reason"),
                     "particles": len(next(iter((result.get("particles") or {}).values()), [])),
                     **{k: result.get(k) for k in ("pixel_nm", "defocus_um", "stage_x_um",
                                                   "stage_y_um", "seconds")}}
        self._publish(frame_msg)
        if result["status"] == "failed":
            self._publish({"type": "error", "error": result.get("reason"),
                           "path": result["path"]})

    def _flush(self) -> None:
        """After the frames that came in together: summary.json, ``stats``, ``converged``."""
        if not self._dirty:
            return
        self._dirty = False
        self._summary_now = self._make_summary()
        self._outputs.summary(self._summary_now)
        self._histogram_due = True
        with self._lock:
            self._summary = self._summary_now
        self._publish_stats()
        self._announce()

    def _announce(self) -> None:
        """Send ``converged`` when the statistics converge; withdraw the flag when later
        frames undo it, so the next convergence is announced again."""
        if self._stats_converged() and not self._announced_converged:
            self._announced_converged = True
            self._publish({"type": "converged", **self._summary_now})
            self._converged.set()
        elif self._announced_converged and not self._stats_converged():
            self._announced_converged = False
            self._converged.clear()
            reason = (self._summary_now or {}).get("convergence", {}).get("reason", "")
            log.info("statistics no longer converged: %s", reason)

    def _settle(self) -> None:
        with self._lock:
            requests, self._settle_requests = self._settle_requests, []
        if not requests:
            return
        self._rebuild_statistics(order="name", rewrite=True)
        if self._summary_now is not None:
            self._publish_stats()
            self._announce()
        for request in requests:
            request.summary = self._summary_now
            request.done.set()

    def _publish(self, message: dict) -> None:
        self._pub.send(messages.encode(message))

    def _publish_stats(self) -> None:
        self._last_stats = time.monotonic()
        if self._summary_now is not None:
            self._publish({"type": "stats", **self._summary_now, "queue": self._queue_state()})

    def _queue_state(self) -> dict:
        counts = self.ledger.counts()
        return {"waiting": len(self._arrivals), "pending": counts["pending"],
                "running": counts["running"], "frames_ok": counts["ok"],
                "frames_failed": counts["failed"], "workers": len(self._workers_seen)}

    def _report_error(self, text: str) -> None:
        log.error("%s", text)
        self._publish({"type": "error", "error": text})

    def _periodic(self, now: float) -> None:
        cfg = self.config
        # at most 1/20 of a core for the picture (0.3 s of CPU each on 10,000 particles):
        # the cores are the workers'
        interval = max(cfg.histogram_interval_s, 20.0 * self._painter.cpu_s)
        if self._histogram_due and now - self._last_histogram >= interval:
            self._histogram_due = False
            self._last_histogram = now
            self._painter.submit(self._stats, self._summary_now)
        if now - self._last_stats >= cfg.stats_interval_s:
            self._publish_stats()
        queue = self._queue_state()
        queue["idle"] = (queue["waiting"] == 0 and queue["pending"] == 0
                         and queue["running"] == 0)
        with self._lock:
            self._status = {**queue, "converged": self._stats_converged(),
                            "endpoints": dict(self.endpoints), "folder": str(self.folder),
                            "out": str(self.out_dir)}

    # --- control -------------------------------------------------------------------------
    def _on_control(self, parts: list[bytes]) -> None:
        try:
            if len(parts) != 1:
                raise messages.MessageError(f"request has {len(parts)} parts, expected 1")
            request = messages.validate_control(
                messages.decode(parts[0], max_bytes=messages.MAX_CONTROL_BYTES),
                folder=self.folder)
            reply = self._answer(request)
        except messages.MessageError as exc:
            log.warning("control request rejected: %s", exc)
            reply = messages.error_reply(str(exc))
        self._control.send(messages.encode(reply))

    def _answer(self, request: dict) -> dict:
        kind = request["type"]
        if kind == "status":
            self._periodic(time.monotonic())
            with self._lock:
                return {"type": "status", **self._status, "ok": True}
        if kind == "stop":
            self._stop.set()
            return {"type": "stop", "ok": True}
        if kind == "rescan":
            self._next_rescan = 0.0
            return {"type": "rescan", "ok": True}
        path: Path = request["path"]
        if path.parent != self.folder or not path.is_file():
            raise messages.MessageError(f"{path} is not a file directly in {self.folder}")
        if classify_name(path) != "frame":
            raise messages.MessageError(f"{path} is not a frame ({' '.join(FRAME_SUFFIXES)})")
        if not self.ledger.reanalyze(path.name):
            self._known.pop(path.name, None)
            self._arrivals.nominate(path, time.monotonic())
        self._periodic(time.monotonic())  # so status and wait_idle see the new work at once
        return {"type": "analyze", "ok": True, "path": str(path)}

    # --- stop ----------------------------------------------------------------------------
    def _finish(self) -> None:
        """Final outputs in canonical (name) order, so any run over the same frames —
        interrupted or not, with any number of workers — ends with the same files."""
        self._painter.close()  # its last picture must not overwrite the final one
        self._rebuild_statistics(order="name", rewrite=True)
        if self._summary_now is not None:
            self._publish_stats()
        log.info("daemon stopped: %s", self.ledger.counts())


def request(endpoint: str, message: dict | bytes, *, timeout_s: float = 5.0,
            retries: int = 3) -> dict:
    """Send one control request and return the reply (Lazy Pirate: poll, retry, give up).

    Parameters
    ----------
    endpoint : str
        The daemon's control endpoint.
    message : dict or bytes
        A request such as ``{"type": "status"}`` (``schema_version`` is added), or raw bytes.

    Raises
    ------
    TimeoutError
        No reply after ``retries`` attempts of ``timeout_s`` each.
    """
    import zmq

    payload = message if isinstance(message, bytes) else messages.encode(message)
    ctx = zmq.Context.instance()
    for _ in range(retries):
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send(payload)
            if sock.poll(int(timeout_s * 1000)):
                return json.loads(sock.recv())
        finally:
            sock.close(linger=0)
    raise TimeoutError(f"no reply from {endpoint} after {retries} x {timeout_s:g} s")
