"""ComfyUI tier: DDIM inversion nodes on tiny random SD1.5/SDXL-architecture models."""

import pytest
import tolerances as tol
import torch
from helpers import assert_same_snapshot, latent, model_snapshot, run_in_graph
from tolerances import float_tol

from magic_portrait.comfy_env import WorkflowError

STEPS = 12


# The exact modes keep float64 states and repeat the inversion's model calls bit for bit: what remains of a round
# trip is a few float32 roundings of the latent (LATENT <-> model space, the relative error's own arithmetic).
EXACT = tol.float_tol(torch.float32, 64)


def invert(nodes, model, cond, lat, mode="ddim", k=0, steps=STEPS, strength=1.0, measure=True, **extra):
    out = run_in_graph(nodes["MagicPortrait_DDIMInvert"], model=model, positive=cond, latent=lat, scheduler="normal",
                   steps=steps, strength=strength, mode=mode, refine_iterations=k, edict_mix=0.93, cfg=1.0,
                   measure_round_trip=measure, **extra)
    return out


def test_round_trip_error_falls_with_refinement_and_edict_is_exact(nodes, sd15, tiny):
    cond, lat = tiny.sd15_cond(1), latent(1)
    errors = {}
    for mode, k in (("ddim", 0), ("fixed_point", 2), ("fixed_point", 6), ("edict", 0)):
        # random UNets are no denoisers: fixed-point refinement contracts only with steps this small
        out = invert(nodes, sd15, cond, lat, mode=mode, k=k, steps=30)
        record = out.result[1]
        errors[(mode, k)] = record.round_trip_error
        assert "round-trip error" in out.ui["text"][0]
    assert errors[("ddim", 0)] > 1e-3, errors
    assert errors[("fixed_point", 2)] < errors[("ddim", 0)], errors
    assert errors[("fixed_point", 6)] < errors[("fixed_point", 2)], errors
    assert errors[("edict", 0)] < EXACT < errors[("ddim", 0)] / 1000, errors


def test_sample_inverted_reconstructs_and_reports(nodes, sd15, tiny, pack):
    cond, lat = tiny.sd15_cond(2), latent(2)
    record = invert(nodes, sd15, cond, lat, mode="edict", measure=False).result[1]
    out = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=True)
    # EDICT is exact: float64 states, the same model calls in reverse
    assert pack.magic_core.inversion.relative_error(out.result[0]["samples"], lat["samples"]) < EXACT
    assert "error" in out.ui["text"][0]


def test_plain_mode_agrees_with_core_euler_on_flipped_schedule(nodes, sd15, tiny, pack):
    import comfy.samplers
    from comfy.k_diffusion import sampling as kd

    cond, lat = tiny.sd15_cond(3), latent(3)
    out = invert(nodes, sd15, cond, lat, measure=False)
    inverted, record = out.result[0]["samples"], out.result[1]
    with torch.inference_mode():
        euler = pack.nodes.inversion_sampling.guided_run(sd15, cond, None, 1.0, lat["samples"],
                                             comfy.samplers.KSAMPLER(kd.sample_euler), record.sigmas)
    torch.testing.assert_close(inverted, euler, rtol=0, atol=tol.model_tol(sd15, euler, calls=STEPS))
    assert torch.equal(record.sigmas, record.sigmas.sort().values)


def test_sampler_nodes_compose_with_core_sampler_custom(nodes, sd15, tiny):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    cond, lat = tiny.sd15_cond(4), latent(4)
    ours = invert(nodes, sd15, cond, lat, mode="fixed_point", k=2, measure=False)
    sigmas = run_in_graph(BasicScheduler, model=sd15, scheduler="normal", steps=STEPS, denoise=1.0).result[0]
    torch.testing.assert_close(sigmas, ours.result[2])
    sampler = run_in_graph(nodes["MagicPortrait_InversionSampler"], mode="fixed_point", refine_iterations=2).result[0]
    inverted = run_in_graph(SamplerCustom, model=sd15, add_noise=False, noise_seed=0, cfg=1.0, positive=cond,
                        negative=cond, sampler=sampler, sigmas=sigmas, latent_image=lat).result[0]["samples"]
    torch.testing.assert_close(inverted, ours.result[0]["samples"], rtol=0,
                               atol=tol.model_tol(sd15, inverted, calls=3 * STEPS))

    reverse = run_in_graph(nodes["MagicPortrait_InvertedSampler"], inversion=ours.result[1]).result[0]
    back = run_in_graph(SamplerCustom, model=sd15, add_noise=False, noise_seed=0, cfg=1.0, positive=cond, negative=cond,
                    sampler=reverse, sigmas=sigmas, latent_image={"samples": inverted}).result[0]["samples"]
    direct = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=ours.result[1], cfg=1.0,
                      measure_error=False).result[0]["samples"]
    torch.testing.assert_close(back, direct, rtol=0, atol=tol.model_tol(sd15, direct, calls=4 * STEPS))


def test_strength_inverts_part_of_the_schedule(nodes, sd15, tiny):
    cond, lat = tiny.sd15_cond(5), latent(5)
    full = invert(nodes, sd15, cond, lat, measure=False).result[1]
    part = invert(nodes, sd15, cond, lat, strength=0.5, measure=False).result[1]
    assert len(part.sigmas) == STEPS // 2
    torch.testing.assert_close(part.sigmas, full.sigmas[: STEPS // 2])
    # the partial trajectory is the start of the full one: same steps, same model calls
    torch.testing.assert_close(part.latent, full.trajectory[STEPS // 2 - 1], rtol=0,
                               atol=tol.model_tol(sd15, part.latent, calls=STEPS // 2))


def test_batch_entries_invert_independently(nodes, sd15, tiny):
    cond = tiny.sd15_cond(6)
    lat = latent(6, batch=2)
    both = invert(nodes, sd15, cond, lat, measure=False).result[0]["samples"]
    first = invert(nodes, sd15, cond, {"samples": lat["samples"][:1]}, measure=False).result[0]["samples"]
    torch.testing.assert_close(both[:1], first, rtol=0, atol=tol.model_tol(sd15, first, calls=STEPS))


def test_v_prediction_round_trip_is_exact_with_edict(nodes, tiny):
    model = tiny.build_sd15_model(seed=7, v_prediction=True)
    record = invert(nodes, model, tiny.sd15_cond(7), latent(7), mode="edict", steps=8).result[1]
    assert record.round_trip_error < EXACT


def test_sdxl_conditioning_is_honoured(nodes, sdxl, tiny):
    lat = latent(8, height=16, width=16)
    base = tiny.sdxl_cond(8)
    a = invert(nodes, sdxl, base, lat, steps=6, measure=False).result[0]["samples"]
    again = invert(nodes, sdxl, tiny.sdxl_cond(8), lat, steps=6, measure=False).result[0]["samples"]
    assert torch.equal(a, again)
    other_pooled = [[base[0][0], {**base[0][1], "pooled_output": torch.randn_like(base[0][1]["pooled_output"])}]]
    b = invert(nodes, sdxl, other_pooled, lat, steps=6, measure=False).result[0]["samples"]
    assert tol.differs(b, a), "the pooled output must reach the model during inversion"
    other_size = [[base[0][0], {**base[0][1], "width": 512, "height": 1536}]]
    c = invert(nodes, sdxl, other_size, lat, steps=6, measure=False).result[0]["samples"]
    assert tol.differs(c, a), "SDXL size conditioning must reach the model during inversion"
    record = invert(nodes, sdxl, base, lat, steps=6, mode="edict").result[1]
    assert record.family == "sdxl" and record.round_trip_error < EXACT


def test_controlnet_is_honoured_during_inversion(nodes, sd15, tiny):
    from nodes import ControlNetApplyAdvanced

    control = tiny.build_sd15_controlnet(seed=9)
    cond, lat = tiny.sd15_cond(9), latent(9)
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(9))
    positive, _ = run_in_graph(ControlNetApplyAdvanced, positive=cond, negative=cond, control_net=control, image=hint,
                           strength=1.0, start_percent=0.0, end_percent=1.0).result
    plain = invert(nodes, sd15, cond, lat, steps=6, measure=False).result[0]["samples"]
    controlled = invert(nodes, sd15, positive, lat, steps=6, measure=False).result[0]["samples"]
    assert tol.differs(controlled, plain)
    record = invert(nodes, sd15, positive, lat, steps=6, mode="edict").result[1]
    assert record.round_trip_error < EXACT


def test_input_model_is_not_changed(nodes, sd15, tiny):
    before = model_snapshot(sd15)
    record = invert(nodes, sd15, tiny.sd15_cond(10), latent(10), mode="edict", steps=4).result[1]
    run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=False)
    assert_same_snapshot(before, model_snapshot(sd15))


@pytest.mark.parametrize(
    ("change", "input_name", "message"),
    [
        ({"steps": 4, "strength": 0.3}, "steps", "use at least 5 steps"),
        ({"latent": {"samples": torch.ones(1, 16, 8, 8)}}, "latent", "does not belong"),
        ({"latent": {"samples": torch.zeros(0, 4, 8, 8)}}, "latent", "empty"),
        ({"cfg": 5.0}, "negative", "cfg is 5.0"),
        ({"latent": {"samples": torch.ones(1, 4, 16, 16), "magic_latent_format": "SDXL"}}, "latent",
         "SDXL latent format"),
    ],
)
def test_bad_input_names_node_and_input(nodes, sd15, tiny, change, input_name, message):
    args = {"model": sd15, "positive": tiny.sd15_cond(0), "latent": latent(0), "scheduler": "normal", "steps": 4,
            "strength": 1.0, "mode": "ddim", "refine_iterations": 0, "edict_mix": 0.93, "cfg": 1.0,
            "measure_round_trip": False, **change}
    with pytest.raises(WorkflowError) as err:
        run_in_graph(nodes["MagicPortrait_DDIMInvert"], **args)
    text = str(err.value)
    assert "MagicPortrait_DDIMInvert" in text and f"'{input_name}'" in text and message in text, text


def test_record_from_another_model_is_refused(nodes, sd15, tiny):
    other = tiny.build_sd15_model(seed=11)
    record = invert(nodes, other, tiny.sd15_cond(11), latent(11), steps=3, measure=False).result[1]
    with pytest.raises(WorkflowError, match=r"MagicPortrait_SampleInverted.*input 'inversion'.*another checkpoint"):
        run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=False)


def test_inverted_sampler_follows_an_edict_record_inside_sampler_custom(nodes, sd15, tiny, pack):
    """EDICT's second sequence travels in the record, so the core SamplerCustom still reverses it exactly."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    cond, lat = tiny.sd15_cond(12), latent(12)
    out = invert(nodes, sd15, cond, lat, mode="edict", steps=6, measure=False)
    inverted, record, sigmas = out.result[0], out.result[1], out.result[2]
    reverse = run_in_graph(nodes["MagicPortrait_InvertedSampler"], inversion=record).result[0]
    back = run_in_graph(SamplerCustom, model=sd15, add_noise=False, noise_seed=0, cfg=1.0, positive=cond, negative=cond,
                    sampler=reverse, sigmas=sigmas, latent_image=inverted).result[0]["samples"]
    assert pack.magic_core.inversion.relative_error(back, lat["samples"]) < EXACT


# ------------------------------------------------------------------------------------------------------------ BDIA
# Exact round trips end three roundings from the source: process_in on the way in, the float64 result rounded to
# float32, process_out on the way out (the model calls of the reverse repeat the inversion's bit for bit).
ROUND_TRIP_TOL = float_tol(torch.float32, 3)


def test_bdia_node_route_is_exact(nodes, sd15, tiny, pack):
    """DDIM Invert in bdia mode and Sample Inverted, on a random UNet: exact to float32 rounding, with the one model
    call per step DDIM makes; the same start latent given explicitly is picked up exactly too."""
    inv = pack.magic_core.inversion
    cond, lat = tiny.sd15_cond(20), latent(20)
    out = invert(nodes, sd15, cond, lat, mode="bdia", steps=STEPS)
    record = out.result[1]
    text = out.ui["text"][0]
    assert f"{STEPS - 1} steps, {STEPS - 1} model calls" in text and "bdia (gamma 1)" in text, text
    assert record.round_trip_error <= ROUND_TRIP_TOL
    ddim = invert(nodes, sd15, cond, lat, mode="ddim", steps=STEPS).result[1].round_trip_error
    assert ddim > 1e3 * ROUND_TRIP_TOL
    back = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=True)
    assert inv.relative_error(back.result[0]["samples"], lat["samples"]) <= ROUND_TRIP_TOL
    same = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=False,
                    start_latent=out.result[0]).result[0]["samples"]
    assert torch.equal(same, back.result[0]["samples"])
    # another start (an edit) begins with a DDIM step and lands elsewhere, without error
    shifted = {"samples": out.result[0]["samples"] * 0.9}
    edited = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0,
                      measure_error=False, start_latent=shifted).result[0]["samples"]
    assert torch.isfinite(edited).all() and inv.relative_error(edited, lat["samples"]) > 1e-3


def test_bdia_gamma_below_one_is_exact_and_a_diverging_one_is_refused(nodes, sd15, tiny):
    cond, lat = tiny.sd15_cond(21), latent(21)
    record = invert(nodes, sd15, cond, lat, mode="bdia", steps=8, bdia_gamma=0.9).result[1]
    assert record.bdia_gamma == 0.9 and record.round_trip_error <= ROUND_TRIP_TOL
    with pytest.raises(WorkflowError, match=r"MagicPortrait_DDIMInvert.*'bdia_gamma'.*diverged"):
        invert(nodes, sd15, cond, lat, mode="bdia", steps=50, bdia_gamma=0.5, measure=False)


def test_bdia_sampler_route_inside_sampler_custom(nodes, sd15, tiny, pack):
    """The SAMPLER pair in core SamplerCustom: the inversion SAMPLER inverts as DDIM Invert does, its paired reverse
    SAMPLER samples the result back exactly (it keeps BDIA's partner, which a LATENT cannot carry), and the Inverted
    Latent Sampler given a bdia record does too."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustom

    inv = pack.magic_core.inversion
    cond, lat = tiny.sd15_cond(22), latent(22)
    sigmas = run_in_graph(BasicScheduler, model=sd15, scheduler="normal", steps=STEPS, denoise=1.0).result[0]
    forward, reverse = run_in_graph(nodes["MagicPortrait_InversionSampler"], mode="bdia", refine_iterations=0,
                                bdia_gamma=1.0).result

    def custom(sampler, latent_image):
        return run_in_graph(SamplerCustom, model=sd15, add_noise=False, noise_seed=0, cfg=1.0, positive=cond,
                        negative=cond, sampler=sampler, sigmas=sigmas, latent_image=latent_image).result[0]

    inverted = custom(forward, lat)
    ours = invert(nodes, sd15, cond, lat, mode="bdia", steps=STEPS, measure=False)
    assert torch.equal(inverted["samples"], ours.result[0]["samples"])
    back = custom(reverse, inverted)["samples"]
    assert inv.relative_error(back, lat["samples"]) <= ROUND_TRIP_TOL
    record_reverse = run_in_graph(nodes["MagicPortrait_InvertedSampler"], inversion=ours.result[1]).result[0]
    via_record = custom(record_reverse, ours.result[0])["samples"]
    assert inv.relative_error(via_record, lat["samples"]) <= ROUND_TRIP_TOL
    # a latent the pair did not invert gets a plain DDIM first step, not someone else's partner
    other = custom(reverse, {"samples": inverted["samples"] * 0.9})["samples"]
    assert torch.isfinite(other).all() and inv.relative_error(other, lat["samples"]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_bdia_is_exact_through_comfy_sampling_with_the_analytic_denoiser(nodes, sd15, tiny, pack, dtype):
    """The Gaussian prior's exact denoiser behind a real ModelPatcher (a model function wrapper), evaluated in fp32,
    fp16 or bf16: BDIA's round trip through ComfyUI's guider is exact to float32 rounding; DDIM's is what the core
    DDIM gives on the same prior (the same path, not a random network's error)."""
    from magic_portrait.analytic_model import analytic_model, clean_latent, prior_for

    inv = pack.magic_core.inversion
    prior = prior_for(sd15, (16, 16), seed=23, compute_dtype=dtype)
    model = analytic_model(sd15, prior)
    lat = clean_latent(sd15, prior, seed=24)
    cond = tiny.sd15_cond(23)
    record = invert(nodes, model, cond, lat, mode="bdia", steps=50).result[1]
    assert record.round_trip_error <= ROUND_TRIP_TOL
    assert model.model_options["model_function_wrapper"].calls == 49 + 48
    ddim = invert(nodes, model, cond, lat, mode="ddim", steps=50).result[1]
    x0 = lat["samples"] * 0.18215
    core = inv.sample_back(prior, inv.invert(prior, x0, ddim.sigmas).latent, ddim.sigmas)
    # the same 49 + 49 Euler steps of a few operations each, in ComfyUI and in the core
    assert abs(ddim.round_trip_error - inv.relative_error(core, x0)) <= float_tol(torch.float32, 4 * 98, 15.0)


def test_latents_carry_and_check_their_latent_format(nodes, sd15, sdxl, tiny):
    """An SD1.5 latent and an SDXL one both have 4 channels; the nodes' LATENT outputs name their latent format, so
    one made with SD1.5 is refused by SDXL (and the other way round), naming the input."""
    out = invert(nodes, sd15, tiny.sd15_cond(25), latent(25), steps=3, measure=False)
    inverted, record = out.result[0], out.result[1]
    assert inverted["magic_latent_format"] == "SD15"
    back = run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0,
                    measure_error=False).result[0]
    assert back["magic_latent_format"] == "SD15"
    with pytest.raises(WorkflowError, match=r"MagicPortrait_DDIMInvert.*'latent'.*SD15 latent format.*uses SDXL"):
        invert(nodes, sdxl, tiny.sdxl_cond(25), back, steps=3, measure=False)
    sdxl_latent = invert(nodes, sdxl, tiny.sdxl_cond(26), latent(26), steps=3, measure=False).result[0]
    assert sdxl_latent["magic_latent_format"] == "SDXL"
    with pytest.raises(WorkflowError, match=r"MagicPortrait_SampleInverted.*'start_latent'.*SDXL latent format"):
        run_in_graph(nodes["MagicPortrait_SampleInverted"], model=sd15, inversion=record, cfg=1.0, measure_error=False,
                 start_latent=sdxl_latent)


def test_schema_states_the_real_minimum_and_what_strength_is(nodes):
    inputs = {i.id: i for i in nodes["MagicPortrait_DDIMInvert"].define_schema().inputs}
    assert inputs["steps"].min == 2
    tooltip = inputs["strength"].tooltip
    assert "fraction of the schedule that is inverted" in tooltip and "Not KSampler's denoise" in tooltip
    assert "bdia" in inputs["mode"].options and inputs["bdia_gamma"].default == 1.0
