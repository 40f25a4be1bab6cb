"""CKA, Procrustes and linear-map residuals against analytic cases and explicit Gram-matrix code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from vlmc.metrics import similarity as M

torch.set_num_threads(2)


def _orth(d: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def _gram_cka(X: np.ndarray, Y: np.ndarray, debiased: bool) -> float:
    """Reference CKA from explicit N x N kernel matrices."""
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    if not debiased:
        H = np.eye(n) - 1.0 / n
        hs = lambda a, b: np.trace(a @ H @ b @ H)  # noqa: E731
    else:
        def hs(a, b):
            a, b = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
            one = np.ones(n)
            return (np.trace(a @ b) + one @ a @ one * (one @ b @ one) / ((n - 1) * (n - 2))
                    - 2.0 / (n - 2) * one @ a @ b @ one) / (n * (n - 3))
    return hs(K, L) / np.sqrt(hs(K, K) * hs(L, L))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_gram_formula(debiased):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 7)) + 2.0
    Y = np.tanh(X @ rng.standard_normal((7, 11))) + 0.3 * rng.standard_normal((30, 11))
    assert M.linear_cka(X, Y, debiased=debiased) == pytest.approx(_gram_cka(X, Y, debiased), abs=1e-10)


def test_orthogonal_map_is_perfect():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 16))
    Y = 2.5 * X @ _orth(16, 2) - 4.0
    assert M.linear_cka(X, Y) == pytest.approx(1.0, abs=1e-10)
    assert M.linear_cka(X, Y, debiased=True) == pytest.approx(1.0, abs=1e-10)
    assert M.procrustes_residual(X, Y) == pytest.approx(0.0, abs=1e-6)
    fit = M.linear_map_fit(X, Y)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-10) and fit["relative_residual"] < 1e-6


def test_procrustes_different_widths_zero_padding():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 8))
    V = np.linalg.qr(rng.standard_normal((12, 8)))[0].T  # [8, 12], orthonormal rows: an isometry
    Y = X @ V
    assert M.procrustes_residual(X, Y) == pytest.approx(0.0, abs=1e-6)
    assert M.procrustes_residual(Y, X) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(60, 5, 9), (20, 50, 40), (20, 8, 45)])
def test_procrustes_matches_scipy_with_padding(shape):
    n, da, db = shape
    rng = np.random.default_rng(n + da)
    X, Y = rng.standard_normal((n, da)), rng.standard_normal((n, db))
    xn = (X - X.mean(0)) / np.linalg.norm(X - X.mean(0))
    yn = (Y - Y.mean(0)) / np.linalg.norm(Y - Y.mean(0))
    w = max(da, db)
    xp, yp = np.pad(xn, ((0, 0), (0, w - da))), np.pad(yn, ((0, 0), (0, w - db)))
    R, _ = orthogonal_procrustes(xp, yp)
    ref = np.linalg.norm(xp @ R - yp) / np.linalg.norm(yp)
    assert M.procrustes_residual(X, Y) == pytest.approx(ref, abs=1e-9)


def test_independent_spaces():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((2000, 6)), rng.standard_normal((2000, 6))
    assert abs(M.linear_cka(X, Y, debiased=True)) < 0.02
    assert M.linear_cka(X, Y) < 0.05
    fit = M.linear_map_fit(X, Y, test_frac=0.5, seed=0)
    assert fit["r2"] < 0.02 and fit["n_fit"] + fit["n_eval"] == 2000
    assert M.procrustes_residual(X, Y) > 1.2


def test_linear_map_ridge_and_noise():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 10))
    W = rng.standard_normal((10, 4))
    noise = 0.1 * rng.standard_normal((500, 4))
    Y = X @ W + noise
    fit = M.linear_map_fit(X, Y)
    r2_ref = 1 - ((Y - X @ np.linalg.lstsq(np.c_[X, np.ones(500)], Y, rcond=None)[0][:10]
                   - np.linalg.lstsq(np.c_[X, np.ones(500)], Y, rcond=None)[0][10]) ** 2).sum() \
        / ((Y - Y.mean(0)) ** 2).sum()
    assert fit["r2"] == pytest.approx(r2_ref, abs=1e-10)
    assert M.linear_map_fit(X, Y, ridge=1e-6)["r2"] == pytest.approx(fit["r2"], abs=1e-8)
    assert M.linear_map_fit(X, Y, ridge=1e4)["r2"] < fit["r2"]


def test_bad_input():
    with pytest.raises(ValueError):
        M.linear_cka(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        M.linear_cka(np.ones((3, 2)), np.ones((3, 2)), debiased=True)
    with pytest.raises(ValueError):
        M.procrustes_residual(np.ones((5, 2)), np.random.default_rng(0).standard_normal((5, 2)))
    assert np.isnan(M.linear_cka(np.ones((5, 2)), np.random.default_rng(0).standard_normal((5, 2))))
