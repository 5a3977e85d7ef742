"""The few tensor ops that `keras.ops` lacks, one implementation per backend.

Everything else in `moe_keras.layers` is written with `keras.ops`. The
functions here exist because Keras's portable op is missing or weaker:

  * `stable_argsort`: `keras.ops.argsort` is not stable on TensorFlow; the
    sparse dispatch needs token order kept within each expert (capacity
    dropping is "first come, first served" and results must be deterministic).
  * `grouped_matmul`: one matmul per expert over a variable number of rows
    (dropless dispatch), where `keras.ops` only has fixed-shape einsum.
  * `remat`: recomputation in the backward pass (appendix D) without the
    weight copies of `tf.recompute_grad`.
  * `standard_normal`: eq. (4)'s noise; `keras.random.normal` is 2x slower
    on TensorFlow's CPU kernels than a Box-Muller transform of uniforms.
  * `noisy_top_k_load_tf`: the training gate and Load(X) (eqs. 3-5, 8-10)
    with a hand-written gradient, fewer passes over the [N, n] logits than
    autodiff of the per-equation `keras.ops` composition.
"""

import math

import keras
from keras import ops


def backend_name():
  return keras.backend.backend()


def stable_argsort(x):
  """Stable ascending argsort along the last axis.

  Args:
    x: numeric tensor [..., L].

  Returns:
    int32 tensor [..., L]; equal values keep their original order.
  """
  backend = backend_name()
  if backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.argsort(x, axis=-1, stable=True)
  if backend == "jax":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    return jnp.argsort(x, axis=-1, stable=True).astype("int32")
  # Generic fallback: numpy-like argsort of the backend is stable for torch
  # only with stable=True, which keras.ops does not expose; raise clearly.
  raise NotImplementedError(
      f"stable_argsort is not implemented for the {backend!r} backend;"
      " moe_keras supports the tensorflow and jax backends."
  )


def invert_permutation(perm):
  """inverse[perm[i]] = i for a permutation `perm` (int32 [L]) of 0..L-1."""
  if backend_name() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.math.invert_permutation(perm)
  length = ops.shape(perm)[0]
  return ops.scatter(
      perm[:, None], ops.arange(length, dtype="int32"), (length,)
  )


def permute_rows(x, perm, inverse):
  """x[perm] for a permutation `perm` of the rows of `x`.

  TensorFlow: the gradient is d[inverse], one gather, where autodiff of a
  gather scatter-adds (an UnsortedSegmentSum, ~3x the cost of the gather on
  a 2-core CPU). Other backends: `ops.take` and autodiff.

  Args:
    x: [L, ...].
    perm: int32 [L], a permutation of 0..L-1.
    inverse: int32 [L], `invert_permutation(perm)`.

  Returns:
    [L, ...].
  """
  if backend_name() != "tensorflow":
    return ops.take(x, perm, axis=0)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.custom_gradient
  def permute(x):
    def grad(d_out):
      return tf.gather(d_out, inverse)

    return tf.gather(x, perm), grad

  return permute(x)


def take_rows_or_zeros(tokens, row_token):
  """tokens[row_token], with row_token == N giving a zero row.

  Args:
    tokens: [N, d].
    row_token: int32 [R] in 0..N.

  Returns:
    [R, d].
  """
  padded = ops.concatenate(
      [tokens, ops.zeros((1, tokens.shape[-1]), tokens.dtype)], axis=0
  )
  return ops.take(padded, row_token, axis=0)


def gather_repeated_rows(tokens, row_token, inverse, routed, slots):
  """Rows tokens[row_token[r]] of a dropless expert-major layout.

  Row r is assignment perm[r] (token perm[r] // slots), perm being the sorted
  order of the N*slots assignments and `inverse` its inverse. Rows with
  row_token == N (unrouted) are zeros. Same values as gathering from tokens
  with a zero row appended; on TensorFlow the gradient is, per token, the
  sum over its `slots` assignments of d_rows[inverse[...]] masked by
  `routed` (one gather and a reduce over slots) instead of autodiff's
  UnsortedSegmentSum of the N*slots rows.

  Args:
    tokens: [N, d].
    row_token: int32 [N*slots], token of each row, N for unrouted rows.
    inverse: int32 [N*slots], row of each assignment.
    routed: [N, slots] in {0, 1}, tokens.dtype: whether each assignment has
      a row (row_token != N).
    slots: python int K.

  Returns:
    [N*slots, d].
  """
  if backend_name() != "tensorflow":
    return take_rows_or_zeros(tokens, row_token)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.custom_gradient
  def gather(tokens):
    def grad(d_rows):
      picked = tf.reshape(
          tf.gather(d_rows, inverse), [-1, slots, d_rows.shape[-1]]
      )
      return tf.reduce_sum(picked * routed[:, :, None], axis=1)

    return take_rows_or_zeros(tokens, row_token), grad

  return gather(tokens)


def grouped_matmul(rows, weights, group_sizes):
  """Per-group matmul over rows sorted by group (dropless dispatch).

  out[r] = rows[r] @ weights[g(r)], where rows are sorted by group g and
  group g owns `group_sizes[g]` consecutive rows. Rows past
  sum(group_sizes) give zeros. Compute is proportional to the number of rows,
  not to the number of groups times rows.

  Args:
    rows: [R, d] (R may be dynamic on TensorFlow).
    weights: [G, d, h].
    group_sizes: int32 [G].

  Returns:
    [R, h].
  """
  backend = backend_name()
  if backend == "tensorflow":
    return _grouped_matmul_tf(rows, weights, group_sizes)
  if backend == "jax":
    return _jax_grouped_matmul(rows, weights, group_sizes)
  raise NotImplementedError(
      f"dropless dispatch is not implemented for the {backend!r} backend;"
      " set capacity_factor."
  )


def _tf_split_rows(rows, group_sizes, num_groups):
  """TF: the routed rows (the first sum(group_sizes)) split per group.

  Returns:
    (list of num_groups [rows_g, d] tensors, scalar padding = R - total).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  padding = tf.shape(rows)[0] - tf.reduce_sum(group_sizes)
  # One Split with the unrouted rows as a last piece (dropped): no copy of
  # the routed rows by a slice first.
  sizes = tf.concat([group_sizes, padding[None]], axis=0)
  pieces = tf.split(rows, sizes, num=num_groups + 1, axis=0)
  return pieces[:num_groups], padding


def _tf_concat_rows(pieces, padding):
  """TF: inverse of `_tf_split_rows`; unrouted rows come back as zeros."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # The zero rows as a last piece of the one Concat (not a Pad after it).
  zeros = tf.zeros(
      tf.stack([padding, tf.shape(pieces[0])[1]]), dtype=pieces[0].dtype
  )
  return tf.concat(list(pieces) + [zeros], axis=0)


def _grouped_matmul_tf(rows, weights, group_sizes):
  """TensorFlow grouped matmul: split rows by group, one MatMul per group."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_groups = weights.shape[0]
  pieces, padding = _tf_split_rows(rows, group_sizes, num_groups)
  # Unpack along axis 0 aliases the weight buffer (no copy).
  per_group = tf.unstack(weights, num=num_groups, axis=0)
  outputs = [tf.matmul(p, w) for p, w in zip(pieces, per_group)]
  return _tf_concat_rows(outputs, padding)


def grouped_ffn(
    rows,
    group_sizes,
    kernel_1,
    kernel_2,
    bias_1=None,
    bias_2=None,
    recompute=False,
):
  """Per-group ReLU FFN over rows sorted by group (dropless dispatch).

  out[r] = ReLU(rows[r] @ kernel_1[g] + bias_1[g]) @ kernel_2[g] + bias_2[g]
  for the group g owning row r; rows past sum(group_sizes) give zeros.

  Args:
    rows: [R, d] sorted by group.
    group_sizes: int32 [G].
    kernel_1: [G, d, h]; kernel_2: [G, h, d_out]. TensorFlow also takes
      lists of G per-expert tensors ([d, h] and [h, d_out]; the layout of
      `expert_variables="per_expert"`), whose gradients are then the
      per-expert pieces themselves, never written into a stacked buffer.
    bias_1: optional [G, h]; bias_2: optional [G, d_out] (or lists of [h],
      [d_out] with list kernels).
    recompute: if True, the [R, h] hidden activations are not kept for the
      backward pass; the gradient recomputes them from `rows` (appendix D).

  Returns:
    [R, d_out].

  Raises:
    ValueError: list kernels on a backend other than TensorFlow.
  """
  backend = backend_name()
  if backend != "tensorflow" and isinstance(kernel_1, (list, tuple)):
    raise ValueError(
        "per-expert kernel lists are a TensorFlow layout; stack them for"
        f" the {backend!r} backend"
    )
  if backend == "tensorflow":
    return _grouped_ffn_tf(
        rows, group_sizes, kernel_1, kernel_2, bias_1, bias_2, recompute
    )
  if backend == "jax":
    fn = lambda r, k1, k2, b1, b2: _grouped_ffn_jax(
        r, group_sizes, k1, k2, b1, b2
    )
    if recompute:
      fn = remat(fn)
    return fn(rows, kernel_1, kernel_2, bias_1, bias_2)
  raise NotImplementedError(
      f"dropless dispatch is not implemented for the {backend!r} backend;"
      " set capacity_factor."
  )


def _grouped_ffn_tf(
    rows, group_sizes, kernel_1, kernel_2, bias_1, bias_2, recompute=False
):
  """TensorFlow: split the rows once, one MatMul pair per group, concat.

  Without biases a hand-written gradient is used: the same math as
  autodiff, arranged for TF's CPU MatMul: the input gradients are
  MatMul(transpose_b=True) on the per-expert kernel slices, with no
  Transpose op (autodiff's per-expert Transposes, or one batched Transpose
  of each [n, ., .] kernel, cost more; measured).
  With biases and `recompute`, autodiff runs inside `remat`.
  """
  if bias_1 is None and bias_2 is None:
    return _grouped_ffn_tf_no_bias(
        rows, group_sizes, kernel_1, kernel_2, recompute
    )
  if recompute:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # `remat` takes tensors: per-expert lists go in stacked (a copy of the
    # weights; the fast per-expert path is the bias-free one).
    stack = lambda v: tf.stack(v) if isinstance(v, (list, tuple)) else v
    fn = lambda r, k1, k2, b1, b2: _grouped_ffn_tf_bias(
        r, group_sizes, k1, k2, b1, b2
    )
    return remat(fn)(
        rows, stack(kernel_1), stack(kernel_2), stack(bias_1), stack(bias_2)
    )
  return _grouped_ffn_tf_bias(
      rows, group_sizes, kernel_1, kernel_2, bias_1, bias_2
  )


def _grouped_ffn_tf_bias(rows, group_sizes, kernel_1, kernel_2, bias_1, bias_2):
  """TF grouped FFN with biases; gradient by autodiff."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_groups = _num_groups(kernel_1)
  pieces, padding = _tf_split_rows(rows, group_sizes, num_groups)
  w1 = _tf_per_group(kernel_1, num_groups)
  w2 = _tf_per_group(kernel_2, num_groups)
  b1 = (
      [None] * num_groups
      if bias_1 is None
      else _tf_per_group(bias_1, num_groups)
  )
  b2 = (
      [None] * num_groups
      if bias_2 is None
      else _tf_per_group(bias_2, num_groups)
  )
  outputs = []
  for piece, w1_g, w2_g, b1_g, b2_g in zip(pieces, w1, w2, b1, b2):
    hidden = tf.matmul(piece, w1_g)
    if b1_g is not None:
      hidden = hidden + b1_g
    out = tf.matmul(tf.nn.relu(hidden), w2_g)
    if b2_g is not None:
      out = out + b2_g
    outputs.append(out)
  return _tf_concat_rows(outputs, padding)


def _grouped_ffn_tf_no_bias(
    rows, group_sizes, kernel_1, kernel_2, recompute=False
):
  """Bias-free TF grouped FFN with an explicit gradient (see caller).

  With `recompute`, the gradient closure holds no hidden activation: it
  recomputes ReLU(piece @ w1) per expert from the routed rows, made
  data-dependent on the incoming gradient so that the recomputation runs in
  the backward pass and cannot be merged with the forward MatMul by
  Grappler's common-subexpression elimination.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_groups = _num_groups(kernel_1)
  # Per-expert kernels (lists): every kernel is an input of its own, and its
  # gradient is its piece (no stacked [n, ., .] gradient is written).
  per_expert = isinstance(kernel_1, (list, tuple))

  @tf.custom_gradient
  def ffn(rows, *kernels):
    pieces, padding = _tf_split_rows(rows, group_sizes, num_groups)
    if per_expert:
      w1, w2 = list(kernels[:num_groups]), list(kernels[num_groups:])
    else:
      w1 = tf.unstack(kernels[0], num=num_groups, axis=0)
      w2 = tf.unstack(kernels[1], num=num_groups, axis=0)
    hiddens = [tf.nn.relu(tf.matmul(p, w)) for p, w in zip(pieces, w1)]
    outs = [tf.matmul(hid, w) for hid, w in zip(hiddens, w2)]
    out = _tf_concat_rows(outs, padding)
    # What the gradient closure may reference: the hiddens only without
    # recomputation (a closure cell would keep them alive in eager mode).
    saved = None if recompute else (pieces, hiddens)
    del pieces, hiddens, outs

    def grad(d_out):
      d_pieces, _ = _tf_split_rows(d_out, group_sizes, num_groups)
      if saved is None:
        pieces, _ = _tf_split_rows(
            _tf_after(rows, d_out), group_sizes, num_groups
        )
        hiddens = [None] * num_groups
      else:
        pieces, hiddens = saved
      # dy @ w^T as MatMul(transpose_b=True) on the unstacked (aliased)
      # kernels: cheaper than one batched Transpose of each [n, ., .] kernel
      # (measured: the Transposes cost ~15 ms per step at n=256, d=128,
      # h=256 on a 2-core CPU, more than oneDNN's transposed-B MatMuls).
      if saved is not None and not tf.executing_eagerly() and not per_expert:
        return _grouped_ffn_tf_grads_in_place(
            pieces, hiddens, d_pieces, w1, w2, padding
        )
      d_rows, d_hiddens, d_w2 = [], [], []
      for g, (hid, dy, w1_g, w2_g) in enumerate(zip(hiddens, d_pieces, w1, w2)):
        if hid is None:
          # Recompute expert g only after expert g-1's backward ran, so
          # that about one [rows_g, h] hidden is alive at a time.
          after = d_w2[-1:] if d_w2 else []
          with tf.control_dependencies(after):
            hid = tf.nn.relu(tf.matmul(pieces[g], w1_g))
        d_hidden, d_row = _tf_expert_input_grads(hid, dy, w1_g, w2_g)
        d_hiddens.append(d_hidden)
        d_rows.append(d_row)
        d_w2.append(tf.matmul(hid, dy, transpose_a=True))
      if per_expert:
        d_w1 = [
            tf.matmul(piece, d_hidden, transpose_a=True)
            for piece, d_hidden in zip(pieces, d_hiddens)
        ]
        return (_tf_concat_rows(d_rows, padding), *d_w1, *d_w2)
      d_w2 = tf.stack(d_w2)
      # The kernel_1 gradients start once the kernel_2 pieces are stacked
      # and freed: at most one set of n per-expert pieces is alive beside
      # its stacked copy (peak memory, see benchmarks/README.md).
      with tf.control_dependencies([d_w2]):
        d_w1 = [
            tf.matmul(piece, d_hidden, transpose_a=True)
            for piece, d_hidden in zip(pieces, d_hiddens)
        ]
      d_rows = _tf_concat_rows(d_rows, padding)
      return d_rows, tf.stack(d_w1), d_w2

    return out, grad

  if per_expert:
    return ffn(rows, *kernel_1, *kernel_2)
  return ffn(rows, kernel_1, kernel_2)


def _num_groups(weights):
  """G of stacked [G, ...] weights or of a list of G per-group tensors."""
  if isinstance(weights, (list, tuple)):
    return len(weights)
  return weights.shape[0]


def _tf_per_group(weights, num_groups):
  """TF: a list of G per-group tensors from a list or stacked [G, ...]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if isinstance(weights, (list, tuple)):
    return list(weights)
  return tf.unstack(weights, num=num_groups, axis=0)


# Weight-gradient pieces in flight while `_tf_stack_in_place` writes them.
IN_PLACE_STACK_LAG = 2


def _tf_stack_in_place(make_piece, num_pieces):
  """TF graph: [num_pieces, ...] from make_piece(i), written into one buffer.

  `tf.stack` of n pieces holds all n pieces and the stacked copy at once
  (twice the [n, d, h] gradient). Here each piece is written into an
  uninitialized buffer by `InplaceUpdate`, which reuses the buffer (its only
  consumer is the next update), and piece i is computed only once piece
  i - IN_PLACE_STACK_LAG is written: about one buffer plus a few pieces
  are alive. Graph mode only (eagerly the buffer has a second reference
  and every update would copy it).

  Args:
    make_piece: i -> tensor of one static shape and dtype.
    num_pieces: python int >= 1.

  Returns:
    The stacked tensor.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  buffer = None
  written = []
  for i in range(num_pieces):
    lagged = (
        written[-IN_PLACE_STACK_LAG:][:1] if i >= IN_PLACE_STACK_LAG else []
    )
    with tf.control_dependencies(lagged):
      piece = make_piece(i)
    if buffer is None:
      buffer = tf.raw_ops.Empty(
          shape=[num_pieces] + piece.shape.as_list(),
          dtype=piece.dtype,
          init=False,
      )
    buffer = tf.raw_ops.InplaceUpdate(x=buffer, i=[i], v=piece[None])
    written.append(buffer)
  return buffer


def _grouped_ffn_tf_grads_in_place(pieces, hiddens, d_pieces, w1, w2, padding):
  """Gradients of `_grouped_ffn_tf_no_bias` with in-place stacked kernels.

  The same math as its tf.stack version: d_hidden = ReluGrad(dy w2^T),
  d_rows = d_hidden w1^T, d_w2 = hidden^T dy, d_w1 = rows^T d_hidden per
  expert; the [n, ., .] kernel gradients are written piece by piece
  (`_tf_stack_in_place`), d_w1's only once d_w2 is complete.

  Returns:
    (d_rows [R, d], d_kernel_1 [n, d, h], d_kernel_2 [n, h, d_out]).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  d_hiddens, d_rows = [], []
  for hid, dy, w1_g, w2_g in zip(hiddens, d_pieces, w1, w2):
    d_hidden, d_row = _tf_expert_input_grads(hid, dy, w1_g, w2_g)
    d_hiddens.append(d_hidden)
    d_rows.append(d_row)
  num_groups = len(w1)
  d_w2 = _tf_stack_in_place(
      lambda g: tf.matmul(hiddens[g], d_pieces[g], transpose_a=True),
      num_groups,
  )
  with tf.control_dependencies([d_w2]):
    d_w1 = _tf_stack_in_place(
        lambda g: tf.matmul(pieces[g], d_hiddens[g], transpose_a=True),
        num_groups,
    )
  return _tf_concat_rows(d_rows, padding), d_w1, d_w2


def _tf_expert_input_grads(hidden, d_out, kernel_1, kernel_2):
  """One expert's (d_hidden, d_rows) of ReLU(rows w1) w2, TensorFlow.

  d_hidden = ReluGrad(d_out w2^T) and d_rows = d_hidden w1^T, both as
  MatMul(transpose_b=True) on the (aliased) per-expert kernel slices.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  d_hidden = tf.raw_ops.ReluGrad(
      gradients=tf.matmul(d_out, kernel_2, transpose_b=True), features=hidden
  )
  return d_hidden, tf.matmul(d_hidden, kernel_1, transpose_b=True)


def _tf_after(x, after):
  """TF: `x` + 0, with the zero data-dependent on the tensor `after`.

  Ops computed from the result run only once `after` exists and are not
  merged with the same ops on `x` (Grappler CSE); a control dependency alone
  is ignored by XLA. Same device as `tf.recompute_grad`, but applied to one
  (small) tensor only, so no weight is copied.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  first = tf.reduce_max(tf.reshape(after, [-1])[:1])
  finite = tf.cast(first, tf.bool)
  zero = tf.where(tf.equal(finite, finite), 0.0, float("nan"))
  return x + tf.cast(zero, x.dtype)


# JAX's grouped matmul: "auto" (on CPUs the loop over groups of
# `tiled_grouped_matmul`; on GPUs the Pallas kernels when the shapes allow;
# else `jax.lax.ragged_dot`), "tiled", "ragged_dot", "pallas", or
# "pallas_interpret" (the kernels in Pallas's interpreter, any backend).
JAX_GROUPED_MATMUL_ENV = "MOE_KERAS_JAX_GROUPED_MATMUL"
JAX_GROUPED_MATMUL_CHOICES = (
    "auto",
    "tiled",
    "ragged_dot",
    "pallas",
    "pallas_interpret",
)


def jax_grouped_matmul_choice(rows_shape, weights_shape):
  """Which JAX grouped matmul runs for these shapes.

  Args:
    rows_shape: (R, K).
    weights_shape: (G, K, N).

  Returns:
    "tiled", "ragged_dot", "pallas" or "pallas_interpret", from the
    environment variable MOE_KERAS_JAX_GROUPED_MATMUL (default "auto": "tiled"
    on CPUs, where XLA expands ragged_dot densely; "pallas" on GPUs for the
    shapes the kernels take; else "ragged_dot", also on CPUs under a
    keras.distribution of several devices: XLA's SPMD partitioner splits
    ragged_dot by expert, while the loop's slice of expert g would gather
    every expert's weights onto each device).

  Raises:
    ValueError: an unknown setting, or "pallas*" for shapes the kernels do
      not take (K or N not a multiple of 16).
  """
  import os  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import pallas_grouped_matmul  # pylint: disable=g-import-not-at-top

  choice = os.environ.get(JAX_GROUPED_MATMUL_ENV, "auto")
  if choice not in JAX_GROUPED_MATMUL_CHOICES:
    raise ValueError(
        f"{JAX_GROUPED_MATMUL_ENV}={choice!r} is not one of"
        f" {', '.join(JAX_GROUPED_MATMUL_CHOICES)}"
    )
  fits = pallas_grouped_matmul.supports(tuple(rows_shape), tuple(weights_shape))
  if choice == "auto":
    platform = jax.default_backend()
    if platform == "cpu" and not _keras_distribution_spans_devices():
      return "tiled"
    return "pallas" if fits and platform == "gpu" else "ragged_dot"
  if choice.startswith("pallas") and not fits:
    raise ValueError(
        f"{JAX_GROUPED_MATMUL_ENV}={choice}: the Pallas grouped matmul needs"
        " both weight dimensions to be multiples of"
        f" {pallas_grouped_matmul.MIN_BLOCK}, got weights"
        f" {tuple(weights_shape)}"
    )
  return choice


def _keras_distribution_spans_devices():
  """Whether a keras.distribution over more than one device is active."""
  import keras  # pylint: disable=g-import-not-at-top

  distribution = keras.distribution.distribution()
  return distribution is not None and distribution.device_mesh.devices.size > 1


def _jax_grouped_matmul(rows, weights, group_sizes):
  """JAX: rows [R, K] x weights [G, K, N] by group (`grouped_matmul`)."""
  import jax  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import pallas_grouped_matmul  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import tiled_grouped_matmul  # pylint: disable=g-import-not-at-top

  choice = jax_grouped_matmul_choice(rows.shape, weights.shape)
  group_sizes = group_sizes.astype("int32")
  if choice == "ragged_dot":
    return jax.lax.ragged_dot(rows, weights, group_sizes)
  if choice == "tiled":
    return tiled_grouped_matmul.grouped_matmul(rows, weights, group_sizes)
  return pallas_grouped_matmul.grouped_matmul(
      rows, weights, group_sizes, interpret=choice == "pallas_interpret"
  )


def remat(fn):
  """Rematerialization of `fn(x, *weights)`: nothing inside is kept.

  The gradient recomputes `fn` from its inputs. Arguments may be None
  (absent biases). JAX: `jax.checkpoint`. TensorFlow: a custom gradient that
  reruns `fn` under a tape on `x` made data-dependent on the output gradient
  (`_tf_after`); unlike `tf.recompute_grad`, which adds a zero to every
  argument, the weights are not copied.

  Args:
    fn: function of (x, *weights) -> one tensor; x is the first argument.

  Returns:
    function with the same signature and value.
  """
  backend = backend_name()
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top

    return jax.checkpoint(fn)
  if backend != "tensorflow":
    raise NotImplementedError(
        f"remat is not implemented for the {backend!r} backend"
    )
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def wrapper(*args):
    present = [i for i, a in enumerate(args) if a is not None]

    def call(tensors):
      full = [None] * len(args)
      for i, t in zip(present, tensors):
        full[i] = t
      return fn(*full)

    @tf.custom_gradient
    def inner(*tensors):
      out = call(tensors)

      def grad(d_out):
        again = list(tensors)
        again[0] = _tf_after(again[0], d_out)
        with tf.GradientTape() as tape:
          tape.watch(again)
          recomputed = call(again)
        return tape.gradient(
            recomputed,
            again,
            output_gradients=d_out,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

      return out, grad

    return inner(*[args[i] for i in present])

  return wrapper


def _grouped_ffn_jax(rows, group_sizes, kernel_1, kernel_2, bias_1, bias_2):
  """JAX: two grouped matmuls (`_jax_grouped_matmul`; static shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  group_sizes = group_sizes.astype(jnp.int32)
  num_rows = rows.shape[0]
  row_group = jnp.repeat(
      jnp.arange(kernel_1.shape[0]),
      group_sizes,
      total_repeat_length=num_rows,
  )
  in_group = jnp.arange(num_rows) < jnp.sum(group_sizes)
  hidden = _jax_grouped_matmul(rows, kernel_1, group_sizes)
  if bias_1 is not None:
    hidden = hidden + bias_1[row_group]
  out = _jax_grouped_matmul(jax.nn.relu(hidden), kernel_2, group_sizes)
  if bias_2 is not None:
    out = out + bias_2[row_group]
  return jnp.where(in_group[:, None], out, 0)


def standard_normal(shape, seed):
  """Independent N(0, 1) float32 draws of `shape` (eq. 4's noise).

  TensorFlow: the Box-Muller transform of `keras.random.uniform` draws,
  z = sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2), u1, u2 ~ U[0, 1). TF's own
  StatelessRandomNormal took 2x as long on a 2-core CPU (49 against 27 ms
  for [8192, 1024]), a fifth of the noisy gate's cost at 1024 experts
  (BUILD.md issue 15). Same distribution, a different stream from
  `keras.random.normal` for the same seed. Other backends:
  `keras.random.normal`.

  Args:
    shape: tuple of python ints or int32 scalar tensors, or a 1-D int shape
      tensor.
    seed: a `keras.random.SeedGenerator` (or anything `keras.random` takes).

  Returns:
    float32 tensor of `shape`.
  """
  if backend_name() != "tensorflow":
    return keras.random.normal(shape, dtype="float32", seed=seed)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if isinstance(shape, (tuple, list)) and all(
      isinstance(dim, int) for dim in shape
  ):
    size = math.prod(shape)
  else:
    size = tf.reduce_prod(tf.cast(tf.convert_to_tensor(shape), "int32"))
  half = (size + 1) // 2
  u = keras.random.uniform((2, half), dtype="float32", seed=seed)
  radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))  # 1 - u1 in (0, 1]
  angle = (2.0 * math.pi) * u[1]
  z = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
  return tf.reshape(z[:size], shape)


def noisy_top_k_load_tf(
    clean, raw, noise, k, noise_epsilon, noise_scale, valid
):
  """TensorFlow noisy top-k gate with Load(X), hand-written gradient.

  The values and gradients of `gating.noisy_top_k_load`'s composition
  (eqs. 3-5, 8-10) in fewer passes over the [N, n] logits:
    * kth_excluding (eq. 8) is t_k for every expert outside the top k, so
      the threshold is subtracted as that one column, and only the N x k
      top entries are rewritten (a scatter) where it is t_{k+1};
    * Phi's argument and scale are kept for the backward pass, which forms
      dLoad/d(x W_g) and dLoad/d(x W_noise) directly (no per-op chain
      through Phi, the division and the broadcast of dLoad);
    * the top-(k+1) values' gradients are scatter-added into those two.
  At 1024 experts the gate's elementwise work is a third of the flat
  MoE's cost beyond its experts (BUILD.md issue 15).

  Args:
    clean: float32 [N, n], x . W_g.
    raw: float32 [N, n], x . W_noise.
    noise: float32 [N, n] standard-normal draws (no gradient).
    k: python int, 1 <= k < n.
    noise_epsilon: python float added to the Softplus.
    noise_scale: python float multiplying the noise's standard deviation.
    valid: optional float32 [N] (1 valid, 0 padding): padding rows add
      nothing to Load.

  Returns:
    (gates float32 [N, k], indices int32 [N, k], load float32 [n]).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  num_experts = clean.shape[-1]

  def flat_positions(indices):
    """[N, m] expert ids -> [N * m, 1] positions in the flattened [N * n]."""
    rows = tf.range(tf.shape(indices)[0])[:, None] * num_experts
    return tf.reshape(indices + rows, [-1, 1])

  def at(matrix, positions):
    """matrix[row, indices[row, j]] as [N * m] for flat_positions."""
    return tf.gather(tf.reshape(matrix, [-1]), positions[:, 0])

  def scatter(matrix, positions, values, add):
    fn = tf.tensor_scatter_nd_add if add else tf.tensor_scatter_nd_update
    flat = fn(tf.reshape(matrix, [-1]), positions, tf.reshape(values, [-1]))
    return tf.reshape(flat, tf.shape(matrix))

  @tf.custom_gradient
  def gate(clean, raw):
    softplus = tf.nn.softplus(raw)
    stddev = softplus + noise_epsilon  # eq. (4)
    if noise_scale != 1.0:
      stddev = stddev * noise_scale
    noisy = clean + noise * stddev
    top_values, top_indices = tf.math.top_k(noisy, k=k + 1, sorted=True)
    kept = top_values[:, :k]
    gates = tf.ones_like(kept) if k == 1 else tf.nn.softmax(kept)  # eq. (3)
    # kth_excluding, eq. (8): where H(x)_i > t_{k+1} (only among the top k)
    # t_{k+1}, elsewhere t_k.
    t_in, t_out = top_values[:, k : k + 1], top_values[:, k - 1 : k]
    is_in = kept > t_in  # [N, k]
    kept_positions = flat_positions(top_indices[:, :k])
    # P = Phi((clean - threshold) / stddev) = (1 + erf(u)) / 2, eq. (9), with
    # u = (clean - threshold) * scale_u and scale_u = 1 / (sqrt(2) stddev).
    scale_u = (1.0 / math.sqrt(2.0)) / stddev
    difference = scatter(
        clean - t_out,
        kept_positions,
        at(clean, kept_positions)
        - tf.reshape(tf.where(is_in, t_in, t_out), [-1]),
        add=False,
    )
    u = difference * scale_u
    erf_u = tf.math.erf(u)
    if valid is None:
      count = tf.cast(tf.shape(clean)[0], "float32")
      erf_sum = tf.reduce_sum(erf_u, axis=0)
    else:
      count = tf.reduce_sum(valid)
      erf_sum = tf.linalg.matvec(erf_u, valid, transpose_a=True)
    load = 0.5 * count + 0.5 * erf_sum  # eq. (10)

    def grad(d_gates, unused_d_indices, d_load):
      # dP/dclean = exp(-u^2) scale_u / sqrt(pi) = -dP/dthreshold;
      # dP/dstddev = -sqrt(2) u dP/dclean.
      if d_load is None:
        d_clean_p = tf.zeros_like(clean)
      else:
        row = d_load[None, :] * (1.0 / math.sqrt(math.pi))
        d_clean_p = tf.exp(-tf.square(u)) * (scale_u * row)
        if valid is not None:
          d_clean_p = d_clean_p * valid[:, None]
      d_threshold_in = -tf.reduce_sum(
          tf.where(
              is_in,
              tf.reshape(at(d_clean_p, kept_positions), [-1, k]),
              0.0,
          ),
          axis=1,
          keepdims=True,
      )
      d_threshold_out = (
          -tf.reduce_sum(d_clean_p, axis=1, keepdims=True) - d_threshold_in
      )
      if d_gates is None or k == 1:
        d_kept = tf.zeros_like(kept)
      else:
        d_kept = gates * (
            d_gates - tf.reduce_sum(gates * d_gates, axis=1, keepdims=True)
        )
      d_top = tf.concat(
          [
              d_kept[:, : k - 1],
              d_kept[:, k - 1 :] + d_threshold_out,
              d_threshold_in,
          ],
          axis=1,
      )  # [N, k + 1], the gradient of H(x) at its top k + 1 entries
      top_positions = flat_positions(top_indices)
      d_stddev = scatter(
          (u * -math.sqrt(2.0)) * d_clean_p,
          top_positions,
          tf.reshape(d_top, [-1]) * at(noise, top_positions),
          add=True,
      )
      d_clean = scatter(d_clean_p, top_positions, d_top, add=True)
      if noise_scale != 1.0:
        d_stddev = d_stddev * noise_scale
      # Softplus' derivative sigmoid(raw) = exp(raw - softplus(raw)).
      return d_clean, d_stddev * tf.exp(raw - softplus)

    return (gates, top_indices[:, :k], load), grad

  return gate(clean, raw)
