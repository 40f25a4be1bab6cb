"""Plot CLIs and compute_summary on a small fake stage-output tree (tests/fixtures_plot.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

try:  # tests/ on sys.path (pytest's default rootdir-less import) or the repo root (python -m pytest)
    from fixtures_plot import make_plot_tree
except ImportError:
    from tests.fixtures_plot import make_plot_tree

from vlmc.plot import (
    compute_summary,
    make_figures,
    plot_caption_recon,
    plot_caption_recon_pre,
    plot_erank_vs_clip,
    plot_knn,
    plot_perturb,
    plot_recon_maps,
)

REPO = Path(__file__).resolve().parents[1]
SIG6 = 6e-6  # results/*.csv carry 6 significant digits (vlmc.plot.common.TABLE_FLOAT_FORMAT)
CLIS = [plot_knn, plot_caption_recon, plot_caption_recon_pre, plot_erank_vs_clip, plot_perturb, plot_recon_maps,
        compute_summary, make_figures]
MODELS = ("llava", "qwen2.5vl")
EXPECTED_FIGURES = [
    "knn/single_dataset_topk_all.png", "knn/triway_knor_lines.png", "knn/triway_knor_bars_k5.png",
    "knn/three_way_counts_k5.png", "knn/spectra_llava.png", "knn/spectra_qwen25vl.png",
    "knn/energy_spectrum_all.png", "knn/effective_rank_summary.png",
    "caption_recon/scatter_reproj_cosine_vs_clipscore_drop.png", "caption_recon/scatter_reproj_mse_vs_bertscore_drop.png",
    "caption_recon/drops_by_model.png", "caption_recon/recon_quality_by_model.png",
    "caption_recon_pre/scatter_cosine_pre_vs_clipscore_drop.png", "caption_recon_pre/scatter_mse_pre_vs_bertscore_drop.png",
    "erank_vs_clip/erank_vs_clip_all.png",
    *[f"{m}_{k}.png" for m in ("mask", "lowrank", "orthogonal", "noise") for k in ("drop", "score")],
    "recon_maps/recon_maps_llava.png", "recon_maps/recon_maps_qwen25vl.png",
]
TABLES = ["knn_summary_per_model", "knn_knor_per_k", "recon_summary", "caption_summary", "perturb_summary",
          "caption_recon_correlations", "caption_recon_pre_correlations", "erank_vs_clip_correlations",
          "testbed_summary", "paired_tests"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_plot_tree(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def outputs(tree, tmp_path_factory) -> tuple[Path, Path]:
    """Every CLI, run once through make_figures (two forked workers, as `make figures` does), every figure
    checked strictly (vlmc.plot.figcheck: no blank / constant panel, no cut or overlapping text)."""
    out = tmp_path_factory.mktemp("out")
    figs, res = out / "figures", out / "results"
    argv = ["--in_dir", str(tree), "--out_dir", str(figs), "--results_dir", str(res), "--dpi", "60"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMC_FIGURE_CHECK", "strict")
        assert make_figures.main(argv) == 0
    return figs, res


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert arr.shape[0] > 100 and arr.shape[1] > 100 and arr.std() > 0, f"{path} is blank"


def read_raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"shard": str, "key": str})


def boot_ci(x: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The documented bootstrap, written out independently."""
    rng = np.random.default_rng(seed)
    block, means, left = max(1, 2**20 // len(x)), [], n_boot
    while left:
        rows = min(block, left)
        means.extend(x[rng.integers(0, len(x), size=(rows, len(x)))].mean(axis=1))
        left -= rows
    return tuple(np.percentile(means, [2.5, 97.5]))


# -- every CLI writes readable, non-blank figures and tables ---------------------------------------


def test_every_figure_written_and_valid(outputs):
    figs, _ = outputs
    for rel in EXPECTED_FIGURES:
        assert_png(figs / rel)
    leftovers = [p for p in figs.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers, leftovers


def test_every_table_written(outputs):
    _, res = outputs
    for name in TABLES:
        df = pd.read_csv(res / f"{name}.csv")
        assert len(df) > 0, name
        tex = (res / f"{name}.tex").read_text()
        assert tex.startswith(r"\begin{tabular}") and r"\bottomrule" in tex and "_" not in tex.replace(r"\_", "")
    assert sorted(p.name for p in res.iterdir()) == sorted(f"{n}.{e}" for n in TABLES for e in ("csv", "tex"))


def test_testbed_summary_restates_the_other_tables(outputs):
    """testbed_summary is a view: its numbers are the caption / perturbation / knn tables' own."""
    _, res = outputs
    tb = pd.read_csv(res / "testbed_summary.csv").set_index("model")
    caps = pd.read_csv(res / "caption_summary.csv")
    pert = pd.read_csv(res / "perturb_summary.csv")
    knn = pd.read_csv(res / "knn_summary_per_model.csv").set_index("model")
    for model, row in tb.iterrows():
        mine = caps[(caps["model"] == model) & (caps["column"] == "clipscore_post_direct")]["mean"]
        assert row["clipscore"] == pytest.approx(mine.iloc[0])
        assert row["pre_post_knor10"] == pytest.approx(knn.loc[model, "pre_post_knor10_mean"])
        for r in pert[(pert["model"] == model) & (pert["column"] == "clipscore_perturbed")].itertuples():
            assert row[f"{r.mode}{r.level:g}_clipscore"] == pytest.approx(r.mean)


def test_optional_flags(tree, tmp_path):
    figs = tmp_path / "f"
    assert plot_perturb.main(["--in_dir", str(tree), "--out_dir", str(figs), "--perturb", "mask", "--pdf",
                              "--models", "qwen2.5vl", "--n_boot", "50"]) == 0
    assert_png(figs / "mask_drop.png")
    assert (figs / "mask_drop.pdf").read_bytes().startswith(b"%PDF")
    assert plot_erank_vs_clip.main(["--in_dir", str(tree), "--out_dir", str(figs), "--results_dir", str(tmp_path),
                                    "--clip_source", "perturb", "--normalized", "--per_model", "--space", "pre"]) == 0
    for m in ("llava", "qwen25vl"):
        assert_png(figs / "erank_vs_clip" / f"erank_vs_clip_{m}.png")
    corr = pd.read_csv(tmp_path / "erank_vs_clip_correlations.csv")
    assert set(corr["x"]) == {"pre_effective_rank_norm_min_t1_d"}


# -- compute_summary's numbers equal an independent recomputation ---------------------------------


def test_knn_summary_matches_inputs(tree, outputs):
    _, res = outputs
    summ = pd.read_csv(res / "knn_summary_per_model.csv").set_index("model")
    long = pd.read_csv(res / "knn_knor_per_k.csv")
    for m in MODELS:
        js = json.loads((tree / "knn_out" / m / "overlap_top20_l2.json").read_text())
        pim = read_raw(tree / "knn_out" / m / "per_image.csv")
        assert summ.loc[m, "n_images"] == js["n_images"] == len(pim)
        for k in (5, 10, 20):
            for pair in ("pre_post", "clip_pre", "clip_post"):
                want = js["per_k"][str(k)][pair]
                assert summ.loc[m, f"{pair}_knor{k}_mean"] == pytest.approx(want["mean"], rel=SIG6)
                assert summ.loc[m, f"{pair}_knor{k}_std"] == pytest.approx(want["std"], rel=SIG6)
                assert summ.loc[m, f"{pair}_knor{k}_mean"] == pytest.approx(pim[f"{pair}_knor{k}"].mean(), rel=SIG6)
                row = long[(long["model"] == m) & (long["pair"] == pair) & (long["k"] == k)]
                assert row["median"].item() == pytest.approx(want["median"], rel=SIG6)
        for col in ("pre_effective_rank", "post_effective_rank_norm_min_t1_d", "post_top1_energy_ratio", "pre_k90_energy"):
            assert summ.loc[m, f"{col}_mean"] == pytest.approx(pim[col].mean(), rel=SIG6)
        for pair in ("pre_post", "clip_post"):
            for key in ("cka_debiased", "procrustes_residual", "dist_spearman"):
                assert summ.loc[m, f"{pair}_{key}"] == pytest.approx(js["global"][pair][key], rel=SIG6)
        assert np.isnan(summ.loc[m, "clip_pre_procrustes_residual"])  # JSON null
        assert summ.loc[m, "protocol"] == "global"


def _check_stats(row: pd.Series, x: np.ndarray) -> None:
    x = x[np.isfinite(x)]
    q25, q75 = np.percentile(x, [25, 75])
    lo, hi = boot_ci(x)
    assert row["n"] == len(x)
    for name, want in (("mean", x.mean()), ("median", np.median(x)), ("std", x.std(ddof=1)), ("q25", q25),
                       ("q75", q75), ("iqr", q75 - q25), ("ci95_lo", lo), ("ci95_hi", hi)):
        assert row[name] == pytest.approx(want, rel=SIG6, abs=1e-12), name
    assert row["ci95_lo"] <= row["mean"] <= row["ci95_hi"]


def test_caption_and_recon_summaries_match_csv(tree, outputs):
    _, res = outputs
    cap = pd.read_csv(res / "caption_summary.csv")
    rec = pd.read_csv(res / "recon_summary.csv")
    for m in MODELS:
        raw = read_raw(tree / "captions" / f"captions_{m}.csv")
        for col in ("clipscore_drop", "bertscore_drop", "clipscore_post_direct", "bertscore_f1_recon_vs_post_direct"):
            row = cap[(cap["model"] == m) & (cap["column"] == col)].iloc[0]
            _check_stats(row, pd.to_numeric(raw[col], errors="coerce").to_numpy(float))
        assert cap[(cap["model"] == m) & (cap["column"] == "bertscore_drop")]["n"].item() == len(raw) - 1  # one "nan"
        per = read_raw(tree / "recon_eval" / m / "per_sample.csv")
        for col in ("mse_pre", "reproj_cosine"):
            _check_stats(rec[(rec["model"] == m) & (rec["column"] == col)].iloc[0], per[col].to_numpy(float))


def test_perturb_summary_matches_csv(tree, outputs):
    _, res = outputs
    summ = pd.read_csv(res / "perturb_summary.csv")
    for m, mode, level in (("llava", "mask", 0.3), ("qwen2.5vl", "lowrank", 0.01), ("llava", "noise", 10.0)):
        raw = read_raw(tree / "perturb_out" / f"perturb_{m}_{mode}_{level:g}.csv")
        for col in ("clipscore_drop", "bertscore_drop_gt", "bertscore_f1"):
            sel = summ[(summ["model"] == m) & (summ["mode"] == mode) & np.isclose(summ["level"], level)
                       & (summ["column"] == col)]
            assert len(sel) == 1
            _check_stats(sel.iloc[0], raw[col].to_numpy(float))


def test_caption_correlations_match_scipy(tree, outputs):
    _, res = outputs
    table = pd.read_csv(res / "caption_recon_pre_correlations.csv")
    m = "qwen2.5vl"
    caps = read_raw(tree / "captions" / f"captions_{m}.csv")
    per = read_raw(tree / "recon_eval" / m / "per_sample.csv")
    both = caps.merge(per[["shard", "key", "cosine_pre"]], on=["shard", "key"]).dropna(subset=["bertscore_drop"])
    sel = (table["model"] == m) & (table["x"] == "cosine_pre") & (table["y"] == "bertscore_drop")
    assert set(table.loc[sel, "group"]) == {"all", "scenes", "photos"}
    for group, part in (("all", both), ("scenes", both[both["shard"] == "00000"]), ("photos", both[both["shard"] != "00000"])):
        row = table[sel & (table["group"] == group)].iloc[0]
        x, y = part["cosine_pre"].round(4), part["bertscore_drop"].round(4)  # documented: on rounded values
        r, rho = stats.pearsonr(x, y), stats.spearmanr(x, y)
        slope, intercept = np.polyfit(x, y, 1)
        assert row["n"] == len(part)
        assert row["pearson_r"] == pytest.approx(r.statistic, rel=SIG6)
        assert row["pearson_p"] == pytest.approx(r.pvalue, rel=SIG6)
        assert row["spearman_rho"] == pytest.approx(rho.statistic, rel=SIG6)
        assert row["spearman_p"] == pytest.approx(rho.pvalue, rel=SIG6)
        assert row["slope"] == pytest.approx(slope, rel=SIG6) and row["intercept"] == pytest.approx(intercept, rel=SIG6)
    assert table[sel & (table["group"] == "all")]["n"].item() == len(both) == 23


# -- tolerant readers, clear errors ---------------------------------------------------------------


def test_knn_reader_tolerates_seed_json_and_minimal_per_image(tmp_path):
    d = tmp_path / "knn" / "llava"
    d.mkdir(parents=True)
    seed_json = {f"top{k}": {"mean": 0.1 * k / 10, "std": 0.01} for k in (10, 50)}
    seed_json |= {f"clip_pre_top{k}": {"mean": 0.2, "std": 0.02} for k in (10, 50)}
    seed_json["global"] = {"spectrum_and_rank": {"pre_summary": {"mean_energy_spectrum_topn": [0.5, 0.3, 0.2]},
                                                 "post_summary": {"mean_energy_spectrum_topn": [0.7, 0.2, 0.1]}}}
    (d / "overlap_top50_l2.json").write_text(json.dumps(seed_json))
    pd.DataFrame({"shard": ["00000", "00000"], "key": ["000010000", "000010001"], "pre_effective_rank": [3.0, 4.0],
                  "post_effective_rank": [2.0, 2.5]}).to_csv(d / "per_image.csv", index=False)
    figs = tmp_path / "figs"
    assert plot_knn.main(["--in_dir", str(tmp_path), "--out_dir", str(figs)]) == 0
    for name in ("spectra_llava", "effective_rank_summary"):
        assert_png(figs / "knn" / f"{name}.png")
    assert not list((figs / "knn").glob("triway*"))  # N = 2 images: every k >= N - 1, no meaningful KNOR figure
    assert not list((figs / "knn").glob("three_way_counts*"))
    assert compute_summary.main(["--in_dir", str(tmp_path), "--results_dir", str(tmp_path / "res")]) == 0
    summ = pd.read_csv(tmp_path / "res" / "knn_summary_per_model.csv")
    assert summ["pre_post_knor50_mean"].item() == pytest.approx(0.5)
    assert summ["pre_effective_rank_mean"].item() == pytest.approx(3.5)


def test_recon_maps_non_spatial_grid(tmp_path):
    import torch

    d = tmp_path / "recon_eval" / "tiny"
    d.mkdir(parents=True)
    maps = torch.rand(3, 6, 1)
    torch.save({"keys": ["a", "b", "c"], "shards": ["_root"] * 3, "grids": torch.tensor([[6, 1]] * 3),
                "maps": maps}, d / "loss_maps.pt")
    assert plot_recon_maps.main(["--in_dir", str(tmp_path), "--out_dir", str(tmp_path / "f")]) == 0
    assert_png(tmp_path / "f" / "recon_maps" / "recon_maps_tiny.png")


@pytest.mark.parametrize("cli", CLIS, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_missing_input_exits_2_with_one_line(cli, tmp_path, capsys):
    assert cli.main(["--in_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "nope" in err[0], err


def test_missing_required_column_is_named(tree, tmp_path, capsys):
    (tmp_path / "captions").mkdir()
    raw = read_raw(tree / "captions" / "captions_llava.csv").drop(columns=["shard"])
    raw.to_csv(tmp_path / "captions" / "captions_llava.csv", index=False)
    assert plot_caption_recon.main(["--in_dir", str(tmp_path), "--captions_dir", str(tmp_path / "captions"),
                                    "--recon_dir", str(tree / "recon_eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing required column(s) shard" in err[0] and "captions_llava.csv" in err[0]
    assert plot_perturb.main(["--in_dir", str(tree), "--perturb", "mask", "--models", "nosuchmodel"]) == 2
    assert "no data for nosuchmodel" in capsys.readouterr().err


@pytest.mark.parametrize("cli", CLIS, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_help_shows_defaults(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--in_dir" in out and "(default: sample)" in out


def test_script_entry_points(tmp_path):
    """As users run them: `python src/plot/<cli>.py` and `bash scripts/figures.sh` (bad input → exit 2)."""
    env = {"PATH": "/usr/bin:/bin", "VLMC_PYTHON": sys.executable}
    if os.environ.get("PYTHONPATH"):  # a worktree's own vlmc (.pypath), not the venv's install
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cmds = [[sys.executable, str(REPO / "src/plot/plot_perturb.py"), "--in_dir", str(tmp_path / "x")],
            ["bash", str(REPO / "scripts/figures.sh"), str(tmp_path / "x"), str(tmp_path / "f"), str(tmp_path / "r")]]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    for p in procs:  # started together: two interpreter start-ups in parallel
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.strip().count("\n") == 0 and "is not a folder" in err, err


def test_tables_carry_intervals_chance_and_paired_tests(tree, outputs):
    """Every KNOR value has its bootstrap interval and chance level beside it; family-vs-family claims have a
    paired test whose numbers restate the per-image data."""
    _, res = outputs
    long = pd.read_csv(res / "knn_knor_per_k.csv")
    assert long[["ci95_lo", "ci95_hi", "chance"]].notna().all().all()
    assert (long["ci95_lo"] <= long["mean"] + 1e-12).all() and (long["mean"] <= long["ci95_hi"] + 1e-12).all()
    wide = pd.read_csv(res / "knn_summary_per_model.csv").set_index("model")
    for k in sorted(long["k"].unique()):
        assert f"knor{k}_chance" in wide and f"pre_post_knor{k}_ci95_lo" in wide
    tb = pd.read_csv(res / "testbed_summary.csv").set_index("model")
    for c in ("pre_erank", "post_erank", "pre_erank_norm_min_t1_d", "attr_acc", "pre_post_knor10"):
        assert f"{c}_ci95_lo" in tb and f"{c}_ci95_hi" in tb, c
    pt = pd.read_csv(res / "paired_tests.csv", dtype={"mode": str})
    assert {"knn", "captions", "perturb"} <= set(pt["section"])
    assert ((pt["p_perm"] > 0) & (pt["p_perm"] <= 1)).all()
    # the CSV carries 6 significant digits: a - b agrees with diff up to the rounding of a and b
    tol = 1e-5 * (pt["mean_a"].abs() + pt["mean_b"].abs()) + 1e-9
    assert ((pt["diff"] - (pt["mean_a"] - pt["mean_b"])).abs() <= tol).all()
    row = pt[(pt["section"] == "knn") & (pt["column"] == "post_effective_rank")].iloc[0]
    runs = {m: pd.read_csv(tree / "knn_out" / m / "per_image.csv", dtype={"shard": str, "key": str})
            for m in (row["model_a"], row["model_b"])}
    j = runs[row["model_a"]].merge(runs[row["model_b"]], on=["shard", "key"])
    assert row["n"] == len(j)
    assert row["diff"] == pytest.approx((j["post_effective_rank_x"] - j["post_effective_rank_y"]).mean(), rel=1e-5)


def test_erank_vs_clip_reads_knn_root_when_geometry_is_on_an_evaluation_set(tree, tmp_path):
    """pipeline EVAL_ROOT: knn_out holds the evaluation scenes, knn_root the captioned images' spectra."""
    import shutil

    from vlmc.plot.make_figures import plan

    alt = tmp_path / "t"
    shutil.copytree(tree, alt)
    shutil.copytree(alt / "knn_out", alt / "knn_root")
    steps = {name: argv for name, _, argv in plan(alt, ["--out_dir", "f"], ["--results_dir", "r"])}
    assert steps["plot_erank_vs_clip"][-2:] == ["--knn_dir", str(alt / "knn_root")]
    assert "--knn_dir" not in {name: argv for name, _, argv in plan(tree, [], [])}["plot_erank_vs_clip"]


def test_erank_vs_clip_alone_defaults_to_knn_root(tree, tmp_path):
    """Run by hand on such a folder (the original pipeline's `python src/plot/plot_erank_vs_clip.py` on sample/),
    it finds the captioned images' geometry in knn_root, not the evaluation set's in knn_out."""
    import shutil

    alt = tmp_path / "t"
    shutil.copytree(tree, alt)
    shutil.move(alt / "knn_out", alt / "knn_root")
    shutil.copytree(tree / "knn_out", alt / "knn_out")
    for f in (alt / "knn_out").glob("*/per_image.csv"):  # other images: nothing in common with the captions
        f.write_text(f.read_text().replace(",0000", ",9999"))
    args = plot_erank_vs_clip.build_parser().parse_args(["--in_dir", str(alt)])
    assert plot_erank_vs_clip.geometry_dir(args) == alt / "knn_root"
    assert plot_erank_vs_clip.main(["--in_dir", str(alt), "--out_dir", str(tmp_path / "f"),
                                    "--results_dir", str(tmp_path / "r")]) == 0
    args = plot_erank_vs_clip.build_parser().parse_args(["--in_dir", str(alt), "--knn_dir", str(alt / "knn_out")])
    assert plot_erank_vs_clip.geometry_dir(args) == alt / "knn_out"
