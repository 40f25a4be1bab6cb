"""Reconstructor models: token geometry, shapes for every correspondence, the closed-form linear fit."""

from __future__ import annotations

import pytest
import torch

from vlmc.models.base import Correspondence
from vlmc.models.reconstructors import (
    MODEL_TYPES,
    build_reconstructor,
    make_spec,
    merge_blocks,
    unmerge_blocks,
)
from vlmc.train.linear_fit import LeastSquares, _solve, fit_linear
from vlmc.utils.cli import UsageError

torch.set_num_threads(1)
CASES = {  # correspondence, pre grid, post grid
    "1:1": (Correspondence("1:1"), (4, 4), (4, 4)),
    "merge": (Correspondence("merge", 2), (4, 4), (2, 2)),
    "none": (Correspondence("none"), (4, 4), (4, 1)),  # perceiver: 16 pre tokens → 4 latents
}


def _spec(model_type, case, d_post=10, **kw):
    corr, pg, qg = CASES[case]
    return make_spec(model_type, corr, 6, d_post, pg, qg, hidden_size=16, num_heads=2, num_layers=2, **kw)


def test_unmerge_inverts_merge_and_follows_the_block_layout():
    x = torch.arange(16.0).reshape(1, 16, 1)  # pre grid 4x4, row-major
    m = merge_blocks(x, (4, 4), 2)
    assert m[0, 0].tolist() == [0, 1, 4, 5] and m[0, 1].tolist() == [2, 3, 6, 7] and m[0, 3].tolist() == [10, 11, 14, 15]
    assert torch.equal(unmerge_blocks(m, (2, 2), 2), x)
    y = torch.randn(2, 24, 3)  # non-square 4x6 grid
    assert torch.equal(unmerge_blocks(merge_blocks(y, (4, 6), 2), (2, 3), 2), y)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shapes_and_a_training_step(model_type, case):
    spec = _spec(model_type, case)
    model = build_reconstructor(spec)
    post = torch.randn(3, spec.t_post, 10)
    y = model(post, spec.pre_grid, spec.post_grid)
    assert y.shape == (3, 16, 6)
    y.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(post, spec.pre_grid, spec.post_grid).shape == (3, 16, 6)


def test_transformer_handles_other_grids_by_interpolating_positions():
    spec = _spec("transformer", "merge")
    model = build_reconstructor(spec)
    assert model(torch.randn(1, 6, 10), (4, 6), (2, 3)).shape == (1, 24, 6)  # 6 merged tokens → 24 pre
    spec = make_spec("transformer", Correspondence("none"), 6, 10, (24, 24), (64, 1), hidden_size=16, num_heads=2)
    assert build_reconstructor(spec)(torch.randn(1, 64, 10), (24, 24), (64, 1)).shape == (1, 576, 6)  # perceiver 64 → 576


def test_bad_geometry_is_a_usage_error():
    with pytest.raises(UsageError, match="merge"):
        make_spec("mlp", Correspondence("merge", 2), 6, 10, (4, 4), (4, 4))
    with pytest.raises(UsageError, match="divisible"):
        make_spec("transformer", Correspondence("1:1"), 6, 10, (4, 4), (4, 4), hidden_size=10, num_heads=3)


def _batches(f, spec, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, spec.t_pre, spec.d_pre, generator=g)
    post = torch.stack([f(p) for p in pre])
    return pre, post, lambda: [(post[i : i + 8], pre[i : i + 8], spec.pre_grid, spec.post_grid) for i in range(0, n, 8)]


@pytest.mark.parametrize("case", ["1:1", "merge"])
def test_linear_fit_is_exact_on_a_linear_connector(case):
    spec = _spec("linear", case, d_post=30, ridge=[1e-9])  # post wide enough to be injective
    w = torch.randn(spec.merge**2 * 6, 30)
    if case == "1:1":
        def f(p):
            return p @ w + 0.5
    else:
        def f(p):
            return merge_blocks(p[None], (4, 4), 2)[0] @ w + 0.5
    pre, post, batches = _batches(f, spec)
    model = build_reconstructor(spec)
    fit_linear(model, batches, torch.device("cpu"), log=lambda s: None)
    with torch.no_grad():
        torch.testing.assert_close(model(post, spec.pre_grid, spec.post_grid), pre, atol=1e-3, rtol=1e-3)


def test_bilinear_als_improves_on_uniform_pooling_for_none():
    spec = _spec("linear", "none", linear_iters=3)
    mix, w = torch.randn(4, 16), torch.randn(6, 10)  # post = M pre W: exactly representable (rank permitting)
    pre, post, batches = _batches(lambda p: mix @ p @ w, spec, n=80)
    logs: list[str] = []
    model = build_reconstructor(spec)
    fit_linear(model, batches, torch.device("cpu"), log=logs.append)
    with torch.no_grad():
        mse = float(((model(post, spec.pre_grid, spec.post_grid) - pre) ** 2).mean())
    first = float(logs[0].split("train mse ")[1].split(" ")[0])  # after the first W-step, with M = uniform pooling
    assert len(logs) == 3 and mse < first < 1.0  # better than pooling, better than predicting the mean


def test_ridge_is_chosen_on_validation_statistics_exactly():
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(30, 20, generator=g, dtype=torch.float64), torch.randn(200, 20, generator=g, dtype=torch.float64)
    w_true = torch.randn(20, 3, generator=g, dtype=torch.float64) * 0.1
    y = x @ w_true + torch.randn(30, 3, generator=g, dtype=torch.float64)  # few noisy rows: ridge must help
    yv = xv @ w_true + torch.randn(200, 3, generator=g, dtype=torch.float64)
    train, val = LeastSquares.zeros(20, 3, torch.device("cpu")), LeastSquares.zeros(20, 3, torch.device("cpu"))
    train.add(x, y)
    val.add(xv, yv)
    w, ridge, val_mse = _solve(train, val, [1e-6, 1e-2, 1.0, 10.0])
    assert val_mse == pytest.approx(float(((xv @ w - yv) ** 2).mean()), rel=1e-9)  # exact from statistics
    w_small, _, _ = _solve(train, None, [1e-6])
    assert ridge > 1e-6 and val_mse < float(((xv @ w_small - yv) ** 2).mean())


@pytest.mark.parametrize(("corr", "pre_grid", "post_grid", "d_pre", "d_post"), [
    (Correspondence("1:1"), (24, 24), (24, 24), 1024, 4096),  # llava-1.5-7b
    (Correspondence("merge", 2), (24, 24), (12, 12), 1280, 3584),  # qwen2.5-vl-7b at 336 px
    (Correspondence("none"), (24, 24), (64, 1), 1152, 4096),  # idefics2-8b: 64 perceiver latents
    (Correspondence("merge", 2), (20, 20), (10, 10), 1152, 4096),  # qwen3.5-9b
])
def test_real_scale_shapes_on_the_meta_device(corr, pre_grid, post_grid, d_pre, d_post):
    for model_type in MODEL_TYPES:
        with torch.device("meta"):
            spec = make_spec(model_type, corr, d_pre, d_post, pre_grid, post_grid)
            y = build_reconstructor(spec)(torch.empty(2, post_grid[0] * post_grid[1], d_post), pre_grid, post_grid)
        assert y.shape == (2, pre_grid[0] * pre_grid[1], d_pre)
        if model_type == "transformer":
            assert spec.hidden_size == 512  # real widths get the table's default


@pytest.mark.parametrize(("d_pre", "d_post", "width"), [(96, 128, 128), (96, 64, 128), (200, 64, 256), (1152, 4096, 512)])
def test_transformer_width_follows_narrow_data_up_to_the_default(d_pre, d_post, width):
    spec = make_spec("transformer", Correspondence("none"), d_pre, d_post, (6, 6), (16, 1))
    assert spec.hidden_size == width
    assert make_spec("transformer", Correspondence("none"), d_pre, d_post, (6, 6), (16, 1), hidden_size=64).hidden_size == 64
