"""The Pallas grouped matmul (GPU dropless experts).

On CPU (CI) the kernels run in Pallas's interpreter; on a GPU the same tests
run them compiled (Triton).

References are numpy loops over the groups (values, and the hand-derived
gradients d_lhs[r] = d_out[r] rhs[g(r)]^T, d_rhs[g] = lhs_g^T d_out_g), and
`jax.lax.ragged_dot`, XLA's own implementation. The layer test runs SparseMoE
(dropless) on the JAX backend in a subprocess with the kernels chosen by
MOE_KERAS_JAX_GROUPED_MATMUL=pallas_interpret.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from moe_keras.layers import backend_ops  # pylint: disable=g-import-not-at-top
from moe_keras.layers import pallas_grouped_matmul as pgm  # pylint: disable=g-import-not-at-top
import grouped_matmul_testlib
import layer_testlib

# Compiled on GPUs, interpreted elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def test_work_items_hand_derived():
  # Rows by group: g1 0-16, g2 17-56, g4 57-59, g5 60-79 (g0, g3 empty);
  # 16-row tiles: g1 spans tiles 0-1, g2 1-3, g4 3, g5 3-4.
  sizes = jnp.array([0, 17, 40, 0, 3, 20], jnp.int32)
  tile, group, valid = pgm.work_items(sizes, num_rows=96, block_m=16)
  assert tile.shape == (6 + 6 - 1,)
  pairs = [(int(t), int(g)) for t, g, v in zip(tile, group, valid) if int(v)]
  assert pairs == [
      (0, 1),
      (1, 1),
      (1, 2),
      (2, 2),
      (3, 2),
      (3, 4),
      (3, 5),
      (4, 5),
  ]
  assert int(np.sum(np.asarray(valid))) == 8


@pytest.mark.parametrize(
    "sizes,num_rows",
    [
        ([0, 17, 40, 0, 3, 20], 100),  # empty groups, tiles shared, R % 16
        ([64, 0, 0, 32], 96),  # groups on tile boundaries, all rows routed
        ([5, 0, 0, 0, 0, 0, 0, 2], 40),  # most groups empty, most rows not
        ([0, 0, 0], 16),  # nothing routed
    ],
)
def test_values_and_gradients_match_numpy_and_ragged_dot(sizes, num_rows):
  grouped_matmul_testlib.check_against_numpy_and_ragged_dot(
      lambda a, b, s: pgm.grouped_matmul(
          a, b, s, interpret=INTERPRET, block_m=16
      ),
      sizes,
      num_rows,
      k=32,
      n=48,
      seed=len(sizes) + num_rows,
  )


def test_no_rows():
  rhs = jnp.ones((3, 16, 32))
  out, vjp = jax.vjp(
      lambda b: pgm.grouped_matmul(
          jnp.zeros((0, 16)), b, jnp.zeros((3,), jnp.int32)
      ),
      rhs,
  )
  assert out.shape == (0, 32)
  np.testing.assert_array_equal(np.asarray(vjp(out)[0]), 0.0)


def test_bfloat16_accumulates_in_float32():
  grouped_matmul_testlib.check_bfloat16(
      lambda a, b, s: pgm.grouped_matmul(
          a, b, s, interpret=INTERPRET, block_m=16
      )
  )


def test_bad_inputs_raise_one_line_errors():
  lhs = jnp.zeros((32, 24))
  with pytest.raises(ValueError, match="multiples of 16"):
    pgm.grouped_matmul(lhs, jnp.zeros((2, 24, 16)), jnp.array([1, 1]))
  lhs = jnp.zeros((32, 16))
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    pgm.grouped_matmul(
        lhs, jnp.zeros((2, 16, 16)), jnp.array([1, 1]), block_m=24
    )
  with pytest.raises(ValueError, match=r"group_sizes must have shape \(2,\)"):
    pgm.grouped_matmul(lhs, jnp.zeros((2, 16, 16)), jnp.array([1, 1, 1]))


def test_choice_from_the_environment(monkeypatch):
  env = backend_ops.JAX_GROUPED_MATMUL_ENV
  monkeypatch.delenv(env, raising=False)
  choose = backend_ops.jax_grouped_matmul_choice
  # auto, per platform: the loop over groups on CPUs, the kernels on GPUs
  # (ragged_dot for weights they do not take), else ragged_dot.
  for platform, fits, other in (
      ("cpu", "tiled", "tiled"),
      ("gpu", "pallas", "ragged_dot"),
      ("tpu", "ragged_dot", "ragged_dot"),
  ):
    monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
    assert choose((8, 16), (2, 16, 32)) == fits, platform
    assert choose((8, 8), (2, 8, 32)) == other, platform
  monkeypatch.undo()
  monkeypatch.setenv(env, "tiled")  # Any shapes.
  assert choose((8, 8), (2, 8, 32)) == "tiled"
  monkeypatch.setenv(env, "pallas_interpret")
  assert backend_ops.jax_grouped_matmul_choice((8, 16), (2, 16, 32)) == (
      "pallas_interpret"
  )
  with pytest.raises(ValueError, match="multiples of 16, got weights"):
    backend_ops.jax_grouped_matmul_choice((8, 8), (2, 8, 32))
  monkeypatch.setenv(env, "triton")
  with pytest.raises(ValueError, match="'triton' is not one of auto"):
    backend_ops.jax_grouped_matmul_choice((8, 16), (2, 16, 32))


def test_sparse_moe_dropless_with_the_kernels_matches_numpy_and_ragged_dot():
  """KERAS_BACKEND=jax: the layer's training step (values, every gradient)."""
  layer_testlib.check_dropless_step(
      "moe_keras.layers.pallas_grouped_matmul", "pallas_interpret", "ragged_dot"
  )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_lower_to_triton_for_cuda(dtype):
  """Without a GPU: the forward and both gradients go through Pallas's
  Triton lowering for CUDA (what is left unchecked here is Triton's own
  compilation to PTX and the speed: benchmarks/gpu_check.sh)."""
  from jax import export  # pylint: disable=g-import-not-at-top

  rows, k, n, groups = 512, 64, 256, 8
  sizes = jnp.full((groups,), rows // groups, jnp.int32)

  def step(lhs, rhs, d_out):
    out, vjp = jax.vjp(lambda a, b: pgm.grouped_matmul(a, b, sizes), lhs, rhs)
    return (out,) + vjp(d_out)

  shapes = [
      jax.ShapeDtypeStruct(s, jnp.dtype(dtype))
      for s in ((rows, k), (groups, k, n), (rows, n))
  ]
  exported = export.export(
      jax.jit(step),
      platforms=["cuda"],
      disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
      ],
  )(*shapes)
  text = exported.mlir_module()
  assert text.count("@__gpu$xla.gpu.triton") == 3, text[:2000]
  # Forward and input gradient (the same kernel), then the weight gradient.
  assert text.count('name = "moe_grouped_matmul"') == 2
  assert text.count('name = "moe_grouped_matmul_weight_grad"') == 1
