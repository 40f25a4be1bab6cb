"""Synthetic scenes: determinism per key, caption truth (text and pixels), parsing, scoring, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlmc.data.images import discover_images, load_image, read_caption
from vlmc.data.scenes import (
    ATTRIBUTES,
    COLOURS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    attribute_accuracy,
    attribute_scores,
    caption,
    generate_scenes,
    main,
    make_scene,
    parse_caption,
    render_scene,
    scene_key,
    shard_of,
    write_scene,
    write_scenes,
)

KEYS = [scene_key(10_000 + i) for i in range(500)]
SCRIPT = Path(__file__).resolve().parents[1] / "src" / "data" / "scenes.py"


def _scene(*objs: tuple[str, str, str, str]) -> Scene:
    return Scene(tuple(SceneObject(*o) for o in objs))


# ---------------------------------------------------------------------------------------- determinism
def test_scene_depends_only_on_seed_and_key():
    assert make_scene("000010000", 0) == make_scene("000010000", 0)
    forward = [make_scene(k, 3) for k in KEYS[:50]]
    backward = [make_scene(k, 3) for k in reversed(KEYS[:50])][::-1]
    assert forward == backward
    assert len({caption(make_scene(k, 0)) for k in KEYS[:50]}) > 40
    assert sum(make_scene(k, 0) != make_scene(k, 1) for k in KEYS[:50]) >= 49
    assert make_scene("10000", 0) != make_scene("000010000", 0)  # keys are strings, not numbers


def test_generator_pinned():
    """Changing the generator silently would change every dataset built from a seed: pin one caption."""
    assert caption(make_scene("000010000", 0)) == (
        "two objects: a large green triangle at the top left and a large blue cross at the bottom."
    )


def test_render_deterministic_and_sized():
    scene = make_scene("000010003", 0)
    a, b = render_scene(scene, 96), render_scene(scene, 96)
    assert a.mode == "RGB" and a.size == (96, 96)
    assert a.tobytes() == b.tobytes()
    assert render_scene(scene).size == (224, 224)


# ------------------------------------------------------------------------------------- scene contents
def test_attribute_ranges_and_coverage():
    scenes = [make_scene(k, 0) for k in KEYS]
    seen: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    for s in scenes:
        positions = [o.position for o in s.objects]
        assert 1 <= len(s.objects) <= MAX_OBJECTS
        assert len(set(positions)) == len(positions)
        assert positions == sorted(positions, key=POSITIONS.index)
        seen["count"][len(s.objects)] += 1
        for o in s.objects:
            for attr in ATTRIBUTES[:4]:
                seen[attr][getattr(o, attr)] += 1
    assert set(seen["shape"]) == set(SHAPES) and set(seen["colour"]) == set(COLOURS)
    assert set(seen["size"]) == set(SIZES) and set(seen["position"]) == set(POSITIONS)
    assert set(seen["count"]) == set(range(1, MAX_OBJECTS + 1))


def _close(rgb, ref, tol) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, ref, strict=True))


def test_pixels_tell_the_same_truth_as_the_caption():
    size = 192
    cell = size / 3
    for key in KEYS[:40]:
        scene = make_scene(key, 0)
        im = render_scene(scene, size)
        occupied = set()
        for o in scene.objects:
            row, col = divmod(POSITIONS.index(o.position), 3)
            occupied.add((row, col))
            xy = (int((col + 0.5 + o.dx) * cell), int((row + 0.5 + o.dy) * cell))
            assert _close(im.getpixel(xy), COLOURS[o.colour], 3), (key, o)
        for row in range(3):
            for col in range(3):
                if (row, col) not in occupied:
                    r, g, b = im.getpixel((int((col + 0.5) * cell), int((row + 0.5) * cell)))
                    assert min(r, g, b) > 190 and max(r, g, b) - min(r, g, b) < 16, (key, row, col)


def test_large_is_larger_than_small():
    def ink(scene: Scene) -> int:
        im = render_scene(scene, 96).convert("L")
        return sum(v < 200 for v in im.getdata())

    for shape in SHAPES:
        small = ink(_scene((shape, "blue", "small", "center")))
        large = ink(_scene((shape, "blue", "large", "center")))
        assert large > 3 * small > 0, shape


# -------------------------------------------------------------------------------------------- parsing
def test_caption_round_trips_for_500_scenes():
    for key in KEYS:
        scene = make_scene(key, 7)
        text = caption(scene)
        assert text.endswith(".") and "\n" not in text
        assert parse_caption(text) == scene.attributes(), text


def test_caption_grammar_examples():
    assert (
        caption(_scene(("circle", "red", "large", "left"))) == "one object: a large red circle on the left."
    )
    three = _scene(
        ("star", "yellow", "small", "top"),
        ("square", "blue", "large", "center"),
        ("cross", "purple", "small", "bottom right"),
    )
    assert caption(three) == (
        "three objects: a small yellow star at the top, a large blue square in the center"
        " and a small purple cross at the bottom right."
    )


def test_parse_free_text():
    got = parse_caption(
        "There is a big Red circle in the upper left corner, and a tiny violet star in the middle!"
    )
    assert got == {
        "count": 2,
        "objects": [
            {"shape": "circle", "colour": "red", "size": "large", "position": "top left"},
            {"shape": "star", "colour": "purple", "size": "small", "position": "center"},
        ],
    }
    assert parse_caption("On the right, a green square.")["objects"][0]["position"] == "right"
    assert parse_caption("a blue triangle")["objects"] == [
        {"shape": "triangle", "colour": "blue", "size": None, "position": None}
    ]
    assert parse_caption("I see 5 shapes")["count"] == 5


# -------------------------------------------------------------------------------------------- scoring
def test_scores_perfect_partial_and_order_free():
    scene = _scene(("circle", "red", "large", "top left"), ("square", "blue", "small", "center"))
    truth = caption(scene)
    assert attribute_scores(truth, scene) == {a: 1.0 for a in (*ATTRIBUTES, "mean")}
    swapped = "a small blue square in the center and a large red circle at the top left"
    assert attribute_scores(swapped, scene)["mean"] == 1.0  # no count word: count = 2 shapes mentioned
    wrong_colour = "two objects: a large green circle at the top left and a small blue square in the center."
    s = attribute_scores(wrong_colour, scene)
    assert s["colour"] == 0.5 and s["shape"] == s["size"] == s["position"] == s["count"] == 1.0
    assert s["mean"] == pytest.approx(0.9)
    one = attribute_scores("a red circle", scene)
    assert one["shape"] == one["colour"] == 0.5 and one["size"] == one["position"] == 0.0
    assert one["count"] == 0.0
    assert attribute_accuracy(truth, scene.attributes()) == attribute_accuracy(truth, truth) == 1.0


@pytest.mark.parametrize(
    "junk",
    [
        None,
        "",
        "   ",
        "asdf qwer 1234 !!!",
        "🙂🙂 ünïcödé ☃",
        "the the the " * 2000,
        "circle " * 500,
        "\x00\x01",
    ],
)
def test_scores_survive_junk(junk):
    scene = make_scene("000010001", 0)
    s = attribute_scores(junk, scene)
    assert set(s) == {*ATTRIBUTES, "mean"}
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert 0.0 <= attribute_accuracy(junk, caption(scene)) <= 1.0
    if junk is None or "circle" not in junk:
        assert s["shape"] == s["colour"] == s["size"] == s["position"] == 0.0


def test_scores_with_no_true_objects():
    empty = Scene(())
    assert attribute_scores("nothing here", empty)["mean"] == 1.0
    assert attribute_scores("a red circle", empty)["shape"] == 0.0


# -------------------------------------------------------------------------------------- writing / CLI
def test_write_scene_is_readable_by_the_image_layer(tmp_path):
    path = write_scene(tmp_path, "s", "000010000", seed=0, size=64)
    assert path == tmp_path / "s" / "000010000.png"
    (rec,) = discover_images(tmp_path)
    assert rec.id == ("s", "000010000")
    assert parse_caption(read_caption(rec)) == make_scene("000010000", 0).attributes()
    assert load_image(rec.path).tobytes() == render_scene(make_scene("000010000", 0), 64).tobytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_generate_scenes_shards_and_keys(tmp_path):
    written = generate_scenes(tmp_path, n=6, shards=4, seed=0, size=48, first_index=10_000)
    assert [shard_of(i, 6, 4) for i in range(6)] == [0, 0, 1, 2, 2, 3]
    assert written[0] == ("00000", "000010000") and written[-1] == ("00003", "000010005")
    assert [r.id for r in discover_images(tmp_path)] == written


def test_parallel_generation_writes_the_same_files(tmp_path):
    """Two rendering processes write byte-identical scenes to one (scenes are pure functions of the key)."""
    one = generate_scenes(tmp_path / "a", n=130, shards=2, seed=3, size=40)
    two = generate_scenes(tmp_path / "b", n=130, shards=2, seed=3, size=40, workers=2)
    assert one == two
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 260 and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_write_scenes_into_one_shard_folder(tmp_path):
    paths = write_scenes(tmp_path / "img" / "s", n=3, seed=2, size=40, first_index=7)
    assert [p.name for p in paths] == ["000000007.png", "000000008.png", "000000009.png"]
    recs = discover_images(tmp_path / "img")
    assert [r.id for r in recs] == [("s", "000000007"), ("s", "000000008"), ("s", "000000009")]
    assert all(parse_caption(read_caption(r)) == make_scene(r.key, 2).attributes() for r in recs)


def test_cli_writes_and_rejects_bad_args(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--n", "3", "--shards", "2", "--size", "40", "--no-progress"]) == 0
    assert len(discover_images(out)) == 3
    assert main(["--out", str(out), "--n", "2", "--shards", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--shards must be between 1 and --n" in err and "\n" not in err
    assert main(["--out", str(out), "--n", "1", "--size", "8"]) == 2
    assert main(["--out", str(out), "--n", "1", "--workers", "-1"]) == 2


def test_cli_help_as_a_script():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--out", "--n", "--shards", "--seed", "--size", "--first-index", "--workers", "--no-progress"):
        assert flag in res.stdout
    assert "(default: 1000)" in res.stdout and "(default: 224)" in res.stdout


def test_captions_seen_in_training_are_counted(tmp_path):
    """Held-out keys can repeat a training caption (finite grammar): the evaluation set's report counts them."""
    from vlmc.data import scenes as S

    train = {S.caption(S.make_scene(S.scene_key(i), 0)) for i in range(300)}
    keys = [S.scene_key(30000 + i) for i in range(40)]
    want = sum(S.caption(S.make_scene(k, 0)) in train for k in keys)
    assert S.captions_seen(keys, 0, 300) == want
    assert S.main(["--out", str(tmp_path / "ev"), "--n", "40", "--first-index", "30000", "--count-seen", "300",
                   "--no-progress", "--size", "32"]) == 0
    rep = json.loads((tmp_path / "ev" / "scenes.json").read_text())
    assert rep["n"] == 40 and rep["captions_seen_in_training"]["count"] == want
    assert rep["captions_seen_in_training"]["train_keys"] == [0, 300]
