"""separate(): UECS splits touching discs into correctly sized particles."""

import numpy as np
import pytest

from particlewatch.analysis.measure import measure
from particlewatch.analysis.separate import separate


def _discs(centres, radius, shape=(140, 200)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.any([(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2 for cy, cx in centres], axis=0)


@pytest.mark.parametrize("gap", [1.9, 1.7])  # centre distance in radii: touching, overlapping
def test_touching_pair_split_into_two_correct_sizes(gap):
    r = 25
    mask = _discs([(70, 60), (70, 60 + gap * r)], r)
    s = separate(mask.astype(np.int32), 1.0)
    assert s.labels.max() == 2 and s.separated[1:].all() and s.agglomerates == 0
    t = measure(s.labels, mask.astype(float), 1.0)
    # overlap is shared, so each particle loses at most part of the lens
    assert np.all(np.abs(t["ecd_nm"] / (2 * r) - 1) < 0.1)


def test_convex_particle_is_left_alone():
    mask = _discs([(70, 100)], 30)
    for method in ("uecs", "watershed", "none"):
        s = separate(mask.astype(np.int32), 1.0, method=method)
        assert s.labels.max() == 1 and not s.separated[1]


def test_none_keeps_pair_together_watershed_splits_it():
    mask = _discs([(70, 60), (70, 108)], 25)
    assert separate(mask.astype(np.int32), 1.0, method="none").labels.max() == 1
    assert separate(mask.astype(np.int32), 1.0, method="watershed").labels.max() == 2


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        separate(np.zeros((5, 5), int), 1.0, method="magic")
