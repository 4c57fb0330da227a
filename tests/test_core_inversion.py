"""Core tier: inversion maths on an analytic denoiser (no ComfyUI)."""

import math

import pytest
import torch

from magic_core import inversion as inv


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
    torch.testing.assert_close(out.latent, x, rtol=1e-6, atol=1e-5)
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
    assert inv.relative_error(back, x0) < 1e-10
    out32 = inv.invert(den, x0, sig, mode="edict")
    back32 = inv.sample_back(den, out32.latent, sig, mode="edict", partner=out32.partner)
    assert inv.relative_error(back32, x0) < 1e-4
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
    for mode, k in (("ddim", 0), ("fixed_point", 2), ("edict", 0)):
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
    out = inv.invert(gaussian_denoiser(warp=0.2), x0, sig, mode="edict")
    inv.sample_back(gaussian_denoiser(warp=0.2), out.latent, sig, mode="edict", partner=out.partner)
    assert torch.equal(x0, before)


def test_relative_error_is_scale_free():
    a = torch.ones(3)
    assert math.isclose(inv.relative_error(a * 1.1, a), 0.1, rel_tol=1e-6)
    assert math.isclose(inv.relative_error(a * 110, a * 100), 0.1, rel_tol=1e-6)
