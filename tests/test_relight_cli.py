"""``ls-relight`` end to end on a store of analytic OLATs (a Lambertian sphere seen head-on).

Truth: a Lambertian surface of albedo rho under uniform radiance 1 has radiance rho; under an
environment turned by 90 deg the frame equals a separate run with ``--rotate 90``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from cli.relight import main
from lightstage.imageio import read_exr
from lightstage.rig import builtin_rig

RHO = np.array([0.6, 0.45, 0.3])
N = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lightstage.store import create_take

    path = tmp_path_factory.mktemp("st") / "s.zarr"
    dirs = builtin_rig("lsx-331").light_directions()
    L = len(dirs)
    c = (np.arange(N) + 0.5) / N * 2 - 1
    x, y = np.meshgrid(c, -c)
    inside = x * x + y * y < 0.95 ** 2
    n = np.stack([x, y, np.sqrt(np.clip(1 - x * x - y * y, 0, None))], -1)  # sphere facing +z
    cosines = np.clip(np.einsum("hwk,lk->lhw", n, dirs), 0, None) * inside
    olat = RHO[None, :, None, None] / math.pi * cosines[:, None]
    g = create_take(path, "ball", "t0", cameras=["front"], n_lights=L, n_tracking=1, height=N,
                    width=N, dtype="float32", scale=0.5,
                    attrs={"light_directions": dirs, "light_rgb": np.ones((L, 3)),
                           "K": np.eye(3)[None], "cam2world": np.eye(4)[None]})
    g["olat"][0] = (olat / 0.5).astype(np.float32)
    g["mask"][0] = inside * 255
    g["done"][...] = 1
    return path, inside, n


def run(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def test_uniform_environment_gives_albedo(store, tmp_path):
    path, inside, n = store
    out = tmp_path / "o"
    r = run(["--store", path, "--subject", "ball", "--env", "uniform", "--env-height", 64, "--out", out])
    assert r.exit_code == 0, r.output
    img = read_exr(out / "relit.exr")
    well_lit = inside & (n[..., 1] > -0.3)  # normals whose hemisphere the stage covers
    err = img[well_lit] / RHO - 1
    assert np.sqrt(np.mean(err ** 2)) < 0.05
    rep = json.loads((out / "relight.json").read_text())
    assert rep["exposure_ev"] == 0 and rep["exposure_mode"] == "manual" and rep["tonemap"] == "aces"
    np.testing.assert_allclose(rep["weights_sum_rgb"], 4 * math.pi, rtol=1e-4)
    from PIL import Image

    png = np.asarray(Image.open(out / "relit.png"))
    assert png.shape == (N, N, 3) and png.dtype == np.uint8 and png[inside].mean() > 50


def test_refuses_to_overwrite(store, tmp_path):
    path = store[0]
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--store", path, "--env", "studio", "--env-height", 32, "--out", out]
    assert run(args).exit_code == 0
    before = (out / "relit.exr").read_bytes()
    r = run(args[:-2] + ["--env", "uniform", "--out", out])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "relit.exr").read_bytes() == before
    r = run(args[:-2] + ["--env", "uniform", "--out", out, "--overwrite"])
    assert r.exit_code == 0 and (out / "relit.exr").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"


def test_turntable_frames_gif_mp4_strip(store, tmp_path):
    from PIL import Image

    path = store[0]
    out = tmp_path / "spin"
    r = run(["--store", path, "--env", "studio", "--env-height", 32, "--turntable", 4,
             "--exposure", "auto", "--tonemap", "filmic", "--out", out])
    assert r.exit_code == 0, r.output
    assert "exposure auto" in r.output
    frames = [read_exr(out / f"frame_{k:03d}.exr") for k in range(4)]
    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == 4
    assert (out / "strip.png").is_file()
    rep = json.loads((out / "relight.json").read_text())
    assert rep["exposure_mode"] == "auto" and math.isfinite(rep["exposure_ev"])
    assert rep["angles_deg"] == [0.0, 90.0, 180.0, 270.0]
    if "turntable.mp4" in rep["files"]:
        assert (out / "turntable.mp4").stat().st_size > 0
    # frame 1 equals a separate run turned by 90 deg
    one = tmp_path / "one"
    assert run(["--store", path, "--env", "studio", "--env-height", 32, "--rotate", 90,
                "--out", one]).exit_code == 0
    np.testing.assert_allclose(frames[1], read_exr(one / "relit.exr"), rtol=1e-5, atol=1e-7)
    assert not np.allclose(frames[0], frames[2])  # the light really moves


def test_missing_portrait_is_named_without_traceback(tmp_path):
    r = run([str(tmp_path / "face.png"), "--env", "studio", "--out", tmp_path / "o"])
    assert r.exit_code != 0
    assert "face.png" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_inputs_are_named(store, tmp_path):
    path = store[0]
    r = run(["--store", path, "--env", tmp_path / "missing.hdr", "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "missing.hdr" in r.output
    r = run(["--store", tmp_path / "nostore.zarr", "--env", "studio", "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "nostore.zarr" in r.output
    r = run(["--store", path, "--camera", "side", "--env", "studio", "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "side" in r.output
    r = run(["--store", path, "--env", "studio", "--exposure", "bright", "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "--exposure" in r.output
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_list_envs():
    r = run(["--list-envs"])
    assert r.exit_code == 0
    for name in ("uniform", "studio", "sun-sky"):
        assert name in r.output
