"""A fast stand-in analysis for the daemon tests, importable by worker processes.

Test frames carry their ground truth in their pixels: row 0 holds the particle count and
then each particle's ECD in 0.01 nm, so the daemon's outputs can be checked against what
was written without depending on image-analysis speed. Worker processes import this module
as ``test_daemon_fakes`` (the tests put ``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from particlewatch.frames import write_frame

COLUMNS = ("particle_id", "x_px", "y_px", "area_nm2", "ecd_nm", "feret_max_nm", "feret_min_nm",
           "perimeter_nm", "circularity", "convexity", "solidity", "aspect_ratio",
           "major_axis_nm", "minor_axis_nm", "separated")


def encode_frame(path, ecd_nm, *, size=32, pixel_nm=1.0, index=0) -> Path:
    """Write an MRC frame whose first row encodes ``ecd_nm`` (the truth of the fake)."""
    image = np.full((size, size), 100, dtype=np.uint16)
    image[0, 0] = len(ecd_nm)
    image[0, 1:1 + len(ecd_nm)] = np.round(np.asarray(ecd_nm) * 100).astype(np.uint16)
    return write_frame(path, image, pixel_nm=pixel_nm,
                       section={"StagePosition": (float(index), 0.0), "Defocus": -1.0})


def truth_ecds(rng, n_frames, *, per_frame=(3, 8)) -> list[np.ndarray]:
    """ECDs of two populations (10 nm and 25 nm) for ``n_frames`` frames."""
    out = []
    for _ in range(n_frames):
        n = int(rng.integers(*per_frame))
        big = rng.random(n) < 0.3
        out.append(np.where(big, rng.normal(25, 1.0, n), rng.normal(10, 0.5, n)).round(2))
    return out


def fake_analyze(path, **options):
    """Decode the particles written by :func:`encode_frame`; fail like the real analysis."""
    import mrcfile

    start = time.perf_counter()
    name = Path(path).name
    base = {"frame": Path(path).stem, "path": str(path), "pixel_nm": 1.0, "defocus_um": -1.0,
            "stage_x_um": None, "stage_y_um": 0.0}
    crash_marker = os.environ.get("PW_FAKE_CRASH_ONCE")  # a file: crash while it exists
    if crash_marker and name.endswith("_crash.mrc") and os.path.exists(crash_marker):
        os.unlink(crash_marker)
        os._exit(3)  # a worker dying mid-frame
    if os.environ.get("PW_FAKE_DELAY_S"):
        time.sleep(float(os.environ["PW_FAKE_DELAY_S"]))
    try:
        with mrcfile.open(path, permissive=False) as mrc:
            row = np.asarray(mrc.data)[0].astype(float)
    except Exception as exc:
        return {**base, "status": "failed", "reason": f"{path}: cannot read MRC: {exc}",
                "seconds": time.perf_counter() - start, "particles": {}}
    n = int(row[0])
    if n > len(row) - 1:
        return {**base, "status": "failed", "reason": f"{path}: not a fake-encoded frame",
                "seconds": time.perf_counter() - start, "particles": {}}
    ecd = row[1:1 + n] / 100.0
    area = np.pi * ecd ** 2 / 4
    particles = {c: np.zeros(n) for c in COLUMNS}
    particles.update(particle_id=np.arange(1, n + 1), x_px=np.arange(n) * 3.0 + 1,
                     y_px=np.full(n, 5.0), area_nm2=area, ecd_nm=ecd, feret_max_nm=ecd,
                     feret_min_nm=ecd, perimeter_nm=np.pi * ecd, circularity=np.ones(n),
                     convexity=np.ones(n), solidity=np.ones(n), aspect_ratio=np.ones(n),
                     major_axis_nm=ecd, minor_axis_nm=ecd, separated=np.zeros(n, bool))
    return {**base, "status": "ok", "reason": None, "seconds": 0.0,
            "particles": {k: v.tolist() for k, v in particles.items()}}
