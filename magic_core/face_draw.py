"""Condition images that public ControlNets already understand, drawn from faces and OpenPose keypoints.

Every drawing function returns a new uint8 RGB [H, W, 3] image on a black background, is deterministic (the same
input gives the same bytes) and mutates nothing it is given. Coordinates are pixels of the target image (x right,
y down); ``rescale_faces`` brings faces found at another size to the target size. numpy + OpenCV only, no ComfyUI.

Formats (each reproduced from its reference implementation, not approximated):

- ``draw_instantid_kps``: InstantID's 5-keypoint condition (``draw_kps`` in InstantX/InstantID
  ``pipeline_stable_diffusion_xl_instantid.py``): keypoint colours red, green, blue, yellow, magenta (RGB) for the
  image-left eye, image-right eye, nose tip, image-left and image-right mouth corner; four limbs from the eyes and
  mouth corners to the nose, each a filled ``cv2.ellipse2Poly`` polygon (half length, stick width 4, integer angle,
  1 degree steps) in its outer keypoint's colour; the limb layer is multiplied by 0.6; then a filled circle of
  radius 10 per keypoint in full colour. Several faces: all limbs, then the 0.6 dim, then all circles.
- ``draw_openpose_face``: OpenPose face points as the openpose-face ControlNets were trained with (``draw_facepose``
  in ControlNet v1.1's annotator, lllyasviel/ControlNet-v1-1-nightly ``annotator/openpose/util.py``, kept unchanged
  in huggingface/controlnet_aux ``open_pose/util.py`` and Fannovel16/comfyui_controlnet_aux ``dwpose/util.py``): a
  filled white circle of radius 3 per point at ``(int(x), int(y))``, drawn only when both integer coordinates are
  > 0.01 (that is >= 1: the format's visibility rule, which also hides OpenPose's "missing" points at -1).
  OpenPose's face has 70 points: the 68 iBUG points and the two pupils (68 = the person's right = the image-left
  eye, 69 = the other; DWPose fills them from its body eyes); here the pupils are the eye centres (mean of iBUG 36-41
  and 42-47). A face without iBUG 68 landmarks is drawn as its 5 keypoints, which are OpenPose face points too
  (pupils 68/69, nose tip 30, mouth corners 48/54); insightface's 106 points have no place in this format.
- ``draw_landmark_contours``: full contours in the MediaPipe-face palette of CrucibleAI's ControlNetMediaPipeFace
  (its annotator, as kept in ``mediapipe_face/mediapipe_face_common.py`` of controlnet_aux: colours given in BGR and
  the image channel-reversed at the end, lines of thickness 2, pupils as 4 x 4 squares). Mapped onto iBUG 68
  (RGB, "right" = the person's right = the image's left, as in MediaPipe):
  jaw (open polyline; MediaPipe's face oval) ``(10, 200, 10)``; right brow ``(180, 220, 10)``, left brow
  ``(10, 220, 180)``; right eye (closed) ``(180, 200, 10)``, left eye ``(10, 200, 180)``; outer and inner lips
  (closed) ``(10, 180, 10)``; right pupil ``(250, 200, 10)``, left pupil ``(10, 200, 250)``. MediaPipe's contour set
  has no nose: the nose bridge (27-30) and base (31-35) are ours, in ``NOSE_COLOR`` (magenta, apart from every
  MediaPipe colour; ``nose=False`` leaves it out). Faces with only insightface 106 landmarks: their index groups
  could not be verified from a public source, so their points are drawn as dots in the jaw colour, plus the pupils
  from the keypoints. Faces with only keypoints: pupils, the mouth-corner segment and a nose-tip dot.
- ``draw_body_skeleton``: OpenPose body (COCO 18) as controlnet_aux's ``draw_bodypose`` (same files): 17 limbs, each
  a filled ``ellipse2Poly`` polygon (stick width 4, integer angle) in 0.6 x its colour, then a filled circle of
  radius 4 per joint in its full colour (``BODY_COLORS``: nose red, neck (255, 85, 0), ...); optionally xinsir's
  stick scaling. (ControlNet v1.1 draws every body's limbs, dims the canvas by 0.6, then draws the joints: the same
  pixels unless two people overlap.) Hands as ``draw_handpose``: 20 edges of thickness 2 in HSV rainbow colours
  (hue = edge / 20, matplotlib's hsv_to_rgb float for float), joints as blue (0, 0, 255) circles of radius 4, both
  with the 0.01 rule. The frame's own face points as ``draw_facepose``. People are drawn in order, each body, left
  hand, right hand, face.
- ``draw_magicid_condition``: the body skeleton (and hands) of a POSE_KEYPOINT frame merged with the detected
  faces drawn over it (OpenPose points or contours). Detections win: a person's own face keypoints are dropped when
  their centroid lies in a detected face's box grown by ``FACE_MATCH_MARGIN`` of its size on each side; people whose
  face was not detected keep their own face keypoints (drawn in the same style; they are iBUG-ordered).

POSE_KEYPOINT (comfyui_controlnet_aux's OpenPose/DWPose output, the OpenPose JSON layout): a list with one frame per
image, each ``{"people": [{"pose_keypoints_2d": [x, y, c, ...] (18 COCO points; BODY_25 is converted),
"face_keypoints_2d": 68 or 70 points, "hand_left_keypoints_2d": 21, "hand_right_keypoints_2d": 21}, ...],
"canvas_width": W, "canvas_height": H}`` (parts may be null or empty; nested ``[[x, y, c], ...]`` lists are accepted
too). A point is missing when ``c <= 0`` (controlnet_aux writes missing points as ``0, 0, 0``; OpenPose's face/hand
detector writes missing points at -1, which the 0.01 rule hides) or when a coordinate is not finite. Coordinates are
normalised to [0, 1] of the canvas (OpenPose preprocessor) or in canvas pixels (current DWPose): decided per person,
normalised when every present coordinate has ``|v| <= NORMALISED_MAX`` (1.5: points a little outside the canvas stay
normalised, while a whole person within 1.5 pixels is no pose), else pixels of the frame's canvas. Drawing scales
the canvas to the target size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .faces import (
    IBUG68_INNER_LIPS,
    IBUG68_JAW,
    IBUG68_LEFT_BROW,
    IBUG68_LEFT_EYE,
    IBUG68_NOSE_BASE,
    IBUG68_NOSE_BRIDGE,
    IBUG68_OUTER_LIPS,
    IBUG68_RIGHT_BROW,
    IBUG68_RIGHT_EYE,
    Face,
)

# --- InstantID (draw_kps) -------------------------------------------------------------------------------------
INSTANTID_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
INSTANTID_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
INSTANTID_STICK_WIDTH = 4
INSTANTID_LIMB_DIM = 0.6
INSTANTID_RADIUS = 10

# --- OpenPose (draw_bodypose / draw_handpose / draw_facepose) ------------------------------------------------
OPENPOSE_EPS = 0.01
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# COCO 18: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left, 8-10 right hip/knee/ankle, 11-13 left,
# 14 right eye, 15 left eye, 16 right ear, 17 left ear. Limb i is drawn in BODY_COLORS[i].
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
BODY_STICK_WIDTH = 4
BODY_LIMB_DIM = 0.6
BODY_RADIUS = 4
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
HAND_LINE_THICKNESS = 2
HAND_RADIUS = 4
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_COLOR = (255, 255, 255)
FACE_POINT_RADIUS = 3

# --- MediaPipe-face palette (RGB) on iBUG 68 ------------------------------------------------------------------
JAW_COLOR = (10, 200, 10)
RIGHT_BROW_COLOR = (180, 220, 10)
LEFT_BROW_COLOR = (10, 220, 180)
RIGHT_EYE_COLOR = (180, 200, 10)
LEFT_EYE_COLOR = (10, 200, 180)
LIPS_COLOR = (10, 180, 10)
RIGHT_PUPIL_COLOR = (250, 200, 10)
LEFT_PUPIL_COLOR = (10, 200, 250)
NOSE_COLOR = (220, 10, 220)  # not a MediaPipe part: ours
PUPIL_HALF_WIDTH = 2
# (name, iBUG indices, closed, colour), in drawing order
CONTOUR_PARTS = (
    ("jaw", IBUG68_JAW, False, JAW_COLOR),
    ("right_brow", IBUG68_RIGHT_BROW, False, RIGHT_BROW_COLOR),
    ("left_brow", IBUG68_LEFT_BROW, False, LEFT_BROW_COLOR),
    ("nose_bridge", IBUG68_NOSE_BRIDGE, False, NOSE_COLOR),
    ("nose_base", IBUG68_NOSE_BASE, False, NOSE_COLOR),
    ("right_eye", IBUG68_RIGHT_EYE, True, RIGHT_EYE_COLOR),
    ("left_eye", IBUG68_LEFT_EYE, True, LEFT_EYE_COLOR),
    ("outer_lips", IBUG68_OUTER_LIPS, True, LIPS_COLOR),
    ("inner_lips", IBUG68_INNER_LIPS, True, LIPS_COLOR),
)

FACE_STYLES = ("openpose", "contours")
NORMALISED_MAX = 1.5
FACE_MATCH_MARGIN = 0.2
_FAR = 1.0e6  # pixel coordinates are clamped to +-this before OpenCV sees them


# ------------------------------------------------------------------------------------------------------------
# helpers


def _check_size(height, width) -> tuple[int, int]:
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1 or h != height or w != width:
        raise ValueError(f"image size must be two positive integers, got height={height!r}, width={width!r}")
    return h, w


def _faces(faces) -> list[Face]:
    if faces is None:
        return []
    if isinstance(faces, Face):
        return [faces]
    out = list(faces)
    for i, f in enumerate(out):
        if not isinstance(f, Face):
            raise ValueError(f"faces[{i}] is a {type(f).__name__}, not a Face")
    return out


def _trunc(v) -> int:
    """Python's int() (truncation toward zero), as the reference drawing code uses, on a clamped value."""
    return int(min(max(float(v), -_FAR), _FAR))


def _floor(v) -> int:
    return int(math.floor(min(max(float(v), -_FAR), _FAR)))


def rescale_faces(faces, source_size: tuple[int, int], target_size: tuple[int, int]) -> list[Face]:
    """Faces found in an image of ``source_size`` (height, width), with every coordinate mapped to an image of
    ``target_size`` (height, width): x scales by target_w / source_w, y by target_h / source_h (pixel coordinates
    are continuous, pixel j spanning [j, j + 1), so the map is exact). New Face objects; the inputs are unchanged."""
    sh, sw = _check_size(*source_size)
    th, tw = _check_size(*target_size)
    return [f.scaled(tw / sw, th / sh) for f in _faces(faces)]


def pupils_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """OpenPose face points 68 and 69 from iBUG 68: the eye centres (person's right = image-left eye first)."""
    lm = np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)
    return np.stack([lm[list(IBUG68_RIGHT_EYE)].mean(axis=0), lm[list(IBUG68_LEFT_EYE)].mean(axis=0)])


def openpose_face_points(face: Face) -> np.ndarray:
    """The OpenPose face points drawn for a face: 70 (iBUG 68 + pupils) when it has iBUG 68 landmarks, else its 5
    keypoints (which are OpenPose face points 68, 69, 30, 48, 54). float64 [N, 2]."""
    if face.landmarks68 is not None:
        lm = face.landmarks68.astype(np.float64)
        return np.concatenate([lm, pupils_from_68(lm)])
    return face.kps.astype(np.float64)


# ------------------------------------------------------------------------------------------------------------
# InstantID


def draw_instantid_kps(faces, height: int, width: int) -> np.ndarray:
    """InstantID's 5-keypoint condition for every face (module docstring for the exact format)."""
    h, w = _check_size(height, width)
    faces = _faces(faces)
    layer = np.zeros((h, w, 3), dtype=np.float64)
    for face in faces:
        kps = face.kps  # float32, as insightface hands them to draw_kps
        for a, b in INSTANTID_LIMBS:
            pair = kps[[a, b]]
            xs, ys = pair[:, 0], pair[:, 1]
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            poly = cv2.ellipse2Poly((_trunc(np.mean(xs)), _trunc(np.mean(ys))),
                                    (_trunc(length / 2), INSTANTID_STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(layer, poly, INSTANTID_COLORS[a])
    out = (layer * INSTANTID_LIMB_DIM).astype(np.uint8)
    for face in faces:
        for i, (x, y) in enumerate(face.kps):
            cv2.circle(out, (_trunc(x), _trunc(y)), INSTANTID_RADIUS, INSTANTID_COLORS[i], -1)
    return out


# ------------------------------------------------------------------------------------------------------------
# OpenPose drawing on a canvas (in place; callers own the canvas)


def _draw_facepose(canvas: np.ndarray, xy: np.ndarray, visible: np.ndarray) -> None:
    for (x, y), vis in zip(xy, visible, strict=True):
        if not vis:
            continue
        xi, yi = _trunc(x), _trunc(y)
        if xi > OPENPOSE_EPS and yi > OPENPOSE_EPS:
            cv2.circle(canvas, (xi, yi), FACE_POINT_RADIUS, FACE_POINT_COLOR, -1)


def _hsv_edge_color(index: int, count: int) -> tuple[float, float, float]:
    # matplotlib.colors.hsv_to_rgb([index / count, 1, 1]) * 255, with the same float operations
    hue = index / float(count)
    i = int(hue * 6.0)
    f = hue * 6.0 - i
    p, q, t = 1.0 * (1.0 - 1.0), 1.0 * (1.0 - 1.0 * f), 1.0 * (1.0 - 1.0 * (1.0 - f))
    rgb = ((1.0, t, p), (q, 1.0, p), (p, 1.0, t), (p, q, 1.0), (t, p, 1.0), (1.0, p, q))[i % 6]
    return tuple(float(c * 255) for c in rgb)


HAND_EDGE_COLORS = tuple(_hsv_edge_color(i, len(HAND_EDGES)) for i in range(len(HAND_EDGES)))


def _draw_handpose(canvas: np.ndarray, xy: np.ndarray, visible: np.ndarray) -> None:
    pts = [(_trunc(x), _trunc(y)) for x, y in xy]
    for (a, b), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
        if not (visible[a] and visible[b]):
            continue
        (x1, y1), (x2, y2) = pts[a], pts[b]
        if x1 > OPENPOSE_EPS and y1 > OPENPOSE_EPS and x2 > OPENPOSE_EPS and y2 > OPENPOSE_EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=HAND_LINE_THICKNESS)
    for (x, y), vis in zip(pts, visible, strict=True):
        if vis and x > OPENPOSE_EPS and y > OPENPOSE_EPS:
            cv2.circle(canvas, (x, y), HAND_RADIUS, HAND_POINT_COLOR, -1)


def _stick_scale(height: int, width: int, xinsir: bool) -> int:
    # xinsir/controlnet-openpose-sdxl-1.0 was trained with thicker sticks on big images
    max_side = max(height, width)
    return 1 if not xinsir or max_side < 500 else min(2 + max_side // 1000, 7)


def _draw_bodypose(canvas: np.ndarray, xy: np.ndarray, visible: np.ndarray, stick_scale: int) -> None:
    for (a, b), color in zip(BODY_LIMBS, BODY_COLORS, strict=False):
        if not (visible[a] and visible[b]):
            continue
        xs, ys = xy[[a, b], 0], xy[[a, b], 1]
        mx, my = (xs[0] + xs[1]) / 2.0, (ys[0] + ys[1]) / 2.0
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly((_trunc(mx), _trunc(my)), (_trunc(min(length, 4 * _FAR) / 2),
                                                           BODY_STICK_WIDTH * stick_scale), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(float(c) * BODY_LIMB_DIM) for c in color])
    for (x, y), vis, color in zip(xy, visible, BODY_COLORS, strict=True):
        if vis:
            cv2.circle(canvas, (_trunc(x), _trunc(y)), BODY_RADIUS, color, -1)


# ------------------------------------------------------------------------------------------------------------
# landmark contours (MediaPipe-face palette)


def _pupil(canvas: np.ndarray, x: float, y: float, color) -> None:
    xi, yi = _floor(x), _floor(y)
    hw = PUPIL_HALF_WIDTH
    cv2.rectangle(canvas, (xi - hw, yi - hw), (xi + hw - 1, yi + hw - 1), color, -1)


def _draw_contours68(canvas: np.ndarray, lm: np.ndarray, visible: np.ndarray, pupils: np.ndarray | None,
                     pupils_visible, thickness: int, nose: bool) -> None:
    pts = [(_floor(x), _floor(y)) for x, y in lm]
    for name, idx, closed, color in CONTOUR_PARTS:
        if not nose and name.startswith("nose"):
            continue
        seq = list(idx) + ([idx[0]] if closed else [])
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            if visible[a] and visible[b]:
                cv2.line(canvas, pts[a], pts[b], color, thickness)
    if pupils is not None:
        for (x, y), vis, color in zip(pupils, pupils_visible, (RIGHT_PUPIL_COLOR, LEFT_PUPIL_COLOR), strict=True):
            if vis:
                _pupil(canvas, x, y, color)


def _draw_face_contours(canvas: np.ndarray, face: Face, thickness: int, nose: bool, pupils: bool) -> None:
    if face.landmarks68 is not None:
        lm = face.landmarks68.astype(np.float64)
        _draw_contours68(canvas, lm, np.ones(68, bool), pupils_from_68(lm) if pupils else None, (True, True),
                         thickness, nose)
        return
    kps = face.kps.astype(np.float64)
    if face.landmarks106 is not None:
        radius = max(1, thickness // 2)
        for x, y in face.landmarks106:
            cv2.circle(canvas, (_floor(x), _floor(y)), radius, JAW_COLOR, -1)
    else:
        cv2.line(canvas, (_floor(kps[3, 0]), _floor(kps[3, 1])), (_floor(kps[4, 0]), _floor(kps[4, 1])),
                 LIPS_COLOR, thickness)
        if nose:
            cv2.circle(canvas, (_floor(kps[2, 0]), _floor(kps[2, 1])), max(1, thickness // 2), NOSE_COLOR, -1)
    if pupils:
        _pupil(canvas, kps[0, 0], kps[0, 1], RIGHT_PUPIL_COLOR)
        _pupil(canvas, kps[1, 0], kps[1, 1], LEFT_PUPIL_COLOR)


def _check_thickness(thickness) -> int:
    t = int(thickness)
    if t < 1 or t != thickness:
        raise ValueError(f"thickness must be a positive integer number of pixels, got {thickness!r}")
    return t


# ------------------------------------------------------------------------------------------------------------
# public face drawing


def draw_openpose_face(faces, height: int, width: int) -> np.ndarray:
    """OpenPose face points (70 with pupils; 5 keypoints for faces without iBUG 68) as white dots of radius 3."""
    h, w = _check_size(height, width)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for face in _faces(faces):
        pts = openpose_face_points(face)
        _draw_facepose(canvas, pts, np.ones(len(pts), bool))
    return canvas


def draw_landmark_contours(faces, height: int, width: int, thickness: int = 2, nose: bool = True,
                           pupils: bool = True) -> np.ndarray:
    """Full landmark contours in the MediaPipe-face palette (module docstring: parts, colours, fallbacks)."""
    h, w = _check_size(height, width)
    thickness = _check_thickness(thickness)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for face in _faces(faces):
        _draw_face_contours(canvas, face, thickness, nose, pupils)
    return canvas


FACE_CONDITION_STYLES = ("openpose_face", "instantid_kps", "landmark_contours")  # drawn from the faces alone


def draw_face_condition(style: str, faces, height: int, width: int, thickness: int = 2) -> np.ndarray:
    """One of FACE_CONDITION_STYLES drawn for `faces`: the one dispatch of every node that draws a face
    condition."""
    if style == "openpose_face":
        return draw_openpose_face(faces, height, width)
    if style == "instantid_kps":
        return draw_instantid_kps(faces, height, width)
    if style == "landmark_contours":
        return draw_landmark_contours(faces, height, width, thickness=thickness)
    raise ValueError(f"unknown face condition style {style!r}; choose one of "
                     f"{', '.join(FACE_CONDITION_STYLES)}")


# ------------------------------------------------------------------------------------------------------------
# POSE_KEYPOINT


@dataclass(frozen=True, eq=False)
class PosePerson:
    """One person of a POSE_KEYPOINT frame. Each part is a float64 [N, 3] array (x, y, confidence) in the units of
    the input (``normalized``: fractions of the canvas, else canvas pixels), or None when absent. The body is always
    COCO 18 (BODY_25 input is converted)."""

    body: np.ndarray | None
    face: np.ndarray | None
    hand_left: np.ndarray | None
    hand_right: np.ndarray | None
    normalized: bool

    def part(self, name: str) -> np.ndarray | None:
        return {"body": self.body, "face": self.face, "hand_left": self.hand_left, "hand_right": self.hand_right}[name]


@dataclass(frozen=True, eq=False)
class PoseFrame:
    """One image's poses: the people and the canvas (the image size the keypoints refer to)."""

    people: tuple[PosePerson, ...]
    canvas_width: int
    canvas_height: int

    def points(self, person: PosePerson, part: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(xy float64 [N, 2] in pixels of a height x width target, visible bool [N]) for a part, or None."""
        arr = person.part(part)
        if arr is None:
            return None
        if person.normalized:
            xy = np.stack([arr[:, 0] * float(width), arr[:, 1] * float(height)], axis=1)
        elif (width, height) == (self.canvas_width, self.canvas_height):
            xy = arr[:, :2].copy()
        else:
            xy = np.stack([arr[:, 0] * width / self.canvas_width, arr[:, 1] * height / self.canvas_height], axis=1)
        return xy, _present(arr)


def _present(arr: np.ndarray) -> np.ndarray:
    return np.isfinite(arr).all(axis=1) & (np.nan_to_num(arr[:, 2], nan=0.0) > 0)


_PARTS = (("pose_keypoints_2d", "body", (18, 25)), ("face_keypoints_2d", "face", (68, 70)),
          ("hand_left_keypoints_2d", "hand_left", (21,)), ("hand_right_keypoints_2d", "hand_right", (21,)))


def _parse_points(value, where: str, counts: tuple[int, ...]) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise ValueError(f"{where} must be a list of numbers x, y, c, ... (or of [x, y, c] triples), "
                         f"got a {type(value).__name__}")
    if len(value) == 0:
        return None
    first = value[0]
    nested = hasattr(first, "__len__") and not isinstance(first, (str, bytes))
    try:
        if nested:
            rows = []
            for j, item in enumerate(value):
                if isinstance(item, (str, bytes, dict)) or not hasattr(item, "__len__") or len(item) not in (2, 3):
                    raise ValueError(f"{where}[{j}] must be [x, y] or [x, y, confidence], got {item!r}")
                row = [_number(v, f"{where}[{j}]") for v in item]
                rows.append(row if len(row) == 3 else row + [1.0])
            arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
        else:
            flat = [_number(v, where) for v in value]
            if len(flat) % 3:
                raise ValueError(f"{where} has {len(flat)} numbers: expected x, y, confidence triples "
                                 f"(a multiple of 3)")
            arr = np.array(flat, dtype=np.float64).reshape(-1, 3)
    except TypeError as exc:
        raise ValueError(f"{where} must hold numbers: {exc}") from None
    if arr.shape[0] not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise ValueError(f"{where} has {arr.shape[0]} points; expected {expected}")
    return arr


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must hold numbers, found {v!r}")
    return float(v)


def _size(frame: dict, key: str, where: str) -> int:
    if key not in frame:
        raise ValueError(f"{where} has no {key!r}: a POSE_KEYPOINT frame carries the size of the image its "
                         f"keypoints were found in (canvas_width, canvas_height)")
    v = frame[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
            or v < 1 or int(v) != v:
        raise ValueError(f"{where}: {key} must be a positive whole number of pixels, got {v!r}")
    return int(v)


def _parse_person(person, where: str) -> PosePerson:
    if not isinstance(person, dict):
        raise ValueError(f"{where} must be a dict with pose_keypoints_2d / face_keypoints_2d / hand_*_keypoints_2d, "
                         f"got a {type(person).__name__}")
    parts = {}
    for key, name, counts in _PARTS:
        arr = _parse_points(person.get(key), f"{where}.{key}", counts)
        if name == "body" and arr is not None and arr.shape[0] == 25:
            arr = arr[list(BODY25_TO_COCO18)]
        parts[name] = arr
    present = [arr[_present(arr), :2] for arr in parts.values() if arr is not None]
    coords = np.concatenate(present) if present else np.zeros((0, 2))
    normalized = bool(coords.size) and float(np.abs(coords).max()) <= NORMALISED_MAX
    return PosePerson(normalized=normalized, **parts)


def _parse_frame(frame, where: str) -> PoseFrame:
    if isinstance(frame, PoseFrame):
        return frame
    if not isinstance(frame, dict):
        raise ValueError(f"{where} is a {type(frame).__name__}; expected a dict with 'people', 'canvas_width' and "
                         f"'canvas_height' (the OpenPose JSON layout)")
    people = frame.get("people")
    if people is None:
        if "animals" not in frame:
            raise ValueError(f"{where} has no 'people' list: not an OpenPose POSE_KEYPOINT frame "
                             f"(keys: {sorted(map(str, frame))})")
        people = []  # an animal-pose frame: no people to draw
    if not isinstance(people, (list, tuple)):
        raise ValueError(f"{where}.people must be a list, got a {type(people).__name__}")
    width = _size(frame, "canvas_width", where)
    height = _size(frame, "canvas_height", where)
    return PoseFrame(tuple(_parse_person(p, f"{where}.people[{j}]") for j, p in enumerate(people)), width, height)


def parse_pose_keypoint(value) -> list[PoseFrame]:
    """POSE_KEYPOINT (a list of frames, one frame dict, a JSON string of either, or parsed PoseFrames) as a list of
    PoseFrame. Raises ValueError saying where and what is wrong. The input is not modified."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"POSE_KEYPOINT is not valid JSON: {exc}") from None
    if isinstance(value, (dict, PoseFrame)):
        return [_parse_frame(value, "POSE_KEYPOINT frame 0")]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"POSE_KEYPOINT must be a list of frames (one per image), a frame dict or JSON text, got a "
                         f"{type(value).__name__}")
    return [_parse_frame(f, f"POSE_KEYPOINT frame {i}") for i, f in enumerate(value)]


def _one_frame(frame) -> PoseFrame:
    if isinstance(frame, PoseFrame):
        return frame
    frames = parse_pose_keypoint(frame)
    if len(frames) != 1:
        raise ValueError(f"expected one POSE_KEYPOINT frame, got {len(frames)}: pick the frame of this image")
    return frames[0]


# ------------------------------------------------------------------------------------------------------------
# skeletons


def _draw_person(canvas: np.ndarray, frame: PoseFrame, person: PosePerson, body: bool, hands: bool,
                 face_drawer, stick_scale: int) -> None:
    h, w = canvas.shape[:2]
    if body:
        pts = frame.points(person, "body", h, w)
        if pts is not None:
            _draw_bodypose(canvas, *pts, stick_scale)
    if hands:
        for part in ("hand_left", "hand_right"):
            pts = frame.points(person, part, h, w)
            if pts is not None:
                _draw_handpose(canvas, *pts)
    if face_drawer is not None:
        pts = frame.points(person, "face", h, w)
        if pts is not None:
            face_drawer(canvas, *pts)


def draw_body_skeleton(frame, height: int, width: int, draw_body: bool = True, draw_hands: bool = True,
                       draw_face: bool = True, xinsir_stick_scaling: bool = False) -> np.ndarray:
    """One POSE_KEYPOINT frame (PoseFrame, dict or JSON) drawn as controlnet_aux's draw_poses does, its canvas
    scaled to height x width: per person the COCO-18 body, then the hands, then the face points."""
    h, w = _check_size(height, width)
    frame = _one_frame(frame)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    scale = _stick_scale(h, w, xinsir_stick_scaling)
    for person in frame.people:
        _draw_person(canvas, frame, person, draw_body, draw_hands, _draw_facepose if draw_face else None, scale)
    return canvas


def _face_covered(xy: np.ndarray, visible: np.ndarray, boxes: list[np.ndarray]) -> bool:
    if not visible.any() or not boxes:
        return False
    cx, cy = xy[visible].mean(axis=0)
    for x1, y1, x2, y2 in boxes:
        mx, my = FACE_MATCH_MARGIN * abs(x2 - x1), FACE_MATCH_MARGIN * abs(y2 - y1)
        if min(x1, x2) - mx <= cx <= max(x1, x2) + mx and min(y1, y2) - my <= cy <= max(y1, y2) + my:
            return True
    return False


def draw_magicid_condition(faces, pose_frame, height: int, width: int, face_style: str = "openpose",
                           draw_hands: bool = True, thickness: int = 2, xinsir_stick_scaling: bool = False) -> np.ndarray:
    """MagicID's skeleton + landmark condition: the frame's bodies (and hands) with the detected faces drawn over
    them in ``face_style`` ("openpose" points or "contours"). ``pose_frame`` may be None (faces only). A person's own
    face keypoints are drawn only when no detected face covers them (module docstring)."""
    h, w = _check_size(height, width)
    if face_style not in FACE_STYLES:
        raise ValueError(f"face_style {face_style!r} is unknown: use one of {', '.join(FACE_STYLES)}")
    thickness = _check_thickness(thickness)
    faces = _faces(faces)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    if pose_frame is not None:
        frame = _one_frame(pose_frame)
        boxes = [f.bbox.astype(np.float64) for f in faces]
        scale = _stick_scale(h, w, xinsir_stick_scaling)

        def own_face(cv, xy, visible):
            if _face_covered(xy, visible, boxes):
                return
            if face_style == "openpose":
                _draw_facepose(cv, xy, visible)
            else:
                pupils = xy[68:70] if len(xy) == 70 else None
                _draw_contours68(cv, xy[:68], visible[:68], pupils, visible[68:70], thickness, True)

        for person in frame.people:
            _draw_person(canvas, frame, person, True, draw_hands, own_face, scale)
    for face in faces:
        if face_style == "openpose":
            pts = openpose_face_points(face)
            _draw_facepose(canvas, pts, np.ones(len(pts), bool))
        else:
            _draw_face_contours(canvas, face, thickness, True, True)
    return canvas


# ------------------------------------------------------------------------------------------------ detection preview
PREVIEW_COLORS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (230, 64, 230), (0, 210, 210))


def draw_detections_preview(rgb: np.ndarray, faces) -> np.ndarray:
    """The image with every face's box, index (left to right from 0), score, 5 keypoints and dense landmarks drawn
    on it, a colour per index; a copy, the input is not changed."""
    canvas = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., :3]).copy()
    h, w = canvas.shape[:2]
    line = max(1, round(max(h, w) / 400))
    for index, face in enumerate(_faces(faces)):
        color = PREVIEW_COLORS[index % len(PREVIEW_COLORS)]
        x0, y0, x1, y1 = (int(round(v)) for v in face.bbox)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, line, cv2.LINE_AA)
        dense = face.landmarks
        if dense is not None:
            for x, y in dense:
                cv2.circle(canvas, (int(round(x)), int(round(y))), line, color, -1, cv2.LINE_AA)
        for x, y in face.kps:
            cv2.circle(canvas, (int(round(x)), int(round(y))), 2 * line + 1, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(canvas, (int(round(x)), int(round(y))), 2 * line + 1, color, line, cv2.LINE_AA)
        label = f"{index} ({face.score:.2f})"
        scale = max(0.4, max(h, w) / 1000)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, line)
        ty = y0 - 4 if y0 - th - 6 >= 0 else min(h - 1, y1 + th + 4)
        cv2.rectangle(canvas, (x0, ty - th - 2), (x0 + tw + 2, ty + base), color, -1)
        cv2.putText(canvas, label, (x0 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), line, cv2.LINE_AA)
    return canvas
