r"""Benchmark: SparseMoE training step vs a dense FFN of the same active FLOPs.

Forward + backward of SparseMoE's training path (noisy top-k gating, balancing
losses, sparse dispatch and combine) at d=512, h=1024, k=4, at 4096 and 8192
tokens and 1024, 256, 128 and 32 tokens per expert (n = tokens*k / that),
against a dense ReLU FFN with hidden size k*h (the same expert FLOPs per
token). Every measurement runs in its own subprocess so that its peak resident
memory can be read; the dense FFN and the MoE alternate, `--rounds` times per
row, so that drifting machine load affects both sides alike.

The library path is measured: each worker imports `moe_keras` first, as a
user's script would (`from moe_keras.layers import SparseMoE`), and the script
sets no environment; whatever `import moe_keras` arranges (the TF CPU
allocator) applies to the MoE and the dense worker alike. `--tf_cpu_allocator`
forces one allocator for comparisons.

Columns:
  tokens, experts, tok/exp: N, n and N*k/n.
  moe ms, dense ms: median over rounds of the median step time of --repeats
    runs after a warm-up.
  ratio: dense ms / moe ms per round, min-max over rounds (1.0 = the MoE
    costs what its active FLOPs cost); target from issue 15.
  GFLOP/s: useful FLOPs of the MoE step / median MoE time, where useful FLOPs
    are 3 x forward (= forward + backward) matmul FLOPs of the k active
    experts, 2 * tokens * k * (d*h + h*d) * 3 (gating excluded).
  moe MB, dense MB: largest peak resident memory of the process over rounds
    (variables, gradients, activations and the framework runtime).
  bound MB: (dense MB + 2 x expert parameter bytes) x 1.3, the memory target.
  experts alone: dense ms / the step time of the experts alone (median over
    rounds): the same n experts' FFNs, forward and backward, each on an
    equal share of the tokens x k rows, with separate weight tensors, no
    gating, no routing plan, no gather/scatter beyond a split and a sum,
    and no stacking of weight gradients. The ratio an MoE layer would reach
    if everything but its experts' matmuls were free: below the target,
    the per-expert matmuls themselves (their efficiency at tok/exp rows)
    are what miss it.
  + gate floor: dense ms / (experts alone ms + gate floor ms), the gate
    floor being the step of a layer that runs only the flat noisy gate's
    irreducible work: x W_g and x W_noise ([tokens, d] x [d, n], eq. 4) with
    their weight and input gradients, the [tokens, n] noise draw and one
    top-(k+1) (eqs. 5, 8). The ratio a flat MoE layer would reach if its
    experts cost what they cost alone and its gating network only its
    matmuls, noise and top-k (no Softplus, P(x, i), losses or routing). At
    many experts the gate's O(n d) work per token is the paper's reason for
    the hierarchical MoE (appendix B); where this column is near or below
    the target, the flat layer cannot reach it on this machine.
  traffic bound: the best ratio the MoE step could reach on this machine if
    it cost only its expert weight traffic: dense ms / (3 x expert parameter
    bytes / the measured read bandwidth). A step reads every expert weight
    in the forward pass, reads it again for the input gradients and writes
    its gradient, so at few tokens per expert (where the weights outweigh
    the activations) no dispatch scheme moves less. The bandwidth is the
    best of 5 full reductions (`keras.ops.sum`) of a --bandwidth_mb float32
    buffer in a fresh worker, printed in the header; the bound counts every
    pass, the gradient write included, at that read speed. Where it is below
    the target, the target is out of this machine's reach.

With --profile the script prints, instead of that table, where each row's
step spends its time: op time by op type under TensorFlow's profiler, for the
MoE and the experts alone (`op_profile.op_times`; summed over threads, so not
wall clock). The MoE's op types that the experts alone lack (the weight
gradients' stacking, gating, routing) are its overhead over them.

Usage:
  python benchmarks/moe_layer.py                       # the issue's table
  python benchmarks/moe_layer.py --profile --tokens=8192 --tokens_per_expert=128
  python benchmarks/moe_layer.py --tokens=4096 --tokens_per_expert=32 --rounds=1
  python benchmarks/moe_layer.py --tf_cpu_allocator=default   # TF's default
  python benchmarks/moe_layer.py --dispatch_mode=padded    # one batched matmul
  python benchmarks/moe_layer.py --expert_variables=stacked  # one [n, d, h]
      # variable per weight (the layer's default here: one per expert)
  python benchmarks/moe_layer.py --tokens=8192 --tokens_per_expert=32 \
      --hierarchical_groups=32  # appendix B: 32 groups of 32 experts
  python benchmarks/moe_layer.py --expert_variables=stacked \
      --weight_gradients=discard  # what-if: no weight gradient kept
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import op_profile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Ratio targets (dense ms / MoE ms) by tokens per expert, issue 15.
RATIO_TARGETS = {1024: 0.9, 256: 0.85, 128: 0.7, 32: 0.45}
ALLOCATOR_ENV = {"default": "false", "bfc": "true"}

_TOKENS = flags.DEFINE_list(
    "tokens", ["4096", "8192"], "Tokens per step (one table block each)."
)
_TOKENS_PER_EXPERT = flags.DEFINE_list(
    "tokens_per_expert",
    [str(t) for t in RATIO_TARGETS],
    "Rows: tokens*k / num_experts.",
)
_NUM_EXPERTS = flags.DEFINE_list(
    "num_experts",
    None,
    "Rows by number of experts instead of --tokens_per_expert.",
)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Alternating dense/MoE measurements per row."
)
_TF_CPU_ALLOCATOR = flags.DEFINE_enum(
    "tf_cpu_allocator",
    "library",
    ["library", "default", "bfc"],
    "library: no environment set (what `import moe_keras` arranges);"
    " default / bfc: TF_CPU_ALLOCATOR_USE_BFC=false / true for both workers.",
)
_DIM = flags.DEFINE_integer("dim", 512, "Input and output dimension d.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Expert hidden size h.")
_K = flags.DEFINE_integer("k", 4, "Experts per token.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per measurement.")
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", None, "None = dropless (the paper)."
)
_DISPATCH_MODE = flags.DEFINE_enum(
    "dispatch_mode",
    "grouped",
    ["grouped", "padded"],
    "SparseMoE dispatch_mode (dropless): one matmul pair per expert, or one"
    " batched matmul pair over an [n, C, d] buffer padded to the step's"
    " largest expert.",
)
_EXPERT_VARIABLES = flags.DEFINE_enum(
    "expert_variables",
    "auto",
    ["auto", "stacked", "per_expert"],
    "SparseMoE expert_variables. auto (the layer's default): one variable"
    " per expert on TensorFlow's dropless grouped dispatch for kernels of at"
    " least sparse_moe.PER_EXPERT_MIN_KERNEL_SIZE elements (d=512, h=1024"
    " are), else stacked. stacked: one [n, ...] variable per expert weight,"
    " whose gradient the step writes piece by piece. per_expert: one"
    " variable per expert, each expert's weight gradient its own tensor.",
)
_HIERARCHICAL_GROUPS = flags.DEFINE_integer(
    "hierarchical_groups",
    0,
    "0: the flat SparseMoE. a > 0: HierarchicalSparseMoE (appendix B) of a"
    " groups of n / a experts, k_primary = 2 and k_secondary = k / 2 (k"
    " experts per token, as the flat layer), same experts and dense"
    " baseline.",
    lower_bound=0,
)
_WEIGHT_GRADIENTS = flags.DEFINE_enum(
    "weight_gradients",
    "stacked",
    ["stacked", "discard"],
    "What the MoE step does with its experts' weight gradients under"
    " --expert_variables=stacked (TensorFlow, dropless, no biases; a what-if"
    " that replaces the layer's gradient): stacked: the layer as built (each"
    " [n, d, h] kernel's n pieces written in place into one buffer)."
    " discard: the pieces are computed and dropped, no weight gradient is"
    " kept (the MoE's arithmetic alone; not a design).",
)
_DTYPE = flags.DEFINE_string(
    "dtype", "float32", "Layer dtype policy, e.g. float32, mixed_bfloat16."
)
_BANDWIDTH_MB = flags.DEFINE_integer(
    "bandwidth_mb",
    1024,
    "Size of the buffer whose reduction measures the memory read bandwidth"
    " for the traffic bound column (0: skip the measurement and the column).",
)
_EXPERTS_ALONE = flags.DEFINE_bool(
    "experts_alone",
    True,
    "Also time the experts alone (no gating or routing) and the gate floor"
    " in every round, for the experts alone and + gate floor columns.",
)
_PROFILE = flags.DEFINE_bool(
    "profile",
    False,
    "Instead of the timing table, print each row's op time by op type"
    " (TensorFlow profiler, --repeats steps after the timed ones) for the MoE"
    " and, with --experts_alone, the experts alone. TensorFlow backend only.",
)
_PROFILE_OPS = flags.DEFINE_integer(
    "profile_ops",
    14,
    "--profile: op types listed one per line, the MoE's largest (the rest"
    " are summed into one line).",
    lower_bound=1,
)
_WORKER = flags.DEFINE_enum(
    "worker",
    None,
    ["moe", "dense", "experts", "gate", "bandwidth"],
    "Internal: run one measurement.",
)

# Expert weight passes per training step: forward read, input-gradient
# read, weight-gradient write.
WEIGHT_PASSES = 3


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(model, num_experts, tokens):
  """Runs one measurement in this process; returns a dict."""
  # As a user's script: moe_keras first (it may set up TF's allocator).
  import moe_keras  # pylint: disable=g-import-not-at-top,unused-import
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  keras.config.set_dtype_policy(_DTYPE.value)
  d, h, k = _DIM.value, _HIDDEN.value, _K.value
  rng = np.random.default_rng(0)
  x = keras.ops.convert_to_tensor(
      rng.standard_normal((tokens, d), dtype=np.float32)
  )
  if model == "experts":
    layer = _make_experts_alone(num_experts=num_experts, k=k, hidden=h)
    layer.build(x.shape)
  elif model == "gate":
    layer = _make_gate_floor(num_experts=num_experts, k=k)
    layer.build(x.shape)
  elif model == "moe" and _HIERARCHICAL_GROUPS.value:
    from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top

    groups = _HIERARCHICAL_GROUPS.value
    layer = HierarchicalSparseMoE(
        num_groups=groups,
        experts_per_group=num_experts // groups,
        k_primary=2,
        k_secondary=k // 2,
        **_moe_kwargs(),
    )
    layer.build(x.shape)
    layer.w_gate.assign(0.01 * rng.standard_normal((d, groups)))
    layer.w_gate_secondary.assign(
        0.01 * rng.standard_normal((groups, d, num_experts // groups))
    )
  elif model == "moe":
    _replace_weight_gradients(_WEIGHT_GRADIENTS.value)
    layer = SparseMoE(num_experts=num_experts, k=k, **_moe_kwargs())
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
  result = {
      "ms": 1000.0 * statistics.median(times),
      "compile_s": compile_s,
      "peak_mb": _peak_rss_mb(),
  }
  if _PROFILE.value:
    ops = op_profile.op_times(lambda: step(x), _REPEATS.value)
    result["ops"] = {name: [t.ms, t.count] for name, t in ops.items()}
  return result


def _moe_kwargs():
  """The flags' keyword arguments shared by the flat and hierarchical MoE."""
  return dict(
      expert_hidden_dim=_HIDDEN.value,
      capacity_factor=_CAPACITY_FACTOR.value,
      dispatch_mode=_DISPATCH_MODE.value,
      expert_variables=_EXPERT_VARIABLES.value,
      track_metrics=False,
      seed=0,
  )


def _make_experts_alone(num_experts, k, hidden):
  """The experts-alone layer (defined here: keras is imported in workers)."""
  import keras  # pylint: disable=g-import-not-at-top

  class ExpertsAlone(keras.layers.Layer):
    """n expert FFNs on equal shares of tokens x k rows, nothing else.

    Input [tokens, d] -> each token repeated k times -> [tokens * k, d] split
    into n pieces of tokens * k / n rows -> relu(piece @ w1_e) @ w2_e ->
    concatenated, reshaped to [k, tokens, d] and summed over k: [tokens, d].
    """

    def __init__(self, num_experts, k, hidden, **kwargs):
      super().__init__(**kwargs)
      self.num_experts = num_experts
      self.k = k
      self.hidden = hidden

    def build(self, input_shape):
      d = input_shape[-1]
      self.w1 = [
          self.add_weight(shape=(d, self.hidden), name=f"w1_{e}")
          for e in range(self.num_experts)
      ]
      self.w2 = [
          self.add_weight(shape=(self.hidden, d), name=f"w2_{e}")
          for e in range(self.num_experts)
      ]

    def call(self, x, training=None):
      del training
      ops = keras.ops
      rows = ops.concatenate([x] * self.k, axis=0)
      pieces = ops.split(rows, self.num_experts, axis=0)
      outs = [
          ops.matmul(ops.relu(ops.matmul(p, w1)), w2)
          for p, w1, w2 in zip(pieces, self.w1, self.w2)
      ]
      y = ops.concatenate(outs, axis=0)
      return ops.sum(ops.reshape(y, (self.k, -1, y.shape[-1])), axis=0)

  return ExpertsAlone(num_experts=num_experts, k=k, hidden=hidden)


def _make_gate_floor(num_experts, k):
  """The gate-floor layer: the flat noisy gate's irreducible work alone."""
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import gating  # pylint: disable=g-import-not-at-top

  class GateFloor(keras.layers.Layer):
    """x W_g and x W_noise (eq. 4), the noise draw and one top-(k+1).

    Input [tokens, d] -> clean = x W_g, raw = x W_noise ([tokens, n] each)
    -> top-(k+1) values of clean + noise * raw -> x * their row sum:
    [tokens, d]. Forward and backward run both [tokens, d] x [d, n] matmuls
    and their weight and input gradients, which every flat noisy top-k gate
    pays (O(n d) per token); Softplus, P(x, i), the losses and the routing
    are left out.
    """

    def __init__(self, num_experts, k, **kwargs):
      super().__init__(**kwargs)
      self.num_experts = num_experts
      self.k = k
      self.seed = keras.random.SeedGenerator(0)

    def build(self, input_shape):
      d = input_shape[-1]
      self.w_gate = self.add_weight(shape=(d, self.num_experts), name="w_gate")
      self.w_noise = self.add_weight(
          shape=(d, self.num_experts), name="w_noise"
      )

    def call(self, x, training=None):
      del training
      ops = keras.ops
      clean = ops.matmul(x, self.w_gate)
      raw = ops.matmul(x, self.w_noise)
      noise = gating.standard_normal(ops.shape(clean), seed=self.seed)
      top, _ = ops.top_k(clean + noise * raw, k=self.k + 1, sorted=True)
      return x * ops.sum(top, axis=-1, keepdims=True)

  return GateFloor(num_experts=num_experts, k=k)


def _measure_bandwidth(size_mb):
  """Best read bandwidth in GB/s over 5 full reductions of a float32 buffer.

  Args:
    size_mb: buffer size in MiB; much larger than the last-level cache.

  Returns:
    {"read_gbs": float}.
  """
  import moe_keras  # pylint: disable=g-import-not-at-top,unused-import
  import keras  # pylint: disable=g-import-not-at-top

  buffer = keras.ops.ones((size_mb * 2**20 // 4,), dtype="float32")
  keras.ops.convert_to_numpy(keras.ops.sum(buffer))  # warm-up
  times = []
  for _ in range(5):
    start = time.perf_counter()
    keras.ops.convert_to_numpy(keras.ops.sum(buffer))
    times.append(time.perf_counter() - start)
  return {"read_gbs": size_mb * 2**20 / min(times) / 1e9}


def traffic_bound_ratio(dense_ms, num_experts, dim, hidden, read_gbs):
  """Ratio (dense ms / MoE ms) of a MoE step that costs only weight traffic.

  Args:
    dense_ms: measured step time of the dense FFN of equal active FLOPs.
    num_experts: n; each expert has a [d, h] and an [h, d] float32 kernel.
    dim: d.
    hidden: h.
    read_gbs: memory read bandwidth in GB/s (1e9 bytes per second).

  Returns:
    dense_ms / (WEIGHT_PASSES x expert parameter bytes / bandwidth, in ms).
  """
  weight_bytes = num_experts * 2 * dim * hidden * 4
  traffic_ms = 1000.0 * WEIGHT_PASSES * weight_bytes / (read_gbs * 1e9)
  return dense_ms / traffic_ms


def _replace_weight_gradients(mode):
  """--weight_gradients: swaps the layer's dropless TF expert gradient.

  Args:
    mode: 'stacked' (no change) or 'discard' (see the flag).
  """
  if mode == "stacked":
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import backend_ops  # pylint: disable=g-import-not-at-top

  def gradients(pieces, hiddens, d_pieces, w1, w2, padding):
    # The layer's input gradients; each expert's two weight-gradient
    # MatMuls run (a slice of each is consumed) and their pieces are
    # dropped; the kernels get no gradient.
    d_hiddens, d_rows, consumed = [], [], []
    for hid, dy, w1_g, w2_g in zip(hiddens, d_pieces, w1, w2):
      # pylint: disable-next=protected-access
      d_hidden, d_row = backend_ops._tf_expert_input_grads(hid, dy, w1_g, w2_g)
      d_hiddens.append(d_hidden)
      d_rows.append(d_row)
    for g in range(len(w1)):
      for piece in (
          tf.matmul(hiddens[g], d_pieces[g], transpose_a=True),
          tf.matmul(pieces[g], d_hiddens[g], transpose_a=True),
      ):
        consumed.append(piece[0, :1])
    # pylint: disable-next=protected-access
    d_rows = backend_ops._tf_concat_rows(d_rows, padding)
    with tf.control_dependencies(consumed):
      return tf.identity(d_rows), None, None

  # pylint: disable-next=protected-access
  backend_ops._grouped_ffn_tf_grads_in_place = gradients


def _make_step(layer):
  """Returns step(x) running forward + backward and blocking on the result.

  Args:
    layer: the layer or model.
  """
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
      # Every gradient is an output (an unused one would be pruned).
      grads = tape.gradient(loss, layer.trainable_variables)
      return [g for g in grads if g is not None]

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


def _spawn(model, num_experts, tokens):
  """Runs one measurement in a fresh subprocess and parses its JSON line."""
  argv = [
      sys.executable,
      os.path.abspath(__file__),
      f"--worker={model}",
      f"--bandwidth_mb={_BANDWIDTH_MB.value}",
      f"--num_experts={num_experts}",
      f"--tokens={tokens}",
      f"--dim={_DIM.value}",
      f"--hidden={_HIDDEN.value}",
      f"--k={_K.value}",
      f"--repeats={_REPEATS.value}",
      f"--dtype={_DTYPE.value}",
      f"--dispatch_mode={_DISPATCH_MODE.value}",
      f"--weight_gradients={_WEIGHT_GRADIENTS.value}",
      f"--expert_variables={_EXPERT_VARIABLES.value}",
      f"--hierarchical_groups={_HIERARCHICAL_GROUPS.value}",
      f"--profile={_PROFILE.value}",
  ]
  if _CAPACITY_FACTOR.value is not None:
    argv.append(f"--capacity_factor={_CAPACITY_FACTOR.value}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if _TF_CPU_ALLOCATOR.value in ALLOCATOR_ENV:
    env["TF_CPU_ALLOCATOR_USE_BFC"] = ALLOCATOR_ENV[_TF_CPU_ALLOCATOR.value]
  proc = subprocess.run(
      argv, capture_output=True, text=True, env=env, check=False
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  raise RuntimeError(
      f"benchmark worker {model} n={num_experts} failed:\n{proc.stderr[-2000:]}"
  )


def profile_lines(moe_ops, alone_ops, top):
  """The --profile table of one row: op time by op type, MoE and alone.

  Args:
    moe_ops: {op type: (ms per step, ops per step)} of the MoE step.
    alone_ops: the same for the experts alone, or None (not profiled).
    top: op types listed one per line, the MoE's largest; the others are
      summed into one line.

  Returns:
    Markdown table lines: header, separator, the `top` op types by MoE time
    (ties by name), "other (N op types)" when there are more, and "all ops".
  """
  columns = ["MoE ms/step", "MoE ops/step"]
  if alone_ops is not None:
    columns += ["experts alone ms/step", "experts alone ops/step"]
  lines = [
      "| op type | " + " | ".join(columns) + " |",
      "|---|" + "---:|" * len(columns),
  ]
  alone_ops = alone_ops or {}
  # Every op type of either step, the MoE's largest first.
  names = sorted(
      set(moe_ops) | set(alone_ops),
      key=lambda name: (-moe_ops.get(name, (0.0, 0))[0], name),
  )

  def cells(selected):
    out = []
    for ops in [moe_ops] + ([alone_ops] if len(columns) > 2 else []):
      ms = sum(ops[name][0] for name in selected if name in ops)
      count = sum(ops[name][1] for name in selected if name in ops)
      out += [f"{ms:.1f}", f"{count:g}"]
    return " | ".join(out)

  for name in names[:top]:
    lines.append(f"| {name} | {cells([name])} |")
  if len(names) > top:
    lines.append(
        f"| other ({len(names) - top} op types) | {cells(names[top:])} |"
    )
  lines.append(f"| all ops | {cells(names)} |")
  return lines


def _print_profiles(tokens, k):
  """--profile: each row's op-time table (one MoE and one alone worker)."""
  for num_experts, per_expert in _rows(tokens, k):
    moe = _spawn("moe", num_experts, tokens)
    alone = (
        _spawn("experts", num_experts, tokens) if _EXPERTS_ALONE.value else None
    )
    print(
        f"\n{tokens} tokens, {num_experts} experts ({per_expert} tokens per"
        f" expert): step {moe['ms']:.0f} ms"
        + ("" if alone is None else f", experts alone {alone['ms']:.0f} ms")
        + f" (median of {_REPEATS.value} unprofiled steps); op time summed"
        f" over threads, mean of {_REPEATS.value} profiled steps:"
    )
    for line in profile_lines(
        moe["ops"], None if alone is None else alone["ops"], _PROFILE_OPS.value
    ):
      print(line)
    sys.stdout.flush()


def _rows(tokens, k):
  """[(num_experts, tokens per expert)] of the flags for `tokens`."""
  if _NUM_EXPERTS.value:
    return [(int(n), tokens * k // int(n)) for n in _NUM_EXPERTS.value]
  rows = []
  for per_expert in (int(t) for t in _TOKENS_PER_EXPERT.value):
    if (tokens * k) % per_expert:
      raise app.UsageError(
          f"--tokens_per_expert={per_expert} does not divide tokens*k ="
          f" {tokens * k}"
      )
    rows.append((tokens * k // per_expert, per_expert))
  return rows


def main(argv):
  del argv
  if _WORKER.value == "bandwidth":
    print("RESULT " + json.dumps(_measure_bandwidth(_BANDWIDTH_MB.value)))
    return
  if _WORKER.value:
    result = _measure(
        _WORKER.value, int(_NUM_EXPERTS.value[0]), int(_TOKENS.value[0])
    )
    print("RESULT " + json.dumps(result), flush=True)
    return
  import keras  # pylint: disable=g-import-not-at-top

  d, h, k = _DIM.value, _HIDDEN.value, _K.value
  if _BANDWIDTH_MB.value < 0:
    raise app.UsageError(
        f"--bandwidth_mb={_BANDWIDTH_MB.value}: must be >= 0 (0 skips it)"
    )
  if _EXPERTS_ALONE.value:
    for tokens in (int(t) for t in _TOKENS.value):
      for num_experts, _ in _rows(tokens, k):
        if (tokens * k) % num_experts:
          raise app.UsageError(
              f"--experts_alone needs tokens*k = {tokens * k} divisible by"
              f" the {num_experts} experts (equal shares); pass"
              " --noexperts_alone"
          )
  groups = _HIERARCHICAL_GROUPS.value
  if groups:
    if k % 2:
      raise app.UsageError(
          f"--hierarchical_groups needs an even --k (k_primary = 2,"
          f" k_secondary = k / 2); got --k={k}"
      )
    for tokens in (int(t) for t in _TOKENS.value):
      for num_experts, _ in _rows(tokens, k):
        if num_experts % groups or num_experts // groups < k // 2:
          raise app.UsageError(
              f"--hierarchical_groups={groups} must divide the {num_experts}"
              f" experts into groups of at least k / 2 = {k // 2}"
          )
    if _WEIGHT_GRADIENTS.value != "stacked":
      raise app.UsageError(
          "--weight_gradients applies to the flat layer; drop it with"
          " --hierarchical_groups"
      )
  if _WEIGHT_GRADIENTS.value != "stacked" and (
      keras.backend.backend() != "tensorflow"
      or _CAPACITY_FACTOR.value is not None
      or _DISPATCH_MODE.value != "grouped"
      or _EXPERT_VARIABLES.value != "stacked"
  ):
    raise app.UsageError(
        f"--weight_gradients={_WEIGHT_GRADIENTS.value} replaces TensorFlow's"
        " dropless grouped gradient of stacked experts: run with"
        " KERAS_BACKEND=tensorflow, no --capacity_factor,"
        " --dispatch_mode=grouped and --expert_variables=stacked"
    )
  if _PROFILE.value:
    if keras.backend.backend() != "tensorflow":
      raise app.UsageError(
          "--profile reads TensorFlow's profiler; run with"
          f" KERAS_BACKEND=tensorflow (this is {keras.backend.backend()})"
      )
    print(
        f"SparseMoE training step (fwd+bwd) op profile, dtype={_DTYPE.value},"
        f" d={d}, h={h}, k={k}, capacity_factor={_CAPACITY_FACTOR.value},"
        f" dispatch_mode={_DISPATCH_MODE.value},"
        f" weight_gradients={_WEIGHT_GRADIENTS.value},"
        f" expert_variables={_EXPERT_VARIABLES.value},"
        f" tf_cpu_allocator={_TF_CPU_ALLOCATOR.value}, cpus={os.cpu_count()}"
    )
    for tokens in (int(t) for t in _TOKENS.value):
      _print_profiles(tokens, k)
    return
  read_gbs = None
  if _BANDWIDTH_MB.value > 0:
    read_gbs = _spawn("bandwidth", 1, 1)["read_gbs"]
  print(
      (
          f"HierarchicalSparseMoE ({groups} groups, k_primary=2,"
          f" k_secondary={k // 2})"
          if groups
          else "SparseMoE"
      )
      + f" training step (fwd+bwd), backend={keras.backend.backend()},"
      f" dtype={_DTYPE.value}, d={d}, h={h}, k={k},"
      f" capacity_factor={_CAPACITY_FACTOR.value},"
      f" dispatch_mode={_DISPATCH_MODE.value},"
      f" weight_gradients={_WEIGHT_GRADIENTS.value},"
      f" expert_variables={_EXPERT_VARIABLES.value},"
      f" tf_cpu_allocator={_TF_CPU_ALLOCATOR.value} (env"
      f" TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}),"
      f" rounds={_ROUNDS.value}, repeats={_REPEATS.value},"
      f" cpus={os.cpu_count()}"
      + (
          ""
          if read_gbs is None
          else f", read bandwidth {read_gbs:.1f} GB/s"
          f" ({_BANDWIDTH_MB.value} MiB buffer)"
      )
  )
  print(
      "| tokens | experts | tok/exp | moe ms | dense ms | ratio (min-max)"
      " | target | experts alone | + gate floor | traffic bound | GFLOP/s"
      " | moe MB | dense MB | bound MB |"
  )
  print(
      "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  )
  for tokens in (int(t) for t in _TOKENS.value):
    useful_flops = 2.0 * tokens * k * (d * h + h * d) * 3.0
    for num_experts, per_expert in _rows(tokens, k):
      dense, moe, alone, gate = [], [], [], []
      for _ in range(_ROUNDS.value):
        dense.append(_spawn("dense", num_experts, tokens))
        moe.append(_spawn("moe", num_experts, tokens))
        if _EXPERTS_ALONE.value:
          alone.append(_spawn("experts", num_experts, tokens))
          if not groups:
            gate.append(_spawn("gate", num_experts, tokens))
      ratios = [a["ms"] / b["ms"] for a, b in zip(dense, moe)]
      moe_ms = statistics.median(m["ms"] for m in moe)
      dense_ms = statistics.median(m["ms"] for m in dense)
      moe_mb = max(m["peak_mb"] for m in moe)
      dense_mb = max(m["peak_mb"] for m in dense)
      param_mb = num_experts * 2 * d * h * 4 / 2**20
      bound = 1.3 * (dense_mb + 2 * param_mb)
      target = RATIO_TARGETS.get(per_expert)
      alone_ratio = floor_ratio = ""
      if alone:
        alone_ms = statistics.median(m["ms"] for m in alone)
        alone_ratio = f"{dense_ms / alone_ms:.2f}"
      if gate:  # the flat gate's floor (none for --hierarchical_groups)
        gate_ms = statistics.median(m["ms"] for m in gate)
        floor_ratio = f"{dense_ms / (alone_ms + gate_ms):.2f}"
      traffic = (
          ""
          if read_gbs is None
          else f"{traffic_bound_ratio(dense_ms, num_experts, d, h, read_gbs):.2f}"
      )
      print(
          f"| {tokens} | {num_experts} | {per_expert} | {moe_ms:.0f} |"
          f" {dense_ms:.0f} | {min(ratios):.2f}-{max(ratios):.2f} |"
          f" {'' if target is None else f'>= {target}'} | {alone_ratio} |"
          f" {floor_ratio} | {traffic} |"
          f" {useful_flops / moe_ms / 1e6:.1f} | {moe_mb:.0f} |"
          f" {dense_mb:.0f} | {bound:.0f} |",
          flush=True,
      )


if __name__ == "__main__":
  app.run(main)
