"""Motion compensation of an OLAT sequence from its fully lit tracking frames.

A subject moves slightly during a capture. The stage interleaves fully lit *tracking frames*
between OLAT frames; since every OLAT frame is lit by a single light, its appearance changes
too much from frame to frame for direct registration, but the tracking frames all look alike.
So, per camera:

1. the reference is a central tracking frame (fewest frames away from the rest);
2. dense optical flow ``F_j`` from the reference to every tracking frame ``j`` (OpenCV DIS on
   a tone-mapped uint8 luminance, every frame mapped with the *reference's* tone curve so
   brightness constancy holds), plus the backward flow for a forward-backward consistency test;
3. an OLAT frame captured at time ``t`` between tracking frames ``a`` and ``b`` gets the flow
   ``(1 - s) F_a + s F_b`` with ``s = (t - t_a) / (t_b - t_a)`` (motion linear in time between
   two tracking frames, frames equally spaced in time);
4. the OLAT image is resampled into the reference frame, ``aligned(x) = olat(x + F(x))``
   (``cv2.remap``, bilinear), and its validity is the AND of both endpoint consistency masks,
   the source pixel lying inside the image, and the source sample's own validity.

Flow convention: ``F`` has shape ``(H, W, 2)`` (dx, dy) in pixels and maps reference pixel
``x`` to ``x + F(x)`` in the other frame, i.e. ``ref(x) ~= other(x + F(x))``.

Tone mapping here only feeds the flow estimator; the stored radiance is never tone mapped.

References
----------
Kroeger, T., Timofte, R., Dai, D., Van Gool, L. (2016). Fast Optical Flow using Dense Inverse
Search. ECCV.
Sundaram, N., Brox, T., Keutzer, K. (2010). Dense point trajectories by GPU-accelerated large
displacement optical flow. ECCV (forward-backward consistency check).
Wenger, A. et al. (2005). Performance relighting and reflectance transformation with
time-multiplexed illumination. SIGGRAPH (tracking frames, flow interpolated to OLAT frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

__all__ = [
    "FlowConfig",
    "luminance",
    "tone_u8",
    "tone_white",
    "compute_flow",
    "homography_flow",
    "fb_consistency",
    "interpolate_flow",
    "bracketing",
    "warp",
    "reference_index",
    "encode_flow",
    "decode_flow",
    "flow_grid_shape",
    "warp_maps",
    "warp_planes",
    "FLOW_STORAGE_RULE",
]

#: how a stored flow is turned back into a per-pixel flow (recorded in the store's attributes)
FLOW_STORAGE_RULE = (
    "flow[c, j] is stored as float16 on a grid subsampled by `stride` (array attribute): cell "
    "(i, k) holds the mean of the full-resolution flow over pixels [i*stride, (i+1)*stride) x "
    "[k*stride, (k+1)*stride) (edge-replicated past the image). The per-pixel flow is the "
    "half-pixel-centred bilinear upsampling of that grid by `stride` (source coordinate "
    "(y + 0.5) / stride - 0.5, clamped at the edges; cv2.resize INTER_LINEAR, "
    "torch interpolate align_corners=False) cropped to (H, W). float16 keeps 11 significant "
    "bits: steps of at most 1/64 px for |flow| < 32 px, 1/32 px below 64 px."
)

_LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # Rec.709 luminance weights


@dataclass
class FlowConfig:
    """Optical-flow settings.

    ``preset``: DIS preset name (ultrafast|fast|medium); ``fb_threshold``: forward-backward
    error (px) above which a pixel is inconsistent (plus ``fb_relative`` x flow magnitude);
    ``downscale``: estimate the flow on an image downscaled by this integer factor (for 4K
    frames) and upsample it; ``upsample``: estimate on an image upsampled by this factor
    (DIS under-estimates sub-pixel motion on small images: 2 helps below ~512 px);
    ``model``: ``"dense"`` keeps the per-pixel flow (non-rigid motion: expressions, blinks),
    ``"homography"`` replaces it by a RANSAC homography fitted to the dense flow over the
    foreground (a rigid head seen from one camera; robust where the skin has little texture)."""

    preset: str = "medium"
    fb_threshold: float = 0.5
    fb_relative: float = 0.05
    downscale: int = 1
    upsample: int = 1
    variational_iterations: int = 5
    model: str = "dense"


def luminance(rgb_planar: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` linear RGB -> ``(H, W)`` float32 Rec.709 luminance."""
    rgb = np.asarray(rgb_planar, np.float32)
    return np.matmul(_LUMA, rgb.reshape(3, -1)).reshape(rgb.shape[1:])


def tone_white(lum: np.ndarray) -> float:
    """The tone curve's white point for a camera: the 99.5th percentile of the reference
    frame's luminance (fixed for all frames of that camera)."""
    w = float(np.percentile(lum, 99.5))
    return w if w > 0 else float(lum.max() or 1.0)


def tone_u8(lum: np.ndarray, white: float) -> np.ndarray:
    """Flow-only tone map: ``255 * (Y / white) ** (1/2.2)`` clipped, uint8 (DIS takes uint8)."""
    t = np.clip(lum / np.float32(white), 0, 1) ** np.float32(1 / 2.2)
    return (t * 255 + 0.5).astype(np.uint8)


_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
            "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
            "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def compute_flow(ref_u8: np.ndarray, other_u8: np.ndarray, cfg: FlowConfig | None = None,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Flow ``(H, W, 2)`` float32 with ``ref(x) ~= other(x + F(x))`` (DIS; optionally reduced
    to a homography fitted over ``mask``, the reference's foreground, see :class:`FlowConfig`)."""
    cfg = cfg or FlowConfig()
    if cfg.preset not in _PRESETS:
        raise ValueError(f"flow preset must be one of {sorted(_PRESETS)}, got {cfg.preset!r}")
    if cfg.model not in ("dense", "homography"):
        raise ValueError(f"flow model must be 'dense' or 'homography', got {cfg.model!r}")
    H, W = ref_u8.shape
    a, b = ref_u8, other_u8
    s = max(1, int(cfg.downscale))
    u = max(1, int(cfg.upsample))
    if s > 1:
        a = cv2.resize(a, (W // s, H // s), interpolation=cv2.INTER_AREA)
        b = cv2.resize(b, (W // s, H // s), interpolation=cv2.INTER_AREA)
    elif u > 1:
        a = cv2.resize(a, (W * u, H * u), interpolation=cv2.INTER_CUBIC)
        b = cv2.resize(b, (W * u, H * u), interpolation=cv2.INTER_CUBIC)
    dis = cv2.DISOpticalFlow_create(_PRESETS[cfg.preset])
    dis.setVariationalRefinementIterations(int(cfg.variational_iterations))
    flow = dis.calc(np.ascontiguousarray(a), np.ascontiguousarray(b), None)
    if s > 1:
        flow = cv2.resize(flow, (W, H), interpolation=cv2.INTER_LINEAR) * np.float32(s)
    elif u > 1:
        flow = cv2.resize(flow, (W, H), interpolation=cv2.INTER_AREA) / np.float32(u)
    flow = flow.astype(np.float32)
    if cfg.model == "homography":
        flow = homography_flow(flow, mask)
    return flow


def homography_flow(flow: np.ndarray, mask: np.ndarray | None = None,
                    threshold: float = 0.5) -> np.ndarray:
    """The flow field of a homography fitted (RANSAC, ``threshold`` px) to ``flow`` over
    ``mask`` (all pixels when None); the input flow is returned when the fit fails."""
    H, W = flow.shape[:2]
    gx, gy = _grid(H, W)
    sel = np.ones((H, W), bool) if mask is None else np.asarray(mask, bool)
    if sel.sum() < 16:
        return flow
    src = np.stack([gx[sel], gy[sel]], 1)
    dst = src + flow[sel]
    Hm, _ = cv2.findHomography(src, dst, cv2.RANSAC, threshold)
    if Hm is None:
        return flow
    p = cv2.perspectiveTransform(np.stack([gx, gy], -1).reshape(-1, 1, 2).astype(np.float64), Hm)
    return (p.reshape(H, W, 2) - np.stack([gx, gy], -1)).astype(np.float32)


@lru_cache(maxsize=4)
def _grid_cached(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    gx.flags.writeable = False
    gy.flags.writeable = False
    return gx, gy


def _grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids (read-only, cached: every warp of a camera uses the same)."""
    return _grid_cached(int(H), int(W))


def fb_consistency(fwd: np.ndarray, bwd: np.ndarray, threshold: float = 0.5,
                   relative: float = 0.05) -> np.ndarray:
    """Forward-backward check: ``|F(x) + B(x + F(x))| < threshold + relative * |F(x)|``.

    ``fwd`` maps reference -> other, ``bwd`` other -> reference, both ``(H, W, 2)``.
    Returns ``(H, W)`` bool (False also where ``x + F(x)`` leaves the image)."""
    H, W = fwd.shape[:2]
    gx, gy = _grid(H, W)
    mx, my = gx + fwd[..., 0], gy + fwd[..., 1]
    b = cv2.remap(bwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = np.hypot(fwd[..., 0] + b[..., 0], fwd[..., 1] + b[..., 1])
    inside = (mx >= 0) & (mx <= W - 1) & (my >= 0) & (my <= H - 1)
    return inside & (err < threshold + relative * np.hypot(fwd[..., 0], fwd[..., 1]))


def reference_index(n_tracking: int) -> int:
    """Index of the central tracking frame (the reference)."""
    if n_tracking < 1:
        raise ValueError("motion compensation needs at least one tracking frame")
    return (n_tracking - 1) // 2


def bracketing(frame: int, tracking_frames: list[int]) -> tuple[int, int, float]:
    """Tracking frames around sequence index ``frame``: ``(ia, ib, s)`` indices into
    ``tracking_frames`` and the interpolation weight of ``ib``; clamped outside the range."""
    tf = list(tracking_frames)
    if not tf:
        raise ValueError("no tracking frames")
    if frame <= tf[0]:
        return 0, 0, 0.0
    if frame >= tf[-1]:
        return len(tf) - 1, len(tf) - 1, 0.0
    ib = next(i for i, t in enumerate(tf) if t >= frame)
    ia = ib - 1
    return ia, ib, (frame - tf[ia]) / (tf[ib] - tf[ia])


def interpolate_flow(fa: np.ndarray, fb: np.ndarray, s: float) -> np.ndarray:
    """Linear-in-time flow between two tracking frames: ``(1 - s) fa + s fb``."""
    if s == 0.0:
        return fa
    return (np.float32(1 - s) * fa + np.float32(s) * fb).astype(np.float32)


def flow_grid_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """Shape of the stored flow grid for an image of ``height`` x ``width``."""
    s = max(1, int(stride))
    return -(-height // s), -(-width // s)


def encode_flow(flow: np.ndarray, stride: int = 1) -> np.ndarray:
    """``(H, W, 2)`` float32 flow -> ``(2, h, w)`` float16 storage grid (see
    :data:`FLOW_STORAGE_RULE`): block means over ``stride`` x ``stride`` pixels."""
    H, W = flow.shape[:2]
    s = max(1, int(stride))
    f = np.asarray(flow, np.float32)
    if s > 1:
        h, w = flow_grid_shape(H, W, s)
        if (h * s, w * s) != (H, W):
            f = cv2.copyMakeBorder(f, 0, h * s - H, 0, w * s - W, cv2.BORDER_REPLICATE)
        f = f.reshape(h, s, w, s, 2).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    out = np.moveaxis(f, -1, 0)
    return np.clip(out, -65504, 65504).astype(np.float16)


def decode_flow(grid: np.ndarray, height: int, width: int, stride: int = 1) -> np.ndarray:
    """Stored ``(2, h, w)`` flow grid -> ``(H, W, 2)`` float32 per-pixel flow (the inverse of
    :func:`encode_flow` up to the documented rule: bilinear, half-pixel centres)."""
    g = np.ascontiguousarray(np.moveaxis(np.asarray(grid, np.float32), 0, -1))
    s = max(1, int(stride))
    if s == 1:
        return g[:height, :width]
    h, w = g.shape[:2]
    up = cv2.resize(g, (w * s, h * s), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(up[:height, :width])


def warp_maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling maps ``x + F(x)`` for :func:`warp_planes` and the ``(H, W)`` uint8 mask (255)
    of reference pixels whose source lies inside the image."""
    H, W = flow.shape[:2]
    gx, gy = _grid(H, W)
    mx = cv2.add(gx, np.ascontiguousarray(flow[..., 0]))
    my = cv2.add(gy, np.ascontiguousarray(flow[..., 1]))
    inside = cv2.bitwise_and(cv2.inRange(mx, 0.0, float(W - 1)), cv2.inRange(my, 0.0, float(H - 1)))
    return mx, my, inside


def warp_planes(planes, mx: np.ndarray, my: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> list:
    """Resample each ``(H, W)`` plane with maps from :func:`warp_maps` (same as :func:`warp`)."""
    return [cv2.remap(np.ascontiguousarray(p), mx, my, interpolation,
                      borderMode=cv2.BORDER_REPLICATE) for p in planes]


def warp(img: np.ndarray, flow: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``img`` into the reference frame: ``out(x) = img(x + F(x))``.

    Parameters
    ----------
    img : ``(C, H, W)`` channel-planar or ``(H, W)`` array.
    flow : ``(H, W, 2)``.

    Returns
    -------
    out : same shape and dtype class as ``img`` (float32 for float input)
    inside : ``(H, W)`` bool, the source position lies inside the image.
    """
    H, W = flow.shape[:2]
    gx, gy = _grid(H, W)
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    inside = (mx >= 0) & (mx <= W - 1) & (my >= 0) & (my <= H - 1)
    if img.ndim == 2:
        out = cv2.remap(img, mx, my, interpolation, borderMode=cv2.BORDER_REPLICATE)
    else:
        out = np.empty_like(img)
        for c in range(img.shape[0]):  # planar: remap each plane (no HWC transpose copies)
            out[c] = cv2.remap(np.ascontiguousarray(img[c]), mx, my, interpolation,
                               borderMode=cv2.BORDER_REPLICATE)
    return out, inside
