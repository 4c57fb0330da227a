"""IP-Adapter inputs and ID tokens: check CLIP / face inputs against a loaded ``IPAdapterFile``, run its projection
for the positive and the negative branch, and merge several references (docs/ipadapter_format.md: "Inputs and the
negative branch", "Several references"). Pure torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ipadapter import (
    CLIP_EMBED_NAMES,
    CLIP_HIDDEN_NAMES,
    CLIP_TOKENS_224,
    IPAdapterError,
    IPAdapterFile,
    IPAdapterInputError,
    dim_name,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
DLIB_DIM = 128
DLIB_EMBEDDING_MESSAGE = (
    "FaceID IP-Adapters were trained on insightface's 512-d ArcFace embedding; this one is 128-d from the dlib "
    "back-end: use the insightface back-end with antelopev2 or buffalo_l in models/insightface/models/, or an "
    "image-based IP-Adapter (base/plus/plus-face) with the offline back-end"
)


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


def _check_clip_output(adapter: IPAdapterFile, x: torch.Tensor, *, what: str, layout: str, ndim: int,
                       width_what: str, width: int, names: dict, mistaken: tuple[int, str]) -> torch.Tensor:
    """``x`` has ``ndim`` axes (``layout`` says which) and ``width`` features on its last axis; the messages name the
    CLIP tower each width belongs to, and what a tensor of ``mistaken[0]`` axes probably is."""
    if x.ndim != ndim:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter needs {what} {layout}, got a tensor of shape {list(x.shape)}"
            + (f" ({mistaken[1]}?)" if x.ndim == mistaken[0] else "")
        )
    if x.shape[-1] != width:
        raise IPAdapterInputError(
            f"this {adapter.variant} IP-Adapter expects {width_what} {dim_name(width, names)} but the CLIP_VISION "
            f"gives {dim_name(int(x.shape[-1]), names)}"
        )
    return x


def check_clip_embeds(adapter: IPAdapterFile, clip_embeds) -> torch.Tensor:
    """CLIP vision ``image_embeds`` as [B, D] (accepts [D] and [B, 1, D]), D checked against the adapter."""
    return _check_clip_output(
        adapter, _vector_rows(_tensor(clip_embeds, "clip_embeds")), what="CLIP vision image_embeds",
        layout=f"[B, {adapter.clip_embed_dim}]", ndim=2, width_what="CLIP vision image_embeds of size",
        width=adapter.clip_embed_dim, names=CLIP_EMBED_NAMES, mistaken=(3, "hidden states"),
    )


def check_clip_hidden(adapter: IPAdapterFile, clip_hidden) -> torch.Tensor:
    """CLIP vision penultimate hidden states [B, N, D], D checked against the adapter."""
    return _check_clip_output(
        adapter, _tensor(clip_hidden, "clip_hidden"), what="the CLIP vision penultimate hidden states",
        layout=f"[B, {CLIP_TOKENS_224}, {adapter.clip_hidden_dim}]", ndim=3,
        width_what="CLIP vision hidden size", width=adapter.clip_hidden_dim, names=CLIP_HIDDEN_NAMES,
        mistaken=(2, "image_embeds"),
    )


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
    ``shortcut_scale`` follow IP-Adapter's ``ProjModelFaceIdPlus``. ``normalize_face`` (None = per variant, see
    docs/ipadapter_format.md). ``module`` (from ``build_image_proj``) sets where and in which dtype the projection
    runs; by default a cached float32 CPU copy. Returns tensors on the module's device and dtype."""
    return _project(adapter, module, clip_embeds=clip_embeds, clip_hidden=clip_hidden, face=face_embedding,
                    shortcut=shortcut, shortcut_scale=shortcut_scale, normalize_face=normalize_face, negative=False)


def uncond_tokens(adapter: IPAdapterFile, *, clip_embeds=None, clip_hidden=None, face_embedding=None,
                  batch: int | None = None, shortcut: bool | None = None, shortcut_scale: float = 1.0,
                  module: nn.Module | None = None) -> torch.Tensor:
    """The negative-branch tokens IP-Adapter uses (docs/ipadapter_format.md): zero ``clip_embeds`` / zero face
    embedding through the projection; for plus, plus-face, full-face and faceid-plus(v2) ``clip_hidden`` must be the
    CLIP vision hidden states of a zero image (``uncond_reference_image()``), which the caller encodes.
    ``clip_embeds`` / ``face_embedding`` only give the shape; without them ``batch`` (default 1) rows are made."""
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

