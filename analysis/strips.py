"""One large frame as horizontal strips: plan, analyse each strip, merge into one frame result.

A 4096² frame takes tens of seconds on one core, and the daemon's latency goal is about one
second: the frame is cut into ``k`` horizontal strips that ``k`` workers analyse at once. Each
strip owns the rows of its *core*; it analyses its core plus a *margin* of rows above and
below (the *crop*), so that a particle owned by the strip (its centroid in the core) is whole
in the crop and measured exactly as in the whole frame.

The rules that keep every particle counted once:

- Ownership: a particle belongs to the strip whose core holds its centroid row. Every strip
  reports every particle that is whole in its crop; where two neighbours both saw one
  particle (same place, within a fraction of its size) the copy of the strip owning their
  mean centroid is kept, so a particle lying exactly on a cut, whose centroid the two strips
  compute a hair apart, is counted once, never twice or not at all.
- Honest fallback: the crop's *artificial* cut edges are not frame borders. A particle or an
  agglomerate whose segmented region (a touching group, before separation) touches a cut
  edge is cropped; if its centroid lies in the strip's core the margin was too small for
  it, the strip says so (``StripResult.too_small``) and the frame must be analysed whole
  (:func:`merge_strips` returns no result but the reason). One touching a cut edge with its
  centroid outside the core is not this strip's: its owner sees it whole, or says the same.
  Nothing is lost or counted twice silently.
- What can differ from the whole frame: each crop fits its own background, noise level,
  thresholds and edge models, so with few particles per strip sizes move by a fraction of a
  percent to a few percent, and thick (merged) pieces are judged against the strip's own
  isolated particles, so a few borderline agglomerate calls go either way. Real frame borders
  are cleared by segment's own rule, as in the whole frame.

The margin: particle size is unknown before the analysis, so the margin comes from the
frame: ``max(64, side / 16)`` px (:func:`default_margin_px`). A frame taken for size
statistics holds many particles, so a single particle or touching group rarely spans more than
a sixteenth of the field (au10, ps-bimodal, silica capsules and rods in the simulator: 20–50
px particles and groups of about 150 px at any frame size); a bigger one only costs the
whole-frame fallback, never a wrong count.

Why not :func:`~particlewatch.analysis.pipeline.analyze_image` on the crop: it removes every
particle that touches the image border, the cut edges included, so a cropped particle would
vanish without a trace and the fallback above could not be honest. :func:`analyze_crop` runs
the same stages (segment, separate, measure, size filter) with ``segment`` clearing only the
crop's *real* borders (``clear_border=(top, bottom, left, right)``), and keeps the regions on a
cut edge to decide ownership and the fallback.

References
----------
.. [1] P. Hintjens, *ZeroMQ: the guide*, "Divide and Conquer" (parallel task ventilator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .io import FrameError
from .measure import measure
from .pipeline import (RESULT_COLUMNS, FrameResult, _validate_options, failure_reason,
                       read_frame_into, touching_particles)
from .segment import segment
from .separate import separate as separate_particles

__all__ = ["Strip", "StripResult", "default_margin_px", "plan_strips", "frame_shape",
           "analyze_crop", "analyze_strip", "merge_strips", "MIN_MARGIN_PX"]

#: Smallest margin chosen by :func:`default_margin_px` (px).
MIN_MARGIN_PX = 64
#: The default margin is this fraction of the frame's shorter side.
MARGIN_FRACTION = 1.0 / 16.0
# Two reports of one particle by neighbouring strips are matched when their centroids lie
# closer than this fraction of its ECD (and at least _MATCH_MIN_PX): distinct particles,
# even overlapping ones, have centres about a diameter apart; one particle seen from two
# crops moves by a pixel at most.
_MATCH_FRACTION = 0.25
_MATCH_MIN_PX = 2.0


@dataclass(frozen=True)
class Strip:
    """One horizontal strip of a frame.

    Attributes
    ----------
    index, count : int
        This strip's number (0 at the top) and how many strips the frame has.
    row0, row1 : int
        The core: rows ``row0 <= r < row1`` are owned by this strip.
    crop0, crop1 : int
        The rows analysed: the core plus ``margin_px`` on each side, clipped to the frame.
    margin_px : int
    shape : (int, int)
        The frame's ``(rows, columns)``.
    """

    index: int
    count: int
    row0: int
    row1: int
    crop0: int
    crop1: int
    margin_px: int
    shape: tuple

    @property
    def cut_top(self) -> bool:
        """The crop's first row is an artificial cut (not the frame's top border)."""
        return self.crop0 > 0

    @property
    def cut_bottom(self) -> bool:
        """The crop's last row is an artificial cut (not the frame's bottom border)."""
        return self.crop1 < self.shape[0]

    def to_dict(self) -> dict:
        """A JSON-safe dict (:meth:`from_dict` reads it back)."""
        return {"index": self.index, "count": self.count, "row0": self.row0,
                "row1": self.row1, "crop0": self.crop0, "crop1": self.crop1,
                "margin_px": self.margin_px, "shape": [int(n) for n in self.shape]}

    @classmethod
    def from_dict(cls, data) -> "Strip":
        """Rebuild and check a strip from :meth:`to_dict`'s dict.

        Raises
        ------
        ValueError
            A missing or mistyped field, or rows that do not make a strip of that frame.
        """
        if not isinstance(data, dict):
            raise ValueError(f"strip must be a dict, got {type(data).__name__}")
        keys = ("index", "count", "row0", "row1", "crop0", "crop1", "margin_px")
        unknown = sorted(set(data) - set(keys) - {"shape"})
        if unknown:
            raise ValueError(f"strip has unknown field(s): {', '.join(unknown)}")
        values = {}
        for key in keys:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"strip {key!r} must be an integer, got {value!r}")
            values[key] = value
        shape = data.get("shape")
        if (not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ValueError(f"strip 'shape' must be two positive integers, got {shape!r}")
        strip = cls(**values, shape=(int(shape[0]), int(shape[1])))
        _check_strip(strip)
        return strip


def _check_strip(strip: Strip) -> None:
    rows = strip.shape[0]
    if not (0 <= strip.index < strip.count and strip.margin_px >= 0
            and 0 <= strip.crop0 <= strip.row0 < strip.row1 <= strip.crop1 <= rows
            and strip.crop0 == max(strip.row0 - strip.margin_px, 0)
            and strip.crop1 == min(strip.row1 + strip.margin_px, rows)):
        raise ValueError(f"strip {strip.to_dict()} is not a strip of a {rows}-row frame")


@dataclass
class StripResult:
    """What one strip's analysis gives.

    Attributes
    ----------
    strip : Strip
    result : FrameResult
        Every particle whole in the crop and not on a real border, in *frame* coordinates
        (``x_px``, ``y_px``; ``particle_id`` is the crop's label); the agglomerates likewise
        (``agglomerate_boxes`` in frame rows and columns, clipped to the crop).
    too_small : str or None
        Why the margin was too small (a particle or agglomerate owned by this strip touches a
        cut edge), or None.
    """

    strip: Strip
    result: FrameResult
    too_small: str | None = None

    def to_message(self) -> dict:
        """A JSON-safe dict: the result's message plus ``strip`` and ``too_small``."""
        return {**self.result.to_message(), "strip": self.strip.to_dict(),
                "too_small": self.too_small}

    @classmethod
    def from_message(cls, message) -> "StripResult":
        """Rebuild from :meth:`to_message`'s dict, checking every field.

        Raises
        ------
        ValueError
            A missing or mistyped field.
        """
        if not isinstance(message, dict) or "strip" not in message:
            raise ValueError("a strip result needs a 'strip' field")
        message = dict(message)
        strip = Strip.from_dict(message.pop("strip"))
        too_small = message.pop("too_small", None)
        if too_small is not None and not isinstance(too_small, str):
            raise ValueError(f"strip result: too_small must be a string or null, got "
                             f"{too_small!r}")
        return cls(strip, FrameResult.from_message(message), too_small)


# -- planning -------------------------------------------------------------------------------

def default_margin_px(shape) -> int:
    """The overlap margin for a frame of ``shape``: ``max(64, min(shape) / 16)`` px.

    Parameters
    ----------
    shape : (int, int)
        The frame's rows and columns.

    Returns
    -------
    int

    Notes
    -----
    Particle size is not known before the analysis. Frames for size statistics are taken at a
    magnification that puts many particles in the field, so one particle or touching group
    rarely spans more than a sixteenth of it; anything larger that reaches a cut edge makes
    the frame fall back to a whole-frame analysis (it costs time, never a count). The floor
    keeps small frames' margins above the size of a typical touching group.

    Examples
    --------
    >>> default_margin_px((4096, 4096)), default_margin_px((1024, 1024))
    (256, 64)
    """
    rows, cols = (int(n) for n in shape)
    return max(MIN_MARGIN_PX, int(round(min(rows, cols) * MARGIN_FRACTION)))


def plan_strips(shape, n_strips, *, margin_px=None):
    """Cut a frame into horizontal strips with an overlap margin.

    Parameters
    ----------
    shape : (int, int)
        The frame's rows and columns.
    n_strips : int
        How many strips are wanted (e.g. the number of idle workers). Fewer are planned where
        the cores would become thinner than the margin (more strips would then cost more in
        margins than they save) or where the frame is shorter than two margins.
    margin_px : int, optional
        Rows analysed beyond each cut; default :func:`default_margin_px`.

    Returns
    -------
    list of Strip
        Cores tile the rows exactly (strip ``i``'s ``row1`` is strip ``i+1``'s ``row0``);
        a single strip is the whole frame.

    Examples
    --------
    >>> [(s.row0, s.row1, s.crop0, s.crop1) for s in plan_strips((1000, 800), 2, margin_px=100)]
    [(0, 500, 0, 600), (500, 1000, 400, 1000)]
    """
    rows, cols = _validate_shape(shape)
    if isinstance(n_strips, bool) or not isinstance(n_strips, (int, np.integer)) or n_strips < 1:
        raise ValueError(f"n_strips must be a positive integer, got {n_strips!r}")
    margin = default_margin_px(shape) if margin_px is None else margin_px
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin_px must be an integer >= 0, got {margin_px!r}")
    margin = int(margin)
    count = int(min(n_strips, max(1, rows // max(margin, 1))))
    edges = np.linspace(0, rows, count + 1).round().astype(int)
    return [Strip(index=i, count=count, row0=int(edges[i]), row1=int(edges[i + 1]),
                  crop0=max(int(edges[i]) - margin, 0),
                  crop1=min(int(edges[i + 1]) + margin, rows),
                  margin_px=margin, shape=(rows, cols)) for i in range(count)]


def _validate_shape(shape):
    try:
        rows, cols = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (rows, columns), got {shape!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"shape {shape!r} must be positive")
    return rows, cols


def frame_shape(path):
    """The ``(rows, columns)`` of a frame file from its header alone, or None.

    Only MRC/MRCS (the fixed header) and TIFF (the first page's tags) are read this cheaply;
    for other formats, or a header that cannot be read, None (the frame is then analysed
    whole, and a damaged file fails there with its reason).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    (int, int) or None
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".mrc", ".mrcs"):
            with open(path, "rb") as fh:
                head = fh.read(1024)
            if len(head) < 1024 or head[208:211] != b"MAP":
                return None
            endian = ">" if head[212] == 0x11 else "<"
            nx, ny = np.frombuffer(head[:8], dtype=endian + "i4")
            return (int(ny), int(nx)) if nx > 0 and ny > 0 else None
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None
    except Exception:  # a file we cannot size is analysed whole and fails there if broken
        return None
    return None


# -- one strip ------------------------------------------------------------------------------

def analyze_crop(image, pixel_nm, *, cut_top, cut_bottom, min_size_nm=None, separate="uecs",
                 polarity="auto"):
    """Analyse rows cut out of a frame: what :func:`~.pipeline.analyze_image` does, except
    at the artificial cut edges.

    Parameters
    ----------
    image : (M, N) ndarray
        The crop.
    pixel_nm : float
    cut_top, cut_bottom : bool
        Whether the crop's first / last row is an artificial cut rather than a frame border.
    min_size_nm, separate, polarity
        As for :func:`~particlewatch.analysis.pipeline.analyze_image`.

    Returns
    -------
    particles : dict of str to ndarray
        :data:`~.pipeline.RESULT_COLUMNS` of the particles not touching a real border or
        missing pixels, in crop coordinates; those touching a cut edge are included.
    on_cut : ndarray of bool
        Per particle: it touches a cut edge (it is cropped).
    boxes : list of (int, int, int, int)
        Agglomerates (not touching a real border), ``(row0, col0, row1, col1)`` in the crop.
    boxes_on_cut : list of bool
        Per agglomerate: it touches a cut edge.
    cut_rows : ndarray of float
        Centroid rows of the segmented regions (touching groups) that touch a cut edge,
        whatever separation made of them (it may drop a cropped piece altogether).

    Examples
    --------
    >>> yy, xx = np.mgrid[:128, :128]
    >>> img = 100.0 - 60.0 * ((yy - 64) ** 2 + (xx - 64) ** 2 < 20 ** 2)
    >>> *_, cut_rows = analyze_crop(img[:70], 0.5, cut_top=False, cut_bottom=True)
    >>> [round(float(r)) for r in cut_rows]  # the cropped half-disc, rows 45-69
    [57]
    """
    _validate_options(pixel_nm, min_size_nm, separate, polarity)
    image = np.asarray(image)
    cut_top, cut_bottom = bool(cut_top), bool(cut_bottom)
    raw = segment(image, pixel_nm, polarity=polarity,
                  clear_border=(not cut_top, not cut_bottom, True, True))
    sep = separate_particles(raw, pixel_nm, method=separate, image=image)
    labels = sep.labels
    table = measure(labels, image, pixel_nm, masks=getattr(sep, "masks", None),
                    exact=getattr(sep, "exact", ()))
    ids = np.asarray(table["particle_id"], dtype=np.int64)
    # Edges are judged on the segmented regions (touching groups), not on the separated
    # pieces: separation reshapes a region cut by the image edge (a cropped half-disc comes
    # back smaller, clear of the edge), and a group cut short splits differently.
    region_real, region_cut = _region_edges(raw, image, cut_top=cut_top, cut_bottom=cut_bottom)
    region = (ndi.maximum(raw, labels=labels, index=ids).astype(np.int64).reshape(-1)
              if ids.size else np.zeros(0, np.int64))
    real, on_cut = region_real[region], region_cut[region]
    flags = np.asarray(sep.separated, dtype=bool)
    separated = np.array([bool(flags[i]) if i < flags.size else False for i in ids], bool)
    keep = ~real
    if min_size_nm is not None and ids.size:
        keep &= np.asarray(table["ecd_nm"], dtype=float) >= float(min_size_nm)
    particles = {}
    for name in RESULT_COLUMNS:
        if name == "separated":
            column = separated
        elif name == "touching":
            column = touching_particles(labels, ids, boxes=sep.agglomerate_boxes)
        elif name in table:
            column = np.asarray(table[name])
        else:  # a column measure does not give (yet): present, but unknown
            column = np.full(ids.size, np.nan)
        particles[name] = column[keep]
    boxes, boxes_on_cut = [], []
    for box in sep.agglomerate_boxes:
        box = tuple(int(v) for v in box)
        # a box is a whole region's or only a leftover part's: its region is the one that
        # fills most of it
        inside = raw[box[0]:box[2], box[1]:box[3]]
        inside = inside[inside > 0]
        reg = int(np.bincount(inside).argmax()) if inside.size else 0
        if reg == 0 or region_real[reg]:
            continue  # on a real border: cleared in the whole frame too, not counted there
        boxes.append(box)
        boxes_on_cut.append(bool(region_cut[reg]))
    cut_ids = np.flatnonzero(region_cut)
    cut_rows = (np.array([c[0] for c in ndi.center_of_mass(raw > 0, raw, cut_ids)], float)
                if cut_ids.size else np.zeros(0))
    return particles, on_cut[keep], boxes, boxes_on_cut, cut_rows


def _region_edges(raw, image, *, cut_top, cut_bottom):
    """Per region label (index 0 unused): touches a real border or missing pixels; touches
    an artificial cut edge."""
    n = int(raw.max()) if raw.size else 0
    real = np.zeros(n + 1, bool)
    cut = np.zeros(n + 1, bool)
    # segment cleared what the real borders crop (a whole particle reaching one by blur
    # stays, as in the whole frame); only cut edges remain to be judged here
    if cut_top:
        cut[raw[0]] = True
    if cut_bottom:
        cut[raw[-1]] = True
    invalid = ~np.isfinite(image)
    if invalid.any():  # cropped by missing data, as segment's own border clearing does
        real[raw[ndi.binary_dilation(invalid)]] = True
    real[0] = cut[0] = False
    return real, cut


def analyze_strip(path, strip, *, pixel_nm=None, min_size_nm=None, separate="uecs",
                  polarity="auto"):
    """Analyse one strip of a frame file; never raises for a bad frame.

    Parameters
    ----------
    path : str or path-like
        The frame (any format :func:`~particlewatch.analysis.io.read_frame` reads).
    strip : Strip
        From :func:`plan_strips` for this frame's shape.
    pixel_nm, min_size_nm, separate, polarity
        As for :func:`~particlewatch.analysis.pipeline.analyze_frame`.

    Returns
    -------
    StripResult
        ``result.status`` is ``"failed"`` with the reason for a bad frame or a frame whose
        shape is not the strip's.

    Notes
    -----
    :func:`~particlewatch.analysis.io.read_frame` memory-maps MRC files and copies the image
    out; a 4096² frame takes about 45 ms, little beside the strip's analysis, and reading it
    whole keeps pixel size, metadata and missing-pixel rules exactly those of the whole frame.
    """
    _validate_options(pixel_nm, min_size_nm, separate, polarity)
    if not isinstance(strip, Strip):
        raise ValueError(f"strip must be a Strip, got {type(strip).__name__}")
    _check_strip(strip)
    start = time.perf_counter()
    path = Path(path)
    result = FrameResult(frame=path.stem, path=str(path), status="failed")
    too_small = None
    try:
        frame = read_frame_into(result, path, pixel_nm=pixel_nm)
        if tuple(frame.image.shape) != tuple(strip.shape):
            raise FrameError(path, f"image is {frame.image.shape[1]} x {frame.image.shape[0]} "
                                   f"px, the strip plan was made for {strip.shape[1]} x "
                                   f"{strip.shape[0]}")
        crop = frame.image[strip.crop0:strip.crop1]
        particles, on_cut, boxes, boxes_on_cut, cut_rows = analyze_crop(
            crop, frame.pixel_nm, cut_top=strip.cut_top, cut_bottom=strip.cut_bottom,
            min_size_nm=min_size_nm, separate=separate, polarity=polarity)
    except Exception as exc:  # a strip the stages cannot handle must not stop the worker
        result.reason = failure_reason(path, exc, what=f"strip {strip.index}")
    else:
        y = np.asarray(particles["y_px"], dtype=float) + strip.crop0
        owned = (y >= strip.row0) & (y < strip.row1)
        box_rows = np.array([(b[0] + b[2]) / 2.0 + strip.crop0 for b in boxes], float)
        box_owned = (box_rows >= strip.row0) & (box_rows < strip.row1)
        bad = int(np.count_nonzero(owned & on_cut))
        bad_boxes = int(np.count_nonzero(box_owned & np.asarray(boxes_on_cut, bool)))
        region_rows = np.asarray(cut_rows, float) + strip.crop0
        bad_regions = int(np.count_nonzero((region_rows >= strip.row0)
                                           & (region_rows < strip.row1)))
        if bad or bad_boxes or bad_regions:
            too_small = (f"{max(bad + bad_boxes, bad_regions)} particle(s) or group(s) of "
                         f"strip {strip.index} (rows {strip.row0}-{strip.row1}) reach past its "
                         f"{strip.margin_px} px margin")
        whole = ~on_cut  # cropped particles are not reported: their owner sees them whole
        particles = {k: v[whole] for k, v in particles.items()}
        particles["y_px"] = np.asarray(particles["y_px"], float) + strip.crop0
        result.status = "ok"
        result.particles = particles
        kept = [(r0 + strip.crop0, c0, r1 + strip.crop0, c1)
                for (r0, c0, r1, c1), cut in zip(boxes, boxes_on_cut) if not cut]
        result.agglomerate_boxes = [list(b) for b in kept]
        result.n_agglomerates = len(kept)
    result.seconds = time.perf_counter() - start
    return StripResult(strip, result, too_small)


# -- merging --------------------------------------------------------------------------------

def merge_strips(strip_results):
    """Merge the strips of one frame into one frame result, or say why it cannot be.

    Parameters
    ----------
    strip_results : sequence of StripResult
        One per strip of one plan, in any order.

    Returns
    -------
    result : FrameResult or None
        The frame's result (``particle_id`` renumbered 1..n top to bottom by strip,
        ``n_agglomerates`` summed over the strips' own agglomerates, ``seconds`` the longest
        strip's), or None when the frame must be analysed whole.
    fallback : str or None
        Why the frame must be analysed whole (a strip failed, or a margin was too small);
        None when ``result`` is given.

    Raises
    ------
    ValueError
        Results that are not the strips of one plan (missing, repeated or foreign strips).
    """
    results = sorted(strip_results, key=lambda r: r.strip.index)
    if not results:
        raise ValueError("no strip results to merge")
    first = results[0].strip
    plan = plan_strips(first.shape, first.count, margin_px=first.margin_px)
    if [r.strip for r in results] != plan:
        raise ValueError(f"strip results {[r.strip.index for r in results]} are not the "
                         f"{first.count} strips of one plan for {first.shape}")
    for r in results:
        if r.result.status != "ok":
            return None, f"strip {r.strip.index} failed: {r.result.reason}"
    for r in results:
        if r.too_small:
            return None, r.too_small
    cores = np.array([s.row1 for s in plan[:-1]], float)  # the cuts

    def owner(rows):
        return np.searchsorted(cores, np.asarray(rows, float), side="right")

    pixel_nm = float(results[0].result.pixel_nm)
    keeps = []
    ys, xs, tols = [], [], []
    for r in results:
        p = r.result.particles
        y = np.asarray(p["y_px"], float)
        ys.append(y)
        xs.append(np.asarray(p["x_px"], float))
        ecd_px = np.nan_to_num(np.asarray(p["ecd_nm"], float) / pixel_nm)
        tols.append(np.maximum(_MATCH_MIN_PX, _MATCH_FRACTION * ecd_px))
        keeps.append(owner(y) == r.strip.index)
    for i in range(len(results) - 1):  # one particle seen by both neighbours: keep one copy
        a, b = _match(ys[i], xs[i], tols[i], ys[i + 1], xs[i + 1], tols[i + 1])
        mine = owner((ys[i][a] + ys[i + 1][b]) / 2.0) <= i
        keeps[i][a] = mine
        keeps[i + 1][b] = ~mine
    boxes = _merge_boxes([r.result.agglomerate_boxes for r in results], owner)
    particles = {}
    for name in RESULT_COLUMNS:
        particles[name] = np.concatenate(
            [np.asarray(r.result.particles[name])[k] for r, k in zip(results, keeps)])
    particles["particle_id"] = np.arange(1, particles["particle_id"].size + 1, dtype=np.int64)
    base = results[0].result
    warnings = list(dict.fromkeys(w for r in results for w in r.result.warnings))
    merged = FrameResult(frame=base.frame, path=base.path, status="ok", pixel_nm=base.pixel_nm,
                         defocus_um=base.defocus_um, stage_x_um=base.stage_x_um,
                         stage_y_um=base.stage_y_um,
                         seconds=max(r.result.seconds for r in results), particles=particles,
                         n_agglomerates=len(boxes), agglomerate_boxes=[list(b) for b in boxes],
                         warnings=warnings)
    return merged, None


def _match(y1, x1, t1, y2, x2, t2):
    """Indices ``(a, b)`` of mutual nearest particles of two strips within tolerance."""
    if y1.size == 0 or y2.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    p1, p2 = np.column_stack([y1, x1]), np.column_stack([y2, x2])
    d12, n12 = cKDTree(p2).query(p1)
    _, n21 = cKDTree(p1).query(p2)
    a = np.arange(y1.size)
    mutual = n21[n12] == a
    close = d12 <= np.minimum(t1, t2[n12])
    a = a[mutual & close]
    return a, n12[a]


def _merge_boxes(per_strip, owner):
    """Agglomerate boxes of all strips, each agglomerate once (same rule as particles)."""
    keeps = [[owner((b[0] + b[2]) / 2.0) == i for b in boxes]
             for i, boxes in enumerate(per_strip)]
    for i in range(len(per_strip) - 1):
        for a, b1 in enumerate(per_strip[i]):
            for b, b2 in enumerate(per_strip[i + 1]):
                if _same_box(b1, b2):
                    mine = owner((b1[0] + b1[2] + b2[0] + b2[2]) / 4.0) <= i
                    keeps[i][a], keeps[i + 1][b] = mine, not mine
    return [list(b) for boxes, keep in zip(per_strip, keeps)
            for b, k in zip(boxes, keep) if k]


def _same_box(b1, b2):
    """Two agglomerate boxes from neighbouring strips are one agglomerate (IoU over 1/2)."""
    r0, c0 = max(b1[0], b2[0]), max(b1[1], b2[1])
    r1, c1 = min(b1[2], b2[2]), min(b1[3], b2[3])
    inter = max(r1 - r0, 0) * max(c1 - c0, 0)
    union = ((b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter)
    return union > 0 and inter / union > 0.5
