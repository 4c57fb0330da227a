"""Feature Fusion Attention (MagicStyle's FFA) and the related self-attention controls, as plain tensor maths.

Conventions (all functions take ComfyUI's layout: ``[B, tokens, heads * dim_head]``, heads not split, and return the
attention output before ``to_out``, like ComfyUI's ``optimized_attention``):

- **tau** multiplies the logits: ``softmax(tau * q.k / sqrt(d) + log_bias)``. tau > 1 sharpens (StyleID's attention
  temperature scaling, which scales the query by tau), tau 1 is plain attention. ``attention(q, k, v, tau=2)`` equals
  ``attention(2 * q, k, v)``. The log-bias is added after the temperature, so a column weight stays a pure weight.
- **content_weight** w_c multiplies the unnormalised attention of the content key columns: ``log(w_c)`` is added to
  their logits. w_c = 1: plain concatenation; w_c = 2: exactly as if the content keys/values were duplicated;
  w_c = 0: the content columns are left out (never a -inf logit).
- **gamma**: query preservation ``Q = gamma * Q_c + (1 - gamma) * Q_x``.
- Sources ``content``/``style`` are (q, k, v) triples computed from a KV store's ``n`` with the layer's own
  projections. Their batch may be 1 (shared by every image) or equal to the current batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from .kv_store import percent_steps

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
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


def _bias4d(log_bias: torch.Tensor, b: int, tq: int, tk: int) -> torch.Tensor:
    if log_bias.ndim == 1:  # [keys]
        bias = log_bias.view(1, 1, 1, -1)
    elif log_bias.ndim == 2:  # [B, keys]
        bias = log_bias.view(log_bias.shape[0], 1, 1, -1)
    elif log_bias.ndim == 3:  # [B, queries, keys]
        bias = log_bias.unsqueeze(1)
    elif log_bias.ndim == 4:  # [B, heads, queries, keys]
        bias = log_bias
    else:
        raise ValueError(f"log_bias must have 1-4 dims, got shape {tuple(log_bias.shape)}")
    if bias.shape[-1] != tk:
        raise ValueError(f"log_bias has {bias.shape[-1]} key columns but there are {tk} keys")
    return bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              log_bias: torch.Tensor | None = None, tau: float = 1.0, upcast: bool = False) -> torch.Tensor:
    """softmax(tau * q.k / sqrt(dim_head) + log_bias) v per head, on [B, tokens, heads*dim] tensors.

    k and v may have batch 1 (broadcast). `log_bias` is an additive logit bias: [keys] (a weight per key column),
    [B, keys], [B, queries, keys] or [B, heads, queries, keys]. `upcast`: compute in float32 and return q's dtype
    (what a model asking for fp32 attention precision, like SD2.x, needs in fp16/bf16). Returns
    [B, queries, heads*dim_head].
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
    scale = tau / math.sqrt(qh.shape[-1])
    mask = None
    if log_bias is not None:
        mask = _bias4d(log_bias, b, tq, kh.shape[2]).to(device=q.device, dtype=q.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, tq, -1)


def fused_attention(
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    q_c: torch.Tensor | None,
    k_c: torch.Tensor | None,
    v_c: torch.Tensor | None,
    k_s: torch.Tensor | None,
    v_s: torch.Tensor | None,
    heads: int,
    gamma: float = 0.0,
    content_weight: float = 1.0,
    tau: float = 1.0,
    include_self: bool = False,
) -> torch.Tensor:
    """Feature Fusion Attention (DESIGN §3).

    Q = gamma * Q_c + (1 - gamma) * Q_x;  K = [K_s ; K_c (; K_x)],  V = [V_s ; V_c (; V_x)]
    with log(content_weight) added to the content columns' logits (content_weight 0 leaves them out) and the
    temperature tau on all logits. `include_self` appends the current pass's own K/V (weight 1).
    Any source may be None (not used); at least one key/value source must remain.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if content_weight < 0 or not math.isfinite(content_weight):
        raise ValueError(f"content_weight must be a finite number >= 0, got {content_weight}")
    b = q_x.shape[0]
    if gamma == 0.0:
        q = q_x
    else:
        if q_c is None:
            raise ValueError("gamma > 0 needs the content query q_c (connect a content KV store)")
        q_c = _to_batch(q_c, b, "q_c")
        if q_c.shape != q_x.shape:
            raise ValueError(f"content query {tuple(q_c.shape)} does not match the current query {tuple(q_x.shape)}")
        q = q_c if gamma == 1.0 else gamma * q_c + (1.0 - gamma) * q_x
    keys, values, biases = [], [], []
    if k_s is not None:
        if v_s is None:
            raise ValueError("k_s given without v_s")
        keys.append(_to_batch(k_s, b, "k_s"))
        values.append(_to_batch(v_s, b, "v_s"))
        biases.append(0.0)
    if k_c is not None and content_weight > 0:
        if v_c is None:
            raise ValueError("k_c given without v_c")
        keys.append(_to_batch(k_c, b, "k_c"))
        values.append(_to_batch(v_c, b, "v_c"))
        biases.append(math.log(content_weight))
    if include_self:
        keys.append(k_x)
        values.append(v_x)
        biases.append(0.0)
    if not keys:
        raise ValueError("fused attention has no key/value source (style and content both absent or weighted 0)")
    k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
    v = values[0] if len(values) == 1 else torch.cat(values, dim=1)
    log_bias = None
    if any(bias != 0.0 for bias in biases) and len(keys) > 1:
        log_bias = torch.cat(
            [torch.full((kk.shape[1],), bias, device=q.device, dtype=q.dtype) for kk, bias in zip(keys, biases, strict=True)]
        )
    return attention(q, k, v, heads, log_bias=log_bias, tau=tau)


def project_qkv(n: torch.Tensor, to_q, to_k, to_v, dtype: torch.dtype | None = None) -> QKV:
    """(q, k, v) of a stored hidden state with a layer's own projections (attn1.to_q/to_k/to_v), in `dtype`."""
    if dtype is not None:
        n = n.to(dtype)
    return to_q(n), to_k(n), to_v(n)


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


def _require_sources(params: FusionParams, content, style) -> None:
    who = f"fusion preset {params.name!r}"
    if params.needs_content and content is None:
        raise ValueError(f"{who} needs content features: connect a content KV store")
    if params.needs_style and style is None:
        raise ValueError(f"{who} needs style features: connect a style KV store")


def _adain_qk(params: FusionParams, q_x, k_x, style):
    """StyleAligned: the current queries and keys renormalised toward the reference's statistics."""
    if not params.adain_qk:
        return q_x, k_x
    return adain(q_x, style[0], dims=1), adain(k_x, style[1], dims=1)


def fuse_for_preset(
    params: FusionParams,
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    content: QKV | None,
    style: QKV | None,
    heads: int,
    branch: str = "cond",
) -> torch.Tensor:
    """Self-attention output for one batch chunk under `params`.

    branch "cond" (or "fuse"-mode uncond): query preservation from the content, K/V from the enabled sources,
    AdaIN of Q/K toward the style when `adain_qk` (then attending over [K_style ; K_x_adain], [V_style ; V_x] when
    `include_self`). branch "uncond" follows `params.uncond_mode`. Missing required sources raise ValueError.
    """
    if branch not in ("cond", "uncond"):
        raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
    if branch == "uncond" and params.uncond_mode == "plain":
        return attention(q_x, k_x, v_x, heads)
    if branch == "uncond" and params.uncond_mode == "style_only":
        if style is None:
            return attention(q_x, k_x, v_x, heads)
        q, k_self = q_x, k_x
        if params.adain_qk:
            q, k_self = adain(q_x, style[0], dims=1), adain(k_x, style[1], dims=1)
        return fused_attention(q, k_self, v_x, None, None, None, style[1], style[2], heads, gamma=0.0,
                               content_weight=0.0, tau=params.tau, include_self=params.include_self)
    _require_sources(params, content, style)
    q, k_self = _adain_qk(params, q_x, k_x, style)
    q_c, k_c, v_c = content if content is not None else (None, None, None)
    k_s, v_s = (style[1], style[2]) if params.use_style_kv else (None, None)
    use_c = params.use_content_kv and content is not None
    return fused_attention(
        q, k_self, v_x,
        q_c if params.gamma > 0 else None,
        k_c if use_c else None,
        v_c if use_c else None,
        k_s, v_s, heads,
        gamma=params.gamma,
        content_weight=params.content_weight if use_c else 0.0,
        tau=params.tau,
        include_self=params.include_self,
    )


def _chunk_source(src: QKV | None, rows: int, b: int, sl: slice) -> QKV | None:
    if src is None:
        return None
    out = []
    for t in src:
        if t.shape[0] == rows and rows != b:
            out.append(t[sl])
        elif t.shape[0] in (1, b):
            out.append(t)
        else:
            raise ValueError(f"source batch {t.shape[0]} must be 1, the per-chunk batch {b} or all {rows} rows")
    return tuple(out)


def fuse_batched(
    params: FusionParams,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    content: QKV | None,
    style: QKV | None,
    heads: int,
    cond_or_uncond: Sequence[int] | None = None,
) -> torch.Tensor:
    """`fuse_for_preset` over a ComfyUI batch of len(cond_or_uncond) chunks of B rows (0 = cond, 1 = uncond).

    Sources may have batch 1, B (per chunk) or all rows (as ``KVStore.get(..., cond_or_uncond=...)`` returns).
    Uncond chunks follow `params.uncond_mode`; with "fuse" (or no uncond chunk) the whole batch is one call.
    """
    chunks = list(cond_or_uncond) if cond_or_uncond else [0]
    rows = q.shape[0]
    if rows % len(chunks):
        raise ValueError(f"{rows} rows do not split into {len(chunks)} cond/uncond chunks")
    b = rows // len(chunks)
    if params.uncond_mode == "fuse" or all(c != 1 for c in chunks):
        return fuse_for_preset(params, q, k, v, _whole_source(content, rows, b), _whole_source(style, rows, b),
                               heads, "cond")
    outs = []
    for j, flag in enumerate(chunks):
        sl = slice(j * b, (j + 1) * b)
        outs.append(fuse_for_preset(params, q[sl], k[sl], v[sl], _chunk_source(content, rows, b, sl),
                                    _chunk_source(style, rows, b, sl), heads, "uncond" if flag == 1 else "cond"))
    return torch.cat(outs, dim=0)


def _whole_source(src: QKV | None, rows: int, b: int) -> QKV | None:
    """Map a source onto all rows: batch 1 or `rows` as is, per-chunk batch `b` tiled once per chunk."""
    if src is None:
        return None
    out = []
    for t in src:
        if t.shape[0] in (1, rows):
            out.append(t)
        elif t.shape[0] == b:
            out.append(t.repeat(rows // b, 1, 1))
        else:
            raise ValueError(f"source batch {t.shape[0]} must be 1, the per-chunk batch {b} or all {rows} rows")
    return tuple(out)


# --------------------------------------------------------------------------------------------------- plans
@dataclass
class FusionInputs:
    """What Feature Fusion Attention attends with for one batch chunk: the query, key/value column groups with a
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


def _fusion_mode(params: FusionParams, branch: str, content, style) -> str | None:
    """How one chunk attends: "fuse" (its required sources checked), "style_only" or None (plain attention)."""
    if branch not in ("cond", "uncond"):
        raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
    if branch == "cond" or params.uncond_mode == "fuse":
        _require_sources(params, content, style)
        return "fuse"
    if params.uncond_mode == "style_only" and style is not None:
        return "style_only"
    return None


def _column_groups(params: FusionParams, q: torch.Tensor, style_only: bool, has_content: bool, style_kv, content_kv,
                   self_kv, style_weight: float = 1.0) -> FusionInputs:
    """FusionInputs over the key/value groups `params` enables; style_kv/content_kv/self_kv are called (to project
    lazily) only for the groups used. `style_weight` weighs the style group (1/N for N style images side by side)."""
    keys, values, weights = [], [], []
    groups = (
        (params.use_style_kv or style_only, style_kv, float(style_weight)),
        (not style_only and params.use_content_kv and params.content_weight > 0 and has_content, content_kv,
         float(params.content_weight)),
        (params.include_self, self_kv, 1.0),
    )
    for used, kv, weight in groups:
        if used:
            k, v = kv()
            keys.append(k)
            values.append(v)
            weights.append(weight)
    if not keys:
        raise ValueError("fused attention has no key/value source (style and content both absent or weighted 0)")
    return FusionInputs(q=q, keys=keys, values=values, weights=weights, tau=float(params.tau))


def _preserve_query(gamma: float, q_c: torch.Tensor, q: torch.Tensor, what: str) -> torch.Tensor:
    """gamma * q_c + (1 - gamma) * q, q_c of batch 1 (shared) or q's batch."""
    q_c = _to_batch(q_c.to(q.dtype), q.shape[0], what)
    if q_c.shape != q.shape:
        raise ValueError(f"content {what} {tuple(q_c.shape)} does not match the current one {tuple(q.shape)}")
    return q_c if gamma == 1.0 else torch.lerp(q, q_c, gamma)


def fusion_inputs(
    params: FusionParams,
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    content: Sequence[torch.Tensor | None] | None,
    style: Sequence[torch.Tensor | None] | None,
    branch: str = "cond",
    style_weight: float = 1.0,
) -> FusionInputs | None:
    """The FusionInputs `fuse_for_preset` attends with for one chunk, or None for plain attention (an uncond chunk
    under uncond_mode "plain", or "style_only" without a style source).

    `content`/`style` are (q, k, v) whose unused entries may be None (so callers project only what is needed:
    content q when gamma > 0, content k/v when content K/V are used, style q only for adain_qk).
    ``fusion_inputs(...).attend(heads)`` equals ``fuse_for_preset(...)`` for the same arguments (style_weight 1).
    `style_weight` multiplies the style columns' attention: ``style_side_by_side`` of N images with weight 1/N
    makes them count together as one reference.
    """
    mode = _fusion_mode(params, branch, content, style)
    if mode is None:
        return None
    style_only = mode == "style_only"
    q, k_self = _adain_qk(params, q_x, k_x, style)
    if not style_only and params.gamma > 0:
        q = _preserve_query(params.gamma, content[0], q, "query")
    return _column_groups(params, q, style_only, content is not None, lambda: (style[1], style[2]),
                          lambda: (content[1], content[2]), lambda: (k_self, v_x), style_weight)


def hidden_fusion_inputs(
    params: FusionParams,
    n_x: torch.Tensor,
    to_q,
    to_k,
    to_v,
    content_n: torch.Tensor | None,
    style_n: torch.Tensor | None,
    branch: str = "cond",
    context: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    style_weight: float = 1.0,
) -> FusionInputs | None:
    """``fusion_inputs`` from hidden states: the current pass's ``n_x`` and the stores' ``content_n``/``style_n``
    ([1 or B, tokens, C]), projected here with the layer's own (affine) to_q/to_k/to_v.

    Projects only what the fusion reads, which saves three of the eight projections the q/k/v route needs:
    - the current pass's k/v only for ``include_self`` (from ``context``/``value`` when given, as attn1 does);
    - one query projection: an affine map keeps affine combinations, so
      ``to_q(gamma * n_c + (1 - gamma) * n_x) == gamma * to_q(n_c) + (1 - gamma) * to_q(n_x)``
      (not with ``adain_qk``, which renormalises the current query before the mix).
    ``hidden_fusion_inputs(...).attend(heads)`` equals ``fusion_inputs(...)`` on the projected q/k/v to float
    rounding. Returns None for plain attention, like ``fusion_inputs``.
    """
    mode = _fusion_mode(params, branch, content_n, style_n)
    if mode is None:
        return None
    style_only = mode == "style_only"
    preserve = not style_only and params.gamma > 0
    kv_in = n_x if context is None else context
    k_self = to_k(kv_in) if params.include_self else None
    if params.adain_qk:
        q = adain(to_q(n_x), to_q(style_n), dims=1)
        if k_self is not None:
            k_self = adain(k_self, to_k(style_n), dims=1)
        if preserve:
            q = _preserve_query(params.gamma, to_q(content_n), q, "query")
    else:
        q = to_q(_preserve_query(params.gamma, content_n, n_x, "hidden state") if preserve else n_x)
    return _column_groups(params, q, style_only, content_n is not None, lambda: (to_k(style_n), to_v(style_n)),
                          lambda: (to_k(content_n), to_v(content_n)),
                          lambda: (k_self, to_v(kv_in if value is None else value)), style_weight)
