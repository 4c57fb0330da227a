"""The ComfyUI-facing Feature Fusion Attention patch: the objects a fusion node puts on a MODEL clone.

- Where a selected layer's attn1 replace slot is free (the usual case) a ``FusionStandIn`` stands in for the attn1
  module (a ModelPatcher object patch, the same projection children, so weight keys and LoRAs are untouched): it
  fuses from the hidden states, projecting one blended query and the stored states' k/v, never the current pass's
  unused k/v. Where another function already holds the slot, fusion goes into the slot instead and runs inside it:
  the other function runs on inactive steps/branches, and on active ones computes the fused attention from FFA's
  q/k/v (tau folded into q, column weights realised exactly by repeating key/value groups, or refused). Both ways
  run one dispatcher (``LayerFusion._fuse``) over ``magic_core.fusion.plan_fusion``.
- A function set in the slot *after* the node (core Self-Attention Guidance at middle 0, any later
  set_model_attn1_replace) would make ComfyUI skip the stand-in module: the node's OUTER_SAMPLE wrapper
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

import comfy.patcher_extension
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..magic_core import batch_rows as br
from ..magic_core import fusion as ff
from ..magic_core import kv_store as kvs
from ..magic_core import layers as lay
from ..magic_core.sharing import SharedOnCopy
from .common import NodeInputError
from .fingerprint import fingerprint_difference, model_fingerprint, weight_patch_note, weight_patch_signature
from .inversion_sampling import RUN_NOTES_KEY
from .magicstyle_capture import CapturePatch, resolve_model_layers, token_grid

log = logging.getLogger(__name__)

WRAPPER_KEY = "magic_portrait_magicstyle_store_check"

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


class LayerFusion(SharedOnCopy):
    """Feature Fusion Attention for one layer, on active steps; other steps and plain branches run unchanged.

    Two ways in: as an attn1 replace (``__call__``/``qkv`` on ComfyUI's q/k/v, inside another function that holds
    the slot, `previous`) or, when the slot is free, through ``FusionStandIn`` in place of the attn1 module (``hidden``),
    which projects only what fusion reads. Keeps per-run counts (``start_run`` resets them) for the run report.
    """

    def __init__(self, key, attn1, params: ff.FusionParams, content, style, previous, steps, node: str,
                 level: int | None = None):
        self.key, self.attn1, self.params = key, attn1, params
        self.projections = ff.Projections(attn1.to_q, attn1.to_k, attn1.to_v)
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

    def _stored(self, store, sigma, layout: br.BatchRows, dtype, device):
        n = store.get(self.key, sigma, device=device, dtype=dtype)
        if not layout.accepts(n.shape[0]):
            raise kvs.StoreMismatchError(
                f"[{self.node}] a KV store holds {n.shape[0]} images but the sampling batch has {layout.per_chunk}: "
                f"use a batch of {n.shape[0]} or a store of one image (shared by every image)")
        return n

    def _sources(self, sigma, layout: br.BatchRows, dtype, device):
        """(content_n, style_n, style_weight) this call fuses: content [1 or B, tokens, C] or None; style of N images
        one to one (N = B), shared (N = 1) or side by side (other N, weight 1/N)."""
        p = self.params
        content = self._stored(self.content, sigma, layout, dtype, device) if p.needs_content else None
        style, weight = None, 1.0
        if p.needs_style:
            style, weight = ff.style_side_by_side(self.style.get(self.key, sigma, device=device, dtype=dtype),
                                                  layout.per_chunk)
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

    def _begin(self, extra: dict, current: ff.CurrentPass, route):
        """None where fusion is off (inactive step, off-schedule sigma, re-entered from inside); else
        (batch layout, content_n, style_n, style_weight), counted for the run report."""
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
        rows, tokens = current.lead.shape[:2]
        self._check_tokens(tokens, rows)
        layout = br.BatchRows.of(rows, extra.get("cond_or_uncond"))
        self.calls += 1
        self.fused_steps[idx] = self.fused_steps.get(idx, 0) + 1
        label = route() if callable(route) else route
        self.routes[label] = self.routes.get(label, 0) + 1
        return (layout, *self._sources(sigma, layout, current.lead.dtype, current.lead.device))

    def _fuse(self, extra: dict, current: ff.CurrentPass, route, plain, attend):
        """The layer's attention where fusion is on at this call, None where it is off: each part of the batch
        (all rows, or cond and uncond chunks apart) planned by ``ff.plan_fusion``; `plain(part, extra)` computes a
        part that attends plainly, `attend(plan, part, extra)` a fused one."""
        begun = self._begin(extra, current, route)
        if begun is None:
            return None
        layout, content_n, style_n, style_weight = begun
        parts = layout.parts(uncond_apart=self.params.uncond_mode != "fuse")
        outs = []
        for part in parts:
            whole = len(parts) == 1
            sub = extra if whole else {**extra, "cond_or_uncond": list(part.kinds)}
            here = current if whole else current.take(part.rows)
            plan = ff.plan_fusion(self.params, self.projections, here, layout.source_rows(content_n, part.rows),
                                  layout.source_rows(style_n, part.rows), part.branch, style_weight)
            outs.append(plain(here, sub) if plan is None else attend(plan, here, sub))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    # ---------------------------------------------------------------- attn1 replace route
    def __call__(self, q, k, v, extra):
        return self.qkv(q, k, v, extra, self.previous)

    def qkv(self, q, k, v, extra, previous):
        """The layer's attention from ComfyUI's q/k/v, fused on active steps; `previous` (the function holding the
        slot, or None) runs otherwise and, on active steps, computes the fused attention itself from plain q/k/v."""
        outer = outer_function(previous)
        heads = extra["n_heads"]

        def plain(part: ff.CurrentPass, sub: dict):
            return self._plain(part.q, part.k, part.v, sub, previous)

        def attend(plan: ff.FusionInputs, part: ff.CurrentPass, sub: dict):
            if outer is None:
                return plan.attend(heads, _upcast(extra.get("attn_precision"), part.q.dtype))
            fq, fk, fv, exact = plan.as_plain_qkv()
            if not exact:
                raise inexact_error(self, outer, plan.weights)
            self._inside += 1  # the other function may call this fusion again (it chained it): pass through
            try:
                return outer(fq, fk, fv, sub)
            finally:
                self._inside -= 1

        out = self._fuse(extra, ff.CurrentPass(q=q, k=k, v=v),
                         lambda: "attn1 replace" if outer is None else f"inside {describe_patch(outer)}", plain, attend)
        return self._plain(q, k, v, extra, previous) if out is None else out

    # ---------------------------------------------------------------- stand-in module route
    def hidden(self, x, context, value, transformer_options: dict, heads: int):
        """The fused attention (before to_out) from attn1's own inputs, or None on steps where fusion is off."""
        precision = getattr(self.attn1, "attn_precision", None)
        proj = self.projections

        def plain(part: ff.CurrentPass, sub: dict):
            return _default_attention(part.projected_query(proj), part.projected_key(proj),
                                      part.projected_value(proj), {**sub, "n_heads": heads, "attn_precision": precision})

        def attend(plan: ff.FusionInputs, part: ff.CurrentPass, sub: dict):
            return plan.attend(heads, _upcast(precision, part.n.dtype))

        return self._fuse(transformer_options, ff.CurrentPass(n=x, context=context, value=value), "stand-in module",
                          plain, attend)


class ChainedFusion(SharedOnCopy):
    """A fusion put into an attn1 slot that another function took after the fusion was set (found when sampling
    starts): ComfyUI calls this, which fuses inside that function (the fusion's q/k/v route with it as `previous`)."""

    def __init__(self, fusion: LayerFusion, previous):
        self.fusion, self.previous = fusion, previous

    def __call__(self, q, k, v, extra):
        return self.fusion.qkv(q, k, v, extra, self.previous)


def outer_function(fn):
    """The first function in an attn1 slot's chain that is not one of ours (None: only fusions)."""
    while isinstance(fn, (LayerFusion, ChainedFusion)):
        fn = fn.previous
    return fn


def fusions_in_slot(fn) -> list[LayerFusion]:
    out = []
    while isinstance(fn, (LayerFusion, ChainedFusion)):
        out.append(fn if isinstance(fn, LayerFusion) else fn.fusion)
        fn = fn.previous
    return out


def fusions_standing_in(module) -> list[LayerFusion]:
    out = []
    while isinstance(module, FusionStandIn):
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


def inexact_error(fusion: LayerFusion, outer, weights) -> NodeInputError:
    shown = ", ".join(f"{w:g}" for w in weights)
    return NodeInputError(
        fusion.node, "content_weight",
        f"Feature Fusion Attention at {fusion.layer()} runs inside {describe_patch(outer)}, which holds that layer's "
        f"attn1 slot; it hands that function plain q/k/v and realises column weights by repeating key groups, "
        f"which cannot give the weights {shown} (style, content) exactly. Use a content_weight whose ratio to the "
        "style's has a denominator up to 4 (0.25, 0.5, 0.75, 1, 1.5, 2, ...), or remove the other patch from this "
        "MODEL.")


def _check_composable(fusion: LayerFusion, outer, batch: int) -> None:
    if outer is None:
        return
    n_style = fusion.style.batch if fusion.params.needs_style and fusion.style is not None else 1
    style_weight = 1.0 if n_style in (1, batch, None) else 1.0 / n_style
    weights = [w for _, w in ff.column_groups(fusion.params, has_content=fusion.content is not None,
                                              style_weight=style_weight)]
    if weights and ff.plain_repetitions(weights) is None:
        raise inexact_error(fusion, outer, weights)


class FusionStandIn(SharedOnCopy, torch.nn.Module):
    """Stands in for one attn1 module (a ModelPatcher object patch, reverted when another clone loads).

    Its projections are the original module's own children under the same names, so state-dict keys, weight
    patches (LoRA) and casting are untouched; steps where fusion is off run `original`: the attn1 module itself, or
    an earlier Feature Fusion Attention's stand-in on the same layer (fusions on other steps compose this way).
    """

    def __init__(self, fusion: LayerFusion, original: torch.nn.Module):
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


def original_attn1(attn1: torch.nn.Module) -> torch.nn.Module:
    """The UNet's own attn1 module under any fusion stand-ins."""
    while isinstance(attn1, FusionStandIn):
        attn1 = attn1.original
    return attn1


class FusionRunWrapper(SharedOnCopy):
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
        self.evaluated: set[float] = set()  # sigmas the model was called at in this run (EvaluatedSigmas)

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.evaluated = set()
        self._check_stores(latent_image, sigmas)
        guider = getattr(executor, "class_obj", None)
        options = getattr(guider, "model_options", None)
        to = options.setdefault("transformer_options", {}) if isinstance(options, dict) else {}
        others = tuple(describe_patch(p) for p in to.get("patches", {}).get("attn1_patch", [])
                       if not isinstance(p, CapturePatch))
        h, w = int(latent_image.shape[-2]), int(latent_image.shape[-1])
        for f in self.patches.values():
            expected = None if f.level is None else math.prod(token_grid(h, w, f.level))
            f.start_run(expected, others)
        if isinstance(options, dict):
            self._fuse_inside_later_replaces(to, int(latent_image.shape[0]))
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        self._report(sigmas, to.get(RUN_NOTES_KEY))
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
        # the sigmas the model ran at: a sampler may skip some of the schedule (bdia's exact reverse starts from the
        # two top states and never evaluates the top sigma)
        for s in sorted(self.evaluated) or sigmas[:-1]:
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


def _check_store(node: str, name: str, store, model_id: str, layers, steps, n_steps: int | None, preset: str = ""):
    if store is None:
        return
    if not isinstance(store, kvs.KVStore):
        raise NodeInputError(node, name, "expected a MAGIC_KV_STORE: connect DDIM Invert's 'features' output (with "
                             "a KV Feature Store node on its feature_store input)")
    difference = fingerprint_difference(store.model_id, model_id)
    if difference is not None:
        raise NodeInputError(node, name, f"was recorded with {difference}. Stored features fit the checkpoint that "
                             "produced them (weight patches such as LoRAs added later are fine): invert with this "
                             "MODEL's checkpoint")
    if n_steps is not None and store.n_steps != n_steps:
        raise NodeInputError(node, name, f"was recorded on {store.n_steps} steps but the other store on {n_steps}: "
                             "invert both images with the same schedule")
    try:  # a layer or step the store did not keep is refused here, never skipped while sampling
        store.check_covers(layers, steps, fusion=f"Feature Fusion Attention ({node})", hint=(
            f"Give the KV Feature Store layers 'match fusion preset', fusion_preset {preset!r} and start/end percent "
            "-1 (its defaults) to keep exactly what this node fuses, or fuse only what the store kept (this node's "
            "layers and start/end percent)."))
    except kvs.StoreCoverageError as err:
        raise NodeInputError(node, name, str(err)) from None
    if store.missing():
        raise NodeInputError(node, name, "is incomplete (the inversion that filled it did not finish)")


def _overlapping(a: list[float], b: list[float]) -> list[float]:
    return [s for s in a if any(kvs.sigma_close(s, t) for t in b)]


def patch_model(model, params: ff.FusionParams, layers_choice: str, custom_layers: str, content_store, style_store,
                node: str):
    """A clone of `model` with Feature Fusion Attention; returns (clone, {layer: LayerFusion}).

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
    model_id = model_fingerprint(model)
    n_steps = None
    for name, store in (("content_store", content), ("style_store", style)):
        _check_store(node, name, store, model_id, keys, steps, n_steps, params.name)
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
        patch = LayerFusion(key, original_attn1(current), params, content, style, holder, steps, node,
                            level=layers[key].level)
        if holder is None:
            clone.add_object_patch(path, FusionStandIn(patch, current))
        else:  # another function owns the slot: fuse inside it (ComfyUI would skip the module)
            _check_composable(patch, outer_function(holder), batch)
            patch.previous_slot = where
            clone.set_model_attn1_replace(patch, key[0], key[1], key[2])
        patches[key] = patch
    stores = [(name, s) for name, s in (("content_store", content), ("style_store", style)) if s is not None]
    run = FusionRunWrapper(stores, node, patches, params)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, run)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, EvaluatedSigmas(run))
    return clone, patches


class EvaluatedSigmas(SharedOnCopy):
    """APPLY_MODEL wrapper: notes each sigma the model runs at for the run's report (a chained wrapper list, never
    a slot)."""

    def __init__(self, run: FusionRunWrapper):
        self.run = run

    def __call__(self, executor, x, t, *args, **kwargs):
        self.run.evaluated.update(float(v) for v in t.detach().flatten().unique().cpu())
        return executor(x, t, *args, **kwargs)


def describe_fusion(params: ff.FusionParams, patches: dict, model, content_store, style_store) -> str:
    """The Feature Fusion Attention node's text: its settings and layers, the layers that run inside another
    function's attn1 replace, and weight patches of `model` that differ from the stores' recordings."""
    report = (f"{params.name}: gamma {params.gamma:g}, content_weight {params.content_weight:g}, tau "
              f"{params.tau:g}, steps {params.start_percent:g}-{params.end_percent:g}, uncond "
              f"{params.uncond_mode}; {len(patches)} layers: {lay.format_layers(patches)}")
    inside: dict[str, list] = {}
    for key, f in patches.items():
        outer = outer_function(f.previous)
        if outer is not None:
            inside.setdefault(describe_patch(outer), []).append(key)
        elif f.previous is not None:
            inside.setdefault("an earlier Feature Fusion Attention's replace", []).append(key)
    if inside:
        report += "; " + "; ".join(f"{lay.format_layers(keys)} fused inside {what}" for what, keys in inside.items())
    current = weight_patch_signature(model)
    for name, store in (("content store", content_store), ("style store", style_store)):
        note = None if store is None else weight_patch_note(store.weight_patches, current, f"the {name}")
        if note:
            report += f"; {note} (stored features are projected with this MODEL's weights)"
    return report
