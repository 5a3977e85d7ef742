"""expert_variables="per_expert": one variable per expert, same layer.

The per-expert layout must give the numpy reference's outputs and losses,
the stacked layout's gradients (exactly: the same float32 matmuls), finite
differences of the float64 reference, and checkpoints that load into either
layout. Tolerances as in test_dispatch_modes.py.
"""

import keras
from keras import ops
import numpy as np
import pytest
import tensorflow as tf

import layer_testlib
from moe_keras.layers import dispatch
from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
from moe_keras.layers import sparse_moe
from moe_keras.models import blocks
from moe_keras.optimizers.factored_adam import FactoredAdam
import numpy_reference as ref

D, H, N, K, TOKENS = 8, 16, 6, 2, 40
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-7)


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


def _flat(layout, **kwargs):
  return layer_testlib.flat_layer(
      np.random.default_rng(11),
      dim=D,
      hidden=H,
      num_experts=N,
      k=K,
      tokens=TOKENS,
      expert_variables=layout,
      **kwargs,
  )


def _output_loss_grads(layer, x, noise, graph):
  return layer_testlib.output_loss_grads(layer, x, noise, graph=graph)[:3]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_bias": True},
        {"recompute_expert_activations": True},
        {"use_bias": True, "recompute_expert_activations": True},
        {"capacity_factor": 2.0},
        {"dispatch_mode": "padded"},
    ],
    ids=["plain", "bias", "recompute", "bias_recompute", "capacity", "padded"],
)
def test_per_expert_matches_reference_and_stacked_gradients(options, graph):
  per_expert, w, x, noise = _flat("per_expert", **options)
  stacked = _flat("stacked", **options)[0]
  want = ref.sparse_moe(
      x,
      w,
      K,
      noise=noise,
      w_importance=0.3,
      w_load=0.7,
      capacity=None
      if "capacity_factor" not in options
      else dispatch.capacity_for(TOKENS * K, N, options["capacity_factor"]),
  )
  y, loss, grads = _output_loss_grads(per_expert, x, noise, graph)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(loss, want["total_loss"], **LOSS_TOL)
  _, _, want_grads = _output_loss_grads(stacked, x, noise, graph)
  assert sorted(grads) == sorted(want_grads)
  for name, grad in grads.items():
    np.testing.assert_allclose(grad, want_grads[name], rtol=1e-6, atol=1e-6)


def test_per_expert_gradient_matches_finite_differences():
  """The fast path's (graph, dropless, no bias) kernel gradients against
  central differences of the float64 reference."""
  layer, w, x, noise = _flat("per_expert")
  w64 = {name: v.astype(np.float64) for name, v in w.items()}
  r = np.random.default_rng(8).normal(size=(TOKENS, D))

  @tf.function
  def grads():
    with tf.GradientTape() as tape:
      y = layer(x, training=True, noise=noise)
      task = tf.reduce_sum(y * tf.constant(r, tf.float32))
    return tape.gradient(task, layer.trainable_variables)

  got = ref.named_gradients(layer, grads())
  task = lambda ww: np.sum(ref.sparse_moe(x, ww, K, noise=noise)["output"] * r)
  eps = 1e-4
  for name, idx in [
      ("expert_kernel_1", (0, 1, 2)),
      ("expert_kernel_1", (5, 7, 15)),
      ("expert_kernel_2", (3, 4, 0)),
      ("expert_kernel_2", (2, 15, 7)),
  ]:
    plus, minus = dict(w64), dict(w64)
    plus[name], minus[name] = w64[name].copy(), w64[name].copy()
    plus[name][idx] += eps
    minus[name][idx] -= eps
    want = (task(plus) - task(minus)) / (2 * eps)
    np.testing.assert_allclose(got[name][idx], want, rtol=2e-3, atol=2e-4)


def test_hierarchical_per_expert_matches_reference():
  rng = np.random.default_rng(6)
  a, b = 3, 4
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  layer = HierarchicalSparseMoE(
      num_groups=a,
      experts_per_group=b,
      k_primary=2,
      k_secondary=2,
      expert_hidden_dim=H,
      expert_variables="per_expert",
  )
  layer.build((None, D))
  ref.assign_weights(layer, w)
  assert len(layer.expert_parts["expert_kernel_1"]) == a * b
  x = rng.normal(size=(30, D)).astype(np.float32)
  noise = (
      rng.normal(size=(30, a)).astype(np.float32),
      rng.normal(size=(30, a, b)).astype(np.float32),
  )
  want = ref.hierarchical_moe(
      x, w, 2, 2, primary_noise=noise[0], secondary_noise=noise[1]
  )
  y = tf.function(lambda: layer(x, training=True, noise=noise))()
  np.testing.assert_allclose(_np(y), want["output"], **OUT_TOL)


def test_small_batch_decoding_matches_reference():
  """A decoding-sized inference step (the small-batch gather path)."""
  layer, w, x, _ = _flat("per_expert")
  few = x[:3]
  want = ref.sparse_moe(few, w, K, training=False)["output"]
  np.testing.assert_allclose(_np(layer(few, training=False)), want, **OUT_TOL)


def test_variables_are_per_expert_and_initialized_like_stacked():
  per_expert = SparseMoE(
      num_experts=N,
      k=K,
      expert_hidden_dim=H,
      expert_variables="per_expert",
      kernel_initializer=sparse_moe.ExpertKernelInitializer(seed=3),
  )
  stacked = SparseMoE(
      num_experts=N,
      k=K,
      expert_hidden_dim=H,
      kernel_initializer=sparse_moe.ExpertKernelInitializer(seed=3),
  )
  per_expert.build((None, D))
  stacked.build((None, D))
  parts = per_expert.expert_parts
  assert sorted(parts) == ["expert_kernel_1", "expert_kernel_2"]
  assert [tuple(v.shape) for v in parts["expert_kernel_1"]] == [(D, H)] * N
  assert [v.name for v in parts["expert_kernel_2"]][:2] == [
      "expert_kernel_2_0",
      "expert_kernel_2_1",
  ]
  assert per_expert.expert_kernel_1 is None
  assert len(per_expert.trainable_variables) == 2 + 2 * N
  # A seeded initializer draws the stacked layout's values.
  np.testing.assert_array_equal(
      _np(per_expert.expert_weight("expert_kernel_1")),
      _np(stacked.expert_kernel_1),
  )
  assert per_expert.expert_weight("expert_bias_1") is None


@pytest.mark.parametrize(
    "source,target",
    [("per_expert", "stacked"), ("stacked", "per_expert")],
)
def test_checkpoints_are_stacked_and_load_into_either_layout(
    tmp_path, source, target
):
  def model(layout):
    inputs = keras.Input((D,))
    layer = SparseMoE(
        num_experts=N,
        k=K,
        expert_hidden_dim=H,
        use_bias=True,
        expert_variables=layout,
        name="moe",
    )
    return keras.Model(inputs, keras.layers.Dense(3)(layer(inputs))), layer

  saved, saved_layer = model(source)
  rng = np.random.default_rng(4)
  for var in saved.weights:
    if "seed_generator" not in var.path:
      var.assign(rng.normal(size=var.shape).astype(np.float32))
  path = str(tmp_path / "w.weights.h5")
  saved.save_weights(path)
  import h5py  # pylint: disable=g-import-not-at-top

  with h5py.File(path, "r") as f:
    shapes = []
    f.visititems(
        lambda name, obj: shapes.append(obj.shape)
        if isinstance(obj, h5py.Dataset) and "sparse_mo_e/" in name
        else None
    )
  assert (N, D, H) in shapes and (N, H, D) in shapes and (N, H) in shapes
  assert not [s for s in shapes if s == (D, H)]
  loaded, loaded_layer = model(target)
  loaded.load_weights(path)
  for name in sparse_moe.EXPERT_WEIGHT_NAMES + ("w_gate", "w_noise"):
    get = lambda layer: _np(
        layer.expert_weight(name)
        if name in sparse_moe.EXPERT_WEIGHT_NAMES
        else getattr(layer, name)
    )
    np.testing.assert_array_equal(get(loaded_layer), get(saved_layer))
  x = rng.normal(size=(5, D)).astype(np.float32)
  np.testing.assert_array_equal(_np(loaded(x)), _np(saved(x)))


def test_a_checkpoint_of_another_shape_is_a_clear_error():
  layer = _flat("per_expert")[0]
  store = {}
  layer.save_own_variables(store)
  store["2"] = np.zeros((N + 1, D, H), np.float32)
  with pytest.raises(ValueError, match=r"variable 2 has shape \(7, 8, 16\)"):
    layer.load_own_variables(store)
  del store["2"]
  with pytest.raises(ValueError, match="has 3 variables .* expected 4"):
    layer.load_own_variables(store)


def test_factored_adam_steps_match_stacked():
  """Appendix D's factored second moments per expert: the same updates
  whether an expert is a slice of [n, d, h] or a [d, h] variable."""
  layers = {}
  for layout in ("stacked", "per_expert"):
    layer, _, x, noise = _flat(layout)
    optimizer = FactoredAdam(learning_rate=0.01)
    for _ in range(3):
      with tf.GradientTape() as tape:
        y = layer(x, training=True, noise=noise)
        loss = tf.reduce_sum(tf.square(y)) + tf.add_n(layer.losses)
      grads = tape.gradient(loss, layer.trainable_variables)
      optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    layers[layout] = layer
  for name in ("expert_kernel_1", "expert_kernel_2", "w_gate", "w_noise"):
    get = lambda layer: _np(
        layer.expert_weight(name)
        if name.startswith("expert")
        else getattr(layer, name)
    )
    np.testing.assert_allclose(
        get(layers["per_expert"]),
        get(layers["stacked"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_layouts_are_clear_errors():
  with pytest.raises(ValueError, match="unknown expert_variables 'split'"):
    SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, expert_variables="split")
  with pytest.raises(ValueError, match="cannot be combined with expert_dev"):
    SparseMoE(
        num_experts=4,
        k=2,
        expert_hidden_dim=H,
        expert_variables="per_expert",
        expert_devices=["/CPU:0", "/CPU:0"],
    )


def test_layout_serializes_and_reaches_the_model_through_moe_spec():
  layer = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=H, expert_variables="per_expert"
  )
  assert SparseMoE.from_config(layer.get_config()).expert_variables == (
      "per_expert"
  )
  spec = blocks.moe_spec(
      num_experts=4, expert_hidden_dim=H, expert_variables="per_expert"
  )
  assert blocks.build_moe(spec).expert_variables == "per_expert"
  assert blocks.build_moe(blocks.moe_spec(num_experts=4)).expert_variables == (
      "auto"
  )


_JAX_SCRIPT = """
import json
import keras
import numpy as np
from moe_keras.layers import SparseMoE
import numpy_reference as ref

rng = np.random.default_rng(11)
w = ref.random_flat_weights(rng, 8, 6, 16, 8, use_bias=False)
x = rng.normal(size=(40, 8)).astype(np.float32)
noise = rng.normal(size=(40, 6)).astype(np.float32)
layer = SparseMoE(num_experts=6, k=2, expert_hidden_dim=16,
                  expert_variables="per_expert", w_importance=0.3, w_load=0.7)
layer.build((None, 8))
ref.assign_weights(layer, w)
want = ref.sparse_moe(x, w, 2, noise=noise, w_importance=0.3, w_load=0.7)
y = layer(x, training=True, noise=noise)
print("RESULT " + json.dumps({
    "backend": keras.backend.backend(),
    "err": float(np.max(np.abs(np.asarray(y) - want["output"]))),
}))
"""


def test_per_expert_runs_on_jax():
  result = layer_testlib.script_result(_JAX_SCRIPT, backend="jax")
  assert result["backend"] == "jax"
  assert result["err"] < 1e-5


@pytest.mark.parametrize("optimizer_name", ["adam", "factored_adam"])
def test_optimizer_state_is_saved_stacked_and_resumes_across_layouts(
    tmp_path, optimizer_name
):
  """With the experiments' optimizer wrapper (`colocate_slots`), Adam's
  moments (and factored Adam's row/column moments) of per-expert variables
  are saved as the stacked layout's [n, ...] arrays: a checkpoint of either
  layout resumes under the other and continues exactly."""
  from moe_keras.distribution import optimizer as distributed_optimizer  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  x = rng.normal(size=(TOKENS, D)).astype(np.float32)
  y = rng.normal(size=(TOKENS, 3)).astype(np.float32)
  init = {}

  def model(layout):
    inputs = keras.Input((D,))
    layer = SparseMoE(
        num_experts=N,
        k=K,
        expert_hidden_dim=H,
        gating="top_k",
        expert_variables=layout,
        small_batch_limit=0,
        name="moe",
    )
    net = keras.Model(inputs, keras.layers.Dense(3, name="head")(layer(inputs)))
    optimizer = (
        keras.optimizers.Adam(0.01)
        if optimizer_name == "adam"
        else FactoredAdam(learning_rate=0.01)
    )
    net.compile(distributed_optimizer.colocate_slots(optimizer), "mse")
    if not init:
      for var in net.weights:
        if "seed_generator" not in var.path:
          init[var.path] = rng.normal(size=var.shape).astype(np.float32)
      init["stacked"] = {
          name: _np(layer.expert_weight(name))
          for name in ("expert_kernel_1", "expert_kernel_2")
      }
    for var in net.weights:
      if var.path in init:
        var.assign(init[var.path])
    for name, value in init["stacked"].items():
      layer.set_expert_weight(name, value)
    return net, layer

  def stacked_state(path):
    import h5py  # pylint: disable=g-import-not-at-top

    with h5py.File(path, "r") as f:
      group = f["optimizer"]["vars"]
      return [np.asarray(group[str(i)]) for i in range(len(group))]

  runs = {}
  for layout in ("stacked", "per_expert"):
    net, layer = model(layout)
    net.fit(x, y, batch_size=TOKENS, epochs=2, verbose=0, shuffle=False)
    path = str(tmp_path / f"{layout}.weights.h5")
    net.save_weights(path)
    runs[layout] = (net, layer, path)
  saved = {layout: stacked_state(runs[layout][2]) for layout in runs}
  assert [a.shape for a in saved["per_expert"]] == [
      a.shape for a in saved["stacked"]
  ]
  assert any(a.shape[:1] == (N,) and a.ndim >= 2 for a in saved["stacked"])
  for got, want in zip(saved["per_expert"], saved["stacked"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Resume each checkpoint under the other layout: one more step lands
  # where the original layout's own next step does.
  for source, target in (("stacked", "per_expert"), ("per_expert", "stacked")):
    net, layer = model(target)
    net.optimizer.build(net.trainable_variables)
    net.load_weights(runs[source][2])
    assert int(net.optimizer.iterations.numpy()) == 2
    net.fit(x, y, batch_size=TOKENS, epochs=1, verbose=0, shuffle=False)
    ref_net, ref_layer, _ = runs[source]
    if not getattr(ref_net, "_one_more", False):
      ref_net.fit(x, y, batch_size=TOKENS, epochs=1, verbose=0, shuffle=False)
      ref_net._one_more = True  # pylint: disable=protected-access
    np.testing.assert_allclose(
        _np(layer.expert_weight("expert_kernel_1")),
        _np(ref_layer.expert_weight("expert_kernel_1")),
        rtol=1e-5,
        atol=1e-6,
    )


def test_auto_is_per_expert_only_where_it_is_fast(monkeypatch):
  def parts(**kwargs):
    layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, **kwargs)
    layer.build((None, D))
    return layer.expert_parts

  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H)
  assert layer.expert_variables == "auto"
  # Kernels of D * H elements: stacked below the size, per-expert from it.
  monkeypatch.setattr(sparse_moe, "PER_EXPERT_MIN_KERNEL_SIZE", D * H + 1)
  assert parts() is None
  monkeypatch.setattr(sparse_moe, "PER_EXPERT_MIN_KERNEL_SIZE", D * H)
  assert sorted(parts()) == ["expert_kernel_1", "expert_kernel_2"]
  assert parts(capacity_factor=2.0) is None
  assert parts(dispatch_mode="padded") is None
  assert parts(expert_variables="stacked") is None
  assert parts(expert_variables="per_expert", capacity_factor=2.0) is not None
  with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
    assert parts() is None
