"""The ComfyUI-facing side of recording MagicStyle's features: where a UNet's self-attention layers are, and the
KV Feature Store's spec that DDIM Invert fills.

The KV Feature Store node outputs an immutable ``KVStoreSpec``; DDIM Invert calls ``spec.begin(...)`` to get a model
clone whose attn1_patch (``CapturePatch``) records the normalised hidden state ``n`` entering the selected attn1
layers on the one model call per sigma the inversion's capture gate marks, and ``spec.finish(...)`` to check the
store is complete.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..magic_core import batch_rows as br
from ..magic_core import fusion as ff
from ..magic_core import inversion as inv
from ..magic_core import kv_store as kvs
from ..magic_core import layers as lay
from ..magic_core.sharing import SharedOnCopy
from .common import FROM_PRESET, PREFIX, NodeInputError, check_percent_range, layer_family, preset_or
from .fingerprint import model_fingerprint, weight_patch_signature
from .inversion_sampling import CAPTURE_GATES_KEY, run_inversion
from .unet_layers import layer_key, unet_attention_layers


def resolve_model_layers(model, preset: str, custom: str, node: str):
    """(selected layer keys, every AttentionLayer of the model) for a layer preset or a 'custom' list."""
    layers = unet_attention_layers(model)
    family = layer_family(model, node)
    spec = custom if preset == "custom" else preset
    if preset == "custom" and not str(custom).strip():
        raise NodeInputError(node, "custom_layers", "layers is 'custom': write a layer list, e.g. 'output 3-5'")
    try:
        keys = lay.resolve_layers(spec, family, lay.depths_of(layers))
    except lay.LayerSpecError as err:
        raise NodeInputError(node, "custom_layers" if preset == "custom" else "layers", str(err)) from None
    return keys, layers


def token_grid(h: int, w: int, level: int) -> tuple[int, int]:
    """The token grid of a layer `level` 2x downsamplings below an h x w latent (odd sizes round up, as the UNet's
    strided convolutions do)."""
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


# ------------------------------------------------------------------------------------------------ capture
class CapturePatch(SharedOnCopy):
    """attn1_patch: while the gate is open, record `n` of the selected layers into the store; changes nothing."""

    def __init__(self, store: kvs.KVStore, gate: kvs.CaptureGate, inner_dims: dict):
        self.store, self.gate, self.inner_dims = store, gate, inner_dims

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        if self.gate.open:
            key = layer_key(extra_options)
            if key is not None and key in self.inner_dims:
                kept = br.BatchRows.of(n.shape[0], extra_options.get("cond_or_uncond")).kept_chunk()
                self.store.record(key, extra_options["sigmas"], n[kept], None, self.inner_dims[key])
        return n, context_attn1, value_attn1


MATCH_FUSION = "match fusion preset"  # store layers: the layers of the fusion preset the store is for


@dataclass(frozen=True)
class KVStoreSpec(SharedOnCopy):
    """What a KV Feature Store node asked for; DDIM Invert fills one store per inversion with it.

    By default it keeps exactly what Feature Fusion Attention with `fusion_preset` and its defaults reads: that
    preset's layers (layers MATCH_FUSION) at that preset's steps (start/end percent FROM_PRESET), nothing more.
    """

    layers: str = MATCH_FUSION
    custom_layers: str = ""
    dtype: str = "fp16"
    device: str = "cpu (offload)"
    budget_mb: float = 4096.0
    start_percent: float = FROM_PRESET
    end_percent: float = FROM_PRESET
    label: str = ""
    node: str = PREFIX + "KVFeatureStore"
    fusion_preset: str = "magicstyle"
    origin: str = ""  # where the selection comes from, for messages (default: said from the fields)

    def plan(self, model) -> tuple[kvs.FeaturePlan, dict]:
        """(the layers and steps to keep, every AttentionLayer of the model)."""
        try:
            params = ff.get_preset(self.fusion_preset)
        except ValueError as err:
            raise NodeInputError(self.node, "fusion_preset", str(err)) from None
        matched = self.layers == MATCH_FUSION
        keys, layers = resolve_model_layers(model, params.layers_preset if matched else self.layers,
                                            self.custom_layers, self.node)
        start = preset_or(self.start_percent, params.start_percent)
        end = preset_or(self.end_percent, params.end_percent)
        check_percent_range(self.node, start, end, f" (-1 takes fusion preset {params.name!r}'s)")
        preset = f"fusion preset {params.name!r}"
        if matched:
            chosen = f"layers of {preset} ({params.layers_preset})"
        else:
            chosen = f"custom layers {self.custom_layers!r}" if self.layers == "custom" else f"layers {self.layers!r}"
        if self.start_percent < 0 and self.end_percent < 0:
            steps = f"steps of {preset} ({start:g}-{end:g})"
        else:
            steps = f"start/end percent {start:g}-{end:g}"
        return kvs.FeaturePlan(tuple(keys), start, end, self.origin or f"{chosen}, {steps}"), layers

    @property
    def selected_by(self) -> str:
        what = "the KV Feature Store" if self.node.endswith("KVFeatureStore") else "the node"
        return f"{what} ({self.node})"

    def begin(self, model, samples: torch.Tensor, sigmas: torch.Tensor, node: str):
        """(a clone of `model` that records into the store while an inversion's capture gate is open, the store);
        refuses a recording over the budget before anything runs."""
        plan, layers = self.plan(model)
        keys = plan.layers
        device = "cpu" if self.device.startswith("cpu") else model.load_device
        budget = None if self.budget_mb <= 0 else int(self.budget_mb * 1024 * 1024)
        inner_dims = {k: layers[k].inner_dim for k in keys}
        try:
            store = kvs.KVStore.for_plan(model_fingerprint(model), samples.shape, sigmas, layer_family(model, node),
                                         plan, dtype=self.dtype, device=device, budget_bytes=budget,
                                         inner_dims=inner_dims, label=self.label,
                                         weight_patches=weight_patch_signature(model), selected_by=self.selected_by)
        except ValueError as err:
            raise NodeInputError(node, "feature_store", f"{err} (set on the KV Feature Store node)") from None
        h, w = samples.shape[-2:]
        tokens_channels = {}
        for k in keys:
            gh, gw = token_grid(int(h), int(w), layers[k].level)
            tokens_channels[k] = (gh * gw, layers[k].channels)
        try:
            store.check_plan(samples.shape[0], tokens_channels)
        except kvs.StoreBudgetError as err:
            raise NodeInputError(node, "feature_store", f"{err} (the KV Feature Store node's budget_mb is "
                                 f"{self.budget_mb:g})") from None
        clone = model.clone()
        gate = kvs.CaptureGate()
        clone.set_model_attn1_patch(CapturePatch(store, gate, inner_dims))
        to = clone.model_options.setdefault("transformer_options", {})
        to[CAPTURE_GATES_KEY] = [*to.get(CAPTURE_GATES_KEY, []), gate]
        return clone, store

    def finish(self, store: kvs.KVStore, node: str) -> None:
        missing = store.missing()
        if missing:
            layers = lay.format_layers(sorted({k for k, _ in missing}))
            steps = sorted({i for _, i in missing})
            raise NodeInputError(
                node, "feature_store",
                f"the inversion left {len(missing)} (layer, step) features unrecorded: layers {layers} at steps "
                f"{steps[:12]}{'...' if len(steps) > 12 else ''}. The UNet never ran those self-attention layers on "
                "the captured calls (another patch replacing the UNet or its blocks?), or the inversion's sampler "
                "does not open the capture gate (use DDIM Invert).")


def invert_recording(spec: KVStoreSpec | None, model, positive, samples: torch.Tensor, sigmas: torch.Tensor,
                     mode: str, refine_iterations: int, node: str, label: str = ""):
    """DDIM-invert `samples` (cfg 1) on `sigmas`, recording a store by `spec` (None: no store); (latent, store)."""
    run_model, store = model, None
    if spec is not None:
        run_model, store = dataclasses.replace(spec, label=label).begin(model=model, samples=samples, sigmas=sigmas,
                                                                        node=node)
    latent, *_ = run_inversion(run_model, positive, None, 1.0, samples, sigmas, mode, refine_iterations,
                               inv.EDICT_DEFAULT_MIX)
    if store is not None:
        spec.finish(store, node)
    return latent, store
