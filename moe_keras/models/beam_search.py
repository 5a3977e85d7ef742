"""Greedy and batched beam search with GNMT's length penalty.

Both searches drive a step function with explicit cached state:

  step_fn(ids int32 [N], state, t) -> (log_probs float32 [N, V], new_state)

`ids` are the previous tokens (the start id at t = 0), `state` is any nest of
tensors whose leading axis is N, and `t` the int32 step. The searches are
written with TensorFlow ops (`tf.while_loop`), so they trace into a
`tf.function` and export in a SavedModel; they need the TensorFlow backend.

Beam search (classic form, as in GNMT / OpenNMT): at every step the K best
of the K*V one-token extensions of the alive hypotheses are kept (ranked by
log probability, which at a fixed length ranks as the normalized score).
Those ending in EOS (or reaching their maximum length) move to a pool of
finished hypotheses, ranked by

  score(Y) = log P(Y) / lp(Y),   lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha,

with |Y| the number of generated tokens including EOS; they no longer take a
beam slot, so the alive beam shrinks. The search ends for an example when no
hypothesis is alive, at its maximum length, or when no alive hypothesis can
still enter the K best finished ones (log P only decreases, so the bound is
log P / max(lp) over the remaining lengths). With beam size 1 it is exactly
greedy search; with K at least the number of candidates at every step it is
exhaustive and returns the K best sequences of the whole search space.

A hypothesis that reaches its maximum length without EOS is finished as is.
"""

import tensorflow as tf

NEG_INF = float("-inf")
LENGTH_PENALTY_BASE = 5.0


def length_penalty(length, alpha):
  """GNMT's lp(Y) = ((5 + |Y|)^alpha) / ((5 + 1)^alpha).

  Args:
    length: float or int tensor of lengths |Y| (generated tokens incl. EOS).
    alpha: float; 0 disables the penalty (lp = 1).

  Returns:
    float32 tensor of the same shape.
  """
  length = tf.cast(length, tf.float32)
  return tf.pow(
      (LENGTH_PENALTY_BASE + length) / (LENGTH_PENALTY_BASE + 1.0), alpha
  )


def max_decode_lengths(source_lengths, ratio=2.0, offset=10, maximum=None):
  """Per-example maximum output length relative to the source length.

  Args:
    source_lengths: int [B] source lengths in tokens.
    ratio, offset: max_len = floor(ratio * source_length) + offset.
    maximum: optional cap (int).

  Returns:
    int32 [B], at least 1.
  """
  lengths = tf.cast(
      tf.floor(tf.cast(source_lengths, tf.float32) * ratio), tf.int32
  ) + int(offset)
  if maximum is not None:
    lengths = tf.minimum(lengths, int(maximum))
  return tf.maximum(lengths, 1)


def _tile_state(state, beam_size):
  """[B, ...] -> [B * K, ...] (each row repeated K times, consecutively)."""
  return tf.nest.map_structure(lambda x: tf.repeat(x, beam_size, axis=0), state)


def _gather_beams(state, indices, batch_size, beam_size):
  """Reorders a [B * K, ...] nest by per-example beam indices [B, K]."""
  flat = tf.reshape(indices + tf.range(batch_size)[:, None] * beam_size, [-1])
  return tf.nest.map_structure(lambda x: tf.gather(x, flat), state)


def _shape_invariant(x):
  """Leading (batch) axis free, inner axes as they are."""
  if x.shape.rank == 0:
    return tf.TensorShape([])
  return tf.TensorShape([None]).concatenate(x.shape[1:])


def greedy_search(step_fn, initial_state, max_lengths, *, start_id, eos_id):
  """Greedy decoding: the most probable token at every step.

  Args:
    step_fn: see the module docstring.
    initial_state: nest of [B, ...] tensors.
    max_lengths: int32 [B] maximum generated tokens per example (incl. EOS).
    start_id: id fed at step 0.
    eos_id: end-of-sequence id; decoding of an example stops after it.

  Returns:
    dict: ids int32 [B, T] (T = max(max_lengths); EOS included, then 0),
    lengths int32 [B] (tokens incl. EOS), log_probs float32 [B].
  """
  max_lengths = tf.cast(max_lengths, tf.int32)
  batch_size = tf.shape(max_lengths)[0]
  max_steps = tf.reduce_max(max_lengths)

  def cond(t, unused_prev, unused_state, finished, unused_ids, *unused):
    return tf.logical_and(
        t < max_steps, tf.logical_not(tf.reduce_all(finished))
    )

  def body(t, prev, state, finished, ids, lengths, total):
    log_probs, state = step_fn(prev, state, t)
    log_probs = tf.cast(log_probs, tf.float32)
    token = tf.cast(tf.argmax(log_probs, axis=-1), tf.int32)
    chosen = tf.gather(log_probs, token, batch_dims=1)
    token = tf.where(finished, 0, token)
    total = total + tf.where(finished, 0.0, chosen)
    lengths = lengths + tf.cast(tf.logical_not(finished), tf.int32)
    ids = tf.where(
        tf.equal(tf.range(max_steps), t)[None, :], token[:, None], ids
    )
    finished = tf.logical_or(finished, tf.equal(token, eos_id))
    finished = tf.logical_or(finished, t + 1 >= max_lengths)
    return t + 1, token, state, finished, ids, lengths, total

  loop_vars = (
      tf.constant(0),
      tf.fill([batch_size], tf.cast(start_id, tf.int32)),
      initial_state,
      tf.zeros([batch_size], tf.bool),
      tf.zeros([batch_size, max_steps], tf.int32),
      tf.zeros([batch_size], tf.int32),
      tf.zeros([batch_size], tf.float32),
  )
  result = tf.while_loop(
      cond,
      body,
      loop_vars,
      shape_invariants=tf.nest.map_structure(_shape_invariant, loop_vars),
  )
  _, _, _, _, ids, lengths, total = result
  return {"ids": ids, "lengths": lengths, "log_probs": total}


def beam_search(
    step_fn,
    initial_state,
    max_lengths,
    *,
    beam_size,
    start_id,
    eos_id,
    alpha=0.6,
):
  """Batched beam search with GNMT's length penalty (module docstring).

  Args:
    step_fn: see the module docstring; called with N = B * beam_size.
    initial_state: nest of [B, ...] tensors (tiled to B * K inside).
    max_lengths: int32 [B] maximum generated tokens (incl. EOS) per example.
    beam_size: K (python int >= 1).
    start_id: id fed at step 0.
    eos_id: end-of-sequence id.
    alpha: length-penalty exponent (GNMT used 0.2-0.6 with coverage; 0 is
      plain log probability).

  Returns:
    dict, hypotheses sorted best first per example:
      ids int32 [B, K, T] (EOS included when produced, then 0),
      scores float32 [B, K] (log P / lp; -inf for empty slots),
      log_probs float32 [B, K], lengths int32 [B, K].
  """
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
  k = beam_size
  max_lengths = tf.cast(max_lengths, tf.int32)
  batch_size = tf.shape(max_lengths)[0]
  max_steps = tf.reduce_max(max_lengths)
  alpha = tf.cast(alpha, tf.float32)
  eos_id = tf.cast(eos_id, tf.int32)

  state = _tile_state(initial_state, k)
  alive_lp = tf.tile(
      tf.constant([[0.0] + [NEG_INF] * (k - 1)], tf.float32), [batch_size, 1]
  )
  alive_seq = tf.zeros([batch_size, k, max_steps], tf.int32)
  fin_seq = tf.zeros([batch_size, k, max_steps], tf.int32)
  fin_scores = tf.fill([batch_size, k], NEG_INF)
  fin_lp = tf.fill([batch_size, k], NEG_INF)
  fin_len = tf.zeros([batch_size, k], tf.int32)
  prev = tf.fill([batch_size * k], tf.cast(start_id, tf.int32))

  def not_done(t, alive_lp, fin_scores):
    """[B] bool: an alive hypothesis can still enter the K best finished."""
    remaining = t < max_lengths
    best_alive = alive_lp[:, 0]
    max_lp = tf.maximum(
        length_penalty(t + 1, alpha), length_penalty(max_lengths, alpha)
    )
    bound = best_alive / max_lp
    can_improve = tf.logical_or(
        tf.math.is_inf(fin_scores[:, k - 1]), bound > fin_scores[:, k - 1]
    )
    alive = tf.math.is_finite(best_alive)
    return remaining & alive & can_improve

  def cond(t, prev, state, alive_lp, alive_seq, *finished):
    del prev, state, alive_seq
    return tf.logical_and(
        t < max_steps, tf.reduce_any(not_done(t, alive_lp, finished[1]))
    )

  def body(
      t,
      prev,
      state,
      alive_lp,
      alive_seq,
      fin_seq,
      fin_scores,
      fin_lp,
      fin_len,
  ):
    active = not_done(t, alive_lp, fin_scores)  # [B]
    log_probs, state = step_fn(prev, state, t)
    log_probs = tf.cast(log_probs, tf.float32)
    vocab = tf.shape(log_probs)[-1]
    cand = alive_lp[:, :, None] + tf.reshape(log_probs, [batch_size, k, vocab])
    cand = tf.reshape(cand, [batch_size, k * vocab])
    cand = tf.where(active[:, None], cand, NEG_INF)
    top_lp, top_idx = tf.math.top_k(cand, k=k)  # [B, K]
    parent = top_idx // vocab
    token = top_idx % vocab
    seq = tf.gather(alive_seq, parent, batch_dims=1)
    seq = tf.where(
        tf.equal(tf.range(max_steps), t)[None, None, :], token[:, :, None], seq
    )
    length = t + 1
    ends = tf.logical_or(
        tf.equal(token, eos_id), (length >= max_lengths)[:, None]
    )
    valid = tf.math.is_finite(top_lp)
    finishing = ends & valid
    new_scores = tf.where(
        finishing, top_lp / length_penalty(length, alpha), NEG_INF
    )
    # Merge the new finished hypotheses into the pool, keep the K best.
    all_scores = tf.concat([fin_scores, new_scores], axis=1)
    all_lp = tf.concat([fin_lp, tf.where(finishing, top_lp, NEG_INF)], axis=1)
    all_seq = tf.concat([fin_seq, seq], axis=1)
    all_len = tf.concat([fin_len, tf.fill([batch_size, k], length)], axis=1)
    fin_scores, keep = tf.math.top_k(all_scores, k=k)
    fin_lp = tf.gather(all_lp, keep, batch_dims=1)
    fin_seq = tf.gather(all_seq, keep, batch_dims=1)
    fin_len = tf.gather(all_len, keep, batch_dims=1)
    # Alive: the non-finishing candidates, best first.
    alive_cand = tf.where(finishing, NEG_INF, top_lp)
    alive_lp, order = tf.math.top_k(alive_cand, k=k)
    alive_seq = tf.gather(seq, order, batch_dims=1)
    parent = tf.gather(parent, order, batch_dims=1)
    token = tf.gather(token, order, batch_dims=1)
    state = _gather_beams(state, parent, batch_size, k)
    return (
        t + 1,
        tf.reshape(token, [-1]),
        state,
        alive_lp,
        alive_seq,
        fin_seq,
        fin_scores,
        fin_lp,
        fin_len,
    )

  loop_vars = (
      tf.constant(0),
      prev,
      state,
      alive_lp,
      alive_seq,
      fin_seq,
      fin_scores,
      fin_lp,
      fin_len,
  )
  invariants = tf.nest.map_structure(_shape_invariant, loop_vars)
  result = tf.while_loop(cond, body, loop_vars, shape_invariants=invariants)
  _, _, _, _, _, fin_seq, fin_scores, fin_lp, fin_len = result
  fin_len = tf.where(tf.math.is_finite(fin_scores), fin_len, 0)
  return {
      "ids": fin_seq,
      "scores": fin_scores,
      "log_probs": fin_lp,
      "lengths": fin_len,
  }
