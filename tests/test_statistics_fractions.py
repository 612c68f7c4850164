"""Population fractions: which particles they are counted on, and their interval, against the
simulator's ground truth."""

import numpy as np
import pytest

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
    s = summarize(table, labels, frames_ok=20, frames_failed=0, frames=frames)
    assert s["fraction_basis"] == "untouched"
    assert abs(s["populations"][0]["fraction"] - 0.5) < 0.03
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
    table["touching"] = rng.random(len(labels)) < 0.9  # almost everything touches
    s = summarize(table, labels, frames_ok=5, frames_failed=0,
                  frames=rng.integers(0, 5, len(labels)))
    assert s["fraction_basis"] == "isolated"


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
    for p, f in zip(pops, truth):
        lo, hi = p["fraction_ci95"]
        assert lo <= f <= hi
        assert abs(p["fraction"] - f) < 0.03
    # not counting the large particles left beside boxed piles moves PS50 towards the truth
    assert abs(pops[0]["fraction"] - truth[0]) < abs(old_small - truth[0])
