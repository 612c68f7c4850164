"""One border rule for every judge of a record frame (segments.counted_part)."""

import numpy as np
import pytest

from particlewatch.acquisition.segments import (counted_part, film_only, peaks_inside,
                                                record_particle_peaks)


def _frame_with_disc(shape, centre, *, radius=7.0, seed=0):
    """A bright-field frame: flat film, shot noise, one dark disc whose centre of mass is
    exactly ``centre`` (the disc is symmetric about it on the pixel grid)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    # pixel centres at +0.5: a disc centred on a half-integer position is pixel-symmetric
    inside = np.hypot(rows - centre[0], cols - centre[1]) <= radius
    expected = np.where(inside, 600.0, 1000.0)
    return rng.poisson(expected).astype(np.float64)


@pytest.mark.parametrize("shape,bin_px", [((512, 512), 4), ((384, 448), 4), ((512, 512), 2)])
def test_film_only_and_peaks_inside_count_the_same_part_of_a_frame(shape, bin_px):
    margin = 0.05
    lo, hi = counted_part(shape, margin=margin, bin_px=bin_px)
    b = bin_px
    # the rule in binned pixels: at least 2, and margin x the binned size
    binned = np.asarray(shape) // b
    edge = np.maximum(2, np.floor(margin * binned)).astype(int)
    assert np.array_equal(lo, edge * b) and np.array_equal(hi, (binned - edge) * b)
    # peaks_inside: a peak is at its binned pixel's centre; counted iff in [lo, hi)
    peaks = np.array([[lo[0] - b + b // 2, shape[1] // 2], [lo[0] + b // 2, shape[1] // 2],
                      [shape[0] // 2, hi[1] - b + b // 2], [shape[0] // 2, hi[1] + b // 2]])
    kept = peaks_inside(peaks, shape, margin=margin, bin_px=bin_px)
    assert [tuple(p) for p in kept] == [tuple(peaks[1]), tuple(peaks[2])]
    # film_only: a particle centred half a pixel inside the counted part is counted, one
    # half a pixel outside it is not (the old full-resolution floor disagreed here)
    mid = shape[1] / 2 + 0.5
    for row, counted in ((lo[0] + 0.5, True), (lo[0] - 0.5, False),
                         (hi[0] - 0.5, True), (hi[0] + 0.5, False)):
        image = _frame_with_disc(shape, (row, mid))
        assert film_only(image, 1.0, margin=margin, bin_px=bin_px) is (not counted), row


def test_record_particle_peaks_counts_a_particle_film_only_counts():
    # the two judges on one frame: a particle well inside is seen by both
    shape = (512, 512)
    image = _frame_with_disc(shape, (256.5, 256.5))
    assert len(record_particle_peaks(image, 1.0, margin=0.05)) > 0
    assert not film_only(image, 1.0, margin=0.05)
