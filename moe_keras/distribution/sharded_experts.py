"""Expert weights sharded over devices, tokens sent to them (TensorFlow).

Paper section 3: each expert exists once, on one device, and receives the
tokens routed to it. Importing this module installs `TensorFlowPlacement` as
the layers' expert placement (`moe_keras.layers.expert_placement`), so
`MoEBase` calls `maybe_build` when it creates its experts. With
`expert_devices=[d_0, ..., d_{E-1}]` on the layer, or inside a
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

A hierarchical MoE (appendix B) places each secondary MoE whole: block e
also holds the secondary gates of its a/E groups (`w_gate_secondary_block{e}`,
`w_noise_secondary_block{e}`, [a/E, d, b]), and `call_hierarchical` sends a
token's row once per selected group to the group's device, where the
secondary gate, the experts and the secondary combine run; only the
combined group output comes back (k_primary rows per token, not k).

Balancing losses with balance_over="global" (`MoEBase`): inside
`global_balance_scope` (opened by `MeshDataParallel` around its in-graph
replicas) each replica's call hands its Importance/Load sums to a
`GlobalBalance`, which adds them up over the replicas, all-reduces them
across the replicas of a tf.distribute strategy (the hosts), and has the
layer add the global batch's CV^2 losses once. A layer called directly
under a strategy all-reduces its sums itself (`cross_replica_sum`).

Checkpoints do not depend on the layout: `save_own_variables` writes exactly
what the unsharded layer writes (the full [n, d, h] arrays at the same
indices), and `load_own_variables` splits them for any number of blocks.
"""

import contextlib
import threading
import types

from absl import logging
import keras
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope

from moe_keras.layers import backend_ops
from moe_keras.layers import dispatch
from moe_keras.layers import expert_placement
from moe_keras.layers import gating as gating_lib
from moe_keras.layers import sparse_moe
from moe_keras.layers import variable_groups

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
    _STATE.balances = []
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


def cross_replica_sum(sums):
  """Sums tensors over the replicas of the current tf.distribute strategy.

  In a replica context of a strategy with several replicas in sync (e.g.
  MirroredStrategy, or MultiWorkerMirroredStrategy's one replica per host),
  one batched `ReplicaContext.all_reduce(SUM)`, whose gradient is the
  all-reduced sum of the replicas' upstream gradients. Elsewhere (no
  strategy, one replica, cross-replica context, not TensorFlow) `sums`.

  Args:
    sums: dict {name: tensor}, the same names and shapes in every replica.

  Returns:
    dict {name: tensor} with the same names.

  Raises:
    ValueError: the strategy runs several replicas in this process (e.g.
      MirroredStrategy over local devices). Their threads share every
      layer's `add_loss` list, and a replica that resumes after the
      all-reduce would read the other replicas' losses as well (measured:
      1.5x the loss with 2 replicas). One replica per process (the in-graph
      mesh, MultiWorkerMirroredStrategy with one replica per host) is what
      `make_distribution` builds.
  """
  if keras.backend.backend() != "tensorflow":
    return sums
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if (
      not tf.distribute.has_strategy()
      or tf.distribute.in_cross_replica_context()
  ):
    return sums
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return sums
  local = len(getattr(context.strategy.extended, "worker_devices", ())) or 1
  if local > 1:
    raise ValueError(
        "balance_over='global' needs one tf.distribute replica per process;"
        f" this strategy runs {local} here (their threads share the layers'"
        " add_loss lists): use make_distribution's in-graph mesh for the"
        " devices of one host"
    )
  names = sorted(sums)
  reduced = context.all_reduce(
      tf.distribute.ReduceOp.SUM, [sums[name] for name in names]
  )
  return dict(zip(names, reduced))


class GlobalBalance:
  """Balancing sums of one in-graph step, per replica and MoE layer call.

  Each replica runs the same program, so the j-th balance_over="global"
  call of every replica is the same layer on another slice of the batch.
  `finish` adds those calls' sums up (on the current device), all-reduces
  them across tf.distribute replicas (`cross_replica_sum`, one collective
  for all calls), and has each layer add the global batch's balancing
  losses (`MoEBase.add_global_balancing_losses`) once, unscaled: they are
  the step's, not one replica's share.
  """

  def __init__(self):
    self._replicas = []
    self._collecting = False

  @contextlib.contextmanager
  def replica(self):
    """The calls inside are one replica's (its sums are collected)."""
    self._replicas.append([])
    self._collecting = True
    try:
      yield
    finally:
      self._collecting = False

  @property
  def collecting(self):
    return self._collecting

  def add(self, layer, sums):
    """Keeps one call's sums (inside `replica`)."""
    self._replicas[-1].append((layer, sums))

  def finish(self):
    """Adds each call's global balancing losses; clears what it kept.

    Raises:
      RuntimeError: the replicas made different balance_over="global"
        calls (different layers or numbers of calls).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    replicas, self._replicas = self._replicas, []
    if not replicas or not replicas[0]:
      return
    first = replicas[0]
    for calls in replicas[1:]:
      if [id(layer) for layer, _ in calls] != [id(layer) for layer, _ in first]:
        raise RuntimeError(
            "balance_over='global': the in-graph replicas called different"
            " MoE layers"
        )
    totals = {}
    for j, (_, sums) in enumerate(first):
      for name in sums:
        totals[f"{j}/{name}"] = tf.add_n(
            [calls[j][1][name] for calls in replicas]
        )
    totals = cross_replica_sum(totals)
    for j, (layer, sums) in enumerate(first):
      layer.add_global_balancing_losses(
          {name: totals[f"{j}/{name}"] for name in sums}
      )


@contextlib.contextmanager
def global_balance_scope():
  """Collects the balancing sums of in-graph replicas (see GlobalBalance).

  Yields:
    The GlobalBalance; run each replica inside its `replica()` and call
    `finish()` after the last one.
  """
  state = _stack()
  balance = GlobalBalance()
  state.balances.append(balance)
  try:
    yield balance
  finally:
    state.balances.pop()


def global_balance_sums(layer, sums):
  """`TensorFlowPlacement.global_balance_sums` (see ExpertPlacement).

  Inside a replica of a `global_balance_scope`: keeps `sums` there and
  returns None. Otherwise the sums all-reduced over the replicas of the
  current tf.distribute strategy (`cross_replica_sum`; unchanged without
  one).

  Raises:
    RuntimeError: inside a `replica_scope` of several replicas but outside
      a `global_balance_scope` (the other replicas' sums are not visible).
  """
  state = _stack()
  if state.balances and state.balances[-1].collecting:
    state.balances[-1].add(layer, sums)
    return None
  if current_replica()[1] > 1:
    raise RuntimeError(
        f"{layer.name}: balance_over='global' in a replica_scope needs a"
        " global_balance_scope around the replicas"
    )
  return cross_replica_sum(sums)


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
      shape = [shards.num_blocks * weight.shape[0]] + list(weight.shape[1:])
      signature.append([path, shape])
  return signature


def will_shard(layer):
  """Whether `maybe_build(layer, ...)` will place `layer`'s experts.

  A hierarchical layer asks this before creating its secondary gates,
  which `ShardedExperts` then creates per group on the group's device.

  Args:
    layer: an MoEBase being built.

  Returns:
    bool: the layer has expert devices or a `placement_scope` is active.
  """
  return layer.expert_devices is not None or current_placement() is not None


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


class TensorFlowPlacement(expert_placement.ExpertPlacement):
  """The layers' expert placement: blocks on devices (installed on import).

  Shards a layer that names `expert_devices` or is built inside a
  `placement_scope`; other layers keep their single-device experts. Every
  MoE balancing loss is divided by the replicas of a `replica_scope`;
  balance_over="global" sums are added up over the replicas of a
  `global_balance_scope` and all-reduced across tf.distribute replicas.
  """

  def will_shard(self, layer):
    return will_shard(layer)

  def build_experts(self, layer, input_dim):
    return maybe_build(layer, input_dim)

  def scale_loss(self, loss):
    return scale_replica_loss(loss)

  def global_balance_sums(self, layer, sums):
    return global_balance_sums(layer, sums)


expert_placement.install(TensorFlowPlacement())


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
    self.groups_per_block = (n // group) // num_blocks
    # (name, block shape, initializer, add_weight kwargs), in the order the
    # unsharded layer creates these variables.
    shapes = []
    if group > 1:
      # A hierarchical layer's secondary gates [a, d, b] (float32, zeros)
      # live with their group's experts: the whole secondary MoE of a group
      # is on one device (appendix B).
      gate_kwargs = {"dtype": "float32", "autocast": False}
      gate_shape = (self.groups_per_block, input_dim, group)
      shapes += [
          ("w_gate_secondary", gate_shape, "zeros", gate_kwargs),
          ("w_noise_secondary", gate_shape, "zeros", gate_kwargs),
      ]
    extra = layer._expert_weight_kwargs()  # pylint: disable=protected-access
    shapes += [
        ("expert_kernel_1", (m, input_dim, h), layer.kernel_initializer, extra),
        ("expert_kernel_2", (m, h, out_dim), layer.kernel_initializer, extra),
    ]
    if layer.use_bias:
      shapes += [
          ("expert_bias_1", (m, h), layer.bias_initializer, extra),
          ("expert_bias_2", (m, out_dim), layer.bias_initializer, extra),
      ]
    # name -> list of E block variables; creation order = unsharded order.
    self.blocks = {}
    self._block_of = {}
    for name, shape, initializer, kwargs in shapes:
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
              **kwargs,
          )
        self.blocks[name].append(var)
        self._block_of[id(var)] = (name, e)
        _BLOCKS[id(var)] = (var, self, name, e)
        _BLOCKS[id(var.value)] = (var.value, self, name, e)
    for name in ("expert_bias_1", "expert_bias_2"):
      if name not in self.blocks:
        setattr(layer, name, None)
    # The devices the blocks' variables report (not the requested ones), so
    # a log shows where each block really is (e.g. on which TF server).
    placed = []
    for e in range(num_blocks):
      block_devices = {str(vs[e].value.device) for vs in self.blocks.values()}
      placed.append("+".join(sorted(block_devices)))
    logging.info(
        "%s: %d experts in %d blocks on %s",
        layer.name,
        n,
        num_blocks,
        ", ".join(placed),
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
    dtype = self.layer.expert_compute_dtype
    recompute = self.layer.recompute_expert_activations
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
                lambda r, *w, bp=block_plan: _block_ffn(bp, r, *w, recompute),
                pieces[e],
                *weights,
            )
        )
    out = tf.concat(outs, axis=0)
    if plan.capacity is None:
      out = tf.pad(out, [[0, padding], [0, 0]])
    return out

  def call_hierarchical(self, inputs, training, mask, return_stats, noise):
    """`HierarchicalSparseMoE.call` with the paper's placement (appendix B).

    The primary gate runs here, in the calling replica. Each token's row
    goes, once per selected group, to the device of that group's block;
    there the group's secondary gate picks k_secondary of its b experts
    (eqs. 3-5 with the group's W_g, W_noise), the experts run, and their
    outputs are combined with the secondary gates. Only the combined group
    output [d_out] per row comes back, and the primary gates combine those
    (eq. 12 as sum_i G_p(x)_i (sum_j G_i(x)_j E_ij(x))). Per block, the
    device also returns its [groups, b] importance, load and counts (eqs.
    13-14). Same values, losses and gradients as the unsharded layer.

    Args:
      inputs: [..., d].
      training: bool.
      mask: optional bool [...].
      return_stats: also return the statistics dict.
      noise: None or (primary [N, a], secondary [N, a, b]) standard normal.

    Returns:
      [..., d_out] (and the stats dict), as `MoEBase.call`.

    Raises:
      ValueError: bad input rank or mask, or a capacity_factor with a
        dynamic number of tokens.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    layer = self.layer
    training = bool(training)
    a, b = layer.num_groups, layer.experts_per_group
    kp = layer.k_primary
    num_blocks, g = self.num_blocks, self.groups_per_block
    tokens, valid, leading = sparse_moe.flatten_tokens(layer.name, inputs, mask)
    tokens = ops.cast(tokens, layer.compute_dtype)
    primary_noise, secondary_noise = (None, None) if noise is None else noise
    # Primary gate, eqs. (3)-(5) over the a groups (data-parallel).
    gates_p, groups, load_primary = layer._primary_gate(  # pylint: disable=protected-access
        ops.cast(tokens, "float32"), valid, training, primary_noise
    )

    # Rows sorted by group: block e owns one contiguous run of them.
    group_plan = dispatch.RoutingPlan(groups, num_experts=a)
    rows = group_plan.dispatch(tokens)  # [N*kp, d], compute dtype
    row_gate = ops.take(
        ops.concatenate([ops.reshape(gates_p, [-1]), ops.zeros((1,))]),
        group_plan.row_assignment,
    )  # [N*kp], G_primary(x)_i of each row
    row_noise = None
    if training and secondary_noise is not None:
      picked = ops.take_along_axis(
          ops.cast(secondary_noise, "float32"),
          ops.minimum(groups, a - 1)[:, :, None],
          axis=1,
      )  # [N, kp, b]
      row_noise = backend_ops.take_rows_or_zeros(
          ops.reshape(picked, (-1, b)), group_plan.row_assignment
      )
    capacity = max_rows = None
    if layer.capacity_factor is not None:
      num_tokens = tokens.shape[0]
      if not isinstance(num_tokens, int):
        raise ValueError(
            "capacity_factor needs a static number of tokens; got a dynamic"
            " batch shape."
        )
      capacity = dispatch.capacity_for(
          num_tokens * kp * layer.k_secondary, a * b, layer.capacity_factor
      )
      max_rows = min(num_tokens * kp, num_tokens * g)

    sizes = tf.reshape(group_plan.group_sizes, [num_blocks, g])
    block_rows = tf.reduce_sum(sizes, axis=1)
    total = tf.reduce_sum(block_rows)
    split = lambda t: tf.split(t[:total], block_rows, num=num_blocks, axis=0)
    row_pieces, gate_pieces = split(rows), split(row_gate)
    noise_pieces = (
        [None] * num_blocks if row_noise is None else split(row_noise)
    )
    row, _ = current_replica()
    run_devices = self.placement.row_devices[
        min(row, len(self.placement.row_devices) - 1)
    ]
    names = (
        "w_gate_secondary",
        "w_noise_secondary",
        "expert_kernel_1",
        "expert_kernel_2",
        "expert_bias_1",
        "expert_bias_2",
    )
    results = []
    for e in range(num_blocks):
      with tf.device(run_devices[e]):
        weights = [
            None
            if n not in self.blocks
            else ops.cast(
                self.blocks[n][e],
                "float32" if n.startswith("w_") else layer.expert_compute_dtype,
            )
            for n in names
        ]
        block_noise = noise_pieces[e]
        if training and block_noise is None:
          block_noise = gating_lib.standard_normal(
              (block_rows[e], b), seed=layer.seed_generator
          )
        fn = lambda r, gate, *w, s=sizes[e], z=block_noise: _secondary_moe(
            layer, training, capacity, max_rows, s, z, r, gate, *w
        )
        results.append(
            _on_device(
                run_devices[e], fn, row_pieces[e], gate_pieces[e], *weights
            )
        )
    group_out, importance, load_secondary, counts, dropped = (
        list(t) for t in zip(*results)
    )
    out = tf.concat(group_out, axis=0)
    out = tf.pad(out, [[0, tf.shape(rows)[0] - total], [0, 0]])
    combined = group_plan.combine(out, gates_p)  # [N, d_out], eq. (12)
    outputs = ops.reshape(
        ops.cast(combined, layer.compute_dtype),
        tuple(leading) + (combined.shape[-1],),
    )
    load_h = load_sums = None
    if training:
      load_sums = {
          "load_primary": load_primary,
          "load_secondary": tf.concat(load_secondary, axis=0),
          "group_sizes": ops.cast(group_plan.token_counts, "float32"),
      }
      load_h = gating_lib.hierarchical_load(**load_sums)  # eq. (14)
    routing = {
        "importance": tf.concat(importance, axis=0),  # eq. (13)
        "load": load_h,
        "load_is_smooth": load_h is not None,
        "load_sums": load_sums,
        "extra_stats": {
            "importance_primary": gating_lib.importance(gates_p, groups, a),
            "group_counts": ops.cast(group_plan.token_counts, "float32"),
        },
    }
    # What `_statistics` reads of a RoutingPlan, over the a*b experts.
    expert_counts = types.SimpleNamespace(
        token_counts=tf.concat(counts, axis=0), num_dropped=tf.add_n(dropped)
    )
    stats = layer._statistics(routing, expert_counts, training)  # pylint: disable=protected-access
    if training:
      layer._add_training_losses(routing, stats)  # pylint: disable=protected-access
    if not in_stateless_scope():
      for name, tracker in layer._stat_trackers.items():  # pylint: disable=protected-access
        tracker.update_state(stats[name])
    if return_stats:
      return outputs, stats
    return outputs

  # -- checkpoints ----------------------------------------------------------

  def _checkpoint_entries(self):
    """Own variables in the unsharded order; a block group is one entry."""
    layer = self.layer

    def group_of(var):
      key = self._block_of.get(id(var))
      if key is None:
        return None
      return (variable_groups.CONCAT, self.blocks[key[0]])

    return variable_groups.entries(
        layer._trainable_variables + layer._non_trainable_variables,  # pylint: disable=protected-access
        group_of,
    )

  def save_own_variables(self, store):
    variable_groups.save(self._checkpoint_entries(), store)

  def load_own_variables(self, store):
    variable_groups.load(self._checkpoint_entries(), store, self.layer.name)

  def full_value(self, name):
    """numpy [n, ...] of a block group (e.g. "expert_kernel_1")."""
    return variable_groups.entry_value(
        variable_groups.Entry(variable_groups.CONCAT, self.blocks[name])
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

    def grad(*d_out):
      with tf.device(device):
        if not isinstance(out, (list, tuple)):
          return tape.gradient(out, tensors, output_gradients=d_out[0])
        # Several outputs: integer-valued statistics have no gradient.
        pairs = [
            (o, tf.zeros_like(o) if d is None else d)
            for o, d in zip(out, d_out)
            if o.dtype.is_floating
        ]
        return tape.gradient(
            [o for o, _ in pairs],
            tensors,
            output_gradients=[d for _, d in pairs],
        )

    return out, grad

  return wrapped(*[args[i] for i in present])


def _block_ffn(
    block_plan, rows, kernel_1, kernel_2, bias_1, bias_2, recompute=False
):
  return dispatch.expert_ffn(
      block_plan, rows, kernel_1, kernel_2, bias_1, bias_2, recompute
  )


def _secondary_moe(
    layer,
    training,
    capacity,
    max_rows,
    group_sizes,
    noise,
    rows,
    row_gate,
    w_gate,
    w_noise,
    kernel_1,
    kernel_2,
    bias_1,
    bias_2,
):
  """The secondary MoEs of one block of groups, run on the block's device.

  Args:
    layer: the HierarchicalSparseMoE.
    training: python bool (noise and load only in training).
    capacity: None (dropless) or the unsharded layer's per-expert capacity.
    max_rows: with a capacity, a static bound on the block's rows.
    group_sizes: int32 [g], rows per group of the block.
    noise: float32 [R, b] standard normal (training), else None.
    rows: [R, d] the block's rows sorted by group, compute dtype.
    row_gate: float32 [R], G_primary(x)_i of each row.
    w_gate, w_noise: float32 [g, d, b], the block's secondary gates.
    kernel_1: [g*b, d, h]; kernel_2: [g*b, h, d_out]; bias_1 [g*b, h] and
      bias_2 [g*b, d_out] or None.

  Returns:
    [group_out float32 [R, d_out] = sum_j G_i(x)_j E_ij(x),
     importance float32 [g*b] (eq. 13), load_secondary float32 [g, b]
     (Load_i(X^(i)) of eq. 14; zeros outside training), token_counts
     float32 [g*b], num_dropped float32 scalar].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_groups, _, b = w_gate.shape
  ks = layer.k_secondary
  x = ops.cast(rows, "float32")
  gate_plan = _BlockPlan(None, None, group_sizes)
  row_group = tf.repeat(tf.range(num_groups, dtype="int32"), group_sizes)
  load_secondary = tf.zeros((num_groups, b), "float32")
  if training:
    both = dispatch.grouped_linear(
        gate_plan, x, tf.concat([w_gate, w_noise], axis=2)
    )  # [R, 2b]: x . W_i and x . W_noise_i in one grouped matmul
    gates, experts, probs = gating_lib.noisy_top_k(
        both[:, :b],
        both[:, b:],
        noise,
        ks,
        layer.noise_epsilon,
        layer.noise_scale,
    )  # eqs. (3)-(5), (8)-(9)
    load_secondary = ops.segment_sum(probs, row_group, num_segments=num_groups)
  else:
    clean = dispatch.grouped_linear(gate_plan, x, w_gate)  # [R, b]
    gates, experts = gating_lib.top_k_gates(clean, ks)  # [R, ks]
  num_experts = num_groups * b
  expert_ids = row_group[:, None] * b + experts
  importance = gating_lib.importance(
      row_gate[:, None] * gates, expert_ids, num_experts
  )
  expert_rows = ops.cast(rows, layer.expert_compute_dtype)
  num_rows = tf.shape(rows)[0]
  if capacity is None:
    plan = dispatch.RoutingPlan(expert_ids, num_experts=num_experts)
  else:
    # Static shapes for the capacity layout: pad (here, on this device)
    # to max_rows with unrouted rows. A factor that gives exactly the
    # unsharded capacity; rows of one expert keep their token order, so
    # the same assignments are dropped.
    pad = max_rows - num_rows
    expert_ids = tf.pad(
        expert_ids, [[0, pad], [0, 0]], constant_values=num_experts
    )
    expert_ids = tf.ensure_shape(expert_ids, (max_rows, ks))
    expert_rows = tf.ensure_shape(
        tf.pad(expert_rows, [[0, pad], [0, 0]]), (max_rows, rows.shape[-1])
    )
    gates = tf.pad(gates, [[0, pad], [0, 0]])
    factor = (capacity - 0.5) * num_experts / (max_rows * ks)
    assert dispatch.capacity_for(max_rows * ks, num_experts, factor) == capacity
    plan = dispatch.RoutingPlan(
        expert_ids, num_experts=num_experts, capacity_factor=factor
    )
  out = dispatch.expert_ffn(
      plan,
      plan.dispatch(expert_rows),
      kernel_1,
      kernel_2,
      bias_1,
      bias_2,
      recompute=layer.recompute_expert_activations,
  )
  group_out = plan.combine(out, gates)[:num_rows]  # float32 [R, d_out]
  return [
      group_out,
      importance,
      load_secondary,
      ops.cast(plan.token_counts, "float32"),
      ops.cast(plan.num_dropped, "float32"),
  ]
