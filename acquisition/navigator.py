"""SerialEM navigator (``.nav``) files of acquired positions, through pyserialem.

Each position is a navigator point item (``Type = 0``) with its stage coordinates, so the
user can open the file in SerialEM's Navigator and revisit any frame.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"^[A-Za-z0-9_-]+$")  # what pyserialem's reader accepts as an item label


@dataclass(frozen=True)
class NavPosition:
    """A stage position to store: ``label`` (letters, digits, ``_`` and ``-``), µm, a note."""

    label: str
    x_um: float
    y_um: float
    z_um: float = 0.0
    note: str = ""


def _nav_item(position: NavPosition, group_id: int):
    from pyserialem import NavItem

    if not _TAG.match(position.label):
        raise ValueError(f"navigator label {position.label!r} may hold only letters, digits, "
                         "'_' and '-'")
    # pyserialem's reader splits on '=', so a note must not contain one.
    note = position.note.replace("=", ":").replace("\n", " ")
    d = {
        "Color": 0,
        "StageXYZ": [float(position.x_um), float(position.y_um), float(position.z_um)],
        "NumPts": 1,
        "Regis": 1,
        "Type": 0,
        "Acquire": 0,
        "GroupID": group_id,
        "PtsX": [float(position.x_um)],
        "PtsY": [float(position.y_um)],
    }
    if note:
        d["Note"] = note
    return NavItem(d, tag=position.label)


def write_navigator(path: str | os.PathLike, positions, *, group_id: int = 1) -> Path:
    """Write positions as a SerialEM ``.nav`` file, atomically (temporary name, rename).

    Parameters
    ----------
    path : path-like
        The ``.nav`` file.
    positions : iterable of NavPosition
    group_id : int
        SerialEM group of the items (one acquisition is one group).

    Returns
    -------
    Path
    """
    from pyserialem import write_nav_file

    path = Path(path)
    items = [_nav_item(p, group_id) for p in positions]
    tmp = path.with_name(f".{path.name}.part")
    write_nav_file(str(tmp), *items)
    # pyserialem leaves its file object to the garbage collector; make sure it is flushed
    # and closed before the rename.
    import gc

    gc.collect()
    text = tmp.read_text().replace(f"LastSavedAs = {tmp}", f"LastSavedAs = {path}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_navigator(path: str | os.PathLike) -> list[NavPosition]:
    """Read point items of a ``.nav`` file back (with pyserialem's ``read_nav_file``)."""
    from pyserialem import read_nav_file

    out = []
    for item in read_nav_file(str(path)):
        x, y, *rest = item.StageXYZ
        out.append(NavPosition(item.tag, float(x), float(y), float(rest[0]) if rest else 0.0,
                               str(getattr(item, "Note", ""))))
    return out
