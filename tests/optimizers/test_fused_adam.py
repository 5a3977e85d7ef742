"""FusedAdam against a numpy Adam written from Kingma & Ba (Keras's form)."""

import keras
import numpy as np
import pytest

from moe_keras.optimizers import factory
from moe_keras.optimizers import fused_adam


def _numpy_adam(var, grads, lr, beta_1, beta_2, epsilon):
  var = var.astype(np.float64).copy()
  m = np.zeros_like(var)
  v = np.zeros_like(var)
  for t, g in enumerate(grads, start=1):
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    m += (g - m) * (1 - beta_1)
    v += (g * g - v) * (1 - beta_2)
    var -= alpha * m / (np.sqrt(v) + epsilon)
  return var


def test_matches_numpy_adam_over_steps():
  rng = np.random.default_rng(0)
  init = rng.normal(size=(3, 4, 5)).astype("float32")
  grads = [rng.normal(size=(3, 4, 5)).astype("float32") for _ in range(4)]
  variable = keras.Variable(init)
  optimizer = fused_adam.FusedAdam(
      learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-6
  )
  for g in grads:
    optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
  expected = _numpy_adam(init, grads, 0.01, 0.8, 0.95, 1e-6)
  np.testing.assert_allclose(
      keras.ops.convert_to_numpy(variable), expected, rtol=1e-5, atol=1e-6
  )


def test_sparse_gradients_are_keras_adams_by_default():
  """An embedding's IndexedSlices gradient (row 3 gathered twice) gives
  Keras Adam's result on TensorFlow; sum_sparse_rows=True does not
  (test_sparse_gradients has its numbers)."""
  ids = np.array([[1, 3, 3]], "int32")
  results = []
  for optimizer in (
      keras.optimizers.Adam(learning_rate=0.1),
      fused_adam.FusedAdam(learning_rate=0.1),
      fused_adam.FusedAdam(learning_rate=0.1, sum_sparse_rows=True),
  ):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2)]
    )
    model.compile(optimizer, loss="mse")
    model.train_on_batch(ids, np.ones((1, 3, 2), "float32"))
    results.append(keras.ops.convert_to_numpy(model.weights[0]))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
  assert np.abs(results[2][3] - results[1][3]).max() > 1e-3


def test_factory_builds_fused_adam_and_checkpoints_are_adams(tmp_path):
  optimizer = factory.make_optimizer(name="adam", learning_rate=0.01)
  assert isinstance(optimizer, fused_adam.FusedAdam)
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
  assert isinstance(restored, fused_adam.FusedAdam)
  with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
    factory.make_optimizer(name="adamw")


def test_learning_rate_scales_per_variable():
  # Two variables, the same gradients: the one whose path matches trains at
  # a quarter of the rate (numpy Adam at lr / 4), the other at the full rate.
  rng = np.random.default_rng(3)
  init = rng.normal(size=(2, 3)).astype("float32")
  grads = [rng.normal(size=(2, 3)).astype("float32") for _ in range(3)]
  expert = keras.Variable(init, name="expert_kernel_1")
  other = keras.Variable(init, name="w_gate")
  optimizer = factory.make_optimizer(
      learning_rate=0.01,
      beta_1=0.8,
      beta_2=0.95,
      epsilon=1e-6,
      learning_rate_scales={"expert_(kernel|bias)": 0.25},
  )
  for g in grads:
    t = keras.ops.convert_to_tensor(g)
    optimizer.apply([t, t], [expert, other])
  np.testing.assert_allclose(
      keras.ops.convert_to_numpy(expert),
      _numpy_adam(init, grads, 0.0025, 0.8, 0.95, 1e-6),
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      keras.ops.convert_to_numpy(other),
      _numpy_adam(init, grads, 0.01, 0.8, 0.95, 1e-6),
      rtol=1e-5,
      atol=1e-6,
  )
  assert optimizer.get_config()["learning_rate_scales"] == {
      "expert_(kernel|bias)": 0.25
  }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"learning_rate_scales": {"(": 0.5}},
            r"learning_rate_scales: bad pattern '\('",
        ),
        (
            {"learning_rate_scales": {"expert": 0.0}},
            "scale of 'expert' must be > 0, got 0.0",
        ),
        (
            {"name": "factored_adam", "learning_rate_scales": {"e": 0.5}},
            "supported with name='adam' only, not 'factored_adam'",
        ),
    ],
)
def test_learning_rate_scales_errors(kwargs, message):
  import moe_keras.optimizers.factored_adam  # pylint: disable=g-import-not-at-top,unused-import

  with pytest.raises(ValueError, match=message):
    factory.make_optimizer(**kwargs)
