# Sourced by the device scripts (gpu_check.sh, gpu_lm.sh) from the repository
# root with $out set: installs the carried wheels (gpu_wheels/, made by
#   .venv/bin/pip download keras==3.15.1 namex optree absl-py gin-config \
#     --no-deps -d gpu_wheels
# here) where Python finds them, selects the JAX backend, unbuffers Python's
# output and records the devices in $out/device.txt.
mkdir -p "$out"
if [ -d gpu_wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_pydeps \
    gpu_wheels/*.whl && export PYTHONPATH="/tmp/gpu_pydeps"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export KERAS_BACKEND=jax
# Lines reach $out as they are printed, also from a run the timeout kills.
export PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())" \
  | tee "$out/device.txt"
