"""ComfyUI tier: Build MagicID Dataset in graphs run through ComfyUI's prompt validation and executor, beside
ComfyUI's own nodes (Load Image Dataset from Folder, SaveImage), with the offline dlib face back-end on the photo set
the pack ships (real photos and their OpenPose JSON): the folder route, a grown folder, the IMAGE-list route with
POSE_KEYPOINT frames, bad inputs and contained folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import comfy_folders
from PIL import Image

from magic_core import magicid_dataset as md

P = "MagicPortrait_"
REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "example_workflows" / "magic_portrait_magicid_photos"
POSE_NODE = "MagicPortraitTest_PoseKeypointFromJSON"


class PoseKeypointFromJSON:
    """A stand-in for a DWPose/OpenPose preprocessor node (comfyui_controlnet_aux, whose models download at first
    use, so it cannot run here): it outputs POSE_KEYPOINT, a list of OpenPose frames, from JSON text."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {"frames": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("POSE_KEYPOINT",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, frames):
        return (json.loads(frames),)


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory):
    import nodes

    root = tmp_path_factory.mktemp("magicid_dataset_graphs")
    nodes.NODE_CLASS_MAPPINGS[POSE_NODE] = PoseKeypointFromJSON
    with comfy_folders(root):
        yield root
    nodes.NODE_CLASS_MAPPINGS.pop(POSE_NODE, None)


def photos_in_input(workdir: Path, folder: str, names) -> Path:
    target = workdir / "input" / folder
    target.mkdir(parents=True, exist_ok=True)
    for path in PHOTOS.iterdir():
        if path.stem in names and path.suffix != ".txt":
            shutil.copy2(path, target / path.name)
    return target


def build_graph(**inputs) -> dict:
    build = {"face_analysis": ["analysis", 0], "photos_folder": "photos", "dataset_folder": "dataset",
             "landmark_style": "openpose_face", "thickness": 2, "skeleton_hands": True, "mask_shape": "hull",
             "mask_grow": 0, "mask_feather": 0.0, "max_side": 1024, "min_face": 48, "det_size": 640, "score_threshold": 0.5,
             "min_face_size": 0, "missing_skeleton": "skip the photo", "bad_photo": "skip the photo",
             "rebuild": False}
    build.update(inputs)
    return {
        "analysis": {"class_type": P + "FaceAnalysisLoader", "inputs": {
            "backend": "offline (dlib: no download)", "insightface_pack": "antelopev2", "providers": "cpu",
            "dlib_detector": "hog"}},
        "build": {"class_type": P + "BuildMagicIDDataset", "inputs": build},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["build", 1], "filename_prefix": "magicid"}},
    }


def report_of(out) -> str:
    return out["build"]["text"][0]


def test_folder_route_builds_and_a_grown_folder_adds_only_the_new_photos(comfy, workdir):
    photos = photos_in_input(workdir, "photos", ("astronaut", "group_trio"))
    out = comfy.run_prompt(build_graph())
    text = report_of(out)
    assert text.startswith("dataset: 2 sample(s) (skeleton 2, landmark 2); this run: 2 added"), text
    dataset = md.MagicIDDataset(workdir / "input" / "dataset")
    assert sorted(dataset.names()) == ["astronaut", "group_trio"] and len(dataset.pairs("skeleton")) == 2
    (saved,) = out["save"]["images"]
    sheet = np.asarray(Image.open(workdir / "output" / saved["subfolder"] / saved["filename"]))
    assert sheet.shape == (2 * 160, 4 * 160, 3) and sheet.max() > 0  # one row per sample
    manifest = (workdir / "input" / "dataset" / md.MANIFEST_FILE).read_bytes()
    # the same prompt again, with the folder grown: ComfyUI runs the node again (the folder changed) and only the new
    # photos are processed
    for path in PHOTOS.iterdir():
        if path.stem in ("group_duo", "group_quartet"):
            shutil.copy2(path, photos / path.name)
    text = report_of(comfy.run_prompt(build_graph()))
    assert "4 sample(s) (skeleton 4, landmark 4); this run: 2 added, 0 replaced, 2 already there" in text, text
    assert (workdir / "input" / "dataset" / md.MANIFEST_FILE).read_bytes().startswith(manifest)
    assert sorted(md.MagicIDDataset(workdir / "input" / "dataset").names()) == [
        "astronaut", "group_duo", "group_quartet", "group_trio"]


def test_bad_photos_are_named_and_skipped_or_an_error_naming_the_node_and_input(comfy, workdir):
    from magic_portrait.comfy_env import WorkflowError

    photos = photos_in_input(workdir, "bad_photos", ("group_duo",))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.fromarray(np.full((200, 300, 3), 100, np.uint8)).save(photos / "empty_wall.png")
    (photos / "empty_wall.json").write_text((PHOTOS / "group_duo.json").read_text())
    shutil.copy2(PHOTOS / "reference_2.png", photos / "no_json.png")
    text = report_of(comfy.run_prompt(build_graph(photos_folder="bad_photos", dataset_folder="bad_dataset")))
    assert "1 added" in text and "3 skipped" in text, text
    for line in ("skipped broken.jpg: unreadable image", "skipped empty_wall.png: no face found",
                 "skipped no_json.png: no skeleton"):
        assert line in text, (line, text)
    assert md.MagicIDDataset(workdir / "input" / "bad_dataset").names() == ["group_duo"]
    with pytest.raises(WorkflowError, match=r"MagicPortrait_BuildMagicIDDataset.*input 'photos_folder'.*"
                                            r"broken\.jpg: unreadable image"):
        comfy.run_prompt(build_graph(photos_folder="bad_photos", dataset_folder="bad_dataset_2", bad_photo="error"))
    with pytest.raises(WorkflowError, match=r"input 'photos_folder'.*no_json\.png: no skeleton.*missing_skeleton"):
        comfy.run_prompt(build_graph(photos_folder="bad_photos", dataset_folder="bad_dataset_3",
                                     missing_skeleton="error"))
    left = {p.name for p in (workdir / "input" / "bad_dataset_3").iterdir()}
    listed = {n for r in md.MagicIDDataset(workdir / "input" / "bad_dataset_3").records for n in r.files.values()}
    assert left - {"dataset.json", "manifest.jsonl"} == listed  # no partial sample
    text = report_of(comfy.run_prompt(build_graph(photos_folder="bad_photos", dataset_folder="bad_dataset_4",
                                                  missing_skeleton="keep it (landmark only)")))
    assert "2 sample(s) (skeleton 1, landmark 2)" in text and "landmark only (no skeleton): no_json" in text, text


def test_image_list_route_with_comfyui_dataset_loader_and_pose_keypoint(comfy, workdir):
    """Load Image Dataset from Folder (ComfyUI's own) gives an IMAGE list; one POSE_KEYPOINT frame per image; the
    samples equal those the folder route makes of the same PNG photos."""
    names = ("group_trio", "group_duo")
    folder = workdir / "input" / "list_photos"
    folder.mkdir()
    for name in names:
        shutil.copy2(PHOTOS / f"{name}.png", folder / f"{name}.png")
    order = [Path(f).stem for f in os.listdir(folder)]  # the loader's own (unsorted) order
    frames = [json.loads((PHOTOS / f"{name}.json").read_text()) for name in order]
    prompt = build_graph(dataset_folder="list_dataset", images=["load", 0], pose_keypoint=["pose", 0])
    prompt["load"] = {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "list_photos"}}
    prompt["pose"] = {"class_type": POSE_NODE, "inputs": {"frames": json.dumps(frames)}}
    text = report_of(comfy.run_prompt(prompt))
    assert "2 sample(s) (skeleton 2, landmark 2); this run: 2 added" in text, text
    listed = md.MagicIDDataset(workdir / "input" / "list_dataset")
    assert all(n.startswith("image_") for n in listed.names())
    reference_folder = photos_in_input(workdir, "png_photos", names)
    for path in reference_folder.glob("*.jpg"):
        path.unlink()
    comfy.run_prompt(build_graph(photos_folder="png_photos", dataset_folder="png_dataset"))
    reference = {s.name: s for s in md.MagicIDDataset(workdir / "input" / "png_dataset")}
    for name, sample in zip(order, listed, strict=True):
        np.testing.assert_array_equal(sample.image, reference[name].image)
        for modality in md.MODALITIES:
            np.testing.assert_array_equal(sample.condition(modality), reference[name].condition(modality))
    # a frame count that does not match the images is refused, naming the input
    from magic_portrait.comfy_env import WorkflowError

    prompt["pose"]["inputs"]["frames"] = json.dumps(frames[:1])
    with pytest.raises(WorkflowError, match=r"input 'pose_keypoint': holds 1 frame\(s\) for 2 image\(s\)"):
        comfy.run_prompt(prompt)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("dataset_folder", "../outside", "contains '..'"),
    ("dataset_folder", "<absolute>", "is an absolute path"),
    ("photos_folder", "../../etc", "contains '..'"),
    ("photos_folder", "no_such_folder", "is not a folder"),
    ("dataset_folder", "photos", "is the photos folder"),
])
def test_folders_stay_inside_the_input_folder(comfy, workdir, name, value, message):
    from magic_portrait.comfy_env import WorkflowError

    photos_in_input(workdir, "photos", ("group_duo",))
    elsewhere = workdir / "elsewhere"  # outside the input folder
    value = str(elsewhere) if value == "<absolute>" else value
    with pytest.raises(WorkflowError, match=rf"input '{name}'.*{message}"):
        comfy.run_prompt(build_graph(**{name: value}))
    assert not (workdir / "outside").exists() and not elsewhere.exists()


def test_absolute_folders_only_when_the_server_opts_in(comfy, workdir, monkeypatch):
    photos = photos_in_input(workdir, "opted_in_photos", ("group_duo",))  # a folder of its own: one photo
    target = workdir / "opted_in_dataset"
    monkeypatch.setenv("MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET", "1")
    text = report_of(comfy.run_prompt(build_graph(photos_folder=str(photos), dataset_folder=str(target))))
    assert "this run: 1 added" in text and md.MagicIDDataset(target).names() == ["group_duo"]
