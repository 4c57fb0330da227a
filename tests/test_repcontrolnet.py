"""ComfyUI tier: RepControlNet nodes on tiny random SD1.5/SDXL-architecture models.

merged == unmerged, strength/beta 0 == base, unpatch is bit-exact, a merged checkpoint saved by CheckpointSave loads
through CheckpointLoaderSimple and matches, training lowers the loss (and resumes), the input MODEL is untouched, bad
input is refused with the node and input named, the example workflow runs through ComfyUI's executor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_same_snapshot, model_snapshot, run_node

REPO = Path(__file__).resolve().parent.parent
APPLY = "MagicPortrait_ApplyRepControlNet"
LOAD = "MagicPortrait_LoadRepControlNet"
TRAIN = "MagicPortrait_TrainRepControlNet"


@pytest.fixture(scope="module")
def R(pack):
    return pack.nodes.repcontrolnet


@pytest.fixture(scope="module")
def core(pack):
    return pack.magic_core.repcontrolnet


@pytest.fixture(scope="module")
def tiny_rcn(R, core, sd15):
    return R.LoadedRepControlNet(core.make_tiny_repcontrolnet(sd15, seed=3), "tiny_sd15.safetensors")


def hint(seed=0, batch=1, size=128):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def apply(nodes, model, loaded, image, strength=1.0, merge_weights=True):
    return run_node(nodes[APPLY], model=model, repcontrolnet=loaded, image=image, strength=strength,
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


# ------------------------------------------------------------------------------------------------- merge invariants


def test_merged_equals_unmerged(nodes, R, core, sd15, tiny, tiny_rcn):
    cond, image = tiny.sd15_cond(1), hint(1)
    x, sigma = inputs(1)
    for strength in (1.0, 0.6):
        merged_model = apply(nodes, sd15, tiny_rcn, image, strength)
        merged = forward(merged_model, x, sigma, cond)
        # unmerged reference: the unpatched UNet with forward hooks, the same adapter features
        features = R.AdapterFeatures(tiny_rcn.weights, R.condition_tensor("t", image), strength, "t")
        restore(sd15)
        with core.unmerged_forward(sd15.model.diffusion_model, tiny_rcn.weights, strength):
            unmerged = forward(sd15, x, sigma, cond, {"patches": {"input_block_patch": [features]}})
        base = forward(sd15, x, sigma, cond)
        assert (merged - base).abs().max() > 1e-2, "the RepControlNet must change the output"
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_strength_zero_and_beta_zero_give_the_base_model(nodes, R, core, sd15, tiny, tiny_rcn):
    cond, image = tiny.sd15_cond(2), hint(2)
    x, sigma = inputs(2)
    base = forward(sd15, x, sigma, cond)
    assert torch.equal(forward(apply(nodes, sd15, tiny_rcn, image, 0.0), x, sigma, cond), base)
    # a file with alpha 1, beta 0 and an untrained (zero-output) adapter is the base model, bit for bit
    zero = core.make_tiny_repcontrolnet(sd15, seed=4, alpha=1.0, beta=0.5)
    zero.beta = 0.0
    zero.adapter_state = {k: (torch.zeros_like(v) if k.startswith("conv_out.") else v)
                          for k, v in zero.adapter_state.items()}
    patched = apply(nodes, sd15, R.LoadedRepControlNet(zero, "beta0"), image, 1.0)
    assert torch.equal(forward(patched, x, sigma, cond), base)
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
    torch.testing.assert_close(both[:1], first[:1], rtol=2e-3, atol=2e-3)
    assert not torch.allclose(both[1:], first[1:], atol=1e-3)
    bad, _ = R.apply_repcontrolnet(sd15, tiny_rcn, hint(7, batch=3), 1.0)
    with pytest.raises(ValueError, match=r"MagicPortrait_ApplyRepControlNet.*'image'.*multiple"):
        sample(bad, 2)
    restore(sd15)


# ------------------------------------------------------------------------------------------------------ bad input


def test_wrong_family_missing_keys_and_bad_inputs_are_refused(nodes, R, core, sd15, sdxl, tiny, tiny_rcn):
    def refused(match, **change):
        args = {"model": sd15, "repcontrolnet": tiny_rcn, "image": hint(8), "strength": 1.0,
                "merge_weights": True, **change}
        with pytest.raises(ValueError, match=match):
            run_node(nodes[APPLY], **args)

    refused(r"\[MagicPortrait_ApplyRepControlNet\] input 'repcontrolnet'.*made for sd15 but the MODEL is sdxl",
            model=sdxl)
    other = tiny.build_sd15_model(seed=1, full_blocks=False)  # other key layout
    weights = core.make_tiny_repcontrolnet(other, seed=1)
    refused(r"input 'repcontrolnet'.*not in the MODEL's UNet", repcontrolnet=R.LoadedRepControlNet(weights, "x"))
    wide = core.make_tiny_repcontrolnet(tiny.build_sd15_model(seed=1, model_channels=sd15.model.diffusion_model.model_channels + 32), seed=1)
    refused(r"input 'repcontrolnet'.*shape mismatch", repcontrolnet=R.LoadedRepControlNet(wide, "wide"))
    refused(r"input 'repcontrolnet'.*expected a MAGIC_REPCONTROLNET", repcontrolnet="not a file")
    refused(r"input 'image'.*IMAGE", image=torch.zeros(4, 4))
    refused(r"input 'image'.*channels", image=torch.zeros(1, 64, 64, 2))
    refused(r"input 'image'.*empty", image=torch.zeros(0, 64, 64, 3))
    refused(r"input 'strength'", strength=-1.0)


def test_loader_lists_the_folder_and_refuses_bad_files(nodes, R, core, sd15, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, R.FOLDER, ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop(R.FOLDER, None)
    core.save_repcontrolnet(tmp_path / "good.safetensors", core.make_tiny_repcontrolnet(sd15, seed=9))
    from safetensors.torch import save_file

    save_file({"zero_convs.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "controlnet.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    try:
        assert "good.safetensors" in folder_paths.get_filename_list(R.FOLDER)
        out = run_node(nodes[LOAD], repcontrolnet_name="good.safetensors")
        assert out.result[0].weights.model_family == "sd15" and "layers" in out.ui.as_dict()["text"][0]
        for name, match in (("controlnet.safetensors", "ControlNet, LoRA or checkpoint"),
                            ("garbage.safetensors", "not a readable"), ("absent.safetensors", "not found"),
                            ("model.ckpt", "safetensors")):
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


def test_training_lowers_the_loss_saves_and_resumes(nodes, R, core, pack, tiny, tmp_path, monkeypatch):
    import folder_paths

    model = tiny.build_sd15_model(seed=12, full_blocks=False, model_channels=64)
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, R.FOLDER, ([str(models)], {".safetensors"}))
    _write_pairs(tmp_path / "data", 2, size=64)
    cond = tiny.sd15_cond(12)
    before = model_snapshot(model)
    args = dict(model=model, vae=_StubVAE(), positive=cond, dataset_folder=str(tmp_path / "data"), name="trained",
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
    pairs = R.find_pairs(tmp_path / "data")
    with torch.inference_mode(False), torch.enable_grad():
        forward_fn = R.make_unet_forward(model)
        latents = torch.cat([model.get_model_object("latent_format").process_in(
            _StubVAE().encode(R._load_image(p, 64))) for p, _ in pairs])
        conds = torch.cat([core.image_bhwc_to_bchw(R._load_image(c, 64)) for _, c in pairs])
        context = R._context_from(model, cond, 2, (8, 8), "cpu")
        unet = model.model.diffusion_model.state_dict()

        def eval_loss(weights):
            adapter = weights.build_adapter()
            params = core.merged_state(weights, unet)
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
        run_node(nodes[TRAIN], **{**args, "dataset_folder": str(tmp_path)})


def test_find_pairs_by_suffix(R, tmp_path):
    from PIL import Image

    for name in ("a.png", "a_condition.png", "b.jpg", "b_cond.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [(p.name, c.name) for p, c in R.find_pairs(tmp_path)] == [("a.png", "a_condition.png"),
                                                                     ("b.jpg", "b_cond.png")]


# ------------------------------------------------------------------------------------- workflow, CheckpointSave


@pytest.fixture(scope="module")
def tiny_files(comfy, R, tmp_path_factory, tiny_checkpoint):
    from PIL import Image

    root = tmp_path_factory.mktemp("rcn_models")
    ckpt = tiny_checkpoint(root / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors")
    rcn_file = R.write_tiny_repcontrolnet(root / "magic_repcontrolnet" / "repcontrolnet_landmarks_sd15.safetensors",
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
    expected = core.merged_state(weights, base_state)
    saved = merged_model.model.diffusion_model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(saved[key].float(), value.float(), rtol=2e-3, atol=2e-3)
    untouched = [k for k in base_state if k not in expected]
    assert all(torch.equal(saved[k], base_state[k]) for k in untouched)

    # outputs: the saved checkpoint + adapter only == the base checkpoint + the merge
    loaded = R.LoadedRepControlNet(weights, tiny_files["rcn"].name)
    image = hint(10, size=64)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(10)), {}]]
    x, sigma = inputs(10)
    a = forward(apply(nodes, base_model, loaded, image), x, sigma, cond)
    b = forward(apply(nodes, merged_model, loaded, image, merge_weights=False), x, sigma, cond)
    assert (a - forward(base_model, x, sigma, cond)).abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
