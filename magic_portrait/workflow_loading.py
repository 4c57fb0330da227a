"""A workflow made ready to run: read from a file, turned into an API prompt, and `--set NODE.INPUT=VALUE`
overrides applied to it. The UI-to-API conversion itself is workflow.py's; this module adds what the runner's
command line needs on top (friendly errors, finding a node by id, title or name, typing a value typed as text).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .migrations import read_as_saved
from .run_errors import UsageError
from .workflow import (
    InputSpec,
    WorkflowFormatError,
    declared_inputs,
    is_api_format,
    is_ui_format,
    load_workflow_file,
    ui_to_api,
)


def load_workflow(source) -> tuple[dict, Path | None]:
    """(workflow data, its folder) from a path or an already loaded dict."""
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"workflow file not found: {path}")
    try:
        data = load_workflow_file(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    except WorkflowFormatError as exc:
        raise UsageError(str(exc)) from exc
    if not (is_ui_format(data) or is_api_format(data)):
        raise UsageError(f"{path} is neither a UI-format workflow (nodes/links) nor an API prompt")
    return data, path.resolve().parent


def to_api_prompt(data: dict, node_classes: dict, warnings: list[str]) -> dict:
    if is_api_format(data):
        prompt = json.loads(json.dumps(data))
        unknown = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in node_classes})
        if unknown:
            raise WorkflowFormatError(f"unknown node type(s), is a custom node pack missing?: {', '.join(unknown)}")
        return prompt
    prompt, notes = read_as_saved(ui_to_api(data, node_classes, warnings=warnings), data)
    warnings.extend(notes)
    return prompt


# ------------------------------------------------------------------------------------------------ --set


def parse_set(text: str) -> tuple[str, str]:
    """'NODE.INPUT=VALUE' -> ('NODE.INPUT', 'VALUE'); the NODE/INPUT split is decided against the prompt."""
    target, sep, raw = text.partition("=")
    if not sep or "." not in target.strip(".") or not target.strip():
        raise UsageError(f"--set expects NODE.INPUT=VALUE (NODE: id, title or class type), got {text!r}")
    return target.strip(), raw


def node_title(node: dict) -> str:
    """An API prompt node's title as the frontend shows it (its class type when it has none)."""
    return (node.get("_meta") or {}).get("title") or node["class_type"]


def _node_list(prompt: dict) -> str:
    return ", ".join(f"{nid} ({n['class_type']}"
                     + (f" '{node_title(n)}'" if node_title(n) != n["class_type"] else "") + ")"
                     for nid, n in prompt.items())


def find_node(prompt: dict, ref: str, display_names: dict | None = None) -> str | None:
    """A prompt node id from a node id, title, class type or display name ("Load Checkpoint"); None if nothing
    matches; UsageError if ambiguous."""
    if ref in prompt:
        return ref
    display_names = display_names or {}
    for match in (
        lambda n: node_title(n) == ref,
        lambda n: n["class_type"] == ref,
        lambda n: display_names.get(n["class_type"]) == ref,
        lambda n: node_title(n).lower() == ref.lower(),
        lambda n: n["class_type"].lower() == ref.lower(),
        lambda n: str(display_names.get(n["class_type"], "")).lower() == ref.lower(),
    ):
        found = [nid for nid, n in prompt.items() if match(n)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(
                f"--set: '{ref}' matches several nodes: "
                + ", ".join(f"{nid} ({prompt[nid]['class_type']} '{node_title(prompt[nid])}')" for nid in found)
                + "; use the node id"
            )
    return None


def coerce_value(raw: str, spec: InputSpec | None) -> Any:
    """The value of a --set: JSON when it parses (numbers, booleans, null, lists) else the raw string; a STRING or
    COMBO input keeps the text as typed and a BOOLEAN also accepts true/false/yes/no/on/off/1/0 in any case."""
    kind = spec.type if spec is not None else None
    if kind == "BOOLEAN" and raw.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return raw.strip().lower() in ("true", "yes", "on", "1")
    if kind in ("STRING", "COMBO") and not (raw.startswith('"') and raw.endswith('"') and len(raw) >= 2):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, list) and not (len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)):
        return {"__value__": value}  # a list value, not a link
    return value


def apply_sets(prompt: dict, sets: list[str], node_classes: dict,
               display_names: dict | None = None) -> list[tuple[str, str, Any]]:
    """Apply --set overrides to an API prompt in place; returns [(node id, input, value)]."""
    applied = []
    for text in sets:
        target, raw = parse_set(text)
        resolved = None
        node_without_input = None
        # NODE may contain dots (titles) and INPUT too (dynamic inputs 'combo.sub'): try every split, left to right.
        parts = target.split(".")
        for i in range(1, len(parts)):
            node_ref, input_name = ".".join(parts[:i]), ".".join(parts[i:])
            node_id = find_node(prompt, node_ref, display_names)
            if node_id is None:
                continue
            declared = declared_inputs(prompt[node_id]["class_type"], node_classes)
            known = list(dict.fromkeys([*declared, *prompt[node_id]["inputs"]]))
            if input_name in known:
                resolved = (node_id, input_name, declared.get(input_name))
                break
            if node_without_input is None:
                node_without_input = (node_id, input_name, known)
        if resolved is None and node_without_input is not None:
            node_id, input_name, known = node_without_input
            raise UsageError(
                f"--set {text!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input '{input_name}'; "
                f"its inputs: {', '.join(known) or '(none)'}"
            )
        if resolved is None:
            raise UsageError(f"--set {text!r}: no node '{parts[0]}' in the workflow (NODE is a node id, title or "
                             f"class type); nodes: {_node_list(prompt)}")
        node_id, input_name, spec = resolved
        value = coerce_value(raw, spec)
        prompt[node_id]["inputs"][input_name] = value
        applied.append((node_id, input_name, value))
    return applied
