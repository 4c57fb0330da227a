"""IP-Adapter's projections written out in plain torch (float64) from a file's raw tensors, as the original
(tencent-ailab/IP-Adapter: ip_adapter.py ImageProjModel / MLPProjModel, resampler.py Resampler,
ip_adapter_faceid.py MLPProjModel / ProjPlusModel) defines them: the reference the pack's projection code is tested
against, never the pack's own helpers."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

D64 = torch.float64


def _t(sd, key):
    return sd[key].to(D64)


def ref_linear(x, sd, key, bias=True):
    y = x @ _t(sd, key + ".weight").T
    return y + _t(sd, key + ".bias") if bias else y


def ref_ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], _t(sd, key + ".weight"), _t(sd, key + ".bias"), 1e-5)


def ref_perceiver(sd, prefix, x, latents, dim_head=64):
    """IP-Adapter's resampler maths, one head at a time: latents attend to [x; latents], then a GELU MLP."""
    depth = len({m.group(1) for k in sd for m in [re.match(re.escape(prefix) + r"layers\.(\d+)\.", k)] if m})
    x = ref_linear(x, sd, prefix + "proj_in")
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        xn, ln_ = ref_ln(x, sd, p + "0.norm1"), ref_ln(latents, sd, p + "0.norm2")
        q = ref_linear(ln_, sd, p + "0.to_q", bias=False)
        k, v = ref_linear(torch.cat([xn, ln_], dim=1), sd, p + "0.to_kv", bias=False).chunk(2, dim=-1)
        heads = []
        for h in range(q.shape[-1] // dim_head):
            s = slice(h * dim_head, (h + 1) * dim_head)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(dim_head), dim=-1)
            heads.append(w @ v[..., s])
        latents = latents + ref_linear(torch.cat(heads, dim=-1), sd, p + "0.to_out", bias=False)
        y = F.gelu(ref_linear(ref_ln(latents, sd, p + "1.0"), sd, p + "1.1", bias=False))
        latents = latents + ref_linear(y, sd, p + "1.3", bias=False)
    return ref_ln(ref_linear(latents, sd, prefix + "proj_out"), sd, prefix + "norm_out")


def ref_face_mlp(sd, face, tokens, cross):
    y = ref_linear(F.gelu(ref_linear(face, sd, "proj.0")), sd, "proj.2")
    return ref_ln(y.reshape(face.shape[0], tokens, cross), sd, "norm")


def ref_tokens(a, kw, shortcut=False, scale=1.0):
    """Tokens of an IP-Adapter `a` (anything with variant, tokens, cross_dim and the image_proj tensors) for the
    inputs `kw` (clip_embeds / clip_hidden / face_embedding), in float64."""
    sd = a.image_proj
    if a.variant == "base":
        e = kw["clip_embeds"].to(D64)
        return ref_ln(ref_linear(e, sd, "proj").reshape(e.shape[0], a.tokens, a.cross_dim), sd, "norm")
    if a.variant in ("plus", "plus-face"):
        h = kw["clip_hidden"].to(D64)
        return ref_perceiver(sd, "", h, _t(sd, "latents").expand(h.shape[0], -1, -1))
    if a.variant in ("faceid-portrait-unnorm", "instantid"):
        f = kw["face_embedding"].to(D64)[:, None]
        return ref_perceiver(sd, "", f, _t(sd, "latents").expand(f.shape[0], -1, -1))
    if a.variant == "full-face":
        return ref_ln(ref_linear(F.gelu(ref_linear(kw["clip_hidden"].to(D64), sd, "proj.0")), sd, "proj.2"), sd,
                      "proj.3")
    f = F.normalize(kw["face_embedding"].to(D64), dim=-1)
    x = ref_face_mlp(sd, f, a.tokens, a.cross_dim)
    if a.variant in ("faceid", "faceid-portrait"):
        return x
    out = ref_perceiver(sd, "perceiver_resampler.", kw["clip_hidden"].to(D64), x)
    return x + scale * out if shortcut else out
