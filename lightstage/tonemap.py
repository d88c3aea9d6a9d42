"""Display transforms: exposure, named tone-mapping operators and sRGB encoding.

Only for showing linear HDR radiance to a person (PNG, GIF, MP4): nothing here feeds back into
data. There is no automatic per-image normalisation; :func:`auto_exposure` *computes* an
exposure (returned so the caller can report it) and the caller decides to use it.

Operators (input: linear radiance already multiplied by ``2**EV``)

``linear``
    clip to [0, 1].
``reinhard``
    ``x / (1 + x)`` per channel (Reinhard et al. 2002, eq. 3).
``reinhard-lum``
    Reinhard on luminance with colour ratios kept (hue preserving).
``aces``
    Narkowicz's fit of the ACES RRT+ODT curve (K. Narkowicz, "ACES Filmic Tone Mapping
    Curve", 2015): ``x(2.51x + 0.03) / (x(2.43x + 0.59) + 0.14)`` with the 0.6 pre-scale.
``filmic``
    Hable's "Uncharted 2" curve (J. Hable, "Filmic Tonemapping Operators", 2010), white
    point 11.2, exposure bias 2.

References
----------
Reinhard, E., Stark, M., Shirley, P., Ferwerda, J. (2002). Photographic tone reproduction for
digital images. SIGGRAPH.
IEC 61966-2-1:1999, sRGB.
"""

from __future__ import annotations

import numpy as np

from .imageio import linear_to_srgb

__all__ = ["OPERATORS", "tonemap", "to_display", "auto_exposure", "luminance"]

_REC709_Y = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def luminance(rgb: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rec.709 relative luminance of linear RGB along ``axis``."""
    return np.tensordot(np.moveaxis(np.asarray(rgb, np.float32), axis, -1), _REC709_Y, axes=1)


def _linear(x):
    return np.clip(x, 0.0, 1.0)


def _reinhard(x):
    x = np.maximum(x, 0.0)
    return x / (1.0 + x)


def _reinhard_lum(x):
    x = np.maximum(x, 0.0)
    y = luminance(x)[..., None]
    return np.clip(x / (1.0 + y), 0.0, 1.0)


def _aces(x):
    x = np.maximum(x, 0.0) * 0.6
    return np.clip(x * (2.51 * x + 0.03) / (x * (2.43 * x + 0.59) + 0.14), 0.0, 1.0)


def _hable_curve(x):
    a, b, c, d, e, f = 0.15, 0.50, 0.10, 0.20, 0.02, 0.30
    return (x * (a * x + c * b) + d * e) / (x * (a * x + b) + d * f) - e / f


def _filmic(x):
    x = np.maximum(x, 0.0)
    return np.clip(_hable_curve(2.0 * x) / _hable_curve(np.float32(11.2)), 0.0, 1.0)


#: name -> operator on linear RGB (..., 3) returning display-linear values in [0, 1]
OPERATORS = {
    "linear": _linear,
    "reinhard": _reinhard,
    "reinhard-lum": _reinhard_lum,
    "aces": _aces,
    "filmic": _filmic,
}


def tonemap(rgb: np.ndarray, operator: str = "aces", exposure_ev: float = 0.0) -> np.ndarray:
    """Linear ``(..., 3)`` radiance -> display-linear [0, 1] float32 (before sRGB encoding)."""
    try:
        op = OPERATORS[operator]
    except KeyError:
        raise ValueError(f"unknown tone-mapping operator {operator!r}; choose one of "
                         f"{sorted(OPERATORS)}") from None
    x = np.asarray(rgb, dtype=np.float32) * np.float32(2.0 ** exposure_ev)
    return op(x).astype(np.float32)


def to_display(rgb: np.ndarray, operator: str = "aces", exposure_ev: float = 0.0) -> np.ndarray:
    """Linear ``(H, W, 3)`` radiance -> ``(H, W, 3)`` uint8 sRGB for PNG/GIF/MP4."""
    d = linear_to_srgb(tonemap(rgb, operator, exposure_ev))
    return np.round(d * 255.0).astype(np.uint8)


def auto_exposure(rgb: np.ndarray, mask: np.ndarray | None = None, key: float = 0.18,
                  percentile: float = 50.0) -> float:
    """The EV that maps the ``percentile`` luminance (within ``mask``) to ``key``.

    Returned, not applied: callers report it (no silent normalisation). Returns 0.0 when the
    selected pixels are all black.
    """
    y = luminance(rgb)
    if mask is not None:
        y = y[np.asarray(mask, bool)]
    y = y[np.isfinite(y) & (y > 0)]
    if y.size == 0:
        return 0.0
    return float(np.log2(key / np.percentile(y, percentile)))
