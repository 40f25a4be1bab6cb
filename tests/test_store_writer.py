"""The pipelined store write path: hashed-while-written chunk files, device → host copies, kill -9 + resume."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vlmc.store.host import to_host
from vlmc.store.vectors import ShardReader, cast_checked_many, pack
from vlmc.store.writer import CRC32_PER_THREAD, ParallelHashWriter, save_hashed, save_hashed_many
from vlmc.utils.cli import UsageError
from vlmc.utils.io import safe_torch_load

REPO = Path(__file__).resolve().parents[1]


def _chunk(seed: int, n: int = 6, ragged: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [5 + (i % 3 if ragged else 0) for i in range(n)]
    vecs = [torch.randn(t, 16, generator=g) for t in lengths]
    out = pack(vecs, [f"{seed:03d}{i:06d}" for i in range(n)], torch.float16, "both")
    out["grids"] = torch.tensor([[t, 1] for t in lengths])
    return out


@pytest.mark.parametrize("ragged", [False, True])
def test_saved_file_reads_back_with_todays_reader_and_its_hash_is_of_its_bytes(tmp_path, ragged):
    chunk = _chunk(1, ragged=ragged)
    size, digest = save_hashed(chunk, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    back = safe_torch_load(tmp_path / "c.pt")  # weights_only=True, mmap=True
    assert back.keys() == chunk.keys() and back["keys"] == chunk["keys"]
    for k in ("vecs", "pooled", "grids") + (("lengths",) if ragged else ()):
        assert back[k].dtype == chunk[k].dtype and torch.equal(back[k], chunk[k])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left
    assert torch.serialization.get_crc32_options()  # the caller's own setting is untouched


def test_same_object_same_bytes_and_only_the_zip_crc_differs_from_torch_save(tmp_path):
    chunk = _chunk(2)
    save_hashed(chunk, tmp_path / "a.pt")
    save_hashed(chunk, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    buf = io.BytesIO()
    torch.serialization.set_crc32_options(not CRC32_PER_THREAD)
    try:
        torch.save(chunk, buf)  # to a file object, as today's writer did (a path names the archive's root folder)
    finally:
        torch.serialization.set_crc32_options(True)
    assert (tmp_path / "a.pt").read_bytes() == buf.getvalue()


@pytest.mark.parametrize("hash_min", [1, 1 << 30])
def test_parallel_hash_writer_hashes_every_byte_in_order(tmp_path, hash_min):
    parts = [os.urandom(n) for n in (3, 70_000, 0, 1 << 20, 17)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        w = ParallelHashWriter(fd, hash_min=hash_min)
        for p in parts:
            assert w.write(memoryview(p)) == len(p)
        assert w.tell() == w.bytes == sum(map(len, parts)) and w.sequential
    finally:
        os.close(fd)
    assert w.sha.hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("concurrent", [False, True])
def test_save_many_writes_every_file_and_reraises_after_all_are_done(tmp_path, concurrent):
    items = [(_chunk(i), tmp_path / f"{i}.pt") for i in range(3)]
    results = save_hashed_many(items, concurrent)
    for (obj, path), (size, digest) in zip(items, results, strict=True):
        assert size == path.stat().st_size and digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert torch.equal(safe_torch_load(path)["vecs"], obj["vecs"])
    (tmp_path / "blocker").write_text("a file, not a folder")
    bad = [(_chunk(5), tmp_path / "ok.pt"), (_chunk(6), tmp_path / "blocker" / "x.pt")]
    with pytest.raises(OSError):
        save_hashed_many(bad, concurrent)
    assert (tmp_path / "ok.pt").exists()


def _batch(dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g).to(dtype) * 100, torch.randn(3, 8, generator=g).to(dtype)]


@pytest.mark.parametrize("deferred", [False, True])
def test_to_host_equals_cast_checked_many(deferred):
    xs = _batch()
    got = to_host(xs, torch.float16, pin=False, deferred=deferred).wait()
    want = cast_checked_many(xs, torch.float16)
    assert all(a.dtype == torch.float16 and torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("deferred", [False, True])
def test_to_host_overflow_is_a_usage_error_and_nan_is_not(deferred):
    xs = _batch()
    xs[1][0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(UsageError, match="values up to 1e\\+06 overflow torch.float16"):
        to_host(xs, torch.float16, pin=False, deferred=deferred).wait()
    xs[1][0, 0] = float("nan")  # not finite in the model already: stored as is
    out = to_host(xs, torch.float16, pin=False, deferred=deferred).wait()
    assert torch.isnan(out[1][0, 0]) and torch.equal(out[0], xs[0].half())
    assert to_host([], torch.float16).wait() == []


def test_to_host_deferred_check_is_read_in_wait_not_before():
    xs = _batch()
    xs[0][1, 1] = 1e6
    pending = to_host(xs, torch.float16, pin=False, deferred=True)  # no error yet: the loop goes on
    assert pending.finite is not None
    with pytest.raises(UsageError):
        pending.wait()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_host_from_cuda_is_pinned_and_exact():
    xs = [x.cuda() for x in _batch(torch.bfloat16)]
    pending = to_host(xs, torch.float16)
    got = pending.wait()
    assert got[0].is_pinned() and pending.event is None
    assert all(torch.equal(a, b.cpu().half()) for a, b in zip(got, xs, strict=True))


_WRITER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from vlmc.store.vectors import ShardWriter, digest_keys, pack
    out, n_chunks = sys.argv[1], int(sys.argv[2])
    meta = {"model": "m", "source": "s", "store_dtype": "fp16", "save": "both", "save_every": 64,
            "kinds": ["pre", "post"]}
    w = ShardWriter(out, meta, resume=True)
    for i in range(n_chunks):
        keys = [f"{i:04d}{j:05d}" for j in range(64)]
        if w.is_done(i, digest_keys(keys)):
            continue
        g = torch.Generator().manual_seed(i)
        pre = list(torch.randn(64, 144, 128, generator=g))
        post = list(torch.randn(64, 36, 512, generator=g))
        w.write_chunk(i, digest_keys(keys), keys, {"pre": pack(pre, keys, torch.float16, "both"),
                                                   "post": pack(post, keys, torch.float16, "both")}, [])
    w.write_manifest(complete=True, n_chunks=n_chunks)
""")


def test_sigkill_mid_write_then_resume_is_bit_identical(tmp_path):
    """Kill -9 the pipelined writer at random moments (mostly mid-file: ~5 MB per chunk), resume, compare."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _WRITER_SCRIPT]
    n = 6
    subprocess.run([*cmd, str(tmp_path / "ref"), str(n)], check=True, env=env)
    ref = {p.name: p.read_bytes() for p in sorted((tmp_path / "ref").iterdir())}
    rng = random.Random(0)
    out = tmp_path / "killed"
    for _ in range(3):  # several kills on the same folder, each resumed by the next run
        proc = subprocess.Popen([*cmd, str(out), str(n)], env=env)
        deadline = time.time() + 60
        while not (out / "manifest.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run([*cmd, str(out), str(n)], check=True, env=env)
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".tmp")}
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref if k.endswith(".pt"))
    r = ShardReader.open(out)
    for c in r.manifest["chunks"]:
        for f in c["files"].values():
            data = (out / f["name"]).read_bytes()
            assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert r.manifest["chunks"] == ShardReader.open(tmp_path / "ref").manifest["chunks"]


def test_to_host_deferred_handles_empty_and_mixed_dtype_tensors():
    xs = [torch.empty(0, 8), torch.ones(2, 8, dtype=torch.bfloat16) * 3, torch.full((1, 8), 7e4)]
    with pytest.raises(UsageError, match="values up to 7e\\+04"):
        to_host(xs, torch.float16, pin=False, deferred=True).wait()
    got = to_host(xs[:2], torch.float16, pin=False, deferred=True).wait()
    assert got[0].shape == (0, 8) and torch.equal(got[1], xs[1].half())


def test_bench_store_runs_and_prints_the_ratio_row(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_store

    assert bench_store.main(["--n", "2", "--tokens", "4", "--d_pre", "8", "--d_post", "8", "--repeats", "1",
                             "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ours/raw" in lines[1] and len(lines[3].split("|")) == len(lines[1].split("|"))
    assert list(tmp_path.iterdir()) == []  # its temp folder is removed
    assert bench_store.measure_disk(tmp_path, nbytes=1 << 20, block=1 << 18) > 0
