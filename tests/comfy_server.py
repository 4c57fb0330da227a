"""ComfyUI's own main.py as a real server in a subprocess: CPU, a free port on 127.0.0.1, every folder (base, input,
output, temp, user database) in one temporary base folder, the pack linked into its custom_nodes/ as an install puts
it there, no API nodes. Used by tests/test_server_templates.py and scripts/make_frontend_fixtures.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The folder an install gives the pack: the registry's node id, pyproject's [project] name.
PACK_FOLDER = re.search(r'(?m)^name\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """The server exited, did not answer in time, or refused a request."""


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 and the folders it was given."""

    def __init__(self, process: subprocess.Popen, port: int, base: Path, log_path: Path):
        self.process, self.port, self.base, self.log_path = process, port, base, log_path
        self.input_dir, self.output_dir, self.models_dir = base / "input", base / "output", base / "models"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get_json(self, path: str):
        status, data = self.request("GET", path)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until_up(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                if self.request("GET", "/api/system_stats", timeout=5)[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {seconds} s:\n{self.log_tail()}")

    def stop(self) -> int:
        """Ctrl+C, as a user stops ComfyUI; a forced kill only if it hangs. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if os.name != "nt" else signal.CTRL_BREAK_EVENT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(comfy_root: Path, base: Path) -> ComfyServer:
    """Start ComfyUI's main.py serving from `base` (custom_nodes/ with the pack linked in, input/, output/, models/,
    user/ created empty); returns at once: call wait_until_up before talking to it."""
    for folder in ("custom_nodes", "input", "output", "models", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    port = free_port()
    command = [
        sys.executable, str(Path(comfy_root) / "main.py"), "--cpu", "--listen", HOST, "--port", str(port),
        "--disable-auto-launch", "--base-directory", str(base), "--input-directory", str(base / "input"),
        "--output-directory", str(base / "output"), "--temp-directory", str(base),  # ComfyUI adds "temp"
        "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",  # by default it sits beside ComfyUI
        # Faster on CPU (as comfy_env uses it); no API nodes: nothing here may reach the internet.
        "--use-pytorch-cross-attention", "--disable-api-nodes",
    ]
    log_path = base / "comfyui.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
    return ComfyServer(process, port, base, log_path)


class NodeDefinition:
    """A node type as /object_info describes it: all the UI-to-API converter and the workflow builder read of a node
    class."""

    def __init__(self, info: dict):
        self.info = info

    def INPUT_TYPES(self) -> dict:  # noqa: N802 (ComfyUI's name)
        return self.info["input"]

    @property
    def RETURN_TYPES(self) -> tuple:  # noqa: N802
        return tuple(self.info.get("output") or ())

    @property
    def RETURN_NAMES(self) -> tuple:  # noqa: N802
        return tuple(self.info.get("output_name") or self.RETURN_TYPES)


def definitions_from_object_info(object_info: dict) -> dict[str, NodeDefinition]:
    return {name: NodeDefinition(info) for name, info in object_info.items()}
