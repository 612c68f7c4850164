"""measure() on outlines its edge model cannot describe: never an exception, never a guess."""

import numpy as np
from scipy import ndimage as ndi

from particlewatch.analysis import measure as measure_module
from particlewatch.analysis.measure import measure


def _discs_frame(seed=0):
    """Dark discs (radius 12 px) on a bright background, Poisson noise, labelled exactly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:160, :160]
    labels = np.zeros((160, 160), int)
    for i, (y0, x0) in enumerate(((40, 40), (40, 120), (120, 40), (120, 120))):
        labels[np.hypot(yy - y0, xx - x0) < 12] = i + 1
    thick = ndi.gaussian_filter((labels > 0).astype(float), 1.0)
    return labels, rng.poisson(1000 * np.exp(-0.8 * thick)).astype(float)


def test_outline_reaching_past_its_centroid_is_left_unfitted(monkeypatch):
    # A region whose outline comes within half a pixel of its centroid, or passes beyond it
    # (seen on a strongly defocused bright-field frame, where Fresnel fringes cut a label
    # into a bent shape), has a polar outline r(θ) that dips to or below zero. The edge
    # model's half-width is that minimum: its logarithm was NaN and measure() raised
    # IndexError, failing the whole frame.
    labels, image = _discs_frame()
    plain = measure(labels, image, 1.0)
    real = measure_module._denoise_radius

    def dipping(r):
        out = real(r)
        out[:, 0] = -0.2  # one ray of every outline reaches past the centroid
        return out

    monkeypatch.setattr(measure_module, "_denoise_radius", dipping)
    table = measure(labels, image, 1.0)
    assert len(table["ecd_nm"]) == 4
    # the area comes from the label's pixels, not from a fitted outline
    assert np.all(np.isfinite(table["ecd_nm"]))
    assert np.allclose(table["ecd_nm"], 2 * np.sqrt(np.bincount(labels.ravel())[1:] / np.pi),
                       rtol=0.02)
    assert np.all(np.abs(plain["ecd_nm"] - 24.0) < 0.6)
