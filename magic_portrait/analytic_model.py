"""A ComfyUI MODEL whose denoiser is known exactly: `magic_core.gaussian_prior.GaussianPrior` behind a real
ModelPatcher, for benchmarks and tests that need each sampler's own error rather than a random network's.

Route: a clone of a tiny real model (its model_sampling, latent format and conditioning path stay ComfyUI's) with a
`model_function_wrapper` (`ModelPatcher.set_model_unet_function_wrapper`). ComfyUI's `calc_cond_batch` hands that
wrapper the sampler's state x and sigma where it would call `BaseModel.apply_model`, and takes what it returns as
the denoised x0; the wrapper returns the prior's exact posterior mean instead of calling the UNet. Everything around
it is ComfyUI's own sampling path: CFGGuider, KSAMPLER, process_latent_in/out, noise scaling, cfg and conds.

The prior lives in the model's latent space (after `process_in`): sample clean latents there and `process_out`
them into a LATENT, as VAEEncode's output would be.
"""

from __future__ import annotations

import torch

from magic_core.gaussian_prior import GaussianPrior
from magic_core.sharing import SharedOnCopy


class AnalyticDenoiser(SharedOnCopy):
    """The model function wrapper: (apply_model, args) -> exact x0, never calling apply_model. Shared on copy:
    model_options are deep-copied per run and the call counter must stay one."""

    def __init__(self, prior: GaussianPrior):
        self.prior = prior
        self.calls = 0

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        self.calls += 1
        return self.prior.denoise(args["input"], args["timestep"])


def analytic_model(base, prior: GaussianPrior):
    """A clone of the ModelPatcher `base` whose denoiser is `prior`'s exact one (see the module docstring)."""
    clone = base.clone()
    clone.set_model_unet_function_wrapper(AnalyticDenoiser(prior))
    return clone


def prior_for(model, latent_shape, seed: int = 0, compute_dtype: torch.dtype | None = None) -> GaussianPrior:
    """A random per-element Gaussian prior over [C, H, W] model-space latents of `model`'s latent format."""
    channels = model.get_model_object("latent_format").latent_channels
    return GaussianPrior.random((channels, *latent_shape), seed=seed, compute_dtype=compute_dtype)


def clean_latent(model, prior: GaussianPrior, batch: int = 1, seed: int = 0) -> dict:
    """A LATENT (as VAEEncode gives it: before process_in) whose model-space samples are drawn from `prior`."""
    samples = prior.sample(batch, seed=seed)
    return {"samples": model.get_model_object("latent_format").process_out(samples).float()}
