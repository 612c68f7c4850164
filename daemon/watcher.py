"""Watching the frame folder and deciding when a frame is whole.

The watcher never trusts a single signal: watchdog events (native or polling observer) and
a periodic rescan both only *nominate* a path; :class:`Arrivals` then looks at it until it
is complete — the format's own header agrees with the file size, a SerialEM ``.mdoc``
beside it has its ``[ZValue`` section, and the size and mtime stayed the same across two
looks ``settle_s`` apart. A file that stops changing while still incomplete is given up
after ``stall_timeout_s`` with the reason.
"""

from __future__ import annotations

import os
import queue
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..frames import is_temporary_name

try:  # the analysis stage owns the list of readable formats
    from ..analysis.io import FRAME_SUFFIXES as _ANALYSIS_SUFFIXES
except ImportError:  # analysis/io.py not there (yet): the formats INTERFACE.md promises
    _ANALYSIS_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".dm3", ".dm4", ".ser", ".emd")

#: Frame suffixes the daemon analyses (lower case).
FRAME_SUFFIXES = tuple(s.lower() for s in _ANALYSIS_SUFFIXES)

#: Files that travel with frames or come from other tools: never frames, never "failed".
COMPANION_SUFFIXES = (".mdoc", ".nav", ".txt", ".log", ".json", ".xml", ".csv", ".yaml",
                      ".yml", ".md", ".ini", ".cfg", ".sqlite", ".sqlite-wal", ".sqlite-shm",
                      ".db", ".db-wal", ".db-shm", ".lock", ".settings")

MRC_HEADER_BYTES = 1024
#: Bytes per voxel of each MRC mode (mode 101 is 4-bit, handled apart).
MRC_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}


@dataclass(frozen=True)
class Check:
    """Outcome of one look at a file.

    ``state`` is ``"complete"``, ``"waiting"`` (may still become complete) or ``"invalid"``
    (cannot become a frame by growing); ``reason`` says why it is not complete.
    """

    state: str
    reason: str = ""


def classify_name(path: str | os.PathLike) -> str:
    """``"frame"``, ``"ignore"`` (temporary or companion files) or ``"unsupported"``."""
    name = Path(path).name
    if is_temporary_name(name):
        return "ignore"
    lower = name.lower()
    if lower.endswith(FRAME_SUFFIXES):
        return "frame"
    if lower.endswith(COMPANION_SUFFIXES):
        return "ignore"
    return "unsupported"


def mrc_expected_size(header: bytes) -> int:
    """File size an MRC header promises: 1024 + extended header + nx·ny·nz·bytes per voxel.

    Raises
    ------
    ValueError
        If the header is short, has no ``MAP`` stamp, or has impossible dimensions or mode.
    """
    if len(header) < MRC_HEADER_BYTES:
        raise ValueError(f"header has {len(header)} of {MRC_HEADER_BYTES} bytes")
    if header[208:211] != b"MAP":
        raise ValueError("no 'MAP ' stamp at byte 208: not an MRC file")
    # machine stamp 0x11 in byte 212 means big-endian; otherwise little-endian
    order = ">" if header[212] == 0x11 else "<"
    nx, ny, nz, mode = struct.unpack(order + "4i", header[:16])
    (nsymbt,) = struct.unpack(order + "i", header[92:96])
    if min(nx, ny, nz) < 1 or nsymbt < 0:
        raise ValueError(f"impossible header: size {nx}x{ny}x{nz}, extended header {nsymbt}")
    if mode == 101:  # 4-bit, rows padded to whole bytes
        data = (nx + 1) // 2 * ny * nz
    elif mode in MRC_MODE_BYTES:
        data = nx * ny * nz * MRC_MODE_BYTES[mode]
    else:
        raise ValueError(f"unsupported MRC mode {mode}")
    return MRC_HEADER_BYTES + nsymbt + data


def check_mrc(path: str | os.PathLike, size: int) -> Check:
    """Whether the MRC file at ``path`` (currently ``size`` bytes) is whole."""
    if size < MRC_HEADER_BYTES:
        return Check("waiting", f"MRC file has {size} bytes, less than its 1024-byte header")
    with open(path, "rb") as fh:
        header = fh.read(MRC_HEADER_BYTES)
    if not any(header):
        return Check("waiting", "MRC header is still all zeros")
    try:
        expected = mrc_expected_size(header)
    except ValueError as exc:
        return Check("invalid", f"corrupt MRC header: {exc}")
    if size < expected:
        return Check("waiting", f"truncated: MRC header promises {expected} bytes, file has {size}")
    if size > expected:
        return Check("invalid", f"MRC header promises {expected} bytes but file has {size}")
    return Check("complete")


def check_mdoc(path: str | os.PathLike) -> Check | None:
    """Check the ``.mdoc`` beside a frame; None when there is none."""
    mdoc = Path(str(path) + ".mdoc")
    try:
        text = mdoc.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if "[ZValue" not in text:
        return Check("waiting", f"{mdoc.name} has no [ZValue] section yet")
    return Check("complete")


def check_tiff(path: str | os.PathLike, size: int) -> Check:
    """Whether every image strip/tile a TIFF's directories point at lies inside the file."""
    import tifffile

    if size < 8:
        return Check("waiting", f"TIFF file has only {size} bytes")
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets and max(o + c for o, c in zip(offsets, counts)) > size:
                    return Check("waiting", "truncated: TIFF image data runs past the end")
    except Exception as exc:  # tifffile raises many types for a half-written file
        return Check("waiting", f"TIFF not readable yet: {type(exc).__name__}: {exc}")
    return Check("complete")


def check_complete(path: str | os.PathLike, size: int) -> Check:
    """Look once at a frame file of ``size`` bytes: is its content whole?

    MRC/MRCS: header size agrees with the file size. TIFF: image data inside the file.
    DM3/DM4/SER/EMD: only the size-stability rule of :class:`Arrivals` applies. Any frame:
    a ``.mdoc`` beside it must have its ``[ZValue`` section.
    """
    suffix = Path(path).suffix.lower()
    if size == 0:
        return Check("waiting", "empty file (0 bytes)")
    if suffix in (".mrc", ".mrcs", ".st", ".map"):
        check = check_mrc(path, size)
    elif suffix in (".tif", ".tiff"):
        check = check_tiff(path, size)
    else:
        check = Check("complete")
    if check.state != "complete":
        return check
    return check_mdoc(path) or check


@dataclass
class _Watch:
    first_seen: float
    size: int = -1
    mtime_ns: int = -1
    changed_at: float = 0.0
    next_look: float = 0.0
    reason: str = ""


@dataclass
class Arrival:
    """A path that became complete (``reason`` empty) or was given up (``reason`` set)."""

    path: Path
    size: int
    mtime_ns: int
    reason: str = ""


@dataclass
class Arrivals:
    """Looks at nominated paths until each is whole, stable, or given up.

    Parameters
    ----------
    settle_s : float
        Size and mtime must be unchanged across two looks this far apart.
    stall_timeout_s : float
        An incomplete file that has not changed for this long is given up (failed).
    no_mdoc_grace_s : float
        A frame without a ``.mdoc`` must stay unchanged this long, in case the writer adds
        the ``.mdoc`` after the image.
    """

    settle_s: float = 0.25
    stall_timeout_s: float = 60.0
    no_mdoc_grace_s: float = 1.0
    _watched: dict = field(default_factory=dict)

    def nominate(self, path: Path, now: float) -> None:
        """Start (or hurry) looking at ``path``."""
        entry = self._watched.get(path)
        if entry is None:
            self._watched[path] = _Watch(first_seen=now, changed_at=now, next_look=now)
        else:
            entry.next_look = min(entry.next_look, now)

    def __len__(self) -> int:
        return len(self._watched)

    def __contains__(self, path) -> bool:
        return path in self._watched

    def look(self, now: float) -> list[Arrival]:
        """Look at every path that is due; return those that arrived or were given up."""
        done = []
        for path, entry in list(self._watched.items()):
            if entry.next_look > now:
                continue
            arrival = self._look_one(path, entry, now)
            if arrival is not None:
                del self._watched[path]
                done.append(arrival)
        return done

    def _look_one(self, path: Path, entry: _Watch, now: float) -> Arrival | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:  # renamed away or deleted: nothing to do
            return Arrival(path, -1, -1, reason="gone")
        if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
            entry.size, entry.mtime_ns, entry.changed_at = st.st_size, st.st_mtime_ns, now
            entry.next_look = now + self.settle_s
            return None
        try:
            check = check_complete(path, st.st_size)
        except OSError as exc:
            check = Check("waiting", f"cannot read: {exc}")
        quiet_s = now - entry.changed_at
        if check.state == "complete":
            if (quiet_s < self.no_mdoc_grace_s
                    and not os.path.exists(str(path) + ".mdoc")
                    and path.suffix.lower() in (".mrc", ".mrcs")):
                entry.next_look = entry.changed_at + self.no_mdoc_grace_s
                return None
            return Arrival(path, st.st_size, st.st_mtime_ns)
        if check.state == "invalid" or quiet_s >= self.stall_timeout_s:
            reason = check.reason
            if check.state == "waiting":
                reason = f"incomplete after {quiet_s:.0f} s without change: {reason}"
            return Arrival(path, st.st_size, st.st_mtime_ns, reason=reason)
        entry.reason = check.reason
        entry.next_look = now + min(max(self.settle_s, 0.05) * 2, 1.0)
        return None


def scan_folder(folder: Path, *, exclude: Iterable[Path] = ()) -> list[tuple[Path, os.stat_result]]:
    """Regular files directly in ``folder`` (not recursive), sorted by name, with their stat."""
    excluded = {Path(p).resolve() for p in exclude}
    out = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=True):
                continue
            path = Path(entry.path)
            if path.resolve() in excluded:
                continue
            out.append((path, entry.stat(follow_symlinks=True)))
        except OSError:
            continue
    out.sort(key=lambda item: item[0].name)
    return out


class FolderEvents:
    """Watchdog observer that puts the paths it hears about into a queue.

    Parameters
    ----------
    folder : path-like
        Folder watched (not recursively).
    polling : bool
        Use watchdog's :class:`PollingObserver` (network shares lose native events).
    """

    def __init__(self, folder: str | os.PathLike, *, polling: bool = False,
                 polling_interval_s: float = 1.0):
        from watchdog.events import FileSystemEventHandler

        self.folder = Path(folder)
        self.paths: queue.SimpleQueue[Path] = queue.SimpleQueue()
        paths = self.paths

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                for attr in ("dest_path", "src_path"):
                    p = getattr(event, attr, None)
                    if p:
                        paths.put(Path(os.fsdecode(p)))
                        break

        if polling:
            from watchdog.observers.polling import PollingObserver
            self._observer = PollingObserver(timeout=polling_interval_s)
        else:
            from watchdog.observers import Observer
            self._observer = Observer()
        self._observer.schedule(_Handler(), str(self.folder), recursive=False)
        self._observer.daemon = True

    def start(self) -> None:
        """Start the observer thread."""
        self._observer.start()

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        self._observer.stop()
        self._observer.join(timeout=5)

    def drain(self) -> set[Path]:
        """Paths heard about since the last call."""
        out = set()
        while True:
            try:
                out.add(self.paths.get_nowait())
            except queue.Empty:
                return out


def monotonic() -> float:
    """The clock the watcher uses (seconds)."""
    return time.monotonic()
