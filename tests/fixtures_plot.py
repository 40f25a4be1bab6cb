"""A small, deterministic, FAKE stage-output tree for the plot tests (never a stand-in for sample/).

The numbers are random but the files have the writers' exact names and columns:

    images/<shard>/<key>.png                          two shards; the first 4 keys repeat across shards
    knn_out/<model>/overlap_top20_l2.json, per_image.csv, spectra.json   stage 3 (docs/formats.md)
    recon_eval/<model>/per_sample.csv, per_shard/<shard>.csv, loss_maps.pt, summary.json   stage 6
    captions/captions_<model>.csv                     stage 7 (eval_captions) after score_captions.py
    perturb_out/perturb_<model>_<mode>_<level>.csv    stage 8 (eval_perturb) after score_perturb.py

Drops are built to grow with reconstruction error / perturbation level so trends are visible.

    python tests/fixtures_plot.py OUT_DIR       # write the tree (e.g. to try the plot CLIs by hand)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

MODELS = ("llava", "qwen2.5vl")  # qwen: two grid shapes (NaN-padded loss maps)
SHARDS = ("00000", "00001")
KS = (5, 10, 20)
GRIDS = {"llava": [(6, 6)], "idefics2": [(5, 5)], "qwen2.5vl": [(4, 6), (6, 4)]}  # qwen: two aspect ratios
LEVELS = {"mask": (0.1, 0.3, 0.5, 0.7), "lowrank": (0.01, 0.05, 0.1, 0.3), "orthogonal": (0.5, 1.0),
          "noise": (0.0, 10.0, 20.0)}


def ids(n_per_shard: int) -> list[tuple[str, str]]:
    """(shard, key) pairs; shard 00001 reuses the first 4 keys of 00000 (different images)."""
    out = [("00000", f"{10000 + i:09d}") for i in range(n_per_shard)]
    out += [("00001", f"{10000 + i:09d}") for i in range(4)]
    out += [("00001", f"{10000 + n_per_shard + i:09d}") for i in range(n_per_shard - 4)]
    return out


def gt_caption(shard: str, key: str) -> str:
    """Shard 00000 holds testbed scenes (a scene caption), shard 00001 "photos" (any other caption)."""
    if shard == "00000":
        return "one object: a large red circle in the center."
    return f"a test image {shard}/{key}"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, na_rep="nan")


def write_images(root: Path, pairs, rng) -> None:
    from PIL import Image

    for shard, key in pairs:
        d = root / "images" / shard
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        grad = np.linspace(0, 1, 48)[None, :, None] * rng.integers(0, 255, 3)[None, None, :]
        arr = np.clip(base[None, None, :] * 0.5 + grad, 0, 255).astype(np.uint8).repeat(48, axis=0)
        Image.fromarray(arr).save(d / f"{key}.png")
        (d / f"{key}.txt").write_text(gt_caption(shard, key) + "\n")


def _summ(v: np.ndarray) -> dict:
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}


def write_knn(root: Path, model: str, pairs, rng) -> None:
    n = len(pairs)
    d = root / "knn_out" / model
    d.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(pairs, columns=["shard", "key"])
    per_k = {}
    base = {"pre_post": rng.uniform(0.3, 0.7), "clip_pre": rng.uniform(0.1, 0.4), "clip_post": rng.uniform(0.1, 0.4)}
    knor = {}
    for pair in base:  # column order of extract_knn: pre_post_knor<k> for every k, then per ref and k
        for k in KS:
            knor[(pair, k)] = np.round(np.clip(base[pair] + 0.01 * k + rng.normal(0, 0.08, n), 0, 1) * k) / k
    for k in KS:
        df[f"pre_post_knor{k}"] = knor[("pre_post", k)]
    for k in KS:
        df[f"clip_pre_knor{k}"], df[f"clip_post_knor{k}"] = knor[("clip_pre", k)], knor[("clip_post", k)]
    for k in KS:
        entry = {pair: _summ(knor[(pair, k)]) for pair in base}
        entry["three_way"] = {"clip": {"all3": rng.uniform(0.1, 0.3) * k, "ref_pre_only": 0.1 * k,
                                       "ref_post_only": 0.05 * k, "pre_post_only": 0.3 * k}}
        entry["pre_post_detail"] = {"rank_displacement": _summ(rng.uniform(0, k, n)), "jaccard": _summ(rng.uniform(0, 1, n))}
        entry["chance_knor"] = k / (n - 1)
        per_k[str(k)] = entry
    for side, scale in (("pre", 40.0), ("post", 25.0)):
        er = rng.uniform(0.5, 1.0, n) * scale
        df[f"{side}_effective_rank"] = er
        df[f"{side}_effective_rank_norm_min_t1_d"] = er / 63.0
        top1 = rng.uniform(0.05, 0.4, n)
        df[f"{side}_top1_energy_ratio"] = top1
        df[f"{side}_top5_energy_ratio"] = np.minimum(top1 * 2.2, 1)
        df[f"{side}_top10_energy_ratio"] = np.minimum(top1 * 3.0, 1)
        df[f"{side}_k80_energy"] = rng.integers(5, 30, n)
        df[f"{side}_k90_energy"] = df[f"{side}_k80_energy"] + rng.integers(1, 10, n)
        df[f"{side}_cos_mean"] = rng.uniform(0.1, 0.6, n)
        df[f"{side}_cos_std"] = rng.uniform(0.05, 0.2, n)
        df[f"{side}_cos_median"] = df[f"{side}_cos_mean"] + 0.01
    L = 30
    spectra = {}
    for side, decay in (("pre", 0.15), ("post", 0.3)):
        e = np.exp(-decay * np.arange(L))
        spectra[side] = (e / e.sum()).tolist()
    geo = {"cka_debiased": 0.78, "cka": 0.8, "procrustes_residual": 0.3, "dist_pearson": 0.7, "dist_spearman": 0.65,
           "dist_n_pairs": n * (n - 1) // 2}
    summary = {
        "n": n, "n_images": n, "n_dropped": {"pre": 0, "post": 0, "clip": 0},
        "n_per_shard": {s: sum(1 for p in pairs if p[0] == s) for s in SHARDS}, "refs": ["clip"],
        "ks": list(KS), "k_requested": list(KS), "per_k": per_k,
        "global": {"pre_post": geo, "clip_pre": {**geo, "cka": 0.4, "procrustes_residual": None},
                   "clip_post": {**geo, "cka": 0.5},
                   "spectra": {s: {"energy_mean_normalized": v} for s, v in spectra.items()}},
        "settings": {"pre_pt": "data/vector/x", "post_pt": "data/vector/x", "refs": {"clip": "data/clip_ref"},
                     "pool": "mean", "metric": "l2", "protocol": "global", "backend": "torch", "device": "cpu",
                     "seed": 0, "pairs_sample": 100000, "svd_per_image_csv": True},
    }
    (d / f"overlap_top{max(KS)}_l2.json").write_text(json.dumps(summary, indent=2))
    (d / "spectra.json").write_text(json.dumps({"n": n, **spectra}))
    _write_csv(df, d / "per_image.csv")


def write_recon(root: Path, model: str, pairs, rng) -> pd.DataFrame:
    import torch

    d = root / "recon_eval" / model
    n = len(pairs)
    quality = rng.uniform(0, 1, n)  # latent "how well reconstructed"
    df = pd.DataFrame(pairs, columns=["shard", "key"])
    df["model"] = model
    df["recon_type"] = "mlp"
    df["mse_pre"] = 0.2 + 0.8 * (1 - quality) + rng.normal(0, 0.05, n)
    df["cosine_pre"] = 0.5 + 0.45 * quality + rng.normal(0, 0.02, n)
    df["reproj_mse"] = 0.1 + 0.5 * (1 - quality) + rng.normal(0, 0.05, n)
    df["reproj_cosine"] = 0.6 + 0.35 * quality + rng.normal(0, 0.02, n)
    fmt = df.copy()
    for c in ("mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine"):
        fmt[c] = [f"{x:.6g}" for x in df[c]]
    _write_csv(fmt, d / "per_sample.csv")
    for shard, part in fmt.groupby("shard"):
        _write_csv(part, d / "per_shard" / f"{shard}.csv")
    grids = [GRIDS[model][i % len(GRIDS[model])] for i in range(n)]
    h, w = max(g[0] for g in grids), max(g[1] for g in grids)
    maps = torch.full((n, h, w), float("nan"))
    for i, (gh, gw) in enumerate(grids):
        yy, xx = np.mgrid[0:gh, 0:gw]
        blob = np.exp(-((yy - gh / 2) ** 2 + (xx - gw / 3) ** 2) / 4.0)
        maps[i, :gh, :gw] = torch.from_numpy(df["mse_pre"].iloc[i] * (0.5 + blob + rng.uniform(0, 0.3, (gh, gw))))
    torch.save({"keys": [k for _, k in pairs], "shards": [s for s, _ in pairs],
                "grids": torch.tensor(grids, dtype=torch.int64), "maps": maps}, d / "loss_maps.pt")
    means = {c: float(df[c].mean()) for c in ("mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine")}
    (d / "summary.json").write_text(json.dumps({"model": model, "recon_type": "mlp", "split": "val", "n": n,
                                                "means": means, "reproj": "ran"}, indent=2))
    df["quality"] = quality
    return df


def write_captions(root: Path, model: str, recon: pd.DataFrame, rng) -> None:
    n = len(recon)
    df = recon[["key", "shard"]].copy()
    df["image_path"] = [str(root / "images" / s / f"{k}.png") for s, k in zip(df["shard"], df["key"], strict=True)]
    df["caption_gt"] = [gt_caption(s, k) for s, k in zip(df["shard"], df["key"], strict=True)]
    df["caption_post_direct"] = "a plate of food"
    df["caption_recon"] = "a plate"
    df["reproj_mse"] = [f"{x:.6g}" for x in recon["reproj_mse"]]  # eval_captions carries them too
    df["reproj_cosine"] = [f"{x:.6g}" for x in recon["reproj_cosine"]]
    df["split"] = "val"
    q = recon["quality"].to_numpy()
    for s in ("gt", "post_direct", "recon"):
        cos = {"gt": 0.32, "post_direct": 0.3, "recon": 0.22 + 0.07 * q}[s] + rng.normal(0, 0.01, n)
        df[f"clipcos_{s}"] = cos
        df[f"clipscore_{s}"] = 2.5 * np.maximum(cos, 0)
    df["bertscore_f1_post_direct"] = 0.6 + rng.normal(0, 0.03, n)
    df["bertscore_f1_recon"] = 0.45 + 0.15 * q + rng.normal(0, 0.03, n)
    df["bertscore_f1_recon_vs_post_direct"] = 0.5 + 0.4 * q + rng.normal(0, 0.03, n)
    df["clipscore_drop"] = df["clipscore_post_direct"] - df["clipscore_recon"]
    df["bertscore_drop"] = df["bertscore_f1_post_direct"] - df["bertscore_f1_recon"]
    df.loc[df.index[0], ["bertscore_f1_recon", "bertscore_drop"]] = np.nan  # an undefined score ("nan")
    _write_csv(df, root / "captions" / f"captions_{model}.csv")


def write_perturb(root: Path, model: str, pairs, rng) -> None:
    n = len(pairs)
    base = 0.75 + rng.normal(0, 0.03, n)
    for mode, levels in LEVELS.items():
        for level in levels:
            sev = {"mask": level, "lowrank": 1 - level, "orthogonal": level, "noise": 1 - level / 20}[mode]
            df = pd.DataFrame(pairs, columns=["shard", "key"])
            df.insert(0, "key", df.pop("key"))
            df["image_path"] = [str(root / "images" / s / f"{k}.png") for s, k in pairs]
            df["caption_original"] = "a plate of food"
            df["caption_perturbed"] = "a plate"
            df["mode"], df["level"], df["seed"] = mode, f"{level:g}", 0
            df["caption_gt"] = [gt_caption(s, k) for s, k in pairs]
            pert = base - 0.3 * sev * rng.uniform(0.5, 1.5, n)
            df["clipcos_original"], df["clipscore_original"] = base / 2.5, base
            df["clipcos_perturbed"], df["clipscore_perturbed"] = pert / 2.5, pert
            df["clipcos_gt"], df["clipscore_gt"] = 0.32, 0.8
            df["bertscore_f1"] = 1 - 0.5 * sev + rng.normal(0, 0.05, n)
            df["bertscore_f1_original_gt"] = 0.6 + rng.normal(0, 0.02, n)
            df["bertscore_f1_perturbed_gt"] = df["bertscore_f1_original_gt"] - 0.2 * sev + rng.normal(0, 0.02, n)
            df["clipscore_drop"] = df["clipscore_original"] - df["clipscore_perturbed"]
            df["bertscore_drop_gt"] = df["bertscore_f1_original_gt"] - df["bertscore_f1_perturbed_gt"]
            _write_csv(df, root / "perturb_out" / f"perturb_{model}_{mode}_{level:g}.csv")


def make_plot_tree(root: str | Path, n_per_shard: int = 12, models=MODELS, seed: int = 0) -> Path:
    """Write the fake tree under ``root`` (created) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pairs = ids(n_per_shard)
    write_images(root, pairs, rng)
    for model in models:
        write_knn(root, model, pairs, rng)
        recon = write_recon(root, model, pairs, rng)
        write_captions(root, model, recon, rng)
        write_perturb(root, model, pairs, rng)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/fixtures_plot.py OUT_DIR")
    print(make_plot_tree(sys.argv[1]))
