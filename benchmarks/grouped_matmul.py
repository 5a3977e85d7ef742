r"""Benchmark: the dropless experts' grouped matmul, three ways (JAX or TF).

Times forward + backward (input and weight gradients) of
out[r] = rows[r] @ w[g(r)] for rows split evenly over the groups (the balanced
routing the losses aim for), with:

  ragged_dot: `jax.lax.ragged_dot` (what XLA makes of it; on GPUs and CPUs
    today a dense expansion over groups x rows).
  pallas: `moe_keras.layers.pallas_grouped_matmul` (GPU: Triton; elsewhere
    only with --interpret, at small sizes).
  tiled: `moe_keras.layers.tiled_grouped_matmul`, the loop over groups that
    the layer runs on CPUs (`--methods=tiled,ragged_dot,einsum` there).
  einsum: a batched matmul over [G, R/G, K] (what capacity mode computes with
    capacity = R/G, i.e. factor 1.0): the speed the grouped kernels aim for.

Columns: groups, rows per group, ms per step (median of --repeats after a
warm-up), each method's time over einsum's, and the weight-traffic bound: the
bytes of w read twice (forward, input gradient) and d_w written once, over
--bandwidth_gbs.

With --backend=tensorflow (float32, CPU) it times instead the layer's
TensorFlow path, `backend_ops.grouped_matmul` (one MatMul per group), against
a padded BatchMatMul over [groups, largest group, K] (rows gathered into the
padded layout and back; the gather indices are precomputed, so its time is a
lower bound of what the layer would pay) and against one [rows, K] x [K, N]
MatMul of the same useful FLOPs (what a dense layer of equal ops computes).
Group sizes are even or, with --group_sizes=multinomial, drawn from a
multinomial as balanced routing gives them (the padding then follows the
largest group). Columns: ms per step, useful GFLOP/s and each method's
speed as a fraction of the one large MatMul's.

Usage (a GPU with JAX; on CPU add --interpret --rows=256 --groups=4):
  python benchmarks/grouped_matmul.py --groups=16,64,256,1024 --dtype=bfloat16
JAX on the CPU (the loop over groups the layer uses there):
  .venv/bin/python benchmarks/grouped_matmul.py --methods=tiled,einsum \
    --rows=16384 --groups=16,64,512 --dtype=float32 --repeats=3
TensorFlow on the CPU (the issue 15 shape: 4096 tokens x k=4):
  .venv/bin/python benchmarks/grouped_matmul.py --backend=tensorflow \
    --rows=16384 --groups=128,512 --group_sizes=multinomial --repeats=5
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from moe_keras.layers import pallas_grouped_matmul
from moe_keras.layers import tiled_grouped_matmul

_GROUPS = flags.DEFINE_list("groups", ["16", "64", "256", "1024"], "Groups.")
_ROWS = flags.DEFINE_integer("rows", 32768, "Rows (tokens x k).")
_K = flags.DEFINE_integer("k_dim", 512, "Contraction dimension (d).")
_N = flags.DEFINE_integer("n_dim", 1024, "Output dimension (h).")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "Operand dtype."
)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per method.")
_METHODS = flags.DEFINE_list(
    "methods", ["ragged_dot", "pallas", "einsum"], "Which to time."
)
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Run the Pallas kernels in the interpreter."
)
_BANDWIDTH = flags.DEFINE_float(
    "bandwidth_gbs", 4800.0, "Memory bandwidth for the bound (H200: 4800)."
)
_BACKEND = flags.DEFINE_enum(
    "backend",
    "jax",
    ["jax", "tensorflow"],
    "jax: ragged_dot / Pallas / tiled / einsum; tensorflow: the layer's"
    " per-group MatMuls / a padded BatchMatMul / one large MatMul"
    " (float32).",
)
_GROUP_SIZES = flags.DEFINE_enum(
    "group_sizes",
    "even",
    ["even", "multinomial"],
    "--backend=tensorflow: rows split evenly, or by a multinomial draw.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of inputs and group sizes.")

JAX_METHODS = ("ragged_dot", "pallas", "tiled", "einsum")
TF_METHODS = ("per_group", "padded_bmm", "one_matmul")


def _step(method, num_groups, dtype):
  """A jitted fn(rows, w, d_out) -> (out, d_rows, d_w), and its inputs."""
  rows_n, k, n = _ROWS.value, _K.value, _N.value
  per_group = rows_n // num_groups
  sizes = jnp.full((num_groups,), per_group, jnp.int32)
  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  rows = jax.random.normal(k1, (per_group * num_groups, k), dtype)
  w = jax.random.normal(k2, (num_groups, k, n), dtype) * 0.03
  d_out = jax.random.normal(k3, (per_group * num_groups, n), dtype)

  if method == "ragged_dot":
    fn = lambda r, w: jax.lax.ragged_dot(r, w, sizes)
  elif method == "pallas":
    fn = lambda r, w: pallas_grouped_matmul.grouped_matmul(
        r, w, sizes, interpret=_INTERPRET.value
    )
  elif method == "tiled":
    fn = lambda r, w: tiled_grouped_matmul.grouped_matmul(r, w, sizes)
  elif method == "einsum":
    fn = lambda r, w: jnp.einsum(
        "gck,gkn->gcn", r.reshape(num_groups, per_group, k), w
    ).reshape(-1, n)
  else:
    raise app.UsageError(f"unknown method {method!r}")

  @jax.jit
  def step(r, w, d):
    out, vjp = jax.vjp(fn, r, w)
    return (out,) + vjp(d)

  return step, (rows, w, d_out)


def _time(step, args):
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def _check(num_groups, dtype):
  """Pallas vs einsum on the same inputs: max abs difference of the outputs."""
  a, args = _step("pallas", num_groups, dtype)
  b, _ = _step("einsum", num_groups, dtype)
  return max(
      float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
      for x, y in zip(a(*args), b(*args))
  )


def padded_layout(group_sizes):
  """Row indices of the padded [groups, largest group] layout.

  Args:
    group_sizes: int [G] numpy array; group g owns the next group_sizes[g]
      rows of an [R, K] matrix sorted by group, R = sum(group_sizes).

  Returns:
    (gather [G, C] int64: the row at slot (g, j), or R (a zero row appended)
    for the slots past group_sizes[g]; valid_slots [R] int64: the flat slot
    of each row, in row order). C = max(group_sizes).
  """
  group_sizes = np.asarray(group_sizes, np.int64)
  capacity = int(group_sizes.max())
  starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
  slot = np.arange(capacity)[None, :]
  used = slot < group_sizes[:, None]
  gather = np.where(used, starts[:, None] + slot, int(group_sizes.sum()))
  return gather, np.flatnonzero(used.reshape(-1))


def _tf_group_sizes(num_groups):
  rows_n = _ROWS.value
  if _GROUP_SIZES.value == "even":
    return np.full(num_groups, rows_n // num_groups, np.int64)
  rng = np.random.default_rng(_SEED.value)
  return rng.multinomial(rows_n, np.full(num_groups, 1.0 / num_groups))


def _tf_step(method, group_sizes):
  """A tf.function (rows, w, d_out) -> (out, d_rows, d_w) for `method`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import backend_ops  # pylint: disable=g-import-not-at-top

  if method == "per_group":
    sizes = tf.constant(group_sizes, tf.int32)
    fn = lambda r, w: backend_ops.grouped_matmul(r, w, sizes)
  elif method == "padded_bmm":
    gather, valid_slots = (tf.constant(a) for a in padded_layout(group_sizes))

    def fn(r, w):
      padded = tf.gather(tf.pad(r, [[0, 1], [0, 0]]), gather)  # [G, C, K]
      out = tf.matmul(padded, w)  # [G, C, N]
      return tf.gather(tf.reshape(out, [-1, w.shape[-1]]), valid_slots)

  elif method == "one_matmul":
    fn = lambda r, w: tf.matmul(r, w[0])
  else:
    raise app.UsageError(f"unknown method {method!r}")

  @tf.function
  def step(r, w, d):
    with tf.GradientTape() as tape:
      tape.watch([r, w])
      out = fn(r, w)
    d_rows, d_w = tape.gradient(out, [r, w], output_gradients=d)
    return out, d_rows, d_w

  return step


def _groups():
  """--groups as integers, each in [1, --rows] (both backends).

  Returns:
    The group counts, in flag order.

  Raises:
    app.UsageError: a value is not an integer or not in [1, --rows].
  """
  try:
    groups = [int(g) for g in _GROUPS.value]
  except ValueError as e:
    raise app.UsageError(f"--groups must be integers: {e}") from e
  if any(not 1 <= g <= _ROWS.value for g in groups):
    raise app.UsageError(
        f"--groups must be in [1, --rows={_ROWS.value}]: {groups}"
    )
  return groups


def _main_tf():
  """--backend=tensorflow: the table of the module docstring."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import backend_ops  # pylint: disable=g-import-not-at-top

  if backend_ops.backend_name() != "tensorflow":
    raise app.UsageError(
        "--backend=tensorflow needs KERAS_BACKEND=tensorflow, not"
        f" {backend_ops.backend_name()!r}"
    )
  if _DTYPE.value != "float32" and _DTYPE.present:
    raise app.UsageError("--backend=tensorflow times float32 only")
  rows_n, k, n = _ROWS.value, _K.value, _N.value
  groups = _groups()
  print(
      f"tensorflow {tf.__version__}, rows={rows_n}, k={k}, n={n}, float32,"
      f" group sizes {_GROUP_SIZES.value} (seed {_SEED.value}),"
      f" TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}"
  )
  print(
      "| groups | rows/group | largest | "
      + " | ".join(f"{m} ms" for m in TF_METHODS)
      + " | "
      + " | ".join(f"{m} GFLOP/s" for m in TF_METHODS)
      + " | per_group / one_matmul speed | padded_bmm / one_matmul speed"
      " | padded_bmm max abs diff |"
  )
  print("|---:|---:|---:|" + "---:|" * (2 * len(TF_METHODS) + 3))
  rng = np.random.default_rng(_SEED.value)
  for num_groups in groups:
    group_sizes = _tf_group_sizes(num_groups)
    rows_used = int(group_sizes.sum())
    # Three matmuls of 2 * rows * k * n FLOPs: forward, d_rows, d_w.
    flops = 3 * 2 * rows_used * k * n
    rows = tf.constant(rng.standard_normal((rows_used, k)), tf.float32)
    w = tf.constant(0.03 * rng.standard_normal((num_groups, k, n)), tf.float32)
    d_out = tf.constant(rng.standard_normal((rows_used, n)), tf.float32)
    ms, results = {}, {}
    for method in TF_METHODS:
      step = _tf_step(method, group_sizes)
      # one_matmul's weight is w[0] alone: its gradient is [1, k, n], not a
      # [groups, k, n] tensor of zeros around one slice.
      args = (rows, w[:1] if method == "one_matmul" else w, d_out)
      results[method] = [t.numpy() for t in step(*args)]
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for t in step(*args):
          t.numpy()
        times.append(1e3 * (time.perf_counter() - start))
      ms[method] = statistics.median(times)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(results["padded_bmm"], results["per_group"])
    )
    gflops = [flops / (ms[m] * 1e6) for m in TF_METHODS]
    print(
        f"| {num_groups} | {rows_n // num_groups} | {group_sizes.max()} | "
        + " | ".join(f"{ms[m]:.1f}" for m in TF_METHODS)
        + " | "
        + " | ".join(f"{g:.3g}" for g in gflops)
        + f" | {ms['one_matmul'] / ms['per_group']:.2f}"
        + f" | {ms['one_matmul'] / ms['padded_bmm']:.2f} | {diff:.3g} |",
        flush=True,
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _BACKEND.value == "tensorflow":
    if _METHODS.present or _INTERPRET.value:
      raise app.UsageError(
          "--methods and --interpret are for --backend=jax; tensorflow times"
          f" {', '.join(TF_METHODS)}"
      )
    _main_tf()
    return
  groups = _groups()
  dtype = jnp.dtype(_DTYPE.value)
  methods = list(_METHODS.value)
  unknown = [m for m in methods if m not in JAX_METHODS]
  if unknown:
    raise app.UsageError(
        f"--methods: unknown {', '.join(unknown)}; choose from"
        f" {', '.join(JAX_METHODS)}"
    )
  if "pallas" in methods and jax.default_backend() != "gpu":
    if not _INTERPRET.value:
      raise app.UsageError(
          "the Pallas kernels compile for GPUs only; on"
          f" {jax.default_backend()} add --interpret (small sizes)"
      )
  print(
      f"device: {jax.devices()[0].device_kind}, jax {jax.__version__},"
      f" rows={_ROWS.value}, k={_K.value}, n={_N.value}, {_DTYPE.value}"
  )
  print(
      "| groups | rows/group | "
      + " | ".join(f"{m} ms" for m in methods)
      + " | "
      + " | ".join(f"{m}/einsum" for m in methods if m != "einsum")
      + " | weight bound ms | pallas max abs diff |"
  )
  print("|---:|---:|" + "---:|" * (2 * len(methods) - 1 + 2))
  itemsize = np.dtype(dtype).itemsize
  for num_groups in groups:
    ms = {}
    for method in methods:
      try:
        ms[method] = _time(*_step(method, num_groups, dtype))
      except Exception as e:  # pylint: disable=broad-except
        # Out of memory (ragged_dot's dense expansion at many groups).
        print(
            f"  {method} at {num_groups} groups: {type(e).__name__}:"
            f" {str(e).splitlines()[0][:120]}"
        )
        ms[method] = float("nan")
    bound = (
        3
        * num_groups
        * _K.value
        * _N.value
        * itemsize
        / (_BANDWIDTH.value * 1e6)
    )
    diff = _check(num_groups, dtype) if "pallas" in methods else float("nan")
    cells = [f"{ms[m]:.3f}" for m in methods]
    rel = [
        f"{ms[m] / ms['einsum']:.2f}"
        for m in methods
        if m != "einsum" and "einsum" in ms
    ]
    print(
        f"| {num_groups} | {_ROWS.value // num_groups} | "
        + " | ".join(cells)
        + " | "
        + " | ".join(rel)
        + f" | {bound:.3f} | {diff:.3g} |",
        flush=True,
    )


if __name__ == "__main__":
  app.run(main)
