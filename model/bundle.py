"""The bundled default model: a tiny prior + encoder + basis-head reflectance network, trained on
the digital twin, shipped as safetensors + JSON inside the package (``model/assets/default``).

Reproduce it with ONE command (fixed seeds, small step counts, about 15 min of CPU on one thread)::

    python -m model.bundle build --out model/assets/default [--overwrite]

Stages (each seeded from :attr:`BundleConfig.seed`):

1. render twin portraits (``model.data.render_twin_dataset``) and train the head prior as a
   multi-view auto-decoder (``model.train_prior.train_prior``, preset ``tiny``);
2. train the portrait encoder on prior samples (``model.train_encoder.train_encoder`` with the
   auto-decoder codes as latent sampler);
3. train the reflectance network (basis head, ``model.reflectance``) on twin OLATs: for a few
   training subjects and views, the twin renders one image per model light (distant, unit
   irradiance, cast shadows on), and the network, fed the prior's triplane of that subject's
   code and the prior's fixed density, learns to reproduce them (masked linear + log L2 as in
   ``model.train_reflectance.reflectance_loss``);
4. fit the 5-point landmark template of the twin heads (MTCNN landmarks of training subjects
   at known cameras, triangulated: :func:`fit_twin_landmark_template`), so that pose estimates
   of twin-like faces follow the model's head frame (``bundle.json`` field ``landmarks_3d``).

Reproducible: two builds with the same config write byte-identical folders (one torch thread,
deterministic kernels, every RNG seeded from the config; no timings or temporary paths are
written -- they go to the log and, with ``--work``, to ``WORK/build_timings.json``). The encoder
is stored in float16 (half the bytes; no measurable change in any evaluation number).

Folder layout (everything loads with safetensors/JSON only: no code runs)::

    DIR/bundle.json                 format, light set (head frame), display transform, landmark
                                    template, provenance
    DIR/prior.safetensors|.json     model.checkpoint format
    DIR/encoder.safetensors|.json   model.encoder format
    DIR/reflectance.safetensors     ReflectanceNet state dict (config in bundle.json)

The light set is the model's: OLATs are synthesised for these head-frame directions, so a
relight with ``lightstage.relight`` weights for them is ``sum_i E_i OLAT_i`` as for a capture.

References
----------
Rao, P. et al. (2025). 3DPR: Single Image 3D Portrait Relighting with Generative Priors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lightstage.rig import fibonacci_sphere

__all__ = ["BUNDLE_FORMAT", "DEFAULT_BUNDLE", "BundleError", "BundleConfig", "Bundle", "fibonacci_lights",
           "TEMPLATE_POSES", "twin_pose_observations", "pose_errors_deg", "fit_twin_landmark_template", "twin_camera", "label_rays", "twin_olats", "build_bundle", "load_bundle", "main"]

BUNDLE_FORMAT = "lightstage-portrait-bundle"
BUNDLE_VERSION = 1
#: the bundled model, shipped with the package
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "assets" / "default"


class BundleError(ValueError):
    """A bundle folder that cannot be used; the message names the file/field and the reason."""


@dataclass
class BundleConfig:
    """Sizes and step counts of a bundle build (defaults: the shipped model).

    Attributes
    ----------
    seed : every RNG of the build derives from it.
    prior_subjects, prior_views, prior_steps : twin portrait set and auto-decoder steps.
    encoder_steps, encoder_pool : encoder training.
    n_lights : the model's light set (Fibonacci sphere, head frame).
    refl_subjects, refl_views, refl_res : twin OLAT training data (subjects x views, R x R rays).
    refl_steps, refl_rays, refl_lights, refl_basis : reflectance training.
    max_samples : samples kept per ray from the prior's density.
    threads : torch CPU threads during the build (1: bit-identical rebuilds).
    template_subjects : training subjects whose landmarks give the pose template (0: none).
    encoder_half : store the encoder in float16 (measured on 5 held-out twin subjects: encoder
        PSNR 17.96852 vs 17.96854 dB, every relight number equal to 0.01 dB; half the bytes).
    """

    seed: int = 0
    prior_subjects: int = 32
    prior_views: int = 5
    prior_steps: int = 500
    encoder_steps: int = 150
    encoder_pool: int = 128
    n_lights: int = 64
    refl_subjects: int = 8
    refl_views: int = 3
    refl_res: int = 32
    refl_steps: int = 1200
    refl_rays: int = 512
    refl_lights: int = 16
    refl_basis: int = 16
    max_samples: int = 8
    threads: int = 1
    template_subjects: int = 10
    encoder_half: bool = True

    @classmethod
    def quick(cls, **kw) -> "BundleConfig":
        """Minutes-scale settings for tests and ``ls-demo --quick`` without a bundle."""
        base = dict(prior_subjects=6, prior_views=2, prior_steps=20, encoder_steps=10, encoder_pool=16,
                    n_lights=32, refl_subjects=2, refl_views=1, refl_res=16, refl_steps=30, refl_rays=128,
                    refl_lights=8, max_samples=6, template_subjects=0)
        base.update(kw)
        return cls(**base)


def fibonacci_lights(n: int) -> np.ndarray:
    """(n, 3) unit directions spread evenly on the sphere (y up): the rig's Fibonacci sphere."""
    return fibonacci_sphere(n)


def twin_camera(label: np.ndarray, scene, res: int):
    """The rig camera (world frame) of an EG3D head-frame ``label`` (25,) for a twin HeadScene.

    The head frame maps to the world through the subject's ``world2head`` similarity (uniform
    scale, no rotation), so directions -- camera axes and distant lights -- are shared.
    """
    from lightstage.rig import Camera, Sensor

    lab = np.asarray(label, np.float64)
    c2w = lab[:16].reshape(4, 4).copy()
    h2w = np.linalg.inv(scene.world2head)
    c2w[:3, 3] = h2w[:3, :3] @ c2w[:3, 3] + h2w[:3, 3]
    f = float(lab[16]) * res
    K = [[f, 0.0, res / 2 - 0.5], [0.0, f, res / 2 - 0.5], [0.0, 0.0, 1.0]]
    return Camera("view", K, [0.0] * 5, c2w.tolist(), Sensor(res, res))


def label_rays(label, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-frame rays through the pixel centres of an R x R view: (R*R, 3) origins, dirs."""
    from model.rendering import ray_sampler

    lab = torch.as_tensor(np.asarray(label, np.float32))
    o, d = ray_sampler(lab[:16].reshape(1, 4, 4), lab[16:].reshape(1, 3, 3), res)
    return o[0], d[0]


def twin_olats(scene, label, light_dirs: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Twin OLATs per unit irradiance: (L, R*R, 3) float32 and the (R*R,) head mask."""
    cam = twin_camera(label, scene, res)
    out = np.empty((len(light_dirs), res * res, 3), np.float32)
    one = np.ones((1, 3))
    with np.errstate(invalid="ignore"):
        for i, d in enumerate(light_dirs):
            out[i] = scene.radiance(cam, d[None], one, distant=True).reshape(-1, 3)
    return np.nan_to_num(out), scene.truth(cam)["mask"].reshape(-1).astype(bool)


# ------------------------------------------------------------------ landmark template (pose)

#: (yaw, pitch) degrees of the twin views used to fit and to check the pose template
TEMPLATE_POSES = ((0.0, 0.0), (20.0, 0.0), (-20.0, 0.0), (0.0, 10.0), (0.0, -10.0), (15.0, 5.0), (-15.0, -5.0))


def twin_pose_observations(seeds, poses=TEMPLATE_POSES, size: int = 256, detector=None) -> list[dict]:
    """Render twin heads at known EG3D cameras, detect and align them as a photo would be
    (``model.face.prepare_portrait``). Returns one dict per detected view: seed, yaw, pitch,
    ``landmarks_crop`` (5, 2), ``true`` (4, 4) cam2world; views without a detection are skipped."""
    from model.encoder import from_generator_domain
    from model.face import MTCNNDetector, NoFaceFound, prepare_portrait
    from model.train_encoder import look_at_labels, render_twin_views

    det = detector or MTCNNDetector()
    out = []
    for s in seeds:
        for yaw, pitch in poses:
            lab = look_at_labels(np.radians([yaw]), np.radians([pitch]))
            img, _ = render_twin_views([int(s)], lab, size)
            lin = from_generator_domain(img[0]).permute(1, 2, 0).numpy().astype(np.float32)
            try:
                pp = prepare_portrait(lin, size=size, detector=det)
            except NoFaceFound:
                continue
            out.append({"seed": int(s), "yaw": yaw, "pitch": pitch, "landmarks_crop": pp.meta["landmarks_crop"],
                        "true": lab[0, :16].reshape(4, 4).astype(np.float64)})
    return out


def pose_errors_deg(observations: list[dict], template=None, size: int = 256) -> np.ndarray:
    """(N, 3) per observation: angle between estimated and true camera centre, and the signed
    yaw and pitch errors (degrees) of :func:`model.face.estimate_pose` with ``template``."""
    from model.face import estimate_pose

    def yp(c):
        c = c / np.linalg.norm(c)
        return math.degrees(math.atan2(c[0], c[2])), math.degrees(math.asin(np.clip(c[1], -1, 1)))

    rows = []
    for o in observations:
        est = estimate_pose(o["landmarks_crop"], size, template=template)[:3, 3]
        tru = o["true"][:3, 3]
        ang = math.degrees(math.acos(np.clip(est @ tru / np.linalg.norm(est) / np.linalg.norm(tru), -1, 1)))
        (ye, pe), (yt, pt) = yp(est), yp(tru)
        rows.append((ang, ye - yt, pe - pt))
    return np.asarray(rows).reshape(-1, 3)


def fit_twin_landmark_template(seeds, poses=TEMPLATE_POSES, size: int = 256, detector=None) -> np.ndarray:
    """The 5-point landmark template (5, 3) of the twin's heads in the head frame, triangulated
    from MTCNN landmarks of ``seeds`` at known cameras (``model.face.fit_landmark_template``)."""
    from model.face import fit_landmark_template

    obs = twin_pose_observations(seeds, poses, size, detector)
    return fit_landmark_template(np.stack([o["landmarks_crop"] for o in obs]), np.stack([o["true"] for o in obs]),
                                 size)


# ------------------------------------------------------------------ loading


@dataclass
class Bundle:
    """A loaded model: prior ``G``, ``encoder``, reflectance ``net``, light set and metadata."""

    G: object
    encoder: object
    net: object
    light_dirs: np.ndarray
    meta: dict
    path: Path

    @property
    def resolution(self) -> int:
        return int(self.G.cfg.img_resolution)

    @property
    def landmark_template(self) -> np.ndarray | None:
        """(5, 3) head-frame landmark template of the faces the model was trained on (pose
        estimation), or None: the FFHQ/BFM default of ``model.face``."""
        t = self.meta.get("landmarks_3d")
        return None if t is None else np.asarray(t, np.float64)


def load_bundle(directory: str | os.PathLike | None = None) -> Bundle:
    """Read a bundle (default: the shipped one) with safetensors + JSON only.

    Raises :class:`BundleError` naming the missing or bad file.
    """
    from safetensors.torch import load_file

    from model.checkpoint import CheckpointError, load_generator
    from model.encoder import EncoderError, load_encoder
    from model.reflectance import ReflectanceConfig, ReflectanceNet

    d = Path(directory) if directory is not None else DEFAULT_BUNDLE
    j = d / "bundle.json"
    if not j.is_file():
        raise BundleError(f"{j}: not found (a model folder holds bundle.json, prior.*, encoder.*, "
                          "reflectance.safetensors; build one with `python -m model.bundle build`)")
    try:
        doc = json.loads(j.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{j}: not valid JSON ({e})") from None
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{j}: field 'format' is {doc.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if int(doc.get("version", -1)) > BUNDLE_VERSION:
        raise BundleError(f"{j}: version {doc.get('version')} is newer than supported")
    try:
        G = load_generator(d / "prior")
        enc, _ = load_encoder(d)
    except (CheckpointError, EncoderError) as e:
        raise BundleError(str(e)) from None
    try:
        ncfg = ReflectanceConfig.from_dict(doc["reflectance"])
        dirs = np.asarray(doc["light_dirs"], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{j}: invalid field 'reflectance'/'light_dirs': {e}") from None
    if dirs.ndim != 2 or dirs.shape[1] != 3 or len(dirs) < 4:
        raise BundleError(f"{j}: field 'light_dirs' must be (L >= 4, 3), got {dirs.shape}")
    if "landmarks_3d" in doc:
        try:
            lm3 = np.asarray(doc["landmarks_3d"], np.float64)
        except (TypeError, ValueError) as e:
            raise BundleError(f"{j}: invalid field 'landmarks_3d': {e}") from None
        if lm3.shape != (5, 3) or not np.all(np.isfinite(lm3)):
            raise BundleError(f"{j}: field 'landmarks_3d' must be a finite (5, 3) array, got {lm3.shape}")
    net = ReflectanceNet(ncfg)
    rp = d / "reflectance.safetensors"
    try:
        sd = load_file(str(rp))
    except Exception as e:  # safetensors has its own error types
        raise BundleError(f"{rp}: not a readable safetensors file ({e})") from None
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise BundleError(f"{rp}: weights do not fit the config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return Bundle(G.eval(), enc.eval(), net.eval(), dirs / np.linalg.norm(dirs, axis=1, keepdims=True), doc, d)


# ------------------------------------------------------------------ building


def _train_reflectance(G, codes: torch.Tensor, seeds: list[int], cfg: BundleConfig, light_dirs: np.ndarray,
                       progress: Callable | None = None):
    """Stage 3 (see the module docstring). Returns (net, history, radiance_scale)."""
    from lightstage.twin.subject import HeadScene, random_subject
    from model.reflectance import GeometrySamples, ReflectanceConfig, ReflectanceNet
    from model.relight_model import PriorGeometry
    from model.train_encoder import look_at_labels

    rng = np.random.default_rng([cfg.seed, 3])
    n_sub = min(cfg.refl_subjects, len(seeds))
    yaws = np.radians(np.linspace(-25, 25, cfg.refl_views)) if cfg.refl_views > 1 else np.zeros(1)
    labels = look_at_labels(yaws, np.zeros_like(yaws))
    ws = [codes[i][None].repeat(G.num_ws, 1) for i in range(n_sub)]
    geo = PriorGeometry(G, ws, max_samples=cfg.max_samples)
    items = []  # (subject, samples, targets (L, R, 3), mask (R,))
    total = n_sub * len(labels)
    for s in range(n_sub):
        with np.errstate(invalid="ignore"):
            scene = HeadScene(random_subject(int(seeds[s])), cube_n=96, vis_n=48)
        for lab in labels:
            tgt, mask = twin_olats(scene, lab, light_dirs, cfg.refl_res)
            o, d = label_rays(lab, cfg.refl_res)
            smp = geo.samples(s, o[None], d[None])
            items.append((s, smp, torch.from_numpy(tgt), torch.from_numpy(mask)))
            if progress:
                progress("twin OLATs", len(items), total, {})
    fg = torch.cat([t[:, m].reshape(-1) for _, _, t, m in items if m.any()])
    scale = float(fg.mean()) if fg.numel() and float(fg.mean()) > 0 else 1.0
    ncfg = ReflectanceConfig.tiny(head="basis", plane_channels=G.cfg.plane_channels, n_basis=cfg.refl_basis,
                                  plane_mode=G.cfg.render.mode, box_warp=float(G.cfg.render.box_warp),
                                  radiance_scale=scale)
    torch.manual_seed(cfg.seed)
    net = ReflectanceNet(ncfg)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.refl_steps, eta_min=2e-4)
    ld_all = torch.from_numpy(light_dirs.astype(np.float32))
    hist = []
    for step in range(1, cfg.refl_steps + 1):
        s, smp, tgt, mask = items[int(rng.integers(len(items)))]
        R = tgt.shape[1]
        # half the rays on the head, half anywhere: the background must learn to stay dark
        fg_idx = torch.nonzero(mask).reshape(-1)
        n_fg = min(len(fg_idx), cfg.refl_rays // 2)
        r_idx = torch.cat([fg_idx[torch.from_numpy(rng.choice(len(fg_idx), n_fg, replace=False))] if n_fg else
                           torch.zeros(0, dtype=torch.long),
                           torch.from_numpy(rng.choice(R, cfg.refl_rays - n_fg, replace=True))])
        l_idx = torch.from_numpy(rng.choice(len(light_dirs), cfg.refl_lights, replace=False))
        sub = GeometrySamples(smp.points[:, r_idx], smp.weights[:, r_idx], smp.dirs[:, r_idx])
        pred = net.olat(geo.planes(s), sub, ld_all[l_idx][None])[0]  # (l, r, 3)
        t = tgt[l_idx][:, r_idx]
        lin = ((pred - t) / scale) ** 2
        lg = (torch.log1p(pred / scale) - torch.log1p(t.clamp_min(0) / scale)) ** 2
        loss = (lin + 0.5 * lg).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist.append(float(loss.detach()))
        if progress:
            progress("reflectance", step, cfg.refl_steps, {"loss": hist[-1]})
    return net.eval(), hist, scale


def build_bundle(out: str | os.PathLike, cfg: BundleConfig | None = None, overwrite: bool = False,
                 work: str | os.PathLike | None = None, prior: str | os.PathLike | None = None,
                 data: str | os.PathLike | None = None,
                 progress: Callable[[str, int, int, dict], None] | None = None) -> Path:
    """Train the three networks on the twin and write the bundle folder ``out``.

    ``work`` keeps the intermediate twin renders and prior training state (default: a
    temporary folder, removed afterwards). ``prior`` (a ``ls-train prior`` folder: prior.* and
    train_state.safetensors with the subject codes) and ``data`` (its twin dataset folder) skip
    stage 1 and reuse a prior trained with the same settings. Refuses an ``out`` holding a bundle unless
    ``overwrite``. ``progress(stage, done, total, info)`` reports every step.
    """
    from safetensors.torch import load_file, save_file

    from model.checkpoint import load_generator
    from model.data import TwinDatasetConfig, render_twin_dataset
    from model.encoder import save_encoder
    from model.train_encoder import EncoderTrainConfig, LatentSampler, train_encoder
    from model.train_prior import TrainConfig, train_prior

    cfg = cfg or BundleConfig()
    out = Path(out)
    if (out / "bundle.json").exists() and not overwrite:
        raise BundleError(f"{out / 'bundle.json'} exists; refusing to overwrite (pass --overwrite)")
    # reproducibility: every RNG is seeded from cfg.seed; one thread and deterministic kernels
    # make two builds byte-identical (tests/test_portrait.py, slow)
    threads_before = torch.get_num_threads()
    det_before = torch.are_deterministic_algorithms_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=False)
    tmp = None
    if work is None:
        tmp = tempfile.mkdtemp(prefix="ls-bundle-")
        work = tmp
    work = Path(work)
    t0 = time.perf_counter()
    timings = {}
    try:
        # 1. prior
        data = Path(data) if data is not None else work / "data"
        if prior is not None and not (data / "dataset.json").is_file():
            raise BundleError(f"{data / 'dataset.json'}: not found (--data must be the prior's twin dataset)")
        if not (data / "dataset.json").exists():
            render_twin_dataset(data, TwinDatasetConfig(n_subjects=cfg.prior_subjects, views=cfg.prior_views,
                                                        resolution=64, seed=cfg.seed),
                                progress=(lambda d, n: progress("twin portraits", d, n, {})) if progress else None)
        timings["twin_portraits_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pdir = Path(prior) if prior is not None else work / "prior"
        if prior is None:
            train_prior(data, pdir, "tiny",
                        TrainConfig(steps=cfg.prior_steps, batch=4, ckpt_every=max(1, cfg.prior_steps), seed=cfg.seed),
                        overwrite=True, on_step=(lambda s, n, m: progress("prior", s, n, m)) if progress else None)
        for p in (pdir / "prior.safetensors", pdir / "train_state.safetensors", pdir / "train_state.json"):
            if not p.is_file():
                raise BundleError(f"{p}: not found (a prior folder from `ls-train prior`)")
        prior_state = json.loads((pdir / "train_state.json").read_text())
        timings["prior_s"] = time.perf_counter() - t1
        G = load_generator(pdir / "prior")
        codes = load_file(str(pdir / "train_state.safetensors"))["codes"].float()
        doc = json.loads((data / "dataset.json").read_text())
        seeds = [int(e["subject_seed"]) for e in doc["lightstage"]["environments"]]
        # 2. encoder
        t1 = time.perf_counter()
        sampler = LatentSampler("codes", codes)
        enc, ehist = train_encoder(G, EncoderTrainConfig(steps=cfg.encoder_steps, batch=8, pool_size=cfg.encoder_pool,
                                                         image_every=4, seed=cfg.seed),
                                   sampler=sampler,
                                   progress=(lambda s, n, m: progress("encoder", s, n, m)) if progress else None)
        timings["encoder_s"] = time.perf_counter() - t1
        # 3. reflectance
        t1 = time.perf_counter()
        light_dirs = fibonacci_lights(cfg.n_lights)
        net, rhist, scale = _train_reflectance(G, codes, seeds, cfg, light_dirs, progress)
        timings["reflectance_s"] = time.perf_counter() - t1
        # 4. the twin heads' landmark template, so poses of twin-like faces are unbiased
        t1 = time.perf_counter()
        template, tfit = None, None
        from model.face import detector_available

        if detector_available() and cfg.template_subjects > 0:
            if progress:
                progress("pose template", 0, 1, {})
            tseeds = seeds[:cfg.template_subjects]
            template = fit_twin_landmark_template(tseeds)
            tfit = {"what": "5-point landmark template (eyes, nose, mouth corners) of the twin heads in the "
                            "head frame, for pose estimation (model.face.estimate_pose)",
                    "subject_seeds": tseeds, "poses_yaw_pitch_deg": [list(p) for p in TEMPLATE_POSES], "size": 256,
                    "function": "model.bundle.fit_twin_landmark_template"}
            if progress:
                progress("pose template", 1, 1, {})
        timings["template_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t0
        # write: only what the inputs determine (no timings, no temporary paths), so two builds
        # with the same config are byte-identical; the timings go to the work folder and the log
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pdir / "prior.safetensors", out / "prior.safetensors")
        pdoc = json.loads((pdir / "prior.json").read_text())
        if isinstance(pdoc.get("meta"), dict) and "data" in pdoc["meta"]:
            pdoc["meta"]["data"] = (f"twin portraits (model.data.render_twin_dataset: {cfg.prior_subjects} subjects x "
                                    f"{cfg.prior_views} views, seed {cfg.seed})")
        (out / "prior.json").write_text(json.dumps(pdoc, indent=1) + "\n")
        final = {k: v for k, v in (ehist[-1] if ehist else {}).items() if k != "seconds"}
        save_encoder(out, enc, meta={"sampler": "auto-decoder codes", "steps": cfg.encoder_steps,
                                     "final": final or None}, overwrite=True, half=cfg.encoder_half)
        save_file({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()},
                  str(out / "reflectance.safetensors"))
        bdoc = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
                "light_dirs": light_dirs.tolist(), "light_frame": "EG3D head frame (y up, face +z)",
                "light_units": "OLAT radiance per unit irradiance of a distant light",
                "reflectance": net.cfg.to_dict(),
                "display": {"operator": "aces", "exposure_ev": 0.0},
                **({"landmarks_3d": template.tolist(), "landmarks_3d_fit": tfit} if template is not None else {}),
                "build": {"command": "python -m model.bundle build --out model/assets/default",
                          "config": asdict(cfg),
                          "twin_subject_seeds": seeds,
                          "prior_steps": int(prior_state.get("step", -1)),
                          "prior_final_loss": (prior_state.get("history") or [[None, None]])[-1][1],
                          "reflectance_final_loss": float(np.mean(rhist[-20:])) if rhist else None,
                          "encoder_dtype": "float16" if cfg.encoder_half else "float32",
                          "torch": torch.__version__}}
        if tmp is None:
            (work / "build_timings.json").write_text(json.dumps(timings, indent=1) + "\n")
        if progress:
            progress("done", 1, 1, {"timings": timings})
        (out / "bundle.json").write_text(json.dumps(bdoc, indent=1) + "\n")
        return out
    finally:
        torch.use_deterministic_algorithms(det_before)
        torch.set_num_threads(threads_before)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ command line


def main(argv=None) -> int:
    """``python -m model.bundle build --out DIR [--quick] [--overwrite] [--work DIR]``."""
    import argparse

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    ap = argparse.ArgumentParser(prog="python -m model.bundle", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the default model on the twin")
    b.add_argument("--out", required=True)
    b.add_argument("--quick", action="store_true", help="minutes-scale settings (tests)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--work", default=None, help="keep intermediate files here")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--prior", default=None, help="reuse this ls-train prior folder (skip stage 1)")
    b.add_argument("--data", default=None, help="the twin dataset folder of --prior")
    a = ap.parse_args(argv)
    cfg = BundleConfig.quick(seed=a.seed) if a.quick else BundleConfig(seed=a.seed)
    console = Console(stderr=True)
    tasks: dict = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as pr:
        def prog(stage, done, total, info):
            if stage == "done":
                tasks["timings"] = info.get("timings", {})
                return
            if stage not in tasks:
                tasks[stage] = pr.add_task(stage, total=total, info="")
            loss = info.get("loss")
            pr.update(tasks[stage], completed=done, info=f"loss {loss:.4f}" if loss is not None else "")

        try:
            out = build_bundle(a.out, cfg, overwrite=a.overwrite, work=a.work, prior=a.prior, data=a.data,
                               progress=prog)
        except BundleError as e:
            console.print(f"[red]error:[/red] {e}")
            return 2
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    t = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in tasks.get("timings", {}).items())
    console.print(f"bundle written to {out} ({size / 1e6:.1f} MB; {t})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
