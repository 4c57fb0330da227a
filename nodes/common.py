"""Small ComfyUI-side helpers shared by the node modules: model identity, family, guided sampling runs."""

from __future__ import annotations

import hashlib
import json
import os

import comfy.model_base
import comfy.sample
import comfy.samplers
import folder_paths
import latent_preview
import torch

from ..magic_core import families

PREFIX = "MagicPortrait_"
CATEGORY = "Magic Portrait"


class NodeInputError(ValueError):
    """Bad input to a node; the message names the node and the input, and says what to do."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"[{node}] input '{input_name}': {message}")


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


IDENTITY_FIELDS = ("model family", "prediction type", "latent format", "UNet architecture", "checkpoint weights")
_FINGERPRINT_ELEMENTS = 1 << 16


def model_identity(model) -> str:
    """What inversion records and KV stores must share with the MODEL that uses them: the same latent space and
    architecture from the same checkpoint. ``family/prediction/latent format/architecture digest/weights digest``.

    Weight patches (LoRAs, UNetSelfAttentionMultiply, merges) are left out: a record or store made with the base
    model may be used with a patched one (``weight_patch_signature`` describes them for the node's text). The
    weights digest reads the checkpoint's own values even while another clone's patches sit in the weights in place
    (ComfyUI keeps the originals in the patcher's backup), so loading another clone never changes the identity.
    """
    base = model.model
    state = base.diffusion_model.state_dict()
    keys = sorted(state)
    weights = hashlib.sha256()
    for key in (keys[0], keys[len(keys) // 2], keys[-1]):
        tensor = _original_weight(model, "diffusion_model." + key, state[key]).detach()
        flat = tensor.reshape(-1)[:_FINGERPRINT_ELEMENTS].to("cpu", torch.float32).contiguous()
        weights.update(f"{key}:{tuple(tensor.shape)}".encode())
        weights.update(flat.numpy().tobytes())
    config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    arch = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    prediction = getattr(base.model_type, "name", str(base.model_type))
    latent = type(base.latent_format).__name__
    return f"{model_family(model)}/{prediction}/{latent}/{arch}/{weights.hexdigest()[:16]}"


def _original_weight(model, full_key: str, current: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own value of a weight: the patcher's backup while patches are applied in place."""
    for backup in (getattr(model, "hook_backup", None) or {}, getattr(model, "backup", None) or {}):
        entry = backup.get(full_key)
        if entry is not None:
            return entry[0]
    return current


def identity_difference(recorded: str, current: str) -> str | None:
    """None when two ``model_identity`` values agree, else what differs, in words."""
    if recorded == current:
        return None
    a, b = str(recorded).split("/"), str(current).split("/")
    if len(a) != len(IDENTITY_FIELDS) or len(b) != len(IDENTITY_FIELDS):
        return f"another model ({recorded}; this MODEL is {current})"
    for field, x, y in zip(IDENTITY_FIELDS, a, b, strict=True):
        if x != y:
            if field == "checkpoint weights":
                return f"another checkpoint (the same {a[0]} architecture with other weights: {recorded} vs {current})"
            return f"another {field} ({x}; this MODEL has {y})"
    return None


def weight_patch_signature(model) -> str:
    """A short description of the weight patches on a MODEL clone: '' for none, else '<n> patched keys:<digest>'.
    The digest covers keys, strengths and (sampled) patch contents, so other LoRA strengths or files differ."""
    patches = getattr(model, "patches", None) or {}
    if not patches:
        return ""
    digest = hashlib.sha256()
    for key in sorted(patches):
        digest.update(key.encode())
        for entry in patches[key]:
            entry = tuple(entry)
            digest.update(repr([_plain(x) for x in entry[:1] + entry[2:]]).encode())
            _fingerprint(digest, entry[1] if len(entry) > 1 else None)
    return f"{len(patches)} patched keys:{digest.hexdigest()[:12]}"


def _plain(value):
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return getattr(value, "__qualname__", type(value).__name__)


def _fingerprint(digest, value, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(flat[::step].to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _fingerprint(digest, item, depth + 1)
    elif hasattr(value, "weights"):  # ComfyUI's weight adapters (LoRA, LoHa, ...)
        digest.update(type(value).__name__.encode())
        _fingerprint(digest, value.weights, depth + 1)
    else:
        digest.update(repr(_plain(value)).encode())


def describe_weight_patches(signature: str) -> str:
    return signature.split(":", 1)[0] if signature else "none"


def weight_patch_note(recorded: str, current: str, what: str) -> str | None:
    """A note for a node's text when the MODEL's weight patches differ from those `what` was made with."""
    if recorded == current:
        return None
    return (f"weight patches differ from {what}'s ({describe_weight_patches(recorded)}; this MODEL: "
            f"{describe_weight_patches(current)}): allowed, the same checkpoint")


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


def schedule(model, scheduler: str, steps: int, strength: float) -> torch.Tensor:
    """The sampling schedule (descending, ending at 0) that a partial inversion of `strength` pairs with."""
    from ..magic_core.inversion import strength_steps

    covered = strength_steps(steps, strength)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    return sigmas[-(covered + 1) :]


def guided_run(model, positive, negative, cfg: float, samples: torch.Tensor, sampler, sigmas: torch.Tensor, seed=0):
    """Run a sampler through ComfyUI's CFGGuider, so conditioning, ControlNets, hooks and patches all apply."""
    guider = comfy.samplers.CFGGuider(model)
    if negative is None:
        if cfg != 1.0:
            raise ValueError("a negative conditioning is needed when cfg is not 1")
        negative = positive  # never evaluated: cfg 1 skips the unconditional pass
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    noise = torch.zeros_like(samples)
    out = guider.sample(noise, samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed)
    return out.to(device="cpu", dtype=torch.float32)
