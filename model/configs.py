"""Typed configurations of the triplane generator and named presets.

``eg3d-ffhq512``  EG3D FFHQ-512 (``ffhq512-128.pkl`` / ``ffhqrebalanced512-128.pkl``): 3 x 32 x 256²
                  planes, 128² neural rendering, 512² output. Builds a module whose state_dict has
                  the official G_ema names and shapes (176 tensors, ~30.66 M parameters).
``tiny``          3 x 16 x 64² planes, 32² neural rendering, 64² output: trains on a CPU in minutes.
``small``         3 x 32 x 128² planes, 64² neural rendering, 128² output (GPU-friendly middle size).

``GeneratorConfig.to_dict()/from_dict()`` are the JSON form stored next to safetensors weights;
``from_eg3d_init_kwargs`` reads the ``init_kwargs``/``rendering_kwargs`` of an official pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from model.rendering import RenderOptions

__all__ = ["GeneratorConfig", "check_config_fields", "PRESETS", "get_config", "EG3D_FFHQ_RENDERING_KWARGS"]

# rendering_kwargs as EG3D's train.py sets them for --cfg=ffhq (see notes/eg3d-reference.md 1.5).
EG3D_FFHQ_RENDERING_KWARGS: dict[str, Any] = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.5,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.25,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "sr_antialias": True,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.25,
    "ray_end": 3.3,
    "box_warp": 1,
    "avg_camera_radius": 2.7,
    "avg_camera_pivot": [0, 0, 0.2],
}



def check_config_fields(cls, d: dict[str, Any], error: type[Exception] = ValueError) -> None:
    """Refuse a config dict with fields ``cls`` does not have (a typo or a newer config), naming
    them, instead of silently ignoring or failing deep inside the constructor."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise error(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")

@dataclass
class GeneratorConfig:
    """All sizes of a :class:`model.prior.TriPlaneGenerator`.

    Attributes
    ----------
    z_dim, w_dim, c_dim : latent, style and camera-label widths (c_dim=25 for EG3D labels).
    mapping_layers, mapping_lr_mul : depth and learning-rate multiplier of the mapping MLP.
    plane_resolution, plane_channels : triplane size -> planes [B, 3, plane_channels, R, R].
    channel_base, channel_max : backbone widths ``min(channel_base // res, channel_max)``.
    conv_clamp : backbone activation clamp (None in EG3D's FFHQ backbone).
    neural_rendering_resolution : volume-rendered image size r (r² rays).
    img_resolution : output image size after super-resolution.
    sr_channels : channels of the SR blocks, one per factor-2 step r -> img_resolution.
    sr_input_resolution : resolution the SR stage resamples its input to (128 in EG3D).
    sr_conv_clamp, sr_antialias, sr_noise_mode : SR block clamp, resize antialiasing, noise mode.
    decoder_hidden, decoder_output_dim, decoder_lr_mul : OSGDecoder MLP (features = output dim).
    c_scale, c_gen_conditioning_zero : how the camera label enters the mapping network.
    render : volume rendering options (mode 'eg3d' or 'clean').
    """

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 25
    mapping_layers: int = 2
    mapping_lr_mul: float = 0.01
    plane_resolution: int = 256
    plane_channels: int = 32
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: float | None = None
    neural_rendering_resolution: int = 128
    img_resolution: int = 512
    sr_channels: tuple = (256, 128)
    sr_input_resolution: int = 128
    sr_conv_clamp: float | None = 256
    sr_antialias: bool = True
    sr_noise_mode: str = "none"
    decoder_hidden: int = 64
    decoder_output_dim: int = 32
    decoder_lr_mul: float = 1.0
    c_scale: float = 1.0
    c_gen_conditioning_zero: bool = False
    render: RenderOptions = field(default_factory=RenderOptions)

    def __post_init__(self):
        if isinstance(self.render, dict):
            self.render = RenderOptions.from_kwargs(self.render)
        self.sr_channels = tuple(int(c) for c in self.sr_channels)
        for name in ("z_dim", "w_dim", "plane_resolution", "plane_channels", "neural_rendering_resolution",
                     "img_resolution", "decoder_hidden", "decoder_output_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GeneratorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.decoder_output_dim < 3:
            raise ValueError("GeneratorConfig.decoder_output_dim must be >= 3 (first 3 are RGB)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["render"] = self.render.to_kwargs()
        d["sr_channels"] = list(self.sr_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorConfig":
        check_config_fields(cls, d)
        d = dict(d)
        if "render" in d and isinstance(d["render"], dict):
            d["render"] = RenderOptions.from_kwargs(d["render"])
        return cls(**d)

    @classmethod
    def from_eg3d_init_kwargs(cls, init_kwargs: dict[str, Any], rendering_kwargs: dict[str, Any] | None = None,
                              neural_rendering_resolution: int | None = None) -> "GeneratorConfig":
        """Config of an official TriPlaneGenerator from its pickled ``_init_kwargs``."""
        ik = dict(init_kwargs)
        rk = dict(rendering_kwargs if rendering_kwargs is not None else ik.get("rendering_kwargs", {}))
        mk = dict(ik.get("mapping_kwargs", {}) or {})
        sr_mod = str(rk.get("superresolution_module", "")).rsplit(".", 1)[-1]
        img_res = int(ik.get("img_resolution", 512))
        sr_table = {"SuperresolutionHybrid8XDC": (128, (256, 128)), "SuperresolutionHybrid8X": (128, (128, 64))}
        if sr_mod not in sr_table:
            raise ValueError(f"unsupported superresolution_module {rk.get('superresolution_module')!r}; "
                             f"supported: {', '.join(sr_table)}")
        sr_in, sr_ch = sr_table[sr_mod]
        sr_fp16 = int(ik.get("sr_num_fp16_res", 0))
        render = RenderOptions.from_kwargs(rk, mode="eg3d")
        return cls(
            z_dim=int(ik.get("z_dim", 512)), w_dim=int(ik.get("w_dim", 512)), c_dim=int(ik.get("c_dim", 25)),
            mapping_layers=int(mk.get("num_layers", 2)), mapping_lr_mul=float(mk.get("lr_multiplier", 0.01)),
            plane_resolution=256, plane_channels=32,
            channel_base=int(ik.get("channel_base", 32768)), channel_max=int(ik.get("channel_max", 512)),
            conv_clamp=ik.get("conv_clamp"),
            neural_rendering_resolution=int(neural_rendering_resolution or 64),
            img_resolution=img_res, sr_channels=sr_ch, sr_input_resolution=sr_in,
            sr_conv_clamp=256 if sr_fp16 > 0 else None, sr_antialias=bool(rk.get("sr_antialias", True)),
            sr_noise_mode=str(rk.get("superresolution_noise_mode", "none")),
            decoder_lr_mul=float(rk.get("decoder_lr_mul", 1.0)), decoder_output_dim=32,
            c_scale=float(rk.get("c_scale", 1.0)),
            c_gen_conditioning_zero=bool(rk.get("c_gen_conditioning_zero", False)),
            render=render,
        )


def _presets() -> dict[str, GeneratorConfig]:
    eg3d = GeneratorConfig(render=RenderOptions.from_kwargs(EG3D_FFHQ_RENDERING_KWARGS, mode="eg3d"))
    tiny = GeneratorConfig(
        z_dim=128, w_dim=128, mapping_layers=2, plane_resolution=64, plane_channels=16,
        channel_base=2048, channel_max=64, neural_rendering_resolution=32, img_resolution=64,
        sr_channels=(32,), sr_input_resolution=32, sr_conv_clamp=None, decoder_output_dim=16,
        decoder_hidden=32,
        render=RenderOptions(depth_resolution=16, depth_resolution_importance=16, ray_start=2.25,
                             ray_end=3.3, box_warp=1.0, mode="clean", deterministic=False),
    )
    small = replace(tiny, z_dim=256, w_dim=256, plane_resolution=128, plane_channels=32,
                    channel_base=16384, channel_max=256, neural_rendering_resolution=64,
                    img_resolution=128, sr_channels=(64,), sr_input_resolution=64, decoder_output_dim=32,
                    render=RenderOptions(depth_resolution=32, depth_resolution_importance=32, mode="clean"))
    return {"eg3d-ffhq512": eg3d, "tiny": tiny, "small": small}


PRESETS = _presets()


def get_config(name: str, **overrides) -> GeneratorConfig:
    """A fresh copy of preset ``name`` with field ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown generator config {name!r}; choose from {', '.join(PRESETS)}")
    base = GeneratorConfig.from_dict(PRESETS[name].to_dict())
    return replace(base, **overrides) if overrides else base
