"""Touching pairs split right, on frames from the independent image model of foreign_frames.py.

``bench/separate_accuracy.py`` scores the split of touching pairs on particlewatch's own
simulator. This bench asks the same of frames drawn by ``foreign_frames.render`` (a wave-optical
bright field with Fresnel fringes and film phase texture; a long-tailed HAADF probe with scan
noise), so a separation that only suits the simulator's rendering shows here.

Each frame holds touching pairs of round particles (spheres or hollow shells) whose centres are
``r1 + r2 - overlap`` apart, the overlap drawn from 0 to 15% of the smaller diameter; pairs stand
at least 6 px from each other. A pair counts as split when two distinct measured particles
have their centroids within 0.35 ECD of the two truth centres and each measured ECD is within
``--tol`` (5%) of its truth, as in ``separate_accuracy.py``. Also printed: pairs left as one
particle or an agglomerate, and the median ECD error of members split right.

Run ``python bench/foreign_pairs.py [--cases gold-bf,ps-bf] [--frames 2] [--size 1024]
[--dose 1.0] [--tol 0.05]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import foreign_frames as ff  # noqa: E402  (a sibling script, not a package)

from particlewatch.analysis.pipeline import analyze_image  # noqa: E402

ROUND_CASES = ("gold-bf", "gold-haadf", "ps-bf", "ps-haadf", "shell-bf")


def place_pairs(case, rng, size_px, *, gap_px=6.0, tries=20000):
    """Touching pairs ``[(a, b), ...]`` of :class:`foreign_frames.Particle`, whole in the frame."""
    pairs, target, covered = [], case.coverage * size_px ** 2, 0.0
    for _ in range(tries):
        if covered >= target:
            break
        a = ff._truth_particle(case, rng, 0.0, 0.0, case.pixel_nm)
        b = ff._truth_particle(case, rng, 0.0, 0.0, case.pixel_nm)
        ra, rb = a.reach_px, b.reach_px
        overlap = rng.uniform(0.0, 0.15) * 2 * min(ra, rb)
        d = ra + rb - overlap
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0, size_px, 2)
        a.x_px, a.y_px = cx - rb / (ra + rb) * d * np.cos(angle), cy - rb / (ra + rb) * d * \
            np.sin(angle)
        b.x_px, b.y_px = a.x_px + d * np.cos(angle), a.y_px + d * np.sin(angle)
        if min(a.x_px - ra, a.y_px - ra, b.x_px - rb, b.y_px - rb) < 3 or \
                max(a.x_px + ra, a.y_px + ra, b.x_px + rb, b.y_px + rb) > size_px - 4:
            continue
        if any(np.hypot(p.x_px - q.x_px, p.y_px - q.y_px) < p.reach_px + q.reach_px + gap_px
               for pair in pairs for q in pair for p in (a, b)):
            continue
        pairs.append((a, b))
        covered += np.pi * (ra * ra + rb * rb)
    return pairs


def score_pairs(case, pairs, table, *, tol):
    """Counts of pairs split right, left whole, and the errors of members split right."""
    xy = np.column_stack([table["x_px"], table["y_px"]]) if len(table["x_px"]) else \
        np.zeros((0, 2))
    right, errors = 0, []
    for a, b in pairs:
        found = []
        for p in (a, b):
            d = np.hypot(xy[:, 0] - p.x_px, xy[:, 1] - p.y_px) if len(xy) else np.array([])
            k = int(np.argmin(d)) if d.size else -1
            ok = k >= 0 and d[k] <= 0.35 * p.ecd_nm / case.pixel_nm
            found.append((k, table["ecd_nm"][k] / p.ecd_nm - 1 if ok else np.nan))
        (ka, ea), (kb, eb) = found
        if ka >= 0 and kb >= 0 and ka != kb and abs(ea) <= tol and abs(eb) <= tol:
            right += 1
            errors += [ea, eb]
    return right, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(ROUND_CASES))
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dose", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(f"{'case':12s} {'pairs':>6s} {'split':>6s} {'|err|%':>7s} {'s/frame':>8s}")
    for name in args.cases.split(","):
        case = dataclasses.replace(ff.CASES[name], coverage=0.15)
        n = right = 0
        errors, seconds = [], 0.0
        for i in range(args.frames):
            rng = np.random.default_rng([args.seed, i, 1000 + sorted(ff.CASES).index(name)])
            pairs = place_pairs(case, rng, args.size)
            frame = ff.render(case, [p for pair in pairs for p in pair], args.size, rng,
                              dose_factor=args.dose)
            t0 = time.perf_counter()
            table, _, _ = analyze_image(frame, case.pixel_nm)
            seconds += time.perf_counter() - t0
            r, e = score_pairs(case, pairs, table, tol=args.tol)
            n, right, errors = n + len(pairs), right + r, errors + e
        err = np.median(np.abs(errors)) * 100 if errors else np.nan
        print(f"{name:12s} {n:6d} {right / max(n, 1):6.2f} {err:7.2f} "
              f"{seconds / args.frames:8.2f}", flush=True)


if __name__ == "__main__":
    main()
