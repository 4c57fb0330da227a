"""The derived tolerances bound real rounding errors, and do not swallow real defects."""

from __future__ import annotations

import pytest
import tolerances as tol
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [16, 1024, 65536])
def test_float_tol_bounds_dot_products_and_sums_in_any_order(dtype, n):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(64, n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    exact = x @ y
    magnitude = float((x.abs() @ y.abs()).max())  # the bound's sum |x_i y_i|
    routes = {
        "matmul": (x.to(dtype) @ y.to(dtype)).double(),
        "sequential halves": ((x[:, : n // 2].to(dtype) @ y[: n // 2].to(dtype))
                              + (x[:, n // 2:].to(dtype) @ y[n // 2:].to(dtype))).double(),
        "reversed": (x.flip(1).to(dtype) @ y.flip(0).to(dtype)).double(),
    }
    # one route against the exact value (half the bound); rounding x and y to dtype adds two roundings per term. The
    # raw bound: at fp16/bf16 and these lengths it is wider than float_tol lets a test use, but it must still hold
    bound = tol.rounding_bound(dtype, n + 2, magnitude) / 2
    for name, value in routes.items():
        assert float((value - exact).abs().max()) <= bound, name


def test_float_tol_is_far_below_a_real_defect():
    # an off-by-one-term defect in a 4096-long float32 dot product of O(1) terms is caught
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    right, wrong = x @ y, x[1:] @ y[1:]
    assert float((right - wrong).abs()) > tol.float_tol(torch.float32, 4096, float(x.abs() @ y.abs()) / 100)


def test_reduction_ops_counts_fan_ins():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=4),
                              torch.nn.GroupNorm(2, 8))
    assert tol.reduction_ops(net) == 10 + 4 * 9 + 2 * 9 + 3
    assert tol.reduction_ops(net, attention_tokens=100, attention_layers=2) == 10 + 36 + 18 + 3 + 200


def test_tolerances_scale_with_dtype_and_magnitude():
    assert tol.rounding_bound(torch.float16, 100) > 1000 * tol.float_tol(torch.float32, 100)
    assert tol.float_tol(torch.float32, 100, 50.0) == pytest.approx(50 * tol.float_tol(torch.float32, 100))
    with pytest.raises(ValueError, match="ops"):
        tol.float_tol(torch.float32, 0)


@pytest.mark.parametrize(("dtype", "ops", "magnitude"), [
    (torch.float16, 82_000 * 8, 4.0),  # a tiny UNet over 8 fp16 model calls: the bound would be O(magnitude)
    (torch.bfloat16, 64, 1.0),
    (torch.float32, 100, 1e-6),  # tiny values: the floor of 1 would make the bound 1e4 times their size
])
def test_float_tol_refuses_a_bound_no_result_can_fail(dtype, ops, magnitude):
    assert tol.rounding_bound(dtype, ops, magnitude) > tol.MAX_RELATIVE_BOUND * magnitude
    with pytest.raises(tol.ToleranceTooWide, match="exceeds 1% of the magnitude"):
        tol.float_tol(dtype, ops, magnitude)


def test_float_tol_accepts_bounds_within_one_percent():
    assert tol.float_tol(torch.float32, 82_000 * 8, 4.0) <= 0.01 * 4.0
    assert tol.float_tol(torch.float16, 8, 1.0) <= 0.01
