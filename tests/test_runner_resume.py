"""A resumed round or run goes on where the last one stopped: no tile surveyed twice, the
focus model and the segment check's calibration carried over, every frame saved once."""

import json
import math
import shutil

import numpy as np

from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.runner import run_acquisition
from particlewatch.frames import mdoc_frame_meta, read_mdoc
from particlewatch.simulators.scope import SimScope


class _Logged(SimulatedMicroscope):
    """The simulated backend, remembering where each survey image was taken."""

    def __init__(self, scope):
        super().__init__(scope)
        self.surveys: list[tuple[float, float]] = []

    def acquire(self):
        frame = super().acquire()
        if frame.mode == "survey":
            self.surveys.append((round(frame.stage_x_um, 3), round(frame.stage_y_um, 3)))
        return frame


def _area(seed=8):
    scope = SimScope("au10", seed=seed, size_px=512)
    rng = np.random.default_rng(seed)
    while True:  # a populated place on the simulated grid
        x, y = rng.uniform(-40, 40, 2)
        if scope.specimen.density(x, y) >= 1.0:
            break
    return (x - 3, y - 3, x + 3, y + 3)


def _positions(folder):
    return [(m["stage_x_um"], m["stage_y_um"]) for m in
            (mdoc_frame_meta(read_mdoc(p)) for p in sorted(folder.glob("frame_*.mrc.mdoc")))]


def _assert_saved_once(folder, n, field_um):
    names = sorted(p.name for p in folder.glob("frame_*.mrc"))
    assert names == [f"frame_{i:05d}.mrc" for i in range(1, n + 1)]
    xy = _positions(folder)
    for i in range(len(xy)):
        for j in range(i):
            assert math.dist(xy[i], xy[j]) >= 0.5 * field_um, (i, j)


def test_next_round_surveys_no_tile_twice_and_keeps_focus_and_calibration(tmp_path):
    area = _area()
    scope = _Logged(SimScope("au10", seed=8, size_px=512))
    field_um = min(scope.field_of_view_um("record"))
    first = run_acquisition(scope, tmp_path / "a", area_um=area, max_frames=6,
                            handle_sigint=False)
    assert first.frames_saved == 6 and first.stop_reason == "max_frames"
    assert first.tiles_visited < first.tiles  # stopped inside the area
    surveyed_first = len(scope.surveys)
    carried = first.progress
    calibration = dict(carried.calibration.summary())
    focus_points = len(carried.model)
    assert focus_points > 0
    # the session's next round: same microscope, the progress handed on
    second = run_acquisition(scope, tmp_path / "a", area_um=area, max_frames=6,
                             handle_sigint=False, progress=carried)
    assert second.frames_saved == 6
    assert len(scope.surveys) == len(set(scope.surveys)), "a tile was surveyed twice"
    assert second.survey_images == len(scope.surveys) - surveyed_first
    _assert_saved_once(tmp_path / "a", 12, field_um)
    # the calibration went on from its counts, and the focus model from its points
    after = second.progress.calibration
    assert after.occupied + after.empty_checked >= (calibration["occupied_checked"]
                                                    + calibration["empty_checked"])
    assert len(second.progress.model) >= focus_points

    # the same second round without what the first did (frames and positions.nav only, as
    # before progress was carried): it surveys the first round's tiles again and has to
    # find focus from nothing
    shutil.copytree(tmp_path / "a", tmp_path / "b",
                    ignore=lambda d, names: [n for n in names if n.startswith("acquisition")])
    fresh_scope = _Logged(SimScope("au10", seed=8, size_px=512))
    fresh = run_acquisition(fresh_scope, tmp_path / "b", area_um=area, max_frames=6,
                            handle_sigint=False)
    assert set(fresh_scope.surveys) & set(scope.surveys[:surveyed_first])
    assert second.focus_images < fresh.focus_images


def test_resumed_run_reads_what_was_done_from_acquisition_json(tmp_path):
    area = _area()
    scope = _Logged(SimScope("au10", seed=8, size_px=512))
    field_um = min(scope.field_of_view_um("record"))
    # a tile holds ~36 record segments here: 40 frames finish the first and stop in the next
    first = run_acquisition(scope, tmp_path, area_um=area, max_frames=40, handle_sigint=False)
    done = set(first.progress.tiles_done)
    assert done, "the first run should finish at least one tile"
    saved = json.loads(first.description_path.read_text())["progress"]
    assert saved["tiles_done"] == sorted(done)
    # a restart: a fresh microscope and process, the same folder
    again_scope = _Logged(SimScope("au10", seed=8, size_px=512))
    again = run_acquisition(again_scope, tmp_path, area_um=area, max_frames=6,
                            handle_sigint=False)
    # only the tile the first run stopped in is surveyed again (its survey was not kept)
    again_done_surveys = set(again_scope.surveys) & set(scope.surveys)
    assert len(again_done_surveys) <= 1
    assert again.survey_images <= first.tiles - len(done)
    assert again.progress.tiles_done >= done
    _assert_saved_once(tmp_path, first.frames_saved + again.frames_saved, field_um)
    # the calibration's counts were carried, not started again
    c0 = first.progress.calibration
    c1 = again.progress.calibration
    assert c1.occupied + c1.empty_checked >= c0.occupied + c0.empty_checked


def test_positions_nav_lists_every_saved_frame_while_the_run_goes_on(tmp_path):
    # after a hard kill the next run takes again only what positions.nav does not list: it
    # must list each frame as soon as the frame is on disk, not only when the run ends
    from particlewatch.acquisition.navigator import read_navigator

    seen = []

    def look():
        nav = tmp_path / "positions.nav"
        listed = {p.label for p in read_navigator(nav)} if nav.exists() else set()
        seen.append(({p.stem for p in tmp_path.glob("frame_*.mrc")}, listed))

    scope = SimulatedMicroscope(SimScope("au10", seed=8, size_px=512))
    run_acquisition(scope, tmp_path, area_um=_area(), max_frames=4, handle_sigint=False,
                    threaded_writer=False, throttle=look)
    on_disk_during = [(on_disk, listed) for on_disk, listed in seen if on_disk]
    assert on_disk_during, "no checkpoint came after a saved frame"
    for on_disk, listed in on_disk_during:
        assert listed == on_disk


def test_an_earlier_run_of_another_sample_or_seed_is_not_resumed(tmp_path):
    from particlewatch.acquisition.plans import SegmentSettings
    from particlewatch.acquisition.runner import earlier_progress

    scope = SimulatedMicroscope(SimScope("au10", seed=8, size_px=512))
    first = run_acquisition(scope, tmp_path, area_um=_area(), max_frames=2,
                            handle_sigint=False, sample="au10", seed=8)
    description = json.loads(first.description_path.read_text())
    segments = SegmentSettings()
    assert earlier_progress(tmp_path, description, segments) is not None
    for key, other in (("sample", "ps50"), ("seed", 9), ("backend", "SerialEMMicroscope")):
        assert earlier_progress(tmp_path, {**description, key: other}, segments) is None, key
