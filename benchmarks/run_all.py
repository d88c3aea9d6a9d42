"""Run every benchmark: ``python -m benchmarks.run_all [--quick] [--only NAME]``.

Each ``benchmarks/bench_*.py`` module defines ``main(quick: bool) -> list[dict]``; every dict is
one measurement with at least ``name``, ``ratio`` (ours / baseline or achieved / floor, run in
the same invocation), ``goal`` (text) and the raw numbers it came from. Results are printed as
a table and written to ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--only", default=None, help="substring of the benchmark module name")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    a = ap.parse_args(argv)
    here = Path(__file__).parent
    results = []
    for m in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not m.name.startswith("bench_") or (a.only and a.only not in m.name):
            continue
        mod = importlib.import_module(f"benchmarks.{m.name}")
        t0 = time.perf_counter()
        print(f"== {m.name}", flush=True)
        try:
            rows = mod.main(quick=a.quick)
        except Exception as e:  # one broken benchmark must not hide the others
            print(f"   FAILED: {e!r}", flush=True)
            rows = [{"name": m.name, "error": repr(e)}]
        for r in rows:
            r.setdefault("module", m.name)
            ratio = r.get("ratio")
            print(f"   {r.get('name')}: ratio={ratio if ratio is None else round(ratio, 3)}  goal: {r.get('goal', '')}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        results.extend(rows)
    Path(a.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
