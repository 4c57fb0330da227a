"""Check web/magic_portrait.js in the real ComfyUI frontend (headless Chromium, as make_frontend_fixtures.py drives it).

Opens ID Embeds workflows the way a user does and reads what the frontend holds and exports:
- the magicid_group_photo workflow as the frontend saved it with Magic Portrait 0.2 (tests/fixtures/frontend: no
  convention property, face_margin 0.4 both sides) opens with face_margin 0.2 per side, and its Export (API) says 0.2;
- saved again and reopened, it stays 0.2 (halved once, not on every load);
- the bundled template (saved with the property) opens unchanged;
- a new ID Embeds node carries the property, so it is saved with it.

Needs Chromium; not run by the tests or CI.    python scripts/check_frontend_migration.py [--chromium PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_server import PACK_FOLDER  # noqa: E402
from make_frontend_fixtures import evaluate, frontend_page, frontend_server  # noqa: E402

from magic_portrait.comfy_env import find_comfyui  # noqa: E402

OLD_SAVED = REPO / "tests" / "fixtures" / "frontend" / "magicid_group_photo.workflow.json"

READ_JS = """(() => app.graph.nodes.filter(n => n.type === 'MagicPortrait_IDEmbeds').map(n => ({
  id: n.id, face_margin: n.widgets.find(w => w.name === 'face_margin').value,
  convention: n.properties?.face_margin_convention ?? null})))()"""
EXPORT_JS = """(async () => {
  const p = await app.graphToPrompt();
  return Object.entries(p.output).filter(([, n]) => n.class_type === 'MagicPortrait_IDEmbeds')
    .map(([id, n]) => [id, n.inputs.face_margin]);
})()"""


async def check(chromium: str, server_url: str, work: Path) -> list[str]:
    problems = []
    async with frontend_page(chromium, server_url, work / "profile") as (cdp, session):

        async def load(workflow: dict, name: str):
            await evaluate(cdp, session, f"(async () => {{ await app.loadGraphData({json.dumps(workflow)}, true, "
                                         f"true, {json.dumps(name)}); return true; }})()")
            await asyncio.sleep(1.0)
            return await evaluate(cdp, session, READ_JS), await evaluate(cdp, session, EXPORT_JS)

        def expect(what, got, want):
            print(f"{what}: {got}")
            if got != want:
                problems.append(f"{what}: got {got}, want {want}")

        old = json.loads(OLD_SAVED.read_text())
        nodes, exported = await load(old, "saved with 0.2")
        expect("0.2 workflow, widgets", [(n["face_margin"], n["convention"]) for n in nodes], [(0.2, "per side")] * 2)
        expect("0.2 workflow, Export (API)", [m for _, m in exported], [0.2, 0.2])
        saved = await evaluate(cdp, session, "app.graph.serialize()")
        nodes, _ = await load(saved, "saved again")
        expect("saved again and reopened", [n["face_margin"] for n in nodes], [0.2, 0.2])
        template = await evaluate(cdp, session, f"(async () => (await fetch('/api/workflow_templates/"
                                                f"{PACK_FOLDER}/magicid_group_photo.json')).json())()")
        nodes, _ = await load(template, "template")
        expect("bundled template", [(n["face_margin"], n["convention"]) for n in nodes], [(0.2, "per side")] * 2)
        created = await evaluate(cdp, session, "(() => { const n = LiteGraph.createNode('MagicPortrait_IDEmbeds');"
                                               " return n.properties?.face_margin_convention ?? null; })()")
        expect("new node's property", created, "per side")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    comfy_root = find_comfyui()
    if comfy_root is None or not Path(args.chromium).is_file():
        print("needs ComfyUI (scripts/setup.sh) and Chromium (apt-get install -y chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="magic_portrait_migration_") as tmp, \
            frontend_server(comfy_root, Path(tmp)) as server:
        problems = asyncio.run(check(args.chromium, server.url, Path(tmp)))
    print("\n".join(problems) if problems else "the frontend reads every ID Embeds margin as meant")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
