"""Core tier: IP-Adapter file formats, variant/family detection, projection models, ID tokens, layer mapping, face
alignment (no ComfyUI). Files come from magic_portrait.tiny_ipadapter (public key layouts, tiny sizes); projections
are checked against float64 reference formulas written here from the raw tensors."""

from __future__ import annotations

import copy
import math
import zipfile

import cv2
import numpy as np
import pytest
import tolerances as tol
import torch
import torch.nn.functional as F
from ipadapter_reference import _t, ref_face_mlp, ref_ln, ref_tokens
from safetensors.torch import load_file, save_file

from magic_core import face_align
from magic_core import ipadapter as ipa
from magic_core import ipadapter_tokens as ipt
from magic_core import layers as L
from magic_portrait.tiny_ipadapter import tiny_ipadapter_state, write_tiny_ipadapter

D64 = torch.float64


def _ip_order_dims(family: str, divisor: int) -> list[int]:
    """The family's real cross-attention inner dims in IP-Adapter layer order, divided by `divisor`."""
    return [L.layer_info(family, b, n).channels // divisor for b, n, _ in ipa.ip_layer_order(L.all_layers(family))]


SD15_DIMS = _ip_order_dims("sd15", 10)  # 32 / 64 / 128
SDXL_DIMS = _ip_order_dims("sdxl", 320)  # 2 / 4
DIMS = {"sd15": SD15_DIMS, "sdxl": SDXL_DIMS}
CROSS = {"sd15": 768, "sdxl": 2048}


def _largest_projection_ops() -> int:
    """Rounded operations along the longest tiny projection network (every variant, both families)."""
    return max(
        tol.reduction_ops(ipa.build_image_proj(ipa.from_state_dict(
            tiny_ipadapter_state(variant=v, family=f, layer_inner_dims=DIMS[f]), f"{v}_{f}")))
        + tol.LOGIT_BOUND  # the perceiver's attention
        for v in ipa.VARIANTS for f in ("sd15", "sdxl"))


# a float32 projection against the float64 reference: tokens are O(1) after the projections' final LayerNorm
TOL = tol.float_tol(torch.float32, _largest_projection_ops())
NAMES = {  # public file names (the tie-breaks read them)
    "base": "ip-adapter_{f}",
    "plus": "ip-adapter-plus_{f}",
    "plus-face": "ip-adapter-plus-face_{f}",
    "full-face": "ip-adapter-full-face_{f}",
    "faceid": "ip-adapter-faceid_{f}",
    "faceid-portrait": "ip-adapter-faceid-portrait_{f}",
    "faceid-portrait-unnorm": "ip-adapter-faceid-portrait_{f}_unnorm",
    "instantid": "instantid-ip-adapter_{f}",
    "faceid-plus": "ip-adapter-faceid-plus_{f}",
    "faceid-plusv2": "ip-adapter-faceid-plusv2_{f}",
}
# variant: (tokens, needs_clip_embeds, needs_clip_hidden, needs_face_embedding, has_lora)
EXPECT = {
    "base": (4, True, False, False, False),
    "plus": (16, False, True, False, False),
    "plus-face": (16, False, True, False, False),
    "full-face": (257, False, True, False, False),
    "faceid": (4, False, False, True, True),
    "faceid-portrait": (16, False, False, True, False),
    "faceid-portrait-unnorm": (16, False, False, True, False),
    "instantid": (16, False, False, True, False),
    "faceid-plus": (4, False, True, True, True),
    "faceid-plusv2": (4, False, True, True, True),
}
TINY = {"lora_rank": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path, variant, family="sd15", fmt="safetensors", name=None, **kw):
    fname = (name or NAMES[variant].format(f=family)) + (".safetensors" if fmt == "safetensors" else ".bin")
    kw = {**TINY, "layer_inner_dims": DIMS[family], **kw}
    return write_tiny_ipadapter(tmp_path / fname, variant=variant, family=family, fmt=fmt, **kw)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(a: ipa.IPAdapterFile, batch=2, seed=1, clip_tokens=None):
    clip_tokens = clip_tokens or (257 if a.variant == "full-face" else 17)  # the projections take any token count
    kw = {}
    if a.needs_clip_embeds:
        kw["clip_embeds"] = rand(batch, a.clip_embed_dim, seed=seed)
    if a.needs_clip_hidden:
        kw["clip_hidden"] = rand(batch, clip_tokens, a.clip_hidden_dim, seed=seed + 1)
    if a.needs_face_embedding:
        kw["face_embedding"] = rand(batch, 512, seed=seed + 2)
    return kw


# --------------------------------------------------------------------------------------------- detection per variant


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ipa.VARIANTS)
def test_every_variant_family_format_is_detected_and_projects(tmp_path, variant, family):
    tokens, n_embeds, n_hidden, n_face, lora = EXPECT[variant]
    results = {}
    for fmt in ("safetensors", "bin"):
        a = ipa.load_ipadapter_file(write(tmp_path, variant, family, fmt))
        assert (a.variant, a.family, a.cross_dim, a.n_layers) == (variant, family, CROSS[family], len(DIMS[family]))
        assert a.layer_inner_dims == tuple(DIMS[family])
        assert a.tokens == tokens
        assert (a.needs_clip_embeds, a.needs_clip_hidden, a.needs_face_embedding, a.has_lora) == (
            n_embeds, n_hidden, n_face, lora)
        assert a.clip_embed_dim == (32 if n_embeds else None)
        assert a.clip_hidden_dim == (48 if n_hidden else None)
        assert a.face_embed_dim == (512 if n_face else None)
        if lora:  # every processor (attn1 at even numbers too), q/k/v/out, down/up
            assert len(a.lora) == 2 * len(DIMS[family]) * 4 * 2 and a.lora_rank == 2
            assert "LoraLoader" in a.describe()
        else:
            assert a.lora == {} and a.lora_rank is None
        assert [tuple(k.shape) for k, _ in a.layer_weights()] == [(d, CROSS[family]) for d in DIMS[family]]

        module = ipa.build_image_proj(a)  # strict load inside; check it again explicitly
        module.load_state_dict(a.image_proj, strict=True)
        kw = inputs(a)
        tok = ipt.id_tokens(a, **kw)
        assert tok.shape == (2, tokens, CROSS[family]) and tok.dtype == torch.float32
        assert tok.std() > 0.5 and tol.differs(tok[0], tok[1])  # not constant, depends on the input
        if fmt == "safetensors":  # the .bin tokens are compared with these below
            ref = ref_tokens(a, kw, shortcut=a.default_shortcut)
            torch.testing.assert_close(tok.to(D64), ref, atol=TOL, rtol=0)
        unc = ipt.uncond_tokens(a, clip_hidden=kw.get("clip_hidden"), batch=2)
        assert unc.shape == tok.shape
        results[fmt] = tok
    assert torch.equal(results["safetensors"], results["bin"])


def test_bin_and_safetensors_hold_the_same_tensors(tmp_path):
    for variant in ("plus", "faceid-plusv2"):
        st = ipa.load_ipadapter_file(write(tmp_path, variant, fmt="safetensors"))
        bn = ipa.load_ipadapter_file(write(tmp_path, variant, fmt="bin"))
        for part in ("image_proj", "ip_adapter", "lora"):
            a, b = getattr(st, part), getattr(bn, part)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_files_use_the_public_key_names(tmp_path):
    """Names the public loaders (IP-Adapter's load_ip_adapter, IPAdapter_plus's detection) rely on."""
    flat = load_file(write(tmp_path, "plus", depth=4))
    for key in ("image_proj.latents", "image_proj.proj_in.weight", "image_proj.proj_out.bias",
                "image_proj.norm_out.weight", "image_proj.layers.3.0.norm1.weight", "image_proj.layers.3.0.to_kv.weight",
                "image_proj.layers.3.0.to_out.weight", "image_proj.layers.3.1.0.bias", "image_proj.layers.3.1.1.weight",
                "image_proj.layers.3.1.3.weight", "ip_adapter.1.to_k_ip.weight", "ip_adapter.31.to_v_ip.weight"):
        assert key in flat, key
    assert "ip_adapter.33.to_k_ip.weight" not in flat and "ip_adapter.0.to_k_ip.weight" not in flat
    nested = torch.load(write(tmp_path, "faceid-plusv2", "sdxl", fmt="bin", lora_rank=3), map_location="cpu",
                        weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    ipd, proj = nested["ip_adapter"], nested["image_proj"]
    assert "139.to_v_ip.weight" in ipd and "141.to_k_ip.weight" not in ipd
    assert tuple(ipd["0.to_q_lora.down.weight"].shape) == (3, 2)  # attn1 of input 4:0 (inner 2): from the hidden state
    assert tuple(ipd["0.to_k_lora.down.weight"].shape) == (3, 2)
    assert tuple(ipd["1.to_k_lora.down.weight"].shape) == (3, 2048)  # attn2: from the text context
    assert tuple(ipd["1.to_out_lora.up.weight"].shape) == (2, 3)
    assert "perceiver_resampler.proj_in.weight" in proj and "proj.0.weight" in proj and "norm.weight" in proj
    assert not any(k.endswith("latents") for k in proj)
    full = load_file(write(tmp_path, "full-face"))
    assert {k for k in full if k.startswith("image_proj.")} == {
        f"image_proj.proj.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    base = load_file(write(tmp_path, "base"))
    assert {k for k in base if k.startswith("image_proj.")} == {
        "image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias"}


@pytest.mark.parametrize(("variant", "family", "kw", "expect"), [
    ("plus", "sd15", dict(resampler_dim=768, heads=12, clip_hidden_dim=1280, ff_inner=3072),
     dict(dim=768, heads=12, dim_head=64, embedding_dim=1280, output_dim=768, num_queries=16)),
    ("plus", "sdxl", dict(resampler_dim=1280, heads=20, clip_hidden_dim=1280, ff_inner=5120),
     dict(dim=1280, heads=20, dim_head=64, embedding_dim=1280, output_dim=2048, num_queries=16)),
    ("faceid-plusv2", "sdxl", dict(heads=32, clip_hidden_dim=1280, ff_inner=8192, mlp_hidden=1024, lora_rank=128),
     dict(cross_dim=2048, heads=32, dim_head=64, clip_hidden_dim=1280, hidden=1024, tokens=4)),
    ("faceid-plus", "sd15", dict(heads=12, clip_hidden_dim=1280, ff_inner=3072, mlp_hidden=1024, lora_rank=128),
     dict(cross_dim=768, heads=12, dim_head=64, clip_hidden_dim=1280, hidden=1024, tokens=4)),
    ("base", "sdxl", dict(clip_embed_dim=1280), dict(clip_embed_dim=1280, cross_dim=2048, tokens=4)),
    ("faceid-portrait", "sd15", dict(mlp_hidden=1024), dict(id_dim=512, hidden=1024, tokens=16)),
    ("instantid", "sdxl", dict(resampler_dim=1280, heads=20, ff_inner=5120),
     dict(embedding_dim=512, dim=1280, heads=20, output_dim=2048, num_queries=16)),
])
def test_public_sizes_are_inferred_from_shapes(variant, family, kw, expect):
    """Shapes of the public files (meta tensors: no memory) give the public constructor arguments."""
    real_dims = _ip_order_dims(family, 1)
    st = tiny_ipadapter_state(variant=variant, family=family, layer_inner_dims=real_dims, depth=4, device="meta", **kw)
    a = ipa.from_state_dict(st, NAMES[variant].format(f=family) + ".safetensors")
    assert a.variant == variant and a.family == family and a.n_layers == {"sd15": 16, "sdxl": 70}[family]
    assert a.layer_inner_dims == tuple(real_dims) and a.notes == ()
    for key, value in expect.items():
        assert a.proj_config[key] == value, key
    if "depth" in a.proj_config:
        assert a.proj_config["depth"] == 4


def test_variant_tie_breaks_by_name_and_override(tmp_path):
    p = write(tmp_path, "plus-face", name="tiny")
    a = ipa.load_ipadapter_file(p)
    assert (a.variant, a.variant_source) == ("plus", "default")
    assert ipa.load_ipadapter_file(p, variant="plus_face").variant == "plus-face"
    with pytest.raises(ipa.IPAdapterFormatError, match="plus / plus-face IP-Adapter; it cannot be used as 'faceid'"):
        ipa.load_ipadapter_file(p, variant="faceid")
    v1 = write(tmp_path, "faceid-plus", name="renamed")
    assert ipa.load_ipadapter_file(v1).variant == "faceid-plus"
    assert ipa.load_ipadapter_file(v1, variant="faceid-plus-v2").variant_source == "caller"
    assert ipa.load_ipadapter_file(write(tmp_path, "faceid-portrait-unnorm", name="x")).variant == \
        "faceid-portrait-unnorm"
    with pytest.raises(ipa.IPAdapterError, match="unknown IP-Adapter variant"):
        ipa.load_ipadapter_file(p, variant="plus-ultra")


def test_faceid_without_lora_is_read_by_tokens(tmp_path):
    st = tiny_ipadapter_state(variant="faceid", layer_inner_dims=SD15_DIMS, lora_rank=2)
    st["ip_adapter"] = {k: v for k, v in st["ip_adapter"].items() if "lora" not in k}
    a = ipa.from_state_dict(st, "stripped.bin")
    assert a.variant == "faceid" and not a.has_lora and any("without its LoRA" in n for n in a.notes)
    st16 = tiny_ipadapter_state(variant="faceid", layer_inner_dims=SD15_DIMS, tokens=16)
    assert ipa.from_state_dict(st16, "x").variant == "faceid"  # LoRA keys decide first


def test_flattened_keys_in_a_bin_and_adapter_modules_are_accepted(tmp_path):
    st = tiny_ipadapter_state(variant="base", layer_inner_dims=SD15_DIMS)
    flat = {f"image_proj.{k}": v for k, v in st["image_proj"].items()}
    flat.update({f"adapter_modules.{k}": v for k, v in st["ip_adapter"].items()})
    flat["epoch"] = torch.tensor(3)
    torch.save(flat, tmp_path / "flat.pt")
    a = ipa.load_ipadapter_file(tmp_path / "flat.pt")
    assert a.variant == "base" and a.n_layers == 16 and any("ignored 1" in n for n in a.notes)


def test_kolors_plus_is_its_own_family():
    st = tiny_ipadapter_state(variant="plus", family="sdxl", layer_inner_dims=_ip_order_dims("sdxl", 1),
                              resampler_dim=2048, heads=12, clip_hidden_dim=1024, depth=4, device="meta")
    a = ipa.from_state_dict(st, "ip_adapter_plus_general.bin")
    assert a.family == "kolors"
    with pytest.raises(ipa.IPAdapterModelMismatchError, match="for Kolors"):
        ipa.check_family(a, "sdxl")


# ------------------------------------------------------------------------------------------- unsafe and malformed


_SIDE_EFFECT = {"ran": False}


def _side_effect():
    _SIDE_EFFECT["ran"] = True
    return {}


class _Custom:
    def __reduce__(self):
        return (_side_effect, ())


def test_bin_with_a_custom_class_is_refused_without_running_it(tmp_path):
    st = tiny_ipadapter_state(variant="base", layer_inner_dims=SD15_DIMS)
    st["extra"] = _Custom()
    path = tmp_path / "evil.bin"
    torch.save(st, path)
    with zipfile.ZipFile(path) as z:  # the pickle really names the function a full unpickler would call
        assert any(b"_side_effect" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    with pytest.raises(ipa.IPAdapterFormatError, match=r"evil\.bin.*weights_only=True"):
        ipa.load_ipadapter_file(path)
    assert _SIDE_EFFECT["ran"] is False


def test_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ipa.load_ipadapter_file(write(tmp_path, "base", fmt="bin"))
    assert seen == [{"map_location": "cpu", "weights_only": True}]


def _save_flat(tmp_path, name, st):
    path = tmp_path / name
    save_file({f"{p}.{k}": v.clone() for p, d in st.items() for k, v in d.items()}, str(path))
    return path


@pytest.mark.parametrize(("case", "pattern"), [
    ("no_image_proj", r"'bad\.safetensors' is not an IP-Adapter file: it has no image_proj weights"),
    ("gap", r"missing layer\(s\) \[5\]"),
    ("even", r"even layer number"),
    ("only_k", r"layer 3 has no to_v_ip"),
    ("unknown_ip_key", r"unexpected ip_adapter key\(s\) 1\.to_q_ip\.weight"),
    ("unknown_proj", r"match no known IP-Adapter projection"),
    ("extra_proj_key", r"does not fit a ImageProjModel: unexpected extra\.weight"),
    ("wrong_shape", r"image_proj\.latents \(1, 16, 65\) should be \[1, queries, 64\]"),
    ("mixed_models", r"image_proj makes 2048-d tokens but the ip_adapter layers take 768-d"),
    ("cross_differs", r"layer 3 takes 700-d context but layer 1 takes 768-d"),
    ("int_tensor", r"is not a non-empty floating-point tensor"),
])
def test_malformed_files_are_refused_clearly(tmp_path, case, pattern):
    st = tiny_ipadapter_state(variant="plus" if case == "wrong_shape" else "base", layer_inner_dims=SD15_DIMS)
    ip, proj = st["ip_adapter"], st["image_proj"]
    if case == "no_image_proj":
        st["image_proj"] = {}
        st = {"ip_adapter": ip}
    elif case == "gap":
        del ip["5.to_k_ip.weight"], ip["5.to_v_ip.weight"]
    elif case == "even":
        ip["2.to_k_ip.weight"] = ip["1.to_k_ip.weight"]
    elif case == "only_k":
        del ip["3.to_v_ip.weight"]
    elif case == "unknown_ip_key":
        ip["1.to_q_ip.weight"] = ip["1.to_k_ip.weight"]
    elif case == "unknown_proj":
        st["image_proj"] = {"foo.weight": torch.ones(3)}
    elif case == "extra_proj_key":
        proj["extra.weight"] = torch.ones(3)
    elif case == "wrong_shape":
        proj["latents"] = torch.zeros(1, 16, 65)
    elif case == "mixed_models":
        st["image_proj"] = tiny_ipadapter_state(variant="base", family="sdxl", layer_inner_dims=[4])["image_proj"]
    elif case == "cross_differs":
        ip["3.to_k_ip.weight"] = ip["3.to_v_ip.weight"] = torch.zeros(32, 700)
    elif case == "int_tensor":
        proj["norm.bias"] = torch.zeros(768, dtype=torch.int64)
    path = _save_flat(tmp_path, "bad.safetensors", st)
    with pytest.raises(ipa.IPAdapterFormatError, match=pattern) as err:
        ipa.load_ipadapter_file(path)
    assert "bad.safetensors" in str(err.value)


def test_unreadable_containers_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ipa.IPAdapterFormatError, match=r"'junk\.safetensors' is not a readable \.safetensors file"):
        ipa.load_ipadapter_file(junk)
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(ipa.IPAdapterFormatError, match=r"'list\.bin' does not hold a dict of tensors"):
        ipa.load_ipadapter_file(tmp_path / "list.bin")
    torch.save({"image_proj": {"proj.weight": "text"}, "ip_adapter": {}}, tmp_path / "strings.bin")
    with pytest.raises(ipa.IPAdapterFormatError, match="no ip_adapter weights"):
        ipa.load_ipadapter_file(tmp_path / "strings.bin")
    torch.save({"image_proj": {"proj.weight": 3}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}},
               tmp_path / "ints.bin")
    with pytest.raises(ipa.IPAdapterFormatError, match=r"image_proj entries must be tensors.*'proj\.weight': int"):
        ipa.load_ipadapter_file(tmp_path / "ints.bin")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ipa.IPAdapterFormatError, match=r"unsupported file type '\.onnx'"):
        ipa.load_ipadapter_file(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ipa.load_ipadapter_file(tmp_path / "missing.safetensors")
    with pytest.raises(ipa.IPAdapterFormatError, match="does not hold a dict"):
        ipa.from_state_dict([1, 2], "list")


# ---------------------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("variant", ["faceid", "faceid-portrait", "faceid-plusv2", "instantid"])
def test_dlib_128d_embedding_is_refused_with_what_to_do(tmp_path, variant):
    a = ipa.load_ipadapter_file(write(tmp_path, variant))
    kw = inputs(a)
    kw["face_embedding"] = rand(1, 128)
    with pytest.raises(ipa.IPAdapterInputError) as err:
        ipt.id_tokens(a, **kw)
    assert str(err.value) == (
        "FaceID IP-Adapters were trained on insightface's 512-d ArcFace embedding; this one is 128-d from the dlib "
        "back-end: use the insightface back-end with antelopev2 or buffalo_l in models/insightface/models/, or an "
        "image-based IP-Adapter (base/plus/plus-face) with the offline back-end")
    kw["face_embedding"] = rand(1, 256)
    with pytest.raises(ipa.IPAdapterInputError, match="expects a 512-d face embedding .* but got 256-d"):
        ipt.id_tokens(a, **kw)


def test_clip_dims_that_do_not_match_name_both(tmp_path):
    plus = ipa.load_ipadapter_file(write(tmp_path, "plus", clip_hidden_dim=1280))
    with pytest.raises(ipa.IPAdapterInputError) as err:
        ipt.id_tokens(plus, clip_hidden=rand(1, 257, 1664))
    assert str(err.value) == ("this plus IP-Adapter expects CLIP vision hidden size 1280 (ViT-H) but the CLIP_VISION "
                              "gives 1664 (ViT-bigG)")
    with pytest.raises(ipa.IPAdapterInputError, match=r"penultimate hidden states .* shape \[1, 1280\] \(image_embeds"):
        ipt.id_tokens(plus, clip_hidden=rand(1, 1280))
    with pytest.raises(ipa.IPAdapterInputError, match="needs clip_hidden"):
        ipt.id_tokens(plus, clip_embeds=rand(1, 1280))
    base = ipa.load_ipadapter_file(write(tmp_path, "base", clip_embed_dim=1024))
    with pytest.raises(ipa.IPAdapterInputError, match=r"image_embeds of size 1024 \(ViT-H\) but the CLIP_VISION "
                                                      r"gives 1280 \(ViT-bigG\)"):
        ipt.id_tokens(base, clip_embeds=rand(1, 1280))
    with pytest.raises(ipa.IPAdapterInputError, match="non-finite"):
        ipt.id_tokens(base, clip_embeds=torch.full((1, 1024), float("nan")))
    fplus = ipa.load_ipadapter_file(write(tmp_path, "faceid-plusv2", clip_hidden_dim=1280))
    with pytest.raises(ipa.IPAdapterInputError, match="aligned face crop"):
        ipt.id_tokens(fplus, face_embedding=rand(1, 512))
    with pytest.raises(ipa.IPAdapterInputError, match="batch sizes 2 and 3 differ"):
        ipt.id_tokens(fplus, face_embedding=rand(2, 512), clip_hidden=rand(3, 257, 1280))
    # accepted shapes: [D], [B, 1, D]; a single face broadcast over several crops
    assert ipt.id_tokens(base, clip_embeds=rand(1024)).shape == (1, 4, 768)
    assert ipt.id_tokens(base, clip_embeds=rand(3, 1, 1024)).shape == (3, 4, 768)
    assert ipt.id_tokens(fplus, face_embedding=rand(512), clip_hidden=rand(3, 257, 1280)).shape == (3, 4, 768)


# ---------------------------------------------------------------------------------------------- family and layers


def test_family_and_layer_count_mismatch_is_refused(tmp_path):
    xl = ipa.load_ipadapter_file(write(tmp_path, "plus", "sdxl"))
    with pytest.raises(ipa.IPAdapterModelMismatchError) as err:
        ipa.map_layers(xl, L.all_layers("sd15"))
    assert str(err.value).startswith(
        "this IP-Adapter has 70 layers (SDXL) but the MODEL has 16 cross-attention layers (SD1.5)")
    with pytest.raises(ipa.IPAdapterModelMismatchError, match=r"is for SDXL \(cross-attention dim 2048, 70 layers\) "
                                                              r"but the MODEL is SD1\.5 \(context dim 768\)"):
        ipa.check_family(xl, "sd15", cross_dim=768)
    with pytest.raises(ipa.IPAdapterModelMismatchError, match="but the MODEL is SD1.5: use an IP-Adapter made for"):
        ipa.check_family(xl, "SD1.5")
    ipa.check_family(xl, "sdxl", cross_dim=2048)
    sd15 = ipa.load_ipadapter_file(write(tmp_path, "base"))
    ipa.check_family(sd15, "sd15", 768)
    with pytest.raises(ipa.IPAdapterModelMismatchError, match=r"MODEL is SD2\.x \(context dim 1024\)"):
        ipa.check_family(sd15, "sd2x", 1024)
    with pytest.raises(ipa.IPAdapterModelMismatchError, match=r"has 16 layers \(SD1\.5\) but the MODEL has 70 cross-attention layers \(SDXL\)"):
        ipa.map_layers(sd15, L.all_layers("sdxl"))


def test_layer_widths_must_match_the_model(tmp_path):
    a = ipa.load_ipadapter_file(write(tmp_path, "base"))
    layers = L.all_layers("sd15")
    ok = {k: SD15_DIMS[n] for n, k in enumerate(ipa.ip_layer_order(layers))}
    assert ipa.map_layers(a, ok) == {k: n for n, k in enumerate(ipa.ip_layer_order(layers))}
    bad = dict(ok)
    bad[("output", 3, 0)] = 64
    with pytest.raises(ipa.IPAdapterModelMismatchError) as err:
        ipa.map_layers(a, list(bad), inner_dims=bad)
    assert str(err.value).startswith("IP-Adapter layer 6 ('13.to_k_ip.weight') projects to 128 features but the "
                                     "MODEL's cross-attention at output 3:0 has inner dim 64")
    with pytest.raises(ipa.IPAdapterError, match="duplicates"):
        ipa.map_layers(a, [*layers[:-1], layers[0]])


def test_layer_weights_follow_the_2n_plus_1_numbering():
    st = tiny_ipadapter_state(variant="faceid", layer_inner_dims=SD15_DIMS, lora_rank=2)
    for n in range(16):
        st["ip_adapter"][f"{2 * n + 1}.to_k_ip.weight"] = torch.full((SD15_DIMS[n], 768), 1000.0 + n)
        st["ip_adapter"][f"{2 * n + 1}.to_v_ip.weight"] = torch.full((SD15_DIMS[n], 768), -1000.0 - n)
    shuffled = dict(reversed(list(st["ip_adapter"].items())))  # key order in the file does not matter
    a = ipa.from_state_dict({"image_proj": st["image_proj"], "ip_adapter": shuffled}, "marked")
    for n, (k, v) in enumerate(a.layer_weights()):
        assert torch.all(k == 1000.0 + n) and torch.all(v == -1000.0 - n)
    # ComfyUI keys -> position: input blocks, output blocks, middle block (diffusers' down, up, mid)
    rng = np.random.default_rng(0)
    layers = L.all_layers("sd15")
    pos = ipa.map_layers(a, [layers[i] for i in rng.permutation(len(layers))])
    assert [pos[k] for k in [("input", 1, 0), ("input", 8, 0), ("output", 3, 0), ("output", 11, 0),
                             ("middle", 0, 0)]] == [0, 5, 6, 14, 15]
    widths = {k: L.layer_info("sd15", k[0], k[1]).channels // 10 for k in layers}
    assert all(a.layer_inner_dims[n] == widths[k] for k, n in pos.items())


def test_sdxl_order_with_real_widths():
    real = _ip_order_dims("sdxl", 1)
    a = ipa.from_state_dict(tiny_ipadapter_state(variant="plus", family="sdxl", layer_inner_dims=real,
                                                 device="meta"), "xl")
    layers = {k: L.layer_info("sdxl", k[0], k[1]).channels for k in L.all_layers("sdxl")}
    pos = ipa.map_layers(a, layers)
    assert pos[("input", 4, 0)] == 0 and pos[("input", 4, 1)] == 1 and pos[("input", 5, 0)] == 2
    assert pos[("input", 8, 9)] == 23 and pos[("output", 0, 0)] == 24 and pos[("output", 5, 1)] == 59
    assert pos[("middle", 0, 0)] == 60 and pos[("middle", 0, 9)] == 69
    assert ipa.map_layers(a, [(b, n) for b, n, i in layers if i == 0] + [k for k in layers if k[2] > 0]) == pos


# -------------------------------------------------------------------------------------------- tokens and negatives


def test_faceid_plus_shortcut_and_scale_follow_the_reference_formula(tmp_path):
    v2 = ipa.load_ipadapter_file(write(tmp_path, "faceid-plusv2"))
    v1 = ipa.load_ipadapter_file(write(tmp_path, "faceid-plus"))  # same seed: identical weights
    kw = inputs(v2)
    t_v1 = ipt.id_tokens(v1, **kw)
    t_v2 = ipt.id_tokens(v2, **kw)
    x = ipt.id_tokens(v2, **kw, shortcut_scale=0.0)  # V2 with scale 0: the FaceID MLP tokens alone
    ref_x = ref_face_mlp(v2.image_proj, F.normalize(kw["face_embedding"].to(D64), dim=-1), 4, 768)
    torch.testing.assert_close(x.to(D64), ref_x, atol=TOL, rtol=0)
    assert tol.differs(t_v2, t_v1)
    torch.testing.assert_close(t_v2, x + t_v1, atol=TOL, rtol=0)  # out = x + 1 * perceiver
    torch.testing.assert_close(ipt.id_tokens(v2, **kw, shortcut_scale=2.5), x + 2.5 * t_v1, atol=TOL, rtol=0)
    torch.testing.assert_close(ipt.id_tokens(v1, **kw, shortcut=True), t_v2, atol=0, rtol=0)
    torch.testing.assert_close(ipt.id_tokens(v2, **kw, shortcut=False), t_v1, atol=0, rtol=0)
    torch.testing.assert_close(t_v2.to(D64), ref_tokens(v2, kw, shortcut=True), atol=TOL, rtol=0)


def test_face_embeddings_are_normalised_only_for_normed_variants(tmp_path):
    e = rand(1, 512)
    for variant, normed in (("faceid", True), ("faceid-portrait", True), ("faceid-portrait-unnorm", False)):
        a = ipa.load_ipadapter_file(write(tmp_path, variant))
        same = torch.allclose(ipt.id_tokens(a, face_embedding=e), ipt.id_tokens(a, face_embedding=20 * e), atol=TOL)
        assert same is normed and a.face_normed is normed
    a = ipa.load_ipadapter_file(write(tmp_path, "faceid"))
    assert tol.differs(ipt.id_tokens(a, face_embedding=20 * e, normalize_face=False), ipt.id_tokens(a, face_embedding=e))


def test_uncond_tokens_are_what_ip_adapter_feeds_the_negative_branch(tmp_path):
    base = ipa.load_ipadapter_file(write(tmp_path, "base"))
    sd = base.image_proj
    zero_ref = ref_ln(_t(sd, "proj.bias").reshape(1, 4, 768), sd, "norm")  # proj(0) = bias
    torch.testing.assert_close(ipt.uncond_tokens(base).to(D64), zero_ref, atol=TOL, rtol=0)
    assert ipt.uncond_tokens(base, clip_embeds=rand(3, 32)).shape == (3, 4, 768)
    fid = ipa.load_ipadapter_file(write(tmp_path, "faceid"))
    torch.testing.assert_close(ipt.uncond_tokens(fid, batch=2).to(D64),
                               ref_face_mlp(fid.image_proj, torch.zeros(2, 512, dtype=D64), 4, 768), atol=TOL, rtol=0)
    plus = ipa.load_ipadapter_file(write(tmp_path, "plus"))
    with pytest.raises(ipa.IPAdapterInputError, match="CLIP vision hidden states of a zero image"):
        ipt.uncond_tokens(plus)
    zero_hidden = rand(1, 257, 48, seed=9)
    torch.testing.assert_close(ipt.uncond_tokens(plus, clip_hidden=zero_hidden),
                               ipt.id_tokens(plus, clip_hidden=zero_hidden), atol=0, rtol=0)
    fplus = ipa.load_ipadapter_file(write(tmp_path, "faceid-plusv2"))
    unc = ipt.uncond_tokens(fplus, clip_hidden=zero_hidden.expand(2, -1, -1))
    ref = ref_tokens(fplus, {"face_embedding": torch.zeros(2, 512), "clip_hidden": zero_hidden.expand(2, -1, -1)},
                     shortcut=True)
    assert unc.shape == (2, 4, 768)
    torch.testing.assert_close(unc.to(D64), ref, atol=TOL, rtol=0)
    img = ipt.uncond_reference_image(224)
    mean = torch.tensor(ipt.CLIP_MEAN)
    assert img.shape == (1, 224, 224, 3) and torch.allclose((img - mean), torch.zeros(()))
    assert torch.equal(ipt.uncond_reference_image(8, "black"), torch.zeros(1, 8, 8, 3))


def test_other_dtype_and_module_and_deepcopy(tmp_path):
    a = ipa.load_ipadapter_file(write(tmp_path, "plus", fmt="bin", dtype=torch.float16))
    assert a.dtype == torch.float16 and a.image_proj["latents"].dtype == torch.float16
    kw = inputs(a)
    t32 = ipt.id_tokens(a, **kw)
    m64 = ipa.build_image_proj(a, dtype=torch.float64)
    t64 = ipt.id_tokens(a, **kw, module=m64)
    assert t64.dtype == torch.float64
    torch.testing.assert_close(t32.to(D64), t64, atol=TOL, rtol=0)
    assert not any(p.requires_grad for p in m64.parameters()) and not m64.training
    assert a.projection() is a.projection()  # cached
    assert copy.deepcopy(a) is a


# ------------------------------------------------------------------------------------------------ several references


def test_average_and_stack(tmp_path):
    a = ipa.load_ipadapter_file(write(tmp_path, "base"))
    embeds = rand(3, 32)
    toks = ipt.id_tokens(a, clip_embeds=embeds)
    avg = ipt.combine_tokens(toks, "average")
    stack = ipt.combine_tokens(toks, "stack")
    assert avg.shape == (1, 4, 768) and stack.shape == (1, 12, 768)
    torch.testing.assert_close(avg[0], toks.mean(0))
    for i in range(3):
        assert torch.equal(stack[0, 4 * i:4 * (i + 1)], toks[i])
    assert torch.equal(ipt.combine_tokens([toks[0], toks[1:2], toks[2]], "stack"), stack)
    # averaging the inputs before the projection (IPAdapter_plus "average") differs from averaging tokens
    pre = ipt.id_tokens(a, clip_embeds=ipt.combine_embeddings(embeds))
    torch.testing.assert_close(pre, ipt.id_tokens(a, clip_embeds=embeds.mean(0, keepdim=True)), atol=0, rtol=0)
    assert tol.differs(avg, pre)
    assert torch.equal(ipt.combine_embeddings([embeds[0], embeds[1:]]), embeds.mean(0, keepdim=True))
    normed = ipt.combine_embeddings(embeds, "norm_average")
    torch.testing.assert_close(normed, F.normalize(embeds, dim=-1).mean(0, keepdim=True))
    hidden = rand(2, 257, 48)
    assert ipt.combine_embeddings(hidden).shape == (1, 257, 48)
    with pytest.raises(ipa.IPAdapterError, match="'average' or 'stack'"):
        ipt.combine_tokens(toks, "concat")
    with pytest.raises(ipa.IPAdapterInputError, match="different shapes"):
        ipt.combine_tokens([toks[0], toks[0, :2]], "average")


# ---------------------------------------------------------------------------------------------------- face alignment


def _lstsq_tol(kps, magnitude: float, noisy: bool) -> float:
    """Bound for a float64 similarity fitted to `kps` (Higham, ch. 20): the solution moves by about kappa(A) * the
    rounding of the data, plus kappa(A)**2 times it when the fit leaves a residual (`noisy`)."""
    kps = np.asarray(kps, np.float64)
    n = len(kps)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([kps[:, 0], -kps[:, 1], np.ones(n), np.zeros(n)], axis=1)
    a[1::2] = np.stack([kps[:, 1], kps[:, 0], np.zeros(n), np.ones(n)], axis=1)
    kappa = float(np.linalg.cond(a))
    return tol.float_tol(torch.float64, a.size, magnitude) * kappa * (1 + (kappa if noisy else 0.0))


def _similarity(points, angle, scale, shift):
    c, s = math.cos(angle), math.sin(angle)
    return points @ (scale * np.array([[c, -s], [s, c]])).T + np.asarray(shift)


def test_align_face_maps_the_keypoints_onto_the_arcface_template():
    size = 224
    template = face_align.arcface_template(size)
    np.testing.assert_allclose(template, face_align.ARCFACE_TEMPLATE_112 * 2.0)
    kps = _similarity(template, 0.35, 1.6, (60.0, 35.0))
    img = np.zeros((460, 420, 3), np.uint8)
    for x, y in kps:  # anti-aliased discs with sub-pixel centres
        cv2.circle(img, (round(x * 16), round(y * 16)), 6 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    crop, matrix = face_align.align_face(img, kps, size, return_matrix=True)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(np.c_[kps, np.ones(5)] @ matrix.T, template, atol=_lstsq_tol(kps, size, noisy=False))
    grey = crop[..., 0].astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    for tx, ty in template:  # intensity centroid of each warped disc
        win = (np.abs(xx - tx) <= 9) & (np.abs(yy - ty) <= 9)
        w = grey * win
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        assert math.hypot(cx - tx, cy - ty) < 1.0, (cx, cy, tx, ty)
    assert crop[0, 0].sum() == 0 and crop[size // 2, size // 2].sum() == 0  # border value 0, background black


def test_align_face_template_scaling_and_least_squares():
    t256 = face_align.arcface_template(256)  # insightface: 256 % 112 != 0 -> ratio 256/128, x shifted by 8 * ratio
    np.testing.assert_allclose(t256, face_align.ARCFACE_TEMPLATE_112 * 2.0 + np.array([16.0, 0.0]))
    np.testing.assert_allclose(face_align.arcface_template(336), face_align.ARCFACE_TEMPLATE_112 * 3.0)
    rng = np.random.default_rng(3)
    kps = _similarity(face_align.ARCFACE_TEMPLATE_112, -0.2, 2.2, (100.0, 80.0)) + rng.normal(0, 2.0, (5, 2))
    m = face_align.similarity_transform(kps, t256)
    # least squares over similarities: the residual is stationary in each of the 4 parameters
    a, b = m[0, 0], m[1, 0]
    assert m[0, 1] == -b and m[1, 1] == a  # built from the same two numbers
    resid = np.c_[kps, np.ones(5)] @ m.T - t256
    for d in (np.array([[1, 0, 0], [0, 1, 0]]), np.array([[0, -1, 0], [1, 0, 0]]), np.array([[0, 0, 1], [0, 0, 0]]),
              np.array([[0, 0, 0], [0, 0, 1]])):
        assert abs((resid * (np.c_[kps, np.ones(5)] @ d.T)).sum()) < _lstsq_tol(kps, 256 * 256, noisy=True)
    skt = pytest.importorskip("skimage.transform")
    cls = skt.SimilarityTransform
    if hasattr(cls, "from_estimate"):
        ref = cls.from_estimate(kps, t256).params
    else:
        ref = cls()
        ref.estimate(kps, t256)
        ref = ref.params
    np.testing.assert_allclose(m, ref[:2], atol=_lstsq_tol(kps, 256, noisy=True))  # another algorithm (Umeyama)


def test_align_face_rejects_bad_input():
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ipa.IPAdapterInputError, match="5 finite"):
        face_align.align_face(img, np.zeros((4, 2)))
    with pytest.raises(ipa.IPAdapterInputError, match="degenerate"):
        face_align.align_face(img, np.full((5, 2), 10.0))
    with pytest.raises(ipa.IPAdapterInputError, match="H x W x 3"):
        face_align.align_face(np.zeros((64, 64)), face_align.ARCFACE_TEMPLATE_112)
    out = face_align.align_face(np.full((112, 112, 3), 0.5, np.float32), face_align.ARCFACE_TEMPLATE_112, 112)
    assert out.dtype == np.uint8 and out[56, 56, 0] == 128  # float input in [0, 1]; identity warp
