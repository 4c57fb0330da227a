"""MGMICA: MagicID's mask-guided multi-ID cross-attention, the maths of one cross-attention layer.

For a layer with query ``Q`` (``[rows, L, heads*dim]``), N identities with key/value tokens ``K_i, V_i`` (their ID
tokens through the layer's ``to_k_ip``/``to_v_ip``), weights ``w_i`` and region masks ``M_i`` on the layer's token
grid::

    Z = Attn(Q, K_txt, V_txt) + sum_i w_i * M_i * Attn(Q, K_i, V_i)

This module computes the sum (the identity term); the caller adds it to the text attention (through the layer's
output projection). Each identity attends only over its own tokens (its own softmax), so identities never compete for
attention mass; tokens outside every mask get no identity term at all, and work is only done on the tokens inside an
identity's region.

- Regions: a MASK or a box brought to each layer's token grid by ``magic_core.regions`` (any aspect ratio).
- Overlaps (``resolve_overlaps``): ``exclusive`` (default) gives each token to the identity whose mask is largest there
  (ties: the lower index) so a token belongs to at most one identity; ``weighted`` lets overlaps add up;
  ``normalized`` divides by the sum of the masks where it exceeds 1.

This module does not import ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OVERLAP_MODES = ("exclusive", "weighted", "normalized")


def resolve_overlaps(masks: torch.Tensor, mode: str = "exclusive") -> torch.Tensor:
    """masks [N, B, L] in [0, 1] -> the masks each identity's term is weighted with, same shape."""
    if mode not in OVERLAP_MODES:
        raise ValueError(f"overlap mode {mode!r}: choose one of {', '.join(OVERLAP_MODES)}")
    if mode == "weighted" or masks.shape[0] <= 1:
        return masks
    if mode == "normalized":
        total = masks.sum(dim=0, keepdim=True)
        return masks / total.clamp(min=1.0)
    # exclusive: argmax keeps the first of equal values, so ties go to the lower index
    winner = masks.argmax(dim=0, keepdim=True)
    keep = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1) == winner
    return masks * keep


def grid_for_tokens(tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """(h, w) of the token grid with `tokens` cells: the latent downsampled by stride-2 convs (ceil at odd sizes)."""
    h, w = int(latent_h), int(latent_w)
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens are not a downsampled {latent_h}x{latent_w} latent grid")
    return h, w


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Softmax attention of q [r, L, heads*d] over k/v [r or 1, T, heads*d] -> [r, L, heads*d] (torch SDPA)."""
    r, length, inner = q.shape
    d = inner // heads
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if k.shape[0] != r:
        k, v = k.expand(r, -1, -1), v.expand(r, -1, -1)
    qh = q.view(r, length, heads, d).transpose(1, 2)
    kh = k.reshape(r, -1, heads, d).transpose(1, 2)
    vh = v.reshape(r, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(r, length, inner).to(out_dtype)


@dataclass(frozen=True)
class IdentityTerm:
    """One identity at one layer: its keys/values [1 or rows, T, inner], its mask on the grid [1 or rows, L] (already
    overlap-resolved) and its weight (identity weight x layer weight)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    weight: float


# Above this share of the tokens, gathering rows costs more than attending with every token.
DENSE_SHARE = 0.6


def identity_attention(q: torch.Tensor, terms: Sequence[IdentityTerm], heads: int, upcast: bool = False
                       ) -> torch.Tensor | None:
    """sum_i w_i * M_i * Attn(q, K_i, V_i) [rows, L, inner], computed only on the tokens inside each mask;
    None when no identity touches a token (the caller then adds nothing)."""
    rows, length, _ = q.shape
    out = None
    for term in terms:
        if term.weight == 0:
            continue
        mask = term.mask.to(device=q.device, dtype=torch.float32)
        inside = mask.gt(0).any(dim=0)  # tokens some row of this identity's region touches
        count = int(inside.sum())
        if count == 0:
            continue
        if out is None:
            out = torch.zeros_like(q, dtype=torch.float32)
        if count >= DENSE_SHARE * length:
            scale = (term.weight * mask).expand(rows, length).unsqueeze(-1)
            out += scale * attend(q, term.k, term.v, heads, upcast).float()
        else:
            index = inside.nonzero().squeeze(1)
            part = attend(q.index_select(1, index), term.k, term.v, heads, upcast).float()
            scale = (term.weight * mask.index_select(1, index)).expand(rows, count).unsqueeze(-1)
            out.index_add_(1, index, scale * part)
    return None if out is None else out.to(q.dtype)
