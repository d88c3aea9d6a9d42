"""``ls-ingest``: raw multi-view OLAT captures -> calibrated, motion-compensated Zarr v3 store.

Per image (one camera, one frame) the pipeline is (for Bayer brackets two cache-blocked passes
of :mod:`lightstage._fused`: merge + demosaic + vignetting + colour matrix, with the
per-unit-light and storage scale folded into the 3x3 mix, then warp + float16 + validity; the
OpenCV path it is checked against serves X-Trans, other CFAs and machines without numba)::

    raw DNG bracket --rawpy--> normalised CFA mosaics + saturation masks     (lightstage.raw)
      --merge (exposure x gain normalised, saturation aware)--> HDR mosaic   (lightstage.hdr)
      --bilinear demosaic--> camera RGB --/ vignetting--> --colour matrix--> linear Rec.709
      --/ light rgb--> radiance per unit light --warp to the reference--> store

Camera RGB here is exactly what the calibration file's ``colour_matrix`` expects:
``(DN - black) / (white - black) / (exposure * ISO/100)`` divided by the vignetting polynomial
``1 + a1 r^2 + a2 r^4`` (r = distance to the principal point over the half-diagonal).

Scheduling. Work is split into one task per camera (its tracking frames: decode, optical flow
from the reference to every tracking frame, stored motion-compensated with the flows and a
foreground mask) and one task per (camera, OLAT frame) (decode, merge, colour, warp with the
flow interpolated in time); on a Dask cluster a few OLAT images of one camera go in one task
(:func:`olat_batch_task`) so the scheduler's per-task cost stays small next to the work, and a
camera's OLAT tasks are submitted together when its tracking task reports (they depend only on
the scattered take spec, so the scheduler queues them and hands them to free workers). Each
task writes whole shards only (one image = one shard, through
:func:`lightstage.store.write_image`, which encodes the shard itself and renames it into place,
~2x faster than zarr's own write path and byte-identical to it), so no two writers ever touch
the same shard; small shared arrays (``done``, checksums) are written
only by the driving process, after the task that wrote the image has returned. Tasks run in
process (``workers=0``), on a ``LocalCluster`` of spawned worker processes (``workers=N``), or on
an existing Dask scheduler (``scheduler="tcp://..."``): the stored bytes are identical.

Resume. ``done[c, l]`` is 1 only once image (c, l) and its validity mask are fully written and
their checksum recorded; 2 marks an image skipped because its input was bad (``skip_bad``; the
file is listed in ``provenance.skipped``). A rerun with the same inputs and options continues
where an interrupted run stopped; with other inputs or options it refuses unless
``overwrite``.

Arrays added by ingest next to the store's standard ones (``lightstage.store``)::

    flow            (camera, tracking_frame, component, fy, fx)  float16  reference -> frame (dx, dy)
                    on a grid subsampled by the array's ``stride`` attribute (rule in its
                    ``rule`` attribute; :func:`read_flow` gives the per-pixel flow)
    flow_valid      (camera, tracking_frame, y, x)   uint8  flow forward-backward consistent
                                                     and inside the frame (255)
    tracking_ok     (camera, tracking_frame)         uint8  1 = tracking frame decoded
    tracking_done   (camera,)                        uint8  1 = camera's tracking phase complete
    checksum        (camera, light)                  uint64 CRC32C of olat + valid bytes
    tracking_checksum (camera, tracking_frame)       uint64 CRC32C of the tracking image
                    (stores written before CRC32C hold blake2b-64; ``ingest.checksum`` says which)

Conventions recorded in the attributes (``ingest``): the tracking frames are stored aligned to
the reference and divided by the mean light rgb; ``mask`` is 255 where the reference tracking
frame's luminance exceeds ``mask_threshold`` x its 99.5th percentile (255 everywhere for a take
without tracking frames, which only ``motion=False`` accepts).

References
----------
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
Wenger, A. et al. (2005). Performance relighting and reflectance transformation with
time-multiplexed illumination. SIGGRAPH.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import zarr

from . import _fused, align
from .calibfile import Calibration, CameraCalibration, load_calibration
from .hdr import merge_bracket, merge_raw_snr
from .manifest import CaptureManifest, find_manifests, load_manifest, sha256_file
from .raw import RawError, RawFrame, demosaic_planes, read_raw, saturation_rgb
from .rig import rig_to_dict
from .store import (STORE_FORMAT, create_take, default_tile,
                    list_takes, provenance, write_image)

__all__ = [
    "IngestConfig",
    "IngestError",
    "IngestReport",
    "ingest",
    "verify_store",
    "choose_scale",
    "apply_colour",
    "vignetting_map",
    "process_frame",
    "image_checksum",
    "CHECKSUM_TEXT",
    "read_flow",
    "DONE_TODO",
    "DONE_WRITTEN",
    "DONE_SKIPPED",
]

DONE_TODO, DONE_WRITTEN, DONE_SKIPPED = 0, 1, 2
#: Dask settings for the LocalCluster ``ingest(workers=N)`` starts (see ``_make_client``)
LOCAL_CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False,
                        "distributed.admin.system-monitor.gil.enabled": False}
FLUSH_SECONDS = 3.0  # how often the driver persists done flags and checksums
F16_MAX = 65504.0


class IngestError(RuntimeError):
    """Ingest failed; the message names the take, file or frame."""


@dataclass
class IngestConfig:
    """Options of one ingest run.

    dtype : storage dtype, ``float16`` (default, with ``scale``) or ``float32``.
    scale : stored = radiance / scale; None picks it from the calibration (:func:`choose_scale`).
    skip_bad : bad raw files are recorded in provenance and their images marked skipped
        (``done = 2``) instead of failing the run.
    overwrite : replace existing takes (otherwise an existing take is resumed when it was made
        with the same inputs and options, and refused when not).
    subjects : only these subjects (None = all).
    rename : ``{"subject/take": "subject/take"}``: store the captured take(s) of that name
        under another group (a capture whose take is called like one already in the store
        can join it; two alike in one call are refused).
    motion : motion-compensate (False stores frames as captured, flows zero).
    check_hashes : verify each raw file against the manifest's sha256 before decoding.
    mask_threshold : foreground threshold as a fraction of the reference's 99.5th percentile.
    reference : the tracking frame every image is aligned to: ``"central"`` (default, fewest
        frames from the others), ``"first"``, or a position on the tracking axis.
    flow : optical-flow settings.
    flow_stride : flows are stored as float16 on a grid subsampled by this factor (block means;
        upsampled bilinearly, :data:`lightstage.align.FLOW_STORAGE_RULE`); every image is
        warped with the flow as stored. 4 keeps the residual misalignment well under 0.25 px
        on smooth head motion at 1/32 of full-resolution float32's size.
    saturation_margin : DN below the white level that still counts as saturated (None: auto).
    """

    dtype: str = "float16"
    scale: float | None = None
    skip_bad: bool = False
    overwrite: bool = False
    subjects: list[str] | None = None
    rename: dict[str, str] | None = None
    motion: bool = True
    check_hashes: bool = True
    mask_threshold: float = 0.05
    reference: str | int = "central"
    flow: align.FlowConfig = field(default_factory=align.FlowConfig)
    flow_stride: int = 4
    saturation_margin: float | None = None

    def fingerprint_dict(self) -> dict[str, Any]:
        """The options that change stored bytes (resume refuses if they differ)."""
        d = asdict(self)
        for k in ("skip_bad", "overwrite", "subjects", "check_hashes", "rename"):
            d.pop(k)
        return d


@dataclass
class IngestReport:
    """What a run did: per take, images written / skipped / already done; bad files."""

    store: str
    takes: list[str] = field(default_factory=list)
    written: int = 0
    resumed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


# ---- per-image maths ------------------------------------------------------------------------


def vignetting_map(cal: CameraCalibration, height: int, width: int) -> np.ndarray:
    """``(H, W)`` float32 radial gain ``1 + a1 r^2 + a2 r^4`` (r: distance to the principal
    point over the half-diagonal); raw camera RGB is divided by it."""
    a1, a2 = (float(x) for x in np.asarray(cal.vignetting, np.float64)[:2])
    K = np.asarray(cal.K, np.float64)
    hd2 = (width * width + height * height) / 4.0
    y2 = ((np.arange(height) - K[1, 2]) ** 2)[:, None]
    x2 = ((np.arange(width) - K[0, 2]) ** 2)[None, :]
    r2 = (x2 + y2) / hd2
    return (1.0 + a1 * r2 + a2 * r2 * r2).astype(np.float32)


def apply_colour(rgb: np.ndarray, cal: CameraCalibration) -> np.ndarray:
    """Camera RGB ``(3, H, W)`` -> working-space radiance ``(3, H, W)`` float32.

    ``matrix-3x3``: ``out = M @ rgb``. ``root-polynomial-<d>``: Finlayson et al. (2015) root
    polynomial terms of degree d (colour-science's term order) times ``colour_terms`` (N x 3),
    which is homogeneous of degree one, hence exposure invariant. As ls-calibrate writes it,
    ``colour_terms`` may hold only the (N - 3, 3) extra-term rows, the linear part being
    ``colour_matrix``: ``out = M @ rgb + colour_terms.T @ [sqrt(RG), sqrt(GB), sqrt(RB)]``.

    References
    ----------
    Finlayson, G. D., Mackiewicz, M., Hurlbert, A. (2015). Color correction using
    root-polynomial regression. IEEE TIP 24(5).
    """
    method = (cal.colour_method or "matrix-3x3").lower()
    if method in ("matrix-3x3", "matrix", "3x3"):
        M = np.asarray(cal.colour_matrix, np.float32)
        # a (3, 3) x (3, H*W) GEMM: ~10x faster here than tensordot's transposed copies
        return np.matmul(M, rgb.reshape(3, -1).astype(np.float32, copy=False)).reshape(rgb.shape)
    if method.startswith("root-polynomial"):
        from colour.characterisation import polynomial_expansion_Finlayson2015

        try:
            degree = int(method.rsplit("-", 1)[1])
        except ValueError:
            degree = 2
        if cal.colour_terms is None:
            raise IngestError(f"colour_method {cal.colour_method!r} needs colour_terms")
        T = np.asarray(cal.colour_terms, np.float64)
        _, H, W = rgb.shape
        flat = np.clip(rgb.reshape(3, -1).T.astype(np.float64), 0, None)
        ex = polynomial_expansion_Finlayson2015(flat, degree, root_polynomial_expansion=True)
        if T.shape == (ex.shape[1] - 3, 3):
            # calibfile convention (ls-calibrate): colour_matrix holds the linear part and
            # colour_terms only the (k, 3) coefficients of the extra root terms
            T = np.vstack([np.asarray(cal.colour_matrix, np.float64).T, T])
        if T.shape != (ex.shape[1], 3):
            if T.shape == (3, ex.shape[1]):
                T = T.T
            else:
                raise IngestError(f"colour_terms has shape {T.shape}; {cal.colour_method} needs "
                                  f"({ex.shape[1]}, 3)")
        return (ex @ T).T.reshape(3, H, W).astype(np.float32)
    raise IngestError(f"unsupported colour_method {cal.colour_method!r}")


#: checksum of new stores: CRC32C (hardware, ~30x blake2b here), recorded in the take's
#: attributes (``ingest.checksum``); stores written with blake2b-64 verify with blake2b
CHECKSUM_TEXT = "crc32c (little-endian uint64 holding the 32-bit value) of the stored olat bytes then valid bytes"


def image_checksum(*arrays: np.ndarray, algorithm: str = "crc32c") -> int:
    """Checksum of the arrays' bytes (as stored: dtype and C order), as an int:
    ``"crc32c"`` (default) or ``"blake2b"`` (64-bit, stores made before crc32c)."""
    if algorithm == "crc32c":
        import google_crc32c

        crc = 0
        for a in arrays:
            crc = google_crc32c.extend(crc, np.ascontiguousarray(a).tobytes())
        return int(crc)
    if algorithm != "blake2b":
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little")


def _checksum_algorithm(attrs: dict) -> str:
    """The algorithm a take's checksums were made with (from its ``ingest.checksum`` text)."""
    text = str((attrs.get("ingest") or {}).get("checksum", "blake2b"))
    return "crc32c" if text.startswith("crc32c") else "blake2b"


# ---- task payloads (small, picklable) -------------------------------------------------------


@dataclass
class _CamSpec:
    name: str
    height: int
    width: int
    calib: dict[str, Any]  # CameraCalibration fields as lists


@dataclass
class _FrameSpec:
    index: int
    kind: str
    light: int | None
    files: list[tuple[str, float, float, str | None]]  # (abs path, exposure, iso, sha256)


@dataclass
class _TakeSpec:
    store: str
    group: str
    cameras: list[_CamSpec]
    tracking: list[int]  # sequence frame index per tracking axis position
    olat: list[int]  # sequence frame index per light axis position
    light_rgb: list[list[float]]  # per light axis position
    mean_light_rgb: list[float]
    scale: float
    dtype: str
    motion: bool
    check_hashes: bool
    mask_threshold: float
    reference: int
    flow: dict[str, Any]
    saturation_margin: float | None
    frames: dict[int, dict[str, _FrameSpec]]  # frame index -> camera -> files
    run_id: str = ""  # one ingest call: keys the per-worker cache of opened arrays


def _calib_from(spec: _CamSpec) -> CameraCalibration:
    c = spec.calib
    return CameraCalibration(
        K=np.asarray(c["K"]), distortion=np.asarray(c["distortion"]),
        cam2world=np.asarray(c["cam2world"]), image_size=tuple(c["image_size"]),
        colour_matrix=np.asarray(c["colour_matrix"]), colour_method=c["colour_method"],
        colour_terms=None if c["colour_terms"] is None else np.asarray(c["colour_terms"]),
        vignetting=np.asarray(c["vignetting"]))


@lru_cache(maxsize=8)
def _vig_cached(key: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(vignetting map, its reciprocal) for a camera, computed once per worker."""
    d = json.loads(key)
    cal = CameraCalibration(K=np.asarray(d["K"]), distortion=np.zeros(5), cam2world=np.eye(4),
                            image_size=(height, width), colour_matrix=np.eye(3),
                            vignetting=np.asarray(d["v"]))
    v = vignetting_map(cal, height, width)
    inv = (1.0 / v.astype(np.float64)).astype(np.float32)
    v.flags.writeable = False
    inv.flags.writeable = False
    return v, inv


_CAM_CONTEXT: dict[int, tuple[_CamSpec, tuple, CameraCalibration]] = {}


def _camera_context(cam: _CamSpec) -> tuple[tuple[np.ndarray, np.ndarray], CameraCalibration]:
    """(vignetting map and reciprocal, calibration) of a camera, built once per camera object
    (a worker deserialises the take's spec once; small images would otherwise spend a real
    share of their time re-parsing the calibration per image)."""
    hit = _CAM_CONTEXT.get(id(cam))
    if hit is not None and hit[0] is cam:
        return hit[1], hit[2]
    c = cam.calib
    vig = _vig_cached(json.dumps({"K": c["K"], "v": c["vignetting"]}), cam.height, cam.width)
    cal = _calib_from(cam)
    if len(_CAM_CONTEXT) > 256:
        _CAM_CONTEXT.clear()
    _CAM_CONTEXT[id(cam)] = (cam, vig, cal)
    return vig, cal


def _read_checked(path: str, sha: str | None, check: bool, margin: float | None) -> RawFrame:
    p = Path(path)
    if not p.exists():
        raise RawError(f"{p}: no such raw file")
    if check and sha:
        # read once: the bytes that were hashed are the bytes decoded
        try:
            data = p.read_bytes()
        except OSError as e:
            raise RawError(f"{p}: cannot read ({e})") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise RawError(f"{p}: sha256 mismatch (file is {got[:12]}..., manifest says "
                           f"{sha[:12]}...): corrupt or truncated")
        return read_raw(p, margin=margin, normalise=False, data=data)
    return read_raw(p, margin=margin, normalise=False)


def _develop(cam: _CamSpec, frame: _FrameSpec, check_hashes: bool = True,
             saturation_margin: float | None = None,
             gain: np.ndarray | None = None) -> tuple[Any, np.ndarray | None]:
    """Decode, merge, demosaic, de-vignette and colour-correct one camera's frame.

    Returns three ``(H, W)`` float32 planes ``diag(gain) @ M @ (camera RGB / vignetting)`` (a
    list, or a ``(3, H, W)`` array from the fused kernel) and the pixel validity (``(H, W)``
    bool, or None when every pixel is valid). ``gain`` (3,) folds the per-unit-light and
    storage scale into the colour matrix, so a stored image costs no extra pass for them.
    The fused kernel serves Bayer brackets with scalar black levels and a 3x3 matrix when
    :mod:`lightstage._fused` is available; everything else takes the OpenCV path."""
    if not frame.files:
        raise RawError(f"frame {frame.index}: no files for camera {cam.name}")
    raws, exps = [], []
    for path, exposure, iso, sha in frame.files:
        r = _read_checked(path, sha, check_hashes, saturation_margin)
        shape = r.data.shape[:2]
        if shape != (cam.height, cam.width):
            raise RawError(f"{path}: image is {shape[1]}x{shape[0]}, camera {cam.name} is "
                           f"calibrated for {cam.width}x{cam.height}")
        if raws and (r.cfa != raws[0].cfa):
            raise RawError(f"{path}: CFA {r.cfa} differs from the bracket's {raws[0].cfa}")
        t = exposure if exposure > 0 else r.exposure
        g = (iso if iso > 0 else (r.iso or 100.0)) / 100.0
        if t <= 0:
            raise RawError(f"{path}: no exposure time in the manifest or the file")
        raws.append(r)
        exps.append(t * g)
    vig, cal = _camera_context(cam)
    inv_vig = vig[1]
    method = (cal.colour_method or "matrix-3x3").lower()
    g3 = np.ones(3, np.float64) if gain is None else np.asarray(gain, np.float64).reshape(3)
    if (method in ("matrix-3x3", "matrix", "3x3") and _fused.is_bayer(raws[0].cfa)
            and all(r.data.dtype == np.uint16 and np.ndim(r.black_map) == 0 for r in raws)
            and _fused.available()):
        # one cache-blocked pass (lightstage._fused): same numbers to float32 rounding
        M = np.asarray(cal.colour_matrix, np.float64) * g3[:, None]
        planes, bad = _fused.develop_bayer([r.data for r in raws], [r.saturated for r in raws],
                                           [float(r.black_map) for r in raws],
                                           [r.white for r in raws], exps, raws[0].cfa, inv_vig, M)
        return planes, (None if not bad.any() else bad == 0)
    if raws[0].cfa is not None:
        merged = merge_raw_snr([r.data for r in raws], [r.black_map for r in raws],
                               [r.white for r in raws], [r.saturated for r in raws], exps)
        planes = demosaic_planes(merged.radiance, raws[0].cfa)
        valid = None if merged.valid.all() else ~saturation_rgb(~merged.valid, raws[0].cfa)
    else:  # LibRaw-demosaiced fallback: (H, W, 3)
        merged = merge_bracket([r.data for r in raws], exps, [r.saturated for r in raws],
                               weighting="snr")
        planes = [np.ascontiguousarray(merged.radiance[..., k]) for k in range(3)]
        valid = None if merged.valid.all() else merged.valid
    if method in ("matrix-3x3", "matrix", "3x3"):
        M = np.asarray(cal.colour_matrix, np.float64) * g3[:, None]
        for k in range(3):
            planes[k] = cv2.multiply(planes[k], inv_vig)
        out = []
        for i in range(3):  # out_i = sum_j M_ij plane_j, planar (no HWC transposes)
            o = cv2.multiply(planes[0], float(M[i, 0]))
            o = cv2.scaleAdd(planes[1], float(M[i, 1]), o)
            out.append(cv2.scaleAdd(planes[2], float(M[i, 2]), o))
        return out, valid
    rgb = np.stack(planes) * inv_vig
    res = apply_colour(rgb, cal)
    return [np.ascontiguousarray(res[i] * np.float32(g3[i])) for i in range(3)], valid


def process_frame(cam: _CamSpec, frame: _FrameSpec, check_hashes: bool = True,
                  saturation_margin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode, merge, demosaic, de-vignette and colour-correct one camera's frame.

    Returns
    -------
    rgb : ``(3, H, W)`` float32 linear working-space radiance (not yet per unit light)
    valid : ``(H, W)`` bool, False where every exposure saturated (or the 3x3 demosaic
        neighbourhood of such a photosite)
    Raises :class:`RawError` naming the file.
    """
    planes, valid = _develop(cam, frame, check_hashes, saturation_margin)
    if valid is None:
        valid = np.ones((cam.height, cam.width), bool)
    return np.stack(planes), valid


def _to_store(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    y = x / np.float32(scale)
    if dtype == "float16":
        np.clip(y, -F16_MAX, F16_MAX, out=y)
    return y.astype(dtype)


def _store_planes(planes: list[np.ndarray], dtype: str) -> np.ndarray:
    """Planes already in stored units -> ``(3, H, W)`` array of ``dtype``; float16 is
    clipped to its finite range (OpenCV's float16 conversion, ~10x numpy's here)."""
    H, W = planes[0].shape
    out = np.empty((len(planes), H, W), dtype)
    for k, pl in enumerate(planes):
        if dtype == "float16":
            pl = np.clip(pl, -F16_MAX, F16_MAX)
            cv2.add(pl, 0.0, dst=out[k], dtype=cv2.CV_16F)
        else:
            out[k] = pl
    return out


# ---- tasks ---------------------------------------------------------------------------------


def _open_group(spec: _TakeSpec) -> "_Arrays":
    return _arrays(spec.store, spec.group, spec.run_id)


class _Arrays(dict):
    """The take's arrays, opened once per worker process and run (metadata reads are not free
    on a network file system)."""


@lru_cache(maxsize=4)
def _arrays(store: str, group: str, run_id: str) -> _Arrays:
    g = zarr.open_group(store, mode="r+", path=group)
    return _Arrays({name: arr for name, arr in g.arrays()})


def _gain(rgb: Any, scale: float) -> np.ndarray:
    """Per-output-channel factor from radiance to stored units: 1 / (light rgb x scale)."""
    return 1.0 / (np.asarray(rgb, np.float64) * float(scale))


def camera_task(spec: _TakeSpec, ci: int) -> dict[str, Any]:
    """Tracking phase of one camera: decode every tracking frame, flows reference -> frame
    (+ consistency), store them, the aligned tracking images and the foreground mask."""
    cv2.setNumThreads(1)
    cam = spec.cameras[ci]
    g = _open_group(spec)
    T = len(spec.tracking)
    fcfg = align.FlowConfig(**spec.flow)
    gain = _gain(spec.mean_light_rgb, spec.scale)
    bad: list[dict[str, Any]] = []
    H, W = cam.height, cam.width
    stride = int(g["flow"].attrs.get("stride", 1))
    fast = spec.dtype == "float16" and _fused.available()

    def load(j):
        fr = spec.frames[spec.tracking[j]][cam.name]
        # stored units (radiance / mean light rgb / scale); the flow only needs luminance
        # up to a factor, so it is computed from these too
        return _develop(cam, fr, spec.check_hashes, spec.saturation_margin, gain)

    if T == 0:
        # a take without tracking frames (allowed only without motion compensation): there is
        # nothing to measure a foreground from, so the mask keeps every pixel
        write_image(g["mask"], (ci,), np.full((H, W), 255, np.uint8))
        return {"camera": ci, "reference": None, "no_tracking": True, "bad": [], "ok": [],
                "checksums": []}
    # reference: the central tracking frame, or the closest decodable one
    order = sorted(range(T), key=lambda j: (abs(j - spec.reference), j))
    ref = None
    for j in order:
        try:
            ref_planes, _ = load(j)
            ref = j
            break
        except RawError as e:
            bad.append({"camera": cam.name, "frame": spec.tracking[j], "kind": "tracking",
                        "error": str(e)})
    if ref is None:
        return {"camera": ci, "reference": None, "bad": bad, "ok": [0] * T, "checksums": [0] * T}
    lum = align.luminance(np.stack(ref_planes))
    white = align.tone_white(lum)
    ref_u8 = align.tone_u8(lum, white)
    mask = (lum > spec.mask_threshold * white).astype(np.uint8) * 255
    write_image(g["mask"], (ci,), mask)
    ok = [0] * T
    sums = [0] * T
    failed = {b["frame"] for b in bad}
    zero_grid = np.zeros((2,) + align.flow_grid_shape(H, W, stride), np.float16)
    for j in range(T):
        if j != ref and spec.tracking[j] in failed:
            continue
        if j == ref:
            planes = ref_planes
        else:
            try:
                planes, _ = load(j)
            except RawError as e:
                bad.append({"camera": cam.name, "frame": spec.tracking[j], "kind": "tracking",
                            "error": str(e)})
                continue
        if spec.motion and j != ref:
            u8 = align.tone_u8(align.luminance(np.stack(planes)), white)
            fwd = align.compute_flow(ref_u8, u8, fcfg, mask > 0)
            # backward dense flow for the consistency test (a fitted model is checked
            # against what the pixels say)
            bwd = align.compute_flow(u8, ref_u8, replace(fcfg, model="dense"))
            cons = align.fb_consistency(fwd, bwd, fcfg.fb_threshold, fcfg.fb_relative)
            grid = align.encode_flow(fwd, stride)
            # every image is warped with the flow as stored, so a reader can reproduce it;
            # the flow's validity only: a tracking frame clipped where every light is on
            # says nothing about the OLAT pixels aligned with it
            cons_u8 = cons.view(np.uint8) * np.uint8(255)
            if fast:
                stored, fvalid = _fused.warp_store(planes, grid, stride, cons_u8, None, F16_MAX)
            else:
                mx, my, inside = align.warp_maps(align.decode_flow(grid, H, W, stride))
                planes = align.warp_planes(planes, mx, my)
                fvalid = cv2.bitwise_and(cons_u8, inside)
                stored = _store_planes(planes, spec.dtype)
        else:
            grid = zero_grid
            fvalid = np.full((H, W), 255, np.uint8)
            stored = _store_planes(planes, spec.dtype)
        write_image(g["tracking"], (ci, j), stored)
        write_image(g["flow"], (ci, j), grid)
        write_image(g["flow_valid"], (ci, j), fvalid)
        ok[j] = 1
        sums[j] = image_checksum(stored)
    write_image(g["tracking_ok"], (ci,), np.asarray(ok, np.uint8))  # this camera's own chunk
    return {"camera": ci, "reference": ref, "bad": bad, "ok": ok, "checksums": sums}


@lru_cache(maxsize=64)
def _tracking_ok(store: str, group: str, run_id: str, ci: int) -> np.ndarray:
    """A camera's decodable tracking frames: fixed once its tracking phase has run, which
    precedes every OLAT task of that camera in a run (read once per worker and run)."""
    return np.asarray(_arrays(store, group, run_id)["tracking_ok"][ci]).astype(bool)


@lru_cache(maxsize=4)
def _flow(store: str, group: str, run_id: str, ci: int, j: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Stored flow grid ``(2, h, w)`` float32, its ``(H, W)`` uint8 validity (255) and the
    grid's stride for tracking frame j: consecutive OLAT tasks of a camera share their two
    tracking frames, so a small per-worker cache saves most reads."""
    g = _arrays(store, group, run_id)
    stride = int(g["flow"].attrs.get("stride", 1))
    f = np.asarray(g["flow"][ci, j], np.float32)
    v = np.asarray(g["flow_valid"][ci, j])
    return f, v, stride


def olat_task(spec: _TakeSpec, ci: int, li: int) -> dict[str, Any]:
    """One OLAT image: decode, merge, colour, per unit light, warp to the reference, store."""
    cv2.setNumThreads(1)
    cam = spec.cameras[ci]
    fidx = spec.olat[li]
    fr = spec.frames[fidx][cam.name]
    H, W = cam.height, cam.width
    try:
        planes, valid = _develop(cam, fr, spec.check_hashes, spec.saturation_margin,
                                 _gain(spec.light_rgb[li], spec.scale))
    except RawError as e:
        return {"camera": ci, "light": li, "error": str(e), "frame": fidx}
    g = _open_group(spec)
    fast = spec.dtype == "float16" and _fused.available()
    grid = cons = None
    stride = 1
    if spec.motion:
        tok = _tracking_ok(spec.store, spec.group, spec.run_id, ci)
        good = [j for j in range(len(spec.tracking)) if tok[j]]
        if not good:
            return {"camera": ci, "light": li, "frame": fidx,
                    "error": f"camera {cam.name}: no decodable tracking frame to align frame {fidx}"}
        ia, ib, s = align.bracketing(fidx, [spec.tracking[j] for j in good])
        ja, jb = good[ia], good[ib]
        fa, ca, stride = _flow(spec.store, spec.group, spec.run_id, ci, ja)
        if jb != ja and s > 0:
            fb, cb, _ = _flow(spec.store, spec.group, spec.run_id, ci, jb)
            # linear in time on the stored grid, then upsampled (both steps are linear)
            grid = (np.float32(1 - s) * fa + np.float32(s) * fb)
            cons = cv2.bitwise_and(ca, cb)
        else:
            grid, cons = fa, ca
    if fast:  # warp, validity and float16 in one pass (lightstage._fused)
        stored, vmask = _fused.warp_store(planes, grid, stride, cons, valid, F16_MAX)
    elif spec.motion:
        mx, my, inside = align.warp_maps(align.decode_flow(grid, H, W, stride))
        planes = align.warp_planes(planes, mx, my)
        vmask = cv2.bitwise_and(cons, inside)
        if valid is not None:
            v = align.warp_planes([valid.astype(np.float32)], mx, my)[0]
            vmask[v <= 0.999] = 0
        stored = _store_planes(planes, spec.dtype)
    else:
        vmask = np.full((H, W), 255, np.uint8) if valid is None else valid.astype(np.uint8) * 255
        stored = _store_planes(planes, spec.dtype)
    write_image(g["olat"], (ci, li), stored)
    write_image(g["valid"], (ci, li), vmask)
    return {"camera": ci, "light": li, "checksum": image_checksum(stored, vmask)}


def olat_batch_task(spec: _TakeSpec, ci: int, lights: list[int]) -> list[dict[str, Any]]:
    """Several OLAT images of one camera in one task (:func:`olat_task` each): fewer tasks
    for the scheduler, and consecutive lights share their tracking flows in the cache."""
    return [olat_task(spec, ci, li) for li in lights]


# ---- planning ------------------------------------------------------------------------------


def choose_scale(cal: Calibration, cams: list[str], exposures: list[list[float]], isos: list[float],
                 light_rgb: np.ndarray) -> float:
    """Storage scale for float16: typical values O(1), the largest measurable value < 65504.

    ``typical``: a 18 % grey raw value in the longest exposure, through the colour matrix,
    per unit of the median light; ``peak``: a white-level value in the shortest exposure at the
    lowest gain, through the largest matrix row, per unit of the dimmest light, with the
    strongest vignetting correction. The scale is the larger of ``typical`` and
    ``peak / 30000`` (headroom for demosaic/colour overshoot)."""
    tmax = max(max(b) for b in exposures)
    tmin = min(min(b) for b in exposures)
    gmin, gmax = min(isos) / 100.0, max(isos) / 100.0
    lrgb = np.asarray(light_rgb, np.float64)
    typ, peak = [], []
    for n in cams:
        c = cal.cameras[n]
        M = np.asarray(c.colour_matrix, np.float64)
        typ.append(float(np.mean(M @ np.full(3, 0.18))) / (tmax * gmax))
        vmin = min(1.0, 1.0 + float(c.vignetting[0]) + float(c.vignetting[1]))
        vmin = max(vmin, 1e-3)
        peak.append(float(np.abs(M).sum(1).max()) / (tmin * gmin) / vmin)
    typical = float(np.median(typ)) / float(np.median(lrgb.mean(1)))
    peak_v = max(peak) / float(lrgb.min())
    s = max(abs(typical), peak_v / 30000.0)
    # round to 3 significant digits so the attribute reads cleanly
    return float(f"{s:.3g}")


def _reference_position(ref: str | int, n: int, where: str) -> int:
    if n == 0:
        return 0
    if ref == "central":
        return align.reference_index(n)
    if ref == "first":
        return 0
    try:
        r = int(ref)
    except (TypeError, ValueError):
        raise IngestError(f"reference must be 'central', 'first' or an index, got {ref!r}") from None
    if not 0 <= r < n:
        raise IngestError(f"{where}: reference tracking position {r} out of range 0..{n - 1}")
    return r


def _world2head(man: CaptureManifest, cal: Calibration) -> tuple[np.ndarray, str]:
    for p in (man.root / "subject.json", man.root / "truth" / "subject.json",
              man.root.parent / "subject.json"):
        if p.exists():
            try:
                d = json.loads(p.read_text())
                if d.get("world2head") is not None:
                    a = np.asarray(d["world2head"], np.float64)
                    if a.shape == (4, 4):
                        return a, str(p)
            except (json.JSONDecodeError, ValueError, TypeError):
                raise IngestError(f"{p}: unreadable subject file") from None
    if cal.world2head is not None:
        return np.asarray(cal.world2head), "calibration"
    return np.eye(4), "identity (no subject.json, none in the calibration)"


def _plan(man: CaptureManifest, cal: Calibration, store: str, cfg: IngestConfig,
          calib_path: str) -> tuple[_TakeSpec, dict[str, Any], dict[str, Any]]:
    rig = man.rig
    where = f"{man.root / 'capture.json'}"
    cams = [c.name for c in rig.cameras]
    missing = [c for c in cams if c not in cal.cameras]
    if missing:
        raise IngestError(f"{calib_path}: no calibration for camera(s) {missing} of {where}")
    cal_lights = {l.index: l for l in cal.lights}
    olat: dict[int, int] = {}
    tracking: list[int] = []
    frames: dict[int, dict[str, _FrameSpec]] = {}
    exposures: dict[str, list[float]] = {}
    isos: list[float] = []
    for fr in man.frames:
        if fr.kind == "dark":
            continue
        if fr.kind not in ("olat", "tracking"):
            raise IngestError(f"{where}: frame {fr.index}: unknown kind {fr.kind!r}")
        per_cam = {}
        for c in cams:
            lst = fr.files.get(c)
            if not lst:
                raise IngestError(f"{where}: frame {fr.index} has no files for camera {c}")
            per_cam[c] = _FrameSpec(fr.index, fr.kind, fr.light,
                                    [(str(man.path(rf)), rf.exposure, float(rf.iso), rf.sha256)
                                     for rf in lst])
            isos.extend(float(rf.iso) for rf in lst)
        frames[fr.index] = per_cam
        exposures[str(fr.index)] = [rf.exposure for rf in fr.files[cams[0]]]
        if fr.kind == "tracking":
            tracking.append(fr.index)
        else:
            if fr.light is None:
                raise IngestError(f"{where}: frame {fr.index}: an olat frame without a light")
            if fr.light not in cal_lights:
                raise IngestError(f"{calib_path}: no calibration for light {fr.light} "
                                  f"(olat frame {fr.index} of {where})")
            olat.setdefault(int(fr.light), fr.index)  # first frame of a light wins
    if not olat:
        raise IngestError(f"{where}: no olat frames")
    if cfg.motion and not tracking:
        raise IngestError(f"{where}: motion compensation needs tracking frames (none listed)")
    lights = sorted(olat)
    light_rgb = np.stack([cal_lights[i].rgb for i in lights])
    light_dirs = np.stack([cal_lights[i].direction for i in lights])
    H, W = rig.cameras[0].resolution
    cam_specs = []
    for c in rig.cameras:
        cc = cal.cameras[c.name]
        h, w = c.resolution
        if (h, w) != (H, W):
            raise IngestError(f"{where}: cameras differ in resolution ({c.name} is {w}x{h}); "
                              "one take stores one resolution")
        if tuple(cc.image_size) != (h, w):
            raise IngestError(f"{calib_path}: cameras.{c.name}.image_size {list(cc.image_size)} "
                              f"does not match the rig's {[h, w]}")
        d = Calibration(rig="", cameras={c.name: cc}, lights=[]).to_dict()["cameras"][c.name]
        cam_specs.append(_CamSpec(c.name, h, w, d))
    scale = cfg.scale
    if scale is None:
        if cfg.dtype == "float32":
            scale = 1.0
        else:
            scale = choose_scale(cal, cams, list(exposures.values()), isos or [100.0], light_rgb)
    spec = _TakeSpec(
        store=store, group=f"{man.subject}/{man.take}", cameras=cam_specs, tracking=tracking,
        olat=[olat[i] for i in lights], light_rgb=light_rgb.tolist(),
        mean_light_rgb=light_rgb.mean(0).tolist(), scale=float(scale), dtype=cfg.dtype,
        motion=cfg.motion, check_hashes=cfg.check_hashes, mask_threshold=cfg.mask_threshold,
        reference=_reference_position(cfg.reference, len(tracking), where),
        flow=asdict(cfg.flow), saturation_margin=cfg.saturation_margin, frames=frames)
    w2h, w2h_src = _world2head(man, cal)
    inputs = {}
    for fr in man.frames:
        for c, lst in fr.files.items():
            for rf in lst:
                # the manifest's hash (checked when the file is read), else hash it now
                p = man.path(rf)
                inputs[rf.path] = rf.sha256 or (sha256_file(p) if p.exists() else None)
    fingerprint = hashlib.sha256(json.dumps(
        {"config": cfg.fingerprint_dict(), "scale": spec.scale, "calibration": cal.to_dict(),
         "manifest": man.to_dict()["frames"]}, sort_keys=True, default=str).encode()).hexdigest()
    attrs = {
        "lights": lights,
        "light_directions": light_dirs,
        "light_rgb": light_rgb,
        "K": np.stack([cal.cameras[c].K for c in cams]),
        "distortion": np.stack([np.pad(np.asarray(cal.cameras[c].distortion, np.float64)[:5],
                                       (0, max(0, 5 - len(cal.cameras[c].distortion))))
                                for c in cams]),
        "cam2world": np.stack([cal.cameras[c].cam2world for c in cams]),
        "world2head": w2h,
        "rig": rig_to_dict(rig),
        "calibration": cal.to_dict(),
        "exposures": exposures,
        "tracking_frames": tracking,
        "olat_frames": spec.olat,
        "ingest": {
            "fingerprint": fingerprint,
            "config": cfg.fingerprint_dict(),
            "world2head_source": w2h_src,
            "tracking_normalisation": "tracking radiance / mean light_rgb (all lights at unit)",
            "mask_rule": (f"reference tracking luminance > {cfg.mask_threshold} x its 99.5th percentile"
                          if tracking else "every pixel (the take has no tracking frames)"),
            "flow_convention": "flow[c, j] (dx, dy): reference pixel x shows what frame j shows at "
                               "x + flow(x); stored as float16 on a grid subsampled by flow.attrs"
                               "['stride'], upsampled as flow.attrs['rule'] says",
            "done_codes": {"0": "to do", "1": "written", "2": "skipped (bad input)"},
            "checksum": CHECKSUM_TEXT,
        },
    }
    prov = {"manifest": str(man.root / "capture.json"), "calibration": str(calib_path),
            "inputs_sha256": inputs, "capture_provenance": man.provenance}
    return spec, attrs, prov


def _extra_arrays(C: int, T: int, L: int, H: int, W: int, flow_stride: int = 1) -> list[dict]:
    """The ingest's own arrays beside the store's standard ones (:func:`create_take`)."""
    t = default_tile(H, W)
    Hs, Ws = -(-H // t) * t, -(-W // t) * t
    zstd = [zarr.codecs.ZstdCodec(level=3)]
    h, w = align.flow_grid_shape(H, W, flow_stride)
    return [
        dict(name="flow", shape=(C, T, 2, h, w), chunks=(1, 1, 2, h, w), dtype="float16",
             compressors=zstd, fill_value=0,
             dimension_names=("camera", "tracking_frame", "component", "fy", "fx"),
             attributes={"stride": int(flow_stride), "units": "pixels (dx, dy)",
                         "rule": align.FLOW_STORAGE_RULE}),
        dict(name="flow_valid", shape=(C, T, H, W), chunks=(1, 1, t, t), shards=(1, 1, Hs, Ws),
             dtype="uint8", compressors=zstd, fill_value=0,
             dimension_names=("camera", "tracking_frame", "y", "x")),
        dict(name="tracking_ok", shape=(C, T), chunks=(1, max(T, 1)), dtype="uint8", fill_value=0,
             dimension_names=("camera", "tracking_frame")),
        dict(name="tracking_done", shape=(C,), chunks=(C,), dtype="uint8", fill_value=0,
             dimension_names=("camera",)),
        dict(name="checksum", shape=(C, L), chunks=(C, L), dtype="uint64", fill_value=0,
             dimension_names=("camera", "light")),
        dict(name="tracking_checksum", shape=(C, T), chunks=(C, max(T, 1)), dtype="uint64", fill_value=0,
             dimension_names=("camera", "tracking_frame")),
    ]


def _prepare_take(spec: _TakeSpec, attrs: dict, prov: dict, cfg: IngestConfig) -> tuple[zarr.Group, bool]:
    """Create the take, or reopen it for resume. Returns (group, resumed)."""
    store = spec.store
    C, T, L = len(spec.cameras), len(spec.tracking), len(spec.olat)  # T = 0: no tracking frames
    H, W = spec.cameras[0].height, spec.cameras[0].width
    exists = False
    if Path(store).exists():
        try:
            root = zarr.open_group(store, mode="r")
        except Exception as e:
            raise IngestError(f"{store}: exists and is not a Zarr store ({e}); refusing to touch it") from None
        if root.attrs.get("format") not in (None, STORE_FORMAT):
            raise IngestError(f"{store}: not a lightstage store; refusing to write into it")
        exists = spec.group in root
    if exists and not cfg.overwrite:
        g = zarr.open_group(store, mode="r+", path=spec.group)
        old = (g.attrs.get("ingest") or {}).get("fingerprint")
        if old != attrs["ingest"]["fingerprint"]:
            raise IngestError(f"{store}: take {spec.group!r} exists and was made from other inputs "
                              "or options; use --overwrite to replace it")
        return g, True
    # provenance goes in with the other attributes: one metadata write, not two
    attrs = dict(attrs, provenance=json.loads(json.dumps(provenance(**prov, skipped=[]), default=str)))
    g = create_take(store, spec.group.split("/")[0], spec.group.split("/")[1],
                    cameras=[c.name for c in spec.cameras], n_lights=L, n_tracking=T, height=H,
                    width=W, attrs=attrs, dtype=spec.dtype, scale=spec.scale,
                    overwrite=cfg.overwrite,
                    extra_arrays=_extra_arrays(C, T, L, H, W, cfg.flow_stride))
    return g, False


# ---- executors -----------------------------------------------------------------------------


class _Serial:
    """In-process executor with the subset of the distributed.Client API used here."""

    dashboard_link = None

    def submit(self, fn, *args, **kw):
        return ("done", fn(*args))

    def close(self):
        pass


def _make_client(workers: int, scheduler: str | None):
    if scheduler is None and workers <= 0:
        return _Serial(), None
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        return client, None
    # LibRaw + fork can deadlock (DESIGN.md): workers are spawned processes, one thread each
    # (distributed's nanny also sets OMP/MKL/OpenBLAS threads to 1 in them; tasks set OpenCV's).
    # The workers' statistical profiler (every 10 ms) and GIL monitor (every 1 ms) are
    # dashboard diagnostics that take CPU from the work on a small machine: off for the
    # cluster we start (an existing cluster keeps its own settings).
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn",
                     "distributed.worker.daemon": False})
    dask.config.set(LOCAL_CLUSTER_CONFIG)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    return Client(cluster), cluster


# ---- driver --------------------------------------------------------------------------------


def ingest(capture: str | Path | list[str | Path], calibration: str | Path, out: str | Path, *,
           config: IngestConfig | None = None, workers: int = 0, scheduler: str | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> IngestReport:
    """Ingest every subject/take below ``capture`` into the store ``out``.

    Several captures (and several subjects/takes in one) go into one store, one group per
    subject/take; a later call adds its takes to an existing store without touching the
    others (their bytes stay as they were), and resumes a take it had started.

    Parameters
    ----------
    capture : capture folder (or one take folder / capture.json), or a list of them.
    calibration : calibration file (lightstage-calibration JSON).
    out : store path (``.zarr``); created if missing, other takes in it are untouched.
    config : :class:`IngestConfig`.
    workers : 0 = in process; N = LocalCluster of N spawned worker processes.
    scheduler : address of an existing Dask scheduler (overrides ``workers``).
    progress : ``callback(event, done, total)``; events ``"start"``, ``"image"``, ``"dashboard"``.

    Returns
    -------
    IngestReport ; ``report.ok`` is False when some image could not be written (its error is in
    ``report.errors`` and the image's ``done`` flag stays 0, so a rerun retries it).
    """
    cfg = config or IngestConfig()
    if cfg.dtype not in ("float16", "float32"):
        raise IngestError(f"dtype must be float16 or float32, got {cfg.dtype!r}")
    if int(cfg.flow_stride) < 1:
        raise IngestError(f"flow_stride must be a positive integer, got {cfg.flow_stride!r}")
    t0 = time.perf_counter()
    out = str(out)
    cal = load_calibration(calibration)
    captures = [capture] if isinstance(capture, (str, Path)) else list(capture)
    if not captures:
        raise IngestError("no capture given")
    mans = []
    for cap in captures:
        manifests = find_manifests(cap)
        if not manifests:
            raise IngestError(f"{cap}: no capture.json found")
        found = [load_manifest(p) for p in manifests]
        if cfg.subjects:
            found = [m for m in found if m.subject in cfg.subjects]
        mans += found
    if cfg.subjects and not mans:
        raise IngestError(f"{', '.join(map(str, captures))}: none of the subjects {cfg.subjects} found")
    rename = dict(cfg.rename or {})
    groups: dict[str, Path] = {}
    unused = set(rename)
    for m in mans:
        src = f"{m.subject}/{m.take}"
        dst = rename.get(src, src)  # every take of that name (two alike are refused below)
        unused.discard(src)
        parts = dst.split("/")
        if len(parts) != 2 or not all(parts) or any(p.startswith(".") for p in parts):
            raise IngestError(f"rename {src} -> {dst!r}: the store group must be 'subject/take'")
        if dst in groups:
            raise IngestError(f"{m.root / 'capture.json'} and {groups[dst] / 'capture.json'} are both "
                              f"take {dst!r}: give one another name (--rename {src}=SUBJECT/TAKE)")
        groups[dst] = m.root
    if unused:
        raise IngestError(f"--rename names takes not in the capture(s): {sorted(unused)}")
    plans = []
    for m in mans:
        spec, attrs, prov = _plan(m, cal, out, cfg, str(calibration))
        dst = rename.get(spec.group, spec.group)
        if dst != spec.group:
            attrs["ingest"]["captured_as"] = spec.group
            spec.group = dst
        plans.append((spec, attrs, prov))
    report = IngestReport(store=out)
    takes = []
    run_id = uuid.uuid4().hex
    for spec, attrs, prov in plans:
        spec.run_id = run_id
        g, resumed = _prepare_take(spec, attrs, prov, cfg)
        takes.append((spec, g, resumed))
        report.takes.append(spec.group)
    total = sum(len(s.cameras) * (len(s.olat) + len(s.tracking)) for s, _, _ in takes)
    client, cluster = _make_client(workers, scheduler)
    report.dashboard = getattr(client, "dashboard_link", None)
    if progress and report.dashboard:
        progress("dashboard:" + str(report.dashboard), 0, total)
    if progress:
        progress("start", 0, total)
    done_count = 0
    try:
        for spec, g, resumed in takes:
            done_count = _run_take(spec, g, client, cfg, report, progress, done_count, total,
                                   resumed)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    report.seconds = time.perf_counter() - t0
    return report


def _run_take(spec, g, client, cfg, report, progress, done_count, total, resumed=True) -> int:
    C, L, T = len(spec.cameras), len(spec.olat), len(spec.tracking)
    if resumed:
        done = np.asarray(g["done"][...])
        tdone = np.asarray(g["tracking_done"][...])
        sums = np.asarray(g["checksum"][...])
        tsums = np.asarray(g["tracking_checksum"][...])
        prev_ok = np.asarray(g["tracking_ok"][...]).astype(np.uint8)
        prov = dict(g.attrs.get("provenance") or {})
        refs = list(g.attrs.get("reference_frames") or [None] * C)
    else:  # just created: every flag is 0 (no metadata round trips for what is known)
        done, tdone = np.zeros((C, L), np.uint8), np.zeros(C, np.uint8)
        sums, tsums = np.zeros((C, L), np.uint64), np.zeros((C, T), np.uint64)
        prev_ok = np.zeros((C, T), np.uint8)
        prov, refs = {}, [None] * C
    skipped = list(prov.get("skipped") or [])
    serial = isinstance(client, _Serial)

    def tick(n=1):
        nonlocal done_count
        done_count += n
        if progress:
            progress("image", done_count, total)

    def record_bad(entry):
        report.skipped.append(entry)
        if entry not in skipped:
            skipped.append(entry)

    state = {"olat": False, "track": False, "nskip": len(skipped)}

    def flush():
        # only what changed: every write is a read-modify-write of a small shared chunk
        if state["olat"]:
            g["checksum"][...] = sums
            g["done"][...] = done  # after the checksums: a set flag always has its checksum
        if state["track"]:
            g.attrs["reference_frames"] = refs
            g["tracking_checksum"][...] = tsums
            g["tracking_done"][...] = tdone
        if len(skipped) != state["nskip"]:
            p = dict(g.attrs.get("provenance") or {})  # read back: only "skipped" changes
            p["skipped"] = skipped
            g.attrs["provenance"] = p
        state.update(olat=False, track=False, nskip=len(skipped))

    def handle_cam(res):
        ci = res["camera"]
        for b in res["bad"]:
            if cfg.skip_bad:
                record_bad(b)
            else:
                report.errors.append(b["error"])
        if res.get("no_tracking"):
            tdone[ci] = 1
            state["track"] = state["olat"] = True
            return [(ci, li) for li in range(L) if done[ci, li] != DONE_WRITTEN]
        if res["reference"] is None:
            report.errors.append(f"{spec.group}: camera {spec.cameras[ci].name}: no tracking "
                                 "frame could be decoded; its OLATs were not ingested")
            return []
        tsums[ci] = np.asarray(res["checksums"], np.uint64)
        if prev_ok[ci].any() and list(prev_ok[ci]) != list(res["ok"]):
            # the decodable tracking frames changed since the interrupted run (a bad file was
            # replaced): OLATs aligned with the old flows must be redone
            done[ci, :] = DONE_TODO
        refs[ci] = spec.tracking[res["reference"]]
        if not res["bad"] or cfg.skip_bad:
            tdone[ci] = 1
        state["track"] = state["olat"] = True
        tick(T)
        return [(ci, li) for li in range(L) if done[ci, li] != DONE_WRITTEN]

    def handle_olat(res):
        ci, li = res["camera"], res["light"]
        if "error" in res:
            entry = {"camera": spec.cameras[ci].name, "frame": res["frame"], "kind": "olat",
                     "error": res["error"]}
            if cfg.skip_bad:
                record_bad(entry)
                done[ci, li] = DONE_SKIPPED
            else:
                report.errors.append(res["error"])
        else:
            sums[ci, li] = np.uint64(res["checksum"])
            done[ci, li] = DONE_WRITTEN
            report.written += 1
        state["olat"] = True
        tick()

    already = int((done == DONE_WRITTEN).sum())
    report.resumed += already
    # cameras whose tracking phase is complete go straight to their OLATs
    todo_cams = [ci for ci in range(C) if not tdone[ci]]
    ready = [(ci, li) for ci in range(C) if tdone[ci] for li in range(L) if done[ci, li] != DONE_WRITTEN]
    tick(already + T * (C - len(todo_cams)))
    # flags of finished images are flushed every few seconds and on the way out (also on
    # Ctrl-C); a hard kill loses at most the last few seconds of flags, whose images are redone
    try:
        if serial:
            last = time.monotonic()
            for ci in todo_cams:
                ready += handle_cam(camera_task(spec, ci))
            for ci, li in ready:
                handle_olat(olat_task(spec, ci, li))
                if time.monotonic() - last > FLUSH_SECONDS:
                    flush()
                    last = time.monotonic()
            return done_count
        from distributed import as_completed

        # the cluster's size: a LocalCluster we hold knows it; else one scheduler round trip
        n_workers = len(getattr(getattr(client, "cluster", None), "workers", None) or {})
        if not n_workers:
            try:
                n_workers = len(client.scheduler_info().get("workers", {}))
            except Exception:  # an old or unusual scheduler: assume a few workers
                n_workers = 0
        n_workers = n_workers or 4
        # a few images per task: the scheduler and this process spend ~ms per task, which on
        # small images is a real share of the CPU the workers need (2 workers on 2 cores)
        per = max(1, min(8, -(-L // (2 * n_workers))))

        def batches(pairs):
            by_cam: dict[int, list[int]] = {}
            for ci, li in pairs:
                by_cam.setdefault(ci, []).append(li)
            return [(ci, lis[k:k + per]) for ci, lis in by_cam.items() for k in range(0, len(lis), per)]

        # hash=False: tokenising the whole spec (every raw file of the take) costs ~40 ms per run
        spec_f = client.scatter(spec, broadcast=True, hash=False)
        # Each camera's OLAT batches are submitted (one client.map: one graph update) when its
        # tracking task reports. They then depend only on the scattered spec, which makes them
        # "root-ish" to the scheduler: it queues them and hands the next one to whichever
        # worker frees up, so the workers finish together. (Making them depend on the
        # camera's future instead, to submit everything up front, let the scheduler assign
        # them to workers eagerly: up to 20 % of a 2-worker run was one worker waiting for the
        # other.) Results are gathered a batch of finished futures at a time.
        def submit_olat(pairs):
            todo = batches(pairs)
            if not todo:
                return []
            return client.map(olat_batch_task, [spec_f] * len(todo), [b[0] for b in todo],
                              [b[1] for b in todo], pure=False)

        futs = [client.submit(camera_task, spec_f, ci, pure=False) for ci in todo_cams]
        futs += submit_olat(ready)
        # as_completed tracks futures on default_client()'s loop unless told: with another
        # Client already open in this process (a notebook's, a benchmark's) that is a different
        # IO-loop thread, and the cross-thread race loses completions (hangs, tornado asserts)
        ac = as_completed(futs, loop=client.loop)
        last = time.monotonic()
        for fin in ac.batches():
            for res in client.gather(fin):
                if isinstance(res, dict) and "reference" in res:
                    ac.update(submit_olat(handle_cam(res)))
                else:
                    for r in res:
                        handle_olat(r)
            if time.monotonic() - last > FLUSH_SECONDS:
                flush()
                last = time.monotonic()
        return done_count
    finally:
        flush()


def read_flow(group: zarr.Group, camera: int, tracking_frame: int) -> np.ndarray:
    """The per-pixel flow ``(H, W, 2)`` float32 (dx, dy) from the reference to one tracking
    frame of an ingested take, as used to warp its images (stores from before the compact
    flow layout, full-resolution float32 without a ``stride``, read the same way)."""
    f = group["flow"]
    stride = int(f.attrs.get("stride", 1))
    H, W = group["olat"].shape[-2:]
    return align.decode_flow(np.asarray(f[camera, tracking_frame], np.float32), H, W, stride)


# ---- verify --------------------------------------------------------------------------------


def verify_store(store: str | Path, progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Check every take of a store: completeness (``done`` flags, skipped images listed in
    provenance) and each written image's checksum. Returns a list of problems (empty = OK)."""
    store = str(store)
    try:
        takes = list_takes(store)
    except Exception as e:
        return [f"{store}: not a readable Zarr store ({e})"]
    problems: list[str] = []
    root = zarr.open_group(store, mode="r")
    if root.attrs.get("format") != STORE_FORMAT:
        return [f"{store}: not a lightstage store"]
    if not takes:
        return [f"{store}: no takes"]
    total = 0
    for s, t in takes:
        total += int(np.prod(root[f"{s}/{t}/done"].shape))
    k = 0
    for s, t in takes:
        g = root[f"{s}/{t}"]
        path = f"{s}/{t}"
        for name in ("olat", "valid", "done", "checksum", "tracking", "tracking_checksum"):
            if name not in g:
                problems.append(f"{path}: missing array {name!r}")
        if problems:
            continue
        cams = list(g.attrs.get("cameras", []))
        algo = _checksum_algorithm(dict(g.attrs))
        done = np.asarray(g["done"][...])
        sums = np.asarray(g["checksum"][...])
        skipped = (g.attrs.get("provenance") or {}).get("skipped") or []
        frames = list(g.attrs.get("olat_frames", []))
        for ci in range(done.shape[0]):
            for li in range(done.shape[1]):
                k += 1
                name = f"{path} camera {cams[ci] if ci < len(cams) else ci} light {li}"
                if done[ci, li] == DONE_TODO:
                    problems.append(f"{name}: missing (not written)")
                elif done[ci, li] == DONE_SKIPPED:
                    fr = frames[li] if li < len(frames) else None
                    if not any(e.get("frame") == fr and e.get("camera") == cams[ci] for e in skipped):
                        problems.append(f"{name}: marked skipped but not listed in provenance")
                else:
                    got = image_checksum(g["olat"][ci, li], g["valid"][ci, li], algorithm=algo)
                    if np.uint64(got) != sums[ci, li]:
                        problems.append(f"{name}: checksum mismatch (data changed or corrupt)")
                if progress:
                    progress("image", k, total)
        tdone = np.asarray(g["tracking_done"][...]) if "tracking_done" in g else None
        tsums = np.asarray(g["tracking_checksum"][...])
        tok = np.asarray(g["tracking_ok"][...]) if "tracking_ok" in g else None
        for ci in range(tsums.shape[0]):
            if tdone is not None and not tdone[ci]:
                problems.append(f"{path} camera {cams[ci]}: tracking phase incomplete")
                continue
            for j in range(tsums.shape[1]):
                if tok is not None and not tok[ci, j]:
                    continue
                if np.uint64(image_checksum(g["tracking"][ci, j], algorithm=algo)) != tsums[ci, j]:
                    problems.append(f"{path} camera {cams[ci]} tracking {j}: checksum mismatch")
    return problems
