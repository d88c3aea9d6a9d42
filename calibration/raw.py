"""Raw decode for calibration: DNG/raw files -> exposure-normalised linear camera RGB.

``c = (raw - black) / (white - black) / (t * ISO/100)``: decoded by :func:`lightstage.raw.read_raw`,
an exposure bracket merged on the CFA mosaics by :func:`lightstage.hdr.merge_bracket` (where
saturation is exact per photosite) and demosaiced once by
:func:`lightstage.raw.demosaic_bilinear` -- the very path ``ls-ingest`` takes, so the colour
matrix fitted here maps exactly the values ingest will feed it. No white balance, no colour
matrix, no clipping of negative values (noise around black must average out), no tone curve.

Also reads ordinary 8-bit images (JPEG/PNG, real calibration photos) as sRGB-decoded linear
values, for geometry and chart sampling only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lightstage.hdr import merge_bracket as _merge
from lightstage.imageio import srgb_to_linear
from lightstage.raw import RawError, demosaic_bilinear, read_raw, saturation_rgb

__all__ = ["RawImage", "RawDecodeError", "decode_raw", "decode_bracket", "merge_bracket",
           "load_image", "srgb_to_linear", "display_u8", "RAW_SUFFIXES"]

RAW_SUFFIXES = (".dng", ".cr2", ".cr3", ".nef", ".arw", ".kdc", ".raf", ".orf", ".rw2")


class RawDecodeError(RawError):
    """A calibration image that cannot be read; the message names the file and the reason."""


@dataclass
class RawImage:
    """A decoded (possibly bracket-merged) frame.

    Attributes
    ----------
    rgb : (H, W, 3) float32 exposure-normalised camera RGB
    saturated : (H, W) bool, True where every exposure clipped a photosite of the demosaic
        neighbourhood (the value there is only a lower bound)
    exposure, iso : of the shortest exposure of the bracket
    path : the (shortest exposure's) file
    """

    rgb: np.ndarray
    saturated: np.ndarray
    exposure: float
    iso: float
    path: str


def _read(path: Path, exposure: float | None, iso: float | None, saturation: float):
    """(frame, relative exposure t * ISO/100, t, ISO) of one file; errors name the file."""
    if not path.exists():
        raise RawDecodeError(f"{path}: no such file")
    try:
        fr = read_raw(path)
    except RawError as e:
        raise RawDecodeError(str(e)) from None
    t = float(exposure) if exposure is not None else fr.exposure
    i = float(iso) if iso is not None else fr.iso
    if not t > 0:
        raise RawDecodeError(f"{path}: exposure time missing or not positive ({t})")
    if not i > 0:
        raise RawDecodeError(f"{path}: ISO missing or not positive ({i})")
    # photosites within ``saturation`` of the white level are not trusted either (read_raw's
    # own margin is 0.5 %; a calibration fit would rather lose a pixel than bend a patch mean)
    sat = fr.saturated | (fr.data >= saturation if fr.data.ndim == 2 else
                          (fr.data >= saturation).any(-1))
    return fr, sat, t * i / 100.0, t, i


def decode_bracket(files: Sequence[tuple[str | Path, float | None, float | None]],
                   saturation: float = 0.98) -> RawImage:
    """Decode an exposure bracket ``[(path, exposure s or None, ISO or None), ...]`` (None:
    from the file) into one exposure-normalised camera-RGB image.

    The mosaics are merged first (:func:`lightstage.hdr.merge_bracket`, shot-noise optimal
    weights, saturated photosites excluded) and demosaiced once.
    """
    if not files:
        raise RawDecodeError("empty bracket: no files")
    frames = [(Path(p),) + _read(Path(p), t, i, saturation) for p, t, i in files]
    p0, f0 = frames[0][0], frames[0][1]
    for p, f, *_ in frames[1:]:
        if f.data.shape != f0.data.shape or f.cfa != f0.cfa:
            raise RawDecodeError(f"{p}: {f.data.shape} {f.cfa} differs from the bracket's first "
                                 f"frame {p0.name} ({f0.data.shape} {f0.cfa})")
    m = _merge([f.data for _, f, *_ in frames], [e for *_, e, _, _ in frames],
               [s for _, _, s, *_ in frames], weighting="snr")
    if f0.cfa is not None:
        # guide=0: plain normalised convolution for X-Trans (its green-guided correction biases
        # refitted board corners; Bayer is bilinear either way)
        rgb = np.ascontiguousarray(np.moveaxis(
            demosaic_bilinear(m.radiance, f0.cfa, guide=0.0), 0, -1))
        sat = saturation_rgb(~m.valid, f0.cfa)
    else:  # LibRaw-developed fallback (four-colour CFAs) or a linear DNG: already (H, W, 3)
        rgb, sat = m.radiance, ~m.valid
    k = int(np.argmin([e for *_, e, _, _ in frames]))
    return RawImage(rgb, sat, frames[k][4], frames[k][5], str(frames[k][0]))


def decode_raw(path: str | Path, exposure: float | None = None, iso: float | None = None,
               saturation: float = 0.98) -> RawImage:
    """Decode one raw file (anything LibRaw reads) to exposure-normalised camera RGB.

    Parameters
    ----------
    exposure, iso : override the file's metadata (e.g. from a manifest)
    saturation : fraction of (white - black) at or above which a photosite counts as clipped
    """
    return decode_bracket([(path, exposure, iso)], saturation)


def merge_bracket(images: list[RawImage]) -> RawImage:
    """Merge already-decoded frames of one bracket (:func:`lightstage.hdr.merge_bracket` on
    the demosaiced images; :func:`decode_bracket` merges the mosaics instead, which is exact
    per photosite and preferred when the files are at hand)."""
    if len(images) == 1:
        return images[0]
    e = [im.exposure * im.iso / 100 for im in images]
    m = _merge([im.rgb * np.float32(ek) for im, ek in zip(images, e)], e,
               [im.saturated for im in images], weighting="snr")
    k = int(np.argmin(e))
    return RawImage(m.radiance, ~m.valid, images[k].exposure, images[k].iso, images[k].path)


def load_image(path: str | Path) -> RawImage:
    """An ordinary image (JPEG/PNG/TIFF) as linear RGB (sRGB decoded), exposure 1; raw files
    (.dng and the other LibRaw formats) go through :func:`decode_raw`."""
    import cv2

    path = Path(path)
    if path.suffix.lower() in RAW_SUFFIXES:
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
    # the white point only sets the display scale: a strided sample of a large image is
    # plenty (a full-image percentile is a sort of every pixel)
    ref = ref.ravel()
    if ref.size > 65536:
        ref = ref[:: ref.size // 65536]
    hi = float(np.percentile(ref, percentile)) if ref.size else 1.0
    # sRGB curve by table (16384 levels: < 0.2 of an 8-bit step even at the steep black end)
    idx = np.clip(v * np.float32(16383 / max(hi, 1e-12)) + np.float32(0.5), 0, 16383)
    return _SRGB_U8[idx.astype(np.int32)]


def _srgb_u8_table(n: int = 16384) -> np.ndarray:
    x = np.arange(n) / (n - 1)
    y = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return (y * 255 + 0.5).astype(np.uint8)


_SRGB_U8 = _srgb_u8_table()
