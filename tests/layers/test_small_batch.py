"""The small-batch path (moe_keras.layers.small_batch) equals the plan path.

Every case runs the same weights and inputs through SparseMoE with the small
path (default `small_batch_limit`, or a large one) and without it
(`small_batch_limit=0`: the routing plan of moe_keras.layers.dispatch), and
against the numpy reference: outputs, statistics and the gradients of every
trainable variable. Both small variants are covered: per-token gathered
weights (tokens*slots <= n) and the [n, C, d] buffer (TensorFlow).
Tolerances as in test_dispatch_modes.py (float32 sums in another order).
"""

import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import dispatch
from moe_keras.layers import small_batch
from moe_keras.layers import SparseMoE
import layer_testlib
import numpy_reference as ref

D, H, N_EXPERTS, K = 8, 16, 6, 2
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _layer(weights, gating, use_bias, limit):
  return layer_testlib.reference_layer(
      weights,
      dim=D,
      hidden=H,
      num_experts=N_EXPERTS,
      k=K,
      gating=gating,
      use_bias=use_bias,
      small_batch_limit=limit,
  )


def _run(layer, x, training, noise, mask=None):
  """(output, stats, {variable name: gradient}) of sum(y^2) + losses."""
  with tf.GradientTape() as tape:
    y, stats = layer(
        x, training=training, noise=noise, mask=mask, return_stats=True
    )
    loss = tf.reduce_sum(tf.square(y))
    if layer.losses:
      loss += tf.add_n(layer.losses)
  grads = tape.gradient(loss, layer.trainable_variables)
  named = ref.named_gradients(layer, grads)
  return np.asarray(y), {k: np.asarray(v) for k, v in stats.items()}, named


def _numpy_expert_grads(x, weights, gates, y):
  """d sum(y^2) / d expert kernels at fixed gates [N, n] (numpy, float64)."""
  x = np.asarray(x, np.float64)
  w1 = np.asarray(weights["expert_kernel_1"], np.float64)
  w2 = np.asarray(weights["expert_kernel_2"], np.float64)
  dy = 2.0 * np.asarray(y, np.float64)
  d_w1, d_w2 = np.zeros_like(w1), np.zeros_like(w2)
  for e in range(w1.shape[0]):
    g = gates[:, e][:, None]
    hidden = np.maximum(x @ w1[e], 0.0)
    d_w2[e] = hidden.T @ (g * dy)
    d_w1[e] = x.T @ (((g * dy) @ w2[e].T) * (hidden > 0))
  return d_w1, d_w2


@pytest.mark.parametrize("num_tokens", [3, 40])  # gathered, [n, C, d] buffer
@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "batchwise"])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_small_path_equals_plan_path_and_numpy(
    num_tokens, gating, use_bias, training
):
  rng = np.random.default_rng(7 + num_tokens)
  weights = ref.random_flat_weights(
      rng,
      D,
      N_EXPERTS,
      H,
      D,
      use_bias=use_bias,
      batchwise=gating == "batchwise",
  )
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  noise = None
  if gating == "noisy_top_k" and training:
    noise = rng.normal(size=(num_tokens, N_EXPERTS)).astype(np.float32)
  small_layer = _layer(weights, gating, use_bias, limit=None)
  plan_layer = _layer(weights, gating, use_bias, limit=0)
  assert small_batch.use_small_batch(num_tokens, K, 512, training) is True
  y_small, stats_small, grads_small = _run(small_layer, x, training, noise)
  y_plan, stats_plan, grads_plan = _run(plan_layer, x, training, noise)

  np.testing.assert_allclose(y_small, y_plan, **OUT_TOL)
  for name in ("token_counts", "importance", "importance_loss", "load_loss"):
    np.testing.assert_allclose(stats_small[name], stats_plan[name], **OUT_TOL)
  assert set(grads_small) == set(grads_plan)
  for name, grad in grads_small.items():
    np.testing.assert_allclose(grad, grads_plan[name], **GRAD_TOL, err_msg=name)

  want = ref.sparse_moe(
      x,
      weights,
      K,
      gating=gating,
      training=training,
      noise=noise,
      w_importance=0.3,
      w_load=0.7,
  )
  np.testing.assert_allclose(y_small, want["output"], **OUT_TOL)
  np.testing.assert_allclose(
      stats_small["token_counts"], want["token_counts"], **OUT_TOL
  )
  if not use_bias and not (training and gating == "batchwise"):
    d_w1, d_w2 = _numpy_expert_grads(x, weights, want["gates"], y_small)
    np.testing.assert_allclose(grads_small["expert_kernel_1"], d_w1, **GRAD_TOL)
    np.testing.assert_allclose(grads_small["expert_kernel_2"], d_w2, **GRAD_TOL)


def test_masked_tokens_match_plan_path():
  rng = np.random.default_rng(3)
  weights = ref.random_flat_weights(rng, D, N_EXPERTS, H, D, batchwise=True)
  x = rng.normal(size=(4, 5, D)).astype(np.float32)
  mask = np.ones((4, 5), bool)
  mask[1, 3:] = False
  mask[3, 1:] = False
  outs = [
      _run(_layer(weights, "batchwise", False, limit), x, False, None, mask)
      for limit in (None, 0)
  ]
  np.testing.assert_allclose(outs[0][0], outs[1][0], **OUT_TOL)
  np.testing.assert_array_equal(outs[0][0][~mask], 0.0)
  for name, grad in outs[0][2].items():
    np.testing.assert_allclose(grad, outs[1][2][name], **GRAD_TOL)


def test_dynamic_batch_chooses_per_step_at_inference():
  """Decoding: batch None in a tf.function; small, buffer and plan steps."""
  rng = np.random.default_rng(11)
  weights = ref.random_flat_weights(rng, D, N_EXPERTS, H, D, batchwise=True)
  small_layer = _layer(weights, "batchwise", False, limit=None)
  plan_layer = _layer(weights, "batchwise", False, limit=0)
  spec = [tf.TensorSpec([None, D], tf.float32)]
  small_fn = tf.function(
      lambda x: small_layer(x, training=False), input_signature=spec
  )
  plan_fn = tf.function(
      lambda x: plan_layer(x, training=False), input_signature=spec
  )
  for num_tokens in (1, 2, 40, 600):  # 600 * K > 512: the plan path
    x = rng.normal(size=(num_tokens, D)).astype(np.float32)
    np.testing.assert_allclose(
        small_fn(x).numpy(), plan_fn(x).numpy(), **OUT_TOL
    )
  assert small_batch.use_small_batch(600, K, 512, False) is False
  dynamic = small_batch.use_small_batch(tf.constant(40), K, 512, False)
  assert bool(dynamic)
  assert small_batch.use_small_batch(tf.constant(40), K, 512, True) is False


def _numpy_slot_moe(x, ids, gates, w1, w2, b1, b2):
  """y_t = sum over routed slots s of gates[t, s] E_ids[t, s](x_t), float64."""
  n = w1.shape[0]
  y = np.zeros((x.shape[0], w2.shape[-1]))
  for t in range(x.shape[0]):
    for s in range(ids.shape[1]):
      e = ids[t, s]
      if e < n:
        hidden = np.maximum(x[t] @ w1[e] + b1[e], 0.0)
        y[t] += gates[t, s] * (hidden @ w2[e] + b2[e])
  return y


@pytest.mark.parametrize("slots_are_experts", [False, True])
def test_padded_output_equals_numpy_and_gathered_path(slots_are_experts):
  """The buffer path without sorting: values vs numpy, gradients vs gathers.

  Tokens route 0..n experts each (some none, one all n), in slot orders
  unrelated to expert order unless `slots_are_experts`.
  """
  rng = np.random.default_rng(11)
  n, num_tokens = N_EXPERTS, 9
  routed = rng.random((num_tokens, n)) < 0.4
  routed[2] = False
  routed[5] = True
  if slots_are_experts:
    ids = np.where(routed, np.arange(n)[None, :], n)
  else:
    ids = np.full((num_tokens, n + 2), n)
    for t in range(num_tokens):
      chosen = rng.permutation(np.flatnonzero(routed[t]))
      ids[t, rng.choice(n + 2, size=len(chosen), replace=False)] = chosen
  ids = ids.astype(np.int32)
  gates = (rng.random(ids.shape) * (ids < n)).astype(np.float32)
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  w1 = rng.normal(size=(n, D, H)).astype(np.float32)
  w2 = rng.normal(size=(n, H, D)).astype(np.float32)
  b1 = rng.normal(size=(n, H)).astype(np.float32)
  b2 = rng.normal(size=(n, D)).astype(np.float32)
  variables = [tf.Variable(v) for v in (x, gates, w1, w2, b1, b2)]

  def run(fn):
    with tf.GradientTape() as tape:
      y = fn(variables[0], tf.constant(ids), variables[1], *variables[2:])
      loss = tf.reduce_sum(tf.square(y))
    grads = tape.gradient(loss, variables)
    return np.asarray(y), [np.asarray(tf.convert_to_tensor(g)) for g in grads]

  y, grads = run(
      lambda *a: small_batch.padded_output(
          *a, slots_are_experts=slots_are_experts
      )
  )
  np.testing.assert_allclose(
      y, _numpy_slot_moe(x, ids, gates, w1, w2, b1, b2), **OUT_TOL
  )
  y_gathered, grads_gathered = run(
      lambda x, ids, gates, *w: small_batch.combine_slots(
          small_batch.gathered_ffn(x, ids, *w), ids, gates, n
      )
  )
  np.testing.assert_allclose(y, y_gathered, **OUT_TOL)
  for name, got, want in zip(
      "x gates w1 w2 b1 b2".split(), grads, grads_gathered
  ):
    # Two summation orders of float32 terms up to ~400 (sum of y^2 with
    # unnormalized weights): an entry that cancels to ~3 can differ by
    # ~1e-4 (measured on an AMD EPYC), so the absolute tolerance scales with
    # the gradient's largest entry (float32: ~1e-7 relative per term).
    np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name
    )


def test_compact_slots_keeps_routed_slots_in_order():
  ids = tf.constant([[6, 2, 6, 4], [6, 6, 6, 6], [1, 6, 3, 6]], tf.int32)
  gates = tf.constant(
      [[0.0, 0.4, 0.0, 0.6], [0.0] * 4, [0.7, 0.0, 0.3, 0.0]], tf.float32
  )
  got_ids, got_gates = dispatch.compact_slots(ids, gates, 6)
  np.testing.assert_array_equal(got_ids, [[2, 4], [6, 6], [1, 3]])
  np.testing.assert_allclose(got_gates, [[0.4, 0.6], [0, 0], [0.7, 0.3]])


@pytest.mark.parametrize("bad", [-1, 2.5, "8"])
def test_bad_small_batch_limit_is_one_line_error(bad):
  with pytest.raises(ValueError, match="small_batch_limit must be") as err:
    SparseMoE(num_experts=4, k=2, expert_hidden_dim=8, small_batch_limit=bad)
  assert "\n" not in str(err.value)


def test_config_round_trip():
  layer = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=8, small_batch_limit=7
  )
  clone = SparseMoE.from_config(layer.get_config())
  assert clone.small_batch_limit == 7
  assert clone.get_config() == layer.get_config()


JAX_CHECK = """
import numpy as np, jax, keras
import sys; sys.path.insert(0, "tests/layers")
import numpy_reference as ref
from moe_keras.layers import SparseMoE
rng = np.random.default_rng(5)
w = ref.random_flat_weights(rng, 8, 6, 16, 8)
x = rng.normal(size=(3, 8)).astype("float32")  # 3 tokens * k=2 <= n=6
out, grads = [], []
for limit in (None, 0):
  layer = SparseMoE(num_experts=6, k=2, expert_hidden_dim=16, gating="top_k",
                    small_batch_limit=limit)
  layer.build((None, 8)); ref.assign_weights(layer, w)
  tv = [v.value for v in layer.trainable_variables]
  ntv = [v.value for v in layer.non_trainable_variables]
  def loss(tv):
    y, _ = layer.stateless_call(tv, ntv, x, training=False)
    return (y ** 2).sum(), y
  (l, y), g = jax.value_and_grad(loss, has_aux=True)(tv)
  out.append(np.asarray(y)); grads.append([np.asarray(a) for a in g])
want = ref.sparse_moe(x, w, 2, gating="top_k", training=False)["output"]
np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
for a, b in zip(*grads):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("JAX_OK")
"""


def test_jax_gathered_path_equals_plan_path():
  pytest.importorskip("jax")
  proc = layer_testlib.run_script(
      JAX_CHECK, backend="jax", timeout=900, TF_CPP_MIN_LOG_LEVEL="3"
  )
  assert "JAX_OK" in proc.stdout, proc.stderr[-3000:]
