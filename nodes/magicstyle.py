"""MagicStyle nodes: KV Feature Store, Feature Fusion Attention, AdaIN Latent and the one-box MagicStyle Portrait.

- The KV Feature Store node outputs an immutable *spec*; DDIM Invert calls ``spec.begin(...)`` to get a model clone
  whose attn1_patch records the normalised hidden state ``n`` entering the selected attn1 layers on the one model call
  per sigma the inversion's capture gate marks, and ``spec.finish(...)`` to check the store is complete.
- Feature Fusion Attention patches a clone. Where a selected layer's attn1 replace slot is free (the usual case) a
  ``FusedAttn1`` stands in for the attn1 module (a ModelPatcher object patch, the same projection children, so
  weight keys and LoRAs are untouched): it fuses from the hidden states, projecting one blended query and the
  stored states' k/v, never the current pass's unused k/v. Where another function already holds the slot, fusion
  goes into the slot instead and runs inside it: the other function runs on inactive steps/branches, and on active
  ones computes the fused attention from FFA's q/k/v (tau folded into q, column weights realised exactly by repeating
  key/value groups, or refused). A function set in the slot *after* the node (core Self-Attention Guidance at middle
  0, any later set_model_attn1_replace) would make ComfyUI skip the stand-in module: the node's OUTER_SAMPLE wrapper
  (``FusionRunWrapper``) finds it when sampling starts and puts the fusion inside it for that run. The wrapper also
  refuses a run whose latent size, batch or schedule the stores were not recorded for (a style store may have any
  size), and reports after the run how many calls each layer fused, warning about layers or steps that never did.
- Several fusion nodes on one MODEL compose by (layer, step): each fuses where it is active and hands the other steps
  on (stand-ins nest, replaces chain); two active on the same layer at the same step are refused.
- A patch that changes a fused layer's self-attention token count (HyperTile, ToMe) is refused with an error naming
  the layer and the patch.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch
from comfy.ldm.modules import attention as comfy_attention
from comfy_api.v0_0_2 import io, ui

from ..magic_core import fusion as ff
from ..magic_core import inversion as inv
from ..magic_core import kv_store as kvs
from ..magic_core import layers as lay
from .common import (
    CATEGORY,
    PREFIX,
    NodeInputError,
    check_latent,
    guided_run,
    identity_difference,
    layer_family,
    model_identity,
    schedule,
    weight_patch_note,
    weight_patch_signature,
)
from .inversion import KVStoreSpecType, KVStoreType, reverse_sampler_function, run_inversion, with_run_notes

log = logging.getLogger(__name__)

STORE_LAYER_PRESETS = ["all", "decoder", "instantstyle_style", "instantstyle_layout", "styleid", "masactrl", "custom"]
FUSION_LAYER_CHOICES = ["preset default", *STORE_LAYER_PRESETS]
UNCOND_CHOICES = ["preset default", *ff.UNCOND_MODES]
DEVICE_CHOICES = ["cpu (offload)", "model device"]
FROM_PRESET = -1.0
WRAPPER_KEY = "magic_portrait_magicstyle_store_check"
LAYERS_TOOLTIP = ("Self-attention layers: a preset, or 'custom' with the custom_layers list, e.g. "
                  "'output 3-5, middle 0, input 8:0-3' (block numbers as ComfyUI counts them; ':i' picks transformer "
                  "indices in SDXL's deep blocks).")


# ------------------------------------------------------------------------------------------------ model structure
@dataclass(frozen=True)
class AttnLayer:
    key: lay.LayerKey
    attn1: torch.nn.Module
    channels: int  # width of n entering attn1
    inner_dim: int  # heads * dim_head of q/k/v
    level: int  # number of 2x downsamplings of the latent grid at this layer
    path: str  # attn1's attribute path from the BaseModel, as ModelPatcher object patches name it


def _transformer_blocks(block) -> list:
    out = []
    for layer in block:
        out.extend(getattr(layer, "transformer_blocks", ()))
    return out


def _has(block, name: str) -> bool:
    return any(type(layer).__name__ == name for layer in block)


def unet_attention_layers(model) -> dict[lay.LayerKey, AttnLayer]:
    """Every self-attention layer of the model's UNet with its attn1 module, widths and resolution level."""
    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"{type(unet).__name__} is not a UNet with input/middle/output blocks (SD1.5/SDXL)")
    found: dict[lay.LayerKey, AttnLayer] = {}
    names = {id(module): name for name, module in unet.named_modules()}

    def add(block_name, number, block, level):
        for index, tb in enumerate(_transformer_blocks(block)):
            attn1 = _unwrapped(tb.attn1)
            found[(block_name, number, index)] = AttnLayer((block_name, number, index), attn1,
                                                          int(attn1.to_q.in_features), int(attn1.to_q.out_features),
                                                          level, f"diffusion_model.{names[id(tb)]}.attn1")

    level = 0
    for number, block in enumerate(unet.input_blocks):
        if _has(block, "Downsample"):
            level += 1
        add("input", number, block, level)
    add("middle", 0, unet.middle_block, level)
    for number, block in enumerate(unet.output_blocks):
        add("output", number, block, level)
        if _has(block, "Upsample"):
            level -= 1
    return found


def resolve_model_layers(model, preset: str, custom: str, node: str, input_name: str = "layers"):
    layers = unet_attention_layers(model)
    family = layer_family(model, node)
    spec = custom if preset == "custom" else preset
    if preset == "custom" and not str(custom).strip():
        raise NodeInputError(node, "custom_layers", "layers is 'custom': write a layer list, e.g. 'output 3-5'")
    try:
        keys = lay.resolve_layers(spec, family, lay.depths_of(layers))
    except lay.LayerSpecError as err:
        raise NodeInputError(node, "custom_layers" if preset == "custom" else input_name, str(err)) from None
    return keys, layers


def _grid(h: int, w: int, level: int) -> tuple[int, int]:
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


# ------------------------------------------------------------------------------------------------ capture
class CapturePatch:
    """attn1_patch: while the gate is open, record `n` of the selected layers into the store; changes nothing."""

    def __init__(self, store: kvs.KVStore, gate: kvs.CaptureGate, inner_dims: dict):
        self.store, self.gate, self.inner_dims = store, gate, inner_dims

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        if self.gate.open:
            key = lay.layer_key(extra_options)
            if key is not None and key in self.inner_dims:
                self.store.record(key, extra_options["sigmas"], n, extra_options.get("cond_or_uncond"),
                                  self.inner_dims[key])
        return n, context_attn1, value_attn1

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class KVStoreSpec:
    """What a KV Feature Store node asked for; DDIM Invert fills one store per inversion with it."""

    layers: str = "decoder"
    custom_layers: str = ""
    dtype: str = "fp16"
    device: str = "cpu (offload)"
    budget_mb: float = 4096.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    label: str = ""
    node: str = PREFIX + "KVFeatureStore"

    def begin(self, model, samples: torch.Tensor, sigmas: torch.Tensor, node: str):
        keys, layers = resolve_model_layers(model, self.layers, self.custom_layers, self.node)
        device = "cpu" if self.device.startswith("cpu") else model.load_device
        budget = None if self.budget_mb <= 0 else int(self.budget_mb * 1024 * 1024)
        inner_dims = {k: layers[k].inner_dim for k in keys}
        try:
            store = kvs.KVStore(model_identity(model), samples.shape, sigmas, layer_family(model, node), keys,
                                dtype=self.dtype, device=device, budget_bytes=budget,
                                start_percent=self.start_percent, end_percent=self.end_percent,
                                inner_dims=inner_dims, label=self.label,
                                weight_patches=weight_patch_signature(model))
        except ValueError as err:
            raise NodeInputError(node, "feature_store", f"{err} (set on the KV Feature Store node)") from None
        h, w = samples.shape[-2:]
        tokens_channels = {}
        for k in keys:
            gh, gw = _grid(int(h), int(w), layers[k].level)
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
        to[inv.CAPTURE_GATES_KEY] = [*to.get(inv.CAPTURE_GATES_KEY, []), gate]
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

    def __deepcopy__(self, memo):
        return self


# ------------------------------------------------------------------------------------------------ fusion
# Core modules whose attention patches users meet, named after the node that sets them.
KNOWN_PATCHES = {
    "comfy_extras.nodes_sag": "Self-Attention Guidance",
    "comfy_extras.nodes_pag": "Perturbed-Attention Guidance",
    "comfy_extras.nodes_hypertile": "HyperTile",
    "comfy_extras.nodes_tomesd": "TomePatchModel (ToMe)",
}


SAG_MODULE = "comfy_extras.nodes_sag"
SAG_HINT = ("fused inside Self-Attention Guidance with uncond 'fuse': SAG reads the unconditional branch's attention "
            "as a map of the image's tokens, here the fused style/content keys; set uncond to plain to keep SAG's map "
            "on the image")


def _module_name(module: str) -> str:
    """ComfyUI names modules it loads from files (comfy_extras, custom node packs) by their path: shorten it to the
    dotted name from comfy_extras / custom_nodes on."""
    if "/" not in module and "\\" not in module:
        return module
    parts = [p for p in re.split(r"[\\/]", module) if p]
    for anchor in ("comfy_extras", "custom_nodes"):
        if anchor in parts:
            parts = parts[parts.index(anchor):]
            break
    else:
        parts = parts[-1:]
    return ".".join(parts).removesuffix(".py")


def describe_patch(fn) -> str:
    """An attention patch function as a user can recognise it: the core node that sets it, or its module and name."""
    module = _module_name(getattr(fn, "__module__", None) or type(fn).__module__)
    name = (getattr(fn, "__qualname__", None) or type(fn).__qualname__).replace(".<locals>", "")
    node = KNOWN_PATCHES.get(module)
    return f"{node} ({module}.{name})" if node else f"{module}.{name}"


def _default_attention(q, k, v, extra):
    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def _upcast(attn_precision, dtype) -> bool:
    """Whether ComfyUI's policy (the model's attn_precision, --force-upcast-attention, --dont-upcast-attention)
    asks for float32 attention at this dtype."""
    return comfy_attention.get_attn_precision(attn_precision, dtype) == torch.float32


def _cond_weights(params: ff.FusionParams, style_weight: float, has_content: bool) -> list[float]:
    """The column-group weights a conditional chunk attends with (as ``ff._column_groups`` builds them)."""
    weights = []
    if params.use_style_kv:
        weights.append(style_weight)
    if params.use_content_kv and params.content_weight > 0 and has_content:
        weights.append(float(params.content_weight))
    if params.include_self:
        weights.append(1.0)
    return weights


class FusionAttn1:
    """Feature Fusion Attention for one layer, on active steps; other steps and plain branches run unchanged.

    Two ways in: as an attn1 replace (``__call__``/``qkv`` on ComfyUI's q/k/v, inside another function that holds
    the slot, `previous`) or, when the slot is free, through ``FusedAttn1`` in place of the attn1 module (``hidden``),
    which projects only what fusion reads. Keeps per-run counts (``start_run`` resets them) for the run report.
    """

    def __init__(self, key, attn1, params: ff.FusionParams, content, style, previous, steps, node: str,
                 level: int | None = None):
        self.key, self.attn1, self.params = key, attn1, params
        self.content, self.style, self.previous = content, style, previous
        self.steps, self.node, self.level = frozenset(steps), node, level
        self.ref = content if content is not None else style
        self.previous_slot = None  # the slot key `previous` was found under when this fusion was set
        self._inside = 0  # > 0 while this fusion's result is being computed by the function it runs inside
        self.start_run()

    # ---------------------------------------------------------------- run bookkeeping
    def start_run(self, expected_tokens: int | None = None, attn1_patches: tuple[str, ...] = ()) -> None:
        self.calls = 0  # fused calls in this run
        self.fused_steps: dict[int, int] = {}
        self.off_schedule = 0  # calls at sigmas not on the stores' schedule (run plain)
        self.routes: dict[str, int] = {}
        self.expected_tokens = expected_tokens
        self.attn1_patches = attn1_patches

    @property
    def active_sigmas(self) -> list[float]:
        return [self.ref.sigmas[i] for i in sorted(self.steps)]

    def layer(self) -> str:
        return lay.format_layers([self.key])

    # ---------------------------------------------------------------- shared prologue
    def _plain(self, q, k, v, extra, previous):
        if previous is not None:
            return previous(q, k, v, extra)
        return _default_attention(q, k, v, extra)

    def _stored(self, store, sigma, b, dtype, device):
        n = store.get(self.key, sigma, device=device, dtype=dtype)
        if n.shape[0] not in (1, b):
            raise kvs.StoreMismatchError(
                f"[{self.node}] a KV store holds {n.shape[0]} images but the sampling batch has {b}: use a batch of "
                f"{n.shape[0]} or a store of one image (shared by every image)")
        return n

    def _sources(self, sigma, b, dtype, device):
        """(content_n, style_n, style_weight) this call fuses: content [1 or b, tokens, C] or None; style of N images
        one to one (N = b), shared (N = 1) or side by side (other N, weight 1/N)."""
        p = self.params
        content = self._stored(self.content, sigma, b, dtype, device) if p.needs_content else None
        style, weight = None, 1.0
        if p.needs_style:
            style, weight = ff.style_side_by_side(self.style.get(self.key, sigma, device=device, dtype=dtype), b)
        return content, style, weight

    def _check_tokens(self, tokens: int, rows: int) -> None:
        expected = self.expected_tokens
        if expected is None and self.content is not None:
            expected = self.content.tokens(self.key)
        if expected is None or tokens == expected:
            return
        patches = ", ".join(self.attn1_patches) or "an attn1_patch on the MODEL, or an area conditioning"
        raise NodeInputError(
            self.node, "layers",
            f"the fused layer {self.layer()} gets {tokens} self-attention tokens per row ({rows} rows) where the "
            f"sampled latent gives it {expected}: a patch that runs before this layer's self-attention changed the "
            f"token count: {patches}. Feature Fusion Attention attends over each fused layer's whole token grid "
            "(its stored features are on it), so it cannot run inside tiles or merged tokens. Remove that patch, set "
            "it to leave the fused layers alone (HyperTile tiles the full-resolution layers and max_depth levels "
            "below: lower max_depth or fuse lower-resolution layers), or choose other layers (layers = custom).")

    def _begin(self, extra: dict, rows: int, tokens: int, dtype, device, route):
        """None where fusion is off (inactive step, off-schedule sigma, re-entered from inside); else
        (cond_or_uncond, per-chunk batch, content_n, style_n, style_weight), counted for the run report."""
        if self._inside:
            return None
        sigma = extra.get("sigmas")
        if sigma is None:
            return None
        idx = self.ref.step_index(sigma)
        if idx is None:
            self.off_schedule += 1
            return None
        if idx not in self.steps:
            return None
        self._check_tokens(tokens, rows)
        cou = list(extra.get("cond_or_uncond") or [0])
        b = kvs.chunk_batch(rows, cou)
        self.calls += 1
        self.fused_steps[idx] = self.fused_steps.get(idx, 0) + 1
        label = route() if callable(route) else route
        self.routes[label] = self.routes.get(label, 0) + 1
        return (cou, b, *self._sources(sigma, b, dtype, device))

    def _groups(self, rows: int, b: int, cou: list, extra: dict):
        """(rows, branch, options) per separately fused part of the batch: one part unless uncond is treated apart."""
        if self.params.uncond_mode == "fuse" or all(c != 1 for c in cou):
            return [(slice(0, rows), "cond", extra)]
        return [(slice(j * b, (j + 1) * b), "uncond" if c == 1 else "cond", {**extra, "cond_or_uncond": [c]})
                for j, c in enumerate(cou)]

    # ---------------------------------------------------------------- q/k/v route
    def __call__(self, q, k, v, extra):
        return self.qkv(q, k, v, extra, self.previous)

    def qkv(self, q, k, v, extra, previous):
        """The layer's attention from ComfyUI's q/k/v, fused on active steps; `previous` (the function holding the
        slot, or None) runs otherwise and, on active steps, computes the fused attention itself from plain q/k/v."""
        rows = q.shape[0]
        outer = outer_function(previous)
        begun = self._begin(extra, rows, q.shape[1], q.dtype, q.device,
                            lambda: "attn1 replace" if outer is None else f"inside {describe_patch(outer)}")
        if begun is None:
            return self._plain(q, k, v, extra, previous)
        cou, b, content_n, style_n, style_weight = begun
        p = self.params
        a = self.attn1
        content = None if content_n is None else (
            a.to_q(content_n) if p.gamma > 0 else None,
            *((a.to_k(content_n), a.to_v(content_n)) if p.use_content_kv and p.content_weight > 0 else (None, None)))
        style = None if style_n is None else (a.to_q(style_n) if p.adain_qk else None, a.to_k(style_n),
                                              a.to_v(style_n))
        heads = extra["n_heads"]
        outs = []
        for sl, branch, sub in self._groups(rows, b, cou, extra):
            qs, ks, vs = q[sl], k[sl], v[sl]
            n_rows = qs.shape[0]
            plan = ff.fusion_inputs(p, qs, ks, vs, _rows(content, n_rows, b), _rows(style, n_rows, b), branch,
                                    style_weight=style_weight)
            if plan is None:
                outs.append(self._plain(qs, ks, vs, sub, previous))
            elif outer is None:
                outs.append(plan.attend(heads, _upcast(extra.get("attn_precision"), qs.dtype)))
            else:
                fq, fk, fv, exact = plan.as_plain_qkv()
                if not exact:
                    raise inexact_error(self, outer, plan.weights)
                self._inside += 1  # the other function may call this fusion again (it chained it): pass through
                try:
                    outs.append(outer(fq, fk, fv, sub))
                finally:
                    self._inside -= 1
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    # ---------------------------------------------------------------- stand-in module route
    def hidden(self, x, context, value, transformer_options: dict, heads: int):
        """The fused attention (before to_out) from attn1's own inputs, or None on steps where fusion is off."""
        rows = x.shape[0]
        begun = self._begin(transformer_options, rows, x.shape[1], x.dtype, x.device, "stand-in module")
        if begun is None:
            return None
        cou, b, content_n, style_n, style_weight = begun
        a = self.attn1
        outs = []
        for sl, branch, sub in self._groups(rows, b, cou, transformer_options):
            xs = x[sl]
            ctx = None if context is None else context[sl]
            val = None if value is None else value[sl]
            n_rows = xs.shape[0]
            plan = ff.hidden_fusion_inputs(self.params, xs, a.to_q, a.to_k, a.to_v, _rows1(content_n, n_rows, b),
                                           _rows1(style_n, n_rows, b), branch, context=ctx, value=val,
                                           style_weight=style_weight)
            if plan is None:
                kv_in = xs if ctx is None else ctx
                outs.append(_default_attention(a.to_q(xs), a.to_k(kv_in), a.to_v(kv_in if val is None else val),
                                               {**sub, "n_heads": heads,
                                                "attn_precision": getattr(a, "attn_precision", None)}))
            else:
                outs.append(plan.attend(heads, _upcast(getattr(a, "attn_precision", None), xs.dtype)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class ChainedFusion:
    """A fusion put into an attn1 slot that another function took after the fusion was set (found when sampling
    starts): ComfyUI calls this, which fuses inside that function (the fusion's q/k/v route with it as `previous`)."""

    def __init__(self, fusion: FusionAttn1, previous):
        self.fusion, self.previous = fusion, previous

    def __call__(self, q, k, v, extra):
        return self.fusion.qkv(q, k, v, extra, self.previous)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def outer_function(fn):
    """The first function in an attn1 slot's chain that is not one of ours (None: only fusions)."""
    while isinstance(fn, (FusionAttn1, ChainedFusion)):
        fn = fn.previous
    return fn


def fusions_in_slot(fn) -> list[FusionAttn1]:
    out = []
    while isinstance(fn, (FusionAttn1, ChainedFusion)):
        out.append(fn if isinstance(fn, FusionAttn1) else fn.fusion)
        fn = fn.previous
    return out


def fusions_standing_in(module) -> list[FusionAttn1]:
    out = []
    while isinstance(module, FusedAttn1):
        out.append(module.fusion)
        module = module.original
    return out


def slot_holder(replaces: dict, key):
    """(function, slot key) ComfyUI calls for this layer's attn1: the per-layer entry, else the block-wide one."""
    if key in replaces:
        return replaces[key], key
    if key[:2] in replaces:
        return replaces[key[:2]], key[:2]
    return None, None


def inexact_error(fusion: FusionAttn1, outer, weights) -> NodeInputError:
    shown = ", ".join(f"{w:g}" for w in weights)
    return NodeInputError(
        fusion.node, "content_weight",
        f"Feature Fusion Attention at {fusion.layer()} runs inside {describe_patch(outer)}, which holds that layer's "
        f"attn1 slot; it hands that function plain q/k/v and realises column weights by repeating key groups, "
        f"which cannot give the weights {shown} (style, content) exactly. Use a content_weight whose ratio to the "
        "style's has a denominator up to 4 (0.25, 0.5, 0.75, 1, 1.5, 2, ...), or remove the other patch from this "
        "MODEL.")


def _check_composable(fusion: FusionAttn1, outer, batch: int) -> None:
    if outer is None:
        return
    n_style = fusion.style.batch if fusion.params.needs_style and fusion.style is not None else 1
    style_weight = 1.0 if n_style in (1, batch, None) else 1.0 / n_style
    weights = _cond_weights(fusion.params, style_weight, fusion.content is not None)
    if weights and ff.plain_repetitions(weights) is None:
        raise inexact_error(fusion, outer, weights)


class FusedAttn1(torch.nn.Module):
    """Stands in for one attn1 module (a ModelPatcher object patch, reverted when another clone loads).

    Its projections are the original module's own children under the same names, so state-dict keys, weight
    patches (LoRA) and casting are untouched; steps where fusion is off run `original`: the attn1 module itself, or
    an earlier Feature Fusion Attention's stand-in on the same layer (fusions on other steps compose this way).
    """

    def __init__(self, fusion: FusionAttn1, original: torch.nn.Module):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = original.to_q, original.to_k, original.to_v, original.to_out
        self.heads = original.heads
        self.dim_head = getattr(original, "dim_head", None)
        self.attn_precision = getattr(original, "attn_precision", None)
        # plain attributes, not submodules: the original's parameters are already registered through ours
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "fusion", fusion)

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}, **kwargs):  # noqa: B006
        if mask is not None:
            raise ValueError(f"[{self.fusion.node}] Feature Fusion Attention got a self-attention mask at "
                             f"{lay.format_layers([self.fusion.key])}; SD1.5/SDXL UNets pass none")
        out = self.fusion.hidden(x, context, value, transformer_options, self.heads)
        if out is None:  # fusion off at this step: the original module, with whatever a newer ComfyUI passes
            return self.original(x, context=context, value=value, transformer_options=transformer_options, **kwargs)
        return self.to_out(out)

    def __deepcopy__(self, memo):
        return self


def _unwrapped(attn1: torch.nn.Module) -> torch.nn.Module:
    while isinstance(attn1, FusedAttn1):
        attn1 = attn1.original
    return attn1


def _rows1(t, rows: int, b: int):
    return None if t is None else _rows((t,), rows, b)[0]


def _rows(src, rows: int, b: int):
    """A source of batch 1 or b mapped onto `rows` (= b or a multiple of b)."""
    if src is None:
        return None
    out = []
    for t in src:
        if t is None or t.shape[0] in (1, rows):
            out.append(t)
        else:
            out.append(t.repeat(rows // t.shape[0], 1, 1))
    return tuple(out)


class FusionRunWrapper:
    """OUTER_SAMPLE wrapper of one Feature Fusion Attention node, around every sampling run of its MODEL:

    - before: the content store must fit the latent's size and batch, both stores the schedule (a style store may
      have any size); fused layers whose attn1 slot another function took after this node (SAG's replace at middle
      0, any later set_model_attn1_replace) get the fusion put inside that function for this run, so the stand-in
      module ComfyUI would now skip is never silently lost;
    - after: a report of what ran (fused calls per layer, layers or steps that never fused and why), logged and
      added to the run's RunNotes (Sample Inverted and MagicStyle Portrait show it).
    """

    def __init__(self, stores: list[tuple[str, kvs.KVStore]], node: str, patches: dict | None = None,
                 params: ff.FusionParams | None = None):
        self.stores, self.node = stores, node
        self.patches = patches or {}
        self.params = params
        self.last_report = ""

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self._check_stores(latent_image, sigmas)
        guider = getattr(executor, "class_obj", None)
        options = getattr(guider, "model_options", None)
        to = options.setdefault("transformer_options", {}) if isinstance(options, dict) else {}
        others = tuple(describe_patch(p) for p in to.get("patches", {}).get("attn1_patch", [])
                       if not isinstance(p, CapturePatch))
        h, w = int(latent_image.shape[-2]), int(latent_image.shape[-1])
        for f in self.patches.values():
            expected = None if f.level is None else math.prod(_grid(h, w, f.level))
            f.start_run(expected, others)
        if isinstance(options, dict):
            self._fuse_inside_later_replaces(to, int(latent_image.shape[0]))
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        self._report(sigmas, to.get(inv.RUN_NOTES_KEY))
        return out

    def _check_stores(self, latent_image, sigmas) -> None:
        batch = int(latent_image.shape[0])
        for name, store in self.stores:
            who = f"[{self.node}] input '{name}'"
            style = name == "style_store"
            store.check_compatible(None, tuple(latent_image.shape), sigmas, who=who, channels_only=style)
            if not style and store.batch not in (None, 1, batch):
                raise kvs.StoreMismatchError(
                    f"{who}: the KV store holds {store.batch} images but the sampled latent batch has {batch}; use "
                    f"a batch of {store.batch} or a store of one image (shared by every image)")

    def _fuse_inside_later_replaces(self, to: dict, batch: int) -> None:
        replaces = to.get("patches_replace", {}).get("attn1")
        if not replaces:
            return
        replaces = dict(replaces)
        changed = False
        for key, f in self.patches.items():
            holder, where = slot_holder(replaces, key)
            if holder is None:
                continue  # the stand-in module runs
            if fusions_in_slot(holder) and any(x is f for x in fusions_in_slot(holder)):
                later = replaces.get(key[:2])
                if not (holder is f and f.previous_slot == key[:2] and later is not None and later is not f.previous):
                    continue
                holder = later  # a block-wide replace set after this fusion chained the one it found there
            _check_composable(f, outer_function(holder), batch)
            replaces[key] = ChainedFusion(f, holder)
            changed = True
        if changed:
            to["patches_replace"] = {**to["patches_replace"], "attn1": replaces}

    def _report(self, sigmas, notes) -> None:
        if not self.patches:
            return
        ref = next(iter(self.patches.values())).ref
        visited = set()
        for s in sigmas[:-1]:
            idx = ref.step_index(s)
            if idx is not None:
                visited.add(idx)
        groups: dict[str, list] = {}
        warnings: dict[str, list] = {}
        complete = 0
        for key, f in self.patches.items():
            expected = sorted(visited & f.steps)
            missing = [i for i in expected if i not in f.fused_steps]
            route = ", ".join(sorted(f.routes)) or "no fused call"
            groups.setdefault(f"{f.calls} calls ({route})", []).append(key)
            if not missing:
                complete += 1
            else:
                why = (f"{f.off_schedule} calls came at sigmas off the stores' schedule and ran plain attention (a "
                       "sampler that evaluates between the schedule's sigmas; use Sample Inverted or the Inverted "
                       "Latent Sampler on the inversion's sigmas)") if f.off_schedule else (
                       "the UNet never ran this layer's fusion: its attn1 module was replaced by another object patch, "
                       "or the model was swapped, after Feature Fusion Attention" if not f.fused_steps else
                       "the layer ran without fusion on those steps")
                warnings.setdefault(f"never fused at steps {missing} of {ref.n_steps}: {why}", []).append(key)
            if f.off_schedule and not missing:
                warnings.setdefault(f"{f.off_schedule} calls at sigmas off the stores' schedule ran plain attention",
                                    []).append(key)
            if f.params.uncond_mode == "fuse" and any(SAG_MODULE in r for r in f.routes):
                warnings.setdefault(SAG_HINT, []).append(key)
        name = self.params.name if self.params is not None else "fusion"
        steps = sorted(visited & set().union(*(f.steps for f in self.patches.values())))
        text = (f"Feature Fusion Attention ({name}): {complete}/{len(self.patches)} layers fused on every active step "
                f"({len(steps)} steps); " + "; ".join(f"{lay.format_layers(keys)}: {what}"
                                                      for what, keys in groups.items()))
        lines = [text] + [f"WARNING {lay.format_layers(keys)}: {what}" for what, keys in warnings.items()]
        self.last_report = "\n".join(lines)
        log.info("[%s] %s", self.node, text)
        for line in lines[1:]:
            log.warning("[%s] %s", self.node, line)
        if notes is not None:
            for line in lines:
                notes.add(line)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


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


def _check_store(node: str, name: str, store, model_id: str, layers, steps, n_steps: int | None):
    if store is None:
        return
    if not isinstance(store, kvs.KVStore):
        raise NodeInputError(node, name, "expected a MAGIC_KV_STORE: connect DDIM Invert's 'features' output (with "
                             "a KV Feature Store node on its feature_store input)")
    difference = identity_difference(store.model_id, model_id)
    if difference is not None:
        raise NodeInputError(node, name, f"was recorded with {difference}. Stored features fit the checkpoint that "
                             "produced them (weight patches such as LoRAs added later are fine): invert with this "
                             "MODEL's checkpoint")
    if n_steps is not None and store.n_steps != n_steps:
        raise NodeInputError(node, name, f"was recorded on {store.n_steps} steps but the other store on {n_steps}: "
                             "invert both images with the same schedule")
    lacking = [k for k in layers if k not in store.layers]
    if lacking:
        raise NodeInputError(node, name, f"does not hold layers {lay.format_layers(lacking)} that fusion uses (it "
                             f"holds {lay.format_layers(store.layers)}): choose a KV Feature Store layer preset that "
                             "covers the fusion layers (e.g. 'all' or 'decoder'), or fewer fusion layers")
    lacking_steps = sorted(set(steps) - set(store.step_indices))
    if lacking_steps:
        raise NodeInputError(node, name, f"does not hold steps {lacking_steps[:10]} where fusion is active: widen the "
                             "KV Feature Store's start/end percent or narrow the fusion's")
    if store.missing():
        raise NodeInputError(node, name, "is incomplete (the inversion that filled it did not finish)")


def _overlapping(a: list[float], b: list[float]) -> list[float]:
    return [s for s in a if any(kvs.sigma_close(s, t) for t in b)]


def patch_model(model, params: ff.FusionParams, layers_choice: str, custom_layers: str, content_store, style_store,
                node: str):
    """A clone of `model` with Feature Fusion Attention; returns (clone, {layer: FusionAttn1}).

    Per layer: a free attn1 slot gets a stand-in module (nested around an earlier fusion's stand-in, if any); a taken
    slot gets the fusion as its replace, chaining the holder. Several fusion nodes compose by (layer, step): each
    fuses where it is active and hands the others' steps on; two active on one layer at one step are refused."""
    preset_layers = params.layers_preset if layers_choice == "preset default" else layers_choice
    keys, layers = resolve_model_layers(model, preset_layers, custom_layers, node)
    needs = []
    if params.needs_content:
        needs.append(("content_store", content_store))
    if params.needs_style:
        needs.append(("style_store", style_store))
    for name, store in needs:
        if store is None:
            raise NodeInputError(node, name, f"the {params.name} preset needs it: connect DDIM Invert's features "
                                 "output (the content image's for content_store, the style image's for style_store)")
    content = content_store if params.needs_content else None
    style = style_store if params.needs_style else None
    ref = content if content is not None else style
    steps = kvs.percent_steps(ref.n_steps, params.start_percent, params.end_percent)
    model_id = model_identity(model)
    n_steps = None
    for name, store in (("content_store", content), ("style_store", style)):
        _check_store(node, name, store, model_id, keys, steps, n_steps)
        if store is not None:
            n_steps = store.n_steps
    if content is not None and style is not None:
        try:  # the style may have any size and aspect: its channels and schedule must match
            style.check_compatible(None, content.latent_shape, content.sigmas, who=f"[{node}] input 'style_store'",
                                   channels_only=True)
        except kvs.StoreMismatchError as err:
            raise NodeInputError(node, "style_store", str(err).split(": ", 1)[-1] + " (compared with content_store)") \
                from None
    clone = model.clone()
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    active = [ref.sigmas[i] for i in steps]
    batch = content.batch if content is not None and content.batch else 1
    plans, clashes = [], {}
    for key in keys:
        path = layers[key].path
        current = clone.get_model_object(path)
        holder, where = slot_holder(replaces, key)
        for earlier in fusions_standing_in(current) + fusions_in_slot(holder):
            shared = _overlapping(active, earlier.active_sigmas)
            if shared:
                clashes.setdefault((earlier.params.name, tuple(ref.step_index(s) for s in shared)), []).append(key)
        plans.append((key, path, current, holder, where))
    if clashes:
        (other, shared), clash_keys = next(iter(clashes.items()))
        raise NodeInputError(
            node, "layers",
            f"{lay.format_layers(clash_keys)} already fused by an earlier Feature Fusion Attention ({other}) on this "
            f"MODEL at the same steps ({list(shared)} of {ref.n_steps}). Fusions on one layer compose by steps: each "
            "fuses where it is active and runs the other on the rest, but two cannot fuse one layer at one step. "
            "Give the two nodes non-overlapping start/end percent, fuse other layers (layers = custom), or use one "
            "node.")
    patches = {}
    for key, path, current, holder, where in plans:
        patch = FusionAttn1(key, _unwrapped(current), params, content, style, holder, steps, node,
                            level=layers[key].level)
        if holder is None:
            clone.add_object_patch(path, FusedAttn1(patch, current))
        else:  # another function owns the slot: fuse inside it (ComfyUI would skip the module)
            _check_composable(patch, outer_function(holder), batch)
            patch.previous_slot = where
            clone.set_model_attn1_replace(patch, key[0], key[1], key[2])
        patches[key] = patch
    stores = [(name, s) for name, s in (("content_store", content), ("style_store", style)) if s is not None]
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               FusionRunWrapper(stores, node, patches, params))
    return clone, patches


# ------------------------------------------------------------------------------------------------ nodes
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
            "recomputed from it later: a third of the memory).",
            inputs=[
                io.Combo.Input("layers", options=STORE_LAYER_PRESETS, default="decoder", tooltip=LAYERS_TOOLTIP),
                io.String.Input("custom_layers", default="", tooltip="Used when layers is 'custom'."),
                io.Combo.Input("dtype", options=list(kvs.DTYPES), default="fp16"),
                io.Combo.Input("device", options=DEVICE_CHOICES, default=DEVICE_CHOICES[0],
                               tooltip="Where stored features live: CPU RAM (default) or the model's device."),
                io.Float.Input("budget_mb", default=4096.0, min=0.0, max=1_000_000.0, step=64.0,
                               tooltip="Refuse (before inverting) a recording larger than this; 0: no limit."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Keep steps i with start <= i/steps < end (steps counted from the noisiest)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[KVStoreSpecType.Output(display_name="feature_store")],
        )

    @classmethod
    def execute(cls, layers, custom_layers, dtype, device, budget_mb, start_percent, end_percent) -> io.NodeOutput:
        node = cls.define_schema().node_id
        if layers == "custom" and not custom_layers.strip():
            raise NodeInputError(node, "custom_layers", "layers is 'custom': write a layer list, e.g. 'output 3-5'")
        if start_percent > end_percent:
            raise NodeInputError(node, "start_percent", f"{start_percent} is above end_percent {end_percent}")
        spec = KVStoreSpec(layers=layers, custom_layers=custom_layers, dtype=dtype, device=device,
                           budget_mb=float(budget_mb), start_percent=float(start_percent),
                           end_percent=float(end_percent), node=node)
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
        report = (f"{params.name}: gamma {params.gamma:g}, content_weight {params.content_weight:g}, tau "
                  f"{params.tau:g}, steps {params.start_percent:g}-{params.end_percent:g}, uncond "
                  f"{params.uncond_mode}; {len(patches)} layers: {lay.format_layers(patches)}")
        routes = _route_summary(patches)
        if routes:
            report += f"; {routes}"
        current = weight_patch_signature(model)
        for name, store in (("content store", content_store), ("style store", style_store)):
            note = None if store is None else weight_patch_note(store.weight_patches, current, f"the {name}")
            if note:
                report += f"; {note} (stored features are projected with this MODEL's weights)"
        return io.NodeOutput(clone, ui=ui.PreviewText(report))


def _route_summary(patches: dict) -> str:
    """Which fused layers run inside another function's attn1 replace (the others stand in for the module)."""
    inside: dict[str, list] = {}
    for key, f in patches.items():
        outer = outer_function(f.previous)
        if outer is not None:
            inside.setdefault(describe_patch(outer), []).append(key)
        elif f.previous is not None:
            inside.setdefault("an earlier Feature Fusion Attention's replace", []).append(key)
    return "; ".join(f"{lay.format_layers(keys)} fused inside {what}" for what, keys in inside.items())


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
                io.Combo.Input("inversion_mode", options=["ddim", "fixed_point"], default="ddim",
                               tooltip="fixed_point: refine_iterations extra calls per step, a more faithful "
                               "inversion."),
                io.Int.Input("refine_iterations", default=0, min=0, max=50),
                io.Combo.Input("store_dtype", options=list(kvs.DTYPES), default="fp16"),
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
        if cfg != 1.0 and negative is None:
            raise NodeInputError(node, "negative", f"cfg is {cfg}: connect a negative conditioning or set cfg to 1")
        params = fusion_params(preset, gamma, content_weight, tau, start_percent, end_percent, uncond, node)
        layer_choice = params.layers_preset if layers == "preset default" else layers
        spec = KVStoreSpec(layers=layer_choice, custom_layers=custom_layers, dtype=store_dtype, device=store_device,
                           budget_mb=float(store_budget_mb), start_percent=params.start_percent,
                           end_percent=params.end_percent, node=node)
        content_px = content_image[..., :3]
        style_px = _style_pixels(style_image[..., :3], content_px.shape[1], content_px.shape[2])
        z_c = check_latent(node, model, {"samples": vae.encode(content_px)}, "content_image")
        z_s = check_latent(node, model, {"samples": vae.encode(style_px)}, "style_image")
        sigmas = schedule(model, scheduler, steps, 1.0)
        inv_pos = positive if inversion_positive is None else inversion_positive

        def invert(z, label, wanted):
            if not wanted and not adain_latent and label == "style":
                return None, None
            run_model, store = spec.begin(model=model, samples=z, sigmas=sigmas, node=node) if wanted else (model, None)
            if store is not None:
                store.label = label
            latent, _, _, outcome = run_inversion(run_model, inv_pos, None, 1.0, z, sigmas, inversion_mode,
                                                  refine_iterations, inv.EDICT_DEFAULT_MIX)
            if store is not None:
                spec.finish(store, node)
            return latent, store

        zt_c, content_store = invert(z_c, "content", params.needs_content)
        zt_s, style_store = invert(z_s, "style", params.needs_style)
        start = ff.adain_latent(zt_c, zt_s) if adain_latent else zt_c
        patched, patches = patch_model(model, params, layers, custom_layers,
                                       content_store if params.needs_content else None, style_store, node)
        sampler = comfy.samplers.KSAMPLER(reverse_sampler_function("ddim", inv.EDICT_DEFAULT_MIX))
        patched, notes = with_run_notes(patched)
        out = guided_run(patched, positive, negative, cfg, start, sampler, inv.inversion_sigmas(sigmas).flip(0))
        image = vae.decode(out)
        if image.ndim == 5:
            image = image.reshape(-1, *image.shape[-3:])
        stores = [s for s in (content_store, style_store) if s is not None]
        report = (f"{params.name}: {len(patches)} layers, {len(sigmas) - 1} steps, {z_c.shape[0]} image(s), style "
                  f"{tuple(z_s.shape[2:])} x {z_s.shape[0]}; " + "; ".join(s.summary() for s in stores)
                  + f"; {time.perf_counter() - started:.1f} s")
        if notes.lines:
            report += "\n" + notes.text("\n")
        return io.NodeOutput(image, {"samples": out}, ui=ui.PreviewText(report))


NODES = [KVFeatureStore, FeatureFusionAttention, AdaINLatent, MagicStylePortrait]
