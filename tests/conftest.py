"""Shared test fixtures and helpers.

* ``real_data``: the real public data folder (the test is skipped cleanly when it is absent).
* ``one_torch_thread``: torch runs with one intra-op thread for a module, then the previous
  count is restored. Opt in per module with
  ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` (or per test).
* :func:`take_arrays` / :func:`assert_same_take`: compare two ingested takes byte for byte
  (``from conftest import assert_same_take``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest


def real_data_dir() -> Path | None:
    """``../shared/data/real`` beside the checkout, or ``$LIGHTSTAGE_REAL_DATA``; None if absent."""
    env = os.environ.get("LIGHTSTAGE_REAL_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Path of the real public data; skips the test when it is not available."""
    d = real_data_dir()
    if d is None:
        pytest.skip("real data (../shared/data/real) not available")
    return d


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for the module, the previous count restored afterwards.

    The CI/dev machines are small and shared: for the tiny networks and tensors of the tests,
    one thread is faster than two contending ones (and it is the house rule of one core per
    test file). torch is imported here, not at the top, so torch-free tests never load it.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def take_arrays(store: str | Path, group: str = "s000/t0") -> tuple[dict[str, np.ndarray], dict]:
    """Every array of one take of a store, and its attributes without the creation time."""
    import zarr

    g = zarr.open_group(str(store), mode="r")[group]
    arrays = {k: np.asarray(v[...]) for k, v in g.arrays()}
    attrs = dict(g.attrs)
    attrs["provenance"] = {k: v for k, v in attrs["provenance"].items() if k != "created"}
    return arrays, attrs


def assert_same_take(a: str | Path, b: str | Path, group: str = "s000/t0",
                     provenance: bool = True) -> None:
    """Two stores hold the same take: same arrays (every element, checksums included) and the
    same attributes. ``provenance=False`` ignores the provenance (e.g. inputs read from another
    folder)."""
    (xa, aa), (xb, ab) = take_arrays(a, group), take_arrays(b, group)
    if not provenance:
        aa.pop("provenance"), ab.pop("provenance")
    assert sorted(xa) == sorted(xb)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)
    assert json.dumps(aa, sort_keys=True) == json.dumps(ab, sort_keys=True)
