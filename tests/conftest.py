"""Two tiers: the core tier (magic_core alone) always runs; the ComfyUI tier runs on a real ComfyUI, found through
COMFYUI_PATH, ~/comfy/ComfyUI, or the ComfyUI whose custom_nodes/ holds this pack. Any test that uses the `comfy`
fixture belongs to the ComfyUI tier; the run ends with a line saying how many of those ran, or why none did."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from magic_portrait import comfy_env  # noqa: E402

COMFY_ROOT = comfy_env.find_comfyui()
SKIP_REASON = (
    "ComfyUI not found (looked in: " + ", ".join(str(p) for p in comfy_env.comfyui_candidates()) + ")"
    if COMFY_ROOT is None
    else ""
)
_tier = {"passed": 0, "failed": 0, "skipped": 0}
_tier_ids: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)
            _tier_ids.add(item.nodeid)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: ComfyUI tier (needs a real ComfyUI)")


def pytest_runtest_logreport(report):
    if report.nodeid not in _tier_ids:
        return
    if report.when == "call":
        _tier["passed" if report.passed else "failed" if report.failed else "skipped"] += 1
    elif report.when == "setup" and not report.passed:
        _tier["skipped" if report.skipped else "failed"] += 1


def pytest_terminal_summary(terminalreporter):
    if COMFY_ROOT is None:
        line = f"ComfyUI tier: skipped ({len(_tier_ids)} tests) because {SKIP_REASON}"
    else:
        line = (f"ComfyUI tier: {_tier['passed']} passed, {_tier['failed']} failed, {_tier['skipped']} skipped "
                f"of {len(_tier_ids)} (ComfyUI at {COMFY_ROOT})")
    terminalreporter.write_line(line)
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    (REPO / ".pytest_cache" / "comfy_tier.txt").write_text(line + "\n")


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, booted in this process on CPU with the pack loaded."""
    if COMFY_ROOT is None:
        pytest.skip(SKIP_REASON)
    return comfy_env.boot(COMFY_ROOT, cpu=True)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack as ComfyUI loaded it (its nodes, magic_core as the nodes see it)."""
    return comfy.pack


@pytest.fixture(scope="session")
def nodes(pack):
    """The pack's node classes by node id."""
    from helpers import node_classes

    return node_classes(pack)


@pytest.fixture(scope="session")
def tiny(comfy):
    from magic_portrait import tiny as tiny_models

    return tiny_models


@pytest.fixture(scope="session")
def sd15(tiny):
    return tiny.build_sd15_model(seed=0)


@pytest.fixture(scope="session")
def sdxl(tiny):
    return tiny.build_sdxl_model(seed=0)


def _placer(write, folder_factory):
    """place(target): a symlink at `target` to the one file `write(folder)` makes, written on first use."""
    written = []

    def place(target: Path) -> Path:
        if not written:
            written.append(write(folder_factory()))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(written[0])
        return target

    return place


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny, tmp_path_factory):
    """Place the tiny SD1.5 checkpoint (seed 0, full blocks; written once per session) at a path: a symlink, as a
    user's models folder may hold. Returns the placed path."""
    return _placer(lambda folder: tiny.write_tiny_sd15_checkpoint(folder / "tiny_sd15.safetensors", seed=0),
                   lambda: tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_controlnet_file(tiny, tmp_path_factory):
    """Place the tiny SD1.5 ControlNet (seed 0, matches the tiny checkpoint; written once per session) at a path."""
    return _placer(lambda folder: tiny.write_tiny_sd15_controlnet(folder / "tiny_cn.safetensors", seed=0),
                   lambda: tmp_path_factory.mktemp("tiny_cn"))
