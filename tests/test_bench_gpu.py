"""bench/gpu.sh and its table: the table script on synthetic results, the script itself in CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_table_reads_results_and_marks_missing_families(tmp_path):
    row = {"model": "llava", "device": "cuda:0", "dtype": "bfloat16", "images": 512, "preprocess": "device",
           "vision_only": True, "forward_img_s": 1000.0, "bare_img_s": 500.0, "ours_img_s": 200.0,
           "ours_workers_img_s": 150.0, "disk_mb_s": 1285.0, "disk_img_s": 218.0,
           "ours/min(forward,disk)": 200 / 218, "weights_gb": 0.62, "ours_peak_gb": 2.5}  # fmt: skip
    (tmp_path / "extract_llava.json").write_text(json.dumps([row]))
    (tmp_path / "knn.json").write_text(json.dumps({
        "config": {"n": 1000, "d": 8, "k": 5}, "device": "cuda:0", "block_mb": 2048.0,
        "seconds_min": {"floor": 2.0, "torch": 3.0}, "peak_device_gib": {"floor": 1.0, "torch": 1.5}}))
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_table.py"), str(tmp_path), "--families", "llava,qwen3.5"],
                          capture_output=True, text=True, env={**os.environ})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    llava = next(line for line in lines if line.startswith("| llava"))
    assert "| 1000 | 500 | 200 | 150 | 1285 | 218 | 0.92 | 0.62 | 2.50 | 1.88 |" in llava
    assert any(line.startswith("| qwen3.5 (missing)") for line in lines)
    assert "| torch | 3.00 | 1.50 | 1.50 |" in lines
    bad = subprocess.run([sys.executable, str(REPO / "bench/gpu_table.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "no results folder" in bad.stderr


@pytest.mark.slow
def test_gpu_sh_smoke_mode_on_cpu(tmp_path):
    """The prepared GPU script runs end to end on CPU (tiny llava, small kNN / training) and prints its table."""
    env = {**os.environ, "OUT": str(tmp_path), "VLMC_GPU_SMOKE": "1", "GPU_FAMILIES": "llava", "GPU_N": "16"}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| llava"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(c not in ("", "-", "missing") for c in cells[1:5]) and float(cells[3]) > 0  # forward, bare, ours x2
    assert "kNN N=2000" in table and "| torch |" in table
    rows = json.loads((tmp_path / "extract_llava.json").read_text())
    assert rows[0]["vision_only"] and rows[0]["preprocess"] == "device" and rows[0]["disk_mb_s"] > 0
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("script", ["bench_extract.py", "bench_knn.py"])
def test_benches_refuse_cuda_without_a_gpu(script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--device", "cuda", "--n", "8"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
