"""Population finding against ground truth: simulator size models and truth tables."""

import numpy as np
import pytest

from particlewatch.analysis.populations import (ashman_d, find_populations, fit_populations,
                                                population_features)
from particlewatch.simulators import shapes
from particlewatch.simulators.samples import SAMPLES, Population, SampleSpec
from particlewatch.simulators.specimen import Specimen


def _shape_measures(pop, n, rng):
    """Exact outline measures of ``n`` particles drawn from the simulator's size model."""
    a = np.clip(rng.normal(pop.size_nm, pop.size_sd_nm, n), pop.size_nm - 4 * pop.size_sd_nm,
                pop.size_nm + 4 * pop.size_sd_nm)
    b = a
    if pop.shape == "rod":
        b = np.minimum(rng.normal(pop.width_nm, pop.width_sd_nm, n), a)
    p = rng.uniform(*pop.p_range, n) if pop.shape == "cube" else np.full(n, 2.0)
    m = shapes.measures(shapes.SHAPES.index(pop.shape), a=a, b=b, p=p)
    if pop.shape == "rod":
        perimeter = 2 * (a - b) + np.pi * b
        m["circularity"] = 4 * np.pi * m["area_nm2"] / perimeter ** 2
    elif pop.shape == "cube":
        m["circularity"] = 0.785 + 0.5 / p  # a square is π/4, rounder corners more
    else:
        m["circularity"] = np.full(n, 0.97)
    m["shell_nm"] = (rng.normal(pop.shell_nm, pop.shell_sd_nm, n) if pop.shape == "capsule"
                     else np.full(n, np.nan))
    return m


def measured_table(spec, n, *, seed=0, outliers=0.06):
    """A particle table as image analysis would measure it, with known truth.

    Sizes come from the simulator's population models (exact outline measures), with 1%
    measurement noise on sizes and realistic scatter on the shape factors; a fraction
    ``outliers`` are agglomerates (2–4 touching particles measured as one: large, elongated,
    non-convex) and debris (small, irregular fragments).

    Returns
    -------
    table : dict of ndarray
    truth : ndarray of int
        True population per row, -1 for the outliers added.
    """
    rng = np.random.default_rng(seed)
    fractions = np.array([p.fraction for p in spec.populations])
    n_out = int(round(outliers * n))
    pop = rng.choice(len(fractions), size=n - n_out, p=fractions / fractions.sum())
    cols = {k: np.zeros(n) for k in ("area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm",
                                     "circularity", "solidity", "convexity", "shell_nm")}
    truth = np.full(n, -1)
    for i, pp in enumerate(spec.populations):
        sel = np.flatnonzero(pop == i)
        m = _shape_measures(pp, len(sel), rng)
        noise = 1 + rng.normal(0, 0.01, len(sel))
        for k in ("area_nm2",):
            cols[k][sel] = m[k] * noise ** 2
        for k in ("ecd_nm", "feret_max_nm", "feret_min_nm"):
            cols[k][sel] = m[k] * noise
        # pixelation: the measured min Feret of a round particle is a little under its max
        cols["feret_min_nm"][sel] *= 1 - np.abs(rng.normal(0, 0.02, len(sel)))
        cols["circularity"][sel] = np.clip(m["circularity"] + rng.normal(0, 0.015, len(sel)),
                                           0, 1)
        # measure() caps solidity at 1.0: a point mass that must not become a population
        cols["solidity"][sel] = np.clip(rng.normal(0.99, 0.01, len(sel)), 0, 1)
        cols["convexity"][sel] = np.clip(rng.normal(0.99, 0.005, len(sel)), 0, 1)
        cols["shell_nm"][sel] = m["shell_nm"]
        truth[sel] = i
    out = np.arange(n - n_out, n)
    base = np.array([p.size_nm for p in spec.populations])[rng.integers(0, len(fractions),
                                                                          n_out)]
    agg = rng.random(n_out) < 0.6
    k = rng.integers(2, 5, n_out)
    ecd = np.where(agg, base * np.sqrt(k) * 0.95, base * rng.uniform(0.15, 0.4, n_out))
    aspect = np.where(agg, rng.uniform(1.6, 2.8, n_out), rng.uniform(1.2, 2.5, n_out))
    cols["ecd_nm"][out] = ecd
    cols["area_nm2"][out] = np.pi * ecd ** 2 / 4
    cols["feret_max_nm"][out] = ecd * np.sqrt(aspect)
    cols["feret_min_nm"][out] = ecd / np.sqrt(aspect)
    cols["circularity"][out] = rng.uniform(0.4, 0.75, n_out)
    cols["solidity"][out] = rng.uniform(0.7, 0.88, n_out)
    cols["convexity"][out] = rng.uniform(0.8, 0.93, n_out)
    cols["shell_nm"][out] = np.nan
    cols["aspect_ratio"] = cols["feret_max_nm"] / cols["feret_min_nm"]
    order = rng.permutation(n)
    return {k: v[order] for k, v in cols.items()}, truth[order]


def _true_means(spec, table, truth):
    return [table["ecd_nm"][truth == i].mean() for i in range(len(spec.populations))]


def _model_mean_ecd(pop, rng):
    return _shape_measures(pop, 200_000, rng)["ecd_nm"].mean()


def test_ps_bimodal_two_populations_means_and_fractions():
    spec = SAMPLES["ps-bimodal"]
    table, truth = measured_table(spec, 3000, seed=1)
    labels = find_populations(table)
    assert sorted(set(labels.tolist()) - {-1}) == [0, 1]
    rng = np.random.default_rng(5)
    inliers = labels >= 0
    for i, pp in enumerate(spec.populations):  # ids ordered by size like the spec
        mean = table["ecd_nm"][labels == i].mean()
        assert abs(mean / _model_mean_ecd(pp, rng) - 1) < 0.02
        fraction = (labels[inliers] == i).mean()
        assert abs(fraction - pp.fraction) < 0.03
    # most added agglomerates and debris are flagged, few real particles are lost
    assert (labels[truth == -1] == -1).mean() > 0.8
    assert (labels[truth >= 0] == -1).mean() < 0.02


@pytest.mark.parametrize("name", ["au10", "ps100", "silica-capsules"])
def test_monodisperse_samples_are_one_population(name):
    spec = SAMPLES[name]
    table, truth = measured_table(spec, 2000, seed=2)
    labels = find_populations(table)
    assert sorted(set(labels.tolist()) - {-1}) == [0]
    mean = table["ecd_nm"][labels == 0].mean()
    truth_mean = _model_mean_ecd(spec.populations[0], np.random.default_rng(3))
    assert abs(mean / truth_mean - 1) < 0.015
    assert (labels[truth == -1] == -1).mean() > 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_unimodal_is_not_split(seed):
    # a broad, skewed (log-normal, CV ~35%) single population: BIC alone would split it
    rng = np.random.default_rng(seed)
    d = rng.lognormal(np.log(70), 0.35, 4000)
    table = {"ecd_nm": d, "aspect_ratio": 1 + np.abs(rng.normal(0, 0.04, d.size)),
             "circularity": np.clip(rng.normal(0.95, 0.02, d.size), 0, 1)}
    labels = find_populations(table, seed=seed)
    assert set(labels.tolist()) - {-1} == {0}
    assert (labels == -1).mean() < 0.01


def test_spheres_and_rods_of_similar_ecd_separate_by_shape():
    spec = SAMPLES["spheres-rods"]
    table, truth = measured_table(spec, 2000, seed=4)
    ecd_sphere = table["ecd_nm"][truth == 0].mean()
    ecd_rod = table["ecd_nm"][truth == 1].mean()
    assert abs(ecd_sphere / ecd_rod - 1) < 0.1  # size alone cannot tell them apart
    labels = find_populations(table)
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) == 2
    # each found population is one true population (purity), whatever its id
    for pid in ids:
        counts = np.bincount(truth[(labels == pid) & (truth >= 0)], minlength=2)
        assert counts.max() / counts.sum() > 0.98
    rod_id = max(ids, key=lambda i: table["aspect_ratio"][labels == i].mean())
    assert abs(table["feret_max_nm"][labels == rod_id].mean() / 39.0 - 1) < 0.03


def test_spheres_and_cubes_of_similar_ecd_separate_by_shape():
    spec = SampleSpec("mix", "spheres and cubes", (
        Population("sphere", "au", 20.0, 2.0, fraction=0.6),
        Population("cube", "pd", 18.0, 1.8, p_range=(5.0, 20.0), fraction=0.4)),
        pixel_nm=1.0, detector="haadf")
    table, truth = measured_table(spec, 2000, seed=5)
    labels = find_populations(table)
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) == 2
    for pid in ids:
        counts = np.bincount(truth[(labels == pid) & (truth >= 0)], minlength=2)
        assert counts.max() / counts.sum() > 0.97


def _truth_table(sample, *, seed=0, n=2500):
    """Exact truth of a simulated grid region (the simulator's truth columns only)."""
    specimen = Specimen(sample, seed=seed)
    half = 4000.0
    table = specimen.particles_in(-half, -half, half, half)
    while len(table["ecd_nm"]) < n and half < 40_000:
        half *= 1.6
        table = specimen.particles_in(-half, -half, half, half)
    keep = np.arange(min(n, len(table["ecd_nm"])))
    return {k: table[k][keep] for k in ("ecd_nm", "feret_max_nm", "feret_min_nm",
                                        "population")}


@pytest.mark.parametrize("sample", ["ps-bimodal", "spheres-rods"])
def test_simulator_truth_tables_recover_true_populations(sample):
    truth = _truth_table(sample, seed=3)
    pop = truth.pop("population")
    assert len(pop) > 500
    labels = find_populations(truth)
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) == 2
    agree = max(np.mean(labels == pop), np.mean(labels == 1 - pop))
    assert agree > 0.98
    for pid in ids:
        true_id = np.bincount(pop[labels == pid]).argmax()
        true_mean = truth["ecd_nm"][pop == true_id].mean()
        assert abs(truth["ecd_nm"][labels == pid].mean() / true_mean - 1) < 0.01


def test_kmeans_option_finds_bimodal_and_keeps_monodisperse_whole():
    table, _ = measured_table(SAMPLES["ps-bimodal"], 1500, seed=6)
    labels = find_populations(table, method="kmeans")
    assert sorted(set(labels.tolist()) - {-1}) == [0, 1]
    table, _ = measured_table(SAMPLES["au10"], 1500, seed=6)
    labels = find_populations(table, method="kmeans")
    assert sorted(set(labels.tolist()) - {-1}) == [0]


@pytest.mark.parametrize("method", ["dbscan", "optics"])
def test_density_methods_leave_outliers_out(method):
    table, truth = measured_table(SAMPLES["spheres-rods"], 1200, seed=7)
    labels = find_populations(table, method=method)
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) >= 2
    # the two largest clusters are the two true populations
    big = sorted(ids, key=lambda i: -(labels == i).sum())[:2]
    for pid in big:
        counts = np.bincount(truth[(labels == pid) & (truth >= 0)], minlength=2)
        assert counts.max() / counts.sum() > 0.95
    assert (labels[truth == -1] == -1).mean() > 0.5


def test_optics_on_thousands_of_particles_keeps_a_small_population():
    # OPTICS clusters a subsample of a large table and classifies the rest: a population
    # of 8% must still be found whole, with its own mean and fraction
    spec = SampleSpec("mix3", "spheres, rods and large spheres", (
        Population("sphere", "au", 24.0, 2.0, fraction=0.55),
        Population("rod", "au", 39.0, 3.5, width_nm=12.0, width_sd_nm=1.2, fraction=0.37),
        Population("sphere", "au", 60.0, 5.0, fraction=0.08)), pixel_nm=0.8,
        detector="haadf")
    table, truth = measured_table(spec, 5000, seed=9)
    labels = find_populations(table, method="optics")
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) == 3
    inliers = labels >= 0
    for pid in ids:
        counts = np.bincount(truth[(labels == pid) & (truth >= 0)], minlength=3)
        true_id = int(counts.argmax())
        assert counts[true_id] / counts.sum() > 0.97
        assert abs((labels[inliers] == pid).mean() - spec.populations[true_id].fraction) < 0.03
        true_mean = table["ecd_nm"][truth == true_id].mean()
        assert abs(table["ecd_nm"][labels == pid].mean() / true_mean - 1) < 0.02
    assert (labels[truth == -1] == -1).mean() > 0.8
    assert (labels[truth >= 0] == -1).mean() < 0.08


def test_max_populations_is_respected():
    rng = np.random.default_rng(8)
    d = np.concatenate([rng.normal(m, 0.04 * m, 400) for m in (10, 20, 40, 80)])
    labels = find_populations({"ecd_nm": d})
    assert sorted(set(labels.tolist()) - {-1}) == [0, 1, 2, 3]
    labels = find_populations({"ecd_nm": d}, max_populations=2)
    assert len(set(labels.tolist()) - {-1}) == 2


def test_model_labels_new_particles_like_the_fit():
    table, _ = measured_table(SAMPLES["ps-bimodal"], 2000, seed=9)
    model = fit_populations(table, seed=0)
    new, truth = measured_table(SAMPLES["ps-bimodal"], 500, seed=10)
    labels = model.predict(new)
    ok = truth >= 0
    assert np.mean(labels[ok] == truth[ok]) > 0.98


def test_degenerate_tables():
    assert find_populations({"ecd_nm": np.zeros(0)}).shape == (0,)
    labels = find_populations({"ecd_nm": np.array([10.0, 11.0, np.nan, -1.0, 9.5])})
    assert labels.tolist() == [0, 0, -1, -1, 0]
    X, names, valid = population_features({"ecd_nm": np.array([1.0, 2.0]),
                                           "feret_max_nm": np.array([2.0, 2.0]),
                                           "feret_min_nm": np.array([1.0, np.nan])})
    assert names == ("log_ecd", "log_aspect_ratio") and valid.all()
    assert np.isfinite(X).all()


def test_bad_input_messages():
    with pytest.raises(ValueError, match="ecd_nm"):
        find_populations({"area_nm2": np.ones(3)})
    with pytest.raises(ValueError, match="method 'ward'"):
        find_populations({"ecd_nm": np.ones(3)}, method="ward")
    with pytest.raises(ValueError, match="max_populations"):
        find_populations({"ecd_nm": np.ones(3)}, max_populations=0)


def test_ashman_d_of_known_gaussians():
    # equal unit variances, means 3 apart: D = sqrt(2)·3/sqrt(2) = 3
    d = ashman_d(np.zeros(2), np.eye(2), np.array([3.0, 0.0]), np.eye(2))
    assert d == pytest.approx(3.0)


def test_merged_doublets_of_a_round_population_are_outliers():
    """Two spheres overlapping into one ellipse-like outline cannot be split; as elongated
    members of a round population they are left out of its statistics."""
    rng = np.random.default_rng(11)
    n, n_doublets = 1500, 30  # too few to form a population of their own
    ecd = np.concatenate([rng.normal(10, 1.5, n), rng.normal(12.5, 1.0, n_doublets)])
    aspect = np.concatenate([1.0 + np.abs(rng.normal(0, 0.03, n)),
                             rng.uniform(1.28, 1.45, n_doublets)])
    labels = find_populations({"ecd_nm": ecd, "aspect_ratio": aspect})
    assert set(labels[:n].tolist()) == {0} or np.mean(labels[:n] == 0) > 0.99
    assert np.mean(labels[n:] == -1) > 0.9


def test_rods_natural_length_spread_is_kept():
    rng = np.random.default_rng(12)
    aspect = rng.normal(3.25, 0.5, 1500).clip(1.8)
    ecd = rng.normal(22, 2, 1500)
    labels = find_populations({"ecd_nm": ecd, "aspect_ratio": aspect})
    assert np.mean(labels == 0) > 0.98


def _with_merged_pieces(table, truth, *, seed, split_share=0.35, merged_share=0.25):
    """Mark a share of the particles as split out of touching groups, as separation does.

    Split pieces are measured from regrown masks: slightly elongated and less round than
    isolated particles; ``merged_share`` of them are in fact two overlapping particles of
    the same population that could not be split (ECD of the union of two discs whose
    centres are 0.3–0.8 diameters apart: 1.15–1.6× one particle, still convex).
    Returns the table with ``separated`` and the truth with -1 for the merged pieces.
    """
    rng = np.random.default_rng(seed)
    table = {k: np.array(v, dtype=float) for k, v in table.items()}
    truth = truth.copy()
    n = len(truth)
    real = truth >= 0
    split = real & (rng.random(n) < split_share)
    merged = split & (rng.random(n) < merged_share)
    # two equal discs of diameter d, centres s·d apart: area grows by the lens they do not
    # share; its ECD ratio to one disc
    s = rng.uniform(0.3, 0.8, n)
    lens = (2 * np.arccos(s) - 2 * s * np.sqrt(1 - s ** 2)) / np.pi  # shared area / disc
    grow = np.sqrt(2 - lens)
    for k in ("ecd_nm", "feret_min_nm"):
        table[k][merged] *= grow[merged]
    table["feret_max_nm"][merged] *= (1 + s[merged]) * 1.0
    table["area_nm2"][merged] *= grow[merged] ** 2
    table["aspect_ratio"] = table["feret_max_nm"] / table["feret_min_nm"]
    table["circularity"][split] -= np.abs(rng.normal(0.03, 0.015, split.sum()))
    table["solidity"][split] = np.clip(rng.normal(0.98, 0.006, split.sum()), 0, 1)
    table["separated"] = split
    truth[merged] = -1
    return table, truth


@pytest.mark.parametrize("name", ["ps-bimodal", "au10", "ps100"])
def test_merged_pieces_from_separation_do_not_bias_the_means(name):
    """Overlapping particles that separation could not split form a tail of large, convex
    pieces; the populations are learnt from the isolated particles, so these pieces do not
    widen them (nor form a population of their own) and the means stay on the truth."""
    spec = SAMPLES[name]
    table, truth = measured_table(spec, 4000, seed=13, outliers=0.03)
    table, truth = _with_merged_pieces(table, truth, seed=14)
    labels = find_populations(table)
    assert sorted(set(labels.tolist()) - {-1}) == list(range(len(spec.populations)))
    rng = np.random.default_rng(15)
    for i, pp in enumerate(spec.populations):
        mean = table["ecd_nm"][labels == i].mean()
        assert abs(mean / _model_mean_ecd(pp, rng) - 1) < 0.01
    merged = (truth == -1) & table["separated"]
    assert (labels[merged] == -1).mean() > 0.6
    assert (labels[truth >= 0] == -1).mean() < 0.05
    # fitted on every particle alike (no `separated` column) the tail pulls the mean up
    plain = find_populations({k: v for k, v in table.items() if k != "separated"})
    big = max(set(plain.tolist()) - {-1})
    big_mean = table["ecd_nm"][plain == big].mean()
    assert big_mean > table["ecd_nm"][labels == len(spec.populations) - 1].mean()


def test_star_shaped_population_is_kept_by_its_own_solidity():
    """Solidity marks agglomerates relative to the population's own solidity: a sample of
    star-shaped particles (solidity ~0.7) is a population, not a sample of outliers."""
    rng = np.random.default_rng(16)
    n = 1500
    solidity = np.clip(rng.normal(0.72, 0.03, n), 0, 1)
    table = {"ecd_nm": rng.normal(15.0, 1.5, n),
             "aspect_ratio": 1 + np.abs(rng.normal(0.05, 0.03, n)),
             "circularity": np.clip(rng.normal(0.45, 0.04, n), 0, 1), "solidity": solidity}
    labels = find_populations(table)
    assert set(labels.tolist()) - {-1} == {0}
    assert (labels == -1).mean() < 0.02
    # a fragment far less solid than the stars themselves is still an outlier
    table = {k: np.append(v, v[:20]) for k, v in table.items()}
    table["solidity"][-20:] = 0.4
    labels = find_populations(table)
    assert np.all(labels[-20:] == -1)


def _analysed_frames(sample, *, frames, size_px, seed):
    """Particle tables from simulated frames through segment → separate → measure, and for
    each particle whether it is one true particle (its nearest true centre within a quarter
    diameter and its ECD within 12% of that particle's)."""
    from scipy.spatial import cKDTree

    from particlewatch.analysis.pipeline import analyze_image
    from particlewatch.simulators.scope import SimScope

    scope = SimScope(sample, seed=seed, size_px=size_px)
    tables, single, true_pop, truth = [], [], [], []
    for i in range(frames):
        scope.move_stage(-30.0 + 11.0 * i, 20.0 - 9.0 * i)
        scope.set_defocus(scope.true_focus_um())
        im = scope.snap()
        particles, _, _ = analyze_image(im.image, im.pixel_nm)
        true = im.truth["particles"]
        xy = np.array([[q["x_px"], q["y_px"]] for q in true]).reshape(-1, 2)
        ecd = np.array([q["ecd_nm"] for q in true])
        dist, j = cKDTree(xy).query(np.column_stack([particles["x_px"], particles["y_px"]]))
        single.append((particles["ecd_nm"] / ecd[j] < 1.12)
                      & (dist * im.pixel_nm < 0.25 * ecd[j]))
        true_pop.append(np.array([q["population"] for q in true])[j])
        particles["frame"] = np.full(len(j), i)
        tables.append(particles)
        truth += [q for q in true if not q["touches_edge"]]
    table = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    return table, np.concatenate(single), np.concatenate(true_pop), truth


def test_au10_analysis_output_is_one_population_without_merged_pieces():
    table, single, _, truth = _analysed_frames("au10", frames=4, size_px=1024, seed=5)
    assert len(table["ecd_nm"]) > 500 and table["separated"].any() and not single.all()
    labels = find_populations(table)
    assert set(labels.tolist()) - {-1} == {0}
    member = labels == 0
    alone = ~np.asarray(table["separated"], dtype=bool)
    # split pieces are measured like isolated particles now: a piece that is one particle
    # is a member, not an outlier of shape (a rebuilt outline is rounder than a segmented one)
    # (0.849 of 126 such pieces at 356c755, ~0.87 before separate's fill/trim: a few more
    # split pieces now fall outside the shape model; noted in issue 4)
    assert (labels[single & ~alone] == 0).mean() > 0.8
    assert (labels[single & alone] == 0).mean() > 0.98
    # round merged pieces of a plausible size cannot be told from a large member, so the
    # sizes come from members that stood alone: no merged pieces pulling that mean up
    mean = table["ecd_nm"][member & alone].mean()
    assert abs(mean / table["ecd_nm"][member & single].mean() - 1) < 0.005
    assert abs(table["ecd_nm"][member].mean() / mean - 1) < 0.01
    # and the whole chain against the truth (segmentation measures gold ~1% small)
    true_mean = np.mean([q["ecd_nm"] for q in truth])
    assert abs(mean / true_mean - 1) < 0.02


def test_spheres_and_rods_in_analysis_output_separate_by_shape():
    table, single, true_pop, _ = _analysed_frames("spheres-rods", frames=4, size_px=1024,
                                                  seed=5)
    labels = find_populations(table)
    ids = sorted(set(labels.tolist()) - {-1})
    assert len(ids) == 2
    for pid in ids:
        counts = np.bincount(true_pop[(labels == pid) & single], minlength=2)
        assert counts.max() / counts.sum() > 0.95
