"""Display transforms: sRGB transfer function, tone-mapping operators, explicit exposure.

Truth: IEC 61966-2-1 constants, the operators' analytic properties (Reinhard(1) = 1/2, Hable's
curve reaching 1 at its white point, monotonicity, black stays black).
"""

from __future__ import annotations

import numpy as np
import pytest

from lightstage.imageio import linear_to_srgb, srgb_to_linear
from lightstage.tonemap import OPERATORS, auto_exposure, luminance, to_display, tonemap


def test_srgb_transfer_function():
    # the piecewise curve's breakpoints and a mid-grey: 18 % linear is 46.1 % encoded
    np.testing.assert_allclose(linear_to_srgb(np.float32(0.0031308)), 0.04045, atol=2e-6)
    np.testing.assert_allclose(linear_to_srgb(np.float32(0.18)), 0.46135, atol=1e-4)
    np.testing.assert_allclose(linear_to_srgb(np.float32(1.0)), 1.0, atol=1e-6)
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(x)), x, atol=2e-6)


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_operators_are_monotone_bounded_and_keep_black(op):
    x = np.geomspace(1e-4, 1e4, 400, dtype=np.float32)[:, None].repeat(3, 1)
    y = tonemap(x, op)
    assert (y >= 0).all() and (y <= 1).all()
    assert (np.diff(y[:, 0]) >= -1e-7).all()
    assert np.all(tonemap(np.zeros((1, 3), np.float32), op) < 1e-3)


def test_operator_reference_values():
    one = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(tonemap(one, "reinhard"), 0.5, rtol=1e-6)
    np.testing.assert_allclose(tonemap(one * 5.6, "filmic"), 1.0, rtol=1e-5)  # 2 x 5.6 = white 11.2
    np.testing.assert_allclose(tonemap(one * 0.5, "linear", exposure_ev=1), 1.0)
    # exposure is stops: +1 EV on x equals x doubled, for every operator
    x = np.random.default_rng(0).random((50, 3)).astype(np.float32) * 4
    for op in OPERATORS:
        np.testing.assert_allclose(tonemap(x, op, 1.0), tonemap(2 * x, op), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown tone-mapping operator"):
        tonemap(x, "magic")


def test_to_display_uint8():
    img = np.full((2, 2, 3), 0.18, np.float32)
    d = to_display(img, "linear")
    assert d.dtype == np.uint8 and (d == 118).all()  # round(255 * 0.46135)


def test_auto_exposure_reports_the_ev_that_maps_the_median_to_key():
    rng = np.random.default_rng(1)
    img = (rng.random((20, 30, 3)) * 7).astype(np.float32)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:25] = True
    ev = auto_exposure(img, mask)
    med = np.median(luminance(img)[mask])
    np.testing.assert_allclose(med * 2 ** ev, 0.18, rtol=1e-5)
    assert auto_exposure(np.zeros((4, 4, 3), np.float32)) == 0.0
