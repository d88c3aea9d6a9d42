"""The digital twin's scene protocol: anything the simulated light stage can photograph.

A *scene* returns linear Rec.709 radiance seen by a rig camera under a set of lights, plus the
ground-truth geometry behind every pixel. Subjects (:class:`lightstage.twin.subject.HeadScene`)
and calibration targets (``lightstage.twin.targets``) implement the same protocol, so the capture
simulator does not care what is in front of the cameras.

Conventions
-----------
World frame: metres, y up, rig centre at the origin, the subject looks towards +z. Cameras are
:class:`lightstage.rig.Camera` (OpenCV, lens distortion included: a scene renders through
:func:`lightstage.camera.pixel_rays`, so its image *is* the distorted image). The background is
black (a dark stage).

Lights are either point lights (``distant=False``): ``light_positions`` (N, 3) in metres and
``light_rgb`` (N, 3) the linear RGB radiant intensity (a rig light's ``colour * intensity``), so
the irradiance at a surface point x with normal n is ``rgb * max(0, n.l) / |p - x|^2``; or
distant lights (``distant=True``): ``light_positions`` are unit directions *towards* the lights
and ``light_rgb`` is the irradiance each delivers at normal incidence.

Radiance is exactly linear in the lights: ``radiance(all) == sum_i radiance(light i)`` to float
precision, which makes OLAT superposition (and relighting by weighted sums) exact.

A rigid ``pose`` (4, 4) maps the subject from its rest placement to where it is in this frame
(subject -> world); ``None`` is the rest pose.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from lightstage.rig import Camera

__all__ = ["Scene", "render_environment", "check_pose", "check_lights"]


@runtime_checkable
class Scene(Protocol):
    """What the capture simulator photographs (see the module docstring for the conventions)."""

    def radiance(
        self,
        camera: Camera,
        light_positions: np.ndarray,
        light_rgb: np.ndarray,
        pose: np.ndarray | None = None,
        distant: bool = False,
    ) -> np.ndarray:
        """Linear Rec.709 radiance (H, W, 3) float32 seen by ``camera``, summed over N lights.

        Parameters
        ----------
        camera : lightstage.rig.Camera
        light_positions : (N, 3) metres, world (or unit directions towards the lights when
            ``distant``).
        light_rgb : (N, 3) linear RGB radiant intensity (or irradiance when ``distant``).
        pose : (4, 4) rigid subject -> world motion, ``None`` = rest.
        distant : lights at infinity.
        """
        ...

    def truth(self, camera: Camera, pose: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Ground truth behind every pixel of ``camera``.

        Returns
        -------
        dict with ``mask`` (H, W) bool, ``depth`` (H, W) float32 camera z in metres (``inf`` off
        the subject), ``normal`` (H, W, 3) float32 unit world normals, ``albedo`` (H, W, 3)
        float32 linear diffuse albedo, ``position`` (H, W, 3) float32 world points (0 off the
        subject; use ``mask``).
        """
        ...


def check_pose(pose: np.ndarray | None) -> np.ndarray | None:
    """Validate a rigid (4, 4) pose; returns it as float64 (or ``None``)."""
    if pose is None:
        return None
    p = np.asarray(pose, dtype=np.float64)
    if p.shape != (4, 4):
        raise ValueError(f"pose must be a 4x4 matrix, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("pose contains non-finite values")
    R = p[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-6 or np.linalg.det(R) < 0:
        raise ValueError("pose rotation block is not a proper rotation (R^T R != I or det < 0)")
    if np.abs(p[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > 1e-12:
        raise ValueError("pose last row must be [0, 0, 0, 1]")
    return p


def check_lights(
    light_positions: np.ndarray, light_rgb: np.ndarray, distant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and broadcast lights to (N, 3) float64 arrays (a single (3,) light is allowed)."""
    pos = np.atleast_2d(np.asarray(light_positions, dtype=np.float64))
    rgb = np.atleast_2d(np.asarray(light_rgb, dtype=np.float64))
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"light_positions must be (N, 3), got {np.shape(light_positions)}")
    if rgb.shape[1:] != (3,) or rgb.shape[0] not in (1, pos.shape[0]):
        raise ValueError(
            f"light_rgb must be (N, 3) matching light_positions {pos.shape}, got {rgb.shape}"
        )
    rgb = np.broadcast_to(rgb, pos.shape).copy()
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(rgb))):
        raise ValueError("lights contain non-finite values")
    if distant:
        n = np.linalg.norm(pos, axis=1)
        if np.any(n < 1e-12):
            raise ValueError("distant light directions must be non-zero")
        pos = pos / n[:, None]
    return pos, rgb


def render_environment(
    scene: Scene,
    camera: Camera,
    directions: np.ndarray,
    irradiance: np.ndarray,
    pose: np.ndarray | None = None,
) -> np.ndarray:
    """The scene under a continuous environment given as many distant lights.

    Parameters
    ----------
    scene : Scene
    camera : lightstage.rig.Camera
    directions : (N, 3) unit directions towards the environment samples (world frame).
    irradiance : (N, 3) linear RGB irradiance each sample delivers at normal incidence, i.e.
        the environment radiance integrated over the sample's solid angle (the caller owns
        the quadrature; see ``lightstage.envmap``).
    pose : (4, 4) rigid subject -> world motion or ``None``.

    Returns
    -------
    (H, W, 3) float32 linear radiance; by linearity it equals the sum of the N distant-light
    renders.
    """
    return scene.radiance(camera, directions, irradiance, pose=pose, distant=True)
