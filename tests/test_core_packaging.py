"""Core tier: what the registry and ComfyUI-Manager install, and the layering rule magic_core follows."""

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_requirements_txt_and_pyproject_list_the_same_runtime_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _requirements() == project["dependencies"]


def test_runtime_requirements_leave_torch_to_comfyui_and_keep_optional_back_ends_optional():
    names = [req.split(";")[0].split(">")[0].split("=")[0].strip().lower() for req in _requirements()]
    assert not {"torch", "torchvision", "torchaudio"} & set(names)
    # insightface needs a compiler on some systems and onnxruntime comes in two builds that break each other
    assert not {"insightface", "onnxruntime", "onnxruntime-gpu"} & set(names)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("onnxruntime>") for r in extras["insightface"])
    assert any(r.startswith("onnxruntime-gpu>") for r in extras["insightface-gpu"])
    # dlib-bin has no wheel (and no sdist) on every Python: its lines carry markers, so the pack always installs
    assert all(";" in r for r in _requirements() if r.startswith(("dlib", "face-recognition")))


def test_magic_core_never_imports_comfyui():
    for path in sorted((REPO / "magic_core").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                root = name.split(".")[0]
                assert root not in ("comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths", "execution"), \
                    f"{path.name} imports {name}"
