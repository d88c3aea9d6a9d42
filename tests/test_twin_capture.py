"""The twin's sensor model and capture simulation against independent truth.

Sensor: the statistics of the simulated raw against the analytic shot + read noise model; the
ground-truth calibration applied to a noise-free raw must give back the radiance. Capture:
every DNG LibRaw reads equals the sensor model of the scene's radiance; same seed -> same bytes
for any worker count; the folder matches lightstage.manifest; bad input writes nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lightstage.rig import builtin_rig
from lightstage.twin.sensor import (
    cfa_channels,
    dn_scale,
    expected_dn,
    light_irradiance,
    noise_rng,
    simulate_raw,
    truth_calibration,
    vignetting_gain,
)


def _camera(pattern="GRBG", vignetting=0.25, **sensor):
    cam = copy.deepcopy(builtin_rig("tiny").cameras[0])
    cam.sensor.cfa_pattern = pattern
    cam.sensor.vignetting = vignetting
    for k, v in sensor.items():
        setattr(cam.sensor, k, v)
    return cam


def _linearise(raw, cam, exposure, cal):
    """Ingest's documented inverse, written out independently: (DN - black)/(white - black)
    /(t g), divide by the calibfile vignetting polynomial, demosaic by nearest same-colour
    sample, colour matrix."""
    s = cam.sensor
    c = cal.cameras[cam.name]
    H, W = raw.shape
    x = (raw.astype(np.float64) - s.black_level) / (s.white_level - s.black_level) / (exposure * s.gain)
    K = c.K
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = ((xx - K[0, 2]) ** 2 + (yy - K[1, 2]) ** 2) / ((W**2 + H**2) / 4)
    x = x / (1 + c.vignetting[0] * r2 + c.vignetting[1] * r2**2)
    return x, c.colour_matrix


def test_cfa_layout_matches_pattern():
    ch = cfa_channels("GBRG", 5, 7)
    assert ch.shape == (5, 7)
    assert ch[0, 0] == 1 and ch[0, 1] == 2 and ch[1, 0] == 0 and ch[1, 1] == 1
    assert ch[4, 6] == ch[0, 0] and ch[3, 5] == ch[1, 1]


def test_noise_free_raw_inverts_to_radiance_with_truth_calibration():
    """Uniform grey-ish radiance: per CFA colour, linearising the noise-free raw with the truth
    calibration's inverse gives M @ rgb / full_scale, and colour_matrix maps it back to rgb."""
    rig = builtin_rig("tiny")
    cam = rig.cameras[1]
    cal = truth_calibration(rig)
    rgb = np.array([0.3, 0.5, 0.2])
    H, W = cam.resolution
    rad = np.broadcast_to(rgb.astype(np.float32), (H, W, 3)).copy()
    exposure = 1 / 240
    raw = simulate_raw(rad, cam, exposure, noise=False)
    assert raw.dtype == np.uint16
    lin, colour_matrix = _linearise(raw, cam, exposure, cal)
    ch = cfa_channels(cam.sensor.cfa_pattern, H, W)
    cam_rgb = np.array([np.median(lin[ch == k]) for k in range(3)])
    np.testing.assert_allclose(colour_matrix @ cam_rgb, rgb, rtol=2e-3)
    # rounding is the only error: every photosite within half a DN of the analytic value
    M = np.asarray(cam.sensor.colour_response)
    yy, xx = np.mgrid[0:H, 0:W]
    K = cam.K_array
    r2 = ((xx - K[0, 2]) ** 2 + (yy - K[1, 2]) ** 2) / ((W**2 + H**2) / 4)
    analytic = (M @ rgb)[ch] * (1 - cam.sensor.vignetting * r2) * dn_scale(cam, exposure)
    assert np.abs(raw.astype(np.float64) - cam.sensor.black_level - analytic).max() <= 0.5 + 1e-3
    # the truth calibration's lights are the irradiance at the centre
    l0 = rig.lights[0]
    p = np.asarray(l0.position)
    np.testing.assert_allclose(cal.lights[0].rgb, np.asarray(l0.colour) * l0.intensity / (p @ p))
    np.testing.assert_allclose(light_irradiance(rig, [0])[0], cal.lights[0].rgb)


def test_noise_statistics_match_shot_plus_read_model():
    cam = _camera("RGGB", vignetting=0.0, electrons_per_dn=3.0, read_noise_dn=2.5, gain=2.0)
    H, W = cam.resolution
    rad = np.full((H, W, 3), 0.2, np.float32)
    exposure = 1 / 120
    mu = expected_dn(rad, cam, exposure)
    n = 24  # repeated exposures of the same flat field, each with its own generator
    raws = np.stack([simulate_raw(rad, cam, exposure, noise_rng(7, 0, 0, f, 0)) for f in range(n)])
    resid = raws.astype(np.float64) - cam.sensor.black_level - mu
    ch = cfa_channels("RGGB", H, W)
    for k in range(3):
        m = float(np.mean(mu[ch == k]))
        assert 20 < m < cam.sensor.white_level - 200  # a flat, unclipped level
        pred = m / cam.sensor.electrons_per_dn + cam.sensor.read_noise_dn**2 + 1 / 12
        var = resid[:, ch == k].var()
        nsamp = resid[:, ch == k].size
        # sample variance of ~1e5 values: relative standard error sqrt(2/n) < 0.5 %
        assert var == pytest.approx(pred, rel=6 * np.sqrt(2 / nsamp) + 0.01)
        assert abs(resid[:, ch == k].mean()) < 5 * np.sqrt(pred / nsamp)  # unbiased
    # the generator is keyed, not shared: same keys -> same image, other keys -> another
    a = simulate_raw(rad, cam, exposure, noise_rng(7, 0, 0, 3, 0))
    assert np.array_equal(a, raws[3])
    assert not np.array_equal(a, raws[4])
    assert np.array_equal(noise_rng(1, "s000", "cam01").integers(0, 1 << 30, 4),
                          noise_rng(1, "s000", "cam01").integers(0, 1 << 30, 4))


def test_clipping_at_white_and_black():
    cam = _camera("BGGR")
    H, W = cam.resolution
    rad = np.zeros((H, W, 3), np.float32)
    rad[: H // 2] = 50.0  # far above full scale
    raw = simulate_raw(rad, cam, 1 / 30, noise_rng(0, 1))
    assert raw[: H // 2].max() == cam.sensor.white_level
    assert np.all(raw[: H // 2] == cam.sensor.white_level)
    dark = raw[H // 2:].astype(np.float64)
    # a dark region is black level plus read noise (a few DN), never clipped to zero here
    assert abs(dark.mean() - cam.sensor.black_level) < 0.2
    assert dark.std() == pytest.approx(np.sqrt(cam.sensor.read_noise_dn**2 + 1 / 12), rel=0.1)
    clean = simulate_raw(rad, cam, 1 / 30, noise=False)
    assert np.all(clean[H // 2:] == cam.sensor.black_level)


def test_vignetting_gain_is_radial_about_principal_point():
    cam = _camera(vignetting=0.3)
    g = vignetting_gain(cam)
    H, W = cam.resolution
    K = cam.K_array
    cy, cx = int(round(K[1, 2])), int(round(K[0, 2]))
    assert g[cy, cx] == pytest.approx(1.0, abs=1e-3)
    # a corner at distance d has gain 1 - v d^2 / half_diag^2
    d2 = (0 - K[0, 2]) ** 2 + (0 - K[1, 2]) ** 2
    assert g[0, 0] == pytest.approx(1 - 0.3 * d2 / ((W * W + H * H) / 4), rel=1e-5)
