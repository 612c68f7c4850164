"""Find particle populations: clustering on size and shape, with outliers left out.

Particles are described by a few features scaled to unit variance: log equivalent diameter
(sizes are multiplicative, and a log scale makes PS50 and PS100 equally wide), log aspect ratio
(spheres ~1, cubes ~1.2–1.4, rods ~3) and, where measured, circularity.

Populations are learnt from the particles that stood alone. A particle split out of a touching
group (``separated``) is measured from a regrown mask: its outline and size differ
systematically from an isolated particle's, and a fifth to a third of such pieces are in fact
two or more overlapping particles that could not be split (1.2–2× too large). Fitted on every
particle, these pieces form tails and even spurious populations (a "P1" of doublets in a gold
sample); fitted on isolated particles, the model describes single particles, and split pieces
are then judged against it — a piece that does not look like a member of any population is an
outlier. (All particles are used when too few stood alone: a heavily aggregated sample.)

Solidity is not a clustering feature (measured outlines of convex particles pile up at exactly
1.0, a point mass that a mixture would gladly call a population); it marks agglomerates and
fragments relative to each population's own solidity instead of by a fixed threshold, so a
population of star-shaped or irregular particles keeps its members: a particle is an outlier
when its solidity lies below its population's far-out fence ``Q1 − 3·IQR`` (Tukey 1977), with
the IQR floored at :data:`_SOLIDITY_RESOLUTION`, what an outline measurement resolves.

The default method (``"auto"``) fits Gaussian mixtures of 1 to ``max_populations + 2``
components and keeps the one with the lowest BIC (Schwarz 1978). A mixture component is not a
population: BIC splits a skewed or broad unimodal distribution into several Gaussians, and
absorbs agglomerates and debris in small, broad components. So components are then merged
until every pair of groups is clearly separated — Ashman's D > 2 along the pair's
discriminant direction (Ashman, Bird & Zepf 1994) *and* a dip in the mixture density between
them — and groups holding less than ``min_fraction`` of the particles are dropped. Every
particle is finally given to the most likely remaining group, or marked an outlier (-1) when
it lies outside all of them (squared Mahalanobis distance above the χ² quantile
``1 - outlier_p``): agglomerates, fragments, debris.

Features are judged at what an outline measurement resolves (:data:`_FEATURE_RESOLUTION`,
2% in size, aspect and circularity): it floors each feature's scale and is added to every
component's spread. A monodisperse sample is tighter than that in circularity (0.997 ±
0.001), and a piece split from a touching group, measured from a rebuilt outline, is rounder
than an isolated particle's segmented outline by about that much; without the floor, a
quarter of the split pieces of a gold sample were "outliers" of shape.

``"kmeans"`` (K chosen by the silhouette, as Williamson et al. 2022) goes through the same
merging and outlier steps; ``"dbscan"`` and ``"optics"`` (as autoSTEM) leave outliers
unassigned themselves: DBSCAN with ``eps`` twice the median k-distance, OPTICS with
clusters cut from its reachability plot at the level 95% of the particles reach; a density
cluster holding less than ``min_fraction`` is outliers. Both cluster a random subsample
(DBSCAN up to 3,000 particles, OPTICS, which is far slower per particle, the fewest in which
a population of ``min_fraction`` still has 30: 1,000 by default) and give every other
particle the cluster of its nearest clustered neighbour within that radius. Population ids
are ordered by mean size, 0 the smallest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from scipy import stats as sps
from threadpoolctl import threadpool_limits

__all__ = ["find_populations", "fit_populations", "PopulationModel", "population_features",
           "isolated_rows", "solidity_floor", "METHODS"]

#: Clustering methods accepted by :func:`find_populations`.
METHODS = ("auto", "kmeans", "dbscan", "optics")
#: Features used when their columns are present (``ecd_nm`` is required).
FEATURES = ("log_ecd", "log_aspect_ratio", "circularity")

_FIT_SAMPLE = 4000        # particles the clustering is fitted on; the rest are classified
_MIN_FIT = 20             # fewer valid particles than this: one population, no clustering
_MIN_GROUP = 30           # particles a population needs in the fitted sample
_DENSITY_SAMPLE = 3000    # most particles DBSCAN/OPTICS cluster; the rest are classified
_OPTICS_REACH = 2.0       # OPTICS's max_eps over the k-distance 95% of particles reach
_SEPARATION_D = 2.0       # Ashman's D needed to keep two groups apart
_DIP_RATIO = 0.9          # density between two groups must fall below this × the lower peak
_SOLIDITY_FENCE = 3.0     # Tukey's far-out fence: Q1 - 3 IQR of a population's solidity
_SOLIDITY_RESOLUTION = 0.01  # smallest solidity spread an outline measurement resolves
# Fit on isolated particles when at least this many stood alone, and this share of all
_MIN_ISOLATED = 100
_MIN_ISOLATED_SHARE = 0.2
_REG_COVAR = 1e-3         # on unit-variance features: floors a component's sd at ~0.03
# What an outline measurement resolves, per feature (unscaled units): two outline methods
# differ by this much on the same particle (isolated particles come from the segmented edge,
# pieces split from a touching group from a rebuilt outline: aspect 1.015 vs 1.001,
# circularity 0.997 vs 0.999 for the same spheres), and pixelation and noise differ between
# frames. A population tighter than this in a feature (monodisperse spheres: circularity
# 0.997 ± 0.001) would otherwise call a particle measured by the other method an outlier.
# It is added in quadrature to every component's spread before merging and classifying.
_FEATURE_RESOLUTION = {"log_ecd": 0.02, "log_aspect_ratio": 0.02, "circularity": 0.02}
# Two groups must also differ by an amount that matters physically, not only statistically:
# measured outlines of one population grow a broad tail of slightly elongated, slightly
# off-size particles (pixelation of small particles, unsplit doublets) that a mixture can
# call "well separated" from the tight core. Spheres vs cubes (aspect 1.03 vs 1.2–1.4), vs
# rods (~3), PS50 vs PS100 (2×) all clear these margins by far.
_MIN_SIZE_RATIO = 1.15    # mean ECDs of two populations differ at least by this factor...
_MIN_ASPECT_RATIO = 1.15  # ...or their mean aspect ratios do


def population_features(table):
    """Feature matrix for clustering, before scaling.

    Parameters
    ----------
    table : dict of str to ndarray
        Particle table; ``ecd_nm`` is required, ``aspect_ratio`` (or ``feret_max_nm`` and
        ``feret_min_nm``) and ``circularity`` are used when present.

    Returns
    -------
    X : (n, d) ndarray
        Log ECD, then the available shape features; missing shape values are filled with
        their column median.
    names : tuple of str
        The feature names, a subset of :data:`FEATURES` in that order.
    valid : (n,) ndarray of bool
        Rows with a finite, positive ECD; the others cannot belong to any population.
    """
    if "ecd_nm" not in table:
        raise ValueError(f"particle table (columns {sorted(table)}) has no 'ecd_nm' column")
    ecd = np.asarray(table["ecd_nm"], dtype=float)
    valid = np.isfinite(ecd) & (ecd > 0)
    columns = [np.log(np.where(valid, ecd, 1.0))]
    names = ["log_ecd"]
    aspect = _aspect_ratio(table)
    if aspect is not None:
        columns.append(np.log(np.clip(aspect, 1.0, None)))
        names.append("log_aspect_ratio")
    if "circularity" in table:
        columns.append(np.asarray(table["circularity"], dtype=float))
        names.append("circularity")
    X = np.column_stack(columns) if len(ecd) else np.zeros((0, len(columns)))
    for j in range(1, X.shape[1]):
        bad = ~np.isfinite(X[:, j])
        if bad.any():
            good = ~bad & valid
            X[bad, j] = np.median(X[good, j]) if good.any() else 0.0
    return X, tuple(names), valid


def isolated_rows(table, valid):
    """Rows the populations are learnt from: valid particles that stood alone.

    Parameters
    ----------
    table : dict of str to ndarray
        Particle table; a ``separated`` column (true for pieces split out of a touching
        group) is used when present.
    valid : (n,) ndarray of bool
        Rows that can belong to a population (:func:`population_features`).

    Returns
    -------
    (n,) ndarray of bool
        ``valid`` without the separated pieces, or ``valid`` itself when fewer than
        :data:`_MIN_ISOLATED` particles (or :data:`_MIN_ISOLATED_SHARE` of them) stood alone.
    """
    if "separated" not in table:
        return valid
    alone = valid & ~np.asarray(table["separated"], dtype=bool)
    n_alone = int(alone.sum())
    if n_alone < _MIN_ISOLATED or n_alone < _MIN_ISOLATED_SHARE * valid.sum():
        return valid
    return alone


def solidity_floor(solidity):
    """Lowest solidity of a member of a population: Tukey's far-out fence of its solidity.

    Parameters
    ----------
    solidity : array_like
        Solidity of the population's (isolated) members.

    Returns
    -------
    float
        ``Q1 − 3·max(IQR, 0.01)``; -inf when no solidity is known.

    Examples
    --------
    >>> round(solidity_floor([0.98, 0.99, 0.99, 1.0]), 4)
    0.9575
    """
    solidity = np.asarray(solidity, dtype=float)
    solidity = solidity[np.isfinite(solidity)]
    if solidity.size < 4:
        return -np.inf
    q1, q3 = np.quantile(solidity, [0.25, 0.75])
    return float(q1 - _SOLIDITY_FENCE * max(q3 - q1, _SOLIDITY_RESOLUTION))


def _aspect_ratio(table):
    if "aspect_ratio" in table:
        return np.asarray(table["aspect_ratio"], dtype=float)
    if "feret_max_nm" in table and "feret_min_nm" in table:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.asarray(table["feret_max_nm"], dtype=float)
                    / np.asarray(table["feret_min_nm"], dtype=float))
    return None


@dataclass
class PopulationModel:
    """A fitted population model that labels any particle table with the same columns.

    Attributes
    ----------
    features : tuple of str
        Feature names (see :func:`population_features`).
    center, scale : ndarray
        Feature scaling (median and standard deviation of the fitted particles).
    weights, means, chols : ndarray
        Gaussian components in scaled feature space (weights, means, Cholesky factors of the
        covariances); empty for the density methods.
    group : ndarray of int
        Population id of each component, -1 for a component of outliers.
    cutoff : float
        Squared Mahalanobis distance beyond which a particle is an outlier.
    reference, reference_labels, radius : ndarray, ndarray, float
        For ``dbscan``/``optics``: clustered particles (scaled) and their ids; a new particle
        takes the id of its nearest reference particle within ``radius``.
    solidity_floors : ndarray
        Per population id, the lowest solidity of a member (:func:`solidity_floor`); a
        particle below its population's floor is an outlier. Empty: no solidity check.
    method : str
    """

    features: tuple
    center: np.ndarray
    scale: np.ndarray
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    chols: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cutoff: float = np.inf
    reference: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
    radius: float = np.inf
    solidity_floors: np.ndarray = field(default_factory=lambda: np.zeros(0))
    method: str = "auto"

    @property
    def n_populations(self) -> int:
        """Number of populations (outliers not counted)."""
        if self.reference_labels is not None:
            return int(np.unique(self.reference_labels[self.reference_labels >= 0]).size)
        return int(np.unique(self.group[self.group >= 0]).size)

    def predict(self, table):
        """Population id of every particle of ``table``, -1 for outliers.

        Parameters
        ----------
        table : dict of str to ndarray
            Particle table with the columns the model was fitted on.

        Returns
        -------
        labels : (n,) ndarray of int64
        """
        X, names, valid = population_features(table)
        if names != self.features:
            raise ValueError(f"particle table features {names} differ from the fitted "
                             f"model's {self.features}")
        labels = np.full(len(X), -1, dtype=np.int64)
        if not valid.any():
            return labels
        Z = (X[valid] - self.center) / self.scale
        with threadpool_limits(1):
            labels[valid] = self._predict_scaled(Z)
        if len(self.solidity_floors) and "solidity" in table:
            solidity = np.asarray(table["solidity"], dtype=float)
            member = labels >= 0
            floor = self.solidity_floors[np.where(member, labels, 0)]
            # NaN solidity (not measured) is no evidence against membership
            labels[member & (solidity < floor)] = -1
        return labels

    def _predict_scaled(self, Z):
        if self.reference is not None:
            return _nearest_reference(Z, self.reference, self.reference_labels, self.radius)
        return _classify(Z, self.weights, self.means, self.chols, self.group, self.cutoff)


def find_populations(table, *, method="auto", max_populations=6, seed=0, min_fraction=0.03,
                     outlier_p=1e-3):
    """Cluster particles into populations on size and shape; outliers get -1.

    Parameters
    ----------
    table : dict of str to ndarray
        Particle table (``particles.csv`` columns): ``ecd_nm`` required; ``aspect_ratio`` or
        ``feret_max_nm``/``feret_min_nm``, ``circularity`` and ``solidity`` used if present.
    method : {"auto", "kmeans", "dbscan", "optics"}
        ``"auto"``: Gaussian mixture, number chosen by BIC, then merged until populations are
        clearly separated (see the module docstring). ``"kmeans"``: K by the silhouette, same
        merging. ``"dbscan"``/``"optics"``: density clusters, unassigned particles outliers.
    max_populations : int
        At most this many populations (1 to 6 by default).
    seed : int
        Seed of the subsample and of the clustering's initialisation.
    min_fraction : float
        A group holding less than this fraction of the particles is not a population; its
        particles join a population they fit or become outliers.
    outlier_p : float
        A particle is an outlier when a particle of the nearest population would lie that far
        out with probability below ``outlier_p`` (Gaussian model).

    Returns
    -------
    labels : (n,) ndarray of int64
        Population id per particle, ordered by mean size (0 smallest), -1 for outliers and
        for rows without a valid ECD.

    References
    ----------
    .. [1] K. M. Ashman, C. M. Bird, S. E. Zepf, "Detecting bimodality in astronomical
       datasets", Astron. J. 108, 2348 (1994).
    .. [2] Slater et al., "autoSTEM", Microsc. Microanal. 26 (2020).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> d = np.concatenate([rng.normal(55, 5, 500), rng.normal(110, 9, 500)])
    >>> labels = find_populations({"ecd_nm": d})
    >>> sorted(set(labels.tolist()) - {-1})
    [0, 1]
    """
    model = fit_populations(table, method=method, max_populations=max_populations, seed=seed,
                            min_fraction=min_fraction, outlier_p=outlier_p)
    return model.predict(table)


def fit_populations(table, *, method="auto", max_populations=6, seed=0, min_fraction=0.03,
                    outlier_p=1e-3, fit_sample=_FIT_SAMPLE, components=None, previous=None):
    """Fit a :class:`PopulationModel` (see :func:`find_populations` for the parameters).

    Parameters
    ----------
    fit_sample : int
        The clustering is fitted on a random subsample of at most this many particles (the
        model then labels all of them), which keeps it fast for 100,000 particles.
    components : (int, int), optional
        Range of mixture components (``"auto"``) or clusters (``"kmeans"``) to try; default
        1 (K-means 2) to ``max_populations + 2``. A refit of a running model tries only
        around the previous number, which is several times faster.
    previous : PopulationModel, optional
        An earlier fit on part of the same data (``"auto"``): EM starts from its components,
        so a refit converges in a few iterations and keeps the same solution when the data
        still support it.

    Returns
    -------
    PopulationModel
    """
    _validate_options(method, max_populations, min_fraction, outlier_p)
    # small matrices: BLAS threads only fight over the cores (10x slower on a busy machine)
    with threadpool_limits(1):
        return _fit(table, method=method, max_populations=max_populations, seed=seed,
                    min_fraction=min_fraction, outlier_p=outlier_p, fit_sample=fit_sample,
                    components=components, previous=previous)


def _fit(table, *, method, max_populations, seed, min_fraction, outlier_p, fit_sample,
         components, previous):
    X, names, valid = population_features(table)
    learn = isolated_rows(table, valid)
    if "solidity" in table:
        # agglomerates and fragments must not shape the model (they would form components,
        # even a population of their own): leave out what is far below the sample's own
        # solidity; each population's fence then decides membership
        solidity = np.asarray(table["solidity"], dtype=float)
        learn &= ~(solidity < solidity_floor(solidity[learn]))
    rows = np.flatnonzero(learn)
    rng = np.random.default_rng(seed)
    if len(rows) > fit_sample:
        rows = np.sort(rng.choice(rows, fit_sample, replace=False))
    Xv = X[rows]
    center = np.median(Xv, axis=0) if len(Xv) else np.zeros(X.shape[1])
    scale = Xv.std(axis=0) if len(Xv) > 1 else np.zeros(X.shape[1])
    # unit variance, but never finer than the measurement resolves: a feature in which the
    # whole sample is tighter than that (circularity of monodisperse spheres) would stretch
    # measurement-method differences into distances (density methods have no other guard)
    scale = np.hypot(scale, _resolution(names, 1.0))
    Z = (Xv - center) / scale
    cutoff = float(sps.chi2.isf(outlier_p, X.shape[1]))
    model = PopulationModel(features=names, center=center, scale=scale, cutoff=cutoff,
                            method=method)
    if components is not None and not 1 <= components[0] <= components[1]:
        raise ValueError(f"components {components} must be (low, high) with 1 ≤ low ≤ high")
    if len(Z) < _MIN_FIT:
        _set_components(model, Z, [np.arange(len(Z))], cutoff=np.inf)
        return model
    if method in ("auto", "kmeans"):
        k_lo, k_hi = components if components is not None else (1, max_populations + 2)
        if method == "auto":
            warm = _rescaled(previous, names, center, scale)
            weights, means, covs = _best_gmm(Z, k_lo, k_hi, seed, warm=warm)
        else:
            weights, means, covs = _best_kmeans(Z, max(k_lo, 2), k_hi, seed)
        covs = covs + np.diag(_resolution(names, scale) ** 2)[None]
        # a population needs a few tens of particles too: a small early sample otherwise
        # yields spurious little components in the tails
        floor = max(min_fraction, _MIN_GROUP / len(Z))
        # populations must differ in size or elongation; circularity helps model the data
        # and spot fragments, but measured outlines of one population differ in it (an
        # isolated particle vs a piece cut from a touching group) and must not split it
        dims = [names.index(f) for f in ("log_ecd", "log_aspect_ratio") if f in names]
        margins = {"log_ecd": np.log(_MIN_SIZE_RATIO),
                   "log_aspect_ratio": np.log(_MIN_ASPECT_RATIO)}
        # in units of each judged feature's scale, since the mixture lives in scaled space
        min_delta = np.array([margins[names[d]] / scale[d] for d in dims])
        group = _merge_components(weights, means, covs, max_populations=max_populations,
                                  min_fraction=floor, dims=dims, min_delta=min_delta)
        model.weights, model.means = weights, means
        model.chols = np.array([linalg.cholesky(c, lower=True) for c in covs])
        model.group = _order_groups(group, means, weights)
    else:
        labels, radius, picked = _density_clusters(Z, method, seed=seed,
                                                   min_fraction=min_fraction)
        labels = _merge_alike(labels, Z[picked], names, scale)
        labels = _limit_density_groups(labels, max_populations)
        order = _order_labels(labels, Z[picked, 0])
        model.reference = Z[picked][labels >= 0]
        model.reference_labels = order[labels[labels >= 0]]
        model.radius = radius
    if "solidity" in table and model.n_populations:
        # each population's own solidity spread decides what is too concave to be a member
        fitted = model._predict_scaled(Z)
        solidity = np.asarray(table["solidity"], dtype=float)[rows]
        model.solidity_floors = np.array([solidity_floor(solidity[fitted == g])
                                          for g in range(model.n_populations)])
    return model


def _resolution(names, scale):
    """Measurement resolution of each feature in scaled units (see _FEATURE_RESOLUTION)."""
    return np.array([_FEATURE_RESOLUTION[n] for n in names]) / scale


def _validate_options(method, max_populations, min_fraction, outlier_p):
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if int(max_populations) != max_populations or max_populations < 1:
        raise ValueError(f"max_populations ({max_populations}) must be a positive integer")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction ({min_fraction}) must be in [0, 1)")
    if not 0 < outlier_p < 1:
        raise ValueError(f"outlier_p ({outlier_p}) must be in (0, 1)")


def _set_components(model, Z, members, *, cutoff):
    """One Gaussian component per member list (used for tiny tables)."""
    d = Z.shape[1]
    means, chols = [], []
    for idx in members:
        sub = Z[idx]
        mean = sub.mean(axis=0) if len(sub) else np.zeros(d)
        cov = np.cov(sub.T).reshape(d, d) if len(sub) > d + 1 else np.eye(d)
        cov = cov + _REG_COVAR * np.eye(d)
        means.append(mean)
        chols.append(linalg.cholesky(cov, lower=True))
    model.weights = np.ones(len(members)) / max(len(members), 1)
    model.means, model.chols = np.array(means), np.array(chols)
    model.group = np.arange(len(members), dtype=np.int64)
    model.cutoff = cutoff


# --- mixture and K-means fits -------------------------------------------------------------

def _rescaled(previous, names, center, scale):
    """Components of a previous model in the new feature scaling, or None."""
    if (previous is None or previous.features != names or previous.reference is not None
            or len(previous.weights) == 0):
        return None
    ratio = previous.scale / scale
    means = (previous.means * previous.scale + previous.center - center) / scale
    covs = np.einsum("kij,klj->kil", previous.chols, previous.chols)
    covs = covs * ratio[None, :, None] * ratio[None, None, :]
    return previous.weights, means, covs


def _best_gmm(Z, k_min, k_max, seed, *, warm=None):
    """The Gaussian mixture (k_min..k_max components) with the lowest BIC."""
    best, best_bic = None, np.inf
    k_max = max(1, min(k_max, len(Z) // (4 * Z.shape[1] + 4)))
    worse = 0
    for k in range(min(k_min, k_max), k_max + 1):
        gmm = _fit_gmm(Z, k, seed, warm=warm)
        bic = gmm.bic(Z)
        if bic < best_bic:
            best, best_bic, worse = gmm, bic, 0
        else:
            worse += 1
            if worse >= 2:  # BIC has turned up twice: more components only overfit
                break
    return best.weights_, best.means_, best.covariances_


def _fit_gmm(Z, k, seed, *, warm=None):
    """EM from two starts, the more likely fit wins (or from a previous fit's components).

    k-means++ alone can settle on a split along shape noise and miss a clear size
    bimodality (EM's local optima); the second start puts the k means at quantiles of log
    ECD (column 0), since size is what populations differ in most often.
    """
    from sklearn.mixture import GaussianMixture

    def em(**init):
        return GaussianMixture(k, covariance_type="full", reg_covar=_REG_COVAR, n_init=1,
                               random_state=seed, max_iter=200, **init).fit(Z)

    if warm is not None and k in (len(warm[0]), len(warm[0]) - 1):
        weights, means, covs = warm
        keep = np.argsort(weights)[::-1][:k]  # one fewer: drop the lightest component
        w = weights[keep] / weights[keep].sum()
        try:
            precisions = np.array([np.linalg.inv(c + _REG_COVAR * np.eye(len(c)))
                                   for c in covs[keep]])
            return em(weights_init=w, means_init=means[keep], precisions_init=precisions)
        except (np.linalg.LinAlgError, ValueError):
            pass  # an ill-conditioned start: fall back to fresh starts

    best = em(init_params="k-means++")
    if k > 1:
        means = np.tile(np.median(Z, axis=0), (k, 1))
        means[:, 0] = np.quantile(Z[:, 0], (np.arange(k) + 0.5) / k)
        other = em(means_init=means)
        if other.score(Z) > best.score(Z):
            best = other
    return best


def _best_kmeans(Z, k_min, k_max, seed):
    """K-means with K (2..k_max) chosen by the silhouette, refined into Gaussian components.

    A hard partition cuts a single population into truncated pieces that look separated
    (two halves of one normal have Ashman's D ≈ 2.7), so the K clusters seed a Gaussian
    mixture (EM) before the merging step judges them.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    probe = Z if len(Z) <= 2000 else Z[rng.choice(len(Z), 2000, replace=False)]
    best_labels, best_score = np.zeros(len(Z), dtype=int), -np.inf
    for k in range(k_min, max(k_min, min(k_max, len(Z) // 10)) + 1):
        km = KMeans(k, n_init=3, random_state=seed).fit(Z)
        score = silhouette_score(probe, km.predict(probe))
        if score > best_score:
            best_labels, best_score = km.labels_, score
    ids = np.unique(best_labels)
    means = np.array([Z[best_labels == k].mean(axis=0) for k in ids])
    gmm = GaussianMixture(len(ids), covariance_type="full", reg_covar=_REG_COVAR,
                          means_init=means, random_state=seed, max_iter=100).fit(Z)
    return gmm.weights_, gmm.means_, gmm.covariances_


# --- merging components into populations --------------------------------------------------

def _moments(weights, means, covs, idx):
    """Weight, mean and covariance of the mixture of components ``idx``."""
    w = weights[idx]
    total = w.sum()
    mean = (w[:, None] * means[idx]).sum(axis=0) / total
    dev = means[idx] - mean
    cov = (w[:, None, None] * (covs[idx] + dev[:, :, None] * dev[:, None, :])).sum(0) / total
    return total, mean, cov


def ashman_d(mean_a, cov_a, mean_b, cov_b):
    """Ashman's D of two Gaussians along their discriminant direction.

    Parameters
    ----------
    mean_a, mean_b : (d,) ndarray
    cov_a, cov_b : (d, d) ndarray

    Returns
    -------
    float
        ``sqrt(2) |m_a - m_b| / sqrt(s_a² + s_b²)`` of the projections on the Fisher
        direction ``(cov_a + cov_b)⁻¹ (mean_b - mean_a)``; D > 2 means a clean separation.
    """
    delta = mean_b - mean_a
    w = linalg.solve(cov_a + cov_b, delta, assume_a="pos")
    norm = np.linalg.norm(w)
    if norm == 0:
        return 0.0
    w = w / norm
    var = w @ cov_a @ w + w @ cov_b @ w
    return float(np.sqrt(2.0) * abs(w @ delta) / np.sqrt(max(var, 1e-300)))


def _dip_ratio(weights, means, covs, idx_a, idx_b, mean_a, mean_b, steps=41):
    """Lowest mixture density between two groups relative to the lower of their peaks."""
    t = np.linspace(0.0, 1.0, steps)
    points = mean_a + t[:, None] * (mean_b - mean_a)
    density = np.zeros(steps)
    for k in np.concatenate([idx_a, idx_b]):
        density += weights[k] * sps.multivariate_normal.pdf(points, means[k], covs[k],
                                                            allow_singular=True)
    low = int(np.argmin(density[1:-1])) + 1
    peak = min(density[:low].max(), density[low + 1:].max())
    return float(density[low] / peak) if peak > 0 else 1.0


def _merge_components(weights, means, covs, *, max_populations, min_fraction, dims=None,
                      min_delta=None):
    """Group id per component (-1: outlier component) after merging unseparated pairs.

    Separation is judged on the feature columns ``dims`` only (all by default). With
    ``min_delta`` (one value per judged column), two groups also need their means to differ
    by at least that much in one of the columns to stay apart.
    """
    groups = [np.array([k]) for k in range(len(weights))]
    if dims is not None:
        dims = np.asarray(dims)
        means, covs = means[:, dims], covs[:, dims][:, :, dims]

    def pair_separation(a, b):
        _, ma, ca = _moments(weights, means, covs, a)
        _, mb, cb = _moments(weights, means, covs, b)
        d = ashman_d(ma, ca, mb, cb)
        if min_delta is None:
            sub = np.ones(len(ma), dtype=bool)
        else:
            # judged only along the features in which the two differ physically: a
            # separation carried by a 1% difference in measured aspect ratio (pixelation of
            # the smallest particles) does not make a population of them
            sub = np.abs(ma - mb) >= min_delta
        if not sub.any():
            return d, False
        d_sub = ashman_d(ma[sub], ca[np.ix_(sub, sub)], mb[sub], cb[np.ix_(sub, sub)])
        separated = d_sub > _SEPARATION_D and _dip_ratio(
            weights, means[:, sub], covs[:, sub][:, :, sub], a, b, ma[sub],
            mb[sub]) < _DIP_RATIO
        return d, separated

    def big(g):
        return weights[g].sum() >= min_fraction

    while len(groups) > 1:
        # merge only among groups large enough to be populations; small ones are outliers
        # unless their particles fit a population (decided per particle later)
        live = [i for i, g in enumerate(groups) if big(g)]
        candidates = []
        for ii, i in enumerate(live):
            for j in live[ii + 1:]:
                d, separated = pair_separation(groups[i], groups[j])
                if not separated or len(live) > max_populations:
                    candidates.append((d, i, j))
        if not candidates:
            break
        _, i, j = min(candidates)
        groups[i] = np.concatenate([groups[i], groups[j]])
        del groups[j]
    group = np.full(len(weights), -1, dtype=np.int64)
    gid = 0
    for g in groups:
        if big(g):
            group[g] = gid
            gid += 1
    if gid == 0:  # nothing reached min_fraction (tiny table): keep the heaviest group
        group[max(groups, key=lambda g: weights[g].sum())] = 0
    return group


def _order_groups(group, means, weights):
    """Renumber groups by their mean (scaled) log ECD, smallest first."""
    ids = np.unique(group[group >= 0])
    centre = [np.average(means[group == g, 0], weights=weights[group == g]) for g in ids]
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(centre)] = np.arange(len(ids))
    out = group.copy()
    for g, r in zip(ids, rank):
        out[group == g] = r
    return out


def _classify(Z, weights, means, chols, group, cutoff):
    """Most likely kept component's group, or -1 beyond ``cutoff`` from every kept one."""
    keep = np.flatnonzero(group >= 0)
    n = len(Z)
    best_ll = np.full(n, -np.inf)
    best_group = np.full(n, -1, dtype=np.int64)
    min_d2 = np.full(n, np.inf)
    for k in keep:
        y = linalg.solve_triangular(chols[k], (Z - means[k]).T, lower=True)
        d2 = np.einsum("ij,ij->j", y, y)
        ll = np.log(weights[k]) - np.log(np.diag(chols[k])).sum() - 0.5 * d2
        better = ll > best_ll
        best_ll[better] = ll[better]
        best_group[better] = group[k]
        np.minimum(min_d2, d2, out=min_d2)
    best_group[min_d2 > cutoff] = -1
    return best_group


# --- density clustering (DBSCAN, OPTICS) --------------------------------------------------

def _density_clusters(Z, method, *, seed, min_fraction):
    """Density clusters of ``Z`` (rows ``picked``), the radius within which a point joins one."""
    from sklearn import config_context
    from sklearn.cluster import DBSCAN, OPTICS, cluster_optics_dbscan
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    picked = np.arange(len(Z))
    # OPTICS and DBSCAN grow faster than linearly: cluster a subsample, the rest joins the
    # nearest clustered particle within the radius (PopulationModel.predict). OPTICS walks
    # its particles one by one in Python (~2.5 ms each), so it gets the smallest subsample
    # in which a population of min_fraction still has _MIN_GROUP particles
    limit = _DENSITY_SAMPLE
    if method == "optics":
        limit = int(np.clip(np.ceil(_MIN_GROUP / min_fraction), _MIN_FIT, _DENSITY_SAMPLE))
    if len(Z) > limit:
        picked = np.sort(rng.choice(len(Z), limit, replace=False))
        Z = Z[picked]
    min_samples = max(5, 2 * Z.shape[1])
    dist, _ = NearestNeighbors(n_neighbors=min_samples).fit(Z).kneighbors(Z)
    kdist = dist[:, -1]
    # a cluster needs min_fraction of the particles, as a mixture component does: DBSCAN's
    # little dense knots in a population's tail are outliers, not populations
    min_cluster = max(min_samples, int(min_fraction * len(Z)))
    if method == "dbscan":
        # twice the typical k-distance: dense cores connect, sparse bridges between
        # populations (and tails, which become outliers) do not. (The k-distance 95% of the
        # particles reach kept more of the tails but bridged PS50 and PS100 in a sample of
        # ~800 particles.)
        eps = float(2.0 * np.median(kdist))
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(Z)
        radius = eps
    else:
        # clusters cut from the reachability plot at the level 95% of the particles reach.
        # (The ξ-steepness clusters, OPTICS.labels_, are the leaves of the cluster
        # hierarchy: dense cores inside one population, which split a monodisperse sample
        # and left 60-90% of the particles unassigned.)
        # Reachabilities are only needed up to that level, so neighbourhoods are searched
        # within max_eps = 2× the k-distance 95% of the particles reach (the level has been
        # 0.8-0.9× that); should more than 5% lie beyond it, the search is redone unbounded
        for max_eps in (_OPTICS_REACH * float(np.quantile(kdist, 0.95)), np.inf):
            # Z is finite and the parameters are ours: skip sklearn's per-call checks, which
            # OPTICS repeats for every particle (a quarter of its time)
            with config_context(assume_finite=True, skip_parameter_validation=True):
                optics = OPTICS(min_samples=min_samples, min_cluster_size=min_cluster,
                                max_eps=max_eps).fit(Z)
            # the first particle of the ordering has no reachability
            reach = optics.reachability_[optics.ordering_[1:]]
            radius = (float(np.quantile(reach, 0.95, method="inverted_cdf")) if reach.size
                      else np.inf)
            if np.isfinite(radius):
                break
        if not np.isfinite(radius):
            radius = float(np.max(kdist))
        labels = cluster_optics_dbscan(reachability=optics.reachability_,
                                       core_distances=optics.core_distances_,
                                       ordering=optics.ordering_, eps=radius)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    labels = np.where(np.isin(labels, ids[counts < min_cluster]), -1, labels)
    return labels, radius, picked


def _merge_alike(labels, Z, names, scale):
    """Merge density clusters that differ physically in neither size nor elongation.

    The same rule as for mixture components (:data:`_MIN_SIZE_RATIO`,
    :data:`_MIN_ASPECT_RATIO`): a density gap along a 2% aspect difference splits one
    population (PS50 at aspect 1.00 and 1.02) otherwise.
    """
    dims = [names.index(f) for f in ("log_ecd", "log_aspect_ratio") if f in names]
    margin = np.array([np.log(_MIN_SIZE_RATIO if names[d] == "log_ecd"
                              else _MIN_ASPECT_RATIO) / scale[d] for d in dims])
    labels = labels.copy()
    while True:
        ids = np.unique(labels[labels >= 0])
        centre = {i: Z[labels == i][:, dims].mean(axis=0) for i in ids}
        pair = next(((a, b) for k, a in enumerate(ids) for b in ids[k + 1:]
                     if np.all(np.abs(centre[a] - centre[b]) < margin)), None)
        if pair is None:
            return labels
        labels[labels == pair[1]] = pair[0]


def _limit_density_groups(labels, max_populations):
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) <= max_populations:
        return labels
    drop = ids[np.argsort(counts)[:len(ids) - max_populations]]
    out = labels.copy()
    out[np.isin(out, drop)] = -1
    return out


def _order_labels(labels, size):
    """Map from a density label to its id ordered by mean size."""
    ids = np.unique(labels[labels >= 0])
    order = np.zeros(labels.max() + 1 if len(ids) else 1, dtype=np.int64)
    means = [size[labels == i].mean() for i in ids]
    for rank, i in enumerate(ids[np.argsort(means)]):
        order[i] = rank
    return order


def _nearest_reference(Z, reference, reference_labels, radius):
    from scipy.spatial import cKDTree

    if len(reference) == 0:
        return np.full(len(Z), -1, dtype=np.int64)
    dist, idx = cKDTree(reference).query(Z, k=1)
    return np.where(dist <= radius, reference_labels[idx], -1).astype(np.int64)
