"""IP-Adapter image-projection models: the modules that turn CLIP outputs or a face embedding into ID tokens, in the
state-dict layout of the public files (tencent-ailab/IP-Adapter ``resampler.py`` and ``ip_adapter_faceid.py``).
Kept apart from file reading, as cubiq/ComfyUI_IPAdapter_plus keeps ``image_proj_models.py``. Pure torch.
"""

from __future__ import annotations

import torch
from torch import nn

ARCFACE_DIM = 512
RESAMPLER_DIM_HEAD = 64  # every public file's perceiver head size (docs/ipadapter_format.md)


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (state-dict layout of IP-Adapter's resampler.py)."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_DIM_HEAD):
        super().__init__()
        self.heads = int(heads)
        self.dim_head = int(dim_head)
        inner = self.heads * self.dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(x)
        queries = self.norm2(latents)
        b, n, _ = queries.shape
        k, v = self.to_kv(torch.cat([features, queries], dim=1)).chunk(2, dim=-1)

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q, k, v = heads(self.to_q(queries)), heads(k), heads(v)
        s = self.dim_head ** -0.25  # split the 1/sqrt(d) between q and k: fp16 logits stay small
        probs = torch.softmax(((q * s) @ (k * s).transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        return self.to_out((probs @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class _PerceiverStack(nn.Module):
    """proj_in -> depth x (attention + feed-forward, residual) -> proj_out -> norm_out."""

    def __init__(self, embedding_dim, dim, output_dim, depth, heads, dim_head, ff_inner):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), _feed_forward(dim, ff_inner)]) for _ in range(depth)
        )

    def _run(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class Resampler(_PerceiverStack):
    """IP-Adapter-Plus projection: learned latent queries over CLIP hidden states -> ``num_queries`` tokens."""

    def __init__(self, *, embedding_dim, dim, output_dim, num_queries, depth, heads, dim_head=RESAMPLER_DIM_HEAD,
                 ff_inner=None):
        super().__init__(embedding_dim, dim, output_dim, depth, heads, dim_head, ff_inner or 4 * dim)
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))  # always loaded from the file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.latents.expand(x.shape[0], -1, -1).to(x.dtype))


class FacePerceiverResampler(_PerceiverStack):
    """FaceID-Plus's perceiver: the latents are the FaceID MLP tokens, the features CLIP hidden states."""

    def __init__(self, *, embedding_dim, dim, output_dim, depth, heads, dim_head=RESAMPLER_DIM_HEAD, ff_inner=None):
        super().__init__(embedding_dim, dim, output_dim, depth, heads, dim_head, ff_inner or 4 * dim)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, latents)


class ImageProjModel(nn.Module):
    """IP-Adapter (base) projection: CLIP image_embeds [B, D] -> linear -> [B, tokens, cross_dim] -> LayerNorm."""

    def __init__(self, *, clip_embed_dim, cross_dim, tokens):
        super().__init__()
        self.cross_dim, self.tokens = int(cross_dim), int(tokens)
        self.proj = nn.Linear(clip_embed_dim, self.tokens * self.cross_dim)
        self.norm = nn.LayerNorm(self.cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.cross_dim))


class MLPProjModel(nn.Module):
    """IP-Adapter full-face projection: an MLP applied to every CLIP hidden-state token (keeps the token count)."""

    def __init__(self, *, clip_hidden_dim, cross_dim, hidden=None):
        super().__init__()
        hidden = hidden or clip_hidden_dim
        self.proj = nn.Sequential(
            nn.Linear(clip_hidden_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_dim), nn.LayerNorm(cross_dim)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class _FaceMLP(nn.Module):
    """Face embedding [B, id_dim] -> MLP -> [B, tokens, cross_dim] -> LayerNorm (shared by FaceID and FaceID-Plus)."""

    def __init__(self, id_dim, cross_dim, tokens, hidden):
        super().__init__()
        self.cross_dim, self.tokens = int(cross_dim), int(tokens)
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, self.tokens * self.cross_dim))
        self.norm = nn.LayerNorm(self.cross_dim)

    def _tokens(self, face: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face).reshape(face.shape[0], self.tokens, self.cross_dim))


class FaceIDProjModel(_FaceMLP):
    """IP-Adapter-FaceID / FaceID-Portrait projection (IP-Adapter's MLPProjModel in ip_adapter_faceid.py)."""

    def __init__(self, *, id_dim=ARCFACE_DIM, cross_dim, tokens, hidden=None):
        super().__init__(id_dim, cross_dim, tokens, hidden or 2 * id_dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self._tokens(face)


class ProjModelFaceIdPlus(_FaceMLP):
    """FaceID-Plus(V2): FaceID MLP tokens x refined by a perceiver over CLIP hidden states of the aligned face.

    ``shortcut=False`` (V1): ``perceiver(x, clip_hidden)``; ``shortcut=True`` (V2): ``x + scale * perceiver(...)``."""

    def __init__(self, *, id_dim=ARCFACE_DIM, cross_dim, tokens, clip_hidden_dim, hidden=None, depth=4, heads=None,
                 dim_head=RESAMPLER_DIM_HEAD, ff_inner=None):
        super().__init__(id_dim, cross_dim, tokens, hidden or 2 * id_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            embedding_dim=clip_hidden_dim, dim=cross_dim, output_dim=cross_dim, depth=depth,
            heads=heads or cross_dim // dim_head, dim_head=dim_head, ff_inner=ff_inner,
        )

    def forward(self, face: torch.Tensor, clip_hidden: torch.Tensor, shortcut: bool = False, scale: float = 1.0):
        x = self._tokens(face)
        out = self.perceiver_resampler(x, clip_hidden)
        return x + scale * out if shortcut else out


PROJECTION_MODULES = {
    "image_proj": ImageProjModel,
    "resampler": Resampler,
    "resampler_face": Resampler,
    "mlp": MLPProjModel,
    "faceid_mlp": FaceIDProjModel,
    "faceid_plus": ProjModelFaceIdPlus,
}
