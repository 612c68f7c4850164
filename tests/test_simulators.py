"""The simulator checked against its own ground truth (issue 3)."""

import json

import ncempy.io
import numpy as np
import pytest

from particlewatch.frames import mdoc_frame_meta, read_mdoc
from particlewatch.simulators import shapes
from particlewatch.simulators.cli import frame_positions, simulate
from particlewatch.simulators.render import FrameGeometry, project
from particlewatch.simulators.samples import SAMPLES
from particlewatch.simulators.scope import SimScope
from particlewatch.simulators.specimen import Specimen, take
from particlewatch.simulators.truth import visible


def _frame_at_particles(sample, *, seed=1, size=512, **kw):
    scope = SimScope(sample, seed=seed, size_px=size, **kw)
    x, y = frame_positions(scope, 1, seed=seed)[0]
    scope.move_stage(x, y)
    scope.set_defocus(scope.true_focus_um())
    return scope


def _table_and_geom(scope):
    pix = scope.pixel_nm()
    x, y = scope.stage_position()
    geom = FrameGeometry(x * 1000, y * 1000, pix, scope.size_px, scope.size_px)
    table = scope.specimen.particles_in(*geom.bounds_nm())
    return take(table, visible(table, geom)), geom


@pytest.mark.parametrize("sample", ["au10", "au-rods", "cubes", "silica-capsules"])
def test_truth_ecd_matches_rendered_mask_area(sample):
    scope = _frame_at_particles(sample)
    table, geom = _table_and_geom(scope)
    truth = scope.snap().truth["particles"]
    assert len(truth) == len(table["x_nm"]) > 3
    pix = geom.pixel_nm
    checked = 0
    for k, p in enumerate(truth):
        if p["touches_edge"]:
            continue
        cover = project(take(table, [k]), geom, quantity="coverage", supersample=3)
        ecd_cover = np.sqrt(4 * cover.sum() / np.pi) * pix
        ecd_mask = np.sqrt(4 * (cover >= 0.5).sum() / np.pi) * pix
        assert abs(ecd_cover - p["ecd_nm"]) < 0.25 * pix
        assert abs(ecd_mask - p["ecd_nm"]) < pix  # within a pixel's worth
        border = np.concatenate([cover[0], cover[-1], cover[:, 0], cover[:, -1]])
        assert not border.any()  # not touching the edge: nothing in the outermost pixels
        # the mask sits where the truth says
        rows, cols = np.nonzero(cover >= 0.5)
        assert abs(cols.mean() - p["x_px"]) < 0.5 and abs(rows.mean() - p["y_px"]) < 0.5
        checked += 1
    assert checked >= 3


def test_projected_thickness_integrates_to_particle_volume():
    scope = _frame_at_particles("au10")
    table, geom = _table_and_geom(scope)
    inside = ~np.array([p["touches_edge"] for p in scope.snap().truth["particles"]])
    thick = project(take(table, inside), geom)
    volume = np.pi / 6 * (table["a_nm"][inside] ** 3).sum()
    assert thick.sum() * geom.pixel_nm ** 2 == pytest.approx(volume, rel=0.01)


def test_frames_are_bit_identical_for_a_seed():
    def frames(seed):
        scope = SimScope("ps-bimodal", seed=seed, size_px=256)
        out = []
        for x, y in [(1.0, 2.0), (-5.0, 3.5)]:
            scope.move_stage(x, y)
            scope.set_defocus(scope.true_focus_um())
            out.append(scope.snap())
        return out

    a, b, c = frames(4), frames(4), frames(5)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
        assert fa.truth == fb.truth
    assert not np.array_equal(a[0].image, c[0].image)


def test_specimen_region_does_not_depend_on_query_order():
    first = Specimen("ps100", seed=3)
    second = Specimen("ps100", seed=3)
    box = (10_000, 10_000, 16_000, 16_000)
    first.particles_in(-30_000, -30_000, -20_000, -20_000)
    a, b = first.particles_in(*box), second.particles_in(*box)
    for column in a:
        np.testing.assert_array_equal(a[column], b[column])


def _gradient_energy(image):
    gy, gx = np.gradient(np.asarray(image, dtype=float))
    return float((gx ** 2 + gy ** 2).mean())


def test_blur_grows_with_defocus_error_and_is_flat_within_depth_of_field():
    scope = _frame_at_particles("au10", size=256)
    focus = scope.true_focus_um()
    energies = []
    for error in (0.0, scope.depth_of_field_um, 0.1, 0.3, 1.0):
        for sign in (1, -1):
            scope.set_defocus(focus + sign * error)
            energies.append(_gradient_energy(scope.snap(noise=False).image))
    energies = np.array(energies).reshape(5, 2)
    np.testing.assert_allclose(energies[:, 0], energies[:, 1], rtol=1e-6)  # symmetric
    sharp = energies[:, 0]
    assert np.all(np.diff(sharp[1:]) < 0) and sharp[1] < sharp[0]
    assert sharp[1] > 0.8 * sharp[0]  # within the depth of field: essentially in focus
    assert sharp[-1] < 0.2 * sharp[0]


def test_true_focus_varies_smoothly_by_hundreds_of_nm():
    spec = Specimen("au10", seed=0)
    xs = np.linspace(-50, 50, 21)
    z = spec.true_focus_um(*np.meshgrid(xs, xs))
    assert 0.1 < z.max() - z.min() < 1.0
    assert np.abs(np.diff(z, axis=1)).max() < 0.05  # < 50 nm per 5 µm step


def test_empty_regions_give_frames_without_particles():
    scope = SimScope("au10", seed=2, size_px=256)
    reach_um = (scope.specimen.reach_nm + scope.field_of_view_um() * 1000) / 1000
    offsets = np.linspace(-reach_um, reach_um, 7)
    xs = np.arange(-55.0, 55.0, 1.0)
    spot = next((x, y) for x in xs for y in xs
                if scope.specimen.density(x + offsets[:, None], y + offsets[None, :]).max()
                == 0)
    scope.move_stage(*spot)
    frame = scope.snap()
    assert frame.truth["particles"] == []
    assert frame.image.max() < 3 * np.median(frame.image)  # film only, no bright particles
    assert 0 < (scope.specimen.density(xs[:, None], xs[None, :]) == 0).mean() < 0.6
    empty = SimScope("empty", seed=0, size_px=128)
    assert empty.snap().truth["particles"] == []


def test_rods_and_capsules_truth():
    rods = _frame_at_particles("au-rods").snap().truth["particles"]
    assert {p["shape"] for p in rods} == {"rod"}
    fmax = np.array([p["feret_max_nm"] for p in rods])
    fmin = np.array([p["feret_min_nm"] for p in rods])
    assert 35 < fmax.mean() < 43 and 10.5 < fmin.mean() < 13.5
    assert np.all(fmax >= fmin)
    caps_scope = _frame_at_particles("silica-capsules")
    caps = caps_scope.snap().truth["particles"]
    assert all(5 < p["shell_nm"] < 0.45 * p["ecd_nm"] for p in caps)
    # a hollow shell projects as a ring: thicker at the inner wall than at the centre
    table, geom = _table_and_geom(caps_scope)
    k = next(i for i, p in enumerate(caps) if not p["touches_edge"] and not p["overlaps"])
    thick = project(take(table, [k]), geom)
    r_in = (caps[k]["ecd_nm"] / 2 - caps[k]["shell_nm"]) / geom.pixel_nm
    cx, cy = round(caps[k]["x_px"]), round(caps[k]["y_px"])
    profile = thick[cy, cx:cx + int(caps[k]["ecd_nm"] / 2 / geom.pixel_nm) + 1]
    assert profile.max() > 1.8 * profile[0]
    assert abs(np.argmax(profile) - r_in) <= 1.5  # the ring peaks at the inner wall


def test_cube_measures_are_exact_for_the_superellipse():
    a, p = 20.0, 8.0
    pts = shapes.outline(shapes.CUBE, a=a, b=a, p=p, angle=0.3, n=4000)[0]
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    m = shapes.measures(shapes.CUBE, a=a, b=a, p=p)
    assert m["area_nm2"] == pytest.approx(area, rel=1e-4)
    widths = [np.ptp(x * np.cos(t) + y * np.sin(t)) for t in np.linspace(0, np.pi, 721)]
    assert m["feret_max_nm"] == pytest.approx(max(widths), rel=1e-3)
    assert m["feret_min_nm"] == pytest.approx(min(widths), rel=1e-3)


def test_overlaps_match_brute_force_for_spheres():
    scope = _frame_at_particles("ps-bimodal", size=512)
    truth = scope.snap().truth
    parts, pix = truth["particles"], truth["pixel_nm"]
    xy = np.array([[p["x_px"], p["y_px"]] for p in parts]) * pix
    r = np.array([p["ecd_nm"] for p in parts]) / 2
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    expected = (d <= r[:, None] + r[None, :] + pix) & ~np.eye(len(parts), dtype=bool)
    for i, p in enumerate(parts):
        assert p["overlaps"] == sorted(np.flatnonzero(expected[i]).tolist())
    assert expected.any()  # the bimodal sample agglomerates


def test_stage_limits_clock_and_modes():
    scope = SimScope("au10", seed=0, size_px=128)
    x0, y0, x1, y1 = scope.stage_limits_um
    assert x1 - x0 >= 100 and y1 - y0 >= 100
    with pytest.raises(ValueError, match="outside the limits"):
        scope.move_stage(x1 + 1, 0)
    t0 = scope.clock_s
    scope.move_stage(20.0, 0.0)
    t1 = scope.clock_s
    scope.move_stage(20.0, 40.0)
    assert scope.clock_s - t1 > t1 - t0 > 1.0  # a longer trip takes longer
    scope.set_mode("survey")
    assert scope.pixel_nm() > 4 * scope.pixel_nm("record")
    assert scope.field_of_view_um() == pytest.approx(scope.pixel_nm() * 128 / 1000)
    frame = scope.snap()
    assert frame.mode == "survey" and frame.truth["pixel_nm"] == frame.pixel_nm
    with pytest.raises(ValueError):
        scope.set_mode("diffraction")


def test_simulate_writes_frames_mdoc_and_truth(tmp_path):
    from particlewatch.cli import main

    out = tmp_path / "sim"
    args = ["simulate", "--sample", "au-rods", "--frames", "2", "--out", str(out),
            "--size", "256", "--seed", "7"]
    assert main(args) == 0
    for i in (1, 2):
        mrc = out / f"frame_{i:05d}.mrc"
        truth = json.loads((out / "truth" / f"frame_{i:05d}.json").read_text())
        meta = mdoc_frame_meta(read_mdoc(str(mrc) + ".mdoc"))
        assert meta["pixel_nm"] == pytest.approx(truth["pixel_nm"])
        assert meta["stage_x_um"] == pytest.approx(truth["stage_x_um"])
        assert meta["stage_y_um"] == pytest.approx(truth["stage_y_um"])
        assert meta["defocus_um"] == pytest.approx(truth["defocus_um"])
        assert truth["schema_version"] == 1 and truth["sample"] == "au-rods"
        assert truth["particles"] and {"x_px", "y_px", "population", "shape", "ecd_nm",
                                       "feret_max_nm", "feret_min_nm", "touches_edge",
                                       "overlaps"} <= set(truth["particles"][0])
        data = ncempy.io.read(str(mrc))
        assert np.squeeze(data["data"]).shape == (256, 256)
        assert np.squeeze(data["data"]).dtype == np.uint16
        assert float(np.ravel(data["pixelSize"])[-1]) == pytest.approx(truth["pixel_nm"] * 10)
    again = tmp_path / "again"
    assert main(args[:6] + [str(again)] + args[7:]) == 0
    for name in ("frame_00001.mrc.mdoc", "truth/frame_00001.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    # pixels bit-identical (the MRC header also holds mrcfile's creation-time label)
    first, second = (np.squeeze(ncempy.io.read(str(d / "frame_00002.mrc"))["data"])
                     for d in (out, again))
    assert first.tobytes() == second.tobytes()


def test_simulate_rejects_unknown_sample(tmp_path, capsys):
    from particlewatch.cli import main

    assert main(["simulate", "--sample", "nope", "--frames", "1", "--out",
                 str(tmp_path)]) == 1
    assert "unknown sample 'nope'" in capsys.readouterr().err


def test_every_sample_renders():
    for name in SAMPLES:
        scope = SimScope(name, seed=0, size_px=64)
        frame = scope.snap()
        assert frame.image.shape == (64, 64) and frame.image.dtype == np.uint16


@pytest.mark.parametrize("detector", ["bf", "haadf"])
def test_detector_sets_contrast_polarity(detector):
    scope = _frame_at_particles("au10", size=256, detector=detector)
    frame = scope.snap(noise=False)
    table, geom = _table_and_geom(scope)
    cover = project(table, geom, quantity="coverage")
    inside = frame.image[cover > 0.9].mean()
    outside = frame.image[cover == 0].mean()
    assert (inside < 0.7 * outside) if detector == "bf" else (inside > 2 * outside)
    assert frame.truth["detector"] == detector


def test_rod_overlaps_match_segment_distances():
    scope = _frame_at_particles("au-rods", size=512)
    table, geom = _table_and_geom(scope)
    parts = scope.snap().truth["particles"]
    t = np.linspace(-0.5, 0.5, 401)
    core = np.maximum(table["a_nm"] - table["b_nm"], 0)
    axis = np.stack([np.cos(table["angle"]), np.sin(table["angle"])], -1)
    pts = (np.stack([table["x_nm"], table["y_nm"]], -1)[:, None, :]
           + (core[:, None] * t)[..., None] * axis[:, None, :])  # points on each core segment
    n = len(parts)
    listed = 0
    for i in range(n):
        for j in range(i + 1, n):
            seg = np.sqrt(((pts[i][:, None] - pts[j][None]) ** 2).sum(-1)).min()
            gap = seg - (table["b_nm"][i] + table["b_nm"][j]) / 2
            if abs(gap - geom.pixel_nm) < 0.05:
                continue  # too close to the threshold for a sampled distance to decide
            assert (j in parts[i]["overlaps"]) == (gap <= geom.pixel_nm), (i, j, gap)
            listed += j in parts[i]["overlaps"]
    assert listed > 0


@pytest.mark.parametrize("sample", ["ps100", "cubes"])
def test_particles_whose_box_alone_meets_the_frame_are_not_truth(sample):
    scope = _frame_at_particles(sample, size=256)
    table, geom = _table_and_geom(scope)
    row = take(table, [0])
    row["angle"] = np.array([np.pi / 4])  # a cube becomes a diamond, its box a square
    if sample == "cubes":
        row["p"] = np.array([20.0])
    corner_x, corner_y = geom.bounds_nm()[:2]
    for frac, expected in ((0.85, False), (0.3, True)):
        shifted = dict(row)
        # centre off the top-left corner along the diagonal: box overlaps, shape may not
        shifted["x_nm"] = np.array([corner_x - frac * row["hx_nm"][0]])
        shifted["y_nm"] = np.array([corner_y - frac * row["hy_nm"][0]])
        assert visible(shifted, geom)[0] == expected
        cover = project(shifted, geom, quantity="coverage").sum()
        assert (cover > 0) == expected
    truth = scope.snap().truth["particles"]
    assert len(truth) == len(table["x_nm"])


@pytest.mark.parametrize("lam", [4.0, 25.0, 400.0])
def test_shot_noise_has_poisson_moments(lam):
    from particlewatch.simulators.render import shot_noise

    counts = shot_noise(np.full((300, 300), lam, np.float32),
                        rng=np.random.default_rng(0)).astype(float)
    mean, var = counts.mean(), counts.var()
    skew = ((counts - mean) ** 3).mean() / var ** 1.5
    assert mean == pytest.approx(lam, rel=0.01)
    assert var == pytest.approx(lam, rel=0.03)
    assert skew == pytest.approx(lam ** -0.5, abs=0.03)
