"""ComfyUI tier: every example workflow converts from UI format and passes ComfyUI's own prompt validation,
and the inversion example runs end to end through the headless runner on a tiny checkpoint."""

import asyncio
import json
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parent.parent
# ComfyUI's own socket and widget types (LOSS_MAP is its training nodes' loss type, which LossGraphNode plots), and
# POSE_KEYPOINT, the OpenPose JSON type the common preprocessor packs (comfyui_controlnet_aux) output
CORE_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "SIGMAS", "SAMPLER", "LOSS_MAP",
              "CONTROL_NET", "CLIP_VISION", "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "POSE_KEYPOINT"}
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph's title bar, drawn above a node's pos


@pytest.fixture(scope="module")
def models_dir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    """A models folder holding a tiny checkpoint under each name the examples use, and the runner's tiny stand-ins
    for every other model file they name (RepControlNet, ControlNet, CLIP vision, IP-Adapter)."""
    import nodes
    from magic_portrait import comfy_env, model_files
    from magic_portrait.workflow import ui_to_api

    root = tmp_path_factory.mktemp("models")
    comfy_env.boot(models_dir=root)
    wanted = {}  # every model file the examples name, whatever other tests' folders already hold
    for path in EXAMPLES:
        prompt = ui_to_api(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)
        for node in prompt.values():
            for (class_type, input_name), folder in model_files.KNOWN_MODEL_INPUTS.items():
                value = node["inputs"].get(input_name)
                if node["class_type"] == class_type and isinstance(value, str):
                    wanted[(folder, value)] = None
    first = None
    for folder, name in sorted(wanted):
        if folder == "checkpoints":
            placed = tiny_checkpoint(root / "checkpoints" / name)
            first = first or placed
    for folder, name in sorted(wanted):
        if folder == "controlnet":
            tiny_controlnet_file(root / folder / name)
        elif folder != "checkpoints":
            assert model_files.write_tiny_stand_in(folder, root / folder / name, first, comfy), (folder, name)
    return root


def test_examples_exist_for_every_capability():
    names = {p.name for p in EXAMPLES}
    assert {"ddim_invert_reconstruct.json", "magicstyle_portrait.json", "magicstyle_portrait_single_node.json",
            "repcontrolnet_apply.json"} <= names


def test_every_node_of_the_pack_appears_in_an_example(comfy):
    used = {node["type"] for path in EXAMPLES for node in json.loads(path.read_text())["nodes"]}
    ours = {cls.define_schema().node_id for cls in comfy.pack.nodes.NODE_LIST}
    missing = ours - used
    assert not missing, f"nodes without an example workflow: {sorted(missing)}"


@pytest.fixture(scope="module")
def fresh_input_dir(comfy, pack, tmp_path_factory):
    """A fresh ComfyUI input folder as the pack leaves it on load: only the example images it copies there."""
    folder = tmp_path_factory.mktemp("fresh_input")
    copied = pack.nodes.example_inputs.install_example_inputs(folder)
    assert sorted(p.name for p in copied) == sorted(p.name for p in folder.iterdir())
    return folder


def test_pack_load_copies_example_inputs_once_and_never_overwrites(pack, tmp_path):
    install = pack.nodes.example_inputs.install_example_inputs
    shipped = pack.nodes.example_inputs.example_inputs()
    assert shipped and all(p.name.startswith("magic_portrait_") for p in shipped)
    first = install(tmp_path)
    assert {p.name for p in first} == {p.name for p in shipped}
    own = tmp_path / shipped[0].name
    own.write_bytes(b"the user's own file")
    assert install(tmp_path) == []  # nothing copied again
    assert own.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_converts_and_passes_comfyui_validation(comfy, models_dir, fresh_input_dir, path):
    """As opened from the templates on a fresh ComfyUI: its images come from the input folder the pack filled."""
    import execution
    import folder_paths

    import nodes
    from magic_portrait import comfy_env
    from magic_portrait.workflow import ui_to_api

    comfy_env.boot(models_dir=models_dir, input_dir=fresh_input_dir)
    folder_paths.filename_list_cache.clear()
    prompt = ui_to_api(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)
    valid = asyncio.run(execution.validate_prompt("example", prompt, None))
    assert valid[0], comfy_env._format_validation_error(valid)


def _run_example(name: str, models_dir, tmp_path, sets=(), pack=None):
    """Run example_workflows/`name` with the headless runner into tmp_path/out, reading tmp_path/in; with `pack`,
    first as on a fresh server: the pack's own example inputs copied into that input folder."""
    from magic_portrait.runner import run_workflow

    if pack is not None:
        pack.nodes.example_inputs.install_example_inputs(tmp_path / "in")
    return run_workflow(REPO / "example_workflows" / name, sets=list(sets), models_dir=models_dir,
                        output_dir=tmp_path / "out", input_dir=tmp_path / "in")


def test_inversion_example_runs_through_the_headless_runner(comfy, models_dir, tmp_path):
    small = tmp_path / "astronaut_small.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(REPO / "example_workflows" / "magic_portrait_astronaut.png")), (128, 128)))
    result = _run_example("ddim_invert_reconstruct.json", models_dir, tmp_path,
                          [f"Content image.image={small}", "MagicPortrait_DDIMInvert.steps=4",
                           "MagicPortrait_DDIMInvert.mode=edict"])
    assert [f.suffix for f in result.files].count(".png") == 1
    texts = " ".join(str(t) for t in result.texts)
    assert "round-trip error" in texts and "sampled back" in texts
    summary = json.loads(result.summary_path.read_text())
    assert summary["outputs"]


def test_training_example_runs_through_the_headless_runner(comfy, pack, models_dir, tmp_path):
    """As opened on a fresh server: two training steps on the bundled pairs the pack copied into the input folder
    (real photos + their Canny edges), then sampling with the result."""
    result = _run_example("repcontrolnet_train.json", models_dir, tmp_path,
                          ["MagicPortrait_TrainRepControlNet.steps=2", "MagicPortrait_TrainRepControlNet.resolution=64",
                           "MagicPortrait_TrainRepControlNet.checkpoint_every=1", "KSampler.steps=1",
                           "EmptyLatentImage.width=128", "EmptyLatentImage.height=128"], pack=pack)
    written = {f.name for f in result.files}
    assert any(name.startswith("repcontrolnet_trained") for name in written), written
    trained = models_dir / "magic_repcontrolnet" / "my_repcontrolnet_canny.safetensors"
    assert trained.is_file()
    assert (models_dir / "magic_repcontrolnet" / "my_repcontrolnet_canny_training" / "losses.jsonl").is_file()


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("magicstyle_portrait.json", ["Content DDIM Inversion.steps=3", "Style DDIM Inversion.steps=3"]),
        ("magicstyle_portrait_single_node.json", ["MagicPortrait_MagicStylePortrait.steps=3"]),
    ],
)
def test_magicstyle_examples_run_through_the_headless_runner(comfy, models_dir, tmp_path, name, sets):
    """The astronaut portrait styled by the painterly style image, at 128 px and 3 steps to stay quick."""
    for image, target, size in (("magic_portrait_astronaut.png", "content_small.png", (128, 128)),
                                ("magic_portrait_style.png", "style_small.png", (160, 96))):
        cv2.imwrite(str(tmp_path / target), cv2.resize(cv2.imread(str(REPO / "example_workflows" / image)), size,
                                                      interpolation=cv2.INTER_AREA))
    result = _run_example(name, models_dir, tmp_path, [f"Content image.image={tmp_path / 'content_small.png'}",
                                                       f"Style image.image={tmp_path / 'style_small.png'}", *sets])
    images = [f for f in result.files if f.suffix == ".png"]
    assert len(images) == 1, result.files
    assert cv2.imread(str(images[0])).shape[:2] == (128, 128)


def test_every_node_serialises_for_the_frontend(comfy):
    """What /object_info sends the frontend: every pack node's schema, JSON-serialisable, prefixed, categorised."""
    ours = {cls.define_schema().node_id: cls for cls in comfy.pack.nodes.NODE_LIST}
    assert len(ours) == len(comfy.pack.nodes.NODE_LIST)  # ids are unique
    for node_id, cls in ours.items():
        info = json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
        assert node_id.startswith("MagicPortrait_") and info["name"] == node_id
        assert info["category"].startswith("Magic Portrait") and info["description"], node_id
        types = set(info["output"]) | {spec[0] for group in ("required", "optional")
                                        for spec in info["input"].get(group, {}).values() if isinstance(spec[0], str)}
        foreign = {t for t in types if t not in CORE_TYPES and not t.startswith("MAGIC_")}
        assert not foreign, f"{node_id}: custom types must carry the MAGIC_ prefix: {foreign}"


def _rect(node):
    """A node's rectangle as the frontend draws it: its title bar sits above pos."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_layout_nodes_apart_groups_and_a_note(path):
    data = json.loads(path.read_text())
    nodes = data["nodes"]
    rects = {n["id"]: _rect(n) for n in nodes}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not _overlap(rects[a["id"]], rects[b["id"]]), f"{path.name}: nodes {a['id']} and {b['id']} overlap"
    notes = [n for n in nodes if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 80 for n in notes), "a Note says what the example does"
    groups = data["groups"]
    assert groups, "groups explain the parts of the workflow"
    boxes = [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
              g["bounding"][1] + g["bounding"][3]) for g in groups]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not _overlap(a, b), f"{path.name}: groups overlap"
    for node in nodes:
        r = rects[node["id"]]
        inside = [g for g, box in zip(groups, boxes, strict=True)
                  if box[0] <= r[0] and box[1] <= r[1] and r[2] <= box[2] and r[3] <= box[3]]
        assert len(inside) == 1, f"{path.name}: node {node['id']} ({node['type']}) is in {len(inside)} groups"


@pytest.mark.parametrize(
    ("name", "sets", "expected"),
    [
        ("magicid_landmark_controlnet.json",
         ["KSampler.steps=2", "EmptyLatentImage.width=128", "EmptyLatentImage.height=128"],
         ["image 0: 1 face(s)", "mask covers"]),
        ("magicid_group_photo.json", ["KSampler.steps=2", "EmptyLatentImage.width=192", "EmptyLatentImage.height=128"],
         ["image 0: 2 face(s)", "mask covers", "2 identities over 16 cross-attention layers"]),
        ("magicid_face_restore.json", ["MagicPortrait_DIIRFaceRestore.crop_size=128",
                                       "MagicPortrait_DIIRFaceRestore.steps=4"],
         ["image 0: 2 face(s)", "restored 2 face(s) in 1 image(s)"]),
    ],
)
def test_magicid_examples_run_through_the_headless_runner(comfy, models_dir, tmp_path, name, sets, expected):
    """As shipped (the portrait, the second reference and the layout from the pack, the offline face back-end), on
    tiny stand-in weights, at a small size and few steps."""
    result = _run_example(name, models_dir, tmp_path, sets)
    saved = [f for f in result.files if f.suffix == ".png" and "previews" not in f.parts]
    assert len(saved) == 1
    texts = " ".join(str(t) for t in result.texts)
    for text in expected:
        assert text in texts, (text, texts)


def test_magicid_dataset_example_runs_through_the_headless_runner(comfy, pack, models_dir, tmp_path):
    """As opened on a fresh server: the photo set the pack copied into the input folder becomes a six-sample MagicID
    dataset there (every photo with both modalities), and the contact sheet is saved."""
    from magic_core import magicid_dataset as md
    result = _run_example("magicid_dataset.json", models_dir, tmp_path, pack=pack)
    texts = " ".join(str(t) for t in result.texts)
    assert "6 sample(s) (skeleton 6, landmark 6); this run: 6 added, 0 replaced, 0 already there, 0 skipped" in texts
    (sheet,) = [f for f in result.files if f.suffix == ".png"]
    assert cv2.imread(str(sheet)).shape == (6 * 160, 4 * 160, 3)
    dataset = md.MagicIDDataset(tmp_path / "in" / "magic_portrait_magicid_dataset")
    assert len(dataset) == 6 and len(dataset.pairs("skeleton")) == len(dataset.pairs("landmark")) == 6


def test_magicid_mmf_example_runs_through_the_headless_runner(comfy, pack, models_dir, tmp_path):
    """As opened on a fresh server, at a small size and few steps: the shipped photos become a MagicID dataset, two
    MMF steps (alternate, Clone Face Tuning on) train a RepControlNet on it (the log says skeleton, landmark), and the
    file is applied with the merged condition drawn from the layout picture."""
    result = _run_example("magicid_mmf_train.json", models_dir, tmp_path,
                          ["MagicPortrait_TrainRepControlNet.steps=2", "MagicPortrait_TrainRepControlNet.resolution=64",
                           "MagicPortrait_TrainRepControlNet.checkpoint_every=1", "KSampler.steps=1",
                           "EmptyLatentImage.width=192", "EmptyLatentImage.height=128"], pack=pack)
    texts = " ".join(str(t) for t in result.texts)
    assert "MagicID dataset 'magic_portrait_magicid_dataset': 6 samples at 64px, random crop; Clone Face Tuning p=0.3" in texts
    assert "my_magicid_mmf.safetensors: trained on skeleton, landmark (alternate: skeleton, landmark, ...); " \
           "condition: merged" in texts
    assert any(f.name.startswith("magicid_mmf") and f.suffix == ".png" for f in result.files)
    log = (models_dir / "magic_repcontrolnet" / "my_magicid_mmf_training" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["condition"] for line in log] == ["skeleton", "landmark"]
