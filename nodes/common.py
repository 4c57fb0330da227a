"""Small ComfyUI-side helpers shared by the node modules: model identity, family, guided sampling runs."""

from __future__ import annotations

import hashlib
import os

import comfy.model_base
import comfy.sample
import comfy.samplers
import folder_paths
import latent_preview
import torch

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
    base = model.model
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return "sdxl"
    if type(base) is comfy.model_base.BaseModel:
        context_dim = getattr(base.model_config, "unet_config", {}).get("context_dim")
        return "sd15" if context_dim in (768, None) else "sd2x"
    return type(base).__name__.lower()


def layer_family(model, node: str, input_name: str = "model") -> str:
    """The layer-table family of a UNet model: sd15 (SD1.x and SD2.x share block positions) or sdxl."""
    family = model_family(model)
    if family in ("sd15", "sdxl"):
        return family
    if family == "sd2x":
        return "sd15"  # same block positions as SD1.5
    raise NodeInputError(node, input_name, f"this node supports SD1.5/SD2.x/SDXL UNets, not {family}")


def model_identity(model) -> str:
    """A stable id for the weights a MODEL computes with: architecture, prediction type, a hash of two layers,
    and the weight patches (LoRAs, merges) attached to this clone. Clones of one checkpoint share it."""
    base = model.model
    state = base.diffusion_model.state_dict()
    keys = sorted(state)
    digest = hashlib.sha256()
    digest.update(type(base).__name__.encode())
    digest.update(str(base.model_type).encode())
    for key in (keys[0], keys[-1]):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    for key in sorted(model.patches):
        digest.update(key.encode())
        digest.update(str(len(model.patches[key])).encode())
    return f"{model_family(model)}:{digest.hexdigest()[:16]}"


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
    family = latent.get("magic_family")
    if family is not None and family != model_family(model):
        raise NodeInputError(
            node, input_name, f"latent was made with a {family} model but the MODEL is {model_family(model)}"
        )
    return samples


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
