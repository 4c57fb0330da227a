"""Core tier: inversion maths on an analytic denoiser (no ComfyUI)."""

import math

import pytest
import tolerances as tol
import torch
from oracles import prior_growth
from tolerances import float_tol, unit_roundoff

from magic_core import inversion as inv
from magic_core.gaussian_prior import GaussianPrior


def gaussian_denoiser(data_std=1.0, warp=0.0):
    """Exact denoiser for N(0, data_std^2) data, optionally warped by a smooth nonlinearity so that the
    inversion is not trivially linear."""

    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        gain = data_std**2 / (data_std**2 + sigma**2)
        return gain * x + warp * torch.tanh(x) * sigma / (1 + sigma)

    return denoise


def schedule(n=12, smin=0.03, smax=14.6):
    rho = 7.0
    ramp = torch.linspace(0, 1, n)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1)])


@pytest.fixture
def x0():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_inversion_sigmas_flip_and_drop_zero():
    sampling = schedule(5)
    asc = inv.inversion_sigmas(sampling)
    assert asc.tolist() == sorted(sampling[:-1].tolist())
    assert inv.inversion_sigmas(asc).tolist() == asc.tolist()
    with pytest.raises(ValueError, match="empty"):
        inv.inversion_sigmas(torch.zeros(1))
    with pytest.raises(ValueError, match="positive"):
        inv.inversion_sigmas(torch.tensor([2.0, 0.0, 1.0]))


def test_plain_mode_is_euler_over_ascending_sigmas(x0):
    den = gaussian_denoiser(warp=0.3)
    sig = inv.inversion_sigmas(schedule())
    out = inv.invert(den, x0, sig, mode="ddim")
    x = x0
    for a, b in zip(sig[:-1], sig[1:], strict=True):
        x = x + (b - a) * (x - den(x, a)) / a
    # the same Euler steps in another arithmetic order: a few operations per element and step
    torch.testing.assert_close(out.latent, x, rtol=0, atol=tol.float_tol(x.dtype, 8 * len(sig), tol.magnitude(x)))
    assert out.model_calls == len(sig) - 1
    assert len(out.trajectory) == len(sig)


def test_fixed_point_error_falls_with_iterations(x0):
    den = gaussian_denoiser(warp=0.5)
    sig = inv.inversion_sigmas(schedule(10))
    errors = []
    for k in (0, 1, 3, 8):
        out = inv.invert(den, x0, sig, mode="fixed_point", refine_iterations=k)
        back = inv.sample_back(den, out.latent, sig, mode="ddim")
        errors.append(inv.relative_error(back, x0))
    assert errors[0] > 1e-3, errors
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 20


def test_edict_round_trip_is_exact(x0):
    den = gaussian_denoiser(warp=0.8)
    sig = inv.inversion_sigmas(schedule(20))
    out = inv.invert(den, x0.double(), sig.double(), mode="edict")
    back = inv.sample_back(den, out.latent, sig.double(), mode="edict", partner=out.partner)
    # exact in exact arithmetic: float64 rounding over 2 x 20 steps of a few operations each
    assert inv.relative_error(back, x0) < tol.float_tol(torch.float64, 8 * 2 * len(sig))
    out32 = inv.invert(den, x0, sig, mode="edict")
    back32 = inv.sample_back(den, out32.latent, sig, mode="edict", partner=out32.partner)
    # states in float64 (the partner too), the denoiser in float32: one float32 rounding per call
    assert inv.relative_error(back32, x0) < tol.float_tol(torch.float32, 8 * 2 * len(sig))
    # without the partner sequence the reverse is not exact: the partner carries information
    assert inv.relative_error(inv.sample_back(den, out32.latent, sig, mode="edict"), x0) > 1e-3


def test_capture_gate_opens_once_per_sampler_sigma(x0):
    seen = []
    state = {"open": False}

    def den(x, sigma):
        if state["open"]:
            seen.append(round(float(sigma), 6))
        return gaussian_denoiser()(x, sigma)

    sig = inv.inversion_sigmas(schedule(6))
    for mode, k in (("ddim", 0), ("fixed_point", 2), ("edict", 0), ("bdia", 0)):
        seen.clear()
        inv.invert(den, x0, sig, mode=mode, refine_iterations=k, capture_top=True,
                   set_capture=lambda flag: state.__setitem__("open", flag))
        assert sorted(seen) == [round(float(s), 6) for s in sig], mode
        assert state["open"] is False


def test_strength_steps_and_argument_errors(x0):
    assert inv.strength_steps(50, 1.0) == 50
    assert inv.strength_steps(50, 0.3) == 15
    with pytest.raises(ValueError, match="steps"):
        inv.strength_steps(0, 1.0)
    with pytest.raises(ValueError, match="strength"):
        inv.strength_steps(10, 1.5)
    with pytest.raises(ValueError, match="mode"):
        inv.invert(gaussian_denoiser(), x0, [0.1, 1.0], mode="bogus")


def test_inputs_not_mutated(x0):
    before = x0.clone()
    sig = inv.inversion_sigmas(schedule(4))
    for mode in ("edict", "bdia"):
        out = inv.invert(gaussian_denoiser(warp=0.2), x0, sig, mode=mode)
        top, partner = out.latent.clone(), out.partner.clone()
        inv.sample_back(gaussian_denoiser(warp=0.2), out.latent, sig, mode=mode, partner=out.partner)
        assert torch.equal(x0, before) and torch.equal(out.latent, top) and torch.equal(out.partner, partner)


def test_relative_error_is_scale_free():
    a = torch.ones(3)
    assert math.isclose(inv.relative_error(a * 1.1, a), 0.1, rel_tol=1e-6)
    assert math.isclose(inv.relative_error(a * 110, a * 100), 0.1, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------------ BDIA
PRIOR = GaussianPrior.random((4, 8, 8), seed=5)
HALF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bdia_round_trip_tol(x0: torch.Tensor, sig: torch.Tensor, prior: GaussianPrior) -> float:
    """Relative RMS bound of a BDIA round trip whose model calls repeat the inversion's bit for bit: the one rounding
    of the float64 result to x0's dtype, plus float64 rounding of the state updates (4 operations per step and
    direction, on values up to the top state's size) carried by the parasitic mode, which grows by at most the ODE's
    gain over the schedule."""
    steps = len(sig) - 1
    gain = prior_growth(prior, float(sig[0]), float(sig[-1]))
    top = float(x0.abs().max()) * gain + 4 * float(sig[-1])  # |x_N| <= |x0| * gain + a few sigma_max of noise
    rms = float(x0.double().pow(2).mean().sqrt())
    return 2 * unit_roundoff(x0.dtype) + float_tol(torch.float64, 8 * steps, top) * gain / rms


@pytest.mark.parametrize("model_dtype", HALF_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("steps", [10, 50, 200])
def test_bdia_round_trip_is_exact_to_float_precision(steps, model_dtype):
    """The Gaussian prior's exact denoiser evaluated in fp32, fp16 or bf16, states in float64: the reverse repeats the
    inversion's model calls bit for bit, so nothing but the final rounding is left, whatever the model's precision."""
    x0 = PRIOR.sample(2, seed=6)
    sig = inv.inversion_sigmas(schedule(steps))
    den = PRIOR.with_dtype(model_dtype)
    out = inv.invert(den, x0, sig, mode="bdia")
    back = inv.sample_back(den, out.boundary.top, sig, mode="bdia", partner=out.boundary.partner,
                           model_dtype=x0.dtype)
    assert back.dtype == x0.dtype
    assert inv.relative_error(back, x0) <= bdia_round_trip_tol(x0, sig, PRIOR)
    # what DDIM's round trip leaves on the same schedule, for scale: discretisation error, orders above
    ddim = inv.sample_back(den, inv.invert(den, x0, sig).latent, sig)
    assert inv.relative_error(ddim, x0) > 1e3 * bdia_round_trip_tol(x0, sig, PRIOR)


def test_bdia_from_rounded_states_is_exact_up_to_the_rounding_grown_by_the_ode():
    """Handed the top and partner rounded to float32 (as a LATENT carries them), the reverse starts one rounding off
    and its model inputs then round differently at every step: errors of u times the state's size (up to the ODE's
    gain times x0's), each grown by at most that gain again. Still far below DDIM's discretisation error."""
    x0 = PRIOR.sample(2, seed=7)
    for steps in (10, 50):
        sig = inv.inversion_sigmas(schedule(steps))
        out = inv.invert(PRIOR, x0, sig, mode="bdia")
        back = inv.sample_back(PRIOR, out.latent, sig, mode="bdia", partner=out.partner)
        gain = prior_growth(PRIOR, float(sig[0]), float(sig[-1]))
        bound = float_tol(torch.float32, steps, gain) * gain
        ddim = inv.sample_back(PRIOR, inv.invert(PRIOR, x0, sig).latent, sig)
        assert inv.relative_error(back, x0) <= bound < inv.relative_error(ddim, x0) / 10


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.8])
def test_bdia_update_is_the_papers_and_its_inverse(gamma):
    """One step each way against the formula written out in sigmas, the first inversion step is plain DDIM, and the
    call counts: N for the inversion, N - 1 for the reverse given the partner, N from a DDIM first step."""
    x0 = PRIOR.sample(1, seed=8).double()
    sig = inv.inversion_sigmas(schedule(6)).double()
    calls = []

    def den(x, sigma):
        calls.append(float(sigma))
        return PRIOR(x, sigma)

    out = inv.invert(den, x0, sig, mode="bdia", bdia_gamma=gamma)
    assert len(calls) == len(sig) - 1
    x = out.trajectory
    eps = [(x[i] - PRIOR(x[i], sig[i])) / sig[i] for i in range(len(sig) - 1)]
    one_step = tol.float_tol(torch.float64, 8, tol.magnitude(*x))  # a few float64 operations on states this size
    torch.testing.assert_close(x[1], x[0] + (sig[1] - sig[0]) * eps[0], rtol=0, atol=one_step)
    for i in range(1, len(sig) - 1):
        lower = gamma * (x[i + 1] - (sig[i + 1] - sig[i]) * eps[i]) + (1 - gamma) * x[i] + (sig[i - 1] - sig[i]) * eps[i]
        torch.testing.assert_close(lower, x[i - 1], rtol=0, atol=one_step)
    calls.clear()
    back = inv.sample_back(den, out.latent, sig, mode="bdia", bdia_gamma=gamma, partner=out.partner)
    assert len(calls) == len(sig) - 2
    torch.testing.assert_close(back, x0, rtol=0, atol=tol.float_tol(torch.float64, 8 * len(sig), tol.magnitude(*x)))
    calls.clear()
    inv.sample_back(den, out.latent, sig, mode="bdia", bdia_gamma=gamma)
    assert len(calls) == len(sig) - 1 and calls[0] == float(sig[-1])


def test_bdia_one_step_reverses_to_its_partner():
    x0 = PRIOR.sample(1, seed=9)
    sig = inv.inversion_sigmas(schedule(2))
    out = inv.invert(PRIOR, x0, sig, mode="bdia")
    assert out.model_calls == 1 and torch.equal(out.partner, x0)
    assert torch.equal(inv.sample_back(PRIOR, out.latent, sig, mode="bdia", partner=out.partner), x0)


def test_bdia_follows_the_ode_closer_than_ddim():
    """Against the Gaussian prior's exact flow: BDIA's inverted latent is nearer the exact ODE solution than DDIM's
    (it corrects each interval from both ends), though neither is exact."""
    x0 = PRIOR.sample(2, seed=10)
    sig = inv.inversion_sigmas(schedule(50))
    exact = PRIOR.flow(x0, float(sig[0]), float(sig[-1]))
    bdia = inv.relative_error(inv.invert(PRIOR, x0, sig, mode="bdia").latent, exact)
    ddim = inv.relative_error(inv.invert(PRIOR, x0, sig, mode="ddim").latent, exact)
    assert 0 < bdia < ddim / 2, (bdia, ddim)


def test_bdia_gamma_below_one_diverges_over_many_steps_and_is_refused():
    """The inversion divides by gamma every step: gamma 0.5 over 50 steps blows the latent up; gamma 1 never does."""
    x0 = PRIOR.sample(1, seed=11)
    sig = inv.inversion_sigmas(schedule(50))
    steady = inv.invert(PRIOR, x0, sig, mode="bdia", bdia_gamma=1.0)
    assert inv.divergence_ratio(x0, steady.latent, float(sig[-1])) < 2
    inv.check_divergence(x0, steady, 1.0, 10.0)
    wild = inv.invert(PRIOR, x0, sig, mode="bdia", bdia_gamma=0.5)
    assert inv.divergence_ratio(x0, wild.latent, float(sig[-1])) > 1e3
    with pytest.raises(inv.DivergenceError, match="gamma 0.5 over 49 steps diverged"):
        inv.check_divergence(x0, wild, 0.5, 10.0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            inv.invert(PRIOR, x0, sig, mode="bdia", bdia_gamma=bad)


def test_exact_boundary_matches_its_rounded_top_only():
    x0 = PRIOR.sample(1, seed=12)
    sig = inv.inversion_sigmas(schedule(8))
    boundary = inv.invert(PRIOR, x0, sig, mode="bdia").boundary
    assert boundary.top.dtype == torch.float64
    rounded = (boundary.top.float() / 0.18215) * 0.18215  # a LATENT's process_out / process_in round trip
    assert boundary.matches(rounded, sig)
    assert not boundary.matches(rounded + 1e-3, sig)
    assert not boundary.matches(rounded, sig * 1.01)
    assert not boundary.matches(rounded[:, :2], sig)
    log = inv.BoundaryLog(keep=2)
    other = inv.invert(PRIOR, PRIOR.sample(1, seed=13), sig, mode="bdia").boundary
    for b in (boundary, other):
        log.remember(b)
    assert inv.find_boundary(log, rounded, sig) is boundary
    log.remember(inv.invert(PRIOR, PRIOR.sample(1, seed=14), sig, mode="bdia").boundary)
    assert inv.find_boundary(log, rounded, sig) is None and len(log) == 2  # the oldest went


def test_steps_that_invert_nothing():
    """N sampling steps give N - 1 inversion steps; strength keeps round(N * strength) of them."""
    assert inv.inverted_steps(1, 1.0) == 0 and inv.inverted_steps(2, 1.0) == 1
    assert inv.minimum_steps(1.0) == 2
    assert inv.inverted_steps(3, 0.5) == 1  # round(1.5) = 2 sampling steps
    assert inv.minimum_steps(0.5) == 3
    assert inv.minimum_steps(0.1) == 15  # round(1.5) = 2 again


# ---------------------------------------------------------------------------------------------- the analytic prior
def test_gaussian_prior_flow_solves_the_probability_flow_ode():
    """d/dsigma of the closed-form flow equals (x - D(x, sigma)) / sigma (central difference), and DDIM converges to
    the flow at first order (4x the steps, about a quarter of the error)."""
    x = PRIOR.sample(1, seed=15).double()
    for sigma in (0.1, 1.0, 7.0):
        h = 1e-4 * sigma
        derivative = (PRIOR.flow(x, 1.0, sigma + h) - PRIOR.flow(x, 1.0, sigma - h)) / (2 * h)
        at = PRIOR.flow(x, 1.0, sigma)
        # a central difference: truncation O(h^2) = 1e-8 sigma^2 relative, far above float64 rounding / h
        torch.testing.assert_close(derivative, (at - PRIOR(at, sigma)) / sigma, rtol=1e-6, atol=1e-8)
    errors = []
    for steps in (20, 80):
        sig = inv.inversion_sigmas(schedule(steps)).double()
        errors.append(inv.relative_error(inv.invert(PRIOR, x, sig).latent, PRIOR.flow(x, float(sig[0]), float(sig[-1]))))
    assert 2.5 < errors[0] / errors[1] < 6, errors


def test_gaussian_prior_denoiser_is_the_posterior_mean_in_its_dtype():
    prior = GaussianPrior(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    x = torch.tensor([[3.0, 3.0]])
    torch.testing.assert_close(prior(x, 1.0), torch.tensor([[0.5 + 0.5 * 2.5, -1.0 + 0.8 * 4.0]]))
    half = prior.with_dtype(torch.float16)(x, 1.0)
    assert half.dtype == torch.float32
    assert (half - prior(x, 1.0)).abs().max() <= 4 * unit_roundoff(torch.float16) * 4  # fp16 arithmetic, |D| < 4
    with pytest.raises(ValueError, match="positive"):
        GaussianPrior(0.0, torch.tensor([1.0, 0.0]))
