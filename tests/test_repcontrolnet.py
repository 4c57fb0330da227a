"""ComfyUI tier: RepControlNet nodes on tiny random SD1.5/SDXL-architecture models.

merged == unmerged, strength/beta 0 == base, the merge is computed when ComfyUI patches each weight (Apply stores no
difference per layer) and equals the reference merge, LoRAs and model merges before or after Apply keep their effect,
the lowvram/partial-load path gives what a full load gives, unpatch is bit-exact, a merged checkpoint saved by
CheckpointSave loads through CheckpointLoaderSimple and matches, training lowers the loss (and resumes) on a folder
inside ComfyUI's input folder (nothing outside it unless the server opts in), the bundled training set reaches the
input folder, the input MODEL is untouched, bad input is refused with the node and input named, the example workflow
runs through ComfyUI's executor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tolerances as tol
import torch
from helpers import assert_same_snapshot, model_snapshot, run_in_graph, run_node
from oracles import merged_state, unmerged_forward

from magic_portrait.comfy_env import WorkflowError

REPO = Path(__file__).resolve().parent.parent
APPLY = "MagicPortrait_ApplyRepControlNet"
LOAD = "MagicPortrait_LoadRepControlNet"
TRAIN = "MagicPortrait_TrainRepControlNet"
UNET = "diffusion_model."
# rounded operations in one merged weight element, by either route (casts, two products, two sums, a strength):
# a bound on the count, the tolerance comes from float_tol
MERGE_OPS = 8


@pytest.fixture(scope="module")
def R(pack):
    return pack.nodes.repcontrolnet


@pytest.fixture(scope="module")
def P(pack):
    return pack.nodes.repcontrolnet_patch


@pytest.fixture(scope="module")
def core(pack):
    return pack.magic_core.repcontrolnet


@pytest.fixture(scope="module")
def tiny_rcn(R, tiny, sd15):
    return R.LoadedRepControlNet(tiny.make_tiny_repcontrolnet(sd15, seed=3), "tiny_sd15.safetensors")


def hint(seed=0, batch=1, size=128):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def apply(nodes, model, loaded, image, strength=1.0, merge_weights=True):
    """Apply RepControlNet run as a server runs it (prompt validation, executor); returns its MODEL."""
    return run_in_graph(nodes[APPLY], model=model, repcontrolnet=loaded, image=image, strength=strength,
                        merge_weights=merge_weights).result[0]


def forward(model, x, sigma, cond, transformer_options=None):
    """One UNet evaluation (denoised) of a ModelPatcher with its weight patches loaded."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    to = dict(transformer_options if transformer_options is not None
              else model.model_options.get("transformer_options", {}))
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=cond[0][0], transformer_options=to).float()


def inputs(seed=0, batch=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g) * 2.0, torch.full((batch,), 3.0)


def restore(model):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])


def loaded_unet(model) -> dict[str, torch.Tensor]:
    """The UNet tensors of `model` as ComfyUI patches them when it loads the model (copies, the model is left loaded)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def assert_weights_close(actual: dict, expected: dict, ops: int = MERGE_OPS, keys=None):
    for key in keys if keys is not None else expected:
        magnitude = tol.magnitude(expected[key], actual[key])
        if magnitude == 0:  # all zeros on both sides (e.g. a zero-initialised bias): nothing to round
            assert torch.equal(actual[key], expected[key]), key
            continue
        bound = tol.float_tol(torch.float32, ops, magnitude)
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=bound, msg=key)


# ------------------------------------------------------------------------------------------------- merge invariants


def test_merged_equals_unmerged(nodes, R, P, core, sd15, tiny, tiny_rcn):
    cond, image = tiny.sd15_cond(1), hint(1)
    x, sigma = inputs(1)
    for strength in (1.0, 0.6):
        merged_model = apply(nodes, sd15, tiny_rcn, image, strength)
        merged = forward(merged_model, x, sigma, cond)
        # unmerged reference: the unpatched UNet with forward hooks, the same adapter features
        features = P.AdapterFeatures(tiny_rcn.weights, R.condition_tensor("t", image), strength, "t")
        restore(sd15)
        with unmerged_forward(sd15.model.diffusion_model, tiny_rcn.weights, strength):
            unmerged = forward(sd15, x, sigma, cond, {"patches": {"input_block_patch": [features]}})
        base = forward(sd15, x, sigma, cond)
        assert tol.differs(merged, base), "the RepControlNet must change the output"
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol.model_tol(sd15, merged, unmerged))


def test_strength_zero_and_beta_zero_give_the_base_model(nodes, R, sd15, tiny, tiny_rcn):
    cond, image = tiny.sd15_cond(2), hint(2)
    x, sigma = inputs(2)
    base = forward(sd15, x, sigma, cond)
    assert torch.equal(forward(apply(nodes, sd15, tiny_rcn, image, 0.0), x, sigma, cond), base)
    # a file with alpha 1, beta 0 and an untrained (zero-output) adapter is the base model, bit for bit
    zero = tiny.make_tiny_repcontrolnet(sd15, seed=4, alpha=1.0, beta=0.5)
    zero.beta = 0.0
    zero.adapter_state = {k: (torch.zeros_like(v) if k.startswith("conv_out.") else v)
                          for k, v in zero.adapter_state.items()}
    patched = apply(nodes, sd15, R.LoadedRepControlNet(zero, "beta0"), image, 1.0)
    assert torch.equal(forward(patched, x, sigma, cond), base)
    restore(sd15)


# Per-layer coefficients on two named layers, everything else at the file's alpha 0.7, beta 0.4; and the effective
# (alpha_s, beta_s) a strength s gives (0: the base layer, 1: the file's, linear in s), written out as literals
LAYER_A, LAYER_B = "input_blocks.1.0.in_layers.2", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
EXPECTED_COEFFICIENTS = {  # strength -> {layer: (alpha_s, beta_s)}; None: every other modal layer
    1.0: {LAYER_A: (1.3, 0.4), LAYER_B: (0.7, -0.2), None: (0.7, 0.4)},
    0.6: {LAYER_A: (1.18, 0.24), LAYER_B: (0.82, -0.12), None: (0.82, 0.24)},
    1.5: {LAYER_A: (1.45, 0.6), LAYER_B: (0.55, -0.3), None: (0.55, 0.6)},
}


def test_apply_stores_no_difference_and_the_merge_is_the_reference_merge(nodes, R, P, sd15, tiny):
    """Apply keeps references to the file's modal tensors only; the weights ComfyUI patches at load are
    alpha_s * W + beta_s * W_m with each layer's own coefficients (literals above, not the code's coefficients()),
    weight and bias alike, for every modal key; all other weights untouched."""
    weights = tiny.make_tiny_repcontrolnet(sd15, seed=5, alpha=0.7, beta=0.4)
    assert LAYER_A in weights.layers and LAYER_B in weights.layers
    weights.layer_alpha[LAYER_A] = 1.3
    weights.layer_beta[LAYER_B] = -0.2
    from_file = dict(weights.modal)
    restore(sd15)
    base = {k: v.detach().clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    for strength, coefficients in EXPECTED_COEFFICIENTS.items():
        patched = apply(nodes, sd15, R.LoadedRepControlNet(weights, "coefficients"), hint(4), strength)
        entries = {k[len(UNET):]: v for k, v in patched.patches.items()}
        assert set(entries) == set(weights.modal)
        for key, chain in entries.items():
            assert len(chain) == 1, "no capture entry without earlier patches"
            merge = chain[0][1]
            assert isinstance(merge, P.RepControlNetMerge) and chain[0][0] == strength
            assert merge.terms[UNET + key].modal is from_file[key], "the file's tensor itself, no copy"
        merged = loaded_unet(patched)
        expected = {}
        for key, modal in from_file.items():
            layer = key.rsplit(".", 1)[0]
            alpha_s, beta_s = coefficients.get(layer, coefficients[None])
            expected[key] = alpha_s * base[key] + beta_s * modal.float()
        assert {LAYER_A + ".weight", LAYER_A + ".bias", LAYER_B + ".weight"} <= set(expected)  # to_q has no bias
        assert_weights_close(merged, expected)
        assert all(torch.equal(merged[k], base[k]) for k in base if k not in expected)
    restore(sd15)
    after = sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


def _lora(model, keys, seed, rank=4):
    """A real LoRA (ComfyUI's generic key format) on `keys`, as comfy.sd.load_lora_for_models (LoraLoader) applies it."""
    g = torch.Generator().manual_seed(seed)
    state = model.model.diffusion_model.state_dict()
    lora = {}
    for key in keys:
        shape = state[key].shape
        down_shape = (rank, shape[1], *shape[2:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        name = UNET + key[: -len(".weight")]
        lora[name + ".lora_down.weight"] = torch.randn(down_shape, generator=g) / down_shape[1]
        lora[name + ".lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.05
    return lora


def _with_lora(model, lora, strength=0.8):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)[0]


def test_loras_and_merges_before_or_after_apply_compose_like_added_differences(nodes, R, P, core, sd15, tiny,
                                                                              tiny_rcn):
    """The increment is computed from the unpatched weight wherever Apply sits: a LoRA keeps its full effect on either
    side, two RepControlNets add up, and a model merge before Apply does not scale the control (it does after)."""
    import comfy_extras.nodes_model_merging as merging

    restore(sd15)
    base = {k: v.detach().clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    keys = sorted(tiny_rcn.weights.modal)
    lora_keys = [k for k in keys if k.endswith(".weight")][:3] + ["output_blocks.3.0.in_layers.2.weight"]
    lora = _lora(sd15, lora_keys, seed=6)
    lora_only = loaded_unet(_with_lora(sd15, lora))
    increment = {k: v - base[k] for k, v in merged_state(tiny_rcn.weights, base, 0.8).items()}
    expected = dict(lora_only)
    for key, inc in increment.items():
        expected[key] = lora_only[key] + inc
    ops = MERGE_OPS + 4 * 3 * 3 * 4  # the LoRA's own product (rank 4, 3x3 kernels at most) and one more sum

    lora_then_apply = apply(nodes, _with_lora(sd15, lora), tiny_rcn, hint(6), 0.8)
    chain = lora_then_apply.patches[UNET + lora_keys[0]]
    assert isinstance(chain[0][1], P.MergeCapture) and isinstance(chain[-1][1], P.RepControlNetMerge)
    apply_then_lora = _with_lora(apply(nodes, sd15, tiny_rcn, hint(6), 0.8), lora)
    for model in (lora_then_apply, apply_then_lora):
        assert_weights_close(loaded_unet(model), expected, ops, keys=sorted(set(expected)))
    assert tol.differs(lora_only[lora_keys[-1]], base[lora_keys[-1]]), "the LoRA acts outside the merged layers"

    # two RepControlNets on one model: their increments add up, each from the unpatched weight
    other = R.LoadedRepControlNet(tiny.make_tiny_repcontrolnet(sd15, seed=7), "other")
    both = apply(nodes, apply(nodes, _with_lora(sd15, lora), tiny_rcn, hint(6), 0.8), other, hint(7), 0.5)
    second = {k: v - base[k] for k, v in merged_state(other.weights, base, 0.5).items()}
    expected_both = {k: expected[k] + second.get(k, 0.0) for k in expected}
    assert_weights_close(loaded_unet(both), expected_both, ops + MERGE_OPS, keys=keys)

    # ModelMergeSimple(sd15, other model, ratio) before Apply: the control is added in full to the merged weight
    donor = tiny.build_sd15_model(seed=8)
    donor_state = {k: v.detach().clone() for k, v in donor.model.diffusion_model.state_dict().items()}
    ratio = 0.3
    merged_first = merging.ModelMergeSimple().merge(sd15, donor, ratio)[0]
    merge_then_apply = loaded_unet(apply(nodes, merged_first, tiny_rcn, hint(6), 0.8))
    expected_merge = {k: ratio * base[k] + (1 - ratio) * donor_state[k] + increment.get(k, 0.0) for k in keys}
    assert_weights_close(merge_then_apply, expected_merge, MERGE_OPS + 4, keys=keys)
    # ... and after Apply the merge's ratio scales the merged model, control included (ComfyUI's own semantics)
    apply_then_merge = loaded_unet(merging.ModelMergeSimple().merge(apply(nodes, sd15, tiny_rcn, hint(6), 0.8),
                                                                    donor, ratio)[0])
    expected_after = {k: ratio * (base[k] + increment.get(k, 0.0)) + (1 - ratio) * donor_state[k] for k in keys}
    assert_weights_close(apply_then_merge, expected_after, MERGE_OPS + 4, keys=keys)
    restore(sd15)
    after = sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_lowvram_partial_load_gives_the_full_load_result(nodes, P, sd15, tiny, tiny_rcn):
    """Modules ComfyUI leaves on the lowvram path get the merge on every use (LowVramPatch runs the same patch
    chain on a cast copy of the weight): the output equals the fully loaded model's, and the stored weights stay the
    base's. With a LoRA before Apply, so the capture runs on that path too."""
    import comfy.model_management

    cond, x_sigma = tiny.sd15_cond(9), inputs(9)
    x, sigma = x_sigma
    model = apply(nodes, _with_lora(sd15, _lora(sd15, ["input_blocks.1.0.in_layers.2.weight"], seed=9)), tiny_rcn,
                  hint(9), 1.0)
    to = model.model_options.get("transformer_options", {})
    full = forward(model, x, sigma, cond)
    comfy.model_management.unload_all_models()
    base = {k: v.detach().clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    try:
        model.patch_model(device_to=model.offload_device, lowvram_model_memory=1)  # nothing fits: all on lowvram
        assert model.model.model_lowvram and model.model.lowvram_patch_counter > 0
        state = sd15.model.diffusion_model.state_dict()
        assert all(torch.equal(base[k], state[k]) for k in base), "lowvram keeps the stored weights unpatched"
        with torch.inference_mode():
            partial = model.model.apply_model(x, sigma, c_crossattn=cond[0][0], transformer_options=dict(to)).float()
    finally:
        model.unpatch_model(device_to=model.offload_device)
    torch.testing.assert_close(partial, full, rtol=0, atol=tol.model_tol(sd15, partial, full))
    assert tol.differs(full, forward(sd15, x, sigma, cond))
    after = sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    restore(sd15)


def test_unpatch_restores_weights_exactly_and_input_model_is_unchanged(nodes, sd15, tiny_rcn):
    restore(sd15)
    before_state = {k: v.clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    before = model_snapshot(sd15)
    patched = apply(nodes, sd15, tiny_rcn, hint(3), 1.0)
    assert_same_snapshot(before, model_snapshot(sd15))
    assert len(patched.patches) == len(tiny_rcn.weights.modal) and not sd15.patches
    import comfy.model_management

    comfy.model_management.load_models_gpu([patched])
    key = "input_blocks.1.0.in_layers.2.weight"
    assert not torch.equal(sd15.model.diffusion_model.state_dict()[key], before_state[key])
    patched.unpatch_model()
    after = sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    restore(sd15)
    assert_same_snapshot(before, model_snapshot(sd15))


def test_adapter_runs_once_per_sampling_run_with_batches(nodes, R, sd15, tiny, tiny_rcn):
    import comfy.sample

    def sample(model, latent_batch):
        noise = torch.randn(latent_batch, 4, 16, 16, generator=torch.Generator().manual_seed(5))
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", tiny.sd15_cond(5),
                                       tiny.sd15_cond(6), torch.zeros_like(noise), disable_pbar=True, seed=5)

    patched, patch = R.apply_repcontrolnet(sd15, tiny_rcn, hint(5), 1.0)
    out = sample(patched, 2)
    assert torch.isfinite(out).all()
    assert patch.runs == 1, "one adapter evaluation per sampling run (cfg: cond + uncond, 2 steps)"
    assert not patch.cache, "the per-run cache is released when the run ends"
    sample(patched, 2)
    assert patch.runs == 2
    # condition batch 2 drives latent 0 and 1 differently: identical to running them one by one
    two = hint(6, batch=2)
    patched, patch = R.apply_repcontrolnet(sd15, tiny_rcn, two, 1.0)
    both = sample(patched, 2)
    assert patch.runs == 1
    first = sample(R.apply_repcontrolnet(sd15, tiny_rcn, two[:1], 1.0)[0], 2)
    # batched vs alone: the same sums in another order, over 2 steps x (cond, uncond) model calls
    bound = tol.model_tol(sd15, both, first, calls=4)
    torch.testing.assert_close(both[:1], first[:1], rtol=0, atol=bound)
    assert tol.differs(both[1:], first[1:])
    bad, _ = R.apply_repcontrolnet(sd15, tiny_rcn, hint(7, batch=3), 1.0)
    with pytest.raises(ValueError, match=r"MagicPortrait_ApplyRepControlNet.*'image'.*multiple"):
        sample(bad, 2)
    restore(sd15)


# ------------------------------------------------------------------------------------------------------ bad input


def test_wrong_family_missing_keys_and_bad_inputs_are_refused(nodes, R, core, sd15, sdxl, tiny, tiny_rcn):
    def refused(match, **change):
        args = {"model": sd15, "repcontrolnet": tiny_rcn, "image": hint(8), "strength": 1.0,
                "merge_weights": True, **change}
        with pytest.raises(WorkflowError, match=match):
            run_in_graph(nodes[APPLY], **args)

    refused(r"\[MagicPortrait_ApplyRepControlNet\] input 'repcontrolnet'.*made for sd15 but the MODEL is sdxl",
            model=sdxl)
    other = tiny.build_sd15_model(seed=1, full_blocks=False)  # other key layout
    weights = tiny.make_tiny_repcontrolnet(other, seed=1)
    refused(r"input 'repcontrolnet'.*not in the MODEL's UNet", repcontrolnet=R.LoadedRepControlNet(weights, "x"))
    wide_model = tiny.build_sd15_model(seed=1, model_channels=sd15.model.diffusion_model.model_channels + 32)
    wide = tiny.make_tiny_repcontrolnet(wide_model, seed=1)
    refused(r"input 'repcontrolnet'.*shape mismatch", repcontrolnet=R.LoadedRepControlNet(wide, "wide"))
    refused(r"input 'repcontrolnet'.*expected a MAGIC_REPCONTROLNET", repcontrolnet="not a file")
    refused(r"input 'image'.*IMAGE", image=torch.zeros(4, 4))
    refused(r"input 'image'.*channels", image=torch.zeros(1, 64, 64, 2))
    refused(r"input 'image'.*empty", image=torch.zeros(0, 64, 64, 3))
    refused(r"smaller than min of 0\.0: strength", strength=-1.0)  # the schema's bound, enforced by validation


def test_loader_lists_the_folder_and_refuses_bad_files(nodes, R, core, sd15, tiny, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, R.FOLDER, ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop(R.FOLDER, None)
    core.save_repcontrolnet(tmp_path / "good.safetensors", tiny.make_tiny_repcontrolnet(sd15, seed=9))
    from safetensors.torch import save_file

    save_file({"zero_convs.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "controlnet.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    try:
        assert "good.safetensors" in folder_paths.get_filename_list(R.FOLDER)
        out = run_in_graph(nodes[LOAD], repcontrolnet_name="good.safetensors")
        assert out.result[0].weights.model_family == "sd15" and "layers" in out.ui["text"][0]
        for name, match in (("controlnet.safetensors", "ControlNet, LoRA or checkpoint"),
                            ("garbage.safetensors", "not a readable")):
            with pytest.raises(WorkflowError, match=rf"\[{LOAD}\] input 'repcontrolnet_name'.*{match}"):
                run_in_graph(nodes[LOAD], repcontrolnet_name=name)
        # names the folder does not list are refused by validation; a file removed after listing, or a name given
        # from Python, still gets the node's own message
        with pytest.raises(WorkflowError, match="not in list"):
            run_in_graph(nodes[LOAD], repcontrolnet_name="absent.safetensors")
        for name, match in (("absent.safetensors", "not found"), ("model.ckpt", "safetensors")):
            with pytest.raises(ValueError, match=rf"\[{LOAD}\] input 'repcontrolnet_name'.*{match}"):
                run_node(nodes[LOAD], repcontrolnet_name=name)
    finally:
        folder_paths.filename_list_cache.pop(R.FOLDER, None)


def test_model_folder_is_registered(R):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths[R.FOLDER]
    assert any(p.endswith("magic_repcontrolnet") for p in paths) and ".safetensors" in exts
    R.register_folder()  # idempotent
    assert folder_paths.folder_names_and_paths[R.FOLDER][0] == paths


# ------------------------------------------------------------------------------------------------------- training


def _write_pairs(folder: Path, count: int, size: int = 128) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "conditions").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        cond = (torch.rand(size // 16, size // 16, 3, generator=g) > 0.5).float()
        cond = cond.repeat_interleave(16, 0).repeat_interleave(16, 1)
        image = 0.2 + 0.6 * cond.flip(-1)  # the image is a function of the condition
        for sub, t in (("conditions", cond), ("images", image)):
            Image.fromarray((t.numpy() * 255).astype("uint8")).save(folder / sub / f"pair{i}.png")


class _StubVAE:
    """A fixed linear 'VAE' (8x8 pixel patches -> 4 channels): training needs only encode()."""

    def __init__(self):
        self.proj = torch.randn(4, 3 * 64, generator=torch.Generator().manual_seed(1)) / 8.0

    def encode(self, image):
        x = torch.nn.functional.pixel_unshuffle(image.permute(0, 3, 1, 2), 8)
        return torch.einsum("oc,bchw->bohw", self.proj, x)


@pytest.fixture
def input_dir(comfy, tmp_path):
    """ComfyUI's input folder set to a fresh folder for one test (restored afterwards)."""
    import folder_paths

    saved = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(saved)


@pytest.fixture
def models_dir(R, tmp_path, monkeypatch):
    """models/magic_repcontrolnet pointed at a fresh folder for one test."""
    import folder_paths

    models = tmp_path / "models" / R.FOLDER
    models.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, R.FOLDER, ([str(models)], {".safetensors"}))
    return models


def train_args(tiny, model=None, **change):
    model = model if model is not None else tiny.build_sd15_model(seed=12, full_blocks=False, model_channels=64)
    return {**dict(model=model, vae=_StubVAE(), positive=tiny.sd15_cond(12), dataset_folder="data", name="trained",
                   steps=1, learning_rate=3e-3, batch_size=2, resolution=64, layers="encoder_convs", alpha=0.5,
                   beta=0.5, adapter_channels=16, condition_type="blocks", seed=0, checkpoint_every=0, resume=False),
            **change}


def test_training_lowers_the_loss_saves_and_resumes(nodes, R, core, pack, tiny, input_dir, models_dir):
    models = models_dir
    model = tiny.build_sd15_model(seed=12, full_blocks=False, model_channels=64)
    _write_pairs(input_dir / "data", 2, size=64)
    cond = tiny.sd15_cond(12)
    before = model_snapshot(model)
    args = dict(model=model, vae=_StubVAE(), positive=cond, dataset_folder="data", name="trained",
                steps=12, learning_rate=3e-3, batch_size=2, resolution=64, layers="encoder_convs", alpha=0.5,
                beta=0.5, adapter_channels=16, condition_type="blocks", seed=0, checkpoint_every=6, resume=True)
    out = run_node(nodes[TRAIN], **args)
    loaded, loss_map = out.result
    assert len(loss_map["loss"]) == 12 and "fresh" in out.ui.as_dict()["text"][0]
    assert (models / "trained.safetensors").is_file()
    log = (models / "trained_training" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 13))
    assert_same_snapshot(before, model_snapshot(model))

    # the loss on fixed (noise, sigma) draws is lower with the trained weights than with the base model
    pairs = R.find_pairs(input_dir / "data")
    with torch.inference_mode(False), torch.enable_grad():
        forward_fn = R.make_unet_forward(model)
        latents = torch.cat([model.get_model_object("latent_format").process_in(
            _StubVAE().encode(R._load_image(p, 64))) for p, _ in pairs])
        conds = torch.cat([core.image_bhwc_to_bchw(R._load_image(c, 64)) for _, c in pairs])
        context = R._context_from(model, cond, 2, (8, 8), "cpu")
        unet = model.model.diffusion_model.state_dict()

        def eval_loss(weights):
            adapter = weights.build_adapter()
            params = merged_state(weights, unet)
            g = torch.Generator().manual_seed(99)
            total = 0.0
            with torch.no_grad():
                for sigma in (0.5, 2.0, 6.0):
                    noise = torch.randn(latents.shape, generator=g)
                    s = torch.full((2,), sigma)
                    x = latents + sigma * noise
                    d = forward_fn(params, x, s, context, adapter(conds, latent_hw=(8, 8)))
                    total += float((((x - d) / sigma - noise) ** 2).mean())
            return total

        initial = core.init_weights_from_base(unet, loaded.weights.layers, adapter_config=loaded.weights.adapter_config)
        trained_loss, initial_loss = eval_loss(loaded.weights), eval_loss(initial)
        print(f"eval loss: initial {initial_loss:.4f}, trained {trained_loss:.4f}")
        assert trained_loss < 0.9 * initial_loss

    args["steps"] = 15
    again = run_node(nodes[TRAIN], **args)
    assert len(again.result[1]["loss"]) == 15 and "resumed" in again.ui.as_dict()["text"][0]
    assert again.result[1]["loss"][:12] == loss_map["loss"]
    assert core.load_repcontrolnet(models / "trained.safetensors").metadata["training_step"] == "15"
    with pytest.raises(ValueError, match=rf"\[{TRAIN}\] input 'dataset_folder'.*no \(image, condition\) pairs"):
        run_node(nodes[TRAIN], **{**args, "dataset_folder": "."})


def test_dataset_folder_stays_inside_the_input_folder_unless_the_server_opts_in(nodes, pack, tiny, input_dir, models_dir,
                                                                                tmp_path, monkeypatch):
    """On a shared server anyone who can queue a prompt sets dataset_folder and name: neither may reach outside
    ComfyUI's input folder / models/magic_repcontrolnet, unless the server sets the documented opt-in."""
    outside = tmp_path / "outside"
    _write_pairs(outside, 2, size=64)
    _write_pairs(input_dir / "data", 2, size=64)
    (input_dir / "linked").symlink_to(outside, target_is_directory=True)  # placed by whoever runs the server
    model = tiny.build_sd15_model(seed=12, full_blocks=False, model_channels=64)
    monkeypatch.delenv(pack.nodes.input_folders.ALLOW_ABSOLUTE_DATASET_ENV, raising=False)
    for value, match in ((str(outside), r"absolute path.*MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1"),
                         ("~/outside", "absolute path"), ("../outside", "contains '..'"),
                         ("data/../../outside", "contains '..'"), ("..\\outside", "contains '..'"),
                         ("  ", "is empty"), ("absent", "is not a folder.*magic_portrait_repcontrolnet_dataset")):
        with pytest.raises(ValueError, match=rf"\[{TRAIN}\] input 'dataset_folder': .*{match}"):
            run_node(nodes[TRAIN], **train_args(tiny, model, dataset_folder=value))
    for name in ("../escape", "sub/escape", "..\\escape", ".hidden", "", "C:escape"):
        with pytest.raises(ValueError, match=rf"\[{TRAIN}\] input 'name': .*not a plain file name"):
            run_node(nodes[TRAIN], **train_args(tiny, model, name=name))
    assert not list(tmp_path.rglob("*escape*")) and not list(models_dir.iterdir()), "nothing written"

    run_node(nodes[TRAIN], **train_args(tiny, model, dataset_folder="linked", name="linked.safetensors"))
    assert (models_dir / "linked.safetensors").is_file()
    monkeypatch.setenv(pack.nodes.input_folders.ALLOW_ABSOLUTE_DATASET_ENV, "1")
    out = run_node(nodes[TRAIN], **train_args(tiny, model, dataset_folder=str(outside), name="absolute"))
    assert (models_dir / "absolute.safetensors").is_file() and "trained 2 pairs" in out.ui.as_dict()["text"][0]


def test_bundled_training_set_reaches_the_input_folder_without_overwriting(pack, R, nodes, tmp_path):
    """The pack copies its small training set into the input folder on load, where the training example and a
    freshly added Train node (its default dataset_folder) find it; a file already there is never replaced."""
    install = pack.nodes.example_inputs.install_example_inputs
    shipped = REPO / "example_workflows" / R.BUNDLED_DATASET
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 512 * 1024, "a few hundred KB at most"
    assert tmp_path / R.BUNDLED_DATASET in install(tmp_path)
    pairs = R.find_pairs(tmp_path / R.BUNDLED_DATASET)
    assert len(pairs) >= 4
    for image_path, condition_path in pairs:
        image, condition = R._load_image(image_path, 64), R._load_image(condition_path, 64)
        assert image.shape == condition.shape == (1, 64, 64, 3)
        assert tol.differs(image, condition)
    schema = {i.id: i for i in nodes[TRAIN].define_schema().inputs}
    assert schema["dataset_folder"].default == R.BUNDLED_DATASET
    example = json.loads((REPO / "example_workflows" / "repcontrolnet_train.json").read_text())
    train_node = next(n for n in example["nodes"] if n["type"] == TRAIN)
    assert R.BUNDLED_DATASET in train_node["widgets_values"]
    note = " ".join(str(v) for n in example["nodes"] if n["type"] == "Note" for v in n["widgets_values"])
    assert R.BUNDLED_DATASET in note and "your own" in note

    own = tmp_path / R.BUNDLED_DATASET / pairs[0][0].name
    own.write_bytes(b"the user's own file")
    (tmp_path / R.BUNDLED_DATASET / pairs[1][1].name).unlink()
    assert install(tmp_path) == [tmp_path / R.BUNDLED_DATASET]  # the deleted file comes back ...
    assert own.read_bytes() == b"the user's own file"  # ... an existing one is left alone
    assert install(tmp_path) == []


def test_find_pairs_by_suffix(R, tmp_path):
    from PIL import Image

    for name in ("a.png", "a_condition.png", "b.jpg", "b_cond.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [(p.name, c.name) for p, c in R.find_pairs(tmp_path)] == [("a.png", "a_condition.png"),
                                                                     ("b.jpg", "b_cond.png")]


# ------------------------------------------------------------------------------------- workflow, CheckpointSave


@pytest.fixture(scope="module")
def tiny_files(comfy, R, tiny, tmp_path_factory, tiny_checkpoint):
    from PIL import Image

    root = tmp_path_factory.mktemp("rcn_models")
    ckpt = tiny_checkpoint(root / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors")
    rcn_file = tiny.write_tiny_repcontrolnet(root / "magic_repcontrolnet" / "my_repcontrolnet_canny.safetensors",
                                          ckpt, seed=0)
    inputs_dir = root / "input"
    inputs_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(64, 64, 3, generator=g).numpy() * 255).astype("uint8")).save(
        inputs_dir / "magic_portrait_condition.png")
    yield {"models": root, "checkpoint": Path(ckpt), "rcn": Path(rcn_file), "input": inputs_dir}
    shutil.rmtree(root, ignore_errors=True)


def test_example_workflow_runs_and_merged_checkpoint_round_trips(comfy, nodes, R, core, tiny_files, tmp_path):
    import comfy.sd

    import nodes as comfy_nodes
    from magic_portrait.runner import run_workflow
    from magic_portrait.workflow import ui_to_api

    ui_wf = json.loads((REPO / "example_workflows" / "repcontrolnet_apply.json").read_text())
    prompt = ui_to_api(ui_wf, comfy_nodes.NODE_CLASS_MAPPINGS)
    assert not any(n["class_type"] == "CheckpointSave" for n in prompt.values()), "bypassed in the example"
    by_type = {n["class_type"]: (i, n) for i, n in prompt.items()}
    apply_id = by_type[APPLY][0]
    ckpt_id = by_type["CheckpointLoaderSimple"][0]
    prompt["save_merged"] = {"class_type": "CheckpointSave", "inputs": {
        "model": [apply_id, 0], "clip": [ckpt_id, 1], "vae": [ckpt_id, 2],
        "filename_prefix": "checkpoints/merged"}}
    by_type["KSampler"][1]["inputs"]["steps"] = 2
    by_type["EmptyLatentImage"][1]["inputs"].update(width=128, height=128)
    out_dir = tmp_path / "out"
    import io as _io

    result = run_workflow(prompt, models_dir=tiny_files["models"], input_dir=tiny_files["input"], output_dir=out_dir,
                          log=_io.StringIO(), out=_io.StringIO())
    images = [f for f in result.files if f.suffix == ".png"]
    merged_files = sorted((out_dir / "checkpoints").glob("merged*.safetensors"))
    assert images and len(merged_files) == 1

    # the saved checkpoint loads the way CheckpointLoaderSimple loads it; its UNet is the merged UNet
    base_model = comfy.sd.load_checkpoint_guess_config(str(tiny_files["checkpoint"]), output_vae=False,
                                                       output_clip=False)[0]
    merged_model = comfy.sd.load_checkpoint_guess_config(str(merged_files[0]), output_vae=False,
                                                         output_clip=False)[0]
    weights = core.load_repcontrolnet(tiny_files["rcn"])
    base_state = base_model.model.diffusion_model.state_dict()
    expected = merged_state(weights, base_state)
    saved = merged_model.model.diffusion_model.state_dict()
    for key, value in expected.items():
        # the checkpoint holds the merge rounded once to fp16 (below fp16's normal range: absolute spacing)
        torch.testing.assert_close(saved[key].float(), value.float(), rtol=tol.float_tol(torch.float16, 1),
                                   atol=torch.finfo(torch.float16).tiny)
    untouched = [k for k in base_state if k not in expected]
    assert all(torch.equal(saved[k], base_state[k]) for k in untouched)

    # outputs: the saved checkpoint + adapter only == the base checkpoint + the merge
    loaded = R.LoadedRepControlNet(weights, tiny_files["rcn"].name)
    image = hint(10, size=64)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(10)), {}]]
    x, sigma = inputs(10)
    a = forward(apply(nodes, base_model, loaded, image), x, sigma, cond)
    b = forward(apply(nodes, merged_model, loaded, image, merge_weights=False), x, sigma, cond)
    assert tol.differs(a, forward(base_model, x, sigma, cond))
    # b runs the merged weights as saved (the float32 merge rounded once to fp16, checked above); the same weights
    # set on the base model by ComfyUI's own "set" weight patches, with the same adapter, give b within float32
    # rounding (comparing with the unrounded merge a would need an fp16 bound near 10% of the output: no test)
    as_saved = base_model.clone()
    as_saved.add_patches({UNET + key: ("set", (saved[key],)) for key in expected}, 1.0)
    c = forward(apply(nodes, as_saved, loaded, image, merge_weights=False), x, sigma, cond)
    torch.testing.assert_close(b, c, rtol=0, atol=tol.model_tol(base_model, b, c))
