"""ComfyUI tier: the tiny random models of magic_portrait.tiny, built from ComfyUI's own classes, behave like the
real architectures where our patches care (attention block positions and indices, conditioning, loading)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import tolerances as tol
import torch
from helpers import comfy_folders

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # appended, not prepended: the pack's `nodes/` package must not shadow ComfyUI's `nodes` module
    sys.path.append(str(REPO_ROOT))

from magic_portrait import tiny  # noqa: E402

LATENT = (1, 4, 16, 16)  # 128 px: ComfyUI's CPU attention (sub-quadratic) still costs ~ heads x tokens^2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """With 2 cores shared with other processes, torch's OpenMP threads make this file's many small ops 3-5x
    slower (measured: ~105 s with 2 threads, ~27 s with 1); one thread keeps it fast whatever else runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module")
def comfy(comfy, workdir):
    """The shared ComfyUI (conftest: skips each test, counted in the ComfyUI tier, when ComfyUI is missing), with
    models and outputs in this module's temporary folder while it runs."""
    with comfy_folders(workdir):
        yield comfy


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny.build_sd15_model(seed=0)


@pytest.fixture(scope="module")
def sdxl(comfy):
    return tiny.build_sdxl_model(seed=0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _latent(seed: int, shape=LATENT) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _plain_attention(q, k, v, extra_options):
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"])


class _Recorder:
    """attn2 replace patch that computes ordinary attention and records where it ran."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, extra_options):
        self.calls.append((tuple(extra_options["block"]), extra_options["block_index"], q.shape[-1]))
        return _plain_attention(q, k, v, extra_options)


def _record_every_attn2(patcher, seen: list):
    """A non-replace attn2 patch runs in every cross-attention layer: it lists all layers that exist."""

    def patch(n, context, value, extra_options):
        seen.append((tuple(extra_options["block"]), extra_options["block_index"]))
        return n, context, value

    patcher.set_model_attn2_patch(patch)


# --------------------------------------------------------------------------------------------------- init / conds


@pytest.mark.usefixtures("comfy")
def test_init_weights_rules_and_determinism():
    import comfy.ops

    ops = comfy.ops.disable_weight_init

    def make():
        return torch.nn.Sequential(
            ops.Conv2d(16, 64, 3, padding=1),
            ops.GroupNorm(32, 64),
            ops.Linear(64, 256),
            ops.LayerNorm(256),
            ops.Linear(256, 8),
        )

    a = tiny.init_weights_(make(), seed=3)
    b = tiny.init_weights_(make(), seed=3)
    c = tiny.init_weights_(make(), seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if name.startswith(("1.", "3.")):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(pa == expected), name
            continue
        assert not torch.equal(pa, pc), name
        if pa.ndim >= 2:
            fan_in = pa[0].numel()
            assert pa.std().item() == pytest.approx(fan_in**-0.5, rel=0.15), name
        else:
            assert pa.std().item() == pytest.approx(0.02, rel=0.35), name


@pytest.mark.usefixtures("comfy")
def test_model_weights_are_seeded():
    a = tiny.build_sd15_model(seed=5, full_blocks=False)
    b = tiny.build_sd15_model(seed=5, full_blocks=False)
    c = tiny.build_sd15_model(seed=6, full_blocks=False)
    sa, sb, sc = (m.model.diffusion_model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["out.2.weight"], sc["out.2.weight"])
    # ComfyUI zero-initialises the output conv and proj_out: ours must be random so outputs depend on inputs
    zero_init = ["out.2.weight"] + [k for k in sa if k.endswith(("proj_out.weight", "out_layers.3.weight"))]
    assert len(zero_init) > 10 and all(sa[k].std() > 0.01 for k in zero_init)
    assert all(torch.isfinite(v).all() for v in sa.values())


def test_cond_helpers_shapes_and_seeding():
    c = tiny.sd15_cond(1, batch=2)
    assert len(c) == 1 and c[0][0].shape == (2, 77, 768) and c[0][1]["pooled_output"].shape == (2, 768)
    assert torch.equal(c[0][0], tiny.sd15_cond(1, batch=2)[0][0])
    assert not torch.equal(c[0][0], tiny.sd15_cond(2, batch=2)[0][0])
    x = tiny.sdxl_cond(1, batch=2, width=832, height=1216)
    assert x[0][0].shape == (2, 77, 2048) and x[0][1]["pooled_output"].shape == (2, 1280)
    assert (x[0][1]["width"], x[0][1]["height"], x[0][1]["target_width"], x[0][1]["target_height"]) == (832, 1216, 832, 1216)
    assert torch.equal(x[0][1]["pooled_output"], tiny.sdxl_cond(1, batch=2)[0][1]["pooled_output"])


# ------------------------------------------------------------------------------------------------------- SD1.5


def test_sd15_has_exactly_sd15_attention_layers(sd15):
    import comfy.model_base
    import comfy.supported_models

    base = sd15.model
    assert type(base) is comfy.model_base.BaseModel
    assert isinstance(base.model_config, comfy.supported_models.SD15)
    assert base.model_type == comfy.model_base.ModelType.EPS
    assert tiny.attention_layout(sd15) == {pos: 1 for pos in tiny.SD15_ATTENTION_BLOCKS}
    assert len(tiny.SD15_ATTENTION_BLOCKS) == 16

    patched = sd15.clone()
    recorders = {pos: _Recorder() for pos in tiny.SD15_ATTENTION_BLOCKS}
    for pos, rec in recorders.items():
        patched.set_model_attn2_replace(rec, *pos)
    seen = []
    _record_every_attn2(patched, seen)

    x, sigma = _latent(0), torch.tensor([5.0])
    ctx = tiny.sd15_cond(0)[0][0]
    with torch.inference_mode():
        plain = base.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
        out = base.apply_model(
            x, sigma, c_crossattn=ctx, transformer_options=dict(patched.model_options["transformer_options"])
        )
    for pos, rec in recorders.items():
        assert [c[:2] for c in rec.calls] == [(pos, 0)], f"attn2 replace at {pos} was not called exactly once"
    assert sorted(seen) == sorted((pos, 0) for pos in tiny.SD15_ATTENTION_BLOCKS)  # no other attention layer
    # replace patches computing ordinary attention leave the output unchanged: q/k/v reach them intact
    torch.testing.assert_close(out, plain, rtol=0, atol=tol.network_tol(torch.float32, base.diffusion_model,
                                                                        tol.magnitude(plain)))
    assert not sd15.model_options["transformer_options"].get("patches_replace")  # the input patcher is untouched


def test_sd15_outputs_depend_on_latent_sigma_and_context(sd15):
    unet = sd15.model.diffusion_model
    x, ctx = _latent(1), tiny.sd15_cond(1)[0][0]
    with torch.inference_mode():
        base = unet(x, torch.tensor([500.0]), context=ctx)
        other_x = unet(_latent(2), torch.tensor([500.0]), context=ctx)
        other_t = unet(x, torch.tensor([100.0]), context=ctx)
        other_ctx = unet(x, torch.tensor([500.0]), context=tiny.sd15_cond(2)[0][0])
        x0_a = sd15.model.apply_model(x, torch.tensor([1.0]), c_crossattn=ctx)
        x0_b = sd15.model.apply_model(x, torch.tensor([2.0]), c_crossattn=ctx)
    assert torch.isfinite(base).all()
    assert 0.1 < base.std().item() < 10
    assert base.std(dim=(2, 3)).mean() > 0.5 * base.std()  # varies over the image, not a per-channel constant
    assert _rel(other_x, base) > 0.3
    assert _rel(other_t, base) > 0.05
    assert _rel(other_ctx, base) > 0.05
    assert _rel(x0_b, x0_a) > 0.05


@pytest.mark.usefixtures("comfy")
def test_sd15_v_prediction_and_small_variant():
    import comfy.model_base

    v = tiny.build_sd15_model(seed=0, v_prediction=True, full_blocks=False)
    e = tiny.build_sd15_model(seed=0, full_blocks=False)
    assert v.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert tiny.attention_layout(e) == {("input", 1): 1, ("input", 3): 1, ("middle", 0): 1} | {
        ("output", n): 1 for n in range(4)
    }
    x, ctx = _latent(3), tiny.sd15_cond(3)[0][0]
    with torch.inference_mode():
        out_v = v.model.apply_model(x, torch.tensor([3.0]), c_crossattn=ctx)
        out_e = e.model.apply_model(x, torch.tensor([3.0]), c_crossattn=ctx)
    assert _rel(out_v, out_e) > 0.05  # same weights, different parameterisation
    with pytest.raises(ValueError, match="GroupNorm"):
        tiny.build_sd15_model(model_channels=32)


def test_sd15_controlnet_applies_through_core_nodes(sd15):
    import comfy.controlnet
    import comfy.sample

    from nodes import ControlNetApplyAdvanced

    control = tiny.build_sd15_controlnet(seed=1)
    assert isinstance(control, comfy.controlnet.ControlNet)
    cond = tiny.sd15_cond(4)
    hint = torch.rand(1, LATENT[2] * 8, LATENT[3] * 8, 3, generator=torch.Generator().manual_seed(4))
    positive, negative = ControlNetApplyAdvanced().apply_controlnet(cond, cond, control, hint, 1.0, 0.0, 1.0)

    def run(pos, neg):
        latent = torch.zeros(LATENT)
        with torch.inference_mode():
            return comfy.sample.sample(
                sd15, comfy.sample.prepare_noise(latent, 0), 1, 2.0, "euler", "normal", pos, neg, latent,
                disable_pbar=True, seed=0,
            )

    plain, controlled = run(cond, cond), run(positive, negative)
    assert torch.isfinite(controlled).all()
    assert _rel(controlled, plain) > 0.01


# -------------------------------------------------------------------------------------------------------- SDXL


def test_sdxl_structure_and_sampling_with_sdxl_conds(sdxl):
    import comfy.model_base
    import comfy.sample
    import comfy.supported_models

    assert isinstance(sdxl.model, comfy.model_base.SDXL)
    assert isinstance(sdxl.model.model_config, comfy.supported_models.SDXL)
    layout = tiny.attention_layout(sdxl)
    assert set(layout) == set(tiny.SDXL_ATTENTION_BLOCKS)
    assert all(depth >= 2 for depth in layout.values())
    assert layout[("input", 4)] == layout[("output", 5)] == 2  # SDXL: 2 here ...
    assert layout[("input", 8)] == layout[("middle", 0)] == layout[("output", 0)] == 3  # ... and 10 here

    patched = sdxl.clone()
    recorders = {}
    for (block, number), depth in layout.items():
        for index in range(depth):
            recorders[(block, number, index)] = rec = _Recorder()
            patched.set_model_attn2_replace(rec, block, number, index)
    seen = []
    _record_every_attn2(patched, seen)

    def run(model, positive, seed=0, steps=1):
        latent = torch.zeros(LATENT)
        noise = comfy.sample.prepare_noise(latent, seed)
        negative = tiny.sdxl_cond(99, width=256, height=256)
        with torch.inference_mode():
            return comfy.sample.sample(
                model, noise, steps, 3.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
            )

    cond = tiny.sdxl_cond(0, width=256, height=256)
    out = run(patched, cond)
    assert out.shape == LATENT and torch.isfinite(out).all()
    counts = {key: len(rec.calls) for key, rec in recorders.items()}
    assert min(counts.values()) >= 1 and len(set(counts.values())) == 1, counts  # every layer, every model call
    for key, rec in recorders.items():
        assert {c[:2] for c in rec.calls} == {(key[:2], key[2])}
    assert set(seen) == {((block, number), index) for block, number, index in recorders}  # no other layer

    reference = run(sdxl, cond)
    # one euler step at cfg 3: a cond and an uncond evaluation
    ops = tol.reduction_ops(sdxl.model.diffusion_model)
    torch.testing.assert_close(out, reference, rtol=0, atol=tol.sampling_tol(torch.float32, ops, tol.magnitude(reference), 2))
    other_pooled = [[cond[0][0], dict(cond[0][1], pooled_output=tiny.sdxl_cond(5)[0][1]["pooled_output"])]]
    other_size = [[cond[0][0], dict(cond[0][1], width=512, height=768, target_width=512, target_height=768)]]
    assert _rel(run(sdxl, other_pooled), reference) > 0.01
    assert _rel(run(sdxl, other_size), reference) > 0.01


def test_sdxl_outputs_depend_on_inputs(sdxl):
    base_model = sdxl.model
    unet = base_model.diffusion_model
    cond = tiny.sdxl_cond(1, width=256, height=256)
    ctx, y = cond[0][0], base_model.encode_adm(**cond[0][1])
    x = _latent(4)
    with torch.inference_mode():
        base = unet(x, torch.tensor([500.0]), context=ctx, y=y)
        other_x = unet(_latent(5), torch.tensor([500.0]), context=ctx, y=y)
        other_t = unet(x, torch.tensor([100.0]), context=ctx, y=y)
        other_ctx = unet(x, torch.tensor([500.0]), context=tiny.sdxl_cond(2)[0][0], y=y)
    assert y.shape == (1, 2816)
    assert 0.1 < base.std().item() < 10
    assert base.std(dim=(2, 3)).mean() > 0.5 * base.std()
    assert _rel(other_x, base) > 0.3
    assert _rel(other_t, base) > 0.05
    assert _rel(other_ctx, base) > 0.05


# -------------------------------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def checkpoint(comfy, workdir):
    import folder_paths

    start = time.perf_counter()
    path = tiny.write_tiny_sd15_checkpoint(workdir / "models" / "checkpoints" / "magic_tiny_sd15.safetensors", seed=0)
    elapsed = time.perf_counter() - start
    folder_paths.filename_list_cache.clear()
    print(f"\nwrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {elapsed:.1f} s")
    return path


def test_checkpoint_is_detected_as_sd15_with_its_16_attention_layers(checkpoint):
    import comfy.model_base
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from safetensors import safe_open

    # the text encoder is checked by key set (complete, no stray keys) and by the prompt test (CLIPTextEncode runs)
    with safe_open(str(checkpoint), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
        metadata = f.metadata()
    assert dtypes == {"F16"}
    assert metadata["seed"] == "0" and metadata["full_blocks"] == "True"
    mtime = checkpoint.stat().st_mtime_ns
    assert tiny.write_tiny_sd15_checkpoint(checkpoint, seed=0, overwrite=False) == checkpoint
    assert checkpoint.stat().st_mtime_ns == mtime  # reused, not rewritten
    clip_keys = {k.removeprefix("cond_stage_model.") for k in keys if k.startswith("cond_stage_model.")}
    expected = set(comfy.sd1_clip.SDClipModel(device="meta").state_dict())
    assert clip_keys == expected - {"transformer.text_projection.weight", "logit_scale"}  # not in SD1.5 files

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_clip=False)
    assert type(model.model) is comfy.model_base.BaseModel
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert model.model.model_config.unet_config["model_channels"] == 320
    assert tiny.attention_layout(model) == {pos: 1 for pos in tiny.SD15_ATTENTION_BLOCKS}
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    vae_keys = {k.removeprefix("first_stage_model.") for k in keys if k.startswith("first_stage_model.")}
    assert vae_keys == set(comfy.taesd.taesd.TAESD().state_dict())
    with torch.inference_mode():
        image = vae.decode(_latent(0, (1, 4, 8, 8)))
    assert image.shape == (1, 64, 64, 3) and image.std() > 0.01


def test_checkpoint_samples_through_checkpoint_loader_simple(comfy, checkpoint, workdir):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 7,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "magic_tiny_sd15"}},
    }
    start = time.perf_counter()
    outputs = comfy.run_prompt(prompt)
    print(f"\nCheckpointLoaderSimple -> KSampler (2 steps, 64x64) -> SaveImage: {time.perf_counter() - start:.1f} s")
    images = outputs["7"]["images"]
    assert len(images) == 1
    saved = workdir / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert saved.is_file()

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(saved), dtype=np.float32)
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1.0  # not a constant image
