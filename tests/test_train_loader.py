"""Stage-4 loaders: the split held on the device and the prefetch thread give today's batches and losses."""

from __future__ import annotations

import csv
import dataclasses
import time

import pytest
import torch

from vlmc.store.batches import ShapeBatchSampler, make_loader
from vlmc.store.reader import index_samples, open_store
from vlmc.train import train_recon
from vlmc.train.loader import DeviceLoader, PrefetchLoader, make_fast_loader, resolve_loader, split_bytes
from vlmc.utils.cli import UsageError

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two token shapes (shards with different grids), fp16, several chunks per shard."""
    root = tmp_path_factory.mktemp("st")
    f = synthetic_connector("gelu", 8, 12)
    write_synthetic_store(root, f, "1:1", (4, 4), 8, {"00000": [f"{i:09d}" for i in range(21)]}, save_every=8,
                          store_dtype=torch.float16)
    write_synthetic_store(root, f, "1:1", (2, 6), 8, {"00001": [f"{i:09d}" for i in range(13)]}, save_every=5,
                          store_dtype=torch.float16)
    return root


def _batches(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [{k: v.cpu() for k, v in b.items()} for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["device", "prefetch"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_equal_the_dataloaders(store, mode, shuffle):
    samples = index_samples(open_store(store))
    assert len({s.shape for s in samples}) == 2
    ref, ref_sampler = make_loader(samples, 4, shuffle, 3, 0, pin=False)
    fast, sampler = make_fast_loader(mode, samples, 4, shuffle, 3, CPU)
    for epoch, start in ((1, 0), (2, 0), (2, 3)):  # start: a mid-epoch resume skips batches
        want = _batches(ref, ref_sampler, epoch, start)
        got = _batches(fast, sampler, epoch, start)
        assert _same(got, want) and got[0]["pre"].dtype == torch.float16
        assert len(fast) == len(want)


def test_split_bytes_counts_every_token(store):
    samples = index_samples(open_store(store))
    loader = DeviceLoader(samples, ShapeBatchSampler(samples, 4, False), CPU)
    assert split_bytes(samples) == sum(t.nbytes for t in loader.pre + loader.post) == (21 * 16 + 13 * 12) * (8 + 12) * 2


def test_resolve_loader():
    assert resolve_loader("auto", [], CPU) == "workers"
    assert resolve_loader("prefetch", [], CPU) == "prefetch"
    with pytest.raises(UsageError, match="unknown --loader 'gpu'"):
        resolve_loader("gpu", [], CPU)


def test_auto_keeps_the_split_on_the_gpu_only_when_it_fits(store, monkeypatch):
    samples = index_samples(open_store(store))
    need = split_bytes(samples)
    cuda = torch.device("cuda")  # never touched: the free-memory query is the only CUDA call
    for free, want in ((2 * need, "device"), (2 * need - 1, "prefetch")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10 * free))
        assert resolve_loader("auto", samples, cuda) == want
        assert resolve_loader("device", samples, cuda) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 10 * need))
    with pytest.raises(UsageError, match="--loader device: the split needs .* use --loader prefetch"):
        resolve_loader("device", samples, cuda)


def test_prefetch_reraises_a_gather_error_and_stops_when_abandoned(store, tmp_path):
    samples = index_samples(open_store(store))
    broken = [*samples[:6], dataclasses.replace(samples[6], post_file=str(tmp_path / "gone.pt"))]
    loader = PrefetchLoader(broken, ShapeBatchSampler(broken, 2, False), CPU, depth=1)
    with pytest.raises(FileNotFoundError):
        list(loader)
    loader = PrefetchLoader(samples, ShapeBatchSampler(samples, 1, False), CPU, depth=1)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    it.close()  # the producer, blocked on a full queue, is released and joined
    assert time.perf_counter() - t < 5


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("model_type", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_training_losses_identical_with_every_loader(store, tmp_path, model_type):
    extra = ["--hidden_size", "16"] + (["--num_heads", "2", "--num_layers", "1"] if model_type == "transformer" else [])
    runs = {}
    for mode in ("workers", "device", "prefetch"):
        out = tmp_path / mode
        rc = train_recon.main(["--vec_dir", str(store), "--out_dir", str(out), "--num_workers", "0", "--batch_size", "4",
                               "--warmup_steps", "2", "--epochs", "2", "--model_type", model_type, "--loader", mode,
                               *extra])
        assert rc == 0
        runs[mode] = (_history(out), torch.load(out / "best_model.pt", weights_only=True)["state_dict"])
    hist, state = runs["workers"]
    assert len(hist) == 2
    for mode in ("device", "prefetch"):
        assert runs[mode][0] == hist  # printed with 6 significant digits ...
        assert all(torch.equal(runs[mode][1][k], v) for k, v in state.items())  # ... and the weights bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["device", "prefetch"])
def test_cuda_batches_equal_the_dataloaders(store, mode):
    cuda = torch.device("cuda")
    samples = index_samples(open_store(store))
    ref, ref_sampler = make_loader(samples, 4, True, 3, 0, pin=True)
    fast, sampler = make_fast_loader(mode, samples, 4, True, 3, cuda)
    sampler.set_epoch(1)
    got = list(fast)
    assert got[0]["pre"].device.type == "cuda"
    assert _same([{k: v.cpu() for k, v in b.items()} for b in got], _batches(ref, ref_sampler, 1))
    assert resolve_loader("auto", samples, cuda) == "device"  # a few KB fit
