"""ComfyUI tier: Apply Landmark ControlNet. Region-masked residuals (checked on the residuals, at every resolution,
odd aspect ratios), strength 0 is bit-identical to no control, chaining with core ControlNets in either order, clear
errors; graphs run through ComfyUI's prompt validation and executor."""

from __future__ import annotations

import numpy as np
import pytest
import tolerances as tol
import torch
from helpers import comfy_folders, run_in_graph, saved_latent
from PIL import Image

from magic_portrait.comfy_env import WorkflowError

NODE = "MagicPortrait_ApplyLandmarkControlNet"
CKPT = "tiny_sd15.safetensors"
CONTROLNET = "tiny_controlnet_sd15.safetensors"


# ------------------------------------------------------------------------------------------------ object level
@pytest.fixture(scope="module")
def control(tiny):
    return tiny.build_sd15_controlnet(seed=3)


def _apply(nodes, control, image, strength=1.0, mask=None, cond=None, start=0.0, end=1.0):
    cond = cond if cond is not None else [[torch.zeros(1, 77, 768), {}]]
    return run_in_graph(nodes[NODE], positive=cond, negative=cond, control_net=control, image=image, strength=strength,
                    start_percent=start, end_percent=end, mask=mask).result


def _residuals(sd15, control_obj, latent_hw, seed=0, batch=1, batched_number=1):
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    x = torch.randn(batch * batched_number, 4, h, w, generator=g)
    ms = sd15.model.model_sampling
    control_obj.pre_run(sd15.model, lambda p: ms.percent_to_sigma(p))
    try:
        with torch.inference_mode():
            return control_obj.get_control(x, ms.sigma(torch.tensor([500.0] * x.shape[0])),
                                           {"c_crossattn": torch.randn(x.shape[0], 77, 768, generator=g)},
                                           batched_number, {})
    finally:
        control_obj.cleanup()


def _face_mask(height, width, box):
    mask = torch.zeros(1, height, width)
    x0, y0, x1, y1 = box
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


@pytest.mark.parametrize(("width", "height"), [(832, 1216), (640, 384), (200, 328)])
def test_residuals_are_zero_outside_the_mask_at_every_resolution(nodes, sd15, control, width, height):
    from magic_core.regions import center_crop_to_aspect

    hint = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1))
    mask = _face_mask(height, width, (width // 5, height // 7, width // 2, height // 3))
    masked_pos, _ = _apply(nodes, control, hint, mask=mask)
    plain_pos, _ = _apply(nodes, control, hint)
    latent_hw = (height // 8, width // 8)
    masked = _residuals(sd15, masked_pos[0][1]["control"], latent_hw)
    plain = _residuals(sd15, plain_pos[0][1]["control"], latent_hw)
    cut = center_crop_to_aspect(mask, *latent_hw)
    sizes = set()
    for key, outputs in plain.items():
        for p, m in zip(outputs, masked[key], strict=True):
            if p is None:
                assert m is None
                continue
            h, w = p.shape[-2:]
            sizes.add((h, w))
            touched = torch.nn.functional.adaptive_max_pool2d(cut[:, None], (h, w))[0, 0] > 0
            assert m[..., ~touched].eq(0).all(), f"{key} residual at {h}x{w} leaks outside the mask"
            assert m[..., touched].abs().max() > 0
            inside = torch.nn.functional.adaptive_avg_pool2d(cut[:, None], (h, w))[0, 0] == 1
            torch.testing.assert_close(m[..., inside], p[..., inside], rtol=0, atol=0)
    assert len(sizes) >= 4  # every resolution of the control's residuals was checked


def test_mask_batches_follow_the_latent_batch_under_cfg(nodes, sd15, control):
    """Two images, two masks, cond + uncond chunks: each image's residuals follow its own mask."""
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    masks = torch.cat([_face_mask(128, 128, (0, 0, 64, 128)), _face_mask(128, 128, (64, 0, 128, 128))])
    pos, _ = _apply(nodes, control, hint, mask=masks)
    out = _residuals(sd15, pos[0][1]["control"], (16, 16), batch=2, batched_number=2)
    first = out["output"][0]  # rows: chunk 0 image 0, chunk 0 image 1, chunk 1 image 0, chunk 1 image 1
    for row, left_half in ((0, True), (1, False), (2, True), (3, False)):
        kept, dropped = (first[row, :, :, :8], first[row, :, :, 8:]) if left_half else (first[row, :, :, 8:],
                                                                                          first[row, :, :, :8])
        assert dropped.eq(0).all() and kept.abs().max() > 0


def test_strength_zero_returns_the_conditioning_unchanged(nodes, control):
    cond = [[torch.zeros(1, 77, 768), {"marker": 1}]]
    pos, neg = _apply(nodes, control, torch.rand(1, 64, 64, 3), strength=0.0, cond=cond,
                      mask=torch.ones(1, 64, 64))
    assert pos is cond and neg is cond


def test_chains_with_core_controlnets_in_either_order(nodes, sd15, control, tiny):
    from nodes import ControlNetApplyAdvanced

    other = tiny.build_sd15_controlnet(seed=9)
    g = torch.Generator().manual_seed(4)
    hint, core_hint = torch.rand(1, 128, 128, 3, generator=g), torch.rand(1, 128, 128, 3, generator=g)
    mask = _face_mask(128, 128, (32, 32, 96, 96))
    base = [[torch.zeros(1, 77, 768), {}]]

    def core_apply(cond):
        return run_in_graph(ControlNetApplyAdvanced, positive=cond, negative=cond, control_net=other, image=core_hint,
                        strength=0.7, start_percent=0.0, end_percent=1.0).result[0]

    ours_alone = _residuals(sd15, _apply(nodes, control, hint, mask=mask, cond=base)[0][0][1]["control"], (16, 16))
    core_alone = _residuals(sd15, core_apply(base)[0][1]["control"], (16, 16))
    ours_then_core = core_apply(_apply(nodes, control, hint, mask=mask, cond=base)[0])
    core_then_ours = _apply(nodes, control, hint, mask=mask, cond=core_apply(base))[0]
    for chained in (ours_then_core, core_then_ours):
        both = _residuals(sd15, chained[0][1]["control"], (16, 16))
        for key in both:
            for b, o, c in zip(both[key], ours_alone[key], core_alone[key], strict=True):
                ops = tol.reduction_ops(control.control_model) + tol.reduction_ops(other.control_model)
                torch.testing.assert_close(b, o + c, rtol=0, atol=tol.float_tol(torch.float32, ops, tol.magnitude(o, c)))


def test_bad_masks_are_refused_naming_node_and_input(nodes, control):
    with pytest.raises(WorkflowError, match=rf"\[{NODE}\] input 'mask'.*aspect"):
        _apply(nodes, control, torch.rand(1, 64, 96, 3), mask=torch.ones(1, 64, 64))
    with pytest.raises(WorkflowError, match=rf"\[{NODE}\] input 'start_percent'"):
        _apply(nodes, control, torch.rand(1, 64, 64, 3), start=0.8, end=0.2)


def test_input_conditioning_is_not_mutated(nodes, control):
    cond = [[torch.zeros(1, 77, 768), {"keep": True}]]
    _apply(nodes, control, torch.rand(1, 64, 64, 3), mask=torch.ones(1, 64, 64), cond=cond)
    assert cond[0][1] == {"keep": True}


# ------------------------------------------------------------------------------------------------ executor
@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    root = tmp_path_factory.mktemp("landmark_control")
    tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    tiny_controlnet_file(root / "models" / "controlnet" / CONTROLNET)
    with comfy_folders(root):
        rng = np.random.default_rng(5)
        Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(root / "input" / "cond.png")
        region = np.zeros((96, 160, 3), dtype=np.uint8)
        region[16:64, 40:100] = 255
        Image.fromarray(region).save(root / "input" / "region.png")
        Image.fromarray(np.zeros((96, 160, 3), dtype=np.uint8)).save(root / "input" / "empty.png")
        yield root


def _graph(*, ours=None, core=None, order="ours_first", mask_file="region.png"):
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a portrait photo"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
        "hint": {"class_type": "LoadImage", "inputs": {"image": "cond.png"}},
        "region": {"class_type": "LoadImageMask", "inputs": {"image": mask_file, "channel": "red"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 160, "height": 96, "batch_size": 1}},
    }
    cond = (["pos", 0], ["neg", 0])
    steps = [("ours", ours), ("core", core)] if order == "ours_first" else [("core", core), ("ours", ours)]
    for name, settings in steps:
        if settings is None:
            continue
        inputs = {"positive": cond[0], "negative": cond[1], "control_net": ["cn", 0], "image": ["hint", 0],
                  "start_percent": 0.0, "end_percent": 1.0, **settings}
        if name == "ours":
            if inputs.pop("masked", True):
                inputs["mask"] = ["region", 0]
            prompt["ours"] = {"class_type": NODE, "inputs": inputs}
        else:
            prompt["core"] = {"class_type": "ControlNetApplyAdvanced", "inputs": inputs}
        cond = ([name, 0], [name, 1])
    prompt["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": cond[0], "negative": cond[1], "latent_image": ["latent", 0], "seed": 3,
        "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "lc"}}
    return prompt


def _run(comfy, workdir, prompt) -> torch.Tensor:
    return saved_latent(workdir, comfy.run_prompt(prompt))


def test_through_the_executor_strength_zero_and_empty_mask_equal_no_control(comfy, workdir):
    plain = _run(comfy, workdir, _graph())
    controlled = _run(comfy, workdir, _graph(ours={"strength": 1.0}))
    assert tol.differs(controlled, plain)
    assert torch.equal(_run(comfy, workdir, _graph(ours={"strength": 0.0})), plain)
    assert torch.equal(_run(comfy, workdir, _graph(ours={"strength": 1.0}, mask_file="empty.png")), plain)
    unmasked = _run(comfy, workdir, _graph(ours={"strength": 1.0, "masked": False}))
    assert tol.differs(unmasked, controlled)


def test_through_the_executor_core_controlnet_before_or_after_still_applies(comfy, workdir):
    ours = {"strength": 1.0}
    core = {"strength": 0.8}
    only_ours = _run(comfy, workdir, _graph(ours=ours))
    only_core = _run(comfy, workdir, _graph(core=core))
    for order in ("ours_first", "core_first"):
        both = _run(comfy, workdir, _graph(ours=ours, core=core, order=order))
        assert tol.differs(both, only_ours) and tol.differs(both, only_core)
    first = _run(comfy, workdir, _graph(ours=ours, core=core, order="ours_first"))
    second = _run(comfy, workdir, _graph(ours=ours, core=core, order="core_first"))
    # residuals add up in either order: 2 steps x (cond + uncond) calls of UNet and both ControlNets
    models = workdir / "models"
    ops = (tol.checkpoint_ops(models / "checkpoints" / CKPT)
           + 2 * tol.checkpoint_ops(models / "controlnet" / CONTROLNET, prefix=""))
    torch.testing.assert_close(first, second, rtol=0, atol=tol.sampling_tol(torch.float32, ops, tol.magnitude(first), 4))


def test_through_the_executor_a_mask_of_another_aspect_is_refused(comfy, workdir):

    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(workdir / "input" / "square.png")
    with pytest.raises(WorkflowError, match=r"input 'mask'.*aspect"):
        comfy.run_prompt(_graph(ours={"strength": 1.0}, mask_file="square.png"))
