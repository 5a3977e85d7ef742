"""Gating networks and balancing losses of Shazeer et al. 2017, as functions.

Every function here is written with `keras.ops`, takes and returns float32
tensors (the callers cast), and implements one equation of the paper
(../shared/PAPER.md); its docstring names the equation. `N` is the number of
tokens (examples; every (sequence, timestep) position is one example), `n` the
number of experts.

  eq. (2)   dense softmax gate ................ `softmax_gates`
  eq. (3)   noisy top-k gate .................. `top_k_gates`
  eq. (4)   noisy logits H(x) ................. `noisy_top_k_logits`
  eq. (5)   KeepTopK .......................... `top_k_gates`
            (ties broken by a rotation) ....... `rotated_top_k`
  eq. (6)   Importance(X) ..................... `importance`
  eqs.(7,11) CV(.)^2 losses ................... `cv_squared`
  eq. (8)   kth_excluding ..................... `kth_excluding`
  eqs.(4,5,8) one top-(k+1) for all three ...... `noisy_top_k`
  eqs.(3-5,8-10) gates and Load(X) ............ `noisy_top_k_load`
  eq. (9)   P(x, i) ........................... `load_probabilities`
  eq. (10)  Load(X) ........................... `load`
  eq. (14)  Load_H(X) (appendix B) ............ `hierarchical_load`
  eqs.(15,16) strictly balanced gates ......... `masked_gates`
  eq. (18)  M_batchwise ....................... `batchwise_mask`
  eq. (19)  M_threshold ....................... `threshold_mask`
  eq. (20)  L_batchwise ....................... `batchwise_threshold_loss`
"""

import math

from keras import ops

from moe_keras.layers import backend_ops

# Added to mean^2 in CV^2 so that an all-zero vector (e.g. an all-padding
# batch) gives a loss of 0 instead of NaN; the value tensor2tensor uses.
CV_EPSILON = 1e-10
# Default stabilizer added to Softplus in eq. (4) and eq. (9); tensor2tensor's
# `noise_epsilon`. Pass 0.0 for the paper's equations verbatim.
DEFAULT_NOISE_EPSILON = 1e-2
_SQRT_HALF = 1.0 / math.sqrt(2.0)
# Names of the weighted auxiliary (training-only) losses in the training logs
# (`MoEBase.add_aux_losses`, `moe_keras.models.task_model`).
IMPORTANCE_LOSS = "moe_importance_loss"  # w_importance CV(Importance)^2
LOAD_LOSS = "moe_load_loss"  # w_load CV(Load)^2
BATCHWISE_LOSS = "moe_batchwise_loss"  # w_batchwise L_batchwise, eq. (20)
AUX_LOSS_NAMES = (IMPORTANCE_LOSS, LOAD_LOSS, BATCHWISE_LOSS)


def cv_squared(x):
  """Squared coefficient of variation, the penalty of eqs. (7) and (11).

  CV is the population standard deviation over the mean (the paper does not
  say population or sample; tensor2tensor uses population).

  Args:
    x: float tensor [n], e.g. Importance(X) or Load(X).

  Returns:
    Scalar float tensor var(x) / (mean(x)^2 + CV_EPSILON); 0 when n == 1.
  """
  x = ops.cast(x, "float32")
  mean = ops.mean(x)
  variance = ops.mean(ops.square(x - mean))
  return variance / (ops.square(mean) + CV_EPSILON)


def coefficient_of_variation(x):
  """CV = population std / mean of `x` [n] (a statistic, not a loss)."""
  x = ops.cast(x, "float32")
  mean = ops.mean(x)
  std = ops.sqrt(ops.mean(ops.square(x - mean)))
  return std / (mean + CV_EPSILON)


def softmax_gates(logits):
  """Dense softmax gate, eq. (2) and eq. (15): Softmax(x . W_g).

  Args:
    logits: float32 [N, n] = x . W_g.

  Returns:
    float32 [N, n] gate probabilities.
  """
  return ops.softmax(logits, axis=-1)


def noisy_top_k_logits(
    clean_logits, raw_noise_stddev, noise, noise_epsilon, noise_scale=1.0
):
  """Noisy logits H(x), eq. (4).

  H(x)_i = (x . W_g)_i
           + StandardNormal() * c * (Softplus((x . W_noise)_i) + eps).
  With eps = 0 and c = 1 this is the paper's equation verbatim.

  Args:
    clean_logits: float32 [N, n], x . W_g.
    raw_noise_stddev: float32 [N, n], x . W_noise.
    noise: float32 [N, n] of independent standard-normal draws.
    noise_epsilon: python float added to the Softplus.
    noise_scale: python float c > 0 multiplying the noise's standard
      deviation (1.0: the paper; an ablation knob, README "Results").

  Returns:
    (noisy_logits [N, n], noise_stddev [N, n]).
  """
  noise_stddev = ops.softplus(raw_noise_stddev) + noise_epsilon
  if noise_scale != 1.0:
    noise_stddev = noise_stddev * noise_scale
  return clean_logits + noise * noise_stddev, noise_stddev


def valid_row_numbers(num_rows, valid=None):
  """Each row's number among the valid rows: the valid rows before it.

  Args:
    num_rows: python int or int32 scalar tensor N.
    valid: optional bool [N] (padding False); None: every row is valid.

  Returns:
    int32 [N]: 0, 1, ... over the valid rows in batch order (a padding row
    gets the number of the next valid row; callers ignore padding rows).
  """
  if valid is None:
    return ops.arange(num_rows, dtype="int32")
  valid_int = ops.cast(valid, "int32")
  return ops.cumsum(valid_int) - valid_int


def rotated_top_k(logits, k, valid=None):
  """`ops.top_k(logits, k)` with ties broken by a rotation per row (eq. 5).

  The paper does not say how KeepTopK breaks ties. `ops.top_k` puts the
  lower index first, so where a row's logits tie (every row of a fresh
  layer without noise: W_g = 0 makes every logit 0) every token would keep
  the same experts 0..k-1 and the other n - k would get no token, as
  eq. (18)'s ties did before `batchwise_mask` rotated them. Here row j
  (tokens numbered 0..N-1 in batch order) ranks equal logits by
  (expert - o_j) mod n, o_j = j k mod n: a fully tied row j keeps experts
  o_j .. o_j + k - 1 (mod n), so a tied batch gives every expert
  floor(N k / n) or ceil(N k / n) tokens. Only the order of equal values
  changes: the kept values are the top-k values of the row either way.
  The choice among ties depends on the row's position in the batch, as
  eq. (18)'s does: for training (`top_k_gates(rotate_ties=True)`), not for
  inference.

  Args:
    logits: float32 [N, n].
    k: python int, 1 <= k <= n.
    valid: optional bool [N], False for padding: padding rows are left out
      of the numbering (they are unrouted afterwards), so the valid tokens
      of a tied batch are the ones balanced.

  Returns:
    (values float32 [N, k] in decreasing order, indices int32 [N, k]).
  """
  num_experts = logits.shape[-1]
  rows = valid_row_numbers(ops.shape(logits)[0], valid)
  offsets = ops.mod(rows * k, num_experts)
  # Column c of the rotated row j holds expert (c + o_j) mod n.
  experts = ops.mod(
      ops.arange(num_experts, dtype="int32")[None, :] + offsets[:, None],
      num_experts,
  )  # [N, n]
  values, columns = ops.top_k(
      ops.take_along_axis(logits, experts, axis=-1), k=k, sorted=True
  )
  return values, ops.take_along_axis(
      experts, ops.cast(columns, "int32"), axis=-1
  )


def top_k_gates(logits, k, top=None, rotate_ties=False, valid=None):
  """Sparse gates G(x) = Softmax(KeepTopK(v, k)), eqs. (3) and (5).

  Softmax over the k kept values equals the softmax of eq. (3) with the other
  entries at -inf, whose gates are exactly 0; only the k kept gates are
  returned (the sparse representation of G(x)).

  With k = 1 the single gate is softmax of one logit, i.e. exactly 1.0, so
  the task loss gives the gating weights no gradient (only the balancing
  losses train them). This is what eq. (3) implies; the paper's models use
  k >= 2.

  Args:
    logits: float32 [N, n], H(x) (training) or x . W_g.
    k: python int, 1 <= k <= n.
    top: optional (values [N, k'], indices [N, k']) of
      `ops.top_k(logits, k', sorted=True)` for some k' >= k, reused instead
      of a second top-k (the noisy gate already computes k' = k + 1 for
      eq. 8; top-k over [N, n] is one of the gate's costliest ops).
    rotate_ties: break ties among `logits` by `rotated_top_k` (training
      without noise: a fresh layer's logits all tie) instead of lower index
      first. Off at inference, where a token's experts must not depend on
      its position in the batch (step decoding vs teacher forcing).
    valid: optional bool [N] (padding False), for `rotated_top_k`'s row
      numbering.

  Returns:
    (gates float32 [N, k] summing to 1 per row, indices int32 [N, k]) ordered
    by decreasing logit.
  """
  if top is not None:
    top_logits, top_indices = top[0][:, :k], top[1][:, :k]
  elif rotate_ties:
    top_logits, top_indices = rotated_top_k(logits, k, valid=valid)
  else:
    top_logits, top_indices = ops.top_k(logits, k=k, sorted=True)
  if k == 1:
    # Softmax of one logit is exactly 1 (TF's CPU kernel can return
    # 0.99999994, which would leak a spurious gradient into W_g).
    gates = ops.ones_like(top_logits)
  else:
    gates = ops.softmax(top_logits, axis=-1)
  return gates, ops.cast(top_indices, "int32")


def dense_gates(indices, gates, num_experts):
  """Scatters sparse gates into the dense G(x) of eq. (3).

  Args:
    indices: int32 [N, k] expert ids (ids >= num_experts are ignored).
    gates: float32 [N, k].
    num_experts: python int n.

  Returns:
    float32 [N, n] with gates[t, j] at column indices[t, j], zeros elsewhere.
  """
  one_hot = ops.one_hot(indices, num_experts, dtype=gates.dtype)  # [N, k, n]
  return ops.sum(one_hot * gates[..., None], axis=1)


def importance(gates, indices, num_experts):
  """Importance(X) = sum over x in X of G(x), eq. (6).

  Args:
    gates: float32 [N, k] sparse gates (zero for padding tokens).
    indices: int32 [N, k] expert ids; ids >= num_experts (unrouted) ignored.
    num_experts: python int n.

  Returns:
    float32 [n].
  """
  flat_gates = ops.reshape(gates, [-1])
  flat_indices = ops.reshape(indices, [-1])
  summed = ops.segment_sum(
      flat_gates, flat_indices, num_segments=num_experts + 1
  )
  return summed[:num_experts]


def kth_excluding(noisy_logits, k, top_values=None):
  """kth_excluding(H(x), k, i) of eq. (8), for every expert i at once.

  The k-th largest entry of H(x) once entry i is removed: with the top k+1
  values t_1 >= ... >= t_{k+1}, it is t_{k+1} where i is among the top k and
  t_k otherwise (paper section 3, derived; matches tensor2tensor).

  Args:
    noisy_logits: float32 [N, n] = H(x).
    k: python int, 1 <= k <= n. For k == n no k-th value exists once one entry
      is removed; the result is -inf (expert i is then always selected).
    top_values: optional float32 [N, >= k+1], the sorted top values of
      `noisy_logits` if already computed.

  Returns:
    float32 [N, n].
  """
  num_experts = noisy_logits.shape[-1]
  if k >= num_experts:
    return ops.full_like(noisy_logits, -float("inf"))
  if top_values is None:
    top_values, _ = ops.top_k(noisy_logits, k=k + 1, sorted=True)
  threshold_if_in = top_values[:, k : k + 1]
  threshold_if_out = top_values[:, k - 1 : k]
  is_in = ops.greater(noisy_logits, threshold_if_in)
  return ops.where(is_in, threshold_if_in, threshold_if_out)


def normal_cdf(z):
  """Standard normal CDF Phi(z) = 0.5 * (1 + erf(z / sqrt(2)))."""
  return 0.5 * (1.0 + ops.erf(z * _SQRT_HALF))


def load_probabilities(
    clean_logits, noisy_logits, noise_stddev, k, top_values=None
):
  """P(x, i) of eqs. (8)-(9): the smooth probability that G(x)_i != 0.

  P(x, i) = Phi(((x . W_g)_i - kth_excluding(H(x), k, i)) / noise_stddev_i),
  the probability that expert i is selected when only its own noise is
  redrawn. Differentiable in W_g and W_noise.

  Args:
    clean_logits: float32 [N, n], x . W_g.
    noisy_logits: float32 [N, n], H(x) as used for the top-k selection.
    noise_stddev: float32 [N, n], Softplus(x . W_noise) (+ epsilon), > 0.
    k: python int.
    top_values: optional float32 [N, >= k+1], sorted top values of
      `noisy_logits` (see `kth_excluding`).

  Returns:
    float32 [N, n] in [0, 1].
  """
  if k >= noisy_logits.shape[-1]:
    # Every expert is always selected: P = 1 exactly. (Going through
    # Phi((clean + inf) / stddev) would give 1 but a NaN gradient.)
    return ops.ones_like(clean_logits)
  threshold = kth_excluding(noisy_logits, k, top_values=top_values)
  return normal_cdf((clean_logits - threshold) / noise_stddev)


def load(probabilities):
  """Load(X)_i = sum over x in X of P(x, i), eq. (10).

  Args:
    probabilities: float32 [N, n] from `load_probabilities`, zero rows for
      padding tokens.

  Returns:
    float32 [n].
  """
  return ops.sum(probabilities, axis=0)


def hierarchical_load(load_primary, load_secondary, group_sizes):
  """Load_H(X) of eq. (14) (appendix B) from its three sums over X.

  Load_H(X)_{i,j} = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|, with
  X^(i) = {x in X : G_primary(x)_i > 0}. Every input is a sum over the
  tokens of X, so the Load_H of a batch made of several slices is this
  function of the slices' summed inputs (not the sum of their Load_H).

  Args:
    load_primary: float32 [a], Load_primary(X) (eq. 10 over the groups).
    load_secondary: float32 [a, b], row i = Load_i(X^(i)) (eq. 10 of group
      i's secondary gate over the tokens sent to group i).
    group_sizes: float32 [a], |X^(i)| (an empty group's row is 0).

  Returns:
    float32 [a*b], expert (i, j) at i*b + j.
  """
  return ops.reshape(
      load_primary[:, None]
      * load_secondary
      / ops.maximum(group_sizes, 1.0)[:, None],
      (-1,),
  )


def masked_gates(probabilities, mask):
  """Strictly balanced gates G(x) of eq. (16).

  G(x)_i = G_sigma(x)_i M_i / sum_j G_sigma(x)_j M_j; rows whose mask is all
  zero (an example no expert accepted) get all-zero gates.

  Args:
    probabilities: float32 [N, n], G_sigma(x) of eq. (15).
    mask: float32 [N, n] in {0, 1} (eq. 18 in training, eq. 19 at inference).

  Returns:
    float32 [N, n].
  """
  masked = probabilities * mask
  denominator = ops.sum(masked, axis=-1, keepdims=True)
  safe = ops.where(denominator > 0, denominator, ops.ones_like(denominator))
  return masked / safe


def batchwise_capacity(num_tokens, k, num_experts):
  """m = k |X| / n of eq. (18), as an int32 scalar >= 1 (floor, min 1).

  Args:
    num_tokens: int32 scalar tensor or python int, |X| (non-padding tokens).
    k: python int.
    num_experts: python int n.

  Returns:
    int32 scalar tensor.
  """
  m = ops.floor_divide(ops.cast(num_tokens, "int32") * k, num_experts)
  return ops.maximum(m, 1)


def batchwise_mask(probabilities, m, valid=None):
  """M_batchwise(X, m) of eq. (18): the top m entries of every column.

  Ties are broken per expert by a rotation of the token order (the paper does
  not say how to break them): with the valid tokens numbered 0..N-1 in batch
  order, column i ranks equal values by (position - o_i) mod N, o_i =
  floor(i N / n). Breaking ties by plain token order would hand every expert
  the same first m tokens when the gates tie (W_g = 0 at initialization makes
  every probability 1/n), leaving the other tokens without an expert; the
  rotation gives expert i the m tokens from position o_i on instead.
  Guarantee: where all probabilities tie, every valid token gets
  floor(n m' / N) or ceil(n m' / N) experts, m' = min(m, N); exactly k when
  m = kN/n is an integer, and at least one whenever n m' >= N. Only the
  order of equal values changes, not which values are used as gates.

  Every column has exactly min(m, number of valid rows) ones.

  Args:
    probabilities: float32 [N, n], rows G_sigma(x) of eq. (15).
    m: python int or int32 scalar tensor (may depend on the batch).
    valid: optional bool [N]; invalid (padding) rows are never selected.

  Returns:
    float32 [N, n] mask.
  """
  num_rows, num_experts = ops.shape(probabilities)[0], probabilities.shape[-1]
  scores = probabilities
  position = valid_row_numbers(num_rows, valid)
  if valid is None:
    num_valid = ops.cast(num_rows, "int32")
  else:
    num_valid = ops.maximum(ops.sum(ops.cast(valid, "int32")), 1)
    scores = ops.where(valid[:, None], scores, -ops.ones_like(scores))
  offsets = ops.floor_divide(
      ops.arange(num_experts, dtype="int32") * num_valid, num_experts
  )
  # Tie-break key of (expert i, token j): its rotated position, distinct
  # within a column among valid rows (padding rows score -1 and come last).
  tie_key = ops.mod(
      position[None, :] - offsets[:, None] + num_valid, num_valid
  )  # [n, N]
  by_key = ops.cast(ops.argsort(tie_key, axis=-1), "int32")
  # Stable sort by decreasing score of the key-ordered columns: equal scores
  # keep key order. `order` lists token indices, best first.
  scores_by_key = ops.take_along_axis(ops.transpose(scores), by_key, axis=-1)
  order = ops.take_along_axis(
      by_key, backend_ops.stable_argsort(-scores_by_key), axis=-1
  )  # [n, N]
  ranks = ops.argsort(order, axis=-1)  # the inverse permutation: the rank.
  mask = ops.transpose(ops.less(ranks, ops.cast(m, "int32")))
  if valid is not None:
    mask = ops.logical_and(mask, valid[:, None])
  return ops.cast(mask, "float32")


def threshold_mask(probabilities, thresholds):
  """M_threshold(x, T) of eq. (19): x_i > T_i, per example.

  Args:
    probabilities: float32 [N, n], G_sigma(x).
    thresholds: float32 [n], learned T.

  Returns:
    float32 [N, n] mask; each row depends on that example only.
  """
  return ops.cast(ops.greater(probabilities, thresholds[None, :]), "float32")


def batchwise_threshold_loss(probabilities, thresholds, batch_mask, valid=None):
  """L_batchwise(X, T, m) of eq. (20), as a mean over its |X| n terms.

  (1 / (|X| n)) sum_j sum_i (M_threshold(X_j, T)_i - M_batchwise(X, m)_{j,i})
  (X_{j,i} - T_i), |X| the number of valid rows. Every term is >= 0 and
  vanishes where the two masks agree; the gradient raises T_i on false
  admits and lowers it on false rejects.

  The paper writes a sum; its weight is not stated. The sum grows with the
  batch and its gradient (-(false admits - false rejects) of each expert)
  reaches hundreds, which a clipped global gradient norm would then spend on
  T alone. The mean does not depend on the batch size, and its gradient,
  dL/dT_i = -(M_threshold - M_batchwise summed over rows)_i / (|X| n), has
  components in [-1/n, 1/n] and a norm <= 1/sqrt(n). Adam's update of T does
  not depend on that scale.

  Args:
    probabilities: float32 [N, n], G_sigma rows.
    thresholds: float32 [n].
    batch_mask: float32 [N, n], eq. (18).
    valid: optional bool [N]; padding rows contribute nothing and do not
      count in |X|.

  Returns:
    float32 scalar (0 when no row is valid).
  """
  t_mask = threshold_mask(probabilities, thresholds)
  terms = (t_mask - batch_mask) * (probabilities - thresholds[None, :])
  if valid is None:
    num_rows = ops.cast(ops.shape(terms)[0], "float32")
  else:
    valid_f = ops.cast(valid, "float32")
    terms = terms * valid_f[:, None]
    num_rows = ops.sum(valid_f)
  num_terms = ops.maximum(num_rows, 1.0) * float(terms.shape[-1])
  return ops.sum(terms) / num_terms


def noisy_top_k(
    clean_logits, raw_noise_stddev, noise, k, noise_epsilon, noise_scale=1.0
):
  """Noisy top-k gate with its smooth load, eqs. (3)-(5) and (8)-(10).

  The training path of the paper's gate in one place: H(x) (eq. 4), the
  gates Softmax(KeepTopK(H(x), k)) (eqs. 3, 5) and P(x, i) (eq. 9), with a
  single sorted top-(k+1) of H(x) shared by KeepTopK and kth_excluding
  (eq. 8). Same values as calling `noisy_top_k_logits`, `top_k_gates` and
  `load_probabilities` in turn.

  Args:
    clean_logits: float32 [N, n], x . W_g.
    raw_noise_stddev: float32 [N, n], x . W_noise.
    noise: float32 [N, n] standard-normal draws.
    k: python int, 1 <= k <= n.
    noise_epsilon: python float added to the Softplus.
    noise_scale: python float multiplying the noise's standard deviation
      (`noisy_top_k_logits`); P (eq. 9) uses the scaled one.

  Returns:
    (gates float32 [N, k], indices int32 [N, k], probabilities P float32
    [N, n]).
  """
  noisy, stddev = noisy_top_k_logits(
      clean_logits, raw_noise_stddev, noise, noise_epsilon, noise_scale
  )
  num_experts = noisy.shape[-1]
  top = ops.top_k(noisy, k=min(k + 1, num_experts), sorted=True)
  gates, indices = top_k_gates(noisy, k, top=top)
  probs = load_probabilities(clean_logits, noisy, stddev, k, top_values=top[0])
  return gates, indices, probs


def noisy_top_k_load(
    clean_logits,
    raw_noise_stddev,
    noise,
    k,
    noise_epsilon,
    noise_scale=1.0,
    valid=None,
):
  """Noisy top-k gates and Load(X), eqs. (3)-(5) and (8)-(10).

  `noisy_top_k` followed by `load` of its P(x, i) over the valid rows: what a
  layer's training step needs (P itself is only ever summed). On
  TensorFlow this is `backend_ops.noisy_top_k_load_tf`, the same values and
  gradients with a hand-written backward pass (tested against this
  composition and the numpy reference).

  Args:
    clean_logits: float32 [N, n], x . W_g.
    raw_noise_stddev: float32 [N, n], x . W_noise.
    noise: float32 [N, n] standard-normal draws.
    k: python int, 1 <= k <= n.
    noise_epsilon: python float added to the Softplus.
    noise_scale: python float multiplying the noise's standard deviation.
    valid: optional float32 [N] (1 for a token, 0 for padding).

  Returns:
    (gates float32 [N, k], indices int32 [N, k], load float32 [n]).
  """
  if backend_ops.backend_name() == "tensorflow" and k < clean_logits.shape[-1]:
    return backend_ops.noisy_top_k_load_tf(
        clean_logits,
        raw_noise_stddev,
        noise,
        k,
        noise_epsilon,
        noise_scale,
        valid,
    )
  gates, indices, probs = noisy_top_k(
      clean_logits, raw_noise_stddev, noise, k, noise_epsilon, noise_scale
  )
  if valid is not None:
    probs = probs * valid[:, None]
  return gates, indices, load(probs)


def standard_normal(shape, seed):
  """Independent N(0, 1) draws for eq. (4), float32 of `shape`.

  See `backend_ops.standard_normal` (Box-Muller on TensorFlow).
  """
  return backend_ops.standard_normal(shape, seed=seed)
