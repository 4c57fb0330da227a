"""Core tier for issue 11 (no ComfyUI): composing fusion inside another attention function exactly, style sources of
any size and image count, pooled AdaIN statistics, and store checks that leave a style's size free."""

from __future__ import annotations

import math

import pytest
import tolerances as tol
import torch

from magic_core import fusion as ff
from magic_core.kv_store import KVStore, StoreMismatchError

HEADS = 4
INNER = 32
DIM = INNER // HEADS
D64 = torch.float64
SIGMAS = [14.6, 7.0, 3.2, 1.4, 0.5, 0.1, 0.0]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.mark.parametrize(
    ("weights", "reps"),
    [([1.0, 0.5], [2, 1]), ([1.0, 2.0], [1, 2]), ([1 / 3, 0.5], [2, 3]), ([0.2, 0.5], [2, 5]), ([0.25, 0.75], [1, 3]),
     ([1.0], [1]), ([1.0, 0.3], [10, 3])],
)
def test_plain_repetitions_realise_weight_ratios_exactly(weights, reps):
    """Softmax sees only ratios: any weight may be the unit. Found repetitions have exactly the weights' ratios."""
    got = ff.plain_repetitions(weights)
    assert got == reps
    for w, r in zip(weights, got, strict=True):
        assert math.isclose(r / got[0], w / weights[0], rel_tol=tol.float_tol(torch.float64, 2))


@pytest.mark.parametrize("weights", [[1.0, 0.7], [1.0, math.pi], [1.0, 0.0], [], [0.3, 1.0, 1.0]])
def test_plain_repetitions_refuse_what_needs_big_denominators_or_too_many_groups(weights):
    assert ff.plain_repetitions(weights) is None


def _plan(weights, tau=1.5, seed=0):
    q = rand(2, 5, INNER, seed=seed)
    keys = [rand(1, 4 + i, INNER, seed=seed + 10 + i) for i in range(len(weights))]
    values = [rand(1, 4 + i, INNER, seed=seed + 20 + i) for i in range(len(weights))]
    return ff.FusionInputs(q=q, keys=keys, values=values, weights=list(weights), tau=tau)


def _plan_tol(plan, repeated_keys) -> float:
    """Two evaluations of one attention over the repeated keys, relative to the values' magnitude."""
    return tol.float_tol(D64, tol.attention_ops(DIM, repeated_keys.shape[1]), tol.magnitude(*plan.values))


@pytest.mark.parametrize("weights", [[1 / 3, 0.5], [0.2, 0.5], [1.0, 2.0, 1.0]])
def test_as_plain_qkv_is_exact_where_repetitions_exist(weights):
    """Plain attention over the re-expressed q/k/v equals the weighted, tempered fused attention (float64)."""
    plan = _plan(weights)
    q, k, v, exact = plan.as_plain_qkv()
    assert exact
    torch.testing.assert_close(ff.attention(q, k, v, HEADS), plan.attend(HEADS), rtol=0, atol=_plan_tol(plan, k))


def test_as_plain_qkv_says_when_it_approximates():
    plan = _plan([1.0, 0.7])
    q, k, v, exact = plan.as_plain_qkv()
    assert not exact
    assert (ff.attention(q, k, v, HEADS) - plan.attend(HEADS)).abs().max() > _plan_tol(plan, k)  # beyond rounding


@pytest.mark.parametrize("n_style", [2, 3])
def test_style_images_side_by_side_weigh_as_one(n_style):
    """N copies of one style image side by side at weight 1/N attend exactly like that one image at weight 1;
    N equal to the batch (or 1) passes through untouched with weight 1."""
    params = ff.get_preset("magicstyle")
    lin = [torch.nn.Linear(INNER, INNER).double() for _ in range(3)]
    proj = ff.Projections(*lin)
    current = ff.CurrentPass(n=rand(1, 6, INNER, seed=1))
    content = rand(1, 6, INNER, seed=4)
    style_one = rand(1, 9, INNER, seed=7)  # another token count than the content: no spatial alignment needed
    many = style_one.expand(n_style, -1, -1)
    side, weight = ff.style_side_by_side(many, batch=1)
    assert side.shape == (1, 9 * n_style, INNER) and weight == pytest.approx(1 / n_style)
    with torch.no_grad():
        one = ff.plan_fusion(params, proj, current, content, style_one).attend(HEADS)
        together = ff.plan_fusion(params, proj, current, content, side, style_weight=weight).attend(HEADS)
        ops = INNER + tol.attention_ops(DIM, 6 + 9 * n_style)
        scale = tol.magnitude(proj.to_v(style_one), proj.to_v(content))
        torch.testing.assert_close(together, one, rtol=0, atol=tol.float_tol(D64, ops, scale))
        # and the weight matters: at weight 1 the N copies outweigh the content
        heavier = ff.plan_fusion(params, proj, current, content, side).attend(HEADS)
    assert tol.differs(heavier, one)
    paired, w = ff.style_side_by_side(rand(n_style, 9, INNER, seed=8), batch=n_style)
    assert paired.shape[0] == n_style and w == 1.0


def test_adain_latent_pools_statistics_over_other_style_counts():
    z_c = rand(2, 4, 6, 6, seed=10)
    z_s = rand(3, 4, 5, 9, seed=11) * 2 + 1  # three style images of another size and aspect
    out = ff.adain_latent(z_c, z_s)
    pooled = z_s.transpose(0, 1).reshape(4, -1)
    # statistics: sums over every pooled element, twice (mean, then the std around it), relative to the values
    stat_tol = tol.float_tol(D64, 2 * pooled.shape[1], tol.magnitude(z_s, out))
    torch.testing.assert_close(out.mean(dim=(2, 3)), pooled.mean(dim=1).expand(2, -1), rtol=0, atol=stat_tol)
    torch.testing.assert_close(out.std(dim=(2, 3), correction=0), pooled.std(dim=1, correction=0).expand(2, -1),
                               rtol=0, atol=stat_tol)
    # as many style images as portraits: one to one
    pairs = ff.adain_latent(z_c, z_s[:2])
    torch.testing.assert_close(pairs.mean(dim=(2, 3)), z_s[:2].mean(dim=(2, 3)), rtol=0, atol=stat_tol)


def test_style_store_checks_channels_and_schedule_but_not_size():
    store = KVStore("sd15/EPS/SD15/a/b", (1, 4, 8, 8), SIGMAS, "sd15", [("output", 9, 0)])
    store.check_compatible(None, (1, 4, 12, 20), SIGMAS, channels_only=True)
    with pytest.raises(StoreMismatchError, match="latent size differs"):
        store.check_compatible(None, (1, 4, 12, 20), SIGMAS)
    with pytest.raises(StoreMismatchError, match="channels"):
        store.check_compatible(None, (1, 16, 12, 20), SIGMAS, channels_only=True)
    with pytest.raises(StoreMismatchError, match="schedule"):
        store.check_compatible(None, (1, 4, 12, 20), SIGMAS[1:], channels_only=True)
    assert store.tokens(("output", 9, 0)) is None
    store.record(("output", 9, 0), SIGMAS[0], rand(1, 64, 40, seed=1).float())
    assert store.tokens(("output", 9, 0)) == 64
