#!/usr/bin/env bash
# Set everything up (idempotent), then lint, type-check and run the whole test suite, real models included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check npc_server tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
