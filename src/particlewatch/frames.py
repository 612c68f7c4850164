"""Frames on disk: the durable queue between acquisition and the daemon.

A frame is an MRC file with a SerialEM-style ``.mdoc`` autodoc beside it
(``frame_00001.mrc`` + ``frame_00001.mrc.mdoc``). Both are written under temporary
names and renamed, the ``.mdoc`` first, so a reader never sees half a frame: once the
``.mrc`` exists under its final name, both files are complete.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

#: Names a writer uses while a file is incomplete; watchers must ignore them.
TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def is_temporary_name(path: str | os.PathLike) -> bool:
    """True for names that a writer has not finished yet (``.x.part``, ``x.tmp``, ...)."""
    name = Path(path).name
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


def _fmt(value) -> str:
    if isinstance(value, (tuple, list, np.ndarray)):
        return " ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_mdoc(image_file: str, shape_yx: tuple[int, int], *, pixel_nm: float,
                section: Mapping[str, object], data_mode: int = 6,
                title: str = "particlewatch frame") -> str:
    """Return the text of a SerialEM ``.mdoc`` for a single-image file.

    Parameters
    ----------
    image_file : str
        Name of the image file the autodoc describes.
    shape_yx : tuple of int
        Image shape (rows, columns); written as ``ImageSize = X Y``.
    pixel_nm : float
        Pixel size in nm; ``PixelSpacing`` is written in Å as SerialEM does.
    section : mapping
        Keys of the ``[ZValue = 0]`` section (``StagePosition``, ``Defocus``, ...).
    """
    pixel_a = pixel_nm * 10.0
    lines = [
        f"PixelSpacing = {_fmt(pixel_a)}",
        "Voltage = 300",
        f"ImageFile = {image_file}",
        f"ImageSize = {shape_yx[1]} {shape_yx[0]}",
        f"DataMode = {data_mode}",
        "",
        f"[T = {title}]",
        "",
        "[ZValue = 0]",
        "TiltAngle = 0",
    ]
    body = {"PixelSpacing": pixel_a, **section}
    for key, value in body.items():
        lines.append(f"{key} = {_fmt(value)}")
    lines.append("")
    return "\n".join(lines)


def serialem_datetime(when: _dt.datetime | None = None) -> str:
    """SerialEM's ``DateTime`` format (``dd-Mon-yyyy  HH:MM:SS``, 4-digit year since 4.1)."""
    when = when or _dt.datetime.now()
    return when.strftime("%d-%b-%Y  %H:%M:%S")


def parse_mdoc(text: str) -> dict:
    """Parse autodoc text into ``{"global": {...}, "sections": [{...}, ...]}``.

    Values stay strings; ``[ZValue = n]`` sections carry their number under ``"ZValue"``.
    ``[T = ...]`` title sections are kept in ``"titles"``. Unlike pyserialem's reader the
    global header (where the frame-wide ``PixelSpacing`` lives) is returned.
    """
    result: dict = {"global": {}, "sections": [], "titles": []}
    current = result["global"]
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = re.fullmatch(r"\[\s*(\w+)\s*=\s*(.*?)\s*\]", line)
        if m:
            key, value = m.groups()
            if key == "ZValue":
                current = {"ZValue": value}
                result["sections"].append(current)
            elif key == "T":
                result["titles"].append(value)
                current = {}  # title sections hold no per-image keys we use
            else:
                current = {}
            continue
        if "=" in line:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return result


def read_mdoc(path: str | os.PathLike) -> dict:
    """Read and parse a ``.mdoc`` file (see :func:`parse_mdoc`)."""
    return parse_mdoc(Path(path).read_text(encoding="utf-8", errors="replace"))


def _floats(text: str | None) -> list[float]:
    if text is None:
        return []
    out = []
    for token in text.split():
        try:
            out.append(float(token))
        except ValueError:
            return []
    return out


def mdoc_frame_meta(mdoc: dict, z: int = 0) -> dict:
    """Metadata of image ``z`` from a parsed ``.mdoc``, in explicit units.

    Returns a dict with ``pixel_nm``, ``defocus_um``, ``stage_x_um``, ``stage_y_um``,
    ``magnification``, ``exposure_s``, ``datetime`` (each None when absent). The section's
    ``PixelSpacing`` wins over the global one; both are in Å.
    """
    section = {}
    for s in mdoc.get("sections", []):
        if str(s.get("ZValue", "")).strip() == str(z):
            section = s
            break
    glob = mdoc.get("global", {})

    def first(key):
        values = _floats(section.get(key)) or _floats(glob.get(key))
        return values[0] if values else None

    spacing_a = first("PixelSpacing")
    stage = _floats(section.get("StagePosition"))
    return {
        "pixel_nm": spacing_a / 10.0 if spacing_a and spacing_a > 0 else None,
        "defocus_um": first("Defocus"),
        "stage_x_um": stage[0] if len(stage) >= 2 else None,
        "stage_y_um": stage[1] if len(stage) >= 2 else None,
        "magnification": first("Magnification"),
        "exposure_s": first("ExposureTime"),
        "datetime": section.get("DateTime"),
    }


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary ``.NAME.part`` file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_frame(path: str | os.PathLike, image: np.ndarray, *, pixel_nm: float,
                section: Mapping[str, object] | None = None) -> Path:
    """Write ``image`` as an MRC frame plus its ``.mdoc``, atomically.

    Parameters
    ----------
    path : path-like
        Final ``.mrc`` path.
    image : ndarray, 2-D
        Integer counts are stored as uint16 (MRC mode 6, as SerialEM saves unsigned
        camera data) when they fit; anything else as float32 (mode 2).
    pixel_nm : float
        Pixel size, written to the MRC header (in Å) and to ``.mdoc`` ``PixelSpacing``.
    section : mapping, optional
        ``[ZValue = 0]`` keys such as ``StagePosition``, ``Defocus`` (µm),
        ``Magnification``, ``ExposureTime``; ``DateTime`` is added if missing.

    Returns
    -------
    Path
        The path of the written ``.mrc``.
    """
    import mrcfile

    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{path}: frame must be 2-D, got shape {image.shape}")
    if not (pixel_nm and pixel_nm > 0):
        raise ValueError(f"{path}: pixel_nm must be > 0, got {pixel_nm!r}")
    if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() < 65536:
        data, mode = image.astype(np.uint16), 6
    else:
        data, mode = image.astype(np.float32), 2

    section = dict(section or {})
    section.setdefault("DateTime", serialem_datetime())
    mdoc_text = format_mdoc(path.name, data.shape, pixel_nm=pixel_nm, section=section,
                            data_mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path.with_name(path.name + ".mdoc"), mdoc_text.encode())

    tmp = path.with_name(f".{path.name}.part")
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = pixel_nm * 10.0
        mrc.update_header_stats()
        # mrcfile stamps its creation time into label 0; a fixed label keeps a frame's
        # bytes a function of its pixels and metadata alone (reproducible for a seed).
        mrc.header.label[0] = b"particlewatch frame"
        mrc.header.nlabl = 1
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
