"""Core tier: the MagicID dataset builder, its layout and reader (magic_core.magicid_build / magicid_dataset), on the
photo set the pack ships (real photos: the astronaut, LFW faces in composed group pictures) with the offline dlib
face back-end. No ComfyUI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from magic_core import face_backends as fb
from magic_core import face_draw as fd
from magic_core import magicid_build as mb
from magic_core import magicid_dataset as md

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "example_workflows" / "magic_portrait_magicid_photos"
SHIPPED = ("astronaut", "reference_2", "group_layout", "group_trio", "group_duo", "group_quartet")
FACE_COUNTS = {"astronaut": 1, "reference_2": 1, "group_layout": 2, "group_trio": 3, "group_duo": 2,
               "group_quartet": 4}


class CountingAnalyzer(fb.DlibAnalyzer):
    """The dlib back-end, recording each picture it searches (to see which photos a run processed): a search may run
    several passes over one picture, so a picture counts once however many passes see it."""

    def __init__(self):
        super().__init__("hog")
        self.analysed: list[tuple[int, int]] = []
        self._last = None

    def detect(self, rgb, scale, score_threshold):
        if rgb is not self._last:
            self.analysed.append(tuple(rgb.shape[:2]))
            self._last = rgb
        return super().detect(rgb, scale, score_threshold)


@pytest.fixture(scope="module")
def analyzer():
    return fb.DlibAnalyzer("hog")


def copy_photos(target: Path, names=SHIPPED) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in PHOTOS.iterdir():
        if path.stem in names and path.suffix != ".txt":
            shutil.copy2(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory, analyzer):
    """The shipped photo set built once with the default settings: (dataset folder, report)."""
    root = tmp_path_factory.mktemp("magicid_built")
    report = mb.build_dataset(mb.folder_photos(PHOTOS), root / "dataset", analyzer, md.BuildSettings())
    return root / "dataset", report


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------- the shipped set


def test_shipped_photo_set_builds_into_six_two_modality_samples(built):
    folder, report = built
    assert sorted(report.added) == sorted(SHIPPED) and not report.skipped and not report.kept
    dataset = md.MagicIDDataset(folder)
    assert len(dataset) == 6 and report.total == 6 and report.modality_counts == {"skeleton": 6, "landmark": 6}
    for sample in dataset:
        assert len(sample.faces) == FACE_COUNTS[sample.name], sample.name
        assert sample.modalities == ("skeleton", "landmark")
        assert sample.image.shape[:2] == sample.condition("skeleton").shape[:2] == sample.face_mask.shape
        assert sample.record.source.startswith(sample.name + ".")
    names = {p.name for p in folder.iterdir()}
    for stem in SHIPPED:
        assert {f"{stem}.png", f"{stem}_landmark.png", f"{stem}_skeleton.png", f"{stem}_facemask.png"} <= names
    assert {"dataset.json", "manifest.jsonl"} <= names


def test_landmark_conditions_land_inside_the_detected_boxes(built):
    """Every drawn landmark pixel lies in a detected face box, and every box has its landmarks drawn, for the OpenPose
    points (default) and the contour style. dlib's HOG box frames the inner face and its 68 points reach the chin and
    jaw past it, so boxes are grown by FACE_MATCH_MARGIN (20% of their size, the margin Draw Face Condition uses to
    match a face to a skeleton's head) plus the drawing's own reach; each face's landmark centroid is in its box."""
    folder, _ = built
    for sample in md.MagicIDDataset(folder):
        drawn = sample.condition("landmark").max(axis=2) > 0
        contours = md.draw_landmark_condition(sample.faces, sample.height, sample.width,
                                              md.BuildSettings(landmark_style="landmark_contours")).max(axis=2) > 0
        inside = np.zeros_like(drawn)
        reach = fd.FACE_POINT_RADIUS + 1
        for face in sample.faces:
            x1, y1, x2, y2 = face.bbox
            cx, cy = face.landmarks68.mean(axis=0)
            assert x1 <= cx <= x2 and y1 <= cy <= y2, sample.name
            mx, my = fd.FACE_MATCH_MARGIN * (x2 - x1) + reach, fd.FACE_MATCH_MARGIN * (y2 - y1) + reach
            box = (slice(max(0, int(y1 - my)), int(np.ceil(y2 + my))), slice(max(0, int(x1 - mx)), int(np.ceil(x2 + mx))))
            assert drawn[box].sum() > 68 * 9 and contours[box].sum() > 68 * 2, (sample.name, "a face without landmarks")
            inside[box] = True
        assert not (drawn & ~inside).any() and not (contours & ~inside).any(), sample.name


def _joint_colours_at(skeleton: np.ndarray, people: list[np.ndarray], scale: float = 1.0):
    """(found, expected) colours at every visible joint of `people` ([18, 3] in the JSON's pixels) in `skeleton`."""
    found, expected = [], []
    for body in people:
        for joint, (x, y, c) in enumerate(body):
            if c > 0:
                found.append(tuple(int(v) for v in skeleton[int(y * scale), int(x * scale)]))
                expected.append(fd.BODY_COLORS[joint])
    return found, expected


def _json_people(name: str) -> list[np.ndarray]:
    frame = json.loads((PHOTOS / f"{name}.json").read_text())
    return [np.asarray(p["pose_keypoints_2d"], np.float64).reshape(18, 3) for p in frame["people"]]


def test_skeleton_is_drawn_from_the_json_at_the_keypoints_given(built):
    """At each visible keypoint of the JSON beside the photo the skeleton has that joint's OpenPose colour, and every
    drawn pixel lies near a limb or joint of the JSON's people (nothing drawn elsewhere)."""
    folder, _ = built
    dataset = md.MagicIDDataset(folder)
    for sample in dataset:
        skeleton = sample.condition("skeleton")
        people = _json_people(sample.name)
        found, expected = _joint_colours_at(skeleton, people)
        # a joint may be covered by a later person's limb (arms overlap in the quartet): at least 90% show their colour
        hits = sum(f == e for f, e in zip(found, expected, strict=True))
        assert hits >= 0.9 * len(expected) and len(expected) >= 5 * len(people), (sample.name, hits, len(expected))
        lines = np.zeros(skeleton.shape[:2], np.uint8)
        for body in people:
            for a, b in fd.BODY_LIMBS:
                if body[a, 2] > 0 and body[b, 2] > 0:
                    cv2.line(lines, (int(body[a, 0]), int(body[a, 1])), (int(body[b, 0]), int(body[b, 1])), 255, 1)
            for x, y, c in body:
                if c > 0:
                    lines[int(y), int(x)] = 255
        distance = cv2.distanceTransform(255 - lines, cv2.DIST_L2, 5)
        drawn = skeleton.max(axis=2) > 0
        reach = max(fd.BODY_STICK_WIDTH, fd.BODY_RADIUS) + 2
        assert drawn.sum() > 100 and distance[drawn].max() <= reach, sample.name


def test_skeleton_follows_the_photo_when_it_is_scaled_down(tmp_path, analyzer):
    """max_side scales the photo and its keypoints together: the quartet (832 px) at max_side 416 is half size."""
    photos = copy_photos(tmp_path / "photos", ("group_quartet",))
    report = mb.build_dataset(mb.folder_photos(photos), tmp_path / "ds", analyzer, md.BuildSettings(max_side=416))
    (sample,) = md.MagicIDDataset(tmp_path / "ds")
    assert report.added == ["group_quartet"] and sample.image.shape[:2] == (256, 416)
    assert (sample.record.source_width, sample.record.source_height) == (832, 512)
    found, expected = _joint_colours_at(sample.condition("skeleton"), _json_people("group_quartet"), scale=0.5)
    assert sum(f == e for f, e in zip(found, expected, strict=True)) >= 0.85 * len(expected)
    for body, stored in zip(_json_people("group_quartet"), sample.body_keypoints, strict=True):
        visible = body[:, 2] > 0
        np.testing.assert_allclose(stored[visible, :2], body[visible, :2] * 0.5, rtol=0, atol=1e-9)


def test_every_openpose_json_form_gives_the_same_skeleton(tmp_path, analyzer):
    """The trio's skeleton written as a one-frame list (Save Pose Keypoints), as OpenPose's own NAME_keypoints.json
    (no canvas: the photo's pixels), with BODY_25 bodies, and normalised to the canvas: the same sample."""
    frame = json.loads((PHOTOS / "group_trio.json").read_text())
    w, h = frame["canvas_width"], frame["canvas_height"]

    def body25(body18):
        b = np.asarray(body18, np.float64).reshape(18, 3)
        out = np.zeros((25, 3))
        out[list(fd.BODY25_TO_COCO18)] = b
        out[8] = (b[8] + b[11]) / 2 * (b[8, 2] > 0) * (b[11, 2] > 0)  # mid hip, which COCO 18 does not have
        return out.reshape(-1).tolist()

    def normalised(body18):
        b = np.asarray(body18, np.float64).reshape(18, 3).copy()
        b[:, 0] /= w
        b[:, 1] /= h
        b[b[:, 2] == 0, :2] = 0
        return b.reshape(-1).tolist()

    people = frame["people"]
    forms = {
        "group_trio.json": frame,
        "as_list.json": [frame],
        "openpose_keypoints.json": {"version": 1.3, "people": [{**p, "pose_keypoints_2d": body25(p["pose_keypoints_2d"])}
                                                               for p in people]},
        "normalised.json": {**frame, "people": [{**p, "pose_keypoints_2d": normalised(p["pose_keypoints_2d"])}
                                                for p in people]},
    }
    skeletons = {}
    for file_name, content in forms.items():
        photos = tmp_path / file_name.replace(".json", "")
        photos.mkdir()
        shutil.copy2(PHOTOS / "group_trio.png", photos / "group_trio.png")
        target = "group_trio_keypoints.json" if file_name == "openpose_keypoints.json" else "group_trio.json"
        (photos / target).write_text(json.dumps(content))
        mb.build_dataset(mb.folder_photos(photos), photos / "ds", analyzer, md.BuildSettings())
        (sample,) = md.MagicIDDataset(photos / "ds")
        skeletons[file_name] = sample.condition("skeleton")
    reference = skeletons.pop("group_trio.json")
    for file_name, skeleton in skeletons.items():
        # normalised coordinates are rounded differently by a hair: at most a few pixels along stick edges
        assert (skeleton != reference).any(axis=2).mean() < 1e-3, file_name


# ------------------------------------------------------------------------------------------------------ the manifest


def test_manifest_round_trips_and_redraws_the_stored_images_exactly(built):
    folder, _ = built
    dataset = md.MagicIDDataset(folder)
    assert dataset.settings == md.read_info(folder) == md.BuildSettings()
    lines = (folder / md.MANIFEST_FILE).read_text().splitlines()
    assert len(lines) == len(dataset)
    for line, sample in zip(lines, dataset, strict=True):
        record = md.SampleRecord.from_json(json.loads(line))
        assert record.to_line() == line  # JSON -> record -> JSON is the identity
        assert record.name == sample.name and record.modalities == sample.modalities
        assert record.files == {"image": f"{record.name}.png", "landmark": f"{record.name}_landmark.png",
                                "skeleton": f"{record.name}_skeleton.png", "facemask": f"{record.name}_facemask.png"}
        assert len(record.source_sha256) == 64 and len(record.skeleton_sha256) == 64
        np.testing.assert_array_equal(record.boxes, sample.boxes)
        for a, b in zip(record.faces, sample.faces, strict=True):
            for field in ("bbox", "kps", "landmarks68"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        # the manifest alone redraws every stored image, bit for bit
        h, w = sample.height, sample.width
        np.testing.assert_array_equal(md.draw_landmark_condition(record.faces, h, w, dataset.settings),
                                      sample.condition("landmark"))
        np.testing.assert_array_equal(md.draw_skeleton_condition(record.pose, h, w, dataset.settings),
                                      sample.condition("skeleton"))
        np.testing.assert_array_equal(md.mask_to_uint8(md.draw_face_mask(record.faces, h, w, dataset.settings)),
                                      md.read_grey(folder / record.files["facemask"]))
        # the source hash is the photo file's
        import hashlib

        assert record.source_sha256 == hashlib.sha256((PHOTOS / record.source).read_bytes()).hexdigest()


def test_reader_pairs_and_the_merged_modality(built):
    folder, _ = built
    dataset = md.MagicIDDataset(folder)
    for modality in md.MODALITIES:
        pairs = dataset.pairs(modality)
        assert len(pairs) == 6 and all(c.name == f"{i.stem}_{modality}.png" for i, c in pairs)
        triples = dataset.pairs(modality, with_face_mask=True)
        assert [t[:2] for t in triples] == pairs and all(t[2].name == f"{t[0].stem}_facemask.png" for t in triples)
    with pytest.raises(ValueError, match="merged condition has no file"):
        dataset.pairs("merged")
    merged = list(dataset.condition_pairs("merged"))
    assert len(merged) == 6
    sample = dataset[SHIPPED.index("group_trio")]
    image, condition = merged[SHIPPED.index("group_trio")]
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(condition, fd.draw_magicid_condition(sample.faces, sample.pose, sample.height,
                                                                       sample.width, face_style="openpose"))
    # merged = the skeleton's body and the landmarks' face points where both are drawn
    landmark, skeleton = sample.condition("landmark"), sample.condition("skeleton")
    face_points = landmark.max(axis=2) > 0
    np.testing.assert_array_equal(condition[face_points], landmark[face_points])
    body = (skeleton.max(axis=2) > 0) & ~cv2.dilate(face_points.astype(np.uint8), np.ones((3, 3))).astype(bool)
    assert (condition[body] == skeleton[body]).all(axis=1).mean() > 0.99
    with pytest.raises(ValueError):
        sample.image[0, 0, 0] = 1  # read-only arrays: a sample is never changed by its user


# ------------------------------------------------------------------------------------------------- incremental runs


def test_a_grown_folder_processes_only_the_new_photos(tmp_path):
    photos = copy_photos(tmp_path / "photos", ("astronaut", "group_trio", "group_duo"))
    folder = tmp_path / "ds"
    first = CountingAnalyzer()
    report = mb.build_dataset(mb.folder_photos(photos), folder, first, md.BuildSettings())
    assert sorted(report.added) == ["astronaut", "group_duo", "group_trio"] and len(first.analysed) >= 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    copy_photos(photos, ("group_quartet", "reference_2"))
    again = CountingAnalyzer()
    report = mb.build_dataset(mb.folder_photos(photos), folder, again, md.BuildSettings())
    assert sorted(report.added) == ["group_quartet", "reference_2"] and not report.replaced and not report.skipped
    assert sorted(report.kept) == ["astronaut", "group_duo", "group_trio"]
    assert sorted(again.analysed) == sorted([(512, 832), (320, 320)])  # only the two new photos were analysed
    for name, (mtime, data) in before.items():
        if name != md.MANIFEST_FILE:
            assert (folder / name).stat().st_mtime_ns == mtime and (folder / name).read_bytes() == data, name
    manifest = (folder / md.MANIFEST_FILE).read_bytes()
    assert manifest.startswith(before[md.MANIFEST_FILE][1])  # appended to, never rewritten
    assert [r.name for r in md.MagicIDDataset(folder).records] == ["astronaut", "group_duo", "group_trio",
                                                                  "group_quartet", "reference_2"]
    # nothing new: nothing analysed, nothing written
    third = CountingAnalyzer()
    report = mb.build_dataset(mb.folder_photos(photos), folder, third, md.BuildSettings())
    assert not report.added and len(report.kept) == 5 and third.analysed == []
    assert (folder / md.MANIFEST_FILE).read_bytes() == manifest


def test_a_changed_photo_or_skeleton_replaces_its_sample(tmp_path, analyzer):
    photos = copy_photos(tmp_path / "photos", ("group_trio", "group_duo"))
    folder = tmp_path / "ds"
    mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    frame = json.loads((photos / "group_duo.json").read_text())
    frame["people"] = frame["people"][:1]  # the far person's skeleton removed
    (photos / "group_duo.json").write_text(json.dumps(frame))
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    assert report.replaced == ["group_duo"] and report.kept == ["group_trio"] and not report.added
    dataset = md.MagicIDDataset(folder)
    assert [r.name for r in dataset.records] == ["group_trio", "group_duo"]
    assert len(dataset[1].body_keypoints) == 1
    grey = cv2.cvtColor(cv2.cvtColor(cv2.imread(str(photos / "group_trio.png")), cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(photos / "group_trio.png"), grey)
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    assert report.replaced == ["group_trio"]
    sample = md.MagicIDDataset(folder)[1]
    assert sample.name == "group_trio" and (sample.image[..., 0] == sample.image[..., 2]).all()


# --------------------------------------------------------------------------------------------------------- bad input


def _bad_photos(folder: Path) -> dict[str, str]:
    """One good photo and one of each bad input; returns {source: expected kind}."""
    copy_photos(folder, ("group_duo",))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    flat = np.full((240, 320, 3), 128, np.uint8)
    cv2.imwrite(str(folder / "no_face.png"), flat)
    (folder / "no_face.json").write_text((PHOTOS / "group_duo.json").read_text())
    shutil.copy2(PHOTOS / "reference_2.png", folder / "no_skeleton.png")
    shutil.copy2(PHOTOS / "group_trio.png", folder / "bad_json.png")
    (folder / "bad_json.json").write_text('{"people": [ {"pose_keypoints_2d": [1, 2')
    shutil.copy2(PHOTOS / "astronaut.jpg", folder / "nobody.jpg")
    (folder / "nobody.json").write_text(json.dumps({"people": [], "canvas_width": 512, "canvas_height": 512}))
    return {"broken.png": mb.UNREADABLE, "no_face.png": mb.NO_FACE, "no_skeleton.png": mb.NO_SKELETON,
            "bad_json.json": mb.BAD_SKELETON, "nobody.json": mb.NO_SKELETON}


def test_each_bad_input_is_named_and_skipped(tmp_path, analyzer):
    photos = tmp_path / "photos"
    expected = _bad_photos(photos)
    folder = tmp_path / "ds"
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    assert report.added == ["group_duo"]
    skipped = dict(report.skipped)
    assert set(skipped) == set(expected), report.text()
    for source, kind in expected.items():
        assert skipped[source].startswith(kind), (source, skipped[source])
        assert f"skipped {source}: {kind}" in report.text()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["dataset.json", "manifest.jsonl", "group_duo.png", "group_duo_landmark.png", "group_duo_skeleton.png",
         "group_duo_facemask.png"])
    assert [r.name for r in md.MagicIDDataset(folder).records] == ["group_duo"]


@pytest.mark.parametrize("source", ["broken.png", "no_face.png", "no_skeleton.png", "bad_json.json", "nobody.json"])
def test_each_bad_input_is_an_error_by_option_and_leaves_no_partial_sample(tmp_path, analyzer, source):
    photos = tmp_path / "photos"
    expected = _bad_photos(photos)
    skeleton_problem = expected[source] in (mb.NO_SKELETON, mb.BAD_SKELETON)
    for path in list(photos.iterdir()):  # only the bad photo under test (and its JSON) stay, plus the good one
        stem = Path(source).stem
        if path.stem not in (stem, "group_duo"):
            path.unlink()
    folder = tmp_path / "ds"
    options = {"missing_skeleton": mb.ERROR} if skeleton_problem else {"bad_input": mb.ERROR}
    with pytest.raises(mb.BadInput) as caught:
        mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings(), **options)
    assert caught.value.kind == expected[source] and caught.value.source == source
    assert source in str(caught.value)
    # the good photo (sorted first or not) is complete or absent, never partial; the bad one left nothing
    records = {r.name: r for r in md.MagicIDDataset(folder).records}
    listed = {name for r in records.values() for name in r.files.values()}
    on_disk = {p.name for p in folder.iterdir()} - {"dataset.json", "manifest.jsonl"}
    assert on_disk == listed and not any(Path(source).stem in name for name in on_disk)
    # the other choice skips it
    other = {"missing_skeleton": mb.SKIP} if skeleton_problem else {"bad_input": mb.SKIP}
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings(), **other)
    assert [s for s, _ in report.skipped] == [source]


def test_missing_skeletons_can_be_kept_as_landmark_only_samples(tmp_path, analyzer):
    photos = tmp_path / "photos"
    _bad_photos(photos)
    folder = tmp_path / "ds"
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings(),
                              missing_skeleton=mb.KEEP_LANDMARK_ONLY)
    assert sorted(report.added) == ["bad_json", "group_duo", "no_skeleton", "nobody"]
    assert sorted(dict(report.skipped)) == ["broken.png", "no_face.png"]
    assert len(report.landmark_only) == 3 and report.modality_counts == {"skeleton": 1, "landmark": 4}
    dataset = md.MagicIDDataset(folder)
    only = [r for r in dataset.records if r.modalities == ("landmark",)]
    assert sorted(r.name for r in only) == ["bad_json", "no_skeleton", "nobody"]
    assert all("skeleton" not in r.files and r.pose is None for r in only)
    assert [p[0].stem for p in dataset.pairs("skeleton")] == ["group_duo"]
    assert len(list(dataset.condition_pairs("merged"))) == 1
    # fixing the JSON later replaces the landmark-only sample with a full one
    shutil.copy2(PHOTOS / "group_trio.json", photos / "bad_json.json")
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings(),
                              missing_skeleton=mb.KEEP_LANDMARK_ONLY)
    assert report.replaced == ["bad_json"]
    assert md.MagicIDDataset(folder).records[-1].modalities == ("skeleton", "landmark")


def test_an_interrupted_run_leaves_no_sample_and_the_next_run_completes_it(tmp_path, analyzer, monkeypatch):
    photos = copy_photos(tmp_path / "photos", ("group_trio", "group_duo"))
    folder = tmp_path / "ds"
    written = []
    real = mb.write_bytes_atomic

    def crash_on_the_third_file(path, data):
        written.append(path.name)
        if len(written) == 7:  # the second sample's third file (the first sample wrote four)
            raise KeyboardInterrupt("stopped")
        real(path, data)

    monkeypatch.setattr(mb, "write_bytes_atomic", crash_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    monkeypatch.undo()
    dataset = md.MagicIDDataset(folder)
    assert [r.name for r in dataset.records] == ["group_duo"]  # the half-written trio has no manifest line
    assert not [p for p in folder.iterdir() if mb.TEMP_MARK in p.name]
    # a manifest line cut off mid-write is not a sample either
    with open(folder / md.MANIFEST_FILE, "a") as f:
        f.write('{"name": "group_trio", "files": {"ima')
    dataset = md.MagicIDDataset(folder)
    assert dataset.cut_line and [r.name for r in dataset.records] == ["group_duo"]
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    assert report.added == ["group_trio"] and report.kept == ["group_duo"]
    assert any("cut off" in note for note in report.notes)
    assert [r.name for r in md.MagicIDDataset(folder).records] == ["group_duo", "group_trio"]
    assert (folder / md.MANIFEST_FILE).read_text().endswith("}\n")


def test_other_settings_need_a_rebuild_and_a_foreign_folder_is_refused(tmp_path, analyzer):
    photos = copy_photos(tmp_path / "photos", ("group_duo",))
    folder = tmp_path / "ds"
    mb.build_dataset(mb.folder_photos(photos), folder, analyzer, md.BuildSettings())
    contours = md.BuildSettings(landmark_style="landmark_contours")
    with pytest.raises(md.DatasetError, match=r"other settings \(landmark_style: 'openpose_face' -> "
                                              r"'landmark_contours'\).*rebuild"):
        mb.build_dataset(mb.folder_photos(photos), folder, analyzer, contours)
    report = mb.build_dataset(mb.folder_photos(photos), folder, analyzer, contours, rebuild=True)
    assert report.added == ["group_duo"] and md.MagicIDDataset(folder).settings == contours
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"x")
    with pytest.raises(md.DatasetError, match="not empty and holds no MagicID dataset"):
        mb.build_dataset(mb.folder_photos(photos), foreign, analyzer, md.BuildSettings())
    assert [p.name for p in foreign.iterdir()] == ["holiday.png"]


def test_images_in_memory_with_pose_frames_make_the_same_samples(tmp_path, analyzer, built):
    """The IMAGE-list route (ComfyUI's dataset nodes) with one POSE_KEYPOINT frame per image gives the samples the
    folder route gives for the same PNG photos, named by the pixels' hash; the same picture again is kept."""
    folder, _ = built
    names = ("group_trio", "group_duo")
    images = [cv2.cvtColor(cv2.imread(str(PHOTOS / f"{n}.png")), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
              for n in names]
    frames = [[json.loads((PHOTOS / f"{n}.json").read_text())] for n in names]  # DWPose: a list per image
    report = mb.build_dataset(mb.image_photos(images, frames), tmp_path / "ds", analyzer, md.BuildSettings())
    assert len(report.added) == 2 and all(n.startswith("image_") and len(n) == 18 for n in report.added)
    from_folder = {s.name: s for s in md.MagicIDDataset(folder)}
    for name, sample in zip(names, md.MagicIDDataset(tmp_path / "ds"), strict=True):
        for modality in md.MODALITIES:
            np.testing.assert_array_equal(sample.condition(modality), from_folder[name].condition(modality))
        np.testing.assert_array_equal(sample.image, from_folder[name].image)
    again = mb.build_dataset(mb.image_photos(images[::-1], frames[::-1]), tmp_path / "ds", analyzer,
                             md.BuildSettings())
    assert not again.added and len(again.kept) == 2
    with pytest.raises(ValueError, match="1 POSE_KEYPOINT frame"):
        mb.image_photos(images, frames[:1])


def test_photos_are_read_upright_as_comfyui_loads_them(tmp_path, analyzer):
    """A JPEG whose EXIF says 'rotate 90 degrees' (as phones save portraits) is built upright, as ComfyUI's LoadImage
    (PIL's exif_transpose) shows it: the astronaut lying on her side in the file stands in the sample."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    upright = cv2.cvtColor(cv2.imread(str(PHOTOS / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    lying = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # stored turned left
    exif = lying.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    lying.save(photos / "phone.jpg", quality=95, exif=exif.tobytes())
    shutil.copy2(PHOTOS / "astronaut.json", photos / "phone.json")
    report = mb.build_dataset(mb.folder_photos(photos), tmp_path / "ds", analyzer, md.BuildSettings())
    (sample,) = md.MagicIDDataset(tmp_path / "ds")
    assert report.added == ["phone"] and sample.image.shape == upright.shape and len(sample.faces) == 1
    assert np.abs(sample.image.astype(int) - upright).mean() < 3  # JPEG re-encoding only
