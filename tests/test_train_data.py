"""Stage-4 data: store indexing, shape-grouped batches, the persisted split, float64 train-only stats."""

from __future__ import annotations

import json

import pytest
import torch

from vlmc.store.batches import plan_batches
from vlmc.store.normalization import RunningMoments, compute_stats, load_stats, save_stats
from vlmc.store.reader import index_samples, open_store, parse_correspondence
from vlmc.store.split import apply_split, load_split, make_split, save_split
from vlmc.utils.cli import UsageError
from vlmc.utils.io import sha256_file

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

torch.set_num_threads(1)
KEYS = ["000010000", "000010001", "7", "0012", "000010004", "000010005"]


def _store(tmp_path, shards=None, kind="linear", corr="1:1"):
    shards = shards or {"00000": KEYS, "00001": KEYS[:4]}  # the same keys in two shards on purpose
    write_synthetic_store(tmp_path / "m", synthetic_connector(kind, 4, 6), corr, (2, 2), 4, shards, save_every=4)
    return open_store(tmp_path / "m")


def test_index_keys_are_strings_and_ids_include_shard(tmp_path):
    samples = index_samples(_store(tmp_path))
    ids = [s.id for s in samples]
    assert ids[:6] == [("00000", k) for k in KEYS] and ("00001", "000010000") in ids
    assert len(set(ids)) == len(ids) == 10
    assert all(isinstance(s.key, str) for s in samples)
    assert index_samples(_store(tmp_path), limit=3) == samples[:3]  # --limit counts images


def test_correspondence_parsing():
    assert parse_correspondence("merge 2x2").merge == 2
    assert parse_correspondence("1:1").kind == "1:1" and parse_correspondence("none").kind == "none"
    with pytest.raises(UsageError):
        parse_correspondence("merge 2x3")


def test_split_roundtrip_disjoint_and_by_shard(tmp_path):
    samples = index_samples(_store(tmp_path))
    split = make_split(samples, 0.7, seed=1)
    train, val = {tuple(x) for x in split["train"]}, {tuple(x) for x in split["val"]}
    assert not train & val and len(train | val) == 10 and val
    save_split(tmp_path / "split.json", split)
    again = load_split(tmp_path / "split.json")
    assert again == split and all(isinstance(k, str) for _, k in again["val"])
    assert {s.id for s in apply_split(samples, again, "val")} == val
    by_shard = make_split(samples, 0.9, 0, val_shards=["00001"])
    assert {s for s, _ in by_shard["val"]} == {"00001"} and {s for s, _ in by_shard["train"]} == {"00000"}
    with pytest.raises(UsageError, match="non-empty"):
        make_split(samples, 0.9, 0, train_shards=["00000", "00001"])


def test_stats_are_float64_train_only(tmp_path):
    samples = index_samples(_store(tmp_path))
    train = samples[:7]
    stats = compute_stats(train, torch.device("cpu"), batch_size=3)
    pre = torch.cat([torch.load(s.pre_file, weights_only=True)["vecs"][s.row] for s in train]).double()
    torch.testing.assert_close(stats.pre_mean, pre.mean(0))
    torch.testing.assert_close(stats.pre_std, pre.std(0, unbiased=False))
    assert stats.pre_mean.dtype == torch.float64 and stats.meta["n_images"] == "7"
    save_stats(tmp_path / "n.safetensors", stats)
    back = load_stats(tmp_path / "n.safetensors")
    assert torch.equal(back.post_std, stats.post_std) and back.meta["split"] == "train"


def test_running_moments_merge_matches_direct():
    x = torch.randn(1000, 3, dtype=torch.float64) * 5 + 1e4  # big offset: naive sum-of-squares would cancel
    m = RunningMoments(3, torch.device("cpu"))
    for part in x.split(37):
        m.update(part)
    torch.testing.assert_close(m.mean, x.mean(0))
    torch.testing.assert_close(m.std(), x.std(0, unbiased=False))


def test_batches_never_mix_shapes_and_are_deterministic(tmp_path):
    samples = index_samples(_store(tmp_path))
    object.__setattr__(samples[3], "pre_grid", (1, 4))  # pretend one image has another shape
    object.__setattr__(samples[3], "post_grid", (1, 4))
    a = plan_batches(samples, 4, shuffle=True, seed=5)
    assert a == plan_batches(samples, 4, shuffle=True, seed=5) != plan_batches(samples, 4, shuffle=True, seed=6)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert all(len({samples[i].shape for i in b}) == 1 for b in a)
    assert [3] in a


def test_pre_post_key_mismatch_is_an_error(tmp_path):
    store = _store(tmp_path, {"s": KEYS[:4]})
    path = store.shards[0].post.dir / "post_vectors_00000.pt"
    chunk = torch.load(path, weights_only=True)
    chunk["keys"][1:3] = chunk["keys"][2:0:-1]  # same first/last key: only the pre/post comparison sees it
    torch.save(chunk, path)
    with pytest.raises(UsageError, match="bytes, the manifest says"):  # the file no longer matches its manifest
        index_samples(store)
    m = json.loads((path.parent / "manifest.json").read_text())  # a tamper that also fixes the manifest
    m["chunks"][0]["files"]["post"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (path.parent / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match="different keys"):
        index_samples(open_store(store.shards[0].pre.dir))
