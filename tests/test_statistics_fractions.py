"""Population fractions: which particles they are counted on, and their interval, against the
simulator's ground truth."""

import numpy as np
import pytest

from scipy.spatial import cKDTree

from particlewatch.analysis.pipeline import touching_particles
from particlewatch.analysis.statistics import summarize


def _squares(lefts, *, side=16, width=120):
    """Labels 1, 2, ... of squares of ``side`` px starting at the given columns."""
    labels = np.zeros((40, width), np.int32)
    for k, c in enumerate(lefts, start=1):
        labels[10:10 + side, c:c + side] = k
    return labels


def test_touching_flags_neighbours_and_boxes():
    # gaps of 1 px (touching) and 6 px (apart) at the default 3 px margin
    flags = touching_particles(_squares([2, 19, 50, 72]), [1, 2, 3, 4])
    assert flags.tolist() == [True, True, False, False]
    # a box 2 px from a particle's edge touches it, one 10 px away does not
    lone = _squares([2])  # columns 2-17
    assert touching_particles(lone, [1], boxes=[(0, 20, 40, 40)]).tolist() == [True]
    assert touching_particles(lone, [1], boxes=[(0, 28, 40, 40)]).tolist() == [False]
    # a box holding the particle
    assert touching_particles(lone, [1], boxes=[(5, 0, 30, 25)]).tolist() == [True]
    assert touching_particles(lone, []).shape == (0,)
    # an id with no pixels (dropped) touches nothing
    assert touching_particles(lone, [1, 7]).tolist() == [False, False]


def _mixture_with_hidden_partners(rng, n):
    """Isolated particles of a 50/50 mixture, plus large ones whose small partners were lost
    to an agglomerate box: they were not split (``separated`` false) but touch the box."""
    small = rng.random(n) < 0.5
    ecd = np.where(small, rng.normal(55, 5, n), rng.normal(110, 9, n))
    lone_big = rng.normal(110, 9, n // 5)
    # pieces split from groups, measured large (regrown masks, unsplit pairs): sizes come
    # from the particles that were not split, whatever the fraction basis
    pieces = np.where(rng.random(n // 4) < 0.5, rng.normal(62, 5, n // 4),
                      rng.normal(120, 9, n // 4))
    table = {"ecd_nm": np.concatenate([ecd, lone_big, pieces]),
             "separated": np.concatenate([np.zeros(n + n // 5, bool), np.ones(n // 4, bool)]),
             "touching": np.concatenate([np.zeros(n, bool), np.ones(n // 5 + n // 4, bool)])}
    labels = (table["ecd_nm"] > 80).astype(int)
    return table, labels


def test_fractions_are_counted_on_particles_that_touch_nothing():
    rng = np.random.default_rng(3)
    table, labels = _mixture_with_hidden_partners(rng, 2000)
    frames = rng.integers(0, 20, len(labels))
    s = summarize(table, labels, frames_ok=20, frames_failed=0, frames=frames,
                  fraction_crowding=False)  # the basis alone
    assert s["fraction_basis"] == "untouched"
    assert abs(s["populations"][0]["fraction"] - 0.5) < 0.03
    # with the crowding correction (frames alike here) the interval still holds the truth
    lo, hi = summarize(table, labels, frames_ok=20, frames_failed=0, frames=frames,
                       fraction_crowding=True)["populations"][0]["fraction_ci95"]
    assert lo <= 0.5 <= hi
    # without the column the big ones next to the box count: the small fraction falls
    old = summarize({k: v for k, v in table.items() if k != "touching"}, labels,
                    frames_ok=20, frames_failed=0, frames=frames)
    assert old["fraction_basis"] == "isolated"
    assert old["populations"][0]["fraction"] < 0.45
    # sizes and counts are not affected by the fraction basis
    for a, b in zip(s["populations"], old["populations"]):
        assert a["n"] == b["n"] and a["n_size"] == b["n_size"] < a["n"]
        assert a["mean_ecd_nm"] == b["mean_ecd_nm"]
    assert s["all"]["mean_ecd_nm"] == old["all"]["mean_ecd_nm"]


def test_untouched_basis_needs_enough_particles():
    rng = np.random.default_rng(4)
    table, labels = _mixture_with_hidden_partners(rng, 400)
    table["touching"] = rng.random(len(labels)) < 0.97  # almost everything touches
    assert (~table["touching"] & ~table["separated"]).sum() < 50  # min_per_population
    s = summarize(table, labels, frames_ok=5, frames_failed=0,
                  frames=rng.integers(0, 5, len(labels)))
    assert s["fraction_basis"] == "isolated"


def _basis_sequence(frames, **kwargs):
    """``fraction_basis`` after each frame of a session (frames: list of tables)."""
    out = []
    for i in range(1, len(frames) + 1):
        table = {k: np.concatenate([f[k] for f in frames[:i]]) for k in frames[0]}
        codes = np.repeat(np.arange(i), [len(f["ecd_nm"]) for f in frames[:i]])
        labels = (table["ecd_nm"] > 80).astype(int)
        out.append(summarize(table, labels, frames_ok=i, frames_failed=0, frames=codes,
                             **kwargs)["fraction_basis"])
    return out


def test_fraction_basis_never_goes_back():
    # a session that starts in a sparse area (40% of the particles touch nothing) and goes on
    # in a dense one (5%): the untouched share falls through 20% as frames are added; the
    # basis must not fall back to "isolated" (the fraction would jump between bases)
    rng = np.random.default_rng(7)
    frames = []
    for i in range(30):
        n = 100
        free_share = 0.4 if i < 5 else 0.05
        frames.append({"ecd_nm": np.where(rng.random(n) < 0.5, rng.normal(55, 5, n),
                                          rng.normal(110, 9, n)),
                       "separated": rng.random(n) < 0.3,
                       "touching": rng.random(n) >= free_share})
    seq = _basis_sequence(frames)
    order = ["all", "isolated", "untouched"]
    ranks = [order.index(b) for b in seq]
    assert ranks == sorted(ranks)  # forward only
    assert seq[-1] == "untouched"
    # and it starts where too few particles stood alone yet: forward through every basis
    first = [{k: v[:20] for k, v in f.items()} for f in frames[:6]]
    seq = _basis_sequence(first)
    assert seq[0] == "all" and seq[-1] == "isolated"
    assert [order.index(b) for b in seq] == sorted(order.index(b) for b in seq)


def test_fraction_basis_does_not_depend_on_labels():
    # a refit moving particles to and from the outliers must not switch the basis
    rng = np.random.default_rng(8)
    n = 300
    table = {"ecd_nm": rng.normal(80, 30, n), "separated": rng.random(n) < 0.3,
             "touching": rng.random(n) < 0.75}
    codes = rng.integers(0, 6, n)
    labels = (table["ecd_nm"] > 80).astype(int)
    bases = set()
    for outliers in (0.0, 0.5, 0.8):
        lab = np.where(rng.random(n) < outliers, -1, labels)
        bases.add(summarize(table, lab, frames_ok=6, frames_failed=0,
                            frames=codes)["fraction_basis"])
    assert bases == {"untouched"}


def _poisson_frames(rng, n_frames, *, radii=(27.5, 55.0), share=0.5, size_nm=2560.0,
                    density=25e-6, margin_nm=8.0):
    """Frames of discs dropped at random (a Poisson field, density varying from frame to
    frame): a particle touches another when their outlines come within ``margin_nm``, so
    large particles touch more often. Returns the particle table (``separated`` false,
    ``touching``, ``frame``; discs cut by the frame edge dropped) and the true share of the
    small population over the same particles."""
    parts = []
    for f in range(n_frames):
        lam = density * rng.gamma(2.0, 0.5)
        m = rng.poisson(lam * size_nm ** 2)
        small = rng.random(m) < share
        r = np.where(small, rng.normal(radii[0], 0.09 * radii[0], m),
                     rng.normal(radii[1], 0.08 * radii[1], m))
        xy = rng.uniform(0.0, size_nm, (m, 2))
        touch = np.zeros(m, bool)
        pairs = cKDTree(xy).query_pairs(2 * r.max() + margin_nm, output_type="ndarray")
        if pairs.size:
            i, j = pairs.T
            hit = np.hypot(*(xy[i] - xy[j]).T) < r[i] + r[j] + margin_nm
            touch[pairs[hit].ravel()] = True
        inside = np.all((xy > r[:, None]) & (xy < size_nm - r[:, None]), axis=1)
        parts.append({"ecd_nm": 2 * r[inside], "separated": np.zeros(inside.sum(), bool),
                      "touching": touch[inside], "frame": np.full(inside.sum(), f)})
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return table, float(np.mean(table["ecd_nm"] < 2 * np.mean(radii)))


def test_crowding_correction_removes_the_size_bias_of_untouched_counts():
    # particles dropped at random: large ones touch more often, so counting untouched ones
    # over-counts the small population by several points (about 10 here, ~40% touching)
    rng = np.random.default_rng(11)
    table, truth = _poisson_frames(rng, 40)
    labels = (table["ecd_nm"] > 82.5).astype(int)
    kw = dict(frames_ok=40, frames_failed=0)
    plain = summarize(table, labels, fraction_crowding=False, **kw)["populations"][0]
    fixed = summarize(table, labels, **kw)["populations"][0]  # the default: corrected
    assert plain["fraction"] - truth > 0.05
    assert not plain["fraction_ci95"][0] <= truth <= plain["fraction_ci95"][1]
    # one session: the correction's own noise is ~2 points (half-width ~4.5)
    assert abs(fixed["fraction"] - truth) < 0.05
    assert fixed["fraction_ci95"][0] <= truth <= fixed["fraction_ci95"][1]


def _specimen_frames(sample, *, n_frames, seed, margin_px=3.5):
    """The simulator's own particles (true outlines, no image) over 1024² record fields at
    random occupied positions: ``touching`` when two outlines come within ``margin_px``
    (the pipeline's margin), ``separated`` when they come within a pixel (one region,
    split by separation), frame-edge particles dropped. Returns the table (with the true
    ``population``) and the true population shares."""
    from particlewatch.simulators.specimen import Specimen
    from particlewatch.simulators.truth import overlapping_pairs

    spec = Specimen(sample, seed=seed)
    pix = spec.sample.pixel_nm
    side = 1024 * pix
    rng = np.random.default_rng(seed)
    parts = []
    while len(parts) < n_frames:
        x0, y0 = rng.uniform(-55e3, 55e3 - side, 2)
        t = spec.particles_in(x0, y0, x0 + side, y0 + side)
        n = len(t["x_nm"])
        if n < 20:
            continue
        touch = np.zeros(n, bool)
        touch[overlapping_pairs(t, gap_nm=margin_px * pix).ravel()] = True
        # outlines closer than a pixel merge into one region, which separation splits
        merged = np.zeros(n, bool)
        merged[overlapping_pairs(t, gap_nm=pix).ravel()] = True
        inside = ((t["x_nm"] - t["hx_nm"] > x0) & (t["x_nm"] + t["hx_nm"] < x0 + side)
                  & (t["y_nm"] - t["hy_nm"] > y0) & (t["y_nm"] + t["hy_nm"] < y0 + side))
        k = int(inside.sum())
        parts.append({"ecd_nm": t["ecd_nm"][inside], "population": t["population"][inside],
                      "separated": merged[inside], "touching": touch[inside],
                      "frame": np.full(k, len(parts))})
    table = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return table, np.bincount(table["population"]) / len(table["population"])


@pytest.mark.parametrize("sample", ["ps-bimodal", "spheres-rods"])
def test_fractions_on_the_simulators_touching(sample):
    # with true outlines, counting untouched particles is nearly unbiased on the simulator's
    # frames (its agglomerates pick their members whatever their size; singles are spread
    # out, so chance contacts are few), and the crowding correction must keep it so: four
    # sessions of 40 fields, each within 3 points of the truth and inside its interval,
    # with and without the correction
    for seed in (1, 2, 3, 4):
        table, truth = _specimen_frames(sample, n_frames=40, seed=seed)
        labels = table.pop("population")
        for crowding in (True, False):
            s = summarize(table, labels, frames_ok=40, frames_failed=0,
                          fraction_crowding=crowding)
            assert s["fraction_basis"] == "untouched"
            p = s["populations"][0]
            f = truth[p["id"]]
            assert abs(p["fraction"] - f) < 0.03
            assert p["fraction_ci95"][0] <= f <= p["fraction_ci95"][1]


def _frames_with_truth(sample, *, frames, size_px, seed, detector=None):
    """Analysed frames (segment → separate → measure, and the pipeline's ``touching`` column
    from the outlines and agglomerate boxes), and the true fraction of each population over
    the same frames (particles that do not touch the frame's edge, as the analysis keeps)."""
    from particlewatch.analysis.pipeline import analyze_image
    from particlewatch.simulators.scope import SimScope

    scope = SimScope(sample, seed=seed, size_px=size_px, detector=detector)
    tables, true_pop = [], []
    for i in frames:
        # a raster of fields 7.3 × 8.1 µm apart; about a quarter of the grid is bare
        scope.move_stage(-40.0 + 7.3 * (i % 10), -35.0 + 8.1 * (i // 10))
        scope.set_defocus(scope.true_focus_um())
        im = scope.snap()
        particles, _, _ = analyze_image(im.image, im.pixel_nm)  # with its touching column
        particles["frame"] = np.full(len(particles["ecd_nm"]), i)
        tables.append(particles)
        true_pop += [q["population"] for q in im.truth["particles"] if not q["touches_edge"]]
    table = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    return table, np.bincount(true_pop, minlength=2) / len(true_pop)


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_ps_bimodal_fractions_against_simulator_truth(detector):
    from particlewatch.analysis.populations import find_populations

    # twelve occupied fields (~1,000 particles; issue 5: fractions within 3 points)
    table, truth = _frames_with_truth("ps-bimodal", frames=(5, 6, 7, 8, 9, 16, 17, 18, 19, 25,
                                                            26, 27),
                                      size_px=1024, seed=3, detector=detector)
    labels = find_populations({k: v for k, v in table.items() if k != "frame"})
    s = summarize(table, labels, frames_ok=12, frames_failed=0)
    assert s["fraction_basis"] == "untouched"
    pops = sorted(s["populations"], key=lambda p: p["mean_ecd_nm"])
    assert len(pops) == 2
    old = summarize({k: v for k, v in table.items() if k != "touching"}, labels,
                    frames_ok=12, frames_failed=0)
    old_small = min(old["populations"], key=lambda p: p["mean_ecd_nm"])["fraction"]
    plain = summarize(table, labels, frames_ok=12, frames_failed=0, fraction_crowding=False)
    plain_small = min(plain["populations"], key=lambda p: p["mean_ecd_nm"])["fraction"]
    for p, f in zip(pops, truth):
        lo, hi = p["fraction_ci95"]
        assert lo <= f <= hi
        assert abs(p["fraction"] - f) < 0.03
    # not counting the large particles left beside boxed piles moves PS50 towards the truth
    assert abs(plain_small - truth[0]) < abs(old_small - truth[0])
    # and the crowding correction (default) does not move it away by more than a point
    assert abs(pops[0]["fraction"] - truth[0]) < abs(plain_small - truth[0]) + 0.01
