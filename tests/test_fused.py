"""The fused develop/warp kernels (lightstage._fused) against the OpenCV reference path and
analytic cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lightstage import _fused, align
from lightstage.hdr import merge_raw_snr
from lightstage.raw import demosaic_planes, saturation_rgb

needs_kernels = pytest.mark.skipif(not _fused.available(),
                                   reason=f"fused kernels unavailable: {_fused.why_unavailable()}")


def test_kernels_available_where_numba_is_installed():
    """A probe failure would silently put every ingest on the slower reference path."""
    import importlib.util
    import os

    if importlib.util.find_spec("numba") is None or os.environ.get("LIGHTSTAGE_NO_NUMBA"):
        pytest.skip("numba not installed or disabled")
    assert _fused.available(), _fused.why_unavailable()


def _reference(dns, sats, blacks, whites, exps, cfa, inv_vig, M):
    """The ingest's OpenCV path: merge, demosaic, de-vignette, colour matrix."""
    m = merge_raw_snr(dns, blacks, whites, sats, exps)
    planes = [p * inv_vig for p in demosaic_planes(m.radiance, cfa)]
    out = np.einsum("ij,jhw->ihw", np.asarray(M, np.float64), np.stack(planes).astype(np.float64))
    return out, saturation_rgb(~m.valid)


def _bracket(H, W, K, seed, clip_all=True):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = 900 + 700 * np.sin(x / 3.1 + seed) * np.cos(y / 2.3) + rng.normal(0, 30, (H, W))
    exps = [0.25 * 4 ** k for k in range(K)]
    dns = [np.clip(base * e + 256, 0, 4095).astype(np.uint16) for e in exps]
    if clip_all:
        for d in dns:
            d[H // 2, W // 3] = 4095  # clipped in every exposure
    sats = [d >= 4090 for d in dns]
    return dns, sats, exps


@needs_kernels
@pytest.mark.parametrize("cfa", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("shape,K", [((17, 23), 1), ((16, 30), 2), ((41, 9), 3)])
def test_develop_matches_reference_path(cfa, shape, K):
    H, W = shape
    dns, sats, exps = _bracket(H, W, K, seed=K)
    y, x = np.mgrid[0:H, 0:W]
    inv_vig = (1 + 0.3 * ((x - W / 2) ** 2 + (y - H / 2) ** 2) / (W * W)).astype(np.float32)
    M = np.array([[1.6, -0.4, -0.2], [-0.25, 1.45, -0.2], [0.05, -0.55, 1.5]])
    want, want_bad = _reference(dns, sats, [256.0] * K, [4095.0] * K, exps, cfa, inv_vig, M)
    got, bad = _fused.develop_bayer(dns, sats, [256.0] * K, [4095.0] * K, exps, cfa, inv_vig, M)
    assert got.dtype == np.float32 and got.shape == (3, H, W)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7 * np.abs(want).max())
    # clipped in every exposure: flagged with its 3x3 demosaic support, nothing else
    assert want_bad.any()
    np.testing.assert_array_equal(bad.astype(bool), want_bad)


@needs_kernels
def test_develop_flat_colour_is_exact_at_borders():
    """A flat grey card through any CFA demosaics to the same value everywhere, borders
    included (the mirrored border keeps the pattern's parity)."""
    H, W = 9, 14
    dns = [np.full((H, W), 1256, np.uint16)]
    sats = [np.zeros((H, W), bool)]
    got, bad = _fused.develop_bayer(dns, sats, [256.0], [4096.0], [2.0], "GBRG",
                                    np.ones((H, W), np.float32), np.eye(3))
    np.testing.assert_allclose(got, 1000.0 / 3840.0 / 2.0, rtol=1e-6)
    assert not bad.any()


def _smooth(H, W):
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return np.stack([0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 7.0),
                     0.2 + 0.01 * x, 0.4 + 0.2 * np.cos((x + y) / 11.0)]).astype(np.float32)


@needs_kernels
def test_warp_of_a_ramp_is_exact_and_flags_outside():
    """out(x) = img(x + F(x)): a linear ramp moved by a constant sub-pixel flow is the ramp
    shifted (bilinear is exact on linear functions), and pixels whose source leaves the image
    are flagged."""
    H, W = 20, 32
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([x / 64, y / 64, (x + y) / 64 + 0.25]).astype(np.float32)
    u, v = 1.375, -0.625
    grid = np.zeros((2,) + align.flow_grid_shape(H, W, 4), np.float32)
    grid[0], grid[1] = u, v
    out, vm = _fused.warp_store(img, grid, 4, None, None)
    inside = (x + u <= W - 1) & (y + v >= 0)
    want = np.stack([(x + u) / 64, (y + v) / 64, (x + u + y + v) / 64 + 0.25])
    np.testing.assert_allclose(out.astype(np.float32)[:, inside], want[:, inside].astype(np.float16)
                               .astype(np.float32), atol=1e-6)
    np.testing.assert_array_equal(vm > 0, inside)


@needs_kernels
def test_warp_matches_opencv_reference_within_its_quantisation():
    """Against decode_flow + cv2.remap (which rounds the sampling position to 1/32 px): equal
    to within what that rounding moves a smooth image, validity identical."""
    H, W = 61, 83
    img = _smooth(H, W)
    gh, gw = align.flow_grid_shape(H, W, 4)
    gy, gx = np.mgrid[0:gh, 0:gw]
    grid = np.stack([1.3 + 0.8 * np.sin(gx / 4.0), -0.7 + 0.5 * np.cos(gy / 3.0)]).astype(np.float16)
    valid = np.ones((H, W), bool)
    valid[30:33, 40:42] = False
    cons = np.full((H, W), 255, np.uint8)
    cons[5, 5] = 0
    out, vm = _fused.warp_store(img, grid.astype(np.float32), 4, cons, valid)
    mx, my, inside = align.warp_maps(align.decode_flow(grid, H, W, 4))
    ref = np.stack(align.warp_planes(list(img), mx, my))
    vref = cv2.bitwise_and(cons, inside)
    vref[align.warp_planes([valid.astype(np.float32)], mx, my)[0] <= 0.999] = 0
    grad = max(np.abs(np.diff(img, axis=a)).max() for a in (1, 2))
    assert np.abs(out.astype(np.float32) - ref).max() < grad / 32 + 1e-3
    # a pixel whose bilinear footprint just touches an invalid one may round either way
    assert (vm != vref).sum() <= 4
    # the inconsistent flow pixel, the invalid patch and the top rows (sources above the image)
    assert vm[5, 5] == 0 and (vref == 0).sum() > W and (vm == 255).mean() > 0.8


@needs_kernels
def test_store_narrowing_clips_and_rounds_like_numpy():
    vals = np.array([0.0, 1e-8, 6.1e-5, 0.1, 1.0 / 3, 2048.5, 65504.0, 70000.0, -1e6], np.float32)
    img = np.tile(vals, (3, 1, 1))
    out, vm = _fused.warp_store(img, None, 1, None, None)
    want = np.clip(img, -65504, 65504).astype(np.float16)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    assert (vm == 255).all()
