"""Reference formulae the tests hold the pack to, written in plain torch. They lived in magic_core while only tests
called them; the pack never ships them. Each works on objects from either import of the pack (``magic_core`` as a
library or the ComfyUI custom-node package), since it only reads their public fields."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from magic_core.repcontrolnet import strip_unet_prefix

# --------------------------------------------------------------------------------------------------- RepControlNet


def merged_state(weights, base_state: Mapping[str, torch.Tensor], strength: float = 1.0, *,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """RepControlNet's merged weights ``alpha_s * W + beta_s * W_m`` for its modal keys only, computed in float32 and
    returned in ``dtype`` (default: the base tensor's) on the base tensor's device. ``base_state`` keys may carry the
    ``diffusion_model.`` prefixes."""
    base = {strip_unet_prefix(k): v for k, v in base_state.items()}
    missing = [k for k in weights.modal if k not in base or base[k].shape != weights.modal[k].shape]
    if missing:
        raise ValueError(f"cannot merge RepControlNet: base weights missing or of another shape: {missing[:4]}")
    out = {}
    for key, modal in weights.modal.items():
        alpha, beta = weights.coefficients(key.rsplit(".", 1)[0], strength)
        w = base[key]
        merged = alpha * w.detach().to(torch.float32) + beta * modal.to(device=w.device, dtype=torch.float32)
        out[key] = merged.to(dtype or w.dtype)
    return out


@contextlib.contextmanager
def unmerged_forward(unet: nn.Module, weights, strength: float = 1.0, *, prefix: str = "") -> Iterator[None]:
    """Run ``unet`` unmerged while the context is open: each RepControlNet layer returns
    ``alpha_s * layer(x) + beta_s * layer_op(x, W_m, b_m)`` (forward hooks, removed on exit; the module is not
    modified). ``prefix`` locates the UNet inside ``unet``. The adapter's features are the caller's to add."""
    named = dict(unet.named_modules())
    missing = [prefix + layer for layer in weights.layers if prefix + layer not in named]
    if missing:
        raise ValueError(f"{len(missing)} RepControlNet layer(s) not found in the module: {missing[:4]}")
    handles = []

    def make_hook(layer: str, mod: nn.Module):
        alpha, beta = weights.coefficients(layer, strength)
        modal_w, modal_b = weights.modal[layer + ".weight"], weights.modal.get(layer + ".bias")

        def hook(_mod, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            w = modal_w.to(device=x.device, dtype=x.dtype)
            b = None if modal_b is None else modal_b.to(device=x.device, dtype=x.dtype)
            extra = F.linear(x, w, b) if isinstance(mod, nn.Linear) else mod._conv_forward(x, w, b)
            return alpha * output + beta * extra

        return hook

    try:
        for layer in weights.layers:
            mod = named[prefix + layer]
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ValueError(f"RepControlNet layers must be nn.Linear or nn.Conv1d/2d/3d: {prefix + layer}")
            handles.append(mod.register_forward_hook(make_hook(layer, mod), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -------------------------------------------------------------------------------------------------------- KV stores


def store_has(store, layer_key, sigma) -> bool:
    """The store holds features for this layer at this sigma (what ``get`` would return rather than refuse)."""
    try:
        store.get(layer_key, sigma)
    except KeyError:
        return False
    return True


def kept_sigmas(store) -> tuple[float, ...]:
    """The sigmas of the steps the store keeps."""
    return tuple(store.sigmas[i] for i in store.step_indices)


def store_is_complete(store) -> bool:
    """Every selected (layer, step) pair was recorded."""
    return not store.missing()


# ------------------------------------------------------------------------------------------------- Gaussian prior


def prior_growth(prior, sigma_low: float, sigma_high: float) -> float:
    """The largest factor by which a Gaussian prior's probability-flow ODE stretches a deviation between two sigmas
    (the flow's gain at the prior's smallest std): ``sqrt((s^2 + sigma_high^2) / (s^2 + sigma_low^2))``."""
    var = float(prior.std.min()) ** 2
    return ((var + float(sigma_high) ** 2) / (var + float(sigma_low) ** 2)) ** 0.5
