"""Acquisition controller: plans, focus, tiling, segment check, runner, stopping, navigator.

Everything runs against the simulated scope at 512 px and is checked against its truth
(true focus, depth of field, particle positions), never against numbers copied from a run.
Focus accuracy (within the depth of field) is tested at 512 px on au10, whose focus signal is
strong at that size; the weak polystyrene samples have ~1/4 of the band-sharpness SNR of a
2048 px record there, and their focus figures are in ``bench/acquisition.py``.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pytest

from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.focus import (FocusModel, fit_gaussian, gaussian, noise_floor,
                                             sharpness)
from particlewatch.acquisition.navigator import NavPosition, read_navigator, write_navigator
from particlewatch.acquisition.plans import (Checkpoint, FocusSettings, Move, Save, SetDefocus,
                                             SetMode, Snap, autofocus, quick_focus)
from particlewatch.acquisition.protocol import Frame, Microscope, MicroscopeError
from particlewatch.acquisition.runner import (next_frame_number, plan_tiles, run_acquisition,
                                              run_plan)
from particlewatch.acquisition.segments import check_segments, segment_grid
from particlewatch.acquisition.stopping import parse_stream_message, says_converged
from particlewatch.acquisition.tiling import normalize_area, serpentine
from particlewatch.frames import mdoc_frame_meta, read_mdoc
from particlewatch.simulators.scope import SimScope

SIZE = 512


def _scope(sample="au10", seed=0):
    return SimScope(sample, seed=seed, size_px=SIZE)


def _populated_positions(scope, n, *, seed, min_density=0.5):
    """Stage positions where the specimen has particles (chosen from the simulator's map)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        x, y = rng.uniform(-50, 50, 2)
        if scope.specimen.density(x, y) >= min_density:
            out.append((float(x), float(y)))
    return out


# --- focus ---------------------------------------------------------------------------------

def test_sharpness_is_highest_at_true_focus_and_zero_for_noise():
    scope = _scope()
    scope.move_stage(*_populated_positions(scope, 1, seed=1)[0])
    focus = scope.true_focus_um()
    values = {}
    for offset in (-0.4, -0.1, 0.0, 0.1, 0.4):
        scope.set_defocus(focus + offset)
        values[offset] = sharpness(scope.snap().image)
    assert max(values, key=values.get) == 0.0
    assert values[-0.4] < values[-0.1] and values[0.4] < values[0.1]
    noise = np.random.default_rng(0).poisson(100, (SIZE, SIZE))
    assert abs(sharpness(noise)) < 3 * noise_floor(noise.shape)
    assert sharpness(np.full((64, 64), 7.0)) == 0.0


def test_fit_gaussian_recovers_a_known_peak_and_rejects_flat_data():
    x = np.linspace(-0.6, 0.6, 7)
    fit = fit_gaussian(x, gaussian(x, 0.137, 0.25, 2.0, 0.5))
    assert fit.ok and fit.center == pytest.approx(0.137, abs=1e-6)
    assert fit.sigma == pytest.approx(0.25, rel=1e-4)
    assert not fit_gaussian(x, np.ones(7)).ok
    with pytest.raises(ValueError, match="length"):
        fit_gaussian(x[:3], x[:3])


def test_focus_model_fits_a_plane_and_falls_back_to_nearest():
    model = FocusModel()
    assert model.predict(0, 0) is None
    model.add(0, 0, 0.1)
    assert model.predict(5, 5) == 0.1
    for x, y in [(10, 0), (0, 10), (10, 10)]:
        model.add(x, y, 0.1 + 0.003 * x - 0.002 * y)
    assert model.predict(20, 30) == pytest.approx(0.1 + 0.06 - 0.06)


def test_autofocus_plan_yields_at_most_seven_images_per_sweep_without_hardware():
    """Step through the plan by hand: a fake sharpness that peaks at 0.23 µm."""
    plan = autofocus(center_um=0.0, settings=FocusSettings(span_um=1.2, steps=7),
                     metric=lambda image: float(image[0, 0]))
    defocus, images, commands = 0.0, 0, []
    reply = None
    try:
        while True:
            command = plan.send(reply)
            commands.append(command)
            reply = None
            if isinstance(command, SetDefocus):
                defocus = command.defocus_um
            elif isinstance(command, Snap):
                images += 1
                value = 0.01 + np.exp(-0.5 * ((defocus - 0.23) / 0.2) ** 2)
                reply = Frame(np.full((64, 64), value), 1.0, "record", 0, 0, defocus, 1e4, 1)
    except StopIteration as done:
        result = done.value
    assert result.status == "ok" and result.images == images == 7
    assert result.defocus_um == pytest.approx(0.23, abs=1e-3)
    sweep = [c.defocus_um for c in commands if isinstance(c, SetDefocus)][:7]
    np.testing.assert_allclose(sweep, np.linspace(-0.6, 0.6, 7))
    assert commands[-1] == SetDefocus(result.defocus_um)  # leaves the scope at best focus


def test_autofocus_lands_within_depth_of_field_at_many_positions():
    scope = _scope(seed=3)
    micro = SimulatedMicroscope(scope)
    errors, images = [], []
    for x, y in _populated_positions(scope, 10, seed=3):
        micro.move_stage(x, y)
        micro.set_defocus(0.0)
        result = run_plan(autofocus(center_um=0.0), micro)
        assert result.status == "ok"
        errors.append(scope.defocus() - scope.true_focus_um())
        images.append(result.images)
    assert np.max(np.abs(errors)) < scope.depth_of_field_um, errors
    assert np.median(images) <= 7


def test_autofocus_shifts_the_sweep_when_focus_is_outside_it():
    scope = _scope(seed=4)
    micro = SimulatedMicroscope(scope)
    micro.move_stage(*_populated_positions(scope, 1, seed=4)[0])
    result = run_plan(autofocus(center_um=scope.true_focus_um() + 1.5), micro)
    assert result.status == "ok" and len(result.sweeps) > 1
    assert abs(result.defocus_um - scope.true_focus_um()) < scope.depth_of_field_um


def test_autofocus_reports_an_empty_area():
    scope = _scope("empty", seed=1)
    result = run_plan(autofocus(center_um=0.0), SimulatedMicroscope(scope))
    assert result.status == "empty"


def test_quick_focus_uses_three_images_near_a_good_prediction():
    scope = _scope(seed=5)
    micro = SimulatedMicroscope(scope)
    for k, (x, y) in enumerate(_populated_positions(scope, 4, seed=5)):
        micro.move_stage(x, y)
        predicted = scope.true_focus_um() + (0.04 if k % 2 else -0.04)
        result = run_plan(quick_focus(predicted_um=predicted, step_um=0.2), micro)
        assert result.method == "quick" and result.images == 3
        assert abs(result.defocus_um - scope.true_focus_um()) < scope.depth_of_field_um


# --- tiling ----------------------------------------------------------------------------------

def test_serpentine_rows_alternate_and_stay_inside_limits():
    limits = (-10.0, -10.0, 10.0, 10.0)
    tiles = serpentine((-30, 4, 3.5, -9), field_um=(2.0, 2.0), step_um=(1.8, 1.8),
                       limits_um=limits)
    rows = sorted({t.row for t in tiles})
    assert len(rows) > 2
    for row in rows:
        xs = [t.x_um for t in tiles if t.row == row]
        assert xs == sorted(xs, reverse=row % 2 == 1)  # even rows +x, odd rows -x
        assert np.allclose(np.diff(sorted(xs)), 1.8)
    ys = [t.y_um for t in tiles]
    assert ys == sorted(ys)
    assert all(limits[0] <= t.x_um <= limits[2] and limits[1] <= t.y_um <= limits[3]
               for t in tiles)
    # the fields cover the clipped area
    x_min, y_min, x_max, y_max = normalize_area((-30, 4, 3.5, -9), limits)
    assert min(t.x_um for t in tiles) - 1.0 <= x_min and max(t.x_um for t in tiles) + 1.0 >= x_max
    assert min(ys) - 1.0 <= y_min and max(ys) + 1.0 >= y_max
    # consecutive tiles are neighbours: no long return moves
    steps = [np.hypot(b.x_um - a.x_um, b.y_um - a.y_um) for a, b in zip(tiles, tiles[1:])]
    assert max(steps) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="outside the stage limits"):
        serpentine((20, 20, 30, 30), field_um=(1, 1), step_um=(1, 1), limits_um=limits)


def test_plan_tiles_spacing_comes_from_the_record_field_and_overlap():
    micro = SimulatedMicroscope(_scope())
    tiles, record, step = plan_tiles(micro, (0, 0, 5, 5), overlap=0.1)
    assert record == micro.field_of_view_um("record")
    n = int((micro.field_of_view_um("survey")[0] - record[0]) // (0.9 * record[0])) + 1
    assert step[0] == pytest.approx(n * 0.9 * record[0])
    assert len(tiles) > 1


# --- segment check ---------------------------------------------------------------------------

def _truth_occupied(bounds, particles):
    r0, r1, c0, c1 = bounds
    return any(c0 - 0.5 <= p["x_px"] < c1 - 0.5 and r0 - 0.5 <= p["y_px"] < r1 - 0.5
               for p in particles)


@pytest.mark.parametrize("sample", ["au10", "cubes", "ps100"])
def test_segment_check_never_skips_particles_and_skips_most_empty_segments(sample):
    scope = _scope(sample, seed=6)
    rng = np.random.default_rng(6)
    occupied = missed = empty = skipped = 0
    shots = 0
    while shots < 6:
        x, y = rng.uniform(-55, 55, 2)
        # sparse areas, where the check matters, plus some dense ones
        if shots % 3 != 2 and not 0 < scope.specimen.density(x, y) < 0.15:
            continue
        shots += 1
        scope.move_stage(x, y)
        scope.set_defocus(scope.true_focus_um())
        scope.set_mode("survey")
        snap = scope.snap()
        record = scope.field_of_view_um("record")
        for seg in check_segments(snap.image, snap.pixel_nm, segment_um=(record, record)):
            truth = _truth_occupied((seg.row0, seg.row1, seg.col0, seg.col1),
                                    snap.truth["particles"])
            occupied += truth
            missed += truth and not seg.has_particles
            empty += not truth
            skipped += (not truth) and not seg.has_particles
    assert occupied > 20 and empty > 10
    assert missed == 0
    assert skipped >= 0.8 * empty


def test_segment_grid_covers_the_survey_with_record_sized_overlapping_segments():
    grid = segment_grid((600, 600), 10.0, segment_um=(1.0, 1.0), overlap=0.1)
    assert len(grid) == 36  # (6000 nm - 1000) / 900 + 1 = 6 per axis
    widths = {c1 - c0 for _, _, _, _, c0, c1 in grid}
    assert widths == {100}
    assert [c for r, c, *_ in grid[:12]] == list(range(6)) + list(range(5, -1, -1))


# --- runner ----------------------------------------------------------------------------------

def test_simulated_backend_satisfies_the_protocol():
    assert isinstance(SimulatedMicroscope(_scope()), Microscope)


def test_acquisition_saves_in_focus_frames_of_occupied_segments(tmp_path):
    scope = _scope(seed=7)
    micro = SimulatedMicroscope(scope)
    x, y = _populated_positions(scope, 1, seed=7, min_density=1.0)[0]
    states = []
    report = run_acquisition(micro, tmp_path, area_um=(x - 1, y - 1, x + 1, y + 1),
                             max_frames=12, on_state=states.append, handle_sigint=False)
    assert report.frames_saved == 12 and report.stop_reason == "max_frames"
    for path in report.frames:
        assert path.exists() and (path.parent / (path.name + ".mdoc")).exists()
        truth = json.loads((tmp_path / "truth" / (path.stem + ".json")).read_text())
        assert truth["particles"], f"{path.name} was recorded without particles"
        assert abs(truth["defocus_um"] - truth["true_focus_um"]) < scope.depth_of_field_um
        meta = mdoc_frame_meta(read_mdoc(str(path) + ".mdoc"))
        assert meta["pixel_nm"] == pytest.approx(micro.pixel_nm("record"))
        assert meta["stage_x_um"] == pytest.approx(truth["stage_x_um"], abs=1e-3)
        assert meta["defocus_um"] == pytest.approx(truth["defocus_um"], abs=1e-4)
        assert meta["magnification"] and meta["exposure_s"] and meta["datetime"]
    assert [p.name for p in report.frames][:2] == ["frame_00001.mrc", "frame_00002.mrc"]
    assert states[-1]["frames_saved"] == 12 and states[-1]["state"] == "stopped"
    assert {"stage_x_um", "defocus_um", "tile", "tiles", "skipped_segments",
            "focus_images"} <= set(states[-1])
    assert report.focus_images_per_frame < 7
    description = json.loads(report.description_path.read_text())
    assert description["max_frames"] == 12 and description["focus"]["steps"] == FocusSettings().steps
    # the navigator lists the acquired positions and pyserialem reads it
    from pyserialem import read_nav_file

    items = read_nav_file(str(report.nav_path))
    assert [i.tag for i in items] == [p.stem for p in report.frames]
    assert items[0].stage_x == pytest.approx(mdoc_frame_meta(
        read_mdoc(str(report.frames[0]) + ".mdoc"))["stage_x_um"], abs=1e-3)


def test_stop_request_ends_the_run_after_the_current_frame(tmp_path):
    scope = _scope(seed=8)
    micro = SimulatedMicroscope(scope)
    x, y = _populated_positions(scope, 1, seed=8, min_density=1.0)[0]
    event = threading.Event()
    seen = []

    def on_state(state):
        seen.append(state["frames_saved"])
        if state["frames_saved"] == 3:
            event.set()

    report = run_acquisition(micro, tmp_path, area_um=(x - 2, y - 2, x + 2, y + 2),
                             stop=event, on_state=on_state, handle_sigint=False)
    assert report.stop_reason == "stop_requested" and report.frames_saved == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.endswith(".mrc")] == [f"frame_0000{i}.mrc" for i in (1, 2, 3)]
    assert not [n for n in names if n.startswith(".")]  # no half-written files
    # a second run continues the numbering and the navigator
    again = run_acquisition(micro, tmp_path, area_um=(x - 2, y - 2, x + 2, y + 2),
                            max_frames=2, handle_sigint=False)
    assert [p.name for p in again.frames] == ["frame_00004.mrc", "frame_00005.mrc"]
    assert next_frame_number(tmp_path) == 6
    assert [p.label for p in read_navigator(again.nav_path)][-1] == "frame_00005"
    assert (tmp_path / "acquisition_2.json").exists()


def test_ctrl_c_stops_cleanly_after_the_current_frame(tmp_path):
    scope = _scope(seed=9)
    micro = SimulatedMicroscope(scope)
    x, y = _populated_positions(scope, 1, seed=9, min_density=1.0)[0]

    def on_state(state):
        if state["frames_saved"] == 2 and state["stop_reason"] is None:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    report = run_acquisition(micro, tmp_path, area_um=(x - 2, y - 2, x + 2, y + 2),
                             on_state=on_state, stop=lambda: False)
    assert report.stop_reason == "interrupted" and report.frames_saved == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_converged_message_on_the_stats_stream_stops_the_run(tmp_path):
    import zmq

    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()

    def publish():
        # full state, repeated: a late subscriber still hears it (slow joiner)
        while not done.wait(0.02):
            pub.send(b"\x80\x04 not json")
            pub.send_json({"schema_version": 1, "type": "stats", "converged": False})
            pub.send_json({"schema_version": 1, "type": "converged", "populations": []})

    scope = _scope(seed=10)
    micro = SimulatedMicroscope(scope)
    x, y = _populated_positions(scope, 1, seed=10, min_density=1.0)[0]
    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        report = run_acquisition(micro, tmp_path, area_um=(x - 3, y - 3, x + 3, y + 3),
                                 stop_on=f"tcp://127.0.0.1:{port}", handle_sigint=False,
                                 max_frames=200)
    finally:
        done.set()
        thread.join()
        pub.close()
    assert report.stop_reason == "converged"
    assert report.frames_saved < 200


def test_stream_messages_are_validated():
    assert parse_stream_message(b'{"schema_version": 2, "type": "converged"}') is None
    assert parse_stream_message(b'[1, 2]') is None
    assert parse_stream_message(b'{"schema_version": 1, "type": "pickle"}') is None
    assert says_converged(parse_stream_message(b'{"schema_version": 1, "type": "converged"}'))
    assert not says_converged(parse_stream_message(
        b'{"schema_version": 1, "type": "stats", "converged": "yes"}'))


def test_navigator_round_trip_through_pyserialem(tmp_path):
    positions = [NavPosition("frame_00001", 1.5, -2.25, note="defocus = 0.1"),
                 NavPosition("frame_00002", 3.0, 4.0)]
    path = write_navigator(tmp_path / "p.nav", positions)
    back = read_navigator(path)
    assert [(p.label, p.x_um, p.y_um) for p in back] == [(p.label, p.x_um, p.y_um)
                                                         for p in positions]
    assert "LastSavedAs = " + str(path) in path.read_text()
    with pytest.raises(ValueError, match="label"):
        write_navigator(tmp_path / "q.nav", [NavPosition("bad label", 0, 0)])


def test_moving_outside_the_stage_limits_is_a_microscope_error():
    micro = SimulatedMicroscope(_scope())
    x1 = micro.stage_limits_um[2]
    with pytest.raises(MicroscopeError, match="cannot move stage"):
        micro.move_stage(x1 + 1, 0)


def test_cli_acquire_simulated_and_serialem_without_module(tmp_path, capsys, monkeypatch):
    from particlewatch import cli
    from particlewatch.acquisition import cli as acquire_cli

    # small frames keep the test fast; the CLI itself builds the default 2048 px scope
    monkeypatch.setattr(acquire_cli, "make_scope", lambda args: SimulatedMicroscope(
        SimScope(args.sample, seed=args.seed, size_px=256)))
    code = cli.main(["acquire", "--backend", "simulated", "--out", str(tmp_path / "run"),
                     "--area=-2,-2,2,2", "--max-frames", "2", "--seed", "1"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("frame_*.mrc")) == [
        "frame_00001.mrc", "frame_00002.mrc"]
    assert "2 frames" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setitem(__import__("sys").modules, "serialem", None)  # import fails
    code = cli.main(["acquire", "--backend", "serialem", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "serialem" in err


def test_cli_acquire_detector_option_reaches_the_backend():
    from particlewatch import cli
    from particlewatch.acquisition import cli as acquire_cli

    parser = cli.build_parser()
    args = parser.parse_args(["acquire", "--out", "x", "--sample", "ps50", "--detector", "haadf"])
    assert acquire_cli.make_scope(args).detector == "haadf"
    args = parser.parse_args(["acquire", "--out", "x", "--sample", "ps50"])
    assert acquire_cli.make_scope(args).detector == SimScope("ps50").detector


# --- self-calibrating segment check over whole runs -------------------------------------------

def _segment_run(sample, *, detector=None, tiles=4, size=256, seed=0, sparse=True,
                 segments=None):
    """Run the acquisition plan (no disk) over an area and judge every survey segment by truth.

    Returns (counts, check summary, reports): a segment is occupied when a particle's centre
    lies in its stage rectangle, acquired when a frame was saved at its centre.
    """
    from particlewatch.acquisition.plans import Report, acquire_area
    from particlewatch.acquisition.runner import execute

    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng(seed)
    while True:
        x, y = rng.uniform(-40, 40, 2)
        d = scope.specimen.density(x, y)
        if (0 < d < 0.15) if sparse else (0.15 <= d < 0.6):
            break
    side = 2.6 * micro.field_of_view_um("survey")[0]
    tile_list, record, _ = plan_tiles(micro, (x - side / 2, y - side / 2, x + side / 2,
                                              y + side / 2))
    surveys, saved, reports = [], [], []

    def handle(command):
        if isinstance(command, Snap) and command.purpose == "survey":
            frame = execute(micro, command)
            surveys.append(frame)
            return True, frame
        if isinstance(command, Save):
            saved.append((command.frame.stage_x_um, command.frame.stage_y_um))
            return True, None
        if isinstance(command, Report):
            reports.append(dict(command.fields))
        return False, None

    options = {} if segments is None else {"segments": segments}
    result = run_plan(acquire_area(tile_list[:tiles], record_field_um=record,
                                   start_defocus_um=micro.defocus(),
                                   limits_um=micro.stage_limits_um, **options),
                      micro, handle=handle)
    counts = dict(occupied=0, missed=0, empty=0, skipped=0)
    xy = np.asarray(saved).reshape(-1, 2)
    half_nm = record[0] * 500.0
    for survey in surveys:
        rows, cols = survey.image.shape
        for _, _, r0, r1, c0, c1 in segment_grid(survey.image.shape, survey.pixel_nm,
                                                 segment_um=record):
            sx = survey.stage_x_um + ((c0 + c1) / 2 - cols / 2) * survey.pixel_nm / 1000.0
            sy = survey.stage_y_um + ((r0 + r1) / 2 - rows / 2) * survey.pixel_nm / 1000.0
            table = scope.specimen.particles_in(sx * 1000 - half_nm, sy * 1000 - half_nm,
                                                sx * 1000 + half_nm, sy * 1000 + half_nm)
            # particles_in gives every particle whose bounding box meets the rectangle; a
            # segment is occupied by the particles centred in it (one that only grazes its
            # edge is centred in, and judged with, a neighbouring segment)
            occupied = bool(np.any((np.abs(table["x_nm"] - sx * 1000) <= half_nm)
                                   & (np.abs(table["y_nm"] - sy * 1000) <= half_nm)))
            acquired = len(xy) > 0 and bool(np.any(np.hypot(xy[:, 0] - sx, xy[:, 1] - sy)
                                                  < record[0] / 4))
            counts["occupied"] += occupied
            counts["missed"] += occupied and not acquired
            counts["empty"] += not occupied
            counts["skipped"] += (not occupied) and not acquired
    return counts, result["segment_check"], reports


@pytest.mark.parametrize("sparse", [False, True])
def test_weak_sample_switches_the_segment_check_off_and_skips_no_occupied_segment(sparse):
    # PS50 in bright field: ~4 survey pixels across, as faint as the film texture. A sparse
    # start is where focus cannot be found before the first particles are recorded: no
    # segment may be left out for want of focus either.
    counts, check, reports = _segment_run("ps50", detector="bf", tiles=4, sparse=sparse)
    assert counts["occupied"] > 20
    assert counts["missed"] == 0, counts
    assert check["state"] == "off" and check["missed"] >= 1
    notes = [r["segment_check_note"] for r in reports if r.get("segment_check") == "off"]
    assert notes and "looked empty in the survey" in notes[0]


def test_strong_sample_keeps_skipping_empty_segments_and_never_skips_occupied_ones():
    counts, check, _ = _segment_run("au10", tiles=12, sparse=True)
    assert counts["empty"] > 20
    assert counts["missed"] == 0, counts
    assert check["state"] == "on" and check["occupied_checked"] >= 59
    assert counts["skipped"] >= 0.8 * counts["empty"], counts


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_bimodal_mixture_never_skips_an_occupied_segment(detector):
    counts, check, _ = _segment_run("ps-bimodal", detector=detector, tiles=6)
    assert counts["occupied"] > 20
    assert counts["missed"] == 0, (counts, check)


@pytest.mark.parametrize("detector,polarity", [("bf", "dark"), ("haadf", "bright")])
def test_a_blank_record_is_no_proof_of_an_empty_field_near_faint_particles(detector,
                                                                           polarity):
    # PS50 beside PS100: the survey sees the PS100 and misses PS50, which the record check
    # finds only barely (some PS50 records look blank to it). With the particles' contrast
    # known, no film alarm of the other sign switches the check off early, so segments are
    # decided on the record check's word: a blank record where the survey saw particles and
    # has missed some must be kept, never counted as an empty segment (truth decides).
    from particlewatch.acquisition.plans import SegmentSettings

    counts, check, _ = _segment_run("ps-bimodal", detector=detector, tiles=6,
                                    segments=SegmentSettings(polarity=polarity))
    assert counts["occupied"] > 20
    assert check["particles_missed"] > 0  # the survey did miss faint particles here
    assert counts["missed"] == 0, (counts, check)


def test_segment_check_calibration_bounds_and_switches():
    from particlewatch.acquisition.segments import (SegmentCheckCalibration,
                                                    miss_rate_upper_bound)

    # zero misses in n: 1 - 0.05**(1/n); ~3/n
    assert miss_rate_upper_bound(0, 59) == pytest.approx(1 - 0.05 ** (1 / 59))
    assert miss_rate_upper_bound(0, 0) == 1.0
    cal = SegmentCheckCalibration(spot_check_every=3)
    for _ in range(58):
        assert cal.add(survey_occupied=True, record_occupied=True) == "calibrating"
        assert cal.record_anyway()  # every segment is recorded while calibrating
    assert cal.add(survey_occupied=True, record_occupied=True) == "on"
    assert [cal.record_anyway() for _ in range(6)] == [False, False, True] * 2
    assert cal.add(survey_occupied=False, record_occupied=True) == "off"
    assert cal.record_anyway() and "1 of 60 occupied segments looked empty" in cal.note()


# --- focus curve: noise-weighted fit with sanity checks, band sharpness ------------------------

def test_fit_focus_curve_recovers_the_centre_from_noisy_flanks_and_checks_itself():
    from particlewatch.acquisition.focus import fit_focus_curve, focus_curve

    rng = np.random.default_rng(2)
    x = np.linspace(-0.6, 0.6, 7) + 0.05  # lopsided around the peak on purpose
    errors = []
    for _ in range(20):
        y = focus_curve(x, 0.013, 0.3, 1.0, 0.1, 0.7) + rng.normal(0, 0.01, x.size)
        fit = fit_focus_curve(x, y, 0.01)
        assert fit.ok, fit
        errors.append((fit.center - 0.013) / fit.center_sd)
    # the reported standard error is honest: the errors scatter by about one of it
    assert 0.4 < np.std(errors) < 2.0, errors
    assert fit_focus_curve(x, 0.5 + rng.normal(0, 0.01, x.size), 0.01).reason == "flat"
    edge = focus_curve(x, 0.9, 0.3, 1.0, 0.1, 0.7)  # peak beyond the sweep
    assert fit_focus_curve(x, edge, 0.01).reason == "edge"
    # with the shape known, three points fix the centre
    three = np.array([-0.2, 0.0, 0.2])
    fit = fit_focus_curve(three, focus_curve(three, 0.04, 0.3, 1.0, 0.1, 0.7), 0.005,
                          width=0.3, power=0.7)
    assert fit.ok and fit.center == pytest.approx(0.04, abs=1e-4)


@pytest.mark.parametrize("sample", ["ps100", "au10"])
def test_band_sharpness_peaks_at_true_focus_and_estimates_its_noise(sample):
    from particlewatch.acquisition.focus import band_sharpness

    scope = _scope(sample, seed=2)
    scope.move_stage(*_populated_positions(scope, 1, seed=2, min_density=0.5)[0])
    focus = scope.true_focus_um()
    values = {}
    for offset in (-0.6, -0.3, 0.0, 0.3, 0.6):
        scope.set_defocus(focus + offset)
        values[offset] = [band_sharpness(scope.snap().image) for _ in range(4)]
    mean = {k: np.mean([v for v, _ in vs]) for k, vs in values.items()}
    assert max(mean, key=mean.get) == 0.0
    assert mean[-0.6] < mean[-0.3] < mean[0.0] > mean[0.3] > mean[0.6]
    measured = np.std([v for v, _ in values[0.0]], ddof=1)
    estimated = np.mean([sd for _, sd in values[0.0]])
    assert measured < 3 * estimated
    blank = np.random.default_rng(0).poisson(100, (SIZE, SIZE))
    v, sd = band_sharpness(blank)
    assert abs(v) < 4 * sd


def test_quick_focus_with_a_known_curve_shape_recovers_from_an_off_prediction():
    """A sweep fixes the focus curve's shape; a quick check 0.15 µm off (beyond a flank)
    still lands within the depth of field of the simulator's true focus in <= 7 images."""
    scope = _scope(seed=6)
    micro = SimulatedMicroscope(scope)
    positions = _populated_positions(scope, 4, seed=6, min_density=0.6)
    micro.move_stage(*positions[0])
    sweep = run_plan(autofocus(center_um=scope.true_focus_um() + 0.3), micro)
    assert sweep.status == "ok" and np.isfinite(sweep.power)
    for k, (x, y) in enumerate(positions[1:]):
        micro.move_stage(x, y)
        predicted = scope.true_focus_um() + (0.15 if k % 2 else -0.15)
        result = run_plan(quick_focus(predicted_um=predicted, step_um=sweep.width_um,
                                      power=sweep.power), micro)
        assert result.status == "ok" and result.images <= 7, result
        assert abs(result.defocus_um - scope.true_focus_um()) < scope.depth_of_field_um


@pytest.mark.parametrize("repeats", [False, True])
def test_a_record_check_alarm_needs_a_confirmation_record_to_switch_skipping_off(repeats):
    """On an empty specimen, the first record of a survey-empty segment shows a dark blob
    (a false alarm of the record check, e.g. a contamination speck that comes and goes).
    A confirmation record is taken: if the blob is gone, the segment check keeps
    calibrating; if it is there again (particles), the check goes off. The frame with the
    blob is saved either way (never left out)."""
    import dataclasses

    from particlewatch.acquisition.plans import Report, acquire_area
    from particlewatch.acquisition.runner import execute
    from particlewatch.acquisition.tiling import Tile

    scope = SimScope("empty", seed=1, size_px=256)
    micro = SimulatedMicroscope(scope)
    record = micro.field_of_view_um("record")
    records, saved = [], []

    def blob(frame):
        image = frame.image.astype(np.float64)
        rr, cc = np.mgrid[:image.shape[0], :image.shape[1]]
        disc = np.hypot(rr - image.shape[0] / 2, cc - image.shape[1] / 2) < 12
        image[disc] *= 0.4  # a dark (bright-field) particle-like disc in the counted part
        return dataclasses.replace(frame, image=image.astype(frame.image.dtype))

    def handle(command):
        if isinstance(command, Snap) and command.purpose == "record":
            frame = execute(micro, command)
            records.append(frame)
            if len(records) == 1 or (repeats and len(records) == 2):
                frame = blob(frame)
            return True, frame
        if isinstance(command, Save):
            saved.append(command.frame)
            return True, None
        if isinstance(command, Report):
            return True, None
        return False, None

    result = run_plan(acquire_area([Tile(0, 0, 0, 0.0, 0.0)], record_field_um=record,
                                   limits_um=micro.stage_limits_um), micro, handle=handle)
    check = result["segment_check"]
    assert result["confirmations"] == 1
    assert check["state"] == ("off" if repeats else "calibrating"), check
    assert check["missed"] == (1 if repeats else 0)
    # the first record (with the blob) is kept: its darkest pixels are in the saved frames
    assert any(f.image.min() < 0.6 * np.median(f.image) for f in saved)


def test_focus_model_never_extrapolates_a_plane_steeper_than_a_specimen():
    # three measurements a few tenths of a µm apart, one 0.3 µm off: the plane through them
    # has a slope of ~1 µm/µm and would predict focus tens of µm off 30 µm away
    model = FocusModel()
    for x, y, f in [(0.0, 0.0, 0.0), (0.3, 0.0, 0.3), (0.0, 0.3, 0.0)]:
        model.add(x, y, f, sd_um=0.01)
    assert abs(model.predict(30.0, 0.0)) <= 0.3  # the nearest measurement, not the plane
    assert model.uncertainty_um(30.0, 0.0, measurement_sd_um=0.01, max_slope=0.01) > 0.2
    gentle = FocusModel()
    for x, y in [(0.0, 0.0), (5.0, 0.0), (0.0, 5.0)]:
        gentle.add(x, y, 0.02 * x - 0.01 * y, sd_um=0.01)
    assert gentle.predict(10.0, 10.0) == pytest.approx(0.1)


# --- weak specimens: focus around the particles; per-particle calibration; film alarms --------

def _sparse_weak_position(scope, rng, *, max_density=0.3):
    """A stage position of a sparse area whose record field holds a few particles."""
    scope.set_mode("record")
    while True:
        x, y = rng.uniform(-45, 45, 2)
        if not 0 < scope.specimen.density(x, y) < max_density:
            continue
        scope.move_stage(x, y)
        n = len(scope.snap(noise=False).truth["particles"])
        if 3 <= n <= 20:
            return float(x), float(y)


def test_local_sharpness_has_more_snr_than_the_whole_frame_on_sparse_weak_frames():
    from particlewatch.acquisition.focus import band_sharpness, local_band_sharpness
    from particlewatch.acquisition.segments import particle_region

    scope = _scope("ps50")
    rng = np.random.default_rng(5)
    local_snr, band_snr = [], []
    for _ in range(4):
        _sparse_weak_position(scope, rng)
        focus = scope.true_focus_um()
        scope.set_defocus(focus)
        sharp = scope.snap()
        region = particle_region(sharp.image, sharp.pixel_nm)
        assert region is not None and region.mean() < 0.3
        v_in, sd_in = local_band_sharpness(sharp.image, region)
        b_in, bsd_in = band_sharpness(sharp.image)
        scope.set_defocus(focus + 0.3)
        far = scope.snap().image
        v_out, sd_out = local_band_sharpness(far, region)
        b_out, bsd_out = band_sharpness(far)
        # the drop from focus to 0.3 µm off, in units of its noise
        local_snr.append((v_in - v_out) / np.hypot(sd_in, sd_out))
        band_snr.append((b_in - b_out) / np.hypot(bsd_in, bsd_out))
    assert min(local_snr) > 3.0, local_snr
    assert np.median(local_snr) > 2.0 * np.median(band_snr), (local_snr, band_snr)


def test_local_sharpness_noise_estimate_is_honest_on_repeated_exposures():
    from particlewatch.acquisition.focus import local_band_sharpness
    from particlewatch.acquisition.segments import particle_region

    scope = _scope("ps100")
    _sparse_weak_position(scope, np.random.default_rng(8))
    scope.set_defocus(scope.true_focus_um() + 0.05)
    region = particle_region(scope.snap().image, scope.pixel_nm())
    values = np.array([local_band_sharpness(scope.snap().image, region) for _ in range(12)])
    # repeated exposures scatter by about the estimated noise (not 3x more or less)
    ratio = np.std(values[:, 0], ddof=1) / np.median(values[:, 1])
    assert 0.5 < ratio < 2.0, ratio


def test_autofocus_on_a_sparse_weak_sample_lands_within_the_depth_of_field():
    scope = _scope("ps100")
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng(21)
    errors = []
    for _ in range(4):
        _sparse_weak_position(scope, rng)
        focus = scope.true_focus_um()
        start = focus + rng.uniform(-0.2, 0.2)
        micro.set_mode("record")
        result = run_plan(autofocus(center_um=start, settings=FocusSettings()), micro)
        assert result.status == "ok", result
        errors.append(result.defocus_um - focus)
    assert np.mean(np.abs(errors) <= scope.depth_of_field_um) >= 0.75, errors


def test_survey_detections_counts_particles_the_survey_saw_and_missed():
    from particlewatch.acquisition.segments import (peaks_inside, record_particles,
                                                    survey_detections, survey_segments)

    scope = _scope("au10")
    x, y = _populated_positions(scope, 1, seed=4, min_density=0.3)[0]
    scope.move_stage(x, y)
    scope.set_defocus(scope.true_focus_um())
    scope.set_mode("survey")
    survey = scope.snap()
    record_um = scope.field_of_view_um("record")
    segments, labels = survey_segments(survey.image, survey.pixel_nm,
                                       segment_um=(record_um, record_um))
    seg = max(segments, key=lambda s: s.particles)
    assert seg.has_particles
    scope.set_mode("record")
    scope.move_stage(survey.stage_x_um + seg.dx_um, survey.stage_y_um + seg.dy_um)
    frame = scope.snap()
    peaks, objects = record_particles(frame.image, frame.pixel_nm)
    assert len(peaks) and len(objects) == len(peaks)
    checked, missed = survey_detections(labels, survey.pixel_nm, seg, peaks, objects,
                                        frame.image.shape, frame.pixel_nm)
    assert checked > 0 and missed <= checked // 4, (checked, missed)
    # a survey that saw nothing missed every particle it is asked about
    checked, missed = survey_detections(np.zeros_like(labels), survey.pixel_nm, seg, peaks,
                                        objects, frame.image.shape, frame.pixel_nm)
    assert checked > 0 and missed == checked

    # only particles with a peak in the counted part are trials: a peak in the border band
    # (a corner's beam-profile residue, a particle cut by the edge) that no survey object
    # covers is not a miss, one in the middle is
    rows, cols = frame.image.shape
    inside = peaks_inside(peaks, frame.image.shape, margin=0.05)
    counted = survey_detections(np.zeros_like(labels), survey.pixel_nm, seg, peaks, objects,
                                frame.image.shape, frame.pixel_nm, margin=0.05)
    assert 0 < counted[0] <= len(inside) and counted[1] == counted[0]
    corner = np.vstack([peaks, [[2, 2]]])
    extra = np.append(objects, objects.max() + 1)
    assert survey_detections(labels, survey.pixel_nm, seg, corner, extra, frame.image.shape,
                             frame.pixel_nm, margin=0.05) == survey_detections(
        labels, survey.pixel_nm, seg, peaks, objects, frame.image.shape, frame.pixel_nm,
        margin=0.05)
    middle = np.vstack([peaks, [[rows // 2, cols // 2]]])
    hidden = labels.copy()
    r0, c0 = (seg.row0 + seg.row1) // 2, (seg.col0 + seg.col1) // 2
    hidden[r0 - 3:r0 + 4, c0 - 3:c0 + 4] = 0  # the survey saw nothing at the middle
    checked1, missed1 = survey_detections(hidden, survey.pixel_nm, seg, middle, extra,
                                          frame.image.shape, frame.pixel_nm, margin=0.05)
    assert missed1 >= 1 and checked1 >= 1


def test_calibration_turns_skipping_on_from_particles_and_not_with_a_particle_missed():
    from particlewatch.acquisition.segments import SegmentCheckCalibration

    cal = SegmentCheckCalibration()
    states = [cal.add(survey_occupied=True, record_occupied=True, particles_checked=8)
              for _ in range(10)]
    # 80 particles seen, none missed: the per-particle miss rate is below 5% at 95%
    assert states[:9] == ["calibrating"] * 9 and states[9] == "on"
    missed = SegmentCheckCalibration()
    for _ in range(10):
        missed.add(survey_occupied=True, record_occupied=True, particles_checked=8,
                   particles_missed=1)
    assert missed.state == "calibrating"
    few = SegmentCheckCalibration()  # one crowded frame alone never decides
    assert few.add(survey_occupied=True, record_occupied=True,
                   particles_checked=500) == "calibrating"
    with pytest.raises(ValueError):
        few.add(survey_occupied=True, record_occupied=True, particles_checked=1,
                particles_missed=2)


def test_film_only_tells_bare_film_from_particles():
    # the segmentation's film test is a second opinion, not perfect on bare film (its
    # strongest mottle can stand out); it must never call a frame with particles film
    from particlewatch.acquisition.segments import film_only

    rng = np.random.default_rng(3)
    for detector in ("bf", "haadf"):
        empty = SimScope("empty", seed=3, size_px=SIZE, detector=detector)
        cubes = SimScope("cubes", seed=3, size_px=SIZE, detector=detector)
        empty.set_mode("record")
        cubes.set_mode("record")
        bare = []
        for x, y in rng.uniform(-50, 50, (8, 2)):
            empty.move_stage(x, y)
            empty.set_defocus(empty.true_focus_um())
            frame = empty.snap()
            bare.append(film_only(frame.image, frame.pixel_nm))
        assert np.mean(bare) >= 0.6, (detector, bare)
        for x, y in _populated_positions(cubes, 3, seed=6, min_density=0.3):
            cubes.move_stage(x, y)
            cubes.set_defocus(cubes.true_focus_um())
            frame = cubes.snap()
            inside = [p for p in frame.truth["particles"] if not p["touches_edge"]]
            assert inside, "the simulator changed: pick new positions"
            assert not film_only(frame.image, frame.pixel_nm), (detector, x, y)
