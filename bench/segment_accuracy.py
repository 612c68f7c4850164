"""Accuracy of segment() against the simulator's ground truth, per sample.

For isolated, whole truth particles (``overlaps`` empty, not ``touches_edge``): recall (a
detected centroid within 0.35 ECD of the truth centre), median |ECD error|, median ECD bias;
rods also length (Feret max) and width (Feret min) errors. Precision: detected particles whose
centroid lies within any truth particle (isolated or not). Frames are in focus at the sample's
default pixel size; ``--dose`` scales the sample's default dose (0.25 = low dose).

Run ``python bench/segment_accuracy.py [--samples au10,ps50] [--dose 0.25] [--detector bf]
[--seed 1]``.

``--crowded`` scores the crowded ps-bimodal fields a session starts in (seed 0, the stage
positions of its first frames, defocus ±0.02 µm from true focus, within the depth of field):
recall of PS50 that overlap nothing and have no truth neighbour within 2 diameters (and
within half a diameter), and the precision of all detections.

``--pipeline`` runs the whole per-frame analysis (segment → separate → measure, as
:func:`~particlewatch.analysis.pipeline.analyze_image`) and prints, per sample, the
percentiles (5, 25, 50, 75, 95) and the mean of measured/true ECD of isolated particles
matched one-to-one with truth (the population statistics use the mean of particles that stood
alone, so a low tail matters as much as the median); ``--worst N --crops DIR`` also saves
PNG crops (frame with the measured outline in red, the true ECD circle in green) of the N
lowest ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.separate import separate
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


def _pipeline_table(image, pixel_nm):
    """Segment and separate as :func:`~particlewatch.analysis.pipeline.analyze_image` does;
    centroid and ECD (2·sqrt(area/π), the ``ecd_nm`` of ``measure``) of every label, and
    whether it was split from a touching group."""
    labels = separate(segment(image, pixel_nm), pixel_nm, image=image)
    sep_flags = np.asarray(labels.separated, dtype=bool)
    labels = labels.labels
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n).astype(float)
    yy, xx = np.indices(labels.shape)
    ids = np.flatnonzero(area > 0)
    ids = ids[ids > 0]
    safe = np.maximum(area, 1)
    table = {"particle_id": ids,
             "y_px": (np.bincount(labels.ravel(), yy.ravel(), n) / safe)[ids],
             "x_px": (np.bincount(labels.ravel(), xx.ravel(), n) / safe)[ids],
             "ecd_nm": 2 * np.sqrt(area[ids] / np.pi) * pixel_nm,
             "separated": np.array([bool(sep_flags[i]) if i < sep_flags.size else False
                                    for i in ids], bool)}
    return table, labels


def isolated_ratios(sample, *, frames, size, dose_factor, detector, seed=1, keep=0):
    """measured/true ECD of isolated truth particles matched one-to-one (mutual nearest
    centres within 0.35 ECD) with particles the pipeline measured and did not split.

    Returns the ratios, the number of isolated truth particles and, when ``keep`` > 0, the
    ``keep`` lowest ratios' crops ``(ratio, image crop, label crop, truth centre and radius
    in crop pixels)``.
    """
    ratios, n_truth, crops = [], 0, []
    for i in range(frames):
        frame = snap(sample, seed=seed + i, size=size, stage=_STAGES[i % len(_STAGES)],
                     dose_factor=dose_factor, detector=detector)
        table, labels = _pipeline_table(frame.image, frame.pixel_nm)
        px = frame.truth["pixel_nm"]
        truth = [p for p in frame.truth["particles"]]
        if not truth or not len(table["x_px"]):
            continue
        txy = np.array([[p["x_px"], p["y_px"]] for p in truth])
        mxy = np.column_stack([table["x_px"], table["y_px"]])
        d = np.hypot(mxy[:, None, 0] - txy[None, :, 0], mxy[:, None, 1] - txy[None, :, 1])
        nearest_truth = np.argmin(d, axis=1)
        for j, p in enumerate(truth):
            if p["touches_edge"] or p["overlaps"]:
                continue
            n_truth += 1
            k = int(np.argmin(d[:, j]))
            if d[k, j] > 0.35 * p["ecd_nm"] / px or nearest_truth[k] != j \
                    or table["separated"][k]:
                continue
            r = float(table["ecd_nm"][k] / p["ecd_nm"])
            ratios.append(r)
            if keep:
                rad = p["ecd_nm"] / px / 2
                h = int(2.0 * rad + 8)
                y0, x0 = int(p["y_px"]) - h, int(p["x_px"]) - h
                sl = (slice(max(y0, 0), y0 + 2 * h), slice(max(x0, 0), x0 + 2 * h))
                lab = labels[sl] == int(table["particle_id"][k])
                crops.append((r, frame.image[sl].astype(float), lab,
                              (p["y_px"] - max(y0, 0), p["x_px"] - max(x0, 0), rad),
                              f"{sample} seed {seed + i} ({p['x_px']:.0f},{p['y_px']:.0f})"))
                crops.sort(key=lambda c: c[0])
                del crops[keep:]
    return np.array(ratios), n_truth, crops


def save_crops(crops, out_dir, tag):
    """Write each crop as a PNG: the frame (contrast stretched), the measured outline red,
    the true ECD circle green."""
    from pathlib import Path

    from skimage import io, segmentation
    from skimage.draw import circle_perimeter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n, (r, img, lab, (cy, cx, rad), where) in enumerate(crops):
        lo, hi = np.percentile(img, [0.5, 99.5])
        g = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1)
        rgb = np.repeat(g[..., None], 3, axis=2)
        rgb[segmentation.find_boundaries(lab, mode="inner")] = (1, 0, 0)
        rr, cc = circle_perimeter(int(round(cy)), int(round(cx)), int(round(rad)),
                                  shape=img.shape)
        rgb[rr, cc] = (0, 1, 0)
        scale = max(1, 200 // max(img.shape))
        rgb = np.kron(rgb, np.ones((scale, scale, 1)))
        io.imsave(out / f"{tag}_{n:02d}_{r:.3f}.png", (255 * rgb).astype(np.uint8),
                  check_contrast=False)
        print(f"  {tag}_{n:02d}: ratio {r:.3f} {where}")


def main_pipeline(args):
    """Percentiles and mean of measured/true ECD of isolated particles (whole pipeline)."""
    print(f"{args.frames} x {args.size}² frames, dose x{args.dose}, detector "
          f"{args.detector or 'default'}; isolated particles, measured/true ECD")
    print(f"{'sample':16} {'n':>5} {'found':>6} {'p5':>6} {'p25':>6} {'p50':>6} {'p75':>6} "
          f"{'p95':>6} {'mean':>6}")
    for sample in args.samples.split(","):
        r, n, crops = isolated_ratios(sample, frames=args.frames, size=args.size,
                                      dose_factor=args.dose, detector=args.detector,
                                      keep=args.worst)
        q = np.percentile(r, [5, 25, 50, 75, 95]) if r.size else [np.nan] * 5
        print(f"{sample:16} {r.size:>5d} {r.size / max(n, 1):>6.3f} "
              + " ".join(f"{v:>6.3f}" for v in q) + f" {r.mean() if r.size else np.nan:>6.3f}",
              flush=True)
        if args.worst and args.crops:
            save_crops(crops, args.crops, f"{sample}_{args.detector or 'default'}")


CROWDED_STAGES = ((-25.344, -25.344), (-20.731, -25.344), (-2.304, -20.731),
                  (-6.917, -20.731), (-20.731, -20.731), (-25.344, -20.731))


def crowded_recall(*, size, gaps=(2.0, 0.5), population=0):
    """Recall of ``population`` (0: PS50) particles standing apart by each of ``gaps``
    (edge to edge, in their own diameters) and precision, on crowded ps-bimodal fields."""
    hits = {g: [0, 0] for g in gaps}
    true = detected = 0
    seconds = 0.0
    for i, stage in enumerate(CROWDED_STAGES):
        scope = SimScope("ps-bimodal", seed=0, size_px=size)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um() + (0.02 if i % 2 else -0.02))
        frame = scope.snap()
        t0 = time.perf_counter()
        labels = segment(frame.image, frame.pixel_nm)
        seconds += time.perf_counter() - t0
        px = frame.truth["pixel_nm"]
        truth = frame.truth["particles"]
        txy = np.array([[p["x_px"], p["y_px"]] for p in truth])
        r = np.array([p["ecd_nm"] / px / 2 for p in truth])
        rmax = np.array([p["feret_max_nm"] / px / 2 for p in truth])
        gap = np.hypot(txy[:, None, 0] - txy[None, :, 0],
                       txy[:, None, 1] - txy[None, :, 1]) - r[:, None] - r[None, :]
        np.fill_diagonal(gap, np.inf)
        base = np.array([not p["touches_edge"] and not p["overlaps"]
                         and p["population"] == population for p in truth])
        table = measure(labels, frame.image, frame.pixel_nm)
        xy = np.column_stack([table["x_px"], table["y_px"]])
        d = np.hypot(xy[:, None, 0] - txy[None, :, 0], xy[:, None, 1] - txy[None, :, 1])
        found = (d <= 0.7 * r[None, :]).any(0) if len(xy) else np.zeros(len(truth), bool)
        for g in gaps:
            wanted = base & (gap.min(1) >= g * 2 * r)
            hits[g][0] += int((found & wanted).sum())
            hits[g][1] += int(wanted.sum())
        true += int((d <= rmax[None, :] + 1.0).any(1).sum()) if len(xy) else 0
        detected += len(xy)
    return hits, true / max(detected, 1), seconds / len(CROWDED_STAGES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=",".join(SAMPLES))
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dose", type=float, default=1.0, help="factor on the default dose")
    parser.add_argument("--detector", default=None, choices=(None, "bf", "haadf"))
    parser.add_argument("--seed", type=int, default=1,
                        help="first frame's seed (others: seed+1, ...); change it to check "
                        "on frames no constant was chosen on")
    parser.add_argument("--crowded", action="store_true",
                        help="PS50 recall on crowded ps-bimodal fields (session positions)")
    parser.add_argument("--pipeline", action="store_true",
                        help="percentiles of measured/true ECD through the whole pipeline")
    parser.add_argument("--worst", type=int, default=0, help="save crops of the N lowest")
    parser.add_argument("--crops", default=None, help="folder for --worst crops")
    args = parser.parse_args(argv)
    if args.pipeline:
        main_pipeline(args)
        return
    if args.crowded:
        hits, precision, sec = crowded_recall(size=args.size)
        print(f"{len(CROWDED_STAGES)} crowded ps-bimodal fields of {args.size}², defocus "
              f"±0.02 µm; PS50 standing apart")
        for g, (h, n) in hits.items():
            print(f"  gap >= {g:g} diameters: recall {h}/{n} = {h / max(n, 1):.3f}")
        print(f"  precision (all detections) {precision:.4f}, {sec:.2f} s/frame")
        return
    print(f"{args.frames} x {args.size}² frames from seed {args.seed}, dose x{args.dose}, "
          f"detector {args.detector or 'default'}; isolated particles vs truth")
    print(f"{'sample':16} {'n':>4} {'recall':>6} {'prec':>6} {'|err|':>6} {'bias':>6} "
          f"{'len':>6} {'width':>6} {'s/frame':>7}")
    for sample in args.samples.split(","):
        r = evaluate(sample, frames=args.frames, size=args.size, dose_factor=args.dose,
                     detector=args.detector, seed=args.seed)
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
