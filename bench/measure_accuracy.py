"""ECD bias of measure() against the simulator's ground truth, per sample × detector × dose.

The frames are segmented and separated once (as the pipeline does) and cached under
``bench/_work/measure/`` with their labels and masks, so a change to ``measure`` alone is
compared on exactly the same outlines: only ``measure`` runs again. For every whole, isolated
truth particle (nothing overlapping, not cropped, no other truth particle within one of its
diameters of its outline) matched to a measured particle that was not split from a group:
median ECD bias and median |ECD error| (measured / true − 1), in %. Two frame sets:

* ``crowded``: in-focus frames at the sample's usual density (``--size``, ``--frames``);
* ``lone``: frames holding one or two particles in all (as the lone-particle test draws),
  where frame-level estimates (blur, noise, background) come from one or two particles.

``--bf-haadf`` prints, per sample, the median ECD of isolated particles in bright-field and
HAADF frames of the same specimen positions, divided by the truth of each (so the two
detectors are compared on the same particles' sizes).

``--timing`` times ``measure`` alone (CPU s, best of ``--repeat``) on 2048² frames of au10
(HAADF), ps-bimodal (BF) and cubes (BF).

Run ``python bench/measure_accuracy.py [--samples au10,cubes] [--frames 2] [--size 1024]``.
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

SAMPLES = ("au10", "ps100", "ps50", "ps-bimodal", "silica-capsules", "au-rods", "cubes",
           "spheres-rods")
_STAGES = ((5.0, -5.0), (-12.0, 7.0), (20.0, 14.0), (-3.0, -25.0), (31.0, -9.0),
           (-27.0, 22.0))
CACHE = Path(__file__).resolve().parent / "_work" / "measure"


def _scope(sample, seed, size, detector, dose_factor):
    probe = SimScope(sample, seed=seed, size_px=size, detector=detector)
    return SimScope(sample, seed=seed, size_px=size, detector=detector,
                    dose=probe.dose * dose_factor)


def _crowded_frames(sample, *, detector, dose_factor, size, frames):
    out = []
    for i in range(frames):
        scope = _scope(sample, 1 + i, size, detector, dose_factor)
        scope.move_stage(*_STAGES[i % len(_STAGES)])
        scope.set_defocus(scope.true_focus_um())
        out.append(scope.snap())
    return out


def _lone_frames(sample, *, detector, dose_factor, size=512, want=6, seed=4):
    scope = _scope(sample, seed, size, detector, dose_factor)
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = scope.stage_limits_um
    half_nm = size * scope.pixel_nm() / 2
    out = []
    for _ in range(20000):
        x, y = rng.uniform(x0 + 2, x1 - 2), rng.uniform(y0 + 2, y1 - 2)
        table = scope.specimen.particles_in(x * 1000 - half_nm, y * 1000 - half_nm,
                                            x * 1000 + half_nm, y * 1000 + half_nm)
        if not 1 <= len(table["x_nm"]) <= 2:
            continue
        scope.move_stage(x, y)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        if all(not p["touches_edge"] and not p["overlaps"] for p in frame.truth["particles"]):
            out.append(frame)
            if len(out) == want:
                break
    return out


def _truth_rows(frame):
    return [(p["x_px"], p["y_px"], p["ecd_nm"], p["feret_max_nm"],
             bool(p["touches_edge"] or p["overlaps"])) for p in frame.truth["particles"]]


def cached(sample, kind, *, detector, dose_factor, size, frames):
    """Frames with their pipeline labels: list of dicts (image, pixel_nm, labels, masks,
    separated, truth rows), from the cache when there."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{sample}_{detector}_{dose_factor:g}_{kind}_{size}_{frames}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        return list(z["items"])
    raw = (_crowded_frames(sample, detector=detector, dose_factor=dose_factor, size=size,
                           frames=frames) if kind == "crowded"
           else _lone_frames(sample, detector=detector, dose_factor=dose_factor))
    items = []
    for frame in raw:
        sep = separate(segment(frame.image, frame.pixel_nm), frame.pixel_nm, image=frame.image)
        items.append({"image": np.asarray(frame.image), "pixel_nm": frame.pixel_nm,
                      "labels": sep.labels, "masks": dict(sep.masks),
                      "separated": np.asarray(sep.separated, bool),
                      "exact": np.asarray(list(sep.exact), np.int64),
                      "truth": _truth_rows(frame)})
    np.savez(path, items=np.array(items, dtype=object), allow_pickle=True)
    return items


def errors(items, *, keys=False):
    """measured / true − 1 of the ECD of isolated truth particles matched to unsplit ones
    (with ``keys``: also each one's (frame, rounded truth x, y), to pair detectors)."""
    out, where = [], []
    for n, it in enumerate(items):
        t = measure(it["labels"], it["image"], it["pixel_nm"], masks=it["masks"],
                    exact=it["exact"])
        truth = it["truth"]
        if not truth or not len(t["x_px"]):
            continue
        px = it["pixel_nm"]
        txy = np.array([[r[0], r[1]] for r in truth])
        reach = np.array([r[3] / px for r in truth])
        for j, (x, y, ecd, feret, bad) in enumerate(truth):
            if bad:
                continue
            gap = np.hypot(txy[:, 0] - x, txy[:, 1] - y) - (reach + reach[j]) / 2
            gap[j] = np.inf
            if (gap < feret / px).any():  # a neighbour within one diameter: not isolated
                continue
            d = np.hypot(t["x_px"] - x, t["y_px"] - y)
            k = int(np.argmin(d))
            lab = int(t["particle_id"][k])
            sep = it["separated"]
            if d[k] > 0.2 * ecd / px or (lab < sep.size and sep[lab]):
                continue
            out.append(t["ecd_nm"][k] / ecd - 1)
            where.append((n, round(x, 1), round(y, 1)))
    return (np.array(out), where) if keys else np.array(out)


def bf_vs_haadf(args):
    """Median over particles seen isolated in both detectors' frames of the same specimen
    positions of (1 + BF error) / (1 + HAADF error) − 1."""
    print(f"{'sample':16} {'dose':>4} {'n':>4} {'BF/HAADF−1 %':>13} {'BF bias%':>9} "
          f"{'HAADF bias%':>11}")
    for sample in args.samples.split(","):
        for dose in (1.0, 0.25):
            got = {}
            for detector in ("bf", "haadf"):
                e, where = errors(cached(sample, "crowded", detector=detector,
                                         dose_factor=dose, size=args.size,
                                         frames=args.frames), keys=True)
                got[detector] = dict(zip(where, e))
            common = sorted(set(got["bf"]) & set(got["haadf"]))
            if not common:
                continue
            bf = np.array([got["bf"][k] for k in common])
            ha = np.array([got["haadf"][k] for k in common])
            print(f"{sample:16} {dose:4g} {len(common):4d} "
                  f"{100 * np.median((1 + bf) / (1 + ha) - 1):13.2f} "
                  f"{100 * np.median(bf):9.2f} {100 * np.median(ha):11.2f}", flush=True)


def accuracy(args):
    print(f"{'sample':16} {'det':5} {'dose':>4} {'set':8} {'n':>4} {'bias%':>7} {'|err|%':>7}")
    for sample in args.samples.split(","):
        for detector in ("bf", "haadf"):
            for dose in (1.0, 0.25):
                for kind in ("crowded", "lone"):
                    items = cached(sample, kind, detector=detector, dose_factor=dose,
                                   size=args.size, frames=args.frames)
                    e = errors(items)
                    if not e.size:
                        print(f"{sample:16} {detector:5} {dose:4g} {kind:8}    0")
                        continue
                    print(f"{sample:16} {detector:5} {dose:4g} {kind:8} {e.size:4d} "
                          f"{100 * np.median(e):7.2f} {100 * np.median(np.abs(e)):7.2f}",
                          flush=True)


def timing(args):
    for sample, detector in (("au10", "haadf"), ("ps-bimodal", "bf"), ("cubes", "bf")):
        it = cached(sample, "crowded", detector=detector, dose_factor=1.0, size=2048,
                    frames=1)[0]
        best = np.inf
        for _ in range(args.repeat):
            t0 = time.process_time()
            measure(it["labels"], it["image"], it["pixel_nm"], masks=it["masks"],
                    exact=it["exact"])
            best = min(best, time.process_time() - t0)
        print(f"measure {sample} {detector} 2048²: {1000 * best:.0f} ms CPU "
              f"({int(it['labels'].max())} labels)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=",".join(SAMPLES))
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--bf-haadf", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.timing:
        timing(args)
    elif args.bf_haadf:
        bf_vs_haadf(args)
    else:
        accuracy(args)


if __name__ == "__main__":
    main()
