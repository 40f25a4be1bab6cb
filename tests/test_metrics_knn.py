"""Exact kNN backends against scikit-learn and each other; overlap metrics on analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from vlmc.metrics import knn as K
from vlmc.metrics.overlap import _sample_pairs

torch.set_num_threads(2)
BACKENDS = ["torch", "hybrid", "faiss"] if K._faiss() is not None else ["torch"]


def _random(n: int = 600, d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _clustered(n: int = 600, d: int = 32, seed: int = 1) -> np.ndarray:
    """Tight clusters stored contiguously (the adversarial order for group thresholds)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)) * 5
    labels = np.sort(rng.integers(0, 12, n))
    return (centres[labels] + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def _f64_dist(X: np.ndarray, metric: str) -> np.ndarray:
    """Exact float64 distance matrix (squared for l2), +inf on the diagonal."""
    x = X.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - x @ x.T
    else:
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return d


def _assert_same_sets(got: np.ndarray, ref: np.ndarray, X: np.ndarray, metric: str, k: int) -> None:
    """Neighbour sets equal row by row, except where the float64 k-th and (k+1)-th distances are
    closer than float32 GEMM rounding can resolve (documented in vlmc.metrics.knn)."""
    dist = _f64_dist(X, metric)
    xc = X.astype(np.float64) - X.mean(0)
    scale = 1.0 if metric == "cosine" else 2 * (xc * xc).sum(1).max()
    bad = np.flatnonzero((np.sort(got, 1) != np.sort(ref, 1)).any(1))
    for i in bad:
        srt = np.sort(dist[i])
        assert srt[k] - srt[k - 1] < 1e-6 * math.sqrt(X.shape[1]) * scale, f"row {i}: {got[i]} vs {ref[i]}"


@pytest.mark.parametrize("block_mb", [256.0, 0.05])  # one tile / 64-row tiles (two-level selection)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_matches_sklearn(backend, metric, data, block_mb):
    X = _random() if data == "random" else _clustered()
    k = 10
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute",
                          metric="euclidean" if metric == "l2" else "cosine").fit(X.astype(np.float64))
    ref_d, ref_i = nn.kneighbors(X.astype(np.float64))
    ref_i, ref_d = ref_i[:, 1:], ref_d[:, 1:]  # no duplicates in this data: self is first
    res = K.knn(X, k, metric=metric, backend=backend, block_mb=block_mb)
    assert res.indices.shape == (len(X), k) and res.indices.dtype == np.int64
    assert res.distances.dtype == np.float32
    assert not (res.indices == np.arange(len(X))[:, None]).any()
    _assert_same_sets(res.indices, ref_i, X, metric, k)
    exact = np.take_along_axis(_f64_dist(X, metric), res.indices, 1)
    np.testing.assert_allclose(res.distances, exact if metric == "cosine" else np.sqrt(exact), rtol=1e-4, atol=1e-5)
    same = (np.sort(res.indices, 1) == np.sort(ref_i, 1)).all(1)
    np.testing.assert_allclose(res.distances[same], ref_d[same], rtol=1e-4, atol=1e-5)
    assert (np.diff(res.distances, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_backends_identical(metric):
    X = _random(1500, 48, seed=3)
    out = {b: K.knn(X, 20, metric=metric, backend=b) for b in BACKENDS}
    out["torch-tiles"] = K.knn(X, 20, metric=metric, backend="torch", block_mb=0.3)
    base = out["torch"]
    for b, r in out.items():
        np.testing.assert_array_equal(np.sort(r.indices, 1), np.sort(base.indices, 1), err_msg=b)
        np.testing.assert_allclose(r.distances, base.distances, rtol=1e-5, atol=1e-6, err_msg=b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicates_keep_self_out_and_the_copy_in(backend, metric):
    X = _random(400, 16, seed=4) * 30  # large norms: GEMM cancellation would show
    X[17] = X[5]
    X[40] = X[5]
    res = K.knn(X, 6, metric=metric, backend=backend)
    assert not (res.indices == np.arange(len(X))[:, None]).any()
    for i, others in ((5, [17, 40]), (17, [5, 40]), (40, [5, 17])):
        assert res.indices[i, :2].tolist() == others  # ties at distance 0, by index
        assert res.distances[i, :2].tolist() == [0.0, 0.0]
        assert res.distances[i, 2] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,block_mb", [(40, 7, 256.0), (300, 120, 256.0), (300, 10, 0.05)])
def test_all_rows_identical(backend, metric, n, k, block_mb):
    """Everything ties: the neighbours are the k smallest other indices (faiss needs its tie repair)."""
    X = np.tile(_random(1, 8, seed=5) * 3, (n, 1))
    res = K.knn(X, k, metric=metric, backend=backend, block_mb=block_mb)
    expect = np.array([[j for j in range(n) if j != i][:k] for i in range(n)])
    np.testing.assert_array_equal(res.indices, expect)
    assert (res.distances == 0).all()


def test_select_largest_breaks_ties_by_column():
    g = torch.Generator().manual_seed(0)
    S = torch.randint(0, 4, (64, 300), generator=g).float()  # heavy ties
    S[torch.arange(64), torch.arange(64)] = float("-inf")
    v, c = K.select_largest(S, 25)
    for r in range(64):
        row = S[r].numpy()
        order = np.lexsort((np.arange(300), -row))[:25]
        assert c[r].tolist() == order.tolist()
        assert v[r].tolist() == row[order].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_mb", [256.0, 0.05])
def test_exact_ties_broken_by_index(backend, block_mb):
    """Small-integer data with rows x and -x (mean exactly 0): float32 distances are exact, so many
    distances tie exactly; the result must be the first k of lexsort((index, distance))."""
    half = np.random.default_rng(11).integers(-2, 3, (200, 6))
    X = np.concatenate([half, -half]).astype(np.float32)
    n, k = len(X), 12
    d2 = ((X[:, None, :].astype(np.int64) - X[None, :, :].astype(np.int64)) ** 2).sum(-1)
    res = K.knn(X, k, backend=backend, block_mb=block_mb)
    for i in range(n):
        order = [j for j in np.lexsort((np.arange(n), d2[i])) if j != i][:k]
        assert res.indices[i].tolist() == order, i
        np.testing.assert_allclose(res.distances[i], np.sqrt(d2[i, order]), rtol=1e-6)


@pytest.mark.parametrize("levels", [0, 2, 40])
def test_two_level_selection_is_exact(levels):
    """Against a lexsort reference; few levels = many tied group maxima (fallback rows)."""
    g = torch.Generator().manual_seed(levels)
    S = torch.randn(50, 4 * 64, generator=g) if levels == 0 else \
        torch.randint(0, levels, (50, 4 * 64), generator=g).float()
    S[torch.arange(50), torch.arange(50)] = float("-inf")
    v, c = K.select_largest_two_level(S, 30)
    for r in range(50):
        row = S[r].numpy()
        order = np.lexsort((np.arange(row.size), -row))[:30]
        assert c[r].tolist() == order.tolist()
        assert v[r].tolist() == row[order].tolist()


def test_query_subset_and_tiny_blocks():
    X = _random(300, 12, seed=6)
    full = K.knn(X, 5, backend="torch")
    q = np.array([3, 7, 299])
    for be in BACKENDS:
        part = K.knn(X, 5, backend=be, query_idx=q, block_mb=0.001)  # one query row per block
        np.testing.assert_array_equal(part.indices, full.indices[q])


def test_block_rows_bounds_memory():
    rows = K.block_rows(200_000, 256)
    assert rows * 200_000 * 4 <= 256 * 2**20 and rows >= 1


def test_input_errors():
    X = _random(10, 4)
    with pytest.raises(ValueError):
        K.knn(X, 10)
    with pytest.raises(ValueError):
        K.knn(X, 3, metric="manhattan")
    with pytest.raises(ValueError):
        K.knn(X, 3, backend="annoy")
    X[2, 1] = np.nan
    with pytest.raises(ValueError):
        K.knn(X, 3)


def test_auto_backend_on_cpu():
    expect = "hybrid" if K._faiss() is not None else "torch"
    assert K.resolve_backend("auto", torch.device("cpu")) == expect


# ------------------------------------------------------------------------------------- overlap metrics


def test_orthogonal_map_gives_knor_one_and_distance_correlation_one():
    X = _random(500, 16, seed=7).astype(np.float64)
    Q = np.linalg.qr(np.random.default_rng(8).standard_normal((16, 16)))[0]
    Y = X @ Q + 3.0
    a, b = K.knn(X, 10).indices, K.knn(Y, 10).indices
    assert K.knor(a, b) == 1.0
    assert K.jaccard_per_item(a, b).min() == 1.0
    assert K.rank_displacement(a, b).max() == 0.0
    dc = K.distance_correlation(X, Y, pairs_sample=5000)
    assert dc["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert dc["spearman"] == pytest.approx(1.0, abs=1e-9)


def test_independent_spaces_knor_is_k_over_n():
    n, k = 2000, 10
    a = K.knn(_random(n, 16, seed=9), k).indices
    b = K.knn(_random(n, 16, seed=10), k).indices
    p = k / (n - 1)
    # per-item overlap ~ hypergeometric(k draws, k successes, n-1 items); items near-independent
    var = k * p * (1 - p) * (n - 1 - k) / (n - 2)
    tol = 6 * math.sqrt(var / n) / k
    assert abs(K.knor(a, b) - p) < tol
    dc = K.distance_correlation(_random(n, 16, seed=9), _random(n, 16, seed=10), pairs_sample=20000)
    assert abs(dc["pearson"]) < 0.05 and abs(dc["spearman"]) < 0.05


def test_overlap_metrics_by_hand():
    a = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    b = np.array([[2, 1, 9, 8], [4, 3, 2, 0]])
    np.testing.assert_array_equal(K.overlap_counts(a, b), [2, 4])
    np.testing.assert_allclose(K.knor_per_item(a, b), [0.5, 1.0])
    np.testing.assert_allclose(K.knor_per_item(a, b, 2), [1.0, 0.0])
    np.testing.assert_allclose(K.jaccard_per_item(a, b), [2 / 6, 1.0])
    multi = K.knor_multi(a, b, [1, 2, 4])
    assert set(multi) == {1, 2, 4}
    np.testing.assert_allclose(multi[4], K.knor_per_item(a, b, 4))
    # rank displacement: row 0: 1 -> rank 2 (|1-2|), 2 -> 1 (|2-1|), 3, 4 missing -> M+1 = 5
    np.testing.assert_allclose(K.rank_displacement(a, b), [(1 + 1 + 2 + 1) / 4, (3 + 1 + 1 + 3) / 4])
    np.testing.assert_allclose(K.rank_displacement(a, b, k=2, max_rank=2), [1.0, (2 + 1) / 2])
    s = K.summarize(np.array([1.0, 2.0, 6.0]))
    assert s == {"mean": 3.0, "median": 2.0, "std": pytest.approx(np.std([1, 2, 6])), "n": 3}


def test_three_way_counts_by_hand():
    ref = np.array([[1, 2, 3, 4, 5]])
    pre = np.array([[1, 2, 3, 7, 8]])
    post = np.array([[1, 4, 7, 9, 10]])
    c = K.three_way_counts(ref, pre, post)
    assert {key: int(v[0]) for key, v in c.items()} == {
        "all3": 1, "ref_pre_only": 2, "ref_post_only": 1, "pre_post_only": 1}


def test_overlap_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        K.knor(np.zeros((3, 4), int), np.zeros((2, 4), int))
    with pytest.raises(ValueError):
        K.knor(np.zeros((3, 4), int), np.zeros((3, 4), int), k=5)
    with pytest.raises(ValueError):
        K.knor(np.zeros((3, 4)), np.zeros((3, 4)))


def test_distance_correlation_pairs():
    X = _random(30, 5)
    small = K.distance_correlation(X, 2 * X, pairs_sample=10_000)
    assert small["n_pairs"] == 30 * 29 // 2
    i, j = _sample_pairs(1000, 5000, seed=1)
    assert len(i) == 5000 and not (i == j).any() and j.max() < 1000
    big = np.random.default_rng(2).standard_normal((1000, 4))
    r1 = K.distance_correlation(big, big ** 3, pairs_sample=5000, seed=3, metric="cosine")
    r2 = K.distance_correlation(big, big ** 3, pairs_sample=5000, seed=3, metric="cosine")
    assert r1 == r2 and 0 < r1["spearman"] < 1


def test_auto_block_mb_from_free_device_memory():
    from vlmc.metrics.knn import CPU_BLOCK_MB, auto_block_mb

    assert auto_block_mb(torch.device("cpu")) == CPU_BLOCK_MB
    cuda = torch.device("cuda")
    assert auto_block_mb(cuda, free_bytes=100 * 2**30) == 2048.0  # a big free device: the 2 GiB cap
    assert auto_block_mb(cuda, free_bytes=4 * 2**30) == 1024.0  # a quarter of the free memory
    assert auto_block_mb(cuda, free_bytes=2**28) == 256.0  # nearly full: never below 256 MiB
    X = torch.randn(300, 8)
    a = K.knn(X, 5, backend="torch")  # block_mb=None → auto
    b = K.knn(X, 5, backend="torch", block_mb=CPU_BLOCK_MB)
    assert np.array_equal(a.indices, b.indices)
