"""Spectral statistics against analytic cases and an independent numpy-SVD implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmc.metrics import spectral as S

torch.set_num_threads(2)


def _numpy_stats(x: np.ndarray) -> dict[str, float]:
    """Independent reference: numpy SVD of the token-centred matrix, numpy cosine pairs."""
    x = x.astype(np.float64)
    T, D = x.shape
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s**2 / (s**2).sum()
    nz = p[p > 0]
    cum = np.cumsum(p)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = (u @ u.T)[np.triu_indices(T, 1)]
    out = {"effective_rank": math.exp(-(nz * np.log(nz)).sum())}
    out["effective_rank_normalized"] = out["effective_rank"] / min(T - 1, D)
    for k in (1, 5, 10):
        out[f"top{k}_energy_ratio"] = p[:k].sum()
    out["k80_energy"] = int(np.argmax(cum >= 0.8 - 1e-9)) + 1
    out["k90_energy"] = int(np.argmax(cum >= 0.9 - 1e-9)) + 1
    out.update(cosine_mean=cos.mean(), cosine_std=cos.std(), cosine_median=np.median(cos))
    return out


@pytest.mark.parametrize("shape", [(5, 20, 12), (3, 9, 30), (2, 16, 16)])
def test_matches_numpy_svd(shape):
    rng = np.random.default_rng(sum(shape))
    X = rng.standard_normal(shape) @ np.diag(rng.uniform(0.1, 3, shape[2])) + rng.standard_normal(shape[2])
    got = S.spectral_stats(X.astype(np.float32))
    for b in range(shape[0]):
        ref = _numpy_stats(X.astype(np.float32)[b])
        for key, val in ref.items():
            assert got[key][b] == pytest.approx(val, abs=1e-6), key
        s = np.linalg.svd(X.astype(np.float32)[b].astype(np.float64) - X.astype(np.float32)[b].mean(0),
                          compute_uv=False)
        np.testing.assert_allclose(got["spectrum"][b], s**2 / (s**2).sum(), atol=1e-10)


def test_rank_r_matrix():
    rng = np.random.default_rng(0)
    r = 3
    X = rng.standard_normal((40, r)) @ rng.standard_normal((r, 64)) + 5.0  # offset: centring removes it
    st = S.spectral_stats(X)
    assert st["effective_rank"][0] <= r + 1e-9
    assert st["k90_energy"][0] <= r and st["k80_energy"][0] <= r
    assert st["spectrum"][0, r:].sum() < 1e-12


@pytest.mark.parametrize("s", [1, 4, 10])
def test_equal_singular_values_give_erank_s(s):
    rng = np.random.default_rng(s)
    T, D = 30, 20
    U = rng.standard_normal((T, s))
    U = np.linalg.qr(U - U.mean(0))[0]  # orthonormal, columns orthogonal to 1: centring keeps them
    V = np.linalg.qr(rng.standard_normal((D, s)))[0]
    X = 7.0 * U @ V.T + rng.standard_normal(D)
    st = S.spectral_stats(X)
    assert st["effective_rank"][0] == pytest.approx(s, abs=1e-9)
    assert st["effective_rank_normalized"][0] == pytest.approx(s / min(T - 1, D), abs=1e-9)
    assert st["top1_energy_ratio"][0] == pytest.approx(1 / s, abs=1e-12)
    assert st["k80_energy"][0] == math.ceil(0.8 * s - 1e-9)
    assert st["k90_energy"][0] == math.ceil(0.9 * s - 1e-9)


def test_identical_tokens():
    tok = np.random.default_rng(1).standard_normal(24).astype(np.float32)
    st = S.spectral_stats(np.tile(tok, (50, 1)))
    assert st["cosine_mean"][0] == pytest.approx(1.0, abs=1e-12)
    assert st["cosine_median"][0] == pytest.approx(1.0, abs=1e-12)
    assert st["cosine_std"][0] == pytest.approx(0.0, abs=1e-12)
    assert st["effective_rank"][0] == 0.0  # centred matrix is exactly zero: rank 0
    assert st["k80_energy"][0] == 0 and np.isnan(st["top1_energy_ratio"][0])


def test_zero_matrix_and_single_token():
    z = S.spectral_stats(np.zeros((2, 8, 5)))
    assert (z["effective_rank"] == 0).all() and (z["effective_rank_normalized"] == 0).all()
    assert (z["k90_energy"] == 0).all() and np.isnan(z["top5_energy_ratio"]).all()
    assert (z["cosine_mean"] == 0).all()  # zero tokens: cosine 0 with everything
    one = S.spectral_stats(np.ones((1, 1, 6)))
    assert one["effective_rank"][0] == 0 and one["effective_rank_normalized"][0] == 0
    assert np.isnan(one["cosine_mean"][0])
    assert S.effective_rank(np.zeros((4, 4))) == 0.0


def test_batched_equals_one_by_one_and_chunking():
    X = torch.randn(7, 12, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batched = S.spectral_stats(X, chunk=3)
    for b in range(7):
        single = S.spectral_stats(X[b])
        for key in batched:
            np.testing.assert_allclose(batched[key][b], single[key][0], rtol=1e-12, atol=1e-12)


def test_variable_token_counts_and_mean_spectrum():
    rng = np.random.default_rng(4)
    mats = [rng.standard_normal((t, 8)) for t in (5, 12, 5, 30)]
    st = S.spectral_stats_list(mats)
    for i, m in enumerate(mats):
        assert st["effective_rank"][i] == pytest.approx(S.effective_rank(m), abs=1e-12)
    assert [len(s) for s in st["spectrum"]] == [5, 8, 5, 8]
    mean = S.mean_normalized_spectrum(st["spectrum"])
    padded = np.stack([np.pad(s, (0, 8 - len(s))) for s in st["spectrum"]])
    np.testing.assert_allclose(mean, padded.mean(0))
    assert mean.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(S.mean_normalized_spectrum([np.array([[0.5, 0.5], [1.0, 0.0]]), [1.0]]),
                               [(0.5 + 1 + 1) / 3, 0.5 / 3])


def test_bad_input():
    with pytest.raises(ValueError):
        S.spectral_stats(np.zeros(5))
    with pytest.raises(ValueError):
        S.spectral_stats(np.full((2, 3, 3), np.nan))
