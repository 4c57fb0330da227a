"""Faces: the one data model every face back-end fills and every face tool reads.

- ``Face``: one detected face in pixel coordinates of the image it was found in: box, 5 keypoints (insightface's
  order), dense landmarks (iBUG 68 and/or insightface's 106), an identity embedding, a detection score in [0, 1].
- ``FaceDetections`` (ComfyUI type ``MAGIC_FACES``): the faces of every image of a batch, each list ordered left to
  right (by box centre x, then y) so a face index is stable across runs and back-ends.
- ``to_rgb_uint8``: any ComfyUI-style image (H, W, C) with C in 1 (grey), 3 (RGB) or 4 (RGBA), float in [0, 1] or
  uint8, to a contiguous H x W x 3 uint8 RGB array, which is what the detectors take.

Coordinates are the back-ends' pixel coordinates (x right, y down, in pixels of the analysed image); drawing and
masks treat them as continuous positions (pixel j covers [j, j + 1)), a half-pixel convention difference that is
below what any of them resolves.

Boxes and the picture's border: a detector may box a face that the border cuts with a box reaching past it.
``Face.bbox`` is always the part inside the picture (what crops, box masks, previews and reports use:
``Face.clipped``); the detector's own box is kept in ``Face.unclipped_bbox`` (None when it was inside anyway), and
keypoints and landmarks are never clipped: alignment, the landmark hull and the face's size (``Face.size``) need
where the face really is.

The 5 keypoints follow insightface (and InstantID / FaceID's alignment): 0 = the eye on the image's left (the
person's right eye), 1 = the eye on the image's right, 2 = nose tip, 3 = mouth corner on the image's left, 4 = mouth
corner on the image's right. ``kps_from_68`` derives them from iBUG 68 landmarks the same way.

This module does not import ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

# Embedding kinds: FaceID IP-Adapters were trained on insightface's 512-d ArcFace embedding; dlib's is 128-d.
ARCFACE_512 = "arcface-512"
DLIB_128 = "dlib-128"

# iBUG 68 index groups (0-based).
IBUG68_JAW = tuple(range(0, 17))
IBUG68_RIGHT_BROW = tuple(range(17, 22))  # the person's right = the image's left
IBUG68_LEFT_BROW = tuple(range(22, 27))
IBUG68_NOSE_BRIDGE = tuple(range(27, 31))
IBUG68_NOSE_BASE = tuple(range(31, 36))
IBUG68_RIGHT_EYE = tuple(range(36, 42))
IBUG68_LEFT_EYE = tuple(range(42, 48))
IBUG68_OUTER_LIPS = tuple(range(48, 60))
IBUG68_INNER_LIPS = tuple(range(60, 68))


def _points(value, n: int | None, name: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32).reshape(-1, 2)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} needs {n} points, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return arr


@dataclass(frozen=True, eq=False)
class Face:
    """One face, in pixel coordinates (x right, y down) of the analysed image."""

    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2
    kps: np.ndarray  # float32 [5, 2] in insightface's order (module docstring)
    score: float  # detection confidence in [0, 1]
    landmarks68: np.ndarray | None = None  # float32 [68, 2], iBUG order
    landmarks106: np.ndarray | None = None  # float32 [106, 2], insightface 2d106det order
    embedding: np.ndarray | None = None  # float32 [D], L2-normalised
    embedding_kind: str | None = None  # ARCFACE_512, DLIB_128, ...
    backend: str = ""  # e.g. "dlib (hog)", "insightface antelopev2"
    embedding_norm: float | None = None  # the L2 norm the back-end's embedding had (raw = embedding * norm)
    unclipped_bbox: np.ndarray | None = None  # float32 [4]: the detector's box when it reached past the picture

    def __post_init__(self):
        bbox = np.asarray(self.bbox, dtype=np.float32).reshape(-1)
        if bbox.shape != (4,) or not np.isfinite(bbox).all():
            raise ValueError(f"bbox must be 4 finite numbers x1, y1, x2, y2, got {self.bbox!r}")
        object.__setattr__(self, "bbox", bbox)
        if self.unclipped_bbox is not None:
            full = np.asarray(self.unclipped_bbox, dtype=np.float32).reshape(-1)
            if full.shape != (4,) or not np.isfinite(full).all():
                raise ValueError(f"unclipped_bbox must be 4 finite numbers, got {self.unclipped_bbox!r}")
            object.__setattr__(self, "unclipped_bbox", full)
        object.__setattr__(self, "kps", _points(self.kps, 5, "kps"))
        object.__setattr__(self, "landmarks68", _points(self.landmarks68, 68, "landmarks68"))
        object.__setattr__(self, "landmarks106", _points(self.landmarks106, 106, "landmarks106"))
        if self.embedding is not None:
            emb = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(emb))
            if not np.isfinite(emb).all() or norm == 0:
                raise ValueError("embedding must be finite and non-zero")
            object.__setattr__(self, "embedding", emb / norm)
            if self.embedding_norm is None:
                object.__setattr__(self, "embedding_norm", norm)
        object.__setattr__(self, "score", float(self.score))

    def __repr__(self) -> str:  # short: faces end up in error messages
        dense = "68" if self.landmarks68 is not None else "106" if self.landmarks106 is not None else "no"
        box = ", ".join(f"{v:.0f}" for v in self.bbox)
        return (f"Face(box [{box}], score {self.score:.2f}, {dense} landmarks, "
                f"embedding {self.embedding_kind or 'none'}, {self.backend or 'unknown back-end'})")

    @property
    def landmarks(self) -> np.ndarray | None:
        """The dense landmarks: iBUG 68 when known (what OpenPose-style drawing uses), else the 106."""
        return self.landmarks68 if self.landmarks68 is not None else self.landmarks106

    @property
    def center(self) -> tuple[float, float]:
        return float(self.bbox[0] + self.bbox[2]) / 2, float(self.bbox[1] + self.bbox[3]) / 2

    @property
    def full_bbox(self) -> np.ndarray:
        """The detector's box, reaching past the picture where the face does (``bbox`` is its part inside)."""
        return self.bbox if self.unclipped_bbox is None else self.unclipped_bbox

    @property
    def size(self) -> float:
        """The face's size in pixels: the shorter side of the detector's (unclipped) box."""
        box = self.full_bbox
        return float(min(box[2] - box[0], box[3] - box[1]))

    def clipped(self, height: int, width: int) -> Face:
        """This face with ``bbox`` cut to a height x width picture; the detector's box moves to ``unclipped_bbox``
        when it reached past the border. Keypoints and landmarks are kept as they are."""
        full = self.full_bbox
        inside = np.array([max(full[0], 0), max(full[1], 0), min(full[2], width), min(full[3], height)],
                          dtype=np.float32)
        inside[2:] = np.maximum(inside[2:], inside[:2])  # a box wholly outside becomes empty, not inverted
        if np.array_equal(inside, full):
            return self if self.unclipped_bbox is None else replace(self, bbox=full, unclipped_bbox=None)
        return replace(self, bbox=inside, unclipped_bbox=full.copy())

    def mapped(self, offset=(0.0, 0.0), scale=(1.0, 1.0)) -> Face:
        """Every coordinate (boxes, keypoints, landmarks) mapped by ``(p - offset) * scale`` (x, y pairs): into a
        crop, or back from a resized detection image."""
        off = np.asarray(offset, dtype=np.float32).reshape(2)
        mul = np.broadcast_to(np.asarray(scale, dtype=np.float32), (2,)).copy()

        def pts(a):
            return None if a is None else (a - off) * mul

        def box(b):
            return None if b is None else (b - np.tile(off, 2)) * np.tile(mul, 2)

        return replace(self, bbox=box(self.bbox), unclipped_bbox=box(self.unclipped_bbox), kps=pts(self.kps),
                       landmarks68=pts(self.landmarks68), landmarks106=pts(self.landmarks106))

    def scaled(self, sx: float, sy: float | None = None) -> Face:
        """This face with every coordinate multiplied by (sx, sy) (e.g. back from a resized detection image)."""
        return self.mapped(scale=(sx, sx if sy is None else sy))


def left_to_right(faces: Sequence[Face]) -> list[Face]:
    """Faces ordered by box centre x, then y: the stable index order every node uses."""
    return sorted(faces, key=lambda f: (round(f.center[0], 3), round(f.center[1], 3)))


@dataclass(frozen=True)
class FaceDetections:
    """The faces of each image of a batch (ComfyUI type MAGIC_FACES). Immutable; lists are tuples."""

    faces: tuple[tuple[Face, ...], ...]  # per image, left to right
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) per image
    backend: str = ""
    embedding_kind: str | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. "image 2: found at det size 384 after retries"

    def __post_init__(self):
        if len(self.faces) != len(self.image_sizes):
            raise ValueError("one face list per image size is needed")
        object.__setattr__(self, "faces", tuple(tuple(left_to_right(f)) for f in self.faces))
        object.__setattr__(self, "image_sizes", tuple((int(h), int(w)) for h, w in self.image_sizes))

    @property
    def batch(self) -> int:
        return len(self.faces)

    def count(self) -> int:
        return sum(len(f) for f in self.faces)

    def select(self, image: int, indices: Sequence[int] | None = None) -> list[Face]:
        """The faces of one image, all of them or those at `indices` (IndexError names what exists)."""
        faces = self.faces[image]
        if indices is None:
            return list(faces)
        out = []
        for i in indices:
            if not -len(faces) <= i < len(faces):
                raise IndexError(f"face index {i} does not exist in image {image}: it has {len(faces)} face(s) "
                                 f"(indices 0-{len(faces) - 1}, left to right)")
            out.append(faces[i])
        return out


def mean_embedding(faces: Sequence[Face]) -> tuple[np.ndarray | None, str | None]:
    """The faces' mean embedding, L2-normalised, and its kind; (None, None) when a face has none or kinds differ."""
    if not faces or any(f.embedding is None for f in faces):
        return None, None
    kinds = {f.embedding_kind for f in faces}
    if len(kinds) != 1:
        return None, None
    mean = np.mean([f.embedding for f in faces], axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else None), kinds.pop()


def greedy_match(similarity: np.ndarray) -> list[int | None]:
    """For each row (a face) the column (a person) it is matched to, or None: the most similar pairs first, each
    column used once. Ties go to the lower flat index (rows first), so the result is deterministic."""
    rows, cols = similarity.shape
    matched: list[int | None] = [None] * rows
    taken: set[int] = set()
    for flat in np.argsort(-similarity, axis=None, kind="stable"):
        row, col = divmod(int(flat), cols)
        if matched[row] is None and col not in taken:
            matched[row] = col
            taken.add(col)
    return matched


def parse_indices(text: str) -> list[int] | None:
    """'' or 'all' -> None (every face); '0, 2-3' -> [0, 2, 3]; a negative number counts from the right ('-1')."""
    text = str(text).strip().lower()
    if text in ("", "all", "*"):
        return None
    out: list[int] = []
    for item in re.split(r"[,;\s]+", text):
        if not item:
            continue
        single = re.fullmatch(r"-?\d+", item)
        span = re.fullmatch(r"(\d+)-(\d+)", item)
        if single:
            out.append(int(item))
        elif span and int(span[1]) <= int(span[2]):
            out.extend(range(int(span[1]), int(span[2]) + 1))
        else:
            raise ValueError(f"face index {item!r}: write indices like '0, 2-3', '-1' or 'all'")
    return list(dict.fromkeys(out))


def kps_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """insightface-order 5 keypoints from iBUG 68 landmarks: eye centres, nose tip, outer mouth corners."""
    lm = np.asarray(landmarks68, dtype=np.float32).reshape(68, 2)
    return np.stack([
        lm[list(IBUG68_RIGHT_EYE)].mean(axis=0),  # the image's left eye
        lm[list(IBUG68_LEFT_EYE)].mean(axis=0),
        lm[30],  # nose tip
        lm[48],  # mouth corner on the image's left
        lm[54],
    ]).astype(np.float32)


def to_rgb_uint8(image) -> np.ndarray:
    """An H x W x C image (C = 1, 2 (grey + alpha), 3 or 4; float in [0, 1] or uint8; numpy or torch) as a
    contiguous H x W x 3 uint8 RGB array. Alpha is dropped (the colour channels are kept as they are)."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an image of shape H x W x C with C in 1-4, got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0
        arr = np.rint(arr).astype(np.uint8)
    channels = arr.shape[2]
    if channels in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=2)
    elif channels == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)
