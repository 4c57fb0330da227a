"""DDIM inversion nodes: invert a latent, sample it back exactly, and SAMPLERs for ComfyUI's custom-sampling nodes."""

from __future__ import annotations

import time

import comfy.samplers
from comfy_api.v0_0_2 import io, ui

from ..magic_core import inversion as inv
from .common import (
    CATEGORY,
    PREFIX,
    NodeInputError,
    check_latent,
    model_family,
    require_negative,
    tag_latent,
)
from .fingerprint import model_fingerprint, weight_patch_signature
from .inversion_sampling import (
    InversionRecord,
    check_record,
    inversion_sampler_function,
    reverse_sampler_function,
    run_inversion,
    run_reverse,
    schedule,
    with_run_notes,
)
from .types import InversionRecordType, KVStoreSpecType, KVStoreType

MODE_TOOLTIP = (
    "ddim: one model call per step (fast). fixed_point: k extra calls per step that solve the step exactly, "
    "lowering the round-trip error as k rises. edict: two coupled sequences, exact to float precision, "
    "two calls per step. bdia: bi-directional integration, exact to float precision with one call per step."
)
STRENGTH_TOOLTIP = (
    "The fraction of the schedule that is inverted, counted from the clean end: how far toward noise (1 = up to the "
    "schedule's top sigma, pure noise). Not KSampler's denoise: 'steps' is the whole schedule here, so 20 steps at "
    "0.5 invert the lower 10 steps of a 20-step schedule (9 inversion steps: the last sampling step, to sigma 0, has "
    "none), where KSampler's denoise 0.5 with 20 steps samples 20 steps of a 40-step one. Sample back on the "
    "'sampling_sigmas' output."
)
STEPS_TOOLTIP = (
    "Steps of the whole sampling schedule (before strength). N sampling steps give N - 1 inversion steps: the last "
    "sampling step, to sigma 0, has no inversion counterpart (the clean latent is the state at the smallest "
    "non-zero sigma). So at least 2, more below strength 1."
)
GAMMA_TOOLTIP = (
    "bdia mode: gamma of x_(i-1) = gamma * (x_(i+1) - delta(i->i+1)) + (1 - gamma) * x_i + delta(i->i-1), "
    "delta(a->b) being the DDIM step from sigma_a to sigma_b evaluated at x_i. 1 (default, the "
    "paper's exact-inversion setting) never grows anything; below 1 the inversion divides by gamma every step, so "
    "errors grow like gamma^-steps: keep it near 1 for many steps (a diverging inversion is refused)."
)


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "DDIMInvert",
            display_name="DDIM Invert (Magic Portrait)",
            category=CATEGORY + "/inversion",
            description="Invert a latent to noise along a sampling schedule, through ComfyUI's guider (conditioning, "
            "ControlNets and model patches apply). Outputs the inverted latent and a record for the nodes that "
            "sample it back or use its features.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="Inversion conditioning; an empty prompt is usual."),
                io.Latent.Input("latent"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip=STEPS_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
                io.Combo.Input("mode", options=list(inv.MODES), default="ddim", tooltip=MODE_TOOLTIP),
                io.Int.Input("refine_iterations", default=3, min=0, max=50,
                             tooltip="fixed_point mode: extra model calls per step."),
                io.Float.Input("edict_mix", default=inv.EDICT_DEFAULT_MIX, min=0.5, max=0.999, step=0.001,
                               tooltip="edict mode: mixing coefficient p."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01),
                io.Boolean.Input("measure_round_trip", default=False,
                                 tooltip="Also sample back and report the reconstruction error (costs one more pass)."),
                # optional and after every older widget, so saved workflows and API prompts stay valid
                io.Float.Input("bdia_gamma", default=inv.BDIA_DEFAULT_GAMMA, min=0.5, max=1.0, step=0.01,
                               optional=True, tooltip=GAMMA_TOOLTIP),
                io.Conditioning.Input("negative", optional=True, tooltip="Needed only when cfg is not 1."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A sampling schedule to invert instead of scheduler/steps/strength."),
                KVStoreSpecType.Input("feature_store", optional=True,
                                      tooltip="From a KV Feature Store node: keep this inversion's self-attention "
                                      "features (for Feature Fusion Attention)."),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted_latent"),
                InversionRecordType.Output(display_name="inversion"),
                io.Sigmas.Output(display_name="sampling_sigmas"),
                KVStoreType.Output(display_name="features",
                                   tooltip="The filled feature store (None unless feature_store is connected)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, scheduler, steps, strength, mode, refine_iterations, edict_mix, cfg,
                measure_round_trip, bdia_gamma=inv.BDIA_DEFAULT_GAMMA, negative=None, sigmas=None,
                feature_store=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        samples = check_latent(node, model, latent)
        require_negative(node, cfg, negative)
        # steps >= 2, 0 < strength <= 1 and 0.5 <= bdia_gamma <= 1 are the schema's bounds: validation enforces them
        if sigmas is not None:
            sampling_sigmas, source = sigmas.cpu().float(), "the SIGMAS input (scheduler, steps, strength unused)"
            schedule_input = "sigmas"
        else:
            if inv.inverted_steps(steps, strength) < 1:
                raise NodeInputError(node, "steps", f"{steps} steps at strength {strength} cover "
                                     f"{inv.strength_steps(steps, strength)} sampling step, which leaves nothing to "
                                     "invert (the last step, to sigma 0, has no inversion counterpart); use at least "
                                     f"{inv.minimum_steps(strength)} steps at this strength, or raise strength")
            sampling_sigmas = schedule(model, scheduler, steps, strength)
            source = f"{scheduler}, {steps} steps, strength {strength}"
            schedule_input = "strength"
        try:
            steps_covered = len(inv.inversion_sigmas(sampling_sigmas)) - 1
        except ValueError as err:
            raise NodeInputError(node, schedule_input, str(err)) from None
        if steps_covered < 1:
            raise NodeInputError(node, schedule_input, "covers less than one inversion step (a schedule needs two "
                                 "non-zero sigmas); raise strength or steps")

        started = time.perf_counter()
        run_model, store = model, None
        if feature_store is not None:
            run_model, store = feature_store.begin(model=model, samples=samples, sigmas=sampling_sigmas, node=node)
        try:
            inverted, trajectory, partner, outcome = run_inversion(
                run_model, positive, negative, cfg, samples, sampling_sigmas, mode, refine_iterations, edict_mix,
                bdia_gamma,
            )
        except inv.DivergenceError as err:
            raise NodeInputError(node, "bdia_gamma", str(err)) from None
        if store is not None:
            feature_store.finish(store, node=node)
        elapsed = time.perf_counter() - started
        record = InversionRecord(
            latent=inverted, trajectory=trajectory, sigmas=outcome.sigmas, mode=mode,
            refine_iterations=refine_iterations if mode == "fixed_point" else 0, edict_mix=edict_mix, partner=partner,
            model_id=model_fingerprint(model), family=model_family(model), cfg=cfg, positive=positive, negative=negative,
            latent_format=model.get_model_object("latent_format"), weight_patches=weight_patch_signature(model),
            bdia_gamma=float(bdia_gamma), boundary=outcome.boundary,
        )
        described = f"bdia (gamma {bdia_gamma:g})" if mode == "bdia" else mode
        report = (f"inverted {samples.shape[0]} latent(s) {tuple(samples.shape[2:])} with {described} over {source}: "
                  f"{len(outcome.sigmas) - 1} steps, {outcome.model_calls} model calls, {elapsed:.2f} s")
        if measure_round_trip:
            reconstruction = run_reverse(model, record, positive, negative, cfg)
            record.round_trip_error = inv.relative_error(reconstruction, samples.cpu().float())
            report += f"; round-trip error (relative RMS) {record.round_trip_error:.3e}"
        out_latent = tag_latent({k: v for k, v in latent.items() if k != "noise_mask"}, model)
        out_latent["samples"] = inverted
        if store is not None:
            report += f"; {store.summary()}"
        return io.NodeOutput(out_latent, record, sampling_sigmas, store, ui=ui.PreviewText(report))


class SampleInverted(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "SampleInverted",
            display_name="Sample Inverted (Magic Portrait)",
            category=CATEGORY + "/inversion",
            description="Sample back from an inverted latent on exactly the inversion's schedule and mode (the exact "
            "reverse). Connect other conditioning or a patched MODEL to edit instead of reconstruct: weight patches "
            "(LoRAs, attention multipliers) added after the inversion are fine, another checkpoint is not. Reports "
            "what Feature Fusion Attention on the MODEL did (fused calls per layer, layers or steps that never fused).",
            inputs=[
                io.Model.Input("model"),
                InversionRecordType.Input("inversion"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01),
                io.Boolean.Input("measure_error", default=False,
                                 tooltip="Report the error against the latent that was inverted."),
                io.Conditioning.Input("positive", optional=True, tooltip="Defaults to the inversion's conditioning."),
                io.Conditioning.Input("negative", optional=True),
                io.Latent.Input("start_latent", optional=True,
                                tooltip="Start here instead of the inverted latent (e.g. after AdaIN). bdia: a start "
                                "other than the inverted latent begins with a plain DDIM step."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, inversion, cfg, measure_error, positive=None, negative=None,
                start_latent=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        patch_note = check_record(node, "inversion", inversion, model)
        positive = inversion.positive if positive is None else positive
        negative = inversion.negative if negative is None else negative
        require_negative(node, cfg, negative)
        start = None
        if start_latent is not None:
            start = check_latent(node, model, start_latent, "start_latent")
            if tuple(start.shape) != tuple(inversion.latent.shape):
                raise NodeInputError(node, "start_latent", f"shape {tuple(start.shape)} differs from the inverted "
                                     f"latent {tuple(inversion.latent.shape)}")
        run_model, notes = with_run_notes(model)
        samples = run_reverse(run_model, inversion, positive, negative, cfg, start)
        report = f"sampled back {len(inversion.sigmas) - 1} steps ({inversion.mode})"
        if measure_error:
            report += f"; error against the inverted latent's source (relative RMS) " \
                      f"{inv.relative_error(samples, inversion.source):.3e}"
        if patch_note:
            report += f"; {patch_note}"
        if notes.lines:
            report += "\n" + notes.text("\n")
        return io.NodeOutput(tag_latent({"samples": samples}, model), ui=ui.PreviewText(report))


class InversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "InversionSampler",
            display_name="DDIM Inversion Sampler (Magic Portrait)",
            category=CATEGORY + "/inversion",
            description="A SAMPLER that inverts: use it in SamplerCustom/SamplerCustomAdvanced with add_noise off "
            "(or DisableNoise) and a normal schedule; it walks the schedule upwards from its smallest non-zero "
            "sigma. Its second output is the matching reverse SAMPLER, which samples this sampler's inverted latents "
            "back exactly (bdia included: it keeps the state bdia needs besides the LATENT). EDICT needs the DDIM "
            "Invert node.",
            inputs=[
                io.Combo.Input("mode", options=["ddim", "fixed_point", "bdia"], default="ddim", tooltip=MODE_TOOLTIP),
                io.Int.Input("refine_iterations", default=3, min=0, max=50),
                io.Float.Input("bdia_gamma", default=inv.BDIA_DEFAULT_GAMMA, min=0.5, max=1.0, step=0.01,
                               optional=True, tooltip=GAMMA_TOOLTIP),
            ],
            outputs=[
                io.Sampler.Output(display_name="inversion_sampler"),
                io.Sampler.Output(display_name="reverse_sampler",
                                  tooltip="Samples this sampler's inverted latents back on the same sigmas (exact for "
                                  "bdia; for ddim/fixed_point the same as the Inverted Latent Sampler). A latent it "
                                  "did not invert starts with a plain DDIM step."),
            ],
        )

    @classmethod
    def execute(cls, mode, refine_iterations, bdia_gamma=inv.BDIA_DEFAULT_GAMMA) -> io.NodeOutput:
        try:
            inv.check_bdia_gamma(bdia_gamma)
        except ValueError as err:
            raise NodeInputError(cls.define_schema().node_id, "bdia_gamma", str(err)) from None
        log = inv.BoundaryLog()
        forward = inversion_sampler_function(mode, refine_iterations, inv.EDICT_DEFAULT_MIX, bdia_gamma=bdia_gamma,
                                             boundary_log=log)
        reverse = reverse_sampler_function(mode, inv.EDICT_DEFAULT_MIX, bdia_gamma=bdia_gamma, boundaries=log)
        return io.NodeOutput(comfy.samplers.KSAMPLER(forward), comfy.samplers.KSAMPLER(reverse))


class InvertedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "InvertedSampler",
            display_name="Inverted Latent Sampler (Magic Portrait)",
            category=CATEGORY + "/inversion",
            description="A SAMPLER that exactly reverses the inversion sampler on the same schedule (it stops at the "
            "smallest non-zero sigma, where the inversion started). With an inversion record it follows the "
            "record's mode, including EDICT and BDIA (exact when it is given the record's inverted latent).",
            inputs=[InversionRecordType.Input("inversion", optional=True)],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, inversion=None) -> io.NodeOutput:
        if inversion is None:
            return io.NodeOutput(comfy.samplers.KSAMPLER(reverse_sampler_function("ddim", inv.EDICT_DEFAULT_MIX)))
        if not isinstance(inversion, InversionRecord):
            raise NodeInputError(cls.define_schema().node_id, "inversion", "expected a MAGIC_INVERSION record")
        # BDIA's partner belongs to the inverted latent only: the boundary finds it, another start takes a DDIM step
        partner = None if inversion.mode == "bdia" else inversion.partner
        fn = reverse_sampler_function(inversion.mode, inversion.edict_mix, partner, inversion.latent_format.process_in,
                                      bdia_gamma=inversion.bdia_gamma, boundaries=[inversion.boundary])
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn))


NODES = [DDIMInvert, SampleInverted, InversionSampler, InvertedSampler]
