"""Training the head prior without downloads: a multi-view auto-decoder on twin portraits.

Objective (and why not EG3D's adversarial one here)
---------------------------------------------------
Each subject s owns a latent code w_s (one W vector, broadcast to all ``num_ws`` style inputs).
Codes and generator weights are optimised jointly to reproduce every posed image of the subject:

    L = Σ_views  |G(w_s, c_v) - I_v|_1  +  λ_raw |G_raw(w_s, c_v) - down(I_v)|_1  +  λ_w |w_s|²

with G the super-resolved image, G_raw the volume-rendered one (kept consistent with G, as
EG3D's dual discriminator does) and ``down`` an area down-sampling. This is GLO / DeepSDF-style
auto-decoding (Bojanowski et al. 2018; Park et al. 2019) over EG3D's exact architecture.

Why: the twin gives many calibrated views of each subject, which is direct 3D supervision that a
GAN only learns indirectly; an auto-decoder converges in CPU minutes, is stable (no
discriminator, no R1/augmentation tuning) and its latent space is by construction the space that
*fitting* (``model.fitting``) searches, which is how light-stage subjects enter the prior. The
price: no sampler of new identities beyond the empirical code distribution (``w_avg`` is set to
the mean code, the "mean face"; the code mean/std are stored for sampling), and sharpness
limited by the L1 objective. The generator and its checkpoint stay EG3D-compatible, so an
adversarial fine-tune (or official weights) can replace it without touching the callers.

Checkpoints in ``OUT/``: ``prior.safetensors`` + ``prior.json`` (the generator, loadable with
``model.checkpoint.load_generator``), ``train_state.safetensors`` + ``train_state.json``
(codes, optimiser moments, step). ``resume=True`` continues from them.

Distributed: launched by ``torchrun``, ``WORLD_SIZE > 1`` initialises the process group (gloo
on CPU, NCCL on CUDA), wraps the model in DDP and gives every rank its own sampling stream;
rank 0 writes checkpoints. Nothing changes for a single process.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint, save_checkpoint
from model.configs import GeneratorConfig, get_config
from model.data import ImageFolderDataset
from model.prior import TriPlaneGenerator, build_generator

__all__ = ["TrainConfig", "AutoDecoder", "train_prior", "TrainResult", "reconstruction_loss"]


@dataclass
class TrainConfig:
    """Auto-decoder training settings (``steps`` counts optimiser steps in total, across resumes)."""

    steps: int = 2000
    batch: int = 4
    lr: float = 2e-3
    lr_codes: float = 1e-2
    betas: tuple = (0.0, 0.99)
    raw_weight: float = 1.0
    code_reg: float = 1e-3
    code_init_std: float = 0.5
    ckpt_every: int = 250
    seed: int = 0
    noise_mode: str = "const"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch", "ckpt_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")


class AutoDecoder(torch.nn.Module):
    """Generator + per-subject codes [n_subjects, w_dim]; ``forward(subject [B], c [B,25])`` ->
    G.synthesis output dict (image [B,3,R,R], image_raw [B,3,r,r], ...)."""

    def __init__(self, G: TriPlaneGenerator, n_subjects: int, init_std: float = 0.5, seed: int = 0):
        super().__init__()
        self.G = G
        gen = torch.Generator().manual_seed(seed)
        self.codes = torch.nn.Parameter(torch.randn(n_subjects, G.cfg.w_dim, generator=gen) * init_std)

    def ws(self, subject: torch.Tensor) -> torch.Tensor:
        return self.codes[subject].unsqueeze(1).repeat(1, self.G.num_ws, 1)

    def forward(self, subject: torch.Tensor, c: torch.Tensor, noise_mode: str = "const") -> dict:
        return self.G.synthesis(self.ws(subject), c, noise_mode=noise_mode)


def reconstruction_loss(out: dict, target: torch.Tensor, raw_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L1 on the final image plus ``raw_weight`` x L1 of the raw render against the area-
    downsampled target. target [B,3,R,R] in [-1,1]. Returns (loss, {'l1', 'raw'})."""
    img = out["image"]
    if img.shape[-1] != target.shape[-1]:
        target_hi = F.interpolate(target, size=img.shape[-2:], mode="area")
    else:
        target_hi = target
    l1 = (img - target_hi).abs().mean()
    raw = out["image_raw"]
    raw_t = F.interpolate(target, size=raw.shape[-2:], mode="area")
    lr = (raw - raw_t).abs().mean()
    return l1 + raw_weight * lr, {"l1": float(l1.detach()), "raw": float(lr.detach())}


# -------------------------------------------------------------- optimiser state <-> safetensors --

def _flatten_opt(sd: dict, prefix: str, tensors: dict, meta: dict) -> None:
    meta[prefix] = {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            key = f"{prefix}.{idx}.{k}"
            if isinstance(v, torch.Tensor):
                tensors[key] = v.detach().cpu().contiguous().clone()
            else:
                meta[prefix]["scalars"][key] = v


def _unflatten_opt(prefix: str, tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta[prefix]["scalars"].items()):
        if not key.startswith(prefix + "."):
            continue
        _, idx, k = key.rsplit(".", 2)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta[prefix]["param_groups"]}


def _state_paths(out: Path) -> tuple[Path, Path]:
    return out / "train_state.safetensors", out / "train_state.json"


@dataclass
class TrainResult:
    """Where the checkpoint went, the final step and the loss history (step, total loss)."""

    checkpoint: Path
    step: int
    history: list


def _dist_info():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), ws
    return 0, 1


def train_prior(data: str | os.PathLike, out: str | os.PathLike, config: GeneratorConfig | str = "tiny",
                train: TrainConfig | None = None, resume: bool = False, overwrite: bool = False,
                on_step: Callable[[int, int, dict], None] | None = None,
                device: str | torch.device | None = None) -> TrainResult:
    """Train the prior as a multi-view auto-decoder on the image folder ``data``.

    Parameters
    ----------
    data : folder with ``dataset.json`` (see :mod:`model.data`).
    out : checkpoint folder. An existing checkpoint there is continued with ``resume`` or
        replaced with ``overwrite``; otherwise it is refused.
    config : generator preset name or config (ignored when resuming: the checkpoint's is used).
    train : :class:`TrainConfig`.
    on_step : callback ``(step, total, {'loss', 'l1', 'raw', 'it_s'})`` for progress reporting.
    """
    tc = train or TrainConfig()
    out = Path(out)
    rank, world = _dist_info()
    dev = torch.device(device) if device else (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu"))
    wpath, jpath = checkpoint_paths(out / "prior")
    spath, sjpath = _state_paths(out)
    exists = wpath.exists() or spath.exists()
    if exists and not (resume or overwrite):
        raise CheckpointError(f"{out}: holds a prior checkpoint; pass resume=True to continue or "
                              "overwrite=True to start again")
    if resume and not (wpath.exists() and spath.exists()):
        raise CheckpointError(f"{out}: nothing to resume (need prior.safetensors/.json and "
                              "train_state.safetensors/.json)")

    cfg = get_config(config) if isinstance(config, str) else config
    step = 0
    if resume:
        ck = load_checkpoint(out / "prior")
        cfg = ck.config
    ds = ImageFolderDataset(data, resolution=cfg.img_resolution)
    G = build_generator(cfg, seed=tc.seed)
    model = AutoDecoder(G, ds.n_subjects, tc.code_init_std, seed=tc.seed + 1)
    # The auto-decoder's codes live in W directly: the mapping network takes no part (frozen,
    # also so DDP sees no unused parameters).
    G.backbone.mapping.requires_grad_(False)
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=tc.lr, betas=tc.betas)
    opt_c = torch.optim.Adam([model.codes], lr=tc.lr_codes, betas=tc.betas)
    history: list = []
    if resume:
        G.load_state_dict(ck.state_dict)
        st = load_file(str(spath))
        meta = json.loads(sjpath.read_text())
        if st["codes"].shape != model.codes.shape:
            raise CheckpointError(f"{spath}: codes {tuple(st['codes'].shape)} do not fit the dataset "
                                  f"({ds.n_subjects} subjects, w_dim {cfg.w_dim})")
        model.codes.data.copy_(st["codes"])
        try:
            opt_g.load_state_dict(_unflatten_opt("opt_g", st, meta))
            opt_c.load_state_dict(_unflatten_opt("opt_c", st, meta))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{sjpath}: optimiser state does not fit this trainer ({e}); "
                                  "start again with overwrite=True") from e
        step = int(meta["step"])
        history = list(meta.get("history", []))
    model.to(dev).train()
    net = model
    if world > 1:
        # find_unused_parameters: e.g. the SR noise strengths are unused with EG3D's SR noise 'none'
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                        find_unused_parameters=True)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])  # decoded once, [N,3,R,R]
    labels = torch.from_numpy(ds.labels)
    subjects = torch.from_numpy(ds.subjects)

    def save(final: bool = False):
        if rank != 0:
            return
        with torch.no_grad():
            G.backbone.mapping.w_avg.copy_(model.codes.mean(0))  # mean face = mean code
        codes = model.codes.detach().cpu()
        meta = {"objective": "multi-view auto-decoder (L1 image + raw)", "step": step,
                "train": asdict(tc), "data": str(Path(data)), "n_subjects": ds.n_subjects,
                "code_mean_norm": float(codes.mean(0).norm()), "code_std": float(codes.std(0, correction=0).mean())}
        save_checkpoint(out / "prior", G, cfg, meta=meta, overwrite=True)
        tensors = {"codes": codes.contiguous().clone(), "code_mean": codes.mean(0).contiguous(),
                   "code_std": codes.std(0, correction=0).contiguous()}
        smeta = {"step": step, "history": history[-2000:], "final": final}
        _flatten_opt(opt_g.state_dict(), "opt_g", tensors, smeta)
        _flatten_opt(opt_c.state_dict(), "opt_c", tensors, smeta)
        tmp = spath.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, spath)
        sjpath.write_text(json.dumps(smeta, default=float) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    t_last = time.perf_counter()
    while step < tc.steps:
        # Every step draws from its own (seed, rank, step) stream, so a resumed run takes exactly
        # the steps an uninterrupted one would (batches and ray jitter alike).
        rng = np.random.default_rng(np.random.SeedSequence([tc.seed, rank, step]))
        torch.manual_seed(int(rng.integers(0, 2**62)))
        idx = torch.from_numpy(rng.integers(0, len(ds), size=tc.batch))
        x, c, s = images[idx].to(dev), labels[idx].to(dev), subjects[idx].to(dev)
        res = net(s, c, noise_mode=tc.noise_mode)
        loss, parts = reconstruction_loss(res, x, tc.raw_weight)
        loss = loss + tc.code_reg * model.codes[s].square().mean()
        opt_g.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_c.step()
        step += 1
        now = time.perf_counter()
        parts.update(loss=float(loss.detach()), it_s=1.0 / max(now - t_last, 1e-9))
        t_last = now
        history.append([step, round(parts["loss"], 5)])
        if on_step and rank == 0:
            on_step(step, tc.steps, parts)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            save(final=step == tc.steps)
    if step == tc.steps and not spath.exists():
        save(final=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(wpath, step, history)
