"""The run learns its particles' contrast, and film alarms of the other sign are not raised."""

import numpy as np
import pytest

from particlewatch.acquisition.plans import AreaProgress, SegmentSettings, _vote_polarity
from particlewatch.acquisition.segments import record_particles, record_polarity
from particlewatch.simulators.scope import SimScope


def _record_at_particles(sample, detector, seed=3):
    """A 512 px record frame centred on a simulated particle, and one on bare film."""
    scope = SimScope(sample, seed=seed, size_px=512, detector=detector)
    rng = np.random.default_rng(seed)
    while True:
        x, y = rng.uniform(-40, 40, 2)
        if scope.specimen.density(x, y) >= 0.5:
            break
    scope.move_stage(x, y)
    scope.set_mode("record")
    scope.set_defocus(scope.true_focus_um(x, y))
    return scope.snap()


@pytest.mark.parametrize("sample,detector,expected", [
    ("au10", "bf", "dark"), ("au10", "haadf", "bright"),
    ("ps100", "bf", "dark"), ("ps100", "haadf", "bright")])
def test_record_polarity_is_the_detectors_contrast(sample, detector, expected):
    snap = _record_at_particles(sample, detector)
    assert record_polarity(snap.image, snap.pixel_nm) == expected


def test_record_polarity_of_a_flat_frame_is_unknown():
    rng = np.random.default_rng(0)
    image = rng.poisson(1000.0, (256, 256)).astype(float)
    assert record_polarity(image, 1.0) is None


def test_known_contrast_raises_no_alarm_on_a_blob_of_the_other_sign():
    # bare film with one bright thin spot, in bright field (particles are dark there): the
    # sign-blind check alarms on it, the check that knows the contrast does not
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[:512, :512]
    spot = np.hypot(rows - 256, cols - 256) <= 8
    image = rng.poisson(np.where(spot, 1300.0, 1000.0)).astype(float)
    assert len(record_particles(image, 1.0, polarity="auto")[0]) > 0
    assert len(record_particles(image, 1.0, polarity="dark")[0]) == 0


def test_polarity_is_learnt_from_agreeing_records_only():
    progress = AreaProgress.start(SegmentSettings())
    for vote in ("dark", None, "dark"):
        _vote_polarity(progress, vote)
    assert progress.polarity is None  # two votes are not enough
    _vote_polarity(progress, "dark")
    assert progress.polarity == "dark"
    # records that disagree more than one in ten do not fix a contrast
    mixed = AreaProgress.start(SegmentSettings())
    for vote in ("dark", "bright", "dark", "dark", "dark", "dark"):
        _vote_polarity(mixed, vote)
    assert mixed.polarity is None
    # the learnt contrast is carried to a resumed run
    again = AreaProgress.from_dict(progress.to_dict(), SegmentSettings())
    assert again.polarity == "dark"


def test_the_detector_sets_the_contrast_where_the_backend_names_it():
    from particlewatch.acquisition.backends import SerialEMMicroscope, SimulatedMicroscope
    from particlewatch.acquisition.runner import detector_polarity
    from particlewatch.simulators import serialem_module

    for detector, polarity in (("haadf", "bright"), ("bf", "dark")):
        scope = SimulatedMicroscope(SimScope("au10", size_px=256, detector=detector))
        assert detector_polarity(scope, SegmentSettings()).polarity == polarity
        # settings that name a contrast win
        other = {"dark": "bright", "bright": "dark"}[polarity]
        assert detector_polarity(scope, SegmentSettings(polarity=other)).polarity == other
    # SerialEM says what the user told it; unnamed, the contrast is left to be learnt
    serialem_module.attach(SimScope("au10", size_px=256))
    try:
        assert detector_polarity(SerialEMMicroscope(serialem_module),
                                 SegmentSettings()).polarity == "auto"
        assert detector_polarity(SerialEMMicroscope(serialem_module, detector="HAADF"),
                                 SegmentSettings()).polarity == "bright"
    finally:
        serialem_module.detach()
