"""Face alignment as insightface's ``face_align.norm_crop`` does it: the 5 keypoints onto the ArcFace template by a
least-squares similarity transform (docs/ipadapter_format.md, "Face alignment"). FaceID-Plus IP-Adapters take CLIP
hidden states of this crop. numpy and OpenCV.
"""

from __future__ import annotations

import numpy as np
import torch

from .ipadapter import IPAdapterError, IPAdapterInputError

ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """insightface's 5-point ArcFace template for a ``size`` x ``size`` crop (the scaling rule:
    docs/ipadapter_format.md, "Face alignment")."""
    size = int(size)
    if size < 1:
        raise IPAdapterError(f"crop size must be positive, got {size}")
    if size % 112 == 0:
        ratio, dx = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        dx = 8.0 * ratio
    else:
        ratio, dx = size / 112.0, 0.0
    dst = ARCFACE_TEMPLATE_112 * ratio
    dst[:, 0] += dx
    return dst


def similarity_transform(src, dst) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` points onto ``dst``
    in the least-squares sense: ``[[a, -b, tx], [b, a, ty]]`` solved as a linear least-squares problem, which has the
    same optimum as Umeyama's method (skimage's ``SimilarityTransform.estimate``)."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise IPAdapterInputError("similarity_transform needs two equal lists of at least 2 points")
    if np.linalg.norm(src - src.mean(axis=0), axis=1).max() < 1e-3:
        raise IPAdapterInputError("the keypoints are degenerate (all at one point)")
    n = src.shape[0]
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    a[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    (ca, cb, tx, ty), *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    return np.array([[ca, -cb, tx], [cb, ca, ty]], dtype=np.float64)


def align_face(rgb, kps, size: int = 224, *, return_matrix: bool = False):
    """insightface's ``norm_crop``: warp ``rgb`` (H x W x 3, uint8 or float in [0, 1]) so the 5 keypoints ``kps``
    (insightface order: eyes, nose tip, mouth corners, image-left first) land on the ArcFace template of a
    ``size`` x ``size`` crop. Returns the uint8 crop (and the 2 x 3 matrix with ``return_matrix``)."""
    import cv2

    img = np.asarray(rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise IPAdapterInputError(f"align_face expects an H x W x 3 image, got shape {list(img.shape)}")
    if img.dtype != np.uint8:
        img = np.rint(np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    pts = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise IPAdapterInputError(f"align_face needs 5 finite (x, y) keypoints, got shape {list(np.shape(kps))}")
    matrix = similarity_transform(pts, arcface_template(size))
    crop = cv2.warpAffine(np.ascontiguousarray(img), matrix, (int(size), int(size)), borderValue=0.0)
    return (crop, matrix) if return_matrix else crop
