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

Any other periodic three-colour CFA (Fujifilm's 6x6 X-Trans, CFAs of up to 8x8 photosites;
spelling in :mod:`lightstage.cfa`) takes the same road: normalised mosaic, exact per-photosite
saturation, HDR merge on the mosaic, then :func:`demosaic_planes`, which generalises the bilinear
normalised convolution. Each colour is interpolated with the separable tent
``[1, 2, 1] x [1, 2, 1]`` (the bilinear kernel) normalised by the same tent applied to that
colour's mask, ``sum(w m) / sum(w)``, measured photosites keeping their value; every 3x3 window
of X-Trans holds all three colours. The few border pixels whose window, clipped at the image
edge, lacks a colour widen to the tent of radius 2, 3, ... (out-of-image photosites are ignored
rather than mirrored, as mirroring breaks a 6x6 pattern's phase). Red and blue then add a
correction from the dense green, after Malvar et al.: ``g (G^ - NC_C(G^))`` with ``g = 1/2``
(:func:`_demosaic_periodic`); still linear in the data, it halves the X-Trans demosaic error on
the twin's faces and widens the support to 5x5 (:func:`saturation_rgb` with ``cfa``). For a 2x2
Bayer CFA the plain normalised convolution is exactly the bilinear demosaic, which keeps its own
faster code path.

An "already demosaiced" raw (linear DNG: three samples per pixel) is normalised per channel
directly, with no demosaic. Only what is neither (four-colour CFAs, periods above 8, ...) falls
back to LibRaw's own demosaic with linear settings (gamma 1, no auto-brightness, unit white
balance, camera colour space, no ``adjust_maximum``, LibRaw's linear interpolation): see
DESIGN.md, "Known traps". LibRaw's default X-Trans demosaic refuses images under 512 pixels on
a side ("Input/output error"), one more reason not to depend on it.

References
----------
LibRaw API notes (rawpy): ``raw_image_visible`` is a view into LibRaw's buffer: copy it before
closing the file.
Malvar, H., He, L., Cutler, R. (2004). High-quality linear interpolation for demosaicing of
Bayer-patterned color images, ICASSP 2004 (bilinear baseline, section 2; the gradient
correction of one colour by another, with gains near 1/2, section 3).
Knutsson, H., Westin, C.-F. (1993). Normalized and differential convolution. CVPR 1993
(normalised convolution of sparse samples with an applicability function).
Fujifilm X-Trans CFA (6x6 period) and DNG 1.4 CFARepeatPatternDim / CFAPattern: see
:mod:`lightstage.cfa`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .cfa import BAYER_PATTERNS, MAX_PERIOD, CFAError, cfa_index_map, cfa_string, parse_cfa

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
    "GUIDE_GAIN",
]

_CFA = BAYER_PATTERNS


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
        CFA pattern from the top-left photosite (:mod:`lightstage.cfa` spelling: ``"RGGB"`` ...
        for Bayer, rows separated by ``/`` for X-Trans and other periods), None when ``data``
        is RGB.
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
    """``(3, H, W)`` float32 0/1 masks of the R, G and B photosites of a CFA pattern (Bayer
    ``"RGGB"`` ..., X-Trans or any periodic pattern in :mod:`lightstage.cfa` spelling)."""
    try:
        idx = cfa_index_map(cfa, height, width)
    except CFAError as e:
        raise RawError(f"unsupported CFA pattern: {e}") from None
    m = np.empty((3, height, width), np.float32)
    for c in range(3):
        np.equal(idx, c, out=m[c], casting="unsafe")
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


def _cfa_string(pattern: np.ndarray, desc: str) -> str | None:
    """LibRaw's ``raw_pattern`` (indices into ``color_desc``) -> our CFA spelling, or None when
    it is not a three-colour R/G/B pattern of period <= 8 (then LibRaw demosaics)."""
    if pattern is None or pattern.ndim != 2 or max(pattern.shape) > MAX_PERIOD:
        return None
    # every file of a camera has the same pattern: spelled once per process (~0.1 ms a file)
    return _cfa_string_cached(pattern.astype(np.int64).tobytes(), pattern.shape, desc)


@lru_cache(maxsize=64)
def _cfa_string_cached(pattern_bytes: bytes, shape: tuple[int, int], desc: str) -> str | None:
    pattern = np.frombuffer(pattern_bytes, np.int64).reshape(shape)
    try:
        letters = np.array([desc[int(i)] for i in pattern.reshape(-1)])
    except IndexError:
        return None
    letters = np.char.upper(letters)  # LibRaw may name the second green "g"
    lut = {"R": 0, "G": 1, "B": 2}
    if not set(letters.tolist()) <= set(lut) or len(set(letters.tolist())) != 3:
        return None
    idx = np.array([lut[ch] for ch in letters], np.uint8).reshape(pattern.shape)
    return cfa_string(idx)


def read_raw(path: str | Path, margin: float | None = None, normalise: bool = True,
             data: bytes | None = None) -> RawFrame:
    """Decode a camera raw file (anything LibRaw reads) to a normalised linear mosaic.

    Parameters
    ----------
    path : path of the raw file (named in errors; read unless ``data`` is given).
    margin : float, optional
        Saturation margin in DN (default: 0.5 % of the white-black range, at least 1 DN, so
        photosites within a hair of the white level are not trusted).
    data : bytes, optional
        The file's bytes, already read (e.g. to check its hash): decoded from memory, so the
        file is read once.

    Raises
    ------
    RawError
        Naming the file when it is missing, truncated or not a raw file.
    """
    import rawpy

    path = Path(path)
    if data is None and not path.exists():
        raise RawError(f"{path}: no such raw file")
    try:
        raw = rawpy.imread(str(path) if data is None else io.BytesIO(data))
    except Exception as e:  # LibRaw raises several types (LibRawFileUnsupportedError, IOError ...)
        raise RawError(f"{path}: cannot decode raw file ({type(e).__name__}: {e})") from None
    try:
        try:
            mosaic = raw.raw_image_visible.copy()  # a view into LibRaw memory: copy before close
            blacks = np.asarray(raw.black_level_per_channel, np.float32)
            pattern = raw.raw_pattern
        except Exception as e:
            raise RawError(f"{path}: raw data unreadable ({type(e).__name__}: {e})") from None
        white = float(raw.white_level)
        desc = raw.color_desc.decode("ascii", "replace")
        other = raw.other if hasattr(raw, "other") else None
        exposure = float(getattr(other, "shutter_speed", 0.0) or 0.0) if other else 0.0
        iso = float(getattr(other, "iso_speed", 0.0) or 0.0) if other else 0.0
        if mosaic.ndim == 3 and pattern is None and int(raw.num_colors) == 3 \
                and mosaic.shape[2] >= 3:
            # already demosaiced (linear DNG): per-channel normalisation, nothing to
            # interpolate (LibRaw's postprocess would scale by the white level alone here)
            return _linear_rgb(mosaic[..., :3], blacks[:3], white, margin, path, exposure, iso)
        cfa = _cfa_string(np.asarray(pattern) if pattern is not None else None, desc)
        if mosaic.ndim != 2 or cfa is None:
            rgb, sat = _postprocess_linear(raw, path)
            return RawFrame(rgb, sat, None, exposure, iso, float(blacks.mean()), white, str(path),
                            black_map=0.0)
        try:
            # the per-photosite colour map is only needed when the channels' black levels
            # differ (rawpy builds it with a np.pad per call: not free)
            colors = raw.raw_colors_visible.copy() if np.ptp(blacks) > 0 else None
        except Exception as e:
            raise RawError(f"{path}: raw data unreadable ({type(e).__name__}: {e})") from None
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


def _linear_rgb(rgb: np.ndarray, blacks: np.ndarray, white: float, margin: float | None,
                path: Path, exposure: float, iso: float) -> RawFrame:
    """A three-sample-per-pixel raw (linear DNG) normalised per channel, like a mosaic."""
    if white <= blacks.max():
        raise RawError(f"{path}: white level {white} not above black level {blacks.max()}")
    if margin is None:
        margin = max(1.0, 0.005 * (white - float(blacks.max())))
    value, sat = normalise_mosaic(rgb, blacks[None, None, :], white, margin)
    return RawFrame(value, sat.any(axis=-1), None, exposure, iso, float(blacks.mean()), white,
                    str(path), black_map=0.0)


def _postprocess_linear(raw, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """LibRaw demosaic with every non-linear step off; returns normalised camera RGB in [0, 1].

    LibRaw's own linear interpolation is asked for: it is linear in the data like ours, and
    unlike its default X-Trans demosaic it accepts images under 512 pixels on a side. A
    four-colour sensor (CMYG ...) has no three camera channels: LibRaw's linear conversion to
    Rec.709 primaries (its camera matrix, still gamma 1 and unit white balance) stands in for
    them, which the per-camera colour calibration then corrects like any camera RGB; its
    saturation flags are approximate (a clipped photosite may be mixed below the white level)."""
    import rawpy

    four = int(raw.num_colors) == 4
    try:
        rgb = raw.postprocess(
            gamma=(1, 1), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0,
            user_wb=[1.0, 1.0, 1.0, 1.0], user_flip=0,
            output_color=rawpy.ColorSpace.sRGB if four else rawpy.ColorSpace.raw,
            use_camera_wb=False, use_auto_wb=False,
            demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR,
        )
    except Exception as e:
        raise RawError(f"{path}: LibRaw demosaic failed ({type(e).__name__}: {e})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise RawError(f"{path}: LibRaw developed {rgb.shape}, expected (H, W, 3) "
                       f"({raw.num_colors} colours {raw.color_desc.decode('ascii', 'replace')})")
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


# ---- any periodic CFA (X-Trans ...) ---------------------------------------------------------


def _tent(r: int) -> np.ndarray:
    """Separable tent of radius ``r`` (``r = 1``: the bilinear ``[1, 2, 1] x [1, 2, 1]``)."""
    t = np.array([r + 1 - abs(d) for d in range(-r, r + 1)], np.float32)
    return np.outer(t, t)


def _conv0(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Correlation with ``k``, photosites outside the image counted as absent (zero)."""
    return cv2.filter2D(x, cv2.CV_32F, k, borderType=cv2.BORDER_CONSTANT)


@dataclass(frozen=True)
class _Fallback:
    """Border pixels of one colour whose radius-``r0`` window holds none of that colour: they
    use the tent of radius ``r``, computed on one image-edge strip only."""

    radius: int
    out: tuple  # slices of the output strip
    src: tuple  # slices of the input the strip's windows reach
    crop: tuple  # the strip within ``src``
    inv: np.ndarray  # 1 / denominator at the strip's pixels that use this radius, else 0


@dataclass(frozen=True)
class _Plan:
    masks: np.ndarray  # (3, H, W) float32 0/1
    measured: np.ndarray  # (3, H, W) uint8 0/1, the same (OpenCV's copy mask)
    kernels: tuple  # per colour: the interior tent
    inv: np.ndarray  # (3, H, W) float32: 1 / denominator where the interior tent is used, else 0
    fallbacks: tuple  # per colour: tuple of _Fallback
    guide: int  # the colour guiding the others (the most frequent: green), -1 for none
    reach: int  # how far the guide's interpolation reaches (its largest tent radius)
    radius: int  # the interior support radius of the whole demosaic (saturation rule)


def _interior_radius(mask_period: np.ndarray) -> int:
    """Smallest tent radius whose window holds the colour at every phase of the (infinite)
    periodic pattern."""
    n, m = mask_period.shape
    reps = 2 * (-(-MAX_PERIOD // min(n, m))) + 1
    tiled = np.tile(mask_period.astype(np.float32), (reps, reps))
    y0, x0 = (reps // 2) * n, (reps // 2) * m
    for r in range(1, MAX_PERIOD + 1):
        den = _conv0(tiled, _tent(r))[y0:y0 + n, x0:x0 + m]
        if (den > 0).all():
            return r
    raise RawError(f"CFA period {n}x{m}: a colour is missing from some "
                   f"{2 * MAX_PERIOD + 1}-photosite window")


@lru_cache(maxsize=4)
def _periodic_plan(cfa: str, H: int, W: int) -> _Plan:
    """Masks, kernels and reciprocal denominators of the normalised convolution (periodic in the
    interior; computed once per pattern and frame size: they do not depend on the data)."""
    masks = cfa_masks(cfa, H, W)
    period = parse_cfa(cfa)
    inv = np.zeros((3, H, W), np.float32)
    kernels, fallbacks, radii = [], [], []
    for c in range(3):
        mc = masks[c]
        if not mc.any():
            raise RawError(f"CFA {cfa!r}: a {H}x{W} image holds no {'RGB'[c]} photosite")
        r0 = _interior_radius(period == c)
        radii.append(r0)
        kernels.append(_tent(r0))
        todo = mc == 0
        den = _conv0(mc, _tent(r0))
        hit = todo & (den > 0)
        inv[c][hit] = 1.0 / den[hit]
        todo &= ~hit
        # what is left lies within r0 of an edge (deeper windows see the periodic pattern):
        # give each such pixel to one edge strip and widen its tent until it sees the colour
        hb, wb = max(0, H - r0), max(0, W - r0)  # first row / column of the far strips
        strips = [  # r -> (out, src, crop): the src reaches r further inwards than the strip
            lambda r: ((slice(0, r0), slice(None)), (slice(0, r0 + r), slice(None)),
                       (slice(0, r0), slice(None))),
            lambda r: ((slice(hb, H), slice(None)), (slice(max(0, hb - r), H), slice(None)),
                       (slice(hb - max(0, hb - r), None), slice(None))),
            lambda r: ((slice(None), slice(0, r0)), (slice(None), slice(0, r0 + r)),
                       (slice(None), slice(0, r0))),
            lambda r: ((slice(None), slice(wb, W)), (slice(None), slice(max(0, wb - r), W)),
                       (slice(None), slice(wb - max(0, wb - r), None))),
            # never needed for a periodic pattern; a safety net computing the whole image
            lambda r: ((slice(None), slice(None)),) * 3,
        ]
        fb = []
        r = r0
        while todo.any():
            r += 1
            if r > max(H, W):
                raise RawError(f"CFA {cfa!r}: {H}x{W} image too small to interpolate")
            den = _conv0(mc, _tent(r))
            hit = todo & (den > 0)
            if not hit.any():
                continue
            todo &= ~hit
            taken = np.zeros((H, W), bool)
            for strip in strips:
                out, src, crop = strip(r)
                sel = hit[out] & ~taken[out]
                if not sel.any():
                    continue
                taken[out] |= sel
                fb.append(_Fallback(r, out, src, crop,
                                    np.where(sel, 1.0 / np.maximum(den[out], 1e-30), 0.0)
                                    .astype(np.float32)))
        fallbacks.append(tuple(fb))
    counts = [(period == c).sum() for c in range(3)]
    guide = int(np.argmax(counts))
    if sorted(counts)[-1] == sorted(counts)[-2]:
        guide = -1  # no colour dominates: plain normalised convolution
    reach = 0 if guide < 0 else max([radii[guide]] + [f.radius for f in fallbacks[guide]])
    radius = max(r + (reach if c != guide else 0) for c, r in enumerate(radii))
    masks.flags.writeable = False
    inv.flags.writeable = False
    measured = masks.astype(np.uint8)
    measured.flags.writeable = False
    return _Plan(masks, measured, tuple(kernels), inv, tuple(fallbacks), guide, reach, radius)


#: weight of the guide colour's correction (0: plain normalised convolution, 1: interpolate
#: colour differences); 1/2 as in Malvar et al.'s gain for correcting green by red's Laplacian
GUIDE_GAIN = 0.5
_BAND_ROWS = 64


def _demosaic_periodic(m: np.ndarray, cfa: str, guide=None) -> list[np.ndarray]:
    """Normalised-convolution demosaic of any periodic three-colour CFA (module docstring).

    The guide colour (green: 20 of X-Trans's 36 photosites) is the plain normalised convolution
    ``G^``. Each other colour ``C`` adds a correction from it, after Malvar et al.'s gradient
    correction of bilinear demosaicing::

        C^ = NC_C(m) + g (G^ - NC_C(G^)),   g = guide (default GUIDE_GAIN; or one per colour)

    ``NC_C`` being the normalised convolution over C's photosites: where C varies like G, the
    term cancels the error that C's sparse, off-centre samples make (at g = 1 the colour
    difference C - G is interpolated instead of C). It vanishes on flat colour, keeps measured
    photosites exact and keeps the result linear in the data (OLAT superposition holds); it widens
    the support to 5x5 for X-Trans (:func:`saturation_rgb` with ``cfa``). Measured: a
    noise-free twin capture with X-Trans cameras ingests with median error 0.67 % (1.01 %
    without it; tests/test_xtrans.py), colours sharing a texture with half the red/blue error.
    But ChArUco corners refitted on X-Trans images come out better without it (the twin's demo
    rig: camera centres <= 0.42 mm at ``guide=0`` vs 1.00 mm at 0.5, Bayer 0.41 mm): geometric
    calibration should pass ``guide=0``."""
    H, W = m.shape
    plan = _periodic_plan(cfa, H, W)
    out = np.empty((3, H, W), np.float32)
    gains = np.broadcast_to(np.asarray(GUIDE_GAIN if guide is None else guide, np.float32), (3,))
    order = ([plan.guide] if plan.guide >= 0 else []) + [c for c in range(3) if c != plan.guide]
    for c in order:  # the guide first: the others read it
        guided = plan.guide >= 0 and c != plan.guide
        g = gains[c]
        G = out[plan.guide] if guided else None
        k, r = plan.kernels[c], plan.kernels[c].shape[0] // 2
        # row bands: a band's few working planes stay in cache (2x faster at 24 MP than whole
        # planes); each band reads r rows beyond it so that its own rows are exact
        for y0 in range(0, H, _BAND_ROWS):
            y1 = min(H, y0 + _BAND_ROWS)
            a, b = max(0, y0 - r), min(H, y1 + r)
            dst = out[c, y0:y1]
            # D = (m - g G^) on C's photosites: NC_C(D) = NC_C(m) - g NC_C(G^)
            d = cv2.multiply(cv2.scaleAdd(G[a:b], -g, m[a:b]) if guided else m[a:b],
                             plan.masks[c, a:b])
            cv2.multiply(_conv0(d, k)[y0 - a:y1 - a], plan.inv[c, y0:y1], dst=dst)  # 0 where measured
            if guided:
                cv2.scaleAdd(G[y0:y1], float(g), dst, dst=dst)
                cv2.copyTo(m[y0:y1], plan.measured[c, y0:y1], dst)  # measured: exact value
            else:
                cv2.add(dst, d[y0 - a:y1 - a], dst=dst)  # + m at measured photosites
        for f in plan.fallbacks[c]:  # the few border pixels with a widened tent
            ms = m[f.src]
            d = (ms - g * G[f.src] if guided else ms) * plan.masks[c][f.src]
            out[c][f.out] += _conv0(np.ascontiguousarray(d, np.float32),
                                    _tent(f.radius))[f.crop] * f.inv
    return [out[0], out[1], out[2]]


def demosaic_planes(mosaic: np.ndarray, cfa: str, guide=None) -> list[np.ndarray]:
    """Demosaic as three ``(H, W)`` float32 planes (R, G, B); equal to
    :func:`demosaic_bilinear`.

    For a 2x2 Bayer CFA the normalised convolution's denominator (the kernel summed over a
    colour's photosites) is exactly 1 at every pixel, borders included: the bilinear kernels
    weigh each colour's neighbours to a sum of 1, and ``BORDER_REFLECT_101`` mirrors about the
    edge photosite, which keeps the pattern's parity. So one ``filter2D`` per colour suffices.
    Other periodic CFAs (X-Trans) divide by the precomputed, periodic denominator instead, and
    take ``guide`` (module docstring; :func:`demosaic_bilinear`)."""
    m = np.asarray(mosaic, np.float32)
    H, W = m.shape
    if cfa not in _CFA:
        return _demosaic_periodic(m, cfa, guide)
    if H < 2 or W < 2:
        return list(demosaic_bilinear(m, cfa))
    masks = _cfa_masks_cached(cfa, H, W)
    return [cv2.filter2D(cv2.multiply(m, masks[c]), cv2.CV_32F, _K_G if c == 1 else _K_RB,
                         borderType=cv2.BORDER_REFLECT_101) for c in range(3)]


def demosaic_bilinear(mosaic: np.ndarray, cfa: str, guide=None) -> np.ndarray:
    """Bilinear demosaic of a float CFA mosaic.

    Parameters
    ----------
    mosaic : ndarray ``(H, W)`` float
    cfa : CFA pattern from the top-left photosite: a Bayer ``"RGGB"`` ..., or X-Trans or any
        periodic pattern in :mod:`lightstage.cfa` spelling (normalised convolution with the
        bilinear tent, widened where a border window lacks a colour).
    guide : float or (3,) floats, optional
        Non-Bayer CFAs only: gain of the green-guided correction of red and blue (default
        :data:`GUIDE_GAIN` = 0.5; 0 = plain normalised convolution, which geometric calibration
        should use; the white balance ``neutral_c / neutral_G`` per colour interpolates colour
        differences). Bayer patterns are always plain bilinear.

    Returns
    -------
    ndarray ``(3, H, W)`` float32 camera RGB, channel-planar (the store's layout). Measured
    photosites keep their exact value; the missing ones are the tent-weighted mean of their
    nearest same-colour neighbours.
    """
    m = np.asarray(mosaic, np.float32)
    if cfa not in _CFA:
        return np.stack(_demosaic_periodic(m, cfa, guide))  # planes are views of one array
    H, W = m.shape
    masks = cfa_masks(cfa, H, W)
    out = np.empty((3, H, W), np.float32)
    for c in range(3):
        out[c] = _nconv(m, masks[c], _K_G if c == 1 else _K_RB)
    return out


def saturation_rgb(saturated: np.ndarray, cfa: str | None = None) -> np.ndarray:
    """Pixel-level saturation after demosaic: a pixel is untrusted when any photosite of the
    demosaic's support around it is saturated. ``(H, W)`` bool.

    The support is the 3x3 neighbourhood for Bayer (the bilinear kernels; ``cfa`` None or a
    Bayer pattern). Give ``cfa`` for any other pattern: for X-Trans the support is 5x5 in the
    interior (green's 3x3 around each photosite of a 3x3 window, through the green guide) and
    up to 7x7 at the few border pixels whose tent was widened (:func:`demosaic_planes`)."""
    s = np.asarray(saturated, np.uint8)
    if cfa is None or cfa in _CFA:
        return cv2.dilate(s, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REFLECT_101) > 0
    H, W = s.shape
    plan = _periodic_plan(cfa, H, W)
    r = plan.radius
    out = cv2.dilate(s, np.ones((2 * r + 1, 2 * r + 1), np.uint8),
                     borderType=cv2.BORDER_REFLECT_101) > 0
    # border pixels with a widened window, plus the guide's own reach around each photosite in
    # it (few pixels, and a frame needs this only when a photosite clipped in every exposure)
    wide: dict[int, list] = {}
    for c, fbs in enumerate(plan.fallbacks):
        for f in fbs:
            wide.setdefault(f.radius + (plan.reach if c != plan.guide else 0), []).append(f)
    for rr, fbs in sorted(wide.items()):
        d = cv2.dilate(s, np.ones((2 * rr + 1, 2 * rr + 1), np.uint8),
                       borderType=cv2.BORDER_REFLECT_101) > 0
        for f in fbs:
            out[f.out] |= d[f.out] & (f.inv > 0)
    return out


def mosaic_from_rgb(rgb: np.ndarray, cfa: str) -> np.ndarray:
    """Sample a channel-planar ``(3, H, W)`` image through a CFA (Bayer, X-Trans, any periodic
    pattern) -> ``(H, W)`` mosaic (test helper and the inverse of :func:`demosaic_bilinear` at
    measured photosites)."""
    masks = cfa_masks(cfa, rgb.shape[1], rgb.shape[2])
    return (np.asarray(rgb, np.float32) * masks).sum(0)
