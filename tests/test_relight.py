"""Relighting maths: light weights (solid-angle exact), rotations, coverage, OLAT combination,
streaming over a store take.

Truth: analytic integrals (4 pi, cap solid angles, the Lambertian cosine integral), brute-force
sums written independently here, and rotation identities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightstage import envmap as E
from lightstage import relight as R
from lightstage.rig import builtin_rig, fibonacci_sphere

RIGS = {"tiny": 32, "demo": 150, "lsx-331": 331}


@pytest.fixture(scope="module")
def rig_dirs():
    return {name: builtin_rig(name).light_directions() for name in RIGS}


def lobe(height, axis, kappa=6.0):
    d = E.equirect_directions(height)
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    return (0.05 + np.exp(kappa * (d @ a - 1))[..., None] * np.array([1.0, 0.7, 0.4])).astype(np.float32)


# ---- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["voronoi", "vmf"])
def test_uniform_environment_sums_to_4pi(rig_dirs, method):
    for name, L in RIGS.items():
        d = rig_dirs[name]
        assert d.shape == (L, 3)
        w = R.light_weights(E.uniform_environment(64), d, method=method)
        assert w.shape == (L, 3) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(0), 4 * math.pi, rtol=1e-4)


def test_voronoi_weight_is_nearest_light_region_solid_angle(rig_dirs):
    """Brute force: each light's weight under a uniform map is the solid angle of the pixels
    whose centre is nearest to it (argmax of dot products, computed here independently)."""
    d = rig_dirs["tiny"]
    h = 32
    dirs = E.equirect_directions(h).reshape(-1, 3)
    nearest = np.argmax(dirs @ d.T, axis=1)
    om = E.solid_angles(h).ravel()
    expect = np.bincount(nearest, weights=om, minlength=len(d))
    w = R.light_weights(E.uniform_environment(h), d, index_map_cache=None)
    np.testing.assert_allclose(w[:, 1], expect, rtol=1e-12)
    # and the regions are near the ideal equal-area share for a near-uniform light set
    assert abs(np.median(w[:, 0]) - 4 * math.pi * 0.9 / len(d)) / (4 * math.pi / len(d)) < 0.3


def test_single_bright_pixel_lands_on_its_nearest_light(rig_dirs):
    d = rig_dirs["lsx-331"]
    h = 128
    env = np.zeros((h, 2 * h, 3), np.float32)
    v, u = 40, 77
    env[v, u] = [1000.0, 500.0, 250.0]
    w = R.light_weights(env, d)
    target = int(np.argmax(d @ E.equirect_directions(h)[v, u]))
    assert np.count_nonzero(w.sum(1)) == 1 and w[target, 0] > 0
    np.testing.assert_allclose(w[target], env[v, u] * E.row_solid_angles(h)[v], rtol=1e-6)


def test_vmf_spreads_but_conserves(rig_dirs):
    d = rig_dirs["demo"]
    h = 64
    env = np.zeros((h, 2 * h, 3), np.float32)
    env[20, 50] = 100.0
    wv = R.light_weights(env, d, method="vmf")
    assert np.count_nonzero(wv[:, 0] > 1e-3 * wv[:, 0].max()) >= 3  # spread over neighbours
    np.testing.assert_allclose(wv.sum(0), E.total_power(env), rtol=1e-9)
    # a very sharp kernel is the Voronoi assignment
    sharp = R.light_weights(env, d, method="vmf", kappa=1e6)
    np.testing.assert_allclose(sharp, R.light_weights(env, d), atol=1e-9)


def test_unknown_method_and_bad_lights():
    with pytest.raises(R.RelightError, match="unknown weight method"):
        R.light_weights(E.uniform_environment(8), np.eye(3), method="max")
    with pytest.raises(R.RelightError, match=r"\(L, 3\)"):
        R.light_weights(E.uniform_environment(8), np.ones((4, 2)))
    with pytest.raises(R.RelightError, match="zero or not finite"):
        R.light_weights(E.uniform_environment(8), np.array([[0, 1, 0], [0, 0, 0.0]]))


# ---- rotations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [(0, 1, 0), (0.4, 1, -0.3)])
def test_360_rotation_gives_same_weights(rig_dirs, axis):
    d = rig_dirs["demo"]
    env = lobe(64, (1, 0.5, 0.2))
    w0 = R.light_weights(env, d)
    w = R.weights_for_rotations(env, d, [0.0, 360.0], axis=axis)
    np.testing.assert_allclose(w[0], w0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(w[1], w0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("axis,angle", [((0, 1, 0), 23.7), ((0, 1, 0), -140.0), ((1, 0.5, 0.2), 50.0)])
def test_rotating_env_equals_rotating_lights_back(rig_dirs, axis, angle):
    """E_i(R env) = E(env; R^T l_i): equal up to pixel-level Voronoi boundaries, so the
    difference must shrink as the map gets finer."""
    d = rig_dirs["lsx-331"]
    Rm = E.rotation_matrix(axis, angle)
    err = {}
    for h in (128, 256):
        env = lobe(h, (0.3, 0.6, 1.0), kappa=4.0)
        via_env = R.light_weights(E.rotate(env, angle, axis), d)
        via_lights = R.light_weights(env, d @ Rm, index_map_cache=None)  # rows are R^T l
        err[h] = np.abs(via_env - via_lights).max() / via_lights.max()
        np.testing.assert_allclose(via_env.sum(0), via_lights.sum(0), rtol=2e-3)
    assert err[256] < 0.04 and err[256] < 0.6 * err[128]
    fast = R.weights_for_rotations(env, d, [angle], axis=axis)[0]
    assert np.abs(fast - via_lights).max() / via_lights.max() < 0.04


def test_weights_for_rotations_matches_one_by_one(rig_dirs):
    d = rig_dirs["tiny"]
    env = lobe(32, (1, 0.2, 0.1))
    angles = np.linspace(0, 360, 7, endpoint=False)
    w = R.weights_for_rotations(env, d, angles)
    for a, wa in zip(angles, w):
        np.testing.assert_allclose(wa, R.light_weights(E.rotate(env, a), d), rtol=1e-6, atol=1e-9)


# ---- cache ---------------------------------------------------------------------------------------


def test_cache_reuses_and_persists(tmp_path, rig_dirs):
    d = rig_dirs["tiny"]
    env = lobe(32, (0, 1, 1))
    cache = R.TransferCache(directory=tmp_path)
    w1 = R.light_weights(env, d, index_map_cache=cache)
    w2 = R.light_weights(env * 2, d, index_map_cache=cache)
    assert cache.builds == 1
    np.testing.assert_allclose(w2, 2 * w1, rtol=1e-6)
    again = R.TransferCache(directory=tmp_path)  # a new process: read from disk
    np.testing.assert_array_equal(R.light_weights(env, d, index_map_cache=again), w1)
    assert again.builds == 0 and len(list(tmp_path.glob("*.npz"))) == 1
    R.light_weights(env, d[::-1], index_map_cache=again)  # another light set: another entry
    assert again.builds == 1
    (next(tmp_path.glob("*.npz"))).write_bytes(b"damaged")  # a damaged file is rebuilt
    third = R.TransferCache(directory=tmp_path)
    np.testing.assert_array_equal(R.light_weights(env, d, index_map_cache=third), w1)


# ---- coverage ------------------------------------------------------------------------------------


def test_coverage_of_upper_hemisphere_rig_is_the_lower_cap():
    # a dense ring on the horizon (1 deg apart) plus lights above: the nearest light of a
    # direction at elevation -e is the ring light at its azimuth, e away
    az = np.radians(np.arange(360))
    ring = np.stack([np.sin(az), np.zeros_like(az), np.cos(az)], 1)
    top = fibonacci_sphere(400, min_elevation_deg=0.0)
    d = np.concatenate([ring, top[top[:, 1] > 0.05]])
    h = 256
    env = E.uniform_environment(h)
    cov = R.coverage(d, env=env, max_angle_deg=20.0)
    cap = 2 * math.pi * (1 - math.sin(math.radians(20)))  # elevations below -20 deg
    assert abs(cov.solid_angle - cap) / cap < 0.01
    np.testing.assert_allclose(cov.power_fraction, cov.solid_angle / (4 * math.pi), rtol=1e-6)
    assert "sphere" in cov.summary()
    full = R.coverage(fibonacci_sphere(200), height=64)
    assert full.solid_angle == 0.0 and np.isnan(full.power_fraction).all()


# ---- combination ---------------------------------------------------------------------------------


def naive(olat, w):
    """Interleaved reference: sum_i w[i, c] * olat[i, c, ...] with float64 accumulation."""
    return np.einsum("lc...,lc->c...", olat.astype(np.float64), w.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_relight_matches_naive_sum(dtype):
    rng = np.random.default_rng(5)
    L, H, W = 37, 19, 23  # block boundaries do not divide the pixel count
    olat = (rng.random((L, 3, H, W)) * 4).astype(dtype)
    w = rng.random((L, 3)).astype(np.float32)
    ref = naive(olat, w)
    out = R.relight(olat, w)
    assert out.shape == (3, H, W) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    flat = R.relight(olat.reshape(L, -1), w)
    np.testing.assert_allclose(flat.reshape(3, H, W), ref, rtol=1e-5)
    ws = rng.random((4, L, 3)).astype(np.float32)
    many = R.relight(olat, ws)
    assert many.shape == (4, 3, H, W)
    for n in range(4):
        np.testing.assert_allclose(many[n], naive(olat, ws[n]), rtol=1e-5)
    buf = np.empty((3, H, W), np.float32)
    assert R.relight(olat, w, out=buf) is buf


def _half_kernel_or_skip():
    from lightstage import _half

    if not _half.available():
        pytest.skip(f"fused float16 kernel unavailable: {_half.why_unavailable()}")
    return _half


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_float16_kernel_matches_float64_reference(threads):
    """The fused kernel equals float64 arithmetic on the float16 values (float32 accumulation
    only), for awkward sizes (lights not a multiple of 4, pixels not a multiple of the block),
    several weight sets, subnormal and near-maximum halves, weights far beyond float16's range
    and an existing ``out`` it must add to."""
    half = _half_kernel_or_skip()
    rng = np.random.default_rng(11)
    L, P, N = 39, 5 * 257 + 3, 3
    x = (rng.random((L, 3, P)) * 2).astype(np.float16)
    x[0, 0, :7] = [6e-8, 1e-7, 3e-6, 6.1e-5, 65504, -65504, 0]  # subnormal ... largest half
    x[5, 2] *= -1
    w = (rng.random((N, L, 3)) * 1e6).astype(np.float32)  # sums overflow float16 many times
    out = rng.random((N, 3, P)).astype(np.float32)
    ref = out.astype(np.float64) + np.einsum("lcp,nlc->ncp", x.astype(np.float64), w.astype(np.float64))
    half.combine_f16(x, w, out, threads=threads, block=256)
    scale = np.abs(ref).max(axis=-1, keepdims=True)
    assert np.abs(out - ref).max() / scale.max() < 1e-6
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * float(scale.max()))


def test_relight_float16_uses_the_fused_kernel(monkeypatch):
    """``relight`` on a float16 stack goes through the fused kernel (not the torch fallback), and
    both paths agree with the float64 reference."""
    half = _half_kernel_or_skip()
    calls = []
    real = half.combine_f16
    monkeypatch.setattr(half, "combine_f16", lambda *a, **k: (calls.append(a[0].shape), real(*a, **k)))
    rng = np.random.default_rng(12)
    olat = (rng.random((21, 3, 17, 29)) * 3).astype(np.float16)
    w = rng.random((21, 3)).astype(np.float32)
    ref = naive(olat, w)
    np.testing.assert_allclose(R.relight(olat, w), ref, rtol=1e-5)
    assert calls == [(21, 3, 17 * 29)]
    out = np.zeros((3, 17, 29), np.float32)
    fallback = R.Relighter(21, 17 * 29, device="cpu", use_kernel=False)
    import torch

    fallback.accumulate(torch.from_numpy(out).view(1, 3, -1), olat.reshape(21, 3, -1), w[None])
    assert len(calls) == 1  # the torch path did not call the kernel
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_relight_torch_input_and_errors():
    import torch

    rng = np.random.default_rng(6)
    olat = rng.random((5, 3, 4, 4)).astype(np.float32)
    w = rng.random((5, 3)).astype(np.float32)
    np.testing.assert_allclose(R.relight(torch.from_numpy(olat), w), naive(olat, w), rtol=1e-5)
    with pytest.raises(R.RelightError, match="channel-planar"):
        R.relight(olat.transpose(0, 2, 3, 1), w)
    with pytest.raises(R.RelightError, match="L = 5"):
        R.relight(olat, w[:4])
    with pytest.raises(R.RelightError, match="NaN"):
        R.relight(olat, np.full((5, 3), np.nan))


def test_lambertian_sphere_under_uniform_light_converges_to_albedo(rig_dirs):
    """Independent truth: a Lambertian surface of albedo rho under uniform radiance 1 has
    radiance rho (irradiance pi). OLAT_i = rho / pi * max(0, n . l_i) per unit E_i."""
    rho = np.array([0.7, 0.5, 0.3])
    n = fibonacci_sphere(500, min_elevation_deg=0.0)  # upward-facing normals: well covered
    errs = {}
    for name in RIGS:
        d = rig_dirs[name]
        olat = (rho[None, :, None] / math.pi * np.clip(d @ n.T, 0, None)[:, None, :]).astype(np.float32)
        img = R.relight(olat, R.light_weights(E.uniform_environment(128), d))
        errs[name] = float(np.sqrt(np.mean((img / rho[:, None] - 1) ** 2)))
    assert errs["lsx-331"] < 0.05
    assert errs["lsx-331"] < errs["demo"] < errs["tiny"]


# ---- stores --------------------------------------------------------------------------------------


def make_take(tmp_path, L=12, H=20, W=24, dtype="float16", scale=4.0, seed=0, done=True):
    from lightstage.store import create_take, open_take

    rng = np.random.default_rng(seed)
    dirs = fibonacci_sphere(L, -50)
    g = create_take(tmp_path / "s.zarr", "subj", "t0", cameras=["c0", "c1"], n_lights=L,
                    n_tracking=1, height=H, width=W, dtype=dtype, scale=scale,
                    attrs={"light_directions": dirs, "light_rgb": np.ones((L, 3)),
                           "K": np.tile(np.eye(3), (2, 1, 1)), "cam2world": np.tile(np.eye(4), (2, 1, 1))})
    stored = (rng.random((2, L, 3, H, W)) * 2).astype(dtype)
    g["olat"][...] = stored
    mask = np.zeros((2, H, W), np.uint8)
    mask[:, 4:16, 5:19] = 255
    g["mask"][...] = mask
    d = np.ones((2, L), np.uint8)
    if not done:
        d[1, 3] = 0
    g["done"][...] = d
    return open_take(tmp_path / "s.zarr"), stored.astype(np.float64) * scale


def test_relight_take_streams_in_bounded_chunks(tmp_path):
    take, radiance = make_take(tmp_path)
    L = radiance.shape[1]
    w = np.random.default_rng(1).random((L, 3)).astype(np.float32)
    ref = naive(radiance[1], w)
    calls = []
    out = R.relight_take(take, "c1", w, max_bytes=3 * 20 * 24 * 6 * 5,  # five lights per chunk
                         progress=lambda i, n: calls.append((i, n)))
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    assert calls == [(5, L), (10, L), (12, L)]
    crop = R.relight_take(take, 1, w, crop=(2, 9, 3, 20))
    np.testing.assert_allclose(crop, ref[:, 2:9, 3:20], rtol=1e-5)
    many = R.relight_take(take, 0, np.stack([w, 2 * w]))
    np.testing.assert_allclose(many[1], 2 * naive(radiance[0], w), rtol=1e-5)
    from lightstage import _half

    if _half.available():  # the store stream takes the fused float16 path chunk by chunk
        calls.clear()
        real = _half.combine_f16
        try:
            _half.combine_f16 = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))
            np.testing.assert_allclose(R.relight_take(take, "c1", w, max_bytes=3 * 20 * 24 * 6 * 5),
                                       ref, rtol=1e-5)
        finally:
            _half.combine_f16 = real
        assert calls == [5, 5, 2]
    lazy = R.relight_take_dask(take, "c1", w, lights_per_chunk=5)
    np.testing.assert_allclose(lazy.compute(), ref, rtol=1e-5)
    src = R.TakeSource(take, "c1")
    np.testing.assert_allclose(src.relight(w)[0], ref, rtol=1e-5)
    assert src.mask().sum() == 12 * 14
    with pytest.raises(R.RelightError, match="crop"):
        R.relight_take(take, 0, w, crop=(0, 30, 0, 5))


def test_relight_take_refuses_incomplete(tmp_path):
    take, radiance = make_take(tmp_path, done=False)
    w = np.ones((radiance.shape[1], 3), np.float32)
    R.relight_take(take, "c0", w)  # camera 0 is complete
    with pytest.raises(R.RelightError, match=r"c1.*lights \[3\]"):
        R.relight_take(take, "c1", w)
    R.relight_take(take, "c1", w, allow_incomplete=True)
