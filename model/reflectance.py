"""Triplane reflectance network: OLAT radiance from a prior's triplane and a light direction.

The network lives in the latent space of a triplane head prior (EG3D-compatible). The prior
provides, for a latent, its triplane ``planes`` (B, 3, C, Hp, Wp) and, for a batch of rays, the
sample points and volume-rendering weights of its density (:class:`GeometrySamples`). The
reflectance network never changes that geometry: the weights are detached and the OLAT image is
``I(r) = sum_s w_s(r) c_s(r, l)``, a weighted sum of per-sample radiances that depend on the
sample's OLAT features, the view direction (so highlights move with the viewer) and the light.

Two heads, chosen by :class:`ReflectanceConfig.head`:

``concat`` (the 3DPR design)
    The unit light direction is tiled over the plane grid and concatenated to the triplane
    channels, ``(B, 3*C + 3, Hp, Wp)``; a stride-1 residual conv trunk maps it to an "OLAT
    triplane" ``(B, 3, F, Hp, Wp)``; a small MLP decodes, per sample, the mean of the three
    plane features plus the view encoding to RGB radiance. One trunk pass per light.

``basis`` (light-linear)
    The trunk sees only the triplane and yields a basis triplane ``(B, 3, F, Hp, Wp)``; the
    decoder gives, per sample, K non-negative basis colours ``b_k`` (K, 3). A light embedding
    ``phi(l) >= 0`` (an MLP on real spherical-harmonic features of ``l``) mixes them:
    ``c_s(l) = sum_k phi_k(l) b_k,s``. phi starts as K smooth lobes around fixed anchor
    directions (``phi_k = softplus(kappa (d_k . l - 1) + 1 + MLP(SH(l))_k)``, MLP initialised
    to zero), so training starts from a "K virtual lights" factorisation. Volume rendering with fixed weights is linear in the
    sample colour, so ``OLAT(l) = sum_k phi_k(l) B_k`` with ``B_k = sum_s w_s b_k,s`` the
    rendered basis images, and an environment relight with per-light RGB weights ``E_i`` is
    ``sum_k (sum_i E_i phi_k(l_i)) B_k``: one network pass whatever the number of lights.
    Non-negativity of both factors keeps every OLAT positive (linear HDR) without any
    non-linearity after the mix, which would break the identity above.

Radiance is linear HDR per unit light: outputs are ``radiance_scale * softplus(x)`` (never a
sigmoid), with ``radiance_scale`` a single store-wide constant chosen for conditioning only.

All directions (rays, lights) are in the EG3D head frame. Shapes are documented per function.

References
----------
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D Generative Adversarial Networks (EG3D).
    CVPR. Triplane sampling (planes xy, xz, zx), box_warp convention.
Rao, P. et al. (2025). 3DPR: Single Image 3D Portrait Relighting with Generative Priors.
    The concat head: tiled light direction + stride-1 ResNet trunk, decoder with view direction.
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
    Relighting as a weighted sum of OLAT images.
Sloan, P.-P., Kautz, J., Snyder, J. (2002). Precomputed radiance transfer. SIGGRAPH.
    Real spherical harmonics as a light embedding, linear light transport in a basis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.configs import check_config_fields

__all__ = [
    "HEADS",
    "ReflectanceConfig",
    "GeometrySamples",
    "ReflectanceNet",
    "sample_triplane",
    "real_sh",
    "render_fixed",
    "march_density",
]

HEADS = ("concat", "basis")


@dataclass
class ReflectanceConfig:
    """Hyper-parameters of :class:`ReflectanceNet` (stored as JSON beside the weights).

    Attributes
    ----------
    head : "concat" or "basis" (see the module docstring).
    plane_channels : C, channels per plane of the prior's triplane (32 for EG3D).
    feat_channels : F, channels per plane of the OLAT / basis triplane.
    trunk_width : channels inside the residual conv trunk.
    trunk_blocks : number of residual blocks (stride 1, 3x3 convs).
    n_basis : K, basis colours per sample (``basis`` head only).
    light_sh_degree : degree of the real-SH encoding of the light direction (basis head).
    embed_hidden : width of the light-embedding MLP (basis head).
    anchor_sharpness : initial sharpness of the anchor lobes of phi (basis head; see
        :class:`ReflectanceNet`).
    view_sh_degree : degree of the real-SH encoding of the view direction (both heads).
    decoder_hidden : width of the per-sample decoder MLP.
    box_warp : side of the triplane cube in head units (EG3D: 1).
    plane_mode : plane projection of the prior, 'eg3d' (xy, xz, zx) or 'clean' (xy, xz, zy).
    radiance_scale : network outputs are ``radiance_scale * softplus(x)``; a store-wide
        constant (e.g. the median foreground OLAT radiance) for conditioning, never per image.
    """

    head: str = "basis"
    plane_channels: int = 32
    feat_channels: int = 32
    trunk_width: int = 64
    trunk_blocks: int = 2
    n_basis: int = 16
    light_sh_degree: int = 4
    embed_hidden: int = 64
    anchor_sharpness: float = 4.0
    view_sh_degree: int = 2
    decoder_hidden: int = 64
    box_warp: float = 1.0
    plane_mode: str = "eg3d"
    radiance_scale: float = 1.0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"ReflectanceConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.plane_mode not in ("eg3d", "clean"):
            raise ValueError(f"ReflectanceConfig.plane_mode must be 'eg3d' or 'clean', got {self.plane_mode!r}")
        for name in ("plane_channels", "feat_channels", "trunk_width", "n_basis",
                     "embed_hidden", "decoder_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ReflectanceConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("light_sh_degree", "view_sh_degree", "trunk_blocks"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ReflectanceConfig.{name} must be >= 0")
        if not (self.radiance_scale > 0 and math.isfinite(self.radiance_scale)):
            raise ValueError(f"ReflectanceConfig.radiance_scale must be > 0, got {self.radiance_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReflectanceConfig":
        check_config_fields(cls, d)
        return cls(**d)

    @classmethod
    def tiny(cls, head: str = "basis", plane_channels: int = 32, **kw) -> "ReflectanceConfig":
        """A CPU-trainable size (a few minutes on a tiny twin store)."""
        base = dict(head=head, plane_channels=plane_channels, feat_channels=16, trunk_width=32,
                    trunk_blocks=2, n_basis=16, light_sh_degree=4, embed_hidden=64,
                    view_sh_degree=2, decoder_hidden=64)
        base.update(kw)
        return cls(**base)


@dataclass
class GeometrySamples:
    """Fixed geometry of a batch of rays, from the prior's density (head frame).

    Attributes
    ----------
    points : (B, R, S, 3) sample positions (where the weights live: EG3D uses interval mid-points).
    weights : (B, R, S) volume-rendering weights ``alpha_s * T_s``; detached, sum <= 1 per ray.
    dirs : (B, R, 3) unit ray directions (the view direction is ``-dirs``).
    """

    points: torch.Tensor
    weights: torch.Tensor
    dirs: torch.Tensor

    def __post_init__(self):
        B, R, S, _ = self.points.shape
        if self.weights.shape != (B, R, S):
            raise ValueError(f"GeometrySamples: weights {tuple(self.weights.shape)} != {(B, R, S)}")
        if self.dirs.shape != (B, R, 3):
            raise ValueError(f"GeometrySamples: dirs {tuple(self.dirs.shape)} != {(B, R, 3)}")
        # geometry is the prior's: no gradient flows into it
        self.points = self.points.detach()
        self.weights = self.weights.detach()
        self.dirs = self.dirs.detach()

    def select(self, idx: torch.Tensor) -> "GeometrySamples":
        """Rays ``idx`` (R',) of every batch item."""
        return GeometrySamples(self.points[:, idx], self.weights[:, idx], self.dirs[:, idx])

    def to(self, *a, **k) -> "GeometrySamples":
        return GeometrySamples(self.points.to(*a, **k), self.weights.to(*a, **k), self.dirs.to(*a, **k))


# ---- pure functions --------------------------------------------------------------------------


def _plane_coords(points: torch.Tensor, mode: str = "eg3d") -> torch.Tensor:
    """(B, M, 3) -> (B, 3, M, 2) plane coordinates (first -> grid x = width).

    ``eg3d``: xy, xz, zx (the released EG3D quirk, see DESIGN.md); ``clean``: xy, xz, zy. Must
    match the prior's projection so the trunk's features stay aligned with its planes.
    """
    x, y, z = points.unbind(-1)
    third = torch.stack([z, x], -1) if mode == "eg3d" else torch.stack([z, y], -1)
    return torch.stack([torch.stack([x, y], -1), torch.stack([x, z], -1), third], dim=1)


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, box_warp: float = 1.0,
                    mode: str = "eg3d") -> torch.Tensor:
    """Bilinear features of the three planes at head-frame points.

    Parameters
    ----------
    planes : (B, 3, C, H, W)
    points : (B, M, 3) head frame; the cube [-box_warp/2, box_warp/2]^3 maps to the planes.
    mode : plane projection, 'eg3d' or 'clean' (see :func:`_plane_coords`).

    Returns
    -------
    (B, 3, M, C); zero outside the cube (``padding_mode='zeros'`` as EG3D).
    """
    B, P, C, H, W = planes.shape
    M = points.shape[1]
    uv = _plane_coords(points * (2.0 / box_warp), mode).reshape(B * P, 1, M, 2).to(planes.dtype)
    out = F.grid_sample(planes.reshape(B * P, C, H, W), uv, mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # (B*3, C, 1, M)
    return out.reshape(B, P, C, M).permute(0, 1, 3, 2)


def _legendre_all(lmax: int, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Associated Legendre P_l^m(x), m >= 0, without the Condon-Shortley phase."""
    P = {(0, 0): torch.ones_like(x)}
    s = torch.sqrt(torch.clamp(1 - x * x, min=0.0))
    for m in range(1, lmax + 1):
        P[(m, m)] = P[(m - 1, m - 1)] * (2 * m - 1) * s
    for m in range(0, lmax):
        P[(m + 1, m)] = x * (2 * m + 1) * P[(m, m)]
    for m in range(0, lmax + 1):
        for l in range(m + 2, lmax + 1):
            P[(l, m)] = ((2 * l - 1) * x * P[(l - 1, m)] - (l + m - 1) * P[(l - 2, m)]) / (l - m)
    return P


def real_sh(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Orthonormal real spherical harmonics of unit directions.

    Parameters
    ----------
    dirs : (..., 3) unit vectors (y is the polar axis, matching the y-up frames).
    degree : lmax >= 0.

    Returns
    -------
    (..., (degree + 1)**2), ordered by l then m = -l..l. Orthonormal on the sphere:
    ``int Y_a Y_b dw = delta_ab`` (checked by a quadrature test).
    """
    x, y, z = dirs.unbind(-1)
    ct = torch.clamp(y, -1.0, 1.0)
    phi = torch.atan2(x, z)
    P = _legendre_all(degree, ct)
    out = []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            am = abs(m)
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
            if m == 0:
                out.append(norm * P[(l, 0)])
            elif m > 0:
                out.append(math.sqrt(2) * norm * P[(l, am)] * torch.cos(am * phi))
            else:
                out.append(math.sqrt(2) * norm * P[(l, am)] * torch.sin(am * phi))
    return torch.stack(out, dim=-1)


def _fibonacci(n: int) -> torch.Tensor:
    """(n, 3) near-uniform unit directions on the sphere (y up)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / n
    r = torch.sqrt(torch.clamp(1 - y * y, min=0))
    phi = i * math.pi * (3 - math.sqrt(5))
    return torch.stack([r * torch.sin(phi), y, r * torch.cos(phi)], -1).float()


def render_fixed(colours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Volume rendering with fixed weights: ``sum_s w_s c_s``.

    colours (B, R, S, Ch), weights (B, R, S) -> (B, R, Ch). Linear in ``colours``.
    """
    return torch.einsum("brsc,brs->brc", colours, weights.to(colours.dtype))


def march_density(density_fn, origins: torch.Tensor, dirs: torch.Tensor, near: float, far: float,
                  n_samples: int) -> GeometrySamples:
    """Deterministic ray marching of a density field into :class:`GeometrySamples`.

    For tests and for any geometry that is not the prior's (e.g. the twin's ground truth).
    Uses the EG3D mid-point scheme: samples at ``n_samples`` evenly spaced depths, weights at
    the ``n_samples - 1`` interval mid-points, ``alpha = 1 - exp(-sigma * delta)``,
    ``w = alpha * prod_{j<s}(1 - alpha_j)``.

    Parameters
    ----------
    density_fn : callable (B, M, 3) -> (B, M) non-negative density.
    origins : (B, R, 3), dirs : (B, R, 3) unit, head frame.
    """
    B, R, _ = dirs.shape
    t = torch.linspace(near, far, n_samples, dtype=dirs.dtype, device=dirs.device)
    tm = 0.5 * (t[1:] + t[:-1])
    delta = t[1:] - t[:-1]
    pts = origins[:, :, None, :] + dirs[:, :, None, :] * tm[None, None, :, None]  # (B,R,S-1,3)
    with torch.no_grad():
        sigma = density_fn(pts.reshape(B, -1, 3)).reshape(B, R, n_samples - 1)
        alpha = 1 - torch.exp(-sigma * delta)
        T = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], -1), -1)[..., :-1]
        w = alpha * T
    return GeometrySamples(pts, w, dirs)


# ---- modules -----------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    """Stride-1 residual block: conv3x3 - SiLU - conv3x3 + skip (the plane resolution is kept,
    as in 3DPR's stride-1 trunk, so features stay aligned with the prior's planes)."""

    def __init__(self, ch: int):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.c2.weight)  # starts as identity: stable early training
        nn.init.zeros_(self.c2.bias)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class _Trunk(nn.Module):
    """(N, Cin, H, W) -> (N, Cout, H, W): 1x1 in, ``blocks`` residual blocks, 1x1 out."""

    def __init__(self, cin: int, cout: int, width: int, blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(cin, width, 1)
        self.blocks = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)])
        self.out = nn.Conv2d(width, cout, 1)

    def forward(self, x):
        return self.out(F.silu(self.blocks(self.inp(x))))


class ReflectanceNet(nn.Module):
    """The reflectance network (both heads; see the module docstring).

    Main entry points (B = batch of subjects/latents, R rays, S samples, L lights, K bases):

    - :meth:`olat` (planes (B,3,C,H,W), samples, light_dirs (B,L,3)) -> (B, L, R, 3)
    - :meth:`relight` (planes, samples, light_dirs (L,3), E (L,3)) -> (B, R, 3)
    - basis head only: :meth:`render_basis` -> (B, K, R, 3), :meth:`light_coefficients`
      (B, L, 3) -> (B, L, K).
    """

    def __init__(self, cfg: ReflectanceConfig):
        super().__init__()
        self.cfg = cfg
        C, Fc = cfg.plane_channels, cfg.feat_channels
        extra = 3 if cfg.head == "concat" else 0
        self.trunk = _Trunk(3 * C + extra, 3 * Fc, cfg.trunk_width, cfg.trunk_blocks)
        n_view = (cfg.view_sh_degree + 1) ** 2
        out = 3 if cfg.head == "concat" else 3 * cfg.n_basis
        self.decoder = nn.Sequential(nn.Linear(Fc + n_view, cfg.decoder_hidden), nn.Softplus(),
                                     nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden), nn.Softplus(),
                                     nn.Linear(cfg.decoder_hidden, out))
        if cfg.head == "basis":
            n_sh = (cfg.light_sh_degree + 1) ** 2
            self.embed = nn.Sequential(nn.Linear(n_sh, cfg.embed_hidden), nn.SiLU(),
                                       nn.Linear(cfg.embed_hidden, cfg.embed_hidden), nn.SiLU(),
                                       nn.Linear(cfg.embed_hidden, cfg.n_basis))
            nn.init.zeros_(self.embed[-1].weight)
            nn.init.zeros_(self.embed[-1].bias)
            # anchor directions: phi_k starts as a smooth lobe around d_k ("virtual light k"), so
            # the K bases specialise from step one instead of starting symmetric (the slow start
            # of non-negative factorisations); the MLP then learns the correction
            self.register_buffer("anchors", _fibonacci(cfg.n_basis), persistent=False)
            self.anchor_sharpness = nn.Parameter(torch.tensor(float(cfg.anchor_sharpness)))
            with torch.no_grad():
                probe = _fibonacci(512)
                self._phi_norm = float(self._phi_raw(probe).sum(-1).mean())
        # outputs start around softplus(0) = ln 2 (x radiance_scale)
        nn.init.zeros_(self.decoder[-1].bias)
        if cfg.head == "concat":
            with torch.no_grad():
                self.decoder[-1].weight.mul_(0.1)

    # -- triplanes ----------------------------------------------------------------------
    def feature_planes(self, planes: torch.Tensor, light_dirs: torch.Tensor | None = None) -> torch.Tensor:
        """OLAT (concat) or basis (basis) triplane.

        planes (B, 3, C, H, W); light_dirs (B, 3) for concat (one light per item), None for
        basis. Returns (B, 3, F, H, W).
        """
        B, P, C, H, W = planes.shape
        if C != self.cfg.plane_channels:
            raise ValueError(f"planes have {C} channels per plane, config expects {self.cfg.plane_channels}")
        x = planes.reshape(B, P * C, H, W)
        if self.cfg.head == "concat":
            if light_dirs is None or light_dirs.shape != (B, 3):
                raise ValueError("concat head: feature_planes needs light_dirs of shape (B, 3)")
            x = torch.cat([x, light_dirs[:, :, None, None].to(x.dtype).expand(B, 3, H, W)], 1)
        return self.trunk(x).reshape(B, 3, self.cfg.feat_channels, H, W)

    def _decode(self, feat_planes: torch.Tensor, samples: GeometrySamples) -> torch.Tensor:
        """Per-sample decoder output, (B, R, S, out) before the output activation."""
        B, R, S, _ = samples.points.shape
        f = sample_triplane(feat_planes, samples.points.reshape(B, R * S, 3), self.cfg.box_warp,
                            self.cfg.plane_mode).mean(1)
        view = real_sh(-samples.dirs, self.cfg.view_sh_degree).to(f.dtype)  # (B, R, n_view)
        view = view[:, :, None, :].expand(B, R, S, view.shape[-1]).reshape(B, R * S, -1)
        return self.decoder(torch.cat([f, view], -1)).reshape(B, R, S, -1)

    def _radiance(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.radiance_scale * F.softplus(x)

    def render_planes(self, feat_planes: torch.Tensor, samples: GeometrySamples) -> torch.Tensor:
        """Decode and volume-render feature planes (B, 3, F, H, W) from :meth:`feature_planes`.

        Returns (B, R, 3) radiance (concat) or (B, R, 3K) basis images, channel ``3k + c`` =
        basis k, colour c (basis).
        """
        return render_fixed(self._radiance(self._decode(feat_planes, samples)), samples.weights)

    # -- basis head ----------------------------------------------------------------------
    def light_coefficients(self, light_dirs: torch.Tensor) -> torch.Tensor:
        """phi(l) >= 0: (..., 3) unit head-frame light directions -> (..., K)."""
        self._need("basis")
        # normalised so sum_k phi_k ~ 1 at init: the mix starts as an average of the bases, not
        # a K-fold sum (which overshoots the target and drives the softplus into its flat part)
        return self._phi_raw(light_dirs) / self._phi_norm

    def _phi_raw(self, light_dirs: torch.Tensor) -> torch.Tensor:
        lobe = self.anchor_sharpness * (light_dirs @ self.anchors.T.to(light_dirs.dtype) - 1) + 1
        return F.softplus(lobe + self.embed(real_sh(light_dirs, self.cfg.light_sh_degree)))

    def render_basis(self, planes: torch.Tensor, samples: GeometrySamples) -> torch.Tensor:
        """Rendered basis images B_k: (B, K, R, 3) (radiance units, non-negative)."""
        self._need("basis")
        B, R, S, _ = samples.points.shape
        img = self.render_planes(self.feature_planes(planes), samples)  # (B, R, 3K)
        return img.reshape(B, R, self.cfg.n_basis, 3).permute(0, 2, 1, 3)

    # -- both heads ----------------------------------------------------------------------
    def olat(self, planes: torch.Tensor, samples: GeometrySamples, light_dirs: torch.Tensor,
             chunk: int = 8) -> torch.Tensor:
        """OLAT radiance per unit light.

        planes (B, 3, C, H, W); samples for B items; light_dirs (B, L, 3) head frame.
        Returns (B, L, R, 3). The concat head runs its trunk once per (item, light), in
        chunks of ``chunk`` lights; the basis head renders its K bases once.
        """
        B, L, _ = light_dirs.shape
        if self.cfg.head == "basis":
            basis = self.render_basis(planes, samples)  # (B, K, R, 3)
            return torch.einsum("blk,bkrc->blrc", self.light_coefficients(light_dirs), basis.to(light_dirs.dtype))
        outs = []
        for j in range(0, L, chunk):
            ld = light_dirs[:, j:j + chunk]  # (B, l, 3)
            l = ld.shape[1]
            fp = self.feature_planes(planes.repeat_interleave(l, 0), ld.reshape(B * l, 3))
            rep = GeometrySamples(samples.points.repeat_interleave(l, 0), samples.weights.repeat_interleave(l, 0),
                             samples.dirs.repeat_interleave(l, 0))
            outs.append(self.render_planes(fp, rep).reshape(B, l, -1, 3))
        return torch.cat(outs, 1)

    def relight(self, planes: torch.Tensor, samples: GeometrySamples, light_dirs: torch.Tensor,
                E: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Environment relight ``sum_i E_i * OLAT_i``.

        light_dirs (L, 3) head frame, E (L, 3) RGB light weights (``lightstage.envmap``).
        Returns (B, R, 3). Basis head: one pass, ``sum_k (sum_i E_i phi_k(l_i)) B_k``;
        concat head: accumulated light by light (the per-light cost the basis head removes).
        """
        B = planes.shape[0]
        if self.cfg.head == "basis":
            basis = self.render_basis(planes, samples)  # (B, K, R, 3)
            coef = torch.einsum("lk,lc->kc", self.light_coefficients(light_dirs), E.to(light_dirs.dtype))
            return torch.einsum("kc,bkrc->brc", coef, basis.to(coef.dtype))
        acc = None
        for j in range(0, light_dirs.shape[0], chunk):
            o = self.olat(planes, samples, light_dirs[None, j:j + chunk].expand(B, -1, 3), chunk=chunk)
            part = torch.einsum("blrc,lc->brc", o, E[j:j + chunk].to(o.dtype))
            acc = part if acc is None else acc + part
        return acc

    def _need(self, head: str):
        if self.cfg.head != head:
            raise ValueError(f"this operation needs the {head!r} head; the model has {self.cfg.head!r}")
