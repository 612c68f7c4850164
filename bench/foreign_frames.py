"""Accuracy on frames from an image model that is not particlewatch's simulator.

particlewatch is accepted on real micrographs and on frames from an independent simulator, with
default settings. Its own simulator (``simulators/``) and its edge fit (``analysis/measure.py``)
share assumptions: how a particle's projected thickness turns into grey levels, the blur, the
noise. Scores on those frames alone can hide a method that only fits its own model. This bench
renders frames another way, closer to how the microscope forms them, and scores the whole
per-frame analysis (``analyze_image``, default settings) on isolated particles against the
geometric truth it placed:

- **Bright-field TEM** as a wave: the exit wave ``exp(-t/2Λ) · exp(iσV t)`` of the particles'
  and the carbon film's projected thickness ``t`` (mass-thickness amplitude with mean free path
  ``Λ``; mean inner potential ``V``), Fresnel-propagated to the frame's defocus through an
  objective aperture, so weak particles carry Fresnel fringes and lensing and the film's
  thickness texture shows as phase speckle. Rendered at twice the pixel density and binned
  (the detector integrates each pixel), blurred by a scintillator point spread with a long
  tail, shaded by uneven illumination and a fixed gain pattern, Poisson counted at the dose.
- **HAADF-STEM**: signal grows with thickness and saturates (``1 - exp(-t/τ)``, Z-contrast
  per material), the probe has a Lorentzian tail around its Gaussian core, rows carry scan
  noise (gain and offset per line), Poisson counts plus read noise.

Shapes: spheres, hollow shells, spherocylinder rods, cubes lying on a face at any in-plane
angle; sizes log-normal; positions random with a gap of at least 4 px, so every whole
particle is isolated. Pixel sizes, doses and materials differ from the simulator's samples.

Printed per case: isolated particles, recall (a measured centroid within 0.35 ECD of the truth
centre), precision (measured centroids inside no truth particle), median ECD bias and median
|ECD error|, and for rods the length (Feret max) and width (Feret min) errors. The goals are
issue 4's: recall and precision ≥ 0.98, median |ECD error| ≤ 2%, bias within ±1.5%, rods ≤ 3%.

Run ``python bench/foreign_frames.py [--cases gold-bf,ps-bf] [--frames 2] [--size 1024]
[--dose 1.0] [--defocus UM] [--seed 1] [--png DIR]`` (``--png`` writes each frame's first case as an image
with the measured outlines, to look at what the model draws).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from particlewatch.analysis.pipeline import analyze_image

# 200 kV electrons
WAVELENGTH_NM = 0.002508
SIGMA_RAD_PER_V_NM = 0.00729


@dataclass(frozen=True)
class Material:
    """How a material forms contrast: BF mean free path ``mfp_nm`` (with the objective
    aperture), mean inner potential ``inner_v``, HAADF signal per nm ``haadf_per_nm`` (relative)
    and its saturation thickness ``haadf_tau_nm``."""
    mfp_nm: float
    inner_v: float
    haadf_per_nm: float
    haadf_tau_nm: float


GOLD = Material(mfp_nm=22.0, inner_v=30.0, haadf_per_nm=1.0, haadf_tau_nm=60.0)
POLYSTYRENE = Material(mfp_nm=380.0, inner_v=8.0, haadf_per_nm=0.035, haadf_tau_nm=2000.0)
SILICA = Material(mfp_nm=170.0, inner_v=12.0, haadf_per_nm=0.08, haadf_tau_nm=1500.0)
IRON_OXIDE = Material(mfp_nm=70.0, inner_v=20.0, haadf_per_nm=0.3, haadf_tau_nm=300.0)
CARBON = Material(mfp_nm=260.0, inner_v=10.0, haadf_per_nm=0.02, haadf_tau_nm=3000.0)


@dataclass(frozen=True)
class Case:
    """One kind of frame: shape and size distribution, material, optics and dose."""
    shape: str              # sphere | shell | rod | cube
    size_nm: float          # diameter, outer diameter, rod length or cube edge
    cv: float
    material: Material
    pixel_nm: float
    detector: str           # bf | haadf
    dose: float             # electrons per pixel (BF) or counts per nm of gold (HAADF)
    defocus_um: float = -0.5
    convergence_mrad: float = 0.25  # illumination semi-angle (BF): damps fringes far from focus
    width_nm: float = 0.0   # rod width
    shell_nm: float = 0.0   # shell thickness
    coverage: float = 0.12  # projected area fraction


CASES = {
    "gold-bf": Case("sphere", 12.0, 0.10, GOLD, 0.35, "bf", 300.0, defocus_um=-0.3),
    "gold-haadf": Case("sphere", 12.0, 0.10, GOLD, 0.35, "haadf", 4.0),
    "ps-bf": Case("sphere", 90.0, 0.05, POLYSTYRENE, 1.1, "bf", 150.0, defocus_um=-1.0),
    "ps-haadf": Case("sphere", 90.0, 0.05, POLYSTYRENE, 1.1, "haadf", 4.0),
    "shell-bf": Case("shell", 70.0, 0.06, SILICA, 0.7, "bf", 200.0, defocus_um=-0.8,
                     shell_nm=9.0),
    "rods-bf": Case("rod", 42.0, 0.10, GOLD, 0.45, "bf", 300.0, defocus_um=-0.3,
                    width_nm=13.0),
    "rods-haadf": Case("rod", 42.0, 0.10, GOLD, 0.45, "haadf", 4.0, width_nm=13.0),
    "cubes-bf": Case("cube", 45.0, 0.06, IRON_OXIDE, 0.75, "bf", 250.0, defocus_um=-0.5),
}


@dataclass
class Particle:
    x_px: float
    y_px: float
    size_nm: float
    width_nm: float
    angle: float
    ecd_nm: float
    feret_max_nm: float
    feret_min_nm: float
    reach_px: float         # radius of the disc that holds it
    touches_edge: bool = False


def _truth_particle(case, rng, x, y, pixel_nm):
    """Draw one particle's size and angle and compute its geometric truth."""
    size = case.size_nm * np.exp(rng.normal(0.0, case.cv))
    width = case.width_nm * np.exp(rng.normal(0.0, case.cv * 0.8)) if case.shape == "rod" \
        else size
    angle = rng.uniform(0.0, np.pi)
    if case.shape == "cube":
        ecd, fmax, fmin, reach = 2 * size / np.sqrt(np.pi), size * np.sqrt(2), size, \
            size / np.sqrt(2)
    elif case.shape == "rod":
        width = min(width, 0.8 * size)
        area = (size - width) * width + np.pi * width ** 2 / 4
        ecd, fmax, fmin, reach = 2 * np.sqrt(area / np.pi), size, width, size / 2
    else:
        ecd, fmax, fmin, reach = size, size, size, size / 2
    return Particle(x, y, size, width, angle, ecd, fmax, fmin, reach / pixel_nm)


def place_particles(case, rng, size_px, *, gap_px=4.0, tries=20000):
    """Random sequential placement with at least ``gap_px`` between discs holding particles."""
    target = case.coverage * size_px ** 2
    out, covered = [], 0.0
    for _ in range(tries):
        if covered >= target:
            break
        x, y = rng.uniform(-10, size_px + 10, 2)
        p = _truth_particle(case, rng, x, y, case.pixel_nm)
        if any(np.hypot(p.x_px - q.x_px, p.y_px - q.y_px) < p.reach_px + q.reach_px + gap_px
               for q in out):
            continue
        p.touches_edge = (min(x, y) - p.reach_px < 1 or max(x, y) + p.reach_px > size_px - 2)
        out.append(p)
        covered += np.pi * (p.ecd_nm / 2 / case.pixel_nm) ** 2
    return out


def thickness_map(case, particles, shape, sub):
    """Projected thickness (nm) of the particles on a grid ``sub`` times finer than the
    frame's pixels (pixel centres of the frame at integer coordinates)."""
    n = shape[0] * sub
    t = np.zeros((n, n), np.float64)
    fine_nm = case.pixel_nm / sub
    for p in particles:
        # fine-grid coordinates of the frame position (x, y): x*sub + (sub-1)/2
        cx, cy = p.x_px * sub + (sub - 1) / 2, p.y_px * sub + (sub - 1) / 2
        reach = p.reach_px * sub + 2
        r0, r1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, n)
        c0, c1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, n)
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        dy, dx = (yy - cy) * fine_nm, (xx - cx) * fine_nm
        if case.shape in ("sphere", "shell"):
            rad = p.size_nm / 2
            rr = dy * dy + dx * dx
            tt = 2 * np.sqrt(np.clip(rad * rad - rr, 0, None))
            if case.shape == "shell":
                inner = rad - case.shell_nm
                tt -= 2 * np.sqrt(np.clip(inner * inner - rr, 0, None))
        elif case.shape == "rod":
            ca, sa = np.cos(p.angle), np.sin(p.angle)
            along, across = dx * ca + dy * sa, -dx * sa + dy * ca
            half = (p.size_nm - p.width_nm) / 2
            d2 = across ** 2 + np.clip(np.abs(along) - half, 0, None) ** 2
            tt = 2 * np.sqrt(np.clip((p.width_nm / 2) ** 2 - d2, 0, None))
        else:  # cube on a face: flat top, edges one fine pixel soft
            ca, sa = np.cos(p.angle), np.sin(p.angle)
            u, v = np.abs(dx * ca + dy * sa), np.abs(-dx * sa + dy * ca)
            inside = np.clip((p.size_nm / 2 - np.maximum(u, v)) / fine_nm + 0.5, 0, 1)
            tt = p.size_nm * inside
        t[r0:r1, c0:c1] += tt
    return t


def film_thickness(rng, n, fine_nm, *, mean_nm=12.0, sd_nm=1.5):
    """Amorphous carbon film: mean thickness plus a rough (1/f) thickness texture."""
    white = rng.normal(size=(n, n))
    k = np.hypot(*np.meshgrid(sfft.fftfreq(n), sfft.fftfreq(n), indexing="ij")) / fine_nm
    # texture correlated over ~0.5-20 nm: grain of the film
    spectrum = 1.0 / np.sqrt(k * k + 0.05 ** 2) * np.exp(-(k * 0.6) ** 2)
    tex = np.real(sfft.ifft2(sfft.fft2(white) * spectrum))
    tex *= sd_nm / tex.std()
    return np.clip(mean_nm + tex, 0.5, None)


def _bin(a, sub):
    n = a.shape[0] // sub
    return a.reshape(n, sub, n, sub).mean(axis=(1, 3))


def _long_tail_blur(img, core_px, tail_px, tail_frac):
    """Gaussian core plus a Lorentzian-like tail (a fraction of the signal spread wide)."""
    n = img.shape[0]
    ky, kx = np.meshgrid(sfft.fftfreq(n), sfft.fftfreq(n), indexing="ij")
    k = np.hypot(ky, kx)
    otf = (1 - tail_frac) * np.exp(-2 * (np.pi * core_px * k) ** 2) + \
        tail_frac * np.exp(-2 * np.pi * tail_px * k)
    return np.real(sfft.ifft2(sfft.fft2(img) * otf))


def render(case, particles, size_px, rng, *, dose_factor=1.0, sub=2, pad_px=32):
    """The frame (float32 counts) of ``particles``.

    The wave is propagated on a grid ``pad_px`` wider on every side (more film, and the
    particles standing outside the frame), so the Fourier transform's wrap-around does not
    put one edge's fringes on the other.
    """
    big = size_px + 2 * pad_px
    n = big * sub
    fine_nm = case.pixel_nm / sub
    moved = [dataclasses.replace(p, x_px=p.x_px + pad_px, y_px=p.y_px + pad_px)
             for p in particles]
    t = thickness_map(case, moved, (big, big), sub)
    film = film_thickness(rng, n, fine_nm)
    yy, xx = np.mgrid[:size_px, :size_px] / size_px
    illum = 1.0 + 0.12 * (xx - 0.5) + 0.08 * (yy - 0.5) - 0.1 * ((xx - .4) ** 2 + (yy - .6) ** 2)
    gain = 1.0 + 0.01 * rng.normal(size=(size_px, size_px))
    inside = (slice(pad_px, pad_px + size_px),) * 2
    m = case.material
    if case.detector == "bf":
        amp = -t / (2 * m.mfp_nm) - film / (2 * CARBON.mfp_nm)
        phase = SIGMA_RAD_PER_V_NM * (m.inner_v * t + CARBON.inner_v * film)
        wave = np.exp(amp + 1j * phase)
        ky, kx = np.meshgrid(sfft.fftfreq(n, fine_nm), sfft.fftfreq(n, fine_nm),
                             indexing="ij")
        k2 = ky * ky + kx * kx
        defocus_nm = case.defocus_um * 1e3
        # Fresnel propagation to the defocus through a 20 mrad objective aperture; the
        # illumination's convergence damps fine fringes (quasi-coherent envelope)
        k_max = 0.020 / WAVELENGTH_NM
        prop = np.exp(-1j * np.pi * WAVELENGTH_NM * defocus_nm * k2
                      - (np.pi * case.convergence_mrad * 1e-3 * defocus_nm) ** 2 * k2)
        prop[k2 > k_max ** 2] = 0
        intensity = np.abs(sfft.ifft2(sfft.fft2(wave) * prop)) ** 2
        signal = _bin(intensity, sub)
        signal = _long_tail_blur(signal, 0.6, 6.0, 0.08)[inside]
        mean = case.dose * dose_factor * illum * gain * np.clip(signal, 0, None)
        counts = rng.poisson(mean).astype(np.float64)
        frame = counts + rng.normal(0, 1.5, counts.shape) + 100.0
    else:
        sig = m.haadf_per_nm * m.haadf_tau_nm * (1 - np.exp(-t / m.haadf_tau_nm))
        sig += CARBON.haadf_per_nm * film
        probe = _long_tail_blur(sig, 0.7 * sub, 5.0 * sub, 0.12)
        signal = _bin(probe, sub)[inside]
        mean = case.dose * dose_factor * illum * gain * np.clip(signal, 0, None)
        counts = rng.poisson(mean).astype(np.float64)
        row_gain = 1 + 0.01 * rng.normal(size=(size_px, 1))
        row_off = 0.3 * rng.normal(size=(size_px, 1))
        frame = counts * row_gain + row_off + rng.normal(0, 1.0, counts.shape) + 20.0
    return frame.astype(np.float32)


def score(case, particles, table):
    """Recall, precision and errors of a measured table against the placed particles."""
    xy = np.column_stack([table["x_px"], table["y_px"]]) if len(table["x_px"]) else \
        np.zeros((0, 2))
    out = {"n": 0, "missed": 0, "ecd": [], "length": [], "width": []}
    for p in particles:
        if p.touches_edge:
            continue
        out["n"] += 1
        d = np.hypot(xy[:, 0] - p.x_px, xy[:, 1] - p.y_px) if len(xy) else np.array([])
        if d.size == 0 or d.min() > 0.35 * p.ecd_nm / case.pixel_nm:
            out["missed"] += 1
            continue
        k = int(np.argmin(d))
        out["ecd"].append(table["ecd_nm"][k] / p.ecd_nm - 1)
        out["length"].append(table["feret_max_nm"][k] / p.feret_max_nm - 1)
        out["width"].append(table["feret_min_nm"][k] / p.feret_min_nm - 1)
    if len(xy) and particles:
        txy = np.array([[p.x_px, p.y_px] for p in particles])
        rad = np.array([p.reach_px + 1.0 for p in particles])
        d = np.hypot(xy[:, None, 0] - txy[None, :, 0], xy[:, None, 1] - txy[None, :, 1])
        out["false"] = int((~(d <= rad[None, :]).any(axis=1)).sum())
    else:
        out["false"] = len(xy)
    out["detected"] = len(xy)
    return out


def _save_png(path, frame, labels):
    from skimage.segmentation import find_boundaries
    from PIL import Image
    lo, hi = np.percentile(frame, [0.5, 99.5])
    grey = np.clip((frame - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb[find_boundaries(labels, mode="inner")] = (255, 40, 40)
    Image.fromarray(rgb).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dose", type=float, default=1.0, help="factor on each case's dose")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--defocus", type=float, default=None,
                    help="defocus in µm for every bright-field case (default: each case's own)")
    ap.add_argument("--png", default=None, help="folder for frames with measured outlines")
    args = ap.parse_args(argv)
    print(f"{'case':12s} {'n':>5s} {'recall':>7s} {'precis':>7s} {'bias%':>7s} {'|err|%':>7s} "
          f"{'len%':>6s} {'wid%':>6s} {'s/frame':>8s}")
    for name in args.cases.split(","):
        case = CASES[name]
        if args.defocus is not None:
            case = dataclasses.replace(case, defocus_um=args.defocus)
        pooled = {"n": 0, "missed": 0, "false": 0, "detected": 0, "ecd": [], "length": [],
                  "width": []}
        seconds = 0.0
        for i in range(args.frames):
            rng = np.random.default_rng([args.seed, i, sorted(CASES).index(name)])
            particles = place_particles(case, rng, args.size)
            frame = render(case, particles, args.size, rng, dose_factor=args.dose)
            t0 = time.perf_counter()
            table, labels, _ = analyze_image(frame, case.pixel_nm)
            seconds += time.perf_counter() - t0
            s = score(case, particles, table)
            for k in pooled:
                pooled[k] = pooled[k] + s[k]
            if args.png and i == 0:
                from pathlib import Path
                Path(args.png).mkdir(parents=True, exist_ok=True)
                _save_png(Path(args.png) / f"{name}.png", frame, labels)
        n = pooled["n"]
        recall = 1 - pooled["missed"] / max(n, 1)
        precision = 1 - pooled["false"] / max(pooled["detected"], 1)
        e = np.array(pooled["ecd"]) * 100
        row = (f"{name:12s} {n:5d} {recall:7.3f} {precision:7.3f} "
               f"{np.median(e) if e.size else np.nan:7.2f} "
               f"{np.median(np.abs(e)) if e.size else np.nan:7.2f}")
        if case.shape == "rod" and e.size:
            row += (f" {np.median(np.abs(pooled['length'])) * 100:6.2f}"
                    f" {np.median(np.abs(pooled['width'])) * 100:6.2f}")
        else:
            row += f" {'':6s} {'':6s}"
        print(row + f" {seconds / args.frames:8.2f}", flush=True)


if __name__ == "__main__":
    main()
