"""JSON messages of the daemon: building, encoding and validating them.

Every message on every socket is one JSON object with ``"schema_version": 1`` and a
``"type"``. Nothing is ever unpickled; anything that arrives from a socket passes through a
``validate_*`` function here before the daemon acts on it, and a bad message raises
:class:`MessageError` (whose text is the one-line reason sent back in the error reply).

Stream (PUB): ``frame``, ``stats``, ``converged``, ``error``.
Acquisition stream (the session's own PUB socket): ``acquisition``, the acquisition's whole
state (:func:`acquisition_message`, :func:`validate_acquisition`).
Control (REQ/REP): requests ``status``, ``stop``, ``rescan``, ``analyze`` (with ``path``);
replies carry ``"ok": true`` or are ``{"type": "error", "ok": false, "error": reason}``.
Pipeline (PUSH/PULL): ``task`` (daemon to worker, a JSON header plus the frame's bytes),
``hello``/``heartbeat``/``bye``/``started``/``result`` (worker to daemon). ``hello`` and
``heartbeat`` may carry ``heartbeat_s``, the worker's promise to be heard from that often.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import SCHEMA_VERSION
from ..analysis.outputs import FLAG_COLUMNS

#: Largest control request answered (bigger ones get an error reply).
MAX_CONTROL_BYTES = 64 * 1024
#: Hard cap set on the control socket (ZMQ_MAXMSGSIZE): bigger messages drop the peer.
HARD_CONTROL_BYTES = 1024 * 1024
#: Largest result a worker may send (a frame with ~100 000 particles fits).
MAX_RESULT_BYTES = 64 * 1024 * 1024
#: Largest task header (the frame bytes travel in separate message parts).
MAX_TASK_HEADER_BYTES = 64 * 1024

CONTROL_TYPES = ("status", "stop", "rescan", "analyze")
STREAM_TYPES = ("frame", "stats", "converged", "error")
ANALYSIS_OPTIONS = {"pixel_nm": (float, type(None)), "min_size_nm": (float, type(None)),
                    "separate": (str,), "polarity": (str,)}


_NUMBER_TYPES = frozenset({int, float, type(None)})
_FLAG_TYPES = _NUMBER_TYPES | {bool}


class MessageError(ValueError):
    """A message that is not valid; ``str(exc)`` is the reason for the error reply."""


def to_jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays and non-finite floats into plain JSON values (NaN -> None)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode a message as UTF-8 JSON, adding ``schema_version`` (strict JSON: no NaN).

    A message of plain JSON values (a frame result's message is one) is written as it is;
    only one holding numpy values, paths or non-finite floats goes through
    :func:`to_jsonable` first (a Python walk over every value: ~10 ms for 1,000 particles).
    """
    body = {"schema_version": SCHEMA_VERSION, **message}
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):  # numpy values, NaN or inf: made plain, NaN -> null
        body = {"schema_version": SCHEMA_VERSION, **to_jsonable(dict(message))}
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def decode(payload: bytes, *, max_bytes: int) -> dict:
    """Parse and check the envelope of one message.

    Parameters
    ----------
    payload : bytes
        The raw message.
    max_bytes : int
        Size limit; bigger payloads are refused before parsing.

    Returns
    -------
    dict
        The message, with ``schema_version == 1`` and a string ``type``.

    Raises
    ------
    MessageError
        Oversize, not UTF-8 JSON, not an object, wrong ``schema_version`` or no ``type``.
    """
    if len(payload) > max_bytes:
        raise MessageError(f"message of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise MessageError(f"message must be a JSON object, got {type(message).__name__}")
    version = message.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise MessageError(f"unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")
    if not isinstance(message.get("type"), str):
        raise MessageError("message has no string 'type'")
    return message


def _field(message: Mapping, key: str, types: tuple, *, required: bool = True):
    if key not in message:
        if required:
            raise MessageError(f"{message.get('type')} message lacks '{key}'")
        return None
    value = message[key]
    # bool is an int in Python but never a valid number or string here
    if isinstance(value, bool) and bool not in types:
        raise MessageError(f"'{key}' must be {_names(types)}, got {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, types):
        raise MessageError(f"'{key}' must be {_names(types)}, got {type(value).__name__}")
    return value


def _names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _reject_unknown(message: Mapping, allowed: set[str]) -> None:
    extra = sorted(set(message) - allowed - {"schema_version", "type"})
    if extra:
        raise MessageError(f"{message['type']} message has unknown field(s): {', '.join(extra)}")


def resolve_inside(folder: str | os.PathLike, path: str) -> Path:
    """Resolve ``path`` (absolute, or relative to ``folder``) and require it inside ``folder``.

    Symbolic links and ``..`` are resolved first, so neither can lead outside.

    Raises
    ------
    MessageError
        If the path is empty, has a NUL byte or lies outside ``folder``.
    """
    if not path or "\x00" in path:
        raise MessageError("path is empty or contains a NUL byte")
    root = Path(folder).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved == root or root not in resolved.parents:
        raise MessageError(f"path {path!r} is outside the watched folder {root}")
    return resolved


def validate_control(message: Mapping, *, folder: str | os.PathLike) -> dict:
    """Check a decoded control request; return it with ``path`` resolved for ``analyze``.

    Raises
    ------
    MessageError
        Unknown type, unknown or mistyped fields, or a path outside ``folder``.
    """
    kind = message["type"]
    if kind not in CONTROL_TYPES:
        raise MessageError(f"unknown request type {kind!r} (expected one of "
                           f"{', '.join(CONTROL_TYPES)})")
    if kind == "analyze":
        _reject_unknown(message, {"path"})
        path = _field(message, "path", (str,))
        return {"type": kind, "path": resolve_inside(folder, path)}
    _reject_unknown(message, set())
    return {"type": kind}


def validate_task(header: Mapping) -> dict:
    """Check a task header sent by the daemon to a worker.

    Fields: ``task_id`` (str), ``name`` (file name), ``path`` (the daemon's absolute path),
    ``size``, ``mtime_ns`` (int), ``sha256`` (str), ``options`` (analysis keyword arguments),
    ``mdoc`` (bool: a ``.mdoc`` part follows the frame bytes).
    """
    if header["type"] != "task":
        raise MessageError(f"expected a task message, got {header['type']!r}")
    _reject_unknown(header, {"task_id", "name", "path", "size", "mtime_ns", "sha256",
                             "options", "mdoc"})
    out = {key: _field(header, key, (str,)) for key in ("task_id", "name", "path", "sha256")}
    if Path(out["name"]).name != out["name"] or out["name"] in ("", ".", ".."):
        raise MessageError(f"task name {out['name']!r} is not a plain file name")
    out["size"] = _field(header, "size", (int,))
    out["mtime_ns"] = _field(header, "mtime_ns", (int,))
    out["mdoc"] = _field(header, "mdoc", (bool,))
    options = _field(header, "options", (dict,))
    out["options"] = validate_options(options)
    return out


def validate_options(options: Mapping) -> dict:
    """Check analysis options: only ``pixel_nm``, ``min_size_nm``, ``separate``, ``polarity``."""
    unknown = sorted(set(options) - set(ANALYSIS_OPTIONS))
    if unknown:
        raise MessageError(f"unknown analysis option(s): {', '.join(unknown)}")
    return {key: _field(options, key, types) for key, types in ANALYSIS_OPTIONS.items()
            if key in options}


def validate_worker_message(message: Mapping) -> dict:
    """Check a message from a worker: ``hello``, ``heartbeat``, ``bye``, ``started`` or
    ``result``.

    A ``result`` carries ``task_id``, ``worker``, ``name``, ``sha256`` and ``result`` (the
    analysis'
    JSON-safe dict with at least ``status`` ``ok``/``failed``, ``reason`` and ``particles``,
    a mapping of column name to an equal-length list of numbers).
    """
    kind = message["type"]
    if kind in ("hello", "heartbeat"):
        _reject_unknown(message, {"worker", "heartbeat_s"})
        out = {"type": kind, "worker": _field(message, "worker", (str,))}
        beat = _field(message, "heartbeat_s", (int, float), required=False)
        if beat is not None:
            if isinstance(beat, bool) or not (math.isfinite(beat) and 0 < beat <= 3600):
                raise MessageError(f"heartbeat_s {beat!r} is not a number of seconds in "
                                   "(0, 3600]")
            out["heartbeat_s"] = float(beat)
        return out
    if kind == "bye":
        _reject_unknown(message, {"worker"})
        return {"type": kind, "worker": _field(message, "worker", (str,))}
    if kind == "started":
        _reject_unknown(message, {"worker", "task_id", "name"})
        return {"type": kind, **{k: _field(message, k, (str,))
                                 for k in ("worker", "task_id", "name")}}
    if kind != "result":
        raise MessageError(f"unexpected worker message type {kind!r}")
    _reject_unknown(message, {"task_id", "worker", "name", "sha256", "result"})
    out = {"type": kind}
    for key in ("task_id", "worker", "name", "sha256"):
        out[key] = _field(message, key, (str,))
    if Path(out["name"]).name != out["name"]:
        raise MessageError(f"result name {out['name']!r} is not a plain file name")
    result = _field(message, "result", (dict,))
    status = result.get("status")
    if status not in ("ok", "failed"):
        raise MessageError(f"result status must be 'ok' or 'failed', got {status!r}")
    reason = result.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise MessageError("result reason must be a string or null")
    particles = result.get("particles") or {}
    if not isinstance(particles, dict):
        raise MessageError("result particles must be an object of columns")
    lengths = set()
    for column, values in particles.items():
        if not isinstance(values, list):
            raise MessageError(f"particle column {column!r} must be a list")
        allowed = _FLAG_TYPES if column in FLAG_COLUMNS else _NUMBER_TYPES
        # decoded JSON holds exactly these few types: one set, not a check per value
        if not set(map(type, values)) <= allowed:
            raise MessageError(f"particle column {column!r} holds non-numbers")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise MessageError(f"particle columns have different lengths: {sorted(lengths)}")
    out["result"] = result
    return out


#: Largest ``acquisition`` message accepted (a full state is a few hundred bytes).
MAX_ACQUISITION_BYTES = 8 * 1024
#: Longest text field of an ``acquisition`` message.
MAX_ACQUISITION_TEXT = 200
#: Fields of an ``acquisition`` message and their JSON types (None: null allowed). The
#: runner's state (``stage_x_um`` … ``stop_reason``) plus what the session knows. No field
#: holds a path, so nothing a subscriber does depends on a path it was sent.
ACQUISITION_FIELDS: dict[str, tuple] = {
    "state": (str,), "stage_x_um": (float, None), "stage_y_um": (float, None),
    "defocus_um": (float, None), "tile": (int,), "tiles": (int,),
    "skipped_segments": (int,), "frames_saved": (int,), "frames_earlier": (int,),
    "focus_images": (int,), "survey_images": (int,), "clock_s": (float,),
    "elapsed_s": (float,), "stop_reason": (str, None), "sample": (str, None),
    "backend": (str, None), "error": (str, None), "segment_check": (str, None),
    "segment_check_note": (str, None),
}
#: Counters in an ``acquisition`` message are at most this (far beyond any real session).
_MAX_COUNT = 10**9


def acquisition_message(state: Mapping[str, Any], **extra: Any) -> dict:
    """Build an ``acquisition`` stream message from the runner's state and session extras.

    Keys of ``state`` that are not in :data:`ACQUISITION_FIELDS` (the runner may report
    more) are left out rather than sent, so :func:`validate_acquisition` accepts the result.
    """
    body: dict[str, Any] = {}
    for key, value in {**dict(state), **extra}.items():
        spec = ACQUISITION_FIELDS.get(key)
        if spec is None or (value is None and None not in spec):
            continue
        value = to_jsonable(value)
        if value is None:
            pass
        elif str in spec:
            # one line of printable text: control characters would be refused
            value = "".join(c if c.isprintable() else " " for c in str(value))
            value = value[:MAX_ACQUISITION_TEXT]
        elif int in spec:
            value = int(value)
        elif float in spec:
            value = float(value)
            if not math.isfinite(value):
                if None not in spec:
                    continue
                value = None
        body[key] = value
    body.setdefault("state", "starting")
    return {"type": "acquisition", **body}


def validate_acquisition(message: Mapping) -> dict:
    """Check a decoded ``acquisition`` message: known fields only, types, ranges and sizes.

    Parameters
    ----------
    message : mapping
        Output of :func:`decode` (``schema_version`` and ``type`` already checked).

    Returns
    -------
    dict
        The fields present, numbers as ``float``/``int`` as declared.

    Raises
    ------
    MessageError
        Wrong type, unknown field, a missing ``state``, a text over
        ``MAX_ACQUISITION_TEXT`` characters or holding control characters, a non-finite
        number, a negative or absurd count, or ``tile`` beyond ``tiles``.
    """
    if message.get("type") != "acquisition":
        raise MessageError(f"expected an acquisition message, got {message.get('type')!r}")
    _reject_unknown(message, set(ACQUISITION_FIELDS))
    out: dict[str, Any] = {"type": "acquisition"}
    for key, spec in ACQUISITION_FIELDS.items():
        types = tuple(type(None) if t is None else t for t in spec)
        value = _field(message, key, types, required=key == "state")
        if key not in message:
            continue
        if isinstance(value, str):
            if len(value) > MAX_ACQUISITION_TEXT:
                raise MessageError(f"'{key}' is longer than {MAX_ACQUISITION_TEXT} characters")
            if not value.isprintable():  # terminal escapes, new lines
                raise MessageError(f"'{key}' contains control characters")
        elif isinstance(value, float) and not math.isfinite(value):
            raise MessageError(f"'{key}' must be a finite number, got {value!r}")
        elif isinstance(value, int) and not 0 <= value <= _MAX_COUNT:
            raise MessageError(f"'{key}' must be a count from 0 to {_MAX_COUNT}, got {value}")
        out[key] = value
    if not out["state"]:
        raise MessageError("'state' is empty")
    if out.get("tile", 0) > out.get("tiles", _MAX_COUNT):
        raise MessageError(f"tile {out['tile']} is beyond tiles {out['tiles']}")
    return out


def error_reply(reason: str) -> dict:
    """The reply to a bad request."""
    return {"type": "error", "ok": False, "error": reason}
