"""measure() places each outline on the particle's own edge, whatever the label's edge.

Frames are rendered here from the projected thickness of known bodies (spheres, flat discs,
hollow shells), blurred by a Gaussian the measurement is not told, through a linear
(dark-field) or an absorbing (bright-field) detector, with Poisson noise; the labels handed
to measure() are discs 1 px too small or too large. The truth is the rendered body's size.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from particlewatch.analysis.measure import measure

_SUB = 5  # sub-samples per pixel along each axis when rendering thickness


def _thickness(shape, centres, radii, kind):
    """Projected thickness (px) of bodies at ``centres`` (row, col), averaged over each pixel.

    kind: "sphere" (2·sqrt(R² − ρ²)), "flat" (a disc of constant thickness R) or "shell"
    (a sphere minus a concentric one of 0.75 R: a hollow capsule).
    """
    h, w = shape
    off = (np.arange(_SUB) + 0.5) / _SUB - 0.5
    yy = (np.arange(h)[:, None] + off[None, :]).ravel()
    xx = (np.arange(w)[:, None] + off[None, :]).ravel()
    t = np.zeros((h * _SUB, w * _SUB))
    for (cy, cx), r in zip(centres, radii):
        rho2 = (yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2
        if kind == "flat":
            t += np.where(rho2 <= r * r, r, 0.0)
        else:
            t += 2 * np.sqrt(np.clip(r * r - rho2, 0, None))
            if kind == "shell":
                t -= 2 * np.sqrt(np.clip((0.75 * r) ** 2 - rho2, 0, None))
    return t.reshape(h, _SUB, w, _SUB).mean(axis=(1, 3))


def _frame(kind, detector, *, label_offset, blur=0.8, seed=0, dose=1.0, noise_corr_px=0.0):
    """(image, labels, true radii): four bodies of radius 8-14 px in a 160² frame
    (``dose`` scales the counts; ``noise_corr_px``: Gaussian noise of the same variance,
    correlated over that many pixels, instead of Poisson noise)."""
    rng = np.random.default_rng(seed)
    centres = [(40.3, 42.6), (41.7, 118.2), (117.4, 39.1), (119.9, 121.5)]
    radii = [8.2, 10.7, 12.4, 14.1]
    t = _thickness((160, 160), centres, radii, kind)
    if detector == "haadf":
        expected = 200.0 + ndi.gaussian_filter(6.0 * t, blur)
    else:  # an absorbing particle: its shadow 1 − exp(−t / λ) is what the optics blurs
        expected = 800.0 * (1 - ndi.gaussian_filter(-np.expm1(-t / 12.0), blur))
    if noise_corr_px:
        noise = ndi.gaussian_filter(rng.normal(size=expected.shape), noise_corr_px)
        image = (dose * expected + np.sqrt(dose * expected) * noise / noise.std())
        image = image.astype(np.float32)
    else:
        image = rng.poisson(dose * expected).astype(np.float32)
    yy, xx = np.indices(image.shape)
    labels = np.zeros(image.shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r + label_offset) ** 2] = k
    return image, labels, np.array(radii)


@pytest.mark.parametrize("kind,detector", [("sphere", "haadf"), ("sphere", "bf"),
                                           ("flat", "haadf"), ("flat", "bf")])
@pytest.mark.parametrize("label_offset", [-1.0, 1.0])
def test_outline_sits_on_the_bodys_own_edge(kind, detector, label_offset):
    # labels 1 px off the edge measured as they were gave an ECD 2/D (14-24%) off
    image, labels, radii = _frame(kind, detector, label_offset=label_offset)
    t = measure(labels, image, 1.0)
    err = t["ecd_nm"] / (2 * radii) - 1
    assert np.all(np.abs(err) < 0.02), err
    assert abs(np.median(err)) < 0.01, err


@pytest.mark.parametrize("blur", [0.5, 1.5])
def test_edge_follows_the_frames_blur(blur):
    # the blur is the frame's, not a constant: a sphere's edge lies lower on a blurred profile
    # (at 4× the dose: a small sphere's edge fitted on a 1.5 px blur is otherwise not certain
    # enough to be kept, and its outline stays where the labels put it)
    image, labels, radii = _frame("sphere", "haadf", label_offset=-0.7, blur=blur, seed=1,
                                  dose=4.0)
    err = measure(labels, image, 1.0)["ecd_nm"] / (2 * radii) - 1
    assert np.all(np.abs(err) < 0.02), err
    assert abs(np.median(err)) < 0.01, err


def test_hollow_shells_are_not_fitted_as_solid_bodies():
    # a shell's contrast falls towards its hole: a solid body's edge profile does not fit it,
    # so its outline stays where the labels put it (here on the true edge)
    image, labels, radii = _frame("shell", "haadf", label_offset=0.0, seed=2)
    err = measure(labels, image, 1.0)["ecd_nm"] / (2 * radii) - 1
    assert np.all(np.abs(err) < 0.02), err


def test_correlated_noise_does_not_move_a_right_outline():
    # A detector's noise correlated over a pixel (scan lines, a camera's point spread) moves
    # the pooled edge profiles together; taken for white noise it passed the fit's error
    # gate and moved outlines that were right by up to 11% (HAADF, 1/4 dose).
    errors = []
    for seed in range(4):
        image, labels, radii = _frame("sphere", "haadf", label_offset=0.0, seed=seed,
                                      dose=0.25, noise_corr_px=1.0)
        ecd = measure(labels, image, 1.0)["ecd_nm"][:4]
        errors.append(ecd / (2 * radii) - 1)
    assert np.abs(errors).max() < 0.02, np.round(errors, 3)


@pytest.mark.parametrize("kind,label_offset", [("sphere", -1.0), ("sphere", 1.0),
                                               ("flat", 1.0)])
def test_faint_edges_are_fitted_as_far_as_their_noise_allows(kind, label_offset):
    # At a quarter of the dose a small body's edge is fitted to ±0.15-0.3 px. Kept only
    # within ±0.15 px, labels 1 px off stayed where they were: 3-7 of these 16 particles
    # 8-12% off. Kept and shrunk by their uncertainty, a loose fit moves the outline by
    # what it can tell.
    errors = []
    for seed in range(4):
        image, labels, radii = _frame(kind, "haadf", label_offset=label_offset, seed=seed,
                                      dose=0.25)
        errors.append(measure(labels, image, 1.0)["ecd_nm"][:4] / (2 * radii) - 1)
    errors = np.abs(errors)
    assert (errors > 0.05).sum() <= 1, np.round(errors, 3)
    assert np.median(errors) < 0.015, np.round(errors, 3)


def test_faint_hollow_shells_are_not_fitted_as_solid_bodies():
    # at a tenth of the dose a shell's hole is no longer certain (3 standard errors), and
    # its loose fit as a solid body drew outlines 2-8% inwards: a loose fit is dropped on
    # a hint of a hole
    errors = []
    for seed in range(4):
        image, labels, radii = _frame("shell", "haadf", label_offset=0.0, seed=seed,
                                      dose=0.1)
        errors.append(measure(labels, image, 1.0)["ecd_nm"][:4] / (2 * radii) - 1)
    assert np.abs(errors).max() < 0.04, np.round(errors, 3)
