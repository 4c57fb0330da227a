"""Core tier: Feature Fusion Attention maths, the KV feature store and layer tables (no ComfyUI)."""

import copy
import math
import re

import pytest
import torch

from magic_core import fusion as ff
from magic_core import layers as L
from magic_core.kv_store import (
    CaptureGate,
    KVStore,
    StoreBudgetError,
    StoreMismatchError,
    chunk_batch,
    clean_schedule,
    find_sigma_index,
    percent_steps,
    sigma_value,
)

HEADS = 4
DIM = 8
INNER = HEADS * DIM
D64 = torch.float64


def rand(*shape, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def naive_attention(q, k, v, heads, bias=None, tau=1.0):
    """Textbook softmax attention, one batch entry and head at a time, in float64."""
    b, tq, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, tq, inner, dtype=D64)
    for i in range(b):
        kb = k[i if k.shape[0] > 1 else 0].double()
        vb = v[i if v.shape[0] > 1 else 0].double()
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            logits = tau * (q[i, :, sl].double() @ kb[:, sl].T) / math.sqrt(d)
            if bias is not None:
                logits = logits + bias.double()
            w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            w = w / w.sum(dim=-1, keepdim=True)
            out[i, :, sl] = w @ vb[:, sl]
    return out


def qkv(b, t, seed):
    return rand(b, t, INNER, seed=seed), rand(b, t, INNER, seed=seed + 1), rand(b, t, INNER, seed=seed + 2)


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, tensors):
    for a, t in zip(before, tensors, strict=True):
        assert torch.equal(a, t), "an input tensor was modified"


# ------------------------------------------------------------------------------------------------ attention maths
def test_attention_matches_naive_reference_with_bias_and_tau():
    q, k, v = qkv(2, 5, 0)
    k7, v7 = rand(2, 7, INNER, seed=10), rand(2, 7, INNER, seed=11)
    bias = rand(7, seed=12)
    torch.testing.assert_close(ff.attention(q, k, v, HEADS), naive_attention(q, k, v, HEADS), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        ff.attention(q, k7, v7, HEADS, log_bias=bias, tau=1.7),
        naive_attention(q, k7, v7, HEADS, bias=bias, tau=1.7),
        rtol=1e-10,
        atol=1e-10,
    )


def test_identity_invariant_equals_plain_attention_and_naive():
    q_x, k_x, v_x = qkv(2, 6, 0)
    content = qkv(2, 6, 20)
    before = snapshot(q_x, k_x, v_x, *content)
    out = ff.fused_attention(q_x, k_x, v_x, *content, k_x, v_x, HEADS, gamma=0.0, content_weight=0.0, tau=1.0)
    assert_unchanged(before, [q_x, k_x, v_x, *content])
    torch.testing.assert_close(out, ff.attention(q_x, k_x, v_x, HEADS), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, naive_attention(q_x, k_x, v_x, HEADS), rtol=1e-10, atol=1e-10)
    # in float32 as ComfyUI runs it, against torch's own SDPA
    q32, k32, v32 = (t.float() for t in (q_x, k_x, v_x))
    out32 = ff.fused_attention(q32, k32, v32, None, None, None, k32, v32, HEADS, 0.0, 0.0, 1.0)
    ref32 = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, 6, HEADS, DIM).transpose(1, 2) for t in (q32, k32, v32))
    ).transpose(1, 2).reshape(2, 6, INNER)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-6)


def test_identity_invariant_through_presets():
    q_x, k_x, v_x = qkv(1, 6, 3)
    style = (q_x, k_x, v_x)
    for name in ("styleid", "magicstyle"):
        params = ff.get_preset(name, gamma=0.0, content_weight=0.0, tau=1.0)
        out = ff.fuse_for_preset(params, q_x, k_x, v_x, qkv(1, 6, 40), style, HEADS)
        torch.testing.assert_close(out, ff.attention(q_x, k_x, v_x, HEADS), rtol=1e-12, atol=1e-12)


def test_duplicated_keys_leave_attention_unchanged():
    q, k, v = qkv(2, 5, 1)
    doubled = ff.attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1), HEADS)
    torch.testing.assert_close(doubled, ff.attention(q, k, v, HEADS), rtol=1e-12, atol=1e-12)


def test_content_weight_two_equals_duplicated_content_columns():
    q_x, k_x, v_x = qkv(2, 5, 2)
    _, k_c, v_c = qkv(2, 5, 30)
    _, k_s, v_s = qkv(2, 4, 60)
    fused = ff.fused_attention(q_x, k_x, v_x, None, k_c, v_c, k_s, v_s, HEADS, gamma=0.0, content_weight=2.0)
    dup = ff.attention(q_x, torch.cat([k_s, k_c, k_c], 1), torch.cat([v_s, v_c, v_c], 1), HEADS)
    torch.testing.assert_close(fused, dup, rtol=1e-12, atol=1e-12)
    # any weight w is a log-w bias on the content columns
    w = 0.3
    bias = torch.cat([torch.zeros(4, dtype=D64), torch.full((5,), math.log(w), dtype=D64)])
    torch.testing.assert_close(
        ff.fused_attention(q_x, k_x, v_x, None, k_c, v_c, k_s, v_s, HEADS, content_weight=w, tau=1.3),
        naive_attention(q_x, torch.cat([k_s, k_c], 1), torch.cat([v_s, v_c], 1), HEADS, bias=bias, tau=1.3),
        rtol=1e-10,
        atol=1e-10,
    )


def test_content_weight_zero_leaves_columns_out():
    q_x, k_x, v_x = qkv(1, 5, 4)
    _, k_s, v_s = qkv(1, 3, 50)
    nan = torch.full((1, 5, INNER), float("nan"), dtype=D64)
    out = ff.fused_attention(q_x, k_x, v_x, nan, nan, nan, k_s, v_s, HEADS, gamma=0.0, content_weight=0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ff.attention(q_x, k_s, v_s, HEADS), rtol=0, atol=0)


def test_tau_two_equals_query_times_two():
    q, k, v = qkv(2, 5, 5)
    torch.testing.assert_close(ff.attention(q, k, v, HEADS, tau=2.0), ff.attention(2 * q, k, v, HEADS),
                               rtol=1e-12, atol=1e-12)
    out = ff.fused_attention(q, k, v, None, None, None, k, v, HEADS, tau=2.0)
    torch.testing.assert_close(out, naive_attention(2 * q, k, v, HEADS), rtol=1e-10, atol=1e-10)


def test_gamma_query_preservation():
    q_x, k_x, v_x = qkv(2, 5, 6)
    q_c = rand(1, 5, INNER, seed=70)  # batch 1 content broadcasts
    _, k_s, v_s = qkv(2, 4, 80)
    for gamma in (0.25, 0.75, 1.0):
        out = ff.fused_attention(q_x, k_x, v_x, q_c, None, None, k_s, v_s, HEADS, gamma=gamma)
        q = gamma * q_c.expand(2, -1, -1) + (1 - gamma) * q_x
        torch.testing.assert_close(out, naive_attention(q, k_s, v_s, HEADS), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="content query"):
        ff.fused_attention(q_x, k_x, v_x, None, None, None, k_s, v_s, HEADS, gamma=0.5)
    with pytest.raises(ValueError, match="no key/value source"):
        ff.fused_attention(q_x, k_x, v_x, None, None, None, None, None, HEADS)


def test_stylealigned_and_masactrl_dispatch():
    q_x, k_x, v_x = qkv(2, 6, 7)
    style = qkv(1, 4, 90)
    content = qkv(2, 6, 100)
    before = snapshot(q_x, k_x, v_x, *style, *content)
    sa = ff.fuse_for_preset(ff.get_preset("stylealigned"), q_x, k_x, v_x, None, style, HEADS)
    q_a = ff.adain(q_x, style[0], dims=1)
    k_a = ff.adain(k_x, style[1], dims=1)
    expected = naive_attention(q_a, torch.cat([style[1].expand(2, -1, -1), k_a], 1),
                               torch.cat([style[2].expand(2, -1, -1), v_x], 1), HEADS)
    torch.testing.assert_close(sa, expected, rtol=1e-10, atol=1e-10)
    mc = ff.fuse_for_preset(ff.get_preset("masactrl"), q_x, k_x, v_x, content, None, HEADS)
    torch.testing.assert_close(mc, naive_attention(q_x, content[1], content[2], HEADS), rtol=1e-10, atol=1e-10)
    assert_unchanged(before, [q_x, k_x, v_x, *style, *content])
    with pytest.raises(ValueError, match="content KV store"):
        ff.fuse_for_preset(ff.get_preset("magicstyle"), q_x, k_x, v_x, None, style, HEADS)
    with pytest.raises(ValueError, match="style KV store"):
        ff.fuse_for_preset(ff.get_preset("styleid"), q_x, k_x, v_x, content, None, HEADS)


def test_fuse_batched_uncond_modes_and_store_layout():
    b, t = 2, 6
    q, k, v = qkv(2 * b, t, 8)  # ComfyUI rows: chunk 0 (uncond here), chunk 1 (cond)
    cou = [1, 0]
    content, style = qkv(b, t, 110), qkv(1, 5, 120)
    params = ff.get_preset("magicstyle")
    cond = ff.fuse_for_preset(params, q[b:], k[b:], v[b:], content, style, HEADS)
    out = ff.fuse_batched(params.replace(uncond_mode="plain"), q, k, v, content, style, HEADS, cou)
    torch.testing.assert_close(out[:b], ff.attention(q[:b], k[:b], v[:b], HEADS), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[b:], cond, rtol=1e-12, atol=1e-12)
    so = ff.fuse_batched(params.replace(uncond_mode="style_only"), q, k, v, content, style, HEADS, cou)
    torch.testing.assert_close(so[:b], naive_attention(q[:b], style[1], style[2], HEADS, tau=params.tau),
                               rtol=1e-10, atol=1e-10)
    fused = ff.fuse_batched(params, q, k, v, content, style, HEADS, cou)
    torch.testing.assert_close(fused[b:], cond, rtol=1e-12, atol=1e-12)
    # sources laid out over all rows (as KVStore.get(..., cond_or_uncond=...) returns) give the same result
    tiled = tuple(x.repeat(2, 1, 1) for x in content)
    torch.testing.assert_close(ff.fuse_batched(params, q, k, v, tiled, style, HEADS, cou), fused,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ff.fuse_batched(params.replace(uncond_mode="plain"), q, k, v, tiled, style, HEADS, cou), out,
        rtol=1e-12, atol=1e-12,
    )


# ------------------------------------------------------------------------------------------------ AdaIN
def test_adain_moves_statistics_exactly():
    x = rand(3, 10, INNER, seed=9) * 3 + 1
    ref = rand(1, 7, INNER, seed=130) * 0.5 - 2
    before = snapshot(x, ref)
    out = ff.adain(x, ref, dims=1)
    assert_unchanged(before, [x, ref])
    torch.testing.assert_close(out.mean(1), ref.mean(1).expand(3, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.std(1, correction=0), ref.std(1, correction=0).expand(3, -1),
                               rtol=1e-10, atol=1e-10)
    matched = rand(3, 7, INNER, seed=131)
    out_m = ff.adain(x, matched, dims=1)
    torch.testing.assert_close(out_m.std(1, correction=0), matched.std(1, correction=0), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="ref batch"):
        ff.adain(x, rand(2, 7, INNER, seed=1), dims=1)


def test_adain_latent_formula_and_batch():
    z_c = rand(2, 4, 8, 6, seed=11) * 2 + 0.5
    z_s = rand(1, 4, 5, 9, seed=140) * 0.7 - 1
    before = snapshot(z_c, z_s)
    z = ff.adain_latent(z_c, z_s)
    assert_unchanged(before, [z_c, z_s])
    dims = (2, 3)
    manual = z_s.std(dims, keepdim=True, correction=0) * (z_c - z_c.mean(dims, keepdim=True)) / z_c.std(
        dims, keepdim=True, correction=0
    ) + z_s.mean(dims, keepdim=True)
    torch.testing.assert_close(z, manual, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.mean(dims), z_s.mean(dims).expand(2, -1), rtol=1e-10, atol=1e-10)
    z32 = ff.adain_latent(z_c.half(), z_s.half())
    assert z32.dtype == torch.float16
    with pytest.raises(ValueError, match="channel"):
        ff.adain_latent(z_c, rand(1, 3, 5, 5, seed=2))


# ------------------------------------------------------------------------------------------------ presets
def test_fusion_presets_and_validation():
    p = ff.get_preset("styleid")
    assert (p.gamma, p.tau, p.use_style_kv, p.use_content_kv, p.layers_preset) == (0.75, 1.5, True, False, "styleid")
    assert p.needs_content and p.needs_style  # the content query (query preservation), not content K/V
    m = ff.get_preset("magicstyle")
    assert m.use_content_kv and m.use_style_kv and m.needs_content
    sa = ff.get_preset("stylealigned")
    assert sa.adain_qk and sa.include_self and sa.layers_preset == "all"
    mc = ff.get_preset("masactrl")
    assert not mc.active(3, 50) and mc.active(4, 50) and mc.active(49, 50)
    assert mc.layers_preset == "masactrl" and mc.gamma == 0.0
    assert percent_steps(10, 0.2, 0.5) == [2, 3, 4]
    assert percent_steps(10, 0.0, 1.0) == list(range(10))
    assert ff.get_preset("styleid", tau=1.0).tau == 1.0 and ff.get_preset("styleid").tau == 1.5
    for bad in ({"gamma": 1.5}, {"content_weight": -1.0}, {"tau": 0.0}, {"start_percent": 0.8, "end_percent": 0.2},
                {"uncond_mode": "nope"}):
        with pytest.raises(ValueError):
            ff.get_preset("magicstyle", **bad)
    with pytest.raises(ValueError, match="unknown fusion preset"):
        ff.get_preset("nope")


# ------------------------------------------------------------------------------------------------ KV store
SIGMAS = [14.6, 7.1, 3.2, 1.4, 0.55, 0.12, 0.0]
LAYERS = [("output", 6, 0), ("output", 9, 0)]


def make_store(**kw):
    args = dict(model_id="sd15:abc", latent_shape=(4, 8, 8), sigmas=SIGMAS, family="sd15", layers=LAYERS)
    args.update(kw)
    return KVStore(**args)


def test_store_record_get_and_exact_nbytes():
    store = make_store()
    n1 = rand(2, 64, 40, seed=12, dtype=torch.float32)
    n2 = rand(2, 16, 80, seed=13, dtype=torch.float32)
    before = snapshot(n1, n2)
    assert store.record(LAYERS[0], 14.6, n1)
    assert store.record(LAYERS[1], torch.tensor([7.1, 7.1]), n2)
    assert_unchanged(before, [n1, n2])
    assert not store.record(("output", 7, 0), 14.6, n1)  # layer not selected
    assert store.nbytes == sum(t.numel() * t.element_size() for t in (n1.half(), n2.half()))
    assert store.nbytes == (2 * 64 * 40 + 2 * 16 * 80) * 2
    assert store.qkv_equivalent_nbytes() == 3 * store.nbytes
    assert store.qkv_equivalent_nbytes({LAYERS[0]: 20}) == 3 * 2 * (2 * 64 * 20 + 2 * 16 * 80)
    got = store.get(LAYERS[0], 14.6, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, n1.half().float())
    n1.add_(1.0)  # the store holds a copy
    torch.testing.assert_close(store.get(LAYERS[0], 14.6, dtype=torch.float32), before[0].half().float())
    assert store.has(LAYERS[0], 14.6) and not store.has(LAYERS[0], 7.1)
    with pytest.raises(KeyError, match="no features for output 6:0"):
        store.get(LAYERS[0], 7.1)
    for name, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        s = make_store(dtype=name)
        s.record(LAYERS[0], 14.6, n2)
        assert s.get(LAYERS[0], 14.6).element_size() == size
        assert s.nbytes == n2.numel() * size
    assert len(store) == 2 and "2/2 layers" in store.summary()


def test_store_budget_checked_before_storing():
    n = rand(1, 64, 40, seed=14, dtype=torch.float32)
    one = n.numel() * 2
    store = make_store(budget_bytes=2 * one)
    store.record(LAYERS[0], 14.6, n)
    store.record(LAYERS[0], 7.1, n)  # exactly at the budget
    assert store.nbytes == 2 * one
    store.record(LAYERS[0], 7.1, n)  # overwriting an entry needs no extra bytes
    with pytest.raises(StoreBudgetError) as err:
        store.record(LAYERS[0], 3.2, n)
    msg = str(err.value)
    assert f"{3 * one:,} bytes" in msg and f"{2 * one:,} bytes" in msg
    assert "fewer layers" in msg and "fewer steps" in msg
    assert store.nbytes == 2 * one and not store.has(LAYERS[0], 3.2)
    s32 = make_store(budget_bytes=100, dtype="fp32")
    with pytest.raises(StoreBudgetError, match="fp16"):
        s32.record(LAYERS[0], 14.6, n)
    plan = make_store(budget_bytes=1000)
    need = plan.planned_nbytes()
    assert need == (16 * 640 + 64 * 320) * 6 * 2  # 8x8 latent: output 6 at 4x4 tokens, output 9 at 8x8
    with pytest.raises(StoreBudgetError, match=f"{need:,} bytes"):
        plan.check_plan()


def test_store_mismatch_errors_name_the_field():
    store = make_store()
    store.check_compatible("sd15:abc", (1, 4, 8, 8), SIGMAS, who="FFA")
    store.check_compatible(None, None, None)
    with pytest.raises(StoreMismatchError, match=r"FFA: .*model 'sd15:abc'.*'other'"):
        store.check_compatible("other", (4, 8, 8), SIGMAS, who="FFA")
    with pytest.raises(StoreMismatchError, match=r"latent size differs: .*8x8.*16x8"):
        store.check_compatible("sd15:abc", (4, 16, 8), SIGMAS)
    with pytest.raises(StoreMismatchError, match="channels"):
        store.check_compatible("sd15:abc", (16, 8, 8), SIGMAS)
    with pytest.raises(StoreMismatchError, match=r"schedule length differs: .*6 steps.*5"):
        store.check_compatible("sd15:abc", (4, 8, 8), SIGMAS[1:])
    with pytest.raises(StoreMismatchError, match=r"schedule values differ: at step 2"):
        store.check_compatible("sd15:abc", (4, 8, 8), [14.6, 7.1, 3.3, 1.4, 0.55, 0.12, 0.0])
    # the inversion's ascending schedule without the zero is the same schedule
    store.check_compatible("sd15:abc", (4, 8, 8), torch.tensor(SIGMAS[:-1]).flip(0))
    with pytest.raises(StoreMismatchError, match="not in the schedule"):
        store.record(LAYERS[0], 5.0, rand(1, 64, 40, seed=1))


def test_store_and_gate_deepcopy_return_self():
    store, gate = make_store(), CaptureGate()
    options = {"transformer_options": {"gates": [gate], "store": store}}
    copied = copy.deepcopy(options)
    assert copied["transformer_options"]["store"] is store
    assert copied["transformer_options"]["gates"][0] is gate
    assert copy.copy(store) is store
    gate.set(True)
    assert copied["transformer_options"]["gates"][0].open and bool(gate)
    gate.open = False
    assert not copied["transformer_options"]["gates"][0].open


def test_sigma_lookup_tolerance_and_step_selection():
    assert clean_schedule(SIGMAS) == tuple(SIGMAS[:-1])
    assert clean_schedule(list(reversed(SIGMAS))) == tuple(SIGMAS[:-1])
    assert find_sigma_index(7.1 * (1 + 5e-5), SIGMAS[:-1]) == 1
    assert find_sigma_index(7.1 * (1 - 5e-5), SIGMAS[:-1]) == 1
    assert find_sigma_index(7.1 * (1 + 1e-3), SIGMAS[:-1]) is None
    assert sigma_value(torch.tensor([3.2, 3.2], dtype=torch.float32)) == pytest.approx(3.2, rel=1e-6)
    store = make_store(start_percent=0.0, end_percent=0.5)
    assert store.step_indices == (0, 1, 2)
    n = rand(1, 64, 40, seed=15)
    assert store.record(LAYERS[0], torch.tensor([7.1], dtype=torch.float32), n)
    assert store.has(LAYERS[0], 7.1 * (1 + 5e-5)) and not store.has(LAYERS[0], 7.1 * 1.01)
    assert not store.record(LAYERS[0], 1.4, n)  # step 3 is outside the kept range
    assert not store.wants(LAYERS[0], 1.4) and store.wants(LAYERS[0], 3.2)
    picked = make_store(step_indices=[0, 2, 4], start_percent=0.2)
    assert picked.step_indices == (2, 4)
    with pytest.raises(ValueError, match="outside"):
        make_store(step_indices=[9])
    store.record(LAYERS[1], 14.6, n)
    assert store.missing() and not store.is_complete()


def test_store_batch_mapping_for_cond_uncond_chunks():
    store = make_store()
    n = rand(2, 64, 40, seed=16, dtype=torch.float32)
    # a capture pass with [uncond, cond] chunks keeps the cond chunk
    both = torch.cat([n + 100, n])
    store.record(LAYERS[0], 14.6, both, cond_or_uncond=[1, 0])
    assert store.batch == 2
    stored = store.get(LAYERS[0], 14.6, dtype=torch.float32)
    torch.testing.assert_close(stored, n.half().float())
    rows = store.get(LAYERS[0], 14.6, dtype=torch.float32, batch=2, cond_or_uncond=[1, 0])
    assert rows.shape == (4, 64, 40)
    for j in range(2):
        for i in range(2):
            torch.testing.assert_close(rows[j * 2 + i], stored[i])
    with pytest.raises(StoreMismatchError, match="holds 2 images"):
        store.get(LAYERS[0], 14.6, batch=3)
    with pytest.raises(StoreMismatchError, match="batch of 1"):
        store.record(LAYERS[0], 7.1, n[:1])
    single = make_store()
    single.record(LAYERS[0], 14.6, n[:1])
    wide = single.get(LAYERS[0], 14.6, batch=3, cond_or_uncond=[0, 1])
    assert wide.shape == (6, 64, 40) and torch.equal(wide[5], wide[0])
    assert chunk_batch(6, [0, 1]) == 3
    with pytest.raises(ValueError):
        chunk_batch(5, [0, 1])


# ------------------------------------------------------------------------------------------------ layers
def test_layer_tables_and_presets():
    assert len(L.all_layers("sd15")) == 16
    assert len(L.all_layers("sdxl")) == 70
    assert L.preset_layers("instantstyle_style", "sdxl") == [("output", 1, i) for i in range(10)]
    assert L.preset_layers("instantstyle_style", "sd15") == [("output", n, 0) for n in (3, 4, 5)]
    assert L.preset_layers("instantstyle_layout", "sdxl") == [("input", 8, i) for i in range(10)]
    assert L.preset_layers("instantstyle_layout", "sd15") == [("input", 7, 0), ("input", 8, 0), ("middle", 0, 0)]
    assert L.preset_layers("styleid", "sd15") == [("output", n, 0) for n in range(6, 12)]
    assert L.preset_layers("styleid", "sdxl") == [("output", n, i) for n in (3, 4, 5) for i in range(2)]
    assert L.preset_layers("masactrl", "sd15") == [("output", n, 0) for n in range(6, 12)]
    assert len(L.preset_layers("masactrl", "sdxl")) == 70 - 44
    assert len(L.preset_layers("decoder", "sdxl")) == 36
    assert L.all_layers("sdxl")[24:34] == [("middle", 0, i) for i in range(10)]
    info = L.layer_info("sdxl", "output", 1)
    assert (info.channels, info.heads, info.dim_head, info.depth) == (1280, 20, 64, 10)
    assert L.tokens_at("sd15", "middle", 0, 64, 64) == (8, 8)
    assert L.tokens_at("sdxl", "output", 4, 128, 128) == (64, 64)
    assert L.tokens_at("sd15", "input", 4, 65, 63) == (33, 32)
    assert L.layer_key({"block": ("output", 7), "block_index": 0}) == ("output", 7, 0)
    assert L.layer_key({}) is None


def test_custom_layer_lists_and_errors():
    got = L.parse_layer_spec("output 3-5, middle 0, input 8:0-3", "sdxl")
    assert got == (
        [("input", 8, i) for i in range(4)]
        + [("middle", 0, i) for i in range(10)]
        + [("output", n, i) for n in (3, 4, 5) for i in range(2)]
    )
    assert L.parse_layer_spec("input 7, 8", "sd15") == [("input", 7, 0), ("input", 8, 0)]
    assert L.parse_layer_spec("out 9-11; mid", "sd15") == [("middle", 0, 0)] + [("output", n, 0) for n in (9, 10, 11)]
    assert L.resolve_layers("styleid", "sd15") == L.preset_layers("styleid", "sd15")
    assert L.resolve_layers([("output", 1, 9)], "sdxl") == [("output", 1, 9)]
    sel = L.parse_layer_spec("output 0:0 2-3, output 1:0 2-3, input 8:9", "sdxl")
    assert L.parse_layer_spec(L.format_layers(sel), "sdxl") == sel
    errors = {
        "output 12": "output 12",
        "foo 3": "unknown block 'foo'",
        "3-5": "no block name",
        "output 5-3": "end is below the start",
        "input 8:0-12": "indices 0-9",
        "output 3::1": "at most one ':'",
        "output x": "bad block number 'x'",
        "": "empty",
        "input 1": "input 1",
    }
    for spec, needle in errors.items():
        with pytest.raises(L.LayerSpecError, match=re.escape(needle)):
            L.parse_layer_spec(spec, "sdxl")
    with pytest.raises(L.LayerSpecError, match="does not exist"):
        L.resolve_layers([("output", 12, 0)], "sd15")
    with pytest.raises(L.LayerSpecError, match="unknown model family"):
        L.all_layers("flux")


def test_depth_override_for_small_models():
    depths = {("input", 1): 1, ("middle", 0): 1, ("output", 3): 1, ("output", 4): 2}
    assert L.all_layers("sd15", depths) == [("input", 1, 0), ("middle", 0, 0), ("output", 3, 0), ("output", 4, 0),
                                            ("output", 4, 1)]
    assert L.parse_layer_spec("output 4:1", "sd15", depths) == [("output", 4, 1)]
    with pytest.raises(L.LayerSpecError, match="selects no self-attention layer"):
        L.preset_layers("styleid", "sd15", depths)  # output 6-11 does not exist in this model
    with pytest.raises(L.LayerSpecError, match="has no self-attention"):
        L.parse_layer_spec("output 6", "sd15", depths)


def test_project_qkv_recomputes_from_stored_hidden_state():
    proj = [torch.nn.Linear(INNER, INNER, bias=False).double() for _ in range(3)]
    n = rand(1, 6, INNER, seed=17)
    q, k, v = ff.project_qkv(n, *proj)
    torch.testing.assert_close(q, proj[0](n))
    # feeding the current pass's own hidden state as the style source gives plain self-attention
    out = ff.fuse_for_preset(ff.get_preset("styleid", gamma=0.0, tau=1.0), q, k, v, None, (q, k, v), HEADS)
    torch.testing.assert_close(out, ff.attention(q, k, v, HEADS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ff.FUSION_PRESET_NAMES)
@pytest.mark.parametrize("uncond_mode", ff.UNCOND_MODES)
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_hidden_state_route_equals_the_qkv_route(preset, uncond_mode, branch):
    """Fusing from hidden states (one blended query projection, no unused current k/v) gives what fusing the
    projected q/k/v gives, for every preset and branch treatment, with biased (affine) projections, partial
    query preservation, a shared style image and the current k/v coming from a separate context/value."""
    g = torch.Generator().manual_seed(5)
    to_q, to_k, to_v = (torch.nn.Linear(INNER, INNER, bias=True).double() for _ in range(3))
    for lin in (to_q, to_k, to_v):
        lin.bias.data = torch.randn(INNER, generator=g, dtype=D64)
    params = ff.get_preset(preset, uncond_mode=uncond_mode)
    if params.gamma == 0 and params.needs_content:
        params = params.replace(gamma=0.4)  # exercise the blended query on the content-reading presets too
    n_x, ctx, val = rand(2, 6, INNER, seed=31), rand(2, 6, INNER, seed=32), rand(2, 6, INNER, seed=33)
    n_c, n_s = rand(2, 6, INNER, seed=34), rand(1, 5, INNER, seed=35)
    before = snapshot(n_x, ctx, val, n_c, n_s)
    content = (to_q(n_c), to_k(n_c), to_v(n_c))
    style = (to_q(n_s), to_k(n_s), to_v(n_s))
    for context, value in ((None, None), (ctx, val)):
        k_in = n_x if context is None else context
        v_in = k_in if value is None else value
        via_qkv = ff.fusion_inputs(params, to_q(n_x), to_k(k_in), to_v(v_in), content, style, branch)
        via_hidden = ff.hidden_fusion_inputs(params, n_x, to_q, to_k, to_v, n_c, n_s, branch, context, value)
        assert (via_qkv is None) == (via_hidden is None)
        if via_qkv is not None:
            assert via_hidden.weights == via_qkv.weights and via_hidden.tau == via_qkv.tau
            torch.testing.assert_close(via_hidden.attend(HEADS), via_qkv.attend(HEADS), rtol=1e-10, atol=1e-10)
    assert_unchanged(before, [n_x, ctx, val, n_c, n_s])


def test_hidden_state_route_projects_only_what_it_reads():
    """magicstyle (gamma > 0, style + content K/V): one query projection on the blended state, k/v of the two
    stored states, nothing of the current pass's k/v; plain attention on a 'plain' uncond branch projects nothing."""
    calls = {"q": [], "k": [], "v": []}

    def counting(name):
        lin = torch.nn.Linear(INNER, INNER, bias=False).double()
        return lambda t: calls[name].append(t) or lin(t)

    to_q, to_k, to_v = counting("q"), counting("k"), counting("v")
    n_x, n_c, n_s = rand(1, 6, INNER, seed=40), rand(1, 6, INNER, seed=41), rand(1, 6, INNER, seed=42)
    params = ff.get_preset("magicstyle")
    plan = ff.hidden_fusion_inputs(params, n_x, to_q, to_k, to_v, n_c, n_s)
    assert [len(calls[n]) for n in "qkv"] == [1, 2, 2] and len(plan.keys) == 2
    torch.testing.assert_close(calls["q"][0], 0.75 * n_c + 0.25 * n_x, rtol=1e-12, atol=1e-12)
    assert all(t is n_s or t is n_c for t in calls["k"] + calls["v"])
    assert ff.hidden_fusion_inputs(params.replace(uncond_mode="plain"), n_x, to_q, to_k, to_v, n_c, n_s,
                                   "uncond") is None
    assert [len(calls[n]) for n in "qkv"] == [1, 2, 2]
    with pytest.raises(ValueError, match="content KV store"):
        ff.hidden_fusion_inputs(params, n_x, to_q, to_k, to_v, None, n_s)
    with pytest.raises(ValueError, match="does not match"):
        ff.hidden_fusion_inputs(params, n_x, to_q, to_k, to_v, rand(1, 4, INNER, seed=43), n_s)


def test_upcast_computes_half_precision_attention_in_float32():
    """upcast=True: fp16/bf16 inputs are attended in float32 and the result cast back, exactly."""
    q, k, v = (t.float() for t in qkv(2, 6, 50))
    bias = torch.tensor([0.0, 0.0, 0.0, math.log(0.5), math.log(0.5), math.log(0.5)])
    for dtype in (torch.float16, torch.bfloat16):
        q16, k16, v16 = q.to(dtype), k.to(dtype), v.to(dtype)
        out = ff.attention(q16, k16, v16, HEADS, log_bias=bias, tau=1.5, upcast=True)
        expected = ff.attention(q16.float(), k16.float(), v16.float(), HEADS, log_bias=bias, tau=1.5).to(dtype)
        assert out.dtype == dtype and torch.equal(out, expected)
        plan = ff.FusionInputs(q=q16, keys=[k16[:, :3], k16[:, 3:]], values=[v16[:, :3], v16[:, 3:]],
                               weights=[1.0, 0.5], tau=1.5)
        assert torch.equal(plan.attend(HEADS, upcast=True), expected)
    # float32 inputs are left as they are
    assert torch.equal(ff.attention(q, k, v, HEADS, upcast=True), ff.attention(q, k, v, HEADS))
