"""get_config/from_config round trips and `.keras` save/load (bit-identical)."""

import keras
from keras import ops
import numpy as np
import pytest

from moe_keras.layers import HierarchicalSparseMoE, SparseMoE

D, H = 8, 16


def _np(x):
  """Converts a backend tensor to a numpy array."""
  return np.asarray(ops.convert_to_numpy(x))


SPARSE_CONFIGS = [
    dict(num_experts=4, k=2, expert_hidden_dim=H),
    dict(
        num_experts=6,
        k=3,
        expert_hidden_dim=H,
        output_dim=5,
        use_bias=True,
        w_importance=0.25,
        w_load=0.75,
        noise_epsilon=0.05,
        noise_scale=0.5,
        capacity_factor=1.5,
        balance_over="global",
    ),
    dict(num_experts=4, k=1, expert_hidden_dim=H, gating="top_k"),
    dict(num_experts=4, k=2, expert_hidden_dim=H, gating="softmax"),
    dict(
        num_experts=4,
        k=2,
        expert_hidden_dim=H,
        gating="batchwise",
        w_batchwise=0.3,
    ),
]
HIER_CONFIG = dict(
    num_groups=3,
    experts_per_group=2,
    k_primary=2,
    k_secondary=1,
    expert_hidden_dim=H,
    w_importance=0.2,
    w_load=0.4,
    balance_over="global",
)


def _random_weights(layer, rng):
  """Random values for every variable so nothing passes by being zero."""
  return [
      rng.normal(scale=0.5, size=tuple(v.shape)).astype(np.float32)
      for v in layer.weights
  ]


@pytest.mark.parametrize("kwargs", SPARSE_CONFIGS)
def test_sparse_get_config_from_config_round_trip(kwargs):
  layer = SparseMoE(**kwargs)
  config = layer.get_config()
  for key, value in kwargs.items():
    assert config[key] == value, (key, config[key], value)
  clone = SparseMoE.from_config(config)
  assert clone.get_config() == config
  layer.build((None, D))
  clone.build((None, D))
  layer.set_weights(_random_weights(layer, np.random.default_rng(0)))
  clone.set_weights(layer.get_weights())
  x = np.random.default_rng(1).normal(size=(16, D)).astype(np.float32)
  noise = (
      np.random.default_rng(2)
      .normal(size=(16, kwargs["num_experts"]))
      .astype(np.float32)
  )
  np.testing.assert_array_equal(
      _np(clone(x, training=False)), _np(layer(x, training=False))
  )
  np.testing.assert_array_equal(
      _np(clone(x, training=True, noise=noise)),
      _np(layer(x, training=True, noise=noise)),
  )


def test_hierarchical_get_config_from_config_round_trip():
  layer = HierarchicalSparseMoE(**HIER_CONFIG)
  config = layer.get_config()
  for key, value in HIER_CONFIG.items():
    assert config[key] == value, key
  clone = HierarchicalSparseMoE.from_config(config)
  assert clone.get_config() == config


def _save_load(model, tmp_path):
  """Saves to a .keras file and loads it back (no custom_objects needed)."""
  path = str(tmp_path / "model.keras")
  model.save(path)
  return keras.models.load_model(path)


@pytest.mark.parametrize("kwargs", SPARSE_CONFIGS)
def test_sparse_keras_save_load_bit_identical(kwargs, tmp_path):
  rng = np.random.default_rng(3)
  inp = keras.Input((5, D))
  moe = SparseMoE(**kwargs)
  model = keras.Model(inp, moe(inp))
  moe.set_weights(_random_weights(moe, rng))
  x = rng.normal(size=(4, 5, D)).astype(np.float32)
  y0 = _np(model(x, training=False))
  loaded = _save_load(model, tmp_path)
  np.testing.assert_array_equal(_np(loaded(x, training=False)), y0)
  moe2 = loaded.layers[-1]
  assert isinstance(moe2, SparseMoE)
  assert moe2.get_config() == moe.get_config()
  for a, b in zip(moe.weights, moe2.weights):
    np.testing.assert_array_equal(_np(a), _np(b))
  noise = rng.normal(size=(20, kwargs["num_experts"])).astype(np.float32)
  y1, s1 = moe(x, training=True, noise=noise, return_stats=True)
  l1 = [_np(l) for l in moe.losses]
  y2, s2 = moe2(x, training=True, noise=noise, return_stats=True)
  l2 = [_np(l) for l in moe2.losses]
  np.testing.assert_array_equal(_np(y2), _np(y1))
  np.testing.assert_array_equal(l2, l1)
  for key in s1:
    np.testing.assert_array_equal(_np(s2[key]), _np(s1[key]), err_msg=key)


def test_hierarchical_keras_save_load_bit_identical(tmp_path):
  rng = np.random.default_rng(4)
  inp = keras.Input((D,))
  moe = HierarchicalSparseMoE(**HIER_CONFIG)
  model = keras.Model(inp, moe(inp))
  moe.set_weights(_random_weights(moe, rng))
  x = rng.normal(size=(12, D)).astype(np.float32)
  y0 = _np(model(x, training=False))
  loaded = _save_load(model, tmp_path)
  np.testing.assert_array_equal(_np(loaded(x, training=False)), y0)
  pn = rng.normal(size=(12, 3)).astype(np.float32)
  sn = rng.normal(size=(12, 3, 2)).astype(np.float32)
  np.testing.assert_array_equal(
      _np(loaded.layers[-1](x, training=True, noise=(pn, sn))),
      _np(moe(x, training=True, noise=(pn, sn))),
  )


def test_mixed_precision_policy_survives_save_load(tmp_path):
  rng = np.random.default_rng(5)
  inp = keras.Input((D,))
  moe = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=H, dtype="mixed_bfloat16"
  )
  model = keras.Model(inp, moe(inp))
  moe.set_weights(_random_weights(moe, rng))
  x = rng.normal(size=(12, D)).astype(np.float32)
  y0 = _np(ops.cast(model(x, training=False), "float32"))
  loaded = _save_load(model, tmp_path)
  assert loaded.layers[-1].dtype_policy.name == "mixed_bfloat16"
  np.testing.assert_array_equal(
      _np(ops.cast(loaded(x, training=False), "float32")), y0
  )
