"""ComfyUI tier: MagicID's face nodes and identities in graphs run through ComfyUI's prompt validation and executor,
beside ComfyUI's own nodes (LoadImage, CheckpointLoaderSimple, ControlNetLoader, KSampler, SaveImage, ...), on real
photos (skimage's astronaut and LFW faces) with the offline dlib back-end and insightface's own code on a tiny
stand-in pack; a plain prompt after a patched one is bit-identical to running it alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tolerances as tol
import torch
from helpers import (
    MAGICID_CKPT,
    MAGICID_CONTROLNET,
    add_identity_inputs,
    comfy_folders,
    detect_nodes,
    faceid_embeds_nodes,
    run_node,
    saved_latent,
    text_to_image_nodes,
    write_magicid_models,
)
from PIL import Image
from skimage import data as skimage_data

from magic_portrait.tiny_insightface import write_tiny_insightface_pack

CKPT, CONTROLNET = MAGICID_CKPT, MAGICID_CONTROLNET
P = "MagicPortrait_"
LFW_PEOPLE = (0, 20)


def _lfw(index: int) -> np.ndarray:
    grey = (skimage_data.lfw_subset()[index] * 255).round().astype(np.uint8)
    return np.repeat(cv2.resize(grey, (200, 200), interpolation=cv2.INTER_CUBIC)[..., None], 3, axis=2)


def _three_people() -> np.ndarray:
    tiles = [np.ascontiguousarray(skimage_data.astronaut()[0:300, 100:350]), _lfw(LFW_PEOPLE[0]), _lfw(LFW_PEOPLE[1])]
    canvas = np.full((300, sum(t.shape[1] for t in tiles) + 24 * 4, 3), 128, np.uint8)
    x = 24
    for t in tiles:
        y = (300 - t.shape[0]) // 2
        canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
        x += t.shape[1] + 24
    return canvas


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    root = tmp_path_factory.mktemp("magicid_graphs")
    models = root / "models"
    write_magicid_models(models, tiny_checkpoint, tiny_controlnet_file, seed=7)
    nested = write_tiny_insightface_pack(models / "insightface" / "models" / "buffalo_l" / "buffalo_l", seed=0,
                                         layout="buffalo_l")
    assert nested.is_dir()
    with comfy_folders(root):
        Image.fromarray(skimage_data.astronaut()).save(root / "input" / "astronaut.png")
        Image.fromarray(_three_people()).save(root / "input" / "three.png")
        Image.fromarray(np.full((200, 320, 3), 90, np.uint8)).save(root / "input" / "flat.png")
        yield root


def _image_file(workdir, info) -> np.ndarray:
    return np.asarray(Image.open(workdir / "output" / info.get("subfolder", "") / info["filename"]))


def _faces_graph(image="astronaut.png", backend="offline (dlib: no download)", pack="antelopev2", if_no_face="error",
                 shape="ellipse", style="openpose_face"):
    return {
        "load": {"class_type": "LoadImage", "inputs": {"image": image}},
        "analysis": {"class_type": P + "FaceAnalysisLoader", "inputs": {
            "backend": backend, "insightface_pack": pack, "providers": "cpu", "dlib_detector": "hog"}},
        "detect": {"class_type": P + "DetectFaces", "inputs": {
            "face_analysis": ["analysis", 0], "image": ["load", 0], "det_size": 640, "score_threshold": 0.5,
            "min_size": 0, "max_faces": 0, "retry_smaller": True, "if_no_face": if_no_face}},
        "masks": {"class_type": P + "FaceMasks", "inputs": {
            "faces": ["detect", 0], "shape": shape, "grow": 0, "feather": 0.0, "face_indices": "all"}},
        "draw": {"class_type": P + "DrawFaceCondition", "inputs": {
            "faces": ["detect", 0], "style": style, "width": 0, "height": 0, "face_indices": "all", "thickness": 2,
            "pose_json": ""}},
        "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["masks", 0]}},
        "save_masks": {"class_type": "SaveImage", "inputs": {"images": ["mask_image", 0], "filename_prefix": "m"}},
        "save_draw": {"class_type": "SaveImage", "inputs": {"images": ["draw", 0], "filename_prefix": "d"}},
        "save_preview": {"class_type": "SaveImage", "inputs": {"images": ["detect", 1], "filename_prefix": "p"}},
    }


def test_astronaut_detect_masks_and_condition_through_the_executor(comfy, workdir):
    out = comfy.run_prompt(_faces_graph())
    assert "image 0: 1 face(s)" in out["detect"]["text"][0]
    (mask,) = [_image_file(workdir, i) for i in out["save_masks"]["images"]]
    (drawn,) = [_image_file(workdir, i) for i in out["save_draw"]["images"]]
    assert mask.shape[:2] == drawn.shape[:2] == (512, 512)
    ys, xs = np.nonzero(mask[..., 0] > 127)
    assert 150 < xs.mean() < 300 and 50 < ys.mean() < 200  # the astronaut's face, upper middle
    dots = np.nonzero(drawn.max(axis=2) > 200)
    assert len(dots[0]) > 68 and mask[dots[0], dots[1], 0].mean() > 100  # landmark dots lie on the face mask


def test_three_people_are_three_disjoint_masks_left_to_right(comfy, workdir):
    out = comfy.run_prompt(_faces_graph(image="three.png", shape="box"))
    assert "image 0: 3 face(s)" in out["detect"]["text"][0]
    masks = [_image_file(workdir, i)[..., 0] > 127 for i in out["save_masks"]["images"]]
    if len(masks) == 1:  # SaveImage writes a batch as several files; guard against a format change
        pytest.fail("expected one mask image per face")
    assert len(masks) == 3
    centres = [np.nonzero(m)[1].mean() for m in masks]
    assert centres == sorted(centres)
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any() and not (masks[0] & masks[2]).any()


def test_no_face_is_an_error_naming_the_node_or_an_empty_result(comfy, workdir):
    from magic_portrait.comfy_env import WorkflowError

    with pytest.raises(WorkflowError, match=r"MagicPortrait_DetectFaces.*input 'image'.*no face found in image 0"):
        comfy.run_prompt(_faces_graph(image="flat.png"))
    out = comfy.run_prompt(_faces_graph(image="flat.png", if_no_face="empty result"))
    assert "image 0: 0 face(s)" in out["detect"]["text"][0]
    (mask,) = [_image_file(workdir, i) for i in out["save_masks"]["images"]]
    assert mask.max() == 0


def test_grayscale_rgba_and_odd_sizes_give_the_same_face(nodes, comfy, workdir):
    analysis = run_node(nodes[P + "FaceAnalysisLoader"], backend="offline (dlib: no download)",
                        insightface_pack="antelopev2", providers="cpu", dlib_detector="hog").result[0]
    rgb = torch.from_numpy(skimage_data.astronaut()[:333, :417]).float() / 255
    grey = rgb.mean(dim=-1, keepdim=True)
    rgba = torch.cat([rgb, torch.full_like(rgb[..., :1], 0.5)], dim=-1)
    boxes = []
    for image in (rgb, grey, rgba):
        faces, preview, count = run_node(nodes[P + "DetectFaces"], face_analysis=analysis, image=image[None],
                                         det_size=640, score_threshold=0.5, min_size=0, max_faces=0,
                                         retry_smaller=True, if_no_face="error").result
        assert count == 1 and preview.shape == (1, 333, 417, 3)
        boxes.append(faces.faces[0][0].bbox)
    assert np.abs(boxes[2] - boxes[0]).max() <= 1  # RGBA: the colour channels as they are
    assert _iou(boxes[1], boxes[0]) > 0.7  # grey: the same face (the detector sees other pixel values)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_skeleton_json_merges_with_the_face_landmarks(nodes, comfy, workdir):
    analysis = run_node(nodes[P + "FaceAnalysisLoader"], backend="offline (dlib: no download)",
                        insightface_pack="antelopev2", providers="cpu", dlib_detector="hog").result[0]
    faces = run_node(nodes[P + "DetectFaces"], face_analysis=analysis,
                     image=torch.from_numpy(skimage_data.astronaut()).float()[None] / 255, det_size=640,
                     score_threshold=0.5, min_size=0, max_faces=0, retry_smaller=True,
                     if_no_face="error").result[0]
    body = [0.0] * 54
    body[3:6] = [0.5, 0.6, 1.0]  # the neck, normalised
    body[6:9] = [0.3, 0.62, 1.0]  # right shoulder
    pose = {"people": [{"pose_keypoints_2d": body}], "canvas_width": 512, "canvas_height": 512}
    out = run_node(nodes[P + "DrawFaceCondition"], faces=faces, style="magicid_skeleton_landmarks", width=256,
                   height=256, face_indices="all", thickness=2, pose_json="", pose_keypoint=[pose])
    image = (out.result[0][0].numpy() * 255).round().astype(np.uint8)
    assert image.shape == (256, 256, 3)
    assert image[154, 128].max() > 0  # the neck-shoulder limb drawn at 256 px
    face_box = faces.faces[0][0].bbox / 2
    x0, y0, x1, y1 = face_box.astype(int)
    assert image[y0:y1, x0:x1].max(axis=2).astype(bool).sum() > 30  # landmarks drawn at half size
    with pytest.raises(ValueError, match=r"input 'pose_keypoint'"):
        run_node(nodes[P + "DrawFaceCondition"], faces=faces, style="magicid_skeleton_landmarks", width=0,
                 height=0, face_indices="all", thickness=2, pose_json="")
    with pytest.raises(ValueError, match=r"input 'pose_json'"):
        run_node(nodes[P + "DrawFaceCondition"], faces=faces, style="magicid_skeleton_landmarks", width=0,
                 height=0, face_indices="all", thickness=2, pose_json="{not json")


def test_insightface_loader_finds_packs_in_the_models_folder_and_explains_mistakes(comfy, workdir):
    from magic_portrait.comfy_env import WorkflowError

    out = comfy.run_prompt(_faces_graph(backend="insightface", pack="antelopev2"))
    assert "insightface antelopev2" in out["analysis"]["text"][0] and "CPUExecutionProvider" in \
        out["analysis"]["text"][0]
    assert "image 0: 1 face(s)" in out["detect"]["text"][0]
    with pytest.raises(WorkflowError, match=r"one folder too deep.*buffalo_l"):
        comfy.run_prompt(_faces_graph(backend="insightface", pack="buffalo_l"))


def test_insightface_loader_lists_the_packs_it_finds(nodes, comfy, workdir):
    options = nodes[P + "FaceAnalysisLoader"].GET_SCHEMA().inputs[1].options
    assert "antelopev2" in options and "buffalo_l" in options


# ------------------------------------------------------------------------------------------------ the whole graph
def _group_graph(*, mgmica_weight=1.0, with_identities=True, with_control=True, bust_cache=False, seed=3):
    """Two FaceID identities from the astronaut (insightface stand-in) in left/right boxes, the landmark ControlNet
    confined to the face masks, and a KSampler on the tiny checkpoint."""
    prompt, latent = text_to_image_nodes(CKPT, "two people", 96, 64, bust_cache=bust_cache)
    model, cond = ["ckpt", 0], (["pos", 0], ["neg", 0])
    if with_identities or with_control:
        prompt["refs"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
        prompt |= detect_nodes("analysis", "detect", "refs")
    if with_identities:
        prompt |= faceid_embeds_nodes("embeds", "refs", "detect")
        previous = None
        for name, box in (("left", (0.0, 0.0, 0.5, 1.0)), ("right", (0.5, 0.0, 1.0, 1.0))):
            prompt[name] = {"class_type": P + "AddIdentity",
                            "inputs": add_identity_inputs("embeds", name, box, previous)}
            previous = name
        prompt["mgmica"] = {"class_type": P + "MultiIDAttention", "inputs": {
            "model": model, "identities": ["right", 0], "weight": mgmica_weight, "overlap": "exclusive",
            "uncond": "negative tokens", "layer_weights": "all = 1"}}
        model = ["mgmica", 0]
    if with_control:
        prompt |= {
            "draw": {"class_type": P + "DrawFaceCondition", "inputs": {
                "faces": ["detect", 0], "style": "openpose_face", "width": 96, "height": 64, "face_indices": "all",
                "thickness": 2, "pose_json": ""}},
            "region": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 96, "height": 64}},
            "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
            "control": {"class_type": P + "ApplyLandmarkControlNet", "inputs": {
                "positive": cond[0], "negative": cond[1], "control_net": ["cn", 0], "image": ["draw", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mask": ["region", 0]}},
        }
        cond = (["control", 0], ["control", 1])
    prompt["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": cond[0], "negative": cond[1], "latent_image": latent, "seed": seed, "steps": 2,
        "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "g"}}
    return prompt


def _latent_of(comfy, workdir, prompt) -> torch.Tensor:
    return saved_latent(workdir, comfy.run_prompt(prompt))


def test_group_photo_graph_and_no_leak_into_a_later_plain_prompt(comfy, workdir):
    plain = _latent_of(comfy, workdir, _group_graph(with_identities=False, with_control=False))
    patched = _latent_of(comfy, workdir, _group_graph())
    assert tol.differs(patched, plain)
    only_control = _latent_of(comfy, workdir, _group_graph(with_identities=False))
    assert tol.differs(patched, only_control)  # the identities act
    # weight 0 through the executor: the identities add nothing
    assert torch.equal(_latent_of(comfy, workdir, _group_graph(mgmica_weight=0.0)), only_control)
    # the same plain prompt after the patched ones, on the cached MODEL, is bit-identical to running it alone
    again = _latent_of(comfy, workdir, _group_graph(with_identities=False, with_control=False, bust_cache=True))
    assert torch.equal(again, plain)
