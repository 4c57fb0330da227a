"""Face search: every face in one picture through any `face_backends.FaceAnalyzer`, at the scale the smallest
wanted face needs, tiled when the detection image is too large, with retries, merging, clipping and order.

`find_faces` (what Detect Faces runs):

1. The detection scale is chosen from the picture and the smallest face wanted: ``scale = max(det_size / long
   side, smallest_face / min_face)`` (capped at `MAX_UPSCALE`), so a face of ``min_face`` px is at the detector's
   floor or above: small faces in large pictures are upsampled, never lost to a fixed detection size.
2. A detection image larger than the back-end's ``max_detection_side`` is cut into overlapping tiles. A tile keeps
   only faces that fit its overlap and do not touch an inner tile edge, so every such face is found whole in at
   least one tile; a coarser pass over the whole picture (chosen so its floor lies below the overlap) finds the
   larger ones. Duplicates (one face seen by two tiles or two passes) are merged by non-maximum suppression
   (`merge_detections`: IoU >= 0.4, or one box mostly inside the other).
3. Retries, when fewer faces than wanted are found (``expected_faces``, at least one): detection scales finer
   (x1.5, x2, x3: faces under ``min_face``) when faces are expected, then coarser (x0.7 ... x0.25: close-ups larger than
   SCRFD's anchors; dlib's pyramid already covers every larger size), then, with ``expected_faces`` set, the best
   detections scoring down to half ``score_threshold``, to reach that count. Every retry's faces are merged with
   what was found before.
4. ``min_size`` drops small faces, ``max_faces`` keeps the largest N; faces are described on the full picture,
   their boxes clipped to it (``Face.clipped``: keypoints, landmarks and ``unclipped_bbox`` keep the real
   geometry), and ordered left to right.
5. A `FaceSearch` reports every pass: scale, detection image size, tiles, faces, seconds.

This module never imports ComfyUI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import faces as fc
from .face_backends import Detection, FaceAnalyzer, check_det_size, rgb_array

DEFAULT_MIN_FACE = 48  # px: the smallest face Detect Faces looks for by default (group photos)
MAX_UPSCALE = 4.0  # the detection image is never more than 4x the picture (a face under floor / 4 px is out of reach)
MIN_DETECTION_SIDE = 64  # px: coarser retries stop at this long side
RETRY_FINER = (1.5, 2.0, 3.0)  # x the detection scale, when fewer faces than expected were found
RETRY_COARSER = (0.7, 0.5, 0.35, 0.25)  # x the detection scale: close-ups larger than the detector's anchors
WEAK_SCORE_FACTOR = 0.5  # expected_faces: detections down to this x score_threshold may fill the count
MERGE_IOU = 0.4  # two boxes of one face (two tiles, two scales): IoU at least this ...
MERGE_INSIDE = 0.7  # ... or this share of the smaller box inside the larger one


def detection_scale(analyzer: FaceAnalyzer, height: int, width: int, *, min_face: float = DEFAULT_MIN_FACE,
                    det_size: int = 640) -> float:
    """The scale a picture is detected at: the larger of ``det_size / long side`` (0: unused) and ``smallest_face
    / min_face`` (0: unused), at most `MAX_UPSCALE`; 1 (the picture as it is) when both are 0."""
    wanted = []
    if det_size:
        wanted.append(check_det_size(det_size) / max(int(height), int(width)))
    if min_face:
        if min_face < 0:
            raise ValueError(f"min_face must be >= 0 pixels, got {min_face}")
        wanted.append(float(analyzer.smallest_face) / float(min_face))
    return min(max(wanted), MAX_UPSCALE) if wanted else 1.0


@dataclass(frozen=True)
class DetectionPass:
    """One detection pass over a picture: its scale, the regions it runs on (x1, y1, x2, y2 in picture pixels) and
    the largest face (picture pixels) it keeps from a tile (None: any; a single whole-picture region keeps all)."""

    scale: float
    regions: tuple[tuple[int, int, int, int], ...]
    keep_up_to: float | None = None

    @property
    def tiles(self) -> int:
        return len(self.regions)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering [0, length) with tiles of `tile` overlapping by at least `overlap`, evenly spread."""
    if tile >= length:
        return [0]
    count = int(math.ceil((length - overlap) / (tile - overlap)))
    step = (length - tile) / (count - 1) if count > 1 else 0
    return [int(round(i * step)) for i in range(count)]


def plan_detection(analyzer: FaceAnalyzer, height: int, width: int, scale: float) -> list[DetectionPass]:
    """The passes that find every face of at least ``smallest_face / scale`` px in a height x width picture at
    `scale`: one pass when the detection image fits the back-end's ``max_detection_side``; otherwise overlapping
    tiles (the overlap, an eighth of a tile and at least 3 floors, bounds the faces a tile keeps) plus coarser passes,
    each with its floor at most 0.8 x the overlap of the one before, down to a pass over the whole picture."""
    h, w = int(height), int(width)
    limit = int(analyzer.max_detection_side)
    floor = float(analyzer.smallest_face)
    passes: list[DetectionPass] = []
    while max(h, w) * scale > limit:
        overlap_det = max(limit // 8, int(math.ceil(3 * floor)))
        tile = int(limit / scale)  # picture px
        overlap = int(math.ceil(overlap_det / scale))
        regions = tuple((x, y, min(x + tile, w), min(y + tile, h))
                        for y in _starts(h, tile, overlap) for x in _starts(w, tile, overlap))
        passes.append(DetectionPass(scale, regions, float(overlap)))
        scale = 1.25 * floor / overlap  # faces larger than this pass keeps are 1.25 floors at the next
    passes.append(DetectionPass(scale, ((0, 0, w, h),)))
    return passes


def box_overlap(a, b) -> tuple[float, float]:
    """(IoU, share of the smaller box inside the larger) of two x1, y1, x2, y2 boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    smaller = min(area_a, area_b)
    return (inter / union if union > 0 else 0.0), (inter / smaller if smaller > 0 else 0.0)


def same_face(a, b) -> bool:
    iou, inside = box_overlap(a, b)
    return iou >= MERGE_IOU or inside >= MERGE_INSIDE


def merge_detections(detections: Sequence[Detection]) -> list[Detection]:
    """Non-maximum suppression: the best-scoring box of each group of boxes of one face (`same_face`)."""
    kept: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if not any(same_face(d.box, k.box) for k in kept):
            kept.append(d)
    return kept


def _in_tile(d: Detection, region, height: int, width: int, keep_up_to: float | None) -> bool:
    """A tile's detection is kept when it fits the overlap and touches no inner tile edge (another tile sees it
    whole); edges that are the picture's border do not count."""
    if keep_up_to is None:
        return True
    if d.size > keep_up_to:
        return False
    x1, y1, x2, y2 = region
    bx1, by1, bx2, by2 = (float(v) for v in d.box)
    return ((x1 == 0 or bx1 > x1) and (y1 == 0 or by1 > y1) and (x2 == width or bx2 < x2)
            and (y2 == height or by2 < y2))


@dataclass(frozen=True)
class PassReport:
    """What one detection pass did: why it ran, its scale, the detection image size (w, h), tiles, hits, time."""

    reason: str
    scale: float
    size: tuple[int, int]
    tiles: int
    found: int
    seconds: float

    def describe(self) -> str:
        tiles = f", {self.tiles} tiles" if self.tiles > 1 else ""
        return (f"{self.reason}: {self.size[0]}x{self.size[1]} (x{self.scale:.2f}{tiles}), {self.found} hit(s), "
                f"{self.seconds:.2f} s")


@dataclass(frozen=True)
class FaceSearch:
    """The result of `find_faces`: the faces (left to right, boxes clipped to the picture), every pass, notes, the
    detection time (passes) and the whole time (description included)."""

    faces: tuple[fc.Face, ...]
    passes: tuple[PassReport, ...]
    notes: tuple[str, ...]
    detect_seconds: float
    total_seconds: float
    min_face: float

    @property
    def scale(self) -> float:
        return self.passes[0].scale

    def summary(self) -> str:
        first = self.passes[0]
        more = f" + {len(self.passes) - 1} more pass(es)" if len(self.passes) > 1 else ""
        wanted = f" for faces from {self.min_face:g} px" if self.min_face else ""
        return (f"{len(self.faces)} face(s); detected at {first.size[0]}x{first.size[1]} (x{first.scale:.2f}"
                f"{f', {first.tiles} tiles' if first.tiles > 1 else ''}){more}{wanted}, {self.detect_seconds:.2f} s "
                f"detecting, {self.total_seconds:.2f} s in all")


def run_detection(analyzer: FaceAnalyzer, rgb: np.ndarray, scale: float, score_threshold: float,
                  reason: str = "") -> tuple[list[Detection], PassReport]:
    """Every face found at `scale` (tiled as `plan_detection` says; duplicates merged) and the pass's report."""
    rgb = rgb_array(rgb)
    h, w = rgb.shape[:2]
    start = time.perf_counter()
    found: list[Detection] = []
    tiles = 0
    for detection_pass in plan_detection(analyzer, h, w, scale):
        for region in detection_pass.regions:
            x1, y1, x2, y2 = region
            part = rgb if (x1, y1, x2, y2) == (0, 0, w, h) else np.ascontiguousarray(rgb[y1:y2, x1:x2])
            hits = analyzer.detect(part, detection_pass.scale, score_threshold)
            found += [d.moved(x1, y1) for d in hits
                      if _in_tile(d.moved(x1, y1), region, h, w, detection_pass.keep_up_to)]
            tiles += 1
    merged = merge_detections(found)
    size = (int(round(w * scale)), int(round(h * scale)))
    return merged, PassReport(reason, float(scale), size, tiles, len(merged), time.perf_counter() - start)


def find_faces(analyzer: FaceAnalyzer, rgb, *, min_face: float = DEFAULT_MIN_FACE, det_size: int = 640,
               score_threshold: float = 0.5, expected_faces: int = 0, min_size: float = 0, max_faces: int = 0,
               retry: bool = True, progress: Callable[[], None] | None = None) -> FaceSearch:
    """Every face in one picture (module docstring: scale choice, tiles, retries, merging, clipping, order)."""
    started = time.perf_counter()
    rgb = rgb_array(rgb)
    h, w = rgb.shape[:2]
    if max_faces < 0 or min_size < 0 or expected_faces < 0:
        raise ValueError("min_size, max_faces and expected_faces must be >= 0")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    scale = detection_scale(analyzer, h, w, min_face=min_face, det_size=det_size)
    wanted = max(int(expected_faces), 1)
    # with expected_faces, weaker detections are collected on the way and may fill the count at the end
    low = score_threshold * WEAK_SCORE_FACTOR if (retry and expected_faces) else score_threshold
    found: list[Detection] = []
    passes: list[PassReport] = []
    notes: list[str] = []

    def strong() -> list[Detection]:
        return [d for d in found if d.score >= score_threshold and d.size >= min_size]

    def attempt(at: float, reason: str) -> None:
        nonlocal found
        hits, report = run_detection(analyzer, rgb, at, low, reason)
        found = merge_detections(found + hits)
        passes.append(report)
        if progress is not None:
            progress()

    attempt(scale, "detection")
    if retry and len(strong()) < wanted:
        ladder = [] if not expected_faces else [("finer", scale * f) for f in RETRY_FINER
                                                if scale * f <= MAX_UPSCALE + 1e-9]
        if not analyzer.pyramid:
            ladder += [("coarser", scale * f) for f in RETRY_COARSER if max(h, w) * scale * f >= MIN_DETECTION_SIDE]
        for reason, at in ladder:
            if len(strong()) >= wanted:
                break
            attempt(at, f"retry {reason}")
        if len(passes) > 1:
            notes.append(f"{len(strong())} of {'at least 1' if not expected_faces else expected_faces} face(s) "
                         f"after retrying at x{', x'.join(f'{p.scale:.2f}' for p in passes[1:])}")
    faces_found = strong()
    if retry and expected_faces and len(faces_found) < expected_faces:
        weak = [d for d in found if d.score < score_threshold and d.size >= min_size]
        extra = weak[:expected_faces - len(faces_found)]
        if extra:
            notes.append(f"added {len(extra)} face(s) scoring below score_threshold {score_threshold:g} "
                         f"({', '.join(f'{d.score:.2f}' for d in extra)}) to reach expected_faces {expected_faces}")
            faces_found += extra
    if expected_faces and len(faces_found) < expected_faces:
        notes.append(f"found {len(faces_found)} of the {expected_faces} expected face(s)")
    dropped = len([d for d in found if d.score >= score_threshold and d.size < min_size])
    if dropped:
        notes.append(f"dropped {dropped} face(s) smaller than min_size {min_size:g} px")
    if max_faces and len(faces_found) > max_faces:
        notes.append(f"kept the {max_faces} largest of {len(faces_found)} faces (max_faces)")
        faces_found = sorted(faces_found, key=lambda d: -float((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))
        faces_found = faces_found[:max_faces]
    detect_seconds = sum(p.seconds for p in passes)
    faces = [analyzer.describe(rgb, d).clipped(h, w) for d in faces_found]
    clipped = sum(f.unclipped_bbox is not None for f in faces)
    if clipped:
        notes.append(f"{clipped} face box(es) reached past the picture: clipped to it (keypoints and landmarks "
                     "keep the whole face)")
    return FaceSearch(tuple(fc.left_to_right(faces)), tuple(passes), tuple(notes), detect_seconds,
                      time.perf_counter() - started, float(min_face))
