"""Procedural subjects for the digital twin (PROVISIONAL: ellipsoid head, Lambertian).

This first version only fixes the interface; the full procedural head (nose, eyes, lips, ears,
hair, GGX specular, cast shadows) replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightstage.camera import pixel_rays
from lightstage.rig import Camera
from lightstage.twin.scene import check_lights, check_pose

__all__ = ["SubjectParams", "random_subject", "HeadScene", "HEAD_UNITS_PER_METRE"]

HEAD_UNITS_PER_METRE = 1.0 / 0.35


@dataclass
class SubjectParams:
    seed: int = 0
    semi_axes: tuple[float, float, float] = (0.075, 0.115, 0.095)
    skin_albedo: tuple[float, float, float] = (0.45, 0.30, 0.22)
    centre: tuple[float, float, float] = (0.0, 0.03, 0.0)


def random_subject(seed: int) -> SubjectParams:
    rng = np.random.default_rng(seed)
    ax = (0.075 * rng.uniform(0.93, 1.07), 0.115 * rng.uniform(0.93, 1.07),
          0.095 * rng.uniform(0.93, 1.07))
    t = rng.uniform(0, 1)
    light = np.array([0.55, 0.38, 0.30])
    dark = np.array([0.10, 0.05, 0.03])
    alb = tuple(float(v) for v in (1 - t) * light + t * dark)
    return SubjectParams(seed=seed, semi_axes=ax, skin_albedo=alb)


class HeadScene:
    def __init__(self, params: SubjectParams):
        self.params = params

    @property
    def world2head(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] *= HEAD_UNITS_PER_METRE
        return m

    def _hit(self, camera: Camera, pose):
        pose = check_pose(pose)
        H, W = camera.resolution
        o, d = pixel_rays(camera.K_array, camera.distortion, camera.cam2world_array, H, W)
        T = np.eye(4) if pose is None else pose
        Ti = np.linalg.inv(T)
        o_s = Ti[:3, :3] @ o + Ti[:3, 3]
        d_s = d @ Ti[:3, :3].T
        a = np.asarray(self.params.semi_axes)
        c = np.asarray(self.params.centre)
        oo = (o_s - c) / a
        dd = d_s / a
        A = (dd * dd).sum(-1)
        B = 2 * (dd * oo).sum(-1)
        C = (oo * oo).sum() - 1
        disc = B * B - 4 * A * C
        mask = disc > 0
        t = np.where(mask, (-B - np.sqrt(np.maximum(disc, 0))) / (2 * A), np.inf)
        mask &= t > 0
        x_s = o_s + np.where(mask[..., None], t[..., None], 0) * d_s
        n_s = (x_s - c) / a**2
        n_s /= np.linalg.norm(n_s, axis=-1, keepdims=True)
        x_w = x_s @ T[:3, :3].T + T[:3, 3]
        n_w = n_s @ T[:3, :3].T
        return mask, t, x_w, n_w, d

    def radiance(self, camera, light_positions, light_rgb, pose=None, distant=False):
        pos, rgb = check_lights(light_positions, light_rgb, distant)
        mask, t, x, n, d = self._hit(camera, pose)
        out = np.zeros(mask.shape + (3,), np.float64)
        alb = np.asarray(self.params.skin_albedo)
        for p, c in zip(pos, rgb):
            if distant:
                l, e = p, 1.0
            else:
                v = p - x
                r2 = (v * v).sum(-1)
                l = v / np.sqrt(r2)[..., None]
                e = 1.0 / r2
            ndl = np.maximum((n * l).sum(-1), 0) * e
            out += (ndl * mask)[..., None] * c * alb / np.pi
        return out.astype(np.float32)

    def truth(self, camera, pose=None):
        mask, t, x, n, d = self._hit(camera, pose)
        fwd = camera.cam2world_array[:3, 2]
        depth = np.where(mask, t * (d @ fwd), np.inf).astype(np.float32)
        alb = np.where(mask[..., None], np.asarray(self.params.skin_albedo), 0).astype(np.float32)
        return {
            "mask": mask,
            "depth": depth,
            "normal": np.where(mask[..., None], n, 0).astype(np.float32),
            "albedo": alb,
            "position": np.where(mask[..., None], x, 0).astype(np.float32),
        }
