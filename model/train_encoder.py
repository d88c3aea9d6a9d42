"""Training the portrait encoder on the prior's own samples and on digital-twin renders.

Each step draws a batch from a pool of rendered training pairs and minimises

    L = latent_weight * mean(((ws_hat - ws) / w_std)^2)          (prior samples: W+ is known)
      + image_weight  * mean((G(ws_hat, c) - image)^2)            (every ``image_every`` steps)

where ``ws_hat`` is the encoder's W+ for ``image`` seen from camera ``c``. Prior samples are
latents from a :class:`LatentSampler` -- ``G.mapping(z, c_front)`` for a GAN prior (EG3D weights),
or, for the auto-decoder prior that ``ls-train prior`` trains (whose mapping network is unused),
random points between two of its learnt subject codes -- rendered from a random camera on EG3D's
radius-2.7 sphere looking at the pivot (0, 0, 0.2) (yaw/pitch ranges configurable). Twin renders (procedural
heads from :mod:`lightstage.twin.subject`, lit by a fixed three-light rig, linear radiance encoded
with :func:`model.encoder.to_generator_domain`) have no W+ ground truth and enter only the image
loss. The pool is rendered once (no gradients) and refreshed by ``refresh`` fresh prior samples
per step, which keeps the expensive generator passes off most steps.

References
----------
Yuan, Z. et al. (2023). GOAE (ICCV): encoder trained on the generator's own samples with a
latent and a reconstruction loss. Chan, E. R. et al. (2022). EG3D: camera conventions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from model.encoder import (EncoderConfig, PortraitEncoder, invert, psnr, to_generator_domain)

__all__ = [
    "EncoderTrainConfig",
    "LatentSampler",
    "look_at_labels",
    "front_label",
    "w_statistics",
    "sample_prior_batch",
    "render_twin_views",
    "train_encoder",
    "evaluate_inversion",
]

PIVOT = (0.0, 0.0, 0.2)
RADIUS = 2.7
FOCAL = 4.2647


@dataclass
class EncoderTrainConfig:
    """Training options.

    Attributes
    ----------
    steps, batch, lr : optimisation length, batch size, Adam learning rate.
    latent_weight, image_weight, image_every : loss weights; the image loss (a generator
        forward + backward) is applied every ``image_every`` steps (0 = never).
    pool_size, refresh : pool of rendered prior samples and fresh samples added per step.
    yaw_range, pitch_range : uniform camera ranges (radians) about the frontal view.
    truncation_psi : truncation of the sampled latents (1 = none).
    twin_subjects, twin_views, twin_every : digital-twin training renders (subjects x views),
        used for an image-loss step every ``twin_every`` steps (0 = no twin data).
    seed : RNG seed (torch and numpy streams are derived from it).
    """

    steps: int = 2000
    batch: int = 8
    lr: float = 1e-3
    latent_weight: float = 1.0
    image_weight: float = 1.0
    image_every: int = 4
    pool_size: int = 256
    refresh: int = 1
    yaw_range: float = 0.6
    pitch_range: float = 0.3
    truncation_psi: float = 1.0
    twin_subjects: int = 0
    twin_views: int = 4
    twin_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for n in ("steps", "batch", "pool_size"):
            if int(getattr(self, n)) <= 0:
                raise ValueError(f"EncoderTrainConfig.{n} must be positive, got {getattr(self, n)}")
        for n in ("image_every", "refresh", "twin_subjects", "twin_views", "twin_every"):
            if int(getattr(self, n)) < 0:
                raise ValueError(f"EncoderTrainConfig.{n} must be >= 0, got {getattr(self, n)}")
        if not self.lr > 0:
            raise ValueError(f"EncoderTrainConfig.lr must be > 0, got {self.lr}")
        if self.twin_every and not self.twin_subjects:
            raise ValueError("EncoderTrainConfig: twin_every > 0 needs twin_subjects > 0")


# ------------------------------------------------------------------ cameras


def look_at_labels(yaw: np.ndarray, pitch: np.ndarray, radius: float = RADIUS,
                   pivot=PIVOT) -> np.ndarray:
    """EG3D labels [N, 25] for cameras at (yaw, pitch) on a sphere about the origin, aimed at
    ``pivot`` (EG3D's LookAtPoseSampler geometry; yaw > 0 moves the camera to +x).

    The cam2world follows EG3D's ``create_cam2world_matrix``: forward = normalised
    (pivot - origin), right = -normalise(up x forward) with up = +y, columns (right, up', forward)
    where up' = forward x right (OpenCV: y down).
    """
    yaw, pitch = np.atleast_1d(yaw).astype(np.float64), np.atleast_1d(pitch).astype(np.float64)
    o = radius * np.stack([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)], 1)
    fwd = np.asarray(pivot, np.float64) - o
    fwd /= np.linalg.norm(fwd, axis=1, keepdims=True)
    right = -np.cross(np.array([0.0, 1.0, 0.0]), fwd)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    c2w = np.tile(np.eye(4), (len(yaw), 1, 1))
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, fwd, o
    K = np.array([FOCAL, 0, 0.5, 0, FOCAL, 0.5, 0, 0, 1.0])
    return np.concatenate([c2w.reshape(-1, 16), np.tile(K, (len(yaw), 1))], 1).astype(np.float32)


def front_label() -> torch.Tensor:
    """EG3D's ``c_front`` (frontal camera at radius 2.7 looking down -z) as a [1, 25] tensor."""
    from lightstage.camera import EG3D_FRONT_CAM2WORLD, eg3d_label

    return torch.from_numpy(eg3d_label(EG3D_FRONT_CAM2WORLD))[None]


# ------------------------------------------------------------------ prior samples


@dataclass
class LatentSampler:
    """Where the prior's latents come from.

    Attributes
    ----------
    kind : ``'mapping'`` -- ``G.mapping(z, c_front)`` with z ~ N(0, I) (a GAN prior such as
        EG3D's), or ``'codes'`` -- an auto-decoder prior's learnt subject codes [N, w_dim]
        (``ls-train prior``): a sample is ``code_i + a (code_j - code_i)``, a ~ U(0, 1), i != j,
        broadcast to all style inputs (the auto-decoder uses one w per subject). Interpolating
        stays among the identities the generator was trained to render, where a Gaussian
        around the mean would leave that region.
    codes : [N, w_dim] for ``'codes'``.
    """

    kind: str = "mapping"
    codes: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in ("mapping", "codes"):
            raise ValueError(f"LatentSampler.kind must be 'mapping' or 'codes', got {self.kind!r}")
        if self.kind == "codes":
            if self.codes is None or self.codes.ndim != 2 or self.codes.shape[0] < 2:
                raise ValueError("LatentSampler('codes') needs codes [N >= 2, w_dim]")

    @classmethod
    def for_prior(cls, stem) -> "LatentSampler":
        """``'codes'`` when ``train_state.safetensors`` beside the prior checkpoint holds the
        auto-decoder codes, else ``'mapping'``."""
        from pathlib import Path

        from safetensors.torch import load_file

        st = Path(stem).parent / "train_state.safetensors"
        if st.is_file():
            try:
                t = load_file(str(st))
            except Exception as e:  # safetensors has its own error types
                raise ValueError(f"{st}: not a readable safetensors file ({e})") from None
            if "codes" in t and t["codes"].ndim == 2 and t["codes"].shape[0] >= 2:
                return cls("codes", t["codes"].float())
        return cls("mapping")

    @torch.no_grad()
    def sample(self, G, n: int, gen: torch.Generator, truncation_psi: float = 1.0) -> torch.Tensor:
        """ws [n, num_ws, w_dim]."""
        if self.kind == "mapping":
            z = torch.randn(n, G.cfg.z_dim, generator=gen)
            return G.mapping(z, front_label().expand(n, -1), truncation_psi=truncation_psi)
        if self.codes.shape[1] != G.cfg.w_dim:
            raise ValueError(f"codes have w_dim {self.codes.shape[1]}, the prior {G.cfg.w_dim}")
        N = self.codes.shape[0]
        i = torch.randint(N, (n,), generator=gen)
        j = (i + torch.randint(1, N, (n,), generator=gen)) % N  # j != i
        a = torch.rand(n, 1, generator=gen)
        w = self.codes[i] + a * (self.codes[j] - self.codes[i])
        if truncation_psi != 1.0:
            w = G.w_avg + truncation_psi * (w - G.w_avg)
        return w[:, None].repeat(1, G.num_ws, 1)


@torch.no_grad()
def w_statistics(G, n: int = 1024, seed: int = 0,
                 sampler: LatentSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_avg [w_dim], w_std [w_dim]): the prior's mean latent and the per-channel spread of
    ``n`` sampled latents (first style input)."""
    g = torch.Generator().manual_seed(seed)
    w = (sampler or LatentSampler()).sample(G, n, g)[:, 0]
    return G.w_avg.detach().clone(), w.std(0)


@torch.no_grad()
def sample_prior_batch(G, n: int, gen: torch.Generator, rng: np.random.Generator,
                       cfg: EncoderTrainConfig, sampler: LatentSampler | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n prior samples: (image [n,3,R,R] generator domain, c [n,25], ws [n,num_ws,w_dim])."""
    ws = (sampler or LatentSampler()).sample(G, n, gen, cfg.truncation_psi)
    yaw = rng.uniform(-cfg.yaw_range, cfg.yaw_range, n)
    pitch = rng.uniform(-cfg.pitch_range, cfg.pitch_range, n)
    c = torch.from_numpy(look_at_labels(yaw, pitch))
    img = G.synthesis(ws, c, noise_mode="const", deterministic=True)["image"]
    return img, c, ws


# ------------------------------------------------------------------ twin renders

# A fixed three-light portrait rig (metres, world frame; key, fill, top) and one intensity for
# every subject: the twin's linear radiance lands mostly in [0.02, 0.5] (never per-image scaled).
_TWIN_LIGHTS = np.array([[0.8, 0.5, 1.5], [-1.2, 0.2, 1.0], [0.0, 1.5, 0.5]])
_TWIN_RGB = np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.3, 0.3, 0.3]]) * 8.0


def render_twin_views(seeds, labels: np.ndarray, size: int, cube_n: int = 128,
                      operator: str = "aces", exposure_ev: float = 0.0,
                      progress: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render twin heads from EG3D head-frame cameras.

    Parameters
    ----------
    seeds : subject seeds (:func:`lightstage.twin.subject.random_subject`), one per view.
    labels : [N, 25] EG3D labels in the head frame, one per view.
    size : image side in pixels.
    operator, exposure_ev : the prior's fixed display transform (see
        :func:`model.encoder.to_generator_domain`).

    Returns
    -------
    (images [N, 3, size, size] generator domain, masks [N, 1, size, size] head coverage).

    Notes
    -----
    The head-frame camera maps to the world through the subject's ``world2head`` similarity
    (uniform scale ``k``, no rotation): the rotation is kept and the centre is ``(p - t) / k``.
    """
    from lightstage.rig import Camera, Sensor
    from lightstage.twin.subject import HeadScene, random_subject

    labels = np.asarray(labels, np.float64)
    f = FOCAL * size
    K = [[f, 0.0, 0.5 * size - 0.5], [0.0, f, 0.5 * size - 0.5], [0.0, 0.0, 1.0]]
    scenes: dict[int, object] = {}
    imgs, masks = [], []
    for i, (seed, lab) in enumerate(zip(seeds, labels)):
        if seed not in scenes:
            scenes = {seed: HeadScene(random_subject(int(seed)), cube_n=cube_n, vis_n=48)}
        sc = scenes[seed]
        w2h = sc.world2head
        k = w2h[0, 0]
        c2w = lab[:16].reshape(4, 4).copy()
        c2w[:3, 3] = (c2w[:3, 3] - w2h[:3, 3]) / k
        cam = Camera(f"v{i}", K, [0.0] * 5, c2w.tolist(), Sensor(size, size))
        lin = sc.radiance(cam, _TWIN_LIGHTS, _TWIN_RGB)
        imgs.append(torch.from_numpy(np.ascontiguousarray(lin)).permute(2, 0, 1))
        masks.append(torch.from_numpy(sc.truth(cam)["mask"].astype(np.float32))[None])
        if progress:
            progress(i + 1, len(labels))
    return to_generator_domain(torch.stack(imgs), operator, exposure_ev), torch.stack(masks)


# ------------------------------------------------------------------ training


def train_encoder(G, cfg: EncoderTrainConfig, enc_cfg: EncoderConfig | None = None,
                  encoder: PortraitEncoder | None = None,
                  twin: tuple[torch.Tensor, torch.Tensor] | None = None,
                  progress: Callable[[int, int, dict], None] | None = None,
                  sampler: LatentSampler | None = None) -> tuple[PortraitEncoder, list]:
    """Train (or continue training) an encoder for the frozen prior ``G``.

    Parameters
    ----------
    G : :class:`model.prior.TriPlaneGenerator` (kept frozen, eval mode).
    cfg : :class:`EncoderTrainConfig`.
    enc_cfg : architecture (default: :meth:`EncoderConfig.for_generator`).
    encoder : continue from this encoder instead of a fresh one.
    twin : optional (images [N,3,R,R] generator domain, labels [N,25]) twin renders; used when
        ``cfg.twin_every`` > 0.
    progress : called as ``progress(step, steps, metrics)`` after every step (and with step 0
        and ``{'pool': n}`` while the sample pool is being rendered).
    sampler : where prior latents come from (default: the mapping network).

    Returns
    -------
    (encoder in eval mode, history: list of per-step metric dicts).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    G.eval().requires_grad_(False)
    if encoder is None:
        encoder = PortraitEncoder(enc_cfg or EncoderConfig.for_generator(G))
        w_avg, w_std = w_statistics(G, seed=cfg.seed + 1, sampler=sampler)
        encoder.set_w_stats(w_avg, w_std)
    encoder.train()
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99))

    # Pool of rendered prior samples, filled in chunks (rendering is the expensive part).
    chunks = []
    for k in range(0, cfg.pool_size, 32):
        chunks.append(sample_prior_batch(G, min(32, cfg.pool_size - k), gen, rng, cfg, sampler))
        if progress:  # step 0: still rendering the pool
            progress(0, cfg.steps, {"pool": float(min(k + 32, cfg.pool_size))})
    pool_img = torch.cat([c[0] for c in chunks])
    pool_c = torch.cat([c[1] for c in chunks])
    pool_ws = torch.cat([c[2] for c in chunks])
    cursor = 0
    use_twin = twin is not None and cfg.twin_every > 0
    hist = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        if cfg.refresh:
            img_n, c_n, ws_n = sample_prior_batch(G, cfg.refresh, gen, rng, cfg, sampler)
            idx = (cursor + torch.arange(cfg.refresh)) % cfg.pool_size
            pool_img[idx], pool_c[idx], pool_ws[idx] = img_n, c_n, ws_n
            cursor = int(idx[-1] + 1)
        m = {}
        if use_twin and step % cfg.twin_every == 0:
            sel = torch.from_numpy(rng.choice(len(twin[0]), size=min(cfg.batch, len(twin[0])), replace=False))
            img, c = twin[0][sel], twin[1][sel]
            out = encoder(img, c)
            rec = G.synthesis(out["ws"], c, noise_mode="const", deterministic=True,
                              planes=_planes(G, out))["image"]
            loss = cfg.image_weight * ((rec - img) ** 2).mean()
            m["twin_mse"] = float(loss.detach())
        else:
            sel = torch.from_numpy(rng.choice(cfg.pool_size, size=min(cfg.batch, cfg.pool_size), replace=False))
            img, c, ws = pool_img[sel], pool_c[sel], pool_ws[sel]
            out = encoder(img, c)
            lat = (((out["ws"] - ws) / encoder.w_std) ** 2).mean()
            loss = cfg.latent_weight * lat
            m["latent"] = float(lat.detach())
            if cfg.image_every and step % cfg.image_every == 0 and cfg.image_weight > 0:
                rec = G.synthesis(out["ws"], c, noise_mode="const", deterministic=True,
                                  planes=_planes(G, out))["image"]
                mse = ((rec - img) ** 2).mean()
                loss = loss + cfg.image_weight * mse
                m["image_mse"] = float(mse.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m["loss"] = float(loss.detach())
        m["seconds"] = time.perf_counter() - t0
        hist.append(m)
        if progress:
            progress(step, cfg.steps, m)
    return encoder.eval(), hist


def _planes(G, out):
    if out["planes_residual"] is None:
        return None
    return G.planes(out["ws"], noise_mode="const") + out["planes_residual"]


@torch.no_grad()
def evaluate_inversion(encoder: PortraitEncoder, G, images: torch.Tensor, labels: torch.Tensor,
                       masks: torch.Tensor | None = None, refine_steps: int = 0) -> dict:
    """Mean PSNR (dB, generator domain) of the input-view reconstruction: encoder vs the
    mean-latent baseline (``w_avg``), on held-out ``images`` [N,3,R,R] with ``labels`` [N,25]."""
    enc = invert(encoder, G, images, labels, mask=masks)
    base = invert(None, G, images, labels, mask=masks)
    out = {"psnr_encoder": float(enc.psnr.mean()), "psnr_mean_latent": float(base.psnr.mean()),
           "n": int(images.shape[0])}
    if refine_steps:
        with torch.enable_grad():
            ref = invert(encoder, G, images, labels, refine_steps=refine_steps, mask=masks)
        out["psnr_encoder_refined"] = float(ref.psnr.mean())
    return out


def config_dict(cfg: EncoderTrainConfig) -> dict:
    """Plain dict of a training config (for checkpoint provenance)."""
    return asdict(cfg)
