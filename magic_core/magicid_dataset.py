"""MagicID datasets: the on-disk layout, the manifest, the conditions drawn from a sample, and the reader.

A MagicID dataset is one folder (numpy + OpenCV only; no ComfyUI):

- ``dataset.json``: ``{"format": "magic_portrait.magicid_dataset", "version": 1, "settings": {...}}``, the drawing
  settings every sample of the folder was made with (``BuildSettings``), so conditions redrawn later (a merged
  condition, a cloned face) look like the stored ones.
- per sample ``NAME.png`` (the photo, RGB, at most ``max_side`` pixels on its long side), ``NAME_landmark.png`` (the
  landmark condition), ``NAME_skeleton.png`` (the skeleton condition; absent for a landmark-only sample) and
  ``NAME_facemask.png`` (8-bit grey, the union of the face masks); all at the photo's size.
- ``manifest.jsonl``: one JSON object per line and sample, written after the sample's files: its file names, size,
  which modalities exist, the faces (box, 5 keypoints, dense landmarks, score: pixel coordinates of ``NAME.png``), the
  body keypoints as an OpenPose frame in the same pixels (``canvas_width``/``canvas_height`` = the photo's size), and
  where it came from (source name, SHA-256 of the source image and of its skeleton JSON), which is how a later run on a
  grown folder recognises what it has already done. Coordinates are stored exactly (float32 values as JSON floats), so
  a condition redrawn from the manifest equals the stored image bit for bit.

Only samples listed in the manifest exist: files without a manifest line are the remains of an interrupted run and are
never read (the builder writes every file under a temporary name, renames it into place, and appends the manifest line
last). A manifest whose last line was cut off mid-write is read without that line.

``MagicIDDataset`` reads a folder: ``dataset[i]`` is a ``MagicIDSample`` (image, conditions by modality, face mask,
faces, boxes, keypoints); ``pairs(modality)`` gives (image path, condition path) pairs for a single-condition trainer;
``condition_pairs(modality)`` gives arrays, the ``merged`` modality (skeleton and landmarks in one image, as Draw Face
Condition's magicid_skeleton_landmarks style draws them) included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from . import face_draw as fd
from . import face_masks as fm
from .faces import Face

FORMAT = "magic_portrait.magicid_dataset"
VERSION = 1
INFO_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
SKELETON = "skeleton"
LANDMARK = "landmark"
MODALITIES = (SKELETON, LANDMARK)  # MMF's iteration order: skeleton, landmark, skeleton, ...
MERGED = "merged"  # both in one image: drawn from the manifest, not stored
FILE_KINDS = ("image", LANDMARK, SKELETON, "facemask")
FILE_SUFFIXES = {"image": "", LANDMARK: "_landmark", SKELETON: "_skeleton", "facemask": "_facemask"}
LANDMARK_STYLES = ("openpose_face", "landmark_contours", "instantid_kps")
# Draw Face Condition's magicid_skeleton_landmarks draws faces as OpenPose points or contours; InstantID's keypoints
# have no place in an OpenPose image, so a dataset drawn with them merges as OpenPose points.
MERGED_FACE_STYLE = {"openpose_face": "openpose", "landmark_contours": "contours", "instantid_kps": "openpose"}


class DatasetError(ValueError):
    """A dataset folder that cannot be read or extended; the message says which file and what to do."""


# ------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BuildSettings:
    """How a dataset's conditions and masks are drawn (recorded in dataset.json; one set per dataset).

    - ``landmark_style``: Draw Face Condition's face styles: ``openpose_face`` (70 white points), ``landmark_contours``
      (MediaPipe-palette contours, ``thickness`` px) or ``instantid_kps`` (InstantID's 5 keypoints).
    - ``skeleton_hands``: the skeleton condition draws the hands of the pose too (the body always; never the pose's
      face points: the face is the landmark modality).
    - ``mask_shape``/``mask_grow``/``mask_feather``/``mask_forehead``: Face Masks' options for each face's mask.
    - ``max_side``: photos larger than this on their long side are scaled down (area) before anything else; 0 keeps
      every photo at its size.
    """

    landmark_style: str = "openpose_face"
    thickness: int = 2
    skeleton_hands: bool = True
    mask_shape: str = "hull"
    mask_grow: int = 0
    mask_feather: float = 0.0
    mask_forehead: float = fm.DEFAULT_FOREHEAD
    max_side: int = 1024

    def __post_init__(self):
        if self.landmark_style not in LANDMARK_STYLES:
            raise ValueError(f"landmark_style {self.landmark_style!r} is unknown: use one of {', '.join(LANDMARK_STYLES)}")
        if self.mask_shape not in fm.SHAPES:
            raise ValueError(f"mask_shape {self.mask_shape!r} is unknown: use one of {', '.join(fm.SHAPES)}")
        if int(self.thickness) != self.thickness or self.thickness < 1:
            raise ValueError(f"thickness must be a positive whole number of pixels, got {self.thickness!r}")
        if int(self.max_side) != self.max_side or self.max_side < 0:
            raise ValueError(f"max_side must be 0 (keep the size) or a positive number of pixels, got {self.max_side!r}")
        for name in ("mask_feather", "mask_forehead"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if int(self.mask_grow) != self.mask_grow:
            raise ValueError(f"mask_grow must be a whole number of pixels, got {self.mask_grow!r}")
        object.__setattr__(self, "thickness", int(self.thickness))
        object.__setattr__(self, "max_side", int(self.max_side))
        object.__setattr__(self, "mask_grow", int(self.mask_grow))
        object.__setattr__(self, "mask_feather", float(self.mask_feather))
        object.__setattr__(self, "mask_forehead", float(self.mask_forehead))
        object.__setattr__(self, "skeleton_hands", bool(self.skeleton_hands))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> BuildSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DatasetError(f"unknown dataset settings {unknown}: written by a newer Magic Portrait?")
        return cls(**dict(data))

    def differences(self, other: BuildSettings) -> list[str]:
        """'name: mine -> other' for every setting that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


# ------------------------------------------------------------------------------------------------ drawing a sample


def draw_landmark_condition(faces: Sequence[Face], height: int, width: int, settings: BuildSettings) -> np.ndarray:
    """The landmark modality: every face in ``settings.landmark_style``. uint8 [H, W, 3]."""
    if settings.landmark_style == "openpose_face":
        return fd.draw_openpose_face(faces, height, width)
    if settings.landmark_style == "instantid_kps":
        return fd.draw_instantid_kps(faces, height, width)
    return fd.draw_landmark_contours(faces, height, width, thickness=settings.thickness)


def draw_skeleton_condition(pose: Mapping, height: int, width: int, settings: BuildSettings) -> np.ndarray:
    """The skeleton modality: the frame's bodies (and hands), no face points. uint8 [H, W, 3]."""
    return fd.draw_body_skeleton(pose, height, width, draw_body=True, draw_hands=settings.skeleton_hands,
                                 draw_face=False)


def draw_merged_condition(faces: Sequence[Face], pose: Mapping | None, height: int, width: int,
                          settings: BuildSettings) -> np.ndarray:
    """Both modalities in one image, as Draw Face Condition's magicid_skeleton_landmarks draws them."""
    return fd.draw_magicid_condition(faces, pose, height, width, face_style=MERGED_FACE_STYLE[settings.landmark_style],
                                     draw_hands=settings.skeleton_hands, thickness=settings.thickness)


def draw_face_masks(faces: Sequence[Face], height: int, width: int, settings: BuildSettings) -> np.ndarray:
    """One float32 mask per face, [N, H, W], with the dataset's mask settings."""
    return fm.masks_for(faces, height, width, shape=settings.mask_shape, grow=settings.mask_grow,
                        feather=settings.mask_feather, forehead=settings.mask_forehead)


def draw_face_mask(faces: Sequence[Face], height: int, width: int, settings: BuildSettings) -> np.ndarray:
    """The union of the faces' masks, float32 [H, W] in [0, 1] (what NAME_facemask.png stores, in 8 bits)."""
    return fm.union_mask(draw_face_masks(faces, height, width, settings))


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ faces and poses


def _floats(array) -> list:
    """An array's values as JSON floats: float32 values are exact in float64 and print so they read back exactly."""
    return np.asarray(array, dtype=np.float64).tolist()


def face_to_json(face: Face) -> dict:
    out = {"box": _floats(face.bbox), "kps": _floats(face.kps), "score": float(face.score)}
    if face.landmarks68 is not None:
        out["landmarks68"] = _floats(face.landmarks68)
    if face.landmarks106 is not None:
        out["landmarks106"] = _floats(face.landmarks106)
    return out


def face_from_json(data: Mapping, backend: str = "") -> Face:
    return Face(bbox=data["box"], kps=data["kps"], score=data.get("score", 1.0), landmarks68=data.get("landmarks68"),
                landmarks106=data.get("landmarks106"), backend=backend)


_POSE_PARTS = (("pose_keypoints_2d", "body"), ("face_keypoints_2d", "face"), ("hand_left_keypoints_2d", "hand_left"),
               ("hand_right_keypoints_2d", "hand_right"))


def pose_in_pixels(frame, height: int, width: int) -> dict:
    """One POSE_KEYPOINT frame (dict, JSON or PoseFrame; normalised or in its own canvas's pixels, BODY_25 or COCO 18)
    as an OpenPose frame dict in pixels of a height x width image: canvas = that size, the body in COCO 18, each part
    a flat ``[x, y, c, ...]`` list, missing points as ``0, 0, 0`` (controlnet_aux's convention), absent parts ``[]``.
    Drawing it at height x width gives what drawing the input frame there gives."""
    parsed = fd.parse_pose_keypoint(frame) if not isinstance(frame, fd.PoseFrame) else [frame]
    if len(parsed) != 1:
        raise ValueError(f"expected one POSE_KEYPOINT frame for one image, got {len(parsed)}")
    pf = parsed[0]
    people = []
    for person in pf.people:
        entry = {}
        for key, part in _POSE_PARTS:
            points = pf.points(person, part, height, width)
            if points is None:
                entry[key] = []
                continue
            xy, visible = points
            conf = person.part(part)[:, 2]
            rows = [[float(x), float(y), float(c)] if v else [0.0, 0.0, 0.0]
                    for (x, y), c, v in zip(xy, conf, visible, strict=True)]
            entry[key] = [v for row in rows for v in row]
        people.append(entry)
    return {"people": people, "canvas_width": int(width), "canvas_height": int(height)}


def pose_people_count(pose: Mapping | None) -> int:
    """People with at least one visible body point."""
    if not pose:
        return 0
    count = 0
    for person in pose.get("people", []):
        body = np.asarray(person.get("pose_keypoints_2d") or [], dtype=np.float64).reshape(-1, 3)
        count += bool((body[:, 2] > 0).any()) if len(body) else 0
    return count


def body_keypoints(pose: Mapping | None) -> list[np.ndarray]:
    """Each person's COCO-18 body as float64 [18, 3] (x, y, confidence; 0 = missing), in the sample's pixels."""
    if not pose:
        return []
    out = []
    for person in pose.get("people", []):
        body = person.get("pose_keypoints_2d") or []
        out.append(np.asarray(body, dtype=np.float64).reshape(-1, 3) if body else np.zeros((18, 3)))
    return out


# --------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class SampleRecord:
    """One manifest line (module docstring). ``files`` maps "image", "landmark", "skeleton" (when present) and
    "facemask" to file names inside the dataset folder."""

    name: str
    files: Mapping[str, str]
    width: int
    height: int
    modalities: tuple[str, ...]
    faces: tuple[Face, ...]
    pose: Mapping | None
    source: str
    source_sha256: str
    skeleton_source: str | None = None
    skeleton_sha256: str | None = None
    source_width: int = 0
    source_height: int = 0
    backend: str = ""

    @property
    def boxes(self) -> np.ndarray:
        """The faces' boxes, float32 [N, 4] (x1, y1, x2, y2), left to right."""
        return np.stack([f.bbox for f in self.faces]) if self.faces else np.zeros((0, 4), np.float32)

    def to_json(self) -> dict:
        return {
            "name": self.name, "files": dict(self.files), "width": self.width, "height": self.height,
            "modalities": list(self.modalities), "faces": [face_to_json(f) for f in self.faces],
            "pose": self.pose, "source": self.source, "source_sha256": self.source_sha256,
            "skeleton_source": self.skeleton_source, "skeleton_sha256": self.skeleton_sha256,
            "source_width": self.source_width, "source_height": self.source_height, "backend": self.backend,
        }

    def to_line(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: Mapping, where: str = "manifest line") -> SampleRecord:
        try:
            modalities = tuple(data["modalities"])
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown:
                raise ValueError(f"unknown modalities {unknown}")
            files = dict(data["files"])
            for kind in ("image", "facemask", *modalities):
                if kind not in files:
                    raise ValueError(f"no {kind} file named")
            backend = str(data.get("backend", ""))
            return cls(name=str(data["name"]), files=files, width=int(data["width"]), height=int(data["height"]),
                       modalities=modalities, faces=tuple(face_from_json(f, backend) for f in data["faces"]),
                       pose=data.get("pose"), source=str(data["source"]), source_sha256=str(data["source_sha256"]),
                       skeleton_source=data.get("skeleton_source"), skeleton_sha256=data.get("skeleton_sha256"),
                       source_width=int(data.get("source_width", 0)), source_height=int(data.get("source_height", 0)),
                       backend=backend)
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where} is not a MagicID sample record ({type(err).__name__}: {err})") from None


def read_info(folder: Path) -> BuildSettings | None:
    """The settings of the dataset in ``folder``, or None when it has no dataset.json."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path} is not readable JSON ({err}); delete the dataset folder and build it again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a MagicID dataset description (format {FORMAT!r} expected)")
    if int(info.get("version", 0)) > VERSION:
        raise DatasetError(f"{path} has format version {info.get('version')}; this Magic Portrait reads up to "
                           f"{VERSION}: update Magic Portrait")
    return BuildSettings.from_json(info.get("settings", {}))


def info_json(settings: BuildSettings) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "settings": settings.to_json()}, indent=1) + "\n"


def read_manifest(folder: Path) -> tuple[list[SampleRecord], bool]:
    """(records, cut) of a dataset folder's manifest: every complete line in order; ``cut`` is True when the last
    line was cut off mid-write (an interrupted run), which is then left out. A later record of the same name replaces
    an earlier one. A damaged line elsewhere is an error naming it."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    cut = False
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:  # no newline after the last line: it was being written when the run stopped
        try:
            json.loads(lines[-1])
        except ValueError:
            cut = True
            lines.pop()
    records: dict[str, SampleRecord] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            data = json.loads(line)
        except ValueError as err:
            raise DatasetError(f"{where} is damaged ({err}); rebuild the dataset (the builder's rebuild option)") from None
        record = SampleRecord.from_json(data, where)
        records.pop(record.name, None)
        records[record.name] = record
    return list(records.values()), cut


# ------------------------------------------------------------------------------------------------------ the reader


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (grey and alpha images converted)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise DatasetError(f"{path} is not a readable image")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def read_grey(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    grey = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if grey is None:
        raise DatasetError(f"{path} is not a readable image")
    return grey


@dataclass(frozen=True, eq=False)
class MagicIDSample:
    """One training sample in memory. Images are uint8 RGB [H, W, 3]; ``face_mask`` is float32 [H, W] in [0, 1];
    faces, boxes and keypoints are in pixels of ``image``. ``pose`` is an OpenPose frame dict (None without a
    skeleton). Immutable by convention: the arrays are read-only."""

    name: str
    image: np.ndarray
    conditions: Mapping[str, np.ndarray]
    face_mask: np.ndarray
    faces: tuple[Face, ...]
    pose: Mapping | None
    settings: BuildSettings
    record: SampleRecord | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        for array in (self.image, self.face_mask, *self.conditions.values()):
            array.setflags(write=False)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.conditions)

    @property
    def boxes(self) -> np.ndarray:
        return np.stack([f.bbox for f in self.faces]) if self.faces else np.zeros((0, 4), np.float32)

    @property
    def body_keypoints(self) -> list[np.ndarray]:
        """Each person's COCO-18 body, float64 [18, 3] (x, y, confidence; 0 = missing)."""
        return body_keypoints(self.pose)

    def face_masks(self) -> np.ndarray:
        """One float32 mask per face, [N, H, W], drawn with the dataset's mask settings (their union is face_mask)."""
        return draw_face_masks(self.faces, self.height, self.width, self.settings)

    def has(self, modality: str) -> bool:
        return modality in self.conditions or (modality == MERGED and SKELETON in self.conditions
                                               and LANDMARK in self.conditions)

    def condition(self, modality: str) -> np.ndarray:
        """The condition image of a modality: "skeleton", "landmark" (stored) or "merged" (both in one image, drawn
        from the faces and the pose)."""
        if modality in self.conditions:
            return self.conditions[modality]
        if modality == MERGED:
            if not self.has(MERGED):
                raise KeyError(f"sample {self.name!r} has no skeleton, so no merged condition (it has "
                               f"{', '.join(self.modalities)})")
            merged = draw_merged_condition(self.faces, self.pose, self.height, self.width, self.settings)
            merged.setflags(write=False)
            return merged
        if modality in MODALITIES:
            raise KeyError(f"sample {self.name!r} has no {modality} condition (it has {', '.join(self.modalities)})")
        raise KeyError(f"unknown modality {modality!r}: use one of {', '.join((*MODALITIES, MERGED))}")


class MagicIDDataset:
    """A MagicID dataset folder, read: ``len``, ``dataset[i]`` (a MagicIDSample, loaded from disk), iteration, the
    records (manifest lines, nothing loaded) and (image, condition) pairs per modality."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetError(f"{self.folder} is not a folder")
        settings = read_info(self.folder)
        if settings is None:
            raise DatasetError(f"{self.folder} has no {INFO_FILE}: not a MagicID dataset (build one with Build MagicID "
                               "Dataset)")
        self.settings = settings
        self.records, self.cut_line = read_manifest(self.folder)
        for record in self.records:
            for kind, file_name in record.files.items():
                if Path(file_name).name != file_name or not (self.folder / file_name).is_file():
                    raise DatasetError(f"{self.folder / MANIFEST_FILE}: sample {record.name!r} names {kind} file "
                                       f"{file_name!r}, which is not in the folder; rebuild the dataset")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[MagicIDSample]:
        for i in range(len(self.records)):
            yield self[i]

    def __getitem__(self, index: int) -> MagicIDSample:
        record = self.records[index]
        return self.load(record)

    def path(self, record: SampleRecord, kind: str) -> Path:
        return self.folder / record.files[kind]

    def load(self, record: SampleRecord) -> MagicIDSample:
        image = read_rgb(self.path(record, "image"))
        if image.shape[:2] != (record.height, record.width):
            raise DatasetError(f"{self.path(record, 'image')} is {image.shape[1]}x{image.shape[0]} but the manifest "
                               f"says {record.width}x{record.height}; rebuild the dataset")
        conditions = {m: read_rgb(self.path(record, m)) for m in record.modalities}
        mask = read_grey(self.path(record, "facemask")).astype(np.float32) / 255.0
        return MagicIDSample(name=record.name, image=image, conditions=conditions, face_mask=mask, faces=record.faces,
                             pose=record.pose, settings=self.settings, record=record)

    def names(self, modality: str | None = None) -> list[str]:
        """Sample names, all or those having ``modality`` ("merged": those having both)."""
        return [r.name for r in self.records if modality is None or _has(r, modality)]

    def pairs(self, modality: str, with_face_mask: bool = False) -> list[tuple[Path, ...]]:
        """(image path, condition path) for every sample having a stored ``modality`` ("skeleton" or "landmark"),
        the form Train RepControlNet's single-condition pairs take; with ``with_face_mask``, (image, condition,
        face mask) paths, so a trainer crops and resizes the mask exactly as the image for a face-weighted loss."""
        if modality not in MODALITIES:
            raise ValueError(f"pairs() gives stored condition files: modality must be one of {', '.join(MODALITIES)} "
                             f"(the merged condition has no file: use condition_pairs('{MERGED}'))")
        kinds = ("image", modality, "facemask") if with_face_mask else ("image", modality)
        return [tuple(self.path(r, k) for k in kinds) for r in self.records if modality in r.modalities]

    def condition_pairs(self, modality: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image, condition) arrays for every sample having ``modality``, "merged" included (drawn)."""
        for record in self.records:
            if _has(record, modality):
                sample = self.load(record)
                yield sample.image, sample.condition(modality)


def _has(record: SampleRecord, modality: str) -> bool:
    if modality == MERGED:
        return all(m in record.modalities for m in MODALITIES)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: use one of {', '.join((*MODALITIES, MERGED))}")
    return modality in record.modalities


def read_magicid_samples(folder: str | Path) -> Iterator[MagicIDSample]:
    """Every sample of a MagicID dataset folder, in manifest order."""
    yield from MagicIDDataset(folder)


# ---------------------------------------------------------------------------------------------------------- preview

PREVIEW_COLUMNS = ("image", SKELETON, LANDMARK, "facemask")


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """``image`` scaled to fit a cell x cell square (aspect kept), centred on dark grey."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((cell, cell, 3), 32, np.uint8)
    y, x = (cell - size[1]) // 2, (cell - size[0]) // 2
    out[y:y + size[1], x:x + size[0]] = small if small.ndim == 3 else small[..., None]
    return out


def preview_sheet(samples: Sequence[MagicIDSample], cell: int = 160) -> np.ndarray:
    """A contact sheet, one row per sample: the photo, its skeleton, landmark and face-mask images (a missing skeleton
    is a crossed cell), each scaled into a cell x cell square. uint8 RGB [rows * cell, 4 * cell, 3]."""
    if not samples:
        sheet = np.full((cell, cell * len(PREVIEW_COLUMNS), 3), 32, np.uint8)
        cv2.putText(sheet, "no samples", (8, cell // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (200, 200, 200), 1, cv2.LINE_AA)
        return sheet
    rows = []
    for sample in samples:
        cells = []
        for column in PREVIEW_COLUMNS:
            if column == "image":
                cells.append(_fit(sample.image, cell))
            elif column == "facemask":
                cells.append(_fit(np.repeat(mask_to_uint8(sample.face_mask)[..., None], 3, axis=2), cell))
            elif column in sample.conditions:
                cells.append(_fit(sample.conditions[column], cell))
            else:
                empty = np.full((cell, cell, 3), 32, np.uint8)
                cv2.line(empty, (0, 0), (cell - 1, cell - 1), (90, 90, 90), 1)
                cv2.line(empty, (0, cell - 1), (cell - 1, 0), (90, 90, 90), 1)
                cells.append(empty)
        row = np.concatenate(cells, axis=1)
        cv2.putText(row, sample.name[:28], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    return np.concatenate(rows, axis=0)
