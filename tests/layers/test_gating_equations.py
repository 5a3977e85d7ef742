"""Tests of `moe_keras.layers.gating` against the numpy reference (eqs 3-11, 15-20).

Tolerances: inputs are float32 and the functions compute in float32, while the
reference is float64, so elementwise results agree to a few float32 ulps:
rtol 1e-5 / atol 1e-6 for O(1) values. Selections (top-k indices, masks,
`kth_excluding`, which only picks an existing value) are compared exactly.
"""

from keras import ops
import numpy as np
import pytest

from moe_keras.layers import gating
import numpy_reference as ref

RTOL, ATOL = 1e-5, 1e-6


def _np(x):
  """Converts a backend tensor to a numpy array."""
  return np.asarray(ops.convert_to_numpy(x))


def _f32(x):
  """float32 backend tensor from array-like."""
  return ops.convert_to_tensor(np.asarray(x, np.float32))


@pytest.fixture
def rng():
  return np.random.default_rng(20170123)


# ---------------------------------------------------------------- eqs 7, 11


def test_cv_squared_population_variance_by_hand():
  # [1, 3]: population var 1, mean 2 -> 0.25 (the sample variance would give 0.5).
  np.testing.assert_allclose(
      _np(gating.cv_squared(_f32([1.0, 3.0]))), 0.25, rtol=RTOL
  )


def test_cv_squared_matches_reference(rng):
  x = rng.uniform(0.0, 5.0, 16).astype(np.float32)
  np.testing.assert_allclose(
      _np(gating.cv_squared(_f32(x))), ref.cv_squared(x), rtol=1e-5, atol=ATOL
  )


def test_cv_squared_constant_and_zero_vectors_are_finite_zero():
  np.testing.assert_allclose(
      _np(gating.cv_squared(_f32(np.full(8, 3.0)))), 0.0, atol=1e-7
  )
  z = _np(gating.cv_squared(_f32(np.zeros(8))))
  assert np.isfinite(z) and z == 0.0, z


# ---------------------------------------------------------------- eq 4


@pytest.mark.parametrize("noise_epsilon", [1e-2, 0.0])
def test_noisy_top_k_logits_eq4(rng, noise_epsilon):
  clean = rng.normal(size=(12, 6)).astype(np.float32)
  raw = rng.normal(scale=2.0, size=(12, 6)).astype(np.float32)
  noise = rng.normal(size=(12, 6)).astype(np.float32)
  noisy, std = gating.noisy_top_k_logits(
      _f32(clean), _f32(raw), _f32(noise), noise_epsilon
  )
  want_noisy, want_std = ref.noisy_logits(clean, raw, noise, noise_epsilon)
  np.testing.assert_allclose(_np(std), want_std, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_np(noisy), want_noisy, rtol=RTOL, atol=ATOL)
  # Softplus(0) = ln 2: the paper's initial noise std (plus epsilon).
  _, std0 = gating.noisy_top_k_logits(
      _f32(np.zeros((1, 3))),
      _f32(np.zeros((1, 3))),
      _f32(np.zeros((1, 3))),
      noise_epsilon,
  )
  np.testing.assert_allclose(_np(std0), np.log(2.0) + noise_epsilon, rtol=RTOL)


def test_noisy_top_k_logits_noise_scale(rng):
  """H = clean + z * c * (Softplus(raw) + eps), written out in numpy here."""
  clean = rng.normal(size=(12, 6)).astype(np.float32)
  raw = rng.normal(scale=2.0, size=(12, 6)).astype(np.float32)
  z = rng.normal(size=(12, 6)).astype(np.float32)
  noisy, std = gating.noisy_top_k_logits(
      _f32(clean), _f32(raw), _f32(z), 0.01, 0.1
  )
  want_std = 0.1 * (np.log1p(np.exp(raw.astype(np.float64))) + 0.01)
  np.testing.assert_allclose(_np(std), want_std, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      _np(noisy), clean + z * want_std, rtol=RTOL, atol=ATOL
  )


# ---------------------------------------------------------------- eqs 3, 5


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_gates_eqs_3_5(rng, k):
  logits = rng.normal(size=(20, 6)).astype(np.float32)
  gates, idx = gating.top_k_gates(_f32(logits), k)
  want_gates, want_idx = ref.top_k_gates(logits, k)
  assert _np(idx).dtype == np.int32
  np.testing.assert_array_equal(_np(idx), want_idx)
  np.testing.assert_allclose(_np(gates), want_gates, rtol=RTOL, atol=ATOL)
  # Literal eq 3: Softmax(KeepTopK(H, k)) over all n entries; the rest exactly 0.
  dense = _np(gating.dense_gates(idx, gates, 6))
  literal = ref.keep_top_k_softmax(logits, k)
  np.testing.assert_allclose(dense, literal, rtol=RTOL, atol=ATOL)
  assert np.all((dense == 0) == (literal == 0))
  np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=RTOL)


def test_dense_gates_scatter(rng):
  idx = np.array([[2, 0], [1, 3], [3, 2]], np.int32)
  g = np.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], np.float32)
  got = _np(gating.dense_gates(ops.convert_to_tensor(idx), _f32(g), 4))
  np.testing.assert_allclose(got, ref.dense_gates(idx, g, 4), rtol=RTOL)


# ---------------------------------------------------------------- eqs 8, 9


def test_kth_excluding_by_hand():
  v = _f32([[3.0, 1.0, 2.0, 5.0]])
  # k=2: drop 3 -> {5,2,1}: 2; drop 1 -> {5,3,2}: 3; drop 2 -> {5,3,1}: 3; drop 5 -> {3,2,1}: 2.
  np.testing.assert_array_equal(
      _np(gating.kth_excluding(v, 2)), [[2.0, 3.0, 3.0, 2.0]]
  )
  # k=1: largest of the others.
  np.testing.assert_array_equal(
      _np(gating.kth_excluding(v, 1)), [[5.0, 5.0, 5.0, 3.0]]
  )


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_kth_excluding_matches_definition(rng, k):
  v = rng.normal(size=(16, 6)).astype(np.float32)
  # kth_excluding only selects an existing entry, so equality is exact.
  np.testing.assert_array_equal(
      _np(gating.kth_excluding(_f32(v), k)), ref.kth_excluding(v, k)
  )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_probabilities_eq9(rng, k):
  clean = rng.normal(size=(24, 6)).astype(np.float32)
  raw = rng.normal(size=(24, 6)).astype(np.float32)
  noise = rng.normal(size=(24, 6)).astype(np.float32)
  noisy, std = ref.noisy_logits(clean, raw, noise, 1e-2)
  noisy, std = noisy.astype(np.float32), std.astype(np.float32)
  got = _np(gating.load_probabilities(_f32(clean), _f32(noisy), _f32(std), k))
  want = ref.load_probabilities(clean, noisy, std, k)
  assert got.shape == (24, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_noisy_top_k_one_top_k_for_eqs_3_5_8_9(rng, k):
  """The fused training gate (one top-(k+1)) equals eqs. 3-5 and 8-9."""
  clean = rng.normal(size=(24, 6)).astype(np.float32)
  raw = rng.normal(size=(24, 6)).astype(np.float32)
  noise = rng.normal(size=(24, 6)).astype(np.float32)
  gates, idx, probs = gating.noisy_top_k(
      _f32(clean), _f32(raw), _f32(noise), k, 1e-2
  )
  noisy, std = ref.noisy_logits(clean, raw, noise, 1e-2)
  want_gates, want_idx = ref.top_k_gates(noisy, k)
  np.testing.assert_array_equal(_np(idx), want_idx)
  np.testing.assert_allclose(_np(gates), want_gates, rtol=RTOL, atol=ATOL)
  want_p = ref.load_probabilities(clean, noisy, std, k)
  np.testing.assert_allclose(_np(probs), want_p, rtol=1e-5, atol=2e-6)


def test_load_probabilities_match_monte_carlo():
  """P(x,i) (eq 9) vs the probability it models (eq 8), estimated by redrawing
  only expert i's noise. Agreement within 5 standard errors for every (x, i)."""
  rng = np.random.default_rng(7)
  n, k, rows, draws = 6, 2, 4, 40000
  clean = rng.normal(scale=0.7, size=(rows, n)).astype(np.float32)
  raw = rng.normal(scale=0.5, size=(rows, n)).astype(np.float32)
  noise = rng.normal(size=(rows, n)).astype(np.float32)
  noisy, std = ref.noisy_logits(clean, raw, noise, 1e-2)
  noisy, std = noisy.astype(np.float32), std.astype(np.float32)
  p = _np(gating.load_probabilities(_f32(clean), _f32(noisy), _f32(std), k))
  interior = 0
  for r in range(rows):
    for i in range(n):
      mc = ref.monte_carlo_in_top_k(
          clean[r], std[r].astype(np.float64), noise[r], i, k, draws, rng
      )
      se = np.sqrt(max(p[r, i] * (1 - p[r, i]), 1e-4) / draws)
      assert abs(p[r, i] - mc) < 5 * se + 1e-6, (r, i, p[r, i], mc, se)
      interior += 0.05 < p[r, i] < 0.95
  assert interior >= 6, "test data too easy: too few P(x,i) away from 0 and 1"


# ---------------------------------------------------------------- appendix F


def test_batchwise_mask_eq18(rng):
  probs = ref.softmax(rng.normal(size=(20, 5))).astype(np.float32)
  got = _np(gating.batchwise_mask(_f32(probs), 4))
  want = ref.batchwise_mask(probs, 4)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got.sum(axis=0), np.full(5, 4.0))


def test_batchwise_mask_valid_rows_and_tensor_m(rng):
  probs = ref.softmax(rng.normal(size=(20, 5))).astype(np.float32)
  valid = np.ones(20, bool)
  valid[[0, 3, 4, 11, 19]] = False
  # Put the largest probabilities on invalid rows: they must not be chosen.
  probs[~valid] = probs[~valid] + 1.0
  got = _np(
      gating.batchwise_mask(
          _f32(probs),
          ops.convert_to_tensor(3),
          valid=ops.convert_to_tensor(valid),
      )
  )
  want = ref.batchwise_mask(probs, 3, valid)
  np.testing.assert_array_equal(got, want)
  assert np.all(got[~valid] == 0)
  np.testing.assert_array_equal(got.sum(axis=0), np.full(5, 3.0))


def test_threshold_mask_eq19(rng):
  probs = ref.softmax(rng.normal(size=(20, 5))).astype(np.float32)
  t = rng.uniform(0.1, 0.3, 5).astype(np.float32)
  np.testing.assert_array_equal(
      _np(gating.threshold_mask(_f32(probs), _f32(t))),
      ref.threshold_mask(probs, t),
  )


def test_batchwise_threshold_loss_eq20(rng):
  probs = ref.softmax(rng.normal(size=(20, 5))).astype(np.float32)
  t = rng.uniform(0.1, 0.3, 5).astype(np.float32)
  valid = rng.uniform(size=20) > 0.2
  bm = ref.batchwise_mask(probs, 3, valid).astype(np.float32)
  got = _np(
      gating.batchwise_threshold_loss(
          _f32(probs), _f32(t), _f32(bm), valid=ops.convert_to_tensor(valid)
      )
  )
  want = ref.batchwise_threshold_loss(probs, t, bm, valid)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Without `valid` every row counts.
  got_all = _np(gating.batchwise_threshold_loss(_f32(probs), _f32(t), _f32(bm)))
  np.testing.assert_allclose(
      got_all, ref.batchwise_threshold_loss(probs, t, bm), rtol=1e-5, atol=1e-6
  )


def test_masked_gates_eq16(rng):
  probs = ref.softmax(rng.normal(size=(10, 5))).astype(np.float32)
  mask = (rng.uniform(size=(10, 5)) > 0.5).astype(np.float32)
  mask[3] = 0.0  # A row no expert admits: gates must be all zero, not NaN.
  got = _np(gating.masked_gates(_f32(probs), _f32(mask)))
  want = ref.masked_gates(probs, mask)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(got[3], np.zeros(5))
