"""DIIR: MagicID's DDIM-inversion based ID restoration, the image side (crop, paste, colour) of restoring one face.

For each face, in a stable order (left to right):

1. ``crop_box``: a square around the face, ``1 + 2 * margin`` times the face box's longer side (the box clipped to
   the picture), centred on the box, and larger when the paste mask reaches further (``paste_extent``), so the
   paste never meets the crop's edge; it may reach past the image border. ``extract_crop`` cuts it out (the part outside the image mirrored in, so the
   model sees a plausible surrounding) and resizes it to the model's native size (small faces are upscaled).
2. The caller encodes, inverts, re-denoises with the identity and landmarks of ``face_in_crop`` and decodes.
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

import math
from dataclasses import dataclass

import cv2
import numpy as np

from . import face_masks as fm
from .faces import Face

COLOR_MODES = ("mean_std", "none")


@dataclass(frozen=True)
class CropBox:
    """A square of the image in pixels: left, top and side (may reach past the image)."""

    left: int
    top: int
    side: int

    @property
    def right(self) -> int:
        return self.left + self.side

    @property
    def bottom(self) -> int:
        return self.top + self.side


def crop_box(face: Face, margin: float, contain: tuple[float, float, float, float] | None = None) -> CropBox:
    """The square around `face`: side = (1 + 2 * margin) x the box's longer side, centred on the box; with
    `contain` (x1, y1, x2, y2), large enough to hold that region too (still centred on the face)."""
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in face.bbox)
    side = max(8, int(math.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if contain is not None:
        reach = max(cx - contain[0], contain[2] - cx, cy - contain[1], contain[3] - cy)
        side = max(side, int(math.ceil(2.0 * reach)) + 2)
    return CropBox(int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side)


def paste_extent(face: Face, grow: float, feather: float) -> tuple[float, float, float, float]:
    """The box (x1, y1, x2, y2) outside which `paste_mask` is 0: the region's points plus grow + feather px."""
    points = fm.hull_points(face) if face.landmarks is not None else None
    if points is None:
        x0, y0, x1, y1 = (float(v) for v in face.full_bbox)
    else:
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    reach = max(float(grow), 0.0) + max(float(feather), 0.0) + 1.0
    return x0 - reach, y0 - reach, x1 + reach, y1 + reach


def extract_crop(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """The box of `image` (H x W x C float32), the part outside the image mirrored in, resized to size x size."""
    h, w = image.shape[:2]
    pad_l, pad_t = max(0, -box.left), max(0, -box.top)
    pad_r, pad_b = max(0, box.right - w), max(0, box.bottom - h)
    region = image[max(0, box.top):min(h, box.bottom), max(0, box.left):min(w, box.right)]
    if pad_l or pad_t or pad_r or pad_b:
        # OpenCV's reflect border needs the pad to fit inside the region; beyond that, repeat the edge
        mode = cv2.BORDER_REFLECT_101 if max(pad_l, pad_r) < region.shape[1] and max(pad_t, pad_b) < region.shape[0] \
            else cv2.BORDER_REPLICATE
        region = cv2.copyMakeBorder(region, pad_t, pad_b, pad_l, pad_r, mode)
    interpolation = cv2.INTER_AREA if box.side > size else cv2.INTER_CUBIC
    return np.clip(cv2.resize(region, (size, size), interpolation=interpolation), 0.0, 1.0).astype(np.float32)


def face_in_crop(face: Face, box: CropBox, size: int) -> Face:
    """`face` in the coordinates of the crop resized to size x size."""
    return face.mapped(offset=(box.left, box.top), scale=size / box.side)


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
