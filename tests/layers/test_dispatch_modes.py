"""Dropless dispatch modes: one matmul per expert ("grouped") and one einsum
over a buffer padded to the step's largest expert ("padded") give the numpy
reference's outputs and losses and the same gradients; the padded plan works
with a dynamic batch.

Tolerances as in test_sparse_moe.py (float32 vs float64 reference); padded
vs grouped gradients: the same float32 sums in another order, 1e-5.
"""

from keras import ops
import numpy as np
import pytest
import tensorflow as tf

import layer_testlib
from moe_keras.layers import dispatch
from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
import numpy_reference as ref

D, H = 8, 16
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-7)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


@pytest.fixture
def rng():
  return np.random.default_rng(2077)


def _flat(rng, mode, use_bias, recompute=False):
  layer, w, x, noise = layer_testlib.flat_layer(
      rng,
      dim=D,
      hidden=H,
      num_experts=6,
      k=2,
      tokens=40,
      use_bias=use_bias,
      dispatch_mode=mode,
      recompute_expert_activations=recompute,
  )
  want = ref.sparse_moe(x, w, 2, noise=noise, w_importance=0.3, w_load=0.7)
  return layer, x, noise, want


def _hier(rng, mode):
  a, b, n_tok = 3, 4, 30
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  layer = HierarchicalSparseMoE(
      num_groups=a,
      experts_per_group=b,
      k_primary=2,
      k_secondary=2,
      expert_hidden_dim=H,
      dispatch_mode=mode,
  )
  layer.build((None, D))
  ref.assign_weights(layer, w)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  noise = (
      rng.normal(size=(n_tok, a)).astype(np.float32),
      rng.normal(size=(n_tok, a, b)).astype(np.float32),
  )
  want = ref.hierarchical_moe(
      x, w, 2, 2, primary_noise=noise[0], secondary_noise=noise[1]
  )
  return layer, x, noise, want


def _output_loss_grads(layer, x, noise):
  """Output, summed losses and gradients of sum(y * r) + losses."""
  y, loss, named, d_x = layer_testlib.output_loss_grads(layer, x, noise)
  # By weight name (either expert layout: "grouped" is per-expert on
  # TensorFlow by default, "padded" stacked), the input's first.
  return y, loss, [d_x] + [named[name] for name in sorted(named)]


@pytest.mark.parametrize("use_bias", [False, True])
def test_flat_padded_and_grouped_match_reference(rng, use_bias):
  results = {}
  for mode in ("grouped", "padded"):
    layer, x, noise, want = _flat(
        np.random.default_rng(5), mode, use_bias=use_bias
    )
    y, loss, grads = _output_loss_grads(layer, x, noise)
    np.testing.assert_allclose(y, want["output"], **OUT_TOL)
    np.testing.assert_allclose(loss, want["total_loss"], **LOSS_TOL)
    results[mode] = grads
  for got, other in zip(results["padded"], results["grouped"]):
    np.testing.assert_allclose(got, other, **GRAD_TOL)


def test_hierarchical_padded_and_grouped_match_reference(rng):
  results = {}
  for mode in ("grouped", "padded"):
    layer, x, noise, want = _hier(np.random.default_rng(6), mode)
    y, loss, grads = _output_loss_grads(layer, x, noise)
    np.testing.assert_allclose(y, want["output"], **OUT_TOL)
    np.testing.assert_allclose(
        loss, want["importance_loss"] + want["load_loss"], **LOSS_TOL
    )
    results[mode] = grads
  for got, other in zip(results["padded"], results["grouped"]):
    np.testing.assert_allclose(got, other, **GRAD_TOL)


def test_padded_expert_gradient_matches_finite_differences():
  """d sum(y * r) / d expert_kernel_1 entries against the float64 reference."""
  layer, x, noise, _ = _flat(np.random.default_rng(7), "padded", False)
  w = {v.name: _np(v).astype(np.float64) for v in layer.weights}
  r = np.random.default_rng(8).normal(size=(x.shape[0], D))
  with tf.GradientTape() as tape:
    y = layer(x, training=True, noise=noise)
    task = tf.reduce_sum(y * tf.constant(r, tf.float32))
  got = _np(tape.gradient(task, layer.expert_kernel_1.value))
  eps = 1e-4
  for idx in [(0, 1, 2), (3, 0, 5), (5, 7, 15), (2, 4, 0)]:
    plus, minus = dict(w), dict(w)
    plus["expert_kernel_1"] = w["expert_kernel_1"].copy()
    minus["expert_kernel_1"] = w["expert_kernel_1"].copy()
    plus["expert_kernel_1"][idx] += eps
    minus["expert_kernel_1"][idx] -= eps
    f = lambda ww: np.sum(ref.sparse_moe(x, ww, 2, noise=noise)["output"] * r)
    want = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(got[idx], want, rtol=2e-3, atol=2e-4)


def test_padded_recompute_matches_plain():
  plain = _output_loss_grads(
      *_flat(np.random.default_rng(9), "padded", False)[:3]
  )
  again = _output_loss_grads(
      *_flat(np.random.default_rng(9), "padded", False, recompute=True)[:3]
  )
  np.testing.assert_allclose(plain[0], again[0], **OUT_TOL)
  for got, want in zip(again[2], plain[2]):
    np.testing.assert_allclose(got, want, **GRAD_TOL)


def test_padded_plan_layout_by_hand():
  """Experts 0, 1, 2 get 3, 1, 0 assignments: C = 3 rounded up to the
  multiple M, slot e*C + c holds the c-th token of expert e."""
  ids = np.array([[0, 1], [0, 3], [0, 3]], np.int32)  # 3 = unrouted
  plan = dispatch.RoutingPlan(tf.constant(ids), num_experts=3, padded=True)
  m = dispatch.PADDED_CAPACITY_MULTIPLE
  assert int(_np(plan.capacity)) == m
  np.testing.assert_array_equal(_np(plan.group_sizes), [3, 1, 0])
  want = np.full(3 * m, 3)  # N = 3 marks empty slots.
  want[[0, 1, 2]] = [0, 1, 2]
  want[m] = 0
  np.testing.assert_array_equal(_np(plan.row_token), want)
  assert int(_np(plan.num_dropped)) == 0


def test_padded_works_with_a_dynamic_batch(rng):
  layer, x, noise, want = _flat(rng, "padded", False)

  @tf.function(
      input_signature=[
          tf.TensorSpec([None, D], tf.float32),
          tf.TensorSpec([None, 6], tf.float32),
      ]
  )
  def call(x, noise):
    return layer(x, training=True, noise=noise)

  np.testing.assert_allclose(_np(call(x, noise)), want["output"], **OUT_TOL)


def test_unknown_dispatch_mode_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown dispatch_mode 'fast'"):
    SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, dispatch_mode="fast")


def test_dispatch_mode_serializes():
  layer = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=H, dispatch_mode="grouped"
  )
  again = SparseMoE.from_config(layer.get_config())
  assert again.dispatch_mode == "grouped"
