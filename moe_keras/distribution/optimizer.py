"""Optimizer state and updates on the device of their variable (TF).

Keras 3's TF optimizer colocates a slot with its variable through
`strategy.extended.colocate_vars_with`, which is a device scope only when
the slot is created eagerly. `model.fit` creates the slots while tracing
the train step, where that colocation does not reach the (lifted) variable
creation: every Adam moment then lands on the default device, and each step
copies every expert's gradient and moments across devices. Measured here
with Keras 3.15.1: all slots on CPU:0 after `fit` on an 8-device mesh.

`colocate_slots(optimizer)` fixes both the slot placement and the update
ops (placed with `tf.device(variable.device)`), for any Keras optimizer.
"""

import keras

_CLASS_CACHE = {}


class ColocateSlotsMixin:
  """Creates every slot, and runs every update, on its variable's device."""

  def add_variable_from_reference(
      self, reference_variable, name=None, initializer="zeros"
  ):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    device = _device_of(reference_variable)
    with tf.init_scope(), tf.device(device):
      return super().add_variable_from_reference(
          reference_variable, name=name, initializer=initializer
      )

  def update_step(self, gradient, variable, learning_rate):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    with tf.device(_device_of(variable)):
      return super().update_step(gradient, variable, learning_rate)


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
