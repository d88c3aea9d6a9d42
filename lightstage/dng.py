"""Minimal CFA DNG writer that LibRaw (rawpy) reads bit for bit.

One uncompressed little-endian TIFF/DNG per image: IFD0 holds the CFA mosaic (one strip,
16 bits per sample) and the DNG colour tags, an EXIF sub-IFD holds exposure time, f-number and
ISO (LibRaw takes ISO only from an EXIF IFD, DESIGN.md). The file is laid out in one pass
(header, IFD0, EXIF IFD, out-of-line values, pixels) so it streams straight to disk with a
single ``write`` of the pixel buffer; no timestamps are written, so identical inputs give
identical bytes.

Colour tags follow the DNG convention: ``ColorMatrix1`` maps CIE XYZ (D65 calibration
illuminant) to camera native RGB, normalised so the illuminant's white (Y = 1) maps to a camera
value whose largest component is 1; ``AsShotNeutral`` is the camera-native value of a neutral
(white) surface, largest component 1. :func:`colour_tags_from_response` derives both from a
camera response ``M`` (``cam = M @ rgb_rec709``).

References
----------
Adobe (2023). Digital Negative (DNG) Specification, version 1.7.1.0. Tags 50706 DNGVersion,
    33421/33422 CFARepeatPatternDim/CFAPattern, 50713-50717 black/white levels, 50721
    ColorMatrix1, 50728 AsShotNeutral, 50778 CalibrationIlluminant1.
Adobe (1992). TIFF Revision 6.0; CIPA DC-008 (Exif 2.3): tag 34665 ExifIFD, 33434
    ExposureTime, 33437 FNumber, 34855 ISOSpeedRatings.
IEC 61966-2-1 (sRGB): the Rec.709/D65 <-> XYZ matrices.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from .cfa import CFAError, parse_cfa

__all__ = [
    "DNGError",
    "DNGMetadata",
    "REC709_TO_XYZ",
    "XYZ_TO_REC709",
    "CFA_COLOURS",
    "MIN_SIDE",
    "colour_tags_from_response",
    "write_dng",
    "encode_dng",
]

#: linear Rec.709 (D65) -> CIE XYZ, IEC 61966-2-1
REC709_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
)
XYZ_TO_REC709 = np.linalg.inv(REC709_TO_XYZ)

#: the smallest width/height LibRaw accepts as a raw image (dcraw's identify: ``height < 22 ||
#: width < 22`` -> not raw)
MIN_SIDE = 22

#: CFA letter -> DNG CFAPattern colour code (0 red, 1 green, 2 blue)
CFA_COLOURS = {"R": 0, "G": 1, "B": 2}

# TIFF field types
_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _UNDEFINED, _SRATIONAL = 1, 2, 3, 4, 5, 7, 10


class DNGError(ValueError):
    pass


@dataclass
class DNGMetadata:
    """What a DNG records besides the pixels.

    ``colour_matrix1`` is the 3x3 XYZ -> camera matrix (DNG ColorMatrix1, D65 illuminant);
    ``as_shot_neutral`` the camera-native white (3,). See :func:`colour_tags_from_response`.
    """

    cfa_pattern: str = "RGGB"
    black_level: int = 0
    white_level: int = 65535
    exposure_time: float = 1 / 60
    f_number: float = 8.0
    iso: int = 100
    colour_matrix1: Sequence[Sequence[float]] | None = None
    as_shot_neutral: Sequence[float] | None = None
    make: str = "lightstage"
    model: str = "twin"
    unique_camera_model: str | None = None
    orientation: int = 1


def colour_tags_from_response(M) -> tuple[np.ndarray, np.ndarray]:
    """DNG ``ColorMatrix1`` (XYZ -> camera, D65) and ``AsShotNeutral`` for a camera response.

    Parameters
    ----------
    M : (3, 3) array
        Camera response, ``cam = M @ rgb`` with ``rgb`` linear Rec.709/D65.

    Returns
    -------
    colour_matrix1 : (3, 3) ndarray
        ``s * M @ XYZ_TO_REC709`` with ``s`` such that D65 white (Y = 1) maps to a camera value
        whose largest component is 1 (the normalisation Adobe's converter uses).
    as_shot_neutral : (3,) ndarray
        Camera value of a D65 white surface (``M @ [1, 1, 1]``), largest component 1.
    """
    M = np.asarray(M, dtype=np.float64)
    cm = M @ XYZ_TO_REC709
    white_cam = M @ np.ones(3)  # Rec.709 white = D65
    if np.any(white_cam <= 0):
        raise DNGError(f"camera response maps white to non-positive values {white_cam}")
    cm = cm / white_cam.max()
    return cm, white_cam / white_cam.max()


def _rational(x: float, signed: bool, limit: int = 1_000_000) -> tuple[int, int]:
    if not np.isfinite(x):
        raise DNGError(f"cannot store non-finite value {x} as a rational")
    f = Fraction(float(x)).limit_denominator(limit)
    lo, hi = (-(2**31), 2**31 - 1) if signed else (0, 2**32 - 1)
    while not (lo <= f.numerator <= hi) and limit > 1:  # huge values: coarser denominator
        limit //= 10
        f = Fraction(float(x)).limit_denominator(limit)
    if not (lo <= f.numerator <= hi):
        raise DNGError(f"value {x} out of range for a TIFF rational")
    return f.numerator, f.denominator


class _IFD:
    """Collects entries; packs them once the IFD's file offset is known."""

    def __init__(self):
        self.entries: dict[int, tuple[int, int, bytes]] = {}

    def add(self, tag: int, typ: int, values) -> None:
        if typ == _ASCII:
            data = values.encode("ascii", "replace") + b"\0"
            count = len(data)
        elif typ == _UNDEFINED:
            data = bytes(values)
            count = len(data)
        elif typ in (_RATIONAL, _SRATIONAL):
            vals = list(np.atleast_1d(np.asarray(values, dtype=np.float64)))
            fmt = "<ii" if typ == _SRATIONAL else "<II"
            data = b"".join(struct.pack(fmt, *_rational(v, typ == _SRATIONAL)) for v in vals)
            count = len(vals)
        else:
            vals = [int(v) for v in np.atleast_1d(values)]
            fmt = {_BYTE: "B", _SHORT: "H", _LONG: "I"}[typ]
            data = struct.pack(f"<{len(vals)}{fmt}", *vals)
            count = len(vals)
        self.entries[tag] = (typ, count, data)

    def size(self) -> int:
        """Bytes of the IFD itself plus its out-of-line values (each word aligned)."""
        n = len(self.entries)
        extra = sum(len(d) + (len(d) & 1) for _, _, d in self.entries.values() if len(d) > 4)
        return 2 + 12 * n + 4 + extra

    def pack(self, offset: int, next_ifd: int = 0) -> bytes:
        n = len(self.entries)
        value_pos = offset + 2 + 12 * n + 4
        head = [struct.pack("<H", n)]
        tail = []
        for tag in sorted(self.entries):  # TIFF requires ascending tag order
            typ, count, data = self.entries[tag]
            if len(data) <= 4:
                head.append(struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\0"))
            else:
                head.append(struct.pack("<HHII", tag, typ, count, value_pos))
                pad = data + (b"\0" if len(data) & 1 else b"")
                tail.append(pad)
                value_pos += len(pad)
        head.append(struct.pack("<I", next_ifd))
        return b"".join(head + tail)


def _validate(cfa: np.ndarray, meta: DNGMetadata) -> np.ndarray:
    if not (cfa.ndim == 2 or (cfa.ndim == 3 and cfa.shape[2] == 3)):
        raise DNGError(f"CFA mosaic must be 2-D (H, W) (or (H, W, 3) for a linear DNG), "
                       f"got shape {cfa.shape}")
    if cfa.dtype != np.uint16:
        if not np.issubdtype(cfa.dtype, np.integer) or cfa.min(initial=0) < 0 or cfa.max(initial=0) > 65535:
            raise DNGError(f"CFA mosaic must be uint16 (or integers in 0..65535), got {cfa.dtype}")
        cfa = cfa.astype(np.uint16)
    if cfa.ndim == 2:
        try:
            parse_cfa(meta.cfa_pattern)
        except CFAError as e:
            raise DNGError(f"cfa_pattern: {e}") from None
    if not 0 <= meta.black_level < meta.white_level <= 65535:
        raise DNGError(f"need 0 <= black_level < white_level <= 65535, got {meta.black_level}, {meta.white_level}")
    for name in ("exposure_time", "f_number"):
        v = getattr(meta, name)
        if not (np.isfinite(v) and v > 0):
            raise DNGError(f"{name} must be positive, got {v}")
    if not 0 < int(meta.iso) <= 65535:
        raise DNGError(f"iso must be in 1..65535, got {meta.iso}")
    if min(cfa.shape[:2]) < MIN_SIDE:
        # LibRaw (dcraw's identify) treats anything smaller as "not a raw file"
        raise DNGError(f"image is {cfa.shape[1]}x{cfa.shape[0]}: LibRaw (rawpy) reads no raw image "
                       f"under {MIN_SIDE} pixels on a side")
    return np.ascontiguousarray(cfa, dtype="<u2")


def _layout(cfa: np.ndarray, meta: DNGMetadata) -> tuple[bytes, np.ndarray]:
    """Header + IFDs (bytes) and the pixel array to append after them."""
    H, W = cfa.shape[:2]
    spp = 1 if cfa.ndim == 2 else 3  # (H, W, 3): a demosaiced "linear DNG"
    ifd0, exif = _IFD(), _IFD()
    ifd0.add(254, _LONG, 0)  # NewSubfileType: main image
    ifd0.add(256, _LONG, W)
    ifd0.add(257, _LONG, H)
    ifd0.add(258, _SHORT, (16,) * spp)
    ifd0.add(259, _SHORT, 1)  # uncompressed: fastest to write, LibRaw reads it directly
    # PhotometricInterpretation: CFA, or LinearRaw (34892) for already demosaiced RGB
    ifd0.add(262, _SHORT, 32803 if spp == 1 else 34892)
    ifd0.add(271, _ASCII, meta.make)
    ifd0.add(272, _ASCII, meta.model)
    ifd0.add(273, _LONG, 0)  # StripOffsets: patched below
    ifd0.add(274, _SHORT, meta.orientation)
    ifd0.add(277, _SHORT, spp)
    ifd0.add(278, _LONG, H)
    ifd0.add(279, _LONG, H * W * 2 * spp)
    ifd0.add(284, _SHORT, 1)
    ifd0.add(305, _ASCII, "lightstage")
    if spp == 1:
        pattern = parse_cfa(meta.cfa_pattern)  # 2x2 Bayer, 6x6 X-Trans, ...
        ifd0.add(33421, _SHORT, pattern.shape)  # CFARepeatPatternDim: rows, columns
        ifd0.add(33422, _BYTE, pattern.reshape(-1))  # CFAPattern: row-major 0 R, 1 G, 2 B
    ifd0.add(34665, _LONG, 0)  # ExifIFD: patched below
    ifd0.add(50706, _BYTE, (1, 4, 0, 0))
    ifd0.add(50707, _BYTE, (1, 1, 0, 0))
    ifd0.add(50708, _ASCII, meta.unique_camera_model or f"{meta.make} {meta.model}")
    if spp == 1:
        ifd0.add(50710, _BYTE, (0, 1, 2))  # CFAPlaneColor
        ifd0.add(50711, _SHORT, 1)  # CFALayout: rectangular
    ifd0.add(50713, _SHORT, (1, 1))  # BlackLevelRepeatDim
    ifd0.add(50714, _LONG, [int(meta.black_level)] * spp)  # one per sample
    ifd0.add(50717, _LONG, int(meta.white_level))
    if meta.colour_matrix1 is not None:
        cm = np.asarray(meta.colour_matrix1, dtype=np.float64)
        if cm.shape != (3, 3) or not np.all(np.isfinite(cm)):
            raise DNGError(f"colour_matrix1 must be a finite 3x3 matrix, got shape {cm.shape}")
        ifd0.add(50721, _SRATIONAL, cm.reshape(-1))
        ifd0.add(50778, _SHORT, 21)  # CalibrationIlluminant1: D65
    if meta.as_shot_neutral is not None:
        n = np.asarray(meta.as_shot_neutral, dtype=np.float64)
        if n.shape != (3,) or np.any(n <= 0):
            raise DNGError(f"as_shot_neutral must be 3 positive numbers, got {n}")
        ifd0.add(50728, _RATIONAL, n)
    exif.add(33434, _RATIONAL, float(meta.exposure_time))
    exif.add(33437, _RATIONAL, float(meta.f_number))
    exif.add(34855, _SHORT, int(meta.iso))
    exif.add(36864, _UNDEFINED, b"0230")  # ExifVersion (UNDEFINED)

    off0 = 8
    off_exif = off0 + ifd0.size()
    off_pix = off_exif + exif.size()
    off_pix += off_pix & 1
    ifd0.add(273, _LONG, off_pix)
    ifd0.add(34665, _LONG, off_exif)
    head = b"II*\0" + struct.pack("<I", off0) + ifd0.pack(off0) + exif.pack(off_exif)
    head = head.ljust(off_pix, b"\0")
    return head, cfa


def encode_dng(cfa: np.ndarray, meta: DNGMetadata) -> bytes:
    """The DNG file as bytes (see :func:`write_dng`)."""
    head, pix = _layout(_validate(np.asarray(cfa), meta), meta)
    return head + pix.tobytes()


def write_dng(path: str | Path, cfa: np.ndarray, meta: DNGMetadata) -> str:
    """Write a CFA mosaic as an uncompressed DNG.

    Parameters
    ----------
    path : path of the ``.dng`` to write (its folder must exist). Written to a temporary name
        and renamed, so a crash never leaves a truncated file under the final name.
    cfa : (H, W) uint16
        Raw mosaic in DN, black level included, exactly as the sensor read it out.
    meta : DNGMetadata

    Returns
    -------
    str
        SHA-256 (hex) of the bytes written, computed on the fly (no re-read), for manifests.
    """
    path = Path(path)
    cfa = _validate(np.asarray(cfa), meta)
    head, pix = _layout(cfa, meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = memoryview(pix).cast("B")  # no extra copy of the pixels
    digest = hashlib.sha256(head)
    digest.update(body)
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(body)
    os.replace(tmp, path)
    return digest.hexdigest()
