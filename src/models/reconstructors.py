"""Reconstructors E_post → Ê_pre (stage 4), all working on standardised token matrices.

Every model maps a same-shape batch ``post [B, T_post, D_post]`` to ``pre [B, T_pre, D_pre]`` given
the batch's grids (``pre_grid`` (h, w) with h*w = T_pre, ``post_grid``). How tokens line up is the
store's correspondence:

* ``1:1``   — post token i comes from pre token i.
* ``merge`` — post token (r, c) comes from the m×m pre block at rows r·m.., cols c·m..; a model
  predicts m²·D_pre per post token and *unmerges* it onto the pre grid (``unmerge_blocks``).
* ``none``  — no token correspondence (perceiver latents); T_post → T_pre is learned.

Models:

* ``linear``: the baseline every learned model must beat, fitted in closed form (float64 ridge from
  sufficient statistics accumulated over the training set, so it scales to any number of images; the
  ridge strength is picked from a grid by the exact validation MSE, computed from val statistics;
  the fit is ``vlmc.train.linear_fit``). 1:1 / merge: one affine map per token, D_post → m²·D_pre.
  none: a bilinear map Ê = Ȳ + M (X − X̄) W (token mixing M [T_pre, T_post], channel map W, mean
  images X̄, Ȳ), fitted by alternating least squares started from M = uniform averaging (each
  half-step is exact ridge).
* ``mlp``: per-token MLP (+ a linear skip path, the last layer zero-initialised, so it starts as a
  linear map and learns the nonlinear residual). Unmerges for merge; for none, per-token features
  followed by a learned token map T_post → T_pre.
* ``transformer``: pre-norm encoder with learned 2-D positions (bicubically resized for other grids).
  Length adapter T_post → T_pre: identity for 1:1; a per-token linear "unmerge" (pixel-shuffle) for
  merge, since the block correspondence is exact; learned pre-grid queries cross-attending to the
  encoded post tokens for none (perceiver-inverse). Layers are split before/after the adapter.
  Same linear skip path as the MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmc.models.base import Correspondence
from vlmc.utils.cli import UsageError
from vlmc.utils.io import safe_torch_load

Grid = tuple[int, int]
MODEL_TYPES = ("linear", "mlp", "transformer")
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

# Defaults per (model type, correspondence kind) for flags left unset.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("mlp", "1:1"): {"hidden_size": 2048, "num_layers": 2, "num_heads": 8, "dropout": 0.0},
    ("mlp", "merge"): {"hidden_size": 2048, "num_layers": 2, "num_heads": 8, "dropout": 0.0},
    ("mlp", "none"): {"hidden_size": 2048, "num_layers": 2, "num_heads": 8, "dropout": 0.0},
    ("transformer", "1:1"): {"hidden_size": 512, "num_layers": 2, "num_heads": 8, "dropout": 0.1},
    ("transformer", "merge"): {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "dropout": 0.1},
    ("transformer", "none"): {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "dropout": 0.1},
    ("linear", "1:1"): {"hidden_size": 0, "num_layers": 0, "num_heads": 0, "dropout": 0.0},
    ("linear", "merge"): {"hidden_size": 0, "num_layers": 0, "num_heads": 0, "dropout": 0.0},
    ("linear", "none"): {"hidden_size": 0, "num_layers": 0, "num_heads": 0, "dropout": 0.0},
}


@dataclass
class ReconSpec:
    """Everything needed to rebuild a reconstructor (saved in every checkpoint's ``meta``).

    Attributes:
        model_type: ``linear``, ``mlp`` or ``transformer``.
        d_pre: E_pre channels.
        d_post: E_post channels.
        pre_grid: reference pre grid (the store's; other grids are handled by interpolation).
        post_grid: reference post grid (``(n_latents, 1)`` without correspondence).
        kind: ``1:1``, ``merge`` or ``none``.
        merge: block side for ``merge`` (1 otherwise).
        hidden_size: MLP hidden / transformer width.
        num_layers: MLP linear layers / transformer blocks.
        num_heads: attention heads.
        dropout: dropout probability.
        skip: add a trainable linear path (mlp, transformer).
        ridge: relative ridge strengths tried by the closed-form linear fit (chosen on val when several).
        linear_iters: alternating least-squares rounds (linear, correspondence none).
    """

    model_type: str
    d_pre: int
    d_post: int
    pre_grid: Grid
    post_grid: Grid
    kind: str
    merge: int = 1
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    dropout: float = 0.0
    skip: bool = True
    ridge: list[float] = field(default_factory=lambda: list(RIDGE_GRID))
    linear_iters: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def correspondence(self) -> Correspondence:
        return Correspondence(self.kind, self.merge)  # type: ignore[arg-type]

    @property
    def t_pre(self) -> int:
        return self.pre_grid[0] * self.pre_grid[1]

    @property
    def t_post(self) -> int:
        return self.post_grid[0] * self.post_grid[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pre_grid"], d["post_grid"] = list(self.pre_grid), list(self.post_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReconSpec:
        d = dict(d)
        d["pre_grid"], d["post_grid"] = tuple(d["pre_grid"]), tuple(d["post_grid"])
        return cls(**d)


def make_spec(
    model_type: str,
    corr: Correspondence,
    d_pre: int,
    d_post: int,
    pre_grid: Grid,
    post_grid: Grid,
    **overrides: Any,
) -> ReconSpec:
    """A spec with per-correspondence defaults for every override left as ``None``."""
    if model_type not in MODEL_TYPES:
        raise UsageError(f"unknown --recon_type {model_type!r}; choose {', '.join(MODEL_TYPES)}")
    if corr.kind == "merge" and (pre_grid[0] != post_grid[0] * corr.merge or pre_grid[1] != post_grid[1] * corr.merge):
        raise UsageError(f"pre grid {pre_grid} is not post grid {post_grid} × merge {corr.merge}")
    if corr.kind == "1:1" and tuple(pre_grid) != tuple(post_grid):
        raise UsageError(f"1:1 correspondence but pre grid {pre_grid} != post grid {post_grid}")
    values = {**DEFAULTS[(model_type, corr.kind)], **{k: v for k, v in overrides.items() if v is not None}}
    if model_type == "transformer" and overrides.get("hidden_size") is None:
        values["hidden_size"] = transformer_width(d_pre, d_post, values["hidden_size"])
    spec = ReconSpec(model_type, d_pre, d_post, tuple(pre_grid), tuple(post_grid), corr.kind, corr.merge, **values)
    if model_type == "transformer" and spec.hidden_size % spec.num_heads:
        raise UsageError(f"--hidden_size {spec.hidden_size} is not divisible by --num_heads {spec.num_heads}")
    if model_type == "mlp" and spec.num_layers < 1:
        raise UsageError("--num_layers must be >= 1 for mlp")
    return spec


def transformer_width(d_pre: int, d_post: int, cap: int) -> int:
    """Default transformer width: the data's widest side rounded up to 128, at most ``cap``.

    Real connectors (1024-4096 channels) get ``cap``; a tiny model's 96-128 channels get 128, since a
    wider model than its data buys nothing and costs 16x the compute of the 512-wide default.
    """
    return min(cap, 128 * -(-max(d_pre, d_post) // 128))


# -- token geometry -------------------------------------------------------------------------------


def merge_blocks(x: Tensor, pre_grid: Grid, m: int) -> Tensor:
    """``[B, H*W, D]`` on the pre grid → ``[B, (H/m)*(W/m), m*m*D]`` (each post token's pre block)."""
    b, _, d = x.shape
    h, w = pre_grid
    x = x.reshape(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // m) * (w // m), m * m * d)


def unmerge_blocks(x: Tensor, post_grid: Grid, m: int) -> Tensor:
    """``[B, h*w, m*m*D]`` per post token → ``[B, (h*m)*(w*m), D]`` row-major on the pre grid."""
    b, _, md = x.shape
    h, w = post_grid
    d = md // (m * m)
    x = x.reshape(b, h, w, m, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * m * w * m, d)


class GridPos(nn.Module):
    """Learned 2-D positional embedding on a reference grid, bicubically resized to other grids."""

    def __init__(self, grid: Grid, dim: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pos = nn.Parameter(torch.randn(1, dim, *grid) * 0.02)

    def forward(self, grid: Grid) -> Tensor:
        """``[1, h*w, dim]`` for ``grid``."""
        p = self.pos
        if tuple(grid) != self.grid:
            p = F.interpolate(p, size=tuple(grid), mode="bicubic", align_corners=False)
        return p.flatten(2).transpose(1, 2)


# -- linear ---------------------------------------------------------------------------------------


class LinearMap(nn.Module):
    """The linear E_post → E_pre map (also the skip path of the learned models).

    1:1 / merge: ``unmerge(X @ W + b)``. none: ``Ȳ + M (X − X̄) W`` with fixed token counts.
    """

    def __init__(self, spec: ReconSpec) -> None:
        super().__init__()
        self.kind, self.m = spec.kind, spec.merge
        if spec.kind == "none":
            self.proj = nn.Linear(spec.d_post, spec.d_pre, bias=False)
            self.mix = nn.Parameter(torch.full((spec.t_pre, spec.t_post), 1.0 / spec.t_post))
            self.y_mean = nn.Parameter(torch.zeros(spec.t_pre, spec.d_pre))
            self.register_buffer("x_mean", torch.zeros(spec.t_post, spec.d_post))
        else:
            self.proj = nn.Linear(spec.d_post, self.m * self.m * spec.d_pre)

    def forward(self, post: Tensor, pre_grid: Grid, post_grid: Grid) -> Tensor:
        if self.kind == "none":
            if post.shape[1] != self.mix.shape[1] or pre_grid[0] * pre_grid[1] != self.mix.shape[0]:
                raise UsageError(
                    f"correspondence none needs fixed token counts: model {tuple(self.mix.shape)}, batch "
                    f"{pre_grid[0] * pre_grid[1]}x{post.shape[1]}"
                )
            return self.y_mean + self.mix @ self.proj(post - self.x_mean)
        y = self.proj(post)
        return unmerge_blocks(y, post_grid, self.m) if self.kind == "merge" else y


class LinearRecon(nn.Module):
    """``linear`` model type: a ``LinearMap`` fitted in closed form (``vlmc.train.linear_fit.fit_linear``)."""

    def __init__(self, spec: ReconSpec) -> None:
        super().__init__()
        self.spec = spec
        self.linear = LinearMap(spec)

    def forward(self, post: Tensor, pre_grid: Grid, post_grid: Grid) -> Tensor:
        return self.linear(post, pre_grid, post_grid)


# -- mlp ------------------------------------------------------------------------------------------


def _mlp(d_in: int, hidden: int, d_out: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = [nn.LayerNorm(d_in)]
    dims = [d_in] + [hidden] * (layers - 1) + [d_out]
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*mods)


def _zero_last(seq: nn.Module) -> None:
    last = [m for m in seq.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class MLPRecon(nn.Module):
    """Per-token MLP (+ linear skip); unmerges m²·D_pre per post token; learned token map for none."""

    def __init__(self, spec: ReconSpec) -> None:
        super().__init__()
        self.spec = spec
        m2 = spec.merge * spec.merge
        out = spec.d_pre if spec.kind == "none" else m2 * spec.d_pre
        self.body = _mlp(spec.d_post, spec.hidden_size, out, spec.num_layers, spec.dropout)
        self.linear = LinearMap(spec) if spec.skip else None
        if self.linear is not None:
            _zero_last(self.body)
        if spec.kind == "none":
            self.mix = nn.Parameter(torch.full((spec.t_pre, spec.t_post), 1.0 / spec.t_post))
            self.pos_bias = nn.Parameter(torch.zeros(spec.t_pre, spec.d_pre))

    def forward(self, post: Tensor, pre_grid: Grid, post_grid: Grid) -> Tensor:
        s = self.spec
        y = self.body(post)
        if s.kind == "none":
            y = self.mix @ y + self.pos_bias
        elif s.kind == "merge":
            y = unmerge_blocks(y, post_grid, s.merge)
        return y + self.linear(post, pre_grid, post_grid) if self.linear is not None else y


# -- transformer ----------------------------------------------------------------------------------


def _encoder(spec: ReconSpec, n: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            spec.hidden_size, spec.num_heads, 4 * spec.hidden_size, spec.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        for _ in range(n)
    )


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP: queries attend to a memory (the length adapter for ``none``)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, memory: Tensor) -> Tensor:
        kv = self.norm_kv(memory)
        q = q + self.drop(self.attn(self.norm_q(q), kv, kv, need_weights=False)[0])
        return q + self.drop(self.ff(self.norm_ff(q)))


class TransformerRecon(nn.Module):
    """Pre-norm transformer with learned positions and a T_post → T_pre length adapter (+ linear skip)."""

    def __init__(self, spec: ReconSpec) -> None:
        super().__init__()
        self.spec = spec
        h, m = spec.hidden_size, spec.merge
        n_before = 0 if spec.kind == "1:1" else spec.num_layers // 2
        self.in_proj = nn.Linear(spec.d_post, h)
        self.post_pos = GridPos(spec.post_grid, h)
        self.before = _encoder(spec, n_before)
        if spec.kind == "merge":
            self.unmerge = nn.Linear(h, m * m * h)
        if spec.kind == "none":
            self.cross = CrossAttentionBlock(h, spec.num_heads, spec.dropout)
        self.pre_pos = GridPos(spec.pre_grid, h) if spec.kind != "1:1" else None
        self.after = _encoder(spec, spec.num_layers - n_before)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, spec.d_pre)
        self.linear = LinearMap(spec) if spec.skip else None
        if self.linear is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, post: Tensor, pre_grid: Grid, post_grid: Grid) -> Tensor:
        s = self.spec
        x = self.in_proj(post) + self.post_pos(post_grid)
        for layer in self.before:
            x = layer(x)
        if s.kind == "merge":
            x = unmerge_blocks(self.unmerge(x), post_grid, s.merge) + self.pre_pos(pre_grid)
        elif s.kind == "none":
            q = self.pre_pos(pre_grid).expand(x.shape[0], -1, -1)
            x = self.cross(q, x)
        for layer in self.after:
            x = layer(x)
        y = self.head(self.norm(x))
        return y + self.linear(post, pre_grid, post_grid) if self.linear is not None else y


def build_reconstructor(spec: ReconSpec) -> nn.Module:
    """The model for ``spec.model_type``."""
    cls = {"linear": LinearRecon, "mlp": MLPRecon, "transformer": TransformerRecon}[spec.model_type]
    return cls(spec)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(spec: ReconSpec, model: nn.Module) -> str:
    """One line: type, correspondence, shapes, parameter count."""
    return (
        f"{spec.model_type} ({spec.correspondence}) post {spec.t_post}x{spec.d_post} → pre {spec.t_pre}x{spec.d_pre}, "
        f"{count_params(model) / 1e6:.2f} M params"
    )


BEST = "best_model.pt"


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s state (never aliases live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def checkpoint(model: nn.Module, spec: ReconSpec, **meta: Any) -> dict[str, Any]:
    """The ``best_model.pt`` payload: ``{state_dict, meta}`` (meta holds the spec)."""
    return {"state_dict": state_copy(model), "meta": {"spec": spec.to_dict(), **meta}}


def load_reconstructor(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ReconSpec, dict[str, Any]]:
    """Rebuild a reconstructor from ``best_model.pt`` (or its folder); returns (model in eval mode, spec, meta)."""
    p = Path(path)
    if p.is_dir():
        p = p / BEST
    if not p.exists():
        raise UsageError(f"{p}: no trained reconstructor (run train_recon first)")
    ckpt = safe_torch_load(p, mmap=False)
    spec = ReconSpec.from_dict(ckpt["meta"]["spec"])
    model = build_reconstructor(spec)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), spec, ckpt["meta"]
