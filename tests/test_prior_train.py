"""Twin portrait dataset, auto-decoder training (CLI, resume), and latent fitting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lightstage.camera import EG3D_FOCAL, eg3d_label
from model.checkpoint import load_checkpoint, load_generator
from model.configs import get_config
from model.data import (DatasetError, EG3D_PIVOT, ImageFolderDataset, TwinDatasetConfig,
                        render_twin_dataset, sample_eg3d_camera)
from model.fitting import FitConfig, fit_latent, mean_face_ws, psnr
from model.prior import build_generator
from model.rendering import RenderOptions
from model.train_prior import TrainConfig, train_prior

# A very small generator for fast tests: tiny's architecture at 32² planes, 16² rays (8+8
# samples), 32² output.
SMALL = dict(plane_resolution=32, neural_rendering_resolution=16, img_resolution=32, sr_input_resolution=16,
             render=RenderOptions(depth_resolution=8, depth_resolution_importance=8, mode="clean"))


@pytest.fixture(scope="module")
def twin_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("twin") / "data"
    cfg = TwinDatasetConfig(n_subjects=2, views=2, resolution=32, seed=5, cube_n=64)
    render_twin_dataset(out, cfg)
    return out, cfg


def test_twin_dataset_layout_labels_and_display(twin_set):
    out, cfg = twin_set
    doc = json.loads((out / "dataset.json").read_text())
    assert len(doc["labels"]) == 4 and [s for _, s in doc["subjects"]] == [0, 0, 1, 1]
    for rel, lab in doc["labels"]:
        lab = np.asarray(lab)
        c2w = lab[:16].reshape(4, 4)
        K = lab[16:].reshape(3, 3)
        np.testing.assert_allclose(K, [[EG3D_FOCAL, 0, 0.5], [0, EG3D_FOCAL, 0.5], [0, 0, 1]], atol=1e-6)
        eye = c2w[:3, 3]
        assert np.linalg.norm(eye) == pytest.approx(2.7, abs=1e-4)  # on EG3D's camera sphere
        fwd = c2w[:3, 2]
        to_pivot = (EG3D_PIVOT - eye) / np.linalg.norm(EG3D_PIVOT - eye)
        np.testing.assert_allclose(fwd, to_pivot, atol=1e-5)  # aimed at the pivot
        np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-5)
        # the display PNG is the fixed tone map of the stored linear radiance (no normalisation)
        from lightstage.tonemap import to_display

        lin = np.load(out / "linear" / (Path(rel).stem + ".npy"))
        png = np.asarray(Image.open(out / rel))
        assert lin.shape == (32, 32, 3) and lin.dtype == np.float32
        np.testing.assert_array_equal(png, to_display(lin, cfg.operator, cfg.exposure_ev))
        assert lin[12:20, 12:20].mean() > 0.01  # the face is in the middle of the frame
    with pytest.raises(DatasetError, match="exists"):
        render_twin_dataset(out, cfg)


def test_frontal_camera_matches_eg3d_front():
    np.testing.assert_allclose(sample_eg3d_camera(0.0, 0.0)[:3, :3], np.diag([1.0, -1.0, -1.0]), atol=1e-12)
    # yaw +30°: camera moves towards +x
    assert sample_eg3d_camera(30.0, 0.0)[0, 3] > 1.0


def test_image_folder_dataset_and_errors(twin_set, tmp_path):
    out, _ = twin_set
    ds = ImageFolderDataset(out, resolution=16)
    assert len(ds) == 4 and ds.n_subjects == 2
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (25,)
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert ds.subject_items(1) == [2, 3]
    # a folder with an unlabelled image is refused, naming the image
    bad = tmp_path / "bad"
    (bad / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "img" / "a.png")
    Image.new("RGB", (8, 8)).save(bad / "img" / "b.png")
    (bad / "dataset.json").write_text(json.dumps({"labels": [["img/a.png", [0.0] * 25]]}))
    with pytest.raises(DatasetError, match="img/b.png"):
        ImageFolderDataset(bad)
    (bad / "dataset.json").write_text(json.dumps({"labels": [["img/a.png", [0.0] * 24]]}))
    with pytest.raises(DatasetError, match=r"labels\[0\]"):
        ImageFolderDataset(bad)


def test_train_resume_is_exact_and_refuses_existing(twin_set, tmp_path):
    out, _ = twin_set
    cfg = get_config("tiny", **SMALL)
    tc3 = TrainConfig(steps=3, batch=2, ckpt_every=2)
    straight = train_prior(out, tmp_path / "a", cfg, tc3)
    assert straight.step == 3
    train_prior(out, tmp_path / "b", cfg, TrainConfig(steps=2, batch=2, ckpt_every=2))
    resumed = train_prior(out, tmp_path / "b", cfg, tc3, resume=True)
    assert resumed.step == 3 and len(resumed.history) == 3
    a = load_checkpoint(tmp_path / "a" / "prior").state_dict
    b = load_checkpoint(tmp_path / "b" / "prior").state_dict
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(Exception, match="resume"):
        train_prior(out, tmp_path / "a", cfg, tc3)
    G = load_generator(tmp_path / "a" / "prior")
    assert G.cfg.img_resolution == 32


def test_cli_train_prior(twin_set, tmp_path, monkeypatch):
    from cli.train import main

    out, _ = twin_set
    monkeypatch.setattr("model.configs.PRESETS", {**__import__("model.configs").configs.PRESETS,
                                                  "test16": get_config("tiny", **SMALL)})
    r = CliRunner().invoke(main, ["prior", "--data", str(out), "--config", "test16", "--out",
                                  str(tmp_path / "p"), "--steps", "2", "--batch", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "prior.safetensors").exists() and (tmp_path / "p" / "train_state.json").exists()
    r = CliRunner().invoke(main, ["prior", "--data", str(out), "--config", "test16", "--out",
                                  str(tmp_path / "p"), "--steps", "3"])
    assert r.exit_code == 2 and "resume" in r.output
    r = CliRunner().invoke(main, ["prior", "--data", str(out), "--config", "test16", "--out",
                                  str(tmp_path / "p"), "--steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "train_state.json").read_text())["step"] == 3
    r = CliRunner().invoke(main, ["prior", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "q")])
    assert r.exit_code == 2


def test_fitting_recovers_a_known_latent_better_than_mean_face():
    # Independent truth: images rendered by the generator itself from a known code w*.
    torch.manual_seed(0)
    G = build_generator(get_config("tiny", **SMALL), seed=2).eval()
    with torch.no_grad():
        G.backbone.mapping.w_avg.zero_()
        w_true = torch.randn(1, 1, G.cfg.w_dim).repeat(1, G.num_ws, 1)
    yaws = [-30, -10, 10, 30, 0]
    labels = torch.stack([torch.from_numpy(eg3d_label(sample_eg3d_camera(y, 5.0 * (i % 2))))
                          for i, y in enumerate(yaws)])
    with torch.no_grad():
        target = G.synthesis(w_true.repeat(5, 1, 1), labels, noise_mode="const", deterministic=True)["image"]
    before = [p.detach().clone() for p in G.parameters()]
    fit = fit_latent(G, target[:4], labels[:4], FitConfig(steps=20, lr=0.05, w_plus=False))
    assert fit.losses[-1] < fit.losses[0]
    for p, q in zip(before, G.parameters()):
        assert torch.equal(p, q) and q.requires_grad  # generator untouched, flags restored
    held = fit.render(G, labels[4:])["image"]
    with torch.no_grad():
        mean = G.synthesis(mean_face_ws(G), labels[4:], noise_mode="const", deterministic=True)["image"]
    p_fit, p_mean = psnr(held, target[4:]), psnr(mean, target[4:])
    assert p_fit > p_mean + 3, (p_fit, p_mean)
    # W+ with a triplane refinement runs and returns the refinement
    fit2 = fit_latent(G, target[:2], labels[:2], FitConfig(steps=2, plane_refine=True, plane_res=8))
    assert fit2.plane_delta.shape == (1, 3, G.cfg.plane_channels, 8, 8)
    assert fit2.planes(G).shape == (1, 3, G.cfg.plane_channels, 32, 32)


def test_psnr_known_values():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.2)  # 0.1 in [0, 1] units -> MSE 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_trained_prior_fits_heldout_twin_subject(tmp_path):
    """Full pipeline: twin renders -> auto-decoder prior (a few CPU minutes) -> fit a held-out
    subject from 4 views -> the 5th, unseen view beats the mean-face baseline.

    ``LIGHTSTAGE_PRIOR_DIR`` may point at an already trained prior (``ls-train prior --out``)
    to skip training; ``LIGHTSTAGE_PRIOR_STEPS`` sets the training length (default 300).
    """
    prior_dir = os.environ.get("LIGHTSTAGE_PRIOR_DIR")
    if prior_dir is None:
        data = tmp_path / "train"
        render_twin_dataset(data, TwinDatasetConfig(n_subjects=32, views=5, seed=0))
        steps = int(os.environ.get("LIGHTSTAGE_PRIOR_STEPS", "300"))
        train_prior(data, tmp_path / "prior", "tiny", TrainConfig(steps=steps, batch=4, ckpt_every=steps))
        prior_dir = tmp_path / "prior"
    G = load_generator(Path(prior_dir) / "prior")
    test = tmp_path / "test"
    render_twin_dataset(test, TwinDatasetConfig(n_subjects=2, views=5, seed=12345))
    ds = ImageFolderDataset(test, resolution=G.cfg.img_resolution)
    gains = []
    for s in range(ds.n_subjects):
        items = ds.subject_items(s)
        x = torch.stack([ds[i]["image"] for i in items])
        c = torch.stack([ds[i]["label"] for i in items])
        fit = fit_latent(G, x[:4], c[:4], FitConfig(steps=150, lr=0.03, w_plus=True))
        p_fit = psnr(fit.render(G, c[4:])["image"], x[4:])
        with torch.no_grad():
            p_mean = psnr(G.synthesis(mean_face_ws(G), c[4:], noise_mode="const", deterministic=True)["image"], x[4:])
        print(f"held-out subject {s}: fitted {p_fit:.2f} dB vs mean face {p_mean:.2f} dB")
        gains.append(p_fit - p_mean)
    assert min(gains) > 1.0, gains
