"""Clone Face Tuning's training data, as the pack reads it, and the face-weighted loss (torch + numpy + OpenCV).

MagicID names Clone Face Tuning and its aim, explicit constraints on where faces go in multi-ID group photos, not its
recipe. The pack's reading: a training sample in which one face of a picture, its pixels together with its landmarks
and its head's skeleton keypoints, is cloned to another place of the same picture, and both conditions are redrawn
to match. The control then sees a face wherever the condition puts one, at positions and sizes the photos never had,
and learns that a face goes exactly where the landmarks and skeleton say, not where photos usually have faces.
Together with a loss weighted towards the face regions (MagiCapture's masked reconstruction loss is the public
reference), the faces' placement, the hard part of group photos, weighs in training as it does for the viewer.

- ``plan_face_clone(sample, seed, ...)``: which face goes where, deterministic from ``seed``: a face (chosen, or drawn),
  a scale drawn from ``scale_range``, and a position where the clone, grown by ``margin`` of its size, lies inside the
  picture, overlaps no face box (grown alike) and covers no body keypoint or limb of the skeleton; None when no such
  position exists within ``max_tries`` draws.
- ``apply_face_clone(sample, plan)``: the new sample: the face's pixels pasted through a feathered mask of the face's
  landmark hull (forehead included) under the map x -> scale * (x - source centre) + target centre; the face (box,
  keypoints, landmarks) mapped the same way and added to the faces; its person's head keypoints (nose, eyes, ears) and
  face points added to the pose as one more person (no body: only the head was cloned); the landmark and skeleton
  conditions and the face mask redrawn with the dataset's settings. Pixels outside the paste mask are the input's, bit
  for bit. The input sample is not changed.
- ``clone_face_sample(sample, seed, ...)``: both in one call.
- ``face_loss_weights(face_mask, latent_size, ...)``: per-latent-cell loss weights from a face mask:
  ``w = background + (face - background) * m`` with ``m`` the fraction of the cell's pixels the mask covers (area
  average, so a cell the mask does not touch has exactly the background weight: compact support), normalised by
  default to a mean of 1 per sample so the loss keeps the plain loss's scale and the learning rate its meaning.
- ``magicapture_loss_weights(face_mask, latent_size, temperature)``: MagiCapture's masked loss as its public training
  code computes it (mask resized to the latent by nearest neighbour, ``m = (M + 0.01) ** T / max``, the prediction and
  target multiplied by ``m`` before the MSE, the result scaled by the latent's area over the mask's area), written as
  the equivalent weight map ``w = m**2 * h * w / sum(m)``; ``weighted_mse(pred, target, w)`` then gives its loss. Its
  code applies the area scaling to the whole batch once per sample (the same for a batch of one); here it is per
  sample, and the max is taken per sample (the same for binary masks, which is what it uses).
- ``weighted_mse(pred, target, weights)``: ``mean over channels and cells of w * (pred - target)**2``, per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import face_masks as fm
from . import magicid_dataset as md
from .face_draw import BODY_LIMBS, FACE_MATCH_MARGIN
from .faces import Face, left_to_right

HEAD_POINTS = (0, 14, 15, 16, 17)  # COCO 18: nose, right eye, left eye, right ear, left ear
LIMB_SAMPLES = 16  # points checked along each limb when looking for a free place


@dataclass(frozen=True)
class ClonePlan:
    """Which face is cloned where: ``face_index`` (left to right), ``scale`` and the map
    ``x -> scale * (x - source_center) + target_center`` (pixels, x right, y down); ``person`` is the pose person
    whose head keypoints go with the face (None: no person matched the face)."""

    face_index: int
    scale: float
    source_center: tuple[float, float]
    target_center: tuple[float, float]
    person: int | None
    seed: int

    @property
    def matrix(self) -> np.ndarray:
        """The 2 x 3 affine matrix of the map (OpenCV's warpAffine form)."""
        s = self.scale
        (sx, sy), (tx, ty) = self.source_center, self.target_center
        return np.array([[s, 0.0, tx - s * sx], [0.0, s, ty - s * sy]], dtype=np.float64)

    def map_points(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return xy * self.scale + (np.array(self.target_center) - self.scale * np.array(self.source_center))


def _grown_box(box: np.ndarray, margin: float) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return np.array([x1 - mx, y1 - my, x2 + mx, y2 + my])


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def person_of_face(face: Face, pose) -> int | None:
    """The pose person whose head keypoints (nose, eyes, ears) belong to ``face``: the one whose visible head points'
    centroid lies in the face box grown by FACE_MATCH_MARGIN and is nearest the box centre; None if none does."""
    box = _grown_box(face.bbox, FACE_MATCH_MARGIN)
    cx, cy = face.center
    best, best_distance = None, math.inf
    for i, body in enumerate(md.body_keypoints(pose)):
        if len(body) < 18:
            continue
        head = body[list(HEAD_POINTS)]
        visible = head[head[:, 2] > 0]
        if not len(visible):
            continue
        px, py = visible[:, :2].mean(axis=0)
        if box[0] <= px <= box[2] and box[1] <= py <= box[3]:
            distance = math.hypot(px - cx, py - cy)
            if distance < best_distance:
                best, best_distance = i, distance
    return best


def _body_obstacles(pose) -> np.ndarray:
    """Visible body keypoints and points along every drawn limb, float64 [N, 2]."""
    points = []
    for body in md.body_keypoints(pose):
        if len(body) < 18:
            continue
        visible = body[:, 2] > 0
        points.append(body[visible, :2])
        t = np.linspace(0.0, 1.0, LIMB_SAMPLES)[:, None]
        for a, b in BODY_LIMBS:
            if visible[a] and visible[b]:
                points.append(body[a, :2] * (1 - t) + body[b, :2] * t)
    return np.concatenate(points) if points else np.zeros((0, 2))


def plan_face_clone(sample: md.MagicIDSample, seed: int, *, face_index: int | None = None,
                    scale_range: tuple[float, float] = (0.6, 1.0), margin: float = 0.25,
                    avoid_bodies: bool = True, max_tries: int = 200) -> ClonePlan | None:
    """Where to clone which face (module docstring); deterministic from ``seed``; None when nothing fits."""
    faces = list(sample.faces)
    if not faces:
        raise ValueError(f"sample {sample.name!r} has no face to clone")
    low, high = (float(v) for v in scale_range)
    if not (0 < low <= high) or not math.isfinite(high):
        raise ValueError(f"scale_range must be two numbers 0 < low <= high, got {scale_range!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    rng = np.random.default_rng(int(seed))
    if face_index is None:
        face_index = int(rng.integers(len(faces)))
    elif not -len(faces) <= face_index < len(faces):
        raise IndexError(f"face index {face_index} does not exist: sample {sample.name!r} has {len(faces)} face(s)")
    face_index %= len(faces)
    face = faces[face_index]
    scale = float(rng.uniform(low, high)) if high > low else low
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    source_center = ((x1 + x2) / 2, (y1 + y2) / 2)
    half_w, half_h = scale * (x2 - x1) / 2, scale * (y2 - y1) / 2
    grow_w, grow_h = half_w * (1 + 2 * margin), half_h * (1 + 2 * margin)
    h, w = sample.height, sample.width
    if 2 * grow_w > w or 2 * grow_h > h:
        return None
    blocked = [_grown_box(f.bbox, margin) for f in faces]
    obstacles = _body_obstacles(sample.pose) if avoid_bodies else np.zeros((0, 2))
    for _ in range(int(max_tries)):
        cx = float(rng.uniform(grow_w, w - grow_w))
        cy = float(rng.uniform(grow_h, h - grow_h))
        region = np.array([cx - grow_w, cy - grow_h, cx + grow_w, cy + grow_h])
        if any(_overlaps(region, b) for b in blocked):
            continue
        if len(obstacles) and ((obstacles[:, 0] > region[0]) & (obstacles[:, 0] < region[2])
                               & (obstacles[:, 1] > region[1]) & (obstacles[:, 1] < region[3])).any():
            continue
        return ClonePlan(face_index=face_index, scale=scale, source_center=source_center, target_center=(cx, cy),
                         person=person_of_face(face, sample.pose), seed=int(seed))
    return None


def map_face(face: Face, plan: ClonePlan) -> Face:
    """``face`` under the plan's map (box, keypoints, landmarks); a new Face."""

    def pts(a):
        return None if a is None else plan.map_points(a).astype(np.float32)

    box = plan.map_points(face.bbox.reshape(2, 2)).reshape(4).astype(np.float32)
    return replace(face, bbox=box, kps=pts(face.kps), landmarks68=pts(face.landmarks68),
                   landmarks106=pts(face.landmarks106))


def _cloned_person(pose, person: int, plan: ClonePlan) -> dict:
    """The head of pose person ``person`` under the plan's map, as a new OpenPose person: nose, eyes and ears (and
    the person's face points), every other body point missing, no hands."""
    source = pose["people"][person]
    body = np.asarray(source.get("pose_keypoints_2d") or [], dtype=np.float64).reshape(-1, 3)
    head = np.zeros((18, 3))
    for i in HEAD_POINTS:
        if body[i, 2] > 0:
            head[i, :2] = plan.map_points(body[i, :2])
            head[i, 2] = body[i, 2]
    entry = {"pose_keypoints_2d": head.reshape(-1).tolist(), "hand_left_keypoints_2d": [],
             "hand_right_keypoints_2d": [], "face_keypoints_2d": []}
    face_points = np.asarray(source.get("face_keypoints_2d") or [], dtype=np.float64).reshape(-1, 3)
    if len(face_points):
        mapped = np.zeros_like(face_points)
        present = face_points[:, 2] > 0
        mapped[present, :2] = plan.map_points(face_points[present, :2])
        mapped[present, 2] = face_points[present, 2]
        entry["face_keypoints_2d"] = mapped.reshape(-1).tolist()
    return entry


def paste_mask(face: Face, height: int, width: int, feather: float | None = None, grow: float = 0) -> np.ndarray:
    """The soft mask a cloned face's pixels are pasted through: the landmark hull with the forehead, grown by
    ``grow`` px and feathered (Gaussian sigma ``feather`` px; default 3% of the face's size, at least 1 px)."""
    sigma = max(1.0, 0.03 * face.size) if feather is None else float(feather)
    return fm.face_mask(face, height, width, shape="hull", grow=grow, feather=sigma)


def apply_face_clone(sample: md.MagicIDSample, plan: ClonePlan, *, feather: float | None = None,
                     grow: float = 0) -> md.MagicIDSample:
    """The sample with the plan's face cloned (module docstring). A new sample; the input is unchanged."""
    h, w = sample.height, sample.width
    face = sample.faces[plan.face_index]
    clone = map_face(face, plan)
    alpha = paste_mask(clone, h, w, feather=feather, grow=grow)[..., None]
    warped = cv2.warpAffine(np.ascontiguousarray(sample.image), plan.matrix, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    image = sample.image.astype(np.float32) * (1.0 - alpha) + warped.astype(np.float32) * alpha
    image = np.rint(image).astype(np.uint8)
    faces = tuple(left_to_right([*sample.faces, clone]))
    pose = sample.pose
    notes = [f"cloned face {plan.face_index} of {sample.name} (x{plan.scale:.2f}) from "
             f"({plan.source_center[0]:.0f}, {plan.source_center[1]:.0f}) to "
             f"({plan.target_center[0]:.0f}, {plan.target_center[1]:.0f}) (seed {plan.seed})"]
    if pose is not None:
        if plan.person is not None:
            pose = {**pose, "people": [*pose["people"], _cloned_person(pose, plan.person, plan)]}
        else:
            notes.append("no skeleton person matched the face: only its landmarks were cloned")
    conditions = {md.LANDMARK: md.draw_landmark_condition(faces, h, w, sample.settings)}
    if md.SKELETON in sample.conditions and pose is not None:
        conditions[md.SKELETON] = md.draw_skeleton_condition(pose, h, w, sample.settings)
    mask = md.mask_to_uint8(md.draw_face_mask(faces, h, w, sample.settings)).astype(np.float32) / 255.0
    return md.MagicIDSample(name=f"{sample.name}_clone{plan.seed}", image=image, conditions=conditions,
                            face_mask=mask, faces=faces, pose=pose, settings=sample.settings, record=None,
                            notes=(*sample.notes, *notes))


def clone_face_sample(sample: md.MagicIDSample, seed: int, *, face_index: int | None = None,
                      scale_range: tuple[float, float] = (0.6, 1.0), margin: float = 0.25, avoid_bodies: bool = True,
                      max_tries: int = 200, feather: float | None = None) -> md.MagicIDSample | None:
    """A Clone Face Tuning sample of ``sample``, deterministic from ``seed``; None when no free place exists."""
    plan = plan_face_clone(sample, seed, face_index=face_index, scale_range=scale_range, margin=margin,
                           avoid_bodies=avoid_bodies, max_tries=max_tries)
    return None if plan is None else apply_face_clone(sample, plan, feather=feather)


# ---------------------------------------------------------------------------------------------------- loss weights


def _mask_batch(face_mask) -> torch.Tensor:
    """A mask (or masks) as float32 [B, 1, H, W]: [H, W], [B, H, W] or [B, 1, H, W]; numpy or torch; values in [0, 1]
    (uint8 masks are divided by 255). Always a new tensor: sample arrays are read-only."""
    if isinstance(face_mask, torch.Tensor):
        face_mask = face_mask.detach().to("cpu").numpy()
    array = np.asarray(face_mask)
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32, copy=True)
    if array.size and not (array.min() >= 0 and array.max() <= 1):  # NaN fails both comparisons
        raise ValueError("face_mask values must be finite and in [0, 1]")
    mask = torch.from_numpy(array)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"face_mask must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    return mask


def _latent_size(latent_size) -> tuple[int, int]:
    h, w = (int(v) for v in latent_size)
    if h < 1 or w < 1:
        raise ValueError(f"latent_size must be (height, width) >= 1, got {latent_size!r}")
    return h, w


def face_coverage(face_mask, latent_size: Sequence[int]) -> torch.Tensor:
    """The mask area-averaged onto a latent grid, float32 [B, 1, h, w]: the mean mask value over each cell's pixels
    (exact when the mask's size is a multiple of the grid's, as an image is of its latent; otherwise adaptive
    average pooling, whose windows reach at most one pixel into the next cell)."""
    return F.adaptive_avg_pool2d(_mask_batch(face_mask), _latent_size(latent_size))


def face_loss_weights(face_mask, latent_size: Sequence[int], *, face_weight: float = 2.0,
                      background_weight: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """Per-cell loss weights at latent resolution, float32 [B, 1, h, w] (broadcast over the latent's channels):
    ``background_weight + (face_weight - background_weight) * coverage`` (``face_coverage``), divided by its mean
    per sample when ``normalize`` (then the weights average 1 and a uniform mask gives the plain loss). The mask is
    in the training image's pixels: crop and resize it exactly as the image."""
    face_weight, background_weight = float(face_weight), float(background_weight)
    if not (math.isfinite(face_weight) and math.isfinite(background_weight)) or face_weight < 0 or background_weight < 0:
        raise ValueError(f"face_weight and background_weight must be numbers >= 0, got {face_weight!r}, "
                         f"{background_weight!r}")
    if face_weight == 0 and background_weight == 0:
        raise ValueError("face_weight and background_weight are both 0: nothing would be learnt")
    coverage = face_coverage(face_mask, latent_size)
    weights = background_weight + (face_weight - background_weight) * coverage
    if normalize:
        mean = weights.mean(dim=(1, 2, 3), keepdim=True)
        if (mean == 0).any():
            raise ValueError("a sample's weights are all 0 (background_weight 0 and no face): nothing to normalise")
        weights = weights / mean
    return weights


def magicapture_loss_weights(face_mask, latent_size: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
    """MagiCapture's masked reconstruction loss as a weight map for ``weighted_mse`` (module docstring)."""
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    mask = F.interpolate(_mask_batch(face_mask), size=_latent_size(latent_size), mode="nearest")
    m = (mask + 0.01).pow(temperature)
    m = m / m.amax(dim=(1, 2, 3), keepdim=True)
    cells = m.shape[2] * m.shape[3]
    return m.square() * cells / m.sum(dim=(1, 2, 3), keepdim=True)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted MSE, shape [B]: the mean over channels and cells of ``weights * (pred - target)**2``
    (weights [B, 1, h, w] broadcast over channels)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    weights = weights.to(pred.device, pred.dtype)
    if weights.ndim != pred.ndim or weights.shape[0] != pred.shape[0] or weights.shape[2:] != pred.shape[2:]:
        raise ValueError(f"weights {tuple(weights.shape)} do not fit pred {tuple(pred.shape)}: give [B, 1, h, w] at "
                         "the latent's size")
    return (weights * (pred - target).square()).mean(dim=tuple(range(1, pred.ndim)))
