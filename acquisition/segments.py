"""Segment check: which record-sized parts of a survey image hold particles.

A survey image is divided into segments the size of the record field; thresholding against
the noise plus peak finding decides whether a segment holds particles, so empty segments are
never recorded (the autoSTEM scheme, with a noise-based instead of a 0.6 × max threshold so
that an empty survey finds nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One record-sized segment of a survey image.

    ``row0:row1, col0:col1`` are its pixel bounds in the survey image; ``dx_um, dy_um`` the
    offset of its centre from the image centre in µm (x along columns, y along rows);
    ``particles`` the number of intensity peaks found in it.
    """

    row: int
    col: int
    row0: int
    row1: int
    col0: int
    col1: int
    dx_um: float
    dy_um: float
    particles: int

    @property
    def has_particles(self) -> bool:
        return self.particles > 0


def segment_grid(shape: tuple[int, int], pixel_nm: float, *, segment_um: tuple[float, float],
                 overlap: float = 0.1) -> list[tuple[int, int, int, int, int, int]]:
    """Pixel bounds of record-sized segments tiling a survey image, centred on it.

    Segments overlap by ``overlap`` (a fraction of the segment) so that a particle on a
    boundary is whole in at least one of them.

    Returns
    -------
    list of (row, col, row0, row1, col0, col1)
        In serpentine order (even rows left to right, odd rows right to left).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    rows, cols = shape
    out = []
    per_axis = []
    for n_px, seg_um in ((rows, segment_um[1]), (cols, segment_um[0])):
        seg_px = seg_um * 1000.0 / pixel_nm
        if seg_px > n_px:  # the record field is larger than the survey: one segment
            per_axis.append([(0, n_px)])
            continue
        step_px = seg_px * (1 - overlap)
        n = int(math.floor((n_px - seg_px) / step_px + 1e-9)) + 1
        first = (n_px - seg_px - (n - 1) * step_px) / 2
        per_axis.append([(int(round(first + i * step_px)),
                          int(round(first + i * step_px + seg_px))) for i in range(n)])
    for r, (r0, r1) in enumerate(per_axis[0]):
        col_range = range(len(per_axis[1])) if r % 2 == 0 else range(len(per_axis[1]) - 1, -1, -1)
        for c in col_range:
            c0, c1 = per_axis[1][c]
            out.append((r, c, r0, r1, c0, c1))
    return out


#: Extra factor on the noise tail for bright particles (right-skewed counts).
_SKEW_ALLOWANCE = 1.15


def _background(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Wide Gaussian background, computed on a block-averaged copy for speed."""
    from scipy import ndimage as ndi

    factor = max(1, int(sigma_px // 8))
    rows, cols = a.shape
    if factor == 1 or min(rows, cols) < 4 * factor:
        return ndi.gaussian_filter(a, sigma_px, mode="reflect")
    r, c = rows - rows % factor, cols - cols % factor
    small = a[:r, :c].reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
    small = ndi.gaussian_filter(small, sigma_px / factor, mode="reflect")
    # Back to full size; a smooth field, so linear interpolation is enough.
    zoom = (rows / small.shape[0], cols / small.shape[1])
    return ndi.zoom(small, zoom, order=1, mode="nearest", grid_mode=True)[:rows, :cols]


def particle_mask(image, pixel_nm: float, *, polarity: str = "auto", threshold_sigma: float = 5.0,
                  min_size_nm: float = 2.0, smooth_px: float = 1.0,
                  background_px: float = 40.0, tail_factor: float = 1.15
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of particles in a survey image, and the intensity peaks that confirm them.

    Steps: Gaussian smoothing, subtraction of a wide Gaussian background, noise from the
    median absolute deviation, hysteresis threshold (``threshold_sigma``, or more where the
    noise tail is heavier, to seed; half of ``threshold_sigma`` to grow), removal of objects smaller than a ``min_size_nm`` disc, and
    ``peak_local_max`` above ``threshold_sigma``; only objects holding a peak are kept.

    Parameters
    ----------
    image : array_like, 2-D
    pixel_nm : float
    polarity : {"auto", "dark", "bright"}
        Dark particles on a bright background (bright-field TEM) or bright (HAADF);
        ``auto`` picks the side with the stronger outliers.
    threshold_sigma : float
        Threshold in units of the background noise.
    min_size_nm : float
        Smallest particle diameter that counts.
    smooth_px, background_px : float
        Gaussian sigmas of the smoothing and of the background.
    tail_factor : float
        Seeds must also exceed ``tail_factor`` × the largest excursion on the side opposite
        the particles (an estimate, from this image, of how far noise alone reaches).

    Returns
    -------
    mask : ndarray of bool
    peaks : ndarray of int, shape (n, 2)
        ``(row, col)`` of the peaks.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import apply_hysteresis_threshold

    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    if polarity not in ("auto", "dark", "bright"):
        raise ValueError(f"polarity must be auto, dark or bright, got {polarity!r}")
    smooth = ndi.gaussian_filter(a, smooth_px) if smooth_px > 0 else a
    residual = smooth - _background(a, background_px)
    centred = residual - np.median(residual)
    sigma = 1.4826 * np.median(np.abs(centred))
    if not sigma > 0:  # constant (blank) image: nothing to find
        return np.zeros(a.shape, bool), np.zeros((0, 2), int)
    z = centred / sigma
    if polarity == "auto":
        polarity = "bright" if np.sum(z > threshold_sigma) >= np.sum(z < -threshold_sigma) else "dark"
    if polarity == "dark":
        z = -z
    # Film texture and low-count shot noise have heavier tails than a Gaussian; the most
    # extreme value on the side particles do not reach shows how far noise alone goes in
    # this very image, so seeds must exceed it too.
    # Counts are right-skewed (shot noise, film), so for bright particles the dark tail
    # understates the bright one: allow for that.
    skew = _SKEW_ALLOWANCE if polarity == "bright" else 1.0
    seed_level = max(threshold_sigma, tail_factor * skew * float(-z.min()))
    mask = apply_hysteresis_threshold(z, threshold_sigma / 2, seed_level)
    min_px = max(2, int(math.pi * (min_size_nm / pixel_nm / 2) ** 2))
    labels, n = ndi.label(mask)
    if n == 0:
        return mask, np.zeros((0, 2), int)
    sizes = np.bincount(labels.ravel())
    min_distance = max(1, int(round(min_size_nm / pixel_nm / 2)))
    # Masking instead of ``labels=`` (which loops over every object) keeps this fast.
    peaks = peak_local_max(np.where(mask, z, 0.0), min_distance=min_distance,
                           threshold_abs=seed_level, exclude_border=False)
    confirmed = np.zeros(n + 1, bool)
    confirmed[labels[peaks[:, 0], peaks[:, 1]]] = True
    confirmed &= sizes >= min_px
    confirmed[0] = False
    keep = confirmed[labels]
    peaks = peaks[keep[peaks[:, 0], peaks[:, 1]]] if len(peaks) else peaks
    return keep, peaks


def check_segments(image, pixel_nm: float, *, segment_um: tuple[float, float],
                   overlap: float = 0.1, **mask_options) -> list[Segment]:
    """Divide a survey image into record-sized segments and count particles in each.

    A segment holds particles when any pixel of a confirmed particle lies inside it (a
    particle cut by the boundary is still in the record field); ``particles`` counts the
    peaks whose objects touch it.

    Parameters
    ----------
    image : array_like, 2-D
        Survey image.
    pixel_nm : float
        Survey pixel size.
    segment_um : (float, float)
        Record field width and height in µm.
    overlap : float
        Fractional overlap between neighbouring segments.
    **mask_options
        Passed to :func:`particle_mask`.

    Returns
    -------
    list of Segment
        In serpentine order.
    """
    from scipy import ndimage as ndi

    a = np.asarray(image)
    mask, peaks = particle_mask(a, pixel_nm, **mask_options)
    labels, _ = ndi.label(mask)
    peak_labels = labels[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0, int)
    rows, cols = a.shape
    segments = []
    for r, c, r0, r1, c0, c1 in segment_grid(a.shape, pixel_nm, segment_um=segment_um,
                                             overlap=overlap):
        inside = np.unique(labels[r0:r1, c0:c1])
        inside = inside[inside > 0]
        n_peaks = int(np.isin(peak_labels, inside).sum()) if inside.size else 0
        dx_um = ((c0 + c1) / 2 - cols / 2) * pixel_nm / 1000.0
        dy_um = ((r0 + r1) / 2 - rows / 2) * pixel_nm / 1000.0
        segments.append(Segment(r, c, r0, r1, c0, c1, dx_um, dy_um, n_peaks))
    return segments
