"""Core tier, issue 13 (no ComfyUI): 8-bit KV stores (per-token int8 and float8 e4m3 with a scale), their exact byte
accounting, and the feature plan a store keeps (only the layers and steps a fusion reads)."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import store_is_complete

from magic_core import fusion as ff
from magic_core import layers as L
from magic_core.kv_store import (
    QMAX,
    FeaturePlan,
    KVStore,
    StoreBudgetError,
    StoreCoverageError,
    StoreMismatchError,
    dequantize_rows,
    entry_nbytes,
    percent_steps,
    quantize_rows,
)

SIGMAS = [14.6, 7.1, 3.2, 1.4, 0.55, 0.12, 0.0]  # 6 steps
LAYERS = [("output", 6, 0), ("output", 9, 0)]
EPS32 = torch.finfo(torch.float32).eps
E4M3 = torch.finfo(torch.float8_e4m3fn)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def features(seed=0, dtype=torch.float32) -> torch.Tensor:
    """[2, 64, 40] rows of very different magnitudes (1e-4 .. 1e3), an all-zero row and an outlier channel."""
    x = rand(2, 64, 40, seed=seed) * torch.logspace(-4, 3, 64).view(1, 64, 1)
    x[0, 5] = 0.0
    x[1, 7, 3] = 5e3
    return x.to(dtype)


def make_store(**kw) -> KVStore:
    args = dict(model_id="sd15:abc", latent_shape=(4, 8, 8), sigmas=SIGMAS, family="sd15", layers=LAYERS)
    args.update(kw)
    return KVStore(**args)


# ------------------------------------------------------------------------------------------------ quantisation
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int8_error_is_at_most_half_a_scale_step(in_dtype, scale_dtype):
    """|x - deq(q(x))| <= scale / 2 per element, up to float32's rounding of x / scale (at most QMAX * eps32 of a
    step); the scale is never below max|row| / 127 (nothing clips) and all-zero rows come back as zeros."""
    x = features(1, in_dtype)
    before = x.clone()
    values, scale = quantize_rows(x, "int8", scale_dtype)
    assert torch.equal(x, before)  # the input is not touched
    assert values.dtype == torch.int8 and scale.dtype == scale_dtype and scale.shape == (2, 64, 1)
    assert int(values.abs().max()) <= 127
    xf = x.float()
    assert bool((scale.double() * 127 >= xf.double().abs().amax(-1, keepdim=True)).all())
    err = (dequantize_rows(values, scale) - xf).abs()
    bound = scale.float() * (0.5 + 2 * QMAX[torch.int8] * EPS32)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(scale[0, 5]) == 0.0 and bool((dequantize_rows(values, scale)[0, 5] == 0).all())
    # the bound is tight: some element sits near half a step (the error is not trivially zero)
    assert float((err / scale.float().clamp_min(1e-30)).max()) > 0.45


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_float8_e4m3_error_is_within_its_relative_bound(scale_dtype):
    """float8 e4m3fn keeps 3 mantissa bits: |x - deq| <= 2^-4 |x| (half an ulp) for scaled values in e4m3's normal
    range, <= 2^-10 * scale (half the subnormal spacing) below it, plus float32's rounding of x / scale."""
    x = features(2)
    values, scale = quantize_rows(x, "fp8_e4m3", scale_dtype)
    assert values.dtype == torch.float8_e4m3fn
    assert float(values.float().abs().max()) <= E4M3.max
    half_ulp = E4M3.eps / 2  # 2^-4
    half_subnormal = E4M3.smallest_normal * E4M3.eps / 2  # 2^-10
    err = (dequantize_rows(values, scale) - x).abs()
    bound = torch.maximum(half_ulp * x.abs(), half_subnormal * scale.float()) + 4 * EPS32 * x.abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float((err / x.abs().clamp_min(1e-30)).max()) > 0.5 * half_ulp  # not trivially exact


def test_quantisation_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_rows(torch.tensor([[1.0, math.nan]]), "int8")
    with pytest.raises(ValueError, match="overflow"):
        quantize_rows(torch.tensor([[1e8, 1.0]]), "int8", torch.float16)
    values, scale = quantize_rows(torch.tensor([[1e8, 1.0]]), "int8", torch.float32)  # fp32 scales reach further
    assert float(dequantize_rows(values, scale)[0, 0]) == pytest.approx(1e8, rel=1 / 254)
    with pytest.raises(ValueError, match="8-bit format"):
        quantize_rows(torch.ones(1, 2), "fp16")
    with pytest.raises(ValueError, match="scale dtype"):
        make_store(dtype="int8", scale_dtype="bf16")


# ------------------------------------------------------------------------------------------------ 8-bit stores
@pytest.mark.parametrize(("fmt", "scale_dtype", "scale_bytes"), [("int8", "fp16", 2), ("int8", "fp32", 4),
                                                                 ("fp8_e4m3", "fp16", 2)])
def test_8bit_store_records_quantised_and_gets_dequantised(fmt, scale_dtype, scale_bytes):
    store = make_store(dtype=fmt, scale_dtype=scale_dtype)
    n1, n2 = features(3), rand(2, 16, 80, seed=4)
    before = (n1.clone(), n2.clone())
    assert store.record(LAYERS[0], 14.6, n1) and store.record(LAYERS[1], 7.1, n2)
    assert torch.equal(n1, before[0]) and torch.equal(n2, before[1])
    rows = 2 * 64 + 2 * 16
    assert store.nbytes == (2 * 64 * 40 + 2 * 16 * 80) * 1 + rows * scale_bytes  # values + one scale per row
    # q/k/v in the same 8-bit format carry a scale per row each; in fp16 none
    assert store.qkv_equivalent_nbytes() == 3 * ((2 * 64 * 40 + 2 * 16 * 80) + rows * scale_bytes)
    assert store.qkv_equivalent_nbytes(dtype="fp16") == 3 * 2 * (2 * 64 * 40 + 2 * 16 * 80)
    values, scale = quantize_rows(n1, fmt, store.scale_dtype)
    expected = dequantize_rows(values, scale)
    got = store.get(LAYERS[0], 14.6)
    assert got.dtype == torch.float32 and torch.equal(got, expected)  # default: exact dequantisation in float32
    half = store.get(LAYERS[0], 14.6, dtype=torch.float16, device="cpu")
    assert half.dtype == torch.float16 and torch.equal(half, expected.half())
    n1.add_(1.0)  # the store holds its own copy
    assert torch.equal(store.get(LAYERS[0], 14.6), expected)
    # batch and cond/uncond mapping work as for float stores
    rows_out = store.get(LAYERS[0], 14.6, batch=2, cond_or_uncond=[1, 0])
    assert rows_out.shape == (4, 64, 40) and torch.equal(rows_out[2:], expected)
    assert f"{fmt} on cpu" in store.summary()
    store.clear()
    assert store.nbytes == 0 and len(store) == 0


def test_8bit_store_holds_a_chunk_of_cond_uncond_and_a_shared_image():
    store = make_store(dtype="int8")
    one = rand(1, 64, 40, seed=5)
    store.record(LAYERS[0], 14.6, torch.cat([one * 3, one]), cond_or_uncond=[1, 0])  # keeps the positive chunk
    values, scale = quantize_rows(one, "int8")
    assert torch.equal(store.get(LAYERS[0], 14.6, batch=3), dequantize_rows(values, scale).expand(3, -1, -1))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp16", "fp32"])
def test_planned_bytes_equal_a_full_recording_and_the_budget_counts_scales(fmt):
    """planned_nbytes (from the layer table: output 6 has 4x4 tokens of 640 channels, output 9 8x8 of 320 on an
    8x8 latent) is exactly what a full recording stores, scales included; a budget one byte short is refused by
    check_plan before inverting and by record before the last entry."""
    plan_store = make_store(dtype=fmt)
    need = plan_store.planned_nbytes(batch=2)
    per_step = entry_nbytes(2 * 16, 640, plan_store.dtype) + entry_nbytes(2 * 64, 320, plan_store.dtype)
    assert need == 6 * per_step
    if fmt in ("int8", "fp8_e4m3"):
        assert per_step == 2 * 16 * (640 + 2) + 2 * 64 * (320 + 2)
    full = make_store(dtype=fmt, budget_bytes=need)
    assert full.check_plan(batch=2) == need
    for sigma in SIGMAS[:-1]:
        full.record(LAYERS[0], sigma, rand(2, 16, 640, seed=6))
        full.record(LAYERS[1], sigma, rand(2, 64, 320, seed=7))
    assert store_is_complete(full) and full.nbytes == need
    short = make_store(dtype=fmt, budget_bytes=need - 1)
    with pytest.raises(StoreBudgetError, match=f"{need:,} bytes"):
        short.check_plan(batch=2)
    for sigma in SIGMAS[:-2]:
        short.record(LAYERS[0], sigma, rand(2, 16, 640, seed=6))
        short.record(LAYERS[1], sigma, rand(2, 64, 320, seed=7))
    short.record(LAYERS[0], SIGMAS[-2], rand(2, 16, 640, seed=6))
    with pytest.raises(StoreBudgetError) as err:
        short.record(LAYERS[1], SIGMAS[-2], rand(2, 64, 320, seed=7))
    assert f"{need:,} bytes" in str(err.value)
    assert ("8-bit storage" in str(err.value)) == (fmt in ("fp16", "fp32"))
    assert short.nbytes == need - entry_nbytes(2 * 64, 320, short.dtype)


def test_an_8bit_store_of_the_fused_layers_is_a_sixth_of_qkv():
    """Per token row, int8 n takes C + 2 bytes (fp16 scale) against 3 * 2 * C for q/k/v in fp16: a sixth plus
    2/(6C), and less than a sixth of what q/k/v of more layers (the old default) take."""
    int8 = make_store(dtype="int8")
    for sigma in SIGMAS[:-1]:
        int8.record(LAYERS[0], sigma, rand(1, 16, 640, seed=8))
        int8.record(LAYERS[1], sigma, rand(1, 64, 320, seed=9))
    ratio = int8.nbytes / int8.qkv_equivalent_nbytes(dtype="fp16")
    rows = 16 + 64
    assert ratio == pytest.approx((16 * 640 + 64 * 320 + 2 * rows) / (6 * (16 * 640 + 64 * 320)), rel=1e-12)
    assert 1 / 6 < ratio < 1 / 6 * (1 + 2 / 320)


# ------------------------------------------------------------------------------------------------ the plan
def test_a_store_for_a_plan_keeps_exactly_its_layers_and_steps():
    """The magicstyle preset's plan (its layer preset and step range) selects exactly the layers and steps the
    fusion fuses; a store made for it keeps those and records nothing else."""
    params = ff.get_preset("masactrl")  # a step range that starts after step 0
    layers = L.resolve_layers(params.layers_preset, "sd15")
    plan = FeaturePlan(tuple(layers), params.start_percent, params.end_percent, origin="fusion preset 'masactrl'")
    store = KVStore.for_plan("sd15:abc", (4, 8, 8), SIGMAS, "sd15", plan, dtype="int8")
    fused_steps = [i for i in range(6) if params.active(i, 6)]
    assert store.layers == tuple(layers) == plan.layers
    assert list(store.step_indices) == fused_steps == plan.steps(6) == percent_steps(6, 0.08, 1.0) == [1, 2, 3, 4, 5]
    assert store.origin == "fusion preset 'masactrl'"
    assert not store.record(("output", 3, 0), SIGMAS[1], rand(1, 4, 1280))  # a layer outside the plan
    assert not store.record(layers[0], SIGMAS[0], rand(1, 16, 640))  # a step outside the plan
    assert len(store) == 0
    store.check_covers(layers, fused_steps, fusion="FFA")
    store.check_covers(layers[:2], fused_steps[2:], fusion="FFA")  # reading less is fine
    assert "layers output 6-11" in plan.describe(6) and "steps 1-5 of 6" in plan.describe(6)


def test_a_fusion_asking_for_more_than_the_store_kept_names_both_sides():
    store = make_store(layers=[("output", 6, 0)], end_percent=0.5, selected_by="KV Feature Store (node 7)",
                       origin="fusion preset 'magicstyle'", label="content")
    with pytest.raises(StoreCoverageError) as err:
        store.check_covers(LAYERS, [0, 1, 2, 3], fusion="Feature Fusion Attention")
    text = str(err.value)
    assert text.startswith("the KV store 'content' does not hold layers output 9 and steps 3 of 6, which Feature "
                           "Fusion Attention fuses: KV Feature Store (node 7) kept layers output 6 at steps 0-2 of 6 "
                           "(fusion preset 'magicstyle')."), text
    assert isinstance(err.value, StoreMismatchError)
    with pytest.raises(StoreCoverageError, match="set the preset"):
        store.check_covers([("output", 6, 0)], [5], fusion="F", hint="set the preset")


def test_plan_validation():
    with pytest.raises(ValueError, match="at least one layer"):
        FeaturePlan(())
    with pytest.raises(ValueError, match="start_percent"):
        FeaturePlan(tuple(LAYERS), 0.7, 0.2)
    assert FeaturePlan([["output", 9, 0], ("output", 9, 0)]).layers == (("output", 9, 0),)
