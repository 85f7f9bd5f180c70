#!/usr/bin/env bash
# Set everything up (idempotent), then run the server on its embedded defaults (127.0.0.1:8000).
# Extra arguments go to `npc-server serve`, e.g. scripts/serve.sh --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/npc-server serve "$@"
