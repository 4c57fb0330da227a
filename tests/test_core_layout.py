"""The pack's layout, read from the source: node schema modules import no other schema module, nothing imports a schema
module but the package's registry, and magic_core speaks no ComfyUI (no ComfyUI import, no ComfyUI data-structure key
in its code)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = ROOT / "nodes"
CORE = ROOT / "magic_core"

COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview",
                 "node_helpers", "nodes", "server", "execution", "model_management"}
# Keys of ComfyUI's own structures (model options, transformer options, patch registries, LATENT dicts) and names of its
# classes and patch setters: code that reads, writes or calls them is ComfyUI-facing and lives in nodes/.
COMFY_KEYS = {"transformer_options", "model_options", "patches_replace", "model_function_wrapper",
              "sampler_cfg_function", "noise_mask", "batch_index", "pooled_output", "original_shape",
              "sample_sigmas", "cond_or_uncond", "block_index"}
COMFY_NAMES = {"transformer_options", "model_options", "set_model_attn1_patch", "set_model_attn2_patch",
               "set_model_attn1_replace", "set_model_attn2_replace", "set_model_attn2_output_patch", "ModelPatcher",
               "KSAMPLER", "CFGGuider", "ComfyNode", "get_model_object"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_schema_module(tree: ast.Module) -> bool:
    """A module that defines a node class (a subclass of io.ComfyNode)."""
    return any(isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("ComfyNode") for b in node.bases)
               for node in tree.body)


def _sibling_imports(tree: ast.Module) -> set[str]:
    """The nodes/ modules a nodes/ module imports (``from .x import`` and ``from . import x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_the_layout_checks_see_every_node_module():
    schema = {p.stem for p in NODES.glob("*.py") if _is_schema_module(_tree(p))}
    # the eight modules that define nodes today: a new one is found without changing this test
    assert {"diir", "faces", "inversion", "landmark_control", "magicid", "magicid_dataset", "magicstyle",
            "repcontrolnet"} <= schema
    assert "mgmica_patch" not in schema and "common" not in schema


def test_no_module_imports_a_node_schema_module():
    modules = {p.stem: _tree(p) for p in NODES.glob("*.py")}
    schema = {name for name, tree in modules.items() if _is_schema_module(tree)}
    offenders = {name: sorted(_sibling_imports(tree) & schema) for name, tree in modules.items()
                 if name != "__init__" and _sibling_imports(tree) & schema}
    assert offenders == {}, f"these modules import node schema modules (move the shared piece out): {offenders}"


def test_magic_core_imports_no_comfyui_and_names_none_of_its_structures():
    problems = []
    for path in sorted(CORE.glob("*.py")):
        tree = _tree(path)
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in COMFY_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in COMFY_MODULES:
                    problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in COMFY_KEYS:
                    problems.append(f"{where} uses the ComfyUI key {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in COMFY_NAMES:
                problems.append(f"{where} uses .{node.attr}")
            elif isinstance(node, ast.Name) and node.id in COMFY_NAMES:
                problems.append(f"{where} uses the name {node.id}")
    assert problems == [], problems


def test_the_import_check_catches_a_schema_import_and_a_comfyui_key():
    """The checks above can fail: they flag the very patterns they are about."""
    schema_tree = ast.parse("from comfy_api.v0_0_2 import io\nclass N(io.ComfyNode):\n    pass\n")
    assert _is_schema_module(schema_tree)
    assert _sibling_imports(ast.parse("from .magicid import Identity\nfrom . import inversion\n")) == {
        "magicid", "inversion"}
    tree = ast.parse('"""Docstring naming transformer_options is fine."""\nx = d["transformer_options"]\n')
    flagged = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in COMFY_KEYS
               and id(n) not in _docstring_nodes(tree)]
    assert len(flagged) == 1


def test_no_module_binds_a_top_level_name_twice():
    """A second top-level binding of a name silently replaces the first (two FACE_STYLES once broke every MagicID
    drawing): each name is bound once per module, type-annotated re-declarations and imports included."""
    problems = []
    for path in sorted([*CORE.glob("*.py"), *NODES.glob("*.py")]):
        seen: dict[str, int] = {}
        for node in _tree(path).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                if name in seen:
                    problems.append(f"{path.name}: {name} bound at lines {seen[name]} and {node.lineno}")
                seen[name] = node.lineno
    assert problems == [], problems
