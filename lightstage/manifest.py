"""Capture manifests: what a light stage (or the twin) wrote for one subject/take.

A capture folder looks like a real stage's output::

    CAPTURE/
      rig.json                              the rig (lightstage-rig)
      <subject>/<take>/capture.json         this manifest (lightstage-capture)
      <subject>/<take>/raw/<camera>/f<frame:04d>_e<bracket>.dng
      <subject>/<take>/truth/...            twin only: ground truth (see lightstage.twin)
      calibration/...                       calibration captures (charts, boards, spheres)

Manifest schema (``"format": "lightstage-capture", "version": 1``)::

    {"format": "lightstage-capture", "version": 1,
     "rig": "../../rig.json",                # path relative to the manifest, or an inline dict
     "subject": "s000", "take": "t0",
     "frames": [{"index": 0, "kind": "olat"|"tracking"|"dark", "light": int|null,
                 "files": {"<camera>": [{"path": "raw/cam00/f0000_e0.dng",
                                         "exposure": 0.0333, "iso": 100,
                                         "sha256": "..."}, ...]}}, ...],
     "provenance": {...}}

File paths are relative to the manifest's folder. The bracket list of each camera is ordered
as the rig's ``exposures`` (longest first). ``sha256`` lets ingest verify inputs and record
their hashes in provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rig import Rig, load_rig, rig_from_dict, rig_to_dict

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "ManifestError",
    "RawFile",
    "FrameRecord",
    "CaptureManifest",
    "load_manifest",
    "find_manifests",
    "sha256_file",
]

MANIFEST_FORMAT = "lightstage-capture"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    pass


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RawFile:
    path: str
    exposure: float
    iso: int = 100
    sha256: str | None = None


@dataclass
class FrameRecord:
    index: int
    kind: str
    light: int | None
    files: dict[str, list[RawFile]]


@dataclass
class CaptureManifest:
    root: Path  # folder of the manifest; file paths are relative to it
    rig: Rig
    subject: str
    take: str
    frames: list[FrameRecord]
    provenance: dict[str, Any] = field(default_factory=dict)
    rig_ref: str | dict | None = None

    def path(self, f: RawFile) -> Path:
        return self.root / f.path

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "rig": self.rig_ref if self.rig_ref is not None else rig_to_dict(self.rig),
            "subject": self.subject,
            "take": self.take,
            "frames": [
                {"index": fr.index, "kind": fr.kind, "light": fr.light,
                 "files": {cam: [vars(rf) for rf in lst] for cam, lst in fr.files.items()}}
                for fr in self.frames
            ],
            "provenance": self.provenance,
        }

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else self.root / "capture.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path


def load_manifest(path: str | Path) -> CaptureManifest:
    """Load and validate a capture manifest (a ``capture.json`` or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "capture.json"
    if not path.exists():
        raise ManifestError(f"{path}: no capture manifest")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    errs = []
    if d.get("format") != MANIFEST_FORMAT:
        errs.append(f"format: expected {MANIFEST_FORMAT!r}, got {d.get('format')!r}")
    if d.get("version") != MANIFEST_VERSION:
        errs.append(f"version: unsupported {d.get('version')!r}")
    rig_ref = d.get("rig")
    rig = None
    if isinstance(rig_ref, str):
        rig = load_rig(path.parent / rig_ref if not Path(rig_ref).is_absolute() else rig_ref)
    elif isinstance(rig_ref, dict):
        rig = rig_from_dict(rig_ref, source=f"{path}:rig")
    else:
        errs.append("rig: expected a path or an inline rig")
    frames = []
    for i, fd in enumerate(d.get("frames") or []):
        try:
            files = {
                cam: [RawFile(str(r["path"]), float(r["exposure"]), int(r.get("iso", 100)), r.get("sha256"))
                      for r in lst]
                for cam, lst in fd["files"].items()
            }
            frames.append(FrameRecord(int(fd["index"]), str(fd["kind"]), fd.get("light"), files))
        except (KeyError, TypeError, ValueError) as e:
            errs.append(f"frames[{i}]: malformed ({e!r})")
    if not frames:
        errs.append("frames: none listed")
    if errs:
        raise ManifestError(f"{path}: invalid manifest:\n  " + "\n  ".join(errs))
    return CaptureManifest(root=path.parent, rig=rig, subject=str(d.get("subject", "subject")),
                           take=str(d.get("take", "take")), frames=frames,
                           provenance=dict(d.get("provenance") or {}), rig_ref=rig_ref)


def find_manifests(capture_root: str | Path) -> list[Path]:
    """Every ``capture.json`` below a capture folder (one per subject/take), sorted."""
    root = Path(capture_root)
    if (root / "capture.json").exists():
        return [root / "capture.json"]
    return sorted(p for p in root.rglob("capture.json") if "calibration" not in p.parts)
