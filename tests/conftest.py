"""Shared test fixtures: the real public data folder (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

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
