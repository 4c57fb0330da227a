"""Run ComfyUI in-process: find it, force CPU when asked, load this pack the way ComfyUI does, execute prompts.

Used by the headless runner and by the ComfyUI test tier, so both exercise ComfyUI's own validation and executor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def comfyui_candidates(pack_dir: Path = PACK_DIR) -> list[Path]:
    """Where ComfyUI is looked for, in order: $COMFYUI_PATH, ~/comfy/ComfyUI, the ComfyUI holding the pack."""
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    found.append(Path.home() / "comfy" / "ComfyUI")
    if pack_dir.parent.name == "custom_nodes":
        found.append(pack_dir.parent.parent)
    return found


def find_comfyui(pack_dir: Path = PACK_DIR) -> Path | None:
    for candidate in comfyui_candidates(pack_dir):
        if (candidate / "comfy" / "model_management.py").is_file() and (candidate / "nodes.py").is_file():
            return candidate.resolve()
    return None


class _HeadlessServer:
    """The few attributes PromptExecutor needs from PromptServer; forwards events to an optional listener."""

    def __init__(self, listener=None):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.listener = listener

    def send_sync(self, event, data, sid=None):
        if self.listener is not None:
            self.listener(event, data)

    def queue_updated(self):
        pass


@dataclass
class ComfyRuntime:
    """A ComfyUI loaded in this process, with the pack registered as a custom node."""

    root: Path
    pack_module_name: str
    executor: object = None
    server: _HeadlessServer = field(default_factory=_HeadlessServer)

    @property
    def pack(self):
        return sys.modules[self.pack_module_name]

    def node_class(self, node_id: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_prompt(self, prompt: dict, listener=None) -> dict:
        """Validate and execute an API-format prompt; return {node_id: ui outputs}. Raises on any failure."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise WorkflowError(_format_validation_error(valid))
        if self.executor is None:
            self.executor = execution.PromptExecutor(self.server)
        self.server.listener = listener
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        if not self.executor.success:
            raise WorkflowError(_format_execution_error(self.executor.status_messages))
        return {node_id: out.get("output", out) for node_id, out in self.executor.history_result["outputs"].items()}


class WorkflowError(RuntimeError):
    pass


def _format_validation_error(valid) -> str:
    error, node_errors = valid[1], valid[3]
    lines = [f"prompt rejected: {error.get('message', error)} {error.get('details', '')}".rstrip()]
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def _format_execution_error(messages) -> str:
    for event, data in messages:
        if event == "execution_error":
            return (
                f"node {data['node_id']} ({data['node_type']}) failed: {data['exception_type']}: "
                f"{data['exception_message']}"
            )
    return "execution failed: " + "; ".join(str(event) for event, _ in messages)


_RUNTIME: ComfyRuntime | None = None


def boot(
    comfy_root: Path | None = None,
    *,
    cpu: bool = True,
    models_dir: Path | None = None,
    output_dir: Path | None = None,
    input_dir: Path | None = None,
    quiet: bool = True,
) -> ComfyRuntime:
    """Import ComfyUI from `comfy_root` (found if None), register core nodes and this pack. Idempotent per process."""
    global _RUNTIME
    if _RUNTIME is not None:
        _configure_folders(models_dir, output_dir, input_dir)
        return _RUNTIME
    root = comfy_root or find_comfyui()
    if root is None:
        searched = ", ".join(str(p) for p in comfyui_candidates())
        raise FileNotFoundError(f"ComfyUI not found; looked in: {searched}. Set COMFYUI_PATH to a ComfyUI checkout.")
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)

    from comfy.cli_args import args  # parses no argv unless comfy.options enables it

    if cpu:
        # torch may be a CUDA build: decide the device before comfy.model_management is imported.
        args.cpu = True
    # main.py imports utils.extra_config before nodes; without it `import server` breaks later ('utils' is not a package).
    import utils.extra_config  # noqa: F401

    import nodes

    _configure_folders(models_dir, output_dir, input_dir)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_module_name = str(PACK_DIR).replace(".", "_x_")
    if pack_module_name not in sys.modules:
        ok = asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load the Magic Portrait pack from {PACK_DIR}")
    _RUNTIME = ComfyRuntime(root=root, pack_module_name=pack_module_name)
    return _RUNTIME


def _configure_folders(models_dir: Path | None, output_dir: Path | None, input_dir: Path | None) -> None:
    import folder_paths

    if models_dir is not None:
        models_dir = Path(models_dir).resolve()
        for name, (paths, _exts) in list(folder_paths.folder_names_and_paths.items()):
            folder_name = {"checkpoints": "checkpoints"}.get(name, name)
            candidate = models_dir / folder_name
            if str(candidate) not in paths:
                paths.insert(0, str(candidate))
        folder_paths.filename_list_cache.clear()
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(output_dir).resolve()))
    if input_dir is not None:
        folder_paths.set_input_directory(str(Path(input_dir).resolve()))
