"""Training of the reflectance network: learning, checkpoints, resume, CLI refusals.

Uses the analytic sphere store of ``test_reflectance`` (closed-form OLATs) with its exact
geometry (``DensityGeometry``) and fixed Fourier-feature triplanes, so learning is checked
against independent truth and without depending on how well a prior is trained.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.olat_data import DataConfig, OlatDataset, make_splits
from model.reflectance import ReflectanceConfig
from model.relight_model import DensityGeometry
from model.train_reflectance import (ReflectanceTrainer, TrainConfig, load_reflectance, radiance_scale_of,
                                     reflectance_loss)
from test_reflectance import head_density, write_sphere_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread, restored after


def fourier_planes(C=16, res=64, seed=0) -> torch.Tensor:
    """(1, 3, C, res, res) smooth positional features (a stand-in for a prior's triplane)."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(res) + 0.5) / res * 2 - 1
    V, U = torch.meshgrid(u, u, indexing="ij")
    ch = []
    for _ in range(C // 2):
        f = torch.randn(2, generator=g) * 10.0
        ph = torch.rand(1, generator=g) * 2 * math.pi
        ch += [torch.sin(f[0] * U + f[1] * V + ph), torch.cos(f[0] * U + f[1] * V + ph)]
    p = torch.stack(ch)
    return torch.stack([p, p.roll(1, 0), p.roll(2, 0)])[None]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_sphere_store(tmp_path_factory.mktemp("rt") / "s.zarr", n_subjects=2, n_cams=3,
                              n_lights=40, size=32)


def make_trainer(store, out, head="basis", steps=10, val_every=0, lr=5e-3, seed=0):
    sp = make_splits(store, 0.2, 1, seed=0)
    dcfg = DataConfig(rays_per_item=256, lights_per_item=4)
    train = OlatDataset(store, sp.train_takes, sp.train_lights, config=dcfg)
    geo = DensityGeometry([fourier_planes(16, 64, i) for i in range(len(train.takes))], head_density,
                          1.6, 2.4, 96, 8)
    val_ds = OlatDataset(store, sp.train_takes, sp.val_lights, config=dcfg)
    tcfg = TrainConfig(steps=steps, batch=2, rays=256, lr=lr, val_every=val_every, ckpt_every=0,
                       val_cameras=1, val_lights=4, seed=seed)
    ncfg = ReflectanceConfig.tiny(head=head, plane_channels=16, radiance_scale=radiance_scale_of(train))
    return ReflectanceTrainer(tcfg, ncfg, train, geo, out, val={"heldout_lights": (val_ds, geo)})


def test_loss_is_zero_at_truth_and_masks_background():
    t = torch.rand(2, 3, 10, 3)
    w = torch.ones(2, 3, 10)
    assert float(reflectance_loss(t, t, w, 0.5)) == 0
    p = t.clone()
    p[..., 5:, :] += 1.0  # wrong only where the weight is zero
    w[..., 5:] = 0
    assert float(reflectance_loss(p, t, w, 0.5)) == 0
    assert float(reflectance_loss(p, t, torch.ones_like(w), 0.5)) > 0


@pytest.mark.parametrize("head", ["basis", "concat"])
def test_checkpoint_round_trip(store, tmp_path, head):
    tr = make_trainer(store, tmp_path / head, head=head, steps=2)
    tr.fit()
    net, doc, opt = load_reflectance(tmp_path / head, tr._make_opt)
    assert doc["step"] == 2 and doc["config"]["head"] == head and doc["format"] == "lightstage-reflectance"
    for (k, a), (k2, b) in zip(tr.net.state_dict().items(), net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    s1, s2 = tr.opt.state_dict()["state"], opt.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    it = tr.train.sample(np.random.default_rng(5))
    from model.train_reflectance import ReflectanceTrainer as _T  # noqa: F401  (same forward path)
    from model.olat_data import collate

    b = collate([it])
    with torch.no_grad():
        torch.testing.assert_close(tr._forward(b, tr.geometry, tr.net), tr._forward(b, tr.geometry, net))


def test_interrupted_and_resumed_run_matches_uninterrupted(store, tmp_path):
    full = make_trainer(store, tmp_path / "full", steps=6)
    full.fit()
    part = make_trainer(store, tmp_path / "part", steps=6)
    part.fit(stop_after=3)
    part.save()  # what the CLI does on Ctrl-C
    again = make_trainer(store, tmp_path / "part", steps=6)
    assert again.resume() and again.step == 3
    again.fit()
    assert again.step == 6 and all(math.isfinite(h["loss"]) for h in again.history)
    assert [h["step"] for h in again.history] == list(range(1, 7))
    for a, b in zip(full.net.parameters(), again.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="config differs"):
        make_trainer(store, tmp_path / "part", head="concat", steps=6).resume()


def test_short_training_lowers_validation_loss(store, tmp_path):
    tr = make_trainer(store, tmp_path / "smoke", steps=40, val_every=40)
    before = tr.validate(write_images=False)["heldout_lights/loss"]
    tr.fit()
    after = tr.history[-1]["heldout_lights/loss"]
    assert after < 0.9 * before, (before, after)  # a smoke check; the slow test asks for more
    assert (tmp_path / "smoke" / "val").is_dir() and any((tmp_path / "smoke" / "val").glob("*.png"))
    assert (tmp_path / "smoke" / "reflectance.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("head", ["basis", "concat"])
def test_trained_model_beats_mean_olat_on_heldout_lights(store, tmp_path, head):
    tr = make_trainer(store, tmp_path / head, head=head, steps=400, val_every=400)
    before = tr.validate(write_images=False)
    tr.fit()
    res = tr.history[-1]
    assert res["heldout_lights/loss"] < 0.5 * before["heldout_lights/loss"]
    assert res["heldout_lights/psnr"] > res["heldout_lights/psnr_mean_olat"] + 2.0, res


# ---- CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    from model.checkpoint import save_checkpoint
    from model.prior import build_generator

    d = tmp_path_factory.mktemp("prior")
    G = build_generator("tiny", seed=0)
    save_checkpoint(d / "prior", G, G.cfg)
    return d


def _cli(args):
    from cli.train import main

    return CliRunner().invoke(main, ["reflectance", *map(str, args)], catch_exceptions=False)


def test_cli_refuses_bad_store_before_training(tmp_path, tiny_prior):
    import zarr

    p = write_sphere_store(tmp_path / "bad.zarr", n_subjects=2, n_cams=1, n_lights=4, size=8)
    zarr.open_group(str(p), mode="a")["s1/t0"].attrs["light_directions"] = np.ones((5, 3)).tolist()
    r = _cli(["--store", p, "--prior", tiny_prior, "--out", tmp_path / "run"])
    text = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "s1/t0: light_directions has shape (5, 3)" in text
    assert not (tmp_path / "run").exists()


def test_cli_trains_resumes_and_refuses_to_clobber(store, tmp_path, tiny_prior):
    out = tmp_path / "run"
    base = ["--store", store, "--prior", tiny_prior, "--out", out, "--fit-steps", 1, "--rays", 32,
            "--lights", 2, "--batch", 1, "--val-every", 0, "--max-samples", 4, "--threads", 1]
    r = _cli([*base, "--steps", 2])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "reflectance.json").read_text())
    assert doc["step"] == 2 and set(doc["latents"]) == {"s0/t0", "s1/t0"}
    assert (out / "latents.safetensors").exists()
    r = _cli([*base, "--steps", 3])
    assert r.exit_code == 2 and "--resume" in " ".join(r.output.split())
    r = _cli([*base, "--steps", 3, "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "reflectance.json").read_text())["step"] == 3
