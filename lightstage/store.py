"""The OLAT dataset store: sharded Zarr v3, readable by plain ``zarr`` and ``xarray``.

Layout (schema version 1)::

    STORE.zarr/                         attrs: format="lightstage-store", schema_version=1
      <subject>/<take>/                 attrs: see TAKE_ATTRS below
        olat      (camera, light, channel, y, x)     float16|float32, stored = radiance / scale
        tracking  (camera, tracking_frame, channel, y, x)  same dtype and scale (fully lit frames)
        mask      (camera, y, x)                     uint8 foreground (255) / background (0)
        valid     (camera, light, y, x)              uint8 per-pixel validity (motion
                                                     consistency, saturation): 255 = trusted
        done      (camera, light)                    uint8 completion flag per OLAT image

The OLAT stack is *channel-planar*: relighting one camera is a GEMV of the (light) weights
against a (light, channel*y*x) matrix, which runs at memory bandwidth (DESIGN.md). Chunks are
(1, 1, 3, tile, tile) for crop access; one shard holds one whole image (1, 1, 3, H, W), so one
OLAT image is written by exactly one task and never shares a shard with another writer.

OLAT radiance is *per unit light*: relit = sum_i E_i * OLAT_i with E_i the environment radiance
integrated over light i's region (``lightstage.relight``). Attributes store light directions and
calibrated intensities so the per-unit normalisation is traceable.

Readers need only zarr: ``zarr.open_group(path)[f"{subject}/{take}/olat"]``, or xarray:
``xarray.open_zarr(path, group=f"{subject}/{take}")``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = [
    "STORE_FORMAT",
    "SCHEMA_VERSION",
    "StoreError",
    "TAKE_ATTRS",
    "create_take",
    "open_take",
    "list_takes",
    "Take",
    "default_tile",
    "provenance",
]

STORE_FORMAT = "lightstage-store"
SCHEMA_VERSION = 1
OLAT_DIMS = ("camera", "light", "channel", "y", "x")
TRACKING_DIMS = ("camera", "tracking_frame", "channel", "y", "x")
MASK_DIMS = ("camera", "y", "x")
VALID_DIMS = ("camera", "light", "y", "x")
DONE_DIMS = ("camera", "light")

#: attributes every take carries (name -> meaning)
TAKE_ATTRS = {
    "schema_version": "store schema version (int)",
    "subject": "subject id",
    "take": "take id",
    "cameras": "camera names, in the order of the camera axis",
    "lights": "rig light indices, in the order of the light axis",
    "light_directions": "(L, 3) unit directions subject -> light, world frame",
    "light_rgb": "(L, 3) calibrated linear RGB intensity of each light (what 'unit light' divides out)",
    "K": "(C, 3, 3) pixel intrinsics at the stored resolution",
    "distortion": "(C, 5) OpenCV distortion",
    "cam2world": "(C, 4, 4) OpenCV cam2world, metres, world frame",
    "world2head": "(4, 4) similarity transform world -> EG3D head frame",
    "colour_space": "working colour space of the radiance (linear Rec.709 / D65)",
    "scale": "stored value * scale = linear radiance per unit light",
    "rig": "the rig description (lightstage-rig dict)",
    "calibration": "the calibration used (lightstage-calibration dict) or null",
    "exposures": "per frame index: the exposure bracket in seconds",
    "tracking_frames": "sequence frame index of each tracking image",
    "olat_frames": "sequence frame index of each OLAT image (light axis order)",
    "provenance": "software versions, input hashes, skipped frames, created time",
}


class StoreError(ValueError):
    pass


def default_tile(height: int, width: int) -> int:
    """Chunk edge for crop access: 128 for small images, 256 from 1K up."""
    return 256 if min(height, width) >= 1024 else min(128, height, width)


def provenance(**extra: Any) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("lightstage", "numpy", "zarr", "rawpy", "dask", "opencv-python", "colour-science", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        **extra,
    }


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _codec():
    return [zarr.codecs.ZstdCodec(level=3)]


def create_take(
    store_path: str | Path,
    subject: str,
    take: str,
    *,
    cameras: list[str],
    n_lights: int,
    n_tracking: int,
    height: int,
    width: int,
    attrs: dict[str, Any],
    dtype: str = "float16",
    scale: float = 1.0,
    overwrite: bool = False,
) -> zarr.Group:
    """Create (or, with ``overwrite``, replace) one subject/take group and its empty arrays.

    An existing take is never replaced silently: without ``overwrite`` a :class:`StoreError`
    names it. Other takes in the same store are never touched.
    """
    if dtype not in ("float16", "float32"):
        raise StoreError(f"dtype must be float16 or float32, got {dtype!r}")
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    if root.attrs.get("format") not in (None, STORE_FORMAT):
        raise StoreError(f"{store_path}: not a lightstage store (format={root.attrs.get('format')!r})")
    root.attrs.update({"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION})
    path = f"{subject}/{take}"
    if path in root:
        if not overwrite:
            raise StoreError(f"{store_path}: take {path!r} exists (use overwrite to replace it)")
        del root[path]
    g = root.require_group(subject).create_group(take)
    C, L, H, W = len(cameras), n_lights, height, width
    t = default_tile(H, W)
    # one shard per image: padded up to a whole number of chunks (zarr needs divisibility)
    Hs, Ws = -(-H // t) * t, -(-W // t) * t
    g.create_array("olat", shape=(C, L, 3, H, W), chunks=(1, 1, 3, t, t), shards=(1, 1, 3, Hs, Ws),
                   dtype=dtype, compressors=_codec(), fill_value=0, dimension_names=OLAT_DIMS)
    g.create_array("tracking", shape=(C, max(n_tracking, 1), 3, H, W), chunks=(1, 1, 3, t, t),
                   shards=(1, 1, 3, Hs, Ws), dtype=dtype, compressors=_codec(), fill_value=0,
                   dimension_names=TRACKING_DIMS)
    g.create_array("mask", shape=(C, H, W), chunks=(1, H, W), dtype="uint8",
                   compressors=_codec(), fill_value=0, dimension_names=MASK_DIMS)
    g.create_array("valid", shape=(C, L, H, W), chunks=(1, 1, t, t), shards=(1, 1, Hs, Ws),
                   dtype="uint8", compressors=_codec(), fill_value=0, dimension_names=VALID_DIMS)
    g.create_array("done", shape=(C, L), chunks=(1, L), dtype="uint8", fill_value=0,
                   dimension_names=DONE_DIMS)
    a = dict(attrs)
    a.update({"schema_version": SCHEMA_VERSION, "subject": subject, "take": take,
              "cameras": list(cameras), "scale": float(scale)})
    a.setdefault("colour_space", "linear Rec.709 (D65)")
    g.attrs.update(_jsonable(a))
    return g


def list_takes(store_path: str | Path) -> list[tuple[str, str]]:
    root = zarr.open_group(str(store_path), mode="r")
    out = []
    for sname, sg in sorted(root.groups()):
        for tname, tg in sorted(sg.groups()):
            if "olat" in tg:
                out.append((sname, tname))
    return out


@dataclass
class Take:
    """Read access to one subject/take with radiance in float32, scale applied."""

    group: zarr.Group
    path: str

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def scale(self) -> float:
        return float(self.group.attrs.get("scale", 1.0))

    @property
    def cameras(self) -> list[str]:
        return list(self.group.attrs["cameras"])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.group["olat"].shape

    @property
    def light_directions(self) -> np.ndarray:
        return np.asarray(self.group.attrs["light_directions"], dtype=np.float64)

    def camera_index(self, camera: int | str) -> int:
        if isinstance(camera, str):
            try:
                return self.cameras.index(camera)
            except ValueError:
                raise StoreError(f"{self.path}: no camera {camera!r}; has {self.cameras}") from None
        if not 0 <= camera < len(self.cameras):
            raise StoreError(f"{self.path}: camera index {camera} out of range")
        return camera

    def olat(self, camera: int | str, lights=slice(None), crop=None) -> np.ndarray:
        """(L, 3, h, w) float32 radiance per unit light for one camera (optional crop
        ``(y0, y1, x0, x1)``)."""
        c = self.camera_index(camera)
        ys, xs = (slice(None), slice(None)) if crop is None else (slice(crop[0], crop[1]), slice(crop[2], crop[3]))
        a = self.group["olat"][c, lights, :, ys, xs]
        return a.astype(np.float32) * np.float32(self.scale)

    def tracking(self, camera: int | str) -> np.ndarray:
        c = self.camera_index(camera)
        return self.group["tracking"][c].astype(np.float32) * np.float32(self.scale)

    def mask(self, camera: int | str) -> np.ndarray:
        return self.group["mask"][self.camera_index(camera)] > 127

    def validate(self) -> list[str]:
        """Problems with this take (missing arrays/attributes, mismatched light metadata)."""
        errs = []
        for name in ("olat", "tracking", "mask", "done"):
            if name not in self.group:
                errs.append(f"{self.path}: missing array {name!r}")
        for key in ("cameras", "light_directions", "light_rgb", "K", "cam2world", "scale"):
            if key not in self.group.attrs:
                errs.append(f"{self.path}: missing attribute {key!r}")
        if not errs:
            C, L = self.group["olat"].shape[:2]
            ld = np.asarray(self.group.attrs["light_directions"])
            if ld.shape != (L, 3):
                errs.append(f"{self.path}: light_directions has shape {ld.shape}, olat has {L} lights")
            if len(self.cameras) != C:
                errs.append(f"{self.path}: {len(self.cameras)} camera names, olat has {C} cameras")
            if np.asarray(self.group.attrs["cam2world"]).shape != (C, 4, 4):
                errs.append(f"{self.path}: cam2world does not match {C} cameras")
        return errs


def open_take(store_path: str | Path, subject: str | None = None, take: str | None = None,
              mode: str = "r") -> Take:
    """Open one take; with ``subject``/``take`` omitted the store must hold exactly one
    candidate."""
    p = Path(store_path)
    if not p.exists():
        raise StoreError(f"{store_path}: no such store")
    try:
        root = zarr.open_group(str(p), mode=mode)
    except Exception as e:  # zarr raises several types for a non-store folder
        raise StoreError(f"{store_path}: not a Zarr store ({e})") from None
    if root.attrs.get("format") != STORE_FORMAT:
        raise StoreError(f"{store_path}: not a lightstage store (format={root.attrs.get('format')!r})")
    takes = list_takes(p)
    cands = [t for t in takes if (subject is None or t[0] == subject) and (take is None or t[1] == take)]
    if not cands:
        raise StoreError(f"{store_path}: no take matches subject={subject!r} take={take!r}; "
                         f"has {['/'.join(t) for t in takes]}")
    if len(cands) > 1:
        raise StoreError(f"{store_path}: several takes match ({['/'.join(t) for t in cands]}); "
                         "name the subject (and take)")
    s, t = cands[0]
    return Take(group=root[f"{s}/{t}"], path=f"{store_path}:{s}/{t}")


def dumps_attrs(attrs: dict) -> str:
    return json.dumps(_jsonable(attrs))
