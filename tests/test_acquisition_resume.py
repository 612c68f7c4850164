"""A resumed acquisition continues where it stopped and never images the same field twice."""

import math

import numpy as np

from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.runner import run_acquisition
from particlewatch.frames import mdoc_frame_meta, read_mdoc
from particlewatch.simulators.scope import SimScope


def _stage_positions(folder):
    out = []
    for mdoc in sorted(folder.glob("frame_*.mrc.mdoc")):
        meta = mdoc_frame_meta(read_mdoc(mdoc))
        out.append((meta["stage_x_um"], meta["stage_y_um"]))
    return out


def test_resumed_run_skips_fields_already_acquired(tmp_path):
    scope = SimScope("au10", seed=8, size_px=512)
    rng = np.random.default_rng(8)
    while True:  # a populated place on the simulated grid
        x, y = rng.uniform(-40, 40, 2)
        if scope.specimen.density(x, y) >= 1.0:
            break
    area = (x - 2, y - 2, x + 2, y + 2)
    first = run_acquisition(SimulatedMicroscope(scope), tmp_path, area_um=area, max_frames=3,
                            handle_sigint=False)
    assert first.frames_saved == 3
    # a fresh microscope, as after a restart of the program
    again = run_acquisition(SimulatedMicroscope(SimScope("au10", seed=8, size_px=512)),
                            tmp_path, area_um=area, max_frames=3, handle_sigint=False)
    assert [p.name for p in again.frames] == [f"frame_0000{i}.mrc" for i in (4, 5, 6)]
    positions = _stage_positions(tmp_path)
    assert len(positions) == 6
    field_um = scope.field_of_view_um("record")
    field_um = field_um if isinstance(field_um, float) else min(field_um)
    for i in range(len(positions)):
        for j in range(i):
            assert math.dist(positions[i], positions[j]) >= 0.5 * field_um
    # the segments the first run saved are done, not counted as skipped by the second
    assert again.skipped_segments <= first.skipped_segments
