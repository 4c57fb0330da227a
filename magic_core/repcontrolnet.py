"""RepControlNet: a control branch re-parameterised into the UNet's own weights.

A RepControlNet file holds a small condition adapter plus, for a chosen set of conv/linear layers of the UNet, a
"modal" copy ``W_m, b_m`` of each layer and coefficients ``alpha, beta``:

- **Unmerged** (training, reference): every listed layer computes ``alpha * (W x + b) + beta * (W_m x + b_m)``. Both
  branches see the same input ``x``, so the layer is linear in its weights and
- **Merged** (inference): ``W' = alpha * W + beta * W_m``, ``b' = alpha * b + beta * b_m`` gives the same output with one
  layer, i.e. the control costs nothing per step. ``merge_into_`` (in place) and ``merge_increment`` compute it for one
  tensor at the moment it is patched (ComfyUI: a weight-adapter patch, reversible), so no full-size difference is
  ever stored per layer.
- The adapter maps the condition image (``B, 3, H, W`` in ``[0, 1]``) to ``model_channels`` features at latent
  resolution ``(H/8, W/8)``; they are ADDED to the output of the UNet's first input block (``conv_in``, block
  ``("input", 0)``), i.e. to the features entering input block 1. Its last conv is zero-initialised, so an untrained
  adapter adds exactly zero.

Layers are named by their module path inside the UNet (``input_blocks.1.0.in_layers.2``); their tensors use the UNet's
own state-dict keys (``input_blocks.1.0.in_layers.2.weight`` / ``.bias``), relative to ``diffusion_model.``.

File format (``.safetensors``, no pickle), version 1
-----------------------------------------------------
Tensors:

- ``adapter.<param>``: the ``ConditionAdapter`` state dict (e.g. ``adapter.conv_in.weight``).
- ``modal.<unet key>``: modal weight and bias of every listed layer, e.g. ``modal.input_blocks.1.0.in_layers.2.weight``
  and ``modal.input_blocks.1.0.in_layers.2.bias``. Weights are 2-D (linear) or 4-D (conv2d); a bias is 1-D with
  ``weight.shape[0]`` entries and is present exactly when the UNet layer has a bias.
- ``alpha``, ``beta``: 0-d float32 tensors, the global coefficients.
- ``coef.alpha.<layer>``, ``coef.beta.<layer>`` (optional): 0-d per-layer overrides, ``<layer>`` being the module path
  (the key without ``.weight``).

String metadata: ``format = "magic_portrait.repcontrolnet"``, ``format_version = "1"``, ``model_family`` (``sd15``,
``sdxl`` or any other string), ``condition_type`` (free text: ``canny``, ``landmarks``, ``pose``, ``depth``...),
``adapter_config`` (JSON of the ``ConditionAdapter`` constructor arguments), ``model_channels`` (the adapter's
output channels = the UNet's ``model_channels``). Any other metadata entries (e.g. ``training_step``) are kept as is.

Strength
--------
``strength`` s interpolates linearly between the base model (s = 0, nothing changes) and the full merge (s = 1):
``W(s) = W + s * ((alpha - 1) * W + beta * W_m)``, i.e. effective coefficients ``alpha_s = 1 - s * (1 - alpha)`` and
``beta_s = s * beta``; s > 1 extrapolates. The adapter features should be scaled by the same s (``ConditionAdapter``
takes a ``scale``). ``merge_increment(W, term, s)`` is ``W(s) - W``; ``merge_into_(W, term, s)`` turns ``W`` into ``W(s)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import families

FORMAT_TAG = "magic_portrait.repcontrolnet"
FORMAT_VERSION = "1"
LATENT_DOWNSCALE = 8
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_ADAPTER = "adapter."
_MODAL = "modal."
_COEF_ALPHA = "coef.alpha."
_COEF_BETA = "coef.beta."


# ----------------------------------------------------------------------------------------------------------- adapter


class ConditionAdapter(nn.Module):
    """Condition image ``(B, in_channels, H, W)`` in ``[0, 1]`` -> features ``(B, out_channels, H/d, W/d)``.

    pixel-unshuffle by ``downscale`` (8 = the VAE factor) -> 1x1 conv to ``hidden_channels`` -> SiLU ->
    ``num_layers`` x (3x3 conv + SiLU) -> zero-initialised 3x3 conv to ``out_channels``. The input is mapped to
    ``[-1, 1]`` first. Construction is deterministic given ``seed`` (the global RNG is not touched).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 320,
        hidden_channels: int = 128,
        num_layers: int = 3,
        downscale: int = LATENT_DOWNSCALE,
        *,
        seed: int = 0,
    ):
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("hidden_channels", hidden_channels, 1),
            ("num_layers", num_layers, 0),
            ("downscale", downscale, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ConditionAdapter: {name} must be an integer >= {low}, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.downscale = downscale
        self.unshuffle = nn.PixelUnshuffle(downscale)
        self.conv_in = nn.Conv2d(in_channels * downscale * downscale, hidden_channels, 1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1) for _ in range(num_layers)
        )
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        self.reset_parameters(seed)

    @property
    def config(self) -> dict:
        """Constructor arguments (what the file stores as ``adapter_config``)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "hidden_channels": self.hidden_channels,
            "num_layers": self.num_layers,
            "downscale": self.downscale,
        }

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for conv in (self.conv_in, *self.blocks):
            w = torch.empty(conv.weight.shape)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(conv.weight[0].numel())
            b = torch.empty(conv.bias.shape)
            nn.init.uniform_(b, -bound, bound, generator=gen)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        self.conv_out.weight.zero_()
        self.conv_out.bias.zero_()

    def prepare(self, cond: torch.Tensor, latent_hw: Sequence[int] | None = None) -> torch.Tensor:
        """Bring ``cond`` (B, C, H, W) to ``downscale * latent_hw`` pixels (or to a multiple of ``downscale``)."""
        if cond.ndim != 4 or cond.shape[1] != self.in_channels:
            raise ValueError(
                f"condition image must be (B, {self.in_channels}, H, W), got {tuple(cond.shape)}; "
                "convert a ComfyUI IMAGE (B, H, W, C) with image_bhwc_to_bchw first"
            )
        d = self.downscale
        if latent_hw is not None:
            target = (int(latent_hw[0]) * d, int(latent_hw[1]) * d)
        else:
            target = (max(d, round(cond.shape[-2] / d) * d), max(d, round(cond.shape[-1] / d) * d))
        if tuple(cond.shape[-2:]) != target:
            shrink = target[0] < cond.shape[-2] or target[1] < cond.shape[-1]
            cond = F.interpolate(cond, size=target, mode="bilinear", align_corners=False, antialias=shrink)
        return cond

    def forward(self, cond: torch.Tensor, latent_hw: Sequence[int] | None = None, scale: float = 1.0) -> torch.Tensor:
        cond = self.prepare(cond, latent_hw).to(dtype=self.conv_in.weight.dtype, device=self.conv_in.weight.device)
        h = F.silu(self.conv_in(self.unshuffle(cond * 2.0 - 1.0)))
        for conv in self.blocks:
            h = F.silu(conv(h))
        out = self.conv_out(h)
        return out if scale == 1.0 else out * scale


def image_bhwc_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, C, H, W); a single (H, W, C) image gets a batch axis."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected an image (B, H, W, C), got shape {tuple(image.shape)}")
    return image.permute(0, 3, 1, 2).contiguous()


def add_features(h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``h + features`` with the features cast to ``h`` and repeated over the batch (cond/uncond chunks, batches).

    ``h.shape[0]`` must be a multiple of ``features.shape[0]``; spatial sizes must match.
    """
    if features.shape[1:] != h.shape[1:]:
        raise ValueError(
            f"RepControlNet adapter features {tuple(features.shape[1:])} do not match the UNet features "
            f"{tuple(h.shape[1:])} (channels, latent height, latent width)"
        )
    fb, hb = features.shape[0], h.shape[0]
    if hb != fb:
        if hb % fb:
            raise ValueError(f"batch of the UNet features ({hb}) is not a multiple of the condition batch ({fb})")
        features = features.repeat(hb // fb, *([1] * (features.ndim - 1)))
    return h + features.to(device=h.device, dtype=h.dtype)


# --------------------------------------------------------------------------------------------------------- weights


def strip_unet_prefix(key: str) -> str:
    for prefix in UNET_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def layer_name(key: str) -> str:
    """Module path of a layer from its module path or its ``.weight`` key (``diffusion_model.`` prefix dropped)."""
    key = strip_unet_prefix(key)
    if key.endswith(".bias"):
        raise ValueError(f"'{key}' is a bias; name a layer by its module path or its .weight key")
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _natural_key(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def effective_coefficients(alpha: float, beta: float, strength: float = 1.0) -> tuple[float, float]:
    """``(alpha_s, beta_s)`` for strength s: s = 0 is the base layer (1, 0), s = 1 is (alpha, beta), linear in s."""
    if strength == 1.0:
        return float(alpha), float(beta)
    return 1.0 - strength * (1.0 - alpha), strength * beta


@dataclass
class RepControlNetWeights:
    """Everything a RepControlNet file holds.

    ``modal`` maps UNet state-dict keys (no ``diffusion_model.`` prefix) to modal weights/biases. ``alpha``/``beta``
    are the global coefficients; ``layer_alpha``/``layer_beta`` override them per layer (module path). ``metadata``
    holds extra string metadata kept through save/load (the standard entries are fields of their own).
    """

    adapter_state: dict[str, torch.Tensor]
    adapter_config: dict
    modal: dict[str, torch.Tensor]
    alpha: float = 0.5
    beta: float = 0.5
    layer_alpha: dict[str, float] = field(default_factory=dict)
    layer_beta: dict[str, float] = field(default_factory=dict)
    model_family: str = "sd15"
    condition_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        names = {k[: -len(".weight")] for k in self.modal if k.endswith(".weight")}
        return sorted(names, key=_natural_key)

    @property
    def model_channels(self) -> int:
        return int(self.adapter_config["out_channels"])

    def coefficients(self, layer: str, strength: float = 1.0) -> tuple[float, float]:
        layer = layer_name(layer)
        a = self.layer_alpha.get(layer, self.alpha)
        b = self.layer_beta.get(layer, self.beta)
        return effective_coefficients(a, b, strength)

    def build_adapter(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ConditionAdapter:
        adapter = ConditionAdapter(**self.adapter_config)
        adapter.load_state_dict(self.adapter_state, strict=True)
        adapter.requires_grad_(False).eval()
        if device is not None or dtype is not None:
            adapter.to(device=device, dtype=dtype)
        return adapter

    def num_parameters(self) -> dict[str, int]:
        return {
            "adapter": sum(t.numel() for t in self.adapter_state.values()),
            "modal": sum(t.numel() for t in self.modal.values()),
        }

    def describe(self) -> str:
        n = self.num_parameters()
        return (
            f"RepControlNet for {self.model_family or 'unknown'} ({self.condition_type or 'unspecified'} condition): "
            f"{len(self.layers)} layers, {n['modal'] / 1e6:.2f}M modal + {n['adapter'] / 1e6:.2f}M adapter parameters, "
            f"alpha {self.alpha:g}, beta {self.beta:g}"
            + (
                f", {len(self.layer_alpha) + len(self.layer_beta)} per-layer overrides"
                if self.layer_alpha or self.layer_beta
                else ""
            )
        )


def init_weights_from_base(
    base_state: Mapping[str, torch.Tensor],
    layer_keys: Iterable[str],
    *,
    adapter_config: Mapping,
    alpha: float = 0.5,
    beta: float = 0.5,
    seed: int = 0,
    model_family: str = "sd15",
    condition_type: str = "",
) -> RepControlNetWeights:
    """Fresh weights that reproduce the base model: ``W_m = W * (1 - alpha) / beta`` (so ``alpha W + beta W_m = W``;
    with the default ``alpha = beta = 0.5`` that is ``W_m = W`` and the start is bit-exact) and a zero-output adapter."""
    if beta == 0:
        raise ValueError("beta must be non-zero: with beta 0 the modal weights have no effect")
    base = {strip_unet_prefix(k): v for k, v in base_state.items()}
    factor = (1.0 - alpha) / beta
    modal: dict[str, torch.Tensor] = {}
    missing = []
    for layer in dict.fromkeys(layer_name(k) for k in layer_keys):
        w = base.get(layer + ".weight")
        if w is None:
            missing.append(layer + ".weight")
            continue
        for key in (layer + ".weight", layer + ".bias"):
            if key in base:
                t = base[key].detach().to(torch.float32)
                modal[key] = (t.clone() if factor == 1.0 else t * factor).contiguous()
    if missing:
        raise ValueError(_list_problem(f"{len(missing)} layer(s) are not in the base weights", missing))
    adapter = ConditionAdapter(**dict(adapter_config), seed=seed)
    return RepControlNetWeights(
        adapter_state={k: v.detach().clone() for k, v in adapter.state_dict().items()},
        adapter_config=adapter.config,
        modal=modal,
        alpha=float(alpha),
        beta=float(beta),
        model_family=model_family,
        condition_type=condition_type,
    )


# -------------------------------------------------------------------------------------------------------- file I/O


def _list_problem(head: str, items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"{head}: {shown}{more}"


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def to_tensors_and_metadata(weights: RepControlNetWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in weights.adapter_state.items():
        tensors[_ADAPTER + k] = v.detach().cpu().contiguous()
    for k, v in weights.modal.items():
        tensors[_MODAL + k] = v.detach().cpu().contiguous()
    tensors["alpha"] = _scalar(weights.alpha)
    tensors["beta"] = _scalar(weights.beta)
    for k, v in weights.layer_alpha.items():
        tensors[_COEF_ALPHA + layer_name(k)] = _scalar(v)
    for k, v in weights.layer_beta.items():
        tensors[_COEF_BETA + layer_name(k)] = _scalar(v)
    # safetensors refuses tensors that share memory: give each its own storage.
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(ptr)
    metadata = {str(k): str(v) for k, v in weights.metadata.items()}
    metadata.update(
        {
            "format": FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "model_family": str(weights.model_family),
            "condition_type": str(weights.condition_type),
            "adapter_config": json.dumps(dict(weights.adapter_config), sort_keys=True),
            "model_channels": str(int(weights.adapter_config["out_channels"])),
        }
    )
    return tensors, metadata


def save_repcontrolnet(path: str | os.PathLike, weights: RepControlNetWeights) -> None:
    """Write ``weights`` in the documented format (validated the same way a load is, before anything is written)."""
    from safetensors.torch import save_file

    tensors, metadata = to_tensors_and_metadata(weights)
    from_tensors_and_metadata(tensors, metadata, os.fspath(path))  # refuse to write a file we could not read back
    tmp = os.fspath(path) + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_repcontrolnet(path: str | os.PathLike, device: str | torch.device = "cpu") -> RepControlNetWeights:
    """Read and validate a RepControlNet file; anything wrong is a ValueError naming the file and the problem."""
    from safetensors import safe_open

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"RepControlNet file '{name}' does not exist")
    try:
        with safe_open(name, framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"'{name}' is not a readable .safetensors file: {e}") from e
    return from_tensors_and_metadata(tensors, metadata, name)


def from_tensors_and_metadata(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], file_name: str = "<memory>"
) -> RepControlNetWeights:
    def bad(msg: str) -> ValueError:
        return ValueError(f"RepControlNet file '{file_name}': {msg}")

    tag = metadata.get("format")
    if tag != FORMAT_TAG:
        hint = " (is it a ControlNet, LoRA or checkpoint file?)" if tag is None else ""
        raise bad(f"format tag is {tag!r}, expected '{FORMAT_TAG}'{hint}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise bad(f"format_version {version!r} is not supported (this Magic Portrait reads version {FORMAT_VERSION})")
    try:
        cfg = json.loads(metadata.get("adapter_config", ""))
    except json.JSONDecodeError as e:
        raise bad(f"adapter_config metadata is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise bad(f"adapter_config metadata must be a JSON object, got {type(cfg).__name__}")
    try:
        adapter = ConditionAdapter(**cfg)
    except (TypeError, ValueError) as e:
        raise bad(f"adapter_config {cfg} is not a valid ConditionAdapter configuration ({e})") from e
    try:
        mc = int(metadata.get("model_channels", ""))
    except ValueError as e:
        raise bad(f"model_channels metadata {metadata.get('model_channels')!r} is not an integer") from e
    if mc != adapter.out_channels:
        raise bad(f"model_channels metadata ({mc}) differs from the adapter's out_channels ({adapter.out_channels})")

    adapter_state: dict[str, torch.Tensor] = {}
    modal: dict[str, torch.Tensor] = {}
    coef: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in tensors.items():
        if k.startswith(_ADAPTER):
            adapter_state[k[len(_ADAPTER) :]] = v
        elif k.startswith(_MODAL):
            modal[k[len(_MODAL) :]] = v
        elif k in ("alpha", "beta") or k.startswith((_COEF_ALPHA, _COEF_BETA)):
            coef[k] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise bad(_list_problem(f"{len(unexpected)} unexpected tensor(s)", sorted(unexpected)))

    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(adapter_state))
    extra = sorted(set(adapter_state) - set(expected))
    wrong = [
        f"{k} {tuple(adapter_state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(adapter_state))
        if adapter_state[k].shape != expected[k].shape
    ]
    for label, items in (
        ("missing adapter tensor(s)", missing),
        ("unknown adapter tensor(s)", extra),
        ("adapter shape mismatch(es)", wrong),
    ):
        if items:
            raise bad(_list_problem(f"{len(items)} {label} for adapter_config {cfg}", items))

    problems = []
    for k, v in sorted(modal.items()):
        if not v.is_floating_point():
            problems.append(f"modal.{k} has dtype {v.dtype}")
        elif k.endswith(".weight"):
            if v.ndim not in (2, 4):
                problems.append(f"modal.{k} is {v.ndim}-D (modal weights are 2-D linear or 4-D conv)")
        elif k.endswith(".bias"):
            w = modal.get(k[: -len(".bias")] + ".weight")
            if w is None:
                problems.append(f"modal.{k} has no matching weight")
            elif v.ndim != 1 or v.shape[0] != w.shape[0]:
                problems.append(f"modal.{k} has shape {tuple(v.shape)}, its weight needs ({w.shape[0]},)")
        else:
            problems.append(f"modal.{k} is neither a .weight nor a .bias")
    if problems:
        raise bad(_list_problem(f"{len(problems)} bad modal tensor(s)", problems))

    layers = {k[: -len(".weight")] for k in modal if k.endswith(".weight")}

    def scalar(key: str) -> float:
        t = coef[key]
        if t.numel() != 1 or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise bad(f"coefficient '{key}' must be one finite float, got shape {tuple(t.shape)} dtype {t.dtype}")
        return float(t.reshape(()).item())

    for key in ("alpha", "beta"):
        if key not in coef:
            raise bad(f"the global coefficient tensor '{key}' is missing")
    per_layer: dict[str, dict[str, float]] = {"alpha": {}, "beta": {}}
    orphans = []
    for key in coef:
        for which, prefix in (("alpha", _COEF_ALPHA), ("beta", _COEF_BETA)):
            if key.startswith(prefix):
                layer = key[len(prefix) :]
                if layer not in layers:
                    orphans.append(key)
                else:
                    per_layer[which][layer] = scalar(key)
    if orphans:
        raise bad(
            _list_problem(f"{len(orphans)} per-layer coefficient(s) name layers with no modal weight", sorted(orphans))
        )

    standard = {"format", "format_version", "model_family", "condition_type", "adapter_config", "model_channels"}
    return RepControlNetWeights(
        adapter_state=adapter_state,
        adapter_config=adapter.config,
        modal=modal,
        alpha=scalar("alpha"),
        beta=scalar("beta"),
        layer_alpha=per_layer["alpha"],
        layer_beta=per_layer["beta"],
        model_family=metadata.get("model_family", ""),
        condition_type=metadata.get("condition_type", ""),
        metadata={k: v for k, v in metadata.items() if k not in standard},
    )


# ------------------------------------------------------------------------------------------------------ validation


def _family(name: str | None) -> str:
    """The canonical family when the spelling is one ``families`` knows, else the name as written (lower case)."""
    written = (name or "").strip().lower()
    return families.normalize(written) or written


def validate_against_unet(
    weights: RepControlNetWeights,
    unet_state_dict_shapes: Mapping[str, Sequence[int]],
    model_family: str,
    file_name: str,
) -> None:
    """Refuse a file that does not fit this UNet, with a message that says what to do.

    ``unet_state_dict_shapes``: UNet state-dict key -> shape (keys with or without the ``diffusion_model.`` prefix).
    A family of ``""``/``"unknown"`` on either side skips the family check (the shapes are still checked).
    """
    file_family, unet_family = _family(weights.model_family), _family(model_family)
    if not families.is_unknown(file_family) and not families.is_unknown(unet_family) and file_family != unet_family:
        raise ValueError(
            f"RepControlNet '{file_name}' was made for {file_family} but the MODEL is {unet_family}: "
            f"load a RepControlNet trained for {unet_family}, or use a {file_family} checkpoint"
        )
    shapes = {strip_unet_prefix(k): tuple(int(s) for s in v) for k, v in unet_state_dict_shapes.items()}
    missing, mismatched, no_bias = [], [], []
    for key, t in sorted(weights.modal.items(), key=lambda kv: _natural_key(kv[0])):
        if key not in shapes:
            missing.append(key)
        elif tuple(t.shape) != shapes[key]:
            mismatched.append(f"{key} file {tuple(t.shape)} vs MODEL {shapes[key]}")
    for layer in weights.layers:
        if layer + ".bias" in shapes and layer + ".bias" not in weights.modal:
            no_bias.append(layer + ".bias")
    problems = []
    if missing:
        problems.append(
            _list_problem(f"{len(missing)} of its {len(weights.modal)} modal keys are not in the MODEL's UNet", missing)
        )
    if mismatched:
        problems.append(_list_problem(f"{len(mismatched)} shape mismatch(es)", mismatched))
    if no_bias:
        problems.append(_list_problem(f"{len(no_bias)} layer(s) have a bias in the MODEL but no modal bias", no_bias))
    conv_in = shapes.get("input_blocks.0.0.weight")
    if conv_in is not None and conv_in[0] != weights.model_channels:
        problems.append(
            f"its adapter outputs {weights.model_channels} channels but the MODEL's first block has {conv_in[0]} (model_channels)"
        )
    if problems:
        fam = "" if families.is_unknown(file_family) else f" ({file_family})"
        raise ValueError(
            f"RepControlNet '{file_name}'{fam} does not fit this MODEL: "
            + "; ".join(problems)
            + ". It was probably trained for a different base architecture."
        )


# -------------------------------------------------------------------------------------------------- layer choice

_RES_SUFFIXES = (".in_layers.2", ".out_layers.3", ".skip_connection")
_DOWN_SUFFIXES = (".op",)
_ATTN_SUFFIXES = (
    ".proj_in",
    ".proj_out",
    ".attn1.to_q",
    ".attn1.to_k",
    ".attn1.to_v",
    ".attn1.to_out.0",
    ".attn2.to_q",
    ".attn2.to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
)
LAYER_PRESETS = {
    "encoder": _RES_SUFFIXES + _DOWN_SUFFIXES + _ATTN_SUFFIXES,
    "encoder_convs": _RES_SUFFIXES + _DOWN_SUFFIXES,
    "encoder_attention": _ATTN_SUFFIXES,
}
_ENCODER_RE = re.compile(r"^(input_blocks\.([0-9]+)|middle_block)\.")


def default_layer_keys(
    unet_state_dict_shapes: Mapping[str, Sequence[int]], family: str = "sd15", preset: str = "encoder"
) -> list[str]:
    """The layers RepControlNet copies by default: conv/linear layers of the encoder (input blocks 1.. + middle block),
    as the paper copies the encoder's conv/linear layers (the part a ControlNet duplicates).

    ``encoder`` (default): ResBlock convs ``in_layers.2``/``out_layers.3``/``skip_connection``, downsamplers ``op``,
    and in the transformers ``proj_in``/``proj_out``, self-attention ``to_q/k/v/to_out.0``, cross-attention ``to_q`` and
    ``to_out.0`` and the feed-forward ``ff.net.0.proj``/``ff.net.2``. Left out: ``conv_in`` (input block 0, whose
    output receives the adapter features), the timestep-only ``emb_layers``/``time_embed``/``label_emb``, the
    text-only cross-attention ``to_k``/``to_v``, norms, and the whole decoder. ``encoder_convs`` keeps only ResBlock
    convs and downsamplers (smaller files); ``encoder_attention`` only the transformer linears. SD1.5 and SDXL share
    ComfyUI's key layout, so the rules are name-based for every family (``family`` is accepted for future
    family-specific choices); only 2-D (linear) and 4-D (conv2d) weights are taken. Returns module paths sorted with
    numeric parts compared as numbers.
    """
    if preset not in LAYER_PRESETS:
        raise ValueError(f"unknown RepControlNet layer preset {preset!r}; choose one of {sorted(LAYER_PRESETS)}")
    suffixes = LAYER_PRESETS[preset]
    found = []
    for key, shape in unet_state_dict_shapes.items():
        key = strip_unet_prefix(key)
        if not key.endswith(".weight") or len(tuple(shape)) not in (2, 4):
            continue
        layer = key[: -len(".weight")]
        m = _ENCODER_RE.match(layer)
        if m is None or (m.group(2) is not None and int(m.group(2)) == 0):
            continue
        if layer.endswith(suffixes):
            found.append(layer)
    if not found:
        raise ValueError(
            f"no encoder conv/linear layers found for preset {preset!r} ({family}): expected UNet state-dict keys like "
            "'input_blocks.1.0.in_layers.2.weight'"
        )
    return sorted(set(found), key=_natural_key)


# ---------------------------------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class MergeTerm:
    """One RepControlNet's share of one merged tensor at strength 1: the merge adds
    ``weight_scale * W + modal_scale * W_m`` to the tensor ``W`` it is given (``weight_scale = alpha - 1``,
    ``modal_scale = beta``), so ``W + increment = alpha * W + beta * W_m``. ``modal`` is the file's own tensor (never
    copied); the increment is linear in the strength, which scales it as a whole."""

    modal: torch.Tensor
    weight_scale: float
    modal_scale: float

    @property
    def is_zero(self) -> bool:
        return self.weight_scale == 0.0 and self.modal_scale == 0.0


def merge_terms(weights: RepControlNetWeights, *, key_prefix: str = "") -> dict[str, MergeTerm]:
    """``{key_prefix + unet key: MergeTerm}`` for every modal tensor, per-layer coefficients applied."""
    terms = {}
    for key, modal in weights.modal.items():
        alpha, beta = weights.coefficients(key.rsplit(".", 1)[0])
        terms[key_prefix + key] = MergeTerm(modal, alpha - 1.0, beta)
    return terms


def merge_increment(weight: torch.Tensor, term: MergeTerm, strength: float = 1.0) -> torch.Tensor | None:
    """``strength * (weight_scale * weight + modal_scale * W_m)`` in ``weight``'s dtype and device, or None when it is
    exactly zero (strength 0, or alpha 1 with beta 0), so the caller leaves the weight bit-identical.

    Memory: one new tensor of ``weight``'s size, plus a transient cast of ``W_m`` when its dtype or device differs;
    nothing full-size is kept per layer. ``weight`` is read, never written."""
    if strength == 0.0 or term.is_zero:
        return None
    modal = term.modal.to(device=weight.device, dtype=weight.dtype)
    increment = torch.mul(modal, term.modal_scale * strength)
    del modal
    return increment.add_(weight.detach(), alpha=term.weight_scale * strength)


def merge_into_(weight: torch.Tensor, term: MergeTerm, strength: float = 1.0) -> torch.Tensor:
    """``weight += strength * (weight_scale * weight + modal_scale * W_m)`` in place (``weight`` becomes
    ``alpha_s * W + beta_s * W_m``) and returned: no temporary but a cast of ``W_m`` when its dtype or device differs.
    Strength 0 or a zero term leaves ``weight`` untouched, bit for bit."""
    if strength == 0.0 or term.is_zero:
        return weight
    modal = term.modal.to(device=weight.device, dtype=weight.dtype)
    weight.mul_(1.0 + strength * term.weight_scale)
    return weight.add_(modal, alpha=strength * term.modal_scale)


def merge_tensor(w: torch.Tensor, wm: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Differentiable ``alpha * w + beta * wm`` in float32 (gradients flow into ``wm``); used by training."""
    return alpha * w.to(device=wm.device, dtype=torch.float32) + beta * wm.to(torch.float32)
