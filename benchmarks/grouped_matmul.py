r"""Benchmark: the dropless experts' grouped matmul on JAX, three ways.

Times forward + backward (input and weight gradients) of
out[r] = rows[r] @ w[g(r)] for rows split evenly over the groups (the balanced
routing the losses aim for), with:

  ragged_dot: `jax.lax.ragged_dot` (what XLA makes of it; on GPUs and CPUs
    today a dense expansion over groups x rows).
  pallas: `moe_keras.layers.pallas_grouped_matmul` (GPU: Triton; elsewhere
    only with --interpret, at small sizes).
  einsum: a batched matmul over [G, R/G, K] (what capacity mode computes with
    capacity = R/G, i.e. factor 1.0): the speed the grouped kernels aim for.

Columns: groups, rows per group, ms per step (median of --repeats after a
warm-up), each method's time over einsum's, and the weight-traffic bound: the
bytes of w read twice (forward, input gradient) and d_w written once, over
--bandwidth_gbs.

Usage (a GPU with JAX; on CPU add --interpret --rows=256 --groups=4):
  python benchmarks/grouped_matmul.py --groups=16,64,256,1024 --dtype=bfloat16
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from moe_keras.layers import pallas_grouped_matmul

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  dtype = jnp.dtype(_DTYPE.value)
  methods = list(_METHODS.value)
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
  for num_groups in (int(g) for g in _GROUPS.value):
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
