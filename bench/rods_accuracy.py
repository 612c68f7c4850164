"""Touching rods split correctly: separate() alone vs separate() with the rods hook.

Same frames, truth matching and pair definition as ``bench/separate_accuracy.py`` (imported:
a *touching pair* is two truth particles overlapping only each other; it is split when two
distinct measured particles lie on the two truth centres with ECD within ``--tol``). The hook
is the one inside ``separate()`` (``separate._uecs`` calls
:func:`~particlewatch.analysis.rods.rod_geometry_px` once per frame and
:func:`~particlewatch.analysis.rods.rods_instead` per region); "no" runs separate() with it
switched off (:func:`rods_hook`), "yes" with it, timed in CPU seconds.

Printed per sample and imaging condition: pairs, split rate, pairs left as one particle /
agglomerate, median |length| and |width| error of the members of split rod pairs, isolated
particles over-split or lost, agglomerate count, regions handed to rods, and the hook's CPU
ms / frame. ``split*``: pairs split when the rods are measured from their masks as they are
(measure's free-outline rebuild cuts a rod whose end lies under its neighbour short).
``--rev REV`` compares rods.py at a git revision with the working tree instead.
Run ``python bench/rods_accuracy.py [--samples au-rods,spheres-rods] [--variants
default,bf,d0.25] [--pairs 60] [--size 1024] [--rev REV]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from separate_accuracy import (_match, _variant, frames_for, score, seg_tag,  # noqa: E402
                               sim_tag, touching_pairs, use_segment_at)

from particlewatch.analysis.measure import measure  # noqa: E402
from particlewatch.analysis import rods as rods_module  # noqa: E402
from particlewatch.analysis import separate as separate_module  # noqa: E402
from particlewatch.analysis.separate import separate  # noqa: E402
from particlewatch.simulators.samples import get_sample  # noqa: E402


@contextlib.contextmanager
def rods_hook(module=rods_module):
    """``separate()`` with the rods hook of ``module`` (None: without the hook).

    Yields a dict: ``pieces``, the pieces of every rod split the hook took (to find the
    rods' labels among ``Separation.masks``, :func:`rod_labels`); ``regions``, how many; and
    ``cpu_s``, the hook's CPU seconds.
    """
    stats = {"pieces": [], "cpu_s": 0.0, "regions": 0}
    real = separate_module.rods

    class Hook:
        @staticmethod
        def rod_geometry_px(labels, **kw):
            if module is None:
                return None
            t0 = time.process_time()
            try:
                return module.rod_geometry_px(labels, **kw)
            finally:
                stats["cpu_s"] += time.process_time() - t0

        @staticmethod
        def rods_instead(*args, **kw):
            t0 = time.process_time()
            try:
                split = module.rods_instead(*args, **kw)
            finally:
                stats["cpu_s"] += time.process_time() - t0
            if split is not None:
                stats["regions"] += 1
                stats["pieces"] += split.pieces
            return split

    separate_module.rods = Hook
    try:
        yield stats
    finally:
        separate_module.rods = real


def rod_labels(sep, pieces):
    """Labels of ``sep`` whose mask is one of the rod ``pieces`` (the array itself)."""
    ids = {id(p) for p in pieces}
    return [lab for lab, (_, _, m) in sep.masks.items() if id(m) in ids]


def measure_rods_as_masks(table, image, pixel_nm, sep, rod_labels, *, margin=8):
    """``table`` with each rod's size columns measured from its mask alone.

    :func:`~particlewatch.analysis.measure.measure` rebuilds the outline of a particle that
    meets a neighbour from its free outline (low harmonics), which cuts a rod whose end lies
    under its neighbour short; a rod from the hook is already a model outline. This is what
    the rods give when measure takes such a mask as it is (each rod measured as the only
    particle of a crop around it).
    """
    table = {k: np.array(v, copy=True) for k, v in table.items()}
    row = {int(lab): k for k, lab in enumerate(table["particle_id"])}
    h, w = image.shape
    for lab in rod_labels:
        if lab not in row or lab not in sep.masks:
            continue
        r0, c0, m = sep.masks[lab]
        y0, x0 = max(r0 - margin, 0), max(c0 - margin, 0)
        y1, x1 = min(r0 + m.shape[0] + margin, h), min(c0 + m.shape[1] + margin, w)
        crop = np.zeros((y1 - y0, x1 - x0), np.int32)
        crop[r0 - y0:r0 - y0 + m.shape[0], c0 - x0:c0 - x0 + m.shape[1]][m] = 1
        alone = measure(crop, image[y0:y1, x0:x1], pixel_nm)
        if len(alone["ecd_nm"]) != 1:
            continue
        for key in ("ecd_nm", "feret_max_nm", "feret_min_nm", "area_nm2"):
            table[key][row[lab]] = alone[key][0]
    return table


def rod_errors(table, truth, tol):
    """|length| and |width| relative errors of the members of correctly split rod pairs."""
    px = truth["pixel_nm"]
    parts = truth["particles"]
    errs = []
    for i, j in touching_pairs(truth):
        a, b = _match(table, parts[i], px), _match(table, parts[j], px)
        if a < 0 or b < 0 or a == b:
            continue
        for n, k in ((i, a), (j, b)):
            if parts[n]["shape"] == "rod":
                errs.append((table["feret_max_nm"][k] / parts[n]["feret_max_nm"] - 1,
                             table["feret_min_nm"][k] / parts[n]["feret_min_nm"] - 1))
    return errs


def run(frames, tol, hook):
    """Figures over ``frames`` for separate() without the rods hook (``hook`` None) or with
    the hook of the rods module ``hook``.

    ``split_alone``: pairs split with the rods measured from their masks as they are
    (:func:`measure_rods_as_masks`); ``cpu_ms``: the hook's CPU time per frame (wall time on a
    shared machine counts other people's work).
    """
    tot = {"pairs": 0, "split": 0, "split_alone": 0, "merged_pair": 0, "agglo_pair": 0,
           "iso": 0, "oversplit": 0, "lost": 0, "agglos": 0, "replaced": 0, "cpu_ms": 0.0}
    errs = []
    for image, px, labels, truth in frames:
        with rods_hook(hook) as stats:
            sep = separate(labels, px, image=image)
        tot["cpu_ms"] += 1e3 * stats["cpu_s"]
        tot["replaced"] += stats["regions"]
        table = measure(sep.labels, image, px, masks=sep.masks)
        f, _ = score(table, truth, tol, raw=labels, out=sep.labels)
        for key in ("pairs", "split", "merged_pair", "agglo_pair", "iso", "oversplit", "lost"):
            tot[key] += f[key]
        alone = measure_rods_as_masks(table, image, px, sep, rod_labels(sep, stats["pieces"]))
        tot["split_alone"] += score(alone, truth, tol)[0]["split"]
        tot["agglos"] += sep.agglomerates
        errs += rod_errors(table, truth, tol)
    tot["cpu_ms"] /= max(len(frames), 1)
    return tot, np.abs(np.asarray(errs, float).reshape(-1, 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="au-rods,spheres-rods")
    parser.add_argument("--variants", default="default,other,d0.25",
                        help="imaging conditions as in separate_accuracy.py ('default', "
                        "'bf', 'haadf', 'other', 'd0.25', 'haadf-d0.25', ...)")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--segment-rev", default=None,
                        help="segment with analysis/segment.py as it was at this git revision")
    parser.add_argument("--rev", default=None,
                        help="compare analysis/rods.py at this git revision ('then') with the "
                        "working tree ('now') instead of no hook with the hook")
    args = parser.parse_args(argv)
    hooks = ((None, "no"), (rods_module, "yes"))
    if args.rev:
        from separate_speed import module_at  # bench/ is on the path
        hooks = ((module_at(args.rev, "analysis/rods.py"), "then"), (rods_module, "now"))
    if args.segment_rev:
        use_segment_at(args.segment_rev)
    print(f"frames: simulator {sim_tag()}, segmentation {seg_tag()}; pair split: both ECDs "
          f"within {args.tol:.0%}; len/wid: median |error| of rod members of pairs matched "
          "to two particles")
    print(f"{'sample':24} {'hook':>4} {'pairs':>5} {'split':>6} {'split*':>6} {'one':>6} "
          f"{'agglo':>6} "
          f"{'len':>6} {'wid':>6} {'n':>4} {'iso':>5} {'over':>5} {'lost':>5} {'agglos':>6} "
          f"{'rods':>5} {'cpu ms':>6}")
    for sample in args.samples.split(","):
        for variant in args.variants.split(","):
            detector, dose = _variant(variant)
            if detector == "other":
                detector = "bf" if get_sample(sample).detector == "haadf" else "haadf"
            frames = frames_for(sample, pairs=args.pairs, size=args.size, seed=args.seed,
                                detector=detector, dose=dose)
            name = sample + (f" {detector}" if detector else "") + (
                f" x{dose:g}" if dose != 1 else "")
            for hook, tag in hooks:
                t, e = run(frames, args.tol, hook)
                n = max(t["pairs"], 1)
                med = np.median(e, axis=0) * 100 if len(e) else np.full(2, np.nan)
                print(f"{name:24} {tag:>4} {t['pairs']:>5d} "
                      f"{t['split'] / n:>6.2f} {t['split_alone'] / n:>6.2f} "
                      f"{t['merged_pair'] / n:>6.2f} "
                      f"{t['agglo_pair'] / n:>6.2f} {med[0]:>5.1f}% {med[1]:>5.1f}% "
                      f"{len(e):>4d} {t['iso']:>5d} {t['oversplit']:>5d} {t['lost']:>5d} "
                      f"{t['agglos']:>6d} {t['replaced']:>5d} {t['cpu_ms']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
