"""Seconds per simulated frame at 2048² and 4096², per sample and mode.

Usage: ``python bench/simulate_speed.py [--samples au10,ps-bimodal] [--repeats 3]``

Each figure is the best of ``--repeats`` snaps at a field holding particles (the first snap
at a position also draws the specimen's cells there; that cost is reported separately as
``first``); ``truth`` is the extra cost of one frame's ground truth, built on first access. Prints one line per sample, size and mode.
"""

from __future__ import annotations

import argparse
import time

from particlewatch.simulators.cli import frame_positions
from particlewatch.simulators.scope import SimScope


def time_snaps(sample: str, size: int, mode: str, *,
               repeats: int) -> tuple[float, float, float, int]:
    """``(first, best, truth, particles)``: seconds of the first and the best of ``repeats``
    snaps, and of building one frame's ground truth (computed on first access)."""
    scope = SimScope(sample, seed=0, size_px=size)
    x, y = frame_positions(scope, 1, seed=0)[0]
    scope.move_stage(x, y)
    scope.set_defocus(scope.true_focus_um())
    scope.set_mode(mode)
    t0 = time.perf_counter()
    frame = scope.snap()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(frame.truth["particles"])
    truth = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scope.snap()
        best = min(best, time.perf_counter() - t0)
    return first, best, truth, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="au10,ps-bimodal,au-rods,cubes,silica-capsules")
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--modes", default="record,survey")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'sample':<16}{'size':>6}  {'mode':<7}{'particles':>10}{'first s':>9}"
          f"{'s/frame':>9}{'truth s':>9}")
    for sample in args.samples.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for mode in args.modes.split(","):
                first, best, truth, n = time_snaps(sample, size, mode, repeats=args.repeats)
                print(f"{sample:<16}{size:>6}  {mode:<7}{n:>10}{first:>9.3f}{best:>9.3f}"
                      f"{truth:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
