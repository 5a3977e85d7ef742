"""Independent numpy reference for the Sparsely-Gated Mixture-of-Experts layer.

Written from the paper (Shazeer et al. 2017; /work/shared/PAPER.md sections 1,
3, 4, 5) and API_SPEC.md, NOT from the implementation under test. Everything
is computed in float64 with plain loops or direct definitions (for example
`kth_excluding` literally deletes entry i and sorts the rest, instead of the
top-(k+1) shortcut an implementation would use), so that agreement with the
layer is evidence rather than a tautology.

The only non-numpy helper is `assign_weights`, which duck-types
`variable.assign(value)` to load reference weights into a layer.
"""

import math

import numpy as np

CV_EPS = 1e-10  # API_SPEC: cv_squared = population var / (mean^2 + 1e-10).

_ERF = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------
# Elementary functions.
# --------------------------------------------------------------------------


def softplus(x):
  """Numerically stable softplus log(1 + exp(x)) in float64."""
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def normal_cdf(z):
  """Standard normal CDF Phi(z) = (1 + erf(z / sqrt 2)) / 2, via math.erf."""
  z = np.asarray(z, np.float64)
  return 0.5 * (1.0 + _ERF(z / math.sqrt(2.0)))


def softmax(v, axis=-1):
  """Row softmax in float64."""
  v = np.asarray(v, np.float64)
  v = v - np.max(v, axis=axis, keepdims=True)
  e = np.exp(v)
  return e / np.sum(e, axis=axis, keepdims=True)


def cv_squared(x):
  """Squared coefficient of variation, eqs 7 and 11 (population variance).

  Args:
    x: [n] vector.

  Returns:
    float: var(x) / (mean(x)^2 + 1e-10), variance with ddof=0.
  """
  x = np.asarray(x, np.float64)
  return float(np.var(x) / (np.mean(x) ** 2 + CV_EPS))


def cv(x):
  """Coefficient of variation std/mean (population std), as reported in stats."""
  x = np.asarray(x, np.float64)
  return float(np.std(x) / np.mean(x))


# --------------------------------------------------------------------------
# Gating equations.
# --------------------------------------------------------------------------


def noisy_logits(
    clean_logits, raw_noise_stddev, noise, noise_epsilon, noise_scale=1.0
):
  """Eq 4: H = clean + noise * c * (softplus(raw) + noise_epsilon).

  Returns:
    (noisy_logits, noise_stddev), both [N, n] float64.
  """
  std = noise_scale * (softplus(raw_noise_stddev) + noise_epsilon)
  return (
      np.asarray(clean_logits, np.float64)
      + np.asarray(noise, np.float64) * std,
      std,
  )


def top_k_indices(logits, k):
  """Indices of the k largest entries of each row, by descending value.

  Ties are broken towards the lower index (stable sort), which is what
  `tf.math.top_k` documents; tests never depend on tie order for numbers.
  """
  logits = np.asarray(logits, np.float64)
  order = np.argsort(-logits, axis=-1, kind="stable")
  return order[:, :k]


def top_k_gates(logits, k):
  """Eqs 3 and 5: softmax over the k largest logits of each row.

  Returns:
    (gates [N, k], indices [N, k]) with indices ordered by descending logit.
  """
  logits = np.asarray(logits, np.float64)
  idx = top_k_indices(logits, k)
  vals = np.take_along_axis(logits, idx, axis=-1)
  return softmax(vals), idx


def keep_top_k_softmax(logits, k):
  """Eqs 3 and 5 written literally: Softmax(KeepTopK(v, k)) as a dense [N, n]."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros_like(logits)
  for r in range(logits.shape[0]):
    keep = top_k_indices(logits[r : r + 1], k)[0]
    masked = np.full(logits.shape[1], -np.inf)
    masked[keep] = logits[r, keep]
    e = np.exp(masked - np.max(masked))
    out[r] = e / e.sum()
  return out


def dense_gates(indices, gates, num_experts):
  """Scatter [N, k] gates at [N, k] indices into a dense [N, n] matrix."""
  out = np.zeros((indices.shape[0], num_experts), np.float64)
  for r in range(indices.shape[0]):
    for c in range(indices.shape[1]):
      out[r, indices[r, c]] += gates[r, c]
  return out


def kth_excluding(noisy, k):
  """Eq 8's kth_excluding(H(x), k, i) by definition: delete entry i, sort.

  Returns -inf where fewer than k other entries exist (k == n): then expert i
  is always in the top k, so P(x, i) = Phi(+inf) = 1.
  """
  noisy = np.asarray(noisy, np.float64)
  n_rows, n = noisy.shape
  out = np.empty_like(noisy)
  for r in range(n_rows):
    for i in range(n):
      rest = np.sort(np.delete(noisy[r], i))[::-1]
      out[r, i] = rest[k - 1] if k <= n - 1 else -np.inf
  return out


def load_probabilities(clean, noisy, noise_stddev, k):
  """Eq 9: P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / stddev_i)."""
  thr = kth_excluding(noisy, k)
  return normal_cdf((np.asarray(clean, np.float64) - thr) / noise_stddev)


def monte_carlo_in_top_k(clean, noise_stddev, noise, i, k, draws, rng):
  """Empirical Pr[expert i in top k of H(x)] redrawing only expert i's noise.

  This is eq 8's definition of P(x, i): all other experts keep their noise.

  Args:
    clean: [n] clean logits of one example.
    noise_stddev: [n] noise standard deviations.
    noise: [n] the sampled noise of the other experts.
    i: expert index.
    k: experts per example.
    draws: number of Monte-Carlo redraws.
    rng: numpy Generator.

  Returns:
    float fraction of draws in which expert i is among the k largest.
  """
  clean = np.asarray(clean, np.float64)
  base = clean + np.asarray(noise, np.float64) * noise_stddev
  h = np.tile(base, (draws, 1))
  h[:, i] = clean[i] + rng.standard_normal(draws) * noise_stddev[i]
  # i is in the top k iff fewer than k entries are strictly larger.
  larger = np.sum(h > h[:, i : i + 1], axis=1)
  return float(np.mean(larger < k))


# --------------------------------------------------------------------------
# Batchwise (strictly balanced) gating, appendix F.
# --------------------------------------------------------------------------


def batchwise_mask(probs, m, valid=None):
  """Eq 18: per column, 1 on the m largest entries among valid rows.

  Equal entries of column i are ranked by their rotated position among the
  valid rows, (position - floor(i * N / n)) mod N (N valid rows).
  """
  probs = np.asarray(probs, np.float64)
  n_rows, n = probs.shape
  valid = np.ones(n_rows, bool) if valid is None else np.asarray(valid, bool)
  rows = np.nonzero(valid)[0]
  n_valid = len(rows)
  out = np.zeros_like(probs)
  for i in range(n):
    key = (np.arange(n_valid) - (i * n_valid) // n) % max(n_valid, 1)
    # np.lexsort sorts by the last key first: value descending, then key.
    best = rows[np.lexsort((key, -probs[rows, i]))[:m]]
    out[best, i] = 1.0
  return out


def threshold_mask(probs, thresholds):
  """Eq 19: 1 where probs[x, i] > thresholds[i]."""
  return (
      np.asarray(probs, np.float64)
      > np.asarray(thresholds, np.float64)[None, :]
  ).astype(np.float64)


def batchwise_threshold_loss(probs, thresholds, batch_mask, valid=None):
  """Eq 20 as the mean over its (valid row, expert) terms."""
  probs = np.asarray(probs, np.float64)
  t = np.asarray(thresholds, np.float64)
  valid = (
      np.ones(probs.shape[0], bool)
      if valid is None
      else np.asarray(valid, bool)
  )
  term = (threshold_mask(probs, t) - batch_mask) * (probs - t[None, :])
  return float(np.sum(term[valid])) / (max(int(valid.sum()), 1) * t.size)


def batchwise_threshold_grad(probs, thresholds, batch_mask, valid=None):
  """d L_batchwise / d T_i, holding the (piecewise constant) masks fixed.

  d/dT_i of (Mt - Mb)(X - T) = -(Mt - Mb), summed over valid rows and
  divided by (valid rows * n) like the loss.
  """
  probs = np.asarray(probs, np.float64)
  valid = (
      np.ones(probs.shape[0], bool)
      if valid is None
      else np.asarray(valid, bool)
  )
  diff = threshold_mask(probs, thresholds) - batch_mask
  n = diff.shape[1]
  return -np.sum(diff[valid], axis=0) / (max(int(valid.sum()), 1) * n)


def masked_gates(probs, mask):
  """Eq 16: renormalise probs over the mask; all-zero rows stay zero."""
  pm = np.asarray(probs, np.float64) * mask
  s = pm.sum(axis=1, keepdims=True)
  return np.where(s > 0, pm / np.where(s > 0, s, 1.0), 0.0)


# --------------------------------------------------------------------------
# Experts and full layers.
# --------------------------------------------------------------------------


def expert_outputs(x, w1, w2, b1=None, b2=None):
  """All experts on all tokens: E_i(x) = relu(x W1_i + b1_i) W2_i + b2_i.

  Returns:
    [N, n, d_out] float64 (dense all-experts reference).
  """
  x = np.asarray(x, np.float64)
  n = w1.shape[0]
  outs = []
  for i in range(n):
    hid = x @ np.asarray(w1[i], np.float64)
    if b1 is not None:
      hid = hid + b1[i]
    hid = np.maximum(hid, 0.0)
    o = hid @ np.asarray(w2[i], np.float64)
    if b2 is not None:
      o = o + b2[i]
    outs.append(o)
  return np.stack(outs, axis=1)


def grouped_matmul(lhs, rhs, sizes):
  """Per-group matmul by group loops (the dropless experts' matmul, eq. 1).

  Args:
    lhs: [R, K], rows sorted by group; group g owns sizes[g] consecutive rows.
    rhs: [G, K, N].
    sizes: int [G], sum <= R.

  Returns:
    (out [R, N] float64, zero past sum(sizes); grads), where grads(d_out)
    gives the hand-derived (d_lhs, d_rhs): d_lhs[r] = d_out[r] rhs[g(r)]^T,
    d_rhs[g] = lhs_g^T d_out_g.
  """
  out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  for g in range(len(sizes)):
    lo, hi = bounds[g], bounds[g + 1]
    out[lo:hi] = lhs[lo:hi].astype(np.float64) @ rhs[g]

  def grads(d_out):
    d_lhs = np.zeros(lhs.shape, np.float64)
    d_rhs = np.zeros(rhs.shape, np.float64)
    for g in range(len(sizes)):
      lo, hi = bounds[g], bounds[g + 1]
      d_lhs[lo:hi] = d_out[lo:hi] @ rhs[g].T.astype(np.float64)
      d_rhs[g] = lhs[lo:hi].T.astype(np.float64) @ d_out[lo:hi]
    return d_lhs, d_rhs

  return out, grads


def combine(gates, experts):
  """Eq 1: y = sum_i G(x)_i E_i(x) with dense gates [N, n], experts [N, n, d]."""
  return np.einsum("ne,ned->nd", gates, experts)


def capacity_keep(gates, capacity):
  """Per-expert capacity in token order: the first `capacity` assignments kept.

  Args:
    gates: [N, n] dense gates (nonzero = assignment).
    capacity: int, max assignments per expert.

  Returns:
    (keep [N, n] bool, dropped_assignments int, total_assignments int)
  """
  assigned = gates != 0
  keep = np.zeros_like(assigned)
  for i in range(gates.shape[1]):
    rows = np.nonzero(assigned[:, i])[0]
    keep[rows[:capacity], i] = True
  total = int(assigned.sum())
  return keep, total - int(keep.sum()), total


def sparse_moe(
    x,
    weights,
    k,
    gating="noisy_top_k",
    training=True,
    noise=None,
    noise_epsilon=1e-2,
    valid=None,
    w_importance=0.1,
    w_load=0.1,
    w_batchwise=1.0,
    noise_scale=1.0,
    capacity=None,
):
  """Reference forward pass of SparseMoE on flattened tokens.

  Args:
    x: [N, d] tokens.
    weights: dict of numpy arrays named as the layer's variables.
    k: experts per token.
    gating: "noisy_top_k", "top_k", "softmax" or "batchwise".
    training: whether noise / batchwise mask / losses apply.
    noise: [N, n] standard normal (training + noisy_top_k only).
    noise_epsilon: added to softplus of the raw noise stddev.
    valid: optional [N] bool, False for padding tokens.
    w_importance, w_load, w_batchwise: loss weights.
    noise_scale: multiplies the noise stddev (1.0: the paper).
    capacity: optional int per-expert capacity (token order).

  Returns:
    dict with output [N, d_out], gates [N, n], importance, load, token_counts,
    importance_loss, load_loss, batchwise_loss, total_loss, and
    dropped/total assignment counts.
  """
  x = np.asarray(x, np.float64)
  n_tok = x.shape[0]
  valid = np.ones(n_tok, bool) if valid is None else np.asarray(valid, bool)
  wg = np.asarray(weights["w_gate"], np.float64)
  n = wg.shape[1]
  clean = x @ wg
  res = {"batchwise_loss": 0.0, "load_loss": 0.0, "importance_loss": 0.0}
  load = None
  if gating == "noisy_top_k" and training:
    raw = x @ np.asarray(weights["w_noise"], np.float64)
    noisy, std = noisy_logits(clean, raw, noise, noise_epsilon, noise_scale)
    g, idx = top_k_gates(noisy, k)
    gates = dense_gates(idx, g, n)
    p = load_probabilities(clean, noisy, std, k)
    load = p[valid].sum(axis=0)
    res["p"] = p
  elif gating in ("noisy_top_k", "top_k"):
    g, idx = top_k_gates(clean, k)
    gates = dense_gates(idx, g, n)
  elif gating == "softmax":
    gates = softmax(clean)
  elif gating == "batchwise":
    probs = softmax(clean)
    t = np.asarray(weights["thresholds"], np.float64)
    if training:
      m = k * int(valid.sum()) // n
      mask = batchwise_mask(probs, m, valid)
      res["batchwise_loss"] = w_batchwise * batchwise_threshold_loss(
          probs, t, mask, valid
      )
      res["threshold_grad"] = w_batchwise * batchwise_threshold_grad(
          probs, t, mask, valid
      )
    else:
      mask = threshold_mask(probs, t)
    gates = masked_gates(probs, mask)
    res["probs"] = probs
  else:
    raise ValueError(gating)
  gates = gates * valid[:, None]
  counts = (gates[valid] != 0).sum(axis=0).astype(np.float64)
  importance = gates[valid].sum(axis=0)
  if load is None:
    load = counts
  if training:
    res["importance_loss"] = w_importance * cv_squared(importance)
    if gating == "noisy_top_k":
      res["load_loss"] = w_load * cv_squared(load)
  experts = expert_outputs(
      x,
      weights["expert_kernel_1"],
      weights["expert_kernel_2"],
      weights.get("expert_bias_1"),
      weights.get("expert_bias_2"),
  )
  used = gates
  res["dropped"], res["assignments"] = 0, int((gates != 0).sum())
  if capacity is not None:
    keep, res["dropped"], res["assignments"] = capacity_keep(gates, capacity)
    used = gates * keep
  res.update(
      output=combine(used, experts) * valid[:, None],
      gates=gates,
      importance=importance,
      load=load,
      token_counts=counts,
      total_loss=res["importance_loss"]
      + res["load_loss"]
      + res["batchwise_loss"],
  )
  return res


def hierarchical_moe(
    x,
    weights,
    k_primary,
    k_secondary,
    training=True,
    primary_noise=None,
    secondary_noise=None,
    noise_epsilon=1e-2,
    valid=None,
    w_importance=0.1,
    w_load=0.1,
    noise_scale=1.0,
):
  """Reference for HierarchicalSparseMoE, appendix B eqs 12-14.

  weights: w_gate/w_noise [d, a], w_gate_secondary/w_noise_secondary [a, d, b],
  expert kernels [a*b, d, h], [a*b, h, d_out] (expert (i, j) at row i*b + j).

  Returns:
    dict with output, primary gates [N, a], secondary gates [N, a, b],
    importance [a*b] (eq 13), load [a*b] (eq 14), importance_loss, load_loss.
  """
  x = np.asarray(x, np.float64)
  n_tok = x.shape[0]
  valid = np.ones(n_tok, bool) if valid is None else np.asarray(valid, bool)
  wg = np.asarray(weights["w_gate"], np.float64)
  a = wg.shape[1]
  wgs = np.asarray(weights["w_gate_secondary"], np.float64)
  b = wgs.shape[2]
  clean_p = x @ wg
  if training:
    noisy_p, std_p = noisy_logits(
        clean_p,
        x @ np.asarray(weights["w_noise"], np.float64),
        primary_noise,
        noise_epsilon,
        noise_scale,
    )
  else:
    noisy_p = clean_p
  g, idx = top_k_gates(noisy_p, k_primary)
  gp = dense_gates(idx, g, a) * valid[:, None]
  gs = np.zeros((n_tok, a, b))
  load_h = np.zeros((a, b))
  load_p = None
  if training:
    load_p = load_probabilities(clean_p, noisy_p, std_p, k_primary)[valid].sum(
        axis=0
    )
  for i in range(a):
    clean_s = x @ wgs[i]
    if training:
      noisy_s, std_s = noisy_logits(
          clean_s,
          x @ np.asarray(weights["w_noise_secondary"][i], np.float64),
          secondary_noise[:, i, :],
          noise_epsilon,
          noise_scale,
      )
    else:
      noisy_s = clean_s
    gsi, idx_s = top_k_gates(noisy_s, k_secondary)
    gs[:, i, :] = dense_gates(idx_s, gsi, b)
    if training:
      in_group = valid & (gp[:, i] > 0)
      p_s = load_probabilities(clean_s, noisy_s, std_s, k_secondary)
      load_i = p_s[in_group].sum(axis=0)
      size = in_group.sum()
      load_h[i] = load_p[i] * load_i / size if size > 0 else 0.0
  combined = gp[:, :, None] * gs  # [N, a, b]
  importance = combined[valid].sum(axis=0).reshape(-1)
  experts = expert_outputs(
      x,
      weights["expert_kernel_1"],
      weights["expert_kernel_2"],
      weights.get("expert_bias_1"),
      weights.get("expert_bias_2"),
  )
  out = combine(combined.reshape(n_tok, a * b), experts) * valid[:, None]
  res = dict(
      output=out,
      primary_gates=gp,
      secondary_gates=gs,
      importance=importance,
      load=load_h.reshape(-1),
      load_primary=load_p,
  )
  res["importance_loss"] = (
      w_importance * cv_squared(importance) if training else 0.0
  )
  res["load_loss"] = (
      w_load * cv_squared(load_h.reshape(-1)) if training else 0.0
  )
  res["total_loss"] = res["importance_loss"] + res["load_loss"]
  return res


# --------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------


def random_flat_weights(
    rng,
    d,
    n,
    h,
    d_out,
    gate_scale=1.0,
    noise_scale=0.5,
    use_bias=False,
    batchwise=False,
):
  """Random float32 weights for SparseMoE, keyed by the layer's variable names."""
  w = {
      "w_gate": rng.normal(0, gate_scale, (d, n)),
      "w_noise": rng.normal(0, noise_scale, (d, n)),
      "expert_kernel_1": rng.normal(0, 1 / math.sqrt(d), (n, d, h)),
      "expert_kernel_2": rng.normal(0, 1 / math.sqrt(h), (n, h, d_out)),
  }
  if use_bias:
    w["expert_bias_1"] = rng.normal(0, 0.1, (n, h))
    w["expert_bias_2"] = rng.normal(0, 0.1, (n, d_out))
  if batchwise:
    w["thresholds"] = rng.uniform(0.05, 0.3, (n,))
  return {key: v.astype(np.float32) for key, v in w.items()}


def random_hier_weights(
    rng, d, a, b, h, d_out, gate_scale=1.0, noise_scale=0.5
):
  """Random float32 weights for HierarchicalSparseMoE."""
  w = {
      "w_gate": rng.normal(0, gate_scale, (d, a)),
      "w_noise": rng.normal(0, noise_scale, (d, a)),
      "w_gate_secondary": rng.normal(0, gate_scale, (a, d, b)),
      "w_noise_secondary": rng.normal(0, noise_scale, (a, d, b)),
      "expert_kernel_1": rng.normal(0, 1 / math.sqrt(d), (a * b, d, h)),
      "expert_kernel_2": rng.normal(0, 1 / math.sqrt(h), (a * b, h, d_out)),
  }
  return {key: v.astype(np.float32) for key, v in w.items()}


def assign_weights(layer, weights):
  """Assign each named numpy array to the layer attribute of the same name.

  Expert weights of a per-expert layout (`expert_parts`) are assigned as
  their stacked [n, ...] value.

  W_noise is skipped for a SparseMoE whose gating has no noise (the layer
  does not create it); the references do not read it for those gatings.
  """
  for name, value in weights.items():
    if name == "w_noise" and getattr(layer, "gating", "") not in (
        "",
        "noisy_top_k",
    ):
      continue
    if name in (getattr(layer, "expert_parts", None) or {}):
      layer.set_expert_weight(name, value)
    else:
      getattr(layer, name).assign(value)


def named_gradients(layer, grads):
  """{weight name: numpy gradient} of `layer.trainable_variables`' `grads`.

  Per-expert parts (`expert_parts`, "expert_kernel_1_{i}") come back
  stacked under their weight's name, so either layout gives the same dict;
  a None gradient is zeros.
  """
  import keras  # pylint: disable=g-import-not-at-top

  as_np = lambda v, g: (
      np.zeros(v.shape) if g is None else keras.ops.convert_to_numpy(g)
  )
  by_var = {
      id(v): as_np(v, g) for v, g in zip(layer.trainable_variables, grads)
  }
  parts = getattr(layer, "expert_parts", None) or {}
  in_parts = {id(v) for vs in parts.values() for v in vs}
  named = {
      v.name: by_var[id(v)]
      for v in layer.trainable_variables
      if id(v) not in in_parts
  }
  for name, vs in parts.items():
    named[name] = np.stack([by_var[id(v)] for v in vs])
  return named


def reveal_gates(layer, n, d, h):
  """Makes a built SparseMoE's output show its gates: y[:, :n] = G(x).

  Expert i outputs the unit vector e_i whatever its input (zero W1, hidden
  bias 1 on unit 0, W2_i[0] = e_i); needs `use_bias=True` and d >= n. The
  gating weights are left as they are (zero in a fresh layer).

  Args:
    layer: a built SparseMoE with n experts of hidden size h, width d.
    n: number of experts.
    d: input/output width.
    h: expert hidden size.

  Returns:
    The layer.
  """
  w2 = np.zeros((n, h, d), np.float32)
  w2[np.arange(n), 0, np.arange(n)] = 1.0
  b1 = np.zeros((n, h), np.float32)
  b1[:, 0] = 1.0
  assign_weights(
      layer,
      {
          "expert_kernel_1": np.zeros((n, d, h), np.float32),
          "expert_bias_1": b1,
          "expert_kernel_2": w2,
          "expert_bias_2": np.zeros((n, d), np.float32),
      },
  )
  return layer
