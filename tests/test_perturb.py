"""E_post perturbations: identities at level 0, exact ranks, Haar rotations, SNR, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmc.eval.perturb import (
    PERTURBATIONS,
    apply_batch,
    apply_perturbation,
    derive_seed,
    haar_orthogonal,
    lowrank_rank,
    perturb_key,
)
from vlmc.utils.cli import UsageError


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 16, generator=g) * 3 + torch.randn(1, 16, generator=g)


def test_registry_has_all_modes():
    assert set(PERTURBATIONS) == {"none", "mask", "lowrank", "orthogonal", "noise"}


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_mask_level_zero_changes_nothing(x, fill):
    assert torch.equal(apply_perturbation(x, "mask", 0.0, 1, "a", fill=fill), x)


def test_mask_drops_whole_tokens_with_fill(x):
    y = apply_perturbation(x, "mask", 0.5, 1, "a", fill="zero")
    dropped = (y == 0).all(1)
    assert 0 < dropped.sum() < x.shape[0]
    assert torch.equal(y[~dropped], x[~dropped])
    ym = apply_perturbation(x, "mask", 0.5, 1, "a", fill="mean")
    assert torch.allclose(ym[dropped], x.mean(0).expand(int(dropped.sum()), -1))
    assert torch.equal(apply_perturbation(x, "mask", 1.0, 1, "a"), torch.zeros_like(x))


def test_mask_nested_across_levels(x):
    low = (apply_perturbation(x, "mask", 0.2, 3, "k") == 0).all(1)
    high = (apply_perturbation(x, "mask", 0.6, 3, "k") == 0).all(1)
    assert bool((low <= high).all())


def test_orthogonal_alpha_zero_changes_nothing(x):
    assert torch.allclose(apply_perturbation(x, "orthogonal", 0.0, 1, "a"), x, atol=0, rtol=0)


@pytest.mark.parametrize("level", [0.1, 0.25, 0.5, 3, 7])
def test_lowrank_has_requested_rank(x, level):
    y = apply_perturbation(x, "lowrank", level, 0, "a")
    r = lowrank_rank(level, *x.shape)
    assert r == (int(level) if level > 1 else max(1, int(np.floor(level * 16 + 0.5))))
    centred = (y - y.mean(0)).double().numpy()
    assert np.linalg.matrix_rank(centred, tol=1e-4 * np.abs(centred).max()) == r
    assert torch.allclose(y.mean(0), x.mean(0), atol=1e-5)  # mean added back


def test_lowrank_full_rank_reproduces_input(x):
    assert torch.allclose(apply_perturbation(x, "lowrank", 1.0, 0, "a"), x, atol=1e-4)


@pytest.mark.parametrize("proper", [False, True])
def test_haar_orthogonal_is_orthogonal(proper):
    dets = []
    for i in range(20):
        q = haar_orthogonal(12, torch.Generator().manual_seed(i), proper=proper).double()
        assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-5)
        dets.append(float(torch.linalg.det(q)))
    assert np.allclose(np.abs(dets), 1, atol=1e-5)
    if proper:
        assert min(dets) > 0
    else:
        assert min(dets) < 0 < max(dets)  # both components of O(d) are drawn


def test_haar_sign_fix_gives_unique_positive_diag_r():
    g = torch.Generator().manual_seed(7)
    q = haar_orthogonal(6, g).double()
    gm = torch.randn(6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = q.T @ gm  # G = Q R with the sign convention → R upper triangular, positive diagonal
    assert torch.allclose(
        torch.tril(r, -1), torch.zeros(6, 6, dtype=torch.float64), atol=1e-6
    )  # Q is float32
    assert bool((torch.diagonal(r) > 0).all())


def test_haar_first_entry_is_centred_and_raw_qr_is_not():
    """Q[0,0] of a Haar matrix is symmetric around 0 with E[Q00²] = 1/d; raw QR's is biased (the original pipeline's bug)."""
    d, n = 4, 2000
    fixed, raw = [], []
    for i in range(n):
        fixed.append(float(haar_orthogonal(d, torch.Generator().manual_seed(i))[0, 0]))
        g = torch.randn(d, d, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        raw.append(float(torch.linalg.qr(g)[0][0, 0]))
    fixed, raw = np.array(fixed), np.array(raw)
    assert abs(fixed.mean()) < 0.05  # SE ≈ 0.5 / sqrt(2000) ≈ 0.011
    assert abs((fixed**2).mean() - 1 / d) < 0.02
    assert abs(raw.mean()) > 0.3  # without the sign fix the distribution is one-sided: the test can fail


def test_orthogonal_full_rotation_keeps_gram(x):
    y = apply_perturbation(x, "orthogonal", 1.0, 2, "a", proper=True)
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(y, x, atol=1e-2)


@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 30.0])
def test_noise_achieves_requested_snr(snr):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    y = apply_perturbation(x, "noise", snr, 0, "img")
    measured = 10 * np.log10(float(x.pow(2).mean()) / float((y - x).pow(2).mean()))
    assert abs(measured - snr) < 0.2


def test_same_seed_key_same_result_regardless_of_batch(x):
    xs = [x, x * 2, x + 1]
    keys = [perturb_key("s0", "000010000"), perturb_key("s0", "b"), perturb_key("s1", "000010000")]
    for mode, level in [("mask", 0.4), ("orthogonal", 0.5), ("noise", 5.0), ("lowrank", 0.3)]:
        fwd = apply_batch(xs, mode, level, 11, keys)
        rev = apply_batch(xs[::-1], mode, level, 11, keys[::-1])[::-1]
        single = [apply_perturbation(a, mode, level, 11, k) for a, k in zip(xs, keys, strict=True)]
        for a, b, c in zip(fwd, rev, single, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
    # different key or seed → different draw; equal keys in different shards differ too
    assert derive_seed(11, keys[0]) != derive_seed(11, keys[2]) != derive_seed(12, keys[2])
    a = apply_perturbation(x, "noise", 0.0, 11, keys[0])
    assert not torch.equal(a, apply_perturbation(x, "noise", 0.0, 11, keys[2]))


def test_dtype_and_device_preserved(x):
    xh = x.half()
    for mode, level in [("none", 0), ("mask", 0.3), ("lowrank", 0.5), ("orthogonal", 0.3), ("noise", 10.0)]:
        y = apply_perturbation(xh, mode, level, 0, "k")
        assert y.dtype == torch.float16 and y.shape == xh.shape


def test_shared_orthogonal_uses_one_q(x):
    a = apply_perturbation(x, "orthogonal", 1.0, 0, "a", shared_seed=5)
    b = apply_perturbation(x, "orthogonal", 1.0, 0, "b", shared_seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "mode,level,opts",
    [
        ("mask", 1.5, {}),
        ("orthogonal", -0.1, {}),
        ("lowrank", 0.0, {}),
        ("lowrank", 2.5, {}),
        ("blur", 0.1, {}),
        ("mask", 0.1, {"fil": "zero"}),
        ("mask", 0.1, {"fill": "median"}),
    ],
)
def test_bad_arguments_are_usage_errors(x, mode, level, opts):
    with pytest.raises(UsageError):
        apply_perturbation(x, mode, level, 0, "k", **opts)


@pytest.mark.parametrize("snr", [0.0, 10.0])
def test_centred_noise_snr_is_against_the_token_varying_part(snr):
    """A large shared mean token inflates the uncentred power: --centred measures SNR without it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 128, generator=g) + 3.0 * torch.randn(1, 128, generator=g)  # a strong mean token
    xc = x - x.mean(0, keepdim=True)
    y = apply_perturbation(x, "noise", snr, 0, "img", centred=True)
    measured = 10 * np.log10(float(xc.pow(2).mean()) / float((y - x).pow(2).mean()))
    assert abs(measured - snr) < 0.2
    gap = 10 * np.log10(float(x.pow(2).mean()) / float(xc.pow(2).mean()))  # how much harsher uncentred is
    u = apply_perturbation(x, "noise", snr, 0, "img")
    assert 10 * np.log10(float(xc.pow(2).mean()) / float((u - x).pow(2).mean())) == pytest.approx(snr - gap, abs=0.2)
    assert gap > 5


def test_orthogonal_half_blend_shrinks_token_norms_to_0_71():
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(3))
    y = apply_perturbation(x, "orthogonal", 0.5, 0, "img")
    ratio = (y.norm(dim=1) / x.norm(dim=1)).mean().item()
    assert ratio == pytest.approx(0.5**0.5, abs=0.02)  # the documented caveat
