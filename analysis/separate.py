"""Split touching and overlapping particles.

Default: UECS, the ultimate erosion of convex shapes of ANTEMA (Gumbiowski et al. 2023;
SCIENCE.md §2). A region whose convexity (convex-hull perimeter / perimeter) is below 0.95 is
eroded step by step; every piece that has become convex is a marker, kept with the number of
steps it took. Each marker is dilated back by that many steps, masked by the original outline,
so a particle regains its full size; where two regrown particles overlap, the shared pixels go
to the one they lie deeper inside. Markers under 30 px or 0.5 nm ECD are dropped; a regrown piece
that is still not convex cannot be explained as one particle and is reported as an agglomerate,
not measured. Watershed (distance transform, h-maxima markers) and ``"none"`` are options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation

from .measure import _hull, _polygon_length, outline

__all__ = ["separate", "Separation", "convexity", "METHODS"]

METHODS = ("uecs", "watershed", "none")


@dataclass
class Separation:
    """Result of :func:`separate`.

    Attributes
    ----------
    labels : (M, N) ndarray of int32
        Particles labelled 1..n; agglomerates are removed (0).
    separated : (n + 1,) ndarray of bool
        ``separated[k]`` is True when particle ``k`` came out of splitting a touching group
        (index 0, the background, is False).
    agglomerates : int
        Number of pieces that could not be split into convex particles (not measured).
    agglomerate_boxes : list of tuple of int
        ``(row0, col0, row1, col1)`` of each agglomerate, for overlays and reports.
    """

    labels: np.ndarray
    separated: np.ndarray
    agglomerates: int = 0
    agglomerate_boxes: list = field(default_factory=list)


def convexity(mask):
    """Convex-hull perimeter / perimeter of one binary region (1 for a convex shape).

    Parameters
    ----------
    mask : (M, N) ndarray of bool

    Returns
    -------
    float
    """
    pts = outline(mask)
    if len(pts) < 4:
        return 1.0
    perim = _polygon_length(pts)
    _, hull_perim, _ = _hull(pts)
    return min(hull_perim / perim, 1.0) if perim > 0 else 1.0


def separate(labels, pixel_nm, *, method="uecs", image=None, min_convexity=0.95,
             min_marker_px=30, min_marker_nm=0.5):
    """Split touching particles into individual ones.

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Regions from :func:`particlewatch.analysis.segment.segment` (0 background).
    pixel_nm : float
        Pixel size in nm.
    method : {"uecs", "watershed", "none"}, optional
        UECS (default), distance-transform watershed, or no splitting.
    image : (M, N) ndarray, optional
        Not needed by the shape-based methods; accepted so callers can pass the frame.
    min_convexity : float, optional
        Regions (and pieces) at or above this convexity count as one convex particle.
    min_marker_px, min_marker_nm : float, optional
        UECS markers smaller than this many pixels, or this ECD in nm, are dropped.

    Returns
    -------
    Separation

    References
    ----------
    .. [1] Gumbiowski et al., "Automated analysis of transmission electron micrographs of
       metallic nanoparticles by machine learning", Nanoscale Adv. 5 (2023).

    Examples
    --------
    >>> yy, xx = np.mgrid[:80, :120]
    >>> two = ((yy - 40) ** 2 + (xx - 40) ** 2 < 22 ** 2) | ((yy - 40) ** 2 + (xx - 78) ** 2 < 22 ** 2)
    >>> s = separate(two.astype(int), 1.0)
    >>> int(s.labels.max()), s.separated[1:].tolist(), s.agglomerates
    (2, [True, True], 0)
    """
    labels, pixel_nm = _validate_inputs(labels, pixel_nm, method)
    if method == "none" or labels.max() == 0:
        out, _, _ = segmentation.relabel_sequential(labels)
        return Separation(out.astype(np.int32), np.zeros(int(out.max()) + 1, bool))
    if method == "watershed":
        return _watershed(labels)
    min_marker_px = max(float(min_marker_px), np.pi / 4 * (min_marker_nm / pixel_nm) ** 2)
    return _uecs(labels, min_convexity=min_convexity, min_marker_px=min_marker_px)


def _validate_inputs(labels, pixel_nm, method):
    if method not in METHODS:
        raise ValueError(f"method {method!r} must be one of {METHODS}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels (shape {labels.shape}) must be 2-D")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels (dtype {labels.dtype}) must be an integer label image")
    try:
        pixel_nm = float(pixel_nm)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number") from None
    if not np.isfinite(pixel_nm) or pixel_nm <= 0:
        raise ValueError(f"pixel_nm {pixel_nm!r} must be a positive number")
    return labels.astype(np.int32, copy=False), pixel_nm


# -- UECS -----------------------------------------------------------------------------------

def _uecs(labels, *, min_convexity, min_marker_px):
    out = np.zeros(labels.shape, np.int32)
    separated = [False]
    boxes = []
    next_label = 1
    for index, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        r0, c0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        r1 = min(sl[0].stop + 1, labels.shape[0])
        c1 = min(sl[1].stop + 1, labels.shape[1])
        mask = labels[r0:r1, c0:c1] == index + 1
        view = out[r0:r1, c0:c1]
        if convexity(mask) >= min_convexity:
            view[mask] = next_label
            separated.append(False)
            next_label += 1
            continue
        pieces, bad = _split_region(mask, min_convexity=min_convexity,
                                    min_marker_px=min_marker_px)
        for piece in pieces:
            view[piece] = next_label
            separated.append(len(pieces) > 1)
            next_label += 1
        if bad:
            boxes.append((r0, c0, r1, c1))
    return Separation(out, np.array(separated, bool), len(boxes), boxes)


def _markers(mask, *, min_convexity, min_marker_px):
    """Ultimate erosion of convex shapes: [(marker mask, erosion steps)] for one region."""
    depth = ndi.distance_transform_edt(mask)
    active = mask.copy()
    markers = []
    max_steps = int(depth.max())
    previous = 0
    for step in range(1, max_steps + 1):
        eroded = active & (depth > step)
        pieces, n = ndi.label(eroded)
        if n == 0:
            break
        # Convexity changes appreciably only when a piece splits off; between splits, check on
        # a geometric schedule so deep erosions of big regions stay cheap.
        if n == previous and step % max(1, step // 4):
            continue
        previous = n
        for index, psl in enumerate(ndi.find_objects(pieces)):
            piece = pieces[psl] == index + 1
            size = int(piece.sum())
            if size < 4 or convexity(piece) >= min_convexity:
                full = np.zeros_like(mask)
                full[psl] = piece
                active &= ~full  # this particle is found; the others erode on
                if size >= min_marker_px:
                    markers.append((full, step))
        if not (active & (depth > step)).any():
            break
    return markers


def _split_region(mask, *, min_convexity, min_marker_px):
    """Regrow UECS markers inside ``mask``; return (convex pieces, whether any were rejected)."""
    markers = _markers(mask, min_convexity=min_convexity, min_marker_px=min_marker_px)
    if not markers:
        return [], True
    # Depth of each pixel inside each regrown marker: steps − distance; the deepest one wins
    # the shared (overlapping) pixels.
    best = np.full(mask.shape, -np.inf)
    owner = np.full(mask.shape, -1, int)
    for i, (marker, steps) in enumerate(markers):
        dist = ndi.distance_transform_edt(~marker)
        inside = (dist <= steps) & mask
        score = np.where(inside, steps - dist, -np.inf)
        better = score > best
        best[better] = score[better]
        owner[better] = i
    pieces, rejected = [], False
    for i in range(len(markers)):
        piece = owner == i
        if not piece.any():
            continue
        piece = _largest_component(piece)
        if convexity(piece) < min_convexity:
            rejected = True
            continue
        pieces.append(piece)
    return pieces, rejected


def _largest_component(mask):
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


# -- watershed ------------------------------------------------------------------------------

def _watershed(labels):
    mask = labels > 0
    dist = ndi.distance_transform_edt(mask)
    # h-maxima of the distance map: one seed per bulge deeper than 2 px, whatever the size.
    smooth = ndi.gaussian_filter(dist, 1.0)
    peaks = morphology.h_maxima(smooth, 2.0) & mask
    markers, _ = ndi.label(peaks)
    ws = segmentation.watershed(-smooth, markers, mask=mask)
    # Regions without a seed keep their original extent.
    missing = mask & (ws == 0)
    if missing.any():
        ws = np.where(missing, labels + ws.max(), ws)
    ws, _, _ = segmentation.relabel_sequential(ws)
    n = int(ws.max())
    # A particle is "separated" when its original region produced more than one particle.
    pieces_per_region = np.zeros(int(labels.max()) + 1, int)
    pairs = np.unique(np.stack([labels[mask], ws[mask]]), axis=1)
    np.add.at(pieces_per_region, pairs[0], 1)
    separated = np.zeros(n + 1, bool)
    separated[pairs[1]] = pieces_per_region[pairs[0]] > 1
    return Separation(ws.astype(np.int32), separated)
