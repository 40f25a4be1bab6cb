"""Stage-3 orchestration: load stores, align images, compute neighbourhoods and geometry metrics.

The CLI (``src/extract/extract_knn.py``) is a thin wrapper; every step here is a plain, tested
function. The output format (JSON keys, CSV columns) is documented in ``vlmc.extract.extract_knn``.

Images are identified by ``(shard, key)`` (keys repeat across shards). A space is loaded from every
shard folder under a path (``find_shard_dirs``); the shard name is the manifest's ``shard``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmc.metrics.bootstrap import bootstrap_ci
from vlmc.metrics.knn import knn
from vlmc.metrics.overlap import (
    distance_correlation,
    jaccard_per_item,
    knor_per_item,
    rank_displacement,
    summarize,
    three_way_counts,
)
from vlmc.metrics.similarity import linear_cka, procrustes_residual
from vlmc.metrics.spectral import mean_normalized_spectrum, spectral_stats_list
from vlmc.store.vectors import ShardReader, find_shard_dirs
from vlmc.utils.cli import UsageError
from vlmc.utils.io import atomic_open

log = logging.getLogger("vlmc.extract_knn")

Id = tuple[str, str]  # (shard, key)
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_LABELS = ("pre", "post")

# per-image spectral statistics: CSV suffix -> vlmc.metrics.spectral.spectral_stats key
SPECTRAL_COLUMNS = {
    "effective_rank": "effective_rank",
    "effective_rank_norm_min_t1_d": "effective_rank_normalized",  # the normaliser, min(T-1, D), in the name
    "top1_energy_ratio": "top1_energy_ratio",
    "top5_energy_ratio": "top5_energy_ratio",
    "top10_energy_ratio": "top10_energy_ratio",
    "k80_energy": "k80_energy",
    "k90_energy": "k90_energy",
    "cos_mean": "cosine_mean",
    "cos_std": "cosine_std",
    "cos_median": "cosine_median",
}
THREE_WAY = ("all3", "ref_pre_only", "ref_post_only", "pre_post_only")


# ----------------------------------------------------------------------------------------- parsing
def parse_ref(spec: str) -> tuple[str, str]:
    """``LABEL:PATH`` -> ``(label, path)``; UsageError on a bad format or label."""
    label, sep, path = spec.partition(":")
    if not sep or not label or not path:
        raise UsageError(f"--ref {spec!r}: expected LABEL:PATH (e.g. clip:data/clip_ref)")
    if not _LABEL.match(label) or label in RESERVED_LABELS:
        raise UsageError(f"--ref {spec!r}: label must match [A-Za-z0-9][A-Za-z0-9_.-]* and not be pre/post")
    return label, path


def parse_refs(specs: Sequence[str] | None) -> dict[str, str]:
    """Several ``LABEL:PATH`` specs -> ``{label: path}`` (labels unique)."""
    out: dict[str, str] = {}
    for s in specs or []:
        label, path = parse_ref(s)
        if label in out:
            raise UsageError(f"--ref label {label!r} given twice")
        out[label] = path
    return out


def parse_ks(text: str) -> list[int]:
    """``"10,50,100"`` -> sorted unique positive ints."""
    try:
        ks = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise UsageError(f"--k {text!r}: expected comma-separated positive integers") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k {text!r}: expected comma-separated positive integers")
    return ks


# ----------------------------------------------------------------------------------------- loading
@dataclass
class Space:
    """One embedding space: ids in store order and one pooled vector per id."""

    name: str
    ids: list[Id]
    X: torch.Tensor  # [N, D] float32
    dirs: list[Path] = field(default_factory=list)


def _readers(path: str | Path) -> list[ShardReader]:
    return [ShardReader.open(d) for d in find_shard_dirs(path)]


def load_space(name: str, path: str | Path, kind: str, pool: str) -> Space:
    """Pooled vectors of ``kind`` from every shard under ``path``; ids ``(shard, key)`` must be unique."""
    ids: list[Id] = []
    parts: list[torch.Tensor] = []
    readers = _readers(path)
    for r in readers:
        keys, X = r.pooled(kind, pool)
        ids += [(str(r.shard), str(k)) for k in keys]
        if len(keys):
            parts.append(X.float().reshape(len(keys), -1))
    if len(set(ids)) != len(ids):
        raise UsageError(f"{path}: {name} store has duplicate (shard, key) ids")
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise UsageError(f"{path}: {name} vectors have different dims across shards: {sorted(dims)}")
    X = torch.cat(parts) if parts else torch.empty(0, 0)
    log.info("%s: %d images from %d shard(s) under %s", name, len(ids), len(readers), path)
    return Space(name, ids, X, [r.dir for r in readers])


@dataclass
class Aligned:
    """Spaces restricted to the ids present in all of them, in a common order."""

    ids: list[Id]
    X: dict[str, torch.Tensor]
    n_dropped: dict[str, int]


def align(spaces: Sequence[Space]) -> Aligned:
    """Keep the ids present in every space, ordered by (shard, first space's order)."""
    common = set(spaces[0].ids)
    for s in spaces[1:]:
        common &= set(s.ids)
    order = [i for i in spaces[0].ids if i in common]
    order.sort(key=lambda i: i[0])  # stable: groups shards, keeps store order within a shard
    n_dropped = {s.name: len(s.ids) - len(order) for s in spaces}
    X = {}
    for s in spaces:
        pos = {i: n for n, i in enumerate(s.ids)}
        X[s.name] = s.X[torch.as_tensor([pos[i] for i in order], dtype=torch.long)] if order else s.X[:0]
    for name, d in n_dropped.items():
        if d:
            log.warning("%s: %d image(s) dropped (not present in every space)", name, d)
    return Aligned(order, X, n_dropped)


# ------------------------------------------------------------------------------------- neighbours
def shard_groups(ids: Sequence[Id]) -> dict[str, np.ndarray]:
    """Shard name -> row indices of that shard (ascending)."""
    groups: dict[str, list[int]] = {}
    for n, (shard, _) in enumerate(ids):
        groups.setdefault(shard, []).append(n)
    return {s: np.asarray(v, dtype=np.int64) for s, v in groups.items()}


def effective_ks(ks: Sequence[int], n: int, groups: dict[str, np.ndarray] | None,
                 count_self: bool = False) -> list[int]:
    """Requested ks clipped to N-1 (global) or to the smallest shard's size - 1 (per shard), warned.

    With ``count_self`` the query is one of its own k neighbours, so the cap is N (or the shard size).
    """
    size = n if groups is None else min(len(g) for g in groups.values())
    if size < 2:
        what = "images" if groups is None else "images in the smallest shard"
        raise UsageError(f"need at least 2 {what} for kNN, got {size}")
    cap = size if count_self else size - 1
    out = sorted({min(k, cap) for k in ks})
    if any(k > cap for k in ks):
        log.warning("k clipped to %d (= %s%s): requested %s, using %s; at k = %d every neighbourhood is all "
                    "other images, so KNOR there is 1 for any embedding (chance k/(N-1)); pass --k below %d "
                    "(e.g. k <= N/20) for a meaningful overlap", cap, "N" if groups is None else "smallest shard size",
                    "" if count_self else " - 1", list(ks), out, cap, cap)
    return out


def neighbours(X: torch.Tensor, k: int, *, metric: str, backend: str, device: torch.device,
               groups: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Global row indices [N, k] of each row's k nearest neighbours: over all rows, or per shard."""
    if groups is None:
        return knn(X, k, metric=metric, backend=backend, device=device).indices
    out = np.empty((X.shape[0], k), dtype=np.int64)
    for rows in groups.values():
        local = knn(X[torch.as_tensor(rows)], k, metric=metric, backend=backend, device=device).indices
        out[rows] = rows[local]
    return out


def with_self(nn: np.ndarray, k: int) -> np.ndarray:
    """The original pipeline's self-inclusive lists at ``k``: each row's own index, then its first k-1 other neighbours.

    faiss's ``IndexFlatL2.search(X, k)`` on X itself returns the query first (distance 0), so its KNOR@k
    counts the query in both lists: KNOR_self@k = (1 + (k-1)·KNOR_excl@(k-1)) / k for every image.
    (An exact duplicate at distance 0 may come before the query in faiss; here the query is always first.)
    """
    rows = np.arange(nn.shape[0], dtype=np.int64)[:, None]
    return np.concatenate([rows, nn[:, : k - 1].astype(np.int64, copy=False)], axis=1)


# ---------------------------------------------------------------------------------------- metrics
def _finite(x):
    """Python float, None for NaN/inf (strict JSON)."""
    x = float(x)
    return x if math.isfinite(x) else None


def clean_json(obj):
    """Recursively replace NaN/inf floats by None and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.integer | bool):
        return obj if isinstance(obj, bool) else int(obj)
    if isinstance(obj, float | np.floating):
        return _finite(obj)
    return obj


def summarize_ci(values: np.ndarray) -> dict[str, float]:
    """``summarize`` (mean, median, std ddof=0, n) plus the bootstrap 95 % interval of the mean."""
    lo, hi = bootstrap_ci(values)
    return {**summarize(values), "ci95_lo": lo, "ci95_hi": hi}


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        log.warning("%s: %s (reported as null)", getattr(fn, "__name__", fn), e)
        return float("nan")


def pair_global(A: torch.Tensor, B: torch.Tensor, *, metric: str, pairs_sample: int, seed: int) -> dict:
    """Whole-set similarity of two paired spaces: CKA (debiased and biased), Procrustes, distance corr."""
    dc = _safe(distance_correlation, A, B, metric=metric, pairs_sample=pairs_sample, seed=seed)
    if not isinstance(dc, dict):
        dc = {"pearson": float("nan"), "spearman": float("nan"), "n_pairs": 0}
    return {
        "cka_debiased": _safe(linear_cka, A, B, debiased=True),
        "cka": _safe(linear_cka, A, B),
        "procrustes_residual": _safe(procrustes_residual, A, B),
        "dist_pearson": dc["pearson"],
        "dist_spearman": dc["spearman"],
        "dist_n_pairs": int(dc["n_pairs"]),
    }


def chance_knor(k: int, n: int, groups: dict[str, np.ndarray] | None, count_self: bool = False) -> float:
    """Expected KNOR@k of independent random neighbourhoods: k/(N-1), or its mean over images per shard.

    With ``count_self`` (the query is in both lists): (1 + (k-1)²/(N-1)) / k.
    """
    def one(size: int) -> float:
        return (1 + (k - 1) ** 2 / (size - 1)) / k if count_self else k / (size - 1)

    if groups is None:
        return one(n)
    return float(sum(len(g) * one(len(g)) for g in groups.values()) / n)


def overlap_metrics(nn: dict[str, np.ndarray], refs: Sequence[str], ks: Sequence[int],
                    groups: dict[str, np.ndarray] | None, n: int,
                    count_self: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Per-k summaries (JSON ``per_k``) and per-image KNOR columns (CSV) from neighbour lists at max(ks).

    Every KNOR summary carries a seeded 95 % bootstrap interval over images (``ci95_lo``, ``ci95_hi``;
    ``vlmc.metrics.bootstrap``); ``chance_knor`` is the value of random neighbourhoods."""
    per_k: dict[str, dict] = {}
    cols: dict[str, np.ndarray] = {f"pre_post_knor{k}": knor_per_item(nn["pre"], nn["post"], k) for k in ks}
    for r in refs:  # column order: pre_post_knor<k> for every k, then per ref <ref>_pre_knor<k>, <ref>_post_knor<k>
        for k in ks:
            cols[f"{r}_pre_knor{k}"] = knor_per_item(nn[r], nn["pre"], k)
            cols[f"{r}_post_knor{k}"] = knor_per_item(nn[r], nn["post"], k)
    for k in ks:
        entry: dict = {"pre_post": summarize_ci(cols[f"pre_post_knor{k}"])}
        for r in refs:
            entry[f"{r}_pre"] = summarize_ci(cols[f"{r}_pre_knor{k}"])
            entry[f"{r}_post"] = summarize_ci(cols[f"{r}_post_knor{k}"])
        entry["three_way"] = {
            r: {c: float(v.mean()) for c, v in three_way_counts(nn[r], nn["pre"], nn["post"], k).items()}
            for r in refs
        }
        entry["pre_post_detail"] = {
            "rank_displacement": summarize(rank_displacement(nn["pre"], nn["post"], k)),
            "jaccard": summarize(jaccard_per_item(nn["pre"], nn["post"], k)),
        }
        entry["chance_knor"] = chance_knor(k, n, groups, count_self)
        per_k[str(k)] = entry
    return per_k, cols


# --------------------------------------------------------------------------------------- spectra
def token_spectra(path: str | Path, kind: str, ids: Sequence[Id], *, device: torch.device,
                  batch: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-image spectral stats (``SPECTRAL_COLUMNS`` names) of ``kind`` tokens for ``ids`` (in order),
    and the mean normalised spectrum over those images."""
    want = {i: n for n, i in enumerate(ids)}
    cols = {c: np.full(len(ids), np.nan) for c in SPECTRAL_COLUMNS}
    spectra: list[np.ndarray] = []
    seen = 0
    for r in _readers(path):
        keys, mats = r.tokens(kind)
        sel = [(want[(str(r.shard), str(k))], m) for k, m in zip(keys, mats, strict=True) if (str(r.shard), str(k)) in want]
        for s in range(0, len(sel), batch):
            part = sel[s : s + batch]
            stats = spectral_stats_list([m.float() for _, m in part], device=device)
            for j, (row, _) in enumerate(part):
                for c, src in SPECTRAL_COLUMNS.items():
                    cols[c][row] = float(stats[src][j])
            spectra += [np.asarray(v) for v in stats["spectrum"]]
            seen += len(part)
    if seen != len(ids):
        raise UsageError(f"{path}: {kind} tokens found for {seen} of {len(ids)} aligned images")
    return cols, mean_normalized_spectrum(spectra)


# ---------------------------------------------------------------------------------------- writing
def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    f = float(v)
    if math.isnan(f):
        return ""
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def write_per_image_csv(path: str | Path, ids: Sequence[Id], cols: dict[str, np.ndarray]) -> list[str]:
    """``shard, key`` (strings, written verbatim) then ``cols`` in order; NaN -> empty cell. Atomic."""
    header = ["shard", "key", *cols]
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, (shard, key) in enumerate(ids):
            w.writerow([shard, key, *(_fmt(c[n]) for c in cols.values())])
    return header
