"""Acquisition speed from the simulator's time model, next to autoSTEM's published figures.

Runs the acquisition controller on the simulated scope and prints instrument seconds per
saved frame, focus images per frame, the focus error of the saved frames (from the
simulator's truth) and the compute time. ``--autostem`` also runs an autoSTEM-like scheme
on the same scope model for comparison: a 10-image focus sweep before every frame, frames
saved on the critical path.

``--segments`` instead measures the survey segment check against the simulator's truth for
every sample and both detectors: the share of occupied segments skipped (a segment is
occupied when a particle's centre lies in it; this must be 0) and the share of empty ones
skipped (should be most), over survey positions spread across the grid (a third anywhere,
a third in sparse areas, a third at medium density), with the survey taken up to 0.3 µm
from true focus as the running plan would (the survey detector alone), and then over whole
runs of the acquisition plan (``--run-tiles`` survey tiles per run, one run from a sparse
and one from a medium-density start): occupied segments skipped, empty segments skipped and
the self-calibrating check's final state (``calibrating``, ``on`` or ``off``) with its
counts.

    python bench/acquisition.py [--sample au10] [--frames 30] [--size 2048] [--autostem]
    python bench/acquisition.py --segments [--positions 100] [--size 512] [--dose-factor 0.25]
        [--run-tiles 12] [--detector bf]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.plans import (FocusSettings, Move, Report, Save, SegmentSettings,
                                             SetMode, Snap, acquire_area, autofocus)
from particlewatch.acquisition.runner import (FrameWriter, execute, frame_name, plan_tiles,
                                              run_acquisition, run_plan)
from particlewatch.acquisition.segments import check_segments, segment_grid
from particlewatch.simulators.render import FrameGeometry
from particlewatch.simulators.samples import SAMPLES
from particlewatch.simulators.scope import SimScope

AUTOSTEM_S_PER_FRAME = 30.0  # 136 images in ~4 h (Slater et al. 2020)
AUTOSTEM_FOCUS_IMAGES = 10


def _populated_area(scope, side_um, seed):
    rng = np.random.default_rng(seed)
    for x, y in rng.uniform(-45, 45, (2000, 2)):
        if scope.specimen.density(x, y) > 0.8:
            return (x - side_um / 2, y - side_um / 2, x + side_um / 2, y + side_um / 2)
    raise RuntimeError("no populated area found")


def _focus_errors(out: Path, frames) -> np.ndarray:
    errors = []
    for path in frames:
        truth = json.loads((out / "truth" / (Path(path).stem + ".json")).read_text())
        errors.append(truth["defocus_um"] - truth["true_focus_um"])
    return np.asarray(errors)


def run_ours(args, out: Path):
    scope = SimScope(args.sample, seed=args.seed, size_px=args.size)
    micro = SimulatedMicroscope(scope)
    area = _populated_area(scope, args.side, args.seed)
    t0 = time.perf_counter()
    report = run_acquisition(micro, out, area_um=area, max_frames=args.frames,
                             handle_sigint=False)
    wall = time.perf_counter() - t0
    return report.instrument_s, report.frames_saved, report.focus_images, wall, \
        _focus_errors(out, report.frames), scope.depth_of_field_um, area


def run_autostem_like(args, out: Path, area):
    """autoSTEM's scheme on the same scope model: a 10-image sweep before every frame,
    saved inline (no survey check: every field is recorded)."""
    scope = SimScope(args.sample, seed=args.seed, size_px=args.size)
    micro = SimulatedMicroscope(scope)
    tiles, record, _ = plan_tiles(micro, area, overlap=0.1)
    writer = FrameWriter(out, threaded=False)
    clock0, t0 = scope.clock_s, time.perf_counter()
    micro.set_mode("record")
    n = focus_images = 0
    fov = record[0] * 0.9
    # raster of record fields over the area, x outer and y inner as the released script
    xs = np.arange(area[0] + record[0] / 2, area[2], fov)
    ys = np.arange(area[1] + record[1] / 2, area[3], fov)
    settings = FocusSettings(span_um=1.2, steps=AUTOSTEM_FOCUS_IMAGES, max_rounds=1)
    for x in xs:
        for y in ys:
            if n >= args.frames:
                break
            micro.move_stage(x, y)
            result = run_plan(autofocus(center_um=micro.defocus(), settings=settings), micro)
            focus_images += result.images
            frame = micro.acquire()
            n += 1
            writer.submit(out / frame_name(n), frame)
    writer.close()
    frames = [out / frame_name(i) for i in range(1, n + 1)]
    return scope.clock_s - clock0, n, focus_images, time.perf_counter() - t0, \
        _focus_errors(out, frames)


def _survey_positions(scope, n, rng):
    """Stage positions: a third anywhere on the grid, a third sparse, a third medium dense."""
    out = []
    while len(out) < n:
        x, y = rng.uniform(-55, 55, 2)
        d = scope.specimen.density(x, y)
        kind = len(out) % 3
        if (kind == 0 or scope.sample.empty or (kind == 1 and 0 < d < 0.15)
                or (kind == 2 and 0.15 <= d < 0.6)):
            out.append((float(x), float(y)))
    return out


def segment_rates(sample, detector, *, positions=100, size=512, seed=0, dose_factor=1.0,
                  focus_error_um=0.3):
    """Segment check against the truth: counts of occupied/missed and empty/skipped segments.

    Returns
    -------
    dict
        ``occupied``, ``missed`` (occupied but skipped), ``empty``, ``skipped`` (empty and
        skipped), ``surveys``, ``check_s`` (compute per survey).
    """
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    if dose_factor != 1.0:
        scope = SimScope(sample, seed=seed, size_px=size, detector=detector,
                         dose=scope.dose * dose_factor)
    rng = np.random.default_rng([seed, 99])
    scope.set_mode("survey")
    record = scope.field_of_view_um("record")
    counts = dict(occupied=0, missed=0, empty=0, skipped=0, surveys=0,
                  check_s=0.0)
    for x, y in _survey_positions(scope, positions, rng):
        scope.move_stage(x, y)
        scope.set_defocus(scope.true_focus_um() + rng.uniform(-focus_error_um, focus_error_um))
        snap = scope.snap()
        geom = FrameGeometry(x * 1000.0, y * 1000.0, snap.pixel_nm, size, size)
        table = scope.specimen.particles_in(*geom.bounds_nm())
        cx, cy = geom.to_px(table["x_nm"], table["y_nm"])
        t0 = time.perf_counter()
        segments = check_segments(snap.image, snap.pixel_nm, segment_um=(record, record))
        counts["check_s"] += time.perf_counter() - t0
        counts["surveys"] += 1
        for seg in segments:
            occupied = bool(np.any((cx >= seg.col0 - 0.5) & (cx < seg.col1 - 0.5)
                                   & (cy >= seg.row0 - 0.5) & (cy < seg.row1 - 0.5)))
            counts["occupied"] += occupied
            counts["missed"] += occupied and not seg.has_particles
            counts["empty"] += not occupied
            counts["skipped"] += (not occupied) and not seg.has_particles
    counts["check_s"] /= max(counts["surveys"], 1)
    return counts


def _run_area(scope, side_um, rng, kind):
    """An area whose centre is sparse (kind 1), of medium density (kind 2) or anywhere."""
    for _ in range(20000):
        x, y = rng.uniform(-45, 45, 2)
        d = scope.specimen.density(x, y)
        if (kind == 0 or scope.sample.empty or (kind == 1 and 0 < d < 0.15)
                or (kind == 2 and 0.15 <= d < 0.6)):
            return (x - side_um / 2, y - side_um / 2, x + side_um / 2, y + side_um / 2)
    raise RuntimeError("no such area")


def segment_run(sample, detector, *, tiles=12, size=512, seed=0, kind=1, dose_factor=1.0,
                segments=SegmentSettings()):
    """One acquisition run (the real plan, frames not written) judged per segment by truth.

    Every survey segment of every visited tile is occupied when a particle's centre lies in
    its stage rectangle; it was acquired when a frame was saved at its centre.

    Returns
    -------
    dict
        ``occupied``, ``missed`` (occupied, no frame), ``empty``, ``skipped`` (empty, no
        frame), ``recorded`` (record images taken), ``saved``, ``check`` (the plan's
        ``segment_check`` summary or None), ``wall_s``.
    """
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    if dose_factor != 1.0:
        scope = SimScope(sample, seed=seed, size_px=size, detector=detector,
                         dose=scope.dose * dose_factor)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng([seed, 7, kind])
    survey_um = micro.field_of_view_um("survey")[0]
    tiles_list, record, _ = plan_tiles(micro, _run_area(scope, 2.6 * survey_um, rng, kind))
    surveys, saved = [], []
    counts = dict(recorded=0)

    def handle(command):
        match command:
            case Snap(purpose="survey"):
                frame = execute(micro, command)
                surveys.append(frame)
                return True, frame
            case Snap(purpose="record"):
                counts["recorded"] += 1
                return False, None
            case Save(frame=frame):
                saved.append((frame.stage_x_um, frame.stage_y_um))
                return True, None
        return False, None

    t0 = time.perf_counter()
    result = run_plan(acquire_area(tiles_list[:tiles], record_field_um=record,
                                   segments=segments, start_defocus_um=micro.defocus(),
                                   limits_um=micro.stage_limits_um), micro, handle=handle)
    wall = time.perf_counter() - t0
    out = dict(occupied=0, missed=0, empty=0, skipped=0, recorded=counts["recorded"],
               saved=len(saved), check=result["segment_check"], wall_s=wall)
    saved_xy = np.asarray(saved).reshape(-1, 2)
    half_nm = record[0] * 500.0
    for survey in surveys:
        for _, _, r0, r1, c0, c1 in segment_grid(survey.image.shape, survey.pixel_nm,
                                                 segment_um=record):
            rows, cols = survey.image.shape
            x = survey.stage_x_um + ((c0 + c1) / 2 - cols / 2) * survey.pixel_nm / 1000.0
            y = survey.stage_y_um + ((r0 + r1) / 2 - rows / 2) * survey.pixel_nm / 1000.0
            if not (micro.stage_limits_um[0] <= x <= micro.stage_limits_um[2]
                    and micro.stage_limits_um[1] <= y <= micro.stage_limits_um[3]):
                continue
            table = scope.specimen.particles_in(x * 1000 - half_nm, y * 1000 - half_nm,
                                                x * 1000 + half_nm, y * 1000 + half_nm)
            occupied = len(table["x_nm"]) > 0
            acquired = bool(len(saved_xy)) and bool(np.any(
                np.hypot(saved_xy[:, 0] - x, saved_xy[:, 1] - y) < record[0] / 4))
            out["occupied"] += occupied
            out["missed"] += occupied and not acquired
            out["empty"] += not occupied
            out["skipped"] += (not occupied) and not acquired
    return out


def print_segment_runs(args) -> None:
    print(f"\nwhole runs of the plan (self-calibrating check): {args.run_tiles} tiles per run, "
          f"{args.size} px, seed {args.seed}, dose x{args.dose_factor:g}")
    print(f"{'sample':<17}{'det':<7}{'start':<8}{'occupied':>9}{'missed':>8}{'empty':>7}"
          f"{'skipped %':>10}{'recorded':>9}{'check':>13}  counts (occupied checked / "
          f"missed / survey-empty checked / spot checks)")
    detectors = (args.detector,) if args.detector else ("bf", "haadf")
    for sample in SAMPLES:
        for detector in detectors:
            for kind, name in ((1, "sparse"), (2, "medium")):
                r = segment_run(sample, detector, tiles=args.run_tiles, size=args.size,
                                seed=args.seed, kind=kind, dose_factor=args.dose_factor)
                skip = 100.0 * r["skipped"] / r["empty"] if r["empty"] else float("nan")
                c = r["check"] or {}
                print(f"{sample:<17}{detector:<7}{name:<8}{r['occupied']:>9}{r['missed']:>8}"
                      f"{r['empty']:>7}{skip:>10.1f}{r['recorded']:>9}"
                      f"{c.get('state', '-'):>13}  {c.get('occupied_checked')} / "
                      f"{c.get('missed')} / {c.get('empty_checked')} / {c.get('spot_checks')}",
                      flush=True)


def print_segment_rates(args) -> None:
    print(f"segment check vs truth: {args.positions} surveys per row, {args.size} px, "
          f"seed {args.seed}, dose x{args.dose_factor:g}")
    print(f"{'sample':<17}{'det':<7}{'occupied':>9}{'missed':>8}{'miss %':>8}{'empty':>7}"
          f"{'skipped %':>10}{'check ms':>10}")
    for sample in SAMPLES:
        for detector in ("bf", "haadf"):
            c = segment_rates(sample, detector, positions=args.positions, size=args.size,
                              seed=args.seed, dose_factor=args.dose_factor)
            miss = 100.0 * c["missed"] / c["occupied"] if c["occupied"] else 0.0
            skip = 100.0 * c["skipped"] / c["empty"] if c["empty"] else float("nan")
            print(f"{sample:<17}{detector:<7}{c['occupied']:>9}{c['missed']:>8}{miss:>8.2f}"
                  f"{c['empty']:>7}{skip:>10.1f}"
                  f"{c['check_s'] * 1000:>10.0f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="au10")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=None,
                        help="frame size in px (default 2048; 512 with --segments)")
    parser.add_argument("--side", type=float, default=12.0, help="area side in µm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autostem", action="store_true",
                        help="also run the autoSTEM-like scheme on the same model")
    parser.add_argument("--segments", action="store_true",
                        help="measure the survey segment check (every sample, both detectors)")
    parser.add_argument("--positions", type=int, default=100,
                        help="survey positions per sample and detector (--segments)")
    parser.add_argument("--dose-factor", type=float, default=1.0,
                        help="survey dose relative to the sample's default (--segments)")
    parser.add_argument("--run-tiles", type=int, default=12,
                        help="survey tiles per whole run (--segments)")
    parser.add_argument("--runs-only", action="store_true",
                        help="skip the per-survey table (--segments)")
    parser.add_argument("--detector", choices=("bf", "haadf"), default=None,
                        help="only this detector in the whole-run table (--segments)")
    args = parser.parse_args(argv)
    if args.segments:
        args.size = args.size or 512  # segments are judged per survey; 512 px keeps it quick
        if not args.runs_only:
            print_segment_rates(args)
        print_segment_runs(args)
        return 0
    args.size = args.size or 2048
    with tempfile.TemporaryDirectory() as tmp:
        instrument, frames, focus, wall, errors, dof, area = run_ours(args, Path(tmp) / "ours")
        print(f"sample {args.sample}, {args.size} px frames, seed {args.seed}, "
              f"area {tuple(round(float(v), 1) for v in area)} µm")
        print(f"{'scheme':<22}{'s/frame':>9}{'focus img/frame':>17}{'|focus err| med/max nm':>25}"
              f"{'compute s/frame':>17}")
        print(f"{'autoSTEM (published)':<22}{AUTOSTEM_S_PER_FRAME:>9.1f}"
              f"{AUTOSTEM_FOCUS_IMAGES:>17.1f}{'–':>25}{'–':>17}")
        rows = [("particlewatch", instrument, frames, focus, wall, errors)]
        if args.autostem:
            rows.append(("autoSTEM-like (model)",
                         *run_autostem_like(args, Path(tmp) / "autostem", area)))
        for name, inst, n, f, w, err in rows:
            err_nm = np.abs(err) * 1000
            print(f"{name:<22}{inst / n:>9.1f}{f / n:>17.2f}"
                  f"{np.median(err_nm):>12.1f} / {np.max(err_nm):<10.1f}{w / n:>17.2f}")
        print(f"depth of field {dof * 1000:.0f} nm; frames saved {frames}; instrument time "
              f"{instrument:.0f} s for {frames} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
