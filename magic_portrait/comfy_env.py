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
        self.sockets_metadata = {}  # read by comfy_api.feature_flags when a preview image is sent

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

    def run_prompt(self, prompt: dict, listener=None, *, extra_data: dict | None = None) -> dict:
        """Validate and execute an API-format prompt; return {node_id: ui outputs}. Raises on any failure.

        `listener(event, data)` receives the executor's messages ("executing", "executed", "progress_state",
        "execution_cached", ...) plus "progress" {value, max, node} for step progress. `extra_data` is the executor's
        extra data (e.g. {"extra_pnginfo": {"workflow": ui_workflow}}, which SaveImage embeds in its PNGs)."""
        import comfy.utils
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise WorkflowError(_format_validation_error(valid), node_errors=valid[3])
        if self.executor is None:
            # cache_args must be given: execute_async reads cache_args["ram"] after every node.
            self.executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0})
        self.server.listener = listener
        # The executor only reports "executing"/"executed" (and its status messages) to a client.
        extra_data = dict(extra_data or {})
        if listener is not None:
            extra_data.setdefault("client_id", _HEADLESS_CLIENT_ID)
        previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        if listener is not None:
            comfy.utils.set_progress_bar_global_hook(_progress_hook(listener))
        try:
            self.executor.execute(prompt, prompt_id, extra_data, valid[2])
        finally:
            comfy.utils.set_progress_bar_global_hook(previous_hook)
            self.server.listener = None
        if not self.executor.success:
            raise _execution_error(self.executor.status_messages)
        return {node_id: out.get("output", out) for node_id, out in self.executor.history_result["outputs"].items()}


class WorkflowError(RuntimeError):
    """A prompt ComfyUI rejected or that failed while running; `node_id`, `node_type`, `traceback` when known."""

    def __init__(self, message: str, *, node_id: str | None = None, node_type: str | None = None,
                 traceback: str | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.node_type = node_type
        self.traceback = traceback
        self.node_errors = node_errors or {}


_HEADLESS_CLIENT_ID = "magic-portrait-headless"


def _progress_hook(listener):
    """A comfy.utils progress-bar hook (as ComfyUI's server installs one) that feeds the progress registry, so
    "progress_state" events flow, and passes a "progress" event {value, max, node, prompt_id} to `listener`."""
    import comfy.model_management
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
        context = get_executing_context()
        if context is not None:
            node_id = node_id if node_id is not None else context.node_id
            prompt_id = prompt_id if prompt_id is not None else context.prompt_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if node_id is not None:
            get_progress_state().update_progress(node_id, value, total, None)
        listener("progress", {"value": value, "max": total, "node": node_id, "prompt_id": prompt_id})

    return hook


def _format_validation_error(valid) -> str:
    error, node_errors = valid[1], valid[3]
    lines = [f"prompt rejected: {error.get('message', error)} {error.get('details', '')}".rstrip()]
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def _execution_error(messages) -> WorkflowError:
    for event, data in messages:
        if event == "execution_error":
            trace = data.get("traceback")
            return WorkflowError(
                f"node {data['node_id']} ({data['node_type']}) failed: {data['exception_type']}: "
                f"{data['exception_message']}",
                node_id=str(data["node_id"]),
                node_type=data.get("node_type"),
                traceback="".join(trace) if isinstance(trace, list) else trace,
            )
        if event == "execution_interrupted":
            return WorkflowError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})",
                                 node_id=data.get("node_id"), node_type=data.get("node_type"))
    return WorkflowError("execution failed: " + "; ".join(str(event) for event, _ in messages))


_RUNTIME: ComfyRuntime | None = None


def boot(
    comfy_root: Path | None = None,
    *,
    cpu: bool = True,
    models_dir: Path | None = None,
    output_dir: Path | None = None,
    input_dir: Path | None = None,
    quiet: bool = True,
    temp_dir: Path | None = None,
) -> ComfyRuntime:
    """Import ComfyUI from `comfy_root` (found if None), register core nodes and this pack. Idempotent per process.

    `models_dir`: a ComfyUI-style models folder (checkpoints/, controlnet/, ...) searched before ComfyUI's own folders
    for every model folder type; `output_dir`/`input_dir`/`temp_dir` replace ComfyUI's output/input/temp folders.
    Calling boot() again only applies these folder settings."""
    global _RUNTIME
    if _RUNTIME is not None:
        _configure_folders(models_dir, output_dir, input_dir, temp_dir)
        return _RUNTIME
    root = comfy_root or find_comfyui()
    if root is None:
        searched = ", ".join(str(p) for p in comfyui_candidates())
        raise FileNotFoundError(f"ComfyUI not found; looked in: {searched}. Set COMFYUI_PATH to a ComfyUI checkout.")
    root = Path(root).resolve()
    # First on the path: the pack's own nodes/ package must not shadow ComfyUI's nodes.py.
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)

    from comfy.cli_args import args  # parses no argv unless comfy.options enables it

    if cpu:
        # torch may be a CUDA build: decide the device before comfy.model_management is imported. On CPU, torch's
        # SDPA is ~3x faster than ComfyUI's default sub-quadratic attention (ComfyUI's --use-pytorch-cross-attention).
        args.cpu = True
        args.use_pytorch_cross_attention = True
    # main.py imports utils.extra_config before nodes; without it `import server` breaks later ('utils' is not a package).
    import utils.extra_config  # noqa: F401

    import nodes

    _configure_folders(models_dir, output_dir, input_dir, temp_dir)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_module_name = str(PACK_DIR).replace(".", "_x_")
    if pack_module_name not in sys.modules:
        ok = asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load the Magic Portrait pack from {PACK_DIR}")
    _configure_folders(None, None, None)  # model folder types the pack registered also get the models dir
    _RUNTIME = ComfyRuntime(root=root, pack_module_name=pack_module_name)
    return _RUNTIME


_MODELS_DIRS: list[Path] = []  # every models_dir given to boot(), latest first


def model_subfolders(folder_name: str) -> list[str]:
    """The sub-folder names a ComfyUI-style models folder uses for a folder_paths folder type, e.g.
    'diffusion_models' -> ['unet', 'diffusion_models'], 'text_encoders' -> ['text_encoders', 'clip'],
    'controlnet' -> ['controlnet', 't2i_adapter'] (taken from ComfyUI's own default paths under models/)."""
    import folder_paths

    base = Path(folder_paths.models_dir).resolve()
    names = []
    for path in folder_paths.folder_names_and_paths.get(folder_name, ([], set()))[0]:
        path = Path(path).resolve()
        if path.parent == base and path.name not in names:
            names.append(path.name)
    return names or [folder_name]


def _configure_folders(models_dir: Path | None, output_dir: Path | None, input_dir: Path | None,
                       temp_dir: Path | None = None) -> None:
    import folder_paths

    if models_dir is not None:
        models_dir = Path(models_dir).resolve()
        if models_dir in _MODELS_DIRS:
            _MODELS_DIRS.remove(models_dir)
        _MODELS_DIRS.insert(0, models_dir)
    for name, (paths, _exts) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":
            continue
        subfolders = model_subfolders(name)
        for root in reversed(_MODELS_DIRS):  # the latest models dir ends up first
            for sub in reversed(subfolders):
                candidate = str(root / sub)
                if candidate in paths:
                    paths.remove(candidate)
                paths.insert(0, candidate)
    folder_paths.filename_list_cache.clear()
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(output_dir).resolve()))
    if input_dir is not None:
        Path(input_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(Path(input_dir).resolve()))
    if temp_dir is not None:  # created by ComfyUI when something is saved there
        folder_paths.set_temp_directory(str(Path(temp_dir).resolve()))
