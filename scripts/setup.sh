#!/usr/bin/env bash
# Creates .venv (if needed) and installs moe_keras with its test and JAX extras
# from this repository's own files. Idempotent: reinstalls only when setup.py
# changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $("${PYTHON}" --version)"
  "${PYTHON}" -m venv .venv
fi
stamp=".venv/.moe_keras_installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
  echo "[setup] installing moe_keras[test,jax] and its pinned dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  # The build backend warns on every editable install that a folder named
  # like the package may shadow it: that folder is this checkout, on purpose.
  PYTHONWARNINGS="ignore::UserWarning" \
    .venv/bin/python -m pip install -q -e ".[test,jax]"
  echo "${want}" > "${stamp}"
fi
