"""Raw decode for calibration: DNG/raw -> exposure-normalised linear camera RGB.

``c = (raw - black) / (white - black) / (t * ISO/100)``, demosaiced bilinearly on the linear
data (OpenCV), saturated photosites masked. No white balance, no colour matrix, no clipping of
negative values (noise around black must average out), no tone curve: the calibration fits the
colour matrix that maps exactly this ``c`` to linear Rec.709 radiance (lightstage.calibfile).

Also reads ordinary 8-bit images (JPEG/PNG, real calibration photos) as sRGB-decoded linear
values, for geometry and chart sampling only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RawImage", "RawDecodeError", "decode_raw", "merge_bracket", "load_image",
           "srgb_to_linear", "display_u8", "demosaic_bilinear"]

_CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


class RawDecodeError(ValueError):
    pass


@dataclass
class RawImage:
    """A decoded raw frame.

    Attributes
    ----------
    rgb : (H, W, 3) float32 exposure-normalised camera RGB
    saturated : (H, W) bool, True where any photosite of the demosaic neighbourhood clipped
    exposure, iso : from the file's metadata
    path : where it came from
    """

    rgb: np.ndarray
    saturated: np.ndarray
    exposure: float
    iso: float
    path: str


def _pattern(raw) -> str:
    desc = raw.color_desc.decode()
    pat = raw.raw_pattern[:2, :2]
    letters = "".join(desc[i] for i in pat.ravel())
    # LibRaw names the second green 'G' or uses index 3
    return letters.replace("g", "G")


def decode_raw(path: str | Path, exposure: float | None = None, iso: float | None = None,
               saturation: float = 0.98) -> RawImage:
    """Decode one raw file (anything LibRaw reads) to exposure-normalised camera RGB.

    Parameters
    ----------
    exposure, iso : override the file's metadata (e.g. from a manifest)
    saturation : fraction of (white - black) at or above which a photosite counts as clipped
    """
    import cv2
    import rawpy

    path = Path(path)
    if not path.exists():
        raise RawDecodeError(f"{path}: no such file")
    try:
        with rawpy.imread(str(path)) as raw:
            # rawpy arrays are views into LibRaw memory: copy before the file closes
            mosaic = np.array(raw.raw_image_visible, dtype=np.float32, copy=True)
            blacks = np.asarray(raw.black_level_per_channel, dtype=np.float32)
            white = float(raw.white_level)
            colors = np.array(raw.raw_colors_visible, copy=True)
            desc = raw.color_desc.decode()
            pattern = _pattern(raw)
            t_file = float(raw.other.shutter_speed) if raw.other is not None else 0.0
            iso_file = float(raw.other.iso_speed) if raw.other is not None else 0.0
    except Exception as e:  # rawpy raises several unrelated types
        raise RawDecodeError(f"{path}: cannot decode raw ({type(e).__name__}: {e})") from None
    t = float(exposure) if exposure is not None else t_file
    g = float(iso if iso is not None else iso_file) / 100.0
    if not t > 0:
        raise RawDecodeError(f"{path}: exposure time missing or not positive ({t})")
    if not g > 0:
        raise RawDecodeError(f"{path}: ISO missing or not positive ({g * 100})")
    black = blacks[colors]
    scale = white - black
    sat = mosaic >= black + saturation * scale
    norm = (mosaic - black) / scale
    if pattern not in _CFA_PATTERNS:
        raise RawDecodeError(f"{path}: unsupported CFA pattern {pattern!r}")
    # LibRaw colour index -> 0 R, 1 G, 2 B (its second green is index 3)
    lut = np.array(["RGB".index(ch.upper()) for ch in desc], dtype=np.uint8)
    rgb = demosaic_bilinear(norm, lut[colors])
    # a clipped photosite poisons the 3x3 neighbourhood bilinear demosaic reads
    sat = cv2.dilate(sat.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    rgb /= np.float32(t * g)
    return RawImage(rgb, sat, t, g * 100, str(path))


def demosaic_bilinear(mosaic: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Bilinear demosaic of a float (H, W) mosaic with per-photosite channel index (H, W)
    (0 R, 1 G, 2 B) -> (H, W, 3) float32. Normalised convolution (OpenCV ``filter2D``) so it
    works on linear float data, for any 2x2 pattern, and stays unbiased at the borders."""
    import cv2

    k = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], np.float32)
    out = np.empty(mosaic.shape + (3,), np.float32)
    for c in range(3):
        m = (channel == c).astype(np.float32)
        # green photosites form a quincunx: their bilinear kernel is the cross
        kc = k if c != 1 else np.array([[0, 0.25, 0], [0.25, 1, 0.25], [0, 0.25, 0]], np.float32)
        num = cv2.filter2D(mosaic * m, -1, kc, borderType=cv2.BORDER_REFLECT)
        den = cv2.filter2D(m, -1, kc, borderType=cv2.BORDER_REFLECT)
        out[..., c] = num / np.maximum(den, 1e-6)
        # measured samples stay exactly as measured
        out[..., c] = np.where(m > 0, mosaic, out[..., c])
    return out


def merge_bracket(images: list[RawImage]) -> RawImage:
    """Merge an exposure bracket of already-normalised frames: per pixel, the mean over the
    frames that are not saturated there, weighted by exposure (longer = less noise); pixels
    saturated in every frame keep the shortest frame's value and stay flagged."""
    if len(images) == 1:
        return images[0]
    num = np.zeros_like(images[0].rgb)
    den = np.zeros(images[0].saturated.shape, np.float32)
    for im in images:
        w = (~im.saturated).astype(np.float32) * np.float32(im.exposure * im.iso / 100)
        num += im.rgb * w[..., None]
        den += w
    shortest = min(images, key=lambda im: im.exposure * im.iso)
    ok = den > 0
    rgb = np.where(ok[..., None], num / np.maximum(den, 1e-30)[..., None], shortest.rgb)
    return RawImage(rgb.astype(np.float32), ~ok, shortest.exposure, shortest.iso,
                    shortest.path)


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def load_image(path: str | Path) -> RawImage:
    """An ordinary image (JPEG/PNG/TIFF) as linear RGB (sRGB decoded), exposure 1; raw files
    (.dng and the other LibRaw formats) go through :func:`decode_raw`."""
    import cv2

    path = Path(path)
    if path.suffix.lower() in (".dng", ".cr2", ".nef", ".arw", ".kdc", ".raf", ".orf", ".rw2"):
        return decode_raw(path)
    if not path.exists():
        raise RawDecodeError(f"{path}: no such file")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise RawDecodeError(f"{path}: not a readable image")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3][..., ::-1]
    peak = 255.0 if img.dtype == np.uint8 else 65535.0 if img.dtype == np.uint16 else 1.0
    v = img.astype(np.float32) / np.float32(peak)
    sat = (v >= 0.999).any(axis=2)
    return RawImage(srgb_to_linear(v), sat, 1.0, 100.0, str(path))


def display_u8(rgb: np.ndarray, percentile: float = 99.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Linear image -> 8-bit grey (or RGB) for detectors and pictures only: scale so the given
    percentile maps to white, then the sRGB curve. Never used for measurement."""
    v = np.asarray(rgb, np.float32)
    ref = v if mask is None else v[mask]
    hi = float(np.percentile(ref, percentile)) if ref.size else 1.0
    x = np.clip(v / max(hi, 1e-12), 0, 1)
    x = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return (x * 255 + 0.5).astype(np.uint8)
