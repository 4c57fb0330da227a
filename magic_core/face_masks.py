"""Face masks: soft [H, W] float32 masks in [0, 1] for the faces of one image (numpy + OpenCV, no ComfyUI).

Shapes (``face_mask(..., shape=...)``):

- ``"box"``: the face box.
- ``"ellipse"``: the ellipse inscribed in the face box (a face-shaped region; never outside the box).
- ``"hull"``: the convex hull of the dense landmarks (iBUG 68, else insightface 106), extended up over the forehead
  (below). A face without dense landmarks falls back to the convex hull of its 5 keypoints and the ellipse
  inscribed in its box (the box already spans what the detector saw of the head, so no forehead is added there).

Forehead (hull only). iBUG 68 (and 106) landmarks stop at the brows. With ``forehead=k`` the hull also takes in
every landmark reflected across the top landmark line, its depth below that line multiplied by ``k``: along the face's
own vertical axis (from the mouth corners' midpoint to the eyes' midpoint, so tilted faces tilt their forehead) a
point at depth ``d`` below the top landmark moves to height ``k * d`` above it; across the axis it keeps its
position. The jaw line thus comes back as a dome over the brows. The brows sit at about one third of the
hairline-to-chin height, so the chin's depth below them is about twice the forehead's height: ``k = 0.5`` (default)
reaches a typical hairline, ``0`` turns the extension off. The map is affine, so the extended hull is the hull of
the landmarks and their reflections, and the original landmarks always stay inside it.

Pixel convention: coordinates are continuous pixel coordinates (x right, y down); pixel ``(row i, column j)`` covers
``[j, j + 1) x [i, i + 1)``, so a landmark at ``(x, y)`` lies in pixel ``(floor(y), floor(x))``. A box takes the
pixels whose centre ``(j + 0.5, i + 0.5)`` it contains: ``(10, 20, 50, 60)`` is exactly ``mask[20:60, 10:50]``.
Ellipses and hulls are filled by OpenCV with sub-pixel precision (``shift=4``); its polygon fill also takes the pixels
the outline passes through (up to half a pixel outside), so the hull holds the pixel of every landmark it is built
from; the ellipse's axes are drawn half a pixel shorter so its area matches the true ellipse's, and it is cut to the
box.

``grow`` (pixels, rounded to an integer): positive dilates, negative erodes, with an elliptical (disc) kernel of
radius ``|grow|``, so every edge moves by ``|grow|`` pixels (corners round off when growing). ``feather`` (pixels)
softens the edge in one of two ways (``feather_kind``):

- ``"gaussian"`` (Face Masks): the sigma of a Gaussian blur of the binary mask (kernel radius ``ceil(3 * feather)``):
  an edge becomes a ramp 0 -> 1 centred on it (0.5 on the edge), and nothing leaks further than
  ``ceil(3 * feather)`` pixels from it.
- ``"band"`` (DIIR's paste mask): the mask stays 1 on the (grown) region and falls to 0 across a band of
  ``feather`` pixels outside it, ``smoothstep(1 - d / feather)`` of the Euclidean distance ``d`` from a pixel's
  centre to the nearest region pixel's centre; exactly 0 from ``d >= feather`` on (compact support: the mask is
  non-zero only within ``grow + feather`` pixels of the shape).

Faces partly or wholly outside the image are clipped, never an error: each mask is rasterised on a window holding
the whole face plus the grow + feather reach, then cropped to the image, so an edge near the border grows, shrinks and
feathers as if the image went on (a face cut by the border stays 1 up to the border) and a face cut by the border gets
exactly the pixels a larger image would show there (the window is only cut for a face reaching more than an image
size past the border). Any height and width >= 1 work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from .faces import Face

SHAPES = ("box", "ellipse", "hull")
FEATHER_KINDS = ("gaussian", "band")
DEFAULT_FOREHEAD = 0.5
_SHIFT = 4  # sub-pixel bits for OpenCV's polygon filling
_ONE = 1 << _SHIFT
_FAR = 1.0e6  # coordinates are clamped to +-this many pixels outside the window (keeps OpenCV's fixed point safe)


def _check_size(height, width) -> tuple[int, int]:
    h, w = int(height), int(width)
    if h < 1 or w < 1 or h != height or w != width:
        raise ValueError(f"mask size must be two positive integers, got height={height!r}, width={width!r}")
    return h, w


def face_up_axis(face: Face) -> np.ndarray:
    """Unit vector (x, y) pointing up the face: from the mouth corners' midpoint to the eyes' midpoint
    (image up (0, -1) when the keypoints are degenerate)."""
    kps = face.kps.astype(np.float64)
    up = (kps[0] + kps[1]) / 2 - (kps[3] + kps[4]) / 2
    norm = float(np.hypot(*up))
    if not np.isfinite(norm) or norm < 1e-6:
        return np.array([0.0, -1.0])
    return up / norm


def _ellipse_points(bbox: np.ndarray, n: int = 72) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    cx, cy, ax, ay = (x1 + x2) / 2, (y1 + y2) / 2, abs(x2 - x1) / 2, abs(y2 - y1) / 2
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def hull_points(face: Face, forehead: float = DEFAULT_FOREHEAD) -> np.ndarray:
    """The points whose convex hull is the face's ``hull`` mask (float64 [N, 2], pixel coordinates): the dense
    landmarks plus their forehead reflections (module docstring), or, without dense landmarks, the 5 keypoints and
    points on the ellipse inscribed in the box."""
    forehead = float(forehead)
    if not math.isfinite(forehead) or forehead < 0:
        raise ValueError(f"forehead must be a number >= 0 (a fraction of the face depth below the brows), got {forehead!r}")
    lm = face.landmarks
    if lm is None:
        return np.concatenate([face.kps.astype(np.float64), _ellipse_points(face.full_bbox)])
    pts = lm.astype(np.float64)
    if forehead <= 0:
        return pts
    up = face_up_axis(face)
    height = pts @ up  # larger = higher on the face
    top = float(height.max())
    lifted = pts + np.outer((top - height) * (1.0 + forehead), up)
    return np.concatenate([pts, lifted])


def _reach(grow: int, feather: float, feather_kind: str = "gaussian") -> int:
    if feather <= 0:
        return abs(grow) + 1
    return abs(grow) + int(math.ceil(3.0 * feather if feather_kind == "gaussian" else feather)) + 1


def face_mask(face: Face, height: int, width: int, shape: str = "box", grow: float = 0, feather: float = 0.0,
              forehead: float = DEFAULT_FOREHEAD, feather_kind: str = "gaussian") -> np.ndarray:
    """A float32 [height, width] mask in [0, 1] of one face (module docstring: shapes, grow, feather and its kind,
    forehead). Box and ellipse shapes use the detector's whole box (``Face.full_bbox``), cut to the picture."""
    h, w = _check_size(height, width)
    if shape not in SHAPES:
        raise ValueError(f"mask shape {shape!r} is unknown: use one of {', '.join(SHAPES)}")
    if feather_kind not in FEATHER_KINDS:
        raise ValueError(f"feather kind {feather_kind!r} is unknown: use one of {', '.join(FEATHER_KINDS)}")
    grow_f, feather = float(grow), float(feather)
    if not math.isfinite(grow_f) or not math.isfinite(feather) or feather < 0:
        raise ValueError(f"grow must be a finite number of pixels and feather a number >= 0, got grow={grow!r}, "
                         f"feather={feather!r}")
    grow_px = int(round(grow_f))
    reach = _reach(grow_px, feather, feather_kind)
    out = np.zeros((h, w), dtype=np.float32)

    if shape == "hull":
        pts = hull_points(face, forehead)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
    else:
        x1, y1, x2, y2 = (float(v) for v in face.full_bbox)
        lo = np.array([min(x1, x2), min(y1, y2)])
        hi = np.array([max(x1, x2), max(y1, y2)])

    # The window: the whole shape plus the grow/feather reach. OpenCV's polygon fill is exactly translation
    # invariant but not clipping invariant, so the window is cut only for a face reaching more than an image size
    # past the border (then pixels along its edges may round differently).
    cut = reach + max(h, w)
    wx0 = max(int(math.floor(lo[0])) - reach, -cut)
    wy0 = max(int(math.floor(lo[1])) - reach, -cut)
    wx1 = min(int(math.ceil(hi[0])) + reach + 1, w + cut)
    wy1 = min(int(math.ceil(hi[1])) + reach + 1, h + cut)
    if wx1 <= 0 or wy1 <= 0 or wx0 >= w or wy0 >= h:
        return out  # too far outside the image to reach it
    win = np.zeros((wy1 - wy0, wx1 - wx0), dtype=np.uint8)
    origin = np.array([wx0, wy0], dtype=np.float64)

    def fixed(points: np.ndarray) -> np.ndarray:
        # continuous coordinates -> OpenCV's pixel-centre coordinates in the window, as fixed point
        local = np.clip(np.asarray(points, dtype=np.float64) - origin - 0.5, -_FAR, _FAR)
        return np.rint(local * _ONE).astype(np.int32)

    def fill_box(target: np.ndarray) -> None:
        # the pixels whose centres lie in [lo, hi)
        cols = np.clip([math.ceil(lo[0] - 0.5) - wx0, math.ceil(hi[0] - 0.5) - wx0], 0, target.shape[1])
        rows = np.clip([math.ceil(lo[1] - 0.5) - wy0, math.ceil(hi[1] - 0.5) - wy0], 0, target.shape[0])
        target[rows[0]:rows[1], cols[0]:cols[1]] = 1

    if shape == "box":
        fill_box(win)
    elif shape == "ellipse":
        centre = fixed(((lo + hi) / 2)[None])[0]
        # half a pixel shorter: OpenCV's fill takes the outline's pixels too (module docstring)
        axes = np.rint(np.clip((hi - lo) / 2 - 0.5, 0, _FAR) * _ONE).astype(np.int64)
        cv2.ellipse(win, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])), 0, 0, 360, 1, -1,
                    cv2.LINE_8, _SHIFT)
        # inscribed: never outside the box (OpenCV's polygon edges are inclusive)
        box = np.zeros_like(win)
        fill_box(box)
        win &= box
    else:
        hull = cv2.convexHull(fixed(pts).reshape(-1, 1, 2))
        cv2.fillConvexPoly(win, hull, 1, cv2.LINE_8, _SHIFT)

    if grow_px:
        r = abs(grow_px)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        win = (cv2.dilate if grow_px > 0 else cv2.erode)(win, kernel)
    soft = win.astype(np.float32)
    if feather > 0 and feather_kind == "band":
        # distance from each pixel outside the region to the nearest region pixel (0 inside the region)
        distance = cv2.distanceTransform((win == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # the exact transform's squared distances are whole numbers, but OpenCV's float32 square root differs in the
        # last bit between its SIMD and scalar paths (which depend on where the buffer lies in memory): rebuild them
        # from the rounded squares so the mask, and every pixel pasted through it, is the same on every run
        distance = np.sqrt(np.rint(np.square(distance.astype(np.float64)))).astype(np.float32)
        ramp = np.clip(1.0 - distance / np.float32(feather), 0.0, 1.0)
        soft = (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)
    elif feather > 0:
        radius = int(math.ceil(3.0 * feather))
        soft = cv2.GaussianBlur(soft, (2 * radius + 1, 2 * radius + 1), sigmaX=feather, sigmaY=feather,
                                borderType=cv2.BORDER_REPLICATE)
    # paste the window's part inside the image
    ix0, iy0, ix1, iy1 = max(wx0, 0), max(wy0, 0), min(wx1, w), min(wy1, h)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0:iy1, ix0:ix1] = soft[iy0 - wy0:iy1 - wy0, ix0 - wx0:ix1 - wx0]
    return np.clip(out, 0.0, 1.0, out=out)


def masks_for(faces: Sequence[Face], height: int, width: int, shape: str = "box", grow: float = 0,
              feather: float = 0.0, forehead: float = DEFAULT_FOREHEAD, feather_kind: str = "gaussian") -> np.ndarray:
    """One mask per face, float32 [N, height, width] (N = 0 gives shape (0, height, width))."""
    h, w = _check_size(height, width)
    faces = list(faces or ())
    if not faces:
        return np.zeros((0, h, w), dtype=np.float32)
    return np.stack([face_mask(f, h, w, shape=shape, grow=grow, feather=feather, forehead=forehead,
                               feather_kind=feather_kind) for f in faces])


def union_mask(masks) -> np.ndarray:
    """The pixel-wise maximum of masks: an [N, H, W] array (N may be 0: all zeros) or a non-empty sequence of
    [H, W] arrays of one size. Returns float32 [H, W]."""
    if isinstance(masks, np.ndarray):
        arr = masks
    else:
        items = [np.asarray(m) for m in masks]
        if not items:
            raise ValueError("union_mask needs at least one mask (or an array of shape (0, H, W) for 'none')")
        if len({m.shape for m in items}) != 1:
            raise ValueError(f"masks differ in size: {sorted({m.shape for m in items})}")
        arr = np.stack(items)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] (or a list of [H, W]), got shape {arr.shape}")
    if arr.shape[0] == 0:
        return np.zeros(arr.shape[1:], dtype=np.float32)
    return arr.max(axis=0).astype(np.float32)
