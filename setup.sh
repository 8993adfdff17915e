#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs everything the project needs.
# Safe to run again: a second run checks the stamp left by the first and finishes in seconds.
#   HISEG_VENV   where the environment lives (default: .venv next to this file)
#   PYTHON       the interpreter used to create it (default: python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${HISEG_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
exec "$venv/bin/python" "$here/tools/install_deps.py" "$@"
