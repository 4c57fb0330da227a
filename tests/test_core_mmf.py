"""Core tier: MagicID's training half (magic_core.mmf) on the one loop with a toy UNet: the MMF schedules against the
loss log, a MagicID dataset folder (the shipped photo set built with the offline dlib back-end) as a source, the
merged condition, the landmark-only fallback, Clone Face Tuning's samples checked pixel-wise at the pasted position,
the face-weighted loss against its formula in plain torch, and bit-identical resume with all of it on. No ComfyUI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tolerances as tol
import torch
import torch.nn.functional as F
from oracles import merged_state
from PIL import Image
from test_core_training import ADAPTER, CH, LAT, LAYERS, SIGMAS, ToyUNet, toy_forward

from magic_core import clone_face as cf
from magic_core import face_backends as fb
from magic_core import face_draw as fd
from magic_core import magicid_build as mb
from magic_core import magicid_dataset as md
from magic_core import mmf, train_data
from magic_core.repcontrolnet import init_weights_from_base
from magic_core.repcontrolnet_train import LOSS_LOG, train_repcontrolnet

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "example_workflows" / "magic_portrait_magicid_photos"
RES = 64
MIX = torch.randn(LAT, 3, 1, 1, generator=torch.Generator().manual_seed(5))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mmf") / "ds"
    mb.build_dataset(mb.folder_photos(PHOTOS), folder, fb.DlibAnalyzer("hog"), md.BuildSettings())
    return folder


def encode(batch, step):
    """The toy's 'VAE': a fixed 1x1 map of the 8x8-pooled image (the loop's prepare_batch hook)."""
    return {**batch, "latent": F.conv2d(F.avg_pool2d(batch["image"] * 2 - 1, 8), MIX)}


def train(net, source, **kw):
    kw = {"steps": 6, "lr": 5e-3, "adapter_config": ADAPTER, "seed": 7, "sigmas": SIGMAS, "prepare_batch": encode,
          **kw}
    return train_repcontrolnet(toy_forward(net), net.state_dict(), LAYERS, source, **kw)


class Recording(mmf.MagicIDSource):
    """A MagicID source that records what the loop asked for: (step, slot, key, sample name)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def load(self, ref):
        out = super().load(ref)
        self.asked.append((ref.step, ref.slot, ref.condition, out["key"]))
        return out


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / LOSS_LOG).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------ schedules


def test_alternate_gives_skeleton_landmark_in_turn_and_the_log_says_so(dataset, tmp_path):
    net, source = ToyUNet(), Recording(dataset, RES)
    schedule = mmf.make_schedule("alternate", source)
    result = train(net, source, steps=6, batch_size=2, condition_choice=schedule, checkpoint_dir=tmp_path,
                   log_extra=mmf.ModalityLog(schedule, 7))
    log = read_log(tmp_path)
    assert [e["condition"] for e in log] == ["skeleton", "landmark"] * 3
    assert sorted({(s, k) for s, _, k, _ in source.asked}) == [(s, "skeleton" if s % 2 == 0 else "landmark")
                                                                for s in range(6)]
    # per-modality running loss: the mean of that modality's steps so far (window 10), from the logged losses
    for i, entry in enumerate(log):
        for modality in ("skeleton", "landmark"):
            mine = [e["loss"] for e in log[: i + 1] if e["condition"] == modality][-mmf.RUNNING_WINDOW:]
            if mine:
                assert entry[f"loss_{modality}_running"] == pytest.approx(sum(mine) / len(mine), rel=1e-12)
            else:
                assert f"loss_{modality}_running" not in entry
    assert result.weights.metadata["trained_modalities"] == "skeleton,landmark"
    assert result.weights.metadata["training_conditions"] == "alternate: skeleton, landmark, ..."
    assert result.weights.metadata["training_data"].startswith("MagicID dataset 'ds': 6 samples at 64px")


@pytest.mark.parametrize("weights", [{"skeleton": 1, "landmark": 3}, {"skeleton": 1, "landmark": 1, "merged": 2}])
def test_random_matches_its_weights_over_many_steps(weights):
    """Each modality's count over n steps is Binomial(n, p): within 5 standard deviations (a false alarm about once
    in 1.7 million runs); a schedule ignoring the weights (1/2 or 1/3 each) is 14 or more deviations off."""
    text = ", ".join(f"{k}={v}" for k, v in weights.items())
    schedule = mmf.ModalitySchedule("random", weights=text)
    n = 20000
    draws = [schedule(3, s) for s in range(n)]
    total = sum(weights.values())
    for modality, w in weights.items():
        p = w / total
        count = draws.count(modality)
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (modality, count, n * p)
    assert draws == [schedule(3, s) for s in range(n)], "deterministic in (seed, step)"
    assert draws != [schedule(4, s) for s in range(n)]
    assert schedule.modalities == tuple(m for m in mmf.MODALITIES if m in weights)


def test_modality_weights_and_schedules_refuse_what_they_cannot_mean(dataset, tmp_path):
    assert mmf.parse_modality_weights("landmark=2; skeleton = 0.5") == {"skeleton": 0.5, "landmark": 2.0}
    for bad, match in (("pose=1", "unknown modality 'pose'"), ("skeleton", "not modality=weight"),
                       ("skeleton=-1", ">= 0"), ("skeleton=0", "at least one"), ("skeleton=x", "not a number"),
                       ("skeleton=1, skeleton=2", "twice")):
        with pytest.raises(mmf.OptionError, match=match) as refused:
            mmf.parse_modality_weights(bad)
        assert refused.value.option == "modality_weights"
    with pytest.raises(mmf.OptionError, match="unknown") as refused:
        mmf.ModalitySchedule("sometimes")
    assert refused.value.option == "modality_schedule"
    # a pair folder without the schedule's condition images: named before training starts
    for name in ("a.png", "a_condition.png", "a_skeleton.png"):
        Image.new("RGB", (16, 16), 90).save(tmp_path / name)
    pairs = train_data.open_dataset(tmp_path, 16)
    with pytest.raises(mmf.OptionError, match="sample 'a' has no landmark image.*a_landmark.png") as refused:
        mmf.make_schedule("alternate", pairs)
    assert refused.value.option == "modality_schedule"
    for option, value in (("clone_face_probability", 0.5), ("face_loss_weight", 2)):
        with pytest.raises(mmf.OptionError, match=f"{option} {value:g} needs a MagicID dataset") as refused:
            mmf.open_training_source(tmp_path, 16, **{option: value})
        assert refused.value.option == option
    assert mmf.make_schedule("single", mmf.MagicIDSource(dataset, RES)).modalities == ("landmark",)


# ------------------------------------------------------------------------------------------------- the MagicID source


def test_a_magicid_folder_loads_each_modality_and_merged_is_the_merged_drawing(dataset):
    """At the photos' own size the crop is the identity: each loaded condition is the stored file, and merged is
    draw_merged_condition of the manifest's faces and pose, bit for bit."""
    opened = train_data.open_dataset(dataset, 512)
    assert isinstance(opened, mmf.MagicIDSource) and len(opened) == 6 and opened.crop == "random"
    assert not opened.fixed_images, "a random crop changes the picture from step to step: no latent cache"
    source = mmf.MagicIDSource(dataset, 512, crop="center")
    assert source.fixed_images
    index = [r.name for r in source.dataset.records].index("astronaut")
    record = source.dataset.records[index]

    def loaded(key):
        t = source.load(train_data.SampleRef(index, 0, 0, 0, key, 0))["condition"]
        return (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    for modality in ("skeleton", "landmark"):
        stored = np.asarray(Image.open(dataset / f"astronaut_{modality}.png").convert("RGB"))
        np.testing.assert_array_equal(loaded(modality), stored)
    np.testing.assert_array_equal(loaded("condition"), loaded("landmark"))
    merged = md.draw_merged_condition(record.faces, record.pose, 512, 512, md.read_info(dataset))
    np.testing.assert_array_equal(loaded("merged"), merged)
    assert not np.array_equal(merged, loaded("skeleton")) and not np.array_equal(merged, loaded("landmark"))
    with pytest.raises(ValueError, match="no 'depth' condition"):
        source.load(train_data.SampleRef(index, 0, 0, 0, "depth", 0))


def test_a_landmark_only_sample_trains_its_landmarks_on_skeleton_and_merged_steps(dataset, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(dataset, folder)
    lines = (folder / md.MANIFEST_FILE).read_text().splitlines()
    entry = json.loads(lines[0])
    entry["modalities"] = ["landmark"]
    del entry["files"]["skeleton"]
    (folder / f"{entry['name']}_skeleton.png").unlink()
    lines[0] = json.dumps(entry)
    (folder / md.MANIFEST_FILE).write_text("\n".join(lines) + "\n")
    source = mmf.MagicIDSource(folder, RES)
    assert f"1 landmark-only, trained with their landmark image on skeleton and merged steps: {entry['name']}" in \
        source.describe()
    landmark = source.load(train_data.SampleRef(0, 0, 0, 0, "landmark", 0))["condition"]
    for key in ("skeleton", "merged"):
        assert torch.equal(source.load(train_data.SampleRef(0, 0, 0, 0, key, 0))["condition"], landmark)
    other = source.load(train_data.SampleRef(1, 0, 0, 0, "skeleton", 0))["condition"]
    assert not torch.equal(other, source.load(train_data.SampleRef(1, 0, 0, 0, "landmark", 0))["condition"])


def test_random_crops_cut_picture_conditions_and_mask_alike_and_reach_every_face(dataset):
    """A wide group photo (832 x 512) at a 256 px square: the picture, its landmark condition and its face mask are
    cut at one place per (seed, step, slot) (each compared with PIL's resize of the stored file over the box written
    out here), the place changes from step to step, every face of the photo lies whole inside some step's square
    (a centre crop never holds the outermost ones), and a square photo is the same at every step."""
    size = 256
    source = mmf.MagicIDSource(dataset, size, face_loss_weight=1.0)
    names = [r.name for r in source.dataset.records]
    index = names.index("group_quartet")
    record = source.dataset.records[index]
    w, h = Image.open(dataset / "group_quartet.png").size
    assert (w, h) == (832, 512)

    def cut(file, mode, left):
        img = Image.open(dataset / file).convert(mode)
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, 0, left + h, h))
        return torch.from_numpy(np.asarray(out, np.float32) / 255)

    lefts = []
    for step in range(24):
        ref = train_data.SampleRef(index, step, step, 0, "landmark", 5)
        out = source.load(ref)
        left = (w - h) * train_data.derive_seed(5, "crop_x", step, 0) / 2**63
        lefts.append(left)
        assert torch.equal(out["image"], cut("group_quartet.png", "RGB", left).permute(2, 0, 1))
        assert torch.equal(out["condition"], cut("group_quartet_landmark.png", "RGB", left).permute(2, 0, 1))
        m = cut("group_quartet_facemask.png", "L", left)
        expected_weight = (1 + m) / (1 + m).mean()
        torch.testing.assert_close(out["loss_weight"][0], expected_weight, rtol=0,
                                   atol=tol.float_tol(torch.float32, 2 * size * size, float(expected_weight.max())))
    assert len({round(v, 3) for v in lefts}) == len(lefts), "a new place every step"
    boxes = [f.bbox for f in record.faces]
    assert len(boxes) == 4
    for x0, _, x1, _ in boxes:
        assert any(left <= x0 and x1 <= left + h for left in lefts), (x0, x1)
    centre = (w - h) / 2
    assert not all(centre <= b[0] and b[2] <= centre + h for b in boxes), "the centre square misses a face"
    square = names.index("astronaut")
    first = source.load(train_data.SampleRef(square, 0, 0, 0, "landmark", 5))["image"]
    assert all(torch.equal(first, source.load(train_data.SampleRef(square, s, s, 0, "landmark", 5))["image"])
               for s in range(1, 4))
    with pytest.raises(mmf.OptionError, match="crop 'left' is unknown") as refused:
        mmf.MagicIDSource(dataset, size, crop="left")
    assert refused.value.option == "magicid_crop"


def eval_loss(net, weights, source, keys=("skeleton", "landmark")) -> float:
    """Epsilon MSE of the merged toy net + adapter over every sample and modality, at fixed sigma and noise."""
    merged = merged_state(weights, net.state_dict())
    adapter = weights.build_adapter()
    gen = torch.Generator().manual_seed(99)
    total = []
    for key in keys:
        batch = train_data.collate([source.load(train_data.SampleRef(i, i, 0, 0, key, 0)) for i in range(len(source))])
        x0 = encode(batch, 0)["latent"]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.full((x0.shape[0],), 0.8)
        with torch.no_grad():
            d = toy_forward(net)(merged, x0 + 0.8 * noise, sigma, None, adapter(batch["condition"], x0.shape[-2:]))
        total.append(float((((x0 + 0.8 * noise) - d) / 0.8 - noise).pow(2).mean()))
    return sum(total) / len(total)


def test_mmf_training_on_the_shipped_set_lowers_the_loss_for_both_modalities(dataset):
    net, source = ToyUNet(), mmf.MagicIDSource(dataset, RES)
    schedule = mmf.make_schedule("alternate", source)
    start = init_weights_from_base(net.state_dict(), LAYERS, adapter_config=ADAPTER, seed=7)
    result = train(net, source, steps=40, lr=2e-2, batch_size=3, condition_choice=schedule)
    for key in ("skeleton", "landmark"):
        before, after = eval_loss(net, start, source, (key,)), eval_loss(net, result.weights, source, (key,))
        assert after < 0.8 * before, (key, before, after)


# --------------------------------------------------------------------------------------------- Clone Face Tuning


def test_cloned_samples_have_their_conditions_drawn_at_the_pasted_position(dataset):
    """Through the source (the loop's path): for the slots the seed picks, the loaded landmark condition has an
    OpenPose face point at every landmark of the face moved by the clone plan the seed gives (where the photo's own
    condition is black), the skeleton the head joints' colours at the moved nose/eyes/ears; slots not picked load
    the stored sample."""
    source = mmf.MagicIDSource(dataset, 512, clone_face_probability=0.5)
    index = [r.name for r in source.dataset.records].index("astronaut")
    plain = source.dataset[index]
    picked = 0
    for step in range(8):
        ref = train_data.SampleRef(index, step, step, 1, "landmark", 11)
        landmark = (source.load(ref)["condition"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        if not source.clones(ref):
            np.testing.assert_array_equal(landmark, plain.condition("landmark"))
            continue
        picked += 1
        plan = cf.plan_face_clone(plain, train_data.derive_seed(11, "clone_face_plan", step, 1))
        face = plain.faces[plan.face_index]
        points = plan.map_points(np.concatenate([face.landmarks68, fd.pupils_from_68(face.landmarks68)]))
        for x, y in points:
            assert tuple(landmark[int(y), int(x)]) == fd.FACE_POINT_COLOR
            assert tuple(plain.condition("landmark")[int(y), int(x)]) == (0, 0, 0)
        skeleton_ref = train_data.SampleRef(index, step, step, 1, "skeleton", 11)
        skeleton = (source.load(skeleton_ref)["condition"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        head = plain.body_keypoints[plan.person]
        for joint in cf.HEAD_POINTS:
            if head[joint, 2] > 0:
                x, y = plan.map_points(head[joint, :2])
                assert tuple(skeleton[int(y), int(x)]) == fd.BODY_COLORS[joint]
    assert 2 <= picked <= 6, picked
    assert not mmf.MagicIDSource(dataset, 512).clones(train_data.SampleRef(index, 0, 0, 1, "landmark", 11))


def test_the_face_weighted_loss_is_the_formula(dataset):
    """Step 1's logged loss against the objective written out in plain torch: the face mask file cut at slot k's random
    square (the place from derive_seed(seed, "crop_x"/"crop_y", 0, k) / 2**63, written out with PIL's resize box) and
    resized as the image, w = (1 + lam m) / mean(1 + lam m) per sample, area-averaged to the latent, loss = sum(w e) / sum(w)
    over the batch; with the noise and sigma of slot k from generator(seed, "noise", 0, k)."""
    lam = 3.0
    net = ToyUNet()
    source = mmf.MagicIDSource(dataset, RES, face_loss_weight=lam)
    result = train(net, source, steps=1, batch_size=2, grad_accumulation=2, shuffle=False,
                   condition_choice=lambda seed, step: "landmark")
    names = [r.name for r in source.dataset.records][:4]
    terms, weights = [], []
    for k, name in enumerate(names):
        cx, cy = (train_data.derive_seed(7, label, 0, k) / 2**63 for label in ("crop_x", "crop_y"))

        def fit(path, mode, cx=cx, cy=cy):
            img = Image.open(path).convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) * cx, (h - side) * cy
            return img.resize((RES, RES), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        image = torch.from_numpy(np.asarray(fit(dataset / f"{name}.png", "RGB"), np.float32) / 255).permute(2, 0, 1)
        cond = torch.from_numpy(np.asarray(fit(dataset / f"{name}_landmark.png", "RGB"), np.float32) / 255)
        m = torch.from_numpy(np.asarray(fit(dataset / f"{name}_facemask.png", "L"), np.float32) / 255)
        w = (1 + lam * m) / (1 + lam * m).mean()
        w = w.reshape(RES // 8, 8, RES // 8, 8).mean(dim=(1, 3))
        x0 = F.conv2d(F.avg_pool2d(image[None] * 2 - 1, 8), MIX)[0]
        g = train_data.generator(7, "noise", 0, k)
        sigma = SIGMAS[int(torch.randint(SIGMAS.numel(), (1,), generator=g))]
        noise = torch.randn(x0.shape, generator=g)
        x = x0 + sigma * noise
        with torch.no_grad():
            eps = (x[None] - net(x[None], sigma.view(1), torch.zeros(1, CH, RES // 8, RES // 8))) / sigma
        assert cond.max() > 0
        terms.append((w * (eps[0] - noise) ** 2).sum())
        weights.append(w.expand(LAT, -1, -1).sum())
    expected = float(sum(terms) / sum(weights))
    assert abs(result.losses[0] - expected) <= tol.float_tol(torch.float32, tol.reduction_ops(net) + 4 * LAT * 64,
                                                             expected)
    plain = train(net, mmf.MagicIDSource(dataset, RES), steps=1, batch_size=4, shuffle=False,
                  condition_choice=lambda seed, step: "landmark")
    assert abs(plain.losses[0] - expected) > 1e-3 * expected, "the face weights change the loss"


def test_resume_is_bit_identical_with_a_random_schedule_clone_faces_and_face_weights(dataset, tmp_path):
    net = ToyUNet()

    def run(folder, steps, resume=False):
        source = Recording(dataset, RES, clone_face_probability=0.5, face_loss_weight=2.0)
        schedule = mmf.make_schedule("random", source, "skeleton=1, landmark=1, merged=1")
        result = train(net, source, steps=steps, batch_size=2, condition_choice=schedule, checkpoint_dir=folder,
                       checkpoint_every=3, log_extra=mmf.ModalityLog(schedule, 7),
                       resume_from=folder if resume else None)
        return result, source

    full, seen = run(tmp_path / "a", 8)
    assert any("_clone" in name for *_, name in seen.asked), "some samples were cloned"
    assert len({k for _, _, k, _ in seen.asked}) == 3
    run(tmp_path / "b", 3)
    resumed, _ = run(tmp_path / "b", 8, resume=True)
    assert resumed.resumed_from is not None and resumed.losses == full.losses
    for k in full.weights.modal:
        assert torch.equal(full.weights.modal[k], resumed.weights.modal[k]), k
    for k in full.weights.adapter_state:
        assert torch.equal(full.weights.adapter_state[k], resumed.weights.adapter_state[k]), k
    assert read_log(tmp_path / "a") == read_log(tmp_path / "b"), "running losses included"


def test_how_the_batch_is_split_does_not_change_which_samples_modalities_and_clones_a_step_sees(dataset):
    """Decisions are keyed by (seed, step, slot): one micro-batch of 4, 2 of 2 or 4 of 1 (what 1, 2 or 4 GPUs with the
    same global batch read) ask for the same samples with the same modality and the same clones."""
    seen = []
    for batch in (4, 2, 1):
        source = Recording(dataset, RES, clone_face_probability=0.5)
        schedule = mmf.make_schedule("random", source, "skeleton=1, landmark=1, merged=1")
        train(ToyUNet(), source, steps=3, batch_size=batch, grad_accumulation=4 // batch, condition_choice=schedule)
        seen.append(sorted(source.asked))
    assert seen[0] == seen[1] == seen[2]
    assert any("_clone" in name for *_, name in seen[0]) and len(seen[0]) == 12


def test_the_command_line_offers_the_choices_the_core_knows():
    """train_cli keeps its own copies (its --help imports no torch): they must stay the core's."""
    from magic_core import repcontrolnet_train
    from magic_portrait import train_cli

    assert train_cli.SCHEDULES == mmf.SCHEDULES and train_cli.CROPS == mmf.CROPS
    assert train_cli.MIXED_PRECISION == repcontrolnet_train.MIXED_PRECISION
    assert train_cli.OPTIMIZERS == repcontrolnet_train.OPTIMIZERS
