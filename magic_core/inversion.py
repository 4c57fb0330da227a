"""DDIM inversion in the sigma parameterisation (x = x0 + sigma * eps), and its exact reverse.

With eta 0, DDIM is Euler in sigma: x' = x + (sigma' - sigma) * eps(x, sigma), eps = (x - D(x, sigma)) / sigma.
Inversion runs the same update over ascending sigmas, starting at the smallest non-zero schedule sigma, treating the
clean latent as the state there. Sampling back over the same sigmas, descending, ends at that sigma again, so
the pair is a true round trip. Three modes trade time for reconstruction error:

- ``ddim``: explicit Euler, one model call per step (what "flip sigmas + Euler" does).
- ``fixed_point``: solves x_b = x_a + (b - a) * eps(x_b, b) by k fixed-point iterations; its solution is exactly the
  point the Euler sampler maps back to x_a, so the round-trip error falls as k rises (ReNoise-style).
- ``edict``: EDICT's coupled sequences with mixing p; the reverse is algebraically exact (float precision).

A denoiser is any ``fn(x, sigma) -> x0`` where sigma is a 0-d tensor; ComfyUI's guided model fits after wrapping.
Features for the KV store are captured on one call at every sigma a sampler will later visit, on the very input the
reverse sampler evaluates there: the start of each DDIM step plus one extra call at the top sigma; for EDICT the
second call of each step plus one extra call at the starting sigma (``capture_top`` asks for the extra call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[str, int, torch.Tensor], None]

MODES = ("ddim", "fixed_point", "edict")
EDICT_DEFAULT_MIX = 0.93


def eps_from_denoised(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


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
    """How many of `steps` a partial inversion of `strength` covers (like KSampler's denoise)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, round(steps * strength))


@dataclass
class InversionOutcome:
    latent: torch.Tensor  # state at the top sigma
    trajectory: list[torch.Tensor]  # state at every ascending sigma, trajectory[0] is the input
    sigmas: torch.Tensor  # ascending
    partner: torch.Tensor | None = None  # EDICT's second sequence at the top sigma
    model_calls: int = 0


def _call(denoise: Denoiser, x: torch.Tensor, sigma: torch.Tensor, counter: list[int], dtype=None) -> torch.Tensor:
    counter[0] += 1
    if dtype is None or x.dtype == dtype:
        return denoise(x, sigma)
    # EDICT keeps its sequences in float64 (its mixing divides by p each step and would amplify float32 rounding);
    # the model still sees its own dtype, and identical float64 states round to identical model inputs.
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
) -> InversionOutcome:
    """Invert `x0` (treated as the state at sigmas[0]) up to sigmas[-1]; sigmas ascending.

    `set_capture(flag)` is told before each model call whether that call is the one whose features a store should
    keep (the first call at each sigma); `on_step(i, x)` sees the state after each step.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if refine_iterations < 0:
        raise ValueError("refine_iterations must be >= 0")
    if not 0.0 < edict_mix < 1.0:
        raise ValueError("edict_mix must be in (0, 1)")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=x0.device)
    counter = [0]
    capture = set_capture or (lambda flag: None)

    x = x0.double() if mode == "edict" else x0
    partner = x.clone() if mode == "edict" else None
    trajectory = [x0]
    if capture_top and mode == "edict":
        # EDICT's steps evaluate at their upper sigma only; a standard sampler's last call is at sigmas[0].
        capture(True)
        _call(denoise, x, sigmas[0].double(), counter, x0.dtype)
        capture(False)
    for i in range(len(sigmas) - 1):
        a, b = sigmas[i], sigmas[i + 1]
        if mode == "edict":
            x, partner = _edict_invert_step(denoise, x, partner, a.double(), b.double(), edict_mix, counter, capture,
                                            x0.dtype)
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
            on_step(i, x)
    if capture_top and mode != "edict":
        capture(True)
        _call(denoise, x, sigmas[-1], counter)
        capture(False)
    if partner is not None:
        x, partner = x.to(x0.dtype), partner.to(x0.dtype)
    return InversionOutcome(latent=x, trajectory=trajectory, sigmas=sigmas.cpu(), partner=partner, model_calls=counter[0])


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
) -> torch.Tensor:
    """Reverse of `invert`: from the state at max(sigmas) down to min(sigmas). Accepts either order."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latent.device)
    descending = sigmas.flip(0) if sigmas.numel() > 1 and sigmas[0] < sigmas[-1] else sigmas
    counter = [0]
    x = latent
    y = None
    if mode == "edict":
        x = latent.double()
        y = (partner if partner is not None else latent).double()
    for i in range(len(descending) - 1):
        b, a = descending[i], descending[i + 1]
        if mode == "edict":
            b, a = b.double(), a.double()
            x_inter = x + (a - b) * eps_from_denoised(y, b, _call(denoise, y, b, counter, latent.dtype))
            y_inter = y + (a - b) * eps_from_denoised(x_inter, b, _call(denoise, x_inter, b, counter, latent.dtype))
            x = edict_mix * x_inter + (1 - edict_mix) * y_inter
            y = edict_mix * y_inter + (1 - edict_mix) * x
        else:
            x = x + (a - b) * eps_from_denoised(x, b, _call(denoise, x, b, counter))
        if on_step is not None:
            on_step(i, x.to(latent.dtype))
    return x.to(latent.dtype)


def relative_error(reconstruction: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS error over RMS of the reference (scale-free, so it reads the same for any latent format)."""
    ref = reference.double()
    err = (reconstruction.double() - ref).pow(2).mean().sqrt()
    return float(err / ref.pow(2).mean().sqrt().clamp_min(1e-12))


# transformer_options key under which feature-capture gates sit; the inversion opens them on the model call whose
# features a KV store should keep. Gates are any objects with a writable `open` attribute.
CAPTURE_GATES_KEY = "magic_portrait_capture_gates"


def gate_setter(transformer_options: dict) -> Callable[[bool], None]:
    gates = list(transformer_options.get(CAPTURE_GATES_KEY, ()))

    def set_capture(flag: bool) -> None:
        for gate in gates:
            gate.open = flag

    return set_capture


# transformer_options key under which a RunNotes sink may sit: patches that want to say something about a sampling
# run (e.g. how many calls each fused layer fused) add lines to it; the node that ran the sampling shows them.
RUN_NOTES_KEY = "magic_portrait_run_notes"


class RunNotes:
    """Lines about one sampling run, added by the patches that took part. Copies are the same object, so the note
    survives ComfyUI's copies of model_options."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(str(line))

    def text(self, sep: str = "; ") -> str:
        return sep.join(self.lines)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass
class InversionRecord:
    """What an inversion produced and what it belongs to; later nodes check it before using it."""

    latent: torch.Tensor  # inverted latent (LATENT space, CPU)
    trajectory: list[torch.Tensor]  # LATENT-space state at each ascending sigma, [0] = input
    sigmas: torch.Tensor  # ascending
    mode: str
    refine_iterations: int
    edict_mix: float
    partner: torch.Tensor | None  # EDICT's second sequence at the top sigma (LATENT space)
    model_id: str
    family: str
    cfg: float
    positive: object = None
    negative: object = None
    latent_format: object = None  # the model's latent format: maps partner/latents between LATENT and model space
    round_trip_error: float | None = None
    weight_patches: str = ""  # the inversion MODEL's weight patches (opaque description; later ones are allowed)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape[1:])

    @property
    def source(self) -> torch.Tensor:
        return self.trajectory[0]

    def __deepcopy__(self, memo):
        return self
