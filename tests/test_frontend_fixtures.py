"""Core tier: the UI-format reader (magic_portrait/workflow.py) and the example builder against the real ComfyUI
frontend. tests/fixtures/frontend/ holds templates as comfyui-frontend-package saved them in headless Chromium
(its Export) and what its Export (API) gave, as opened and after every widget was set to a distinct value, plus the
node definitions the frontend was given (written by scripts/make_frontend_fixtures.py, which says which frontend).
Converting with those definitions keeps these tests about the widget model, whatever the nodes become later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_server import definitions_from_object_info

from magic_portrait.workflow import input_specs, new_widget_values, ui_to_api, widget_layout

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "frontend"
ABOUT = json.loads((FIXTURES / "frontend.json").read_text())
OBJECT_INFO = json.loads((FIXTURES / "object_info.json").read_text())
DEFINITIONS = definitions_from_object_info(OBJECT_INFO)
DISPLAY_NAMES = {name: info["display_name"] for name, info in OBJECT_INFO.items()}
WORKFLOWS = ABOUT["workflows"]


def _load(name: str, kind: str) -> dict:
    return json.loads((FIXTURES / f"{name}.{kind}.json").read_text())


def test_fixtures_say_which_frontend_made_them():
    assert ABOUT["made_by"] == "scripts/make_frontend_fixtures.py"
    assert ABOUT["comfyui_frontend_package"] == ABOUT["frontend_version_in_page"]
    assert sorted(WORKFLOWS) == sorted(n + v for n in ABOUT["templates"] for v in ("", ".edited"))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_converting_the_saved_workflow_gives_the_frontends_api_export(name):
    saved, exported = _load(name, "workflow"), _load(name, "api")
    warnings: list[str] = []
    converted = ui_to_api(saved, DEFINITIONS, warnings=warnings, display_names=DISPLAY_NAMES)
    assert warnings == []
    assert sorted(converted) == sorted(exported)
    for node_id, node in exported.items():
        assert converted[node_id] == node, f"node {node_id} ({node['class_type']})"


def test_edited_fixtures_hold_distinct_values():
    """The edited exports are discriminating: within a node no two widget values are equal, so widgets_values mapped
    onto the wrong inputs cannot give the frontend's export by chance."""
    for name in (w for w in WORKFLOWS if w.endswith(".edited")):
        for node_id, node in _load(name, "api").items():
            values = [json.dumps(v) for v in node["inputs"].values() if not isinstance(v, list)]
            assert len(values) == len(set(values)), (name, node_id, node["inputs"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_builder_writes_widgets_values_as_the_frontend_saves_them(name):
    """The example builder's widget model is the reader's: from a node's widget inputs (the frontend's API export)
    it writes the frontend's own widgets_values, seed controls aside (a new node's is "fixed")."""
    saved, exported = _load(name, "workflow"), _load(name, "api")
    checked = 0
    for node in saved["nodes"]:
        if node["type"] not in DEFINITIONS:
            continue  # Notes: frontend-only
        specs = input_specs(DEFINITIONS[node["type"]])
        layout = widget_layout(specs)
        inputs = exported[str(node["id"])]["inputs"]
        given = {slot.name: inputs[slot.name] for slot in layout if slot.kind == "value" and slot.name in inputs}
        expected = ["fixed" if slot.kind == "control" else value
                    for slot, value in zip(layout, node["widgets_values"], strict=True)]
        assert new_widget_values(specs, given, node["type"]) == expected, f"node {node['id']} ({node['type']})"
        checked += 1
    assert checked >= 8
