"""Shared check of the JAX grouped matmuls (Pallas kernels, CPU loop).

Imported by their test modules as `grouped_matmul_testlib` (a unique name).
"""

import jax
import jax.numpy as jnp
import numpy as np

import numpy_reference as ref


def check_against_numpy_and_ragged_dot(matmul, sizes, num_rows, k, n, seed):
  """Values and both gradients of `matmul(lhs, rhs, sizes)` on random data.

  References: numpy group loops (`numpy_reference.grouped_matmul`, with the
  hand-derived gradients) and `jax.lax.ragged_dot`. Rows past sum(sizes)
  must be zero in the output and in d_lhs, and empty groups' d_rhs zero.

  Args:
    matmul: fn(lhs [R, K], rhs [G, K, N], group_sizes int32 [G]) -> [R, N].
    sizes: list of G group sizes, sum <= num_rows.
    num_rows: R.
    k: K.
    n: N.
    seed: numpy seed of lhs, rhs and d_out.
  """
  rng = np.random.default_rng(seed)
  sizes = np.array(sizes, np.int32)
  lhs = rng.normal(size=(num_rows, k)).astype(np.float32)
  rhs = rng.normal(size=(len(sizes), k, n)).astype(np.float32)
  d_out = rng.normal(size=(num_rows, n)).astype(np.float32)
  want, want_grads = ref.grouped_matmul(lhs, rhs, sizes)

  out, vjp = jax.vjp(
      lambda a, b: matmul(a, b, jnp.asarray(sizes)),
      jnp.asarray(lhs),
      jnp.asarray(rhs),
  )
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)
  routed = int(sizes.sum())
  np.testing.assert_array_equal(np.asarray(out)[routed:], 0.0)
  d_lhs, d_rhs = vjp(jnp.asarray(d_out))
  want_d_lhs, want_d_rhs = want_grads(d_out.astype(np.float64))
  np.testing.assert_allclose(
      np.asarray(d_lhs), want_d_lhs, rtol=1e-5, atol=1e-4
  )
  np.testing.assert_allclose(
      np.asarray(d_rhs), want_d_rhs, rtol=1e-5, atol=1e-4
  )
  np.testing.assert_array_equal(np.asarray(d_lhs)[routed:], 0.0)
  for g in np.flatnonzero(sizes == 0):
    np.testing.assert_array_equal(np.asarray(d_rhs)[g], 0.0)

  if num_rows == 0:
    return
  ragged, ragged_vjp = jax.vjp(
      lambda a, b: jax.lax.ragged_dot(a, b, jnp.asarray(sizes)),
      jnp.asarray(lhs),
      jnp.asarray(rhs),
  )
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(ragged), rtol=1e-5, atol=1e-4
  )
  for mine, theirs in zip((d_lhs, d_rhs), ragged_vjp(jnp.asarray(d_out))):
    np.testing.assert_allclose(
        np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-4
    )


def check_bfloat16(matmul):
  """`matmul` on bf16 inputs returns bf16, accumulated in float32.

  The reference is computed from the bf16-rounded inputs in float64, so
  only the final rounding to bf16 (relative 2^-8) separates them.

  Args:
    matmul: fn(lhs [R, K], rhs [G, K, N], group_sizes int32 [G]) -> [R, N].
  """
  rng = np.random.default_rng(7)
  sizes = np.array([20, 12], np.int32)
  lhs = rng.normal(size=(32, 64)).astype(np.float32)
  rhs = rng.normal(size=(2, 64, 16)).astype(np.float32)
  lhs_bf = jnp.asarray(lhs, jnp.bfloat16)
  rhs_bf = jnp.asarray(rhs, jnp.bfloat16)
  out = matmul(lhs_bf, rhs_bf, jnp.asarray(sizes))
  assert out.dtype == jnp.bfloat16
  want, _ = ref.grouped_matmul(
      np.asarray(lhs_bf, np.float32), np.asarray(rhs_bf, np.float32), sizes
  )
  np.testing.assert_allclose(
      np.asarray(out, np.float32), want, rtol=8e-3, atol=8e-3
  )
