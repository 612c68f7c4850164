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
counts, focus images per saved frame and per focus measurement, and the share of saved
frames within the depth of field. Those focus figures are for the frame size given
(``--size``, 512 px by default); weak specimens (PS, silica in bright field) have ~1/4 of
the sharpness SNR there that a 2048 px record has, the size the issue's focus goal is for
(the default of the speed run above).

    python bench/acquisition.py [--sample au10] [--frames 30] [--size 2048] [--autostem]
    python bench/acquisition.py --segments [--positions 100] [--size 512] [--dose-factor 0.25]
        [--run-tiles 12] [--detector bf]
    python bench/acquisition.py --focus [--trials 40] [--size 512] [--dose-factor 0.25]
        [--samples ps50,ps-bimodal] [--detector bf]

``--focus`` measures the autofocus plan alone against the simulator's true focus: at
``--trials`` stage positions per row (alternately sparse, 0.02-0.15 coverage, and medium,
0.15-0.8, each field holding at least two particles), one autofocus started up to 0.5 µm
from true focus; it prints images per autofocus, the share landing within the depth of
field, the median and worst error, per sample, detector and density.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.plans import (FocusSettings, Move, Report, Save, SegmentSettings,
                                             SetMode, Snap, acquire_area, autofocus)
from particlewatch.acquisition.runner import (FrameWriter, execute, frame_name, plan_tiles,
                                              run_acquisition, run_plan)
from particlewatch.acquisition.segments import (check_segments, focus_window,
                                                 particle_region, record_has_particles,
                                                 record_particles, segment_grid)
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
    settings = FocusSettings(span_um=1.2, steps=AUTOSTEM_FOCUS_IMAGES, max_rounds=1,
                             max_images=AUTOSTEM_FOCUS_IMAGES)
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


def _bench_scope(sample, detector, *, size, seed, dose_factor):
    """The simulator for a sample and detector, its dose scaled by ``dose_factor``."""
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    if dose_factor != 1.0:
        scope = SimScope(sample, seed=seed, size_px=size, detector=detector,
                         dose=scope.dose * dose_factor)
    return scope


def _of_kind(scope, x, y, kind) -> bool:
    """Whether ``(x, y)`` is anywhere (kind 0), sparse (1) or of medium density (2)."""
    d = scope.specimen.density(x, y)
    return (kind == 0 or scope.sample.empty or (kind == 1 and 0 < d < 0.15)
            or (kind == 2 and 0.15 <= d < 0.6))


def _survey_positions(scope, n, rng):
    """Stage positions: a third anywhere on the grid, a third sparse, a third medium dense."""
    out = []
    while len(out) < n:
        x, y = rng.uniform(-55, 55, 2)
        if _of_kind(scope, x, y, len(out) % 3):
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
    scope = _bench_scope(sample, detector, size=size, seed=seed, dose_factor=dose_factor)
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
        if _of_kind(scope, x, y, kind):
            return (x - side_um / 2, y - side_um / 2, x + side_um / 2, y + side_um / 2)
    raise RuntimeError("no such area")


def segment_run(sample, detector, *, tiles=12, size=512, seed=0, kind=1, dose_factor=1.0,
                segments=SegmentSettings(), focus=FocusSettings()):
    """One acquisition run (the real plan, frames not written) judged per segment by truth.

    Every survey segment of every visited tile is occupied when a particle's centre lies in
    its stage rectangle; it was acquired when a frame was saved at its centre. A missed
    occupied segment is put down to one cause: ``survey`` (the survey called it empty and
    skipping left it out), ``record_check`` (it was recorded, but the record check saw
    nothing and the frame was not saved) or ``no_focus`` (never recorded although the survey
    saw particles: no focus had been found). Every record frame's check verdict is also
    compared with the truth of its counted part (``false_alarms``: the check saw particles
    in a survey-empty segment whose counted part holds none).

    Returns
    -------
    dict
        ``occupied``, ``missed``, ``causes`` (dict), ``empty``, ``skipped`` (empty, no
        frame), ``recorded`` (record images taken), ``saved``, ``focus_images``,
        ``focus_err_um`` (best-focus error of every saved frame, from the truth),
        ``dof_um``, ``instrument_s``, ``check`` (the plan's ``segment_check`` summary or
        None), ``calibrated_after`` (segments compared when skipping went on; None if it
        never did), ``off_after`` (the same when it went off), ``false_alarms``,
        ``disagreements`` (survey-empty, record check saw particles), ``wall_s``.
    """
    scope = _bench_scope(sample, detector, size=size, seed=seed, dose_factor=dose_factor)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng([seed, 7, kind])
    survey_um = micro.field_of_view_um("survey")[0]
    tiles_list, record, _ = plan_tiles(micro, _run_area(scope, 2.6 * survey_um, rng, kind))
    surveys, saved, recorded_xy, errors = [], [], [], []
    counts = dict(recorded=0, focus_images=0, calibrated_after=None, off_after=None,
                  false_alarms=0, disagreements=0)
    margin = segments.overlap / 2

    def counted_truth(frame) -> bool:
        """Whether a particle centre lies in the record frame's counted part."""
        rows, cols = frame.image.shape
        edge_r, edge_c = max(margin * rows, 8), max(margin * cols, 8)
        return any(edge_c <= p["x_px"] < cols - edge_c and edge_r <= p["y_px"] < rows - edge_r
                   for p in frame.truth["particles"])

    def handle(command):
        match command:
            case Snap(purpose="survey"):
                frame = execute(micro, command)
                surveys.append(frame)
                return True, frame
            case Snap(purpose="record"):
                frame = execute(micro, command)
                counts["recorded"] += 1
                recorded_xy.append((frame.stage_x_um, frame.stage_y_um, frame))
                return True, frame
            case Snap(purpose="focus"):
                counts["focus_images"] += 1
                return False, None
            case Save(frame=frame):
                saved.append((frame.stage_x_um, frame.stage_y_um))
                errors.append(frame.defocus_um - scope.true_focus_um(frame.stage_x_um,
                                                                    frame.stage_y_um))
                return True, None
            case Report(fields=f) if "segment_check_counts" in f:
                c = f["segment_check_counts"]
                judged = c["occupied_checked"] + c["empty_checked"]
                if f["segment_check"] == "on" and counts["calibrated_after"] is None:
                    counts["calibrated_after"] = judged
                if f["segment_check"] == "off" and counts["off_after"] is None:
                    counts["off_after"] = judged
        return False, None

    clock0, t0 = scope.clock_s, time.perf_counter()
    result = run_plan(acquire_area(tiles_list[:tiles], record_field_um=record, focus=focus,
                                   segments=segments, start_defocus_um=micro.defocus(),
                                   limits_um=micro.stage_limits_um), micro, handle=handle)
    wall = time.perf_counter() - t0
    out = dict(occupied=0, missed=0, empty=0, skipped=0, recorded=counts["recorded"],
               saved=len(saved), check=result["segment_check"], wall_s=wall,
               causes={"survey": 0, "record_check": 0, "no_focus": 0},
               focus_images=counts["focus_images"], focus_err_um=np.asarray(errors),
               dof_um=scope.depth_of_field_um, instrument_s=scope.clock_s - clock0,
               calibrated_after=counts["calibrated_after"], off_after=counts["off_after"],
               focus_runs=len(result["focus"]),
               focus_ok=sum(f[3] == "ok" for f in result["focus"]),
               confirmations=result.get("confirmations", 0))
    saved_xy = np.asarray(saved).reshape(-1, 2)
    rec_xy = np.asarray([(x, y) for x, y, _ in recorded_xy]).reshape(-1, 2)
    half_nm = record[0] * 500.0
    limits = micro.stage_limits_um
    for survey in surveys:
        verdicts = check_segments(survey.image, survey.pixel_nm, segment_um=record,
                                  overlap=segments.overlap,
                                  threshold_sigma=segments.threshold_sigma,
                                  min_size_nm=segments.min_size_nm, polarity=segments.polarity)
        rows, cols = survey.image.shape
        for seg in verdicts:
            x = survey.stage_x_um + seg.dx_um
            y = survey.stage_y_um + seg.dy_um
            if not (limits[0] <= x <= limits[2] and limits[1] <= y <= limits[3]):
                continue
            table = scope.specimen.particles_in(x * 1000 - half_nm, y * 1000 - half_nm,
                                                x * 1000 + half_nm, y * 1000 + half_nm)
            # particles_in gives every particle whose bounding box meets the rectangle; a
            # segment is occupied by the particles centred in it (one that only grazes its
            # edge is centred in, and judged with, a neighbouring segment)
            occupied = bool(np.any((np.abs(table["x_nm"] - x * 1000) <= half_nm)
                                   & (np.abs(table["y_nm"] - y * 1000) <= half_nm)))
            near = record[0] / 4
            acquired = bool(len(saved_xy)) and bool(np.any(
                np.hypot(saved_xy[:, 0] - x, saved_xy[:, 1] - y) < near))
            was_recorded = bool(len(rec_xy)) and bool(np.any(
                np.hypot(rec_xy[:, 0] - x, rec_xy[:, 1] - y) < near))
            out["occupied"] += occupied
            out["empty"] += not occupied
            out["skipped"] += (not occupied) and not acquired
            if occupied and not acquired:
                out["missed"] += 1
                cause = ("record_check" if was_recorded else
                         "no_focus" if seg.has_particles else "survey")
                out["causes"][cause] += 1
            if was_recorded and not seg.has_particles:
                frame = next(f for fx, fy, f in recorded_xy if math.hypot(fx - x, fy - y) < near)
                seen = record_has_particles(frame.image, frame.pixel_nm,
                                            bin_px=segments.record_bin_px,
                                            threshold_sigma=segments.threshold_sigma,
                                            min_size_nm=segments.min_size_nm,
                                            polarity=segments.polarity, margin=margin) > 0
                if seen:
                    counts["disagreements"] += 1
                    counts["false_alarms"] += not counted_truth(frame)
    out["false_alarms"] = counts["false_alarms"]
    out["disagreements"] = counts["disagreements"]
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_segment_runs(args) -> None:
    print(f"\nwhole runs of the plan (self-calibrating check): {args.run_tiles} tiles per run, "
          f"{args.size} px, seed {args.seed}, dose x{args.dose_factor:g}; focus within DOF: "
          f"|defocus - true focus| <= depth of field for saved frames; s/frame from the "
          f"simulator's time model (autoSTEM: {AUTOSTEM_S_PER_FRAME:g} s, "
          f"{AUTOSTEM_FOCUS_IMAGES} focus images per frame). foc/fr: focus images per saved "
          f"frame; focus/ok/img/AF: focus measurements, those that found focus, images per "
          f"measurement; conf: confirmation records. Focus is judged on {args.size} px "
          f"frames: the issue's goal (within the depth of field in <= 7 images) is for "
          f"2048 px records, which carry ~4x the sharpness SNR of 512 px ones")
    print(f"{'sample':<16}{'det':<6}{'start':<7}{'occ':>5}{'miss':>5} {'(sur/rec/foc)':<14}"
          f"{'empty':>6}{'skip%':>7}{'saved':>6}{'foc/fr':>7}{'inDOF%':>7}{'|err|p90':>9}"
          f"{'s/fr':>6}{'check':>12}{'calib':>6}{'off@':>5}{'disag':>6}{'false':>6}"
          f"{'focus':>6}{'ok':>4}{'img/AF':>7}{'conf':>5}")
    detectors = (args.detector,) if args.detector else ("bf", "haadf")
    samples = args.samples.split(",") if args.samples else list(SAMPLES)
    for sample in samples:
        for detector in detectors:
            for kind, name in ((1, "sparse"), (2, "medium")):
                r = segment_run(sample, detector, tiles=args.run_tiles, size=args.size,
                                seed=args.seed, kind=kind, dose_factor=args.dose_factor)
                skip = 100.0 * r["skipped"] / r["empty"] if r["empty"] else float("nan")
                c = r["check"] or {}
                n = r["saved"]
                err = np.abs(r["focus_err_um"])
                in_dof = 100.0 * np.mean(err <= r["dof_um"]) if n else float("nan")
                p90 = 1000 * np.percentile(err, 90) if n else float("nan")
                causes = "/".join(str(r["causes"][k]) for k in ("survey", "record_check",
                                                                "no_focus"))
                print(f"{sample:<16}{detector:<6}{name:<7}{r['occupied']:>5}{r['missed']:>5} "
                      f"{'(' + causes + ')':<14}{r['empty']:>6}{skip:>7.1f}{n:>6}"
                      f"{r['focus_images'] / max(n, 1):>7.2f}{in_dof:>7.1f}{p90:>7.0f}nm"
                      f"{r['instrument_s'] / max(n, 1):>6.1f}{c.get('state', '-'):>12}"
                      f"{_fmt(r['calibrated_after'], 'd'):>6}{_fmt(r['off_after'], 'd'):>5}"
                      f"{r['disagreements']:>6}{r['false_alarms']:>6}"
                      f"{r['focus_runs']:>6}{r['focus_ok']:>4}"
                      f"{r['focus_images'] / max(r['focus_runs'], 1):>7.1f}"
                      f"{r['confirmations']:>5}", flush=True)


def focus_trials(sample, detector, *, trials=40, size=512, seed=0, dose_factor=1.0,
                 start_error_um=0.5, settings=FocusSettings(), probe="none"):
    """Autofocus alone against the truth, at sparse and medium-density positions.

    ``probe`` says what comes before the autofocus: ``"none"``; ``"window"``, as the
    acquisition plan does where focus is unknown: a record at the start defocus (counted as
    a focus image), its particles (:func:`~.segments.record_particles`) and a focus run in
    the window around them (:func:`~.segments.focus_window`); ``"region"``: the same
    record, and a focus run on the whole frame measured on that record's particle region
    (``autofocus(region=...)``, :func:`~.segments.particle_region`).

    Returns
    -------
    dict
        ``kind`` (1 sparse, 2 medium), ``images``, ``error_um`` (found minus true focus),
        ``status``, one entry per trial; ``dof_um``.
    """
    scope = _bench_scope(sample, detector, size=size, seed=seed, dose_factor=dose_factor)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng([seed, 7])
    half_nm = scope.field_of_view_um("record") * 500.0 * 0.8
    out = dict(kind=[], images=[], error_um=[], status=[], dof_um=scope.depth_of_field_um)
    while len(out["images"]) < trials:
        x, y = rng.uniform(-50, 50, 2)
        density = scope.specimen.density(x, y)
        kind = 1 + len(out["images"]) % 2
        if not ((kind == 1 and 0.02 < density < 0.15) or (kind == 2 and 0.15 <= density < 0.8)):
            continue
        near = scope.specimen.particles_in(x * 1000 - half_nm, y * 1000 - half_nm,
                                           x * 1000 + half_nm, y * 1000 + half_nm)
        if len(near["x_nm"]) < 2:
            continue
        micro.move_stage(x, y)
        truth = scope.true_focus_um()
        start = truth + rng.uniform(-start_error_um, start_error_um)
        options, extra = {}, 0
        if probe != "none":
            micro.set_defocus(start)
            frame = scope.snap().image
            extra = 1
            if probe == "window":
                peaks, _ = record_particles(frame, scope.pixel_nm())
                options["window"] = focus_window(frame.shape, peaks)
            else:
                options["region"] = particle_region(frame, scope.pixel_nm())
        result = run_plan(autofocus(center_um=start, settings=settings, **options), micro)
        out["kind"].append(kind)
        out["images"].append(result.images + extra)
        out["error_um"].append(result.defocus_um - truth)
        out["status"].append(result.status)
    return {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in out.items()}


def print_focus_trials(args) -> None:
    print(f"autofocus alone vs true focus: {args.trials} trials per row (half sparse, half "
          f"medium), {args.size} px, seed {args.seed}, dose x{args.dose_factor:g}, start up to "
          f"0.5 um off, probe record first: {args.probe}; inDOF: |found - true| <= depth of "
          f"field; img/AF counts the probe")
    print(f"{'sample':<16}{'det':<6}{'img/AF':>7}{'max':>5}{'inDOF%':>8}{'sparse':>8}"
          f"{'medium':>8}{'med|err|nm':>11}{'max nm':>8}{'not ok':>7}{'wall s':>8}")
    detectors = (args.detector,) if args.detector else ("bf", "haadf")
    samples = args.samples.split(",") if args.samples else [s for s in SAMPLES if s != "empty"]
    for sample in samples:
        for detector in detectors:
            t0 = time.perf_counter()
            r = focus_trials(sample, detector, trials=args.trials, size=args.size,
                             seed=args.seed, dose_factor=args.dose_factor, probe=args.probe)
            err = np.abs(r["error_um"])
            ok = err <= r["dof_um"]
            print(f"{sample:<16}{detector:<6}{np.mean(r['images']):>7.1f}"
                  f"{np.max(r['images']):>5d}{100 * np.mean(ok):>8.1f}"
                  f"{100 * np.mean(ok[r['kind'] == 1]):>8.1f}"
                  f"{100 * np.mean(ok[r['kind'] == 2]):>8.1f}"
                  f"{1000 * np.median(err):>11.1f}{1000 * np.max(err):>8.0f}"
                  f"{int(np.sum(r['status'] != 'ok')):>7d}"
                  f"{time.perf_counter() - t0:>8.0f}", flush=True)


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
                        help="dose relative to the sample's default (--segments, --focus)")
    parser.add_argument("--run-tiles", type=int, default=12,
                        help="survey tiles per whole run (--segments)")
    parser.add_argument("--runs-only", action="store_true",
                        help="skip the per-survey table (--segments)")
    parser.add_argument("--samples", default=None,
                        help="comma-separated samples (--segments whole runs, --focus)")
    parser.add_argument("--detector", choices=("bf", "haadf"), default=None,
                        help="only this detector (--segments whole runs, --focus)")
    parser.add_argument("--focus", action="store_true",
                        help="measure the autofocus plan alone against true focus")
    parser.add_argument("--trials", type=int, default=40,
                        help="autofocus trials per sample and detector (--focus)")
    parser.add_argument("--probe", choices=("none", "window", "region"), default="none",
                        help="what precedes each autofocus (--focus; see focus_trials)")
    args = parser.parse_args(argv)
    if args.focus:
        args.size = args.size or 512
        print_focus_trials(args)
        return 0
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
