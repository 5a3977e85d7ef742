r"""One decoding step's MoE layer against a dense FFN of the same ops.

  python benchmarks/decode_layer.py [--tokens=16,64,256] [--rounds=10]

What `benchmarks/decode.py` measures for whole models, for the layer alone:
SparseMoE at inference (the small-batch path that decoding steps take,
`moe_keras/layers/small_batch.py`) on N tokens of width d, against the dense
ReLU FFN of the same ops per token (hidden k * h), both TensorFlow graphs
looping `--calls` times in one `tf.while_loop` (per-call time = loop time /
calls). The defaults are the decoder MoE of `gin/mt/debian_en_fr/moe_32.gin`
(n = 32 experts of h = 256, k = 4, d = 128) at decoding batch sizes.

The layer is called back to back (its weights stay in the CPU caches: an
isolated-layer view; inside a decoder, `decode.py`'s table, the other
layers run between two calls). The "read all expert weights" column times a
reduction over the experts' kernels alone: what reading every expert once
costs from cache, against which the MoE's time is mostly op overhead.

Batchwise gating (appendix F) routes at inference by its learned
thresholds; here they are set from 4096 random tokens so that about k
experts pass per token (`decode.fit_batchwise_thresholds`, as
`decode.py`'s `randomize_gates`), and the "experts/token" column measures
it (`decode.experts_per_token`). Settings alternate within each of
`--rounds` rounds; the table gives medians (ms per call), and the ratio
dense / MoE per round (median, min-max).
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TOKENS = flags.DEFINE_list("tokens", ["16", "64", "256"], "Tokens per call.")
_GATINGS = flags.DEFINE_list(
    "gatings", ["batchwise", "top_k"], "SparseMoE gatings compared."
)
_NUM_EXPERTS = flags.DEFINE_integer(
    "num_experts", 32, "Experts n.", lower_bound=1
)
_K = flags.DEFINE_integer("k", 4, "Experts per token.", lower_bound=1)
_DIM = flags.DEFINE_integer(
    "dim", 128, "Input and output width d.", lower_bound=1
)
_HIDDEN = flags.DEFINE_integer(
    "expert_hidden", 256, "Expert hidden size h.", lower_bound=1
)
_CALLS = flags.DEFINE_integer(
    "calls", 200, "Layer calls per timed loop.", lower_bound=1
)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 10, "Alternating rounds.", lower_bound=1
)
flags.register_validator(
    "tokens",
    lambda values: all(v.isdigit() and int(v) > 0 for v in values),
    "--tokens: positive integers, e.g. --tokens=16,64",
)

# Tokens of the batchwise thresholds' fit.
THRESHOLD_TOKENS = 4096


def _moe_layer(num_tokens, gating, rng):
  """A built SparseMoE with gates that route about k experts per token."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import decode  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  n, k, d = _NUM_EXPERTS.value, _K.value, _DIM.value
  layer = SparseMoE(
      num_experts=n,
      k=k,
      expert_hidden_dim=_HIDDEN.value,
      gating=gating,
      track_metrics=False,
      seed=0,
  )
  layer.build((num_tokens, d))
  layer.w_gate.assign(
      rng.normal(0.0, 3.0 / np.sqrt(d), (d, n)).astype("float32")
  )
  if gating == "batchwise":
    decode.fit_batchwise_thresholds(
        layer, rng.normal(size=(THRESHOLD_TOKENS, d)).astype("float32")
    )
  return layer


def _loop(fn, x):
  """tf.function calling fn `--calls` times on slightly changing inputs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  calls = _CALLS.value

  @tf.function
  def run(x):
    def body(i, acc):
      inputs = x + 1e-3 * tf.cast(i, tf.float32)
      return i + 1, acc + 1e-3 * tf.reduce_mean(fn(inputs))

    return tf.while_loop(lambda i, acc: i < calls, body, (0, 0.0))[1]

  run(x).numpy()  # trace and warm up
  return run


def main(argv):
  del argv
  # One tf.function per setting: TF's retracing warning does not apply.
  logging.set_verbosity(logging.ERROR)
  import numpy as np  # pylint: disable=g-import-not-at-top

  import moe_keras  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from benchmarks import decode  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n, k, d, h = _NUM_EXPERTS.value, _K.value, _DIM.value, _HIDDEN.value
  w1 = tf.constant(rng.normal(size=(d, k * h)).astype("float32"))
  w2 = tf.constant(rng.normal(size=(k * h, d)).astype("float32"))
  dense = lambda x: tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)
  token_counts = [int(t) for t in _TOKENS.value]

  settings = {}  # (tokens, gating, side) -> (timed function, input)
  experts = {}
  for tokens in token_counts:
    x = tf.constant(rng.normal(size=(tokens, d)).astype("float32"))
    settings[(tokens, "-", "dense")] = (_loop(dense, x), x)
    for gating in _GATINGS.value:
      layer = _moe_layer(tokens, gating, rng)
      experts[(tokens, gating)] = decode.experts_per_token(layer, np.asarray(x))
      kernels = [layer.expert_kernel_1, layer.expert_kernel_2]
      moe = lambda v, layer=layer: layer(v, training=False)
      read = lambda v, kernels=kernels: v + 1e-9 * tf.add_n(
          [tf.reduce_sum(w) for w in kernels]
      )
      settings[(tokens, gating, "moe")] = (_loop(moe, x), x)
      settings[(tokens, gating, "read")] = (_loop(read, x), x)

  times = {key: [] for key in settings}
  for _ in range(_ROUNDS.value):
    for key, (fn, x) in settings.items():
      start = time.perf_counter()
      fn(x).numpy()
      times[key].append(1e3 * (time.perf_counter() - start) / _CALLS.value)

  print(
      f"n = {n} experts of h = {h}, k = {k}, d = {d}; dense FFN hidden"
      f" {k * h}; expert weights {2 * n * d * h * 4 / 2**20:.1f} MB, dense"
      f" {2 * d * k * h * 4 / 2**20:.1f} MB; {_CALLS.value} calls per loop,"
      f" {_ROUNDS.value} rounds"
  )
  print()
  print(
      "| tokens | gating | experts/token | dense ms | MoE ms | ratio"
      " (median) | min-max | read all expert weights ms |"
  )
  print("|---:|---|---:|---:|---:|---:|---|---:|")
  for tokens in token_counts:
    dense_times = times[(tokens, "-", "dense")]
    for gating in _GATINGS.value:
      moe_times = times[(tokens, gating, "moe")]
      ratios = [a / b for a, b in zip(dense_times, moe_times)]
      print(
          f"| {tokens} | {gating} | {experts[(tokens, gating)]:.2f} |"
          f" {statistics.median(dense_times):.3f} |"
          f" {statistics.median(moe_times):.3f} |"
          f" {statistics.median(ratios):.2f} |"
          f" {min(ratios):.2f}-{max(ratios):.2f} |"
          f" {statistics.median(times[(tokens, gating, 'read')]):.3f} |"
      )


if __name__ == "__main__":
  app.run(main)
