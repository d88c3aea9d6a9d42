"""Head-prior benchmarks: training speed of ``tiny`` on CPU, EG3D-FFHQ512 generator forward time,
and data-loader throughput against the trainer's demand.

Times are process CPU seconds with torch on one thread (robust on a shared machine).

Rows
----
prior_train_tiny_it_s      auto-decoder steps/s (batch 4, one thread); ratio = it/s / 0.5 (the
                           floor for "300 steps in 10 CPU minutes").
prior_forward_eg3d512      one G_ema-sized forward (mapping, 256² planes, render, SR) on CPU;
                           quick mode renders 32² rays (full: 128²). ratio = budget / time.
prior_loader_vs_demand     ImageFolderDataset + DataLoader images/s over the trainer's images/s
                           (batch x it/s); goal >= 3.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightstage.camera import EG3D_FRONT_CAM2WORLD, eg3d_label


def _clock() -> float:
    # CPU time of this process: the dev machine is shared, and wall time there measures the
    # neighbours; with torch using one thread this is the compute time of the step.
    return time.process_time()


def _train_speed(steps: int, batch: int = 4) -> float:
    from model.prior import build_generator
    from model.train_prior import AutoDecoder, reconstruction_loss

    G = build_generator("tiny", seed=0)
    m = AutoDecoder(G, 8).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.99))
    c = torch.from_numpy(eg3d_label(EG3D_FRONT_CAM2WORLD))[None].repeat(batch, 1)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    s = torch.arange(batch) % 8
    times = []
    for i in range(steps + 1):
        t = _clock()
        loss, _ = reconstruction_loss(m(s, c), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # first step warms up allocators
            times.append(_clock() - t)
    return 1.0 / float(np.median(times))


def _make_folder(root: Path, n: int, res: int) -> None:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    lab = [float(v) for v in eg3d_label(EG3D_FRONT_CAM2WORLD)]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(root / "img" / f"{i:05d}.png")
        labels.append([f"img/{i:05d}.png", lab])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))


def main(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # process CPU time == compute time only with one thread
    threads = 1
    rows = []
    ours = _train_speed(3 if quick else 10)
    floor = 0.5  # 300 steps in 10 CPU minutes: "a prior in a few CPU minutes"
    rows.append({"name": "prior_train_tiny_it_s", "ratio": ours / floor, "it_s": ours, "floor_it_s": floor,
                 "batch": 4, "threads": threads,
                 "goal": "tiny auto-decoder steps/s (batch 4, one thread) >= 0.5"})

    from model.prior import TriPlaneGenerator

    G = TriPlaneGenerator("eg3d-ffhq512").eval()
    c = torch.from_numpy(eg3d_label(EG3D_FRONT_CAM2WORLD))[None]
    z = torch.randn(1, 512)
    nr = 32 if quick else 128
    with torch.no_grad():
        G(z, c, neural_rendering_resolution=nr)  # warm-up
        t = _clock()
        out = G(z, c, neural_rendering_resolution=nr)
        dt = _clock() - t
    budget = 10.0 if quick else 60.0
    rows.append({"name": "prior_forward_eg3d512", "ratio": budget / dt, "seconds": dt,
                 "neural_rendering_resolution": nr, "output": list(out["image"].shape), "budget_s": budget,
                 "threads": threads, "goal": f"one FFHQ-512 forward on CPU under {budget:.0f} s (>1)"})

    from model.data import ImageFolderDataset

    with tempfile.TemporaryDirectory() as d:
        n = 64 if quick else 256
        _make_folder(Path(d), n, 64)
        t = _clock()
        ds = ImageFolderDataset(d, resolution=64)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=0)
        seen = 0
        for b in loader:  # first epoch decodes the PNGs (the cold cost)
            seen += b["image"].shape[0]
        cold = seen / (_clock() - t)
    demand = 4 * ours
    rows.append({"name": "prior_loader_vs_demand", "ratio": cold / demand, "loader_img_s": cold,
                 "trainer_img_s": demand, "goal": "loader images/s >= 3x what training consumes"})
    torch.set_num_threads(threads_before)
    return rows


if __name__ == "__main__":
    for r in main(quick=True):
        print(r)
