"""Vision-only loading (src/models/partial.py) on every family: bit-identical outputs, no LM parameter read.

Checkpoints are the families' offline tiny variants (written by ``save_pretrained``, llava and
qwen2.5vl in the legacy hub key layout) and the trained testbed models in sample/models.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from vlmc.models import partial
from vlmc.models.base import families, get_adapter
from vlmc.models.load import default_testbed_dir, load_vlm, resolve_source
from vlmc.train.testbed import TESTBED_FAMILIES
from vlmc.utils.cli import UsageError

try:
    from _models_util import shape_image
except ImportError:
    from tests._models_util import shape_image

REPO = Path(__file__).resolve().parents[1]
SOURCES = [(f, "tiny") for f in families()] + [
    (f, "testbed") for f in TESTBED_FAMILIES if (default_testbed_dir() / f / "config.json").is_file()
]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    old = os.environ.get("VLMC_CACHE")
    os.environ["VLMC_CACHE"] = str(tmp_path_factory.mktemp("vlmc_cache"))
    yield os.environ["VLMC_CACHE"]
    if old is None:
        os.environ.pop("VLMC_CACHE", None)
    else:
        os.environ["VLMC_CACHE"] = old


def mixed_images(n: int = 3) -> list:
    """Square and non-square pictures (Qwen: different grids within one batch)."""
    return [shape_image(i, 96, width=96 if i % 2 == 0 else 128) for i in range(n)]


def lm_params_off_meta(vlm) -> list[str]:
    prefixes = vlm.adapter.vision_prefixes
    return [n for n in partial.parameters_off_meta(vlm.model) if not partial.on_vision_side(n, prefixes)]


@pytest.mark.parametrize(("family", "source"), SOURCES, ids=[f"{f}-{s}" for f, s in SOURCES])
def test_vision_only_is_bit_identical_and_leaves_the_lm_on_meta(family, source):
    full = load_vlm(family, source)
    part = load_vlm(family, source, vision_only=True)
    assert part.vision_only and not full.vision_only
    ad = full.adapter
    images = mixed_images()
    a = ad.encode(full, ad.preprocess(full.processor, images, None))
    b = ad.encode(part, ad.preprocess(part.processor, images, None))
    for x, y in zip(a.pre + a.post, b.pre + b.post, strict=True):
        assert torch.equal(x, y)
    assert a.pre_grid == b.pre_grid and a.post_grid == b.post_grid
    with torch.no_grad():
        ra = ad.apply_connector(full, a.pre, a.pre_grid)
        rb = ad.apply_connector(part, b.pre, b.pre_grid)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb, strict=True))
    assert lm_params_off_meta(part) == []
    real = partial.parameters_off_meta(part.model)
    n_vision = sum(1 for n, _ in full.model.named_parameters() if partial.on_vision_side(n, ad.vision_prefixes))
    assert 0 < len(real) == n_vision < len(list(full.model.named_parameters()))


class CountingSafeOpen:
    """Wraps ``safetensors.safe_open`` to record every tensor actually read (keys and bytes)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.bytes = 0
        self._orig = safetensors.safe_open

    def __call__(self, *args, **kwargs):
        handle = self._orig(*args, **kwargs)
        counter = self

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                counter.keys.append(key)
                counter.bytes += t.numel() * t.element_size()
                return t

        return Handle()


@pytest.mark.parametrize("family", families())
def test_no_language_model_tensor_is_read(family, tmp_path, monkeypatch):
    """A save_pretrained checkpoint: only vision-side tensors are read; bytes read = vision-side bytes."""
    ad = get_adapter(family)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_source(ad, "tiny"), ckpt)
    file_tensors = load_file(str(ckpt / "model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in file_tensors.values())
    counter = CountingSafeOpen()
    monkeypatch.setattr(partial, "safe_open", counter)
    model, _, report = partial.load_vision_only(ad, str(ckpt), torch.float32, torch.device("cpu"))
    rename = partial.key_renamer(model)
    vision_keys = {k for k in file_tensors if partial.on_vision_side(rename(k), ad.vision_prefixes)}
    assert set(counter.keys) == vision_keys and len(counter.keys) == len(vision_keys)
    assert report.bytes_read == counter.bytes == sum(
        file_tensors[k].numel() * file_tensors[k].element_size() for k in vision_keys
    )
    assert 0 < report.bytes_read < total and report.skipped == len(file_tensors) - len(vision_keys)
    assert all(not partial.on_vision_side(rename(k), ad.vision_prefixes) for k in set(file_tensors) - vision_keys)
    lm_real = [n for n, p in model.named_parameters()
               if p.device.type != "meta" and not partial.on_vision_side(n, ad.vision_prefixes)]  # fmt: skip
    assert lm_real == []
    assert report.materialised_bytes == sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


@pytest.mark.parametrize("family", families())
def test_config_source_builds_only_the_vision_side(family, monkeypatch):
    """``config:`` vision-only: random init of the vision side (model's own init), LM on meta, runs."""
    ad = get_adapter(family)
    path = resolve_source(ad, "tiny")
    monkeypatch.setitem(type(ad).real_configs, "test-small", lambda: AutoConfig.from_pretrained(path))
    monkeypatch.setattr(type(ad), "config_and_processor", lambda self, name: (self.real_configs[name](), self.load_processor(path)))
    vlm = load_vlm(family, "config:test-small", vision_only=True)
    assert vlm.vision_only and lm_params_off_meta(vlm) == []
    real = [p for p in vlm.model.parameters() if p.device.type != "meta"]
    assert real and all(torch.isfinite(p).all() for p in real)
    assert any(p.float().std() > 0 for p in real if p.ndim == 2)  # initialised, not left empty / zero
    cap = ad.encode(vlm, ad.preprocess(vlm.processor, mixed_images(2), None))
    assert all(torch.isfinite(t).all() for t in cap.pre + cap.post)


def test_missing_vision_tensors_is_a_usage_error(tmp_path):
    ad = get_adapter("llava")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_source(ad, "tiny"), ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "projector" not in k}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(UsageError, match="lacks .* vision-side tensor"):
        load_vlm("llava", str(ckpt), vision_only=True)


def test_attn_implementation_reaches_the_model():
    for vision_only in (False, True):
        vlm = load_vlm("llava", "tiny", vision_only=vision_only, attn_implementation="eager")
        assert vlm.model.config._attn_implementation == "eager"
        assert vlm.model.config.vision_config._attn_implementation == "eager"


def run_stage1(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "src/extract/extract_vectors.py"), *args],
                          capture_output=True, text=True, env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attn_implementation", "fancy"], "unknown --attn_implementation 'fancy'"),
        (["--attn_implementation", "flash_attention_2"], "not installed"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_stage1_bad_gpu_settings_exit_2(extra, message, tmp_path):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if "flash_attention_2" in extra:
        from vlmc.models.attention import installed

        if installed()["flash_attention_2"]:
            pytest.skip("flash_attn is installed here")
    proc = run_stage1("--root", str(tmp_path), "--models", "llava", "--model-path", "tiny", *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stage1_checkpoint_without_vision_tensors_exits_2(tmp_path):
    from vlmc.data.scenes import write_scenes

    write_scenes(tmp_path / "img" / "00000", n=2, seed=1, size=64)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_source(get_adapter("qwen2.5vl"), "tiny"), ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("visual.merger")}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    proc = run_stage1("--root", str(tmp_path / "img"), "--out_dir", str(tmp_path / "out"), "--models", "qwen2.5vl",
                      "--model-path", str(ckpt), "--num_workers", "0")  # fmt: skip
    assert proc.returncode == 2 and "vision-side tensor" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_stage1_vision_only_store_equals_full_model_store(tmp_path):
    """Stage 1's default (vision-only) writes the same chunk files as --full_model; LM --modules load all."""
    from vlmc.data.scenes import write_scenes

    root = tmp_path / "img"
    write_scenes(root / "00000", n=5, seed=3, size=64)
    common = ["--root", str(root), "--models", "qwen2.5vl", "--model-path", "tiny", "--num_workers", "0",
              "--batch_size", "2", "--save_every", "4"]  # fmt: skip
    for name, extra in (("vo", []), ("full", ["--full_model"])):
        proc = run_stage1(*common, "--out_dir", str(tmp_path / name), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = {p.relative_to(tmp_path / "vo"): p.read_bytes() for p in sorted((tmp_path / "vo").rglob("*.pt"))}
    b = {p.relative_to(tmp_path / "full"): p.read_bytes() for p in sorted((tmp_path / "full").rglob("*.pt"))}
    assert a and a == b
    proc = run_stage1(*common, "--out_dir", str(tmp_path / "lm"), "--modules", "model.language_model.norm",
                      "--max_items", "2")  # fmt: skip
    # the LM never runs in stage 1's encode, so a module there captures nothing: what matters is that the
    # whole model was loaded for it (logged) instead of failing on meta weights
    assert "loading the whole model" in proc.stderr


def test_sharded_checkpoint_reads_only_vision_shards_tensors(tmp_path):
    """A sharded save_pretrained folder (safetensors index): same outputs, LM tensors unread."""
    full = load_vlm("llava", "tiny")
    ckpt = tmp_path / "sharded"
    full.model.save_pretrained(ckpt, max_shard_size="100KB")
    full.processor.save_pretrained(ckpt)
    assert (ckpt / partial.INDEX_FILE).is_file() and len(partial.checkpoint_files(ckpt)) > 2
    part = load_vlm("llava", str(ckpt), vision_only=True)
    images = mixed_images(2)
    a = full.adapter.encode(full, full.adapter.preprocess(full.processor, images, None))
    b = part.adapter.encode(part, part.adapter.preprocess(part.processor, images, None))
    assert all(torch.equal(x, y) for x, y in zip(a.pre + a.post, b.pre + b.post, strict=True))
    _, _, report = partial.load_vision_only(part.adapter, str(ckpt), torch.float32, torch.device("cpu"))
    n_vision = sum(1 for n, _ in full.model.named_parameters() if partial.on_vision_side(n, part.adapter.vision_prefixes))
    assert report.tensors_read == n_vision and report.skipped > 0


@pytest.mark.parametrize("family", ["llava", "qwen3.5"])
def test_vision_only_bf16_is_bit_identical(family):
    full = load_vlm(family, "tiny", torch.bfloat16)
    part = load_vlm(family, "tiny", torch.bfloat16, vision_only=True)
    images = mixed_images(2)
    a = full.adapter.encode(full, full.adapter.preprocess(full.processor, images, None))
    b = part.adapter.encode(part, part.adapter.preprocess(part.processor, images, None))
    assert a.post[0].dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(a.pre + a.post, b.pre + b.post, strict=True))


def test_only_safetensors_folders_and_config_sources_load_vision_only(tmp_path):
    ad = get_adapter("llava")
    cpu = torch.device("cpu")
    assert partial.supported(ad, resolve_source(ad, "tiny"), cpu)
    assert partial.supported(ad, "config:llava-1.5-7b", cpu)
    assert not partial.supported(ad, "config:llava-1.5-7b", torch.device("meta"))
    assert not partial.supported(ad, "llava-hf/llava-1.5-7b-hf", cpu)  # an HF id: loaded whole
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert not partial.supported(ad, str(tmp_path), cpu)  # no safetensors: loaded whole
