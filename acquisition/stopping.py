"""Stop requests, checked by the runner between frames.

Sources: a callable or ``threading.Event`` given by the caller, Ctrl-C (SIGINT), a frame
limit, a time limit, and a daemon's statistics stream (ZeroMQ SUB) saying ``converged``.
Stream messages are JSON objects with ``"schema_version": 1`` and a ``"type"``; anything
else is ignored, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Callable

#: Message types of the statistics stream (INTERFACE.md).
STREAM_TYPES = ("frame", "stats", "converged", "error")


def parse_stream_message(raw: bytes | str) -> dict | None:
    """Decode one statistics-stream message; None when it is not a valid version-1 message.

    Examples
    --------
    >>> parse_stream_message(b'{"schema_version": 1, "type": "converged"}')["type"]
    'converged'
    >>> parse_stream_message(b'not json') is None
    True
    """
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict) or message.get("schema_version") != 1:
        return None
    if message.get("type") not in STREAM_TYPES:
        return None
    return message


def says_converged(message: dict | None) -> bool:
    """True for a ``converged`` message, or a ``stats`` message whose summary is converged."""
    if not message:
        return False
    if message["type"] == "converged":
        return True
    return message["type"] == "stats" and message.get("converged") is True


class ConvergenceListener:
    """A ZeroMQ SUB socket on a daemon's statistics stream; ``poll()`` never blocks.

    Parameters
    ----------
    endpoint : str
        e.g. ``tcp://127.0.0.1:5556``.
    context : zmq.Context, optional
    """

    def __init__(self, endpoint: str, *, context=None) -> None:
        import zmq

        self._zmq = zmq
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self.endpoint = endpoint
        self.converged = False
        self.last_message: dict | None = None

    def poll(self) -> bool:
        """Read every waiting message; True once a ``converged`` message has arrived."""
        zmq = self._zmq
        while not self.converged:
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            message = parse_stream_message(frames[0])
            if message is not None:
                self.last_message = message
                self.converged = says_converged(message)
        return self.converged

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()


class StopConditions:
    """Everything that can end an acquisition early, checked with :meth:`reason`.

    Parameters
    ----------
    stop : callable or threading.Event, optional
        Stop when ``stop()`` (or ``stop.is_set()``) is true.
    max_frames : int, optional
    time_limit_s : float, optional
        Wall-clock seconds since :meth:`start`.
    stop_on : str, optional
        ZeroMQ endpoint of a daemon's statistics stream; stop when it says converged.
    handle_sigint : bool
        While started, the first Ctrl-C asks for a clean stop after the current frame; a
        second one interrupts at once. Only possible in the main thread.
    """

    def __init__(self, *, stop: Callable[[], bool] | threading.Event | None = None,
                 max_frames: int | None = None, time_limit_s: float | None = None,
                 stop_on: str | None = None, handle_sigint: bool = True) -> None:
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if stop is not None and not (callable(stop) or hasattr(stop, "is_set")):
            raise TypeError(f"stop must be a callable or an Event, got {type(stop).__name__}")
        self._stop = stop
        self.max_frames = max_frames
        self.time_limit_s = time_limit_s
        self.stop_on = stop_on
        self.handle_sigint = handle_sigint
        self._listener: ConvergenceListener | None = None
        self._interrupted = False
        self._previous_handler = None
        self._t0 = time.monotonic()

    def start(self) -> "StopConditions":
        self._t0 = time.monotonic()
        if self.stop_on:
            self._listener = ConvergenceListener(self.stop_on)
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> "StopConditions":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True

    def request(self) -> None:
        """Ask for a stop after the current frame (what Ctrl-C does)."""
        self._interrupted = True

    def reason(self, frames_saved: int) -> str | None:
        """Why to stop now, or None to go on."""
        if self._interrupted:
            return "interrupted"
        if self.max_frames is not None and frames_saved >= self.max_frames:
            return "max_frames"
        if self._stop is not None:
            requested = self._stop.is_set() if hasattr(self._stop, "is_set") else self._stop()
            if requested:
                return "stop_requested"
        if self.time_limit_s is not None and time.monotonic() - self._t0 >= self.time_limit_s:
            return "time_limit"
        if self._listener is not None and self._listener.poll():
            return "converged"
        return None
