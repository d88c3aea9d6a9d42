"""Image datasets for the head prior: EG3D-style image folders, and a twin-rendered portrait set.

Folder layout (EG3D's ``dataset_tool`` form, which FFHQ/EG3D releases use)::

    ROOT/dataset.json   {"labels": [["img/s0000_v00.png", [25 floats]], ...],
                         "subjects": [["img/s0000_v00.png", 0], ...]        (optional, ours)
                         "lightstage": {...provenance...}}                  (optional, ours)
    ROOT/img/*.png      display-referred 8-bit images (the GAN-style input)
    ROOT/linear/*.npy   linear Rec.709 radiance float32 (H, W, 3) (twin sets only)

A label is EG3D's camera: 16 cam2world (row-major, OpenCV axes, head frame) + 9 normalised
intrinsics (:func:`lightstage.camera.eg3d_label`). ``subjects`` groups images of one identity
(the multi-view auto-decoder objective uses it); a folder without it treats every image as its
own subject.

:func:`render_twin_dataset` makes such a folder from the digital twin: random subjects
(:func:`lightstage.twin.subject.random_subject`), each under one random environment (a smooth
sky/ambient term plus a key and a fill lobe, sampled as distant lights), seen from random views
on EG3D's camera sphere (radius 2.7 about the origin, aimed at the pivot (0, 0, 0.2), focal
4.2647). Tone mapping uses one fixed exposure and operator for the whole set (no per-image
normalisation), so brightness differences between environments remain in the data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lightstage.camera import EG3D_FOCAL, eg3d_label
from lightstage.rig import fibonacci_sphere

__all__ = [
    "DatasetError",
    "TwinDatasetConfig",
    "random_environment",
    "sample_eg3d_camera",
    "render_twin_dataset",
    "ImageFolderDataset",
    "EG3D_PIVOT",
    "EG3D_RADIUS",
]

EG3D_PIVOT = np.array([0.0, 0.0, 0.2])
EG3D_RADIUS = 2.7
_IMAGE_EXT = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file/field and the reason."""


@dataclass
class TwinDatasetConfig:
    """Size and sampling of a twin-rendered portrait set.

    ``yaw_deg``/``pitch_deg`` are the half-ranges of uniform view angles about the frontal
    camera; ``n_env_dirs`` the distant lights an environment is sampled on; ``shadows`` enables
    the twin's cast shadows (slower); ``operator``/``exposure_ev`` the fixed display transform.
    """

    n_subjects: int = 32
    views: int = 5
    resolution: int = 64
    seed: int = 0
    yaw_deg: float = 35.0
    pitch_deg: float = 15.0
    n_env_dirs: int = 32
    shadows: bool = False
    cube_n: int = 128
    operator: str = "aces"
    exposure_ev: float = 0.0


def random_environment(rng: np.random.Generator, n_dirs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A random smooth environment as distant lights.

    Returns ``directions`` (N, 3) unit vectors towards the lights (world, y up) and
    ``irradiance`` (N, 3) linear RGB: radiance at each direction times its solid angle 4π/N.
    The radiance is an ambient sky gradient plus a key lobe (front hemisphere, random colour
    temperature) and a weaker fill lobe; overall level varies by about ±1 stop.
    """
    d = fibonacci_sphere(n_dirs)

    def lobe(axis, sharp):
        return np.exp(sharp * (d @ axis - 1.0))

    def rand_dir(front=True):
        az = rng.uniform(-110, 110) if front else rng.uniform(-180, 180)
        el = rng.uniform(-10, 60)
        a, e = math.radians(az), math.radians(el)
        return np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])

    warm = np.array([1.0, 0.85, 0.7])
    cool = np.array([0.75, 0.85, 1.0])
    t = rng.uniform()
    key_col = warm * (1 - t) + cool * t
    sky = rng.uniform(0.15, 0.5) * (np.array([0.8, 0.9, 1.0]) * rng.uniform(0.8, 1.2, 3))
    ground = sky * rng.uniform(0.2, 0.6)
    up = (d[:, 1:2] + 1) / 2
    L = up * sky + (1 - up) * ground
    L = L + rng.uniform(2.0, 6.0) * lobe(rand_dir(), rng.uniform(3, 12))[:, None] * key_col
    L = L + rng.uniform(0.3, 1.5) * lobe(rand_dir(False), rng.uniform(2, 6))[:, None] * rng.uniform(0.6, 1.0, 3)
    L = L * 2.0 ** rng.uniform(-1, 1)
    return d, (L * (4 * math.pi / n_dirs)).astype(np.float64)


def sample_eg3d_camera(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """cam2world (4, 4) in the head frame: on the radius-2.7 sphere about the origin at the given
    yaw (about +y, positive towards +x) and pitch (positive above), aimed at the pivot."""
    from lightstage.rig import look_at

    a, e = math.radians(yaw_deg), math.radians(pitch_deg)
    eye = EG3D_RADIUS * np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    return look_at(eye, EG3D_PIVOT)


def _twin_camera(cam2world_head: np.ndarray, head2world: np.ndarray, res: int):
    from lightstage.rig import Camera, Sensor

    c2w = cam2world_head.copy()
    c2w[:3, 3] = head2world[:3, :3] @ cam2world_head[:3, 3] + head2world[:3, 3]
    f = EG3D_FOCAL * res
    K = [[f, 0, res / 2 - 0.5], [0, f, res / 2 - 0.5], [0, 0, 1]]  # OpenCV centres: c = R/2 - 0.5
    return Camera("view", K, [0.0] * 5, c2w.tolist(), Sensor(res, res))


def render_twin_dataset(out: str | os.PathLike, cfg: TwinDatasetConfig, overwrite: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Render ``cfg.n_subjects x cfg.views`` portraits of random twin subjects into ``out``.

    Writes ``img/*.png`` (display), ``linear/*.npy`` (linear radiance), ``dataset.json``.
    Refuses a folder that already holds a ``dataset.json`` unless ``overwrite``. Subject seeds
    run from ``cfg.seed * 1_000_003`` upwards (sets with different seeds share no subjects); a
    seed whose twin head renders empty or non-finite is skipped and listed in dataset.json
    under ``lightstage.rejected_subject_seeds``.
    """
    from lightstage.imageio import write_png
    from lightstage.tonemap import to_display
    from lightstage.twin.subject import HeadScene, random_subject

    out = Path(out)
    if (out / "dataset.json").exists() and not overwrite:
        raise DatasetError(f"{out / 'dataset.json'} exists; refusing to overwrite (use overwrite=True)")
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "linear").mkdir(parents=True, exist_ok=True)
    labels, subjects, envs, rejected = [], [], [], []
    total = cfg.n_subjects * cfg.views
    done = 0
    i = 0
    sseed = cfg.seed * 1_000_003 - 1
    while i < cfg.n_subjects:
        sseed += 1
        if len(rejected) > 4 * cfg.n_subjects + 8:
            raise DatasetError(f"the twin rendered {len(rejected)} empty subjects (seeds {rejected[:5]}...)")
        rng = np.random.default_rng(np.random.SeedSequence([sseed, 0xE6D3]))
        with np.errstate(invalid="ignore"):
            scene = HeadScene(random_subject(sseed), cube_n=cfg.cube_n, vis_n=48 if cfg.shadows else 0)
        head2world = np.linalg.inv(scene.world2head)
        dirs, irr = random_environment(rng, cfg.n_env_dirs)
        views = []
        for v in range(cfg.views):
            yaw = rng.uniform(-cfg.yaw_deg, cfg.yaw_deg)
            pitch = rng.uniform(-cfg.pitch_deg, cfg.pitch_deg)
            c2w = sample_eg3d_camera(yaw, pitch)
            cam = _twin_camera(c2w, head2world, cfg.resolution)
            with np.errstate(invalid="ignore"):
                lin = scene.radiance(cam, dirs, irr, distant=True).astype(np.float32)
            # Some procedural subjects come out empty or non-finite (a twin geometry failure):
            # such a subject is skipped and its seed recorded, never written as a black image.
            if not np.isfinite(lin).all() or (lin.max(-1) > 0).mean() < 0.05:
                break
            views.append((c2w, lin))
        if len(views) < cfg.views:
            rejected.append(sseed)
            continue
        envs.append({"subject": i, "subject_seed": sseed, "irradiance_sum": irr.sum(0).tolist()})
        for v, (c2w, lin) in enumerate(views):
            name = f"s{i:04d}_v{v:02d}"
            np.save(out / "linear" / f"{name}.npy", lin)
            write_png(out / "img" / f"{name}.png", to_display(lin, cfg.operator, cfg.exposure_ev))
            rel = f"img/{name}.png"
            labels.append([rel, [float(x) for x in eg3d_label(c2w)]])
            subjects.append([rel, i])
            done += 1
            if progress:
                progress(done, total)
        i += 1
    doc = {"labels": labels, "subjects": subjects,
           "lightstage": {"source": "digital twin", "config": asdict(cfg), "environments": envs,
                          "rejected_subject_seeds": rejected,
                          "display": f"{cfg.operator} @ EV {cfg.exposure_ev}, sRGB"}}
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, out / "dataset.json")
    return out


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images + EG3D labels (+ subject ids) from a folder with ``dataset.json``.

    Items: ``{'image': float32 [3, R, R] in [-1, 1], 'label': float32 [25], 'subject': int64,
    'index': int64}``. Images are matched to labels by relative path (as EG3D does), must be
    square, and are resized (antialiased) to ``resolution`` when given. Everything is decoded
    once and kept in memory (``cache=True``), which is what small CPU runs want.
    """

    def __init__(self, root: str | os.PathLike, resolution: int | None = None, cache: bool = True):
        self.root = Path(root)
        meta = self.root / "dataset.json"
        if not meta.exists():
            raise DatasetError(f"{meta}: not found (a prior dataset needs EG3D camera labels)")
        try:
            doc = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta}: not valid JSON ({e})") from e
        if not isinstance(doc.get("labels"), list):
            raise DatasetError(f"{meta}: field 'labels' missing or not a list")
        labels = {}
        for k, entry in enumerate(doc["labels"]):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) and len(entry[1]) == 25):
                raise DatasetError(f"{meta}: labels[{k}] must be [relative_path, [25 floats]]")
            labels[entry[0].replace("\\", "/")] = np.asarray(entry[1], dtype=np.float32)
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                       if p.suffix.lower() in _IMAGE_EXT)
        if not files:
            raise DatasetError(f"{self.root}: no images (.png/.jpg) found")
        missing = [f for f in files if f not in labels]
        if missing:
            raise DatasetError(f"{meta}: no label for image(s) {missing[:3]}"
                               f"{' and %d more' % (len(missing) - 3) if len(missing) > 3 else ''}")
        self.files = files
        self.labels = np.stack([labels[f] for f in files])
        subj = {}
        if isinstance(doc.get("subjects"), list):
            for k, entry in enumerate(doc["subjects"]):
                if not (isinstance(entry, list) and len(entry) == 2):
                    raise DatasetError(f"{meta}: subjects[{k}] must be [relative_path, int]")
                subj[entry[0]] = int(entry[1])
        raw = [subj.get(f, -1 - k) for k, f in enumerate(files)]  # unlabelled: own subject each
        uniq = {s: n for n, s in enumerate(dict.fromkeys(raw))}
        self.subjects = np.array([uniq[s] for s in raw], dtype=np.int64)
        self.n_subjects = len(uniq)
        self.resolution = resolution
        self._cache: dict[int, torch.Tensor] = {}
        self.cache = cache
        if resolution is None:
            self.resolution = self._load(0).shape[-1]

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        from PIL import Image

        path = self.root / self.files[i]
        try:
            im = Image.open(path).convert("RGB")
        except Exception as e:
            raise DatasetError(f"{path}: cannot read image ({e})") from e
        if im.width != im.height:
            raise DatasetError(f"{path}: image must be square, got {im.width}x{im.height}")
        if self.resolution is not None and im.width != self.resolution:
            im = im.resize((self.resolution, self.resolution), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        if self.cache:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> dict:
        return {"image": self._load(i), "label": torch.from_numpy(self.labels[i]),
                "subject": torch.tensor(self.subjects[i]), "index": torch.tensor(i)}

    def subject_items(self, s: int) -> list[int]:
        """Indices of all images of subject ``s``."""
        return np.flatnonzero(self.subjects == s).tolist()
