"""OLAT training data read straight from the Zarr store (no conversion step).

A :class:`OlatDataset` spans one or more takes of a store (``lightstage.store``). Each item is
one (take, camera, group of lights) with either ``rays_per_item`` random pixels, drawn with a
chosen fraction from the foreground mask, or a square crop. Rays are built from the store's
pixel intrinsics, distortion and ``cam2world`` and mapped into the EG3D head frame with the
take's ``world2head`` similarity; light directions are mapped the same way. Radiance stays
linear (stored value x ``attrs.scale``, per unit light), float32.

Splits: :func:`make_splits` holds out lights (the same light indices in every take) and whole
subjects, deterministically from a seed.

Item layout (N rays, Lb lights):

=============  ==============  ==================================================
key            shape           meaning
=============  ==============  ==================================================
take           ()              index into ``dataset.takes``
camera         ()              camera index within the take
lights         (Lb,)           light indices (the store's light axis)
light_dirs     (Lb, 3)         unit directions subject -> light, head frame
origins        (N, 3)          ray origins, head frame
dirs           (N, 3)          unit ray directions, head frame
pixels         (N, 2)          (y, x) integer pixel of each ray
target         (Lb, N, 3)      linear radiance per unit light
mask           (N,)            1 on the foreground, 0 elsewhere
valid          (Lb, N)         1 where the store trusts the pixel (``valid`` array)
=============  ==============  ==================================================

References
----------
Chan, E. R. et al. (2022). EG3D: normalised cameras (intrinsics divided by the image size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from lightstage.camera import eg3d_label, pixel_rays
from lightstage.store import StoreError, Take, list_takes, open_take

__all__ = [
    "DataConfig",
    "Splits",
    "HeadCamera",
    "make_splits",
    "open_takes",
    "validate_takes",
    "head_cameras",
    "similarity_parts",
    "OlatDataset",
    "collate",
]


@dataclass
class DataConfig:
    """How items are drawn.

    Attributes
    ----------
    rays_per_item : N random rays per item (``sampling='rays'``).
    lights_per_item : Lb lights per item (same camera and rays for all of them).
    fg_fraction : fraction of the rays drawn uniformly from the foreground mask; the rest
        uniformly from the whole image (so the background is learnt as dark, not ignored).
    sampling : 'rays' (random pixels) or 'crop' (a ``crop`` x ``crop`` square around a
        random foreground pixel).
    crop : crop edge in pixels.
    cache : keep each decoded (camera, light) image in memory after its first read (right
        for small stores; off streams from the store every time).
    """

    rays_per_item: int = 1024
    lights_per_item: int = 4
    fg_fraction: float = 0.8
    sampling: str = "rays"
    crop: int = 32
    cache: bool = True

    def __post_init__(self):
        if self.sampling not in ("rays", "crop"):
            raise ValueError(f"DataConfig.sampling must be 'rays' or 'crop', got {self.sampling!r}")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(f"DataConfig.fg_fraction must be in [0, 1], got {self.fg_fraction}")
        if self.rays_per_item < 1 or self.lights_per_item < 1 or self.crop < 1:
            raise ValueError("DataConfig: rays_per_item, lights_per_item and crop must be >= 1")


@dataclass
class Splits:
    """Train / validation partition of takes (``subject/take``) and light indices."""

    train_takes: list[str]
    val_takes: list[str]
    train_lights: list[int]
    val_lights: list[int]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.__dict__.items()}


@dataclass
class HeadCamera:
    """One store camera in the head frame (EG3D normalised convention).

    cam2world : (4, 4) OpenCV cam2world with an orthonormal rotation, head units.
    K_norm : (3, 3) intrinsics divided by the image width (row 0) and height (row 1).
    label : (25,) EG3D camera label.
    height, width : image size in pixels.
    """

    cam2world: np.ndarray
    K_norm: np.ndarray
    label: np.ndarray
    height: int
    width: int


def similarity_parts(world2head: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Split a similarity ``x_h = s R x + t`` into (s, R (3,3), t (3,)); refuses non-similarities."""
    M = np.asarray(world2head, dtype=np.float64)
    if M.shape != (4, 4):
        raise StoreError(f"world2head must be 4x4, got {M.shape}")
    A = M[:3, :3]
    s = float(np.cbrt(np.linalg.det(A)))
    if not s > 0:
        raise StoreError("world2head: determinant <= 0 (not a proper similarity)")
    R = A / s
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4):
        raise StoreError("world2head is not a similarity (rotation x uniform scale + translation)")
    return s, R, M[:3, 3].copy()


def make_splits(store: str | Path, holdout_light_fraction: float = 0.15, holdout_subjects: int = 1,
                seed: int = 0) -> Splits:
    """Deterministic hold-outs: a fraction of the light indices and whole subjects.

    Light indices refer to the light axis; every take must have the same number of lights.
    With a single subject no subject is held out (there would be nothing to train on).
    """
    takes = list_takes(store)
    if not takes:
        raise StoreError(f"{store}: no takes with an 'olat' array")
    root = zarr.open_group(str(store), mode="r")
    n_lights = {root[f"{s}/{t}/olat"].shape[1] for s, t in takes}
    if len(n_lights) != 1:
        raise StoreError(f"{store}: takes have different light counts {sorted(n_lights)}; "
                         "light hold-outs need one light layout")
    L = n_lights.pop()
    rng = np.random.default_rng(seed)
    n_val = int(round(holdout_light_fraction * L))
    if holdout_light_fraction > 0:
        n_val = min(max(n_val, 1), L - 1)
    val_lights = sorted(rng.choice(L, size=n_val, replace=False).tolist()) if n_val else []
    train_lights = [i for i in range(L) if i not in set(val_lights)]
    subjects = sorted({s for s, _ in takes})
    n_hold = min(holdout_subjects, len(subjects) - 1) if len(subjects) > 1 else 0
    held = set(rng.choice(subjects, size=n_hold, replace=False).tolist()) if n_hold else set()
    names = [f"{s}/{t}" for s, t in takes]
    return Splits([n for n in names if n.split("/")[0] not in held],
                  [n for n in names if n.split("/")[0] in held], train_lights, val_lights)


def open_takes(store: str | Path, names: list[str] | None = None) -> list[Take]:
    """Open takes by ``subject/take`` name (all takes when ``names`` is None)."""
    if names is None:
        names = [f"{s}/{t}" for s, t in list_takes(store)]
    out = []
    for n in names:
        if n.count("/") != 1:
            raise StoreError(f"{store}: take names are 'subject/take', got {n!r}")
        s, t = n.split("/")
        out.append(open_take(store, s, t))
    return out


def validate_takes(takes: list[Take]) -> None:
    """Raise :class:`StoreError` listing every problem that would break training: the store's
    own checks (``Take.validate``) plus what the model needs (``world2head``, ``K`` shape)."""
    errs: list[str] = []
    for tk in takes:
        e = tk.validate()
        if not e:
            a = tk.group.attrs
            C = tk.group["olat"].shape[0]
            if "world2head" not in a:
                e.append(f"{tk.path}: missing attribute 'world2head' (rig world -> head frame)")
            else:
                try:
                    similarity_parts(np.asarray(a["world2head"]))
                except StoreError as ex:
                    e.append(f"{tk.path}: {ex}")
            if np.asarray(a["K"]).shape != (C, 3, 3):
                e.append(f"{tk.path}: K has shape {np.asarray(a['K']).shape}, expected ({C}, 3, 3)")
            if "tracking" in tk.group and tk.group["tracking"].shape[0] != C:
                e.append(f"{tk.path}: tracking has {tk.group['tracking'].shape[0]} cameras, olat has {C}")
            if tk.group["mask"].shape != (C,) + tuple(tk.group["olat"].shape[3:]):
                e.append(f"{tk.path}: mask shape {tk.group['mask'].shape} does not match olat")
            ld = np.asarray(a["light_directions"], dtype=np.float64)
            if ld.ndim == 2 and not np.allclose(np.linalg.norm(ld, axis=1), 1.0, atol=1e-3):
                e.append(f"{tk.path}: light_directions are not unit vectors")
        errs.extend(e)
    if errs:
        raise StoreError("store not usable for training:\n  " + "\n  ".join(errs))


def _head_rays(take: Take, camera: int) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), dirs (H, W, 3)) of one camera in the head frame, float32."""
    a = take.group.attrs
    K = np.asarray(a["K"], dtype=np.float64)[camera]
    c2w = np.asarray(a["cam2world"], dtype=np.float64)[camera]
    dist = np.asarray(a.get("distortion", np.zeros((len(take.cameras), 5))), dtype=np.float64)[camera]
    H, W = take.group["olat"].shape[3:]
    o, d = pixel_rays(K, dist, c2w, H, W)
    s, R, t = similarity_parts(np.asarray(a["world2head"]))
    o_h = s * (R @ o) + t
    d_h = d @ R.T  # a similarity keeps directions unit length after the rotation
    return o_h.astype(np.float32), d_h.astype(np.float32)


def head_cameras(take: Take) -> list[HeadCamera]:
    """Every camera of a take as an EG3D-normalised head-frame camera (distortion ignored:
    the EG3D ray sampler is a pinhole; use the dataset's rays where distortion matters)."""
    a = take.group.attrs
    s, R, t = similarity_parts(np.asarray(a["world2head"]))
    H, W = take.group["olat"].shape[3:]
    out = []
    for c in range(len(take.cameras)):
        c2w = np.asarray(a["cam2world"], dtype=np.float64)[c]
        m = np.eye(4)
        m[:3, :3] = R @ c2w[:3, :3]
        m[:3, 3] = s * (R @ c2w[:3, 3]) + t
        K = np.asarray(a["K"], dtype=np.float64)[c].copy()
        # pixel centres at integer coordinates (OpenCV) -> EG3D's uv=(idx+0.5)/R convention
        Kn = np.array([[K[0, 0] / W, K[0, 1] / W, (K[0, 2] + 0.5) / W],
                       [0.0, K[1, 1] / H, (K[1, 2] + 0.5) / H], [0.0, 0.0, 1.0]])
        out.append(HeadCamera(m, Kn, eg3d_label(m, Kn), int(H), int(W)))
    return out


class OlatDataset(torch.utils.data.Dataset):
    """Random OLAT samples from takes of a store (see the module docstring for the item layout).

    Parameters
    ----------
    store : path of the Zarr store.
    takes : ``subject/take`` names (default: all).
    lights : light indices to draw from (default: all), e.g. ``Splits.train_lights``.
    cameras : camera indices to draw from (default: all).
    config : :class:`DataConfig`.
    length : nominal epoch length (items are random; ``__getitem__`` seeds from the index
        and ``seed`` so an epoch is reproducible).
    """

    def __init__(self, store: str | Path, takes: list[str] | None = None, lights: list[int] | None = None,
                 cameras: list[int] | None = None, config: DataConfig | None = None,
                 length: int = 10_000, seed: int = 0):
        self.store = str(store)
        self.config = config or DataConfig()
        self.takes = open_takes(store, takes)
        validate_takes(self.takes)
        self.names = [tk.path.split(":")[-1] for tk in self.takes]
        L = self.takes[0].group["olat"].shape[1]
        self.lights = np.arange(L) if lights is None else np.asarray(lights, dtype=np.int64)
        if len(self.lights) == 0:
            raise ValueError("OlatDataset: no lights to draw from")
        for tk in self.takes:
            if self.lights.max() >= tk.group["olat"].shape[1]:
                raise StoreError(f"{tk.path}: light index {int(self.lights.max())} out of range")
        self.cameras = cameras
        self.length = int(length)
        self.seed = int(seed)
        self._rays: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._img: dict[tuple[int, int, int], np.ndarray] = {}
        self._light_dirs = []
        for tk in self.takes:
            _, R, _ = similarity_parts(np.asarray(tk.group.attrs["world2head"]))
            self._light_dirs.append((tk.light_directions @ R.T).astype(np.float32))

    def __len__(self) -> int:
        return self.length

    # -- cached per-camera data ------------------------------------------------------------
    def rays(self, ti: int, cam: int) -> tuple[np.ndarray, np.ndarray]:
        """Head-frame (origin (3,), dirs (H, W, 3)) of camera ``cam`` of take ``ti``."""
        if (ti, cam) not in self._rays:
            self._rays[(ti, cam)] = _head_rays(self.takes[ti], cam)
        return self._rays[(ti, cam)]

    def mask(self, ti: int, cam: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask (H, W) bool, flat indices of foreground pixels)."""
        if (ti, cam) not in self._masks:
            m = self.takes[ti].mask(cam)
            self._masks[(ti, cam)] = (m, np.flatnonzero(m))
        return self._masks[(ti, cam)]

    def light_dirs(self, ti: int) -> np.ndarray:
        """(L, 3) head-frame light directions of take ``ti`` (all lights)."""
        return self._light_dirs[ti]

    def image(self, ti: int, cam: int, light: int) -> np.ndarray:
        """(3, H, W) float32 linear radiance per unit light."""
        key = (ti, cam, light)
        img = self._img.get(key)
        if img is None:
            img = self.takes[ti].olat(cam, light)
            if self.config.cache:
                self._img[key] = img
        return img

    def images(self, ti: int, cam: int, lights: np.ndarray) -> np.ndarray:
        """(Lb, 3, H, W) float32 radiance per unit light (one read per image: measured faster
        here than one orthogonal selection over the lights)."""
        return np.stack([self.image(ti, cam, int(l)) for l in lights])

    def _valid(self, ti: int, cam: int, lights: np.ndarray) -> np.ndarray | None:
        """(Lb, H, W) bool validity (None when the take has no ``valid`` array); cached like
        the images when ``config.cache``."""
        g = self.takes[ti].group
        if "valid" not in g:
            return None
        out = []
        for l in lights:
            key = ("valid", ti, cam, int(l))
            v = self._img.get(key)
            if v is None:
                v = g["valid"][cam, int(l)] > 127
                if self.config.cache:
                    self._img[key] = v
            out.append(v)
        return np.stack(out)

    # -- items ------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, ti: int | None = None, cam: int | None = None,
               lights: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """One random item (any of take / camera / lights may be fixed)."""
        cfg = self.config
        ti = int(rng.integers(len(self.takes))) if ti is None else ti
        tk = self.takes[ti]
        cams = self.cameras if self.cameras is not None else range(len(tk.cameras))
        cam = int(rng.choice(list(cams))) if cam is None else cam
        if lights is None:
            lights = rng.choice(self.lights, size=min(cfg.lights_per_item, len(self.lights)), replace=False)
        lights = np.asarray(lights, dtype=np.int64)
        H, W = tk.group["olat"].shape[3:]
        m, fg = self.mask(ti, cam)
        if cfg.sampling == "rays":
            n = cfg.rays_per_item
            n_fg = int(round(cfg.fg_fraction * n)) if len(fg) else 0
            flat = np.concatenate([fg[rng.integers(len(fg), size=n_fg)] if n_fg else np.zeros(0, np.int64),
                                   rng.integers(H * W, size=n - n_fg)])
            ys, xs = np.divmod(flat, W)
        else:
            c = min(cfg.crop, H, W)
            centre = fg[rng.integers(len(fg))] if len(fg) else rng.integers(H * W)
            cy, cx = divmod(int(centre), W)
            y0 = int(np.clip(cy - c // 2, 0, H - c))
            x0 = int(np.clip(cx - c // 2, 0, W - c))
            ys, xs = np.mgrid[y0:y0 + c, x0:x0 + c].reshape(2, -1)
        o, d = self.rays(ti, cam)
        target = self.images(ti, cam, lights)[:, :, ys, xs].transpose(0, 2, 1)  # (Lb, N, 3)
        v = self._valid(ti, cam, lights)
        valid = np.ones((len(lights), len(ys)), np.float32) if v is None else v[:, ys, xs].astype(np.float32)
        return {
            "take": torch.tensor(ti),
            "camera": torch.tensor(cam),
            "lights": torch.from_numpy(lights),
            "light_dirs": torch.from_numpy(self.light_dirs(ti)[lights]),
            "origins": torch.from_numpy(np.broadcast_to(o, (len(ys), 3)).copy()),
            "dirs": torch.from_numpy(d[ys, xs]),
            "pixels": torch.from_numpy(np.stack([ys, xs], 1)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "mask": torch.from_numpy(m[ys, xs].astype(np.float32)),
            "valid": torch.from_numpy(valid),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(np.random.default_rng([self.seed, int(index)]))

    def full_image(self, ti: int, cam: int, lights) -> dict[str, torch.Tensor]:
        """Every pixel of one camera for the given lights (validation images); same keys,
        N = H * W in row-major order."""
        tk = self.takes[ti]
        H, W = tk.group["olat"].shape[3:]
        lights = np.asarray(lights, dtype=np.int64)
        o, d = self.rays(ti, cam)
        m, _ = self.mask(ti, cam)
        ys, xs = np.mgrid[0:H, 0:W].reshape(2, -1)
        target = np.stack([self.image(ti, cam, int(l)).reshape(3, -1).T for l in lights])
        v = self._valid(ti, cam, lights)
        return {
            "take": torch.tensor(ti), "camera": torch.tensor(cam),
            "lights": torch.from_numpy(lights),
            "light_dirs": torch.from_numpy(self.light_dirs(ti)[lights]),
            "origins": torch.from_numpy(np.broadcast_to(o, (H * W, 3)).copy()),
            "dirs": torch.from_numpy(d.reshape(-1, 3).copy()),
            "pixels": torch.from_numpy(np.stack([ys, xs], 1)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "mask": torch.from_numpy(m.reshape(-1).astype(np.float32)),
            "valid": torch.ones(len(lights), H * W) if v is None else torch.from_numpy(v.reshape(len(lights), -1).astype(np.float32)),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items along a new batch axis (all items must have the same N and Lb)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
