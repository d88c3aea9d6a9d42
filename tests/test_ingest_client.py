"""ingest with another Dask ``Client`` already open in the process (a notebook's, a benchmark's).

Regression test for a hang: ``distributed.as_completed`` tracks its futures on
``default_client()``'s IO loop unless it is given one, and a ``Client`` entered as a context
manager (``with Client(...)``) stays the default client of its thread. ``ingest`` with
``workers=N`` or ``scheduler=...`` makes a client of its own; tracking that client's futures on
the other client's IO-loop thread races across threads: completions were lost and ``ingest``
hung. The fix passes ``loop=client.loop``. Here the test process holds a LocalCluster and an
entered Client while ``ingest`` runs several times, on its own LocalCluster and on that open
cluster's scheduler; every run must finish (per-test timeout) and write the same bytes as the
in-process ingest.

The lost completion is a check-then-wait race between two threads, rare per future: without the
fix these runs mostly finish, only slower (each completion waits until the other client's idle
loop wakes). So each run also checks the cause directly: every ``as_completed`` ingest made
tracks its futures on the loop of the client that owns them, never on the open client's loop.
"""

from __future__ import annotations

import logging

import pytest

from lightstage.ingest import ingest, verify_store
from lightstage.twin.static_capture import write_static_capture

from conftest import assert_same_take

distributed = pytest.importorskip("distributed")

H, W = 24, 32
FRAMES = [1, 2, 3, 4, 5, 10]  # tracking, olat (lights 0-3), tracking
RUNS = 3  # the lost completions were a race: one lucky run proves little


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    cap = write_static_capture(tmp_path_factory.mktemp("client") / "cap", height=H, width=W,
                               n_cameras=2, frames=FRAMES)
    return cap.root, cap.calibration


@pytest.fixture(scope="module")
def reference(capture, tmp_path_factory):
    """The in-process ingest (no Dask): the bytes every other run must reproduce."""
    cap, cal = capture
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rep = ingest(cap, cal, out)
    assert rep.ok and rep.written == 2 * 4, rep.errors
    return out


@pytest.fixture(scope="module", autouse=True)
def _dask_config_restored():
    """``ingest(workers=N)`` sets Dask's configuration for the LocalCluster it starts process
    wide: restore it after this module so later tests do not depend on the order they run in."""
    import copy

    import dask

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()  # in place: dask.config.set holds this very dict
    dask.config.config.update(saved)


@pytest.fixture(scope="module")
def other_client():
    """A LocalCluster and a Client entered as a context manager in this process, as a
    notebook or a benchmark holds them: the default client while the tests run. Threads, not
    processes, so that it starts in a fraction of a second; its scheduler listens on TCP like
    any cluster ``ls-ingest --scheduler`` is pointed at."""
    from distributed import Client, LocalCluster, default_client

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        assert default_client() is client
        yield client
        assert default_client() is client  # ingest's own client did not take its place


@pytest.fixture
def tracking_loops(monkeypatch):
    """Spy on ``distributed.as_completed`` (the class itself, however it is imported): for each
    instance, the IO loop it tracks on and the loops of the clients owning its futures."""
    from distributed.client import as_completed

    seen = []
    init = as_completed.__init__

    def spy(self, futures=None, *args, **kwargs):
        init(self, futures, *args, **kwargs)
        seen.append((self.loop, {f.client.loop for f in futures or []}))

    monkeypatch.setattr(as_completed, "__init__", spy)
    return seen


def _check(out, reference, rep, tracking_loops, other_client):
    assert tracking_loops, "ingest no longer uses distributed.as_completed: update this test"
    for loop, owners in tracking_loops:
        assert owners == {loop}, "futures tracked on another client's IO loop"
        assert loop is not other_client.loop
    tracking_loops.clear()
    assert rep.ok and rep.written == 2 * 4, rep.errors
    assert verify_store(out) == []  # every stored image matches its checksum
    assert_same_take(out, reference)  # same arrays (checksums included) and attributes


@pytest.mark.timeout(120)  # a hang is the failure: ~3 s of work
def test_on_the_open_clusters_scheduler_with_that_client_open(capture, reference, other_client,
                                                               tracking_loops, tmp_path):
    cap, cal = capture
    address = other_client.scheduler.address
    assert address.startswith("tcp://")
    for i in range(RUNS):
        out = tmp_path / f"sched{i}.zarr"
        rep = ingest(cap, cal, out, scheduler=address)
        _check(out, reference, rep, tracking_loops, other_client)


@pytest.mark.timeout(180)  # a hang is the failure: each run starts a 1-worker LocalCluster
def test_own_localcluster_with_another_client_open(capture, reference, other_client,
                                                   tracking_loops, tmp_path):
    cap, cal = capture
    for i in range(2):
        out = tmp_path / f"own{i}.zarr"
        rep = ingest(cap, cal, out, workers=1)
        _check(out, reference, rep, tracking_loops, other_client)
