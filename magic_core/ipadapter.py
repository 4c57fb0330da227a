"""IP-Adapter files: read the public IP-Adapter files (``.safetensors`` or plain-tensor ``.bin``/``.pt``), tell their
variant and model family from their keys, build the image-projection module and map the ip layers onto a MODEL's
cross-attention layers. The file format, the variants and the detection rules are in docs/ipadapter_format.md;
projection models are in ``ipadapter_models``, inputs and ID tokens in ``ipadapter_tokens``, face alignment in
``face_align``. Pure torch; never imports ComfyUI.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import families
from .ipadapter_models import ARCFACE_DIM, PROJECTION_MODULES, RESAMPLER_DIM_HEAD
from .layers import LayerKey, format_layer
from .sharing import SharedOnCopy

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

# CLIP vision towers by the width they give: image_embeds (projection dim) and hidden size differ for the same tower.
CLIP_EMBED_NAMES = {512: "ViT-B", 768: "ViT-L", 1024: "ViT-H", 1280: "ViT-bigG"}
CLIP_HIDDEN_NAMES = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}
CLIP_TOKENS_224 = 257  # ViT-*/14 at 224 px: 16 x 16 patches + the class token
PT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class IPAdapterError(ValueError):
    """Base class: every error here is a ValueError with a message meant for the user."""


class IPAdapterFormatError(IPAdapterError):
    """The file (or state dict) is not a readable IP-Adapter: wrong container, unsafe pickle, missing/odd keys."""


class IPAdapterInputError(IPAdapterError):
    """An input (CLIP output, face embedding) does not fit the IP-Adapter."""


class IPAdapterModelMismatchError(IPAdapterError):
    """The IP-Adapter was made for another model (family, cross-attention width, layer count or widths)."""


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
        return families.label(self.family)

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
                (f"CLIP image_embeds of size {dim_name(self.clip_embed_dim, CLIP_EMBED_NAMES)}",
                 self.needs_clip_embeds),
                (f"CLIP hidden states of size {dim_name(self.clip_hidden_dim, CLIP_HIDDEN_NAMES)}",
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

    family = families.FAMILY_BY_CROSS_DIM.get(cross_dim, families.UNKNOWN)
    if family == families.SDXL and kind == "resampler" and config["dim"] == 2048:
        family = families.KOLORS
        notes.append("Resampler of width 2048 on a 2048-d model: a Kolors IP-Adapter (IPAdapter_plus's rule)")
    expected = families.CROSS_ATTENTION_LAYERS.get(family)
    if expected is not None and expected != len(layers):
        notes.append(f"{len(layers)} ip layers where {families.label(family)} has {expected} (a pruned or test model?)")

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


def _face_mlp_config(sd, name) -> dict:
    """The FaceID MLP's constructor arguments (FaceID and FaceID-Plus share it: ``proj.0``, ``proj.2``, ``norm``)."""
    id_dim = _shape(sd, "proj.0.weight", name, 2)[1]
    hidden = _shape(sd, "proj.0.weight", name, 2)[0]
    cross = _shape(sd, "norm.weight", name, 1)[0]
    out = _shape(sd, "proj.2.weight", name, 2)[0]
    if out % cross:
        raise IPAdapterFormatError(f"'{name}': image_proj.proj.2 makes {out} features, not a multiple of {cross}")
    return {"id_dim": id_dim, "hidden": hidden, "cross_dim": cross, "tokens": out // cross}


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
        mlp = _face_mlp_config(sd, name)
        cross = mlp["cross_dim"]
        if p["dim"] != cross or p["output_dim"] != cross:
            raise IPAdapterFormatError(
                f"'{name}': FaceID-Plus perceiver width {p['dim']} / output {p['output_dim']} should equal the token "
                f"width {cross}"
            )
        config = {**mlp, "clip_hidden_dim": p["embedding_dim"], "depth": p["depth"], "heads": p["heads"],
                  "dim_head": p["dim_head"], "ff_inner": p["ff_inner"]}
        kind, tokens, out_dim = "faceid_plus", mlp["tokens"], cross
    elif "proj.3.weight" in sd:
        d_in = _shape(sd, "proj.0.weight", name, 2)
        cross = _shape(sd, "proj.2.weight", name, 2)[0]
        config = {"clip_hidden_dim": d_in[1], "cross_dim": cross, "hidden": d_in[0]}
        kind, tokens, out_dim = "mlp", CLIP_TOKENS_224, cross
    elif "proj.0.weight" in sd and "proj.2.weight" in sd and "norm.weight" in sd:
        config = _face_mlp_config(sd, name)
        kind, tokens, out_dim = "faceid_mlp", config["tokens"], config["cross_dim"]
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
    return PROJECTION_MODULES[kind](**config)


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
        raise IPAdapterFormatError(f"'{name}': image_proj does not fit a {PROJECTION_MODULES[kind].__name__}: "
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
        model_label = families.LABEL_BY_LAYER_COUNT.get(len(ordered))
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
                raise IPAdapterError(f"no inner dim given for layer {format_layer(key)}")
            want = adapter.layer_inner_dims[n]
            if dims[key] != want:
                raise IPAdapterModelMismatchError(
                    f"IP-Adapter layer {n} ('{2 * n + 1}.to_k_ip.weight') projects to {want} features but the "
                    f"MODEL's cross-attention at {format_layer(key)} has inner dim {dims[key]}: this IP-Adapter was "
                    "made for another model"
                )
    return {key: n for n, key in enumerate(ordered)}


def normalize_family(family) -> str:
    """A MODEL's family as ``families`` names it, ``unknown`` included."""
    canonical = families.normalize(family)
    if canonical is not None:
        return canonical
    if families.spelling_key(family) == families.UNKNOWN:
        return families.UNKNOWN
    raise IPAdapterError(f"unknown model family {family!r}; known: {', '.join(families.FAMILIES)}")


def check_family(adapter: IPAdapterFile, model_family=None, cross_dim: int | None = None) -> None:
    """Refuse an IP-Adapter made for another model: ``cross_dim`` (the MODEL's text-context width) is decisive when
    given; else the families are compared (an adapter of unknown family passes)."""
    model = normalize_family(model_family) if model_family is not None else None
    model_label = families.LABELS.get(model, "") if model else ""
    if cross_dim is not None and int(cross_dim) != adapter.cross_dim:
        guess = model_label or families.label(families.FAMILY_BY_CROSS_DIM.get(int(cross_dim), families.UNKNOWN))
        raise IPAdapterModelMismatchError(
            f"this IP-Adapter is for {adapter.family_label} (cross-attention dim {adapter.cross_dim}, "
            f"{adapter.n_layers} layers) but the MODEL is {guess} (context dim {int(cross_dim)}): use an IP-Adapter "
            f"made for {guess}"
        )
    if model and adapter.family != families.UNKNOWN and model != adapter.family:
        raise IPAdapterModelMismatchError(
            f"this IP-Adapter is for {adapter.family_label} (cross-attention dim {adapter.cross_dim}, "
            f"{adapter.n_layers} layers) but the MODEL is {model_label}: use an IP-Adapter made for {model_label}"
        )


# ------------------------------------------------------------------------------------------------------------- labels


def dim_name(dim, table) -> str:
    """A width with the CLIP tower it belongs to, when known: ``1024 (ViT-H)``."""
    return f"{dim} ({table[dim]})" if dim in table else f"{dim}"
