"""ComfyUI tier: MagicStyle (KV Feature Store, Feature Fusion Attention, AdaIN Latent, MagicStyle Portrait) on tiny
random SD1.5/SDXL-architecture models, 16x16 latents and a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import tolerances as tol
import torch
from helpers import (
    assert_same_snapshot,
    cached_outputs,
    comfy_folders,
    latent,
    model_snapshot,
    object_node,
    run_in_graph,
)
from oracles import store_is_complete

from magic_portrait.comfy_env import WorkflowError

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
FFA = "MagicPortrait_FeatureFusionAttention"
TOKENS = 256  # the largest self-attention token grid of a 16x16 latent


@pytest.fixture(scope="module")
def patch(pack):
    """The Feature Fusion Attention patch objects (nodes/magicstyle_patch.py)."""
    return pack.nodes.magicstyle_patch


def store_spec(nodes, layers="all", dtype="fp32", start=0.0, end=1.0, budget_mb=4096.0, custom=""):
    return run_in_graph(nodes["MagicPortrait_KVFeatureStore"], layers=layers, custom_layers=custom, dtype=dtype,
                    device="cpu (offload)", budget_mb=budget_mb, start_percent=start, end_percent=end).result[0]


def invert(nodes, model, cond, lat, spec=None, steps=STEPS, mode="ddim"):
    """DDIM Invert with a feature store; returns (inverted LATENT, record, sampling sigmas, store)."""
    out = run_in_graph(nodes["MagicPortrait_DDIMInvert"], model=model, positive=cond, latent=lat, scheduler="normal",
                   steps=steps, strength=1.0, mode=mode, refine_iterations=0, edict_mix=0.93, cfg=1.0,
                   measure_round_trip=False, feature_store=spec)
    return out.result


def fuse(nodes, model, preset="magicstyle", content=None, style=None, layers="preset default", custom="",
         gamma=-1.0, content_weight=-1.0, tau=-1.0, start=-1.0, end=-1.0, uncond="preset default"):
    return run_in_graph(nodes[FFA], model=model, preset=preset, gamma=gamma, content_weight=content_weight, tau=tau,
                    layers=layers, custom_layers=custom, start_percent=start, end_percent=end, uncond=uncond,
                    content_store=content, style_store=style).result[0]


def sample(nodes, model, record, start=None):
    return run_in_graph(nodes["MagicPortrait_SampleInverted"], model=model, inversion=record, cfg=1.0,
                    measure_error=False, start_latent=start).result[0]["samples"]


def ffa_patches(model) -> dict:
    """{layer: LayerFusion}: fusion sits in attn1's place (an object patch) or, chained, in its replace slot."""
    found = {o.fusion.key: o.fusion for o in model.object_patches.values() if type(o).__name__ == "FusionStandIn"}
    attn1 = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    found.update({k: p for k, p in attn1.items() if type(p).__name__ == "LayerFusion"})
    return found


# ----------------------------------------------------------------------------------- a store of the very pass
@pytest.fixture(scope="module")
def self_pass(nodes, pack, sd15, tiny):
    """Invert a latent, then sample it back plainly while a store records every call of that reverse pass: the
    store then holds exactly the hidden states a second, identical reverse pass computes (all but the last sigma,
    which the reverse sampler never evaluates)."""
    cond, lat = tiny.sd15_cond(1), latent(1)
    _, record, sigmas, _ = invert(nodes, sd15, cond, lat)
    end = (STEPS - 1) / STEPS
    spec = store_spec(nodes, layers="all", dtype="fp32", end=end)
    capturing, store = spec.begin(model=sd15, samples=record.latent, sigmas=sigmas, node="test")
    gate = capturing.model_options["transformer_options"][pack.nodes.inversion_sampling.CAPTURE_GATES_KEY][-1]
    gate.open = True
    with torch.inference_mode():
        plain = sample(nodes, capturing, record)
    gate.open = False
    assert store_is_complete(store) and len(store.step_indices) == STEPS - 1
    return {"cond": cond, "record": record, "store": store, "plain": plain, "end": end}


@pytest.mark.parametrize("content_weight", [0.0, 1.0])
def test_identity_with_the_very_pass_as_style_and_duplicated_keys(nodes, sd15, self_pass, content_weight):
    """gamma 0, tau 1, style = the current pass: content weight 0 (style K/V only) and content weight 1 with
    content = style = the same store (duplicated keys [K;K], [V;V]) both equal the unpatched model."""
    store = self_pass["store"]
    content = store if content_weight else None
    patched = fuse(nodes, sd15, preset="magicstyle" if content_weight else "styleid", content=content, style=store,
                   layers="all", gamma=0.0, content_weight=content_weight, tau=1.0, start=0.0, end=self_pass["end"])
    out = sample(nodes, patched, self_pass["record"])
    patches = ffa_patches(patched)
    assert len(patches) == 16 and all(p.calls == STEPS - 1 for p in patches.values())
    torch.testing.assert_close(out, self_pass["plain"], rtol=0,
                               atol=tol.model_tol(sd15, out, calls=STEPS - 1, attention_keys=2 * TOKENS))
    # and the check has teeth: a sharper temperature changes the result
    sharp = fuse(nodes, sd15, preset="styleid", style=store, layers="all", gamma=0.0, tau=2.0, start=0.0,
                 end=self_pass["end"])
    assert tol.differs(sample(nodes, sharp, self_pass["record"]), self_pass["plain"])


def _attention_recorder(model):
    """Forward hooks on every transformer block: the hidden state n entering attn1 (norm1's output) and the
    attention output entering attn1.to_out, per layer and call. Returns (records, remove)."""
    layers = model_layers(model)
    records = {key: [] for key in layers}
    handles = []
    for key, info in layers.items():
        block = info["block"]
        handles.append(block.norm1.register_forward_hook(
            lambda mod, args, out, key=key: records[key].append({"n": out.detach().clone()})))
        handles.append(info["attn1"].to_out.register_forward_hook(
            lambda mod, args, out, key=key: records[key][-1].__setitem__("a", args[0].detach().clone())))
    return records, lambda: [h.remove() for h in handles]


def model_layers(model) -> dict:
    unet = model.model.diffusion_model
    found = {}
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            tbs = [tb for layer in block for tb in getattr(layer, "transformer_blocks", ())]
            for index, tb in enumerate(tbs):
                found[(name, number, index)] = {"block": tb, "attn1": tb.attn1}
    return found


def test_layers_outside_the_selection_are_bit_identical(nodes, sd15, tiny):
    """Only middle 0 is fused: every other layer's attention output is bit-identical to what the unpatched layer
    computes from the same input; upstream layers see bit-identical inputs; the selected layer did change."""
    cond, lat = tiny.sd15_cond(2), latent(2)
    _, record, _, content = invert(nodes, sd15, cond, lat, store_spec(nodes, layers="all"), steps=3)
    _, _, _, style = invert(nodes, sd15, cond, latent(3), store_spec(nodes, layers="all"), steps=3)
    patched = fuse(nodes, sd15, content=content, style=style, layers="custom", custom="middle 0")
    assert list(ffa_patches(patched)) == [("middle", 0, 0)]
    from comfy.ldm.modules import attention as comfy_attention

    recs, remove = _attention_recorder(sd15)
    try:
        sample(nodes, patched, record)
    finally:
        remove()
    assert ffa_patches(patched)[("middle", 0, 0)].calls == 2  # 3 steps: the reverse evaluates 2 sigmas
    plain_recs, remove = _attention_recorder(sd15)
    try:
        sample(nodes, sd15, record)
    finally:
        remove()
    layers = model_layers(sd15)
    with torch.inference_mode():
        for key, calls in recs.items():
            assert len(calls) == 2, key
            attn1 = layers[key]["attn1"]
            for call in calls:
                n = call["n"]
                ref = comfy_attention.optimized_attention(attn1.to_q(n), attn1.to_k(n), attn1.to_v(n), attn1.heads)
                if key == ("middle", 0, 0):
                    assert tol.differs(call["a"], ref)
                else:
                    assert torch.equal(call["a"], ref), key
            if key[0] == "input":  # upstream of the fused layer, first call: the unpatched model's inputs
                assert torch.equal(calls[0]["n"], plain_recs[key][0]["n"]), key


def test_recomputed_qkv_equal_stored_qkv_and_bytes_are_exact(nodes, pack, sd15, tiny):
    """A recorder in attn1's replace slot keeps q/k/v of the captured calls; projecting the stored n with the
    layer's to_q/to_k/to_v gives the same tensors. The store's byte count is the bytes of its tensors, computed
    independently from the model's layer widths and token grids, and q/k/v would take exactly 3x."""
    captured = {}
    gates_key = pack.nodes.inversion_sampling.CAPTURE_GATES_KEY
    from comfy.ldm.modules import attention as comfy_attention

    def recorder(q, k, v, extra):
        if any(g.open for g in extra.get(gates_key, ())):
            key = (extra["block"][0], extra["block"][1], extra["block_index"])
            idx = len([1 for kk in captured if kk[0] == key])
            captured[(key, idx)] = (q.clone(), k.clone(), v.clone())
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    model = sd15.clone()
    for key in model_layers(sd15):
        if key[0] == "output":
            model.set_model_attn1_replace(recorder, *key)
    _, _, sigmas, store = invert(nodes, model, tiny.sd15_cond(4), latent(4), store_spec(nodes, "decoder"), steps=3)
    layers = model_layers(sd15)
    assert set(store.layers) == {k for k in layers if k[0] == "output"}
    schedule = store.sigmas[::-1]  # inversion visits sigmas ascending: capture i is schedule position n-1-i
    with torch.inference_mode():
        for (key, i), (q, k, v) in captured.items():
            if key not in store.layers:
                continue
            n = store.get(key, schedule[i])
            attn1 = layers[key]["attn1"]
            for proj, want in zip((attn1.to_q, attn1.to_k, attn1.to_v), (q, k, v), strict=True):
                # one dot product of in_features terms per output, relative to the largest sum of |n_i w_i|
                terms = n.abs() @ proj.weight.abs().T + (0 if proj.bias is None else proj.bias.abs())
                torch.testing.assert_close(proj(n), want, rtol=0,
                                           atol=tol.float_tol(torch.float32, proj.in_features, float(terms.max())))
    assert len([c for c in captured if c[0] in store.layers]) == len(store.layers) * 3

    # bytes: fp16 store of the decoder, 2 images at 16x16: output 3-5 at 4x4 tokens, 6-8 at 8x8, 9-11 at 16x16
    # x channels x 3 sigmas (a 3-step schedule) x 2 bytes
    fp16 = invert(nodes, sd15, tiny.sd15_cond(4), latent(4, batch=2), store_spec(nodes, "decoder", dtype="fp16"),
                  steps=3)[3]
    tokens = {3: 16, 4: 16, 5: 16, 6: 64, 7: 64, 8: 64, 9: 256, 10: 256, 11: 256}
    channels = layers[("output", 3, 0)]["attn1"].to_q.in_features
    expected = sum(2 * tokens[n] * channels * 2 for (_, n, _) in store.layers) * 3
    assert fp16.nbytes == expected == sum(t.numel() * t.element_size() for t in fp16._data.values())
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in fp16._data.values())
    assert fp16.qkv_equivalent_nbytes() == 3 * expected
    assert pack.magic_core.kv_store.human_bytes(expected) in fp16.summary()


def test_budget_is_checked_before_inverting(nodes, sd15, tiny):
    spec = store_spec(nodes, "all", budget_mb=0.01)
    with pytest.raises(WorkflowError) as err:
        invert(nodes, sd15, tiny.sd15_cond(5), latent(5), spec, steps=3)
    text = str(err.value)
    assert "MagicPortrait_DDIMInvert" in text and "budget" in text and "budget_mb" in text, text


@pytest.fixture(scope="module")
def stores(nodes, sd15, tiny):
    cond = tiny.sd15_cond(6)
    spec = store_spec(nodes, "decoder", dtype="fp16")
    c_lat, c_rec, _, content = invert(nodes, sd15, cond, latent(6), spec, steps=3)
    s_lat, _, _, style = invert(nodes, sd15, cond, latent(7), spec, steps=3)
    return {"cond": cond, "content": content, "style": style, "record": c_rec, "c_lat": c_lat, "s_lat": s_lat}


def test_report_counts_only_the_sigmas_the_sampler_evaluates(nodes, sd15, tiny):
    """bdia's exact reverse starts from the two top states and never evaluates the top sigma: the report must not
    call that step unfused."""
    cond = tiny.sd15_cond(6)
    spec = store_spec(nodes, "decoder", dtype="fp16")
    _, record, _, content = invert(nodes, sd15, cond, latent(6), spec, steps=4, mode="bdia")
    _, _, _, style = invert(nodes, sd15, cond, latent(7), spec, steps=4, mode="bdia")
    out = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=fuse(nodes, sd15, content=content, style=style),
                   inversion=record, cfg=1.0, measure_error=False)
    text = "\n".join(out.ui["text"])
    assert "6/6 layers fused on every active step" in text and "WARNING" not in text, text


def test_store_from_another_model_size_or_schedule_is_refused(nodes, sd15, tiny, stores):
    other = tiny.build_sd15_model(seed=11)
    with pytest.raises(WorkflowError) as err:
        fuse(nodes, other, content=stores["content"], style=stores["style"])
    text = str(err.value)
    assert f"[{FFA}] input 'content_store'" in text and "another checkpoint" in text, text
    patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"])
    cond = stores["cond"]
    # another latent size
    _, big, _, _ = invert(nodes, sd15, cond, latent(8, height=24, width=24), steps=3)
    with pytest.raises(WorkflowError) as err:
        sample(nodes, patched, big)
    text = str(err.value)
    assert f"[{FFA}] input 'content_store'" in text and "latent size differs" in text, text
    # another schedule
    _, longer, _, _ = invert(nodes, sd15, cond, latent(8), steps=4)
    with pytest.raises(WorkflowError) as err:
        sample(nodes, patched, longer)
    text = str(err.value)
    assert f"[{FFA}] input 'content_store'" in text and "schedule" in text, text
    # a store whose layers do not cover the fusion layers; a preset's required store missing
    with pytest.raises(WorkflowError, match=r"input 'content_store'.*does not hold layers input 1-2"):
        fuse(nodes, sd15, content=stores["content"], style=stores["style"], layers="all")
    with pytest.raises(WorkflowError, match=r"input 'style_store'.*needs it"):
        fuse(nodes, sd15, content=stores["content"])


def test_input_model_is_never_changed(nodes, sd15, tiny, stores):
    before = model_snapshot(sd15)
    spec = store_spec(nodes, "decoder")
    invert(nodes, sd15, stores["cond"], latent(9), spec, steps=3)
    patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"])
    sample(nodes, patched, stores["record"])
    assert_same_snapshot(before, model_snapshot(sd15))
    assert model_snapshot(sd15)["transformer_options"] == before["transformer_options"]


def test_fused_layers_stand_in_for_attn1_and_are_reverted(nodes, pack, sd15, tiny, stores):
    """With the attn1 slots free, fusion replaces the selected attn1 modules through ModelPatcher object patches:
    while the fused model runs they sit in the UNet under the same state-dict keys (so weight patches such as LoRAs
    reach their projections), and the plain model afterwards is bit-identical to the plain model before."""
    tb = sd15.model.diffusion_model.output_blocks[11][1].transformer_blocks[0]
    keys_before = list(sd15.model.state_dict())
    plain_before = sample(nodes, sd15, stores["record"])
    patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"])
    assert sorted(type(o).__name__ for o in patched.object_patches.values()) == ["FusionStandIn"] * 6
    assert not patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1")
    fused = sample(nodes, patched, stores["record"])
    assert type(tb.attn1).__name__ == "FusionStandIn"
    assert list(sd15.model.state_dict()) == keys_before
    assert tol.differs(fused, plain_before)
    # a weight patch on a fused layer's query projection reaches through the stand-in module
    lora = patched.clone()
    key = "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight"
    delta = torch.randn(tb.attn1.to_q.weight.shape, generator=torch.Generator().manual_seed(3))
    lora.add_patches({key: (delta,)}, 1.0)
    out = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=lora, inversion=stores["record"], cfg=1.0,
                   measure_error=False)  # a weight patch added after the inversion is allowed, and noted
    assert tol.differs(out.result[0]["samples"], fused)
    assert "weight patches differ from the inversion's (none; this MODEL: 1 patched keys)" in out.ui["text"][0]
    torch.testing.assert_close(sample(nodes, patched, stores["record"]), fused, rtol=0, atol=0)
    assert torch.equal(sample(nodes, sd15, stores["record"]), plain_before)
    assert type(tb.attn1).__name__ == "CrossAttention"


def test_fused_attention_follows_the_models_attention_precision(nodes, pack, patch, sd15, stores, monkeypatch):
    """A layer asking for float32 attention (SD2.x's attn_precision) gets FFA upcast in fp16, on both routes; without
    it (SD1.5, or an fp32 model) nothing is upcast."""
    import copy

    seen = []
    plans = pack.magic_core.fusion.FusionInputs
    attend = plans.attend

    def spy(self, heads, upcast=False):
        seen.append((self.q.dtype, upcast))
        return attend(self, heads, upcast)

    monkeypatch.setattr(plans, "attend", spy)
    patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"])
    sample(nodes, patched, stores["record"])
    assert seen and {upcast for _, upcast in seen} == {False}
    f = ffa_patches(patched)[("output", 11, 0)]
    half = copy.deepcopy(f.attn1).half()
    half.attn_precision = torch.float32
    g = type(f)(f.key, half, f.params, f.content, f.style, None, f.steps, f.node)
    sigma = torch.tensor([float(f.content.sigmas[min(f.steps)])])
    x = f.content.get(f.key, sigma, dtype=torch.float16)
    opts = {"sigmas": sigma, "cond_or_uncond": [0]}
    with torch.inference_mode():
        out = patch.FusionStandIn(g, half)(x, transformer_options=opts)
        assert out.dtype == torch.float16 and torch.isfinite(out).all() and seen[-1] == (torch.float16, True)
        g(half.to_q(x), half.to_k(x), half.to_v(x), {**opts, "n_heads": half.heads, "attn_precision": torch.float32})
        assert seen[-1] == (torch.float16, True)
        half.attn_precision = None
        patch.FusionStandIn(g, half)(x, transformer_options=opts)
        assert seen[-1] == (torch.float16, False)


def test_other_packs_attn1_and_attn2_replaces_still_run(nodes, sd15, tiny, stores):
    from comfy.ldm.modules import attention as comfy_attention

    calls = {"attn1": [], "attn2": 0}

    def other_attn1(q, k, v, extra):
        calls["attn1"].append(k.shape[1])
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    def other_attn2(q, k, v, extra):
        calls["attn2"] += 1
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    base = sd15.clone()
    base.set_model_attn1_replace(other_attn1, "output", 11, 0)
    base.set_model_attn2_replace(other_attn2, "output", 11, 0)
    # fusion active from step 1 only: step 0 falls through to the other pack's replace with plain q/k/v
    patched = fuse(nodes, base, content=stores["content"], style=stores["style"], start=0.3)
    assert ("output", 11, 0) in ffa_patches(patched)
    out = sample(nodes, patched, stores["record"])
    tokens = 256  # output 11 runs at the full 16x16 latent grid
    # step 0: plain (256 keys); step 1: fused, composed by the other replace: the magicstyle content weight 0.5
    # is realised as style x2 + content x1 key groups (the reverse of a 3-step schedule evaluates 2 sigmas)
    assert calls["attn1"] == [tokens, 3 * tokens], calls
    assert calls["attn2"] == 2
    # composing through the other replace computes the same fused attention as FFA alone
    alone = sample(nodes, fuse(nodes, sd15, content=stores["content"], style=stores["style"], start=0.3),
                   stores["record"])
    torch.testing.assert_close(out, alone, rtol=0, atol=tol.model_tol(sd15, alone, calls=2, attention_keys=3 * TOKENS))


def test_adain_latent_node(nodes, pack):
    c = latent(10, batch=2)
    s = latent(11, scale=2.0)
    s["samples"] = s["samples"] + 3.0
    out = run_in_graph(nodes["MagicPortrait_AdaINLatent"], content=c, style=s, strength=1.0).result[0]["samples"]
    # statistics: sums over the 16x16 grid, twice (mean, then the std around it), float32, relative to the values
    stat_tol = tol.float_tol(torch.float32, 2 * 16 * 16, tol.magnitude(out, s["samples"]))
    torch.testing.assert_close(out.mean(dim=(2, 3)), s["samples"].mean(dim=(2, 3)).expand(2, -1), rtol=0,
                               atol=stat_tol)
    torch.testing.assert_close(out.std(dim=(2, 3), correction=0),
                               s["samples"].std(dim=(2, 3), correction=0).expand(2, -1), rtol=0, atol=stat_tol)
    zero = run_in_graph(nodes["MagicPortrait_AdaINLatent"], content=c, style=s, strength=0.0).result[0]["samples"]
    torch.testing.assert_close(zero, c["samples"])


def test_batch_of_two_content_images_matches_each_alone(nodes, sd15, tiny):
    cond = tiny.sd15_cond(12)
    spec = store_spec(nodes, "styleid", dtype="fp32")
    lat = latent(12, batch=2)
    _, rec2, _, content2 = invert(nodes, sd15, cond, lat, spec, steps=3)
    _, _, _, style = invert(nodes, sd15, cond, latent(13), spec, steps=3)
    assert content2.batch == 2 and style.batch == 1
    both = sample(nodes, fuse(nodes, sd15, content=content2, style=style), rec2)
    _, rec1, _, content1 = invert(nodes, sd15, cond, {"samples": lat["samples"][1:]}, spec, steps=3)
    one = sample(nodes, fuse(nodes, sd15, content=content1, style=style), rec1)
    torch.testing.assert_close(both[1:], one, rtol=0, atol=tol.model_tol(sd15, one, calls=2, attention_keys=2 * TOKENS))
    plain = sample(nodes, sd15, rec2)
    assert tol.differs(both, plain)


def test_sdxl_works(nodes, sdxl, tiny):
    cond = tiny.sdxl_cond(14, width=128, height=128)
    spec = store_spec(nodes, "all")
    _, record, _, content = invert(nodes, sdxl, cond, latent(14), spec, steps=3)
    _, _, _, style = invert(nodes, sdxl, cond, latent(15), spec, steps=3)
    assert any(k[2] > 0 for k in content.layers)  # several transformer indices per block
    patched = fuse(nodes, sdxl, preset="stylealigned", style=style)
    patches = ffa_patches(patched)
    out = sample(nodes, patched, record)
    assert len(patches) == len(content.layers) and all(p.calls == 2 for p in patches.values())
    magic = sample(nodes, fuse(nodes, sdxl, content=content, style=style, layers="custom",
                                custom="input 8:1, output 1"), record)
    plain = sample(nodes, sdxl, record)
    assert torch.isfinite(out).all() and tol.differs(out, plain) and tol.differs(magic, plain)


# ----------------------------------------------------------------------------------- single node and workflows
@pytest.fixture(scope="module")
def checkpoint(comfy, tiny_checkpoint, tmp_path_factory):
    """A tiny SD1.5 checkpoint under the examples' checkpoint name; input/output dirs in tmp: the portrait and a second
    one (128 px), three style images at another size and aspect (160x96), as the examples use them."""
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("magicstyle")
    tiny_checkpoint(root / "models" / "checkpoints" / CHECKPOINT)
    with comfy_folders(root):
        for file, image, size in (("magic_portrait_astronaut.png", data.astronaut(), (128, 128)),
                                  ("second_portrait.png", data.coffee(), (128, 128)),
                                  ("magic_portrait_style.png", data.chelsea(), (160, 96)),
                                  ("square_style.png", data.chelsea(), (128, 128)),
                                  ("style_2.png", data.rocket(), (160, 96)),
                                  ("style_3.png", data.immunohistochemistry(), (160, 96))):
            Image.fromarray(np.asarray(image)).resize(size).save(root / "input" / file)
        yield {"root": root}


CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
PORTRAIT_STEPS = 3


def _portrait_graph(preset: str, contents=("magic_portrait_astronaut.png",), styles=("magic_portrait_style.png",),
                    separate: bool = True, model=None) -> dict:
    """The MagicStyle pipeline twice in one prompt: the MagicStyle Portrait node ("single") and, with `separate`, the
    same pipeline built from the separate nodes ("sample"): a KV Feature Store matching the preset, DDIM Invert of
    the content and of the style with it, AdaIN Latent, Feature Fusion Attention on both stores, Sample Inverted from
    the AdaIN start. Same model, prompt, images, schedule and store dtype (fp16, the node's default). The MODEL is
    the checkpoint's, or `model` (an in-memory ModelPatcher handed in by a test-only node: the narrow tiny SD1.5
    samples ~25x faster than the smallest loadable checkpoint's 320 channels); VAE and text encoder are the
    checkpoint's."""
    prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
              "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a painted portrait"}}}
    if model is not None:
        prompt["model"] = object_node(model, "MODEL")
    unet = ["model", 0] if model is not None else ["ckpt", 0]

    def batch(prefix: str, files) -> list:
        for i, file in enumerate(files):
            prompt[f"{prefix}{i}"] = {"class_type": "LoadImage", "inputs": {"image": file}}
        last = [f"{prefix}0", 0]
        for i in range(1, len(files)):
            prompt[f"{prefix}_batch{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": last,
                                                                                   "image2": [f"{prefix}{i}", 0]}}
            last = [f"{prefix}_batch{i}", 0]
        return last

    content, style = batch("content", contents), batch("style", styles)
    from_preset = {"preset": preset, "gamma": -1.0, "content_weight": -1.0, "tau": -1.0, "layers": "preset default",
                   "custom_layers": "", "start_percent": -1.0, "end_percent": -1.0, "uncond": "preset default"}
    prompt["single"] = {"class_type": "MagicPortrait_MagicStylePortrait", "inputs": {
        "model": unet, "vae": ["ckpt", 2], "content_image": content, "style_image": style,
        "positive": ["pos", 0], "scheduler": "normal", "steps": PORTRAIT_STEPS, "cfg": 1.0, **from_preset,
        "adain_latent": True, "inversion_mode": "ddim", "refine_iterations": 0, "store_dtype": "fp16",
        "store_device": "cpu (offload)", "store_budget_mb": 256.0}}
    prompt["single_save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["single", 1],
                                                                    "filename_prefix": "single"}}
    if not separate:
        return prompt
    invert = {"model": unet, "positive": ["pos", 0], "scheduler": "normal", "steps": PORTRAIT_STEPS,
              "strength": 1.0, "mode": "ddim", "refine_iterations": 0, "edict_mix": 0.93, "cfg": 1.0,
              "measure_round_trip": False, "feature_store": ["store", 0]}
    prompt |= {
        "enc_content": {"class_type": "VAEEncode", "inputs": {"pixels": content, "vae": ["ckpt", 2]}},
        "enc_style": {"class_type": "VAEEncode", "inputs": {"pixels": style, "vae": ["ckpt", 2]}},
        "store": {"class_type": "MagicPortrait_KVFeatureStore", "inputs": {
            "layers": "match fusion preset", "custom_layers": "", "dtype": "fp16", "device": "cpu (offload)",
            "budget_mb": 256.0, "start_percent": -1.0, "end_percent": -1.0, "fusion_preset": preset}},
        "inv_content": {"class_type": "MagicPortrait_DDIMInvert", "inputs": {**invert, "latent": ["enc_content", 0]}},
        "inv_style": {"class_type": "MagicPortrait_DDIMInvert", "inputs": {**invert, "latent": ["enc_style", 0]}},
        "adain": {"class_type": "MagicPortrait_AdaINLatent", "inputs": {
            "content": ["inv_content", 0], "style": ["inv_style", 0], "strength": 1.0}},
        "fuse": {"class_type": "MagicPortrait_FeatureFusionAttention", "inputs": {
            "model": unet, **from_preset, "content_store": ["inv_content", 3], "style_store": ["inv_style", 3]}},
        "sample": {"class_type": "MagicPortrait_SampleInverted", "inputs": {
            "model": ["fuse", 0], "inversion": ["inv_content", 1], "cfg": 1.0, "measure_error": False,
            "start_latent": ["adain", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "separate"}},
        "plain": {"class_type": "MagicPortrait_SampleInverted", "inputs": {
            "model": unet, "inversion": ["inv_content", 1], "cfg": 1.0, "measure_error": False,
            "start_latent": ["adain", 0]}},
        "plain_save": {"class_type": "SaveLatent", "inputs": {"samples": ["plain", 0], "filename_prefix": "plain"}},
    }
    return prompt


@pytest.mark.parametrize(("preset", "style"), [
    # a style of the portrait's size: stores of one shape, so a swapped pair would pass every size check
    *((preset, "square_style.png") for preset in ("magicstyle", "styleid", "stylealigned", "masactrl")),
    ("magicstyle", "magic_portrait_style.png"),  # another size and aspect, used as it is
])
def test_single_node_equals_the_pipeline_of_separate_nodes(comfy, checkpoint, sd15, preset, style):
    """MagicStyle Portrait and the same pipeline built from the separate nodes, in one prompt through the executor:
    equal latents for every preset (a swapped store, a wrong AdaIN or schedule in either route cannot pass), and the
    fusion acts (the fused latent differs from sampling back the same AdaIN start unpatched)."""
    comfy.run_prompt(_portrait_graph(preset, styles=(style,), model=sd15))
    single = cached_outputs(comfy, "single")[1]["samples"]
    separate = cached_outputs(comfy, "sample")[0]["samples"]
    plain = cached_outputs(comfy, "plain")[0]["samples"]
    model = sd15
    assert single.shape == separate.shape == (1, 4, 16, 16)
    # inversions and the fused reverse pass of both routes: 2 x (steps - 1) inverted + (steps - 1) sampled calls
    calls = 3 * (PORTRAIT_STEPS - 1)
    torch.testing.assert_close(single, separate, rtol=0, atol=tol.model_tol(model, separate, calls=calls,
                                                                             attention_keys=2 * TOKENS))
    assert tol.differs(separate, plain), f"{preset}: fusion changed nothing"


def test_single_node_runs_end_to_end_on_a_batch(comfy, checkpoint, sd15):
    """Two portraits, three style images of another size and aspect, through the executor: one result per portrait,
    and the report says what fused."""
    out = comfy.run_prompt(_portrait_graph("magicstyle", contents=("magic_portrait_astronaut.png",
                                                                   "second_portrait.png"),
                                           styles=("magic_portrait_style.png", "style_2.png", "style_3.png"),
                                           separate=False, model=sd15))
    image, lat = cached_outputs(comfy, "single")
    assert image.shape == (2, 128, 128, 3) and torch.isfinite(image).all()
    assert lat["samples"].shape == (2, 4, 16, 16) and tol.differs(lat["samples"][0], lat["samples"][1])
    text = out["single"]["text"][0]
    assert "magicstyle" in text and "style (12, 20) x 3" in text, text
    assert "6/6 layers fused on every active step" in text, text


@pytest.mark.parametrize("name", ["magicstyle_portrait.json", "magicstyle_portrait_single_node.json"])
def test_example_workflow_runs_through_the_executor(comfy, checkpoint, name):
    import json

    import nodes as comfy_nodes
    from magic_portrait.workflow import ui_to_api

    workflow = json.loads((REPO / "example_workflows" / name).read_text())
    prompt = ui_to_api(workflow, comfy_nodes.NODE_CLASS_MAPPINGS)
    assert not any(node["class_type"].startswith("ImageScale") for node in prompt.values())  # no fixed style size
    for node in prompt.values():  # smoke-size: 128 px portrait (16x16 latent), 160x96 style, 2 steps
        inputs = node["inputs"]
        if "steps" in inputs:
            inputs["steps"] = 2
    outputs = comfy.run_prompt(prompt)
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert saved, outputs
    texts = [t for out in outputs.values() for t in out.get("text", [])]
    assert any("magicstyle" in t for t in texts), texts
    # the run report: every fused layer fused on every active step
    assert any("Feature Fusion Attention (magicstyle): 6/6 layers fused on every active step" in t for t in texts), \
        texts


def test_cfg_uncond_treatments(nodes, pack, sd15, tiny, stores):
    """With cfg 2 the batch holds cond and uncond chunks: each uncond treatment runs, they differ, and the stand-in
    modules (hidden-state route) give what the same fusion gives through attn1 replaces (q/k/v route)."""
    outs = {}
    reverse = pack.nodes.inversion.run_reverse
    for mode in ("fuse", "plain", "style_only"):
        patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"], uncond=mode)
        outs[mode] = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=patched, inversion=stores["record"],
                              cfg=2.0, measure_error=False, positive=stores["cond"],
                              negative=tiny.sd15_cond(99)).result[0]["samples"]
        assert torch.isfinite(outs[mode]).all()
        via_replaces = sd15.clone()
        for key, f in ffa_patches(patched).items():
            via_replaces.set_model_attn1_replace(
                type(f)(key, f.attn1, f.params, f.content, f.style, None, f.steps, f.node), *key)
        with torch.inference_mode():
            other = reverse(via_replaces, stores["record"], stores["cond"], tiny.sd15_cond(99), 2.0)
        torch.testing.assert_close(other, outs[mode], rtol=0,
                                   # 2 steps x (cond + uncond)
                                   atol=tol.model_tol(sd15, outs[mode], calls=2 * 2, attention_keys=2 * TOKENS))
    assert tol.differs(outs["fuse"], outs["plain"])
    assert tol.differs(outs["plain"], outs["style_only"])


def test_controlnet_still_applies_under_fusion(nodes, sd15, tiny, stores):
    """Fusion patches attn1 only: a ControlNet in the conditioning still steers the fused sampling."""
    from nodes import ControlNetApplyAdvanced

    control = tiny.build_sd15_controlnet(seed=12)
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(12))
    cond = stores["cond"]
    positive, _ = run_in_graph(ControlNetApplyAdvanced, positive=cond, negative=cond, control_net=control, image=hint,
                           strength=1.0, start_percent=0.0, end_percent=1.0).result
    patched = fuse(nodes, sd15, content=stores["content"], style=stores["style"])

    def run(conditioning):
        return run_in_graph(nodes["MagicPortrait_SampleInverted"], model=patched, inversion=stores["record"], cfg=1.0,
                        measure_error=False, positive=conditioning).result[0]["samples"]

    plain, controlled = run(cond), run(positive)
    assert all(p.calls > 0 for p in ffa_patches(patched).values())
    assert tol.differs(controlled, plain)
