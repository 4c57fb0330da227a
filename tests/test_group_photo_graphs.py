"""ComfyUI tier: group photos as MagicID means them, through ComfyUI's prompt validation and executor. Group pictures
of real faces (LFW people and the astronaut, magic_portrait.group_photos) from 512x512 to 1216x832 and odd sizes,
faces from ~60 to ~300 px, one cut by the border:

- Detect Faces at its defaults finds every face the back-end finds on the picture at full resolution and upsampled
  twice (dlib, and insightface's code on the tiny stand-in pack), each once (no face twice across tiles), every box
  inside the picture, and says at what size and in what time it detected;
- DIIR on such a picture changes only pixels inside the face masks grown by the stated margin plus the feather band,
  reports the share of the picture it changed exactly as measured, and leaves every other pixel bit-identical;
- a workflow saved before Detect Faces gained min_face / expected_faces loads with its saved values in place."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch
from helpers import MAGICID_CKPT, comfy_folders, write_magicid_models
from PIL import Image

from magic_portrait import group_photos as gp

P = "MagicPortrait_"
OFFLINE = "offline (dlib: no download)"
# name: (width, height, face sizes px, seed, people); the last face of each is cut by the right border
PICTURES = {
    "group_512.png": (512, 512, [90, 60, 150, 240], 2, "lfw"),
    "group_701x451.png": (701, 451, [110, 60, 90, 140], 3, "lfw"),
    "group_1216x832.png": (1216, 832, [90, 56, 64, 110, 150, 200, 300], 1, "lfw"),
    "group_1024.png": (1024, 1024, [100, 60, 70, 80, 120, 160, 220, 300], 0, "lfw"),
    "astronauts_1216x832.png": (1216, 832, [90, 56, 64, 110, 150, 200], 1, "astronaut"),
    "astronauts_517x389.png": (517, 389, [60, 90, 150], 2, "astronaut"),
}


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    root = tmp_path_factory.mktemp("group_photos")
    write_magicid_models(root / "models", tiny_checkpoint, tiny_controlnet_file, seed=11)
    with comfy_folders(root):
        for name, (w, h, sizes, seed, people) in PICTURES.items():
            Image.fromarray(gp.group_photo(w, h, sizes, seed=seed, people=people).rgb).save(root / "input" / name)
        yield root


def _outputs(comfy, node_id: str):
    entry = comfy.executor.caches.outputs.get(node_id)
    return [value[0] for value in entry.outputs]


def _detect_graph(image: str, backend: str) -> dict:
    """LoadImage -> Face Analysis Loader -> Detect Faces with its required widgets at their defaults and the inputs
    added later (min_face, expected_faces) left out, as an API prompt saved before them would."""
    return {
        "load": {"class_type": "LoadImage", "inputs": {"image": image}},
        "analysis": {"class_type": P + "FaceAnalysisLoader", "inputs": {
            "backend": backend, "insightface_pack": "antelopev2", "providers": "cpu", "dlib_detector": "hog"}},
        "detect": {"class_type": P + "DetectFaces", "inputs": {
            "face_analysis": ["analysis", 0], "image": ["load", 0], "det_size": 640, "score_threshold": 0.5,
            "min_size": 0, "max_faces": 0, "retry_smaller": True, "if_no_face": "error"}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["detect", 1]}},
    }


def _reference(core, analyzer, rgb) -> list:
    """What the back-end itself finds on the whole picture at full resolution and upsampled twice, merged."""
    fs = core.face_search
    hits = analyzer.detect(rgb, 1.0, 0.5) + analyzer.detect(rgb, 2.0, 0.5)
    return fs.merge_detections(hits)


# dlib gets the LFW people; the tiny insightface stand-in sees skin-toned blobs: it gets the astronaut pictures
@pytest.mark.parametrize(("name", "backend"), [(n, "insightface" if p[4] == "astronaut" else OFFLINE)
                                               for n, p in PICTURES.items()])
def test_detect_faces_at_defaults_finds_every_face_the_back_end_can_see(comfy, pack, workdir, name, backend):
    w, h, sizes, seed, people = PICTURES[name]
    out = comfy.run_prompt(_detect_graph(name, backend))
    detections, preview, count = _outputs(comfy, "detect")
    analyzer = _outputs(comfy, "analysis")[0]
    core = pack.magic_core
    rgb = np.asarray(Image.open(workdir / "input" / name).convert("RGB"))
    faces = list(detections.faces[0])
    boxes = [f.bbox for f in faces]
    placed = [p.clipped(w, h) for p in gp.group_photo(w, h, sizes, seed=seed, people=people).faces]
    # every face the back-end sees at full resolution or upsampled twice (its hits on a placed face: the tiny
    # stand-in also fires on a shoulder at one scale), found once at the node's defaults
    reference = [r for r in _reference(core, analyzer, rgb)
                 if any(core.face_search.same_face(r.box, p) for p in placed)]
    assert len(reference) == len(placed), "the back-end sees every placed face at some resolution"
    for ref in reference:
        assert sum(core.face_search.same_face(ref.box, b) for b in boxes) == 1, (ref.box, ref.score)
    for p in placed:  # and they are the people we placed, each once
        assert sum(core.face_search.same_face(p, b) for b in boxes) == 1, p
    for i, a in enumerate(boxes):  # no face twice, every box inside the picture
        assert 0 <= a[0] < a[2] <= w and 0 <= a[1] < a[3] <= h
        assert not any(core.face_search.same_face(a, b) for b in boxes[i + 1:])
    assert count == len(faces) == len(sizes) and preview.shape == (1, h, w, 3)
    text = out["detect"]["text"][0]
    scale = core.face_search.detection_scale(analyzer, h, w)
    size = f"{round(w * scale)}x{round(h * scale)}"
    assert re.search(rf"image 0: {len(faces)} face\(s\); detected at {size} \(x{scale:.2f}\).* s detecting, "
                     r"[\d.]+ s in all", text), text


def test_the_face_at_the_border_keeps_its_whole_box_for_alignment(comfy, workdir):
    comfy.run_prompt(_detect_graph("group_512.png", OFFLINE))
    detections = _outputs(comfy, "detect")[0]
    cut = [f for f in detections.faces[0] if f.unclipped_bbox is not None]
    assert len(cut) == 1 and cut[0].bbox[2] == 512 and cut[0].unclipped_bbox[2] > 512
    assert cut[0].kps[:, 0].max() < 512 < cut[0].landmarks68[:, 0].max()  # the jaw runs past the border


# ----------------------------------------------------------------------------------------------------------- DIIR
def _diir_graph(image: str) -> dict:
    prompt = _detect_graph(image, OFFLINE)
    prompt |= {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MAGICID_CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a face"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "masks": {"class_type": P + "FaceMasks", "inputs": {
            "faces": ["detect", 0], "shape": "hull", "grow": 0, "feather": 0.0, "face_indices": "all"}},
        "restore": {"class_type": P + "DIIRFaceRestore", "inputs": {
            "image": ["load", 0], "faces": ["detect", 0], "model": ["ckpt", 0], "vae": ["ckpt", 2],
            "positive": ["pos", 0], "negative": ["neg", 0], "face_indices": "all", "margin": 0.6, "crop_size": 128,
            "scheduler": "normal", "steps": 4, "strength": 0.5, "cfg": 3.0, "inversion_mode": "ddim", "grow": 0.1,
            "feather": 0.12, "color_match": "mean_std", "identity_match": "by index", "identity_weight": 1.0,
            "condition_style": "openpose_face", "control_strength": 0.6, "if_no_face": "return unchanged"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["restore", 0], "filename_prefix": "diir_group"}},
        "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["masks", 0]}},
        "show_masks": {"class_type": "PreviewImage", "inputs": {"images": ["mask_image", 0]}},
    }
    return prompt


def test_diir_on_a_group_picture_changes_only_the_grown_faces_and_says_how_much(comfy, workdir):
    out = comfy.run_prompt(_diir_graph("group_701x451.png"))
    image, paste_masks, _ = _outputs(comfy, "restore")
    face_masks = _outputs(comfy, "masks")[0]
    faces = _outputs(comfy, "detect")[0].faces[0]
    source = torch.from_numpy(np.array(Image.open(workdir / "input" / "group_701x451.png").convert("RGB")))
    source = source.float()[None] / 255.0
    assert image.shape == source.shape == (1, 451, 701, 3) and len(faces) == 4 == face_masks.shape[0]
    changed = (image != source).any(dim=-1)[0].numpy()
    # the face masks (Face Masks' hull, as a user sees it) grown by grow + feather of each face's size
    allowed = np.zeros(changed.shape, bool)
    for face, mask in zip(faces, face_masks.numpy(), strict=True):
        outside = (mask == 0).astype(np.uint8)
        distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        allowed |= distance < (0.1 + 0.12) * face.size + 1.5  # + the rounding of grow to whole pixels
    assert changed.any() and not (changed & ~allowed).any()
    assert torch.equal(image[0][torch.from_numpy(~allowed)], source[0][torch.from_numpy(~allowed)])
    # every face is restored, and nothing beyond its band: the paste masks are exactly where pixels may change
    assert not (changed & (paste_masks[0].numpy() == 0)).any()
    for mask in face_masks.numpy():
        assert changed[mask > 0].mean() > 0.9
    # the reported share is the measured one, to the pixel
    text = out["restore"]["text"][0]
    found = re.search(r"changed ([\d.]+)% of the picture \((\d+) of (\d+) pixels\)", text)
    assert found, text
    assert int(found[2]) == int(changed.sum()) and int(found[3]) == changed.size
    assert float(found[1]) == pytest.approx(100 * changed.mean(), abs=0.005)
    assert changed.mean() < 0.5  # the restored faces, not the picture


def test_diir_is_deterministic_in_its_face_order(comfy, workdir):
    comfy.run_prompt(_diir_graph("group_512.png"))
    first = _outputs(comfy, "restore")[0].clone()
    prompt = _diir_graph("group_512.png")
    prompt["restore"]["inputs"]["face_indices"] = "0-3"  # the same faces named explicitly, left to right
    comfy.run_prompt(prompt)
    assert torch.equal(_outputs(comfy, "restore")[0], first)


# ---------------------------------------------------------------------------------------------- saved workflows
def test_a_detect_faces_node_saved_before_min_face_keeps_its_values(comfy):
    from magic_portrait.workflow import map_widget_values

    node_class = comfy.node_class(P + "DetectFaces")
    from magic_portrait.workflow import input_specs

    saved = {"id": 7, "type": P + "DetectFaces", "widgets_values": [1216, 0.4, 20, 3, False, "empty result"]}
    warnings: list[str] = []
    inputs = map_widget_values(saved, input_specs(node_class), warnings)
    assert inputs == {"det_size": 1216, "score_threshold": 0.4, "min_size": 20, "max_faces": 3,
                      "retry_smaller": False, "if_no_face": "empty result", "min_face": 48, "expected_faces": 0}
    assert any("min_face" in w for w in warnings)
