"""Workflow files: UI format (what the ComfyUI frontend saves) to API format (what ComfyUI's executor runs).

Pure functions: nothing here imports ComfyUI. `ui_to_api` only needs the node classes (anything with
`INPUT_TYPES()`, V1 classes and V3 `io.ComfyNode` alike) to map each node's `widgets_values` onto input names.

UI format, as saved by the frontend (schema version 0.4; subgraph definitions use the object link form):

- `nodes`: `{id, type, mode, inputs: [{name, type, link, widget?: {name}}], outputs: [{name, type, links}],
  widgets_values, title?, properties}`. `mode` 0 = normal, 2 = muted (never), 4 = bypassed.
- `links`: `[link_id, from_node, from_slot, to_node, to_slot, type]` (or `{id, origin_id, origin_slot, target_id,
  target_slot, type}`).
- `widgets_values`: one value per widget in the order of the node definition's inputs (required, then optional),
  for every input that has a widget (INT, FLOAT, STRING, BOOLEAN, COMBO, ... unless `forceInput`), linked or not.
  Extra entries the frontend adds: the `control_after_generate` value ("fixed"/"increment"/"decrement"/"randomize")
  after an INT with `control_after_generate` or named seed/noise_seed, after a FLOAT or COMBO with
  `control_after_generate` (a COMBO also gets a filter string), and the upload button value ("image") after every
  input of a node with an `image_upload`/`video_upload`/`animated_image_upload`/`audio_upload` COMBO.
- Frontend-only nodes: `PrimitiveNode` (its `widgets_values[0]` is written into every widget it feeds), `Reroute`
  (pass-through, may be chained), `Note`/`MarkdownNote` (ignored).
- `definitions.subgraphs`: subgraph blueprints; a node whose `type` is a subgraph id is an instance. Inner nodes get
  execution ids `"<instance id>:<inner id>"` as in the frontend; links from node -10 are the instance's inputs,
  links into node -20 its outputs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

MODE_NEVER = 2  # muted
MODE_BYPASS = 4

PRIMITIVE_NODE = "PrimitiveNode"
REROUTE_NODE = "Reroute"
NOTE_NODES = frozenset({"Note", "MarkdownNote"})
FRONTEND_ONLY_NODES = frozenset({PRIMITIVE_NODE, REROUTE_NODE, *NOTE_NODES})

CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")

SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20

# Input types the frontend draws a widget for (each holds one entry of widgets_values).
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR", "TEXTAREA", "IMAGECOMPARE", "CHART",
    "GALLERIA", "IMAGEUPLOAD", "WEBCAM", "AUDIO_RECORD", "LOAD_3D", "LOAD_3D_ANIMATION", "PREVIEW_3D",
    "COMFY_DYNAMICCOMBO_V3",
})
# Widgets the frontend never writes to widgets_values.
UNSERIALISED_WIDGET_TYPES = frozenset({"AUDIO_UI"})


class WorkflowFormatError(ValueError):
    """The workflow file cannot be turned into an API prompt (the message names the node)."""


# ---------------------------------------------------------------------------------------------------------------
# Node definitions -> widget layout


@dataclass
class InputSpec:
    name: str
    type: str  # "COMBO" for option lists
    options: dict
    required: bool
    choices: list | None = None  # COMBO options

    @property
    def has_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")


@dataclass
class WidgetSlot:
    """One entry of widgets_values. `input` is None for the frontend's extra widgets (control, filter, upload)."""

    kind: str  # "value", "control", "filter", "upload", "button"
    input: InputSpec | None = None
    prefix: str = ""

    @property
    def name(self) -> str | None:
        return None if self.input is None else self.prefix + self.input.name


def _spec_from(name: str, raw: Any, required: bool) -> InputSpec:
    if not isinstance(raw, (list, tuple)) or not raw:
        raw = (raw,)
    io_type, options = raw[0], raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    if isinstance(io_type, (list, tuple)):
        return InputSpec(name, "COMBO", options, required, list(io_type))
    io_type = str(io_type)
    if io_type == "COMBO":
        return InputSpec(name, "COMBO", options, required, list(options.get("options") or []))
    return InputSpec(name, io_type, options, required)


def input_specs(node_class) -> list[InputSpec]:
    """The declared inputs (required, then optional; hidden ones excluded) of a V1 or V3 node class."""
    try:
        types = node_class.INPUT_TYPES()
    except Exception as exc:  # a broken custom node should not hide which node it was
        raise WorkflowFormatError(f"{getattr(node_class, '__name__', node_class)}.INPUT_TYPES() failed: {exc}") from exc
    specs = []
    for section, required in (("required", True), ("optional", False)):
        for name, raw in (types.get(section) or {}).items():
            specs.append(_spec_from(name, raw, required))
    return specs


def declared_inputs(class_type: str, node_classes: dict) -> dict[str, InputSpec]:
    """A node type's declared inputs by name; empty for an unknown type or one whose INPUT_TYPES() fails (the
    executor's validation reports those better)."""
    node_class = node_classes.get(class_type)
    if node_class is None:
        return {}
    try:
        return {spec.name: spec for spec in input_specs(node_class)}
    except WorkflowFormatError:
        return {}


def _control_slots(spec: InputSpec) -> list[WidgetSlot]:
    cag = spec.options.get("control_after_generate")
    if spec.type == "INT" and (cag if cag is not None else spec.name in SEED_NAMES):
        return [WidgetSlot("control")]
    if spec.type == "FLOAT" and cag:
        return [WidgetSlot("control")]
    if spec.type == "COMBO" and cag:
        return [WidgetSlot("control"), WidgetSlot("filter")]
    return []


def widget_layout(specs: list[InputSpec], *, legacy_force_input: bool = False, prefix: str = "",
                  top_level: bool = True) -> list[WidgetSlot]:
    """The widgets of a node in frontend order, each one entry of widgets_values.

    `legacy_force_input`: frontends before 1.16 also kept a (dummy) widget for `forceInput` inputs.
    """
    slots: list[WidgetSlot] = []
    for spec in specs:
        widget = spec.has_widget or (legacy_force_input and spec.type in WIDGET_TYPES)
        if not widget:
            continue
        slots.append(WidgetSlot("value", spec, prefix))
        slots.extend(_control_slots(spec))
        remote = spec.options.get("remote")
        if spec.type == "COMBO" and isinstance(remote, dict) and remote.get("refresh_button"):
            slots.append(WidgetSlot("button"))
    if top_level and any(
        spec.required and spec.type == "COMBO" and any(spec.options.get(flag) for flag in UPLOAD_FLAGS)
        for spec in specs
    ):
        slots.append(WidgetSlot("upload"))  # appended after all inputs by the frontend's upload extensions
    return slots


# What the frontend writes for each extra entry of a newly added node (the builder writes the same).
NEW_NODE_EXTRA_VALUES = {"control": "fixed", "filter": "", "upload": "image"}


def new_widget_values(specs: list[InputSpec], given: dict[str, Any], node_type: str = "node") -> list:
    """widgets_values for a node of these inputs, as the frontend saves a node it just added and set: each widget's
    value from `given` (else its default, else a COMBO's first option) and the extra entries of the same layout the
    reader (`map_widget_values`) consumes. The builder of example workflows writes exactly this, so builder and reader
    share one widget model. Refresh buttons (remote COMBOs) are left out: the reader accepts either."""
    values, unused = [], dict(given)
    for slot in widget_layout(specs):
        if slot.kind == "value":
            name = slot.name
            if name in unused:
                values.append(unused.pop(name))
                continue
            ok, default = _default_for(slot.input)
            if not ok and slot.input.type == "COMBO" and slot.input.choices:
                ok, default = True, slot.input.choices[0]
            if not ok:
                raise WorkflowFormatError(f"{node_type}: widget {name!r} has no default; give a value")
            values.append(default)
        elif slot.kind in NEW_NODE_EXTRA_VALUES:
            values.append(NEW_NODE_EXTRA_VALUES[slot.kind])
    if unused:
        raise WorkflowFormatError(f"{node_type}: no widgets named {sorted(unused)}")
    return values


def _dynamic_option_specs(spec: InputSpec, value: Any) -> list[InputSpec]:
    """The inputs a V3 DynamicCombo shows for the chosen option (named '<combo>.<input>' in the prompt)."""
    for option in spec.options.get("options") or []:
        if str(getattr(option.get("key"), "value", option.get("key"))) == str(value):
            inputs = option.get("inputs") or {}
            return [
                _spec_from(name, raw, section == "required")
                for section in ("required", "optional")
                for name, raw in (inputs.get(section) or {}).items()
            ]
    return []


# ---------------------------------------------------------------------------------------------------------------
# widgets_values -> named inputs


def _describe(node: dict) -> str:
    title = node.get("title")
    extra = f" '{title}'" if title and title != node.get("type") else ""
    return f"node {node.get('_exec_id', node.get('id'))} ({node.get('type')}{extra})"


def _default_for(spec: InputSpec) -> tuple[bool, Any]:
    if "default" in spec.options:
        return True, spec.options["default"]
    return False, None


def _wrap(value: Any) -> Any:
    # The frontend wraps list values so the backend does not read them as links.
    return {"__value__": value} if isinstance(value, list) else value


def map_widget_values(node: dict, specs: list[InputSpec], warnings: list[str]) -> dict[str, Any]:
    """Name the entries of a UI node's widgets_values after the node definition's inputs."""
    values = node.get("widgets_values")
    layout = widget_layout(specs)
    wanted = [slot for slot in layout if slot.kind == "value"]
    if values is None:
        values = []
    if isinstance(values, dict):  # some packs save {widget name: value}
        out = {}
        for slot in wanted:
            if slot.name in values:
                out[slot.name] = _wrap(values[slot.name])
        return _fill_defaults(node, wanted, out, warnings)
    if not isinstance(values, list):
        raise WorkflowFormatError(f"{_describe(node)}: widgets_values must be a list, got {type(values).__name__}")

    def fits(slots: list[WidgetSlot]) -> bool:  # control/upload entries may be missing from hand-made files
        return sum(1 for slot in slots if slot.kind == "value") <= len(values) <= len(slots)

    legacy = widget_layout(specs, legacy_force_input=True)
    if len(legacy) != len(layout) and not fits(layout) and fits(legacy):
        layout = legacy  # saved by a frontend older than 1.16: forceInput inputs had dummy widgets

    out: dict[str, Any] = {}
    pos = _consume(node, layout, values, 0, out)
    if pos < len(values):
        extra = values[pos:]
        # One trailing string is what display widgets leave (GetImageSize's size text, API nodes' status text).
        display_text = len(extra) == 1 and isinstance(extra[0], str)
        if not display_text and any(v is not None for v in extra):
            names = [slot.name or slot.kind for slot in layout]
            warnings.append(
                f"{_describe(node)}: {len(extra)} unexpected extra widget value(s) {extra!r} ignored "
                f"(widgets: {names})"
            )
    return _fill_defaults(node, wanted, out, warnings)


def _consume(node: dict, layout: list[WidgetSlot], values: list, pos: int, out: dict) -> int:
    """Assign values to the value slots of `layout` from `values[pos:]`; returns the new position.

    The frontend's extra entries are matched tolerantly, so files written without them (API-like or hand-made
    workflows) and files saved before the node gained inputs (too few values) still map: a control entry is taken only
    when the value is a control keyword, a filter only after a control, buttons only while more values remain than
    value widgets still to fill.
    """
    consumed_control = False
    values_after = [sum(1 for s in layout[i + 1:] if s.kind == "value") for i in range(len(layout))]
    for index, slot in enumerate(layout):
        here = values[pos] if pos < len(values) else None
        spare = len(values) - pos > values_after[index]
        if slot.kind == "value":
            consumed_control = False
            if pos >= len(values):
                continue
            pos += 1
            if slot.input.options.get("forceInput") and slot.input.type != "COMFY_DYNAMICCOMBO_V3":
                continue  # legacy dummy widget of a socket-only input
            out[slot.name] = _wrap(here)
            if slot.input.type == "COMFY_DYNAMICCOMBO_V3":
                sub_specs = _dynamic_option_specs(slot.input, here)
                sub_layout = widget_layout(sub_specs, prefix=slot.name + ".", top_level=False)
                pos = _consume(node, sub_layout, values, pos, out)
        elif slot.kind == "control":
            consumed_control = isinstance(here, str) and here in CONTROL_VALUES
            pos += consumed_control
        elif slot.kind == "filter":
            if consumed_control and isinstance(here, str) and (spare or here == ""):
                pos += 1
        elif spare:  # upload / refresh buttons
            pos += 1
    return pos


def _fill_defaults(node: dict, wanted: list[WidgetSlot], out: dict, warnings: list[str]) -> dict:
    missing = []
    for slot in wanted:
        if slot.name in out or slot.input.options.get("forceInput"):
            continue
        ok, default = _default_for(slot.input)
        if not ok and slot.input.type == "COMBO" and slot.input.choices:
            ok, default = True, slot.input.choices[0]
        if ok:
            out[slot.name] = _wrap(default)
            warnings.append(f"{_describe(node)}: no saved value for widget '{slot.name}', using default {default!r}")
        else:
            missing.append(slot.name)
    if missing:
        raise WorkflowFormatError(
            f"{_describe(node)}: widgets_values has no value for {', '.join(repr(m) for m in missing)} and the node "
            f"definition gives no default (saved values: {node.get('widgets_values')!r})"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Graph traversal (links, reroutes, primitives, bypass, subgraphs)


@dataclass
class _Link:
    id: Any
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


def _parse_links(raw_links, where: str) -> dict[str, _Link]:
    links: dict[str, _Link] = {}
    for raw in raw_links or []:
        if raw is None:
            continue
        try:
            if isinstance(raw, dict):
                link = _Link(raw["id"], str(raw["origin_id"]), int(raw["origin_slot"]), str(raw["target_id"]),
                             int(raw["target_slot"]), raw.get("type"))
            else:
                link = _Link(raw[0], str(raw[1]), int(raw[2]), str(raw[3]), int(raw[4]),
                             raw[5] if len(raw) > 5 else None)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise WorkflowFormatError(f"malformed link {raw!r} in {where}") from exc
        links[str(link.id)] = link
    return links


@dataclass
class _Graph:
    """One graph level: the root workflow or one expanded subgraph instance."""

    nodes: dict[str, dict]
    links: dict[str, _Link]
    path: tuple[str, ...] = ()
    instance: dict | None = None  # the subgraph node in the parent graph
    parent: _Graph | None = None
    definition: dict | None = None
    inherited_mode: int | None = None
    promoted: dict[str, Any] = field(default_factory=dict)  # subgraph input name -> instance widget value
    children: dict[str, _Graph] = field(default_factory=dict)

    def exec_id(self, node: dict) -> str:
        return ":".join((*self.path, str(node["id"])))

    def mode(self, node: dict) -> int:
        if self.inherited_mode in (MODE_NEVER, MODE_BYPASS):
            return self.inherited_mode
        return node.get("mode") or 0


def _index_nodes(raw_nodes, where: str) -> dict[str, dict]:
    nodes: dict[str, dict] = {}
    for node in raw_nodes or []:
        if not isinstance(node, dict) or "id" not in node or "type" not in node:
            raise WorkflowFormatError(f"malformed node in {where}: {str(node)[:200]}")
        nodes[str(node["id"])] = node
    return nodes


def _collect_subgraphs(workflow: dict) -> dict[str, dict]:
    found: dict[str, dict] = {}
    stack = [workflow]
    while stack:
        holder = stack.pop()
        for sg in (holder.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(sg, dict) and sg.get("id") and sg["id"] not in found:
                found[sg["id"]] = sg
                stack.append(sg)
    return found


class _Converter:
    def __init__(self, workflow: dict, node_classes: dict, warnings: list[str], display_names: dict | None = None):
        self.node_classes = node_classes
        self.display_names = display_names or {}
        self.warnings = warnings
        self.subgraphs = _collect_subgraphs(workflow)
        self.group_nodes = set(((workflow.get("extra") or {}).get("groupNodes") or {}).keys())
        self._specs: dict[str, list[InputSpec]] = {}
        self.output: dict[str, dict] = {}
        self.unknown: list[str] = []

    # -- definitions
    def specs(self, node_type: str) -> list[InputSpec]:
        if node_type not in self._specs:
            self._specs[node_type] = input_specs(self.node_classes[node_type])
        return self._specs[node_type]

    # -- traversal
    def expand(self, graph: _Graph, depth: int = 0) -> None:
        if depth > 32:
            raise WorkflowFormatError(f"subgraphs nested deeper than 32 levels at {'/'.join(graph.path)}")
        for node in graph.nodes.values():
            node_type = node["type"]
            if node_type in self.subgraphs:
                child = self._instantiate(graph, node, depth)
                graph.children[str(node["id"])] = child
                self.expand(child, depth + 1)

    def _instantiate(self, graph: _Graph, node: dict, depth: int) -> _Graph:
        definition = self.subgraphs[node["type"]]
        if any(str(node["id"]) == p for p in graph.path):
            raise WorkflowFormatError(f"{_describe(node)}: subgraph contains itself")
        where = f"subgraph '{definition.get('name', definition['id'])}'"
        child = _Graph(
            nodes=_index_nodes(copy.deepcopy(definition.get("nodes")), where),  # one copy per instance
            links=_parse_links(definition.get("links"), where),
            path=(*graph.path, str(node["id"])),
            instance=node,
            parent=graph,
            definition=definition,
            inherited_mode=graph.mode(node) if graph.mode(node) in (MODE_NEVER, MODE_BYPASS) else None,
        )
        child.promoted = self._promoted_values(child, node, definition)
        for inner in child.nodes.values():
            inner["_exec_id"] = child.exec_id(inner)
        return child

    def _promoted_values(self, child: _Graph, instance: dict, definition: dict) -> dict[str, Any]:
        """Values of the instance's promoted widgets (subgraph inputs that feed an inner widget)."""
        names = []
        for sg_input in definition.get("inputs") or []:
            for link_id in sg_input.get("linkIds") or []:
                link = child.links.get(str(link_id))
                target = child.nodes.get(link.target_id) if link else None
                entry = next((i for i in (target or {}).get("inputs") or [] if i.get("link") == link_id), None)
                if entry is not None and entry.get("widget"):
                    names.append(sg_input.get("name"))
                    break
        values = instance.get("widgets_values")
        if isinstance(values, dict):
            return {n: values[n] for n in names if n in values}
        values = list(values or [])
        proxies = (instance.get("properties") or {}).get("proxyWidgets")
        if isinstance(proxies, list) and proxies:
            # Newer frontends: widgets_values[i] belongs to proxyWidgets[i]; ["-1", name] is a promoted subgraph
            # input, [inner id, widget] shows an inner node's widget, whose value stays in that node (saved as None).
            promoted = {}
            for proxy, value in zip(proxies, values, strict=False):
                if (isinstance(proxy, (list, tuple)) and len(proxy) == 2 and str(proxy[0]) == "-1"
                        and not str(proxy[1]).startswith("$$") and value is not None):
                    promoted[str(proxy[1])] = value
            return promoted
        if len(values) == len(names):
            return dict(zip(names, values, strict=True))
        if values:
            self.warnings.append(
                f"{_describe(instance)}: cannot match its {len(values)} widget values to the subgraph inputs "
                f"{names}; using the values stored inside the subgraph"
            )
        return {}

    def resolve_input(self, graph: _Graph, node: dict, entry: dict, want_type, visited: set) -> tuple | None:
        """Where a node input gets its data: ("link", exec_id, slot), ("value", v) or None (nothing connected)."""
        link_id = entry.get("link")
        if link_id is None:
            return None
        key = (graph.path, str(node["id"]), "I", entry.get("name"))
        if key in visited:
            raise WorkflowFormatError(f"{_describe(node)}: circular link while resolving input '{entry.get('name')}'")
        visited.add(key)
        link = graph.links.get(str(link_id))
        if link is None:
            raise WorkflowFormatError(
                f"{_describe(node)}: input '{entry.get('name')}' refers to link {link_id}, which is not in the "
                f"workflow's links"
            )
        want_type = want_type if want_type is not None else entry.get("type")
        if graph.instance is not None and link.origin_id == str(SUBGRAPH_INPUT_NODE):
            return self._resolve_subgraph_input(graph, link, want_type, visited)
        origin = graph.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowFormatError(
                f"{_describe(node)}: input '{entry.get('name')}' is linked from node {link.origin_id}, which is "
                f"not in the workflow"
            )
        return self.resolve_output(graph, origin, link.origin_slot, want_type, visited)

    def _resolve_subgraph_input(self, graph: _Graph, link: _Link, want_type, visited: set) -> tuple | None:
        sg_inputs = graph.definition.get("inputs") or []
        if not 0 <= link.origin_slot < len(sg_inputs):
            raise WorkflowFormatError(
                f"{_describe(graph.instance)}: subgraph link {link.id} uses input slot {link.origin_slot}, but the "
                f"subgraph has {len(sg_inputs)} inputs"
            )
        name = sg_inputs[link.origin_slot].get("name")
        outer = next((i for i in graph.instance.get("inputs") or [] if i.get("name") == name), None)
        if outer is not None and outer.get("link") is not None:
            return self.resolve_input(graph.parent, graph.instance, outer, want_type, visited)
        if name in graph.promoted:
            return ("value", graph.promoted[name])
        return None

    def resolve_output(self, graph: _Graph, node: dict, slot: int, want_type, visited: set) -> tuple | None:
        key = (graph.path, str(node["id"]), "O", slot)
        if key in visited:
            raise WorkflowFormatError(f"{_describe(node)}: circular link through output {slot}")
        visited.add(key)
        node_type = node["type"]
        inputs = node.get("inputs") or []
        if graph.mode(node) == MODE_BYPASS:
            index = _bypass_input_index(node, slot, want_type)
            if index < 0:
                self.warnings.append(
                    f"{_describe(node)} is bypassed and has no input of type {want_type!r} to pass to output {slot}; "
                    f"the consumer gets nothing"
                )
                return None
            return self.resolve_input(graph, node, inputs[index], None, visited)
        if node_type in self.subgraphs:
            return self._resolve_subgraph_output(graph, node, slot, want_type, visited)
        if node_type == REROUTE_NODE:
            return self.resolve_input(graph, node, inputs[0], want_type, visited) if inputs else None
        if node_type == PRIMITIVE_NODE:
            values = node.get("widgets_values")
            if isinstance(values, dict):
                values = list(values.values())
            if not values:
                raise WorkflowFormatError(f"{_describe(node)}: PrimitiveNode has no widgets_values to pass on")
            return ("value", values[0])
        if node_type in NOTE_NODES:
            return None
        return ("link", graph.exec_id(node), slot)

    def _resolve_subgraph_output(self, graph: _Graph, node: dict, slot: int, want_type, visited: set):
        child = graph.children[str(node["id"])]
        sg_outputs = child.definition.get("outputs") or []
        if not 0 <= slot < len(sg_outputs):
            raise WorkflowFormatError(f"{_describe(node)}: no subgraph output {slot}")
        for link_id in sg_outputs[slot].get("linkIds") or []:
            link = child.links.get(str(link_id))
            if link is None:
                continue
            inner = child.nodes.get(link.origin_id)
            if inner is None:
                raise WorkflowFormatError(f"{_describe(node)}: subgraph output {slot} comes from missing node "
                                          f"{link.origin_id}")
            return self.resolve_output(child, inner, link.origin_slot, want_type, visited)
        return None

    # -- emission
    def emit(self, graph: _Graph) -> None:
        for node in graph.nodes.values():
            node_type = node["type"]
            if node_type in self.subgraphs:
                self.emit(graph.children[str(node["id"])])
                continue
            if node_type in FRONTEND_ONLY_NODES or graph.mode(node) in (MODE_NEVER, MODE_BYPASS):
                continue
            if node_type not in self.node_classes:
                self._unknown(node)
                continue
            self.output[graph.exec_id(node)] = self._api_node(graph, node)

    def _unknown(self, node: dict) -> None:
        node_type = node["type"]
        if node_type in self.group_nodes or node_type.startswith(("workflow>", "workflow/")):
            raise WorkflowFormatError(
                f"{_describe(node)} is a legacy group node, which is not supported; in ComfyUI, right-click it and "
                f"choose 'Convert to nodes' (or convert it to a subgraph), then save the workflow again"
            )
        connected = any(i.get("link") is not None for i in node.get("inputs") or []) or any(
            o.get("links") for o in node.get("outputs") or []
        )
        if connected:
            self.unknown.append(_describe(node))
        else:
            self.warnings.append(f"{_describe(node)}: unknown node type without connections, skipped")

    def _api_node(self, graph: _Graph, node: dict) -> dict:
        specs = self.specs(node["type"])
        inputs = map_widget_values(node, specs, self.warnings)
        for entry in node.get("inputs") or []:
            name = entry.get("name")
            if not name or entry.get("link") is None:
                continue
            resolved = self.resolve_input(graph, node, entry, None, set())
            if resolved is None:
                continue  # nothing reaches this input: the widget value (if any) stays, as in the frontend
            if resolved[0] == "value":
                inputs[name] = _wrap(resolved[1])
            else:
                inputs[name] = [resolved[1], resolved[2]]
        # the frontend's title: the node's own, else the node type's display name
        title = node.get("title") or self.display_names.get(node["type"]) or node["type"]
        return {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}


def _valid_connection(a, b) -> bool:
    """LiteGraph's type compatibility: '*'/'' match anything; comma lists match if any member matches."""
    a = "" if a in (None, "*", 0) else str(a)
    b = "" if b in (None, "*", 0) else str(b)
    if not a or not b or a == b:
        return True
    a, b = a.lower(), b.lower()
    if "," not in a and "," not in b:
        return a == b
    return any(x == y for x in a.split(",") for y in b.split(","))


def _bypass_input_index(node: dict, slot: int, want_type) -> int:
    """The input a bypassed node passes to output `slot` (same rules as the frontend)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type") if slot < len(outputs) else None
    if want_type in (None, "", "*"):
        return slot if slot < len(inputs) else (0 if inputs else -1)
    if slot < len(inputs):
        same = inputs[slot].get("type")
        if _valid_connection(same, output_type) and _valid_connection(same, want_type):
            return slot
    for i, entry in enumerate(inputs):
        if entry.get("type") == want_type:
            return i
    for i, entry in enumerate(inputs):
        if _valid_connection(entry.get("type"), output_type) and _valid_connection(entry.get("type"), want_type):
            return i
    return -1


# ---------------------------------------------------------------------------------------------------------------
# Public API


def is_api_format(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def ui_to_api(workflow: dict, node_classes: dict, *, warnings: list[str] | None = None,
              display_names: dict | None = None) -> dict:
    """Convert a workflow saved by the ComfyUI frontend into an API prompt {id: {class_type, inputs, _meta}}.

    `node_classes` maps node type -> class (e.g. ComfyUI's `nodes.NODE_CLASS_MAPPINGS`). Conversion problems the
    frontend would silently paper over are appended to `warnings`; real errors raise WorkflowFormatError.
    `display_names` (node type -> display name, e.g. `nodes.NODE_DISPLAY_NAME_MAPPINGS`) gives untitled nodes the
    `_meta.title` the frontend's Export (API) gives them (default: the node type).
    """
    if warnings is None:
        warnings = []
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if not is_ui_format(workflow):
        raise WorkflowFormatError("not a ComfyUI workflow: expected a UI-format file (with 'nodes' and 'links') "
                                  "or an API prompt ({id: {class_type, inputs}})")
    workflow = json.loads(json.dumps(workflow))  # never touch the caller's dict
    converter = _Converter(workflow, node_classes, warnings, display_names)
    root = _Graph(nodes=_index_nodes(workflow["nodes"], "workflow"), links=_parse_links(workflow.get("links"), "workflow"))
    for node in root.nodes.values():
        node["_exec_id"] = root.exec_id(node)
    converter.expand(root)
    converter.emit(root)
    if converter.unknown:
        raise WorkflowFormatError(
            "unknown node type(s), is a custom node pack missing?: " + "; ".join(converter.unknown)
        )
    output = converter.output
    warnings[:] = list(dict.fromkeys(warnings))  # the same bypass can be reached from several consumers
    # Inputs linked to nodes that are not in the prompt (muted) are dropped, as the frontend does; the backend then
    # reports the missing required inputs.
    for node in output.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                del node["inputs"][name]
    return output


def load_workflow_file(path) -> dict:
    """Read a workflow: UI or API JSON, an API request body ({"prompt": ...}) or a PNG ComfyUI saved."""
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() in (".png", ".webp"):
        from PIL import Image

        with Image.open(path) as image:
            info = dict(image.info)
        for key in ("prompt", "workflow"):
            if key in info:
                return json.loads(info[key])
        raise WorkflowFormatError(f"{path} holds no ComfyUI workflow metadata")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]
    return data
