"""Attention of the MoE translation models (appendix G).

Two score functions between a source vector x_i (encoder output) and a
target vector y_j (decoder query), with U [d_src, n], W [d_tgt, n], V [n]:

  (21) GNMT:       A(x_i, y_j) = sum_d V_d tanh((x_i U)_d + (y_j W)_d)
  (22) the paper:  A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d)

Eq. (22) factorises, so all [T, S] scores of a sequence pair are one matmul:
(tanh(Y W) * V) @ tanh(X U)^T. Eq. (21) needs a [T, S, n] tensor.

The weights are softmax(A) over the unmasked source positions and the context
is sum_i weight_i x_i. The attention size n is not stated in the paper; the
builders default it to the model width.
"""

import gin
import keras
from keras import ops

KINDS = ("factored", "additive")
# Added to the scores of masked source positions before the softmax.
MASK_VALUE = -1e9


def factored_scores(keys, queries):
  """Eq. (22) for all pairs, as one matmul.

  Args:
    keys: [B, S, n] = tanh(X U) * V (see `SourceAttention.precompute`).
    queries: [B, T, n] = tanh(Y W).

  Returns:
    [B, T, S] scores A(x_i, y_j).
  """
  return ops.matmul(queries, ops.transpose(keys, (0, 2, 1)))


def additive_scores(keys, queries, v):
  """Eq. (21), GNMT's additive attention.

  Args:
    keys: [B, S, n] = X U.
    queries: [B, T, n] = Y W.
    v: [n].

  Returns:
    [B, T, S] scores.
  """
  hidden = ops.tanh(keys[:, None, :, :] + queries[:, :, None, :])
  return ops.einsum("btsn,n->bts", hidden, v)


@keras.saving.register_keras_serializable(package="moe_keras")
class SourceAttention(keras.layers.Layer):
  """Attention over encoder outputs, eq. (22) (`kind="factored"`) or (21).

  Variables: `u` [d_src, n], `w` [d_tgt, n], `v` [n] (no biases: the
  equations have none).

  `precompute(memory)` computes the query-independent part once per source
  (the decoder calls it once per sentence, then `attend` every step);
  `call(queries, memory, memory_mask)` does both.
  """

  def __init__(self, units, kind="factored", **kwargs):
    super().__init__(**kwargs)
    if kind not in KINDS:
      raise ValueError(
          f"unknown attention kind {kind!r}; expected one of {KINDS}"
      )
    if not isinstance(units, int) or units < 1:
      raise ValueError(f"attention units must be an int >= 1, got {units!r}")
    self.units = units
    self.kind = kind

  def build(self, queries_shape, memory_shape=None):
    if memory_shape is None:
      memory_shape = queries_shape
    self.u = self.add_weight(
        name="u",
        shape=(memory_shape[-1], self.units),
        initializer="glorot_uniform",
    )
    self.w = self.add_weight(
        name="w",
        shape=(queries_shape[-1], self.units),
        initializer="glorot_uniform",
    )
    self.v = self.add_weight(
        name="v", shape=(self.units,), initializer="glorot_uniform"
    )

  def precompute(self, memory):
    """Query-independent keys.

    Args:
      memory: [B, S, d_src] encoder outputs.

    Returns:
      [B, S, n]: tanh(X U) * V for eq. (22), X U for eq. (21).
    """
    projected = ops.matmul(memory, ops.cast(self.u, memory.dtype))
    if self.kind == "factored":
      return ops.tanh(projected) * ops.cast(self.v, memory.dtype)
    return projected

  def attend(self, queries, keys, memory, memory_mask=None):
    """Context vectors and weights from precomputed keys.

    Args:
      queries: [B, T, d_tgt] or [B, d_tgt] (one decoding step).
      keys: [B, S, n] from `precompute(memory)`.
      memory: [B, S, d_src].
      memory_mask: optional bool [B, S], False at padding.

    Returns:
      (context [B, T, d_src] (or [B, d_src]), weights [B, T, S] (or [B, S])).
      A row whose source is all padding gets zero weights and context.
    """
    single = len(queries.shape) == 2
    if single:
      queries = queries[:, None, :]
    projected = ops.matmul(queries, ops.cast(self.w, queries.dtype))
    if self.kind == "factored":
      scores = factored_scores(keys, ops.tanh(projected))
    else:
      scores = additive_scores(keys, projected, ops.cast(self.v, keys.dtype))
    scores = ops.cast(scores, "float32")
    if memory_mask is not None:
      mask = ops.cast(memory_mask, "bool")[:, None, :]
      scores = ops.where(mask, scores, MASK_VALUE)
    weights = ops.softmax(scores, axis=-1)
    if memory_mask is not None:
      weights = weights * ops.cast(mask, "float32")
    weights = ops.cast(weights, memory.dtype)
    context = ops.matmul(weights, memory)
    if single:
      return context[:, 0, :], weights[:, 0, :]
    return context, weights

  def call(self, queries, memory, memory_mask=None, return_weights=False):
    """Attends from every query to the memory.

    Args:
      queries: [B, T, d_tgt] or [B, d_tgt].
      memory: [B, S, d_src].
      memory_mask: optional bool [B, S].
      return_weights: also return the attention weights.

    Returns:
      context [B, T, d_src] (and weights [B, T, S]).
    """
    context, weights = self.attend(
        queries, self.precompute(memory), memory, memory_mask
    )
    return (context, weights) if return_weights else context

  def compute_output_shape(self, queries_shape, memory_shape=None):
    return tuple(queries_shape[:-1]) + (memory_shape[-1],)

  def get_config(self):
    config = super().get_config()
    config.update({"units": self.units, "kind": self.kind})
    return config


gin.external_configurable(SourceAttention, module="moe_keras.models.attention")
