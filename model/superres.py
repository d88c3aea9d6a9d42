"""Super-resolution stage of the triplane generator (EG3D's ``SuperresolutionHybrid*`` family).

``SuperResolution(channels=32, input_resolution=128, img_resolution=512, block_channels=(256, 128))``
has the parameter names and shapes of EG3D's ``SuperresolutionHybrid8XDC`` (``block0``: 32 -> 256
at 256², ``block1``: 256 -> 128 at 512²). Smaller configs use fewer/narrower blocks.

Data flow (FFHQ-512): rgb [B,3,128,128], feat [B,32,128,128], ws [B,num_ws,512]
  -> only ``ws[:, -1]`` is used (repeated for the 3 ws a block consumes)
  -> if the neural render is not 128², bilinear (antialiased) resize of feat and rgb to 128²
  -> block0 -> x [B,256,256,256], rgb [B,3,256,256] -> block1 -> rgb [B,3,512,512].

References
----------
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D GANs, sec. 4.2 and supplement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.layers import SynthesisBlock

__all__ = ["SuperResolution"]


class SuperResolution(torch.nn.Module):
    """Feature image [B, C, r, r] + rgb [B, 3, r, r] + ws -> image [B, 3, R, R].

    ``conv_clamp=256`` reproduces the clamp the official SR blocks run with (they are built with
    ``sr_num_fp16_res > 0``); computation stays in float32 here.
    """

    def __init__(self, channels: int = 32, input_resolution: int = 128, img_resolution: int = 512,
                 block_channels=(256, 128), w_dim: int = 512, conv_clamp: float | None = 256,
                 antialias: bool = True, noise_mode: str = "none"):
        super().__init__()
        n = int(round(math.log2(img_resolution / input_resolution)))
        if 2 ** n * input_resolution != img_resolution or n < 1:
            raise ValueError(f"img_resolution ({img_resolution}) must be input_resolution "
                             f"({input_resolution}) times a power of two >= 2")
        if len(block_channels) != n:
            raise ValueError(f"need {n} block_channels for {input_resolution}->{img_resolution}, "
                             f"got {list(block_channels)}")
        self.input_resolution, self.img_resolution = input_resolution, img_resolution
        self.antialias, self.noise_mode = antialias, noise_mode
        cin = channels
        for i, cout in enumerate(block_channels):
            res = input_resolution * 2 ** (i + 1)
            setattr(self, f"block{i}", SynthesisBlock(cin, cout, w_dim, res, 3, is_last=(i == n - 1),
                                                      conv_clamp=conv_clamp))
            cin = cout
        self.num_blocks = n

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor,
                noise_mode: str | None = None, fused_modconv: bool | None = None) -> torch.Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)  # EG3D: the last w drives every SR layer
        r = self.input_resolution
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=self.antialias)
            rgb = F.interpolate(rgb, size=(r, r), mode="bilinear", align_corners=False, antialias=self.antialias)
        nm = self.noise_mode if noise_mode is None else noise_mode
        for i in range(self.num_blocks):
            x, rgb = getattr(self, f"block{i}")(x, rgb, ws, noise_mode=nm, fused_modconv=fused_modconv)
        return rgb
