"""Inversion and sampling runs through ComfyUI: guided runs on CFGGuider, the inverting and exact-reverse SAMPLERs
(KSAMPLER around magic_core.inversion's maths), the inversion record later nodes check, and the transformer_options
entries (capture gates, run notes) through which patches talk to a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.samplers
import latent_preview
import torch

from ..magic_core import inversion as inv
from ..magic_core.inversion import ExactBoundary
from ..magic_core.sharing import SharedOnCopy
from .common import NodeInputError
from .fingerprint import fingerprint_difference, model_fingerprint, weight_patch_note, weight_patch_signature


def schedule(model, scheduler: str, steps: int, strength: float) -> torch.Tensor:
    """The sampling schedule (descending, ending at 0) that a partial inversion of `strength` pairs with."""
    covered = inv.strength_steps(steps, strength)
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


class RunNotes(SharedOnCopy):
    """Lines about one sampling run, added by the patches that took part. Copies are the same object, so the note
    survives ComfyUI's copies of model_options."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(str(line))

    def text(self, sep: str = "; ") -> str:
        return sep.join(self.lines)


@dataclass
class InversionRecord(SharedOnCopy):
    """What an inversion produced and what it belongs to; later nodes check it before using it."""

    latent: torch.Tensor  # inverted latent (LATENT space, CPU)
    trajectory: list[torch.Tensor]  # LATENT-space state at each ascending sigma, [0] = input
    sigmas: torch.Tensor  # ascending
    mode: str
    refine_iterations: int
    edict_mix: float
    partner: torch.Tensor | None  # EDICT's second sequence / BDIA's state one sigma below, at the top (LATENT space)
    model_id: str
    family: str
    cfg: float
    positive: object = None
    negative: object = None
    latent_format: object = None  # the model's latent format: maps partner/latents between LATENT and model space
    round_trip_error: float | None = None
    weight_patches: str = ""  # the inversion MODEL's weight patches (opaque description; later ones are allowed)
    bdia_gamma: float = inv.BDIA_DEFAULT_GAMMA
    boundary: ExactBoundary | None = None  # EDICT/BDIA: top and partner at state precision, in model space

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape[1:])

    @property
    def source(self) -> torch.Tensor:
        return self.trajectory[0]


# A bdia inverted latent whose RMS exceeds this many times that of the source noised to the top sigma has diverged.
DIVERGENCE_LIMIT = 10.0


def _progress_callback(callback, total):
    if callback is None:
        return None
    return lambda i, x: callback({"i": i, "x": x, "denoised": x, "sigma": None, "sigma_hat": None})


def inversion_sampler_function(mode: str, refine_iterations: int, edict_mix: float, sink: dict | None = None, *,
                               bdia_gamma: float = inv.BDIA_DEFAULT_GAMMA, boundary_log: inv.BoundaryLog | None = None,
                               state_dtype: torch.dtype | None = None):
    """A k-diffusion style sampler function that inverts instead of denoising (sigmas in either order).
    With a feature store attached (capture gates in transformer_options) it makes the one extra capture call.
    EDICT/BDIA runs leave their exact top and partner states in `boundary_log` (for a paired reverse SAMPLER)."""
    inv.check_bdia_gamma(bdia_gamma)

    def invert_fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        ascending = inv.inversion_sigmas(sigmas).to(x.device)
        s_in = x.new_ones([x.shape[0]])
        transformer_options = extra_args.get("model_options", {}).get("transformer_options", {})
        capture_top = bool(transformer_options.get(CAPTURE_GATES_KEY))
        outcome = inv.invert(
            lambda z, sigma: model(z, sigma * s_in, **extra_args),
            x,
            ascending,
            mode=mode,
            refine_iterations=refine_iterations,
            edict_mix=edict_mix,
            capture_top=capture_top,
            on_step=_progress_callback(callback, len(ascending) - 1),
            set_capture=gate_setter(transformer_options),
            bdia_gamma=bdia_gamma,
            state_dtype=state_dtype,
        )
        if mode == "bdia":
            inv.check_divergence(x, outcome, bdia_gamma, DIVERGENCE_LIMIT)
        if sink is not None:
            sink["outcome"] = outcome
        if boundary_log is not None:
            boundary_log.remember(outcome.boundary)
        return outcome.latent

    return invert_fn


def reverse_sampler_function(mode: str, edict_mix: float, partner: torch.Tensor | None = None, process_in=None, *,
                             bdia_gamma: float = inv.BDIA_DEFAULT_GAMMA, boundaries=None,
                             state_dtype: torch.dtype | None = None):
    """The exact reverse of `inversion_sampler_function`: ends at the smallest non-zero sigma.

    EDICT/BDIA: when the starting latent is the top of one of `boundaries` (an inversion's `ExactBoundary`, or a
    `BoundaryLog`), its exact states are used and the round trip stays bit-exact. Otherwise `partner` (LATENT space;
    `process_in` maps it to the model's) is the second state; without one, EDICT starts both sequences at the latent
    and BDIA starts with a plain DDIM step (as it samples from noise)."""
    inv.check_bdia_gamma(bdia_gamma)

    def reverse_fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        ascending = inv.inversion_sigmas(sigmas)
        descending = ascending.flip(0).to(x.device)
        s_in = x.new_ones([x.shape[0]])
        start, y = x, None
        if mode in inv.EXACT_MODES:
            found = inv.find_boundary(boundaries, x, ascending)
            if found is not None:
                start, y = found.top.to(x.device), found.partner.to(x.device)
            elif partner is not None:
                y = partner.to(x.device, x.dtype)
                y = process_in(y) if process_in is not None else y
                if y.shape != x.shape:
                    raise ValueError(f"{mode} partner latent {tuple(y.shape)} does not match the latent "
                                     f"{tuple(x.shape)}")
        return inv.sample_back(
            lambda z, sigma: model(z, sigma * s_in, **extra_args),
            start,
            descending,
            mode=mode if mode in inv.EXACT_MODES else "ddim",
            partner=y,
            edict_mix=edict_mix,
            on_step=_progress_callback(callback, len(descending) - 1),
            bdia_gamma=bdia_gamma,
            model_dtype=x.dtype,
            state_dtype=state_dtype,
        )

    return reverse_fn


def run_inversion(model, positive, negative, cfg, samples, sigmas, mode, refine_iterations, edict_mix,
                  bdia_gamma: float = inv.BDIA_DEFAULT_GAMMA):
    sink: dict = {}
    sampler = comfy.samplers.KSAMPLER(
        inversion_sampler_function(mode, refine_iterations, edict_mix, sink, bdia_gamma=bdia_gamma)
    )
    latent = guided_run(model, positive, negative, cfg, samples, sampler, inv.inversion_sigmas(sigmas))
    outcome = sink["outcome"]
    process_out = model.get_model_object("latent_format").process_out
    trajectory = [samples.cpu().float()] + [process_out(z).cpu().float() for z in outcome.trajectory[1:]]
    partner = process_out(outcome.partner).cpu().float() if outcome.partner is not None else None
    return latent, trajectory, partner, outcome


def run_reverse(model, record: InversionRecord, positive, negative, cfg, start: torch.Tensor | None = None):
    process_in = model.get_model_object("latent_format").process_in
    # BDIA's partner belongs to the inverted latent only: another start begins with a DDIM step instead.
    partner = None if record.mode == "bdia" else record.partner
    sampler = comfy.samplers.KSAMPLER(
        reverse_sampler_function(record.mode, record.edict_mix, partner, process_in, bdia_gamma=record.bdia_gamma,
                                 boundaries=[record.boundary])
    )
    samples = record.latent if start is None else start
    return guided_run(model, positive, negative, cfg, samples, sampler, record.sigmas.flip(0))


def with_run_notes(model):
    """A clone of `model` carrying a fresh RunNotes sink, which patches fill while it samples (nothing else changes:
    same weights, patches and wrappers)."""
    notes = RunNotes()
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[RUN_NOTES_KEY] = notes
    return clone, notes


def check_record(node: str, input_name: str, record, model) -> str | None:
    """Refuse a record from another checkpoint, family or latent format; return a note when only the weight patches
    (LoRAs, attention multipliers) differ, which is allowed."""
    if not isinstance(record, InversionRecord):
        raise NodeInputError(node, input_name, "expected a MAGIC_INVERSION from DDIM Invert (Magic Portrait)")
    difference = fingerprint_difference(record.model_id, model_fingerprint(model))
    if difference is not None:
        raise NodeInputError(node, input_name, f"was made with {difference}. Invert again with this model (weight "
                             "patches such as LoRAs added after the inversion are fine; another checkpoint is not).")
    return weight_patch_note(record.weight_patches, weight_patch_signature(model), "the inversion")
