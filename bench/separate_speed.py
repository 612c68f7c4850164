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
Run ``python bench/separate_speed.py [--samples au10,ps-bimodal] [--size 2048] [--method uecs]
[--compare REV] [--frames 3] [--detector bf|haadf]``.
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


def cached_frame(sample, size, seed):
    """(image, pixel_nm, labels) of the analysis_speed frame, segmented once.

    Cached under the simulator's source tag and the labels under segment.py's (see
    ``separate_accuracy.frame_at``), so either changing re-makes what depends on it.
    """
    from separate_accuracy import cached_labels, sim_tag  # bench/ is on the path as a script
    stem = f"speed_{sample}_{size}_{seed}.sim-{sim_tag()}"
    path = WORK / f"{stem}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        scope = SimScope(sample, seed=seed, size_px=size)
        scope.move_stage(3.0, -2.0)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        for old in WORK.glob(f"speed_{sample}_{size}_{seed}.*npz"):
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
                        help="bf or haadf for the compared frames (default: the sample's)")
    args = parser.parse_args(argv)
    versions = [("now", separate)]
    if args.compare:
        versions.append((args.compare, separate_at(args.compare)))
    for sample in args.samples.split(","):
        image, px, labels = cached_frame(sample, args.size, args.seed)
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
