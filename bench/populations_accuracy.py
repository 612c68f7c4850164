"""Populations and running statistics on analysed simulated frames, against ground truth.

For every sample and detector, ``--frames`` simulated in-focus record frames (random stage
positions) are analysed with :func:`~particlewatch.analysis.pipeline.analyze_image` (what the
daemon runs on each frame) and fed frame by frame to
:class:`~particlewatch.analysis.statistics.RunningStatistics`, as a live session does. The
final summary is compared with the simulator's truth of the same frames (particles not
touching the frame edge, per true population):

* ``pops``: populations found (outliers not counted);
* per population: mean ECD (the summary's size basis) vs the true mean of the matched true
  population, and its fraction (fraction basis, crowding-corrected) and interval vs the true
  number fraction, with the uncorrected untouched fraction of the same session beside it;
* ``out``: outlier share of all particles, and separately of the particles that stood alone
  (``iso``) and of those split from touching groups (``split``);
* ``truth (alone)``: the true mean and fraction of the particles that touch no other (what
  sizes or fractions taken from isolated particles can at best give);
* ``moved``: particles (already added) whose population id changed from one frame's update
  to the next, summed over the session, with ``Δ±1``: changes to or from outlier;
* the issue's "done when" verdicts: ps-bimodal two populations, means within 2%, fractions
  within 3 points; au10, ps100, silica-capsules one population, mean within 1.5%;
  spheres-rods two populations that differ in shape.

Measured populations are matched one-to-one to true populations by (log ECD, log aspect
ratio) with the Hungarian method; an unmatched one is shown with ``?``.

Frames are cached under ``bench/_work/populations_accuracy/frames`` (per sample, detector,
size, seed) and analysed tables under ``.../tables/<hash>``, the hash taken over the
analysis sources that produce a table (segment, separate, measure, pipeline, ...), so a
change there re-analyses and a change in populations/statistics only re-evaluates.

Usage::

    python bench/populations_accuracy.py [--samples au10,ps-bimodal] [--detectors bf,haadf]
        [--frames 10] [--size 2048] [--methods auto,kmeans,dbscan,optics] [--seed 1]
        [--precision 0.01] [--density any] [--tables KEY]

``--density sparse,medium,dense`` takes the fields from those density classes of the
specimen (``DENSITIES``), one session per class and one over all classes interleaved;
``--samples au-bimodal`` is a third two-population mix (``EXTRA_SAMPLES``).

``--tables KEY`` evaluates tables analysed earlier (to compare populations/statistics
changes on the same tables while the analysis sources change).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

import particlewatch.analysis as analysis_pkg
from particlewatch.analysis.pipeline import analyze_image
from particlewatch.analysis.statistics import RunningStatistics, summarize
from particlewatch.simulators.samples import Population, SampleSpec
from particlewatch.simulators.scope import SimScope

SAMPLES = ("au10", "ps100", "ps50", "ps-bimodal", "silica-capsules", "spheres-rods",
           "au-rods", "cubes")
METHODS = ("auto", "kmeans", "dbscan", "optics")
WORK = Path(__file__).resolve().parent / "_work" / "populations_accuracy"
# sources whose change alters an analysed table (populations/statistics/outputs do not)
_TABLE_SOURCES = ("segment.py", "separate.py", "measure.py", "pipeline.py", "_checks.py",
                  "io.py")
ONE_POPULATION = ("au10", "ps100", "silica-capsules")
#: A third two-population mix made from the simulator's parts: gold spheres of 12 and 30 nm,
#: 60/40 by number (a size ratio of 2.5, so touching depends strongly on size).
EXTRA_SAMPLES = {"au-bimodal": SampleSpec(
    "au-bimodal", "gold spheres 12 and 30 nm, 60/40 by number",
    (Population("sphere", "au", 12.0, 1.2, fraction=0.6),
     Population("sphere", "au", 30.0, 2.5, fraction=0.4)),
    pixel_nm=0.8, detector="haadf", coverage=0.10, agglomeration=0.35)}
#: Relative density ranges (the specimen's density map, 1 = the sample's mean) of the
#: ``--density`` classes; "any" keeps the uniform random positions.
DENSITIES = {"sparse": (0.05, 0.6), "medium": (0.6, 1.3), "dense": (1.3, 3.0),
             "any": None}


def tables_key():
    """Hash of the analysis sources that produce a particle table."""
    root = Path(analysis_pkg.__file__).resolve().parent
    h = hashlib.sha1()
    for name in _TABLE_SOURCES:
        path = root / name
        if path.exists():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _name(sample, detector, size, seed, density):
    tail = "" if density == "any" else f"-{density}"
    return f"{sample}-{detector}-{size}-s{seed}{tail}"


def frame(sample, detector, index, *, size, seed, density="any"):
    """One cached in-focus record frame: (image, pixel_nm, truth arrays).

    ``density`` picks the field among positions whose relative density (the specimen's
    density map) lies in that class of :data:`DENSITIES`."""
    path = WORK / "frames" / _name(sample, detector, size, seed, density) / \
        f"frame_{index:03d}.npz"
    if not path.exists() or "alone" not in np.load(path).files:
        scope = SimScope(EXTRA_SAMPLES.get(sample, sample), seed=seed, size_px=size,
                         detector=detector)
        x0, y0, x1, y1 = scope.stage_limits_um
        rng = np.random.default_rng([seed, index])
        span = DENSITIES[density]
        for _ in range(10_000):
            # away from the limits; one field per index, so frames rarely overlap
            x = rng.uniform(x0 + 0.1 * (x1 - x0), x1 - 0.1 * (x1 - x0))
            y = rng.uniform(y0 + 0.1 * (y1 - y0), y1 - 0.1 * (y1 - y0))
            if span is None or span[0] <= scope.specimen.density(x, y) < span[1]:
                break
        scope.move_stage(x, y)
        scope.set_defocus(scope.true_focus_um())
        snap = scope.snap()
        parts = snap.truth["particles"]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, image=snap.image, pixel_nm=snap.pixel_nm,
            ecd_nm=np.array([p["ecd_nm"] for p in parts], float),
            feret_max_nm=np.array([p["feret_max_nm"] for p in parts], float),
            feret_min_nm=np.array([p["feret_min_nm"] for p in parts], float),
            population=np.array([p["population"] for p in parts], int),
            touches_edge=np.array([bool(p["touches_edge"]) for p in parts], bool),
            alone=np.array([not p["overlaps"] for p in parts], bool))
    z = np.load(path)
    truth = {k: z[k] for k in ("ecd_nm", "feret_max_nm", "feret_min_nm", "population",
                               "touches_edge", "alone")}
    return z["image"], float(z["pixel_nm"]), truth


def analysed(sample, detector, index, *, size, seed, key, density="any"):
    """Cached ``analyze_image`` particle table of one frame, and the frame's truth."""
    path = WORK / "tables" / key / \
        f"{_name(sample, detector, size, seed, density)}-{index:03d}.npz"
    image, pixel_nm, truth = frame(sample, detector, index, size=size, seed=seed,
                                   density=density)
    if not path.exists() or "touching" not in np.load(path).files:
        # with the touching column: fractions are counted on particles touching nothing
        particles, _, _ = analyze_image(image.astype(float), pixel_nm)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **particles)
    z = np.load(path)
    return {k: z[k] for k in z.files}, truth


def truth_populations(truths):
    """Per true population: mean ECD, mean log aspect, number fraction (not at the edge)."""
    pop = np.concatenate([t["population"][~t["touches_edge"]] for t in truths])
    ecd = np.concatenate([t["ecd_nm"][~t["touches_edge"]] for t in truths])
    aspect = np.concatenate([(t["feret_max_nm"] / t["feret_min_nm"])[~t["touches_edge"]]
                             for t in truths])
    alone = np.concatenate([t["alone"][~t["touches_edge"]] for t in truths])
    out = []
    for i in range(int(pop.max()) + 1 if pop.size else 0):
        sel = pop == i
        out.append({"mean": ecd[sel].mean(), "log_aspect": np.log(aspect[sel]).mean(),
                    "fraction": sel.mean(), "n": int(sel.sum()),
                    # what sizes from particles that stood alone can at best give
                    "mean_alone": ecd[sel & alone].mean() if (sel & alone).any() else np.nan,
                    "fraction_alone": (sel & alone).sum() / max(alone.sum(), 1)})
    return out


def match(pops, truth):
    """Index of the matched true population of every measured population (-1: none)."""
    out = np.full(len(pops), -1)
    if not pops or not truth:
        return out
    a = np.array([[np.log(p["mean_ecd_nm"]), np.log(p["mean_aspect_ratio"] or 1.0)]
                  for p in pops])
    b = np.array([[np.log(t["mean"]), t["log_aspect"]] for t in truth])
    cost = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    rows, cols = linear_sum_assignment(cost)
    out[rows] = cols
    return out


def run_session(tables, method, *, precision, seed):
    """Feed frames one by one; count label changes of already added particles."""
    rs = RunningStatistics(precision=precision, seed=seed, method=method)
    moved = flipped = 0
    previous = None
    t_update = []
    for i, table in enumerate(tables):
        t0 = time.perf_counter()
        rs.add(f"frame_{i:05d}", table)
        t_update.append(time.perf_counter() - t0)
        labels = rs.labels
        if previous is not None:
            now = labels[:len(previous)]
            both = (now >= 0) & (previous >= 0)
            moved += int(np.sum(both & (now != previous)))
            flipped += int(np.sum(~both & (now != previous)))
        previous = labels.copy()
    return rs, moved, flipped, max(t_update)


def verdict(sample, pops, matched, truth):
    """The issue's done-when check for this sample, or '' when it has none."""
    err = [p["mean_ecd_nm"] / truth[m]["mean"] - 1 if m >= 0 else np.inf
           for p, m in zip(pops, matched)]
    if sample == "ps-bimodal":
        ok = (len(pops) == 2 and all(abs(e) <= 0.02 for e in err)
              and all(abs(p["fraction"] - truth[m]["fraction"]) <= 0.03
                      for p, m in zip(pops, matched)))
        return "PASS" if ok else "FAIL"
    if sample in ONE_POPULATION:
        return "PASS" if len(pops) == 1 and abs(err[0]) <= 0.015 else "FAIL"
    if sample == "spheres-rods":
        ok = len(pops) == 2 and sorted(matched.tolist()) == [0, 1]
        return "PASS" if ok else "FAIL"
    return ""


def report(sample, detector, method, tables, truths, *, precision, seed):
    truth = truth_populations(truths)
    rs, moved, flipped, t_max = run_session(tables, method, precision=precision, seed=seed)
    s = rs.summary()
    labels = rs.labels
    sep = np.asarray(rs.table["separated"], bool) if "separated" in rs.table else \
        np.zeros(len(labels), bool)
    pops = s["populations"]
    matched = match(pops, truth)
    # the same session's fractions without the crowding correction (plain untouched counts)
    codes = np.unique(rs.table["frame"], return_inverse=True)[1]
    crowd = summarize(rs.table, labels, frames_ok=rs.n_frames, frames_failed=0,
                      precision=precision, frames=codes, fraction_crowding=False)
    crowd_f = {p["id"]: (p["fraction"], p["fraction_ci95"]) for p in crowd["populations"]}
    n = max(len(labels), 1)
    out_iso = np.mean(labels[~sep] < 0) if (~sep).any() else np.nan
    out_sep = np.mean(labels[sep] < 0) if sep.any() else np.nan
    line = (f"{sample:<15} {detector:<5} {method:<6} n={len(labels):6d} "
            f"basis={s['fraction_basis']} touching={np.mean(rs.table.get('touching', [0])):.0%} "
            f"split={sep.mean():4.0%} pops={len(pops)} out={np.mean(labels < 0):5.1%} "
            f"(iso {out_iso:5.1%} split {out_sep:5.1%}) moved={moved} Δ±1={flipped} "
            f"upd={t_max * 1e3:.0f}ms")
    for p, m in zip(pops, matched):
        if m >= 0:
            t = truth[m]
            line += (f"\n    P{p['id']} {p['shape'] or '?':<9} n={p['n']:6d} "
                     f"mean {p['mean_ecd_nm']:7.2f}/{t['mean']:7.2f} nm "
                     f"({p['mean_ecd_nm'] / t['mean'] - 1:+6.2%})  "
                     f"f {p['fraction']:.3f}/{t['fraction']:.3f} "
                     f"({(p['fraction'] - t['fraction']) * 100:+5.1f} pt) "
                     f"[{p['fraction_ci95'][0]:.3f}-{p['fraction_ci95'][1]:.3f}]; uncorrected "
                     f"{(crowd_f[p['id']][0] - t['fraction']) * 100:+5.1f} pt "
                     f"[{crowd_f[p['id']][1][0]:.3f}-{crowd_f[p['id']][1][1]:.3f}]  "
                     f"ci ±{p['ci95_rel'] * 100:.2f}%  aspect {p['mean_aspect_ratio']:.2f}")
        else:
            line += (f"\n    P{p['id']} {p['shape'] or '?':<9} n={p['n']:6d} "
                     f"mean {p['mean_ecd_nm']:7.2f} nm (?)  f {p['fraction']:.3f}")
    line += "\n    truth (alone): " + ", ".join(
        f"{t['mean_alone']:.2f} nm ({t['mean_alone'] / t['mean'] - 1:+.2%}) "
        f"f {t['fraction_alone']:.3f}" for t in truth)
    for i, t in enumerate(truth):
        if i not in matched:
            line += f"\n    truth population {i} ({t['mean']:.1f} nm, f {t['fraction']:.3f})" \
                    f" not found"
    v = verdict(sample, pops, matched, truth)
    if v:
        line += f"\n    done-when: {v}"
    print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=",".join(SAMPLES))
    parser.add_argument("--detectors", default="bf,haadf")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", type=float, default=0.01)
    parser.add_argument("--density", default="any",
                        help=f"comma-separated density classes of the fields "
                             f"({', '.join(DENSITIES)}); each is its own session")
    parser.add_argument("--tables", default=None,
                        help="analysed tables of this key (printed by an earlier run) "
                             "instead of the current analysis sources' hash")
    args = parser.parse_args(argv)
    key = args.tables or tables_key()
    print(f"analysis tables key {key}; {args.frames} frames of {args.size}² per sample, "
          f"seed {args.seed}", flush=True)
    densities = args.density.split(",")
    for sample, detector in itertools.product(args.samples.split(","),
                                              args.detectors.split(",")):
        pooled = []
        for density in densities:
            t0 = time.perf_counter()
            pairs = [analysed(sample, detector, i, size=args.size, seed=args.seed, key=key,
                              density=density) for i in range(args.frames)]
            pooled.append(pairs)
            tables = [p[0] for p in pairs]
            truths = [p[1] for p in pairs]
            print(f"-- {sample} {detector} {density}: "
                  f"{sum(len(t['ecd_nm']) for t in tables)} particles "
                  f"({time.perf_counter() - t0:.0f} s to simulate/analyse or load)",
                  flush=True)
            for method in args.methods.split(","):
                report(sample, detector, method, tables, truths, precision=args.precision,
                       seed=args.seed)
        if len(densities) > 1:
            # one session over every class's frames, interleaved (a session that crosses
            # sparse and dense areas: the crowding varies from frame to frame)
            pairs = [p for group in zip(*pooled) for p in group]
            print(f"-- {sample} {detector} {'+'.join(densities)} interleaved: "
                  f"{sum(len(p[0]['ecd_nm']) for p in pairs)} particles", flush=True)
            for method in args.methods.split(","):
                report(sample, detector, method, [p[0] for p in pairs],
                       [p[1] for p in pairs], precision=args.precision, seed=args.seed)

if __name__ == "__main__":
    main()
