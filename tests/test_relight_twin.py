"""Relighting against the digital twin's renderer (independent of our relighting code).

* Superposition: the twin's radiance is linear in its distant lights, so relighting its OLATs
  with weights E must equal its direct render under those same lights with irradiance E, to
  float precision.
* Convergence: rendering every pixel of a 64 x 32 environment as a distant light (irradiance =
  radiance x exact solid angle) is the continuous-environment truth; relighting the OLATs of
  the tiny / demo / lsx-331 light sets (32 / 150 / 331 lights) approaches it as lights are added.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lightstage import envmap as E
from lightstage import relight as R
from lightstage.rig import builtin_rig

subject = pytest.importorskip("lightstage.twin.subject")

SIZE = 48  # pixels: small camera, the same head


@pytest.fixture(scope="module")
def twin():
    scene = subject.HeadScene(subject.random_subject(0), cube_n=96, vis_n=48)
    cam = builtin_rig("tiny").cameras[0]
    s = SIZE / cam.resolution[1]
    K = np.array(cam.K, dtype=float)
    K[:2] *= s
    small = dataclasses.replace(cam, K=K.tolist(),
                                sensor=dataclasses.replace(cam.sensor, width=SIZE, height=SIZE))
    return scene, small


def olats(scene, cam, dirs) -> np.ndarray:
    """(L, 3, H, W) twin OLATs: one distant light of unit irradiance each."""
    return np.stack([scene.radiance(cam, d[None], np.ones((1, 3)), distant=True).transpose(2, 0, 1)
                     for d in dirs])


def psnr(img, ref, mask) -> float:
    mse = float(np.mean((img[:, mask] - ref[:, mask]) ** 2))
    return 10 * math.log10(float(ref[:, mask].max()) ** 2 / max(mse, 1e-30))


def test_relit_twin_olats_equal_direct_render(twin):
    scene, cam = twin
    dirs = builtin_rig("tiny").light_directions()
    stack = olats(scene, cam, dirs)
    env = E.builtin_environment("studio", height=32)
    w = R.light_weights(env, dirs)
    relit = R.relight(stack, w)
    direct = scene.radiance(cam, dirs, w, distant=True).transpose(2, 0, 1)
    assert direct.max() > 0
    np.testing.assert_allclose(relit, direct, rtol=1e-5, atol=1e-6 * direct.max())
    # float16 OLATs (what a store holds) relight to the same image within float16 precision
    np.testing.assert_allclose(R.relight(stack.astype(np.float16), w), direct, rtol=2e-3,
                               atol=1e-3 * direct.max())


def test_relit_twin_converges_to_continuous_environment(twin):
    scene, cam = twin
    env = E.resize(E.builtin_environment("studio", height=128), 32)  # 64 x 32, power kept
    dense = E.equirect_directions(32).reshape(-1, 3)
    irr = (env * E.solid_angles(32)[..., None]).reshape(-1, 3)
    lit = irr.sum(1) > 0
    truth = scene.radiance(cam, dense[lit], irr[lit], distant=True).transpose(2, 0, 1)
    mask = scene.truth(cam)["mask"]
    scores = {}
    for name in ("tiny", "demo", "lsx-331"):
        dirs = builtin_rig(name).light_directions()
        scores[name] = psnr(R.relight(olats(scene, cam, dirs), R.light_weights(env, dirs)), truth, mask)
    print("twin PSNR vs continuous studio environment:", {k: round(v, 2) for k, v in scores.items()})
    assert scores["tiny"] < scores["demo"] < scores["lsx-331"]
    assert scores["lsx-331"] > 30
