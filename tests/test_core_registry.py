"""Core tier: what the Comfy Registry needs beyond `comfy node validate` (which scripts/test.sh runs): an icon at the
URL pyproject names, shipped in the published archive, and the publishing workflow the registry documents."""

import ast
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
                 "pyproject.toml", "requirements.txt", "LICENSE", "web/magic_portrait.js", "web/face_margin.js"):
        assert not _comfyignored(path), path


def _imported_files(path: Path) -> set[Path]:
    """This repository's files that `path` imports, relative or by package name (magic_core, magic_portrait, nodes),
    at the top or inside functions."""
    found = set()
    for statement in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(statement, ast.ImportFrom):
            base = REPO if statement.level == 0 else path.parents[statement.level - 1]
            stem = base / (statement.module or "").replace(".", "/")
            candidates = [stem / alias.name for alias in statement.names] + [stem]
        elif isinstance(statement, ast.Import):
            candidates = [REPO / alias.name.replace(".", "/") for alias in statement.names]
        else:
            continue
        for candidate in candidates:
            for file in (candidate.with_suffix(".py"), candidate / "__init__.py"):
                if file.is_file() and REPO in file.parents:
                    found.add(file)
    return found


def _reachable_files(*entry_points: Path) -> set[Path]:
    seen, todo = set(), list(entry_points)
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(_imported_files(file))
    return seen


def test_the_archive_keeps_what_the_pack_and_its_command_line_import_and_leaves_dev_helpers_out():
    """What ComfyUI loads (__init__.py) and what `python -m magic_portrait` runs (run with --make-tiny-checkpoint,
    train, make-tiny-checkpoint) must all ship; the modules only tests, bench/ and scripts/ use stay out."""
    needed = {file.relative_to(REPO).as_posix()
              for file in _reachable_files(REPO / "__init__.py", REPO / "magic_portrait" / "__main__.py")}
    assert {"magic_portrait/runner.py", "magic_portrait/tiny.py", "magic_portrait/tiny_insightface.py",
            "magic_portrait/tiny_ipadapter.py", "magic_portrait/train_cli.py", "nodes/faces.py"} <= needed
    assert not [path for path in needed if _comfyignored(path)]
    for path in ("magic_portrait/analytic_model.py", "magic_portrait/group_photos.py",
                 "magic_portrait/workflow_builder.py", "scripts/make_workflows.py"):
        assert path not in needed and _comfyignored(path), path


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
