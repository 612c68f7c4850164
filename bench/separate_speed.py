"""Speed of separate() + measure() on the frame ``bench/analysis_speed.py`` times.

The frame (au10 by default, 2048², stage (3, -2) µm, in focus) is simulated and segmented once
and cached in ``bench/_work/separate/`` so that only separation and measurement are timed.
Prints CPU milliseconds (process time: the machine is shared, so wall time is noisy) for each
(best of ``--repeat``) and particles per minute on one core.
Run ``python bench/separate_speed.py [--sample au10] [--size 2048] [--method uecs]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.segment import segment
from particlewatch.analysis.separate import separate
from particlewatch.simulators.scope import SimScope

WORK = Path(__file__).resolve().parent / "_work" / "separate"


def cached_frame(sample, size, seed):
    """(image, pixel_nm, labels) of the analysis_speed frame, segmented once."""
    path = WORK / f"speed_{sample}_{size}_{seed}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        scope = SimScope(sample, seed=seed, size_px=size)
        scope.move_stage(3.0, -2.0)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        labels = segment(frame.image, frame.pixel_nm)
        np.savez_compressed(path, image=frame.image, labels=labels, pixel_nm=frame.pixel_nm)
    data = np.load(path)
    return data["image"], float(data["pixel_nm"]), data["labels"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="au10")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--method", default="uecs")
    args = parser.parse_args(argv)
    image, px, labels = cached_frame(args.sample, args.size, args.seed)
    best = None
    for _ in range(args.repeat):
        t0 = time.process_time()
        sep = separate(labels, px, method=args.method)
        t1 = time.process_time()
        kw = {"masks": sep.masks} if getattr(sep, "masks", None) is not None else {}
        table = measure(sep.labels, image, px, **kw)
        t2 = time.process_time()
        if best is None or t2 - t0 < best[0] + best[1]:
            best = (t1 - t0, t2 - t1)
    n = len(table["particle_id"])
    print(f"{args.sample} {args.size}², {int(labels.max())} regions -> {n} particles "
          f"({sep.agglomerates} agglomerates), method {args.method}, best of {args.repeat}")
    print(f"separate {best[0] * 1e3:.0f} ms, measure {best[1] * 1e3:.0f} ms, "
          f"together {n / sum(best) * 60:,.0f} particles/min on one core")


if __name__ == "__main__":
    main()
