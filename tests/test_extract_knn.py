"""Stage 3 (src/extract/extract_knn.py + vlmc.extract.geometry) on small synthetic multi-shard stores."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmc.extract.extract_knn import main
from vlmc.extract.geometry import (
    align,
    effective_ks,
    load_space,
    neighbours,
    parse_ks,
    parse_ref,
    shard_groups,
)
from vlmc.store.vectors import ShardReader, ShardWriter, digest_keys, find_shard_dirs, pack
from vlmc.utils.cli import UsageError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "src" / "extract" / "extract_knn.py"
T, D = 6, 12
# keys repeat across shards (like the sample run's 00000 / 00001) and look like numbers
KEYS = [f"{10000 + i:09d}" for i in range(20)]  # "000010000", ...


def write_vec_store(root: Path, shards: dict[str, dict[str, torch.Tensor]], *, ref: bool = False) -> Path:
    """A store ``<root>/<shard>/``: ``shards[shard] = {key: tokens [T, D]}`` (stage-1 pre + post),
    or with ``ref`` ``{key: vector [D]}`` (stage-2 kind ``ref``)."""
    for shard, items in shards.items():
        keys = list(items)
        kinds = ["ref"] if ref else ["pre", "post"]
        meta = {"model": "synth", "source": "test", "store_dtype": "fp32", "save": "tokens" if ref else "both",
                "save_every": 8, "shard": shard, "kinds": kinds}
        w = ShardWriter(root / shard, meta, resume=False)
        for ci, s in enumerate(range(0, len(keys), 8)):
            ck = keys[s : s + 8]
            if ref:
                data = {"ref": pack([items[k] for k in ck], ck, torch.float32, "tokens")}
            else:
                data = {kind: pack([items[k][kind] for k in ck], ck, torch.float32, "both") for kind in ("pre", "post")}
            w.write_chunk(ci, digest_keys(ck), ck, data, skipped=[])
        w.write_manifest(complete=True)
    return root


def pre_post(pre: dict[str, torch.Tensor], post: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {"pre": pre[k], "post": post[k]} for k in pre}


def orthogonal_store(tmp_path: Path, shards=("00000", "00001", "photos")) -> tuple[Path, Path]:
    """pre random tokens, post = pre @ Q (Q orthogonal) + shift; a loosely related reference store."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()
    stores, refs = {}, {}
    for shard in shards:
        pre = {k: torch.randn(T, D, generator=g) * 3 + 1 for k in KEYS}
        stores[shard] = pre_post(pre, {k: v @ Q + 0.5 for k, v in pre.items()})
        refs[shard] = {k: v.mean(0)[:8] + 0.3 * torch.randn(8, generator=g) for k, v in pre.items()}
    return write_vec_store(tmp_path / "vec", stores), write_vec_store(tmp_path / "ref", refs, ref=True)


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_orthogonal_post_gives_knor_1_cka_1_procrustes_0(tmp_path):
    vec, ref = orthogonal_store(tmp_path)
    out = tmp_path / "out"
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--ref", f"clip:{ref}", "--out_dir", out,
                   "--k", "3,5,100", "--svd_per_image_csv", "--backend", "torch", "--device", "cpu") == 0
    n = 60
    d = json.loads((out / f"overlap_top{n - 1}_l2.json").read_text())  # 100 clipped to N-1 = 59
    assert d["n"] == n and d["ks"] == [3, 5, 59] and d["k_requested"] == [3, 5, 100]
    assert d["n_dropped"] == {"pre": 0, "post": 0, "clip": 0}
    assert d["n_per_shard"] == {"00000": 20, "00001": 20, "photos": 20}
    assert d["refs"] == ["clip"] and d["settings"]["protocol"] == "global"
    for k in ("3", "5", "59"):
        e = d["per_k"][k]
        assert e["pre_post"]["mean"] == 1.0 and e["pre_post"]["std"] == 0.0
        assert e["pre_post_detail"]["rank_displacement"]["mean"] == 0.0
        assert e["pre_post_detail"]["jaccard"]["mean"] == 1.0
        assert e["clip_pre"]["mean"] == pytest.approx(e["clip_post"]["mean"])
        tw = e["three_way"]["clip"]
        assert tw["ref_pre_only"] == tw["ref_post_only"] == 0.0
        assert tw["all3"] + tw["pre_post_only"] == pytest.approx(int(k))
    g = d["global"]["pre_post"]
    assert g["cka_debiased"] == pytest.approx(1.0, abs=1e-5) and g["cka"] == pytest.approx(1.0, abs=1e-5)
    assert g["procrustes_residual"] < 1e-3
    assert g["dist_pearson"] == pytest.approx(1.0, abs=1e-6) and g["dist_spearman"] == pytest.approx(1.0, abs=1e-6)
    assert set(d["global"]) >= {"pre_post", "clip_pre", "clip_post", "spectra"}

    rows = read_rows(out / "per_image.csv")
    assert len(rows) == n
    cols = list(rows[0])
    knor_cols = [f"pre_post_knor{k}" for k in (3, 5, 59)]
    knor_cols += [f"clip_{s}_knor{k}" for k in (3, 5, 59) for s in ("pre", "post")]
    assert cols[:2] == ["shard", "key"] and set(knor_cols) <= set(cols)
    for side in ("pre", "post"):
        for c in ("effective_rank", "effective_rank_norm_min_t1_d", "top1_energy_ratio", "top5_energy_ratio",
                  "top10_energy_ratio", "k80_energy", "k90_energy", "cos_mean", "cos_std", "cos_median"):
            assert f"{side}_{c}" in cols
    assert all(float(r["pre_post_knor59"]) == 1.0 for r in rows)
    # token spectra are invariant under an orthogonal map (the shift cancels in the centred spectrum)
    for r in rows:
        assert float(r["pre_effective_rank"]) == pytest.approx(float(r["post_effective_rank"]), rel=1e-4)
    spec = json.loads((out / "spectra.json").read_text())
    assert spec["n"] == n and np.allclose(spec["pre"], spec["post"], atol=1e-5)
    assert sum(spec["pre"]) == pytest.approx(1.0)


def test_keys_stay_strings_and_repeat_across_shards(tmp_path):
    vec, _ = orthogonal_store(tmp_path, shards=("00000", "00001"))
    out = tmp_path / "out"
    assert run_cli("--pre_pt", vec, "--post_pt", vec / "00000" / "pre_vectors_00000.pt", "--out_dir", out,
                   "--k", "5", "--device", "cpu") == 0  # a chunk file selects its shard only
    rows = read_rows(out / "per_image.csv")
    assert [(r["shard"], r["key"]) for r in rows] == [("00000", k) for k in KEYS]
    assert rows[0]["key"] == "000010000"
    text = (out / "per_image.csv").read_text().splitlines()
    assert text[1].startswith("00000,000010000,")
    d = json.loads((out / "overlap_top5_l2.json").read_text())
    assert d["n_dropped"] == {"pre": 20, "post": 0}  # 00001's 20 images have no post vectors here
    import pandas as pd

    df = pd.read_csv(out / "per_image.csv", dtype={"shard": str, "key": str})
    assert df["key"].iloc[0] == "000010000" and df["shard"].iloc[0] == "00000"


def test_missing_keys_are_dropped_and_reported(tmp_path, caplog):
    g = torch.Generator().manual_seed(1)
    pre = {s: {k: torch.randn(T, D, generator=g) for k in KEYS} for s in ("a", "b")}
    full = write_vec_store(tmp_path / "full", {s: pre_post(v, v) for s, v in pre.items()})
    part = {s: {k: v for k, v in pre[s].items() if not (s == "b" and k in KEYS[:2])} for s in pre}
    partial = write_vec_store(tmp_path / "part", {s: pre_post(v, v) for s, v in part.items()})
    refd = {s: {k: pre[s][k].mean(0) for k in KEYS if not (s == "a" and k == KEYS[5])} for s in pre}
    ref = write_vec_store(tmp_path / "ref", refd, ref=True)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert run_cli("--pre_pt", full, "--post_pt", partial, "--ref", f"r1:{ref}", "--out_dir", out,
                       "--k", "4", "--device", "cpu") == 0
    d = json.loads((out / "overlap_top4_l2.json").read_text())
    assert d["n"] == 37 and d["n_dropped"] == {"pre": 3, "post": 1, "r1": 2}
    assert "dropped" in caplog.text
    rows = read_rows(out / "per_image.csv")
    ids = {(r["shard"], r["key"]) for r in rows}
    assert len(rows) == 37 and ("b", KEYS[0]) not in ids and ("a", KEYS[5]) not in ids and ("a", KEYS[0]) in ids


def twin_store(tmp_path: Path) -> Path:
    """Shard s1 = shard s0 + tiny noise in both spaces; pre and post unrelated within a shard."""
    g = torch.Generator().manual_seed(2)
    A = {k: torch.randn(T, D, generator=g) for k in KEYS}
    B = {k: torch.randn(T, D, generator=g) for k in KEYS}
    eps = lambda: 1e-3 * torch.randn(T, D, generator=g)  # noqa: E731
    return write_vec_store(tmp_path / "twin", {
        "s0": pre_post(A, B),
        "s1": pre_post({k: v + eps() for k, v in A.items()}, {k: v + eps() for k, v in B.items()}),
    })


def test_global_vs_per_shard_protocols(tmp_path):
    vec = twin_store(tmp_path)
    pre = load_space("pre", vec, "pre", "mean")
    al = align([pre, load_space("post", vec, "post", "mean")])
    groups = shard_groups(al.ids)
    shard_of = np.array([s for s, _ in al.ids])
    nn_g = neighbours(al.X["pre"], 3, metric="l2", backend="torch", device=torch.device("cpu"))
    nn_s = neighbours(al.X["pre"], 3, metric="l2", backend="torch", device=torch.device("cpu"), groups=groups)
    assert (shard_of[nn_s] == shard_of[:, None]).all()  # per shard: never leaves the shard
    assert (shard_of[nn_g[:, 0]] != shard_of).all()  # global: the nearest is the twin in the other shard
    assert [al.ids[j][1] for j in nn_g[:, 0]] == [k for _, k in al.ids]

    out_g, out_s = tmp_path / "g", tmp_path / "s"
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", out_g, "--k", "1,50", "--device", "cpu") == 0
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", out_s, "--k", "1,50", "--device", "cpu",
                   "--per_shard") == 0
    dg = json.loads((out_g / "overlap_top39_l2.json").read_text())  # 50 -> N-1 = 39
    ds = json.loads((out_s / "overlap_top19_l2.json").read_text())  # 50 -> smallest shard - 1 = 19
    assert dg["settings"]["protocol"] == "global" and ds["settings"]["protocol"] == "per_shard"
    assert dg["per_k"]["1"]["pre_post"]["mean"] == 1.0  # the twin is the nearest in both spaces
    assert ds["per_k"]["1"]["pre_post"]["mean"] < 0.5  # within a shard pre and post are unrelated
    assert ds["per_k"]["19"]["pre_post"]["mean"] == 1.0  # k = shard size - 1: the whole shard
    assert dg["per_k"]["1"]["chance_knor"] == pytest.approx(1 / 39)
    assert ds["per_k"]["1"]["chance_knor"] == pytest.approx(1 / 19)


def test_parsers_and_clipping(caplog):
    assert parse_ref("clip:data/clip_ref") == ("clip", "data/clip_ref")
    assert parse_ref("dino:C:/x") == ("dino", "C:/x")
    for bad in ("clip", ":path", "clip:", "pre:path", "a b:path"):
        with pytest.raises(UsageError):
            parse_ref(bad)
    assert parse_ks("100, 10,50,10") == [10, 50, 100]
    for bad in ("", "0", "a,b", "-1"):
        with pytest.raises(UsageError):
            parse_ks(bad)
    with caplog.at_level("WARNING"):
        assert effective_ks([10, 50, 100], 30, None) == [10, 29]
    assert "clipped" in caplog.text
    with pytest.raises(UsageError):
        effective_ks([5], 1, None)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLMC_LOGLEVEL": "WARNING"}
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


@pytest.mark.parametrize("case", ["missing_path", "bad_ref", "missing_ref_path"])
def test_bad_args_exit_2_with_one_line(tmp_path, case):
    vec = tmp_path / "nope"
    if case != "missing_path":
        vec, _ = orthogonal_store(tmp_path, shards=("00000",))
    ref = {"missing_path": "clip:" + str(vec), "bad_ref": "clip_no_colon", "missing_ref_path": "clip:/does/not/exist"}
    r = _cli("--pre_pt", vec, "--post_pt", vec, "--ref", ref[case], "--out_dir", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def random_store(tmp_path: Path, n: int = 40) -> Path:
    """pre and post independent random tokens: KNOR near chance, every k informative."""
    g = torch.Generator().manual_seed(1)
    keys = [f"{i:09d}" for i in range(n)]
    return write_vec_store(tmp_path / "rand", {"00000": pre_post({k: torch.randn(T, D, generator=g) for k in keys},
                                                                 {k: torch.randn(T, D, generator=g) for k in keys})})


def test_count_self_equals_the_formula_on_random_data(tmp_path):
    """Per image: KNOR_self@k = (1 + (k-1)·KNOR_excl@(k-1)) / k (the original pipeline's faiss search counted the query)."""
    vec = random_store(tmp_path)
    ks = "1,2,5,6,10,11,39,40"
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", tmp_path / "ex", "--k", ks, "--device", "cpu") == 0
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", tmp_path / "self", "--k", ks, "--count_self",
                   "--device", "cpu") == 0
    ex, me = read_rows(tmp_path / "ex" / "per_image.csv"), read_rows(tmp_path / "self" / "per_image.csv")
    d = json.loads((tmp_path / "self" / "overlap_top40_l2.json").read_text())
    assert d["ks"] == [1, 2, 5, 6, 10, 11, 39, 40] and d["settings"]["count_self"] is True  # capped at N, not N-1
    assert json.loads((tmp_path / "ex" / "overlap_top39_l2.json").read_text())["ks"] == [1, 2, 5, 6, 10, 11, 39]
    some_nontrivial = False
    for a, b in zip(ex, me, strict=True):
        assert float(b["pre_post_knor1"]) == 1.0
        for k in (2, 6, 11, 40):
            want = (1 + (k - 1) * float(a[f"pre_post_knor{k - 1}"])) / k
            assert float(b[f"pre_post_knor{k}"]) == pytest.approx(want, abs=1e-12)
            some_nontrivial |= 0 < float(a[f"pre_post_knor{k - 1}"]) < 1
    assert some_nontrivial
    n = 40
    for k in (5, 10):  # chance with the query counted: (1 + (k-1)^2/(N-1)) / k
        assert d["per_k"][str(k)]["chance_knor"] == pytest.approx((1 + (k - 1) ** 2 / (n - 1)) / k)
        e = d["per_k"][str(k)]["pre_post"]
        assert e["ci95_lo"] <= e["mean"] <= e["ci95_hi"]


def test_pool_cls_refused_without_a_cls_token_first_is_the_first_token(tmp_path):
    vec = random_store(tmp_path, n=12)
    r = _cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", tmp_path / "o", "--pool", "cls")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no CLS token" in r.stderr, r.stderr
    assert run_cli("--pre_pt", vec, "--post_pt", vec, "--out_dir", tmp_path / "f", "--pool", "first", "--k", "3",
                   "--device", "cpu") == 0
    first = load_space("pre", vec, "pre", "first")
    tokens = dict(zip(*ShardReader.open(find_shard_dirs(vec)[0]).tokens("pre"), strict=True))
    for (_, key), row in zip(first.ids, first.X, strict=True):
        assert torch.equal(row, tokens[key][0].float())

