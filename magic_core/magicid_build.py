"""Build a MagicID dataset (layout in magic_core.magicid_dataset) from photos: faces, conditions, masks, manifest.

Photos come from a folder (``folder_photos``: its top-level images, each with an OpenPose JSON beside it) or from
images in memory (``image_photos``: e.g. ComfyUI's IMAGE list, with one POSE_KEYPOINT frame per image). For each photo
``build_dataset``

1. skips it when the manifest already holds a sample of the same source with the same image and skeleton hashes
   (so a later run on a grown folder processes only the new or changed photos);
2. decodes it (an unreadable file is a bad input), scales it to at most ``max_side`` pixels, finds its faces with the
   given face back-end (none: a bad input), reads its skeleton (missing or unusable: skipped, kept landmark-only, or an
   error, by option);
3. draws the landmark and skeleton conditions and the face mask, writes the four images under temporary names,
   renames them into place, and only then appends the sample's manifest line. A run stopped anywhere leaves no
   manifest line for a half-written sample; the next run writes it again.

Skeleton JSON beside a photo ``NAME.ext`` is ``NAME.json`` or ``NAME_keypoints.json`` (what OpenPose's --write_json
names its files): an OpenPose frame (``{"people": [...], "canvas_width", "canvas_height"}``, as DWPose/OpenPose
preprocessors and openpose editors save it), a list holding one such frame (comfyui_controlnet_aux's Save Pose
Keypoints), or OpenPose's own output without a canvas size (``{"version", "people"}``: coordinates in the photo's
pixels). BODY_25 bodies are converted to COCO 18.

No ComfyUI import; the caller passes a face analyzer (magic_core.face_backends) and reports progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import face_backends as fb
from . import face_draw as fd
from . import face_search as fs
from . import magicid_dataset as md
from .faces import to_rgb_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SKELETON_SUFFIXES = (".json", "_keypoints.json")
TEMP_MARK = ".magicid-tmp-"

# bad inputs
UNREADABLE = "unreadable image"
NO_FACE = "no face found"
NO_SKELETON = "no skeleton"
BAD_SKELETON = "unusable skeleton"
# what to do with a photo without a (usable) skeleton
SKIP, KEEP_LANDMARK_ONLY, ERROR = "skip", "keep landmark only", "error"
MISSING_SKELETON_CHOICES = (SKIP, KEEP_LANDMARK_ONLY, ERROR)
BAD_INPUT_CHOICES = (SKIP, ERROR)


class BadInput(ValueError):
    """A photo that cannot become a sample: ``kind`` (UNREADABLE, NO_FACE, NO_SKELETON, BAD_SKELETON), ``source``
    (its name) and what to do, in the message."""

    def __init__(self, kind: str, source: str, message: str):
        super().__init__(f"{source}: {kind}: {message}")
        self.kind, self.source, self.detail = kind, source, message


# --------------------------------------------------------------------------------------------------------- photos


@dataclass(frozen=True, eq=False)
class Photo:
    """One input photo: ``source`` names it (a file name, or "image N"), ``stem`` is the sample name it asks for,
    ``sha256`` identifies its image and ``skeleton_sha256`` its skeleton (None: it has none). ``read_image()`` gives
    the uint8 RGB image (BadInput UNREADABLE); ``read_skeleton((height, width))`` its one pose frame or None
    (BadInput BAD_SKELETON), the size being the image's as read."""

    source: str
    stem: str
    sha256: str
    skeleton_source: str | None
    skeleton_sha256: str | None
    read_image: Callable[[], np.ndarray]
    read_skeleton: Callable[[tuple[int, int]], fd.PoseFrame | None]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_stem(text: str) -> str:
    """A file-name stem that is safe on every OS: letters, digits, '-', '_' and '.' kept, others '_', no leading dot."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip(".")
    return stem[:120] or "photo"


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Image bytes as uint8 RGB (EXIF orientation applied, grey/alpha/16-bit converted); BadInput when unreadable."""
    array = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(array, cv2.IMREAD_COLOR) if array.size else None
    if bgr is None:
        raise BadInput(UNREADABLE, source, f"not an image OpenCV can decode ({len(data)} bytes); replace or remove "
                       "the file")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def skeleton_file(image_path: Path) -> Path | None:
    """The OpenPose JSON beside an image: NAME.json, else NAME_keypoints.json; None when neither exists."""
    for suffix in SKELETON_SUFFIXES:
        candidate = image_path.with_name(image_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def frame_from_json(data, source: str, image_size: tuple[int, int]):
    """The one frame a skeleton JSON holds (module docstring for the accepted forms), with the photo's own size as
    its canvas when the JSON gives none (OpenPose's --write_json output). ``image_size`` is (height, width) of the
    photo as read. BadInput(BAD_SKELETON) when it is not one OpenPose frame."""
    if isinstance(data, list):
        if len(data) != 1:
            raise BadInput(BAD_SKELETON, source, f"holds {len(data)} frames; a photo's skeleton file holds one")
        data = data[0]
    if not isinstance(data, dict) or "people" not in data:
        raise BadInput(BAD_SKELETON, source, "is not an OpenPose frame (a JSON object with a 'people' list)")
    if "canvas_width" not in data or "canvas_height" not in data:
        data = {**data, "canvas_width": image_size[1], "canvas_height": image_size[0]}
    try:
        return fd.parse_pose_keypoint(data)[0]
    except ValueError as err:
        raise BadInput(BAD_SKELETON, source, str(err)) from None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a folder of large photos is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_photos(folder: str | Path) -> list[Photo]:
    """The top-level images of ``folder`` (sorted by name) with the OpenPose JSON beside each. Listing hashes each
    file; a photo is read and decoded again only when its sample must be built."""
    root = Path(folder)
    photos = []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        json_path = skeleton_file(path)

        def read_skeleton(size, json_path=json_path):
            if json_path is None:
                return None
            try:
                parsed = json.loads(json_path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise BadInput(BAD_SKELETON, json_path.name, f"is not valid JSON ({err})") from None
            return frame_from_json(parsed, json_path.name, size)

        photos.append(Photo(source=path.name, stem=safe_stem(path.stem), sha256=file_sha256(path),
                            skeleton_source=json_path.name if json_path else None,
                            skeleton_sha256=file_sha256(json_path) if json_path is not None else None,
                            read_image=lambda path=path: decode_image(path.read_bytes(), path.name),
                            read_skeleton=read_skeleton))
    return photos


def _array_sha256(rgb: np.ndarray) -> str:
    digest = hashlib.sha256(f"{rgb.shape}".encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


def image_photos(images: Sequence, frames: Sequence | None = None) -> list[Photo]:
    """Photos from images in memory (H x W x C, float in [0, 1] or uint8, numpy or torch), each with its own
    POSE_KEYPOINT frame (``frames[i]``: a frame dict, a one-frame list or JSON; None: no skeleton). Sample names come
    from the pixels' hash (``image_<12 hex>``), so the same picture is recognised in any order; the source is the
    hash too (``image sha256:<12 hex>``), so a changed skeleton replaces that picture's sample."""
    if frames is not None and len(frames) != len(images):
        raise ValueError(f"{len(frames)} POSE_KEYPOINT frame(s) for {len(images)} image(s): give one per image")
    photos = []
    for i, image in enumerate(images):
        rgb = to_rgb_uint8(image)
        sha = _array_sha256(rgb)
        frame = frames[i] if frames is not None else None
        where = f"POSE_KEYPOINT of image {i}"

        def read_skeleton(size, frame=frame, where=where):
            if frame is None:
                return None
            try:
                found = fd.parse_pose_keypoint(frame)
            except ValueError as err:
                raise BadInput(BAD_SKELETON, where, str(err)) from None
            if len(found) != 1:
                raise BadInput(BAD_SKELETON, where, f"holds {len(found)} frames; one image takes one")
            return found[0]

        skeleton_sha = None if frame is None else _sha256(
            json.dumps(frame, sort_keys=True, default=_json_default).encode("utf-8"))
        photos.append(Photo(source=f"image sha256:{sha[:12]}", stem=f"image_{sha[:12]}", sha256=sha,
                            skeleton_source=where if frame is not None else None, skeleton_sha256=skeleton_sha,
                            read_image=lambda rgb=rgb: rgb, read_skeleton=read_skeleton))
    return photos


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


# ------------------------------------------------------------------------------------------------------- writing


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}{path.suffix}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def encode_png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError("OpenCV could not encode a PNG")
    return encoded.tobytes()


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(folder: Path, records: Sequence[md.SampleRecord]) -> None:
    text = "".join(r.to_line() + "\n" for r in records)
    write_bytes_atomic(folder / md.MANIFEST_FILE, text.encode("utf-8"))


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files an interrupted run left in a dataset folder; returns how many."""
    count = 0
    for path in folder.iterdir():
        if path.name.startswith(".") and TEMP_MARK in path.name and path.is_file():
            path.unlink()
            count += 1
    return count


# ------------------------------------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    """What a build did: samples added (new photos), replaced (changed photo or skeleton), kept (already there),
    skipped photos with the reason, the dataset's size and modality counts afterwards."""

    folder: Path
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    landmark_only: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total: int = 0
    modality_counts: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        counts = ", ".join(f"{m} {n}" for m, n in self.modality_counts.items())
        lines = [f"{self.folder.name}: {self.total} sample(s) ({counts}); this run: {len(self.added)} added, "
                 f"{len(self.replaced)} replaced, {len(self.kept)} already there, {len(self.skipped)} skipped"]
        lines += [f"skipped {source}: {reason}" for source, reason in self.skipped]
        lines += [f"landmark only (no skeleton): {name}" for name in self.landmark_only]
        lines += self.notes
        return "\n".join(lines)


@dataclass(frozen=True)
class DetectOptions:
    """Face search settings, as Detect Faces takes them (`face_search.find_faces`)."""

    min_face: float = fs.DEFAULT_MIN_FACE
    det_size: int = 640
    score_threshold: float = 0.5
    min_size: float = 0
    max_faces: int = 0
    retry: bool = True


def _scaled(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))


def make_sample(photo: Photo, analyzer: fb.FaceAnalyzer, settings: md.BuildSettings, detect: DetectOptions,
                missing_skeleton: str) -> tuple[dict, md.SampleRecord, str | None]:
    """The images, the record (``files`` still empty) and, for a sample kept without its skeleton, why it has none.
    Raises BadInput: UNREADABLE, then (unless missing_skeleton is KEEP_LANDMARK_ONLY) NO_SKELETON / BAD_SKELETON,
    then NO_FACE; the skeleton is checked before the faces, which cost more to find."""
    original = photo.read_image()
    source_h, source_w = original.shape[:2]
    problem: BadInput | None = None
    try:
        frame = photo.read_skeleton((source_h, source_w))
    except BadInput as bad:
        frame, problem = None, bad
    rgb = _scaled(original, settings.max_side)
    h, w = rgb.shape[:2]
    pose = md.pose_in_pixels(frame, h, w) if frame is not None else None
    if problem is None and pose is not None and md.pose_people_count(pose) == 0:
        problem = BadInput(NO_SKELETON, photo.skeleton_source or photo.source,
                           "the skeleton has no person with a visible body point")
    if problem is None and frame is None:
        problem = BadInput(NO_SKELETON, photo.source, "put NAME.json (an OpenPose frame, e.g. saved from "
                           "a DWPose/OpenPose preprocessor) beside the photo, or give its POSE_KEYPOINT frame")
    if problem is not None:
        if missing_skeleton != KEEP_LANDMARK_ONLY:
            raise problem
        pose = None
    search = fs.find_faces(analyzer, rgb, min_face=detect.min_face, det_size=detect.det_size,
                           score_threshold=detect.score_threshold, min_size=detect.min_size,
                           max_faces=detect.max_faces, retry=detect.retry)
    faces = list(search.faces)
    if not faces:
        raise BadInput(NO_FACE, photo.source, f"{analyzer.name}: {'; '.join((search.summary(), *search.notes))}")
    images = {"image": rgb, md.LANDMARK: md.draw_landmark_condition(faces, h, w, settings),
              "facemask": md.mask_to_uint8(md.draw_face_mask(faces, h, w, settings))}
    modalities = [md.LANDMARK]
    if pose is not None:
        images[md.SKELETON] = md.draw_skeleton_condition(pose, h, w, settings)
        modalities.insert(0, md.SKELETON)
    record = md.SampleRecord(
        name=photo.stem, files={}, width=w, height=h, modalities=tuple(modalities), faces=tuple(faces), pose=pose,
        source=photo.source, source_sha256=photo.sha256, skeleton_source=photo.skeleton_source,
        skeleton_sha256=photo.skeleton_sha256, source_width=source_w, source_height=source_h, backend=analyzer.name)
    return images, record, None if problem is None else f"{problem.kind}: {problem.detail}"


def _file_names(stem: str, kinds) -> dict[str, str]:
    return {kind: f"{stem}{md.FILE_SUFFIXES[kind]}.png" for kind in kinds}


class _Manifest:
    """The dataset's records while building, kept in step with manifest.jsonl: a record's line is removed before its
    files, and appended after them."""

    def __init__(self, folder: Path, records: Sequence[md.SampleRecord]):
        self.folder = folder
        self.records = {r.name: r for r in records}

    def by_source(self, source: str) -> md.SampleRecord | None:
        for record in self.records.values():
            if record.source == source:
                return record
        return None

    def taken(self) -> set[str]:
        return {name for r in self.records.values() for name in r.files.values()}

    def free_stem(self, wanted: str) -> str:
        """``wanted``, or ``wanted_2``, ``wanted_3`` ...: the first stem none of whose file names is in use."""
        taken, stem, n = self.taken(), wanted, 1
        while any(name in taken for name in _file_names(stem, md.FILE_KINDS).values()):
            n += 1
            stem = f"{wanted}_{n}"
        return stem

    def rewrite(self) -> None:
        _write_manifest(self.folder, list(self.records.values()))

    def drop(self, record: md.SampleRecord) -> None:
        self.records.pop(record.name)
        self.rewrite()  # first: no line may name a file about to go
        for file_name in record.files.values():
            (self.folder / file_name).unlink(missing_ok=True)

    def add(self, record: md.SampleRecord, images: dict) -> None:
        for kind, image in images.items():
            write_bytes_atomic(self.folder / record.files[kind], encode_png(image))
        _append_line(self.folder / md.MANIFEST_FILE, record.to_line())  # last: the sample exists from here on
        self.records[record.name] = record


def build_dataset(photos: Sequence[Photo], folder: str | Path, analyzer: fb.FaceAnalyzer, settings: md.BuildSettings,
                  *, detect: DetectOptions | None = None, missing_skeleton: str = SKIP, bad_input: str = SKIP,
                  rebuild: bool = False, on_progress: Callable[[int, int, str], None] | None = None) -> BuildReport:
    """Add the photos not yet in the dataset at ``folder`` (created when missing). See the module docstring.

    - ``missing_skeleton``: SKIP the photo (named in the report), KEEP_LANDMARK_ONLY (a sample with the landmark
      modality only, named in the report), or ERROR (raise BadInput). An unusable skeleton (bad JSON, not an OpenPose
      frame, no person) counts as missing.
    - ``bad_input``: SKIP (named in the report) or ERROR (raise BadInput) for unreadable photos and photos with no face.
    - ``rebuild``: drop every sample and build all photos again (needed to change the drawing settings of an
      existing dataset, which is otherwise an error: its samples would not match).
    - ``on_progress(done, total, source)`` after each photo (raise from it to stop; finished samples are kept).
    A photo already in the dataset (same source, same image and skeleton hashes) is kept as it is; a changed one is
    replaced. Raises DatasetError when ``folder`` holds something that is not a MagicID dataset.
    """
    if missing_skeleton not in MISSING_SKELETON_CHOICES:
        raise ValueError(f"missing_skeleton must be one of {MISSING_SKELETON_CHOICES}, got {missing_skeleton!r}")
    if bad_input not in BAD_INPUT_CHOICES:
        raise ValueError(f"bad_input must be one of {BAD_INPUT_CHOICES}, got {bad_input!r}")
    detect = detect or DetectOptions()
    root = Path(folder)
    report = BuildReport(folder=root)
    existing = md.read_info(root) if root.is_dir() else None
    if root.is_dir() and existing is None and any(root.iterdir()):
        raise md.DatasetError(f"{root} is not empty and holds no MagicID dataset ({md.INFO_FILE}): choose a new or "
                              "empty folder for the dataset")
    if existing is not None and existing != settings and not rebuild:
        raise md.DatasetError(f"{root} was built with other settings ({'; '.join(existing.differences(settings))}): "
                              "build into a new dataset folder, or rebuild this one (every sample is made again)")
    root.mkdir(parents=True, exist_ok=True)
    removed = remove_temp_files(root)
    if removed:
        report.notes.append(f"removed {removed} temporary file(s) left by an interrupted run")
    records, cut = md.read_manifest(root)
    manifest = _Manifest(root, records)
    if cut:
        report.notes.append("the manifest's last line was cut off by an interrupted run: that photo is built again")
        manifest.rewrite()
    if rebuild and records:
        for record in records:
            manifest.drop(record)
        report.notes.append(f"rebuild: dropped {len(records)} sample(s)")
    if existing != settings:
        write_bytes_atomic(root / md.INFO_FILE, md.info_json(settings).encode("utf-8"))

    for index, photo in enumerate(photos):
        previous = manifest.by_source(photo.source)
        if previous is not None and previous.source_sha256 == photo.sha256 \
                and previous.skeleton_sha256 == photo.skeleton_sha256:
            report.kept.append(previous.name)
        else:
            try:
                images, record, without_skeleton = make_sample(photo, analyzer, settings, detect, missing_skeleton)
            except BadInput as bad:
                error = missing_skeleton if bad.kind in (NO_SKELETON, BAD_SKELETON) else bad_input
                if error == ERROR:
                    raise
                kept_note = f" (its earlier sample {previous.name} is kept)" if previous is not None else ""
                report.skipped.append((bad.source, f"{bad.kind}: {bad.detail}{kept_note}"))
            else:
                if previous is not None:  # a changed photo or skeleton replaces its sample
                    manifest.drop(previous)
                stem = manifest.free_stem(photo.stem)
                record = dataclasses.replace(record, name=stem, files=_file_names(stem, images))
                manifest.add(record, images)
                (report.replaced if previous is not None else report.added).append(stem)
                if without_skeleton is not None:
                    report.landmark_only.append(f"{stem} ({without_skeleton})")
        if on_progress is not None:
            on_progress(index + 1, len(photos), photo.source)
    final = list(manifest.records.values())
    given = {photo.source for photo in photos}
    elsewhere = [r.name for r in final if r.source not in given]
    if elsewhere:
        report.notes.append(f"{len(elsewhere)} sample(s) of photos not in this run's input are kept: "
                            + ", ".join(elsewhere[:8]) + (" ..." if len(elsewhere) > 8 else ""))
    report.total = len(final)
    report.modality_counts = {m: sum(m in r.modalities for r in final) for m in md.MODALITIES}
    return report
