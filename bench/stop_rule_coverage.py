"""Coverage of the stop rule: is the true mean inside the interval reported at the stop?

Simulates many sequential acquisition sessions per sample, directly as particle tables (no
images): every frame holds a random number of particles (the grid's density varies, some
frames are empty), every frame shifts the sizes it measures by a random factor (focus,
thickness: particles of one frame are correlated), mixtures vary in composition from frame to
frame, and a few percent of the particles are agglomerates and debris. About a third of the
particles are marked as split from touching groups (``separated``), measured a little
elongated, and a quarter of those are two overlapping particles that separation could not split
(convex, 1.15–1.6× the ECD of one), as in analysed frames. After every frame the
session updates ``RunningStatistics`` and stops at the first ``converged`` — exactly what a
live session does, and what inflates the error of a naive rule. At the stop it checks, per
population, whether the true mean lies inside the reported ``ci95_nm``.

Usage::

    python bench/stop_rule_coverage.py [--sessions 200] [--precision 0.01] [--jobs 2]
        [--samples au10,ps100,ps-bimodal,silica-capsules,spheres-rods] [--frame-sd 0.01]
        [--truth-simulator] [--rules bound90,bound75,plain]

``--rules`` judges the same sessions by several stop-rule variants (``RULES``: the fractions'
between-frame variance with its 90% or 75% upper bound, or plain); each prints the coverage
of the means and of the fractions (mixtures) at its own stop.

``--truth-simulator`` draws each frame's true particles from the real simulator's specimen
(``Specimen.particles_in`` over a record field), with the same measurement model on top.

``--touching`` adds the pipeline's ``touching`` column, so fractions are counted on untouched
particles: ``exclusion`` makes a particle touch another as particles dropped at random do,
with probability ``1 − exp(−x·A/Ā)`` (``A`` its excluded area, ``π·E(r + r')²`` over the
frame's particles, ``x`` the frame's crowding, proportional to its particle count), so large
particles touch more often; ``random`` touches the same share of particles whatever their
size (as the simulator's agglomerates pick their members); split pieces always touch.
``--crowding off`` judges the plain untouched counts instead of the fractions' crowding
correction (``fraction_crowding``, on by default).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from particlewatch.analysis.statistics import RunningStatistics, summarize
from particlewatch.simulators import shapes
from particlewatch.simulators.samples import SAMPLES
from particlewatch.simulators.specimen import Specimen

DEFAULT_SAMPLES = ("au10", "ps100", "ps-bimodal", "silica-capsules", "spheres-rods")
PARTICLES_PER_FRAME = 400  # mean; a 2048² record frame of these samples holds ~100 to 1,500
MAX_FRAMES = 400


def true_particles(spec, n, rng):
    """Exact ECD, Feret max/min and population of ``n`` particles of a sample's model."""
    fractions = np.array([p.fraction for p in spec.populations])
    pop = rng.choice(len(fractions), size=n, p=fractions / fractions.sum())
    out = {k: np.zeros(n) for k in ("ecd_nm", "feret_max_nm", "feret_min_nm")}
    for i, pp in enumerate(spec.populations):
        sel = np.flatnonzero(pop == i)
        a = np.clip(rng.normal(pp.size_nm, pp.size_sd_nm, sel.size),
                    pp.size_nm - 4 * pp.size_sd_nm, pp.size_nm + 4 * pp.size_sd_nm)
        b = np.minimum(rng.normal(pp.width_nm, pp.width_sd_nm, sel.size), a) \
            if pp.shape == "rod" else a
        p = rng.uniform(*pp.p_range, sel.size) if pp.shape == "cube" else np.full(sel.size,
                                                                                  2.0)
        m = shapes.measures(shapes.SHAPES.index(pp.shape), a=a, b=b, p=p)
        for k in out:
            out[k][sel] = m[k]
    out["population"] = pop
    return out


@functools.lru_cache(maxsize=None)
def true_means(name, *, seed=12345, n=400_000):
    """Mean ECD of each population of a sample's model (what the interval must hold)."""
    spec = SAMPLES[name]
    t = true_particles(spec, n, np.random.default_rng(seed))
    return np.array([t["ecd_nm"][t["population"] == i].mean()
                     for i in range(len(spec.populations))])


def touching_flags(ecd_nm, crowding, rng, *, model):
    """Which of a frame's particles touch another (``model`` "exclusion" or "random").

    ``exclusion``: untouched with probability ``exp(−crowding·A_i/Ā)``, ``A_i = π·E_j(r_i +
    r_j)²`` the excluded area of a disc of the particle's ECD against the frame's particles
    (what a Poisson field gives, the density folded into ``crowding``); ``random``: every
    particle untouched with the frame's mean of that probability, whatever its size.
    """
    r = np.asarray(ecd_nm, float) / 2.0
    if r.size == 0:
        return np.zeros(0, bool)
    # E_j (r_i + r_j)² = r_i² + 2 r_i E r + E r²
    area = np.pi * (r ** 2 + 2 * r * r.mean() + np.mean(r ** 2))
    keep = np.exp(-crowding * area / area.mean())
    if model == "random":
        keep = np.full(r.size, keep.mean())
    return rng.random(r.size) >= keep


def measure_frame(truth, rng, *, frame_sd, outliers=0.05, split=0.35, merged=0.25,
                  touching=None, crowding=0.5):
    """A measured particle table from a frame's true particles.

    The frame's sizes share one random factor ``1 + N(0, frame_sd)`` (focus, thickness),
    each particle adds 1% noise; ``outliers`` of the rows are agglomerates and debris;
    ``split`` of the rows come from separated groups, ``merged`` of those unsplit pairs.
    ``touching`` (None, "exclusion" or "random"): add a ``touching`` column
    (:func:`touching_flags` at the frame's ``crowding``; split pieces touch).
    """
    n = len(truth["ecd_nm"])
    touch = touching_flags(truth["ecd_nm"], crowding, rng, model=touching) \
        if touching else None
    shift = 1.0 + rng.normal(0.0, frame_sd)
    noise = shift * (1.0 + rng.normal(0.0, 0.01, n))
    ecd = truth["ecd_nm"] * noise
    fmax = truth["feret_max_nm"] * noise
    fmin = truth["feret_min_nm"] * noise * (1 - np.abs(rng.normal(0, 0.02, n)))
    aspect = fmax / fmin
    solidity = np.clip(rng.normal(0.985, 0.007, n), 0, 1)
    circ = np.clip(np.where(aspect > 1.8, 0.66, 0.96) + rng.normal(0, 0.015, n), 0, 1)
    bad = rng.random(n) < outliers
    agg = bad & (rng.random(n) < 0.6)
    deb = bad & ~agg
    k = rng.integers(2, 5, n)
    ecd = np.where(agg, ecd * np.sqrt(k) * 0.95, np.where(deb, ecd * rng.uniform(0.15, 0.4,
                                                                                  n), ecd))
    aspect = np.where(bad, rng.uniform(1.3, 2.8, n), aspect)
    fmax = np.where(bad, ecd * np.sqrt(aspect), fmax)
    fmin = np.where(bad, ecd / np.sqrt(aspect), fmin)
    solidity = np.where(bad, rng.uniform(0.7, 0.88, n), solidity)
    circ = np.where(bad, rng.uniform(0.4, 0.75, n), circ)
    sep = ~bad & (rng.random(n) < split)
    pair = sep & (rng.random(n) < merged)
    grow = np.where(pair, rng.uniform(1.15, 1.6, n), 1.0)
    ecd, fmax, fmin = ecd * grow, fmax * grow, fmin * grow
    stretch = np.where(sep, rng.uniform(1.0, 1.15, n), 1.0)
    fmax, aspect = fmax * stretch, aspect * stretch
    circ = np.where(sep, circ - 0.03, circ)
    solidity = np.where(sep, np.clip(rng.normal(0.98, 0.006, n), 0, 1), solidity)
    out = {"ecd_nm": ecd, "feret_max_nm": fmax, "feret_min_nm": fmin, "aspect_ratio": aspect,
           "circularity": circ, "solidity": solidity, "separated": sep}
    if touch is not None:
        out["touching"] = touch | sep
    return out


class _SimulatorFrames:
    """True particles of consecutive record fields of the simulator's specimen."""

    def __init__(self, name, seed):
        self.specimen = Specimen(name, seed=seed)
        self.field_nm = SAMPLES[name].pixel_nm * 1024  # a 1024² record frame
        self.i = 0

    def __call__(self, rng):
        # serpentine-free simple raster over the grid; empty areas give empty frames
        ix, iy = self.i % 40, self.i // 40
        self.i += 1
        x0 = -50_000 + ix * 2.5 * self.field_nm
        y0 = -50_000 + iy * 2.5 * self.field_nm
        t = self.specimen.particles_in(x0, y0, x0 + self.field_nm, y0 + self.field_nm)
        return {k: t[k] for k in ("ecd_nm", "feret_max_nm", "feret_min_nm", "population")}


#: Stop-rule variants compared on the same sessions (keyword arguments of ``summarize``):
#: the fractions' between-frame variance with its 90% upper bound against optional stopping
#: (the rule until now), a 75% bound, or the plain estimate.
RULES = {
    "bound90": {"fraction_variance_bound": 0.9},
    "bound75": {"fraction_variance_bound": 0.75},
    "plain": {"fraction_variance_bound": None},
}


def run_session(name, seed, *, precision, frame_sd, truth_simulator=False, rules=("bound90",),
                touching=None, crowding=True):
    """One sequential session judged by every rule in ``rules`` at once.

    The particles, labels and refits are shared (they do not depend on the rule); each rule
    stops at its own first ``converged``. Returns ``{rule: (stopped, frames, particles,
    covered per population, fraction covered per population)}``.
    """
    spec = SAMPLES[name]
    rng = np.random.default_rng([seed, 7])
    means = true_means(name)
    fractions = np.array([p.fraction for p in spec.populations])
    stats = RunningStatistics(precision=precision, seed=seed)
    source = _SimulatorFrames(name, seed) if truth_simulator else None
    sizes, done, last = [], {}, {}
    for f in range(MAX_FRAMES):
        if source is not None:
            truth = source(rng)
        else:
            # density varies over the grid: gamma-distributed frame means, some frames empty
            n = int(rng.poisson(PARTICLES_PER_FRAME * rng.gamma(2.0, 0.5)))
            sub = SAMPLES[name]
            if len(fractions) > 1:  # local composition varies too
                local = rng.dirichlet(fractions * 100.0)  # ±5 points frame to frame
                sub = _with_fractions(spec, local)
            truth = true_particles(sub, n, rng)
        # crowding grows with the frame's particle count (mean 0.5: ~40% touch)
        measured = measure_frame(truth, rng, frame_sd=frame_sd, touching=touching,
                                 crowding=0.5 * len(truth["ecd_nm"]) / PARTICLES_PER_FRAME)
        stats.add(f"frame_{f:05d}", measured)
        sizes.append(len(measured["ecd_nm"]))
        codes = np.repeat(np.arange(len(sizes)), sizes)
        table, labels = stats.table, stats.labels
        for rule in rules:
            if rule in done:
                continue
            summary = summarize(table, labels, frames_ok=f + 1, frames_failed=0,
                                precision=precision, frames=codes,
                                fraction_crowding=crowding, **RULES[rule])
            last[rule] = summary
            if summary["converged"]:
                done[rule] = _verdict(summary, f + 1, means, fractions)
        if len(done) == len(rules):
            break
    for rule in rules:
        if rule not in done:
            done[rule] = _verdict(last[rule], MAX_FRAMES, means, fractions)
    return done


def _verdict(summary, frames, means, fractions):
    covered = _coverage(summary, means)
    frac_covered = _fraction_coverage(summary, means, fractions) if len(fractions) > 1 \
        else []
    return (bool(summary["converged"]), frames, summary["particles"], covered, frac_covered)


def _with_fractions(spec, fractions):
    from dataclasses import replace

    pops = tuple(replace(p, fraction=float(w)) for p, w in zip(spec.populations, fractions))
    return replace(spec, populations=pops)


def _coverage(summary, means):
    """Per true population: is its mean inside the interval of the matching population?"""
    pops = summary["populations"]
    covered = []
    for m in means:
        if not pops:
            covered.append(False)
            continue
        best = min(pops, key=lambda p: abs((p["mean_ecd_nm"] or np.inf) - m))
        lo, hi = best["ci95_nm"]
        # a population merged with another, or a missing one, is a miss too
        ok = (lo is not None and hi is not None and lo <= m <= hi
              and len(pops) == len(means))
        covered.append(bool(ok))
    return covered


def _fraction_coverage(summary, means, fractions):
    """Per true population: is its fraction inside the matching population's interval?"""
    pops = summary["populations"]
    covered = []
    for m, w in zip(means, fractions / fractions.sum()):
        if len(pops) != len(means):
            covered.append(False)
            continue
        best = min(pops, key=lambda p: abs((p["mean_ecd_nm"] or np.inf) - m))
        lo, hi = best["fraction_ci95"]
        covered.append(bool(lo is not None and hi is not None and lo <= w <= hi))
    return covered


def _one(args):
    return run_session(*args[:2], **args[2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--precision", type=float, default=0.01)
    parser.add_argument("--frame-sd", type=float, default=0.01,
                        help="relative sd of the per-frame size shift (default 0.01)")
    parser.add_argument("--samples", default=",".join(DEFAULT_SAMPLES))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rules", default=",".join(RULES),
                        help=f"stop-rule variants to compare ({', '.join(RULES)})")
    parser.add_argument("--touching", choices=("exclusion", "random"), default=None,
                        help="add a touching column (size-dependent or not)")
    parser.add_argument("--crowding", choices=("on", "off"), default="on",
                        help="the fractions' crowding correction (with --touching)")
    parser.add_argument("--truth-simulator", action="store_true",
                        help="draw true particles from the simulator's specimen")
    args = parser.parse_args(argv)
    names = [s for s in args.samples.split(",") if s]
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        parser.error(f"unknown rules {unknown}; choose from {sorted(RULES)}")
    print(f"stop rule coverage: {args.sessions} sessions per sample, precision "
          f"±{args.precision:.1%}, frame shift sd {args.frame_sd:.1%}, "
          f"{'simulator specimen' if args.truth_simulator else 'model'} particles, "
          f"touching {args.touching or 'none'}, crowding correction {args.crowding}")
    print(f"{'sample':<16} {'rule':<8} {'pop':>3} {'mean cov':>9} {'frac cov':>9} "
          f"{'stopped':>8} {'frames':>12} {'particles':>16}")
    worst = {rule: 1.0 for rule in rules}
    for name in names:
        t0 = time.time()
        kw = {"precision": args.precision, "frame_sd": args.frame_sd,
              "truth_simulator": args.truth_simulator, "rules": rules,
              "touching": args.touching, "crowding": args.crowding == "on"}
        tasks = [(name, s, kw) for s in range(args.sessions)]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(_one, tasks, chunksize=4))
        else:
            results = [_one(t) for t in tasks]
        for rule in rules:
            res = [r[rule] for r in results]
            stopped = np.array([r[0] for r in res])
            frames = np.array([r[1] for r in res])
            particles = np.array([r[2] for r in res])
            cov = np.array([r[3] for r in res])
            fcov = np.array([r[4] for r in res])
            for i in range(cov.shape[1]):
                c = cov[:, i].mean()
                worst[rule] = min(worst[rule], c)
                fc = ""
                if fcov.ndim == 2 and fcov.shape[1]:
                    worst[rule] = min(worst[rule], fcov[:, i].mean())
                    fc = f"{fcov[:, i].mean():>9.1%}"
                print(f"{name:<16} {rule:<8} {i:>3} {c:>9.1%} {fc:>9} {stopped.mean():>8.0%} "
                      f"{np.median(frames):>5.0f} [{frames.min()}-{frames.max()}] "
                      f"{np.median(particles):>7.0f} [{particles.min()}-{particles.max()}]"
                      f"  ({time.time() - t0:.0f} s)")
        sys.stdout.flush()
    for rule in rules:
        print(f"worst coverage {rule}: {worst[rule]:.1%} (target ≥ 93%)")
    return 0 if all(w >= 0.93 for w in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
