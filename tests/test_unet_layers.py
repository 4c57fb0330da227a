"""The one walk over a UNet's attention layers (nodes/unet_layers.py), which MagicStyle's capture and fusion and
MGMICA all use, checked against ComfyUI's own module tree and the layer tables of magic_core.layers."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def U(pack):
    return pack.nodes.unet_layers


@pytest.mark.parametrize("which, family", [("sd15", "sd15"), ("sdxl", "sdxl")])
def test_the_walk_finds_every_transformer_block_in_unet_order(request, pack, U, which, family):
    model = request.getfixturevalue(which)
    lay = pack.magic_core.layers
    layers = U.unet_attention_layers(model)
    unet = model.model.diffusion_model
    # written out independently: every BasicTransformerBlock ComfyUI's module tree holds, by its attribute path
    blocks = {name: m for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"}
    assert sorted(layer.path for layer in layers.values()) == sorted(f"diffusion_model.{n}.attn1" for n in blocks)
    for key, layer in layers.items():
        assert layer.key == key
        attn1 = model.get_model_object(layer.path)
        assert attn1 is blocks[layer.path[len("diffusion_model."):-len(".attn1")]].attn1
        assert layer.attn2 is blocks[layer.path[len("diffusion_model."):-len(".attn1")]].attn2
        assert (layer.channels, layer.inner_dim) == (attn1.to_q.in_features, attn1.to_q.out_features)
        assert layer.context_dim == layer.attn2.to_k.in_features
    # UNet order, the same keys as the family's layer table for this model's depths
    assert list(layers) == lay.all_layers(family, lay.depths_of(layers))
    # the grid level (2x downsamplings) agrees with the family's table of each block's downsampling factor
    assert all(2 ** layer.level == lay.layer_info(family, k[0], k[1]).down for k, layer in layers.items())


def test_cross_attention_layers_are_in_ip_adapter_order(sd15, U):
    keys = [layer.key for layer in U.cross_attention_layers(sd15)]
    rank = {"input": 0, "output": 1, "middle": 2}
    assert keys == sorted(keys, key=lambda k: (rank[k[0]], k[1], k[2]))
    assert set(keys) == set(U.unet_attention_layers(sd15))


def test_layer_key_reads_the_block_comfyui_passes(U):
    assert U.layer_key({"block": ("output", 7), "block_index": 2}) == ("output", 7, 2)
    assert U.layer_key({"block": ("input", 1)}) == ("input", 1, 0)
    assert U.layer_key({}) is None
