"""Preprocessing on the compute device: workers decode to uint8 tensors, the model's own image
processor runs batched on ``device`` (here ``cpu`` tensors), bit-identical to the PIL path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmc.extract.vectors import UINT8_KEY, VLMEncoder, resolve_preprocess_on
from vlmc.models.base import families
from vlmc.models.load import load_vlm
from vlmc.utils.cli import UsageError

try:
    from _models_util import shape_image
except ImportError:
    from tests._models_util import shape_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    old = os.environ.get("VLMC_CACHE")
    os.environ["VLMC_CACHE"] = str(tmp_path_factory.mktemp("vlmc_cache"))
    yield
    if old is None:
        os.environ.pop("VLMC_CACHE", None)
    else:
        os.environ["VLMC_CACHE"] = old


def images() -> list:
    """Mixed sizes and aspect ratios (Qwen: a different grid per image; Idefics2: padded batches), a grey one."""
    ims = [shape_image(i, 96, width=w) for i, w in enumerate((96, 128, 72, 160))]
    ims.append(shape_image(5, 80).convert("L"))
    return ims


@pytest.mark.parametrize("img_size", [None, 64], ids=["own-size", "img64"])
@pytest.mark.parametrize("family", families())
def test_device_preprocessing_is_bit_identical(family, img_size):
    vlm = load_vlm(family, "tiny", vision_only=True)
    ad = vlm.adapter
    ims = images()
    cpu = ad.preprocess(vlm.processor, ims, img_size)
    u8 = ad.image_tensors(ims, img_size)
    assert all(t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3 for t in u8)
    dev = ad.preprocess_tensors(vlm.processor, u8, img_size, torch.device("cpu"))
    assert set(dev) == set(cpu)
    for k in cpu:
        assert dev[k].dtype == cpu[k].dtype and torch.equal(dev[k], cpu[k]), k
    a = ad.encode(vlm, cpu)
    b = ad.encode(vlm, dev)
    assert all(torch.equal(x, y) for x, y in zip(a.pre + a.post, b.pre + b.post, strict=True))
    if family.startswith("qwen") and img_size is None:
        assert len(set(a.pre_grid)) > 1  # variable grids really exercised


def test_encoder_ships_uint8_from_workers_and_preprocesses_in_encode():
    vlm = load_vlm("qwen2.5vl", "tiny", vision_only=True)
    ims = images()
    on_device = VLMEncoder(vlm, preprocess_on="device")
    in_workers = VLMEncoder(vlm)
    shipped = on_device.preprocess(ims)
    assert list(shipped) == [UINT8_KEY] and all(t.dtype == torch.uint8 for t in shipped[UINT8_KEY])
    a = in_workers.encode(in_workers.preprocess(ims), [None] * len(ims))
    b = on_device.encode(shipped, [None] * len(ims))
    for kind in ("pre", "post"):
        assert all(torch.equal(x, y) for x, y in zip(a.vectors[kind], b.vectors[kind], strict=True))


def test_preprocess_location_choice():
    assert resolve_preprocess_on("auto", torch.device("cpu")) == "workers"
    assert resolve_preprocess_on("auto", torch.device("cuda")) == "device"
    assert resolve_preprocess_on("device", torch.device("cpu")) == "device"
    with pytest.raises(UsageError):
        resolve_preprocess_on("gpu", torch.device("cpu"))


@pytest.mark.slow
def test_stage1_store_identical_with_device_preprocessing(tmp_path):
    from vlmc.data.scenes import write_scenes

    root = tmp_path / "img"
    write_scenes(root / "00000", n=5, seed=4, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for where in ("workers", "device"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "src/extract/extract_vectors.py"), "--root", str(root), "--out_dir",
             str(tmp_path / where), "--models", "idefics2", "--model-path", "tiny", "--num_workers", "1",
             "--batch_size", "2", "--save_every", "4", "--preprocess", where],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = {p.relative_to(tmp_path / "workers"): p.read_bytes() for p in sorted((tmp_path / "workers").rglob("*.pt"))}
    b = {p.relative_to(tmp_path / "device"): p.read_bytes() for p in sorted((tmp_path / "device").rglob("*.pt"))}
    assert a and a == b
