"""Stage 1 end to end on tiny models: outputs, resume after SIGKILL, corrupt images, bad arguments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmc.data.scenes import write_scenes
from vlmc.extract import extract_vectors
from vlmc.models.base import families
from vlmc.store.vectors import ShardReader
from vlmc.utils.io import read_json

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(REPO / "src/extract/extract_vectors.py")]


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img")
    write_scenes(root / "00000", n=10, seed=1, size=64)
    write_scenes(root / "00001", n=6, seed=2, size=64)
    return root


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.pt"))}


@pytest.mark.parametrize("family", families())
def test_extract_every_family_writes_complete_store(family, images, tmp_path):
    run_cli("--root", str(images), "--out_dir", str(tmp_path), "--models", family, "--model-path", "tiny",
            "--batch_size", "4", "--save_every", "4", "--num_workers", "0", "--max_items", "12")
    total = 0
    for shard in ("00000", "00001"):
        r = ShardReader.open(tmp_path / family / shard)
        m = r.manifest
        keys, pre = r.tokens("pre")
        _, post = r.tokens("post")
        assert keys == sorted(keys) and all(isinstance(k, str) for k in keys)
        assert pre[0].dtype == torch.float16 and pre[0].shape[1] == m["pre"]["dim"]
        assert post[0].shape[1] == m["post"]["dim"]
        assert m["complete"] and m["n_skipped"] == 0 and m["family"] == family
        total += len(keys)
    assert total == 12  # --max_items counts images, not batches


def test_sigkill_then_skip_existing_is_bit_identical(images, tmp_path):
    common = ["--root", str(images), "--models", "llava", "--model-path", "tiny", "--batch_size", "2",
              "--save_every", "2", "--num_workers", "0"]
    run_cli(*common, "--out_dir", str(tmp_path / "ref"))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*CLI, *common, "--out_dir", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "llava" / "00000" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli(*common, "--out_dir", str(out), "--skip_existing")
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    for shard in ("00000", "00001"):
        a = read_json(out / "llava" / shard / "manifest.json")
        b = read_json(tmp_path / "ref" / "llava" / shard / "manifest.json")
        assert a["chunks"] == b["chunks"] and a["complete"] and a["n_images"] == b["n_images"]


def test_resume_rewrites_nothing(images, tmp_path):
    args = ["--root", str(images), "--out_dir", str(tmp_path), "--models", "llava", "--model-path", "tiny",
            "--num_workers", "0", "--shards", "00001"]
    run_cli(*args)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")}
    proc = run_cli(*args, "--skip_existing")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.pt")} == before
    assert "0 written, 6 resumed" in proc.stderr


def test_unreadable_images_are_skipped_logged_and_counted(tmp_path):
    root = tmp_path / "img"
    write_scenes(root / "s", n=3, seed=0, size=64)
    (root / "s" / "zero.png").write_bytes(b"")
    (root / "s" / "text.jpg").write_text("not an image")
    good = next((root / "s").glob("*.png"))
    (root / "s" / "trunc.png").write_bytes(good.read_bytes()[:200])
    proc = run_cli("--root", str(root), "--out_dir", str(tmp_path / "out"), "--models", "llava",
                   "--model-path", "tiny", "--num_workers", "0")
    m = read_json(tmp_path / "out" / "llava" / "s" / "manifest.json")
    reasons = {s["key"]: s["reason"] for c in m["chunks"] for s in c["skipped"]}
    assert set(reasons) == {"zero", "text", "trunc"} and m["n_skipped"] == 3 and m["n_images"] == 3
    assert "skipped s/zero" in proc.stderr


def test_save_pooled_only_and_store_dtype(images, tmp_path):
    run_cli("--root", str(images), "--out_dir", str(tmp_path), "--models", "llava", "--model-path", "tiny",
            "--num_workers", "0", "--shards", "00001", "--save", "pooled", "--store_dtype", "fp32")
    r = ShardReader.open(tmp_path / "llava" / "00001")
    keys, pooled = r.pooled("post")
    assert pooled.shape == (6, r.manifest["post"]["dim"]) and len(keys) == 6
    chunk = next(r.chunks("post"))
    assert "vecs" not in chunk and chunk["pooled"].dtype == torch.float32


def test_modules_glob_and_list_modules(images, tmp_path):
    listing = run_cli("--models", "llava", "--model-path", "tiny", "--list-modules").stdout
    assert "multi_modal_projector" in listing
    run_cli("--root", str(images), "--out_dir", str(tmp_path), "--models", "llava", "--model-path", "tiny",
            "--num_workers", "0", "--shards", "00001", "--modules", "*multi_modal_projector.linear_1")
    m = read_json(tmp_path / "llava" / "00001" / "manifest.json")
    assert len(m["modules"]) == 1 and m["modules"][0] in m["chunks"][0]["files"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root", "/nonexistent/dir"], "does not exist"),
        (["--models", "nosuchmodel"], "unknown model"),
        (["--batch_size", "0"], "--batch_size: must be >= 1"),
        (["--store_dtype", "fp8"], "unknown dtype"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--models", ""], "cuda"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message, images, tmp_path, capsys):
    base = ["--root", str(images), "--out_dir", str(tmp_path), "--models", "llava", "--model-path", "tiny"]
    assert extract_vectors.main([*base, *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_empty_folder_and_unwritable_out_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert extract_vectors.main(["--root", str(tmp_path / "empty"), "--models", "llava", "--model-path", "tiny"]) == 2
    assert "no images" in capsys.readouterr().err.lower()
    root = tmp_path / "img"
    write_scenes(root / "s", n=1, seed=0, size=64)
    (tmp_path / "afile").write_text("x")
    proc = run_cli("--root", str(root), "--out_dir", str(tmp_path / "afile" / "out"), "--models", "llava",
                   "--model-path", "tiny", check=False)
    assert proc.returncode == 2 and "cannot create output directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_every_flag_with_defaults():
    out = run_cli("--help").stdout
    for flag in ("--root", "--out_dir", "--models", "--model-path", "--batch_size", "--num_workers", "--max_items",
                 "--save_every", "--skip_existing", "--dtype", "--device", "--img_size", "--prompt", "--save",
                 "--caption", "--modules", "--list-modules"):
        assert flag in out
    assert "default: data/vector" in out


def test_manifest_is_valid_json_after_every_chunk(images, tmp_path):
    run_cli("--root", str(images), "--out_dir", str(tmp_path), "--models", "llava", "--model-path", "tiny",
            "--num_workers", "0", "--shards", "00000", "--save_every", "3")
    m = json.loads((tmp_path / "llava" / "00000" / "manifest.json").read_text())
    assert [c["rows"] for c in m["chunks"]] == [3, 3, 3, 1]
    assert not list((tmp_path / "llava" / "00000").glob("*.tmp"))
