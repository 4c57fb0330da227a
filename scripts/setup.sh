#!/usr/bin/env bash
# Set up a machine for Magic Portrait's tests: torch + torchvision, ComfyUI's requirements, the pack's dev tools.
# Idempotent: on a machine that already has everything it only checks. ComfyUI itself is not on PyPI: put a
# checkout at ~/comfy/ComfyUI (comfy-cli's default workspace) or point COMFYUI_PATH at one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # torch 2.14.1 + torchvision 0.29.1 import together (a plain PyPI torchvision does not beside torch 2.13 CPU).
  pipi "torch==2.14.1" "torchvision==0.29.1"
fi

COMFY=$("$PY" -c "from magic_portrait.comfy_env import find_comfyui; print(find_comfyui() or '')")
if [ -n "$COMFY" ]; then
  # ComfyUI's requirements without torch/torchvision (above) and torchaudio (not needed; its audio nodes warn).
  grep -v -E '^\s*(#|$|torch$|torchvision|torchaudio)' "$COMFY/requirements.txt" > /tmp/magic_portrait_comfy_reqs.txt
  pipi -r /tmp/magic_portrait_comfy_reqs.txt
  echo "setup: ComfyUI at $COMFY"
else
  echo "setup: no ComfyUI found (COMFYUI_PATH, ~/comfy/ComfyUI, or a ComfyUI holding this pack): the ComfyUI tier will be skipped"
fi
pipi -r requirements-dev.txt
