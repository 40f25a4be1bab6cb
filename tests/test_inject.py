"""vlmc.eval.inject: stored E_post → captions for every family (round trip), storage dtypes, batching, cache."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from vlmc.data.scenes import write_scenes
from vlmc.eval import eval_captions, inject
from vlmc.extract import extract_vectors
from vlmc.models.base import families
from vlmc.models.load import load_vlm

torch.set_num_threads(1)
N_IMAGES = 8
STORAGE_CHANGES: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inject_img")
    write_scenes(root / "00000", n=N_IMAGES, seed=3, size=64, first_index=10000)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _extract(images: Path, out: Path, family: str, store_dtype: str) -> None:
    rc = extract_vectors.main(["--root", str(images), "--out_dir", str(out), "--models", family, "--model-path", "tiny",
                               "--store_dtype", store_dtype, "--num_workers", "0", "--batch_size", "8", "--device", "cpu"])
    assert rc == 0


def _captions(images: Path, vec: Path, out: Path, family: str, *extra: str) -> list[dict[str, str]]:
    rc = eval_captions.main(["--vec_dir", str(vec), "--embed_model", family, "--image_dir", str(images), "--out_dir",
                             str(out), "--device", "cpu", "--batch_size", "4", *extra])
    assert rc == 0
    return _rows(out / f"captions_{family}.csv")


@pytest.mark.parametrize("family", families())
def test_round_trip_and_storage_dtype_every_family(family, images, tmp_path):
    """caption_post_direct from an fp32 store == the model's own caption from the pixels, for every image;
    fp16 / bf16 storage: how many of the 8 captions change (printed, collected for the report)."""
    direct: dict[str, list[str]] = {}
    for dt in ("fp32", "fp16", "bf16"):
        _extract(images, tmp_path / f"vec_{dt}", family, dt)
        extra = ("--with_image_caption",) if dt == "fp32" else ()
        rows = _captions(images, tmp_path / f"vec_{dt}", tmp_path / f"cap_{dt}", family, *extra)
        assert [r["key"] for r in rows] == [f"{10000 + i:09d}" for i in range(N_IMAGES)]
        direct[dt] = [r["caption_post_direct"] for r in rows]
        if dt == "fp32":
            assert all(r["caption_post_direct"] == r["caption_image"] for r in rows), rows
            assert len(set(direct[dt])) >= 2, f"{family}: tiny model ignores its image: {set(direct[dt])}"
            assert all(r["caption_gt"] for r in rows)  # <key>.txt read
    changes = {dt: sum(a != b for a, b in zip(direct["fp32"], direct[dt], strict=True)) for dt in ("fp16", "bf16")}
    STORAGE_CHANGES[family] = changes
    print(f"\n[storage] {family}: captions changed vs fp32 store, of {N_IMAGES}: fp16 {changes['fp16']}, "
          f"bf16 {changes['bf16']}; distinct fp32 captions {len(set(direct['fp32']))}")
    assert all(0 <= v <= N_IMAGES for v in changes.values())


def test_batched_captions_equal_batch_one_and_keep_input_order(images):
    vlm = load_vlm("qwen2.5vl", "tiny")
    from vlmc.data.images import discover_images, load_image

    recs = discover_images(images)[:5]
    ims = [load_image(r.path) for r in recs]
    # two sizes: different token counts (Qwen) must never share a batch, output stays in input order
    ims[1] = ims[1].resize((64, 96))
    ims[3] = ims[3].resize((64, 96))
    cap = vlm.adapter.encode(vlm, vlm.adapter.preprocess(vlm.processor, ims, None))
    assert cap.post[1].shape != cap.post[0].shape
    batched = inject.caption_from_post(vlm, ims, cap.post, max_new_tokens=8, batch_size=4)
    single = [inject.caption_from_post(vlm, [im], [p], max_new_tokens=8, batch_size=1)[0] for im, p in zip(ims, cap.post, strict=True)]
    assert batched == single
    assert inject.caption_from_images(vlm, ims, max_new_tokens=8, batch_size=4) == batched


def test_shape_groups_and_select_samples():
    assert inject.shape_groups(["a", "b", "a", "a", "b"], 2) == [[0, 2], [3], [1, 4]]
    from vlmc.store.reader import Sample

    ss = [Sample(sh, f"{k:09d}", 0, "p", "q", k, (2, 2), (2, 2)) for sh in ("00000", "00001") for k in range(3)]
    assert [s.id for s in inject.select_samples(ss, shard_limit=2)] == [
        ("00000", "000000000"), ("00000", "000000001"), ("00001", "000000000"), ("00001", "000000001")]
    assert len(inject.select_samples(ss, max_items=4)) == 4
    assert {s.shard for s in inject.select_samples(ss, shards=["00001"])} == {"00001"}


def test_caption_cache_fingerprint_and_chunk_digest(tmp_path):
    from vlmc.store.reader import Sample

    s = Sample("00000", "000010000", 0, "pre.pt", "post.pt", 0, (2, 2), (2, 2))
    path = tmp_path / "cache" / "original_x.csv"
    c = inject.CaptionCache(path, {"prompt": "a"}, {"post.pt": "sha1"})
    assert c.get(s) is None
    c.put(s, "a red circle")
    c.flush()
    assert inject.CaptionCache(path, {"prompt": "a"}, {"post.pt": "sha1"}).get(s) == "a red circle"
    assert inject.CaptionCache(path, {"prompt": "b"}, {"post.pt": "sha1"}).get(s) is None  # other settings
    assert inject.CaptionCache(path, {"prompt": "a"}, {"post.pt": "sha2"}).get(s) is None  # re-extracted chunk
    assert _rows(path)[0]["key"] == "000010000"


def test_flat_image_root_matches_by_key(tmp_path):
    write_scenes(tmp_path / "flat", n=2, seed=0, size=32, first_index=10000)
    flat = tmp_path / "flat"
    idx = inject.ImageIndex(flat)
    assert idx.flat and idx.record("00007", "000010001").key == "000010001"
    assert idx.record("00007", "nope") is None


def test_qwen3vl_deepstack_flag_reaches_the_model_and_is_fingerprinted(images, tmp_path):
    from vlmc.eval import eval_perturb

    _extract(images, tmp_path / "vec", "qwen3vl", "fp32")
    caps = {}
    for ds in ("original", "zero"):
        out = tmp_path / ds
        assert eval_perturb.main(["--vec_dir", str(tmp_path / "vec"), "--model_name", "qwen3vl", "--image_dir", str(images),
                                  "--out_dir", str(out), "--mode", "none", "--deepstack", ds, "--max_new_tokens", "12",
                                  "--device", "cpu"]) == 0
        r = _rows(out / "perturb_qwen3vl_none_0.csv")
        assert all(x["caption_perturbed"] == x["caption_original"] for x in r)
        assert f'"deepstack": "{ds}"' in (out / "perturb_qwen3vl_none_0.csv.run.json").read_text()
        caps[ds] = [x["caption_original"] for x in r]
    assert caps["original"] != caps["zero"]  # the deepstack features matter: 'original' leaks the image
