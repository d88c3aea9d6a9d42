"""Digital twin subjects and renderer: physics, exact superposition, truth, determinism, shadows.

Independent truths used here: analytic ray-sphere intersection and Lambert/inverse-square
radiometry, the camera projection of :mod:`lightstage.camera` (depth/position maps must
reproject onto their own pixels), rigid-motion equivalence (moving the subject by T equals
moving the camera by T^-1), and the uniform-environment identity (a white Lambertian surface
under uniform radiance L has radiance L).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightstage.camera import pixel_rays, project
from lightstage.rig import Camera, Sensor, fibonacci_sphere, look_at
from lightstage.twin.render import SphereScene
from lightstage.twin.scene import Scene, render_environment
from lightstage.twin.subject import HeadScene, random_subject


def make_camera(eye=(0.0, 0.0, 1.0), size=64, fov_m=0.42, dist=(0.0, 0.0, 0.0, 0.0, 0.0),
                name="c"):
    eye = np.asarray(eye, float)
    f = size * np.linalg.norm(eye) / fov_m
    K = [[f, 0.0, size / 2 - 0.5], [0.0, f, size / 2 - 0.5], [0.0, 0.0, 1.0]]
    return Camera(name=name, K=K, distortion=list(dist), cam2world=look_at(eye, [0, 0, 0]).tolist(),
                  sensor=Sensor(width=size, height=size))


def rigid(rotvec, t):
    rv = np.asarray(rotvec, float)
    th = np.linalg.norm(rv)
    T = np.eye(4)
    if th > 0:
        k = rv / th
        Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        T[:3, :3] = np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx
    T[:3, 3] = t
    return T


@pytest.fixture(scope="module")
def head():
    return HeadScene(random_subject(3), cube_n=96, vis_n=48)


@pytest.fixture(scope="module")
def cam():
    return make_camera((0.35, 0.1, 0.95), size=72, dist=(-0.05, 0.02, 0.0, 0.0, 0.0))


def analytic_sphere(camera, radius):
    """Hit mask, world points and normals of a sphere at the origin (float64)."""
    H, W = camera.resolution
    o, d = pixel_rays(camera.K_array, camera.distortion, camera.cam2world_array, H, W)
    b = d @ o
    disc = b * b - (o @ o - radius**2)
    hit = disc > 0
    t = -b - np.sqrt(np.maximum(disc, 0))
    x = o + t[..., None] * d
    return hit, x, x / radius, d


# ---------------------------------------------------------------------------- physics


def test_lambert_sphere_distant_light_is_exact():
    cam = make_camera((0.0, 0.2, 1.0), size=64, dist=(-0.08, 0.03, 0.001, 0.0, 0.0))
    sph = SphereScene(radius=0.1, albedo=(1, 1, 1), ks=0.0)
    l = np.array([0.4, 0.6, 0.7])
    l /= np.linalg.norm(l)
    E = np.array([[2.0, 1.0, 0.5]])
    img = sph.radiance(cam, l[None], E, distant=True)
    hit, x, n, _ = analytic_sphere(cam, 0.1)
    expect = np.maximum(n @ l, 0)[..., None] * E[0] / np.pi
    assert np.array_equal(sph.truth(cam)["mask"], hit)
    assert np.abs(img - np.where(hit[..., None], expect, 0)).max() < 1e-5
    assert expect.max() > 0.5  # the test saw lit pixels


def test_point_light_inverse_square_per_pixel():
    cam = make_camera((0.2, 0.0, 1.0), size=48)
    sph = SphereScene(radius=0.12, albedo=(0.5, 0.7, 0.9), ks=0.0)
    hit, x, n, _ = analytic_sphere(cam, 0.12)
    imgs = []
    for r in (0.8, 1.6):
        p = np.array([0.3, 0.5, 1.0])
        p = p / np.linalg.norm(p) * r
        img = sph.radiance(cam, p[None], [[1.0, 1.0, 1.0]])
        L = p - x
        d2 = (L * L).sum(-1)
        e = np.maximum((n * L).sum(-1) / np.sqrt(d2), 0) / d2
        expect = e[..., None] * np.array([0.5, 0.7, 0.9]) / np.pi
        assert np.abs(img - np.where(hit[..., None], expect, 0)).max() < 1e-5 * expect.max() + 1e-7
        imgs.append(img)
    # doubling the distance quarters the irradiance (up to the sphere's finite size)
    c = imgs[0][hit].sum() / imgs[1][hit].sum()
    assert 3.6 < c < 4.4


def test_ggx_highlight_sits_at_the_half_vector():
    cam = make_camera((0.0, 0.0, 1.0), size=96)
    sph = SphereScene(radius=0.1, albedo=(0, 0, 0), alpha=0.05, f0=0.04, ks=1.0)
    l = np.array([0.5, 0.3, 0.8])
    l /= np.linalg.norm(l)
    img = sph.radiance(cam, l[None], [[1.0, 1.0, 1.0]], distant=True)[..., 1]
    tr = sph.truth(cam)
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    v = cam.centre - tr["position"][iy, ix]
    h = l + v / np.linalg.norm(v)
    h /= np.linalg.norm(h)
    assert np.degrees(np.arccos(tr["normal"][iy, ix] @ h)) < 2.0
    # the value follows Cook-Torrance with GGX D, Smith G, Schlick F (written out here)
    n = tr["normal"][iy, ix].astype(np.float64)
    v = v / np.linalg.norm(v)
    a2 = 0.05**2
    ndh, ndl, ndv, vdh = n @ h, n @ l, n @ v, v @ h
    D = a2 / (np.pi * (ndh**2 * (a2 - 1) + 1) ** 2)
    G1 = lambda c: 2 * c / (c + np.sqrt(a2 + (1 - a2) * c * c))  # noqa: E731
    F = 0.04 + 0.96 * (1 - vdh) ** 5
    expect = D * G1(ndl) * G1(ndv) * F / (4 * ndl * ndv) * ndl
    assert img[iy, ix] == pytest.approx(expect, rel=1e-3)


def test_uniform_environment_white_sphere_has_radiance_L():
    cam = make_camera((0.0, 0.0, 1.0), size=40)
    sph = SphereScene(radius=0.1, albedo=(1, 1, 1), ks=0.0)
    n = 3000
    dirs = fibonacci_sphere(n)
    L = np.array([0.3, 0.6, 1.2])
    img = render_environment(sph, cam, dirs, np.tile(L * 4 * np.pi / n, (n, 1)))
    m = sph.truth(cam)["mask"]
    assert np.abs(img[m] - L).max() < 0.01 * L.max()


# ---------------------------------------------------------------------------- linearity


def test_superposition_is_exact(head, cam):
    rng = np.random.default_rng(0)
    dirs = fibonacci_sphere(7, -40)
    pos = dirs * 1.5
    rgb = rng.uniform(0.5, 2.5, (7, 3))
    pose = rigid([0.003, -0.004, 0.002], [0.001, -0.0005, 0.0008])
    for T in (None, pose):
        all_ = head.radiance(cam, pos, rgb, pose=T).astype(np.float64)
        parts = sum(head.radiance(cam, pos[i : i + 1], rgb[i : i + 1], pose=T).astype(np.float64)
                    for i in range(7))
        assert all_.max() > 0.05
        assert np.abs(all_ - parts).max() <= 2e-6 * all_.max()
        # linear in each light's power
        one = head.radiance(cam, pos[:1], rgb[:1], pose=T)
        two = head.radiance(cam, pos[:1], 3 * rgb[:1], pose=T)
        assert np.abs(two - 3 * one).max() <= 1e-6 * two.max()


def test_environment_equals_sum_of_distant_lights(head, cam):
    dirs = fibonacci_sphere(5)
    E = np.abs(np.random.default_rng(1).normal(size=(5, 3)))
    env = render_environment(head, cam, dirs, E)
    parts = sum(head.radiance(cam, dirs[i : i + 1], E[i : i + 1], distant=True).astype(np.float64)
                for i in range(5))
    assert np.abs(env - parts).max() <= 2e-6 * env.max()


# ---------------------------------------------------------------------------- truth


def test_truth_reprojects_through_the_camera(head, cam):
    assert isinstance(head, Scene)
    tr = head.truth(cam)
    m = tr["mask"]
    assert 0.15 < m.mean() < 0.9
    H, W = m.shape
    uv, z = project(tr["position"][m].astype(np.float64), cam.K_array, cam.distortion,
                    cam.cam2world_array)
    vv, uu = np.nonzero(m)
    assert np.abs(uv[:, 0] - uu).max() < 2e-3 and np.abs(uv[:, 1] - vv).max() < 2e-3
    assert np.abs(z - tr["depth"][m]).max() < 1e-5
    assert np.all(np.isinf(tr["depth"][~m]))
    nl = np.linalg.norm(tr["normal"][m], axis=1)
    assert np.abs(nl - 1).max() < 1e-4
    # visible surfaces face the camera (up to silhouette pixels)
    v = cam.centre - tr["position"][m]
    facing = (tr["normal"][m] * v).sum(1) > 0
    assert facing.mean() > 0.97
    # normals agree with the depth map's geometry: finite-difference tangents are orthogonal
    P = tr["position"]
    inner = m[1:-1, 1:-1] & m[2:, 1:-1] & m[:-2, 1:-1] & m[1:-1, 2:] & m[1:-1, :-2]
    tx = (P[1:-1, 2:] - P[1:-1, :-2])[inner]
    ty = (P[2:, 1:-1] - P[:-2, 1:-1])[inner]
    fn = np.cross(tx, ty)
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    cosang = np.abs((fn * tr["normal"][1:-1, 1:-1][inner]).sum(1))
    assert np.median(cosang) > 0.99


def test_pose_moves_truth_rigidly(head, cam):
    T = rigid([0.004, 0.006, -0.003], [0.0015, -0.001, 0.002])
    moved = head.truth(cam, pose=T)
    # the same rays in subject space: the camera moved by T^-1 with the subject at rest
    cam2 = make_camera()
    cam2.K, cam2.distortion, cam2.sensor = cam.K, cam.distortion, cam.sensor
    cam2.cam2world = (np.linalg.inv(T) @ cam.cam2world_array).tolist()
    rest = head.truth(cam2)
    both = moved["mask"] & rest["mask"]
    assert (moved["mask"] != rest["mask"]).mean() < 0.003
    pos_rest_moved = rest["position"][both] @ T[:3, :3].T + T[:3, 3]
    err = np.linalg.norm(moved["position"][both] - pos_rest_moved, axis=1)
    # grazing rays (view nearly tangent) are ill-conditioned: a 1e-8 m change of the surface
    # moves their root by mm, and the two paths may land on neighbouring roots
    v = cam2.centre - rest["position"][both]
    ndv = (rest["normal"][both] * v).sum(1) / np.linalg.norm(v, axis=1)
    assert np.mean(err[ndv > 0.15] < 2e-5) > 0.995
    assert np.mean(err < 2e-5) > 0.98
    good = err < 2e-5
    nrot = rest["normal"][both] @ T[:3, :3].T
    assert np.abs(moved["normal"][both][good] - nrot[good]).max() < 2e-3
    assert np.abs(moved["depth"][both][good] - rest["depth"][both][good]).max() < 2e-5
    # and the radiance moves with it when the light moves with the subject too (shading is
    # exact under motion; cast shadows use the rest-pose tables by design, so compare unshadowed)
    flat = HeadScene(head.params, cube_n=96, vis_n=0)
    p = np.array([[0.5, 0.8, 1.3]])
    img_m = flat.radiance(cam, (T[:3, :3] @ p[0] + T[:3, 3])[None], [[1, 1, 1]], pose=T)
    img_r = flat.radiance(cam2, p, [[1, 1, 1]])
    close = np.abs(img_m - img_r).max(-1) <= 1e-4 * img_r.max()
    assert close[both].mean() > 0.99


# ---------------------------------------------------------------------------- subjects


def test_same_seed_same_subject_bytes_and_different_seeds_differ(cam):
    a, b = random_subject(11), random_subject(11)
    assert a == b
    c = random_subject(12)
    assert a != c
    light = (np.array([[0.3, 0.4, 1.5]]), np.array([[2.0, 2.0, 2.0]]))
    ra = HeadScene(a, cube_n=64, vis_n=32).radiance(cam, *light)
    rb = HeadScene(b, cube_n=64, vis_n=32).radiance(cam, *light)
    assert ra.tobytes() == rb.tobytes()
    rc = HeadScene(c, cube_n=64, vis_n=32).radiance(cam, *light)
    diff = np.abs(ra - rc).mean() / max(ra.mean(), rc.mean())
    assert diff > 0.05


def test_subjects_vary_in_skin_tone_and_shape():
    ps = [random_subject(s) for s in range(40)]
    tones = np.array([p.skin_tone for p in ps])
    assert tones.min() < 0.15 and tones.max() > 0.85
    from lightstage.twin.subject import _skin_albedo

    albs = np.array([_skin_albedo(p.skin_tone, p.skin_hue) for p in ps])
    assert albs[:, 1].max() / albs[:, 1].min() > 4  # light to dark skin, linear
    assert np.all(albs[:, 0] > albs[:, 2])  # skin is red-dominant
    assert np.std([p.nose_height for p in ps]) > 0.001
    assert len({p.hair_rgb for p in ps}) > 10


def test_eyes_are_glossy_and_skin_is_not(head):
    from lightstage.twin.render import MAT_CHANNELS

    mat = head.material
    a = MAT_CHANNELS.index("alpha")
    # the glossiest texels (eyes) are much smoother than the typical (skin/hair) texel
    assert np.percentile(mat[:, a], 0.1) < 0.06 < np.median(mat[:, a])


def test_world2head_puts_the_head_in_the_eg3d_box(head, cam):
    tr = head.truth(make_camera((0, 0, 1.0), size=64))
    P = tr["position"][tr["mask"]]
    P = P[P[:, 1] > -0.10]  # above the chin (the neck continues below the box)
    Ph = P @ head.world2head[:3, :3].T + head.world2head[:3, 3]
    assert np.abs(Ph).max() < 0.5
    assert 0.2 < Ph[:, 2].max() < 0.45  # the face front (nose tip) towards +z


# ---------------------------------------------------------------------------- shadows


def test_side_light_casts_shadows_that_n_dot_l_would_light():
    p = random_subject(3)
    lit = HeadScene(p, cube_n=96, vis_n=48)
    no_shadow = HeadScene(p, cube_n=96, vis_n=0)
    front = make_camera((0.0, 0.0, 1.0), size=72)
    light = np.array([[0.6, 0.9, 1.0]])  # from the subject's upper left (+x, +y)
    a = lit.radiance(front, light, [[3, 3, 3]])[..., 1]
    b = no_shadow.radiance(front, light, [[3, 3, 3]])[..., 1]
    assert np.all(a <= b + 1e-6)  # visibility only removes light
    tr = lit.truth(front)
    L = light[0] - tr["position"]
    ndl = (tr["normal"] * L).sum(-1) / np.linalg.norm(L, axis=-1)
    dark = (a < 0.3 * b) & (ndl > 0.3) & tr["mask"]
    assert dark.sum() >= 10
    # the shadowed-yet-facing pixels are on the far (-x) side
    assert np.median(tr["position"][dark][:, 0]) < 0.0


def test_shadow_maps_agree_with_ray_marched_shadow_rays(head):
    occ, x, n = head._vis_surface()
    for q in (np.array([0.6, 0.9, 1.0]), np.array([-1.2, -0.3, 0.8])):
        tab = head._compute_visibility(q, False)
        L = q - x
        dist = np.linalg.norm(L, axis=1)
        l = L / dist[:, None]
        cand = np.flatnonzero((n * l).sum(1) > 0.05)
        th = head.surface.march(x[cand] + 0.002 * n[cand], l[cand], t_end=dist[cand], polish=False)
        marched = np.isinf(th)
        mapped = tab[cand] > 127
        assert (~marched).sum() > 50  # there are real cast shadows to agree on
        assert (marched == mapped).mean() > 0.97


def test_bad_inputs_are_refused(head, cam):
    with pytest.raises(ValueError, match="pose"):
        head.radiance(cam, [[0, 0, 1.5]], [[1, 1, 1]], pose=np.eye(3))
    with pytest.raises(ValueError, match="rotation"):
        head.radiance(cam, [[0, 0, 1.5]], [[1, 1, 1]], pose=np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="light_rgb"):
        head.radiance(cam, [[0, 0, 1.5], [0, 1.5, 0]], [[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="inside"):
        head.radiance(cam, [[0.0, 0.05, 0.1]], [[1, 1, 1]])
