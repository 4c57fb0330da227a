"""Build UI-format workflow JSON (what the ComfyUI frontend saves) from node schemas, so example workflows
always match the nodes' current inputs and widget order. Needs a booted ComfyUI (comfy_env.boot)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


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

    def node(self, node_type: str, title: str | None = None, column: int | None = None, **widgets) -> NodeRef:
        cls = self.classes[node_type]
        spec = cls.INPUT_TYPES()
        inputs, values, trailing = [], [], []
        all_inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, input_spec in all_inputs.items():
            options = input_spec[1] if len(input_spec) > 1 else {}
            if _is_widget(input_spec):
                if name in widgets:
                    value = widgets.pop(name)
                elif "default" in options:
                    value = options["default"]
                elif isinstance(input_spec[0], list) and input_spec[0]:
                    value = input_spec[0][0]
                elif input_spec[0] == "COMBO":
                    value = options["options"][0]
                else:
                    raise ValueError(f"{node_type}: widget {name!r} has no default; give a value")
                values.append(value)
                # the frontend's extra widget values: a seed control after the value (also for INTs named
                # seed/noise_seed), a filter string after a controlled COMBO, the upload button after all inputs
                control = options.get("control_after_generate")
                if control or (control is None and input_spec[0] == "INT" and name in ("seed", "noise_seed")):
                    values.append("fixed")
                    if _socket_type(input_spec) == "COMBO":
                        values.append("")
                if options.get("image_upload"):
                    trailing.append("image")
                inputs.append({"name": name, "type": _socket_type(input_spec), "widget": {"name": name},
                               "link": None})
            else:
                inputs.append({"name": name, "type": input_spec[0], "link": None})
        if widgets:
            raise ValueError(f"{node_type}: unknown widgets {sorted(widgets)}")
        values.extend(trailing)
        node_id = len(self.nodes) + 1
        col = self.column if column is None else column
        row = sum(1 for n in self.nodes if n["pos"][0] == 60 + 360 * col)
        data = {
            "id": node_id,
            "type": node_type,
            "pos": [60 + 360 * col, 60 + 260 * row],
            "size": [320, 200],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(_output_types(cls))],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
        }
        if title:
            data["title"] = title
        self.nodes.append(data)
        return NodeRef(node_id, node_type, data)

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

    def decode_and_save(self, latent: tuple[NodeRef, int] | NodeRef, vae: tuple[NodeRef, int], prefix: str) -> NodeRef:
        """VAEDecode the latent and SaveImage it under `prefix`; returns the save node."""
        decode = self.node("VAEDecode")
        self.connect(latent, decode, "samples")
        self.connect(vae, decode, "vae")
        save = self.node("SaveImage", filename_prefix=prefix)
        self.connect(decode.out(0), save, "images")
        return save

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {},
            "version": 0.4,
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _socket_type(input_spec) -> str:
    return "COMBO" if isinstance(input_spec[0], list) else input_spec[0]
