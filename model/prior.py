"""The generative head prior: an EG3D-compatible triplane generator in pure PyTorch.

Data flow (FFHQ-512 preset ``eg3d-ffhq512``; B = batch, r = neural rendering resolution)::

    z [B,512], c [B,25] --mapping (embed 25->512, fc0 1024->512, fc1)--> ws [B,14,512]
    ws --StyleGAN2 synthesis b4..b256 (skip)--> raw planes [B,96,256,256]
       --view--> planes [B,3,32,256,256] (plane k = channels 32k..32k+31)
    c[:, :16] -> cam2world [B,4,4], c[:, 16:] -> K [B,3,3] --ray_sampler--> o, d [B,r²,3]
    planes, o, d --ImportanceRenderer + OSGDecoder--> features [B,r²,32], depth [B,r²,1]
       --> feature image [B,32,r,r], image_raw = first 3 ch [B,3,r,r], image_depth [B,1,r,r]
    feature image, image_raw, ws[:, -1] --SuperResolution--> image [B,3,512,512]

Values of ``image``/``image_raw`` are in about [-1, 1] (display-referred, as the GAN was trained).

API for other model parts (documented contract)
-----------------------------------------------
``G.mapping(z, c, truncation_psi=1, truncation_cutoff=None)`` -> ws [B, num_ws, w_dim].
``G.planes(ws, noise_mode=None)`` -> triplanes [B, 3, C, H, W] (the reflectance network's input).
``G.render_planes(planes, c, decoder=None, resolution=None)`` -> ``RenderResult`` from
    :mod:`model.rendering` with per-ray ``samples`` (depths, sigma, features, weights); pass a
    different ``decoder`` to render it with its own density, or use
    ``rendering.decode_samples`` + ``rendering.composite`` with ``result.samples.weights`` to
    render another decoder with the prior's density held fixed.
``G.synthesis(ws, c)`` -> {'image', 'image_raw', 'image_depth', 'weight_sum', 'features'}.
``G(z, c)`` = mapping + synthesis.

Inference vs training: in ``eval()`` mode the defaults are ``noise_mode='const'`` and
deterministic ray sampling (no jitter, deterministic importance samples), so renders are
reproducible; in ``train()`` mode they follow EG3D (random noise, jitter, stochastic importance).
Both can be forced per call.

References
----------
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D Generative Adversarial Networks. CVPR.
Karras, T. et al. (2020). Analyzing and Improving the Image Quality of StyleGAN. CVPR.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from model.configs import GeneratorConfig, get_config
from model.layers import FullyConnectedLayer, MappingNetwork, SynthesisNetwork
from model.rendering import ImportanceRenderer, RenderOptions, RenderResult, ray_sampler
from model.superres import SuperResolution

__all__ = ["Backbone", "OSGDecoder", "TriPlaneGenerator", "build_generator", "split_label"]


def split_label(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D label [B, 25] -> cam2world [B, 4, 4], normalised intrinsics [B, 3, 3] (row-major)."""
    if c.ndim != 2 or c.shape[1] < 25:
        raise ValueError(f"camera label must be [B, 25], got {list(c.shape)}")
    return c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3)


class Backbone(torch.nn.Module):
    """StyleGAN2 generator used as the triplane backbone: ``mapping`` + ``synthesis`` children
    (EG3D's ``StyleGAN2Backbone``; names ``backbone.mapping.*``, ``backbone.synthesis.b*``)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.synthesis = SynthesisNetwork(cfg.w_dim, cfg.plane_resolution, 3 * cfg.plane_channels,
                                          channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                                          conv_clamp=cfg.conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.num_ws,
                                      num_layers=cfg.mapping_layers, lr_multiplier=cfg.mapping_lr_mul)


class OSGDecoder(torch.nn.Module):
    """Triplane features -> (sigma, colour features).

    sampled [B, 3, M, C] -> mean over planes [B, M, C] -> FC(C, 64) -> softplus -> FC(64, 1+F)
    -> {'sigma': raw [B, M, 1], 'rgb': sigmoid * 1.002 - 0.001 [B, M, F]}. View directions are
    ignored (EG3D has no view dependence).
    """

    def __init__(self, n_features: int = 32, hidden: int = 64, output_dim: int = 32, lr_mul: float = 1.0):
        super().__init__()
        self.hidden_dim = hidden
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(hidden, 1 + output_dim, lr_multiplier=lr_mul),
        )

    def forward(self, sampled: torch.Tensor, ray_directions: torch.Tensor | None = None) -> dict:
        x = sampled.mean(1)
        B, M, C = x.shape
        x = self.net(x.reshape(B * M, C)).reshape(B, M, -1)
        return {"rgb": torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001, "sigma": x[..., 0:1]}


class TriPlaneGenerator(torch.nn.Module):
    """EG3D's TriPlaneGenerator; ``state_dict`` keys/shapes equal the official G_ema for
    ``eg3d-ffhq512``. See the module docstring for the data flow and API."""

    def __init__(self, cfg: GeneratorConfig | str = "tiny"):
        super().__init__()
        if isinstance(cfg, str):
            cfg = get_config(cfg)
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.superresolution = SuperResolution(cfg.decoder_output_dim, cfg.sr_input_resolution,
                                               cfg.img_resolution, cfg.sr_channels, cfg.w_dim,
                                               conv_clamp=cfg.sr_conv_clamp, antialias=cfg.sr_antialias,
                                               noise_mode=cfg.sr_noise_mode)
        self.decoder = OSGDecoder(cfg.plane_channels, cfg.decoder_hidden, cfg.decoder_output_dim,
                                  cfg.decoder_lr_mul)
        self.renderer = ImportanceRenderer(cfg.render)
        self.neural_rendering_resolution = cfg.neural_rendering_resolution

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    @property
    def w_avg(self) -> torch.Tensor:
        return self.backbone.mapping.w_avg

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """z [B, z_dim], c [B, 25] -> ws [B, num_ws, w_dim] (c scaled by ``c_scale``)."""
        if self.cfg.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * self.cfg.c_scale, truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def _noise_mode(self, noise_mode):
        return noise_mode if noise_mode is not None else ("random" if self.training else "const")

    def planes(self, ws: torch.Tensor, noise_mode: str | None = None) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> triplanes [B, 3, C, H, W]."""
        raw = self.backbone.synthesis(ws, noise_mode=self._noise_mode(noise_mode))
        return raw.reshape(raw.shape[0], 3, self.cfg.plane_channels, raw.shape[-2], raw.shape[-1])

    def render_options(self, deterministic: bool | None = None) -> RenderOptions:
        if deterministic is None:
            deterministic = self.cfg.render.deterministic or not self.training
        return replace(self.cfg.render, deterministic=deterministic)

    def render_planes(self, planes: torch.Tensor, c: torch.Tensor, decoder=None,
                      resolution: int | None = None, deterministic: bool | None = None) -> RenderResult:
        """Volume-render triplanes [B,3,C,H,W] from cameras c [B,25] at resolution r (r² rays)."""
        r = resolution or self.neural_rendering_resolution
        cam2world, K = split_label(c)
        o, d = ray_sampler(cam2world, K, r)
        return self.renderer(planes, decoder or self.decoder, o, d, self.render_options(deterministic))

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, neural_rendering_resolution: int | None = None,
                  noise_mode: str | None = None, deterministic: bool | None = None,
                  planes: torch.Tensor | None = None, superresolution: bool = True) -> dict:
        """ws [B,num_ws,w_dim], c [B,25] -> {'image' [B,3,R,R], 'image_raw' [B,3,r,r],
        'image_depth' [B,1,r,r], 'weight_sum' [B,1,r,r], 'features' [B,F,r,r]}.

        ``planes`` may be given (e.g. W+ planes plus a refinement) instead of being synthesised.
        """
        r = neural_rendering_resolution or self.neural_rendering_resolution
        if planes is None:
            planes = self.planes(ws, noise_mode)
        res = self.render_planes(planes, c, resolution=r, deterministic=deterministic)
        B = planes.shape[0]
        feat = res.features.permute(0, 2, 1).reshape(B, -1, r, r).contiguous()
        out = {
            "image_raw": feat[:, :3],
            "features": feat,
            "image_depth": res.depth.permute(0, 2, 1).reshape(B, 1, r, r),
            "weight_sum": res.weight_sum.permute(0, 2, 1).reshape(B, 1, r, r),
        }
        if superresolution:
            out["image"] = self.superresolution(feat[:, :3], feat, ws)
        return out

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **kw) -> dict:
        return self.synthesis(self.mapping(z, c, truncation_psi, truncation_cutoff), c, **kw)


def build_generator(config: GeneratorConfig | str = "tiny", seed: int | None = None) -> TriPlaneGenerator:
    """A freshly initialised generator (``seed`` makes the initialisation reproducible)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TriPlaneGenerator(config)
    return TriPlaneGenerator(config)
