"""A MODEL's fingerprint: what inversion records and KV stores must share with the MODEL that later uses them (the
same checkpoint, architecture and latent space), and a description of the weight patches (LoRAs, attention
multipliers) that may differ. "Fingerprint" is the checkpoint's; "identity" in this pack always means a person."""

from __future__ import annotations

import hashlib
import json

import torch

from .common import model_family

FINGERPRINT_FIELDS = ("model family", "prediction type", "latent format", "UNet architecture", "checkpoint weights")
_FINGERPRINT_ELEMENTS = 1 << 16


def model_fingerprint(model) -> str:
    """What inversion records and KV stores must share with the MODEL that uses them: the same latent space and
    architecture from the same checkpoint. ``family/prediction/latent format/architecture digest/weights digest``.

    Weight patches (LoRAs, UNetSelfAttentionMultiply, merges) are left out: a record or store made with the base
    model may be used with a patched one (``weight_patch_signature`` describes them for the node's text). The
    weights digest reads the checkpoint's own values even while another clone's patches sit in the weights in place
    (ComfyUI keeps the originals in the patcher's backup), so loading another clone never changes the fingerprint.
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


def fingerprint_difference(recorded: str, current: str) -> str | None:
    """None when two ``model_fingerprint`` values agree, else what differs, in words."""
    if recorded == current:
        return None
    a, b = str(recorded).split("/"), str(current).split("/")
    if len(a) != len(FINGERPRINT_FIELDS) or len(b) != len(FINGERPRINT_FIELDS):
        return f"another model ({recorded}; this MODEL is {current})"
    for field, x, y in zip(FINGERPRINT_FIELDS, a, b, strict=True):
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
