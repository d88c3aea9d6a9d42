"""lightstage.store.write_image (the ingest's direct whole-shard writer) against zarr-python:
the same bytes on disk for the store's codecs and shapes, readable by plain zarr, and the
fallbacks where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from lightstage.store import ShardWriter, create_take, write_image


def _pair(tmp_path, H, W, dtype="float16"):
    ga = create_take(tmp_path / "a.zarr", "s", "t", cameras=["c0", "c1"], n_lights=3,
                     n_tracking=1, height=H, width=W, attrs={}, dtype=dtype)
    gb = create_take(tmp_path / "b.zarr", "s", "t", cameras=["c0", "c1"], n_lights=3,
                     n_tracking=1, height=H, width=W, attrs={}, dtype=dtype)
    return ga, gb


@pytest.mark.parametrize("H,W,dtype", [(96, 128, "float16"), (130, 70, "float16"),
                                       (64, 64, "float32")])
def test_same_bytes_as_zarr(tmp_path, H, W, dtype):
    rng = np.random.default_rng(H * W)
    ga, gb = _pair(tmp_path, H, W, dtype)
    img = (rng.gamma(2.0, 0.5, (3, H, W)) * np.linspace(0.1, 3, W)).astype(dtype)
    img[:, : H // 2, : W // 3] = 0  # an all-zero inner chunk is left out, as zarr does
    val = (rng.random((H, W)) > 0.1).astype(np.uint8) * 255
    ga["olat"][1, 2] = img
    ga["valid"][1, 2] = val
    write_image(gb["olat"], (1, 2), img)
    write_image(gb["valid"], (1, 2), val)
    assert ShardWriter(gb["olat"]).supports((1, 2), img.shape)  # the fast path was taken
    for name, key in (("olat", "c/1/2/0/0/0"), ("valid", "c/1/2/0/0")):
        a = (tmp_path / "a.zarr" / "s" / "t" / name / key).read_bytes()
        b = (tmp_path / "b.zarr" / "s" / "t" / name / key).read_bytes()
        assert a == b, name
    back = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t"]
    np.testing.assert_array_equal(back["olat"][1, 2], img)
    np.testing.assert_array_equal(back["valid"][1, 2], val)
    assert not list((tmp_path / "b.zarr").rglob("*.tmp"))  # written by rename, nothing left


def test_negative_zero_chunk_kept_and_empty_image_removed(tmp_path):
    _, g = _pair(tmp_path, 64, 64)
    img = np.zeros((3, 64, 64), np.float16)
    img[0, 5, 5] = -0.0  # bytes not zero: stored, so checksums of the stored bytes hold
    write_image(g["olat"], (0, 0), img)
    back = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t/olat"][0, 0]
    assert np.signbit(back[0, 5, 5]) and not np.signbit(back[0, 5, 6])
    write_image(g["olat"], (0, 1), np.ones((3, 64, 64), np.float16))
    write_image(g["olat"], (0, 1), np.zeros((3, 64, 64), np.float16))  # all fill: no shard
    assert not (tmp_path / "b.zarr" / "s" / "t" / "olat" / "c" / "0" / "1" / "0" / "0" / "0").exists()
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t/olat"][0, 1], 0)


def test_falls_back_to_zarr_when_not_a_whole_shard(tmp_path):
    _, g = _pair(tmp_path, 64, 64)
    w = ShardWriter(g["olat"])
    assert not w.supports((0,), (3, 3, 64, 64))  # several shards at once
    assert not w.supports((0, 1), (3, 32, 64))  # part of a shard
    part = np.full((3, 32, 64), 2, np.float16)
    write_image(g["olat"], (0, 1, slice(None), slice(0, 32)), part)
    back = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t/olat"][0, 1]
    np.testing.assert_array_equal(back[:, :32], 2)
    np.testing.assert_array_equal(back[:, 32:], 0)
    ro = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t/olat"]
    assert not ShardWriter(ro).ok  # read-only: never written behind zarr's back


def test_unsharded_chunks_same_bytes_as_zarr(tmp_path):
    ga, gb = _pair(tmp_path, 40, 56)
    mask = (np.arange(40 * 56).reshape(40, 56) % 7 == 0).astype(np.uint8) * 255
    ga["mask"][1] = mask
    write_image(gb["mask"], (1,), mask)
    assert ShardWriter(gb["mask"]).supports((1,), mask.shape)
    a = (tmp_path / "a.zarr" / "s" / "t" / "mask" / "c" / "1" / "0" / "0").read_bytes()
    b = (tmp_path / "b.zarr" / "s" / "t" / "mask" / "c" / "1" / "0" / "0").read_bytes()
    assert a == b
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s/t/mask"][1], mask)
