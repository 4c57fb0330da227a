"""Where a ComfyUI UNet's attention layers are: the one walk over input, middle and output blocks that MagicStyle's
self-attention capture and fusion and MGMICA's cross-attention patch all use, and the layer key of the attention call
an attention patch is running in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..magic_core import ipadapter as ip
from ..magic_core import layers as lay


@dataclass(frozen=True)
class AttentionLayer:
    """One transformer block of a UNet: its attn1 (self-attention) and attn2 (cross-attention)."""

    key: lay.LayerKey  # (block, number, transformer index)
    channels: int  # width of the hidden state entering the block's attentions
    inner_dim: int  # heads * dim_head of q/k/v (attn1 and attn2 share it)
    level: int  # number of 2x downsamplings of the latent grid at this layer
    path: str  # attn1's attribute path from the BaseModel, as ModelPatcher object patches name it
    attn2: torch.nn.Module | None
    context_dim: int | None  # width of the conditioning attn2 reads (768 SD1.5, 2048 SDXL)


def _transformer_blocks(block) -> list:
    out = []
    for layer in block:
        out.extend(getattr(layer, "transformer_blocks", ()))
    return out


def _has(block, name: str) -> bool:
    return any(type(layer).__name__ == name for layer in block)


def unet_attention_layers(model) -> dict[lay.LayerKey, AttentionLayer]:
    """Every attention layer of the MODEL's UNet, in the UNet's order (input, middle, output blocks)."""
    unet = model.model.diffusion_model
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"{type(unet).__name__} is not a UNet with input/middle/output blocks (SD1.5/SDXL)")
    found: dict[lay.LayerKey, AttentionLayer] = {}
    names = {id(module): name for name, module in unet.named_modules()}

    def add(block_name: str, number: int, block, level: int) -> None:
        for index, tb in enumerate(_transformer_blocks(block)):
            to_q = tb.attn1.to_q  # a fusion's stand-in module shares the original's projections
            attn2 = getattr(tb, "attn2", None)
            key = (block_name, number, index)
            found[key] = AttentionLayer(key, int(to_q.in_features), int(to_q.out_features), level,
                                        f"diffusion_model.{names[id(tb)]}.attn1", attn2,
                                        None if attn2 is None else int(attn2.to_k.in_features))

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


def cross_attention_layers(model) -> list[AttentionLayer]:
    """The layers with a cross-attention, in IP-Adapter's order (input, output, middle blocks)."""
    layers = {k: layer for k, layer in unet_attention_layers(model).items() if layer.attn2 is not None}
    return [layers[k] for k in ip.ip_layer_order(layers)]


def layer_key(extra_options: Mapping) -> lay.LayerKey | None:
    """The (block, number, transformer_index) of the attention call an attention patch is running in, from the
    ``extra_options`` ComfyUI passes it (None outside a UNet block)."""
    block = extra_options.get("block")
    if block is None:
        return None
    return (str(block[0]), int(block[1]), int(extra_options.get("block_index", 0)))
