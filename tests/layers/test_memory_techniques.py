"""Appendix D memory options of the MoE layers: recomputation and bf16 experts.

`recompute_expert_activations=True` must not change any value: outputs,
losses and every gradient equal the plain path (the same ops run, only
later), on TensorFlow (eager and tf.function) and JAX. `expert_dtype` runs the
experts in bfloat16 while the gating stays float32.
"""

import json
import textwrap

import keras
from keras import ops
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
from moe_keras.optimizers import factored_adam
import layer_testlib

D, H, B, T = 6, 7, 2, 5
N_TOK = B * T


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


def make_layer(kind, capacity_factor, use_bias, **kwargs):
  if kind == "flat":
    return SparseMoE(
        num_experts=8,
        k=2,
        expert_hidden_dim=H,
        capacity_factor=capacity_factor,
        use_bias=use_bias,
        small_batch_limit=0,  # these few tokens: pin the routing-plan path
        **kwargs,
    )
  return HierarchicalSparseMoE(
      num_groups=3,
      experts_per_group=4,
      expert_hidden_dim=H,
      capacity_factor=capacity_factor,
      use_bias=use_bias,
      **kwargs,
  )


def make_inputs(kind, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  if kind == "flat":
    noise = rng.normal(size=(N_TOK, 8)).astype(np.float32)
  else:
    noise = (
        rng.normal(size=(N_TOK, 3)).astype(np.float32),
        rng.normal(size=(N_TOK, 3, 4)).astype(np.float32),
    )
  return x, noise


def set_weights(layer, seed=0):
  """Random (nonzero) weights, gates included, so routing is nontrivial."""
  rng = np.random.default_rng(seed)
  for v in layer.weights:
    if v.trainable:
      v.assign(
          (0.5 * rng.normal(size=v.shape)).astype(
              keras.backend.standardize_dtype(v.dtype)
          )
      )


def loss_and_grads(layer, x, noise, graph):
  """Output, total loss (sum sin(y) + balancing losses) and gradients."""
  variables = layer.trainable_variables

  def step():
    with tf.GradientTape() as tape:
      y = layer(x, training=True, noise=noise)
      loss = tf.reduce_sum(tf.sin(y)) + tf.add_n(layer.losses)
    return y, loss, tape.gradient(loss, [v.value for v in variables])

  if graph:
    step = tf.function(step)
  y, loss, grads = step()
  return _np(y), float(loss), [_np(g) for g in grads]


CASES = [
    (kind, cf, bias)
    for kind in ("flat", "hierarchical")
    for cf in (None, 1.25)
    for bias in (False, True)
]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("kind,capacity_factor,use_bias", CASES)
def test_recompute_equals_plain_path_tf(kind, capacity_factor, use_bias, graph):
  x, noise = make_inputs(kind)
  results = []
  for recompute in (False, True):
    layer = make_layer(
        kind,
        capacity_factor,
        use_bias,
        recompute_expert_activations=recompute,
    )
    layer.build(x.shape)
    set_weights(layer)
    results.append(loss_and_grads(layer, x, noise, graph))
  (y0, l0, g0), (y1, l1, g1) = results
  assert l0 != 0.0 and np.any(y0 != 0)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert len(g0) == len(g1)
  for a, b in zip(g0, g1):
    assert np.any(a != 0)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _op_counts(recompute, capacity_factor, expert_variables="stacked"):
  x, noise = make_inputs("flat")
  layer = make_layer(
      "flat",
      capacity_factor,
      False,
      recompute_expert_activations=recompute,
      dispatch_mode="grouped",
      expert_variables=expert_variables,
  )
  layer.build(x.shape)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      y = layer(x, training=True, noise=noise)
    return tape.gradient(y, [v.value for v in layer.trainable_variables])

  graph = step.get_concrete_function().graph
  counts = {}
  for op in graph.get_operations():
    counts[op.type] = counts.get(op.type, 0) + 1
  return counts


def test_recompute_runs_the_hidden_layer_again_in_the_gradient_graph():
  """Dropless TF: the plain gradient reads the forward ReLU outputs (8
  experts, 8 Relu ops); with recomputation a second set of 8 Relu ops
  (and 8 MatMuls) is built in the backward pass."""
  plain, again = _op_counts(False, None), _op_counts(True, None)
  assert plain["Relu"] == 8 and again["Relu"] == 16, (plain, again)
  assert again["MatMul"] == plain["MatMul"] + 8
  plain, again = _op_counts(False, 1.25), _op_counts(True, 1.25)
  assert again.get("Relu", 0) > plain.get("Relu", 0)


def test_graph_gradient_writes_kernel_gradients_in_place_same_values():
  """Dropless TF, no bias, in a tf.function: the [n, d, h] kernel gradients
  are written piece by piece into one buffer (2 n InplaceUpdate ops, no
  Pack of n pieces) and equal the eager gradient (tf.stack of the pieces)."""
  counts = _op_counts(False, None)
  assert counts.get("InplaceUpdate", 0) == 2 * 8, counts
  assert counts.get("Empty", 0) == 2, counts
  x, noise = make_inputs("flat", seed=5)
  layer = make_layer("flat", None, False, expert_variables="stacked")
  layer.build(x.shape)
  set_weights(layer, seed=5)
  (y0, l0, g0), (y1, l1, g1) = [
      loss_and_grads(layer, x, noise, graph) for graph in (False, True)
  ]
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-7)
  for v, a, b in zip(layer.trainable_variables, g0, g1):
    assert np.any(a != 0), v.name
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=v.name)


def test_per_expert_graph_gradient_writes_no_stacked_kernel_gradient():
  """expert_variables="per_expert": each expert's kernel gradient is its
  own MatMul output: no InplaceUpdate, no buffer, no Pack of pieces."""
  counts = _op_counts(False, None, expert_variables="per_expert")
  assert counts.get("InplaceUpdate", 0) == 0, counts
  assert counts.get("Empty", 0) == 0, counts
  # The stacked layout's Packs (shapes of the routing plan) and no more.
  stacked = _op_counts(False, None, expert_variables="stacked")
  assert counts.get("Pack", 0) == stacked.get("Pack", 0), counts
  # 8 experts: per expert 2 forward, 2 input-gradient, 2 weight-gradient.
  assert counts.get("MatMul", 0) >= 6 * 8, counts


def test_fit_with_recompute_matches_plain():
  x, _ = make_inputs("flat", seed=4)
  y = np.tanh(x[..., :2])
  weights = []
  for recompute in (False, True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((T, D))
    moe = make_layer(
        "flat",
        None,
        False,
        gating="top_k",
        recompute_expert_activations=recompute,
    )
    model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, batch_size=B, epochs=2, verbose=0, shuffle=False)
    weights.append([_np(w) for w in model.weights])
  for a, b in zip(*weights):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_config_round_trip_of_new_arguments():
  for kind in ("flat", "hierarchical"):
    layer = make_layer(
        kind,
        None,
        False,
        recompute_expert_activations=True,
        expert_dtype="bfloat16",
    )
    config = layer.get_config()
    assert config["recompute_expert_activations"] is True
    assert config["expert_dtype"] == "bfloat16"
    clone = type(layer).from_config(config)
    assert clone.recompute_expert_activations
    assert clone.expert_dtype == "bfloat16"
  assert make_layer("flat", None, False).get_config()["expert_dtype"] is None


# ------------------------------------------------------------------- JAX


_JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    import jax.numpy as jnp
    import keras
    assert keras.backend.backend() == "jax"
    from moe_keras.layers import HierarchicalSparseMoE, SparseMoE

    D, H, B, T = %d, %d, %d, %d
    N = B * T
    out = {}
    for kind in ("flat", "hierarchical"):
      for cf in (None, 1.25):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(B, T, D)).astype(np.float32)
        if kind == "flat":
          noise = rng.normal(size=(N, 8)).astype(np.float32)
        else:
          noise = (rng.normal(size=(N, 3)).astype(np.float32),
                   rng.normal(size=(N, 3, 4)).astype(np.float32))
        res = []
        for recompute in (False, True):
          kw = dict(expert_hidden_dim=H, capacity_factor=cf, use_bias=True,
                    recompute_expert_activations=recompute)
          if kind == "flat":
            layer = SparseMoE(num_experts=8, k=2, **kw)
          else:
            layer = HierarchicalSparseMoE(num_groups=3, experts_per_group=4,
                                          **kw)
          layer.build(x.shape)
          wr = np.random.default_rng(0)
          for v in layer.weights:
            if v.trainable:
              v.assign((0.5 * wr.normal(size=v.shape)).astype("float32"))
          trainable = [v.value for v in layer.trainable_variables]
          non_trainable = [v.value for v in layer.non_trainable_variables]

          def total(tv):
            outputs, _, losses = layer.stateless_call(
                tv, non_trainable, x, training=True, noise=noise,
                return_losses=True)
            return jnp.sum(jnp.sin(outputs)) + sum(losses), outputs

          (loss, y), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(
              trainable)
          jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: total(t)[0]))(
              trainable))
          res.append((float(loss), np.asarray(y),
                      [np.asarray(g) for g in grads],
                      ("checkpoint" in jaxpr) or ("remat" in jaxpr)))
        (l0, y0, g0, r0), (l1, y1, g1, r1) = res
        out[f"{kind}_{cf}"] = {
            "loss": [l0, l1],
            "y_err": float(np.max(np.abs(y1 - y0))),
            "y_scale": float(np.max(np.abs(y0))),
            "g_err": max(float(np.max(np.abs(a - b))) for a, b in zip(g0, g1)),
            "g_zero": any(bool(np.all(a == 0)) for a in g0),
            "remat": [r0, r1],
        }
    print("RESULT", json.dumps(out))
""") % (D, H, B, T)


def test_recompute_equals_plain_path_jax_subprocess():
  proc = layer_testlib.run_script(_JAX_SCRIPT, backend="jax")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  result = json.loads(line[len("RESULT ") :])
  assert len(result) == 4
  for case, r in result.items():
    l0, l1 = r["loss"]
    assert l0 != 0.0 and r["y_scale"] > 0, case
    np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=case)
    assert r["y_err"] <= 1e-6 * max(1.0, r["y_scale"]), case
    assert r["g_err"] <= 1e-5, case
    assert not r["g_zero"], case
    assert r["remat"] == [False, True], case


# ------------------------------------------------------------------- bf16

# bf16 has an 8-bit significand: one rounding is <= 2^-9 relative; an expert
# (two matmuls over d = 6 / h = 7 terms, bf16 weights, inputs and hidden
# activations) stays within ~2^-5 of its output scale.
BF16_TOLERANCE = 2.0**-5


@pytest.mark.parametrize("expert_dtype", ["bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_bf16_experts_keep_gating_float32(kind, expert_dtype):
  x, noise = make_inputs(kind, seed=3)
  layer16 = make_layer(kind, None, True, expert_dtype=expert_dtype)
  layer32 = make_layer(kind, None, True)
  for layer in (layer16, layer32):
    layer.build(x.shape)
  set_weights(layer16)
  # The float32 reference gets the same (bf16-rounded) values.
  for v16, v32 in zip(layer16.weights, layer32.weights):
    v32.assign(ops.cast(v16, "float32"))

  var_dtype = "bfloat16" if expert_dtype == "bfloat16" else "float32"
  for v in layer16.weights:
    name = v.path.split("/")[-1]
    if name.startswith("expert_"):
      assert v.dtype == var_dtype, name
    else:
      assert v.dtype == "float32", name  # w_gate, w_noise (+ secondary)
  assert layer16.expert_compute_dtype == "bfloat16"

  y16, s16 = layer16(x, training=True, noise=noise, return_stats=True)
  y32, s32 = layer32(x, training=True, noise=noise, return_stats=True)
  assert str(ops.dtype(y16)) == "float32"  # the layer's own compute dtype
  # Gating, Phi, load and losses: float32 and identical to the float32
  # layer (they never see a bf16 value).
  for key in ("importance", "load", "importance_loss", "load_loss"):
    assert str(ops.dtype(s16[key])) == "float32", key
    np.testing.assert_allclose(
        _np(s16[key]), _np(s32[key]), rtol=1e-6, atol=1e-7, err_msg=key
    )
  for loss in layer16.losses:
    assert str(ops.dtype(loss)) == "float32"
  y16, y32 = _np(y16), _np(y32)
  scale = np.max(np.abs(y32))
  assert np.max(np.abs(y16 - y32)) <= BF16_TOLERANCE * scale
  assert np.max(np.abs(y16 - y32)) > 0  # the experts really ran in bf16


def test_bf16_experts_gradients_and_training():
  """Gate gradients are float32; a bf16-expert model trains (loss drops)."""

  x, noise = make_inputs("flat", seed=5)
  layer = make_layer("flat", None, False, expert_dtype="bfloat16")
  layer.build(x.shape)
  _, _, grads = loss_and_grads(layer, x, noise, graph=True)
  for v, g in zip(layer.trainable_variables, grads):
    assert g.dtype == (np.float32 if v.dtype == "float32" else g.dtype)
    assert np.all(np.isfinite(g.astype(np.float32)))

  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(64, T, D)).astype(np.float32)
  ys = np.tanh(2.0 * xs[..., :2])
  inputs = keras.Input((T, D))
  moe = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=16, expert_dtype="bfloat16"
  )
  model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
  model.compile(factored_adam.FactoredAdam(learning_rate=0.01), "mse")
  hist = model.fit(xs, ys, batch_size=16, epochs=10, verbose=0)
  losses = hist.history["loss"]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  # The factored slots of bf16 expert kernels are float32.
  for v in model.optimizer.variables:
    if "row_velocity" in v.path or "col_velocity" in v.path:
      assert v.dtype == "float32"
