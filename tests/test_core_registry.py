"""Core tier: what the Comfy Registry needs beyond `comfy node validate` (which scripts/test.sh runs): an icon at the
URL pyproject names, shipped in the published archive, and the publishing workflow the registry documents."""

import fnmatch
import re
from pathlib import Path

import cv2
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
PUBLISH_WORKFLOW = REPO / ".github" / "workflows" / "publish_action.yml"  # the path the registry's docs give
ICON_TYPES = (".svg", ".png", ".jpg", ".jpeg", ".gif")  # what the registry accepts, at most 800 x 400 px


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _comfyignored(path: str) -> bool:
    """Whether a .comfyignore pattern (gitignore syntax; this file uses folder and name patterns) matches `path`."""
    for line in (REPO / ".comfyignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        if pattern.endswith("/"):
            if any(part == pattern.rstrip("/") for part in Path(path).parts[:-1]):
                return True
        elif fnmatch.fnmatch(Path(path).name, pattern) or fnmatch.fnmatch(path, pattern.lstrip("/")):
            return True
    return False


def test_icon_is_the_raw_github_url_of_a_square_image_in_this_repository():
    project = _pyproject()
    repository = project["project"]["urls"]["Repository"].rstrip("/")
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repository).group(1)
    icon = project["tool"]["comfy"]["Icon"]
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", icon)
    assert match, f"Icon must be this repository's raw GitHub URL on main, got {icon!r}"
    path = match.group(1)
    assert (REPO / path).is_file() and path.lower().endswith(ICON_TYPES), path
    if not path.lower().endswith(".svg"):
        height, width = cv2.imread(str(REPO / path), cv2.IMREAD_UNCHANGED).shape[:2]
        assert width == height <= 400, (width, height)
    assert not _comfyignored(path), f".comfyignore drops the icon {path}"


def test_comfyignore_keeps_tests_and_ci_out_of_the_published_archive():
    for path in ("tests/test_core_registry.py", "bench/bench_diir.py", ".github/workflows/publish_action.yml"):
        assert _comfyignored(path), path
    for path in ("__init__.py", "nodes/faces.py", "magic_core/fusion.py", "example_workflows/ddim_invert_reconstruct.json",
                 "pyproject.toml", "requirements.txt", "LICENSE"):
        assert not _comfyignored(path), path


def test_publish_workflow_runs_the_registry_action_when_pyproject_changes():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(PUBLISH_WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pyproject.toml" in triggers["push"]["paths"]
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    publish = [step for step in steps if str(step.get("uses", "")).startswith("Comfy-Org/publish-node-action@")]
    assert len(publish) == 1
    # the registry's publishing API key, from the repository secret the registry's docs name
    assert re.fullmatch(r"\$\{\{\s*secrets\.REGISTRY_ACCESS_TOKEN\s*\}\}", publish[0]["with"]["personal_access_token"])
