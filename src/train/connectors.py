"""Replacement connectors E_pre → E_post, trained between a frozen vision tower and a frozen LM.

A connector maps one image's E_pre ``[T_pre, D_pre]`` (canonical order: row-major over the pre grid,
exactly what the family adapter's ``encode`` returns) to the E_post the family's language model
expects. The *output layout* is the family's correspondence (``FamilyAdapter.correspondence``):

* ``1:1``   — one output token per pre token (LLaVA: T_post = T_pre);
* ``merge`` — one output token per ``m x m`` pre block, row-major over the ``(h/m, w/m)`` grid
  (Qwen: T_post = T_pre / 4, which varies with the image's aspect ratio);
* ``none``  — a fixed number ``n_out`` of tokens without spatial meaning (Idefics2: ``n_latents``).

Every connector produces exactly that count, whatever its type, because the LM's prompt holds
exactly that many image placeholder tokens.

Types (``CONNECTORS`` registry, keyed by name; ``@register_connector`` adds one):

* ``mlp`` — Linear-GELU-Linear per output token, LLaVA-1.5's projector. ``merge``: the ``m x m`` block
  is concatenated first (``m²·D_pre`` in, as Qwen's patch merger). ``none``: E_pre is first average-
  pooled (2-D, adaptive) onto an ``n_out``-token grid (the factorisation of ``n_out`` nearest to the
  pre grid's aspect ratio, e.g. 24x24 → 8x8 for Idefics2's 64 latents), then the MLP per token.
* ``crossattn`` — perceiver-style: learned queries attend to E_pre (+ learned 2-D positions,
  bicubically resized to other grids). ``none``: ``n_out`` learned latent queries. Spatial outputs
  (``1:1``/``merge``): a learned 2-D query grid on the output grid, plus the projected input average-
  pooled onto that grid (so each query starts from its own region and attends globally). Keys/values
  are ``[E_pre; queries]`` (Idefics2's resampler does the same). Any output token count works.
* ``invertible`` — a normalising flow on D_pre (``num_layers`` affine coupling layers, RealNVP-style,
  per token) followed by one linear map to D_post (after the block concatenation for ``merge`` /
  the pooling for ``none``). What is invertible, exactly:

  - the flow ``f: R^D_pre → R^D_pre`` is a bijection with an exact inverse (``inverse_flow``):
    each coupling keeps half the channels ``a`` and maps the other half ``b ↦ b·exp(s(a)) + t(a)``
    with ``s = tanh(·)·scale`` bounded, so ``b = (y_b − t(a))·exp(−s(a))``; channel halves alternate
    via a fixed permutation. Log-determinant: ``Σ s``. It starts as the identity (zero-initialised
    last layers).
  - the input standardisation (fixed per-channel affine map from train-split statistics) and the
    ``merge`` block concatenation (a reshape) are bijections too.
  - the final linear map ``W: R^(m²·D_pre) → R^D_post`` is *left*-invertible (``pinv_post`` uses the
    pseudo-inverse) only when it is injective: full column rank and ``D_post ≥ m²·D_pre``. LLaVA-1.5
    (1024 → 4096) qualifies; Qwen2.5-VL (4·1280 = 5120 → 3584) cannot; the pooling of ``none``
    (Idefics2) is many-to-one. So: an invertible connector is exactly invertible on LLaVA, and
    invertible up to the linear map's null space / the pooling elsewhere.

All connectors work in standardised spaces: ``ReplacementConnector`` wraps a core with the
per-channel mean/std of E_pre and of the ORIGINAL connector's E_post (training split,
``vlmc.store.normalization.NormStats``): input ``(E_pre − μ_pre)/σ_pre``, core output ``z``, returned E_post
``z·σ_post + μ_post`` (so a fresh connector already lands at the scale the LM is used to, and the
geometry regulariser is a plain MSE between ``z`` and the standardised original E_post).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmc.models.base import Correspondence
from vlmc.models.reconstructors import GridPos, merge_blocks, state_copy, unmerge_blocks
from vlmc.store.normalization import NormStats
from vlmc.utils.cli import UsageError
from vlmc.utils.io import safe_torch_load

Grid = tuple[int, int]
BEST = "best_model.pt"
CONNECTORS: dict[str, type[nn.Module]] = {}


def register_connector(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a connector core to ``CONNECTORS`` under ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in CONNECTORS:
            raise ValueError(f"connector {name!r} registered twice")
        CONNECTORS[name] = cls
        return cls

    return deco


def connector_types() -> tuple[str, ...]:
    """Registered connector names, sorted."""
    return tuple(sorted(CONNECTORS))


# -- spec ------------------------------------------------------------------------------------------


@dataclass
class ConnectorSpec:
    """Everything needed to rebuild a connector (saved in every checkpoint).

    Attributes:
        connector_type: registry name (``mlp``, ``crossattn``, ``invertible``).
        d_pre: E_pre channels.
        d_post: E_post channels (the LM's hidden size).
        kind: output layout, the family's correspondence: ``1:1``, ``merge`` or ``none``.
        merge: block side for ``merge`` (1 otherwise).
        n_out: output tokens for ``none`` (0 otherwise).
        pre_grid: reference pre grid (learned positions are resized for other grids).
        hidden_size: MLP hidden width / attention width / coupling-network width.
        num_layers: crossattn blocks / coupling layers (the mlp always has two linear layers).
        num_heads: attention heads (crossattn).
        dropout: dropout probability (crossattn, mlp).
        extra: free-form facts (family, model, ...).
    """

    connector_type: str
    d_pre: int
    d_post: int
    kind: str
    merge: int = 1
    n_out: int = 0
    pre_grid: Grid = (1, 1)
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def correspondence(self) -> Correspondence:
        return Correspondence(self.kind, self.merge)  # type: ignore[arg-type]

    def out_grid(self, pre_grid: Grid) -> Grid:
        """Output token grid for an image whose pre grid is ``pre_grid``; ``(n_out, 1)`` for ``none``."""
        h, w = pre_grid
        if self.kind == "1:1":
            return (h, w)
        if self.kind == "merge":
            m = self.merge
            if h % m or w % m:
                raise UsageError(f"pre grid {pre_grid} is not divisible by the {m}x{m} merge")
            return (h // m, w // m)
        return (self.n_out, 1)

    def out_tokens(self, pre_grid: Grid) -> int:
        g = self.out_grid(pre_grid)
        return g[0] * g[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pre_grid"] = list(self.pre_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectorSpec:
        d = dict(d)
        d["pre_grid"] = tuple(d["pre_grid"])
        return cls(**d)


def make_spec(
    connector_type: str,
    corr: Correspondence,
    d_pre: int,
    d_post: int,
    pre_grid: Grid,
    n_out: int = 0,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    dropout: float | None = None,
    **extra: Any,
) -> ConnectorSpec:
    """A spec with per-type defaults for every size left ``None``.

    Defaults: ``mlp`` hidden = D_post (LLaVA) or m²·D_pre for merge (Qwen's merger); ``crossattn``
    width = D_pre capped at 1024, 2 blocks, 8 heads (fewer when the width needs it); ``invertible``
    4 coupling layers of width D_pre (capped at 1024).
    """
    if connector_type not in CONNECTORS:
        raise UsageError(f"unknown connector {connector_type!r}; choose {', '.join(connector_types())}")
    if corr.kind == "none" and n_out < 1:
        raise UsageError("a connector without token correspondence needs n_out >= 1 output tokens")
    m = corr.merge if corr.kind == "merge" else 1
    if connector_type == "mlp":
        hidden = hidden_size or (m * m * d_pre if corr.kind == "merge" else d_post)
        layers, heads = 2, 0
    elif connector_type == "crossattn":
        hidden = hidden_size or min(d_pre, 1024)
        layers = num_layers if num_layers is not None else 2
        heads = num_heads or max(h for h in (8, 4, 2, 1) if hidden % h == 0)
        if hidden % heads:
            raise UsageError(f"--hidden_size {hidden} is not divisible by --num_heads {heads}")
        if layers < 1:
            raise UsageError("crossattn needs --num_layers >= 1")
    else:
        hidden = hidden_size or min(d_pre, 1024)
        layers = num_layers if num_layers is not None else 4
        heads = 0
        if d_pre < 2:
            raise UsageError("an invertible connector needs D_pre >= 2 (coupling splits the channels)")
    return ConnectorSpec(
        connector_type, int(d_pre), int(d_post), corr.kind, m, int(n_out if corr.kind == "none" else 0),
        (int(pre_grid[0]), int(pre_grid[1])), int(hidden), int(layers), int(heads),
        float(dropout if dropout is not None else 0.0), dict(extra),
    )


# -- token layout helpers ----------------------------------------------------------------------------


def pooled_grid(n_out: int, pre_grid: Grid) -> Grid:
    """The ``(gh, gw)`` with ``gh·gw = n_out`` whose aspect ratio is closest to ``pre_grid``'s."""
    target = math.log(pre_grid[0] / pre_grid[1])
    pairs = [(a, n_out // a) for a in range(1, n_out + 1) if n_out % a == 0]
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - target), p[0]))


def to_grid(x: Tensor, grid: Grid) -> Tensor:
    """``[B, h*w, D]`` → ``[B, D, h, w]``."""
    b, _, d = x.shape
    return x.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def pool_tokens(x: Tensor, grid: Grid, out: Grid) -> Tensor:
    """Adaptive 2-D average pooling of row-major tokens ``[B, h*w, D]`` onto ``out`` → ``[B, gh*gw, D]``."""
    if tuple(grid) == tuple(out):
        return x
    return F.adaptive_avg_pool2d(to_grid(x, grid), out).flatten(2).transpose(1, 2)


# -- cores -------------------------------------------------------------------------------------------


@register_connector("mlp")
class MLPConnector(nn.Module):
    """Linear-GELU-Linear per output token (after block concatenation / pooling, see the module doc)."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        d_in = spec.merge * spec.merge * spec.d_pre if spec.kind == "merge" else spec.d_pre
        self.linear_1 = nn.Linear(d_in, spec.hidden_size)
        self.act = nn.GELU()
        self.drop = nn.Dropout(spec.dropout)
        self.linear_2 = nn.Linear(spec.hidden_size, spec.d_post)

    def forward(self, x: Tensor, pre_grid: Grid) -> Tensor:
        s = self.spec
        if s.kind == "merge":
            x = merge_blocks(x, pre_grid, s.merge)
        elif s.kind == "none":
            x = pool_tokens(x, pre_grid, pooled_grid(s.n_out, pre_grid))
        return self.linear_2(self.drop(self.act(self.linear_1(x))))


class ResamplerBlock(nn.Module):
    """Pre-norm block: queries attend to ``[context; queries]``, then an MLP (Idefics2 resampler style)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_ctx, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, ctx: Tensor) -> Tensor:
        qn = self.norm_q(q)
        kv = torch.cat([self.norm_ctx(ctx), qn], dim=1)
        q = q + self.drop(self.attn(qn, kv, kv, need_weights=False)[0])
        return q + self.drop(self.ff(self.norm_ff(q)))


@register_connector("crossattn")
class CrossAttnConnector(nn.Module):
    """Learned queries attending to E_pre (perceiver-like); any output token count."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        w = spec.hidden_size
        self.in_proj = nn.Linear(spec.d_pre, w)
        self.pre_pos = GridPos(spec.pre_grid, w)
        if spec.kind == "none":
            self.latents = nn.Parameter(torch.randn(spec.n_out, w) * 0.02)
        else:
            self.query_pos = GridPos(spec.out_grid(spec.pre_grid), w)
        self.blocks = nn.ModuleList(ResamplerBlock(w, spec.num_heads, spec.dropout) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, spec.d_post)

    def forward(self, x: Tensor, pre_grid: Grid) -> Tensor:
        s = self.spec
        ctx = self.in_proj(x) + self.pre_pos(pre_grid)
        if s.kind == "none":
            q = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            out = s.out_grid(pre_grid)
            q = pool_tokens(ctx, pre_grid, out) + self.query_pos(out)
        for block in self.blocks:
            q = block(q, ctx)
        return self.out_proj(self.norm(q))


class AffineCoupling(nn.Module):
    """``y_a = x_a``, ``y_b = x_b·exp(s(x_a)) + t(x_a)`` with ``s`` bounded by ``tanh``; exact inverse."""

    def __init__(self, dim: int, hidden: int, flip: bool, max_log_scale: float = 2.0) -> None:
        super().__init__()
        self.n_a = dim // 2 if not flip else dim - dim // 2
        self.flip = flip
        self.max_log_scale = max_log_scale
        n_b = dim - self.n_a
        self.net = nn.Sequential(nn.Linear(self.n_a, hidden), nn.GELU(), nn.Linear(hidden, 2 * n_b))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.net[-1].bias)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.flip:
            b, a = x.split([x.shape[-1] - self.n_a, self.n_a], dim=-1)
        else:
            a, b = x.split([self.n_a, x.shape[-1] - self.n_a], dim=-1)
        return a, b

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([b, a] if self.flip else [a, b], dim=-1)

    def _st(self, a: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(a).chunk(2, dim=-1)
        return torch.tanh(s) * self.max_log_scale, t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)`` per token."""
        a, b = self._split(x)
        s, t = self._st(a)
        return self._join(a, b * torch.exp(s) + t), s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        a, yb = self._split(y)
        s, t = self._st(a)
        return self._join(a, (yb - t) * torch.exp(-s))


@register_connector("invertible")
class InvertibleConnector(nn.Module):
    """Affine-coupling flow on D_pre (exactly invertible) + one linear map to D_post (see the module doc)."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.couplings = nn.ModuleList(
            AffineCoupling(spec.d_pre, spec.hidden_size, flip=bool(i % 2)) for i in range(spec.num_layers)
        )
        d_in = spec.merge * spec.merge * spec.d_pre if spec.kind == "merge" else spec.d_pre
        self.proj = nn.Linear(d_in, spec.d_post)

    def flow(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The invertible part: ``(f(x), log|det J_f(x)|)`` per token."""
        logdet = x.new_zeros(x.shape[:-1])
        for c in self.couplings:
            x, ld = c(x)
            logdet = logdet + ld
        return x, logdet

    def inverse_flow(self, y: Tensor) -> Tensor:
        """Exact inverse of ``flow``: ``inverse_flow(flow(x)[0]) == x`` up to float rounding."""
        for c in reversed(self.couplings):
            y = c.inverse(y)
        return y

    def forward(self, x: Tensor, pre_grid: Grid) -> Tensor:
        s = self.spec
        y, _ = self.flow(x)
        if s.kind == "merge":
            y = merge_blocks(y, pre_grid, s.merge)
        elif s.kind == "none":
            y = pool_tokens(y, pre_grid, pooled_grid(s.n_out, pre_grid))
        return self.proj(y)

    def is_injective(self) -> bool:
        """Whether the final linear map has full column rank (then ``pinv_post`` inverts it exactly)."""
        w = self.proj.weight.detach().double()
        return w.shape[0] >= w.shape[1] and int(torch.linalg.matrix_rank(w)) == w.shape[1]

    def pinv_post(self, z: Tensor, pre_grid: Grid) -> Tensor:
        """Least-squares pre-image of a (standardised) output ``z`` ``[B, T_out, D_post]`` → flow input.

        Exact (the original standardised E_pre) for ``1:1`` when ``is_injective()``; for ``merge`` the
        blocks are split back onto the pre grid; for ``none`` the pooling cannot be undone and the
        result is on the pooled grid.
        """
        s = self.spec
        w = self.proj.weight.detach().double()  # [D_post, d_in]
        r = (z.detach().double() - self.proj.bias.detach().double()).reshape(-1, w.shape[0])
        y = (torch.linalg.pinv(w) @ r.T).T.reshape(z.shape[0], z.shape[1], w.shape[1]).to(z.dtype)
        if s.kind == "merge":
            y = unmerge_blocks(y, s.out_grid(pre_grid), s.merge)
        return self.inverse_flow(y)


# -- the standardised wrapper -------------------------------------------------------------------------


class ReplacementConnector(nn.Module):
    """A connector core between fixed standardisations: raw E_pre in, raw E_post (and ``z``) out.

    Buffers ``pre_mean/pre_std/post_mean/post_std`` (float32, from the TRAINING split) live in the
    state dict, so a checkpoint is self-contained.
    """

    def __init__(self, spec: ConnectorSpec, stats: NormStats | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.core = CONNECTORS[spec.connector_type](spec)
        for name, dim in (("pre", spec.d_pre), ("post", spec.d_post)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        if stats is not None:
            self.set_stats(stats)

    def set_stats(self, stats: NormStats) -> None:
        for name in ("pre_mean", "pre_std", "post_mean", "post_std"):
            value = getattr(stats, name).to(torch.float32)
            buf = getattr(self, name)
            if value.shape != buf.shape:
                raise UsageError(f"normalisation {name} has shape {tuple(value.shape)}, connector expects {tuple(buf.shape)}")
            buf.copy_(value)

    def standardise_post(self, post: Tensor) -> Tensor:
        """Original E_post (raw) → the standardised space the core predicts in."""
        return (post.float() - self.post_mean) / self.post_std

    def forward(self, pre: Tensor, pre_grid: Grid) -> tuple[Tensor, Tensor]:
        """``pre [B, T_pre, D_pre]`` (raw, one grid) → ``(E_post [B, T_out, D_post], z)`` (z standardised)."""
        x = (pre.float() - self.pre_mean) / self.pre_std
        z = self.core(x, tuple(pre_grid))
        return z * self.post_std + self.post_mean, z

    def apply(self, pre: Sequence[Tensor], grids: Sequence[Grid]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-image E_pre (possibly different grids) → per-image ``(E_post, z)``; same-grid images batched."""
        groups: dict[Grid, list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault((int(g[0]), int(g[1])), []).append(i)
        post: list[Tensor | None] = [None] * len(pre)
        zs: list[Tensor | None] = [None] * len(pre)
        for g, idx in groups.items():
            p, z = self(torch.stack([pre[i] for i in idx]), g)
            for j, i in enumerate(idx):
                post[i], zs[i] = p[j], z[j]
        return post, zs  # type: ignore[return-value]


def build_connector(spec: ConnectorSpec, stats: NormStats | None = None) -> ReplacementConnector:
    """The standardised connector for ``spec`` (stats may be set later with ``set_stats``)."""
    return ReplacementConnector(spec, stats)


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(spec: ConnectorSpec, model: nn.Module) -> str:
    """One line: type, layout, shapes, parameters."""
    out = f"{spec.n_out} latents" if spec.kind == "none" else str(spec.correspondence)
    return (f"{spec.connector_type} connector ({out}) pre {spec.pre_grid[0]}x{spec.pre_grid[1]}x{spec.d_pre} → "
            f"{spec.out_tokens(spec.pre_grid)}x{spec.d_post}, {count_params(model) / 1e6:.3f} M params")


def checkpoint(model: ReplacementConnector, vlm_state: dict[str, Tensor] | None = None, **meta: Any) -> dict[str, Any]:
    """``best_model.pt`` payload: ``{state_dict, vlm_state, meta}`` (``vlm_state``: fine-tuned VLM parameters)."""
    return {"state_dict": state_copy(model), "vlm_state": dict(vlm_state or {}),
            "meta": {"spec": model.spec.to_dict(), **meta}}


def load_connector(path: str | Path, device: torch.device | str = "cpu") -> tuple[ReplacementConnector, dict[str, Tensor], dict[str, Any]]:
    """Rebuild a connector from ``best_model.pt`` (or its folder): (model in eval mode, vlm_state, meta)."""
    p = Path(path)
    if p.is_dir():
        p = p / BEST
    if not p.exists():
        raise UsageError(f"{p}: no trained connector (run train_connector first)")
    ck = safe_torch_load(p, mmap=False)
    spec = ConnectorSpec.from_dict(ck["meta"]["spec"])
    model = build_connector(spec)
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval(), ck.get("vlm_state", {}), ck["meta"]


__all__ = [
    "BEST", "CONNECTORS", "ConnectorSpec", "CrossAttnConnector", "InvertibleConnector", "MLPConnector",
    "ReplacementConnector", "build_connector", "checkpoint", "connector_types", "count_params", "describe",
    "load_connector", "make_spec", "pool_tokens", "pooled_grid", "register_connector",
]
