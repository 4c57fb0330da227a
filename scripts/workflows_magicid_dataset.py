"""MagicID dataset example workflows (collected by scripts/make_workflows.py): the shipped photo set turned into a
MagicID training dataset with Build MagicID Dataset, its contact sheet saved; and the same dataset trained with
Multi-Mode Fusion (skeleton, landmark, ...) and Clone Face Tuning into a RepControlNet, applied with a merged
skeleton + landmark condition drawn from the group layout. Both run as opened: the photos and their skeleton JSON
reach ComfyUI's input folder by the pack's copy on load, and the face back-end is the offline one."""

from __future__ import annotations

import json
from pathlib import Path

from magic_portrait.workflow_builder import Workflow

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
LAYOUT = "magic_portrait_group_layout.png"  # the same picture as the photo set's group_layout.jpg (768 x 512)
LAYOUT_POSE = Path(__file__).resolve().parent.parent / "example_workflows" / "magic_portrait_magicid_photos" / \
    "group_layout.json"
TRAINED_NAME = "my_magicid_mmf"

OFFLINE = "offline (dlib: no download)"
PHOTOS = "magic_portrait_magicid_photos"  # example_workflows/<this>, copied to ComfyUI/input on load
DATASET = "magic_portrait_magicid_dataset"


def magicid_dataset(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("Build a MagicID dataset (Magic Portrait).\n\nRuns as opened: Build MagicID Dataset reads "
            f"ComfyUI/input/{PHOTOS}/ (six photos with an OpenPose skeleton JSON beside each, which Magic Portrait "
            "copies into ComfyUI's input folder when ComfyUI starts) and writes the dataset into "
            f"ComfyUI/input/{DATASET}/: per photo NAME.png, NAME_landmark.png (the faces, OpenPose points), "
            "NAME_skeleton.png (the bodies) and NAME_facemask.png, plus manifest.jsonl (faces, boxes, keypoints, "
            "modalities, the photo's hash). The preview shows photo | skeleton | landmarks | face mask per sample; "
            "the node's text names every photo it skipped and why.\n\nYour own photos: make a folder inside "
            "ComfyUI/input/, put each photo's skeleton beside it as NAME.json (DWPose / OpenPose preprocessors of "
            "comfyui_controlnet_aux give POSE_KEYPOINT: save it with Save Pose Keypoints, or run OpenPose with "
            "--write_json, which names its files NAME_keypoints.json), and name the folder in photos_folder. Add "
            "photos later and run again: only the new ones are processed. Photos without a skeleton are skipped "
            "unless missing_skeleton keeps them landmark-only. Or connect an IMAGE list (Load Image Dataset from "
            "Folder) to images and one POSE_KEYPOINT per image.", column=0)
    analysis = wf.node("MagicPortrait_FaceAnalysisLoader", backend=OFFLINE)
    wf.column = 1
    build = wf.node("MagicPortrait_BuildMagicIDDataset", photos_folder=PHOTOS, dataset_folder=DATASET)
    wf.connect(analysis.out(0), build, "face_analysis")
    wf.column = 2
    save = wf.node("SaveImage", filename_prefix="magic_portrait/magicid_dataset", title="Samples: photo | skeleton | "
                   "landmarks | face mask")
    wf.connect(build.out("preview"), save, "images")
    wf.group_columns("Face back-end", "Photos in, MagicID dataset out", "Contact sheet")
    return wf


def magicid_mmf_train(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("MagicID training: Multi-Mode Fusion and Clone Face Tuning (Magic Portrait).\n\nRuns as opened. Build "
            f"MagicID Dataset turns ComfyUI/input/{PHOTOS}/ (six photos with their skeleton JSON, copied there by "
            f"Magic Portrait when ComfyUI starts) into ComfyUI/input/{DATASET}/ (only new photos are processed on a "
            "later run), and hands the folder's name to Train RepControlNet. The trainer iterates the modalities "
            "(modality_schedule alternate: skeleton, landmark, skeleton, ...; random draws them with "
            "modality_weights; merged shows both in one image) through ONE shared condition adapter, so the file "
            "applies with a skeleton, a landmark or a merged condition. clone_face_probability: the share of "
            "samples with one face cloned to a free place, both conditions redrawn there (Clone Face Tuning: faces "
            "go where the condition puts them); face_loss_weight: faces weigh 1 + this times the background in the "
            "loss. The loss log (models/magic_repcontrolnet/<name>_training/losses.jsonl) records every step's "
            "modality and a running loss per modality; the plot shows the loss.\n\nA few steps show the "
            "pipeline; a useful control needs thousands and more photos (512 px, an SD1.5 checkpoint in "
            "models/checkpoints). Apply RepControlNet says which modalities the file was trained on and refuses a "
            "condition of another (untrained_modality: error or warn). The condition here is drawn from the group "
            "layout's detected faces and its skeleton (pose_json: the photo set's group_layout.json; connect a "
            "DWPose/OpenPose preprocessor's POSE_KEYPOINT instead for your own pictures).", column=0)
    analysis = wf.node("MagicPortrait_FaceAnalysisLoader", backend=OFFLINE)
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    prompt = wf.encode_text(ckpt.out("CLIP"), "a photo of people", "Prompt")
    negative = wf.encode_text(ckpt.out("CLIP"), "blurry, deformed face, low quality", "Negative prompt")
    wf.column = 1
    build = wf.node("MagicPortrait_BuildMagicIDDataset", photos_folder=PHOTOS, dataset_folder=DATASET)
    wf.connect(analysis.out(0), build, "face_analysis")
    sheet = wf.node("PreviewImage", title="Samples: photo | skeleton | landmarks | face mask")
    wf.connect(build.out("preview"), sheet, "images")
    wf.column = 2
    train = wf.node("MagicPortrait_TrainRepControlNet", name=TRAINED_NAME, steps=40, resolution=512,
                    condition_type="magicid", checkpoint_every=20, modality_schedule="alternate",
                    clone_face_probability=0.3, face_loss_weight=1.0)
    wf.connect(ckpt.out("MODEL"), train, "model")
    wf.connect(ckpt.out("VAE"), train, "vae")
    wf.connect(prompt.out(0), train, "positive")
    wf.connect(build.out("dataset_folder"), train, "dataset_folder")
    loss = wf.node("LossGraphNode", filename_prefix="magic_portrait/magicid_mmf_loss")
    wf.connect(train.out(1), loss, "loss")
    wf.column = 3
    layout = wf.node("LoadImage", image=LAYOUT, title="Layout picture (its faces and skeleton)")
    detect = wf.node("MagicPortrait_DetectFaces", title="Detect Faces")
    wf.connect(analysis.out(0), detect, "face_analysis")
    wf.connect(layout.out("IMAGE"), detect, "image")
    pose = json.dumps(json.loads(LAYOUT_POSE.read_text(encoding="utf-8")), separators=(",", ":"))
    draw = wf.node("MagicPortrait_DrawFaceCondition", style="magicid_skeleton_landmarks", width=768, height=512,
                   pose_json=pose, title="Draw the merged condition (skeleton + landmarks)")
    wf.connect(detect.out("faces"), draw, "faces")
    show = wf.node("PreviewImage", title="Condition image")
    wf.connect(draw.out(0), show, "images")
    wf.column = 4
    apply = wf.node("MagicPortrait_ApplyRepControlNet", strength=1.0, merge_weights=True,
                    condition_modality="merged", untrained_modality="error")
    wf.connect(ckpt.out("MODEL"), apply, "model")
    wf.connect(train.out(0), apply, "repcontrolnet")
    wf.connect(draw.out(0), apply, "image")
    sampler = wf.sample(apply.out(0), prompt.out(0), negative.out(0), 768, 512, seed=42, steps=20, cfg=6.0,
                        sampler_name="euler", scheduler="normal", denoise=1.0)
    wf.column = 5
    wf.decode_and_save(sampler.out(0), ckpt.out("VAE"), "magic_portrait/magicid_mmf")
    wf.group_columns("Face back-end, model, prompts", "Photos in, MagicID dataset out",
                     "Train: MMF alternate + Clone Face Tuning", "Draw a merged condition",
                     "Apply the trained control and sample", "Decode and save")
    return wf


WORKFLOWS = {"magicid_dataset.json": magicid_dataset, "magicid_mmf_train.json": magicid_mmf_train}
