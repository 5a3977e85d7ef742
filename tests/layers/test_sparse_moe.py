"""SparseMoE layer vs the numpy reference: eq 1, eqs 3-11, gradients, capacity, masks.

Weights are set with `variable.assign` and the training noise is passed with
`noise=`, so every number is deterministic and recomputed independently in
float64 by `numpy_reference`.

Tolerances (float32 layer vs float64 reference):
- gates/importance/load: rtol 1e-5, atol 1e-5 (sums of <= 64 float32 values of
  size <= 1, each a few ulps off);
- outputs: rtol 1e-5, atol 1e-5 (two float32 matmuls of depth 8 and 16);
- losses: rtol 1e-4 (CV^2 divides a variance by mean^2; float32 rounding of
  the per-expert sums is amplified by 1/CV^2, which is <= 1e2 with this data).
"""

import math
import textwrap

import keras
from keras import ops
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import SparseMoE
import layer_testlib
import numpy_reference as ref

D, H = 8, 16
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
STAT_TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-7)


def _np(x):
  """Converts a backend tensor to a float64-or-int numpy array."""
  return np.asarray(ops.convert_to_numpy(x))


def make_layer(n, k, weights, d=D, **kwargs):
  """Builds a SparseMoE for d-dim inputs and assigns the given weights."""
  layer = SparseMoE(num_experts=n, k=k, expert_hidden_dim=H, **kwargs)
  layer.build((None, d))
  ref.assign_weights(layer, weights)
  return layer


def run(layer, x, **kwargs):
  """Calls the layer with return_stats=True.

  Returns:
    (output ndarray, stats dict of ndarrays, total of layer.losses as float,
    number of loss tensors).
  """
  y, stats = layer(x, return_stats=True, **kwargs)
  losses = [float(_np(l)) for l in layer.losses]
  return (
      _np(y),
      {key: _np(v) for key, v in stats.items()},
      float(sum(losses)),
      len(losses),
  )


def check_stats(stats, want, training=True, dropped_fraction=0.0):
  """Compares the return_stats dict with reference values."""
  np.testing.assert_allclose(
      stats["importance"], want["importance"], **STAT_TOL
  )
  np.testing.assert_allclose(stats["load"], want["load"], **STAT_TOL)
  np.testing.assert_allclose(
      stats["token_counts"], want["token_counts"], **STAT_TOL
  )
  np.testing.assert_allclose(
      stats["cv_importance"], ref.cv(want["importance"]), rtol=1e-4
  )
  np.testing.assert_allclose(
      stats["cv_load"], ref.cv(want["load"]), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
      stats["max_over_mean_load"],
      np.max(want["load"]) / np.mean(want["load"]),
      rtol=1e-5,
  )
  np.testing.assert_allclose(
      stats["dropped_fraction"], dropped_fraction, rtol=1e-6, atol=1e-7
  )
  if training:  # Inference: see test_inference_stats_report_zero_losses.
    np.testing.assert_allclose(
        stats["importance_loss"], want["importance_loss"], **LOSS_TOL
    )
    np.testing.assert_allclose(
        stats["load_loss"], want["load_loss"], **LOSS_TOL
    )


@pytest.fixture
def rng():
  return np.random.default_rng(1701)


# ------------------------------------------------------------------ variables


def test_variables_shapes_and_zero_gate_init():
  layer = SparseMoE(
      num_experts=4,
      k=2,
      expert_hidden_dim=H,
      output_dim=5,
      expert_variables="stacked",
  )
  layer.build((None, D))
  assert tuple(layer.w_gate.shape) == (D, 4)
  assert tuple(layer.w_noise.shape) == (D, 4)
  assert tuple(layer.expert_kernel_1.shape) == (4, D, H)
  assert tuple(layer.expert_kernel_2.shape) == (4, H, 5)
  np.testing.assert_array_equal(_np(layer.w_gate), 0.0)
  np.testing.assert_array_equal(_np(layer.w_noise), 0.0)
  assert np.any(_np(layer.expert_kernel_1) != 0)
  biased = SparseMoE(
      num_experts=4,
      k=2,
      expert_hidden_dim=H,
      use_bias=True,
      expert_variables="stacked",
  )
  biased.build((None, D))
  assert tuple(biased.expert_bias_1.shape) == (4, H)
  assert tuple(biased.expert_bias_2.shape) == (4, D)


# ------------------------------------------------------------------ eq 1 + losses


@pytest.mark.parametrize(
    "k,use_bias,output_dim",
    [
        (1, False, None),
        (2, False, None),
        (2, True, 5),
        (3, True, None),
        (4, False, 6),
    ],
)
def test_eq1_output_losses_stats_training_noisy(rng, k, use_bias, output_dim):
  n, N = 6, 40
  d_out = output_dim or D
  w = ref.random_flat_weights(rng, D, n, H, d_out, use_bias=use_bias)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(
      n,
      k,
      w,
      use_bias=use_bias,
      output_dim=output_dim,
      w_importance=0.3,
      w_load=0.7,
  )
  y, stats, total, _ = run(layer, x, training=True, noise=noise)
  want = ref.sparse_moe(x, w, k, noise=noise, w_importance=0.3, w_load=0.7)
  assert y.shape == (N, d_out)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
  check_stats(stats, want)


@pytest.mark.parametrize("noise_epsilon", [0.0, 0.5])
def test_noise_epsilon(rng, noise_epsilon):
  n, k, N = 5, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, noise_epsilon=noise_epsilon)
  y, stats, total, _ = run(layer, x, training=True, noise=noise)
  want = ref.sparse_moe(x, w, k, noise=noise, noise_epsilon=noise_epsilon)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(stats["load"], want["load"], **STAT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)


@pytest.mark.parametrize("noise_scale", [0.1, 3.0])
def test_noise_scale(rng, noise_scale):
  """noise_scale c multiplies eq. (4)'s stddev, and eq. (9) uses c * std."""
  n, k, N = 6, 2, 48
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=0.3, noise_scale=1.0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, noise_scale=noise_scale)
  y, stats, total, _ = run(layer, x, training=True, noise=noise)
  want = ref.sparse_moe(x, w, k, noise=noise, noise_scale=noise_scale)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(stats["load"], want["load"], **STAT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
  # Not vacuous: the paper's scale routes or loads these tokens differently.
  paper = ref.sparse_moe(x, w, k, noise=noise)
  assert not np.allclose(want["load"], paper["load"], rtol=1e-3)
  # At inference there is no noise, so the scale changes nothing.
  y_clean = _np(layer(x, training=False))
  np.testing.assert_allclose(
      y_clean, ref.sparse_moe(x, w, k, training=False)["output"], **OUT_TOL
  )


@pytest.mark.parametrize("bad", [0.0, -1.0, True, "1"])
def test_noise_scale_must_be_positive(bad):
  with pytest.raises(ValueError, match="noise_scale must be a number > 0"):
    SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, noise_scale=bad)


def test_noise_actually_used_in_training(rng):
  """Guards the tests above: with these weights the noise changes the routing."""
  n, k, N = 5, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=0.3, noise_scale=1.0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w)
  y_noisy = _np(layer(x, training=True, noise=noise))
  y_clean = _np(layer(x, training=False))
  assert not np.allclose(y_noisy, y_clean)
  np.testing.assert_allclose(
      y_clean, ref.sparse_moe(x, w, k, training=False)["output"], **OUT_TOL
  )


def test_inference_no_noise_no_losses(rng):
  n, k, N = 6, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  layer = make_layer(n, k, w)
  y1, stats, _, n_losses = run(layer, x, training=False)
  y2 = _np(layer(x, training=False))
  want = ref.sparse_moe(x, w, k, training=False)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_allclose(y1, want["output"], **OUT_TOL)
  assert n_losses == 0, "add_loss must only be used in training"
  # Inference: load = token counts.
  check_stats(stats, want, training=False)
  np.testing.assert_array_equal(stats["load"], stats["token_counts"])
  np.testing.assert_allclose(stats["token_counts"].sum(), k * N)


@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "softmax"])
def test_inference_stats_report_zero_losses(rng, gating):
  """API_SPEC: importance_loss, load_loss are "weighted terms, 0 in inference"."""
  n, k, N = 6, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  layer = make_layer(n, k, w, gating=gating)
  _, stats, _, _ = run(layer, x, training=False)
  want = ref.sparse_moe(x, w, k, gating=gating, training=False)
  assert ref.cv_squared(want["importance"]) > 0  # The loss would be nonzero.
  assert float(stats["importance_loss"]) == 0.0, stats["importance_loss"]
  assert float(stats["load_loss"]) == 0.0, stats["load_loss"]


def test_gating_top_k_has_no_noise_and_no_load_loss(rng):
  n, k, N = 6, 3, 32
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  layer = make_layer(n, k, w, gating="top_k", w_importance=0.2, w_load=0.5)
  y, stats, total, _ = run(layer, x, training=True)
  want = ref.sparse_moe(x, w, k, gating="top_k", w_importance=0.2, w_load=0.5)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["importance_loss"], **LOSS_TOL)
  assert want["load_loss"] == 0.0
  check_stats(stats, want)
  # Noise must be ignored by "top_k" even when supplied.
  y_noise = _np(
      layer(x, training=True, noise=rng.normal(size=(N, n)).astype(np.float32))
  )
  np.testing.assert_array_equal(y_noise, y)


@pytest.mark.parametrize("gating", ["top_k", "softmax", "batchwise"])
def test_gatings_without_noise_have_no_w_noise(gating):
  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, gating=gating)
  layer.build((None, D))
  names = sorted(v.path.split("/")[-1] for v in layer.trainable_variables)
  assert "w_noise" not in names, names
  assert "w_gate" in names, names


def test_gating_softmax_dense_eq2(rng):
  n, N = 5, 24
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  layer = make_layer(n, 2, w, gating="softmax", w_importance=0.25)
  y, stats, total, _ = run(layer, x, training=True)
  want = ref.sparse_moe(x, w, 2, gating="softmax", w_importance=0.25)
  np.testing.assert_allclose(
      want["gates"], ref.softmax(x.astype(np.float64) @ w["w_gate"])
  )
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["importance_loss"], **LOSS_TOL)
  np.testing.assert_allclose(
      stats["importance"], want["importance"], **STAT_TOL
  )
  np.testing.assert_allclose(stats["token_counts"], np.full(n, N), **STAT_TOL)


def test_sparse_output_equals_dense_all_experts_reference(rng):
  n, k, N = 16, 4, 64
  w = ref.random_flat_weights(rng, D, n, H, D, use_bias=True)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, use_bias=True)
  y = _np(layer(x, training=True, noise=noise))
  want = ref.sparse_moe(x, w, k, noise=noise)
  # Dense: every expert evaluated on every token, weighted by dense gates.
  dense = ref.combine(
      want["gates"],
      ref.expert_outputs(
          x,
          w["expert_kernel_1"],
          w["expert_kernel_2"],
          w["expert_bias_1"],
          w["expert_bias_2"],
      ),
  )
  assert np.all((want["gates"] != 0).sum(axis=1) == k)
  np.testing.assert_allclose(y, dense, **OUT_TOL)


@pytest.mark.parametrize("shape", [(2, 16), (2, 3, 5)])
def test_higher_rank_inputs_routed_as_tokens(rng, shape):
  n, k = 4, 2
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=shape + (D,)).astype(np.float32)
  N = int(np.prod(shape))
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w)
  y, stats, total, _ = run(layer, x, training=True, noise=noise)
  want = ref.sparse_moe(x.reshape(N, D), w, k, noise=noise)
  assert y.shape == shape + (D,)
  np.testing.assert_allclose(y.reshape(N, D), want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
  np.testing.assert_allclose(stats["load"], want["load"], **STAT_TOL)


# ------------------------------------------------------------------ gradients


def _finite_difference(f, w0, eps=1e-4):
  """Central finite differences of scalar f at float64 array w0."""
  g = np.zeros_like(w0, np.float64)
  for idx in np.ndindex(w0.shape):
    wp, wm = w0.astype(np.float64).copy(), w0.astype(np.float64).copy()
    wp[idx] += eps
    wm[idx] -= eps
    g[idx] = (f(wp) - f(wm)) / (2 * eps)
  return g


def _assert_grad_close(got, want):
  """float32 autodiff vs float64 finite differences (truncation ~eps^2)."""
  scale = np.max(np.abs(want))
  assert scale > 1e-3, "reference gradient is ~0: test data too degenerate"
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize("k", [2, 3])
def test_task_loss_gradient_to_w_gate_matches_finite_differences(rng, k):
  n, N = 4, 24
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  r = rng.normal(size=(N, D))
  layer = make_layer(n, k, w)
  with tf.GradientTape() as tape:
    y = layer(x, training=True, noise=noise)
    task = tf.reduce_sum(y * tf.constant(r, tf.float32))
  g_gate, g_noise = tape.gradient(
      task, [layer.w_gate.value, layer.w_noise.value]
  )
  assert g_gate is not None, "task loss does not reach w_gate"
  g_gate = _np(g_gate)
  assert np.any(g_gate != 0)

  def f_gate(wg):
    return float(
        np.sum(
            ref.sparse_moe(x, dict(w, w_gate=wg), k, noise=noise)["output"] * r
        )
    )

  def f_noise(wn):
    return float(
        np.sum(
            ref.sparse_moe(x, dict(w, w_noise=wn), k, noise=noise)["output"] * r
        )
    )

  _assert_grad_close(g_gate, _finite_difference(f_gate, w["w_gate"]))
  _assert_grad_close(_np(g_noise), _finite_difference(f_noise, w["w_noise"]))


def test_k1_task_loss_gradient_to_gate_is_exactly_zero(rng):
  """k=1: softmax over one kept logit is the constant 1, so the task loss gives
  w_gate and w_noise no gradient (documented behaviour); only the balancing
  losses train the gate."""
  n, N = 4, 24
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, 1, w)
  with tf.GradientTape(persistent=True) as tape:
    y = layer(x, training=True, noise=noise)
    task = tf.reduce_sum(y * tf.constant(rng.normal(size=(N, D)), tf.float32))
    aux = tf.add_n(layer.losses)
  for var in (layer.w_gate, layer.w_noise):
    g = tape.gradient(task, var.value)
    assert g is None or np.all(_np(g) == 0.0), (var.name, _np(g))
  # ... while the load loss does reach both (eq 9 is smooth in both).
  for var in (layer.w_gate, layer.w_noise):
    g = tape.gradient(aux, var.value)
    assert g is not None and np.any(_np(g) != 0), var.name
  # The expert weights do get the task gradient at k=1.
  assert np.any(_np(tape.gradient(task, layer.expert_kernel_1.value)) != 0)


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_gradient_to_w_noise_and_w_gate(rng, k):
  n, N = 4, 24
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=0.5)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, w_importance=0.0, w_load=1.0)
  with tf.GradientTape() as tape:
    layer(x, training=True, noise=noise)
    aux = tf.add_n(layer.losses)
  g_gate, g_noise = tape.gradient(
      aux, [layer.w_gate.value, layer.w_noise.value]
  )
  assert g_noise is not None, "load loss does not reach w_noise"

  def loss(**over):
    return ref.sparse_moe(
        x, dict(w, **over), k, noise=noise, w_importance=0.0, w_load=1.0
    )["total_loss"]

  _assert_grad_close(
      _np(g_noise), _finite_difference(lambda v: loss(w_noise=v), w["w_noise"])
  )
  _assert_grad_close(
      _np(g_gate), _finite_difference(lambda v: loss(w_gate=v), w["w_gate"])
  )


def test_importance_loss_gradient_to_w_gate(rng):
  n, k, N = 4, 2, 24
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, w_importance=1.0, w_load=0.0)
  with tf.GradientTape() as tape:
    layer(x, training=True, noise=noise)
    aux = tf.add_n(layer.losses)
  g_gate = _np(tape.gradient(aux, layer.w_gate.value))
  want = _finite_difference(
      lambda v: ref.sparse_moe(
          x, dict(w, w_gate=v), k, noise=noise, w_importance=1.0, w_load=0.0
      )["total_loss"],
      w["w_gate"],
  )
  _assert_grad_close(g_gate, want)


# ------------------------------------------------------------------ capacity


def test_capacity_large_equals_dropless(rng):
  n, k, N = 4, 2, 32
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=2.0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  dropless = make_layer(n, k, w)
  capped = make_layer(n, k, w, capacity_factor=100.0)
  y0, s0, l0, _ = run(dropless, x, training=True, noise=noise)
  y1, s1, l1, _ = run(capped, x, training=True, noise=noise)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(s1["importance"], s0["importance"], rtol=1e-6)
  assert (
      float(s1["dropped_fraction"]) == 0.0
      and float(s0["dropped_fraction"]) == 0.0
  )


@pytest.mark.parametrize("training", [True, False])
def test_capacity_small_drops_overflow_in_token_order(rng, training):
  n, k, N, c = 4, 2, 32, 0.5
  capacity = math.ceil(c * k * N / n)  # API_SPEC: static ceil(c*k*N/n) = 8.
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=2.0)
  w["w_gate"][:, 0] += 1.0  # Skew routing so that some experts overflow.
  x = (rng.normal(size=(N, D)) + 0.5).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, capacity_factor=c)
  y, stats, _, _ = run(
      layer, x, training=training, noise=noise if training else None
  )
  want = ref.sparse_moe(
      x, w, k, training=training, noise=noise, capacity=capacity
  )
  assert want["dropped"] > 0, "test data must overflow some expert"
  frac_assign = want["dropped"] / want["assignments"]
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(
      stats["dropped_fraction"],
      frac_assign,
      rtol=1e-6,
      err_msg=f"dropped assignments / all assignments = {want['dropped']}/"
      f"{want['assignments']}",
  )


def test_capacity_rank3(rng):
  n, k, c = 4, 2, 1.0
  x = rng.normal(size=(2, 16, D)).astype(np.float32)
  N = 32
  w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=2.0)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, capacity_factor=c)
  y = _np(layer(x, training=True, noise=noise))
  want = ref.sparse_moe(
      x.reshape(N, D), w, k, noise=noise, capacity=math.ceil(c * k * N / n)
  )
  np.testing.assert_allclose(y.reshape(N, D), want["output"], **OUT_TOL)


# ------------------------------------------------------------------ masks


def test_mask_rank3_zero_output_and_losses_over_valid_tokens_only(rng):
  n, k, B, T = 4, 2, 2, 12
  N = B * T
  w = ref.random_flat_weights(rng, D, n, H, D, use_bias=True)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[0, 9:] = False
  mask[1, 5:] = False
  valid = mask.reshape(N)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = make_layer(n, k, w, use_bias=True)
  y, stats, total, _ = run(layer, x, training=True, noise=noise, mask=mask)
  y = y.reshape(N, D)
  np.testing.assert_array_equal(y[~valid], 0.0)
  want = ref.sparse_moe(x.reshape(N, D), w, k, noise=noise, valid=valid)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
  check_stats(stats, want)
  # Same numbers as the layer itself run on the unmasked tokens alone.
  y_v, stats_v, total_v, _ = run(
      layer, x.reshape(N, D)[valid], training=True, noise=noise[valid]
  )
  np.testing.assert_allclose(y[valid], y_v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(total, total_v, rtol=1e-5)
  for key in ("importance", "load", "token_counts", "cv_importance", "cv_load"):
    np.testing.assert_allclose(
        stats[key], stats_v[key], rtol=1e-5, atol=1e-6, err_msg=key
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_all_padding_batch_is_finite_and_zero(rng, training, capacity_factor):
  n, k = 4, 2
  w = ref.random_flat_weights(rng, D, n, H, D, use_bias=True)
  x = rng.normal(size=(2, 6, D)).astype(np.float32)
  mask = np.zeros((2, 6), bool)
  noise = rng.normal(size=(12, n)).astype(np.float32)
  layer = make_layer(n, k, w, use_bias=True, capacity_factor=capacity_factor)
  y, stats, total, _ = run(
      layer, x, training=training, mask=mask, noise=noise if training else None
  )
  np.testing.assert_array_equal(y, 0.0)
  assert np.isfinite(total), total
  for key, v in stats.items():
    assert np.all(np.isfinite(v)), (key, v)
  np.testing.assert_array_equal(stats["token_counts"], 0.0)
  np.testing.assert_array_equal(stats["importance"], 0.0)


def test_keras_mask_propagates_through_functional_model(rng):
  n, k, T = 4, 2, 6
  w = ref.random_flat_weights(rng, D, n, H, D, use_bias=True)
  x = rng.normal(size=(3, T, D)).astype(np.float32)
  x[0, 4:] = 0.0
  x[2, 1:] = 0.0
  inp = keras.Input((T, D))
  moe = SparseMoE(num_experts=n, k=k, expert_hidden_dim=H, use_bias=True)
  model = keras.Model(inp, moe(keras.layers.Masking(0.0)(inp)))
  ref.assign_weights(moe, w)
  y = _np(model(x, training=False))
  valid = np.any(x != 0, axis=-1).reshape(-1)
  want = ref.sparse_moe(x.reshape(-1, D), w, k, training=False, valid=valid)
  # With biases, an unmasked zero token would give a nonzero output.
  assert np.any(
      ref.sparse_moe(x.reshape(-1, D), w, k, training=False)["output"][~valid]
      != 0
  )
  np.testing.assert_allclose(y.reshape(-1, D), want["output"], **OUT_TOL)
  np.testing.assert_array_equal(y.reshape(-1, D)[~valid], 0.0)


# ------------------------------------------------------------------ JAX backend


_JAX_SCRIPT = textwrap.dedent("""
    import math, sys
    import numpy as np
    import keras, jax
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from moe_keras.layers import SparseMoE
    import numpy_reference as ref

    rng = np.random.default_rng(3)
    n, k, N, D, H, c = 4, 2, 32, 8, 16, 2.0
    w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=2.0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    noise = rng.normal(size=(N, n)).astype(np.float32)
    layer = SparseMoE(num_experts=n, k=k, expert_hidden_dim=H, capacity_factor=c)
    layer.build((None, D))
    ref.assign_weights(layer, w)
    cap = math.ceil(c * k * N / n)
    want = ref.sparse_moe(x, w, k, noise=noise, capacity=cap)

    mode = sys.argv[1]
    if mode == "eager":
      y, stats = layer(x, training=True, noise=noise, return_stats=True)
      np.testing.assert_allclose(np.asarray(y), want["output"], rtol=1e-5, atol=1e-5)
      total = float(sum(np.asarray(l) for l in layer.losses))
      np.testing.assert_allclose(total, want["total_loss"], rtol=1e-4)
      np.testing.assert_allclose(np.asarray(stats["load"]), want["load"], rtol=1e-5,
                                 atol=1e-5)
      want_inf = ref.sparse_moe(x, w, k, training=False, capacity=cap)
      np.testing.assert_allclose(np.asarray(layer(x, training=False)), want_inf["output"],
                                 rtol=1e-5, atol=1e-5)
    else:
      # Under jax.jit (static shapes in capacity mode) via stateless_call, as
      # Keras's JAX trainer does.
      tv = [v.value for v in layer.trainable_variables]
      ntv = [v.value for v in layer.non_trainable_variables]

      @jax.jit
      def loss_fn(tv, x, noise):
        y, _, losses = layer.stateless_call(tv, ntv, x, training=True, noise=noise,
                                            return_losses=True)
        return (y ** 2).sum() + sum(losses), y

      (val, y_jit), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv, x, noise)
      np.testing.assert_allclose(np.asarray(y_jit), want["output"], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(float(val), float((want["output"] ** 2).sum()) +
                                 want["total_loss"], rtol=1e-4)
      gi = [i for i, v in enumerate(layer.trainable_variables) if v is layer.w_gate][0]
      g = np.asarray(grads[gi])
      assert np.all(np.isfinite(g)) and np.any(g != 0), g
    print("JAX_OK")
""")


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_jax_backend_capacity_mode_matches_numpy(mode):
  """KERAS_BACKEND=jax subprocess: eager calls, and jax.jit + grad (capacity
  mode exists to give static shapes under XLA/JAX)."""
  pytest.importorskip("jax")
  proc = layer_testlib.run_script(_JAX_SCRIPT, mode, backend="jax")
  assert proc.returncode == 0 and "JAX_OK" in proc.stdout, (
      proc.stdout + proc.stderr[-4000:]
  )
