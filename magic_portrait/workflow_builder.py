"""Build UI-format workflow JSON (what the ComfyUI frontend saves) from node schemas, so example workflows
always match the nodes' current inputs and widget order. Needs a booted ComfyUI (comfy_env.boot). Which inputs
have widgets and which entries widgets_values holds come from magic_portrait.workflow, the reader's own model
(checked against workflows saved by the real frontend, tests/fixtures/frontend/).

Layout: nodes go into columns (``Workflow.column`` or ``column=``) in the order they are made; at ``to_json`` each
column is as wide as its widest node and nodes are stacked with their title bars and a gap, so nothing overlaps.
Sizes are estimated the way the frontend sizes nodes (title, slot rows, one row per widget, taller multiline text
and image previews). ``note`` adds a Note node; ``group`` frames whole columns under a title."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import migrations
from .workflow import WorkflowFormatError, input_specs, new_widget_values, widget_layout

# The frontend's geometry (LiteGraph, measured in ComfyUI's frontend 1.35): the title bar sits above a node's pos;
# on load a node is grown to computeSize() = 20 per slot row (at least 1) + (each widget's height + 4, + 8 when there
# are widgets) + 6, where a widget is 20 high, a multiline text 50 and an image preview 220; its width is at least
# 210 with widgets, the title's width + 40 and the longest widget label + 104.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
MULTILINE_HEIGHT = 50
IMAGE_PREVIEW_HEIGHT = 220
WIDGET_GAP = 4
TITLE_CHAR_WIDTH = 8.3  # 14 px Inter, measured
WIDGET_LABEL_CHAR_WIDTH = 7.0
NODE_WIDTH = 320
COLUMN_GAP = 70
ROW_GAP = 30
GROUP_PADDING = 20
GROUP_TITLE_HEIGHT = 60  # the group's 34 px title bar plus room for a custom node's badge (drawn 22 px above it)
GROUP_TITLE_CHAR_WIDTH = 11.5  # 24 px group titles
ORIGIN = (60, 100)


def _output_types(cls) -> list[tuple[str, str]]:
    types = list(getattr(cls, "RETURN_TYPES", ()))
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types, strict=False))


@dataclass
class NodeRef:
    id: int
    type: str
    data: dict = field(repr=False)

    def out(self, name_or_index) -> tuple[NodeRef, int]:
        if isinstance(name_or_index, int):
            return self, name_or_index
        for index, output in enumerate(self.data["outputs"]):
            if output["name"] == name_or_index:
                return self, index
        raise KeyError(f"{self.type} has no output {name_or_index!r}")


class Workflow:
    def __init__(self, node_classes: dict):
        self.classes = node_classes
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.column = 0
        self.columns: dict[int, int] = {}  # node id -> column
        self.groups: list[dict] = []

    def node(self, node_type: str, title: str | None = None, column: int | None = None, **widgets) -> NodeRef:
        cls = self.classes[node_type]
        specs = input_specs(cls)
        layout = widget_layout(specs)
        # widgets_values as the frontend saves a new node: the reader's own layout (workflow.py), one widget model
        try:
            values = new_widget_values(specs, widgets, node_type)
        except WorkflowFormatError as err:
            raise ValueError(str(err)) from None
        inputs = [{"name": spec.name, "type": spec.type, "widget": {"name": spec.name}, "link": None}
                  if spec.has_widget else {"name": spec.name, "type": spec.type, "link": None} for spec in specs]
        node_id = len(self.nodes) + 1
        col = self.column if column is None else column
        widget_heights = []
        for slot in layout:
            if slot.kind == "value":
                widget_heights.append(MULTILINE_HEIGHT if slot.input.options.get("multiline") else WIDGET_HEIGHT)
            elif slot.kind == "control":  # the control_after_generate combo (its filter entry is not drawn)
                widget_heights.append(WIDGET_HEIGHT)
            elif slot.kind == "upload":
                widget_heights += [WIDGET_HEIGHT, IMAGE_PREVIEW_HEIGHT]  # upload button, then the preview
        rows = max(1, sum(1 for i in inputs if "widget" not in i), len(_output_types(cls)))
        height = rows * SLOT_HEIGHT + 6
        if widget_heights:
            height += sum(h + WIDGET_GAP for h in widget_heights) + 8
        shown = title or _display_name(node_type)
        labels = [len(slot.input.name) for slot in layout if slot.kind == "value"]
        width = max(NODE_WIDTH, round(TITLE_CHAR_WIDTH * len(shown) + 60),
                    round(WIDGET_LABEL_CHAR_WIDTH * max(labels, default=0) + 140))
        data = {
            "id": node_id,
            "type": node_type,
            "pos": [0, 0],  # placed by to_json()
            "size": [width, height],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(_output_types(cls))],
            "properties": {"Node name for S&R": node_type, **migrations.current_properties(node_type)},
            "widgets_values": values,
        }
        if title:
            data["title"] = title
        self.nodes.append(data)
        self.columns[node_id] = col
        return NodeRef(node_id, node_type, data)

    def note(self, text: str, title: str = "Note", column: int | None = None, width: int = 2 * NODE_WIDTH) -> NodeRef:
        """A Note node (frontend only: never executed) holding `text`."""
        node_id = len(self.nodes) + 1
        chars_per_line = max(20, width // 8)
        lines = sum(max(1, -(-len(line) // chars_per_line)) for line in text.splitlines() or [""])
        data = {"id": node_id, "type": "Note", "pos": [0, 0], "size": [width, max(88, 20 * lines + 40)], "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "title": title,
                "properties": {"text": ""}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(data)
        self.columns[node_id] = self.column if column is None else column
        return NodeRef(node_id, "Note", data)

    def group(self, title: str, columns, color: str = "#3f789e") -> None:
        """Frame every node of these columns under `title` (placed by to_json)."""
        self.groups.append({"title": title, "columns": sorted(set(columns)), "color": color})

    def group_columns(self, *titles: str, start: int = 0) -> None:
        """One group per column, left to right from column `start`: the i-th title frames column start + i."""
        for column, title in enumerate(titles, start):
            self.group(title, [column])

    def layout(self) -> None:
        """Columns left to right, each as wide as its widest node (and wide enough for the title of a group framing
        it alone, or its share of a wider group's title); nodes stacked in the order they were made."""
        by_column: dict[int, list[dict]] = {}
        for data in self.nodes:
            by_column.setdefault(self.columns[data["id"]], []).append(data)
        widths = {col: max(n["size"][0] for n in members) for col, members in by_column.items()}
        for group in self.groups:
            cols = [c for c in group["columns"] if c in widths]
            need = GROUP_TITLE_CHAR_WIDTH * len(group["title"]) + 20 - 2 * GROUP_PADDING
            have = sum(widths[c] for c in cols) + COLUMN_GAP * (len(cols) - 1)
            if cols and need > have:
                widths[cols[-1]] += round(need - have)
        x = ORIGIN[0]
        for col in sorted(by_column):
            y = ORIGIN[1] + GROUP_TITLE_HEIGHT + TITLE_HEIGHT
            for data in by_column[col]:
                data["pos"] = [x, y]
                y += data["size"][1] + TITLE_HEIGHT + ROW_GAP
            x += widths[col] + COLUMN_GAP

    def _group_json(self, group: dict) -> dict:
        members = [n for n in self.nodes if self.columns[n["id"]] in group["columns"]]
        if not members:
            raise ValueError(f"group {group['title']!r} frames columns {group['columns']} that hold no node")
        left = min(n["pos"][0] for n in members) - GROUP_PADDING
        top = min(n["pos"][1] for n in members) - TITLE_HEIGHT - GROUP_TITLE_HEIGHT
        right = max(n["pos"][0] + n["size"][0] for n in members) + GROUP_PADDING
        right = max(right, round(left + GROUP_TITLE_CHAR_WIDTH * len(group["title"]) + 20))
        bottom = max(n["pos"][1] + n["size"][1] for n in members) + GROUP_PADDING
        return {"title": group["title"], "bounding": [left, top, right - left, bottom - top], "color": group["color"],
                "font_size": 24, "flags": {}}

    def connect(self, source: tuple[NodeRef, int] | NodeRef, target: NodeRef, input_name: str) -> None:
        src, slot = source if isinstance(source, tuple) else (source, 0)
        link_id = len(self.links) + 1
        for index, entry in enumerate(target.data["inputs"]):
            if entry["name"] == input_name:
                entry["link"] = link_id
                link_type = src.data["outputs"][slot]["type"]
                self.links.append([link_id, src.id, slot, target.id, index, link_type])
                src.data["outputs"][slot]["links"].append(link_id)
                return
        raise KeyError(f"{target.type} has no input {input_name!r}")

    def encode_text(self, clip: tuple[NodeRef, int], text: str, title: str | None = None) -> NodeRef:
        """A CLIPTextEncode of `text` with `clip`."""
        node = self.node("CLIPTextEncode", text=text, title=title)
        self.connect(clip, node, "clip")
        return node

    def encode_image(self, image: tuple[NodeRef, int], vae: tuple[NodeRef, int], title: str | None = None) -> NodeRef:
        """A VAEEncode of `image` with `vae`."""
        node = self.node("VAEEncode", title=title)
        self.connect(image, node, "pixels")
        self.connect(vae, node, "vae")
        return node

    def sample(self, model: tuple[NodeRef, int], positive: tuple[NodeRef, int], negative: tuple[NodeRef, int],
               width: int, height: int, **sampler) -> NodeRef:
        """An EmptyLatentImage of width x height and a KSampler (widgets `sampler`) on model/positive/negative;
        returns the sampler."""
        empty = self.node("EmptyLatentImage", width=width, height=height, batch_size=1)
        node = self.node("KSampler", **sampler)
        self.connect(model, node, "model")
        self.connect(positive, node, "positive")
        self.connect(negative, node, "negative")
        self.connect(empty.out(0), node, "latent_image")
        return node

    def decode_and_save(self, latent: tuple[NodeRef, int] | NodeRef, vae: tuple[NodeRef, int], prefix: str) -> NodeRef:
        """VAEDecode the latent and SaveImage it under `prefix`; returns the save node."""
        decode = self.node("VAEDecode")
        self.connect(latent, decode, "samples")
        self.connect(vae, decode, "vae")
        save = self.node("SaveImage", filename_prefix=prefix)
        self.connect(decode.out(0), save, "images")
        return save

    def to_json(self) -> dict:
        self.layout()
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [self._group_json(g) for g in self.groups],
            "config": {},
            "extra": {},
            "version": 0.4,
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _display_name(node_type: str) -> str:
    """The title the frontend shows for a node without one of its own."""
    import nodes

    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type) or node_type
