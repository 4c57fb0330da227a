"""Two tiers: the core tier (magic_core alone) always runs; the ComfyUI tier runs on a real ComfyUI, found through
COMFYUI_PATH, ~/comfy/ComfyUI, or the ComfyUI whose custom_nodes/ holds this pack (scripts/setup.sh unpacks the
vendored archive there when none is found). Any test that uses the `comfy` fixture belongs to the ComfyUI tier; the
run ends with a line saying how many of those ran, or why none did.

Strict mode (CI=true, or MAGIC_PORTRAIT_REQUIRE_COMFYUI=1; MAGIC_PORTRAIT_REQUIRE_COMFYUI=0 turns it off under CI):
the run fails when ComfyUI is not found, when a ComfyUI-tier test is skipped, or when the tier ran no test, so a green
CI always means the ComfyUI tier ran."""

from __future__ import annotations

import os
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
_tier_skips: list[str] = []  # "nodeid: reason" of every skipped ComfyUI-tier test


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def strict_comfy_tier() -> bool:
    """Whether a skipped or empty ComfyUI tier fails the run: CI=true or MAGIC_PORTRAIT_REQUIRE_COMFYUI=1; an explicit
    MAGIC_PORTRAIT_REQUIRE_COMFYUI=0 wins over CI."""
    explicit = os.environ.get("MAGIC_PORTRAIT_REQUIRE_COMFYUI")
    if explicit is not None and explicit.strip() != "":
        return _truthy(explicit)
    return _truthy(os.environ.get("CI"))


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
    outcome = None
    if report.when == "call":
        outcome = "passed" if report.passed else "failed" if report.failed else "skipped"
    elif report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "failed"
    if outcome is None:
        return
    _tier[outcome] += 1
    if outcome == "skipped":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _tier_skips.append(f"{report.nodeid}: {reason}")


def _tier_verdict() -> tuple[str, str | None]:
    """The summary line, and why strict mode fails the run (None when it does not)."""
    ran = _tier["passed"] + _tier["failed"]
    if COMFY_ROOT is None:
        line = f"ComfyUI tier: skipped ({len(_tier_ids)} tests) because {SKIP_REASON}"
    else:
        line = (f"ComfyUI tier: {ran} ran ({_tier['passed']} passed, {_tier['failed']} failed), {_tier['skipped']} "
                f"skipped, of {len(_tier_ids)} collected (ComfyUI at {COMFY_ROOT})")
    problem = None
    if COMFY_ROOT is None:
        problem = SKIP_REASON + "; run scripts/setup.sh (it unpacks ../shared/vendor/ComfyUI-0.8.0.tar.gz)"
    elif ran == 0:
        problem = "no ComfyUI-tier test ran"
    elif _tier["skipped"]:
        problem = f"{_tier['skipped']} ComfyUI-tier test(s) skipped: " + "; ".join(_tier_skips[:5])
    return line, problem


def pytest_sessionfinish(session, exitstatus):
    _, problem = _tier_verdict()
    if problem is not None and strict_comfy_tier() and exitstatus in (pytest.ExitCode.OK,
                                                                      pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    line, problem = _tier_verdict()
    if problem is not None and strict_comfy_tier():
        line += f"\nComfyUI tier REQUIRED (CI=true or MAGIC_PORTRAIT_REQUIRE_COMFYUI=1) and {problem}: FAILED"
    for text in line.splitlines():
        terminalreporter.write_line(text)
    # scripts/test.sh prints this file as the run's last line
    summary = Path(os.environ.get("MAGIC_PORTRAIT_TIER_SUMMARY") or REPO / ".pytest_cache" / "comfy_tier.txt")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(line + "\n")


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscription on a busy machine (restored afterwards). A module opts
    in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
