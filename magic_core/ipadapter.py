"""IP-Adapter core: read the public IP-Adapter files, tell their variant and model family from their keys, build the
image-projection models and turn CLIP / face inputs into ID tokens for decoupled cross-attention. Pure torch (plus
numpy / OpenCV for face alignment); never imports ComfyUI.

File formats (tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter.py`` and ``ip_adapter_faceid.py``: ``load_ip_adapter``;
cubiq/ComfyUI_IPAdapter_plus ``utils.py``: ``ipadapter_model_loader``)
---------------------------------------------------------------------------------------------------------------------
- ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``: a pickled dict ``{"image_proj": {...}, "ip_adapter": {...}}``. Read with
  ``torch.load(..., map_location="cpu", weights_only=True)``: a file that needs anything beyond plain containers and
  tensors to unpickle is refused (``IPAdapterFormatError``), never executed.
- ``.safetensors``: the same tensors with flattened keys ``image_proj.<key>`` and ``ip_adapter.<key>``.
- Either container may hold the other form (flattened keys in a ``.bin``); ``adapter_modules`` / ``adapter_modules.``
  (the training scripts' name for ``ip_adapter``) is accepted like IPAdapter_plus does. Other top-level entries are
  ignored (listed in ``IPAdapterFile.notes``).
- ``ip_adapter`` holds ``<N>.to_k_ip.weight`` / ``<N>.to_v_ip.weight`` (``[inner_dim, cross_dim]``, no bias) for
  ``N = 2n + 1``: diffusers numbers every attention processor of the UNet in ``unet.attn_processors`` order (down
  blocks, up blocks, mid block; inside each transformer block attn1 then attn2), so the attn1 processors take the
  even numbers and the n-th cross-attention layer (0-based) has key ``2n + 1``. In ComfyUI's numbering that order is
  input blocks (by number, then transformer index), output blocks, middle block: SD1.5 / SD2.x have 16 layers
  (keys 1..31), SDXL 70 (keys 1..139).
- FaceID files (``faceid``, ``faceid-plus``, ``faceid-plusv2``) also carry LoRA weights of every processor inside
  ``ip_adapter``: ``<N>.to_{q,k,v,out}_lora.{down,up}.weight`` (diffusers' ``LoRALinearLayer``, even N included).
  They are kept in ``IPAdapterFile.lora`` but **this pack applies only the to_k_ip / to_v_ip part**; the user loads
  the matching LoRA file (e.g. ``ip-adapter-faceid-plusv2_sd15_lora.safetensors``) with ComfyUI's LoraLoader.

Variants (detected from the ``image_proj`` keys and shapes; the file name is only a tie-breaker where keys are equal)
---------------------------------------------------------------------------------------------------------------------
- ``base``: ``proj`` + ``norm`` (ImageProjModel) over CLIP ``image_embeds``; tokens = proj out-features / cross_dim
  (4 in the public files).
- ``plus`` / ``plus-face``: a Resampler (``latents`` + perceiver layers) over CLIP penultimate hidden states; tokens
  = latent queries (16).
- ``full-face``: MLPProjModel (``proj.0``, ``proj.2``, ``proj.3`` = LayerNorm) applied to every CLIP hidden-state
  token; tokens = the CLIP token count (257 for a ViT-*/14 at 224 px).
- ``faceid``: FaceID MLP (``proj.0``, ``proj.2``, ``norm``) over the 512-d normed ArcFace embedding, plus LoRA keys
  in ``ip_adapter``; 4 tokens.
- ``faceid-portrait``: the same MLP, no LoRA, more tokens (16).
- ``faceid-portrait-unnorm`` / ``instantid``: a Resampler whose ``proj_in`` takes the 512-d *raw* ArcFace embedding
  as a single token (SDXL portrait-unnorm; InstantID's ip-adapter.bin has the same keys); 16 tokens.
- ``faceid-plus`` / ``faceid-plusv2``: ProjModelFaceIdPlus: the FaceID MLP (``proj``, ``norm``) plus a
  ``perceiver_resampler`` (no latents: the MLP tokens are its queries) over CLIP hidden states of the aligned face
  crop, plus LoRA keys; 4 tokens.

Tie-breaks by name (keys identical): ``plus-face`` when the name contains "face", else ``plus``; ``faceid-plusv2``
when it contains "v2", else ``faceid-plus``; ``instantid`` when it contains "instantid"/"instant_id"/"instant-id",
else ``faceid-portrait-unnorm``. ``faceid`` vs ``faceid-portrait``: LoRA keys present -> ``faceid``; no LoRA and more
than 4 tokens -> ``faceid-portrait`` (IPAdapter_plus's rule); no LoRA and 4 tokens -> ``faceid`` (noted). The caller
may override a variant within its key group (``variant=`` of the loaders).

Family: from ``cross_dim`` = in-features of ``to_k_ip`` (768 -> ``sd15``, 1024 -> ``sd2x``, 2048 -> ``sdxl``, else
``unknown``) and reported with ``n_layers`` (a mismatch with the family's 16 / 70 is noted, not refused: pruned and
test models differ). Kolors (IPAdapter_plus's heuristic): a Resampler of width 2048 on a 2048-d model is ``kolors``;
Kolors FaceID files (4096-d tokens fed through Kolors' ``encoder_hid_proj``) are refused as unsupported.

Dimensions are inferred from the weights: tokens, widths, depth (number of ``layers.<i>``), feed-forward width, MLP
hidden width. The one thing weights cannot tell is how a perceiver's attention width ``inner = heads * dim_head``
splits into heads: every public file uses ``dim_head = 64`` (SD1.5 plus: width 768, 12 heads; SDXL plus: 1280, 20;
FaceID-Plus: cross_dim // 64), so ``heads = inner // 64`` unless the caller passes ``resampler_heads``.

Inputs and the negative branch (what IP-Adapter's ``get_image_embeds`` feeds the projection for the negative prompt)
---------------------------------------------------------------------------------------------------------------------
- ``base``: ``clip_embeds`` = CLIP vision ``image_embeds`` ``[B, D]``; negative = zeros through the projection.
- ``plus``, ``plus-face``, ``full-face``: ``clip_hidden`` = CLIP vision penultimate hidden states ``[B, 257, D]``;
  negative = the hidden states of a *zero image*, which the caller encodes with its CLIP vision and passes to
  ``uncond_tokens(clip_hidden=...)``. IP-Adapter zeroes the *preprocessed* pixel values (a CLIP-mean grey image:
  ``uncond_reference_image()``); IPAdapter_plus encodes a black image. Both are "a zero image"; the first is the
  training-time reference.
- ``faceid``, ``faceid-portrait``: ``face_embedding`` = insightface's 512-d ``normed_embedding``; negative = zeros.
- ``faceid-portrait-unnorm``, ``instantid``: insightface's raw 512-d ``embedding`` (not normalised); negative = zeros.
- ``faceid-plus(v2)``: the 512-d normed embedding plus ``clip_hidden`` of the face crop aligned by ``align_face``;
  negative = zero embedding + the zero-image hidden states. V2 adds the MLP tokens back:
  ``out = x + shortcut_scale * perceiver(x, clip_hidden)`` (``shortcut=True``, the V2 default); V1 returns
  ``perceiver(x, clip_hidden)``.
- Embeddings of variants trained on normed embeddings are L2-normalised here (idempotent for insightface's
  ``normed_embedding``; zeros stay zeros). FaceID needs insightface's 512-d ArcFace embedding: a 128-d (dlib)
  embedding is refused with a message saying what to use instead.

Several references (``combine_embeddings`` / ``combine_tokens``)
----------------------------------------------------------------
``combine_embeddings(..., "average")`` averages the *inputs* over the references before the projection (what
IPAdapter_plus's ``combine_embeds="average"`` does). ``combine_tokens(..., "average")`` averages projected tokens;
``combine_tokens(..., "stack")`` concatenates the references' tokens along the token axis (PhotoMaker-style stacked ID
embeddings: the cross-attention sees every reference's tokens at once).

Face alignment (``align_face``): insightface's ``face_align.norm_crop``: the ArcFace 5-point template (112 px), scaled
to the crop size (``size % 112 == 0``: ``size / 112``; else ``size % 128 == 0``: ``size / 128`` and x shifted by
``8 * size / 128``; other sizes: ``size / 112``, an extension), a least-squares similarity transform (rotation, uniform
scale, translation: the same optimum as skimage's ``SimilarityTransform.estimate`` / Umeyama that insightface uses)
and ``cv2.warpAffine`` with bilinear interpolation and border value 0. IP-Adapter's FaceID-Plus crops at 224 px;
IPAdapter_plus uses 256 for SDXL.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sharing import SharedOnCopy

LayerKey = tuple[str, int, int]

VARIANTS = (
    "base",
    "plus",
    "plus-face",
    "full-face",
    "faceid",
    "faceid-portrait",
    "faceid-portrait-unnorm",
    "instantid",
    "faceid-plus",
    "faceid-plusv2",
)
# image_proj module kinds and the variants each can be (the caller may override within a group).
KIND_VARIANTS = {
    "image_proj": ("base",),
    "resampler": ("plus", "plus-face"),
    "resampler_face": ("faceid-portrait-unnorm", "instantid"),
    "mlp": ("full-face",),
    "faceid_mlp": ("faceid", "faceid-portrait"),
    "faceid_plus": ("faceid-plus", "faceid-plusv2"),
}
_VARIANT_ALIASES = {
    "faceid-plus-v2": "faceid-plusv2",
    "faceidplusv2": "faceid-plusv2",
    "faceidplus": "faceid-plus",
    "plusface": "plus-face",
    "fullface": "full-face",
    "full": "full-face",
    "portrait": "faceid-portrait",
    "faceid-portrait-unnormalized": "faceid-portrait-unnorm",
    "portrait-unnorm": "faceid-portrait-unnorm",
    "instant-id": "instantid",
}

FAMILY_BY_CROSS_DIM = {768: "sd15", 1024: "sd2x", 2048: "sdxl"}
FAMILY_LAYERS = {"sd15": 16, "sd2x": 16, "sdxl": 70, "kolors": 70}
FAMILY_LABELS = {"sd15": "SD1.5", "sd2x": "SD2.x", "sdxl": "SDXL", "kolors": "Kolors", "unknown": "an unknown family"}
_FAMILY_ALIASES = {
    "sd15": "sd15", "sd1.5": "sd15", "sd1": "sd15", "sd1x": "sd15", "sd_15": "sd15", "sd15_v": "sd15",
    "sd2": "sd2x", "sd2x": "sd2x", "sd2.x": "sd2x", "sd20": "sd2x", "sd21": "sd2x", "sd2.1": "sd2x", "sd2.0": "sd2x",
    "sdxl": "sdxl", "sd_xl": "sdxl", "xl": "sdxl", "kolors": "kolors",
}
_LAYER_COUNT_LABELS = {16: "SD1.5", 70: "SDXL"}

# CLIP vision towers by the width they give: image_embeds (projection dim) and hidden size differ for the same tower.
CLIP_EMBED_NAMES = {512: "ViT-B", 768: "ViT-L", 1024: "ViT-H", 1280: "ViT-bigG"}
CLIP_HIDDEN_NAMES = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}
CLIP_TOKENS_224 = 257  # ViT-*/14 at 224 px: 16 x 16 patches + the class token
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

ARCFACE_DIM = 512
DLIB_DIM = 128
RESAMPLER_DIM_HEAD = 64
DLIB_EMBEDDING_MESSAGE = (
    "FaceID IP-Adapters were trained on insightface's 512-d ArcFace embedding; this one is 128-d from the dlib "
    "back-end: use the insightface back-end with antelopev2 or buffalo_l in models/insightface/models/, or an "
    "image-based IP-Adapter (base/plus/plus-face) with the offline back-end"
)

PT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class IPAdapterError(ValueError):
    """Base class: every error here is a ValueError with a message meant for the user."""


class IPAdapterFormatError(IPAdapterError):
    """The file (or state dict) is not a readable IP-Adapter: wrong container, unsafe pickle, missing/odd keys."""


class IPAdapterInputError(IPAdapterError):
    """An input (CLIP output, face embedding) does not fit the IP-Adapter."""


class IPAdapterModelMismatchError(IPAdapterError):
    """The IP-Adapter was made for another model (family, cross-attention width, layer count or widths)."""


# ------------------------------------------------------------------------------------------------ projection models


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


_MODULES = {
    "image_proj": ImageProjModel,
    "resampler": Resampler,
    "resampler_face": Resampler,
    "mlp": MLPProjModel,
    "faceid_mlp": FaceIDProjModel,
    "faceid_plus": ProjModelFaceIdPlus,
}


# --------------------------------------------------------------------------------------------------- the file object


@dataclass(eq=False)
class IPAdapterFile(SharedOnCopy):
    """A loaded IP-Adapter. Treat as immutable (``copy.deepcopy`` returns the same object, so ComfyUI's model-option
    copies do not duplicate the weights).

    Fields: ``name`` (file name or given name); ``variant`` (one of ``VARIANTS``) and ``variant_source``
    (``"keys"``, ``"name"``, ``"default"`` or ``"caller"``); ``kind`` (the image_proj module: a ``KIND_VARIANTS`` key)
    and ``proj_config`` (its constructor arguments, inferred from the weights); ``family`` (``sd15``, ``sd2x``,
    ``sdxl``, ``kolors`` or ``unknown``); ``cross_dim`` (text-context width the ip layers take); ``n_layers``;
    ``layer_inner_dims`` (out-features of each layer's to_k_ip, in layer order); ``tokens`` (per reference image;
    full-face: the CLIP token count at 224 px); ``needs_clip_embeds`` / ``needs_clip_hidden`` /
    ``needs_face_embedding``; ``clip_embed_dim`` (image_embeds width, base), ``clip_hidden_dim`` (hidden size: plus,
    full-face, faceid-plus), ``face_embed_dim`` (512 for FaceID variants), ``face_normed`` (the variant was trained on
    L2-normalised embeddings); ``has_lora``, ``lora`` (the LoRA tensors, ip_adapter naming), ``lora_rank``;
    ``image_proj`` / ``ip_adapter`` (the tensors, nested form, without LoRA); ``dtype`` (of the ip layers); ``notes``.
    """

    name: str
    variant: str
    variant_source: str
    kind: str
    proj_config: dict
    family: str
    cross_dim: int
    n_layers: int
    layer_inner_dims: tuple[int, ...]
    tokens: int
    needs_clip_embeds: bool
    needs_clip_hidden: bool
    needs_face_embedding: bool
    clip_embed_dim: int | None
    clip_hidden_dim: int | None
    face_embed_dim: int | None
    face_normed: bool
    has_lora: bool
    lora_rank: int | None
    image_proj: dict[str, torch.Tensor] = field(repr=False)
    ip_adapter: dict[str, torch.Tensor] = field(repr=False)
    lora: dict[str, torch.Tensor] = field(repr=False)
    dtype: torch.dtype = torch.float32
    notes: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False)


    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def default_shortcut(self) -> bool:
        """FaceID-PlusV2 adds the MLP tokens back (``shortcut``); every other variant does not."""
        return self.variant == "faceid-plusv2"

    def layer_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(to_k_ip.weight [inner, cross], to_v_ip.weight)]`` for cross-attention layer n = 0.. (key 2n + 1)."""
        return [(self.ip_adapter[f"{2 * n + 1}.to_k_ip.weight"], self.ip_adapter[f"{2 * n + 1}.to_v_ip.weight"])
                for n in range(self.n_layers)]

    def projection(self, device=None, dtype=torch.float32) -> nn.Module:
        """The image-projection module on ``device`` in ``dtype`` (built once per device/dtype and cached)."""
        key = (str(torch.device(device or "cpu")), dtype)
        if key not in self._cache:
            self._cache[key] = build_image_proj(self, device=device, dtype=dtype)
        return self._cache[key]

    def describe(self) -> str:
        """One line for a node's UI."""
        need = ", ".join(
            n for n, flag in (
                (f"CLIP image_embeds of size {_dim_name(self.clip_embed_dim, CLIP_EMBED_NAMES)}",
                 self.needs_clip_embeds),
                (f"CLIP hidden states of size {_dim_name(self.clip_hidden_dim, CLIP_HIDDEN_NAMES)}",
                 self.needs_clip_hidden),
                (f"{self.face_embed_dim}-d face embedding", self.needs_face_embedding),
            ) if flag
        )
        lora = f", LoRA rank {self.lora_rank} (load it with LoraLoader)" if self.has_lora else ""
        return (f"{self.name}: IP-Adapter {self.variant} for {self.family_label} (cross dim {self.cross_dim}, "
                f"{self.n_layers} layers), {self.tokens} tokens per image from {need}{lora}")


# ------------------------------------------------------------------------------------------------------------ loading


def load_ipadapter_file(path, *, variant: str | None = None, resampler_heads: int | None = None) -> IPAdapterFile:
    """Read an IP-Adapter file (``.safetensors``, or ``.bin``/``.pt``/``.pth``/``.ckpt`` with ``weights_only=True``)
    and detect what it is. ``variant`` overrides the detected variant within its key group (e.g. ``faceid-plusv2``
    for a renamed V2 file); ``resampler_heads`` overrides the perceiver head count (default ``inner // 64``)."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, Exception) as e:
            raise IPAdapterFormatError(f"'{name}' is not a readable .safetensors file: {e}") from e
    elif suffix in PT_SUFFIXES:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, Exception) as e:  # any failure to read plain tensors is a format error
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IPAdapterFormatError(
                f"'{name}' could not be read as plain tensors (torch.load with weights_only=True refused it: {first}). "
                "IP-Adapter files hold only tensors; a file that needs code to unpickle is not loaded. "
                "Use the .safetensors version of the model if there is one."
            ) from e
    else:
        raise IPAdapterFormatError(
            f"'{name}': unsupported file type '{suffix or '(none)'}'; IP-Adapter files are .safetensors or "
            f"{'/'.join(PT_SUFFIXES)}"
        )
    return from_state_dict(sd, name, variant=variant, resampler_heads=resampler_heads)


def from_state_dict(sd, name: str = "<state dict>", *, variant: str | None = None,
                    resampler_heads: int | None = None) -> IPAdapterFile:
    """An ``IPAdapterFile`` from an already loaded dict (nested or flattened form)."""
    if not isinstance(sd, Mapping):
        raise IPAdapterFormatError(f"'{name}' does not hold a dict of tensors (found {type(sd).__name__})")
    image_proj, ip_adapter, notes = _split(sd, name)
    layers, lora, lora_rank = _parse_ip_adapter(ip_adapter, name)
    cross_dim = int(layers[0][0].shape[1])
    kind, config, tokens, out_dim = _inspect_image_proj(image_proj, name, resampler_heads)
    if out_dim != cross_dim:
        if kind == "faceid_plus" and out_dim == 4096 and cross_dim == 2048:
            raise IPAdapterFormatError(
                f"'{name}' looks like a Kolors FaceID IP-Adapter (4096-d tokens fed through Kolors' encoder_hid_proj): "
                "not supported by Magic Portrait"
            )
        raise IPAdapterFormatError(
            f"'{name}': image_proj makes {out_dim}-d tokens but the ip_adapter layers take {cross_dim}-d ones "
            "(image_proj and ip_adapter come from different models?)"
        )
    chosen, source = _choose_variant(kind, name, bool(lora), tokens, variant)
    if kind == "faceid_mlp" and not lora and chosen == "faceid":
        notes.append("no LoRA keys and 4 tokens: read as faceid (a FaceID file without its LoRA part)")

    family = FAMILY_BY_CROSS_DIM.get(cross_dim, "unknown")
    if family == "sdxl" and kind == "resampler" and config["dim"] == 2048:
        family = "kolors"
        notes.append("Resampler of width 2048 on a 2048-d model: a Kolors IP-Adapter (IPAdapter_plus's rule)")
    expected = FAMILY_LAYERS.get(family)
    if expected is not None and expected != len(layers):
        notes.append(f"{len(layers)} ip layers where {FAMILY_LABELS[family]} has {expected} (a pruned or test model?)")

    face_kinds = ("faceid_mlp", "faceid_plus", "resampler_face")
    return IPAdapterFile(
        name=name,
        variant=chosen,
        variant_source=source,
        kind=kind,
        proj_config=config,
        family=family,
        cross_dim=cross_dim,
        n_layers=len(layers),
        layer_inner_dims=tuple(int(k.shape[0]) for k, _ in layers),
        tokens=tokens,
        needs_clip_embeds=kind == "image_proj",
        needs_clip_hidden=kind in ("resampler", "mlp", "faceid_plus"),
        needs_face_embedding=kind in face_kinds,
        clip_embed_dim=config["clip_embed_dim"] if kind == "image_proj" else None,
        clip_hidden_dim={"resampler": config.get("embedding_dim"), "mlp": config.get("clip_hidden_dim"),
                         "faceid_plus": config.get("clip_hidden_dim")}.get(kind),
        face_embed_dim=config.get("id_dim") if kind in ("faceid_mlp", "faceid_plus") else
        (config["embedding_dim"] if kind == "resampler_face" else None),
        face_normed=kind in ("faceid_mlp", "faceid_plus"),
        has_lora=bool(lora),
        lora_rank=lora_rank,
        image_proj=image_proj,
        ip_adapter={f"{2 * n + 1}.to_{kv}_ip.weight": w for n, pair in enumerate(layers) for kv, w in zip("kv", pair, strict=True)},
        lora=lora,
        dtype=layers[0][0].dtype,
        notes=tuple(notes),
    )


def _split(sd: Mapping, name: str):
    """(image_proj, ip_adapter, notes) from the nested or flattened form; checks every value is a tensor."""
    image_proj: dict = {}
    ip_adapter: dict = {}
    notes: list[str] = []
    ignored = []
    for key, value in sd.items():
        if not isinstance(key, str):
            raise IPAdapterFormatError(f"'{name}': key {key!r} is not a string")
        if key in ("image_proj", "ip_adapter", "adapter_modules"):
            if not isinstance(value, Mapping):
                raise IPAdapterFormatError(f"'{name}': '{key}' should be a dict of tensors, found {type(value).__name__}")
            target = image_proj if key == "image_proj" else ip_adapter
            for sub, tensor in value.items():
                target[str(sub)] = tensor
        elif key.startswith("image_proj."):
            image_proj[key[len("image_proj."):]] = value
        elif key.startswith("ip_adapter."):
            ip_adapter[key[len("ip_adapter."):]] = value
        elif key.startswith("adapter_modules."):
            ip_adapter[key[len("adapter_modules."):]] = value
        else:
            ignored.append(key)
    if not image_proj or not ip_adapter:
        missing = " and ".join(p for p, d in (("image_proj", image_proj), ("ip_adapter", ip_adapter)) if not d)
        sample = ", ".join(sorted(map(str, sd.keys()))[:5])
        raise IPAdapterFormatError(
            f"'{name}' is not an IP-Adapter file: it has no {missing} weights (expected 'image_proj'/'ip_adapter' "
            f"dicts or 'image_proj.*'/'ip_adapter.*' keys; first keys: {sample or 'none'})"
        )
    for part, d in (("image_proj", image_proj), ("ip_adapter", ip_adapter)):
        bad = [k for k, v in d.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise IPAdapterFormatError(
                f"'{name}': {part} entries must be tensors; {len(bad)} are not (e.g. '{bad[0]}': "
                f"{type(d[bad[0]]).__name__})"
            )
        bad = [k for k, v in d.items() if not (v.is_floating_point() and v.numel() > 0)]
        if bad:
            raise IPAdapterFormatError(f"'{name}': {part}.{bad[0]} is not a non-empty floating-point tensor")
    if ignored:
        notes.append(f"ignored {len(ignored)} top-level entries: {', '.join(sorted(ignored)[:5])}")
    return image_proj, ip_adapter, notes


_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


def _parse_ip_adapter(ip_adapter: dict, name: str):
    """([(to_k_ip, to_v_ip)] in layer order, {lora key: tensor}, lora rank)."""
    ip: dict[int, dict[str, torch.Tensor]] = {}
    lora: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in ip_adapter.items():
        m = _IP_KEY.match(key)
        if m:
            ip.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        elif _LORA_KEY.match(key):
            lora[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise IPAdapterFormatError(
            f"'{name}': unexpected ip_adapter key(s) {', '.join(sorted(unknown)[:5])} (expected '<N>.to_k_ip.weight', "
            "'<N>.to_v_ip.weight' and FaceID's '<N>.to_<q|k|v|out>_lora.<down|up>.weight')"
        )
    if not ip:
        raise IPAdapterFormatError(f"'{name}': ip_adapter has no '<N>.to_k_ip.weight' / '<N>.to_v_ip.weight' layers")
    numbers = sorted(ip)
    expected = [2 * n + 1 for n in range(len(numbers))]
    if numbers != expected:
        odd = [n for n in numbers if n % 2 == 0]
        if odd:
            problem = f"even layer number(s) {odd[:5]} (cross-attention layers have odd numbers 2n+1)"
        else:
            gaps = sorted(set(range(1, numbers[-1] + 1, 2)) - set(numbers))
            problem = f"missing layer(s) {gaps[:8]} (numbers must run 1, 3, 5, ... without gaps)"
        raise IPAdapterFormatError(f"'{name}': ip_adapter has {problem}")
    layers = []
    cross = None
    for n in numbers:
        pair = ip[n]
        for kv in "kv":
            if kv not in pair:
                raise IPAdapterFormatError(f"'{name}': ip_adapter layer {n} has no to_{kv}_ip.weight")
        k, v = pair["k"], pair["v"]
        if k.ndim != 2 or k.shape != v.shape:
            raise IPAdapterFormatError(
                f"'{name}': ip_adapter layer {n}: to_k_ip {tuple(k.shape)} and to_v_ip {tuple(v.shape)} must be equal "
                "2-D [inner_dim, cross_dim] matrices"
            )
        if cross is None:
            cross = k.shape[1]
        elif k.shape[1] != cross:
            raise IPAdapterFormatError(
                f"'{name}': ip_adapter layer {n} takes {k.shape[1]}-d context but layer 1 takes {cross}-d"
            )
        layers.append((k, v))
    rank = None
    if lora:
        ranks = {int(t.shape[0]) for k, t in lora.items() if k.endswith(".down.weight") and t.ndim == 2}
        if len(ranks) != 1 or any(t.ndim != 2 for t in lora.values()):
            raise IPAdapterFormatError(f"'{name}': the LoRA weights in ip_adapter have inconsistent shapes")
        rank = ranks.pop()
    return layers, lora, rank


def _shape(sd, key, name, ndim):
    if key not in sd:
        raise IPAdapterFormatError(f"'{name}': image_proj has no '{key}'")
    t = sd[key]
    if t.ndim != ndim:
        raise IPAdapterFormatError(f"'{name}': image_proj.{key} should be {ndim}-D, found shape {tuple(t.shape)}")
    return tuple(int(s) for s in t.shape)


def _depth(sd, prefix, name):
    found = {int(m.group(1)) for k in sd for m in [re.match(rf"^{re.escape(prefix)}layers\.(\d+)\.", k)] if m}
    if not found or sorted(found) != list(range(len(found))):
        raise IPAdapterFormatError(f"'{name}': perceiver layers {sorted(found)} should run 0..depth-1")
    return len(found)


def _perceiver_config(sd, prefix, name, heads):
    depth = _depth(sd, prefix, name)
    embedding_dim = _shape(sd, prefix + "proj_in.weight", name, 2)[1]
    dim = _shape(sd, prefix + "proj_in.weight", name, 2)[0]
    output_dim = _shape(sd, prefix + "proj_out.weight", name, 2)[0]
    inner = _shape(sd, prefix + "layers.0.0.to_q.weight", name, 2)[0]
    ff_inner = _shape(sd, prefix + "layers.0.1.1.weight", name, 2)[0]
    if heads is None:
        if inner % RESAMPLER_DIM_HEAD:
            raise IPAdapterFormatError(
                f"'{name}': perceiver attention width {inner} is not a multiple of {RESAMPLER_DIM_HEAD} (the head "
                "size of every public IP-Adapter); pass resampler_heads to say how many heads it has"
            )
        heads = inner // RESAMPLER_DIM_HEAD
    if heads < 1 or inner % heads:
        raise IPAdapterFormatError(f"'{name}': perceiver attention width {inner} cannot split into {heads} heads")
    return {"embedding_dim": embedding_dim, "dim": dim, "output_dim": output_dim, "depth": depth,
            "heads": int(heads), "dim_head": inner // int(heads), "ff_inner": ff_inner}


def _inspect_image_proj(sd: dict, name: str, heads: int | None):
    """(kind, constructor config, tokens per image, token width), keys checked against the module's state dict."""
    if "latents" in sd:
        config = _perceiver_config(sd, "", name, heads)
        latents = _shape(sd, "latents", name, 3)
        if latents[0] != 1 or latents[2] != config["dim"]:
            raise IPAdapterFormatError(f"'{name}': image_proj.latents {latents} should be [1, queries, {config['dim']}]")
        config["num_queries"] = latents[1]
        kind = "resampler_face" if config["embedding_dim"] == ARCFACE_DIM else "resampler"
        tokens, out_dim = latents[1], config["output_dim"]
    elif "perceiver_resampler.proj_in.weight" in sd:
        p = _perceiver_config(sd, "perceiver_resampler.", name, heads)
        id_dim = _shape(sd, "proj.0.weight", name, 2)[1]
        hidden = _shape(sd, "proj.0.weight", name, 2)[0]
        cross = _shape(sd, "norm.weight", name, 1)[0]
        out = _shape(sd, "proj.2.weight", name, 2)[0]
        if out % cross:
            raise IPAdapterFormatError(f"'{name}': image_proj.proj.2 makes {out} features, not a multiple of {cross}")
        if p["dim"] != cross or p["output_dim"] != cross:
            raise IPAdapterFormatError(
                f"'{name}': FaceID-Plus perceiver width {p['dim']} / output {p['output_dim']} should equal the token "
                f"width {cross}"
            )
        config = {"id_dim": id_dim, "hidden": hidden, "cross_dim": cross, "tokens": out // cross,
                  "clip_hidden_dim": p["embedding_dim"], "depth": p["depth"], "heads": p["heads"],
                  "dim_head": p["dim_head"], "ff_inner": p["ff_inner"]}
        kind, tokens, out_dim = "faceid_plus", out // cross, cross
    elif "proj.3.weight" in sd:
        d_in = _shape(sd, "proj.0.weight", name, 2)
        cross = _shape(sd, "proj.2.weight", name, 2)[0]
        config = {"clip_hidden_dim": d_in[1], "cross_dim": cross, "hidden": d_in[0]}
        kind, tokens, out_dim = "mlp", CLIP_TOKENS_224, cross
    elif "proj.0.weight" in sd and "proj.2.weight" in sd and "norm.weight" in sd:
        id_dim = _shape(sd, "proj.0.weight", name, 2)[1]
        hidden = _shape(sd, "proj.0.weight", name, 2)[0]
        cross = _shape(sd, "norm.weight", name, 1)[0]
        out = _shape(sd, "proj.2.weight", name, 2)[0]
        if out % cross:
            raise IPAdapterFormatError(f"'{name}': image_proj.proj.2 makes {out} features, not a multiple of {cross}")
        config = {"id_dim": id_dim, "hidden": hidden, "cross_dim": cross, "tokens": out // cross}
        kind, tokens, out_dim = "faceid_mlp", out // cross, cross
    elif "proj.weight" in sd and "norm.weight" in sd:
        proj = _shape(sd, "proj.weight", name, 2)
        cross = _shape(sd, "norm.weight", name, 1)[0]
        if proj[0] % cross:
            raise IPAdapterFormatError(f"'{name}': image_proj.proj makes {proj[0]} features, not a multiple of {cross}")
        config = {"clip_embed_dim": proj[1], "cross_dim": cross, "tokens": proj[0] // cross}
        kind, tokens, out_dim = "image_proj", proj[0] // cross, cross
    else:
        raise IPAdapterFormatError(
            f"'{name}': image_proj keys ({', '.join(sorted(sd)[:6])}) match no known IP-Adapter projection "
            "(ImageProjModel, Resampler, MLPProjModel, FaceID MLP, ProjModelFaceIdPlus)"
        )
    _check_keys(kind, config, sd, name)
    return kind, config, int(tokens), int(out_dim)


def _construct(kind: str, config: dict) -> nn.Module:
    return _MODULES[kind](**config)


def _check_keys(kind, config, sd, name):
    """The file's image_proj must be exactly the module's state dict (keys and shapes), so strict loading works."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _construct(kind, config).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in sorted(set(sd) & set(expected))
             if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}" + (f" (+{len(missing) - 4})" if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}"
                        + (f" (+{len(unexpected) - 4})" if len(unexpected) > 4 else ""))
    if wrong:
        problems.append(f"wrong shape {', '.join(wrong[:3])}")
    if problems:
        raise IPAdapterFormatError(f"'{name}': image_proj does not fit a {_MODULES[kind].__name__}: "
                                   + "; ".join(problems))


def _normalize_variant(variant: str) -> str:
    v = str(variant).strip().lower().replace("_", "-").replace(" ", "-")
    v = _VARIANT_ALIASES.get(v, v)
    if v not in VARIANTS:
        raise IPAdapterError(f"unknown IP-Adapter variant {variant!r}; known: {', '.join(VARIANTS)}")
    return v


def _choose_variant(kind, name, has_lora, tokens, override):
    lowered = name.lower()
    if kind == "resampler":
        detected, source = ("plus-face", "name") if "face" in lowered else ("plus", "default")
    elif kind == "resampler_face":
        instant = any(s in lowered for s in ("instantid", "instant_id", "instant-id"))
        detected, source = ("instantid", "name") if instant else ("faceid-portrait-unnorm", "default")
    elif kind == "faceid_plus":
        detected, source = ("faceid-plusv2", "name") if "v2" in lowered else ("faceid-plus", "default")
    elif kind == "faceid_mlp":
        detected, source = ("faceid-portrait", "keys") if not has_lora and tokens > 4 else ("faceid", "keys")
    else:
        detected, source = KIND_VARIANTS[kind][0], "keys"
    if override is None:
        return detected, source
    chosen = _normalize_variant(override)
    if chosen not in KIND_VARIANTS[kind]:
        raise IPAdapterFormatError(
            f"'{name}': its keys make it a {' / '.join(KIND_VARIANTS[kind])} IP-Adapter; it cannot be used as "
            f"'{chosen}'"
        )
    return chosen, "caller"


def build_image_proj(adapter: IPAdapterFile, *, device=None, dtype=None) -> nn.Module:
    """The image-projection module with the file's weights (strict load), in eval mode, without gradients.
    ``dtype`` None keeps the file's dtype."""
    with torch.device("meta"):
        module = _construct(adapter.kind, adapter.proj_config)
    tensors = {k: v.to(device=device or "cpu", dtype=dtype or v.dtype, copy=True) for k, v in adapter.image_proj.items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------- layers

_IP_BLOCK_ORDER = {"input": 0, "output": 1, "middle": 2}


def _layer_key(key) -> LayerKey:
    if not isinstance(key, (tuple, list)) or len(key) not in (2, 3) or key[0] not in _IP_BLOCK_ORDER:
        raise IPAdapterError(f"layer {key!r} should be (block, number, index) with block input/middle/output")
    return (str(key[0]), int(key[1]), int(key[2]) if len(key) == 3 else 0)


def ip_layer_order(layers) -> list[LayerKey]:
    """Cross-attention layers in IP-Adapter order: input blocks, output blocks, middle block (each by number, then
    transformer index), which is diffusers' down / up / mid order. Accepts (block, number) pairs as index 0."""
    keys = [_layer_key(k) for k in layers]
    if len(set(keys)) != len(keys):
        raise IPAdapterError("the model's cross-attention layer list has duplicates")
    return sorted(keys, key=lambda k: (_IP_BLOCK_ORDER[k[0]], k[1], k[2]))


def _fmt_layer(key: LayerKey) -> str:
    return f"{key[0]} {key[1]}:{key[2]}"


def map_layers(adapter: IPAdapterFile, model_layers, inner_dims=None) -> dict[LayerKey, int]:
    """{(block, number, index): position n in ``adapter.layer_weights()``} for the MODEL's cross-attention layers.

    ``model_layers``: the model's layer keys in ComfyUI's numbering (any order), or a mapping key -> inner dim.
    ``inner_dims``: the layers' inner (to_k out) dims, a mapping by key or a sequence aligned with ``model_layers``
    as given. Raises ``IPAdapterModelMismatchError`` when the counts or any layer's width differ."""
    given = list(model_layers.keys()) if isinstance(model_layers, Mapping) else list(model_layers)
    if isinstance(model_layers, Mapping) and inner_dims is None:
        inner_dims = model_layers
    keys = [_layer_key(k) for k in given]
    ordered = ip_layer_order(keys)
    if len(ordered) != adapter.n_layers:
        model_label = _LAYER_COUNT_LABELS.get(len(ordered))
        raise IPAdapterModelMismatchError(
            f"this IP-Adapter has {adapter.n_layers} layers ({adapter.family_label}) but the MODEL has "
            f"{len(ordered)} cross-attention layers" + (f" ({model_label})" if model_label else "")
            + ": use an IP-Adapter made for this model"
        )
    if inner_dims is not None:
        if isinstance(inner_dims, Mapping):
            dims = {_layer_key(k): int(v) for k, v in inner_dims.items()}
        else:
            dims_list = [int(d) for d in inner_dims]
            if len(dims_list) != len(keys):
                raise IPAdapterError(f"{len(dims_list)} inner dims for {len(keys)} layers")
            dims = dict(zip(keys, dims_list, strict=True))
        for n, key in enumerate(ordered):
            if key not in dims:
                raise IPAdapterError(f"no inner dim given for layer {_fmt_layer(key)}")
            want = adapter.layer_inner_dims[n]
            if dims[key] != want:
                raise IPAdapterModelMismatchError(
                    f"IP-Adapter layer {n} ('{2 * n + 1}.to_k_ip.weight') projects to {want} features but the "
                    f"MODEL's cross-attention at {_fmt_layer(key)} has inner dim {dims[key]}: this IP-Adapter was "
                    "made for another model"
                )
    return {key: n for n, key in enumerate(ordered)}


def normalize_family(family) -> str:
    key = str(family).strip().lower().replace(" ", "").replace("-", "")
    if key in _FAMILY_ALIASES:
        return _FAMILY_ALIASES[key]
    if key in FAMILY_LABELS:
        return key
    raise IPAdapterError(f"unknown model family {family!r}; known: sd15, sd2x, sdxl, kolors")


def check_family(adapter: IPAdapterFile, model_family=None, cross_dim: int | None = None) -> None:
    """Refuse an IP-Adapter made for another model: ``cross_dim`` (the MODEL's text-context width) is decisive when
    given; else the families are compared (an adapter of unknown family passes)."""
    model = normalize_family(model_family) if model_family is not None else None
    model_label = FAMILY_LABELS.get(model, "") if model else ""
    if cross_dim is not None and int(cross_dim) != adapter.cross_dim:
        guess = model_label or FAMILY_LABELS.get(FAMILY_BY_CROSS_DIM.get(int(cross_dim), "unknown"))
        raise IPAdapterModelMismatchError(
            f"this IP-Adapter is for {adapter.family_label} (cross-attention dim {adapter.cross_dim}, "
            f"{adapter.n_layers} layers) but the MODEL is {guess} (context dim {int(cross_dim)}): use an IP-Adapter "
            f"made for {guess}"
        )
    if model and adapter.family != "unknown" and model != adapter.family:
        raise IPAdapterModelMismatchError(
            f"this IP-Adapter is for {adapter.family_label} (cross-attention dim {adapter.cross_dim}, "
            f"{adapter.n_layers} layers) but the MODEL is {model_label}: use an IP-Adapter made for {model_label}"
        )


# ------------------------------------------------------------------------------------------------------------- inputs


def _dim_name(dim, table) -> str:
    return f"{dim} ({table[dim]})" if dim in table else f"{dim}"


def _tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise IPAdapterInputError(f"{what} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        x = x.float()
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise IPAdapterInputError(f"{what} is empty or has non-finite values")
    return x


def _vector_rows(x: torch.Tensor) -> torch.Tensor:
    """[D] and [B, 1, D] as [B, D] (other shapes unchanged, for the caller to refuse)."""
    if x.ndim == 3 and x.shape[1] == 1:
        return x[:, 0]
    return x[None] if x.ndim == 1 else x


def check_clip_embeds(adapter: IPAdapterFile, clip_embeds) -> torch.Tensor:
    """CLIP vision ``image_embeds`` as [B, D] (accepts [D] and [B, 1, D]), D checked against the adapter."""
    x = _vector_rows(_tensor(clip_embeds, "clip_embeds"))
    if x.ndim != 2:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter needs CLIP vision image_embeds [B, {adapter.clip_embed_dim}], got a "
            f"tensor of shape {list(x.shape)}" + (" (hidden states?)" if x.ndim == 3 else "")
        )
    if x.shape[1] != adapter.clip_embed_dim:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter expects CLIP vision image_embeds of size "
            f"{_dim_name(adapter.clip_embed_dim, CLIP_EMBED_NAMES)} but the CLIP_VISION gives "
            f"{_dim_name(int(x.shape[1]), CLIP_EMBED_NAMES)}"
        )
    return x


def check_clip_hidden(adapter: IPAdapterFile, clip_hidden) -> torch.Tensor:
    """CLIP vision penultimate hidden states [B, N, D], D checked against the adapter."""
    x = _tensor(clip_hidden, "clip_hidden")
    if x.ndim != 3:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter needs the CLIP vision penultimate hidden states "
            f"[B, {CLIP_TOKENS_224}, {adapter.clip_hidden_dim}], got a tensor of shape {list(x.shape)}"
            + (" (image_embeds?)" if x.ndim == 2 else "")
        )
    if x.shape[2] != adapter.clip_hidden_dim:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter expects CLIP vision hidden size "
            f"{_dim_name(adapter.clip_hidden_dim, CLIP_HIDDEN_NAMES)} but the CLIP_VISION gives "
            f"{_dim_name(int(x.shape[2]), CLIP_HIDDEN_NAMES)}"
        )
    return x


def check_face_embedding(adapter: IPAdapterFile, face_embedding) -> torch.Tensor:
    """A face embedding as [B, 512] (accepts [512] and [B, 1, 512]); a 128-d (dlib) embedding is refused."""
    x = _vector_rows(_tensor(face_embedding, "face_embedding"))
    if x.ndim != 2:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter needs face embeddings [B, {adapter.face_embed_dim}], got shape "
            f"{list(x.shape)}"
        )
    if x.shape[1] != adapter.face_embed_dim:
        if x.shape[1] == DLIB_DIM:
            raise IPAdapterInputError(DLIB_EMBEDDING_MESSAGE)
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter expects a {adapter.face_embed_dim}-d face embedding (insightface "
            f"ArcFace) but got {x.shape[1]}-d"
        )
    return x


def _batch(a: torch.Tensor, b: torch.Tensor, what: str):
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise IPAdapterInputError(f"{what}: batch sizes {a.shape[0]} and {b.shape[0]} differ")


def _missing(adapter: IPAdapterFile, what: str, description: str):
    return IPAdapterInputError(f"this {adapter.variant} IP-Adapter needs {what} ({description})")


def _project(adapter, module, *, clip_embeds, clip_hidden, face, shortcut, shortcut_scale, normalize_face, negative):
    module = module if module is not None else adapter.projection()
    p = next(module.parameters())
    dev, dt = p.device, p.dtype
    kind = adapter.kind
    hidden_what = ("the CLIP vision hidden states of a zero image" if negative else
                   "the CLIP vision penultimate hidden states of the reference image")
    with torch.no_grad():
        if kind == "image_proj":
            if clip_embeds is None:
                raise _missing(adapter, "clip_embeds", "CLIP vision image_embeds of the reference image")
            x = check_clip_embeds(adapter, clip_embeds)
            return module(torch.zeros_like(x, device=dev, dtype=dt) if negative else x.to(dev, dt))
        if kind in ("resampler", "mlp"):
            if clip_hidden is None:
                raise _missing(adapter, "clip_hidden", hidden_what)
            return module(check_clip_hidden(adapter, clip_hidden).to(dev, dt))
        if face is None:
            raise _missing(adapter, "face_embedding", "insightface's 512-d ArcFace embedding of the face")
        f = check_face_embedding(adapter, face).to(dev, dt)
        if negative:
            f = torch.zeros_like(f)
        elif normalize_face if normalize_face is not None else adapter.face_normed:
            f = F.normalize(f.float(), dim=-1).to(dt)
        if kind == "resampler_face":
            return module(f[:, None, :])
        if kind == "faceid_mlp":
            return module(f)
        if clip_hidden is None:
            raise _missing(adapter, "clip_hidden", hidden_what.replace("reference image", "aligned face crop"))
        h = check_clip_hidden(adapter, clip_hidden).to(dev, dt)
        f, h = _batch(f, h, "face_embedding and clip_hidden")
        sc = adapter.default_shortcut if shortcut is None else bool(shortcut)
        return module(f, h, shortcut=sc, scale=float(shortcut_scale))


def id_tokens(adapter: IPAdapterFile, *, clip_embeds=None, clip_hidden=None, face_embedding=None,
              shortcut: bool | None = None, shortcut_scale: float = 1.0, normalize_face: bool | None = None,
              module: nn.Module | None = None) -> torch.Tensor:
    """ID tokens ``[B, tokens, cross_dim]`` of the reference(s) for the positive branch.

    Give what ``adapter.needs_*`` says: ``clip_embeds`` (base), ``clip_hidden`` (plus, plus-face, full-face,
    faceid-plus(v2): for the latter, of the crop ``align_face`` made), ``face_embedding`` (FaceID variants). Inputs
    the variant does not use are ignored. ``shortcut`` (FaceID-Plus; None = True for V2, False for V1) and
    ``shortcut_scale`` follow IP-Adapter's ``ProjModelFaceIdPlus``. ``normalize_face`` (None = per variant, see the
    module doc). ``module`` (from ``build_image_proj``) sets where and in which dtype the projection runs; by default
    a cached float32 CPU copy. Returns tensors on the module's device and dtype."""
    return _project(adapter, module, clip_embeds=clip_embeds, clip_hidden=clip_hidden, face=face_embedding,
                    shortcut=shortcut, shortcut_scale=shortcut_scale, normalize_face=normalize_face, negative=False)


def uncond_tokens(adapter: IPAdapterFile, *, clip_embeds=None, clip_hidden=None, face_embedding=None,
                  batch: int | None = None, shortcut: bool | None = None, shortcut_scale: float = 1.0,
                  module: nn.Module | None = None) -> torch.Tensor:
    """The negative-branch tokens IP-Adapter uses (module doc): zero ``clip_embeds`` / zero face embedding through the
    projection; for plus, plus-face, full-face and faceid-plus(v2) ``clip_hidden`` must be the CLIP vision hidden
    states of a zero image (``uncond_reference_image()``), which the caller encodes. ``clip_embeds`` /
    ``face_embedding`` only give the shape; without them ``batch`` (default 1) rows are made."""
    n = 1 if batch is None else int(batch)
    if adapter.kind == "image_proj" and clip_embeds is None:
        clip_embeds = torch.zeros(n, adapter.clip_embed_dim)
    if adapter.needs_face_embedding and face_embedding is None:
        rows = n
        if batch is None and isinstance(clip_hidden, torch.Tensor) and clip_hidden.ndim == 3:
            rows = clip_hidden.shape[0]
        face_embedding = torch.zeros(rows, adapter.face_embed_dim)
    return _project(adapter, module, clip_embeds=clip_embeds, clip_hidden=clip_hidden, face=face_embedding,
                    shortcut=shortcut, shortcut_scale=shortcut_scale, normalize_face=False, negative=True)


def uncond_reference_image(size: int = 224, kind: str = "clip_mean") -> torch.Tensor:
    """The "zero image" for the negative branch as a ComfyUI IMAGE ``[1, size, size, 3]`` in [0, 1]:
    ``clip_mean`` (IP-Adapter's reference: zero *after* CLIP normalisation, i.e. every pixel the CLIP mean) or
    ``black`` (what IPAdapter_plus encodes)."""
    if kind == "black":
        return torch.zeros(1, size, size, 3)
    if kind != "clip_mean":
        raise IPAdapterError(f"uncond_reference_image kind must be 'clip_mean' or 'black', got {kind!r}")
    return torch.tensor(CLIP_MEAN, dtype=torch.float32).expand(1, size, size, 3).clone()


# ------------------------------------------------------------------------------------------------ several references


def _refs(items) -> torch.Tensor:
    """A tensor whose first axis enumerates references, from a tensor or a list (1-D entries get that axis)."""
    if isinstance(items, torch.Tensor):
        return items[None] if items.ndim == 1 else items
    parts = [torch.as_tensor(t) for t in items]
    if not parts:
        raise IPAdapterInputError("no references given")
    parts = [t[None] if t.ndim == 1 else t for t in parts]
    if len({tuple(t.shape[1:]) for t in parts}) != 1:
        raise IPAdapterInputError(f"references have different shapes {[list(t.shape) for t in parts]}")
    return torch.cat(parts, dim=0)


def combine_embeddings(embeds, mode: str = "average") -> torch.Tensor:
    """Several references' *inputs* merged before the projection: a tensor whose first axis enumerates the references
    (``[N, D]`` image_embeds / face embeddings, ``[N, T, D]`` hidden states) or a list of such tensors (1-D vectors
    allowed). ``average`` (IPAdapter_plus's "average") or ``norm_average`` (each reference L2-normalised over its last
    axis first). Returns one reference (first axis 1)."""
    x = _refs(embeds)
    if mode == "average":
        return x.mean(dim=0, keepdim=True)
    if mode == "norm_average":
        return F.normalize(x, dim=-1).mean(dim=0, keepdim=True)
    raise IPAdapterError(f"combine_embeddings mode must be 'average' or 'norm_average', got {mode!r}")


def combine_tokens(tokens, mode: str = "average") -> torch.Tensor:
    """Several references' *projected tokens* (``[N, T, C]`` or a list of ``[T, C]`` / ``[1, T, C]``) as one set
    ``[1, ..., C]``: ``average`` -> ``[1, T, C]`` (the mean token set); ``stack`` -> ``[1, N*T, C]`` (every
    reference's tokens side by side along the token axis, PhotoMaker-style)."""
    if isinstance(tokens, torch.Tensor):
        x = tokens[None] if tokens.ndim == 2 else tokens
    else:
        x = _refs([torch.as_tensor(t)[None] if torch.as_tensor(t).ndim == 2 else t for t in tokens])
    if x.ndim != 3:
        raise IPAdapterInputError(f"combine_tokens expects [N, T, C] tokens, got shape {list(x.shape)}")
    if mode == "average":
        return x.mean(dim=0, keepdim=True)
    if mode == "stack":
        return x.reshape(1, -1, x.shape[-1])
    raise IPAdapterError(f"combine_tokens mode must be 'average' or 'stack', got {mode!r}")


# ------------------------------------------------------------------------------------------------------ face alignment


def arcface_template(size: int = 112) -> np.ndarray:
    """insightface's 5-point ArcFace template for a ``size`` x ``size`` crop (module doc for the scaling rule)."""
    size = int(size)
    if size < 1:
        raise IPAdapterError(f"crop size must be positive, got {size}")
    if size % 112 == 0:
        ratio, dx = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        dx = 8.0 * ratio
    else:
        ratio, dx = size / 112.0, 0.0
    dst = ARCFACE_TEMPLATE_112 * ratio
    dst[:, 0] += dx
    return dst


def similarity_transform(src, dst) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` points onto ``dst``
    in the least-squares sense: ``[[a, -b, tx], [b, a, ty]]`` solved as a linear least-squares problem, which has the
    same optimum as Umeyama's method (skimage's ``SimilarityTransform.estimate``)."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise IPAdapterInputError("similarity_transform needs two equal lists of at least 2 points")
    if np.linalg.norm(src - src.mean(axis=0), axis=1).max() < 1e-3:
        raise IPAdapterInputError("the keypoints are degenerate (all at one point)")
    n = src.shape[0]
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    a[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    (ca, cb, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[ca, -cb, tx], [cb, ca, ty]], dtype=np.float64)


def align_face(rgb, kps, size: int = 224, *, return_matrix: bool = False):
    """insightface's ``norm_crop``: warp ``rgb`` (H x W x 3, uint8 or float in [0, 1]) so the 5 keypoints ``kps``
    (insightface order: eyes, nose tip, mouth corners, image-left first) land on the ArcFace template of a
    ``size`` x ``size`` crop. Returns the uint8 crop (and the 2 x 3 matrix with ``return_matrix``)."""
    import cv2

    img = np.asarray(rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise IPAdapterInputError(f"align_face expects an H x W x 3 image, got shape {list(img.shape)}")
    if img.dtype != np.uint8:
        img = np.rint(np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    pts = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise IPAdapterInputError(f"align_face needs 5 finite (x, y) keypoints, got shape {list(np.shape(kps))}")
    matrix = similarity_transform(pts, arcface_template(size))
    crop = cv2.warpAffine(np.ascontiguousarray(img), matrix, (int(size), int(size)), borderValue=0.0)
    return (crop, matrix) if return_matrix else crop
