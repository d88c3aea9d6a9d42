"""Vignetting from a flat field: the radial gain ``1 + a1 r^2 + a2 r^4``.

``r`` is the distance from the principal point over the image's half-diagonal (the
definition of :mod:`lightstage.calibfile`); raw images are *divided* by the gain.

References
----------
Goldman, D. B. (2010). Vignette and exposure calibration and compensation. IEEE TPAMI 32(12).
"""

from __future__ import annotations

import numpy as np

__all__ = ["radius_squared", "vignetting_gain", "fit_vignetting"]


def radius_squared(shape: tuple[int, int], principal_point) -> np.ndarray:
    """(H, W) squared normalised radius r^2 about ``principal_point`` (cx, cy)."""
    H, W = shape
    cx, cy = principal_point
    y2 = ((np.arange(H) - cy) ** 2)[:, None]
    x2 = ((np.arange(W) - cx) ** 2)[None, :]
    return (x2 + y2) / ((W * W + H * H) / 4.0)


def vignetting_gain(shape, principal_point, coeffs) -> np.ndarray:
    """(H, W) float32 gain ``1 + a1 r^2 + a2 r^4``."""
    r2 = radius_squared(shape, principal_point)
    a1, a2 = coeffs
    return (1 + a1 * r2 + a2 * r2 * r2).astype(np.float32)


def fit_vignetting(flat: np.ndarray, principal_point=None, saturated: np.ndarray | None = None,
                   step: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Fit the radial gain to a flat-field image (H, W, 3) of a uniform source.

    Solves ``flat_c(x) = k_c (1 + a1 r^2 + a2 r^4)`` by linear least squares on the summed
    channels (one shape for all channels: the lens, not the filter, vignettes), then ``k_c``
    per channel as the mean of ``flat_c / gain``.

    Returns
    -------
    coeffs : (2,) [a1, a2]
    k : (3,) the flat field's camera RGB at the principal point (vignetting removed)
    """
    flat = np.asarray(flat, np.float64)
    H, W = flat.shape[:2]
    if principal_point is None:
        principal_point = ((W - 1) / 2, (H - 1) / 2)
    r2 = radius_squared((H, W), principal_point)
    ok = np.isfinite(flat).all(2)
    if saturated is not None:
        ok &= ~saturated
    sl = (slice(None, None, step), slice(None, None, step))
    s = flat.sum(2)[sl][ok[sl]]
    rr = r2[sl][ok[sl]]
    if s.size < 100:
        raise ValueError(f"flat field has only {s.size} usable pixels")
    A = np.stack([np.ones_like(rr), rr, rr * rr], axis=1)
    c, *_ = np.linalg.lstsq(A, s, rcond=None)
    if c[0] <= 0:
        raise ValueError("flat field is dark or negative: not a flat-field exposure")
    coeffs = c[1:] / c[0]
    g = 1 + coeffs[0] * r2 + coeffs[1] * r2 * r2
    k = np.array([np.mean((flat[..., i] / g)[ok]) for i in range(3)])
    return coeffs, k
