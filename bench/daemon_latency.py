"""Latency of the live daemon: from a frame's rename into the folder to its ``stats`` message.

For each frame size and worker count a fresh daemon (real analysis, worker processes)
watches an empty folder; simulated au10 frames are renamed in one at a time, and the time
from the rename to the first ``stats`` message that counts the frame is recorded.

With ``--split on`` a frame of at least ``--strip-min-px`` pixels is analysed as horizontal
strips, one per worker, whenever workers would otherwise idle (here always: frames come one
at a time), and merged (:mod:`particlewatch.analysis.strips`); ``off`` analyses every frame
whole in one worker. The ``fallback`` column counts frames whose strips fell back to a whole
analysis (a particle or group larger than the margin on a cut).

Usage: ``python bench/daemon_latency.py [--frames 8] [--sizes 2048 4096] [--workers 1 2]
[--split off on]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _simulated_frames(size: int, n: int, *, seed: int, folder: Path) -> list[Path]:
    from particlewatch.frames import write_frame
    from particlewatch.simulators.scope import SimScope

    scope = SimScope("au10", seed=seed, size_px=size)
    x0, y0, x1, y1 = scope.stage_limits_um
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        scope.move_stage(float(rng.uniform(x0 + 5, x1 - 5)), float(rng.uniform(y0 + 5, y1 - 5)))
        snap = scope.snap()
        paths.append(write_frame(folder / f"frame_{i:05d}.mrc", snap.image, pixel_nm=snap.pixel_nm,
                                 section={"StagePosition": (snap.stage_x_um, snap.stage_y_um),
                                          "Defocus": snap.defocus_um}))
    return paths


def _wait_for(sock, predicate, timeout_s: float):
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if sock.poll(100):
            message = json.loads(sock.recv())
            if predicate(message):
                return message, time.perf_counter()
    raise TimeoutError(f"no matching message within {timeout_s} s")


def measure(size: int, workers: int, sources: list[Path], *, work: Path, split: bool = False,
            strip_min_px: int = 2048 * 2048):
    """Seconds from rename to stats message for each frame in ``sources``; the frames'
    analysis seconds; how many frames fell back from strips to a whole analysis."""
    import zmq

    from particlewatch.daemon.pipeline import Daemon

    folder, out, staging = work / "frames", work / "out", work / "staging"
    for d in (folder, out, staging):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    daemon = Daemon(folder, out, workers=workers, stats_endpoint="tcp://127.0.0.1:0",
                    histogram_interval_s=5.0,
                    strip_min_px=strip_min_px if split else None).start()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(daemon.endpoints["stats"])
    latencies = []
    try:
        while daemon.status().get("workers", 0) < workers:  # worker processes started
            time.sleep(0.1)
        time.sleep(0.5)  # the subscription reaches the daemon
        for i, src in enumerate(sources):
            name = f"frame_{i:05d}.mrc"
            shutil.copy(src, staging / name)
            shutil.copy(str(src) + ".mdoc", staging / (name + ".mdoc"))
            os.rename(staging / (name + ".mdoc"), folder / (name + ".mdoc"))
            t0 = time.perf_counter()
            os.rename(staging / name, folder / name)
            _, t1 = _wait_for(sub, lambda m: m.get("type") == "stats"
                              and m.get("frames_ok", 0) + m.get("frames_failed", 0) >= i + 1,
                              timeout_s=300)
            latencies.append(t1 - t0)
    finally:
        sub.close(linger=0)
        daemon.stop()
    import csv

    with open(out / "frames.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"  warning: {len(failed)} frame(s) failed, e.g. {failed[0]['reason'][:160]}")
    analysis_s = [float(r["seconds"]) for r in rows if r["seconds"]]
    fallbacks = _fallbacks(out)
    return latencies, analysis_s, fallbacks


def _fallbacks(out: Path) -> int:
    """Frames the ledger says were analysed whole after their strips fell back."""
    import sqlite3

    db = sqlite3.connect(out / "ledger.sqlite")
    try:
        results = [json.loads(r) for (r,) in db.execute(
            "SELECT result FROM frames WHERE result IS NOT NULL")]
    finally:
        db.close()
    return sum(any(w.startswith("analysed whole, not in strips") for w in r.get("warnings", []))
               for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--strip-min-px", type=int, default=2048 * 2048)
    args = parser.parse_args()
    print(f"daemon latency, rename -> stats message; {os.cpu_count()} cores; "
          f"{args.frames} frames each, renamed one at a time")
    print(f"{'size':>6} {'workers':>7} {'split':>5} {'median_s':>9} {'p95_s':>7} "
          f"{'max_s':>7} {'analysis_median_s':>18} {'fallback':>8}")
    with tempfile.TemporaryDirectory(prefix="pw-bench-") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            source_dir = work / f"src{size}"
            source_dir.mkdir()
            sources = _simulated_frames(size, args.frames, seed=args.seed, folder=source_dir)
            for workers in args.workers:
                for split in args.split:
                    if split == "on" and workers < 2:
                        continue  # one worker: nothing to split across
                    lat, analysis_s, fallbacks = measure(
                        size, workers, sources, work=work / "run", split=split == "on",
                        strip_min_px=args.strip_min_px)
                    lat = np.array(lat)
                    print(f"{size:>6} {workers:>7} {split:>5} {np.median(lat):>9.3f} "
                          f"{np.percentile(lat, 95):>7.3f} {lat.max():>7.3f} "
                          f"{np.median(analysis_s):>18.3f} {fallbacks:>8}", flush=True)


if __name__ == "__main__":
    main()
