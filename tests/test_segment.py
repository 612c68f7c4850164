"""segment(): detection and sizes against the simulator's ground truth, and degenerate input."""

import numpy as np
import pytest

from particlewatch.analysis.measure import measure
from particlewatch.analysis.segment import detect_polarity, flatten_background, segment
from particlewatch.simulators.scope import SimScope


def _frame(sample, *, seed=3, size=384, detector=None, stage=(5.0, -5.0)):
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    scope.move_stage(*stage)
    scope.set_defocus(scope.true_focus_um())
    return scope.snap()


def _isolated_errors(frame, table):
    """ECD relative errors of isolated, whole truth particles matched by centre."""
    px = frame.truth["pixel_nm"]
    errors, missed = [], 0
    for p in frame.truth["particles"]:
        if p["touches_edge"] or p["overlaps"]:
            continue
        d = np.hypot(table["x_px"] - p["x_px"], table["y_px"] - p["y_px"])
        if d.size == 0 or d.min() > 0.35 * p["ecd_nm"] / px:
            missed += 1
            continue
        errors.append(table["ecd_nm"][int(np.argmin(d))] / p["ecd_nm"] - 1.0)
    return np.array(errors), missed


@pytest.mark.parametrize("sample", ["au10", "cubes"])
def test_isolated_particles_found_and_sized(sample):
    frame = _frame(sample)
    labels = segment(frame.image, frame.pixel_nm)
    table = measure(labels, frame.image, frame.pixel_nm)
    errors, missed = _isolated_errors(frame, table)
    assert errors.size >= 5
    assert missed / (errors.size + missed) <= 0.02
    assert np.median(np.abs(errors)) <= 0.02
    assert abs(np.median(errors)) <= 0.015


def test_bright_field_and_haadf_agree():
    sizes = {}
    for detector in ("bf", "haadf"):
        frame = _frame("au10", detector=detector)
        labels = segment(frame.image, frame.pixel_nm)
        errors, _ = _isolated_errors(frame, measure(labels, frame.image, frame.pixel_nm))
        sizes[detector] = np.median(errors)
    assert abs(sizes["bf"] - sizes["haadf"]) <= 0.02


def test_polarity_is_detected_both_ways():
    yy, xx = np.mgrid[:128, :128]
    disc = ((yy - 64) ** 2 + (xx - 64) ** 2 < 15 ** 2).astype(float)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, disc.shape)
    assert detect_polarity(-20 * disc + noise) == "dark"
    assert detect_polarity(20 * disc + noise) == "bright"
    for img in (100 - 50 * disc + noise, 10 + 50 * disc + noise):
        labels = segment(img, 1.0)
        assert labels.max() == 1
        assert abs((labels == 1).sum() / disc.sum() - 1) < 0.03


def test_uneven_illumination_is_flattened():
    yy, xx = np.mgrid[:256, :256]
    ramp = 1000 * (1 + 0.5 * xx / 256)
    bg = flatten_background(ramp)
    assert np.abs(bg / ramp - 1).max() < 0.05


def test_empty_frame_gives_no_particles():
    frame = _frame("empty")
    assert segment(frame.image, frame.pixel_nm).max() == 0


@pytest.mark.parametrize("image", [
    np.zeros((64, 64)), np.full((64, 64), np.nan), np.ones((1, 1)), np.ones((3, 200)),
])
def test_degenerate_input_gives_empty_labels(image):
    labels = segment(image, 1.0)
    assert labels.shape == image.shape
    assert labels.max() == 0


def test_nan_pixels_do_not_crash_and_input_is_not_changed():
    frame = _frame("au10", size=256)
    img = frame.image.astype(float)
    img[:20, :] = np.nan
    before = img.copy()
    labels = segment(img, frame.pixel_nm)
    assert labels.max() > 0
    np.testing.assert_array_equal(np.isnan(img), np.isnan(before))
    assert not labels[:21].any()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="pixel_nm"):
        segment(np.zeros((32, 32)), 0)
    with pytest.raises(ValueError, match="polarity"):
        segment(np.zeros((32, 32)), 1.0, polarity="up")
    with pytest.raises(ValueError, match="2-D"):
        segment(np.zeros((4, 4, 4)), 1.0)


def test_otsu_and_callable_thresholds_are_accepted():
    frame = _frame("au10", size=256)
    a = segment(frame.image, frame.pixel_nm, threshold="otsu")
    b = segment(frame.image, frame.pixel_nm, threshold=lambda v: float(np.percentile(v, 90)))
    assert a.max() > 0 and b.max() > 0


def _two_spheres(gap_px, *, radius=10.0, blur=1.5, size=256, seed=0):
    """Two equal spheres' projected thickness, blurred, with noise, and their centres."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:size, :size].astype(float)
    c = size / 2
    dx = radius + gap_px / 2
    img = np.zeros((size, size))
    for cx in (c - dx, c + dx):
        img += 2 * np.sqrt(np.clip(radius ** 2 - (xx - cx) ** 2 - (yy - c) ** 2, 0, None))
    img = ndi.gaussian_filter(img, blur)
    rng = np.random.default_rng(seed)
    return 100.0 + 3.0 * img + rng.normal(0, 1.0, img.shape), (c - dx, c + dx)


def test_particles_that_only_touch_keep_their_own_labels():
    img, (x1, x2) = _two_spheres(0.5)
    labels = segment(img, 1.0, polarity="bright")
    c = img.shape[0] // 2
    assert labels.max() == 2
    assert labels[c, int(x1)] != labels[c, int(x2)]
    # each is sized like the sphere it is (area of a 10 px disc: 314 px)
    areas = np.bincount(labels.ravel())[1:]
    assert np.all(np.abs(areas / (np.pi * 10.0 ** 2) - 1) < 0.08)


def test_overlapping_particles_share_a_label_for_separate():
    img, _ = _two_spheres(-6.0)  # 30% of a diameter overlap
    labels = segment(img, 1.0, polarity="bright")
    assert labels.max() == 1


def _sphere_at(cx, cy, *, radius=12.0, size=160, blur=1.5, seed=0):
    """One sphere's projected thickness centred at (cx, cy), blurred, with noise."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:size, :size].astype(float)
    img = 2 * np.sqrt(np.clip(radius ** 2 - (xx - cx) ** 2 - (yy - cy) ** 2, 0, None))
    img = ndi.gaussian_filter(img, blur)
    return 100.0 + 3.0 * img + np.random.default_rng(seed).normal(0, 1.0, img.shape)


@pytest.mark.parametrize("gap_px", [1.0, 2.0, 4.0])
def test_whole_particle_near_the_border_is_kept_and_sized(gap_px):
    # its edge lies gap_px inside the outermost pixel row: blur carries the outline to the
    # border, but the particle is whole and must be measured at its true size
    r = 12.0
    img = _sphere_at(80.0, r + gap_px, radius=r)
    labels = segment(img, 1.0, polarity="bright")
    assert labels.max() == 1
    assert abs((labels == 1).sum() / (np.pi * r ** 2) - 1) < 0.08


@pytest.mark.parametrize("depth_px", [3.0, 8.0, 20.0])
def test_cropped_particle_at_the_border_is_removed(depth_px):
    r = 12.0
    img = _sphere_at(80.0, r - depth_px, radius=r)  # depth_px of it beyond the frame
    labels = segment(img, 1.0, polarity="bright")
    assert labels.max() == 0


def test_simulated_particles_close_to_the_border_are_kept():
    # whole truth particles (not touches_edge) whose edge comes within 3 px of the frame
    # border: blur and noise carry their outlines to it, yet they are whole and measurable
    near, found, errors = 0, 0, []
    for i, stage in enumerate(((5.0, -5.0), (-12.0, 7.0), (20.0, 14.0), (-3.0, -25.0))):
        frame = _frame("ps50", seed=1 + i, size=1024, stage=stage)
        px = frame.pixel_nm
        table = measure(segment(frame.image, px), frame.image, px)
        h, w = frame.image.shape
        for p in frame.truth["particles"]:
            r = p["feret_max_nm"] / px / 2
            gap = min(p["x_px"], p["y_px"], w - 1 - p["x_px"], h - 1 - p["y_px"]) - r
            if p["touches_edge"] or p["overlaps"] or gap > 3.0:
                continue
            near += 1
            d = np.hypot(table["x_px"] - p["x_px"], table["y_px"] - p["y_px"])
            if d.size and d.min() <= 0.35 * p["ecd_nm"] / px:
                found += 1
                errors.append(table["ecd_nm"][int(np.argmin(d))] / p["ecd_nm"] - 1)
    assert near >= 2
    assert found == near
    assert np.all(np.abs(errors) < 0.05)


@pytest.mark.parametrize("radius, blur", [(6.0, 2.0), (10.0, 3.0), (15.0, 1.0)])
def test_edge_level_of_a_blurred_sphere_is_exact(radius, blur):
    from scipy import ndimage as ndi

    from particlewatch.analysis.segment import _disc_edge_level

    # brute force: a projected sphere (half-thickness, as the edge models) on a fine grid,
    # blurred in two dimensions, read at its edge
    h = 0.05
    n = int((radius + 8 * blur) / h) * 2 + 1
    x = (np.arange(n) - n // 2) * h
    yy, xx = np.meshgrid(x, x, sparse=True)
    sphere = np.sqrt(np.clip(radius ** 2 - xx ** 2 - yy ** 2, 0.0, None))
    row = ndi.gaussian_filter(sphere, blur / h)[n // 2]
    assert _disc_edge_level(radius, radius, blur) == pytest.approx(
        np.interp(radius, x, row), rel=2e-3)


def test_hollow_sphere_edge_is_lower_than_a_solid_one():
    from particlewatch.analysis.segment import _disc_edge_level, _shell_from_peak

    solid = _disc_edge_level(14.0, 14.0, 2.5)
    assert _disc_edge_level(14.0, 14.0, 2.5, 3.0) < solid
    # a thicker shell lowers it less; sharp (no blur reaching the hole): as solid
    assert _disc_edge_level(14.0, 14.0, 2.5, 3.0) < _disc_edge_level(14.0, 14.0, 2.5, 6.0)
    assert _disc_edge_level(14.0, 14.0, 0.5, 6.0) == pytest.approx(
        _disc_edge_level(14.0, 14.0, 0.5), rel=1e-3)
    # blur moves a shell's profile peak outward; the inversion undoes it
    assert _shell_from_peak(14.0, 3.9, 1.3) > 3.9


def test_smoothing_does_not_depend_on_how_crowded_the_frame_is():
    from particlewatch.analysis import segment as seg

    # the same polystyrene sample, a sparse and a crowded field (the simulator's seeds 1
    # and 3 differ several-fold in particle count): the width must follow the particles'
    # contrast and the noise, not how much of the frame they cover
    widths, counts = [], []
    for seed, stage in ((1, (5.0, -5.0)), (3, (20.0, 14.0))):
        frame = _frame("ps50", seed=seed, size=512, stage=stage)
        img, valid = seg._validate_image(frame.image, frame.pixel_nm, "auto")
        oriented = seg._oriented(img, valid, polarity="auto", flatten=True)[0]
        widths.append(seg._auto_sigma(oriented)[1])  # the edge fit's width
        counts.append(len(frame.truth["particles"]))
    assert max(counts) >= 2 * min(counts)
    assert max(widths) <= 1.35 * min(widths)  # the 99.5th percentile gave 2x


# -- bare film and sparse frames (issue 4: a session that starts on an empty frame) ---------

# stage positions (µm) whose 1024² frames hold no particle, for the samples' seed 0
_EMPTY_STAGES = ((33.1, -33.0), (-29.4, -6.6), (-34.2, -40.8), (13.5, -54.7), (23.0, -35.9),
                 (1.2, 41.7))


def _frame_holding(sample, stage, *, detector, lo, hi):
    """The frame at ``stage`` (seed 0, 1024²), checked to hold ``lo``..``hi`` truth particles.

    Fixture validation, not a test of segment: the stage positions were chosen for how many
    particles the simulator puts there, and a test on a frame holding none would pass
    trivially. A simulator change that moves them must fail loudly, not test nothing.
    """
    frame = _frame(sample, seed=0, size=1024, detector=detector, stage=stage)
    n = len(frame.truth["particles"])
    if not lo <= n <= hi:
        pytest.fail(f"precondition: {sample} ({detector}) stage {stage} holds {n} particles, "
                    f"not {lo}-{hi}: the simulator changed; pick new stages")
    return frame


def test_bare_film_gives_no_particles_in_either_detector():
    # The film's mottle (HAADF film ±10% at 40 nm, bright-field ±1.5%) makes round
    # patches of 60-150 nm that the automatic polarity took for particles in about one
    # empty frame in three (7 of 24 here). Its dips on the other side show how far the
    # texture alone reaches; the stated false-alarm rate is at most 1 frame in 8.
    frames = hits = 0
    for sample in ("cubes", "au10"):
        for detector in ("bf", "haadf"):
            for stage in _EMPTY_STAGES:
                frame = _frame_holding(sample, stage, detector=detector, lo=0, hi=0)
                frames += 1
                hits += bool(segment(frame.image, frame.pixel_nm).max())
    assert hits <= frames // 8


@pytest.mark.parametrize("sample,stage", [
    ("au10", (-24.7, 39.4)), ("au10", (-22.5, 0.1)), ("cubes", (45.3, -41.7)),
    ("ps50", (-17.6, 11.0)),
])
@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_few_particles_are_found_with_the_right_polarity(sample, stage, detector):
    # 1-3 particles cover far less than the 0.5% tails of the histogram the polarity is
    # read from; the film's tails decide it, and the particles must still be found
    frame = _frame_holding(sample, stage, detector=detector, lo=1, hi=3)
    truth = frame.truth["particles"]
    labels = segment(frame.image, frame.pixel_nm)
    table = measure(labels, frame.image, frame.pixel_nm)
    errors, missed = _isolated_errors(frame, table)
    assert missed == 0 and errors.size == len(truth)
    assert labels.max() == len(truth)  # no film patch beside them
    # sizes are not checked here: 1-2 particles alone in bright field come out 11-28% large
    # (a few edge profiles set the frame's blur; open, issue 4)


# -- regressions -------------------------------------------------------------------------------

def test_lone_blurred_particle_with_an_outline_bump_does_not_crash():
    # ps50 HAADF, one particle in the frame: the outline (smoothed 2.9 px) had a bump whose
    # inscribed radius was smaller than the fitted edge's shift inward (−2.9 px), and the
    # edge level of a disc of negative radius indexed an empty kernel (IndexError)
    scope = SimScope("ps50", seed=7, size_px=512, detector="haadf")
    scope.move_stage(0.5669770830188057, -54.10150001063898)
    scope.set_defocus(scope.true_focus_um())
    frame = scope.snap()
    truth = [p for p in frame.truth["particles"] if not p["touches_edge"]]
    if len(truth) != 1:
        pytest.fail(f"precondition: the frame holds {len(truth)} whole particles, not 1: "
                    "the simulator changed")
    labels = segment(frame.image, frame.pixel_nm)
    errors, missed = _isolated_errors(frame, measure(labels, frame.image, frame.pixel_nm))
    assert missed == 0 and labels.max() == 1
    assert abs(errors[0]) <= 0.05


def test_member_erased_by_the_edge_shift_keeps_the_region_level():
    from scipy import ndimage as ndi

    from particlewatch.analysis.segment import _disc_edge_level, _member_levels

    # a disc of radius 10 with a bump (inscribed radius 3.5 standing 1.7 px above its
    # neck) is two members; an edge 4 px inside the outline leaves nothing of the bump
    yy, xx = np.mgrid[:64, :64]
    region = ((yy - 32) ** 2 + (xx - 28) ** 2 <= 10 ** 2) | \
        ((yy - 32) ** 2 + (xx - 41) ** 2 <= 3.5 ** 2)
    labels = region.astype(np.int32)
    px = np.flatnonzero(labels)
    owner = labels.ravel()[px]
    rho = np.array([ndi.distance_transform_edt(region).max()])
    got = _member_levels(labels, px, owner, rho, np.array([10.0]), np.array([0.0]),
                         np.array([-4.0]), np.array([True]), total=2.0,
                         floor=np.array([0.5]))
    assert got is not None
    at, value = got
    assert at.size == px.size and np.all(value == 10.0)
    assert _disc_edge_level(4.0, -0.5, 2.0) == 0.0


def test_haadf_film_patches_among_weak_particles_are_not_detected():
    # ps100 on carbon in HAADF: the film's thicker patches passed the seed level as
    # particles (3 false regions of 10 on this frame); every region must be a real particle
    # and every isolated particle must still be found
    scope = SimScope("ps100", seed=2, size_px=512, detector="haadf")
    scope.move_stage(-12.0, 7.0)
    scope.set_defocus(scope.true_focus_um())
    frame = scope.snap()
    labels = segment(frame.image, frame.pixel_nm)
    table = measure(labels, frame.image, frame.pixel_nm)
    px = frame.truth["pixel_nm"]
    truth = frame.truth["particles"]
    centres = np.array([[p["x_px"], p["y_px"]] for p in truth])
    reach = np.array([p["feret_max_nm"] / 2 / px + 1 for p in truth])
    d = np.hypot(table["x_px"][:, None] - centres[None, :, 0],
                 table["y_px"][:, None] - centres[None, :, 1])
    false = int((~(d <= reach[None]).any(axis=1)).sum())
    assert len(table["x_px"]) >= 5
    assert false <= 0.02 * len(table["x_px"])  # precision >= 0.98 (3 of 10 false before)
    errors, missed = _isolated_errors(frame, table)
    assert errors.size >= 3
    assert missed / (errors.size + missed) <= 0.02


def test_each_member_of_a_group_is_leveled_against_its_own_background():
    from scipy import ndimage as ndi

    from particlewatch.analysis.segment import _member_levels

    # two equal discs fused in one region, the film beside the left one 0.1 brighter than
    # beside the right one (texture drifting across the group): a common level would grow
    # one member and shrink the other, each must sit its own background's drift above it
    yy, xx = np.mgrid[:64, :80]
    region = ((yy - 32) ** 2 + (xx - 29) ** 2 <= 10 ** 2) | \
        ((yy - 32) ** 2 + (xx - 49) ** 2 <= 10 ** 2)
    labels = region.astype(np.int32)
    outside = ndi.distance_transform_edt(~region)
    signed = np.where(region, 0.5 - ndi.distance_transform_edt(region), outside - 0.5)
    px = np.flatnonzero(signed.ravel() <= 12.0)
    owner = np.ones(px.size, np.int64)
    film = np.where(xx < 39, 0.1, -0.1)
    values = np.where(signed > 0, film, 1.0).ravel()[px]
    rho = np.array([ndi.distance_transform_edt(region).max()])
    got = _member_levels(labels, px, owner, rho, np.array([0.5]), np.array([0.0]),
                         np.array([0.0]), np.array([True]), total=1.0,
                         floor=np.array([0.05]),
                         around=(signed.ravel()[px], values, 0.0))
    assert got is not None
    at, value = got
    col = px[at] % labels.shape[1]
    left, right = value[col < 30], value[col > 48]
    assert left.size and right.size
    # each a constant level, 0.2 apart, about the region's fitted level on average
    assert np.ptp(left) < 1e-6 and np.ptp(right) < 1e-6
    assert abs(left[0] - right[0] - 0.2) < 1e-6
    assert abs((left[0] + right[0]) / 2 - 0.5) < 0.02
    # without a drift the two equal members share the region's level
    flat = np.where(signed > 0, 0.0, 1.0).ravel()[px]
    at, value = _member_levels(labels, px, owner, rho, np.array([0.5]), np.array([0.0]),
                               np.array([0.0]), np.array([True]), total=1.0,
                               floor=np.array([0.05]), around=(signed.ravel()[px], flat, 0.0))
    assert np.allclose(value, 0.5)
    # a drift no larger than the noise of its band's median is mostly noise: kept small
    at, value = _member_levels(labels, px, owner, rho, np.array([0.5]), np.array([0.0]),
                               np.array([0.0]), np.array([True]), total=1.0,
                               floor=np.array([0.05]),
                               around=(signed.ravel()[px], values, 0.1 ** 2 * 2000.0))
    col = px[at] % labels.shape[1]
    assert 0.0 < value[col < 30][0] - value[col > 48][0] < 0.1


def _two_shells(left_contrast, right_contrast):
    """Two equal discs fused in one region on a flat film, each its own contrast inside."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:64, :80]
    region = ((yy - 32) ** 2 + (xx - 29) ** 2 <= 10 ** 2) | \
        ((yy - 32) ** 2 + (xx - 49) ** 2 <= 10 ** 2)
    signed = np.where(region, 0.5 - ndi.distance_transform_edt(region),
                      ndi.distance_transform_edt(~region) - 0.5)
    px = np.flatnonzero(signed.ravel() <= 12.0)
    inside = np.where(xx < 39, left_contrast, right_contrast)
    values = np.where(signed > 0, 0.0, inside).ravel()[px]
    rho = np.array([ndi.distance_transform_edt(region).max()])
    return region.astype(np.int32), px, signed.ravel()[px], values, rho


def test_hollow_members_are_leveled_by_their_own_contrast():
    from particlewatch.analysis.segment import _member_levels

    # two capsules fused in one region, the left shell 1.5x the right one's contrast: at the
    # region's level the left outline reaches past its edge, the right stops short; each
    # member's level must follow its own contrast (hollow regions were left out before)
    labels, px, signed, values, rho = _two_shells(1.2, 0.8)
    owner = np.ones(px.size, np.int64)
    args = (labels, px, owner, rho, np.array([0.5]), np.array([0.0]), np.array([0.0]),
            np.array([False]))
    kw = dict(total=1.0, floor=np.array([0.05]), around=(signed, values, 0.0))
    got = _member_levels(*args, hollow=np.array([True]), **kw)
    assert got is not None
    at, value = got
    col = px[at] % labels.shape[1]
    left, right = value[col < 30], value[col > 48]
    assert left.size and right.size
    assert np.ptp(left) < 1e-6 and np.ptp(right) < 1e-6
    # levels in the ratio of the contrasts, about the region's level on average
    assert abs(left[0] / right[0] - 1.5) < 0.05
    assert abs((left[0] + right[0]) / 2 - 0.5) < 0.03
    # a solid region (not hollow) is not looked at this way: its contrast follows its radius
    assert _member_levels(*args, **kw) is None
    # equal shells share the region's level; a contrast difference within the noise of the
    # members' medians is mostly noise: kept small
    labels, px, signed, values, rho = _two_shells(1.0, 1.0)
    at, value = _member_levels(*args[:1], px, np.ones(px.size, np.int64), rho, *args[4:],
                               hollow=np.array([True]), total=1.0, floor=np.array([0.05]),
                               around=(signed, values, 0.0))
    assert np.allclose(value, 0.5)
    labels, px, signed, values, rho = _two_shells(1.2, 0.8)
    at, value = _member_levels(*args, hollow=np.array([True]), total=1.0,
                               floor=np.array([0.05]), around=(signed, values, 0.2 ** 2 * 300))
    col = px[at] % labels.shape[1]
    assert 1.0 < value[col < 30][0] / value[col > 48][0] < 1.4
