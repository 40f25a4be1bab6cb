"""Neighbourhood-overlap metrics between two (or three) spaces for the same N items.

All take integer neighbour lists ``[N, K]`` (row ``i`` = the neighbours of item ``i``, nearest first,
no repeats within a row, as returned by ``vlmc.metrics.knn.knn``), computed once at the largest k and
sliced to smaller ``k``. ``vlmc.metrics.knn`` re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRICS = ("l2", "cosine")


def _lists(nn: np.ndarray | torch.Tensor, k: int | None, name: str) -> np.ndarray:
    """The first ``k`` columns (all when None) of an integer neighbour-list array [N, K]."""
    a = nn.cpu().numpy() if isinstance(nn, torch.Tensor) else np.asarray(nn)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [N, K], got {a.dtype} {a.shape}")
    k = a.shape[1] if k is None else k
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k={k} outside [1, {a.shape[1]}] for {name}")
    return a[:, :k]


def _same_items(*arrays: np.ndarray) -> None:
    """All neighbour lists describe the same N items."""
    if len({a.shape[0] for a in arrays}) != 1:
        raise ValueError(f"neighbour lists disagree on N: {[a.shape[0] for a in arrays]}")


def _runs(parts: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Per row, how many ids occur in all ``length`` of the given lists (rows have no repeats)."""
    s = np.sort(np.concatenate(parts, axis=1), axis=1)
    return (s[:, length - 1 :] == s[:, : s.shape[1] - length + 1]).sum(axis=1)


def overlap_counts(nn_a: np.ndarray, nn_b: np.ndarray, k: int | None = None) -> np.ndarray:
    """``|N_k^A(i) ∩ N_k^B(i)|`` per item (int64 [N]); lists must not repeat ids within a row."""
    a, b = _lists(nn_a, k, "nn_a"), _lists(nn_b, k, "nn_b")
    _same_items(a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError("nn_a and nn_b need the same k")
    return _runs([a, b], 2).astype(np.int64)


def knor_per_item(nn_a: np.ndarray, nn_b: np.ndarray, k: int | None = None) -> np.ndarray:
    """KNOR of each item: ``|N_k^A(i) ∩ N_k^B(i)| / k`` (float64 [N])."""
    c = overlap_counts(nn_a, nn_b, k)
    return c / (k if k is not None else np.asarray(nn_a).shape[1])


def knor(nn_a: np.ndarray, nn_b: np.ndarray, k: int | None = None) -> float:
    """k-nearest-neighbour overlap ratio ``KNOR@k = mean_i |N_k^A(i) ∩ N_k^B(i)| / k``.

    Random, independent neighbourhoods give ``E[KNOR@k] = k / (N - 1)``.
    """
    return float(knor_per_item(nn_a, nn_b, k).mean())


def knor_multi(nn_a: np.ndarray, nn_b: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-item KNOR at several k from one pair of neighbour lists computed at ``max(ks)``."""
    return {int(k): knor_per_item(nn_a, nn_b, int(k)) for k in ks}


def summarize(values: np.ndarray) -> dict[str, float]:
    """``{"mean", "median", "std" (population, ddof=0), "n"}`` of a per-item vector."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}


def jaccard_per_item(nn_a: np.ndarray, nn_b: np.ndarray, k: int | None = None) -> np.ndarray:
    """Mutual-kNN Jaccard ``|N_k^A ∩ N_k^B| / |N_k^A ∪ N_k^B| = c / (2k - c)`` per item."""
    c = overlap_counts(nn_a, nn_b, k)
    kk = k if k is not None else np.asarray(nn_a).shape[1]
    return c / (2 * kk - c)


def rank_displacement(
    nn_a: np.ndarray, nn_b: np.ndarray, k: int | None = None, max_rank: int | None = None
) -> np.ndarray:
    """Mean absolute rank change of A's k nearest neighbours when ranked by B, per item.

    For item i and ``j in N_k^A(i)`` let ``r_A(i, j)`` in 1..k be j's position in A's list and
    ``r_B(i, j)`` its 1-based position in B's list for i, or ``M + 1`` when j is not among B's first
    ``M = max_rank`` neighbours (default: all columns of ``nn_b``). Then

        ``disp_k(i) = (1/k) sum_{j in N_k^A(i)} |r_A(i, j) - r_B(i, j)|``,

    which is 0 iff B ranks A's top k identically, and at most ``M``. It is not symmetric in A, B.

    Returns:
        float64 [N].
    """
    a = _lists(nn_a, k, "nn_a")
    b = _lists(nn_b, max_rank, "nn_b")
    _same_items(a, b)
    n, kk, m = a.shape[0], a.shape[1], b.shape[1]
    span = int(max(a.max(initial=0), b.max(initial=0))) + 1
    offs = np.arange(n, dtype=np.int64)[:, None] * span
    border = np.argsort(b, axis=1, kind="stable")
    keys_b = (np.take_along_axis(b, border, 1) + offs).ravel()
    keys_a = (a + offs).ravel()
    pos = np.minimum(np.searchsorted(keys_b, keys_a), keys_b.size - 1)
    found = keys_b[pos] == keys_a
    # keys_b[pos] is row r's sorted entry pos - r*m, whose original column is border.ravel()[pos]
    r_b = np.where(found, border.ravel()[pos] + 1, m + 1).reshape(n, kk)
    r_a = np.arange(1, kk + 1)[None, :]
    return np.abs(r_a - r_b).mean(axis=1)


def three_way_counts(
    nn_ref: np.ndarray, nn_pre: np.ndarray, nn_post: np.ndarray, k: int | None = None
) -> dict[str, np.ndarray]:
    """Per-item counts of neighbours shared by reference, pre and post spaces (int64 [N] each).

    ``all3 = |R ∩ P ∩ Q|``, ``ref_pre_only = |R ∩ P| - all3``, ``ref_post_only = |R ∩ Q| - all3``,
    ``pre_post_only = |P ∩ Q| - all3`` with ``R, P, Q`` the k-neighbourhoods in ref, pre, post.
    """
    r, p, q = (_lists(x, k, name) for x, name in ((nn_ref, "nn_ref"), (nn_pre, "nn_pre"), (nn_post, "nn_post")))
    _same_items(r, p, q)
    all3 = _runs([r, p, q], 3)
    return {"all3": all3.astype(np.int64),
            "ref_pre_only": (_runs([r, p], 2) - all3).astype(np.int64),
            "ref_post_only": (_runs([r, q], 2) - all3).astype(np.int64),
            "pre_post_only": (_runs([p, q], 2) - all3).astype(np.int64)}


def _sample_pairs(n: int, pairs_sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j when there are at most ``pairs_sample`` of them, else a seeded uniform
    sample (with replacement) of ordered pairs with i != j."""
    if n * (n - 1) // 2 <= pairs_sample:
        return np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs_sample)
    j = rng.integers(0, n - 1, pairs_sample)
    return i, j + (j >= i)


def _pair_distances(X: torch.Tensor, i: np.ndarray, j: np.ndarray, metric: str) -> np.ndarray:
    """``d(x_i, x_j)`` for the listed pairs in float64 (l2, or 1 - cos), in bounded chunks."""
    out = np.empty(len(i))
    step = max(1, 2**22 // max(X.shape[1], 1))
    for s in range(0, len(i), step):
        a, b = X[torch.as_tensor(i[s : s + step])], X[torch.as_tensor(j[s : s + step])]
        if metric == "l2":
            d = torch.linalg.vector_norm(a - b, dim=1)
        else:
            d = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-300)
        out[s : s + step] = d.numpy()
    return out


def distance_correlation(
    A: np.ndarray | torch.Tensor,
    B: np.ndarray | torch.Tensor,
    *,
    metric: str = "l2",
    pairs_sample: int = 100_000,
    seed: int = 0,
) -> dict[str, float]:
    """Pearson and Spearman correlation between pairwise distances in spaces A and B.

    Distances ``d_A(i, j)``, ``d_B(i, j)`` (float64; ``l2`` or ``1 - cos``) over all pairs i < j if
    there are at most ``pairs_sample`` of them, else over ``pairs_sample`` seeded uniform pairs i != j.
    Spearman = Pearson of average ranks. NaN when either distance vector is constant.

    Returns:
        ``{"pearson", "spearman", "n_pairs"}``.
    """
    from scipy.stats import rankdata

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    a, b = (torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t for t in (A, B))
    a, b = a.cpu().to(torch.float64), b.cpu().to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"need [N, D_A] and [N, D_B] with equal N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}")
    i, j = _sample_pairs(a.shape[0], pairs_sample, seed)
    da, db = _pair_distances(a, i, j, metric), _pair_distances(b, i, j, metric)
    return {"pearson": _pearson(da, db), "spearman": _pearson(rankdata(da), rankdata(db)), "n_pairs": len(i)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN if either vector is constant."""
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")
