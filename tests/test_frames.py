import numpy as np
import ncempy.io

from particlewatch.frames import (is_temporary_name, mdoc_frame_meta, parse_mdoc,
                                  read_mdoc, write_frame)


def test_frame_round_trips_through_mdoc_and_ncempy(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.poisson(100, size=(64, 80)).astype(np.uint16)
    path = write_frame(tmp_path / "frame_00001.mrc", image, pixel_nm=0.8125,
                       section={"StagePosition": (12.5, -3.25), "Defocus": -1.5,
                                "Magnification": 50000, "ExposureTime": 1.0})
    meta = mdoc_frame_meta(read_mdoc(str(path) + ".mdoc"))
    assert meta["pixel_nm"] == 0.8125
    assert (meta["stage_x_um"], meta["stage_y_um"]) == (12.5, -3.25)
    assert meta["defocus_um"] == -1.5
    assert meta["magnification"] == 50000
    data = ncempy.io.read(str(path))
    np.testing.assert_array_equal(np.squeeze(data["data"]), image)
    assert abs(float(np.ravel(data["pixelSize"])[-1]) - 8.125) < 1e-4  # ncempy gives Å
    assert not list(tmp_path.glob(".*.part"))


def test_global_pixel_spacing_is_used_when_section_lacks_it():
    mdoc = parse_mdoc("PixelSpacing = 12.5\nImageFile = a.mrc\n\n[ZValue = 0]\n"
                      "StagePosition = 1 2\nDefocus = -2\n")
    assert mdoc_frame_meta(mdoc)["pixel_nm"] == 1.25


def test_missing_pixel_spacing_is_none_not_a_guess():
    assert mdoc_frame_meta(parse_mdoc("[ZValue = 0]\nDefocus = -2\n"))["pixel_nm"] is None


def test_temporary_names():
    assert is_temporary_name(".frame_00001.mrc.part")
    assert is_temporary_name("frame.mrc.tmp")
    assert not is_temporary_name("frame_00001.mrc")


def test_same_pixels_and_metadata_give_identical_bytes(tmp_path):
    image = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    section = {"StagePosition": (1.0, 2.0), "DateTime": "06-Jan-2025  09:00:05"}
    a = write_frame(tmp_path / "a" / "f.mrc", image, pixel_nm=1.0, section=section)
    b = write_frame(tmp_path / "b" / "f.mrc", image, pixel_nm=1.0, section=section)
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "f.mrc.mdoc").read_bytes() == (b.parent / "f.mrc.mdoc").read_bytes()
