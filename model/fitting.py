"""Latent fitting: put a subject into the prior's latent space from one or several posed images.

Given images I_v [N,3,R,R] (display-referred, [-1,1]) with EG3D camera labels c_v [N,25], find

    W+* = argmin_W+  Σ_v |G(W+, c_v) - I_v|_1 + λ_raw |G_raw(W+, c_v) - down(I_v)|_1
                      + λ_w |W+ - w_avg|²

starting at the mean face (``w_avg``), with the generator frozen and rendered deterministically
(``noise_mode='const'``, no ray jitter). ``w_plus=False`` fits a single w shared by all style
inputs. Optionally a small additive triplane refinement Δ (a low-resolution plane grid,
bilinearly up-sampled, L2-penalised) is fitted jointly, as pivotal-tuning-style inversions do to
recover detail the latent cannot express; the refined planes are ``G.planes(W+) + up(Δ)``.

This is the route by which light-stage subjects (rendered/cropped to EG3D's camera convention)
enter the prior: ``fit_latent`` -> ``FitResult.planes(G)`` -> renderer / reflectance network.

References
----------
Abdal, R. et al. (2019). Image2StyleGAN: How to embed images into the StyleGAN latent space? (W+)
Roich, D. et al. (2022). Pivotal tuning for latent-based editing of real images.
Chan, E. R. et al. (2022). EG3D (inversion by latent optimisation, supplement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["FitConfig", "FitResult", "fit_latent", "psnr", "mean_face_ws"]


@dataclass
class FitConfig:
    """Latent-fitting settings."""

    steps: int = 200
    lr: float = 0.02
    w_plus: bool = True
    w_reg: float = 1e-3
    raw_weight: float = 1.0
    plane_refine: bool = False
    plane_res: int = 16
    plane_lr: float = 0.01
    plane_reg: float = 1e-2
    batch_views: int | None = None  # views per step (None: all)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("FitConfig.steps must be >= 0")


@dataclass
class FitResult:
    """ws [1, num_ws, w_dim], optional plane refinement delta [1, 3, C, p, p], loss history."""

    ws: torch.Tensor
    plane_delta: torch.Tensor | None = None
    losses: list = field(default_factory=list)

    def planes(self, G) -> torch.Tensor:
        """Triplanes [1, 3, C, H, W] of the fitted subject."""
        with torch.no_grad():
            p = G.planes(self.ws, noise_mode="const")
            if self.plane_delta is not None:
                p = p + _upsample_delta(self.plane_delta, p.shape[-1])
        return p

    def render(self, G, c: torch.Tensor, **kw) -> dict:
        """Render the fitted subject from cameras c [B, 25]."""
        with torch.no_grad():
            planes = self.planes(G).expand(c.shape[0], -1, -1, -1, -1)
            ws = self.ws.expand(c.shape[0], -1, -1)
            return G.synthesis(ws, c, noise_mode="const", deterministic=True, planes=planes, **kw)


def _upsample_delta(delta: torch.Tensor, size: int) -> torch.Tensor:
    B, n, C, p, _ = delta.shape
    up = F.interpolate(delta.reshape(B, n * C, p, p), size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(B, n, C, size, size)


def mean_face_ws(G) -> torch.Tensor:
    """The mean-face latent [1, num_ws, w_dim] (``w_avg`` broadcast)."""
    return G.w_avg.detach().reshape(1, 1, -1).repeat(1, G.num_ws, 1).clone()


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1], peak 1); ``mask`` [.., 1, H, W] optional."""
    a01, b01 = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    se = (a01 - b01).square()
    if mask is not None:
        m = mask.expand_as(se)
        mse = se[m > 0].mean()
    else:
        mse = se.mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


def fit_latent(G, images: torch.Tensor, labels: torch.Tensor, cfg: FitConfig | None = None,
               init_ws: torch.Tensor | None = None,
               on_step: Callable[[int, int, float], None] | None = None) -> FitResult:
    """Fit W+ (and optionally a triplane refinement) to posed images.

    Parameters
    ----------
    G : TriPlaneGenerator (left unchanged: its parameters are frozen during the fit and their
        ``requires_grad`` flags restored afterwards).
    images : [N, 3, R, R] in [-1, 1] (resized to the generator's output size if needed).
    labels : [N, 25] EG3D camera labels of the images.
    cfg : FitConfig.
    init_ws : [1, num_ws, w_dim] start (default: the mean face).
    """
    cfg = cfg or FitConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, R, R], got {list(images.shape)}")
    if labels.shape != (images.shape[0], 25):
        raise ValueError(f"labels must be [{images.shape[0]}, 25], got {list(labels.shape)}")
    dev = next(G.parameters()).device
    images, labels = images.to(dev).float(), labels.to(dev).float()
    R = G.cfg.img_resolution
    if images.shape[-1] != R:
        images = F.interpolate(images, size=(R, R), mode="area" if images.shape[-1] > R else "bilinear")
    was_training = G.training
    flags = [p.requires_grad for p in G.parameters()]
    G.eval().requires_grad_(False)
    try:
        w0 = (init_ws if init_ws is not None else mean_face_ws(G)).to(dev)
        w_avg = mean_face_ws(G).to(dev)
        if cfg.w_plus:
            w = w0.clone().requires_grad_(True)
        else:
            w = w0[:, :1].clone().requires_grad_(True)
        params = [{"params": [w], "lr": cfg.lr}]
        delta = None
        if cfg.plane_refine:
            delta = torch.zeros(1, 3, G.cfg.plane_channels, cfg.plane_res, cfg.plane_res, device=dev,
                                requires_grad=True)
            params.append({"params": [delta], "lr": cfg.plane_lr})
        opt = torch.optim.Adam(params, betas=(0.9, 0.999))
        N = images.shape[0]
        losses = []
        gen = torch.Generator().manual_seed(0)
        for step in range(cfg.steps):
            if cfg.batch_views and cfg.batch_views < N:
                idx = torch.randperm(N, generator=gen)[: cfg.batch_views].to(dev)
            else:
                idx = torch.arange(N, device=dev)
            ws = (w if cfg.w_plus else w.repeat(1, G.num_ws, 1)).expand(len(idx), -1, -1)
            planes = G.planes(ws[:1], noise_mode="const")
            if delta is not None:
                planes = planes + _upsample_delta(delta, planes.shape[-1])
            out = G.synthesis(ws, labels[idx], noise_mode="const", deterministic=True,
                              planes=planes.expand(len(idx), -1, -1, -1, -1))
            x = images[idx]
            loss = (out["image"] - x).abs().mean()
            raw_t = F.interpolate(x, size=out["image_raw"].shape[-2:], mode="area")
            loss = loss + cfg.raw_weight * (out["image_raw"] - raw_t).abs().mean()
            wfull = w if cfg.w_plus else w.repeat(1, G.num_ws, 1)
            loss = loss + cfg.w_reg * (wfull - w_avg).square().mean()
            if delta is not None:
                loss = loss + cfg.plane_reg * delta.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step + 1, cfg.steps, losses[-1])
        ws_final = (w if cfg.w_plus else w.repeat(1, G.num_ws, 1)).detach()
        return FitResult(ws_final, None if delta is None else delta.detach(), losses)
    finally:
        for p, f in zip(G.parameters(), flags):
            p.requires_grad_(f)
        G.train(was_training)
