"""Read one electron micrograph, whatever the format, with its pixel size in nm.

Formats: MRC/MRCS (mrcfile, with the SerialEM ``.mdoc`` beside it), TIFF (tifffile), DM3/DM4,
SER and EMD (ncempy). Every failure is a :class:`FrameError` whose text is one line,
``"<path>: <reason>"``, so a batch can record it and go on.

Where the pixel size comes from, in order:

1. The file's own header, when it holds a plausible value. For MRC this is the header's
   ``cella / mx`` (Å); 0 Å and 1 Å mean "unset" (the MRC default and what many converters
   write), so they are ignored. The header wins over the ``.mdoc`` because it travels with the
   pixels: a file binned or cropped by another tool (IMOD ``newstack``) gets a correct header,
   while a copied ``.mdoc`` beside it may be stale. SerialEM writes both from the same
   calibration, so for its own files they agree; a disagreement is recorded in
   ``meta["warnings"]``.
2. The ``.mdoc`` ``PixelSpacing`` (Å; the ``[ZValue = 0]`` section, then the global header).
3. The caller's ``pixel_nm`` (``--pixel-nm``), for files that carry none.

Non-finite pixels: a frame with no finite pixel, or with more than half of them missing, fails.
Otherwise ``inf`` becomes NaN and NaNs are kept: :func:`~particlewatch.analysis.segment.segment`
treats them as missing and drops particles touching them, which filling with a constant would
hide (a filled patch can look like a particle or cut one in half).
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..frames import mdoc_frame_meta, read_mdoc

__all__ = ["read_frame", "Frame", "FrameError", "FRAME_SUFFIXES", "unit_to_nm",
           "MIN_SIDE_PX"]

#: Suffixes :func:`read_frame` reads (lower case).
FRAME_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".dm3", ".dm4", ".ser", ".emd")

#: Frames narrower than this cannot hold a measurable particle away from the border.
MIN_SIDE_PX = 16
#: Pixel sizes outside this range (nm) are not electron-microscope pixels (e.g. a TIFF's 72 dpi).
PLAUSIBLE_PIXEL_NM = (1e-3, 1e4)
#: The largest frame side accepted: beyond it a header is corrupt, not a camera.
MAX_SIDE_PX = 65536
#: More missing (non-finite) pixels than this fraction and the frame fails.
MAX_NONFINITE_FRACTION = 0.5

_MRC_HEADER_BYTES = 1024
_MRC_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
_NCEMPY_SUFFIXES = (".dm3", ".dm4", ".ser", ".emd")

# Length units to nm. Keys are normalised with _unit_key (lower case, no "_" or spaces), so
# Berkeley EMD's "n_m" and "u_m" land on "nm" and "um".
_UNIT_NM = {
    "a": 0.1, "å": 0.1, "angstrom": 0.1, "angstroms": 0.1, "ang": 0.1,
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0, "nanometres": 1.0,
    "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3,
    "micrometers": 1e3, "micrometre": 1e3, "micrometres": 1e3,
    "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "centimeter": 1e7,
    "m": 1e9, "meter": 1e9, "meters": 1e9, "metre": 1e9, "metres": 1e9,
    "pm": 1e-3, "picometer": 1e-3,
}


class FrameError(ValueError):
    """A frame that cannot be read; ``str(err)`` is ``"<path>: <reason>"`` on one line.

    Attributes
    ----------
    path : str
        The file.
    reason : str
        Why it cannot be used, one line.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}")


@dataclass
class Frame:
    """One micrograph ready for analysis.

    Attributes
    ----------
    image : (M, N) ndarray of float32 or float64
        The pixel values; missing pixels are NaN.
    pixel_nm : float
        Pixel size in nm.
    meta : dict
        ``defocus_um``, ``stage_x_um``, ``stage_y_um`` (None when unknown), ``format``,
        ``pixel_source`` (``"header"``, ``"mdoc"`` or ``"given"``), ``shape_in_file``,
        ``nonfinite_px`` and ``warnings`` (list of str), plus format extras.
    """

    image: np.ndarray
    pixel_nm: float
    meta: dict = field(default_factory=dict)


def unit_to_nm(unit):
    """Factor converting a length unit to nm (``'Å'`` → 0.1, ``'n_m'`` → 1, ``'µm'`` → 1000).

    Parameters
    ----------
    unit : str

    Returns
    -------
    float or None
        None for an unknown or empty unit (``'pixel'``, ``''``).

    Examples
    --------
    >>> unit_to_nm("u_m"), unit_to_nm("A"), unit_to_nm("pixel") is None
    (1000.0, 0.1, True)
    """
    if unit is None:
        return None
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    key = _unit_key(str(unit))
    return _UNIT_NM.get(key)


def _unit_key(text):
    # ImageJ writes µ as the escape text "\u00B5"; Greek mu (U+03BC) looks the same
    key = re.sub(r"[\s_]", "", text).lower().replace("\\u00b5", "µ").replace("μ", "µ")
    return "µm" if key == "um" else key


def read_frame(path, *, pixel_nm=None):
    """Read the first image of a frame file and its pixel size.

    Parameters
    ----------
    path : str or path-like
        An MRC/MRCS (with an optional ``.mdoc`` beside it, ``X.mrc.mdoc`` or ``X.mdoc``), TIFF,
        DM3/DM4, SER or EMD file.
    pixel_nm : float, optional
        Pixel size to use when neither the file nor its ``.mdoc`` gives one.

    Returns
    -------
    Frame

    Raises
    ------
    FrameError
        Empty, truncated, corrupt, unsupported or too small files, frames without finite
        pixels, and frames without a pixel size (``"no pixel size in header or .mdoc; pass
        --pixel-nm"``).

    Examples
    --------
    >>> from particlewatch.frames import write_frame
    >>> import tempfile
    >>> p = write_frame(Path(tempfile.mkdtemp()) / "f.mrc", np.ones((32, 32)), pixel_nm=0.5)
    >>> read_frame(p).pixel_nm
    0.5
    """
    path = Path(path)
    given = _validate_pixel_nm(path, pixel_nm)
    suffix = path.suffix.lower()
    if suffix not in FRAME_SUFFIXES:
        raise FrameError(path, f"unsupported file type {path.suffix or '(no suffix)'!r}; "
                               f"readable: {', '.join(FRAME_SUFFIXES)}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FrameError(path, "file not found") from None
    except OSError as exc:
        raise FrameError(path, f"unreadable: {exc.strerror or exc}") from None
    if not path.is_file():
        raise FrameError(path, "not a regular file")
    if size == 0:
        raise FrameError(path, "empty file (0 bytes)")

    if suffix in (".mrc", ".mrcs"):
        image, header_nm, meta = _read_mrc(path, size)
    elif suffix in (".tif", ".tiff"):
        image, header_nm, meta = _read_tiff(path)
    else:
        image, header_nm, meta = _read_ncempy(path)

    image = _check_image(path, image, meta)
    meta.setdefault("warnings", [])
    mdoc = _mdoc_meta(path, meta) if suffix in (".mrc", ".mrcs") else {}
    for key in ("defocus_um", "stage_x_um", "stage_y_um"):
        value = mdoc.get(key)
        meta[key] = float(value) if value is not None else meta.get(key)
    for key in ("magnification", "exposure_s", "datetime"):
        if mdoc.get(key) is not None:
            meta[key] = mdoc[key]
    pixel, source = _choose_pixel_nm(path, header_nm, mdoc.get("pixel_nm"), given, meta)
    meta["pixel_source"] = source
    return Frame(image=image, pixel_nm=pixel, meta=meta)


# -- pixel size -----------------------------------------------------------------------------

def _validate_pixel_nm(path, pixel_nm):
    if pixel_nm is None:
        return None
    try:
        value = float(pixel_nm)
    except (TypeError, ValueError):
        raise FrameError(path, f"pixel_nm {pixel_nm!r} must be a positive number") from None
    if not np.isfinite(value) or value <= 0:
        raise FrameError(path, f"pixel_nm {pixel_nm!r} must be a positive number")
    return value


def _plausible(value_nm):
    return (value_nm is not None and np.isfinite(value_nm)
            and PLAUSIBLE_PIXEL_NM[0] <= value_nm <= PLAUSIBLE_PIXEL_NM[1])


def _choose_pixel_nm(path, header_nm, mdoc_nm, given_nm, meta):
    """Header, then .mdoc, then the caller's value (see the module docstring for why)."""
    warnings = meta["warnings"]
    if header_nm is not None and not _plausible(header_nm):
        warnings.append(f"header pixel size {header_nm:.6g} nm is implausible; ignored")
        header_nm = None
    if mdoc_nm is not None and not _plausible(mdoc_nm):
        warnings.append(f".mdoc PixelSpacing {mdoc_nm:.6g} nm is implausible; ignored")
        mdoc_nm = None
    if header_nm is not None:
        if mdoc_nm is not None and abs(mdoc_nm - header_nm) > 0.01 * header_nm:
            warnings.append(f"header pixel size {header_nm:.6g} nm differs from .mdoc "
                            f"{mdoc_nm:.6g} nm; using the header")
        return float(header_nm), "header"
    if mdoc_nm is not None:
        return float(mdoc_nm), "mdoc"
    if given_nm is not None:
        return float(given_nm), "given"
    extra = f" ({warnings[-1]})" if warnings else ""
    raise FrameError(path, f"no pixel size in header or .mdoc; pass --pixel-nm{extra}")


def _square_pixel_nm(path, sizes_nm):
    """One pixel size from per-axis sizes (y, x); non-square pixels cannot be measured in nm."""
    sizes = [s for s in sizes_nm if s is not None]
    if not sizes:
        return None
    lo, hi = min(sizes), max(sizes)
    if hi > 1.02 * lo:
        raise FrameError(path, f"non-square pixels ({' x '.join(f'{s:.6g}' for s in sizes)} "
                               f"nm) are not supported")
    return float(np.mean(sizes))


# -- image checks ---------------------------------------------------------------------------

def _check_image(path, image, meta):
    """2-D, large enough, real, with enough finite pixels; returns float32/float64."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise FrameError(path, f"expected a 2-D image, got shape {image.shape}")
    if image.dtype.kind == "c":
        raise FrameError(path, f"complex pixel data ({image.dtype}) is not an image")
    if image.dtype.kind not in "biuf":
        raise FrameError(path, f"pixel data of type {image.dtype} is not numeric")
    if min(image.shape) < MIN_SIDE_PX:
        raise FrameError(path, f"image {image.shape[1]} x {image.shape[0]} px is too small "
                               f"(need at least {MIN_SIDE_PX} px a side)")
    dtype = np.float64 if image.dtype in (np.float64, np.int64, np.uint64) else np.float32
    image = np.array(image, dtype=dtype, copy=True)  # own, writable, native byte order
    finite = np.isfinite(image)
    n_bad = int(image.size - np.count_nonzero(finite))
    meta["nonfinite_px"] = n_bad
    if n_bad:
        if n_bad == image.size:
            raise FrameError(path, "no finite pixels (all NaN or inf)")
        if n_bad > MAX_NONFINITE_FRACTION * image.size:
            raise FrameError(path, f"{100 * n_bad / image.size:.0f}% of pixels are NaN or inf")
        image[~finite] = np.nan
        meta.setdefault("warnings", []).append(
            f"{n_bad} NaN/inf pixels treated as missing")
    return image


def _first_image(path, data, meta, what="stack"):
    """The first 2-D image of ``data`` (noted in ``meta``), or ``data`` itself."""
    data = np.asarray(data) if not isinstance(data, np.memmap) else data
    if data.ndim > 2:
        meta["shape_in_file"] = tuple(int(n) for n in data.shape)
        meta.setdefault("warnings", []).append(
            f"{what} of {int(np.prod(data.shape[:-2]))} images; using the first")
        while data.ndim > 2:
            data = data[0]
    return data


# -- MRC ------------------------------------------------------------------------------------

def _mrc_header(path, size):
    """Check the fixed MRC header against the file size before any data is read."""
    if size < _MRC_HEADER_BYTES:
        raise FrameError(path, f"truncated MRC: {size} bytes, shorter than the "
                               f"{_MRC_HEADER_BYTES}-byte header")
    with open(path, "rb") as fh:
        head = fh.read(_MRC_HEADER_BYTES)
    if head[208:211] != b"MAP":
        raise FrameError(path, f"not an MRC file (map ID {head[208:212]!r}, expected b'MAP ')")
    stamp = head[212]
    endian = ">" if stamp == 0x11 else "<"  # 0x44/0x41 little endian; 0x11 big endian
    nx, ny, nz, mode = struct.unpack(endian + "4i", head[:16])
    mx = struct.unpack(endian + "i", head[28:32])[0]
    cella_x = struct.unpack(endian + "f", head[40:44])[0]
    nsymbt = struct.unpack(endian + "i", head[92:96])[0]
    if mode not in _MRC_MODE_BYTES:
        raise FrameError(path, f"bad MRC header: unsupported mode {mode}")
    if min(nx, ny, nz) < 1 or max(nx, ny) > MAX_SIDE_PX or nz > 10**7:
        raise FrameError(path, f"bad MRC header: dimensions {nx} x {ny} x {nz}")
    if nsymbt < 0 or nsymbt > size:
        raise FrameError(path, f"bad MRC header: extended header of {nsymbt} bytes")
    expected = _MRC_HEADER_BYTES + nsymbt + nx * ny * nz * _MRC_MODE_BYTES[mode]
    if size < expected:
        raise FrameError(path, f"truncated MRC: {size} bytes, header says {nx} x {ny} x {nz} "
                               f"mode {mode} needs {expected}")
    header_nm = None
    if mx > 0 and np.isfinite(cella_x):
        angstrom = cella_x / mx
        # 0 Å and 1 Å are the "unset" values of the MRC format and many converters
        if angstrom > 0 and not np.isclose(angstrom, 1.0, rtol=1e-6, atol=0):
            header_nm = angstrom / 10.0
    return (nx, ny, nz, mode), header_nm


def _read_mrc(path, size):
    dims, header_nm = _mrc_header(path, size)
    meta = {"format": "mrc", "shape_in_file": (dims[2], dims[1], dims[0]), "warnings": []}
    try:
        image = _mrc_first_image(path, meta, permissive=False)
    except FrameError:
        raise
    except Exception as strict:  # mrcfile raises ValueError/OSError with multi-line texts
        # The fixed header already passed our checks (magic, dims, size); what strict mode
        # still rejects is minor (a zero machine stamp from some writers): read it anyway.
        try:
            image = _mrc_first_image(path, meta, permissive=True)
        except Exception:
            raise FrameError(path, f"cannot read MRC: {_one_line(strict)}") from None
        meta["warnings"].append(f"MRC header not strictly valid ({_one_line(strict)}); "
                                f"read permissively")
    return image, header_nm, meta


def _mrc_first_image(path, meta, *, permissive):
    import mrcfile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mrcfile.mmap(path, mode="r", permissive=permissive) as mrc:
            if mrc.data is None:
                raise ValueError("no data block")
            data = _first_image(path, mrc.data, meta)
            image = np.array(data)  # copy out of the memory map before it closes
    meta["warnings"].extend(_one_line(w.message) for w in caught)
    return image


def _mdoc_path(path):
    for candidate in (path.with_name(path.name + ".mdoc"), path.with_suffix(".mdoc")):
        if candidate.is_file():
            return candidate
    return None


def _mdoc_meta(path, meta):
    mdoc = _mdoc_path(path)
    if mdoc is None:
        return {}
    try:
        info = mdoc_frame_meta(read_mdoc(mdoc))
    except (OSError, ValueError) as exc:
        meta["warnings"].append(f"{mdoc.name} unreadable ({_one_line(exc)}); ignored")
        return {}
    meta["mdoc"] = str(mdoc)
    return info


# -- TIFF -----------------------------------------------------------------------------------

def _read_tiff(path):
    import tifffile

    meta = {"format": "tiff", "warnings": []}
    try:
        with _quiet_logger("tifffile"), tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise FrameError(path, "cannot read TIFF: no image in the file")
            series = tif.series[0] if tif.series else None
            page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
            data = (series.asarray() if series is not None else page.asarray())
            axes = series.axes if series is not None else ""
            header_nm = _tiff_pixel_nm(path, tif, page, meta)
            if len(tif.pages) > 1 and (series is None or data.ndim == 2):
                meta["warnings"].append(f"{len(tif.pages)} pages; using the first")
    except FrameError:
        raise
    except Exception as exc:  # tifffile.TiffFileError and struct/OS errors on damaged files
        raise FrameError(path, f"cannot read TIFF: {_one_line(exc)}") from None
    data = np.asarray(data)
    if data.ndim == 3 and axes.endswith("S") and data.shape[-1] in (3, 4):
        meta["warnings"].append("colour TIFF; using the mean of the RGB channels")
        data = data[..., :3].astype(np.float32).mean(axis=-1)
    data = _first_image(path, data, meta, what="TIFF series")
    return data, header_nm, meta


def _tiff_pixel_nm(path, tif, page, meta):
    """Pixel size from FEI/Thermo metadata, ImageJ's unit or the resolution tags (nm)."""
    fei = getattr(tif, "fei_metadata", None)
    if fei:
        scan = fei.get("Scan", {}) or {}
        width_m = scan.get("PixelWidth")
        if width_m:
            meta["tiff_pixel_source"] = "FEI metadata"
            return float(width_m) * 1e9
    tags = page.tags
    xres = tags.get("XResolution")
    yres = tags.get("YResolution")
    if xres is None:
        return None
    sizes = []
    for tag in (yres, xres):
        if tag is None:
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        sizes.append(den / num if num else None)  # resolution is pixels per unit
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    ij = tif.imagej_metadata or {}
    factor = None
    if ij.get("unit") is not None:
        factor = unit_to_nm(ij["unit"])
        if factor is None and str(ij["unit"]).lower() not in ("pixel", "pixels", ""):
            meta["warnings"].append(f"unknown ImageJ unit {ij['unit']!r}; ignored")
        source = f"ImageJ unit {ij['unit']!r}"
    elif unit == 3:  # centimetre
        factor, source = 1e7, "resolution tags (cm)"
    else:
        # inch (or none): a print/screen resolution such as 72 dpi, not a pixel size
        return None
    if factor is None or not all(sizes):
        return None
    meta["tiff_pixel_source"] = source
    return _square_pixel_nm(path, [s * factor for s in sizes])


# -- DM3/DM4, SER, EMD through ncempy -------------------------------------------------------

def _read_ncempy(path):
    import ncempy.io

    kind = path.suffix.lower().lstrip(".")
    meta = {"format": kind, "warnings": []}
    try:
        # ncempy prints instead of raising in places; keep the batch's output clean
        with contextlib.redirect_stdout(_io.StringIO()):
            out = ncempy.io.read(path)
    except Exception as exc:  # each ncempy reader raises its own types on damaged files
        raise FrameError(path, f"cannot read {kind.upper()}: {_one_line(exc)}") from None
    if not isinstance(out, dict) or out.get("data") is None:
        raise FrameError(path, f"cannot read {kind.upper()}: no image data found")
    data = np.asarray(out["data"])
    if data.ndim < 2:
        raise FrameError(path, f"expected an image, got data of shape {data.shape}")
    sizes = _as_list(out.get("pixelSize"))
    units = _as_list(out.get("pixelUnit"))
    header_nm = None
    if sizes:
        # per-axis lists run (..., y, x); the image axes are the last two
        sizes = sizes[-2:] if len(sizes) >= 2 else sizes
        units = (units[-2:] if len(units) >= 2 else units * len(sizes)) if units else []
        nm = []
        for s, u in zip(sizes, units or [None] * len(sizes)):
            factor = unit_to_nm(u)
            if factor is None:
                if u not in (None, "", "pixel", "pixels", "px"):
                    meta["warnings"].append(f"unknown pixel unit {u!r}; ignored")
                nm.append(None)
            else:
                nm.append(float(s) * factor)
        if all(v is not None and v > 0 for v in nm):
            header_nm = _square_pixel_nm(path, nm)
    data = _first_image(path, data, meta, what=f"{kind.upper()} stack")
    if kind in ("dm3", "dm4"):
        meta.update(_dm_meta(path))
    return data, header_nm, meta


def _dm_meta(path):
    """Stage position (µm, as Gatan records it) and magnification from DM tags, if present."""
    from ncempy.io import dm

    try:
        with contextlib.redirect_stdout(_io.StringIO()), dm.fileDM(path) as f:
            tags = f.getMetadata(0)
    except Exception:  # the image was read; missing or odd tags only cost the metadata
        return {}
    out = {}
    for key, name in (("Microscope Info Stage Position Stage X", "stage_x_um"),
                      ("Microscope Info Stage Position Stage Y", "stage_y_um"),
                      ("Microscope Info Indicated Magnification", "magnification")):
        value = tags.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            out[name] = float(value)
    return out


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _one_line(exc):
    text = " ".join(str(exc).split())
    # bare texts such as "0" (an IndexError) say nothing without the exception's type
    return text if len(text) > 12 else f"{type(exc).__name__} {text}".strip()


@contextlib.contextmanager
def _quiet_logger(name):
    """Silence a library's logger for one read: the batch reports the failure in one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
