"""Single-portrait preprocessing + inversion speed on CPU (tiny prior).

Measures seconds per portrait for: face detection + FFHQ/EG3D crop + pose (``model.face``),
then inversion into the tiny prior by the feed-forward encoder (ours), by the encoder plus a
short test-time refinement, and -- the baseline, run alongside -- optimisation-only inversion
from the mean latent (the classic approach before encoders). ``ratio`` = ours / baseline
seconds (lower is better). The portrait is the public-domain NASA photo from
``shared/data/real`` when available, else a twin render cropped by a box. The timing does not
depend on the weights, so a seeded untrained prior/encoder is used unless
``LIGHTSTAGE_PRIOR_CKPT`` / ``LIGHTSTAGE_ENCODER_DIR`` name trained ones; image quality is what
the tests (tests/test_encoder.py) check, not this benchmark.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch


def _portrait_source():
    env = os.environ.get("LIGHTSTAGE_REAL_DATA")
    roots = [Path(env)] if env else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    for r in roots:
        p = r / "portraits" / "astronaut_eileen_collins.png"
        if p.is_file():
            return p
    return None


_CPU: dict[int, float] = {}


def _timed(fn, repeats):
    """Median wall seconds over ``repeats`` (process CPU seconds kept in ``_CPU`` by result id):
    on a shared machine CPU time is the steadier number, wall time what a user waits."""
    ts, cs, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    _CPU[id(out)] = float(np.median(cs))
    return float(np.median(ts)), out


def main(quick: bool = False) -> list[dict]:
    from model.checkpoint import load_generator
    from model.encoder import (EncoderConfig, PortraitEncoder, encode_portrait, from_generator_domain,
                               load_encoder)
    from model.face import MTCNNDetector, detector_available, prepare_portrait
    from model.prior import build_generator
    from model.train_encoder import w_statistics

    torch.manual_seed(0)
    ck = os.environ.get("LIGHTSTAGE_PRIOR_CKPT")
    G = load_generator(ck) if ck else build_generator("tiny", seed=0).eval()
    ed = os.environ.get("LIGHTSTAGE_ENCODER_DIR")
    if ed:
        enc = load_encoder(ed)[0]
    else:
        enc = PortraitEncoder(EncoderConfig.for_generator(G)).eval()
        enc.set_w_stats(*w_statistics(G, n=256))
    R = G.cfg.img_resolution
    repeats = 1 if quick else 3
    refine = 3 if quick else 10
    base_steps = 10 if quick else 50

    src = _portrait_source()
    if src is not None and detector_available():
        det = MTCNNDetector()
        t_crop, pp = _timed(lambda: prepare_portrait(src, size=R, detector=det), repeats)
        source = f"{src.name} (MTCNN)"
    else:
        from model.train_encoder import look_at_labels, render_twin_views

        lab = look_at_labels(np.zeros(1), np.zeros(1))
        img = render_twin_views([1], lab, 4 * R)[0][0]
        # display-linear, not radiance: fine for timing, which is all this branch is for
        lin = from_generator_domain(img).permute(1, 2, 0).numpy().astype(np.float32)
        t_crop, pp = _timed(lambda: prepare_portrait(lin, size=R, box=(0, 0, 4 * R, 4 * R)), repeats)
        source = "twin render (box crop; no detector or real data)"

    t_enc, r_enc = _timed(lambda: encode_portrait(pp, G, enc), repeats)
    t_ref, r_ref = _timed(lambda: encode_portrait(pp, G, enc, refine_steps=refine), 1)
    t_opt, r_opt = _timed(lambda: encode_portrait(pp, G, None, refine_steps=base_steps), 1)
    cpu = {k: _CPU.get(id(v)) for k, v in (("crop_cpu_s", pp), ("encoder_cpu_s", r_enc),
                                            ("encoder_refine_cpu_s", r_ref), ("optimisation_only_cpu_s", r_opt))}
    common = {**cpu, "source": source, "resolution": R, "threads": torch.get_num_threads(),
              "crop_s": t_crop, "encoder_s": t_enc, "encoder_refine_s": t_ref, "refine_steps": refine,
              "optimisation_only_s": t_opt, "optimisation_steps": base_steps,
              "psnr_encoder": float(r_enc.psnr[0]), "psnr_encoder_refined": float(r_ref.psnr[0]),
              "psnr_optimisation_only": float(r_opt.psnr[0])}
    base = t_crop + t_opt
    return [
        {"name": "portrait crop + encoder inversion (s/portrait)", "ratio": (t_crop + t_enc) / base,
         "seconds": t_crop + t_enc, "baseline_seconds": base,
         "goal": f"< 1: faster than crop + {base_steps}-step optimisation-only inversion", **common},
        {"name": f"portrait crop + encoder + {refine}-step refinement (s/portrait)",
         "ratio": (t_crop + t_ref) / base, "seconds": t_crop + t_ref, "baseline_seconds": base,
         "goal": f"< 1: faster than crop + {base_steps}-step optimisation-only inversion", **common},
    ]


if __name__ == "__main__":
    for row in main(quick=True):
        print(row)
