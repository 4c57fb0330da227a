"""Core tier: Feature Fusion Attention (the one fusion API against the formula written from its definitions), the
batch-row mapping, the KV feature store and layer tables (no ComfyUI)."""

import copy
import math
import re

import pytest
import torch
from oracles import store_has, store_is_complete
from tolerances import attention_ops, float_tol, magnitude

from magic_core import fusion as ff
from magic_core import layers as L
from magic_core.batch_rows import BatchRows
from magic_core.kv_store import (
    CaptureGate,
    KVStore,
    StoreBudgetError,
    StoreMismatchError,
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
    torch.testing.assert_close(ff.attention(q, k, v, HEADS), naive_attention(q, k, v, HEADS), rtol=0,
                               atol=fusion_tol(D64, 5, 0, v))
    torch.testing.assert_close(
        ff.attention(q, k7, v7, HEADS, log_bias=bias, tau=1.7),
        naive_attention(q, k7, v7, HEADS, bias=bias, tau=1.7),
        rtol=0,
        atol=fusion_tol(D64, 7, 0, v7),
    )


# ------------------------------------------------------------------------------------------------ reference formula
def linear(seed, bias=True):
    """An affine projection INNER -> INNER in float64 (attn1's to_q/to_k/to_v are affine in SD1.5/SDXL alike)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(INNER, INNER, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(INNER, INNER, generator=g, dtype=D64) / math.sqrt(INNER))
        if bias:
            lin.bias.copy_(torch.randn(INNER, generator=g, dtype=D64) * 0.1)
    return lin


def projections(seed=0):
    return ff.Projections(linear(seed), linear(seed + 1), linear(seed + 2))


def reference_adain(x, ref):
    """x renormalised to ref's per-feature mean and population std over the tokens (StyleAligned's AdaIN)."""
    mean_x, std_x = x.mean(dim=1, keepdim=True), x.var(dim=1, keepdim=True, unbiased=False).sqrt()
    mean_r, std_r = ref.mean(dim=1, keepdim=True), ref.var(dim=1, keepdim=True, unbiased=False).sqrt()
    return (x - mean_x) / std_x * std_r + mean_r


def reference_fusion(params, proj, n_x, n_c, n_s, branch="cond", style_weight=1.0, context=None, value=None):
    """Feature Fusion Attention from the definitions in magic_core/fusion.py's docstring, one image and one head at a time, plain ops:

    out = softmax(tau * q' K'^T / sqrt(d) + log_bias) V', q' = gamma * q_c + (1 - gamma) * q_x,
    K' = [K_s ; K_c (; K_x)], V' = [V_s ; V_c (; V_x)], log_bias = log(weight) of each key's group (content:
    content_weight, style: style_weight, self: 1); StyleAligned's AdaIN of q_x and k_x toward the style's q and k
    first. The uncond branch: "plain" is plain attention, "style_only" the current query on the style's K/V."""
    to_q, to_k, to_v = proj
    kv_in = n_x if context is None else context
    q_x, k_x, v_x = to_q(n_x), to_k(kv_in), to_v(kv_in if value is None else value)
    b = n_x.shape[0]

    def per_image(t):
        return None if t is None else t.expand(b, -1, -1)

    n_c, n_s = per_image(n_c), per_image(n_s)
    if branch == "uncond" and params.uncond_mode == "plain":
        groups, q = [(k_x, v_x, 1.0)], q_x
        tau = 1.0
    else:
        style_only = branch == "uncond" and params.uncond_mode == "style_only"
        tau = params.tau
        if params.adain_qk:
            q_x, k_x = reference_adain(q_x, to_q(n_s)), reference_adain(k_x, to_k(n_s))
        q = q_x
        if not style_only and params.gamma > 0:
            q = params.gamma * to_q(n_c) + (1 - params.gamma) * q_x
        groups = []
        if params.use_style_kv or style_only:
            groups.append((to_k(n_s), to_v(n_s), style_weight))
        if not style_only and params.use_content_kv and params.content_weight > 0:
            groups.append((to_k(n_c), to_v(n_c), params.content_weight))
        if params.include_self:
            groups.append((k_x, v_x, 1.0))
    keys = torch.cat([k for k, _, _ in groups], dim=1)
    values = torch.cat([v for _, v, _ in groups], dim=1)
    log_bias = torch.cat([torch.full((k.shape[1],), math.log(w), dtype=keys.dtype) for k, _, w in groups])
    return naive_attention(q, keys, values, HEADS, bias=log_bias, tau=tau)


def fusion_tol(dtype, keys: int, tokens: int, *tensors) -> float:
    """Two correct evaluations of one fused attention: the projections' fan-in, AdaIN's statistics over the tokens,
    q.k over the head dim, the softmax and weighted sum over the keys; relative to the values' magnitude."""
    return float_tol(dtype, INNER + 2 * tokens + attention_ops(DIM, keys), magnitude(*tensors))


PRESET_BRANCHES = [(p, m, br) for p in ff.FUSION_PRESET_NAMES for m in ff.UNCOND_MODES for br in ("cond", "uncond")]


@pytest.mark.parametrize(("preset", "uncond_mode", "branch"), PRESET_BRANCHES)
@pytest.mark.parametrize("form", ["hidden state", "projected q/k/v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plan_fusion_equals_the_reference_formula(preset, uncond_mode, branch, form, dtype):
    """The one fusion API, for every preset and branch treatment, from the current pass's hidden state (the stand-in
    module) or its projected q/k/v (an attn1 replace), with affine projections, partial query preservation, a
    shared style image of another token count, content per image, and attn1's separate context/value, equals the
    formula written out from the definitions (computed in float64)."""
    params = ff.get_preset(preset, uncond_mode=uncond_mode)
    if params.needs_content and params.gamma == 0:
        params = params.replace(gamma=0.4)  # query preservation on every content-reading preset
    proj64 = projections(1)
    n_x, n_c, n_s = rand(2, 6, INNER, seed=2), rand(2, 6, INNER, seed=3), rand(1, 5, INNER, seed=4)
    context, value = rand(2, 6, INNER, seed=5), rand(2, 6, INNER, seed=6)
    for ctx, val in ((None, None), (context, value)):
        want = reference_fusion(params, proj64, n_x, n_c, n_s, branch, context=ctx, value=val)
        proj = ff.Projections(*(copy.deepcopy(p).to(dtype) for p in proj64))
        x, c, s = n_x.to(dtype), n_c.to(dtype), n_s.to(dtype)
        cx, vx = (None if t is None else t.to(dtype) for t in (ctx, val))
        if form == "hidden state":
            current = ff.CurrentPass(n=x, context=cx, value=vx)
        else:
            kv_in = x if cx is None else cx
            current = ff.CurrentPass(q=proj.to_q(x), k=proj.to_k(kv_in), v=proj.to_v(kv_in if vx is None else vx))
        before = snapshot(x, c, s)
        with torch.no_grad():
            plan = ff.plan_fusion(params, proj, current, c, s, branch)
            got = plan.attend(HEADS) if plan is not None else ff.attention(current.projected_query(proj),
                                                                            current.projected_key(proj),
                                                                            current.projected_value(proj), HEADS)
        assert_unchanged(before, [x, c, s])
        assert (plan is None) == (branch == "uncond" and uncond_mode == "plain")
        assert got.dtype == dtype
        keys = sum(k.shape[1] for k in plan.keys) if plan is not None else 6
        with torch.no_grad():
            values = [proj64.to_v(t) for t in (n_x, n_c, n_s, val) if t is not None]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=fusion_tol(dtype, keys, 6, *values))


def test_identity_invariant_equals_plain_attention():
    """gamma 0, content weight 0, tau 1 and the current pass as the style: plain self-attention, for
    the styleid and magicstyle presets, and content of NaN is never read."""
    proj = projections(7)
    n_x = rand(2, 6, INNER, seed=8)
    nan = torch.full((2, 6, INNER), float("nan"), dtype=D64)
    with torch.no_grad():
        plain = naive_attention(proj.to_q(n_x), proj.to_k(n_x), proj.to_v(n_x), HEADS)
        for name in ("styleid", "magicstyle"):
            params = ff.get_preset(name, gamma=0.0, content_weight=0.0, tau=1.0)
            out = ff.plan_fusion(params, proj, ff.CurrentPass(n=n_x), nan, n_x).attend(HEADS)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, plain, rtol=0, atol=fusion_tol(D64, 6, 6, proj.to_v(n_x)))


def test_duplicated_keys_leave_attention_unchanged():
    q, k, v = qkv(2, 5, 1)
    doubled = ff.attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1), HEADS)
    torch.testing.assert_close(doubled, ff.attention(q, k, v, HEADS), rtol=0, atol=fusion_tol(D64, 10, 5, v))


def test_content_weight_two_equals_duplicated_content_columns():
    proj = projections(9)
    n_x, n_c, n_s = rand(2, 5, INNER, seed=10), rand(2, 5, INNER, seed=11), rand(2, 4, INNER, seed=12)
    with torch.no_grad():
        params = ff.get_preset("magicstyle", gamma=0.0, content_weight=2.0, tau=1.0)
        fused = ff.plan_fusion(params, proj, ff.CurrentPass(n=n_x), n_c, n_s).attend(HEADS)
        k_c, v_c, k_s, v_s = proj.to_k(n_c), proj.to_v(n_c), proj.to_k(n_s), proj.to_v(n_s)
        dup = ff.attention(proj.to_q(n_x), torch.cat([k_s, k_c, k_c], 1), torch.cat([v_s, v_c, v_c], 1), HEADS)
    torch.testing.assert_close(fused, dup, rtol=0, atol=fusion_tol(D64, 14, 5, v_c, v_s))


def test_tau_two_equals_query_times_two():
    q, k, v = qkv(2, 5, 5)
    torch.testing.assert_close(ff.attention(q, k, v, HEADS, tau=2.0), ff.attention(2 * q, k, v, HEADS),
                               rtol=0, atol=fusion_tol(D64, 5, 5, v))
    torch.testing.assert_close(ff.attention(q, k, v, HEADS, tau=2.0), naive_attention(2 * q, k, v, HEADS),
                               rtol=0, atol=fusion_tol(D64, 5, 5, v))


def test_missing_sources_and_mismatched_content_are_refused():
    proj = projections(13)
    n_x, n_s = rand(2, 5, INNER, seed=14), rand(1, 4, INNER, seed=15)
    current = ff.CurrentPass(n=n_x)
    with pytest.raises(ValueError, match="content KV store"):
        ff.plan_fusion(ff.get_preset("magicstyle"), proj, current, None, n_s)
    with pytest.raises(ValueError, match="style KV store"):
        ff.plan_fusion(ff.get_preset("styleid"), proj, current, rand(1, 5, INNER, seed=16), None)
    with pytest.raises(ValueError, match="does not match"):
        ff.plan_fusion(ff.get_preset("magicstyle"), proj, current, rand(1, 4, INNER, seed=17), n_s)
    with pytest.raises(ValueError, match="either a hidden state"):
        ff.CurrentPass(n=n_x, q=n_x, k=n_x, v=n_x)


def test_plan_fusion_projects_only_what_it_reads():
    """magicstyle (gamma > 0, style + content K/V) from the hidden state: one query projection on the blended
    state, k/v of the two stored states, nothing of the current pass's k/v; a 'plain' uncond part projects nothing."""
    calls = {"q": [], "k": [], "v": []}

    def counting(name, seed):
        lin = linear(seed, bias=False)
        return lambda t: calls[name].append(t) or lin(t)

    proj = ff.Projections(counting("q", 20), counting("k", 21), counting("v", 22))
    n_x, n_c, n_s = rand(1, 6, INNER, seed=40), rand(1, 6, INNER, seed=41), rand(1, 6, INNER, seed=42)
    params = ff.get_preset("magicstyle")
    with torch.no_grad():
        plan = ff.plan_fusion(params, proj, ff.CurrentPass(n=n_x), n_c, n_s)
    assert [len(calls[n]) for n in "qkv"] == [1, 2, 2] and len(plan.keys) == 2
    torch.testing.assert_close(calls["q"][0], 0.75 * n_c + 0.25 * n_x, rtol=0, atol=float_tol(D64, 2, 4.0))
    assert all(t is n_s or t is n_c for t in calls["k"] + calls["v"])
    assert ff.plan_fusion(params.replace(uncond_mode="plain"), proj, ff.CurrentPass(n=n_x), n_c, n_s,
                          "uncond") is None
    assert [len(calls[n]) for n in "qkv"] == [1, 2, 2]


# ------------------------------------------------------------------------------------------------ batch rows
def test_batch_rows_map_call_rows_onto_shared_and_per_image_sources():
    rows = BatchRows.of(6, [1, 0])
    assert (rows.kinds, rows.per_chunk, rows.rows) == ((1, 0), 3, 6)
    assert rows.kept_chunk() == slice(3, 6) and BatchRows.of(4, [1, 1]).kept_chunk() == slice(0, 2)
    assert BatchRows.of(4) == BatchRows((0,), 4) == BatchRows.per_image(4, None)
    with pytest.raises(ValueError, match="do not split"):
        BatchRows.of(5, [0, 1])
    per_image, shared = rand(3, 4, INNER, seed=50), rand(1, 4, INNER, seed=51)
    whole = rows.source_rows(per_image)
    for r in range(6):  # row r of the call is image r % B of chunk r // B
        assert torch.equal(whole[r], per_image[r % 3])
    assert rows.source_rows(per_image, rows.chunk(1)) is per_image
    assert rows.source_rows(shared) is shared  # broadcast by attention: projected once
    assert torch.equal(rows.source_rows(shared, broadcast=False), shared.expand(6, -1, -1))
    assert rows.source_rows(None) is None
    with pytest.raises(ValueError, match="needs 1 row .* or 3"):
        rows.source_rows(rand(2, 4, INNER, seed=52))
    with pytest.raises(ValueError, match="not whole chunks"):
        rows.source_rows(per_image, slice(1, 4))


def test_batch_rows_parts_keep_uncond_apart_only_when_asked():
    rows = BatchRows.of(4, [1, 0])
    (whole,) = rows.parts(uncond_apart=False)
    assert whole.rows == slice(0, 4) and whole.kinds == (1, 0) and whole.branch == "cond"
    apart = rows.parts(uncond_apart=True)
    assert [(p.rows, p.kinds, p.branch) for p in apart] == [(slice(0, 2), (1,), "uncond"),
                                                             (slice(2, 4), (0,), "cond")]
    (cond_only,) = BatchRows.of(4, [0, 0]).parts(uncond_apart=True)
    assert cond_only.rows == slice(0, 4) and cond_only.branch == "cond"


@pytest.mark.parametrize(("images", "kinds"), [(2, [1, 0]), (1, [0, 1]), (3, [0]), (2, None)])
def test_batch_rows_lay_out_stored_rows_as_the_store_does(images, kinds):
    """What KVStore.get(batch=B, cond_or_uncond=...) returns for a store of B images or of one is what
    BatchRows.per_image(B, cond_or_uncond).source_rows(stored, broadcast=False) gives, and a recording keeps the rows
    of BatchRows.kept_chunk()."""
    for stored_images in (images, 1):
        store = make_store(dtype="fp32")
        n = rand(stored_images, 64, 40, seed=53, dtype=torch.float32)
        store.record(LAYERS[0], 14.6, n)
        stored = store.get(LAYERS[0], 14.6)
        rows = BatchRows.per_image(images, kinds)
        assert torch.equal(store.get(LAYERS[0], 14.6, batch=images, cond_or_uncond=kinds),
                           rows.source_rows(stored, broadcast=False))
    images_n = rand(images, 64, 40, seed=54, dtype=torch.float32)
    call = torch.cat([images_n + 100 * j for j in range(len(kinds or [0]))])  # one distinct chunk per kind
    recorded = make_store(dtype="fp32")
    recorded.record(LAYERS[0], 14.6, call, cond_or_uncond=kinds)
    kept = BatchRows.of(call.shape[0], kinds).kept_chunk()
    assert torch.equal(recorded.get(LAYERS[0], 14.6), call[kept])


@pytest.mark.parametrize("uncond_mode", ff.UNCOND_MODES)
def test_fusing_a_cfg_batch_part_by_part_equals_each_chunk_alone(uncond_mode):
    """A CFG batch ([uncond, cond] chunks of 2 images) fused part by part through BatchRows gives, chunk by chunk,
    what each chunk fused alone gives, with per-image content and a shared style."""
    params = ff.get_preset("magicstyle", uncond_mode=uncond_mode)
    proj = projections(60)
    n_x, n_c, n_s = rand(4, 6, INNER, seed=61), rand(2, 6, INNER, seed=62), rand(1, 5, INNER, seed=63)
    rows = BatchRows.of(4, [1, 0])
    outs = []
    with torch.no_grad():
        for part in rows.parts(uncond_apart=uncond_mode != "fuse"):
            current = ff.CurrentPass(n=n_x[part.rows])
            plan = ff.plan_fusion(params, proj, current, rows.source_rows(n_c, part.rows),
                                  rows.source_rows(n_s, part.rows), part.branch)
            outs.append(plan.attend(HEADS) if plan is not None else ff.attention(
                current.projected_query(proj), current.projected_key(proj), current.projected_value(proj), HEADS))
        out = torch.cat(outs)
        for j, branch in enumerate(("uncond", "cond")):
            alone = reference_fusion(params, proj, n_x[rows.chunk(j)], n_c, n_s, branch)
            values = [proj.to_v(t) for t in (n_x, n_c, n_s)]
            torch.testing.assert_close(out[rows.chunk(j)], alone, rtol=0, atol=fusion_tol(D64, 11, 6, *values))


# ------------------------------------------------------------------------------------------------ AdaIN
def test_adain_moves_statistics_exactly():
    x = rand(3, 10, INNER, seed=9) * 3 + 1
    ref = rand(1, 7, INNER, seed=130) * 0.5 - 2
    before = snapshot(x, ref)
    out = ff.adain(x, ref, dims=1)
    assert_unchanged(before, [x, ref])
    stat_tol = float_tol(D64, 2 * 10, magnitude(x, ref, out))  # mean, then the std around it, over 10 tokens
    torch.testing.assert_close(out.mean(1), ref.mean(1).expand(3, -1), rtol=0, atol=stat_tol)
    torch.testing.assert_close(out.std(1, correction=0), ref.std(1, correction=0).expand(3, -1), rtol=0,
                               atol=stat_tol)
    matched = rand(3, 7, INNER, seed=131)
    out_m = ff.adain(x, matched, dims=1)
    torch.testing.assert_close(out_m.std(1, correction=0), matched.std(1, correction=0), rtol=0,
                               atol=float_tol(D64, 2 * 10, magnitude(x, matched, out_m)))
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
    stat_tol = float_tol(D64, 2 * 8 * 6, magnitude(z_c, z_s, z))  # mean, then the std around it, over 8x6
    torch.testing.assert_close(z, manual, rtol=0, atol=stat_tol)
    torch.testing.assert_close(z.mean(dims), z_s.mean(dims).expand(2, -1), rtol=0, atol=stat_tol)
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
    assert store_has(store, LAYERS[0], 14.6) and not store_has(store, LAYERS[0], 7.1)
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
    assert store.nbytes == 2 * one and not store_has(store, LAYERS[0], 3.2)
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
    assert store_has(store, LAYERS[0], 7.1 * (1 + 5e-5)) and not store_has(store, LAYERS[0], 7.1 * 1.01)
    assert not store.record(LAYERS[0], 1.4, n)  # step 3 is outside the kept range
    picked = make_store(step_indices=[0, 2, 4], start_percent=0.2)
    assert picked.step_indices == (2, 4)
    with pytest.raises(ValueError, match="outside"):
        make_store(step_indices=[9])
    store.record(LAYERS[1], 14.6, n)
    assert store.missing() and not store_is_complete(store)


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
    with pytest.raises(ValueError, match="do not split"):
        single.record(LAYERS[0], 7.1, n[:1].repeat(3, 1, 1), cond_or_uncond=[0, 1])  # 3 rows, 2 chunks


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
