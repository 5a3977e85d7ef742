#!/usr/bin/env bash
# Issue 13's width-512 LM table as one prepared call of the device tool (JAX
# backend, no TensorFlow there): benchmarks/lm_gpu.py --mode=train.
# Prepare here, once:
#   .venv/bin/python benchmarks/lm_gpu.py --mode=export   # gpu_data/, ~20 MiB
#   .venv/bin/pip download keras==3.15.1 namex optree absl-py gin-config \
#     --no-deps -d gpu_wheels
# then call the device with carry=["gpu_data", "gpu_wheels"] and the command
#   bash benchmarks/gpu_lm.sh
# Knobs (environment): CONFIGS, SEEDS, LRS, STEPS, EVAL, ROWS, BUDGET (s),
# DIM and HIDDEN (model width 512 and experts' hidden size 1024: the paper's),
# PIECE_SQUARES (default True: squares taps give JAX's Adam TensorFlow's
# per-piece second moment, the optimizer of the CPU tables; README "Adam on
# repeated rows").
# The summaries come back under $OUT/lm_debian_docs_gpu512/runs/; copy them to
# results/lm_debian_docs_gpu512/runs/ and print the tables here with
#   .venv/bin/python benchmarks/lm_results.py --corpus=debian_docs \
#     --results_dir=results/lm_debian_docs_gpu512 --grid_lr=$LRS \
#     --train_steps=$STEPS --seeds=$SEEDS --configs=$CONFIGS \
#     --gin_bindings="MODEL_DIM = 512" \
#     --gin_bindings="moe_spec.expert_hidden_dim = 1024" --mode=table
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_lm}"
source benchmarks/gpu_env.sh
timeout "$(( ${BUDGET:-420} + 120 ))" python3 benchmarks/lm_gpu.py --mode=train \
  --arrays=gpu_data/debian_docs_lm.npz \
  --configs="${CONFIGS:-4xlstm_128,moe_32}" --seeds="${SEEDS:-0,1}" \
  --lrs="${LRS:-4e-3}" --train_steps="${STEPS:-1500}" \
  --steps_per_eval="${EVAL:-250}" --rows="${ROWS:-128}" --pack_length=64 \
  --gin_bindings="MODEL_DIM = ${DIM:-512}" \
  --gin_bindings="moe_spec.expert_hidden_dim = ${HIDDEN:-1024}" \
  --gin_bindings="lm_config.piece_squares = ${PIECE_SQUARES:-True}" \
  --results_dir="$out/lm_debian_docs_gpu512" \
  --time_budget_s="${BUDGET:-420}" 2>&1 | grep -v "^[WI][0-9]" \
  | tee "$out/lm_gpu.txt"
