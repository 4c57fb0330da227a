"""Core-tier tests for RepControlNet (no ComfyUI): file format, validation, merge exactness (training: test_core_training)."""

from __future__ import annotations

import json
import os

import pytest
import tolerances as tol
import torch
import torch.nn.functional as F
from oracles import merged_state, unmerged_forward
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from magic_core.repcontrolnet import (
    FORMAT_TAG,
    ConditionAdapter,
    RepControlNetWeights,
    add_features,
    default_layer_keys,
    load_repcontrolnet,
    merge_increment,
    merge_into_,
    merge_terms,
    save_repcontrolnet,
    to_tensors_and_metadata,
    validate_against_unet,
)

LAT, CH = 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyUNet(nn.Module):
    """A tiny conv + linear "UNet": conv_in (adapter features are added to its output), body, a linear, conv_out.

    forward returns the denoised estimate x - sigma * eps, like ComfyUI's apply_model."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv_in = nn.Conv2d(LAT, CH, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(CH, CH, 3, padding=1, padding_mode="reflect"),
            nn.SiLU(),
            nn.Conv2d(CH, CH, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(CH, CH, 1, bias=False),
        )
        self.proj = nn.Linear(CH, CH)
        self.up = nn.Upsample(scale_factor=2)
        self.conv_out = nn.Conv2d(CH, LAT, 3, padding=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * (fan_in**-0.5 if p.ndim > 1 else 0.1))

    def forward(self, x, sigma, features=None):
        s = sigma.view(-1, 1, 1, 1)
        h0 = self.conv_in(x / torch.sqrt(s * s + 1))
        if features is not None:
            h0 = add_features(h0, features)
        h = self.body(h0)
        h = h + self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        eps = self.conv_out(F.silu(self.up(h) + h0))
        return x - s * eps


LAYERS = ["body.0", "body.2", "body.4", "proj", "conv_out"]


def random_weights(net: nn.Module, seed: int = 1, alpha=0.7, beta=0.45, per_layer=True) -> RepControlNetWeights:
    gen = torch.Generator().manual_seed(seed)
    sd = net.state_dict()
    modal = {}
    for layer in LAYERS:
        for key in (layer + ".weight", layer + ".bias"):
            if key in sd:
                modal[key] = torch.randn(sd[key].shape, generator=gen) * sd[key].std() * 1.3
    adapter = ConditionAdapter(out_channels=CH, hidden_channels=16, num_layers=2, seed=seed)
    return RepControlNetWeights(
        adapter_state=adapter.state_dict(),
        adapter_config=adapter.config,
        modal=modal,
        alpha=alpha,
        beta=beta,
        layer_alpha={"proj": 1.2} if per_layer else {},
        layer_beta={"conv_out": -0.25} if per_layer else {},
        model_family="sd15",
        condition_type="canny",
        metadata={"note": "toy"},
    )


# rounded operations in one merged weight element, by either route (two products, two sums, a strength)
MERGE_OPS = 8


def net_tol(net: nn.Module, *outputs: torch.Tensor) -> float:
    """Two evaluations of the toy network by different routes (merged weights vs hooked branches)."""
    return tol.network_tol(torch.float32, net, tol.magnitude(*outputs))


def shapes_of(net: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def inputs(seed=3, batch=2, hw=8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LAT, hw, hw, generator=gen)
    sigma = torch.rand(batch, generator=gen) + 0.5
    return x, sigma


def merged_copy(net: nn.Module, weights, strength=1.0) -> nn.Module:
    other = ToyUNet()
    sd = net.state_dict()
    sd.update(merged_state(weights, sd, strength))
    other.load_state_dict(sd)
    return other


# --------------------------------------------------------------------------------------------------- file format


def test_round_trip_preserves_every_tensor_and_metadata(tmp_path):
    net = ToyUNet()
    w = random_weights(net)
    w.modal["proj.weight"] = w.modal["proj.weight"].half()  # dtypes are kept as stored
    path = tmp_path / "ctrl.safetensors"
    save_repcontrolnet(path, w)
    back = load_repcontrolnet(path)

    assert back.adapter_config == w.adapter_config
    assert set(back.adapter_state) == set(w.adapter_state)
    for k, v in w.adapter_state.items():
        assert torch.equal(back.adapter_state[k], v) and back.adapter_state[k].dtype == v.dtype
    assert set(back.modal) == set(w.modal)
    for k, v in w.modal.items():
        assert back.modal[k].dtype == v.dtype and torch.equal(back.modal[k], v), k
    assert back.alpha == pytest.approx(0.7) and back.beta == pytest.approx(0.45)
    assert back.layer_alpha == {"proj": pytest.approx(1.2)} and back.layer_beta == {"conv_out": pytest.approx(-0.25)}
    assert (back.model_family, back.condition_type, back.metadata) == ("sd15", "canny", {"note": "toy"})
    assert sorted(back.layers) == sorted(LAYERS)

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == FORMAT_TAG and meta["format_version"] == "1"
    assert meta["model_channels"] == str(CH) and json.loads(meta["adapter_config"]) == w.adapter_config
    assert {
        "alpha",
        "beta",
        "coef.alpha.proj",
        "coef.beta.conv_out",
        "modal.body.4.weight",
        "adapter.conv_out.bias",
    } <= keys
    assert "modal.body.4.bias" not in keys  # that layer has no bias
    assert "RepControlNet for sd15 (canny condition): 5 layers" in back.describe()


def _rewrite(tmp_path, w, name, *, meta=None, drop=(), add=None):
    tensors, metadata = to_tensors_and_metadata(w)
    metadata.update(meta or {})
    for k in drop:
        tensors.pop(k)
    tensors.update(add or {})
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return path


def test_bad_files_get_clear_errors(tmp_path):
    w = random_weights(ToyUNet())
    cases = [
        (_rewrite(tmp_path, w, "tag.safetensors", meta={"format": "something.else"}), "format tag is 'something.else'"),
        (_rewrite(tmp_path, w, "ver.safetensors", meta={"format_version": "2"}), "format_version '2' is not supported"),
        (
            _rewrite(tmp_path, w, "cfg.safetensors", meta={"adapter_config": "{not json"}),
            "adapter_config metadata is not valid JSON",
        ),
        (
            _rewrite(tmp_path, w, "mc.safetensors", meta={"model_channels": "320"}),
            "model_channels metadata (320) differs",
        ),
        (
            _rewrite(tmp_path, w, "orphan.safetensors", drop=["modal.proj.weight", "coef.alpha.proj"]),
            "modal.proj.bias has no matching weight",
        ),
        (
            _rewrite(tmp_path, w, "bias.safetensors", add={"modal.proj.bias": torch.zeros(3)}),
            "modal.proj.bias has shape (3,)",
        ),
        (_rewrite(tmp_path, w, "adapt.safetensors", drop=["adapter.conv_out.weight"]), "missing adapter tensor(s)"),
        (
            _rewrite(tmp_path, w, "extra.safetensors", add={"lora_up.weight": torch.zeros(2)}),
            "unexpected tensor(s): lora_up.weight",
        ),
        (_rewrite(tmp_path, w, "alpha.safetensors", drop=["alpha"]), "'alpha' is missing"),
        (_rewrite(tmp_path, w, "coef.safetensors", add={"coef.beta.nope": torch.tensor(1.0)}), "coef.beta.nope"),
    ]
    for path, fragment in cases:
        with pytest.raises(ValueError) as e:
            load_repcontrolnet(path)
        assert fragment in str(e.value), (fragment, str(e.value))
        assert os.path.basename(path) in str(e.value)

    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="format tag is None.*ControlNet, LoRA or checkpoint"):
        load_repcontrolnet(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_repcontrolnet(junk)
    with pytest.raises(ValueError, match="does not exist"):
        load_repcontrolnet(tmp_path / "missing.safetensors")


def test_validate_against_unet():
    net = ToyUNet()
    w = random_weights(net)
    shapes = shapes_of(net)
    validate_against_unet(w, shapes, "sd15", "ok.safetensors")
    validate_against_unet(w, {"diffusion_model." + k: v for k, v in shapes.items()}, "SD15", "ok.safetensors")
    validate_against_unet(w, shapes, "unknown", "ok.safetensors")

    with pytest.raises(ValueError, match=r"'x.safetensors' was made for sd15 but the MODEL is sdxl"):
        validate_against_unet(w, shapes, "sdxl", "x.safetensors")

    missing = {k: v for k, v in shapes.items() if not k.startswith(("proj.", "body.0."))}
    with pytest.raises(ValueError) as e:
        validate_against_unet(w, missing, "sd15", "m.safetensors")
    msg = str(e.value)
    assert "'m.safetensors'" in msg and "4 of its 9 modal keys are not in the MODEL's UNet" in msg
    assert "body.0.weight" in msg and "proj.bias" in msg

    bad = dict(shapes)
    bad["conv_out.weight"] = (LAT, CH, 1, 1)
    bad["proj.weight"] = (CH, CH + 1)
    with pytest.raises(ValueError) as e:
        validate_against_unet(w, bad, "sd15", "s.safetensors")
    assert "2 shape mismatch(es)" in str(e.value) and "conv_out.weight file (4, 8, 3, 3) vs MODEL (4, 8, 1, 1)" in str(
        e.value
    )

    nobias = random_weights(net)
    del nobias.modal["body.2.bias"]
    with pytest.raises(ValueError, match="body.2.bias"):
        validate_against_unet(nobias, shapes, "sd15", "b.safetensors")

    wide = {"input_blocks.0.0.weight": (320, 4, 3, 3), **shapes}
    with pytest.raises(ValueError, match="adapter outputs 8 channels but the MODEL's first block has 320"):
        validate_against_unet(w, wide, "sd15", "c.safetensors")


# --------------------------------------------------------------------------------------------------- merging


def test_merged_equals_unmerged():
    torch.manual_seed(0)
    net = ToyUNet()
    w = random_weights(net)
    x, sigma = inputs()
    base_out = net(x, sigma)
    with unmerged_forward(net, w):
        unmerged = net(x, sigma)
    assert torch.equal(net(x, sigma), base_out), "hooks must be removed on exit"
    merged = merged_copy(net, w)(x, sigma)
    assert (unmerged - base_out).abs().max() > 0.1, "the modal weights must matter in this test"
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=net_tol(net, merged, unmerged))

    sd = net.state_dict()
    # the increments ComfyUI's patch adds when it patches each weight: base + increment == merged, for every strength
    terms = merge_terms(w, key_prefix="diffusion_model.")
    assert set(terms) == {"diffusion_model." + k for k in w.modal}
    assert all(terms["diffusion_model." + k].modal is v for k, v in w.modal.items()), "the file's tensors, no copies"
    for s in (1.0, 0.6, -0.3, 1.7):
        ms_s = merged_state(w, sd, s)
        for key, term in terms.items():
            key = key[len("diffusion_model.") :]
            before = sd[key].clone()
            merged = sd[key] + merge_increment(sd[key], term, s)
            assert torch.equal(sd[key], before), "the weight is read, never written"
            bound = tol.float_tol(torch.float32, MERGE_OPS, tol.magnitude(ms_s[key], sd[key]))
            torch.testing.assert_close(merged, ms_s[key], rtol=0, atol=bound, msg=key)
            in_place = sd[key].clone()
            assert merge_into_(in_place, term, s) is in_place
            torch.testing.assert_close(in_place, ms_s[key], rtol=0, atol=bound, msg=key)
    # a float16 weight (ComfyUI's lowvram path patches in the weight's dtype) gets a float16 increment
    key = "body.0.weight"
    half = merge_increment(sd[key].half(), terms["diffusion_model." + key], 1.0)
    assert half.dtype == torch.float16 and half.shape == sd[key].shape

    # strength: unmerged with strength s == merged with strength s; s = 0 is the base model
    with unmerged_forward(net, w, strength=0.4):
        un04 = net(x, sigma)
    m04 = merged_copy(net, w, 0.4)(x, sigma)
    torch.testing.assert_close(m04, un04, rtol=0, atol=net_tol(net, m04, un04))
    assert torch.equal(merged_copy(net, w, 0.0)(x, sigma), base_out)


def test_merged_equals_unmerged_inside_a_parent_module():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = ToyUNet()

    wrap = Wrapper()
    w = random_weights(wrap.diffusion_model, per_layer=False)
    x, sigma = inputs(batch=3)
    with unmerged_forward(wrap, w, prefix="diffusion_model."):
        unmerged = wrap.diffusion_model(x, sigma)
    merged = merged_copy(wrap.diffusion_model, w)(x, sigma)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=net_tol(wrap, merged, unmerged))
    with pytest.raises(ValueError, match="not found in the module"):
        with unmerged_forward(wrap, w):
            pass


def test_alpha_one_beta_zero_is_exactly_the_base_model():
    net = ToyUNet()
    w = random_weights(net, alpha=1.0, beta=0.0, per_layer=False)
    sd = net.state_dict()
    for key, term in merge_terms(w).items():
        assert term.is_zero and merge_increment(sd[key], term) is None, "nothing added: the weight stays bit-exact"
        in_place = sd[key].clone()
        assert torch.equal(merge_into_(in_place, term), sd[key])
    for key, term in merge_terms(random_weights(net)).items():
        assert not term.is_zero and merge_increment(sd[key], term, strength=0.0) is None
    for k, v in merged_state(w, sd).items():
        assert torch.equal(v, sd[k])
    x, sigma = inputs()
    base_out = net(x, sigma)
    with unmerged_forward(net, w):
        assert torch.equal(net(x, sigma), base_out)
    assert torch.equal(merged_copy(net, w)(x, sigma), base_out)


def test_untrained_adapter_adds_exactly_zero_and_is_seeded():
    a = ConditionAdapter(out_channels=CH, hidden_channels=16, seed=5)
    cond = torch.rand(2, 3, 64, 48)
    feats = a(cond)
    assert feats.shape == (2, CH, 8, 6) and torch.count_nonzero(feats) == 0
    feats = a(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, CH, 8, 8) and torch.count_nonzero(feats) == 0
    assert a(torch.rand(1, 3, 100, 70), latent_hw=(8, 6)).shape == (1, CH, 8, 6)  # resized to 8x the latent

    b = ConditionAdapter(out_channels=CH, hidden_channels=16, seed=5)
    c = ConditionAdapter(out_channels=CH, hidden_channels=16, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)

    net = ToyUNet()
    x, sigma = inputs(batch=2)
    assert torch.equal(net(x, sigma, features=feats), net(x, sigma))
    # batch repeat (cond/uncond chunks): features for one image broadcast to the batch
    h = torch.randn(4, CH, 8, 6)
    f = torch.randn(2, CH, 8, 6)
    assert torch.equal(add_features(h, f)[2:], h[2:] + f)
    with pytest.raises(ValueError, match="do not match the UNet features"):
        add_features(h, torch.randn(2, CH + 1, 8, 6))


def test_default_layer_keys():
    shapes = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.in_layers.2.bias": (320,),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.10.0.skip_connection.weight": (1280, 640, 1, 1),
        "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "out.2.weight": (4, 320, 3, 3),
    }
    expected = [
        "input_blocks.1.0.in_layers.2",
        "input_blocks.1.0.out_layers.3",
        "input_blocks.1.1.proj_in",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2",
        "input_blocks.3.0.op",
        "input_blocks.10.0.skip_connection",
        "middle_block.1.proj_out",
    ]
    assert default_layer_keys(shapes, "sd15") == expected
    assert default_layer_keys({"diffusion_model." + k: v for k, v in shapes.items()}, "sdxl") == expected
    assert default_layer_keys(shapes, "sd15", "encoder_convs") == [
        "input_blocks.1.0.in_layers.2",
        "input_blocks.1.0.out_layers.3",
        "input_blocks.3.0.op",
        "input_blocks.10.0.skip_connection",
    ]
    with pytest.raises(ValueError, match="unknown RepControlNet layer preset"):
        default_layer_keys(shapes, "sd15", "decoder")
    with pytest.raises(ValueError, match="no encoder conv/linear layers"):
        default_layer_keys({"foo.weight": (2, 2)}, "sd15")
