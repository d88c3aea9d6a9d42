"""Calibration targets of the digital twin, checked against analytic truth."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from lightstage.camera import project
from lightstage.rig import Camera, Sensor, builtin_rig, look_at
from lightstage.twin.targets import (
    DEFAULT_BOARD, DEFAULT_CHART, PlanarTarget, SphereTarget, UniformEmitter, board_pose,
    calibration_plan, charuco_board, charuco_texture, colorchecker_reference,
    colorchecker_texture)


def _camera(eye=(0.3, 0.1, 1.0), size=256, f=700.0, dist=(-0.05, 0.02, 0, 0, 0)):
    c2w = look_at(np.array(eye, float), np.zeros(3))
    K = [[f, 0, size / 2 - 0.5 + 1.3], [0, f * 1.01, size / 2 - 0.5 - 0.7], [0, 0, 1]]
    return Camera("c", K, list(dist), c2w.tolist(), Sensor(size, size))


def test_colorchecker_reference_is_the_chart():
    ref = colorchecker_reference()
    assert ref.shape == (24, 3)
    # neutral row: near-equal channels, decreasing luminance, white ~0.9
    grey = ref[18:]
    assert np.all(np.abs(grey - grey.mean(1, keepdims=True)) < 0.04)
    assert np.all(np.diff(grey[:, 1]) < 0)
    assert 0.8 < grey[0, 1] < 0.95
    # red patch (index 14) is red, blue (12) is blue
    assert ref[14].argmax() == 0 and ref[12].argmax() == 2


def test_chart_patch_radiance_under_distant_light_is_albedo_over_pi():
    cam = _camera(eye=(0.0, 0.0, 1.0))
    W, H = DEFAULT_CHART.size
    P = board_pose([0, 0, 0], [0, 0, 1], 0.0, (W, H))
    scene = PlanarTarget(colorchecker_texture(), (W, H), P, supersample=2)
    rgb = np.array([[2.0, 1.0, 0.5]])
    L = scene.radiance(cam, np.array([[0.0, 0.0, 1.0]]), rgb, distant=True)
    ref = colorchecker_reference()
    centres = np.c_[DEFAULT_CHART.patch_centres(), np.zeros(24)]
    world = centres @ P[:3, :3].T + P[:3, 3]
    uv, z = project(world, cam.K_array, cam.distortion, cam.cam2world_array)
    got = L[np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)]
    np.testing.assert_allclose(got, ref * rgb / math.pi, rtol=1e-4, atol=1e-6)
    tr = scene.truth(cam)
    assert tr["mask"].sum() > 0 and abs(float(tr["depth"][128, 128]) - 1.0) < 0.01


def test_point_light_inverse_square_on_card():
    cam = _camera(eye=(0.0, 0.0, 1.0))
    P = board_pose([0, 0, 0], [0, 0, 1], 0.0, (0.2, 0.2))
    scene = PlanarTarget(np.full((2, 2, 3), 0.5, np.float32), (0.2, 0.2), P, supersample=1)
    light = np.array([[0.3, 0.2, 1.2]])
    L = scene.radiance(cam, light, np.array([[1.0, 1.0, 1.0]]))
    tr = scene.truth(cam)
    x = tr["position"][128, 128].astype(float)
    v = light[0] - x
    expect = 0.5 / math.pi * v[2] / np.linalg.norm(v) / (v @ v)
    assert abs(L[128, 128, 0] - expect) < 1e-5 * expect + 1e-7


def test_charuco_corners_render_where_the_camera_projects_them():
    cam = _camera(eye=(0.25, -0.15, 0.9), size=384, f=1000.0)
    bw, bh = DEFAULT_BOARD.size
    P = board_pose([0.01, 0.0, 0.0], [0.2, -0.1, 1.0], 12.0, (bw, bh))
    scene = PlanarTarget(charuco_texture(), (bw, bh), P, supersample=3)
    L = scene.radiance(cam, np.array([[0.0, 0.0, 1.0]]), np.array([[3.0, 3.0, 3.0]]), distant=True)
    g = np.clip(L[..., 1] / L[..., 1].max() * 255, 0, 255).astype(np.uint8)
    board = charuco_board()
    cc, ids, _, _ = cv2.aruco.CharucoDetector(board).detectBoard(g)
    assert ids is not None and len(ids) >= 30
    obj = board.getChessboardCorners()[ids.ravel()].astype(np.float64)
    truth_uv, _ = project(obj @ P[:3, :3].T + P[:3, 3], cam.K_array, cam.distortion,
                          cam.cam2world_array)
    err = np.linalg.norm(cc.reshape(-1, 2) - truth_uv, axis=1)
    assert np.median(err) < 0.1 and err.max() < 0.3


def _mirror_point(c, R, eye, light):
    """Analytic specular point on a sphere: normal bisects the eye and light directions."""
    n = (eye - c) / np.linalg.norm(eye - c)
    for _ in range(200):
        x = c + R * n
        a = (eye - x) / np.linalg.norm(eye - x)
        b = (light - x) / np.linalg.norm(light - x)
        n = (a + b) / np.linalg.norm(a + b)
    return c + R * n


def test_chrome_highlight_centre_is_the_mirror_reflection_point():
    cam = _camera(eye=(0.3, 0.1, 1.0), size=256, f=900.0)
    c = np.array([0.0, 0.01, 0.0])
    s = SphereTarget(c, 0.06, "chrome", 0.9, light_radius=0.04, supersample=4)
    light = np.array([[0.8, 1.0, 0.6]])
    L = s.radiance(cam, light, np.array([[1.0, 1.0, 1.0]]))[..., 0]
    w = np.where(L > 0.5 * L.max(), L, 0.0)
    ys, xs = np.mgrid[: L.shape[0], : L.shape[1]]
    centroid = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
    x = _mirror_point(c, 0.06, cam.centre, light[0])
    uv, _ = project(x[None], cam.K_array, cam.distortion, cam.cam2world_array)
    assert np.linalg.norm(centroid - uv[0]) < 0.15
    # a large light fills whole pixels: its radiance is rgb * reflectance / (pi r^2)
    big = SphereTarget(c, 0.06, "chrome", 0.9, light_radius=0.3, supersample=2)
    Lb = big.radiance(cam, light, np.array([[1.0, 1.0, 1.0]]))[..., 0]
    assert abs(Lb.max() - 0.9 / (math.pi * 0.3 ** 2)) < 1e-4 * Lb.max()


def test_diffuse_sphere_is_lambertian_near_field():
    cam = _camera(eye=(0.0, 0.0, 1.0), size=200, f=800.0)
    s = SphereTarget([0, 0, 0], 0.07, "diffuse", 0.8, supersample=1)
    light = np.array([[0.5, 0.7, 1.0]])
    L = s.radiance(cam, light, np.array([[2.0, 1.0, 1.0]]))
    tr = s.truth(cam)
    m = tr["mask"]
    x, n = tr["position"][m].astype(float), tr["normal"][m].astype(float)
    v = light[0] - x
    d = np.linalg.norm(v, axis=1)
    expect = 0.8 / math.pi * 2.0 * np.clip((n * v).sum(1) / d, 0, None) / d ** 2
    np.testing.assert_allclose(L[m][:, 0], expect, rtol=2e-4, atol=1e-6)


def test_uniform_emitter_fills_view():
    cam = _camera()
    L = UniformEmitter([1.0, 2.0, 3.0]).radiance(cam, None, None)
    assert L.shape == (256, 256, 3) and np.all(L[..., 2] == 3.0)


def test_calibration_plan_demo_rig():
    rig = builtin_rig("demo")
    shots = calibration_plan(rig, seed=1, lights=[0, 10])
    kinds = [s.truth["kind"] for s in shots]
    for k in ("flat-field", "chart", "chart-card", "board", "chrome-ambient", "chrome", "diffuse",
              "diffuse-all"):
        assert k in kinds, k
    boards = [s for s in shots if s.truth["kind"] == "board"]
    assert len(boards) >= 6
    # pose 0 is the reference fixture: centred at the origin, facing +z
    P0 = np.asarray(boards[0].truth["known"]["board2world"])
    assert np.allclose(P0[:3, :3] @ np.array([0.126, 0.098, 0]) + P0[:3, 3], 0, atol=1e-9)
    assert np.allclose(-P0[:3, 2], [0, 0, 1])
    # every camera sees enough boards, at a variety of tilts
    for cam in rig.cameras:
        seen = [b for b in boards if cam.name in b.cameras]
        assert len(seen) >= 5, cam.name
        tilts = [math.degrees(math.acos(-np.asarray(b.truth["board2world"])[:3, 2]
                                         @ (cam.centre / np.linalg.norm(cam.centre))))
                 for b in seen]
        assert max(tilts) - min(tilts) > 20
    assert len({s.name for s in shots}) == len(shots)
    for s in shots:
        json.dumps(s.truth)
        assert all(e > 0 for e in s.exposures) and s.cameras
        assert all(0 <= i < rig.n_lights for i in s.lights)
    # light truth follows the twin's definition: rgb = colour*intensity/|p|^2
    d = next(s for s in shots if s.name == "diffuse_010")
    l = rig.lights[10]
    np.testing.assert_allclose(d.truth["light_rgb"],
                               np.asarray(l.colour) * l.intensity / np.dot(l.position, l.position))


def test_sphere_kind_validated():
    with pytest.raises(ValueError, match="kind"):
        SphereTarget([0, 0, 0], 0.1, "glass")


def test_specs_live_in_the_neutral_module_and_twin_reexports_them():
    import lightstage.targets_spec as spec
    import lightstage.twin.targets as twin

    for name in ("BoardSpec", "ChartSpec", "DEFAULT_BOARD", "DEFAULT_CHART",
                 "colorchecker_reference", "charuco_board"):
        assert getattr(twin, name) is getattr(spec, name), name
    b = spec.BoardSpec.from_dict(spec.DEFAULT_BOARD.to_dict())
    assert b == spec.DEFAULT_BOARD
    # the OpenCV board has one inner corner per interior grid point
    c, r = b.squares
    assert len(spec.charuco_board(b).getChessboardCorners()) == (c - 1) * (r - 1)
