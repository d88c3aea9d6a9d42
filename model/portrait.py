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
5. Exposure convention (:meth:`PortraitSource.calibrate`). One photo of unknown exposure under
   unknown light cannot separate albedo scale from light intensity. We fix it like this:

   * input lighting **known** (``ls-relight --input-env ENV``, the twin evaluation): the
     network's OLATs are scaled per channel so that relighting them under the input lighting
     reproduces the photo over the head (least squares). Outputs are then radiance in the
     photo's own units, as if the subject had been photographed with the same camera and
     exposure under the new environment (this also sets the white balance). Environments in
     the same units as the input environment give physically consistent results.
   * input lighting **unknown** (default): it is estimated from the photo -- non-negative,
     smooth weights on the model's lights (:func:`estimate_input_lighting`) -- with the albedo
     held at the model's level (the twin's skin); the photo's exposure and light level go into
     the estimated lighting. Outputs are the radiance of a face of the model's albedo level
     under the new environment: an environment of radiance 1 gives the same brightness for a
     dark and a bright photo of the same person.

   In both cases the per-pixel ratio of the photo to the calibrated model (the *detail gain*,
   softened and clipped) multiplies every relit frame of the input view, so relighting by the
   input lighting gives the photo back (up to the softening in dark pixels) and its fine detail survives relighting; other views get it
   through the prior's geometry at reduced strength. Relit = gain x scale x sum_i E_i OLAT_i is
   still linear in the environment, so rotations stay K-term sums.

:class:`PortraitSource` implements ``lightstage.relight.OlatSource`` so ``ls-relight PORTRAIT``
uses the same weights, tone mapping and writers as for a captured subject.

All radiance is linear; the network's OLATs are per unit irradiance of a distant light (as the
twin it was trained on); outputs follow the exposure convention above and are never normalised
per frame.

References
----------
Rao, P. et al. (2025). 3DPR: Single Image 3D Portrait Relighting with Generative Priors.
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
Shashua, A. & Riklin-Raviv, T. (2001). The quotient image. IEEE TPAMI (ratio-image relighting).
Ramamoorthi, R. & Hanrahan, P. (2001). A signal-processing framework for inverse rendering.
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
           "lights_to_equirect", "estimate_input_lighting", "portrait_source", "contact_sheet", "write_portrait_report", "twin_evaluation"]


def view_label(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """EG3D label (25,) of a camera at ``yaw_deg``/``pitch_deg`` on the EG3D camera sphere
    (radius 2.7, aimed at (0, 0, 0.2); yaw > 0 moves the camera towards +x)."""
    from model.train_encoder import look_at_labels

    return look_at_labels(np.radians([yaw_deg]), np.radians([pitch_deg]))[0]


@torch.no_grad()
def render_basis(bundle, ws: torch.Tensor, label: np.ndarray, res: int, max_samples: int = 12,
                 chunk: int = 4096, return_points: bool = False):
    """The K basis images of one view: one geometry + network pass.

    ws [1, num_ws, w_dim]; label (25,) EG3D camera; res output side.
    Returns (basis (K, res*res, 3) float32 linear, mask (res, res) bool: accumulated density > 0.5)
    and, with ``return_points``, the expected surface point of every pixel (res*res, 3) head frame
    (density-weighted mean of the samples; used to carry the photo's detail to novel views).
    """
    from model.bundle import label_rays
    from model.relight_model import PriorGeometry

    dev = next(bundle.G.parameters()).device
    geo = PriorGeometry(bundle.G, [ws[0].to(dev)], max_samples=max_samples)
    o, d = (t.to(dev) for t in label_rays(label, res))
    planes = geo.planes(0)
    feat = bundle.net.feature_planes(planes)
    K = bundle.net.cfg.n_basis
    out, acc, pts = [], [], []
    for j in range(0, o.shape[0], chunk):
        s = geo.samples(0, o[None, j:j + chunk], d[None, j:j + chunk])
        out.append(bundle.net.render_planes(feat, s)[0].reshape(-1, K, 3))
        w = s.weights[0]
        acc.append(w.sum(-1))
        if return_points:
            pts.append((w[..., None] * s.points[0]).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1e-6))
    basis = torch.cat(out, 0).permute(1, 0, 2).contiguous().float()  # on the model's device
    mask = (torch.cat(acc) > 0.5).reshape(res, res).cpu().numpy()
    if return_points:
        return basis, mask, torch.cat(pts, 0).float().cpu()
    return basis, mask


def combine_basis(phi: torch.Tensor, basis: torch.Tensor, weights: np.ndarray, res: int) -> np.ndarray:
    """Relit frames from basis images.

    phi (L, K) light coefficients of the model's lights; basis (K, P, 3); weights (N, L, 3) or
    (L, 3) RGB light weights. Returns (N, 3, res, res) float32: frame n, channel c is
    ``sum_k (sum_l w[n, l, c] phi[l, k]) basis[k, :, c]``.
    """
    w = torch.as_tensor(np.asarray(weights, np.float32), device=basis.device)
    if w.ndim == 2:
        w = w[None]
    if w.shape[1:] != (phi.shape[0], 3):
        raise ValueError(f"weights must be (N, {phi.shape[0]}, 3), got {tuple(w.shape)}")
    coef = torch.einsum("lk,nlc->nkc", phi.to(basis.device).float(), w)  # (N, K, 3)
    out = torch.einsum("nkc,kpc->ncp", coef, basis.float())
    return out.reshape(w.shape[0], 3, res, res).cpu().numpy()


def prepare(image, bundle, crop_size: int = 256, landmarks=None, box=None, detector=None):
    """Detect, align and pose a portrait (path or linear (H, W, 3) array).

    Returns (prepared at ``crop_size`` for display, encoder input (R, R, 3) linear crop at the
    prior's resolution). Errors are ``model.face`` errors naming the file.
    """
    from model.face import prepare_portrait

    # the pose follows the model's own head frame: a bundle trained on twin heads carries their
    # landmark template (model.bundle.fit_twin_landmark_template), else the FFHQ/BFM one
    prep = prepare_portrait(image, size=crop_size, landmarks=landmarks, box=box, detector=detector,
                            template=getattr(bundle, "landmark_template", None))
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


def lights_to_equirect(dirs: np.ndarray, irradiance: np.ndarray, height: int = 32) -> np.ndarray:
    """Equirect radiance map (H, 2H, 3) float32 of distant lights.

    Every pixel takes the radiance of its nearest light: that light's irradiance divided by the
    solid angle of its cell, so the map integrates to ``sum(irradiance)`` exactly and
    ``lightstage.relight.light_weights`` of it gives any light set the same power. The height is
    doubled (up to 1024) until every light owns at least one pixel.
    """
    from lightstage.envmap import equirect_directions, solid_angles

    d = np.asarray(dirs, np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    irr = np.asarray(irradiance, np.float64).reshape(len(d), -1)
    irr = np.broadcast_to(irr, (len(d), 3))
    h = int(height)
    while True:
        px = equirect_directions(h).reshape(-1, 3)
        idx = np.argmax(px @ d.T, axis=1)
        cell = np.bincount(idx, solid_angles(h).reshape(-1), minlength=len(d))
        if (cell > 0).all() or h >= 1024:
            break
        h *= 2
    rad = irr / np.maximum(cell, 1e-12)[:, None]
    return rad[idx].reshape(h, 2 * h, 3).astype(np.float32)


def _light_laplacian(dirs: np.ndarray, k: int = 6) -> np.ndarray:
    """(L, L) graph Laplacian rows ``w_i - mean(w_j, j in the k nearest lights of i)``."""
    d = np.asarray(dirs, np.float64)
    nn = np.argsort(-(d @ d.T), axis=1)[:, 1:k + 1]
    D = np.eye(len(d))
    for i, row in enumerate(nn):
        D[i, row] -= 1.0 / len(row)
    return D


def estimate_input_lighting(olats: np.ndarray, image: np.ndarray, mask: np.ndarray, light_dirs: np.ndarray,
                            smooth: float = 0.3) -> np.ndarray:
    """Lighting of a photo: non-negative, smooth weights ``E`` (L, 3) with ``sum_l E_l OLAT_l ~ image``.

    olats (L, 3, P) the model's OLATs of the photo's view; image (P, 3) linear; mask (P,) pixels
    to fit. Per channel, non-negative least squares (``scipy.optimize.nnls``) of the image
    against the OLATs, with a graph-Laplacian penalty over neighbouring lights weighted by
    ``smooth`` (relative to the OLATs' energy): a photo constrains smooth, low-order lighting
    well and sharp detail badly (Ramamoorthi & Hanrahan 2001), so the penalty keeps the estimate
    a broad environment instead of a few spiky lights fitting noise.
    """
    from scipy.optimize import nnls

    L = olats.shape[0]
    D = _light_laplacian(light_dirs)
    W = np.zeros((L, 3))
    m = np.asarray(mask, bool).reshape(-1)
    for c in range(3):
        A = olats[:, c, m].T.astype(np.float64)  # (P', L)
        b = image[m, c].astype(np.float64)
        lam2 = smooth * float((A * A).sum()) / L
        # ||A w - b||^2 + lam2 ||D w||^2 = ||R w - y||^2 + const with R^T R = A^T A + lam2 D^T D and
        # R^T y = A^T b: the same NNLS on an (L, L) system instead of (P' + L, L) -- 10-100x faster
        H = A.T @ A + lam2 * (D.T @ D)
        H += 1e-12 * np.trace(H) / L * np.eye(L)
        R = np.linalg.cholesky(H).T
        y = np.linalg.solve(R.T, A.T @ b)
        W[:, c] = nnls(R, y, maxiter=50 * L)[0]
    return W


def _project(points: torch.Tensor, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-frame points (P, 3) -> grid_sample coordinates (P, 2) in [-1, 1] and camera depth
    (P,) of the EG3D camera ``label`` (OpenCV axes, normalised intrinsics; the inverse of
    ``model.rendering.ray_sampler``)."""
    lab = torch.as_tensor(np.asarray(label, np.float32))
    c2w, K = lab[:16].reshape(4, 4), lab[16:].reshape(3, 3)
    pc = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = pc[:, 2].clamp_min(1e-6)
    x, y = pc[:, 0] / z, pc[:, 1] / z
    u = K[0, 0] * x + K[0, 1] * y + K[0, 2]
    v = K[1, 1] * y + K[1, 2]
    return torch.stack([2 * u - 1, 2 * v - 1], -1), pc[:, 2]


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
    scale : (3,) exposure / white-balance scale of every output (None: the model's own units);
        set by :meth:`calibrate`.
    input_weights : (L, 3) the photo's lighting on the model's lights (given or estimated).
    input_lighting : ``"known"``, ``"estimated"`` or None (not calibrated).
    detail : (3, res, res) per-pixel gain of the input view (the photo's detail the model lacks)
        or None; carried to other views through the prior's geometry (:meth:`view_gain`).
    detail_transfer : exponent of the gain carried to other views (0: none, 1: full). 0.5: the
        reprojection rests on the prior's approximate geometry, and on held-out twin subjects
        half strength measured 0.2-0.3 dB better than none or full in 2 of 3 environments.
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
    scale: np.ndarray | None = None
    input_weights: np.ndarray | None = None
    input_lighting: str | None = None
    detail: np.ndarray | None = None
    detail_transfer: float = 0.5
    calibration: dict = field(default_factory=dict)
    _phi: torch.Tensor | None = None
    _points: dict = field(default_factory=dict)
    _gains: dict = field(default_factory=dict)

    @property
    def light_directions(self) -> np.ndarray:
        """(L, 3) the model's light directions (head frame = environment frame)."""
        return self.bundle.light_dirs

    @property
    def phi(self) -> torch.Tensor:
        """(L, K) light coefficients of the model's lights (cached)."""
        if self._phi is None:
            with torch.no_grad():
                dev = next(self.bundle.net.parameters()).device
                self._phi = self.bundle.net.light_coefficients(
                    torch.from_numpy(self.bundle.light_dirs.astype(np.float32)).to(dev)).float()
        return self._phi

    def add_view(self, name: str, label: np.ndarray) -> None:
        """Render the basis of another view (one network pass)."""
        t0 = time.perf_counter()
        basis, mask, pts = render_basis(self.bundle, self.ws, label, self.res, return_points=True)
        self.views[name] = (np.asarray(label, np.float32), basis, mask)
        self._points[name] = pts
        self._gains.pop(name, None)
        self.timings[f"basis_{name}_s"] = time.perf_counter() - t0

    def raw_relight(self, weights, view: str | None = None) -> np.ndarray:
        """Relit frames in the model's own units (no exposure scale, no photo detail)."""
        return combine_basis(self.phi, self.views[view or self.camera][1], weights, self.res)

    def view_gain(self, view: str) -> np.ndarray | None:
        """(3, res, res) per-pixel gain of ``view``: the input view's :attr:`detail`, and for
        another view the same gain looked up where its surface points project into the input
        view and are visible there (depth test against the input view's surface), raised to
        :attr:`detail_transfer`; 1 elsewhere."""
        if self.detail is None:
            return None
        if view == "input" or view not in self.views:
            return self.detail if view == "input" else None
        if view not in self._gains:
            R = self.res
            lab_in = self.views["input"][0]
            grid, z = _project(self._points[view], lab_in)
            _, z_in = _project(self._points["input"], lab_in)
            src = torch.from_numpy(self.detail)[None]
            zmap = torch.where(torch.from_numpy(self.views["input"][2].reshape(-1)), z_in,
                               torch.full_like(z_in, float("inf"))).reshape(1, 1, R, R)
            g = torch.nn.functional.grid_sample(src, grid[None, None], mode="bilinear", align_corners=False,
                                                padding_mode="border")[0, :, 0]
            zs = torch.nn.functional.grid_sample(zmap.nan_to_num(posinf=1e6), grid[None, None], mode="nearest",
                                                 align_corners=False, padding_mode="border")[0, 0, 0]
            inside = (grid.abs() <= 1).all(-1)
            # visible from the input camera: not behind the input view's surface (2 % of the
            # camera distance: the surfaces are the same head, sampled at different pixels)
            vis = inside & (z <= zs + 0.02 * z.abs().clamp_min(1.0)) & torch.from_numpy(self.views[view][2].reshape(-1))
            out = torch.where(vis[None], g.clamp_min(1e-6) ** float(self.detail_transfer), torch.ones_like(g))
            self._gains[view] = out.reshape(3, R, R).numpy()
        return self._gains[view]

    def relight(self, weights, progress=None, view: str | None = None) -> np.ndarray:
        """(N, L, 3) or (L, 3) light weights -> (N, 3, H, W) linear radiance of ``view``
        (calibrated: :attr:`scale` and the photo's detail applied when :meth:`calibrate` ran)."""
        view = view or self.camera
        out = self.raw_relight(weights, view)
        if self.scale is not None:
            out *= np.asarray(self.scale, np.float32)[None, :, None, None]
        g = self.view_gain(view)
        if g is not None:
            out *= g[None]
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

    def calibrate(self, image: np.ndarray, input_weights: np.ndarray | None = None, detail: bool = True,
                  smooth: float = 0.3, max_gain: float = 8.0, soft: float = 0.1) -> dict:
        """Give the outputs a defined exposure from the photo itself (see "Exposure convention"
        in the module docstring).

        image (res, res, 3) linear: the photo aligned with the input view (the crop resampled to
        ``res``). ``input_weights`` (L, 3): the photo's lighting on the model's lights (from a
        known environment: ``lightstage.relight.light_weights(env, light_directions)``); None
        estimates it (:func:`estimate_input_lighting`). Sets :attr:`scale`, the per-channel least
        squares factor over the head with which the model relit by the input lighting reproduces
        the photo (this also sets the white balance), and with ``detail`` the per-pixel gain
        ``(photo + soft m) / (scaled model + soft m)`` (m the photo's mean over the head; clipped
        to [1/max_gain, max_gain]; 1 off the head): relit = gain x model relit, so the input view
        relit by the input lighting gives the photo back (exactly where the model is well above
        the soft floor; the floor keeps dark, badly modelled pixels from exploding) and the
        photo's fine detail (which the tiny prior cannot represent) is kept under every
        lighting. Returns a summary dict.
        """
        if "input" not in self.views:
            raise ValueError("calibrate needs the input view (add_view('input', label) first)")
        R = self.res
        img = np.asarray(image, np.float32)
        if img.shape != (R, R, 3):
            raise ValueError(f"image must be ({R}, {R}, 3) linear, got {img.shape}")
        I = np.nan_to_num(img).reshape(-1, 3).clip(0, None)
        m = self.views["input"][2].reshape(-1) & (I.sum(1) > 0)
        if m.sum() < 16:
            from model.face import PortraitError

            raise PortraitError(f"{self.name}: the model's head covers {int(m.sum())} pixels of the input view; "
                                "cannot calibrate its exposure")
        t0 = time.perf_counter()
        if input_weights is None:
            L = len(self.light_directions)
            eye = np.zeros((L, L, 3), np.float32)
            eye[np.arange(L), np.arange(L)] = 1.0
            ol = self.raw_relight(eye, "input").reshape(L, 3, -1)
            input_weights = estimate_input_lighting(ol, I, m, self.light_directions, smooth=smooth)
            self.input_lighting = "estimated"
        else:
            self.input_lighting = "known"
        self.input_weights = np.asarray(input_weights, np.float64)
        M = self.raw_relight(self.input_weights, "input")[0].reshape(3, -1).T  # (P, 3)
        num = (M[m] * I[m]).sum(0)
        den = (M[m] ** 2).sum(0)
        self.scale = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).astype(np.float32)
        self._gains.clear()
        self.detail = None
        if detail:
            Ms = M * self.scale
            mean = I[m].mean(0)
            g = (I + soft * mean) / (Ms + soft * mean)
            g = np.clip(g, 1.0 / max_gain, max_gain)
            g[~m] = 1.0
            self.detail = np.ascontiguousarray(g.T.reshape(3, R, R), np.float32)
        fit = M[m] * self.scale
        self.calibration = {"input_lighting": self.input_lighting, "scale_rgb": self.scale.tolist(),
                            "detail": bool(detail),
                            "fit_psnr_db": float(10 * math.log10(float(I[m].max()) ** 2 /
                                                                 max(float(((fit - I[m]) ** 2).mean()), 1e-20))),
                            "input_irradiance_rgb": self.input_weights.sum(0).tolist(),
                            "seconds": time.perf_counter() - t0}
        return self.calibration


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


def _resize(img: np.ndarray, res: int) -> np.ndarray:
    """(H, W, 3) -> (res, res, 3): area average when shrinking, bilinear when enlarging."""
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32)).permute(2, 0, 1)[None]
    if t.shape[-1] == res and t.shape[-2] == res:
        return np.ascontiguousarray(img, np.float32)
    mode = "area" if t.shape[-1] >= res else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(t, size=(res, res), mode=mode, **kw)[0].permute(1, 2, 0).numpy()


def portrait_source(path, camera="0", model=None, refine: int = 0, views=(), size: int | None = None,
                    landmarks=None, box=None, bundle=None, progress=None, input_env=None,
                    detail: bool = True, calibrate: bool = True) -> PortraitSource:
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
    input_env : the photo's lighting when known, an equirect radiance map (H, 2H, 3) in the
        same units as the relighting environments; None estimates it from the photo.
    detail : keep the photo's per-pixel detail (:meth:`PortraitSource.calibrate`).
    calibrate : False leaves the outputs in the network's own units (no exposure convention).

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
    if calibrate:
        step("exposure")
        from lightstage.relight import light_weights

        w_in = None if input_env is None else light_weights(np.asarray(input_env, np.float32), src.light_directions)
        src.calibrate(_resize(prep.image, res), w_in, detail=detail)
        src.timings["calibrate_s"] = src.calibration["seconds"]
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
    input scaled per channel to the truth's mean (an oracle exposure). The model's output is
    calibrated with the input's known lighting (:meth:`PortraitSource.calibrate`: exposure,
    white balance and the photo's per-pixel detail), as ``ls-relight --input-env`` does.
    Metrics per ``{env}_{view}``: ``model_psnr`` (absolute: no oracle), ``model_matched_psnr``
    (the baseline's oracle exposure given to the model's output too), ``exposure_only_psnr``
    (calibrated scale, no detail gain; absolute), ``uncalibrated_psnr`` /
    ``uncalibrated_matched_psnr`` (the network's raw output), ``estimated_matched_psnr``
    (calibrated with an estimated input lighting: the default when the lighting is unknown,
    whose absolute level is the model's albedo level, hence matched). Also the novel view at
    ``novel_yaw``, ``input_fit_psnr`` (the model relit by the input lighting vs the input,
    exposure only) and the encoder's reconstruction PSNR against the mean-latent baseline.
    PSNR: head mask of the twin, peak = truth max (``model.train_reflectance.psnr``'s definition).

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
        # the photo's lighting is known here: calibrate with it (the pipeline's --input-env);
        # a twin of the same source calibrated with an estimated lighting (the default path)
        w_in = light_weights(lights_to_equirect(d_in, e_in), src.light_directions)
        src.calibrate(inp, w_in)
        est = PortraitSource(name=src.name, bundle=bundle, ws=inv.ws, res=res, views=src.views,
                             _points=src._points)
        est.calibrate(inp)
        row["input_fit_psnr"] = src.calibration["fit_psnr_db"]
        for ei, (name, env) in enumerate(envs.items()):
            w_model = light_weights(env, src.light_directions)
            w_dense = light_weights(env, dense)
            for view, cam, m in (("input", cam_in, m_in), ("novel", cam_nv, m_nv)):
                with np.errstate(invalid="ignore"):
                    truth = np.nan_to_num(scene.radiance(cam, dense, w_dense, distant=True)).astype(np.float32)
                pred = src.relight(w_model, view=view)[0].transpose(1, 2, 0)
                raw = src.raw_relight(w_model, view=view)[0].transpose(1, 2, 0)
                expo = raw * src.scale
                pest = est.relight(w_model, view=view)[0].transpose(1, 2, 0)
                tmean = truth.reshape(-1, 3).mean(0)
                scale = tmean / np.maximum(inp.reshape(-1, 3).mean(0), 1e-12)
                base_img = inp * scale

                def matched(x):  # the baseline's oracle exposure, given to a model output too
                    return x * (tmean / np.maximum(x.reshape(-1, 3).mean(0), 1e-12))

                key = f"{name}_{view}"
                row[f"{key}_baseline_psnr"] = ps(base_img, truth, m)
                row[f"{key}_model_psnr"] = ps(pred, truth, m)
                row[f"{key}_model_matched_psnr"] = ps(matched(pred), truth, m)
                row[f"{key}_exposure_only_psnr"] = ps(expo, truth, m)
                row[f"{key}_uncalibrated_psnr"] = ps(raw, truth, m)
                row[f"{key}_uncalibrated_matched_psnr"] = ps(matched(raw), truth, m)
                row[f"{key}_estimated_matched_psnr"] = ps(matched(pest), truth, m)
                if ei == 0:
                    ims.update({f"truth_{view}": truth, f"relit_{view}": pred, f"baseline_{view}": base_img})
        if keep_images:
            row["images"] = ims
        rows.append(row)
        if progress:
            progress(k + 1, len(seeds))
    keys = [k for k in (rows[0] if rows else {}) if k not in ("seed", "images")]
    return {"per_subject": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys}}
