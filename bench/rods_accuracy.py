"""Touching rods split correctly: separate() alone vs separate() with the rods hook.

Same frames, truth matching and pair definition as ``bench/separate_accuracy.py`` (imported:
a *touching pair* is two truth particles overlapping only each other; it is split when two
distinct measured particles lie on the two truth centres with ECD within ``--tol``). The hook
is emulated outside ``separate.py``: the frame's rod radius and length come from
:func:`~particlewatch.analysis.rods.rod_geometry_px`, and for every segmented region UECS's
result (its particles there, full extents, and the agglomerate boxes over it) is handed to
:func:`~particlewatch.analysis.rods.rods_instead`; where that returns a rod split, the region's
particles are replaced by the rods. (Inside ``separate()`` the hook runs before the thickness
check; here after it, so a thick-dropped UECS piece also counts as unexplained.)

Printed per sample and imaging condition: pairs, split rate, pairs left as one particle /
agglomerate, median |length| and |width| error of the members of split rod pairs, isolated
particles over-split or lost, agglomerate count, regions handed to rods, and rods ms / frame.
Run ``python bench/rods_accuracy.py [--samples au-rods,spheres-rods] [--variants
default,bf,d0.25] [--pairs 60] [--size 1024]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from separate_accuracy import (_match, _variant, frames_for, score, seg_tag,  # noqa: E402
                               sim_tag, touching_pairs, use_segment_at)

from particlewatch.analysis.measure import measure  # noqa: E402
from particlewatch.analysis.rods import rod_geometry_px, rods_instead  # noqa: E402
from particlewatch.analysis.separate import Separation, separate  # noqa: E402
from particlewatch.simulators.samples import get_sample  # noqa: E402


def with_rods(labels, sep, *, min_px=30):
    """``sep`` with the rods hook applied to every region of the segmentation ``labels``.

    Returns the new :class:`Separation` and how many regions went to rods.
    """
    geometry = rod_geometry_px(labels)
    if geometry is None:
        return sep, 0
    radius, length = geometry
    out = sep.labels.copy()
    masks = dict(sep.masks)
    separated = list(sep.separated)
    boxes = list(sep.agglomerate_boxes)
    h, w = labels.shape
    replaced = 0
    next_label = len(separated)
    for index, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        r0, c0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        r1, c1 = min(sl[0].stop + 1, h), min(sl[1].stop + 1, w)
        mask = labels[r0:r1, c0:c1] == index + 1
        labs = np.unique(out[r0:r1, c0:c1][mask])
        labs = labs[labs > 0]
        pieces = []
        for lab in labs:
            if lab in masks:
                mr, mc, m = masks[lab]
                p = np.zeros(mask.shape, bool)
                # the mask's part on this crop (a full extent stays inside its region)
                y0, x0 = max(mr, r0), max(mc, c0)
                y1, x1 = min(mr + m.shape[0], r1), min(mc + m.shape[1], c1)
                p[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = m[y0 - mr:y1 - mr, x0 - mc:x1 - mc]
                pieces.append(p & mask)
            else:
                pieces.append(mask & (out[r0:r1, c0:c1] == lab))
        # agglomerate boxes over this region (frame -> crop coordinates)
        mine = [b for b in boxes if b[0] < r1 and b[2] > r0 and b[1] < c1 and b[3] > c0
                and mask[max(b[0] - r0, 0):b[2] - r0, max(b[1] - c0, 0):b[3] - c0].any()]
        rest = [(max(b[0] - r0, 0), max(b[1] - c0, 0), min(b[2] - r0, r1 - r0),
                 min(b[3] - c0, c1 - c0)) for b in mine]
        alt = rods_instead(mask, radius, pieces=pieces, rest=rest, length_px=length,
                           min_px=min_px)
        if alt is None:
            continue
        replaced += 1
        view = out[r0:r1, c0:c1]
        view[mask] = 0
        for lab in labs:
            masks.pop(int(lab), None)
            separated[lab] = False
        boxes = [b for b in boxes if b not in mine]
        boxes += [(y0 + r0, x0 + c0, y1 + r0, x1 + c0) for y0, x0, y1, x1 in alt.rest]
        for k, piece in enumerate(alt.pieces):
            view[alt.owner == k] = next_label
            separated.append(len(alt.pieces) > 1)
            masks[next_label] = (r0, c0, piece)
            next_label += 1
    # consecutive labels (measure and score index by label)
    present = np.zeros(next_label, bool)
    present[np.unique(out)] = True
    present[list(masks)] = True
    present[0] = True
    new = np.cumsum(present) - 1
    out = new[out].astype(np.int32)
    masks = {int(new[k]): v for k, v in masks.items()}
    sep_flags = np.array(separated, bool)[present]
    return Separation(out, sep_flags, len(boxes), boxes, masks), replaced


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
    """Figures over ``frames`` for separate() alone (hook False) or with the rods hook."""
    tot = {"pairs": 0, "split": 0, "merged_pair": 0, "agglo_pair": 0, "iso": 0,
           "oversplit": 0, "lost": 0, "agglos": 0, "replaced": 0, "ms": 0.0}
    errs = []
    for image, px, labels, truth in frames:
        sep = separate(labels, px, image=image)
        if hook:
            t0 = time.perf_counter()
            sep, n = with_rods(labels, sep)
            tot["ms"] += 1e3 * (time.perf_counter() - t0)
            tot["replaced"] += n
        table = measure(sep.labels, image, px, masks=sep.masks)
        f, _ = score(table, truth, tol, raw=labels, out=sep.labels)
        for key in ("pairs", "split", "merged_pair", "agglo_pair", "iso", "oversplit", "lost"):
            tot[key] += f[key]
        tot["agglos"] += sep.agglomerates
        errs += rod_errors(table, truth, tol)
    tot["ms"] /= max(len(frames), 1)
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
    args = parser.parse_args(argv)
    if args.segment_rev:
        use_segment_at(args.segment_rev)
    print(f"frames: simulator {sim_tag()}, segmentation {seg_tag()}; pair split: both ECDs "
          f"within {args.tol:.0%}; len/wid: median |error| of rod members of pairs matched "
          "to two particles")
    print(f"{'sample':24} {'hook':>4} {'pairs':>5} {'split':>6} {'one':>6} {'agglo':>6} "
          f"{'len':>6} {'wid':>6} {'n':>4} {'iso':>5} {'over':>5} {'lost':>5} {'agglos':>6} "
          f"{'rods':>5} {'ms':>5}")
    for sample in args.samples.split(","):
        for variant in args.variants.split(","):
            detector, dose = _variant(variant)
            if detector == "other":
                detector = "bf" if get_sample(sample).detector == "haadf" else "haadf"
            frames = frames_for(sample, pairs=args.pairs, size=args.size, seed=args.seed,
                                detector=detector, dose=dose)
            name = sample + (f" {detector}" if detector else "") + (
                f" x{dose:g}" if dose != 1 else "")
            for hook in (False, True):
                t, e = run(frames, args.tol, hook)
                n = max(t["pairs"], 1)
                med = np.median(e, axis=0) * 100 if len(e) else np.full(2, np.nan)
                print(f"{name:24} {'yes' if hook else 'no':>4} {t['pairs']:>5d} "
                      f"{t['split'] / n:>6.2f} {t['merged_pair'] / n:>6.2f} "
                      f"{t['agglo_pair'] / n:>6.2f} {med[0]:>5.1f}% {med[1]:>5.1f}% "
                      f"{len(e):>4d} {t['iso']:>5d} {t['oversplit']:>5d} {t['lost']:>5d} "
                      f"{t['agglos']:>6d} {t['replaced']:>5d} {t['ms']:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
