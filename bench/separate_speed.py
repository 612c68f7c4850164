"""Speed of separate() + measure() on the frame ``bench/analysis_speed.py`` times.

The frame (au10 by default, 2048², stage (3, -2) µm, in focus) is simulated and segmented once
and cached in ``bench/_work/separate/`` so that only separation and measurement are timed.
Prints CPU milliseconds (process time: the machine is shared, so wall time is noisy) for each
(best of ``--repeat``) and particles per minute on one core. ``--compare REV`` also times
``analysis/separate.py`` as it was at git revision ``REV`` on the same frames in the same run
(the ratio is what to compare; absolute times move with the machine's load), and compares the
two versions' results pixel by pixel on the timed frame and on the first ``--frames`` (3)
frames of ``bench/separate_accuracy.py`` (1024², dense in touching pairs): particles and
agglomerates of each, and the pixels whose particle differs (labels matched by overlap), in the
label image and in the full extents of overlapping particles (``Separation.masks``).
``--check REV`` instead compares the two versions on the cached 1024² frames of
``bench/separate_accuracy.py`` (every sample; its usual detector, the other one and ¼ dose;
``--frames`` of each, 48 frames at 2): labels, ``separated``, agglomerate boxes, full-extent
masks, ``exact`` and the measured tables must be identical; prints each difference, the
totals and both versions' CPU time over those frames. It reads the labels already cached
there (the newest of each frame), so both versions see the same labels whatever segment.py
is now.
Run ``python bench/separate_speed.py [--samples au10,ps-bimodal] [--size 2048] [--method uecs]
[--compare REV | --check REV] [--frames 3] [--detector bf|haadf]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.separate import separate
from particlewatch.simulators.scope import SimScope

WORK = Path(__file__).resolve().parent / "_work" / "separate"


def cached_frame(sample, size, seed, detector=None):
    """(image, pixel_nm, labels) of the analysis_speed frame, segmented once.

    Cached under the simulator's source tag and the labels under segment.py's (see
    ``separate_accuracy.frame_at``), so either changing re-makes what depends on it.
    """
    from separate_accuracy import cached_labels, sim_tag  # bench/ is on the path as a script
    tag = f"_{detector}" if detector else ""
    stem = f"speed_{sample}_{size}_{seed}{tag}.sim-{sim_tag()}"
    path = WORK / f"{stem}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
        scope.move_stage(3.0, -2.0)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        for old in WORK.glob(f"speed_{sample}_{size}_{seed}{tag}.*npz"):
            old.unlink(missing_ok=True)
        np.savez_compressed(path, image=frame.image, pixel_nm=frame.pixel_nm)
    data = np.load(path)
    image, pixel_nm = data["image"], float(data["pixel_nm"])
    return image, pixel_nm, cached_labels(stem, image, pixel_nm)


def module_at(rev, relpath):
    """The module ``relpath`` (e.g. ``analysis/separate.py``) as it was at git revision ``rev``.

    Loaded as a temporary submodule of the installed package, so its relative imports resolve.
    """
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:{relpath}"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    stem = Path(relpath).stem
    path = Path(tempfile.mkdtemp()) / f"{stem}_ref.py"
    path.write_text(source)
    package = "particlewatch." + Path(relpath).parent.as_posix().replace("/", ".")
    spec = importlib.util.spec_from_file_location(f"{package}._{stem}_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def separate_at(rev):
    """``separate`` from ``analysis/separate.py`` at git revision ``rev`` (a temporary module)."""
    return module_at(rev, "analysis/separate.py").separate


def best_times(fn, image, px, labels, method, repeat):
    """Best (separate s, measure s) of ``repeat`` runs, and the last result and table."""
    best = None
    for _ in range(repeat):
        t0 = time.process_time()
        sep = fn(labels, px, method=method, image=image)
        t1 = time.process_time()
        kw = {"masks": sep.masks} if getattr(sep, "masks", None) is not None else {}
        table = measure(sep.labels, image, px, **kw)
        t2 = time.process_time()
        if best is None or t2 - t0 < best[0] + best[1]:
            best = (t1 - t0, t2 - t1)
    return best, sep, table


def _full_extents(sep):
    """(label, row, col) of every pixel of every particle's full extent."""
    lab = sep.labels
    rows, cols = np.nonzero(lab)
    owned = [np.stack([lab[rows, cols], rows, cols], axis=1)]
    for k, (r0, c0, m) in getattr(sep, "masks", {}).items():
        rr, cc = np.nonzero(m)
        owned.append(np.stack([np.full(rr.size, k), rr + r0, cc + c0], axis=1))
    return np.unique(np.concatenate(owned), axis=0)


def label_diff(a, b):
    """Pixels whose particle differs between two separations of the same frame.

    Each particle of ``a`` is matched with the particle of ``b`` it shares most pixels with
    (numbering may differ); a pixel differs when it is foreground in one only or belongs to
    unmatched particles. Returns (pixels differing in ``labels``, particles of ``a`` touched by
    a difference, pixels differing in the full extents).
    """
    la, lb = a.labels, b.labels
    both = (la > 0) & (lb > 0)
    pairs, counts = np.unique(np.stack([la[both], lb[both]]), axis=1, return_counts=True)
    best = {}
    for (i, j), c in zip(pairs.T, counts):
        if c > best.get(int(i), (0, 0))[1]:
            best[int(i)] = (int(j), c)
    to_b = np.zeros(int(la.max()) + 1, np.int64)
    for i, (j, _) in best.items():
        to_b[i] = j
    wrong = (to_b[la] != lb) & ((la > 0) | (lb > 0))
    touched = np.unique(la[wrong])
    touched = int(np.count_nonzero(touched)) + int(np.any(wrong & (la == 0)))
    ea, eb = _full_extents(a), _full_extents(b)
    ea[:, 0] = to_b[ea[:, 0]]
    view = lambda e: {tuple(r) for r in e.tolist()}  # noqa: E731
    extent = len(view(ea) ^ view(eb))
    return int(wrong.sum()), touched, extent


def compare_frames(fns, frames, method):
    """Print the pixel-level comparison of two ``separate`` versions on ``frames``."""
    for name, (image, px, labels) in frames:
        a, b = (fn(labels, px, method=method, image=image) for fn in fns)
        pixels, touched, extent = label_diff(a, b)
        print(f"    {name}: {int(a.labels.max())} vs {int(b.labels.max())} particles, "
              f"{a.agglomerates} vs {b.agglomerates} agglomerates; {pixels} label pixels "
              f"differ ({touched} particles touched), {extent} full-extent pixels differ",
              flush=True)


# the samples of bench/separate_accuracy.py and the detector each is not usually seen with
CHECK_SAMPLES = {"au10": "bf", "ps100": "haadf", "ps50": "haadf", "ps-bimodal": "haadf",
                 "silica-capsules": "haadf", "au-rods": "bf", "cubes": "bf",
                 "spheres-rods": "bf"}


def check_frames(frames):
    """(name, image, pixel_nm, labels) of the cached separate_accuracy frames for ``--check``.

    The ``frames`` first frames of every sample with its usual detector, the other one and at
    ¼ dose, with the newest labels cached for each (none is segmented here).
    """
    for sample, other in CHECK_SAMPLES.items():
        for tag in ("", f"_{other}", "_d0.25"):
            for k in range(frames):
                images = sorted(p for p in WORK.glob(f"{sample}_1024_0{tag}_{k}.sim-*.npz")
                                if ".seg-" not in p.name)
                if not images:
                    print(f"    {sample}{tag} {k}: not cached, left out")
                    continue
                stem = images[-1].name[:-len(".npz")]
                segs = sorted(WORK.glob(f"{stem}.seg-*.npz"), key=lambda p: p.stat().st_mtime)
                if not segs:
                    print(f"    {sample}{tag} {k}: no labels cached, left out")
                    continue
                data = np.load(images[-1])
                yield (f"{sample}{tag or '_usual'} {k}", data["image"], float(data["pixel_nm"]),
                       np.load(segs[-1])["labels"])


def _same_table(a, b):
    """Names of the columns of two measured tables that differ (NaN equals NaN)."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]),
                                               equal_nan=np.asarray(a[k]).dtype.kind == "f")]


def differences(a, b, table_a, table_b):
    """What differs between two Separations of one frame and their measured tables."""
    out = []
    if not np.array_equal(a.labels, b.labels):
        out.append(f"labels ({int(np.count_nonzero(a.labels != b.labels))} px)")
    if not np.array_equal(a.separated, b.separated):
        out.append("separated")
    if a.agglomerates != b.agglomerates or list(map(tuple, a.agglomerate_boxes)) != list(
            map(tuple, b.agglomerate_boxes)):
        out.append(f"boxes ({a.agglomerates} vs {b.agglomerates})")
    if set(a.masks) != set(b.masks) or any(
            a.masks[k][:2] != b.masks[k][:2] or not np.array_equal(a.masks[k][2], b.masks[k][2])
            for k in a.masks):
        out.append("masks")
    if a.exact != b.exact:
        out.append("exact")
    cols = _same_table(table_a, table_b)
    if cols:
        out.append(f"table columns {cols}")
    return out


def check(rev, frames, method):
    """``--check``: this separate() against ``rev``'s on the cached frames, bit for bit."""
    fns = [("now", separate), (rev, separate_at(rev))]
    spent = {name: 0.0 for name, _ in fns}
    n = bad = 0
    for name, image, px, labels in check_frames(frames):
        results = []
        for version, fn in fns:
            t0 = time.process_time()
            sep = fn(labels, px, method=method, image=image)
            spent[version] += time.process_time() - t0
            results.append((sep, measure(sep.labels, image, px, masks=sep.masks,
                                         exact=sep.exact)))
        diff = differences(results[0][0], results[1][0], results[0][1], results[1][1])
        n += 1
        bad += bool(diff)
        print(f"    {name}: {int(results[0][0].labels.max())} particles, "
              f"{results[0][0].agglomerates} boxes: "
              + ("identical" if not diff else "DIFFERS in " + ", ".join(diff)), flush=True)
    print(f"  {n} frames, {n - bad} identical, {bad} differ; separate CPU "
          f"{spent['now']:.1f} s now vs {spent[rev]:.1f} s at {rev} "
          f"({spent[rev] / max(spent['now'], 1e-9):.2f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="au10,ps-bimodal")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--method", default="uecs")
    parser.add_argument("--compare", default=None, metavar="REV",
                        help="also time analysis/separate.py at this git revision")
    parser.add_argument("--frames", type=int, default=3,
                        help="separate_accuracy frames compared pixel by pixel with --compare")
    parser.add_argument("--detector", default=None,
                        help="bf or haadf for the timed and compared frames (default: the "
                             "sample's)")
    parser.add_argument("--check", default=None, metavar="REV",
                        help="compare with analysis/separate.py at REV on the cached frames")
    args = parser.parse_args(argv)
    if args.check:
        check(args.check, args.frames, args.method)
        return
    versions = [("now", separate)]
    if args.compare:
        versions.append((args.compare, separate_at(args.compare)))
    for sample in args.samples.split(","):
        image, px, labels = cached_frame(sample, args.size, args.seed, args.detector)
        print(f"{sample} {args.size}², {int(labels.max())} regions, method {args.method}, "
              f"best of {args.repeat}")
        first = None
        for name, fn in versions:
            best, sep, table = best_times(fn, image, px, labels, args.method, args.repeat)
            n = len(table["particle_id"])
            first = first or best[0]
            ratio = f", separate {best[0] / first:.2f}x the time of now" if first != best[0] \
                else ""
            print(f"  {name:>10}: {n} particles ({sep.agglomerates} agglomerates); separate "
                  f"{best[0] * 1e3:.0f} ms, measure {best[1] * 1e3:.0f} ms, together "
                  f"{n / sum(best) * 60:,.0f} particles/min on one core{ratio}", flush=True)
        if args.compare:
            from separate_accuracy import frame_at  # bench/ is on the path as a script
            frames = [(f"{args.size}² timed frame", (image, px, labels))]
            for k in range(args.frames):
                f = frame_at(sample, k, size=1024, seed=args.seed, detector=args.detector)
                frames.append((f"1024² frame {k}", f[:3]))
            print(f"  now vs {args.compare}, pixel by pixel:")
            compare_frames([v[1] for v in versions], frames, args.method)


if __name__ == "__main__":
    main()
