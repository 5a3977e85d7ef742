"""SparseMoE(gating="batchwise") vs the numpy reference: appendix F, eqs 15-20.

Training: G = renormalised softmax over the batchwise top-m mask (eqs 16, 18),
m = k * |X| / n with |X| the number of valid tokens. Inference: the per-example
threshold mask (eq 19). Loss: w_importance * CV^2(Importance) +
w_batchwise * L_batchwise (eq 20 as a mean over tokens and experts),
L_batchwise giving gradient only to the thresholds. Ties (a fresh layer's
gates all equal 1/n) spread over the experts; thresholds start at 1/n.
Tolerances as in test_sparse_moe.py.
"""

import keras
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


def test_thresholds_variable_initialized_to_one_over_n():
  layer = SparseMoE(num_experts=5, k=2, expert_hidden_dim=H, gating="batchwise")
  layer.build((None, D))
  assert tuple(layer.thresholds.shape) == (5,)
  assert layer.thresholds.trainable
  np.testing.assert_allclose(_np(layer.thresholds), 0.2, rtol=1e-7)


def _experts_per_token(gates):
  """Number of experts with a nonzero gate, per token (numpy)."""
  return (np.asarray(gates) > 0).sum(axis=1)


def _gate_revealing_layer(n, k):
  """A fresh batchwise layer (W_g = 0, T = 1/n) whose output shows its gates.

  Expert i outputs the unit vector e_i whatever its input (zero W1, hidden
  bias 1 on unit 0, W2_i[0] = e_i), so y[:, :n] = G(x), eq. (16).
  """
  layer = SparseMoE(
      num_experts=n,
      k=k,
      expert_hidden_dim=H,
      gating="batchwise",
      use_bias=True,
  )
  layer.build((None, D))
  return ref.reveal_gates(layer, n, D, H)


@pytest.mark.parametrize(
    "n,k,n_tok",
    [(8, 2, 512), (4, 2, 32), (8, 1, 40), (4, 3, 16), (8, 3, 24), (6, 2, 7)],
)
def test_fresh_layer_gives_every_token_its_experts(n, k, n_tok):
  """At initialization (W_g = 0) all gates tie; ties must not drop tokens.

  Tie order by token index alone gave every expert the same first m tokens
  (75% of 512 tokens without an expert for n = 8, k = 2). Counted here from
  the output gates: every expert takes m = floor(k N / n) tokens, and the
  n m assignments spread evenly, floor(n m / N) or ceil(n m / N) experts per
  token: exactly k when n divides k N, never 0 while n m >= N.
  """
  layer = _gate_revealing_layer(n, k)
  x = np.random.default_rng(n * 100 + n_tok).normal(size=(n_tok, D))
  gates = _np(layer(x.astype(np.float32), training=True))[:, :n]
  np.testing.assert_array_equal(_np(layer.w_gate), 0.0)
  m = max(1, k * n_tok // n)
  np.testing.assert_array_equal((gates > 0).sum(axis=0), np.full(n, m))
  counts = _experts_per_token(gates)
  assert counts.sum() == n * m
  assert counts.min() == (n * m) // n_tok, counts
  assert counts.max() == -(-(n * m) // n_tok), counts
  if (k * n_tok) % n == 0:
    np.testing.assert_array_equal(counts, np.full(n_tok, k))
  # Each token's gates are its true probabilities renormalized: 1 / count.
  rows = np.nonzero(counts)[0]
  np.testing.assert_allclose(
      gates[rows].max(axis=1), 1.0 / counts[rows], rtol=1e-6
  )


def test_fresh_layer_ties_with_padding_spread_over_valid_tokens():
  n, k, B, T = 4, 2, 3, 8
  layer = _gate_revealing_layer(n, k)
  x = np.random.default_rng(7).normal(size=(B, T, D)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[0, 5:] = False
  mask[2, 1:] = False  # 5 + 8 + 1 = 14 valid tokens: m = 7, 2 each.
  valid = mask.reshape(-1)
  gates = _np(layer(x, training=True, mask=mask)).reshape(-1, D)[:, :n]
  counts = _experts_per_token(gates)
  np.testing.assert_array_equal(counts[~valid], 0)
  np.testing.assert_array_equal(counts[valid], np.full(14, 2))
  np.testing.assert_array_equal((gates > 0).sum(axis=0), np.full(n, 7))


def test_fresh_layer_at_inference_admits_no_expert():
  """T = 1/n and every probability 1/n: no expert is strictly above T."""
  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, gating="batchwise")
  x = np.random.default_rng(3).normal(size=(10, D)).astype(np.float32)
  y, stats = layer(x, training=False, return_stats=True)
  np.testing.assert_array_equal(_np(stats["token_counts"]), 0.0)
  np.testing.assert_array_equal(_np(y), 0.0)


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


def test_threshold_loss_is_a_mean_that_does_not_grow_with_the_batch(rng):
  n, k = 4, 2
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  layer = make_layer(n, k, w, w_importance=0.0, w_batchwise=1.0)
  x = rng.normal(size=(64, D)).astype(np.float32)
  _, stats = layer(x, training=True, return_stats=True)
  want = ref.sparse_moe(x, w, k, gating="batchwise", w_importance=0.0)
  np.testing.assert_allclose(
      _np(stats["batchwise_loss"]), want["batchwise_loss"], **LOSS_TOL
  )
  # The same tokens four times: m grows 4x, the masks repeat, the mean stays
  # (a sum over tokens would be 4x).
  _, stats4 = layer(np.tile(x, (4, 1)), training=True, return_stats=True)
  np.testing.assert_allclose(
      _np(stats4["batchwise_loss"]), want["batchwise_loss"], **LOSS_TOL
  )
  # Four times as many fresh tokens of the same distribution: same scale.
  x_big = rng.normal(size=(256, D)).astype(np.float32)
  _, stats_big = layer(x_big, training=True, return_stats=True)
  want_big = ref.sparse_moe(x_big, w, k, gating="batchwise", w_importance=0.0)
  np.testing.assert_allclose(
      _np(stats_big["batchwise_loss"]), want_big["batchwise_loss"], **LOSS_TOL
  )
  ratio = want_big["batchwise_loss"] / want["batchwise_loss"]
  assert 0.5 < ratio < 2.0, ratio


def test_threshold_loss_cannot_dominate_a_clipped_global_norm(rng):
  """SGD with global_clipnorm=1: L_batchwise barely shrinks the task update.

  Worst case for eq. (20): T = 0 admits every expert for every token, so every
  expert disagrees with the batch mask on N - m tokens (summed over tokens the
  threshold gradient had norm sqrt(n) (N - m), 1086 here).
  """
  n, k, n_tok, clip = 8, 2, 512, 1.0
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  w["thresholds"][:] = 0.0
  layer = make_layer(
      n, k, w, w_importance=0.1, w_batchwise=1.0, expert_variables="stacked"
  )
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  target = rng.normal(size=(n_tok, D)).astype(np.float32)
  variables = [v.value for v in layer.trainable_variables]
  with tf.GradientTape(persistent=True) as tape:
    y = layer(x, training=True)
    task = tf.reduce_mean(tf.square(y - target))
    total = task + tf.add_n(layer.losses)
  g_task = tape.gradient(task, variables)
  g_total = tape.gradient(total, variables)
  want = ref.sparse_moe(x, w, k, gating="batchwise", w_importance=0.1)
  # Independent: dL/dT = -(N - m) / (N n) for every expert, norm <= 1/sqrt(n).
  m = k * n_tok // n
  np.testing.assert_allclose(
      want["threshold_grad"], np.full(n, -(n_tok - m) / (n_tok * n))
  )
  names = [v.name for v in layer.trainable_variables]
  t_index = names.index("thresholds")
  np.testing.assert_allclose(
      _np(g_total[t_index]), want["threshold_grad"], rtol=1e-5
  )
  assert np.linalg.norm(want["threshold_grad"]) <= 1 / np.sqrt(n)
  # The update SGD(lr=1, global_clipnorm=1) makes to the expert kernels,
  # against the task gradient clipped without the auxiliary losses.
  task_norm = np.sqrt(sum(np.sum(_np(g) ** 2) for g in g_task if g is not None))
  scale_without = min(1.0, clip / task_norm)
  kernel = layer.expert_kernel_1
  before = _np(kernel)
  optimizer = keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=clip)
  optimizer.apply_gradients(zip(g_total, layer.trainable_variables))
  g_kernel = _np(g_task[names.index("expert_kernel_1")])
  step = before - _np(kernel)
  scale = float(np.sum(step * g_kernel) / np.sum(g_kernel**2))
  assert scale > 0.5 * scale_without, (scale, scale_without)


@pytest.mark.parametrize("training", [True, False])
def test_plan_gets_only_routed_slots_same_values_and_gradients(
    rng, monkeypatch, training
):
  """The dropless plan sorts N*K' compacted slots, not N*n (K' << n).

  Values against the numpy reference; values and gradients (inputs, expert
  kernels and biases, W_g) equal to the plan over all n slots.
  """
  from moe_keras.layers import dispatch  # pylint: disable=g-import-not-at-top

  n, k, n_tok = 16, 2, 64
  w = ref.random_flat_weights(rng, D, n, H, D, batchwise=True)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  cotangent = rng.normal(size=(n_tok, D)).astype(np.float32)
  plan_slots = []
  plan_init = dispatch.RoutingPlan.__init__

  def recording_init(self, expert_ids, *args, **kwargs):
    plan_slots.append(int(tf.shape(expert_ids)[1]))
    plan_init(self, expert_ids, *args, **kwargs)

  monkeypatch.setattr(dispatch.RoutingPlan, "__init__", recording_init)

  def run(compact):
    layer = make_layer(n, k, w, small_batch_limit=0, expert_variables="stacked")
    monkeypatch.setattr(layer, "_compact_plan_slots", lambda: compact)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(xt)
      y = layer(xt, training=training)
      objective = tf.reduce_sum(y * cotangent)
    sources = [xt] + [
        v.value
        for v in (
            layer.expert_kernel_1,
            layer.expert_kernel_2,
            layer.expert_bias_1,
            layer.expert_bias_2,
            layer.w_gate,
        )
        if v is not None
    ]
    grads = tape.gradient(objective, sources)
    return _np(y), [None if g is None else _np(g) for g in grads]

  y_compact, g_compact = run(True)
  y_all, g_all = run(False)
  assert plan_slots[1] == n
  assert 1 <= plan_slots[0] < n // 2, plan_slots
  want = ref.sparse_moe(x, w, k, gating="batchwise", training=training)
  np.testing.assert_allclose(y_compact, want["output"], **OUT_TOL)
  np.testing.assert_allclose(y_compact, y_all, rtol=1e-6, atol=1e-6)
  for got, expected in zip(g_compact, g_all):
    assert (got is None) == (expected is None)
    if got is not None:
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
