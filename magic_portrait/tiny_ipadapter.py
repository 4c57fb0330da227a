"""Tiny, seeded, random IP-Adapter files in the public key layouts, for tests and demos (outputs are meaningless).

``write_tiny_ipadapter`` writes one variant (``magic_core.ipadapter.VARIANTS``) with the exact tensor names and
shape *relations* of the public files (tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter.py``, ``resampler.py``,
``ip_adapter_faceid.py``, ``attention_processor_faceid.py``; cubiq/ComfyUI_IPAdapter_plus ``image_proj_models.py``),
only narrower:

- ``ip_adapter``: ``<2n+1>.to_k_ip.weight`` / ``<2n+1>.to_v_ip.weight`` ``[layer_inner_dims[n], cross_dim]`` for each
  cross-attention layer n, in IP-Adapter order (input, output, middle): pass SD1.5's 16 inner dims for its layout,
  SDXL's 70 for SDXL's, or a tiny model's own list. FaceID variants with LoRA (``faceid``, ``faceid-plus``,
  ``faceid-plusv2``) also get ``<N>.to_{q,k,v,out}_lora.{down,up}.weight`` for every processor N = 0 .. 2L-1 (attn1
  at even N: keys/values from the hidden state; attn2 at odd N: from the ``cross_dim`` context), rank ``lora_rank``.
- ``image_proj``: base ``proj``/``norm``; plus / plus-face / faceid-portrait-unnorm / instantid a Resampler
  (``latents``, ``proj_in``, ``proj_out``, ``norm_out``, ``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}``,
  ``layers.<i>.1.{0,1,3}``); full-face ``proj.0``/``proj.2``/``proj.3``; faceid / faceid-portrait ``proj.0``,
  ``proj.2``, ``norm``; faceid-plus(v2) the same plus ``perceiver_resampler.*`` (no latents).
- Differences from the real files, all in sizes the loader infers: fewer perceiver layers (``depth``, public 4), a
  narrower feed-forward (``ff_inner``, public 4 x width), a narrower FaceID MLP (``mlp_hidden``, public 1024), small
  CLIP widths. Perceiver attention keeps 64-dim heads (``heads`` x 64 = the to_q width), as every public file does.
  The face embedding width stays 512 (ArcFace).

Initialisation: N(0, 1/fan_in) for weight matrices, N(0, 0.02) for biases, 1 / 0 for LayerNorm weight / bias,
``latents`` N(0, 1/width): outputs are not constant. ``.safetensors`` files hold flattened ``image_proj.<key>`` /
``ip_adapter.<key>`` tensors; ``.bin`` files a ``torch.save``d nested ``{"image_proj": {...}, "ip_adapter": {...}}``
of tensors only (loadable with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from magic_core.ipadapter import VARIANTS

FAMILY_CROSS_DIM = {"sd15": 768, "sd2x": 1024, "sdxl": 2048}
ARCFACE_DIM = 512
DIM_HEAD = 64
_LORA_VARIANTS = ("faceid", "faceid-plus", "faceid-plusv2")
_DEFAULT_TOKENS = {
    "base": 4, "plus": 16, "plus-face": 16, "faceid": 4, "faceid-portrait": 16, "faceid-portrait-unnorm": 16,
    "instantid": 16, "faceid-plus": 4, "faceid-plusv2": 4,
}


class _Init:
    """Seeded tensors; on the ``meta`` device only shapes (to check detection at the public files' real sizes)."""

    def __init__(self, seed: int, dtype: torch.dtype, device: str = "cpu"):
        self.gen = torch.Generator().manual_seed(int(seed))
        self.dtype = dtype
        self.meta = str(device) == "meta"

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        if self.meta:
            return torch.empty(shape, dtype=self.dtype, device="meta")
        return (torch.randn(shape, generator=self.gen) * std).to(self.dtype).contiguous()

    def const(self, n: int, value: float) -> torch.Tensor:
        return torch.full((n,), float(value), dtype=self.dtype, device="meta" if self.meta else "cpu")

    def matrix(self, out_features: int, in_features: int) -> torch.Tensor:
        return self.normal((out_features, in_features), in_features ** -0.5)

    def linear(self, sd: dict, key: str, out_features: int, in_features: int, bias: bool = True) -> None:
        sd[f"{key}.weight"] = self.matrix(out_features, in_features)
        if bias:
            sd[f"{key}.bias"] = self.normal((out_features,), 0.02)

    def layer_norm(self, sd: dict, key: str, n: int) -> None:
        sd[f"{key}.weight"] = self.const(n, 1.0)
        sd[f"{key}.bias"] = self.const(n, 0.0)


def _perceiver(init: _Init, sd: dict, prefix: str, *, embedding_dim, dim, output_dim, depth, inner, ff_inner):
    """Resampler / FacePerceiverResampler tensors (without latents) under ``prefix``."""
    init.linear(sd, prefix + "proj_in", dim, embedding_dim)
    init.linear(sd, prefix + "proj_out", output_dim, dim)
    init.layer_norm(sd, prefix + "norm_out", output_dim)
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        init.layer_norm(sd, p + "0.norm1", dim)
        init.layer_norm(sd, p + "0.norm2", dim)
        init.linear(sd, p + "0.to_q", inner, dim, bias=False)
        init.linear(sd, p + "0.to_kv", 2 * inner, dim, bias=False)
        init.linear(sd, p + "0.to_out", dim, inner, bias=False)
        init.layer_norm(sd, p + "1.0", dim)
        init.linear(sd, p + "1.1", ff_inner, dim, bias=False)
        init.linear(sd, p + "1.3", dim, ff_inner, bias=False)


def tiny_ipadapter_state(
    *,
    variant: str,
    family: str = "sd15",
    layer_inner_dims: list[int],
    cross_dim: int | None = None,
    clip_embed_dim: int | None = None,
    clip_hidden_dim: int | None = None,
    resampler_dim: int | None = None,
    heads: int | None = None,
    tokens: int | None = None,
    depth: int = 2,
    ff_inner: int | None = None,
    mlp_hidden: int | None = None,
    lora_rank: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, dict[str, torch.Tensor]]:
    """The nested ``{"image_proj": ..., "ip_adapter": ...}`` dict ``write_tiny_ipadapter`` writes (same arguments).
    ``device="meta"`` gives shapes only: e.g. the public sizes (``resampler_dim=1280, heads=20, depth=4, ...``) for
    detection tests without allocating the weights."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown IP-Adapter variant {variant!r}; known: {', '.join(VARIANTS)}")
    if family not in FAMILY_CROSS_DIM:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_CROSS_DIM)}")
    cross = int(cross_dim or FAMILY_CROSS_DIM[family])
    inner_dims = [int(d) for d in layer_inner_dims]
    if not inner_dims or min(inner_dims) < 1:
        raise ValueError("layer_inner_dims needs one positive inner dim per cross-attention layer")
    init = _Init(seed, dtype, device)
    image_proj: dict[str, torch.Tensor] = {}
    n_tokens = int(tokens or _DEFAULT_TOKENS.get(variant, 4))
    n_heads = int(heads or 2)
    ffi = ff_inner

    if variant == "base":
        init.linear(image_proj, "proj", n_tokens * cross, int(clip_embed_dim or 32))
        init.layer_norm(image_proj, "norm", cross)
    elif variant in ("plus", "plus-face", "faceid-portrait-unnorm", "instantid"):
        width = int(resampler_dim or 64)
        embedding = ARCFACE_DIM if variant in ("faceid-portrait-unnorm", "instantid") else int(clip_hidden_dim or 48)
        image_proj["latents"] = init.normal((1, n_tokens, width), width ** -0.5)
        _perceiver(init, image_proj, "", embedding_dim=embedding, dim=width, output_dim=cross, depth=depth,
                   inner=n_heads * DIM_HEAD, ff_inner=int(ffi or 2 * width))
    elif variant == "full-face":
        hidden = int(clip_hidden_dim or 48)
        init.linear(image_proj, "proj.0", hidden, hidden)
        init.linear(image_proj, "proj.2", cross, hidden)
        init.layer_norm(image_proj, "proj.3", cross)
    else:  # faceid, faceid-portrait, faceid-plus, faceid-plusv2
        hidden = int(mlp_hidden or 64)
        init.linear(image_proj, "proj.0", hidden, ARCFACE_DIM)
        init.linear(image_proj, "proj.2", n_tokens * cross, hidden)
        init.layer_norm(image_proj, "norm", cross)
        if variant in ("faceid-plus", "faceid-plusv2"):
            _perceiver(init, image_proj, "perceiver_resampler.", embedding_dim=int(clip_hidden_dim or 48), dim=cross,
                       output_dim=cross, depth=depth, inner=int(heads or 1) * DIM_HEAD, ff_inner=int(ffi or 32))

    ip_adapter: dict[str, torch.Tensor] = {}
    for n, inner in enumerate(inner_dims):
        ip_adapter[f"{2 * n + 1}.to_k_ip.weight"] = init.matrix(inner, cross)
        ip_adapter[f"{2 * n + 1}.to_v_ip.weight"] = init.matrix(inner, cross)
    if variant in _LORA_VARIANTS:
        r = int(lora_rank)
        for n, inner in enumerate(inner_dims):
            for number, kv_in in ((2 * n, inner), (2 * n + 1, cross)):  # attn1 (self), attn2 (cross)
                for proj, d_in in (("to_q", inner), ("to_k", kv_in), ("to_v", kv_in), ("to_out", inner)):
                    ip_adapter[f"{number}.{proj}_lora.down.weight"] = init.matrix(r, d_in)
                    ip_adapter[f"{number}.{proj}_lora.up.weight"] = init.matrix(inner, r)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_tiny_ipadapter(path, *, variant: str, family: str = "sd15", layer_inner_dims: list[int],
                         cross_dim: int | None = None, clip_embed_dim: int | None = None,
                         clip_hidden_dim: int | None = None, resampler_dim: int | None = None,
                         heads: int | None = None, tokens: int | None = None, depth: int = 2,
                         ff_inner: int | None = None, mlp_hidden: int | None = None, lora_rank: int = 4,
                         seed: int = 0, fmt: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random IP-Adapter of ``variant`` (module doc) to ``path``; ``fmt`` ``"safetensors"`` or ``"bin"``
    (default: from the suffix). ``cross_dim`` defaults to the family's text width (768 / 1024 / 2048), so the family
    is detected as for a real file. Defaults: clip_embed_dim 32, clip_hidden_dim 48, resampler_dim 64, heads 2
    (1 for the FaceID-Plus perceiver, whose width is cross_dim), public token counts."""
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix.lower() == ".safetensors" else "bin")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    state = tiny_ipadapter_state(
        variant=variant, family=family, layer_inner_dims=layer_inner_dims, cross_dim=cross_dim,
        clip_embed_dim=clip_embed_dim, clip_hidden_dim=clip_hidden_dim, resampler_dim=resampler_dim, heads=heads,
        tokens=tokens, depth=depth, ff_inner=ff_inner, mlp_hidden=mlp_hidden, lora_rank=lora_rank, seed=seed,
        dtype=dtype,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{key}": t for part, d in state.items() for key, t in d.items()}
        save_file(flat, str(path))
    else:
        torch.save(state, str(path))
    return path
