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
    # one route against the exact value (half of float_tol); rounding x and y to dtype adds two roundings per term
    bound = tol.float_tol(dtype, n + 2, magnitude) / 2
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
    assert tol.float_tol(torch.float16, 100) > 1000 * tol.float_tol(torch.float32, 100)
    assert tol.float_tol(torch.float32, 100, 50.0) == pytest.approx(50 * tol.float_tol(torch.float32, 100))
    with pytest.raises(ValueError, match="ops"):
        tol.float_tol(torch.float32, 0)
