"""SparseMoE(gating="batchwise") vs the numpy reference: appendix F, eqs 15-20.

Training: G = renormalised softmax over the batchwise top-m mask (eqs 16, 18),
m = k * |X| / n with |X| the number of valid tokens. Inference: the per-example
threshold mask (eq 19). Loss: w_importance * CV^2(Importance) +
w_batchwise * L_batchwise (eq 20), L_batchwise giving gradient only to the
thresholds. Tolerances as in test_sparse_moe.py.
"""

from keras import ops
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import SparseMoE
import numpy_reference as ref

D, H = 8, 16
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)


def _np(x):
  """Converts a backend tensor to a numpy array."""
  return np.asarray(ops.convert_to_numpy(x))


def make_layer(n, k, weights, **kwargs):
  """Builds a batchwise-gated SparseMoE with the given weights."""
  layer = SparseMoE(
      num_experts=n, k=k, expert_hidden_dim=H, gating="batchwise", **kwargs
  )
  layer.build((None, D))
  ref.assign_weights(layer, weights)
  return layer


@pytest.fixture
def rng():
  return np.random.default_rng(1015)


def test_thresholds_variable_zero_init():
  layer = SparseMoE(num_experts=5, k=2, expert_hidden_dim=H, gating="batchwise")
  layer.build((None, D))
  assert tuple(layer.thresholds.shape) == (5,)
  assert layer.thresholds.trainable
  np.testing.assert_array_equal(_np(layer.thresholds), 0.0)


@pytest.mark.parametrize("n,k,n_tok", [(4, 2, 32), (8, 1, 32), (4, 3, 16)])
def test_training_batchwise_mask_output_and_loss(rng, n, k, n_tok):
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  layer = make_layer(n, k, w, w_importance=0.2, w_batchwise=0.7)
  y, stats = layer(x, training=True, return_stats=True)
  total = float(sum(_np(l) for l in layer.losses))
  want = ref.sparse_moe(
      x, w, k, gating="batchwise", w_importance=0.2, w_batchwise=0.7
  )
  m = k * n_tok // n
  # Each expert gets exactly m tokens.
  np.testing.assert_array_equal((want["gates"] > 0).sum(axis=0), np.full(n, m))
  np.testing.assert_allclose(_np(stats["token_counts"]), np.full(n, m))
  np.testing.assert_allclose(_np(y), want["output"], **OUT_TOL)
  np.testing.assert_allclose(
      _np(stats["importance"]), want["importance"], **OUT_TOL
  )
  assert (
      want["batchwise_loss"] > 0
  ), "thresholds should disagree with the batch mask"
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)


def test_batchwise_mask_counts_only_valid_tokens(rng):
  """m = k * (valid tokens) / n, padding never selected, padding output 0."""
  n, k, B, T = 4, 2, 2, 10
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[0, 8:] = False
  mask[1, 8:] = False  # 16 valid tokens -> m = 8.
  valid = mask.reshape(-1)
  layer = make_layer(n, k, w, w_importance=0.1, w_batchwise=1.0)
  y, stats = layer(x, training=True, mask=mask, return_stats=True)
  total = float(sum(_np(l) for l in layer.losses))
  want = ref.sparse_moe(x.reshape(-1, D), w, k, gating="batchwise", valid=valid)
  np.testing.assert_allclose(_np(stats["token_counts"]), np.full(n, 8.0))
  y = _np(y).reshape(-1, D)
  np.testing.assert_array_equal(y[~valid], 0.0)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)


def test_thresholds_get_gradient_only_from_l_batchwise(rng):
  n, k, n_tok = 4, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  layer = make_layer(n, k, w, w_importance=0.0, w_batchwise=0.5)
  with tf.GradientTape() as tape:
    layer(x, training=True)
    aux = tf.add_n(layer.losses)
  g_t, g_gate = tape.gradient(aux, [layer.thresholds.value, layer.w_gate.value])
  want = ref.sparse_moe(
      x, w, k, gating="batchwise", w_importance=0.0, w_batchwise=0.5
  )
  assert np.any(want["threshold_grad"] != 0)
  # dL/dT_i = -w * sum_j (M_threshold - M_batchwise)_{j,i}: integers times w.
  np.testing.assert_allclose(
      _np(g_t), want["threshold_grad"], rtol=1e-6, atol=1e-6
  )
  # Gradient descent then raises T_i on false admits, lowers it on false rejects.
  assert g_gate is None or np.all(_np(g_gate) == 0.0), _np(g_gate)


def test_inference_uses_per_example_threshold_mask(rng):
  n, k, n_tok = 4, 2, 24
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  layer = make_layer(n, k, w)
  y = _np(layer(x, training=False))
  assert len(layer.losses) == 0
  want = ref.sparse_moe(x, w, k, gating="batchwise", training=False)
  counts = (want["gates"] > 0).sum(axis=1)
  assert (
      len(set(counts)) > 1
  ), "data should give examples different numbers of experts"
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  # One example's output does not depend on the rest of the batch.
  for j in (0, 5, 17):
    alone = _np(layer(x[j : j + 1], training=False))
    np.testing.assert_allclose(alone[0], y[j], rtol=1e-6, atol=1e-6)
  shuffled = rng.permutation(n_tok)
  y_perm = _np(layer(x[shuffled], training=False))
  np.testing.assert_allclose(y_perm, y[shuffled], rtol=1e-6, atol=1e-6)


def test_inference_example_with_no_expert_outputs_zero(rng):
  n, k = 4, 2
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=0.2, batchwise=True)
  w["thresholds"][:] = 1.0  # Nobody clears the threshold (probs > T is strict).
  x = rng.normal(size=(6, D)).astype(np.float32)
  layer = make_layer(n, k, w)
  y = _np(layer(x, training=False))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y, 0.0)
