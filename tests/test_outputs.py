"""outputs: CSV appends and atomic rewrites, summary.json, histogram and overlay PNGs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from particlewatch.analysis import outputs
from particlewatch.analysis.outputs import FRAME_COLUMNS, PARTICLE_COLUMNS
from particlewatch.analysis.pipeline import RESULT_COLUMNS, FrameResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _particles(ecd):
    ecd = np.asarray(ecd, dtype=float)
    n = ecd.size
    table = {c: np.linspace(1.0, 2.0, n) for c in RESULT_COLUMNS}
    table.update(particle_id=np.arange(1, n + 1), ecd_nm=ecd,
                 separated=np.arange(n) % 2 == 1, shell_nm=np.full(n, np.nan))
    return table


def _ok(frame, ecd):
    return FrameResult(frame=frame, path=f"/data/{frame}.mrc", status="ok", pixel_nm=0.5,
                       defocus_um=-1.0, stage_x_um=1.0, stage_y_um=2.0, seconds=0.25,
                       particles=_particles(ecd))


def _failed(frame):
    return FrameResult(frame=frame, path=f"/data/{frame}.mrc", status="failed",
                       reason=f"/data/{frame}.mrc: truncated MRC: 3000 bytes, header says\n"
                              f"more")


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_interface_columns():
    assert PARTICLE_COLUMNS[:17] == (
        "frame", "particle_id", "population", "x_px", "y_px", "area_nm2", "ecd_nm",
        "feret_max_nm", "feret_min_nm", "perimeter_nm", "circularity", "convexity",
        "solidity", "aspect_ratio", "major_axis_nm", "minor_axis_nm", "separated")
    assert "shell_nm" in PARTICLE_COLUMNS
    assert FRAME_COLUMNS == ("frame", "path", "status", "reason", "particles", "pixel_nm",
                             "defocus_um", "stage_x_um", "stage_y_um", "seconds")


def test_append_writes_header_once(tmp_path):
    outputs.append_frame_rows(tmp_path, [_ok("frame_00001", [10.0, 11.0])])
    outputs.append_frame_rows(tmp_path, [_failed("frame_00002"), _ok("frame_00003", [12.0])])
    lines = (tmp_path / "frames.csv").read_text().splitlines()
    assert lines[0] == ",".join(FRAME_COLUMNS)
    assert sum(line.startswith("frame,") for line in lines) == 1
    frames = _read(tmp_path / "frames.csv")
    assert [f["status"] for f in frames] == ["ok", "failed", "ok"]
    assert [f["particles"] for f in frames] == ["2", "0", "1"]
    assert frames[1]["reason"] == "/data/frame_00002.mrc: truncated MRC: 3000 bytes, header " \
                                  "says more"  # one line in the CSV
    assert frames[1]["pixel_nm"] == "" and frames[0]["pixel_nm"] == "0.5"
    parts = _read(tmp_path / "particles.csv")
    assert list(parts[0]) == list(PARTICLE_COLUMNS)
    assert [p["frame"] for p in parts] == ["frame_00001", "frame_00001", "frame_00003"]
    assert [p["population"] for p in parts] == ["", "", ""]  # known only at the end
    assert [p["separated"] for p in parts] == ["false", "true", "false"]
    assert parts[0]["shell_nm"] == ""  # NaN: no shell


def test_append_accepts_messages(tmp_path):
    msg = json.loads(json.dumps(_ok("frame_00001", [10.0]).to_message()))
    outputs.append_frame_rows(tmp_path, [msg])
    assert _read(tmp_path / "particles.csv")[0]["ecd_nm"] == "10"


def test_write_particles_rewrites_with_populations(tmp_path):
    outputs.append_frame_rows(tmp_path, [_ok("frame_00001", [10.0, 30.0])])
    table = _particles([10.0, 30.0, 31.0])
    table["frame"] = np.array(["frame_00001", "frame_00001", "frame_00002"], dtype=object)
    table["contrast"] = np.zeros(3)  # extra columns are not written
    outputs.write_particles(tmp_path, table, np.array([0, 1, -1]))
    rows = _read(tmp_path / "particles.csv")
    assert list(rows[0]) == list(PARTICLE_COLUMNS)
    assert [r["population"] for r in rows] == ["0", "1", "-1"]
    assert [float(r["ecd_nm"]) for r in rows] == [10.0, 30.0, 31.0]
    assert not list(tmp_path.glob(".*.part"))
    with pytest.raises(ValueError, match="one entry per particle"):
        outputs.write_particles(tmp_path, table, np.array([0, 1]))


def test_write_frames_rewrites_in_order(tmp_path):
    outputs.append_frame_rows(tmp_path, [_ok("b", [1.0])])
    outputs.write_frames(tmp_path, [_ok("a", [1.0]), _ok("b", [2.0, 3.0])])
    assert [r["frame"] for r in _read(tmp_path / "frames.csv")] == ["a", "b"]


def test_summary_is_strict_json(tmp_path):
    summary = {"schema_version": 1, "populations": [{"id": 0, "cv": float("nan"),
                                                     "n": np.int64(3)}],
               "precision": np.float64(0.01), "converged": np.bool_(False)}
    outputs.write_summary(tmp_path, summary)
    text = (tmp_path / "summary.json").read_text()
    data = json.loads(text)
    assert data["populations"][0] == {"id": 0, "cv": None, "n": 3}
    assert data["converged"] is False and "NaN" not in text


def test_histogram_png(tmp_path):
    rng = np.random.default_rng(0)
    ecd = np.concatenate([rng.normal(50, 4, 300), rng.normal(100, 8, 200), [400.0]])
    labels = np.concatenate([np.zeros(300, int), np.ones(200, int), [-1]])
    summary = {"particles": 501, "frames_ok": 5, "frames_failed": 1, "converged": False,
               "populations": [{"id": 0, "n": 300, "mean_ecd_nm": 50.1, "z_average_nm": 51.0,
                                "ci95_nm": [49.6, 50.6]},
                               {"id": 1, "n": 200, "mean_ecd_nm": 99.8, "z_average_nm": 101.9,
                                "ci95_nm": [98.7, 100.9]}]}
    path = tmp_path / ".histogram.png.part"  # the daemon's temporary name: still a PNG
    outputs.write_histogram(path, {"ecd_nm": ecd}, labels, summary)
    assert path.read_bytes()[:8] == PNG_MAGIC
    outputs.write_histogram(tmp_path / "h.png", {"ecd_nm": np.zeros(0)}, np.zeros(0, int))
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_overlay_png_draws_outlines_by_population(tmp_path):
    import matplotlib.image as mpimg

    image = np.full((64, 96), 100.0)
    labels = np.zeros((64, 96), np.int32)
    labels[10:20, 10:20] = 1
    labels[30:50, 50:70] = 2
    image[labels > 0] = 40.0
    image[0, 0] = np.nan  # missing pixels must not break the contrast stretch
    path = tmp_path / "overlays" / "frame_00001.png"
    outputs.write_overlay(path, image, labels, populations={1: 0, 2: -1},
                          agglomerate_boxes=[(55, 5, 63, 40)])
    rgb = mpimg.imread(path)[..., :3]
    assert rgb.shape == (64, 96, 3)
    np.testing.assert_allclose(rgb[10, 15], outputs.population_colour(0), atol=0.01)
    np.testing.assert_allclose(rgb[30, 60], outputs.population_colour(-1), atol=0.01)
    np.testing.assert_allclose(rgb[55, 20], (0.9, 0.1, 0.1), atol=0.01)  # red box
    assert rgb[15, 15].std() < 1e-6  # inside a particle: grey, no outline
    outputs.write_overlay(tmp_path / "sep.png", image, labels,
                          separated=np.array([False, True, False]))
    rgb = mpimg.imread(tmp_path / "sep.png")[..., :3]
    assert not np.allclose(rgb[10, 15], rgb[30, 60], atol=0.05)  # separated vs not


def test_overlay_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        outputs.write_overlay("x.png", np.zeros((4, 4)), np.zeros((5, 4), int))


def test_contrast_stretch_range():
    img = np.arange(10000, dtype=float).reshape(100, 100)
    out = outputs.contrast_stretch(img)
    assert out.min() == 0.0 and out.max() == 1.0
    assert outputs.contrast_stretch(np.full((4, 4), np.nan)).max() == 0.0
