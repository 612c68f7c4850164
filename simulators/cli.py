"""``particlewatch simulate``: simulated frames (MRC + ``.mdoc``) and their ground truth.

Frames go to ``OUT/frame_00001.mrc`` (+ ``.mrc.mdoc``), truth to ``OUT/truth/frame_00001.json``.
Positions are drawn over the grid from the seed, keeping only fields that hold particles and
do not overlap an earlier frame; each frame is taken at the true focus of its position. The
output is a function of the arguments: the same seed gives bit-identical files (the
``.mdoc`` ``DateTime`` counts the simulated clock from a fixed start).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np

from ..frames import serialem_datetime, write_frame
from .samples import get_sample
from .scope import SimScope

#: Simulated sessions start at this (arbitrary, fixed) time so output is reproducible.
CLOCK_START = _dt.datetime(2025, 1, 6, 9, 0, 0)


def frame_positions(scope: SimScope, n: int, *, seed: int) -> list[tuple[float, float]]:
    """``n`` stage positions (µm) whose record fields hold particles and do not overlap.

    The grid is cut into record-sized tiles (offset by a random fraction of a tile) and the
    tiles are visited in a random order. A tile qualifies when it holds at least a fifth of
    the particles a field at the sample's mean density would (and at least one), so the
    frames are worth analysing; they may be sparse, dense or agglomerated.

    Parameters
    ----------
    scope : SimScope
    n : int
        Number of positions.
    seed : int

    Returns
    -------
    list of (x_um, y_um)

    Raises
    ------
    RuntimeError
        When the grid holds fewer than ``n`` such fields.
    """
    rng = np.random.default_rng([seed, 17])
    fov = scope.field_of_view_um("record")
    x0, y0, x1, y1 = scope.stage_limits_um
    ox, oy = rng.uniform(0.0, fov, 2)
    xs = np.arange(x0 + fov / 2 + ox, x1 - fov / 2, fov)
    ys = np.arange(y0 + fov / 2 + oy, y1 - fov / 2, fov)
    if not (xs.size and ys.size):
        raise RuntimeError(f"a {fov:g} µm field does not fit on the grid")
    need_particles = not scope.sample.empty
    minimum = max(1, int(0.2 * scope.specimen.expected_count(fov * fov)))
    half = fov * 500.0  # nm
    chosen: list[tuple[float, float]] = []
    for k in rng.permutation(xs.size * ys.size):
        x, y = round(float(xs[k % xs.size]), 3), round(float(ys[k // xs.size]), 3)
        if need_particles:
            if scope.specimen.density(x, y) == 0:
                continue  # an empty region: skip without drawing its cells
            table = scope.specimen.particles_in(x * 1000 - half, y * 1000 - half,
                                                x * 1000 + half, y * 1000 + half)
            if len(table["x_nm"]) < minimum:
                continue
        chosen.append((x, y))
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"the grid holds only {len(chosen)} of the {n} non-overlapping "
                       f"fields with particles asked for")


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def simulate(out: str | os.PathLike, *, sample: str, frames: int, seed: int = 0,
             size_px: int = 2048, pixel_nm: float | None = None,
             detector: str | None = None, dose: float | None = None,
             progress=None) -> list[Path]:
    """Write ``frames`` simulated frames and their truth files into ``out``.

    Parameters
    ----------
    out : path-like
        Output folder (created).
    sample : str
        A sample name (see :data:`~.samples.SAMPLES`).
    frames : int
    seed, size_px, pixel_nm, detector, dose
        As for :class:`~.scope.SimScope` (``pixel_nm`` is the record pixel).
    progress : callable, optional
        Called as ``progress(i)`` after frame ``i`` (1-based) is written.

    Returns
    -------
    list of Path
        The ``.mrc`` paths written.
    """
    get_sample(sample)  # fail on an unknown name before creating anything
    scope = SimScope(sample, seed=seed, detector=detector, dose=dose, size_px=size_px,
                     record_pixel_nm=pixel_nm)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (x, y) in enumerate(frame_positions(scope, frames, seed=seed), start=1):
        scope.move_stage(x, y)
        scope.set_defocus(round(scope.true_focus_um(), 4))
        image = scope.snap()
        name = f"frame_{i:05d}"
        section = image.mdoc_section()
        section["DateTime"] = serialem_datetime(
            CLOCK_START + _dt.timedelta(seconds=round(scope.clock_s)))
        # truth first: once the .mrc appears, everything about the frame is on disk
        _write_json_atomic(out / "truth" / f"{name}.json", image.truth)
        written.append(write_frame(out / f"{name}.mrc", image.image, pixel_nm=image.pixel_nm,
                                   section=section))
        if progress is not None:
            progress(i)
    return written


def main(args) -> int:
    """Entry point of ``particlewatch simulate`` (arguments parsed in ``particlewatch.cli``)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    spec = get_sample(args.sample)
    with Progress(TextColumn(f"simulating {spec.name}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("frames", total=args.frames)
        paths = simulate(args.out, sample=args.sample, frames=args.frames, seed=args.seed,
                         size_px=args.size, pixel_nm=args.pixel_nm,
                         detector=args.detector, dose=args.dose,
                         progress=lambda i: bar.update(task, completed=i))
    print(f"wrote {len(paths)} frames to {args.out} (truth in {Path(args.out) / 'truth'})")
    return 0
