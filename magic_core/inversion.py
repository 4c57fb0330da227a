"""DDIM inversion in the sigma parameterisation (x = x0 + sigma * eps), and its exact reverse.

With eta 0, DDIM is Euler in sigma: x' = x + (sigma' - sigma) * eps(x, sigma), eps = (x - D(x, sigma)) / sigma.
Inversion runs the same update over ascending sigmas, starting at the smallest non-zero schedule sigma, treating the
clean latent as the state there. Sampling back over the same sigmas, descending, ends at that sigma again, so
the pair is a true round trip. Four modes trade time for reconstruction error:

- ``ddim``: explicit Euler, one model call per step (what "flip sigmas + Euler" does).
- ``fixed_point``: solves x_b = x_a + (b - a) * eps(x_b, b) by k fixed-point iterations; its solution is exactly the
  point the Euler sampler maps back to x_a, so the round-trip error falls as k rises (ReNoise-style).
- ``edict``: EDICT's coupled sequences with mixing p; the reverse is algebraically exact (float precision).
- ``bdia``: bi-directional integration approximation (Zhang, Lewis, Kleijn, ECCV 2024); exact reverse with one
  model call per step.

BDIA in ComfyUI's sigmas. Number the states by sigma, x_i at sigma_i, i = 0 (clean end) ... N (top). In this
parameterisation the DDIM increment from sigma_i to sigma_j, evaluated at the state x_i, is
delta(i->j | x_i) = (sigma_j - sigma_i) * eps_i with eps_i = (x_i - D(x_i, sigma_i)) / sigma_i (DDIM's
sqrt(alpha-bar) scalings cancel in x = z / sqrt(alpha-bar), sigma = sqrt((1 - alpha-bar) / alpha-bar)). The paper's
sampling update, from x_{i+1} and x_i to x_{i-1}, corrects the last interval by integrating it backwards from x_i:

    x_{i-1} = gamma * (x_{i+1} - delta(i->i+1 | x_i)) + (1 - gamma) * x_i + delta(i->i-1 | x_i)
            = gamma * x_{i+1} + (1 - gamma) * x_i + ((sigma_{i-1} - sigma_i) - gamma * (sigma_{i+1} - sigma_i)) * eps_i

gamma = 1 is x_{i-1} = x_{i+1} + (sigma_{i-1} - sigma_{i+1}) * eps_i (a midpoint step over two intervals); gamma = 0
is plain DDIM; in between, (1 - gamma) of the one-step DDIM update is mixed in. (The authors' README writes the same
update with gamma and 1 - gamma swapped; this is the paper's form.) Given x_i and eps_i the update is linear in
x_{i+1}, so inversion solves it for the state above:

    x_{i+1} = (x_{i-1} - (1 - gamma) * x_i - (sigma_{i-1} - sigma_i) * eps_i) / gamma + (sigma_{i+1} - sigma_i) * eps_i

Both directions evaluate the model once per step, at the same (x_i, sigma_i), so the reverse retraces the inversion
exactly. The first inversion step (x_0 -> x_1) is a plain DDIM step; the reverse needs the top two states, x_N and
x_{N-1} (``partner``), and its last step lands on x_0. Sampling from a latent that is not the inversion's top (an
edited or AdaIN-shifted one) starts with a plain DDIM step, as the paper's sampler does from noise.

Precision (EDICT and BDIA): states are kept in float64 (float32 where the device has no float64, e.g. MPS); the model
is called with the state rounded to the caller's dtype, and computes in its own. The reverse rebuilds each state to
within float64 rounding, which rounds to the very model input the inversion used, so the reverse makes the
inversion's model calls bit for bit whatever the model's precision (fp32, fp16, bf16), and the round trip ends at
float64 accuracy plus one rounding to the output dtype. States kept in float32 instead lose that: a rebuilt state
one ulp off changes the model input, and the difference grows with the ODE's gain (see bench/bench_inversion.py).
Stability: for gamma = 1 the sampling direction carries BDIA's parasitic (alternating) mode, which grows by at most
the ODE's own gain over the schedule (about sigma_max / data std), whatever the number of steps. The inversion
direction divides by gamma at every step, so for gamma < 1 it grows like gamma^-N: keep gamma near 1 for many steps.

A denoiser is any ``fn(x, sigma) -> x0`` where sigma is a 0-d tensor; ComfyUI's guided model fits after wrapping.
Features for the KV store are captured on one call at every sigma a sampler will later visit, on the very input the
reverse sampler evaluates there: the start of each DDIM/BDIA step plus one extra call at the top sigma; for EDICT the
second call of each step plus one extra call at the starting sigma (``capture_top`` asks for the extra call).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .sharing import SharedOnCopy

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[str, int, torch.Tensor], None]

MODES = ("ddim", "fixed_point", "edict", "bdia")
EXACT_MODES = ("edict", "bdia")  # modes whose reverse needs a second state (``partner``) besides the top one
EDICT_DEFAULT_MIX = 0.93
# The paper's exact-inversion setting: the inversion never divides by less than 1, so nothing grows with the steps.
BDIA_DEFAULT_GAMMA = 1.0


def eps_from_denoised(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def state_dtype_for(device) -> torch.dtype:
    """The dtype EDICT and BDIA keep their states in: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def check_bdia_gamma(gamma: float) -> float:
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"bdia gamma must be in (0, 1] (0 would be plain DDIM, which cannot be reversed), got {gamma}")
    return float(gamma)


def bdia_sample_step(upper, current, eps, sigma_upper, sigma, sigma_lower, gamma: float):
    """x_{i-1} from x_{i+1} (``upper``), x_i (``current``) and eps_i = eps(x_i, sigma_i)."""
    step = (sigma_lower - sigma) - gamma * (sigma_upper - sigma)
    mixed = upper if gamma == 1.0 else gamma * upper + (1.0 - gamma) * current
    return mixed + step * eps


def bdia_invert_step(lower, current, eps, sigma_lower, sigma, sigma_upper, gamma: float):
    """x_{i+1} from x_{i-1} (``lower``), x_i (``current``) and eps_i: `bdia_sample_step` solved for x_{i+1}."""
    if gamma == 1.0:
        return lower + (sigma_upper - sigma_lower) * eps
    return (lower - (1.0 - gamma) * current - (sigma_lower - sigma) * eps) / gamma + (sigma_upper - sigma) * eps


def inversion_sigmas(sampling_sigmas: torch.Tensor) -> torch.Tensor:
    """Ascending sigmas for inverting a descending sampling schedule: drop a trailing zero, then flip."""
    sigmas = torch.as_tensor(sampling_sigmas, dtype=torch.float32).flatten()
    if sigmas.numel() and sigmas[-1] == 0:
        sigmas = sigmas[:-1]
    if sigmas.numel() < 1:
        raise ValueError("the sigma schedule is empty")
    if (sigmas <= 0).any():
        raise ValueError("inversion sigmas must be positive (zero may only end a sampling schedule)")
    ascending = sigmas.flip(0) if sigmas.numel() > 1 and sigmas[0] > sigmas[-1] else sigmas
    if ascending.numel() > 1 and not bool((ascending[1:] > ascending[:-1]).all()):
        raise ValueError("sigmas must be strictly monotonic")
    return ascending


def strength_steps(steps: int, strength: float) -> int:
    """How many steps of a `steps`-step schedule a partial inversion of `strength` covers, counted from the clean
    end: the lower round(steps * strength) of them (unlike KSampler's denoise, which stretches the schedule)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, round(steps * strength))


def inverted_steps(steps: int, strength: float) -> int:
    """Inversion steps a `steps`/`strength` schedule gives: one fewer than the sampling steps it covers, because the
    last sampling step (to sigma 0) has no inversion counterpart: the clean latent is the state at the smallest
    non-zero sigma."""
    return strength_steps(steps, strength) - 1


def minimum_steps(strength: float) -> int:
    """The fewest `steps` that give at least one inversion step at `strength`."""
    steps = 2
    while inverted_steps(steps, strength) < 1:
        steps += 1
    return steps


@dataclass
class ExactBoundary:
    """The top state of an EDICT/BDIA inversion and its partner, at state precision, in the sampler's own (model)
    space, with the ascending sigmas they belong to. The LATENT that leaves a node is these states rounded (and
    scaled by the latent format); a reverse that is handed that LATENT picks these back up to stay bit-exact."""

    sigmas: torch.Tensor  # ascending, float32, CPU
    top: torch.Tensor
    partner: torch.Tensor

    def matches(self, x: torch.Tensor, sigmas: torch.Tensor) -> bool:
        """Whether `x` is this top state after rounding to x's dtype and a scale round trip (a few ulps)."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if tuple(x.shape) != tuple(self.top.shape) or sigmas.shape != self.sigmas.shape:
            return False
        if not torch.equal(sigmas, self.sigmas):
            return False
        # on the CPU in float64: devices such as MPS have no float64, and this runs once per sampling run
        top, candidate = self.top.double(), x.detach().cpu().double()
        ulps = 8 * torch.finfo(x.dtype).eps
        return bool(torch.allclose(candidate, top, rtol=ulps, atol=ulps * float(top.abs().max())))


def find_boundary(boundaries: Iterable[ExactBoundary] | None, x: torch.Tensor, sigmas) -> ExactBoundary | None:
    for boundary in boundaries or ():
        if boundary is not None and boundary.matches(x, sigmas):
            return boundary
    return None


class BoundaryLog(SharedOnCopy):
    """The exact boundaries of an inversion SAMPLER's recent runs, which its paired reverse SAMPLER looks up (a
    SAMPLER's output LATENT carries one tensor, so the partner state travels here). Copies share the log."""

    def __init__(self, keep: int = 4):
        self._entries: deque[ExactBoundary] = deque(maxlen=keep)

    def remember(self, boundary: ExactBoundary | None) -> None:
        if boundary is not None:
            self._entries.appendleft(boundary)

    def __iter__(self):
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class InversionOutcome:
    latent: torch.Tensor  # state at the top sigma
    trajectory: list[torch.Tensor]  # state at every ascending sigma, trajectory[0] is the input
    sigmas: torch.Tensor  # ascending
    partner: torch.Tensor | None = None  # EDICT's second sequence / BDIA's state one sigma below, at the top
    model_calls: int = 0
    boundary: ExactBoundary | None = None  # top and partner at state precision (EDICT, BDIA)


def _call(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor, counter: list[int], dtype=None) -> torch.Tensor:
    counter[0] += 1
    if dtype is None or x.dtype == dtype:
        return denoise(x, sigma)
    # EDICT and BDIA keep their states at higher precision than the model (EDICT's mixing divides by p each step and
    # would amplify rounding); the model still sees its own dtype, and equal states round to equal model inputs.
    return denoise(x.to(dtype), sigma.to(dtype)).to(x.dtype)


def invert(
    denoise: Denoiser,
    x0: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    mode: str = "ddim",
    refine_iterations: int = 0,
    edict_mix: float = EDICT_DEFAULT_MIX,
    capture_top: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    set_capture: Callable[[bool], None] | None = None,
    bdia_gamma: float = BDIA_DEFAULT_GAMMA,
    state_dtype: torch.dtype | None = None,
) -> InversionOutcome:
    """Invert `x0` (treated as the state at sigmas[0]) up to sigmas[-1]; sigmas ascending.

    `set_capture(flag)` is told before each model call whether that call is the one whose features a store should
    keep (the first call at each sigma); `on_step(i, x)` sees the state after each step. `state_dtype` (EDICT, BDIA)
    defaults to `state_dtype_for(x0.device)`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if refine_iterations < 0:
        raise ValueError("refine_iterations must be >= 0")
    if not 0.0 < edict_mix < 1.0:
        raise ValueError("edict_mix must be in (0, 1)")
    gamma = check_bdia_gamma(bdia_gamma)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=x0.device)
    counter = [0]
    capture = set_capture or (lambda flag: None)
    exact = mode in EXACT_MODES
    state = (state_dtype or state_dtype_for(x0.device)) if exact else x0.dtype
    steps = sigmas.to(state)  # the update coefficients at state precision; the model still gets float32 sigmas

    x = x0.to(state)
    partner = x.clone() if mode == "edict" else None
    trajectory = [x0]
    if capture_top and mode == "edict":
        # EDICT's steps evaluate at their upper sigma only; a standard sampler's last call is at sigmas[0].
        capture(True)
        _call(denoise, x, steps[0], counter, x0.dtype)
        capture(False)
    for i in range(len(sigmas) - 1):
        a, b = sigmas[i], sigmas[i + 1]
        if mode == "edict":
            x, partner = _edict_invert_step(denoise, x, partner, steps[i], steps[i + 1], edict_mix, counter, capture,
                                            x0.dtype)
        elif mode == "bdia":
            capture(True)
            eps = eps_from_denoised(x, steps[i], _call(denoise, x, steps[i], counter, x0.dtype))
            capture(False)
            if partner is None:  # the first step is a plain DDIM step
                x_next = x + (steps[i + 1] - steps[i]) * eps
            else:
                x_next = bdia_invert_step(partner, x, eps, steps[i - 1], steps[i], steps[i + 1], gamma)
            partner, x = x, x_next
        else:
            capture(True)
            eps = eps_from_denoised(x, a, _call(denoise, x, a, counter))
            capture(False)
            x_next = x + (b - a) * eps
            if mode == "fixed_point":
                for _ in range(refine_iterations):
                    eps_b = eps_from_denoised(x_next, b, _call(denoise, x_next, b, counter))
                    x_next = x + (b - a) * eps_b
            x = x_next
        trajectory.append(x.to(x0.dtype))
        if on_step is not None:
            on_step(i, trajectory[-1])
    if capture_top and mode != "edict":
        capture(True)
        _call(denoise, x, steps[-1], counter, x0.dtype)
        capture(False)
    boundary = None
    if exact and partner is not None:
        boundary = ExactBoundary(sigmas.cpu(), x.detach().cpu(), partner.detach().cpu())
        x, partner = x.to(x0.dtype), partner.to(x0.dtype)
    return InversionOutcome(latent=x, trajectory=trajectory, sigmas=sigmas.cpu(), partner=partner,
                            model_calls=counter[0], boundary=boundary)


def _edict_invert_step(denoise, x, y, a, b, p, counter, capture, model_dtype):
    # Inverse of the EDICT denoising step from b to a, where one DDIM step from b to a is z + (a - b) * eps(., b).
    y_inter = (y - (1 - p) * x) / p
    x_inter = (x - (1 - p) * y_inter) / p
    y_b = y_inter - (a - b) * eps_from_denoised(x_inter, b, _call(denoise, x_inter, b, counter, model_dtype))
    # Sampling back first evaluates the model on y_b at sigma b: that call's features are the ones to keep.
    capture(True)
    x_b = x_inter - (a - b) * eps_from_denoised(y_b, b, _call(denoise, y_b, b, counter, model_dtype))
    capture(False)
    return x_b, y_b


def sample_back(
    denoise: Denoiser,
    latent: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    mode: str = "ddim",
    partner: torch.Tensor | None = None,
    edict_mix: float = EDICT_DEFAULT_MIX,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    bdia_gamma: float = BDIA_DEFAULT_GAMMA,
    model_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reverse of `invert`: from the state at max(sigmas) down to min(sigmas). Accepts either order.

    EDICT without `partner` starts both sequences at `latent`; BDIA without it starts with a plain DDIM step. The
    model is called in `model_dtype` (default: latent's dtype), which is also the dtype returned; `latent` and
    `partner` may be given at state precision (an `ExactBoundary`'s tensors).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    gamma = check_bdia_gamma(bdia_gamma)
    model_dtype = model_dtype or latent.dtype
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latent.device)
    descending = sigmas.flip(0) if sigmas.numel() > 1 and sigmas[0] < sigmas[-1] else sigmas
    counter = [0]

    def report(i, z):
        if on_step is not None:
            on_step(i, z.to(model_dtype))

    if mode in EXACT_MODES:
        state = state_dtype or state_dtype_for(latent.device)
        steps = descending.to(state)
        x = latent.to(state)
        y = partner.to(latent.device, state) if partner is not None else None
        if mode == "bdia":
            return _bdia_sample_back(denoise, x, y, steps, gamma, counter, model_dtype, report).to(model_dtype)
        y = x.clone() if y is None else y
        for i in range(len(steps) - 1):
            b, a = steps[i], steps[i + 1]
            x_inter = x + (a - b) * eps_from_denoised(y, b, _call(denoise, y, b, counter, model_dtype))
            y_inter = y + (a - b) * eps_from_denoised(x_inter, b, _call(denoise, x_inter, b, counter, model_dtype))
            x = edict_mix * x_inter + (1 - edict_mix) * y_inter
            y = edict_mix * y_inter + (1 - edict_mix) * x
            report(i, x)
        return x.to(model_dtype)
    x = latent.to(model_dtype)
    for i in range(len(descending) - 1):
        b, a = descending[i], descending[i + 1]
        x = x + (a - b) * eps_from_denoised(x, b, _call(denoise, x, b, counter))
        report(i, x)
    return x


def _bdia_sample_back(denoise, top, below, descending, gamma, counter, model_dtype, report):
    # upper, current = x_{i+1}, x_i walking down; the step from the top either is known (the partner) or is DDIM.
    n = len(descending) - 1
    if n < 1:
        return top
    if below is None:
        eps = eps_from_denoised(top, descending[0], _call(denoise, top, descending[0], counter, model_dtype))
        below = top + (descending[1] - descending[0]) * eps
    report(0, below)
    upper, current = top, below
    for k in range(1, n):
        sigma_upper, sigma, sigma_lower = descending[k - 1], descending[k], descending[k + 1]
        eps = eps_from_denoised(current, sigma, _call(denoise, current, sigma, counter, model_dtype))
        upper, current = current, bdia_sample_step(upper, current, eps, sigma_upper, sigma, sigma_lower, gamma)
        report(k, current)
    return current


def relative_error(reconstruction: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS error over RMS of the reference (scale-free, so it reads the same for any latent format)."""
    ref = reference.double()
    err = (reconstruction.double() - ref).pow(2).mean().sqrt()
    return float(err / ref.pow(2).mean().sqrt().clamp_min(1e-12))


class DivergenceError(ValueError):
    """A BDIA inversion with gamma < 1 that blew up (its inversion divides by gamma every step)."""


def divergence_ratio(source: torch.Tensor, top: torch.Tensor, sigma_top: float) -> float:
    """RMS of an inverted latent over that of the source noised to the top sigma (unit-variance noise): about 1 for
    an inversion that followed the ODE, inf when it is not finite."""
    if not bool(torch.isfinite(top).all()):
        return float("inf")
    expected = (float(source.float().pow(2).mean()) + float(sigma_top) ** 2) ** 0.5
    return float(top.float().pow(2).mean().sqrt()) / max(expected, 1e-12)


def check_divergence(source: torch.Tensor, outcome: InversionOutcome, gamma: float, limit: float) -> None:
    ratio = divergence_ratio(source, outcome.latent, float(outcome.sigmas[-1]))
    if ratio > limit:
        raise DivergenceError(
            f"bdia inversion with gamma {gamma} over {len(outcome.sigmas) - 1} steps diverged: the inverted latent's "
            f"RMS is {ratio:.3g} times that of the source noised to the top sigma; raise gamma toward 1 (1 never "
            "grows) or use fewer steps"
        )
