"""Image files for linear HDR work: EXR / Radiance HDR / 8-bit images, display PNG, GIF and MP4.

Every reader returns ``(H, W, 3)`` float32 **linear** RGB: EXR and ``.hdr`` are linear already;
8-bit files (PNG, JPEG, TGA, ...) are taken to be sRGB-encoded and are decoded to linear with the
IEC 61966-2-1 transfer function (never left as display values). Writers take linear float
(EXR) or display-referred uint8 (PNG, GIF, MP4).

Library traps handled here (DESIGN.md): OpenEXR's ``File`` API writes garbage for
non-contiguous views, so every array goes through :func:`numpy.ascontiguousarray`; this
opencv-python cannot read EXR (OpenEXR is used); ``.hdr`` reads correctly only with
``cv2.imread(p, cv2.IMREAD_UNCHANGED)`` (BGR order: flipped here); imageio's default ``.hdr``
reader returns 8-bit and is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "ImageIOError",
    "HDR_SUFFIXES",
    "LDR_SUFFIXES",
    "read_image",
    "read_exr",
    "write_exr",
    "read_hdr",
    "read_ldr",
    "srgb_to_linear",
    "linear_to_srgb",
    "write_png",
    "write_gif",
    "write_mp4",
    "mp4_available",
]

HDR_SUFFIXES = (".exr", ".hdr", ".pic")
LDR_SUFFIXES = (".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff")


class ImageIOError(ValueError):
    """An unreadable or unwritable image; the message names the file and the reason."""


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (IEC 61966-2-1 piecewise curve), float32."""
    v = np.asarray(v, dtype=np.float32)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(v: np.ndarray) -> np.ndarray:
    """Linear values -> sRGB encoding (IEC 61966-2-1); input clipped to [0, 1] first."""
    v = np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.power(v, 1 / 2.4) - 0.055).astype(np.float32)


def read_exr(path: str | Path) -> np.ndarray:
    """(H, W, 3) float32 linear RGB from an OpenEXR file (half or float, any compression).

    Accepts files whose RGB channels the OpenEXR module groups (``"RGB"``/``"RGBA"``) or
    keeps separate (``R``, ``G``, ``B``); a single luminance channel ``Y`` is replicated.
    """
    import OpenEXR

    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"{p}: no such file")
    try:
        f = OpenEXR.File(str(p))
        ch = f.channels()
    except Exception as e:  # OpenEXR raises bare RuntimeError/OSError
        raise ImageIOError(f"{p}: not a readable OpenEXR file ({e})") from None
    if "RGB" in ch or "RGBA" in ch:
        a = np.asarray(ch["RGB"].pixels if "RGB" in ch else ch["RGBA"].pixels)[..., :3]
    elif all(k in ch for k in "RGB"):
        a = np.stack([np.asarray(ch[k].pixels) for k in "RGB"], axis=-1)
    elif "Y" in ch:
        a = np.repeat(np.asarray(ch["Y"].pixels)[..., None], 3, axis=-1)
    else:
        raise ImageIOError(f"{p}: no R, G, B (or Y) channels; has {sorted(ch)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def write_exr(path: str | Path, rgb: np.ndarray, *, half: bool = False,
              compression: str = "zip") -> None:
    """Write ``(H, W, 3)`` linear RGB as an EXR (float32 by default, ``half`` for float16)."""
    import OpenEXR

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageIOError(f"{path}: EXR writer needs (H, W, 3) RGB, got shape {rgb.shape}")
    if not np.all(np.isfinite(rgb)):
        raise ImageIOError(f"{path}: refusing to write non-finite values (NaN/inf) to EXR")
    if half and np.abs(rgb).max(initial=0) > 65504:
        raise ImageIOError(f"{path}: values up to {float(np.abs(rgb).max()):.4g} exceed float16's "
                           "range (65504); write float32 or scale the radiance first")
    comp = {"zip": OpenEXR.ZIP_COMPRESSION, "piz": OpenEXR.PIZ_COMPRESSION,
            "none": OpenEXR.NO_COMPRESSION}[compression]
    data = np.ascontiguousarray(rgb, dtype=np.float16 if half else np.float32)
    header = {"compression": comp, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"RGB": data}) as f:
        f.write(str(path))


def read_hdr(path: str | Path) -> np.ndarray:
    """(H, W, 3) float32 linear RGB from a Radiance RGBE ``.hdr`` file."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"{p}: no such file")
    a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.dtype != np.float32:
        raise ImageIOError(f"{p}: not a readable Radiance HDR file")
    return np.ascontiguousarray(a[..., ::-1], dtype=np.float32)


def read_ldr(path: str | Path) -> np.ndarray:
    """(H, W, 3) float32 linear RGB from an 8/16-bit sRGB-encoded image (decoded to linear)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ImageIOError(f"{p}: no such file")
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode in ("I;16", "I;16B", "I"):
                a = np.asarray(im, dtype=np.float32) / 65535.0
                a = np.repeat(a[..., None], 3, axis=-1)
            else:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as e:
        raise ImageIOError(f"{p}: not a readable image ({e})") from None
    return srgb_to_linear(a)


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as (H, W, 3) float32 linear RGB, dispatching on the suffix."""
    p = Path(path)
    s = p.suffix.lower()
    if s == ".exr":
        return read_exr(p)
    if s in (".hdr", ".pic"):
        return read_hdr(p)
    if s in LDR_SUFFIXES:
        return read_ldr(p)
    raise ImageIOError(f"{p}: unsupported image type {s!r} (use one of "
                       f"{', '.join(HDR_SUFFIXES + LDR_SUFFIXES)})")


def _as_uint8(img: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ImageIOError(f"{what}: expects display-referred uint8 (tone map first), got {a.dtype}")
    return a


def write_png(path: str | Path, display: np.ndarray) -> None:
    """Write a display-referred ``(H, W, 3)`` uint8 image (see :mod:`lightstage.tonemap`)."""
    from PIL import Image

    Image.fromarray(_as_uint8(display, str(path))).save(str(path))


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float = 12.0) -> None:
    """Animated, looping GIF from display uint8 frames (Pillow, adaptive palette per frame)."""
    from PIL import Image

    if not frames:
        raise ImageIOError(f"{path}: no frames")
    ims = [Image.fromarray(_as_uint8(f, str(path))) for f in frames]
    ims[0].save(str(path), save_all=True, append_images=ims[1:], loop=0,
                duration=max(int(round(1000 / fps)), 20))


def mp4_available() -> bool:
    """True if OpenCV's bundled writer can encode MP4 (``mp4v``) offline on this machine."""
    try:
        import cv2

        return bool(cv2.VideoWriter_fourcc(*"mp4v")) and hasattr(cv2, "VideoWriter")
    except ImportError:
        return False


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float = 24.0) -> None:
    """MP4 (MPEG-4 part 2, ``mp4v``) from display uint8 RGB frames via OpenCV's writer."""
    import cv2

    if not frames:
        raise ImageIOError(f"{path}: no frames")
    h, w = frames[0].shape[:2]
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not wr.isOpened():
        raise ImageIOError(f"{path}: OpenCV cannot open an MP4 writer here")
    try:
        for f in frames:
            wr.write(np.ascontiguousarray(_as_uint8(f, str(path))[..., ::-1]))
    finally:
        wr.release()
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        raise ImageIOError(f"{path}: MP4 writer produced no data")
