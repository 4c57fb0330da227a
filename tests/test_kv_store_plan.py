"""ComfyUI tier, issue 13: a KV store keeps only what the fusion reads, and 8-bit stores.

- The KV Feature Store's defaults (layers 'match fusion preset', start/end percent -1) keep exactly the layers and
  steps Feature Fusion Attention fuses for its preset, for every preset; MagicStyle Portrait does the same.
- A fusion asking for a layer or step the store did not keep is an error naming both nodes, never a silent skip.
- Old workflows (the store's widget values before issue 13, no fusion_preset) still validate and run.
- Through ComfyUI's executor: a fused run from an int8 or fp8 store matches the fp16-store run within a bound
  derived from the stores' quantisation error.
"""

from __future__ import annotations

import pytest
import torch
from helpers import comfy_folders, latent, run_in_graph
from oracles import kept_sigmas, store_is_complete
from PIL import Image
from skimage import data as skimage_data

from magic_portrait.comfy_env import WorkflowError

P = "MagicPortrait_"
FFA = P + "FeatureFusionAttention"
STORE = P + "KVFeatureStore"
CKPT = "tiny_sd15.safetensors"
STEPS = 3
OLD_STORE_INPUTS = {"layers": "decoder", "custom_layers": "", "dtype": "fp16", "device": "cpu (offload)",
                    "budget_mb": 4096.0, "start_percent": 0.0, "end_percent": 1.0}


def store_spec(nodes, **inputs):
    """The KV Feature Store node with its defaults, `inputs` changed."""
    args = {"layers": "match fusion preset", "custom_layers": "", "dtype": "fp16", "device": "cpu (offload)",
            "budget_mb": 4096.0, "start_percent": -1.0, "end_percent": -1.0, "fusion_preset": "magicstyle"}
    args.update(inputs)
    return run_in_graph(nodes[STORE], **args).result[0]


def invert(nodes, model, cond, lat, spec):
    """DDIM Invert with a feature store: (inverted LATENT, record, sigmas, store)."""
    return run_in_graph(nodes[P + "DDIMInvert"], model=model, positive=cond, latent=lat, scheduler="normal", steps=STEPS,
                    strength=1.0, mode="ddim", refine_iterations=0, edict_mix=0.93, cfg=1.0,
                    measure_round_trip=False, feature_store=spec).result


def fuse(nodes, model, preset, content, style, **inputs):
    args = {"preset": preset, "gamma": -1.0, "content_weight": -1.0, "tau": -1.0, "layers": "preset default",
            "custom_layers": "", "start_percent": -1.0, "end_percent": -1.0, "uncond": "preset default"}
    args.update(inputs)
    return run_in_graph(nodes[FFA], model=model, content_store=content, style_store=style, **args).result[0]


def fused_layers_and_steps(model) -> dict:
    """{layer: active step indices} of the fusion patched into a MODEL (stand-in modules or attn1 replaces)."""
    found = {o.fusion.key: o.fusion for o in model.object_patches.values() if type(o).__name__ == "FusionStandIn"}
    attn1 = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    found.update({k: p for k, p in attn1.items() if type(p).__name__ == "LayerFusion"})
    return {key: sorted(f.steps) for key, f in found.items()}


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("preset", ["magicstyle", "styleid", "stylealigned", "masactrl"])
def test_store_defaults_keep_exactly_the_fused_layers_and_steps(nodes, sd15, tiny, preset):
    """With the KV Feature Store's defaults and the fusion's, the store keeps exactly the (layer, step) pairs the
    fusion reads: no layer or step more (the bytes are those of the fused layers), none less (it fuses everywhere)."""
    cond = tiny.sd15_cond(3)
    spec = store_spec(nodes, fusion_preset=preset)
    _, record, _, store = invert(nodes, sd15, cond, latent(3), spec)
    patched = fuse(nodes, sd15, preset, store, store)
    fused = fused_layers_and_steps(patched)
    assert fused and set(store.layers) == set(fused)
    assert all(steps == list(store.step_indices) for steps in fused.values())
    assert store_is_complete(store) and len(store) == len(fused) * len(store.step_indices)
    if preset == "masactrl":
        assert store.step_indices == (1, 2)  # from 8% of the steps: step 0 is never fused, so never kept
    assert preset in store.origin and "KV Feature Store" in store.selected_by
    out = run_in_graph(nodes[P + "SampleInverted"], model=patched, inversion=record, cfg=1.0, measure_error=False)
    text = "\n".join(out.ui["text"])
    assert f"{len(fused)}/{len(fused)} layers fused on every active step" in text, text  # no layer skipped


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint in a models folder, a content and a style image in an input folder (restored after)."""
    root = tmp_path_factory.mktemp("kv_store_plan")
    tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    with comfy_folders(root):
        Image.fromarray(skimage_data.astronaut()).resize((128, 128)).save(root / "input" / "content.png")
        Image.fromarray(skimage_data.chelsea()).resize((160, 96)).save(root / "input" / "style.png")
        yield root


def test_single_node_keeps_only_the_fused_layers_in_8_bits(nodes, sd15, tiny, workdir):
    import comfy.sd

    vae = comfy.sd.load_checkpoint_guess_config(str(workdir / "models" / "checkpoints" / CKPT), output_vae=True,
                                                output_clip=False)[2]
    g = torch.Generator().manual_seed(5)
    out = run_in_graph(nodes[P + "MagicStylePortrait"], model=sd15, vae=vae,
                   content_image=torch.rand(1, 128, 128, 3, generator=g),
                   style_image=torch.rand(1, 96, 160, 3, generator=g), positive=tiny.sd15_cond(5),
                   scheduler="normal", steps=3, cfg=1.0, preset="magicstyle", gamma=-1.0, content_weight=-1.0,
                   tau=-1.0, layers="preset default", custom_layers="", start_percent=-1.0, end_percent=-1.0,
                   uncond="preset default", adain_latent=True, inversion_mode="ddim", refine_iterations=0,
                   store_dtype="int8", store_device="cpu (offload)", store_budget_mb=64.0)
    text = out.ui["text"][0]
    assert "6/6 layers fused on every active step" in text, text
    # both stores (content, style) hold the 6 fused layers of 16 at all 3 steps, in int8
    assert text.count("6/6 layers x 3/3 steps") == 2 and text.count(" int8 on cpu") == 2, text


@pytest.mark.parametrize(
    ("store_inputs", "fusion_inputs", "lacking"),
    [({"layers": "instantstyle_style"}, {}, "layers output 6-11"),
     ({"start_percent": 0.5}, {}, "steps 0-1 of 3"),
     ({}, {"layers": "decoder"}, "layers output 3-5"),
     ({"fusion_preset": "masactrl"}, {}, "steps 0 of 3")],
)
def test_a_fusion_reading_what_the_store_did_not_keep_names_both_nodes(nodes, pack, sd15, tiny, store_inputs,
                                                                      fusion_inputs, lacking):
    _, _, _, store = invert(nodes, sd15, tiny.sd15_cond(4), latent(4), store_spec(nodes, **store_inputs))
    with pytest.raises(WorkflowError) as err:
        fuse(nodes, sd15, "magicstyle", store, store, **fusion_inputs)
    text = str(err.value)
    assert (f"[{FFA}] input 'content_store': the KV store does not hold {lacking}, which Feature "
            f"Fusion Attention ({FFA}) fuses: the KV Feature Store ({STORE}) kept") in text, text


def _graph(store_inputs: dict, *, prefix: str, fusion: dict | None = None, tag: str = "") -> dict:
    """Content and style inverted into stores of one KV Feature Store node (`store_inputs`), magicstyle fusion,
    Sample Inverted from the content's inversion, SaveLatent. Node ids end in `tag` so graphs can be merged."""
    t = tag
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "content": {"class_type": "LoadImage", "inputs": {"image": "content.png"}},
        "style": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
        "enc_c": {"class_type": "VAEEncode", "inputs": {"pixels": ["content", 0], "vae": ["ckpt", 2]}},
        "enc_s": {"class_type": "VAEEncode", "inputs": {"pixels": ["style", 0], "vae": ["ckpt", 2]}},
        f"store{t}": {"class_type": STORE, "inputs": dict(store_inputs)},
    }
    for name, source in ((f"inv_c{t}", "enc_c"), (f"inv_s{t}", "enc_s")):
        prompt[name] = {"class_type": P + "DDIMInvert", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "latent": [source, 0], "scheduler": "normal",
            "steps": STEPS, "strength": 1.0, "mode": "ddim", "refine_iterations": 0, "edict_mix": 0.93, "cfg": 1.0,
            "measure_round_trip": False, "feature_store": [f"store{t}", 0]}}
    prompt[f"ffa{t}"] = {"class_type": FFA, "inputs": {
        "model": ["ckpt", 0], "preset": "magicstyle", "gamma": -1.0, "content_weight": -1.0, "tau": -1.0,
        "layers": "preset default", "custom_layers": "", "start_percent": -1.0, "end_percent": -1.0,
        "uncond": "preset default", "content_store": [f"inv_c{t}", 3], "style_store": [f"inv_s{t}", 3],
        **(fusion or {})}}
    prompt[f"sample{t}"] = {"class_type": P + "SampleInverted", "inputs": {
        "model": [f"ffa{t}", 0], "inversion": [f"inv_c{t}", 1], "cfg": 1.0, "measure_error": False}}
    prompt[f"save{t}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"sample{t}", 0],
                                                                 "filename_prefix": prefix}}
    return prompt


def _cached(comfy, node_id: str, index: int):
    """One output of a node as the executor cached it."""
    return comfy.executor.caches.outputs.get(node_id).outputs[index][0]


def test_old_workflow_values_still_validate_and_run(comfy, workdir):
    """The store's widget values as saved before issue 13 (layers 'decoder', start 0, end 1, no fusion_preset):
    a UI-format node maps onto the inputs (the new optional widget takes its default), ComfyUI validates the API
    prompt and the fusion runs on the decoder store (a superset of the fused layers)."""
    import nodes as comfy_nodes
    from magic_portrait.workflow import ui_to_api

    saved = {"nodes": [{"id": 7, "type": STORE, "mode": 0, "inputs": [], "outputs": [
        {"name": "feature_store", "type": "MAGIC_KV_STORE_SPEC", "links": []}],
        "widgets_values": list(OLD_STORE_INPUTS.values())}], "links": []}
    inputs = ui_to_api(saved, comfy_nodes.NODE_CLASS_MAPPINGS)["7"]["inputs"]
    assert inputs == {**OLD_STORE_INPUTS, "fusion_preset": "magicstyle"}, inputs
    outputs = comfy.run_prompt(_graph(OLD_STORE_INPUTS, prefix="old"))  # an API prompt saved before: no fusion_preset
    assert any("6/6 layers fused on every active step" in t for t in outputs["sample"]["text"]), outputs
    store = _cached(comfy, "inv_c", 3)
    assert len(store.layers) == 9 and store.dtype_name == "fp16"


def test_mismatch_through_the_executor_names_both_nodes(comfy, workdir):

    with pytest.raises(WorkflowError) as err:
        comfy.run_prompt(_graph({**OLD_STORE_INPUTS, "layers": "instantstyle_style"}, prefix="bad"))
    text = str(err.value)
    assert (f"[{FFA}] input 'content_store': the KV store does not hold layers output 6-11, which Feature Fusion "
            f"Attention ({FFA}) fuses: the KV Feature Store ({STORE}) kept layers output 3-5") in text, text


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _store_error(store, reference) -> tuple[float, float]:
    """(sum of squared errors, sum of squares) of a store's dequantised features against a float32 store of the
    same inversion."""
    err = ref = 0.0
    for key in reference.layers:
        for sigma in kept_sigmas(reference):
            exact = reference.get(key, sigma).double()
            err += float((store.get(key, sigma, dtype=torch.float32).double() - exact).pow(2).sum())
            ref += float(exact.pow(2).sum())
    return err, ref


def test_8bit_stores_fuse_like_the_fp16_store_within_their_quantisation_error(comfy, workdir):
    """One prompt, four KV Feature Store nodes side by side (fp32, fp16, int8, fp8_e4m3; defaults otherwise), the
    same inversions and fusion. To first order the fused sample moves linearly with the stores' error, so the
    sample's distance from the fp32-store run is bounded by the network's sensitivity to fp16's rounding (the
    fp16 run's distance) scaled by the ratio of the stores' relative RMS errors, with a factor 4 for the errors'
    different directions. The 8-bit runs do differ from the fp16 run (the 8-bit store is what was read)."""
    formats = ("fp32", "fp16", "int8", "fp8_e4m3")
    prompt = {}
    for fmt in formats:
        prompt.update(_graph({**OLD_STORE_INPUTS, "layers": "match fusion preset",
                              "start_percent": -1.0, "end_percent": -1.0, "fusion_preset": "magicstyle",
                              "dtype": fmt}, prefix=f"q_{fmt}", tag=f"_{fmt}"))
    outputs = comfy.run_prompt(prompt)
    samples, stores = {}, {}
    for fmt in formats:
        assert any("6/6 layers fused on every active step" in t for t in outputs[f"sample_{fmt}"]["text"])
        samples[fmt] = _cached(comfy, f"sample_{fmt}", 0)["samples"].float()
        stores[fmt] = (_cached(comfy, f"inv_c_{fmt}", 3), _cached(comfy, f"inv_s_{fmt}", 3))
        assert all(s.dtype_name == fmt and len(s.layers) == 6 for s in stores[fmt])
    eps = {}
    for fmt in ("fp16", "int8", "fp8_e4m3"):
        parts = [_store_error(s, ref) for s, ref in zip(stores[fmt], stores["fp32"], strict=True)]
        eps[fmt] = (sum(p[0] for p in parts) / sum(p[1] for p in parts)) ** 0.5
    distance = {fmt: _relative_rms(samples[fmt], samples["fp32"]) for fmt in ("fp16", "int8", "fp8_e4m3")}
    assert distance["fp16"] > 0  # fp16's rounding reaches the sample: the sensitivity is measurable
    assert eps["fp16"] <= 2.0**-11  # fp16 rounds to half an ulp
    for fmt in ("int8", "fp8_e4m3"):
        bound = 4 * eps[fmt] / eps["fp16"] * distance["fp16"]
        assert distance[fmt] <= bound, (fmt, distance, eps)
        against_fp16 = _relative_rms(samples[fmt], samples["fp16"])
        assert 0 < against_fp16 <= bound + distance["fp16"], (fmt, against_fp16, bound)
