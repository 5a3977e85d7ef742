"""Expert weights sharded over devices, tokens sent to them (TensorFlow).

Paper section 3: each expert exists once, on one device, and receives the
tokens routed to it. `MoEBase` calls `maybe_build` when it creates its
experts. With `expert_devices=[d_0, ..., d_{E-1}]` on the layer, or inside a
`placement_scope` (what `moe_keras.distribution.make_distribution` opens),
the stacked kernels [n, ...] are split into E contiguous blocks of n / E
experts, block e a separate variable created on d_e. Otherwise the layer
keeps its single-device variables and code path.

The forward pass (`ShardedExperts.run`) keeps the layer's routing plan: the
rows are already sorted by expert, so block e owns one contiguous run of
rows. That run is sent to block e's device, the block's experts run there
(`dispatch.expert_ffn`, dropless or capacity), and the outputs come back to
the calling replica's device, where `RoutingPlan.combine` applies the gates.
Gradients follow the same path backwards: each block's weight gradients are
computed on, and stay on, the block's device.

Checkpoints do not depend on the layout: `save_own_variables` writes exactly
what the unsharded layer writes (the full [n, d, h] arrays at the same
indices), and `load_own_variables` splits them for any number of blocks.
"""

import contextlib
import threading

from absl import logging
import keras
import numpy as np
from keras import ops

_STATE = threading.local()
# id(block variable) -> (variable, ShardedExperts, group name, block index),
# so optimizers can save their slots of the blocks as unsharded arrays.
_BLOCKS = {}


def block_of(variable):
  """(ShardedExperts, group name, block index) of a block variable, or None.

  Args:
    variable: a keras.Variable or the tf.Variable inside one.
  """
  entry = _BLOCKS.get(id(variable))
  if entry is None or entry[0] is not variable:
    return None
  return entry[1:]


class _BlockPlan:
  """The part of a RoutingPlan that `dispatch.expert_ffn` reads, per block."""

  def __init__(self, capacity, num_rows, group_sizes):
    self.capacity = capacity
    self.num_rows = num_rows
    self.group_sizes = group_sizes


class Placement:
  """Where expert blocks live and where they run, per batch row.

  Attributes:
    expert_devices: E devices holding the E blocks (the variables).
    row_devices: per batch row b, the E devices that run the blocks for the
      replicas of row b (row 0: the holders themselves).
  """

  def __init__(self, expert_devices, row_devices=None):
    self.expert_devices = list(expert_devices)
    self.row_devices = [list(r) for r in row_devices or [expert_devices]]


def _stack():
  if not hasattr(_STATE, "placements"):
    _STATE.placements = []
    _STATE.replicas = []
  return _STATE


@contextlib.contextmanager
def placement_scope(placement):
  """MoE layers built inside shard their experts as `placement` says."""
  state = _stack()
  state.placements.append(placement)
  try:
    yield placement
  finally:
    state.placements.pop()


def current_placement():
  state = _stack()
  return state.placements[-1] if state.placements else None


@contextlib.contextmanager
def replica_scope(row, num_replicas):
  """Marks calls made by one of `num_replicas` data-parallel replicas.

  Inside, sharded MoE layers send their rows to the devices of batch row
  `row`, and every MoE balancing loss is divided by `num_replicas` (the
  replicas' losses are summed by Keras; this makes their sum the mean, as
  MirroredStrategy's loss scaling does).
  """
  state = _stack()
  state.replicas.append((row, num_replicas))
  try:
    yield
  finally:
    state.replicas.pop()


def current_replica():
  """(row, num_replicas) of the innermost replica_scope, or (0, 1)."""
  state = _stack()
  return state.replicas[-1] if state.replicas else (0, 1)


def scale_replica_loss(total):
  """Divides an MoE loss by the number of replicas (identity outside)."""
  _, num_replicas = current_replica()
  if num_replicas == 1:
    return total
  return total / float(num_replicas)


def logical_weight_signature(model):
  """[[path, shape], ...] of model.weights as the unsharded model has them.

  Blocks of one expert group count as one [n, ...] weight at the place and
  path (`.../expert_kernel_1`) of the unsharded variable, so the signature
  (e.g. a checkpoint's architecture check) is the same on every mesh.
  """
  signature = []
  for weight in model.weights:
    found = block_of(weight)
    if found is None:
      signature.append([weight.path, list(weight.shape)])
      continue
    shards, _, block = found
    if block == 0:
      path = weight.path[: -len("_block0")]
      shape = [shards.layer.num_experts] + list(weight.shape[1:])
      signature.append([path, shape])
  return signature


def maybe_build(layer, input_dim):
  """Creates `layer`'s experts as blocks on devices, or returns None.

  Args:
    layer: an MoEBase being built.
    input_dim: d.

  Returns:
    ShardedExperts, or None when the layer has no expert devices (explicit
    or from `placement_scope`): then the layer builds its usual variables.

  Raises:
    ValueError: not TensorFlow, or experts (hierarchical: groups) not
      divisible by the number of devices.
  """
  placement = None
  if layer.expert_devices is not None:
    placement = Placement(layer.expert_devices)
  else:
    placement = current_placement()
  if placement is None:
    return None
  if keras.backend.backend() != "tensorflow":
    raise ValueError(
        f"{layer.name}: expert_devices places experts on TensorFlow only;"
        " on JAX use moe_keras.distribution.make_distribution (a"
        " keras.distribution LayoutMap)"
    )
  return ShardedExperts(layer, input_dim, placement)


class ShardedExperts:
  """The expert variables of one MoE layer, in E blocks on E devices."""

  def __init__(self, layer, input_dim, placement):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    self.layer = layer
    self.placement = placement
    devices = placement.expert_devices
    num_blocks = len(devices)
    n, h = layer.num_experts, layer.expert_hidden_dim
    group = getattr(layer, "experts_per_group", 1)
    if num_blocks < 1 or n % (group * num_blocks):
      what = (
          f"num_experts={n}"
          if group == 1
          else f"num_groups={n // group} (groups stay on one device)"
      )
      raise ValueError(
          f"{layer.name}: {what} is not divisible by the {num_blocks}"
          " expert devices"
      )
    self.num_blocks = num_blocks
    self.per_block = n // num_blocks
    out_dim = layer.output_dim or input_dim
    m = self.per_block
    shapes = [
        ("expert_kernel_1", (m, input_dim, h), layer.kernel_initializer),
        ("expert_kernel_2", (m, h, out_dim), layer.kernel_initializer),
    ]
    if layer.use_bias:
      shapes += [
          ("expert_bias_1", (m, h), layer.bias_initializer),
          ("expert_bias_2", (m, out_dim), layer.bias_initializer),
      ]
    # name -> list of E block variables; creation order = unsharded order.
    self.blocks = {}
    self._block_of = {}
    for name, shape, initializer in shapes:
      self.blocks[name] = []
      for e, device in enumerate(devices):
        with tf.device(device), _strategy_placement(device):
          var = layer.add_weight(
              name=f"{name}_block{e}",
              shape=shape,
              initializer=initializer,
              regularizer=(
                  layer.kernel_regularizer if "kernel" in name else None
              ),
          )
        self.blocks[name].append(var)
        self._block_of[id(var)] = (name, e)
        _BLOCKS[id(var)] = (var, self, name, e)
        _BLOCKS[id(var.value)] = (var.value, self, name, e)
    for name in ("expert_bias_1", "expert_bias_2"):
      if name not in self.blocks:
        setattr(layer, name, None)
    logging.info(
        "%s: %d experts in %d blocks on %s",
        layer.name,
        n,
        num_blocks,
        ", ".join(devices),
    )

  # -- forward --------------------------------------------------------------

  def run(self, plan, rows):
    """Sends each block's rows to its device, runs it, brings them back.

    Args:
      plan: the layer's RoutingPlan (rows sorted by expert).
      rows: [R, d] from `plan.dispatch`.

    Returns:
      [R, d_out] on the caller's device, equal to the unsharded
      `dispatch.expert_ffn(plan, rows, ...)`.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    num_blocks, m = self.num_blocks, self.per_block
    row, _ = current_replica()
    run_devices = self.placement.row_devices[
        min(row, len(self.placement.row_devices) - 1)
    ]
    sizes = tf.reshape(plan.group_sizes, [num_blocks, m])
    if plan.capacity is None:
      block_rows = tf.reduce_sum(sizes, axis=1)
      total = tf.reduce_sum(block_rows)
      pieces = tf.split(rows[:total], block_rows, num=num_blocks, axis=0)
      padding = tf.shape(rows)[0] - total
    else:
      pieces = tf.split(rows, num_blocks, axis=0)
    dtype = self.layer.compute_dtype
    outs = []
    for e in range(num_blocks):
      with tf.device(run_devices[e]):
        weights = [
            None
            if name not in self.blocks
            else ops.cast(self.blocks[name][e], dtype)
            for name in (
                "expert_kernel_1",
                "expert_kernel_2",
                "expert_bias_1",
                "expert_bias_2",
            )
        ]
        block_plan = _BlockPlan(
            plan.capacity,
            None if plan.capacity is None else m * plan.capacity,
            sizes[e],
        )
        outs.append(
            _on_device(
                run_devices[e],
                lambda r, *w, bp=block_plan: _block_ffn(bp, r, *w),
                pieces[e],
                *weights,
            )
        )
    out = tf.concat(outs, axis=0)
    if plan.capacity is None:
      out = tf.pad(out, [[0, padding], [0, 0]])
    return out

  # -- checkpoints ----------------------------------------------------------

  def _logical_variables(self):
    """Own variables in the unsharded order; a block group is one entry."""
    layer = self.layer
    seen = set()
    entries = []
    for var in layer._trainable_variables + layer._non_trainable_variables:  # pylint: disable=protected-access
      key = self._block_of.get(id(var))
      if key is None:
        entries.append(("var", var))
      elif key[0] not in seen:
        seen.add(key[0])
        entries.append(("blocks", self.blocks[key[0]]))
    return entries

  def save_own_variables(self, store):
    for i, (kind, value) in enumerate(self._logical_variables()):
      if kind == "var":
        store[f"{i}"] = value
      else:
        store[f"{i}"] = np.concatenate(
            [ops.convert_to_numpy(v) for v in value], axis=0
        )

  def load_own_variables(self, store):
    entries = self._logical_variables()
    if len(store.keys()) != len(entries):
      raise ValueError(
          f"{self.layer.name}: the checkpoint has {len(store.keys())}"
          f" variables for this layer, expected {len(entries)}"
      )
    for i, (kind, value) in enumerate(entries):
      if kind == "var":
        value.assign(store[f"{i}"])
      else:
        full = np.asarray(store[f"{i}"])
        for var, part in zip(value, np.split(full, self.num_blocks, axis=0)):
          var.assign(part)

  def full_value(self, name):
    """numpy [n, ...] of a block group (e.g. "expert_kernel_1")."""
    return np.concatenate(
        [ops.convert_to_numpy(v) for v in self.blocks[name]], axis=0
    )


class _DeviceSet:
  """Stands for a variable on `device` in `colocate_vars_with` (below)."""

  def __init__(self, strategy, device):
    self._distribute_strategy = strategy
    self._devices = (device,)


def _strategy_placement(device):
  """Under a (MultiWorker)MirroredStrategy: create variables on `device`.

  Mirrored strategies put every variable on their replica devices and
  ignore `tf.device`. Their variable creator takes the devices of a
  `colocate_with` variable instead; `_DeviceSet` provides `(device,)`, so
  the block is a mirrored variable with its one copy on `device` (its Adam
  slots follow it, and MultiWorkerMirroredStrategy still all-reduces its
  gradient across hosts). Other strategies: no-op.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not tf.distribute.has_strategy():
    return contextlib.nullcontext()
  strategy = tf.distribute.get_strategy()
  if not isinstance(
      strategy,
      (
          tf.distribute.MirroredStrategy,
          tf.distribute.MultiWorkerMirroredStrategy,
      ),
  ):
    return contextlib.nullcontext()

  # What `strategy.extended.colocate_vars_with` installs, without its check
  # that the argument is a DistributedVariable.
  def creator(next_creator, **kwargs):
    kwargs["use_resource"] = True
    kwargs["colocate_with"] = _DeviceSet(strategy, device)
    return next_creator(**kwargs)

  return tf.variable_creator_scope(creator)


def _on_device(device, fn, *args):
  """fn(*args) with its forward and its backward pass on `device` (TF).

  Ops under `tf.device` are placed there, but the gradient ops that
  GradientTape adds later are not: without this they would run on the
  default device and pull every block's activations there. None args pass
  through.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  present = [i for i, a in enumerate(args) if a is not None]

  def call(tensors):
    full = list(args)
    for i, t in zip(present, tensors):
      full[i] = t
    return fn(*full)

  @tf.custom_gradient
  def wrapped(*tensors):
    with tf.device(device):
      with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = call(tensors)

    def grad(d_out):
      with tf.device(device):
        return tape.gradient(out, tensors, output_gradients=d_out)

    return out, grad

  return wrapped(*[args[i] for i in present])


def _block_ffn(block_plan, rows, kernel_1, kernel_2, bias_1, bias_2):
  from moe_keras.layers import dispatch  # pylint: disable=g-import-not-at-top

  return dispatch.expert_ffn(
      block_plan, rows, kernel_1, kernel_2, bias_1, bias_2
  )
