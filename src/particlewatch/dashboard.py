"""The terminal dashboard: live size distributions and progress towards the precision asked for.

:func:`render` is a pure function from the latest ``stats`` message (the daemon publishes full
state, never deltas, so one message is enough) plus the acquisition's state to a rich
renderable; :func:`main` subscribes to a running daemon's statistics stream and redraws.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Iterable, Mapping

import numpy as np
from rich import box
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from particlewatch import SCHEMA_VERSION

POPULATION_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")
_BLOCKS = " ▁▂▃▄▅▆▇█"


def population_colour(pop_id: int) -> str:
    """The colour of population ``pop_id`` everywhere in the dashboard (grey for outliers)."""
    return "grey50" if pop_id < 0 else POPULATION_COLOURS[pop_id % len(POPULATION_COLOURS)]


def population_name(pop: Mapping, *, short: bool = False) -> str:
    """A human name such as ``P0 sphere 57 nm`` (``P0 57 nm`` when ``short``)."""
    mean = pop.get("mean_ecd_nm")
    shape = "" if short else (pop.get("shape") or "")
    size = f"{mean:.0f} nm" if isinstance(mean, (int, float)) else ""
    return " ".join(part for part in (f"P{pop.get('id')}", shape, size) if part)


def _fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _size(value) -> str:
    """A size in nm with three significant figures or so (54.2, 110, 1450)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _count(value) -> str:
    """A particle count short enough for a narrow column (900, 12k, 3.4M)."""
    value = int(value)
    if value < 10_000:
        return str(value)
    if value < 1_000_000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1e6:.1f}M"


def _half_width_rel(pop: Mapping) -> float | None:
    rel = pop.get("ci95_rel")
    if isinstance(rel, (int, float)):
        return float(rel)
    ci, mean = pop.get("ci95_nm"), pop.get("mean_ecd_nm")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and mean:
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
    levels = [0 if peak <= 0 else round(c / peak * 8 * height) for c in counts]
    rows = []
    for row in range(height - 1, -1, -1):
        cells = []
        for level in levels:
            fill = min(max(level - row * 8, 0), 8)
            cells.append(_BLOCKS[fill])
        rows.append("".join(cells))
    return rows


def _rebin(counts: list[float], width: int) -> list[float]:
    if len(counts) <= width:
        return counts
    return [float(group.sum()) for group in np.array_split(np.asarray(counts), width)]


def render_histogram(stats: Mapping, *, width: int = 60, height: int = 2) -> Text:
    """The size histogram of every population on a shared nm axis."""
    hist = stats.get("histogram") or {}
    edges = hist.get("edges_nm") or []
    counts_by_id = hist.get("counts") or {}
    text = Text()
    if len(edges) < 2 or not counts_by_id:
        text.append("no particles yet", style="dim")
        return text
    rebinned = {k: _rebin([float(c) for c in v], width) for k, v in counts_by_id.items()}
    peak = max((max(v) for v in rebinned.values() if v), default=0)
    names = {str(p.get("id")): population_name(p) for p in stats.get("populations", [])}
    label_width = 16
    for key in sorted(rebinned, key=lambda k: int(k)):
        rows = histogram_rows(rebinned[key], peak=peak, height=height)
        colour = population_colour(int(key))
        name = names.get(key, "outliers" if int(key) < 0 else f"P{key}")
        for i, row in enumerate(rows):
            label = name if i == height - 1 else ""
            text.append(f"{label[:label_width]:<{label_width}}", style=colour)
            text.append(row + "\n", style=colour)
    n_cols = len(next(iter(rebinned.values())))
    lo, hi = edges[0], edges[-1]
    axis = f"{lo:.0f} nm".ljust(max(n_cols - 8, 1)) + f"{hi:.0f} nm".rjust(8)
    text.append(" " * label_width + axis[:max(n_cols, 16)], style="dim")
    return text


def render_populations(stats: Mapping, *, narrow: bool = False) -> Table:
    """One row per population: n, mean ± 95% CI, z-average, σ/μ, progress to the precision."""
    precision = stats.get("precision")
    table = Table(box=box.SIMPLE_HEAD, expand=not narrow, pad_edge=False, padding=(0, 1))
    for column, justify in (("population", "left"), ("n", "right"), ("frac", "right"),
                            ("mean ± CI nm", "right"), ("z-avg", "right"), ("σ/μ", "right"),
                            ("precision", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for pop in stats.get("populations", []):
        colour = population_colour(int(pop.get("id", -1)))
        mean = pop.get("mean_ecd_nm")
        ci = pop.get("ci95_nm")
        half = (ci[1] - ci[0]) / 2 if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
        rel = _half_width_rel(pop)
        target = _fmt(precision and precision * 100, '.1f')
        if pop.get("converged"):
            progress = Text(f"±{_fmt(rel and rel * 100, '.1f')}% ✓", style="bold green")
        else:
            if narrow:
                progress = Text(f"±{_fmt(rel and rel * 100, '.1f')}%/{precision * 100:g}%"
                                if precision else f"±{_fmt(rel and rel * 100, '.1f')}%")
            else:
                progress = Text(f"±{_fmt(rel and rel * 100, '.1f')}% of ±{target}%")
            more = pop.get("needed_more")
            if isinstance(more, (int, float)) and more > 0:
                progress.append(f" ~{_count(more)}" if narrow else f", ~{_count(more)} more",
                                style="yellow")
        table.add_row(
            Text(population_name(pop, short=narrow), style=colour),
            str(pop.get("n", 0)),
            _fmt(pop.get("fraction"), ".0%"),
            f"{_size(mean)} ± {_fmt(half, '.1f' if half is not None and half < 10 else '.0f')}",
            _size(pop.get("z_average_nm")),
            _fmt(pop.get("cv"), ".3f"),
            progress,
        )
    return table


def render_progress(stats: Mapping, acquisition: Mapping | None) -> Text:
    """Frames, rate and the acquisition's state, a few short lines."""
    text = Text()
    acquired = (acquisition or {}).get("frames_saved")
    text.append(f"frames acquired {acquired if acquired is not None else '–'}  ")
    text.append(f"analysed {stats.get('frames_ok', 0)}  ")
    failed = stats.get("frames_failed", 0)
    text.append(f"failed {failed}", style="red" if failed else "")
    text.append(f"  particles {stats.get('particles', 0)}")
    rate = stats.get("particles_per_min")
    if isinstance(rate, (int, float)):
        text.append(f"  ({rate:,.0f}/min)")
    if acquisition:
        x, y = acquisition.get("stage_x_um"), acquisition.get("stage_y_um")
        text.append("\n")
        text.append(f"{acquisition.get('state', 'acquiring')}", style="bold")
        text.append(f"  stage {_fmt(x, '.1f')}, {_fmt(y, '.1f')} µm")
        text.append(f"  focus {_fmt(acquisition.get('defocus_um'), '+.3f')} µm")
        tile, tiles = acquisition.get("tile"), acquisition.get("tiles")
        if tile is not None:
            text.append(f"  tile {tile} of {tiles if tiles is not None else '?'}")
        text.append(f"  skipped {acquisition.get('skipped_segments', 0)}")
    if stats.get("converged"):
        # why it has not converged yet is in the table, population by population
        text.append("\nconverged: every population's mean is known to the precision asked for",
                    style="bold green")
    return text


def render(stats: Mapping | None, acquisition: Mapping | None = None, *,
           errors: Iterable[str] = (), width: int = 80) -> Panel:
    """The whole dashboard for one ``stats`` message.

    Parameters
    ----------
    stats : mapping or None
        The latest ``stats`` (or ``converged``) message or ``summary.json`` content.
    acquisition : mapping, optional
        The acquisition's state (``stage_x_um``, ``defocus_um``, ``tile``, ``tiles``,
        ``skipped_segments``, ``frames_saved``, ``state``).
    errors : iterable of str
        The last error lines to show.
    width : int
        Terminal width; the histogram uses what is left after its labels.
    """
    stats = stats or {}
    parts = [render_histogram(stats, width=max(width - 22, 20), height=2 if width < 100 else 3),
             render_populations(stats, narrow=width < 100), render_progress(stats, acquisition)]
    errors = list(errors)
    if errors:
        parts.append(Text("\n".join(errors[-3:]), style="red"))
    title = "particlewatch"
    if stats.get("precision"):
        title += f" — target ±{stats['precision'] * 100:g}% of each mean size"
    return Panel(Group(*parts), title=title, border_style="green" if stats.get("converged")
                 else "blue")


def decode_message(payload: bytes, *, max_bytes: int = 16 * 1024 * 1024) -> dict:
    """Parse one stream message; raise ``ValueError`` with the reason if it is not ours."""
    if len(payload) > max_bytes:
        raise ValueError(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    if message.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {message.get('schema_version')!r}")
    if not isinstance(message.get("type"), str):
        raise ValueError("message has no type")
    return message


def main(args) -> int:
    """``particlewatch dashboard --connect ENDPOINT``: follow a running daemon."""
    import zmq

    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(args.connect)
    stats: dict | None = None
    acquisition: dict | None = None
    errors: deque[str] = deque(maxlen=3)
    waiting = Text(f"waiting for statistics from {args.connect} (Ctrl-C to quit)")
    try:
        with Live(waiting, refresh_per_second=4, screen=False) as live:
            while True:
                if not socket.poll(500):
                    continue
                try:
                    message = decode_message(socket.recv())
                except ValueError as exc:
                    errors.append(f"ignored a message: {exc}")
                    continue
                kind = message["type"]
                if kind in ("stats", "converged"):
                    stats = message
                elif kind == "acquisition":
                    acquisition = message
                elif kind == "error":
                    errors.append(str(message.get("error") or message.get("message"))[:200])
                elif kind == "frame" and message.get("status") == "failed":
                    errors.append(f"{message.get('path')}: {message.get('reason')}")
                live.update(render(stats, acquisition, errors=errors,
                                   width=live.console.width))
    except KeyboardInterrupt:
        pass
    finally:
        socket.close()
    return 0
