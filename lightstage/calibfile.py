"""The calibration file: one versioned, human-readable JSON written by ``ls-calibrate`` (or by
the digital twin from its ground truth) and read by ``ls-ingest``.

Schema (``"format": "lightstage-calibration", "version": 1``)::

    {
      "format": "lightstage-calibration", "version": 1,
      "rig": "demo",                       # name of the rig it calibrates
      "source": "ls-calibrate" | "twin-ground-truth",
      "cameras": {
        "<name>": {
          "K": 3x3, "distortion": [k1,k2,p1,p2,k3], "cam2world": 4x4,   # metres, world frame
          "image_size": [height, width],
          "colour_matrix": 3x3,  # camera RGB (black-subtracted, normalised by (white-black),
                                 #  divided by exposure x gain) -> linear Rec.709 radiance
          "colour_method": "matrix-3x3" | "root-polynomial-2" ...,
          "colour_terms": [...], # optional extra coefficients for non-3x3 methods (Nx3)
          "vignetting": [a1, a2],  # radial gain 1 + a1 r^2 + a2 r^4 (r = distance from the
                                 #  principal point / half-diagonal); divide raw by it
          "residuals": {"reprojection_rms_px": .., "delta_e2000_mean": .., "delta_e2000_max": ..}
        }, ...
      },
      "lights": [ {"index": i, "direction": [x,y,z], "position": [x,y,z] | null,
                   "rgb": [r,g,b]}, ... ],     # rgb: linear intensity (what 'unit light' divides)
      "world2head": 4x4 | null,
      "provenance": {...}
    }

The colour matrix maps exposure-normalised camera RGB to scene-linear radiance in the working
space. It includes white balance, so no separate gains are applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIB_FORMAT",
    "CALIB_VERSION",
    "CalibrationError",
    "CameraCalibration",
    "LightCalibration",
    "Calibration",
    "load_calibration",
    "save_calibration",
]

CALIB_FORMAT = "lightstage-calibration"
CALIB_VERSION = 1


class CalibrationError(ValueError):
    pass


@dataclass
class CameraCalibration:
    K: np.ndarray
    distortion: np.ndarray
    cam2world: np.ndarray
    image_size: tuple[int, int]
    colour_matrix: np.ndarray
    colour_method: str = "matrix-3x3"
    colour_terms: np.ndarray | None = None
    vignetting: np.ndarray = field(default_factory=lambda: np.zeros(2))
    residuals: dict[str, float] = field(default_factory=dict)


@dataclass
class LightCalibration:
    index: int
    direction: np.ndarray
    rgb: np.ndarray
    position: np.ndarray | None = None


@dataclass
class Calibration:
    rig: str
    cameras: dict[str, CameraCalibration]
    lights: list[LightCalibration]
    source: str = "ls-calibrate"
    world2head: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def light_directions(self) -> np.ndarray:
        return np.stack([l.direction for l in self.lights])

    def light_rgb(self) -> np.ndarray:
        return np.stack([l.rgb for l in self.lights])

    def to_dict(self) -> dict[str, Any]:
        def L(a):
            return None if a is None else np.asarray(a).tolist()

        return {
            "format": CALIB_FORMAT,
            "version": CALIB_VERSION,
            "rig": self.rig,
            "source": self.source,
            "cameras": {
                n: {
                    "K": L(c.K), "distortion": L(c.distortion), "cam2world": L(c.cam2world),
                    "image_size": list(c.image_size), "colour_matrix": L(c.colour_matrix),
                    "colour_method": c.colour_method, "colour_terms": L(c.colour_terms),
                    "vignetting": L(c.vignetting),
                    "residuals": {k: float(v) for k, v in c.residuals.items()},
                }
                for n, c in self.cameras.items()
            },
            "lights": [
                {"index": l.index, "direction": L(l.direction), "position": L(l.position), "rgb": L(l.rgb)}
                for l in self.lights
            ],
            "world2head": L(self.world2head),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | None = None) -> "Calibration":
        where = f"{source}: " if source else ""
        errs: list[str] = []
        if not isinstance(d, dict):
            raise CalibrationError(f"{where}expected a JSON object")
        if d.get("format") != CALIB_FORMAT:
            errs.append(f"format: expected {CALIB_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != CALIB_VERSION:
            errs.append(f"version: unsupported {d.get('version')!r}")

        def arr(x, shape, path):
            try:
                a = np.asarray(x, dtype=np.float64)
            except (TypeError, ValueError):
                errs.append(f"{path}: not numeric")
                return None
            if shape is not None and a.shape != shape:
                errs.append(f"{path}: expected shape {shape}, got {a.shape}")
                return None
            if not np.all(np.isfinite(a)):
                errs.append(f"{path}: non-finite values")
                return None
            return a

        cams = {}
        for n, c in (d.get("cameras") or {}).items():
            p = f"cameras.{n}"
            if not isinstance(c, dict):
                errs.append(f"{p}: expected an object")
                continue
            missing = [k for k in ("K", "cam2world", "colour_matrix", "image_size") if k not in c]
            for k in missing:
                errs.append(f"{p}.{k}: missing")
            if missing:
                continue
            K = arr(c["K"], (3, 3), f"{p}.K")
            c2w = arr(c["cam2world"], (4, 4), f"{p}.cam2world")
            M = arr(c["colour_matrix"], (3, 3), f"{p}.colour_matrix")
            dist = arr(c.get("distortion", [0] * 5), None, f"{p}.distortion")
            terms = None if c.get("colour_terms") is None else arr(c["colour_terms"], None, f"{p}.colour_terms")
            vig = arr(c.get("vignetting", [0.0, 0.0]), (2,), f"{p}.vignetting")
            if any(x is None for x in (K, c2w, M, dist, vig)):
                continue
            cams[n] = CameraCalibration(K, dist, c2w, tuple(int(v) for v in c["image_size"]), M,
                                        c.get("colour_method", "matrix-3x3"), terms, vig,
                                        dict(c.get("residuals") or {}))
        if not cams:
            errs.append("cameras: no camera calibrated")
        lights = []
        for i, l in enumerate(d.get("lights") or []):
            p = f"lights[{i}]"
            if not isinstance(l, dict) or "direction" not in l or "rgb" not in l:
                errs.append(f"{p}: needs direction and rgb")
                continue
            dvec = arr(l["direction"], (3,), f"{p}.direction")
            rgb = arr(l["rgb"], (3,), f"{p}.rgb")
            pos = None if l.get("position") is None else arr(l["position"], (3,), f"{p}.position")
            if dvec is None or rgb is None:
                continue
            if abs(np.linalg.norm(dvec) - 1) > 1e-3:
                errs.append(f"{p}.direction: not a unit vector")
            if np.any(rgb <= 0):
                errs.append(f"{p}.rgb: must be positive")
            lights.append(LightCalibration(int(l.get("index", i)), dvec, rgb, pos))
        w2h = None if d.get("world2head") is None else arr(d["world2head"], (4, 4), "world2head")
        if errs:
            raise CalibrationError(where + "invalid calibration:\n  " + "\n  ".join(errs))
        return cls(rig=str(d.get("rig", "")), cameras=cams, lights=lights,
                   source=str(d.get("source", "")), world2head=w2h,
                   provenance=dict(d.get("provenance") or {}))


def save_calibration(cal: Calibration, path: str | Path, overwrite: bool = False) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise CalibrationError(f"{path}: exists (use --overwrite to replace it)")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cal.to_dict(), indent=1) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves a half-written calibration


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not valid JSON ({e})") from None
    return Calibration.from_dict(d, source=str(path))
