"""Eq. (1) at small batch sizes: per-token gathers instead of a routing plan.

The sparse dispatch of `moe_keras.layers.dispatch` sorts the N*K assignments,
splits them per expert and runs two matmuls per expert: a fixed cost of
several ops per expert that dominates when only a few dozen tokens are routed
(one step of decoding: batch x beam tokens). For such steps:

  * `dispatch.compact_slots` (TensorFlow) keeps only the K' = max
    routed-per-token slots of the gate (batchwise gating gives [N, n] slots
    of which about k are routed).
  * A = N*K' assignments <= n (`gathered_ffn`): every assignment gathers its
    expert's weights and one batched matmul per layer runs them; weight
    traffic A*d*h, below the n*d*h of reading every expert once.
  * A <= SMALL_BATCH_MAX_ASSIGNMENTS (`padded_ffn`, TensorFlow): the rows are
    gathered into one [n, C, d] buffer, C = this step's largest expert
    count (not rounded), and each layer is one batched matmul over all
    experts: a constant number of ops, whatever n.

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


def padded_ffn(tokens, expert_ids, kernel_1, kernel_2, bias_1, bias_2):
  """E_e(x_t) of every slot through one [n, C, d] buffer (TensorFlow).

  The padded dropless `dispatch.RoutingPlan` with C = this step's largest
  expert count, not rounded up (small steps: the padding is the cost).

  Args:
    tokens: [N, d].
    expert_ids: int32 [N, K] in 0..n (n: unrouted; gives a zero row).
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out].
    bias_1: None or [n, h]; bias_2: None or [n, d_out].

  Returns:
    [N, K, d_out]; C = the largest expert count of this step (dynamic).
  """
  num_experts = kernel_1.shape[0]
  plan = dispatch.RoutingPlan(
      expert_ids, num_experts=num_experts, padded=True, capacity_multiple=1
  )
  buffer = ops.reshape(
      plan.dispatch(tokens), (num_experts, -1, tokens.shape[-1])
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
  return plan.gather_back(ops.reshape(out, (-1, kernel_2.shape[-1])))


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
    tokens, expert_ids, gates, kernel_1, kernel_2, bias_1=None, bias_2=None
):
  """Eq. (1) for a small step, without a routing plan.

  Args:
    tokens: [N, d] in the experts' compute dtype.
    expert_ids: int32 [N, K]; n = unrouted.
    gates: float32 [N, K].
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out].
    bias_1: None or [n, h]; bias_2: None or [n, d_out].

  Returns:
    [N, d_out] float32 (gates' dtype) y_t = sum_i G(x_t)_i E_i(x_t).
  """
  num_experts = kernel_1.shape[0]
  expert_ids, gates = dispatch.compact_slots(expert_ids, gates, num_experts)
  weights = (kernel_1, kernel_2, bias_1, bias_2)
  if backend_ops.backend_name() != "tensorflow":
    slot_out = gathered_ffn(tokens, expert_ids, *weights)
    return combine_slots(slot_out, expert_ids, gates, num_experts)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_assignments = tf.size(expert_ids)
  slot_out = tf.cond(
      num_assignments <= num_experts,
      lambda: gathered_ffn(tokens, expert_ids, *weights),
      lambda: padded_ffn(tokens, expert_ids, *weights),
  )
  return combine_slots(slot_out, expert_ids, gates, num_experts)


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
