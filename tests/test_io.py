"""read_frame: formats, pixel size in nm from every source, and one-line errors for bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from particlewatch.analysis.io import FRAME_SUFFIXES, Frame, FrameError, read_frame, unit_to_nm
from particlewatch.frames import format_mdoc, write_frame

REAL_DM4 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "jeol-haadf-dm4" \
    / "jeol_haadf.dm4"


def _image(shape=(48, 64), seed=0):
    return np.random.default_rng(seed).integers(100, 1000, shape).astype(np.uint16)


def _mrc(path, data, *, voxel_a=None):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data))
        if voxel_a is not None:
            m.voxel_size = voxel_a
    return path


def _mdoc(path, pixel_a, *, section=None):
    text = format_mdoc(path.name, (48, 64), pixel_nm=pixel_a / 10, section=section or {})
    Path(str(path) + ".mdoc").write_text(text)


def _error(path, **kw):
    with pytest.raises(FrameError) as info:
        read_frame(path, **kw)
    err = info.value
    assert str(err) == f"{err.path}: {err.reason}"
    assert "\n" not in str(err)
    assert err.path == str(path)
    assert isinstance(err, ValueError)
    return err.reason


# -- MRC and .mdoc --------------------------------------------------------------------------

def test_written_frame_reads_back_with_metadata(tmp_path):
    img = _image()
    p = write_frame(tmp_path / "frame_00001.mrc", img, pixel_nm=0.37,
                    section={"StagePosition": (12.5, -3.25), "Defocus": -1.5})
    frame = read_frame(p)
    assert isinstance(frame, Frame)
    np.testing.assert_array_equal(frame.image, img)
    assert frame.image.dtype in (np.float32, np.float64)
    assert frame.pixel_nm == pytest.approx(0.37, rel=1e-5)
    assert frame.meta["defocus_um"] == pytest.approx(-1.5)
    assert (frame.meta["stage_x_um"], frame.meta["stage_y_um"]) == (12.5, -3.25)


@pytest.mark.parametrize("header_a", [None, 0.0, 1.0])
def test_mdoc_pixel_size_used_when_header_unset(tmp_path, header_a):
    p = _mrc(tmp_path / "a.mrc", _image(), voxel_a=header_a)
    _mdoc(p, 4.2)
    frame = read_frame(p)
    assert frame.pixel_nm == pytest.approx(0.42)
    assert frame.meta["pixel_source"] == "mdoc"


def test_header_wins_over_disagreeing_mdoc_with_warning(tmp_path):
    p = _mrc(tmp_path / "a.mrc", _image(), voxel_a=8.0)
    _mdoc(p, 4.0)  # e.g. a stale .mdoc beside a binned file
    frame = read_frame(p)
    assert frame.pixel_nm == pytest.approx(0.8)
    assert frame.meta["pixel_source"] == "header"
    assert any("differs from .mdoc" in w for w in frame.meta["warnings"])


def test_given_pixel_size_only_a_fallback(tmp_path):
    p = _mrc(tmp_path / "a.mrc", _image(), voxel_a=5.0)
    assert read_frame(p, pixel_nm=3.0).pixel_nm == pytest.approx(0.5)
    q = _mrc(tmp_path / "b.mrc", _image())
    frame = read_frame(q, pixel_nm=3.0)
    assert frame.pixel_nm == 3.0 and frame.meta["pixel_source"] == "given"


def test_stack_uses_first_image_and_says_so(tmp_path):
    data = np.stack([_image(seed=s) for s in range(3)]).astype(np.float32)
    p = _mrc(tmp_path / "s.mrcs", data, voxel_a=2.0)
    frame = read_frame(p)
    np.testing.assert_array_equal(frame.image, data[0])
    assert any("stack of 3" in w for w in frame.meta["warnings"])


def test_few_nan_pixels_kept_as_missing(tmp_path):
    data = _image().astype(np.float32)
    data[3, 4], data[10, 10] = np.nan, np.inf
    with pytest.warns(RuntimeWarning):  # mrcfile warns about NaN while writing
        p = _mrc(tmp_path / "n.mrc", data, voxel_a=5.0)
    frame = read_frame(p)
    assert np.isnan(frame.image[3, 4]) and np.isnan(frame.image[10, 10])
    assert np.isfinite(frame.image).sum() == data.size - 2
    assert frame.meta["nonfinite_px"] == 2


# -- bad files: one line each -------------------------------------------------------------

@pytest.fixture
def good_mrc(tmp_path):
    return write_frame(tmp_path / "good.mrc", _image(), pixel_nm=0.5)


def test_zero_bytes(tmp_path):
    p = tmp_path / "empty.mrc"
    p.write_bytes(b"")
    assert "empty file (0 bytes)" in _error(p)


def test_truncated_mrc(tmp_path, good_mrc):
    p = tmp_path / "cut.mrc"
    p.write_bytes(good_mrc.read_bytes()[:3000])
    reason = _error(p)
    assert reason.startswith("truncated MRC") and "3000 bytes" in reason
    q = tmp_path / "short.mrc"
    q.write_bytes(good_mrc.read_bytes()[:500])
    assert "shorter than the 1024-byte header" in _error(q)


def test_wrong_magic(tmp_path, good_mrc):
    data = bytearray(good_mrc.read_bytes())
    data[208:212] = b"JUNK"
    p = tmp_path / "magic.mrc"
    p.write_bytes(bytes(data))
    assert "not an MRC file" in _error(p)


@pytest.mark.parametrize("dims", [(2**30, 48, 1), (-5, 48, 1), (64, 48, 0)])
def test_huge_or_bad_header_dims(tmp_path, good_mrc, dims):
    data = bytearray(good_mrc.read_bytes())
    data[0:12] = struct.pack("<3i", *dims)
    p = tmp_path / "dims.mrc"
    p.write_bytes(bytes(data))
    assert "bad MRC header: dimensions" in _error(p)


def test_dims_larger_than_file(tmp_path, good_mrc):
    data = bytearray(good_mrc.read_bytes())
    data[0:12] = struct.pack("<3i", 40000, 40000, 1)
    p = tmp_path / "big.mrc"
    p.write_bytes(bytes(data))
    assert "needs 3200001024" in _error(p)


def test_extra_bytes_and_zero_stamp_still_read(tmp_path, good_mrc):
    p = tmp_path / "long.mrc"
    p.write_bytes(good_mrc.read_bytes() + b"\0" * 400)
    frame = read_frame(p)
    np.testing.assert_array_equal(frame.image, _image())
    assert any("400 bytes larger" in w for w in frame.meta["warnings"])
    data = bytearray(good_mrc.read_bytes())
    data[212:216] = b"\0\0\0\0"  # machine stamp left unset by some writers
    q = tmp_path / "stamp.mrc"
    q.write_bytes(bytes(data))
    frame = read_frame(q)
    np.testing.assert_array_equal(frame.image, _image())
    assert any("read permissively" in w for w in frame.meta["warnings"])


def test_all_nan(tmp_path):
    with pytest.warns(RuntimeWarning):
        p = _mrc(tmp_path / "nan.mrc", np.full((32, 32), np.nan, np.float32), voxel_a=5.0)
    assert "no finite pixels" in _error(p)


def test_mostly_nan(tmp_path):
    data = np.full((32, 32), np.nan, np.float32)
    data[:8] = 1.0
    with pytest.warns(RuntimeWarning):
        p = _mrc(tmp_path / "mostly.mrc", data, voxel_a=5.0)
    assert "75% of pixels are NaN or inf" in _error(p)


@pytest.mark.parametrize("shape", [(1, 1), (8, 200)])
def test_too_small(tmp_path, shape):
    p = _mrc(tmp_path / "tiny.mrc", np.ones(shape, np.float32), voxel_a=5.0)
    assert "too small" in _error(p)


def test_missing_pixel_size(tmp_path):
    p = _mrc(tmp_path / "nopx.mrc", _image())
    assert _error(p) == "no pixel size in header or .mdoc; pass --pixel-nm"


def test_unsupported_and_missing(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG....")
    assert "unsupported file type '.png'" in _error(p)
    assert _error(tmp_path / "gone.mrc") == "file not found"


def test_corrupt_tiff_and_dm(tmp_path):
    t = tmp_path / "bad.tif"
    t.write_bytes(b"II*\x00" + b"\xff" * 40)
    assert _error(t).startswith("cannot read TIFF")
    d = tmp_path / "bad.dm4"
    d.write_bytes(b"not a dm file" * 10)
    assert _error(d).startswith("cannot read DM4")


# -- TIFF -----------------------------------------------------------------------------------

@pytest.mark.parametrize("unit,per_unit,expected_nm", [
    ("nm", 1 / 0.25, 0.25), ("micron", 1 / 0.0025, 2.5), ("\\u00B5m", 1 / 0.0025, 2.5),
    ("A", 1 / 3.0, 0.3)])
def test_tiff_imagej_units(tmp_path, unit, per_unit, expected_nm):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, _image().astype(np.float32), imagej=True,
                     resolution=(per_unit, per_unit), metadata={"unit": unit})
    frame = read_frame(p)
    assert frame.pixel_nm == pytest.approx(expected_nm, rel=1e-4)
    assert frame.meta["format"] == "tiff"


def test_tiff_centimetre_resolution(tmp_path):
    p = tmp_path / "cm.tif"
    tifffile.imwrite(p, _image(), resolution=(1 / 5e-8, 1 / 5e-8),
                     resolutionunit="CENTIMETER")
    assert read_frame(p).pixel_nm == pytest.approx(0.5, rel=1e-4)


def test_tiff_dpi_is_not_a_pixel_size(tmp_path):
    p = tmp_path / "dpi.tif"
    tifffile.imwrite(p, _image(), resolution=(72, 72))
    assert "no pixel size" in _error(p)
    assert read_frame(p, pixel_nm=1.5).pixel_nm == 1.5


def test_tiff_without_pixel_size_fails_unless_given(tmp_path):
    p = tmp_path / "plain.tiff"
    tifffile.imwrite(p, _image())
    assert "pass --pixel-nm" in _error(p)
    frame = read_frame(p, pixel_nm=0.8)
    np.testing.assert_array_equal(frame.image, _image())


# -- ncempy formats -------------------------------------------------------------------------

@pytest.mark.parametrize("size,unit,expected_nm", [
    (0.3, "n_m", 0.3), (3.0, "A", 0.3), (0.0004, "u_m", 0.4), (2e-10, "m", 0.2),
    (0.5, "nm", 0.5)])
def test_emd_units(tmp_path, size, unit, expected_nm):
    from ncempy.io import emd

    p = tmp_path / "f.emd"
    emd.emdWriter(p, _image().astype(np.float32), pixel_size=[size, size],
                  pixel_unit=[unit, unit])
    frame = read_frame(p)
    assert frame.pixel_nm == pytest.approx(expected_nm, rel=1e-5)
    assert frame.image.shape == (48, 64)


def _write_ser(path, image, pixel_m):
    """A minimal TIA series file (version 0x0210, one 2-D float32 element), as FEI writes."""
    h, w = image.shape
    dims = struct.pack("<i2d2ii", 1, 0.0, 1.0, 0, 0, 0)  # one series dimension, no text
    head_len = 6 + 16 + 4 + 4 + len(dims)
    offsets_at = head_len
    data_at = offsets_at + 8
    element = (struct.pack("<2di2dih2i", 0.0, pixel_m, 0, 0.0, pixel_m, 0, 7, w, h)
               + np.ascontiguousarray(image[::-1], "<f4").tobytes())  # rows bottom-up
    tag_at = data_at + len(element)
    out = (struct.pack("<3h", 0x4949, 0x0197, 0x0210) + struct.pack("<4i", 0x4122, 0x4152, 1, 1)
           + struct.pack("<i", offsets_at) + struct.pack("<i", 1) + dims
           + struct.pack("<2i", data_at, tag_at) + element + struct.pack("<2i", 0x4152, 0))
    path.write_bytes(out)


def test_ser_pixel_size_in_metres(tmp_path):
    image = _image().astype(np.float32)
    p = tmp_path / "f_1.ser"
    _write_ser(p, image, 7.5e-10)
    frame = read_frame(p)
    assert frame.pixel_nm == pytest.approx(0.75)
    np.testing.assert_array_equal(frame.image, image)
    cut = tmp_path / "cut_1.ser"
    cut.write_bytes(p.read_bytes()[:40])
    assert _error(cut).startswith("cannot read SER")


def test_real_dm4():
    frame = read_frame(REAL_DM4)
    assert frame.pixel_nm == pytest.approx(1.249, abs=5e-4)
    assert frame.image.shape == (112, 112)
    assert np.isfinite(frame.image).all() and frame.image.std() > 0
    assert frame.meta["format"] == "dm4"
    # Gatan's "Microscope Info" tags record the stage in µm
    assert frame.meta["stage_x_um"] == pytest.approx(-32.38, abs=0.01)
    assert frame.meta["stage_y_um"] == pytest.approx(13.30, abs=0.01)


@pytest.mark.parametrize("unit,factor", [
    ("A", 0.1), ("Å", 0.1), ("nm", 1.0), ("n_m", 1.0), ("µm", 1e3), ("μm", 1e3), ("um", 1e3),
    ("u_m", 1e3), ("micron", 1e3), ("m", 1e9), ("pixel", None), ("", None), (None, None)])
def test_unit_to_nm(unit, factor):
    assert unit_to_nm(unit) == factor


def test_suffixes_cover_interface_formats():
    assert set(FRAME_SUFFIXES) >= {".mrc", ".mrcs", ".tif", ".tiff", ".dm3", ".dm4", ".ser",
                                   ".emd"}


def test_tiff_stack_and_colour(tmp_path):
    stack = np.stack([_image(seed=s) for s in range(3)])
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, stack, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "nm"})
    frame = read_frame(p)
    np.testing.assert_array_equal(frame.image, stack[0])
    assert frame.pixel_nm == pytest.approx(0.5)
    assert any("using the first" in w for w in frame.meta["warnings"])
    rgb = np.stack([_image(seed=s) for s in range(3)], axis=-1).astype(np.uint8)
    q = tmp_path / "rgb.tif"
    tifffile.imwrite(q, rgb, photometric="rgb")
    frame = read_frame(q, pixel_nm=1.0)
    np.testing.assert_allclose(frame.image, rgb.astype(np.float32).mean(axis=-1), rtol=1e-6)
