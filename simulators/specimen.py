"""The simulated specimen: a grid square of particles, generated lazily by region.

The grid area spans stage x and y from -60 to +60 µm (120 × 120 µm). It is cut into square
cells; each cell's particles are drawn only when a query first touches it, from a generator
seeded by ``(seed, ix, iy)``, so any region comes out the same whatever order it is visited
in, and a large grid costs nothing until imaged.

Density varies smoothly across the grid: a random low-frequency field (wavelengths 20–80 µm)
sets the local particle coverage; about a quarter of the grid holds no particles at all, the
densest regions about three times the sample's mean coverage. A fraction of the particles,
growing with the local density, sits in agglomerates grown as random chains in which each new
particle touches or overlaps (by up to 20% of the contact distance) an earlier one. Overlaps
are physical: the renderer adds projected thicknesses.

The true focus height of the film varies smoothly too: a tilt of ~3 mrad in a random direction
(~0.3 µm across 100 µm), a bow of 0.15 µm (the grid bent up in the middle), a gentle ripple of
20 nm amplitude and a random offset of up to ±0.3 µm from eucentric focus.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from scipy.spatial import cKDTree

from . import shapes
from .samples import MATERIAL_NAMES, SampleSpec, get_sample

#: Stage area (µm) that holds the grid square: x_min, y_min, x_max, y_max.
GRID_EXTENT_UM = (-60.0, -60.0, 60.0, 60.0)
#: Largest agglomerate, in particles; it bounds how far a particle strays from its cell.
MAX_CLUSTER = 16
_CELL_OFFSET = 1 << 20  # SeedSequence entropy must be non-negative
_EMPTY_THRESHOLD = 0.67  # P(N(0,1) < -0.67) ≈ 25%: a quarter of the grid is empty
_MAX_DENSITY = 3.0

#: Columns of a particle table (a dict of equal-length arrays).
PARTICLE_COLUMNS = ("x_nm", "y_nm", "population", "shape", "material", "a_nm", "b_nm",
                    "shell_nm", "p", "angle", "area_nm2", "ecd_nm", "feret_max_nm",
                    "feret_min_nm", "hx_nm", "hy_nm")


def empty_table() -> dict[str, np.ndarray]:
    """A particle table with no rows."""
    ints = {"population", "shape", "material"}
    return {c: np.zeros(0, dtype=np.int64 if c in ints else np.float64)
            for c in PARTICLE_COLUMNS}


def concat_tables(tables) -> dict[str, np.ndarray]:
    """Concatenate particle tables row-wise."""
    tables = [t for t in tables if len(t["x_nm"])]
    if not tables:
        return empty_table()
    return {c: np.concatenate([t[c] for t in tables]) for c in PARTICLE_COLUMNS}


def take(table: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """Rows ``index`` (a boolean mask or integer indices) of a particle table."""
    return {c: table[c][index] for c in PARTICLE_COLUMNS}


def _truncated_normal(rng, mean, sd, n, *, low):
    """Normal draws clipped to mean ± 4 sd and to at least ``low``."""
    if n == 0:
        return np.zeros(0)
    values = rng.normal(mean, sd, n) if sd > 0 else np.full(n, float(mean))
    return np.clip(values, max(low, mean - 4 * sd), mean + 4 * sd)


class Specimen:
    """A grid square holding a sample's particles, generated lazily by region.

    Parameters
    ----------
    sample : str or SampleSpec
        A name in :data:`~.samples.SAMPLES` or a spec.
    seed : int
        Everything (particles, density, focus map) is a function of ``(sample, seed)``.

    Examples
    --------
    >>> spec = Specimen("au10", seed=1)
    >>> table = spec.particles_in(0, 0, 1000, 1000)   # nm
    >>> sorted(table)[:3]
    ['a_nm', 'angle', 'area_nm2']
    """

    def __init__(self, sample: str | SampleSpec = "au10", *, seed: int = 0):
        self.sample = get_sample(sample)
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.extent_um = GRID_EXTENT_UM
        pops = self.sample.populations
        if pops:
            frac = np.array([p.fraction for p in pops], dtype=float)
            self._fractions = frac / frac.sum()
            areas = [self._mean_area_nm2(p) for p in pops]
            self._mean_area_nm2_all = float(np.dot(self._fractions, areas))
            # the largest half-size any particle can have (sizes are clipped at mean + 4 sd)
            self._max_half_nm = max(0.5 * (p.size_nm + 4 * p.size_sd_nm) * 1.05 for p in pops)
            # a cell holds ~400 particles at mean density: cheap to draw, few cells per frame
            side = np.sqrt(400.0 * self._mean_area_nm2_all / self.sample.coverage)
            self.cell_nm = float(np.clip(side, 250.0, 10_000.0))
        else:
            self._fractions = np.zeros(0)
            self._mean_area_nm2_all = 1.0
            self._max_half_nm = 0.0
            self.cell_nm = 10_000.0
        #: How far (nm) a particle's outline can reach beyond the cell it was drawn in.
        self.reach_nm = 2.0 * MAX_CLUSTER * self._max_half_nm + self._max_half_nm
        self._cells: OrderedDict = OrderedDict()
        self._cache_cells = 4096
        field_rng = np.random.default_rng([self.seed, 7])
        k = 8
        wavelength = field_rng.uniform(20.0, 80.0, k)
        direction = field_rng.uniform(0.0, 2 * np.pi, k)
        self._wave_kx = 2 * np.pi / wavelength * np.cos(direction)
        self._wave_ky = 2 * np.pi / wavelength * np.sin(direction)
        self._wave_phase = field_rng.uniform(0.0, 2 * np.pi, k)
        focus_rng = np.random.default_rng([self.seed, 11])
        tilt_dir = focus_rng.uniform(0.0, 2 * np.pi)
        tilt = 3e-3 * focus_rng.uniform(0.7, 1.3)
        self._tilt = (tilt * np.cos(tilt_dir), tilt * np.sin(tilt_dir))
        self._bow_um = 0.15
        self._focus_offset_um = focus_rng.uniform(-0.3, 0.3)
        self._ripple = (focus_rng.uniform(0, 2 * np.pi), focus_rng.uniform(0, 2 * np.pi))

    # ---- smooth fields ---------------------------------------------------------------
    def density(self, x_um, y_um):
        """Relative particle density at stage ``(x_um, y_um)``: 0 (empty) to 3.

        1 means the sample's mean ``coverage``; outside the grid it is 0.
        """
        x = np.asarray(x_um, dtype=float)
        y = np.asarray(y_um, dtype=float)
        phase = (x[..., None] * self._wave_kx + y[..., None] * self._wave_ky
                 + self._wave_phase)
        g = np.sqrt(2.0 / len(self._wave_kx)) * np.cos(phase).sum(-1)
        f = np.clip(g + _EMPTY_THRESHOLD, 0.0, _MAX_DENSITY)
        x0, y0, x1, y1 = self.extent_um
        outside = (x < x0) | (x > x1) | (y < y0) | (y > y1)
        f = np.where(outside, 0.0, f)
        return f if f.ndim else float(f)

    def true_focus_um(self, x_um, y_um):
        """Defocus (µm) at which the film at stage ``(x_um, y_um)`` is in focus."""
        x = np.asarray(x_um, dtype=float)
        y = np.asarray(y_um, dtype=float)
        r2 = (x / 60.0) ** 2 + (y / 60.0) ** 2
        ripple = 0.02 * np.sin(2 * np.pi * x / 30.0 + self._ripple[0]) * np.cos(
            2 * np.pi * y / 35.0 + self._ripple[1])
        z = (self._focus_offset_um + self._tilt[0] * x + self._tilt[1] * y
             + self._bow_um * (1.0 - r2) + ripple)
        return z if np.ndim(z) else float(z)

    # ---- particles -------------------------------------------------------------------
    def expected_count(self, area_um2: float) -> float:
        """Mean number of particles in ``area_um2`` at the sample's mean density (1)."""
        if self.sample.empty:
            return 0.0
        return self.sample.coverage * area_um2 * 1e6 / self._mean_area_nm2_all

    @staticmethod
    def _mean_area_nm2(pop) -> float:
        a = pop.size_nm
        b = pop.width_nm if pop.shape == "rod" else a
        code = shapes.SHAPES.index(pop.shape)
        return float(shapes.measures(code, a=a, b=b, p=max(pop.p_range[0], 2.0))["area_nm2"])

    def _cell_index(self, x_nm: float) -> int:
        return int(np.floor(x_nm / self.cell_nm))

    def _cell(self, ix: int, iy: int) -> dict[str, np.ndarray]:
        key = (ix, iy)
        table = self._cells.get(key)
        if table is None:
            table = self._draw_cell(ix, iy)
            self._cells[key] = table
            if len(self._cells) > self._cache_cells:
                self._cells.popitem(last=False)
        else:
            self._cells.move_to_end(key)
        return table

    def _draw_cell(self, ix: int, iy: int) -> dict[str, np.ndarray]:
        spec = self.sample
        if spec.empty:
            return empty_table()
        cell = self.cell_nm
        x0, y0 = ix * cell, iy * cell
        f = self.density((x0 + cell / 2) / 1000.0, (y0 + cell / 2) / 1000.0)
        rng = np.random.default_rng([self.seed, ix + _CELL_OFFSET, iy + _CELL_OFFSET])
        n = int(rng.poisson(f * spec.coverage * cell * cell / self._mean_area_nm2_all))
        if n == 0:
            return empty_table()
        pop = rng.choice(len(spec.populations), size=n, p=self._fractions)
        cols = {c: np.zeros(n) for c in ("a_nm", "b_nm", "shell_nm", "p", "angle")}
        shape = np.zeros(n, dtype=np.int64)
        material = np.zeros(n, dtype=np.int64)
        for i, pp in enumerate(spec.populations):
            sel = np.flatnonzero(pop == i)
            m = len(sel)
            a = _truncated_normal(rng, pp.size_nm, pp.size_sd_nm, m, low=1.0)
            if pp.shape == "rod":
                b = np.minimum(_truncated_normal(rng, pp.width_nm, pp.width_sd_nm, m,
                                                 low=1.0), a)
            else:
                b = a
            shell = np.zeros(m)
            if pp.shape == "capsule":
                shell = np.minimum(_truncated_normal(rng, pp.shell_nm, pp.shell_sd_nm, m,
                                                     low=0.5), 0.45 * a)
            p = rng.uniform(*pp.p_range, m) if pp.shape == "cube" else np.full(m, 2.0)
            cols["a_nm"][sel], cols["b_nm"][sel], cols["shell_nm"][sel], cols["p"][sel] = (
                a, b, shell, p)
            shape[sel] = shapes.SHAPES.index(pp.shape)
            material[sel] = MATERIAL_NAMES.index(pp.material)
        cols["angle"] = rng.uniform(0.0, np.pi, n)
        x, y = self._place(rng, n, x0, y0, f, shape, cols)
        table = {"x_nm": x, "y_nm": y, "population": pop.astype(np.int64), "shape": shape,
                 "material": material, **cols}
        _derive(table)
        gx0, gy0, gx1, gy1 = (v * 1000.0 for v in self.extent_um)
        keep = (x >= gx0) & (x <= gx1) & (y >= gy0) & (y <= gy1)
        return take(table, keep)

    def _place(self, rng, n, x0, y0, f, shape, cols):
        """Centres of ``n`` particles in the cell at ``(x0, y0)``: agglomerates and singles.

        Agglomerates grow as random chains of touching or overlapping particles. Singles are
        then spread out: a single closer than its circumradius (plus 15%) to any particle is
        drawn again, a few times at most, so sparse regions hold mostly isolated particles
        (as on a well-dried grid) while dense regions keep chance contacts.
        """
        spec = self.sample
        cell = self.cell_nm
        x = x0 + rng.uniform(0.0, cell, n)
        y = y0 + rng.uniform(0.0, cell, n)
        single = np.ones(n, dtype=bool)
        agg = float(np.clip(spec.agglomeration * (0.4 + 0.6 * f), 0.0, 0.95))
        n_agg = int(rng.binomial(n, agg))
        if n_agg >= 2:
            members = self._grow_clusters(rng, n, n_agg, x, y, shape, cols)
            single[members[members >= 0]] = False
        # circumradius: a single must not touch anything whatever its orientation
        a = cols["a_nm"]
        radius = np.where(shape == shapes.CUBE, a * 2.0 ** (-0.5 - 1.0 / cols["p"]),
                          a / 2.0)
        for _ in range(6):
            pairs = cKDTree(np.column_stack([x, y])).query_pairs(
                2.3 * radius.max(), output_type="ndarray")
            if pairs.size == 0:
                break
            i, j = pairs[:, 0], pairs[:, 1]
            close = np.hypot(x[i] - x[j], y[i] - y[j]) < 1.15 * (radius[i] + radius[j])
            mover = np.where(single[j], j, np.where(single[i], i, -1))[close]
            mover = np.unique(mover[mover >= 0])
            if mover.size == 0:
                break
            x[mover] = x0 + rng.uniform(0.0, cell, mover.size)
            y[mover] = y0 + rng.uniform(0.0, cell, mover.size)
        return x, y

    def _grow_clusters(self, rng, n, n_agg, x, y, shape, cols):
        """Move ``n_agg`` random particles into agglomerates, in place; return the members.

        Returns
        -------
        ndarray, int, shape (clusters, MAX_CLUSTER)
            Particle indices of each agglomerate, -1 padded.
        """
        spec = self.sample
        # agglomerate sizes: 1 + geometric (mean cluster_size), 2..MAX_CLUSTER, enough of
        # them to hold n_agg particles; the last one is cut to fit
        draws = np.clip(1 + rng.geometric(1.0 / max(spec.cluster_size - 1, 1.0), n_agg // 2),
                        2, MAX_CLUSTER)
        count = int(np.searchsorted(np.cumsum(draws), n_agg)) + 1
        sizes = draws[:count].tolist()
        sizes[-1] -= sum(sizes) - n_agg
        if sizes[-1] < 2:
            sizes.pop()
        # contact radius: half the mean of the largest and smallest width
        radius = np.where(shape == shapes.ROD, (cols["a_nm"] + cols["b_nm"]) / 4.0,
                          cols["a_nm"] / 2.0)
        order = rng.permutation(n)
        start = 0
        members = np.full((len(sizes), MAX_CLUSTER), -1, dtype=np.int64)
        for c, size in enumerate(sizes):
            members[c, :size] = order[start:start + size]
            start += size
        # grow every cluster one member at a time, vectorised over clusters: member k sits
        # against a random earlier member (its parent), 80–100% of their contact distance
        for k in range(1, MAX_CLUSTER):
            live = np.flatnonzero(members[:, k] >= 0)
            if live.size == 0:
                break
            child = members[live, k]
            parent = members[live, rng.integers(0, k, live.size)]
            dist = (radius[child] + radius[parent]) * rng.uniform(0.8, 1.0, live.size)
            theta = rng.uniform(0.0, 2 * np.pi, live.size)
            x[child] = x[parent] + dist * np.cos(theta)
            y[child] = y[parent] + dist * np.sin(theta)
        return members

    def particles_in(self, x0_nm: float, y0_nm: float, x1_nm: float,
                     y1_nm: float) -> dict[str, np.ndarray]:
        """Particles whose bounding box meets the stage rectangle (nm).

        Returns
        -------
        dict of ndarray
            A particle table (:data:`PARTICLE_COLUMNS`), in a deterministic order.
        """
        if x1_nm < x0_nm or y1_nm < y0_nm:
            raise ValueError(f"empty rectangle ({x0_nm}, {y0_nm}, {x1_nm}, {y1_nm})")
        if self.sample.empty:
            return empty_table()
        r = self.reach_nm
        ixs = range(self._cell_index(x0_nm - r), self._cell_index(x1_nm + r) + 1)
        iys = range(self._cell_index(y0_nm - r), self._cell_index(y1_nm + r) + 1)
        table = concat_tables(self._cell(ix, iy) for iy in iys for ix in ixs)
        x, y, hx, hy = table["x_nm"], table["y_nm"], table["hx_nm"], table["hy_nm"]
        hit = (x + hx >= x0_nm) & (x - hx <= x1_nm) & (y + hy >= y0_nm) & (y - hy <= y1_nm)
        return take(table, hit)


def _derive(table: dict[str, np.ndarray]) -> None:
    """Fill the exact measures and bounding half-extents of each row, in place."""
    n = len(table["x_nm"])
    for c in ("area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm", "hx_nm", "hy_nm"):
        table[c] = np.zeros(n)
    for code in np.unique(table["shape"]):
        sel = table["shape"] == code
        kw = {"a": table["a_nm"][sel], "b": table["b_nm"][sel], "p": table["p"][sel]}
        for key, value in shapes.measures(int(code), **kw).items():
            table[key][sel] = value
        hx, hy = shapes.half_extents(int(code), angle=table["angle"][sel], **kw)
        table["hx_nm"][sel], table["hy_nm"][sel] = hx, hy
