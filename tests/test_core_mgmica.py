"""Core tier: MGMICA's per-layer maths (magic_core.mgmica) and regions on token grids (magic_core.regions)."""

import math
from dataclasses import dataclass

import pytest
import tolerances as tol
import torch

from magic_core import mgmica
from magic_core import regions as reg


def _reference(q, terms, heads):
    """sum_i w_i * M_i * softmax(Q K_i^T / sqrt(d)) V_i, written out densely."""
    rows, length, inner = q.shape
    d = inner // heads
    out = torch.zeros(rows, length, inner, dtype=torch.float64)
    for t in terms:
        k = t.k.expand(rows, -1, -1).double()
        v = t.v.expand(rows, -1, -1).double()
        qh = q.double().view(rows, length, heads, d).transpose(1, 2)
        kh = k.view(rows, -1, heads, d).transpose(1, 2)
        vh = v.view(rows, -1, heads, d).transpose(1, 2)
        att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
        att = att.transpose(1, 2).reshape(rows, length, inner)
        out += t.weight * t.mask.double().expand(rows, length).unsqueeze(-1) * att
    return out


@dataclass(frozen=True)
class _Term:
    """One identity at one layer: keys/values [1 or rows, T, inner], its mask [1 or rows, L], its weight."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    weight: float


def _planned(q, terms, heads, upcast=False):
    """The MGMICA patch's route for full queries q [rows, L, inner]: plan_tokens, one planned_attention call over the
    identities' keys side by side, scattered back onto the grid; None when no identity touches a token."""
    rows, length, _ = q.shape
    terms = [t for t in terms if t.weight != 0]
    if not terms:
        return None
    plan = mgmica.plan_tokens(torch.stack([t.mask.float().expand(rows, length) for t in terms]),
                              [t.weight for t in terms])
    if plan is None:
        return None
    keys = torch.cat([t.k.expand(rows, -1, -1) for t in terms], dim=1)
    values = torch.cat([t.v.expand(rows, -1, -1) for t in terms], dim=1)
    z = mgmica.planned_attention(q.index_select(1, plan.union), keys, values, plan, plan.scale,
                                 mgmica.key_segments([t.k.shape[1] for t in terms]), heads, upcast)
    return torch.zeros_like(q).index_add_(1, plan.union, z)


def _terms(g, rows, length, inner, masks, weights, tokens=4):
    return [_Term(torch.randn(1, tokens, inner, generator=g), torch.randn(1, tokens, inner, generator=g),
                                m, w) for m, w in zip(masks, weights, strict=True)]


@pytest.mark.parametrize("share", [0.1, 0.9])  # the gathered route and the dense route
def test_planned_identity_attention_matches_the_dense_formula(share):
    g = torch.Generator().manual_seed(0)
    rows, length, inner, heads = 3, 50, 16, 2
    q = torch.randn(rows, length, inner, generator=g)
    masks = []
    for _ in range(3):
        m = (torch.rand(1, length, generator=g) < share).float() * torch.rand(1, length, generator=g)
        masks.append(m)
    terms = _terms(g, rows, length, inner, masks, [1.0, 0.5, 2.0])
    out = _planned(q, terms, heads)
    ref = _reference(q, terms, heads)
    scale = ref.abs().max().item()
    ops = tol.attention_ops(inner // heads, 4) + len(terms)  # each identity's attention, then their weighted sum
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol.float_tol(torch.float32, ops, scale))


def test_no_mask_or_no_weight_adds_nothing():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 8, generator=g)
    zero = _terms(g, 2, 30, 8, [torch.zeros(1, 30)], [1.0])
    assert _planned(q, zero, 2) is None
    unweighted = _terms(g, 2, 30, 8, [torch.ones(1, 30)], [0.0])
    assert _planned(q, unweighted, 2) is None


def test_identity_changes_only_its_own_tokens():
    g = torch.Generator().manual_seed(2)
    rows, length, inner = 2, 40, 8
    q = torch.randn(rows, length, inner, generator=g)
    raw = torch.rand(2, 1, length, generator=g)
    masks = mgmica.resolve_overlaps(raw * (raw > 0.3), "exclusive")
    terms = _terms(g, rows, length, inner, list(masks), [1.0, 1.0])
    changed = [terms[0], _Term(terms[1].k * 3 + 1, terms[1].v - 2, terms[1].mask, 1.0)]
    diff = (_planned(q, terms, 2) - _planned(q, changed, 2)).abs().amax(dim=(0, 2))
    inside = masks[1, 0] > 0
    assert diff[~inside].max() == 0  # bit-identical outside identity 1's tokens
    assert diff[inside].min() > 0


def test_overlap_modes():
    masks = torch.tensor([[[1.0, 0.6, 0.5, 0.0]], [[0.2, 0.6, 0.9, 0.0]]])
    exclusive = mgmica.resolve_overlaps(masks, "exclusive")
    expected = torch.tensor([[[1.0, 0.6, 0.0, 0.0]], [[0.0, 0.0, 0.9, 0.0]]])  # the tie at token 1 -> index 0
    assert torch.equal(exclusive, expected)
    assert ((exclusive > 0).sum(dim=0) <= 1).all()
    assert torch.equal(mgmica.resolve_overlaps(masks, "weighted"), masks)
    normalized = mgmica.resolve_overlaps(masks, "normalized")
    assert (normalized.sum(dim=0) <= 1 + 1e-6).all()
    torch.testing.assert_close(normalized[:, 0, 3], torch.zeros(2))
    torch.testing.assert_close(normalized[:, 0, 1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="exclusive"):
        mgmica.resolve_overlaps(masks, "max")


@pytest.mark.parametrize(("latent", "tokens", "grid"), [((64, 64), 64 * 64, (64, 64)), ((104, 152), 13 * 19, (13, 19)),
                                                         ((80, 48), 20 * 12, (20, 12)), ((105, 77), 14 * 10, (14, 10))])
def test_grid_for_tokens_follows_stride_two_convs(latent, tokens, grid):
    assert mgmica.grid_for_tokens(tokens, *latent) == grid


def test_grid_for_tokens_refuses_a_foreign_count():
    with pytest.raises(ValueError, match="tokens"):
        mgmica.grid_for_tokens(1000, 64, 64)


def test_box_on_grid_is_exact_cell_coverage():
    box = reg.Box(0.1, 0.25, 0.6, 0.9)
    for h, w in ((7, 11), (13, 19), (64, 64)):
        cov = reg.box_on_grid(box, h, w).view(h, w)
        assert cov.min() >= 0 and cov.max() <= 1
        assert math.isclose(cov.sum().item() / (h * w), 0.5 * 0.65, rel_tol=1e-5)
    cov = reg.box_on_grid(reg.Box(0.0, 0.0, 0.5, 0.5), 4, 4).view(4, 4)
    assert cov[:2, :2].eq(1).all() and cov[2:].eq(0).all() and cov[:, 2:].eq(0).all()
    with pytest.raises(ValueError, match="left"):
        reg.Box(0.5, 0.0, 0.4, 1.0)


def test_mask_on_grid_cuts_like_comfyui_and_keeps_untouched_cells_zero():
    mask = torch.zeros(1, 120, 200)  # 5:3 picture, latent 3:2 -> ComfyUI cuts the sides
    mask[:, 30:60, 80:120] = 1
    cut = reg.center_crop_to_aspect(mask, 48, 72)
    assert cut.shape[-2:] == (120, 180)  # round((200 - 200 * (1.5 / (5/3))) / 2) = 10 px off each side
    on_grid = reg.mask_on_grid(mask, 12, 18, 48, 72).view(12, 18)
    touched = torch.nn.functional.adaptive_max_pool2d(cut[:, None], (12, 18))[0, 0] > 0
    assert on_grid[~touched].eq(0).all() and on_grid[touched].gt(0).all()
    assert math.isclose(on_grid.mean().item(), cut.mean().item(), rel_tol=1e-5)


def test_layer_weights_apply_in_order_and_unnamed_layers_get_zero():
    from magic_core import layers as lay

    w = lay.parse_layer_weights("all = 0; instantstyle_style = 1", "sdxl")
    assert {k for k, v in w.items() if v} == {("output", 1, i) for i in range(10)} and len(w) == 70
    w = lay.parse_layer_weights("input = 0.5\noutput 3-5, middle 0 = 1", "sd15")
    assert w[("input", 7, 0)] == 0.5 and w[("middle", 0, 0)] == 1 and w[("output", 4, 0)] == 1
    assert w[("output", 9, 0)] == 0
    assert set(lay.parse_layer_weights("0.7", "sd15").values()) == {0.7}
    for bad in ("", "output 3 = x", "output 42 = 1", "all = inf"):
        with pytest.raises(lay.LayerSpecError):
            lay.parse_layer_weights(bad, "sd15")


# ------------------------------------------------------------------------------- cond/uncond rows of a cfg batch
@pytest.mark.parametrize("cond_or_uncond", [(0, 1), (1, 0), (0,)])
@pytest.mark.parametrize("uncond", ["negative tokens", "none", "positive tokens"])
def test_cfg_batch_rows_get_their_chunks_tokens_and_none_masks_uncond(cond_or_uncond, uncond):
    """A cfg batch as ComfyUI assembles it (one chunk of b pictures per cond_or_uncond entry) through the patch's
    row assembly (chunk_keys_values, chunk_row_scale) and its planned attention, against the formula written out per
    row: a conditional row attends to each identity's positive tokens; an unconditional row to its negative tokens,
    to nothing ("none") or to the positive tokens; each picture's masks weight the terms."""
    g = torch.Generator().manual_seed(7)
    b, length, inner, heads, tokens = 2, 24, 8, 2, 3
    rows = b * len(cond_or_uncond)
    q = torch.randn(rows, length, inner, generator=g)
    masks = (torch.rand(2, b, length, generator=g) > 0.4).float() * torch.rand(2, b, length, generator=g)
    masks = mgmica.resolve_overlaps(masks, "exclusive")  # [identity, picture, token]
    weights = [1.0, 0.6]
    kv = [[torch.randn(1, tokens, inner, generator=g) for _ in range(4)] for _ in weights]  # k+, v+, k-, v-
    plan = mgmica.plan_tokens(masks, weights)
    assembled = [mgmica.chunk_keys_values(*kv[i], cond_or_uncond, b, uncond) for i in range(2)]
    k, v = torch.cat([a[0] for a in assembled], dim=1), torch.cat([a[1] for a in assembled], dim=1)
    row_scale = mgmica.chunk_row_scale(plan.scale, cond_or_uncond, uncond)
    z = mgmica.planned_attention(q.index_select(1, plan.union), k, v, plan, row_scale,
                                 mgmica.key_segments([tokens, tokens]), heads)
    out = torch.zeros_like(q).index_add_(1, plan.union, z)

    expected = torch.zeros(rows, length, inner, dtype=torch.float64)
    for r in range(rows):
        chunk, picture = cond_or_uncond[r // b], r % b
        if chunk == 1 and uncond == "none":
            continue
        negative = chunk == 1 and uncond == "negative tokens"
        for i, w in enumerate(weights):
            k_i, v_i = (kv[i][2], kv[i][3]) if negative else (kv[i][0], kv[i][1])
            term = _Term(k_i, v_i, masks[i, picture][None], w)
            expected[r] += _reference(q[r:r + 1], [term], heads)[0]
    ops = tol.attention_ops(inner // heads, tokens) + 2
    torch.testing.assert_close(out.double(), expected, rtol=0,
                               atol=tol.float_tol(torch.float32, ops, tol.magnitude(expected)))
    uncond_rows = [r for r in range(rows) if cond_or_uncond[r // b] == 1]
    if uncond == "none":
        assert all(out[r].abs().max() == 0 for r in uncond_rows)
    elif uncond_rows:
        assert tol.differs(out[uncond_rows[0]], torch.zeros_like(out[uncond_rows[0]]))


def test_row_assembly_refuses_an_unknown_uncond_mode():
    with pytest.raises(ValueError, match="negative tokens"):
        mgmica.chunk_row_scale(torch.ones(1, 3), (0, 1), "zero")
