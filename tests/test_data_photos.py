"""Bundled real photos and the committed sample set under sample/images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vlmc.data.images import discover_images, load_image, read_caption
from vlmc.data.make_sample import FIRST_INDEX, PHOTO_SHARD
from vlmc.data.make_sample import main as make_sample_main
from vlmc.data.photos import DEFAULT_MAX_SIDE, PHOTOS, available_photos, export_photos, load_photo
from vlmc.data.scenes import make_scene, parse_caption, write_scene

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "images"
REBUILD = "the generator or an encoder changed; rebuild with `python src/data/make_sample.py --overwrite`"


def test_every_listed_photo_is_bundled_offline():
    assert [p.key for p in available_photos()] == [p.key for p in PHOTOS]
    assert len({p.key for p in PHOTOS}) == len(PHOTOS)
    for p in PHOTOS:
        assert p.caption.endswith(".") and p.caption.count(".") == 1 and 20 < len(p.caption) < 200
        assert p.licence and p.origin


def test_load_photo_limits_the_longer_side():
    retina = next(p for p in PHOTOS if p.key == "retina")  # 1411 x 1411 in the package
    assert max(load_photo(retina, max_side=None).size) > DEFAULT_MAX_SIDE
    assert load_photo(retina).size == (DEFAULT_MAX_SIDE, DEFAULT_MAX_SIDE)


def test_export_photos(tmp_path):
    paths = export_photos(tmp_path, keys=["camera", "horse", "rocket"])
    assert [p.name for p in paths] == ["camera.jpg", "horse.png", "rocket.jpg"]  # alpha → PNG
    records = discover_images(tmp_path)
    assert [r.key for r in records] == ["camera", "horse", "rocket"]
    for r in records:
        assert read_caption(r) == next(p.caption for p in PHOTOS if p.key == r.key)
        assert load_image(r.path).mode == "RGB"


# ------------------------------------------------------------------------------------ committed sample
def test_sample_set_layout():
    records = discover_images(SAMPLE)
    by_shard = Counter(r.shard for r in records)
    assert by_shard == {"00000": 24, "00001": 24, PHOTO_SHARD: len(PHOTOS)}
    assert all(read_caption(r) for r in records)
    keys0 = {r.key for r in records if r.shard == "00000"}
    keys1 = {r.key for r in records if r.shard == "00001"}
    assert min(keys0) == f"{FIRST_INDEX:09d}" and len(keys0 & keys1) == 12  # repeated keys, other images
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size < 3_000_000


def test_sample_scenes_are_current(tmp_path):
    """The committed scene files are what the generator writes today (byte for byte) and caption truly."""
    for seed, shard, key in [(0, "00000", "000010000"), (1, "00001", "000010012"), (1, "00001", "000010035")]:
        path = write_scene(tmp_path, shard, key, seed=seed, size=224)
        committed = SAMPLE / shard / f"{key}.png"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: {REBUILD}"
        text = (SAMPLE / shard / f"{key}.txt").read_text()
        assert parse_caption(text) == make_scene(key, seed).attributes()


def test_sample_photo_is_current(tmp_path):
    (path,) = export_photos(tmp_path, keys=["chelsea"])
    assert (SAMPLE / PHOTO_SHARD / "chelsea.jpg").read_bytes() == path.read_bytes(), REBUILD


def test_make_sample_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    (out / "precious.csv").write_text("x")
    assert make_sample_main(["--out", str(out)]) == 2
    assert make_sample_main(["--out", str(out), "--overwrite"]) == 2
    assert "not part of a sample set" in capsys.readouterr().err
    assert (out / "precious.csv").exists()
