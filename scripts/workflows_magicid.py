"""MagicID example workflows (collected by scripts/make_workflows.py): the landmark ControlNet on a portrait's faces,
and a group photo with one identity per person (MGMICA) plus the landmark ControlNet on a layout.

Both use the offline face back-end (dlib: no download) so they run as opened; insightface is one widget away."""

from __future__ import annotations

from magic_portrait.workflow_builder import Workflow

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IPADAPTER = "ip-adapter-plus-face_sd15.safetensors"
PORTRAIT = "magic_portrait_astronaut.png"
REFERENCE_2 = "magic_portrait_reference_2.png"
LAYOUT = "magic_portrait_group_layout.png"
OFFLINE = "offline (dlib: no download)"


def _detect(wf: Workflow, analysis, image, title: str):
    detect = wf.node("MagicPortrait_DetectFaces", title=title)
    wf.connect(analysis.out(0), detect, "face_analysis")
    wf.connect(image.out("IMAGE"), detect, "image")
    return detect


def _faces_to_control(wf: Workflow, detect, ckpt, controlnet, positive_text: str, width: int, height: int,
                      columns: tuple[int, int]):
    """Face masks + OpenPose face condition of the detected faces, applied as a region-masked landmark ControlNet."""
    wf.column = columns[0]
    masks = wf.node("MagicPortrait_FaceMasks", shape="ellipse", grow=24, feather=8.0)
    wf.connect(detect.out("faces"), masks, "faces")
    draw = wf.node("MagicPortrait_DrawFaceCondition", style="openpose_face", width=width, height=height)
    wf.connect(detect.out("faces"), draw, "faces")
    show = wf.node("PreviewImage", title="Condition image")
    wf.connect(draw.out(0), show, "images")
    wf.column = columns[1]
    positive = wf.encode_text(ckpt.out("CLIP"), positive_text, "Positive prompt")
    negative = wf.encode_text(ckpt.out("CLIP"), "blurry, deformed face, low quality", "Negative prompt")
    apply = wf.node("MagicPortrait_ApplyLandmarkControlNet", strength=0.8, start_percent=0.0, end_percent=0.8)
    wf.connect(positive.out(0), apply, "positive")
    wf.connect(negative.out(0), apply, "negative")
    wf.connect(controlnet.out(0), apply, "control_net")
    wf.connect(draw.out(0), apply, "image")
    wf.connect(masks.out("union"), apply, "mask")
    return apply


def _identity_models(wf: Workflow):
    """Checkpoint, CLIP vision, IP-Adapter and landmark ControlNet loaders (the current column)."""
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    clip_vision = wf.node("CLIPVisionLoader", clip_name=CLIP_VISION)
    ipadapter = wf.node("MagicPortrait_LoadIPAdapter", ipadapter_file=IPADAPTER)
    controlnet = wf.node("ControlNetLoader", control_net_name=CONTROLNET)
    return ckpt, clip_vision, ipadapter, controlnet


def _id_embeds(wf: Workflow, ipadapter, clip_vision, ref, detect, person: int, **widgets):
    """ID Embeds of person `person` (from 1) from their reference image and its detected faces."""
    emb = wf.node("MagicPortrait_IDEmbeds", title=f"ID Embeds: person {person}", **widgets)
    wf.connect(ipadapter.out(0), emb, "ipadapter")
    wf.connect(ref.out("IMAGE"), emb, "images")
    wf.connect(detect.out("faces"), emb, "faces")
    wf.connect(clip_vision.out(0), emb, "clip_vision")
    return emb


def _add_identity(wf: Workflow, emb, previous, person: int, **widgets):
    """Add Identity of person `person` (from 1), chained after `previous` (None for the first)."""
    add = wf.node("MagicPortrait_AddIdentity", title=f"Add Identity: person {person}", label=f"person {person}",
                  **widgets)
    wf.connect(emb.out("id_embeds"), add, "id_embeds")
    if previous is not None:
        wf.connect(previous.out(0), add, "identities")
    return add


def _sample(wf: Workflow, model, apply, ckpt, width: int, height: int, prefix: str, columns: tuple[int, int]):
    wf.column = columns[0]
    sampler = wf.sample(model, apply.out("positive"), apply.out("negative"), width, height, seed=42, steps=30,
                        cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
    wf.column = columns[1]
    wf.decode_and_save(sampler.out(0), ckpt.out("VAE"), prefix)


def landmark_controlnet(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("Landmark ControlNet on the faces of a portrait (Magic Portrait, MagicID).\n\nDetect Faces finds the faces "
            "(offline dlib back-end: no download; switch the loader to insightface for antelopev2/buffalo_l) and "
            "shows them numbered left to right. Draw Face Condition draws OpenPose face points where the landmarks "
            "are, and Apply Landmark ControlNet applies an OpenPose ControlNet with them, confined by Face Masks to "
            "the face regions, so the rest of the picture follows the prompt freely.\n\nNeeds an SD1.5 checkpoint "
            f"(models/checkpoints) and an OpenPose ControlNet such as {CONTROLNET} (models/controlnet). Load your "
            "own photo in the portrait node.")
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    portrait = wf.node("LoadImage", image=PORTRAIT, title="Portrait (its faces steer the picture)")
    controlnet = wf.node("ControlNetLoader", control_net_name=CONTROLNET)
    wf.column = 1
    analysis = wf.node("MagicPortrait_FaceAnalysisLoader", backend=OFFLINE)
    detect = _detect(wf, analysis, portrait, "Detect Faces")
    preview = wf.node("PreviewImage", title="Faces found (numbered left to right)")
    wf.connect(detect.out("preview"), preview, "images")
    apply = _faces_to_control(wf, detect, ckpt, controlnet, "a portrait photo of a woman in a garden, soft light",
                              512, 512, (2, 3))
    _sample(wf, ckpt.out("MODEL"), apply, ckpt, 512, 512, "magic_portrait/landmark_controlnet", (4, 5))
    wf.group_columns("Model, portrait and ControlNet", "Find the faces", "Face masks and condition image",
                     "Prompt and landmark control", "Sample", "Decode and save")
    return wf


def group_photo(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("A group photo with one identity per person (Magic Portrait, MagicID: MGMICA).\n\nEach person's reference "
            "portrait gives ID tokens through the IP-Adapter (ID Embeds, using the detected face). Add Identity puts "
            "each person in a region - here a box: the left and the right half of the picture - and Multi-ID "
            "Attention carries every identity in one patch, each confined to its own region, so faces do not blend. "
            "The faces of the group layout image steer where the faces go through the landmark ControlNet.\n\n"
            f"Needs an SD1.5 checkpoint, {IPADAPTER} (models/ipadapter), {CLIP_VISION} (models/clip_vision) and an "
            f"OpenPose ControlNet ({CONTROLNET}). The offline face back-end needs no download; FaceID IP-Adapters "
            "need the insightface back-end (antelopev2 in models/insightface/models/). Replace the two references "
            "and the layout with your own photos.")
    ckpt, clip_vision, ipadapter, controlnet = _identity_models(wf)
    wf.column = 1
    analysis = wf.node("MagicPortrait_FaceAnalysisLoader", backend=OFFLINE)
    refs = [wf.node("LoadImage", image=PORTRAIT, title="Person 1 (left): reference"),
            wf.node("LoadImage", image=REFERENCE_2, title="Person 2 (right): reference")]
    wf.column = 2
    detections = [_detect(wf, analysis, ref, f"Detect Faces: person {i + 1}") for i, ref in enumerate(refs)]
    wf.column = 3
    embeds = [_id_embeds(wf, ipadapter, clip_vision, ref, detect, i + 1, face_index=0, image_crop="auto")
              for i, (ref, detect) in enumerate(zip(refs, detections, strict=True))]
    wf.column = 4
    previous = None
    for i, (emb, box) in enumerate(zip(embeds, ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)), strict=True)):
        previous = _add_identity(wf, emb, previous, i + 1, weight=0.8, box_left=box[0], box_top=box[1],
                                 box_right=box[2], box_bottom=box[3])
    mgmica = wf.node("MagicPortrait_MultiIDAttention", overlap="exclusive")
    wf.connect(ckpt.out("MODEL"), mgmica, "model")
    wf.connect(previous.out(0), mgmica, "identities")
    wf.column = 5
    layout = wf.node("LoadImage", image=LAYOUT, title="Group layout (where the faces go)")
    layout_faces = _detect(wf, analysis, layout, "Detect Faces: layout")
    apply = _faces_to_control(wf, layout_faces, ckpt, controlnet,
                              "a photo of two friends side by side, outdoors, natural light", 768, 512, (6, 7))
    _sample(wf, mgmica.out(0), apply, ckpt, 768, 512, "magic_portrait/group_photo", (8, 9))
    wf.group_columns("Models", "References and face back-end", "Find each person's face", "ID tokens",
                     "Identities in regions (MGMICA)", "Layout faces", "Face masks and condition image",
                     "Prompt and landmark control", "Sample", "Decode and save")
    return wf


def face_restore(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("DIIR face restoration (Magic Portrait, MagicID).\n\nDIIR Face Restore takes every face Detect Faces "
            "found, crops it with a margin, brings it to the model's native size, DDIM-inverts it part of the way "
            "(strength) and denoises it again with that person's identity (IP-Adapter tokens through Multi-ID "
            "Attention, confined to the face) and the crop's own landmarks (OpenPose ControlNet), then colour-matches "
            "and pastes it back: the face grown by `grow`, with a soft edge ending `feather` beyond it. Every other "
            "pixel is left exactly as it was; the node text says what share of the picture changed. Detect Faces "
            "finds faces down to min_face (48 px) in any picture size. The i-th identity restores the i-th face from "
            "the left (or match 'by similarity').\n\n"
            f"Needs an SD1.5 checkpoint, {IPADAPTER}, {CLIP_VISION} and an OpenPose ControlNet ({CONTROLNET}). Load "
            "any image to restore, e.g. a group photo you generated, and one reference per person.")
    ckpt, clip_vision, ipadapter, controlnet = _identity_models(wf)
    wf.column = 1
    analysis = wf.node("MagicPortrait_FaceAnalysisLoader", backend=OFFLINE)
    target = wf.node("LoadImage", image=LAYOUT, title="Image to restore")
    target_faces = _detect(wf, analysis, target, "Detect Faces: image to restore")
    wf.column = 2
    refs = [wf.node("LoadImage", image=PORTRAIT, title="Person 1 (left): reference"),
            wf.node("LoadImage", image=REFERENCE_2, title="Person 2 (right): reference")]
    wf.column = 3
    detections = [_detect(wf, analysis, ref, f"Detect Faces: person {i + 1}") for i, ref in enumerate(refs)]
    wf.column = 4
    previous = None
    for i, (ref, detect) in enumerate(zip(refs, detections, strict=True)):
        emb = _id_embeds(wf, ipadapter, clip_vision, ref, detect, i + 1)
        previous = _add_identity(wf, emb, previous, i + 1)
    wf.column = 5
    positive = wf.encode_text(ckpt.out("CLIP"), "a photo of a face, natural skin, sharp focus", "Positive prompt")
    negative = wf.encode_text(ckpt.out("CLIP"), "blurry, deformed, low quality", "Negative prompt")
    wf.column = 6
    restore = wf.node("MagicPortrait_DIIRFaceRestore")
    for source, name in ((target.out("IMAGE"), "image"), (target_faces.out("faces"), "faces"),
                         (ckpt.out("MODEL"), "model"), (ckpt.out("VAE"), "vae"), (positive.out(0), "positive"),
                         (negative.out(0), "negative"), (previous.out(0), "identities"),
                         (controlnet.out(0), "control_net")):
        wf.connect(source, restore, name)
    wf.column = 7
    save = wf.node("SaveImage", filename_prefix="magic_portrait/face_restore")
    wf.connect(restore.out("image"), save, "images")
    compare = wf.node("PreviewImage", title="Before | after")
    wf.connect(restore.out("before_after"), compare, "images")
    masks = wf.node("MaskToImage")
    wf.connect(restore.out("paste_masks"), masks, "mask")
    show_masks = wf.node("PreviewImage", title="Paste masks")
    wf.connect(masks.out(0), show_masks, "images")
    wf.group_columns("Models", "The image and its faces", "One reference per person", "Their faces",
                     "Identities, left to right", "Prompt", "DIIR", "Result")
    return wf


WORKFLOWS = {
    "magicid_landmark_controlnet.json": landmark_controlnet,
    "magicid_group_photo.json": group_photo,
    "magicid_face_restore.json": face_restore,
}
