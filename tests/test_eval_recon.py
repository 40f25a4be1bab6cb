"""export_recon and eval_recon: held-out only, real connector re-projection, resume, untouched stats; tiny LLaVA."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmc.eval import eval_recon
from vlmc.models.base import Correspondence, FamilyAdapter, get_adapter, register
from vlmc.store import recon_run
from vlmc.store.vectors import ShardReader, find_shard_dirs
from vlmc.train import export_recon, train_recon
from vlmc.utils.cli import UsageError

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from synthetic_store import synthetic_connector, write_synthetic_store
except ImportError:
    from tests.synthetic_store import synthetic_connector, write_synthetic_store

torch.set_num_threads(1)
FAMILY = "synthgelu-test"
CONNECTOR = synthetic_connector("gelu", 8, 12, seed=3)
ROOT = Path(__file__).resolve().parents[1]


class SynthAdapter(FamilyAdapter):
    """A family whose 'model' is the synthetic GELU connector (exercises the adapter path offline)."""

    name = FAMILY
    default_id = "synthetic"
    correspondence = Correspondence("1:1")

    def load_pretrained(self, path, dtype, device):
        return nn.Identity(), None

    def apply_connector(self, vlm, pre, pre_grid):
        return [CONNECTOR(p, g) for p, g in zip(pre, pre_grid, strict=True)]


@pytest.fixture(scope="module", autouse=True)
def synth_family():
    """Register the synthetic family for this module only (a global registration would leak into the
    families() that other test modules parametrise over)."""
    from vlmc.models import base

    base._import_families()
    register(SynthAdapter)
    yield
    base._REGISTRY.pop(FAMILY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic store (keys repeat across shards) and a trained mlp reconstructor on it."""
    root = tmp_path_factory.mktemp("evalrecon")
    keys = [f"{i:09d}" for i in range(10000, 10020)]
    store = write_synthetic_store(root / "vec" / "synth", CONNECTOR, "1:1", (4, 4), 8, {"00000": keys, "00001": keys},
                                  save_every=8, family=FAMILY)
    out = root / "model"
    rc = train_recon.main(["--vec_dir", str(root / "vec"), "--embed_model", "synth", "--out_dir", str(out),
                           "--model_type", "mlp", "--hidden_size", "32", "--epochs", "3", "--num_workers", "0",
                           "--batch_size", "4", "--train_split", "0.75"])
    assert rc == 0
    return store, out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ids(out, part="test"):
    return {tuple(x) for x in json.loads((out / "split.json").read_text())[part]}


def test_export_is_a_stage1_store_of_held_out_images_with_the_real_connector(trained, tmp_path):
    store, out = trained
    stats = (out / "normalization.safetensors").read_bytes()
    base = tmp_path / "vector_recon"
    argv = ["--model_dir", str(out), "--out_base", str(base), "--num_workers", "0", "--batch_size", "3"]
    assert export_recon.main(argv) == 0
    exported = {}
    for d in find_shard_dirs(base / "synth_recon"):
        r = ShardReader.open(d)
        keys, pre = r.tokens("pre")
        _, post = r.tokens("post")
        assert r.manifest["post_source"] == "reprojected" and r.manifest["model"] == "synth_recon"
        for k, a, b in zip(keys, pre, post, strict=True):
            torch.testing.assert_close(b, CONNECTOR(a, (4, 4)))  # Ê_post = connector(Ê_pre)
            exported[(r.shard, k)] = a
    assert set(exported) == _ids(out)
    run = recon_run.open_run(out, torch.device("cpu"))
    s = run.part("test")[0]
    post = torch.load(s.post_file, weights_only=True)["vecs"][s.row]
    torch.testing.assert_close(exported[s.id], recon_run.reconstruct(run, post[None], (4, 4), (4, 4), False)[0])
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*.pt")}
    assert export_recon.main([*argv, "--skip_existing"]) == 0
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*.pt")} == before  # resumed: nothing rewritten
    assert (out / "normalization.safetensors").read_bytes() == stats


def test_eval_recon_held_out_rows_maps_resume_and_untouched_stats(trained, tmp_path):
    store, out = trained
    stats = (out / "normalization.safetensors").read_bytes()
    ev = tmp_path / "ev"
    argv = ["--model_dir", str(out), "--out_dir", str(ev), "--num_workers", "0", "--batch_size", "4", "--save_every", "2"]
    assert eval_recon.main(argv) == 0
    rows = _rows(ev / "per_sample.csv")
    assert {(r["shard"], r["key"]) for r in rows} == _ids(out) and len(rows) == len(_ids(out))
    assert all(r["key"].startswith("0000100") and r["model"] == "synth" and r["reproj_cosine"] for r in rows)
    assert json.loads((ev / "summary.json").read_text())["split"] == "test"
    maps = torch.load(ev / "loss_maps.pt", weights_only=True)
    assert maps["maps"].shape == (len(rows), 4, 4) and maps["keys"] == [r["key"] for r in rows]
    torch.testing.assert_close(maps["maps"].mean((1, 2)), torch.tensor([float(r["mse_pre"]) for r in rows]), rtol=1e-4, atol=1e-6)
    shard_csv = ev / "per_shard" / "00000.csv"
    kept = _rows(shard_csv)[:2]  # simulate a run killed after two rows of shard 00000
    eval_recon.write_rows(shard_csv, kept, eval_recon.FIELDS)
    assert eval_recon.main([*argv, "--resume"]) == 0
    again = _rows(ev / "per_sample.csv")
    assert again == rows  # same rows, no duplicates, keys still strings
    assert len(_rows(shard_csv)) == sum(r["shard"] == "00000" for r in rows)
    assert (out / "normalization.safetensors").read_bytes() == stats


def test_another_store_is_held_out_whole_and_a_foreign_model_is_refused(trained, tmp_path):
    """Trained on one image set, evaluated on another (same shard names, other keys): every image of the
    other store is held out, the training store keeps its split, and a store of other widths is refused."""
    _, out = trained
    keys = [f"{i:09d}" for i in range(20000, 20006)]
    write_synthetic_store(tmp_path / "vec" / "synth", CONNECTOR, "1:1", (4, 4), 8, {"00000": keys, "00001": keys[:2]},
                                  save_every=8, family=FAMILY, seed=9)
    run = recon_run.open_run(out, torch.device("cpu"), str(tmp_path / "vec"), "synth")
    assert [s.id for s in run.part("test")] == [s.id for s in run.part("all")] and len(run.part("all")) == 8
    with pytest.raises(UsageError, match="not in the store"):
        run.part("train")  # its training images are elsewhere
    ev = tmp_path / "ev"
    assert eval_recon.main(["--model_dir", str(out), "--vec_dir", str(tmp_path / "vec"), "--out_dir", str(ev),
                            "--num_workers", "0"]) == 0
    assert {(r["shard"], r["key"]) for r in _rows(ev / "per_sample.csv")} == {("00000", k) for k in keys} | {
        ("00001", k) for k in keys[:2]}
    own = recon_run.open_run(out, torch.device("cpu"))
    assert {s.id for s in own.part("test")} == _ids(out) and {s.id for s in own.part("val")} == _ids(out, "val")
    wide = write_synthetic_store(tmp_path / "wide" / "synth", synthetic_connector("gelu", 6, 12, seed=3), "1:1", (4, 4), 6,
                                 {"00000": keys}, save_every=8, family=FAMILY)
    with pytest.raises(UsageError, match="another model"):
        recon_run.open_run(out, torch.device("cpu"), str(wide.parent), "synth")


def test_eval_no_reproj_leaves_reprojection_columns_empty(trained, tmp_path):
    _, out = trained
    ev = tmp_path / "ev"
    assert eval_recon.main(["--model_dir", str(out), "--out_dir", str(ev), "--num_workers", "0", "--no_reproj", "--limit", "3"]) == 0
    rows = _rows(ev / "per_sample.csv")
    assert len(rows) == 3 and all(r["reproj_mse"] == "" and r["cosine_pre"] for r in rows)
    assert "skipped" in json.loads((ev / "summary.json").read_text())["reproj"]


@pytest.fixture(scope="module")
def tiny_llava_store(tmp_path_factory):
    try:
        get_adapter("llava")
    except UsageError:
        pytest.skip("llava adapter not available")
    from vlmc.extract import extract_vectors

    out = tmp_path_factory.mktemp("tinyllava") / "vec"
    rc = extract_vectors.main(["--root", str(ROOT / "sample" / "images"), "--models", "llava", "--model-path", "tiny",
                               "--out_dir", str(out), "--device", "cpu", "--num_workers", "0", "--max_items", "40"])
    assert rc == 0
    return out / "llava"


def test_tiny_llava_mlp_beats_linear_and_reprojects(tiny_llava_store, tmp_path):
    common = ["--vec_dir", str(tiny_llava_store), "--num_workers", "0", "--train_split", "0.7"]
    assert train_recon.main([*common, "--out_dir", str(tmp_path / "lin"), "--model_type", "linear"]) == 0
    assert train_recon.main([*common, "--out_dir", str(tmp_path / "mlp"), "--model_type", "mlp", "--hidden_size", "128",
                             "--epochs", "10", "--lr", "3e-3", "--warmup_steps", "5", "--batch_size", "4"]) == 0

    def val(d):
        return torch.load(tmp_path / d / "best_model.pt", weights_only=True)["meta"]["val_loss"]

    assert val("mlp") < val("lin")
    ev = tmp_path / "ev"
    assert eval_recon.main(["--model_dir", str(tmp_path / "mlp"), "--out_dir", str(ev), "--num_workers", "0"]) == 0
    rows = _rows(ev / "per_sample.csv")
    assert rows and all(0.5 < float(r["reproj_cosine"]) <= 1.0 + 1e-6 for r in rows)


def test_single_store_reports_test_never_the_selection_split(trained, tmp_path):
    """split.json holds three disjoint parts; every number stages 5-7 report comes from test, never from the
    images that fitted (train) or selected (val: ridge, best epoch, early stop) the reconstructor."""
    _, out = trained
    split = json.loads((out / "split.json").read_text())
    parts = {p: {tuple(x) for x in split[p]} for p in ("train", "val", "test")}
    assert all(parts.values()) and sum(map(len, parts.values())) == 40 == len(set().union(*parts.values()))
    selection = parts["train"] | parts["val"]
    ev = tmp_path / "ev"
    assert eval_recon.main(["--model_dir", str(out), "--out_dir", str(ev), "--num_workers", "0", "--no_reproj"]) == 0
    reported = {(r["shard"], r["key"]) for r in _rows(ev / "per_sample.csv")}
    assert reported == parts["test"] and not reported & selection
    run = recon_run.open_run(out, torch.device("cpu"))
    assert not {s.id for s in run.part("test")} & selection
    assert {run.part_of(s) for s in run.part("all")} == {"train", "val", "test"}


def _pngs(root: Path, ids, shade: int) -> Path:
    from PIL import Image

    for n, (shard, key) in enumerate(ids):
        (root / shard).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), ((n * 7 + shade) % 256, n % 256, shade % 256)).save(root / shard / f"{key}.png")
    return root


def test_colliding_ids_are_evaluated_or_refused_never_dropped(trained, tmp_path, capsys):
    """Another store whose (shard, key) ids collide with train/val ids: refused with a count without content
    hashes; with them, evaluated when the file differs, refused when it is the same image."""
    _, out = trained
    keys = [f"{i:09d}" for i in range(10000, 10020)]  # the training store's ids
    write_synthetic_store(tmp_path / "vec" / "synth", CONNECTOR, "1:1", (4, 4), 8, {"00000": keys}, save_every=8,
                          family=FAMILY, seed=9)
    ev = ["--vec_dir", str(tmp_path / "vec"), "--num_workers", "0", "--no_reproj"]
    split = json.loads((out / "split.json").read_text())
    n_seen = sum(1 for s, k in split["train"] + split["val"] if s == "00000")
    assert eval_recon.main(["--model_dir", str(out), "--out_dir", str(tmp_path / "o"), *ev]) == 2
    assert f"error: {n_seen} image(s) of synth's store share (shard, key) ids" in capsys.readouterr().err
    # the same reconstructor recipe, trained with content hashes of its image files
    train_ids = [(s, k) for s in ("00000", "00001") for k in keys]
    hashed = tmp_path / "hashed"
    assert train_recon.main(["--vec_dir", str(out.parent / "vec"), "--embed_model", "synth", "--out_dir", str(hashed),
                             "--model_type", "linear", "--num_workers", "0", "--train_split", "0.75",
                             "--image_root", str(_pngs(tmp_path / "img_train", train_ids, 0))]) == 0
    assert set(json.loads((hashed / "split.json").read_text())["sha256"]) == {
        f"{s}/{k}" for p in ("train", "val") for s, k in json.loads((hashed / "split.json").read_text())[p]}
    other = _pngs(tmp_path / "img_other", [("00000", k) for k in keys], 101)  # same ids, other pictures
    o2 = tmp_path / "o2"
    assert eval_recon.main(["--model_dir", str(hashed), "--out_dir", str(o2), "--image_root", str(other), *ev]) == 0
    summary = json.loads((o2 / "summary.json").read_text())
    assert summary["n"] == 20 and summary["n_id_collisions"] == n_seen_hashed(hashed) > 0
    leak = _pngs(tmp_path / "img_leak", [("00000", k) for k in keys], 101)
    (leak / "00000" / f"{keys[5]}.png").write_bytes((tmp_path / "img_train" / "00000" / f"{keys[3]}.png").read_bytes())
    capsys.readouterr()
    assert eval_recon.main(["--model_dir", str(hashed), "--out_dir", str(tmp_path / "o3"), "--image_root", str(leak),
                            *ev]) == 2
    assert "error: 1 held-out image(s) have the same file content" in capsys.readouterr().err


def n_seen_hashed(model_dir: Path) -> int:
    split = json.loads((model_dir / "split.json").read_text())
    return sum(1 for s, _ in split["train"] + split["val"] if s == "00000")
