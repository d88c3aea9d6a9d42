"""Portrait encoder: image -> W+ latent of the triplane prior (plus an optional triplane residual).

Inversion of a single portrait into the head prior, in the spirit of GOAE / TriPlaneNet: a
feed-forward CNN predicts W+ offsets from the prior's mean latent ``w_avg``
(``ws = w_avg + w_std * delta``, ``delta`` from a zero-initialised head, so an untrained encoder
*is* the mean-latent baseline), optionally a small triplane residual added to the planes the
prior synthesises from ``ws`` (zero-initialised gain), and optional test-time latent
optimisation (``refine_steps``) that starts from the encoder's answer.

Shapes (B = batch, R = encoder input resolution = the prior's ``img_resolution``)::

    image [B, 3, R, R] in the prior's domain, c [B, 25] EG3D label
      --stem + stride-2 residual stages--> features [B, C_last, R/2^n, R/2^n]
      --pool 4x4, FC--> delta [B, num_ws, w_dim] --> ws = w_avg + w_std * delta
      (optional) features --upsample convs--> plane residual [B, 3, C_p, P, P]

Image domain: the prior is trained on display-referred images in [-1, 1] (``model.data``: one
fixed tone-mapping operator and exposure for the whole set, then sRGB). Our data are linear;
:func:`to_generator_domain` applies that same fixed display transform -- display encoding for a
network input, as DESIGN.md allows. No per-image normalisation.

Checkpoints are ``<dir>/encoder.safetensors`` + ``<dir>/encoder.json`` (config, w statistics
and provenance); nothing executable.

References
----------
Yuan, Z. et al. (2023). Make encoder great again in 3D GAN inversion through geometry and
occlusion-aware encoding (GOAE). ICCV.
Bhattarai, A. R. et al. (2024). TriPlaneNet: an encoder for EG3D inversion. WACV.
Richardson, E. et al. (2021). Encoding in style: a StyleGAN encoder for image-to-image
translation (pSp): W+ offsets from the average latent.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.configs import check_config_fields

__all__ = [
    "EncoderConfig",
    "EncoderError",
    "PortraitEncoder",
    "InversionResult",
    "to_generator_domain",
    "from_generator_domain",
    "psnr",
    "invert",
    "refine_latent",
    "encode_portrait",
    "save_encoder",
    "load_encoder",
    "ENCODER_FORMAT",
]

ENCODER_FORMAT = "lightstage-encoder"
ENCODER_VERSION = 1


class EncoderError(ValueError):
    """A bad encoder checkpoint or input; the message names the file/field and the reason."""


# ------------------------------------------------------------------ image domain


def to_generator_domain(linear: torch.Tensor, operator: str = "aces",
                        exposure_ev: float = 0.0) -> torch.Tensor:
    """Linear Rec.709 radiance [B, 3, H, W] -> the prior's display domain [-1, 1].

    The same fixed display transform as the prior's training images (``model.data``:
    :func:`lightstage.tonemap.tonemap` with one ``operator``/``exposure_ev`` for every image,
    then the sRGB curve); ``operator='linear'`` is a plain clip. No per-image normalisation.
    """
    from lightstage.tonemap import tonemap

    x = linear.detach().permute(0, 2, 3, 1).cpu().numpy()
    d = torch.from_numpy(tonemap(x, operator, exposure_ev)).permute(0, 3, 1, 2).clamp(0.0, 1.0)
    srgb = torch.where(d <= 0.0031308, 12.92 * d, 1.055 * d.clamp_min(1e-12) ** (1 / 2.4) - 0.055)
    return (srgb * 2.0 - 1.0).to(linear.dtype)


def from_generator_domain(img: torch.Tensor) -> torch.Tensor:
    """Generator-domain image -> display-linear [0, 1] (sRGB decoded; scene radiance only when
    the prior's display transform was ``'linear'``)."""
    v = ((img.clamp(-1.0, 1.0) + 1.0) * 0.5)
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image of two generator-domain images [B, 3, H, W] (peak = range 2).

    ``mask`` [B, 1, H, W] restricts the mean squared error to its pixels.
    """
    d2 = (a - b) ** 2
    if mask is None:
        mse = d2.flatten(1).mean(1)
    else:
        m = mask.expand_as(d2)
        mse = (d2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ------------------------------------------------------------------ network


@dataclass
class EncoderConfig:
    """Sizes of a :class:`PortraitEncoder`.

    Attributes
    ----------
    resolution : input image side (the prior's ``img_resolution``); a power of two >= 16.
    num_ws, w_dim : the prior's W+ shape.
    channels : widths of the stride-2 residual stages (one halving each).
    hidden : width of the FC layer before the W+ head.
    use_camera : feed the 25-float camera label to the head (pose-aware inversion).
    plane_residual : also predict a triplane residual (GOAE/TriPlaneNet-style refinement).
    plane_channels, plane_resolution : the prior's plane shape (for ``plane_residual``).
    """

    resolution: int
    num_ws: int
    w_dim: int
    channels: tuple = (32, 64, 128, 128)
    hidden: int = 256
    use_camera: bool = True
    plane_residual: bool = False
    plane_channels: int = 32
    plane_resolution: int = 64

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        r = int(self.resolution)
        if r < 16 or r & (r - 1):
            raise EncoderError(f"EncoderConfig.resolution must be a power of two >= 16, got {r}")
        if not self.channels or min(self.channels) <= 0:
            raise EncoderError(f"EncoderConfig.channels must be positive, got {self.channels}")
        if r >> len(self.channels) < 2:
            raise EncoderError(f"EncoderConfig: {len(self.channels)} halvings of {r} px leave < 2 px")
        for n in ("num_ws", "w_dim", "hidden", "plane_channels", "plane_resolution"):
            if int(getattr(self, n)) <= 0:
                raise EncoderError(f"EncoderConfig.{n} must be positive, got {getattr(self, n)}")

    @classmethod
    def for_generator(cls, G, **kw) -> "EncoderConfig":
        """A config matching a :class:`model.prior.TriPlaneGenerator`."""
        return cls(resolution=G.cfg.img_resolution, num_ws=G.num_ws, w_dim=G.cfg.w_dim,
                   plane_channels=G.cfg.plane_channels, plane_resolution=G.cfg.plane_resolution, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        check_config_fields(cls, d, EncoderError)
        return cls(**d)


class _ResDown(nn.Module):
    """Residual stage: 3x3 stride-2 conv, 3x3 conv, plus a 1x1 stride-2 skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, 2, 0)

    def forward(self, x):
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = self.conv2(y)
        return F.leaky_relu(y + self.skip(x), 0.2)


class PortraitEncoder(nn.Module):
    """Image (+ camera) -> W+ latent (+ optional triplane residual). See the module docstring.

    Buffers ``w_avg`` [w_dim] and ``w_std`` [w_dim] come from the prior (set with
    :meth:`set_w_stats`) so the head regresses standardised offsets.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.stem = nn.Conv2d(3, ch[0], 3, 1, 1)
        self.stages = nn.ModuleList(
            [_ResDown(ch[max(i - 1, 0)] if i else ch[0], c) for i, c in enumerate(ch)]
        )
        pooled = ch[-1] * 16
        cam = 25 if cfg.use_camera else 0
        self.fc = nn.Linear(pooled + cam, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.num_ws * cfg.w_dim)
        # Zero-initialised head: the untrained encoder returns w_avg (the mean-latent baseline).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))
        self.register_buffer("w_std", torch.ones(cfg.w_dim))
        if cfg.plane_residual:
            mid = ch[min(1, len(ch) - 1)]
            self.plane_in = nn.Conv2d(mid, 64, 3, 1, 1)
            self.plane_out = nn.Conv2d(64, 3 * cfg.plane_channels, 3, 1, 1)
            self.plane_gain = nn.Parameter(torch.zeros(()))  # starts as "no residual"

    def set_w_stats(self, w_avg: torch.Tensor, w_std: torch.Tensor) -> None:
        """Store the prior's mean latent and per-channel spread of W (both [w_dim])."""
        self.w_avg.copy_(w_avg.detach().reshape(-1))
        self.w_std.copy_(w_std.detach().reshape(-1).clamp_min(1e-6))

    def forward(self, image: torch.Tensor, c: torch.Tensor | None = None) -> dict:
        """image [B,3,R,R] (generator domain), c [B,25] -> {'ws' [B,num_ws,w_dim],
        'delta' (standardised offsets), 'planes_residual' [B,3,C,P,P] or None}."""
        cfg = self.cfg
        if image.ndim != 4 or image.shape[1] != 3:
            raise EncoderError(f"encoder input must be [B, 3, H, W], got {list(image.shape)}")
        if image.shape[-1] != cfg.resolution or image.shape[-2] != cfg.resolution:
            image = F.interpolate(image, size=(cfg.resolution, cfg.resolution), mode="bilinear",
                                  align_corners=False, antialias=True)
        x = F.leaky_relu(self.stem(image), 0.2)
        feats = []
        for st in self.stages:
            x = st(x)
            feats.append(x)
        h = F.adaptive_avg_pool2d(x, 4).flatten(1)
        if cfg.use_camera:
            if c is None:
                raise EncoderError("this encoder was built with use_camera=True: pass c [B, 25]")
            h = torch.cat([h, c.to(h.dtype)], dim=1)
        h = F.leaky_relu(self.fc(h), 0.2)
        delta = self.head(h).reshape(-1, cfg.num_ws, cfg.w_dim)
        ws = self.w_avg + self.w_std * delta
        res = None
        if cfg.plane_residual:
            f = feats[min(1, len(feats) - 1)]
            f = F.interpolate(f, size=(cfg.plane_resolution,) * 2, mode="bilinear", align_corners=False)
            p = self.plane_out(F.leaky_relu(self.plane_in(f), 0.2))
            res = (self.plane_gain * p).reshape(-1, 3, cfg.plane_channels, cfg.plane_resolution,
                                                cfg.plane_resolution)
        return {"ws": ws, "delta": delta, "planes_residual": res}


# ------------------------------------------------------------------ inversion


@dataclass
class InversionResult:
    """Result of :func:`invert`.

    Attributes
    ----------
    ws : [B, num_ws, w_dim] latent.
    planes : [B, 3, C, P, P] triplanes used for the reconstruction (W+ planes + residual).
    image : [B, 3, R, R] reconstruction of the input view (generator domain).
    psnr : [B] PSNR (dB, generator domain) of the reconstruction against the input.
    history : per refine step loss (empty without refinement).
    """

    ws: torch.Tensor
    planes: torch.Tensor
    image: torch.Tensor
    psnr: torch.Tensor
    history: list = field(default_factory=list)


def _render(G, ws, c, planes=None):
    out = G.synthesis(ws, c, planes=planes, noise_mode="const", deterministic=True)
    return out["image"]


def refine_latent(G, ws: torch.Tensor, target: torch.Tensor, c: torch.Tensor, steps: int,
                  lr: float = 0.01, planes_residual: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """Test-time optimisation of W+ (Adam on the pixel MSE of the input view).

    Parameters
    ----------
    G : the prior (frozen; only ``ws`` is optimised).
    ws : [B, num_ws, w_dim] start (the encoder's answer, or ``w_avg`` for optimisation-only).
    target : [B, 3, R, R] generator-domain image; c : [B, 25] its camera.
    steps, lr : Adam iterations and learning rate.
    planes_residual : an encoder triplane residual kept fixed during the optimisation.
    mask : optional [B, 1, R, R] weights on the loss (e.g. the face region).

    Returns
    -------
    (ws [B, num_ws, w_dim] detached, list of per-step losses).
    """
    w = ws.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
    req = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    hist = []
    try:
        for _ in range(int(steps)):
            planes = None
            if planes_residual is not None:
                planes = G.planes(w, noise_mode="const") + planes_residual.detach()
            img = _render(G, w, c, planes)
            d2 = (img - target) ** 2
            loss = (d2 * mask).sum() / (mask.expand_as(d2).sum().clamp_min(1)) if mask is not None else d2.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
    finally:
        for p, r in zip(G.parameters(), req):
            p.requires_grad_(r)
    return w.detach(), hist


def invert(encoder: PortraitEncoder | None, G, image: torch.Tensor, c: torch.Tensor,
           refine_steps: int = 0, refine_lr: float = 0.01, mask: torch.Tensor | None = None) -> InversionResult:
    """Invert portraits into the prior.

    Parameters
    ----------
    encoder : a trained :class:`PortraitEncoder`, or None for the mean latent ``G.w_avg``
        (the baseline; with ``refine_steps`` it is optimisation-only inversion).
    G : the prior (:class:`model.prior.TriPlaneGenerator`), eval mode.
    image : [B, 3, R, R] generator-domain input (see :func:`to_generator_domain`).
    c : [B, 25] EG3D camera labels of the inputs (e.g. from :func:`model.face.prepare_portrait`).
    refine_steps : test-time latent optimisation steps after the encoder (0 = feed-forward):
        :func:`model.fitting.fit_latent` started from the encoder's W+ (or
        :func:`refine_latent` when a triplane residual or a mask is involved).
    refine_lr : its Adam learning rate.
    mask : optional [B, 1, R, R] region for the PSNR (and the refinement loss).

    Returns
    -------
    :class:`InversionResult`.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise EncoderError(f"image must be [B, 3, H, W], got {list(image.shape)}")
    if c.ndim != 2 or c.shape[0] != image.shape[0] or c.shape[1] != 25:
        raise EncoderError(f"c must be [B, 25] with B = {image.shape[0]}, got {list(c.shape)}")
    R = G.cfg.img_resolution
    if image.shape[-1] != R or image.shape[-2] != R:
        image = F.interpolate(image, size=(R, R), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        if encoder is None:
            ws = G.w_avg.reshape(1, 1, -1).expand(image.shape[0], G.num_ws, -1).clone()
            resid = None
        else:
            out = encoder(image, c)
            ws, resid = out["ws"], out["planes_residual"]
    hist = []
    if refine_steps > 0:
        if resid is None and mask is None:
            # The prior's own fitting code (model.fitting: L1 + raw-image + w-regularised W+
            # optimisation), one image at a time, started from the encoder's latent.
            from model.fitting import FitConfig, fit_latent

            fits = [fit_latent(G, image[b : b + 1], c[b : b + 1],
                               FitConfig(steps=int(refine_steps), lr=refine_lr), init_ws=ws[b : b + 1])
                    for b in range(image.shape[0])]
            ws = torch.cat([f.ws for f in fits])
            hist = [float(np.mean(v)) for v in zip(*[f.losses for f in fits])]
        else:
            # A fixed encoder triplane residual or a loss mask: model.fitting has neither.
            ws, hist = refine_latent(G, ws, image, c, refine_steps, refine_lr, resid, mask)
    with torch.no_grad():
        planes = G.planes(ws, noise_mode="const")
        if resid is not None:
            planes = planes + resid
        rec = _render(G, ws, c, planes)
        score = psnr(rec, image, mask)
    return InversionResult(ws=ws, planes=planes, image=rec, psnr=score, history=hist)


def encode_portrait(prepared, G, encoder: PortraitEncoder | None, refine_steps: int = 0,
                    operator: str = "aces", exposure_ev: float = 0.0,
                    refine_lr: float = 0.01) -> InversionResult:
    """Invert one portrait prepared by :func:`model.face.prepare_portrait`.

    Parameters
    ----------
    prepared : a ``PreparedPortrait`` (linear crop [R, R, 3] + EG3D label), ideally prepared at
        ``G.cfg.img_resolution`` (it is resampled otherwise).
    G, encoder, refine_steps, refine_lr : see :func:`invert`.
    operator, exposure_ev : the prior's fixed display transform (see :func:`to_generator_domain`).
    """
    lin = torch.from_numpy(np.ascontiguousarray(prepared.image)).permute(2, 0, 1)[None].float()
    img = to_generator_domain(lin, operator, exposure_ev)
    c = torch.from_numpy(np.asarray(prepared.label, np.float32))[None]
    return invert(encoder, G, img, c, refine_steps=refine_steps, refine_lr=refine_lr)


# ------------------------------------------------------------------ checkpoints


def _paths(d: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(d)
    return d / "encoder.safetensors", d / "encoder.json"


def save_encoder(directory: str | os.PathLike, encoder: PortraitEncoder, meta: dict | None = None,
                 overwrite: bool = False, half: bool = False) -> tuple[Path, Path]:
    """Write ``encoder.safetensors`` + ``encoder.json`` into ``directory``.

    Refuses to replace an existing encoder unless ``overwrite``; writes atomically. ``half``
    stores floating-point tensors as float16 (half the size; :func:`load_encoder` computes in
    float32 either way). Values beyond float16's range are refused rather than stored as inf.
    """
    from safetensors.torch import save_file

    wpath, jpath = _paths(directory)
    if not overwrite:
        for p in (wpath, jpath):
            if p.exists():
                raise EncoderError(f"{p} exists; refusing to overwrite (use --overwrite / overwrite=True)")
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    if half:
        for k, v in tensors.items():
            if v.is_floating_point():
                if not torch.isfinite(v).all() or v.abs().max() > 65504:
                    raise EncoderError(f"encoder tensor {k!r} does not fit float16 (|max| {float(v.abs().max()):.3g})")
                tensors[k] = v.half()
    doc = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "config": encoder.cfg.to_dict(),
           "meta": json.loads(json.dumps(meta or {}, default=str))}
    for path, write in ((wpath, lambda t: save_file(tensors, t)),
                        (jpath, lambda t: Path(t).write_text(json.dumps(doc, indent=1) + "\n"))):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return wpath, jpath


def load_encoder(directory: str | os.PathLike) -> tuple[PortraitEncoder, dict]:
    """Read an encoder written by :func:`save_encoder` (safetensors: no code runs).

    Returns (encoder in eval mode, meta dict).
    """
    from safetensors.torch import load_file

    wpath, jpath = _paths(directory)
    for p in (wpath, jpath):
        if not p.is_file():
            raise EncoderError(f"{p}: file not found (an encoder is encoder.safetensors + encoder.json)")
    try:
        doc = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise EncoderError(f"{jpath}: not valid JSON ({e})") from None
    if doc.get("format") != ENCODER_FORMAT:
        raise EncoderError(f"{jpath}: field 'format' is {doc.get('format')!r}, expected {ENCODER_FORMAT!r}")
    if int(doc.get("version", -1)) > ENCODER_VERSION:
        raise EncoderError(f"{jpath}: version {doc.get('version')} is newer than supported")
    try:
        cfg = EncoderConfig.from_dict(doc["config"])
    except (KeyError, TypeError, EncoderError) as e:
        raise EncoderError(f"{jpath}: invalid field 'config': {e}") from None
    enc = PortraitEncoder(cfg)
    try:
        sd = load_file(str(wpath))
    except Exception as e:  # safetensors has its own error types
        raise EncoderError(f"{wpath}: not a readable safetensors file ({e})") from None
    # float16 files (save_encoder(half=True)) are widened to the model's float32 on load
    sd = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in sd.items()}
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise EncoderError(f"{wpath}: weights do not fit the config (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]})")
    return enc.eval(), doc.get("meta") or {}
