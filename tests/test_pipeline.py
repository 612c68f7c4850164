"""analyze_frame: sizes against drawn truth, filtering, failures as results, JSON messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from particlewatch.analysis.outputs import PARTICLE_COLUMNS
from particlewatch.analysis.pipeline import RESULT_COLUMNS, FrameResult, analyze_frame
from particlewatch.frames import write_frame

PIXEL_NM = 0.5
# (row, col, radius px): well apart, away from the border; radii 6..16 px = ECD 6..16 nm
DISCS = [(40, 40, 12), (40, 120, 8), (40, 200, 16), (120, 60, 6), (120, 150, 14),
         (200, 50, 10), (200, 130, 12), (200, 210, 9)]


def _disc_frame(tmp_path, name="frame_00001.mrc", *, dark=True, seed=0):
    """Bright-field-like frame: dark discs on a bright, noisy background (antialiased edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    cover = np.zeros((256, 256))
    for r, c, rad in DISCS:
        dist = np.hypot(yy - r, xx - c)
        cover = np.maximum(cover, np.clip(rad + 0.5 - dist, 0.0, 1.0))
    signal = 1000.0 - 500.0 * cover if dark else 200.0 + 500.0 * cover
    image = rng.poisson(signal).astype(np.uint16)
    return write_frame(tmp_path / name, image, pixel_nm=PIXEL_NM,
                       section={"StagePosition": (3.0, 4.0), "Defocus": -0.5})


def _truth_ecd_nm():
    return np.sort([2 * rad * PIXEL_NM for _, _, rad in DISCS])


@pytest.mark.parametrize("dark", [True, False])
def test_sizes_match_drawn_discs(tmp_path, dark):
    result = analyze_frame(_disc_frame(tmp_path, dark=dark))
    assert result.status == "ok", result.reason
    assert result.reason is None
    assert result.frame == "frame_00001"
    assert result.pixel_nm == pytest.approx(PIXEL_NM)
    assert (result.stage_x_um, result.stage_y_um, result.defocus_um) == (3.0, 4.0, -0.5)
    assert result.n_particles == len(DISCS)
    ecd = np.sort(result.particles["ecd_nm"])
    np.testing.assert_allclose(ecd, _truth_ecd_nm(), rtol=0.05)
    assert set(result.particles) == set(RESULT_COLUMNS)
    assert result.particles["separated"].dtype == bool
    assert not result.particles["separated"].any()
    took = result.seconds  # recorded for frames.csv's column; its value is not judged
    assert took is not None and np.isfinite(took)
    # labels agree with the table: label k is the particle with particle_id k
    ids = set(np.unique(result.labels[result.labels > 0]).tolist())
    assert ids == set(result.particles["particle_id"].tolist())


def test_min_size_filter_drops_particles_and_their_labels(tmp_path):
    result = analyze_frame(_disc_frame(tmp_path), min_size_nm=11.0)
    truth = _truth_ecd_nm()
    assert result.n_particles == int((truth >= 11.0).sum())
    assert (result.particles["ecd_nm"] >= 11.0).all()
    kept = set(result.particles["particle_id"].tolist())
    assert set(np.unique(result.labels[result.labels > 0]).tolist()) == kept


def test_touching_pair_is_separated(tmp_path):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :200]
    cover = np.zeros(yy.shape)
    for c in (78, 118):  # two radius-22 discs overlapping by 4 px
        cover = np.maximum(cover, np.clip(22.5 - np.hypot(yy - 80, xx - c), 0.0, 1.0))
    image = rng.poisson(1000.0 - 500.0 * cover).astype(np.uint16)
    p = write_frame(tmp_path / "pair.mrc", image, pixel_nm=1.0)
    result = analyze_frame(p)
    assert result.status == "ok", result.reason
    assert result.n_particles == 2
    assert result.particles["separated"].all()
    np.testing.assert_allclose(result.particles["ecd_nm"], 44.0, rtol=0.1)
    none = analyze_frame(p, separate="none")
    assert none.n_particles == 1 and not none.particles["separated"].any()


def test_touching_column_marks_particles_beside_another_and_not_lone_ones(tmp_path):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:200, :320]
    cover = np.zeros(yy.shape)
    for r, c in ((70, 78), (70, 122), (140, 250)):  # a touching pair (2 px gap) and a lone disc
        cover = np.maximum(cover, np.clip(21.5 - np.hypot(yy - r, xx - c), 0.0, 1.0))
    image = rng.poisson(1000.0 - 500.0 * cover).astype(np.uint16)
    result = analyze_frame(write_frame(tmp_path / "three.mrc", image, pixel_nm=1.0))
    assert result.status == "ok" and result.n_particles == 3, result.reason
    lone = result.particles["x_px"] > 200
    assert lone.sum() == 1
    assert result.particles["touching"].tolist() == (~lone).tolist()


def test_bad_frames_fail_without_raising(tmp_path):
    empty = tmp_path / "frame_00002.mrc"
    empty.write_bytes(b"")
    result = analyze_frame(empty)
    assert result.status == "failed"
    assert result.reason == f"{empty}: empty file (0 bytes)"
    assert result.n_particles == 0 and set(result.particles) == set(RESULT_COLUMNS)
    unsupported = tmp_path / "notes.txt"
    unsupported.write_text("hello")
    assert analyze_frame(unsupported).status == "failed"


def test_blank_frame_is_ok_with_no_particles(tmp_path):
    image = np.random.default_rng(0).poisson(500.0, (128, 128)).astype(np.uint16)
    result = analyze_frame(write_frame(tmp_path / "blank.mrc", image, pixel_nm=1.0))
    assert result.status == "ok" and result.n_particles == 0


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="separate"):
        analyze_frame("x.mrc", separate="magic")
    with pytest.raises(ValueError, match="polarity"):
        analyze_frame("x.mrc", polarity="grey")


def test_message_round_trip_is_json_and_drops_images(tmp_path):
    result = analyze_frame(_disc_frame(tmp_path))
    result.particles["shell_nm"][0] = np.nan
    message = result.to_message()
    text = json.dumps(message, allow_nan=False)  # NaN must have become null
    assert "image" not in message and "labels" not in message
    back = FrameResult.from_message(json.loads(text))
    assert back.image is None and back.labels is None
    assert back.frame == result.frame and back.status == "ok"
    for name in RESULT_COLUMNS:
        np.testing.assert_array_equal(back.particles[name], result.particles[name])
    assert back.particles["particle_id"].dtype == np.int64
    assert back.particles["separated"].dtype == bool


def test_failed_message_round_trip(tmp_path):
    p = tmp_path / "frame_00009.mrc"
    p.write_bytes(b"xx")
    message = analyze_frame(p).to_message()
    back = FrameResult.from_message(json.loads(json.dumps(message)))
    assert back.status == "failed" and back.reason == message["reason"]
    assert back.pixel_nm is None and back.n_particles == 0


@pytest.mark.parametrize("change,match", [
    ({"status": "maybe"}, "status"),
    ({"frame": 3}, "'frame'"),
    ({"pixel_nm": "0.5"}, "pixel_nm"),
    ({"reason": 5}, "reason"),
    ({"particles": {"ecd_nm": [1.0, 2.0], "particle_id": [1]}}, "rows"),
    ({"particles": {"particle_id": [1.5]}}, "integers"),
    ({"particles": {"separated": [1]}}, "booleans"),
    ({"particles": {"ecd_nm": ["big"]}}, "numbers"),
    ({"n_agglomerates": -1}, "n_agglomerates"),
])
def test_from_message_rejects_wrong_types(change, match):
    message = {"frame": "f", "path": "/x/f.mrc", "status": "ok", "reason": None,
               "pixel_nm": 0.5, "seconds": 1.0, "particles": {}}
    message.update(change)
    with pytest.raises(ValueError, match=match):
        FrameResult.from_message(message)


def test_result_columns_follow_particle_columns():
    assert RESULT_COLUMNS == tuple(c for c in PARTICLE_COLUMNS
                                   if c not in ("frame", "population"))


def _touching_by_brute_force(labels, ids, boxes, margin_px):
    """Which labels have a pixel of another label, or of a grown box, within the margin:
    every pair of pixels compared (Chebyshev distance: the filter's square window)."""
    from scipy.spatial.distance import cdist

    reach = margin_px + 1
    pixels = {int(k): np.argwhere(labels == k) for k in np.unique(labels[labels > 0])}
    out = []
    for k in ids:
        mine = pixels.get(int(k))
        if mine is None:
            out.append(False)
            continue
        near = any(cdist(mine, other, "chebyshev").min() <= reach
                   for j, other in pixels.items() if j != k)
        near |= any(((mine[:, 0] >= r0 - reach) & (mine[:, 0] < r1 + reach)
                     & (mine[:, 1] >= c0 - reach) & (mine[:, 1] < c1 + reach)).any()
                    for r0, c0, r1, c1 in boxes)
        out.append(near)
    return out


@pytest.mark.parametrize("side, per_side", [(24, 4), (160, 3)])
def test_touching_particles_equals_a_pixel_by_pixel_comparison(side, per_side):
    # (24, 4): crowded, the whole-frame rule; (160, 3): sparse, the rule on the areas where
    # particles' boxes meet (a particle at another's corner, beside a box, at the edge)
    from particlewatch.analysis.pipeline import touching_particles

    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[:9, :9]
    for trial in range(25):
        labels = np.zeros((side, side + 7), np.int32)
        n = int(rng.integers(1, per_side * 3 + 1))
        for k in range(1, n + 1):
            r, c = rng.integers(0, labels.shape[0]), rng.integers(0, labels.shape[1])
            h, w = rng.integers(1, 9, 2)
            shape = (yy[:h, :w] - h / 2) ** 2 + (xx[:h, :w] - w / 2) ** 2 <= (max(h, w) / 2) ** 2
            part = labels[r:r + h, c:c + w]
            part[shape[:part.shape[0], :part.shape[1]] & (part == 0)] = k
        present = np.unique(labels[labels > 0])
        ids = np.append(present, labels.max() + 3)  # a particle number owning no pixel
        boxes = [tuple(int(v) for v in rng.integers(0, side, 4)) for _ in range(trial % 3)]
        margin = int(rng.integers(0, 5))
        got = touching_particles(labels, ids, boxes=boxes, margin_px=margin).tolist()
        assert got == _touching_by_brute_force(labels, ids, boxes, margin), (trial, margin)
