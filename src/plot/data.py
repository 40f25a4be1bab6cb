"""Readers of the stage outputs the plot CLIs use: one small function per file format.

Layout under ``--in_dir`` (default ``sample/``): the pipeline's own folder names (``data/output/...``,
``data/output/perturb_out``), so a run's outputs can be copied as they are. Each stage folder is the first of
the listed names that exists, or the one given by its own flag (``--knn_dir`` ...):

    knn_out|knn/<model>/overlap_top<K>_<metric>.json   stage 3 (extract_knn): global + per-k summaries
    knn_out|knn/<model>/per_image.csv, spectra.json    stage 3: per-image KNOR / spectra, mean spectra
    recon_eval/<model>/per_sample.csv                  stage 6 (eval_recon): held-out reconstruction quality
    recon_eval/<model>/loss_maps.pt                    stage 6: per-patch loss maps
    captions/**/captions_<model>.csv                   stage 7, scored by score_captions.py
    perturb_out_scored|perturb_out|perturb/**/perturb_<model>_<mode>_<level>.csv   stage 8, scored
    images/<shard>/<key>.<ext>                         the images (for the loss-map overlays)

Every table is read with strings kept as strings (keys like ``"000010000"``); numeric columns are
converted with :func:`numeric` (``""`` / ``nan`` → NaN). Images are identified by ``(shard, key)``.
A missing *required* column is a one-line ``UsageError`` naming the file; optional columns are used
when present. Where the exact key names of a writer are not final, the mapping lives in one function
here (e.g. :func:`parse_overlap_json`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlmc.utils.cli import UsageError

log = logging.getLogger("vlmc.plot")

ID = ["shard", "key"]
SUBDIRS = {"knn": ("knn_out", "knn"), "recon": ("recon_eval",), "captions": ("captions",),
           "perturb": ("perturb_out_scored", "perturb_out", "perturb"), "images": ("images",)}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PERTURB_MODES = ("mask", "lowrank", "orthogonal", "noise", "none")
_PERTURB_NAME = re.compile(r"^perturb_(?P<model>.+)_(?P<mode>" + "|".join(PERTURB_MODES) + r")_(?P<level>[^_]+)$")


def find_stage_dir(in_dir: str | Path, stage: str) -> Path:
    """The first of ``<in_dir>/<name>`` (names: ``SUBDIRS[stage]``) that exists, else the first name."""
    cands = [Path(in_dir) / name for name in SUBDIRS[stage]]
    return next((c for c in cands if c.is_dir()), cands[0])


def stage_dir(args, stage: str) -> Path:
    """``--<stage>_dir`` when given, else :func:`find_stage_dir` under ``--in_dir``."""
    explicit = getattr(args, f"{stage}_dir", None)
    return Path(explicit) if explicit else find_stage_dir(args.in_dir, stage)


def add_stage_args(p, *stages: str) -> None:
    """``--knn_dir`` / ``--recon_dir`` / ... overrides for the stages a CLI reads."""
    for s in stages:
        names = "|".join(SUBDIRS[s])
        p.add_argument(f"--{s}_dir", default=None, help=f"stage folder; None = the first of <in_dir>/{names} that exists")


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV with every cell as a string (empty stays ``""``)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path}: empty file") from None
    except pd.errors.ParserError as e:
        raise UsageError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None


def require(df: pd.DataFrame, cols, path) -> None:
    """``UsageError`` naming the required columns ``path`` lacks."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: missing required column(s) {', '.join(missing)}")


def numeric(df: pd.DataFrame, cols) -> pd.DataFrame:
    """``df`` with the listed columns (those present) converted to float (unparseable → NaN)."""
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _numeric_like(df: pd.DataFrame, skip=("shard", "key", "model", "image_path")) -> list[str]:
    """Columns other than ids/texts whose non-empty cells all parse as numbers."""
    out = []
    for c in df.columns:
        if c in skip or c.startswith("caption_"):
            continue
        v = df[c][df[c].astype(str).str.strip() != ""]
        if len(v) and pd.to_numeric(v, errors="coerce").notna().sum() + (v.str.lower() == "nan").sum() == len(v):
            out.append(c)
    return out


# -- stage 3: geometry ------------------------------------------------------------------------------


@dataclass
class KnnSummary:
    """What the figures need from one ``overlap_top<K>_<metric>.json``, in a fixed shape."""

    knor: pd.DataFrame  # pair, k, mean, median, std   (pair: pre_post, <ref>_pre, <ref>_post)
    three_way: pd.DataFrame  # ref, k, all3, ref_pre_only, ref_post_only, pre_post_only (mean counts)
    spectra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # side → {energy, singular}
    scalars: dict[str, float] = field(default_factory=dict)  # flattened numeric leaves of "global"
    chance: dict[int, float] = field(default_factory=dict)  # k → E[KNOR] of random neighbourhoods
    n_images: int | None = None
    refs: list[str] = field(default_factory=list)
    protocol: str = ""


_K = re.compile(r"^(?:top)?(\d+)$")
THREE_WAY = ("all3", "ref_pre_only", "ref_post_only", "pre_post_only")
STATS = ("mean", "median", "std")


def _f(v) -> float:
    """JSON number or null → float (null = NaN)."""
    return float("nan") if v is None else float(v)


def parse_overlap_json(d: dict) -> KnnSummary:
    """Map extract_knn's JSON (docs/formats.md, stage 3) onto :class:`KnnSummary`. Keys read::

        n_images, refs, settings.protocol,
        per_k.<k>.{pre_post, <ref>_pre, <ref>_post}.{mean, median, std}   (any entry with a "mean")
        per_k.<k>.three_way.<ref>.{all3, ref_pre_only, ref_post_only, pre_post_only}
        per_k.<k>.chance_knor
        global.*  numeric leaves → scalars ("pre_post.cka_debiased", ...); lists under a "pre"/"post" key
                  whose name contains "energy" / "singular" → spectra (global.spectra.pre.energy_mean_normalized)

    ``per_k`` keys may be ``"10"`` or ``"top10"``; null is NaN. The original pipeline's layout (``"top<k>"``,
    ``"<ref>_pre_top<k>"`` at the top level) is read too.
    """
    if "per_k" not in d:
        return _parse_seed_overlap(d)
    knor, three, chance = [], [], {}
    for kname, entry in d["per_k"].items():
        k = int(_K.match(str(kname)).group(1))
        for pair, stats in entry.items():
            if isinstance(stats, dict) and "mean" in stats:
                knor.append({"pair": pair, "k": k, **{s: _f(stats.get(s)) for s in STATS}})
        for ref, counts in (entry.get("three_way") or {}).items():
            three.append({"ref": ref, "k": k, **{c: _f(counts.get(c)) for c in THREE_WAY}})
        if entry.get("chance_knor") is not None:
            chance[k] = float(entry["chance_knor"])
    glob = d.get("global", {})
    refs = d.get("refs") or sorted({p[: -len("_pre")] for p in (r["pair"] for r in knor) if p.endswith("_pre")})
    return KnnSummary(_frame(knor, ["pair", "k", *STATS]), _frame(three, ["ref", "k", *THREE_WAY]),
                      _find_spectra(glob), _flatten_scalars(glob), chance, d.get("n_images", d.get("n")),
                      list(refs), str((d.get("settings") or {}).get("protocol", "")))


def _parse_seed_overlap(d: dict) -> KnnSummary:
    """The original pipeline's JSON: ``top<k>`` = pre→post, ``<ref>_pre_top<k>`` / ``<ref>_post_top<k>``."""
    pat = re.compile(r"^(?:(?P<ref>.+)_(?P<side>pre|post)_)?top(?P<k>\d+)$")
    knor = []
    for key, stats in d.items():
        m = pat.match(key)
        if m and isinstance(stats, dict) and "mean" in stats:
            pair = "pre_post" if not m["ref"] else f"{m['ref']}_{m['side']}"
            knor.append({"pair": pair, "k": int(m["k"]), **{s: _f(stats.get(s)) for s in STATS}})
    if not knor:
        raise UsageError("overlap JSON has neither 'per_k' nor seed-style 'top<k>' entries")
    glob = d.get("global", {})
    refs = sorted({r["pair"][:-4] for r in knor if r["pair"].endswith("_pre")})
    return KnnSummary(_frame(knor, ["pair", "k", *STATS]), _frame([], ["ref", "k", *THREE_WAY]),
                      _find_spectra(glob), _flatten_scalars(glob), {}, d.get("n_images"), refs, "per_shard (seed)")


def _frame(rows: list[dict], cols: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(cols[:2]).reset_index(drop=True) if len(df) else df


def _flatten_scalars(obj, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a.b.c": value}`` (lists skipped)."""
    out: dict[str, float] = {}
    for k, v in obj.items() if isinstance(obj, dict) else ():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_scalars(v, name + "."))
        elif v is None or (isinstance(v, int | float) and not isinstance(v, bool)):
            out[name] = _f(v)
    return out


def _find_spectra(obj, path: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Lists under keys containing ``energy`` / ``singular`` below a ``pre``/``post``(-prefixed) key."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in obj.items() if isinstance(obj, dict) else ():
        here = (*path, str(k))
        if isinstance(v, dict):
            for side, kinds in _find_spectra(v, here).items():
                out.setdefault(side, {}).update(kinds)
        elif isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):
            side = next((s for s in ("pre", "post") for p in here if p == s or p.startswith(s + "_")), None)
            kind = "energy" if "energy" in k else "singular" if "singular" in k else None
            if side and kind:
                out.setdefault(side, {})[kind] = np.asarray(v, dtype=np.float64)
    return out


@dataclass
class KnnRun:
    model: str
    json_path: Path | None
    summary: KnnSummary | None
    per_image: pd.DataFrame | None
    per_image_path: Path | None


def read_per_image(path: Path) -> pd.DataFrame:
    """stage 3 ``per_image.csv``: required ``shard, key``; every other numeric column converted."""
    df = read_csv(path)
    require(df, ID, path)
    # stores before the normaliser was named in the column: <side>_effective_rank_normalized
    df = df.rename(columns={f"{s}_effective_rank_normalized": f"{s}_effective_rank_norm_min_t1_d" for s in ("pre", "post")})
    return numeric(df, _numeric_like(df))


def load_knn(knn_dir: Path, metric: str = "l2") -> dict[str, KnnRun]:
    """Every ``<knn_dir>/<model>/`` with an ``overlap_top<k>_<metric>.json`` and/or ``per_image.csv``.

    With several JSONs for ``metric`` (different k_max) the largest k_max is used.
    """
    runs = {}
    for d in sorted(p for p in knn_dir.iterdir() if p.is_dir()):
        jsons = sorted(d.glob(f"overlap_top*_{metric}.json"), key=lambda p: _kmax(p.name))
        pim = d / "per_image.csv"
        if not jsons and not pim.exists():
            continue
        summary = None
        if jsons:
            try:
                summary = parse_overlap_json(json.loads(jsons[-1].read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UsageError, AttributeError, TypeError, ValueError) as e:
                raise UsageError(f"{jsons[-1]}: cannot read overlap summary ({e})") from None
            if not summary.spectra and (d / "spectra.json").exists():
                summary.spectra = read_spectra_json(d / "spectra.json")
        runs[d.name] = KnnRun(d.name, jsons[-1] if jsons else None, summary,
                              read_per_image(pim) if pim.exists() else None, pim if pim.exists() else None)
    if not runs:
        raise UsageError(f"{knn_dir}: no <model>/overlap_top<k>_{metric}.json or <model>/per_image.csv")
    return runs


def read_spectra_json(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """stage 3 ``spectra.json``: ``{"n", "pre": [...], "post": [...]}`` mean energy fractions."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e})") from None
    return {s: {"energy": np.asarray(d[s], dtype=np.float64)} for s in ("pre", "post") if d.get(s)}


def _kmax(name: str) -> int:
    m = re.match(r"overlap_top(\d+)_", name)
    return int(m.group(1)) if m else -1


# -- stage 6: reconstruction ------------------------------------------------------------------------

RECON_METRICS = ("mse_pre", "cosine_pre", "reproj_mse", "reproj_cosine")


def read_recon(recon_dir: Path) -> pd.DataFrame:
    """All ``<recon_dir>/<model>/per_sample.csv`` (or ``<recon_dir>/per_sample.csv``) stacked.

    Required: ``shard, key`` and at least one of ``mse_pre, cosine_pre, reproj_mse, reproj_cosine``;
    ``model`` defaults to the folder name.
    """
    files = sorted(recon_dir.glob("*/per_sample.csv")) + sorted(recon_dir.glob("per_sample.csv"))
    if not files:
        raise UsageError(f"{recon_dir}: no <model>/per_sample.csv")
    parts = []
    for f in files:
        df = read_csv(f)
        require(df, ID, f)
        if not any(c in df.columns for c in RECON_METRICS):
            raise UsageError(f"{f}: none of the reconstruction columns {', '.join(RECON_METRICS)}")
        if "model" not in df.columns or (df["model"] == "").all():
            df["model"] = f.parent.name
        parts.append(numeric(df, RECON_METRICS))
    return pd.concat(parts, ignore_index=True)


def read_loss_maps(path: Path) -> dict:
    """stage 6 ``loss_maps.pt``: ``{keys, shards, grids [N,2], maps [N,h,w]}`` as numpy (NaN-padded)."""
    from vlmc.utils.io import safe_torch_load

    try:
        d = safe_torch_load(path, mmap=False)
    except Exception as e:  # a refused / corrupt file is the user's input problem
        raise UsageError(f"{path}: cannot load loss maps ({type(e).__name__}: {e})") from None
    missing = [k for k in ("keys", "shards", "grids", "maps") if k not in d]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)}")
    return {"keys": [str(k) for k in d["keys"]], "shards": [str(s) for s in d["shards"]],
            "grids": np.asarray(d["grids"]).reshape(-1, 2).astype(int), "maps": np.asarray(d["maps"], dtype=np.float64)}


# -- stage 7: captions ------------------------------------------------------------------------------

SCORE_PREFIXES = ("clipscore", "clipcos", "bertscore", "cliptext", "reproj", "attr_acc")


def read_captions(caption_dir: Path) -> pd.DataFrame:
    """Every scored ``captions_<model>.csv`` under ``caption_dir`` (recursively), stacked.

    Required: ``shard, key`` and at least one ``clipscore_*`` / ``bertscore_*`` column (the file was
    scored by score_captions.py). ``model`` comes from a ``model`` column, else the file name. Score
    columns (``clipscore_*``, ``clipcos_*``, ``bertscore_*``, ``cliptext_*``, ``reproj_*``, ``attr_acc*``) become float;
    ``split`` (train / val, from eval_captions --recon_dir) is kept as text.
    """
    files = sorted(caption_dir.rglob("captions_*.csv"))
    if not files:
        raise UsageError(f"{caption_dir}: no captions_<model>.csv")
    parts = []
    for f in files:
        df = read_csv(f)
        require(df, ID, f)
        if not any(c.startswith(("clipscore_", "bertscore_")) for c in df.columns):
            raise UsageError(f"{f}: not scored (no clipscore_* / bertscore_* column; run score_captions.py)")
        if "model" not in df.columns or (df["model"] == "").all():
            df["model"] = f.stem.removeprefix("captions_")
        parts.append(numeric(df, [c for c in df.columns if c.startswith(SCORE_PREFIXES)]))
    return pd.concat(parts, ignore_index=True)


# -- stage 8: perturbations -------------------------------------------------------------------------

PERTURB_SCORES = ("clipscore_original", "clipscore_perturbed", "clipscore_drop", "bertscore_f1",
                  "bertscore_f1_original_gt", "bertscore_f1_perturbed_gt", "bertscore_drop_gt", "clipscore_gt",
                  "clipcos_original", "clipcos_perturbed", "cliptext_cos", "attr_acc_original",
                  "attr_acc_perturbed", "attr_acc_drop")


def read_perturb(perturb_dir: Path, mode: str | None = None) -> pd.DataFrame:
    """Every scored ``perturb_<model>_<mode>_<level>.csv`` under ``perturb_dir`` (recursively), stacked.

    Required: ``shard, key, clipscore_original, clipscore_perturbed``. ``model``/``mode``/``level`` come
    from the file name (the ``mode`` / ``level`` columns win when present). ``mode`` filters.
    """
    files = []
    for f in sorted(perturb_dir.rglob("perturb_*.csv")):
        m = _PERTURB_NAME.match(f.stem)
        if m is None:
            log.warning("%s: name is not perturb_<model>_<mode>_<level>.csv; skipped", f)
        elif mode is None or m["mode"] == mode:
            files.append((f, m))
    if not files:
        raise UsageError(f"{perturb_dir}: no perturb_<model>_{mode or '<mode>'}_<level>.csv")
    parts = []
    for f, m in files:
        df = read_csv(f)
        require(df, [*ID, "clipscore_original", "clipscore_perturbed"], f)
        for col in ("model", "mode", "level"):
            if col not in df.columns or (df[col] == "").all():
                df[col] = m[col]
        parts.append(numeric(df, [*PERTURB_SCORES, "level"]))
    return pd.concat(parts, ignore_index=True)


# -- images -----------------------------------------------------------------------------------------


def find_image(image_dir: Path | None, shard: str, key: str, hint: str = "") -> Path | None:
    """The image of ``(shard, key)``: ``hint`` (a CSV's image_path) if it exists, else ``<image_dir>/<shard>/<key>.*``."""
    if hint and Path(hint).is_file():
        return Path(hint)
    if image_dir is None:
        return None
    folder = image_dir if shard == "_root" else image_dir / shard  # a flat root is the shard "_root"
    for ext in IMAGE_EXTS:
        for cand in (folder / f"{key}{ext}", folder / f"{key}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


ERANK_COLUMNS = {False: ("{s}_effective_rank", "{s}_erank"),
                 True: ("{s}_effective_rank_norm_min_t1_d", "{s}_effective_rank_normalized", "{s}_erank_norm_min_t1_d",
                        "{s}_erank_norm")}


def erank_column(columns, space: str, normalized: bool) -> str | None:
    """The per_image.csv column of the raw (or normalised) effective rank of ``space`` (``pre`` / ``post``),
    under any of the names extract_knn has used; None when absent."""
    return next((c.format(s=space) for c in ERANK_COLUMNS[normalized] if c.format(s=space) in columns), None)


def n_images(run: KnnRun) -> int | None:
    """N of a geometry run: the overlap JSON's ``n_images``, else the rows of per_image.csv."""
    if run.summary is not None and run.summary.n_images:
        return int(run.summary.n_images)
    return len(run.per_image) if run.per_image is not None else None


def chance_knor(run: KnnRun, k: int) -> float:
    """E[KNOR@k] of random neighbourhoods: the JSON's ``chance_knor`` when given, else k / (N − 1)."""
    if run.summary is not None and k in run.summary.chance:
        return run.summary.chance[k]
    n = n_images(run)
    return k / (n - 1) if n and n > 1 else float("nan")


def knor_table(run: KnnRun) -> pd.DataFrame:
    """``pair, k, mean, median, std`` of a model: the JSON's per-k summaries, else derived from
    ``per_image.csv``'s ``<pair>_knor<k>`` columns (std with ddof=0, as extract_knn's summaries)."""
    if run.summary is not None and len(run.summary.knor):
        return run.summary.knor
    rows = []
    pim = run.per_image if run.per_image is not None else pd.DataFrame()
    for c in pim.columns:
        m = re.match(r"^(?P<pair>.+)_knor(?P<k>\d+)$", c)
        if m:
            v = pim[c].dropna().to_numpy(np.float64)
            rows.append({"pair": m["pair"], "k": int(m["k"]), "mean": v.mean() if v.size else np.nan,
                         "median": np.median(v) if v.size else np.nan, "std": v.std() if v.size else np.nan})
    return _frame(rows, ["pair", "k", "mean", "median", "std"])


def perturb_modes(perturb_dir: Path) -> list[str]:
    """The perturbation modes (other than ``none``) with at least one ``perturb_*`` CSV."""
    modes = {m["mode"] for f in perturb_dir.rglob("perturb_*.csv") if (m := _PERTURB_NAME.match(f.stem))}
    return [m for m in PERTURB_MODES if m in modes and m != "none"]


# -- image groups -----------------------------------------------------------------------------------


def image_groups(df: pd.DataFrame, image_dir: Path | None = None) -> pd.Series | None:
    """``scenes`` / ``photos`` per row: ``scenes`` where the image's reference caption states a whole testbed
    scene (:func:`vlmc.data.scenes.is_scene_caption`), else ``photos``.

    The caption is the row's ``caption_gt`` (caption and perturbation CSVs), else ``<image_dir>/<shard>/<key>.txt``.
    None when no row has a caption (the figure then shows one group).
    """
    from vlmc.data.scenes import is_scene_caption

    if "caption_gt" in df.columns:
        caps = df["caption_gt"].fillna("").astype(str)
    elif image_dir is not None and image_dir.is_dir():
        caps = pd.Series([_caption_file(image_dir, s, k) for s, k in zip(df["shard"], df["key"], strict=True)],
                         index=df.index)
    else:
        return None
    if not (caps.str.strip() != "").any():
        return None
    return caps.map(lambda c: "scenes" if is_scene_caption(c) else "photos")


def _caption_file(image_dir: Path, shard: str, key: str) -> str:
    folder = image_dir if shard == "_root" else image_dir / shard
    path = folder / f"{key}.txt"
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""
