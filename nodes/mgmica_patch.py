"""The ComfyUI-facing MGMICA patch: N identities in every cross-attention layer, in one patch.

It never takes the attn2 replace slot, which another pack's IP-Adapter or a core node may hold or set later (and
``set_model_attn2_replace`` would overwrite). It is a pair of list patches, which ComfyUI appends and never drops:

- ``attn2_patch`` (``capture``): keeps the normalised hidden state entering attn2, unchanged;
- ``attn2_output_patch`` (``__call__``): adds ``to_out(sum_i w_i * M_i * Attn(Q, K_i, V_i))`` without to_out's bias
  (to_out is affine, so this equals putting the identity term inside attn2's own output), with
  ``Q = attn2.to_q(n)`` (the layer's own projection, LoRAs included) and ``K_i, V_i`` the identity's ID tokens
  through the layer's ``to_k_ip`` / ``to_v_ip`` of its IP-Adapter.

Whatever computes attn2 itself (ComfyUI, another pack's replace, a later MGMICA node) runs unchanged, and the identity
term is added after it: both run, in either order of the nodes, and several MGMICA nodes add up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from comfy.ldm.modules import attention as comfy_attention

from ..magic_core import layers as lay
from ..magic_core import mgmica
from ..magic_core import regions as reg

log = logging.getLogger(__name__)
BLOCK_ORDER = {"input": 0, "output": 1, "middle": 2}  # IP-Adapter numbers cross-attention layers in this order
UNCOND_MODES = ("negative tokens", "none", "positive tokens")


@dataclass(frozen=True)
class CrossAttnLayer:
    key: lay.LayerKey
    attn2: torch.nn.Module
    inner_dim: int
    context_dim: int


def cross_attention_layers(model) -> list[CrossAttnLayer]:
    """Every cross-attention layer of a UNet, in IP-Adapter's order (input, output, middle blocks)."""
    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"{type(unet).__name__} is not a UNet with input/middle/output blocks (SD1.5/SDXL)")
    found = []
    for block_name, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks),
                               ("middle", [unet.middle_block])):
        for number, block in enumerate(blocks):
            index = 0
            for layer in block:
                for tb in getattr(layer, "transformer_blocks", ()):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is not None:
                        found.append(CrossAttnLayer((block_name, number, index), attn2, int(attn2.to_q.out_features),
                                                    int(attn2.to_k.in_features)))
                    index += 1
    return found


@dataclass(frozen=True)
class PatchIdentity:
    """One identity as the patch uses it: per patched layer, keys/values of its positive and negative tokens."""

    label: str
    kv: dict  # layer key -> (k_pos, v_pos, k_neg, v_neg), each [1, T, inner] float32 on CPU
    region: torch.Tensor | reg.Box  # MASK [B, H, W] or a box
    weight: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float


class MultiIDAttention:
    """The patch (see module docstring). ``calls[layer]`` counts the calls that added an identity term."""

    def __init__(self, identities: list[PatchIdentity], layers: dict[lay.LayerKey, CrossAttnLayer],
                 layer_weights: dict[lay.LayerKey, float], overlap: str, uncond: str, node: str):
        self.identities, self.layers, self.layer_weights = identities, layers, layer_weights
        self.overlap, self.uncond, self.node = overlap, uncond, node
        self.calls: dict[lay.LayerKey, int] = {}
        self._captured: tuple | None = None  # (layer key, n) of the attn2 call in progress
        self._grid_cache: dict = {}
        self._kv_cache: dict = {}

    # ----- the two list patches -------------------------------------------------------------------------------------
    def capture(self, n, context_attn2, value_attn2, extra_options):
        key = lay.layer_key(extra_options)
        self._captured = (key, n) if key in self.layers else None
        return n, context_attn2, value_attn2

    def __call__(self, n, extra_options):
        captured, self._captured = self._captured, None
        key = lay.layer_key(extra_options)
        if captured is None or captured[0] != key or self.layer_weights.get(key, 0.0) == 0.0:
            return n
        hidden = captured[1]
        terms = self._terms(key, hidden, extra_options)
        if not terms:
            return n
        layer = self.layers[key]
        q = layer.attn2.to_q(hidden)
        upcast = comfy_attention.get_attn_precision(extra_options.get("attn_precision"), q.dtype) == torch.float32
        z = mgmica.identity_attention(q, terms, int(extra_options["n_heads"]), upcast)
        if z is None:
            return n
        self.calls[key] = self.calls.get(key, 0) + 1
        to_out = layer.attn2.to_out[0]
        # to_out(z) without its bias: the zero row gives exactly the bias the module adds (patched and cast alike)
        return n + (to_out(z) - to_out(torch.zeros_like(z[:, :1])))

    # ----- per call -----------------------------------------------------------------------------------------------
    def _terms(self, key, hidden, extra) -> list[mgmica.IdentityTerm]:
        sigma = extra.get("sigmas")
        sigma = None if sigma is None else float(sigma.reshape(-1)[0])
        active = [i for i, ident in enumerate(self.identities)
                  if ident.weight != 0 and (sigma is None or ident.sigma_end <= sigma <= ident.sigma_start)]
        if not active:
            return []
        rows, tokens = hidden.shape[0], hidden.shape[1]
        cou = list(extra.get("cond_or_uncond") or [0])
        if rows % len(cou):
            raise ValueError(f"[{self.node}] {rows} rows do not split into {len(cou)} cond/uncond chunks")
        b = rows // len(cou)
        grid = self._grid(extra, tokens)
        masks = self._masks(grid, tuple(extra["original_shape"][-2:]), b)  # [N, b, L] resolved
        keep_rows = torch.tensor([c != 1 or self.uncond != "none" for c in cou], dtype=torch.float32)
        row_scale = keep_rows.repeat_interleave(b).view(rows, 1)
        terms = []
        for i in active:
            ident = self.identities[i]
            k, v = self._kv(key, i, cou, b, hidden)
            mask = masks[i].repeat(len(cou), 1) * row_scale.to(masks.device)
            terms.append(mgmica.IdentityTerm(k, v, mask, ident.weight * self.layer_weights[key]))
        return terms

    def _grid(self, extra, tokens: int) -> tuple[int, int]:
        shape = extra.get("activations_shape")
        if shape is not None and int(shape[-2]) * int(shape[-1]) == tokens:
            return int(shape[-2]), int(shape[-1])
        lat_h, lat_w = extra["original_shape"][-2:]
        return mgmica.grid_for_tokens(tokens, int(lat_h), int(lat_w))

    def _masks(self, grid: tuple[int, int], latent_hw: tuple[int, int], b: int) -> torch.Tensor:
        cache_key = (grid, latent_hw, b)
        cached = self._grid_cache.get(cache_key)
        if cached is not None:
            return cached
        per_identity = []
        for ident in self.identities:
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

    def _kv(self, key, i: int, cou: list, b: int, like: torch.Tensor):
        """Keys/values of identity i at this layer for the chunks of this call: [1 or rows, T, inner]."""
        cache_key = (key, i, tuple(cou), b, like.device, like.dtype)
        cached = self._kv_cache.get(cache_key)
        if cached is not None:
            return cached
        k_pos, v_pos, k_neg, v_neg = (t.to(device=like.device, dtype=like.dtype)
                                      for t in self.identities[i].kv[key])
        if all(c != 1 for c in cou) or self.uncond != "negative tokens":
            out = (k_pos, v_pos)  # uncond rows use the positive tokens, or are masked out ("none")
        else:
            ks = [k_neg if c == 1 else k_pos for c in cou]
            vs = [v_neg if c == 1 else v_pos for c in cou]
            out = (torch.cat([k.expand(b, -1, -1) for k in ks]), torch.cat([v.expand(b, -1, -1) for v in vs]))
        self._kv_cache[cache_key] = out
        return out

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def check_mask_aspect(mask: torch.Tensor, latent_hw: tuple[int, int], node: str, label: str) -> None:
    (mh, mw), (lh, lw) = mask.shape[-2:], latent_hw
    # a latent is the picture / 8 rounded: allow that rounding, refuse a real mismatch
    if abs((mw / mh) / (lw / lh) - 1) > max(0.01, 1.0 / min(lh, lw)):
        raise ValueError(f"[{node}] identity '{label}': its region mask is {mw}x{mh} but the picture being sampled is "
                         f"{lw * 8}x{lh * 8} (latent {lw}x{lh}): the aspect ratios differ, so the region would land "
                         "elsewhere. Make the mask at the picture's size, or give the region as a box")
