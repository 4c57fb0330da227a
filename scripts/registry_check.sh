#!/usr/bin/env bash
# The Comfy registry's own check (`comfy node validate`: pyproject [tool.comfy], ruff's S102/S307/E702 security rules),
# run from comfy-cli installed in a venv of its own so its dependencies never mix with ComfyUI's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${COMFY_CLI_VENV:-$HOME/.cache/magic_portrait/comfy-cli-venv}
if [ ! -x "$VENV/bin/comfy" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check comfy-cli
fi
"$VENV/bin/comfy" --skip-prompt --no-enable-telemetry node validate
