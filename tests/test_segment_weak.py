"""segment() on weak-contrast samples (polystyrene, silica capsules) against simulator truth."""

from pathlib import Path

import numpy as np
import pytest

from particlewatch.analysis.measure import measure
from particlewatch.analysis.segment import segment
from particlewatch.simulators.scope import SimScope

_STAGES = ((5.0, -5.0), (-12.0, 7.0), (20.0, 14.0))


def _pooled(sample, *, dose_factor=1.0, size=512):
    """ECD errors of isolated truth particles matched by centre, and the number missed."""
    errors, missed = [], 0
    for i, stage in enumerate(_STAGES):
        probe = SimScope(sample, seed=1 + i, size_px=size)
        scope = SimScope(sample, seed=1 + i, size_px=size, dose=probe.dose * dose_factor)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        table = measure(segment(frame.image, frame.pixel_nm), frame.image, frame.pixel_nm)
        px = frame.truth["pixel_nm"]
        for p in frame.truth["particles"]:
            if p["touches_edge"] or p["overlaps"]:
                continue
            d = np.hypot(table["x_px"] - p["x_px"], table["y_px"] - p["y_px"])
            if d.size == 0 or d.min() > 0.35 * p["ecd_nm"] / px:
                missed += 1
                continue
            errors.append(table["ecd_nm"][int(np.argmin(d))] / p["ecd_nm"] - 1.0)
    return np.array(errors), missed


# Floors pin what the method reaches on these small frames; where they sit below the issue's
# targets (recall 0.98, |error| 2%) the issue-4 report says so.
@pytest.mark.parametrize("sample, recall, abs_err, bias", [
    ("ps50", 0.93, 0.03, 0.02),
    ("ps-bimodal", 0.93, 0.025, 0.02),
    ("silica-capsules", 0.93, 0.03, 0.03),  # outer diameter: the 3%
])
def test_weak_particles_found_and_sized(sample, recall, abs_err, bias):
    errors, missed = _pooled(sample)
    assert errors.size >= 10
    assert errors.size / (errors.size + missed) >= recall
    assert np.median(np.abs(errors)) <= abs_err
    assert abs(np.median(errors)) <= bias


def test_polystyrene_at_low_dose_is_found():
    errors, missed = _pooled("ps-bimodal", dose_factor=0.25)
    assert errors.size / (errors.size + missed) >= 0.88
    assert abs(np.median(errors)) <= 0.04


_MEAN_STAGES = ((5.0, -5.0), (-12.0, 7.0), (20.0, 14.0))


def _isolated_ratios(sample, *, size=1024):
    """measured/true ECD of isolated truth particles matched one-to-one (mutual nearest
    centres within 0.35 ECD) with particles that segment → separate (as the pipeline runs
    them) did not split; ECD from the label's area, as ``measure`` gives ``ecd_nm``."""
    from particlewatch.analysis.separate import separate

    ratios = []
    for i, stage in enumerate(_MEAN_STAGES):
        scope = SimScope(sample, seed=1 + i, size_px=size)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        sep = separate(segment(frame.image, frame.pixel_nm), frame.pixel_nm, image=frame.image)
        labels = sep.labels
        n = int(labels.max()) + 1
        area = np.bincount(labels.ravel(), minlength=n).astype(float)
        ids = np.flatnonzero(area[1:] > 0) + 1
        yy, xx = np.indices(labels.shape)
        cy = np.bincount(labels.ravel(), yy.ravel(), n)[ids] / area[ids]
        cx = np.bincount(labels.ravel(), xx.ravel(), n)[ids] / area[ids]
        ecd = 2 * np.sqrt(area[ids] / np.pi) * frame.pixel_nm
        split = np.array([i < len(sep.separated) and bool(sep.separated[i]) for i in ids])
        truth = frame.truth["particles"]
        txy = np.array([[p["x_px"], p["y_px"]] for p in truth])
        d = np.hypot(cx[:, None] - txy[None, :, 0], cy[:, None] - txy[None, :, 1])
        nearest = np.argmin(d, axis=1)
        for j, p in enumerate(truth):
            if p["touches_edge"] or p["overlaps"]:
                continue
            k = int(np.argmin(d[:, j]))
            if d[k, j] <= 0.35 * p["ecd_nm"] / frame.pixel_nm and nearest[k] == j \
                    and not split[k]:
                ratios.append(ecd[k] / p["ecd_nm"])
    return np.array(ratios)


# The population statistics use the MEAN size of particles that stood alone (issue #5), so
# a low tail (partly detected particles, outlines pulled inside faint edges) biases them even
# when the median is right. Floor of the 5th percentile: per-particle scatter of an unbiased
# edge is ~2-3% on these frames (noise, film mottle), which puts the 5th percentile near
# 1 - 1.645 * 0.03 = 0.95; at 0.92 a particle has lost 15% of its area, which edge noise
# does not do but a core-only or partial detection does.
@pytest.mark.parametrize("sample", ["ps50", "silica-capsules"])
def test_isolated_mean_size_and_low_tail(sample):
    ratios = _isolated_ratios(sample)
    assert ratios.size >= 150
    assert abs(ratios.mean() - 1.0) <= 0.015
    assert abs(np.median(ratios) - 1.0) <= 0.015
    assert np.percentile(ratios, 5) >= 0.92


def test_real_haadf_dm4_is_sensible():
    import ncempy.io

    from particlewatch.analysis.separate import separate

    # shared/ sits beside the repository, in every session and in CI
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "jeol-haadf-dm4" / \
        "jeol_haadf.dm4"
    data = ncempy.io.read(str(path))
    image = np.asarray(data["data"], dtype=float)
    labels = separate(segment(image, 1.249), 1.249).labels
    table = measure(labels, image, 1.249)
    # Counted by eye on the frame: 20 bright particles of ~4-15 px, one cut by the bottom
    # border, so 19 measurable; several pairs overlap in projection (their pass is higher
    # than two just-touching spheres would give at this blur), which neither intensity nor
    # shape can split reliably. At least ~60% of them, never more than are there.
    assert 11 <= labels.max() <= 21
    assert np.all((table["ecd_nm"] > 3) & (table["ecd_nm"] < 30))
    assert image[labels > 0].mean() > np.median(image[labels == 0]) * 1.5
    # the particle cut by the bottom border (centre near row 110, column 38) is not kept
    assert not labels[-1].any()


# -- faint particles in crowded frames and at low dose (issue 4 / session recall) ----------

# Stage positions of the ps-bimodal session (seed 0): the crowded corner its serpentine
# starts in, 3-4x the particles of the bench frames above.
_CROWDED_STAGES = ((-25.344, -25.344), (-20.224, -25.344), (-15.104, -25.344),
                   (-25.344, -20.224), (-20.224, -20.224), (-15.104, -20.224))


def _recall_precision(frame, labels, *, population=None, gap_diameters=0.0):
    """Recall of truth particles of ``population`` that overlap nothing, are whole and have
    no truth neighbour closer (edge to edge) than ``gap_diameters`` of their own diameter;
    precision of every detection (its centroid inside some truth particle's circumcircle)."""
    px = frame.truth["pixel_nm"]
    truth = frame.truth["particles"]
    txy = np.array([[p["x_px"], p["y_px"]] for p in truth])
    r = np.array([p["ecd_nm"] / px / 2 for p in truth])
    rmax = np.array([p["feret_max_nm"] / px / 2 for p in truth])
    gap = np.hypot(*(txy[:, None, :] - txy[None, :, :]).transpose(2, 0, 1)) - r[:, None] - r
    np.fill_diagonal(gap, np.inf)
    wanted = np.array([not p["touches_edge"] and not p["overlaps"]
                       and (population is None or p["population"] == population)
                       for p in truth]) & (gap.min(1) >= gap_diameters * 2 * r)
    n = int(labels.max())
    if n == 0:
        return 0, int(wanted.sum()), 0, 0
    yy, xx = np.indices(labels.shape)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    cy = np.bincount(labels.ravel(), yy.ravel(), n + 1)[1:] / area
    cx = np.bincount(labels.ravel(), xx.ravel(), n + 1)[1:] / area
    d = np.hypot(cx[:, None] - txy[None, :, 0], cy[:, None] - txy[None, :, 1])
    found = (d <= 0.7 * r[None, :]).any(0)
    true = (d <= rmax[None, :] + 1.0).any(1)
    return int((found & wanted).sum()), int(wanted.sum()), int(true.sum()), n


def test_faint_particles_in_crowded_frames_are_found():
    # PS50 among 3-4x more PS100 and their touching groups, defocus within the depth of
    # field either way (as autofocus leaves it): the PS50 that stand apart (no neighbour
    # within half a diameter) are found as on sparse frames. The frame-level choices (the
    # denoising width, the background scale, the significance test) followed the PS100 here
    # and lost one such PS50 in seven.
    hit = total = true = detected = 0
    for i, stage in enumerate(_CROWDED_STAGES):
        scope = SimScope("ps-bimodal", seed=0, size_px=1024)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um() + (0.02 if i % 2 else -0.02))
        assert abs(scope.defocus() - scope.true_focus_um()) < scope.depth_of_field_um
        frame = scope.snap()
        counts = _recall_precision(frame, segment(frame.image, frame.pixel_nm),
                                   population=0, gap_diameters=0.5)
        hit, total, true, detected = (a + b for a, b in zip((hit, total, true, detected),
                                                             counts))
    assert total >= 80
    assert hit / total >= 0.93
    assert true / detected >= 0.98


@pytest.mark.parametrize("sample, recall", [("ps50", 0.965), ("ps-bimodal", 0.95)])
def test_polystyrene_at_quarter_dose_is_found(sample, recall):
    # a quarter of the default dose, isolated particles, 4 frames of 1024²
    hit = total = true = detected = 0
    for i, stage in enumerate(_STAGES + ((-3.0, -25.0),)):
        probe = SimScope(sample, seed=1 + i, size_px=1024)
        scope = SimScope(sample, seed=1 + i, size_px=1024, dose=probe.dose * 0.25)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        counts = _recall_precision(frame, segment(frame.image, frame.pixel_nm))
        hit, total, true, detected = (a + b for a, b in zip((hit, total, true, detected),
                                                             counts))
    assert total >= 100
    assert hit / total >= recall
    assert true / detected >= 0.98


def _small_members(frame, labels):
    """For the smaller member of each touching pair of unequal spheres (at most 3/4 of its
    partner's ECD): the share of its truth disc the labels cover, and the labelled area of
    its own cell (pixels nearer its truth outline than the partner's, within two radii) over
    its truth area."""
    parts = frame.truth["particles"]
    px = frame.truth["pixel_nm"]
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    cover, area = [], []
    for i, p in enumerate(parts):
        if p["touches_edge"] or len(p["overlaps"]) != 1 or p["shape"] != "sphere":
            continue
        q = parts[p["overlaps"][0]]
        if q["touches_edge"] or q["overlaps"] != [i] or p["ecd_nm"] > 0.75 * q["ecd_nm"]:
            continue
        r, big = p["ecd_nm"] / 2 / px, q["ecd_nm"] / 2 / px
        dp = np.hypot(xx - p["x_px"], yy - p["y_px"])
        dq = np.hypot(xx - q["x_px"], yy - q["y_px"])
        cell = (dp - r < dq - big) & (dp <= 2 * r)
        cover.append((labels[dp <= r] > 0).mean())
        area.append((labels[cell] > 0).sum() / (np.pi * r * r))
    return np.array(cover), np.array(area)


def test_small_member_of_touching_pair_keeps_its_size():
    # a PS50 touching a PS100 often shares its region (blur leaves no valley deep enough for
    # a seed of its own): a single edge level for the region, set by the PS100, cut the PS50
    # about a pixel short (median ~94% of its truth disc covered)
    cover, area = [], []
    for stage in [(x, y) for y in (-25.344, -20.224, -15.104)
                  for x in (-25.344, -20.224, -15.104, -9.984)]:
        scope = SimScope("ps-bimodal", seed=0, size_px=1024)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        c, a = _small_members(frame, segment(frame.image, frame.pixel_nm))
        cover.append(c)
        area.append(a)
    cover, area = np.concatenate(cover), np.concatenate(area)
    assert cover.size >= 10
    assert np.median(cover) >= 0.96
    assert 0.96 <= np.median(area) <= 1.05


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_smaller_polystyrene_below_the_seed_level_is_found(detector):
    # ps50 at a quarter of the default dose, 4 frames of 768²: the smaller (thinner, fainter)
    # half of the isolated spheres peaks near the seed level; they are found by their round,
    # particle-sized, edged shape (_weak_particles), and film patches are not taken with them
    small_hit = small_total = true = detected = 0
    for i, stage in enumerate(_STAGES + ((-3.0, -25.0),)):
        probe = SimScope("ps50", seed=1 + i, size_px=768, detector=detector)
        scope = SimScope("ps50", seed=1 + i, size_px=768, detector=detector,
                         dose=probe.dose * 0.25)
        scope.move_stage(*stage)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        labels = segment(frame.image, frame.pixel_nm)
        table = measure(labels, frame.image, frame.pixel_nm)
        px = frame.truth["pixel_nm"]
        parts = frame.truth["particles"]
        median = np.median([p["ecd_nm"] for p in parts])
        for p in parts:
            if p["touches_edge"] or p["overlaps"] or p["ecd_nm"] >= median:
                continue
            small_total += 1
            d = np.hypot(table["x_px"] - p["x_px"], table["y_px"] - p["y_px"])
            small_hit += bool(d.size and d.min() <= 0.35 * p["ecd_nm"] / px)
        counts = _recall_precision(frame, labels)
        true, detected = true + counts[2], detected + counts[3]
    assert small_total >= 100
    assert small_hit / small_total >= 0.96
    assert true / detected >= 0.985
