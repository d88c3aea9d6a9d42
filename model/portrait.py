"""Single-portrait relighting: photo -> aligned crop + pose -> prior latent -> reflectance basis
-> OLATs for the model's light set -> relit images (any environment, rotation or view).

Pipeline (one network pass per view; everything after it is a small weighted sum):

1. :func:`model.face.prepare_portrait` finds the face (MTCNN), crops it the EG3D/FFHQ way and
   estimates the camera (EG3D label). The crop is made once at ``crop_size`` for display and
   area-resampled to the prior's resolution for the encoder.
2. :func:`model.encoder.encode_portrait` inverts it into the prior (encoder, then optionally
   ``refine_steps`` of test-time latent optimisation).
3. For each requested view, the prior's density gives fixed samples along every pixel ray and the
   reflectance network's basis head renders K basis images ``B_k`` (:func:`render_basis`).
4. OLAT(l) = sum_k phi_k(l) B_k for the model's light directions (head frame = the
   environment's frame: y up, the face looks towards +z), and an environment relight with the
   per-light RGB weights ``E_i`` of ``lightstage.relight`` is
   ``sum_k (sum_i E_i phi_k(l_i)) B_k`` (:func:`combine_basis`): a K-term sum per frame, so a
   turntable of N frames costs N small sums, not N network passes.

:class:`PortraitSource` implements ``lightstage.relight.OlatSource`` so ``ls-relight PORTRAIT``
uses the same weights, tone mapping and writers as for a captured subject.

All radiance is linear; the model's OLATs are per unit irradiance of a distant light (as the
twin it was trained on), so relit values are absolute in the model's units and never
normalised per image.

References
----------
Rao, P. et al. (2025). 3DPR: Single Image 3D Portrait Relighting with Generative Priors.
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
"""

from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["PortraitSource", "render_basis", "combine_basis", "view_label", "prepare", "invert_portrait",
           "portrait_source", "contact_sheet", "write_portrait_report", "twin_evaluation"]


def view_label(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """EG3D label (25,) of a camera at ``yaw_deg``/``pitch_deg`` on the EG3D camera sphere
    (radius 2.7, aimed at (0, 0, 0.2); yaw > 0 moves the camera towards +x)."""
    from model.train_encoder import look_at_labels

    return look_at_labels(np.radians([yaw_deg]), np.radians([pitch_deg]))[0]


@torch.no_grad()
def render_basis(bundle, ws: torch.Tensor, label: np.ndarray, res: int, max_samples: int = 12,
                 chunk: int = 4096) -> tuple[torch.Tensor, np.ndarray]:
    """The K basis images of one view: one geometry + network pass.

    ws [1, num_ws, w_dim]; label (25,) EG3D camera; res output side.
    Returns (basis (K, res*res, 3) float32 linear, mask (res, res) bool: accumulated density > 0.5).
    """
    from model.bundle import label_rays
    from model.relight_model import PriorGeometry

    geo = PriorGeometry(bundle.G, [ws[0]], max_samples=max_samples)
    o, d = label_rays(label, res)
    planes = geo.planes(0)
    feat = bundle.net.feature_planes(planes)
    K = bundle.net.cfg.n_basis
    out, acc = [], []
    for j in range(0, o.shape[0], chunk):
        s = geo.samples(0, o[None, j:j + chunk], d[None, j:j + chunk])
        out.append(bundle.net.render_planes(feat, s)[0].reshape(-1, K, 3))
        acc.append(s.weights[0].sum(-1))
    basis = torch.cat(out, 0).permute(1, 0, 2).contiguous().float()
    mask = (torch.cat(acc) > 0.5).reshape(res, res).numpy()
    return basis, mask


def combine_basis(phi: torch.Tensor, basis: torch.Tensor, weights: np.ndarray, res: int) -> np.ndarray:
    """Relit frames from basis images.

    phi (L, K) light coefficients of the model's lights; basis (K, P, 3); weights (N, L, 3) or
    (L, 3) RGB light weights. Returns (N, 3, res, res) float32: frame n, channel c is
    ``sum_k (sum_l w[n, l, c] phi[l, k]) basis[k, :, c]``.
    """
    w = torch.as_tensor(np.asarray(weights, np.float32))
    if w.ndim == 2:
        w = w[None]
    if w.shape[1:] != (phi.shape[0], 3):
        raise ValueError(f"weights must be (N, {phi.shape[0]}, 3), got {tuple(w.shape)}")
    coef = torch.einsum("lk,nlc->nkc", phi.float(), w)  # (N, K, 3)
    out = torch.einsum("nkc,kpc->ncp", coef, basis.float())
    return out.reshape(w.shape[0], 3, res, res).numpy()


def prepare(image, bundle, crop_size: int = 256, landmarks=None, box=None, detector=None):
    """Detect, align and pose a portrait (path or linear (H, W, 3) array).

    Returns (prepared at ``crop_size`` for display, encoder input (R, R, 3) linear crop at the
    prior's resolution). Errors are ``model.face`` errors naming the file.
    """
    from model.face import prepare_portrait

    prep = prepare_portrait(image, size=crop_size, landmarks=landmarks, box=box, detector=detector)
    R = bundle.resolution
    small = torch.nn.functional.interpolate(torch.from_numpy(prep.image).permute(2, 0, 1)[None], size=(R, R),
                                            mode="area")[0].permute(1, 2, 0).numpy()
    return prep, np.ascontiguousarray(small, np.float32)


def invert_portrait(bundle, image_small: np.ndarray, label: np.ndarray, refine_steps: int = 0):
    """Encoder inversion (+ ``refine_steps`` of latent optimisation) of a linear crop at the
    prior's resolution; returns ``model.encoder.InversionResult``."""
    from model.encoder import encode_portrait
    from model.face import PreparedPortrait

    p = PreparedPortrait(image=image_small, cam2world=np.asarray(label[:16]).reshape(4, 4), label=label,
                         alignment=None, landmarks=None, source="crop")
    op = bundle.meta.get("display", {})
    return encode_portrait(p, bundle.G, bundle.encoder, refine_steps=refine_steps,
                           operator=op.get("operator", "aces"), exposure_ev=float(op.get("exposure_ev", 0.0)))


@dataclass
class PortraitSource:
    """``lightstage.relight.OlatSource`` of one portrait lifted into the model.

    Attributes
    ----------
    name : the input's name.
    bundle : the loaded model (``model.bundle.Bundle``).
    ws : [1, num_ws, w_dim] latent.
    res : output side in pixels.
    views : {name: (label (25,), basis (K, P, 3), mask (res, res))}; ``"input"`` is the photo's
        own camera, others are ``"yaw+25"`` style names of novel views.
    prepared, input_small : the aligned crop (display) and the encoder input (None for arrays).
    timings : seconds per stage.
    """

    name: str
    bundle: object
    ws: torch.Tensor
    res: int
    views: dict = field(default_factory=dict)
    camera: str = "input"
    prepared: object = None
    input_small: np.ndarray | None = None
    recon: np.ndarray | None = None
    recon_psnr: float = float("nan")
    timings: dict = field(default_factory=dict)
    _phi: torch.Tensor | None = None

    @property
    def light_directions(self) -> np.ndarray:
        """(L, 3) the model's light directions (head frame = environment frame)."""
        return self.bundle.light_dirs

    @property
    def phi(self) -> torch.Tensor:
        """(L, K) light coefficients of the model's lights (cached)."""
        if self._phi is None:
            with torch.no_grad():
                self._phi = self.bundle.net.light_coefficients(
                    torch.from_numpy(self.bundle.light_dirs.astype(np.float32))).float()
        return self._phi

    def add_view(self, name: str, label: np.ndarray) -> None:
        """Render the basis of another view (one network pass)."""
        t0 = time.perf_counter()
        basis, mask = render_basis(self.bundle, self.ws, label, self.res)
        self.views[name] = (np.asarray(label, np.float32), basis, mask)
        self.timings[f"basis_{name}_s"] = time.perf_counter() - t0

    def relight(self, weights, progress=None, view: str | None = None) -> np.ndarray:
        """(N, L, 3) or (L, 3) light weights -> (N, 3, H, W) linear radiance of ``view``."""
        v = self.views[view or self.camera]
        out = combine_basis(self.phi, v[1], weights, self.res)
        if progress:
            progress(1, 1)
        return out

    def olats(self, view: str | None = None) -> np.ndarray:
        """(L, 3, H, W) OLATs per unit irradiance for the model's lights."""
        L = len(self.bundle.light_dirs)
        w = np.zeros((L, L, 3), np.float32)
        w[np.arange(L), np.arange(L)] = 1.0
        return self.relight(w, view=view)

    def mask(self, view: str | None = None) -> np.ndarray:
        return self.views[view or self.camera][2]


def _parse_camera(camera) -> str:
    c = str(camera).strip().lower()
    if c in ("0", "input", ""):
        return "input"
    try:
        return f"yaw{float(c):+g}"
    except ValueError:
        from model.face import PortraitError

        raise PortraitError(f"camera {camera!r}: a portrait has camera 0 (the input view) or a yaw "
                            "in degrees") from None


def portrait_source(path, camera="0", model=None, refine: int = 0, views=(), size: int | None = None,
                    landmarks=None, box=None, bundle=None, progress=None) -> PortraitSource:
    """Lift a portrait photo into the model (the ``ls-relight PORTRAIT`` backend).

    Parameters
    ----------
    path : image file (or a linear (H, W, 3) array).
    camera : ``"0"`` (the photo's own view) or a yaw in degrees (a novel view relit instead).
    model : bundle folder (default: the shipped ``model/assets/default``); ``bundle`` a loaded one.
    refine : test-time latent optimisation steps after the encoder.
    views : extra yaws (degrees) to render, named ``"yaw+25"`` etc.
    size : output side (default: 2 x the prior's resolution).
    landmarks, box : bypass detection (see :func:`model.face.prepare_portrait`).

    Raises
    ------
    model.face.PortraitError / NoFaceFound / FaceDetectorUnavailable, model.bundle.BundleError:
    with the file name and the reason.
    """
    from model.bundle import load_bundle

    def step(msg):
        if progress:
            progress(msg)

    t0 = time.perf_counter()
    cam = _parse_camera(camera)
    b = bundle or load_bundle(model)
    t1 = time.perf_counter()
    step("face")
    prep, small = prepare(path, b, landmarks=landmarks, box=box)
    t2 = time.perf_counter()
    step("inversion")
    inv = invert_portrait(b, small, prep.label, refine)
    t3 = time.perf_counter()
    res = int(size or 2 * b.resolution)
    rec = ((inv.image[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)  # generator domain, display
    src = PortraitSource(name=str(path) if isinstance(path, (str, os.PathLike)) else "<array>", bundle=b,
                         ws=inv.ws, res=res, camera=cam, prepared=prep, input_small=small, recon=rec,
                         recon_psnr=float(inv.psnr[0]),
                         timings={"load_model_s": t1 - t0, "face_s": t2 - t1, "inversion_s": t3 - t2})
    step("basis")
    src.add_view("input", prep.label)
    yaws = [float(y) for y in views]
    if cam != "input":
        yaws.append(float(cam[3:]))
    for y in yaws:
        if f"yaw{y:+g}" not in src.views:
            src.add_view(f"yaw{y:+g}", view_label(y))
    return src


# ------------------------------------------------------------------ outputs


def contact_sheet(olats: np.ndarray, display, cols: int = 8) -> np.ndarray:
    """Grid of OLAT display images: olats (L, 3, H, W) linear -> (rows*H, cols*W, 3) uint8.

    ``display`` maps a linear (H, W, 3) image to uint8 (one exposure for all tiles: relative
    brightness between lights stays visible).
    """
    L, _, H, W = olats.shape
    rows = math.ceil(L / cols)
    sheet = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i in range(L):
        r, c = divmod(i, cols)
        sheet[r * H:(r + 1) * H, c * W:(c + 1) * W] = display(olats[i].transpose(1, 2, 0))
    return sheet


def write_portrait_report(src: PortraitSource, out: str | os.PathLike, first_weights: np.ndarray, tonemap: str,
                          exposure_ev: float, relit_files: list[str], env_name: str) -> list[str]:
    """Write the portrait extras into ``out`` and ``index.html`` that shows them side by side.

    Writes input.png (the photo, display), crop.png (aligned crop), reconstruction.png (the
    prior's rendering of the inverted latent), olat_contact.png, view_<name>.exr/.png (each view
    relit by ``first_weights`` (L, 3)). ``relit_files`` are ``ls-relight``'s own outputs to show
    (relative names). Returns the names written. Every image the page names exists.
    """
    from lightstage.imageio import write_exr, write_png
    from lightstage.tonemap import to_display
    from model.face import display_uint8

    out = Path(out)
    written = []

    def disp(x):
        return to_display(x, tonemap, exposure_ev)

    if src.prepared is not None:
        write_png(out / "crop.png", display_uint8(src.prepared.image))
        written.append("crop.png")
        if isinstance(src.name, str) and Path(src.name).is_file():
            from model.face import load_portrait

            img = load_portrait(src.name)
            scale = max(1, int(math.ceil(max(img.shape[:2]) / 512)))
            write_png(out / "input.png", display_uint8(img[::scale, ::scale]))
            written.append("input.png")
    if src.recon is not None:
        rec = (np.clip(src.recon, 0, 1) * 255 + 0.5).astype(np.uint8)
        write_png(out / "reconstruction.png", np.ascontiguousarray(rec))
        written.append("reconstruction.png")
    # OLATs are per unit irradiance, orders of magnitude below an environment relight: the sheet
    # gets its own exposure (one for all tiles, from the mean OLAT), so lights stay comparable
    from lightstage.tonemap import auto_exposure

    ol = src.olats("input")
    ev_sheet = auto_exposure(ol.mean(0).transpose(1, 2, 0), src.mask("input"))
    write_png(out / "olat_contact.png", contact_sheet(ol, lambda x: to_display(x, tonemap, ev_sheet)))
    written.append("olat_contact.png")
    view_names = []
    for name in src.views:
        frame = src.relight(first_weights, view=name)[0].transpose(1, 2, 0)
        write_exr(out / f"view_{name}.exr", np.ascontiguousarray(frame))
        write_png(out / f"view_{name}.png", disp(frame))
        written += [f"view_{name}.exr", f"view_{name}.png"]
        view_names.append(name)

    def img(name, caption):
        return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    tiles = []
    for n, cap in (("input.png", "input photo"), ("crop.png", "aligned crop"),
                   ("reconstruction.png", f"prior reconstruction ({src.recon_psnr:.1f} dB)")):
        if n in written:
            tiles.append(img(n, cap))
    relit = [f for f in relit_files if f.endswith((".png", ".gif")) and (out / f).is_file()]
    t = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in src.timings.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ls-relight: {html.escape(Path(str(src.name)).name)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;margin:4px;text-align:center}}
img{{height:192px;image-rendering:pixelated}} .sheet img{{height:auto;max-width:100%}}</style></head><body>
<h1>Portrait relight</h1><p>input: {html.escape(str(src.name))}; environment: {html.escape(env_name)};
display: {html.escape(tonemap)} at {exposure_ev:+.2f} EV (linear EXRs beside this page).</p>
<h2>Input</h2>{''.join(tiles)}
<h2>Relit</h2>{''.join(img(f, f) for f in relit)}
<h2>Views</h2>{''.join(img(f'view_{n}.png', n) for n in view_names)}
<h2>OLATs ({len(src.light_directions)} model lights, one exposure for the sheet: {ev_sheet:+.2f} EV)</h2><div class="sheet">{img('olat_contact.png', 'OLAT contact sheet')}</div>
<h2>Timings (s)</h2><table>{t}</table></body></html>
"""
    (out / "index.html").write_text(page)
    written.append("index.html")
    return written


# ------------------------------------------------------------------ twin evaluation


def twin_evaluation(bundle, seeds, envs: dict[str, np.ndarray], novel_yaw: float = 25.0, input_yaw: float = 0.0,
                    res: int | None = None, refine_steps: int = 0, n_truth_lights: int = 512,
                    keep_images: bool = False, progress=None) -> dict:
    """Relight held-out twin subjects from one rendered image and compare with the twin's truth.

    For each subject seed: the twin renders the input at ``input_yaw`` under a random smooth
    environment (``model.data.random_environment``, the prior's training distribution), the
    model inverts it and relights it under each environment in ``envs`` (equirect maps); the
    truth is the twin rendered under the same environment, sampled as ``n_truth_lights``
    distant lights with ``lightstage.relight`` weights (cast shadows on). Baseline: the unrelit
    input scaled per channel to the truth's mean (an oracle exposure); ``*_model_matched_psnr``
    gives the model's output the same oracle scaling, ``*_model_psnr`` is its absolute output. Also the novel view at ``novel_yaw`` and the
    encoder's reconstruction PSNR against the mean-latent baseline. PSNR: head mask of the
    twin, peak = truth max (``model.train_reflectance.psnr``'s definition).

    Returns {"per_subject": [...], "mean": {metric: value}}; with ``keep_images`` each row has
    ``"images"``: linear (H, W, 3) input, truth/relit/baseline per view and environment (the
    first environment only) and the head masks ``mask_input``/``mask_novel``.
    """
    from lightstage.relight import light_weights
    from lightstage.twin.subject import HeadScene, random_subject
    from model.bundle import fibonacci_lights, twin_camera
    from model.data import random_environment
    from model.encoder import invert, to_generator_domain

    res = int(res or bundle.resolution)
    dense = fibonacci_lights(n_truth_lights)
    lab_in, lab_nv = view_label(input_yaw), view_label(novel_yaw)
    rows = []

    def ps(pred, tgt, m):
        m3 = np.broadcast_to(m[..., None], tgt.shape)
        mse = float(np.mean((pred[m3] - tgt[m3]) ** 2))
        peak = float(tgt[m3].max())
        return 10 * math.log10(peak * peak / max(mse, 1e-20))

    for k, seed in enumerate(seeds):
        with np.errstate(invalid="ignore"):
            scene = HeadScene(random_subject(int(seed)), cube_n=96, vis_n=48)
        rng = np.random.default_rng([int(seed), 7])
        d_in, e_in = random_environment(rng)
        cam_in = twin_camera(lab_in, scene, res)
        cam_nv = twin_camera(lab_nv, scene, res)
        with np.errstate(invalid="ignore"):
            inp = np.nan_to_num(scene.radiance(cam_in, d_in, e_in, distant=True)).astype(np.float32)
        m_in = scene.truth(cam_in)["mask"].astype(bool)
        m_nv = scene.truth(cam_nv)["mask"].astype(bool)
        if m_in.mean() < 0.05:
            continue
        R = bundle.resolution
        small = torch.nn.functional.interpolate(torch.from_numpy(inp).permute(2, 0, 1)[None], size=(R, R),
                                                mode="area")[0].permute(1, 2, 0).numpy()
        inv = invert_portrait(bundle, small, lab_in, refine_steps)
        with torch.no_grad():
            gimg = to_generator_domain(torch.from_numpy(small).permute(2, 0, 1)[None])
            base = invert(None, bundle.G, gimg, torch.from_numpy(lab_in)[None])
        src = PortraitSource(name=f"twin:{seed}", bundle=bundle, ws=inv.ws, res=res)
        src.add_view("input", lab_in)
        src.add_view("novel", lab_nv)
        row = {"seed": int(seed), "encoder_psnr": float(inv.psnr[0]), "mean_latent_psnr": float(base.psnr[0])}
        ims = {"input": inp, "mask_input": m_in, "mask_novel": m_nv}
        for ei, (name, env) in enumerate(envs.items()):
            w_model = light_weights(env, src.light_directions)
            w_dense = light_weights(env, dense)
            for view, cam, m in (("input", cam_in, m_in), ("novel", cam_nv, m_nv)):
                with np.errstate(invalid="ignore"):
                    truth = np.nan_to_num(scene.radiance(cam, dense, w_dense, distant=True)).astype(np.float32)
                pred = src.relight(w_model, view=view)[0].transpose(1, 2, 0)
                scale = truth.reshape(-1, 3).mean(0) / np.maximum(inp.reshape(-1, 3).mean(0), 1e-12)
                row[f"{name}_{view}_model_psnr"] = ps(pred, truth, m)
                row[f"{name}_{view}_baseline_psnr"] = ps(inp * scale, truth, m)
                # the baseline gets the truth's mean (an oracle exposure); the same oracle for the model
                ms = truth.reshape(-1, 3).mean(0) / np.maximum(pred.reshape(-1, 3).mean(0), 1e-12)
                row[f"{name}_{view}_model_matched_psnr"] = ps(pred * ms, truth, m)
                if ei == 0:
                    ims.update({f"truth_{view}": truth, f"relit_{view}": pred, f"baseline_{view}": inp * scale})
        if keep_images:
            row["images"] = ims
        rows.append(row)
        if progress:
            progress(k + 1, len(seeds))
    keys = [k for k in (rows[0] if rows else {}) if k not in ("seed", "images")]
    return {"per_subject": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys}}
