"""The vector store: packing, ragged chunks, resume, manifest checks, safe loading."""

from __future__ import annotations

import json

import pytest
import torch

from vlmc.store.vectors import (
    MANIFEST,
    ShardReader,
    ShardWriter,
    chunk_name,
    digest_keys,
    find_shard_dirs,
    pack,
    pool_tokens,
    unpack,
)
from vlmc.utils.cli import UsageError
from vlmc.utils.io import UnreadableFile, atomic_write_text

META = {"model": "m", "source": "s", "store_dtype": "fp16", "save": "both", "save_every": 2}


def _write(dirpath, chunks, complete=True):
    w = ShardWriter(dirpath, META, resume=False)
    for i, (keys, pre, post) in enumerate(chunks):
        data = {"pre": pack(pre, keys, torch.float16, "both"), "post": pack(post, keys, torch.float16, "both")}
        w.write_chunk(i, digest_keys(keys), keys, data, skipped=[])
    w.write_manifest(complete=complete, n_chunks=len(chunks))
    return w


def test_pack_uniform_and_ragged_roundtrip():
    uniform = [torch.randn(4, 3) for _ in range(2)]
    c = pack(uniform, ["a", "b"], torch.float32, "both")
    assert c["vecs"].shape == (2, 4, 3) and "lengths" not in c
    assert torch.equal(torch.stack(unpack(c)), torch.stack(uniform))
    ragged = [torch.randn(4, 3), torch.randn(6, 3)]
    c = pack(ragged, ["a", "b"], torch.float32, "tokens")
    assert c["vecs"].shape == (10, 3) and c["lengths"].tolist() == [4, 6] and "pooled" not in c
    assert all(torch.equal(x, y) for x, y in zip(unpack(c), ragged, strict=True))


def test_pooled_is_fp32_mean_of_tokens():
    x = [torch.randn(5, 3)]
    c = pack(x, ["k"], torch.float32, "pooled")
    assert "vecs" not in c
    torch.testing.assert_close(c["pooled"][0], x[0].mean(0))
    torch.testing.assert_close(pool_tokens(x[0], "max"), x[0].amax(0))
    torch.testing.assert_close(pool_tokens(x[0], "cls"), x[0][0])


def test_fp16_overflow_is_a_usage_error():
    with pytest.raises(UsageError, match="overflow"):
        pack([torch.full((2, 2), 1e6)], ["k"], torch.float16, "tokens")


def test_writer_reader_roundtrip_keys_stay_strings(tmp_path):
    keys = ["000010000", "000010001", "7"]
    pre = [torch.randn(4, 3) for _ in keys]
    post = [torch.randn(4, 5) for _ in keys]
    _write(tmp_path / "s", [(keys[:2], pre[:2], post[:2]), (keys[2:], pre[2:], post[2:])])
    r = ShardReader.open(tmp_path / "s")
    got_keys, got = r.tokens("post")
    assert got_keys == keys and all(isinstance(k, str) for k in got_keys)
    for a, b in zip(got, post, strict=True):
        torch.testing.assert_close(a.float(), b.half().float())
    k2, pooled = r.pooled("pre")
    assert k2 == keys and pooled.shape == (3, 3) and pooled.dtype == torch.float32
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["complete"] and m["n_images"] == 3 and len(m["chunks"]) == 2
    assert all(len(f["sha256"]) == 64 for c in m["chunks"] for f in c["files"].values())


def test_incomplete_and_foreign_manifests_are_rejected(tmp_path):
    _write(tmp_path / "s", [(["a"], [torch.zeros(1, 2)], [torch.zeros(1, 2)])], complete=False)
    with pytest.raises(UsageError, match="incomplete"):
        ShardReader.open(tmp_path / "s")
    assert ShardReader.open(tmp_path / "s", require_complete=False).keys() == ["a"]
    atomic_write_text(tmp_path / "x" / MANIFEST, '{"format": "other"}')
    with pytest.raises(UsageError, match="unknown format"):
        ShardReader.open(tmp_path / "x")
    with pytest.raises(UsageError, match="no manifest.json"):
        ShardReader.open(tmp_path)


def test_resume_keeps_committed_chunks_and_rejects_changed_settings(tmp_path):
    w = _write(tmp_path / "s", [(["a", "b"], [torch.zeros(1, 2)] * 2, [torch.zeros(1, 2)] * 2)], complete=False)
    path = tmp_path / "s" / chunk_name("pre", 0)
    before = path.stat().st_mtime_ns
    again = ShardWriter(tmp_path / "s", META, resume=True)
    assert again.is_done(0, digest_keys(["a", "b"]))
    assert not again.is_done(0, digest_keys(["a", "c"]))  # a different input slice is redone
    assert not again.is_done(1, digest_keys(["c"]))
    assert path.stat().st_mtime_ns == before
    with pytest.raises(UsageError, match="store_dtype"):
        ShardWriter(tmp_path / "s", {**META, "store_dtype": "fp32"}, resume=True)
    assert w.chunks.keys() == again.chunks.keys()


class Evil:
    """Any class outside torch's allow-list: loading it would run arbitrary code in a real attack."""


def test_safe_load_refuses_pickled_objects(tmp_path):
    torch.save({"keys": ["a"], "obj": Evil()}, tmp_path / "evil.pt")
    from vlmc.utils.io import safe_torch_load

    with pytest.raises(UnreadableFile, match="evil.pt: refused") as e:
        safe_torch_load(tmp_path / "evil.pt")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_find_shard_dirs(tmp_path):
    for s in ("00001", "00000"):
        _write(tmp_path / "m" / s, [(["a"], [torch.zeros(1, 2)], [torch.zeros(1, 2)])])
    assert [d.name for d in find_shard_dirs(tmp_path / "m")] == ["00000", "00001"]
    assert find_shard_dirs(tmp_path / "m" / "00000") == [tmp_path / "m" / "00000"]
    assert find_shard_dirs(tmp_path / "m" / "00000" / chunk_name("pre", 0)) == [tmp_path / "m" / "00000"]
    with pytest.raises(FileNotFoundError):
        find_shard_dirs(tmp_path / "nope")
    with pytest.raises(UsageError):
        find_shard_dirs(tmp_path)


def test_reader_skips_chunks_whose_images_were_all_unreadable(tmp_path):
    w = ShardWriter(tmp_path / "s", META, resume=False)
    w.write_chunk(0, digest_keys(["bad"]), [], {"pre": {"keys": []}, "post": {"keys": []}}, skipped=[{"key": "bad"}])
    keys = ["a"]
    w.write_chunk(1, digest_keys(keys), keys, {k: pack([torch.ones(2, 3)], keys, torch.float16, "both") for k in ("pre", "post")}, [])
    w.write_manifest(complete=True, n_chunks=2)
    r = ShardReader.open(tmp_path / "s")
    assert r.tokens("pre")[0] == ["a"] and r.pooled("post")[1].shape == (1, 3)
