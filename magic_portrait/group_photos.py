"""Group pictures made of real faces, for the face-detection tests and bench (no download: skimage's data).

`group_photo(width, height, face_sizes, seed=...)` pastes faces of the given sizes (px) onto a textured, cool-toned
background: LFW faces from ``skimage.data.lfw_subset()`` (25 x 25 grey crops of real people, upscaled and tinted to a
skin tone so the tiny insightface stand-in, which looks for skin-toned blobs, sees them too) and, optionally, the
astronaut's head from ``skimage.data.astronaut()``. One face can be placed cut by the picture's border. Positions
are random (seeded) and never overlap. It returns the picture and where each face went, so a test can tell which
face a detector found.

The LFW crops are tight around the face: a face of size S fills an S x S tile, and dlib's box for it is about that
square. The astronaut's face (dlib box ~100 px in the 512 px original) is pasted with its head and shoulders around
it, scaled so that the face itself is S px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# LFW subset faces dlib's HOG detector finds reliably at 64-220 px (margin > 0.3 at every size; indices 0-99 of
# lfw_subset() are faces, 100-199 are not).
LFW_FACES = (74, 66, 89, 77, 75, 1, 63, 78, 80, 33, 62, 8, 20, 51, 19, 46, 41, 42, 3, 5)
SKIN_TINT = (1.0, 0.78, 0.62)  # RGB gain turning a grey face into a warm skin tone
ASTRONAUT_FACE_BOX = (174, 74, 274, 174)  # the astronaut's face in skimage.data.astronaut() (x1, y1, x2, y2)


@dataclass(frozen=True)
class PlacedFace:
    """Where one face went: its square (x1, y1, x2, y2) in the picture (may reach past the border), its source."""

    box: tuple[int, int, int, int]
    source: str  # "lfw <index>" or "astronaut"

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]

    def clipped(self, width: int, height: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.box
        return max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)


@dataclass(frozen=True)
class GroupPhoto:
    rgb: np.ndarray  # H x W x 3 uint8
    faces: tuple[PlacedFace, ...]


def background(width: int, height: int, seed: int) -> np.ndarray:
    """A textured cool-toned backdrop (soft blobs plus fine grain): not flat, not skin-coloured."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (max(2, height // 64), max(2, width // 64), 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, 0.04, (height, width, 3)).astype(np.float32)
    base = np.array([0.32, 0.40, 0.52], np.float32) + 0.18 * (smooth - 0.5) + grain
    base[..., 2] = np.maximum(base[..., 2], base[..., 1] + 0.05)  # blue above green: never skin-toned
    return np.clip(base * 255.0, 0, 255).round().astype(np.uint8)


def lfw_tile(index: int, size: int) -> np.ndarray:
    from skimage import data as skimage_data

    grey = skimage_data.lfw_subset()[index].astype(np.float32)
    big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_CUBIC if size > 25 else cv2.INTER_AREA)
    rgb = np.clip(big[..., None] * np.array(SKIN_TINT, np.float32) + 0.04, 0.0, 1.0)
    return (rgb * 255.0).round().astype(np.uint8)


def astronaut_tile(face_size: int) -> tuple[np.ndarray, int]:
    """The astronaut's head and shoulders scaled so her face is `face_size` px; returns it and the face's offset
    (the face square starts `offset` px from the tile's left and top)."""
    from skimage import data as skimage_data

    x1, y1, x2, y2 = ASTRONAUT_FACE_BOX
    pad = (x2 - x1) // 2
    crop = skimage_data.astronaut()[y1 - pad:y2 + pad, x1 - pad:x2 + pad]
    scale = face_size / (x2 - x1)
    side = int(round(crop.shape[0] * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(crop), (side, side), interpolation=interp), int(round(pad * scale))


def _overlaps(box, others, gap) -> bool:
    return any(box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap
               for o in others)


def group_photo(width: int, height: int, face_sizes: Sequence[int], *, seed: int = 0, border_cut: float = 0.25,
                astronaut: bool = True, people: str = "lfw") -> GroupPhoto:
    """A `width` x `height` group picture with one face per entry of `face_sizes` (px). ``people="lfw"``: the first
    is the astronaut when `astronaut`, the others LFW people in turn; ``people="astronaut"``: every face is the
    astronaut's head (every other one mirrored): a skin-toned blob in her white suit, what the tiny insightface
    stand-in detects (it sees a tinted LFW face as several blobs). With `border_cut` > 0 the LAST face is placed
    against the right border with that share of it cut off (0: no face at the border). Faces never overlap (a gap
    of a tenth of the larger face); an impossible layout raises ValueError."""
    if people not in ("lfw", "astronaut"):
        raise ValueError(f"people must be 'lfw' or 'astronaut', got {people!r}")
    rng = np.random.default_rng(seed)
    canvas = background(width, height, seed)
    tiles = []
    for n, size in enumerate(int(s) for s in face_sizes):
        if people == "astronaut" or (astronaut and n == 0):
            tile, offset = astronaut_tile(size)
            mirrored = people == "astronaut" and n % 2 == 1
            tiles.append((np.ascontiguousarray(tile[:, ::-1]) if mirrored else tile, offset, size,
                          "astronaut (mirrored)" if mirrored else "astronaut"))
        else:
            index = LFW_FACES[(n - astronaut + seed) % len(LFW_FACES)]
            tiles.append((lfw_tile(index, size), 0, size, f"lfw {index}"))
    border = len(tiles) - 1 if border_cut > 0 else None
    # the border face first, then the largest: small ones fit in the gaps
    order = sorted(range(len(tiles)), key=lambda n: (n != border, -tiles[n][0].shape[0]))
    placed: dict[int, PlacedFace] = {}
    footprints: list[tuple[int, int, int, int]] = []
    for n in order:
        tile, offset, size, source = tiles[n]
        side = tile.shape[0]
        for _ in range(5000):
            if n == border:
                left = width - side + offset + int(round(border_cut * size))
            else:
                left = int(rng.integers(0, max(1, width - side + 1)))
            top = int(rng.integers(0, max(1, height - side + 1)))
            footprint = (left, top, left + side, top + side)
            if not _overlaps(footprint, footprints, max(4, size // 10)):
                break
        else:
            raise ValueError(f"cannot place a {size} px face in a {width} x {height} picture without overlap")
        footprints.append(footprint)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + side, width), min(top + side, height)
        canvas[y0:y1, x0:x1] = tile[y0 - top:y1 - top, x0 - left:x1 - left]
        placed[n] = PlacedFace((left + offset, top + offset, left + offset + size, top + offset + size), source)
    return GroupPhoto(canvas, tuple(placed[n] for n in range(len(tiles))))
