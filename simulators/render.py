"""Rendering a frame: projected thickness, blur, film, illumination and shot noise.

Pixel convention: pixel ``(row, col)`` covers ``[col − ½, col + ½] × [row − ½, row + ½]`` in
frame coordinates, so a particle centred at ``x_px = 10.0`` covers column 10 symmetrically
(the convention of ``skimage.measure.regionprops`` centroids). Stage x grows with the column,
stage y with the row, and the frame's centre is the stage position.

Particles are rendered in local patches (only each particle's bounding box), vectorised over
particles of one shape and similar size, with ``supersample²`` samples per pixel averaged, so
edges are anti-aliased and the rendered area matches the exact area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as _fft
from scipy import ndimage as ndi

from . import shapes

_PATCH_LADDER = np.array([3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80,
                          96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768,
                          1024, 1280, 1536, 2048, 4096])
_SAMPLES_PER_CHUNK = 3_000_000  # sub-samples evaluated at once: bounds the memory in use
_POISSON_EXACT_BELOW = 10.0  # counts under this get exact Poisson draws


@dataclass(frozen=True)
class FrameGeometry:
    """Where a frame lies on the specimen.

    Attributes
    ----------
    center_x_nm, center_y_nm : float
        Stage position of the frame's centre.
    pixel_nm : float
    height, width : int
        Frame shape in pixels.
    """

    center_x_nm: float
    center_y_nm: float
    pixel_nm: float
    height: int
    width: int

    def to_px(self, x_nm, y_nm):
        """Frame coordinates ``(x_px, y_px)`` (column, row) of stage points in nm."""
        x = (np.asarray(x_nm) - self.center_x_nm) / self.pixel_nm + (self.width - 1) / 2.0
        y = (np.asarray(y_nm) - self.center_y_nm) / self.pixel_nm + (self.height - 1) / 2.0
        return x, y

    def bounds_nm(self) -> tuple[float, float, float, float]:
        """The stage rectangle ``(x0, y0, x1, y1)`` (nm) the frame covers."""
        hw = self.width * self.pixel_nm / 2.0
        hh = self.height * self.pixel_nm / 2.0
        return (self.center_x_nm - hw, self.center_y_nm - hh,
                self.center_x_nm + hw, self.center_y_nm + hh)


def _patch_groups(table, geom):
    """Yield ``(code, patch_px, indices)``: particles of one shape and patch size."""
    if not len(table["x_nm"]):
        return
    half = np.maximum(table["hx_nm"], table["hy_nm"]) / geom.pixel_nm
    need = np.ceil(2.0 * half).astype(np.int64) + 2
    rung = np.searchsorted(_PATCH_LADDER, need)
    patch = np.where(rung < len(_PATCH_LADDER), _PATCH_LADDER[np.minimum(
        rung, len(_PATCH_LADDER) - 1)], need)
    keys = table["shape"] * 100_000 + patch
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        yield int(key // 100_000), int(key % 100_000), idx


def project(table, geom: FrameGeometry, *, weights=None, supersample: int = 3,
            quantity: str = "thickness") -> np.ndarray:
    """Sum over particles of ``weight × (mean thickness or coverage)`` in each pixel.

    Parameters
    ----------
    table : dict of ndarray
        Particle table (see :mod:`.specimen`).
    geom : FrameGeometry
    weights : ndarray, optional
        One factor per particle (e.g. 1 / mean free path); 1 by default.
    supersample : int
        Samples per pixel along each axis.
    quantity : {"thickness", "coverage"}
        Projected thickness in nm, or the fraction of the pixel inside the outline.

    Returns
    -------
    ndarray, float32, shape (height, width)
    """
    if quantity not in ("thickness", "coverage"):
        raise ValueError(f"quantity must be 'thickness' or 'coverage', got {quantity!r}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    h, w = geom.height, geom.width
    n = len(table["x_nm"])
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    pieces_index, pieces_value = [], []
    x_px, y_px = geom.to_px(table["x_nm"], table["y_nm"])
    s = int(supersample)
    for code, patch, idx in _patch_groups(table, geom):
        per = (patch * s) ** 2
        step = max(1, _SAMPLES_PER_CHUNK // per)
        off = ((np.arange(patch * s) + 0.5) / s - 0.5).astype(np.float32)
        for start in range(0, idx.size, step):
            sel = idx[start:start + step]
            index, value = _render_chunk(table, sel, code, patch, s, off, x_px, y_px,
                                         geom, weights, quantity)
            pieces_index.append(index)
            pieces_value.append(value)
    if not pieces_index:
        return np.zeros((h, w), dtype=np.float32)
    # one scatter-add for all patches: overlapping particles' thicknesses add up
    flat = np.bincount(np.concatenate(pieces_index), weights=np.concatenate(pieces_value),
                       minlength=h * w)
    return flat.reshape(h, w).astype(np.float32)


def _render_chunk(table, sel, code, patch, s, off, x_px, y_px, geom, weights, quantity):
    h, w, pix = geom.height, geom.width, geom.pixel_nm
    hx = table["hx_nm"][sel] / pix
    hy = table["hy_nm"][sel] / pix
    # first pixel of each patch: the one holding the left/top edge of the bounding box
    c0 = np.floor(x_px[sel] - hx + 0.5).astype(np.int64)
    r0 = np.floor(y_px[sel] - hy + 0.5).astype(np.int64)
    dx = ((c0 - x_px[sel]).astype(np.float32)[:, None] + off[None, :]) * np.float32(pix)
    dy = ((r0 - y_px[sel]).astype(np.float32)[:, None] + off[None, :]) * np.float32(pix)
    params = {k: table[col][sel].astype(np.float32)[:, None, None] for k, col in
              (("a", "a_nm"), ("b", "b_nm"), ("p", "p"), ("angle", "angle"))}
    if quantity == "thickness":
        params["shell"] = table["shell_nm"][sel].astype(np.float32)[:, None, None]
        val = shapes.thickness(code, dx[:, None, :], dy[:, :, None], **params)
    else:
        val = shapes.inside(code, dx[:, None, :], dy[:, :, None], **params).astype(np.float32)
    m = len(sel)
    val = val.reshape(m, patch, s, patch, s).mean(axis=(2, 4))
    val *= weights[sel].astype(np.float32)[:, None, None]
    rows = r0[:, None, None] + np.arange(patch)[None, :, None]
    cols = c0[:, None, None] + np.arange(patch)[None, None, :]
    ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w) & (val != 0)
    return (rows * w + cols)[ok], val[ok]


def blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with edge reflection; large kernels go through the FFT.

    Parameters
    ----------
    image : ndarray, float
    sigma_px : float
        Standard deviation in pixels; ``<= 0`` returns a copy.
    """
    image = np.asarray(image, dtype=np.float32)
    if sigma_px <= 0:
        return image.copy()
    if sigma_px < 4.0:
        return ndi.gaussian_filter(image, sigma_px, mode="reflect", truncate=3.5)
    # pad by reflection so the FFT's wrap-around does not bleed opposite edges together
    pad = int(min(np.ceil(3.5 * sigma_px), min(image.shape) - 1))
    padded = np.pad(image, pad, mode="reflect")
    spectrum = _fft.rfft2(padded, workers=-1)
    spectrum = ndi.fourier_gaussian(spectrum, sigma_px, n=padded.shape[1])
    out = _fft.irfft2(spectrum, s=padded.shape, workers=-1)
    return out[pad:pad + image.shape[0], pad:pad + image.shape[1]].astype(np.float32)


def coarse_noise(shape: tuple[int, int], *, rng: np.random.Generator,
                 correlation_px: float) -> tuple[np.ndarray, float]:
    """Zero-mean, unit-variance noise on a coarse grid of nodes ``correlation_px`` apart.

    Returns ``(nodes, step)`` for :func:`upsample`; node ``k`` sits at pixel ``(k − 1)·step``,
    so the grid covers the frame with a node to spare on every side. Smooth fields are built
    on the nodes and interpolated once, so their cost hardly depends on the frame size.
    """
    h, w = shape
    step = max(2.0, float(correlation_px))
    gh, gw = int(np.ceil((h - 1) / step)) + 3, int(np.ceil((w - 1) / step)) + 3
    nodes = ndi.gaussian_filter(rng.standard_normal((gh, gw)), 0.7, mode="wrap")
    nodes /= nodes.std() or 1.0
    return nodes, step


def node_coordinates(n_nodes: int, step: float) -> np.ndarray:
    """Pixel coordinates of the coarse nodes along one axis (see :func:`coarse_noise`)."""
    return (np.arange(n_nodes) - 1.0) * step


def upsample(nodes: np.ndarray, shape: tuple[int, int], step: float) -> np.ndarray:
    """Bilinear interpolation of coarse ``nodes`` (see :func:`coarse_noise`) to ``shape``."""
    h, w = shape
    nodes = np.asarray(nodes, dtype=np.float32)
    cols = np.arange(w) / step + 1.0
    c0 = cols.astype(np.int64)
    fc = (cols - c0).astype(np.float32)
    # columns first, on the few node rows; then rows, the only full-size pass
    across = nodes[:, c0] + (nodes[:, c0 + 1] - nodes[:, c0]) * fc
    rows = np.arange(h) / step + 1.0
    r0 = rows.astype(np.int64)
    fr = (rows - r0).astype(np.float32)[:, None]
    out = across[r0]
    out += np.diff(across, axis=0, append=across[-1:])[r0] * fr
    return out


def illumination(x_px, y_px, shape: tuple[int, int], *, gradient=(0.0, 0.0),
                 vignette: float = 0.0):
    """Relative beam intensity ``1 + gx·u + gy·v − vignette·(u² + v²)`` at pixel coordinates.

    ``u`` and ``v`` run from -1 to 1 across the frame of ``shape``; ``x_px`` and ``y_px``
    broadcast (pass node coordinates to build a coarse field).
    """
    h, w = shape
    u = 2.0 * np.asarray(x_px, dtype=float) / max(w - 1, 1) - 1.0
    v = 2.0 * np.asarray(y_px, dtype=float) / max(h - 1, 1) - 1.0
    return 1.0 + gradient[0] * u + gradient[1] * v - vignette * (u * u + v * v)


def shot_noise(mean: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Counts with Poisson statistics around ``mean``, as uint16.

    Pixels expecting fewer than 10 counts get exact Poisson draws. Above that a normal draw
    with Poisson's mean and variance and a Cornish–Fisher term for its skewness,
    ``λ + √λ·z + (z² − 1)/6``, rounded, matches the first three moments and is several times
    faster than ``Generator.poisson`` on a full frame.
    """
    mean = np.maximum(np.asarray(mean, dtype=np.float32), np.float32(0.0))
    z = rng.standard_normal(mean.shape, dtype=np.float32)
    # λ + √λ·z + (z² − 1)/6, in place: a few passes over the frame instead of a dozen
    spread = np.sqrt(mean)
    spread *= z
    z *= z
    z *= np.float32(1.0 / 6.0)
    z += spread
    z += mean
    z -= np.float32(1.0 / 6.0)
    low = mean < _POISSON_EXACT_BELOW
    if low.any():
        z[low] = rng.poisson(mean[low])
    np.rint(z, out=z)
    np.clip(z, 0, 65535, out=z)
    return z.astype(np.uint16)
