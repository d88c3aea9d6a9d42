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

Compression: the radiance arrays (olat, tracking) use Blosc LZ4 with bit-shuffle
(:data:`RADIANCE_CODEC`), the uint8 arrays zstd; readers need nothing but zarr either way.

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
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
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
    "write_image",
    "ShardWriter",
    "RADIANCE_CODEC",
    "create_arrays",
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


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    """Installed versions of the packages that shape the stored bytes (read once per process:
    importlib.metadata scans site-packages on every call)."""
    import importlib.metadata as md

    versions = []
    for pkg in ("lightstage", "numpy", "zarr", "rawpy", "dask", "opencv-python", "colour-science", "torch"):
        try:
            versions.append((pkg, md.version(pkg)))
        except md.PackageNotFoundError:
            pass
    return tuple(versions)


def provenance(**extra: Any) -> dict[str, Any]:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": dict(_versions()),
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


#: compression of the radiance arrays (olat, tracking). float16 HDR mantissas are noise-like:
#: zstd level 3 on the plain bytes gave 1.26x at ~25 ms per 384^2 RGB image here, while Blosc's
#: bit-shuffle (sign/exponent bits grouped apart from the mantissa bits) + LZ4 gives 1.45x at
#: ~2.5 ms to encode and ~1.4 ms to decode (benchmarks/bench_ingest.py measures the ingest with
#: it; the comparison is in the ``RADIANCE_CODEC`` note of the README). Stores made with zstd
#: read the same: the codec is in each array's metadata.
RADIANCE_CODEC = {"cname": "lz4", "clevel": 3, "shuffle": "bitshuffle"}


def _codec():
    """Codec of the small uint8 arrays (masks, validity): zstd, 0/255 images compress well."""
    return [zarr.codecs.ZstdCodec(level=3)]


def _radiance_codec(dtype: str):
    return [zarr.codecs.BloscCodec(typesize=np.dtype(dtype).itemsize, **RADIANCE_CODEC)]


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
    extra_arrays: list[dict[str, Any]] | None = None,
) -> zarr.Group:
    """Create (or, with ``overwrite``, replace) one subject/take group and its empty arrays.

    An existing take is never replaced silently: without ``overwrite`` a :class:`StoreError`
    names it. Other takes in the same store are never touched. ``extra_arrays`` (keyword
    arguments of ``Group.create_array`` with ``name``) are created alongside, concurrently.
    """
    if dtype not in ("float16", "float32"):
        raise StoreError(f"dtype must be float16 or float32, got {dtype!r}")
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    if root.attrs.get("format") not in (None, STORE_FORMAT):
        raise StoreError(f"{store_path}: not a lightstage store (format={root.attrs.get('format')!r})")
    if (root.attrs.get("format"), root.attrs.get("schema_version")) != (STORE_FORMAT, SCHEMA_VERSION):
        # one metadata write (attrs.update() rewrites zarr.json once per key)
        root.update_attributes({"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION})
    path = f"{subject}/{take}"
    if path in root:
        if not overwrite:
            raise StoreError(f"{store_path}: take {path!r} exists (use overwrite to replace it)")
        del root[path]
    a = dict(attrs)
    a.update({"schema_version": SCHEMA_VERSION, "subject": subject, "take": take,
              "cameras": list(cameras), "scale": float(scale)})
    a.setdefault("colour_space", "linear Rec.709 (D65)")
    # the take's metadata goes in with the group: one write, not one per key
    g = root.require_group(subject).create_group(take, attributes=_jsonable(a))
    C, L, H, W = len(cameras), n_lights, height, width
    t = default_tile(H, W)
    # one shard per image: padded up to a whole number of chunks (zarr needs divisibility)
    Hs, Ws = -(-H // t) * t, -(-W // t) * t
    create_arrays(g, [
        dict(name="olat", shape=(C, L, 3, H, W), chunks=(1, 1, 3, t, t), shards=(1, 1, 3, Hs, Ws),
             dtype=dtype, compressors=_radiance_codec(dtype), fill_value=0,
             dimension_names=OLAT_DIMS),
        dict(name="tracking", shape=(C, n_tracking, 3, H, W), chunks=(1, 1, 3, t, t),
             shards=(1, 1, 3, Hs, Ws), dtype=dtype, compressors=_radiance_codec(dtype), fill_value=0,
             dimension_names=TRACKING_DIMS),
        dict(name="mask", shape=(C, H, W), chunks=(1, H, W), dtype="uint8",
             compressors=_codec(), fill_value=0, dimension_names=MASK_DIMS),
        dict(name="valid", shape=(C, L, H, W), chunks=(1, 1, t, t), shards=(1, 1, Hs, Ws),
             dtype="uint8", compressors=_codec(), fill_value=0, dimension_names=VALID_DIMS),
        dict(name="done", shape=(C, L), chunks=(1, L), dtype="uint8", fill_value=0,
             dimension_names=DONE_DIMS),
    ] + list(extra_arrays or []))
    return g


class ShardWriter:
    """Writes one whole shard of a sharded Zarr v3 array straight to a local store.

    zarr-python's write path runs every inner chunk through its asyncio event loop and a
    thread pool; for one image (e.g. 9 or 144 inner chunks) that costs 10-30 ms here against
    ~2 ms of actual compression (benchmarks/bench_ingest.py, ``shard_writer_vs_zarr``). This
    writer produces the same bytes as zarr for a whole shard: inner chunks encoded with the
    array's own codecs (bytes little-endian, then zstd, blosc or none), concatenated in zarr's Morton
    order, followed by the shard index (offset, nbytes) uint64 pairs and its CRC32C, as the
    Zarr v3 ``sharding_indexed`` specification lays out. The file is written to a temporary
    name and renamed, so a killed writer never leaves a truncated shard. One difference from
    zarr, on purpose: an inner chunk is left out only when its *bytes* are all zero (zarr
    also drops chunks of ``-0.0``, which then read back as ``+0.0`` and break checksums).

    Unsharded arrays are handled too (a whole chunk is encoded and written the same way).
    Use :meth:`supports` / :func:`write_image`, which falls back to ``array[index] = data``
    for any layout or store this writer does not handle (remote stores, other codecs, shards
    that are not whole images).
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.ok = False
        self._dirs: set[Path] = set()
        try:
            self._setup()
        except Exception:  # anything unexpected in the metadata: use zarr itself
            self.ok = False

    def _setup(self) -> None:
        from zarr.storage import LocalStore

        a = self.array
        if not isinstance(a.store, LocalStore) or a.metadata.zarr_format != 3 or a.store.read_only:
            return
        codecs = list(a.metadata.to_dict()["codecs"])
        grid = tuple(int(x) for x in a.metadata.chunk_grid.chunk_shape)
        self.sharded = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
        if self.sharded:
            conf = codecs[0]["configuration"]
            if conf.get("index_location", "end") != "end":
                return
            idx = [c["name"] for c in conf["index_codecs"]]
            if idx != ["bytes", "crc32c"]:
                return
            inner = list(conf["codecs"])
            chunk = tuple(int(x) for x in conf["chunk_shape"])
        else:  # a plain chunked array: one chunk is one "shard" without an index
            inner, chunk = codecs, grid
        if not inner or inner[0]["name"] != "bytes":
            return
        if (inner[0].get("configuration") or {}).get("endian", "little") != "little":
            return
        self._codec = None
        if len(inner) == 2 and inner[1]["name"] == "zstd":
            from numcodecs.zstd import Zstd

            c = inner[1].get("configuration") or {}
            self._codec = Zstd(level=int(c.get("level", 0)), checksum=bool(c.get("checksum", False)))
        elif len(inner) == 2 and inner[1]["name"] == "blosc":
            import numcodecs
            from numcodecs import Blosc

            c = inner[1].get("configuration") or {}
            if "typesize" not in c or tuple(int(x) for x in numcodecs.__version__.split(".")[:2]) < (0, 16):
                return  # zarr configures older numcodecs differently: let zarr write
            self._codec = Blosc.from_config({
                "cname": c["cname"], "clevel": int(c["clevel"]),
                "shuffle": {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[c["shuffle"]],
                "blocksize": int(c.get("blocksize", 0)), "typesize": int(c["typesize"])})
        elif len(inner) != 1:
            return
        self.chunk = chunk
        self.shard = grid
        self.shape = tuple(a.shape)
        self.dtype = np.dtype(a.dtype)
        if self.dtype.byteorder == ">":
            return
        if any(s % c for s, c in zip(self.shard, self.chunk)):
            return
        try:
            self.fill = np.asarray(a.metadata.fill_value, self.dtype)
        except (TypeError, ValueError):
            return
        self.cps = tuple(s // c for s, c in zip(self.shard, self.chunk))
        try:
            from zarr.core.indexing import morton_order_iter

            self.order = list(morton_order_iter(self.cps))
        except ImportError:  # any order is valid: the index says where each chunk lies
            import itertools

            self.order = list(itertools.product(*(range(n) for n in self.cps)))
        self.root = Path(a.store.root) / a.path
        self.ok = True

    def supports(self, index: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        """True when ``array[index] = data`` (``data.shape == shape``) is one whole shard."""
        if not self.ok:
            return False
        n = len(index)
        if any(s != 1 for s in self.shard[:n]):
            return False
        # the data must cover the shard's trailing dimensions (clipped to the array)
        return tuple(shape) == tuple(min(s, d) for s, d in zip(self.shard[n:], self.shape[n:]))

    def encode(self, data: np.ndarray) -> bytes | None:
        """The shard's bytes for ``data`` (the shard's trailing dimensions), None if empty."""
        import google_crc32c

        lead = len(self.shard) - data.ndim
        shard_tail = self.shard[lead:]
        x = np.asarray(data, self.dtype)
        if tuple(x.shape) != shard_tail:  # an edge shard: pad with the fill value
            pad = np.full(shard_tail, self.fill, self.dtype)
            pad[tuple(slice(0, s) for s in x.shape)] = x
            x = pad
        x = x.reshape(self.shard)
        index = np.full(self.cps + (2,), np.iinfo(np.uint64).max, "<u8")
        parts: list[bytes] = []
        off = 0
        for cc in self.order:
            sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cc, self.chunk))
            raw = np.ascontiguousarray(x[sl]).astype("<" + self.dtype.str[1:], copy=False)
            if not raw.view(np.uint8).any():
                continue  # all-zero bytes: zarr's fill value (0) reads back identically
            # encoded as zarr does: the chunk's bytes as a flat uint8 array
            b = self._codec.encode(raw.view(np.uint8).reshape(-1)) if self._codec is not None else raw.tobytes()
            parts.append(bytes(b))
            index[cc] = (off, len(b))
            off += len(b)
        if not parts:
            return None
        if not self.sharded:
            return parts[0]
        ib = index.tobytes()
        crc = np.uint32(google_crc32c.value(ib)).tobytes()
        return b"".join(parts) + ib + crc

    def write(self, index: tuple[int, ...], data: np.ndarray) -> None:
        """Write one whole shard at leading ``index`` (atomically: temp file + rename)."""
        if not self.supports(index, data.shape):
            self.array[index] = data
            return
        if self.fill.item() != 0 and self.fill.tobytes() != b"\0" * self.dtype.itemsize:
            self.array[index] = data  # the all-zero shortcut needs fill value 0
            return
        coords = tuple(int(i) for i in index) + (0,) * (len(self.shard) - len(index))
        key = self.array.metadata.encode_chunk_key(coords)
        path = self.root / key
        buf = self.encode(data)
        if buf is None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return
        if path.parent not in self._dirs:  # one mkdir per folder, not per image
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # the folder went away since (a store deleted and remade)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        with f:
            f.write(buf)
        os.replace(tmp, path)


_WRITERS: dict[tuple[str, str], ShardWriter] = {}


def write_image(array: zarr.Array, index: tuple[int, ...], data: np.ndarray) -> None:
    """``array[index] = data`` for one whole shard (one image), through :class:`ShardWriter`
    where it applies (a local store, bytes + zstd inner codecs), else through zarr."""
    key = (str(getattr(array.store, "root", id(array.store))), array.path)
    w = _WRITERS.get(key)
    if w is None or w.array.metadata != array.metadata:
        w = ShardWriter(array)
        if len(_WRITERS) > 64:
            _WRITERS.clear()
        _WRITERS[key] = w
    w.write(tuple(index), np.asarray(data))


def create_arrays(group: zarr.Group, specs: list[dict[str, Any]]) -> None:
    """Create several arrays in ``group`` (``specs``: keyword arguments of
    ``Group.create_array``, with ``name``). Their metadata writes run concurrently on zarr's
    event loop: a take has ~11 arrays and each creation is a round trip to the store, which
    on a busy machine or a network file system costs 10-20 ms apiece."""
    try:
        import asyncio

        from zarr.core.sync import sync

        ag = group._async_group

        async def _all():
            await asyncio.gather(*(ag.create_array(**s) for s in specs))

    except (ImportError, AttributeError):  # another zarr: one at a time
        for s in specs:
            group.create_array(**s)
        return
    sync(_all())


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
