"""ComfyUI tier: DIIR Face Restore on tiny models. Graphs through ComfyUI's executor (the node's float outputs read
back from the executor's own output cache): every pixel outside the paste masks is the input's bit for bit, inside
they change; strength 0 is the VAE round trip; a batch equals single runs; border, overlapping, tiny and huge faces;
the input MODEL and IMAGE are never changed."""

from __future__ import annotations

import numpy as np
import pytest
import tolerances as tol
import torch
from helpers import (
    MAGICID_CKPT,
    MAGICID_CONTROLNET,
    add_identity_inputs,
    assert_same_snapshot,
    comfy_folders,
    detect_nodes,
    faceid_embeds_nodes,
    model_snapshot,
    run_node,
    write_magicid_models,
)
from PIL import Image
from skimage import data as skimage_data

from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

CKPT, CONTROLNET = MAGICID_CKPT, MAGICID_CONTROLNET
DIIR = "MagicPortrait_DIIRFaceRestore"
P = "MagicPortrait_"


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    root = tmp_path_factory.mktemp("diir")
    models = root / "models"
    write_magicid_models(models, tiny_checkpoint, tiny_controlnet_file, seed=9)
    with comfy_folders(root):
        astronaut = skimage_data.astronaut()
        Image.fromarray(astronaut).save(root / "input" / "astronaut.png")
        Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "input" / "mirrored.png")
        Image.fromarray(np.full((200, 328, 3), 90, np.uint8)).save(root / "input" / "flat.png")
        # an odd size with the face a few pixels from the left border: its crop square reaches past the image
        Image.fromarray(np.ascontiguousarray(astronaut[50:401, 168:505])).save(root / "input" / "border.png")
        yield root


def _restore_inputs(**over):
    inputs = {"face_indices": "all", "margin": 0.6, "crop_size": 128, "scheduler": "normal", "steps": 4,
              "strength": 0.5, "cfg": 3.0, "inversion_mode": "ddim", "grow": 0.1, "feather": 0.06,
              "color_match": "mean_std", "identity_match": "by index", "identity_weight": 1.0,
              "condition_style": "openpose_face", "control_strength": 0.6, "if_no_face": "return unchanged"}
    inputs.update(over)
    return inputs


def _graph(image="astronaut.png", *, identity=True, control=True, **over):
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a face"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": image}},
        **detect_nodes("offline", "detect", "load", backend="offline (dlib: no download)", if_no_face="empty result"),
    }
    inputs = {"image": ["load", 0], "faces": ["detect", 0], "model": ["ckpt", 0], "vae": ["ckpt", 2],
              "positive": ["pos", 0], "negative": ["neg", 0], **_restore_inputs(**over)}
    if identity:
        prompt["ref"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
        prompt |= detect_nodes("insightface", "ref_faces", "ref")
        prompt |= faceid_embeds_nodes("embeds", "ref", "ref_faces")
        prompt["identity"] = {"class_type": P + "AddIdentity", "inputs": add_identity_inputs("embeds", "astronaut")}
        inputs["identities"] = ["identity", 0]
    if control:
        prompt["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        inputs["control_net"] = ["cn", 0]
    prompt["restore"] = {"class_type": DIIR, "inputs": inputs}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["restore", 0], "filename_prefix": "diir"}}
    return prompt


def _outputs(comfy, node_id: str):
    """A node's outputs as the executor cached them (float tensors, not the PNGs SaveImage wrote)."""
    entry = comfy.executor.caches.outputs.get(node_id)
    return [value[0] for value in entry.outputs]


def _input_image(workdir, name="astronaut.png") -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(workdir / "input" / name).convert("RGB"))).float()[None] / 255.0


def test_through_the_executor_background_is_bit_identical_and_the_face_changes(comfy, workdir):
    out = comfy.run_prompt(_graph())
    assert "restored 1 face(s)" in out["restore"]["text"][0]
    image, masks, preview = _outputs(comfy, "restore")
    source = _input_image(workdir)
    assert image.shape == source.shape and masks.shape == (1, 512, 512) and preview.shape == (1, 512, 1032, 3)
    outside = masks[0] == 0
    assert torch.equal(image[0][outside], source[0][outside])
    inside = masks[0] > 0.5
    changed = (image[0][inside] - source[0][inside]).abs().amax(-1).gt(tol.effect_floor(source[0]))
    assert inside.sum() > 500 and changed.float().mean() > 0.9
    ys, xs = torch.nonzero(inside, as_tuple=True)
    assert 150 < xs.float().mean() < 300 and 50 < ys.float().mean() < 220  # the astronaut's face


def test_through_the_executor_a_face_at_the_border_of_an_odd_sized_image(comfy, workdir):
    out = comfy.run_prompt(_graph("border.png", identity=False))
    assert "restored 1 face(s)" in out["restore"]["text"][0]
    image, masks, _ = _outputs(comfy, "restore")
    source = _input_image(workdir, "border.png")
    assert image.shape == source.shape == (1, 351, 337, 3)
    assert torch.equal(image[0][masks[0] == 0], source[0][masks[0] == 0])
    assert tol.differs(image[0][masks[0] > 0.5], source[0][masks[0] > 0.5])
    assert masks[0][:, :3].max() > 0  # the paste reaches the border the crop was mirrored across


def test_through_the_executor_a_batch_equals_single_runs_and_inputs_are_untouched(comfy, workdir):
    def batched(prompt):
        prompt["other"] = {"class_type": "LoadImage", "inputs": {"image": "mirrored.png"}}
        prompt["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["load", 0], "image2": ["other", 0]}}
        for node in ("detect", "restore"):
            prompt[node]["inputs"]["image"] = ["batch", 0]
        return prompt

    comfy.run_prompt(_graph(identity=False))
    single_first = [t.clone() for t in _outputs(comfy, "restore")[:2]]
    comfy.run_prompt(_graph("mirrored.png", identity=False))
    single_second = [t.clone() for t in _outputs(comfy, "restore")[:2]]
    prompt = batched(_graph(identity=False))
    comfy.run_prompt(prompt)
    model = _outputs(comfy, "ckpt")[0]
    loaded = _outputs(comfy, "batch")[0].clone()
    before = model_snapshot(model)
    prompt["restore"]["inputs"]["strength"] = 0.75  # run the restore again on the cached MODEL and images
    comfy.run_prompt(prompt)
    assert_same_snapshot(before, model_snapshot(_outputs(comfy, "ckpt")[0]))
    assert torch.equal(_outputs(comfy, "batch")[0], loaded)
    prompt["restore"]["inputs"]["strength"] = 0.5
    comfy.run_prompt(prompt)
    image, masks, _ = _outputs(comfy, "restore")
    assert image.shape[0] == 2
    for i, (single_image, single_mask) in enumerate((single_first, single_second)):
        assert torch.equal(image[i], single_image[0]) and torch.equal(masks[i], single_mask[0])


def test_strength_zero_gives_the_face_back_through_the_vae(comfy, workdir):
    """Strength 0 (colour matching off) is the face's VAE round trip pasted back: compared pixel by pixel with that
    round trip computed here, the crop square and the paste written out in the test (only the detected box, the VAE
    and the node's own paste mask are taken from the run)."""
    import cv2

    margin, crop_size = 0.6, 128
    comfy.run_prompt(_graph(strength=0.0, identity=False, control=False, color_match="none", margin=margin,
                            crop_size=crop_size))
    image, masks, _ = _outputs(comfy, "restore")
    source = _input_image(workdir)[0].numpy()
    vae = _outputs(comfy, "ckpt")[2]
    (face,) = _outputs(comfy, "detect")[0].faces[0]
    # the crop square: 1 + 2 x margin times the box's longer side, centred on the box (README, DIIR Face Restore)
    x0, y0, x1, y1 = (float(v) for v in face.bbox)
    side = int(np.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin)))
    left, top = round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2)
    assert 0 <= left and 0 <= top and left + side <= 512 and top + side <= 512  # inside: no mirrored border
    crop = cv2.resize(source[top:top + side, left:left + side], (crop_size, crop_size), interpolation=cv2.INTER_AREA)
    with torch.inference_mode():
        decoded = vae.decode(vae.encode(torch.from_numpy(np.clip(crop, 0, 1))[None]))
    decoded = decoded.reshape(-1, *decoded.shape[-3:])[0].float().numpy()
    back = np.clip(cv2.resize(decoded, (side, side), interpolation=cv2.INTER_CUBIC), 0, 1)
    m = masks[0].numpy()[..., None]
    expected = source.copy()
    square = expected[top:top + side, left:left + side]
    blended = square * (1 - m[top:top + side, left:left + side]) + back * m[top:top + side, left:left + side]
    expected[top:top + side, left:left + side] = np.where(m[top:top + side, left:left + side] > 0, blended, square)
    assert (m > 0).sum() > 500
    # the same float32 VAE encode + decode by two routes, then a 4x4 bicubic resize, on pixels in [0, 1]
    vae_ops = tol.checkpoint_ops(workdir / "models" / "checkpoints" / CKPT, prefix="first_stage_model.")
    torch.testing.assert_close(image[0], torch.from_numpy(expected), rtol=0,
                               atol=tol.float_tol(torch.float32, vae_ops + 16, 1.0))


@pytest.fixture(scope="module")
def sd15_checkpoint_objects(workdir):
    from nodes import CheckpointLoaderSimple

    model, _, vae = run_node(CheckpointLoaderSimple, ckpt_name=CKPT).result
    return model, vae


def _detections(pack, boxes, size):
    """FaceDetections of one image from face boxes (keypoints placed like a frontal face's)."""
    fc = pack.magic_core.faces
    faces = []
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        kps = np.array([[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h], [x0 + 0.5 * w, y0 + 0.6 * h],
                        [x0 + 0.35 * w, y0 + 0.8 * h], [x0 + 0.65 * w, y0 + 0.8 * h]])
        faces.append(fc.Face(bbox=[x0, y0, x1, y1], kps=kps, score=0.9))
    return fc.FaceDetections([faces], [size])


@pytest.mark.parametrize(("size", "boxes"), [
    ((333, 517), [(-30, 100, 60, 200)]),  # cut by the left border, odd image size
    ((333, 517), [(200, 120, 280, 200), (250, 130, 330, 210)]),  # two people close together: overlapping crops
    ((301, 257), [(100, 100, 112, 112)]),  # a tiny face: its crop is upscaled
    ((240, 320), [(-100, -150, 420, 390)]),  # a face larger than the image
])
def test_border_overlapping_tiny_and_huge_faces(nodes, pack, sd15_checkpoint_objects, size, boxes):
    model, vae = sd15_checkpoint_objects
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, *size, 3, generator=g)
    faces = _detections(pack, boxes, size)
    out, masks, _ = run_node(nodes[DIIR], image=image, faces=faces, model=model, vae=vae,
                             positive=[[torch.zeros(1, 77, 768), {}]], **_restore_inputs(cfg=1.0, steps=4)).result
    assert out.shape == image.shape and torch.isfinite(out).all()
    outside = masks[0] == 0
    assert torch.equal(out[0][outside], image[0][outside])
    assert (masks[0] > 0).any() and tol.differs(out[0][masks[0] > 0.5], image[0][masks[0] > 0.5])


def test_no_face_returns_the_image_or_an_error(comfy, workdir):
    from magic_portrait.comfy_env import WorkflowError

    out = comfy.run_prompt(_graph("flat.png", identity=False))
    assert "no face to restore" in out["restore"]["text"][0]
    image, masks, _ = _outputs(comfy, "restore")
    assert torch.equal(image, _input_image(workdir, "flat.png")) and masks.max() == 0
    with pytest.raises(WorkflowError, match=rf"{DIIR}.*input 'faces'.*no face to restore"):
        comfy.run_prompt(_graph("flat.png", identity=False, if_no_face="error"))


def test_identities_matched_by_similarity(nodes, pack, sd15_checkpoint_objects, faceid_adapter):
    """Two faces, two identities whose reference embeddings are each closest to the other face: 'by similarity'
    crosses them over, 'by index' does not, and the restored faces differ accordingly."""
    model, vae = sd15_checkpoint_objects
    fc, mgmica_patch = pack.magic_core.faces, pack.nodes.mgmica_patch
    rng = np.random.default_rng(5)
    e0, e1 = rng.normal(size=512), rng.normal(size=512)
    faces = _detections(pack, [(40, 60, 120, 140), (200, 60, 280, 140)], (200, 320))
    faces = fc.FaceDetections([[fc.Face(bbox=f.bbox, kps=f.kps, score=0.9, embedding=e, embedding_kind=fc.ARCFACE_512)
                                for f, e in zip(faces.faces[0], (e0, e1), strict=True)]], [(200, 320)])
    def ident(embedding, label, seed):
        g = torch.Generator().manual_seed(seed)
        emb = mgmica_patch.IDEmbeds(faceid_adapter, torch.randn(1, 4, 768, generator=g), torch.randn(1, 4, 768, generator=g),
                               label, embedding / np.linalg.norm(embedding), fc.ARCFACE_512)
        return mgmica_patch.Identity(emb, pack.magic_core.regions.Box(0, 0, 1, 1), 1.0, 0.0, 1.0, label)

    ids = (ident(e1 + 0.1 * e0, "looks like face 1", 1), ident(e0 + 0.1 * e1, "looks like face 0", 2))
    image = torch.rand(1, 200, 320, 3, generator=torch.Generator().manual_seed(6))
    common = {"image": image, "faces": faces, "model": model, "vae": vae, "positive": [[torch.zeros(1, 77, 768), {}]],
              "identities": ids}
    similar = run_node(nodes[DIIR], **common, **_restore_inputs(cfg=1.0, steps=4, identity_match="by similarity"))
    text = similar.ui.as_dict()["text"][0]
    assert "face 0: looks like face 0" in text and "face 1: looks like face 1" in text
    by_index = run_node(nodes[DIIR], **common, **_restore_inputs(cfg=1.0, steps=4)).result[0]
    assert tol.differs(similar.result[0], by_index)
    with pytest.raises(ValueError, match=rf"\[{DIIR}\] input 'strength'.*less than one inversion step"):
        run_node(nodes[DIIR], **common, **_restore_inputs(cfg=1.0, steps=2, strength=0.5))


@pytest.fixture(scope="module")
def faceid_adapter(pack, tmp_path_factory):
    path = write_tiny_ipadapter(tmp_path_factory.mktemp("diir_faceid") / "faceid.safetensors", variant="faceid",
                                family="sd15", layer_inner_dims=[320] * 16, seed=11)
    return pack.magic_core.ipadapter.load_ipadapter_file(path)
