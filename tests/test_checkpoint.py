"""Checkpoints: safetensors round trip, and safe reading of pickles in EG3D's persistent format.

The test writes stand-ins for EG3D's ``torch_utils.persistence`` / ``training.*`` / ``dnnlib``
modules into a temporary folder and pickles a generator in the official layout: persistent
classes reduce to ``_reconstruct_persistent_obj(meta)`` whose ``module_src`` the official loader
``exec()``s. A plain ``pickle.load`` of such a file runs the embedded source (checked here), our
reader must not.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from lightstage.camera import EG3D_FRONT_CAM2WORLD, eg3d_label
from model import layers as L
from model.checkpoint import (CheckpointError, UnsafePickleError, checkpoint_paths, convert_eg3d_pickle,
                              load_checkpoint, load_generator, read_eg3d_pickle, save_checkpoint)
from model.configs import EG3D_FFHQ_RENDERING_KWARGS, GeneratorConfig
from model.prior import Backbone, OSGDecoder, TriPlaneGenerator, build_generator
from model.superres import SuperResolution

FAKE_PERSISTENCE = '''
import pickle
class Persistent:
    """Reduces like EG3D's persistent_class instances."""
    def __init__(self, class_name, module_src, state):
        self.class_name, self.module_src, self.state = class_name, module_src, state
    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src,
                    class_name=self.class_name, state=self.state)
        return (_reconstruct_persistent_obj, (meta,), None)

def _reconstruct_persistent_obj(meta):
    # What the official loader does: exec the embedded module source.
    ns = {}
    exec(meta["module_src"], ns)
    obj = ns.get(meta["class_name"], object).__new__(ns.get(meta["class_name"], object))
    return obj
'''

FAKE_MODULES = {
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": FAKE_PERSISTENCE,
    "dnnlib/__init__.py": "",
    "dnnlib/util.py": "class EasyDict(dict):\n    pass\n",
    "training/__init__.py": "",
    "training/triplane.py": "import torch\nclass OSGDecoder(torch.nn.Module):\n    pass\n",
    "training/volumetric_rendering/__init__.py": "",
    "training/volumetric_rendering/renderer.py": "import torch\nclass ImportanceRenderer(torch.nn.Module):\n    pass\n",
    "training/volumetric_rendering/ray_sampler.py": "import torch\nclass RaySampler(torch.nn.Module):\n    pass\n",
    "training/volumetric_rendering/ray_marcher.py": "import torch\nclass MipRayMarcher2(torch.nn.Module):\n    pass\n",
}

PERSISTENT_NAMES = {
    TriPlaneGenerator: "TriPlaneGenerator", Backbone: "Generator", L.MappingNetwork: "MappingNetwork",
    L.FullyConnectedLayer: "FullyConnectedLayer", L.SynthesisNetwork: "SynthesisNetwork",
    L.SynthesisBlock: "SynthesisBlock", L.SynthesisLayer: "SynthesisLayer", L.ToRGBLayer: "ToRGBLayer",
    SuperResolution: "SuperresolutionHybrid8XDC",
}


@pytest.fixture
def fake_eg3d(tmp_path):
    """Put the stand-in EG3D packages on sys.path; yields a module namespace and the marker path."""
    root = tmp_path / "eg3d_src"
    for rel, src in FAKE_MODULES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
    sys.path.insert(0, str(root))
    before = set(sys.modules)
    try:
        import dnnlib.util
        import torch_utils.persistence
        import training.triplane
        import training.volumetric_rendering.ray_marcher
        import training.volumetric_rendering.ray_sampler
        import training.volumetric_rendering.renderer
        ns = dict(persistence=torch_utils.persistence, util=dnnlib.util, triplane=training.triplane,
                  renderer=training.volumetric_rendering.renderer,
                  ray_sampler=training.volumetric_rendering.ray_sampler,
                  ray_marcher=training.volumetric_rendering.ray_marcher)
        yield ns, tmp_path / "PWNED"
    finally:
        sys.path.remove(str(root))
        for m in set(sys.modules) - before:
            del sys.modules[m]


def _payload_src(marker) -> str:
    return textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("executed")
        class TriPlaneGenerator: pass
        class Generator: pass
    """)


def _module_state(m: torch.nn.Module) -> dict:
    st = {"training": False, "_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
          "_non_persistent_buffers_set": set(), "_modules": collections.OrderedDict(),
          "_forward_hooks": collections.OrderedDict(), "_backward_hooks": collections.OrderedDict()}
    for k, v in m._parameters.items():
        st["_parameters"][k] = torch.nn.Parameter(v.detach().clone(), requires_grad=False)
    for k, v in m._buffers.items():
        st["_buffers"][k] = v.detach().clone()
    if isinstance(m, L.FullyConnectedLayer):
        st["weight_gain"] = np.float64(m.weight_gain)  # official: np.float64 attribute
    return st


def _to_official(m, ns, src):
    """Our module tree -> objects that pickle like EG3D's (persistent + plain classes)."""
    st = _module_state(m)
    for k, child in m._modules.items():
        if k != "renderer":  # ours is replaced by EG3D's renderer stand-in below
            st["_modules"][k] = _to_official(child, ns, src)
    if isinstance(m, TriPlaneGenerator):
        rk = dict(EG3D_FFHQ_RENDERING_KWARGS)
        st["rendering_kwargs"] = rk
        st["neural_rendering_resolution"] = m.neural_rendering_resolution
        st["_init_args"] = ()
        st["_init_kwargs"] = ns["util"].EasyDict(
            z_dim=m.cfg.z_dim, w_dim=m.cfg.w_dim, c_dim=25, img_resolution=512, img_channels=3,
            sr_num_fp16_res=4, mapping_kwargs=ns["util"].EasyDict(num_layers=2),
            rendering_kwargs=rk, sr_kwargs=ns["util"].EasyDict(channel_base=m.cfg.channel_base,
                                                               channel_max=m.cfg.channel_max),
            channel_base=m.cfg.channel_base, channel_max=m.cfg.channel_max, num_fp16_res=0, conv_clamp=None)
        rend = ns["renderer"].ImportanceRenderer.__new__(ns["renderer"].ImportanceRenderer)
        rend.__dict__.update(_module_state(torch.nn.Module()))
        rend.__dict__["plane_axes"] = torch.eye(3).repeat(3, 1, 1)  # attribute, not a buffer
        march = ns["ray_marcher"].MipRayMarcher2.__new__(ns["ray_marcher"].MipRayMarcher2)
        march.__dict__.update(_module_state(torch.nn.Module()))
        rend.__dict__["_modules"]["ray_marcher"] = march
        st["_modules"]["renderer"] = rend
        rs = ns["ray_sampler"].RaySampler.__new__(ns["ray_sampler"].RaySampler)
        rs.__dict__.update(_module_state(torch.nn.Module()))
        st["_modules"]["ray_sampler"] = rs
    if type(m) in PERSISTENT_NAMES:
        return ns["persistence"].Persistent(PERSISTENT_NAMES[type(m)], src, st)
    if isinstance(m, OSGDecoder):
        obj = ns["triplane"].OSGDecoder.__new__(ns["triplane"].OSGDecoder)
    elif isinstance(m, (torch.nn.Sequential, torch.nn.Softplus)):
        obj = type(m).__new__(type(m))  # real torch.nn class, as in the official pickle
        if isinstance(m, torch.nn.Softplus):
            st.update(beta=1.0, threshold=20.0)
    else:
        raise AssertionError(f"no official counterpart for {type(m).__name__}")
    obj.__dict__.update(st)
    return obj


def _small_eg3d_config() -> GeneratorConfig:
    # Official layout (256² backbone, 8XDC SR) with narrow backbone channels to keep it fast.
    ik = dict(z_dim=64, w_dim=64, c_dim=25, img_resolution=512, sr_num_fp16_res=4,
              mapping_kwargs={"num_layers": 2}, channel_base=2048, channel_max=16)
    return GeneratorConfig.from_eg3d_init_kwargs(ik, EG3D_FFHQ_RENDERING_KWARGS, 128)


def _write_official_pickle(path, G, ns, src, extra=None):
    data = {"training_set_kwargs": ns["util"].EasyDict(resolution=512), "G": None, "D": None,
            "G_ema": _to_official(G, ns, src), "augment_pipe": None}
    data.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


# ------------------------------------------------------------------------------------------------

def test_official_layout_pickle_loads_without_executing_and_round_trips(fake_eg3d, tmp_path):
    ns, marker = fake_eg3d
    G = build_generator(_small_eg3d_config(), seed=0).eval()
    pkl = tmp_path / "net.pkl"
    _write_official_pickle(pkl, G, ns, _payload_src(marker))

    # The payload is live: the usual loader runs the embedded module source.
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    net = read_eg3d_pickle(pkl)
    assert not marker.exists(), "embedded module source was executed"
    assert net.class_name == "TriPlaneGenerator"
    assert net.neural_rendering_resolution == 128
    assert net.rendering_kwargs["superresolution_module"].endswith("SuperresolutionHybrid8XDC")
    ref = G.state_dict()
    assert set(net.state_dict) == set(ref)  # renderer's plane_axes attribute is not a tensor entry
    for k, v in ref.items():
        assert net.state_dict[k].dtype == v.dtype and torch.equal(net.state_dict[k], v), k

    out = tmp_path / "conv" / "g"
    wpath, jpath = convert_eg3d_pickle(pkl, out)
    assert not marker.exists()
    ck = load_checkpoint(out)
    assert ck.config.render.mode == "eg3d" and ck.eg3d["init_kwargs"]["channel_base"] == 2048
    for k, v in ref.items():
        assert torch.equal(ck.state_dict[k], v), k
    # load -> save again: the files are identical byte for byte
    w2, j2 = save_checkpoint(tmp_path / "again" / "g", ck.state_dict, ck.config, eg3d=ck.eg3d, meta=ck.meta)
    assert w2.read_bytes() == wpath.read_bytes()
    assert j2.read_text() == jpath.read_text()

    # the converted generator renders exactly what the original does
    G2 = load_generator(out)
    c = torch.tensor(eg3d_label(EG3D_FRONT_CAM2WORLD))[None]
    z = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = G.synthesis(G.mapping(z, c), c, neural_rendering_resolution=16, superresolution=False)
        b = G2.synthesis(G2.mapping(z, c), c, neural_rendering_resolution=16, superresolution=False)
    assert torch.equal(a["image_raw"], b["image_raw"])


@pytest.mark.parametrize("evil", ["os.system", "builtins.exec", "subprocess"])
def test_unknown_globals_are_refused_and_nothing_runs(fake_eg3d, tmp_path, evil):
    ns, marker = fake_eg3d
    G = build_generator(_small_eg3d_config(), seed=0)
    if evil == "os.system":
        payload, name = _Reduce(os.system, (f"touch {marker}",)), "system"
    elif evil == "builtins.exec":
        payload, name = _Reduce(exec, (f"open({str(marker)!r}, 'w').write('x')",)), "builtins.exec"
    else:
        import subprocess
        payload, name = _Reduce(subprocess.call, (["touch", str(marker)],)), "subprocess.call"
    pkl = tmp_path / "evil.pkl"
    _write_official_pickle(pkl, G, ns, "class TriPlaneGenerator: pass\n", extra={"zzz": payload})
    with pytest.raises(UnsafePickleError, match=name):
        read_eg3d_pickle(pkl)
    assert not marker.exists()


def test_checkpoint_refuses_overwrite_and_reports_bad_files(tmp_path):
    G = build_generator("tiny", seed=0)
    save_checkpoint(tmp_path / "g", G, G.cfg)
    before = checkpoint_paths(tmp_path / "g")[0].read_bytes()
    with pytest.raises(CheckpointError, match="exists"):
        save_checkpoint(tmp_path / "g", build_generator("tiny", seed=1), G.cfg)
    assert checkpoint_paths(tmp_path / "g")[0].read_bytes() == before
    mask = os.umask(0)
    os.umask(mask)
    for p in checkpoint_paths(tmp_path / "g"):
        assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)  # not mkstemp's private 0600
    G2 = load_generator(tmp_path / "g.safetensors")
    for (k, a), (k2, b) in zip(G.state_dict().items(), G2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="bad.json.*format"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
