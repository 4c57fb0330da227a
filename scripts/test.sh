#!/usr/bin/env bash
# Set up (idempotent) and run every check: ruff (with the registry's S rules), the registry's own `comfy node validate`
# and both test tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check .
bash scripts/registry_check.sh
status=0
"$PY" -m pytest -q -p no:randomly "$@" || status=$?
echo "$(cat .pytest_cache/comfy_tier.txt 2>/dev/null || echo 'ComfyUI tier: no summary written')"
exit $status
