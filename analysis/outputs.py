"""The analysis outputs in ``--out DIR``: CSV tables, ``summary.json``, histogram and overlays.

Every file a reader may open while it is being replaced (``particles.csv``, ``summary.json``,
``histogram.png``, overlays) is written under a temporary name beginning with ``.`` and renamed,
so a dashboard or a script never sees half a file. ``frames.csv`` and ``particles.csv`` grow by
appending whole rows (flushed and fsynced) while a batch or the daemon runs; once populations
are known, ``particles.csv`` is rewritten with its ``population`` column filled (it is empty in
appended rows: the population of a particle is only known from all particles together).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from ..frames import atomic_write_bytes
from ._json import json_safe

__all__ = ["PARTICLE_COLUMNS", "FRAME_COLUMNS", "append_frame_rows", "write_particles",
           "write_frames", "write_summary", "FLAG_COLUMNS", "write_histogram", "write_overlay",
           "contrast_stretch", "population_colour", "atomic_write_bytes"]

#: ``particles.csv`` columns, in order (INTERFACE.md, plus ``shell_nm`` of hollow particles and
#: ``touching``: the particle touches another or an agglomerate box).
PARTICLE_COLUMNS = ("frame", "particle_id", "population", "x_px", "y_px", "area_nm2", "ecd_nm",
                    "feret_max_nm", "feret_min_nm", "perimeter_nm", "circularity", "convexity",
                    "solidity", "aspect_ratio", "major_axis_nm", "minor_axis_nm", "separated",
                    "shell_nm", "touching")
#: ``frames.csv`` columns, in order (INTERFACE.md).
FRAME_COLUMNS = ("frame", "path", "status", "reason", "particles", "pixel_nm", "defocus_um",
                 "stage_x_um", "stage_y_um", "seconds")

PARTICLES_CSV = "particles.csv"
FRAMES_CSV = "frames.csv"
SUMMARY_JSON = "summary.json"

_INT_COLUMNS = {"particle_id", "population", "particles"}
#: ``particles.csv`` columns that hold flags (``true``/``false``).
FLAG_COLUMNS = frozenset({"separated", "touching"})
_OUTLIER_GREY = (0.55, 0.55, 0.55)
_INF = float("inf")


# -- small helpers --------------------------------------------------------------------------



def _cell(name, value):
    """One CSV cell: empty for missing/NaN, ``true``/``false`` for flags, compact floats."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if name in FLAG_COLUMNS:
        return "true" if bool(value) else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return ""
        if name in _INT_COLUMNS and float(value).is_integer():
            return str(int(value))
        return f"{float(value):.7g}"
    return " ".join(str(value).split())  # reasons and paths: one line


def _rows_text(columns, rows, *, header):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(c, row.get(c)) for c in columns])
    return buf.getvalue()


def _append_text(path, columns, rows):
    """Append rows, writing the header first when the file is new or empty; fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", newline="") as fh:
        new = fh.tell() == 0
        fh.write(_rows_text(columns, rows, header=new))
        fh.flush()
        os.fsync(fh.fileno())


def _get(result, name, default=None):
    if isinstance(result, dict):
        return result.get(name, default)
    return getattr(result, name, default)


def _n_rows(table):
    for value in table.values():
        return len(value)
    return 0


def _particle_rows(frame, particles, populations=None):
    n = _n_rows(particles or {})
    cols = {c: np.asarray(particles[c]) for c in particles}
    for i in range(n):
        row = {c: cols[c][i] for c in cols}
        row["frame"] = frame
        row["population"] = None if populations is None else int(populations[i])
        yield row


def _frame_row(result):
    particles = _get(result, "particles") or {}
    row = {c: _get(result, c) for c in FRAME_COLUMNS if c != "particles"}
    row["particles"] = _n_rows(particles) if _get(result, "status") == "ok" else 0
    return row


# -- tables ---------------------------------------------------------------------------------

def append_frame_rows(out, results):
    """Append frames to ``frames.csv`` and their particles to ``particles.csv``.

    Parameters
    ----------
    out : str or path-like
        The output folder (created if needed).
    results : iterable of FrameResult or dict
        Analysed frames (``FrameResult`` or its ``to_message()`` dict). Failed frames get a
        ``frames.csv`` row only. The ``population`` cells stay empty until
        :func:`write_particles` rewrites the table.
    """
    out = Path(out)
    results = list(results)
    _append_text(out / FRAMES_CSV, FRAME_COLUMNS, [_frame_row(r) for r in results])
    rows = []
    for r in results:
        if _get(r, "status") == "ok":
            rows.extend(_particle_rows(_get(r, "frame"), _get(r, "particles") or {}))
    if rows or not (out / PARTICLES_CSV).exists():
        _append_text(out / PARTICLES_CSV, PARTICLE_COLUMNS, rows)


def write_frames(out, results):
    """Rewrite ``frames.csv`` from ``results`` atomically (see :func:`append_frame_rows`)."""
    text = _rows_text(FRAME_COLUMNS, [_frame_row(r) for r in results], header=True)
    atomic_write_bytes(Path(out) / FRAMES_CSV, text.encode("utf-8"))


def write_particles(out, table, labels):
    """Rewrite ``particles.csv`` with every particle and its population, atomically.

    Parameters
    ----------
    out : str or path-like
        The output folder.
    table : dict of str to ndarray
        All particles, one row each, with a ``frame`` column (as
        ``RunningStatistics.table``); columns beyond :data:`PARTICLE_COLUMNS` are ignored,
        missing ones are left empty.
    labels : (n,) array_like of int
        Population id per particle, -1 for outliers.
    """
    table = dict(table or {})
    n = _n_rows(table)
    labels = np.asarray(labels if labels is not None else np.full(n, -1), dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"labels (shape {labels.shape}) must have one entry per particle "
                         f"({n})")
    table["population"] = labels
    # column by column: one formatting decision per column, not per cell
    columns = [_format_column(c, table.get(c), n) for c in PARTICLE_COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PARTICLE_COLUMNS)
    writer.writerows(zip(*columns))
    atomic_write_bytes(Path(out) / PARTICLES_CSV, buf.getvalue().encode("utf-8"))


def _format_column(name, values, n):
    """The CSV cells of one column (see :func:`_cell` for the rules)."""
    if values is None:
        return [""] * n
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"column {name!r} (shape {arr.shape}) must have {n} rows")
    if name in FLAG_COLUMNS or arr.dtype == bool:
        return ["true" if v else "false" for v in arr.astype(bool).tolist()]
    if arr.dtype.kind in "iu":
        return [str(v) for v in arr.tolist()]
    if arr.dtype.kind == "f":
        if name in _INT_COLUMNS:
            return [_cell(name, v) for v in arr.tolist()]
        return ["" if v != v or v in (_INF, -_INF) else f"{v:.7g}" for v in arr.tolist()]
    return [_cell(name, v) for v in arr.tolist()]


def write_summary(out, summary):
    """Write ``summary.json`` atomically (NaN and ±inf become ``null``).

    Parameters
    ----------
    out : str or path-like
        The output folder.
    summary : dict
        As from :func:`particlewatch.analysis.statistics.summarize`.
    """
    text = json.dumps(json_safe(summary), indent=1, allow_nan=False)
    atomic_write_bytes(Path(out) / SUMMARY_JSON, (text + "\n").encode("utf-8"))


# -- pictures -------------------------------------------------------------------------------

def population_colour(pid):
    """RGB (0–1) of population ``pid``: tab10 by id, grey for outliers (-1).

    Parameters
    ----------
    pid : int

    Returns
    -------
    tuple of float
    """
    from matplotlib import colormaps

    if pid is None or pid < 0:
        return _OUTLIER_GREY
    return tuple(colormaps["tab10"](int(pid) % 10)[:3])


def _png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_histogram(path, table, labels, summary=None):
    """Draw the size (ECD) distribution, one colour per population, to a PNG.

    The number-average (solid line) and z-average (dashed) of each population are marked; the
    legend gives each population's n and mean ± 95% CI half-width.

    Parameters
    ----------
    path : str or path-like
        The PNG file, written atomically (any name; the format is always PNG).
    table : dict of str to ndarray
        Particles with an ``ecd_nm`` column.
    labels : (n,) array_like of int
        Population per particle, -1 for outliers.
    summary : dict, optional
        From ``summarize``: its ``histogram.edges_nm`` sets the bins and its ``populations``
        the averages; computed from ``table`` alone when absent.
    """
    from matplotlib.figure import Figure

    ecd = np.asarray((table or {}).get("ecd_nm", np.zeros(0)), dtype=float)
    labels = np.asarray(labels if labels is not None else np.full(ecd.size, -1), dtype=int)
    if labels.shape != ecd.shape:
        raise ValueError(f"labels (shape {labels.shape}) must match ecd_nm (shape {ecd.shape})")
    good = np.isfinite(ecd) & (ecd > 0)
    edges = _histogram_edges(ecd[good], summary)
    pops = {p["id"]: p for p in (summary or {}).get("populations", []) if "id" in p}

    fig = Figure(figsize=(7.0, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ids = sorted(set(labels[good].tolist()))
    ids = [i for i in ids if i >= 0] + ([-1] if -1 in ids else [])
    for pid in ids:
        values = ecd[good & (labels == pid)]
        colour = population_colour(pid)
        ax.hist(values, bins=edges, color=colour, alpha=0.6 if pid >= 0 else 0.4,
                label=_legend_text(pid, values, pops.get(pid)), histtype="stepfilled",
                edgecolor=colour)
        if pid < 0:
            continue
        mean = (pops.get(pid) or {}).get("mean_ecd_nm") or float(np.mean(values))
        z_avg = (pops.get(pid) or {}).get("z_average_nm")
        if z_avg is None:
            from .statistics import z_average

            z_avg = z_average(values)
        ax.axvline(mean, color=colour, lw=1.6)
        ax.axvline(z_avg, color=colour, lw=1.4, ls="--")
    if ids:
        ax.plot([], [], color="k", lw=1.6, label="number average")
        ax.plot([], [], color="k", lw=1.4, ls="--", label="z-average")
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no particles", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("equivalent circular diameter (nm)")
    ax.set_ylabel("particles")
    ax.set_title(_histogram_title(ecd[good].size, summary), fontsize=10)
    atomic_write_bytes(path, _png_bytes(fig))


def _histogram_edges(values, summary):
    edges = ((summary or {}).get("histogram") or {}).get("edges_nm")
    if edges and len(edges) >= 2:
        return np.asarray(edges, dtype=float)
    if values.size == 0:
        return np.linspace(0.0, 1.0, 11)
    lo, hi = np.quantile(values, [0.001, 0.999])
    span = max(hi - lo, 1e-6 * max(hi, 1.0))
    bins = int(np.clip(np.sqrt(values.size), 10, 80))
    return np.linspace(max(lo - 0.05 * span, 0.0), hi + 0.05 * span, bins + 1)


def _legend_text(pid, values, pop):
    if pid < 0:
        return f"outliers (n={values.size})"
    n = (pop or {}).get("n", values.size)
    mean = (pop or {}).get("mean_ecd_nm")
    ci = (pop or {}).get("ci95_nm")
    if mean is None:
        mean = float(np.mean(values)) if values.size else float("nan")
    if ci and ci[0] is not None and ci[1] is not None:
        return f"population {pid}: n={n}, {mean:.2f} ± {(ci[1] - ci[0]) / 2:.2f} nm (95% CI)"
    return f"population {pid}: n={n}, {mean:.2f} nm"


def _histogram_title(n, summary):
    if not summary:
        return f"{n} particles"
    text = (f"{summary.get('particles', n)} particles, {summary.get('frames_ok', '?')} frames"
            f" ({summary.get('frames_failed', 0)} failed)")
    if "converged" in summary:
        text += " — converged" if summary["converged"] else " — not converged"
    return text


def contrast_stretch(image, *, low_pct=0.5, high_pct=99.5):
    """Map an image to 0–1 between two percentiles of its finite pixels (NaN → 0).

    Parameters
    ----------
    image : (M, N) array_like
    low_pct, high_pct : float, optional

    Returns
    -------
    (M, N) ndarray of float32
    """
    img = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, np.float32)
    sample = img[finite]
    if sample.size > 1_000_000:  # percentiles of a regular subsample are close enough
        sample = sample[:: sample.size // 1_000_000 + 1]
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if not hi > lo:
        hi = lo + 1.0
    out = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    out[~finite] = 0.0
    return out


def write_overlay(path, image, labels, *, populations=None, separated=None,
                  agglomerate_boxes=()):
    """Write the frame with each particle's outline drawn on it, as a PNG.

    Outlines are coloured by population when ``populations`` is given (outliers grey),
    otherwise by whether the particle came out of splitting a touching group (orange) or not
    (cyan). Agglomerates that could not be split are boxed in red.

    Parameters
    ----------
    path : str or path-like
        The PNG file, written atomically.
    image : (M, N) array_like
        The frame (contrast-stretched between its 0.5 and 99.5 percentiles).
    labels : (M, N) array_like of int
        Particle labels (0 background).
    populations : mapping or (max_label + 1,) array_like of int, optional
        Population id of each label.
    separated : (max_label + 1,) array_like of bool, optional
        Whether each label was separated (index 0 the background).
    agglomerate_boxes : iterable of (row0, col0, row1, col1), optional
    """
    from skimage.segmentation import find_boundaries
    from scipy import ndimage as ndi
    import matplotlib.image as mpimg

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"image (shape {image.shape}) and labels (shape {labels.shape}) "
                         f"must be 2-D and of the same shape")
    # uint8 throughout: a 4096² frame is 50 MB of RGB, not 200 MB of floats
    grey = (contrast_stretch(image) * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    n = int(labels.max()) if labels.size else 0
    if n > 0:
        edge = find_boundaries(labels, mode="inner")
        if max(labels.shape) > 2048:  # stay visible when the PNG is viewed scaled down
            edge = ndi.binary_dilation(edge) & (labels > 0)
        lut = (_label_colours(n, populations, separated) * 255.0 + 0.5).astype(np.uint8)
        rgb[edge] = lut[labels[edge]]
    for box in agglomerate_boxes or ():
        _draw_box(rgb, box, (230, 26, 26))
    data = io.BytesIO()
    mpimg.imsave(data, rgb, format="png")
    atomic_write_bytes(path, data.getvalue())


def _label_colours(n, populations, separated):
    lut = np.zeros((n + 1, 3), np.float32)
    if populations is not None:
        if isinstance(populations, dict):
            get = populations.get
        else:
            arr = np.asarray(populations)
            get = (lambda k: int(arr[k]) if k < arr.size else -1)
        for k in range(1, n + 1):
            pid = get(k)
            lut[k] = population_colour(-1 if pid is None else int(pid))
        return lut
    lut[1:] = (0.1, 0.85, 0.95)
    if separated is not None:
        sep = np.asarray(separated, dtype=bool)
        idx = np.nonzero(sep[: n + 1])[0]
        lut[idx[idx > 0]] = (1.0, 0.55, 0.0)
    return lut


def _draw_box(rgb, box, colour):
    r0, c0, r1, c1 = (int(v) for v in box)
    h, w = rgb.shape[:2]
    r0, r1 = max(r0, 0), min(r1, h) - 1
    c0, c1 = max(c0, 0), min(c1, w) - 1
    if r1 < r0 or c1 < c0:
        return
    rgb[r0, c0:c1 + 1] = colour
    rgb[r1, c0:c1 + 1] = colour
    rgb[r0:r1 + 1, c0] = colour
    rgb[r0:r1 + 1, c1] = colour
