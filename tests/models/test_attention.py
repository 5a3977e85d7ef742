"""SourceAttention against a float64 numpy reference of eqs. (21) and (22)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from moe_keras.models import attention


def _numpy_attention(x, y, u, w, v, mask, kind):
  """Per pair (i, j) scores written from the paper, then masked softmax."""
  b, s, _ = x.shape
  t = y.shape[1]
  scores = np.zeros((b, t, s))
  for bi in range(b):
    for j in range(t):
      for i in range(s):
        xu = x[bi, i] @ u
        yw = y[bi, j] @ w
        if kind == "factored":  # eq. (22)
          scores[bi, j, i] = np.sum(v * np.tanh(xu) * np.tanh(yw))
        else:  # eq. (21)
          scores[bi, j, i] = np.sum(v * np.tanh(xu + yw))
  weights = np.zeros_like(scores)
  for bi in range(b):
    valid = mask[bi]
    if not valid.any():
      continue
    s = scores[bi][:, valid]
    e = np.exp(s - s.max(-1, keepdims=True))
    weights[bi][:, valid] = e / e.sum(-1, keepdims=True)
  context = np.einsum("bts,bsd->btd", weights, x)
  return context, weights


@pytest.mark.parametrize("kind", ["factored", "additive"])
def test_matches_numpy_with_mask(kind):
  rng = np.random.default_rng(0)
  b, s, t, ds, dt, n = 3, 5, 4, 6, 7, 8
  x = rng.normal(size=(b, s, ds)).astype("float32")
  y = rng.normal(size=(b, t, dt)).astype("float32")
  mask = np.array(
      [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool
  )
  layer = attention.SourceAttention(n, kind=kind)
  context, weights = layer(y, x, memory_mask=mask, return_weights=True)
  u, w, v = (np.asarray(a, np.float64) for a in (layer.u, layer.w, layer.v))
  ref_c, ref_w = _numpy_attention(
      x.astype(np.float64), y.astype(np.float64), u, w, v, mask, kind
  )
  np.testing.assert_allclose(np.asarray(weights), ref_w, atol=1e-5)
  np.testing.assert_allclose(np.asarray(context), ref_c, atol=1e-5)
  # All-padding source: zero context.
  assert np.all(np.asarray(context)[2] == 0.0)


def test_single_step_equals_sequence():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 4)).astype("float32")
  y = rng.normal(size=(2, 3, 4)).astype("float32")
  layer = attention.SourceAttention(6)
  full = np.asarray(layer(y, x))
  keys = layer.precompute(x)
  for j in range(3):
    step, _ = layer.attend(y[:, j], keys, x)
    np.testing.assert_allclose(np.asarray(step), full[:, j], atol=1e-6)


def test_bad_kind():
  with pytest.raises(ValueError, match="unknown attention kind"):
    attention.SourceAttention(4, kind="dot")
