"""Size statistics per population, running updates and an honest stop rule.

Particles from one frame are not independent: a frame may sit in a thicker, more aggregated or
slightly defocused area, which shifts every size it yields. The mean of a population is
therefore treated as a ratio estimator over frames (frames are the sampling clusters), and its
variance is the cluster-robust (linearised) one,

    var(mean) = F/(F-1) · Σ_f (y_f − mean·n_f)² / N²,

with y_f the sum of diameters and n_f the count of the population in frame f, never smaller
than the independent-particle variance s²/N. Because a session checks after every frame and
stops at the first success, the between-frame variance enters as its 90% upper confidence
bound (χ² with F − 1 degrees of freedom), and the 95% interval uses Student's t with F − 1
degrees of freedom (few frames: wide intervals). Fractions get the same treatment.

Sizes and fractions come from the particles that stood alone when the table says which were
split from touching groups (``separated``) and enough stood alone: a split piece is measured
from a regrown mask, and some pieces are unsplit overlapping pairs that no rule on a single
particle can tell from a large member; ``n`` still counts every member. Where the table also
says which particles touch another particle or an agglomerate box (``touching``, from
:func:`~particlewatch.analysis.pipeline.touching_particles`), fractions are counted on the
particles that touch nothing: a large particle whose small neighbours were boxed or hidden was
not split, yet it did not stand alone. Counting untouched particles is itself size-biased
where touching depends on size (a large particle's excluded area is larger: on a Poisson
field of PS50 + PS100 at 40% touching the untouched count over-states PS50 by ~10 points):
the untouched composition is fitted against each frame's crowding and read off at zero
crowding, as far as the frames show such a drift (``_crowding_fractions``,
``_shrink_to_uncrowded``; ``fraction_crowding=False`` turns it off). The basis itself
follows one rule on counts that only grow in a session, so it never switches back
(``_fraction_basis``).

Stop rule (a Chow–Robbins fixed-width rule, 1965, with a frame-level variance): converged when,
for every population, the 95% half-width ≤ ``precision`` × mean, the population holds at least
``min_per_population`` particles, at least ``min_frames`` frames were analysed and every
fraction's half-width ≤ ``fraction_tolerance``. Checking after every frame is what a session
does; ``bench/stop_rule_coverage.py`` measures that the interval reported at the stop still
holds the true mean in ≥ 93% of simulated sessions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from .populations import PopulationModel, fit_populations
from ._json import json_safe

__all__ = ["summarize", "RunningStatistics", "population_stats", "z_average",
           "cluster_mean_ci", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_CONFIDENCE = 0.95
_HIST_BINS = 60
_VARIANCE_BOUND = 0.9  # one-sided level of the between-frame variance bound (see _upper)
_ROD_ASPECT = 1.8      # mean Feret max/min above which a population is rod-like
_CUBE_ASPECT = 1.15    # projected cubes: Feret diagonal/edge 1.2–1.41; spheres ~1.0–1.08
_SPHERE_CIRCULARITY = 0.85
_CUBE_SOLIDITY = 0.93
# largest share of chance contacts γ of _crowding_fractions: 1 on a Poisson field; up to 2
# because the frame's crowding counts rows, and groups boxed as agglomerates are no rows
_CROWDING_GAMMA_MAX = 2.0
_CROWDING_SHRINK = 1.0  # c of the shrinkage weight 1 − c/W of _shrink_to_uncrowded


def z_average(d):
    """Intensity-weighted (z-)average diameter as DLS reports it, ``Σd⁶ / Σd⁵``.

    Parameters
    ----------
    d : array_like
        Diameters (nm).

    Returns
    -------
    float
        NaN for no particles.

    References
    ----------
    .. [1] Harley et al., Nanoscale Horiz. (2025); ISO 22412 (DLS).

    Examples
    --------
    >>> z_average([10.0, 20.0])  # (10⁶ + 20⁶) / (10⁵ + 20⁵)
    19.696969696969695
    """
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return math.nan
    top = d.max()
    if top <= 0:
        return math.nan
    r = d / top  # scaled: d⁶ of 1e5 nm overflows nothing, but keeps the sums well-conditioned
    return float(top * np.sum(r ** 6) / np.sum(r ** 5))


def cluster_mean_ci(values, clusters, *, confidence=_CONFIDENCE):
    """Mean of ``values`` and its confidence interval, frames as clusters.

    Parameters
    ----------
    values : (n,) array_like
        One value per particle.
    clusters : (n,) array_like of int
        Frame index of each particle (``0..F-1``).
    confidence : float
        Two-sided level of the interval.

    Returns
    -------
    mean, half_width : float
        Half-width = t_{F-1} × max(cluster-robust SE (its 90% upper bound), s/√n); t is
        the normal quantile with a single frame (whose between-frame variance is unknown:
        the stop rule then requires more frames).
    frames : int
        Number of frames that hold at least one value.
    """
    values = np.asarray(values, dtype=float)
    clusters = np.asarray(clusters)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(values.mean())
    if n == 1:
        return mean, math.inf, 1
    codes = _compact(clusters)
    counts = np.bincount(codes).astype(float)
    nonempty = counts > 0
    sums = np.bincount(codes, weights=values)[nonempty]
    counts = counts[nonempty]
    frames = len(sums)
    var_iid = values.var(ddof=1) / n
    if frames > 1:
        resid = sums - mean * counts
        var_cluster = _upper(frames / (frames - 1) * np.sum(resid ** 2) / n ** 2, frames)
        q = sps.t.ppf(0.5 + confidence / 2, frames - 1)
    else:
        var_cluster, q = 0.0, sps.norm.ppf(0.5 + confidence / 2)
    return mean, float(q * math.sqrt(max(var_cluster, var_iid))), frames


def _upper(var, frames, level=_VARIANCE_BOUND):
    """The upper confidence bound (one-sided ``level``, 90% by default) of a between-frame
    variance estimated from ``frames``; ``level=None`` returns the estimate itself.

    A session stops at the first frame where the interval is narrow enough, which favours
    moments when the variance estimate happens to be low (optional stopping): with the plain
    estimate the interval at the stop held the true mean in only ~88–93% of simulated
    sessions. The upper bound (×2.8 at 5 frames, ×1.4 at 30, ×1.2 at 100) restores ≥ 95%
    (``bench/stop_rule_coverage.py``).
    """
    if level is None:
        return var
    return var * (frames - 1) / sps.chi2.ppf(1.0 - level, frames - 1)


def _compact(clusters):
    """Non-negative integer cluster codes (frames without particles are simply absent)."""
    clusters = np.asarray(clusters)
    if clusters.dtype.kind in "iu" and (clusters.size == 0 or clusters.min() >= 0):
        return clusters
    return np.unique(clusters, return_inverse=True)[1].reshape(-1)


def _fraction_ci(member, clusters, *, confidence=_CONFIDENCE, bound=_VARIANCE_BOUND):
    """Fraction of ``member`` (bool per particle) and its cluster-robust half-width.

    The fraction is a ratio estimator over frames (members / particles counted); its variance
    is the linearised between-frame one, ``F/(F-1) · Σ_f (m_f − p·n_f)² / N²``, its upper
    bound at one-sided level ``bound`` (None: the estimate), floored at the binomial one.
    """
    n = len(member)
    if n == 0:
        return math.nan, math.nan
    p = float(member.mean())
    codes = _compact(clusters)
    counts = np.bincount(codes).astype(float)
    nonempty = counts > 0
    hits = np.bincount(codes, weights=member.astype(float))[nonempty]
    counts = counts[nonempty]
    frames = len(hits)
    # floor at the binomial variance, with p pulled off 0/1 (Agresti–Coull style) so that a
    # fraction of 1.0 or 0.0 does not claim zero uncertainty
    p_adj = (member.sum() + 2.0) / (n + 4.0)
    var_binom = p_adj * (1 - p_adj) / n
    if frames > 1:
        resid = hits - p * counts
        var_cluster = _upper(frames / (frames - 1) * np.sum(resid ** 2) / n ** 2, frames,
                             bound)
        q = sps.t.ppf(0.5 + confidence / 2, frames - 1)
    else:
        var_cluster, q = 0.0, sps.norm.ppf(0.5 + confidence / 2)
    return p, float(q * math.sqrt(max(var_cluster, var_binom)))


def _crowding(codes, free, unsplit):
    """Per frame: how crowded it is, ``−log`` of the share of its unsplit particles that touch
    nothing.

    For particles dropped at random (a Poisson field) a particle stays untouched with
    probability ``exp(−λ·A)``, ``λ`` the density and ``A`` the excluded area, so ``−log`` of
    the untouched share is ``λ`` times the mean excluded area: zero on an empty field, growing
    with the density. Split pieces are left out: they touched by construction (they came
    from a group), whatever the chance of a contact. Computed from the frame itself, so no
    frame area or pixel size is needed; half a particle is added to both counts so that a
    frame where everything touches stays finite.

    Parameters
    ----------
    codes : (n,) ndarray of int
        Frame code of every particle (non-negative).
    free : (n,) ndarray of bool
        Particles that were not split and touch nothing.
    unsplit : (n,) ndarray of bool
        Particles that were not split.

    Returns
    -------
    (n_codes,) ndarray
        Crowding of each frame code (NaN for codes without unsplit particles).
    """
    size = int(codes.max()) + 1 if codes.size else 0
    total = np.bincount(codes, weights=unsplit.astype(float), minlength=size)
    untouched = np.bincount(codes, weights=free.astype(float), minlength=size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, -np.log((untouched + 0.5) / (total + 1.0)), np.nan)


def _softmax(eta):
    eta = eta - eta.max(axis=-1, keepdims=True)
    e = np.exp(eta)
    return e / e.sum(axis=-1, keepdims=True)


def _excluded_areas(table, basis, labels, ids):
    """Each population's mean excluded area against the untouched particles, relative to the
    mean: ``d_k = (A_k − Ā) / Ā``.

    Two convex particles in random orientation overlap when their centres lie within an
    area ``a_i + a_j + P_i·P_j / 2π`` of each other (``a`` area, ``P`` perimeter; for discs
    ``π(r_i + r_j)²``), so a particle of population ``k`` dropped at random stays untouched
    with probability ``exp(−λ·A_k)``, ``A_k`` that area averaged over its possible partners.
    Areas and perimeters are the population's measured means (discs of the ECD where the
    table has no ``area_nm2``/``perimeter_nm``; a perimeter never below the ECD disc's, as
    rough outlines only lengthen it).
    """
    ecd = np.asarray(table["ecd_nm"], dtype=float)
    area = np.asarray(table["area_nm2"], dtype=float) if "area_nm2" in table \
        else np.pi * ecd ** 2 / 4
    perim = np.asarray(table["perimeter_nm"], dtype=float) if "perimeter_nm" in table \
        else np.pi * ecd
    perim = np.fmax(perim, np.pi * ecd)
    a_k = np.array([_nanmean(area[basis & (labels == i)]) for i in ids])
    p_k = np.array([_nanmean(perim[basis & (labels == i)]) for i in ids])
    share = np.array([np.sum(basis & (labels == i)) for i in ids], dtype=float)
    share /= max(share.sum(), 1.0)
    excl = a_k[:, None] + a_k[None, :] + p_k[:, None] * p_k[None, :] / (2 * np.pi)
    mean_k = excl @ share                     # A_k: against partners in their proportions
    return (mean_k - share @ mean_k) / (share @ mean_k)


def _crowding_fractions(counts, crowding, excluded, *, confidence=_CONFIDENCE,
                        bound=_VARIANCE_BOUND):
    """Population fractions of an uncrowded field, from untouched particles of many frames.

    Counting only particles that touch nothing is size-biased when touching depends on size:
    dropped at random, a particle of population ``k`` stays untouched with probability
    ``exp(−λ·A_k)`` (``A_k`` its excluded area, :func:`_excluded_areas`), so in crowded frames
    the untouched ones under-represent the populations with large excluded areas. With the
    frame's crowding ``x = λ·Ā`` (:func:`_crowding`) the untouched composition is a
    multinomial logit ``P(k | x) ∝ N_k·exp(−γ·d_k·x)``, ``d_k = (A_k − Ā)/Ā``, and ``γ`` the
    share of the contacts that come by chance: 1 on a Poisson field, 0 where touching picks
    its particles whatever their size (the simulator's agglomerates). ``γ`` is estimated
    from the frames (how the untouched composition drifts with crowding), kept within
    ``[0, _CROWDING_GAMMA_MAX]``, and the fractions are read off at ``x = 0``: each untouched
    particle weighted by ``1 / P(untouched | population, x)`` relative to an empty field (a
    Horvitz–Thompson weight) with ``P`` from the data rather than from an assumed Poisson
    density (which, on the simulator's frames, would move ps-bimodal's fractions by points
    where untouched counts are nearly right). Populations of like excluded area (spheres and
    rods of one ECD) get a small ``d``: no drift there can move their fractions far.

    Parameters
    ----------
    counts : (F, K) ndarray
        Untouched particles of each population in each frame.
    crowding : (F,) ndarray
        Each frame's crowding.
    excluded : (K,) ndarray
        Relative excluded areas ``d_k``.
    confidence : float
        Level of the intervals.
    bound : float or None
        One-sided level of the upper bound on the between-frame variance (see ``_upper``).

    Returns
    -------
    fractions, half_widths : (K,) ndarray
        Fractions at zero crowding and their half-widths: the cluster-robust (sandwich,
        frames as clusters) variance of the unconstrained fit, its upper bound at ``bound``,
        never below the model's own (Fisher) variance, through the delta method, with
        Student's t on ``F − 2`` degrees of freedom. NaN when fewer than 3 frames hold
        untouched particles or the fit fails.
    wald : float
        ``γ̂² / var(γ̂)`` (sandwich): how clearly the frames show the drift.
    """
    from scipy.optimize import minimize

    counts = np.asarray(counts, dtype=float)
    x = np.asarray(crowding, dtype=float)
    d = np.asarray(excluded, dtype=float)
    keep = counts.sum(axis=1) > 0
    counts, x = counts[keep], x[keep]
    frames, k = counts.shape
    nan = np.full(k, np.nan)
    if frames < 3 or k < 2 or not np.all(np.isfinite(d)) or np.ptp(d) == 0:
        return nan, nan, math.nan
    n_f = counts.sum(axis=1)
    # ∂η_fk/∂θ, θ = (α_1 … α_{K−1}, γ): population 0 is the reference (α_0 = 0)
    jac = np.zeros((frames, k, k))
    jac[:, 1:, :k - 1] = np.eye(k - 1)
    jac[:, :, k - 1] = -np.outer(x, d)

    def terms(theta):
        pi = _softmax(jac @ theta)
        resid = counts - n_f[:, None] * pi
        return pi, np.einsum("fkp,fk->fp", jac, resid)  # and the per-frame scores

    def negloglik(theta):
        e = jac @ theta
        top = e.max(axis=1, keepdims=True)
        ll = np.sum(counts * e) - np.sum(n_f * (np.log(np.exp(e - top).sum(1)) + top[:, 0]))
        return -ll, -terms(theta)[1].sum(0)

    def information(theta):
        pi = _softmax(jac @ theta)
        cov = n_f[:, None, None] * (pi[:, :, None] * np.eye(k) - pi[:, :, None]
                                    * pi[:, None, :])
        return np.einsum("fkp,fkl,flq->pq", jac, cov, jac)

    start = np.zeros(k)
    start[:k - 1] = np.log((counts[:, 1:].sum(0) + 0.5) / (counts[:, 0].sum() + 0.5))
    fit = minimize(negloglik, start, jac=True, hess=information, method="trust-exact")
    if not fit.success or not np.all(np.isfinite(fit.x)):
        return nan, nan, math.nan
    theta = fit.x
    info = information(theta)
    try:
        bread = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return nan, nan, math.nan
    scores = terms(theta)[1]
    plain = bread @ (frames / (frames - 1) * scores.T @ scores) @ bread
    wald = float(theta[-1] ** 2 / plain[-1, -1]) if plain[-1, -1] > 0 else math.nan
    gamma = float(np.clip(theta[-1], 0.0, _CROWDING_GAMMA_MAX))
    if gamma != theta[-1]:
        # outside the physical range: the intercepts refitted with γ held at the edge
        def negloglik_fixed(alpha):
            value, grad = negloglik(np.append(alpha, gamma))
            return value, grad[:k - 1]

        refit = minimize(negloglik_fixed, theta[:k - 1], jac=True, method="BFGS")
        if not np.all(np.isfinite(refit.x)):
            return nan, nan, math.nan
        theta = np.append(refit.x, gamma)
    sandwich = _upper(plain, frames, bound)
    p = _softmax(np.concatenate([[0.0], theta[:k - 1]]))
    # d p_j / d α_m = p_j (δ_jm − p_m), m = 1..K−1; γ does not enter at x = 0
    grad = np.zeros((k, k))
    grad[:, :k - 1] = p[:, None] * (np.eye(k)[:, 1:] - p[None, 1:])
    var = np.maximum(np.einsum("ji,il,jl->j", grad, sandwich, grad),
                     np.einsum("ji,il,jl->j", grad, bread, grad))
    q = sps.t.ppf(0.5 + confidence / 2, max(frames - 2, 1))
    return p, q * np.sqrt(var), wald


def _shrink_to_uncrowded(frac, half, frac0, half0, wald):
    """The untouched fraction moved towards its zero-crowding value as far as the data show a
    drift with crowding (positive-part shrinkage, weight ``1 − 1/W``, ``W`` the Wald
    statistic of ``γ``): where the frames do not show it (size-blind touching, or frames all
    alike) the correction would only add the noise of an extrapolation, a session would
    need several times the particles for the same interval and the fraction would jump by
    that noise; where they do (touching that grows with size, a Poisson field: +10 points on
    ps-bimodal-like mixtures at 40% touching) it is applied in full. The half-width moves
    with it, from the plain one to the extrapolation's.
    """
    if not (np.isfinite(frac0) and np.isfinite(half0) and np.isfinite(wald)
            and np.isfinite(frac) and np.isfinite(half)):
        return frac, half
    s = max(0.0, 1.0 - _CROWDING_SHRINK / wald) if wald > 0 else 0.0
    frac = float(frac + s * (frac0 - frac))
    return frac, float(math.sqrt(half ** 2 + s ** 2 * max(half0 ** 2 - half ** 2, 0.0)))


def _column(table, name, n):
    if name in table:
        return np.asarray(table[name], dtype=float)
    if name == "aspect_ratio" and "feret_max_nm" in table and "feret_min_nm" in table:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.asarray(table["feret_max_nm"], dtype=float)
                    / np.asarray(table["feret_min_nm"], dtype=float))
    return np.full(n, np.nan)


def _nanmean(x):
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _shape_name(aspect, circularity, solidity, shell):
    """A coarse shape name from mean shape factors (NaN when not measured)."""
    if np.isfinite(shell):
        return "capsule"
    if not np.isfinite(aspect):
        return "sphere" if not np.isfinite(circularity) or circularity >= _SPHERE_CIRCULARITY \
            else "irregular"
    if aspect >= _ROD_ASPECT:
        return "rod"
    if aspect >= _CUBE_ASPECT:
        if np.isfinite(solidity) and solidity < _CUBE_SOLIDITY:
            return "irregular"
        return "cube"
    if np.isfinite(circularity) and circularity < _SPHERE_CIRCULARITY:
        return "irregular"
    return "sphere"


def population_stats(table, index, clusters, *, precision=0.01, confidence=_CONFIDENCE):
    """Size and shape statistics of the particles ``index`` of ``table``.

    Parameters
    ----------
    table : dict of str to ndarray
        Particle table (``ecd_nm`` required).
    index : ndarray of int or bool
        Rows of the population.
    clusters : (n_table,) ndarray
        Frame code of every row of ``table``.
    precision : float
        Wanted relative half-width; sets ``converged`` (precision only) and ``needed_more``.
    confidence : float

    Returns
    -------
    dict
        ``n, mean_ecd_nm, sd_ecd_nm, cv, pdi, z_average_nm, ci95_nm, ci95_rel,
        mean_feret_max_nm, mean_feret_min_nm, mean_aspect_ratio, mean_circularity,
        mean_shell_nm, shape, frames`` and ``needed_for_precision`` (particles still
        needed for the precision, estimated as n·(rel/precision)² − n). Undefined values NaN.
    """
    index = np.asarray(index)
    if index.dtype == bool:
        index = np.flatnonzero(index)  # one gather per column is cheaper with indices
    d = np.asarray(table["ecd_nm"], dtype=float)[index]
    n_table = len(table["ecd_nm"])
    n = len(d)
    mean, half, frames = cluster_mean_ci(d, np.asarray(clusters)[index], confidence=confidence)
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    cv = sd / mean if n > 1 and mean > 0 else math.nan
    rel = half / mean if n and mean > 0 else math.nan
    shell = _column(table, "shell_nm", n_table)[index]
    # a capsule when most of the population has a measured shell
    mean_shell = _nanmean(shell) if n and np.isfinite(shell).mean() >= 0.5 else math.nan
    aspect = _nanmean(_column(table, "aspect_ratio", n_table)[index])
    circ = _nanmean(_column(table, "circularity", n_table)[index])
    solidity = _nanmean(_column(table, "solidity", n_table)[index])
    if np.isfinite(rel) and rel > 0:
        # half-width ∝ 1/√n; t shrinks toward the normal quantile as frames accumulate
        q_now = sps.t.ppf(0.5 + confidence / 2, frames - 1) if frames > 1 else 1.0
        q_end = sps.norm.ppf(0.5 + confidence / 2) if frames > 1 else 1.0
        needed = max(0.0, n * (rel * q_end / q_now / precision) ** 2 - n)
    else:
        needed = math.inf if n < 2 else 0.0
    return {
        "n": int(n),
        "mean_ecd_nm": mean,
        "sd_ecd_nm": sd,
        "cv": cv,
        "pdi": cv ** 2,
        "z_average_nm": z_average(d),
        "ci95_nm": [mean - half, mean + half],
        "ci95_rel": rel,
        "mean_feret_max_nm": _nanmean(_column(table, "feret_max_nm", n_table)[index]),
        "mean_feret_min_nm": _nanmean(_column(table, "feret_min_nm", n_table)[index]),
        "mean_aspect_ratio": aspect,
        "mean_circularity": circ,
        "mean_shell_nm": mean_shell,
        "shape": _shape_name(aspect, circ, solidity, mean_shell) if n else None,
        "frames": int(frames),
        "needed_for_precision": needed,
    }


def _fraction_basis(table, unsplit, free, min_per_population):
    """Which particles fractions are counted on: ``"untouched"``, ``"isolated"`` or ``"all"``.

    One rule on counts that never fall as a session goes on: the basis is the most selective
    one the table has columns for (``touching`` and ``separated``: untouched; ``separated``:
    isolated) once it holds ``min_per_population`` particles, whatever their population
    labels. Rows are only ever added, so the basis moves forward at most twice and never
    back; a rule on the share of particles that stood alone (it rises and falls with the
    frames' density and with refits moving particles to and from the outliers) flipped
    between bases near its threshold, and the reported fraction jumped with it.
    """
    if "separated" not in table:
        return "all"
    if "touching" in table and int(free.sum()) >= min_per_population:
        return "untouched"
    if int(unsplit.sum()) >= min_per_population:
        return "isolated"
    return "all"


def _frame_codes(table, frames, n):
    if frames is None:
        frames = table.get("frame")
    if frames is None:
        return np.arange(n)  # unknown frames: every particle its own cluster
    frames = np.asarray(frames)
    if len(frames) != n:
        raise ValueError(f"frames (length {len(frames)}) must have one entry per particle "
                         f"(table length {n})")
    return np.unique(frames, return_inverse=True)[1].reshape(-1)


def _validate_summary_inputs(table, labels, precision):
    if "ecd_nm" not in table:
        raise ValueError(f"particle table (columns {sorted(table)}) has no 'ecd_nm' column")
    n = len(table["ecd_nm"])
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels (shape {labels.shape}) must have one entry per particle "
                         f"(table length {n})")
    if not 0 < precision < 1:
        raise ValueError(f"precision ({precision}) must be in (0, 1), e.g. 0.01 for ±1%")
    return n, labels.astype(np.int64)


def summarize(table, labels, *, frames_ok, frames_failed, precision=0.01, frames=None,
              min_per_population=50, min_frames=3, fraction_tolerance=None,
              fraction_variance_bound=_VARIANCE_BOUND, fraction_crowding=True,
              confidence=_CONFIDENCE, bins=_HIST_BINS):
    """The ``summary.json`` content: statistics per population, convergence and histogram.

    Parameters
    ----------
    table : dict of str to ndarray
        Particle table (``particles.csv`` columns; ``ecd_nm`` required; optional
        ``separated`` and ``touching`` (bool, the pipeline's columns) choose the particles
        fractions and sizes are counted on).
    labels : (n,) array_like of int
        Population per particle, -1 for outliers (as from ``find_populations``).
    frames_ok, frames_failed : int
        Frames analysed and frames that failed, reported as given.
    precision : float
        Wanted relative 95% half-width of every population's mean ECD (0.01 = ±1%).
    frames : (n,) array_like, optional
        Frame name of each particle; defaults to the table's ``frame`` column. Particles of
        one frame are correlated: the intervals treat frames as clusters. Without frame
        information every particle counts as independent.
    min_per_population : int
        Particles a population needs before it can count as converged.
    min_frames : int
        Frames needed before the between-frame variance is trusted enough to stop.
    fraction_tolerance : float, optional
        Largest 95% half-width of a population fraction (absolute) for "stable fractions";
        default ``max(precision, 0.02)`` — ±1 point would need ~9,600 particles at 50/50.
    fraction_variance_bound : float or None
        One-sided level of the upper confidence bound put on the between-frame variance of
        the fractions against optional stopping (see ``_upper``); None uses the estimate.
    fraction_crowding : bool
        On the ``"untouched"`` basis, report the fractions of an uncrowded field: the
        untouched composition fitted against each frame's crowding and read off at zero
        crowding as far as the frames show a drift (:func:`_crowding_fractions`,
        :func:`_shrink_to_uncrowded`). Where particles touch by chance, large ones more
        often, untouched counts over-state the small population (a Poisson field of
        PS50 + PS100, 40% touching: +10.2 points, coverage 0%; corrected +0.5, 98%); on the
        simulator's frames, where touching barely depends on size, it changes nothing
        beyond a slightly wider interval. False: the plain untouched counts.
    confidence : float
        Level of the intervals (keys keep the name ``ci95``).
    bins : int
        Histogram bins.

    Returns
    -------
    dict
        JSON-safe (no NaN: ``None``): ``schema_version, frames_ok, frames_failed, particles,
        populations`` (list of ``id, n, fraction, fraction_ci95, n_size, size_basis`` (the
        particles the size numbers come from: ``"isolated"`` ones when the table has a
        ``separated`` column and enough stood alone, else ``"all"``), ``mean_ecd_nm, sd_ecd_nm, cv,
        pdi, z_average_nm, ci95_nm, ci95_rel, mean_feret_max_nm, mean_feret_min_nm,
        mean_aspect_ratio, mean_circularity, mean_shell_nm, shape, frames, converged,
        needed_more``), ``all`` (the same for all non-outliers), ``outliers, converged,
        precision, fraction_tolerance, fraction_basis`` (the particles fractions are counted
        on: ``"untouched"`` (not split, touching nothing: a ``touching`` column), else
        ``"isolated"`` (not split), else ``"all"``), ``min_per_population, min_frames,
        convergence`` (``reason`` and per population ``reasons``) and ``histogram``
        (``edges_nm`` and ``counts`` per id as a string, ``"-1"`` for outliers).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> table = {"ecd_nm": rng.normal(10.0, 1.5, 3000)}
    >>> s = summarize(table, np.zeros(3000, int), frames_ok=1, frames_failed=0,
    ...               frames=np.repeat(np.arange(10), 300))
    >>> s["populations"][0]["n"], s["converged"]
    (3000, True)
    """
    n, labels = _validate_summary_inputs(table, labels, precision)
    if fraction_tolerance is None:
        fraction_tolerance = max(precision, 0.02)
    codes = _frame_codes(table, frames, n)
    inlier = labels >= 0
    ids = np.unique(labels[inlier])
    codes_in = codes[inlier]
    n_in = int(inlier.sum())
    total_frames = int(np.unique(codes).size)
    # Number fractions and sizes come from particles that stood alone. Touching groups lose
    # their small members more often (a small sphere on a big one is hidden or left in an
    # unsplittable agglomerate), so counting split-out particles biases a mixture's
    # fractions towards the big population. And a split-out piece is measured from a
    # regrown mask (a few % large), while some pieces are two overlapping particles that
    # could not be split, 1.15-1.6x one particle, convex, inside the population's size
    # range: no rule on one particle tells them apart from a large single, so they would
    # bias the mean by about as much as a ±1% interval. Isolated particles carry neither.
    rows_unsplit = ~np.asarray(table.get("separated", np.zeros(n, bool)), dtype=bool)
    rows_free = rows_unsplit & ~np.asarray(table.get("touching", np.zeros(n, bool)),
                                           dtype=bool)
    fraction_basis = _fraction_basis(table, rows_unsplit, rows_free, min_per_population)
    alone = inlier & rows_unsplit
    # sizes come from particles that were not split once enough were (the same rule)
    sizes_alone = fraction_basis in ("isolated", "untouched")
    size_rows = alone if sizes_alone else inlier
    # A particle that was not split can still have touched a group: when the group's small
    # members were boxed as an agglomerate or hidden, the large one is left looking alone,
    # so "not split" over-counts the large population (ps-bimodal, simulator truth: PS100
    # next to boxed piles). Counting only particles that touch nothing makes the count the
    # same for both sizes, up to the size bias of touching itself (_crowding_fractions).
    basis = {"untouched": inlier & rows_free, "isolated": alone}.get(fraction_basis, inlier)
    crowded = (np.full(len(ids), np.nan), np.full(len(ids), np.nan), math.nan)
    if fraction_basis == "untouched" and fraction_crowding and len(ids) > 1:
        x_frame = _crowding(codes, rows_free, rows_unsplit)
        counts = np.zeros((x_frame.size, len(ids)))
        pos = np.searchsorted(ids, labels[basis])
        np.add.at(counts, (codes[basis], pos), 1.0)
        crowded = _crowding_fractions(counts, np.nan_to_num(x_frame),
                                      _excluded_areas(table, basis, labels, ids),
                                      confidence=confidence, bound=fraction_variance_bound)
    pops = []
    for pid in ids:
        member = labels == pid
        sized = member & alone if sizes_alone else member
        if sized.sum() < min(min_per_population, member.sum()):
            sized = member  # too few stood alone (yet): every member
        st = population_stats(table, sized, codes, precision=precision,
                              confidence=confidence)
        n_member = int(member.sum())
        # more particles needed for the precision, counted as members of the population
        if st["n"]:
            st["needed_for_precision"] *= n_member / st["n"]
        frac, frac_half = _fraction_ci(member[basis], codes[basis], confidence=confidence,
                                       bound=fraction_variance_bound)
        j = int(np.searchsorted(ids, pid))
        frac, frac_half = _shrink_to_uncrowded(frac, frac_half, crowded[0][j],
                                               crowded[1][j], crowded[2])
        n_size = st.pop("n")
        st = {"id": int(pid), "n": n_member, "fraction": frac,
              "fraction_ci95": [max(0.0, frac - frac_half), min(1.0, frac + frac_half)],
              "n_size": n_size,
              "size_basis": "isolated" if n_size < n_member else "all", **st}
        st["_fraction_half"] = frac_half
        pops.append(st)
    _judge(pops, n_in=n_in, total_frames=total_frames, precision=precision,
           min_per_population=min_per_population, min_frames=min_frames,
           fraction_tolerance=fraction_tolerance)
    all_stats = population_stats(table, size_rows, codes, precision=precision,
                                 confidence=confidence) if n_in else None
    if all_stats is not None:
        all_stats["fraction"] = 1.0
        all_stats["n_size"], all_stats["n"] = all_stats["n"], n_in
        all_stats["converged"] = bool(np.isfinite(all_stats["ci95_rel"])
                                      and all_stats["ci95_rel"] <= precision)
        all_stats.pop("needed_for_precision")
    converged = bool(pops) and all(p["converged"] for p in pops)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "frames_ok": int(frames_ok),
        "frames_failed": int(frames_failed),
        "particles": int(n),
        "populations": [{k: v for k, v in p.items() if not k.startswith("_")} for p in pops],
        "all": all_stats,
        "outliers": int(n - n_in),
        "converged": converged,
        "precision": float(precision),
        "fraction_tolerance": float(fraction_tolerance),
        "fraction_basis": fraction_basis,
        "min_per_population": int(min_per_population),
        "min_frames": int(min_frames),
        "convergence": {
            "reason": _reason(pops, converged, n_in, total_frames, precision,
                              fraction_tolerance, min_frames),
            "populations": [{"id": p["id"], "converged": p["converged"],
                             "reasons": p["_reasons"], "needed_more": p["needed_more"],
                             "ci95_rel": p["ci95_rel"], "n": p["n"]} for p in pops],
        },
        "histogram": _histogram(np.asarray(table["ecd_nm"], dtype=float), labels, bins),
    }
    return json_safe(summary)


def _judge(pops, *, n_in, total_frames, precision, min_per_population, min_frames,
           fraction_tolerance):
    """Set ``converged``, ``needed_more`` and ``_reasons`` of every population, in place."""
    several = len(pops) > 1
    for p in pops:
        reasons = []
        needed = p.pop("needed_for_precision")
        rel = p["ci95_rel"]
        if not (np.isfinite(rel) and rel <= precision):
            reasons.append(f"mean ±{_pct(rel)} of ±{_pct(precision)} wanted")
        if p["n"] < min_per_population:
            reasons.append(f"{p['n']} of at least {min_per_population} particles")
            needed = max(needed, min_per_population - p["n"])
        half = p["_fraction_half"]
        if several and not half <= fraction_tolerance:
            reasons.append(f"fraction ±{half * 100:.1f} of ±{fraction_tolerance * 100:.1f} "
                           f"points")
            # the half-width shrinks as 1/√N: N·(half/tol)² particles in all, this
            # population's share of the extra ones
            extra_total = n_in * ((half / fraction_tolerance) ** 2 - 1)
            needed = max(needed, p["fraction"] * extra_total)
        if total_frames < min_frames:
            reasons.append(f"{total_frames} of at least {min_frames} frames")
        p["converged"] = not reasons
        p["needed_more"] = 0 if p["converged"] else (
            int(math.ceil(needed)) if np.isfinite(needed) else None)
        p["_reasons"] = reasons


def _pct(x):
    return f"{x * 100:.2g}%" if np.isfinite(x) else "∞"


def _reason(pops, converged, n_in, total_frames, precision, fraction_tolerance, min_frames):
    """One human-readable line on why the statistics have (not) converged."""
    if not pops:
        return "no particles yet" if n_in == 0 else "no population found yet"
    if converged:
        parts = [f"P{p['id']} {p['mean_ecd_nm']:.1f} nm ±{_pct(p['ci95_rel'])} (n={p['n']})"
                 for p in pops]
        tail = f"; fractions within ±{fraction_tolerance * 100:.1f} points" \
            if len(pops) > 1 else ""
        return (f"every population within ±{_pct(precision)} after {total_frames} frames: "
                + ", ".join(parts) + tail)
    parts = []
    for p in pops:
        if p["converged"]:
            continue
        more = f", ~{p['needed_more']} more particles" if p["needed_more"] else ""
        parts.append(f"P{p['id']}: " + "; ".join(p["_reasons"]) + more)
    return "not converged: " + " | ".join(parts)


def _histogram(ecd, labels, bins):
    good = np.isfinite(ecd) & (ecd > 0)
    core = good & (labels >= 0)
    ref = ecd[core] if core.any() else ecd[good]
    if ref.size == 0:
        return {"edges_nm": [], "counts": {}}
    lo, hi = np.quantile(ref, [0.001, 0.999])
    span = max(hi - lo, 1e-6 * max(hi, 1.0))
    edges = np.linspace(max(lo - 0.05 * span, 0.0), hi + 0.05 * span, bins + 1)
    counts = {}
    for pid in np.unique(labels[good]):
        counts[str(int(pid))] = np.histogram(ecd[good & (labels == pid)], edges)[0].tolist()
    return {"edges_nm": edges.tolist(), "counts": counts}


class RunningStatistics:
    """Population statistics updated frame by frame, with stable population ids.

    New particles are labelled with the current population model at once; the model is
    refitted (on a subsample) only when the particle count has grown by ``refit_growth``
    since the last fit, so an update stays cheap at 100,000 particles. After a refit,
    populations are matched to the previous ids by mean size and shape, so an id never jumps
    to another population; a new population gets the next unused id.

    Parameters
    ----------
    precision : float
        Wanted relative 95% half-width of every population's mean ECD.
    seed : int
        Seed of the clustering.
    min_per_population, min_frames, fraction_tolerance, fraction_variance_bound :
        Stop-rule settings (see :func:`summarize`).
    fraction_crowding : bool
        Fractions of an uncrowded field (see :func:`summarize`).
    method, max_populations :
        Clustering (see :func:`~particlewatch.analysis.populations.find_populations`).
    refit_growth : float
        Refit when the particle count reaches this factor times the count at the last fit.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rs = RunningStatistics(precision=0.02)
    >>> for i in range(5):
    ...     rs.add(f"frame_{i:05d}", {"ecd_nm": rng.normal(50.0, 5.0, 400)})
    >>> rs.converged
    True
    """

    def __init__(self, *, precision=0.01, seed=0, min_per_population=50, min_frames=3,
                 fraction_tolerance=None, fraction_variance_bound=_VARIANCE_BOUND,
                 method="auto", max_populations=6, refit_growth=1.5,
                 fraction_crowding=True):
        if not 0 < precision < 1:
            raise ValueError(f"precision ({precision}) must be in (0, 1), e.g. 0.01 for ±1%")
        if refit_growth <= 1:
            raise ValueError(f"refit_growth ({refit_growth}) must be > 1")
        self.precision = float(precision)
        self.seed = seed
        self.min_per_population = min_per_population
        self.min_frames = min_frames
        self.fraction_tolerance = fraction_tolerance
        self.fraction_variance_bound = fraction_variance_bound
        self.fraction_crowding = bool(fraction_crowding)
        self.method = method
        self.max_populations = max_populations
        self.refit_growth = refit_growth
        self._chunks = []          # one particle table per frame
        self._frame_names = []
        self._label_chunks = []
        self._columns = None
        self._model: PopulationModel | None = None
        self._fitted_n = 0
        self._id_map = np.zeros(0, dtype=np.int64)  # model group -> stable id
        self._signatures = {}      # stable id -> (mean log ECD, mean log aspect) at last fit
        self._next_id = 0
        self._cache = None
        self._summary = None

    # -- data ------------------------------------------------------------------------------
    def add(self, frame, particles):
        """Add one frame's particles and label them.

        Parameters
        ----------
        frame : str
            Frame name (e.g. ``frame_00001``); particles of one frame form one cluster.
        particles : dict of str to ndarray
            The frame's particle table (``ecd_nm`` required; the same columns every frame).
        """
        table = {k: np.asarray(v) for k, v in particles.items() if k not in ("frame",
                                                                            "population")}
        n = len(table["ecd_nm"]) if "ecd_nm" in table else 0
        if n == 0:
            table = {}  # an empty frame, whatever columns it came with
        elif "ecd_nm" not in table:
            raise ValueError(f"{frame}: particle table (columns {sorted(table)}) has no "
                             f"'ecd_nm' column")
        elif any(len(v) != n for v in table.values()):
            raise ValueError(f"{frame}: particle table columns differ in length")
        elif self._columns is None:
            self._columns = tuple(table)
        elif set(table) != set(self._columns):
            raise ValueError(f"{frame}: columns {sorted(table)} differ from earlier "
                             f"frames' {sorted(self._columns)}")
        self._chunks.append(table)
        self._frame_names.append(str(frame))
        self._label_chunks.append(self._predict(table))
        self._cache = None
        self._summary = None
        total = self.n_particles
        if total and (self._model is None or total >= self.refit_growth * self._fitted_n):
            self._refit()

    @property
    def n_particles(self) -> int:
        """Particles added so far."""
        return sum(_rows(c) for c in self._chunks)

    @property
    def n_frames(self) -> int:
        """Frames added so far (empty ones included)."""
        return len(self._chunks)

    @property
    def table(self):
        """All particles so far, with a ``frame`` column (the frame name)."""
        return self._concat()[0]

    @property
    def labels(self):
        """Stable population id of every particle so far, -1 for outliers."""
        return self._concat()[1]

    @property
    def model(self) -> PopulationModel | None:
        """The current population model (None before the first particle)."""
        return self._model

    def summary(self, *, frames_ok=None, frames_failed=0):
        """The summary dict (see :func:`summarize`) of everything added so far.

        Parameters
        ----------
        frames_ok : int, optional
            Frames analysed; defaults to the frames added.
        frames_failed : int
        """
        if frames_ok is None:
            frames_ok = self.n_frames
        table, labels = self._concat()
        # integer frame codes: sorting 100,000 frame-name strings on every update is slow
        codes = np.repeat(np.arange(len(self._chunks)), [_rows(t) for t in self._chunks])
        summary = summarize(table, labels, frames_ok=frames_ok, frames_failed=frames_failed,
                            precision=self.precision, frames=codes,
                            min_per_population=self.min_per_population,
                            min_frames=self.min_frames,
                            fraction_tolerance=self.fraction_tolerance,
                            fraction_variance_bound=self.fraction_variance_bound,
                            fraction_crowding=self.fraction_crowding)
        self._summary = summary
        return summary

    @property
    def converged(self) -> bool:
        """Whether the stop rule holds for everything added so far."""
        if self._summary is None:
            self.summary()
        return bool(self._summary["converged"])

    # -- internals -------------------------------------------------------------------------
    def _concat(self):
        if self._cache is None:
            cols = self._columns or ("ecd_nm",)
            table = {c: np.concatenate([np.zeros(0)] + [np.asarray(t[c]) for t in self._chunks
                                                        if t]) for c in cols}
            table["frame"] = np.repeat(np.array(self._frame_names, dtype=object),
                                       [_rows(t) for t in self._chunks])
            labels = np.concatenate(self._label_chunks) if self._label_chunks \
                else np.zeros(0, dtype=np.int64)
            self._cache = (table, labels)
        return self._cache

    def _predict(self, table):
        n = _rows(table)
        if self._model is None or n == 0:
            return np.full(n, -1, dtype=np.int64)
        raw = self._model.predict(table)
        return np.where(raw >= 0, self._id_map[np.maximum(raw, 0)], -1)

    def _refit(self):
        self._cache = None
        table, _ = self._concat()
        features = {c: table[c] for c in table if c != "frame"}
        components = None
        if self._model is not None and len(self._model.weights):
            # search around the previous number of components: the sample changes slowly
            k = len(self._model.weights)
            components = (max(1, k - 1), min(k + 1, self.max_populations + 2))
        model = fit_populations(features, method=self.method,
                                max_populations=self.max_populations, seed=self.seed,
                                components=components, previous=self._model)
        raw = model.predict(features)
        self._id_map = self._match_ids(features, raw, model.n_populations)
        self._model = model
        self._fitted_n = len(raw)
        labels = np.where(raw >= 0, self._id_map[np.maximum(raw, 0)], -1)
        bounds = np.cumsum([0] + [_rows(t) for t in self._chunks])
        self._label_chunks = [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._cache = None

    def _match_ids(self, table, raw, n_groups):
        """Stable id for each new group: nearest previous population by size and shape."""
        from scipy.optimize import linear_sum_assignment

        sig = _signatures(table, raw, n_groups)
        ids = np.full(n_groups, -1, dtype=np.int64)
        old_ids = list(self._signatures)
        if old_ids and n_groups:
            old = np.array([self._signatures[i] for i in old_ids])
            cost = np.sqrt(((sig[:, None, :] - old[None, :, :]) ** 2).sum(-1))
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols):
                # log units: 0.2 ≈ 22% in size; farther is a different population
                if cost[r, c] < 0.2:
                    ids[r] = old_ids[c]
        for g in range(n_groups):
            if ids[g] < 0:
                ids[g] = self._next_id
                self._next_id += 1
        self._next_id = max(self._next_id, int(ids.max()) + 1 if n_groups else 0)
        self._signatures = {int(i): s for i, s in zip(ids, sig)}
        return ids


def _rows(table):
    return len(table["ecd_nm"]) if table else 0


def _signatures(table, raw, n_groups):
    """(mean log ECD, mean log aspect ratio) of each group, for matching ids across fits."""
    ecd = np.asarray(table["ecd_nm"], dtype=float)
    n = len(ecd)
    aspect = _column(table, "aspect_ratio", n)
    out = np.zeros((n_groups, 2))
    for g in range(n_groups):
        sel = (raw == g) & np.isfinite(ecd) & (ecd > 0)
        out[g, 0] = np.log(ecd[sel]).mean() if sel.any() else 0.0
        a = aspect[sel]
        a = a[np.isfinite(a) & (a > 0)]
        out[g, 1] = np.log(a).mean() if a.size else 0.0
    return out
