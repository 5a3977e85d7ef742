#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job: the
# SparseMoE layer benchmark on its embedded default configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python benchmarks/moe_layer.py "$@"
