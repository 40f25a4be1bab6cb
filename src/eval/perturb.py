"""Controlled perturbations of one image's connector output E_post ``[T, D]`` (stage 8).

Every perturbation is a pure function of ``(x, level, generator, options)``; the generator is seeded
from ``sha256(f"{seed}:{key}")`` (:func:`derive_seed`), so an image's perturbation depends only on the
run seed and the image's identity, never on batch composition, order, or device. Pass
``key=perturb_key(shard, key)`` so equal keys in different shards get different draws. Random numbers
are drawn on the CPU and moved to ``x``'s device; the maths runs in float32 and the result is cast
back to ``x.dtype``.

Modes (``level`` meaning in brackets):

``none`` [ignored]
    ``x`` unchanged (a copy).
``mask`` [drop probability p in [0, 1]]
    Draw ``u_t ~ U(0, 1)`` per token and drop token t when ``u_t < p``; a dropped row is replaced by
    zeros (``fill="zero"``) or by the image's mean token ``mean_t x_t`` over all its original tokens
    (``fill="mean"``). p = 0 changes nothing; for one (seed, key) the tokens dropped at p₁ < p₂ are a
    subset of those dropped at p₂ (nested masks).
``lowrank`` [retained fraction in (0, 1], or a rank when > 1]
    Token-centred truncated SVD per image: ``μ = mean_t x_t``, ``X − 1μᵀ = U S Vᵀ``,
    output ``U_r S_r V_rᵀ + 1μᵀ`` with ``r = max(1, ⌊level·min(T, D) + ½⌋)`` for level ≤ 1 and
    ``r = int(level)`` for level > 1, clipped to ``min(T, D)``. The centred output has rank exactly r
    (when r ≤ rank of the centred input). Deterministic; ignores the generator.
``orthogonal`` [blend α in [0, 1]]
    ``(1 − α) X + α X Q`` with Q Haar-distributed on O(D): ``G ~ N(0, 1)^{D×D}``, ``G = Q₀R``,
    ``Q = Q₀ diag(sign(diag R))`` (the sign correction makes the QR factor unique and Q Haar, Mezzadri
    2007). ``proper=True`` makes det Q = +1 (Haar on SO(D)) by negating Q's first column when
    det Q = −1. α = 0 changes nothing; α = 1 is a pure rotation (token norms and Gram matrix kept).
    Caveat: for 0 < α < 1 the blend is not a rotation and shrinks tokens: for a token x and Haar Q in
    high dimension, ``xQ`` is nearly orthogonal to x, so ``‖(1−α)x + αxQ‖ ≈ ‖x‖·√((1−α)² + α²)``,
    0.71·‖x‖ at α = 0.5. A level therefore mixes a rotation with a rescaling of the tokens.
    Q is drawn and factored in float64 on the CPU (orthogonal to ~1e-12), then applied in float32.
    ``shared_seed=S`` draws one Q per (S, D) for all images instead of one per image (a QR of a
    4096×4096 matrix per image costs seconds on a CPU).
``noise`` [SNR in dB]
    ``X + σ N`` with ``N ~ N(0, 1)^{T×D}`` and ``σ² = P_s / 10^{SNR/10}``, ``P_s = mean(X²)`` over all
    entries of the image (uncentred signal power, the default). SNR = +inf adds nothing.
    Caveat: connector outputs have a large mean token (shared by every token), which counts as signal in
    the uncentred power, so the same nominal SNR is harsher on what varies between tokens by an amount
    that differs per model (on the testbed 0.9 dB for Idefics2 to 5.8 dB for LLaVA). ``centred=True``
    uses ``P_s = mean((X − 1μᵀ)²)``, μ = the image's mean token: the SNR against what the tokens carry
    beyond their mean.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlmc.utils.cli import UsageError

MASK_FILLS = ("zero", "mean")

LEVEL_HELP = {
    "none": "ignored",
    "mask": "probability of dropping each token, in [0, 1]",
    "lowrank": "retained fraction of min(T, D) in (0, 1], or an absolute rank when > 1",
    "orthogonal": "blend alpha in [0, 1] between X and X·Q (Q Haar-random orthogonal)",
    "noise": "signal-to-noise ratio in dB relative to the image's mean(X^2) (--centred: mean((X - mean token)^2))",
}


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from ``sha256(f"{seed}:{key}")`` (first 8 bytes, little endian)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def perturb_key(shard: str, key: str) -> str:
    """The identity string to seed an image's perturbation with: ``"<shard>/<key>"``."""
    return f"{shard}/{key}"


def make_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, key))


def _check_2d(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected one image's E_post [T, D], got shape {tuple(x.shape)}")


def _finish(y: Tensor, x: Tensor) -> Tensor:
    return y.to(dtype=x.dtype)


# -- modes ----------------------------------------------------------------------------------------


def perturb_none(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Identity: a copy of ``x``."""
    return x.clone()


def perturb_mask(x: Tensor, level: float, gen: torch.Generator, fill: str = "zero") -> Tensor:
    """Drop whole tokens: row t is replaced when ``u_t < level``, ``u_t ~ U(0, 1)``.

    Args:
        x: ``[T, D]``.
        level: drop probability p in [0, 1].
        gen: CPU generator.
        fill: ``zero`` (dropped rows become 0) or ``mean`` (the mean of all original tokens).
    """
    if fill not in MASK_FILLS:
        raise UsageError(f"unknown mask fill {fill!r}; choose {', '.join(MASK_FILLS)}")
    xf = x.float()
    u = torch.rand(xf.shape[0], generator=gen).to(xf.device)
    drop = (u < level).unsqueeze(1)
    filler = xf.mean(0, keepdim=True) if fill == "mean" else torch.zeros_like(xf[:1])
    return _finish(torch.where(drop, filler, xf), x)


def lowrank_rank(level: float, t: int, d: int) -> int:
    """Rank kept by ``lowrank``: ``max(1, ⌊level·min(T,D) + ½⌋)`` for level ≤ 1, ``int(level)`` above; ≤ min(T, D)."""
    m = min(t, d)
    r = int(level) if level > 1 else max(1, math.floor(level * m + 0.5))
    return min(r, m)


def perturb_lowrank(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Token-centred truncated SVD: ``U_r S_r V_rᵀ + 1μᵀ`` (see module docstring for r)."""
    xf = x.float()
    mu = xf.mean(0, keepdim=True)
    u, s, vh = torch.linalg.svd(xf - mu, full_matrices=False)
    r = lowrank_rank(level, *xf.shape)
    return _finish((u[:, :r] * s[:r]) @ vh[:r] + mu, x)


def haar_orthogonal(d: int, gen: torch.Generator, proper: bool = False) -> Tensor:
    """A Haar-random ``[d, d]`` orthogonal matrix (float32, CPU).

    ``G ~ N(0,1)``, ``G = Q₀ R``, ``Q = Q₀ · diag(s)`` with ``s_i = sign(R_ii)`` (0 → +1), so that
    ``Qᵀ G`` has a positive diagonal. With ``proper`` the first column is negated when det Q < 0.
    """
    g = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs.unsqueeze(0)
    if proper and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


@functools.lru_cache(maxsize=4)
def _shared_orthogonal(d: int, seed_key: str, proper: bool) -> Tensor:
    return haar_orthogonal(d, torch.Generator().manual_seed(derive_seed(0, seed_key)), proper)


def perturb_orthogonal(
    x: Tensor, level: float, gen: torch.Generator, proper: bool = False, shared_seed: int | None = None
) -> Tensor:
    """``(1 − α) X + α X Q`` with Q Haar on O(D) (SO(D) with ``proper``); α = ``level``.

    Args:
        x: ``[T, D]``.
        level: α in [0, 1].
        gen: CPU generator (Q drawn from it unless ``shared_seed`` is given).
        proper: force det Q = +1.
        shared_seed: draw one Q per (shared_seed, D) for every image instead of one per image.
    """
    d = x.shape[1]
    if shared_seed is not None:
        q = _shared_orthogonal(d, f"orthogonal:{shared_seed}", proper)
    else:
        q = haar_orthogonal(d, gen, proper)
    xf = x.float()
    return _finish((1.0 - level) * xf + level * (xf @ q.to(xf.device)), x)


def perturb_noise(x: Tensor, level: float, gen: torch.Generator, centred: bool = False) -> Tensor:
    """Additive Gaussian noise at ``level`` dB SNR: ``σ² = P_s / 10^(level/10)``, ``P_s = mean(X²)``, or with
    ``centred`` the token-centred ``mean((X − mean_t x_t)²)``."""
    xf = x.float()
    if math.isinf(level) and level > 0:
        return _finish(xf.clone(), x)
    signal = xf - xf.mean(0, keepdim=True) if centred else xf
    sigma = torch.sqrt(signal.pow(2).mean() / (10.0 ** (level / 10.0)))
    n = torch.randn(xf.shape, generator=gen).to(xf.device)
    return _finish(xf + sigma * n, x)


Perturbation = Callable[..., Tensor]

PERTURBATIONS: dict[str, Perturbation] = {
    "none": perturb_none,
    "mask": perturb_mask,
    "lowrank": perturb_lowrank,
    "orthogonal": perturb_orthogonal,
    "noise": perturb_noise,
}


def check_level(mode: str, level: float) -> None:
    """Raise ``UsageError`` when ``level`` is out of range for ``mode``."""
    if mode not in PERTURBATIONS:
        raise UsageError(f"unknown perturbation {mode!r}; choose one of {', '.join(PERTURBATIONS)}")
    if math.isnan(level):
        raise UsageError("perturbation level is NaN")
    if mode in ("mask", "orthogonal") and not 0.0 <= level <= 1.0:
        raise UsageError(f"{mode} level must be in [0, 1], got {level}")
    if mode == "lowrank" and (level <= 0 or math.isinf(level) or (level > 1 and level != int(level))):
        raise UsageError(f"lowrank level must be in (0, 1] (fraction) or an integer rank > 1, got {level}")


def _check_opts(fn: Perturbation, mode: str, opts: dict) -> None:
    allowed = list(inspect.signature(fn).parameters)[3:]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise UsageError(f"perturbation {mode!r} takes options {allowed or 'none'}, not {unknown}")


def apply_perturbation(x: Tensor, mode: str, level: float, seed: int, key: str, **opts) -> Tensor:
    """Perturb one image's E_post ``x`` ``[T, D]`` deterministically per ``(seed, key)``.

    Args:
        x: ``[T, D]`` tensor, any float dtype, any device.
        mode: a key of :data:`PERTURBATIONS`.
        level: mode-specific strength (:data:`LEVEL_HELP`).
        seed: run seed.
        key: the image's identity, ideally ``perturb_key(shard, key)``.
        **opts: mode options (``fill`` for mask; ``proper``, ``shared_seed`` for orthogonal; ``centred`` for
            noise).

    Returns:
        The perturbed ``[T, D]`` tensor, same dtype and device as ``x``.
    """
    check_level(mode, level)
    fn = PERTURBATIONS[mode]
    _check_opts(fn, mode, opts)
    _check_2d(x)
    return fn(x, float(level), make_generator(seed, key), **opts)


def apply_batch(
    xs: Sequence[Tensor], mode: str, level: float, seed: int, keys: Sequence[str], **opts
) -> list[Tensor]:
    """:func:`apply_perturbation` for each ``(x, key)``; results do not depend on the batch."""
    if len(xs) != len(keys):
        raise ValueError(f"{len(xs)} tensors but {len(keys)} keys")
    return [apply_perturbation(x, mode, level, seed, k, **opts) for x, k in zip(xs, keys, strict=True)]
