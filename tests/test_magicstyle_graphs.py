"""ComfyUI tier, issue 11: MagicStyle in real graphs, run through ComfyUI's prompt validation and executor on the
tiny SD1.5 checkpoint. Fusion is never silently displaced (core Self-Attention Guidance set after it; two fusion
nodes), weight patches (UNetSelfAttentionMultiply, a LoRA written here) between inversion and sampling, a style of
another size and aspect for every preset, HyperTile's token change refused with a clear error, what ran reported,
and a plain prompt after a fused one bit-identical to the same prompt alone."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import safetensors.torch
import tolerances as tol
import torch
from helpers import comfy_folders, latent, run_in_graph, saved_latent, text_to_image_nodes
from PIL import Image
from skimage import data as skimage_data

from magic_portrait.comfy_env import WorkflowError

CKPT = "tiny_sd15.safetensors"
LORA = "tiny_lora_sd15.safetensors"
P = "MagicPortrait_"
FFA = P + "FeatureFusionAttention"
STEPS = 3  # the reverse sampler evaluates sigmas 0 and 1 of 3
CONTENT_SIZE = (128, 128)  # 16x16 latent
STYLE_SIZE = (160, 96)  # width x height: 20x12 latent, another size and aspect than the content


def write_tiny_lora(checkpoint, path, rank: int = 4, seed: int = 0):
    """A LoRA in the kohya layout comfy/lora.py reads (lora_unet_<key with _>.lora_up/.lora_down/.alpha) on every
    self- and cross-attention projection of the checkpoint's UNet; its update is ~10% of each weight."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            if not key.startswith("model.diffusion_model.") or not key.endswith(".weight"):
                continue
            if not any(f".{a}.{p}." in key for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")):
                continue
            out_dim, in_dim = f.get_slice(key).get_shape()
            name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.05
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) / in_dim**0.5
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    assert len(tensors) == 3 * 16 * 2 * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("magicstyle_graphs")
    ckpt = tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    write_tiny_lora(ckpt.resolve(), root / "models" / "loras" / LORA)
    with comfy_folders(root):
        Image.fromarray(skimage_data.astronaut()).resize(CONTENT_SIZE).save(root / "input" / "content.png")
        Image.fromarray(skimage_data.chelsea()).resize(STYLE_SIZE).save(root / "input" / "style.png")
        yield root


def _model_node(kind: str, model, settings: dict) -> dict:
    if kind == "ffa":
        inputs = {"preset": "magicstyle", "gamma": -1.0, "content_weight": -1.0, "tau": -1.0,
                  "layers": "preset default", "custom_layers": "", "start_percent": -1.0, "end_percent": -1.0,
                  "uncond": "preset default", "content_store": ["inv_c", 3], "style_store": ["inv_s", 3]}
        return {"class_type": FFA, "inputs": {"model": model, **inputs, **settings}}
    if kind == "sag":
        return {"class_type": "SelfAttentionGuidance", "inputs": {"model": model, "scale": 2.0, "blur_sigma": 2.0,
                                                                  **settings}}
    if kind == "hypertile":  # tiles 4x4 at the latent's full resolution (output 9-11 here), deterministically
        return {"class_type": "HyperTile", "inputs": {"model": model, "tile_size": 32, "swap_size": 1,
                                                      "max_depth": 0, "scale_depth": False, **settings}}
    if kind == "multiply":
        return {"class_type": "UNetSelfAttentionMultiply", "inputs": {"model": model, "q": 1.0, "k": 1.3, "v": 1.0,
                                                                      "out": 1.0, **settings}}
    if kind == "lora":
        return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": LORA,
                                                                "strength_model": 1.0, **settings}}
    raise ValueError(kind)


def _graph(chain=(), *, adain=True, prefix="ms") -> dict:
    """Invert the content and the style (KV stores of every layer, fp32) with the checkpoint's MODEL, patch that
    MODEL with `chain` ([(kind, settings)], in order), Sample Inverted from the content's inversion, save."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "content": {"class_type": "LoadImage", "inputs": {"image": "content.png"}},
        "style": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
        "enc_c": {"class_type": "VAEEncode", "inputs": {"pixels": ["content", 0], "vae": ["ckpt", 2]}},
        "enc_s": {"class_type": "VAEEncode", "inputs": {"pixels": ["style", 0], "vae": ["ckpt", 2]}},
        "store": {"class_type": P + "KVFeatureStore", "inputs": {
            "layers": "all", "custom_layers": "", "dtype": "fp32", "device": "cpu (offload)", "budget_mb": 4096.0,
            "start_percent": 0.0, "end_percent": 1.0}},
    }
    for name, source in (("inv_c", "enc_c"), ("inv_s", "enc_s")):
        prompt[name] = {"class_type": P + "DDIMInvert", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "latent": [source, 0], "scheduler": "normal",
            "steps": STEPS, "strength": 1.0, "mode": "ddim", "refine_iterations": 0, "edict_mix": 0.93, "cfg": 1.0,
            "measure_round_trip": False, "feature_store": ["store", 0]}}
    model = ["ckpt", 0]
    for i, (kind, settings) in enumerate(chain):
        prompt[f"m{i}"] = _model_node(kind, model, settings)
        model = [f"m{i}", 0]
    sample = {"model": model, "inversion": ["inv_c", 1], "cfg": 1.0, "measure_error": False}
    if adain:
        prompt["adain"] = {"class_type": P + "AdaINLatent", "inputs": {"content": ["inv_c", 0], "style": ["inv_s", 0],
                                                                        "strength": 1.0}}
        sample["start_latent"] = ["adain", 0]
    prompt["sample"] = {"class_type": P + "SampleInverted", "inputs": sample}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    return prompt


def _run(comfy, workdir, prompt) -> tuple[torch.Tensor, dict]:
    outputs = comfy.run_prompt(prompt)
    return saved_latent(workdir, outputs), outputs


def _text(outputs, node="sample") -> str:
    return "\n".join(outputs[node]["text"])


def _tolerance(workdir, *tensors) -> float:
    """float32 rounding of two samplings of the tiny checkpoint that compute equal things in another order: the
    reverse sampler's STEPS - 1 steps, each up to two UNet calls (SAG adds one), every Linear/Conv of the UNet and
    its 32 attention layers over up to 2 x 256 keys, relative to the latents' magnitude."""
    ops = tol.checkpoint_ops(workdir / "models" / "checkpoints" / CKPT) + 32 * 2 * 256
    return tol.sampling_tol(torch.float32, ops, tol.magnitude(*tensors), 2 * (STEPS - 1))


# ------------------------------------------------------------------------------------------------ displaced slots
@pytest.mark.parametrize("uncond", ["preset default", "plain"])
def test_sag_set_after_fusion_runs_with_fusion_inside_it(comfy, workdir, uncond):
    """FFA on middle 0, then core Self-Attention Guidance (an attn1 replace at middle 0): the fused layer still
    fuses, inside SAG's replace, and gives what the same fusion gives when SAG came first (fusion set inside SAG's
    replace at patch time); the result differs from SAG alone. The node's text says where the layer fused. With the
    unconditional branch plain, SAG's attention map stays on the image's own tokens and SAG visibly acts too."""
    middle = {"layers": "custom", "custom_layers": "middle 0", "uncond": uncond}
    sag_alone, _ = _run(comfy, workdir, _graph([("sag", {})]))
    ffa_then_sag, out = _run(comfy, workdir, _graph([("ffa", middle), ("sag", {})]))
    sag_then_ffa, out_first = _run(comfy, workdir, _graph([("sag", {}), ("ffa", middle)]))
    assert tol.differs(ffa_then_sag, sag_alone)
    torch.testing.assert_close(ffa_then_sag, sag_then_ffa, rtol=0,
                               atol=_tolerance(workdir, ffa_then_sag, sag_then_ffa))
    if uncond == "plain":
        ffa_alone, _ = _run(comfy, workdir, _graph([("ffa", middle)]))
        assert tol.differs(ffa_then_sag, ffa_alone)  # SAG acts as well
    text = _text(out)
    assert "1/1 layers fused on every active step" in text, text
    assert "middle 0: 4 calls (inside Self-Attention Guidance (comfy_extras.nodes_sag." in text, text
    assert ("set uncond to plain to keep SAG's map on the image" in text) == (uncond != "plain"), text
    assert "middle 0 fused inside Self-Attention Guidance" in _text(out_first, "m1")


@pytest.mark.parametrize("order", ["sag_after", "sag_before"])
def test_fusion_inside_another_replace_that_cannot_be_exact_is_refused_naming_both(comfy, workdir, order):
    """Inside another function the content weight is realised by repeating key groups: 0.7 (7:10 to the style)
    cannot be, so the run (SAG set after: found when sampling starts) or the node (SAG set before) is refused with
    an error naming Feature Fusion Attention, the layer and SAG; 0.25 composes."""

    ffa = ("ffa", {"layers": "custom", "custom_layers": "middle 0", "content_weight": 0.7})
    chain = [ffa, ("sag", {})] if order == "sag_after" else [("sag", {}), ffa]
    with pytest.raises(WorkflowError) as err:
        comfy.run_prompt(_graph(chain))
    text = str(err.value)
    assert (f"[{FFA}] input 'content_weight': Feature Fusion Attention at middle 0 runs inside Self-Attention "
            "Guidance (comfy_extras.nodes_sag.") in text, text
    assert "cannot give the weights 1, 0.7 (style, content) exactly" in text, text
    quarter = ("ffa", {**ffa[1], "content_weight": 0.25})
    _run(comfy, workdir, _graph([quarter, ("sag", {})] if order == "sag_after" else [("sag", {}), quarter]))


def test_two_fusion_nodes_compose_by_layer_and_step_and_refuse_overlap(comfy, workdir):
    """Two Feature Fusion Attention nodes in a chain: on different steps of the same layers they give exactly one
    node over both step ranges; on different layers exactly one node over both layer sets; the same layer at the same
    step is refused, naming the layers and steps."""
    one, _ = _run(comfy, workdir, _graph([("ffa", {"start_percent": 0.0, "end_percent": 1.0})]))
    early_only, _ = _run(comfy, workdir, _graph([("ffa", {"start_percent": 0.0, "end_percent": 0.33})]))
    split, out = _run(comfy, workdir, _graph([("ffa", {"start_percent": 0.0, "end_percent": 0.33}),
                                              ("ffa", {"start_percent": 0.33, "end_percent": 1.0})]))
    assert tol.differs(one, early_only)  # the second node's steps matter
    torch.testing.assert_close(split, one, rtol=0, atol=_tolerance(workdir, split, one))
    assert _text(out).count("layers fused on every active step") == 2
    both, _ = _run(comfy, workdir, _graph([("ffa", {"layers": "custom", "custom_layers": "middle 0, output 9-11"})]))
    chained, _ = _run(comfy, workdir, _graph([("ffa", {"layers": "custom", "custom_layers": "output 9-11"}),
                                              ("ffa", {"layers": "custom", "custom_layers": "middle 0"})]))
    torch.testing.assert_close(chained, both, rtol=0, atol=_tolerance(workdir, chained, both))

    with pytest.raises(WorkflowError, match=rf"\[{FFA}\] input 'layers': output 9-11 already fused by an earlier "
                       r"Feature Fusion Attention \(magicstyle\) on this MODEL at the same steps \(\[1, 2\] of 3\)"):
        comfy.run_prompt(_graph([("ffa", {"layers": "custom", "custom_layers": "output 6-11"}),
                                 ("ffa", {"layers": "custom", "custom_layers": "output 9-11",
                                          "start_percent": 0.33})]))


# ------------------------------------------------------------------------------------------------ weight patches
def test_weight_patches_between_inversion_and_sampling_run_and_act(comfy, workdir):
    """Invert with the checkpoint's MODEL, then UNetSelfAttentionMultiply or a LoRA (file written by the test)
    before Sample Inverted, with and without fusion: allowed, noted in the node's text, and they change the result;
    another LoRA strength is another result."""
    plain, _ = _run(comfy, workdir, _graph(adain=False))
    fused, _ = _run(comfy, workdir, _graph([("ffa", {})]))
    results = {}
    for name, chain, base in (
        ("lora", [("lora", {})], plain),
        ("multiply", [("multiply", {})], plain),
        ("ffa+lora", [("ffa", {}), ("lora", {})], fused),
        ("lora+ffa", [("lora", {}), ("ffa", {})], fused),
        ("ffa+multiply", [("ffa", {}), ("multiply", {})], fused),
    ):
        out_latent, out = _run(comfy, workdir, _graph(chain, adain=name != "lora" and name != "multiply"))
        text = _text(out)
        assert "weight patches differ from the inversion's (none; this MODEL: " in text, (name, text)
        assert tol.differs(out_latent, base), name
        if "ffa" in name:
            assert "6/6 layers fused on every active step" in text, (name, text)
        results[name] = out_latent
    torch.testing.assert_close(results["ffa+lora"], results["lora+ffa"], rtol=0,
                               atol=_tolerance(workdir, results["ffa+lora"], results["lora+ffa"]))
    half, _ = _run(comfy, workdir, _graph([("lora", {"strength_model": 0.5})], adain=False))
    assert tol.differs(half, results["lora"]) and tol.differs(half, plain)


def test_identity_survives_other_clones_patches_in_place_and_tells_weight_patches_apart(comfy, nodes, pack, tiny):
    """A clone with weight patches on every UNet key, loaded (so its patches sit in the shared weights in place),
    changes neither the base MODEL's identity nor its own; a record of the base model still samples with the base
    model meanwhile. Weight patch signatures differ by strength and by content."""
    import comfy.model_management

    fingerprint = pack.nodes.fingerprint
    base = tiny.build_sd15_model(seed=21)
    cond = tiny.sd15_cond(21)
    record = run_in_graph(nodes[P + "DDIMInvert"], model=base, positive=cond, latent=latent(21), scheduler="normal",
                      steps=3, strength=1.0, mode="ddim", refine_iterations=0, edict_mix=0.93, cfg=1.0,
                      measure_round_trip=False).result[1]
    identity = fingerprint.model_fingerprint(base)
    assert identity == record.model_id and fingerprint.weight_patch_signature(base) == ""
    g = torch.Generator().manual_seed(22)
    state = base.model_state_dict()
    diffs = {k: (torch.randn(v.shape, generator=g) * 0.1,) for k, v in state.items()
             if k.startswith("diffusion_model.")}
    patched = base.clone()
    patched.add_patches(diffs, 1.0)
    first_key = "diffusion_model." + sorted(base.model.diffusion_model.state_dict())[0]
    before = state[first_key].clone()
    try:
        comfy.model_management.load_models_gpu([patched])
        assert not torch.equal(base.model_state_dict()[first_key], before)  # the patches sit in the weights
        assert fingerprint.model_fingerprint(base) == identity
        assert fingerprint.model_fingerprint(patched) == identity
        out = run_in_graph(nodes[P + "SampleInverted"], model=base, inversion=record, cfg=1.0, measure_error=False)
        assert torch.isfinite(out.result[0]["samples"]).all()
    finally:
        comfy.model_management.load_models_gpu([base])  # put the checkpoint's own weights back
    assert torch.equal(base.model_state_dict()[first_key], before)
    half, other = base.clone(), base.clone()
    half.add_patches(diffs, 0.5)
    other.add_patches({k: (d[0] * 1.01,) for k, d in diffs.items()}, 1.0)
    signatures = {fingerprint.weight_patch_signature(m) for m in (patched, half, other)}
    assert len(signatures) == 3 and all(s.startswith(f"{len(diffs)} patched keys:") for s in signatures)
    # another checkpoint of the same architecture is still refused, naming what differs
    with pytest.raises(WorkflowError, match=r"input 'inversion': was made with another checkpoint"):
        run_in_graph(nodes[P + "SampleInverted"], model=tiny.build_sd15_model(seed=23), inversion=record, cfg=1.0,
                 measure_error=False)


# ------------------------------------------------------------------------------------------------ style of any size
@pytest.mark.parametrize("preset", ["magicstyle", "styleid", "stylealigned", "masactrl"])
def test_style_of_another_size_and_aspect_runs_for_every_preset(comfy, workdir, preset):
    """A 160x96 style with a 128x128 portrait (20x12 against 16x16 latents): inverted at its own size, fused and
    AdaIN-ed for every preset; every fused layer fused on every active step, and the result differs from the plain
    reconstruction."""
    plain, _ = _run(comfy, workdir, _graph(adain=False))
    out_latent, out = _run(comfy, workdir, _graph([("ffa", {"preset": preset})]))
    assert out_latent.shape == plain.shape == (1, 4, 16, 16)
    assert torch.isfinite(out_latent).all() and tol.differs(out_latent, plain)
    text = _text(out)
    found = re.search(rf"Feature Fusion Attention \({preset}\): (\d+)/(\d+) layers fused on every active step", text)
    assert found and found[1] == found[2] and int(found[2]) > 0, text
    assert "WARNING" not in text, text


# ------------------------------------------------------------------------------------------------ token count
@pytest.mark.parametrize("order", ["hypertile_after", "hypertile_before"])
def test_hypertile_on_a_fused_layer_is_a_clear_error(comfy, workdir, order):

    chain = [("ffa", {}), ("hypertile", {})]
    if order == "hypertile_before":
        chain.reverse()
    with pytest.raises(WorkflowError) as err:
        comfy.run_prompt(_graph(chain))
    text = str(err.value)
    assert f"[{FFA}] input 'layers': the fused layer output 9 gets 16 self-attention tokens" in text, text
    assert "the sampled latent gives it 256" in text and "HyperTile (comfy_extras.nodes_hypertile." in text, text
    assert "lower max_depth or fuse lower-resolution layers" in text, text


# ------------------------------------------------------------------------------------------------ no leak
def _plain_graph(bust: bool) -> dict:
    prompt, source = text_to_image_nodes(CKPT, "a portrait", 128, 128, bust_cache=bust)
    prompt["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": source, "seed": 5,
        "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "plain"}}
    return prompt


def test_plain_prompt_after_a_fused_prompt_is_bit_identical(comfy, workdir):
    alone, _ = _run(comfy, workdir, _plain_graph(bust=False))
    _run(comfy, workdir, _graph([("ffa", {}), ("sag", {})]))  # stand-ins and a fusion inside SAG's replace
    again, _ = _run(comfy, workdir, _plain_graph(bust=True))
    assert torch.equal(again, alone)


# ------------------------------------------------------------------------------------------------ reports
def test_reports_warn_about_off_schedule_sigmas_and_displaced_modules(nodes, pack, sd15, tiny, caplog):
    """The SAMPLER route logs the report: core SamplerCustom with a second-order sampler evaluates between the
    schedule's sigmas, where fusion cannot run, and says so. A fused layer whose attn1 module another object patch
    replaced after Feature Fusion Attention never fuses, and Sample Inverted says which layer."""
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom

    cond = tiny.sd15_cond(30)
    spec = run_in_graph(nodes[P + "KVFeatureStore"], layers="decoder", custom_layers="", dtype="fp32",
                    device="cpu (offload)", budget_mb=4096.0, start_percent=0.0, end_percent=1.0).result[0]

    def invert(seed):
        return run_in_graph(nodes[P + "DDIMInvert"], model=sd15, positive=cond, latent=latent(seed), scheduler="normal",
                        steps=STEPS, strength=1.0, mode="ddim", refine_iterations=0, edict_mix=0.93, cfg=1.0,
                        measure_round_trip=False, feature_store=spec).result

    inverted, record, sigmas, content = invert(30)
    style = invert(31)[3]
    fused = run_in_graph(nodes[FFA], model=sd15, preset="magicstyle", gamma=-1.0, content_weight=-1.0, tau=-1.0,
                     layers="preset default", custom_layers="", start_percent=-1.0, end_percent=-1.0,
                     uncond="preset default", content_store=content, style_store=style).result[0]
    caplog.set_level(logging.INFO)
    sampler = run_in_graph(KSamplerSelect, sampler_name="dpm_2").result[0]
    run_in_graph(SamplerCustom, model=fused, add_noise=False, noise_seed=0, cfg=1.0, positive=cond, negative=cond,
             sampler=sampler, sigmas=sigmas, latent_image=inverted)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Feature Fusion Attention (magicstyle): 6/6 layers fused on every active step (3 steps)" in logged, logged
    assert "calls at sigmas off the stores' schedule ran plain attention" in logged, logged
    # another object patch replaces a fused attn1 module after Feature Fusion Attention
    displaced = fused.clone()
    path = next(k for k, o in fused.object_patches.items() if getattr(o, "fusion", None) is not None
                and o.fusion.key == ("output", 11, 0))
    displaced.add_object_patch(path, pack.nodes.magicstyle_patch.original_attn1(fused.object_patches[path]))
    out = run_in_graph(nodes[P + "SampleInverted"], model=displaced, inversion=record, cfg=1.0, measure_error=False)
    text = out.ui["text"][0]
    assert "5/6 layers fused on every active step" in text, text
    assert "WARNING output 11: never fused at steps [0, 1] of 3: the UNet never ran this layer's fusion" in text, text


@pytest.fixture(scope="module")
def ms(pack):
    return pack.nodes.magicstyle


def test_style_stores_of_several_images_count_together_as_one(nodes, sd15, tiny):
    """A style store of three copies of one style image (another size than the portrait) fuses like a store of that
    one image: side by side, each weighs a third. Three different style images give another result."""
    cond = tiny.sd15_cond(50)
    spec = run_in_graph(nodes[P + "KVFeatureStore"], layers="styleid", custom_layers="", dtype="fp32",
                    device="cpu (offload)", budget_mb=4096.0, start_percent=0.0, end_percent=1.0).result[0]

    def invert(samples):
        return run_in_graph(nodes[P + "DDIMInvert"], model=sd15, positive=cond, latent={"samples": samples},
                        scheduler="normal", steps=STEPS, strength=1.0, mode="ddim", refine_iterations=0,
                        edict_mix=0.93, cfg=1.0, measure_round_trip=False, feature_store=spec).result

    def fused(style):
        model = run_in_graph(nodes[FFA], model=sd15, preset="magicstyle", gamma=-1.0, content_weight=-1.0, tau=-1.0,
                         layers="preset default", custom_layers="", start_percent=-1.0, end_percent=-1.0,
                         uncond="preset default", content_store=content, style_store=style).result[0]
        return run_in_graph(nodes[P + "SampleInverted"], model=model, inversion=record, cfg=1.0,
                        measure_error=False).result[0]["samples"]

    _, record, _, content = invert(latent(50)["samples"])
    s = latent(51, height=12, width=20)["samples"]
    one = fused(invert(s)[3])
    copies = invert(s.repeat(3, 1, 1, 1))[3]
    assert copies.batch == 3
    three_copies = fused(copies)
    # fp32 store: three images side by side in one attention against one image: the STEPS - 1 reverse calls of the
    # UNet, every Linear/Conv and its 32 attention layers over up to the 16x16 content + 3 x 12x20 style keys
    ops = tol.reduction_ops(sd15.model.diffusion_model, 16 * 16 + 3 * 12 * 20, 32)
    torch.testing.assert_close(three_copies, one, rtol=0,
                               atol=tol.sampling_tol(torch.float32, ops, tol.magnitude(one), STEPS - 1))
    others = torch.cat([s, latent(52, height=12, width=20)["samples"], latent(53, height=12, width=20)["samples"]])
    assert tol.differs(fused(invert(others)[3]), one)


def test_adain_latent_node_takes_any_style_size_and_count(nodes):
    content = latent(40, batch=2)
    style = {"samples": torch.cat([latent(41, height=12, width=20)["samples"] + 2.0,
                                   latent(42, height=12, width=20)["samples"] * 3.0])}
    paired = run_in_graph(nodes[P + "AdaINLatent"], content=content, style=style, strength=1.0).result[0]["samples"]
    three = {"samples": torch.cat([style["samples"], latent(43, height=12, width=20)["samples"]])}
    out3 = run_in_graph(nodes[P + "AdaINLatent"], content=content, style=three, strength=1.0).result[0]["samples"]
    ref = three["samples"].transpose(0, 1).reshape(4, -1)
    # statistics: sums over every pooled element, twice (mean, then the std around it), float32
    stat_tol = tol.float_tol(torch.float32, 2 * ref.shape[1], tol.magnitude(three["samples"], out3, paired))
    torch.testing.assert_close(out3.mean(dim=(2, 3)), ref.mean(dim=1).expand(2, -1), rtol=0, atol=stat_tol)
    torch.testing.assert_close(paired.mean(dim=(2, 3)), style["samples"].mean(dim=(2, 3)), rtol=0, atol=stat_tol)
    assert np.isfinite(out3.numpy()).all()


def test_single_node_scales_a_larger_style_down_to_the_portraits_pixel_count(ms):
    """MagicStyle Portrait keeps the style's aspect; only a style with more pixels than the portrait is scaled down
    (to about the portrait's pixel count, multiples of 8), never cropped."""
    small = torch.rand(2, 96, 160, 3)
    assert ms._style_pixels(small, 128, 128) is small
    big = ms._style_pixels(torch.rand(1, 600, 400, 3), 256, 256)
    h, w = big.shape[1:3]
    assert (h % 8, w % 8) == (0, 0) and abs(h / w - 1.5) < 0.05 and 0.9 < h * w / 256**2 <= 1.05, (h, w)
