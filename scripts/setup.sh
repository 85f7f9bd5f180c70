#!/usr/bin/env bash
# Installs everything npc-server needs into .venv/ at the repo root. Idempotent: a second run with
# nothing changed takes a second. Debian/Ubuntu system packages are installed when missing (as root,
# or with sudo): espeak-ng and sox make the speech clips the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "npc-server needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

missing=()
for tool in espeak-ng sox; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.npc-setup
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  "${pip[@]}" -r requirements/base.txt -r requirements/dev.txt
  # These packages declare dependencies they do not need here (TensorFlow, jax, llm): files only.
  "${pip[@]}" --no-deps -r requirements/nodeps.txt
  "${pip[@]}" --no-deps -e .
  echo "$want" > "$stamp"
fi
