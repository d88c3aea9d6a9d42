"""Capture simulator throughput and memory.

* ``simulate-demo-workers``: frames/s of ``simulate`` on the demo rig (a slice of frames, one
  subject, noise on, no calibration shots) with 2 worker processes against 1, same
  invocation. Goal: ratio >= 1.7 (the work is per (frame, camera) and embarrassingly parallel;
  the ratio is capped by the cores actually free, so the CPU efficiency, which the neighbours
  on a shared machine do not change much, is reported too). The slice (quick: 24 frames x 8
  cameras, full: 48 x 8) is long enough that the per-worker start (imports, loading the
  driver's scene, compiled kernels from the on-disk cache) is a small part of it.
* ``simulate-demo-2-subjects``: the README's job, two ``demo`` subjects with every default
  (all 162 frames x 8 cameras, brackets, tracking, motion, calibration shots, truth), with 2
  workers. Ratio = 300 s budget / wall time (goal >= 1); ``cpu_ratio`` = 600 CPU-s (2 cores x
  300 s) / CPU seconds, which is what two idle cores would turn into wall time. Quick mode
  runs 2 subjects x frames 0:33 with a fifth of the calibration shots and scales wall and CPU
  time by the full run's task count (an over-estimate: per-subject set-up is scaled too).
* ``simulate-demo-2-subjects-2-vs-1-workers`` (full mode only): the same whole job on 1 worker
  against 2 workers; the throughput goal's ratio on the real workload (>= 1.7).
* ``simulate-lsx331-peak-rss``: peak resident memory of a fresh process simulating lsx-331
  frames of one camera at full 4096x2160 resolution (quick: one OLAT frame; full: the
  all-lights tracking frame and one OLAT frame), truth included. Ratio = 2 GB / peak; goal >= 1 (< 2 GB per
  process, frames generated lazily).

Every row records the 1-minute load average before and after: on the shared 2-core development
machine wall-clock numbers are only meaningful when it is low.

Run: ``python -m benchmarks.run_all --only simulate [--quick]``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

_CHILD = r"""
import json, resource, sys, time
from lightstage.rig import builtin_rig
from lightstage.twin.capture import simulate
rig_name, n_cams, frames, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rig = builtin_rig(rig_name)
rig.cameras = rig.cameras[:n_cams]
t0 = time.perf_counter()
simulate(out, rig, 1, seed=0, noise=True, frames=frames, calibration=False, workers=1)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _cpu() -> float:
    """CPU seconds of this process + its finished (joined) worker processes."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _demo_rate(workers: int, frames: str, tmp: Path) -> dict:
    from lightstage.rig import builtin_rig
    from lightstage.twin.capture import parse_frames, simulate

    rig = builtin_rig("demo")
    n = len(parse_frames(frames, len(rig.sequence)))
    out = tmp / f"demo_w{workers}"
    load0 = os.getloadavg()[0]
    c0, t0 = _cpu(), time.perf_counter()
    simulate(out, rig, 1, seed=0, noise=True, frames=frames, calibration=False, workers=workers)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    return {"workers": workers, "frames": n, "cameras": rig.n_cameras, "seconds": dt,
            "cpu_seconds": dc, "frames_per_s": n / dt,
            "loadavg_1min": [load0, os.getloadavg()[0]]}


def _n_tasks(rig, n_subjects: int, n_frames: int, calibration) -> int:
    """Camera images the simulator renders: calibration shots x their cameras, and per
    subject one truth task per camera plus one task per (frame, camera)."""
    from lightstage.twin.targets import calibration_plan

    cal = sum(len(s.cameras) for s in calibration_plan(rig, 0, **calibration)) if calibration is not None else 0
    return cal + n_subjects * rig.n_cameras * (1 + n_frames)


def _demo_two_subjects(quick: bool, tmp: Path, workers: int = 2) -> dict:
    """The README's job: two demo subjects, every default, 2 workers (quick: a slice, scaled)."""
    from lightstage.rig import builtin_rig
    from lightstage.twin.capture import parse_frames, simulate

    rig = builtin_rig("demo")
    n_all = len(rig.sequence)
    if quick:
        frames, cal = "0:33", {"n_board_poses": 6, "lights": list(range(0, rig.n_lights, 5))}
    else:
        frames, cal = None, {}
    n = len(parse_frames(frames, n_all))
    scale = _n_tasks(rig, 2, n_all, {}) / _n_tasks(rig, 2, n, cal)
    load0 = os.getloadavg()[0]
    c0, t0 = _cpu(), time.perf_counter()
    simulate(tmp / f"demo2_w{workers}", rig, 2, seed=0, noise=True, frames=frames,
             calibration=cal or True, workers=workers)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    wall, cpu = dt * scale, dc * scale
    return {
        "name": "simulate-demo-2-subjects" + ("" if workers == 2 else f"-{workers}-worker"),
        "ratio": 300.0 / wall,
        "goal": "two demo subjects (all defaults, 2 workers) in <= 300 s on 2 cores: ratio >= 1",
        "cpu_ratio": 600.0 / cpu,
        "wall_s": wall, "cpu_s": cpu, "measured_wall_s": dt, "measured_cpu_s": dc,
        "scaled_by": scale, "frames": frames or f"0:{n_all}", "calibration": cal or "default",
        "loadavg_1min": [load0, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
    }


def _lsx_peak(n_cams: int, frames: str, tmp: Path) -> dict:
    out = tmp / f"lsx_{n_cams}"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _CHILD, "lsx-331", str(n_cams), frames, str(out)],
                       capture_output=True, text=True, env=env, cwd=root)
    if r.returncode != 0:
        raise RuntimeError(f"lsx-331 child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_simulate_") as d:
        tmp = Path(d)
        # a slice with a tracking frame (frame 17) among the OLATs; workers load the driver's
        # scene and share rest-pose depth maps and shadow tables through its cache folder
        frames = "2:26" if quick else "1:49"
        r1 = _demo_rate(1, frames, tmp)
        r2 = _demo_rate(2, frames, tmp)
        rows.append({
            "name": "simulate-demo-workers",
            "ratio": r2["frames_per_s"] / r1["frames_per_s"],
            "goal": "2 workers / 1 worker frames/s >= 1.7 (needs 2 free cores)",
            "one_worker": r1, "two_workers": r2, "cpu_count": os.cpu_count(),
            # load-independent view: CPU spent for the same work (1.0 = no parallel overhead);
            # on a busy machine wall-clock ratios say more about the neighbours than about us
            "cpu_efficiency_2_vs_1": r1["cpu_seconds"] / r2["cpu_seconds"],
        })
        rows.append(_demo_two_subjects(quick, tmp))
        if not quick:
            # the same whole job on 1 worker: the 2-vs-1 ratio on the real workload (≈ 8 min)
            one = _demo_two_subjects(quick, tmp, workers=1)
            rows.append({"name": "simulate-demo-2-subjects-2-vs-1-workers",
                         "ratio": one["measured_wall_s"] / rows[-1]["measured_wall_s"],
                         "goal": ">= 1.7 (two demo subjects, every default)",
                         "one_worker_s": one["measured_wall_s"],
                         "two_workers_s": rows[-1]["measured_wall_s"],
                         "loadavg_1min": one["loadavg_1min"]})
        # quick: one OLAT frame; full: the all-lights tracking frame too (the heaviest render)
        n_cams, lsx_frames = (1, "2:3") if quick else (1, "1:3")
        m = _lsx_peak(n_cams, lsx_frames, tmp)
        rows.append({
            "name": "simulate-lsx331-peak-rss",
            "ratio": 2e9 / m["peak_rss_bytes"],
            "goal": "peak RSS < 2 GB per process (ratio = 2 GB / peak >= 1)",
            "peak_rss_gb": m["peak_rss_bytes"] / 1e9, "seconds": m["seconds"],
            "cameras": n_cams, "frames": lsx_frames, "resolution": "4096x2160",
        })
    return rows


if __name__ == "__main__":
    for row in main(quick="--quick" in sys.argv):
        print(json.dumps(row, default=str))
