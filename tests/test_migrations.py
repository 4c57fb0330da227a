"""Core tier: workflows saved with Magic Portrait 0.2 keep their face crops (magic_portrait/migrations.py for the
headless runner, web/face_margin.js for the frontend: the two must agree). The saved workflows here are what the real
frontend saved with 0.2 (tests/fixtures/frontend), converted with the node definitions it had."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_server import definitions_from_object_info

from magic_portrait import migrations
from magic_portrait.workflow_loading import to_api_prompt

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "frontend"
DEFINITIONS = definitions_from_object_info(json.loads((FIXTURES / "object_info.json").read_text()))
WEB = REPO / "web" / "face_margin.js"


def _saved(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.workflow.json").read_text())


def _margins(prompt: dict) -> dict:
    return {k: n["inputs"]["face_margin"] for k, n in prompt.items() if n["class_type"] == migrations.NODE_TYPE}


@pytest.mark.parametrize("name, saved_margins", [("magicid_group_photo", [0.4, 0.4]),
                                                 ("magicid_group_photo.edited", [2.25, 1])])
def test_a_workflow_saved_with_0_2_keeps_its_crop(name, saved_margins):
    workflow = _saved(name)
    before = json.dumps(workflow)
    ids = [str(n["id"]) for n in workflow["nodes"] if n["type"] == migrations.NODE_TYPE]
    assert all(migrations.CONVENTION_PROPERTY not in (n.get("properties") or {}) for n in workflow["nodes"])
    warnings: list[str] = []
    prompt = to_api_prompt(workflow, DEFINITIONS, warnings)
    assert sorted(_margins(prompt).items()) == sorted(zip(ids, [m / 2 for m in saved_margins], strict=True))
    assert len(warnings) == 2 and all("face_margin" in w and "per side" in w for w in warnings)
    assert json.dumps(workflow) == before  # the caller's workflow is not changed


def test_a_workflow_saved_with_the_convention_is_read_as_it_is():
    workflow = _saved("magicid_group_photo.edited")
    for node in workflow["nodes"]:
        if node["type"] == migrations.NODE_TYPE:
            node["properties"] = {**node.get("properties", {}), **migrations.current_properties(node["type"])}
    warnings: list[str] = []
    prompt = to_api_prompt(workflow, DEFINITIONS, warnings)
    assert sorted(_margins(prompt).values()) == [1, 2.25] and warnings == []


def test_an_api_prompt_carries_no_properties_and_is_taken_as_it_is():
    api = json.loads((FIXTURES / "magicid_group_photo.api.json").read_text())
    assert sorted(_margins(to_api_prompt(api, DEFINITIONS, [])).values()) == [0.4, 0.4]


def test_nodes_inside_subgraphs_are_found_by_their_instance_path():
    inner = {"id": 12, "type": migrations.NODE_TYPE, "properties": {}}
    workflow = {"nodes": [{"id": 5, "type": "sub-a"}, {"id": 12, "type": "KSampler"}],
                "definitions": {"subgraphs": [{"id": "sub-a", "nodes": [inner]}]}}
    prompt = {"5:12": {"class_type": migrations.NODE_TYPE, "inputs": {"face_margin": 0.6}},
              "12": {"class_type": "KSampler", "inputs": {}}}
    out, notes = migrations.read_as_saved(prompt, workflow)
    assert out["5:12"]["inputs"]["face_margin"] == 0.3 and len(notes) == 1
    assert prompt["5:12"]["inputs"]["face_margin"] == 0.6  # the argument is not changed
    inner["properties"] = migrations.current_properties(migrations.NODE_TYPE)
    assert migrations.read_as_saved(prompt, workflow)[0]["5:12"]["inputs"]["face_margin"] == 0.6


def test_the_example_templates_are_saved_with_the_convention():
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text()).get("nodes", []):
            if node["type"] == migrations.NODE_TYPE:
                assert node["properties"][migrations.CONVENTION_PROPERTY] == migrations.PER_SIDE, path.name


def test_the_frontend_rule_is_the_runners():
    text = WEB.read_text()
    for name, value in (("NODE_TYPE", migrations.NODE_TYPE), ("WIDGET", migrations.WIDGET),
                        ("CONVENTION_PROPERTY", migrations.CONVENTION_PROPERTY), ("PER_SIDE", migrations.PER_SIDE)):
        assert re.search(rf'export const {name} = "{re.escape(value)}";', text), name
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the constants are checked, the function is not run")
    cases = [[0.4, {}], [0.4, None], [0.4, {migrations.CONVENTION_PROPERTY: migrations.PER_SIDE}], [2.25, {"x": 1}],
             [[1, 0], {}]]
    script = (f"import {{ marginFromSaved }} from {json.dumps(WEB.as_uri())};\n"
              f"console.log(JSON.stringify({json.dumps(cases)}.map(([v, p]) => marginFromSaved(v, p))));")
    result = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True,  # noqa: S603
                            check=True, timeout=60)
    assert json.loads(result.stdout) == [migrations.margin_from_saved(v, p) for v, p in cases]
