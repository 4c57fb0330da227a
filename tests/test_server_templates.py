"""ComfyUI tier: the pack as a new user meets it, through the real ComfyUI server.

ComfyUI's own main.py runs in a subprocess on CPU, on a free local port, with every folder in a temporary base
directory: the pack linked into its custom_nodes folder (as an install puts it there), an empty input folder, and
tiny stand-ins for every model file the examples load, written once by the runner's --make-tiny-checkpoint code
while the server starts. Then everything goes over HTTP, as the frontend does it: list the templates, fetch each as
served, convert it to an API prompt with the node definitions /object_info sends, queue it and wait for its history
entry. The example images reach the input folder only by the pack's own copy when ComfyUI loads it. The templates
keep their real sizes and steps; the prompts sent here are made small (`make_quick`) so the whole module stays short
on a 2-core CI machine. One server serves every template, and stops with Ctrl+C (SIGINT) as a user stops it.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, REPO, ServerError, definitions_from_object_info, start_server

from magic_portrait import comfy_env, model_files
from magic_portrait.workflow import ui_to_api

EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
STARTUP_SECONDS = 300  # a cold start on a busy 2-core machine: imports, node registration, the pack's copy
RUN_SECONDS = 600  # one quick template run there, with room to spare
CLIENT_ID = "magic-portrait-server-test"

# What the prompts sent here change so that each template runs in seconds on tiny models (the templates keep theirs).
QUICK_STEPS = 2  # sampling, inversion, scheduler and training steps (MagicStyle needs at least 2)
QUICK_REFINE_ITERATIONS = 1  # fixed-point inversion's refinements per step
QUICK_LATENT_SIDE = 128  # empty latents: the longer side in pixels, aspect kept
QUICK_SIZES = {"crop_size": 64, "resolution": 64}  # DIIR's face crop (0 = the model's 512), training resolution
# Loaded images are scaled to this many megapixels (512x512 -> 128x128, sides in multiples of 64, a latent the
# UNet's three downsamplings divide), except those faces are detected in: the detector needs faces of ~80 px.
QUICK_IMAGE_MEGAPIXELS = 0.02
FACE_ANALYSIS_TYPE = "MAGIC_FACE_ANALYSIS"


def _input_types(definition) -> dict:
    sections = definition.info["input"]
    return {name: spec[0] for section in ("required", "optional") for name, spec in (sections.get(section) or {}).items()}


def make_quick(prompt: dict, definitions: dict) -> dict:
    """The prompt with fewer steps and smaller latents, images, crops and training images (in place; returned)."""
    for node in list(prompt.values()):
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            strength = inputs.get("strength")
            # a partial inversion (DIIR) covers strength x steps: keep at least QUICK_STEPS of those
            partial = isinstance(strength, float) and 0 < strength < 1
            inputs["steps"] = min(inputs["steps"], math.ceil(QUICK_STEPS / strength) if partial else QUICK_STEPS)
        if isinstance(inputs.get("refine_iterations"), int):
            inputs["refine_iterations"] = min(inputs["refine_iterations"], QUICK_REFINE_ITERATIONS)
        for name, small in QUICK_SIZES.items():
            if isinstance(inputs.get(name), int) and (inputs[name] == 0 or inputs[name] > small):
                inputs[name] = small
        width, height = inputs.get("width"), inputs.get("height")
        if "LATENT" in definitions[node["class_type"]].info["output"] and isinstance(width, int) \
                and isinstance(height, int) and max(width, height) > QUICK_LATENT_SIDE:
            scale = QUICK_LATENT_SIDE / max(width, height)
            inputs["width"], inputs["height"] = (max(64, round(side * scale / 8) * 8) for side in (width, height))
    for node_id, node in list(prompt.items()):
        if node["class_type"] != "LoadImage":
            continue
        uses = [(consumer, name) for consumer in prompt.values() for name, value in consumer["inputs"].items()
                if value == [node_id, 0]]
        if any(FACE_ANALYSIS_TYPE in _input_types(definitions[consumer["class_type"]]).values()
               for consumer, _ in uses):
            continue
        scaled = f"quick_scale_{node_id}"
        prompt[scaled] = {"class_type": "ImageScaleToTotalPixels", "inputs": {
            "image": [node_id, 0], "upscale_method": "area", "megapixels": QUICK_IMAGE_MEGAPIXELS,
            "resolution_steps": 64}}
        for consumer, name in uses:
            consumer["inputs"][name] = [scaled, 0]
    return prompt


def execution_error(entry: dict) -> str:
    """The node error of a failed run's history entry, as ComfyUI's frontend shows it."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            trace = "".join(data.get("traceback") or [])[-3000:]
            return f"node {data['node_id']} ({data['node_type']}): {data['exception_message']}\n{trace}"
    return json.dumps(entry["status"], indent=1)[:3000]


def named_model_files(prompt: dict) -> list[dict]:
    """Every model file the prompt's loaders name, there or not, as find_missing_files describes one (what
    write_tiny_models takes): the runner only ever asks for the missing ones, this server needs them all."""
    return [{"node": node_id, "class_type": node["class_type"], "input": input_name,
             "value": node["inputs"][input_name], "kind": "model", "folder": folder}
            for node_id, node in prompt.items()
            for (class_type, input_name), folder in model_files.KNOWN_MODEL_INPUTS.items()
            if node["class_type"] == class_type and isinstance(node["inputs"].get(input_name), str)]


def write_stand_in_models(comfy, models_dir: Path) -> list[Path]:
    """Tiny stand-ins, written once, for every model file the example workflows load (what a user downloads for
    them), by the code behind `python -m magic_portrait run ... --make-tiny-checkpoint`."""
    import nodes

    prompts = [ui_to_api(json.loads((REPO / "example_workflows" / f"{name}.json").read_text()),
                         nodes.NODE_CLASS_MAPPINGS) for name in EXAMPLES]
    named = [entry for prompt in prompts for entry in named_model_files(prompt)]
    packs = [pack for prompt in prompts for pack in model_files.named_insightface_packs(prompt, comfy)]
    log = io.StringIO()
    written = model_files.write_tiny_models(models_dir, named, insightface_packs=packs, runtime=comfy, log=log)
    assert written, log.getvalue()
    return written


def run_prompt(server, prompt: dict, workflow: dict, seconds: float) -> dict:
    """Queue an API prompt as the frontend does (with the UI workflow for the saved PNGs) and return its history entry
    once ComfyUI has finished it."""
    status, data = server.request("POST", "/api/prompt", {
        "prompt": prompt, "client_id": CLIENT_ID, "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    answer = json.loads(data)
    assert status == 200, f"ComfyUI refused the prompt: {json.dumps(answer, indent=1)[:4000]}"
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entry = server.get_json(f"/api/history/{prompt_id}").get(prompt_id)
        if entry:  # ComfyUI adds it to the history when the run has ended
            return entry
        if server.process.poll() is not None:
            pytest.fail(f"ComfyUI exited with code {server.process.returncode} while running:\n{server.log_tail()}")
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish within {seconds} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """ComfyUI's main.py serving from a fresh base folder with the pack installed and an empty input folder. While
    it starts, this process boots ComfyUI too and writes the model stand-ins into the server's models folder."""
    comfy_root = comfy_env.find_comfyui()
    if comfy_root is None:
        request.getfixturevalue("comfy")  # skips, saying where ComfyUI was looked for
    instance = start_server(comfy_root, tmp_path_factory.mktemp("comfyui_server"))
    try:
        write_stand_in_models(request.getfixturevalue("comfy"), instance.models_dir)
        try:
            instance.wait_until_up(STARTUP_SECONDS)
        except ServerError as err:
            pytest.fail(str(err))
        yield instance
    finally:
        code = instance.stop()
    assert code == 0, f"ComfyUI did not stop cleanly on Ctrl+C (exit code {code}):\n{instance.log_tail()}"
    assert "Stopped server" in instance.log_tail(20)


@pytest.fixture(scope="module")
def definitions(server) -> dict:
    """Every node type the server knows, from /object_info, as the frontend learns them."""
    return definitions_from_object_info(server.get_json("/api/object_info"))


@pytest.fixture(scope="module")
def templates(server) -> dict:
    """The pack's templates as the server lists and serves them: {name: UI workflow}."""
    listed = server.get_json("/api/workflow_templates").get(PACK_FOLDER, [])
    return {name: server.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json") for name in sorted(listed)}


def test_pack_load_fills_the_empty_input_folder_with_the_example_inputs(comfy, server):
    shipped = comfy.pack.nodes.example_inputs.example_inputs()
    assert shipped
    for source in shipped:
        copy = server.input_dir / source.name
        files = [p.relative_to(source) for p in source.rglob("*") if p.is_file()] if source.is_dir() else [None]
        for part in files:
            original, copied = (source, copy) if part is None else (source / part, copy / part)
            assert copied.is_file() and copied.read_bytes() == original.read_bytes(), copied
    # What the frontend's Load Image offers: the example images among the input folder's files.
    listed = server.get_json("/api/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
    assert {p.name for p in shipped if p.is_file()} <= set(listed)


def test_server_lists_every_example_workflow_as_a_template(comfy, server, templates):
    assert sorted(templates) == EXAMPLES
    for name, workflow in templates.items():
        assert workflow == json.loads((REPO / "example_workflows" / f"{name}.json").read_text()), name


@pytest.mark.parametrize("name", EXAMPLES)
def test_template_runs_on_the_server(comfy, server, templates, definitions, name):
    """As opened from the template browser and queued, at quick sizes: it succeeds and every output node of the
    prompt has its outputs, the saved images in the output folder."""
    workflow = templates[name]
    prompt = make_quick(ui_to_api(workflow, definitions), definitions)
    entry = run_prompt(server, prompt, workflow, RUN_SECONDS)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    output_nodes = {node_id for node_id, node in prompt.items()
                    if definitions[node["class_type"]].info.get("output_node")}
    assert output_nodes and output_nodes <= set(entry["outputs"]), (output_nodes, sorted(entry["outputs"]))
    saved = [image for outputs in entry["outputs"].values() for image in outputs.get("images", [])
             if image.get("type") == "output"]
    assert saved, entry["outputs"]
    for image in saved:
        assert (server.output_dir / image["subfolder"] / image["filename"]).is_file(), image
