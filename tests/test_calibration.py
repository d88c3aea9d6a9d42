"""Calibration building blocks against independent truth: raw decode vs the twin's sensor
model, colour fits vs the true camera response, vignetting, light triangulation, and real
photos (OpenCV's ChArUco and stereo chessboard sets, plantcv's ColorChecker photos)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from calibration.colour import (ChartNotFound, apply_colour, delta_e2000, detect_chart,
                                fit_colour, sample_patches, scale_to_radiance)
from calibration.geometry import (GeometryError, calibrate_camera, calibrate_rig,
                                  charuco_pattern, chessboard_pattern, parse_board,
                                  refine_saddle_corners)
from calibration.lights import light_positions, triangulate_lines
from calibration.raw import RawDecodeError, decode_bracket, decode_raw, load_image, merge_bracket
from calibration.vignetting import fit_vignetting, vignetting_gain
from lightstage.dng import write_dng
from lightstage.rig import builtin_rig
from lightstage.twin.sensor import dng_metadata, simulate_raw, vignetting_gain as true_vignetting
from lightstage.camera import project
from lightstage.twin.targets import (DEFAULT_BOARD, DEFAULT_CHART, PlanarTarget, board_pose,
                                     charuco_texture, colorchecker_reference, colorchecker_texture)


@pytest.fixture(scope="module")
def demo():
    return builtin_rig("demo")


@pytest.fixture(scope="module")
def chart_radiance(demo):
    """The ColorChecker in front of demo camera cam02, lit by one distant light (1 render)."""
    cam = demo.camera("cam02")
    W, H = DEFAULT_CHART.size
    scene = PlanarTarget(colorchecker_texture(), (W, H),
                         board_pose([0, 0, 0], cam.centre, 0.0, (W, H)), supersample=2)
    return cam, scene.radiance(cam, cam.centre[None] / np.linalg.norm(cam.centre),
                               np.array([[20.0, 20.0, 20.0]]), distant=True)


def _dng(tmp_path, cam, radiance, t, name, noise=True):
    # a stable seed: str hash() is salted per process, which made noise (and results) vary
    rng = np.random.default_rng(zlib.crc32(name.encode())) if noise else None
    raw = simulate_raw(radiance, cam, t, rng, noise=noise)
    p = tmp_path / f"{name}.dng"
    write_dng(p, raw, dng_metadata(cam, t))
    return p


def test_decode_matches_sensor_model(tmp_path, demo):
    # every CFA pattern of the demo rig; a smooth colour ramp, no noise
    for cam in demo.cameras[:4]:
        H, W = cam.resolution
        x = np.linspace(0.2, 1.0, W, dtype=np.float32)
        L = np.stack([np.tile(x, (H, 1)) * 2, np.full((H, W), 1.0, np.float32),
                      np.tile(x[::-1], (H, 1))], axis=-1)
        im = decode_raw(_dng(tmp_path, cam, L, 0.004, cam.name, noise=False))
        assert im.exposure == pytest.approx(0.004, rel=1e-6) and im.iso == cam.sensor.iso
        M = np.asarray(cam.sensor.colour_response)
        expect = (L @ M.T) * true_vignetting(cam)[..., None] / cam.sensor.full_scale
        inner = (slice(8, -8), slice(8, -8))
        # bilinear demosaic of a linear ramp is exact up to the raw rounding (1 DN)
        err = np.abs(im.rgb[inner] - expect[inner]) / expect[inner].max()
        assert err.max() < 2e-3, cam.name


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.dng"
    bad.write_bytes(b"not a raw file")
    with pytest.raises(RawDecodeError, match="bad.dng"):
        decode_raw(bad)
    with pytest.raises(RawDecodeError, match="no such file"):
        decode_raw(tmp_path / "missing.dng")


def test_bracket_merge_replaces_saturated_pixels(tmp_path, demo):
    cam = demo.camera("cam00")
    L = np.full((*cam.resolution, 3), 1.0, np.float32)
    L[:200] = 30.0  # clips in the long exposure only
    long_, short = 0.004, 0.0005
    a = decode_raw(_dng(tmp_path, cam, L, long_, "long", noise=False))
    b = decode_raw(_dng(tmp_path, cam, L, short, "short", noise=False))
    assert a.saturated[:190].all() and not b.saturated[:190].any()
    m = merge_bracket([a, b])
    M = np.asarray(cam.sensor.colour_response)
    expect = M @ np.array([30.0] * 3) / cam.sensor.full_scale * true_vignetting(cam)[100, 256]
    np.testing.assert_allclose(m.rgb[100, 256], expect, rtol=5e-3)
    assert not m.saturated[:190].any()
    # the mosaic-level merge (lightstage.hdr, the ingest path) agrees, and names bad files
    pa, pb = tmp_path / "long.dng", tmp_path / "short.dng"
    mb = decode_bracket([(pa, None, None), (pb, short, None)])
    np.testing.assert_allclose(mb.rgb[100, 256], expect, rtol=5e-3)
    assert not mb.saturated[:190].any() and mb.exposure == pytest.approx(short)
    np.testing.assert_allclose(mb.rgb[250:, 8:-8], m.rgb[250:, 8:-8], rtol=1e-5)
    with pytest.raises(RawDecodeError, match="missing.dng: no such file"):
        decode_bracket([(pa, None, None), (tmp_path / "missing.dng", None, None)])


def _fit_on_twin_chart(tmp_path, cam, L, t, method="matrix-3x3"):
    im = decode_raw(_dng(tmp_path, cam, L, t, f"chart{t}"))
    H = detect_chart(im.rgb, saturated=im.saturated)
    cam_rgb = sample_patches(im.rgb, H, saturated=im.saturated)
    return cam_rgb, fit_colour(cam_rgb, colorchecker_reference(), method)


def _exposure(cam, L, level):
    M = np.asarray(cam.sensor.colour_response)
    return level * cam.sensor.full_scale / (cam.sensor.gain * float((L @ M.T).max()))


def test_chart_fit_recovers_true_camera_response(tmp_path, chart_radiance):
    cam, L = chart_radiance
    t = _exposure(cam, L, 0.4)
    cam_rgb, fit = _fit_on_twin_chart(tmp_path, cam, L, t)
    # patches whose camera response would be negative (clipped at black) are left out
    assert np.isfinite(cam_rgb).all(1).sum() >= 16
    # absolute scale from a flat field of known radiance: the true camera RGB of 2.0 white
    M = np.asarray(cam.sensor.colour_response)
    flat_cam = M @ np.array([2.0, 2.0, 2.0]) / cam.sensor.full_scale
    fit = scale_to_radiance(fit, flat_cam, [2.0, 2.0, 2.0])
    truth = cam.sensor.full_scale * np.linalg.inv(M)
    # compare both corrections on the true camera response to the 24 patches (at white ~0.9)
    cam_true = colorchecker_reference() @ np.linalg.inv(truth).T
    de = delta_e2000(fit.apply(cam_true), cam_true @ truth.T)
    assert de.mean() < 0.5 and de.max() < 1.5
    np.testing.assert_allclose(fit.matrix, truth, rtol=0.03, atol=0.002)


def test_doubling_chart_exposure_leaves_corrected_chart_unchanged(tmp_path, chart_radiance):
    cam, L = chart_radiance
    t = _exposure(cam, L, 0.3)
    cam1, fit1 = _fit_on_twin_chart(tmp_path, cam, L, t)
    cam2, fit2 = _fit_on_twin_chart(tmp_path, cam, L, 2 * t)
    ok = np.isfinite(cam1).all(1) & np.isfinite(cam2).all(1)
    # exposure-normalised decode: the same camera RGB, hence the same corrected chart
    de = delta_e2000(fit1.apply(cam1[ok]), fit1.apply(cam2[ok]))
    assert de.mean() < 0.15
    np.testing.assert_allclose(fit1.matrix, fit2.matrix, rtol=0.02, atol=2e-4)


def test_root_polynomial_is_exposure_invariant_and_fits(chart_radiance):
    rng = np.random.default_rng(0)
    ref = colorchecker_reference()
    M = np.eye(3) + rng.normal(0, 0.08, (3, 3))
    cam = np.clip(ref, 0.002, None) @ M.T
    fit = fit_colour(cam, np.clip(ref, 0.002, None), "root-polynomial")
    assert fit.method == "root-polynomial-2" and fit.terms.shape == (3, 3)
    assert fit.residuals["delta_e2000_mean"] < 0.3
    np.testing.assert_allclose(fit.apply(3.0 * cam), 3.0 * fit.apply(cam), rtol=1e-9)
    np.testing.assert_allclose(apply_colour(cam, fit.matrix, fit.method, fit.terms), fit.apply(cam))
    with pytest.raises(ValueError, match="colour method"):
        fit_colour(cam, ref, "magic")


def test_chart_absent_is_reported():
    img = np.random.default_rng(1).uniform(0, 0.01, (200, 300, 3)).astype(np.float32)
    with pytest.raises(ChartNotFound):
        detect_chart(img)


def test_vignetting_fit_recovers_radial_falloff():
    pp = (250.3, 240.7)
    truth = np.array([-0.3, 0.05])
    g = vignetting_gain((480, 512), pp, truth)
    flat = g[..., None] * np.array([0.2, 0.4, 0.3], np.float32)
    coeffs, k = fit_vignetting(flat, pp)
    np.testing.assert_allclose(coeffs, truth, atol=1e-5)
    np.testing.assert_allclose(k, [0.2, 0.4, 0.3], rtol=1e-5)


def test_light_triangulation_and_median_range():
    rng = np.random.default_rng(3)
    lights = {}
    truth = {}
    for i in range(6):
        d = rng.normal(size=3)
        p = 1.5 * d / np.linalg.norm(d)
        truth[i] = p
        rays = []
        for k in range(3):
            x = rng.normal(0, 0.05, 3)
            r = (p - x) / np.linalg.norm(p - x)
            rays.append((x, r, 1.0))
        lights[i] = rays
    p, cond = triangulate_lines(np.array([r[0] for r in lights[0]]), np.array([r[1] for r in lights[0]]))
    np.testing.assert_allclose(p, truth[0], atol=1e-9)
    out = light_positions(lights)
    for i, (q, how) in out.items():
        ang = math.degrees(math.acos(np.clip(q @ truth[i] / np.linalg.norm(q) / 1.5, -1, 1)))
        assert ang < 0.02 and abs(np.linalg.norm(q) - 1.5) < 1e-3, how


def test_two_ball_positions_triangulate_light_range():
    """Mirror rays leaving two ball positions 0.1 m apart, 0.05 deg of direction noise:
    lights at 1.3-1.7 m (not on one sphere) get their own range; one seen on one ball only
    lands on the median sphere of the others."""
    from calibration.pipeline import triangulate_light_positions

    rng = np.random.default_rng(5)
    balls = {0: np.zeros(3), 1: np.array([0.0, 0.0, 0.1])}
    truth, rays = {}, {}
    for i in range(8):
        d = rng.normal(size=3)
        d[2] = abs(d[2]) * 0.3  # keep away from the baseline's axis
        p = rng.uniform(1.3, 1.7) * d / np.linalg.norm(d)
        truth[i] = p
        rays[i] = []
        for b, c in balls.items():
            for k in range(3):
                n = rng.normal(size=3)
                x = c + 0.075 * n / np.linalg.norm(n)
                r = (p - x) / np.linalg.norm(p - x)
                r = r + rng.normal(0, math.radians(0.05), 3)
                rays[i].append((x, r / np.linalg.norm(r), 1.0, b))
    rays[7] = [t for t in rays[7] if t[3] == 0]  # light 7: one ball only
    out = triangulate_light_positions(rays)
    med = np.median([np.linalg.norm(truth[i]) for i in range(7)])
    for i in range(7):
        assert "triangulated" in out[i][1]
        assert np.linalg.norm(out[i][0] - truth[i]) < 0.04 * np.linalg.norm(truth[i]), i
    assert "median" in out[7][1]
    assert abs(np.linalg.norm(out[7][0]) - med) < 0.05
    ang = math.degrees(math.acos(out[7][0] @ truth[7] / np.linalg.norm(out[7][0]) / np.linalg.norm(truth[7])))
    assert ang < 1.0


def test_lights_on_a_sphere_settle_on_the_fitted_sphere():
    """All lights at 1.5 m, rays with 0.1 deg noise: each triangulated range alone is off by
    a few cm; combined with the rig's median range they all land within 1 % of 1.5 m."""
    from calibration.pipeline import triangulate_light_positions

    rng = np.random.default_rng(11)
    rays, raw = {}, []
    for i in range(20):
        d = rng.normal(size=3)
        d[2] = abs(d[2]) * 0.3
        p = 1.5 * d / np.linalg.norm(d)
        rays[i] = []
        for b, c in enumerate((np.zeros(3), np.array([0.0, 0.0, 0.1]))):
            for k in range(3):
                n = rng.normal(size=3)
                x = c + 0.075 * n / np.linalg.norm(n)
                r = (p - x) / np.linalg.norm(p - x) + rng.normal(0, math.radians(0.1), 3)
                rays[i].append((x, r / np.linalg.norm(r), 1.0, b))
        raw.append(np.linalg.norm(triangulate_lines(np.array([t[0] for t in rays[i]]),
                                                    np.array([t[1] for t in rays[i]]))[0]))
    out = triangulate_light_positions(rays)
    got = np.array([np.linalg.norm(out[i][0]) for i in range(20)])
    assert np.abs(np.array(raw) - 1.5).max() > 0.02  # the single triangulations scatter
    assert np.abs(got - 1.5).max() < 0.015


def test_saddle_refinement_beats_the_detector_on_a_finely_sampled_board(demo):
    """A tilted ChArUco board rendered with 8x8 rays per pixel (corners exact to ~0.01 px):
    the saddle fit on the linear image lands closer to the true projected corners than
    CharucoDetector's own sub-pixel corners, with no bias."""
    cam = demo.camera("cam05")
    spec = DEFAULT_BOARD
    bw, bh = spec.size
    P = board_pose([0.01, -0.02, 0.03], [0.35, 0.25, 1.0], 17.0, (bw, bh))
    lum = PlanarTarget(charuco_texture(spec), (bw, bh), P, 8).radiance(
        cam, cam.centre[None] / np.linalg.norm(cam.centre), np.array([[3.0, 3.0, 3.0]]),
        distant=True).mean(-1)
    pat = charuco_pattern(spec)
    det = pat.detect(np.clip(lum / lum.max() * 255, 0, 255).astype(np.uint8))
    assert det is not None and len(det.ids) > 30
    X = pat.object_points[det.ids] @ P[:3, :3].T + P[:3, 3]
    truth = project(X, cam.K_array, cam.distortion, cam.cam2world_array)[0]
    ref = refine_saddle_corners(lum, det, pat.object_points[det.ids, :2],
                                (spec.square - spec.marker) / 2)
    assert ref is not None and len(ref.ids) >= 0.9 * len(det.ids)
    t = dict(zip(det.ids, truth))
    e_ref = np.linalg.norm(ref.corners - np.array([t[i] for i in ref.ids]), axis=1)
    e_det = np.linalg.norm(det.corners - truth, axis=1)
    assert np.median(e_ref) < 0.5 * np.median(e_det), (np.median(e_ref), np.median(e_det))
    assert np.median(e_ref) < 0.04 and np.percentile(e_ref, 90) < 0.1
    assert np.abs((ref.corners - np.array([t[i] for i in ref.ids])).mean(0)).max() < 0.02


def test_parse_board_errors():
    spec = parse_board("5x7:0.04:0.02:DICT_6X6_250")
    assert spec.squares == (5, 7) and spec.marker == 0.02
    for bad in ("5x7:0.04", "5x7:0.04:0.05:DICT_6X6_250", "5x7:0.04:0.02:DICT_NOPE"):
        with pytest.raises(ValueError, match="board"):
            parse_board(bad)


def test_too_few_views_is_a_clear_error():
    pat = chessboard_pattern((9, 6))
    with pytest.raises(GeometryError, match="camX: 0 usable view"):
        calibrate_camera(pat, [None, None], (480, 640), "camX")


# ---- real data ------------------------------------------------------------------------------


def _yml_K(path: Path) -> np.ndarray:
    import cv2

    fs = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    K = fs.getNode("camera_matrix").mat()
    fs.release()
    return K


def _grey(p):
    from calibration.raw import display_u8

    im = load_image(p)
    return display_u8(im.rgb @ np.array([0.2126, 0.7152, 0.0722], np.float32), 100.0)


def test_real_charuco_intrinsics_match_opencv_reference(real_data):
    d = real_data / "calibration" / "opencv_charuco"
    pat = charuco_pattern(parse_board("5x7:0.04:0.02:DICT_6X6_250"))
    dets = [pat.detect(_grey(p)) for p in sorted(d.glob("img_0*.jpg"))]
    assert len(dets) == 4 and all(x is not None and len(x.ids) == 24 for x in dets)
    rms, K, dist, _ = calibrate_camera(pat, dets, (480, 640), "real", "k1k2p1p2k3")
    ref = _yml_K(d / "tutorial_camera_charuco.yml")
    for (i, j) in ((0, 0), (1, 1), (0, 2), (1, 2)):
        assert abs(K[i, j] / ref[i, j] - 1) < 0.02, (i, j, K[i, j], ref[i, j])
    assert rms < 0.3


def test_real_stereo_chessboard_rms(real_data):
    d = real_data / "calibration" / "opencv_stereo_chessboard"
    pat = chessboard_pattern((9, 6))
    lefts = sorted(d.glob("left*.jpg"))
    dets = {"left": {}, "right": {}}
    for i, lp in enumerate(lefts):
        dets["left"][i] = pat.detect(_grey(lp))
        dets["right"][i] = pat.detect(_grey(d / lp.name.replace("left", "right")))
    geo = calibrate_rig(pat, dets, {"left": (480, 640), "right": (480, 640)},
                        distortion="k1k2p1p2k3", robust=False)
    assert not geo.failed
    for c in ("left", "right"):
        assert geo.rms[c] < 0.6, (c, geo.rms[c])
        assert 500 < geo.K[c][0, 0] < 580
    # the right camera sits beside the left one (a few squares), not in front of it
    base = geo.cam2world["right"][:3, 3] - geo.cam2world["left"][:3, 3]
    assert 2 < np.linalg.norm(base) < 6 and abs(base[0]) > abs(base[2])


def test_real_chart_sampling_matches_plantcv(real_data):
    from calibration.raw import srgb_to_linear

    d = real_data / "colorchecker" / "plantcv"
    for name in ("source1", "target"):
        im = load_image(d / f"{name}_img.png")
        H = detect_chart(im.rgb)
        mine = sample_patches(im.rgb, H, floor=0)
        theirs = srgb_to_linear(np.load(d / f"{name}_matrix.npz")["arr_0"][:, 1:])
        # plantcv's chip numbering differs: every one of its chips is one of ours
        dist = np.linalg.norm(theirs[:, None] - mine[None], axis=2).min(1)
        assert np.median(dist) < 0.005 and dist.max() < 0.02, name
        # and the orientation we found is the chart's: white patch brightest, black darkest
        lum = mine @ [0.2126, 0.7152, 0.0722]
        assert lum.argmax() == 18 and lum.argmin() == 23
