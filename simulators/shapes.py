"""Particle shapes in projection: thickness, inside tests, outlines and exact measures.

Every shape lies flat on the support film with its centre at the origin and is rotated in
plane by ``angle`` (radians). Sizes are in nm; coordinates ``dx, dy`` are nm from the centre.
The parameters of one particle are ``a`` (main size), ``b`` (second size), ``shell`` and
``p``; their meaning per shape:

========  ===================================  =====================================
shape     a, b                                 projected thickness
========  ===================================  =====================================
sphere    diameter, diameter                   chord of the sphere, ``2·sqrt(R² − r²)``
capsule   outer diameter, outer diameter;      outer sphere's chord minus the inner
          ``shell`` = shell thickness          (hollow) sphere's chord: a ring
rod       length tip to tip, width             spherocylinder chord
cube      edge, edge; ``p`` = corner           constant ``a`` inside the superellipse
          sharpness                            ``|u|^p + |v|^p ≤ (a/2)^p``
========  ===================================  =====================================

The cube outline is the superellipse of SCIENCE.md §3 with ``d = 2`` and ``L = 1``:
``R(θ) = [|cos θ|^p + |sin θ|^p]^(-1/p)·a/2``, written in Cartesian form. Its area,
``a²·Γ(1+1/p)² / Γ(1+2/p)``, and Feret diameters are exact, so the ground truth does not depend
on how the outline is sampled.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

SHAPES = ("sphere", "capsule", "rod", "cube")
SPHERE, CAPSULE, ROD, CUBE = range(4)


def _rotate(dx, dy, angle):
    """Coordinates in the particle's own frame (u along its long axis)."""
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def thickness(code: int, dx, dy, *, a, b, shell, p, angle):
    """Projected thickness (nm) of particles of one shape at points ``dx, dy`` (nm).

    Parameters
    ----------
    code : int
        Shape code, an index into :data:`SHAPES`.
    dx, dy : ndarray
        Offsets from each particle's centre in nm; the parameters broadcast against them.
    a, b, shell, p, angle : ndarray or float
        Shape parameters (see the module docstring).

    Returns
    -------
    ndarray
        Thickness in nm, 0 outside the particle.
    """
    if code in (SPHERE, CAPSULE):
        r2 = dx * dx + dy * dy
        outer = 2.0 * np.sqrt(np.maximum((a * 0.5) ** 2 - r2, 0.0))
        if code == SPHERE:
            return outer
        inner_r = np.maximum(a * 0.5 - shell, 0.0)
        return outer - 2.0 * np.sqrt(np.maximum(inner_r ** 2 - r2, 0.0))
    u, v = _rotate(dx, dy, angle)
    if code == ROD:
        half_core = np.maximum(a - b, 0.0) * 0.5
        d2 = np.maximum(np.abs(u) - half_core, 0.0) ** 2 + v * v
        return 2.0 * np.sqrt(np.maximum((b * 0.5) ** 2 - d2, 0.0))
    if code == CUBE:
        half = a * 0.5
        inside = (np.abs(u) / half) ** p + (np.abs(v) / half) ** p <= 1.0
        return np.where(inside, a, 0.0).astype(np.result_type(dx, np.float32))
    raise ValueError(f"unknown shape code {code!r}")


def inside(code: int, dx, dy, *, a, b, p, angle, grow=0.0):
    """True where ``dx, dy`` lies inside the outline grown outwards by ``grow`` nm.

    Capsules count as their outer disc. For cubes the growth scales the superellipse, which
    is exact on the flat sides and close enough at the rounded corners for touch tests.
    """
    if code in (SPHERE, CAPSULE):
        return dx * dx + dy * dy <= (a * 0.5 + grow) ** 2
    u, v = _rotate(dx, dy, angle)
    if code == ROD:
        half_core = np.maximum(a - b, 0.0) * 0.5
        d2 = np.maximum(np.abs(u) - half_core, 0.0) ** 2 + v * v
        return d2 <= (b * 0.5 + grow) ** 2
    if code == CUBE:
        half = a * 0.5 + grow
        return (np.abs(u) / half) ** p + (np.abs(v) / half) ** p <= 1.0
    raise ValueError(f"unknown shape code {code!r}")


def outline(code: int, *, a, b, p, angle, n=64):
    """Points on the outline of each particle, shape ``(N, n, 2)`` as (dx, dy) in nm."""
    a, b, p, angle = (np.atleast_1d(np.asarray(x, dtype=float)) for x in (a, b, p, angle))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)[None, :]
    ct, st = np.cos(t), np.sin(t)
    if code in (SPHERE, CAPSULE):
        r = a[:, None] * 0.5
        u, v = r * ct, r * st
    elif code == ROD:
        half_core = np.maximum(a - b, 0.0)[:, None] * 0.5
        r = b[:, None] * 0.5
        # a stadium: a semicircle cap on each end, centred at ±half_core along u
        u = r * ct + np.sign(ct) * half_core
        v = r * st
    elif code == CUBE:
        pp = p[:, None]
        radius = (np.abs(ct) ** pp + np.abs(st) ** pp) ** (-1.0 / pp) * a[:, None] * 0.5
        u, v = radius * ct, radius * st
    else:
        raise ValueError(f"unknown shape code {code!r}")
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([u * c - v * s, u * s + v * c], axis=-1)


def measures(code: int, *, a, b, p):
    """Exact area (nm²), ECD, Feret max and Feret min (nm) of each particle's outline.

    Returns
    -------
    dict of ndarray
        ``area_nm2``, ``ecd_nm``, ``feret_max_nm``, ``feret_min_nm``. A capsule's outline
        is its outer disc (the hole is inside it), so its ECD is the outer diameter.
    """
    a, b, p = (np.asarray(x, dtype=float) for x in (a, b, p))
    if code in (SPHERE, CAPSULE):
        area = np.pi * a * a / 4.0
        fmax, fmin = a, a
    elif code == ROD:
        area = np.maximum(a - b, 0.0) * b + np.pi * b * b / 4.0
        fmax, fmin = np.maximum(a, b), b
    elif code == CUBE:
        area = a * a * np.exp(2.0 * gammaln(1.0 + 1.0 / p) - gammaln(1.0 + 2.0 / p))
        # p >= 2: the widest caliper is along the diagonal, the narrowest across the flats
        fmax = a * 2.0 ** (0.5 - 1.0 / p)
        fmin = a
    else:
        raise ValueError(f"unknown shape code {code!r}")
    ecd = np.sqrt(4.0 * area / np.pi)
    return {"area_nm2": area, "ecd_nm": ecd,
            "feret_max_nm": np.broadcast_to(fmax, np.shape(ecd)).astype(float),
            "feret_min_nm": np.broadcast_to(fmin, np.shape(ecd)).astype(float)}


def half_extents(code: int, *, a, b, p, angle):
    """Half-width of each particle's axis-aligned bounding box along x and y (nm)."""
    a, b, angle = (np.asarray(x, dtype=float) for x in (a, b, angle))
    if code in (SPHERE, CAPSULE):
        return a * 0.5, a * 0.5
    if code == ROD:
        half_core = np.maximum(a - b, 0.0) * 0.5
        return (half_core * np.abs(np.cos(angle)) + b * 0.5,
                half_core * np.abs(np.sin(angle)) + b * 0.5)
    if code == CUBE:
        pts = outline(code, a=a, b=b, p=p, angle=angle, n=256)
        # outline sampling can miss the true extreme by a hair: pad by 1%
        return np.abs(pts[..., 0]).max(-1) * 1.01, np.abs(pts[..., 1]).max(-1) * 1.01
    raise ValueError(f"unknown shape code {code!r}")
