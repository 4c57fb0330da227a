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
class TokenPlan:
    """Which tokens of a layer's grid get an identity term and from which identity, built once per grid, batch
    layout and set of active identities (masks and weights do not change during a run).

    ``union`` are the tokens some identity touches (ascending). Each (token, identity) pair with a non-zero mask has
    its token's position in ``union`` (``pair_pos``) and, per picture of the batch, its weight times mask value
    (``scale`` [B, P]); pairs are grouped by identity, identity i's being ``pairs[segments[i][0]:segments[i][1]]``,
    so each identity attends in one call over its own tokens without any attention mask. With exclusive overlaps
    there is one pair per touched token."""

    tokens: int
    union: torch.Tensor
    pair_pos: torch.Tensor
    segments: tuple[tuple[int, int], ...]
    scale: torch.Tensor

    @property
    def all_tokens(self) -> bool:
        return int(self.union.numel()) == self.tokens

    @property
    def in_union_order(self) -> bool:
        """The pairs are the union's tokens in order (one identity, or none overlapping out of order)."""
        return int(self.pair_pos.numel()) == int(self.union.numel()) and bool(
            torch.equal(self.pair_pos, torch.arange(self.pair_pos.numel(), device=self.pair_pos.device)))


def plan_tokens(masks: torch.Tensor, weights: Sequence[float]) -> TokenPlan | None:
    """masks [N, B, L] (overlaps already resolved) and one weight per identity -> the TokenPlan, or None when no
    identity touches a token."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
    scaled = masks.float() * w.view(-1, 1, 1)
    touched = scaled.ne(0).any(dim=1)  # [N, L]
    pairs = touched.nonzero()  # (identity, token), grouped by identity, tokens ascending
    if pairs.numel() == 0:
        return None
    owner, token = pairs[:, 0], pairs[:, 1]
    union = torch.unique(token)
    pair_pos = torch.searchsorted(union, token)
    counts = torch.bincount(owner, minlength=masks.shape[0]).tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    segments = tuple((bounds[i], bounds[i + 1]) for i in range(len(counts)))
    scale = scaled[owner, :, token].t().contiguous()  # [B, P]
    return TokenPlan(int(masks.shape[-1]), union, pair_pos, segments, scale)


def planned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, row_scale: torch.Tensor,
                      key_segments: Sequence[tuple[int, int]], heads: int, upcast: bool = False) -> torch.Tensor:
    """sum_i w_i * M_i * Attn(Q, K_i, V_i) on the plan's tokens, [rows, U, inner].

    q [rows, U, inner]: the queries of ``plan.union``; k, v [1 or rows, K, inner]: every active identity's keys and
    values side by side, identity i's at ``key_segments[i]``; row_scale [rows, P]. One attention call per identity on
    its own pairs and keys (no attention mask, which would push torch onto a slower kernel)."""
    rows, _, inner = q.shape
    ordered = plan.in_union_order
    qp = q if ordered else q.index_select(1, plan.pair_pos)
    out = torch.empty(rows, qp.shape[1], inner, dtype=q.dtype, device=q.device)
    for (start, end), (k_start, k_end) in zip(plan.segments, key_segments, strict=True):
        if end > start:
            out[:, start:end] = attend(qp[:, start:end], k[:, k_start:k_end], v[:, k_start:k_end], heads, upcast)
    out = out.float() * row_scale.to(out.device).unsqueeze(-1)
    if not ordered:
        out = torch.zeros(rows, plan.union.numel(), inner, device=out.device).index_add_(1, plan.pair_pos, out)
    return out.to(q.dtype)


# How the unconditional rows of a cfg batch get identity attention: through each identity's negative tokens (what
# IP-Adapter does), not at all, or through the positive tokens like the conditional rows.
UNCOND_MODES = ("negative tokens", "none", "positive tokens")


def _check_uncond(uncond: str) -> None:
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond {uncond!r}: choose one of {', '.join(UNCOND_MODES)}")


def chunk_row_scale(scale: torch.Tensor, cond_or_uncond: Sequence[int], uncond: str) -> torch.Tensor:
    """Each row's weight x mask per (token, identity) pair for the batch ComfyUI assembles: one chunk of ``b`` rows
    (the pictures) per entry of ``cond_or_uncond`` (0 conditional, 1 unconditional), in that order. ``scale`` [b, P]
    is the pictures' (TokenPlan.scale); ``uncond="none"`` zeroes the unconditional chunks. Returns [len(cou) * b, P]."""
    _check_uncond(uncond)
    keep = torch.tensor([0.0 if c == 1 and uncond == "none" else 1.0 for c in cond_or_uncond], dtype=scale.dtype,
                        device=scale.device)
    return scale.repeat(len(cond_or_uncond), 1) * keep.repeat_interleave(scale.shape[0]).view(-1, 1)


def chunk_keys_values(k_pos: torch.Tensor, v_pos: torch.Tensor, k_neg: torch.Tensor, v_neg: torch.Tensor,
                      cond_or_uncond: Sequence[int], b: int, uncond: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One identity's keys and values [1 or len(cou) * b, T, inner] for that batch: with ``"negative tokens"`` the
    unconditional chunks attend to the negative tokens and the conditional ones to the positive tokens (one row per
    picture); otherwise every row uses the positive tokens (one shared row; "none" zeroes the unconditional rows'
    term through chunk_row_scale instead)."""
    _check_uncond(uncond)
    if uncond == "negative tokens" and any(c == 1 for c in cond_or_uncond):
        k = torch.cat([(k_neg if c == 1 else k_pos).expand(b, -1, -1) for c in cond_or_uncond])
        v = torch.cat([(v_neg if c == 1 else v_pos).expand(b, -1, -1) for c in cond_or_uncond])
        return k, v
    return k_pos, v_pos


def key_segments(token_counts: Sequence[int]) -> list[tuple[int, int]]:
    """Where each identity's keys sit when their token sets are laid side by side."""
    out, start = [], 0
    for count in token_counts:
        out.append((start, start + int(count)))
        start += int(count)
    return out
