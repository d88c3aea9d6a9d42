"""StyleGAN2 building blocks in pure PyTorch, parameter-compatible with EG3D's ``networks_stylegan2``.

Everything here is written from the published maths (no custom CUDA ops): equalised learning
rate, fused bias + activation with gain and clamp, FIR up-sampling by zero insertion and a
separable [1, 3, 3, 1] filter (``upfirdn2d``), modulated convolution with demodulation, and the
synthesis blocks of the *skip* architecture. Parameter and buffer names equal the official ones
so that ``state_dict`` keys load one to one (see ``model/configs.py`` and the parity tests).

Shapes: B batch, C channels, H x W spatial, ``w_dim`` style width.

References
----------
Karras, T. et al. (2020). Analyzing and Improving the Image Quality of StyleGAN (StyleGAN2). CVPR.
Karras, T. et al. (2018). Progressive Growing of GANs (equalised learning rate). ICLR.
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D GANs (EG3D). CVPR.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
    "bias_act",
    "conv2d_resample",
    "modulated_conv2d",
    "normalize_2nd_moment",
    "FullyConnectedLayer",
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "NOISE_MODES",
]

NOISE_MODES = ("random", "const", "none")
_SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------- FIR filtering -----------------


def setup_filter(f=(1, 3, 3, 1)) -> torch.Tensor:
    """2-D FIR filter [k, k] as the outer product of a 1-D tap list, normalised to sum 1."""
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 1:
        f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample (zero insertion), pad, convolve with the 2-D FIR ``f``, downsample.

    x: [B, C, H, W]; f: [fh, fw]; padding = (x0, x1, y0, y1), negative values crop. The filter is
    flipped before the correlation (a true convolution), multiplied by ``gain`` (the
    2-D gain is applied once, i.e. ``gain ** (ndim / 2)`` per axis as in StyleGAN2).
    """
    B, C, H, W = x.shape
    px0, px1, py0, py1 = padding
    if up > 1:
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(B, C, H * up, W * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = (f * gain).to(x.dtype).flip([0, 1])
    w = f[None, None].repeat(C, 1, 1, 1)
    x = F.conv2d(x, w, groups=C)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR up-sampling by ``up``: [B, C, H, W] -> [B, C, H*up, W*up] (gain up**2 keeps the mean)."""
    fh, fw = f.shape
    p = [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def bias_act(x: torch.Tensor, b: torch.Tensor | None, act: str = "linear", gain: float | None = None,
             clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """Add bias along ``dim``, apply ``linear`` or ``lrelu`` (slope 0.2), scale, clamp.

    The default gain is 1 for linear and sqrt(2) for lrelu (He-style variance preservation).
    """
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
        g = _SQRT2 if gain is None else gain
    elif act == "linear":
        g = 1.0 if gain is None else gain
    else:
        raise ValueError(f"unsupported activation {act!r} (use 'linear' or 'lrelu')")
    if g != 1:
        x = x * g
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D correlation with optional FIR up-sampling by 2, arranged as StyleGAN2 does it.

    x: [B, Cin, H, W], w: [Cout, Cin/groups, k, k] -> [B, Cout, H*up, W*up]. With ``up=2`` the
    weight is applied as a stride-2 transposed convolution followed by the FIR filter, which is
    exactly StyleGAN2's fast path (so the numerics of official weights are reproduced). Like
    StyleGAN2's up-sampling layers (``flip_weight=False``), ``up=2`` equals FIR up-sampling followed
    by a *true* convolution with ``w`` (flipped kernel), while ``up=1`` is a correlation.
    """
    cout, cin_g, kh, kw = w.shape
    if up == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    fh, fw = f.shape
    px0 = padding + (fw + up - 1) // 2
    px1 = padding + (fw - up) // 2
    py0 = padding + (fh + up - 1) // 2
    py1 = padding + (fh - up) // 2
    if kw == 1 and kh == 1:
        x = upfirdn2d(x, f, up=up, padding=(px0, px1, py0, py1), gain=up * up)
        return F.conv2d(x, w, groups=groups)
    if groups == 1:
        wt = w.transpose(0, 1)
    else:
        wt = w.reshape(groups, cout // groups, cin_g, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * cin_g, cout // groups, kh, kw)
    px0 -= kw - 1
    px1 -= kw - up
    py0 -= kh - 1
    py1 -= kh - up
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    # StyleGAN2 passes flip_weight=False to the up-sampling layer and then un-flips it for the
    # transposed conv, so the weight enters conv_transpose2d unflipped.
    x = F.conv_transpose2d(x, wt, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: torch.Tensor | None = None, up: int = 1, padding: int = 0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True,
                     fused_modconv: bool = True) -> torch.Tensor:
    """Modulated convolution (StyleGAN2 eq. 1-3).

    x: [B, Cin, H, W]; weight: [Cout, Cin, k, k]; styles: [B, Cin]; noise broadcastable to
    [B, Cout, H', W'] -> [B, Cout, H', W']. ``w'_ijk = s_i w_ijk``, demodulated by
    ``1/sqrt(sum_ik w'^2 + 1e-8)``. The fused path runs one grouped convolution (per-sample
    weights); the unfused one scales activations instead; both are the same function.
    """
    B = x.shape[0]
    cout, cin, kh, kw = weight.shape
    wmod = None
    dcoefs = None
    if demodulate or fused_modconv:
        wmod = weight.unsqueeze(0) * styles.reshape(B, 1, -1, 1, 1)  # [B, Cout, Cin, k, k]
    if demodulate:
        dcoefs = (wmod.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [B, Cout]
    if not fused_modconv:
        x = x * styles.reshape(B, -1, 1, 1)
        x = conv2d_resample(x, weight, f=resample_filter, up=up, padding=padding)
        if demodulate:
            x = x * dcoefs.reshape(B, -1, 1, 1)
        if noise is not None:
            x = x + noise
        return x
    if demodulate:
        wmod = wmod * dcoefs.reshape(B, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    wmod = wmod.reshape(-1, cin, kh, kw)
    x = conv2d_resample(x, wmod, f=resample_filter, up=up, padding=padding, groups=B)
    x = x.reshape(B, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit mean square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ---------------------------------------------------------------- layers ------------------------


class FullyConnectedLayer(torch.nn.Module):
    """Equalised-LR linear layer: stored ``weight ~ N(0,1)/lr_mul`` [out, in], runtime weight
    ``weight * lr_mul / sqrt(in)``, bias ``bias * lr_mul``; then :func:`bias_act`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = (torch.nn.Parameter(torch.full([out_features], float(bias_init)))
                     if bias else None)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        w = self.weight * self.weight_gain
        b = self.bias
        if b is not None and self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(torch.nn.Module):
    """z [B, z_dim], c [B, c_dim] -> ws [B, num_ws, w_dim].

    z and the embedded label are each normalised to unit second moment, concatenated, and run
    through ``num_layers`` lrelu FC layers with ``lr_multiplier`` (0.01 in EG3D). ``w_avg`` tracks
    the mean w (EMA, beta 0.998) and is the truncation centre / "mean face".
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 8,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        feats = [z_dim + embed_features] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(feats[i], feats[i + 1], activation="lrelu",
                                                        lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.float()))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_emas:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            if truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 conv (+ optional FIR up x2) + noise + bias + lrelu.

    x [B, Cin, R/up, R/up], w [B, w_dim] -> [B, Cout, R, R].
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 conv_clamp: float | None = None, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", setup_filter(resample_filter))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                fused_modconv: bool = True) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution],
                                device=x.device, dtype=x.dtype) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, act="lrelu", gain=_SQRT2, clamp=self.conv_clamp)


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 conv without demodulation, style gain ``1/sqrt(Cin k^2)``, linear output.

    x [B, Cin, R, R], w [B, w_dim] -> [B, img_channels, R, R].
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution level of the skip architecture.

    (x [B, Cin, R/2, R/2] or const, img [B, img_ch, R/2, R/2] | None, ws [B, num_conv+num_torgb,
    w_dim]) -> (x [B, Cout, R, R], img [B, img_ch, R, R]): two modulated convs (the first up-samples),
    then ``img = upsample(img) + torgb(x)``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, conv_clamp: float | None = None,
                 resample_filter=(1, 3, 3, 1), use_noise: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.img_channels, self.is_last = resolution, img_channels, is_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        conv_clamp=conv_clamp, resample_filter=resample_filter,
                                        use_noise=use_noise)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution,
                                    conv_clamp=conv_clamp, resample_filter=resample_filter,
                                    use_noise=use_noise)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(self, x, img, ws, noise_mode: str = "random", fused_modconv: bool | None = None):
        if fused_modconv is None:
            fused_modconv = not self.training  # EG3D's fused_modconv_default='inference_only'
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).float()
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(torch.nn.Module):
    """ws [B, num_ws, w_dim] -> image [B, img_channels, R, R] (blocks b4 ... bR).

    Channels per resolution ``min(channel_base // res, channel_max)``. Block k consumes
    ``num_conv + num_torgb`` consecutive ws and advances by ``num_conv`` (its torgb shares a w
    with the next block's first conv), so ``num_ws = 1 + 2*log2(R/4) + 1``.
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, conv_clamp: float | None = None):
        super().__init__()
        log2 = int(np.log2(img_resolution))
        if 2 ** log2 != img_resolution or img_resolution < 4:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        ch = {r: min(channel_base // r, channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], w_dim, r, img_channels,
                                   is_last=(r == img_resolution), conv_clamp=conv_clamp)
            self.num_ws += block.num_conv
            if r == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{r}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random",
                fused_modconv: bool | None = None) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        x = img = None
        w_idx = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            bws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, bws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        return img
