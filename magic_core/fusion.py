"""Feature Fusion Attention (MagicStyle's FFA) and the related self-attention controls, as plain tensor maths.

One API computes every fusion: ``plan_fusion`` builds the ``FusionInputs`` of one batch part (the query and the
key/value column groups with their weights), ``FusionInputs.attend`` computes them, ``FusionInputs.as_plain_qkv``
re-expresses them as plain q/k/v for another attention function to compute. The definitions:

- **query preservation**: ``Q = gamma * Q_c + (1 - gamma) * Q_x``.
- **keys/values**: ``K = [K_s ; K_c (; K_x)]``, ``V = [V_s ; V_c (; V_x)]``; each column group has a weight that
  multiplies its unnormalised attention: ``log(weight)`` is added to its logits. The content group weighs
  **content_weight** w_c (w_c = 2 is exactly the content keys/values duplicated; w_c = 0 leaves them out, never a
  -inf logit); the style group 1 (1/N for N style images side by side); the current pass's own group 1.
- **tau** multiplies the logits: ``softmax(tau * q.k / sqrt(d) + log_bias) v``; tau 1 is plain attention and
  ``attention(q, k, v, tau=2)`` equals ``attention(2 * q, k, v)``. The log-bias is added after the temperature, so
  a column weight stays a pure weight.
- StyleAligned's **AdaIN of Q and K** toward the style's statistics, per feature over tokens, before attending.

Tensors use ComfyUI's layout, ``[B, tokens, heads * dim_head]`` with heads not split, and results are the attention
output before ``to_out``, like ComfyUI's ``optimized_attention``. Stored sources are the hidden states ``n`` a KV
store keeps, projected here with the layer's own projections; their batch is 1 (shared by every image) or the
current batch (``batch_rows.BatchRows`` maps a CFG batch's rows onto them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kv_store import percent_steps

UNCOND_MODES = ("fuse", "plain", "style_only")


# --------------------------------------------------------------------------------------------------- attention
def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    if inner % heads:
        raise ValueError(f"inner dim {inner} is not divisible by {heads} heads")
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)


def _to_batch(t: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}; expected 1 (shared) or {b} (one per image)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              log_bias: torch.Tensor | None = None, tau: float = 1.0, upcast: bool = False) -> torch.Tensor:
    """softmax(tau * q.k / sqrt(dim_head) + log_bias) v per head, on [B, tokens, heads*dim] tensors.

    k and v may have batch 1 (broadcast). `log_bias` ([keys]) is an additive logit bias per key column. `upcast`:
    compute in float32 and return q's dtype (what a model asking for fp32 attention precision, like SD2.x, needs in
    fp16/bf16). Returns [B, queries, heads*dim_head].
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        bias = None if log_bias is None else log_bias.float()
        return attention(q.float(), k.float(), v.float(), heads, bias, tau).to(q.dtype)
    b, tq, _ = q.shape
    k = _to_batch(k, b, "k")
    v = _to_batch(v, b, "v")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} tokens but v has {v.shape[1]}")
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    mask = None
    if log_bias is not None:
        if log_bias.ndim != 1 or log_bias.shape[0] != kh.shape[2]:
            raise ValueError(f"log_bias must be one value per key column ({kh.shape[2]}), got {tuple(log_bias.shape)}")
        mask = log_bias.to(device=q.device, dtype=q.dtype).view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=tau / math.sqrt(qh.shape[-1]))
    return out.transpose(1, 2).reshape(b, tq, -1)


def style_side_by_side(n: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """A style source of N images for a sampling batch of `batch` images, and the weight of its column group.

    N = 1 or N = batch: as is (shared, or image i takes style i), weight 1. Any other N: the N images' tokens side
    by side as one shared reference ([1, N * tokens, C]) with weight 1/N, so together they weigh as one image.
    """
    count = n.shape[0]
    if count in (1, batch):
        return n, 1.0
    return n.reshape(1, count * n.shape[1], *n.shape[2:]), 1.0 / count


# --------------------------------------------------------------------------------------------------- AdaIN
def adain(x: torch.Tensor, ref: torch.Tensor, dims: Sequence[int] | int, eps: float = 1e-6) -> torch.Tensor:
    """Renormalise x so that its mean and (population) std over `dims` become those of `ref`.

    Statistics are taken per remaining index (per channel / per feature). `ref` may have batch 1 (shared) or the
    batch of x. std(x) is clamped at `eps`. Computed in at least fp32; returns x's dtype; inputs are not modified.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if ref.ndim != x.ndim:
        raise ValueError(f"adain: x has {x.ndim} dims but ref has {ref.ndim}")
    if ref.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"adain: ref batch {ref.shape[0]} must be 1 or match x's batch {x.shape[0]}")
    work = torch.promote_types(x.dtype, torch.float32)
    xf, rf = x.to(work), ref.to(device=x.device, dtype=work)
    mx = xf.mean(dim=dims, keepdim=True)
    sx = xf.std(dim=dims, keepdim=True, correction=0).clamp_min(eps)
    mr = rf.mean(dim=dims, keepdim=True)
    sr = rf.std(dim=dims, keepdim=True, correction=0)
    return ((xf - mx) / sx * sr + mr).to(x.dtype)


def adain_latent(z_c: torch.Tensor, z_s: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z = std(z_s) * (z_c - mean(z_c)) / std(z_c) + mean(z_s), per image and channel over the spatial dims.

    z_c: [B, C, H, W] (or more spatial dims); z_s: [N, C, H', W'] (its own size and aspect are fine: only statistics
    are used). N = B: each content image moves toward its own style image; any other N (1 included): toward the
    statistics pooled over all N style images.
    """
    if z_c.ndim < 3 or z_s.ndim != z_c.ndim:
        raise ValueError(f"adain_latent needs [B, C, ...] latents, got {tuple(z_c.shape)} and {tuple(z_s.shape)}")
    if z_c.shape[1] != z_s.shape[1]:
        raise ValueError(f"adain_latent: channel counts differ ({z_c.shape[1]} vs {z_s.shape[1]})")
    return adain(z_c, pooled_reference(z_s, z_c.shape[0]), dims=tuple(range(2, z_c.ndim)), eps=eps)


def pooled_reference(z_s: torch.Tensor, batch: int) -> torch.Tensor:
    """A reference batch of N for a content batch of `batch`: as is when N is 1 or `batch` (one to one); otherwise
    the N images stacked along the first spatial dim into one ([1, C, N*H, ...]), so statistics pool over all of
    them (several style references for one portrait)."""
    n = z_s.shape[0]
    if n in (1, batch):
        return z_s
    return z_s.transpose(0, 1).reshape(1, z_s.shape[1], n * z_s.shape[2], *z_s.shape[3:])


# --------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class FusionParams:
    """How a preset fuses features. See FUSION_PRESETS for the named sets.

    - gamma: query preservation weight of the content query.
    - content_weight: weight of the content K/V columns (log-bias), 0 drops them.
    - tau: logit temperature (> 1 sharpens).
    - use_content_kv / use_style_kv: which stored sources contribute keys/values.
    - adain_qk: StyleAligned's AdaIN of the current Q and K toward the style's Q/K statistics (per feature over
      tokens) before attending.
    - include_self: also attend to the current pass's own K/V (StyleAligned's shared attention).
    - start_percent / end_percent: active steps i with start <= i / n_steps < end (``percent_steps``).
    - layers_preset: a layer preset name or custom list (``layers.resolve_layers``).
    - uncond_mode: the unconditional CFG branch: "fuse" (as cond), "plain" (unpatched attention), "style_only"
      (current query on the style K/V only: no query preservation, no content columns).
    """

    gamma: float = 0.0
    content_weight: float = 1.0
    tau: float = 1.0
    use_content_kv: bool = True
    use_style_kv: bool = True
    adain_qk: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0
    layers_preset: str = "decoder"
    uncond_mode: str = "fuse"
    include_self: bool = False
    name: str = "custom"

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.content_weight < 0 or not math.isfinite(self.content_weight):
            raise ValueError(f"content_weight must be a finite number >= 0, got {self.content_weight}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent}, {self.end_percent}"
            )
        if self.uncond_mode not in UNCOND_MODES:
            raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {self.uncond_mode!r}")
        if not (self.use_style_kv or (self.use_content_kv and self.content_weight > 0) or self.include_self):
            raise ValueError("these fusion settings attend to nothing: enable style K/V, content K/V or self")

    @property
    def needs_content(self) -> bool:
        """Whether fusion reads a content store (query preservation or content K/V)."""
        return self.gamma > 0 or (self.use_content_kv and self.content_weight > 0)

    @property
    def needs_style(self) -> bool:
        return self.use_style_kv or self.adain_qk

    def active(self, step_index: int, n_steps: int) -> bool:
        """Whether fusion applies at sampling step `step_index` of `n_steps`."""
        return step_index in percent_steps(n_steps, self.start_percent, self.end_percent)

    def replace(self, **changes) -> FusionParams:
        return dataclasses.replace(self, **changes)


FUSION_PRESETS: dict[str, FusionParams] = {
    # MagicStyle portrait defaults: content query preservation keeps the face's structure/identity, both sources
    # feed K/V with the content columns at half weight so the style's textures and colours win where they compete,
    # a sharpening temperature as in StyleID, on StyleID's decoder layers. A starting point; tune gamma/content_weight.
    "magicstyle": FusionParams(gamma=0.75, content_weight=0.5, tau=1.5, use_content_kv=True, use_style_kv=True,
                               adain_qk=False, start_percent=0.0, end_percent=1.0, layers_preset="styleid",
                               uncond_mode="fuse", name="magicstyle"),
    # StyleID (Chung et al. 2024): Q = 0.75 Q_c + 0.25 Q_x, style K/V only, tau 1.5, SD1.5 output 6-11, all steps
    # (the paper samples 50 DDIM steps; use the same schedule for inversion and sampling).
    "styleid": FusionParams(gamma=0.75, content_weight=0.0, tau=1.5, use_content_kv=False, use_style_kv=True,
                            adain_qk=False, start_percent=0.0, end_percent=1.0, layers_preset="styleid",
                            uncond_mode="fuse", name="styleid"),
    # StyleAligned (Hertz et al. 2024): AdaIN of the current Q/K toward the reference's, then shared attention over
    # [K_ref ; K_x] and [V_ref ; V_x] in every self-attention layer.
    "stylealigned": FusionParams(gamma=0.0, content_weight=0.0, tau=1.0, use_content_kv=False, use_style_kv=True,
                                 adain_qk=True, start_percent=0.0, end_percent=1.0, layers_preset="all",
                                 uncond_mode="fuse", include_self=True, name="stylealigned"),
    # MasaCtrl (Cao et al. 2023): the target's own query on the source image's K/V (the content store), from step 4
    # of 50 (start_percent 0.08) in the decoder from output 6 (SD1.5) / output 1 (SDXL).
    "masactrl": FusionParams(gamma=0.0, content_weight=1.0, tau=1.0, use_content_kv=True, use_style_kv=False,
                             adain_qk=False, start_percent=0.08, end_percent=1.0, layers_preset="masactrl",
                             uncond_mode="fuse", name="masactrl"),
}
FUSION_PRESET_NAMES = tuple(FUSION_PRESETS)


def get_preset(name: str, **overrides) -> FusionParams:
    key = str(name).strip().lower()
    if key not in FUSION_PRESETS:
        raise ValueError(f"unknown fusion preset {name!r}; presets: {', '.join(FUSION_PRESET_NAMES)}")
    params = FUSION_PRESETS[key]
    return params.replace(**overrides) if overrides else params


# --------------------------------------------------------------------------------------------------- plans
@dataclass
class FusionInputs:
    """What Feature Fusion Attention attends with for one batch part: the query, key/value column groups with a
    weight each (a multiplier of their unnormalised attention, i.e. log(weight) added to their logits) and tau.

    ``attend`` computes the attention; ``as_plain_qkv`` re-expresses it as plain q, k, v (tau folded into q, weights
    by repeating column groups) so another attention function (a chained replace patch) can compute it.
    """

    q: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    weights: list[float]
    tau: float = 1.0

    def attend(self, heads: int, upcast: bool = False) -> torch.Tensor:
        """The fused attention; `upcast` computes it in float32 (see ``attention``)."""
        b = self.q.shape[0]
        keys = [_to_batch(k, b, "k") for k in self.keys]
        values = [_to_batch(v, b, "v") for v in self.values]
        k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
        v = values[0] if len(values) == 1 else torch.cat(values, dim=1)
        log_bias = None
        if len(keys) > 1 and any(w != 1.0 for w in self.weights):
            bias_dtype = torch.promote_types(self.q.dtype, torch.float32)
            log_bias = torch.cat([torch.full((kk.shape[1],), math.log(w), device=self.q.device, dtype=bias_dtype)
                                  for kk, w in zip(keys, self.weights, strict=True)])
        return attention(self.q, k, v, heads, log_bias=log_bias, tau=self.tau, upcast=upcast)

    def as_plain_qkv(self, max_denominator: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(q, k, v, exact): plain attention over these gives the fused result. Column weights are realised by
        repeating groups (``plain_repetitions``); `exact` says whether that was exact. When it is not, the weights are
        approximated by fractions with denominator <= max_denominator."""
        b = self.q.shape[0]
        reps = plain_repetitions(self.weights, max_denominator)
        exact = reps is not None
        if reps is None:
            fracs = [Fraction(w).limit_denominator(max_denominator) for w in self.weights]
            common = math.lcm(*[f.denominator for f in fracs]) if fracs else 1
            reps = [int(f * common) for f in fracs]
        keys, values = [], []
        for k, v, r in zip(self.keys, self.values, reps, strict=True):
            keys.extend([_to_batch(k, b, "k")] * r)
            values.extend([_to_batch(v, b, "v")] * r)
        if not keys:
            raise ValueError("no key/value column group keeps a weight > 0")
        q = self.q * self.tau if self.tau != 1.0 else self.q
        return q, torch.cat(keys, dim=1), torch.cat(values, dim=1), exact


def plain_repetitions(weights: Sequence[float], max_denominator: int = 4, max_groups: int = 16) -> list[int] | None:
    """Repetition counts that realise column-group weights exactly with plain attention, or None.

    Softmax sees only the weights' ratios, so any common scale works: each weight is tried as the unit, the others
    are written as fractions with denominator <= max_denominator, and the exact choice with the fewest repeated
    groups (at most `max_groups`, which bounds the keys' growth) wins. [1, 0.5] -> [2, 1]; [1/3, 0.5] -> [2, 3];
    [1, 0.3] -> [10, 3]; [1, 0.7] -> None (7/10 needs a larger denominator either way round).
    """
    weights = [float(w) for w in weights]
    if not weights or any(w <= 0 or not math.isfinite(w) for w in weights):
        return None
    best = None
    for unit in sorted(set(weights)):
        fracs = [Fraction(w / unit).limit_denominator(max_denominator) for w in weights]
        if any(abs(float(f) * unit - w) > 1e-9 * w for f, w in zip(fracs, weights, strict=True)):
            continue
        common = math.lcm(*[f.denominator for f in fracs])
        reps = [int(f * common) for f in fracs]
        if sum(reps) <= max_groups and (best is None or sum(reps) < sum(best)):
            best = reps
    return best


class Projections(NamedTuple):
    """A layer's own (affine) projections of a hidden state: attn1's to_q, to_k and to_v."""

    to_q: Callable[[torch.Tensor], torch.Tensor]
    to_k: Callable[[torch.Tensor], torch.Tensor]
    to_v: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CurrentPass:
    """The current pass at a fused layer, in the form ComfyUI hands it over: the hidden state entering attn1 (`n`,
    with attn1's optional `context`/`value` for its keys/values), projected only where fusion reads it; or the
    q/k/v an attn1 replace receives, already projected."""

    n: torch.Tensor | None = None
    context: torch.Tensor | None = None
    value: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self):
        if (self.n is None) == (self.q is None) or (self.q is not None and (self.k is None or self.v is None)):
            raise ValueError("the current pass is either a hidden state n or projected q, k and v")

    @property
    def lead(self) -> torch.Tensor:
        """The tensor whose rows, tokens, dtype and device are the call's (n or q)."""
        return self.q if self.n is None else self.n

    def take(self, rows: slice) -> CurrentPass:
        return CurrentPass(*(None if t is None else t[rows]
                             for t in (self.n, self.context, self.value, self.q, self.k, self.v)))

    def projected_query(self, proj: Projections) -> torch.Tensor:
        return self.q if self.n is None else proj.to_q(self.n)

    def projected_key(self, proj: Projections) -> torch.Tensor:
        return self.k if self.n is None else proj.to_k(self.n if self.context is None else self.context)

    def projected_value(self, proj: Projections) -> torch.Tensor:
        if self.n is None:
            return self.v
        source = self.value if self.value is not None else self.context if self.context is not None else self.n
        return proj.to_v(source)


def _require_sources(params: FusionParams, has_content: bool, has_style: bool) -> None:
    who = f"fusion preset {params.name!r}"
    if params.needs_content and not has_content:
        raise ValueError(f"{who} needs content features: connect a content KV store")
    if params.needs_style and not has_style:
        raise ValueError(f"{who} needs style features: connect a style KV store")


def fusion_mode(params: FusionParams, branch: str, has_content: bool, has_style: bool) -> str | None:
    """How one batch part attends: "fuse" (its required sources checked), "style_only" or None (plain attention:
    an uncond part under uncond_mode "plain", or "style_only" without a style source)."""
    if branch not in ("cond", "uncond"):
        raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
    if branch == "cond" or params.uncond_mode == "fuse":
        _require_sources(params, has_content, has_style)
        return "fuse"
    if params.uncond_mode == "style_only" and has_style:
        return "style_only"
    return None


def column_groups(params: FusionParams, style_only: bool = False, has_content: bool = True,
                  style_weight: float = 1.0) -> list[tuple[str, float]]:
    """The key/value column groups a part attends to, in order, with their weights: "style" (weight
    `style_weight`), "content" (content_weight; not on a style_only part) and "self" (include_self, weight 1)."""
    groups = []
    if params.use_style_kv or style_only:
        groups.append(("style", float(style_weight)))
    if not style_only and params.use_content_kv and params.content_weight > 0 and has_content:
        groups.append(("content", float(params.content_weight)))
    if params.include_self:
        groups.append(("self", 1.0))
    return groups


def _preserve_query(gamma: float, q_c: torch.Tensor, q: torch.Tensor, what: str) -> torch.Tensor:
    """gamma * q_c + (1 - gamma) * q, q_c of batch 1 (shared) or q's batch."""
    q_c = _to_batch(q_c.to(q.dtype), q.shape[0], what)
    if q_c.shape != q.shape:
        raise ValueError(f"content {what} {tuple(q_c.shape)} does not match the current one {tuple(q.shape)}")
    return q_c if gamma == 1.0 else torch.lerp(q, q_c, gamma)


def plan_fusion(
    params: FusionParams,
    proj: Projections,
    current: CurrentPass,
    content_n: torch.Tensor | None,
    style_n: torch.Tensor | None,
    branch: str = "cond",
    style_weight: float = 1.0,
) -> FusionInputs | None:
    """The FusionInputs of one batch part under `params`, or None where the part attends plainly.

    `content_n`/`style_n` are the stores' hidden states ([1 or B, tokens, C]; the style may have its own token
    count), projected here with the layer's `proj`. Projects only what the fusion reads: the current pass's k/v
    only for ``include_self``, the style's query only for ``adain_qk``; and, from a hidden state, one query
    projection, since an affine map keeps affine combinations:
    ``to_q(gamma * n_c + (1 - gamma) * n_x) == gamma * to_q(n_c) + (1 - gamma) * to_q(n_x)``
    (not with ``adain_qk``, which renormalises the current query before the mix).

    branch "cond" (or any part under uncond_mode "fuse"): query preservation, K/V of the enabled sources, AdaIN of
    Q/K toward the style when ``adain_qk``. branch "uncond" follows ``params.uncond_mode``: "plain" -> None,
    "style_only" -> the current (AdaIN-ed) query on the style K/V (and its own with include_self), no content.
    `style_weight` weighs the style group (``style_side_by_side`` of N images: 1/N). Missing required sources raise
    ValueError.
    """
    mode = fusion_mode(params, branch, content_n is not None, style_n is not None)
    if mode is None:
        return None
    style_only = mode == "style_only"
    preserve = not style_only and params.gamma > 0
    k_self = current.projected_key(proj) if params.include_self else None
    if params.adain_qk:
        q = adain(current.projected_query(proj), proj.to_q(style_n), dims=1)
        if k_self is not None:
            k_self = adain(k_self, proj.to_k(style_n), dims=1)
        if preserve:
            q = _preserve_query(params.gamma, proj.to_q(content_n), q, "query")
    elif preserve and current.n is not None:
        q = proj.to_q(_preserve_query(params.gamma, content_n, current.n, "hidden state"))
    elif preserve:
        q = _preserve_query(params.gamma, proj.to_q(content_n), current.q, "query")
    else:
        q = current.projected_query(proj)
    keys, values, weights = [], [], []
    for group, weight in column_groups(params, style_only, content_n is not None, style_weight):
        if group == "style":
            k, v = proj.to_k(style_n), proj.to_v(style_n)
        elif group == "content":
            k, v = proj.to_k(content_n), proj.to_v(content_n)
        else:
            k, v = k_self, current.projected_value(proj)
        keys.append(k)
        values.append(v)
        weights.append(weight)
    if not keys:
        raise ValueError("fused attention has no key/value source (style and content both absent or weighted 0)")
    return FusionInputs(q=q, keys=keys, values=values, weights=weights, tau=float(params.tau))
