"""MagicStyle nodes: KV Feature Store, Feature Fusion Attention, AdaIN Latent and the one-box MagicStyle Portrait.

Schemas and short ``execute``s; the patch objects they put on MODEL clones live apart: recording features during an
inversion in ``magicstyle_capture`` (``KVStoreSpec``), fusing them in ``magicstyle_patch`` (``patch_model``), the
maths in ``magic_core.fusion``.
"""

from __future__ import annotations

import math
import time

import comfy.samplers
import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import fusion as ff
from ..magic_core import inversion as inv
from ..magic_core import kv_store as kvs
from .common import CATEGORY, FROM_PRESET, PREFIX, NodeInputError, check_latent, require_negative, tag_latent
from .inversion_sampling import guided_run, reverse_sampler_function, schedule, with_run_notes
from .magicstyle_capture import MATCH_FUSION, KVStoreSpec, invert_recording
from .magicstyle_patch import describe_fusion, patch_model
from .types import KVStoreSpecType, KVStoreType

STORE_LAYER_PRESETS = ["all", "decoder", "instantstyle_style", "instantstyle_layout", "styleid", "masactrl", "custom"]
FUSION_LAYER_CHOICES = ["preset default", *STORE_LAYER_PRESETS]
UNCOND_CHOICES = ["preset default", *ff.UNCOND_MODES]
DEVICE_CHOICES = ["cpu (offload)", "model device"]
LAYERS_TOOLTIP = ("Self-attention layers: a preset, or 'custom' with the custom_layers list, e.g. "
                  "'output 3-5, middle 0, input 8:0-3' (block numbers as ComfyUI counts them; ':i' picks transformer "
                  "indices in SDXL's deep blocks).")
STORE_DTYPE_TOOLTIP = ("fp16 (default), bf16, fp32, or 8 bits per value: int8 (symmetric, one fp16 scale per token; "
                       "error at most half a scale step, about 0.4% of a token's largest value) or fp8_e4m3 "
                       "(float8 with 3 mantissa bits times one fp16 scale per token; at most 6.25% of each value). 8-bit halves "
                       "fp16's memory; values are scaled back (to the model's dtype) when used.")


def fusion_params(preset: str, gamma: float, content_weight: float, tau: float, start_percent: float,
                  end_percent: float, uncond: str, node: str) -> ff.FusionParams:
    overrides = {}
    for name, value in (("gamma", gamma), ("content_weight", content_weight), ("tau", tau),
                        ("start_percent", start_percent), ("end_percent", end_percent)):
        if value != FROM_PRESET:
            if value < 0:
                raise NodeInputError(node, name, f"must be >= 0, or -1 for the preset's value; got {value}")
            overrides[name] = float(value)
    if uncond != "preset default":
        overrides["uncond_mode"] = uncond
    try:
        return ff.get_preset(preset, **overrides)
    except ValueError as err:
        name = next((n for n in overrides if n in str(err)), "preset")
        raise NodeInputError(node, name, str(err)) from None


def _param_inputs():
    return [
        io.Combo.Input("preset", options=list(ff.FUSION_PRESET_NAMES), default="magicstyle",
                       tooltip="magicstyle: portrait defaults (content query preservation, style + half-weight "
                       "content K/V, tau 1.5). styleid: style K/V only, gamma 0.75, tau 1.5. stylealigned: AdaIN of "
                       "Q/K toward the style and shared attention. masactrl: current query on the content's K/V."),
        io.Float.Input("gamma", default=FROM_PRESET, min=-1.0, max=1.0, step=0.05,
                       tooltip="Query preservation Q = gamma*Q_content + (1-gamma)*Q_current. -1: the preset's."),
        io.Float.Input("content_weight", default=FROM_PRESET, min=-1.0, max=10.0, step=0.05,
                       tooltip="Weight of the content key/value columns (0 drops them). -1: the preset's."),
        io.Float.Input("tau", default=FROM_PRESET, min=-1.0, max=5.0, step=0.05,
                       tooltip="Attention temperature on the logits (>1 sharpens). -1: the preset's."),
        io.Combo.Input("layers", options=FUSION_LAYER_CHOICES, default="preset default", tooltip=LAYERS_TOOLTIP),
        io.String.Input("custom_layers", default="", tooltip="Used when layers is 'custom'."),
        io.Float.Input("start_percent", default=FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                       tooltip="Fusion is active on steps i with start <= i/steps < end. -1: the preset's."),
        io.Float.Input("end_percent", default=FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                       tooltip="-1: the preset's."),
        io.Combo.Input("uncond", options=UNCOND_CHOICES, default="preset default",
                       tooltip="The unconditional CFG branch: fuse (as the conditional), plain (unpatched), "
                       "style_only (current query on the style K/V). With Self-Attention Guidance on a fused layer, "
                       "plain keeps SAG's attention map on the image's own tokens."),
    ]


class KVFeatureStore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "KVFeatureStore",
            display_name="KV Feature Store (Magic Portrait)",
            category=CATEGORY + "/magicstyle",
            description="Says which self-attention features a DDIM Invert keeps (connect to its feature_store "
            "input): the normalised hidden state entering attn1 of the chosen layers at the chosen steps (q/k/v are "
            "recomputed from it later: a third of the memory). By default exactly what Feature Fusion Attention "
            "with fusion_preset reads (its layers and steps); a fusion that reads a layer or step the store did not "
            "keep is refused, naming both nodes.",
            inputs=[
                io.Combo.Input("layers", options=[MATCH_FUSION, *STORE_LAYER_PRESETS], default=MATCH_FUSION,
                               tooltip="'match fusion preset': the layers fusion_preset fuses (what Feature Fusion "
                               "Attention with layers 'preset default' reads). " + LAYERS_TOOLTIP),
                io.String.Input("custom_layers", default="", tooltip="Used when layers is 'custom'."),
                io.Combo.Input("dtype", options=list(kvs.DTYPES), default="fp16", tooltip=STORE_DTYPE_TOOLTIP),
                io.Combo.Input("device", options=DEVICE_CHOICES, default=DEVICE_CHOICES[0],
                               tooltip="Where stored features live: CPU RAM (default) or the model's device."),
                io.Float.Input("budget_mb", default=4096.0, min=0.0, max=1_000_000.0, step=64.0,
                               tooltip="Refuse (before inverting) a recording larger than this; 0: no limit."),
                io.Float.Input("start_percent", default=FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                               tooltip="Keep steps i with start <= i/steps < end (steps counted from the noisiest). "
                               "-1: fusion_preset's."),
                io.Float.Input("end_percent", default=FROM_PRESET, min=-1.0, max=1.0, step=0.01,
                               tooltip="-1: fusion_preset's."),
                io.Combo.Input("fusion_preset", options=list(ff.FUSION_PRESET_NAMES), default="magicstyle",
                               optional=True, tooltip="The Feature Fusion Attention preset these features are for: "
                               "layers 'match fusion preset' keeps its layers, start/end percent -1 its steps."),
            ],
            outputs=[KVStoreSpecType.Output(display_name="feature_store")],
        )

    @classmethod
    def execute(cls, layers, custom_layers, dtype, device, budget_mb, start_percent, end_percent,
                fusion_preset="magicstyle") -> io.NodeOutput:
        node = cls.define_schema().node_id
        if layers == "custom" and not custom_layers.strip():
            raise NodeInputError(node, "custom_layers", "layers is 'custom': write a layer list, e.g. 'output 3-5'")
        if 0 <= end_percent < start_percent:
            raise NodeInputError(node, "start_percent", f"{start_percent} is above end_percent {end_percent}")
        spec = KVStoreSpec(layers=layers, custom_layers=custom_layers, dtype=dtype, device=device,
                           budget_mb=float(budget_mb), start_percent=float(start_percent),
                           end_percent=float(end_percent), node=node, fusion_preset=fusion_preset)
        return io.NodeOutput(spec)


class FeatureFusionAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "FeatureFusionAttention",
            display_name="Feature Fusion Attention (Magic Portrait)",
            category=CATEGORY + "/magicstyle",
            description="Patch a clone of MODEL so its self-attention fuses stored content and style features "
            "(MagicStyle's Feature Fusion Attention, and the StyleID / StyleAligned / MasaCtrl variants). Sample "
            "from the content's inverted latent on the inversion's schedule (Sample Inverted), which reports how many "
            "calls each fused layer fused. Works inside attention replaces set before or after it (e.g. Self-"
            "Attention Guidance); several of these nodes compose on different layers or steps; LoRAs may be added "
            "after the inversion; the style may have any size and aspect.",
            inputs=[
                io.Model.Input("model"),
                *_param_inputs(),
                KVStoreType.Input("content_store", optional=True,
                                  tooltip="DDIM Invert's features of the content image."),
                KVStoreType.Input("style_store", optional=True, tooltip="DDIM Invert's features of the style image."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset, gamma, content_weight, tau, layers, custom_layers, start_percent, end_percent,
                uncond, content_store=None, style_store=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        params = fusion_params(preset, gamma, content_weight, tau, start_percent, end_percent, uncond, node)
        clone, patches = patch_model(model, params, layers, custom_layers, content_store, style_store, node)
        report = describe_fusion(params, patches, model, content_store, style_store)
        return io.NodeOutput(clone, ui=ui.PreviewText(report))


class AdaINLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "AdaINLatent",
            display_name="AdaIN Latent (Magic Portrait)",
            category=CATEGORY + "/magicstyle",
            description="Give each content latent the per-channel mean and std of the style latent "
            "(z = std_s * (z_c - mean_c) / std_c + mean_s), e.g. on inverted latents before fused sampling. The "
            "style may have another size and aspect than the content.",
            inputs=[
                io.Latent.Input("content"),
                io.Latent.Input("style", tooltip="Any size and aspect (only per-channel statistics are used). One "
                                "image per content image pairs them; any other count (one included) pools the "
                                "statistics over all style images."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Blend between the content latent (0) and its AdaIN (1)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, content, style, strength) -> io.NodeOutput:
        node = cls.define_schema().node_id
        z_c, z_s = _samples(node, "content", content), _samples(node, "style", style)
        if z_s.shape[1] != z_c.shape[1]:
            raise NodeInputError(node, "style", f"has {z_s.shape[1]} channels but content has {z_c.shape[1]}: "
                                 "both must come from the same model family")
        out = ff.adain_latent(z_c.float(), z_s.float())
        if strength != 1.0:
            out = z_c.float() + strength * (out - z_c.float())
        return io.NodeOutput({**content, "samples": out.to(z_c.dtype)})


def _samples(node, name, latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
        raise NodeInputError(node, name, "expected a LATENT with [B, C, H, W] samples")
    return samples


def _style_pixels(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The style image at its own aspect: as given, or scaled down to the content's pixel count when larger (the
    content's scale of textures; inverting a far larger style only costs time and memory)."""
    h, w = int(image.shape[1]), int(image.shape[2])
    if h * w <= height * width:
        return image
    scale = math.sqrt(height * width / (h * w))
    new_h, new_w = max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8)
    return comfy.utils.common_upscale(image.movedim(-1, 1), new_w, new_h, "area", "disabled").movedim(1, -1)


class MagicStylePortrait(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "MagicStylePortrait",
            display_name="MagicStyle Portrait (Magic Portrait)",
            category=CATEGORY + "/magicstyle",
            description="The whole MagicStyle pipeline in one node: encode, DDIM-invert the content and the style "
            "image keeping their self-attention features, AdaIN the content's inverted latent toward the style's, "
            "sample back with Feature Fusion Attention through ComfyUI's guider (ControlNets and other patches "
            "apply), decode.",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Image.Input("content_image", tooltip="One portrait or a batch."),
                io.Image.Input("style_image", tooltip="Style reference(s) of any size and aspect (scaled down to the "
                               "content's pixel count when larger, never cropped). One image per portrait pairs them; "
                               "any other count is used together by every portrait."),
                io.Conditioning.Input("positive", tooltip="Sampling prompt; an empty or style prompt is usual."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Int.Input("steps", default=50, min=2, max=1000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01),
                *_param_inputs(),
                io.Boolean.Input("adain_latent", default=True,
                                 tooltip="Start from the AdaIN of the content's inverted latent toward the style's."),
                io.Combo.Input("inversion_mode", options=["ddim", "fixed_point", "bdia"], default="ddim",
                               tooltip="fixed_point: refine_iterations extra calls per step, a more faithful "
                               "inversion. bdia: exact inversion at one call per step; sampling then follows BDIA "
                               "from a plain DDIM first step (the start is AdaIN-shifted or fused anyway)."),
                io.Int.Input("refine_iterations", default=0, min=0, max=50),
                io.Combo.Input("store_dtype", options=list(kvs.DTYPES), default="fp16",
                               tooltip=STORE_DTYPE_TOOLTIP + " The stores keep only the fused layers and steps."),
                io.Combo.Input("store_device", options=DEVICE_CHOICES, default=DEVICE_CHOICES[0]),
                io.Float.Input("store_budget_mb", default=4096.0, min=0.0, max=1_000_000.0, step=64.0),
                io.Conditioning.Input("negative", optional=True, tooltip="Needed when cfg is not 1."),
                io.Conditioning.Input("inversion_positive", optional=True,
                                      tooltip="Conditioning for the two inversions (default: positive)."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, vae, content_image, style_image, positive, scheduler, steps, cfg, preset, gamma,
                content_weight, tau, layers, custom_layers, start_percent, end_percent, uncond, adain_latent,
                inversion_mode, refine_iterations, store_dtype, store_device, store_budget_mb, negative=None,
                inversion_positive=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        started = time.perf_counter()
        require_negative(node, cfg, negative)
        params = fusion_params(preset, gamma, content_weight, tau, start_percent, end_percent, uncond, node)
        spec = KVStoreSpec(layers=params.layers_preset if layers == "preset default" else layers,
                           custom_layers=custom_layers, dtype=store_dtype, device=store_device,
                           budget_mb=float(store_budget_mb), start_percent=params.start_percent,
                           end_percent=params.end_percent, node=node,
                           origin=f"this node's fusion settings (preset {params.name!r})")
        content_px = content_image[..., :3]
        style_px = _style_pixels(style_image[..., :3], content_px.shape[1], content_px.shape[2])
        z_c = check_latent(node, model, {"samples": vae.encode(content_px)}, "content_image")
        z_s = check_latent(node, model, {"samples": vae.encode(style_px)}, "style_image")
        sigmas = schedule(model, scheduler, steps, 1.0)
        inversion = {"model": model, "positive": positive if inversion_positive is None else inversion_positive,
                     "sigmas": sigmas, "mode": inversion_mode, "refine_iterations": refine_iterations, "node": node}
        zt_c, content_store = invert_recording(spec if params.needs_content else None, samples=z_c, label="content",
                                               **inversion)
        zt_s, style_store = (invert_recording(spec if params.needs_style else None, samples=z_s, label="style",
                                              **inversion) if params.needs_style or adain_latent else (None, None))
        start = ff.adain_latent(zt_c, zt_s) if adain_latent else zt_c
        patched, patches = patch_model(model, params, layers, custom_layers, content_store, style_store, node)
        patched, notes = with_run_notes(patched)
        reverse_mode = "bdia" if inversion_mode == "bdia" else "ddim"
        sampler = comfy.samplers.KSAMPLER(reverse_sampler_function(reverse_mode, inv.EDICT_DEFAULT_MIX))
        out = guided_run(patched, positive, negative, cfg, start, sampler, inv.inversion_sigmas(sigmas).flip(0))
        image = vae.decode(out)
        image = image.reshape(-1, *image.shape[-3:]) if image.ndim == 5 else image
        stores = [s for s in (content_store, style_store) if s is not None]
        report = (f"{params.name}: {len(patches)} layers, {len(sigmas) - 1} steps, {z_c.shape[0]} image(s), style "
                  f"{tuple(z_s.shape[2:])} x {z_s.shape[0]}; " + "; ".join(s.summary() for s in stores)
                  + f"; {time.perf_counter() - started:.1f} s")
        if notes.lines:
            report += "\n" + notes.text("\n")
        return io.NodeOutput(image, tag_latent({"samples": out}, model), ui=ui.PreviewText(report))


NODES = [KVFeatureStore, FeatureFusionAttention, AdaINLatent, MagicStylePortrait]
