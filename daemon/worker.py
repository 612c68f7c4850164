"""An analysis worker: PULL a task, analyse the frame, PUSH the result (zguide ``taskwork``).

A task is a JSON header (:func:`..messages.validate_task`) optionally followed by the
frame's bytes and its ``.mdoc``'s bytes, so a worker on another host needs no shared
folder. A task may name one ``strip`` of a large frame (:mod:`..analysis.strips`): the worker
then analyses those rows with their margin and the daemon merges the strips. The worker
announces itself (``hello``), says when it starts a task (``started``,
so the daemon can re-send at once the tasks of a local worker that died) and sends each
result as JSON, never pickle. It exits when its parent process is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import os
import socket as _socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import messages

log = logging.getLogger("particlewatch.daemon.worker")

AnalyzeFn = Callable[..., Any]


def load_callable(spec: str) -> AnalyzeFn:
    """Import ``"package.module:function"`` and return the function.

    Raises
    ------
    ValueError
        If ``spec`` is not of that form or names nothing callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"analysis function {spec!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"analysis function {spec!r} is not callable")
    return obj


def default_analyze(path, **options):
    """The real analysis: :func:`particlewatch.analysis.pipeline.analyze_frame`."""
    from ..analysis.pipeline import analyze_frame

    return analyze_frame(path, **options)


def result_to_message(result: Any) -> dict:
    """The message dict of an analysis result (``FrameResult.to_message()`` or a dict).

    Not walked value by value: :func:`..messages.encode` makes numpy values and NaN plain
    where a result holds any (``to_message`` gives plain JSON values already).
    """
    if hasattr(result, "to_message"):
        result = result.to_message()
    if not isinstance(result, dict):
        raise TypeError(f"analysis returned {type(result).__name__}, not a FrameResult or dict")
    return dict(result)


def failed_result(name: str, path: str, reason: str, *, seconds: float = 0.0) -> dict:
    """A result dict for a frame that could not be analysed."""
    return {"frame": Path(name).stem, "path": path, "status": "failed", "reason": reason,
            "pixel_nm": None, "defocus_um": None, "stage_x_um": None, "stage_y_um": None,
            "seconds": seconds, "particles": {}}


def validate_strip_task(header: dict) -> tuple[dict, Any]:
    """Check a task header that may carry a ``strip`` (one strip of a large frame).

    Returns
    -------
    task : dict
        As :func:`..messages.validate_task` gives it.
    strip : Strip or None
        The strip to analyse (:class:`particlewatch.analysis.strips.Strip`), or None for the
        whole frame.

    Raises
    ------
    MessageError
        A bad task or a ``strip`` that is not one.
    """
    header = dict(header)
    strip = header.pop("strip", None)
    task = messages.validate_task(header)
    if strip is None:
        return task, None
    from ..analysis.strips import Strip

    try:
        return task, Strip.from_dict(strip)
    except ValueError as exc:
        raise messages.MessageError(f"task strip: {exc}") from None


def analyze_strip_task(path, strip, **options) -> dict:
    """The real analysis of one strip, as a JSON-safe dict with ``strip`` and ``too_small``."""
    from ..analysis.strips import analyze_strip

    return analyze_strip(path, strip, **options).to_message()


def analyze_task(task: dict, parts: list[bytes], analyze: AnalyzeFn, *,
                 scratch: Path, strip: Any = None) -> dict:
    """Analyse one task (the whole frame, or ``strip`` of it with the real analysis); never
    raises for a bad frame (the result says failed and why)."""
    name, path = task["name"], task["path"]
    start = time.perf_counter()
    local = Path(path)
    try:
        st = local.stat()
        usable = (st.st_size, st.st_mtime_ns) == (task["size"], task["mtime_ns"])
    except OSError:
        usable = False
    if not usable:  # not on this host (or changed): use the bytes that came with the task
        if not parts:
            return failed_result(name, path, f"{path}: not readable on worker host "
                                 f"{_socket.gethostname()} and the daemon sent no frame bytes")
        digest = hashlib.sha256(parts[0]).hexdigest()
        if digest != task["sha256"]:
            return failed_result(name, path, f"{path}: frame bytes arrived damaged "
                                 f"(sha256 {digest[:12]} != {task['sha256'][:12]})")
        local = scratch / name
        local.write_bytes(parts[0])
        mdoc = Path(str(local) + ".mdoc")
        if task["mdoc"] and len(parts) > 1:
            mdoc.write_bytes(parts[1])
        elif mdoc.exists():
            mdoc.unlink()
    try:
        if strip is None:
            result = result_to_message(analyze(str(local), **task["options"]))
        else:
            result = analyze_strip_task(str(local), strip, **task["options"])
    except Exception as exc:  # an injected analysis may raise; the frame fails, we go on
        log.error("%s: analysis raised %s", path, traceback.format_exc(limit=3))
        result = failed_result(name, path, f"{path}: analysis raised {type(exc).__name__}: "
                                           f"{exc}", seconds=time.perf_counter() - start)
    finally:
        if local.parent == scratch:
            for p in (local, Path(str(local) + ".mdoc")):
                p.unlink(missing_ok=True)
    result["path"] = path  # the daemon's path, not a scratch copy
    result.setdefault("frame", Path(name).stem)
    return result


def result_payload(task: dict, worker_id: str, result: dict) -> bytes:
    """The encoded ``result`` message of ``task``; a result that cannot be sent as it is (not
    JSON, or over :data:`..messages.MAX_RESULT_BYTES`) becomes a failed one saying why, so
    the daemon records the frame instead of dropping the message and waiting for it."""
    header = {"type": "result", "task_id": task["task_id"], "worker": worker_id,
              "name": task["name"], "sha256": task["sha256"]}
    try:
        payload = messages.encode({**header, "result": result})
    except (TypeError, ValueError) as exc:  # an injected analysis returned a non-JSON value
        why = f"result is not JSON: {type(exc).__name__}: {exc}"
    else:
        if len(payload) <= messages.MAX_RESULT_BYTES:
            return payload
        why = (f"result of {len(payload):,} bytes is over the {messages.MAX_RESULT_BYTES:,} "
               f"bytes a worker may send")
    log.error("%s: %s", task["path"], why)
    seconds = result.get("seconds") if isinstance(result, dict) else None
    failed = failed_result(task["name"], task["path"], f"{task['path']}: {why}",
                           seconds=float(seconds) if isinstance(seconds, (int, float)) else 0.0)
    return messages.encode({**header, "result": failed})


def refused_task_payload(raw: bytes, worker_id: str, exc: Exception) -> bytes | None:
    """A failed ``result`` for a task this worker cannot take (another version's task), if
    the task says enough (id, plain file name, sha256, path) to answer it; else None."""
    import json

    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    fields = {k: header.get(k) for k in ("task_id", "name", "sha256", "path")}
    if not all(isinstance(v, str) for v in fields.values()):
        return None
    if Path(fields["name"]).name != fields["name"] or fields["name"] in ("", ".", ".."):
        return None
    reason = f"{fields['path']}: worker {worker_id} cannot take the task: {exc}"
    return messages.encode({"type": "result", "task_id": fields["task_id"],
                            "worker": worker_id, "name": fields["name"],
                            "sha256": fields["sha256"],
                            "result": failed_result(fields["name"], fields["path"], reason)})


#: Seconds between a worker's heartbeats (the daemon declares it dead after a few missed).
HEARTBEAT_S = 1.0


class _Heartbeat(threading.Thread):
    """Says "still here" to the daemon every ``interval_s`` from its own socket, also while
    the worker's thread is busy analysing (ZeroMQ sockets belong to one thread each)."""

    def __init__(self, ctx, endpoint: str, worker_id: str, interval_s: float) -> None:
        super().__init__(name=f"heartbeat {worker_id}", daemon=True)
        self.stopped = threading.Event()
        self._ctx, self._endpoint = ctx, endpoint
        self._message = messages.encode({"type": "heartbeat", "worker": worker_id,
                                         "heartbeat_s": interval_s})
        self._interval_s = interval_s

    def run(self) -> None:
        import zmq

        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a daemon away a while gets a few, not a backlog
        sock.connect(self._endpoint)
        try:
            while not self.stopped.wait(self._interval_s):
                try:
                    sock.send(self._message, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            sock.close()


def run_worker(task_endpoint: str, result_endpoint: str, *,
               analyze: AnalyzeFn | None = None, parent_pid: int | None = None,
               stop: threading.Event | None = None, context=None,
               poll_ms: int = 500, heartbeat_s: float | None = HEARTBEAT_S) -> int:
    """Serve tasks until stopped, the parent dies, or interrupted.

    Parameters
    ----------
    task_endpoint, result_endpoint : str
        The daemon's PUSH (tasks) and PULL (results) endpoints; the worker connects.
    analyze : callable, optional
        ``analyze(path, **options) -> FrameResult | dict``; default the real analysis.
    parent_pid : int, optional
        Exit when this process is no longer our parent (the daemon was killed).
    stop : threading.Event, optional
        Exit when set (workers run as threads in tests).
    context : zmq.Context, optional
        Share a context (threads); default a new one.
    heartbeat_s : float or None, optional
        Send a heartbeat this often (from a thread, so also during a long analysis); the
        daemon sends a silent worker's frames to others after a few missed ones (a worker
        killed, its host gone). None: no heartbeats (the daemon then waits task_timeout_s).

    Returns
    -------
    int
        The number of tasks served.
    """
    import zmq

    if analyze is None:
        # import the analysis before saying hello (0.5-1 s of CPU): the first frame's
        # latency and the daemon's throughput figures then count analysis only
        from ..analysis import pipeline as _pipeline, strips as _strips  # noqa: F401

        analyze = default_analyze
    ctx = context or zmq.Context()
    worker_id = f"{_socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"
    tasks = ctx.socket(zmq.PULL)
    results = ctx.socket(zmq.PUSH)
    for s in (tasks, results):
        s.setsockopt(zmq.LINGER, 2000)
    tasks.setsockopt(zmq.RCVHWM, 2)  # hold few tasks: others may be idle
    tasks.connect(task_endpoint)
    results.connect(result_endpoint)
    hello = {"type": "hello", "worker": worker_id}
    beat = None
    if heartbeat_s is not None:
        hello["heartbeat_s"] = float(heartbeat_s)
        beat = _Heartbeat(ctx, result_endpoint, worker_id, float(heartbeat_s))
    results.send(messages.encode(hello))
    if beat is not None:
        beat.start()
    served = 0
    with tempfile.TemporaryDirectory(prefix="particlewatch-worker-") as tmp:
        scratch = Path(tmp)
        try:
            while not (stop is not None and stop.is_set()):
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.info("worker %s: daemon %d is gone, exiting", worker_id, parent_pid)
                    break
                if not tasks.poll(poll_ms):
                    continue
                parts = tasks.recv_multipart()
                try:
                    header = messages.decode(parts[0], max_bytes=messages.MAX_TASK_HEADER_BYTES)
                    task, strip = validate_strip_task(header)
                except messages.MessageError as exc:
                    log.error("worker %s: bad task ignored: %s", worker_id, exc)
                    refusal = refused_task_payload(parts[0], worker_id, exc)
                    if refusal is not None:  # the daemon records why, instead of waiting
                        results.send(refusal)
                    continue
                results.send(messages.encode({"type": "started", "worker": worker_id,
                                              "task_id": task["task_id"],
                                              "name": task["name"]}))
                result = analyze_task(task, parts[1:], analyze, scratch=scratch, strip=strip)
                results.send(result_payload(task, worker_id, result))
                served += 1
        except KeyboardInterrupt:
            pass
        finally:
            # stop taking tasks before saying bye: a task the daemon sends again on our bye
            # must not find our pipe still open (it would be lost with it)
            tasks.close(linger=0)
            if beat is not None:
                beat.stopped.set()
                beat.join()
            try:
                results.send(messages.encode({"type": "bye", "worker": worker_id}),
                             zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            results.close()
            if context is None:
                ctx.term()
    return served


def result_endpoint_for(task_endpoint: str) -> str:
    """The result endpoint of a daemon whose task endpoint is ``tcp://HOST:PORT``: PORT+1."""
    head, sep, port = task_endpoint.rpartition(":")
    if not sep or not port.isdigit() or not head.startswith("tcp://"):
        raise ValueError(f"{task_endpoint!r} is not tcp://HOST:PORT")
    return f"{head}:{int(port) + 1}"


def main(argv: list[str] | None = None) -> int:
    """``python -m particlewatch.daemon.worker``: the worker processes a daemon starts."""
    parser = argparse.ArgumentParser(prog="particlewatch-worker")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--analyze", default=None, help="package.module:function")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    analyze = load_callable(args.analyze) if args.analyze else None
    run_worker(args.tasks, args.results, analyze=analyze, parent_pid=args.parent_pid,
               heartbeat_s=args.heartbeat_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
