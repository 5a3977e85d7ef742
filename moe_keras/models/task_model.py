"""Training logs that keep the task loss apart from the auxiliary losses.

Keras logs the sum of the compiled loss and of every `add_loss` term as
`loss`. With MoE layers that sum mixes the task loss (masked mean NLL for an
LM, token NLL for translation) with the balancing losses, so it is not
comparable with a dense model's. A model built on `TaskLossMixin` still
minimizes the same sum, but logs (and reports in `evaluate`):

  loss                  the compiled (task) loss alone;
  moe_importance_loss   w_importance CV(Importance)^2, eqs. (6)-(7);
  moe_load_loss         w_load CV(Load)^2, eqs. (10)-(11);
  moe_batchwise_loss    w_batchwise L_batchwise, eq. (20);
  other_aux_loss        weight regularizers (only when a weight has one);
  total_loss            what the optimizer minimizes (Keras's `loss`).

Each `moe_*` entry is summed over the model's MoE layers and appears only
when a layer adds that loss (`MoEBase.aux_loss_names`); all are 0 outside
training (the layers add them in training only). A loss that some other
layer adds with `add_loss` counts in `total_loss` only, or in
`other_aux_loss` when that entry exists.
"""

import keras
from keras import ops
from keras.src.losses import loss as loss_module
from keras.src.utils import tracking

TASK_LOSS = "loss"
TOTAL_LOSS = "total_loss"
OTHER_AUX_LOSS = "other_aux_loss"


def _moe_layers(model):
  """The layers of `model` with `aux_loss_names` and `aux_loss_parts` (MoE)."""
  return [
      layer
      for layer in model._flatten_layers()  # pylint: disable=protected-access
      if hasattr(layer, "aux_loss_parts")
  ]


def aux_loss_names(model):
  """The named auxiliary losses `model` logs, in AUX_LOSS_NAMES order."""
  # Not at the top: moe_keras.layers imports moe_keras.distribution, whose
  # MeshDataParallel uses TaskLossMixin.
  from moe_keras.layers import gating  # pylint: disable=g-import-not-at-top

  declared = set()
  for layer in _moe_layers(model):
    declared.update(layer.aux_loss_names)
  names = [name for name in gating.AUX_LOSS_NAMES if name in declared]
  if any(w.regularizer is not None for w in model.trainable_weights):
    names.append(OTHER_AUX_LOSS)
  return names


def split_aux_losses(model, losses):
  """Sums `losses` (from `model.losses`) by name.

  Args:
    model: the model whose MoE layers added (some of) `losses`.
    losses: list of scalar tensors.

  Returns:
    dict {name: scalar}: the parts of each MoE loss under their
    AUX_LOSS_NAMES, every other loss under OTHER_AUX_LOSS; names without a
    loss are absent.
  """
  parts_of = {}
  for layer in _moe_layers(model):
    for added, parts in layer.aux_loss_parts():
      parts_of[id(added)] = parts  # `added` is alive: the id is its own.
  sums = {}

  def add(name, value):
    value = ops.cast(value, "float32")
    sums[name] = value if name not in sums else sums[name] + value

  for loss in losses:
    parts = parts_of.get(id(loss))
    if parts is None:
      add(OTHER_AUX_LOSS, ops.sum(loss))
    else:
      for name, value in parts.items():
        add(name, value)
  return sums


class TaskLossMixin:
  """Logs `loss` = the compiled loss; see the module docstring.

  Mix into a `keras.Model` subclass before `keras.Model`. The optimizer
  still minimizes the compiled loss plus all `model.losses`.
  """

  @tracking.no_automatic_dependency_tracking
  def compile(self, *args, **kwargs):
    super().compile(*args, **kwargs)
    # Keras's tracker of the minimized sum, renamed.
    self._loss_tracker = keras.metrics.Mean(name=TOTAL_LOSS)
    self._named_loss_trackers = {
        name: keras.metrics.Mean(name=name)
        for name in [TASK_LOSS] + aux_loss_names(self)
    }

  @property
  def metrics(self):
    metrics = super().metrics
    trackers = getattr(self, "_named_loss_trackers", None)
    if not self.compiled or not trackers:
      return metrics
    return list(trackers.values()) + metrics

  def _logged_batch_size(self, x):
    """The rows of x's first tensor (weights the logged means), or None."""
    inputs = [t for t in keras.tree.flatten(x) if t is not None]
    return ops.shape(inputs[0])[0] if inputs else None

  def compute_loss(
      self, x=None, y=None, y_pred=None, sample_weight=None, training=True
  ):
    """Compiled loss + `self.losses` (as Keras), logging each by name.

    Args:
      x: input data (the batch size weights the logged means, as in Keras).
      y: targets.
      y_pred: model outputs.
      sample_weight: passed to the compiled loss.
      training: unused (the layers add their losses in training only).

    Returns:
      Scalar float tensor, the loss to minimize.
    """
    del training
    task = None
    if self._compile_loss is not None:
      task = self._compile_loss(y, y_pred, sample_weight)
    extra = self.losses
    if task is None and not extra:
      return super().compute_loss(x, y, y_pred, sample_weight)
    terms = [] if task is None else [task]
    terms += [self._aggregate_additional_loss(loss) for loss in extra]
    total = terms[0] if len(terms) == 1 else ops.sum(terms)
    trackers = getattr(self, "_named_loss_trackers", None)
    if trackers:
      values = split_aux_losses(self, extra)
      if task is not None:
        values[TASK_LOSS] = task
      batch = self._logged_batch_size(x)
      for name, tracker in trackers.items():
        value = values.get(name, ops.zeros((), "float32"))
        tracker.update_state(
            loss_module.unscale_loss_for_distribution(
                ops.cast(value, "float32")
            ),
            sample_weight=batch,
        )
    return total


@keras.saving.register_keras_serializable(package="moe_keras")
class TaskLossModel(TaskLossMixin, keras.Model):
  """A functional `keras.Model` whose logged `loss` is the task loss."""
