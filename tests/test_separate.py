"""separate(): UECS splits touching discs into correctly sized particles."""

import functools

import numpy as np
import pytest
from scipy import ndimage as ndi

from particlewatch.analysis.measure import measure
from particlewatch.analysis.separate import notch_depth, separate


def _discs(centres, radius, shape=(140, 200)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.any([(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2 for cy, cx in centres], axis=0)


@pytest.mark.parametrize("gap", [1.9, 1.7])  # centre distance in radii: touching, overlapping
def test_touching_pair_split_into_two_correct_sizes(gap):
    r = 25
    mask = _discs([(70, 60), (70, 60 + gap * r)], r)
    s = separate(mask.astype(np.int32), 1.0)
    assert s.labels.max() == 2 and s.separated[1:].all() and s.agglomerates == 0
    t = measure(s.labels, mask.astype(float), 1.0)
    # overlap is shared, so each particle loses at most part of the lens
    assert np.all(np.abs(t["ecd_nm"] / (2 * r) - 1) < 0.1)


def test_convex_particle_is_left_alone():
    mask = _discs([(70, 100)], 30)
    for method in ("uecs", "watershed", "none"):
        s = separate(mask.astype(np.int32), 1.0, method=method)
        assert s.labels.max() == 1 and not s.separated[1]


def test_none_keeps_pair_together_watershed_splits_it():
    mask = _discs([(70, 60), (70, 108)], 25)
    assert separate(mask.astype(np.int32), 1.0, method="none").labels.max() == 1
    assert separate(mask.astype(np.int32), 1.0, method="watershed").labels.max() == 2


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        separate(np.zeros((5, 5), int), 1.0, method="magic")


def _pair(r1, r2, ratio, angle, shape=(150, 190)):
    """Two discs whose centre distance is ``ratio`` × (r1 + r2), at ``angle`` rad."""
    c1 = np.array([75.3, 60.6])
    c2 = c1 + ratio * (r1 + r2) * np.array([np.sin(angle), np.cos(angle)])
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = ((yy - c1[0]) ** 2 + (xx - c1[1]) ** 2 < r1 ** 2) | \
           ((yy - c2[0]) ** 2 + (xx - c2[1]) ** 2 < r2 ** 2)
    return mask, c1, c2


@pytest.mark.parametrize("r1, r2, ratio, angle", [
    (10, 10, 0.85, 0.7), (12, 12, 0.82, 2.2), (8, 16, 0.92, 1.1), (20, 17, 0.88, 0.3)])
def test_overlapping_pair_any_angle_full_sizes_with_masks(r1, r2, ratio, angle):
    # overlap up to 20% of the contact distance, as the simulator makes; diagonal necks leave
    # digital crumbs that must not become particles
    mask, c1, c2 = _pair(r1, r2, ratio, angle)
    s = separate(mask.astype(np.int32), 1.0, min_marker_px=10)
    assert s.labels.max() == 2 and s.agglomerates == 0
    assert set(s.masks) == {1, 2}  # both overlap the other: measured from their full masks
    t = measure(s.labels, mask.astype(float), 1.0, masks=s.masks)
    first = int(np.argmin(np.hypot(t["y_px"] - c1[0], t["x_px"] - c1[1])))
    ecd = np.array([t["ecd_nm"][first], t["ecd_nm"][1 - first]])
    assert np.all(np.abs(ecd / (2 * np.array([r1, r2])) - 1) < 0.05)
    # without the masks each label holds only its side of the cut; measure rebuilds the
    # shared arc from the free outline, so the sizes still come out whole
    flat = measure(s.labels, mask.astype(float), 1.0)
    first = int(np.argmin(np.hypot(flat["y_px"] - c1[0], flat["x_px"] - c1[1])))
    ecd = np.array([flat["ecd_nm"][first], flat["ecd_nm"][1 - first]])
    assert np.all(np.abs(ecd / (2 * np.array([r1, r2])) - 1) < 0.05)


@pytest.mark.parametrize("r1, r2", [(10, 10), (11, 9), (9, 13), (16, 16)])
def test_overlapping_small_pair_pieces_are_their_discs(r1, r2):
    # the full extent of each split piece is its particle's disc, not more: regrowth of an
    # ultimate-erosion marker carries a piece across the neck along its neighbour's outline
    # (pieces up to 6% too large in ECD on such pairs), the circle of its free outline does not
    for ratio in (0.8, 0.85, 0.9):
        for angle in (0.0, 0.4, 0.785, 1.3):
            mask, c1, c2 = _pair(r1, r2, ratio, angle)
            s = separate(mask.astype(np.int32), 1.0)
            assert s.labels.max() == 2 and s.agglomerates == 0
            yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
            for (cy, cx), r in ((c1, r1), (c2, r2)):
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
                lab = s.labels[int(round(cy)), int(round(cx))]
                assert lab > 0
                area = (np.count_nonzero(s.masks[lab][2]) if lab in s.masks
                        else np.count_nonzero(s.labels == lab))
                assert abs(np.sqrt(area / np.count_nonzero(disc)) - 1) <= 0.03, (ratio, angle)


def test_notch_depth_of_pair_and_disc():
    mask, _, _ = _pair(15, 15, 0.8, 0.4)
    # neck of two r = 15 discs 24 px apart: 15 - sqrt(15² - 12²) = 6
    assert notch_depth(mask) == pytest.approx(6.0, abs=1.0)
    yy, xx = np.mgrid[:80, :80]
    assert notch_depth((yy - 40.3) ** 2 + (xx - 39.6) ** 2 < 27 ** 2) < 1.0


def test_concave_single_region_is_agglomerate():
    # a ring-shaped arc (a "C") erodes to one non-convex remnant: not one particle
    yy, xx = np.mgrid[:120, :120]
    r = np.hypot(yy - 60, xx - 60)
    c = (r > 25) & (r < 40) & (xx < 80)
    s = separate(c.astype(np.int32), 1.0)
    assert s.agglomerates >= 1 and len(s.agglomerate_boxes) == s.agglomerates


# -- against the simulator's ground truth -----------------------------------------------------

from particlewatch.analysis.segment import segment  # noqa: E402
from particlewatch.simulators.scope import SimScope  # noqa: E402


def _frames(sample, n, *, size=768, seed=3, detector=None):
    """In-focus frames at the ``n`` densest of 200 random stage positions (where particles
    touch most): (image, pixel_nm, labels, truth)."""
    rng = np.random.default_rng(seed)
    scope = SimScope(sample, seed=seed, size_px=size, detector=detector)
    x0, y0, x1, y1 = scope.stage_limits_um
    xy = rng.uniform([x0 + 5, y0 + 5], [x1 - 5, y1 - 5], (200, 2))
    dense = np.argsort([-float(scope.specimen.density(x, y)) for x, y in xy])[:n]
    out = []
    for x, y in xy[dense]:
        scope.move_stage(x, y)
        scope.set_defocus(scope.true_focus_um())
        frame = scope.snap()
        out.append((frame.image, frame.pixel_nm, segment(frame.image, frame.pixel_nm),
                    frame.truth))
    return out


def _at(lab, p):
    r = min(max(round(p["y_px"]), 0), lab.shape[0] - 1)
    c = min(max(round(p["x_px"]), 0), lab.shape[1] - 1)
    return int(lab[r, c])


def _isolated_regions(raw, truth):
    """Labels of segmented regions holding exactly one true particle, which overlaps none and
    is not cut by the frame edge."""
    parts = truth["particles"]
    holders = np.bincount([_at(raw, p) for p in parts], minlength=int(raw.max()) + 1)
    for p in parts:
        k = _at(raw, p)
        if not (p["overlaps"] or p["touches_edge"] or k == 0 or holders[k] != 1):
            yield k


def _pairs(truth):
    parts = truth["particles"]
    return [(i, p["overlaps"][0]) for i, p in enumerate(parts)
            if len(p["overlaps"]) == 1 and not p["touches_edge"] and i < p["overlaps"][0]
            and parts[p["overlaps"][0]]["overlaps"] == [i]
            and not parts[p["overlaps"][0]]["touches_edge"]]


def _pairs_split_right(frames, column, tol):
    """Touching pairs in ``frames`` and how many were split into two particles whose
    ``column`` (measured as the pipeline does) is within ``tol`` of each member's truth."""
    split = total = 0
    for image, px, raw, truth in frames:
        s = separate(raw, px, image=image)
        t = measure(s.labels, image, px, masks=s.masks, exact=s.exact)
        parts = truth["particles"]
        for pair in _pairs(truth):
            total += 1
            ids = [_at(s.labels, parts[k]) for k in pair]
            if 0 in ids or ids[0] == ids[1]:
                continue
            rows = [int(np.flatnonzero(t["particle_id"] == k)[0]) for k in ids]
            err = [t[column][r] / parts[k][column] - 1 for r, k in zip(rows, pair)]
            split += max(abs(e) for e in err) <= tol
    return split, total


def test_touching_pairs_in_simulated_frames_split_into_correct_sizes():
    split, total = _pairs_split_right(_frames("au10", 3), "ecd_nm", 0.05)
    assert total >= 10
    # chance overlaps deeper than the simulator's agglomerates (centres < 0.7 of the contact
    # distance) cannot be told apart by shape; the rest must split into correct sizes (the
    # issue's 85%)
    assert split / total >= 0.85


@functools.lru_cache(maxsize=1)
def _rod_frames():
    return _frames("au-rods", 2, seed=5)


def test_touching_rods_in_simulated_frames_split_into_rods_of_their_length():
    # UECS alone leaves ~88% of touching rod pairs unsplit or as agglomerates (side by side
    # they form one convex slab; crossings erode to one core); rods.rods_instead takes them
    split, total = _pairs_split_right(_rod_frames(), "feret_max_nm", 0.10)
    assert total >= 10
    # 0.78 on the bench's 77 pairs (issue's goal 0.85, not reached yet); 0.2 here without rods
    assert split / total >= 0.5


def _rod_pair_figures(exact):
    """Over the touching rod pairs of :func:`_rod_frames`: pairs, pairs split into two
    particles whose ECDs are both within 5% of the truth, and the |length| errors of the rods
    of pairs matched to two distinct particles; measured with ``exact`` (the Separation's
    ``exact`` labels when True, none when False)."""
    pairs = split = 0
    errs = []
    for image, px, raw, truth in _rod_frames():
        s = separate(raw, px, image=image)
        t = measure(s.labels, image, px, masks=s.masks, exact=s.exact if exact else ())
        parts = truth["particles"]
        for pair in _pairs(truth):
            pairs += 1
            ids = [_at(s.labels, parts[k]) for k in pair]
            if 0 in ids or ids[0] == ids[1]:
                continue
            rows = [int(np.flatnonzero(t["particle_id"] == k)[0]) for k in ids]
            ecd = [t["ecd_nm"][r] / parts[k]["ecd_nm"] - 1 for r, k in zip(rows, pair)]
            split += max(abs(e) for e in ecd) <= 0.05
            errs += [abs(t["feret_max_nm"][r] / parts[k]["feret_max_nm"] - 1)
                     for r, k in zip(rows, pair) if parts[k]["shape"] == "rod"]
    return pairs, split, np.asarray(errs)


def test_split_rods_are_measured_from_their_fitted_stadiums():
    # a rod split by rods.rods_instead is a stadium fitted to the outline, its end hidden
    # under the neighbour included: measured as it is (Separation.exact), not rebuilt from
    # its free outline, which cuts the hidden end short
    pairs, split, errs = _rod_pair_figures(True)
    _, split_rebuilt, errs_rebuilt = _rod_pair_figures(False)
    assert pairs >= 10 and len(errs) >= 10
    assert np.median(errs) <= 0.03
    # rebuilt outlines' edges are fitted too (since e63f842 loosely fitted ones as well), so
    # both split these pairs alike (14 of 20; rebuilt was 13); the hidden end still shows
    # in the lengths
    assert split >= split_rebuilt
    assert np.mean(errs) < np.mean(errs_rebuilt)


def test_exact_labels_follow_relabelling_and_are_only_rods():
    for image, px, raw, truth in _rod_frames()[:1]:
        s = separate(raw, px, image=image)
        present = set(np.unique(s.labels).tolist()) | set(s.masks)
        # labels of particles that exist after the thickness check renumbered them, and rods
        # whose hidden ends make their model differ from the pixels they own
        assert s.exact and s.exact <= present - {0}
        assert s.exact & set(s.masks)
    # no rods in the frame: nothing is exact
    yy, xx = np.mgrid[:80, :120]
    two = ((yy - 40) ** 2 + (xx - 40) ** 2 < 22 ** 2) | ((yy - 40) ** 2 + (xx - 78) ** 2 < 22 ** 2)
    assert separate(two.astype(int), 1.0).exact == frozenset()


@pytest.mark.parametrize("sample, detector", [("cubes", None), ("au10", "bf")])
def test_split_particles_own_their_outline_and_measure_true_size(sample, detector):
    # measure reads a split particle's size from its free outline: a pixel of the region's
    # outline in two particles' full extents would give one particle its neighbour's edge
    # (UECS regrowth overshoots along it), a stretch in none would cut a corner off
    doubly = 0
    errs = []
    for image, px, raw, truth in _frames(sample, 2, detector=detector):
        s = separate(raw, px, image=image)
        t = measure(s.labels, image, px, masks=s.masks)
        # full extents: a particle's mask, or its pixels where it has none
        cover = ((s.labels > 0) & ~np.isin(s.labels, list(s.masks))).astype(np.uint8)
        for r0, c0, m in s.masks.values():
            cover[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] += m
        cross = ndi.generate_binary_structure(2, 1)
        outline = (raw > 0) & (ndi.grey_erosion(raw, footprint=cross) != raw)
        doubly += np.count_nonzero(outline & (cover > 1))
        parts = truth["particles"]
        for pair in _pairs(truth):
            ids = [_at(s.labels, parts[k]) for k in pair]
            if 0 in ids or ids[0] == ids[1]:
                continue
            rows = [int(np.flatnonzero(t["particle_id"] == k)[0]) for k in ids]
            errs += [t["ecd_nm"][r] / parts[k]["ecd_nm"] - 1 for r, k in zip(rows, pair)]
    assert len(errs) >= 20
    assert doubly == 0
    # split members are neither rounded off nor swollen into their neighbour
    assert abs(np.median(errs)) <= 0.02
    errors = np.mean(np.abs(errs) > 0.05)
    assert errors <= 0.35


def test_split_members_edges_are_fitted_on_the_frame():
    # a split member's outline is placed on its own edge where it faces the background, as
    # a lone particle's is (its mask's pixels are a threshold's and a regrowth's guess):
    # split cubes measured 1.8% median |ECD error|, a fifth of them off by more than 3%,
    # with the mask's outline as it was
    errs = []
    for image, px, raw, truth in _frames("cubes", 2):
        s = separate(raw, px, image=image)
        t = measure(s.labels, image, px, masks=s.masks, exact=s.exact)
        parts = truth["particles"]
        for pair in _pairs(truth):
            ids = [_at(s.labels, parts[k]) for k in pair]
            if 0 in ids or ids[0] == ids[1]:
                continue
            rows = [int(np.flatnonzero(t["particle_id"] == k)[0]) for k in ids]
            errs += [t["ecd_nm"][r] / parts[k]["ecd_nm"] - 1 for r, k in zip(rows, pair)]
    errs = np.abs(errs)
    assert len(errs) >= 20
    assert np.median(errs) <= 0.012
    assert np.mean(errs > 0.03) <= 0.12


@pytest.mark.parametrize("sample", ["au-rods", "cubes", "silica-capsules"])
def test_isolated_particles_are_not_cut(sample):
    isolated = cut = lost = 0
    for image, px, raw, truth in _frames(sample, 1, size=768):
        s = separate(raw, px, image=image)
        for k in _isolated_regions(raw, truth):
            isolated += 1
            pieces = np.unique(s.labels[raw == k])
            cut += np.count_nonzero(pieces) > 1
            lost += np.count_nonzero(pieces) == 0
    assert isolated >= 20
    assert cut <= max(1, 0.01 * isolated) and lost <= max(1, 0.01 * isolated)


def test_three_disc_chain_splits_and_cross_is_agglomerate():
    chain = _discs([(70, 40), (70, 76), (100, 100)], 20, shape=(150, 160))
    s = separate(chain.astype(np.int32), 1.0)
    assert s.labels.max() == 3 and s.separated[1:].all() and s.agglomerates == 0
    # a plus sign: two crossing bars meet at the deepest point, no convex pieces explain it
    plus = np.zeros((100, 100), bool)
    plus[45:55, 10:90] = plus[10:90, 45:55] = True
    s = separate(plus.astype(np.int32), 1.0)
    assert s.agglomerates == 1 and s.labels.max() == 0


# -- deep overlaps: projected thickness ---------------------------------------------------------

def _thickness_frame(detector, *, seed, ratios, cell=56, grid=10, dose=400.0, blur=1.0):
    """Spheres rendered as projected thickness through a detector, with Poisson noise.

    Cells of a ``grid`` × ``grid`` lattice hold one sphere (radius 9-13 px) each, except the
    first ``len(ratios)`` cells, which hold two overlapping spheres whose centre distance is
    ``ratio`` × the contact distance. Returns (image, [(centre, ...) per cell], [radii per
    cell]).
    """
    rng = np.random.default_rng(seed)
    size = cell * grid
    yy, xx = np.mgrid[:size, :size]
    thick = np.zeros((size, size))
    groups, sizes = [], []
    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) * cell, (k % grid + 0.5) * cell
        radii = rng.uniform(9, 13, 2 if k < len(ratios) else 1)
        if k < len(ratios):
            a = rng.uniform(0, np.pi)
            d = ratios[k] * radii.sum()
            off = np.array([np.sin(a), np.cos(a)]) * d / 2
            centres = [(cy - off[0], cx - off[1]), (cy + off[0], cx + off[1])]
        else:
            centres = [(cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3))]
        for (y, x), r in zip(centres, radii):
            thick += 2 * np.sqrt(np.clip(r ** 2 - (yy - y) ** 2 - (xx - x) ** 2, 0, None))
        groups.append(centres)
        sizes.append(radii)
    return _image_of(thick, detector, dose=dose, blur=blur, rng=rng), groups, sizes


def _image_of(thick, detector, *, dose, blur, rng):
    """Counts of a projected-thickness map (px) seen by ``detector``, blurred, shot noise."""
    if detector == "bf":  # gold-like: a 20 px sphere absorbs 1 - exp(-1.2)
        expected = dose * np.exp(-ndi.gaussian_filter(thick, blur) / 17.0)
    else:
        expected = dose * (0.1 + ndi.gaussian_filter(thick, blur) / 40.0)
    return rng.poisson(expected).astype(float)


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_deep_overlaps_are_split_or_agglomerates_never_one_particle(detector):
    # centres 0.2-0.65 contact distances apart: one round outline, no notch worth splitting
    ratios = np.linspace(0.2, 0.65, 16)
    image, groups, _ = _thickness_frame(detector, seed=7, ratios=ratios)
    raw = segment(image, 1.0)
    s = separate(raw, 1.0, image=image)
    one = 0
    for centres in groups[:len(ratios)]:
        ids = {_at(s.labels, {"y_px": y, "x_px": x}) for y, x in centres}
        one += len(ids) == 1 and 0 not in ids  # both centres in the same measured particle
    assert one == 0
    # a pair not split into two particles is reported: its centres lie in agglomerate boxes
    for centres in groups[:len(ratios)]:
        for y, x in centres:
            if _at(s.labels, {"y_px": y, "x_px": x}) == 0:
                assert any(r0 <= y < r1 and c0 <= x < c1
                           for r0, c0, r1, c1 in s.agglomerate_boxes)
    # without the image (shape alone) most of them are measured as one particle: the test
    # sees what the thickness check adds
    shape_only = separate(raw, 1.0)
    merged = sum(len({_at(shape_only.labels, {"y_px": y, "x_px": x}) for y, x in c}) == 1
                 for c in groups[:len(ratios)])
    assert merged >= len(ratios) // 2
    # isolated spheres stay single particles, none lost to the thickness check
    single = [_at(s.labels, {"y_px": c[0][0], "x_px": c[0][1]}) for c in groups[len(ratios):]]
    assert np.count_nonzero(np.asarray(single) == 0) <= max(1, 0.01 * len(single))
    assert len(set(single)) == len(single)


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_deep_sphere_overlaps_split_into_their_discs_by_thickness(detector):
    # centres 0.45-0.65 contact distances apart: the blurred neck leaves no notch, the
    # thickness check finds the lens; the outline is still two circular arcs
    ratios = np.linspace(0.45, 0.65, 12)
    image, groups, radii = _thickness_frame(detector, seed=11, ratios=ratios)
    raw = segment(image, 1.0)
    s = separate(raw, 1.0, image=image)
    t = measure(s.labels, image, 1.0, masks=s.masks)
    good = 0
    for centres, rr in zip(groups[:len(ratios)], radii):
        ids = [_at(s.labels, {"y_px": y, "x_px": x}) for y, x in centres]
        if 0 in ids or ids[0] == ids[1]:
            continue
        ecd = [t["ecd_nm"][int(np.flatnonzero(t["particle_id"] == k)[0])] for k in ids]
        good += all(abs(e / (2 * r) - 1) <= 0.05 for e, r in zip(ecd, rr))
    # shape alone splits few of them (the thickness check boxed them before)
    shape_only = separate(raw, 1.0)
    shape_good = sum(len({_at(shape_only.labels, {"y_px": y, "x_px": x}) for y, x in c}) == 2
                     for c in groups[:len(ratios)])
    assert shape_good <= len(ratios) // 2
    assert good >= 0.75 * len(ratios)


@pytest.mark.parametrize("sample, detector", [("au10", "bf"), ("au10", "haadf"),
                                              ("cubes", None)])
def test_fewer_merged_groups_measured_as_one_in_simulated_frames(sample, detector):
    def multi_rate(s, truth):
        at = np.array([_at(s.labels, p) for p in truth["particles"]])
        counts = np.bincount(at[at > 0])
        return np.count_nonzero(counts > 1), np.count_nonzero(counts)

    with_image = shape_only = np.zeros(2)
    lost = isolated = 0
    for image, px, raw, truth in _frames(sample, 2, detector=detector):
        s = separate(raw, px, image=image)
        with_image = with_image + multi_rate(s, truth)
        shape_only = shape_only + multi_rate(separate(raw, px), truth)
        for k in _isolated_regions(raw, truth):
            isolated += 1
            lost += not np.any(s.labels[raw == k])
    assert isolated >= 50
    # particles holding several truth centres (a merged group measured as one): shape alone
    # leaves 10-13%; the thickness check must remove a clear share of them
    assert with_image[0] / with_image[1] <= 0.75 * shape_only[0] / shape_only[1]
    assert lost <= max(1, 0.01 * isolated)


def _markers_step_by_step(mask, depth):
    """The UECS erosion search one erosion step and one ``ndi.label`` at a time.

    The definition :func:`separate` implements on a stack of all erosion levels at once
    (kept here to check that the two agree marker for marker).
    """
    from particlewatch.analysis.separate import _is_convex

    def convex(m):
        return _is_convex(m, int(m.sum()), px=1.5, frac=0.1)

    markers, todo = [], [(mask, 0)]
    while todo:
        piece, s = todo.pop()
        tested, gap = s, 1
        while True:
            s += 1
            core = piece & (depth > s)
            lab, n = ndi.label(core)
            if n == 0:
                markers.append((piece, s - 1))
                break
            if n > 1:
                sizes = np.bincount(lab.ravel(), minlength=n + 1)
                deep = np.bincount(lab[core & (depth >= s + 0.5)], minlength=n + 1)
                real = [k for k in range(1, n + 1) if deep[k] and sizes[k] > 2]
                if len(real) <= 1:
                    piece = lab == real[0] if real else core
                    continue
                for child in (lab == k for k in real):
                    (markers if convex(child) else todo).append((child, s))
                break
            piece = core
            if s >= tested + gap:
                if convex(core):
                    markers.append((core, s))
                    break
                tested, gap = s, 2 * gap
    return markers


def test_erosion_search_on_level_stack_matches_step_by_step():
    from particlewatch.analysis.separate import _markers

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :160]
    checked = 0
    for _ in range(25):
        # clusters of 2-5 overlapping discs of mixed sizes, with ragged (noisy) outlines
        k = rng.integers(2, 6)
        centres = 80 + rng.normal(0, 18, (k, 2))
        radii = rng.uniform(6, 22, k)
        d = np.min([np.hypot(yy - cy, xx - cx) - r for (cy, cx), r in zip(centres, radii)],
                   axis=0)
        lab, n = ndi.label(d + rng.normal(0, 0.6, d.shape) < 0)
        if n == 0:
            continue
        region = lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])
        depth = ndi.distance_transform_edt(region)
        fast = _markers(region, depth)
        slow = _markers_step_by_step(region, depth)
        assert len(fast) == len(slow)
        for (m, steps, box), (m_ref, steps_ref) in zip(fast, slow):
            assert steps == steps_ref and np.array_equal(m, m_ref)
            assert m[box].sum() == m.sum()  # the box holds the whole marker
        checked += len(slow) > 1
    assert checked >= 5  # most clusters really split


# -- nothing lost silently ----------------------------------------------------------------------

def _in_box(boxes, p):
    return any(r0 <= p["y_px"] < r1 and c0 <= p["x_px"] < c1 for r0, c0, r1, c1 in boxes)


def _silently_lost(s, raw, truth):
    """Groups of >= 2 true particles in one segmented region of which some member is measured
    while another is neither measured nor inside an agglomerate box, and the groups seen."""
    parts = truth["particles"]
    raw_at = np.array([_at(raw, p) for p in parts])
    out_at = np.array([_at(s.labels, p) for p in parts])
    holders = np.bincount(raw_at, minlength=int(raw.max()) + 1)
    lost = groups = 0
    for region in np.flatnonzero(holders[1:] >= 2) + 1:
        members = np.flatnonzero(raw_at == region)
        groups += 1
        dropped = [m for m in members
                   if out_at[m] == 0 and not _in_box(s.agglomerate_boxes, parts[m])]
        lost += bool(dropped) and bool(np.any(out_at[members] > 0))
    return lost, groups


@pytest.mark.parametrize("detector", [None, "haadf"])
def test_dense_bimodal_groups_never_lose_members_silently(detector):
    # 3-4 overlapping PS100 with PS50 among them: every member is measured or lies in an
    # agglomerate box, never dropped while a neighbour is measured as the whole group
    lost = groups = 0
    for image, px, raw, truth in _frames("ps-bimodal", 1, size=768, seed=5,
                                         detector=detector):
        s = separate(raw, px, image=image)
        a, b = _silently_lost(s, raw, truth)
        lost, groups = lost + a, groups + b
    assert groups >= 15
    assert lost == 0


def test_small_sphere_on_large_one_is_its_own_particle():
    # the neck filled in (blur): UECS erodes the small sphere away inside the large one's
    # marker; its free outline still gives it, at its size
    yy, xx = np.mgrid[:90, :110]
    big = np.hypot(yy - 45, xx - 40) < 24
    small = np.hypot(yy - 45, xx - 40 - 31) < 11
    neck = (np.abs(yy - 45) < 7) & (xx > 55) & (xx < 68)
    mask = big | small | neck
    s = separate(mask.astype(np.int32), 1.0)
    t = measure(s.labels, mask.astype(float), 1.0, masks=s.masks)
    assert s.labels.max() == 2 and s.agglomerates == 0
    order = np.argsort(t["x_px"])
    assert np.allclose(t["ecd_nm"][order], [48, 22], rtol=0.05)


def _square_frame(detector, *, seed, offsets, cell=56, grid=10, dose=400.0, blur=1.0):
    """Flat squares (side 18-24 px, any angle, uniform thickness) through a detector.

    The first ``len(offsets)`` cells hold two squares whose centres are ``offset`` × the
    mean side apart (overlapping: their lens is twice as thick), the others one square.
    Returns (image, [(centre, ...) per cell], [areas per cell]).
    """
    rng = np.random.default_rng(seed)
    size = cell * grid
    yy, xx = np.mgrid[:size, :size]
    thick = np.zeros((size, size))
    groups, areas = [], []
    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) * cell, (k % grid + 0.5) * cell
        sides = rng.uniform(18, 24, 2 if k < len(offsets) else 1)
        if k < len(offsets):
            a = rng.uniform(0, np.pi)
            off = np.array([np.sin(a), np.cos(a)]) * offsets[k] * sides.mean() / 2
            centres = [(cy - off[0], cx - off[1]), (cy + off[0], cx + off[1])]
        else:
            centres = [(cy, cx)]
        for (y, x), side in zip(centres, sides):
            t = rng.uniform(0, np.pi / 2)
            u = (yy - y) * np.cos(t) + (xx - x) * np.sin(t)
            v = -(yy - y) * np.sin(t) + (xx - x) * np.cos(t)
            thick += 16.0 * ((np.abs(u) < side / 2) & (np.abs(v) < side / 2))
        groups.append(centres)
        areas.append(sides ** 2)
    return _image_of(thick, detector, dose=dose, blur=blur, rng=rng), groups, areas


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_overlapping_flat_particles_split_at_their_thick_lens(detector):
    # flat squares overlapping by a third to a half of their side: the thickness check
    # boxed them (their outline is no pair of circles); the lens, twice as thick, splits them
    offsets = np.linspace(0.5, 0.7, 12)
    image, groups, areas = _square_frame(detector, seed=5, offsets=offsets)
    raw = segment(image, 1.0)
    s = separate(raw, 1.0, image=image)
    t = measure(s.labels, image, 1.0, masks=s.masks)
    good = one = 0
    for centres, aa in zip(groups[:len(offsets)], areas):
        ids = [_at(s.labels, {"y_px": y, "x_px": x}) for y, x in centres]
        one += ids[0] == ids[1] and ids[0] > 0
        if 0 in ids or ids[0] == ids[1]:
            continue
        area = [t["area_nm2"][int(np.flatnonzero(t["particle_id"] == k)[0])] for k in ids]
        # 10% in area: 5% in ECD
        good += all(abs(m / a - 1) <= 0.1 for m, a in zip(area, aa))
    # a pair not split is reported: its centres lie in agglomerate boxes
    for centres in groups[:len(offsets)]:
        for y, x in centres:
            if _at(s.labels, {"y_px": y, "x_px": x}) == 0:
                assert any(r0 <= y < r1 and c0 <= x < c1
                           for r0, c0, r1, c1 in s.agglomerate_boxes)
    assert one == 0
    # without the lens split none (all boxed); with it about 5 of 12 come out within 10% in
    # area (a crescent the other square cuts in two can go partly to the wrong member)
    assert good >= 0.25 * len(offsets)


def test_inline_circle_fit_is_circle_models_to_the_bit():
    """separate's Kasa fit (``_circle``) gives CircleModel's centre and radius exactly, and
    fails where it fails: it replaces CircleModel only to skip its per-call overhead."""
    from skimage.measure import CircleModel

    from particlewatch.analysis.separate import _circle

    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(3, 150))
        t = rng.uniform(0, rng.uniform(0.5, 2 * np.pi), n)
        r, cy, cx = rng.uniform(2, 80), rng.uniform(0, 500), rng.uniform(0, 500)
        pts = np.round(np.c_[cy + r * np.sin(t), cx + r * np.cos(t)]
                       + rng.normal(0, 0.7, (n, 2)))
        model, fit = CircleModel.from_estimate(pts), _circle(pts)
        assert (fit is None) == (not model)
        if fit is not None:
            assert np.array_equal(fit[0], model.center) and fit[1] == float(model.radius)
    # degenerate input: one point repeated, and three collinear points
    for pts in (np.full((12, 2), 5.0), np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])):
        assert (_circle(pts) is None) == (not CircleModel.from_estimate(pts))


def _sphere_rod_frame(detector, *, seed, n_pairs=16, cell=64, grid=8, dose=400.0, blur=1.0):
    """Spheres and rods (capsules) as projected thickness; the first ``n_pairs`` cells hold a
    sphere lying over one end of a rod. Returns (image, [(sphere centre, rod centre)])."""
    rng = np.random.default_rng(seed)
    size = cell * grid
    yy, xx = np.mgrid[:size, :size]
    thick = np.zeros((size, size))
    pairs = []

    def sphere(y, x, r):
        return 2 * np.sqrt(np.clip(r ** 2 - (yy - y) ** 2 - (xx - x) ** 2, 0, None))

    def rod(y, x, half, w, a):
        # distance to the axis segment: a capsule's projected thickness
        u, v = np.cos(a), np.sin(a)
        t = np.clip((yy - y) * v + (xx - x) * u, -half, half)
        d2 = (yy - y - t * v) ** 2 + (xx - x - t * u) ** 2
        return 2 * np.sqrt(np.clip(w ** 2 - d2, 0, None))

    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) * cell, (k % grid + 0.5) * cell
        r, w, half, a = rng.uniform(11, 13), rng.uniform(6, 7), rng.uniform(12, 14), rng.uniform(0, np.pi)
        if k < n_pairs:
            # the sphere's centre beyond the rod's end by a fraction of its radius
            u, v = np.cos(a), np.sin(a)
            off = half + w + r * rng.uniform(0.2, 0.5)
            ry, rx = cy - 0.35 * off * v, cx - 0.35 * off * u
            sy, sx = ry + off * v, rx + off * u
            thick += rod(ry, rx, half, w, a) + sphere(sy, sx, r)
            pairs.append(((sy, sx), (ry, rx)))
        elif k % 2:
            thick += sphere(cy, cx, r)
        else:
            thick += rod(cy, cx, half, w, a)
    if detector == "bf":
        expected = dose * np.exp(-ndi.gaussian_filter(thick, blur) / 17.0)
    else:
        expected = dose * (0.1 + ndi.gaussian_filter(thick, blur) / 40.0)
    return rng.poisson(expected).astype(float), pairs



@pytest.mark.parametrize("detector", ["bf", "haadf"])
@pytest.mark.parametrize("seed", [1, 2])
def test_sphere_lying_on_a_rod_is_split_not_boxed_for_its_thickness(detector, seed):
    # the pixels a sphere and the rod under it share read as thick as both and are left out
    # of each one's thickness; a sphere that owns the rod's end (its extent is its pixels, it
    # has no mask) did not count them as shared: the thickness check took the pair for a
    # deep overlap and boxed it (5-6 of 16 pairs before)
    image, pairs = _sphere_rod_frame(detector, seed=seed)
    raw = segment(image, 1.0)
    s = separate(raw, 1.0, image=image)
    two = 0
    for sphere, rod in pairs:
        ids = {_at(s.labels, {"y_px": y, "x_px": x}) for y, x in (sphere, rod)}
        two += len(ids) == 2 and 0 not in ids
    assert two >= len(pairs) - 1
