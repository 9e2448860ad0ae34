#!/usr/bin/env bash
# Install into .venv and run the tests. --slow adds the tests on the real SmolLM2-135M (as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
if [ "${1:-}" = "--slow" ]; then
  shift
  exec "$VENV/bin/python" -m pytest -m "slow or not slow" "$@"
fi
exec "$VENV/bin/python" -m pytest "$@"
