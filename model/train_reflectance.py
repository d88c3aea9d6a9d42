"""Training of the reflectance network straight from the store (``ls-train reflectance``).

Pipeline
--------
1. The store is validated (``lightstage.store.Take.validate`` + :func:`model.olat_data.validate_takes`)
   before anything else: a bad store is refused with every problem listed.
2. Splits: held-out lights (same indices in every take) and held-out subjects
   (:func:`model.olat_data.make_splits`), saved in the run's JSON.
3. Each subject's prior latent is fitted to its fully lit multi-view tracking images (done by the
   caller, ``cli/train_reflectance.py``, with the prior engineer's ``model/fitting.py``) and
   stored in ``<out>/latents.safetensors``; held-out subjects are fitted the same way (only
   fully lit images: their OLATs are never seen).
4. :class:`ReflectanceTrainer` optimises the network with the prior frozen and its density fixed.

Loss (per ray r, light l, masked): ``w * (((p - t) / s)^2 + lambda_log * (log1p(p/s) - log1p(t/s))^2)``
with ``s = radiance_scale`` (one store-wide constant), ``w = valid * (mask + bg_weight (1 - mask))``.
The linear term fits the HDR values that relighting adds up; the log term keeps dark regions
(shadows, a dim light's rim) from being ignored beside highlights (dynamic range). Squared, not
L1: relighting *sums* OLATs, so the mean is the estimator we want, and L1's median collapsed
the OLATs to black in our runs (for most pixels most lights leave them in shadow).

Checkpoint (``<out>/reflectance.safetensors`` + ``<out>/reflectance.json``): network weights
(``net.*``) and Adam state (``opt.<param index>.<name>``), written atomically; the JSON holds
``{"format": "lightstage-reflectance", "version": 1, "config", "train", "step", "splits",
"history", "prior"}``. Resuming restores weights, optimiser state and step; data draws are
seeded from (seed, step, rank), so a resumed run sees the same items as an uninterrupted one.

DDP: run under ``torchrun`` unchanged; ``init_process_group`` happens only when
``WORLD_SIZE > 1``; rank 0 writes checkpoints and images. On CUDA the step runs under
``torch.autocast(dtype=bfloat16)``.

References
----------
Rao, P. et al. (2025). 3DPR (masked L1 on OLATs rendered with the prior's fixed density).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.configs import check_config_fields
from model.olat_data import DataConfig, OlatDataset, collate
from model.reflectance import GeometrySamples, ReflectanceConfig, ReflectanceNet

__all__ = [
    "CKPT_FORMAT",
    "TrainConfig",
    "ReflectanceTrainer",
    "reflectance_loss",
    "psnr",
    "radiance_scale_of",
    "save_reflectance",
    "load_reflectance",
    "tonemap_display",
    "tracking_views",
]

CKPT_FORMAT = "lightstage-reflectance"
CKPT_VERSION = 1


@dataclass
class TrainConfig:
    """Training hyper-parameters (saved in the checkpoint JSON).

    Attributes
    ----------
    steps : total optimiser steps (a resumed run continues to this count).
    batch : items per step (each: one take, camera and ``lights_per_item`` lights).
    rays, lights_per_item, fg_fraction : per item (see :class:`model.olat_data.DataConfig`).
    lr, betas : Adam (3DPR used betas (0, 0.99)).
    log_weight : lambda of the log-domain term; bg_weight : loss weight of background rays.
    holdout_light_fraction, holdout_subjects, seed : splits and data draws.
    val_every, ckpt_every : in steps (0: never; the last step always checkpoints).
    val_lights, val_cameras : how many held-out lights / cameras per take to validate on.
    """

    steps: int = 2000
    batch: int = 2
    rays: int = 512
    lights_per_item: int = 4
    fg_fraction: float = 0.8
    lr: float = 2e-3
    betas: tuple = (0.9, 0.99)
    log_weight: float = 0.5
    bg_weight: float = 0.1
    holdout_light_fraction: float = 0.15
    holdout_subjects: int = 1
    seed: int = 0
    val_every: int = 250
    ckpt_every: int = 250
    val_lights: int = 4
    val_cameras: int = 2

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.steps < 0 or self.batch < 1 or self.rays < 1:
            raise ValueError("TrainConfig: steps >= 0, batch >= 1 and rays >= 1 are required")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_config_fields(cls, d)
        return cls(**d)


# ---- pure functions -------------------------------------------------------------------------


def reflectance_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: float,
                     log_weight: float = 0.5) -> torch.Tensor:
    """Masked squared error on linear radiance + on log1p radiance (see the module docstring).

    pred, target (..., N, 3) linear radiance; weight (..., N) -> scalar (weighted mean).
    """
    lin = ((pred - target) / scale) ** 2
    lg = (torch.log1p(pred.clamp_min(0) / scale) - torch.log1p(target.clamp_min(0) / scale)) ** 2
    per = (lin + log_weight * lg).mean(-1)
    return (per * weight).sum() / weight.sum().clamp_min(1e-8)


def psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB over (masked) pixels with the peak = the target's maximum there (linear HDR:
    there is no fixed white; the same definition is used for every method compared)."""
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, bool), t.shape)
        p, t = p[m], t[m]
    mse = float(np.mean((p - t) ** 2))
    peak = float(t.max())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def radiance_scale_of(dataset: OlatDataset, n_items: int = 16, seed: int = 0) -> float:
    """A store-wide radiance constant for conditioning: the mean foreground OLAT radiance of a
    few random items (never used per image)."""
    rng = np.random.default_rng([seed, 999])
    vals = []
    for _ in range(n_items):
        it = dataset.sample(rng)
        m = it["mask"] > 0
        if m.any():
            vals.append(it["target"][:, m].mean().item())
    v = float(np.mean(vals)) if vals else 1.0
    return v if v > 0 and math.isfinite(v) else 1.0


def tonemap_display(x: np.ndarray, exposure: float) -> np.ndarray:
    """Display only: Reinhard x/(1+x) after ``exposure``, sRGB-encoded, uint8."""
    y = np.clip(x * exposure, 0, None)
    y = y / (1 + y)
    y = np.where(y <= 0.0031308, 12.92 * y, 1.055 * np.power(y, 1 / 2.4) - 0.055)
    return (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---- checkpoints ------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[str], None]):
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_reflectance(out: str | Path, net: ReflectanceNet, opt: torch.optim.Optimizer | None = None,
                     meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<out>/reflectance.safetensors`` + ``reflectance.json`` atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    if opt is not None:
        st = opt.state_dict()
        for pi, s in st["state"].items():
            for k, v in s.items():
                tensors[f"opt.{pi}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
    doc = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": net.cfg.to_dict(), **(meta or {})}
    w, j = out / "reflectance.safetensors", out / "reflectance.json"
    _atomic(w, lambda t: save_file(tensors, t, metadata={"format": CKPT_FORMAT}))
    _atomic(j, lambda t: Path(t).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n"))
    return w, j


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def load_reflectance(path: str | Path, opt_factory: Callable | None = None):
    """Read a checkpoint folder (or its .json / .safetensors) -> (net, meta dict, optimiser or
    None). Loads tensors only (safetensors): nothing is executed."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    w, j = d / "reflectance.safetensors", d / "reflectance.json"
    for f in (w, j):
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing (a reflectance checkpoint is reflectance.safetensors + .json)")
    doc = json.loads(j.read_text())
    if doc.get("format") != CKPT_FORMAT:
        raise ValueError(f"{j}: field 'format' is {doc.get('format')!r}, expected {CKPT_FORMAT!r}")
    if int(doc.get("version", -1)) > CKPT_VERSION:
        raise ValueError(f"{j}: version {doc.get('version')} is newer than supported ({CKPT_VERSION})")
    net = ReflectanceNet(ReflectanceConfig.from_dict(doc["config"]))
    tensors = load_file(str(w))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    opt = None
    if opt_factory is not None:
        opt = opt_factory(net)
        st = opt.state_dict()
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pi, name = k.split(".", 2)
                state.setdefault(int(pi), {})[name] = v
        st["state"] = state
        opt.load_state_dict(st)
    return net, doc, opt


# ---- trainer ----------------------------------------------------------------------------------


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ReflectanceTrainer:
    """Optimises a :class:`ReflectanceNet` on items of an :class:`OlatDataset`.

    Parameters
    ----------
    net_cfg : network config (``plane_channels`` / ``plane_mode`` must match the geometry).
    train : the training dataset (train takes, train lights).
    geometry : :class:`model.relight_model.PriorGeometry` or ``DensityGeometry`` indexed by the
        *training dataset's* take order.
    val : dict name -> (dataset, geometry) evaluated every ``val_every`` steps on full images.
    out : run folder (checkpoint, images, ``log.jsonl``).
    """

    def __init__(self, cfg: TrainConfig, net_cfg: ReflectanceConfig, train: OlatDataset, geometry,
                 out: str | Path, val: dict | None = None, device: str | torch.device | None = None,
                 meta: dict | None = None):
        self.cfg = cfg
        self.train = train
        self.geometry = geometry
        self.val = val or {}
        self.out = Path(out)
        self.meta = dict(meta or {})
        self.rank, self.world = _dist_info()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same seed gives the same initial network
            self.net = ReflectanceNet(net_cfg).to(self.device)
        self.opt = self._make_opt(self.net)
        self.step = 0
        self.history: list[dict] = []
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            # every rank starts from rank 0's weights; gradients are averaged in train_step
            import torch.distributed as dist

            for p in self.net.parameters():
                dist.broadcast(p.data, 0)

    def _make_opt(self, net):
        return torch.optim.Adam(net.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)

    # -- persistence ---------------------------------------------------------------------------
    def save(self):
        if self.rank != 0:
            return
        save_reflectance(self.out, self.net, self.opt,
                         {"train": self.cfg.to_dict(), "step": self.step, "history": self.history, **self.meta})

    def resume(self) -> bool:
        """Load ``<out>/reflectance.*`` if present (weights, optimiser, step, history)."""
        if not (self.out / "reflectance.json").exists():
            return False
        net, doc, opt = load_reflectance(self.out, self._make_opt)
        if net.cfg != self.net.cfg:
            raise ValueError(f"{self.out}: checkpoint network config differs from this run's "
                             f"({net.cfg.to_dict()} vs {self.net.cfg.to_dict()})")
        self.net.load_state_dict(net.state_dict())
        self.opt.load_state_dict(opt.state_dict())
        self.step = int(doc["step"])
        self.history = list(doc.get("history", []))
        return True

    # -- one step ---------------------------------------------------------------------------
    def _forward(self, batch: dict, geometry, net) -> torch.Tensor:
        """Predicted OLATs (B, Lb, N, 3) for a collated batch."""
        B = batch["take"].shape[0]
        planes, samples = [], []
        for b in range(B):
            ti = int(batch["take"][b])
            planes.append(geometry.planes(ti))
            samples.append(geometry.samples(ti, batch["origins"][b:b + 1].to(self.device),
                                            batch["dirs"][b:b + 1].to(self.device)))
        s = GeometrySamples(torch.cat([x.points for x in samples]), torch.cat([x.weights for x in samples]),
                            torch.cat([x.dirs for x in samples]))
        return net.olat(torch.cat(planes).to(self.device), s, batch["light_dirs"].to(self.device))

    def _weights(self, batch) -> torch.Tensor:
        m = batch["mask"].to(self.device)[:, None, :]
        return batch["valid"].to(self.device) * (m + self.cfg.bg_weight * (1 - m))

    def train_step(self, batch: dict) -> dict[str, float]:
        self.net.train()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            pred = self._forward(batch, self.geometry, self.net)
        loss = reflectance_loss(pred.float(), batch["target"].to(self.device), self._weights(batch),
                                self.net.cfg.radiance_scale, self.cfg.log_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            # the network is called through its methods (olat), not forward(), so DDP's hooks
            # would never fire: average the gradients explicitly (same maths as DDP)
            import torch.distributed as dist

            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        self.opt.step()
        self.step += 1
        return {"loss": float(loss.detach()), "step_s": time.perf_counter() - t0}

    def batches(self, start: int, end: int):
        """Collated batches for steps [start, end): item seeds depend on (seed, step, rank, b)."""
        for step in range(start, end):
            items = [self.train.sample(np.random.default_rng([self.cfg.seed, step, self.rank, b]))
                     for b in range(self.cfg.batch)]
            yield collate(items)

    # -- validation ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, write_images: bool = True) -> dict[str, float]:
        """Full-image PSNR (foreground) and loss on every validation set, plus the mean-OLAT
        baseline (the mean over the *training* lights of the same take and camera: it knows the
        subject exactly but ignores the light direction)."""
        from model.relight_model import olat_rays

        self.net.eval()
        res: dict[str, float] = {}
        for name, (ds, geo) in self.val.items():
            P, T, M, Bl, losses = [], [], [], [], []
            for ti in range(len(ds.takes)):
                for cam in range(min(self.cfg.val_cameras, len(ds.takes[ti].cameras))):
                    lights = ds.lights[: self.cfg.val_lights]
                    it = ds.full_image(ti, cam, lights)
                    pred = olat_rays(self.net, geo, ti, it["origins"].to(self.device), it["dirs"].to(self.device),
                                     it["light_dirs"].to(self.device)).float().cpu()
                    w = it["valid"] * (it["mask"][None] + self.cfg.bg_weight * (1 - it["mask"][None]))
                    losses.append(float(reflectance_loss(pred, it["target"], w, self.net.cfg.radiance_scale,
                                                         self.cfg.log_weight)))
                    base_lights = self.train.lights
                    mean_olat = np.mean([ds.image(ti, cam, int(l)) for l in base_lights], 0)  # (3, H, W)
                    P.append(pred.numpy())
                    T.append(it["target"].numpy())
                    M.append(np.broadcast_to(it["mask"].numpy()[None, :, None] > 0, pred.shape))
                    Bl.append(np.broadcast_to(mean_olat.reshape(3, -1).T[None], pred.shape))
                    if write_images and self.rank == 0 and ti == 0 and cam == 0:
                        self._write_image(name, ds, ti, cam, pred.numpy(), it["target"].numpy())
            P, T, M, Bl = (np.concatenate(x, 0) for x in (P, T, M, Bl))
            res[f"{name}/psnr"] = psnr(P, T, M)
            res[f"{name}/psnr_mean_olat"] = psnr(Bl, T, M)
            res[f"{name}/loss"] = float(np.mean(losses))
        return res

    def _write_image(self, name, ds, ti, cam, pred, target):
        from PIL import Image

        H, W = ds.takes[ti].group["olat"].shape[3:]
        exp = 0.5 / max(float(np.percentile(target, 99)), 1e-8)
        rows = [np.concatenate([tonemap_display(p.reshape(H, W, 3), exp), tonemap_display(t.reshape(H, W, 3), exp)], 1)
                for p, t in zip(pred, target)]
        d = self.out / "val"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(d / f"{name}_step{self.step:06d}.png")

    # -- loop -------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, on_step: Callable[[int, dict], None] | None = None,
            stop_after: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``cfg.steps``); ``stop_after`` ends early after that many
        steps of this call (simulates an interruption). Returns the history."""
        end = self.cfg.steps if steps is None else steps
        n = 0
        for batch in self.batches(self.step, end):
            logs = self.train_step(batch)
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"step {self.step}: loss is {logs['loss']}")
            n += 1
            if self.cfg.val_every and (self.step % self.cfg.val_every == 0 or self.step == end) and self.val:
                logs.update(self.validate())
            entry = {"step": self.step, **logs}
            self.history.append(entry)
            if self.rank == 0:
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if on_step:
                on_step(self.step, logs)
            if (self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0) or self.step == end:
                self.save()
            if stop_after is not None and n >= stop_after:
                break
        return self.history


def tracking_views(take, resolution: int):
    """Fully lit views of a take for latent fitting: (images [C, 3, r, r] display-referred in
    [-1, 1], labels [C, 25], exposure EV used).

    Each camera's middle tracking frame is centre-cropped to a square (intrinsics shifted to
    match), tone mapped for display with ONE exposure for the whole take (auto exposure on the
    foreground of all cameras; reported, not hidden) and resized to the prior's image size. The
    prior is display-referred (a GAN trained on tone-mapped images), so fitting needs this
    display transform; everything downstream stays linear.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lightstage.camera import eg3d_label
    from lightstage.tonemap import auto_exposure, to_display
    from model.olat_data import head_cameras

    cams = head_cameras(take)
    g = take.group
    n_track = g["tracking"].shape[1]
    lin, masks, labels = [], [], []
    for c, hc in enumerate(cams):
        img = take.tracking(c)[n_track // 2].transpose(1, 2, 0)  # (H, W, 3)
        m = take.mask(c)
        H, W = img.shape[:2]
        s = min(H, W)
        y0, x0 = (H - s) // 2, (W - s) // 2
        lin.append(img[y0:y0 + s, x0:x0 + s])
        masks.append(m[y0:y0 + s, x0:x0 + s])
        K = hc.K_norm.copy()
        # back to pixels, shift by the crop, renormalise by the square size
        K[0] = K[0] * W
        K[1] = K[1] * H
        K[0, 2] -= x0
        K[1, 2] -= y0
        K[:2] /= s
        labels.append(eg3d_label(hc.cam2world, K))
    ev = auto_exposure(np.concatenate([x.reshape(-1, 3) for x in lin])[None],
                       np.concatenate([m.reshape(-1) for m in masks])[None])
    disp = [to_display(x, "aces", ev).astype(np.float32) / 127.5 - 1 for x in lin]
    imgs = torch.from_numpy(np.stack(disp)).permute(0, 3, 1, 2)
    imgs = F.interpolate(imgs, size=(resolution, resolution), mode="area" if imgs.shape[-1] > resolution else "bilinear")
    return imgs, torch.from_numpy(np.stack(labels)), ev
