"""ParticleSpy vs particlewatch on the same simulated frames, in one run.

Creates ``bench/.venv-particlespy`` (gitignored) with ``pip install particlespy`` the first
time (ParticleSpy is never a particlewatch dependency), simulates frames with particlewatch's
simulator, runs ParticleSpy's pipeline (Li threshold, watershed, its own properties) in that
environment and particlewatch's analysis (``analyze_image``: segment, separate, measure) here, and prints seconds per frame,
the speed ratio and each tool's recall and median ECD error against the ground truth.
Usage: ``python bench/vs_particlespy.py [--sample au10] [--frames 3] [--size 1024]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-particlespy"
WORK = HERE / "_work" / "vs_particlespy"

# Runs inside the ParticleSpy environment: frames in, particle centres and ECDs out (JSON).
RUNNER = r'''
import json, sys, time
import numpy as np
import hyperspy.api as hs
import particlespy.api as ps
out = []
for path, pixel_nm, dark in json.load(open(sys.argv[1])):
    image = np.load(path).astype(float)
    sig = hs.signals.Signal2D(image)
    for ax in sig.axes_manager.signal_axes:
        ax.scale, ax.units = pixel_nm, "nm"
    params = ps.parameters()
    params.generate(threshold="li", watershed=True, watershed_size=5, invert=bool(dark),
                    min_size=20, rb_kernel=0, gaussian=1)
    t0 = time.perf_counter()
    plist = ps.particle_analysis(sig, params)
    seconds = time.perf_counter() - t0
    rows = [(p.properties["y"]["value"] / pixel_nm, p.properties["x"]["value"] / pixel_nm,
             p.properties["equivalent circular diameter"]["value"]) for p in plist.list]
    out.append({"seconds": seconds, "particles": rows})
json.dump(out, open(sys.argv[2], "w"))
'''


def ensure_venv():
    """Create the ParticleSpy environment; return its python, or raise RuntimeError(why)."""
    python = VENV / "bin" / "python"
    if python.exists():
        check = subprocess.run([str(python), "-c", "import particlespy.api"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            return python
    venv.create(VENV, with_pip=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "particlespy"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError("pip install particlespy failed: "
                           + (pip.stderr.strip().splitlines() or ["no output"])[-1])
    check = subprocess.run([str(python), "-c", "import particlespy.api"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError("particlespy installed but does not import: "
                           + (check.stderr.strip().splitlines() or ["no output"])[-1])
    return python


def simulate(sample, frames, size, seed):
    from particlewatch.simulators.scope import SimScope
    scope = SimScope(sample, seed=seed, size_px=size)
    x0, y0, x1, y1 = scope.stage_limits_um
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < frames:
        scope.move_stage(*rng.uniform([x0 + 5, y0 + 5], [x1 - 5, y1 - 5]))
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        if len(frame.truth["particles"]) >= 3:
            out.append(frame)
    return out


def score(xs, ys, ecds, truth):
    """Recall and median |ECD error| over isolated whole truth particles (matched by centre)."""
    px = truth["pixel_nm"]
    xs, ys, ecds = (np.asarray(v, float) for v in (xs, ys, ecds))
    hits, errors, total = 0, [], 0
    for p in truth["particles"]:
        if p["touches_edge"] or p["overlaps"]:
            continue
        total += 1
        if xs.size == 0:
            continue
        d = np.hypot(xs - p["x_px"], ys - p["y_px"])
        j = int(np.argmin(d))
        if d[j] <= 0.35 * p["ecd_nm"] / px:
            hits += 1
            errors.append(abs(ecds[j] / p["ecd_nm"] - 1.0))
    return hits, total, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="au10")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from particlewatch.analysis.pipeline import analyze_image

    frames = simulate(args.sample, args.frames, args.size, args.seed)
    WORK.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, f in enumerate(frames):
        path = WORK / f"frame_{i:03d}.npy"
        np.save(path, f.image)
        jobs.append((str(path), f.pixel_nm, f.truth["detector"] == "bf"))
    (WORK / "jobs.json").write_text(json.dumps(jobs))

    pw = {"seconds": 0.0, "hits": 0, "total": 0, "errors": []}
    for f in frames:
        t0 = time.perf_counter()
        table, _, _ = analyze_image(f.image, f.pixel_nm)  # what `analyze` and the daemon run
        pw["seconds"] += time.perf_counter() - t0
        h, t, e = score(table["x_px"], table["y_px"], table["ecd_nm"], f.truth)
        pw["hits"] += h; pw["total"] += t; pw["errors"] += e

    try:
        python = ensure_venv()
    except (RuntimeError, OSError) as exc:
        print(f"ParticleSpy could not be installed ({exc}); particlewatch alone:")
        python = None
    psy = None
    if python is not None:
        run = subprocess.run([str(python), "-c", RUNNER, str(WORK / "jobs.json"),
                              str(WORK / "particlespy.json")], capture_output=True, text=True)
        if run.returncode != 0:
            print("ParticleSpy failed: " + (run.stderr.strip().splitlines() or ["?"])[-1])
        else:
            psy = {"seconds": 0.0, "hits": 0, "total": 0, "errors": []}
            for f, res in zip(frames, json.loads((WORK / "particlespy.json").read_text())):
                psy["seconds"] += res["seconds"]
                rows = np.array(res["particles"]).reshape(-1, 3)
                h, t, e = score(rows[:, 0], rows[:, 1], rows[:, 2], f.truth)
                psy["hits"] += h; psy["total"] += t; psy["errors"] += e

    n = len(frames)
    print(f"sample {args.sample}, {n} frames of {args.size}², isolated particles scored")
    print(f"{'tool':<14} {'s/frame':>8} {'recall':>7} {'median |ECD err|':>17}")
    for name, r in (("particlewatch", pw), ("ParticleSpy", psy)):
        if r is None:
            continue
        med = np.median(r["errors"]) if r["errors"] else float("nan")
        print(f"{name:<14} {r['seconds'] / n:>8.2f} {r['hits'] / max(r['total'], 1):>7.3f} "
              f"{med * 100:>16.1f}%")
    if psy is not None and pw["seconds"] > 0:
        print(f"speed ratio (ParticleSpy time / particlewatch time): "
              f"{psy['seconds'] / pw['seconds']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
