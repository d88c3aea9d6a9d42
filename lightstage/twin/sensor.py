"""The twin's camera sensor: scene radiance -> raw CFA mosaic (DN; Bayer, X-Trans or any periodic
CFA of :mod:`lightstage.cfa`), and the exact inverse ("ground-truth calibration") that ingest and
calibration must recover.

Forward model for one camera and one exposure (all linear)::

    cam(x)    = M @ rgb(x)                      M = Sensor.colour_response, rgb linear Rec.709
    s(x)      = cam(x) * (1 - v r(x)^2)         vignetting, r = |x - principal point| / half-diagonal
    dn(x)     = s(x) * t * g / full_scale * (white - black)     expected DN above black
    raw(x)    = clip(round(dn_c(x) + noise) + black, 0, white)  c = CFA colour of pixel x

Noise: shot noise is Poisson in electrons, ``electrons = dn * electrons_per_dn`` (the
conversion factor of the sensor *at its configured gain*), plus Gaussian read noise of
``read_noise_dn``, so ``Var[raw] = dn / electrons_per_dn + read_noise_dn^2`` (+ 1/12 from
rounding) away from clipping. ``noise=False`` gives the rounded expected value exactly.

The inverse, as :mod:`lightstage.calibfile` defines it: with the exposure-normalised camera value
``c = (raw - black) / (white - black) / (t * g)`` and vignetting divided out,
``rgb = full_scale * inv(M) @ c``; so the true ``colour_matrix`` is ``full_scale * inv(M)`` and
the true ``vignetting`` is ``[-v, 0]``. Light ``rgb`` is the irradiance a light delivers at the
rig centre, ``colour * intensity / |position|^2`` (what "per unit light" divides out).

Noise is reproducible: every image draws from its own generator seeded by
``SeedSequence([seed, *keys])`` (subject, camera, frame, bracket), never from shared state, so
results do not depend on process scheduling or worker count.

References
----------
Healey, G. E. & Kondepudy, R. (1994). Radiometric CCD camera calibration and noise estimation.
    IEEE TPAMI 16(3). (Poisson shot + Gaussian read noise model.)
EMVA Standard 1288 (2016), release 3.1: linear sensor model, photon transfer.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..calibfile import Calibration, CameraCalibration, LightCalibration
from ..cfa import CFA_INDEX, cfa_index_map, parse_cfa
from ..dng import DNGMetadata, colour_tags_from_response
from ..rig import Camera, Rig

__all__ = [
    "CFA_INDEX",
    "cfa_channels",
    "vignetting_gain",
    "dn_scale",
    "expected_dn",
    "mosaic_raw",
    "simulate_raw",
    "noise_rng",
    "dng_metadata",
    "light_irradiance",
    "truth_calibration",
]

_NOISE_BLOCK = 1 << 20  # photosites per block of the noise draw (bounds its temporaries)


def cfa_channels(pattern: str, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 colour index (0 R, 1 G, 2 B) of every photosite for a CFA pattern: 2x2
    Bayer (``"RGGB"`` ...), X-Trans or any periodic pattern (:mod:`lightstage.cfa`)."""
    return cfa_index_map(pattern, height, width)


def vignetting_gain(camera: Camera) -> np.ndarray:
    """(H, W) float32 radial gain ``1 - v r^2``, r = distance from the principal point (K)
    over the half-diagonal of the image (calibfile ``vignetting = [-v, 0]``)."""
    H, W = camera.resolution
    K = camera.K_array
    v = float(camera.sensor.vignetting)
    half_diag2 = (W * W + H * H) / 4.0
    y2 = ((np.arange(H, dtype=np.float64) - K[1, 2]) ** 2)[:, None]
    x2 = ((np.arange(W, dtype=np.float64) - K[0, 2]) ** 2)[None, :]
    return (1.0 - v * (x2 + y2) / half_diag2).astype(np.float32)


def dn_scale(camera: Camera, exposure: float) -> float:
    """DN above black per unit of (vignetted) camera RGB: ``t g (white - black) / full_scale``."""
    s = camera.sensor
    return float(exposure) * s.gain * (s.white_level - s.black_level) / s.full_scale


def expected_dn(radiance: np.ndarray, camera: Camera, exposure: float,
                vignetting: np.ndarray | None = None) -> np.ndarray:
    """Expected signal above black (float32 DN, unrounded, unclipped) at every photosite.

    Parameters
    ----------
    radiance : (H, W, 3) linear Rec.709 scene radiance seen by the camera
    camera : the rig camera (its sensor and K)
    exposure : exposure time in seconds
    vignetting : optional precomputed :func:`vignetting_gain` (saves time on big sensors)

    Returns
    -------
    (H, W) float32
    """
    H, W = camera.resolution
    radiance = np.asarray(radiance)
    if radiance.shape != (H, W, 3):
        raise ValueError(f"camera {camera.name}: radiance has shape {radiance.shape}, "
                         f"expected {(H, W, 3)}")
    M = np.asarray(camera.sensor.colour_response, dtype=np.float32)
    period = parse_cfa(camera.sensor.cfa_pattern)  # (2, 2) Bayer, (6, 6) X-Trans ...
    n, m = period.shape
    out = np.empty((H, W), dtype=np.float32)
    # mosaic first: each phase of the pattern needs only one row of M, so only 1/(n m) of the
    # pixels are touched per phase and no (H, W, 3) camera image is ever materialised
    for k, ch in enumerate(period.reshape(-1)):
        dy, dx = divmod(k, m)
        out[dy::n, dx::m] = radiance[dy::n, dx::m].astype(np.float32, copy=False) @ M[int(ch)]
    out *= vignetting if vignetting is not None else vignetting_gain(camera)
    out *= np.float32(dn_scale(camera, exposure))
    return out


def mosaic_raw(dn: np.ndarray, camera: Camera, rng: np.random.Generator | None = None) -> np.ndarray:
    """Expected DN above black -> raw uint16 mosaic (noise if ``rng`` is given, rounding,
    black level, clipping at the white level)."""
    s = camera.sensor
    dn = np.asarray(dn)
    sig = dn.astype(np.float32, copy=True)
    flat = sig.reshape(-1)
    # row blocks keep the float64/int64 temporaries of a 4096x2160 frame small; the draws
    # are made in the same element order as one whole-array call (all Poisson, then all
    # Gaussian), so the result does not depend on the block size
    step = _NOISE_BLOCK
    if rng is not None:
        e = s.electrons_per_dn
        for i in range(0, flat.size, step):
            lam = np.clip(flat[i:i + step], 0, None).astype(np.float64) * e
            flat[i:i + step] = rng.poisson(lam).astype(np.float32) * np.float32(1.0 / e)
        if s.read_noise_dn > 0:
            for i in range(0, flat.size, step):
                n = min(step, flat.size - i)
                flat[i:i + n] += rng.standard_normal(n, dtype=np.float32) * np.float32(s.read_noise_dn)
    out = np.empty(dn.shape, np.uint16)
    o = out.reshape(-1)
    for i in range(0, flat.size, step):
        b = flat[i:i + step]
        b += np.float32(s.black_level)
        np.rint(b, out=b)
        np.clip(b, 0, s.white_level, out=b)
        o[i:i + step] = b
    return out


def simulate_raw(radiance: np.ndarray, camera: Camera, exposure: float,
                 rng: np.random.Generator | None = None, noise: bool = True,
                 vignetting: np.ndarray | None = None) -> np.ndarray:
    """Radiance (H, W, 3) -> raw CFA mosaic (H, W) uint16 for one exposure.

    With ``noise=False`` (or no ``rng``) the result is exactly
    ``clip(round(expected_dn) + black, 0, white)``.
    """
    dn = expected_dn(radiance, camera, exposure, vignetting)
    return mosaic_raw(dn, camera, rng if noise else None)


def _key_int(k) -> int:
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0:
        return int(k)
    # strings (subject/camera/shot names): a stable 64-bit hash, not Python's salted hash()
    return int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "little")


def noise_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent generator for one image, from ``SeedSequence([seed, *keys])``."""
    return np.random.default_rng(np.random.SeedSequence([_key_int(seed)] + [_key_int(k) for k in keys]))


def dng_metadata(camera: Camera, exposure: float, model: str = "twin") -> DNGMetadata:
    """The DNG tags a real camera would record for this sensor and exposure."""
    s = camera.sensor
    cm, neutral = colour_tags_from_response(s.colour_response)
    return DNGMetadata(
        cfa_pattern=s.cfa_pattern, black_level=int(s.black_level), white_level=int(s.white_level),
        exposure_time=float(exposure), f_number=float(s.f_number), iso=int(s.iso),
        colour_matrix1=cm, as_shot_neutral=neutral, make="lightstage", model=model,
        unique_camera_model=f"lightstage {model} {camera.name}",
    )


def light_irradiance(rig: Rig, lights: Sequence[int] | None = None) -> np.ndarray:
    """(N, 3) RGB irradiance each light delivers at the rig centre, facing it:
    ``colour * intensity / |position|^2``."""
    idx = range(rig.n_lights) if lights is None else lights
    out = []
    for i in idx:
        l = rig.lights[i]
        p = np.asarray(l.position, dtype=np.float64)
        out.append(np.asarray(l.colour, dtype=np.float64) * l.intensity / float(p @ p))
    return np.asarray(out).reshape(-1, 3)


def truth_calibration(rig: Rig, world2head: np.ndarray | None = None,
                      provenance: dict | None = None) -> Calibration:
    """The twin's exact calibration of ``rig`` in the lightstage-calibration format."""
    cams = {}
    for c in rig.cameras:
        s = c.sensor
        M = np.asarray(s.colour_response, dtype=np.float64)
        cams[c.name] = CameraCalibration(
            K=c.K_array.copy(),
            distortion=np.asarray(c.distortion, dtype=np.float64),
            cam2world=c.cam2world_array.copy(),
            image_size=(s.height, s.width),
            colour_matrix=s.full_scale * np.linalg.inv(M),
            colour_method="matrix-3x3",
            vignetting=np.array([-float(s.vignetting), 0.0]),
            residuals={},
        )
    E = light_irradiance(rig)
    lights = [LightCalibration(index=l.index, direction=l.direction, rgb=E[i],
                               position=np.asarray(l.position, dtype=np.float64))
              for i, l in enumerate(rig.lights)]
    return Calibration(rig=rig.name, cameras=cams, lights=lights, source="twin-ground-truth",
                       world2head=None if world2head is None else np.asarray(world2head, np.float64),
                       provenance=dict(provenance or {}))
