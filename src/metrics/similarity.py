"""Representation-similarity measures between paired item sets ``X`` [N, D_A] and ``Y`` [N, D_B].

Row ``i`` of both is the same item (e.g. pooled E_pre and E_post of image i). All computations are
in float64 in feature space (cost O(N D_A D_B), never an N x N matrix).

* Linear CKA (Kornblith et al. 2019), biased:
  ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc`` (equal to
  ``HSIC_b(K, L) / sqrt(HSIC_b(K, K) HSIC_b(L, L))``, ``K = Xc Xc^T``, ``L = Yc Yc^T``).
* Linear CKA, debiased: the same ratio with the unbiased HSIC estimator of Song et al. (2012), as
  used by Nguyen et al. (2021): with ``K~``, ``L~`` the Gram matrices with zeroed diagonals,
  ``HSIC_u = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``;
  needs n >= 4; can be slightly negative for unrelated spaces.
* Orthogonal Procrustes residual: ``Xn = Xc / ||Xc||_F``, ``Yn = Yc / ||Yc||_F``; when D_A != D_B the
  narrower one is zero-padded to the wider width (so R ranges over partial isometries);
  ``min_R ||Xn R - Yn||_F / ||Yn||_F = sqrt(2 - 2 ||Xn^T Yn||_*)`` (``||.||_*`` = nuclear norm).
  0 iff ``Y = a X Q + b`` for some orthogonal Q, scale ``a > 0`` and shift ``b``.
* Linear least-squares map: ``Y ~ X W + b`` fitted by (optionally ridge) least squares;
  ``relative_residual = ||Y - X W - b||_F / ||Y - mean(Y)||_F`` and ``r2 = 1 - relative_residual^2``
  (variance-weighted R^2 over all output dimensions), on the fit rows or on a seeded held-out part.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _pair(X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor, min_n: int = 2):
    """Both inputs as float64 [N, D] tensors with equal N >= ``min_n``."""
    x, y = (t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in (X, Y))
    x, y = x.to(torch.float64), y.to(torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need [N, D_A] and [N, D_B] with equal N, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} rows, got {x.shape[0]}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("inputs contain NaN or inf")
    return x, y


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract the column means."""
    return x - x.mean(dim=0, keepdim=True)


def _frob2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a^T b||_F^2``."""
    return float((a.T @ b).square().sum())


def _hsic_unbiased(a: torch.Tensor, b: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC of linear kernels ``K = a a^T``, ``L = b b^T`` (feature space).

    Uses ``tr(K~ L~) = ||a^T b||_F^2 - sum_i K_ii L_ii``, ``1^T K~ 1 = ||a^T 1||^2 - tr K`` and
    ``K~ 1 = a (a^T 1) - diag K``.
    """
    n = a.shape[0]
    ka, kb = a.square().sum(1), b.square().sum(1)
    tr_kl = _frob2(a, b) - float((ka * kb).sum())
    ka1 = a @ a.sum(0) - ka
    kb1 = b @ b.sum(0) - kb
    s_a, s_b = float(ka1.sum()), float(kb1.sum())
    return (tr_kl + s_a * s_b / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(ka1 @ kb1)) / (n * (n - 3))


def linear_cka(X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor, *, debiased: bool = False) -> float:
    """Linear CKA between paired representations (module docstring); NaN if either has no variance.

    Args:
        X: [N, D_A]; Y: [N, D_B] (same items, same order).
        debiased: use the unbiased HSIC estimator (needs N >= 4) instead of the biased one.
    """
    x, y = _pair(X, Y, 4 if debiased else 2)
    x, y = _centre(x), _centre(y)
    if debiased:
        num, da, db = _hsic_unbiased(x, y), _hsic_unbiased(x, x), _hsic_unbiased(y, y)
        denom = math.sqrt(da * db) if da > 0 and db > 0 else 0.0
    else:
        num, denom = _frob2(x, y), math.sqrt(_frob2(x, x) * _frob2(y, y))
    return num / denom if denom > 0 else float("nan")


def _unit_centred(x: torch.Tensor) -> torch.Tensor:
    """Column-centred and scaled to unit Frobenius norm; ValueError if it has no variance."""
    xc = _centre(x)
    norm = float(torch.linalg.matrix_norm(xc))
    if norm == 0:
        raise ValueError("a representation has zero variance (all rows equal)")
    return xc / norm


def _reduced(x: torch.Tensor) -> torch.Tensor:
    """A [min(N, D), N] factor ``R`` with ``x^T = Q R`` for orthonormal Q (``x^T`` itself if D <= N)."""
    return torch.linalg.qr(x.T, mode="r")[1] if x.shape[1] > x.shape[0] else x.T


def procrustes_residual(X: np.ndarray | torch.Tensor, Y: np.ndarray | torch.Tensor) -> float:
    """Relative orthogonal-Procrustes residual ``min_R ||Xn R - Yn||_F / ||Yn||_F`` (module docstring).

    ``||Xn^T Yn||_*`` is computed from the singular values of ``R_x R_y^T`` where ``Xn^T = Q_x R_x``
    (QR, only when D > N), which drops the isometries and keeps the matrix at most N x N.
    """
    x, y = _pair(X, Y)
    xn, yn = _unit_centred(x), _unit_centred(y)
    nuclear = float(torch.linalg.svdvals(_reduced(xn) @ _reduced(yn).T).sum())
    return math.sqrt(max(2.0 - 2.0 * nuclear, 0.0))


def _split(n: int, test_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (fit, eval) row indices; eval = fit when ``test_frac`` is 0."""
    if test_frac <= 0:
        idx = torch.arange(n)
        return idx, idx
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, min(n - 1, round(test_frac * n)))
    return perm[n_test:], perm[:n_test]


def linear_map_fit(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    *,
    ridge: float = 0.0,
    test_frac: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``Y ~ X W + b`` by least squares; report residual and R^2 (module docstring).

    In-sample (``test_frac=0``) with N <= D_A the fit is exact and R^2 = 1 trivially; use
    ``test_frac`` > 0 (a seeded random split) for an out-of-sample figure.

    Args:
        X: [N, D_A] inputs; Y: [N, D_B] targets.
        ridge: L2 penalty ``lambda ||W||_F^2`` (0: minimum-norm least squares via lstsq).
        test_frac: fraction of rows held out for evaluation.
        seed: split seed.

    Returns:
        ``{"r2", "relative_residual", "n_fit", "n_eval"}``.
    """
    x, y = _pair(X, Y)
    fit, ev = _split(x.shape[0], test_frac, seed)
    mx, my = x[fit].mean(0), y[fit].mean(0)
    xf, yf = x[fit] - mx, y[fit] - my
    if ridge > 0:
        W = torch.linalg.solve(xf.T @ xf + ridge * torch.eye(x.shape[1], dtype=x.dtype), xf.T @ yf)
    else:
        W = torch.linalg.lstsq(xf, yf, driver="gelsd").solution
    resid = float((y[ev] - my - (x[ev] - mx) @ W).square().sum())
    total = float((y[ev] - y[ev].mean(0)).square().sum())
    rel = math.sqrt(resid / total) if total > 0 else float("nan")
    return {"r2": 1.0 - rel**2, "relative_residual": rel, "n_fit": int(fit.numel()), "n_eval": int(ev.numel())}
