"""Build MagicID Dataset: photos in (a folder inside ComfyUI's input folder, or an IMAGE list from ComfyUI's dataset
nodes with POSE_KEYPOINT frames), a MagicID training dataset out (layout in magic_core.magicid_dataset), written to a
folder inside ComfyUI's input folder, where Train RepControlNet reads datasets.

Both folders are contained like Train RepControlNet's dataset_folder: relative to the input folder, no '..', no
absolute path unless the server sets MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import face_backends as fb
from ..magic_core import face_masks as fm
from ..magic_core import face_search as fs
from ..magic_core import magicid_build as mb
from ..magic_core import magicid_dataset as md
from .common import CATEGORY, PREFIX, NodeInputError
from .input_folders import resolve_input_folder
from .types import FaceAnalysisType, PoseKeypointType

BUNDLED_PHOTOS = "magic_portrait_magicid_photos"  # copied into the input folder by example_inputs.py
DEFAULT_DATASET = "magic_portrait_magicid_dataset"
MISSING_SKELETON = {"skip the photo": mb.SKIP, "keep it (landmark only)": mb.KEEP_LANDMARK_ONLY, "error": mb.ERROR}
BAD_PHOTO = {"skip the photo": mb.SKIP, "error": mb.ERROR}
PREVIEW_CELL = 160


def _first(value):
    """A widget value of a list-input node (ComfyUI passes every input as a list there)."""
    return value[0] if isinstance(value, list) else value


def _flat_images(images) -> list[torch.Tensor]:
    """An IMAGE list (or one batch) as single H x W x C images."""
    out = []
    for item in images if isinstance(images, list) else [images]:
        if not isinstance(item, torch.Tensor) or item.ndim not in (3, 4):
            raise ValueError("expected IMAGE (batch, height, width, channels)")
        out += [item] if item.ndim == 3 else list(item)
    return out


def _flat_frames(pose_keypoint) -> list:
    """POSE_KEYPOINT values (each a list of frames, one per image of its batch, or one frame) as one frame each."""
    out = []
    for item in pose_keypoint if isinstance(pose_keypoint, list) else [pose_keypoint]:
        out += list(item) if isinstance(item, (list, tuple)) else [item]
    return out


def _folder_state(folder: Path) -> tuple:
    if not folder.is_dir():
        return ("missing",)
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


class BuildMagicIDDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "BuildMagicIDDataset",
            display_name="Build MagicID Dataset (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Turn photos into a MagicID training dataset: per photo the faces (Face Analysis Loader's "
            "back-end), the landmark condition (Draw Face Condition's formats), the skeleton condition (OpenPose JSON "
            "beside each photo, or POSE_KEYPOINT from a DWPose/OpenPose preprocessor), the face mask, and one "
            "manifest line (boxes, keypoints, modalities, the photo's hash). A later run on a grown folder processes "
            "only the new or changed photos. Photos come from photos_folder (inside ComfyUI's input folder), or from "
            "an IMAGE list such as Load Image Dataset from Folder's. The dataset is written into dataset_folder, "
            "inside ComfyUI's input folder.",
            is_input_list=True,
            is_output_node=True,
            inputs=[
                FaceAnalysisType.Input("face_analysis"),
                io.String.Input("photos_folder", default=BUNDLED_PHOTOS,
                                tooltip="A folder inside ComfyUI's input folder: its images (png, jpg, webp, bmp) "
                                "with NAME.json or NAME_keypoints.json (OpenPose JSON) beside each. Not read when "
                                "images is connected. The default is the small set the pack copies there."),
                io.String.Input("dataset_folder", default=DEFAULT_DATASET,
                                tooltip="Where the dataset goes: a folder inside ComfyUI's input folder (created; "
                                "an existing dataset there is extended)."),
                io.Combo.Input("landmark_style", options=list(md.LANDMARK_STYLES), default="openpose_face",
                               tooltip="How faces are drawn: OpenPose face points, MediaPipe-style contours, or "
                               "InstantID's 5 keypoints (Draw Face Condition's styles)."),
                io.Int.Input("thickness", default=2, min=1, max=16, tooltip="Contour lines (landmark_contours), px."),
                io.Boolean.Input("skeleton_hands", default=True,
                                 tooltip="The skeleton condition draws the hands too (the body always; face points "
                                 "never: the face is the landmark modality)."),
                io.Combo.Input("mask_shape", options=list(fm.SHAPES), default="hull",
                               tooltip="Face mask: the landmark hull with the forehead, the ellipse in the box, or "
                               "the box."),
                io.Int.Input("mask_grow", default=0, min=-256, max=256, tooltip="Pixels (negative shrinks)."),
                io.Float.Input("mask_feather", default=0.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Soft edge of the face mask (Gaussian sigma, px)."),
                io.Int.Input("max_side", default=1024, min=0, max=8192, step=8,
                             tooltip="Photos longer than this are scaled down first (0: keep every size)."),
                io.Int.Input("min_face", default=int(fs.DEFAULT_MIN_FACE), min=8, max=4096,
                             tooltip="Smallest face to find, px of the (scaled) photo: the detection scale keeps it "
                             "above the back-end's floor (as Detect Faces)."),
                io.Int.Input("det_size", default=640, min=64, max=2048, step=32,
                             tooltip="Least detection size (as Detect Faces)."),
                io.Float.Input("score_threshold", default=0.5, min=0.0, max=1.0, step=0.01),
                io.Int.Input("min_face_size", default=0, min=0, max=8192, tooltip="Drop faces smaller than this (px)."),
                io.Combo.Input("missing_skeleton", options=list(MISSING_SKELETON), default="skip the photo",
                               tooltip="A photo without a usable skeleton (no JSON, bad JSON, no person): skipped and "
                               "named in the report, kept with the landmark modality only, or an error."),
                io.Combo.Input("bad_photo", options=list(BAD_PHOTO), default="skip the photo",
                               tooltip="An unreadable file or a photo without a face: skipped and named in the "
                               "report, or an error."),
                io.Boolean.Input("rebuild", default=False,
                                 tooltip="Drop every sample and build them all again (needed to change the drawing "
                                 "settings of an existing dataset)."),
                io.Image.Input("images", optional=True,
                               tooltip="Photos as an IMAGE list (e.g. Load Image Dataset from Folder) or batch; "
                               "samples are named by the pixels' hash. Replaces photos_folder."),
                PoseKeypointType.Input("pose_keypoint", optional=True,
                                       tooltip="One POSE_KEYPOINT frame per image of images (DWPose/OpenPose "
                                       "preprocessors give one per image)."),
            ],
            outputs=[
                io.String.Output(display_name="dataset_folder",
                                 tooltip="The dataset's folder, relative to ComfyUI's input folder."),
                io.Image.Output(display_name="preview",
                                tooltip="Photo, skeleton, landmark and face mask of up to 8 samples (this run's "
                                "first)."),
                io.Int.Output(display_name="samples"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, photos_folder, dataset_folder, **kwargs):
        """Runs again when the photos folder or the dataset changed on disk, not only when an input did."""
        node = PREFIX + "BuildMagicIDDataset"
        try:
            photos = resolve_input_folder(node, "photos_folder", _first(photos_folder), access="read and write")
            dataset = resolve_input_folder(node, "dataset_folder", _first(dataset_folder), access="read and write")
            return (_folder_state(photos), _folder_state(dataset))
        except (NodeInputError, OSError):
            return float("nan")  # never equal: the node runs and reports the problem

    @classmethod
    def execute(cls, face_analysis, photos_folder, dataset_folder, landmark_style, thickness, skeleton_hands,
                mask_shape, mask_grow, mask_feather, max_side, min_face, det_size, score_threshold, min_face_size,
                missing_skeleton, bad_photo, rebuild, images=None, pose_keypoint=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        analyzer = _first(face_analysis)
        if not isinstance(analyzer, fb.FaceAnalyzer):
            raise NodeInputError(node, "face_analysis", "expected MAGIC_FACE_ANALYSIS from Face Analysis Loader")
        dataset_name = str(_first(dataset_folder)).strip()
        target = resolve_input_folder(node, "dataset_folder", dataset_name, access="read and write")
        try:
            settings = md.BuildSettings(landmark_style=_first(landmark_style), thickness=_first(thickness),
                                        skeleton_hands=_first(skeleton_hands), mask_shape=_first(mask_shape),
                                        mask_grow=_first(mask_grow), mask_feather=_first(mask_feather),
                                        max_side=_first(max_side))
        except ValueError as err:
            raise NodeInputError(node, "landmark_style", str(err)) from None
        photos, source_input = cls._photos(node, photos_folder, target, images, pose_keypoint)
        detect = mb.DetectOptions(min_face=_first(min_face), det_size=_first(det_size), score_threshold=_first(score_threshold),
                                  min_size=_first(min_face_size))
        pbar = comfy.utils.ProgressBar(max(1, len(photos)))

        def progress(done, total, source):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        try:
            report = mb.build_dataset(photos, target, analyzer, settings, detect=detect,
                                      missing_skeleton=MISSING_SKELETON[_first(missing_skeleton)],
                                      bad_input=BAD_PHOTO[_first(bad_photo)], rebuild=bool(_first(rebuild)),
                                      on_progress=progress)
        except mb.BadInput as bad:
            skeleton = bad.kind in (mb.NO_SKELETON, mb.BAD_SKELETON)
            name = "pose_keypoint" if skeleton and source_input == "images" else source_input
            fix = ("set missing_skeleton to 'skip the photo' or 'keep it (landmark only)'" if skeleton
                   else "set bad_photo to 'skip the photo'")
            raise NodeInputError(node, name, f"{bad} (or {fix}); samples finished before it are kept") from None
        except md.DatasetError as err:
            raise NodeInputError(node, "dataset_folder", str(err)) from None
        dataset = md.MagicIDDataset(target)
        shown = [*report.added, *report.replaced]
        shown += [r.name for r in reversed(dataset.records) if r.name not in shown]
        by_name = {r.name: r for r in dataset.records}
        sheet = md.preview_sheet([dataset.load(by_name[n]) for n in shown[:8]], PREVIEW_CELL)
        preview = torch.from_numpy(sheet).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(dataset_name, preview, report.total, ui=ui.PreviewText(report.text()))

    @classmethod
    def _photos(cls, node, photos_folder, target, images, pose_keypoint) -> tuple[list[mb.Photo], str]:
        if images is not None:
            try:
                pictures = _flat_images(images)
            except ValueError as err:
                raise NodeInputError(node, "images", str(err)) from None
            frames = None
            if pose_keypoint is not None:
                frames = _flat_frames(pose_keypoint)
                if len(frames) != len(pictures):
                    raise NodeInputError(node, "pose_keypoint", f"holds {len(frames)} frame(s) for {len(pictures)} "
                                         "image(s): give one frame per image (a DWPose/OpenPose preprocessor run on "
                                         "the same images)")
            return mb.image_photos(pictures, frames), "images"
        if pose_keypoint is not None:
            raise NodeInputError(node, "pose_keypoint", "is used with images only: photos from photos_folder take "
                                 "their skeletons from the OpenPose JSON beside each photo")
        folder = resolve_input_folder(node, "photos_folder", _first(photos_folder), access="read and write")
        if not folder.is_dir():
            raise NodeInputError(node, "photos_folder", f"'{folder}' is not a folder: put your photos (with "
                                 "NAME.json skeletons beside them) in a folder inside ComfyUI's input folder and name "
                                 f"it here (the pack copies its own small set there as {BUNDLED_PHOTOS})")
        if folder.resolve() == target.resolve():
            raise NodeInputError(node, "dataset_folder", "is the photos folder: write the dataset into a folder of "
                                 "its own")
        photos = mb.folder_photos(folder)
        if not photos:
            raise NodeInputError(node, "photos_folder", f"'{folder}' has no images ({', '.join(mb.IMAGE_SUFFIXES)}) "
                                 "at its top level")
        return photos, "photos_folder"


NODES = [BuildMagicIDDataset]
