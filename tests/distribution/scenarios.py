"""Distribution scenarios, run in processes with 8 devices.

`python scenarios.py NAME [ARGS]` runs one scenario; a scenario fails by
raising (non-zero exit). `python scenarios.py several NAME...` runs several
in one process, each reported on its own (`scenario_several`), so that
they share one start-up. The pytest files call `run_scenario` and
`run_scenarios` (dist_testlib). TensorFlow scenarios split the CPU into 8
logical devices before TensorFlow initializes; JAX scenarios get 8 host
devices from XLA_FLAGS (set by dist_testlib).

References: the sharded layer's outputs are checked against the float64
numpy reference of tests/layers (written from the paper), its gradients and
training steps against the single-device layer on the same global batch.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback

import numpy as np

NUM_DEVICES = 8
D, H, T, V = 6, 5, 4, 3
TOL = 1e-5


def setup_tf_devices(num=NUM_DEVICES, initialize=True):
  """Splits the CPU into `num` logical devices (before TF initializes).

  A no-op when an earlier scenario of this process made the same split
  (`scenario_several`); another split then fails (TensorFlow initialized).
  With initialize=False the runtime is left uninitialized (a
  MultiWorkerMirroredStrategy must be created before it is).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cpu = tf.config.list_physical_devices("CPU")[0]
  if len(tf.config.get_logical_device_configuration(cpu) or ()) != num:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num
    )
  if not initialize:
    return None
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def _short(device):
  """'/job:localhost/replica:0/task:0/device:CPU:3' -> 'CPU:3'."""
  return device.split("device:")[-1]


def assign_named(layer, weights):
  """Assigns unsharded numpy weights by name, splitting expert blocks."""
  shards = layer._expert_shards  # pylint: disable=protected-access
  for name, value in weights.items():
    if shards is not None and name in shards.blocks:
      parts = np.split(value, shards.num_blocks, axis=0)
      for var, part in zip(shards.blocks[name], parts):
        var.assign(part)
    else:
      getattr(layer, name).assign(value)


def expert_gradient(layer, grads_by_var, name):
  """The gradient of one weight [n, ...] (sharded blocks: concatenated)."""
  shards = layer._expert_shards  # pylint: disable=protected-access
  if shards is None or name not in shards.blocks:
    return grads_by_var[id(getattr(layer, name))]
  return np.concatenate(
      [grads_by_var[id(v)] for v in shards.blocks[name]], axis=0
  )


def layer_run(layer, x, noise, mask=None):
  """Output, total loss and gradients of sum(y * c) + losses, traced."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  c = np.cos(np.arange(np.prod(x.shape[:-1]) * layer_out_dim(layer, x)))
  c = c.reshape(x.shape[:-1] + (layer_out_dim(layer, x),)).astype("float32")
  variables = layer.trainable_weights

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      y = layer(x, training=True, noise=noise, mask=mask)
      loss = tf.reduce_sum(y * c) + tf.add_n(layer.losses)
    return (
        y,
        tf.add_n(layer.losses),
        tape.gradient(loss, [v.value for v in variables]),
    )

  y, aux, grads = step(x)
  return (
      y.numpy(),
      float(aux),
      {id(v): g.numpy() for v, g in zip(variables, grads) if g is not None},
  )


def layer_out_dim(layer, x):
  return layer.output_dim or x.shape[-1]


def check_close(name, got, want, tol=TOL):
  err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  if not err <= tol:
    raise AssertionError(f"{name}: max abs error {err} > {tol}")
  print(f"ok {name}: max abs error {err:.2e}")


@contextlib.contextmanager
def zero_gating_noise():
  """Replaces the gates' standard normal noise by zeros while active.

  The noise stddev, the smooth load and every other part of training stay
  as they are; only the random draws (which differ between one device and
  a mesh, whose devices draw their own) become zeros. Restored on exit, so
  that later scenarios of the same process get the real noise.
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import gating as gating_lib  # pylint: disable=g-import-not-at-top

  original = gating_lib.standard_normal
  gating_lib.standard_normal = lambda shape, seed: keras.ops.zeros(
      shape, "float32"
  )
  try:
    yield
  finally:
    gating_lib.standard_normal = original


# -- scenarios ----------------------------------------------------------------


def scenario_sharded_layer():
  """Sharded == single device (outputs, losses, gradients); placement."""
  devices = setup_tf_devices()
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import numpy_reference as ref  # pylint: disable=g-import-not-at-top
  from moe_keras.distribution import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from moe_keras.distribution import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n, k, out = 8, 2, 7
  cases = [
      # (name, expert axis, layer kwargs)
      ("dropless_e4", 4, dict(), False),
      ("capacity_bias_e2", 2, dict(capacity_factor=1.0, use_bias=True), True),
      ("dropless_e8", 8, dict(), False),
  ]
  x = rng.normal(size=(3, 4, D)).astype("float32")
  tokens = x.reshape(-1, D)
  for name, experts_axis, kwargs, use_bias in cases:
    mesh = mesh_lib.Mesh(
        f"batch:1,expert:{experts_axis}", devices[:experts_axis]
    )
    weights = ref.random_flat_weights(rng, D, n, H, out, use_bias=use_bias)
    noise = rng.normal(size=(tokens.shape[0], n)).astype("float32")
    # The stacked layout on one device (its variables are what the
    # sharded blocks are compared with, name by name).
    single = SparseMoE(
        n, k, H, output_dim=out, expert_variables="stacked", **kwargs
    )
    sharded = SparseMoE(
        n, k, H, output_dim=out, expert_devices=mesh.expert_devices(), **kwargs
    )
    for layer in (single, sharded):
      layer.build(x.shape)
      assign_named(layer, weights)
    y1, aux1, g1 = layer_run(single, x, noise)
    y2, aux2, g2 = layer_run(sharded, x, noise)
    capacity = None
    if kwargs.get("capacity_factor"):
      capacity = int(np.ceil(1.0 * tokens.shape[0] * k / n))
    want = ref.sparse_moe(tokens, weights, k, noise=noise, capacity=capacity)
    check_close(f"{name} output vs numpy", y2.reshape(-1, out), want["output"])
    check_close(f"{name} losses vs numpy", aux2, want["total_loss"])
    check_close(f"{name} output vs single", y2, y1)
    check_close(f"{name} losses vs single", aux2, aux1)
    for var_name in ("w_gate", "w_noise"):
      check_close(
          f"{name} d{var_name}",
          g2[id(getattr(sharded, var_name))],
          g1[id(getattr(single, var_name))],
      )
    for var_name in weights:
      if var_name.startswith("expert_"):
        check_close(
            f"{name} d{var_name}",
            expert_gradient(sharded, g2, var_name),
            expert_gradient(single, g1, var_name),
        )
    # Expert e lives in block e // (n / E), on expert device e // (n / E).
    blocks = sharded._expert_shards.blocks  # pylint: disable=protected-access
    for var_name, block_vars in blocks.items():
      for e, var in enumerate(block_vars):
        assert _short(var.value.device) == _short(mesh.device(0, e)), (
            var.name,
            var.value.device,
        )
        assert var.shape[0] == n // experts_axis
    print(f"ok {name} placement")

  # Hierarchical (paper placement): each group's secondary gate and experts
  # on one device. a=4 groups of b=2: one group per device on 4 devices,
  # two per device on 2 (with a capacity), and with a padding mask.
  a, b = 4, 2
  hier_cases = [
      # (name, devices, layer kwargs, use a mask)
      ("hier_e4", devices[:4], dict(), False),
      ("hier_e2_capacity", devices[4:6], dict(capacity_factor=1.0), False),
      ("hier_e4_mask", devices[4:8], dict(), True),
  ]
  for name, hier_devices, kwargs, use_mask in hier_cases:
    weights = ref.random_hier_weights(rng, D, a, b, H, out)
    pnoise = rng.normal(size=(tokens.shape[0], a)).astype("float32")
    snoise = rng.normal(size=(tokens.shape[0], a, b)).astype("float32")
    single = HierarchicalSparseMoE(
        a, b, H, output_dim=out, expert_variables="stacked", **kwargs
    )
    sharded = HierarchicalSparseMoE(
        a, b, H, output_dim=out, expert_devices=hier_devices, **kwargs
    )
    for layer in (single, sharded):
      layer.build(x.shape)
      assign_named(layer, weights)
    mask = None
    if use_mask:
      mask = np.arange(tokens.shape[0]).reshape(x.shape[:-1]) % 5 != 3
    y1, aux1, g1 = layer_run(single, x, (pnoise, snoise), mask)
    y2, aux2, g2 = layer_run(sharded, x, (pnoise, snoise), mask)
    if not kwargs:
      want = ref.hierarchical_moe(
          tokens,
          weights,
          2,
          2,
          primary_noise=pnoise,
          secondary_noise=snoise,
          valid=None if mask is None else mask.reshape(-1),
      )
      check_close(
          f"{name} output vs numpy", y2.reshape(-1, out), want["output"]
      )
      check_close(
          f"{name} losses vs numpy",
          aux2,
          want["importance_loss"] + want["load_loss"],
      )
    check_close(f"{name} output vs single", y2, y1)
    check_close(f"{name} losses vs single", aux2, aux1)
    for var_name in weights:
      check_close(
          f"{name} d{var_name}",
          expert_gradient(sharded, g2, var_name),
          expert_gradient(single, g1, var_name),
      )
    # Inference (no noise, no losses) and the statistics.
    y1, s1 = single(x, training=False, mask=mask, return_stats=True)
    y2, s2 = sharded(x, training=False, mask=mask, return_stats=True)
    check_close(f"{name} inference output vs single", y2, y1)
    for stat in ("importance", "token_counts", "dropped_fraction"):
      check_close(f"{name} inference {stat}", s2[stat], s1[stat])
    # Group i (its secondary gates and experts i*b .. i*b + b - 1) lives in
    # block i // (a / E), on that expert device; the primary gate does not.
    blocks = sharded._expert_shards.blocks  # pylint: disable=protected-access
    per_device = a // len(hier_devices)
    for var_name, block_vars in blocks.items():
      for e, var in enumerate(block_vars):
        assert _short(var.value.device) == _short(hier_devices[e]), (
            var.name,
            var.value.device,
        )
    for i in range(a):
      assert blocks["w_gate_secondary"][i // per_device].shape[0] == per_device
      for j in range(b):
        var = blocks["expert_kernel_1"][(i * b + j) // (b * per_device)]
        assert _short(var.value.device) == _short(hier_devices[i // per_device])
    print(f"ok {name} placement: secondary MoE of group i on its device")
  try:
    HierarchicalSparseMoE(3, 2, H, expert_devices=devices[:2]).build(x.shape)
  except ValueError as e:
    assert "num_groups=3" in str(e), e
    print("ok hier indivisible:", e)
  else:
    raise AssertionError("3 groups on 2 devices accepted")

  # Adam slots: created inside a traced step (as model.fit does). Plain
  # Keras puts them on the default device; colocate_slots puts them (and
  # the update ops) with their variable.
  layer = SparseMoE(n, k, H, gating="top_k", expert_devices=devices[4:8])
  layer.build(x.shape)
  for fix in (False, True):
    opt = keras.optimizers.Adam(1e-2)
    if fix:
      optimizer_lib.colocate_slots(opt)

    @tf.function
    def train(x, opt=opt):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
      grads = tape.gradient(loss, layer.trainable_weights)
      opt.apply_gradients(zip(grads, layer.trainable_weights))

    train(x)
    placed = {
        v.name: _short(v.value.device)
        for v in opt.variables
        if "expert_kernel" in v.name
    }
    blocks = layer._expert_shards.blocks  # pylint: disable=protected-access
    wrong = [
        (slot, device)
        for slot, device in placed.items()
        for name, block_vars in blocks.items()
        for e, var in enumerate(block_vars)
        if f"{name}_block{e}_" in slot and device != _short(devices[4 + e])
    ]
    print(f"colocate_slots={fix}: {len(wrong)}/{len(placed)} slots misplaced")
    if fix:
      assert len(placed) == 2 * 2 * 4 and not wrong, wrong

  # Hierarchical: the Adam slots of the secondary gates and experts of a
  # group on the group's device too.
  layer = HierarchicalSparseMoE(a, b, H, expert_devices=devices[4:8])
  layer.build(x.shape)
  opt = optimizer_lib.colocate_slots(keras.optimizers.Adam(1e-2))

  @tf.function
  def train_hier(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x, training=True) ** 2) + tf.add_n(
          layer.losses
      )
    grads = tape.gradient(loss, layer.trainable_weights)
    opt.apply_gradients(zip(grads, layer.trainable_weights))

  train_hier(x)
  placed = {
      v.name: _short(v.value.device)
      for v in opt.variables
      if "_block" in v.name
  }
  wrong = [
      (slot, device)
      for slot, device in placed.items()
      if device != _short(devices[4 + int(slot.split("_block")[1][0])])
  ]
  print(f"hier colocate_slots: {len(wrong)}/{len(placed)} slots misplaced")
  assert len(placed) == 4 * 4 * 2 and not wrong, wrong


def scenario_sharded_options():
  """recompute_expert_activations and expert_dtype: sharded == one device."""
  devices = setup_tf_devices()
  import moe_keras.distribution  # pylint: disable=g-import-not-at-top,unused-import  # expert_devices
  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  import numpy_reference as ref  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  n, k, out, a, b = 8, 2, 7, 4, 2
  x = rng.normal(size=(3, 4, D)).astype("float32")
  num_tokens = x.shape[0] * x.shape[1]
  cases = [
      # (name, hierarchical, layer kwargs, tolerance)
      ("recompute", False, dict(recompute_expert_activations=True), TOL),
      ("mixed_bf16", False, dict(expert_dtype="mixed_bfloat16"), TOL),
      (
          "bf16_recompute_capacity",
          False,
          dict(
              expert_dtype="bfloat16",
              recompute_expert_activations=True,
              capacity_factor=1.0,
          ),
          TOL,
      ),
      (
          "hier_recompute_mixed_bf16",
          True,
          dict(
              recompute_expert_activations=True, expert_dtype="mixed_bfloat16"
          ),
          TOL,
      ),
  ]
  for name, hierarchical, kwargs, tol in cases:
    if hierarchical:
      weights = ref.random_hier_weights(rng, D, a, b, H, out)
      noise = (
          rng.normal(size=(num_tokens, a)).astype("float32"),
          rng.normal(size=(num_tokens, a, b)).astype("float32"),
      )
      make = lambda **kw: HierarchicalSparseMoE(a, b, H, output_dim=out, **kw)
    else:
      weights = ref.random_flat_weights(rng, D, n, H, out)
      noise = rng.normal(size=(num_tokens, n)).astype("float32")
      # 12 tokens would take the small-batch path on one device only; the
      # sharded layer has none: compare the routing-plan paths.
      make = lambda **kw: SparseMoE(
          n, k, H, output_dim=out, small_batch_limit=0, **kw
      )
    single = make(expert_variables="stacked", **kwargs)
    sharded = make(expert_devices=devices[:4], **kwargs)
    for layer in (single, sharded):
      layer.build(x.shape)
      assign_named(layer, weights)
    y1, aux1, g1 = layer_run(single, x, noise)
    y2, aux2, g2 = layer_run(sharded, x, noise)
    check_close(f"{name} output vs single", y2, y1, tol)
    check_close(f"{name} losses vs single", aux2, aux1, tol)
    for var_name in weights:
      check_close(
          f"{name} d{var_name}",
          expert_gradient(sharded, g2, var_name),
          expert_gradient(single, g1, var_name),
          tol,
      )
    blocks = sharded._expert_shards.blocks  # pylint: disable=protected-access
    want_dtype = single.expert_kernel_1.dtype
    assert all(v.dtype == want_dtype for v in blocks["expert_kernel_1"]), (
        want_dtype,
        [v.dtype for v in blocks["expert_kernel_1"]],
    )
    print(f"ok {name}: expert blocks are {want_dtype}")


def tiny_model(num_experts=8, hierarchical=False, seed=0, **moe_kwargs):
  """Dense -> residual MoE -> Dense on [B, T, D] (the MoE sees B*T tokens).

  hierarchical: a HierarchicalSparseMoE of num_experts / 2 groups of 2.
  moe_kwargs: override the MoE's keyword arguments (capacity_factor, the
    balancing-loss weights, which default to 0; flat: the gating, default
    top_k).
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(seed)
  inputs = keras.Input((T, D))
  hidden = keras.layers.Dense(D, activation="tanh")(inputs)
  # No balancing losses by default: with balance_over="replica" (the
  # layer's default) replicas compute them on their slice of the batch, so
  # they are not the global batch's ("global" is: see global_balance).
  # Stacked experts: one device's variables are compared with the mesh's
  # blocks by name.
  moe_kwargs = dict(
      dict(w_importance=0.0, w_load=0.0, expert_variables="stacked"),
      **moe_kwargs,
  )
  if hierarchical:
    # Noisy gates at both levels.
    moe = HierarchicalSparseMoE(num_experts // 2, 2, H, **moe_kwargs)
  else:
    moe_kwargs.setdefault("gating", "top_k")
    moe = SparseMoE(num_experts, 2, H, **moe_kwargs)
  hidden = keras.layers.Add()([hidden, moe(hidden)])
  outputs = keras.layers.Dense(V)(hidden)
  return keras.Model(inputs, outputs)


def tiny_data(batch=16, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, T, D)).astype("float32")
  y = rng.normal(size=(batch, T, V)).astype("float32")
  return x, y


def build_on(mesh_shape, hierarchical=False):
  """(distribution, compiled model) for a mesh ('' = single device)."""
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  dist = make_distribution(mesh_shape or "batch:1,expert:1")
  with dist.scope():
    model = dist.wrap_model(tiny_model(hierarchical=hierarchical))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  return dist, model


def build_slots_traced(model):
  """Creates the optimizer's slots while tracing, as the first fit step does.

  `fit` (TensorFlow, no tf.distribute strategy) creates the slots inside
  its traced train step, and a tf.function that creates variables on its
  first call is traced again without them: every first `fit` traces the
  whole step (on a mesh: every replica's forward and backward pass) twice.
  Creating them here, the same way (`optimizer.apply` builds the optimizer
  in its name scope while tracing), leaves `fit` one trace. The slots are
  still created inside a traced function, where `colocate_slots` has to put
  them on their variable's device.

  Args:
    model: a compiled model whose optimizer is not built yet.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  optimizer = model.optimizer
  assert not optimizer.built, "build_slots_traced: optimizer already built"

  @tf.function(autograph=False)
  def build():
    if not optimizer.built:  # the retrace finds it built
      with keras.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(model.trainable_variables)
      optimizer.built = True

  build()


def fit_two_steps(single, mesh_model, x, y):
  """Two full-batch fit steps of each model (slots built traced first).

  Returns:
    (single's losses, mesh_model's losses), one per step.
  """
  for model in (single, mesh_model):
    build_slots_traced(model)
  kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
  return (
      single.fit(x, y, **kwargs).history["loss"],
      mesh_model.fit(x, y, **kwargs).history["loss"],
  )


def scenario_train_step():
  """Two Adam steps on a 2x4 mesh == on one device, same global batch."""
  devices = setup_tf_devices()
  x, y = tiny_data()
  tmp = tempfile.mkdtemp()
  init = os.path.join(tmp, "init.weights.h5")
  _, single = build_on("")
  single.save_weights(init)
  dist, mesh_model = build_on("batch:2,expert:4")
  mesh_model.load_weights(init)
  h1, h2 = fit_two_steps(single, mesh_model, x, y)
  check_close("2x4 step losses", h2, h1)
  inner = dist.unwrap(mesh_model)
  shards = inner.layers[2]._expert_shards  # pylint: disable=protected-access
  plain = [v for v in inner.weights if "_block" not in v.path]
  single_plain = [v for v in single.weights if "expert_" not in v.path]
  assert len(plain) == len(single_plain)
  for v, w in zip(plain, single_plain):
    check_close(f"weight {w.path}", v.numpy(), w.numpy())
  for name in ("expert_kernel_1", "expert_kernel_2"):
    w = [v for v in single.weights if v.path.endswith(name)][0]
    check_close(f"weight {w.path}", shards.full_value(name), w.numpy())
  # Every expert block and its two Adam moments on device (0, e).
  for name, block_vars in shards.blocks.items():
    for e, var in enumerate(block_vars):
      want = _short(dist.mesh.device(0, e))
      assert _short(var.value.device) == want
      slots = [
          s
          for s in mesh_model.optimizer.variables
          if s.name.endswith(
              (f"{name}_block{e}_momentum", f"{name}_block{e}_velocity")
          )
      ]
      assert len(slots) == 2 and all(
          _short(s.value.device) == want for s in slots
      ), [(s.name, s.value.device) for s in slots]
  print("ok experts and Adam slots on the mesh devices", devices[:4])
  # Batches not divisible by the 8 replicas, and smaller than 8 (some
  # replicas get no example).
  for size in (3, 11):
    check_close(
        f"batch of {size} on 8 replicas",
        mesh_model.predict(x[:size], batch_size=size, verbose=0),
        single.predict(x[:size], batch_size=size, verbose=0),
    )


# Rows of the tapped embedding of `tapped_model`: few, so that every batch
# repeats them (what the squares taps are about).
EMBEDDING_ROWS = 7


def tapped_model(piece_squares, capacity_factor=None):
  """ids [B, T] -> embedding (squares tap or not) -> Dense -> residual MoE ->
  Dense [B, T, V], with the same initial weights for both values.

  capacity_factor: the MoE's (None: dropless; a TF mesh's replicas would
  each apply a capacity to their own slice of the batch).
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import piece_squares as piece_squares_lib  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(0)
  inputs = keras.Input((T,), dtype="int32")
  embedded = piece_squares_lib.make_embedding(
      EMBEDDING_ROWS, D, piece_squares, name="embedding"
  )(inputs)
  hidden = keras.layers.Dense(D, activation="tanh")(embedded)
  moe = SparseMoE(
      8,
      2,
      H,
      gating="top_k",
      capacity_factor=capacity_factor,
      w_importance=0.0,
      w_load=0.0,
      expert_variables="stacked",
  )
  hidden = keras.layers.Add()([hidden, moe(hidden)])
  return keras.Model(inputs, keras.layers.Dense(V)(hidden))


def tapped_data(batch=16, seed=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, EMBEDDING_ROWS, size=(batch, T)).astype("int32")
  return ids, rng.normal(size=(batch, T, V)).astype("float32")


def _compiled_tapped(piece_squares, capacity_factor=None):
  from moe_keras.optimizers import fused_adam  # pylint: disable=g-import-not-at-top

  model = tapped_model(piece_squares, capacity_factor)
  model.compile(optimizer=fused_adam.FusedAdam(learning_rate=1e-2), loss="mse")
  return model


def tapped_twin_checkpoint(untapped):
  """A checkpoint of `tapped_model(True)` holding `untapped`'s weights.

  Args:
    untapped: a `tapped_model(False)`.

  Returns:
    The path of the `.weights.h5` file (zero tap).
  """
  tapped = tapped_model(True)
  plain = [w for w in tapped.weights if not w.path.endswith("_piece_squares")]
  assert len(plain) == len(untapped.weights)
  for mine, theirs in zip(plain, untapped.weights):
    mine.assign(theirs)
  path = os.path.join(tempfile.mkdtemp(), "tapped.weights.h5")
  tapped.save_weights(path)
  return path


def scenario_piece_squares_mesh():
  """Squares taps on a 2x4 mesh == TensorFlow's per-piece Adam, one device.

  Two FusedAdam steps of `tapped_model` from the same weights and batches:
  on one device without taps (Keras squares the embedding's IndexedSlices
  pieces one by one) and on the mesh with them (each replica's tap
  gradient sums its pieces' squares, and the replicas' sums add up): equal
  losses and outputs, and the tap stays zero.
  """
  setup_tf_devices()
  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.optimizers import fused_adam  # pylint: disable=g-import-not-at-top

  ids, y = tapped_data()
  single = _compiled_tapped(False)
  init = tapped_twin_checkpoint(single)
  dist = make_distribution("batch:2,expert:4")
  with dist.scope():
    mesh_model = dist.wrap_model(tapped_model(True))
    mesh_model.compile(
        optimizer=fused_adam.FusedAdam(learning_rate=1e-2), loss="mse"
    )
  mesh_model.load_weights(init)
  h1, h2 = fit_two_steps(single, mesh_model, ids, y)
  assert abs(h1[1] - h1[0]) > 1e-4, h1  # the step moved the model
  check_close("taps on 2x4 vs per-piece on one device: losses", h2, h1)
  check_close(
      "taps on 2x4 vs per-piece on one device: outputs after training",
      mesh_model.predict(ids, batch_size=16, verbose=0),
      single.predict(ids, batch_size=16, verbose=0),
  )
  taps = [v for v in mesh_model.weights if v.path.endswith("_piece_squares")]
  assert len(taps) == 1 and not np.any(taps[0].numpy()), taps
  print("ok squares taps on the mesh: per-piece Adam, tap unchanged")


def scenario_jax_piece_squares_mesh():
  """JAX: squares taps on a 2x4 mesh == on one device (2 FusedAdam steps)."""
  import jax  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
  ids, y = tapped_data()
  single, sharded, dist = _jax_single_and_sharded(
      lambda: _compiled_tapped(True, capacity_factor=2.0),
      compile_model=False,
  )
  _jax_fit_equal(single, sharded, dist, ids, y, "jax taps 2x4")
  for model in (single, sharded):
    taps = [v for v in model.weights if v.path.endswith("_piece_squares")]
    assert len(taps) == 1 and not np.any(np.asarray(taps[0].value)), taps
  print("ok jax squares taps on the mesh == one device, tap unchanged")


def _requested_device(ops_by_name, op):
  """op's device, else the device of the op it is colocated with, else ''."""
  if op.device:
    return op.device
  for group in op.colocation_groups():
    other = ops_by_name.get(group.decode()[len("loc:@") :])
    if other is not None and other is not op and other.device:
      return other.device
  return ""


def scenario_step_device():
  """MeshDataParallel(step_device=...) (the TF servers' step) on 1x8 here.

  Two Adam steps equal one device's. In the traced train step no tensor of
  an expert block's shape (its weights, gradients, Adam updates) leaves
  the block's device, every gradient op has a device (the sum of a
  variable's gradients over the replicas runs on the variable's device,
  not on the function's default device), and the batch is split by ops
  without a device (where the batch is: on TF servers the client).
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.distribution import strategy  # pylint: disable=g-import-not-at-top

  setup_tf_devices()
  x, y = tiny_data()
  init = os.path.join(tempfile.mkdtemp(), "init.weights.h5")
  _, single = build_on("")
  single.save_weights(init)
  dist = make_distribution("batch:1,expert:8")
  with dist.scope():
    model = strategy.MeshDataParallel(
        tiny_model(), dist.mesh, step_device=dist.mesh.device(0, 0)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  model.load_weights(init)
  for m in (single, model):
    build_slots_traced(m)
  kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
  h1 = single.fit(x, y, **kwargs).history["loss"]
  h2 = model.fit(x, y, **kwargs).history["loss"]
  check_close("step_device 1x8 step losses", h2, h1)
  inner = dist.unwrap(model)
  shards = inner.layers[2]._expert_shards  # pylint: disable=protected-access
  for name in ("expert_kernel_1", "expert_kernel_2"):
    w = [v for v in single.weights if v.path.endswith(name)][0]
    check_close(f"weight {w.path}", shards.full_value(name), w.numpy())

  graph = (
      tf.function(model.train_step)
      .get_concrete_function((tf.constant(x), tf.constant(y)))
      .graph
  )
  ops_by_name = {op.name: op for op in graph.get_operations()}
  block_shapes = {tuple(v.shape) for vs in shards.blocks.values() for v in vs}
  crossing = []
  for op in graph.get_operations():
    here = _short(_requested_device(ops_by_name, op))
    for t in op.inputs:
      there = _short(_requested_device(ops_by_name, t.op))
      if (
          t.dtype.is_floating
          and tuple(t.shape) in block_shapes
          and here
          and there
          and here != there
      ):
        crossing.append((t.name, there, op.name, here))
  assert not crossing, crossing
  unplaced = [
      op.name
      for op in graph.get_operations()
      if op.name.startswith("gradients/")
      and not _requested_device(ops_by_name, op)
  ]
  assert not unplaced, unplaced
  inputs = {t.name for t in graph.inputs}
  splits = [
      op
      for op in graph.get_operations()
      if op.type == "SplitV" and op.inputs[0].name in inputs
  ]
  assert len(splits) == 1, [op.name for op in splits]  # x (y is whole)
  assert all(not op.device for op in splits), [op.device for op in splits]
  print(
      "ok step_device: no expert block tensor crosses devices, every"
      f" gradient op placed, batch split unplaced ({len(splits)} splits)"
  )


def scenario_reshard():
  """Save on a 2x4 mesh; restore on 1 device, 1x8 and 4x2.

  Same evaluation, and (the optimizer state restored too) the same next
  training step as the saved model's own.
  """
  setup_tf_devices()
  import h5py  # pylint: disable=g-import-not-at-top

  x, y = tiny_data()
  _, trained = build_on("batch:2,expert:4")
  build_slots_traced(trained)
  trained.fit(x, y, batch_size=16, epochs=1, verbose=0)
  path = os.path.join(tempfile.mkdtemp(), "ckpt.weights.h5")
  trained.save_weights(path)
  shapes = []
  with h5py.File(path, "r") as f:
    f.visititems(
        lambda name, obj: shapes.append(tuple(obj.shape))
        if isinstance(obj, h5py.Dataset)
        else None
    )
  assert (8, D, H) in shapes and (8, H, D) in shapes, shapes
  # No block-shaped array: weights and Adam moments are stored unsharded.
  assert all(len(s) != 3 or s[0] == 8 for s in shapes), shapes
  print("ok checkpoint holds full [n, d, h] arrays:", sorted(set(shapes)))
  # Only the loss: the MoE statistics (cv_load, ...) of a mesh model are
  # means over its replicas' slices, not the global batch's.
  want_loss = trained.evaluate(x, y, batch_size=16, verbose=0)[0]
  want_y = trained.predict(x, batch_size=16, verbose=0)
  fit = dict(batch_size=16, epochs=1, shuffle=False, verbose=0)
  x2, y2 = tiny_data(seed=7)
  restored = []
  for mesh_shape in ("", "batch:1,expert:8", "batch:4,expert:2"):
    _, model = build_on(mesh_shape)
    # As moe_keras.experiment restores: optimizer built, then the weights.
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    restored.append((mesh_shape, model))
    loss = model.evaluate(x, y, batch_size=16, verbose=0)[0]
    check_close(f"restored on '{mesh_shape}' loss", loss, want_loss, 1e-6)
    check_close(
        f"restored on '{mesh_shape}' outputs",
        model.predict(x, batch_size=16, verbose=0),
        want_y,
        1e-6,
    )
  # One more Adam step (moments and iteration restored) everywhere.
  want_next = trained.fit(x2, y2, **fit).history["loss"]
  want_y = trained.predict(x, batch_size=16, verbose=0)
  for mesh_shape, model in restored:
    assert int(model.optimizer.iterations.numpy()) == 1
    check_close(
        f"'{mesh_shape}' next step loss",
        model.fit(x2, y2, **fit).history["loss"],
        want_next,
    )
    check_close(
        f"'{mesh_shape}' outputs after the next step",
        model.predict(x, batch_size=16, verbose=0),
        want_y,
    )


def scenario_hier_mesh():
  """Hierarchical MoE model: 2x4 mesh steps == one device; resharding.

  The gating noise is replaced by zeros in this scenario (the sharded layer
  draws the secondary noise on the groups' devices, so random draws differ
  from one device's); gates, losses and gradients are otherwise the
  training ones (noise stddev, smooth load; the layer scenario checks the
  balancing losses).
  """
  devices = setup_tf_devices()
  with zero_gating_noise():
    _hier_mesh(devices)


def _hier_mesh(devices):
  """scenario_hier_mesh with the gating noise replaced by zeros."""
  x, y = tiny_data()
  path = os.path.join(tempfile.mkdtemp(), "init.weights.h5")
  _, single = build_on("", hierarchical=True)
  single.save_weights(path)
  dist, mesh_model = build_on("batch:2,expert:4", hierarchical=True)
  mesh_model.load_weights(path)
  for model in (single, mesh_model):
    build_slots_traced(model)
  kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
  check_close(
      "hier 2x4 step losses",
      mesh_model.fit(x, y, **kwargs).history["loss"],
      single.fit(x, y, **kwargs).history["loss"],
  )
  want_y = single.predict(x, batch_size=16, verbose=0)
  check_close(
      "hier 2x4 outputs after 2 steps",
      mesh_model.predict(x, batch_size=16, verbose=0),
      want_y,
  )
  shards = dist.unwrap(mesh_model).layers[2]._expert_shards  # pylint: disable=protected-access
  for name, block_vars in shards.blocks.items():
    for e, var in enumerate(block_vars):
      want = _short(dist.mesh.device(0, e))
      slots = [
          v
          for v in mesh_model.optimizer.variables
          if f"{name}_block{e}_" in v.name
      ]
      assert len(slots) == 2, [v.name for v in slots]
      assert all(_short(v.value.device) == want for v in [var] + slots), (
          var.name,
          [v.value.device for v in [var] + slots],
      )
  print("ok hier secondary gates, experts, Adam slots on", devices[:4])
  saved = os.path.join(tempfile.mkdtemp(), "ckpt.weights.h5")
  mesh_model.save_weights(saved)
  for mesh_shape in ("", "batch:4,expert:2"):
    _, model = build_on(mesh_shape, hierarchical=True)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(saved)
    check_close(
        f"hier restored on '{mesh_shape}' outputs",
        model.predict(x, batch_size=16, verbose=0),
        want_y,
        1e-6,
    )


def _free_ports(count):
  from moe_keras.distribution import loopback_servers  # pylint: disable=g-import-not-at-top

  return loopback_servers.free_ports(count)


def wait_processes(procs, timeout, what="worker"):
  """Waits for `procs` (stdout piped, stderr merged); fails naming one.

  Kills those still running after `timeout` seconds each.

  Returns:
    Their outputs (str), in order.
  """
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for index, (proc, text) in enumerate(zip(procs, outputs)):
    if proc.returncode != 0:
      lines = [l for l in text.splitlines() if "File " in l or "Error" in l]
      raise AssertionError(f"{what} {index} failed:\n" + "\n".join(lines[-40:]))
  return outputs


# The tiny LM of gin/lm/tiny (LSTM -> residual MoE -> LSTM -> softmax),
# made deterministic so that 2 workers can match 1 process: no dropout, the
# exact softmax (no sampled candidates), top-k gating without noise (so no
# load loss), and the importance loss over the global batch
# (balance_over='global': the hosts all-reduce their Importance sums).
LM_BINDINGS = (
    "DROPOUT = 0.0",
    "NUM_SAMPLED = None",
    "W_IMPORTANCE = 0.1",
    "W_LOAD = 0.0",
    "WARMUP_STEPS = 2",
    "moe_spec.gating = 'top_k'",
    "moe_spec.balance_over = 'global'",
)
LM_VOCAB, LM_BATCH, LM_TIME = 40, 8, 12


def multi_worker_model(kind, dist):
  """(compiled model, x, y) for the multi-worker scenario.

  Args:
    kind: "tiny" (Dense -> MoE -> Dense, MSE), "tiny_global" (the same
      with noisy top-k gating, zero noise, w_importance = w_load = 0.1 and
      balance_over="global") or "lm" (the tiny MoE LM of
      gin/lm/tiny/moe_flat.gin, its Adam schedule and masked mean NLL).
    dist: the Distribution to build under.

  Returns:
    (model, x, y) with the global batch x, y.
  """
  import keras  # pylint: disable=g-import-not-at-top

  if kind in ("tiny", "tiny_global"):
    moe_kwargs = {}
    if kind == "tiny_global":
      from moe_keras.layers import gating as gating_lib  # pylint: disable=g-import-not-at-top

      # Each worker draws its own noise; zeros keep the noise stddev and
      # the smooth load of training.
      gating_lib.standard_normal = lambda shape, seed: keras.ops.zeros(
          shape, "float32"
      )
      moe_kwargs = dict(
          gating="noisy_top_k",
          w_importance=0.1,
          w_load=0.1,
          balance_over="global",
      )
    with dist.scope():
      model = dist.wrap_model(tiny_model(**moe_kwargs))
      model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return (model,) + tiny_data(batch=16)
  from eval import perplexity as perplexity_lib  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top
  from moe_keras.models import lm  # pylint: disable=g-import-not-at-top
  from moe_keras.optimizers import factory  # pylint: disable=g-import-not-at-top

  experiment.parse_gin(["gin/lm/tiny/moe_flat.gin"], LM_BINDINGS)
  keras.utils.set_random_seed(0)
  with dist.scope():
    model = dist.wrap_model(lm.build_lm(LM_VOCAB))
    model.compile(
        optimizer=factory.make_optimizer(),
        loss=perplexity_lib.masked_mean_nll,
    )
  rng = np.random.default_rng(5)
  ids = rng.integers(1, LM_VOCAB, size=(LM_BATCH, LM_TIME + 1))
  weights = np.ones((LM_BATCH, LM_TIME), "float32")
  x = {
      "inputs": ids[:, :-1].astype("int32"),
      "targets": ids[:, 1:].astype("int32"),
      "weights": weights,
  }
  return model, x, weights


def scenario_multi_worker(mesh_shape="batch:2,expert:1", kind="tiny"):
  """2 MultiWorkerMirroredStrategy workers == 1 process, same global batch.

  Args:
    mesh_shape: the global mesh; each worker gets batch/2 rows of it.
    kind: "tiny", "tiny_global" or "lm" (see `multi_worker_model`). With
      "tiny_global" the MoE losses are in the compared losses: the workers'
      `total_loss` (their `loss` is the task loss) against the one-process
      plain model's `loss`.
  """
  shape = dict(p.split(":") for p in mesh_shape.split(","))
  local_devices = int(shape["batch"]) // 2 * int(shape["expert"])
  ports = _free_ports(2)
  out_dir = tempfile.mkdtemp()
  procs = []
  for index in range(2):
    env = dict(os.environ)
    env["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "worker",
                mesh_shape,
                str(local_devices),
                os.path.join(out_dir, f"worker{index}.json"),
                kind,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  # The single-process reference runs while the workers start.
  setup_tf_devices(1)
  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  single, x, y = multi_worker_model(kind, make_distribution("batch:1,expert:1"))
  batch = len(y)
  weights_path = os.path.join(out_dir, "init.weights.h5")
  single.save_weights(weights_path)  # the workers wait for this file
  build_slots_traced(single)
  history = single.fit(
      x, y, batch_size=batch, epochs=3, shuffle=False, verbose=0
  ).history["loss"]
  wait_processes(procs, 180)
  for index in range(2):
    with open(os.path.join(out_dir, f"worker{index}.json")) as f:
      got = json.load(f)
    worker_loss = got["total_loss"] if kind == "tiny_global" else got["loss"]
    print(f"worker {index} losses", worker_loss, "one process", history)
    check_close(
        f"worker {index} {kind} losses ({mesh_shape})", worker_loss, history
    )
    final = single.predict(x, batch_size=batch, verbose=0)
    check_close(f"worker {index} final outputs", got["outputs"], final)
    if index == 0:
      print("worker 0 expert blocks and Adam slots:", got["placement"])
    for path, where in got["placement"].items():
      block = int(path.split("_block")[1][0])
      # Local mesh batch:B/2,expert:E: block e on local device (0, e) = e.
      assert where == [f"CPU:{block}"], (path, where)


def scenario_worker(mesh_shape, local_devices, out_path, kind="tiny"):
  """One MultiWorkerMirroredStrategy worker (TF_CONFIG set by the parent)."""
  import time  # pylint: disable=g-import-not-at-top

  setup_tf_devices(int(local_devices), initialize=False)
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  keras.config.disable_traceback_filtering()
  # First, before any TensorFlow op: the strategy configures the runtime.
  dist = make_distribution(mesh_shape)
  init = os.path.join(os.path.dirname(out_path), "init.weights.h5")
  deadline = time.time() + 120
  while not os.path.exists(init) and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(0.5)
  assert dist.kind == "multi_worker", dist.kind
  model, x, y = multi_worker_model(kind, dist)
  model.load_weights(init)
  batch = len(y)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
  logs = model.fit(
      dist.distribute_dataset(dataset), epochs=3, verbose=0
  ).history
  outputs = dist.unwrap(model).predict(x, batch_size=batch, verbose=0)
  placement = {
      v.path: [_short(c.device) for c in getattr(v.value, "values", [v.value])]
      for v in list(dist.unwrap(model).weights) + list(
          model.optimizer.variables
      )
      if "_block" in v.path
  }
  with open(out_path, "w") as f:
    json.dump(
        {
            "loss": logs["loss"],
            "total_loss": logs.get("total_loss"),
            "outputs": outputs.tolist(),
            "placement": placement,
        },
        f,
    )


def _jax_single_and_sharded(
    build, mesh_shape="batch:2,expert:4", compile_model=True
):
  """Compiles `build()` on one device and on `mesh_shape`, same weights.

  compile_model: False when `build()` returns a compiled model.
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  def compiled():
    model = build()
    if compile_model:
      model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model

  single = compiled()
  path = os.path.join(tempfile.mkdtemp(), "init.weights.h5")
  single.save_weights(path)
  dist = make_distribution(mesh_shape)
  with dist.scope():
    sharded = compiled()
  sharded.load_weights(path)
  return single, sharded, dist


def _jax_fit_equal(single, sharded, dist, x, y, label):
  """Two epochs of fit on one device and on the mesh: equal losses, outputs."""
  kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
  h1 = single.fit(x, y, **kwargs).history["loss"]
  with dist.scope():  # the batch is split on "batch" only inside
    h2 = sharded.fit(x, y, **kwargs).history["loss"]
    got = sharded.predict(x, batch_size=16, verbose=0)
  check_close(f"{label} losses", h2, h1)
  check_close(
      f"{label} outputs after training",
      got,
      single.predict(x, batch_size=16, verbose=0),
  )


def scenario_jax_mesh():
  """JAX: experts sharded on 'expert', batch on 'batch'; == one device."""
  import jax  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import backend_ops  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
  x, y = tiny_data()

  single, sharded, dist = _jax_single_and_sharded(
      lambda: tiny_model(capacity_factor=2.0)
  )
  moe = [l for l in sharded.layers if isinstance(l, SparseMoE)][0]
  kernel = moe.expert_kernel_1.value
  spec = kernel.sharding.spec
  assert tuple(spec)[:1] == ("expert",), spec
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(2, D, H)}, shard_shapes
  print("ok expert_kernel_1 sharding", spec, shard_shapes)
  _jax_fit_equal(single, sharded, dist, x, y, "jax 2x4")
  kernel = moe.expert_kernel_1.value
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, D, H)}
  # Dropless on the mesh: ragged_dot, which the SPMD partitioner splits by
  # expert (the CPU loop over groups would gather every expert's weights).
  choose = backend_ops.jax_grouped_matmul_choice
  with dist.scope():
    assert choose((8, 16), (8, 16, 32)) == "ragged_dot"
  assert choose((8, 16), (8, 16, 32)) == "tiled"
  print("ok jax dropless on the mesh: ragged_dot")


def scenario_jax_hier_mesh():
  """JAX: hierarchical MoE, experts and secondary gates on 'expert'.

  Noise is replaced by zeros as in scenario_hier_mesh (random draws are
  per-device under a mesh); everything else is the training computation.
  """
  import jax  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
  with zero_gating_noise():
    _jax_hier_mesh()


def _jax_hier_mesh():
  """scenario_jax_hier_mesh with the gating noise replaced by zeros."""
  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top

  x, y = tiny_data()

  # With the layer's default balancing losses (GSPMD computes them over the
  # global batch, as one device does; balance_over="global" is that same
  # computation on JAX).
  single, sharded, dist = _jax_single_and_sharded(
      lambda: tiny_model(
          hierarchical=True,
          capacity_factor=4.0,
          w_importance=0.1,
          w_load=0.1,
          balance_over="global",
      )
  )
  moe = [l for l in sharded.layers if isinstance(l, HierarchicalSparseMoE)][0]
  want_shards = {
      "expert_kernel_1": (2, D, H),
      "w_gate_secondary": (1, D, 2),
      "w_noise_secondary": (1, D, 2),
  }
  for name, want in want_shards.items():
    value = getattr(moe, name).value
    assert tuple(value.sharding.spec)[:1] == ("expert",), (name, value.sharding)
    got = {s.data.shape for s in value.addressable_shards}
    assert got == {want}, (name, got)
  assert {s.data.shape for s in moe.w_gate.value.addressable_shards} == {(D, 4)}
  print("ok jax hierarchical: experts and secondary gates sharded on expert")
  _jax_fit_equal(single, sharded, dist, x, y, "jax hier 2x4")


def _replica_slices(batch, num):
  """Row ranges of MeshDataParallel's `num` near-equal slices of a batch."""
  sizes = [(batch + num - 1 - r) // num for r in range(num)]
  starts = np.cumsum([0] + sizes)
  return [slice(int(starts[r]), int(starts[r + 1])) for r in range(num)]


def _moe_only_model(hierarchical, balance_over, seed=0):
  """[B, T, D] -> MoE -> [B, T, D] (the MoE sees the inputs: numpy refs).

  Noisy gates (flat: noisy top-k, n=8, k=2; hierarchical: a=4 groups of
  b=2, k_primary=2, k_secondary=1, so that Load_i(X^(i)) is not |X^(i)|)
  with w_importance = w_load = 0.1.
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(seed)
  inputs = keras.Input((T, D))
  if hierarchical:
    moe = HierarchicalSparseMoE(
        4,
        2,
        H,
        k_secondary=1,
        balance_over=balance_over,
        expert_variables="stacked",
    )
  else:
    moe = SparseMoE(
        8,
        2,
        H,
        small_batch_limit=0,
        balance_over=balance_over,
        expert_variables="stacked",
    )
  return keras.Model(inputs, moe(inputs)), moe


def _balance_reference(tokens_of, hierarchical, weights, rows):
  """Numpy balancing loss (w = 0.1 each) of the tokens of `rows`, zero noise.

  Args:
    tokens_of: rows -> [N, D] tokens.
    hierarchical: which reference (tests/layers/numpy_reference.py).
    weights: the layer's numpy weights.
    rows: a slice of the batch.

  Returns:
    (loss, importance, load) of those tokens.
  """
  import numpy_reference as ref  # pylint: disable=g-import-not-at-top

  tokens = tokens_of(rows)
  num = tokens.shape[0]
  if hierarchical:
    want = ref.hierarchical_moe(
        tokens,
        weights,
        2,
        1,
        primary_noise=np.zeros((num, 4)),
        secondary_noise=np.zeros((num, 4, 2)),
    )
  else:
    want = ref.sparse_moe(tokens, weights, 2, noise=np.zeros((num, 8)))
  return want["total_loss"], want["importance"], want["load"]


def _aux_and_gate_grads(model, layer, x, gate_names):
  """Training-mode sum(model.losses) and its gradients for the gate weights."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  variables = layer.trainable_weights

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      model(x, training=True)
      aux = tf.add_n(model.losses)
    return aux, tape.gradient(aux, [v.value for v in variables])

  aux, grads = step(x)
  by_var = {id(v): g.numpy() for v, g in zip(variables, grads) if g is not None}
  return float(aux), {
      name: expert_gradient(layer, by_var, name) for name in gate_names
  }


def _strategy_aux(strategy, model, per_replica_x):
  """Training-mode sum(model.losses) under `strategy`, as Keras takes it.

  Each replica's loss is divided by the number of replicas (Keras's
  `scale_loss_for_distribution`), then summed over the replicas.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def replica_step(x):
    model(x, training=True)
    return tf.add_n(model.losses) / strategy.num_replicas_in_sync

  @tf.function
  def step(x):
    return strategy.reduce(
        "SUM", strategy.run(replica_step, args=(x,)), axis=None
    )

  return float(step(per_replica_x))


def scenario_global_balance():
  """balance_over on in-graph meshes and under MirroredStrategy.

  Mesh, "global": the loss is the numpy loss of the global batch and equals
  one device's, and so do its gradients for the gates. "replica": the mean
  of the numpy losses of the replicas' slices (the value before the
  option). MirroredStrategy (several replicas in one process): "replica"
  as on the mesh; "global" is a one-line ValueError. Noise is replaced by
  zeros (replicas draw their own; the noise stddev and the smooth load are
  the training ones).
  """
  devices = setup_tf_devices()
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import numpy_reference as ref  # pylint: disable=g-import-not-at-top
  from moe_keras.distribution import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from moe_keras.distribution import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import gating as gating_lib  # pylint: disable=g-import-not-at-top

  gating_lib.standard_normal = lambda shape, seed: keras.ops.zeros(
      shape, "float32"
  )
  rng = np.random.default_rng(11)
  x = rng.normal(size=(12, T, D)).astype("float32")
  tokens_of = lambda rows: x[rows].reshape(-1, D)
  cases = [
      # (kind, mesh, global batch, options). Flat: 12 rows on 8 replicas,
      # slices of 2, 2, 2, 2, 1, 1, 1, 1 rows. Hierarchical (a = 4 groups,
      # 2 per block): 10 rows on 4 replicas, 3, 3, 2, 2 rows; "global" only
      # (its 2x4 graph takes minutes to trace on a shared 2-core box).
      ("flat", "batch:2,expert:4", 12, ("replica", "global")),
      ("hier", "batch:2,expert:2", 10, ("global",)),
  ]
  for kind, mesh_shape, batch, options in cases:
    hierarchical = kind == "hier"
    mesh = mesh_lib.Mesh(mesh_shape, devices[: 8 if kind == "flat" else 4])
    slices = _replica_slices(batch, mesh.num_devices)
    if hierarchical:
      weights = ref.random_hier_weights(rng, D, 4, 2, H, D)
      gate_names = (
          "w_gate",
          "w_noise",
          "w_gate_secondary",
          "w_noise_secondary",
      )
    else:
      weights = ref.random_flat_weights(rng, D, 8, H, D)
      gate_names = ("w_gate", "w_noise")
    reference = lambda rows, h=hierarchical, w=weights: _balance_reference(
        tokens_of, h, w, rows
    )
    want = {
        "global": reference(slice(0, batch))[0],
        "replica": np.mean([reference(rows)[0] for rows in slices]),
    }
    # Flat: Importance and Load are sums over tokens, so CV^2 of the
    # slices' summed vectors is the global batch's. Load_H (eq. 14) is not:
    # summing the slices' Load_H gives another value (the layer adds the
    # three sums of eq. 14 instead).
    parts = [reference(rows) for rows in slices]
    summed = 0.1 * ref.cv_squared(sum(p[1] for p in parts)) + 0.1 * (
        ref.cv_squared(sum(p[2] for p in parts))
    )
    if hierarchical:
      assert abs(summed - want["global"]) > 20 * TOL, (summed, want)
    else:
      check_close("flat numpy: CV^2 of summed slices", summed, want["global"])
    # The test tells the two options apart.
    assert abs(want["global"] - want["replica"]) > 1e-2, want
    print(
        f"{kind} numpy losses: global {want['global']:.6f}, mean over"
        f" replicas {want['replica']:.6f}"
    )
    single, single_moe = _moe_only_model(hierarchical, "replica")
    assign_named(single_moe, weights)
    aux1, g1 = _aux_and_gate_grads(single, single_moe, x[:batch], gate_names)
    check_close(f"{kind} one device vs numpy", aux1, want["global"])
    for balance_over in options:
      dist = strategy_lib.Distribution(mesh, "in_graph")
      with dist.scope():
        inner, moe = _moe_only_model(hierarchical, balance_over)
        model = dist.wrap_model(inner)
      assert moe._expert_shards is not None  # pylint: disable=protected-access
      assign_named(moe, weights)
      aux, grads = _aux_and_gate_grads(model, moe, x[:batch], gate_names)
      label = f"{kind} {mesh_shape} balance_over={balance_over}"
      check_close(f"{label} loss vs numpy", aux, want[balance_over])
      if balance_over == "global":
        check_close(f"{label} loss vs one device", aux, aux1)
        for name in gate_names:
          assert np.abs(g1[name]).max() > 1e-4, (name, g1[name])
          check_close(f"{label} d{name} vs one device", grads[name], g1[name])

  # A plain model under MirroredStrategy (4 replicas in this process, 3
  # rows each). "replica": the mean of the replicas' losses, as before the
  # option. "global" refuses: the replicas' threads share the layers' loss
  # lists (the multi-worker scenario runs "global" with one replica per
  # process).
  strategy = tf.distribute.MirroredStrategy(devices[:4])
  weights = ref.random_flat_weights(rng, D, 8, H, D)
  strategy_slices = _replica_slices(len(x), 4)
  want = np.mean(
      [
          _balance_reference(tokens_of, False, weights, rows)[0]
          for rows in strategy_slices
      ]
  )
  per_replica_x = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(x[strategy_slices[ctx.replica_id_in_sync_group]])
  )
  for balance_over in ("replica", "global"):
    with strategy.scope():
      model, moe = _moe_only_model(False, balance_over)
    assign_named(moe, weights)
    label = f"MirroredStrategy x4 balance_over={balance_over}"
    try:
      aux = _strategy_aux(strategy, model, per_replica_x)
    except ValueError as e:
      message = str(e)
      assert balance_over == "global", message
      line = [l for l in message.splitlines() if "balance_over=" in l]
      assert line and "one tf.distribute replica per process" in line[0], e
      print(f"ok {label}: {line[0].strip()}")
      continue
    assert balance_over == "replica", label
    check_close(f"{label} loss vs numpy", aux, want)


BEGIN = "=== begin scenario "
END = "=== end scenario "


def scenario_several(*names):
  """Runs the named scenarios one after another in this process.

  They share one start-up (imports, devices). Each one's output is framed
  by lines `BEGIN name` and `END name: ok`, or `END name: failed` after
  its traceback; a failing scenario does not stop the ones after it.
  `dist_testlib.run_scenarios` reads the frames.

  Args:
    *names: scenarios of one backend and one device split (not the
      multi-worker ones, which start processes of their own).
  """
  for name in names:
    print(f"{BEGIN}{name}", flush=True)
    try:
      SCENARIOS[name]()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stdout)
      print(f"{END}{name}: failed", flush=True)
    else:
      print(f"{END}{name}: ok", flush=True)


SCENARIOS = {
    "sharded_layer": scenario_sharded_layer,
    "sharded_options": scenario_sharded_options,
    "train_step": scenario_train_step,
    "hier_mesh": scenario_hier_mesh,
    "reshard": scenario_reshard,
    "step_device": scenario_step_device,
    "multi_worker": scenario_multi_worker,
    "worker": scenario_worker,
    "jax_mesh": scenario_jax_mesh,
    "jax_hier_mesh": scenario_jax_hier_mesh,
    "global_balance": scenario_global_balance,
    "piece_squares_mesh": scenario_piece_squares_mesh,
    "jax_piece_squares_mesh": scenario_jax_piece_squares_mesh,
    "several": scenario_several,
}

if __name__ == "__main__":
  SCENARIOS[sys.argv[1]](*sys.argv[2:])
