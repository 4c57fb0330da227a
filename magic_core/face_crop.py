"""The one face crop of the pack: a square around a face, ``margin`` face sizes of room on each side.

Every node that crops a face (ID Embeds' reference crops for CLIP vision, DIIR Face Restore's crops for the model)
uses ``face_square`` for where the square is and ``cut_square`` to cut it, so a margin means the same thing in
every node: side = (1 + 2 x margin) x the face box's longer side, centred on the box, in whole pixels (rounded up,
at least 8). What lies past the picture is mirrored in (a plausible surrounding for a model) or left black (what
CLIP vision is shown). This module does not import ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .faces import Face

MIN_SIDE = 8  # pixels: the smallest square a face crop is
OUTSIDE_MODES = ("mirror", "zeros")


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


def face_square(face: Face, margin: float, contain: tuple[float, float, float, float] | None = None) -> CropBox:
    """The square around `face`: side = (1 + 2 * margin) x the box's longer side (rounded up, at least MIN_SIDE),
    centred on the box; with `contain` (x1, y1, x2, y2), large enough to hold that region too (still centred)."""
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in face.bbox)
    side = max(MIN_SIDE, int(math.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if contain is not None:
        reach = max(cx - contain[0], contain[2] - cx, cy - contain[1], contain[3] - cy)
        side = max(side, int(math.ceil(2.0 * reach)) + 2)
    return CropBox(int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side)


def cut_square(image: np.ndarray, box: CropBox, size: int | None = None, outside: str = "mirror") -> np.ndarray:
    """The box of `image` (H x W x C float32) at its own resolution, or resized to size x size; the part past the
    picture mirrored in (``mirror``; edges repeated where the mirror would not fit) or black (``zeros``)."""
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {', '.join(OUTSIDE_MODES)}, got {outside!r}")
    h, w = image.shape[:2]
    pad_l, pad_t = max(0, -box.left), max(0, -box.top)
    pad_r, pad_b = max(0, box.right - w), max(0, box.bottom - h)
    region = image[max(0, box.top):min(h, box.bottom), max(0, box.left):min(w, box.right)]
    if outside == "zeros" or region.size == 0:
        out = np.zeros((box.side, box.side, image.shape[2]), dtype=np.float32)
        out[pad_t:pad_t + region.shape[0], pad_l:pad_l + region.shape[1]] = region
        region = out
    elif pad_l or pad_t or pad_r or pad_b:
        # OpenCV's reflect border needs the pad to fit inside the region; beyond that, repeat the edge
        mode = cv2.BORDER_REFLECT_101 if max(pad_l, pad_r) < region.shape[1] and max(pad_t, pad_b) < region.shape[0] \
            else cv2.BORDER_REPLICATE
        region = cv2.copyMakeBorder(region, pad_t, pad_b, pad_l, pad_r, mode)
    if size is None:
        return np.ascontiguousarray(region, dtype=np.float32)
    interpolation = cv2.INTER_AREA if box.side > size else cv2.INTER_CUBIC
    return np.clip(cv2.resize(region, (size, size), interpolation=interpolation), 0.0, 1.0).astype(np.float32)


def face_in_crop(face: Face, box: CropBox, size: int) -> Face:
    """`face` in the coordinates of the crop resized to size x size."""
    return face.mapped(offset=(box.left, box.top), scale=size / box.side)
