"""HDR bracket merge: exactness on noiseless linear data, clipped-pixel recovery, the noise the
ML estimator predicts, and equality with colour-hdri's merge under the same weighting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lightstage.hdr import colour_hdri_stack, merge_bracket


def _bracket(rad, times, white=1.0):
    vals = [rad * t for t in times]
    sats = [v >= white for v in vals]
    return [np.minimum(v, white).astype(np.float32) for v in vals], sats


def test_exact_on_noiseless_linear_data_and_clipped_pixels_recovered():
    rng = np.random.default_rng(0)
    rad = np.exp(rng.normal(2, 1.5, (64, 80))).astype(np.float32)  # spans ~5 decades
    times = [1 / 30, 1 / 240]
    vals, sats = _bracket(rad, times)
    r = merge_bracket(vals, times, sats)
    clipped_long = sats[0] & ~sats[1]
    assert clipped_long.sum() > 100  # the test exercises recovery
    ok = ~sats[1]
    np.testing.assert_allclose(r.radiance[ok], rad[ok], rtol=2e-6)
    assert r.valid[ok].all() and not r.valid[sats[1]].any()
    # saturated in every exposure: the shortest exposure's lower bound, flagged
    np.testing.assert_allclose(r.radiance[sats[1]], 1 / times[1], rtol=1e-6)


def test_rgb_input_and_threshold_saturation():
    rad = np.full((4, 5, 3), 50.0, np.float32)
    rad[0, 0] = [10, 500, 20]
    times = [0.01, 0.001]
    vals = [np.minimum(rad * t, 1) for t in times]
    r = merge_bracket(vals, times)
    np.testing.assert_allclose(r.radiance, rad, rtol=1e-6)


def test_noise_matches_ml_prediction():
    # Poisson counts: the merged estimate's variance is x / sum_k t_k (unsaturated)
    rng = np.random.default_rng(1)
    x = 2000.0
    times = np.array([1 / 30, 1 / 120])
    n = 200_000
    counts = [rng.poisson(x * t, n).astype(np.float32) for t in times]
    r = merge_bracket(counts, times.tolist(), saturation=np.inf)
    assert abs(r.radiance.mean() / x - 1) < 2e-3
    assert abs(r.radiance.var() / (x / times.sum()) - 1) < 0.02


def test_input_errors():
    with pytest.raises(ValueError, match="empty"):
        merge_bracket([], [])
    with pytest.raises(ValueError, match="exposures"):
        merge_bracket([np.zeros((2, 2))], [1, 2])
    with pytest.raises(ValueError, match="shape"):
        merge_bracket([np.zeros((2, 2)), np.zeros((2, 3))], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        merge_bracket([np.zeros((2, 2))], [0])


def test_debevec_weighting_equals_colour_hdri():
    ch = pytest.importorskip("colour_hdri")
    from colour_hdri.exposure import average_luminance

    rng = np.random.default_rng(2)
    rad = np.exp(rng.normal(0, 1.5, (48, 64, 3))) * 0.05
    times = [1 / 240, 1 / 60, 1 / 15]  # colour-hdri's order: shortest first
    imgs = [np.clip(rad * t * 30, 0, 1) for t in times]
    stack = colour_hdri_stack(imgs, times)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ch.image_stack_to_HDRI(stack, ch.weighting_function_Debevec1997)
    L = [1 / average_luminance(8.0, t, 100) for t in times]
    ours = merge_bracket([im.astype(np.float32) for im in imgs], L, weighting="debevec")
    np.testing.assert_allclose(ours.radiance, ref, rtol=1e-5)
