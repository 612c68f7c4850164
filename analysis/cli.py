"""``particlewatch analyze PATH... --out DIR``: batch analysis of frames and folders.

Frames are analysed in a process pool (one worker per core) with a progress bar on stderr.
A frame that cannot be analysed costs one line on stderr (file and reason) and a ``failed`` row
in ``frames.csv``; the batch goes on. While it runs, ``frames.csv`` and ``particles.csv`` grow
row by row (so an interrupted batch leaves what it did); at the end populations are found over
all particles and ``particles.csv`` (with ``population``), ``frames.csv`` (in file order),
``summary.json``, ``histogram.png`` and ``overlays/FRAME.png`` are written.

Exit status: 0 when the batch ran, even with failed frames; 1 when no frame could be analysed.
"""

from __future__ import annotations

import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from ..frames import is_temporary_name
from . import outputs
from .io import FRAME_SUFFIXES, read_frame
from .pipeline import FrameResult, analyze_frame

__all__ = ["main", "find_frames", "run_batch", "MAX_OVERLAYS"]

#: Overlays are drawn for all frames up to this many, else for the first this many.
MAX_OVERLAYS = 20
_SKIP_DIRS = {"truth", "overlays", "__pycache__"}


def find_frames(paths):
    """The frame files named by ``paths``: files as given, folders searched recursively.

    Inside folders only :data:`~particlewatch.analysis.io.FRAME_SUFFIXES` are taken; hidden and
    temporary names (``.x.part``, ``x.tmp``) and ``truth/`` and ``overlays/`` folders are
    skipped. A file named explicitly is always taken, so an unsupported or missing one is
    reported as a failed frame rather than silently dropped.

    Parameters
    ----------
    paths : iterable of str or path-like

    Returns
    -------
    list of Path
        Sorted within each folder, in the order given, without duplicates.
    """
    found, seen = [], set()

    def add(p):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            found.append(Path(p))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for p in sorted(_walk(path), key=lambda q: str(q.relative_to(path))):
                add(p)
        else:
            add(path)
    return found


def _walk(folder):
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if Path(name).suffix.lower() in FRAME_SUFFIXES and not is_temporary_name(name):
                yield Path(root) / name


# -- workers --------------------------------------------------------------------------------

def _init_worker():
    # One BLAS/OpenMP thread per worker process: the pool already uses every core.
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, run as is
        pass


def _analyze_task(path, options, want_labels):
    """Analyse one frame in a worker; return its message and, if wanted, packed labels."""
    result = analyze_frame(path, keep_image=want_labels, **options)
    packed = None
    if want_labels and result.labels is not None:
        labels = result.labels
        dtype = np.uint16 if labels.max(initial=0) < 65536 else np.int32
        packed = (labels.shape, np.dtype(dtype).str,
                  zlib.compress(np.ascontiguousarray(labels, dtype=dtype).tobytes(), 1))
    return result.to_message(), packed


def _unpack_labels(packed):
    shape, dtype, data = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.dtype(dtype)).reshape(shape)


# -- the batch ------------------------------------------------------------------------------

def run_batch(files, out, *, options, workers=None, console=None, progress=True):
    """Analyse ``files`` and write every output into ``out``.

    Parameters
    ----------
    files : list of path-like
        Frame files (see :func:`find_frames`).
    out : path-like
        Output folder (created).
    options : dict
        ``pixel_nm``, ``min_size_nm``, ``separate``, ``polarity`` for
        :func:`~particlewatch.analysis.pipeline.analyze_frame`, and ``precision`` for the
        summary.
    workers : int, optional
        Worker processes; default the number of cores (at most one per frame). 1 runs in this
        process.
    console : rich.console.Console, optional
        Where the progress bar and the failed-frame lines go (default stderr).
    progress : bool
        Show a progress bar.

    Returns
    -------
    results : list of FrameResult
        In the order of ``files``.
    summary : dict or None
        The summary (None when no frame could be analysed).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (outputs.FRAMES_CSV, outputs.PARTICLES_CSV):  # rows are appended below
        (out / name).unlink(missing_ok=True)
    precision = options.get("precision", 0.01)
    analysis_options = {k: options.get(k) for k in ("pixel_nm", "min_size_nm")}
    analysis_options["separate"] = options.get("separate", "uecs")
    analysis_options["polarity"] = options.get("polarity", "auto")
    files = [Path(f) for f in files]
    overlay_index = set(range(min(len(files), MAX_OVERLAYS)))
    results, labels_of = [None] * len(files), {}

    def done(index, message, packed):
        result = FrameResult.from_message(message)
        results[index] = result
        if packed is not None:
            labels_of[index] = packed
        outputs.append_frame_rows(out, [result])
        if result.status == "failed":
            console.print(f"particlewatch analyze: {result.reason}", markup=False,
                          highlight=False, soft_wrap=True)

    workers = min(workers or os.cpu_count() or 1, max(len(files), 1))
    bar = _progress(console, len(files), enabled=progress)
    if workers <= 1:
        with bar:
            for i, f in enumerate(files):
                done(i, *_analyze_task(f, analysis_options, i in overlay_index))
                bar.advance()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            # submit everything before the progress thread starts: workers fork first
            futures = {pool.submit(_analyze_task, f, analysis_options, i in overlay_index): i
                       for i, f in enumerate(files)}
            try:
                with bar:
                    for fut in as_completed(futures):
                        done(futures[fut], *fut.result())
                        bar.advance()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    outputs.write_frames(out, results)
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return results, None
    table, labels, summary = _populations(results, precision=precision)
    outputs.write_particles(out, table, labels)
    outputs.write_summary(out, summary)
    outputs.write_histogram(out / "histogram.png", table, labels, summary)
    _write_overlays(out, files, results, labels_of, table, labels, analysis_options)
    return results, summary


class _Bar:
    """A rich progress bar over frames, or nothing."""

    def __init__(self, console, total, enabled):
        self._progress = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("analysing"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=console, transient=False)
            self._task = self._progress.add_task("frames", total=total)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def advance(self):
        if self._progress is not None:
            self._progress.advance(self._task)


def _progress(console, total, *, enabled):
    return _Bar(console, total, enabled and console.is_terminal)


def _populations(results, *, precision):
    """All particles in one table (with ``frame``), their populations and the summary."""
    from .populations import find_populations
    from .statistics import summarize

    ok = [r for r in results if r.status == "ok"]
    columns = list(ok[0].particles)
    table = {c: np.concatenate([np.asarray(r.particles[c]) for r in ok]) for c in columns}
    table["frame"] = np.repeat(np.array([r.frame for r in ok], dtype=object),
                               [r.n_particles for r in ok])
    n = len(table["frame"])
    labels = find_populations(table) if n else np.zeros(0, np.int64)
    summary = summarize(table, labels, frames_ok=len(ok),
                        frames_failed=len(results) - len(ok), precision=precision,
                        frames=table["frame"])
    return table, np.asarray(labels, dtype=np.int64), summary


def _write_overlays(out, files, results, labels_of, table, labels, options):
    """Overlays coloured by population, for the frames whose labels came back."""
    frame_col = table["frame"]
    ids = np.asarray(table["particle_id"], dtype=np.int64)
    for index, packed in sorted(labels_of.items()):
        result = results[index]
        if result.status != "ok":
            continue
        try:  # the image is read again here rather than shipped back from the worker
            image = read_frame(files[index], pixel_nm=options.get("pixel_nm")).image
        except ValueError:
            continue
        lab = _unpack_labels(packed)
        mine = frame_col == result.frame
        pops = dict(zip(ids[mine].tolist(), labels[mine].tolist()))
        outputs.write_overlay(out / "overlays" / f"{result.frame}.png", image, lab,
                              populations=pops, agglomerate_boxes=result.agglomerate_boxes)


def _nm(value):
    return "?" if value is None else f"{value:.2f}"


def _print_summary(results, summary, out, n_overlays):
    n_failed = sum(r.status == "failed" for r in results)
    lines = [f"analysed {len(results) - n_failed} of {len(results)} frames "
             f"({n_failed} failed): {summary['particles']} particles"]
    for p in summary.get("populations", []):
        ci = p.get("ci95_nm") or [None, None]
        half = (ci[1] - ci[0]) / 2 if None not in ci else None
        lines.append(f"  population {p['id']}: n={p['n']}, ECD {_nm(p.get('mean_ecd_nm'))} "
                     f"± {_nm(half)} nm (95% CI), sd {_nm(p.get('sd_ecd_nm'))} nm, "
                     f"z-average {_nm(p.get('z_average_nm'))} nm")
    if summary.get("outliers"):
        lines.append(f"  outliers: {summary['outliers']}")
    if len(results) > n_overlays:
        lines.append(f"overlays for the first {n_overlays} of {len(results)} frames")
    lines.append(f"outputs in {out}")
    print("\n".join(lines))


def main(args):
    """Run ``particlewatch analyze`` (arguments parsed by :mod:`particlewatch.cli`).

    Returns
    -------
    int
        0 when the batch ran, 1 when no frame could be analysed (one line on stderr).
    """
    files = find_frames(args.paths)
    if not files:
        print(f"particlewatch analyze: error: no frames ({', '.join(FRAME_SUFFIXES)}) found in "
              f"{', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    options = {"pixel_nm": args.pixel_nm, "min_size_nm": args.min_size_nm,
               "separate": args.separate, "polarity": getattr(args, "polarity", "auto"),
               "precision": getattr(args, "precision", 0.01)}
    results, summary = run_batch(files, args.out, options=options)
    if summary is None:
        print(f"particlewatch analyze: error: none of the {len(files)} frames could be "
              f"analysed (reasons in {Path(args.out) / outputs.FRAMES_CSV})", file=sys.stderr)
        return 1
    _print_summary(results, summary, args.out, min(len(files), MAX_OVERLAYS))
    return 0
