r"""Benchmark: SparseMoE training step vs a dense FFN of the same active FLOPs.

Forward + backward of SparseMoE's training path (noisy top-k gating, balancing
losses, sparse dispatch and combine) at tokens=8192, d=512, h=1024, k=4 for
several numbers of experts, against a dense ReLU FFN with hidden size k*h (the
same expert FLOPs per token). Every measurement runs in its own subprocess so
that its peak resident memory can be read; the dense FFN is re-measured next
to every MoE row so that drifting machine load affects both sides alike.

Columns:
  experts, tokens/expert: n and 8192*k/n.
  moe ms, dense ms: median step time of --repeats runs after a warm-up.
  GFLOP/s: useful FLOPs of the MoE step / MoE time, where useful FLOPs are
    3 x forward (= forward + backward) matmul FLOPs of the k active experts,
    2 * tokens * k * (d*h + h*d) * 3 (gating excluded).
  ratio: dense ms / moe ms (1.0 = the MoE costs what its active FLOPs cost).
  moe MB, dense MB: peak resident memory of the process (variables, gradients,
    activations and the framework runtime).
  bound MB: (dense MB + 2 x expert parameter bytes) x 1.3, the memory target.

Usage:
  python benchmarks/moe_layer.py                       # the issue's table
  python benchmarks/moe_layer.py --num_experts=16,64 --repeats=3
  KERAS_BACKEND=jax python benchmarks/moe_layer.py --capacity_factor=1.25
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

DEFAULT_EXPERTS = "16,64,256,1024"

_NUM_EXPERTS = flags.DEFINE_string(
    "num_experts", DEFAULT_EXPERTS, "Comma-separated numbers of experts."
)
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per step.")
_DIM = flags.DEFINE_integer("dim", 512, "Input and output dimension d.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Expert hidden size h.")
_K = flags.DEFINE_integer("k", 4, "Experts per token.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per measurement.")
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", None, "None = dropless (the paper)."
)
_DTYPE = flags.DEFINE_string(
    "dtype", "float32", "Layer dtype policy, e.g. float32, mixed_bfloat16."
)
_WORKER = flags.DEFINE_enum(
    "worker", None, ["moe", "dense"], "Internal: run one measurement."
)


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(model, num_experts):
  """Runs one measurement in this process; returns a dict."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  keras.config.set_dtype_policy(_DTYPE.value)
  tokens, d, h, k = _TOKENS.value, _DIM.value, _HIDDEN.value, _K.value
  rng = np.random.default_rng(0)
  x = keras.ops.convert_to_tensor(
      rng.standard_normal((tokens, d), dtype=np.float32)
  )
  if model == "moe":
    layer = SparseMoE(
        num_experts=num_experts,
        k=k,
        expert_hidden_dim=h,
        capacity_factor=_CAPACITY_FACTOR.value,
        track_metrics=False,
        seed=0,
    )
    layer.build(x.shape)
    # Non-degenerate routing: small random gate weights (zero-initialized
    # gates route every token by noise alone, which is also fine).
    layer.w_gate.assign(0.01 * rng.standard_normal((d, num_experts)))
  else:
    inputs = keras.Input((d,))
    hidden = keras.layers.Dense(k * h, activation="relu", use_bias=False)
    layer = keras.Model(
        inputs, keras.layers.Dense(d, use_bias=False)(hidden(inputs))
    )
  step = _make_step(layer)
  start = time.perf_counter()
  step(x)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    step(x)
    times.append(time.perf_counter() - start)
  return {
      "ms": 1000.0 * statistics.median(times),
      "compile_s": compile_s,
      "peak_mb": _peak_rss_mb(),
  }


def _make_step(layer):
  """Returns step(x) running forward + backward and blocking on the result."""
  import keras  # pylint: disable=g-import-not-at-top

  backend = keras.backend.backend()
  if backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    @tf.function
    def tf_step(x):
      with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.square(tf.cast(y, "float32")))
        if layer.losses:
          loss += tf.add_n(layer.losses)
      return tape.gradient(loss, layer.trainable_variables)

    def run(x):
      grads = tf_step(x)
      return [g.numpy() for g in grads[:1]]

    return run
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(trainable, non_trainable, x):
      y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
      return (y.astype("float32") ** 2).sum()

    grad_fn = jax.jit(jax.grad(loss_fn))

    def run(x):
      grads = grad_fn(trainable, non_trainable, x)
      jax.block_until_ready(grads)
      return grads

    return run
  raise ValueError(f"unsupported backend {backend!r}")


def _spawn(model, num_experts):
  """Runs one measurement in a fresh subprocess and parses its JSON line."""
  argv = [
      sys.executable,
      os.path.abspath(__file__),
      f"--worker={model}",
      f"--num_experts={num_experts}",
      f"--tokens={_TOKENS.value}",
      f"--dim={_DIM.value}",
      f"--hidden={_HIDDEN.value}",
      f"--k={_K.value}",
      f"--repeats={_REPEATS.value}",
      f"--dtype={_DTYPE.value}",
  ]
  if _CAPACITY_FACTOR.value is not None:
    argv.append(f"--capacity_factor={_CAPACITY_FACTOR.value}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  # TensorFlow's caching (BFC) CPU allocator, for the MoE and the dense
  # worker alike: without it every step page-faults its gradient buffers
  # afresh (see README.md).
  env.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
  proc = subprocess.run(
      argv, capture_output=True, text=True, env=env, check=False
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  raise RuntimeError(
      f"benchmark worker {model} n={num_experts} failed:\n{proc.stderr[-2000:]}"
  )


def main(argv):
  del argv
  if _WORKER.value:
    result = _measure(_WORKER.value, int(_NUM_EXPERTS.value))
    print("RESULT " + json.dumps(result), flush=True)
    return
  import keras  # pylint: disable=g-import-not-at-top

  tokens, d, h, k = _TOKENS.value, _DIM.value, _HIDDEN.value, _K.value
  useful_flops = 2.0 * tokens * k * (d * h + h * d) * 3.0
  print(
      f"SparseMoE training step (fwd+bwd), backend={keras.backend.backend()},"
      f" dtype={_DTYPE.value}, tokens={tokens}, d={d}, h={h}, k={k},"
      f" capacity_factor={_CAPACITY_FACTOR.value}, cpus={os.cpu_count()}"
  )
  header = (
      f"{'experts':>7} {'tok/exp':>7} {'moe ms':>8} {'dense ms':>8}"
      f" {'GFLOP/s':>8} {'ratio':>6} {'moe MB':>7} {'dense MB':>8}"
      f" {'bound MB':>8}"
  )
  print(header)
  print("-" * len(header))
  for num_experts in [int(n) for n in _NUM_EXPERTS.value.split(",")]:
    dense = _spawn("dense", num_experts)
    moe = _spawn("moe", num_experts)
    param_mb = num_experts * 2 * d * h * 4 / 2**20
    bound = 1.3 * (dense["peak_mb"] + 2 * param_mb)
    print(
        f"{num_experts:>7} {tokens * k // num_experts:>7}"
        f" {moe['ms']:>8.0f} {dense['ms']:>8.0f}"
        f" {useful_flops / moe['ms'] / 1e6:>8.1f}"
        f" {dense['ms'] / moe['ms']:>6.2f} {moe['peak_mb']:>7.0f}"
        f" {dense['peak_mb']:>8.0f} {bound:>8.0f}",
        flush=True,
    )


if __name__ == "__main__":
  app.run(main)
