"""KeepTopK (eq. 5) with tied logits: no expert loses its tokens to index order.

A fresh layer without gate noise has W_g = 0, so every logit is 0: with ties
going to the lower index, every token would keep experts 0..k-1 and the
other n - k experts would get nothing. In training `gating.rotated_top_k`
ranks ties by a rotation per token; checked here against an independent
numpy ranking and by counting, from the layer's output, which experts each
token reached. At inference a token's experts depend on the token alone.
"""

from keras import ops
import numpy as np
import pytest

from moe_keras.layers import SparseMoE
from moe_keras.layers import gating
import numpy_reference as ref

D, H = 8, 16


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


def _reference_top_k(logits, k):
  """Numpy: per row j, by value descending, ties by (i - j k mod n) mod n."""
  logits = np.asarray(logits, np.float64)
  num_rows, n = logits.shape
  offsets = (np.arange(num_rows) * k) % n
  tie_key = (np.arange(n)[None, :] - offsets[:, None]) % n
  order = np.lexsort((tie_key, -logits), axis=-1)[:, :k]
  return np.take_along_axis(logits, order, axis=-1), order


@pytest.mark.parametrize("n,k,rows", [(8, 3, 37), (5, 2, 11), (4, 4, 6)])
def test_rotated_top_k_matches_an_independent_ranking(n, k, rows):
  rng = np.random.default_rng(n * 10 + k)
  # Values from {0, 1, 2}: most rows have ties, some rows are all equal.
  logits = rng.integers(0, 3, size=(rows, n)).astype(np.float32)
  logits[::5] = 1.0
  values, indices = gating.rotated_top_k(ops.convert_to_tensor(logits), k)
  want_values, want_indices = _reference_top_k(logits, k)
  np.testing.assert_array_equal(_np(indices), want_indices)
  np.testing.assert_array_equal(_np(values), want_values)


def test_rotated_top_k_without_ties_is_plain_top_k():
  logits = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
  values, indices = gating.rotated_top_k(ops.convert_to_tensor(logits), 4)
  np.testing.assert_array_equal(_np(indices), ref.top_k_indices(logits, 4))
  np.testing.assert_array_equal(_np(values), -np.sort(-logits, axis=-1)[:, :4])


def _gate_revealing_layer(n, k, gating_name):
  """A fresh layer (W_g = W_noise = 0) whose output y[:, :n] is G(x)."""
  layer = SparseMoE(
      num_experts=n, k=k, expert_hidden_dim=H, gating=gating_name, use_bias=True
  )
  layer.build((None, D))
  return ref.reveal_gates(layer, n, D, H)


@pytest.mark.parametrize("n,k,n_tok", [(8, 2, 512), (6, 4, 50), (4, 1, 7)])
def test_fresh_top_k_layer_spreads_tied_tokens_over_every_expert(n, k, n_tok):
  layer = _gate_revealing_layer(n, k, "top_k")
  np.testing.assert_array_equal(_np(layer.w_gate), 0.0)
  x = np.random.default_rng(n_tok).normal(size=(n_tok, D)).astype(np.float32)
  gates = _np(layer(x, training=True))[:, :n]
  per_token = (gates > 0).sum(axis=1)
  per_expert = (gates > 0).sum(axis=0)
  np.testing.assert_array_equal(per_token, np.full(n_tok, k))
  assert per_expert.sum() == n_tok * k
  assert per_expert.min() == (n_tok * k) // n, per_expert
  assert per_expert.max() == -(-(n_tok * k) // n), per_expert
  # Tied logits give each kept expert the same gate, 1/k.
  np.testing.assert_allclose(gates[gates > 0], 1.0 / k, rtol=1e-6)


@pytest.mark.parametrize("gating_name", ["top_k", "noisy_top_k"])
def test_inference_routing_does_not_depend_on_batch_position(gating_name):
  """Step decoding and teacher forcing put a token at different rows."""
  n, k = 8, 2
  layer = _gate_revealing_layer(n, k, gating_name)
  x = np.random.default_rng(5).normal(size=(24, D)).astype(np.float32)
  gates = _np(layer(x, training=False))[:, :n]
  reversed_gates = _np(layer(x[::-1].copy(), training=False))[:, :n]
  one_by_one = np.concatenate(
      [_np(layer(x[i : i + 1], training=False))[:, :n] for i in range(3)]
  )
  # The chosen experts are exactly the same; the gate values may differ in
  # the last bit, because a 1-row and a 24-row matmul are different BLAS
  # kernels (oneDNN on an AMD EPYC: 0.5 against 0.49999997).
  for got, want in ((reversed_gates[::-1], gates), (one_by_one, gates[:3])):
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_rotated_top_k_numbers_valid_rows_only():
  """Padding rows do not take a place in the rotation (numpy by hand)."""
  n, k = 6, 2
  valid = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0, 1], bool)
  logits = np.zeros((valid.size, n), np.float32)
  _, indices = gating.rotated_top_k(
      ops.convert_to_tensor(logits), k, valid=ops.convert_to_tensor(valid)
  )
  # Valid token v (v-th valid row) keeps experts (2v, 2v + 1) mod 6; a
  # padding row takes the numbering of the next valid row. By hand:
  want = [
      [0, 1],  # valid 0
      [2, 3],  # padding
      [2, 3],  # padding
      [2, 3],  # valid 1
      [4, 5],  # valid 2
      [0, 1],  # padding
      [0, 1],  # valid 3
      [2, 3],  # valid 4
      [4, 5],  # padding
      [4, 5],  # valid 5
  ]
  np.testing.assert_array_equal(_np(indices), want)


@pytest.mark.parametrize("n,k,n_tok", [(8, 2, 100), (5, 3, 31)])
def test_fresh_top_k_layer_balances_the_valid_tokens_of_a_padded_batch(
    n, k, n_tok
):
  layer = _gate_revealing_layer(n, k, "top_k")
  rng = np.random.default_rng(n_tok)
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  valid = rng.random(n_tok) < 0.6  # padding interleaved at random
  gates = _np(layer(x, training=True, mask=valid))[:, :n]
  assert not gates[~valid].any()
  per_expert = (gates[valid] > 0).sum(axis=0)
  num_valid = int(valid.sum())
  np.testing.assert_array_equal((gates[valid] > 0).sum(axis=1), k)
  assert per_expert.min() == (num_valid * k) // n, per_expert
  assert per_expert.max() == -(-(num_valid * k) // n), per_expert
