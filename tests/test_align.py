"""Motion compensation: flow accuracy on a real portrait under a known smooth warp, the
forward-backward mask, time interpolation and warping against analytic truth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lightstage import align


def _portrait(real_data):
    img = cv2.imread(str(real_data / "portraits" / "astronaut_eileen_collins.png"), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
    lin = (img[..., ::-1].astype(np.float32) / 255) ** 2.2  # sRGB-ish -> linear
    return np.ascontiguousarray(np.moveaxis(lin, -1, 0))


def _true_flow(H, W, shift, angle_deg):
    """A small rigid motion about the image centre: reference pixel x -> R (x - c) + c + shift."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    a = np.radians(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    p = np.stack([x - c[0], y - c[1]], -1) @ R.T + c + shift
    return np.stack([p[..., 0] - x, p[..., 1] - y], -1).astype(np.float32)


def test_flow_recovers_known_motion_on_real_portrait(real_data):
    ref = _portrait(real_data)
    H, W = ref.shape[1:]
    F = _true_flow(H, W, np.array([1.7, -0.8]), 1.5)
    # the "other" frame shows at x + F(x) what the reference shows at x: build it by inverse warp
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    # inverse of x -> R(x - c) + c + s  is  u -> R^T(u - c - s) + c
    a = np.radians(1.5)
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q = (np.stack([x, y], -1) - c - np.array([1.7, -0.8])) @ R + c
    other = np.stack([cv2.remap(ref[k], q[..., 0].astype(np.float32), q[..., 1].astype(np.float32),
                                cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT) for k in range(3)])
    white = align.tone_white(align.luminance(ref))
    a8 = align.tone_u8(align.luminance(ref), white)
    b8 = align.tone_u8(align.luminance(other), white)
    est = align.compute_flow(a8, b8)
    err = np.hypot(*(est - F).transpose(2, 0, 1))[16:-16, 16:-16]
    assert np.median(err) < 0.25, np.median(err)
    # warping the other frame back with the estimated flow reproduces the reference
    back, inside = align.warp(other, est)
    core = (slice(None), slice(16, -16), slice(16, -16))
    assert np.median(np.abs(back - ref)[core]) < 0.01
    # forward-backward consistent almost everywhere for a rigid motion
    bwd = align.compute_flow(b8, a8)
    cons = align.fb_consistency(est, bwd)
    assert cons[16:-16, 16:-16].mean() > 0.9


def test_fb_consistency_flags_inconsistent_flow():
    H, W = 20, 30
    fwd = np.zeros((H, W, 2), np.float32)
    fwd[..., 0] = 2.0
    bwd = -fwd.copy()
    assert align.fb_consistency(fwd, bwd)[:, :-2].all()
    assert not align.fb_consistency(fwd, bwd)[:, -2:].any()  # leaves the image
    bwd[5:10, :, 0] = 3.0
    c = align.fb_consistency(fwd, bwd)
    assert not c[5:10, :-2].any() and c[:5, :-2].all()


def test_warp_integer_shift_and_bracketing():
    rng = np.random.default_rng(0)
    img = rng.random((2, 12, 15)).astype(np.float32)
    flow = np.zeros((12, 15, 2), np.float32)
    flow[..., 0], flow[..., 1] = 2, 1
    out, inside = align.warp(img, flow)
    np.testing.assert_allclose(out[:, :-1, :-2], img[:, 1:, 2:], atol=1e-6)
    assert inside[:-1, :-2].all() and not inside[-1].any() and not inside[:, -2:].any()
    tf = [1, 10, 19]
    assert align.bracketing(4, tf) == (0, 1, pytest.approx(1 / 3))
    assert align.bracketing(0, tf) == (0, 0, 0.0)
    assert align.bracketing(25, tf) == (2, 2, 0.0)
    assert align.bracketing(10, tf)[0:2] in ((0, 1), (1, 1)) and align.bracketing(10, tf)[2] in (0.0, 1.0)
    fa, fb = np.zeros((2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32)
    np.testing.assert_allclose(align.interpolate_flow(fa, fb, 0.25), 0.25)
    assert align.reference_index(5) == 2 and align.reference_index(4) == 1
