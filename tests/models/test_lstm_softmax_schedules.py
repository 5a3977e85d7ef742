"""ProjectedLSTM, SoftmaxHead and the schedules against numpy references."""

import math

import keras
import numpy as np
import pytest

from moe_keras import schedules
from moe_keras.models import lstm
from moe_keras.models import softmax


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_lstmp(x, kernel, recurrent, bias, projection):
  """LSTMP (Sak et al. 2014) written out: gates i, f, g, o."""
  batch, steps, _ = x.shape
  units = recurrent.shape[1] // 4
  r = np.zeros((batch, recurrent.shape[0]))
  c = np.zeros((batch, units))
  outputs = []
  for t in range(steps):
    z = x[:, t] @ kernel + r @ recurrent + bias
    i, f, g, o = (z[:, j * units : (j + 1) * units] for j in range(4))
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    r = h @ projection if projection is not None else h
    outputs.append(r)
  return np.stack(outputs, axis=1), r, c


@pytest.mark.parametrize("projection", [None, 3])
def test_projected_lstm_matches_numpy(projection):
  rng = np.random.default_rng(0)
  layer = lstm.ProjectedLSTM(5, projection_units=projection, return_state=True)
  x = rng.normal(size=(2, 4, 6)).astype("float32")
  layer.build(x.shape)
  cell = layer.cell
  for variable in cell.weights:
    variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.5)
  outputs, (r, c) = layer(x)
  expected, r_ref, c_ref = _numpy_lstmp(
      x.astype(np.float64),
      keras.ops.convert_to_numpy(cell.kernel),
      keras.ops.convert_to_numpy(cell.recurrent_kernel),
      keras.ops.convert_to_numpy(cell.bias),
      None
      if projection is None
      else keras.ops.convert_to_numpy(cell.projection),
  )
  np.testing.assert_allclose(outputs, expected, atol=1e-5)
  np.testing.assert_allclose(r, r_ref, atol=1e-5)
  np.testing.assert_allclose(c, c_ref, atol=1e-5)
  # Step by step through the cell (what decoders do) gives the same.
  state = cell.get_initial_state(2)
  for t in range(4):
    out, state = cell(x[:, t], state)
    np.testing.assert_allclose(out, expected[:, t], atol=1e-5)


def test_go_backwards_reverses_time():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3)).astype("float32")
  forward = lstm.ProjectedLSTM(4)
  backward = lstm.ProjectedLSTM(4, go_backwards=True)
  forward.build(x.shape)
  backward.build(x.shape)
  for a, b in zip(forward.weights, backward.weights):
    b.assign(a)
  expected = np.flip(keras.ops.convert_to_numpy(forward(x[:, ::-1])), axis=1)
  np.testing.assert_allclose(backward(x), expected, atol=1e-6)


def test_lstm_ops_count():
  assert lstm.lstm_ops_per_timestep(512, 2048, 512) == 9_437_184
  assert lstm.lstm_ops_per_timestep(512, 512) == 2_097_152


def _numpy_log_softmax_nll(hidden, targets, kernel, bias):
  logits = hidden @ kernel.T + bias
  logits = logits - logits.max(axis=-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  return -log_probs[np.arange(len(targets)), targets]


def test_exact_nll_matches_numpy():
  rng = np.random.default_rng(2)
  head = softmax.SoftmaxHead(11)
  hidden = rng.normal(size=(2, 3, 4)).astype("float32")
  targets = rng.integers(0, 11, size=(2, 3)).astype("int32")
  nll = keras.ops.convert_to_numpy(head([hidden, targets], training=False))
  kernel = keras.ops.convert_to_numpy(head.kernel).astype(np.float64)
  head.bias.assign(rng.normal(size=11).astype("float32"))
  bias = keras.ops.convert_to_numpy(head.bias).astype(np.float64)
  nll = keras.ops.convert_to_numpy(head([hidden, targets], training=False))
  expected = _numpy_log_softmax_nll(
      hidden.reshape(-1, 4).astype(np.float64),
      targets.reshape(-1),
      kernel,
      bias,
  ).reshape(2, 3)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_sampled_nll_matches_hand_formula():
  """Jean et al.: softmax over {target} + samples, logits - log(S Q(c))."""
  rng = np.random.default_rng(3)
  vocab, dim = 20, 4
  hidden = rng.normal(size=(3, dim))
  kernel = rng.normal(size=(vocab, dim))
  bias = rng.normal(size=vocab)
  targets = np.array([1, 5, 7])
  sampled = np.array([0, 5, 2, 2, 13])  # 5 hits target of token 1

  def log_q(c):
    return np.log(np.log((c + 2.0) / (c + 1.0)) / np.log(vocab + 1.0))

  s = len(sampled)
  expected = []
  for n in range(3):
    true_logit = hidden[n] @ kernel[targets[n]] + bias[targets[n]]
    true_logit -= math.log(s) + log_q(targets[n])
    logits = [true_logit]
    for c in sampled:
      if c == targets[n]:
        continue  # accidental hit removed
      logits.append(hidden[n] @ kernel[c] + bias[c] - math.log(s) - log_q(c))
    logits = np.array(logits)
    expected.append(np.log(np.exp(logits).sum()) - true_logit)
  got = softmax.sampled_nll(
      hidden.astype("float32"),
      targets.astype("int32"),
      kernel.astype("float32"),
      bias.astype("float32"),
      num_sampled=s,
      seed=None,
      sampled_ids=sampled.astype("int32"),
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_log_uniform_sampler_follows_q():
  vocab = 50
  ids = keras.ops.convert_to_numpy(
      softmax.sample_log_uniform(200_000, vocab, keras.random.SeedGenerator(0))
  )
  freq = np.bincount(ids, minlength=vocab) / len(ids)
  c = np.arange(vocab)
  q = np.log((c + 2.0) / (c + 1.0)) / np.log(vocab + 1.0)
  np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-9)
  np.testing.assert_allclose(freq, q, atol=3e-3)


def test_sampled_training_exact_evaluation():
  rng = np.random.default_rng(4)
  head = softmax.SoftmaxHead(30, num_sampled=5, seed=0)
  hidden = rng.normal(size=(2, 3, 4)).astype("float32")
  targets = rng.integers(0, 30, size=(2, 3)).astype("int32")
  exact = head([hidden, targets], training=False)
  sampled = head([hidden, targets], training=True)
  # The sampled loss is over 6 candidates at most, so it is smaller.
  assert np.all(keras.ops.convert_to_numpy(sampled) < exact)


@pytest.mark.parametrize("step", [0, 1, 499, 999, 1000, 3999, 20000])
def test_warmup_rsqrt(step):
  s = step + 1
  expected = 0.002 * min(s / 1000, math.sqrt(1000 / s))
  got = float(schedules.WarmupRsqrt(0.002, 1000)(step))
  assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step", [0, 999, 1999, 5000, 9999, 10000, 40000])
def test_warmup_constant_rsqrt(step):
  s = step + 1
  if s <= 2000:
    expected = 1e-3 * s / 2000
  elif s <= 10000:
    expected = 1e-3
  else:
    expected = 1e-3 * math.sqrt(10000 / s)
  got = float(schedules.WarmupConstantRsqrt(1e-3, 2000, 8000)(step))
  assert got == pytest.approx(expected, rel=1e-6)


def test_schedule_serializes():
  schedule = schedules.WarmupRsqrt(0.01, 50)
  restored = keras.optimizers.schedules.deserialize(
      keras.optimizers.schedules.serialize(schedule)
  )
  assert float(restored(10)) == pytest.approx(float(schedule(10)))
