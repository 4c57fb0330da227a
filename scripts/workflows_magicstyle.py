"""MagicStyle example workflows (collected by scripts/make_workflows.py): separate nodes, and the single node."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_workflows import CHECKPOINT, CONTENT_IMAGE, STYLE_IMAGE, base  # noqa: E402

from magic_portrait.workflow_builder import Workflow  # noqa: E402

STEPS = 50


def _style_image(wf: Workflow, ckpt=None, encode: bool = True):
    """The style image at its own size and aspect: its keys/values need no alignment with the portrait's, and AdaIN
    reads only per-channel statistics (only the portrait's features must match the portrait's latent)."""
    load = wf.node("LoadImage", image=STYLE_IMAGE, title="Style image")
    if not encode:
        return load
    return wf.encode_image(load.out("IMAGE"), ckpt.out("VAE"), "Encode style")


def magicstyle_portrait(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("MagicStyle, node by node (Magic Portrait).\n\nBoth the portrait and the style image are DDIM-inverted "
            "while a KV Feature Store keeps their self-attention features: by default only the layers and steps "
            "that its fusion_preset fuses (set it to the preset Feature Fusion Attention uses; dtype int8 halves "
            "the store again). AdaIN moves the portrait's inverted noise "
            "toward the style's statistics, and Feature Fusion Attention fuses the stored features while the "
            "portrait is sampled back on the inversion's schedule.\n\nThe style image is used at its own size and "
            "aspect (no resizing to the portrait's size); a very large one only costs time and memory, so scale it "
            "down (e.g. ImageScaleToTotalPixels) if it is far larger than the portrait. Feature Fusion Attention "
            "also works inside attention patches added after it (e.g. Self-Attention Guidance), and LoRAs may be "
            "added between the inversion and sampling. Sample Inverted reports how many calls each fused layer "
            "fused.\n\nNeeds an SD1.5 checkpoint in models/checkpoints. Change the style by loading another style "
            "image.", column=0)
    ckpt, text, encode = base(wf)
    style = _style_image(wf, ckpt)
    wf.column = 2
    store = wf.node("MagicPortrait_KVFeatureStore", title="KV Feature Store (fused layers and steps, fp16, CPU)")
    inv_c = wf.node("MagicPortrait_DDIMInvert", steps=STEPS, mode="ddim", title="Content DDIM Inversion")
    inv_s = wf.node("MagicPortrait_DDIMInvert", steps=STEPS, mode="ddim", title="Style DDIM Inversion")
    for inv, latent in ((inv_c, encode), (inv_s, style)):
        wf.connect(ckpt.out("MODEL"), inv, "model")
        wf.connect(text.out(0), inv, "positive")
        wf.connect(latent.out(0), inv, "latent")
        wf.connect(store.out(0), inv, "feature_store")
    wf.column = 3
    adain = wf.node("MagicPortrait_AdaINLatent", strength=1.0)
    wf.connect(inv_c.out("inverted_latent"), adain, "content")
    wf.connect(inv_s.out("inverted_latent"), adain, "style")
    ffa = wf.node("MagicPortrait_FeatureFusionAttention", preset="magicstyle")
    wf.connect(ckpt.out("MODEL"), ffa, "model")
    wf.connect(inv_c.out("features"), ffa, "content_store")
    wf.connect(inv_s.out("features"), ffa, "style_store")
    sample = wf.node("MagicPortrait_SampleInverted", title="Feature Fusion Forward")
    wf.connect(ffa.out(0), sample, "model")
    wf.connect(inv_c.out("inversion"), sample, "inversion")
    wf.connect(adain.out(0), sample, "start_latent")
    wf.column = 4
    wf.decode_and_save(sample.out(0), ckpt.out("VAE"), "magic_portrait/magicstyle")
    wf.group("Content and style images", [0, 1])
    wf.group_columns("DDIM inversion with a KV Feature Store", "Feature fusion sampling", "Decode and save", start=2)
    return wf


def magicstyle_portrait_single_node(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("MagicStyle in one node (Magic Portrait).\n\nMagicStyle Portrait encodes the portrait and the style "
            "image, inverts both keeping their self-attention features, fuses them while sampling back and decodes. "
            "Its widgets are the same as the separate nodes' (see magicstyle_portrait). The style image keeps its "
            "own aspect (scaled down only when larger than the portrait); its text reports how many calls each fused "
            "layer fused.\n\nNeeds an SD1.5 checkpoint in models/checkpoints.")
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = wf.encode_text(ckpt.out("CLIP"), "", "Prompt (empty)")
    content = wf.node("LoadImage", image=CONTENT_IMAGE, title="Content image")
    wf.column = 1
    style = _style_image(wf, encode=False)
    wf.column = 2
    portrait = wf.node("MagicPortrait_MagicStylePortrait", steps=STEPS, preset="magicstyle")
    wf.connect(ckpt.out("MODEL"), portrait, "model")
    wf.connect(ckpt.out("VAE"), portrait, "vae")
    wf.connect(content.out("IMAGE"), portrait, "content_image")
    wf.connect(style.out("IMAGE"), portrait, "style_image")
    wf.connect(text.out(0), portrait, "positive")
    wf.column = 3
    save = wf.node("SaveImage", filename_prefix="magic_portrait/magicstyle_single")
    wf.connect(portrait.out("image"), save, "images")
    wf.group_columns("Model, prompt and portrait", "Style image", "MagicStyle", "Save")
    return wf


WORKFLOWS = {
    "magicstyle_portrait.json": magicstyle_portrait,
    "magicstyle_portrait_single_node.json": magicstyle_portrait_single_node,
}
