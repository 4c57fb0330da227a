"""ComfyUI tier: MagicID identities and MGMICA on tiny SD1.5 (16 cross-attention layers) and SDXL (70) models, with
IP-Adapter files written by the tests in the public key layouts and a tiny CLIP vision model.

Layer-level checks record each cross-attention layer's input and output with a pair of list patches added after
ours, and compare with attention written out in float64 from the layer's own weights (never our code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tolerances as tol
import torch
from helpers import assert_same_snapshot, model_snapshot, run_node

from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

LOAD, EMBEDS, ADD, MGMICA = (f"MagicPortrait_{n}" for n in ("LoadIPAdapter", "IDEmbeds", "AddIdentity",
                                                              "MultiIDAttention"))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models_dir(comfy, tmp_path_factory):
    from magic_portrait import comfy_env

    root = tmp_path_factory.mktemp("mgmica_models")
    sd15_dims = [64] * 16  # tiny SD1.5: channel_mult [1, 1, 1, 1], model_channels 64
    write_tiny_ipadapter(root / "ipadapter" / "tiny-faceid_sd15.safetensors", variant="faceid", family="sd15",
                         layer_inner_dims=sd15_dims, seed=1)
    write_tiny_ipadapter(root / "ipadapter" / "tiny-plus-face_sd15.bin", variant="plus-face", family="sd15",
                         layer_inner_dims=sd15_dims, clip_hidden_dim=64, seed=2)
    write_tiny_ipadapter(root / "ipadapter" / "tiny-base_sd15.safetensors", variant="base", family="sd15",
                         layer_inner_dims=sd15_dims, clip_embed_dim=48, seed=3)
    write_tiny_ipadapter(root / "ipadapter" / "tiny-faceid-plusv2_sd15.safetensors", variant="faceid-plusv2",
                         family="sd15", layer_inner_dims=sd15_dims, clip_hidden_dim=64, seed=4)
    comfy_env.boot(models_dir=root)
    return root


@pytest.fixture(scope="module")
def clip_vision(tiny, tmp_path_factory):
    return tiny.build_tiny_clip_vision(seed=5, config_dir=tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="module")
def adapters(nodes, models_dir):
    def load(name, variant="auto (from the file)"):
        return run_node(nodes[LOAD], ipadapter_file=name, variant=variant).result[0]

    return {"faceid": load("tiny-faceid_sd15.safetensors"), "plus-face": load("tiny-plus-face_sd15.bin"),
            "base": load("tiny-base_sd15.safetensors"), "faceid-plusv2": load("tiny-faceid-plusv2_sd15.safetensors")}


@pytest.fixture(scope="module")
def core(pack):
    """magic_core as the pack's nodes import it (ComfyUI loads the pack under its own module name)."""
    return pack.magic_core


def _faces(core, seed: int, count: int = 1, size: int = 96):
    """FaceDetections of `count` images, one face each, with a 512-d ArcFace-kind embedding (what insightface gives)."""
    fc = core.faces
    g = np.random.default_rng(seed)
    per_image = []
    for _ in range(count):
        kps = np.array([[34, 40], [62, 40], [48, 55], [37, 70], [59, 70]], dtype=np.float32) + g.normal(0, 1, (5, 2))
        per_image.append([fc.Face(bbox=[20, 20, 76, 84], kps=kps, score=0.99, embedding=g.normal(size=512),
                                  embedding_kind=fc.ARCFACE_512, backend="test")])
    return fc.FaceDetections(per_image, [(size, size)] * count, backend="test", embedding_kind=fc.ARCFACE_512)


def _images(seed: int, count: int = 1, size: int = 96):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def embeds(nodes, adapter, seed, count=1, clip_vision=None, combine="average", faces=True):
    return run_node(nodes[EMBEDS], ipadapter=adapter, images=_images(seed, count),
                    faces=_faces(adapter_core(adapter), seed, count) if faces else None, face_index=0, clip_vision=clip_vision,
                    combine=combine, image_crop="auto", face_margin=0.2, shortcut_scale=1.0).result[0]


def adapter_core(adapter):
    """The magic_core package the adapter object came from (the pack's, as ComfyUI loaded it)."""
    import sys

    return sys.modules[type(adapter).__module__.rsplit(".", 1)[0]]


def identity(nodes, emb, mask=None, box=(0.0, 0.0, 1.0, 1.0), weight=1.0, previous=None, label="", start=0.0,
             end=1.0):
    return run_node(nodes[ADD], id_embeds=emb, weight=weight, start_percent=start, end_percent=end, mask_index=0,
                    box_left=box[0], box_top=box[1], box_right=box[2], box_bottom=box[3], label=label,
                    identities=previous, mask=mask).result[0]


def mgmica(nodes, model, identities, weight=1.0, overlap="exclusive", uncond="negative tokens",
           layer_weights="all = 1"):
    return run_node(nodes[MGMICA], model=model, identities=identities, weight=weight, overlap=overlap, uncond=uncond,
                    layer_weights=layer_weights).result[0]


def patch_of(model):
    return model.model_options["transformer_options"]["patches"]["attn2_output_patch"][-1]


class Recorder:
    """attn2_patch + attn2_output_patch added after ours: each layer's input n, context, extra options and output."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def capture(self, n, context, value, extra):
        key = (extra["block"][0], extra["block"][1], extra["block_index"])
        self.inputs[key] = (n.detach().clone(), context.detach().clone(), dict(extra))
        return n, context, value

    def __call__(self, n, extra):
        key = (extra["block"][0], extra["block"][1], extra["block_index"])
        self.outputs[key] = n.detach().clone()
        return n

    def __deepcopy__(self, memo):
        return self

    def attach(self, model):
        clone = model.clone()
        clone.set_model_attn2_patch(self.capture)
        clone.set_model_attn2_output_patch(self)
        return clone


def forward(model, latent, cond, sigma=5.0, uncond=None):
    """One denoiser call through ComfyUI's own batching (calc_cond_batch: conds encoded by the model, cond_or_uncond,
    transformer options and patches) -> [cond output] or [cond output, uncond output]."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    comfy.model_management.load_models_gpu([model])
    conds = []
    for conditioning, kind in ((cond, "positive"), (uncond, "negative")):
        if conditioning is not None:
            converted = comfy.sampler_helpers.convert_cond(conditioning)
            conds.append(comfy.samplers.encode_model_conds(model.model.extra_conds, converted, latent,
                                                           latent.device, kind))
    s = torch.full((latent.shape[0],), float(sigma))
    model.pre_run()  # as a sampling run starts (sets the BaseModel's current patcher)
    try:
        with torch.inference_mode():
            return comfy.samplers.calc_cond_batch(model.model, conds, latent, s, model.model_options)
    finally:
        model.cleanup()


def reference_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, float64."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.double().view(b, lq, heads, d).transpose(1, 2)
    kh = k.double().expand(b, -1, -1).reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.double().expand(b, -1, -1).reshape(b, -1, heads, d).transpose(1, 2)
    out = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, lq, inner)


def layer_modules(model):
    """{(block, number, index): attn2} of a UNet, written out independently of the pack."""
    unet = model.model.diffusion_model
    found = {}
    for name, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks), ("middle", [unet.middle_block])):
        for number, block in enumerate(blocks):
            index = 0
            for layer in block:
                for tb in getattr(layer, "transformer_blocks", ()):
                    found[(name, number, index)] = tb.attn2
                    index += 1
    return found


# ------------------------------------------------------------------------------------------------ identities / embeds
def test_loader_detects_variants_and_shows_them(nodes, adapters):
    out = run_node(nodes[LOAD], ipadapter_file="tiny-plus-face_sd15.bin", variant="auto (from the file)")
    assert "plus-face" in out.ui.as_dict()["text"][0] and "SD1.5" in out.ui.as_dict()["text"][0]
    assert adapters["faceid"].variant == "faceid" and adapters["faceid"].n_layers == 16
    assert adapters["base"].variant == "base"


def test_faceid_refuses_a_dlib_embedding(nodes, adapters, core):
    fc = core.faces
    dlib_faces = fc.FaceDetections([[fc.Face(bbox=[20, 20, 76, 84], kps=np.zeros((5, 2)) + 40, score=0.9,
                                             embedding=np.ones(128), embedding_kind=fc.DLIB_128)]], [(96, 96)])
    with pytest.raises(ValueError, match=r"\[MagicPortrait_IDEmbeds\] input 'faces'.*512-d ArcFace.*insightface"):
        run_node(nodes[EMBEDS], ipadapter=adapters["faceid"], images=_images(0), faces=dlib_faces, face_index=0,
                 clip_vision=None, combine="average", image_crop="auto", face_margin=0.2, shortcut_scale=1.0)


def test_embeds_need_clip_vision_and_faces_where_the_variant_does(nodes, adapters, clip_vision, core):
    with pytest.raises(ValueError, match="input 'clip_vision'"):
        embeds(nodes, adapters["plus-face"], 0)
    with pytest.raises(ValueError, match="input 'faces'"):
        embeds(nodes, adapters["faceid"], 0, faces=False)
    with pytest.raises(ValueError, match="input 'face_index'.*has 1 face"):
        run_node(nodes[EMBEDS], ipadapter=adapters["faceid"], images=_images(0), faces=_faces(core, 0), face_index=3,
                 clip_vision=None, combine="average", image_crop="auto", face_margin=0.2, shortcut_scale=1.0)


def test_a_clip_vision_of_another_width_is_refused_naming_both(nodes, adapters, tiny, tmp_path):
    wider = tiny.build_tiny_clip_vision(seed=6, config_dir=tmp_path, hidden_size=96, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"\[MagicPortrait_IDEmbeds\] input 'clip_vision'.*64.*96|96.*64"):
        embeds(nodes, adapters["plus-face"], 0, clip_vision=wider)


@pytest.mark.parametrize("variant", ["faceid", "plus-face", "base", "faceid-plusv2"])
def test_embeds_give_tokens_of_the_adapter_shape(nodes, adapters, clip_vision, variant):
    adapter = adapters[variant]
    one = embeds(nodes, adapter, 1, clip_vision=clip_vision)
    assert one.positive.shape == (1, adapter.tokens, 768) == one.negative.shape
    assert torch.isfinite(one.positive).all() and tol.differs(one.positive, one.negative)
    again = embeds(nodes, adapter, 1, clip_vision=clip_vision)
    assert torch.equal(one.positive, again.positive)  # deterministic
    stacked = embeds(nodes, adapter, 2, count=3, clip_vision=clip_vision, combine="stack")
    assert stacked.positive.shape == (1, 3 * adapter.tokens, 768) == stacked.negative.shape
    averaged = embeds(nodes, adapter, 2, count=3, clip_vision=clip_vision, combine="average")
    assert averaged.positive.shape == (1, adapter.tokens, 768)


def test_add_identity_chains_and_checks_regions(nodes, adapters):
    emb = embeds(nodes, adapters["faceid"], 0)
    first = identity(nodes, emb, box=(0.0, 0.0, 0.5, 1.0), label="left")
    both = identity(nodes, emb, box=(0.5, 0.0, 1.0, 1.0), previous=first, label="right")
    assert [i.label for i in both] == ["left", "right"] and len(first) == 1  # the input list is untouched
    with pytest.raises(ValueError, match="input 'box_right'"):
        identity(nodes, emb, box=(0.6, 0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="input 'mask_index'"):
        run_node(nodes[ADD], id_embeds=emb, weight=1.0, start_percent=0.0, end_percent=1.0, mask_index=2,
                 box_left=0.0, box_top=0.0, box_right=1.0, box_bottom=1.0, label="", mask=torch.ones(2, 8, 8))


# ------------------------------------------------------------------------------------------------ invariants
@pytest.fixture(scope="module")
def faceid_embeds(nodes, adapters):
    return [embeds(nodes, adapters["faceid"], seed) for seed in (10, 11, 12)]


def _latent(seed, batch=1, h=16, w=16):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 3


def test_weight_zero_and_empty_masks_equal_the_unpatched_model(nodes, sd15, tiny, faceid_embeds):
    x, cond = _latent(0), tiny.sd15_cond(0)
    plain = forward(sd15, x, cond)[0]
    ids = identity(nodes, faceid_embeds[0], mask=torch.zeros(1, 128, 128))
    ids = identity(nodes, faceid_embeds[1], mask=torch.zeros(1, 128, 128), previous=ids)
    assert torch.equal(forward(mgmica(nodes, sd15, ids), x, cond)[0], plain)
    weighted = identity(nodes, faceid_embeds[0], weight=1.0)
    assert torch.equal(forward(mgmica(nodes, sd15, weighted, weight=0.0), x, cond)[0], plain)
    patched = forward(mgmica(nodes, sd15, weighted), x, cond)[0]
    assert tol.differs(patched, plain)


def test_one_identity_with_an_all_ones_mask_is_plain_ip_adapter_attention(nodes, sd15, tiny, adapters,
                                                                           faceid_embeds, core):
    """Each layer's output = to_out(Attn(Q, K_txt, V_txt) + w Attn(Q, to_k_ip(c), to_v_ip(c))), float64 reference."""
    ip = core.ipadapter

    emb, w = faceid_embeds[0], 0.8
    patched = mgmica(nodes, sd15, identity(nodes, emb, mask=torch.ones(1, 128, 128), weight=w))
    rec = Recorder()
    forward(rec.attach(patched), _latent(1), tiny.sd15_cond(1))
    modules = layer_modules(sd15)
    order = ip.map_layers(adapters["faceid"], list(modules))
    weights = adapters["faceid"].layer_weights()
    assert len(rec.outputs) == 16
    for key, attn2 in modules.items():
        n, context, extra = rec.inputs[key]
        heads = extra["n_heads"]
        with torch.no_grad():
            q, k, v = attn2.to_q(n), attn2.to_k(context), attn2.to_v(context)
            wk, wv = weights[order[key]]
            ids = w * reference_attention(q, emb.positive @ wk.float().T, emb.positive @ wv.float().T, heads)
            ref = attn2.to_out(reference_attention(q, k, v, heads).float() + ids.float())
        scale = float(ref.abs().max())
        ops = tol.attention_ops(attn2.to_q.in_features // heads, k.shape[1] + emb.positive.shape[-2], attn2)
        torch.testing.assert_close(rec.outputs[key], ref, rtol=0, atol=tol.float_tol(torch.float32, ops, scale), msg=str(key))
        assert patch_of(patched).calls[key] == 1


def test_weight_patches_added_after_mgmica_reach_its_queries(nodes, sd15, tiny, adapters, faceid_embeds, core):
    """ComfyUI's UNetCrossAttentionMultiply (weight patches on attn2's to_q/to_out) after MGMICA: the identity term
    is computed with the patched projections, exactly as plain IP-Adapter attention would be."""
    from comfy_extras.nodes_attention_multiply import UNetCrossAttentionMultiply

    ip = core.ipadapter
    emb = faceid_embeds[1]
    ours = mgmica(nodes, sd15, identity(nodes, emb, mask=torch.ones(1, 128, 128)))
    multiplied = run_node(UNetCrossAttentionMultiply, model=ours, q=1.7, k=1.0, v=1.0, out=0.6).result[0]
    rec = Recorder()
    x, cond = _latent(12), tiny.sd15_cond(12)
    out = forward(rec.attach(multiplied), x, cond)[0]
    assert tol.differs(out, forward(ours, x, cond)[0])
    forward(rec.attach(multiplied), x, cond)  # the weights stay patched while this model is the loaded one
    modules = layer_modules(sd15)
    order = ip.map_layers(adapters["faceid"], list(modules))
    weights = adapters["faceid"].layer_weights()
    for key in (("input", 1, 0), ("middle", 0, 0), ("output", 11, 0)):
        attn2 = modules[key]
        n, context, extra = rec.inputs[key]
        with torch.no_grad():
            q, k, v = attn2.to_q(n), attn2.to_k(context), attn2.to_v(context)
            wk, wv = weights[order[key]]
            ids = reference_attention(q, emb.positive @ wk.float().T, emb.positive @ wv.float().T, extra["n_heads"])
            ref = attn2.to_out(reference_attention(q, k, v, extra["n_heads"]).float() + ids.float())
        ops = tol.attention_ops(attn2.to_q.in_features // extra["n_heads"], k.shape[1] + emb.positive.shape[-2], attn2)
        torch.testing.assert_close(rec.outputs[key], ref, rtol=0, atol=tol.float_tol(torch.float32, ops, tol.magnitude(ref)))


def test_changing_one_identity_changes_only_its_region_at_every_layer(nodes, sd15, tiny, faceid_embeds, core):
    """Three identities in exclusive regions; identity 1 gets another face: at each layer, fed the same input, the
    output changes only on the tokens identity 1 owns there."""
    reg = core.regions

    h, w = 96, 160  # an odd aspect ratio: latent 12 x 20, grids 12x20, 6x10, 3x5, 2x3
    masks = torch.zeros(3, h, w)
    masks[0, 10:80, 0:60] = 1
    masks[1, 20:90, 50:110] = 0.7  # overlaps 0 and 2: exclusive resolution decides
    masks[2, 0:70, 100:160] = 1

    def build(second):
        ids = None
        for i, emb in enumerate((faceid_embeds[0], second, faceid_embeds[2])):
            ids = identity(nodes, emb, mask=masks[i:i + 1], previous=ids, label=f"id{i}")
        return mgmica(nodes, sd15, ids)

    a, b = build(faceid_embeds[1]), build(faceid_embeds[0])
    rec = Recorder()
    forward(rec.attach(a), _latent(2, h=h // 8, w=w // 8), tiny.sd15_cond(2))
    pa, pb = patch_of(a), patch_of(b)
    checked = 0
    for key, (n, context, extra) in rec.inputs.items():
        outs = []
        with torch.inference_mode():
            for p in (pa, pb):
                p.capture(n, context, None, extra)
                outs.append(p(torch.zeros_like(n), extra))
        gh, gw = extra["activations_shape"][-2:]
        grid = torch.stack([reg.mask_on_grid(masks[i:i + 1], gh, gw, h // 8, w // 8) for i in range(3)])
        owned = core.mgmica.resolve_overlaps(grid, "exclusive")[1, 0] > 0
        diff = (outs[0] - outs[1]).abs().amax(dim=(0, 2))
        assert diff[~owned].max() == 0, f"{key}: identity 1's change leaked outside its region"
        assert owned.any() and diff[owned].min() > 0, key
        checked += 1
    assert checked == 16


@pytest.mark.parametrize(("height", "width"), [(608, 416), (320, 192)])  # 1216x832 and 640x384 at half scale
def test_odd_aspect_ratios_and_batch_two_under_cfg(nodes, sd15, tiny, faceid_embeds, height, width):
    masks = torch.zeros(2, height, width)
    masks[0, : height // 2] = 1
    masks[1, height // 2:] = 1
    ids = identity(nodes, faceid_embeds[0], mask=masks[:1])
    ids = identity(nodes, faceid_embeds[1], mask=masks[1:], previous=ids)
    patched = mgmica(nodes, sd15, ids)
    x = _latent(3, batch=2, h=height // 8, w=width // 8)
    out = forward(patched, x, tiny.sd15_cond(3, batch=2), uncond=tiny.sd15_cond(4, batch=2))
    plain = forward(sd15, x, tiny.sd15_cond(3, batch=2), uncond=tiny.sd15_cond(4, batch=2))
    for o, p in zip(out, plain, strict=True):
        assert o.shape == (2, 4, height // 8, width // 8) and torch.isfinite(o).all()
        assert tol.differs(o, p)
    assert len(patch_of(patched).calls) == 16


def test_uncond_modes(nodes, sd15, tiny, faceid_embeds):
    ids = identity(nodes, faceid_embeds[0])
    x, cond, uncond = _latent(5), tiny.sd15_cond(5), tiny.sd15_cond(6)
    plain_uncond = forward(sd15, x, cond, uncond=uncond)[1]
    none = forward(mgmica(nodes, sd15, ids, uncond="none"), x, cond, uncond=uncond)
    negative = forward(mgmica(nodes, sd15, ids, uncond="negative tokens"), x, cond, uncond=uncond)
    positive = forward(mgmica(nodes, sd15, ids, uncond="positive tokens"), x, cond, uncond=uncond)
    assert torch.equal(none[1], plain_uncond)
    assert tol.differs(negative[1], plain_uncond) and tol.differs(positive[1], negative[1])
    torch.testing.assert_close(none[0], negative[0], rtol=0, atol=0)  # the cond branch is the same in every mode


def test_layer_weights_target_blocks(nodes, sd15, tiny, faceid_embeds):
    ids = identity(nodes, faceid_embeds[0])
    patched = mgmica(nodes, sd15, ids, layer_weights="all = 0; instantstyle_style = 1")
    forward(patched, _latent(6), tiny.sd15_cond(6))
    assert set(patch_of(patched).calls) == {("output", n, 0) for n in (3, 4, 5)}
    with pytest.raises(ValueError, match="input 'layer_weights'"):
        mgmica(nodes, sd15, ids, layer_weights="output 42 = 1")


def test_step_range_is_honoured(nodes, sd15, tiny, faceid_embeds):
    late = mgmica(nodes, sd15, identity(nodes, faceid_embeds[0], start=0.5, end=1.0))
    sampling = sd15.get_model_object("model_sampling")
    early_sigma = float(sampling.percent_to_sigma(0.1))
    x, cond = _latent(7), tiny.sd15_cond(7)
    assert torch.equal(forward(late, x, cond, sigma=early_sigma)[0], forward(sd15, x, cond, sigma=early_sigma)[0])
    late_sigma = float(sampling.percent_to_sigma(0.8))
    assert (forward(late, x, cond, sigma=late_sigma)[0] - forward(sd15, x, cond, sigma=late_sigma)[0]).abs().max() > 0


# ------------------------------------------------------------------------------------------------ coexistence
class OtherPackReplace:
    """Another pack's attn2 replace: standard attention, scaled (so its effect shows), counting its calls."""

    def __init__(self, scale):
        self.scale, self.calls = scale, 0

    def __call__(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls += 1
        return optimized_attention(q, k, v, extra["n_heads"]) * self.scale

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("order", ["other first", "ours first"])
def test_another_attn2_replace_and_ours_both_run(nodes, sd15, tiny, faceid_embeds, order):
    keys = list(layer_modules(sd15))
    other = OtherPackReplace(0.5)
    ids = identity(nodes, faceid_embeds[0], box=(0.25, 0.0, 0.75, 1.0))
    if order == "other first":
        base = sd15.clone()
        for key in keys:
            base.set_model_attn2_replace(other, *key)
        patched = mgmica(nodes, base, ids)
    else:
        patched = mgmica(nodes, sd15, ids).clone()
        for key in keys:
            patched.set_model_attn2_replace(other, *key)
    alone = sd15.clone()
    for key in keys:
        alone.set_model_attn2_replace(OtherPackReplace(0.5), *key)
    x, cond = _latent(8), tiny.sd15_cond(8)
    out = forward(patched, x, cond)[0]
    assert other.calls == 16 and set(patch_of(patched).calls) == set(keys)
    assert tol.differs(out, forward(alone, x, cond)[0])  # ours added on top of the other pack's
    assert tol.differs(out, forward(mgmica(nodes, sd15, ids), x, cond)[0])  # the other pack still acts


def test_two_mgmica_nodes_add_up(nodes, sd15, tiny, faceid_embeds):
    left = identity(nodes, faceid_embeds[0], box=(0.0, 0.0, 0.5, 1.0))
    right = identity(nodes, faceid_embeds[1], box=(0.5, 0.0, 1.0, 1.0))
    both_in_one = mgmica(nodes, sd15, identity(nodes, faceid_embeds[1], box=(0.5, 0.0, 1.0, 1.0), previous=left))
    chained = mgmica(nodes, mgmica(nodes, sd15, left), right)
    x, cond = _latent(9), tiny.sd15_cond(9)
    one, two = forward(both_in_one, x, cond)[0], forward(chained, x, cond)[0]
    torch.testing.assert_close(two, one, rtol=0, atol=tol.network_tol(torch.float32, sd15.model.diffusion_model,
                                                                tol.magnitude(one)))


def test_mgmica_and_feature_fusion_attention_in_one_model(nodes, sd15, tiny, faceid_embeds):
    """A stylised group portrait: FFA (attn1) and MGMICA (attn2) on one model, both run while sampling back."""
    cond = tiny.sd15_cond(21)
    x = _latent(21)
    inv = nodes["MagicPortrait_DDIMInvert"]
    spec = run_node(nodes["MagicPortrait_KVFeatureStore"], layers="decoder", custom_layers="", dtype="fp32",
                    device="cpu (offload)", budget_mb=256.0, start_percent=0.0, end_percent=1.0).result[0]

    def invert(seed):
        return run_node(inv, model=sd15, positive=cond, latent={"samples": _latent(seed)}, scheduler="normal",
                        steps=3, strength=1.0, mode="ddim", refine_iterations=0, edict_mix=0.93,
                        measure_round_trip=False, cfg=1.0, feature_store=spec).result

    content, style = invert(22), invert(23)
    ffa = run_node(nodes["MagicPortrait_FeatureFusionAttention"], model=sd15, preset="magicstyle", gamma=-1.0,
                   content_weight=-1.0, tau=-1.0, layers="preset default", custom_layers="", start_percent=-1.0,
                   end_percent=-1.0, uncond="preset default", content_store=content[3], style_store=style[3]).result[0]
    both = mgmica(nodes, ffa, identity(nodes, faceid_embeds[0], box=(0.0, 0.0, 0.5, 1.0)))
    out = run_node(nodes["MagicPortrait_SampleInverted"], model=both, inversion=content[1], cfg=1.0,
                   measure_error=False, positive=cond).result[0]["samples"]
    assert torch.isfinite(out).all() and x.shape == out.shape
    assert patch_of(both).calls
    fused = [m for m in both.object_patches.values() if type(m).__name__ == "FusionStandIn"]
    assert fused and all(m.fusion.calls > 0 for m in fused)


def test_the_input_model_is_never_changed(nodes, sd15, faceid_embeds):
    before = model_snapshot(sd15)
    mgmica(nodes, sd15, identity(nodes, faceid_embeds[0], mask=torch.ones(1, 64, 64)))
    assert_same_snapshot(before, model_snapshot(sd15))


def test_a_file_of_another_family_is_refused(nodes, sdxl, faceid_embeds):
    with pytest.raises(ValueError, match=r"\[MagicPortrait_MultiIDAttention\] input 'model'.*SD1\.5.*SDXL|SDXL.*SD1\.5"):
        mgmica(nodes, sdxl, identity(nodes, faceid_embeds[0]))


def test_a_mask_of_another_aspect_ratio_is_refused_when_sampling(nodes, sd15, tiny, faceid_embeds):
    patched = mgmica(nodes, sd15, identity(nodes, faceid_embeds[0], mask=torch.ones(1, 64, 128)))
    with pytest.raises(ValueError, match="aspect ratios differ"):
        forward(patched, _latent(10), tiny.sd15_cond(10))


# ------------------------------------------------------------------------------------------------ SDXL: 70 layers
def test_sdxl_70_layer_numbering_routes_each_file_layer_to_its_comfyui_layer(nodes, tiny, tmp_path, core):
    """A tiny SDXL with SDXL's real depths (2/10, 70 cross-attention layers) and an IP-Adapter in SDXL's key layout:
    only file layer n (key 2n+1) carries weights; only the layer IP-Adapter's order puts at n must change."""
    ip, lay = core.ipadapter, core.layers

    model = tiny.build_sdxl_model(seed=0, transformer_depth=(0, 2, 10))
    keys = list(layer_modules(model))
    assert len(keys) == 70
    dims = [int(layer_modules(model)[k].to_q.out_features) for k in ip.ip_layer_order(keys)]
    path = write_tiny_ipadapter(tmp_path / "tiny-faceid_sdxl.safetensors", variant="faceid", family="sdxl",
                                layer_inner_dims=dims, seed=6)
    adapter = ip.load_ipadapter_file(path)
    assert adapter.n_layers == 70 and adapter.family == "sdxl"
    order = ip.ip_layer_order(keys)
    assert order[:4] == [("input", 4, 0), ("input", 4, 1), ("input", 5, 0), ("input", 5, 1)]
    assert order[24:26] == [("output", 0, 0), ("output", 0, 1)] and order[-1] == ("middle", 0, 9)
    execution = lay.sort_layers(keys)  # input, middle, output: a change shows first where it is made
    faces = _faces(core, 30)
    for n in (0, 3, 24, 69):
        for i in range(70):  # zero every file layer but n
            if i != n:
                adapter.ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = torch.zeros_like(
                    adapter.ip_adapter[f"{2 * i + 1}.to_k_ip.weight"])
                adapter.ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = torch.zeros_like(
                    adapter.ip_adapter[f"{2 * i + 1}.to_v_ip.weight"])
        emb = run_node(nodes[EMBEDS], ipadapter=adapter, images=_images(30), faces=faces, face_index=0,
                       clip_vision=None, combine="average", image_crop="auto", face_margin=0.2,
                       shortcut_scale=1.0).result[0]
        patched = mgmica(nodes, model, identity(nodes, emb))
        rec, plain_rec = Recorder(), Recorder()
        cond = tiny.sdxl_cond(31, width=256, height=256)
        forward(rec.attach(patched), _latent(31, h=32, w=32), cond)
        forward(plain_rec.attach(model), _latent(31, h=32, w=32), cond)
        first_changed = next(k for k in execution if not torch.equal(rec.outputs[k], plain_rec.outputs[k]))
        assert first_changed == order[n], (n, first_changed)
        adapter = ip.load_ipadapter_file(path)


@pytest.mark.parametrize("negative", ["clip mean (IP-Adapter)", "black (IPAdapter_plus)"])
def test_the_uncond_branch_attends_to_the_negative_image_tokens_of_either_implementation(
        nodes, sd15, tiny, adapters, clip_vision, core, negative):
    """plus-face with uncond 'negative tokens': the negative rows of every layer attend to IP-Adapter's negative
    tokens, which are the projection (float64 formula) of the CLIP hidden states of the chosen negative image: zero
    pixel values (the original IP-Adapter) or a black image through ComfyUI's preprocessing (IPAdapter_plus)."""
    from ipadapter_reference import ref_tokens

    ip, adapter = core.ipadapter, adapters["plus-face"]
    emb = run_node(nodes[EMBEDS], ipadapter=adapter, images=_images(20), faces=_faces(core, 20), face_index=0,
                   clip_vision=clip_vision, combine="average", image_crop="auto", face_margin=0.2,
                   shortcut_scale=1.0, negative_image=negative).result[0]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.zeros(1, 3, 224, 224) if negative.startswith("clip mean") else (0 - mean) / std * torch.ones(
        1, 3, 224, 224)
    with torch.inference_mode():
        hidden = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[1].float()
    formula = ref_tokens(adapter, {"clip_hidden": hidden})
    token_bound = tol.float_tol(torch.float32, tol.reduction_ops(adapter.projection()) + tol.LOGIT_BOUND)
    torch.testing.assert_close(emb.negative.double(), formula, rtol=0, atol=token_bound)

    w = 0.7
    patched = mgmica(nodes, sd15, identity(nodes, emb, mask=torch.ones(1, 128, 128), weight=w))
    rec = Recorder()
    forward(rec.attach(patched), _latent(21), tiny.sd15_cond(21), uncond=tiny.sd15_cond(22))
    modules = layer_modules(sd15)
    order = ip.map_layers(adapter, list(modules))
    weights = adapter.layer_weights()
    for key, attn2 in modules.items():
        n, context, extra = rec.inputs[key]
        heads, rows = extra["n_heads"], n.shape[0] // len(extra["cond_or_uncond"])
        wk, wv = (t.float() for t in weights[order[key]])
        with torch.no_grad():
            q, k, v = attn2.to_q(n), attn2.to_k(context), attn2.to_v(context)
            parts = []
            for chunk, kind in enumerate(extra["cond_or_uncond"]):
                tokens = emb.negative if kind == 1 else emb.positive
                s = slice(chunk * rows, (chunk + 1) * rows)
                parts.append(reference_attention(q[s], k[s], v[s], heads)
                             + w * reference_attention(q[s], tokens @ wk.T, tokens @ wv.T, heads))
            ref = attn2.to_out(torch.cat(parts).float())
        assert 1 in extra["cond_or_uncond"]
        ops = tol.attention_ops(attn2.to_q.in_features // heads, k.shape[1] + emb.negative.shape[-2], attn2)
        torch.testing.assert_close(rec.outputs[key], ref, rtol=0,
                                   atol=tol.float_tol(torch.float32, ops, float(ref.abs().max())), msg=str(key))
