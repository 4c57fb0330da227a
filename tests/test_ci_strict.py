"""Core tier: a green run under CI means the ComfyUI tier ran. pytest runs a ComfyUI-tier test of this suite in a
subprocess on a machine without ComfyUI (an empty HOME, no COMFYUI_PATH, the repository not inside custom_nodes/)
under CI=true: the test is skipped, and the run fails saying why. Which settings make a run strict is checked
in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIER_TEST = "tests/test_tiny_models.py::test_model_weights_are_seeded"  # uses the `comfy` fixture


def _run_without_comfyui(tmp_path, **env) -> tuple[int, str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    summary = tmp_path / "comfy_tier.txt"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("COMFYUI_PATH", "CI", "MAGIC_PORTRAIT_REQUIRE_COMFYUI")}
    clean.update(HOME=str(home), MAGIC_PORTRAIT_TIER_SUMMARY=str(summary), **env)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           TIER_TEST], cwd=REPO, env=clean, capture_output=True, text=True, timeout=600)
    if REPO.parent.name == "custom_nodes":
        pytest.skip("this checkout sits in a ComfyUI's custom_nodes/: it always finds that ComfyUI")
    return done.returncode, done.stdout, summary.read_text()


def test_under_ci_a_skipped_tier_fails_the_run_and_says_why(tmp_path):
    """(One subprocess run, ~10 s: without CI the same run passes and its summary says only why the tier was
    skipped, as the switches below decide.)"""
    code, out, summary = _run_without_comfyui(tmp_path, CI="true")
    assert code == 1, out
    assert "1 skipped" in out.strip().splitlines()[-1], out
    assert summary.startswith("ComfyUI tier: skipped (1 tests) because ComfyUI not found"), summary
    assert "ComfyUI tier REQUIRED" in summary and "FAILED" in summary, summary


@pytest.mark.parametrize(("env", "strict"), [
    ({}, False), ({"CI": "true"}, True), ({"CI": "1"}, True), ({"CI": "false"}, False),
    ({"MAGIC_PORTRAIT_REQUIRE_COMFYUI": "1"}, True), ({"MAGIC_PORTRAIT_REQUIRE_COMFYUI": "yes"}, True),
    ({"CI": "true", "MAGIC_PORTRAIT_REQUIRE_COMFYUI": "0"}, False), ({"CI": "true", "MAGIC_PORTRAIT_REQUIRE_COMFYUI": ""}, True),
])
def test_strict_mode_switches(monkeypatch, env, strict):
    from conftest import strict_comfy_tier

    for name in ("CI", "MAGIC_PORTRAIT_REQUIRE_COMFYUI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert strict_comfy_tier() is strict
