"""Fused, cache-blocked develop and warp of one ingested image (compiled with numba).

Why: the reference path of :mod:`lightstage.ingest` (OpenCV and numpy calls: normalise and
merge each exposure, a masked product and a ``filter2D`` per colour, de-vignette, nine
``scaleAdd`` for the colour matrix, upsample the flow, two remap maps, three ``remap``, the
validity, clip and convert to float16) makes about thirty passes over full-size float32 arrays.
On a 2-core machine two workers then share one memory bus and one L3 cache, and a 768 x 768
ingest scaled only 1.42x from one worker to two. Here a frame costs two passes: the raw
bracket is merged into a few rows of mosaic at a time, which are demosaiced, de-vignetted and
colour-corrected while they are in L1/L2 (:func:`develop_bayer`), and the warp upsamples the
stored flow grid per pixel, samples bilinearly with exact weights and writes float16 and the
validity directly (:func:`warp_store`).

Numbers equal the reference path to float32 rounding (tests/test_fused.py); the warp uses
exact bilinear weights where ``cv2.remap`` quantises them to 1/32 pixel. numba is optional:
:func:`available` says whether the kernels compiled and passed a probe against the reference
path; without them (or with ``LIGHTSTAGE_NO_NUMBA=1``) the ingest uses the reference path.

References
----------
Malvar, H., He, L., Cutler, R. (2004). High-quality linear interpolation for demosaicing of
Bayer-patterned color images (the bilinear kernels).
"""

from __future__ import annotations

import numpy as np

from ._probe import VerifiedKernel
from .cfa import BAYER_PATTERNS

__all__ = ["available", "why_unavailable", "is_bayer", "develop_bayer", "warp_store", "BAND_ROWS"]

#: rows per band of :func:`develop_bayer`: K uint16 + bool inputs and three float32 outputs of
#: 16 rows of a 4096-pixel image stay within a 1 MB L2 cache
BAND_ROWS = 16


_CFA_INDEX = {"R": 0, "G": 1, "B": 2}


def _build():
    from . import _fused_kernel as k

    # probe against the reference path on a small bracket with clipping, both kernels
    rng = np.random.default_rng(0)
    H, W = 12, 10
    dns = [rng.integers(500, 4000, (H, W)).astype(np.uint16) for _ in range(2)]
    dns[1][3:6, 2:5] = 4095  # clipped in the long exposure only
    dns[0][7, 6] = dns[1][7, 6] = 4095  # and in both: flagged, shortest exposure's bound
    sats = [d >= 4090 for d in dns]
    vig = np.ones((H, W), np.float32)
    M = np.eye(3, dtype=np.float32)
    planes, bad = _develop_with(k, dns, sats, [512.0, 512.0], [4095.0, 4095.0], [1.0, 4.0],
                                "RGGB", vig, M)
    from .hdr import merge_raw_snr
    from .raw import demosaic_planes, saturation_rgb

    ref = merge_raw_snr(dns, [512.0, 512.0], [4095.0, 4095.0], sats, [1.0, 4.0])
    want = np.stack(demosaic_planes(ref.radiance, "RGGB"))
    if not np.allclose(planes, want, rtol=1e-5, atol=1e-7):
        raise RuntimeError("develop kernel disagrees with the reference path")
    if not np.array_equal(bad.astype(bool), saturation_rgb(~ref.valid)):
        raise RuntimeError("develop kernel's clipped-pixel mask disagrees with the reference")
    probe = np.array([0.0, 1.0, -2.5, 6.1e-5, 3.0e-6, 65504.0, 0.333], np.float32)
    p3 = np.tile(probe, (3, 1, 1))
    out = np.empty(p3.shape, np.uint16)
    vm = np.empty(p3.shape[1:], np.uint8)
    k.warp_store(p3, np.zeros((2, 1, 7), np.float32), 1, np.full(vm.shape, 255, np.uint8),
                 vm, False, 65504.0, out, vm)
    if not np.array_equal(out.view(np.float16), p3.astype(np.float16)):
        raise RuntimeError("float16 narrowing disagrees with numpy")
    return k


_KERNELS = VerifiedKernel(_build)


def available() -> bool:
    """Whether the compiled kernels can be used (numba present, kernels verified)."""
    return _KERNELS.available()


def why_unavailable() -> str:
    """Empty when :func:`available`, else the reason."""
    available()
    return _KERNELS.why


def is_bayer(cfa: str | None) -> bool:
    """Whether ``cfa`` is one of the four 2x2 Bayer patterns :func:`develop_bayer` handles
    (other periodic CFAs, X-Trans included, take the reference path)."""
    return cfa is not None and cfa.upper() in BAYER_PATTERNS


def _cfa_index(cfa: str) -> np.ndarray:
    if not is_bayer(cfa):
        raise ValueError(f"develop_bayer: not a 2x2 Bayer pattern: {cfa!r}")
    c = cfa.upper()
    return np.array([[_CFA_INDEX[c[0]], _CFA_INDEX[c[1]]], [_CFA_INDEX[c[2]], _CFA_INDEX[c[3]]]],
                    np.int64)


def _develop_with(k, dns, sats, blacks, whites, exposures, cfa, inv_vig, M, band=BAND_ROWS):
    K = len(dns)
    H, W = dns[0].shape
    for i in range(K):
        if dns[i].dtype != np.uint16 or dns[i].shape != (H, W):
            raise ValueError(f"develop_bayer: exposure {i} is {dns[i].dtype} {dns[i].shape}, "
                             f"expected uint16 {(H, W)}")
    e = np.asarray(exposures, np.float64)
    bl = np.asarray(blacks, np.float64)
    a = 1.0 / (np.asarray(whites, np.float64) - bl)
    out = np.empty((3, H, W), np.float32)
    bad = np.empty((H, W), np.uint8)
    k.develop_bayer(tuple(np.ascontiguousarray(d) for d in dns),
                    tuple(np.ascontiguousarray(s, dtype=bool) for s in sats), a, bl, e,
                    int(np.argmin(e)), _cfa_index(cfa),
                    np.ascontiguousarray(inv_vig, np.float32), np.asarray(M, np.float32),
                    out, bad, int(band))
    return out, bad


def develop_bayer(dns, saturated, blacks, whites, exposures, cfa: str, inv_vig: np.ndarray,
                  M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw bracket -> colour-corrected linear planes, in one pass.

    Parameters
    ----------
    dns : K ``(H, W)`` uint16 raw mosaics (DN) of one frame.
    saturated : K ``(H, W)`` bool clipped-photosite masks.
    blacks, whites : K scalar black and white levels (DN).
    exposures : K relative exposures (exposure time x gain).
    cfa : Bayer pattern of the top-left 2x2 (``"RGGB"`` ...).
    inv_vig : ``(H, W)`` float32 reciprocal vignetting.
    M : ``(3, 3)`` colour matrix (any per-channel gains folded in): ``out = M @ rgb``.

    Returns
    -------
    planes : ``(3, H, W)`` float32 ``M @ (demosaic(merge(bracket)) * inv_vig)``.
    bad : ``(H, W)`` uint8, 1 where the pixel's 3x3 neighbourhood holds a photosite clipped in
        every exposure (:func:`lightstage.raw.saturation_rgb` of the merge's invalid mask).
    """
    if not available():
        raise RuntimeError(f"fused kernels unavailable: {why_unavailable()}")
    return _develop_with(_KERNELS.kernel, dns, saturated, blacks, whites, exposures, cfa, inv_vig, M)


def warp_store(planes: np.ndarray, grid: np.ndarray | None, stride: int, cons: np.ndarray | None,
               valid: np.ndarray | None, lim: float = 65504.0) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``(3, H, W)`` planes with a stored flow grid and narrow them to float16.

    Parameters
    ----------
    planes : ``(3, H, W)`` float32 in stored units.
    grid : ``(2, h, w)`` flow grid (x, y; pixels) of stride ``stride``, or None (no warp).
    cons : ``(H, W)`` uint8 flow consistency (255 good), or None (all good).
    valid : ``(H, W)`` bool/uint8 validity before warping, or None (all valid).
    lim : values are clipped to +-lim (float16's largest finite value by default).

    Returns
    -------
    stored : ``(3, H, W)`` float16.
    vmask : ``(H, W)`` uint8, 255 where the warped pixel is trustworthy.
    """
    if not available():
        raise RuntimeError(f"fused kernels unavailable: {why_unavailable()}")
    k = _KERNELS.kernel
    planes = np.ascontiguousarray(planes, np.float32)
    _, H, W = planes.shape
    if grid is None:
        grid, stride = np.zeros((2, 1, 1), np.float32), 1
    grid = np.ascontiguousarray(grid, np.float32)
    if cons is None:
        cons = np.full((H, W), 255, np.uint8)
    use_valid = valid is not None
    v = np.ascontiguousarray(valid, np.uint8) if use_valid else cons
    out = np.empty((3, H, W), np.uint16)
    vmask = np.empty((H, W), np.uint8)
    k.warp_store(planes, grid, int(stride), np.ascontiguousarray(cons, np.uint8), v, use_valid,
                 float(lim), out, vmask)
    return out.view(np.float16), vmask
