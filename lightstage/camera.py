"""Pinhole + OpenCV-distortion camera maths shared by the twin, calibration and the model.

Conventions: OpenCV camera frame (x right, y down, z forward), ``cam2world`` 4x4, pixel
intrinsics ``K``; pixel centres sit at integer coordinates (OpenCV), so pixel (0, 0) covers
[-0.5, 0.5]^2.

References
----------
Bradski, G. (2000). The OpenCV Library. Camera calibration and 3D reconstruction module.
Chan, E. R. et al. (2022). Efficient Geometry-aware 3D GANs (EG3D): camera label convention.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EG3D_FOCAL",
    "EG3D_FRONT_CAM2WORLD",
    "project",
    "distort_normalised",
    "undistort_normalised",
    "pixel_rays",
    "eg3d_label",
    "world2cam",
]

EG3D_FOCAL = 4.2647  # FFHQ normalised focal length (2985.29 px / 700 px crop)
EG3D_FRONT_CAM2WORLD = np.array(
    [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1]], dtype=np.float64
)


def world2cam(cam2world: np.ndarray) -> np.ndarray:
    R = cam2world[:3, :3]
    t = cam2world[:3, 3]
    m = np.eye(4)
    m[:3, :3] = R.T
    m[:3, 3] = -R.T @ t
    return m


def distort_normalised(xy: np.ndarray, dist) -> np.ndarray:
    """Apply OpenCV (k1, k2, p1, p2[, k3]) distortion to normalised coordinates (..., 2)."""
    d = np.zeros(5)
    d[: min(5, len(dist))] = np.asarray(dist, dtype=np.float64)[:5]
    k1, k2, p1, p2, k3 = d
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def undistort_normalised(xy_d: np.ndarray, dist, iterations: int = 20) -> np.ndarray:
    """Invert :func:`distort_normalised` by fixed-point iteration (exact to ~1e-12 for lenses
    of the strength a light stage uses)."""
    xy = xy_d.copy()
    for _ in range(iterations):
        err = distort_normalised(xy, dist) - xy_d
        xy = xy - err
    return xy


def project(points_world: np.ndarray, K, dist, cam2world) -> tuple[np.ndarray, np.ndarray]:
    """Project world points (N, 3) to pixels (N, 2); also returns camera-frame depth z (N,)."""
    w2c = world2cam(np.asarray(cam2world, dtype=np.float64))
    p = points_world @ w2c[:3, :3].T + w2c[:3, 3]
    z = p[:, 2]
    xy = p[:, :2] / z[:, None]
    xy = distort_normalised(xy, dist)
    K = np.asarray(K, dtype=np.float64)
    u = K[0, 0] * xy[:, 0] + K[0, 1] * xy[:, 1] + K[0, 2]
    v = K[1, 1] * xy[:, 1] + K[1, 2]
    return np.stack([u, v], axis=1), z


def pixel_rays(K, dist, cam2world, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space ray origin (3,) and unit directions (H, W, 3) through every pixel centre,
    with the lens distortion undone (so a render through these rays *is* the distorted image)."""
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(cam2world, dtype=np.float64)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    y = (v - K[1, 2]) / K[1, 1]
    x = (u - K[0, 2] - K[0, 1] * y) / K[0, 0]
    xy = undistort_normalised(np.stack([x, y], axis=-1), dist)
    d = np.concatenate([xy, np.ones_like(xy[..., :1])], axis=-1)
    d = d @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return c2w[:3, 3].copy(), d


def eg3d_label(cam2world: np.ndarray, K_normalised: np.ndarray | None = None) -> np.ndarray:
    """EG3D's 25-float camera label: 16 cam2world (row-major) + 9 normalised intrinsics."""
    if K_normalised is None:
        K_normalised = np.array([[EG3D_FOCAL, 0, 0.5], [0, EG3D_FOCAL, 0.5], [0, 0, 1]])
    return np.concatenate(
        [np.asarray(cam2world, np.float64).reshape(16), np.asarray(K_normalised).reshape(9)]
    ).astype(np.float32)
