"""Generator checkpoints: safetensors + JSON, and a safe reader for official EG3D pickles.

Our format (``<stem>.safetensors`` + ``<stem>.json``)
----------------------------------------------------
``<stem>.safetensors``  the generator ``state_dict`` (float32, names as EG3D's G_ema).
``<stem>.json``         ``{"format": "lightstage-prior", "version": 1, "config": GeneratorConfig,
                        "eg3d": {init_kwargs, rendering_kwargs, neural_rendering_resolution} | null,
                        "meta": {...}}``.
Neither file can carry code; loading never executes anything. Writes are atomic (temporary
file + rename) and refuse to replace an existing checkpoint unless ``overwrite=True``.

Official EG3D pickles
---------------------
EG3D's ``network-snapshot-*.pkl`` / ``ffhq512-128.pkl`` are pickles whose persistent classes carry
their module *source*, which the usual loader ``exec()``s (see ``/work/shared/notes`` sec. 1.9).
:func:`read_eg3d_pickle` uses a restricted unpickler that executes nothing:

* allowed callables: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
  ``_rebuild_parameter`` / ``_rebuild_parameter_with_state``, ``numpy.dtype``, numpy ``scalar``
  (``numpy.core`` and ``numpy._core`` spellings), ``builtins.set``;
* ``torch.storage._load_from_bytes`` -> ``torch.load(..., weights_only=True)`` (torch's own
  restricted unpickler reads the inner legacy blob);
* ``torch_utils.persistence._reconstruct_persistent_obj`` -> an inert :class:`PersistentStub` that
  keeps ``class_name``, ``state`` and ``module_src`` *as text*;
* classes under ``training.``, ``torch.nn.modules.``, ``torch_utils.``, ``dnnlib.``,
  ``_imported_module_`` -> inert stubs whose ``__setstate__`` only stores the dict;
* anything else (``os.system``, ``builtins.exec``, ...) -> :class:`UnsafePickleError` naming it.

The stub tree is walked like ``nn.Module.state_dict`` (``_parameters``, ``_buffers`` minus
``_non_persistent_buffers_set``, recursing into ``_modules``), which gives keys equal to the
official ``G_ema.state_dict()``. :func:`convert_eg3d_pickle` writes that once as our format.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.configs import GeneratorConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "UnsafePickleError",
    "Checkpoint",
    "Eg3dNetwork",
    "PersistentStub",
    "checkpoint_paths",
    "save_checkpoint",
    "load_checkpoint",
    "load_generator",
    "read_eg3d_pickle",
    "convert_eg3d_pickle",
]

CHECKPOINT_FORMAT = "lightstage-prior"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the reason."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (named in the message)."""


# ------------------------------------------------------------------ our format ------------------


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights .safetensors, config .json)`` for a stem, a .safetensors or a .json path."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state_dict`` (name -> tensor), ``config``, ``eg3d`` provenance, ``meta``."""

    state_dict: dict[str, torch.Tensor]
    config: GeneratorConfig
    eg3d: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, state, config: GeneratorConfig, meta: dict | None = None,
                    eg3d: dict | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``state`` (a module or a state_dict) + config as ``<stem>.safetensors`` / ``.json``.

    Tensors are stored as they are (contiguous copies, same dtype), so a load/save round trip is
    bit for bit. Refuses to replace existing files unless ``overwrite``.
    """
    wpath, jpath = checkpoint_paths(path)
    if not overwrite:
        for p in (wpath, jpath):
            if p.exists():
                raise CheckpointError(f"{p} exists; refusing to overwrite (pass overwrite=True)")
    wpath.parent.mkdir(parents=True, exist_ok=True)
    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "eg3d": _jsonable(eg3d) if eg3d is not None else None,
        "meta": _jsonable(meta or {}),
    }
    text = json.dumps(doc, indent=1) + "\n"
    _atomic_write(wpath, lambda t: save_file(tensors, t, metadata={"format": CHECKPOINT_FORMAT}))
    _atomic_write(jpath, lambda t: Path(t).write_text(text))
    return wpath, jpath


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no code is executed)."""
    wpath, jpath = checkpoint_paths(path)
    for p in (wpath, jpath):
        if not p.exists():
            raise CheckpointError(f"{p}: file not found (a checkpoint is a .safetensors + .json pair)")
    try:
        doc = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{jpath}: not valid JSON ({e})") from e
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{jpath}: field 'format' is {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if int(doc.get("version", -1)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{jpath}: version {doc.get('version')} is newer than supported ({CHECKPOINT_VERSION})")
    try:
        config = GeneratorConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{jpath}: invalid field 'config': {e}") from e
    try:
        sd = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{wpath}: not a readable safetensors file ({e})") from e
    return Checkpoint(sd, config, doc.get("eg3d"), doc.get("meta") or {})


def load_generator(path: str | os.PathLike, strict: bool = True, **config_overrides):
    """A :class:`model.prior.TriPlaneGenerator` in eval mode with the checkpoint's weights."""
    from dataclasses import replace

    from model.prior import TriPlaneGenerator

    ck = load_checkpoint(path)
    cfg = replace(ck.config, **config_overrides) if config_overrides else ck.config
    G = TriPlaneGenerator(cfg)
    missing, unexpected = G.load_state_dict(ck.state_dict, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{checkpoint_paths(path)[0]}: weights do not fit the config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return G.eval()


# ------------------------------------------------------------------ EG3D pickles ----------------


class PersistentStub:
    """Inert stand-in for an EG3D persistent object; ``module_src`` is kept as text only."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict):
            raise UnsafePickleError("persistent object metadata is not a dict")
        self.class_name = str(meta.get("class_name"))
        self.module_src = meta.get("module_src")
        self.version = meta.get("version")
        self.state = meta.get("state") or {}

    def __repr__(self):
        return f"PersistentStub({self.class_name})"


class _Stub:
    """Base of generated inert stubs for non-persistent classes (training.*, torch.nn.*)."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):  # REDUCE on a stub class: keep args, run nothing
        self.args = args
        self.state = dict(kwargs)

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __repr__(self):
        return f"Stub({self._qualname})"


class _EasyDict(dict):
    """Local stand-in for ``dnnlib.util.EasyDict``."""

    def __setstate__(self, state):
        self.update(state or {})


def _weights_only_load_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _safe_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    return dt


_STUB_PREFIXES = ("training.", "torch.nn.modules.", "torch_utils.", "_imported_module_", "dnnlib.")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f)
        self.source = source
        self._stubs: dict[str, type] = {}

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent id {pid!r} is not supported")

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        allowed = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
            "numpy.dtype": _safe_dtype,
            "builtins.set": set,
            "torch.storage._load_from_bytes": _weights_only_load_from_bytes,
            "torch_utils.persistence._reconstruct_persistent_obj": PersistentStub,
            "dnnlib.util.EasyDict": _EasyDict,
        }
        if hasattr(torch._utils, "_rebuild_parameter_with_state"):
            allowed["torch._utils._rebuild_parameter_with_state"] = torch._utils._rebuild_parameter_with_state
        if full in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
            from numpy._core.multiarray import scalar  # numpy >= 2

            return scalar
        if full in allowed:
            return allowed[full]
        if module.startswith(_STUB_PREFIXES) or module in ("training", "torch_utils", "dnnlib"):
            if full not in self._stubs:
                self._stubs[full] = type(f"Stub_{name}", (_Stub,), {"_qualname": full})
            return self._stubs[full]
        raise UnsafePickleError(f"{self.source}: refusing to load global '{full}' "
                                "(not on the EG3D allow-list; nothing was executed)")


def _state_of(obj) -> dict:
    if isinstance(obj, PersistentStub):
        return obj.state
    if isinstance(obj, _Stub):
        return obj.state
    raise CheckpointError(f"unexpected object {type(obj).__name__} in the module tree")


def _walk_state_dict(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    st = _state_of(obj)
    params = st.get("_parameters") or {}
    buffers = st.get("_buffers") or {}
    nonpersistent = set(st.get("_non_persistent_buffers_set") or ())
    for k, v in params.items():
        if v is not None:
            out[prefix + k] = v.detach()
    for k, v in buffers.items():
        if v is not None and k not in nonpersistent:
            out[prefix + k] = v.detach()
    for k, m in (st.get("_modules") or {}).items():
        if m is not None:
            _walk_state_dict(m, f"{prefix}{k}.", out)


@dataclass
class Eg3dNetwork:
    """One network read from an EG3D pickle without executing it."""

    class_name: str
    state_dict: dict[str, torch.Tensor]
    init_kwargs: dict[str, Any]
    rendering_kwargs: dict[str, Any]
    neural_rendering_resolution: int | None

    def config(self) -> GeneratorConfig:
        return GeneratorConfig.from_eg3d_init_kwargs(self.init_kwargs, self.rendering_kwargs,
                                                     self.neural_rendering_resolution)


def read_eg3d_pickle(path: str | os.PathLike, key: str = "G_ema") -> Eg3dNetwork:
    """Read network ``key`` from an official EG3D pickle with the restricted unpickler."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            data = _RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable EG3D pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or key not in data:
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: no network {key!r} in the pickle (found {keys})")
    net = data[key]
    if not isinstance(net, PersistentStub):
        raise CheckpointError(f"{path}: {key!r} is not a persistent EG3D network ({net!r})")
    sd: dict[str, torch.Tensor] = {}
    _walk_state_dict(net, "", sd)
    st = net.state
    init_kwargs = dict(st.get("_init_kwargs") or {})
    rk = dict(st.get("rendering_kwargs") or init_kwargs.get("rendering_kwargs") or {})
    nrr = st.get("neural_rendering_resolution")
    return Eg3dNetwork(net.class_name, sd, _jsonable(init_kwargs), _jsonable(rk),
                       int(nrr) if nrr is not None else None)


def convert_eg3d_pickle(pkl: str | os.PathLike, out: str | os.PathLike, key: str = "G_ema",
                        overwrite: bool = False) -> tuple[Path, Path]:
    """Convert an official EG3D pickle once into ``<out>.safetensors`` + ``<out>.json``.

    The tensors are checked against a freshly built generator of the pickle's config (names and
    shapes), so a converted file always loads with :func:`load_generator`.
    """
    from model.prior import TriPlaneGenerator

    net = read_eg3d_pickle(pkl, key)
    cfg = net.config()
    ref = {k: tuple(v.shape) for k, v in TriPlaneGenerator(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in net.state_dict.items()}
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    wrong = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
    if missing or extra or wrong:
        raise CheckpointError(f"{pkl}: network {key!r} does not match a {net.class_name} of its config: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}")
    eg3d = {"source": Path(pkl).name, "key": key, "class_name": net.class_name,
            "init_kwargs": net.init_kwargs, "rendering_kwargs": net.rendering_kwargs,
            "neural_rendering_resolution": net.neural_rendering_resolution}
    return save_checkpoint(out, net.state_dict, cfg, eg3d=eg3d, overwrite=overwrite)
