"""The terminal dashboard: live size distributions and progress towards the precision asked for.

:func:`render` is a pure function from the latest ``stats`` message (the daemon publishes full
state, never deltas, so one message is enough) plus the acquisition's state to a rich
renderable. :class:`DashboardState` keeps the latest of each, the last errors and the
particle rate; the session feeds it in-process, and :func:`main` (``particlewatch dashboard``)
feeds it from two ZeroMQ streams: the daemon's statistics and the session's acquisition state.

Where the streams are: ``--connect`` gives the statistics endpoint; the session publishes its
acquisition state on the next port after the daemon's four (stats port + 4, see
:func:`acquisition_endpoint_for`), and both endpoints are also written to ``OUT/daemon.json``
and ``OUT/session.json``, which ``--out DIR`` reads (and reads again when they change, so a
dashboard started before the session, or left open across a resumed one, finds it).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from particlewatch import SCHEMA_VERSION
from particlewatch.daemon import messages

log = logging.getLogger(__name__)

POPULATION_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")
_BLOCKS = " ▁▂▃▄▅▆▇█"
#: The session's acquisition stream binds to the statistics port plus this (the daemon
#: takes stats P, control P+1, tasks P+2, results P+3).
ACQUISITION_PORT_OFFSET = 4
#: The session re-sends the acquisition state at least this often (seconds), so a
#: dashboard can tell a live session from one that has gone away.
ACQUISITION_HEARTBEAT_S = 1.0
#: A remote dashboard marks the acquisition state stale after this many seconds unheard.
ACQUISITION_STALE_S = 5 * ACQUISITION_HEARTBEAT_S
#: Largest statistics message accepted (a summary with its histogram is a few tens of kB).
MAX_STATS_BYTES = 16 * 1024 * 1024
#: Largest endpoint file (daemon.json, session.json) read.
_MAX_ENDPOINT_FILE_BYTES = 64 * 1024
#: Rows of text the non-histogram parts take besides the table rows and errors: panel
#: border (2), histogram axis (1), table head and rule (2), frames line (1).
_FIXED_ROWS = 6
#: States after which an acquisition will say nothing more (not "stale" when silent).
_FINAL_STATES = ("done", "stopped", "interrupted", "failed")


def population_colour(pop_id: int) -> str:
    """The colour of population ``pop_id`` everywhere in the dashboard (grey for outliers)."""
    return "grey50" if pop_id < 0 else POPULATION_COLOURS[pop_id % len(POPULATION_COLOURS)]


def population_name(pop: Mapping, *, short: bool = False) -> str:
    """A human name such as ``P0 sphere 57 nm`` (``P0 57 nm`` when ``short``)."""
    mean = pop.get("mean_ecd_nm")
    shape = "" if short else (pop.get("shape") or "")
    size = f"{mean:.0f} nm" if _is_number(mean) else ""
    return " ".join(part for part in (f"P{pop.get('id')}", shape, size) if part)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _fmt(value, spec: str, missing: str = "–") -> str:
    if not _is_number(value):
        return missing
    return format(value, spec)


def _size(value) -> str:
    """A size in nm with three significant figures or so (54.2, 110, 1450)."""
    if not _is_number(value):
        return "–"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _count(value) -> str:
    """A count short enough for a narrow column (900, 12k, 3.4M)."""
    value = int(value)
    if value < 10_000:
        return str(value)
    if value < 1_000_000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1e6:.1f}M"


def _half_width_rel(pop: Mapping) -> float | None:
    rel = pop.get("ci95_rel")
    if _is_number(rel):
        return float(rel)
    ci, mean = pop.get("ci95_nm"), pop.get("mean_ecd_nm")
    if (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_is_number, ci))
            and _is_number(mean) and mean):
        return (ci[1] - ci[0]) / 2 / mean
    return None


def histogram_rows(counts: Iterable[float], *, peak: float, height: int = 2) -> list[str]:
    """Draw one population's histogram as ``height`` rows of block characters.

    Parameters
    ----------
    counts : iterable of float
        Counts per bin, one terminal column per bin.
    peak : float
        The count that fills all rows (shared by populations so heights compare).
    height : int
        Rows of text; each row resolves eight levels.

    Returns
    -------
    list of str
        Rows from top to bottom.
    """
    # a bin with any particle shows at least the lowest block, so rare sizes stay visible
    levels = [0 if peak <= 0 or c <= 0 else max(round(c / peak * 8 * height), 1)
              for c in counts]
    rows = []
    for row in range(height - 1, -1, -1):
        cells = []
        for level in levels:
            fill = min(max(level - row * 8, 0), 8)
            cells.append(_BLOCKS[fill])
        rows.append("".join(cells))
    return rows


def _fit_columns(counts: list[float], width: int) -> list[float]:
    """Counts per terminal column: bins summed in groups when there are more bins than
    columns, each bin repeated when a wide terminal has room for it several times."""
    if len(counts) > width:
        return [float(group.sum()) for group in np.array_split(np.asarray(counts), width)]
    repeat = max(width // max(len(counts), 1), 1)
    return [c for c in counts for _ in range(repeat)]


def _axis(lo: float, hi: float, n_cols: int) -> str:
    """An nm axis under ``n_cols`` histogram columns: both ends, and the middle when wide."""
    left, right, mid = f"{lo:.0f} nm", f"{hi:.0f} nm", f"{(lo + hi) / 2:.0f}"
    n_cols = max(n_cols, len(left) + len(right) + 1)
    cells = [" "] * n_cols
    cells[:len(left)] = left
    cells[n_cols - len(right):] = right
    start = n_cols // 2 - len(mid) // 2
    if n_cols >= 40 and start > len(left) + 1 and start + len(mid) < n_cols - len(right) - 1:
        cells[start:start + len(mid)] = mid
    return "".join(cells)


def render_histogram(stats: Mapping, *, width: int = 60, height: int = 2,
                     outliers: bool = True, label_width: int = 16,
                     short_names: bool = False, empty: str = "no particles yet") -> Text:
    """The size histogram of every population on a shared nm axis.

    Parameters
    ----------
    stats : mapping
        A ``stats`` message with ``histogram`` = ``{"edges_nm", "counts": {"<id>": [...]}}``.
    width : int
        Columns for the bars (after the labels).
    height : int
        Rows per population; outliers always get one row.
    outliers : bool
        Draw the outliers' row (left out when the terminal is short).
    short_names : bool
        Label rows ``P0 54 nm`` rather than ``P0 sphere 54 nm``.
    empty : str
        What to say before there is anything to draw.
    """
    hist = stats.get("histogram") or {}
    edges = hist.get("edges_nm") or []
    counts_by_id = {k: v for k, v in (hist.get("counts") or {}).items()
                    if outliers or int(k) >= 0}
    text = Text()
    if len(edges) < 2 or not counts_by_id:
        text.append(empty, style="dim")
        return text
    columns = {k: _fit_columns([float(c) for c in v], width) for k, v in counts_by_id.items()}
    # one scale for all (heights compare); outliers get a single row on the same scale
    peak = max((max(v) for v in columns.values() if v), default=0)
    names = {str(p.get("id")): population_name(p, short=short_names)
             for p in stats.get("populations", [])}
    for key in sorted(columns, key=int):
        rows_here = 1 if int(key) < 0 else height
        rows = histogram_rows(columns[key], peak=peak / height * rows_here, height=rows_here)
        colour = population_colour(int(key))
        name = names.get(key, "outliers" if int(key) < 0 else f"P{key}")
        for i, row in enumerate(rows):
            label = name if i == rows_here - 1 else ""
            text.append(f"{label[:label_width - 1]:<{label_width}}", style=colour)
            text.append(row + "\n", style=colour)
    n_cols = len(next(iter(columns.values())))
    text.append(" " * label_width + _axis(edges[0], edges[-1], n_cols), style="dim")
    return text


def _progress_text(pop: Mapping, precision, *, narrow: bool) -> Text:
    """``±1.4% of ±1.0%, ~900 more`` (``±1.4% of ±1%, ~900`` where that does not fit)."""
    rel = _half_width_rel(pop)
    now = f"±{_fmt(rel and rel * 100, '.1f')}%"
    if pop.get("converged") is True:
        return Text(f"{now} ✓", style="bold green")
    if not _is_number(precision):
        text = Text(now)
    elif narrow:
        text = Text(f"{now} of ±{precision * 100:g}%")
    else:
        text = Text(f"{now} of ±{precision * 100:.1f}%")
    more = pop.get("needed_more")
    if _is_number(more) and more > 0:
        text.append(f", ~{_count(more)}" if narrow else f", ~{_count(more)} more",
                    style="yellow")
    return text


def render_populations(stats: Mapping, *, narrow: bool = False,
                       compact_progress: bool = False) -> Table:
    """One row per population: n, mean ± 95% CI, z-average, σ/μ, progress to the precision."""
    precision = stats.get("precision")
    table = Table(box=box.SIMPLE_HEAD, expand=False, show_edge=False, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    for column, justify in (("population", "left"), ("n", "right"), ("frac", "right"),
                            ("mean±CI nm", "right"), ("z-avg", "right"), ("σ/μ", "right"),
                            ("precision", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for pop in stats.get("populations", []):
        colour = population_colour(int(pop.get("id", -1)))
        mean = pop.get("mean_ecd_nm")
        ci = pop.get("ci95_nm")
        half = ((ci[1] - ci[0]) / 2 if isinstance(ci, (list, tuple)) and len(ci) == 2
                and all(map(_is_number, ci)) else None)
        table.add_row(
            Text(population_name(pop, short=narrow), style=colour),
            str(pop.get("n", 0)),
            _fmt(pop.get("fraction"), ".0%"),
            f"{_size(mean)} ± {_fmt(half, '.1f' if half is not None and half < 10 else '.0f')}",
            _size(pop.get("z_average_nm")),
            _fmt(pop.get("cv"), ".3f"),
            _progress_text(pop, precision, narrow=compact_progress),
        )
    return table


def _populations_that_fit(stats: Mapping, *, narrow: bool, width: int) -> Table:
    """The population table with progress in full ("±1.4% of ±1.0%, ~900 more") when it
    fits ``width`` columns, in short ("±1.4%/1% ~900") otherwise, so nothing is cut."""
    from rich.console import Console

    table = render_populations(stats, narrow=narrow)
    # measured on a console wider than any table, so the measure is not capped at `width`
    measuring = Console(width=1000, file=_NullFile(), color_system=None)
    if measuring.measure(table).maximum <= width:
        return table
    return render_populations(stats, narrow=narrow, compact_progress=True)


class _NullFile:
    """A file that forgets what is written (a console used only to measure)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _acquisition_lines(acquisition: Mapping | None, *, stale_s: float | None,
                       waiting: str | None) -> list[Text]:
    """The acquisition's state: what it does, where, focus, tiles, skipped segments."""
    if not acquisition:
        return [Text(waiting or "no acquisition (statistics only)", style="dim")]
    state = str(acquisition.get("state") or "acquiring")
    stop = acquisition.get("stop_reason")
    line = Text(state if not stop or state == stop else f"{state} ({stop})", style="bold")
    if stale_s is not None:
        line.append(f" – not heard for {stale_s:.0f} s", style="yellow")
    tile, tiles = acquisition.get("tile"), acquisition.get("tiles")
    if tile is not None:
        line.append(f"  tile {tile} of {tiles if tiles is not None else '?'}")
    x, y = acquisition.get("stage_x_um"), acquisition.get("stage_y_um")
    line.append(f"  stage {_fmt(x, '.1f')}, {_fmt(y, '.1f')} µm")
    line.append(f"  focus {_fmt(acquisition.get('defocus_um'), '+.3f')} µm")
    second = Text()
    second.append(f"skipped segments {acquisition.get('skipped_segments', 0)}")
    check = acquisition.get("segment_check")
    if check:
        second.append(f" (check {check})", style="yellow" if check == "off" else "")
    focus_images = acquisition.get("focus_images")
    if focus_images is not None:
        second.append(f"  focus images {focus_images}")
        saved = acquisition.get("frames_saved") or 0
        if saved:
            second.append(f" ({focus_images / saved:.1f}/frame)")
    clock = acquisition.get("clock_s")
    if _is_number(clock) and clock > 0:
        second.append(f"  microscope {clock / 60:.1f} min")
    lines = [line, second]
    note = acquisition.get("segment_check_note")
    if note and check == "off":
        lines.append(Text(str(note), style="dim"))
    return lines


def render_progress(stats: Mapping, acquisition: Mapping | None, *,
                    rate_per_min: float | None = None, stale_s: float | None = None,
                    waiting: str | None = None) -> Text:
    """Frames acquired/analysed/failed, particles and their rate, the acquisition's state."""
    text = Text()
    if acquisition:
        saved = acquisition.get("frames_saved")
        text.append(f"acquired {saved if saved is not None else '–'}")
        earlier = acquisition.get("frames_earlier") or 0
        if earlier:
            text.append(f" (+{earlier})")
        text.append("  ")
    text.append(f"analysed {stats.get('frames_ok', 0)}  ")
    failed = stats.get("frames_failed", 0)
    text.append(f"failed {failed}", style="red" if failed else "")
    queue = stats.get("queue")
    if isinstance(queue, Mapping):
        waiting_frames = sum(queue.get(k) or 0 for k in ("waiting", "pending", "running")
                             if _is_number(queue.get(k)))
        if waiting_frames:
            text.append(f"  queued {waiting_frames}")
    particles = int(stats.get("particles", 0) or 0)
    text.append(f"  particles {particles:,}" if particles < 1_000_000
                else f"  particles {_count(particles)}")
    rate = rate_per_min if rate_per_min is not None else stats.get("particles_per_min")
    text.append(f" ({_count(rate)}/min)" if _is_number(rate) else " (–/min)")
    for line in _acquisition_lines(acquisition, stale_s=stale_s, waiting=waiting):
        text.append("\n")
        text.append_text(line)
    if stats.get("converged"):
        # why it has not converged yet is in the table, population by population
        text.append("\nconverged: every population's mean is known to the precision asked for",
                    style="bold green")
    return text


def _histogram_height(height: int | None, *, n_populations: int, n_other_rows: int,
                      width: int) -> tuple[int, bool]:
    """Rows per population's histogram, and whether the outliers' row fits too."""
    if height is None:  # no limit known: as before, taller bars on wider terminals
        return (2 if width < 100 else 3), True
    room = height - n_other_rows
    if n_populations == 0:
        return 1, room >= 1
    rows = max(1, min(4, room // n_populations))
    return rows, room - rows * n_populations >= 1


def render(stats: Mapping | None, acquisition: Mapping | None = None, *,
           errors: Iterable[str] = (), width: int = 80, height: int | None = None,
           rate_per_min: float | None = None, stale_s: float | None = None,
           waiting: str | None = None, stats_note: str | None = None,
           title_extra: str | None = None) -> Panel:
    """The whole dashboard for one ``stats`` message.

    Parameters
    ----------
    stats : mapping or None
        The latest ``stats`` (or ``converged``) message or ``summary.json`` content.
    acquisition : mapping, optional
        The acquisition's state (``stage_x_um``, ``stage_y_um``, ``defocus_um``, ``tile``,
        ``tiles``, ``skipped_segments``, ``frames_saved``, ``focus_images``, ``state``...,
        the fields of an ``acquisition`` message); None shows "no acquisition".
    errors : iterable of str
        The last error lines to show (at most three, one line each).
    width, height : int
        Terminal size; the histogram takes the width left after its labels and the rows
        left after everything else (``height=None``: no limit).
    rate_per_min : float, optional
        Particles analysed per minute.
    stale_s : float, optional
        Seconds since the acquisition state was last heard, when that is too long.
    waiting : str, optional
        What to say in place of the acquisition state when there is none yet.
    stats_note : str, optional
        What to say in place of the histogram before there are particles.
    title_extra : str, optional
        Appended to the title (e.g. the sample).
    """
    stats = stats or {}
    errors = [str(e) for e in errors][-3:]
    pops = stats.get("populations", []) or []
    narrow = width < 100
    n_acq_rows = 2 if acquisition else 1
    other_rows = (_FIXED_ROWS + len(pops) + n_acq_rows + len(errors)
                  + (1 if stats.get("converged") else 0))
    n_hist_pops = len([k for k in ((stats.get("histogram") or {}).get("counts") or {})
                       if int(k) >= 0])
    rows, with_outliers = _histogram_height(height, n_populations=n_hist_pops,
                                            n_other_rows=other_rows, width=width)
    label_width = 12 if narrow else 18
    parts = [render_histogram(stats, width=max(width - 4 - label_width, 20), height=rows,
                              outliers=with_outliers, label_width=label_width,
                              short_names=narrow,
                              empty=stats_note or "no particles yet")]
    if pops:
        parts.append(_populations_that_fit(stats, narrow=narrow, width=width - 4))
    parts.append(render_progress(stats, acquisition, rate_per_min=rate_per_min,
                                 stale_s=stale_s, waiting=waiting))
    if errors:
        parts.append(Text("\n".join(errors), style="red", no_wrap=True, overflow="ellipsis"))
    title = "particlewatch"
    if title_extra:
        title += f" {title_extra}"
    if _is_number(stats.get("precision")):
        title += f" — target ±{stats['precision'] * 100:g}% of each mean"
    return Panel(Group(*parts), title=title, border_style="green" if stats.get("converged")
                 else "blue")


def decode_message(payload: bytes, *, max_bytes: int = MAX_STATS_BYTES) -> dict:
    """Parse one stream message; raise ``ValueError`` with the reason if it is not ours."""
    try:
        return messages.decode(payload, max_bytes=max_bytes)
    except messages.MessageError as exc:
        raise ValueError(str(exc)) from None


#: Limits on what a stats message may ask the dashboard to draw (the daemon finds at most
#: a handful of populations and uses ~60 bins).
_MAX_POPULATIONS = 64
_MAX_BINS = 10_000
_POPULATION_NUMBERS = ("n", "fraction", "mean_ecd_nm", "sd_ecd_nm", "cv", "z_average_nm",
                       "ci95_rel", "needed_more")


def check_stats(message: Mapping) -> dict:
    """Check the parts of a ``stats``/``converged`` message the dashboard draws.

    The daemon's own messages always pass; anything else that claims to be one (another
    program on the port, a newer version) is refused before it can break the display.

    Raises
    ------
    ValueError
        With the reason.
    """
    pops = message.get("populations", [])
    if not isinstance(pops, list) or not all(isinstance(p, dict) for p in pops):
        raise ValueError("stats 'populations' must be a list of objects")
    if len(pops) > _MAX_POPULATIONS:
        raise ValueError(f"{len(pops)} populations, more than {_MAX_POPULATIONS} to draw")
    for pop in pops:
        if not isinstance(pop.get("id"), int) or isinstance(pop.get("id"), bool):
            raise ValueError("a population's 'id' must be an integer")
        for key in _POPULATION_NUMBERS:
            if pop.get(key) is not None and not _is_number(pop[key]):
                raise ValueError(f"population {pop['id']}: {key!r} must be a number")
        ci = pop.get("ci95_nm")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2
                                   and all(v is None or _is_number(v) for v in ci)):
            raise ValueError(f"population {pop['id']}: 'ci95_nm' must be [low, high]")
        if pop.get("shape") is not None and not isinstance(pop["shape"], str):
            raise ValueError(f"population {pop['id']}: 'shape' must be text")
    for key in ("frames_ok", "frames_failed", "particles", "precision"):
        if message.get(key) is not None and not _is_number(message[key]):
            raise ValueError(f"stats {key!r} must be a number")
    hist = message.get("histogram")
    if hist is not None:
        if not isinstance(hist, dict):
            raise ValueError("stats 'histogram' must be an object")
        edges, counts = hist.get("edges_nm", []), hist.get("counts", {})
        if (not isinstance(edges, list) or len(edges) > _MAX_BINS + 1
                or not all(_is_number(e) for e in edges)):
            raise ValueError(f"histogram 'edges_nm' must be at most {_MAX_BINS + 1} numbers")
        if not isinstance(counts, dict):
            raise ValueError("histogram 'counts' must be an object")
        for key, values in counts.items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"histogram counts key {key!r} is not a population id") from None
            if (not isinstance(values, list) or len(values) != max(len(edges) - 1, 0)
                    or not all(_is_number(v) for v in values)):
                raise ValueError(f"histogram counts of {key!r} must be "
                                 f"{max(len(edges) - 1, 0)} numbers")
    return dict(message)


def _error_line(message: Mapping) -> str:
    """One line for an ``error`` message: the file's name rather than its whole path."""
    text = str(message.get("error") or message.get("message") or "error")
    path = message.get("path")
    if isinstance(path, str) and path:
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        text = text.replace(path, name, 1) if path in text else f"{name}: {text}"
    return " ".join(text.split())[:300]


class DashboardState:
    """What the dashboard shows, kept current from messages of either stream.

    Thread-safe: the session calls :meth:`on_acquisition_state` from its acquisition thread
    and :meth:`on_message` from its stream thread while the main thread renders.

    Parameters
    ----------
    clock : callable
        Seconds, monotonic (``time.monotonic``); injectable for tests.
    rate_window_s : float
        Particles per minute are counted over this much recent time.
    stale_after_s : float, optional
        Mark the acquisition state stale when unheard this long (remote dashboards; the
        in-process session has no heartbeat to wait for).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 rate_window_s: float = 300.0, stale_after_s: float | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.rate_window_s = rate_window_s
        self.stale_after_s = stale_after_s
        self.stats: dict | None = None
        self.acquisition: dict | None = None
        self.errors: deque[str] = deque(maxlen=3)
        self.ignored = 0
        self._acquisition_at: float | None = None
        self._samples: deque[tuple[float, int]] = deque()

    # --- input ---------------------------------------------------------------------------
    def on_payload(self, payload: bytes, *, stream: str = "stats") -> bool:
        """Decode and take one raw message from ``stream`` (``stats`` or ``acquisition``).

        A malformed message is ignored with a logged line (and counted); returns whether
        the message was taken.
        """
        limit = (messages.MAX_ACQUISITION_BYTES if stream == "acquisition"
                 else MAX_STATS_BYTES)
        try:
            message = messages.decode(payload, max_bytes=limit)
            wanted = ("acquisition",) if stream == "acquisition" else messages.STREAM_TYPES
            if message["type"] not in wanted:
                raise messages.MessageError(
                    f"unexpected message type {message['type']!r} on the {stream} stream")
            self.on_message(message)
        except (messages.MessageError, ValueError) as exc:
            self.ignore(stream, str(exc))
            return False
        return True

    def on_message(self, message: Mapping) -> None:
        """Take one decoded message; raise ``ValueError`` if it is malformed."""
        kind = message.get("type")
        if kind == "acquisition":
            checked = messages.validate_acquisition(message)
            with self._lock:
                self.acquisition = checked
                self._acquisition_at = self._clock()
        elif kind in ("stats", "converged"):
            checked = check_stats(message)
            with self._lock:
                now, particles = self._clock(), int(checked.get("particles") or 0)
                if self._samples and particles < self._samples[-1][1]:
                    self._samples.clear()  # the daemon started over
                self._samples.append((now, particles))
                while len(self._samples) > 2 and now - self._samples[1][0] > self.rate_window_s:
                    self._samples.popleft()
                self.stats = checked
        elif kind == "error":
            with self._lock:
                self.errors.append(_error_line(message))
        # `frame` messages: a failed frame also comes as an `error` message, shown once

    def on_acquisition_state(self, state: Mapping) -> None:
        """Take the runner's state (its ``on_state`` callback) in-process."""
        message = messages.acquisition_message(state)
        with self._lock:
            self.acquisition = message
            self._acquisition_at = self._clock()

    def add_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(" ".join(str(text).split())[:300])

    def ignore(self, stream: str, reason: str) -> None:
        """Count a malformed message and log why (rate-limited)."""
        with self._lock:
            self.ignored += 1
            count = self.ignored
        # one line each for the first few, then one per hundred: a misbehaving
        # publisher must not flood the terminal
        if count <= 10 or count % 100 == 0:
            log.warning("dashboard: ignored a malformed message on the %s stream (%d so far): "
                        "%s", stream, count, reason)

    # --- output --------------------------------------------------------------------------
    def rate_per_min(self) -> float | None:
        """Particles analysed per minute over the recent window (None until two samples
        at least a second apart)."""
        with self._lock:
            if len(self._samples) < 2:
                return None
            (t0, p0), (t1, p1) = self._samples[0], self._samples[-1]
        return (p1 - p0) / (t1 - t0) * 60 if t1 - t0 >= 1.0 else None

    def stale_s(self) -> float | None:
        """Seconds since the acquisition was heard, when that is beyond ``stale_after_s``."""
        with self._lock:
            if self.stale_after_s is None or self._acquisition_at is None:
                return None
            if (self.acquisition or {}).get("state") in _FINAL_STATES:
                return None
            age = self._clock() - self._acquisition_at
        return age if age > self.stale_after_s else None

    def snapshot(self) -> tuple[dict | None, dict | None, list[str]]:
        """The latest stats, acquisition state and error lines (copies)."""
        with self._lock:
            acquisition = dict(self.acquisition) if self.acquisition else None
            return self.stats, acquisition, list(self.errors)

    def render(self, *, width: int = 80, height: int | None = None,
               waiting: str | None = None, stats_note: str | None = None,
               override: Mapping | None = None) -> Panel:
        """The dashboard now; ``override`` replaces fields of the acquisition state."""
        stats, acquisition, errors = self.snapshot()
        if override:
            acquisition = {**(acquisition or {}), **override}
        if self.ignored:
            errors = errors + [f"ignored {self.ignored} malformed message(s), see the log"]
        extra = None
        if acquisition and acquisition.get("sample"):
            extra = f"{acquisition['sample']}"
            if acquisition.get("backend"):
                extra += f" ({acquisition['backend']})"
        return render(stats, acquisition, errors=errors, width=width, height=height,
                      rate_per_min=self.rate_per_min(), stale_s=self.stale_s(),
                      waiting=waiting, stats_note=stats_note, title_extra=extra)


# --- finding and following the streams --------------------------------------------------
def acquisition_endpoint_for(stats_endpoint: str) -> str | None:
    """Where a session publishes its acquisition state, given its statistics endpoint.

    ``tcp://H:P`` -> ``tcp://H:P+4``; an ephemeral or non-TCP statistics endpoint has no
    fixed partner (None): find it in ``OUT/session.json``.
    """
    scheme, sep, rest = stats_endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not port.isdigit() or int(port) == 0:
        return None
    return f"{scheme}://{host}:{int(port) + ACQUISITION_PORT_OFFSET}"


def _connectable(endpoint) -> str | None:
    """A ZeroMQ endpoint read from a file, fit to connect to; None if it is not one."""
    if not isinstance(endpoint, str) or len(endpoint) > 300 or not endpoint.isprintable():
        return None
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        return None
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return None
        if host in ("*", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "[::]":
            host = "[::1]"
        return f"tcp://{host}:{port}"
    return endpoint


def _read_endpoint_file(path: Path, key: str) -> str | None:
    try:
        if path.stat().st_size > _MAX_ENDPOINT_FILE_BYTES:
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there yet, or being replaced
    if not isinstance(info, dict) or info.get("schema_version") != SCHEMA_VERSION:
        return None
    endpoints = info.get("endpoints")
    return _connectable(endpoints.get(key)) if isinstance(endpoints, dict) else None


def endpoints_from_out(out_dir) -> dict[str, str | None]:
    """The statistics and acquisition endpoints a session or daemon wrote into ``out_dir``.

    ``daemon.json`` (written by the daemon) gives ``stats``; ``session.json`` (written by
    the session) gives ``acquisition``. A missing or unreadable file gives None.
    """
    out = Path(out_dir)
    return {"stats": _read_endpoint_file(out / "daemon.json", "stats"),
            "acquisition": _read_endpoint_file(out / "session.json", "acquisition")}


class StreamFollower:
    """Two SUB sockets, one on the daemon's statistics and one on the session's acquisition
    stream, feeding a :class:`DashboardState`.

    Parameters
    ----------
    state : DashboardState
    context : zmq.Context, optional
    """

    def __init__(self, state: DashboardState, *, context=None) -> None:
        import zmq

        self._zmq = zmq
        self.state = state
        context = context or zmq.Context.instance()
        self._sockets: dict[str, Any] = {}
        self.endpoints: dict[str, str | None] = {"stats": None, "acquisition": None}
        limits = {"stats": MAX_STATS_BYTES, "acquisition": messages.MAX_ACQUISITION_BYTES}
        for stream in ("stats", "acquisition"):
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            # oversize messages drop the connection before they are read into memory
            sock.setsockopt(zmq.MAXMSGSIZE, limits[stream] + 1)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._sockets[stream] = sock
        self._poller = zmq.Poller()
        for sock in self._sockets.values():
            self._poller.register(sock, zmq.POLLIN)

    def connect(self, *, stats: str | None = None, acquisition: str | None = None) -> None:
        """Follow these endpoints (None: none); a changed endpoint is reconnected."""
        for stream, endpoint in (("stats", stats), ("acquisition", acquisition)):
            old = self.endpoints[stream]
            if endpoint == old:
                continue
            sock = self._sockets[stream]
            if old is not None:
                try:
                    sock.disconnect(old)
                except self._zmq.ZMQError:
                    pass
            if endpoint is not None:
                sock.connect(endpoint)
            self.endpoints[stream] = endpoint

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for messages, then take every waiting one.

        Returns
        -------
        int
            Messages read (malformed ones included).
        """
        zmq = self._zmq
        read = 0
        for sock, _ in self._poller.poll(timeout_ms):
            stream = next(k for k, v in self._sockets.items() if v is sock)
            while True:
                try:
                    parts = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                read += 1
                if len(parts) != 1:
                    self.state.ignore(stream, f"message of {len(parts)} parts, expected 1")
                    continue
                self.state.on_payload(parts[0], stream=stream)
        return read

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)


def resolve_endpoints(*, out_dir=None, connect: str | None = None,
                      acquisition: str | None = None) -> dict[str, str | None]:
    """The endpoints ``particlewatch dashboard`` follows.

    Given endpoints win; with ``out_dir`` the rest come from its ``daemon.json`` and
    ``session.json`` (None while a file is missing: a session not started yet, or a plain
    ``watch`` without acquisition); without, statistics default to ``tcp://127.0.0.1:5556``
    and the acquisition to the statistics port + 4.
    """
    found = endpoints_from_out(out_dir) if out_dir is not None else {}
    stats = connect or found.get("stats")
    if stats is None and out_dir is None:
        stats = "tcp://127.0.0.1:5556"
    if acquisition is None:
        acquisition = found.get("acquisition")
        if acquisition is None and out_dir is None:
            acquisition = acquisition_endpoint_for(stats)
    return {"stats": stats, "acquisition": acquisition}


def _waiting_text(endpoints: Mapping, out_dir) -> str:
    if endpoints.get("acquisition"):
        return f"no acquisition heard yet on {endpoints['acquisition']}"
    if out_dir is not None:
        return f"no acquisition: {Path(out_dir) / 'session.json'} not found"
    return "no acquisition"


def main(args) -> int:
    """``particlewatch dashboard``: follow a running daemon and, when there is one, the
    session's acquisition.

    ``args.connect``: the statistics endpoint (default ``tcp://127.0.0.1:5556``, or from
    ``OUT/daemon.json`` with ``--out``); ``args.acquisition``: the acquisition endpoint
    (default: the statistics port + 4, or from ``OUT/session.json`` with ``--out``).
    """
    from rich.live import Live

    out_dir = getattr(args, "out", None)
    given = {"connect": getattr(args, "connect", None),
             "acquisition": getattr(args, "acquisition", None)}
    state = DashboardState(stale_after_s=ACQUISITION_STALE_S)
    follower = StreamFollower(state)
    next_look = 0.0
    try:
        with Live(Text("starting"), refresh_per_second=4, screen=False) as live:
            while True:
                now = time.monotonic()
                if now >= next_look:  # the files may appear or change (a resumed session)
                    follower.connect(**resolve_endpoints(out_dir=out_dir, **given))
                    next_look = now + 1.0
                follower.poll(250)
                source = follower.endpoints["stats"] or f"{Path(out_dir) / 'daemon.json'}"
                console = live.console
                live.update(state.render(
                    width=console.width, height=console.height,
                    waiting=_waiting_text(follower.endpoints, out_dir),
                    stats_note=f"no particles yet (statistics from {source})"))
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
    return 0
