"""Optimizer state and updates on the device of their variable (TF).

Keras 3's TF optimizer colocates a slot with its variable through
`strategy.extended.colocate_vars_with`, which is a device scope only when
the slot is created eagerly. `model.fit` creates the slots while tracing
the train step, where that colocation does not reach the (lifted) variable
creation: every Adam moment then lands on the default device, and each step
copies every expert's gradient and moments across devices. Measured here
with Keras 3.15.1: all slots on CPU:0 after `fit` on an 8-device mesh.

`colocate_slots(optimizer)` fixes both the slot placement and the update
ops (placed with `tf.device(variable.device)`), for any Keras optimizer,
and skips Keras's all-reduce of the gradients when one replica is in sync
(an identity whose one op took every gradient to the step's device).
It also saves the slots of sharded expert blocks, and those of per-expert
variables (`expert_variables="per_expert"`), as the optimizer of stacked
single-device experts would (full [n, ...] arrays at the same indices), so
a checkpoint with optimizer state restores on any mesh and into either
expert layout. Experiments on TensorFlow compile every optimizer with it
(`moe_keras.experiment.build_task_and_model`).
"""

import warnings

import keras

from moe_keras.distribution import sharded_experts
from moe_keras.layers import sparse_moe
from moe_keras.layers import variable_groups

_CLASS_CACHE = {}


class _SlotIndex:
  """An untracked holder for the slot -> reference variable map."""

  def __init__(self):
    self.slots = {}


class ColocateSlotsMixin:
  """Creates every slot, and runs every update, on its variable's device."""

  def add_variable_from_reference(
      self, reference_variable, name=None, initializer="zeros"
  ):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    device = _device_of(reference_variable)
    with tf.init_scope(), tf.device(device):
      slot = super().add_variable_from_reference(
          reference_variable, name=name, initializer=initializer
      )
    self._slot_index()[id(slot)] = (slot, reference_variable, name)
    return slot

  def register_slot(self, slot, reference_variable, name):
    """Indexes a slot made without `add_variable_from_reference`.

    FactoredAdam's row and column second moments are made by
    `add_variable`; indexed, they are saved in the stacked layout too.

    Args:
      slot: the optimizer variable.
      reference_variable: the model variable it belongs to.
      name: the slot's name (its kind, e.g. "row_velocity").
    """
    self._slot_index()[id(slot)] = (slot, reference_variable, name)

  def _slot_index(self):
    """id(slot) -> (slot, reference variable, slot name)."""
    if not hasattr(self, "_moe_slots"):
      # Held by a plain object: a dict attribute would be tracked, and its
      # reference variables would become optimizer variables.
      self._moe_slots = _SlotIndex()
    return self._moe_slots.slots

  def _checkpoint_entries(self):
    """Optimizer variables in the order a stacked unsharded model's have.

    The slots of one expert group's E blocks are one entry (concatenated
    along the experts axis), and so are the slots of one expert weight's n
    per-expert variables (stacked), at the place of the first one's slot.

    Returns:
      list of variable_groups.Entry.
    """
    slots = self._slot_index()
    grouped = {}
    for slot, reference, name in slots.values():
      key = _group_key(reference, name)
      if key is not None:
        grouped[key] = slot

    def group_of(variable):
      entry = slots.get(id(variable))
      key = None if entry is None else _group_key(entry[1], entry[2])
      if key is None:
        return None
      how, group, name, _, count = key
      return (
          how,
          [grouped[(how, group, name, e, count)] for e in range(count)],
      )

    return variable_groups.entries(self.variables, group_of)

  def save_own_variables(self, store):
    """Saves grouped slots as full [n, ...] arrays (any layout)."""
    variable_groups.save(self._checkpoint_entries(), store)

  def load_own_variables(self, store):
    """Loads what save_own_variables (or a stacked unsharded model) wrote.

    Like Keras's optimizers, a store with another number of variables is
    skipped with a warning (the model's variables still load).

    Raises:
      ValueError: a variable of the store has another shape than its entry.
    """
    entries = self._checkpoint_entries()
    if variable_groups.counts_differ(entries, store):
      warnings.warn(
          f"Skipping variable loading for optimizer '{self.name}', because"
          f" it has {len(entries)} variables whereas the saved optimizer has"
          f" {len(store.keys())} variables.",
          stacklevel=2,
      )
      return
    variable_groups.load(entries, store, self.name)

  def update_step(self, gradient, variable, learning_rate):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    with tf.device(_device_of(variable)):
      return super().update_step(gradient, variable, learning_rate)

  def _all_reduce_sum_gradients(self, grads_and_vars):
    """Keras's all-reduce of the gradients, skipped for one replica.

    Keras all-reduces the gradients in every replica context, including
    the default strategy's single replica, where the sum is the gradient
    itself. That all-reduce is a custom gradient whose one IdentityN takes
    every gradient, on the current device: the step device. Each expert
    block's gradient then went to that device and back to the block's
    device for the update (on TF servers one block's bytes each way per
    step, measured with `benchmarks/distribution.py --part=tf_network`).

    Args:
      grads_and_vars: list of (gradient, variable) pairs.

    Returns:
      The pairs unchanged with one replica in sync, else Keras's result.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
      return list(grads_and_vars)
    return super()._all_reduce_sum_gradients(grads_and_vars)


def _group_key(reference, slot_name):
  """(how, group id, slot name, index, count) of a grouped slot, or None.

  Args:
    reference: the variable a slot was made for.
    slot_name: the slot's name ("momentum", ...).
  """
  found = sharded_experts.block_of(reference)
  if found is not None:
    shards, group, block = found
    return (
        variable_groups.CONCAT,
        (id(shards), group),
        slot_name,
        block,
        shards.num_blocks,
    )
  found = sparse_moe.expert_part_of(reference)
  if found is not None:
    parts, index = found
    return (variable_groups.STACK, id(parts), slot_name, index, len(parts))
  return None


def _device_of(variable):
  if isinstance(variable, keras.Variable):
    variable = variable.value
  return variable.device


def colocate_slots(optimizer):
  """Makes `optimizer` (in place) keep slots and updates by their variable.

  Args:
    optimizer: a Keras optimizer instance (TensorFlow backend), not built.

  Returns:
    the same optimizer, its class replaced by a subclass with
    ColocateSlotsMixin (config and serialization unchanged).

  Raises:
    ValueError: the optimizer has already created its slots.
  """
  if isinstance(optimizer, ColocateSlotsMixin):
    return optimizer
  if keras.backend.backend() != "tensorflow":
    return optimizer
  if optimizer.built:
    raise ValueError(
        "colocate_slots needs an optimizer that has not created its slots"
        " yet (call it before fit / optimizer.build)"
    )
  cls = type(optimizer)
  if cls not in _CLASS_CACHE:
    _CLASS_CACHE[cls] = type(cls.__name__, (ColocateSlotsMixin, cls), {})
  optimizer.__class__ = _CLASS_CACHE[cls]
  return optimizer
