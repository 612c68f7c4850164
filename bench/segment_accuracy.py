"""Accuracy of segment() against the simulator's ground truth, per sample.

For isolated, whole truth particles (``overlaps`` empty, not ``touches_edge``): recall (a
detected centroid within 0.35 ECD of the truth centre), median |ECD error|, median ECD bias;
rods also length (Feret max) and width (Feret min) errors. Precision: detected particles whose
centroid lies within any truth particle (isolated or not). Frames are in focus at the sample's
default pixel size; ``--dose`` scales the sample's default dose (0.25 = low dose).

Run ``python bench/segment_accuracy.py [--samples au10,ps50] [--dose 0.25] [--detector bf]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.segment import segment
from particlewatch.simulators.scope import SimScope

SAMPLES = ("au10", "ps100", "ps50", "ps-bimodal", "silica-capsules", "au-rods", "cubes",
           "spheres-rods")
_STAGES = ((5.0, -5.0), (-12.0, 7.0), (20.0, 14.0), (-3.0, -25.0), (31.0, -9.0),
           (-27.0, 22.0))


def snap(sample, *, seed, size, stage, dose_factor=1.0, detector=None):
    """One in-focus simulated frame."""
    probe = SimScope(sample, seed=seed, size_px=size, detector=detector)
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector,
                     dose=probe.dose * dose_factor)
    scope.move_stage(*stage)
    scope.set_defocus(scope.true_focus_um())
    return scope.snap()


def score(frame, table):
    """Match a measured table to the frame's truth; return a dict of arrays and counts."""
    px = frame.truth["pixel_nm"]
    truth = frame.truth["particles"]
    xy = np.column_stack([table["x_px"], table["y_px"]]) if len(table["x_px"]) else \
        np.zeros((0, 2))
    ecd, length, width, missed = [], [], [], 0
    for p in truth:
        if p["touches_edge"] or p["overlaps"]:
            continue
        d = np.hypot(xy[:, 0] - p["x_px"], xy[:, 1] - p["y_px"])
        if d.size == 0 or d.min() > 0.35 * p["ecd_nm"] / px:
            missed += 1
            continue
        k = int(np.argmin(d))
        ecd.append(table["ecd_nm"][k] / p["ecd_nm"] - 1.0)
        length.append(table["feret_max_nm"][k] / p["feret_max_nm"] - 1.0)
        width.append(table["feret_min_nm"][k] / p["feret_min_nm"] - 1.0)
    # a detection is true when its centroid lies within some truth particle's circumcircle
    false = 0
    if truth and len(xy):
        txy = np.array([[p["x_px"], p["y_px"]] for p in truth])
        rad = np.array([p["feret_max_nm"] / 2 / px + 1.0 for p in truth])
        d = np.hypot(xy[:, None, 0] - txy[None, :, 0], xy[:, None, 1] - txy[None, :, 1])
        false = int((~(d <= rad[None, :]).any(axis=1)).sum())
    else:
        false = len(xy)
    return {"ecd": ecd, "length": length, "width": width, "missed": missed, "false": false,
            "detected": len(xy)}


def evaluate(sample, *, frames, size, dose_factor, detector, seed=1):
    """Pool :func:`score` over ``frames`` frames at different stage positions."""
    pooled = {"ecd": [], "length": [], "width": [], "missed": 0, "false": 0, "detected": 0}
    seconds = 0.0
    for i in range(frames):
        frame = snap(sample, seed=seed + i, size=size, stage=_STAGES[i % len(_STAGES)],
                     dose_factor=dose_factor, detector=detector)
        t0 = time.perf_counter()
        labels = segment(frame.image, frame.pixel_nm)
        seconds += time.perf_counter() - t0
        s = score(frame, measure(labels, frame.image, frame.pixel_nm))
        for k in pooled:
            pooled[k] = pooled[k] + s[k]
    pooled["seconds"] = seconds / frames
    return pooled


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=",".join(SAMPLES))
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dose", type=float, default=1.0, help="factor on the default dose")
    parser.add_argument("--detector", default=None, choices=(None, "bf", "haadf"))
    args = parser.parse_args(argv)
    print(f"{args.frames} x {args.size}² frames, dose x{args.dose}, detector "
          f"{args.detector or 'default'}; isolated particles vs truth")
    print(f"{'sample':16} {'n':>4} {'recall':>6} {'prec':>6} {'|err|':>6} {'bias':>6} "
          f"{'len':>6} {'width':>6} {'s/frame':>7}")
    for sample in args.samples.split(","):
        r = evaluate(sample, frames=args.frames, size=args.size, dose_factor=args.dose,
                     detector=args.detector)
        e = np.array(r["ecd"])
        n = e.size + r["missed"]
        recall = e.size / n if n else float("nan")
        prec = 1 - r["false"] / r["detected"] if r["detected"] else float("nan")
        med = lambda a: 100 * float(np.median(a)) if len(a) else float("nan")  # noqa: E731
        print(f"{sample:16} {n:>4d} {recall:>6.3f} {prec:>6.3f} {med(np.abs(e)):>5.1f}% "
              f"{med(e):>5.1f}% {med(np.abs(r['length'])):>5.1f}% "
              f"{med(np.abs(r['width'])):>5.1f}% {r['seconds']:>7.2f}")


if __name__ == "__main__":
    main()
