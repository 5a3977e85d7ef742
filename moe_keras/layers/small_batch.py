"""Eq. (1) at small batch sizes: per-token gathers instead of a routing plan.

The sparse dispatch of `moe_keras.layers.dispatch` sorts the N*K assignments,
splits them per expert and runs two matmuls per expert: a fixed cost of
several ops per expert that dominates when only a few dozen tokens are routed
(one step of decoding: batch x beam tokens). For such steps:

  * A = N*K' assignments <= n, K' = the most slots a token routes
    (`gathered_ffn`, after `dispatch.compact_slots` keeps only those K'
    slots; batchwise gating gives [N, n] slots of which about k are
    routed): every assignment gathers its expert's weights and one batched
    matmul per layer runs them; weight traffic A*d*h, below the n*d*h of
    reading every expert once.
  * A <= SMALL_BATCH_MAX_ASSIGNMENTS (`padded_output`, TensorFlow): the
    rows are scattered into one [n, C, d] buffer, C = this step's largest
    expert count (not rounded), and each layer is one batched matmul over
    all experts: a constant number of ops (about 40), whatever n. The
    (expert, token) pairs come from `tf.where` on the [n, N] routing mask,
    already expert-major, so nothing is sorted or compacted.

Both compute every routed assignment exactly (dropless, nothing dropped):
the same values and gradients as the sparse dispatch up to float rounding
(tests/layers/test_small_batch.py pins them to the dispatch path and to a
numpy reference). `moe_output` chooses by size; with a dynamic number of
tokens on TensorFlow (decoding) at inference the choice is made per step.
"""

from keras import ops

from moe_keras.layers import backend_ops
from moe_keras.layers import dispatch

# Most assignments (tokens x routed slots) a step may have to take the small
# path on TensorFlow; above it the routing plan's per-expert matmuls win
# (measured on a 2-core CPU, n=32, d=128, h=256: 20% less CPU time for the
# layer at 64 tokens x k=4, none at 256 x 4; BUILD.md "Speed where users
# meet it").
SMALL_BATCH_MAX_ASSIGNMENTS = 512


def token_counts(expert_ids, num_experts):
  """Assignments per expert, int32 [n]; unrouted slots are not counted."""
  flat = ops.reshape(expert_ids, [-1])
  return dispatch.assignment_counts(flat, num_experts)[:num_experts]


def _ffn(x, kernel_1, kernel_2, bias_1, bias_2, equation_1, equation_2):
  hidden = ops.einsum(equation_1, x, kernel_1)
  if bias_1 is not None:
    hidden = hidden + bias_1
  out = ops.einsum(equation_2, ops.relu(hidden), kernel_2)
  if bias_2 is not None:
    out = out + bias_2
  return out


def _take_dense_grad(weights, ids):
  """weights[ids] whose gradient is a dense [n, ...] tensor on TensorFlow.

  Autodiff of a TF gather gives IndexedSlices; the plan path's kernel
  gradients are dense, and optimizers must see the same kind either way.

  Args:
    weights: [n, ...].
    ids: int32 [N, K] in 0..n-1.

  Returns:
    [N, K, ...].
  """
  if backend_ops.backend_name() != "tensorflow":
    return ops.take(weights, ids, axis=0)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.custom_gradient
  def take(weights):
    def grad(d_out):
      return tf.math.unsorted_segment_sum(
          d_out, ids, num_segments=tf.shape(weights)[0]
      )

    return tf.gather(weights, ids), grad

  return take(weights)


def gathered_ffn(tokens, expert_ids, kernel_1, kernel_2, bias_1, bias_2):
  """E_e(x_t) of every slot with per-slot gathered weights.

  Args:
    tokens: [N, d].
    expert_ids: int32 [N, K] in 0..n (n: unrouted, computed with expert 0
      and to be masked by the caller).
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out].
    bias_1: None or [n, h]; bias_2: None or [n, d_out].

  Returns:
    [N, K, d_out].
  """
  num_experts = kernel_1.shape[0]
  ids = ops.where(ops.less(expert_ids, num_experts), expert_ids, 0)
  take = lambda w: None if w is None else _take_dense_grad(w, ids)
  return _ffn(
      tokens,
      take(kernel_1),
      take(kernel_2),
      take(bias_1),
      take(bias_2),
      "td,tkdh->tkh",
      "tkh,tkho->tko",
  )


def padded_output(
    tokens,
    expert_ids,
    gates,
    kernel_1,
    kernel_2,
    bias_1,
    bias_2,
    slots_are_experts=False,
):
  """Eq. (1) through one [n, C, d] buffer, without sorting (TensorFlow).

  The routed (expert, token) pairs are read off the [n, N] routing mask in
  expert-major order (`tf.where`), so a token's position in its expert's
  run is its index minus the expert's start: no argsort, no slot
  compaction. C = this step's largest expert count (not rounded: small
  steps pay for padding). Dropless: every routed assignment is computed.

  Args:
    tokens: [N, d].
    expert_ids: int32 [N, K] in 0..n (n: unrouted); a token routes to an
      expert at most once.
    gates: float32 [N, K].
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out].
    bias_1: None or [n, h]; bias_2: None or [n, d_out].
    slots_are_experts: python bool; K = n and slot i of every token is
      expert i or unrouted (the batchwise gating's layout): the routing mask
      is read off directly.

  Returns:
    [N, d_out] in gates.dtype, y_t = sum_i G(x_t)_i E_i(x_t).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_experts = kernel_1.shape[0]
  num_tokens = tf.shape(expert_ids)[0]
  if slots_are_experts:
    routed = tf.transpose(expert_ids < num_experts)  # [n, N]
  else:
    # assignment[i, t] = 1 + the flat slot (t*K + s) routing token t to
    # expert i, 0 if none; row n collects the unrouted slots, cut off.
    slot_token = tf.broadcast_to(
        tf.range(num_tokens)[:, None], tf.shape(expert_ids)
    )
    assignment = tf.scatter_nd(
        tf.stack([expert_ids, slot_token], axis=-1),
        tf.reshape(tf.range(1, tf.size(expert_ids) + 1), tf.shape(expert_ids)),
        tf.stack([num_experts + 1, num_tokens]),
    )[:num_experts]
    routed = assignment > 0  # [n, N]
  pairs = tf.cast(tf.where(routed), tf.int32)  # [A, 2] (expert, token)
  expert, token = pairs[:, 0], pairs[:, 1]
  counts = tf.reduce_sum(tf.cast(routed, tf.int32), axis=1)  # [n]
  capacity = tf.maximum(tf.reduce_max(counts), 1)
  position = tf.range(tf.shape(pairs)[0]) - tf.gather(
      tf.cumsum(counts, exclusive=True), expert
  )
  cell = tf.stack([expert, position], axis=1)
  buffer = tf.scatter_nd(
      cell,
      tf.gather(tokens, token),
      tf.stack([num_experts, capacity, tokens.shape[-1]]),
  )
  bias = lambda b: None if b is None else b[:, None, :]
  out = _ffn(
      buffer,
      kernel_1,
      kernel_2,
      bias(bias_1),
      bias(bias_2),
      "ecd,edh->ech",
      "ech,eho->eco",
  )
  if slots_are_experts:
    row_gates = tf.gather_nd(gates, tf.stack([token, expert], axis=1))
  else:
    row_gates = tf.gather(
        tf.reshape(gates, [-1]), tf.gather_nd(assignment, pairs) - 1
    )
  return tf.math.unsorted_segment_sum(
      tf.cast(tf.gather_nd(out, cell), gates.dtype) * row_gates[:, None],
      token,
      tf.shape(tokens)[0],
  )


def combine_slots(slot_outputs, expert_ids, gates, num_experts):
  """y_t = sum_s gates[t, s] E(x_t)[s] over routed slots, eq. (1).

  Args:
    slot_outputs: [N, K, d_out].
    expert_ids: int32 [N, K].
    gates: float32 [N, K].
    num_experts: python int n.

  Returns:
    [N, d_out] in slot_outputs.dtype promoted with gates.dtype.
  """
  routed_gates = ops.where(
      ops.less(expert_ids, num_experts), gates, ops.zeros_like(gates)
  )
  return ops.sum(
      ops.cast(slot_outputs, gates.dtype) * routed_gates[:, :, None], axis=1
  )


def moe_output(
    tokens,
    expert_ids,
    gates,
    kernel_1,
    kernel_2,
    bias_1=None,
    bias_2=None,
    slots_are_experts=False,
):
  """Eq. (1) for a small step, without a routing plan.

  Args:
    tokens: [N, d] in the experts' compute dtype.
    expert_ids: int32 [N, K]; n = unrouted.
    gates: float32 [N, K].
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out].
    bias_1: None or [n, h]; bias_2: None or [n, d_out].
    slots_are_experts: python bool, see `padded_output`.

  Returns:
    [N, d_out] float32 (gates' dtype) y_t = sum_i G(x_t)_i E_i(x_t).
  """
  num_experts = kernel_1.shape[0]
  weights = (kernel_1, kernel_2, bias_1, bias_2)

  def gathered():
    ids, slot_gates = dispatch.compact_slots(expert_ids, gates, num_experts)
    slot_out = gathered_ffn(tokens, ids, *weights)
    return combine_slots(slot_out, ids, slot_gates, num_experts)

  if backend_ops.backend_name() != "tensorflow":
    return gathered()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Gathered weights when the compacted slots (N * the most any token
  # routes) fit in n, else the buffer.
  widest = tf.reduce_max(
      tf.reduce_sum(tf.cast(expert_ids < num_experts, tf.int32), axis=1)
  )
  return tf.cond(
      tf.shape(expert_ids)[0] * tf.maximum(widest, 1) <= num_experts,
      gathered,
      lambda: padded_output(
          tokens,
          expert_ids,
          gates,
          *weights,
          slots_are_experts=slots_are_experts,
      ),
  )


def default_limit(num_experts):
  """Largest tokens*k of a small step by default on this backend.

  Args:
    num_experts: python int n.

  Returns:
    python int: SMALL_BATCH_MAX_ASSIGNMENTS on TensorFlow; n elsewhere
    (JAX: only the gathered path, whose shapes are static).
  """
  if backend_ops.backend_name() == "tensorflow":
    return SMALL_BATCH_MAX_ASSIGNMENTS
  return num_experts


def use_small_batch(num_tokens, k, limit, training):
  """Which path a step takes: True, False or a bool tensor (per step).

  Args:
    num_tokens: python int N, or a scalar tensor when the batch is dynamic.
    k: python int, experts per token the gate routes (on average for the
      batchwise gating at inference).
    limit: python int; steps with N*k <= limit are small (0: none).
    training: python bool.

  Returns:
    python bool when N is static; with a dynamic N on TensorFlow, a bool
    tensor at inference (decoding: chosen per step) and False in training
    (one path in the training graph).
  """
  if limit <= 0:
    return False
  if isinstance(num_tokens, int):
    return num_tokens * k <= limit
  if training or backend_ops.backend_name() != "tensorflow":
    return False
  return ops.less_equal(num_tokens * k, limit)


class StepCounts:
  """What the statistics read of a routing plan, for the small path."""

  def __init__(self, token_counts_, num_dropped):
    self.token_counts = token_counts_
    self.num_dropped = num_dropped
