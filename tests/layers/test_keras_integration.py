"""SparseMoE inside keras.Model: fit/evaluate, masks, logged statistics."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE

D, H, N_EXPERTS, K = 6, 8, 4, 2


def _numpy_top_k_stats(tokens, w_gate, k):
  """Importance (eq. 6) and token counts of deterministic top-k gating."""
  logits = tokens.astype(np.float64) @ w_gate.astype(np.float64)
  importance = np.zeros(w_gate.shape[1])
  counts = np.zeros(w_gate.shape[1])
  for row in logits:
    top = np.argsort(-row, kind="stable")[:k]
    gates = np.exp(row[top] - row[top].max())
    gates /= gates.sum()
    importance[top] += gates
    counts[top] += 1
  return importance, counts


def _cv(v):
  return np.std(v) / np.mean(v)


def test_fit_logs_layer_statistics_matching_numpy():
  """With lr=0 and top_k gating, the logged CVs are exact functions of the weights."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 3, D)).astype(np.float32)
  x[:, 2] = 0.0  # Masked by keras.layers.Masking: not routed, not counted.
  inputs = keras.Input((3, D))
  masked = keras.layers.Masking()(inputs)
  moe = SparseMoE(
      num_experts=N_EXPERTS,
      k=K,
      expert_hidden_dim=H,
      gating="top_k",
      name="moe",
  )
  model = keras.Model(inputs, keras.layers.Dense(2)(moe(masked)))
  moe.w_gate.assign(rng.standard_normal((D, N_EXPERTS)).astype(np.float32))
  model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
  history = model.fit(
      x, np.zeros((16, 3, 2), np.float32), batch_size=16, epochs=1, verbose=0
  ).history
  importance, counts = _numpy_top_k_stats(
      x[:, :2].reshape(-1, D), moe.w_gate.numpy(), K
  )
  np.testing.assert_allclose(
      history["moe_cv_importance"][0], _cv(importance), rtol=1e-4
  )
  # top_k has no smooth load: the load statistic is the token count.
  np.testing.assert_allclose(history["moe_cv_load"][0], _cv(counts), rtol=1e-4)
  np.testing.assert_allclose(
      history["moe_max_over_mean_load"][0],
      counts.max() / counts.mean(),
      rtol=1e-5,
  )
  assert history["moe_dropped_fraction"][0] == 0.0
  # The importance loss (w=0.1) is part of the training loss; mse of zeros
  # targets is positive, so loss > importance term alone.
  assert history["loss"][0] > 0.1 * _cv(importance) ** 2


def test_fit_reduces_loss_and_masks_propagate():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 4, D)).astype(np.float32)
  y = np.tanh(x[..., :2] * 2.0)
  inputs = keras.Input((4, D))
  moe = SparseMoE(num_experts=N_EXPERTS, k=K, expert_hidden_dim=16, seed=1)
  hidden = moe(keras.layers.Masking()(inputs))
  model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
  model.compile(keras.optimizers.Adam(0.02), "mse")
  before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
  model.fit(x, y, batch_size=16, epochs=15, verbose=0)
  after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
  assert after < 0.7 * before, (before, after)
  assert model.layers[-2].compute_mask(x, np.ones((64, 4), bool)) is not None


@pytest.mark.parametrize(
    "kwargs, xla",
    [
        (dict(), False),  # dropless: routing-dependent shapes
        (dict(gating="batchwise"), False),
        (dict(capacity_factor=2.0), True),  # static [n, C, d]
        (dict(gating="batchwise", capacity_factor=2.0), True),
        # The secondary gates' grouped matmul, capacity mode included.
        (dict(hierarchical=True), False),
        (dict(hierarchical=True, capacity_factor=2.0), False),
    ],
)
def test_jit_compile_falls_back_without_xla_for_dropless_routing(kwargs, xla):
  """jit_compile=True (Keras's default on TF with a GPU) trains either way.

  Before, dropless layers (and the hierarchical layer in any mode) failed
  inside XLA (data-dependent shapes) with an InvalidArgumentError at the
  first step; now Keras compiles them without XLA, and the flat layer's
  capacity mode keeps XLA.
  """
  rng = np.random.default_rng(2)
  x = rng.standard_normal((64, D)).astype(np.float32)
  y = np.tanh(x[:, :2] * 2.0)
  inputs = keras.Input((D,))
  kwargs = dict(kwargs)
  if kwargs.pop("hierarchical", False):
    moe = HierarchicalSparseMoE(
        num_groups=2,
        experts_per_group=2,
        expert_hidden_dim=16,
        seed=1,
        **kwargs,
    )
  else:
    moe = SparseMoE(
        num_experts=N_EXPERTS, k=K, expert_hidden_dim=16, seed=1, **kwargs
    )
  model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
  compile_xla = lambda: model.compile(
      keras.optimizers.Adam(0.02), "mse", jit_compile=True
  )
  if xla:
    compile_xla()
  else:
    with pytest.warns(UserWarning, match="support `jit_compile=True`"):
      compile_xla()
  assert model.jit_compile is xla
  before = model.evaluate(x, y, verbose=0)
  model.fit(x, y, batch_size=16, epochs=10, verbose=0)
  assert model.evaluate(x, y, verbose=0) < before


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import jax"], capture_output=True
    ).returncode
    != 0,
    reason="jax not installed",
)
def test_fit_on_jax_backend_capacity_mode():
  script = textwrap.dedent("""
      import numpy as np, keras
      from moe_keras.layers import SparseMoE, HierarchicalSparseMoE
      rng = np.random.default_rng(0)
      x = rng.standard_normal((32, 4, 6)).astype("float32")
      y = np.tanh(x[..., :2])
      for layer in (SparseMoE(num_experts=4, k=2, expert_hidden_dim=8,
                              capacity_factor=2.0, seed=0),
                    HierarchicalSparseMoE(num_groups=2, experts_per_group=2,
                                          expert_hidden_dim=8,
                                          capacity_factor=2.0, seed=0)):
        inputs = keras.Input((4, 6))
        model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
        model.compile(keras.optimizers.Adam(0.02), "mse")
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, batch_size=8, epochs=10, verbose=0)
        after = model.evaluate(x, y, verbose=0)
        assert after < before, (before, after)
      print("JAX_FIT_OK")
  """)
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, env=env
  )
  assert "JAX_FIT_OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("k", [1, N_EXPERTS])
def test_gradients_finite_at_k_equal_num_experts(k):
  """k = n: kth_excluding is -inf, P = 1; gradients must stay finite (not NaN)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(2)
  layer = SparseMoE(num_experts=N_EXPERTS, k=k, expert_hidden_dim=H, seed=0)
  x = rng.standard_normal((12, D)).astype(np.float32)
  layer.build(x.shape)
  layer.w_gate.assign(rng.standard_normal((D, N_EXPERTS)).astype(np.float32))
  layer.w_noise.assign(rng.standard_normal((D, N_EXPERTS)).astype(np.float32))
  with tf.GradientTape() as tape:
    y = layer(x, training=True)
    loss = tf.reduce_sum(y**2) + tf.add_n(layer.losses)
  grads = tape.gradient(loss, layer.trainable_variables)
  for var, grad in zip(layer.trainable_variables, grads):
    assert grad is None or np.all(np.isfinite(grad.numpy())), var.name
