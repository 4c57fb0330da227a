"""DIIR: MagicID's DDIM-inversion based ID restoration, the image side (crop, paste, colour) of restoring one face.

For each face, in a stable order (left to right):

1. ``face_crop.face_square``: a square around the face, ``1 + 2 * margin`` times the face box's longer side (the
   box clipped to the picture), centred on the box, and larger when the paste mask reaches further
   (``paste_extent``), so the paste never meets the crop's edge; it may reach past the image border.
   ``face_crop.cut_square`` cuts it out (the part outside the image mirrored in, so the model sees a plausible
   surrounding) and resizes it to the model's native size (small faces are upscaled).
2. The caller encodes, inverts, re-denoises with the identity and landmarks of ``face_crop.face_in_crop`` and
   decodes.
3. ``match_colors``: the restored crop's per-channel mean and std in CIELAB, measured inside the face region, are
   moved to those of the original crop there (a restored face keeps the photo's light and white balance).
4. ``paste_mask``: where the restored crop replaces the image: 1 on the face hull (with the forehead) grown by
   ``grow`` pixels, falling to 0 across a feather band of ``feather`` pixels outside it (smoothstep of the distance,
   ``face_masks``' band feather), exactly 0 beyond: non-zero only within ``grow + feather`` pixels of the hull, and
   never outside the crop square.
5. ``paste``: ``image * (1 - m) + crop * m`` inside the crop square; every pixel where ``m`` is 0 is the input's
   own value, bit for bit.

Faces are restored one after another on the image restored so far, so a crop that overlaps an earlier face sees it
restored and the later paste blends over it along its feathered edge (no seam, a stable order).

This module does not import ComfyUI.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import face_masks as fm
from .face_crop import CropBox
from .faces import Face

COLOR_MODES = ("mean_std", "none")


def paste_extent(face: Face, grow: float, feather: float) -> tuple[float, float, float, float]:
    """The box (x1, y1, x2, y2) outside which `paste_mask` is 0: the region's points plus grow + feather px."""
    points = fm.hull_points(face) if face.landmarks is not None else None
    if points is None:
        x0, y0, x1, y1 = (float(v) for v in face.full_bbox)
    else:
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    reach = max(float(grow), 0.0) + max(float(feather), 0.0) + 1.0
    return x0 - reach, y0 - reach, x1 + reach, y1 + reach


def region_mask(face: Face, height: int, width: int, grow: float, feather: float) -> np.ndarray:
    """The face region to restore: the landmark hull (forehead included; the box's ellipse without landmarks) grown
    by `grow` pixels, with a feather band of `feather` pixels outside it (exactly 0 beyond)."""
    shape = "hull" if face.landmarks is not None else "ellipse"
    return fm.face_mask(face, height, width, shape=shape, grow=grow, feather=feather, feather_kind="band")


def paste_mask(face: Face, box: CropBox, height: int, width: int, grow: float, feather: float) -> np.ndarray:
    """Where the restored crop goes, at image size: the face region grown by `grow` px with a `feather` px band
    (module docstring), exactly 0 beyond it and outside the crop square."""
    mask = region_mask(face, height, width, grow, feather)
    inside = np.zeros_like(mask)
    inside[max(0, box.top):max(0, min(height, box.bottom)), max(0, box.left):max(0, min(width, box.right))] = 1.0
    return mask * inside


def match_colors(restored: np.ndarray, original: np.ndarray, mask: np.ndarray, mode: str = "mean_std") -> np.ndarray:
    """`restored` (H x W x 3 float32 in [0, 1]) with the per-channel LAB mean and std of `original` where `mask` is
    set (mask-weighted); 'none' returns it unchanged."""
    if mode not in COLOR_MODES:
        raise ValueError(f"colour matching {mode!r}: choose one of {', '.join(COLOR_MODES)}")
    weight = mask.astype(np.float64)
    total = weight.sum()
    if mode == "none" or total <= 0:
        return restored
    lab_r = cv2.cvtColor(restored.astype(np.float32), cv2.COLOR_RGB2LAB).astype(np.float64)
    lab_o = cv2.cvtColor(original.astype(np.float32), cv2.COLOR_RGB2LAB).astype(np.float64)

    def stats(lab):
        mean = (lab * weight[..., None]).sum(axis=(0, 1)) / total
        var = (((lab - mean) ** 2) * weight[..., None]).sum(axis=(0, 1)) / total
        return mean, np.sqrt(np.maximum(var, 1e-12))

    mean_r, std_r = stats(lab_r)
    mean_o, std_o = stats(lab_o)
    matched = (lab_r - mean_r) / std_r * std_o + mean_o
    rgb = cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def paste(image: np.ndarray, crop: np.ndarray, box: CropBox, mask: np.ndarray) -> np.ndarray:
    """`image` with the restored `crop` (any size; resized to the box) blended in by `mask`; a new array, and every
    pixel where the mask is 0 is the input's own value, bit for bit."""
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if crop.shape[0] > box.side else cv2.INTER_CUBIC
    full = np.clip(cv2.resize(crop, (box.side, box.side), interpolation=interpolation), 0.0, 1.0)
    out = image.copy()
    y0, y1, x0, x1 = max(0, box.top), min(h, box.bottom), max(0, box.left), min(w, box.right)
    if y1 <= y0 or x1 <= x0:
        return out
    part = full[y0 - box.top:y1 - box.top, x0 - box.left:x1 - box.left]
    m = mask[y0:y1, x0:x1, None].astype(np.float32)
    blended = image[y0:y1, x0:x1] * (1.0 - m) + part * m
    out[y0:y1, x0:x1] = np.where(m > 0, blended, image[y0:y1, x0:x1])
    return out


def side_by_side(before: np.ndarray, after: np.ndarray, gap: int = 8) -> np.ndarray:
    """A before | after preview of two H x W x 3 images."""
    h = before.shape[0]
    spacer = np.ones((h, gap, 3), dtype=np.float32)
    return np.concatenate([before, spacer, after], axis=1).astype(np.float32)
