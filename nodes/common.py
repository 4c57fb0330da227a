"""Small ComfyUI-side helpers shared by the node modules: names, input errors, model folders, model family, latents."""

from __future__ import annotations

import os

import comfy.model_base
import comfy.sample
import folder_paths
import torch

from ..magic_core import faces as fc
from ..magic_core import families

PREFIX = "MagicPortrait_"
CATEGORY = "Magic Portrait"


class NodeInputError(ValueError):
    """Bad input to a node; the message names the node and the input, and says what to do."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"[{node}] input '{input_name}': {message}")


# Every face crop's margin (magic_core.face_crop): room on each side of the face, in face sizes.
FACE_MARGIN_TOOLTIP = ("Room around the face on each side, as a share of its size (crop side = (1 + 2 x margin) x "
                       "face size), the same in every Magic Portrait node that crops faces.")

# A float widget at -1 takes its value from a preset (fusion presets, a feature store's fusion preset).
FROM_PRESET = -1.0


def preset_or(value: float, preset_value: float) -> float:
    """A widget's value, or the preset's where the widget is at FROM_PRESET (any negative: the widgets' minimum)."""
    return preset_value if value < 0 else float(value)


def require_negative(node: str, cfg: float, negative) -> None:
    """cfg other than 1 runs the unconditional branch, which needs a negative conditioning."""
    if cfg != 1.0 and negative is None:
        raise NodeInputError(node, "negative", f"cfg is {cfg}: connect a negative conditioning or set cfg to 1")


def check_percent_range(node: str, start: float, end: float, note: str = "") -> None:
    """A step range (start_percent, end_percent) must not be reversed; `note` says where preset values came from."""
    if start > end:
        raise NodeInputError(node, "start_percent", f"{start:g} is above end_percent {end:g}{note}")


def parse_face_indices(node: str, text: str, input_name: str = "face_indices") -> list[int] | None:
    """A face_indices widget ('all', '0, 2', '-1') as indices, or None for all faces."""
    try:
        return fc.parse_indices(text)
    except ValueError as err:
        raise NodeInputError(node, input_name, str(err)) from None


def register_model_folder(name: str, extensions) -> None:
    """Register ``models/<name>`` with folder_paths (idempotent). Paths a user's extra_model_paths.yaml gave the same
    name (read before custom nodes load) stay first; the default folder is appended and the extensions merged."""
    default = os.path.join(folder_paths.models_dir, name)
    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))


def model_family(model) -> str:
    """The MODEL's family in ``magic_core.families`` terms; other architectures by their ComfyUI class name."""
    base = model.model
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return families.SDXL
    if type(base) is comfy.model_base.BaseModel:
        context_dim = getattr(base.model_config, "unet_config", {}).get("context_dim")
        return families.SD15 if context_dim in (768, None) else families.SD2X
    return type(base).__name__.lower()


def layer_family(model, node: str, input_name: str = "model") -> str:
    """The layer-table family of a UNet model: sd15 (SD1.x and SD2.x share block positions) or sdxl."""
    family = model_family(model)
    table = families.layer_table_family(family)
    if table is not None:
        return table
    raise NodeInputError(node, input_name, f"this node supports SD1.5/SD2.x/SDXL UNets, not {family}")


def check_latent(node: str, model, latent: dict, input_name: str = "latent") -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise NodeInputError(node, input_name, "expected a LATENT (a dict with 'samples')")
    if samples.shape[0] == 0:
        raise NodeInputError(node, input_name, "the latent batch is empty")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    channels = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise NodeInputError(
            node,
            input_name,
            f"latent of shape {tuple(samples.shape)} does not belong to this {model_family(model)} model "
            f"(it expects [B, {channels}, H, W]); encode the image with this model's VAE",
        )
    recorded, current = latent.get(LATENT_FORMAT_KEY), latent_format_name(model)
    if recorded is not None and recorded != current:
        raise NodeInputError(node, input_name, f"latent is in the {recorded} latent format but this "
                             f"{model_family(model)} MODEL uses {current} (same channel count, another latent space); "
                             "encode the image with this model's VAE, or use the model that made the latent")
    return samples


# Where the pack's own LATENT outputs name the latent format (class name) of the model that made them. SD1.5 and SDXL
# latents both have 4 channels; only this tells them apart. VAEEncode's bare {"samples"} carries nothing.
LATENT_FORMAT_KEY = "magic_latent_format"


def latent_format_name(model) -> str:
    return type(model.get_model_object("latent_format")).__name__


def tag_latent(latent: dict, model) -> dict:
    """`latent` (a new dict) naming the latent format of `model`, whose latent space its samples are in."""
    return {**latent, LATENT_FORMAT_KEY: latent_format_name(model)}
