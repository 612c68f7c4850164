"""Update time of RunningStatistics versus the number of particles (to 100,000 and beyond).

Adds frames of a bimodal PS50 + PS100-like sample with agglomerates and debris, and times
each update (``add`` + ``summary``, what the daemon does per frame). Updates that refit the
population model are reported separately from those that only classify new particles.

Usage::

    python bench/statistics_speed.py [--particles 100000] [--per-frame 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from particlewatch.analysis.statistics import RunningStatistics


def frame_table(rng, n):
    """One frame's measured particles: two sphere populations plus 5% outliers; a third of
    the particles were split from touching groups (``separated``)."""
    big = rng.random(n) < 0.5
    d = np.where(big, rng.normal(110, 9, n), rng.normal(55, 5, n))
    aspect = 1 + np.abs(rng.normal(0, 0.03, n))
    solidity = np.clip(rng.normal(0.985, 0.007, n), 0, 1)
    bad = rng.random(n) < 0.05
    d = np.where(bad, d * rng.uniform(0.3, 2.0, n), d)
    aspect = np.where(bad, rng.uniform(1.3, 2.8, n), aspect)
    solidity = np.where(bad, rng.uniform(0.7, 0.88, n), solidity)
    return {"ecd_nm": d, "feret_max_nm": d * np.sqrt(aspect), "feret_min_nm": d / np.sqrt(aspect),
            "aspect_ratio": aspect, "circularity": np.clip(rng.normal(0.96, 0.015, n), 0, 1),
            "solidity": solidity, "area_nm2": np.pi * d ** 2 / 4,
            "separated": rng.random(n) < 0.35}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--per-frame", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rs = RunningStatistics(precision=0.001, seed=args.seed)  # never converges: full run
    rows = []
    frame = 0
    while rs.n_particles < args.particles:
        table = frame_table(rng, args.per_frame)
        fitted_before = rs._fitted_n
        t0 = time.perf_counter()
        rs.add(f"frame_{frame:05d}", table)
        t1 = time.perf_counter()
        rs.summary()
        t2 = time.perf_counter()
        rows.append((rs.n_particles, t1 - t0, t2 - t1, rs._fitted_n != fitted_before))
        frame += 1
    rows = np.array(rows, dtype=float)
    print(f"RunningStatistics update time, {args.per_frame} particles per frame "
          f"(add = label new particles, refit when the count grew 50%; summary = all stats)")
    print(f"{'particles up to':>16} {'updates':>8} {'add ms (median)':>16} "
          f"{'summary ms':>11} {'total ms':>9} {'refits':>7} {'refit add ms':>13}")
    edges = [0, 1_000, 5_000, 10_000, 25_000, 50_000, 75_000, args.particles + 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (rows[:, 0] > lo) & (rows[:, 0] <= hi)
        if not sel.any():
            continue
        r = rows[sel]
        refit = r[:, 3] > 0
        plain = r[~refit] if (~refit).any() else r
        refit_ms = f"{1000 * r[refit, 1].max():13.0f}" if refit.any() else f"{'-':>13}"
        print(f"{int(min(hi - 1, rows[:, 0].max())):>16,d} {len(r):>8d} "
              f"{1000 * np.median(plain[:, 1]):>16.1f} {1000 * np.median(r[:, 2]):>11.1f} "
              f"{1000 * np.median(plain[:, 1] + plain[:, 2]):>9.1f} {int(refit.sum()):>7d} "
              f"{refit_ms}")
    last = rows[-10:]
    print(f"at {int(rows[-1, 0]):,} particles: update (add + summary) "
          f"{1000 * np.median(last[:, 1] + last[:, 2]):.0f} ms median of the last 10, "
          f"slowest update overall {1000 * (rows[:, 1] + rows[:, 2]).max():.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
