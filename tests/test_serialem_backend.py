"""The SerialEM backend, run for real against the ``serialem`` mimic over a SimScope."""

from __future__ import annotations

import sys

import mrcfile
import numpy as np
import pytest

from particlewatch.acquisition.backends import SerialEMMicroscope, SimulatedMicroscope
from particlewatch.acquisition.protocol import Microscope, MicroscopeError
from particlewatch.acquisition.runner import run_acquisition
from particlewatch.frames import read_mdoc
from particlewatch.simulators import serialem_module
from particlewatch.simulators.scope import SimScope

SIZE = 384


@pytest.fixture
def sem(monkeypatch):
    """``import serialem`` gives the mimic, attached to a fresh simulated scope."""
    serialem_module.attach(SimScope("au10", seed=11, size_px=SIZE))
    monkeypatch.setitem(sys.modules, "serialem", serialem_module)
    yield serialem_module
    serialem_module.detach()


def test_mimic_has_serialem_names_and_return_shapes(sem):
    import serialem

    serialem.ConnectToSEM(48888, "127.0.0.1")
    serialem.MoveStageTo(1.5, -2.0)
    assert serialem.ReportStageXYZ() == (1.5, -2.0, 0.0)
    serialem.SetDefocus(-0.25)
    serialem.ChangeFocus(0.05)
    assert serialem.ReportDefocus() == pytest.approx(-0.2)
    serialem.View()
    serialem.Record()
    image = np.asarray(serialem.bufferImage("A"))
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint16
    size_x, size_y, binning, exposure, pixel_nm, con_set = serialem.ImageProperties("A")
    assert (size_x, size_y, con_set) == (SIZE, SIZE, 3)  # Record is parameter set 3
    assert pixel_nm == pytest.approx(serialem.ReportCurrentPixelSize("R"))
    assert serialem.ImageProperties("B")[5] == 0  # the View image moved to buffer B
    assert serialem.ReportCurrentPixelSize("V") == pytest.approx(6 * pixel_nm)
    assert serialem.CameraProperties()[:2] == (SIZE, SIZE)
    with pytest.raises(serialem.SEMerror):
        serialem.MoveStageTo(1e4, 0)
    with pytest.raises(serialem.SEMerror):
        serialem.bufferImage("Q")
    with pytest.raises(serialem.SEMerror):
        serialem.ReportCurrentPixelSize("X")


def test_save_to_other_file_writes_an_mrc_with_mdoc(sem, tmp_path):
    import serialem

    serialem.MoveStageTo(2.0, 3.0)
    serialem.Record()
    path = tmp_path / "shot.mrc"
    serialem.SaveToOtherFile("A", "MRC", "NONE", str(path))
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, np.asarray(serialem.bufferImage("A")))
    assert read_mdoc(str(path) + ".mdoc")["sections"][0]["StagePosition"] == "2 3"


def test_serialem_backend_produces_the_same_frames_as_the_simulated_backend(sem, tmp_path):
    backend = SerialEMMicroscope(connect=True, stage_limits_um=SimScope(
        "au10", seed=11, size_px=SIZE).stage_limits_um)
    assert isinstance(backend, Microscope)
    simulated = SimulatedMicroscope(SimScope("au10", seed=11, size_px=SIZE))
    assert backend.field_of_view_um("record") == pytest.approx(simulated.field_of_view_um("record"))
    assert backend.pixel_nm("survey") == pytest.approx(simulated.pixel_nm("survey"))
    rng = np.random.default_rng(0)
    x, y = next(p for p in rng.uniform(-40, 40, (500, 2))
                if simulated.scope.specimen.density(*p) > 1.0)
    area = (x - 1, y - 1, x + 1, y + 1)
    a = run_acquisition(backend, tmp_path / "serialem", area_um=area, max_frames=5,
                        handle_sigint=False)
    b = run_acquisition(simulated, tmp_path / "simulated", area_um=area, max_frames=5,
                        handle_sigint=False)
    assert a.frames_saved == b.frames_saved == 5
    assert a.focus_images == b.focus_images and a.skipped_segments == b.skipped_segments
    assert a.instrument_s == pytest.approx(b.instrument_s)
    for pa, pb in zip(a.frames, b.frames):
        with mrcfile.open(pa) as ma, mrcfile.open(pb) as mb:
            np.testing.assert_array_equal(ma.data, mb.data)
        sa = read_mdoc(str(pa) + ".mdoc")["sections"][0]
        sb = read_mdoc(str(pb) + ".mdoc")["sections"][0]
        sa.pop("DateTime"), sb.pop("DateTime")
        assert sa == sb
    assert not (tmp_path / "serialem" / "truth").exists()  # SerialEM has no ground truth


def test_connection_and_import_failures_are_one_line_errors(monkeypatch):
    serialem_module.detach()
    with pytest.raises(MicroscopeError, match=r"cannot connect to SerialEM at 10\.0\.0\.1:4000"):
        SerialEMMicroscope(serialem_module, connect=True, ip="10.0.0.1", port=4000)
    monkeypatch.setitem(sys.modules, "serialem", None)
    with pytest.raises(MicroscopeError, match="cannot import SerialEM's Python module"):
        SerialEMMicroscope()


def test_serialem_errors_become_microscope_errors(sem):
    backend = SerialEMMicroscope(sem, stage_limits_um=(-1e5, -1e5, 1e5, 1e5))
    with pytest.raises(MicroscopeError, match="MoveStageTo"):
        backend.move_stage(500.0, 0.0)  # inside our limits, outside the scope's
    with pytest.raises(MicroscopeError, match="outside the limits"):
        SerialEMMicroscope(sem).move_stage(5000.0, 0.0)
