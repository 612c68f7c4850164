"""The ledger: one SQLite row per frame, the daemon's memory across crashes.

Each row holds the frame's identity (name inside the watched folder, size, mtime_ns,
sha256 of its content), its status (``pending`` -> ``running`` -> ``ok`` | ``failed``),
the failure reason and the analysis result (the worker's JSON). A result is stored in the
same transaction that marks the frame done and gives it the next ``done_seq``, the order in
which results entered the running statistics; with WAL and ``synchronous=FULL`` a result
is either durably there or not at all, so after ``kill -9`` the daemon rebuilds its
statistics and outputs from the ledger and re-sends what was pending or running: no frame
lost, none counted twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

STATUSES = ("pending", "running", "ok", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'ok', 'failed')),
    reason TEXT,
    result TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    dispatched_at REAL,
    done_seq INTEGER UNIQUE,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_status ON frames (status, id);
"""


@dataclass(frozen=True)
class Entry:
    """One ledger row."""

    id: int
    name: str
    size: int
    mtime_ns: int
    sha256: str
    status: str
    reason: str | None
    result: dict | None
    attempts: int
    task_id: str | None
    dispatched_at: float | None
    done_seq: int | None

    @property
    def done(self) -> bool:
        """True once the frame has a final status (ok or failed)."""
        return self.status in ("ok", "failed")


_COLUMNS = ("id, name, size, mtime_ns, sha256, status, reason, result, attempts, task_id, "
            "dispatched_at, done_seq")


def _entry(row) -> Entry:
    values = list(row)
    values[7] = json.loads(values[7]) if values[7] else None
    return Entry(*values)


class LedgerError(RuntimeError):
    """The ledger file cannot be used (another folder's ledger, unreadable)."""


class Ledger:
    """Frame ledger in an SQLite file.

    Parameters
    ----------
    path : path-like
        The database file (created if missing).
    folder : path-like
        The watched folder; a ledger remembers its folder and refuses another one.

    Notes
    -----
    One connection, used from one thread (the daemon's loop).
    """

    def __init__(self, path: str | os.PathLike, *, folder: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        folder = str(Path(folder).resolve())
        row = self._db.execute("SELECT value FROM meta WHERE key='folder'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('folder', ?)", (folder,))
        elif row[0] != folder:
            self._db.close()
            raise LedgerError(f"{self.path}: ledger belongs to folder {row[0]}, not {folder}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # --- reading -------------------------------------------------------------------------
    def get(self, name: str) -> Entry | None:
        """The entry of ``name``, or None."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM frames WHERE name=?", (name,)).fetchone()
        return _entry(row) if row else None

    def identities(self) -> dict[str, tuple[int, int]]:
        """``{name: (size, mtime_ns)}`` of every frame, to spot new or changed files."""
        return {name: (size, mtime) for name, size, mtime in
                self._db.execute("SELECT name, size, mtime_ns FROM frames")}

    def pending(self, limit: int) -> list[Entry]:
        """Up to ``limit`` pending frames, oldest first."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM frames WHERE status='pending' "
                                "ORDER BY id LIMIT ?", (limit,))
        return [_entry(r) for r in rows]

    def running(self) -> list[Entry]:
        """Frames sent to a worker and not yet back."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM frames WHERE status='running' "
                                "ORDER BY id")
        return [_entry(r) for r in rows]

    def done(self, *, order: str = "done") -> Iterator[Entry]:
        """Finished frames, in the order their results came in (``order="done"``) or by
        name (``order="name"``, the canonical order of the final outputs)."""
        key = {"done": "done_seq", "name": "name"}[order]
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM frames WHERE status IN ('ok', "
                                f"'failed') ORDER BY {key}").fetchall()
        return (_entry(r) for r in rows)

    def counts(self) -> dict[str, int]:
        """Number of frames in each status."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status"):
            out[status] = n
        return out

    # --- writing -------------------------------------------------------------------------
    def _write(self, sql: str, params: tuple) -> int:
        cur = self._db.execute(sql, params)
        return cur.rowcount

    def admit(self, name: str, *, size: int, mtime_ns: int, sha256: str) -> str:
        """Record a complete frame; returns what it is to the ledger.

        Returns
        -------
        str
            ``"new"`` (now pending), ``"same"`` (known content: size/mtime refreshed, nothing
            to do) or ``"modified"`` (new content under a known name: pending again, its old
            result is replaced when the new one comes).
        """
        now = time.time()
        old = self.get(name)
        if old is None:
            self._write("INSERT INTO frames (name, size, mtime_ns, sha256, status, updated) "
                        "VALUES (?, ?, ?, ?, 'pending', ?)", (name, size, mtime_ns, sha256, now))
            return "new"
        given_up = old.status == "failed" and (old.result or {}).get("stage") == "discovery"
        if old.sha256 == sha256 and not given_up:
            self._write("UPDATE frames SET size=?, mtime_ns=?, updated=? WHERE name=?",
                        (size, mtime_ns, now, name))
            return "same"
        self._write("UPDATE frames SET size=?, mtime_ns=?, sha256=?, status='pending', "
                    "reason=NULL, attempts=0, task_id=NULL, dispatched_at=NULL, updated=? "
                    "WHERE name=?", (size, mtime_ns, sha256, now, name))
        return "modified"

    def fail_discovery(self, name: str, *, size: int, mtime_ns: int, sha256: str,
                       reason: str, result: dict) -> bool:
        """Record a file that never became an analysable frame as failed.

        Returns False (and changes nothing) if the same content is already recorded.
        """
        old = self.get(name)
        if old is not None and old.sha256 == sha256 and old.done:
            self._write("UPDATE frames SET size=?, mtime_ns=? WHERE name=?",
                        (size, mtime_ns, name))
            return False
        now = time.time()
        payload = json.dumps(result, allow_nan=False)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._next_seq()
            if old is None:
                self._write("INSERT INTO frames (name, size, mtime_ns, sha256, status, reason, "
                            "result, done_seq, updated) VALUES (?, ?, ?, ?, 'failed', ?, ?, ?, ?)",
                            (name, size, mtime_ns, sha256, reason, payload, seq, now))
            else:
                self._write("UPDATE frames SET size=?, mtime_ns=?, sha256=?, status='failed', "
                            "reason=?, result=?, done_seq=?, task_id=NULL, dispatched_at=NULL, "
                            "updated=? WHERE name=?",
                            (size, mtime_ns, sha256, reason, payload, seq, now, name))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return True

    def _next_seq(self) -> int:
        (seq,) = self._db.execute("SELECT COALESCE(MAX(done_seq), 0) + 1 FROM frames").fetchone()
        return seq

    def mark_running(self, name: str, *, task_id: str, now: float | None = None) -> None:
        """A pending frame was sent to the workers as task ``task_id``."""
        self._write("UPDATE frames SET status='running', task_id=?, dispatched_at=?, "
                    "attempts=attempts+1, updated=? WHERE name=? AND status='pending'",
                    (task_id, now or time.time(), time.time(), name))

    def finish(self, name: str, *, sha256: str, status: str, reason: str | None,
               result: dict) -> int | None:
        """Store a worker's result if it is still wanted; return its ``done_seq``.

        Returns None (nothing changed) for a result that is a duplicate (the frame is
        already done), stale (its content hash is not the frame's current one) or unknown.
        """
        if status not in ("ok", "failed"):
            raise ValueError(f"{name}: result status must be ok or failed, not {status!r}")
        payload = json.dumps(result, allow_nan=False)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._next_seq()
            changed = self._write(
                "UPDATE frames SET status=?, reason=?, result=?, done_seq=?, dispatched_at=NULL,"
                " updated=? WHERE name=? AND sha256=? AND status IN ('pending', 'running')",
                (status, reason, payload, seq, time.time(), name, sha256))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return seq if changed == 1 else None

    def requeue(self, name: str) -> None:
        """Send a running frame again (its worker died or took too long)."""
        self._write("UPDATE frames SET status='pending', task_id=NULL, dispatched_at=NULL, "
                    "updated=? WHERE name=? AND status='running'", (time.time(), name))

    def requeue_all_running(self) -> int:
        """At start: whatever was running when the last daemon stopped is pending again.

        The interrupted attempt does not count against the frame: the daemon stopped, not
        the frame's analysis.
        """
        return self._write("UPDATE frames SET status='pending', task_id=NULL, "
                           "dispatched_at=NULL, attempts=MAX(attempts - 1, 0) "
                           "WHERE status='running'", ())

    def reanalyze(self, name: str) -> bool:
        """Analyse a known frame again (``analyze`` request); False if unknown or busy."""
        return self._write("UPDATE frames SET status='pending', reason=NULL, attempts=0, "
                           "task_id=NULL, dispatched_at=NULL, updated=? WHERE name=? AND "
                           "status IN ('ok', 'failed')", (time.time(), name)) == 1
