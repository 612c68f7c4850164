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
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError, minkowski_distance
from skimage import morphology, segmentation
from skimage.filters import threshold_otsu
from . import rods
from .rods import unexplained_boxes
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
# Circle fits to free outlines (see _fit_disc): points within max(px, frac × radius) of the
# circle are on it; a fit needs this many points, this fraction of them on it, an arc of at
# least this span, and this fraction of its disc inside the region.
_FIT_TOL_PX = 1.0
_FIT_TOL_FRAC = 0.04
_FIT_MIN_POINTS = 10
_FIT_INLIERS = 0.6
_FIT_MIN_SPAN_DEG = 150.0
_FIT_INSIDE = 0.9
_FIT_TRIALS = 48
# an uncovered pixel joins the nearest piece when the next one is this much farther (px; and
# farther by the piece's equivalent radius, see _fill)
_FILL_MARGIN_PX = 2.0
# ... and lies within this fraction of the piece's inscribed radius of it
_FILL_REACH = 0.3
# the most of an existing piece a disc for a missed particle may cover
_FIT_MAX_LENS = 0.35
# a circle fitted to a split piece's own outline replaces its regrown extent when its disc
# holds this share of the pixels the piece owns (see _round_members)
_ROUND_HOLDS = 0.85
# a sphere beside a rod: the share of the region's outline its circle must hold (about half
# of it for a sphere as wide as a rod is long; a rod's end cap is no sphere, see rods)
_MIXED_INLIERS = 0.3
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
    exact : frozenset of int
        Labels whose extent (mask, or pixels in ``labels`` when the label has no mask) is a
        fitted model of the whole particle: rods split by :func:`rods.rods_instead`, stadiums
        fitted to the outline with an end hidden under a neighbour included. Pass it to
        ``measure(..., exact=...)`` so they are measured as they are, not rebuilt from their
        free outline (which cuts a hidden end short).
    """

    labels: np.ndarray
    separated: np.ndarray
    agglomerates: int = 0
    agglomerate_boxes: list = field(default_factory=list)
    masks: dict = field(default_factory=dict)
    exact: frozenset = field(default_factory=frozenset)


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
    p = _pad1(mask) if edge else mask  # crops usually have a free margin already
    if not edge:
        inner = np.zeros_like(mask)
        inner[1:-1, 1:-1] = (p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2]
                             & p[1:-1, 2:])
        return np.argwhere(mask & ~inner).astype(float)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return np.argwhere(mask & ~inner).astype(float)


def _pad1(a):
    """``a`` with a one-pixel frame of zeros (``np.pad``'s result, without its overhead)."""
    p = np.zeros((a.shape[0] + 2, a.shape[1] + 2), a.dtype)
    p[1:-1, 1:-1] = a
    return p


def _notch_depth(mask):
    return _hull_depth(_boundary_points(mask))


def _hull_depth(pts):
    """Largest distance of ``pts`` inside their convex hull."""
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
    return _is_convex_pts(_boundary_points(mask), area, px=px, frac=frac)


def _is_convex_pts(pts, area, *, px, frac):
    """:func:`_is_convex` from the region's boundary points ``pts``."""
    if area < 12:
        return True
    limit = max(px, frac * np.sqrt(area / np.pi))
    if len(pts) < 4:
        return True
    # Cheap bounds before any hull. Upper: the gap to the support line in 64 directions is
    # never less than the distance to the hull, so a small one proves convexity ...
    proj = pts @ _DIRS
    if float((proj.max(axis=0) - proj).min(axis=1).max()) <= limit:
        return True
    # ... lower: the support points, in angular order, span a polygon inside the hull, so a
    # point deep inside that polygon is at least as deep inside the hull (a clear notch).
    if _support_depth(pts, proj.argmax(axis=0)) > limit:
        return False
    return _hull_depth(pts) <= limit


def _support_depth(pts, idx):
    """Largest depth of ``pts`` inside the polygon of the support points ``pts[idx]``.

    ``idx`` runs around the outline (support points of increasing direction); the polygon lies
    inside the convex hull of ``pts``, so this is a lower bound of the notch depth.
    """
    keep = np.empty(idx.size, bool)
    keep[0] = idx[0] != idx[-1]
    np.not_equal(idx[1:], idx[:-1], out=keep[1:])
    v = pts[idx[keep]]
    if len(v) < 3:
        return 0.0
    nxt = np.empty_like(v)
    nxt[:-1], nxt[-1] = v[1:], v[0]
    e = nxt - v
    # signed distance to each edge line, positive inside whichever way the polygon turns
    turn = float(np.sum(v[:, 0] * nxt[:, 1] - v[:, 1] * nxt[:, 0]))
    scale = (1.0 if turn > 0 else -1.0) / np.sqrt(e[:, 0] ** 2 + e[:, 1] ** 2)
    normal = np.empty((2, len(e)))
    normal[0], normal[1] = -e[:, 1] * scale, e[:, 0] * scale
    offset = (e[:, 0] * v[:, 1] - e[:, 1] * v[:, 0]) * scale
    return float((pts @ normal - offset).min(axis=1).max())


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

    Notes
    -----
    A part of a region no particle explains gets an agglomerate box only when it could be a
    particle (:func:`_particle_boxes`): slivers along a measured particle's edge, and film
    texture standing apart (with ``image``), are no agglomerates.

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
    radius = blocks = None
    if image is not None:
        image = _validate_image(image, labels)
        blocks = _image_blocks(image)  # (what every thickness below needs of the image)
        sep, radius = _drop_thick(sep, plain, image, blocks, min_marker_px=min_marker_px)
    return _particle_boxes(sep, labels, image, radius, blocks)


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
    exact = set()  # labels whose extent is a fitted model (rods)
    plain = [False]  # came from a region that needed no split attempt (a thickness reference)
    areas = np.bincount(labels.ravel())
    round_ = _roundness(labels, areas) > _SKIP_ROUNDNESS
    # Rods touch side by side, end to end and across each other: shapes UECS cannot cut
    # into convex members. A frame whose isolated rods give a width gets a rod split too.
    rod_geometry = rods.rod_geometry_px(labels)
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
        whole = area < 2 * min_marker_px or round_[index + 1] or _is_convex(
            mask, area, px=_SPLIT_NOTCH_PX, frac=_SPLIT_NOTCH_FRAC)
        if whole:
            pieces, owner, rest = [mask], np.where(mask, 0, -1), []
        else:
            pieces, owner, rest = _split_region(mask, min_marker_px=min_marker_px)
        by_rods = None
        if rod_geometry is not None and area >= 2 * min_marker_px:
            by_rods = rods.rods_instead(mask, rod_geometry[0], pieces=pieces, rest=rest,
                                        length_px=rod_geometry[1], min_px=min_marker_px,
                                        fit_disc=_fit_sphere)
            if by_rods is not None:
                pieces, owner, rest, whole = by_rods.pieces, by_rods.owner, by_rods.rest, False
        if whole:
            view[mask] = next_label
            separated.append(False)
            plain.append(True)
            next_label += 1
            continue
        for i, piece in enumerate(pieces):
            view[owner == i] = next_label
            separated.append(len(pieces) > 1)
            plain.append(False)
            if not np.array_equal(piece, owner == i):
                masks[next_label] = (r0, c0, piece)
            if by_rods is not None:
                # a stadium fitted to the outline: its hidden end is the model's, not a guess
                exact.add(next_label)
            next_label += 1
        # every pixel is explained by a particle or lies in an agglomerate's box
        boxes.extend((r0 + a, c0 + b, r0 + c, c0 + d) for a, b, c, d in rest)
    return (Separation(out, np.array(separated, bool), len(boxes), boxes, masks,
                       frozenset(exact)), np.array(plain, bool))


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


_CROSS = ndi.generate_binary_structure(2, 1)  # ndi.label's default, built once
# 4-connected within each erosion level and not at all between levels: one ndi.label call
# labels every level of a region's erosion at once
_LEVELS = np.zeros((3, 3, 3), bool)
_LEVELS[1] = _CROSS


def _erosion_tree(depth):
    """Connected pieces of every erosion level ``depth > s`` (s = 1, 2, ...) of one region.

    Returns the level stack's labels (``lab[s - 1]`` is level ``s``, ids unique over all
    levels and in raster order within each), the bounding box of each level (a function of
    ``s``) and the ids of the pieces each id holds one level deeper, in raster order (index
    0: the pieces of level 1).
    """
    # the number of levels a pixel is in: depth > s for s <= ceil(depth) - 1 (small integers
    # compare faster than the float depth, over the whole stack)
    count = (np.ceil(depth) - 1).astype(np.int16)
    levels = np.arange(1, int(count.max()) + 1, dtype=np.int16)[:, None, None]
    stack = count >= levels
    lab, n = ndi.label(stack, _LEVELS)
    # outline pixels of every level at once: pieces of one level never touch (they would be
    # one piece), so a pixel is on its piece's outline when a 4-neighbour is off the level;
    # the crop's edge counts as off (as _boundary_points pads)
    edge = stack.copy()
    edge[:, 1:-1, 1:-1] &= ~(stack[:, :-2, 1:-1] & stack[:, 2:, 1:-1] & stack[:, 1:-1, :-2]
                             & stack[:, 1:-1, 2:])
    parent = np.zeros(n + 1, np.intp)
    parent[lab[1:][stack[1:]]] = lab[:-1][stack[1:]]
    kids = [[] for _ in range(n + 1)]
    for k in range(1, n + 1):
        kids[parent[k]].append(k)
    rows, cols = count.max(axis=1), count.max(axis=0)
    boxes = {}

    def box(s):
        """Level ``s``'s bounding box with a free pixel around it where the crop has one."""
        if s not in boxes:
            r, c = np.flatnonzero(rows >= s), np.flatnonzero(cols >= s)
            boxes[s] = (slice(max(r[0] - 1, 0), r[-1] + 2), slice(max(c[0] - 1, 0), c[-1] + 2))
        return boxes[s]

    return lab, edge, box, kids


def _level_pieces(lab, box, s, ids):
    """Mask of the pieces ``ids`` of level ``s`` on that level's box, and the box."""
    b = box(s)
    sub = lab[s - 1][b]
    return (sub == ids[0] if len(ids) == 1 else np.isin(sub, ids)), b


def _pieces_convex(lab, edge, box, s, ids, *, px, frac):
    """Convexity test of the union of the level-``s`` pieces ``ids`` on their level's box.

    The boundary points (from the level's outline pixels) come out in crop order and crop
    coordinates, exactly those of the whole-crop mask, at the cost of the box.
    """
    mask, b = _level_pieces(lab, box, s, ids)
    area = int(np.count_nonzero(mask))
    if area < 12:
        return True
    pts = np.argwhere(mask & edge[s - 1][b]).astype(float)
    pts += (b[0].start, b[1].start)
    return _is_convex_pts(pts, area, px=px, frac=frac)


def _markers(mask, depth):
    """Ultimate erosion of convex shapes for one region.

    Returns ``[(marker mask, erosion steps, (row slice, col slice) holding the marker)]``.
    """
    whole = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    if depth.max() <= 1:  # gone at the first step: the region itself is its ultimate remnant
        return [(mask, 0, whole)]
    lab, edge, box, kids = _erosion_tree(depth)
    found = []
    # a piece is the list of its ids at its level; non-convex ones still to erode, with the
    # steps taken so far (None: the whole region, before the first step)
    todo = [(None, 0)]
    while todo:
        piece, s = todo.pop()
        tested, gap = s, 1
        while True:
            s += 1
            core = kids[0] if piece is None else sorted(k for p in piece for k in kids[p])
            n = len(core)
            if n == 0:  # eroded away without becoming convex: its last remnant is the marker
                found.append((piece, s - 1))
                break
            if n > 1:
                # Pixels left on a ragged digital saddle (one or two, or barely deeper than the
                # cut) are crumbs, not particles.
                # (one pass over the level's box: ids of one level are consecutive)
                b = box(s)
                sub = lab[s - 1][b]
                ids = sub[sub > 0] - core[0]
                inside = (ids >= 0) & (ids < core[-1] - core[0] + 1)
                width = core[-1] - core[0] + 1
                sizes = np.bincount(ids[inside], minlength=width)
                deep = np.bincount(ids[inside & (depth[b][sub > 0] >= s + 0.5)],
                                   minlength=width)
                real = [k for k in core if deep[k - core[0]] and sizes[k - core[0]] > 2]
                if len(real) <= 1:
                    piece = real if real else core
                    continue
                for k in real:
                    if _pieces_convex(lab, edge, box, s, [k], px=_SPLIT_NOTCH_PX,
                                      frac=_SPLIT_NOTCH_FRAC):
                        found.append(([k], s))
                    else:
                        todo.append(([k], s))
                break
            piece = core
            # Between splits a notch keeps its depth while the piece shrinks, so it only turns
            # convex when a small dent erodes away: test on a doubling schedule.
            if s >= tested + gap:
                if _pieces_convex(lab, edge, box, s, core, px=_SPLIT_NOTCH_PX,
                                  frac=_SPLIT_NOTCH_FRAC):
                    found.append((core, s))
                    break
                tested, gap = s, 2 * gap
    markers = []
    for piece, steps in found:
        if piece is None:
            markers.append((mask, steps, whole))
            continue
        # a marker's pieces lie on the level of its steps
        m, b = _level_pieces(lab, box, steps, piece)
        r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        r0, c0 = b[0].start, b[1].start
        marker = np.zeros(mask.shape, bool)
        marker[b] = m
        markers.append((marker, steps, (slice(r0 + r[0], r0 + r[-1] + 1),
                                        slice(c0 + c[0], c0 + c[-1] + 1))))
    return markers


def _split_region(mask, *, min_marker_px):
    """Regrow UECS markers inside ``mask``.

    Returns the accepted pieces (full extents, may overlap), the owner map (index of the piece
    each pixel is deepest in, -1 for none) and the boxes ``(row0, col0, row1, col1)`` of what
    no piece explains (the whole region when it is an agglomerate).
    """
    depth = ndi.distance_transform_edt(mask)
    markers = _markers(mask, depth)
    several = len(markers) > 1
    share = None
    grown = []
    for i, (marker, steps, box) in enumerate(markers):
        extra = 0.0
        if several:
            # The marker of a split still holds a tail towards the neck that regrowth bulges
            # into the neighbour: erode it 0.3 of its remaining depth more (whole steps,
            # regrown by as many), a larger opening that leaves a round particle as it is ...
            inner = ndi.distance_transform_edt(_pad1(marker[box]))[1:-1, 1:-1]
            extra = np.floor(0.3 * (inner.max() - 1.0))
        # every pixel regrowth can reach lies within steps (+ extra) of the marker's box
        reach = _grow_box(box, steps + extra, mask.shape)
        piece, score = _regrow(marker, steps, mask, reach)
        if extra >= 1:
            core = np.zeros(mask.shape, bool)
            core[box] = inner > extra
            small, small_score = _regrow(core, steps + extra, mask, reach)
            # ... but rounds corners off: in its own share of the region (watershed on
            # the depth) the particle keeps the plain regrowth (the watershed only when a
            # marker needs it: small markers have no extra steps)
            if share is None:
                seeds = np.zeros(mask.shape, np.int32)
                for k, (m, _, _) in enumerate(markers):
                    seeds[m] = k + 1
                share = segmentation.watershed(-depth, seeds, mask=mask)
            own = share == i + 1
            piece = small | (piece & own)
            score = np.where(own, score, small_score)
        if np.count_nonzero(piece[reach]) >= min_marker_px:
            grown.append((piece, score, reach))
    pieces, scores = [], []
    for piece, score, reach in grown:
        # on the box regrowth stays in (the same boundary points, in crop coordinates)
        sub = piece[reach]
        area = int(np.count_nonzero(sub))
        pts = _boundary_points(sub) if area >= 12 else None
        if pts is not None:
            pts += (reach[0].start, reach[1].start)
        # a piece still clearly not convex is not one particle: its pixels stay unexplained
        if _is_convex_pts(pts, area, px=_REJECT_NOTCH_PX, frac=_REJECT_NOTCH_FRAC):
            pieces.append(piece)
            scores.append(np.where(piece, score, -np.inf))
    if len(pieces) > 1:
        pieces, scores = _round_members(mask, pieces, scores, min_marker_px=min_marker_px)
    pieces, scores, rest = _explain(mask, pieces, scores, min_marker_px=min_marker_px)
    whole = [(0, 0) + mask.shape]
    if not pieces:
        return [], np.full(mask.shape, -1), whole
    # Pieces that leave much of the region unexplained (the crossing of two rods erodes to
    # one small convex core) are not its particles: the region is an agglomerate.
    covered = np.any(pieces, axis=0)
    uncovered = int(np.count_nonzero(mask & ~covered))
    if uncovered > max(min_marker_px, _UNEXPLAINED_FRAC * np.count_nonzero(mask)):
        return [], np.full(mask.shape, -1), whole
    if len(pieces) > 1:  # (after that test: it judges what UECS explained)
        outline = mask & ~ndi.binary_erosion(mask)
        pieces, scores = _fill_and_trim(mask, pieces, scores, rest, outline)
    scores = np.stack(scores)
    owner = np.where(np.isfinite(scores).any(axis=0), np.argmax(scores, axis=0), -1)
    return pieces, owner, rest


def _round_members(mask, pieces, scores, *, min_marker_px):
    """Round split particles' full extents from the circle of their own free outline.

    Two overlapping spheres project to two discs, and the outline of their union is an arc
    of each. Regrowth of an ultimate-erosion marker does not recover a member's disc: the
    eroded union keeps a tail towards the neck (between two discs the background is farther
    than from either one alone), and that tail, dilated back, carries the piece across the
    neck along its neighbour's outline, so overlapping pieces come out larger than their
    particles (by 5-15% in diameter for small, blurred spheres). Where the region's outline
    pixels a piece owns (deepest in it) lie on one circle (:func:`_fit_disc`: a consensus
    that leaves out the neighbour's arc beyond the neck), the piece becomes that disc within
    the region. A fit is taken only when its disc holds nearly all of the piece's own pixels,
    its centre lies in them (the circle is the piece's, not a neighbour's or a sliver's) and
    it leaves no new part of the region unexplained (:func:`.rods.unexplained_boxes`); cubes, rods
    and ragged outlines fail the fit and keep their regrown extent.

    Returns the new ``pieces`` and ``scores`` (score: depth inside the piece, -inf outside).
    """
    outline = np.argwhere(mask & ~ndi.binary_erosion(mask))
    stack = np.stack(scores)
    best = np.argmax(stack, axis=0)
    owned = np.isfinite(stack.max(axis=0))
    at = best[outline[:, 0], outline[:, 1]]
    on = owned[outline[:, 0], outline[:, 1]]
    pieces, scores = list(pieces), list(scores)
    # the parts left unexplained must not grow: the blur-filled neck between two spheres and
    # pixelation are slivers, but a bump of the outline that the circle leaves out (and the
    # regrown piece held) would be reported as an agglomerate
    unexplained = None  # (counted when a fit first needs it)
    for i in range(len(pieces)):
        own = (best == i) & owned
        disc = _fit_disc_at(outline[on & (at == i)], mask)
        if disc is None:
            continue
        piece, score, box = disc
        cy, cx = _centre(piece, box)
        if not own[cy, cx] or (np.count_nonzero(piece & own)
                               < _ROUND_HOLDS * np.count_nonzero(own)):
            continue
        trial = pieces[:i] + [piece] + pieces[i + 1:]
        left = mask & ~np.any(trial, axis=0)
        # every unexplained part holds at least min_marker_px pixels and a pixel deeper than
        # the fillets: where no pixel is, none can be added (the usual case, checked without
        # the parts); fewer pixels left than one more part needs cannot add one either
        n_left = np.count_nonzero(left)
        deep = _deep_pixels(left) if n_left >= min_marker_px else None
        islands = ndi.label(deep)[1] if deep is not None and deep.any() else 0
        if islands:
            if unexplained is None:  # (the pieces as they came: none replaced before this)
                unexplained = _count_unexplained(mask & ~np.any(pieces, axis=0), min_marker_px)
            # each part holds its own island of deep pixels: no more parts than islands
            if (islands > unexplained and n_left >= (unexplained + 1) * min_marker_px
                    and _count_unexplained(left, min_marker_px, deep) > unexplained):
                continue
        pieces[i], scores[i] = piece, score
    return pieces, scores


# the pixels within rods._REST_DEPTH_PX of a pixel (Euclidean): it lies deeper than that in a
# part when all of them are in it
_REST_REACH = int(np.floor(rods._REST_DEPTH_PX))
_yy, _xx = np.mgrid[-_REST_REACH:_REST_REACH + 1, -_REST_REACH:_REST_REACH + 1]
_REST_DISC = _yy ** 2 + _xx ** 2 <= rods._REST_DEPTH_PX ** 2
del _yy, _xx


def _has_deep_pixel(rest):
    """Whether a pixel of ``rest`` lies deeper than ``rods._REST_DEPTH_PX`` in it.

    Outside the array counts as outside ``rest``, as in :func:`.rods.unexplained_boxes`,
    which boxes only parts that hold such a pixel: without one, it boxes none.
    """
    return bool(ndi.binary_erosion(rest, _REST_DISC, border_value=0).any())


def _deep_pixels(rest):
    """The pixels deeper than ``rods._REST_DEPTH_PX`` in ``rest`` (outside it and the array).

    Every part :func:`.rods.unexplained_boxes` boxes holds at least one of them, and no two
    parts share one: their connected sets (islands) bound the number of boxes from above.
    A pixel's distance to the nearest pixel off ``rest`` exceeds the depth exactly when every
    pixel of the disc of that radius around it is in ``rest`` (squared distances are whole
    numbers): the erosion by that disc.
    """
    return ndi.binary_erosion(rest, _REST_DISC, border_value=0)


def _count_unexplained(rest, min_px, deep=None):
    """``len(rods.unexplained_boxes(rest, min_px))``: the parts of ``rest`` (4-connected)
    of at least ``min_px`` pixels that hold a pixel of ``deep`` (:func:`_deep_pixels`, of
    ``rest`` when not given). One labelling and two bincounts instead of the boxes' distance
    transform, per-part maxima and bounding boxes, where only their number is needed.
    """
    if np.count_nonzero(rest) < min_px:
        return 0
    if deep is None:
        deep = _deep_pixels(rest)
    if not deep.any():
        return 0
    lab, n = ndi.label(rest)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    holds = np.bincount(lab[deep], minlength=n + 1) > 0
    return int(np.count_nonzero((sizes[1:] >= min_px) & holds[1:]))


def _unexplained(rest, min_px):
    """:func:`.rods.unexplained_boxes`, skipped (no box) where :func:`_has_deep_pixel` says
    it would find none."""
    if np.count_nonzero(rest) < min_px or not _has_deep_pixel(rest):
        return []
    return unexplained_boxes(rest, min_px)


def _explain(mask, pieces, scores, *, min_marker_px):
    """Round particles' full extents from their free outline; particles UECS left out.

    UECS regrowth guesses where overlapping particles end inside their shared area and it
    misses a particle whose neck blur has filled in (a small sphere on a large one erodes
    away inside the large one's marker). A substantial part of the region that no piece
    covers gets the disc fitted to its own free outline (the region's outline pixels on and
    next to it) when that outline is a circle: the missed particle's full extent. Shapes
    that are not round (cubes, rods, two particles in one part) fail the fit; what stays
    unexplained is reported by the caller.

    Returns the new ``pieces`` and ``scores`` (score: depth inside the piece, -inf outside)
    and the boxes of what is still unexplained (:func:`.rods.unexplained_boxes`).
    """
    covered = np.any(pieces, axis=0) if pieces else np.zeros(mask.shape, bool)
    rest = mask & ~covered
    boxes = _unexplained(rest, min_marker_px)
    if not boxes:
        return pieces, scores, []  # UECS explained the region: its pieces stand
    pts = np.argwhere(mask & ~ndi.binary_erosion(mask))  # the region's outline pixels
    pieces, scores = list(pieces), list(scores)
    added = False
    for r0, c0, r1, c1 in boxes:
        part = np.zeros(mask.shape, bool)
        part[r0:r1, c0:c1] = rest[r0:r1, c0:c1]
        # the part's own free outline, and a few pixels on where its arc runs on
        near = ((pts[:, 0] >= r0 - 2) & (pts[:, 0] < r1 + 2) & (pts[:, 1] >= c0 - 2)
                & (pts[:, 1] < c1 + 2))
        disc = _fit_disc_at(pts[near], mask)
        if disc is None:
            continue
        piece, score, box = disc
        new = np.count_nonzero(piece & ~covered)
        # a missed particle overlaps its neighbours by a lens, never by much of one (a disc
        # through a rod's end cap that swallows its neighbour is not a particle)
        lens = max((np.count_nonzero(piece & q) / max(np.count_nonzero(q), 1)
                    for q in pieces), default=0.0)
        # and its centre lies outside them (overlaps are shallow lenses)
        cy, cx = _centre(piece, box)
        if (not covered[cy, cx] and np.count_nonzero(piece) >= min_marker_px
                and new >= 0.3 * np.count_nonzero(piece)
                and np.count_nonzero(piece & part) >= 0.6 * np.count_nonzero(part)
                and lens <= _FIT_MAX_LENS):
            pieces.append(piece)
            scores.append(score)
            covered |= piece
            added = True
    return pieces, scores, (_unexplained(mask & ~covered, min_marker_px) if added
                            else boxes)


def _fill_and_trim(mask, pieces, scores, rest, outline):
    """Make split particles' full extents meet the region's outline exactly where it is theirs.

    Regrowth of a UECS marker guesses where a particle ends. It falls short of the region's
    outline where erosion and regrowth round a corner off (cubes) or where the marker sits
    off its particle's centre (the erosion of two overlapping spheres leaves markers pulled
    towards the neck), and there it overshoots along the neighbour's outline. The outline is
    what :func:`~particlewatch.analysis.measure.measure` reads a split particle's size from
    (its *free* outline, facing the background), so each outline pixel must belong to one
    particle only:

    - *fill*: region pixels no piece covers, clearly nearer to one piece than to any other
      (by ``_FILL_MARGIN_PX`` and by the piece's equivalent radius; the blur-filled neck
      between two particles, and its concave flanks, are near both and stay out), within ``_FILL_REACH`` of its inscribed radius (a rounded-off corner; a
      spur of a ragged outline reaches farther) and outside the boxes ``rest`` of
      unexplained parts, join that piece;
    - *trim*: an outline pixel of the region covered by several pieces stays only in the
      one it lies deepest in (the owner in the label image); inside the region overlapping
      pieces still share their lens.

    ``outline``: the region's outline pixels (``mask`` minus its erosion).
    """
    pieces, scores = list(pieces), list(scores)
    cover = np.sum(pieces, axis=0)
    uncovered = mask & (cover == 0)
    shared = outline & (cover > 1)
    if not uncovered.any() and not shared.any():
        return pieces, scores
    # no farther than erosion and regrowth round a corner off (0.41 of a square's inscribed
    # radius; the equivalent radius stands in for it): a spur of a ragged outline stays out
    reach = _FILL_REACH * np.sqrt(np.array([np.count_nonzero(p) for p in pieces]) / np.pi)
    if uncovered.any():
        pieces, scores = _fill(mask, pieces, scores, rest, uncovered, reach)
    rr, cc = np.nonzero(shared)
    if not rr.size:
        return pieces, scores
    # the owner of each shared outline pixel: the piece it lies deepest in
    owner = np.argmax([sc[rr, cc] for sc in scores], axis=0)
    for i in range(len(pieces)):
        drop = pieces[i][rr, cc] & (owner != i)
        if drop.any():
            pieces[i] = pieces[i].copy()
            pieces[i][rr[drop], cc[drop]] = False
            scores[i] = scores[i].copy()
            scores[i][rr[drop], cc[drop]] = -np.inf
    return pieces, scores


def _fill(mask, pieces, scores, rest, uncovered, reach):
    """The *fill* of :func:`_fill_and_trim`: ``uncovered`` pixels join the nearest piece.

    A pixel within ``reach[i]`` of piece ``i`` joins it when every other piece is farther by
    more than ``_FILL_MARGIN_PX`` and by more than piece ``i``'s equivalent radius: near the
    neighbour the uncovered pixels are the blur-filled concavity where the two outlines meet,
    not a corner regrowth rounded off (filled there, split cubes measured ~2% larger than
    isolated ones; only the corners facing away from the neighbour are filled).
    """
    free = uncovered.copy()
    for r0, c0, r1, c1 in rest:
        free[r0:r1, c0:c1] = False
    if not free.any():
        return pieces, scores
    margin = np.maximum(_FILL_MARGIN_PX, reach / _FILL_REACH)
    # each piece's distance map over the crop, once: the distance of a pixel to it (exact
    # Euclidean, the same on the crop as on any box that holds the piece)
    dist = [ndi.distance_transform_edt(~p) for p in pieces]
    for i, piece in enumerate(pieces):
        # the pixels within reach of the piece (all that may join it)
        cand = np.argwhere(free & (dist[i] <= reach[i]))
        if not cand.size:
            continue
        di = dist[i][cand[:, 0], cand[:, 1]]
        ok = np.ones(len(cand), bool)
        for j, dj in enumerate(dist):
            if j != i:
                ok &= dj[cand[:, 0], cand[:, 1]] - di > margin[i]
        if ok.any():
            rr, cc = cand[ok].T
            pieces[i] = pieces[i].copy()
            pieces[i][rr, cc] = True
            scores[i] = scores[i].copy()
            scores[i][rr, cc] = -di[ok]
    return pieces, scores


def _fit_disc(pts, mask, *, inliers=_FIT_INLIERS, radius_range=None):
    """:func:`_fit_disc_at` without the disc's box: ``(disc & mask, score)`` or None."""
    fit = _fit_disc_at(pts, mask, inliers=inliers, radius_range=radius_range)
    return None if fit is None else fit[:2]


def _centre(piece, box):
    """``np.round(np.argwhere(piece).mean(axis=0)).astype(int)`` of a non-empty ``piece``
    whose pixels all lie in ``box`` ``(row0, col0, row1, col1)``, reading only the box.

    The same value to the bit: the mean of whole numbers is their exact sum over the count
    (float64 holds these sums exactly), whichever pixels are summed first.
    """
    r0, c0, r1, c1 = box
    pos = np.argwhere(piece[r0:r1, c0:c1])
    n = len(pos)
    total = pos.sum(axis=0) + np.array([r0, c0]) * n
    return np.round(total.astype(float) / n).astype(int)


def _fit_disc_at(pts, mask, *, inliers=_FIT_INLIERS, radius_range=None):
    """The disc whose circle runs through most of the outline points ``pts``, or None.

    A consensus over circles through point triples (a few dozen, vectorised: RANSAC's
    idea at a fraction of ``skimage.measure.ransac``'s cost on these small sets) picks the
    points of one circle; ``CircleModel`` refines on them. Accepted when most points lie on
    it (at least the fraction ``inliers``), they span a good part of it, and the disc lies
    inside the region ``mask`` (a circle through a true outline does). Returns ``(disc & mask, score,
    box)``, score the depth inside the disc (-inf outside it), box ``(row0, col0, row1, col1)``
    holding the disc. ``radius_range`` ``(lo, hi)``: only circles of a radius in
    it are candidates (a sphere among rods: wider than a rod's end cap, no wider than the
    region holds), so a circle through a rod's straight side cannot win the vote.
    """
    n = len(pts)
    if n < _FIT_MIN_POINTS:
        return None
    p = pts.astype(float)
    a, b, c = (p[i] for i in _triples(n))
    d = 2 * (a[:, 0] * (b[:, 1] - c[:, 1]) + b[:, 0] * (c[:, 1] - a[:, 1])
             + c[:, 0] * (a[:, 1] - b[:, 1]))
    ok = np.abs(d) > 1e-9
    if not ok.any():
        return None
    a, b, c, d = a[ok], b[ok], c[ok], d[ok]
    sa, sb, sc = (np.sum(v * v, axis=1) for v in (a, b, c))
    uy = (sa * (b[:, 1] - c[:, 1]) + sb * (c[:, 1] - a[:, 1]) + sc * (a[:, 1] - b[:, 1])) / d
    ux = (sa * (c[:, 0] - b[:, 0]) + sb * (a[:, 0] - c[:, 0]) + sc * (b[:, 0] - a[:, 0])) / d
    r = np.hypot(a[:, 0] - uy, a[:, 1] - ux)
    dist = np.hypot(p[:, 0][None] - uy[:, None], p[:, 1][None] - ux[:, None])
    tol = np.maximum(_FIT_TOL_PX, _FIT_TOL_FRAC * r)[:, None]
    votes = (np.abs(dist - r[:, None]) < tol).sum(axis=1)
    if radius_range is not None:
        votes[(r < radius_range[0]) | (r > radius_range[1])] = 0
        if not votes.any():
            return None
    best = int(np.argmax(votes))
    inl = np.abs(dist[best] - r[best]) < tol[best, 0]
    if inl.sum() < _FIT_MIN_POINTS:
        return None
    model = _circle(p[inl])
    if model is None:
        return None
    (cy, cx), radius = model
    res = np.abs(np.hypot(p[:, 0] - cy, p[:, 1] - cx) - radius)
    inl = res < max(_FIT_TOL_PX, _FIT_TOL_FRAC * radius)
    if inl.mean() < inliers or radius < 2:
        return None
    # the points must go round: the widest angular gap between them at most 360° - span
    ang = np.sort(np.arctan2(p[inl, 0] - cy, p[inl, 1] - cx))
    gap = np.max(np.diff(np.append(ang, ang[0] + 2 * np.pi)))
    if gap > 2 * np.pi - np.deg2rad(_FIT_MIN_SPAN_DEG):
        return None
    # boundary pixel centres lie half a pixel inside the edge on average
    rr = radius + 0.5
    r0, r1 = max(int(cy - rr) - 1, 0), min(int(cy + rr) + 2, mask.shape[0])
    c0, c1 = max(int(cx - rr) - 1, 0), min(int(cx + rr) + 2, mask.shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    yy, xx = np.ogrid[r0:r1, c0:c1]
    inside = rr - np.hypot(yy - cy, xx - cx)
    disc = inside > 0
    n_disc = np.count_nonzero(disc)
    if not n_disc or np.count_nonzero(disc & mask[r0:r1, c0:c1]) < _FIT_INSIDE * n_disc:
        return None
    piece = np.zeros(mask.shape, bool)
    piece[r0:r1, c0:c1] = disc & mask[r0:r1, c0:c1]
    score = np.full(mask.shape, -np.inf)
    score[r0:r1, c0:c1] = np.where(piece[r0:r1, c0:c1], inside, -np.inf)
    return piece, score, (r0, c0, r1, c1)


@lru_cache(maxsize=1024)
def _triples(n):
    """Indices of the ``_FIT_TRIALS`` point triples :func:`_fit_disc` draws from ``n`` points.

    Seeded by ``n`` (deterministic for given points) and drawn once per ``n``: a generator
    costs more than the fit's arithmetic on these small sets.
    """
    rng = np.random.default_rng(n)
    out = tuple(rng.integers(0, n, _FIT_TRIALS) for _ in range(3))
    for i in out:
        i.flags.writeable = False  # shared between calls
    return out


def _circle(p):
    """``CircleModel.from_estimate(p)``'s ``(centre, radius)``, or None where it fails.

    The same algebraic (Kåsa) least-squares fit, step for step and so to the last bit, without
    the model framework's per-call overhead (a third of :func:`_fit_disc`'s time, called
    ~1,000 times per frame). ``tests/test_separate.py`` checks it against ``CircleModel``.
    """
    origin = p.mean(axis=0)
    data = p - origin
    scale = data.std()
    if scale < np.finfo(float).tiny:
        return None
    data /= scale
    a = np.append(data * 2, np.ones((data.shape[0], 1)), axis=1)
    f = np.sum(data ** 2, axis=1)
    coef, _, rank, _ = np.linalg.lstsq(a, f, rcond=None)
    if rank != 3:
        return None
    centre = coef[0:2]
    r = np.sqrt(np.mean(minkowski_distance(centre, data) ** 2))
    return centre * scale + origin, float(r * scale)


def _fit_sphere(pts, mask, radius_range):
    """:func:`_fit_disc` for a sphere touching rods (``rods.rods_and_discs``).

    The sphere's arc is only part of its region's outline (the rest is the rods'), so the
    circle needs no majority of the points: ``_MIXED_INLIERS`` of them, and the arc span
    and inside tests of every fit.
    """
    return _fit_disc(pts, mask, inliers=_MIXED_INLIERS, radius_range=radius_range)


def _grow_box(box, by, shape):
    """``box`` widened by ``by`` pixels (and one more), clipped to ``shape``."""
    m = int(np.ceil(by)) + 1
    return (slice(max(box[0].start - m, 0), min(box[0].stop + m, shape[0])),
            slice(max(box[1].start - m, 0), min(box[1].stop + m, shape[1])))


def _regrow(marker, steps, mask, box):
    """Dilate ``marker`` back by ``steps`` inside ``mask``: (piece, score = steps - distance).

    ``box`` holds the marker and every pixel within ``steps`` of it; the distance map is taken
    there only (exact: all the marker's pixels are inside), the score is -inf outside.
    """
    score = np.full(mask.shape, -np.inf)
    # + 0.01: keep those at steps
    score[box] = steps + 0.01 - ndi.distance_transform_edt(~marker[box])
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


def _thickness_map(image, labels, rows, cols, own, background=None):
    """Projected thickness up to a scale at the pixels ``(rows, cols)``, or None.

    Positive for dark and bright particles alike. The background is a normalised convolution
    of the block means that hold no particle (nor a neighbouring block), so it follows uneven
    illumination. Bright particles (HAADF): the signal above background relative to it (linear
    in thickness). Dark particles (bright-field): the absorbance ``-log(I / background)``, which
    Beer-Lambert makes linear in mass-thickness (the plain contrast saturates for heavy
    particles). Returns None when no background is seen. Only the requested pixels are
    computed (the particles' neighbourhoods, not the whole frame). ``own`` marks the
    requested pixels that hold every labelled pixel of the frame exactly once: the polarity
    (median over the particles) is read from them. ``background``: :func:`_background` of
    ``image`` and ``labels``, when the caller has it already (it is most of the cost).
    """
    if background is None:
        background = _background(_image_blocks(image), labels)
    if background is None:
        return None
    level, fallback = background
    b = _BG_BLOCK
    lv = level[rows // b, cols // b]
    scale = np.abs(lv)
    if fallback is not None:
        scale = np.where(scale > 0, scale, fallback)
    v = image[rows, cols]
    rel = (np.where(np.isfinite(v), v, 0.0) - lv) / scale
    fg_rel = rel[own]
    if not fg_rel.size:
        return None
    if np.median(fg_rel) < 0:
        if np.all(level > 0):  # counts: Beer-Lambert applies
            return -np.log(np.clip(1.0 + rel, 0.02, None))
        return -rel
    return rel


def _image_blocks(image):
    """The frame's ``_BG_BLOCK``² blocks: which hold only finite pixels, and their means.

    What :func:`_background` needs of the image alone: computed once per frame.
    """
    b = _BG_BLOCK
    h, w = image.shape
    hb, wb = -(-h // b), -(-w // b)
    pad = ((0, hb * b - h), (0, wb * b - w))

    def blocks(a):  # a as (hb, b, wb, b) blocks, padded with zeros (no copy when it fits)
        return (np.pad(a, pad) if pad[0][1] or pad[1][1] else a).reshape(hb, b, wb, b)

    finite = np.isfinite(image)
    # (reduced one block axis at a time, the last one first: contiguous, several times faster)
    good = blocks(finite).all(axis=3).all(axis=1)
    means = blocks(np.where(finite, image, 0.0)).mean(axis=(1, 3))
    return good, means


def _background_radius(labels):
    """The typical particle radius (px) that sets :func:`_background`'s smoothing."""
    areas = np.bincount(labels.ravel())[1:]
    return np.sqrt(np.median(areas[areas > 0]) / np.pi) if np.any(areas > 0) else 4.0


def _background(blocks, labels, radius=None):
    """``(level, fallback)`` of :func:`_thickness_map`'s background, or None when none is seen.

    ``level``: the background per ``_BG_BLOCK``² block, a normalised convolution of the means
    of the clear blocks (:func:`_image_blocks`' ``blocks``: no particle in or next to them);
    ``fallback``: the frame's median |background|, standing in for a zero level (None when
    there is none). ``radius``: :func:`_background_radius` of ``labels`` when known.
    """
    good, means = blocks
    b = _BG_BLOCK
    h, w = labels.shape
    hb, wb = good.shape
    pad = ((0, hb * b - h), (0, wb * b - w))
    fg = labels > 0
    fg = (np.pad(fg, pad) if pad[0][1] or pad[1][1] else fg).reshape(hb, b, wb, b)
    fg = fg.any(axis=3).any(axis=1)
    clear = good & ~ndi.maximum_filter(fg, size=3, mode="nearest")
    if not clear.any():
        return None
    radius = _background_radius(labels) if radius is None else radius
    sigma = max(2.0, 2.0 * radius / b)
    num = ndi.gaussian_filter(np.where(clear, means, 0.0), sigma, mode="nearest")
    den = ndi.gaussian_filter(clear.astype(float), sigma, mode="nearest")
    # far from any clear block (a crowded corner): the frame's median background
    level = np.where(den > 0.05, num / np.maximum(den, 1e-12), np.median(means[clear]))
    fallback = None
    if not np.all(level != 0):  # the frame's median |background| stands in for a zero one
        full = np.repeat(np.repeat(np.abs(level), b, axis=0), b, axis=1)[:h, :w]
        fallback = max(float(np.median(full)), 1e-12)
    return level, fallback


def _pack(boxes):
    """Shelf-pack boxes ``(row0, col0, row1, col1)`` side by side into one mosaic.

    Returns the top-left corner of each box in the mosaic and the mosaic's shape. Filters run
    on the mosaic instead of the whole frame (particles cover a fifth of it); a pixel whose
    filter window stays inside its own box gets exactly the frame's value.
    """
    sizes = np.array([(r1 - r0, c1 - c0) for r0, c0, r1, c1 in boxes], int).reshape(-1, 2)
    width = max(int(sizes[:, 1].max(initial=1)), int(np.sqrt(np.prod(sizes, axis=1).sum())))
    corners = np.zeros((len(boxes), 2), int)
    y = x = shelf = 0
    for k in np.argsort(-sizes[:, 0], kind="stable"):
        hh, ww = sizes[k]
        if x + ww > width:
            y, x, shelf = y + shelf, 0, 0
        corners[k] = y, x
        x += ww
        shelf = max(shelf, hh)
    return corners, (max(y + shelf, 1), width)


def _reflect(index, n):
    """Frame index of ``index`` under scipy.ndimage's default ``reflect`` boundary mode."""
    index = np.where(index < 0, -index - 1, index)
    return np.where(index >= n, 2 * n - index - 1, index)


def _inscribed_radii(labels, slices, masks, n, only=None):
    """Inscribed radius (px) of every label: 1 + the largest distance inside its interior.

    The interior leaves out pixels with a 4-neighbour of another label (borders between
    touching labels are cut); particles in ``masks`` take their full extent's radius. One
    distance transform on a mosaic of the particles' boxes (1 px margin). A label's radius
    depends on its own pixels (or mask) only: ``only`` (a set of labels) computes those and
    leaves the others 0, for labels that changed since the rest were computed.
    """
    boxes, owner, full = [], [], {}
    for k, sl in enumerate(slices):
        lab = k + 1
        if only is not None and lab not in only:
            continue
        if lab in masks:
            # on the mask's own box (a split particle's mask may span its whole group):
            # the background ring around the box holds every pixel's nearest background
            r0, c0, m = masks[lab]
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if not rows.size:
                continue
            m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            r0, c0 = r0 + rows[0], c0 + cols[0]
            full[lab] = m
            boxes.append((r0 - 1, c0 - 1, r0 + m.shape[0] + 1, c0 + m.shape[1] + 1))
        elif sl is not None:
            boxes.append((sl[0].start - 1, sl[1].start - 1, sl[0].stop + 1, sl[1].stop + 1))
        else:
            continue
        owner.append(lab)
    radius = np.zeros(n + 1)
    if not boxes:
        return radius
    corners, shape = _pack(boxes)
    inside = np.zeros(shape, bool)
    tile = np.zeros(shape, np.int32)
    lp = np.pad(labels, 1)
    for lab, (r0, c0, r1, c1), (y, x) in zip(owner, boxes, corners):
        view = (slice(y, y + r1 - r0), slice(x, x + c1 - c0))
        tile[view] = lab
        if lab in full:
            inside[y + 1:y + r1 - r0 - 1, x + 1:x + c1 - c0 - 1] = full[lab]
            continue
        # the box with its 1 px margin, from the frame padded by 1 (outside is background)
        crop = lp[r0 + 1:r1 + 1, c0 + 1:c1 + 1]
        own = crop == lab
        own[1:-1, 1:-1] &= ((crop[1:-1, :-2] == lab) & (crop[1:-1, 2:] == lab)
                            & (crop[:-2, 1:-1] == lab) & (crop[2:, 1:-1] == lab))
        own[[0, -1]] = False
        own[:, [0, -1]] = False
        inside[view] = own
    depth = ndi.distance_transform_edt(inside)
    # interior pixels are one step inside the outline; a full mask's own pixels are not
    step = np.ones(n + 1)
    step[list(masks)] = 0.0
    owner = tile[inside]
    np.maximum.at(radius, owner, depth[inside] + step[owner])
    return radius


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
    excess, z, _ = _excess(labels, image, np.asarray(reference, bool), masks or {})
    return excess, z


def _excess(labels, image, reference, masks, *, blocks=None, background=None, radius=None):
    """:func:`thickness_excess`, and the inscribed radii (None where it stopped before them).

    What the caller already has is reused, to the same values: ``blocks``
    (:func:`_image_blocks` of ``image``), ``background`` (:func:`_background` of the image and
    ``labels``) and ``radius`` (:func:`_inscribed_radii` of ``labels`` and ``masks``).
    """
    n = int(labels.max()) if labels.size else 0
    excess = np.full(n + 1, np.nan)
    z = np.full(n + 1, np.nan)
    if n == 0 or reference[1:].sum() < _THICK_MIN_REFS:
        return excess, z, None
    slices = ndi.find_objects(labels)
    if radius is None:
        radius = _inscribed_radii(labels, slices, masks, n)
    # smoothing a tenth of a typical radius beats pixel noise without flattening a peak
    sigma = max(1.0, 0.1 * float(np.median(radius[1:][radius[1:] > 0])))
    # a shared lens is thick by nature (two particles), and blur and smoothing carry it a
    # few pixels further: split particles are judged on their own pixels clear of it
    reach = int(np.ceil(2 + 2 * sigma))
    # each particle's box with a margin that holds its smoothing and lens windows: the
    # mosaic gives the same values on its pixels as filtering the whole frame
    margin = max(int(4.0 * sigma + 0.5), reach if masks else 0)
    boxes = [(sl[0].start - margin, sl[1].start - margin, sl[0].stop + margin,
              sl[1].stop + margin) for sl in slices if sl is not None]
    tiles = [k + 1 for k, sl in enumerate(slices) if sl is not None]
    corners, shape = _pack(boxes)
    rows = np.zeros(shape, np.intp)
    cols = np.zeros(shape, np.intp)
    tile = np.zeros(shape, np.int32)
    h, w = labels.shape
    for lab, (r0, c0, r1, c1), (y, x) in zip(tiles, boxes, corners):
        rr, cc = np.arange(r0, r1), np.arange(c0, c1)
        # (mirrored only where the box with its margin leaves the frame)
        rows[y:y + r1 - r0, x:x + c1 - c0] = (rr if r0 >= 0 and r1 <= h
                                              else _reflect(rr, h))[:, None]
        cols[y:y + r1 - r0, x:x + c1 - c0] = (cc if c0 >= 0 and c1 <= w
                                              else _reflect(cc, w))[None, :]
        # mirrored pixels beyond the frame edge only feed the filters, they are not the
        # particle's own
        tile[y + max(-r0, 0):y + r1 - r0 - max(r1 - h, 0),
             x + max(-c0, 0):x + c1 - c0 - max(c1 - w, 0)] = lab
    # every particle pixel lies in its own box, once
    own = (labels[rows, cols] == tile) & (tile > 0)
    if background is None:
        background = _background(_image_blocks(image) if blocks is None else blocks, labels)
    thick = None if background is None else _thickness_map(image, labels, rows, cols, own,
                                                           background)
    if thick is None:
        return excess, z, radius
    smooth = ndi.gaussian_filter(thick, sigma)
    if masks:
        cover = np.zeros(labels.shape, np.uint8)
        for r0, c0, m in masks.values():
            cover[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] += m
        lab = labels[rows, cols]
        # a particle with no mask of its own covers its pixels (a sphere that owns the end
        # of the rod lying under it: the rod's mask alone counts those pixels once)
        has_mask = np.zeros(n + 1, bool)
        has_mask[[k for k in masks if k <= n]] = True
        shared = (cover[rows, cols] + ((lab > 0) & ~has_mask[lab])) >= 2
        own &= ~ndi.maximum_filter(shared, size=2 * reach + 1)
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, tile[own], smooth[own])
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where((radius >= 1.5) & np.isfinite(peak), peak / (2 * radius), np.nan)
    ref = np.flatnonzero(reference[:n + 1] & np.isfinite(q))
    ref = ref[ref > 0]
    if ref.size < _THICK_MIN_REFS:
        return excess, z, radius
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
    return excess, z, radius


# the larger of two overlapping discs owns at least this fraction of their union's outline
# (two equal discs a radius apart: 2 × 120° of arc against 2 × 60° hidden: ~0.4 each, less
# the blur-filled neck)
_TWO_DISC_FIRST = 0.3
# both discs together must hold this fraction of the region
_TWO_DISC_COVER = 0.9


def _two_discs(mask, min_marker_px):
    """Two overlapping discs that explain the whole region ``mask``, or None.

    Two spheres overlapping by much of a radius leave no notch in the outline once blur has
    filled the neck, so UECS keeps them whole, and their shared lens makes the region thicker
    than one particle (:func:`_drop_thick`). Their outline is still two circular arcs: the
    larger arc is fitted first (:func:`_fit_disc` with a lower share of points on it), then
    the outline it leaves gets a circle of its own. Accepted when both discs are particles
    (at least ``min_marker_px``, their centres apart and each outside the other's core) and
    together they hold the region. Returns ``(pieces, scores)`` as :func:`_split_region`.
    """
    pts = np.argwhere(mask & ~ndi.binary_erosion(mask))
    first = _fit_disc(pts, mask, inliers=_TWO_DISC_FIRST)
    if first is None:
        return None
    piece_a, score_a = first
    # the outline the first circle does not run through (a pixel's margin more than its
    # fit tolerance) is the second particle's
    off = score_a[pts[:, 0], pts[:, 1]] < -1.0
    off |= ~np.isfinite(score_a[pts[:, 0], pts[:, 1]])
    second = _fit_disc(pts[off], mask)
    if second is None:
        return None
    piece_b, score_b = second
    area = np.count_nonzero(mask)
    if (min(np.count_nonzero(piece_a), np.count_nonzero(piece_b)) < min_marker_px
            or np.count_nonzero(piece_a | piece_b) < _TWO_DISC_COVER * area):
        return None
    # each disc's centre lies outside the other's core: not one circle fitted twice
    for p, s in ((piece_a, score_b), (piece_b, score_a)):
        cy, cx = np.round(np.argwhere(p).mean(axis=0)).astype(int)
        if s[cy, cx] > 0.5 * s.max():
            return None
    return [piece_a, piece_b], [score_a, score_b]


# the overlap lens of two flat particles is about twice as thick as either alone (blur and
# smoothing bring its level down): a thick region splits at a lens at least this much thicker
_LENS_RATIO = 1.3
# erosions tried to cut the two crescents left around a lens apart (blur joins them where
# the outlines cross)
_LENS_CUT_STEPS = 4
# two members sharing more than this fraction of the smaller one are one particle fitted
# twice (or a coincidence no projection resolves)
_LENS_MAX_SHARE = 0.8


def _lens_split(mask, thick, min_marker_px):
    """Two overlapping convex particles from the thick lens they share, or None.

    Where two particles overlap, the projection holds both: for flat-lying particles (cubes,
    plates) the lens is a plateau about twice as thick as the rest, so the region's thickness
    falls into two levels (Otsu on the region's inner pixels). Without the lens the region
    is the two members' crescents, joined only by a few blurred pixels where the outlines
    cross: eroded until exactly two substantial parts remain, they are the markers, and the
    crescents are shared out by a watershed on their depth. Each member is the convex hull
    of its crescent and the lens (a convex particle holds both), within the region.
    ``thick``: the projected thickness on ``mask``'s crop (:func:`_thickness_map`, smoothed).
    Returns ``(pieces, scores)`` as :func:`_split_region`.
    """
    core = ndi.binary_erosion(mask, iterations=2)
    values = thick[core]
    if values.size < 2 * min_marker_px or np.ptp(values) <= 0:
        return None
    level = threshold_otsu(values)
    low, high = np.median(values[values <= level]), np.median(values[values > level])
    if not (low > 0 and high >= _LENS_RATIO * low):
        return None
    lens = mask & (thick > level)
    rest = mask & ~ndi.binary_dilation(lens)
    markers = None
    for steps in range(_LENS_CUT_STEPS + 1):
        eroded = ndi.binary_erosion(rest, iterations=steps) if steps else rest
        lab, n = ndi.label(eroded)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        sizes[0] = 0
        big = np.flatnonzero(sizes >= max(8, 0.1 * min_marker_px))
        if len(big) > 2:
            return None
        if len(big) == 2:
            markers = np.where(np.isin(lab, big), lab, 0)
            break
    if markers is None:
        return None
    share = segmentation.watershed(-ndi.distance_transform_edt(rest), markers, mask=rest)
    pieces, scores = [], []
    for b in np.unique(markers[markers > 0]):
        piece = morphology.convex_hull_image((share == b) | lens) & mask
        if np.count_nonzero(piece) < min_marker_px:
            return None
        pieces.append(piece)
        depth = ndi.distance_transform_edt(_pad1(piece))[1:-1, 1:-1]
        scores.append(np.where(piece, depth, -np.inf))
    shared = np.count_nonzero(pieces[0] & pieces[1])
    if (shared > _LENS_MAX_SHARE * min(map(np.count_nonzero, pieces))
            or np.count_nonzero(pieces[0] | pieces[1]) < _TWO_DISC_COVER * np.count_nonzero(mask)):
        return None
    return pieces, scores


def _drop_thick(sep, plain, image, blocks, *, min_marker_px):
    """Report particles clearly thicker than one particle of their width as agglomerates.

    ``plain[k]``: particle ``k`` came from a region that needed no split (a reference). A
    thick particle whose outline is two overlapping circles (:func:`_two_discs`: a deep
    overlap of two spheres) or whose thickness shows the lens two flat particles share
    (:func:`_lens_split`) is split into them instead.

    Returns the new Separation and the inscribed radii of its particles
    (:func:`_inscribed_radii`; None when the frame could not be judged).
    """
    labels = sep.labels
    n = int(labels.max())
    if n == 0:
        return sep, None
    reference = plain
    if plain[1:].sum() < 3 * _THICK_MIN_REFS:
        # a crowded frame (most regions needed a split): every particle is a reference; the
        # local median stands as long as most particles are single
        reference = np.ones(n + 1, bool)
    # the background (from ``blocks``, :func:`_image_blocks`) serves every thickness below
    # (the trial keeps the foreground), the inscribed radii serve the trial's unchanged particles and the caller
    size = _background_radius(labels)
    background = _background(blocks, labels, size)
    excess, z, radius = _excess(labels, image, reference, sep.masks, blocks=blocks,
                                background=background)
    thick = (excess > _THICK_EXCESS) & (z > _THICK_Z)
    if not thick.any():
        return sep, radius
    boxes = list(sep.agglomerate_boxes)
    slices = ndi.find_objects(labels)
    splits = []  # (label, row0, col0, pieces, owner, mask) of thick particles split in two
    regions = []  # (label, row0, col0, mask, two-member split or None)
    for lab in np.flatnonzero(thick):
        if lab in sep.masks:
            r0, c0, m = sep.masks[lab]
        elif slices[lab - 1] is not None:
            sl = slices[lab - 1]
            r0, c0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
            m = labels[r0:sl[0].stop + 1, c0:sl[1].stop + 1] == lab
        else:
            continue
        # a particle that a split left whole (no full extent of its own): two discs, or two
        # flat particles around a lens?
        regions.append((lab, r0, c0, m, None if lab in sep.masks else _two_discs(
            m, min_marker_px)))
    lens = [k for k, (lab, _, _, _, two) in enumerate(regions)
            if two is None and lab not in sep.masks]
    if lens:
        # the thickness of all their crops in one call (its background model is the frame's)
        crops = [np.indices(regions[k][3].shape).reshape(2, -1)
                 + np.array(regions[k][1:3])[:, None] for k in lens]
        rows, cols = np.concatenate(crops, axis=1)
        flat = _thickness_map(image, labels, rows, cols,
                              np.concatenate([regions[k][3].ravel() for k in lens]), background)
        if flat is not None:
            for k, part in zip(lens, np.split(flat, np.cumsum([c.shape[1] for c in crops])[:-1])):
                lab, r0, c0, m, _ = regions[k]
                regions[k] = (lab, r0, c0, m, _lens_split(
                    m, ndi.gaussian_filter(part.reshape(m.shape), 1.0), min_marker_px))
    for lab, r0, c0, m, two in regions:
        if two is None:
            boxes.append((r0, c0, r0 + m.shape[0], c0 + m.shape[1]))
            continue
        pieces, scores = two
        stack = np.stack(scores)
        owner = np.where(m & np.isfinite(stack).any(axis=0), np.argmax(stack, axis=0), -1)
        # the region's outline is one particle's edge: where both extents reach it (the
        # outlines' crossings), it stays with its owner only
        outline = m & ~ndi.binary_erosion(m)
        pieces = [p & ~(outline & (owner != i)) for i, p in enumerate(pieces)]
        splits.append((lab, r0, c0, pieces, owner, m))
    members = []  # the trial's labels of each split's members
    if splits:
        # a member still thicker than one particle (a third particle in the lens, or more
        # than two in the region) is not one particle: its region goes back to its box
        trial = labels.copy()
        trial_masks = dict(sep.masks)
        next_label = n + 1
        for lab, r0, c0, pieces, owner, m in splits:
            view = trial[r0:r0 + m.shape[0], c0:c0 + m.shape[1]]
            for i, piece in enumerate(pieces):
                view[owner == i] = next_label
                trial_masks[next_label] = (r0, c0, piece)
                next_label += 1
            members.append(range(next_label - len(pieces), next_label))
        ref = np.r_[reference, np.zeros(next_label - n - 1, bool)]
        # the same foreground: the background changes only with the typical particle size
        trial_size = _background_radius(trial)
        trial_background = (background if trial_size == size
                            else _background(blocks, trial, trial_size))
        # only the split particles and their members changed (a label's radius is its own)
        changed = {s[0] for s in splits} | {k for ids in members for k in ids}
        top = int(trial.max())
        trial_radius = _inscribed_radii(trial, ndi.find_objects(trial), trial_masks, top,
                                        only=changed)
        same = np.arange(1, min(n, top) + 1)
        same = same[~np.isin(same, list(changed))]
        trial_radius[same] = radius[same]
        excess2, z2, _ = _excess(trial, image, ref, trial_masks, blocks=blocks,
                                 background=trial_background, radius=trial_radius)
        thick2 = (excess2 > _THICK_EXCESS) & (z2 > _THICK_Z)
        kept = []
        for split, ids in zip(splits, members):
            if thick2[list(ids)].any():
                _, r0, c0, _, _, m = split
                boxes.append((r0, c0, r0 + m.shape[0], c0 + m.shape[1]))
            else:
                kept.append((split, ids))
        splits, members = [k[0] for k in kept], [k[1] for k in kept]
    keep = ~thick
    keep[0] = True
    new = np.cumsum(keep) - 1  # old label -> new label (background stays 0)
    new[~keep] = 0
    out = new[labels].astype(np.int32)
    masks = {int(new[k]): v for k, v in sep.masks.items() if keep[k]}
    exact = {int(new[k]) for k in sep.exact if keep[k]}
    separated = list(sep.separated[keep])
    next_label = int(new.max()) + 1
    # the radii of the result (a kept particle's are its own; members' those of the trial)
    final = np.zeros(next_label + sum(len(ids) for ids in members))
    if radius is not None:
        final[new[keep][1:]] = radius[:n + 1][keep][1:]
    for (_, r0, c0, pieces, owner, m), ids in zip(splits, members):
        view = out[r0:r0 + m.shape[0], c0:c0 + m.shape[1]]
        for i, piece in enumerate(pieces):
            view[owner == i] = next_label
            masks[next_label] = (r0, c0, piece)
            separated.append(True)
            if ids[i] < trial_radius.size:
                final[next_label] = trial_radius[ids[i]]
            next_label += 1
        # pixels of the region neither member holds (blur in the neck): every pixel is
        # explained by a particle or boxed
        rest = _unexplained(m & (owner < 0), min_marker_px)
        boxes.extend((r0 + a, c0 + b, r0 + c, c0 + d) for a, b, c, d in rest)
    return (Separation(out, np.array(separated, bool), len(boxes), boxes, masks,
                       frozenset(exact)),
            None if radius is None else final[:int(out.max()) + 1])


# A leftover (what no particle explains) is reported as an agglomerate only when it could be
# a particle's visible part: its inscribed radius at least this share of the frame's small
# particles' (_LEFTOVER_RADIUS_PCT-th percentile of the measured particles' inscribed radii;
# thinner leftovers are slivers along a measured particle's edge or the blur between two) ...
_LEFTOVER_DEPTH = 0.4
_LEFTOVER_RADIUS_PCT = 10
# ... and, with the image, as thick as a particle: its mean projected thickness at least this
# share of the median particle's (film texture that segmentation joined to a particle, or a
# speck of it that segmentation kept, is no thicker than the film)
_LEFTOVER_THICK = 0.25
# the frame needs this many measured particles to say what a particle is
_LEFTOVER_MIN_PARTICLES = 5


def _particle_boxes(sep, raw, image, radius=None, blocks=None):
    """Drop agglomerate boxes whose leftover is no particle: a sliver or film.

    Nothing is lost silently: every part of a region the split particles leave unexplained
    and thick enough to hold one gets an agglomerate box. But a leftover can also be a sliver
    of a particle already measured (the blur-filled neck and the concave flanks where two
    particles meet, a bump of a ragged outline) or film texture the segmentation joined to a
    particle or kept on its own. Both are told from a hidden particle by comparison with the
    frame's measured particles: a leftover is kept when its largest part's inscribed radius
    reaches ``_LEFTOVER_DEPTH`` of the small particles' and, with the ``image``, its mean
    projected thickness (:func:`_thickness_map`) reaches ``_LEFTOVER_THICK`` of the median
    particle's. A box's leftover is the segmented pixels in it that no particle covers (its
    labels or full extents, ``sep.masks``). Frames with fewer than
    ``_LEFTOVER_MIN_PARTICLES`` particles keep every box (nothing to compare with).
    """
    labels = sep.labels
    n = int(labels.max())
    if not sep.agglomerate_boxes:
        return sep
    covered = labels > 0
    for r0, c0, m in sep.masks.values():
        covered[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] |= m
    left = (raw > 0) & ~covered
    merged = _merge_boxes(sep.agglomerate_boxes, raw, left)
    if len(merged) < len(sep.agglomerate_boxes):
        sep = Separation(labels, sep.separated, len(merged), merged, sep.masks, sep.exact)
    if n < _LEFTOVER_MIN_PARTICLES:
        return sep
    if radius is None:
        radius = _inscribed_radii(labels, ndi.find_objects(labels), sep.masks, n)
    radius = radius[1:]
    small = float(np.percentile(radius[radius > 0], _LEFTOVER_RADIUS_PCT))
    parts = []  # (box, the leftover's largest part in the box's coordinates) of each box
    for box in sep.agglomerate_boxes:
        r0, c0, r1, c1 = (int(v) for v in box)
        lab, k = ndi.label(left[r0:r1, c0:c1])
        if k == 0:
            parts.append((box, None))
            continue
        # the thickest part (a box drawn around one unexplained part may also hold a corner
        # of another's)
        depth = ndi.distance_transform_edt(np.pad(lab > 0, 1))[1:-1, 1:-1]
        # the part holding the deepest pixel (the first in label order on a tie)
        top = depth.max()
        best = int(lab[depth == top].min()) - 1
        part = lab == best + 1
        if top < _LEFTOVER_DEPTH * small:
            part = None
        elif ndi.binary_dilation(np.pad(part, 1), np.ones((3, 3), bool))[1:-1, 1:-1][
                covered[r0:r1, c0:c1]].any():
            # beside a particle: a hidden particle's visible part may be faint (a PS50 under
            # a PS100 in bright field); film texture is told by its thickness only where
            # it stands alone (a speck the segmentation kept)
            part = True
        parts.append((box, part))
    if image is not None and any(p is not None and p is not True for _, p in parts):
        parts = _thick_parts(parts, labels, raw, image, blocks)
    boxes = [box for box, part in parts if part is not None]
    if len(boxes) == len(sep.agglomerate_boxes):
        return sep
    return Separation(labels, sep.separated, len(boxes), boxes, sep.masks, sep.exact)


def _merge_boxes(boxes, raw, left):
    """``boxes`` with the boxes of one region that overlap merged into one (their union).

    The boxes of one pile come from several steps: the parts a split leaves unexplained, then
    the whole extent of a piece the thickness check finds too thick for one particle (which
    holds some of those parts), or of a region it takes back. Each would be reported as an
    agglomerate of its own, the smaller ones drawn inside the bigger: one pile, counted several
    times. A box's region is the segmented region (``raw``) most of its unexplained pixels
    (``left``) belong to (of its segmented pixels when none is left); boxes of different
    regions (neighbouring piles) stay apart, and so do boxes of one region that do not overlap
    (two unexplained ends of a chain).
    """
    if len(boxes) < 2:
        return list(boxes)
    items = []  # [region, box]
    for box in boxes:
        r0, c0, r1, c1 = (int(v) for v in box)
        ids = raw[r0:r1, c0:c1]
        ids = ids[left[r0:r1, c0:c1]] if left[r0:r1, c0:c1].any() else ids[ids > 0]
        region = int(np.bincount(ids).argmax()) if ids.size else -1
        items.append([region, (r0, c0, r1, c1)])
    merged = True
    while merged:  # a union may reach a third box of the region
        merged = False
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (ra, a), (rb, b) = items[i], items[j]
                if ra == rb and ra >= 0 and (min(a[2], b[2]) > max(a[0], b[0])
                                             and min(a[3], b[3]) > max(a[1], b[1])):
                    items[i][1] = (min(a[0], b[0]), min(a[1], b[1]),
                                   max(a[2], b[2]), max(a[3], b[3]))
                    del items[j]
                    merged = True
                    break
            if merged:
                break
    return [box for _, box in items]


def _thick_parts(parts, labels, raw, image, blocks=None):
    """``parts`` with the leftovers thinner than ``_LEFTOVER_THICK`` of a particle set to None.

    A particle's thickness is its mean over its own pixels (in ``labels``); a leftover's over
    its part. One :func:`_thickness_map` call for both; its background leaves out every
    segmented region (``raw``), boxed ones too. ``blocks``: :func:`_image_blocks` of ``image``
    when known.
    """
    rows, cols = [np.nonzero(labels)], []
    for (r0, c0, _, _), part in parts:
        if part is not None and part is not True:
            pr, pc = np.nonzero(part)
            rows.append((pr + int(r0), pc + int(c0)))
    n_own = rows[0][0].size
    rows, cols = np.concatenate([r for r, _ in rows]), np.concatenate([c for _, c in rows])
    own = np.zeros(rows.size, bool)
    own[:n_own] = True
    thick = _thickness_map(image, raw, rows, cols, own,
                           _background(_image_blocks(image) if blocks is None else blocks, raw))
    if thick is None:
        return parts
    # (a particle number may own no pixel, a split member wholly under its neighbour's
    # deeper extent: its mean is NaN and must not make the median NaN, which would skip the
    # test for the whole frame)
    ids = np.arange(1, labels.max() + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = ndi.mean(thick[own], labels[rows[own], cols[own]], ids)
    mean = mean[np.isfinite(mean)]
    reference = float(np.median(mean)) if mean.size else np.nan
    if not reference > 0:
        return parts
    out, at = [], int(own.sum())
    for box, part in parts:
        if part is not None and part is not True:
            size = int(np.count_nonzero(part))
            if np.mean(thick[at:at + size]) < _LEFTOVER_THICK * reference:
                part = None
            at += size
        out.append((box, part))
    return out


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
