"""The simulated samples: particle populations, materials and imaging defaults.

Sizes follow the published samples of SCIENCE.md §3–4 (PS100 110 ± 9 nm, PS50 ~55 ± 5 nm,
Au10 10 ± 1.5 nm, silica capsules ~70 nm with a ~10 nm shell, Au rods 39 × 12 nm, cubes as
superellipses with p ≈ 5–20). Each sample's default record pixel puts its smallest
population's ECD at about 20 px, the size a microscopist would pick to measure it.

Contrast (per nm of projected thickness) is set per material:

* bright-field TEM: intensity ``exp(-Σ t_i / λ_i)`` (λ a contrast mean free path): gold
  λ = 12 nm (a 10 nm sphere removes ~55% at its centre), polystyrene λ = 600 nm (a 110 nm
  sphere removes ~17%, a 55 nm one ~9%: weak), silica λ = 350 nm.
* HAADF-STEM: counts ``dose·(film + Σ κ_i t_i)``, film 0.1, κ(Au) = 0.04 /nm (a 10 nm sphere
  is 5× the film), κ(PS) = 0.0012 /nm, κ(silica) = 0.002 /nm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Contrast per material: bright-field mean free path (nm) and HAADF signal per nm.
MATERIALS: dict[str, dict[str, float]] = {
    "au": {"bf_mfp_nm": 12.0, "haadf_per_nm": 0.04},
    "pd": {"bf_mfp_nm": 16.0, "haadf_per_nm": 0.03},
    "ps": {"bf_mfp_nm": 600.0, "haadf_per_nm": 0.0012},
    "silica": {"bf_mfp_nm": 350.0, "haadf_per_nm": 0.002},
}
MATERIAL_NAMES = tuple(MATERIALS)


@dataclass(frozen=True)
class Population:
    """One particle population of a sample.

    Attributes
    ----------
    shape : str
        ``"sphere"``, ``"capsule"``, ``"rod"`` or ``"cube"`` (see :mod:`.shapes`).
    material : str
        A key of :data:`MATERIALS`.
    size_nm, size_sd_nm : float
        Diameter (sphere, capsule), length (rod) or edge (cube): mean and standard deviation.
    width_nm, width_sd_nm : float
        Rod width; ignored for other shapes.
    shell_nm, shell_sd_nm : float
        Capsule shell thickness; ignored for other shapes.
    p_range : tuple of float
        Superellipse corner sharpness range for cubes (drawn uniformly).
    fraction : float
        Number fraction of this population in the sample.
    """

    shape: str
    material: str
    size_nm: float
    size_sd_nm: float
    width_nm: float = 0.0
    width_sd_nm: float = 0.0
    shell_nm: float = 0.0
    shell_sd_nm: float = 0.0
    p_range: tuple[float, float] = (2.0, 2.0)
    fraction: float = 1.0


@dataclass(frozen=True)
class SampleSpec:
    """A simulated sample: its populations and how it is usually imaged.

    Attributes
    ----------
    name, description : str
    populations : tuple of Population
        Population ``i`` has the integer id ``i`` in the ground truth.
    pixel_nm : float
        Default record pixel size.
    detector : str
        ``"bf"`` (bright-field TEM) or ``"haadf"`` (HAADF-STEM).
    dose : dict
        Default electrons per pixel for each detector.
    coverage : float
        Mean fraction of the film area covered by particles where the grid holds any.
    agglomeration : float
        Typical fraction of particles in agglomerates (touching or overlapping groups); it
        grows with the local density.
    cluster_size : float
        Mean number of particles in an agglomerate.
    """

    name: str
    description: str
    populations: tuple[Population, ...]
    pixel_nm: float
    detector: str
    dose: dict = field(default_factory=lambda: {"bf": 400.0, "haadf": 200.0})
    coverage: float = 0.08
    agglomeration: float = 0.3
    cluster_size: float = 5.0

    @property
    def empty(self) -> bool:
        """True when the sample holds no particles at all."""
        return not self.populations


_PS_DOSE = {"bf": 800.0, "haadf": 400.0}
_PS100 = Population("sphere", "ps", 110.0, 9.0)
_PS50 = Population("sphere", "ps", 55.0, 5.0)
_AU_ROD = Population("rod", "au", 39.0, 3.5, width_nm=12.0, width_sd_nm=1.2)

SAMPLES: dict[str, SampleSpec] = {s.name: s for s in (
    SampleSpec("au10", "gold spheres 10 ± 1.5 nm, high contrast",
               (Population("sphere", "au", 10.0, 1.5),), pixel_nm=0.5, detector="haadf"),
    SampleSpec("ps100", "polystyrene spheres 110 ± 9 nm, weak contrast",
               (_PS100,), pixel_nm=4.0, detector="bf", dose=_PS_DOSE),
    SampleSpec("ps50", "polystyrene spheres 55 ± 5 nm, weak contrast",
               (_PS50,), pixel_nm=2.5, detector="bf", dose=_PS_DOSE),
    SampleSpec("ps-bimodal", "PS50 + PS100 mixture (~50/50 by number), weak contrast, "
               "many touching and overlapping",
               (Population("sphere", "ps", 55.0, 5.0, fraction=0.5),
                Population("sphere", "ps", 110.0, 9.0, fraction=0.5)),
               pixel_nm=2.5, detector="bf", dose=_PS_DOSE, coverage=0.10,
               agglomeration=0.45, cluster_size=6.0),
    SampleSpec("silica-capsules", "hollow silica shells ~70 nm, shell ~10 nm (rings)",
               (Population("capsule", "silica", 70.0, 7.0, shell_nm=10.0, shell_sd_nm=1.5),),
               pixel_nm=2.5, detector="bf"),
    SampleSpec("au-rods", "gold nanorods ~39 × 12 nm",
               (_AU_ROD,), pixel_nm=0.8, detector="haadf"),
    SampleSpec("cubes", "Pd nanocubes, edge 18 ± 1.8 nm, superellipse projections p 5–20",
               (Population("cube", "pd", 18.0, 1.8, p_range=(5.0, 20.0)),),
               pixel_nm=1.0, detector="haadf"),
    SampleSpec("spheres-rods", "gold spheres ~24 nm and 39 × 12 nm rods of similar ECD",
               (Population("sphere", "au", 24.0, 2.0, fraction=0.5),
                Population("rod", "au", 39.0, 3.5, width_nm=12.0, width_sd_nm=1.2,
                           fraction=0.5)),
               pixel_nm=0.8, detector="haadf"),
    SampleSpec("empty", "a bare support film, no particles", (), pixel_nm=1.0,
               detector="bf"),
)}


def get_sample(sample: str | SampleSpec) -> SampleSpec:
    """Return the :class:`SampleSpec` named ``sample`` (a spec is passed through).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    if isinstance(sample, SampleSpec):
        return sample
    try:
        return SAMPLES[sample]
    except KeyError:
        raise ValueError(f"unknown sample {sample!r}; known: {', '.join(SAMPLES)}") from None
