"""Autofocus: one refining image at a time, honest stopping, and the local focus measure.

Accuracy is checked against the simulator's true focus and depth of field (small frames);
image counts are checked against what the fit itself says (the centre's standard error),
never against numbers copied from a run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import particlewatch.acquisition.plans as plans
from particlewatch.acquisition.backends import SimulatedMicroscope
from particlewatch.acquisition.focus import (fit_focus_curve, focus_curve,
                                             local_band_sharpness, next_focus_image)
from particlewatch.acquisition.plans import (FocusSettings, LocalSharpness, SetDefocus, Snap,
                                             autofocus, quick_focus)
from particlewatch.acquisition.protocol import Frame
from particlewatch.acquisition.runner import run_plan
from particlewatch.acquisition.segments import particle_region
from particlewatch.simulators.scope import SimScope


def _position(scope, rng, *, low, high, min_particles=2):
    """A stage position of coverage in [low, high) whose record field holds particles."""
    scope.set_mode("record")
    while True:
        x, y = rng.uniform(-45, 45, 2)
        if not low <= scope.specimen.density(x, y) < high:
            continue
        scope.move_stage(x, y)
        if len(scope.snap(noise=False).truth["particles"]) >= min_particles:
            return float(x), float(y)


def _drive(plan, sharpness_at):
    """Step through a plan by hand, answering each Snap with a 64² frame whose every pixel
    is ``sharpness_at(defocus)`` (read back by a metric). Returns (result, defoci imaged)."""
    defocus, imaged, reply = 0.0, [], None
    try:
        while True:
            command = plan.send(reply)
            reply = None
            if isinstance(command, SetDefocus):
                defocus = command.defocus_um
            elif isinstance(command, Snap):
                imaged.append(defocus)
                reply = Frame(np.full((64, 64), sharpness_at(defocus)), 1.0, "record", 0, 0,
                              defocus, 1e4, 1)
    except StopIteration as done:
        return done.value, imaged


# --- the next refining image ------------------------------------------------------------------

def test_next_focus_image_goes_to_the_flank_least_pinned_and_predicts_the_gain():
    center, width, power = 0.02, 0.15, 0.8
    x = np.array([-0.6, -0.3, 0.0, 0.3, 0.6, 0.02 - 0.09])  # one flank image, on the left
    y = focus_curve(x, center, width, 10.0, 1.0, power)
    sd = np.full(x.size, 0.3)
    fit = fit_focus_curve(x, y, sd)
    assert fit.ok, fit
    x_next, predicted = next_focus_image(fit, x, sd)
    flank = width / math.sqrt(2 * power + 1)
    # on the right (the side no flank image pins yet), near the steepest point
    assert x_next > center
    assert abs(abs(x_next - center) - flank) < 0.75 * flank, (x_next, flank)
    # the prediction is what a fit with that image added reports (noise-free values)
    x2 = np.r_[x, x_next]
    after = fit_focus_curve(x2, focus_curve(x2, center, width, 10.0, 1.0, power),
                            np.r_[sd, 0.3])
    assert predicted < fit.center_sd
    assert after.center_sd == pytest.approx(predicted, rel=0.25)


def test_refining_images_are_added_one_at_a_time_until_the_centre_is_precise():
    """A noisy synthetic focus curve: the run ends at the first image whose fit reaches the
    precision asked for, and that fit's centre is right."""
    rng = np.random.default_rng(4)
    truth, noise = 0.137, 0.05

    def sharpness_at(d):
        return 1.0 + focus_curve(d, truth, 0.12, 2.0, 0.0, 0.7) + rng.normal(0, noise)

    settings = FocusSettings()
    metric = lambda image: (float(image[0, 0]), noise)  # noqa: E731
    for _ in range(5):
        result, imaged = _drive(autofocus(center_um=0.0, settings=settings, metric=metric),
                                sharpness_at)
        assert result.status == "ok" and result.images == len(imaged)
        assert result.center_sd_um <= settings.measurement_sd_um
        assert abs(result.defocus_um - truth) < 3 * settings.measurement_sd_um
        assert settings.steps < len(imaged) <= settings.max_images  # refined, within budget


def test_refining_stops_at_the_first_precise_fit():
    """With no noise beyond what is stated, the image before the last was not yet precise
    (the run did not take one image too many), checked by refitting what it had then."""
    noise = 0.05
    truth = -0.06

    def clean(d):
        return 1.0 + focus_curve(d, truth, 0.12, 2.0, 0.0, 0.7)

    rng = np.random.default_rng(11)
    values = {}

    def sharpness_at(d):
        values[d] = clean(d) + rng.normal(0, noise)
        return values[d]

    metric = lambda image: (float(image[0, 0]), noise)  # noqa: E731
    settings = FocusSettings()
    result, imaged = _drive(autofocus(center_um=0.0, settings=settings, metric=metric),
                            sharpness_at)
    assert result.status == "ok" and len(imaged) > settings.steps
    x = np.asarray(imaged)
    y = np.array([values[d] for d in imaged])
    before = fit_focus_curve(x[:-1], y[:-1], noise)
    assert not (before.ok and before.center_sd <= settings.measurement_sd_um)


def test_max_images_bounds_a_focus_run_that_cannot_reach_its_precision():
    rng = np.random.default_rng(2)

    def sharpness_at(d):  # a weak peak in heavy noise
        return 1.0 + focus_curve(d, 0.05, 0.12, 0.6, 0.0, 0.7) + rng.normal(0, 0.1)

    settings = FocusSettings(max_images=9)
    metric = lambda image: (float(image[0, 0]), 0.1)  # noqa: E731
    result, imaged = _drive(autofocus(center_um=0.0, settings=settings, metric=metric),
                            sharpness_at)
    assert len(imaged) <= 9 and result.images == len(imaged)
    if result.status == "ok":  # honest: it says how precise the answer is
        assert math.isfinite(result.center_sd_um)
    with pytest.raises(ValueError, match="max_images"):
        FocusSettings(max_images=4)


def test_under_sampled_is_judged_by_the_samples_around_the_centre():
    """A narrow peak between two coarse samples is under-sampled; the same coarse sweep with
    images added on the flanks resolves it (the check looks at the samples bracketing the
    centre, not the mean spacing)."""
    coarse = np.linspace(-0.6, 0.6, 5)
    center, width, power = 0.1, 0.05, 0.8
    sd = 0.02
    y = focus_curve(coarse, center, width, 5.0, 0.5, power)
    assert fit_focus_curve(coarse, y, sd).reason == "under-sampled"
    dense = np.r_[coarse, center - 0.04, center + 0.04, center]
    fit = fit_focus_curve(dense, focus_curve(dense, center, width, 5.0, 0.5, power), sd)
    assert fit.ok and fit.center == pytest.approx(center, abs=0.005)


# --- the local focus measure ------------------------------------------------------------------

def test_local_sharpness_refuses_an_image_of_another_shape():
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    metric = LocalSharpness(mask=mask)
    image = np.random.default_rng(0).poisson(100, (64, 64)).astype(float)
    value, noise = metric(image)
    assert math.isfinite(value) and noise > 0
    with pytest.raises(ValueError, match=r"\(shape \(80, 80\)\).*\(shape \(64, 64\)\)"):
        metric(np.ones((80, 80)))
    with pytest.raises(ValueError, match="at least 64"):
        LocalSharpness(mask=np.zeros((64, 64), bool))


def test_without_particles_each_sweep_image_is_measured_once(monkeypatch):
    scope = SimScope("empty", seed=1, size_px=128)
    calls = []
    original = plans.band_sharpness

    def counting(image, **kw):
        calls.append(np.shape(image))
        return original(image, **kw)

    monkeypatch.setattr(plans, "band_sharpness", counting)
    # the region search finds nothing (it may take a film speck for a particle on some
    # frames, which is not what this is about)
    monkeypatch.setattr(plans, "particle_region", lambda *args, **kwargs: None)
    result = run_plan(autofocus(center_um=0.0), SimulatedMicroscope(scope))
    assert result.status == "empty"
    assert len(calls) == result.images  # once per image, never twice


def test_a_given_particle_region_is_used_and_not_searched_again(monkeypatch):
    scope = SimScope("au10", seed=2, size_px=256)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng(3)
    _position(scope, rng, low=0.3, high=1.0, min_particles=3)
    truth = scope.true_focus_um()
    micro.set_defocus(truth + 0.15)  # the probe record, off focus as a best guess is
    probe = scope.snap().image
    region = particle_region(probe, scope.pixel_nm())
    assert region is not None

    def no_search(*args, **kwargs):
        raise AssertionError("the focus run searched for particles again")

    monkeypatch.setattr(plans, "particle_region", no_search)
    result = run_plan(autofocus(center_um=truth + 0.15, region=region), micro)
    assert result.status == "ok"
    assert abs(result.defocus_um - truth) <= scope.depth_of_field_um
    # a window cuts the region with it; the quick check takes it too
    window = (slice(0, 192), slice(32, 224))
    seen = []
    original = LocalSharpness.__call__

    def spy(self, image):
        seen.append((self.mask.shape, np.shape(image)))
        return original(self, image)

    monkeypatch.setattr(LocalSharpness, "__call__", spy)
    if region[window].sum() >= 64:
        run_plan(quick_focus(predicted_um=truth, step_um=0.15, power=0.8, region=region,
                             window=window), micro)
        assert seen and all(m == (192, 192) and s == (192, 192) for m, s in seen)


def test_the_region_holds_every_particle_seen_in_the_first_sweep():
    """The measured region is the union over the first sweep, so a sparse weak frame's
    particles count wherever one image shows them (checked against the truth)."""
    scope = SimScope("ps-bimodal", seed=0, size_px=256)
    rng = np.random.default_rng(6)
    _position(scope, rng, low=0.02, high=0.3, min_particles=2)
    truth = scope.true_focus_um()
    images = []
    for d in truth + np.array([-0.3, -0.1, 0.1, 0.3]):
        scope.set_defocus(d)
        images.append(scope.snap().image)
    metric = LocalSharpness()
    measured = metric.fix(images, scope.pixel_nm())
    assert measured is not None and len(measured) == len(images)
    assert metric.mask is not None
    for image in images:
        region = particle_region(image, scope.pixel_nm())
        if region is not None:
            assert np.all(metric.mask[region])
    # the measurements returned are the metric's own on the chosen pixels
    assert measured[1] == pytest.approx(local_band_sharpness(images[1], metric.mask))


# --- ground truth: within the depth of field ---------------------------------------------------

@pytest.mark.parametrize("sample,detector", [("ps-bimodal", "bf"), ("ps50", "haadf"),
                                             ("silica-capsules", "bf")])
def test_autofocus_on_weak_samples_lands_within_the_depth_of_field(sample, detector):
    scope = SimScope(sample, seed=1, size_px=512, detector=detector)
    micro = SimulatedMicroscope(scope)
    rng = np.random.default_rng(9)
    errors, z = [], []
    for k in range(6):
        low, high = ((0.15, 0.8) if k % 2 else (0.05, 0.3))
        _position(scope, rng, low=low, high=high, min_particles=3)
        truth = scope.true_focus_um()
        result = run_plan(autofocus(center_um=truth + rng.uniform(-0.3, 0.3)), micro)
        assert result.status == "ok", result
        errors.append(result.defocus_um - truth)
        z.append(errors[-1] / result.center_sd_um)
    errors = np.abs(errors)
    assert np.mean(errors <= scope.depth_of_field_um) >= 5 / 6, errors
    # the reported precision is honest: errors scatter by about it, not 3x more
    assert np.sqrt(np.mean(np.square(z))) < 3.0, z


def test_a_flat_sweep_looks_between_its_images_before_looking_farther():
    """A narrow peak halfway between two coarse images: the coarse sweep is flat; the images
    halfway between its own find the peak (no wider sweep, no 'empty')."""
    rng = np.random.default_rng(5)
    truth, noise = 0.15, 0.05  # halfway between the coarse images at 0.0 and 0.3

    def sharpness_at(d):
        return 0.2 + focus_curve(d, truth, 0.02, 1.0, 0.0, 0.7) + rng.normal(0, noise)

    metric = lambda image: (float(image[0, 0]), noise)  # noqa: E731
    result, imaged = _drive(autofocus(center_um=0.0, metric=metric), sharpness_at)
    coarse = np.linspace(-0.6, 0.6, 5)
    np.testing.assert_allclose(imaged[:5], coarse)
    assert fit_focus_curve(coarse, [sharpness_at(d) for d in coarse], noise).reason == "flat"
    np.testing.assert_allclose(sorted(imaged[5:9]), (coarse[:-1] + coarse[1:]) / 2)
    assert result.status == "ok"
    assert abs(result.defocus_um - truth) < 0.03
    assert min(imaged) >= -0.6 and max(imaged) <= 0.6  # never swept wider


def test_images_taken_before_particles_showed_are_measured_again_on_their_pixels():
    scope = SimScope("ps-bimodal", seed=0, size_px=256)
    rng = np.random.default_rng(6)
    _position(scope, rng, low=0.05, high=0.5, min_particles=3)
    truth = scope.true_focus_um()
    metric = LocalSharpness()
    # images that show no particle (featureless, as far out of focus as a sweep can be)
    scope.set_defocus(truth)
    level = float(np.mean(scope.snap().image))
    far = [np.full((256, 256), level), np.full((256, 256), 1.01 * level)]
    first = metric.fix(far, scope.pixel_nm())
    assert metric.mask is None and metric.remeasured is None and len(first) == 2
    near = []
    for d in truth + np.array([-0.02, 0.02]):
        scope.set_defocus(d)
        near.append(scope.snap().image)
    metric.fix(near, scope.pixel_nm())
    assert metric.mask is not None and metric.remeasured is not None
    assert len(metric.remeasured) == 2
    for image, (value, sd) in zip(far, metric.remeasured):
        assert value == pytest.approx(local_band_sharpness(image, metric.mask)[0], rel=1e-4)
    # the particles' pixels: every particle centre of the truth inside the frame is covered
    particles = scope.snap(noise=False).truth["particles"]
    rows = np.array([p["y_px"] for p in particles]).round().astype(int)
    cols = np.array([p["x_px"] for p in particles]).round().astype(int)
    inside = (rows >= 0) & (rows < 256) & (cols >= 0) & (cols < 256)
    assert inside.any()
    assert np.mean(metric.mask[rows[inside], cols[inside]]) >= 0.5
    # and the autofocus run uses them: earlier values replaced, later ones comparable
    metric.fix(near, scope.pixel_nm())
    assert metric.remeasured is None
