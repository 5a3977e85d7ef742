"""Beam and greedy search against a hand-written numpy exhaustive search.

The step function is a fixed random recurrent model (prefix-dependent, not
Markov): h' = tanh(h A + E[token]), log p(. | prefix) = log_softmax(h' B).
The numpy reference enumerates every sequence of the search space (ending in
EOS with at most max_len tokens, or exactly max_len tokens without EOS) and
scores it with GNMT's length penalty written out by hand.
"""

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from moe_keras.models import beam_search

V, H, EOS, START = 4, 5, 1, 0


def _model(seed):
  rng = np.random.default_rng(seed)
  return {
      "A": rng.normal(size=(H, H)),
      "E": rng.normal(size=(V, H)),
      "B": 2.0 * rng.normal(size=(H, V)),
  }


def _np_step(m, h, token):
  h = np.tanh(h @ m["A"] + m["E"][token])
  logits = h @ m["B"]
  logits = logits - logits.max()
  return h, logits - np.log(np.exp(logits).sum())


def _np_exhaustive(m, h0, max_len, alpha):
  """All sequences of the search space, best first: (score, tokens)."""
  out = []
  for length in range(1, max_len + 1):
    for seq in itertools.product(range(V), repeat=length):
      if EOS in seq[:-1]:
        continue
      if length < max_len and seq[-1] != EOS:
        continue
      h, prev, total = h0, START, 0.0
      for tok in seq:
        h, lp = _np_step(m, h, prev)
        total += lp[tok]
        prev = tok
      lp_pen = ((5.0 + length) / 6.0) ** alpha
      out.append((total / lp_pen, list(seq)))
  out.sort(key=lambda x: -x[0])
  return out


def _np_greedy(m, h0, max_len):
  h, prev, seq = h0, START, []
  for _ in range(max_len):
    h, lp = _np_step(m, h, prev)
    prev = int(np.argmax(lp))
    seq.append(prev)
    if prev == EOS:
      break
  return seq


def _tf_step(m):
  a, e, b = (tf.constant(m[x], tf.float32) for x in ("A", "E", "B"))

  def step(ids, state, t):
    del t
    h = tf.tanh(state["h"] @ a + tf.gather(e, ids))
    return tf.nn.log_softmax(h @ b), {"h": h}

  return step


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_large_beam_equals_exhaustive_batched(alpha):
  m = _model(0)
  rng = np.random.default_rng(1)
  h0 = rng.normal(size=(3, H))
  max_lens = np.array([3, 2, 4])
  # Candidates per step <= V * (V-1)^(max_len-1) = 4 * 27 = 108.
  k = 108
  out = beam_search.beam_search(
      _tf_step(m),
      {"h": tf.constant(h0, tf.float32)},
      tf.constant(max_lens),
      beam_size=k,
      start_id=START,
      eos_id=EOS,
      alpha=alpha,
  )
  for b in range(3):
    ref = _np_exhaustive(m, h0[b], int(max_lens[b]), alpha)
    scores = out["scores"][b].numpy()
    n_valid = int(np.isfinite(scores).sum())
    assert n_valid == min(k, len(ref))
    for i in range(n_valid):
      length = int(out["lengths"][b, i])
      got = list(out["ids"][b, i, :length].numpy())
      assert got == ref[i][1], (b, i)
      np.testing.assert_allclose(scores[i], ref[i][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_small_beam_top1_and_early_stop(alpha):
  # K=8 is not exhaustive, but every returned hypothesis must be a sequence of
  # the space with its exact score, sorted.
  m = _model(2)
  h0 = np.random.default_rng(3).normal(size=(2, H))
  out = beam_search.beam_search(
      _tf_step(m),
      {"h": tf.constant(h0, tf.float32)},
      tf.constant([4, 4]),
      beam_size=8,
      start_id=START,
      eos_id=EOS,
      alpha=alpha,
  )
  for b in range(2):
    ref = {tuple(s): sc for sc, s in _np_exhaustive(m, h0[b], 4, alpha)}
    scores = out["scores"][b].numpy()
    assert np.all(np.diff(scores) <= 1e-6)
    for i in range(8):
      seq = tuple(out["ids"][b, i, : int(out["lengths"][b, i])].numpy())
      np.testing.assert_allclose(scores[i], ref[seq], rtol=1e-5, atol=1e-5)


def test_greedy_equals_beam_one_and_numpy():
  m = _model(4)
  h0 = np.random.default_rng(5).normal(size=(6, H))
  max_lens = np.array([1, 2, 3, 5, 6, 7])
  state = {"h": tf.constant(h0, tf.float32)}
  greedy = beam_search.greedy_search(
      _tf_step(m), state, tf.constant(max_lens), start_id=START, eos_id=EOS
  )
  beam1 = beam_search.beam_search(
      _tf_step(m),
      state,
      tf.constant(max_lens),
      beam_size=1,
      start_id=START,
      eos_id=EOS,
      alpha=0.6,
  )
  for b in range(6):
    ref = _np_greedy(m, h0[b], int(max_lens[b]))
    n = int(greedy["lengths"][b])
    assert list(greedy["ids"][b, :n].numpy()) == ref
    assert np.all(greedy["ids"][b, n:].numpy() == 0)
    assert int(beam1["lengths"][b, 0]) == n
    assert list(beam1["ids"][b, 0, :n].numpy()) == ref
    np.testing.assert_allclose(
        beam1["log_probs"][b, 0], greedy["log_probs"][b], rtol=1e-5
    )


def test_traces_in_tf_function():
  m = _model(6)
  step = _tf_step(m)

  @tf.function(
      input_signature=[
          tf.TensorSpec([None, H]),
          tf.TensorSpec([None], tf.int32),
      ]
  )
  def decode(h, lens):
    return beam_search.beam_search(
        step, {"h": h}, lens, beam_size=3, start_id=START, eos_id=EOS
    )["ids"]

  ids = decode(tf.zeros([2, H]), tf.constant([3, 5]))
  assert ids.shape[:2] == (2, 3)


def test_length_penalty_values():
  np.testing.assert_allclose(
      beam_search.length_penalty(tf.constant([1, 5]), 0.6).numpy(),
      [1.0, (10.0 / 6.0) ** 0.6],
      rtol=1e-6,
  )
  np.testing.assert_array_equal(
      beam_search.max_decode_lengths(tf.constant([0, 3, 50]), 2.0, 1, 40),
      [1, 7, 40],
  )
