"""The closed-form fit of the ``linear`` reconstructor: float64 ridge from sufficient statistics.

1:1 / merge: one affine map per token, fitted in one pass. none: the bilinear map
Ê = Ȳ + M (X − X̄) W, fitted by alternating least squares started from M = uniform averaging.
The ridge strength is picked from ``spec.ridge`` by the exact validation MSE (val statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlmc.models.reconstructors import Grid, LinearMap, ReconSpec, merge_blocks

Batches = Callable[[], Iterable[tuple[Tensor, Tensor, Grid, Grid]]]
F64 = torch.float64


@dataclass
class LeastSquares:
    """Sufficient statistics of ``Y ≈ X W``: ``G = XᵀX``, ``C = XᵀY``, ``Σ Y²`` and the element count of Y."""

    gram: Tensor
    cross: Tensor
    yy: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, d_in: int, d_out: int, device: torch.device) -> LeastSquares:
        return cls(torch.zeros(d_in, d_in, dtype=F64, device=device), torch.zeros(d_in, d_out, dtype=F64, device=device))

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x [N, d_in]`` → ``y [N, d_out]`` (float64)."""
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.yy += float((y * y).sum())
        self.n += y.numel()

    def mse(self, w: Tensor) -> float:
        """Mean squared error of ``X W`` against ``Y`` over the accumulated rows."""
        return (float((w * (self.gram @ w)).sum()) - 2 * float((w * self.cross).sum()) + self.yy) / max(self.n, 1)


def _ridge_solve(gram: Tensor, cross: Tensor, ridge: float, n_free: int | None = None) -> Tensor:
    """Solve ``(G + λI) W = C`` in float64; λ = ridge × mean diagonal; the last rows past ``n_free`` unpenalised."""
    d = gram.shape[0]
    reg = torch.ones(d, dtype=gram.dtype, device=gram.device)
    if n_free is not None:
        reg[n_free:] = 0.0
    lam = ridge * gram.diagonal()[: n_free or d].mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + torch.diag(reg * lam), cross)


def _solve(train: LeastSquares, val: LeastSquares | None, grid: Sequence[float], n_free: int | None = None):
    """Ridge solution for each relative strength in ``grid``; the one with the lowest validation MSE.

    Returns ``(W, ridge, val_mse)`` (``val_mse`` is ``None`` without validation statistics).
    """
    if val is None or len(grid) == 1:
        return _ridge_solve(train.gram, train.cross, grid[0], n_free), grid[0], None
    best = None
    for r in grid:
        w = _ridge_solve(train.gram, train.cross, r, n_free)
        m = val.mse(w)
        if best is None or m < best[2]:
            best = (w, r, m)
    return best


@torch.no_grad()
def fit_linear(
    model: nn.Module,
    batches: Batches,
    device: torch.device,
    log: Callable[[str], None] = print,
    val_batches: Batches | None = None,
) -> dict[str, Any]:
    """Fit ``model.linear`` in closed form from standardised batches ``(post, pre, pre_grid, post_grid)``.

    With ``val_batches`` and several ``spec.ridge`` values, each solve picks the strength with the
    lowest validation MSE (computed exactly from validation sufficient statistics — the same use of
    the val split as best-epoch selection for the learned models). ``batches`` is called once per pass
    (1:1/merge: one pass; none: 1 + 2·``linear_iters`` passes; as many over ``val_batches``).

    Returns:
        ``{"ridge": chosen relative strength, "val_mse": its validation MSE or None}``.
    """
    spec, lin = model.spec, model.linear
    if spec.kind != "none":
        return _fit_tokenwise(lin, batches, val_batches, device, spec, log)
    return _fit_bilinear(lin, batches, val_batches, device, spec, log)


def _tokenwise_stats(batches: Batches, device: torch.device, spec: ReconSpec, d_out: int) -> LeastSquares:
    ls = LeastSquares.zeros(spec.d_post + 1, d_out, device)
    for post, pre, pre_grid, _ in batches():
        x = post.to(device, F64).reshape(-1, spec.d_post)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64, device=device)], 1)
        y = pre.to(device, F64)
        y = merge_blocks(y, pre_grid, spec.merge) if spec.kind == "merge" else y
        ls.add(x, y.reshape(-1, d_out))
    return ls


def _fit_tokenwise(lin: LinearMap, batches: Batches, val_batches: Batches | None, device: torch.device,
                   spec: ReconSpec, log: Callable[[str], None]) -> dict[str, Any]:
    d_out = lin.proj.out_features
    train = _tokenwise_stats(batches, device, spec, d_out)
    val = _tokenwise_stats(val_batches, device, spec, d_out) if val_batches is not None and len(spec.ridge) > 1 else None
    w, ridge, val_mse = _solve(train, val, spec.ridge, n_free=spec.d_post)
    lin.proj.weight.copy_(w[:-1].T.float())
    lin.proj.bias.copy_(w[-1].float())
    log(f"linear ridge {ridge:g} (train mse {train.mse(w):.5f}" + (f", val mse {val_mse:.5f})" if val_mse is not None else ")"))
    return {"ridge": ridge, "val_mse": val_mse}


def _means(batches: Batches, device: torch.device, spec: ReconSpec) -> tuple[Tensor, Tensor]:
    x_sum = torch.zeros(spec.t_post, spec.d_post, dtype=F64, device=device)
    y_sum = torch.zeros(spec.t_pre, spec.d_pre, dtype=F64, device=device)
    n = 0
    for post, pre, _, _ in batches():
        x_sum += post.to(device, F64).sum(0)
        y_sum += pre.to(device, F64).sum(0)
        n += post.shape[0]
    return x_sum / n, y_sum / n


def _w_stats(batches: Batches, device: torch.device, spec: ReconSpec, mix: Tensor, x_mean: Tensor, y_mean: Tensor):
    """W-step rows: ``(M Xc)`` → ``Y − Ȳ`` over every (image, pre token)."""
    ls = LeastSquares.zeros(spec.d_post, spec.d_pre, device)
    for post, pre, _, _ in batches():
        z = mix @ (post.to(device, F64) - x_mean)
        ls.add(z.reshape(-1, spec.d_post), (pre.to(device, F64) - y_mean).reshape(-1, spec.d_pre))
    return ls


def _m_stats(batches: Batches, device: torch.device, spec: ReconSpec, w: Tensor, x_mean: Tensor, y_mean: Tensor):
    """M-step rows: for every (image, channel), ``U[:, c]`` → ``(Y − Ȳ)[:, c]`` with ``U = Xc W``."""
    ls = LeastSquares.zeros(spec.t_post, spec.t_pre, device)
    for post, pre, _, _ in batches():
        u = (post.to(device, F64) - x_mean) @ w  # [B, T_post, D_pre]
        yc = pre.to(device, F64) - y_mean  # [B, T_pre, D_pre]
        ls.add(u.transpose(1, 2).reshape(-1, spec.t_post), yc.transpose(1, 2).reshape(-1, spec.t_pre))
    return ls


def _fit_bilinear(lin: LinearMap, batches: Batches, val_batches: Batches | None, device: torch.device,
                  spec: ReconSpec, log: Callable[[str], None]) -> dict[str, Any]:
    x_mean, y_mean = _means(batches, device, spec)
    use_val = val_batches is not None and len(spec.ridge) > 1
    mix = torch.full((spec.t_pre, spec.t_post), 1.0 / spec.t_post, dtype=F64, device=device)
    best: dict[str, Any] = {}
    for it in range(max(1, spec.linear_iters)):
        train = _w_stats(batches, device, spec, mix, x_mean, y_mean)
        val = _w_stats(val_batches, device, spec, mix, x_mean, y_mean) if use_val else None
        w, r_w, _ = _solve(train, val, spec.ridge)
        before = train.mse(w)
        train = _m_stats(batches, device, spec, w, x_mean, y_mean)
        val = _m_stats(val_batches, device, spec, w, x_mean, y_mean) if use_val else None
        a, r_m, val_mse = _solve(train, val, spec.ridge)
        mix = a.T
        log(f"linear ALS round {it + 1}: train mse {before:.5f} → {train.mse(a):.5f} (ridge W {r_w:g}, M {r_m:g}"
            + (f", val mse {val_mse:.5f})" if val_mse is not None else ")"))
        if not best or val_mse is None or val_mse < best["val_mse"]:  # keep the best round on val
            best = {"w": w, "mix": mix, "ridge": [r_w, r_m], "val_mse": val_mse, "round": it + 1}
    w, mix = best.pop("w"), best.pop("mix")
    lin.proj.weight.copy_(w.T.float())
    lin.mix.copy_(mix.float())
    lin.y_mean.copy_(y_mean.float())
    lin.x_mean.copy_(x_mean.float())
    return best
