"""An analytic "perfect" denoiser: the exact posterior mean for a Gaussian image prior.

With data x0 ~ N(mu, diag(s^2)) and x = x0 + sigma * eps (ComfyUI's sigma parameterisation for eps models), the
minimum-error denoiser is known in closed form:

    D(x, sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) * (x - mu)

and so is the probability-flow ODE it defines, dx/dsigma = (x - D(x, sigma)) / sigma = (x - mu) * sigma / (s^2 + sigma^2):

    x(sigma_b) = mu + (x(sigma_a) - mu) * sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2))

A sampler or inversion run with this denoiser therefore shows its own discretisation and rounding error, never a
network's: the exact answer of every step is known. ``compute_dtype`` evaluates the denoiser in another precision
(fp16, bf16), the way a half-precision model would, and returns the caller's dtype.
"""

from __future__ import annotations

import torch


class GaussianPrior:
    """x0 ~ N(mean, diag(std^2)), per element (mean/std broadcast against the latents they denoise)."""

    def __init__(self, mean: torch.Tensor | float, std: torch.Tensor | float, compute_dtype: torch.dtype | None = None):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        if not bool((self.std > 0).all()):
            raise ValueError("the prior's std must be positive everywhere")
        self.compute_dtype = compute_dtype

    @classmethod
    def random(cls, shape, seed: int = 0, mean_scale: float = 0.5, std_range=(0.5, 1.5), compute_dtype=None):
        """A prior with random per-element mean and std (seeded), so the denoiser is not a plain scaling."""
        gen = torch.Generator().manual_seed(seed)
        mean = torch.randn(shape, generator=gen, dtype=torch.float64) * mean_scale
        low, high = std_range
        std = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
        return cls(mean, std, compute_dtype)

    def with_dtype(self, compute_dtype: torch.dtype | None) -> GaussianPrior:
        return GaussianPrior(self.mean, self.std, compute_dtype)

    def sample(self, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Clean latents drawn from the prior: [batch, *mean.shape] (mean/std must then be [C, H, W])."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((batch, *self.std.shape), generator=gen, dtype=torch.float64)
        return (self.mean + self.std * noise).to(dtype)

    def _params(self, like: torch.Tensor, dtype: torch.dtype):
        return self.mean.to(like.device, dtype), self.std.to(like.device, dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The exact x0-prediction at noise level sigma (a scalar or one sigma per batch entry)."""
        dtype = self.compute_dtype or x.dtype
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
        if sigma.ndim == 1:  # one sigma per batch entry, as ComfyUI passes it
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        mean, std = self._params(x, dtype)
        var = std * std
        z = x.to(dtype)
        return (mean + var / (var + sigma * sigma) * (z - mean)).to(x.dtype)

    __call__ = denoise

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact probability-flow ODE solution from sigma_from to sigma_to (in float64, returned in x's dtype)."""
        mean, std = self._params(x, torch.float64)
        var = std * std
        gain = torch.sqrt((var + float(sigma_to) ** 2) / (var + float(sigma_from) ** 2))
        return (mean + (x.double() - mean) * gain).to(x.dtype)
