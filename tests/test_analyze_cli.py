"""particlewatch analyze end to end: simulated frames plus bad files, outputs per INTERFACE.md."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from particlewatch.analysis.cli import find_frames
from particlewatch.analysis.outputs import FRAME_COLUMNS, PARTICLE_COLUMNS
from particlewatch.cli import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"schema_version", "frames_ok", "frames_failed", "particles", "populations",
                "converged", "precision"}
POPULATION_KEYS = {"id", "n", "fraction", "mean_ecd_nm", "sd_ecd_nm", "cv", "z_average_nm",
                   "ci95_nm", "mean_feret_max_nm", "mean_feret_min_nm"}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    assert cli_main(["simulate", "--sample", "au10", "--frames", "3", "--size", "512",
                     "--out", str(folder), "--seed", "1"]) == 0
    return folder


def _bad_files(folder):
    """The bad inputs of issue 4, each with the words its one-line reason must contain."""
    good = sorted(folder.glob("frame_*.mrc"))[0].read_bytes()
    bad = {}

    def put(name, data, words):
        (folder / name).write_bytes(data)
        bad[name] = words

    put("bad_empty.mrc", b"", "empty file")
    put("bad_truncated.mrc", good[:5000], "truncated MRC")
    magic = bytearray(good)
    magic[208:212] = b"NOPE"
    put("bad_magic.mrc", bytes(magic), "not an MRC file")
    huge = bytearray(good)
    huge[0:12] = struct.pack("<3i", 2**31 - 1, 2**31 - 1, 1)
    put("bad_dims.mrc", bytes(huge), "bad MRC header")
    for name, data, voxel, words in (
            ("bad_nan.mrc", np.full((64, 64), np.nan, np.float32), 5.0, "no finite pixels"),
            ("bad_tiny.mrc", np.ones((1, 1), np.float32), 5.0, "too small"),
            ("bad_nopixel.mrc", np.ones((64, 64), np.float32), None, "no pixel size")):
        with pytest.warns(RuntimeWarning) if np.isnan(data).any() else _nothing():
            with mrcfile.new(folder / name, overwrite=True) as m:
                m.set_data(data)
                if voxel:
                    m.voxel_size = voxel
        bad[name] = words
    return bad


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_analyze_end_to_end(simulated, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in simulated.rglob("*"):  # frames, .mdoc and truth/ (which must be ignored)
        if p.is_file():
            dest = folder / p.relative_to(simulated)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    (folder / ".frame_00009.mrc.part").write_bytes(b"half a frame")  # a writer's temporary
    bad = _bad_files(folder)
    out = tmp_path / "out"

    assert cli_main(["analyze", str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if "bad_" in line]
    assert len(err_lines) == len(bad)  # one line per bad file, the batch went on
    for name, words in bad.items():
        line = next(line for line in err_lines if name in line)
        assert words in line, line
    assert "frame_00009" not in captured.err

    frames = _rows(out / "frames.csv")
    assert list(frames[0]) == list(FRAME_COLUMNS)
    assert [f["frame"] for f in frames] == sorted([f"frame_0000{i}" for i in (1, 2, 3)]
                                                  + [Path(n).stem for n in bad])
    status = {f["frame"]: f for f in frames}
    for name, words in bad.items():
        row = status[Path(name).stem]
        assert row["status"] == "failed" and words in row["reason"]
        assert row["reason"].startswith(str(folder / name))
    ok = [f for f in frames if f["status"] == "ok"]
    assert len(ok) == 3 and all(float(f["pixel_nm"]) > 0 for f in ok)

    particles = _rows(out / "particles.csv")
    assert list(particles[0]) == list(PARTICLE_COLUMNS)
    assert len(particles) == sum(int(f["particles"]) for f in ok) > 20
    assert {p["separated"] for p in particles} <= {"true", "false"}
    assert all(int(p["population"]) >= -1 for p in particles)
    ecd = np.array([float(p["ecd_nm"]) for p in particles])
    inliers = np.array([int(p["population"]) >= 0 for p in particles])
    truth = [t["ecd_nm"] for f in sorted((simulated / "truth").glob("*.json"))
             for t in json.loads(f.read_text())["particles"]
             if not t["touches_edge"] and not t["overlaps"]]
    assert np.median(ecd[inliers]) == pytest.approx(np.median(truth), rel=0.04)

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["frames_ok"] == 3 and summary["frames_failed"] == len(bad)
    assert summary["particles"] == len(particles)
    assert summary["populations"] and POPULATION_KEYS <= set(summary["populations"][0])

    assert (out / "histogram.png").read_bytes()[:8] == PNG_MAGIC
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert overlays == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]
    assert all((out / "overlays" / n).read_bytes()[:8] == PNG_MAGIC for n in overlays)
    assert "analysed 3 of" in captured.out


def test_nothing_analysable_exits_1(tmp_path, capsys):
    bad = tmp_path / "frame_00001.mrc"
    bad.write_bytes(b"")
    assert cli_main(["analyze", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("particlewatch analyze: error: none of the 1 frames")
    assert any("empty file" in line for line in err)
    assert (tmp_path / "out" / "frames.csv").exists()


def test_no_frames_found_exits_1(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no frames here")
    assert cli_main(["analyze", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no frames" in capsys.readouterr().err


def test_pixel_nm_option_rescues_frames_without_one(tmp_path, capsys):
    yy, xx = np.mgrid[:128, :128]
    image = (1000 - 500 * (np.hypot(yy - 64, xx - 64) < 20)).astype(np.float32)
    with mrcfile.new(tmp_path / "nopx.mrc") as m:
        m.set_data(image)
    out = tmp_path / "out"
    assert cli_main(["analyze", str(tmp_path / "nopx.mrc"), "--out", str(out),
                     "--pixel-nm", "0.25"]) == 0
    rows = _rows(out / "particles.csv")
    assert len(rows) == 1
    assert float(rows[0]["ecd_nm"]) == pytest.approx(10.0, rel=0.05)  # 40 px x 0.25 nm


def test_find_frames_order_and_filters(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "truth").mkdir()
    for name in ("b/frame_2.mrc", "a.tif", "b/frame_10.dm4", "truth/frame_1.mrc",
                 "x.json", ".hidden.mrc", "c.mrc.tmp", "frame_1.mrc.mdoc"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_frames([tmp_path])]
    assert found == ["a.tif", "b/frame_10.dm4", "b/frame_2.mrc"]
    explicit = find_frames([tmp_path / "x.json", tmp_path / "a.tif", tmp_path / "a.tif"])
    assert [p.name for p in explicit] == ["x.json", "a.tif"]
