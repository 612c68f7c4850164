"""Speed of the analysis: the core on one frame, whole frames in processes, and the daemon.

Prints, for each sample:

1. milliseconds per 2048² and 4096² frame (segment, separate, measure; wall and CPU) and
   particles per minute on one core;
2. whole-frame analysis (read the MRC + .mdoc, segment, separate, measure) of saved frames with
   one and with two worker processes;
3. end to end, as a microscopist gets it: the live daemon (2 worker processes) on a folder the
   frames are dropped into, from the first frame in to the last one in ``frames.csv``: wall
   seconds per frame, particles/min, the workers' and the daemon's CPU seconds per frame and
   particles per CPU-minute (on a shared machine wall figures count other people's work too;
   CPU figures and the ratios within one run do not).

The goal of issue 4 is ≥ 30,000 particles/min on the 2-core machine (the daemon, 2 workers).
Run ``python bench/analysis_speed.py`` (au10 and ps-bimodal: 32 min at load 5, about half
that on a quiet 2-core machine) or ``--quick`` (au10, 2 frames per figure, 4 in the daemon:
5 min at load 5, 150 CPU-seconds, so under 3 min quiet). ``--folder DIR`` times the
daemon on your own frames instead (MRC/TIFF/... with their ``.mdoc``). The frames come from the
simulator; rendering time is not counted.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from particlewatch.analysis.measure import measure
from particlewatch.analysis.pipeline import analyze_frame
from particlewatch.analysis.segment import segment
from particlewatch.analysis.separate import separate
from particlewatch.frames import write_frame
from particlewatch.simulators.scope import SimScope


def _frame(sample, size, seed):
    scope = SimScope(sample, seed=seed, size_px=size)
    scope.move_stage(3.0, -2.0)
    scope.set_defocus(scope.true_focus_um())
    return scope.snap()


def _time_one(frame, repeat):
    best = None
    for _ in range(repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        labels = segment(frame.image, frame.pixel_nm)
        t1, c1 = time.perf_counter(), time.process_time()
        sep = separate(labels, frame.pixel_nm, method="uecs", image=frame.image)
        t2, c2 = time.perf_counter(), time.process_time()
        table = measure(sep.labels, frame.image, frame.pixel_nm, masks=sep.masks)
        t3, c3 = time.perf_counter(), time.process_time()
        # CPU seconds too: on a shared machine wall time also counts other people's work
        times = (t1 - t0, t2 - t1, t3 - t2, c1 - c0, c2 - c1, c3 - c2, t3 - t0)
        if best is None or times[-1] < best[-1]:
            best = times
    return best, len(table["particle_id"])


def _count_particles(path):
    """Particles of the frame at ``path`` and the CPU seconds its analysis took."""
    start = time.process_time()
    result = analyze_frame(path, keep_image=False)
    if result.status != "ok":
        raise RuntimeError(result.reason)
    return result.n_particles, time.process_time() - start


def _throughput(paths, workers):
    """Wall seconds, particles and CPU seconds for analysing ``paths`` with ``workers``
    processes."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_count_particles, paths[:workers]))  # start-up and imports not counted
        start = time.perf_counter()
        counts = list(pool.map(_count_particles, paths))
        return (time.perf_counter() - start, sum(n for n, _ in counts),
                sum(c for _, c in counts))


def _save_frames(sample, size, n, seed, folder):
    scope = SimScope(sample, seed=seed, size_px=size)
    x0, y0 = 3.0, -2.0
    step = scope.field_of_view_um() * 1.2
    paths = []
    for i in range(n):
        scope.move_stage(x0 + step * (i % 3), y0 + step * (i // 3))
        scope.set_defocus(scope.true_focus_um())
        snap = scope.snap()
        path = Path(folder) / f"frame_{i:05d}.mrc"
        write_frame(path, snap.image, pixel_nm=snap.pixel_nm, section=snap.mdoc_section())
        paths.append(str(path))
    return paths


def _proc_cpu_s(pid):
    """CPU seconds (user + system) of process ``pid`` so far, from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_run(paths, workers, work):
    """Drop ``paths`` (with their .mdoc) into a folder a fresh daemon watches; time it.

    Returns
    -------
    dict
        ``wall_s`` (first frame in to last result recorded), ``frames``, ``failed``,
        ``particles``, ``worker_cpu_s`` and ``daemon_cpu_s`` (None where /proc is missing),
        ``analysis_s`` (the analysis' own wall seconds summed over frames).
    """
    from particlewatch.daemon.pipeline import Daemon

    folder, out, staging = work / "frames", work / "out", work / "staging"
    for d in (folder, out, staging):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for p in paths:  # copied beside the folder first: only the renames are on the clock
        for src in (Path(p), Path(str(p) + ".mdoc")):
            if src.exists():
                shutil.copy(src, staging / src.name)
    daemon = Daemon(folder, out, workers=workers, stats_endpoint="tcp://127.0.0.1:0").start()
    try:
        while daemon.status().get("workers", 0) < workers:  # worker processes are up
            time.sleep(0.1)
        pids = [proc.pid for proc in daemon._procs]
        cpu0 = [_proc_cpu_s(pid) for pid in pids]
        own0, t0 = time.process_time(), time.perf_counter()
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: not n.endswith(".mdoc")):  # .mdoc first
            os.rename(staging / name, folder / name)
        if not daemon.wait_idle(3600, frames=len(paths)):
            raise RuntimeError("the daemon did not finish the frames within an hour")
        wall = time.perf_counter() - t0
        own = time.process_time() - own0
        cpu1 = [_proc_cpu_s(pid) for pid in pids]
    finally:
        daemon.stop()
    with open(out / "frames.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    worker_cpu = (None if None in cpu0 + cpu1
                  else sum(b - a for a, b in zip(cpu0, cpu1)))
    return {"wall_s": wall, "frames": len(rows), "failed": len(rows) - len(ok),
            "particles": sum(int(r["particles"]) for r in ok), "worker_cpu_s": worker_cpu,
            "daemon_cpu_s": own, "analysis_s": sum(float(r["seconds"] or 0) for r in rows)}


def _print_daemon(paths, workers, label):
    with tempfile.TemporaryDirectory(prefix="pw-speed-daemon-") as tmp:
        r = _daemon_run(paths, workers, Path(tmp))
    n = max(r["frames"], 1)
    wall_rate = r["particles"] / r["wall_s"] * 60
    print(f"\nthe daemon, {workers} worker processes, {n} frames ({label}) dropped at once:")
    print(f"  wall {r['wall_s'] / n:.2f} s/frame, {wall_rate:,.0f} particles/min "
          f"({r['particles']} particles, {r['failed']} failed)")
    if r["worker_cpu_s"] is not None:
        cpu = r["worker_cpu_s"] + r["daemon_cpu_s"]
        print(f"  CPU per frame: workers {r['worker_cpu_s'] / n:.2f} s, daemon "
              f"{r['daemon_cpu_s'] / n:.3f} s ({r['daemon_cpu_s'] / cpu:.1%} of all); "
              f"{r['particles'] / cpu * 60:,.0f} particles per CPU-minute, so "
              f"{r['particles'] / cpu * 60 * (os.cpu_count() or 1):,.0f}/min on "
              f"{os.cpu_count()} idle cores")
        print(f"  cores busy: {cpu / r['wall_s']:.2f} of {os.cpu_count()} "
              f"(below {min(workers, os.cpu_count() or 1)}: the machine is shared or the "
              f"daemon idles)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="au10,ps-bimodal",
                        help="simulator samples, comma-separated")
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=6,
                        help="frames for the 1- and 2-process throughput (0: skip it)")
    parser.add_argument("--daemon-frames", type=int, default=8,
                        help="frames for the daemon, end to end (0: skip it)")
    parser.add_argument("--folder", default=None,
                        help="time the daemon on the frames of this folder instead")
    parser.add_argument("--quick", action="store_true",
                        help="first sample only, 1 repeat, 2 frames per throughput figure")
    args = parser.parse_args(argv)
    samples = args.sample.split(",")
    if args.quick:
        samples, args.repeat = samples[:1], 1
        args.frames, args.daemon_frames = min(args.frames, 2), min(args.daemon_frames, 4)
    if args.folder:
        paths = sorted(str(p) for p in Path(args.folder).iterdir()
                       if p.is_file() and not p.name.endswith(".mdoc"))
        paths = paths[:args.daemon_frames or None]
        _print_daemon(paths, 2, f"from {args.folder}")
        return
    for sample in samples:
        _bench_sample(sample, args)
    print("\ngoal: >= 30,000 particles/min on this 2-core machine (the daemon, 2 workers)")


def _bench_sample(sample, args):
    print(f"\n== {sample}: best of {args.repeat}, one process (one core)")
    print(f"{'frame':>10} {'particles':>9} {'segment ms':>10} {'separate ms':>11} "
          f"{'measure ms':>10} {'CPU ms: seg/sep/meas':>21} {'total ms':>9} "
          f"{'particles/min':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        frame = _frame(sample, size, args.seed)
        (seg, sep, mea, c_seg, c_sep, c_mea, tot), n = _time_one(frame, args.repeat)
        rate = n / tot * 60 if tot > 0 else float("nan")
        cpu = f"{c_seg * 1e3:.0f}/{c_sep * 1e3:.0f}/{c_mea * 1e3:.0f}"
        print(f"{size:>5}x{size:<4} {n:>9d} {seg * 1e3:>10.0f} {sep * 1e3:>11.0f} "
              f"{mea * 1e3:>10.0f} {cpu:>21} {tot * 1e3:>9.0f} {rate:>13.0f}", flush=True)
    n_saved = max(args.frames, args.daemon_frames)
    if n_saved <= 0:
        return
    size = int(args.sizes.split(",")[0])
    with tempfile.TemporaryDirectory() as folder:
        paths = _save_frames(sample, size, n_saved, args.seed, folder)
        if args.frames > 0:
            print(f"\nwhole frames from disk ({args.frames} x {size}², read + analyse):")
            print(f"{'processes':>9} {'particles':>9} {'s/frame':>8} {'particles/min':>13} "
                  f"{'CPU s/frame':>11} {'particles/CPU-min':>17}")
            for workers in (1, 2):
                seconds, n, cpu = _throughput(paths[:args.frames], workers)
                print(f"{workers:>9d} {n:>9d} {seconds / args.frames:>8.2f} "
                      f"{n / seconds * 60:>13.0f} {cpu / args.frames:>11.2f} "
                      f"{n / cpu * 60:>17.0f}", flush=True)
        if args.daemon_frames > 0:
            _print_daemon(paths[:args.daemon_frames], 2, f"{sample} {size}²")


if __name__ == "__main__":
    main()
