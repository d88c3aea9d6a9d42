"""Reflectance network and its store dataset, checked against analytic truth.

The store used here is an analytic scene (a textured sphere with Lambert + Blinn-Phong
reflectance under distant unit lights, seen by distorted pinhole cameras), so every pixel value,
mask and ray has a closed-form truth that does not go through the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightstage.camera import pixel_rays
from lightstage.rig import fibonacci_sphere, look_at
from lightstage.store import StoreError, create_take, open_take
from model.olat_data import DataConfig, OlatDataset, head_cameras, make_splits, validate_takes
from model.reflectance import (GeometrySamples, ReflectanceConfig, ReflectanceNet, march_density,
                               real_sh, render_fixed, sample_triplane)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread, restored after


# ---- analytic sphere store ---------------------------------------------------------------------

SPHERE_R = 0.1  # metres, centred at the world origin
W2H_SCALE = 2.0
W2H_T = np.array([0.0, 0.05, 0.1])


def _rot_y(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


W2H_R = _rot_y(30.0)


def world2head() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = W2H_SCALE * W2H_R
    m[:3, 3] = W2H_T
    return m


def albedo(n: np.ndarray, subject: int) -> np.ndarray:
    """(..., 3) texture on the sphere as a function of the world normal; differs per subject."""
    f = 3.0 + subject
    return 0.45 + 0.3 * np.stack([np.sin(f * n[..., 0]), np.cos(f * n[..., 1]),
                                  np.sin(f * n[..., 2] + n[..., 0])], -1)


def shade(n, v, l, subject):
    """Radiance per unit light: Lambert + Blinn-Phong, (..., 3). n, v (to viewer), l: unit."""
    ndl = np.clip((n * l).sum(-1), 0, None)
    h = l + v
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    spec = 0.08 * np.clip((n * h).sum(-1), 0, None) ** 20 * (ndl > 0)
    return albedo(n, subject) / np.pi * ndl[..., None] + spec[..., None]


def sphere_hit(o, d, c, r):
    """Ray/sphere: (hit mask, t) for origin o (3,), dirs (..., 3)."""
    oc = o - c
    b = (d * oc).sum(-1)
    disc = b * b - (oc @ oc - r * r)
    t = -b - np.sqrt(np.clip(disc, 0, None))
    return disc > 0, t


def write_sphere_store(path, n_subjects=2, n_cams=3, n_lights=12, size=32, dtype="float32"):
    dirs = fibonacci_sphere(n_lights, min_elevation_deg=-40.0)
    cams = []
    for k in range(n_cams):
        yaw = math.radians(-40 + 80 * k / max(n_cams - 1, 1))
        eye = np.array([math.sin(yaw), 0.1, math.cos(yaw)])
        f = 0.6 * size * 1.0 / (2 * SPHERE_R)
        K = np.array([[f, 0, size / 2 - 0.5 + 0.3 * k], [0, f * 1.01, size / 2 - 0.5], [0, 0, 1]])
        cams.append((K, np.array([-0.05, 0.01, 0, 0, 0]), look_at(eye, np.zeros(3))))
    for s in range(n_subjects):
        g = create_take(path, f"s{s}", "t0", cameras=[f"cam{k}" for k in range(n_cams)],
                        n_lights=n_lights, n_tracking=1, height=size, width=size, dtype=dtype,
                        attrs=dict(light_directions=dirs, light_rgb=np.ones((n_lights, 3)),
                                   K=np.stack([c[0] for c in cams]),
                                   distortion=np.stack([c[1] for c in cams]),
                                   cam2world=np.stack([c[2] for c in cams]), world2head=world2head()))
        for k, (K, dist, c2w) in enumerate(cams):
            o, d = pixel_rays(K, dist, c2w, size, size)
            hit, t = sphere_hit(o, d, np.zeros(3), SPHERE_R)
            n = o + t[..., None] * d
            n /= np.linalg.norm(n, axis=-1, keepdims=True)
            imgs = np.stack([shade(n, -d, dirs[i], s) * hit[..., None] for i in range(n_lights)])
            g["olat"][k] = imgs.transpose(0, 3, 1, 2).astype(dtype)
            g["tracking"][k, 0] = imgs.sum(0).transpose(2, 0, 1).astype(dtype)
            g["mask"][k] = hit.astype(np.uint8) * 255
            g["valid"][k] = 255
        g["done"][:] = 1
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_sphere_store(tmp_path_factory.mktemp("refl") / "s.zarr")


def head_density(points: torch.Tensor) -> torch.Tensor:
    """Density of the sphere in the head frame (centre W2H_T, radius W2H_SCALE * SPHERE_R)."""
    c = torch.as_tensor(W2H_T, dtype=points.dtype)
    return 400.0 * ((points - c).norm(dim=-1) < W2H_SCALE * SPHERE_R).to(points.dtype)


# ---- maths ----------------------------------------------------------------------------------


def test_real_sh_orthonormal():
    n_t, n_p = 200, 400
    th = (np.arange(n_t) + 0.5) * np.pi / n_t
    ph = (np.arange(n_p) + 0.5) * 2 * np.pi / n_p
    T, P = np.meshgrid(th, ph, indexing="ij")
    d = np.stack([np.sin(T) * np.sin(P), np.cos(T), np.sin(T) * np.cos(P)], -1)
    Y = real_sh(torch.from_numpy(d), 4).numpy().reshape(-1, 25)
    w = (np.sin(T) * (np.pi / n_t) * (2 * np.pi / n_p)).reshape(-1)
    G = (Y * w[:, None]).T @ Y
    assert np.abs(G - np.eye(25)).max() < 2e-3
    # l=1 band is proportional to (x, y, z) in the order m=-1,0,1 -> (x, y, z) up to sign
    c1 = math.sqrt(3 / (4 * math.pi))
    np.testing.assert_allclose(np.abs(Y[:, 1:4]), np.abs(c1 * d.reshape(-1, 3)), atol=1e-9)


@pytest.mark.parametrize("mode", ["eg3d", "clean"])
def test_sample_triplane_reads_the_right_axes(mode):
    H = W = 16
    g = (torch.arange(W, dtype=torch.float64) + 0.5) / W * 2 - 1  # pixel-centre coordinates
    u = g[None, :].expand(H, W)  # varies along width  (first plane coordinate)
    v = g[:, None].expand(H, W)  # varies along height (second plane coordinate)
    planes = torch.stack([torch.stack([u, v])] * 3)[None]  # (1, 3, 2, H, W)
    box = 1.6
    p = (torch.rand(1, 50, 3, dtype=torch.float64) - 0.5) * box * 0.8
    f = sample_triplane(planes, p, box, mode)  # (1, 3, 50, 2)
    q = p[0] * 2 / box
    x, y, z = q.unbind(-1)
    third = (z, x) if mode == "eg3d" else (z, y)
    for k, (a, b) in enumerate([(x, y), (x, z), third]):
        torch.testing.assert_close(f[0, k, :, 0], a)
        torch.testing.assert_close(f[0, k, :, 1], b)


def test_march_density_matches_analytic_transmittance():
    o = torch.zeros(1, 1, 3, dtype=torch.float64)
    d = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    # slab of density 3 between z=1 and z=1.5: the ray's opacity is 1 - exp(-1.5)
    s = march_density(lambda p: 3.0 * ((p[..., 2] > 1) & (p[..., 2] < 1.5)).double(), o, d, 0.0, 2.0, 801)
    assert abs(s.weights.sum().item() - (1 - math.exp(-1.5))) < 1e-2
    # an opaque sphere: the weights peak where the ray enters it
    c = torch.tensor([0.0, 0.0, 1.2], dtype=torch.float64)
    s = march_density(lambda p: 500.0 * ((p - c).norm(dim=-1) < 0.3).double(), o, d, 0.0, 2.0, 401)
    depth = (s.weights * s.points[..., 2]).sum() / s.weights.sum()
    assert abs(depth.item() - 0.9) < 0.01 and s.weights.sum().item() > 0.99


# ---- network ----------------------------------------------------------------------------------


def _rand_setup(head, B=2, R=20, C=8, res=16, seed=0):
    torch.manual_seed(seed)
    net = ReflectanceNet(ReflectanceConfig.tiny(head=head, plane_channels=C, n_basis=6)).double()
    planes = torch.randn(B, 3, C, res, res, dtype=torch.float64)
    o = torch.zeros(B, R, 3, dtype=torch.float64)
    o[..., 2] = 2.7
    d = torch.nn.functional.normalize(torch.randn(B, R, 3, dtype=torch.float64) * 0.08
                                      + torch.tensor([0, 0, -1.0], dtype=torch.float64), dim=-1)
    s = march_density(lambda p: 50.0 * (p.norm(dim=-1) < 0.3).double(), o, d, 2.2, 3.2, 32)
    return net, planes, s


@pytest.mark.parametrize("head", ["basis", "concat"])
def test_env_relight_equals_sum_of_olats(head):
    net, planes, s = _rand_setup(head)
    L = 23
    ld = torch.nn.functional.normalize(torch.randn(L, 3, dtype=torch.float64), dim=-1)
    E = torch.rand(L, 3, dtype=torch.float64) * 4 * math.pi / L
    with torch.no_grad():
        one_pass = net.relight(planes, s, ld, E)
        # light by light, each OLAT from its own call
        ref = sum(E[i] * net.olat(planes, s, ld[None, i:i + 1].expand(2, 1, 3))[:, 0] for i in range(L))
    assert one_pass.shape == (2, 20, 3)
    assert ref.abs().max() > 0
    torch.testing.assert_close(one_pass, ref, rtol=1e-10, atol=1e-12)


def test_basis_olat_is_phi_weighted_sum_of_rendered_bases():
    net, planes, s = _rand_setup("basis")
    ld = torch.nn.functional.normalize(torch.randn(2, 5, 3, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        B = net.render_basis(planes, s)  # (2, K, R, 3)
        phi = net.light_coefficients(ld)  # (2, 5, K)
        # direct per-sample evaluation, then rendering: c_s = sum_k phi_k b_k,s
        feat = net.feature_planes(planes)
        raw = net._radiance(net._decode(feat, s)).reshape(2, 20, -1, 6, 3)
        per_sample = torch.einsum("blk,brskc->blrsc", phi, raw)
        direct = torch.stack([render_fixed(per_sample[:, j], s.weights) for j in range(5)], 1)
        olat = net.olat(planes, s, ld)
    assert (phi >= 0).all() and (B >= 0).all()
    torch.testing.assert_close(olat, direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", ["basis", "concat"])
def test_outputs_positive_view_and_light_dependent_geometry_fixed(head):
    net, planes, s = _rand_setup(head, seed=3)
    planes.requires_grad_(True)
    pts = s.points.clone().requires_grad_(True)
    s2 = GeometrySamples(pts, s.weights, s.dirs)
    ld = torch.nn.functional.normalize(torch.randn(2, 3, 3, dtype=torch.float64), dim=-1)
    out = net.olat(planes, s2, ld)
    assert (out >= 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert pts.grad is None  # the prior's geometry receives no gradient
    assert planes.grad is not None and planes.grad.abs().sum() > 0
    # the same samples seen along a different view direction give a different radiance
    d_other = torch.nn.functional.normalize(s.dirs + 0.5, dim=-1)
    with torch.no_grad():
        out_v = net.olat(planes, GeometrySamples(s.points, s.weights, d_other), ld)
        assert (out_v - out).abs().max() > 1e-6
        assert (out[:, 0] - out[:, 1]).abs().max() > 1e-6  # light dependence


def test_config_round_trip_and_validation():
    cfg = ReflectanceConfig.tiny(head="concat", plane_channels=16, radiance_scale=0.05)
    assert ReflectanceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="head"):
        ReflectanceConfig(head="mlp")
    with pytest.raises(ValueError, match="unknown"):
        ReflectanceConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="channels"):
        net = ReflectanceNet(cfg)
        net.feature_planes(torch.zeros(1, 3, 8, 4, 4), torch.zeros(1, 3))


# ---- dataset ------------------------------------------------------------------------------------


def test_rays_in_head_frame_hit_the_head_frame_sphere(store):
    ds = OlatDataset(store, config=DataConfig(rays_per_item=400, fg_fraction=0.5))
    c, r = W2H_T, W2H_SCALE * SPHERE_R
    for ti in range(2):
        for cam in range(3):
            o, d = ds.rays(ti, cam)
            m, _ = ds.mask(ti, cam)
            dist = np.linalg.norm(np.cross(d.reshape(-1, 3), c - o), axis=-1)  # ray-centre distance
            # |d| = 1 and the pixel's rays pass within the sphere iff foreground
            np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1, atol=1e-5)
            assert (dist[m.reshape(-1)] < r + 1e-4).all()
            assert (dist[~m.reshape(-1)] > r - 1e-4).all()
            assert m.sum() > 50


def test_items_match_analytic_radiance_in_head_frame(store):
    ds = OlatDataset(store, config=DataConfig(rays_per_item=300, lights_per_item=3, fg_fraction=1.0))
    rng = np.random.default_rng(1)
    for _ in range(4):
        it = ds.sample(rng)
        o, d = it["origins"].numpy().astype(np.float64), it["dirs"].numpy().astype(np.float64)
        hit, t = sphere_hit(o[0], d, W2H_T, W2H_SCALE * SPHERE_R)
        assert hit.all() and it["mask"].min() == 1
        n_h = o[0] + t[:, None] * d - W2H_T
        n_h /= np.linalg.norm(n_h, axis=-1, keepdims=True)
        n_w = n_h @ W2H_R  # head -> world rotation for the world-defined texture
        l_h = it["light_dirs"].numpy().astype(np.float64)
        for j in range(3):
            want = shade(n_w, -d @ W2H_R, l_h[j] @ W2H_R, int(it["take"]))
            got = it["target"][j].numpy()
            # rim pixels are where the pixel-centre ray and the analytic hit disagree most
            assert np.median(np.abs(got - want)) < 1e-4
        # the head-frame light directions are the rotated world ones
        world = np.asarray(ds.takes[int(it["take"])].light_directions)[it["lights"].numpy()]
        np.testing.assert_allclose(l_h, world @ W2H_R.T, atol=1e-6)


def test_foreground_weighted_sampling_and_crop(store):
    ds = OlatDataset(store, config=DataConfig(rays_per_item=2000, fg_fraction=0.8))
    it = ds[0]
    H = W = 32
    fg_share = ds.mask(int(it["take"]), int(it["camera"]))[0].mean()
    assert fg_share < 0.5 and it["mask"].mean() > 0.8  # fg over-represented vs its area share
    ds_c = OlatDataset(store, config=DataConfig(sampling="crop", crop=8, lights_per_item=2))
    it = ds_c[3]
    assert it["target"].shape == (2, 64, 3)
    px = it["pixels"].numpy()
    assert np.ptp(px[:, 0]) == 7 and np.ptp(px[:, 1]) == 7 and px.min() >= 0 and px.max() < H


def test_head_cameras_are_eg3d_normalised(store):
    cams = head_cameras(open_take(store, "s0", "t0"))
    for hc in cams:
        R = hc.cam2world[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        # the optical axis points at the head-frame sphere centre (cameras look at the origin)
        fwd = R[:, 2]
        to_c = W2H_T - hc.cam2world[:3, 3]
        assert np.dot(fwd, to_c / np.linalg.norm(to_c)) > 0.999
        assert abs(np.linalg.norm(to_c) - W2H_SCALE * math.sqrt(1.01)) < 1e-6
        assert abs(hc.K_norm[0, 0] - 0.6 / (2 * SPHERE_R)) < 1e-6 and hc.label.shape == (25,)


def test_splits_hold_out_lights_and_subjects(tmp_path):
    p = write_sphere_store(tmp_path / "x.zarr", n_subjects=3, n_cams=1, n_lights=20, size=8)
    sp = make_splits(p, holdout_light_fraction=0.25, holdout_subjects=1, seed=4)
    assert len(sp.val_lights) == 5 and not set(sp.val_lights) & set(sp.train_lights)
    assert sorted(sp.val_lights + sp.train_lights) == list(range(20))
    assert len(sp.val_takes) == 1 and len(sp.train_takes) == 2
    assert make_splits(p, 0.25, 1, seed=4) == sp
    ds = OlatDataset(p, takes=sp.train_takes, lights=sp.train_lights)
    drawn = {int(l) for i in range(30) for l in ds[i]["lights"]}
    assert drawn <= set(sp.train_lights)


def test_bad_stores_refused(tmp_path):
    p = write_sphere_store(tmp_path / "bad.zarr", n_subjects=2, n_cams=1, n_lights=4, size=8)
    import zarr

    root = zarr.open_group(str(p), mode="a")
    del root["s0/t0/mask"]
    root["s1/t0"].attrs["light_directions"] = np.ones((3, 3)).tolist()
    with pytest.raises(StoreError) as e:
        OlatDataset(p)
    msg = str(e.value)
    assert "s0/t0: missing array 'mask'" in msg and "s1/t0: light_directions" in msg
    p2 = write_sphere_store(tmp_path / "bad2.zarr", n_subjects=1, n_cams=1, n_lights=4, size=8)
    g = zarr.open_group(str(p2), mode="a")["s0/t0"]
    w = np.eye(4)
    w[0, 0] = 2.0  # anisotropic: not a similarity
    g.attrs["world2head"] = w.tolist()
    with pytest.raises(StoreError, match="not a similarity"):
        validate_takes([open_take(p2)])
    del g.attrs["world2head"]
    with pytest.raises(StoreError, match="world2head"):
        validate_takes([open_take(p2)])


@pytest.mark.parametrize("head", ["basis", "concat"])
def test_relight_rays_matches_light_by_light_olats_on_store_rays(store, head):
    from model.relight_model import DensityGeometry, light_weights, olat_rays, relight_rays

    ds = OlatDataset(store)
    torch.manual_seed(1)
    net = ReflectanceNet(ReflectanceConfig.tiny(head=head, plane_channels=8, n_basis=5)).eval()
    geo = DensityGeometry([torch.randn(1, 3, 8, 16, 16)] * 2, head_density, 1.6, 2.4, 64, 6)
    o, d = ds.rays(0, 1)
    origins = torch.from_numpy(np.broadcast_to(o, (32 * 32, 3)).copy())
    dirs = torch.from_numpy(d.reshape(-1, 3))
    # a uniform environment of radiance 1 gives weights summing to 4 pi (the store convention)
    E = light_weights(np.ones((16, 32, 3)), ds.takes[0].light_directions)
    assert abs(E.sum(0)[0] - 4 * math.pi) < 1e-6
    Et = torch.from_numpy(E).float()
    ld = torch.from_numpy(ds.light_dirs(0))
    timing = []
    one = relight_rays(net, geo, 0, origins, dirs, ld, Et, chunk=300, light_chunk=5, timing=timing)
    ref = torch.einsum("lrc,lc->rc", olat_rays(net, geo, 0, origins, dirs, ld, chunk=500), Et)
    torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-7)
    assert timing[0].network_s > 0 and one.abs().max() > 0
