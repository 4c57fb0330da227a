"""The ComfyUI-facing MGMICA patch: N identities in every cross-attention layer, in one patch.

It never takes the attn2 replace slot, which another pack's IP-Adapter or a core node may hold or set later (and
``set_model_attn2_replace`` would overwrite). It is a pair of list patches, which ComfyUI appends and never drops:

- ``attn2_patch`` (``capture``): keeps the normalised hidden state entering attn2, unchanged;
- ``attn2_output_patch`` (``__call__``): adds ``to_out(sum_i w_i * M_i * Attn(Q, K_i, V_i))`` without to_out's bias
  (to_out is affine, so this equals putting the identity term inside attn2's own output), with
  ``Q = attn2.to_q(n)`` (the layer's own projection, LoRAs included) and ``K_i, V_i`` the identity's ID tokens
  through the layer's ``to_k_ip`` / ``to_v_ip`` of its IP-Adapter. Queries, attention and the output projection
  run only on the tokens some identity's region touches (``magic_core.mgmica.TokenPlan``, cached per grid).

Whatever computes attn2 itself (ComfyUI, another pack's replace, a later MGMICA node) runs unchanged, and the identity
term is added after it: both run, in either order of the nodes, and several MGMICA nodes add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..magic_core import ipadapter as ip
from ..magic_core import layers as lay
from ..magic_core import mgmica
from ..magic_core import regions as reg
from ..magic_core.sharing import SharedOnCopy
from .common import NodeInputError, layer_family, model_family
from .unet_layers import AttentionLayer, cross_attention_layers, layer_key

UNCOND_MODES = mgmica.UNCOND_MODES


@dataclass(frozen=True)
class PatchIdentity:
    """One identity as the patch uses it: per patched layer, keys/values of its positive and negative tokens."""

    label: str
    kv: dict  # layer key -> (k_pos, v_pos, k_neg, v_neg), each [1, T, inner] float32 on CPU
    region: torch.Tensor | reg.Box  # MASK [B, H, W] or a box
    weight: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float


class MultiIDAttention(SharedOnCopy):
    """The patch (see module docstring). ``calls[layer]`` counts the calls that added an identity term."""

    def __init__(self, identities: list[PatchIdentity], layers: dict[lay.LayerKey, AttentionLayer],
                 layer_weights: dict[lay.LayerKey, float], overlap: str, uncond: str, node: str):
        self.identities, self.layers, self.layer_weights = identities, layers, layer_weights
        self.overlap, self.uncond, self.node = overlap, uncond, node
        self.calls: dict[lay.LayerKey, int] = {}
        self._captured: tuple | None = None  # (layer key, n) of the attn2 call in progress
        self._grid_cache: dict = {}
        self._plan_cache: dict = {}
        self._kv_cache: dict = {}

    # ----- the two list patches -------------------------------------------------------------------------------------
    def capture(self, n, context_attn2, value_attn2, extra_options):
        key = layer_key(extra_options)
        self._captured = (key, n) if key in self.layers else None
        return n, context_attn2, value_attn2

    def __call__(self, n, extra_options):
        captured, self._captured = self._captured, None
        key = layer_key(extra_options)
        layer_weight = self.layer_weights.get(key, 0.0)
        if captured is None or captured[0] != key or layer_weight == 0.0:
            return n
        hidden = captured[1]
        active = self._active(extra_options)
        if not active:
            return n
        rows, tokens = hidden.shape[0], hidden.shape[1]
        cou = tuple(extra_options.get("cond_or_uncond") or [0])
        if rows % len(cou):
            raise ValueError(f"[{self.node}] {rows} rows do not split into {len(cou)} cond/uncond chunks")
        b = rows // len(cou)
        grid = self._grid(extra_options, tokens)
        planned = self._plan(grid, tuple(int(v) for v in extra_options["original_shape"][-2:]), b, cou, active,
                             hidden.device)
        if planned is None:
            return n
        plan, row_scale, segments = planned
        layer = self.layers[key]
        union = None if plan.all_tokens else plan.union
        q = layer.attn2.to_q(hidden if union is None else hidden.index_select(1, union))
        k, v = self._kv(key, active, cou, b, q)
        upcast = comfy_attention.get_attn_precision(extra_options.get("attn_precision"), q.dtype) == torch.float32
        z = mgmica.planned_attention(q, k, v, plan, row_scale, segments, int(extra_options["n_heads"]), upcast)
        if layer_weight != 1.0:
            z = z * layer_weight
        self.calls[key] = self.calls.get(key, 0) + 1
        to_out = layer.attn2.to_out[0]
        # to_out(z) without its bias: the zero row gives exactly the bias the module adds (patched and cast alike)
        delta = (to_out(z) - to_out(torch.zeros_like(z[:, :1]))).to(n.dtype)
        return n + delta if union is None else n.index_add(1, union, delta)

    # ----- per call -----------------------------------------------------------------------------------------------
    def _active(self, extra) -> tuple[int, ...]:
        sigma = extra.get("sigmas")
        sigma = None if sigma is None else float(sigma.reshape(-1)[0])
        return tuple(i for i, ident in enumerate(self.identities)
                     if ident.weight != 0 and (sigma is None or ident.sigma_end <= sigma <= ident.sigma_start))

    def _grid(self, extra, tokens: int) -> tuple[int, int]:
        shape = extra.get("activations_shape")
        if shape is not None and int(shape[-2]) * int(shape[-1]) == tokens:
            return int(shape[-2]), int(shape[-1])
        lat_h, lat_w = extra["original_shape"][-2:]
        return mgmica.grid_for_tokens(tokens, int(lat_h), int(lat_w))

    def _plan(self, grid, latent_hw, b: int, cou: tuple, active: tuple, device):
        """(TokenPlan, row scale [rows, P], each identity's key segment) of the active identities on this grid, or
        None; cached per layout."""
        cache_key = (grid, latent_hw, b, cou, active, device)
        if cache_key in self._plan_cache:
            return self._plan_cache[cache_key]
        masks = self._masks(grid, latent_hw, b)[list(active)]  # [N_active, b, L], overlaps resolved over all
        plan = mgmica.plan_tokens(masks, [self.identities[i].weight for i in active])
        planned = None
        if plan is not None:
            row_scale = mgmica.chunk_row_scale(plan.scale, cou, self.uncond)
            plan = mgmica.TokenPlan(plan.tokens, plan.union.to(device), plan.pair_pos.to(device), plan.segments,
                                    plan.scale)
            tokens = [next(iter(self.identities[i].kv.values()))[0].shape[1] for i in active]
            planned = (plan, row_scale.to(device), mgmica.key_segments(tokens))
        if len(self._plan_cache) > 64:
            self._plan_cache.clear()
        self._plan_cache[cache_key] = planned
        return planned

    def _masks(self, grid: tuple[int, int], latent_hw: tuple[int, int], b: int) -> torch.Tensor:
        """Every identity's region on the grid, overlaps resolved: [N, b, L]."""
        cache_key = (grid, latent_hw, b)
        cached = self._grid_cache.get(cache_key)
        if cached is not None:
            return cached
        per_identity = []
        for ident in self.identities:
            if ident.weight == 0:  # claims no token, so an overlapping identity keeps them
                per_identity.append(torch.zeros(b, grid[0] * grid[1]))
                continue
            if isinstance(ident.region, reg.Box):
                m = reg.box_on_grid(ident.region, *grid)
            else:
                check_mask_aspect(ident.region, latent_hw, self.node, ident.label)
                m = reg.mask_on_grid(ident.region, *grid, *latent_hw)
            if m.shape[0] not in (1, b):
                raise ValueError(f"[{self.node}] identity '{ident.label}': its region mask has a batch of "
                                 f"{m.shape[0]} but the sampled batch is {b}: use one mask (shared) or one per image")
            per_identity.append(m.expand(b, -1))
        resolved = mgmica.resolve_overlaps(torch.stack(per_identity), self.overlap)
        if len(self._grid_cache) > 64:
            self._grid_cache.clear()
        self._grid_cache[cache_key] = resolved
        return resolved

    def _kv(self, key, active: tuple, cou: tuple, b: int, like: torch.Tensor):
        """Keys, values [1 or rows, K, inner] of the active identities at this layer side by side (identity order)."""
        cache_key = (key, active, cou, b, like.device, like.dtype)
        cached = self._kv_cache.get(cache_key)
        if cached is not None:
            return cached
        ks, vs = [], []
        for i in active:
            k, v = mgmica.chunk_keys_values(*(t.to(device=like.device, dtype=like.dtype)
                                              for t in self.identities[i].kv[key]), cou, b, self.uncond)
            ks.append(k)
            vs.append(v)
        out = (torch.cat(ks, dim=1), torch.cat(vs, dim=1))
        if len(self._kv_cache) > 512:
            self._kv_cache.clear()
        self._kv_cache[cache_key] = out
        return out


def check_mask_aspect(mask: torch.Tensor, latent_hw: tuple[int, int], node: str, label: str) -> None:
    (mh, mw), (lh, lw) = mask.shape[-2:], latent_hw
    if not reg.aspects_match((mh, mw), (lh, lw)):  # a latent is the picture / 8 rounded: aspects_match allows that
        raise ValueError(f"[{node}] identity '{label}': its region mask is {mw}x{mh} but the picture being sampled is "
                         f"{lw * 8}x{lh * 8} (latent {lw}x{lh}): the aspect ratios differ, so the region would land "
                         "elsewhere. Make the mask at the picture's size, or give the region as a box")


@dataclass(frozen=True, eq=False)
class IDEmbeds(SharedOnCopy):
    """One identity's ID tokens (MAGIC_ID_EMBEDS): positive and negative [1, T, cross_dim] float32 on the CPU."""

    adapter: ip.IPAdapterFile
    positive: torch.Tensor
    negative: torch.Tensor
    label: str
    face_embedding: np.ndarray | None = None  # the references' mean face embedding (L2-normalised), when known
    embedding_kind: str | None = None  # its kind (faces.ARCFACE_512, faces.DLIB_128, ...)


@dataclass(frozen=True, eq=False)
class Identity(SharedOnCopy):
    """One entry of MAGIC_IDENTITIES: ID tokens, a region (MASK [B, H, W] or a box), weight and step range."""

    embeds: IDEmbeds
    region: torch.Tensor | reg.Box
    weight: float
    start_percent: float
    end_percent: float
    label: str


def apply_mgmica(model, identities, weight: float, overlap: str, uncond: str, layer_weights: str, node: str):
    """A clone of `model` carrying one MultiIDAttention patch; returns (clone, patch)."""
    if not identities:
        raise NodeInputError(node, "identities", "the identity list is empty: connect Add Identity")
    if any(not isinstance(i, Identity) for i in identities):
        raise NodeInputError(node, "identities", "expected MAGIC_IDENTITIES from Add Identity")
    layers = cross_attention_layers(model)
    by_key = {layer.key: layer for layer in layers}
    family = layer_family(model, node)
    try:
        per_layer = lay.parse_layer_weights(layer_weights, family, lay.depths_of(by_key))
    except lay.LayerSpecError as err:
        raise NodeInputError(node, "layer_weights", str(err)) from None
    sampling = model.get_model_object("model_sampling")
    patch_identities = []
    for ident in identities:
        adapter = ident.embeds.adapter
        try:
            ip.check_family(adapter, model_family(model), cross_dim=layers[0].context_dim)
            mapping = ip.map_layers(adapter, {k: layer.inner_dim for k, layer in by_key.items()})
        except ip.IPAdapterError as err:
            raise NodeInputError(node, "model", f"identity '{ident.label}' ({adapter.name}): {err}") from None
        weights = adapter.layer_weights()
        kv = {}
        for key, n in mapping.items():
            if per_layer.get(key, 0.0) == 0.0:
                continue
            wk, wv = (w.float() for w in weights[n])
            pos, neg = ident.embeds.positive, ident.embeds.negative
            kv[key] = (pos @ wk.T, pos @ wv.T, neg @ wk.T, neg @ wv.T)
        patch_identities.append(PatchIdentity(
            ident.label, kv, ident.region, ident.weight * float(weight),
            float(sampling.percent_to_sigma(ident.start_percent)), float(sampling.percent_to_sigma(ident.end_percent))))
    patch = MultiIDAttention(patch_identities, by_key, per_layer, overlap, uncond, node)
    clone = model.clone()
    clone.set_model_attn2_patch(patch.capture)
    clone.set_model_attn2_output_patch(patch)
    return clone, patch
