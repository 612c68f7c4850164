"""Size statistics, the stop rule and running updates, against known distributions."""

import json

import numpy as np
import pytest

from particlewatch.analysis.statistics import (RunningStatistics, cluster_mean_ci,
                                               summarize, z_average)


def _spheres(rng, n, mean, sd, *, shift=1.0):
    d = rng.normal(mean, sd, n) * shift
    aspect = 1 + np.abs(rng.normal(0, 0.03, n))
    return {"ecd_nm": d, "feret_max_nm": d * np.sqrt(aspect), "feret_min_nm": d / np.sqrt(aspect),
            "aspect_ratio": aspect, "circularity": np.clip(rng.normal(0.96, 0.015, n), 0, 1),
            "solidity": np.clip(rng.normal(0.985, 0.007, n), 0, 1)}


def _bimodal_frame(rng, n, *, shift=1.0):
    big = rng.random(n) < 0.5
    small = _spheres(rng, n, 55.0, 5.0, shift=shift)
    large = _spheres(rng, n, 110.0, 9.0, shift=shift)
    return {k: np.where(big, large[k], small[k]) for k in small}


def test_z_average_formula():
    d = np.array([10.0, 20.0, 30.0])
    assert z_average(d) == pytest.approx((d ** 6).sum() / (d ** 5).sum())
    assert z_average([50.0] * 4) == pytest.approx(50.0)
    assert np.isnan(z_average([]))
    # the z-average weighs large particles: above the number mean of a broad sample
    rng = np.random.default_rng(0)
    d = rng.normal(100, 20, 5000)
    assert z_average(d) > d.mean() + 5


def test_population_numbers_match_direct_computation():
    rng = np.random.default_rng(1)
    table = _spheres(rng, 2000, 50.0, 5.0)
    labels = np.zeros(2000, dtype=int)
    labels[:50] = -1
    s = summarize(table, labels, frames_ok=4, frames_failed=1,
                  frames=np.repeat(np.arange(4), 500))
    p = s["populations"][0]
    d = table["ecd_nm"][50:]
    assert (s["frames_ok"], s["frames_failed"], s["particles"], s["outliers"]) == (4, 1, 2000,
                                                                                  50)
    assert p["id"] == 0 and p["n"] == 1950 and p["fraction"] == 1.0
    assert p["mean_ecd_nm"] == pytest.approx(d.mean())
    assert p["sd_ecd_nm"] == pytest.approx(d.std(ddof=1))
    assert p["cv"] == pytest.approx(d.std(ddof=1) / d.mean())
    assert p["pdi"] == pytest.approx(p["cv"] ** 2)
    assert p["z_average_nm"] == pytest.approx(z_average(d))
    lo, hi = p["ci95_nm"]
    assert lo < d.mean() < hi
    assert p["ci95_rel"] == pytest.approx((hi - lo) / 2 / d.mean())
    assert p["mean_feret_max_nm"] == pytest.approx(table["feret_max_nm"][50:].mean())
    assert p["shape"] == "sphere" and p["mean_shell_nm"] is None
    assert s["all"]["n"] == 1950
    assert s["schema_version"] == 1


def test_frame_correlation_widens_the_interval():
    rng = np.random.default_rng(2)
    frames = np.repeat(np.arange(10), 300)
    independent = rng.normal(50, 5, 3000)
    shifts = 1 + rng.normal(0, 0.03, 10)  # each frame measures 3% off
    correlated = rng.normal(50, 5, 3000) * shifts[frames]
    _, half_ind, _ = cluster_mean_ci(independent, frames)
    _, half_cor, nf = cluster_mean_ci(correlated, frames)
    assert nf == 10
    # independent: close to the textbook t·s/√n
    assert half_ind == pytest.approx(2.262 * 5 / np.sqrt(3000), rel=0.6)
    assert half_ind >= 2.262 * independent.std(ddof=1) / np.sqrt(3000) - 1e-12
    assert half_cor > 3 * half_ind


def test_summary_is_json_safe_even_when_degenerate():
    for table, labels in [({"ecd_nm": np.zeros(0)}, np.zeros(0, int)),
                          ({"ecd_nm": np.array([10.0])}, np.array([0])),
                          ({"ecd_nm": np.array([10.0, 12.0])}, np.array([-1, -1]))]:
        s = summarize(table, labels, frames_ok=1, frames_failed=0)
        json.dumps(s, allow_nan=False)
        assert s["converged"] is False
        assert isinstance(s["convergence"]["reason"], str)


def test_convergence_needs_precision_count_frames_and_fractions():
    rng = np.random.default_rng(3)
    # plenty of particles over many frames: converged
    frames = np.repeat(np.arange(20), 200)
    table = _spheres(rng, 4000, 50.0, 5.0)
    s = summarize(table, np.zeros(4000, int), frames_ok=20, frames_failed=0, frames=frames,
                  precision=0.01)
    assert s["converged"] and s["populations"][0]["needed_more"] == 0
    assert "within" in s["convergence"]["reason"]
    # too few particles for ±1%: not converged, and says how many more
    small = {k: v[:100] for k, v in table.items()}
    s = summarize(small, np.zeros(100, int), frames_ok=20, frames_failed=0,
                  frames=frames[::40][:100].repeat(1), precision=0.01)
    p = s["populations"][0]
    assert not s["converged"] and p["needed_more"] > 200
    assert "P0" in s["convergence"]["reason"]
    # enough particles, but a single frame: the between-frame variance is unknown
    s = summarize(table, np.zeros(4000, int), frames_ok=1, frames_failed=0,
                  frames=np.zeros(4000, int), precision=0.01)
    assert not s["converged"] and "frames" in s["convergence"]["reason"]
    # a population with fewer than min_per_population particles
    labels = np.zeros(4000, int)
    labels[:30] = 1
    s = summarize(table, labels, frames_ok=20, frames_failed=0, frames=frames,
                  precision=0.2, fraction_tolerance=0.5, min_per_population=50)
    reasons = {p["id"]: p["reasons"] for p in s["convergence"]["populations"]}
    assert any("30 of at least 50" in r for r in reasons[1]) and not reasons[0]


def test_needed_more_is_a_fair_estimate():
    rng = np.random.default_rng(4)
    frames = np.arange(500) % 100
    table = _spheres(rng, 500, 50.0, 7.5)
    s = summarize(table, np.zeros(500, int), frames_ok=100, frames_failed=0, frames=frames,
                  precision=0.01)
    more = s["populations"][0]["needed_more"]
    n = 500 + more
    big = _spheres(rng, n, 50.0, 7.5)
    s2 = summarize(big, np.zeros(n, int), frames_ok=40, frames_failed=0,
                   frames=np.arange(n) % 100, precision=0.01)
    assert 0.8 < s2["populations"][0]["ci95_rel"] / 0.01 < 1.2


def test_fractions_must_be_stable():
    rng = np.random.default_rng(5)
    table = _bimodal_frame(rng, 600)
    labels = (table["ecd_nm"] > 80).astype(int)
    frames = np.repeat(np.arange(6), 100)
    s = summarize(table, labels, frames_ok=6, frames_failed=0, frames=frames, precision=0.05)
    for p in s["populations"]:
        assert p["ci95_rel"] <= 0.05  # sizes are known well enough ...
        lo, hi = p["fraction_ci95"]
        assert lo < 0.5 < hi
    assert not s["converged"]  # ... but ±4 points on the fractions is not stable yet
    assert "fraction" in s["convergence"]["reason"]


def test_capsules_and_rods_report_shell_and_axes():
    rng = np.random.default_rng(6)
    n = 400
    caps = _spheres(rng, n, 70.0, 7.0)
    caps["shell_nm"] = rng.normal(10.0, 1.5, n)
    s = summarize(caps, np.zeros(n, int), frames_ok=1, frames_failed=0)
    p = s["populations"][0]
    assert p["shape"] == "capsule" and p["mean_shell_nm"] == pytest.approx(10.0, abs=0.3)
    length, width = rng.normal(39, 3.5, n), rng.normal(12, 1.2, n)
    area = (length - width) * width + np.pi * width ** 2 / 4
    rods = {"ecd_nm": np.sqrt(4 * area / np.pi), "feret_max_nm": length,
            "feret_min_nm": width, "circularity": np.full(n, 0.66),
            "solidity": np.full(n, 0.98)}
    p = summarize(rods, np.zeros(n, int), frames_ok=1, frames_failed=0)["populations"][0]
    assert p["shape"] == "rod"
    assert p["mean_feret_max_nm"] == pytest.approx(39, rel=0.03)
    assert p["mean_feret_min_nm"] == pytest.approx(12, rel=0.03)


def test_histogram_counts_every_population():
    rng = np.random.default_rng(7)
    table = _bimodal_frame(rng, 1000)
    labels = (table["ecd_nm"] > 80).astype(int)
    labels[:10] = -1
    hist = summarize(table, labels, frames_ok=1, frames_failed=0)["histogram"]
    edges = np.array(hist["edges_nm"])
    assert np.all(np.diff(edges) > 0)
    assert set(hist["counts"]) == {"-1", "0", "1"}
    assert sum(hist["counts"]["0"]) + sum(hist["counts"]["1"]) >= 985


def test_bad_input_messages():
    with pytest.raises(ValueError, match="labels"):
        summarize({"ecd_nm": np.ones(3)}, np.zeros(2), frames_ok=1, frames_failed=0)
    with pytest.raises(ValueError, match="precision"):
        summarize({"ecd_nm": np.ones(3)}, np.zeros(3), frames_ok=1, frames_failed=0,
                  precision=0)
    with pytest.raises(ValueError, match="frame_00002"):
        rs = RunningStatistics()
        rs.add("frame_00001", {"ecd_nm": np.ones(3), "solidity": np.ones(3)})
        rs.add("frame_00002", {"ecd_nm": np.ones(3)})


def test_running_statistics_labels_are_stable_between_frames():
    rng = np.random.default_rng(8)
    rs = RunningStatistics(precision=0.01, seed=0)
    previous = None
    for i in range(25):
        rs.add(f"frame_{i:05d}", _bimodal_frame(rng, int(rng.integers(80, 200))))
        labels, table = rs.labels, rs.table
        assert len(labels) == len(table["ecd_nm"]) == len(table["frame"])
        assert table["frame"][-1] == f"frame_{i:05d}"
        if i >= 1:
            # the small population keeps id 0, the large one id 1, from the first fit on
            assert sorted(set(labels.tolist()) - {-1}) == [0, 1]
            small = table["ecd_nm"][labels == 0].mean()
            large = table["ecd_nm"][labels == 1].mean()
            assert abs(small / 55 - 1) < 0.03 and abs(large / 110 - 1) < 0.03
        if previous is not None:
            now = labels[:len(previous)]
            # a refit may move a borderline particle in or out of the outliers, but a
            # particle never jumps between the two populations
            assert (now == previous).mean() > 0.97
            assert np.sum((now >= 0) & (previous >= 0) & (now != previous)) == 0
        previous = labels.copy()


def test_running_summary_equals_batch_summary_and_converges():
    rng = np.random.default_rng(9)
    rs = RunningStatistics(precision=0.02, seed=1)
    assert not rs.converged
    for i in range(8):
        rs.add(f"frame_{i:05d}", _spheres(rng, 300, 10.0, 1.5, shift=1 + rng.normal(0, 0.005)))
    s = rs.summary(frames_ok=8, frames_failed=2)
    batch = summarize(rs.table, rs.labels, frames_ok=8, frames_failed=2, precision=0.02)
    assert s["populations"] == batch["populations"]
    assert s["frames_failed"] == 2
    assert rs.converged and len(s["populations"]) == 1
    assert abs(s["populations"][0]["mean_ecd_nm"] / 10 - 1) < 0.015


def test_running_statistics_accepts_empty_frames():
    rs = RunningStatistics()
    rs.add("frame_00001", {})
    rs.add("frame_00002", {"ecd_nm": np.array([10.0, 11.0])})
    rs.add("frame_00003", {"ecd_nm": np.zeros(0)})
    assert len(rs.labels) == 2 and rs.n_frames == 3
    json.dumps(rs.summary(), allow_nan=False)


def test_fractions_come_from_particles_that_stood_alone():
    """Splitting touching groups loses small particles more often; fractions must not
    follow that loss when enough isolated particles are there to count."""
    rng = np.random.default_rng(5)
    n_alone = 400
    small = rng.normal(55, 5, n_alone // 2)
    big = rng.normal(110, 9, n_alone // 2)
    split_big = rng.normal(110, 9, 300)  # from touching groups: the small ones were lost
    ecd = np.concatenate([small, big, split_big])
    labels = np.concatenate([np.zeros(n_alone // 2, int), np.ones(n_alone // 2 + 300, int)])
    separated = np.concatenate([np.zeros(n_alone, bool), np.ones(300, bool)])
    frames = rng.integers(0, 10, ecd.size)
    table = {"ecd_nm": ecd, "separated": separated}
    s = summarize(table, labels, frames_ok=10, frames_failed=0, frames=frames)
    assert s["fraction_basis"] == "isolated"
    assert abs(s["populations"][0]["fraction"] - 0.5) < 1e-9
    assert s["populations"][1]["n"] == n_alone // 2 + 300  # sizes from every particle
    without = summarize({"ecd_nm": ecd}, labels, frames_ok=10, frames_failed=0, frames=frames)
    assert without["fraction_basis"] == "all"
    assert without["populations"][0]["fraction"] < 0.3


def _frame_with_merged_pieces(rng, n, mean, sd):
    """One frame of a monodisperse sample as separation leaves it: a third of the particles
    were split from touching groups (measured from a rebuilt outline: as round as an isolated
    particle, within 2% in aspect and circularity), and a quarter of those are two
    overlapping particles that could not be split (1.15–1.6× the ECD)."""
    t = _spheres(rng, n, mean, sd)
    split = rng.random(n) < 0.35
    merged = split & (rng.random(n) < 0.25)
    grow = rng.uniform(1.15, 1.6, n)
    for k in ("ecd_nm", "feret_max_nm", "feret_min_nm"):
        t[k] = np.where(merged, t[k] * grow, t[k])
    t["aspect_ratio"] = np.where(split, np.maximum(
        t["aspect_ratio"] * rng.uniform(0.98, 1.02, n), 1.0), t["aspect_ratio"])
    t["circularity"] = np.where(split, np.minimum(
        t["circularity"] + rng.uniform(-0.02, 0.02, n), 1.0), t["circularity"])
    t["separated"] = split
    return t, merged


def test_running_statistics_keep_one_population_with_unsplit_merged_pieces():
    """Merged pieces must neither form a second population at some refit nor pull the
    mean; ids never jump between populations from frame to frame."""
    rng = np.random.default_rng(10)
    rs = RunningStatistics(precision=0.01, seed=0)
    previous, merged_all, split_all = None, [], []
    for i in range(20):
        table, merged = _frame_with_merged_pieces(rng, int(rng.integers(100, 400)), 10.0, 1.6)
        rs.add(f"frame_{i:05d}", table)
        merged_all.append(merged)
        split_all.append(table["separated"])
        labels = rs.labels
        assert set(labels.tolist()) - {-1} <= {0}
        if previous is not None:
            now = labels[:len(previous)]
            assert np.sum((now >= 0) & (previous >= 0) & (now != previous)) == 0
        previous = labels.copy()
    merged = np.concatenate(merged_all)
    p = rs.summary()["populations"][0]
    # merged pieces only 1.15-1.3x one particle cannot be told from a large single one:
    # the issue's ±1.5% for a monodisperse sample
    assert abs(p["mean_ecd_nm"] / 10.0 - 1) < 0.015
    # pieces that are one particle stay members (a split piece's outline differs from an
    # isolated one's by less than an outline measurement resolves); merged ones, larger,
    # are left out far more often, though only by size
    single_split = np.concatenate(split_all) & ~merged
    out_single = (rs.labels[single_split] == -1).mean()
    assert out_single < 0.05
    assert (rs.labels[merged] == -1).mean() > 3 * out_single
