"""Split touching and overlapping particles.

Default: UECS, the ultimate erosion of convex shapes of ANTEMA (Gumbiowski et al. 2023;
SCIENCE.md §2). A region is convex when no point of its outline lies deeper inside its convex
hull than the pixelation allows (the *notch depth*, a test that, unlike the hull/perimeter
ratio of ANTEMA, still sees the notch of two strongly overlapping spheres and ignores the
pixel staircase). A non-convex region is eroded step by step; every piece that has split off
and become convex is a marker, kept with the number of steps it took, and a piece that erodes
away without becoming convex leaves its last remnant (the ultimate eroded set). Each marker is
dilated back by that many steps, masked by the original outline, so a particle regains its full
size: overlapping area is *shared*, not split. The label image gives a shared pixel to the
particle it lies deeper inside, and :attr:`Separation.masks` keeps every split particle's full,
possibly overlapping, extent for :func:`~particlewatch.analysis.measure.measure`. Regrown pieces
under 30 px or 0.5 nm ECD are dropped (ANTEMA drops such markers; the size is tested after
regrowth here, since the marker of a small sphere overlapping a large one is only a few pixels);
a regrown piece that is still clearly not convex cannot be explained as one particle and is
reported as an agglomerate, not measured. Watershed (distance transform, h-maxima markers) and
``"none"`` are options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage import morphology, segmentation
from ._checks import check_pixel_nm

__all__ = ["separate", "Separation", "notch_depth", "METHODS"]

METHODS = ("uecs", "watershed", "none")

# A digital convex region's boundary pixels lie less than ~1 px inside the hull of its pixels;
# a notch deeper than this (and than a fraction of the region's radius) starts a split attempt.
_SPLIT_NOTCH_PX = 1.5
_SPLIT_NOTCH_FRAC = 0.1
# A final piece with a notch deeper than this is not one particle (agglomerate).
_REJECT_NOTCH_PX = 2.0
_REJECT_NOTCH_FRAC = 0.2
# A split whose pieces leave more than this fraction of the region uncovered is rejected
# (ragged outlines of weak-contrast particles leave up to ~10-20%: they stay particles).
_UNEXPLAINED_FRAC = 0.4
# Regions rounder than this (edge-count circularity) are single particles without a hull test.
_SKIP_ROUNDNESS = 0.9


@dataclass
class Separation:
    """Result of :func:`separate`.

    Attributes
    ----------
    labels : (M, N) ndarray of int32
        Particles labelled 1..n; agglomerates are removed (0). A pixel shared by overlapping
        particles belongs to the one it lies deeper inside.
    separated : (n + 1,) ndarray of bool
        ``separated[k]`` is True when particle ``k`` came out of splitting a touching group
        (index 0, the background, is False).
    agglomerates : int
        Number of pieces that could not be split into convex particles (not measured).
    agglomerate_boxes : list of tuple of int
        ``(row0, col0, row1, col1)`` of each agglomerate, for overlays and reports.
    masks : dict of int to (int, int, ndarray of bool)
        For each particle whose full extent differs from its pixels in ``labels`` (split
        particles that overlap a neighbour): ``label -> (row0, col0, mask)``, the mask's top-left
        corner in the frame and its full, possibly overlapping, extent. Pass it to
        ``measure(..., masks=...)`` so each overlapping particle is measured whole.
    """

    labels: np.ndarray
    separated: np.ndarray
    agglomerates: int = 0
    agglomerate_boxes: list = field(default_factory=list)
    masks: dict = field(default_factory=dict)


def notch_depth(mask):
    """How deep (px) the outline of a binary region cuts into its convex hull.

    The largest distance from a boundary pixel centre to the boundary of the convex hull of all
    pixel centres: 0 for a digital rectangle, under ~1 px for any digitised convex shape, about
    ``r - sqrt(r² - (d/2)²)`` at the neck of two spheres of radius ``r`` whose centres are ``d``
    apart.

    Parameters
    ----------
    mask : (M, N) ndarray of bool
        One region.

    Returns
    -------
    float

    Examples
    --------
    >>> yy, xx = np.mgrid[:60, :100]
    >>> two = ((yy - 30) ** 2 + (xx - 30) ** 2 < 20 ** 2) | ((yy - 30) ** 2 + (xx - 66) ** 2 < 20 ** 2)
    >>> round(notch_depth(two))  # 20 - sqrt(20² - 18²) = 11.3
    11
    """
    return _notch_depth(np.asarray(mask, bool))


def _boundary_points(mask):
    edge = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
    p = np.pad(mask, 1) if edge else mask  # crops usually have a free margin already
    if not edge:
        inner = np.zeros_like(mask)
        inner[1:-1, 1:-1] = (p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2]
                             & p[1:-1, 2:])
        return np.argwhere(mask & ~inner).astype(float)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return np.argwhere(mask & ~inner).astype(float)


def _notch_depth(mask):
    pts = _boundary_points(mask)
    if len(pts) < 4:
        return 0.0
    try:
        eq = ConvexHull(pts).equations
    except (QhullError, ValueError):  # collinear: a line of pixels is convex
        return 0.0
    # eq: n·p + off <= 0 inside; the depth of a point is its distance to the nearest facet.
    inside = -(pts @ eq[:, :2].T + eq[:, 2])
    return float(inside.min(axis=1).max())


_ANGLES = np.linspace(0, 2 * np.pi, 64, endpoint=False)
_DIRS = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)])


def _is_convex(mask, area, *, px, frac):
    if area < 12:  # too few pixels for a notch deeper than the pixelation
        return True
    limit = max(px, frac * np.sqrt(area / np.pi))
    # Cheap bound first: the gap to the support line in 64 directions is never less than the
    # distance to the hull, so a small bound proves convexity without building the hull.
    pts = _boundary_points(mask)
    proj = pts @ _DIRS
    bound = float((proj.max(axis=0) - proj).min(axis=1).max()) if len(pts) else 0.0
    return bound <= limit or _notch_depth(mask) <= limit


def separate(labels, pixel_nm, *, method="uecs", image=None, min_marker_px=30,
             min_marker_nm=0.5):
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
        The frame. With it, UECS also checks every particle's projected thickness (see
        :func:`thickness_excess`): a piece clearly thicker than the frame's isolated convex
        particles of its width holds more than one particle (a deep overlap that shape cannot
        split) and is reported as an agglomerate instead of being measured as one.
    min_marker_px, min_marker_nm : float, optional
        UECS particles smaller than this many pixels, or this ECD in nm, after regrowth are
        dropped.

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
    >>> int(s.labels.max()), s.separated[1:].tolist(), s.agglomerates, sorted(s.masks)
    (2, [True, True], 0, [1, 2])
    """
    labels, pixel_nm = _validate_inputs(labels, pixel_nm, method)
    if method == "none" or labels.max() == 0:
        out, _, _ = segmentation.relabel_sequential(labels)
        return Separation(out.astype(np.int32), np.zeros(int(out.max()) + 1, bool))
    if method == "watershed":
        return _watershed(labels)
    min_marker_px = max(float(min_marker_px), np.pi / 4 * (min_marker_nm / pixel_nm) ** 2)
    sep, plain = _uecs(labels, min_marker_px=min_marker_px)
    if image is not None:
        sep = _drop_thick(sep, plain, _validate_image(image, labels))
    return sep


def _validate_inputs(labels, pixel_nm, method):
    if method not in METHODS:
        raise ValueError(f"method {method!r} must be one of {METHODS}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels (shape {labels.shape}) must be 2-D")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels (dtype {labels.dtype}) must be an integer label image")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    pixel_nm = check_pixel_nm(pixel_nm)
    return labels.astype(np.int32, copy=False), pixel_nm


def _validate_image(image, labels):
    image = np.asarray(image, dtype=float)
    if image.shape != labels.shape:
        raise ValueError(f"image (shape {image.shape}) must have the same shape as labels "
                         f"(shape {labels.shape})")
    return image


# -- UECS -----------------------------------------------------------------------------------

def _uecs(labels, *, min_marker_px):
    out = np.zeros(labels.shape, np.int32)
    separated = [False]
    boxes = []
    masks = {}
    plain = [False]  # came from a region that needed no split attempt (a thickness reference)
    areas = np.bincount(labels.ravel())
    round_ = _roundness(labels, areas) > _SKIP_ROUNDNESS
    next_label = 1
    for index, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        r0, c0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        r1 = min(sl[0].stop + 1, labels.shape[0])
        c1 = min(sl[1].stop + 1, labels.shape[1])
        mask = labels[r0:r1, c0:c1] == index + 1
        view = out[r0:r1, c0:c1]
        area = int(areas[index + 1])
        # Too small to hold two particles of the minimum size, or convex: one particle.
        if area < 2 * min_marker_px or round_[index + 1] or _is_convex(
                mask, area, px=_SPLIT_NOTCH_PX, frac=_SPLIT_NOTCH_FRAC):
            view[mask] = next_label
            separated.append(False)
            plain.append(True)
            next_label += 1
            continue
        pieces, owner, rejected = _split_region(mask, min_marker_px=min_marker_px)
        for i, piece in enumerate(pieces):
            view[owner == i] = next_label
            separated.append(len(pieces) > 1)
            plain.append(False)
            if not np.array_equal(piece, owner == i):
                masks[next_label] = (r0, c0, piece)
            next_label += 1
        if rejected or not pieces:
            boxes.append((r0, c0, r1, c1))
    return (Separation(out, np.array(separated, bool), len(boxes), boxes, masks),
            np.array(plain, bool))


def _roundness(labels, areas):
    """4πA/P² of every label, P from its count of pixel edges (× π/4, exact on average).

    One pass over the frame; two spheres overlapping by up to 20% of their contact distance
    score under 0.82 (0.75 for equal sizes), a digitised disc about 1.
    """
    p = np.pad(labels, 1)
    edges = np.zeros(len(areas), float)
    for a, b in ((p[:, :-1], p[:, 1:]), (p[:-1, :], p[1:, :])):
        diff = a != b
        edges += np.bincount(a[diff], minlength=len(areas))[:len(areas)]
        edges += np.bincount(b[diff], minlength=len(areas))[:len(areas)]
    perimeter = edges * np.pi / 4
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(perimeter > 0, 4 * np.pi * areas / perimeter ** 2, 0.0)


def _markers(mask, depth):
    """Ultimate erosion of convex shapes: [(marker mask, erosion steps)] for one region."""
    markers = []
    todo = [(mask, 0)]  # non-convex pieces still to erode, with the steps taken so far
    while todo:
        piece, s = todo.pop()
        tested, gap = s, 1
        while True:
            s += 1
            core = piece & (depth > s)
            lab, n = ndi.label(core)
            if n == 0:  # eroded away without becoming convex: its last remnant is the marker
                markers.append((piece, s - 1))
                break
            if n > 1:
                # Pixels left on a ragged digital saddle (one or two, or barely deeper than the
                # cut) are crumbs, not particles.
                # (counts per piece by bincount: ndi.maximum sorts the crop, a third of the
                # time of the whole search)
                sizes = np.bincount(lab.ravel(), minlength=n + 1)
                deep = np.bincount(lab[core & (depth >= s + 0.5)], minlength=n + 1)
                real = [k for k in range(1, n + 1) if deep[k] and sizes[k] > 2]
                if len(real) <= 1:
                    piece = lab == real[0] if real else core
                    continue
                for child in (lab == k for k in real):
                    if _is_convex(child, child.sum(), px=_SPLIT_NOTCH_PX,
                                  frac=_SPLIT_NOTCH_FRAC):
                        markers.append((child, s))
                    else:
                        todo.append((child, s))
                break
            piece = core
            # Between splits a notch keeps its depth while the piece shrinks, so it only turns
            # convex when a small dent erodes away: test on a doubling schedule.
            if s >= tested + gap:
                if _is_convex(core, core.sum(), px=_SPLIT_NOTCH_PX, frac=_SPLIT_NOTCH_FRAC):
                    markers.append((core, s))
                    break
                tested, gap = s, 2 * gap
    return markers


def _split_region(mask, *, min_marker_px):
    """Regrow UECS markers inside ``mask``.

    Returns the accepted pieces (full extents, may overlap), the owner map (index of the piece
    each pixel is deepest in, -1 for none) and whether any piece was rejected as non-convex.
    """
    depth = ndi.distance_transform_edt(mask)
    markers = _markers(mask, depth)
    several = len(markers) > 1
    seeds = np.zeros(mask.shape, np.int32)
    for i, (marker, _) in enumerate(markers):
        seeds[marker] = i + 1
    share = segmentation.watershed(-depth, seeds, mask=mask) if several else None
    grown = []
    for i, (marker, steps) in enumerate(markers):
        piece, score = _regrow(marker, steps, mask)
        if several:
            # The marker of a split still holds a tail towards the neck that regrowth bulges
            # into the neighbour: erode it 0.3 of its remaining depth more (whole steps,
            # regrown by as many), a larger opening that leaves a round particle as it is ...
            inner = ndi.distance_transform_edt(np.pad(marker, 1))[1:-1, 1:-1]
            extra = np.floor(0.3 * (inner.max() - 1.0))
            if extra >= 1:
                small, small_score = _regrow(inner > extra, steps + extra, mask)
                # ... but rounds corners off: in its own share of the region (watershed on
                # the depth) the particle keeps the plain regrowth
                own = share == i + 1
                piece = small | (piece & own)
                score = np.where(own, score, small_score)
        if piece.sum() >= min_marker_px:
            grown.append((piece, score))
    pieces, scores, rejected = [], [], False
    for piece, score in grown:
        area = int(piece.sum())
        if not _is_convex(piece, area, px=_REJECT_NOTCH_PX, frac=_REJECT_NOTCH_FRAC):
            rejected = True
            continue
        pieces.append(piece)
        scores.append(np.where(piece, score, -np.inf))
    if not pieces:
        return [], np.full(mask.shape, -1), True
    # Pieces that leave much of the region unexplained (the crossing of two rods erodes to
    # one small convex core) are not its particles: the region is an agglomerate.
    uncovered = int(np.count_nonzero(mask & ~np.any(pieces, axis=0)))
    if uncovered > max(min_marker_px, _UNEXPLAINED_FRAC * np.count_nonzero(mask)):
        return [], np.full(mask.shape, -1), True
    scores = np.stack(scores)
    owner = np.where(np.isfinite(scores).any(axis=0), np.argmax(scores, axis=0), -1)
    return pieces, owner, rejected


def _regrow(marker, steps, mask):
    """Dilate ``marker`` back by ``steps`` inside ``mask``: (piece, score = steps - distance)."""
    score = steps + 0.01 - ndi.distance_transform_edt(~marker)  # + 0.01: keep those at steps
    return (score > 0) & mask, score


# -- projected thickness --------------------------------------------------------------------

# A second particle under or over one adds its thickness: two spheres whose centres are less
# than 0.7 contact distances apart (where shape no longer shows a notch) are at least 1.4x as
# thick as one sphere of their width, a cube overlap is a plateau at 2x. Isolated particles
# scatter by 10-20% (noise, blur, size spread), a piece must exceed its reference by both.
_THICK_EXCESS = 0.25
_THICK_Z = 4.0
_THICK_MIN_REFS = 10  # fewer convex references than this: the frame cannot teach the relation
_THICK_NEIGHBOURS = 25  # references on either side in width that make a local reference
_BG_BLOCK = 8


def _thickness_map(image, labels):
    """Projected thickness up to a scale, positive for dark and bright particles alike.

    The background is a normalised convolution of the block means that hold no particle (nor
    a neighbouring block), so it follows uneven illumination. Bright particles (HAADF): the
    signal above background relative to it (linear in thickness). Dark particles
    (bright-field): the absorbance ``-log(I / background)``, which Beer-Lambert makes linear
    in mass-thickness (the plain contrast saturates for heavy particles). Returns None when no
    background is seen.
    """
    b = _BG_BLOCK
    h, w = labels.shape
    hb, wb = -(-h // b), -(-w // b)
    pad = ((0, hb * b - h), (0, wb * b - w))
    finite = np.isfinite(image)
    clean = np.where(finite, image, 0.0)
    fg = np.pad(labels > 0, pad).reshape(hb, b, wb, b).any(axis=(1, 3))
    good = np.pad(finite, pad, constant_values=False).reshape(hb, b, wb, b).all(axis=(1, 3))
    clear = good & ~ndi.maximum_filter(fg, size=3, mode="nearest")
    if not clear.any():
        return None
    means = np.pad(clean, pad).reshape(hb, b, wb, b).mean(axis=(1, 3))
    areas = np.bincount(labels.ravel())[1:]
    radius = np.sqrt(np.median(areas[areas > 0]) / np.pi) if np.any(areas > 0) else 4.0
    sigma = max(2.0, 2.0 * radius / b)
    num = ndi.gaussian_filter(np.where(clear, means, 0.0), sigma, mode="nearest")
    den = ndi.gaussian_filter(clear.astype(float), sigma, mode="nearest")
    # far from any clear block (a crowded corner): the frame's median background
    level = np.where(den > 0.05, num / np.maximum(den, 1e-12), np.median(means[clear]))
    level = np.repeat(np.repeat(level, b, axis=0), b, axis=1)[:h, :w]
    scale = np.abs(level)
    scale = np.where(scale > 0, scale, max(float(np.median(scale)), 1e-12))
    rel = (clean - level) / scale
    fg_rel = rel[labels > 0]
    if not fg_rel.size:
        return None
    if np.median(fg_rel) < 0:
        if np.all(level > 0):  # counts: Beer-Lambert applies
            return -np.log(np.clip(1.0 + rel, 0.02, None))
        return -rel
    return rel


def thickness_excess(labels, image, *, reference, masks=None):
    """How much thicker each particle is than the frame's reference particles of its width.

    A particle's thickness is the peak of the (slightly smoothed) background-subtracted signal
    on its own pixels, sign-normalised and, for dark particles, linearised (absorbance); its
    width is its inscribed diameter. Projected mass-thickness of one convex particle grows in
    proportion to its width, so peak / width is compared with the median of the reference
    particles nearest in width (learnt from the frame: no material or detector constants).

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Particles 1..n.
    image : (M, N) ndarray
        The frame.
    reference : (n + 1,) ndarray of bool
        Particles that stand for one particle each (isolated and convex); index 0 unused.
    masks : dict, optional
        ``label -> (row0, col0, mask)`` full extents of overlapping particles (as in
        :class:`Separation`): pixels two of them share are left out of their peaks, and their
        width comes from the full mask.

    Returns
    -------
    excess : (n + 1,) ndarray of float
        Peak / width relative to the local reference, minus 1 (0.5: 50% thicker); NaN where
        it cannot be judged (too few references, no background).
    z : (n + 1,) ndarray of float
        The same excess in robust standard deviations of the local references.

    Examples
    --------
    >>> yy, xx = np.mgrid[:200, :200]
    >>> def ball(cy, cx, r):
    ...     return np.sqrt(np.clip(r ** 2 - (yy - cy) ** 2 - (xx - cx) ** 2, 0, None))
    >>> centres = [(20 + 40 * (k // 4), 20 + 40 * (k % 4)) for k in range(12)]
    >>> thick = sum(ball(cy, cx, 12) for cy, cx in centres) + ball(180, 180, 12)
    >>> thick += ball(180, 185, 12)  # two balls 5 px apart: one round outline
    >>> labels, n = ndi.label(thick > 0)
    >>> excess, z = thickness_excess(labels, 100 + thick, reference=np.r_[False, [True] * n])
    >>> bool(excess[labels[180, 182]] > 0.35), bool(abs(excess[labels[20, 20]]) < 0.1)
    (True, True)
    """
    labels = np.asarray(labels)
    image = _validate_image(image, labels)
    n = int(labels.max()) if labels.size else 0
    excess = np.full(n + 1, np.nan)
    z = np.full(n + 1, np.nan)
    reference = np.asarray(reference, bool)
    if n == 0 or reference[1:].sum() < _THICK_MIN_REFS:
        return excess, z
    thick = _thickness_map(image, labels)
    if thick is None:
        return excess, z
    masks = masks or {}
    # inscribed radius: distance transform with the borders between labels cut
    p = np.pad(labels, 1)
    inner = labels > 0
    inner &= (p[1:-1, :-2] == labels) & (p[1:-1, 2:] == labels)
    inner &= (p[:-2, 1:-1] == labels) & (p[2:, 1:-1] == labels)
    depth = ndi.distance_transform_edt(inner) + 1.0
    radius = np.zeros(n + 1)
    np.maximum.at(radius, labels[inner], depth[inner])
    cover = np.zeros(labels.shape, np.uint8)
    for lab, (r0, c0, m) in masks.items():
        radius[lab] = ndi.distance_transform_edt(np.pad(m, 1)).max()
        cover[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] += m
    # smoothing a tenth of a typical radius beats pixel noise without flattening a peak
    sigma = max(1.0, 0.1 * float(np.median(radius[1:][radius[1:] > 0])))
    smooth = ndi.gaussian_filter(thick, sigma)
    own = labels > 0
    if masks:
        # a shared lens is thick by nature (two particles), and blur and smoothing carry it a
        # few pixels further: judge split particles on their own pixels clear of it
        reach = int(np.ceil(2 + 2 * sigma))
        own &= ~ndi.maximum_filter(cover >= 2, size=2 * reach + 1)
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, labels[own], smooth[own])
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where((radius >= 1.5) & np.isfinite(peak), peak / (2 * radius), np.nan)
    ref = np.flatnonzero(reference[:n + 1] & np.isfinite(q))
    ref = ref[ref > 0]
    if ref.size < _THICK_MIN_REFS:
        return excess, z
    order = np.argsort(radius[ref])
    ref_r, ref_q = np.log(radius[ref][order]), q[ref][order]
    k = min(_THICK_NEIGHBOURS, (ref.size - 1) // 2)
    windows = np.lib.stride_tricks.sliding_window_view(ref_q, 2 * k + 1)
    med = np.median(windows, axis=1)
    mad = 1.4826 * np.median(np.abs(windows - med[:, None]), axis=1)
    centre_r = ref_r[k:ref_r.size - k]
    ids = np.flatnonzero(np.isfinite(q))
    pos = np.clip(np.searchsorted(centre_r, np.log(radius[ids])), 0, centre_r.size - 1)
    excess[ids] = q[ids] / med[pos] - 1
    z[ids] = (q[ids] - med[pos]) / np.maximum(mad[pos], 1e-12)
    return excess, z


def _drop_thick(sep, plain, image):
    """Report particles clearly thicker than one particle of their width as agglomerates.

    ``plain[k]``: particle ``k`` came from a region that needed no split (a reference).
    """
    labels = sep.labels
    n = int(labels.max())
    if n == 0:
        return sep
    reference = plain
    if plain[1:].sum() < 3 * _THICK_MIN_REFS:
        # a crowded frame (most regions needed a split): every particle is a reference; the
        # local median stands as long as most particles are single
        reference = np.ones(n + 1, bool)
    excess, z = thickness_excess(labels, image, reference=reference, masks=sep.masks)
    thick = (excess > _THICK_EXCESS) & (z > _THICK_Z)
    if not thick.any():
        return sep
    boxes = list(sep.agglomerate_boxes)
    slices = ndi.find_objects(labels)
    for lab in np.flatnonzero(thick):
        if lab in sep.masks:
            r0, c0, m = sep.masks[lab]
            boxes.append((r0, c0, r0 + m.shape[0], c0 + m.shape[1]))
        elif slices[lab - 1] is not None:
            sl = slices[lab - 1]
            boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    keep = ~thick
    keep[0] = True
    new = np.cumsum(keep) - 1  # old label -> new label (background stays 0)
    new[~keep] = 0
    out = new[labels].astype(np.int32)
    masks = {int(new[k]): v for k, v in sep.masks.items() if keep[k]}
    return Separation(out, sep.separated[keep], len(boxes), boxes, masks)


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
