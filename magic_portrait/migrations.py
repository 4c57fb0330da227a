"""Workflows saved with earlier Magic Portrait versions, read as they were meant.

ID Embeds' ``face_margin`` counts room on each side of the face since 0.3.0 (the one face crop, as DIIR's margin);
in 0.2 it counted both sides together. An ID Embeds node saved without the convention property is from 0.2, so half
its value is the crop it had. The frontend extension (web/face_margin.js) applies the same rule when a workflow is
opened in the browser; the headless runner applies it here, after the UI-to-API conversion. An API prompt carries no
properties, so it is taken as it is.
"""

from __future__ import annotations

import copy

NODE_TYPE = "MagicPortrait_IDEmbeds"
WIDGET = "face_margin"
CONVENTION_PROPERTY = "face_margin_convention"
PER_SIDE = "per side"


def current_properties(node_type: str) -> dict:
    """The properties a node of `node_type` is saved with today (what the frontend extension gives a new node)."""
    return {CONVENTION_PROPERTY: PER_SIDE} if node_type == NODE_TYPE else {}


def margin_from_saved(value, saved_properties: dict | None):
    """The face_margin a node saved with `saved_properties` means today."""
    if (saved_properties or {}).get(CONVENTION_PROPERTY) == PER_SIDE or not isinstance(value, (int, float)):
        return value
    return value / 2


def _ui_node(workflow: dict, prompt_id: str) -> dict | None:
    """The saved node an API prompt entry came from: ``"12"`` at the top level, ``"5:12"`` node 12 inside the
    subgraph that node 5 is an instance of (nested subgraphs alike)."""
    subgraphs = {g.get("id"): g for g in (workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes = workflow.get("nodes") or []
    *outer, last = str(prompt_id).split(":")
    for segment in outer:
        instance = next((n for n in nodes if str(n.get("id")) == segment), None)
        graph = subgraphs.get(instance.get("type")) if instance else None
        if graph is None:
            return None
        nodes = graph.get("nodes") or []
    return next((n for n in nodes if str(n.get("id")) == last), None)


def read_as_saved(prompt: dict, workflow: dict) -> tuple[dict, list[str]]:
    """(the API `prompt` converted from the UI `workflow`, with earlier versions' values read as meant; a note per
    value changed). Neither argument is changed."""
    out = copy.deepcopy(prompt)
    notes = []
    for prompt_id, entry in out.items():
        value = entry.get("inputs", {}).get(WIDGET)
        if entry.get("class_type") != NODE_TYPE or isinstance(value, list):
            continue
        saved = _ui_node(workflow, prompt_id)
        if saved is None:
            continue
        meant = margin_from_saved(value, saved.get("properties"))
        if meant != value:
            entry["inputs"][WIDGET] = meant
            notes.append(f"node {prompt_id} (ID Embeds): face_margin {value:g} was saved with Magic Portrait 0.2, "
                         f"which counted both sides; read as {meant:g} per side, the same crop")
    return out, notes
