"""Strictly balanced gating (appendix F): after training the thresholds with
L_batchwise (eq. 20), threshold inference (eq. 19) agrees with the batchwise
training mask (eq. 18) on fresh batches of the training distribution.

Stated tolerance: at least 97% of the (token, expert) mask entries agree and
every expert's inference load is within 25% of the batchwise m. The masks
are recomputed here in numpy (top-m per column; x > T), not with the layer's
functions.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from moe_keras.layers import SparseMoE

N_TOKENS, D, N_EXPERTS, K = 512, 6, 8, 2
AGREEMENT = 0.97
LOAD_TOLERANCE = 0.25


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _batch(rng):
  # The "training batch distribution": a fixed mixture of two Gaussians.
  centers = np.array([[1.0] * D, [-1.0] * D])
  pick = rng.integers(0, 2, size=N_TOKENS)
  return (centers[pick] + rng.normal(size=(N_TOKENS, D))).astype("float32")


def test_thresholds_match_batchwise_mask_after_training():
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  moe = SparseMoE(
      N_EXPERTS,
      K,
      expert_hidden_dim=4,
      gating="batchwise",
      w_importance=0.0,
      w_load=0.0,
  )
  moe.build((None, D))
  w_gate = rng.normal(size=(D, N_EXPERTS)).astype("float32")
  moe.w_gate.assign(w_gate)
  opt = keras.optimizers.Adam(0.003)
  opt.build([moe.thresholds])

  # One traced step, run 400 times (the same computation as eagerly, in a
  # small fraction of the time).
  @tf.function
  def train_step(x):
    with tf.GradientTape() as tape:
      moe(x, training=True)
      loss = tf.add_n(moe.losses)
    grad = tape.gradient(loss, moe.thresholds)
    opt.apply([grad], [moe.thresholds])

  for _ in range(400):
    train_step(tf.constant(_batch(rng)))

  thresholds = np.asarray(moe.thresholds)
  m = K * N_TOKENS // N_EXPERTS
  agree, loads = [], []
  for _ in range(5):
    x = _batch(rng)
    probs = _softmax(x.astype(np.float64) @ w_gate)
    batchwise = np.zeros_like(probs, dtype=bool)
    top = np.argsort(-probs, axis=0, kind="stable")[:m]
    for i in range(N_EXPERTS):
      batchwise[top[:, i], i] = True
    threshold = probs > thresholds[None, :]
    agree.append(np.mean(batchwise == threshold))
    loads.append(threshold.sum(0))
    # The layer's inference routing is eq. (19) with these thresholds.
    _, stats = moe(tf.constant(x), training=False, return_stats=True)
    np.testing.assert_allclose(stats["token_counts"], threshold.sum(0))
  print(f"agreement {np.mean(agree):.4f}, loads {np.mean(loads, 0)} vs m={m}")
  assert np.mean(agree) >= AGREEMENT, np.mean(agree)
  mean_load = np.mean(loads, axis=0)
  assert np.all(np.abs(mean_load - m) <= LOAD_TOLERANCE * m), (mean_load, m)
