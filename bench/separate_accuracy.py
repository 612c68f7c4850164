"""Touching pairs split correctly, and the speed of separate() + measure(), on simulated frames.

A *touching pair* is two truth particles whose only overlap partner is each other. It counts as
split when two distinct measured particles have their centroids within 0.35 ECD of the two
truth centres and each measured ECD is within ``--tol`` (5%) of its truth. Isolated particles
give the median |ECD|, Feret min/max errors and the median |shell_nm| error with the
fraction of particles given a shell (capsules: should be 1; solid particles: 0).

Frames are simulated in focus at stage positions chosen for many touching pairs, segmented once
with ``segment()`` and cached in ``bench/_work/separate/`` (segmentation is not what is timed).
Also: isolated particles cut into several (over-split) or reported as agglomerates (lost),
pairs left as one particle or reported as an agglomerate, and particles holding several truth
centres (merged groups measured as one particle). ``--rev REV`` scores ``analysis/separate.py``
as it was at a git revision (before/after on the same frames and the same ``measure``).
Run ``python bench/separate_accuracy.py [--samples au10,ps100,ps-bimodal] [--pairs 120]
[--method uecs] [--detector bf|haadf] [--dose 0.25] [--rev REV]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.segment import segment
from particlewatch.analysis.separate import separate
from particlewatch.simulators.samples import get_sample
from particlewatch.simulators.scope import SimScope

WORK = Path(__file__).resolve().parent / "_work" / "separate"


def touching_pairs(truth):
    """Index pairs (i, j) of whole truth particles that overlap only each other."""
    parts = truth["particles"]
    out = []
    for i, p in enumerate(parts):
        if len(p["overlaps"]) == 1 and not p["touches_edge"]:
            j = p["overlaps"][0]
            if i < j and parts[j]["overlaps"] == [i] and not parts[j]["touches_edge"]:
                out.append((i, j))
    return out


ROOT = Path(__file__).resolve().parents[1]


def source_tag(*patterns):
    """Short hash of the source files matching ``patterns`` (relative to the repository).

    Cached frames carry the tag of the code that made them, so a change to the simulator or to
    ``segment.py`` (working tree, committed or not) makes new frames or new labels.
    """
    h = hashlib.sha1()
    for pattern in patterns:
        for path in sorted(ROOT.glob(pattern)):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:10]


def sim_tag():
    """Tag of the simulator's sources (what a cached image depends on)."""
    return source_tag("simulators/*.py")


# segment() and the text of its sources; --segment-rev swaps in those of a git revision, so
# runs compare on fixed labels while segment.py is being edited
SEGMENT = {"fn": segment, "rev": None}


def seg_tag():
    """Tag of the segmentation's sources (what cached labels depend on)."""
    if SEGMENT["rev"]:
        return "rev-" + SEGMENT["rev"][:10]
    return source_tag("analysis/segment.py", "analysis/_checks.py")


def use_segment_at(rev):
    """Segment cached frames with ``analysis/segment.py`` as it was at git revision ``rev``."""
    import subprocess
    from separate_speed import module_at  # bench/ is on the path when run as a script
    full = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    SEGMENT.update(fn=module_at(full, "analysis/segment.py").segment, rev=full)


def cached_labels(stem, image, pixel_nm):
    """``segment(image, pixel_nm)``, cached as ``STEM.seg-TAG.npz`` for this segment.py.

    Labels of other segment.py versions for the same frame are removed (they would never be
    read again), except those of fixed git revisions (``--segment-rev``).
    """
    tag = seg_tag()
    path = WORK / f"{stem}.seg-{tag}.npz"
    if not path.exists():
        labels = SEGMENT["fn"](image, pixel_nm)
        for old in WORK.glob(f"{stem}.seg-*.npz"):
            if not old.name.startswith(f"{stem}.seg-rev-"):
                old.unlink(missing_ok=True)
        np.savez_compressed(path, labels=labels)
    return np.load(path)["labels"]


def frame_at(sample, k, *, size, seed, detector=None, dose=1.0):
    """Cached (image, pixel_nm, labels, truth) of the ``k``-th frame of ``frames_for``.

    The image and truth are cached under the simulator's source tag, the labels under
    segment.py's (:func:`cached_labels`): either changing re-makes what depends on it.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    tag = (f"_{detector}" if detector else "") + (f"_d{dose:g}" if dose != 1.0 else "")
    stem = f"{sample}_{size}_{seed}{tag}_{k}.sim-{sim_tag()}"
    path = WORK / f"{stem}.npz"
    if not path.exists():
        rng = np.random.default_rng([seed, k])
        probe = SimScope(sample, seed=seed + k, size_px=16, detector=detector)
        scope = SimScope(sample, seed=seed + k, size_px=size, detector=detector,
                         dose=probe.dose * dose)
        x0, y0, x1, y1 = scope.stage_limits_um
        best = None
        for _ in range(30):  # the densest of 30 random positions
            scope.move_stage(*rng.uniform([x0 + 5, y0 + 5], [x1 - 5, y1 - 5]))
            scope.set_defocus(scope.true_focus_um())
            frame = scope.snap()
            n = len(touching_pairs(frame.truth))
            if best is None or n > best[0]:
                best = (n, frame)
        frame = best[1]
        # frames of other simulator versions (and untagged ones) are stale
        for old in WORK.glob(f"{sample}_{size}_{seed}{tag}_{k}.*npz"):
            old.unlink(missing_ok=True)
        np.savez_compressed(path, image=frame.image, pixel_nm=frame.pixel_nm,
                            truth=json.dumps(frame.truth))
    data = np.load(path)
    truth = json.loads(str(data["truth"]))
    image, pixel_nm = data["image"], float(data["pixel_nm"])
    return image, pixel_nm, cached_labels(stem, image, pixel_nm), truth


def frames_for(sample, *, pairs, size, seed, detector=None, dose=1.0):
    """Cached (image, pixel_nm, labels, truth) frames holding at least ``pairs`` pairs.

    ``detector`` None is the sample's usual one; ``dose`` scales its default dose.
    """
    frames, found, k = [], 0, 0
    while found < pairs:
        frames.append(frame_at(sample, k, size=size, seed=seed, detector=detector, dose=dose))
        found += len(touching_pairs(frames[-1][3]))
        k += 1
    return frames


def _match(table, p, px):
    xy = np.column_stack([table["x_px"], table["y_px"]])
    if not len(xy):
        return -1
    d = np.hypot(xy[:, 0] - p["x_px"], xy[:, 1] - p["y_px"])
    k = int(np.argmin(d))
    return k if d[k] <= 0.35 * p["ecd_nm"] / px else -1


def _centre_labels(lab, parts):
    """The label under each truth centre (0 where it falls on background)."""
    rc = np.array([[round(p["y_px"]), round(p["x_px"])] for p in parts], int).reshape(-1, 2)
    rc = np.clip(rc, 0, np.array(lab.shape) - 1)
    return lab[rc[:, 0], rc[:, 1]]


def score(table, truth, tol, raw=None, out=None):
    """Figures of one frame.

    ``raw`` is the segmentation, ``out`` the separated labels: with both, isolated particles
    are checked for over-splitting (their segmented region holds one truth centre but comes out
    as several particles) or loss (reported as an agglomerate), touching pairs for being
    merged into one particle or reported as an agglomerate, and every particle for holding
    several truth centres (a merged group measured as one particle).
    """
    px = truth["pixel_nm"]
    parts = truth["particles"]
    f = {"split": 0, "pairs": 0, "perr": [], "merged_pair": 0, "agglo_pair": 0,
         "iso": 0, "oversplit": 0, "lost": 0, "merged": 0, "out": 0}
    raw_at = out_at = None
    if raw is not None and out is not None and parts:
        raw_at, out_at = _centre_labels(raw, parts), _centre_labels(out, parts)
        found = out_at[out_at > 0]
        f["out"] = len(np.unique(found))
        f["merged"] = int(np.sum(np.bincount(found) > 1))
    for i, j in touching_pairs(truth):
        f["pairs"] += 1
        if out_at is not None:
            if out_at[i] > 0 and out_at[i] == out_at[j]:
                f["merged_pair"] += 1
            elif out_at[i] == 0 and out_at[j] == 0 and raw_at[i] > 0 and raw_at[j] > 0:
                f["agglo_pair"] += 1
        a, b = _match(table, parts[i], px), _match(table, parts[j], px)
        if a < 0 or b < 0 or a == b:
            continue
        ea = table["ecd_nm"][a] / parts[i]["ecd_nm"] - 1
        eb = table["ecd_nm"][b] / parts[j]["ecd_nm"] - 1
        f["perr"] += [ea, eb]
        f["split"] += abs(ea) <= tol and abs(eb) <= tol
    iso = {"ecd": [], "fmax": [], "fmin": [], "shell": []}
    if raw_at is not None:
        holders = np.bincount(raw_at, minlength=int(raw.max()) + 1)
    for n, p in enumerate(parts):
        if p["overlaps"] or p["touches_edge"]:
            continue
        if raw_at is not None and raw_at[n] > 0 and holders[raw_at[n]] == 1:
            # its segmented region holds no other truth centre: it must stay one particle
            f["iso"] += 1
            pieces = np.unique(out[raw == raw_at[n]])
            pieces = pieces[pieces > 0].size
            f["oversplit"] += pieces > 1
            f["lost"] += pieces == 0
        k = _match(table, p, px)
        if k < 0:
            continue
        iso["ecd"].append(table["ecd_nm"][k] / p["ecd_nm"] - 1)
        iso["fmax"].append(table["feret_max_nm"][k] / p["feret_max_nm"] - 1)
        iso["fmin"].append(table["feret_min_nm"][k] / p["feret_min_nm"] - 1)
        # solid particles must give NaN; capsules their shell
        iso["shell"].append(table["shell_nm"][k] / p["shell_nm"] - 1 if "shell_nm" in p
                            else (np.inf if np.isfinite(table["shell_nm"][k]) else np.nan))
    return f, iso


def _extent_area(sep, lab):
    """Pixels of particle ``lab``'s full extent (its mask, or its pixels in the labels)."""
    if lab in sep.masks:
        return int(np.count_nonzero(sep.masks[lab][2]))
    return int(np.count_nonzero(sep.labels == lab))


def _union_extent(sep, labs):
    """Pixels of the union of the full extents of particles ``labs``."""
    u = np.isin(sep.labels, labs)
    for lab in labs:
        if lab in sep.masks:
            r0, c0, m = sep.masks[lab]
            u[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] |= m
    return int(np.count_nonzero(u))


BUCKETS = ("ok", "missed", "one", "agglo", "over", "offc", "size")
MEMBER_KEYS = ("small-", "small+", "large-", "large+")  # member (smaller/larger), -: too small


def pair_breakdown(table, truth, tol, raw, sep):
    """Why touching pairs fail, and where the size of a wrongly sized member went.

    Every pair falls in one bucket: ``ok`` (split, both ECDs within ``tol``), ``missed`` (a
    truth centre on segmentation background), ``one`` (left as one particle), ``agglo``
    (reported as an agglomerate), ``over`` (cut into more than two particles, so a member
    matches none), ``offc`` (two particles, but not on the truth centres), ``size`` (two
    particles, a size off by more than ``tol``). ``size`` pairs also count their wrong
    members in ``MEMBER_KEYS`` (the smaller/larger member, ``-`` too small, ``+`` too
    large) and give, for each wrong member, the ECD error the size loss comes from at each
    stage (``stages``: rows of seg, union, piece, measure, total): ``seg`` the member's size
    as the raw region allows it (its truth disc's pixels in the region plus the region's
    pixels outside both truth discs nearer its circle: a region cut short of, or reaching
    beyond, the member's edge),
    ``union`` the union of the two pieces'
    full extents against the raw region, ``piece`` the piece's full extent against its truth
    disc, ``measure`` the measured ECD against the piece's own ECD, ``total`` the measured
    ECD against the truth (all as equivalent-diameter errors, so piece + measure ≈ total).
    """
    px = truth["pixel_nm"]
    parts = truth["particles"]
    out = sep.labels
    f = {k: 0 for k in BUCKETS + MEMBER_KEYS}
    stages = []
    if not parts:
        return f, stages
    raw_at, out_at = _centre_labels(raw, parts), _centre_labels(out, parts)
    row_of = {int(lab): k for k, lab in enumerate(table["particle_id"])}
    for i, j in touching_pairs(truth):
        if raw_at[i] == 0 or raw_at[j] == 0:
            f["missed"] += 1
            continue
        if out_at[i] > 0 and out_at[i] == out_at[j]:
            f["one"] += 1
            continue
        if out_at[i] == 0 or out_at[j] == 0:
            f["agglo"] += 1
            continue
        a, b = _match(table, parts[i], px), _match(table, parts[j], px)
        if a < 0 or b < 0 or a == b:
            region = np.isin(raw, [raw_at[i], raw_at[j]])
            pieces = np.unique(out[region])
            f["over" if np.count_nonzero(pieces) > 2 else "offc"] += 1
            continue
        ea = table["ecd_nm"][a] / parts[i]["ecd_nm"] - 1
        eb = table["ecd_nm"][b] / parts[j]["ecd_nm"] - 1
        if abs(ea) <= tol and abs(eb) <= tol:
            f["ok"] += 1
            continue
        f["size"] += 1
        ri, rj = (parts[n]["ecd_nm"] / px / 2 for n in (i, j))
        region = np.isin(raw, [raw_at[i], raw_at[j]])
        la, lb = int(table["particle_id"][a]), int(table["particle_id"][b])
        union = np.sqrt(_union_extent(sep, [la, lb]) / np.count_nonzero(region)) - 1
        for n, k, lab, e, r in ((i, a, la, ea, ri), (j, b, lb, eb, rj)):
            if abs(e) <= tol:
                continue
            # the member's size as the segmented region allows it: its truth disc's pixels in
            # the region plus the region's pixels outside both truth discs that lie nearer
            # its circle than the partner's (exact for spheres; a cube's disc of equal area
            # pokes out of its sides: about -2%, its corners count as excess)
            other = j if n == i else i
            ro = rj if n == i else ri
            cy, cx = parts[n]["y_px"], parts[n]["x_px"]
            oy, ox = parts[other]["y_px"], parts[other]["x_px"]
            m = r + 2 * max(r, ro)
            y0, x0 = max(int(cy - m), 0), max(int(cx - m), 0)
            y1, x1 = int(cy + m) + 2, int(cx + m) + 2
            yy, xx = np.ogrid[y0:y1, x0:x1]
            sub = region[y0:y1, x0:x1]
            yy, xx = yy[:sub.shape[0]], xx[:, :sub.shape[1]]
            dn = np.hypot(yy - cy, xx - cx) - r
            do = np.hypot(yy - oy, xx - ox) - ro
            disc = dn < 0
            excess = np.count_nonzero(sub & (dn >= 0) & (do >= 0) & (dn < do))
            seg = np.sqrt((np.count_nonzero(disc & sub) + excess)
                          / max(np.count_nonzero(disc), 1)) - 1
            smaller = parts[n]["ecd_nm"] <= parts[j if n == i else i]["ecd_nm"]
            f[("small" if smaller else "large") + ("-" if e < 0 else "+")] += 1
            piece_ecd = 2 * np.sqrt(_extent_area(sep, lab) / np.pi)
            stages.append((seg, union, piece_ecd / (2 * r) - 1,
                           table["ecd_nm"][k] / (piece_ecd * px) - 1, e))
    return f, stages


def print_breakdown(rows):
    """Print the pair failure table: ``rows`` of (sample, counts, stages)."""
    print("\npair outcomes (fraction of pairs): ok / missed in segmentation / one particle / "
          "agglomerate / over-split / off-centre / two pieces, a size off;\nwrong members of "
          "'size' pairs: smaller or larger member, too small (-) or too large (+);\nfor "
          "wrong members (median ECD-equivalent error, and how many of them the stage loses "
          "most of the size): seg = the member's size as the raw region allows it (its disc "
          "in the region + region beyond both discs nearer it), union = pieces' union "
          "vs raw region, piece = piece extent vs truth, meas = measured vs piece ECD")
    print(f"{'sample':22} {'pairs':>5} " + " ".join(f"{b:>6}" for b in BUCKETS) + "  "
          + " ".join(f"{m:>6}" for m in MEMBER_KEYS) + "   " + " ".join(
              f"{s:>6}" for s in ("seg", "union", "piece", "meas", "total")) + "  worst-stage")
    for name, f, stages in rows:
        n = max(sum(f[b] for b in BUCKETS), 1)
        st = np.asarray(stages, float).reshape(-1, 5)
        med = (np.median(st, axis=0) * 100 if len(st) else np.full(5, np.nan))
        # which stage loses most of each wrong member's size: segment (seg), separate
        # (piece minus seg: the piece lost what the region held), measure (meas)
        if len(st):
            blame = np.argmax(np.abs(np.stack([st[:, 0], st[:, 2] - st[:, 0], st[:, 3]])),
                              axis=0)
            worst = "seg {} sep {} meas {}".format(*np.bincount(blame, minlength=3))
        else:
            worst = ""
        print(f"{name:22} {n:>5d} " + " ".join(f"{f[b] / n:>6.2f}" for b in BUCKETS) + "  "
              + " ".join(f"{f[m]:>6d}" for m in MEMBER_KEYS) + "   "
              + " ".join(f"{v:>5.1f}%" for v in med) + f"  {worst}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="au10,ps100,ps50,ps-bimodal,cubes,"
                        "silica-capsules,au-rods,spheres-rods")
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--method", default="uecs")
    parser.add_argument("--detector", default=None, help="bf or haadf (default: the sample's)")
    parser.add_argument("--dose", type=float, default=1.0, help="scales the default dose")
    parser.add_argument("--variants", default=None,
                        help="several imaging conditions in one run, comma-separated: "
                        "'default', 'bf', 'haadf', 'other' (the detector the sample is not "
                        "usually imaged with), 'd0.25' (¼ dose), 'haadf-d0.25', ...; "
                        "overrides --detector/--dose")
    parser.add_argument("--segment-rev", default=None,
                        help="segment with analysis/segment.py as it was at this git revision "
                        "(fixed labels while segment.py is being edited)")
    parser.add_argument("--rev", default=None,
                        help="score analysis/separate.py as it was at this git revision")
    parser.add_argument("--no-image", action="store_true",
                        help="do not pass the image to separate() (shape alone)")
    args = parser.parse_args(argv)
    split_fn = separate
    if args.segment_rev:
        use_segment_at(args.segment_rev)
    if args.rev:
        from separate_speed import separate_at  # bench/ is on the path when run as a script
        split_fn = separate_at(args.rev)
    print(f"separate.py at {args.rev or 'the working tree'}; method {args.method}; detector {args.detector or 'default'}, dose x{args.dose:g}"
          f"{', no image' if args.no_image else ''}")
    print(f"frames: simulator {sim_tag()}, segmentation {seg_tag()}")
    print("split: touching pairs split into two particles with ECD within "
          f"{args.tol:.0%}; merged/agglo: pairs left as one particle / reported as an "
          "agglomerate;\nover/lost: isolated particles cut into several / reported as an "
          "agglomerate; multi: particles holding several truth centres;\nECD/Fmax/Fmin/shell: "
          "median |error| of isolated particles")
    print(f"{'sample':22} {'pairs':>5} {'split':>6} {'merged':>6} {'agglo':>6} {'pairECD':>7} "
          f"{'iso':>5} {'over':>6} {'lost':>6} {'multi':>6} {'ECD':>6} {'Fmax':>6} {'Fmin':>6} "
          f"{'shell/found':>11} {'particles':>9} {'agglos':>6} {'sep ms':>7} {'meas ms':>7}")
    variants = [(args.detector, args.dose)]
    if args.variants:
        variants = [_variant(v) for v in args.variants.split(",")]
    breakdown = []
    for sample, (detector, dose) in ((s, v) for s in args.samples.split(",")
                                     for v in variants):
        if detector == "other":  # the detector the sample is not usually imaged with
            detector = "bf" if get_sample(sample).detector == "haadf" else "haadf"
        frames = frames_for(sample, pairs=args.pairs, size=args.size, seed=args.seed,
                            detector=detector, dose=dose)
        name = sample + (f" {detector}" if detector else "") + (f" x{dose:g}" if dose != 1
                                                                else "")
        counts, stages = {}, []
        tot = {"perr": [], "ecd": [], "fmax": [], "fmin": [], "shell": [], "n": 0, "sep": 0.0,
               "meas": 0.0, "agglos": 0}
        for image, px, labels, truth in frames:
            t0 = time.perf_counter()
            kw = {} if args.no_image else {"image": image}
            sep = split_fn(labels, px, method=args.method, **kw)
            t1 = time.perf_counter()
            kw = {"masks": sep.masks} if getattr(sep, "masks", None) is not None else {}
            if getattr(sep, "exact", None):  # fitted models (rods) are measured as they are
                kw["exact"] = sep.exact
            table = measure(sep.labels, image, px, **kw)
            t2 = time.perf_counter()
            tot["sep"] += t1 - t0
            tot["meas"] += t2 - t1
            tot["n"] += len(table["particle_id"])
            tot["agglos"] += sep.agglomerates
            f, iso = score(table, truth, args.tol, raw=labels, out=sep.labels)
            fb, st = pair_breakdown(table, truth, args.tol, labels, sep)
            for key, value in fb.items():
                counts[key] = counts.get(key, 0) + value
            stages += st
            for key, value in f.items():
                tot[key] = tot.get(key, 0 if not isinstance(value, list) else []) + value
            for key in ("ecd", "fmax", "fmin", "shell"):
                tot[key] += iso[key]
        med = lambda a: (100 * float(np.median(np.abs(np.asarray(a)[np.isfinite(a)])))  # noqa
                         if np.isfinite(a).any() else float("nan"))
        rate = lambda k, n: tot[k] / max(tot[n], 1)  # noqa
        shell = np.asarray(tot["shell"], float)
        found = np.mean(~np.isnan(shell)) if shell.size else float("nan")
        breakdown.append((name, counts, stages))
        print(f"{name:22} {tot['pairs']:>5d} {rate('split', 'pairs'):>6.2f} "
              f"{rate('merged_pair', 'pairs'):>6.2f} {rate('agglo_pair', 'pairs'):>6.2f} "
              f"{med(tot['perr']):>6.1f}% {tot['iso']:>5d} {100 * rate('oversplit', 'iso'):>5.1f}% "
              f"{100 * rate('lost', 'iso'):>5.1f}% {100 * rate('merged', 'out'):>5.1f}% "
              f"{med(tot['ecd']):>5.1f}% {med(tot['fmax']):>5.1f}% "
              f"{med(tot['fmin']):>5.1f}% {med(shell):>5.1f}%/{found:.2f} {tot['n']:>9d} "
              f"{tot['agglos']:>6d} "
              f"{1e3 * tot['sep'] / len(frames):>7.0f} {1e3 * tot['meas'] / len(frames):>7.0f}",
              flush=True)
    print_breakdown(breakdown)


def _variant(text):
    """(detector, dose factor) of a ``--variants`` entry such as 'haadf-d0.25'."""
    detector, dose = None, 1.0
    for part in text.split("-"):
        if part in ("bf", "haadf", "other"):
            detector = part
        elif part == "default":
            continue
        elif part.startswith("d"):
            dose = float(part[1:])
        else:
            raise SystemExit(f"unknown variant part {part!r} in {text!r}")
    return detector, dose


if __name__ == "__main__":
    main()
