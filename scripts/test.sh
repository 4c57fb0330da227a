#!/usr/bin/env bash
# Set up (idempotent) and run every check: ruff (with the registry's S rules), the registry's own `comfy node validate`
# and both test tiers. The last line says how many ComfyUI-tier tests ran. Under CI=true (or
# MAGIC_PORTRAIT_REQUIRE_COMFYUI=1) a missing ComfyUI, or a ComfyUI tier that is skipped or runs nothing, fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check .
bash scripts/registry_check.sh
status=0
rm -f .pytest_cache/comfy_tier.txt
"$PY" -m pytest -q -p no:randomly "$@" || status=$?
cat .pytest_cache/comfy_tier.txt 2>/dev/null || echo "ComfyUI tier: no summary written (pytest exit code $status)"
exit $status
