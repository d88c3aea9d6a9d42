"""Environment maps: geometry, files, resampling, rotation, conversions, built-ins.

Truth is analytic (spherical geometry, exact band integrals, rotation matrices) or comes from
independent writers (OpenCV's RGBE writer, Pillow) and the real HDRIs in shared/data/real.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightstage import envmap as E
from lightstage.imageio import ImageIOError, read_exr, read_hdr, read_ldr, write_exr


def dir_coded(height: int) -> np.ndarray:
    """A map whose radiance encodes its own direction: L(d) = 0.5 + 0.5 d."""
    return (0.5 + 0.5 * E.equirect_directions(height)).astype(np.float32)


def decode(rgb: np.ndarray) -> np.ndarray:
    d = 2 * np.asarray(rgb, np.float64) - 1
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def angle_deg(a, b) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1, 1)))


def lobe(height: int, axis, kappa: float = 8.0) -> np.ndarray:
    """Smooth analytic map: a coloured vMF lobe around ``axis`` plus a dim floor."""
    d = E.equirect_directions(height)
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    v = np.exp(kappa * (d @ a - 1))[..., None]
    return (0.05 + v * np.array([1.0, 0.6, 0.3])).astype(np.float32)


# ---- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1, 7, 32, 250, 512])
def test_solid_angles_sum_to_4pi(h):
    om = E.solid_angles(h)
    assert om.shape == (h, 2 * h)
    assert abs(om.sum() / (4 * math.pi) - 1) < 1e-6
    assert np.all(om > 0)


def test_solid_angle_matches_sin_theta_approximation():
    h = 256
    theta = math.pi * (np.arange(h) + 0.5) / h
    approx = (2 * math.pi / (2 * h)) * (math.pi / h) * np.sin(theta)
    np.testing.assert_allclose(E.row_solid_angles(h), approx, rtol=2e-5)


def test_direction_convention():
    h = 64
    d = E.equirect_directions(h)
    # centre column, equator -> +z (what the subject faces); quarter to the right -> +x
    np.testing.assert_allclose(d[h // 2 - 1:h // 2 + 1, h - 1:h + 1].mean((0, 1)) /
                               np.linalg.norm(d[h // 2 - 1:h // 2 + 1, h - 1:h + 1].mean((0, 1))),
                               [0, 0, 1], atol=1e-9)
    assert d[0, :, 1].min() > math.cos(math.pi / h) - 1e-12  # row 0 is the zenith band
    u, v = E.direction_to_pixel(np.array([1.0, 0, 0]), h)
    assert abs(u - (1.5 * h - 0.5)) < 1e-9 and abs(v - (h / 2 - 0.5)) < 1e-9
    uu, vv = E.direction_to_pixel(d, h)
    np.testing.assert_allclose(uu, np.arange(2 * h)[None].repeat(h, 0), atol=1e-9)
    np.testing.assert_allclose(vv, np.arange(h)[:, None].repeat(2 * h, 1), atol=1e-9)


def test_sample_reproduces_pixel_centres_and_interpolates():
    env = np.random.default_rng(0).random((16, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(E.sample(env, E.equirect_directions(16)), env, atol=1e-6)


# ---- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True])
def test_exr_round_trip_and_noncontiguous_views(tmp_path, half):
    rng = np.random.default_rng(1)
    rgb = (rng.random((9, 14, 3)) * 100).astype(np.float32)
    view = rgb[:, :, ::-1]  # a non-contiguous view: OpenEXR would write garbage if passed as is
    p = tmp_path / "a.exr"
    write_exr(p, view, half=half)
    back = read_exr(p)
    np.testing.assert_allclose(back, view, rtol=1e-3 if half else 0)


def test_exr_refuses_nonfinite_and_half_overflow(tmp_path):
    with pytest.raises(ImageIOError, match="non-finite"):
        write_exr(tmp_path / "x.exr", np.full((2, 4, 3), np.nan, np.float32))
    with pytest.raises(ImageIOError, match="float16"):
        write_exr(tmp_path / "y.exr", np.full((2, 4, 3), 1e5, np.float32), half=True)
    assert not (tmp_path / "y.exr").exists()


def test_hdr_reader_is_rgb_and_linear(tmp_path):
    import cv2

    rgb = np.zeros((4, 8, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 4.0, 1.0, 0.25  # red > green > blue (shared exponent)
    p = tmp_path / "a.hdr"
    assert cv2.imwrite(str(p), rgb[..., ::-1].copy())  # OpenCV writes BGR
    back = read_hdr(p)
    np.testing.assert_allclose(back, rgb, rtol=0.01)


def test_png_is_linearised(tmp_path):
    from PIL import Image

    a = np.full((2, 4, 3), 188, np.uint8)  # sRGB 188/255 = 0.7373 -> linear 0.5029
    Image.fromarray(a).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_ldr(tmp_path / "a.png"), 0.5029, atol=2e-4)


def test_load_envmap_errors(tmp_path):
    with pytest.raises(E.EnvMapError, match="nope.exr"):
        E.load_envmap(tmp_path / "nope.exr")
    write_exr(tmp_path / "odd.exr", np.ones((10, 13, 3), np.float32))
    with pytest.raises(E.EnvMapError, match="odd.exr.*13x10"):
        E.load_envmap(tmp_path / "odd.exr")
    neg = -np.ones((4, 8, 3), np.float32)
    write_exr(tmp_path / "neg.exr", neg)
    with pytest.raises(E.EnvMapError, match="negative"):
        E.load_envmap(tmp_path / "neg.exr")
    with pytest.raises(E.EnvMapError, match="built-in"):
        E.load_environment("no-such-env")


def test_save_and_load_envmap(tmp_path):
    env = lobe(16, (0, 1, 1))
    E.save_envmap(tmp_path / "e.exr", env)
    np.testing.assert_array_equal(E.load_envmap(tmp_path / "e.exr"), env)


# ---- resampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [(64, 16), (64, 21), (250, 64), (37, 10)])
def test_downsizing_conserves_power(src, dst):
    env = (np.random.default_rng(src).random((src, 2 * src, 3)) ** 8 * 50).astype(np.float32)
    out = E.resize(env, dst)
    assert out.shape == (dst, 2 * dst, 3)
    np.testing.assert_allclose(E.total_power(out), E.total_power(env), rtol=1e-6)


def test_resize_resamples_not_tiles():
    env = np.zeros((32, 64, 3), np.float32)
    env[:, 32:] = 1.0  # right half (phi > 0, the +x side) lit
    small = E.resize(env, 8)
    np.testing.assert_allclose(small[:, 8:], 1.0, atol=1e-6)
    np.testing.assert_allclose(small[:, :8], 0.0, atol=1e-6)
    big = E.resize(env, 64)  # upsizing interpolates: still right half lit, no repetition
    assert big[:, 66:126].min() > 0.999 and big[:, 2:62].max() < 1e-6
    const = np.full((16, 32, 3), 3.0, np.float32)
    np.testing.assert_allclose(E.resize(const, 40), 3.0, rtol=1e-6)
    np.testing.assert_allclose(E.resize(const, 5), 3.0, rtol=1e-6)


def test_resize_smooth_map_matches_analytic():
    # area average vs point value at the centre: differ by curvature x pixel^2 only
    np.testing.assert_allclose(E.resize(lobe(256, (1, 1, 0), 4), 64), lobe(64, (1, 1, 0), 4), atol=1e-2)


# ---- rotation ----------------------------------------------------------------------------------


def test_rotation_matrix_is_right_handed():
    np.testing.assert_allclose(E.rotation_matrix((0, 1, 0), 90) @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(E.rotation_matrix((1, 0, 0), 90) @ [0, 1, 0], [0, 0, 1], atol=1e-12)


@pytest.mark.parametrize("axis", [(0, 1, 0), (1, 0.3, -0.2)])
def test_rotate_360_is_identity(axis):
    env = lobe(32, (0.3, 0.5, 1))
    np.testing.assert_allclose(E.rotate(env, 360.0, axis, supersample=1), env, atol=2e-5)


@pytest.mark.parametrize("axis,angle", [((0, 1, 0), 37.3), ((1, 0, 0), 90), ((1, 2, -0.5), -65)])
def test_rotate_moves_content_like_the_rotation_matrix(axis, angle):
    a0 = np.array([0.2, 0.4, 1.0])
    R = E.rotation_matrix(axis, angle)
    out = E.rotate(lobe(128, a0), angle, axis)
    np.testing.assert_allclose(out, lobe(128, R @ a0), atol=0.01)


def test_y_rotation_by_whole_pixels_is_exact_roll():
    env = np.random.default_rng(3).random((8, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(E.rotate(env, 3 * 360 / 16), np.roll(env, 3, axis=1))
    half = E.rotate(env, 0.5 * 360 / 16)
    np.testing.assert_allclose(E.total_power(half), E.total_power(env), rtol=1e-6)


def test_exposure_is_stops():
    env = lobe(8, (0, 0, 1))
    np.testing.assert_allclose(E.exposure(env, -2), env / 4, rtol=1e-6)


# ---- conversions -------------------------------------------------------------------------------


def test_mirrorball_reflection_geometry():
    ball = E.equirect_to_mirrorball(dir_coded(256), 201)
    c = 100  # centre pixel reflects straight back to the camera (+z)
    np.testing.assert_allclose(decode(ball[c, c]), [0, 0, 1], atol=0.01)
    # normal at 45 deg to the right: n = (sin45, 0, cos45) -> r = 2 n_z n - z = +x
    j = int(round((math.sin(math.pi / 4) + 1) * 201 / 2 - 0.5))
    assert angle_deg(decode(ball[c, j]), np.array([1.0, 0, 0])) < 1.5
    # top of the ball (b > 0 is up) reflects upwards
    i = int(round((1 - math.sin(math.pi / 4)) * 201 / 2 - 0.5))
    assert angle_deg(decode(ball[i, c]), np.array([0, 1.0, 0])) < 1.5
    assert np.all(ball[0, 0] == 0)  # outside the ball


def test_mirrorball_round_trip_front_hemisphere():
    env = lobe(64, (0.3, 0.4, 1), 3)
    back = E.mirrorball_to_equirect(E.equirect_to_mirrorball(env, 512), 64)
    front = E.equirect_directions(64)[..., 2] > 0
    np.testing.assert_allclose(back[front], env[front], atol=0.01)


def test_cube_faces_see_their_directions():
    faces = E.equirect_to_cube(dir_coded(256), 16)
    dirs = E.cube_face_directions(16)
    assert np.percentile(angle_deg(decode(faces), dirs), 99) < 1.0
    for k, (name, f, _, _) in enumerate(E.CUBE_FACES):
        assert angle_deg(decode(faces[k, 7:9, 7:9].mean((0, 1))), np.asarray(f, float)) < 1.0, name


def test_cube_round_trip_and_cross_layout():
    env = lobe(64, (-0.5, 0.2, 0.4), 3)
    faces = E.equirect_to_cube(env, 48)
    np.testing.assert_array_equal(E.cross_to_cube(E.cube_to_cross(faces)), faces)
    back = E.cube_to_equirect(faces, 64)
    np.testing.assert_allclose(back, env, atol=0.01)


def test_cross_edges_are_continuous():
    cross = E.cube_to_cross(E.equirect_to_cube(dir_coded(128), 32))
    S = 32
    # +z's top row meets +y's bottom row; -x's right column meets -z's left column
    assert angle_deg(decode(cross[S, S:2 * S]), decode(cross[S - 1, S:2 * S])).max() < 4
    assert angle_deg(decode(cross[S:2 * S, 3 * S - 1]), decode(cross[S:2 * S, 3 * S])).max() < 4
    assert angle_deg(decode(cross[2 * S - 1, S:2 * S]), decode(cross[2 * S, S:2 * S])).max() < 4


# ---- built-ins ---------------------------------------------------------------------------------


def test_uniform_builtin():
    env = E.builtin_environment("uniform", height=32)
    np.testing.assert_allclose(E.total_power(env), 4 * math.pi, rtol=1e-6)


def test_studio_key_light_front_right_above():
    env = E.builtin_environment("studio", height=64)
    d = E.equirect_directions(64)
    y = env.sum(-1) * (d[..., 2] > 0.2)  # in front of the subject the key is the brightest
    key = d[y > 0.5 * y.max()].mean(0)
    assert key[0] > 0.3 and key[1] > 0.3 and key[2] > 0.3
    rim = d[env.sum(-1) > 0.9 * env.sum(-1).max()].mean(0)  # the rim light is behind
    assert rim[2] < -0.5
    assert env[d[..., 1] < -0.5].max() == 0  # black floor


def test_sun_sky_physics():
    h = 128
    env = E.sun_sky_environment(h, elevation_deg=35, azimuth_deg=90, turbidity=3)
    sky = E.sun_sky_environment(h, elevation_deg=35, azimuth_deg=90, turbidity=3, sun=False)
    d = E.equirect_directions(h)
    om = E.row_solid_angles(h)[:, None]
    up = d[..., 1] > 0
    # the sun is deposited as exact power in the pixels around its direction
    sun_power = np.einsum("hwc,hw->c", (env - sky) * up[..., None], om * up)
    np.testing.assert_allclose(sun_power, E.sun_radiance(35, 3) * E.SUN_SOLID_ANGLE, rtol=1e-5)
    # ... at elevation 35 deg, azimuth 90 deg (+x): brightest pixel within a pixel of it
    v, u = np.unravel_index(np.argmax(env.sum(-1)), env.shape[:2])
    sdir = np.array([math.cos(math.radians(35)), math.sin(math.radians(35)), 0])
    assert angle_deg(d[v, u], sdir) < 1.5 * 180 / h
    # clear-sky magnitudes (klux): direct-normal sun 60..110, diffuse horizontal sky 5..30
    y = np.array([0.2126, 0.7152, 0.0722])
    assert 60 < E.sun_radiance(35, 3) @ y * E.SUN_SOLID_ANGLE < 110
    e_sky = np.einsum("hwc,hw->c", sky * up[..., None], om * np.clip(d[..., 1], 0, None)) @ y
    assert 5 < e_sky < 30
    # blue sky at the zenith, a sun redder than it, a sun dimmer and redder when lower
    z = env[0].mean(0)
    assert z[2] > z[0]
    s35, s10 = E.sun_radiance(35, 3), E.sun_radiance(10, 3)
    assert s35[0] / s35[2] > z[0] / z[2] and (s10 < s35).all() and s10[0] / s10[2] > s35[0] / s35[2]
    with pytest.raises(E.EnvMapError, match="turbidity"):
        E.sun_sky_environment(8, turbidity=30)


def test_registry_names():
    for name in E.BUILTIN_ENVIRONMENTS:
        env = E.builtin_environment(name, height=16)
        assert env.shape == (16, 32, 3) and env.dtype == np.float32 and np.isfinite(env).all()
        assert env.min() >= 0


# ---- real data ---------------------------------------------------------------------------------


def test_real_envmaps_load(real_data):
    files = sorted((real_data / "envmaps").glob("*"))
    assert len(files) >= 6
    for f in files:
        env = E.load_envmap(f)
        assert env.shape[1] == 2 * env.shape[0] and env.dtype == np.float32, f.name
        assert np.isfinite(env).all() and env.min() >= 0, f.name
        small = E.resize(env, 32)
        np.testing.assert_allclose(E.total_power(small), E.total_power(env), rtol=1e-5, err_msg=f.name)
    office = E.load_envmap(real_data / "envmaps/threejs_piz_compressed_office.exr")
    assert office.shape == (512, 1024, 3) and 19 < office.max() <= 20  # half float, PIZ
    quarry = E.load_envmap(real_data / "envmaps/quarry_01_1k.hdr")
    assert 8e4 < quarry.max() < 9e4  # the sun survives (no 8-bit read)


def test_mirrorball_highlight_gives_light_direction():
    """A bright spot rendered onto a mirror ball is recovered by the reflection maths."""
    h, size = 256, 301
    true = np.array([0.4, 0.5, 0.77])
    true /= np.linalg.norm(true)
    env = np.zeros((h, 2 * h, 3), np.float32)
    d = E.equirect_directions(h)
    env[d @ true > math.cos(math.radians(1.0))] = 100.0
    ball = E.equirect_to_mirrorball(env, size)
    mask = E.equirect_to_mirrorball(np.ones_like(env), size)[..., 0] > 0
    (cx, cy), r = E.sphere_from_mask(mask)
    assert abs(cx - 150) < 0.01 and abs(cy - 150) < 0.01 and abs(r - size / 2) < 0.5
    g = ball[..., 0]
    ys, xs = np.nonzero(g > 0.5 * g.max())
    got = E.mirrorball_direction(xs.mean(), ys.mean(), (cx, cy), r)
    assert angle_deg(got, true) < 1.0
    # the rim reflects the direction behind the ball
    assert angle_deg(E.mirrorball_direction(cx + r, cy, (cx, cy), r), np.array([0, 0, -1.0])) < 1e-4
