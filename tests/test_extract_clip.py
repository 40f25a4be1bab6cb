"""Stage 2 end to end on offline reference models: tiny CLIP, tiny DINOv2 (with and without registers),
a tiny SigLIP folder and an open_clip ViT with random weights loaded from a checkpoint file.

Each run writes a complete store; every pooled vector is checked against a manual computation from the
model's own outputs (as documented in vlmc.extract.reference.POOL_DEFS); resume, the corrupt-image
policy and argument errors are covered too. Runs the CLI in-process (imports once) except for one
subprocess that checks the real exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vlmc.data.images import load_image
from vlmc.data.scenes import write_scenes
from vlmc.extract.extract_clip import build_parser, main
from vlmc.extract.reference import POOL_DEFS, tiny_reference_path
from vlmc.store.vectors import ShardReader
from vlmc.utils.io import read_json, safe_torch_load

REPO = Path(__file__).resolve().parents[1]
ATOL = 2e-3  # fp16 storage of O(1) values


@pytest.fixture(scope="module", autouse=True)
def lean_env(tmp_path_factory):
    """One torch thread and a private tiny-model cache (so the tiny builders run here too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("VLMC_CACHE")
    os.environ["VLMC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("VLMC_CACHE", None)
    else:
        os.environ["VLMC_CACHE"] = old


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two shards: s0 (5 scenes + one corrupt file) and s1 (3 scenes)."""
    root = tmp_path_factory.mktemp("img")
    write_scenes(root / "s0", n=5, seed=1, size=48)
    write_scenes(root / "s1", n=3, seed=2, size=48)
    (root / "s0" / "zz_broken.png").write_bytes(b"definitely not a png")
    return root


def extract(images: Path, out: Path, *args: str) -> None:
    rc = main(["--root", str(images), "--out_dir", str(out), "--num_workers", "0", "--batch_size", "3",
               "--save_every", "4", *args])
    assert rc == 0


def read_ref(out: Path, shard: str) -> tuple[list[str], torch.Tensor, dict]:
    """Keys, the [N, D] matrix and the manifest of one shard, read through ShardReader."""
    r = ShardReader.open(out / shard)
    keys, vecs = r.tokens("ref")  # per image one [D] vector
    for c in r.manifest["chunks"]:
        chunk = safe_torch_load(out / shard / c["files"]["ref"]["name"])
        assert set(chunk) == {"keys", "vecs"} and chunk["vecs"].dim() == 2 and chunk["vecs"].dtype == torch.float16
    mat = torch.stack([v.float() for v in vecs])
    assert mat.shape == (len(keys), r.manifest["ref"]["dim"]) and all(isinstance(k, str) for k in keys)
    return keys, mat, r.manifest


def shard_images(images: Path, shard: str, keys: list[str]):
    return [load_image(next(p for p in (images / shard).glob(f"{k}.*") if p.suffix != ".txt")) for k in keys]


def check_store(images: Path, out: Path, model_id: str, pool: str, manual) -> dict[str, torch.Tensor]:
    """Both shards complete, keys sorted, corrupt file counted, vectors == manual(images)."""
    mats = {}
    for shard, n in (("s0", 5), ("s1", 3)):
        keys, mat, m = read_ref(out, shard)
        assert m["complete"] and m["model"] == model_id and m["pool"] == pool and m["kinds"] == ["ref"]
        assert m["pool_definition"] == POOL_DEFS[(m["model_type"], pool)] and m["normalized"] is False
        assert len(keys) == n and keys == sorted(keys)
        if shard == "s0":
            assert m["n_skipped"] == 1 and m["n_images"] == 5
            (skip,) = [s for c in m["chunks"] for s in c["skipped"]]
            assert skip["key"] == "zz_broken" and skip["reason"].startswith("not_an_image")
        with torch.inference_mode():
            expected = manual(shard_images(images, shard, keys)).float()
        torch.testing.assert_close(mat, expected, atol=ATOL, rtol=2e-3)
        assert mat.std(0).max() > 1e-3, "reference vectors do not depend on the image"
        mats[shard] = mat
    return mats


# -- HF backends -------------------------------------------------------------------------------------


def test_tiny_clip_cls_is_projected_image_features_and_mean_is_post_ln_patch_mean(images, tmp_path):
    from transformers import AutoImageProcessor, CLIPModel

    extract(images, tmp_path / "cls", "--model_id", "tiny-clip", "--pool", "cls")
    extract(images, tmp_path / "mean", "--model_id", "tiny-clip", "--pool", "mean")
    path = tiny_reference_path("tiny-clip")
    model, proc = CLIPModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)

    def px(ims):
        return proc(images=ims, return_tensors="pt")["pixel_values"]

    def cls(ims):
        out = model.get_image_features(pixel_values=px(ims))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def mean(ims):
        h = model.vision_model(pixel_values=px(ims)).last_hidden_state
        return model.vision_model.post_layernorm(h)[:, 1:].mean(1)

    c = check_store(images, tmp_path / "cls", "tiny-clip", "cls", cls)
    m = check_store(images, tmp_path / "mean", "tiny-clip", "mean", mean)
    assert c["s0"].shape[1] == model.config.projection_dim and m["s0"].shape[1] == model.config.vision_config.hidden_size
    man = read_json(tmp_path / "cls" / "s0" / "manifest.json")
    assert man["backend"] == "hf" and man["model_type"] == "clip" and man["model_class"] == "CLIPModel"
    assert man["source"] == str(path) and man["store_dtype"] == "fp16"


@pytest.mark.parametrize("model_id", ["tiny-dino", "tiny-dino-reg"])
def test_tiny_dino_cls_and_mean_exclude_cls_and_registers(model_id, images, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    extract(images, tmp_path / "cls", "--model_id", model_id, "--pool", "cls")
    extract(images, tmp_path / "mean", "--model_id", model_id, "--pool", "mean", "--shards", "s0,s1")
    path = tiny_reference_path(model_id)
    model, proc = AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)
    regs = getattr(model.config, "num_register_tokens", 0)
    assert regs == (2 if model_id == "tiny-dino-reg" else 0)

    def hidden(ims):
        return model(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"]).last_hidden_state

    n_patches = (model.config.image_size // model.config.patch_size) ** 2
    c = check_store(images, tmp_path / "cls", model_id, "cls", lambda ims: hidden(ims)[:, 0])
    m = check_store(images, tmp_path / "mean", model_id, "mean", lambda ims: hidden(ims)[:, -n_patches:].mean(1))
    assert not torch.allclose(c["s0"], m["s0"], atol=1e-2)
    assert read_json(tmp_path / "mean" / "s1" / "manifest.json")["model_type"] == "dino"


def test_siglip_folder_loads_through_from_pretrained(images, tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                                     text_config=dict(small, vocab_size=64, max_position_embeddings=16))).eval()
    folder = tmp_path / "tiny-siglip"
    model.save_pretrained(folder)
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    proc.save_pretrained(folder)
    extract(images, tmp_path / "cls", "--model_id", str(folder), "--pool", "cls")
    extract(images, tmp_path / "mean", "--model_id", str(folder), "--pool", "mean", "--model_type", "siglip")

    def px(ims):
        return proc(images=ims, return_tensors="pt")["pixel_values"]

    def cls(ims):
        out = model.get_image_features(pixel_values=px(ims))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    check_store(images, tmp_path / "cls", str(folder), "cls", cls)
    check_store(images, tmp_path / "mean", str(folder), "mean",
                lambda ims: model.vision_model(pixel_values=px(ims)).last_hidden_state.mean(1))


def test_dinov3_folder_excludes_its_register_tokens(images, tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8,
                                           num_register_tokens=3)).eval()
    proc = DINOv3ViTImageProcessor(size={"height": 32, "width": 32})
    folder = tmp_path / "tiny-dinov3"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    extract(images, tmp_path / "mean", "--model_id", str(folder), "--pool", "mean")

    def patches(ims):  # the last 16 tokens are the 4x4 patches, whatever precedes them
        return model(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"]).last_hidden_state[:, -16:]

    check_store(images, tmp_path / "mean", str(folder), "mean", lambda ims: patches(ims).mean(1))
    assert read_json(tmp_path / "mean" / "s0" / "manifest.json")["model_type"] == "dino"


# -- open_clip ---------------------------------------------------------------------------------------

OC_NAME = "ViT-S-32-alt"  # the smallest built-in open_clip ViT (43 M parameters, fp16 file 87 MB)


@pytest.fixture(scope="module")
def oc_checkpoint(tmp_path_factory) -> Path:
    """Random open_clip weights (pretrained=None) saved as a plain state_dict file."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model(OC_NAME, pretrained=None)
    path = tmp_path_factory.mktemp("oc") / "oc_random.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def test_open_clip_checkpoint_file_cls_and_mean(images, tmp_path, oc_checkpoint):
    import open_clip

    model_id = f"open_clip:{OC_NAME}"
    extract(images, tmp_path / "cls", "--model_id", model_id, "--pretrained", str(oc_checkpoint), "--pool", "cls")
    extract(images, tmp_path / "mean", "--model_id", model_id, "--pretrained", str(oc_checkpoint), "--pool", "mean")
    model, _, transform = open_clip.create_model_and_transforms(OC_NAME, pretrained=str(oc_checkpoint))
    model.eval()

    def px(ims):
        return torch.stack([transform(im) for im in ims])

    def mean(ims):  # independent of the stage's forward_intermediates path: the tower's own token output
        model.visual.output_tokens = True
        try:
            _, tokens = model.visual(px(ims))
        finally:
            model.visual.output_tokens = False
        return tokens.mean(1)

    c = check_store(images, tmp_path / "cls", model_id, "cls", lambda ims: model.encode_image(px(ims)))
    m = check_store(images, tmp_path / "mean", model_id, "mean", mean)
    assert c["s0"].shape[1] == model.visual.output_dim and m["s0"].shape[1] == model.visual.ln_post.normalized_shape[0]
    man = read_json(tmp_path / "cls" / "s1" / "manifest.json")
    assert man["backend"] == "open_clip" and man["pretrained"] == str(oc_checkpoint.resolve())


# -- store behaviour ---------------------------------------------------------------------------------


def test_skip_existing_rewrites_nothing_and_redoes_a_lost_chunk(images, tmp_path, capsys):
    args = ("--model_id", "tiny-clip")
    extract(images, tmp_path, *args)
    pts = sorted(tmp_path.rglob("*.pt"))
    assert len(pts) == 3  # s0: inputs 0-3 and 4-5 (one broken) -> 2 chunks; s1: 1 chunk
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pts}
    manifests = {p: read_json(p) for p in tmp_path.rglob("manifest.json")}
    extract(images, tmp_path, *args, "--skip_existing")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pts} == before
    # the manifest is rewritten (complete=true) with the same content; ShardWriter's resume adds
    # "pre"/"post": null (stage-1 shape fields it copies from any old manifest), hence the filter
    assert {p: {k: v for k, v in read_json(p).items() if k not in ("pre", "post")}
            for p in tmp_path.rglob("manifest.json")} == manifests
    lost = tmp_path / "s0" / "ref_vectors_00001.pt"
    lost.unlink()
    extract(images, tmp_path, *args, "--skip_existing")
    assert lost.read_bytes() == before[lost][1]
    assert {p: p.stat().st_mtime_ns for p in pts if p != lost} == {p: t for p, (t, _) in before.items() if p != lost}
    capsys.readouterr()
    assert main(["--root", str(images), "--out_dir", str(tmp_path), "--num_workers", "0", "--save_every", "4",
                 *args, "--pool", "mean", "--skip_existing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pool='cls'" in err[0]


def test_shard_reader_pooled_ref_is_n_by_d(images, tmp_path):
    extract(images, tmp_path, "--model_id", "tiny-dino", "--shards", "s1")
    keys, pooled = ShardReader.open(tmp_path / "s1").pooled("ref")
    assert pooled.shape == (3, 64) and len(keys) == 3


def test_help_states_every_pooling_definition():
    text = " ".join(build_parser().format_help().split())
    for (t, p), d in POOL_DEFS.items():
        assert f"{t} {p}: {' '.join(d.split())}" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root", "/nonexistent/dir"], "does not exist"),
        (["--model_type", "vit"], "unknown --ref_type 'vit'"),
        (["--pool", "max"], "unknown --pool 'max'"),
        (["--model_id", "tiny-clip", "--model_type", "dino"], "--ref_type dino does not fit tiny-clip"),
        (["--model_id", "open_clip:ViT-S-32-alt"], "needs --pretrained"),
        (["--model_id", "open_clip:NoSuchNet"], "no model config"),
        (["--model_id", "open_clip:ViT-S-32-alt", "--pretrained", "/nonexistent/w.pt"], "does not exist"),
        (["--model_id", "./no/such/folder"], "does not exist"),
        (["--model_id", "tiny-clip", "--pretrained", "laion"], "open_clip models only"),
        (["--batch_size", "0"], "--batch_size: must be >= 1"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message, images, tmp_path, capsys):
    rc = main(["--root", str(images), "--out_dir", str(tmp_path / "out"), "--num_workers", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error:" in err[0] and message in err[0], err


def test_cli_process_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "src/extract/extract_clip.py"), "--root", str(tmp_path / "nope"),
                           "--model_type", "dino"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


# -- scripts/clip.sh ---------------------------------------------------------------------------------

CLIP_SH = REPO / "scripts" / "clip.sh"


def script_env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(VLMC_SLURM_ENV="/nonexistent", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DEVICE="cpu", **kw)
    return env


def test_clip_sh_plain_bash_runs_every_shard_inline(images, tmp_path):
    out = tmp_path / "out"
    env = script_env(ROOT=str(images), OUT=str(out), REF_MODEL="tiny-dino", REF_POOL="mean",
                     EXTRA_ARGS="--num_workers 0 --save_every 4")
    r = subprocess.run(["bash", str(CLIP_SH), "--batch_size", "2"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--shards s0,s1" in r.stderr and "--resume" in r.stderr and "clip: done" in r.stderr
    for shard, n in (("s0", 5), ("s1", 3)):
        _, mat, m = read_ref(out, shard)
        assert m["complete"] and m["model"] == "tiny-dino" and m["pool"] == "mean" and mat.shape[0] == n


@pytest.mark.slurm
@pytest.mark.slow
def test_clip_sh_sbatch_array_end_to_end(slurm_cluster, images, tmp_path):
    """`sbatch --wait --array=0-1 scripts/clip.sh` from outside the repo: task N -> N-th shard, real CLI."""
    (tmp_path / "logs").mkdir()
    env = script_env(ROOT=str(images), OUT=str(tmp_path / "out"), REF_MODEL="tiny-clip")
    r = slurm_cluster.run(["sbatch", "--wait", "-c", "1", "--array=0-1", "--gres=none", str(CLIP_SH),
                           "--num_workers", "0"], env=env, cwd=tmp_path, check=False, timeout=600)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert r.returncode == 0, (r.stderr, logs)
    assert sorted(n.split("_")[-1] for n in logs) == ["0.out", "1.out"]
    assert any("--shards s0 " in t for t in logs.values()) and any("--shards s1 " in t for t in logs.values())
    for shard, n in (("s0", 5), ("s1", 3)):
        _, mat, m = read_ref(tmp_path / "out", shard)
        assert m["complete"] and mat.shape[0] == n
