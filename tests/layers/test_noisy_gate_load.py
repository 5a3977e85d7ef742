"""Tests of the training gate with its load, eqs. (3)-(5) and (8)-(10), and
of the noise draws of eq. (4).

`gating.noisy_top_k_load` is `noisy_top_k` followed by `load`; on TensorFlow
it has a hand-written backward pass (`backend_ops.noisy_top_k_load_tf`).
References: the float64 numpy reference (values), central differences of it
(gradients) and, on TensorFlow, autodiff of the composition of the per-
equation functions (gradients, to float32 round-off). The noise draws
(Box-Muller on TensorFlow) are checked against the standard normal's CDF and
moments.
"""

import math

import keras
from keras import ops
import numpy as np
import pytest

from moe_keras.layers import backend_ops
from moe_keras.layers import gating
import numpy_reference as ref

N, NUM_EXPERTS = 12, 6


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


def _f32(x):
  return ops.convert_to_tensor(np.asarray(x, np.float32))


def _inputs(seed, with_valid):
  rng = np.random.default_rng(seed)
  clean = rng.normal(size=(N, NUM_EXPERTS)).astype(np.float32)
  raw = rng.normal(size=(N, NUM_EXPERTS)).astype(np.float32)
  noise = rng.normal(size=(N, NUM_EXPERTS)).astype(np.float32)
  valid = None
  if with_valid:
    valid = (rng.uniform(size=N) > 0.3).astype(np.float32)
    valid[0] = 0.0
  return clean, raw, noise, valid


def _reference(clean, raw, noise, valid, k, epsilon, scale):
  """(gates, indices, load) in float64 from the numpy reference."""
  noisy, std = ref.noisy_logits(clean, raw, noise, epsilon, scale)
  gates, indices = ref.top_k_gates(noisy, k)
  probs = ref.load_probabilities(clean, noisy, std, k)
  if valid is not None:
    probs = probs * valid[:, None]
  return gates, indices, probs.sum(axis=0)


CASES = [
    # (k, noise_epsilon, noise_scale, with_valid)
    (1, 1e-2, 1.0, False),
    (2, 1e-2, 1.0, True),
    (2, 0.0, 0.5, False),
    (5, 1e-2, 2.0, True),
    (6, 1e-2, 1.0, True),  # k == n: every P is 1 (composition path).
]


@pytest.mark.parametrize("k,epsilon,scale,with_valid", CASES)
def test_values_match_reference(k, epsilon, scale, with_valid):
  clean, raw, noise, valid = _inputs(1, with_valid)
  gates, indices, load = gating.noisy_top_k_load(
      _f32(clean),
      _f32(raw),
      _f32(noise),
      k,
      epsilon,
      scale,
      valid=None if valid is None else _f32(valid),
  )
  want_gates, want_indices, want_load = _reference(
      clean, raw, noise, valid, k, epsilon, scale
  )
  np.testing.assert_array_equal(_np(indices), want_indices)
  np.testing.assert_allclose(_np(gates), want_gates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_np(load), want_load, rtol=1e-5, atol=1e-5)
  assert _np(indices).dtype == np.int32


def _tf_or_skip():
  if keras.backend.backend() != "tensorflow":
    pytest.skip("gradients taken with tf.GradientTape")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


def _weights(k, seed=5):
  rng = np.random.default_rng(seed)
  return (
      rng.normal(size=(N, k)).astype(np.float32),
      rng.normal(size=NUM_EXPERTS).astype(np.float32),
  )


def _tf_gradients(fn, clean, raw, w_gates, w_load):
  """d/d(clean, raw) of sum(gates * w_gates) + sum(load * w_load)."""
  tf = _tf_or_skip()
  clean_t, raw_t = tf.constant(clean), tf.constant(raw)
  with tf.GradientTape() as tape:
    tape.watch([clean_t, raw_t])
    gates, _, load = fn(clean_t, raw_t)
    loss = tf.reduce_sum(gates * w_gates) + tf.reduce_sum(load * w_load)
  return [g.numpy() for g in tape.gradient(loss, [clean_t, raw_t])]


@pytest.mark.parametrize("k,epsilon,scale,with_valid", CASES)
def test_gradients_match_central_differences(k, epsilon, scale, with_valid):
  clean, raw, noise, valid = _inputs(2, with_valid)
  w_gates, w_load = _weights(k)
  got = _tf_gradients(
      lambda c, r: gating.noisy_top_k_load(
          c,
          r,
          _f32(noise),
          k,
          epsilon,
          scale,
          valid=None if valid is None else _f32(valid),
      ),
      clean,
      raw,
      w_gates,
      w_load,
  )

  def loss(c, r):
    gates, _, load = _reference(c, r, noise, valid, k, epsilon, scale)
    return float(np.sum(gates * w_gates) + np.sum(load * w_load))

  step = 1e-6
  for which, (array, grad) in enumerate(zip((clean, raw), got)):
    want = np.zeros_like(grad, dtype=np.float64)
    base = array.astype(np.float64)
    for index in np.ndindex(base.shape):
      plus, minus = base.copy(), base.copy()
      plus[index] += step
      minus[index] -= step
      args_p = (plus, raw) if which == 0 else (clean, plus)
      args_m = (minus, raw) if which == 0 else (clean, minus)
      want[index] = (loss(*args_p) - loss(*args_m)) / (2 * step)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
  if k < NUM_EXPERTS:
    assert np.abs(got[1]).max() > 1e-3  # W_noise is trained through Load.


@pytest.mark.parametrize("k,epsilon,scale,with_valid", CASES)
def test_tf_gradients_equal_autodiff_of_the_equations(
    k, epsilon, scale, with_valid
):
  """The hand-written backward pass against autodiff of eqs. 3-5, 8-10."""
  clean, raw, noise, valid = _inputs(3, with_valid)
  w_gates, w_load = _weights(k, seed=6)
  valid_t = None if valid is None else _f32(valid)

  def composed(c, r):
    gates, indices, probs = gating.noisy_top_k(
        c, r, _f32(noise), k, epsilon, scale
    )
    if valid_t is not None:
      probs = probs * valid_t[:, None]
    return gates, indices, gating.load(probs)

  def fused(c, r):
    return gating.noisy_top_k_load(
        c, r, _f32(noise), k, epsilon, scale, valid=valid_t
    )

  want = _tf_gradients(composed, clean, raw, w_gates, w_load)
  got = _tf_gradients(fused, clean, raw, w_gates, w_load)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_tf_ties_at_the_kth_value_match_autodiff_of_the_equations():
  """H(x) with ties at t_k = t_{k+1} (no noise, equal logits): eq. (8)'s
  threshold is the same value either way, and the gradient goes to the same
  top-(k+1) columns as autodiff of the composition sends it."""
  tf = _tf_or_skip()
  clean = np.array(
      [[1.0, 3.0, 3.0, 0.5, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]],
      np.float32,
  )
  raw = np.full_like(clean, -0.5)
  noise = np.zeros_like(clean)
  w_gates, w_load = _weights(2, seed=7)
  w_gates = w_gates[:2]
  results = []
  for fused in (True, False):
    clean_t, raw_t = tf.constant(clean), tf.constant(raw)
    with tf.GradientTape() as tape:
      tape.watch([clean_t, raw_t])
      if fused:
        gates, indices, load = gating.noisy_top_k_load(
            clean_t, raw_t, tf.constant(noise), 2, 1e-2
        )
      else:
        gates, indices, probs = gating.noisy_top_k(
            clean_t, raw_t, tf.constant(noise), 2, 1e-2
        )
        load = gating.load(probs)
      loss = tf.reduce_sum(gates * w_gates) + tf.reduce_sum(load * w_load)
    grads = tape.gradient(loss, [clean_t, raw_t])
    results.append([gates, indices, load] + grads)
  for got, want in zip(*results):
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-6, atol=1e-7)
  want_load = _reference(clean, raw, noise, None, 2, 1e-2, 1.0)[2]
  np.testing.assert_allclose(_np(results[0][2]), want_load, rtol=1e-5)


def test_tf_gradient_of_gates_alone_and_of_load_alone():
  """Either output may be unused: its upstream gradient arrives as None."""
  tf = _tf_or_skip()
  clean, raw, noise, _ = _inputs(4, False)
  clean_t, raw_t = tf.constant(clean), tf.constant(raw)
  for pick in (0, 2):
    results = []
    for fn in (gating.noisy_top_k_load, None):
      with tf.GradientTape() as tape:
        tape.watch([clean_t, raw_t])
        if fn is None:
          gates, _, probs = gating.noisy_top_k(
              clean_t, raw_t, tf.constant(noise), 2, 1e-2
          )
          out = (gates, None, gating.load(probs))
        else:
          out = fn(clean_t, raw_t, tf.constant(noise), 2, 1e-2)
        loss = tf.reduce_sum(out[pick])
      results.append([g.numpy() for g in tape.gradient(loss, [clean_t, raw_t])])
    for g, w in zip(*results):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ eq. (4) noise


def _draws(shape, seed=11):
  return _np(gating.standard_normal(shape, keras.random.SeedGenerator(seed)))


def test_standard_normal_shapes_static_odd_and_dynamic():
  assert _draws((3, 5)).shape == (3, 5)  # odd size: half a pair is dropped
  assert _draws((7,)).shape == (7,)
  if keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    seed = keras.random.SeedGenerator(3)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def draw(x):
      return backend_ops.standard_normal(tf.shape(x), seed)

    assert draw(tf.zeros([9, 4])).shape == (9, 4)


def test_standard_normal_is_standard_normal():
  """CDF at 13 points within 5 standard errors; mean, variance, kurtosis."""
  z = _draws((400, 500)).ravel().astype(np.float64)
  count = z.size
  assert np.all(np.isfinite(z))
  for point in np.linspace(-3.0, 3.0, 13):
    p = float(ref.normal_cdf(point))
    se = math.sqrt(p * (1 - p) / count)
    assert abs(np.mean(z <= point) - p) < 5 * se, point
  assert abs(z.mean()) < 5 / math.sqrt(count)
  assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / count)
  assert abs(np.mean(z**4) - 3.0) < 5 * math.sqrt(96.0 / count)


def test_standard_normal_draws_are_uncorrelated():
  """Box-Muller's two halves share their uniforms: z_a, z_b of one pair
  (positions i and i + size/2) must still be independent, and so must their
  squares (one shared radius would correlate them)."""
  z = _draws((200_000,)).astype(np.float64)
  first, second = z[:100_000], z[100_000:]
  bound = 5 / math.sqrt(first.size)
  assert abs(np.corrcoef(first, second)[0, 1]) < bound
  assert abs(np.corrcoef(first**2, second**2)[0, 1]) < bound
  assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < bound


def test_standard_normal_seeding():
  seed = keras.random.SeedGenerator(21)
  a = _np(gating.standard_normal((64,), seed))
  b = _np(gating.standard_normal((64,), seed))
  assert not np.array_equal(a, b)  # the generator advances
  np.testing.assert_array_equal(_draws((64,), seed=21), a)
