"""Exposure-bracket merge of linear images into one HDR radiance image.

Inputs are *linear* normalised values ``z_k`` in [0, 1] (0 = black, 1 = white level; see
:mod:`lightstage.raw`) with relative exposures ``e_k`` (exposure time x gain). Every unsaturated
``z_k / e_k`` estimates the same radiance, so on noiseless linear data any positive weighting
is exact; the weighting only decides how noise is averaged and how clipping is avoided.

Weightings
----------
``"snr"`` (default, for raw data)
    ``w_k = e_k`` on unsaturated samples, 0 on saturated ones, so
    ``x = sum_k z_k [unsat_k] / sum_k e_k [unsat_k]``: the maximum-likelihood estimate for
    Poisson (shot-noise limited) counts. Samples clipped in the long exposure are recovered from
    the short ones; a sample saturated in every exposure keeps the shortest exposure's lower
    bound and is flagged invalid.
``"debevec"``
    Debevec & Malik's hat ``w(z)`` on [0.01, 0.99], normalised by its image maximum, clipped to
    [eps, 1], with the first image's bright and the last image's dark samples at full weight:
    the weighting of ``colour_hdri.image_stack_to_HDRI`` reproduced to float32 precision
    (used to compare speed and results; stack ordered shortest exposure first, as there).

The kernel is tiled over rows so the temporaries live in cache: it reads each input once and
writes the output once.

References
----------
Debevec, P., Malik, J. (1997). Recovering high dynamic range radiance maps from photographs.
SIGGRAPH.
Granados, M. et al. (2010). Optimal HDR reconstruction with linear digital cameras. CVPR
(exposure-proportional weights for shot-noise limited sensors).
Banterle, F. et al. (2011). Advanced High Dynamic Range Imaging, ch. 2 (stack merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MergeResult", "merge_bracket", "merge_raw_snr", "debevec_weight", "WEIGHTINGS",
           "colour_hdri_stack"]

WEIGHTINGS = ("snr", "debevec")
_EPS = float(np.finfo(np.float64).eps)  # colour-science's EPSILON (float64 machine eps)


@dataclass
class MergeResult:
    """``radiance``: float32, the inputs' shape, in units of z / exposure; ``valid``: bool,
    False where no exposure measured the sample (saturated in all, or outside the hat)."""

    radiance: np.ndarray
    valid: np.ndarray


def debevec_weight(z: np.ndarray, lo: float = 0.01, hi: float = 0.99) -> np.ndarray:
    """Debevec (1997) hat on [lo, hi], *not* normalised (0 outside, peak (hi-lo)/2)."""
    mid = 0.5 * (lo + hi)
    w = np.where(z <= mid, z - lo, hi - z)
    return np.maximum(w, 0, out=w)


def _rows(H: int, row_bytes: int, budget: int = 1 << 20) -> int:
    return int(max(1, min(H, budget // max(row_bytes, 1))))


def merge_bracket(
    values: Sequence[np.ndarray],
    exposures: Sequence[float],
    saturated: Sequence[np.ndarray] | None = None,
    *,
    weighting: str = "snr",
    saturation: float = 1.0,
    with_valid: bool = True,
) -> MergeResult:
    """Merge a bracket of linear images.

    Parameters
    ----------
    values : sequence of K arrays, each ``(H, W)`` or ``(H, W, C)``, linear normalised values.
    exposures : K relative exposures (exposure time x gain, any common unit).
    saturated : optional K bool arrays ``(H, W)`` (or the values' shape): clipped samples. When
        omitted, samples ``>= saturation`` count as clipped (``"snr"`` only).
    weighting : ``"snr"`` or ``"debevec"`` (see the module docstring).
    saturation : threshold used when ``saturated`` is not given.
    with_valid : compute ``valid`` (``"debevec"`` only; without it ``valid`` is all True).

    Returns
    -------
    MergeResult
    """
    K = len(values)
    if K == 0:
        raise ValueError("merge_bracket: empty bracket")
    if len(exposures) != K:
        raise ValueError(f"merge_bracket: {K} images but {len(exposures)} exposures")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"merge_bracket: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    shape = values[0].shape
    for k, v in enumerate(values):
        if v.shape != shape:
            raise ValueError(f"merge_bracket: image {k} has shape {v.shape}, image 0 has {shape}")
    e = [float(x) for x in exposures]
    if min(e) <= 0:
        raise ValueError(f"merge_bracket: exposures must be positive, got {e}")
    if weighting == "snr":
        return _merge_snr(values, e, saturated, saturation)
    return _merge_debevec(values, e, with_valid)


def merge_raw_snr(
    dns: Sequence[np.ndarray],
    blacks: Sequence[float | np.ndarray],
    whites: Sequence[float],
    saturated: Sequence[np.ndarray],
    exposures: Sequence[float],
) -> MergeResult:
    """The ``"snr"`` merge of :func:`merge_bracket` straight from raw DN mosaics.

    Equal (to float32 rounding) to ``merge_bracket([(dn - black) / (white - black) ...],
    exposures, saturated)``, but normalisation and merge are fused into a few OpenCV passes
    per exposure (``addWeighted`` to float, masked ``accumulate``, masked ``add``), which is
    what makes the per-image cost of an ingest small next to decoding and writing.

    Parameters
    ----------
    dns : K ``(H, W)`` integer raw mosaics (DN).
    blacks : K black levels, scalar or ``(H, W)`` per photosite.
    whites : K white levels (DN).
    saturated : K ``(H, W)`` bool masks of clipped photosites.
    exposures : K relative exposures (exposure time x gain).
    """
    import cv2

    K = len(dns)
    if K == 0:
        raise ValueError("merge_raw_snr: empty bracket")
    if not (len(blacks) == len(whites) == len(saturated) == len(exposures) == K):
        raise ValueError("merge_raw_snr: dns, blacks, whites, saturated and exposures differ in length")
    shape = dns[0].shape
    if len(shape) != 2:
        raise ValueError(f"merge_raw_snr: mosaics must be (H, W), got {shape}")
    e = [float(x) for x in exposures]
    if min(e) <= 0:
        raise ValueError(f"merge_raw_snr: exposures must be positive, got {e}")
    num = np.zeros(shape, np.float32)
    den = np.zeros(shape, np.float32)
    values = []
    for k in range(K):
        dn = dns[k]
        if dn.shape != shape:
            raise ValueError(f"merge_raw_snr: image {k} has shape {dn.shape}, image 0 has {shape}")
        b = blacks[k]
        if np.ndim(b) == 0:
            # (dn - b) / (w - b) as one fused pass: dn * a + (-b * a)
            a = 1.0 / (float(whites[k]) - float(b))
            v = cv2.addWeighted(dn, a, dn, 0.0, -float(b) * a, dtype=cv2.CV_32F)
        else:
            bm = np.asarray(b, np.float32)
            v = (dn.astype(np.float32) - bm) / (np.float32(whites[k]) - bm)
        ok = np.logical_not(saturated[k]).view(np.uint8)
        cv2.accumulate(v, num, mask=ok)
        cv2.add(den, e[k], dst=den, mask=ok)
        values.append(v)
    out = cv2.divide(num, den)  # OpenCV gives 0 where den == 0: fixed below
    valid = den > 0
    if not valid.all():
        # nothing unsaturated: keep the shortest exposure's lower bound, flag it
        s = int(np.argmin(e))
        bad = ~valid
        out[bad] = values[s][bad] / np.float32(e[s])
    return MergeResult(out, valid)


def _bcast(mask: np.ndarray | None, tile_shape, sl):
    if mask is None:
        return None
    m = mask[sl]
    if m.ndim < len(tile_shape):
        m = m[..., None]
    return m


def _merge_snr(values, e, saturated, saturation) -> MergeResult:
    shape = values[0].shape
    H = shape[0]
    out = np.empty(shape, np.float32)
    valid = np.empty(shape[:2], bool)
    row_bytes = int(np.prod(shape[1:])) * 4
    step = _rows(H, row_bytes)
    shortest = int(np.argmin(e))
    ef = [np.float32(x) for x in e]
    for y0 in range(0, H, step):
        sl = slice(y0, min(H, y0 + step))
        num = np.zeros((sl.stop - y0,) + shape[1:], np.float32)
        den = np.zeros_like(num)
        for k, v in enumerate(values):
            vk = np.asarray(v[sl], np.float32)
            if saturated is not None:
                ok = ~_bcast(saturated[k], num.shape, sl)
            else:
                ok = vk < saturation
            ok = np.broadcast_to(ok, num.shape)
            num += np.where(ok, vk, np.float32(0))
            den += ok * ef[k]
        anyok = den > 0
        # nothing unsaturated: keep the shortest exposure's lower bound, flag it
        fallback = np.asarray(values[shortest][sl], np.float32) / ef[shortest]
        np.divide(num, den, out=num, where=anyok)
        out[sl] = np.where(anyok, num, fallback)
        valid[sl] = anyok if anyok.ndim == 2 else anyok.all(axis=-1)
    return MergeResult(out, valid)


def _merge_debevec(values, e, with_valid: bool = True) -> MergeResult:
    lo, hi = 0.01, 0.99
    mid = np.float32(0.5 * (lo + hi))
    shape = values[0].shape
    H = shape[0]
    K = len(values)
    eps = np.float32(_EPS)
    # colour-hdri normalises each image's hat by that image's maximum weight: one reduction
    # pass per image (max of the hat = half-width minus the distance of the closest sample
    # to the hat's centre, after the same [eps, 1] clip)
    row_bytes = int(np.prod(shape[1:])) * 4
    step = _rows(H, row_bytes)
    wmax = []
    for v in values:
        dmin = np.inf
        t = np.empty((step,) + shape[1:], np.float32)
        for y0 in range(0, H, step):
            n = min(H, y0 + step) - y0
            # the [eps, 1] clip cannot move a sample closer to the centre 0.5: skip it
            np.subtract(v[y0:y0 + n], mid, out=t[:n])
            dmin = min(dmin, float(np.abs(t[:n], out=t[:n]).min()))
        if dmin > 0.5 - _EPS:  # every sample outside [eps, 1]: clip, as colour-hdri does
            dmin = float(np.abs(np.clip(np.asarray(v, np.float32), eps, 1) - mid).min())
        wmax.append(np.float32(max((hi - lo) / 2 - dmin, 0.0)))
    inv_e = [np.float32(1.0 / x) for x in e]
    out = np.empty(shape, np.float32)
    valid = np.zeros(shape[:2], bool) if with_valid else np.ones(shape[:2], bool)
    for y0 in range(0, H, step):
        sl = slice(y0, min(H, y0 + step))
        tshape = (sl.stop - y0,) + shape[1:]
        num = np.zeros(tshape, np.float32)
        den = np.zeros(tshape, np.float32)
        vis = np.zeros(tshape, bool)
        z = np.empty(tshape, np.float32)
        w = np.empty(tshape, np.float32)
        t = np.empty(tshape, np.float32)
        b = np.empty(tshape, bool)
        for k, v in enumerate(values):
            np.clip(v[sl], eps, 1, out=z)
            # hat: z - lo below the centre, hi - z above it, <= 0 outside [lo, hi]
            np.subtract(z, np.float32(lo), out=w)
            np.subtract(np.float32(hi), z, out=t)
            np.minimum(w, t, out=w)
            if with_valid:
                np.greater(w, 0, out=b)
                vis |= b
            if wmax[k] > 0:
                w *= np.float32(1.0) / wmax[k]
            np.clip(w, eps, 1, out=w)  # also zeroes (to eps) the hat outside [lo, hi]
            if k == 0:
                np.greater_equal(z, 0.5, out=b)
                np.copyto(w, 1, where=b)
            if k == K - 1:
                np.less_equal(z, 0.5, out=b)
                np.copyto(w, 1, where=b)
            den += w
            np.multiply(z, inv_e[k], out=z)
            w *= z
            num += w
        np.divide(num, den, out=out[sl])
        if with_valid:
            valid[sl] = vis if vis.ndim == 2 else vis.all(axis=-1)
    return MergeResult(out, valid)


def colour_hdri_stack(images: Sequence[np.ndarray], exposure_times: Sequence[float],
                      f_number: float = 8.0, iso: float = 100.0):
    """A ``colour_hdri`` ``ImageStack`` of in-memory images (the reference our merge is checked
    and benchmarked against; ``colour_hdri.image_stack_to_HDRI`` consumes it, so build one per
    call). Requires the optional ``colour-hdri`` package.

    Parameters
    ----------
    images : ``(H, W, 3)`` images in [0, 1], colour-hdri's order (shortest exposure first).
    exposure_times : seconds, one per image.
    """
    from colour_hdri.utilities.image import Image, ImageStack, Metadata

    stack = ImageStack()
    for im, t in zip(images, exposure_times):
        i = Image()
        i.data = np.array(im, copy=True)
        i.metadata = Metadata(f_number=f_number, exposure_time=t, iso=iso, black_level=None,
                              white_level=None, white_balance_multipliers=None)
        i.path = "mem"
        stack.append(i)
    return stack
