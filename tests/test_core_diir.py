"""Core tier: DIIR's image side (magic_core.diir): crops, paste masks, colour matching and pasting."""

import cv2
import numpy as np
import pytest
import tolerances as tol
import torch

from magic_core import diir
from magic_core import face_crop as crop
from magic_core.faces import Face


def _face(x0, y0, x1, y1, landmarks=False):
    w, h = x1 - x0, y1 - y0
    kps = np.array([[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h], [x0 + 0.5 * w, y0 + 0.6 * h],
                    [x0 + 0.35 * w, y0 + 0.8 * h], [x0 + 0.65 * w, y0 + 0.8 * h]])
    lm = None
    if landmarks:
        t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        lm = np.stack([x0 + w / 2 + 0.45 * w * np.cos(t), y0 + h / 2 + 0.45 * h * np.sin(t)], axis=1)
    return Face(bbox=[x0, y0, x1, y1], kps=kps, score=0.9, landmarks68=lm)


def test_face_square_is_a_centred_square_of_the_margin_on_each_side():
    box = crop.face_square(_face(100, 50, 180, 150), 0.5)
    assert box.side == 200  # longer side 100 x (1 + 2 x 0.5)
    assert (box.left + box.side / 2, box.top + box.side / 2) == (140, 100)
    odd = crop.face_square(_face(10.2, 20.0, 43.5, 41.0), 0.25)
    assert odd.side == 50  # 33.3 x 1.5 = 49.95, rounded up to whole pixels
    assert (odd.left, odd.top) == (round(26.85 - 25), round(30.5 - 25))
    assert crop.face_square(_face(0, 0, 3, 3), 0.0).side == crop.MIN_SIDE
    with pytest.raises(ValueError, match="margin"):
        crop.face_square(_face(0, 0, 10, 10), -0.1)


def test_cut_square_at_its_own_size_is_the_slice_with_black_or_mirrored_edges():
    g = np.random.default_rng(1)
    image = g.random((50, 40, 3)).astype(np.float32)
    box = crop.CropBox(-6, 30, 30)  # 6 px past the left edge, 10 px past the bottom
    black = crop.cut_square(image, box, outside="zeros")
    expected = np.zeros((30, 30, 3), np.float32)
    expected[0:20, 6:30] = image[30:50, 0:24]
    np.testing.assert_array_equal(black, expected)
    mirrored = crop.cut_square(image, box)
    np.testing.assert_array_equal(mirrored[0:20, 6:30], image[30:50, 0:24])
    np.testing.assert_array_equal(mirrored[0:20, 5], image[30:50, 1])  # reflect-101: the edge column is not repeated
    with pytest.raises(ValueError, match="outside"):
        crop.cut_square(image, box, outside="edge")


def test_cut_square_resizes_and_mirrors_past_the_border():
    g = np.random.default_rng(0)
    image = g.random((120, 90, 3)).astype(np.float32)
    inside = crop.cut_square(image, crop.CropBox(10, 20, 40), 40)
    np.testing.assert_allclose(inside, image[20:60, 10:50], atol=tol.float_tol(torch.float32, 16))  # no resize at the same size
    border = crop.cut_square(image, crop.CropBox(-10, -5, 40), 80)
    assert border.shape == (80, 80, 3) and border.dtype == np.float32
    expected = cv2.copyMakeBorder(image[0:35, 0:30], 5, 0, 10, 0, cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(border, np.clip(cv2.resize(expected, (80, 80), interpolation=cv2.INTER_CUBIC), 0, 1),
                               atol=tol.float_tol(torch.float32, 16))  # a 4x4 bicubic kernel on values in [0, 1]
    huge = crop.cut_square(image, crop.CropBox(-200, -200, 500), 64)  # far past the image: edges repeated
    assert huge.shape == (64, 64, 3) and np.isfinite(huge).all()


def test_face_in_crop_maps_every_point():
    face = _face(100, 50, 180, 150, landmarks=True)
    box = crop.CropBox(90, 40, 200)
    moved = crop.face_in_crop(face, box, 400)
    np.testing.assert_allclose(moved.bbox, (face.bbox - [90, 40, 90, 40]) * 2, atol=tol.float_tol(torch.float32, 2, 1024))
    np.testing.assert_allclose(moved.kps, (face.kps - [90, 40]) * 2, atol=tol.float_tol(torch.float32, 2, 1024))
    np.testing.assert_allclose(moved.landmarks68, (face.landmarks68 - [90, 40]) * 2,
                               atol=tol.float_tol(torch.float32, 2, 1024))


def test_paste_changes_nothing_where_the_mask_is_zero():
    g = np.random.default_rng(1)
    image = g.random((101, 137, 3)).astype(np.float32)
    face = _face(40, 30, 80, 70, landmarks=True)
    box = crop.face_square(face, 0.6)
    mask = diir.paste_mask(face, box, 101, 137, grow=4, feather=3)
    assert mask.max() == 1 and mask.min() == 0
    outside_square = np.ones((101, 137), bool)
    outside_square[max(0, box.top):box.bottom, max(0, box.left):box.right] = False
    assert not mask[outside_square].any()  # never outside the crop square
    restored = g.random((64, 64, 3)).astype(np.float32)
    out = diir.paste(image, restored, box, mask)
    assert out is not image and np.array_equal(out[mask == 0], image[mask == 0])
    assert (out[mask == 1] != image[mask == 1]).any()
    full = cv2.resize(restored, (box.side, box.side), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    y, x = np.argwhere(mask == 1)[0]
    np.testing.assert_allclose(out[y, x], full[y - box.top, x - box.left], atol=tol.float_tol(torch.float32, 16))


def test_paste_mask_without_landmarks_is_the_ellipse():
    face = _face(40, 30, 80, 70)
    mask = diir.paste_mask(face, crop.face_square(face, 0.6), 120, 120, grow=0, feather=0)
    assert mask[50, 60] == 1 and mask[31, 41] == 0  # centre in, box corner out


# cv2's LAB -> RGB in float32: a 3x3 matrix, a cube or linear segment, the sRGB gamma and a 3x3 matrix, each output
# at most this many rounded operations from LAB values bounded by LAB_MAGNITUDE (|a|, |b| <= 128, L <= 100)
LAB_TO_RGB_OPS = 16
LAB_MAGNITUDE = 128.0


def test_match_colors_is_the_weighted_lab_mean_std_transfer_written_out():
    """Per LAB channel, mask-weighted: (lab_r - mean_r) / std_r * std_o + mean_o, back to RGB, clipped; the statistics
    written out here in float64 with a soft mask (fractional weights count as such), cv2 for the colour space."""
    g = np.random.default_rng(2)
    original = (g.random((48, 40, 3)) * 0.5 + 0.25).astype(np.float32)
    restored = np.clip(original * 0.6 + 0.3, 0, 1).astype(np.float32)  # brighter, lower contrast
    mask = np.zeros((48, 40), np.float32)
    mask[8:40, 6:30] = g.random((32, 24)).astype(np.float32)  # a feathered region: weights in (0, 1)
    lab_r = cv2.cvtColor(restored, cv2.COLOR_RGB2LAB).astype(np.float64).reshape(-1, 3)
    lab_o = cv2.cvtColor(original, cv2.COLOR_RGB2LAB).astype(np.float64).reshape(-1, 3)
    w = mask.astype(np.float64).reshape(-1)
    expected_lab = np.empty_like(lab_r)
    for c in range(3):
        mean_r, mean_o = np.sum(w * lab_r[:, c]) / np.sum(w), np.sum(w * lab_o[:, c]) / np.sum(w)
        std_r = np.sqrt(np.sum(w * (lab_r[:, c] - mean_r) ** 2) / np.sum(w))
        std_o = np.sqrt(np.sum(w * (lab_o[:, c] - mean_o) ** 2) / np.sum(w))
        expected_lab[:, c] = (lab_r[:, c] - mean_r) * (std_o / std_r) + mean_o
    expected = np.clip(cv2.cvtColor(expected_lab.reshape(48, 40, 3).astype(np.float32), cv2.COLOR_LAB2RGB), 0, 1)
    matched = diir.match_colors(restored, original, mask)
    assert matched.dtype == np.float32 and matched.shape == restored.shape
    # the two float64 routes agree far below float32's rounding of the LAB values fed to cv2
    np.testing.assert_allclose(matched, expected, rtol=0,
                               atol=tol.float_tol(torch.float32, LAB_TO_RGB_OPS, LAB_MAGNITUDE))
    assert tol.differs(torch.from_numpy(matched), torch.from_numpy(restored))  # it did move the colours
    assert diir.match_colors(restored, original, mask, "none") is restored
    with pytest.raises(ValueError, match="colour matching"):
        diir.match_colors(restored, original, mask, "histogram")
