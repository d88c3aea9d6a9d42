"""Import a FaceOLAT-style tree of linear EXR frames into the lightstage store.

Tree layout::

    ROOT/
      CamXX/<ID>/<ID>.<frame:06d>.exr           float EXR, linear camera RGB, one per frame
      lights/light_pattern_metadata.json        {"light_positions": N x 3 (mm, y up),
                                                 "light_patterns": [{"light_index_durations":
                                                     {index: duration} | [[index, duration], ...]}, ...]}
      lights/light_pattern_per_frame.json       [[frame, pattern], ...]
      (colour matrix: passed in, or ROOT/colour_matrix.json / color_matrix.json /
       lights/color_matrix.json holding a 3x4 [black | 3x3] or a 3x3 matrix)

Conventions of the import (recorded in the take's ``ingest`` attribute):

* A pattern with exactly one light is an OLAT of that light; a pattern lighting at least
  ``tracking_fraction`` of all lights is a fully lit tracking frame; others are skipped and
  listed in provenance.
* Colour: ``rgb = M @ (camera_rgb - black)`` with the 3x4 matrix ``[black | M]``; a 3x3 matrix
  means no black offset; none means the EXRs are already in the working space.
* Per unit light: a light flashed for ``d`` (the pattern's duration, the tree's unit) delivers
  ``d`` units of exposure, so the OLAT is divided by ``d`` and ``light_rgb = (d, d, d)``; the
  tree carries no calibrated light colour.
* Geometry: light positions are converted from mm to metres; directions point from the rig
  centre (the tree's origin) to each light. Cameras come from an optional lightstage
  calibration file; without one K is a centred pinhole (f = max(H, W)) and cam2world the
  identity, flagged ``"uncalibrated"``.
* Motion compensation as in ``ls-ingest`` (:mod:`lightstage.align`): flows from the central
  tracking frame, linear in time between tracking frames.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import align
from ..calibfile import Calibration, load_calibration
from ..imageio import ImageIOError, read_exr
from ..ingest import (CHECKSUM_TEXT, DONE_WRITTEN, F16_MAX, IngestError, _extra_arrays,
                      image_checksum)
from ..manifest import sha256_file
from ..store import create_take, provenance

__all__ = ["FaceOLATTree", "scan_faceolat", "import_faceolat", "load_colour_matrix"]

_CAM = re.compile(r"^Cam\d+$", re.IGNORECASE)
_FRAME = re.compile(r"^(?P<id>.+)\.(?P<frame>\d{6})\.exr$", re.IGNORECASE)


@dataclass
class FaceOLATTree:
    """What :func:`scan_faceolat` found.

    ``files[camera][frame]`` is the EXR path; ``patterns[k]`` maps light index -> duration;
    ``frame_pattern[frame]`` the pattern shown in that frame; ``light_positions`` (N, 3) m."""

    root: Path
    subject: str
    cameras: list[str]
    files: dict[str, dict[int, Path]]
    light_positions: np.ndarray
    patterns: list[dict[int, float]]
    frame_pattern: dict[int, int]
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _json(path: Path) -> Any:
    if not path.exists():
        raise IngestError(f"{path}: missing (a FaceOLAT tree needs it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON ({e})") from None


def _durations(v: Any, where: str) -> dict[int, float]:
    try:
        if isinstance(v, dict):
            d = {int(k): float(x) for k, x in v.items()}
        else:
            d = {int(k): float(x) for k, x in v}
    except (TypeError, ValueError):
        raise IngestError(f"{where}: expected {{index: duration}} or [[index, duration], ...]") from None
    if any(x <= 0 for x in d.values()):
        raise IngestError(f"{where}: durations must be positive")
    return d


def scan_faceolat(root: str | Path, subject: str | None = None) -> FaceOLATTree:
    """Index a FaceOLAT tree; raises :class:`IngestError` naming the file and field at fault."""
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"{root}: no such folder")
    meta_p = root / "lights" / "light_pattern_metadata.json"
    per_p = root / "lights" / "light_pattern_per_frame.json"
    meta, per = _json(meta_p), _json(per_p)
    if not isinstance(meta, dict) or "light_positions" not in meta or "light_patterns" not in meta:
        raise IngestError(f"{meta_p}: needs 'light_positions' and 'light_patterns'")
    pos = np.asarray(meta["light_positions"], np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or not np.all(np.isfinite(pos)):
        raise IngestError(f"{meta_p}: light_positions must be N x 3 finite numbers, got shape {pos.shape}")
    pos = pos / 1000.0  # mm -> m
    if np.any(np.linalg.norm(pos, axis=1) < 1e-6):
        raise IngestError(f"{meta_p}: a light position sits at the rig centre")
    patterns = []
    for k, p in enumerate(meta["light_patterns"]):
        where = f"{meta_p}: light_patterns[{k}].light_index_durations"
        if not isinstance(p, dict) or "light_index_durations" not in p:
            raise IngestError(f"{where}: missing")
        d = _durations(p["light_index_durations"], where)
        bad = [i for i in d if not 0 <= i < len(pos)]
        if bad:
            raise IngestError(f"{where}: light index {bad[0]} out of range 0..{len(pos) - 1}")
        patterns.append(d)
    frame_pattern = {}
    try:
        for f, k in per:
            frame_pattern[int(f)] = int(k)
    except (TypeError, ValueError):
        raise IngestError(f"{per_p}: expected [[frame, pattern], ...]") from None
    for f, k in frame_pattern.items():
        if not 0 <= k < len(patterns):
            raise IngestError(f"{per_p}: frame {f} uses pattern {k}; there are {len(patterns)}")
    cams = sorted(p.name for p in root.iterdir() if p.is_dir() and _CAM.match(p.name))
    if not cams:
        raise IngestError(f"{root}: no CamXX folders")
    files: dict[str, dict[int, Path]] = {}
    ids = set()
    for c in cams:
        subs = sorted(p for p in (root / c).iterdir() if p.is_dir())
        if subject is not None:
            subs = [p for p in subs if p.name == subject]
        if len(subs) != 1:
            raise IngestError(f"{root / c}: expected one subject folder"
                              + (f" named {subject!r}" if subject else f", found {[p.name for p in subs]}"))
        ids.add(subs[0].name)
        fm = {}
        for p in subs[0].iterdir():
            m = _FRAME.match(p.name)
            if m and m.group("id") == subs[0].name:
                fm[int(m.group("frame"))] = p
        files[c] = fm
    if len(ids) != 1:
        raise IngestError(f"{root}: cameras hold different subjects {sorted(ids)}")
    return FaceOLATTree(root, ids.pop(), cams, files, pos, patterns, frame_pattern)


def load_colour_matrix(v: Any, where: str = "colour matrix") -> tuple[np.ndarray, np.ndarray]:
    """``(M 3x3, black (3,))`` from a 3x4 ``[black | M]``, a 3x3 ``M``, a JSON/NPY/text file."""
    if isinstance(v, (str, Path)):
        p = Path(v)
        where = str(p)
        if not p.exists():
            raise IngestError(f"{p}: no such colour matrix file")
        if p.suffix == ".json":
            d = json.loads(p.read_text())
            v = d.get("colour_matrix", d.get("color_matrix", d)) if isinstance(d, dict) else d
        elif p.suffix == ".npy":
            v = np.load(p, allow_pickle=False)
        else:
            v = np.loadtxt(p)
    a = np.asarray(v, np.float64)
    if a.shape == (3, 4):
        return a[:, 1:], a[:, 0]
    if a.shape == (3, 3):
        return a, np.zeros(3)
    raise IngestError(f"{where}: expected a 3x4 [black | 3x3] or a 3x3 matrix, got shape {a.shape}")


def _find_matrix(root: Path) -> Path | None:
    for p in (root / "colour_matrix.json", root / "color_matrix.json",
              root / "lights" / "colour_matrix.json", root / "lights" / "color_matrix.json"):
        if p.exists():
            return p
    return None


def import_faceolat(root: str | Path, out: str | Path, *, subject: str | None = None,
                    take: str = "t0", colour_matrix: Any = None,
                    calibration: str | Path | Calibration | None = None, dtype: str = "float16",
                    scale: float | None = None, motion: bool = True, overwrite: bool = False,
                    tracking_fraction: float = 0.5, flow: align.FlowConfig | None = None,
                    mask_threshold: float = 0.05, flow_stride: int = 4) -> str:
    """Import a FaceOLAT tree as take ``<ID>/<take>`` of the store ``out``; returns the group path.

    Parameters are described in the module docstring; ``colour_matrix`` may be an array or a
    file path (default: looked up in the tree, else identity). Flows are stored as ls-ingest
    stores them (float16 on a grid subsampled by ``flow_stride``)."""
    tree = scan_faceolat(root, subject)
    N = len(tree.light_positions)
    olat: dict[int, int] = {}
    tracking: list[int] = []
    skipped = []
    for f in sorted(tree.frame_pattern):
        d = tree.patterns[tree.frame_pattern[f]]
        if len(d) == 1:
            olat.setdefault(next(iter(d)), f)
        elif len(d) >= tracking_fraction * N:
            tracking.append(f)
        else:
            skipped.append({"frame": f, "reason": f"pattern {tree.frame_pattern[f]} lights {len(d)} of {N}"})
    if not olat:
        raise IngestError(f"{tree.root}: no single-light pattern in light_pattern_per_frame.json")
    lights = sorted(olat)
    for c in tree.cameras:
        for f in [olat[i] for i in lights] + tracking:
            if f not in tree.files[c]:
                raise IngestError(f"{tree.root / c / tree.subject / f'{tree.subject}.{f:06d}.exr'}: "
                                  f"missing (frame {f} is listed in light_pattern_per_frame.json)")
    mpath = colour_matrix if colour_matrix is not None else _find_matrix(tree.root)
    M, black = (np.eye(3), np.zeros(3)) if mpath is None else load_colour_matrix(mpath)
    M32, b32 = M.astype(np.float32), black.astype(np.float32)[:, None, None]
    dur = np.array([tree.patterns[tree.frame_pattern[olat[i]]][i] for i in lights])
    light_rgb = np.repeat(dur[:, None], 3, axis=1)

    def load(c: str, f: int) -> np.ndarray:
        p = tree.files[c][f]
        try:
            img = read_exr(p)
        except ImageIOError as e:
            raise IngestError(str(e)) from None
        rgb = np.moveaxis(img, -1, 0) - b32
        return np.tensordot(M32, rgb, axes=1).astype(np.float32)

    first = read_exr(tree.files[tree.cameras[0]][olat[lights[0]]])
    H, W = first.shape[:2]
    cal = load_calibration(calibration) if isinstance(calibration, (str, Path)) else calibration
    Ks, c2ws, dists, calibrated = [], [], [], cal is not None
    for c in tree.cameras:
        if cal is not None:
            if c not in cal.cameras:
                raise IngestError(f"calibration has no camera {c!r} (has {sorted(cal.cameras)})")
            cc = cal.cameras[c]
            Ks.append(cc.K), c2ws.append(cc.cam2world)
            dists.append(np.pad(np.asarray(cc.distortion, float)[:5], (0, max(0, 5 - len(cc.distortion)))))
        else:
            f0 = float(max(H, W))
            Ks.append(np.array([[f0, 0, (W - 1) / 2], [0, f0, (H - 1) / 2], [0, 0, 1]]))
            c2ws.append(np.eye(4)), dists.append(np.zeros(5))
    if scale is None:
        if dtype == "float32":
            scale = 1.0
        else:  # typical O(1), the peak of a sample of OLATs well inside float16
            samp = [load(tree.cameras[0], olat[i]) / np.float32(dur[k])
                    for k, i in enumerate(lights[:: max(1, len(lights) // 16)])]
            v = np.abs(np.stack(samp))
            pos = v[v > 0]
            typical = float(np.median(pos)) if pos.size else 1.0
            scale = float(f"{max(typical, float(v.max()) / 30000.0, 1e-30):.3g}")
    dirs = tree.light_positions[lights] / np.linalg.norm(tree.light_positions[lights], axis=1, keepdims=True)
    inputs = {str(p.relative_to(tree.root)): sha256_file(p)
              for c in tree.cameras for p in tree.files[c].values()}
    attrs = {
        "lights": lights, "light_directions": dirs, "light_rgb": light_rgb,
        "K": np.stack(Ks), "distortion": np.stack(dists), "cam2world": np.stack(c2ws),
        "world2head": (cal.world2head if cal is not None and cal.world2head is not None else np.eye(4)),
        "rig": {"name": "faceolat", "light_positions": tree.light_positions.tolist()},
        "calibration": None if cal is None else cal.to_dict(),
        "exposures": {}, "tracking_frames": tracking, "olat_frames": [olat[i] for i in lights],
        "ingest": {"importer": "faceolat", "colour_matrix": M.tolist(), "black": black.tolist(),
                   "cameras": "calibrated" if calibrated else "uncalibrated",
                   "unit_light": "one duration unit of one light (light_rgb = duration)",
                   "tracking_normalisation": "tracking radiance / mean light_rgb",
                   "mask_rule": f"reference tracking luminance > {mask_threshold} x its 99.5th percentile",
                   "done_codes": {"0": "to do", "1": "written", "2": "skipped (bad input)"},
                   "checksum": CHECKSUM_TEXT},
    }
    C, T, L = len(tree.cameras), max(len(tracking), 1), len(lights)
    g = create_take(out, tree.subject, take, cameras=tree.cameras, n_lights=L,
                    n_tracking=T, height=H, width=W, attrs=attrs, dtype=dtype,
                    scale=scale, overwrite=overwrite,
                    extra_arrays=_extra_arrays(C, T, L, H, W, flow_stride))
    g.attrs["provenance"] = json.loads(json.dumps(provenance(
        source=str(tree.root), inputs_sha256=inputs, skipped=skipped), default=str))

    def store(x):
        y = x / np.float32(scale)
        if dtype == "float16":
            np.clip(y, -F16_MAX, F16_MAX, out=y)
        return y.astype(dtype)

    fcfg = flow or align.FlowConfig()
    norm = np.float32(light_rgb.mean())
    sums = np.zeros((C, L), np.uint64)
    tsums = np.zeros((C, T), np.uint64)
    refs = []
    for ci, c in enumerate(tree.cameras):
        flows, cons = {}, {}
        if tracking:
            r = align.reference_index(len(tracking))
            refs.append(tracking[r])
            ref = load(c, tracking[r])
            lum = align.luminance(ref)
            white = align.tone_white(lum)
            ref_u8 = align.tone_u8(lum, white)
            g["mask"][ci] = (lum > mask_threshold * white).astype(np.uint8) * 255
            for j, f in enumerate(tracking):
                img = ref if j == r else load(c, f)
                if motion and j != r:
                    u8 = align.tone_u8(align.luminance(img), white)
                    fw = align.compute_flow(ref_u8, u8, fcfg, lum > mask_threshold * white)
                    bw = align.compute_flow(u8, ref_u8, align.FlowConfig(**{**vars(fcfg), "model": "dense"}))
                    ok = align.fb_consistency(fw, bw, fcfg.fb_threshold, fcfg.fb_relative)
                    # stored compactly (ls-ingest's rule); every image uses the stored flow
                    fw = align.decode_flow(align.encode_flow(fw, flow_stride), H, W, flow_stride)
                    img, inside = align.warp(img, fw)
                    ok &= inside
                else:
                    fw, ok = np.zeros((H, W, 2), np.float32), np.ones((H, W), bool)
                flows[j], cons[j] = fw, ok
                s = store(img / norm)
                g["tracking"][ci, j] = s
                g["flow"][ci, j] = align.encode_flow(fw, flow_stride)
                g["flow_valid"][ci, j] = ok.astype(np.uint8) * 255
                tsums[ci, j] = image_checksum(s)
            g["tracking_ok"][ci] = np.ones(T, np.uint8)
        else:  # no tracking frame: nothing to threshold, every pixel counts as foreground
            refs.append(None)
            g["mask"][ci] = np.full((H, W), 255, np.uint8)
        for li, i in enumerate(lights):
            f = olat[i]
            img = load(c, f) / np.float32(dur[li])
            valid = np.ones((H, W), bool)
            if tracking and motion:
                ia, ib, s_ = align.bracketing(f, tracking)
                F = align.interpolate_flow(flows[ia], flows[ib], s_)
                img, inside = align.warp(img, F)
                valid = cons[ia] & cons[ib] & inside
            s = store(img)
            vm = valid.astype(np.uint8) * 255
            g["olat"][ci, li] = s
            g["valid"][ci, li] = vm
            sums[ci, li] = image_checksum(s, vm)
    g["checksum"][...] = sums
    g["tracking_checksum"][...] = tsums
    g["tracking_done"][...] = np.ones(C, np.uint8)
    g["done"][...] = np.full((C, L), DONE_WRITTEN, np.uint8)
    g.attrs["reference_frames"] = refs
    return f"{tree.subject}/{take}"
