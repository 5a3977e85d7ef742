"""The loop-over-groups grouped matmul (dropless experts on CPUs, JAX).

References are numpy loops over the groups (`numpy_reference.grouped_matmul`:
values and the hand-derived gradients) and `jax.lax.ragged_dot`, XLA's own
implementation. The layer test runs SparseMoE (dropless) on the JAX backend
in a subprocess with the default choice, which is this module on CPUs.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from moe_keras.layers import tiled_grouped_matmul as tgm  # pylint: disable=g-import-not-at-top
import grouped_matmul_testlib
import layer_testlib


def test_tiles_cover_each_group_row_once():
  """Every row of a group is computed (valid) exactly once, by any tiling;
  at most MIN_TILE - 1 rows past the group are touched, and none before."""
  block_m = 16
  num_rows = 200

  def coverage(start, size):
    def visit(carry, row0, rows, valid):
      counted, touched = carry
      idx = row0 + jnp.arange(rows)
      ok = jnp.ones((rows,), jnp.int32)
      if valid is not None:
        ok = (jnp.arange(rows) < valid).astype(jnp.int32)
      return counted.at[idx].add(ok), touched.at[idx].add(1)

    zeros = jnp.zeros((num_rows,), jnp.int32)
    return tgm._over_tiles(  # pylint: disable=protected-access
        (zeros, zeros), start, size, visit, block_m
    )

  run = jax.jit(coverage)
  for start, size in [
      (0, 0),
      (3, 1),
      (0, 8),
      (5, 13),
      (7, 45),
      (16, 64),
      (1, 71),
      (9, 127),
  ]:
    counted, touched = (np.asarray(a) for a in run(start, size))
    want = np.zeros(num_rows, np.int32)
    want[start : start + size] = 1
    np.testing.assert_array_equal(counted, want, err_msg=(start, size))
    outside = np.flatnonzero((touched > 0) & (want == 0))
    assert outside.size < tgm.MIN_TILE, (start, size, outside)
    assert np.all(outside >= start + size), (start, size, outside)
    assert touched.max() <= 1, (start, size)


@pytest.mark.parametrize(
    "sizes,num_rows,block_m",
    [
        ([0, 17, 40, 0, 3, 20], 100, 16),  # empty groups, all remainders
        ([64, 0, 0, 32], 96, 16),  # full tiles only, all rows routed
        ([5, 0, 0, 0, 0, 0, 0, 2], 40, 8),  # most groups empty, rows not
        ([0, 0, 0], 16, 16),  # nothing routed
        ([300, 1, 0, 211], 520, 128),  # the default tile, several per group
        ([0, 0], 0, 16),  # no rows at all
    ],
)
def test_values_and_gradients_match_numpy_and_ragged_dot(
    sizes, num_rows, block_m
):
  grouped_matmul_testlib.check_against_numpy_and_ragged_dot(
      jax.jit(lambda a, b, s: tgm.grouped_matmul(a, b, s, block_m=block_m)),
      sizes,
      num_rows,
      k=24,
      n=40,
      seed=len(sizes) + num_rows,
  )


def test_bfloat16_accumulates_in_float32():
  grouped_matmul_testlib.check_bfloat16(
      lambda a, b, s: tgm.grouped_matmul(a, b, s, block_m=8)
  )


def test_memory_grows_with_rows_not_rows_times_groups():
  """XLA's buffer plan of a training step: temporaries within a small
  multiple of the rows plus the weights (ragged_dot's dense expansion on
  CPU needs rows x groups x N)."""
  rows, k, n, groups = 2048, 32, 64, 64
  sizes = jnp.full((groups,), rows // groups, jnp.int32)

  def step(matmul):
    def loss(lhs, rhs):
      return jnp.sum(matmul(lhs, rhs, sizes) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  shapes = (
      jax.ShapeDtypeStruct((rows, k), jnp.float32),
      jax.ShapeDtypeStruct((groups, k, n), jnp.float32),
  )
  linear_bytes = 4 * (rows * (k + n) + groups * k * n)

  def temp_bytes(matmul):
    compiled = step(matmul).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  tiled = temp_bytes(tgm.grouped_matmul)
  assert tiled <= 4 * linear_bytes, (tiled, linear_bytes)
  dense = temp_bytes(jax.lax.ragged_dot)
  assert dense > 8 * tiled, (dense, tiled)


def test_bad_inputs_raise_one_line_errors():
  lhs = jnp.zeros((32, 16))
  with pytest.raises(ValueError, match=r"needs lhs \[R, K\] and rhs"):
    tgm.grouped_matmul(lhs, jnp.zeros((2, 24, 16)), jnp.array([1, 1]))
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    tgm.grouped_matmul(
        lhs, jnp.zeros((2, 16, 16)), jnp.array([1, 1]), block_m=24
    )
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    tgm.grouped_matmul(
        lhs, jnp.zeros((2, 16, 16)), jnp.array([1, 1]), block_m=4
    )
  with pytest.raises(ValueError, match=r"group_sizes must have shape \(2,\)"):
    tgm.grouped_matmul(lhs, jnp.zeros((2, 16, 16)), jnp.array([1, 1, 1]))


def test_sparse_moe_dropless_on_cpu_uses_the_loop_and_matches_numpy():
  """KERAS_BACKEND=jax: the layer's training step (values, every gradient)."""
  layer_testlib.check_dropless_step(
      "moe_keras.layers.tiled_grouped_matmul", "auto", "ragged_dot"
  )
