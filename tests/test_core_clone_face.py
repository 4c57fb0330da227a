"""Core tier: Clone Face Tuning's samples and the face-weighted loss (magic_core.clone_face), on the shipped MagicID
photo set built with the offline dlib back-end. Conditions are checked pixel-wise at the pasted position; the loss
weights against their definitions written out in plain numpy/torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from magic_core import clone_face as cf
from magic_core import face_backends as fb
from magic_core import face_draw as fd
from magic_core import magicid_build as mb
from magic_core import magicid_dataset as md

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "example_workflows" / "magic_portrait_magicid_photos"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clone") / "ds"
    mb.build_dataset(mb.folder_photos(PHOTOS), folder, fb.DlibAnalyzer("hog"), md.BuildSettings())
    return md.MagicIDDataset(folder)


def sample_named(dataset, name):
    return dataset[dataset.names().index(name)]


def free_plans(sample, seeds=range(12), **options):
    return [p for p in (cf.plan_face_clone(sample, s, **options) for s in seeds) if p is not None]


def test_clone_plans_are_deterministic_free_and_inside(dataset):
    for sample in dataset:
        plans = free_plans(sample)
        if sample.name == "reference_2":  # a close-up: the face fills the picture, no room for a second one
            assert not plans
            continue
        assert plans, sample.name
        assert cf.plan_face_clone(sample, plans[0].seed) == plans[0]
        assert len({p.target_center for p in plans}) == len(plans)  # other seeds, other places
        for plan in plans:
            face = sample.faces[plan.face_index]
            x1, y1, x2, y2 = cf.map_face(face, plan).bbox
            assert 0 <= x1 and x2 <= sample.width and 0 <= y1 and y2 <= sample.height
            assert 0.6 <= plan.scale <= 1.0
            for other in sample.faces:
                ox1, oy1, ox2, oy2 = other.bbox
                assert x2 <= ox1 or ox2 <= x1 or y2 <= oy1 or oy2 <= y1, "the clone covers a face"
            for body in sample.body_keypoints:
                visible = body[body[:, 2] > 0]
                assert not ((visible[:, 0] > x1) & (visible[:, 0] < x2) & (visible[:, 1] > y1)
                            & (visible[:, 1] < y2)).any(), "the clone covers a body keypoint"
    trio = sample_named(dataset, "group_trio")
    assert cf.plan_face_clone(trio, 0, scale_range=(3.0, 3.0)) is None  # no room for a face three times as big


def test_cloned_conditions_are_drawn_at_the_pasted_position(dataset):
    """Pixel-wise: at every landmark of the cloned face, mapped to the target, the landmark condition shows an
    OpenPose face point (white) where the original had nothing; at the mapped nose, eyes and ears the skeleton shows
    those joints' colours; the face mask covers the clone; away from the clone nothing changed."""
    checked = 0
    for sample in dataset:
        for plan in free_plans(sample, seeds=range(4)):
            clone = cf.apply_face_clone(sample, plan)
            face = sample.faces[plan.face_index]
            mapped = plan.map_points(np.concatenate([face.landmarks68, fd.pupils_from_68(face.landmarks68)]))
            landmark, before = clone.condition("landmark"), sample.condition("landmark")
            for x, y in mapped:
                assert tuple(landmark[int(y), int(x)]) == fd.FACE_POINT_COLOR
                assert tuple(before[int(y), int(x)]) == (0, 0, 0)
            assert len(clone.faces) == len(sample.faces) + 1
            region = _grown(cf.map_face(face, plan).bbox, 0.25, clone)
            outside = np.ones(landmark.shape[:2], bool)
            outside[region] = False
            np.testing.assert_array_equal(landmark[outside], before[outside])
            # the skeleton: the head of the face's person, mapped
            skeleton = clone.condition("skeleton")
            assert plan.person is not None, sample.name
            head = sample.body_keypoints[plan.person]
            for joint in cf.HEAD_POINTS:
                if head[joint, 2] > 0:
                    x, y = plan.map_points(head[joint, :2])
                    assert tuple(skeleton[int(y), int(x)]) == fd.BODY_COLORS[joint], (sample.name, joint)
            np.testing.assert_array_equal(skeleton[outside], sample.condition("skeleton")[outside])
            assert len(clone.body_keypoints) == len(sample.body_keypoints) + 1
            added = clone.body_keypoints[-1]
            assert (added[[i for i in range(18) if i not in cf.HEAD_POINTS], 2] == 0).all()  # only the head
            # the face mask: the clone's inner landmarks (brows, nose, eyes, mouth) are inside, nothing changed away
            for x, y in mapped[17:68]:
                assert clone.face_mask[int(y), int(x)] == 1.0
            own = md.draw_face_masks([cf.map_face(face, plan)], sample.height, sample.width, sample.settings)[0]
            assert own.sum() > 0
            np.testing.assert_array_equal(clone.face_mask[own == 0], sample.face_mask[own == 0])
            assert (clone.face_mask[own == 1] == 1).all()
            checked += 1
    assert checked >= 12


def _grown(box, margin, sample):
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1) + 6, margin * (y2 - y1) + 6
    return (slice(max(0, int(y1 - my)), int(np.ceil(y2 + my))), slice(max(0, int(x1 - mx)), int(np.ceil(x2 + mx))))


def test_cloned_pixels_are_the_face_moved_and_nothing_else_changes(dataset):
    """With a whole-pixel shift at scale 1 the pasted pixels equal the source face's where the paste mask is 1, the
    image is untouched where it is 0, and in between each pixel is the mask's blend of the two."""
    trio = sample_named(dataset, "group_trio")
    face = trio.faces[0]
    cx, cy = face.center
    plan = cf.ClonePlan(face_index=0, scale=1.0, source_center=(cx, cy), target_center=(cx - 40, cy - 100),
                        person=cf.person_of_face(face, trio.pose), seed=0)
    clone = cf.apply_face_clone(trio, plan)
    alpha = cf.paste_mask(cf.map_face(face, plan), trio.height, trio.width)
    inside, outside = alpha > 1 - 1 / 1024, alpha == 0.0  # where a blend is within a thousandth of the clone
    assert inside.sum() > 1000 and outside.any()
    shifted = np.roll(np.roll(trio.image, -40, axis=1), -100, axis=0)  # the source pixel (x + 40, y + 100) at (x, y)
    np.testing.assert_array_equal(clone.image[inside], shifted[inside])
    np.testing.assert_array_equal(clone.image[outside], trio.image[outside])
    blend = np.rint(trio.image * (1 - alpha[..., None]) + shifted * alpha[..., None])
    np.testing.assert_array_equal(clone.image, blend.astype(np.uint8))


def test_cloning_is_deterministic_and_leaves_the_sample_alone(dataset):
    duo = sample_named(dataset, "group_duo")
    before = {k: v.copy() for k, v in duo.conditions.items()}
    image, mask, pose = duo.image.copy(), duo.face_mask.copy(), repr(duo.pose)
    a = cf.clone_face_sample(duo, 3)
    b = cf.clone_face_sample(duo, 3)
    other = next(s for s in range(4, 20) if cf.plan_face_clone(duo, s) is not None)
    c = cf.clone_face_sample(duo, other)
    for x, y in ((a.image, b.image), (a.face_mask, b.face_mask), *((a.condition(m), b.condition(m))
                                                                   for m in ("skeleton", "landmark", "merged"))):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.condition("landmark"), c.condition("landmark"))
    np.testing.assert_array_equal(duo.image, image)
    np.testing.assert_array_equal(duo.face_mask, mask)
    assert repr(duo.pose) == pose and all(np.array_equal(before[k], duo.conditions[k]) for k in before)
    assert a.name == "group_duo_clone3" and "cloned face" in a.notes[-1]


# ---------------------------------------------------------------------------------------------------- loss weights


def block_mean(mask: np.ndarray, cell: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


def test_face_loss_weights_weigh_what_they_say(dataset):
    sample = sample_named(dataset, "group_quartet")
    mask = sample.face_mask
    h, w = mask.shape[0] // 8, mask.shape[1] // 8
    raw = cf.face_loss_weights(mask, (h, w), face_weight=3.0, background_weight=0.5, normalize=False)[0, 0].numpy()
    coverage = block_mean(mask.astype(np.float64), 8)
    np.testing.assert_allclose(raw, 0.5 + 2.5 * coverage, rtol=1e-6, atol=1e-6)
    assert (raw[coverage == 1] == 3.0).all() and (raw[coverage == 0] == 0.5).all()
    assert (coverage == 1).sum() > 20 and ((coverage > 0) & (coverage < 1)).sum() > 10
    # compact support: a cell the mask does not touch has the background weight exactly
    touched = block_mean((mask > 0).astype(np.float64), 8) > 0
    assert (raw[~touched] == 0.5).all()
    normalised = cf.face_loss_weights(mask, (h, w), face_weight=3.0, background_weight=0.5)[0, 0].numpy()
    np.testing.assert_allclose(normalised, raw / raw.mean(), rtol=1e-6)
    assert abs(normalised.mean() - 1) < 1e-6
    # the loss: an error of 1 in the face cells only costs face_weight x their share; in the background, 0.5 x its share
    pred = torch.zeros(1, 4, h, w)
    full = torch.from_numpy(coverage == 1)
    empty = torch.from_numpy(coverage == 0)
    weights = torch.from_numpy(raw)[None, None]
    face_err = cf.weighted_mse(pred, full.float().expand(1, 4, h, w), weights)
    back_err = cf.weighted_mse(pred, empty.float().expand(1, 4, h, w), weights)
    assert torch.allclose(face_err, torch.tensor([3.0 * full.float().mean()]), rtol=1e-6)
    assert torch.allclose(back_err, torch.tensor([0.5 * empty.float().mean()]), rtol=1e-6)
    # equal weights are the plain MSE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 4, h, w, generator=g)
    ones = cf.face_loss_weights(np.stack([mask, mask]), (h, w), face_weight=1.0, background_weight=1.0)
    assert torch.allclose(cf.weighted_mse(a, b, ones), ((a - b) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6)


def test_magicapture_weights_reproduce_its_masked_loss():
    """MagiCapture's loss written out as its training code computes it (nearest-resized binary mask,
    m = (M + 0.01)^T / max, prediction and target times m, MSE, times latent area / mask area), for one sample."""
    g = torch.Generator().manual_seed(1)
    mask = np.zeros((256, 192), np.float32)
    mask[40:130, 60:140] = 1.0
    pred, target = torch.randn(1, 4, 32, 24, generator=g), torch.randn(1, 4, 32, 24, generator=g)
    for temperature in (1.0, 2.0):
        m = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(32, 24), mode="nearest")
        m = (m + 0.01) ** temperature
        m = m / m.max()
        reference = torch.nn.functional.mse_loss(pred * m, target * m, reduction="none").mean(dim=(1, 2, 3))
        reference = reference * (32 * 24) / m[0].sum()
        weights = cf.magicapture_loss_weights(mask, (32, 24), temperature)
        assert torch.allclose(cf.weighted_mse(pred, target, weights), reference, rtol=1e-5)


def test_loss_weights_refuse_what_they_cannot_weigh():
    with pytest.raises(ValueError, match="both 0"):
        cf.face_loss_weights(np.zeros((16, 16)), (2, 2), face_weight=0, background_weight=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cf.face_loss_weights(np.full((16, 16), 2.0), (2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        cf.weighted_mse(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 4, 4))
    uint8 = cf.face_loss_weights(np.full((16, 16), 255, np.uint8), (2, 2), normalize=False)
    assert (uint8 == 2.0).all()
