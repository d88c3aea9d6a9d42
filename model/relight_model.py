"""Geometry sources for the reflectance network, OLAT synthesis and environment relighting.

The reflectance network (:mod:`model.reflectance`) needs, per subject, a triplane and, per ray
batch, fixed samples and weights (:class:`~model.reflectance.GeometrySamples`). A *geometry*
object supplies both:

:class:`PriorGeometry`
    The triplane head prior (``model.prior.TriPlaneGenerator``, duck-typed: ``planes(ws)``,
    ``renderer``, ``decoder``, ``render_options(deterministic=...)``) with one fitted latent
    ``ws`` per subject; density from the prior's importance renderer, deterministic, detached.
:class:`DensityGeometry`
    Given triplanes and a density function (tests, or ground-truth geometry of the twin).

Both prune each ray to its ``max_samples`` heaviest samples (weights unchanged, not
renormalised): with an opaque head the weight mass sits in a few samples around the surface,
so the reflectance decoder runs on a fraction of the prior's 2 x 24..48 samples per ray.

Relighting follows the store's radiometry: ``relit = sum_i E_i OLAT_i`` with ``E_i`` the
environment radiance integrated (solid-angle weighted) over the sphere region closest to light
i: ``lightstage.relight.light_weights``, re-exported here as :func:`light_weights` (one
implementation: solid-angle exact, cached assignment).

References
----------
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
Chan, E. R. et al. (2022). EG3D (importance renderer, mid-point ray marcher).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lightstage.relight import light_weights  # re-exported: model code relights with it
from model.reflectance import GeometrySamples, ReflectanceNet, march_density

__all__ = [
    "prune_samples",
    "samples_from_render",
    "PriorGeometry",
    "DensityGeometry",
    "light_weights",
    "RelightTiming",
    "relight_rays",
    "olat_rays",
]


def prune_samples(s: GeometrySamples, max_samples: int) -> GeometrySamples:
    """Keep the ``max_samples`` heaviest samples of every ray (0 or >= S: keep all).

    (B, R, S, ...) -> (B, R, min(S, max_samples), ...). Rendering is a weighted sum, so the
    dropped samples only remove their own (small) weight.
    """
    S = s.weights.shape[-1]
    if max_samples <= 0 or max_samples >= S:
        return s
    w, idx = torch.topk(s.weights, max_samples, dim=-1)
    pts = torch.gather(s.points, 2, idx[..., None].expand(-1, -1, -1, 3))
    return GeometrySamples(pts, w, s.dirs)


def samples_from_render(result, origins: torch.Tensor, dirs: torch.Tensor) -> GeometrySamples:
    """Convert a prior ``RenderResult`` (``model.rendering``: depths [B,M,S,1] sorted, weights
    [B,M,S-1,1] on interval mid-points) to :class:`GeometrySamples` at those mid-points.

    The prior composites the *average* of the two interval ends; evaluating the reflectance
    decoder at the mid-point is the same quadrature rule with half the decoder calls.
    """
    d = result.samples.depths[..., 0]
    mid = 0.5 * (d[..., 1:] + d[..., :-1])  # (B, M, S-1)
    pts = origins[:, :, None, :] + mid[..., None] * dirs[:, :, None, :]
    return GeometrySamples(pts, result.samples.weights[..., 0], dirs)


class PriorGeometry:
    """Density and triplanes of the prior for fitted latents.

    Parameters
    ----------
    generator : the prior (``model.prior.TriPlaneGenerator``), kept in eval mode, frozen.
    latents : one ``ws`` (num_ws, w_dim) per take, in the dataset's take order.
    max_samples : samples kept per ray (:func:`prune_samples`).
    chunk : rays per renderer call (memory bound).
    """

    def __init__(self, generator, latents: list[torch.Tensor], max_samples: int = 12, chunk: int = 8192):
        self.g = generator.eval()
        for p in self.g.parameters():
            p.requires_grad_(False)
        self.latents = latents
        self.max_samples = max_samples
        self.chunk = chunk
        self._planes: dict[int, torch.Tensor] = {}

    @property
    def plane_mode(self) -> str:
        return self.g.cfg.render.mode

    @property
    def plane_channels(self) -> int:
        return self.g.cfg.plane_channels

    def planes(self, ti: int) -> torch.Tensor:
        """(1, 3, C, H, W) triplane of take ``ti`` (cached; constant: the prior is frozen)."""
        if ti not in self._planes:
            with torch.no_grad():
                ws = self.latents[ti].to(next(self.g.parameters()).device)[None]
                self._planes[ti] = self.g.planes(ws, noise_mode="const")
        return self._planes[ti]

    @torch.no_grad()
    def samples(self, ti: int, origins: torch.Tensor, dirs: torch.Tensor) -> GeometrySamples:
        """origins, dirs (B, R, 3) head frame -> GeometrySamples (B, R, S', ...)."""
        planes = self.planes(ti)
        opts = self.g.render_options(deterministic=True)
        outs = []
        for j in range(0, origins.shape[1], self.chunk):
            o, d = origins[:, j:j + self.chunk], dirs[:, j:j + self.chunk]
            res = self.g.renderer(planes.expand(o.shape[0], -1, -1, -1, -1), self.g.decoder, o, d, opts)
            outs.append(prune_samples(samples_from_render(res, o, d), self.max_samples))
        return GeometrySamples(torch.cat([s.points for s in outs], 1), torch.cat([s.weights for s in outs], 1),
                               torch.cat([s.dirs for s in outs], 1))


class DensityGeometry:
    """Fixed triplanes (one per take, (1, 3, C, H, W)) with an analytic or learnt density.

    ``density_fns[ti]`` maps head-frame points (B, M, 3) to density (B, M); rays are marched
    between ``near`` and ``far`` with ``n_samples`` samples (:func:`model.reflectance.march_density`).
    """

    def __init__(self, planes: list[torch.Tensor], density_fns, near: float, far: float,
                 n_samples: int = 48, max_samples: int = 12, plane_mode: str = "eg3d"):
        self._p = planes
        self.density_fns = density_fns if isinstance(density_fns, (list, tuple)) else [density_fns] * len(planes)
        self.near, self.far, self.n_samples = near, far, n_samples
        self.max_samples = max_samples
        self.plane_mode = plane_mode
        self.plane_channels = planes[0].shape[2]

    def planes(self, ti: int) -> torch.Tensor:
        return self._p[ti]

    def samples(self, ti: int, origins: torch.Tensor, dirs: torch.Tensor) -> GeometrySamples:
        s = march_density(self.density_fns[ti], origins, dirs, self.near, self.far, self.n_samples)
        return prune_samples(s, self.max_samples)


@dataclass
class RelightTiming:
    """Seconds spent in one relight: geometry (prior render) and reflectance network."""

    geometry_s: float
    network_s: float


@torch.no_grad()
def relight_rays(net: ReflectanceNet, geometry, ti: int, origins: torch.Tensor, dirs: torch.Tensor,
                 light_dirs_head: torch.Tensor, E: torch.Tensor, chunk: int = 4096, light_chunk: int = 8,
                 timing: list | None = None) -> torch.Tensor:
    """Environment-relit radiance ``sum_i E_i OLAT_i`` of rays for take ``ti``.

    origins, dirs (R, 3) head frame; light_dirs_head (L, 3); E (L, 3) -> (R, 3) linear radiance.
    Basis head: the trunk and decoder run once (K basis images mixed with
    ``sum_i E_i phi(l_i)``); concat head: the trunk runs once per light and the decoder once per
    light and ray. The geometry is computed once for both. ``timing`` (a list) receives a
    :class:`RelightTiming`.
    """
    t0 = time.perf_counter()
    planes = geometry.planes(ti)
    chunks = [geometry.samples(ti, origins[None, j:j + chunk], dirs[None, j:j + chunk])
              for j in range(0, origins.shape[0], chunk)]
    t1 = time.perf_counter()
    E = E.to(light_dirs_head.dtype)
    if net.cfg.head == "basis":
        coef = torch.einsum("lk,lc->kc", net.light_coefficients(light_dirs_head), E)  # (K, 3)
        feat = net.feature_planes(planes)
        out = torch.cat([torch.einsum("kc,rkc->rc", coef, net.render_planes(feat, s)[0].reshape(-1, net.cfg.n_basis, 3))
                         for s in chunks], 0)
    else:
        out = torch.zeros(origins.shape[0], 3, dtype=planes.dtype, device=planes.device)
        for i in range(0, light_dirs_head.shape[0], light_chunk):
            ld = light_dirs_head[i:i + light_chunk]
            fp = net.feature_planes(planes.expand(ld.shape[0], -1, -1, -1, -1), ld)  # (l, 3, F, H, W)
            j = 0
            for s in chunks:
                r = s.points.shape[1]
                rep = GeometrySamples(s.points.expand(ld.shape[0], -1, -1, -1), s.weights.expand(ld.shape[0], -1, -1),
                                      s.dirs.expand(ld.shape[0], -1, -1))
                out[j:j + r] += torch.einsum("lrc,lc->rc", net.render_planes(fp, rep), E[i:i + light_chunk])
                j += r
    if timing is not None:
        timing.append(RelightTiming(t1 - t0, time.perf_counter() - t1))
    return out


@torch.no_grad()
def olat_rays(net: ReflectanceNet, geometry, ti: int, origins: torch.Tensor, dirs: torch.Tensor,
              light_dirs_head: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """OLAT radiance per unit light of rays (R, 3) for lights (L, 3) -> (L, R, 3)."""
    planes = geometry.planes(ti)
    out = []
    for j in range(0, origins.shape[0], chunk):
        s = geometry.samples(ti, origins[None, j:j + chunk], dirs[None, j:j + chunk])
        out.append(net.olat(planes, s, light_dirs_head[None])[0])
    return torch.cat(out, 1)
