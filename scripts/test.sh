#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# --durations: the slowest tests, so a CI log says where its time goes.
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"
