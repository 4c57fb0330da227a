"""Every numeric tolerance of the suite, derived here from the dtype, the magnitudes and the number of operations.

Nothing in this file comes from what one machine produced: CI runs on other CPUs (other SIMD widths and summation
orders) and on GPUs, so a bound must hold for any correct float implementation.

The rule (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3): with the unit roundoff
``u = eps / 2`` of the dtype, a sum of ``n`` products computed in any order differs from the exact sum by at most
``gamma_n * sum|x_i y_i|`` with ``gamma_n = n u / (1 - n u) ~ n u``. A longer computation accumulates such errors
along its dependency chain, so its result is within ``ops * u * magnitude`` of the exact value, where ``ops`` counts
the rounded operations along the chain (for a layer, its reduction length: fan-in of a linear or conv, head dim of
q.k, key count of the attention-weighted sum) and ``magnitude`` bounds the values summed. That worst case assumes
every rounding error has the same sign; for long chains the probabilistic bound of Higham & Mary ("A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019) applies instead: with independent
rounding errors the error exceeds ``lambda * sqrt(ops) * u * magnitude`` with probability at most
``2 exp(-lambda**2 / 2)``; lambda = 10 makes that 4e-22. ``float_tol`` takes the smaller of the two bounds. Two routes
that compute the same quantity in different orders each carry that error, hence its factor 2.

A wrong result is still caught: a real defect moves values by O(magnitude), orders above these bounds. Tests that
assert an *effect* (a patch changes the output) compare against ``effect_floor``: above any rounding bound of the
tiny test networks, far below the change a working patch makes.
"""

from __future__ import annotations

import math

import torch

PROBABILISTIC_LAMBDA = 10.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding in `dtype` (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


# A bound wider than this share of the values it compares is no test: at fp16/bf16 with UNet-sized operation counts
# float_tol reaches O(magnitude), which any result passes. float_tol refuses such a bound; the caller needs a wider
# dtype, a shorter chain (compare a layer, not a whole sampling run), or another comparison (an exact invariant).
MAX_RELATIVE_BOUND = 0.01


class ToleranceTooWide(ValueError):
    """float_tol was asked for a bound above MAX_RELATIVE_BOUND of the magnitude it compares."""


def rounding_bound(dtype: torch.dtype, ops: int, magnitude: float = 1.0) -> float:
    """The rounding-error bound itself (see the module docstring), however wide; tests compare through float_tol."""
    if ops < 1:
        raise ValueError(f"ops must be at least 1, got {ops}")
    u = unit_roundoff(dtype)
    worst_case = ops * u / (1 - ops * u) if ops * u < 0.5 else float("inf")
    probabilistic = PROBABILISTIC_LAMBDA * math.sqrt(ops) * u
    return 2.0 * min(worst_case, probabilistic) * max(float(magnitude), 1.0)


def float_tol(dtype: torch.dtype, ops: int, magnitude: float = 1.0) -> float:
    """Largest difference between two correct evaluations, in any order, of a result built from `ops` rounded
    operations along its longest chain on values bounded by `magnitude` (at least 1 keeps tiny values meaningful).

    Refuses (ToleranceTooWide) a bound above 1% of `magnitude`: such a comparison could not fail."""
    bound = rounding_bound(dtype, ops, magnitude)
    if not bound <= MAX_RELATIVE_BOUND * float(magnitude):
        raise ToleranceTooWide(
            f"float_tol({dtype}, ops={ops}, magnitude={float(magnitude):.3g}) = {bound:.3g} exceeds "
            f"{MAX_RELATIVE_BOUND:.0%} of the magnitude compared: that comparison cannot fail. Compare in a wider "
            "dtype, over a shorter chain, or by an exact invariant")
    return bound


def magnitude(*tensors) -> float:
    """The largest absolute value among the tensors (the `magnitude` of float_tol)."""
    return max(float(torch.as_tensor(t).detach().abs().max()) for t in tensors)


def reduction_ops(module: torch.nn.Module, attention_tokens: int = 0, attention_layers: int = 0) -> int:
    """Rounded operations along a forward pass of `module`: the fan-in of every Linear and Conv (each output is one
    dot product of that length), plus, for each attention layer, a softmax-weighted sum over `attention_tokens` keys.
    Counting every layer bounds the dependency chain of a UNet, whose skip connections pass through nearly all."""
    ops = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            ops += m.in_features
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            ops += m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm):
            ops += 3  # mean, variance, scale: each a reduction whose error is relative to the normalised output
    return ops + attention_layers * attention_tokens


def checkpoint_ops(path, prefix: str = "model.diffusion_model.") -> int:
    """reduction_ops of the network stored under `prefix` in a .safetensors file, read from the tensor shapes in its
    header (a 2-d weight is a linear of fan-in shape[1], a 4-d one a conv of fan-in shape[1]*kh*kw), for graphs
    whose models the executor loads from disk."""
    from safetensors import safe_open

    ops = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name.startswith(prefix) and name.endswith(".weight"):
                shape = f.get_slice(name).get_shape()
                if len(shape) in (2, 4):
                    ops += math.prod(shape[1:])
    return ops


def sampling_tol(dtype: torch.dtype, ops_per_call: int, magnitude_: float, model_calls: int) -> float:
    """float_tol for two sampling runs that differ only in the order of equal computations: each of `model_calls`
    network evaluations (steps x cond/uncond) feeds the next state, so their chains add up."""
    return float_tol(dtype, ops_per_call * model_calls, magnitude_)


def model_tol(model, *tensors: torch.Tensor, calls: int = 1, attention_keys: int = 0,
              dtype: torch.dtype = torch.float32) -> float:
    """sampling_tol for a ComfyUI ModelPatcher's UNet: `calls` evaluations compared with another route to the same
    result (magnitude from `tensors`); with `attention_keys`, each of its attention layers also sums over that many
    keys."""
    unet = model.model.diffusion_model
    layers = sum(type(m).__name__ == "CrossAttention" for m in unet.modules()) if attention_keys else 0
    return sampling_tol(dtype, reduction_ops(unet, attention_keys, layers), magnitude(*tensors), calls)


def network_tol(dtype: torch.dtype, module: torch.nn.Module, magnitude_: float, attention_tokens: int = 0,
                attention_layers: int = 0) -> float:
    """float_tol for two evaluations of the same network by different routes (patched vs plain, another order of
    adding residuals, chunked vs whole batch)."""
    return float_tol(dtype, reduction_ops(module, attention_tokens, attention_layers), magnitude_)


def effect_floor(reference: torch.Tensor) -> float:
    """A change smaller than this is not an effect: 1e-3 of the reference's size (at least 1e-3). It sits above
    network_tol of one evaluation of the tiny test UNets in float32 (SD1.5 ~82k, SDXL ~213k reduction ops: 3.4e-4,
    5.5e-4 of the size), so a patch that does nothing cannot pass for one that acts; every patch under test moves its
    outputs by far more (O(size)), so a working one cannot pass for a no-op."""
    return 1e-3 * max(float(reference.detach().abs().max()), 1.0)


# exp() turns a logit's relative rounding error into a relative error of |logit| times it; the attention logits of
# the tiny random models and the random test tensors stay well below this
LOGIT_BOUND = 16


def attention_ops(head_dim: int, keys: int, module: torch.nn.Module | None = None) -> int:
    """Rounded operations along one attention call: q.k over head_dim, exp of the logit, the softmax sum and the
    weighted sum over `keys`, plus the projections of `module` (to_q/to_k/to_v/to_out) when given."""
    projections = reduction_ops(module) if module is not None else 0
    return projections + head_dim + LOGIT_BOUND + 2 * keys


def differs(changed: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `changed` differs from `reference` by more than effect_floor: an effect, not rounding."""
    return float((changed - reference).abs().max()) > effect_floor(reference)
