"""Sparse dispatch and combine: eq. (1) at a cost proportional to k, not n.

The gate of eq. (3) gives every token at most K (expert, gate) assignments;
eq. (1) sums G(x)_i E_i(x) over them. Evaluating E_i only on the tokens routed
to it (paper section 2: "E_i not evaluated when G(x)_i == 0") is done here:

  1. `RoutingPlan`: stable-sort the N*K assignments by expert id. This gives,
     for every expert, a contiguous run of rows in token order, and no
     [tokens, experts, capacity] one-hot tensor is ever built: every index
     tensor is of size N*K (or, with a capacity, n*C = capacity_factor*N*K).
  2. `dispatch`: gather the token rows into that expert-major layout.
  3. The experts run on their rows: one matmul per expert over exactly its
     rows (dropless, the paper's behaviour), or one batched einsum over a
     [n, C, d] buffer (fixed capacity C; static shapes for XLA/JAX), or
     one batched einsum over a [n, C, d] buffer padded to this step's
     largest expert, C = max_i count_i rounded up ("padded" dropless:
     nothing is dropped; a dynamic shape, TensorFlow only). Padded trades
     (C/mean - 1) of wasted rows for 2 einsums instead of 2n matmuls. On a
     2-core CPU it lost in the PTB training step even at 64 rows per
     expert (benchmarks/lm_training.py, README), so "grouped" is the
     default and "padded" an option for accelerators.
  4. `combine`: multiply each row by its gate and sum the rows back into
     their tokens, y = sum_i G(x)_i E_i(x): dropless, by gathering each
     assignment's row through the inverse of the sorting permutation and
     summing a token's K slots (on TensorFlow the gradients of that gather
     and of the dispatch gather are gathers too, not scatter-adds); with a
     capacity, by a segment sum over the rows.

Unrouted assignments (padding tokens, or gates that are exactly zero) carry
the sentinel expert id n: they sort last and are never computed. In capacity
mode, assignments past an expert's capacity are dropped in token order
("first come, first served") and counted.
"""

import math

from keras import ops

from moe_keras.layers import backend_ops

DISPATCH_MODES = ("grouped", "padded")
# Padded capacity C is the step's largest expert count rounded up to this.
PADDED_CAPACITY_MULTIPLE = 32


def capacity_for(num_assignments, num_experts, capacity_factor):
  """Static per-expert capacity C = ceil(capacity_factor * N*K / n).

  Args:
    num_assignments: python int N*K (static).
    num_experts: python int n.
    capacity_factor: python float > 0.

  Returns:
    python int >= 1.
  """
  return max(1, int(math.ceil(capacity_factor * num_assignments / num_experts)))


def assignment_counts(flat_expert_ids, num_experts):
  """Assignments per expert id, int32 [n + 1] (index n: unrouted sentinels).

  segment_sum keeps the length static under jax.jit, where bincount cannot.

  Args:
    flat_expert_ids: [A] int expert ids in [0, n], n marking unrouted slots.
    num_experts: python int n.

  Returns:
    int32 [n + 1].
  """
  return ops.cast(
      ops.segment_sum(
          ops.ones_like(flat_expert_ids),
          flat_expert_ids,
          num_segments=num_experts + 1,
      ),
      "int32",
  )


def compact_slots(expert_ids, gates, num_experts):
  """Routed slots first, and only as many slots as a token needs.

  Args:
    expert_ids: int32 [N, K]; num_experts marks an unrouted slot.
    gates: float32 [N, K].
    num_experts: python int n.

  Returns:
    (expert_ids [N, K'], gates [N, K']), K' = the largest number of routed
    slots of a token (at least 1); each token's routed slots keep their
    order. Backends without dynamic shapes (JAX) get the inputs back.
  """
  if backend_ops.backend_name() != "tensorflow" or expert_ids.shape[1] == 1:
    return expert_ids, gates
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  routed = tf.cast(tf.less(expert_ids, num_experts), tf.int32)
  widest = tf.maximum(tf.reduce_max(tf.reduce_sum(routed, axis=1)), 1)
  # Stable sort on "unrouted": routed slots first, in their order.
  order = tf.argsort(1 - routed, axis=1, stable=True)[:, :widest]
  return (
      tf.gather(expert_ids, order, batch_dims=1),
      tf.gather(gates, order, batch_dims=1),
  )


class RoutingPlan:
  """Expert-major layout of N*K token->expert assignments.

  Attributes:
    num_tokens: N (python int or scalar tensor).
    num_rows: rows of the expert-major layout (R): N*K dropless, n*C with a
      capacity.
    row_token: int32 [R], token of each row; N for empty rows.
    row_assignment: int32 [R], flat assignment index (token*K + slot) of each
      row; N*K for empty rows.
    group_sizes: int32 [n], rows per expert actually computed.
    token_counts: int32 [n], assignments routed to each expert before any
      capacity drop.
    num_dropped: int32 scalar, routed assignments dropped for capacity.
    capacity: None (grouped dropless), python int C (capacity mode) or an
      int32 scalar tensor C = max_i count_i (padded dropless).
  """

  def __init__(
      self,
      expert_ids,
      num_experts,
      capacity_factor=None,
      padded=False,
      capacity_multiple=PADDED_CAPACITY_MULTIPLE,
  ):
    """Builds the plan.

    Args:
      expert_ids: int32 [N, K]; entries equal to num_experts are unrouted.
      num_experts: python int n.
      capacity_factor: None (dropless) or python float; capacity mode needs a
        static N.
      padded: dropless with the [n, C, d] buffer layout of capacity mode,
        C = max_i count_i (a scalar tensor), so no assignment is dropped;
        needs a backend with dynamic shapes (TensorFlow). Ignored when
        `capacity_factor` is set.
      capacity_multiple: padded only: C is rounded up to a multiple of this
        (1: exactly the largest count).

    Raises:
      ValueError: capacity_factor with a dynamic number of tokens.
    """
    num_tokens = ops.shape(expert_ids)[0]
    slots = expert_ids.shape[1]
    if slots is None:  # compacted slots (`compact_slots`)
      slots = ops.shape(expert_ids)[1]
    flat = ops.reshape(expert_ids, [-1])
    num_assignments = ops.shape(flat)[0]
    self.num_experts = num_experts
    self.num_tokens = num_tokens
    self.num_assignments = num_assignments
    self.slots = slots
    self._assignment_rows_cache = None
    # Dropless grouped layout only: the sorting permutation (row r holds
    # assignment order[r]), its inverse (lazy) and which assignments are
    # routed, [N, K] bool; None otherwise.
    self._order = None
    self._inverse_cache = None
    self._routed = None

    order = backend_ops.stable_argsort(flat)  # [A], expert-major.
    sorted_experts = ops.take(flat, order)
    counts = assignment_counts(flat, num_experts)
    self.token_counts = counts[:num_experts]
    order = ops.cast(order, "int32")

    if capacity_factor is None and not padded:
      # Dropless: row r of the layout is sorted assignment r. Rows of
      # unrouted assignments (sentinel id) are at the end and are skipped by
      # the grouped matmul (group_sizes excludes them).
      self.capacity = None
      self._order = order
      self._routed = ops.reshape(
          ops.less(expert_ids, num_experts), (num_tokens, slots)
      )
      routed = ops.less(sorted_experts, num_experts)
      self.row_token = ops.where(
          routed, ops.floor_divide(order, slots), num_tokens
      )
      self.row_assignment = ops.where(routed, order, num_assignments)
      self.group_sizes = self.token_counts
      self.num_rows = num_assignments
      self.num_dropped = ops.zeros((), "int32")
      return

    if capacity_factor is None:
      # Padded dropless: the largest expert sets this step's capacity.
      # (rounded up, so that steps reuse a few buffer shapes: oneDNN builds
      # a batched-matmul kernel per new shape).
      largest = ops.maximum(ops.max(self.token_counts), 1)
      capacity = (
          (largest + capacity_multiple - 1)
          // capacity_multiple
          * capacity_multiple
      )
    else:
      if not isinstance(num_assignments, int):
        raise ValueError(
            "capacity_factor needs a static number of tokens; got a dynamic"
            " batch shape."
        )
      capacity = capacity_for(num_assignments, num_experts, capacity_factor)
    self.capacity = capacity
    # Position of each sorted assignment within its expert's run.
    starts = ops.cumsum(counts) - counts  # [n + 1]
    position = ops.arange(num_assignments, dtype="int32") - ops.take(
        starts, sorted_experts
    )
    keep = ops.logical_and(
        ops.less(position, capacity), ops.less(sorted_experts, num_experts)
    )
    num_slots = num_experts * capacity
    slot = ops.where(keep, sorted_experts * capacity + position, num_slots)
    # Invert slot -> sorted position with a scatter of unique indices (the
    # sentinel slot collects the drops and is cut off).
    source = ops.scatter(
        slot[:, None],
        ops.arange(1, num_assignments + 1, dtype="int32"),
        (num_slots + 1,),
    )[:num_slots]
    filled = ops.greater(source, 0)
    source_assignment = ops.take(
        ops.concatenate([ops.full((1,), num_assignments, "int32"), order]),
        ops.where(filled, source, 0),
    )
    self.row_assignment = ops.where(filled, source_assignment, num_assignments)
    self.row_token = ops.where(
        filled, ops.floor_divide(source_assignment, slots), num_tokens
    )
    self.group_sizes = ops.minimum(self.token_counts, capacity)
    self.num_rows = num_slots
    self.num_dropped = ops.sum(self.token_counts) - ops.sum(self.group_sizes)

  def dispatch(self, tokens):
    """Gathers token rows into the expert-major layout.

    Args:
      tokens: [N, d].

    Returns:
      [R, d]; dropless rows are expert-sorted, capacity rows are [n*C, d]
      (reshape to [n, C, d]); empty rows are zeros.
    """
    if self._order is not None:
      return backend_ops.gather_repeated_rows(
          tokens,
          self.row_token,
          self._inverse(),
          ops.cast(self._routed, tokens.dtype),
          self.slots,
      )
    return backend_ops.take_rows_or_zeros(tokens, self.row_token)

  def _inverse(self):
    """Dropless: row of each assignment, int32 [N*K] (built once)."""
    if self._inverse_cache is None:
      self._inverse_cache = backend_ops.invert_permutation(self._order)
    return self._inverse_cache

  def combine(self, rows, gates):
    """Weights expert outputs by their gates and sums them per token, eq. (1).

    Args:
      rows: [R, d_out] expert outputs in the layout order.
      gates: [N, K] gate values of the assignments (float32).

    Returns:
      [N, d_out] in rows.dtype promoted with gates.dtype:
      y_t = sum over assignments a of token t of gates_a * rows[row(a)].
    """
    if self._order is not None:
      # Dropless: the layout is a permutation of the N*K assignments, so
      # each assignment's row is gathered back (gradient: the inverse
      # gather) and the K slots of a token are summed, instead of a
      # segment sum over the rows (and its scatter in the gradient).
      picked = backend_ops.permute_rows(
          ops.cast(rows, gates.dtype), self._inverse(), self._order
      )
      picked = ops.reshape(
          picked, (self.num_tokens, self.slots, rows.shape[-1])
      )
      routed_gates = ops.where(self._routed, gates, ops.zeros_like(gates))
      return ops.sum(picked * routed_gates[:, :, None], axis=1)
    flat_gates = ops.concatenate(
        [ops.reshape(gates, [-1]), ops.zeros((1,), gates.dtype)]
    )
    row_gates = ops.take(flat_gates, self.row_assignment)
    weighted = ops.cast(rows, gates.dtype) * row_gates[:, None]
    summed = ops.segment_sum(
        weighted, self.row_token, num_segments=self.num_tokens + 1
    )
    return summed[: self.num_tokens]

  def _assignment_rows(self):
    """Row of each assignment, int32 [N*K]; R (one past the end) if none.

    The inverse of `row_assignment`, built once per plan and shared by every
    `gather_back` call (the hierarchical layer gathers twice per step).
    """
    if self._assignment_rows_cache is None and self._order is not None:
      self._assignment_rows_cache = ops.where(
          ops.reshape(self._routed, [-1]),
          self._inverse(),
          ops.shape(self.row_assignment)[0],
      )
    if self._assignment_rows_cache is None:
      inverse = ops.scatter(
          self.row_assignment[:, None],
          ops.arange(1, ops.shape(self.row_assignment)[0] + 1, dtype="int32"),
          (self.num_assignments + 1,),
      )[: self.num_assignments]
      self._assignment_rows_cache = ops.where(
          inverse > 0, inverse - 1, ops.shape(self.row_assignment)[0]
      )
    return self._assignment_rows_cache

  def gather_back(self, rows):
    """Returns each assignment's row, [N, K, ...] (zeros if not computed).

    Args:
      rows: [R, ...] in the layout order.

    Returns:
      [N, K, ...].
    """
    trailing = tuple(rows.shape[1:])
    padded = ops.concatenate(
        [rows, ops.zeros((1,) + trailing, rows.dtype)], axis=0
    )
    picked = ops.take(padded, self._assignment_rows(), axis=0)
    return ops.reshape(picked, (self.num_tokens, self.slots) + trailing)


def expert_ffn(
    plan,
    rows,
    kernel_1,
    kernel_2,
    bias_1=None,
    bias_2=None,
    recompute=False,
):
  """Runs every expert E_i(x) = ReLU(x W1_i + b1_i) W2_i + b2_i on its rows.

  Args:
    plan: RoutingPlan that produced `rows`.
    rows: [R, d] from `plan.dispatch`.
    kernel_1: [n, d, h]; kernel_2: [n, h, d_out]. Dropless, TensorFlow:
      also lists of n per-expert tensors (`backend_ops.grouped_ffn`).
    bias_1: optional [n, h]; bias_2: optional [n, d_out] (lists likewise).
    recompute: recompute the [R, h] hidden activations in the backward pass
      instead of keeping them from the forward pass (appendix D); same
      values and gradients.

  Returns:
    [R, d_out]; only the rows of routed assignments are computed
    (dropless), or the n*C buffer rows (capacity).
  """
  if plan.capacity is not None:
    num_experts = kernel_1.shape[0]
    capacity = plan.capacity

    def ffn(rows, kernel_1, kernel_2, bias_1, bias_2):
      buffer = ops.reshape(rows, (num_experts, capacity, rows.shape[-1]))
      hidden = ops.einsum("ecd,edh->ech", buffer, kernel_1)
      if bias_1 is not None:
        hidden = hidden + bias_1[:, None, :]
      hidden = ops.relu(hidden)
      out = ops.einsum("ech,eho->eco", hidden, kernel_2)
      if bias_2 is not None:
        out = out + bias_2[:, None, :]
      return ops.reshape(out, (num_experts * capacity, kernel_2.shape[-1]))

    if recompute:
      ffn = backend_ops.remat(ffn)
    return ffn(rows, kernel_1, kernel_2, bias_1, bias_2)
  return backend_ops.grouped_ffn(
      rows, plan.group_sizes, kernel_1, kernel_2, bias_1, bias_2, recompute
  )


def grouped_linear(plan, rows, kernel):
  """Per-group linear map rows[r] @ kernel[g(r)] (secondary gates, eq. 12).

  Args:
    plan: RoutingPlan that produced `rows`.
    rows: [R, d].
    kernel: [G, d, b].

  Returns:
    [R, b].
  """
  num_groups = kernel.shape[0]
  if plan.capacity is not None:
    buffer = ops.reshape(rows, (num_groups, plan.capacity, rows.shape[-1]))
    out = ops.einsum("gcd,gdb->gcb", buffer, kernel)
    return ops.reshape(out, (plan.num_rows, kernel.shape[-1]))
  return backend_ops.grouped_matmul(rows, kernel, plan.group_sizes)
