"""Headless runner: execute a saved ComfyUI workflow in-process through ComfyUI's own validation and executor.

`python -m magic_portrait run WORKFLOW.json` (run_cli.py) is a thin front over `run_workflow()`, which tests and
scripts can call directly. A run, in order: load the workflow and apply --set (workflow_loading.py), copy the input
files it names into the input folder (input_staging.py), find missing model files and optionally write tiny
stand-ins (model_files.py), then execute with progress on stderr and write a summary (here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import comfy_env
from .input_staging import stage_input_files
from .model_files import (
    TINY_NOTE,
    find_missing_files,
    format_missing,
    missing_insightface_packs,
    tiny_checkpoints_in,
    write_tiny_models,
)
from .run_errors import MissingFileError, UsageError
from .workflow import is_ui_format
from .workflow_loading import apply_sets, load_workflow, node_title, to_api_prompt

SUMMARY_NAME = "run_summary.json"


@dataclass
class RunResult:
    prompt: dict
    outputs: dict  # node id -> UI output dict
    files: list[Path]
    texts: list[dict]
    summary_path: Path | None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ progress


class ProgressPrinter:
    """Prints which node runs and its step progress to `stream`, one line per node (steps in place on a TTY)."""

    def __init__(self, prompt: dict, node_classes: dict, stream=None, steps: bool = True):
        self.prompt = prompt
        self.steps = steps
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = len(_needed_nodes(prompt, node_classes)) or len(prompt)
        self.count = 0
        self.quarter: dict[str, tuple[int, float | None]] = {}
        self.open_line = False

    def _node(self, node_id) -> str:
        node = self.prompt.get(str(node_id))
        if node is None:
            return f"node {node_id}"
        title = node_title(node)
        return f"{node['class_type']} (node {node_id}" + (f", '{title}'" if title != node["class_type"] else "") + ")"

    def finish(self):
        """End an open step line (call after the run)."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def __call__(self, event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            self.finish()
            self.count += 1
            print(f"[{self.count}/{self.total}] {self._node(data['node'])}", file=self.stream, flush=True)
        elif event == "execution_cached" and data.get("nodes"):
            self.finish()
            print(f"cached: {len(data['nodes'])} node(s) reuse earlier results", file=self.stream, flush=True)
        elif event == "progress" and self.steps:
            value, total, node_id = data.get("value"), data.get("max"), data.get("node")
            if not total or total <= 1 or value is None:
                return
            text = f"    step {int(value)}/{int(total)}"
            if self.tty:
                self.stream.write("\r" + text)
                self.open_line = value < total
                if not self.open_line:
                    self.stream.write("\n")
                self.stream.flush()
                return
            # Off a terminal: about four lines per node (each quarter), never the same step twice in a row.
            key = str(node_id)
            quarter = int(4 * value / total)
            last_quarter, last_value = self.quarter.get(key, (0, None))
            if value != last_value and (quarter > last_quarter or value >= total or last_value is None):
                self.quarter[key] = (quarter, value)
                print(text, file=self.stream, flush=True)
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self.finish()


def _needed_nodes(prompt: dict, node_classes: dict) -> set[str]:
    """Nodes that output nodes depend on (what the executor will run, cache aside)."""
    outputs = [nid for nid, n in prompt.items()
               if getattr(node_classes.get(n["class_type"]), "OUTPUT_NODE", False) is True]
    seen, stack = set(), list(outputs)
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        for value in prompt[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                stack.append(value[0])
    return seen


# ------------------------------------------------------------------------------------------------ outputs


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    state = {}
    if folder.is_dir():
        for root, _dirs, files in os.walk(folder):
            for name in files:
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    st = path.stat()
                    state[str(path)] = (st.st_mtime_ns, st.st_size)
    return state


def _texts(prompt: dict, outputs: dict) -> list[dict]:
    found = []
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key, value in ui.items():
            items = value if isinstance(value, (list, tuple)) else [value]
            if items and all(isinstance(v, (str, int, float, bool)) for v in items):
                node = prompt.get(node_id, {})
                found.append({"node": node_id, "class_type": node.get("class_type"), "key": key,
                              "text": "\n".join(str(v) for v in items)})
    return found


# ------------------------------------------------------------------------------------------------ logging


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def quiet_logging(verbose: bool, log):
    """Non-verbose: hold back ComfyUI's warnings (e.g. optional audio nodes failing to import) and say how many."""
    if verbose:
        root = logging.getLogger()
        if not root.handlers:
            logging.basicConfig(stream=log, format="%(levelname)s %(name)s: %(message)s")
        root.setLevel(logging.INFO)
        yield
        return
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    collector = _Collect()
    root.handlers[:] = [collector]
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1] if saved[1] != logging.NOTSET else logging.WARNING)
        if collector.records and log is not None:
            print(f"ComfyUI logged {len(collector.records)} warning(s) while loading (shown with --verbose)", file=log)


class _DropExecutorErrors(logging.Filter):
    """ComfyUI's executor logs validation failures and node exceptions (with tracebacks) at ERROR level; the runner
    reports both itself (tracebacks with --verbose), so without --verbose these duplicates are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and os.path.basename(record.pathname) == "execution.py")


@contextlib.contextmanager
def _executor_logging(verbose: bool):
    if verbose:
        yield
        return
    root = logging.getLogger()
    drop = _DropExecutorErrors()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ------------------------------------------------------------------------------------------------ main entry


def run_workflow(
    workflow,
    *,
    sets: list[str] = (),
    models_dir=None,
    output_dir="out",
    input_dir=None,
    comfyui=None,
    gpu: bool = False,
    make_tiny_checkpoint_name: str | None = None,
    verbose: bool = False,
    log=None,
    out=None,
) -> RunResult:
    """Run a workflow (path or loaded dict; UI or API format) in this process through ComfyUI.

    `make_tiny_checkpoint_name`: "" = a tiny checkpoint for every missing checkpoint the workflow names, or a file
    name; written into `models_dir`/checkpoints (a temporary models folder when models_dir is None).
    Raises UsageError, WorkflowFormatError or WorkflowError (MissingFileError for absent models/inputs).
    """
    log = log if log is not None else sys.stderr
    out = out if out is not None else sys.stdout
    started = time.time()
    data, workflow_dir = load_workflow(workflow)
    if comfyui is not None and not (Path(comfyui) / "nodes.py").is_file():
        raise UsageError(f"--comfyui {comfyui}: not a ComfyUI folder (no nodes.py there)")
    output_dir = Path(output_dir).resolve()
    cleanup: list[Path] = []
    try:
        with quiet_logging(verbose, log):
            try:
                runtime = comfy_env.boot(Path(comfyui) if comfyui else None, cpu=not gpu, quiet=not verbose)
            except FileNotFoundError as exc:
                raise UsageError(str(exc)) from exc
        import comfy.utils
        import folder_paths

        import nodes

        saved_dirs = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
                      folder_paths.get_temp_directory())
        comfy_input_dir = Path(saved_dirs[1])
        if input_dir is None:
            input_dir = Path(tempfile.mkdtemp(prefix="magic_portrait_input_")).resolve()
            cleanup.append(input_dir)
        if make_tiny_checkpoint_name is not None and models_dir is None:
            models_dir = Path(tempfile.mkdtemp(prefix="magic_portrait_models_"))
            cleanup.append(models_dir)
            print(f"models: temporary folder {models_dir} (removed after the run; pass --models-dir to keep files)",
                  file=log)
        input_dir = Path(input_dir).resolve()
        comfy_env.boot(models_dir=models_dir, output_dir=output_dir, input_dir=input_dir,
                       temp_dir=output_dir / "previews")
        progress_enabled = comfy.utils.PROGRESS_BAR_ENABLED
        try:
            node_classes = nodes.NODE_CLASS_MAPPINGS
            warnings: list[str] = []
            prompt = to_api_prompt(data, node_classes, warnings)
            for warning in warnings:
                print(f"warning: {warning}", file=log)
            for node_id, name, value in apply_sets(prompt, list(sets), node_classes,
                                                   getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", None)):
                print(f"set: node {node_id} ({prompt[node_id]['class_type']}) {name} = {value!r}", file=log)
            search = list(dict.fromkeys(d for d in (Path.cwd(), workflow_dir, comfy_input_dir) if d is not None))
            stage_input_files(prompt, node_classes, input_dir, search, log=log)

            looked = ([] if input_dir in cleanup else [input_dir]) + search
            missing = find_missing_files(prompt, node_classes, looked)
            if make_tiny_checkpoint_name is not None:
                write_tiny_models(models_dir, missing, checkpoint_name=make_tiny_checkpoint_name,
                                  insightface_packs=missing_insightface_packs(prompt, runtime), runtime=runtime,
                                  log=log)
                folder_paths.filename_list_cache.clear()
                missing = find_missing_files(prompt, node_classes, looked)
            if missing:
                raise MissingFileError(format_missing(missing))

            before = _snapshot(output_dir)
            printer = ProgressPrinter(prompt, node_classes, log, steps=not verbose)  # verbose: tqdm shows steps
            comfy.utils.PROGRESS_BAR_ENABLED = verbose  # tqdm bars only in verbose mode; we print steps ourselves
            runtime.executor = None  # a run is a fresh run: no results cached from earlier prompts in this process
            # Like the frontend, give SaveImage the UI workflow to embed, so outputs open again in ComfyUI.
            extra = {"extra_pnginfo": {"workflow": data}} if is_ui_format(data) else None
            with _executor_logging(verbose):
                outputs = runtime.run_prompt(prompt, listener=printer, extra_data=extra)
            printer.finish()
            after = _snapshot(output_dir)
            files = sorted(Path(p) for p, state in after.items() if before.get(p) != state)
            result = RunResult(prompt=prompt, outputs=outputs, files=files, texts=_texts(prompt, outputs),
                               summary_path=output_dir / SUMMARY_NAME, warnings=warnings,
                               seconds=time.time() - started)
            _write_summary(result, None if isinstance(workflow, dict) else str(Path(workflow).resolve()), runtime,
                           output_dir)
            _print_summary(result, output_dir, out)
            tiny = tiny_checkpoints_in(prompt)
            if tiny:
                print(f"{TINY_NOTE} (used: {', '.join(tiny)})", file=log)
            return result
        finally:
            comfy.utils.PROGRESS_BAR_ENABLED = progress_enabled
            folder_paths.set_output_directory(saved_dirs[0])
            folder_paths.set_input_directory(saved_dirs[1])
            folder_paths.set_temp_directory(saved_dirs[2])
    finally:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def _write_summary(result: RunResult, workflow: str | None, runtime, output_dir: Path) -> None:
    nodes_out = {
        node_id: {"class_type": result.prompt.get(node_id, {}).get("class_type"),
                  "title": node_title(result.prompt[node_id]) if node_id in result.prompt else None, "ui": ui}
        for node_id, ui in result.outputs.items()
    }
    summary = {
        "workflow": workflow,
        "comfyui": str(runtime.root),
        "seconds": round(result.seconds, 3),
        "outputs": nodes_out,
        "files": [str(p) for p in result.files],
        "texts": result.texts,
        "warnings": result.warnings,
        "prompt": result.prompt,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    result.summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def _print_summary(result: RunResult, output_dir: Path, out) -> None:
    print(f"done in {result.seconds:.1f} s; {len(result.files)} file(s) written to {output_dir}:", file=out)
    for path in result.files:
        print(f"  {path}", file=out)
    if result.texts:
        print("text outputs:", file=out)
        for text in result.texts:
            body = text["text"].replace("\n", "\n      ")
            print(f"  node {text['node']} ({text['class_type']}) {text['key']}: {body}", file=out)
    print(f"summary: {result.summary_path}", file=out)
