"""Core tier: how Detect Faces searches a picture (magic_core.face_search.find_faces) on group pictures made of
real faces (magic_portrait.group_photos: LFW people and the astronaut), without ComfyUI: the detection scale chosen
from the picture and min_face, tiles and merged duplicates, retries when fewer faces than expected are found,
boxes clipped to the picture; and the geometry helpers behind it (Face.clipped / mapped, the band feather)."""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest

from magic_core import face_backends as fb
from magic_core import face_masks as fm
from magic_core import face_search as fs
from magic_core import faces as F
from magic_portrait import group_photos as gp
from magic_portrait import tiny_insightface as tiny

pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def dlib_hog():
    pytest.importorskip("dlib")
    return fb.DlibAnalyzer("hog")


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    pytest.importorskip("insightface")
    folder = tiny.write_tiny_insightface_pack(tmp_path_factory.mktemp("if") / "antelopev2", seed=0)
    return fb.InsightFaceAnalyzer(folder, providers="cpu")


def narrow(analyzer, limit):
    """The same back-end (its models shared) with another tile limit, so a small picture is tiled."""
    other = copy.copy(analyzer)
    other.max_detection_side = limit
    return other


def matched(box, boxes) -> int:
    return sum(fs.same_face(box, b) for b in boxes)


# ----------------------------------------------------------------------------------------------- scale and plan
def test_detection_scale_keeps_min_face_above_the_floor(dlib_hog, tiny_if):
    assert dlib_hog.smallest_face == fb.HOG_SMALLEST_FACE == 73 and tiny_if.smallest_face == 32  # stated in the file
    # the larger of det_size / long side and floor / min_face
    assert fs.detection_scale(dlib_hog, 1024, 768, min_face=48, det_size=640) == pytest.approx(73 / 48)
    assert fs.detection_scale(dlib_hog, 1024, 768, min_face=200, det_size=640) == pytest.approx(640 / 1024)
    assert fs.detection_scale(tiny_if, 2048, 2048, min_face=48, det_size=640) == pytest.approx(32 / 48)
    assert fs.detection_scale(dlib_hog, 300, 500, min_face=0, det_size=0) == 1.0
    assert fs.detection_scale(dlib_hog, 300, 500, min_face=5) == fs.MAX_UPSCALE
    with pytest.raises(ValueError, match="min_face"):
        fs.detection_scale(dlib_hog, 300, 500, min_face=-1)


@pytest.mark.parametrize(("height", "width", "scale", "limit", "floor"), [
    (832, 1216, 1.52, 1024, 73.0), (4096, 3000, 1.52, 4096, 73.0), (2048, 2048, 0.67, 512, 32.0),
    (451, 701, 2.0, 600, 16.0)])
def test_tiles_see_every_face_they_keep_whole_and_coarser_passes_take_the_rest(height, width, scale, limit, floor):
    class Spec(fb.FaceAnalyzer):
        smallest_face, max_detection_side = floor, limit

    passes = fs.plan_detection(Spec(), height, width, scale)
    assert passes[-1].regions == ((0, 0, width, height),) and passes[-1].keep_up_to is None
    assert max(height, width) * passes[-1].scale <= limit
    for i, p in enumerate(passes):
        for x1, y1, x2, y2 in p.regions:  # every tile's detection image fits the limit
            assert max(x2 - x1, y2 - y1) * p.scale <= limit + 1
        if p.keep_up_to is None:
            continue
        # the next pass finds every face larger than what this pass keeps (its floor lies below the overlap)
        assert floor / passes[i + 1].scale <= 0.8 * p.keep_up_to + 1e-6 and passes[i + 1].scale < p.scale
        # any face up to keep_up_to px, anywhere, lies wholly inside some tile
        rng = np.random.default_rng(0)
        for _ in range(300):
            s = rng.uniform(1, p.keep_up_to)
            x, y = rng.uniform(0, width - s), rng.uniform(0, height - s)
            assert any(x1 <= x and x + s <= x2 and y1 <= y and y + s <= y2 for x1, y1, x2, y2 in p.regions)
        # the tiles cover the picture
        cover = np.zeros((height, width), bool)
        for x1, y1, x2, y2 in p.regions:
            cover[y1:y2, x1:x2] = True
        assert cover.all()


def test_merge_keeps_the_best_box_of_each_face():
    d = [fb.Detection(np.array(b, np.float32), s) for b, s in [
        ((0, 0, 100, 100), 0.8), ((5, 3, 104, 101), 0.9),  # one face, two tiles
        ((20, 20, 60, 60), 0.7),  # a part of it, inside: the same face
        ((150, 0, 250, 100), 0.6), ((240, 0, 300, 60), 0.95)]]  # two faces side by side
    kept = fs.merge_detections(d)
    assert sorted(k.score for k in kept) == [0.6, 0.9, 0.95]
    assert fs.box_overlap((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx((1 / 3, 0.5))


# ---------------------------------------------------------------------------------------------- group pictures
GROUPS = {  # (width, height, face sizes px, seed); the last face is cut by the right border
    "1024 square": (1024, 1024, [100, 60, 70, 80, 120, 160, 220, 300], 0),
    "1216x832": (1216, 832, [90, 56, 64, 110, 150, 200, 260], 1),
    "odd 701x451": (701, 451, [110, 60, 90, 140], 3),
}


@pytest.fixture(scope="module", params=list(GROUPS))
def group(request):
    w, h, sizes, seed = GROUPS[request.param]
    return gp.group_photo(w, h, sizes, seed=seed)


def test_dlib_finds_every_face_at_defaults_tiled_or_not(dlib_hog, group):
    h, w = group.rgb.shape[:2]
    search = fs.find_faces(dlib_hog, group.rgb)
    assert len(search.passes) == 1 and search.scale == pytest.approx(73 / 48)
    boxes = [f.bbox for f in search.faces]
    for placed in group.faces:  # every composed face, once
        assert matched(placed.clipped(w, h), boxes) == 1, placed
    assert len(boxes) == len(group.faces)
    # a tile limit a quarter of the detection image: the same faces, none twice
    tiled = fs.find_faces(narrow(dlib_hog, 512), group.rgb)
    assert tiled.passes[0].tiles > 1
    assert len(tiled.faces) == len(search.faces)
    for f in search.faces:
        assert matched(f.bbox, [t.bbox for t in tiled.faces]) == 1


def test_boxes_are_clipped_to_the_picture_and_the_whole_face_is_kept(dlib_hog, group):
    h, w = group.rgb.shape[:2]
    faces = fs.find_faces(dlib_hog, group.rgb).faces
    for f in faces:
        assert 0 <= f.bbox[0] < f.bbox[2] <= w and 0 <= f.bbox[1] < f.bbox[3] <= h
    border = [f for f in faces if f.unclipped_bbox is not None]
    assert border, "the face cut by the right border is boxed past it"
    for f in border:
        assert f.unclipped_bbox[2] > w and f.bbox[2] == w
        assert f.size == pytest.approx(float(min(f.unclipped_bbox[2:] - f.unclipped_bbox[:2])))
        assert f.landmarks68[:, 0].max() > w - 1  # landmarks are not clipped: the jaw runs past the border


def test_tiny_insightface_finds_every_face_at_defaults(tiny_if):
    photo = gp.group_photo(1216, 832, [90, 56, 64, 110, 150, 200], seed=1, people="astronaut")
    search = fs.find_faces(tiny_if, photo.rgb)
    assert search.scale == pytest.approx(max(640 / 1216, 32 / 48))
    boxes = [f.bbox for f in search.faces]
    for placed in photo.faces:
        assert matched(placed.clipped(1216, 832), boxes) == 1, placed
    tiled = fs.find_faces(narrow(tiny_if, 320), photo.rgb)
    assert tiled.passes[0].tiles > 1 and len(tiled.faces) == len(search.faces)


def test_fewer_faces_than_expected_retry_finer(dlib_hog):
    photo = gp.group_photo(900, 600, [60, 64, 150, 180], seed=4, border_cut=0)
    # min_face 100: the two small faces are below HOG's floor at the first scale
    first = fs.find_faces(dlib_hog, photo.rgb, min_face=100, det_size=0)
    assert len(first.faces) == 2 and len(first.passes) == 1  # at least one face found: no retry without a count
    search = fs.find_faces(dlib_hog, photo.rgb, min_face=100, det_size=0, expected_faces=4)
    assert len(search.faces) == 4
    for placed in photo.faces:
        assert matched(placed.box, [f.bbox for f in search.faces]) == 1
    reasons = [p.reason for p in search.passes]
    assert reasons[0] == "detection" and set(reasons[1:]) == {"retry finer"} and len(reasons) > 1
    scales = [p.scale for p in search.passes]
    assert scales == pytest.approx([0.73 * f for f in (1.0, *fs.RETRY_FINER[:len(scales) - 1])])
    assert search.notes == ("4 of 4 face(s) after retrying at x" + ", x".join(f"{s:.2f}" for s in scales[1:]),)
    # retries off: what the first scale found, and a note that some are missing
    none = fs.find_faces(dlib_hog, photo.rgb, min_face=100, det_size=0, expected_faces=4, retry=False)
    assert len(none.faces) == 2 and none.notes == ("found 2 of the 4 expected face(s)",)


def test_expected_faces_fill_with_the_best_weaker_detections(dlib_hog):
    photo = gp.group_photo(700, 500, [90, 110, 130], seed=5, border_cut=0)
    scores = sorted((f.score for f in fs.find_faces(dlib_hog, photo.rgb).faces), reverse=True)
    assert len(scores) == 3
    strict = (scores[0] + scores[1]) / 2  # only the best face passes
    assert len(fs.find_faces(dlib_hog, photo.rgb, score_threshold=strict).faces) == 1
    assert scores[2] >= fs.WEAK_SCORE_FACTOR * strict  # the others are weak, not absent
    search = fs.find_faces(dlib_hog, photo.rgb, score_threshold=strict, expected_faces=3)
    assert len(search.faces) == 3
    assert any(n.startswith("added 2 face(s) scoring below score_threshold") for n in search.notes)


# ------------------------------------------------------------------------------------------------- Face geometry
def test_face_clipped_and_mapped():
    kps = np.array([[-10, 20], [10, 20], [0, 30], [-5, 40], [5, 40]], np.float32)
    f = F.Face(bbox=[-20, 0, 20, 50], kps=kps, score=0.9)
    c = f.clipped(100, 200)
    assert c.bbox.tolist() == [0, 0, 20, 50] and c.unclipped_bbox.tolist() == [-20, 0, 20, 50]
    assert np.array_equal(c.kps, kps) and c.size == 40 and c.full_bbox is c.unclipped_bbox
    assert c.clipped(100, 200).bbox.tolist() == [0, 0, 20, 50]  # idempotent
    inside = F.Face(bbox=[10, 10, 20, 20], kps=kps + 30, score=0.9)
    assert inside.clipped(100, 200) is inside
    m = c.mapped(offset=(-20, 0), scale=2.0)
    assert m.bbox.tolist() == [40, 0, 80, 100] and m.unclipped_bbox.tolist() == [0, 0, 80, 100]
    assert np.allclose(m.kps, (kps + [20, 0]) * 2)


# -------------------------------------------------------------------------------------------------- band feather
@pytest.mark.parametrize(("grow", "feather"), [(0, 6.0), (5, 12.5), (-3, 4.0)])
def test_band_feather_has_compact_support(grow, feather):
    face = F.Face(bbox=[60, 50, 140, 150], kps=np.array([[85, 85], [115, 85], [100, 105], [88, 125], [112, 125]]),
                  score=0.9)
    h, w = 220, 230
    hard = fm.face_mask(face, h, w, shape="ellipse", grow=grow)
    soft = fm.face_mask(face, h, w, shape="ellipse", grow=grow, feather=feather, feather_kind="band")
    assert np.array_equal(soft[hard > 0], np.ones(int((hard > 0).sum()), np.float32))  # 1 on the grown region
    # the distance of every pixel to the grown region, written out: non-zero exactly within `feather` of it
    ys, xs = np.nonzero(hard)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.full((h, w), np.inf)
    for y, x in zip(ys[::7], xs[::7], strict=True):  # a subsample bounds the distance from above
        dist = np.minimum(dist, np.hypot(yy - y, xx - x))
    exact = cv2.distanceTransform((hard == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert (exact <= dist + 1e-3).all()
    assert (soft[exact >= feather] == 0).all() and (soft[(exact > 0) & (exact < feather)] > 0).all()
    t = np.clip(1 - exact / feather, 0, 1)
    np.testing.assert_allclose(soft, t * t * (3 - 2 * t), atol=1e-6)
    assert soft.max() == 1 and not math.isnan(float(soft.sum()))


@pytest.mark.parametrize(("grow", "feather"), [(0, 6.0), (3, 9.5)])
def test_band_feather_is_the_exact_distance_bit_for_bit(grow, feather):
    """The band is the smoothstep of the exact Euclidean distance to the region, that distance written out here by
    brute force (the square root of a whole number of squared pixels, correctly rounded): bit for bit, so a paste
    through it is the same on every run. OpenCV's own float distances are not correctly rounded, and which pixels
    they miss by an ulp depends on where the buffer lies in memory (DIIR's output then varied from run to run)."""
    face = F.Face(bbox=[20, 16, 44, 46], kps=np.array([[27, 27], [37, 27], [32, 33], [28, 39], [36, 39]]), score=0.9)
    h, w = 64, 70
    hard = fm.face_mask(face, h, w, shape="ellipse", grow=grow)
    soft = fm.face_mask(face, h, w, shape="ellipse", grow=grow, feather=feather, feather_kind="band")
    ys, xs = np.nonzero(hard)
    yy, xx = np.mgrid[0:h, 0:w]
    squared = np.min((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2, axis=-1)
    distance = np.sqrt(squared.astype(np.float64)).astype(np.float32)
    t = np.clip(np.float32(1.0) - distance / np.float32(feather), np.float32(0), np.float32(1))
    expected = (t * t * (np.float32(3.0) - np.float32(2.0) * t)).astype(np.float32)
    assert soft.dtype == np.float32 and np.array_equal(soft, expected)
    assert 0 < (soft[(soft > 0) & (soft < 1)]).size
