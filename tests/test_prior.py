"""Generator parity with the official EG3D G_ema layout, and renderer maths against analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightstage.camera import EG3D_FOCAL, EG3D_FRONT_CAM2WORLD, eg3d_label, pixel_rays
from model.layers import conv2d_resample, modulated_conv2d, setup_filter, upsample2d
from model.prior import TriPlaneGenerator, build_generator
from model.rendering import (RenderOptions, ImportanceRenderer, composite, project_onto_planes,
                             plane_axes, ray_march, ray_sampler, sample_from_planes)


# ----------------------------------------------------------------- expected official layout -----
# Written from /work/shared/notes/eg3d-reference.md (sec. 1.3): channels min(32768 // res, 512),
# b4 has const + conv1 + torgb, b8..b256 have conv0/conv1/torgb, SR 8XDC block0 32->256 @256,
# block1 256->128 @512, OSGDecoder 32->64->33, mapping embed 25->512, fc0 1024->512, fc1 512->512.
def _official_g_ema_shapes() -> dict[str, tuple]:
    out = {}

    def fc(p, o, i):
        out[p + ".weight"] = (o, i)
        out[p + ".bias"] = (o,)

    def layer(p, cin, cout, res, k=3):
        out[p + ".weight"] = (cout, cin, k, k)
        out[p + ".bias"] = (cout,)
        out[p + ".noise_strength"] = ()
        out[p + ".noise_const"] = (res, res)
        out[p + ".resample_filter"] = (4, 4)
        fc(p + ".affine", cin, 512)

    def torgb(p, cin, cout):
        out[p + ".weight"] = (cout, cin, 1, 1)
        out[p + ".bias"] = (cout,)
        fc(p + ".affine", cin, 512)

    m = "backbone.mapping"
    fc(m + ".embed", 512, 25)
    fc(m + ".fc0", 512, 1024)
    fc(m + ".fc1", 512, 512)
    out[m + ".w_avg"] = (512,)
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128}
    s = "backbone.synthesis"
    out[s + ".b4.const"] = (512, 4, 4)
    out[s + ".b4.resample_filter"] = (4, 4)
    layer(s + ".b4.conv1", 512, 512, 4)
    torgb(s + ".b4.torgb", 512, 96)
    for r in (8, 16, 32, 64, 128, 256):
        b = f"{s}.b{r}"
        out[b + ".resample_filter"] = (4, 4)
        layer(b + ".conv0", ch[r // 2], ch[r], r)
        layer(b + ".conv1", ch[r], ch[r], r)
        torgb(b + ".torgb", ch[r], 96)
    for i, (cin, cout, r) in enumerate([(32, 256, 256), (256, 128, 512)]):
        b = f"superresolution.block{i}"
        out[b + ".resample_filter"] = (4, 4)
        layer(b + ".conv0", cin, cout, r)
        layer(b + ".conv1", cout, cout, r)
        torgb(b + ".torgb", cout, 3)
    fc("decoder.net.0", 64, 32)
    fc("decoder.net.2", 33, 64)
    return out


@pytest.fixture(scope="module")
def g_ffhq():
    return TriPlaneGenerator("eg3d-ffhq512")


def test_eg3d_ffhq512_names_and_shapes_match_official(g_ffhq):
    expected = _official_g_ema_shapes()
    got = {k: tuple(v.shape) for k, v in g_ffhq.state_dict().items()}
    assert len(expected) == 176
    assert set(got) - set(expected) == set(), "extra tensors"
    assert set(expected) - set(got) == set(), "missing tensors"
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not bad
    n_params = sum(p.numel() for p in g_ffhq.parameters())
    assert abs(n_params - 30.66e6) < 0.01e6, n_params
    assert g_ffhq.num_ws == 14


def test_tiny_forward_shapes():
    G = build_generator("tiny", seed=0).eval()
    c = torch.tensor(eg3d_label(EG3D_FRONT_CAM2WORLD))[None].repeat(2, 1)
    with torch.no_grad():
        ws = G.mapping(torch.randn(2, G.cfg.z_dim), c)
        planes = G.planes(ws)
        out = G.synthesis(ws, c)
    assert ws.shape == (2, G.num_ws, 128)
    assert planes.shape == (2, 3, 16, 64, 64)
    assert out["image"].shape == (2, 3, 64, 64) and out["image_raw"].shape == (2, 3, 32, 32)
    assert out["image_depth"].shape == (2, 1, 32, 32)
    d = out["image_depth"]
    assert torch.all(d >= 2.25 - 1e-4) and torch.all(d <= 3.3 + 1e-4)


# ----------------------------------------------------------------- layers ------------------------

def test_fir_upsample_reproduces_linear_ramp_interior():
    # The [1,3,3,1] FIR with zero insertion is linear interpolation at 1/4, 3/4 offsets: a ramp
    # x[j] = j maps to y[k] = (k - 0.5) / 2 away from the border.
    x = torch.arange(12.0).reshape(1, 1, 1, 12).repeat(1, 1, 12, 1)
    y = upsample2d(x, setup_filter())
    assert y.shape == (1, 1, 24, 24)
    k = torch.arange(24.0)
    np.testing.assert_allclose(y[0, 0, 6, 2:-2].numpy(), ((k - 0.5) / 2)[2:-2].numpy(), atol=1e-5)


def test_conv_up_equals_fir_upsample_then_conv():
    # StyleGAN2 runs its up-sampling layers with flip_weight=False, i.e. a true convolution
    # (flipped kernel) after FIR up-sampling; official weights were trained with that convention.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(5, 4, 3, 3)
    f = setup_filter()
    a = conv2d_resample(x, w, f=f, up=2, padding=1)
    b = torch.nn.functional.conv2d(upsample2d(x, f), w.flip([2, 3]), padding=1)
    assert a.shape == b.shape == (2, 5, 16, 16)
    torch.testing.assert_close(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2], atol=1e-4, rtol=1e-4)


def test_modulated_conv_matches_explicit_per_sample_conv():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    s = torch.rand(3, 4) + 0.5
    ref = []
    for b in range(3):
        wb = w * s[b].reshape(1, 4, 1, 1)
        wb = wb / wb.square().sum(dim=[1, 2, 3], keepdim=True).add(1e-8).sqrt()
        ref.append(torch.nn.functional.conv2d(x[b:b + 1], wb, padding=1))
    ref = torch.cat(ref)
    for fused in (True, False):
        got = modulated_conv2d(x, w, s, padding=1, fused_modconv=fused)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- planes and rays ---------------

def test_point_projects_onto_documented_plane_coords():
    p = torch.tensor([[[0.1, 0.2, 0.3]]])
    eg3d = project_onto_planes(plane_axes("eg3d"), p)[0, :, 0]
    np.testing.assert_allclose(eg3d.numpy(), [[0.1, 0.2], [0.1, 0.3], [0.3, 0.1]], atol=1e-6)
    clean = project_onto_planes(plane_axes("clean"), p)[0, :, 0]
    np.testing.assert_allclose(clean.numpy(), [[0.1, 0.2], [0.1, 0.3], [0.3, 0.2]], atol=1e-6)


def test_sample_from_planes_reads_the_right_texel():
    # Plane k stores, in channel 0, the grid-x coordinate of each texel centre and, in channel 1,
    # the grid-y one; bilinear lookup then returns the point's plane coordinates * 2 / box_warp.
    R = 16
    centres = (torch.arange(R) + 0.5) / R * 2 - 1
    gx = centres.reshape(1, R).expand(R, R)
    gy = centres.reshape(R, 1).expand(R, R)
    planes = torch.stack([gx, gy]).reshape(1, 1, 2, R, R).repeat(1, 3, 1, 1, 1)
    p = torch.tensor([[[0.1, -0.2, 0.3]]])
    box = 1.5
    got = sample_from_planes(planes, p, box_warp=box, mode="eg3d")[0, :, 0]  # [3, 2]
    want = np.array([[0.1, -0.2], [0.1, 0.3], [0.3, 0.1]]) * 2 / box
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    outside = sample_from_planes(planes + 5, torch.tensor([[[0.9, 0.9, 0.9]]]), box_warp=1.0)
    assert torch.all(outside == 0)  # zero padding outside the cube


def test_ray_sampler_matches_opencv_pixel_rays():
    R = 8
    c2w = torch.tensor(EG3D_FRONT_CAM2WORLD, dtype=torch.float32)[None]
    K = torch.tensor([[EG3D_FOCAL, 0, 0.5], [0, EG3D_FOCAL, 0.5], [0, 0, 1]], dtype=torch.float32)[None]
    o, d = ray_sampler(c2w, K, R)
    # Same camera in pixel units with OpenCV's integer pixel centres: c = R/2 - 0.5.
    Kpix = np.array([[EG3D_FOCAL * R, 0, R / 2 - 0.5], [0, EG3D_FOCAL * R, R / 2 - 0.5], [0, 0, 1]])
    o_ref, d_ref = pixel_rays(Kpix, [0, 0, 0, 0, 0], EG3D_FRONT_CAM2WORLD, R, R)
    np.testing.assert_allclose(o[0, 0].numpy(), o_ref, atol=1e-6)
    np.testing.assert_allclose(d[0].numpy(), d_ref.reshape(-1, 3), atol=1e-6)
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0  # pixel (row 0, col 0) looks left and up (+y world)


# ----------------------------------------------------------------- ray marching ------------------

def _raw_sigma(softplus_value: float) -> float:
    # invert softplus(s - 1) = v
    return 1.0 + math.log(math.expm1(softplus_value))


def test_ray_march_constant_density_is_analytic():
    S, s, c = 33, 2.0, 0.3
    depths = torch.linspace(2.0, 3.0, S).reshape(1, 1, S, 1)
    dens = torch.full_like(depths, _raw_sigma(s))
    cols = torch.full((1, 1, S, 3), c)
    rgb, depth, w = ray_march(cols, dens, depths)
    delta = 1.0 / (S - 1)
    a = 1 - math.exp(-s * delta)
    want_w = torch.tensor([a * (1 - a) ** i for i in range(S - 1)])
    torch.testing.assert_close(w[0, 0, :, 0], want_w.float(), atol=1e-6, rtol=1e-5)
    total = 1 - math.exp(-s * 1.0)
    assert w.sum().item() == pytest.approx(total, abs=1e-5)
    assert rgb[0, 0, 0].item() == pytest.approx(c * total * 2 - 1, abs=1e-5)
    # expected depth of the (discretised) exponential: sum w_i t_mid_i / sum w_i
    mids = (depths[0, 0, :-1, 0] + depths[0, 0, 1:, 0]) / 2
    assert depth.item() == pytest.approx((want_w * mids).sum().item() / want_w.sum().item(), abs=1e-5)


def test_ray_march_slab_between_depths():
    # Density s only in [2.4, 2.6] (sample points chosen so the slab is whole intervals).
    S = 51
    depths = torch.linspace(2.0, 3.0, S).reshape(1, 1, S, 1)
    t = depths[0, 0, :, 0]
    inside = (t >= 2.4 - 1e-6) & (t <= 2.6 + 1e-6)
    s = 5.0
    raw = torch.where(inside, torch.tensor(_raw_sigma(s)), torch.tensor(-60.0)).reshape(1, 1, S, 1)
    rgb, depth, w = ray_march(torch.ones(1, 1, S, 1), raw, depths)
    # mid-point densities: intervals fully inside get s, the two boundary intervals get
    # softplus(mean(raw) - 1) ~ 0 here since -60 dominates.
    assert w.sum().item() == pytest.approx(1 - math.exp(-s * 0.2), abs=1e-4)
    assert 2.4 <= depth.item() <= 2.6


class _ConstDecoder(torch.nn.Module):
    """Density from the mean plane feature: inside the cube features are 1 -> softplus value ln 2."""

    def forward(self, sampled, dirs=None):
        m = sampled.mean(1)[..., :1]
        return {"sigma": 1001 * m - 1000, "rgb": m.expand(-1, -1, 4) * 0.5}


@pytest.mark.parametrize("importance", [0, 16])
def test_renderer_constant_density_box(importance):
    # All rays of a narrow frontal view stay inside the cube over [2.25, 3.15]; density is
    # softplus(0) = ln 2 there, so the weight sum is 1 - exp(-ln2 * 0.9) whatever the samples.
    opts = RenderOptions(depth_resolution=32, depth_resolution_importance=importance, ray_start=2.25,
                         ray_end=3.15, mode="clean", deterministic=True)
    planes = torch.ones(1, 3, 4, 16, 16)
    c2w = torch.tensor(EG3D_FRONT_CAM2WORLD, dtype=torch.float32)[None]
    K = torch.tensor([[EG3D_FOCAL * 4, 0, 0.5], [0, EG3D_FOCAL * 4, 0.5], [0, 0, 1]])[None].float()
    o, d = ray_sampler(c2w, K, 4)
    res = ImportanceRenderer(opts)(planes, _ConstDecoder(), o, d)
    want = 1 - math.exp(-math.log(2) * 0.9)
    torch.testing.assert_close(res.weight_sum, torch.full_like(res.weight_sum, want), atol=2e-3, rtol=0)
    torch.testing.assert_close(res.features, torch.full_like(res.features, 0.5 * want * 2 - 1), atol=2e-3, rtol=0)
    assert res.samples.depths.shape == (1, 16, 32 + importance, 1)
    assert torch.all(res.samples.depths[:, :, 1:] >= res.samples.depths[:, :, :-1])
    torch.testing.assert_close(composite(res.samples.features, res.samples.weights) * 2 - 1, res.features)


def test_inference_is_deterministic_and_training_is_not():
    G = build_generator("tiny", seed=3)
    c = torch.tensor(eg3d_label(EG3D_FRONT_CAM2WORLD))[None]
    z = torch.randn(1, G.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    G.eval()
    with torch.no_grad():
        a = G(z, c)["image"]
        b = G(z, c)["image"]
        G.train()
        with torch.random.fork_rng(devices=[]):
            # noise_strength is initialised to 0; give the noise some effect
            for m in G.modules():
                if hasattr(m, "noise_strength"):
                    m.noise_strength.fill_(0.5)
            t1 = G(z, c)["image"]
            t2 = G(z, c)["image"]
    assert torch.equal(a, b)
    assert not torch.equal(t1, t2)


def test_eg3d_mode_forward_at_reduced_resolution(g_ffhq):
    g_ffhq.eval()
    c = torch.tensor(eg3d_label(EG3D_FRONT_CAM2WORLD))[None]
    z = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))
    assert g_ffhq.cfg.render.mode == "eg3d"
    with torch.no_grad():
        ws = g_ffhq.mapping(z, c)
        out = g_ffhq.synthesis(ws, c, neural_rendering_resolution=16, superresolution=False)
    assert out["image_raw"].shape == (1, 3, 16, 16)
    assert torch.isfinite(out["image_raw"]).all()
