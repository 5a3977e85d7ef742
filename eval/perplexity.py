"""Per-word perplexity: exp(total NLL / number of target tokens).

The LM's model returns the exact per-token NLL in evaluation; perplexity is
exp of its weight-weighted mean over the whole split (not a mean of per-batch
perplexities). Every target token counts, including `</S>` (the 1B Word and
PTB conventions; PTB's 82,430 test targets are 78,669 words + 3,761 `</S>`).
"""

import math

import keras
import numpy as np


def masked_mean_nll(weights, nll):
  """Keras loss: sum(nll * weights) / max(sum(weights), 1).

  Args:
    weights: float [B, T] target weights (0 on padding); the `y` of the LM's
      batches.
    nll: float [B, T] per-token negative log-likelihood (the model output).

  Returns:
    scalar, the mean NLL per target token of the batch; under a
    tf.distribute strategy with R replicas (MultiWorkerMirroredStrategy),
    divided by R, so that the summed replica gradients and Keras's reported
    loss are those of the mean (Keras divides its own losses by R, but
    leaves a loss function's scalar result as it is).
  """
  weights = keras.ops.cast(weights, "float32")
  nll = keras.ops.cast(nll, "float32")
  mean = keras.ops.sum(nll * weights) / keras.ops.maximum(
      keras.ops.sum(weights), 1.0
  )
  if keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
      mean = mean / float(replicas)
  return mean


@keras.saving.register_keras_serializable(package="moe_keras")
class Perplexity(keras.metrics.Metric):
  """exp(sum of NLL / number of tokens) over everything seen since reset."""

  def __init__(self, name="perplexity", **kwargs):
    super().__init__(name=name, **kwargs)
    self.total_nll = self.add_variable((), initializer="zeros", name="nll")
    self.total_tokens = self.add_variable(
        (), initializer="zeros", name="tokens"
    )

  def nll_and_weights(self, y_true, y_pred):
    """(per-token NLL, weights) of a batch; the LM layout by default.

    The LM's `y` is the weights and its output the NLL; a task with another
    layout (translation packs targets and weights into `y`) overrides this.
    """
    return keras.ops.cast(y_pred, "float32"), keras.ops.cast(y_true, "float32")

  def update_state(self, y_true, y_pred, sample_weight=None):
    del sample_weight
    nll, weights = self.nll_and_weights(y_true, y_pred)
    self.total_nll.assign_add(keras.ops.sum(nll * weights))
    self.total_tokens.assign_add(keras.ops.sum(weights))

  def result(self):
    return keras.ops.exp(
        self.total_nll / keras.ops.maximum(self.total_tokens, 1.0)
    )


@keras.saving.register_keras_serializable(package="moe_keras")
class TokenCount(keras.metrics.Metric):
  """Number of target tokens seen since reset (words/s logging)."""

  def __init__(self, name="tokens", **kwargs):
    super().__init__(name=name, **kwargs)
    self.count = self.add_variable((), initializer="zeros", name="count")

  def weights(self, y_true):
    """Target weights of a batch (the LM's `y`); overridable like above."""
    return keras.ops.cast(y_true, "float32")

  def update_state(self, y_true, y_pred, sample_weight=None):
    del y_pred, sample_weight
    self.count.assign_add(keras.ops.sum(self.weights(y_true)))

  def result(self):
    # A copy, not the variable: JAX's abstract evaluation rejects variables,
    # and on TensorFlow convert_to_tensor hands back the variable itself, so
    # fit's epoch-end "tokens" read the validation count after validating.
    return keras.ops.copy(keras.ops.convert_to_tensor(self.count))


class PerplexityAccumulator:
  """Accumulates NLL and token counts over batches on the host (float64)."""

  def __init__(self):
    self.total_nll = 0.0
    self.tokens = 0.0

  def add(self, nll, weights):
    """Adds one batch: nll and weights float arrays [B, T]."""
    weights = np.asarray(weights, np.float64)
    self.total_nll += float(np.sum(np.asarray(nll, np.float64) * weights))
    self.tokens += float(np.sum(weights))

  @property
  def mean_nll(self):
    return self.total_nll / max(self.tokens, 1.0)

  @property
  def perplexity(self):
    return math.exp(self.mean_nll)
