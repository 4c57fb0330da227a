"""Regenerate tests/fixtures/frontend/: example workflows as the real ComfyUI frontend saves them.

ComfyUI's main.py serves the installed frontend (`comfyui-frontend-package`) on a free local port with this pack
installed; headless Chromium opens it, and for each template the frontend itself loads it (`app.loadGraphData`, as
the template browser does) and runs its own commands "Export" (Comfy.ExportWorkflow: the UI workflow it saves) and
"Export (API)" (Comfy.ExportWorkflowAPI: its graphToPrompt output), captured as downloads; then once more after
every widget was set to another, distinct value in the page (`<template>.edited.*`). The node definitions the
frontend was given (/api/object_info, for the node types these workflows use) are kept beside them, so the test
converts each saved workflow with exactly the definitions the frontend had, whatever the nodes become later.

Needs Chromium (Debian: `apt-get install -y chromium`; `--chromium PATH` for another binary). The browser is driven
over the DevTools protocol with aiohttp (a ComfyUI requirement), so nothing else is installed. Chromium is not
needed by the tests or CI: only the files this writes are.

    python scripts/make_frontend_fixtures.py [--chromium /usr/bin/chromium] [--out tests/fixtures/frontend]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from comfy_server import PACK_FOLDER, ServerError, start_server  # noqa: E402

from magic_portrait.comfy_env import find_comfyui  # noqa: E402

# Templates that together hold every kind of widget entry the frontend writes: seed controls (KSampler,
# SamplerCustom), image upload buttons (LoadImage), combos, floats rounded by their step, multiline text, Notes and
# groups, optional widgets after sockets (DDIM Invert's bdia_gamma), the pack's own custom types.
TEMPLATES = ("ddim_invert_sampler_custom", "magicstyle_portrait", "magicid_group_photo")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1600,1000")
# Frontend settings for a scripted session: exports download under the workflow's name without asking for one.
SETTINGS = {"Comfy.PromptFilename": False, "Comfy.TutorialCompleted": True}
PAGE_SECONDS = 180
# In the page: give every widget of the loaded workflow another value, each different from the others (numbers on
# their own step grid within min/max, the next combo option, toggled booleans, distinct text, seed controls other
# than "fixed"), the way a user edits a template before saving it. With distinct values, a converter that assigns
# widgets_values to the wrong inputs cannot agree with the frontend's own API export by chance.
EDIT_WIDGETS_JS = """(() => {
  let k = 0, changed = 0;
  const controls = ['increment', 'decrement', 'randomize'];
  for (const node of app.graph.nodes) {
    for (const w of node.widgets ?? []) {
      k += 1;
      const o = w.options ?? {};
      let value;
      if (w.name === 'control_after_generate') value = controls[k % controls.length];
      else if (w.name === 'control_filter_list') value = '';
      else if (w.type === 'number') {
        const step = o.step2 ?? (o.step ? o.step / 10 : 1);
        const min = Number.isFinite(o.min) ? o.min : 0;
        const max = Number.isFinite(o.max) ? o.max : min + 1e6;
        const slots = Math.max(1, Math.floor((max - min) / step));
        value = min + step * (1 + (k * 7) % slots);
        const digits = o.precision ?? (step < 1 ? Math.ceil(-Math.log10(step)) : 0);
        value = Number(value.toFixed(digits));
        if (value === w.value) value = Number((value + step <= max ? value + step : value - step).toFixed(digits));
      } else if (w.type === 'combo') {
        const values = typeof o.values === 'function' ? o.values() : (o.values ?? []);
        if (values.length < 2) continue;
        value = values[(values.indexOf(w.value) + 1) % values.length];
      } else if (w.type === 'toggle') value = !w.value;
      else if (w.type === 'text' || w.type === 'customtext' || w.type === 'string') {
        if (node.type === 'Note' || node.type === 'MarkdownNote') continue;
        value = `${w.name} ${k}`;
      } else continue;
      w.value = value;
      w.callback?.(w.value, app.canvas, node);
      changed += 1;
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return changed;
})()"""


class CDP:
    """A minimal Chrome DevTools Protocol session over one websocket (commands and the events they cause)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, 120)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})


async def evaluate(cdp: CDP, session: str, expression: str):
    """The value of a JavaScript expression in the page (promises awaited), or an error with the page's message."""
    result = await cdp.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                 "returnByValue": True}, session)
    if "exceptionDetails" in result:
        details = result["exceptionDetails"]
        raise RuntimeError(f"in the page: {details.get('exception', {}).get('description') or details}")
    return result["result"].get("value")


async def wait_for(cdp: CDP, session: str, expression: str, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if await evaluate(cdp, session, expression):
                return
        except RuntimeError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the frontend did not {what} within {seconds} s")


async def download(cdp: CDP, session: str, command: str, folder: Path) -> Path:
    """Run a frontend command that downloads a file; returns the downloaded file."""
    seen = len(cdp.events)
    await evaluate(cdp, session, f"app.extensionManager.command.execute({json.dumps(command)}).then(() => true)")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for event in cdp.events[seen:]:
            params = event.get("params", {})
            if event["method"] == "Browser.downloadProgress" and params.get("state") == "completed":
                return folder / params["guid"]
            if event["method"] == "Browser.downloadProgress" and params.get("state") == "canceled":
                raise RuntimeError(f"{command}: the download was canceled")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{command} downloaded nothing within 60 s")


@contextlib.contextmanager
def frontend_server(comfy_root: Path, work: Path):
    """ComfyUI with this pack, serving the frontend from `work`, set up for a scripted session; stopped on leaving."""
    server = start_server(comfy_root, work / "comfyui")
    try:
        server.wait_until_up(300)
        status, body = server.request("POST", "/api/settings", SETTINGS)
        if status != 200:
            raise ServerError(f"POST /api/settings: HTTP {status}: {body[:300]!r}")
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def frontend_page(chromium: str, server_url: str, profile: Path, downloads: Path | None = None):
    """(cdp, session) of a headless Chromium tab with ComfyUI's frontend from `server_url` started in it; downloads
    land in `downloads` (named by their guid) when given. Chromium is stopped on leaving."""
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],  # noqa: S603
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if browser.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium ({chromium}) did not start its DevTools endpoint")
            await asyncio.sleep(0.2)
        port, path = port_file.read_text().split()[:2]
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{path}",
                                                                    max_msg_size=0) as ws:
            cdp = CDP(ws)
            if downloads is not None:
                await cdp.send("Browser.setDownloadBehavior", {"behavior": "allowAndName",
                                                               "downloadPath": str(downloads), "eventsEnabled": True})
            target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            await cdp.send("Runtime.enable", {}, session)
            await cdp.send("Page.enable", {}, session)
            await cdp.send("Page.navigate", {"url": server_url + "/"}, session)
            await wait_for(cdp, session, "!!(window.app && window.app.rootGraph && window.app.extensionManager"
                           " && window.app.extensionManager.command && window.LiteGraph)", PAGE_SECONDS,
                           "start (window.app)")
            try:
                yield cdp, session
            finally:
                cdp.reader.cancel()
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()


async def capture(chromium: str, server_url: str, templates: tuple[str, ...], work: Path) -> dict:
    """{template: (saved UI workflow, API export)} as the frontend in `chromium` produces them, plus its version."""
    downloads = work / "downloads"
    downloads.mkdir()
    async with frontend_page(chromium, server_url, work / "profile", downloads) as (cdp, session):
        version = await evaluate(cdp, session, "window.__COMFYUI_FRONTEND_VERSION__ || null")
        results = {}
        for name in templates:
            url = f"/api/workflow_templates/{PACK_FOLDER}/{name}.json"
            await evaluate(cdp, session, f"""(async () => {{
                const workflow = await (await fetch({json.dumps(url)})).json();
                await app.loadGraphData(workflow, true, true, {json.dumps(name)});
                return true;
            }})()""")
            await asyncio.sleep(1.0)  # let the frontend settle (widget callbacks, node sizes) as a user would
            for variant in ("", ".edited"):
                if variant:
                    changed = await evaluate(cdp, session, EDIT_WIDGETS_JS)
                    if not changed:
                        raise RuntimeError(f"{name}: no widget could be edited")
                    await asyncio.sleep(0.5)
                saved = json.loads((await download(cdp, session, "Comfy.ExportWorkflow", downloads)).read_text())
                api = json.loads((await download(cdp, session, "Comfy.ExportWorkflowAPI", downloads)).read_text())
                results[name + variant] = (saved, api)
        return {"frontend_version": version, "workflows": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "frontend")
    parser.add_argument("--templates", nargs="+", default=list(TEMPLATES))
    args = parser.parse_args(argv)
    comfy_root = find_comfyui()
    if comfy_root is None:
        print("no ComfyUI found: run scripts/setup.sh or set COMFYUI_PATH", file=sys.stderr)
        return 1
    if not Path(args.chromium).is_file():
        print(f"no Chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="magic_portrait_frontend_") as tmp:
        work = Path(tmp)
        with frontend_server(comfy_root, work) as server:
            object_info = server.get_json("/api/object_info")
            captured = asyncio.run(capture(args.chromium, server.url, tuple(args.templates), work))
    package_version = importlib.metadata.version("comfyui-frontend-package")
    if captured["frontend_version"] not in (None, package_version):
        print(f"warning: the page reports frontend {captured['frontend_version']}, the installed package is "
              f"{package_version}", file=sys.stderr)
    chromium_version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True,  # noqa: S603
                                      check=False).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    used = set()
    for name, (saved, api) in captured["workflows"].items():
        (args.out / f"{name}.workflow.json").write_text(json.dumps(saved, indent=2) + "\n")
        (args.out / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n")
        used |= {node["type"] for node in saved["nodes"]} | {node["class_type"] for node in api.values()}
    (args.out / "object_info.json").write_text(
        json.dumps({k: object_info[k] for k in sorted(used) if k in object_info}, indent=1) + "\n")
    about = {
        "made_by": "scripts/make_frontend_fixtures.py",
        "comfyui_frontend_package": package_version,
        "frontend_version_in_page": captured["frontend_version"],
        "comfyui": (comfy_root / "comfyui_version.py").read_text().split('"')[1]
        if (comfy_root / "comfyui_version.py").is_file() else "unknown",
        "browser": chromium_version,
        "templates": list(args.templates),
        "workflows": sorted(captured["workflows"]),
        "files": "<template>.workflow.json: the frontend's Export (the UI workflow it saves) of the template as opened; "
                 "<template>.api.json: its Export (API) (graphToPrompt); <template>.edited.*: the same after every "
                 "widget was given another, distinct value in the page; object_info.json: the node definitions the "
                 "frontend was given",
    }
    (args.out / "frontend.json").write_text(json.dumps(about, indent=2) + "\n")
    print(f"wrote {len(captured['workflows'])} workflows to {args.out} with comfyui-frontend-package "
          f"{package_version} ({chromium_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
