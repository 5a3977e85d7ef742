#!/usr/bin/env bash
# Issue 15's GPU part as one prepared call of the device tool (JAX backend):
#   1. the Pallas grouped-matmul tests, compiled for the GPU (Triton);
#   2. benchmarks/grouped_matmul.py: ragged_dot vs the kernels vs einsum;
#   3. benchmarks/moe_layer.py: the layer's dropless step (the kernels, chosen
#      by MOE_KERAS_JAX_GROUPED_MATMUL=auto on GPUs) vs capacity mode 1.25.
# The device has JAX with CUDA but no Keras: carry wheels made here with
#   .venv/bin/pip download keras==3.15.1 namex optree absl-py gin-config \
#     --no-deps -d gpu_wheels
# and run `bash benchmarks/gpu_check.sh` with carry=["gpu_wheels"].
# Tables go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
source benchmarks/gpu_env.sh
python3 -m pytest tests/layers/test_pallas_grouped_matmul.py -q \
  -p no:cacheprovider -k "not sparse_moe" 2>&1 | tail -15 \
  | tee "$out/kernel_tests.txt"
for dtype in bfloat16 float32; do
  timeout 150 python3 benchmarks/grouped_matmul.py --dtype="$dtype" \
    --groups=16,64,256,1024 2>&1 | grep -v "^[WIE][0-9]" \
    | tee "$out/grouped_matmul_$dtype.txt"
done
for cf in "" "--capacity_factor=1.25"; do
  timeout 150 python3 benchmarks/moe_layer.py --dtype=mixed_bfloat16 \
    --tokens=8192 --num_experts=16,64,256,1024 --rounds=1 --repeats=30 $cf \
    --noexperts_alone 2>&1 | grep "^|\|^SparseMoE" | tee -a "$out/moe_layer.txt"
done
