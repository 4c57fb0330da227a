"""The headless runner: UI-format -> API conversion (core tier, fake node definitions) and real runs through
ComfyUI's validation and executor (ComfyUI tier), including the `python -m magic_portrait run` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magic_portrait import workflow as wf
from magic_portrait.input_staging import contained_path
from magic_portrait.model_files import model_folder_for
from magic_portrait.run_errors import UnsafePathError, UsageError
from magic_portrait.workflow_loading import apply_sets, coerce_value, parse_set

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# UI-format helpers: nodes and links written the way the frontend saves them


def node(node_id, node_type, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    data = {
        "id": node_id,
        "type": node_type,
        "pos": [0, 0],
        "size": [300, 100],
        "flags": {},
        "order": 0,
        "mode": mode,
        "inputs": [dict(i) for i in inputs],
        "outputs": [dict(o) for o in outputs],
        "properties": {"Node name for S&R": node_type},
        "widgets_values": widgets,
    }
    if title:
        data["title"] = title
    return data


def inp(name, io_type, link=None, widget=False):
    entry = {"name": name, "type": io_type, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def out(name, io_type, links=()):
    return {"name": name, "type": io_type, "links": list(links)}


def ui(nodes, links, **extra):
    link_ids = [lk["id"] if isinstance(lk, dict) else lk[0] for lk in links]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max(link_ids or [0]),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4, **extra}


# ---------------------------------------------------------------------------------------------------------------
# Fake node definitions (plain classes with INPUT_TYPES, as V1 nodes and V3 nodes expose them)


class Loader:
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"],)}}


class Sampler:
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "control_after_generate": True}),
                "steps": ("INT", {"default": 20}),
                "cfg": ("FLOAT", {"default": 8.0}),
                "sampler_name": (["euler", "ddim"],),
                "latent": ("LATENT",),
            },
            "optional": {"denoise": ("FLOAT", {"default": 1.0})},
        }


class Noise:  # seed-named INT without the flag: the frontend still adds a control widget
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {"default": 0}), "scale": ("FLOAT", {"default": 1.0})}}


class Text:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["x.png", "y.png"], {"image_upload": True}), "mode": (["RGB", "L"],)}}


class ImageOp:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "strength": ("FLOAT", {"default": 1.0})}}


class Save:
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "out"})}}


class IntNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}


class ForceInput:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"forceInput": True}), "scale": ("FLOAT", {"default": 1.0})}}


class ComboControl:  # V3-style COMBO with control_after_generate: control value + filter string follow it
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"style": ("COMBO", {"options": ["a", "b"], "control_after_generate": True}),
                             "weight": ("FLOAT", {"default": 0.5})}}


class Resize:  # V3 DynamicCombo: the chosen option's widgets follow the combo, named "<combo>.<input>"
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "mode": ("COMFY_DYNAMICCOMBO_V3", {"options": [
                {"key": "scale", "inputs": {"required": {"factor": ("FLOAT", {"default": 1.0})}}},
                {"key": "size", "inputs": {"required": {"width": ("INT", {"default": 512}),
                                                        "height": ("INT", {"default": 512})}}},
            ]}),
            "method": (["area", "bicubic"],),
        }}


class NoDefault:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {}), "count": ("INT", {})}}


CLASSES = {
    "Loader": Loader, "Sampler": Sampler, "Noise": Noise, "Text": Text, "LoadImage": LoadImage, "ImageOp": ImageOp,
    "Save": Save, "IntNode": IntNode, "ForceInput": ForceInput, "ComboControl": ComboControl, "Resize": Resize,
    "NoDefault": NoDefault,
}


def sampler_graph(sampler_widgets, **sampler_kwargs):
    return ui(
        [
            node(1, "Loader", ["b.safetensors"], outputs=[out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [])]),
            node(2, "Sampler", sampler_widgets,
                 inputs=[inp("model", "MODEL", 1), inp("latent", "LATENT")], outputs=[out("LATENT", "LATENT")],
                 **sampler_kwargs),
        ],
        [[1, 1, 0, 2, 0, "MODEL"]],
    )


# ---------------------------------------------------------------------------------------------------------------
# Core tier: conversion


def test_widgets_map_in_definition_order_and_seed_control_is_skipped():
    api = wf.ui_to_api(sampler_graph([7, "randomize", 3, 5.5, "ddim", 0.5]), CLASSES)
    assert api["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"},
                        "_meta": {"title": "Loader"}}
    assert api["2"]["inputs"] == {"seed": 7, "steps": 3, "cfg": 5.5, "sampler_name": "ddim", "denoise": 0.5,
                                  "model": ["1", 0]}


def test_control_value_follows_seed_named_ints_and_may_be_absent():
    graph = ui([node(1, "Noise", [42, "fixed", 0.25])], [])
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"noise_seed": 42, "scale": 0.25}
    graph = ui([node(1, "Noise", [42, 0.25])], [])  # hand-written file without the control value
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"noise_seed": 42, "scale": 0.25}
    api = wf.ui_to_api(sampler_graph([7, 3, 5.5, "ddim", 0.5]), CLASSES)
    assert api["2"]["inputs"]["steps"] == 3 and api["2"]["inputs"]["denoise"] == 0.5


def test_combo_with_control_after_generate_skips_control_and_filter():
    graph = ui([node(1, "ComboControl", ["b", "increment", "", 0.75])], [])
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"style": "b", "weight": 0.75}


def test_load_image_upload_button_value_is_dropped():
    graph = ui([node(1, "LoadImage", ["y.png", "L", "image"], outputs=[out("IMAGE", "IMAGE")])], [])
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"image": "y.png", "mode": "L"}


def test_primitive_node_feeds_every_target_widget():
    graph = ui(
        [
            node(1, "Loader", ["a.safetensors"], outputs=[out("MODEL", "MODEL", [1])]),
            node(2, "Sampler", [1, "randomize", 20, 8.0, "euler", 1.0],
                 inputs=[inp("model", "MODEL", 1), inp("latent", "LATENT"), inp("seed", "INT", 5, widget=True)]),
            node(3, "Noise", [9, "fixed", 1.0], inputs=[inp("noise_seed", "INT", 6, widget=True)]),
            node(4, "PrimitiveNode", [1234, "fixed"],
                 outputs=[{"name": "INT", "type": "INT", "links": [5, 6], "widget": {"name": "seed"}}]),
        ],
        [[1, 1, 0, 2, 0, "MODEL"], [5, 4, 0, 2, 2, "INT"], [6, 4, 0, 3, 0, "INT"]],
    )
    api = wf.ui_to_api(graph, CLASSES)
    assert "4" not in api  # frontend-only
    assert api["2"]["inputs"]["seed"] == 1234
    assert api["3"]["inputs"]["noise_seed"] == 1234


def test_chained_reroutes_resolve_to_the_origin():
    graph = ui(
        [
            node(1, "Loader", ["a.safetensors"], outputs=[out("MODEL", "MODEL", [1])]),
            node(5, "Reroute", None, inputs=[inp("", "*", 1)], outputs=[out("", "MODEL", [2])]),
            node(6, "Reroute", None, inputs=[inp("", "*", 2)], outputs=[out("", "MODEL", [3])]),
            node(2, "Sampler", [1, "fixed", 20, 8.0, "euler", 1.0],
                 inputs=[inp("model", "MODEL", 3), inp("latent", "LATENT")]),
            node(7, "Reroute", None, inputs=[inp("", "*")], outputs=[out("", "*", [])]),  # dangling
        ],
        [[1, 1, 0, 5, 0, "MODEL"], [2, 5, 0, 6, 0, "*"], [3, 6, 0, 2, 0, "MODEL"]],
    )
    api = wf.ui_to_api(graph, CLASSES)
    assert set(api) == {"1", "2"}
    assert api["2"]["inputs"]["model"] == ["1", 0]


def image_chain(op_mode, save_mode=0, save_input_type="IMAGE"):
    return ui(
        [
            node(1, "LoadImage", ["x.png", "RGB", "image"], outputs=[out("IMAGE", "IMAGE", [1]), out("MASK", "MASK")]),
            node(2, "ImageOp", [0.3], inputs=[inp("image", "IMAGE", 1)], outputs=[out("IMAGE", "IMAGE", [2])],
                 mode=op_mode),
            node(3, "Save", ["result"], inputs=[inp("images", save_input_type, 2)], mode=save_mode),
        ],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    )


def test_bypassed_node_passes_its_first_matching_input_through():
    api = wf.ui_to_api(image_chain(op_mode=4), CLASSES)
    assert "2" not in api
    assert api["3"]["inputs"]["images"] == ["1", 0]


def test_bypass_without_a_matching_input_leaves_the_input_unconnected_with_a_warning():
    graph = image_chain(op_mode=4)
    graph["nodes"][1]["inputs"][0]["type"] = "LATENT"  # nothing of type IMAGE to pass through
    warnings = []
    api = wf.ui_to_api(graph, CLASSES, warnings=warnings)
    assert "images" not in api["3"]["inputs"]
    assert any("node 2 (ImageOp) is bypassed" in w for w in warnings)


def test_muted_node_is_removed_and_its_consumers_lose_the_input():
    api = wf.ui_to_api(image_chain(op_mode=2), CLASSES)
    assert "2" not in api
    assert api["3"]["inputs"] == {"filename_prefix": "result"}  # the backend then reports the missing input
    api = wf.ui_to_api(image_chain(op_mode=0, save_mode=2), CLASSES)
    assert set(api) == {"1", "2"}


def test_notes_are_ignored():
    graph = image_chain(op_mode=0)
    graph["nodes"] += [node(8, "Note", ["hello"]), node(9, "MarkdownNote", ["# hi"])]
    assert set(wf.ui_to_api(graph, CLASSES)) == {"1", "2", "3"}


def test_converted_widget_fed_by_a_link_uses_the_link():
    graph = ui(
        [
            node(1, "Loader", ["a.safetensors"], outputs=[out("MODEL", "MODEL", [1])]),
            node(3, "IntNode", [5], outputs=[out("INT", "INT", [4])]),
            node(2, "Sampler", [1, "fixed", 20, 8.0, "euler", 1.0],
                 inputs=[inp("model", "MODEL", 1), inp("latent", "LATENT"), inp("seed", "INT", None, widget=True),
                         inp("steps", "INT", 4, widget=True)]),
        ],
        [[1, 1, 0, 2, 0, "MODEL"], [4, 3, 0, 2, 3, "INT"]],
    )
    api = wf.ui_to_api(graph, CLASSES)
    assert api["2"]["inputs"]["steps"] == ["3", 0]
    assert api["2"]["inputs"]["seed"] == 1


def test_link_objects_titles_and_list_values():
    graph = ui([node(1, "Text", ["hi"], inputs=[inp("clip", "CLIP", 9)], title="Positive"),
                node(2, "Loader", ["a.safetensors"], outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP", [9])]),
                node(3, "NoDefault", [["a", "b"], 3])],
               [{"id": 9, "origin_id": 2, "origin_slot": 1, "target_id": 1, "target_slot": 0, "type": "CLIP"}])
    api = wf.ui_to_api(graph, CLASSES)
    assert api["1"]["inputs"] == {"text": "hi", "clip": ["2", 1]}
    assert api["1"]["_meta"]["title"] == "Positive"
    assert api["3"]["inputs"]["text"] == {"__value__": ["a", "b"]}  # a list value, not a link


def test_legacy_force_input_dummy_values_are_dropped():
    graph = ui([node(1, "ForceInput", [0, 2.5], inputs=[inp("count", "INT", None)])], [])  # frontend < 1.16
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"scale": 2.5}
    graph = ui([node(1, "ForceInput", [2.5], inputs=[inp("count", "INT", None)])], [])
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {"scale": 2.5}


def test_dynamic_combo_widgets_follow_the_combo():
    graph = ui([node(1, "Resize", ["size", 640, 480, "bicubic"], inputs=[inp("image", "IMAGE")])], [])
    assert wf.ui_to_api(graph, CLASSES)["1"]["inputs"] == {
        "mode": "size", "mode.width": 640, "mode.height": 480, "method": "bicubic"}


def test_missing_widget_values_use_defaults_or_fail_naming_the_node():
    warnings = []
    api = wf.ui_to_api(sampler_graph([7, "fixed", 3]), CLASSES, warnings=warnings)
    assert api["2"]["inputs"]["cfg"] == 8.0 and api["2"]["inputs"]["sampler_name"] == "euler"
    assert any("node 2 (Sampler)" in w and "'cfg'" in w for w in warnings)
    graph = ui([node(4, "NoDefault", None, title="Counter")], [])
    with pytest.raises(wf.WorkflowFormatError, match=r"node 4 \(NoDefault 'Counter'\).*'text', 'count'"):
        wf.ui_to_api(graph, CLASSES)


def test_unknown_and_group_nodes_are_clear_errors():
    graph = image_chain(op_mode=0)
    graph["nodes"][1]["type"] = "FancyOp"
    with pytest.raises(wf.WorkflowFormatError, match=r"node 2 \(FancyOp\)"):
        wf.ui_to_api(graph, CLASSES)
    graph = image_chain(op_mode=0)
    graph["nodes"].append(node(12, "Label (rgthree)", ["just a label"]))
    warnings = []
    assert set(wf.ui_to_api(graph, CLASSES, warnings=warnings)) == {"1", "2", "3"}
    assert any("node 12" in w for w in warnings)
    graph = image_chain(op_mode=0)
    graph["nodes"][1]["type"] = "workflow>MyGroup"
    graph["extra"]["groupNodes"] = {"MyGroup": {}}
    with pytest.raises(wf.WorkflowFormatError, match="group node"):
        wf.ui_to_api(graph, CLASSES)


def test_broken_links_are_errors_naming_the_node():
    graph = image_chain(op_mode=0)
    graph["links"] = graph["links"][:1]
    with pytest.raises(wf.WorkflowFormatError, match=r"node 3 \(Save\).*link 2"):
        wf.ui_to_api(graph, CLASSES)
    with pytest.raises(wf.WorkflowFormatError, match="not a ComfyUI workflow"):
        wf.ui_to_api({"foo": 1}, CLASSES)


def test_subgraph_instance_expands_with_promoted_widgets():
    subgraph = {
        "id": "8d5e0f4c-0000-4000-8000-000000000001",
        "name": "Sharpen",
        "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "image", "type": "IMAGE", "linkIds": [1]},
                   {"name": "strength", "type": "FLOAT", "linkIds": [2]}],
        "outputs": [{"name": "IMAGE", "type": "IMAGE", "linkIds": [3]}],
        "nodes": [node(7, "ImageOp", [0.1], inputs=[inp("image", "IMAGE", 1), inp("strength", "FLOAT", 2, widget=True)],
                       outputs=[out("IMAGE", "IMAGE", [3])])],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 7, "target_slot": 0, "type": "IMAGE"},
                  {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 7, "target_slot": 1, "type": "FLOAT"},
                  {"id": 3, "origin_id": 7, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}],
    }
    instance = node(5, subgraph["id"], [0.8], inputs=[inp("image", "IMAGE", 1)], outputs=[out("IMAGE", "IMAGE", [2])])
    instance["properties"]["proxyWidgets"] = [["-1", "strength"]]
    graph = ui(
        [node(1, "LoadImage", ["x.png", "RGB", "image"], outputs=[out("IMAGE", "IMAGE", [1])]), instance,
         node(3, "Save", ["sub"], inputs=[inp("images", "IMAGE", 2)])],
        [[1, 1, 0, 5, 0, "IMAGE"], [2, 5, 0, 3, 0, "IMAGE"]],
        definitions={"subgraphs": [subgraph]},
    )
    api = wf.ui_to_api(graph, CLASSES)
    assert set(api) == {"1", "5:7", "3"}
    assert api["5:7"]["inputs"] == {"strength": 0.8, "image": ["1", 0]}
    assert api["3"]["inputs"]["images"] == ["5:7", 0]


def test_api_format_passes_through():
    prompt = {"1": {"class_type": "IntNode", "inputs": {"value": 3}}}
    assert wf.ui_to_api(prompt, CLASSES) == prompt
    assert wf.is_api_format(prompt) and not wf.is_ui_format(prompt)


# ---------------------------------------------------------------------------------------------------------------
# Core tier: --set and model folders


def sets_prompt():
    return wf.ui_to_api(
        ui([node(1, "Loader", ["a.safetensors"], outputs=[out("MODEL", "MODEL", [1])]),
            node(2, "Sampler", [1, "fixed", 20, 8.0, "euler", 1.0], title="Main sampler",
                 inputs=[inp("model", "MODEL", 1), inp("latent", "LATENT")]),
            node(3, "Text", ["old"], inputs=[inp("clip", "CLIP")], title="v1.5 prompt")],
           [[1, 1, 0, 2, 0, "MODEL"]]),
        CLASSES,
    )


def test_set_overrides_by_id_title_and_class_type():
    prompt = sets_prompt()
    applied = apply_sets(prompt, ["2.steps=4", "Main sampler.cfg=6.5", "Loader.ckpt_name=b.safetensors",
                                  "v1.5 prompt.text=42", "sampler.denoise=0.5"], CLASSES)
    assert [a[:2] for a in applied] == [("2", "steps"), ("2", "cfg"), ("1", "ckpt_name"), ("3", "text"),
                                        ("2", "denoise")]
    assert prompt["2"]["inputs"]["steps"] == 4 and prompt["2"]["inputs"]["cfg"] == 6.5
    assert prompt["1"]["inputs"]["ckpt_name"] == "b.safetensors"
    assert prompt["3"]["inputs"]["text"] == "42"  # STRING inputs keep the text as typed
    assert prompt["2"]["inputs"]["denoise"] == 0.5


def test_set_accepts_display_names():
    prompt = sets_prompt()
    apply_sets(prompt, ["Load Model.ckpt_name=b.safetensors"], CLASSES, {"Loader": "Load Model"})
    assert prompt["1"]["inputs"]["ckpt_name"] == "b.safetensors"


def test_set_errors_list_the_candidates():
    prompt = sets_prompt()
    with pytest.raises(UsageError, match=r"no node 'Nope'.*1 \(Loader\).*2 \(Sampler 'Main sampler'\)"):
        apply_sets(prompt, ["Nope.steps=3"], CLASSES)
    with pytest.raises(UsageError, match=r"node 2 \(Sampler\) has no input 'stepz'.*seed, steps, cfg"):
        apply_sets(prompt, ["2.stepz=3"], CLASSES)
    with pytest.raises(UsageError, match="NODE.INPUT=VALUE"):
        parse_set("steps=3")


def test_set_values_are_json_when_they_parse():
    assert coerce_value("3", None) == 3 and coerce_value("0.5", None) == 0.5
    assert coerce_value("true", None) is True and coerce_value("euler", None) == "euler"
    spec = wf.InputSpec("flag", "BOOLEAN", {}, True)
    assert coerce_value("False", spec) is False
    assert coerce_value('"7"', wf.InputSpec("text", "STRING", {}, True)) == "7"


def test_model_folder_from_option_list_table_or_input_name():
    lists = {"checkpoints": ["m.safetensors"], "loras": [], "vae": ["v.pt"], "controlnet": []}
    assert model_folder_for("CheckpointLoaderSimple", "ckpt_name", [], lists) == "checkpoints"
    assert model_folder_for("SomeLoader", "model", ["m.safetensors"], lists) == "checkpoints"
    assert model_folder_for("VAELoader2", "vae", ["v.pt", "taesd"], lists) == "vae"
    assert model_folder_for("MyLoader", "lora_name", [], lists) == "loras"
    assert model_folder_for("KSampler", "sampler_name", ["euler"], lists) is None
    assert model_folder_for("RepControlNetLoader", "repcontrolnet_name", [], {**lists, "magic_repcontrolnet": []}) \
        == "magic_repcontrolnet"
    assert model_folder_for("OpenAIImage", "model", ["gpt-image-1"], {**lists, "style_models": []}) is None


def test_contained_path_keeps_names_inside_their_folder(tmp_path):
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    assert contained_path(folder, "model.safetensors") == folder / "model.safetensors"
    assert contained_path(folder, "SD1.5/model.safetensors") == folder / "SD1.5" / "model.safetensors"
    for name, reason in (("../escape.safetensors", "'..'"), ("sub/../../escape.safetensors", "'..'"),
                         ("..\\escape.safetensors", "'..'"), (str(tmp_path / "abs.safetensors"), "absolute"),
                         ("C:\\models\\x.safetensors", "absolute"), ("", "empty"), (".", "empty")):
        with pytest.raises(UnsafePathError, match=reason) as err:
            contained_path(folder, name, "checkpoint")
        assert f"refusing to write checkpoint '{name}'" in str(err.value) and str(folder) in str(err.value)


def test_contained_path_refuses_symlinks_out_but_reuses_existing_files(tmp_path):
    folder, outside = tmp_path / "models", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / "shared").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="through a symlink"):
        contained_path(folder, "shared/new.safetensors")
    (folder / "dangling.safetensors").symlink_to(outside / "target.safetensors")  # writing it would write outside
    with pytest.raises(UnsafePathError, match="through a symlink"):
        contained_path(folder, "dangling.safetensors")
    (outside / "real.safetensors").write_bytes(b"weights")
    (folder / "linked.safetensors").symlink_to(outside / "real.safetensors")  # a user's shared model: reused
    assert contained_path(folder, "linked.safetensors") == folder.resolve() / "linked.safetensors"
    linked_folder = tmp_path / "linked_models"
    linked_folder.symlink_to(folder, target_is_directory=True)  # the folder itself may be a symlink
    assert contained_path(linked_folder, "x.safetensors") == folder.resolve() / "x.safetensors"
    assert not (outside / "target.safetensors").exists() and sorted(p.name for p in outside.iterdir()) == [
        "real.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI tier: real conversions and runs


def latent_workflow(prefix="latent_test", muted_extra=True):
    """EmptyLatentImage -> Reroute -> Reroute -> LatentUpscale -> SaveLatent, width fed by a PrimitiveNode, plus a
    Note, a muted SaveLatent and a bypassed LatentUpscaleBy on the way."""
    nodes = [
        node(1, "EmptyLatentImage", [512, 64, 1], inputs=[inp("width", "INT", 7, widget=True)],
             outputs=[out("LATENT", "LATENT", [1])]),
        node(2, "Reroute", None, inputs=[inp("", "*", 1)], outputs=[out("", "LATENT", [2])]),
        node(3, "Reroute", None, inputs=[inp("", "*", 2)], outputs=[out("", "LATENT", [3, 6])]),
        node(4, "LatentUpscaleBy", ["nearest-exact", 4.0], inputs=[inp("samples", "LATENT", 3)],
             outputs=[out("LATENT", "LATENT", [4])], mode=4),
        node(5, "LatentUpscale", ["nearest-exact", 96, 128, "disabled"], inputs=[inp("samples", "LATENT", 4)],
             outputs=[out("LATENT", "LATENT", [5])], title="Upscale"),
        node(6, "SaveLatent", [prefix], inputs=[inp("samples", "LATENT", 5)]),
        node(8, "PrimitiveNode", [80, "fixed"],
             outputs=[{"name": "INT", "type": "INT", "links": [7], "widget": {"name": "width"}}]),
        node(9, "Note", ["the width comes from the primitive"]),
    ]
    links = [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "*"], [3, 3, 0, 4, 0, "LATENT"], [4, 4, 0, 5, 0, "LATENT"],
             [5, 5, 0, 6, 0, "LATENT"], [7, 8, 0, 1, 0, "INT"]]
    if muted_extra:
        nodes.append(node(10, "SaveLatent", ["muted"], inputs=[inp("samples", "LATENT", 6)], mode=2))
        links.append([6, 3, 0, 10, 0, "LATENT"])
    return ui(nodes, links)


def _load_latent(path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def test_core_node_workflow_converts_validates_and_runs(comfy, tmp_path):
    import nodes
    from magic_portrait.runner import run_workflow

    api = wf.ui_to_api(latent_workflow(), nodes.NODE_CLASS_MAPPINGS)
    assert set(api) == {"1", "5", "6"}
    assert api["1"]["inputs"] == {"width": 80, "height": 64, "batch_size": 1}
    assert api["5"]["inputs"]["samples"] == ["1", 0]  # through two reroutes and a bypassed node

    result = run_workflow(latent_workflow(), output_dir=tmp_path / "out", sets=["Upscale.height=160"],
                          log=open(os.devnull, "w"), out=open(os.devnull, "w"))
    latents = [p for p in result.files if p.suffix == ".latent"]
    assert len(latents) == 1 and latents[0].parent == tmp_path / "out"
    assert tuple(_load_latent(latents[0]).shape) == (1, 4, 160 // 8, 96 // 8)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["prompt"]["5"]["inputs"]["height"] == 160
    assert summary["outputs"]["6"]["ui"]["latents"][0]["filename"] == latents[0].name


def test_missing_checkpoint_error_names_the_file_and_every_folder(comfy, tmp_path):
    import folder_paths

    from magic_portrait.run_errors import MissingFileError
    from magic_portrait.runner import run_workflow

    graph = ui([node(4, "CheckpointLoaderSimple", ["no_such_model.safetensors"],
                     outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP"), out("VAE", "VAE")])], [])
    graph["nodes"].append(node(5, "Note", ["x"]))
    with pytest.raises(MissingFileError) as err:
        run_workflow(graph, models_dir=tmp_path / "models", output_dir=tmp_path / "out", log=open(os.devnull, "w"))
    message = str(err.value)
    assert "missing model file 'no_such_model.safetensors' for node 4 (CheckpointLoaderSimple) input 'ckpt_name'" \
        in message
    assert str(tmp_path / "models" / "checkpoints") in message
    for folder in folder_paths.get_folder_paths("checkpoints"):
        assert folder in message
    assert "--models-dir" in message and "--make-tiny-checkpoint" in message


def test_image_path_given_with_set_is_copied_into_the_input_folder(comfy, tmp_path):
    import numpy as np
    from PIL import Image

    from magic_portrait.runner import run_workflow

    photo = tmp_path / "elsewhere" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray((np.arange(32 * 48 * 3) % 251).astype(np.uint8).reshape(32, 48, 3)).save(photo)
    graph = ui(
        [node(1, "LoadImage", ["example.png", "image"], outputs=[out("IMAGE", "IMAGE", [1]), out("MASK", "MASK")]),
         node(2, "SaveImage", ["copied"], inputs=[inp("images", "IMAGE", 1)])],
        [[1, 1, 0, 2, 0, "IMAGE"]],
    )
    input_dir = tmp_path / "input"
    result = run_workflow(graph, sets=[f"LoadImage.image={photo}"], input_dir=input_dir,
                          output_dir=tmp_path / "out", log=open(os.devnull, "w"), out=open(os.devnull, "w"))
    assert (input_dir / "photo.png").read_bytes() == photo.read_bytes()
    assert result.prompt["1"]["inputs"]["image"] == "photo.png"
    saved = [p for p in result.files if p.suffix == ".png"]
    assert len(saved) == 1 and Image.open(saved[0]).size == (48, 32)
    assert "workflow" in Image.open(saved[0]).info  # the UI workflow is embedded, as the frontend does


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    try:
        from magic_portrait import tiny
    except ImportError:
        pytest.skip("magic_portrait.tiny is not there yet: no tiny checkpoint to run a sampling workflow with")
    models = tmp_path_factory.mktemp("models")
    # The smaller UNet variant (~320 MB file instead of ~450 MB): this test is about the runner, not the layers.
    tiny.write_tiny_sd15_checkpoint(models / "checkpoints" / "tiny_sd15.safetensors", seed=0, full_blocks=False)
    return models


def t2i_workflow(prefix="t2i"):
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler (seed from a PrimitiveNode, model through a Reroute)
    -> VAEDecode -> SaveImage at 64x64 (1 step saved; the test sets 2)."""
    return ui(
        [
            node(4, "CheckpointLoaderSimple", ["tiny_sd15.safetensors"],
                 outputs=[out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [8])]),
            node(10, "Reroute", None, inputs=[inp("", "*", 1)], outputs=[out("", "MODEL", [10])]),
            node(6, "CLIPTextEncode", ["a portrait photo"], inputs=[inp("clip", "CLIP", 3)],
                 outputs=[out("CONDITIONING", "CONDITIONING", [4])], title="Positive"),
            node(7, "CLIPTextEncode", ["blurry"], inputs=[inp("clip", "CLIP", 5)],
                 outputs=[out("CONDITIONING", "CONDITIONING", [6])], title="Negative"),
            node(5, "EmptyLatentImage", [64, 64, 1], outputs=[out("LATENT", "LATENT", [2])]),
            node(12, "PrimitiveNode", [1234, "randomize"],
                 outputs=[{"name": "INT", "type": "INT", "links": [12], "widget": {"name": "seed"}}]),
            node(3, "KSampler", [1, "randomize", 1, 7.5, "euler", "normal", 1],
                 inputs=[inp("model", "MODEL", 10), inp("positive", "CONDITIONING", 4),
                         inp("negative", "CONDITIONING", 6), inp("latent_image", "LATENT", 2),
                         inp("seed", "INT", 12, widget=True)],
                 outputs=[out("LATENT", "LATENT", [7])]),
            node(8, "VAEDecode", [], inputs=[inp("samples", "LATENT", 7), inp("vae", "VAE", 8)],
                 outputs=[out("IMAGE", "IMAGE", [9])]),
            node(9, "SaveImage", [prefix], inputs=[inp("images", "IMAGE", 9)]),
        ],
        [[1, 4, 0, 10, 0, "MODEL"], [10, 10, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
         [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
         [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"], [12, 12, 0, 3, 4, "INT"]],
    )


def test_text_to_image_with_the_tiny_checkpoint_and_set_overrides(comfy, tiny_models, tmp_path):
    import io

    from PIL import Image

    from magic_portrait.runner import run_workflow

    log = io.StringIO()
    result = run_workflow(t2i_workflow(), models_dir=tiny_models, output_dir=tmp_path / "out", log=log,
                          sets=["KSampler.steps=2", "Positive.text=another prompt"], out=open(os.devnull, "w"))
    inputs = result.prompt["3"]["inputs"]
    assert inputs["seed"] == 1234  # from the PrimitiveNode, not the KSampler's own widget value
    assert inputs["model"] == ["4", 0]  # through the Reroute
    assert inputs["steps"] == 2 and result.prompt["6"]["inputs"]["text"] == "another prompt"
    progress = log.getvalue()
    assert "KSampler (node 3)" in progress and "step 2/2" in progress
    images = [p for p in result.files if p.suffix == ".png"]
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["outputs"]["9"]["ui"]["images"]


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI tier: the CLI in a subprocess


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "magic_portrait", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_runs_a_workflow_file(comfy, tmp_path):
    workflow_file = tmp_path / "latent.json"
    workflow_file.write_text(json.dumps(latent_workflow(prefix="cli")))
    done = _cli(["run", str(workflow_file), "--output-dir", "results", "--set", "1.batch_size=2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    latents = list((tmp_path / "results").glob("cli_*.latent"))
    assert len(latents) == 1 and _load_latent(latents[0]).shape[0] == 2
    assert str(latents[0]) in done.stdout
    assert "EmptyLatentImage (node 1)" in done.stderr
    summary = json.loads((tmp_path / "results" / "run_summary.json").read_text())
    assert summary["files"] == [str(latents[0])]

    usage = _cli(["run"], cwd=tmp_path)  # argparse: no ComfyUI start needed
    assert usage.returncode == 2 and "WORKFLOW.json" in usage.stderr


def test_cli_exit_codes_for_workflow_and_usage_errors(comfy, tmp_path, capsys):
    from magic_portrait.__main__ import main

    broken = tmp_path / "missing.json"
    broken.write_text(json.dumps(ui([node(4, "CheckpointLoaderSimple", ["absent.safetensors"])], [])))
    assert main(["run", str(broken), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing model file 'absent.safetensors'" in err and "Traceback" not in err

    good = tmp_path / "latent.json"
    good.write_text(json.dumps(latent_workflow()))
    assert main(["run", str(good), "--output-dir", str(tmp_path / "out"), "--set", "Upscale.heigth=3"]) == 2
    assert "has no input 'heigth'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.json")]) == 2
    assert "workflow file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("names", "args"),
    [
        ({"ckpt_name": "../escape.safetensors"}, []),
        ({"ckpt_name": "model.safetensors", "ipadapter_file": "../../escape.safetensors"}, []),
        ({"ckpt_name": "{abs}"}, []),
        ({"ckpt_name": "model.safetensors"}, ["../escape.safetensors"]),  # --make-tiny-checkpoint NAME
    ],
    ids=["checkpoint-dotdot", "ipadapter-dotdot", "checkpoint-absolute", "cli-name-dotdot"],
)
def test_make_tiny_checkpoint_refuses_names_leading_out_and_writes_nothing(comfy, tmp_path, capsys, names, args):
    """A shared workflow (or NAME) must never choose which file on disk gets written: refused before anything is."""
    from magic_portrait.__main__ import main

    names = {key: value.replace("{abs}", str(tmp_path / "escape.safetensors")) for key, value in names.items()}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["ckpt_name"]}}}
    if "ipadapter_file" in names:
        prompt["2"] = {"class_type": "MagicPortrait_LoadIPAdapter",
                       "inputs": {"ipadapter_file": names["ipadapter_file"], "variant": "auto (from the file)"}}
    workflow = tmp_path / "work" / "workflow.json"
    workflow.parent.mkdir()
    workflow.write_text(json.dumps(prompt))
    models = tmp_path / "work" / "models"
    before = sorted(tmp_path.rglob("*"))
    code = main(["run", str(workflow), "--models-dir", str(models), "--output-dir", str(tmp_path / "work" / "out"),
                 "--make-tiny-checkpoint", *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "refusing to write" in err and "escape.safetensors" in err and "Traceback" not in err
    written = [p for p in sorted(tmp_path.rglob("*")) if p not in before and p.is_file()]
    assert written == [], written  # not the escape, not even the well-named checkpoint
