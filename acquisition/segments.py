"""Segment check: which record-sized parts of a survey image hold particles.

A survey image is divided into segments the size of the record field; thresholding against
the noise plus peak finding decides whether a segment holds particles, so empty segments are
never recorded (the autoSTEM scheme, with a noise-based instead of a 0.6 × max threshold so
that an empty survey finds nothing).

No survey detector sees every faint particle at survey magnification (PS50 is ~4 survey
pixels across, as bright as the film texture), so the check measures its own sensitivity
during a run (:class:`SegmentCheckCalibration`): the first segments are recorded whatever
the survey said, each record is checked at record resolution
(:func:`record_has_particles`), and skipping stays on only when the survey called no
occupied segment empty over enough segments to bound its miss rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

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
    return survey_segments(image, pixel_nm, segment_um=segment_um, overlap=overlap,
                           **mask_options)[0]


def survey_segments(image, pixel_nm: float, *, segment_um: tuple[float, float],
                    overlap: float = 0.1, **mask_options) -> tuple[list[Segment], np.ndarray]:
    """:func:`check_segments`, and the survey's particle objects (labels) it decided from.

    The labels let record frames of the same area say which of their particles the survey
    saw (:func:`survey_detections`), which is how the segment check learns its sensitivity.

    Returns
    -------
    segments : list of Segment
    labels : ndarray of int
        Connected confirmed particle objects of the survey image (0: background).
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
    return segments, labels


def _flatten_illumination(a: np.ndarray, *, blocks: int = 16) -> np.ndarray:
    """Remove a smooth beam profile (tilt and vignetting) fitted as a 2-D quadratic.

    The quadratic is fitted by least squares to block medians, leaving out blocks more than
    3 robust sigmas off (particles), so a wide Gaussian background afterwards only has film
    mottle to follow; without it the corners of a vignetted frame look like dark particles.
    """
    rows, cols = a.shape
    br, bc = min(blocks, rows), min(blocks, cols)
    r, c = (rows // br) * br, (cols // bc) * bc
    med = np.median(a[:r, :c].reshape(br, r // br, bc, c // bc).swapaxes(1, 2)
                    .reshape(br, bc, -1), axis=2)

    def design(v, u):
        v, u = np.meshgrid(v, u, indexing="ij")
        return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], -1)

    coords = design(((np.arange(br) + 0.5) * (r / br) - rows / 2) / rows,
                    ((np.arange(bc) + 0.5) * (c / bc) - cols / 2) / cols).reshape(-1, 6)
    values = med.ravel()
    keep = np.ones(values.size, bool)
    for _ in range(3):
        coef = np.linalg.lstsq(coords[keep], values[keep], rcond=None)[0]
        residual = values - coords @ coef
        spread = 1.4826 * np.median(np.abs(residual[keep]))
        if not spread > 0:
            break
        keep = np.abs(residual) < 3 * spread
    surface = design((np.arange(rows) + 0.5 - rows / 2) / rows,
                     (np.arange(cols) + 0.5 - cols / 2) / cols) @ coef
    return a - surface + coef[0]


def record_has_particles(image, pixel_nm: float, *, bin_px: int = 4,
                         threshold_sigma: float = 5.0, min_size_nm: float = 2.0,
                         polarity: str = "auto", margin: float = 0.05) -> int:
    """Count particles in a record frame quickly: the reference for the survey check.

    The number of peaks :func:`record_particle_peaks` finds (0: the frame looks empty);
    see there for the parameters.
    """
    return len(record_particle_peaks(image, pixel_nm, bin_px=bin_px,
                                     threshold_sigma=threshold_sigma, min_size_nm=min_size_nm,
                                     polarity=polarity, margin=margin))


def focus_window(image_shape: tuple[int, int], peaks, *, side_fraction: float = 0.25
                 ) -> tuple[slice, slice] | None:
    """A square window of a record frame holding the most particle peaks, to focus on.

    In a sparse frame the few particles hold almost all of the focus signal while shot noise
    fills the whole frame; measuring sharpness on a window around them raises the signal
    share by the frame-to-window area ratio and the noise floor only by its square root.

    Parameters
    ----------
    image_shape : (int, int)
    peaks : array_like, shape (n, 2)
        ``(row, col)`` of particle peaks (:func:`record_particle_peaks`).
    side_fraction : float
        Window side as a fraction of the frame's shorter side (at least 64 px).

    Returns
    -------
    (slice, slice) or None
        None when there are no peaks or the window would be the whole frame.
    """
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    rows, cols = image_shape
    side = int(max(64, round(side_fraction * min(rows, cols))))
    if len(peaks) == 0 or side >= min(rows, cols):
        return None
    # the window centred on the peak with the most peaks within half a side
    near = np.all(np.abs(peaks[:, None, :] - peaks[None, :, :]) <= side / 2, axis=2).sum(1)
    r, c = peaks[int(np.argmax(near))]
    r0 = int(np.clip(round(r - side / 2), 0, rows - side))
    c0 = int(np.clip(round(c - side / 2), 0, cols - side))
    return slice(r0, r0 + side), slice(c0, c0 + side)


def _binned_particles(image, pixel_nm, *, bin_px, threshold_sigma, min_size_nm, polarity):
    """The record check's detection: the frame binned, its beam profile removed, and
    :func:`particle_mask` run on it. Returns ``(mask, peaks, b, (r, c))`` in binned pixels
    (``b`` the binning used, ``r × c`` the frame part it covers), or None for a flat frame."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {a.shape}")
    if not (isinstance(bin_px, (int, np.integer)) and bin_px >= 1):
        raise ValueError(f"bin_px must be an integer >= 1, got {bin_px!r}")
    b = _record_binning(a.shape, int(bin_px))
    r, c = (a.shape[0] // b) * b, (a.shape[1] // b) * b
    binned = a[:r, :c].reshape(r // b, b, c // b, b).mean(axis=(1, 3))
    if not np.ptp(binned) > 0:
        return None
    mask, peaks = particle_mask(_flatten_illumination(binned), pixel_nm * b,
                                polarity=polarity, threshold_sigma=threshold_sigma,
                                min_size_nm=min_size_nm)
    return mask, peaks, b, (r, c)


def record_particle_peaks(image, pixel_nm: float, *, bin_px: int = 4,
                          threshold_sigma: float = 5.0, min_size_nm: float = 2.0,
                          polarity: str = "auto", margin: float = 0.05) -> np.ndarray:
    """Find particles in a record frame quickly: the reference for the survey check.

    The frame is binned ``bin_px`` × ``bin_px`` (a record frame resolves its smallest
    particles over ~20 pixels, so binned by 4 they are still ~5 pixels across, 1.5× finer
    than in the survey and with 4× its counts per pixel), its beam profile removed
    (:func:`_flatten_illumination`), and :func:`particle_mask` run on it. Measured against
    the simulator's truth (``bench/acquisition.py --segments``), this finds a particle in
    occupied record fields of every sample, both detectors and at a quarter dose.

    Parameters
    ----------
    image : array_like, 2-D
        Record frame.
    pixel_nm : float
        Record pixel size.
    bin_px : int
        Binning factor.
    threshold_sigma, min_size_nm, polarity
        As in :func:`particle_mask`.
    margin : float
        Peaks closer to the frame's border than this fraction of its size (and at least 2
        binned pixels; 0: none) are not counted: a particle cut by the border peaks there, and one
        centred outside belongs to the neighbouring segment (segments overlap, so with
        ``margin`` = half their overlap every point of the survey is in one segment's
        counted part).

    Returns
    -------
    ndarray of int, shape (n, 2)
        ``(row, col)`` of the particle peaks found, in the frame's (unbinned) pixels.
    """
    peaks, _ = record_particles(image, pixel_nm, bin_px=bin_px,
                                threshold_sigma=threshold_sigma, min_size_nm=min_size_nm,
                                polarity=polarity)
    return peaks_inside(peaks, np.shape(image), margin=margin, bin_px=int(bin_px))


def record_particles(image, pixel_nm: float, *, bin_px: int = 4,
                     threshold_sigma: float = 5.0, min_size_nm: float = 2.0,
                     polarity: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """:func:`record_particle_peaks` with ``margin=0``, and which particle holds each peak.

    Returns
    -------
    peaks : ndarray of int, shape (n, 2)
        Exactly the peaks of :func:`record_particle_peaks` with ``margin=0``.
    objects : ndarray of int, shape (n,)
        The connected particle object (of the binned frame's mask) each peak lies in: peaks
        of one particle (or of touching ones) share an id.
    """
    from scipy import ndimage as ndi

    found = _binned_particles(image, pixel_nm, bin_px=bin_px,
                              threshold_sigma=threshold_sigma, min_size_nm=min_size_nm,
                              polarity=polarity)
    if found is None:
        return np.zeros((0, 2), int), np.zeros(0, int)
    mask, peaks, b, _ = found
    labels, _ = ndi.label(mask)
    objects = labels[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0, int)
    return peaks * b + b // 2, objects


def record_polarity(image, pixel_nm: float, *, bin_px: int = 4, threshold_sigma: float = 5.0,
                    min_size_nm: float = 2.0, margin: float = 0.05) -> str | None:
    """Which contrast a record frame's particles have: ``"dark"``, ``"bright"`` or None.

    The record check (:func:`record_particle_peaks`) is run for each polarity; the answer is
    the one whose search counts particles, None when both or neither do. Particles add
    material, so their contrast is set by the detector (dark in bright field, bright in
    annular dark field), the same for every particle of a run; the support film's texture
    has both signs.
    """
    found = [pol for pol in ("dark", "bright")
             if len(record_particle_peaks(image, pixel_nm, bin_px=bin_px,
                                          threshold_sigma=threshold_sigma,
                                          min_size_nm=min_size_nm, polarity=pol,
                                          margin=margin))]
    return found[0] if len(found) == 1 else None


def film_only(image, pixel_nm: float, *, polarity: str = "auto", margin: float = 0.05,
              bin_px: int = 4) -> bool:
    """Whether a record frame's counted part holds nothing but the support film's texture.

    The second opinion on a record check that saw particles where the survey saw none: a
    confirmation record of the same field repeats shot noise's alarms only by chance, but
    the film's mottle is fixed to the specimen and repeats. The frame is segmented by
    :func:`particlewatch.analysis.segment.segment`, which decides a frame holds nothing when
    its strongest region does not stand beyond the film texture's deepest dip on the other
    polarity (bare film is alike on both sides; particles are not); True when no region it
    keeps is centred in the counted part (``margin`` as in :func:`record_particle_peaks`).

    Parameters
    ----------
    image : array_like, 2-D
    pixel_nm : float
    polarity : {"auto", "dark", "bright"}
    margin, bin_px : float, int
        The record check's border band and binning: the counted part is
        :func:`counted_part`'s, the same as :func:`record_particle_peaks` counts in.

    Returns
    -------
    bool
    """
    from scipy import ndimage as ndi

    from ..analysis.segment import segment

    a = np.asarray(image, dtype=np.float64)
    labels = segment(a, pixel_nm, polarity=polarity, refine_edges=False, clear_border=False)
    n = int(labels.max())
    if n == 0:
        return True
    centres = np.asarray(ndi.center_of_mass(np.ones(a.shape), labels, np.arange(1, n + 1)))
    return not bool(_inside_counted(centres, a.shape, margin=margin, bin_px=bin_px).any())


def particle_region(image, pixel_nm: float, *, margin_px: float = 8.0, bin_px: int = 4,
                    threshold_sigma: float = 5.0, min_size_nm: float = 2.0,
                    polarity: str = "auto") -> np.ndarray | None:
    """Where a record frame's particles are, with a margin: the part to measure focus on.

    The particles of :func:`record_particles` (their binned mask), grown by ``margin_px``
    frame pixels (what defocus blur spreads them by over a focus sweep).

    Returns
    -------
    ndarray of bool or None
        The frame's shape; None when no particle was found.
    """
    from scipy import ndimage as ndi

    found = _binned_particles(image, pixel_nm, bin_px=bin_px,
                              threshold_sigma=threshold_sigma, min_size_nm=min_size_nm,
                              polarity=polarity)
    if found is None or not len(found[1]):
        return None
    mask, _, b, (r, c) = found
    steps = int(math.ceil(margin_px / b))
    if steps:
        mask = ndi.binary_dilation(mask, structure=ndi.generate_binary_structure(2, 2),
                                   iterations=steps)
    full = np.zeros(np.shape(image), bool)
    full[:r, :c] = np.repeat(np.repeat(mask, b, axis=0), b, axis=1)
    return full


def survey_detections(survey_labels, survey_pixel_nm: float, segment: Segment, peaks,
                      objects, record_shape: tuple[int, int], record_pixel_nm: float, *,
                      tolerance_px: int = 2, margin: float = 0.0,
                      bin_px: int = 4) -> tuple[int, int]:
    """How many of a record frame's particles the survey saw: ``(checked, missed)``.

    The record frame was taken centred on ``segment``; each of its particle objects
    (:func:`record_particles`) is mapped into the survey image and counts as seen when a
    survey particle object lies within ``tolerance_px`` survey pixels of one of its peaks
    (blur and the survey's coarser pixels shift a peak by a pixel or so). A survey object
    that two or more record particles fall on is no evidence for any of them (a faint
    particle next to a bright one is "seen" only through its neighbour), and particles
    mapped outside the survey image are not counted. Nor are particles with no peak in the
    record's counted part (``margin``, as in :func:`record_particle_peaks`): the border band
    holds particles cut by the frame's edge, judged with the neighbouring segment, and the
    edge's own artefacts (a beam-profile residue in a corner peaks there like a dark
    particle that no survey can see), which counted as misses and kept skipping off where
    the survey had missed nothing. Particles are what the survey detects
    or misses one by one: a segment is skipped wrongly only when the survey misses every
    particle in it, so the share of particles missed bounds the share of occupied segments
    missed, and every record of an occupied segment (recorded anyway) adds several
    particles to that evidence at no extra cost.

    Parameters
    ----------
    survey_labels : ndarray of int
        From :func:`survey_segments`.
    survey_pixel_nm : float
    segment : Segment
        The segment the record frame was taken on.
    peaks, objects : ndarray
        From :func:`record_particles` on the record frame.
    record_shape : (int, int)
    record_pixel_nm : float
    tolerance_px : int
        Survey pixels between a record peak and a survey object that still count as one.
    margin : float
        The record check's border band (fraction of the frame's size, as in
        :func:`record_particle_peaks`; 0: every particle counts).
    bin_px : int
        The binning ``peaks`` were found with.

    Returns
    -------
    (int, int)
        Record particles checked, and those of them no survey object covered.
    """
    survey_labels = np.asarray(survey_labels)
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    objects = np.asarray(objects).reshape(-1)
    if peaks.shape[0] != objects.shape[0]:
        raise ValueError(f"peaks ({peaks.shape[0]}) and objects ({objects.shape[0]}) must "
                         "have the same length")
    if len(peaks) == 0:
        return 0, 0
    # particles with a peak in the counted part: only they decide whether this segment is
    # occupied, so only they are trials of the survey's sensitivity for it
    counted = set(objects[_inside_counted(peaks, record_shape, margin=margin,
                                          bin_px=bin_px)].tolist())
    rows, cols = survey_labels.shape
    centre = np.array([(segment.row0 + segment.row1) / 2, (segment.col0 + segment.col1) / 2])
    scale = record_pixel_nm / survey_pixel_nm
    # survey pixel (row, col) of every peak: its offset from the record frame's centre
    at = centre - 0.5 + (peaks + 0.5 - np.asarray(record_shape) / 2) * scale
    t = int(tolerance_px)
    hits: dict[int, set] = {}
    for (rr, cc), obj in zip(np.round(at).astype(int), objects):
        if not (0 <= rr < rows and 0 <= cc < cols):
            hits.setdefault(int(obj), set()).add(-1)  # outside the survey: not a trial
            continue
        window = survey_labels[max(rr - t, 0):rr + t + 1, max(cc - t, 0):cc + t + 1]
        hits.setdefault(int(obj), set()).update(int(v) for v in np.unique(window) if v > 0)
    owners: dict[int, int] = {}  # survey object -> record particles that fall on it
    for found in hits.values():
        for label in found - {-1}:
            owners[label] = owners.get(label, 0) + 1
    checked = missed = 0
    for obj, found in hits.items():
        if -1 in found or obj not in counted:
            continue
        if not found:
            checked += 1
            missed += 1
        elif all(owners[label] == 1 for label in found):
            checked += 1
    return checked, missed


def _record_binning(shape: tuple[int, int], bin_px: int) -> int:
    """The binning :func:`record_particle_peaks` uses: ``bin_px``, but >= 32 px left."""
    return int(min(bin_px, max(1, min(shape) // 32)))


def counted_part(image_shape: tuple[int, int], *, margin: float, bin_px: int = 4
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The part of a record frame the record check counts, in the frame's own pixels.

    One rule for every judge of a record frame (:func:`peaks_inside`, :func:`film_only`,
    :func:`survey_detections`): the border band is ``margin`` of the binned frame's size
    (binned as :func:`record_particle_peaks` bins, :func:`_record_binning`), at least 2
    binned pixels when ``margin`` > 0, and whole binned pixels, so that a peak found in the
    binned frame and a position measured at full resolution are judged alike.

    Returns
    -------
    lo, hi : ndarray of int, shape (2,)
        ``(row, col)`` bounds: a point ``p`` is counted when ``lo <= p < hi``.
    """
    b = _record_binning(image_shape, bin_px)
    shape = np.asarray(image_shape[:2]) // b  # the binned frame's shape
    edge = np.maximum(2 if margin > 0 else 0, np.floor(margin * shape)).astype(int)
    return edge * b, (shape - edge) * b


def _inside_counted(points, image_shape: tuple[int, int], *, margin: float,
                    bin_px: int) -> np.ndarray:
    """Which of a frame's points (``(row, col)``, frame pixels) lie in its counted part
    (:func:`counted_part`). A binned peak sits inside its binned pixel, so it is counted
    exactly when that binned pixel is."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lo, hi = counted_part(image_shape, margin=margin, bin_px=bin_px)
    return np.all((points >= lo) & (points < hi), axis=1)


def peaks_inside(peaks, image_shape: tuple[int, int], *, margin: float,
                 bin_px: int = 4) -> np.ndarray:
    """Those of a frame's peaks that :func:`record_particle_peaks` counts with ``margin``.

    ``peaks`` are what :func:`record_particle_peaks` found with ``margin=0`` in a frame of
    ``image_shape`` with the same ``bin_px``; the result is exactly what it returns with
    ``margin``, without searching the frame again (one search serves several margins).
    """
    peaks = np.asarray(peaks, dtype=int).reshape(-1, 2)
    return peaks[_inside_counted(peaks, image_shape, margin=margin, bin_px=bin_px)]


def miss_rate_upper_bound(missed: int, checked: int, *, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound of a rate from ``missed`` of ``checked``.

    With nothing missed this is ``1 − (1 − confidence)^(1/checked)`` (≈ 3/checked at 95%).
    """
    from scipy import stats

    if checked <= 0 or missed >= checked:
        return 1.0
    return float(stats.beta.ppf(confidence, missed + 1, checked - missed))


@dataclass
class SegmentCheckCalibration:
    """What the survey segment check has shown about its own sensitivity in this run.

    States: ``"calibrating"`` (every segment is recorded and each record checked with
    :func:`record_has_particles`), ``"on"`` (survey-empty segments are skipped; every
    ``spot_check_every``-th of them is still recorded and checked), ``"off"`` (the survey
    called an occupied segment empty: every segment is recorded for the rest of the run).

    Skipping is switched on when no occupied segment was missed and either the miss rate
    (missed / occupied records) or the share of survey-empty segments that held particles
    has a ``confidence`` upper bound below its tolerance; any miss switches it off. A third
    way on, much sooner in sparse areas (where segments the survey calls empty are most of
    what calibration records): the survey's miss rate per particle
    (:func:`survey_detections`: particles of record frames the survey did not see), which
    bounds its miss rate per occupied segment (a segment is missed only when every particle
    in it is), with no particle missed and at least ``min_particle_segments`` segments
    holding the particles checked (particles of one frame share its survey's focus and
    dose, so one crowded frame must not decide alone).

    Parameters
    ----------
    miss_tolerance : float
        Largest acceptable share of occupied segments skipped (0.05: 59 occupied records
        without a miss at 95%).
    empty_tolerance : float
        Largest acceptable share of skipped segments holding particles, the bound that ends
        calibration in areas with few particles (0.01: 299 survey-empty records without a
        miss).
    confidence : float
    spot_check_every : int
        After calibration, record one in this many skipped segments (0: never).
    min_particle_segments : int
        Recorded segments with checked particles the per-particle bound needs (0: the
        per-particle bound is not used).
    """

    miss_tolerance: float = 0.05
    empty_tolerance: float = 0.01
    confidence: float = 0.95
    spot_check_every: int = 20
    min_particle_segments: int = 10
    occupied: int = 0
    missed: int = 0
    empty_checked: int = 0
    spot_checks: int = 0
    particles_checked: int = 0
    particles_missed: int = 0
    particle_segments: int = 0
    state: str = "calibrating"
    _since_spot: int = 0

    def __post_init__(self):
        for name in ("miss_tolerance", "empty_tolerance", "confidence"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.spot_check_every < 0:
            raise ValueError(f"spot_check_every must be >= 0, got {self.spot_check_every}")
        if self.min_particle_segments < 0:
            raise ValueError(f"min_particle_segments must be >= 0, got "
                             f"{self.min_particle_segments}")

    @property
    def skipping(self) -> bool:
        """Whether segments the survey calls empty may be skipped without a record."""
        return self.state == "on"

    def record_anyway(self) -> bool:
        """Called for each segment skipping would leave out: True to record it anyway."""
        if self.state != "on":
            return self.state in ("calibrating", "off")
        self._since_spot += 1
        if self.spot_check_every and self._since_spot >= self.spot_check_every:
            self._since_spot = 0
            self.spot_checks += 1
            return True
        return False

    def add(self, *, survey_occupied: bool, record_occupied: bool,
            particles_checked: int = 0, particles_missed: int = 0) -> str:
        """Count one recorded segment (survey verdict vs. record check, and how many of the
        record's particles the survey saw, :func:`survey_detections`); return the state."""
        if not 0 <= particles_missed <= particles_checked:
            raise ValueError(f"particles_missed ({particles_missed}) must be in [0, "
                             f"particles_checked ({particles_checked})]")
        self.particles_checked += int(particles_checked)
        self.particles_missed += int(particles_missed)
        self.particle_segments += particles_checked > 0
        if not survey_occupied:
            self.empty_checked += 1
        if record_occupied:
            self.occupied += 1
            self.missed += not survey_occupied
        if self.missed:
            self.state = "off"
        elif self.state == "calibrating" and (
                self.upper_bound("occupied") <= self.miss_tolerance
                or self.upper_bound("empty") <= self.empty_tolerance
                or (self.min_particle_segments
                    and self.particle_segments >= self.min_particle_segments
                    and self.particles_missed == 0
                    and self.upper_bound("particle") <= self.miss_tolerance)):
            self.state = "on"
        return self.state

    def upper_bound(self, which: str = "occupied") -> float:
        """Upper bound of the miss rate per occupied (``"occupied"``) or per survey-empty
        (``"empty"``) segment recorded so far, or per particle checked (``"particle"``)."""
        if which == "particle":
            return miss_rate_upper_bound(self.particles_missed, self.particles_checked,
                                         confidence=self.confidence)
        checked = self.occupied if which == "occupied" else self.empty_checked
        return miss_rate_upper_bound(self.missed, checked, confidence=self.confidence)

    def restore(self, summary: Mapping) -> bool:
        """Take over the counts and state of an earlier run's :meth:`summary` (a resumed
        run on the same specimen: what the survey showed about its sensitivity there still
        holds). Only a summary made with the same tolerances, confidence and spot-check
        interval is taken; returns whether it was."""
        same = all(summary.get(name) == getattr(self, name) for name in
                   ("miss_tolerance", "empty_tolerance", "confidence", "spot_check_every"))
        if not same or summary.get("state") not in ("calibrating", "on", "off"):
            return False
        self.occupied = int(summary["occupied_checked"])
        self.missed = int(summary["missed"])
        self.empty_checked = int(summary["empty_checked"])
        self.spot_checks = int(summary["spot_checks"])
        self.particles_checked = int(summary["particles_checked"])
        self.particles_missed = int(summary["particles_missed"])
        # summaries written before these were kept: the per-particle bound then waits for
        # new segments, which errs on the side of recording
        self.particle_segments = int(summary.get("particle_segments", 0))
        self._since_spot = int(summary.get("since_spot_check", 0))
        self.state = str(summary["state"])
        return True

    def note(self) -> str:
        """One line for the log and the dashboard."""
        if self.state == "off":
            return (f"segment check off: {self.missed} of {self.occupied} occupied segments "
                    f"looked empty in the survey (particles too faint at survey magnification)")
        if self.state == "on":
            return (f"segment check on: 0 of {self.occupied} occupied segments looked empty in "
                    f"the survey (miss rate < {self.upper_bound('occupied'):.1%}, "
                    f"{self.particles_missed} of {self.particles_checked} particles unseen "
                    f"(< {self.upper_bound('particle'):.1%}), "
                    f"{self.empty_checked} survey-empty segments checked, "
                    f"{self.spot_checks} spot checks)")
        return (f"segment check calibrating: {self.occupied} occupied and {self.empty_checked} "
                f"survey-empty segments recorded and checked so far")

    def summary(self) -> dict:
        """JSON-ready counts for ``acquisition.json``."""
        return {"state": self.state, "note": self.note(), "occupied_checked": self.occupied,
                "missed": self.missed, "empty_checked": self.empty_checked,
                "spot_checks": self.spot_checks,
                "particles_checked": self.particles_checked,
                "particles_missed": self.particles_missed,
                "particle_segments": self.particle_segments,
                "since_spot_check": self._since_spot,
                "particle_miss_rate_upper": self.upper_bound("particle"),
                "miss_rate_upper": self.upper_bound("occupied"),
                "empty_miss_rate_upper": self.upper_bound("empty"),
                "miss_tolerance": self.miss_tolerance, "empty_tolerance": self.empty_tolerance,
                "confidence": self.confidence, "spot_check_every": self.spot_check_every}
