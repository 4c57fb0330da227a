#!/usr/bin/env bash
# Set up a machine for Magic Portrait's tests: ComfyUI, torch + torchvision, ComfyUI's requirements, the dev tools.
# Idempotent: on a machine that already has everything it only checks.
#
# ComfyUI (not on PyPI) is looked for where the tests look: $COMFYUI_PATH, ~/comfy/ComfyUI (comfy-cli's default
# workspace), or the ComfyUI whose custom_nodes/ holds this pack. One that is found is used as it is. When none is
# found, the ComfyUI archive is unpacked to ~/comfy/ComfyUI: $MAGIC_PORTRAIT_COMFYUI_ARCHIVE if set, else
# ../shared/vendor/ComfyUI-0.8.0.tar.gz beside the repository (every machine that runs the tests has it).
#
# Strict mode (CI=true, or MAGIC_PORTRAIT_REQUIRE_COMFYUI=1): no ComfyUI and no archive is an error here, and the
# test run fails when its ComfyUI tier is skipped or runs no test (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
truthy() { case "$(printf '%s' "${1:-}" | tr '[:upper:]' '[:lower:]')" in 1|true|yes) return 0;; *) return 1;; esac; }
strict=false
if truthy "${CI:-}" || truthy "${MAGIC_PORTRAIT_REQUIRE_COMFYUI:-}"; then strict=true; fi

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # torch 2.14.1 + torchvision 0.29.1 import together (a plain PyPI torchvision does not beside torch 2.13 CPU).
  pipi "torch==2.14.1" "torchvision==0.29.1"
fi

find_comfy() { "$PY" -c "from magic_portrait.comfy_env import find_comfyui; print(find_comfyui() or '')"; }
if [ -n "${COMFYUI_PATH:-}" ] && { [ ! -f "$COMFYUI_PATH/nodes.py" ] || [ ! -f "$COMFYUI_PATH/comfy/model_management.py" ]; }; then
  # the user named a ComfyUI: never fall back to another one (or unpack one) behind their back
  echo "setup: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no nodes.py and comfy/model_management.py);" \
       "fix or unset it" >&2
  exit 1
fi
COMFY=$(find_comfy)
if [ -z "$COMFY" ]; then
  ARCHIVE=${MAGIC_PORTRAIT_COMFYUI_ARCHIVE:-$(cd .. && pwd)/shared/vendor/ComfyUI-0.8.0.tar.gz}
  TARGET="$HOME/comfy/ComfyUI"
  if [ ! -f "$ARCHIVE" ]; then
    echo "setup: no ComfyUI found (COMFYUI_PATH, $TARGET, or a ComfyUI holding this pack) and no ComfyUI archive" \
         "at $ARCHIVE (set MAGIC_PORTRAIT_COMFYUI_ARCHIVE to one, or COMFYUI_PATH to a checkout)"
    if $strict; then
      echo "setup: strict mode (CI=true or MAGIC_PORTRAIT_REQUIRE_COMFYUI=1) needs the ComfyUI tier: stopping" >&2
      exit 1
    fi
    echo "setup: the ComfyUI tier will be skipped"
  elif [ -e "$TARGET" ]; then
    # never unpack over a folder someone put there
    echo "setup: $TARGET exists but is not a ComfyUI checkout; move it away or set COMFYUI_PATH" >&2
    exit 1
  else
    echo "setup: unpacking $ARCHIVE to $TARGET"
    mkdir -p "$HOME/comfy"
    staging=$(mktemp -d "$HOME/comfy/.unpack.XXXXXX")
    tar xzf "$ARCHIVE" -C "$staging"
    if [ ! -f "$staging/ComfyUI/nodes.py" ]; then
      rm -rf "$staging"
      echo "setup: $ARCHIVE does not hold a top-level ComfyUI/ folder" >&2
      exit 1
    fi
    mv "$staging/ComfyUI" "$TARGET"  # whole or not at all: a half-unpacked tree is never found as a ComfyUI
    rm -rf "$staging"
    COMFY=$(find_comfy)
  fi
fi
if [ -n "$COMFY" ]; then
  # ComfyUI's requirements without torch/torchvision (above) and torchaudio (not needed; its audio nodes warn).
  reqs=$(mktemp)
  grep -v -E '^\s*(#|$|torch$|torchvision|torchaudio)' "$COMFY/requirements.txt" > "$reqs"
  pipi -r "$reqs"
  rm -f "$reqs"
  echo "setup: ComfyUI at $COMFY"
fi
pipi -r requirements-dev.txt
