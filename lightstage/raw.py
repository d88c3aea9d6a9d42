"""Raw decode: camera raw file -> linear, normalised CFA mosaic (+ saturation mask) -> RGB.

The pipeline keeps the data linear and in *normalised camera units* until colour correction::

    value = (DN - black) / (white - black)            # 0 = black, 1 = white level
    exposure-normalised value = value / (exposure_time * gain),  gain = ISO / 100

Photosites at or above ``white - margin`` DN are flagged saturated: their value says only
"at least this bright". The HDR merge (:mod:`lightstage.hdr`) works on the normalised CFA
mosaics, where saturation is exact per photosite, and the merged mosaic is demosaiced once.

Demosaicing is bilinear, written as a normalised convolution per colour plane
(``cv2.filter2D`` on float32). OpenCV's ``cvtColor(COLOR_Bayer*2RGB)`` only accepts 8/16-bit
input, and quantising a merged HDR mosaic to 16 bits would throw away its dynamic range; the
normalised convolution gives the same interior result as OpenCV's bilinear demosaic and exact
values at the borders for flat colour.

Non-Bayer sensors (X-Trans, Foveon, linear DNG) fall back to LibRaw's own demosaic with linear
settings (gamma 1, no auto-brightness, unit white balance, camera colour space, no
``adjust_maximum``): see DESIGN.md, "Known traps".

References
----------
LibRaw API notes (rawpy): ``raw_image_visible`` is a view into LibRaw's buffer: copy it before
closing the file.
Malvar, H., He, L., Cutler, R. (2004). High-quality linear interpolation for demosaicing of
Bayer-patterned color images (bilinear baseline, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "RawError",
    "RawFrame",
    "read_raw",
    "normalise_mosaic",
    "cfa_masks",
    "demosaic_bilinear",
    "demosaic_planes",
    "saturation_rgb",
    "mosaic_from_rgb",
]

_CFA = ("RGGB", "BGGR", "GRBG", "GBRG")


class RawError(ValueError):
    """A raw file that cannot be decoded; the message names the file and the reason."""


@dataclass
class RawFrame:
    """One decoded raw exposure.

    Attributes
    ----------
    data : ndarray
        ``(H, W)`` float32 normalised CFA mosaic for Bayer sensors, or ``(H, W, 3)`` float32
        normalised camera RGB for the non-Bayer fallback. Not divided by exposure.
    saturated : ndarray
        bool, same spatial shape as ``data`` (``(H, W)``): photosite (or pixel) at the white level.
    cfa : str or None
        Bayer pattern of the top-left 2x2 (``"RGGB"`` ...), None when ``data`` is RGB.
    exposure : float
        Exposure time in seconds (from the file; 0 when the file does not say).
    iso : float
        ISO speed from the file (0 when unknown).
    black, white : float
        Mean black level and the white level in DN (for reports).
    path : str
    black_map : float or ndarray or None
        The black level to subtract: a scalar, or ``(H, W)`` per photosite when the channels'
        levels differ (set by :func:`read_raw`).
    normalised : bool
        False when ``data`` holds the raw DN (``read_raw(..., normalise=False)``); then
        ``(data - black_map) / (white - black_map)`` is the normalised value.
    """

    data: np.ndarray
    saturated: np.ndarray
    cfa: str | None
    exposure: float
    iso: float
    black: float
    white: float
    path: str = ""
    black_map: float | np.ndarray | None = None
    normalised: bool = True


def cfa_masks(cfa: str, height: int, width: int) -> np.ndarray:
    """``(3, H, W)`` float32 0/1 masks of the R, G and B photosites of a Bayer pattern."""
    if cfa not in _CFA:
        raise RawError(f"unsupported CFA pattern {cfa!r} (expected one of {_CFA})")
    m = np.zeros((3, height, width), np.float32)
    idx = {"R": 0, "G": 1, "B": 2}
    for k, ch in enumerate(cfa):
        dy, dx = divmod(k, 2)
        m[idx[ch], dy::2, dx::2] = 1.0
    return m


def normalise_mosaic(raw: np.ndarray, black: np.ndarray | float, white: float,
                     margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Black-subtract and scale a raw mosaic to [0, 1] at the white level.

    Parameters
    ----------
    raw : ndarray
        ``(H, W)`` integer DN.
    black : float or ndarray
        Black level, scalar or per photosite ``(H, W)``.
    white : float
        White level (DN).
    margin : float
        Photosites ``>= white - margin`` DN count as saturated.

    Returns
    -------
    value : ndarray ``(H, W)`` float32, ``(DN - black) / (white - black)``
    saturated : ndarray ``(H, W)`` bool
    """
    rawf = raw.astype(np.float32)
    black = np.asarray(black, np.float32)
    value = (rawf - black) / (np.float32(white) - black)
    return value, raw >= (white - margin)


def _bayer_string(pattern: np.ndarray, desc: str) -> str | None:
    if pattern is None or pattern.shape != (2, 2):
        return None
    s = "".join(desc[int(i)] for i in pattern.reshape(-1))
    s = s.replace("g", "G")
    return s if s in _CFA else None


def read_raw(path: str | Path, margin: float | None = None, normalise: bool = True) -> RawFrame:
    """Decode a camera raw file (anything LibRaw reads) to a normalised linear mosaic.

    Parameters
    ----------
    path : path of the raw file.
    margin : float, optional
        Saturation margin in DN (default: 0.5 % of the white-black range, at least 1 DN, so
        photosites within a hair of the white level are not trusted).

    Raises
    ------
    RawError
        Naming the file when it is missing, truncated or not a raw file.
    """
    import rawpy

    path = Path(path)
    if not path.exists():
        raise RawError(f"{path}: no such raw file")
    try:
        raw = rawpy.imread(str(path))
    except Exception as e:  # LibRaw raises several types (LibRawFileUnsupportedError, IOError ...)
        raise RawError(f"{path}: cannot decode raw file ({type(e).__name__}: {e})") from None
    try:
        try:
            mosaic = raw.raw_image_visible.copy()  # a view into LibRaw memory: copy before close
            blacks = np.asarray(raw.black_level_per_channel, np.float32)
            # the per-photosite colour map is only needed when the channels' black levels
            # differ (rawpy builds it with a np.pad per call: not free)
            colors = raw.raw_colors_visible.copy() if np.ptp(blacks) > 0 else None
        except Exception as e:
            raise RawError(f"{path}: raw data unreadable ({type(e).__name__}: {e})") from None
        white = float(raw.white_level)
        desc = raw.color_desc.decode("ascii", "replace")
        pattern = raw.raw_pattern
        other = raw.other if hasattr(raw, "other") else None
        exposure = float(getattr(other, "shutter_speed", 0.0) or 0.0) if other else 0.0
        iso = float(getattr(other, "iso_speed", 0.0) or 0.0) if other else 0.0
        cfa = _bayer_string(np.asarray(pattern) if pattern is not None else None, desc)
        if mosaic.ndim != 2 or cfa is None:
            rgb, sat = _postprocess_linear(raw, path)
            return RawFrame(rgb, sat, None, exposure, iso, float(blacks.mean()), white, str(path),
                            black_map=0.0)
    finally:
        raw.close()
    if white <= blacks.max():
        raise RawError(f"{path}: white level {white} not above black level {blacks.max()}")
    if margin is None:
        margin = max(1.0, 0.005 * (white - float(blacks.max())))
    black_map = blacks[colors] if np.ptp(blacks) > 0 else float(blacks[0])
    if not normalise:
        sat = mosaic >= (white - margin)
        return RawFrame(mosaic, sat, cfa, exposure, iso, float(blacks.mean()), white, str(path),
                        black_map=black_map, normalised=False)
    value, sat = normalise_mosaic(mosaic, black_map, white, margin)
    return RawFrame(value, sat, cfa, exposure, iso, float(blacks.mean()), white, str(path),
                    black_map=black_map)


def _postprocess_linear(raw, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """LibRaw demosaic with every non-linear step off; returns normalised camera RGB in [0, 1]."""
    import rawpy

    try:
        rgb = raw.postprocess(
            gamma=(1, 1), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0,
            user_wb=[1.0, 1.0, 1.0, 1.0], user_flip=0, output_color=rawpy.ColorSpace.raw,
            use_camera_wb=False, use_auto_wb=False,
        )
    except Exception as e:
        raise RawError(f"{path}: LibRaw demosaic failed ({type(e).__name__}: {e})") from None
    # LibRaw scales (DN - black) so that the white level maps to 65535
    sat = np.any(rgb >= 65535 - 64, axis=-1)
    return rgb.astype(np.float32) / np.float32(65535.0), sat


# ---- demosaic ------------------------------------------------------------------------------

_K_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
_K_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4


def _nconv(plane: np.ndarray, mask: np.ndarray, k: np.ndarray) -> np.ndarray:
    num = cv2.filter2D(plane * mask, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT_101)
    den = cv2.filter2D(mask, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT_101)
    return num / np.maximum(den, np.float32(1e-12))


@lru_cache(maxsize=8)
def _cfa_masks_cached(cfa: str, height: int, width: int) -> np.ndarray:
    m = cfa_masks(cfa, height, width)
    m.flags.writeable = False
    return m


def demosaic_planes(mosaic: np.ndarray, cfa: str) -> list[np.ndarray]:
    """Bilinear demosaic as three ``(H, W)`` float32 planes (R, G, B); equal to
    :func:`demosaic_bilinear`.

    The normalised convolution's denominator (the kernel summed over a colour's photosites) is
    exactly 1 at every pixel of a Bayer mosaic, borders included: the bilinear kernels weigh
    each colour's neighbours to a sum of 1, and ``BORDER_REFLECT_101`` mirrors about the edge
    photosite, which keeps the pattern's parity. So one ``filter2D`` per colour suffices."""
    m = np.asarray(mosaic, np.float32)
    H, W = m.shape
    if H < 2 or W < 2:
        return list(demosaic_bilinear(m, cfa))
    masks = _cfa_masks_cached(cfa, H, W)
    return [cv2.filter2D(cv2.multiply(m, masks[c]), cv2.CV_32F, _K_G if c == 1 else _K_RB,
                         borderType=cv2.BORDER_REFLECT_101) for c in range(3)]


def demosaic_bilinear(mosaic: np.ndarray, cfa: str) -> np.ndarray:
    """Bilinear demosaic of a float CFA mosaic.

    Parameters
    ----------
    mosaic : ndarray ``(H, W)`` float
    cfa : Bayer pattern of the top-left 2x2, e.g. ``"RGGB"``.

    Returns
    -------
    ndarray ``(3, H, W)`` float32 camera RGB, channel-planar (the store's layout). Measured
    photosites keep their exact value; the missing ones are the mean of their nearest
    same-colour neighbours.
    """
    m = np.asarray(mosaic, np.float32)
    H, W = m.shape
    masks = cfa_masks(cfa, H, W)
    out = np.empty((3, H, W), np.float32)
    for c in range(3):
        out[c] = _nconv(m, masks[c], _K_G if c == 1 else _K_RB)
    return out


def saturation_rgb(saturated: np.ndarray) -> np.ndarray:
    """Pixel-level saturation after bilinear demosaic: a pixel is untrusted when any photosite
    of its 3x3 neighbourhood (the support of the bilinear kernels) is saturated. ``(H, W)`` bool."""
    s = np.asarray(saturated, np.uint8)
    return cv2.dilate(s, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REFLECT_101) > 0


def mosaic_from_rgb(rgb: np.ndarray, cfa: str) -> np.ndarray:
    """Sample a channel-planar ``(3, H, W)`` image through a Bayer CFA -> ``(H, W)`` mosaic
    (test helper and the inverse of :func:`demosaic_bilinear` at measured photosites)."""
    masks = cfa_masks(cfa, rgb.shape[1], rgb.shape[2])
    return (np.asarray(rgb, np.float32) * masks).sum(0)
