"""MagicID dataset example workflow (collected by scripts/make_workflows.py): the shipped photo set turned into a
MagicID training dataset with Build MagicID Dataset, its contact sheet saved. Runs as opened: the photos and their
skeleton JSON reach ComfyUI's input folder by the pack's copy on load, and the face back-end is the offline one."""

from __future__ import annotations

from magic_portrait.workflow_builder import Workflow

OFFLINE = "offline (dlib: no download)"
PHOTOS = "magic_portrait_magicid_photos"  # example_workflows/<this>, copied to ComfyUI/input on load
DATASET = "magic_portrait_magicid_dataset"


def magicid_dataset(classes) -> Workflow:
    wf = Workflow(classes)
    wf.column = 0
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
    wf.group("Face back-end", [0])
    wf.group("Photos in, MagicID dataset out", [1])
    wf.group("Contact sheet", [2])
    return wf


WORKFLOWS = {"magicid_dataset.json": magicid_dataset}
