"""W&B tracking (src/utils/tracking.py): off by default, offline runs under the stage's output folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vlmc.data.scenes import write_scenes
from vlmc.extract import extract_vectors
from vlmc.utils import tracking
from vlmc.utils.tracking import add_tracking_args, column_means, flat_numbers


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_tracking_args(p)
    return p.parse_args(list(argv))


def test_flag_forms_and_off_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.ENV, raising=False)
    assert parse().wandb == "off" and parse("--wandb").wandb == "offline" and parse("--wandb", "online").wandb == "online"
    with pytest.raises(SystemExit):
        parse("--wandb", "sometimes")
    t = tracking.start(parse(), tmp_path, "x")
    t.log({"a": 1})
    t.finish()
    assert t.run is None and not (tmp_path / "wandb").exists()
    monkeypatch.setenv(tracking.ENV, "offline")
    assert parse().wandb == "offline"


def test_helpers():
    assert flat_numbers({"a": {"b": 1, "c": [1]}, "d": 2.5, "e": True}) == {"a/b": 1.0, "d": 2.5}


def test_column_means(tmp_path):
    (tmp_path / "c.csv").write_text("key,clipscore_x,caption\n1,0.5,a\n2,,b\n3,1.5,c\n")
    assert column_means(tmp_path / "c.csv") == {"mean/clipscore_x": 1.0}


@pytest.mark.slow  # a W&B run starts in 8-40 s on a busy 2-core machine
def test_stage_1_logs_throughput_offline_under_its_output_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write_scenes(tmp_path / "img" / "00000", n=2, seed=1, size=48)
    out = tmp_path / "vec"
    assert extract_vectors.main(["--root", str(tmp_path / "img"), "--out_dir", str(out), "--models", "llava",
                                 "--model-path", "tiny", "--num_workers", "0", "--device", "cpu", "--wandb"]) == 0
    runs = list((out / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"llava/images_per_s" in data and b"llava/images_written" in data
    assert (out / "llava" / "00000" / "manifest.json").exists()  # the store is untouched by the W&B folder
    assert not list(Path.cwd().glob("wandb"))  # nothing in the working directory (the git tree)
