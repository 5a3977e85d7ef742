"""`balance_over` ('replica' | 'global'): values, config, one device.

One device computes over the global batch, so both options add the numpy
reference's losses and the same gradients. That 'global' equals one device
on several devices (in-graph mesh, several hosts) and that 'replica' keeps
the mean over the replicas is tested in tests/distribution
(test_global_balance.py, test_multi_worker.py).
"""

from keras import ops
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import expert_placement
from moe_keras.layers import gating
from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
from moe_keras.models import blocks
import numpy_reference as ref

D, H = 8, 16
LOSS_TOL = dict(rtol=1e-4, atol=1e-7)


def _flat(**kwargs):
  return SparseMoE(num_experts=4, k=2, expert_hidden_dim=H, **kwargs)


def _hier(**kwargs):
  return HierarchicalSparseMoE(
      num_groups=3,
      experts_per_group=2,
      k_secondary=1,
      expert_hidden_dim=H,
      **kwargs,
  )


def _spec(**kwargs):
  return blocks.moe_spec(num_experts=4, k=2, **kwargs)


def _built_spec(**kwargs):
  """moe_spec is gin-configurable: `build_moe` checks (one-line errors)."""
  return blocks.build_moe(_spec(**kwargs))


def _built_ffn_spec(**kwargs):
  spec = blocks.moe_spec(kind="ffn", hidden_dims=(4,), **kwargs)
  return blocks.build_moe(spec)


@pytest.mark.parametrize("make", [_flat, _hier, _built_spec, _built_ffn_spec])
@pytest.mark.parametrize("value", ["host", "Global", "", 1, ["global"]])
def test_bad_balance_over_is_a_one_line_value_error(make, value):
  with pytest.raises(ValueError) as err:
    make(balance_over=value)
  message = str(err.value)
  assert "balance_over" in message and repr(value) in message, message
  assert "\n" not in message, message


@pytest.mark.parametrize("make", [_flat, _hier])
def test_none_is_refused_by_the_layers(make):
  with pytest.raises(ValueError, match="balance_over None"):
    make(balance_over=None)


@pytest.mark.parametrize("make", [_flat, _hier])
def test_balance_over_round_trips_through_the_config(make):
  assert make().get_config()["balance_over"] == "replica"
  layer = make(balance_over="global")
  config = layer.get_config()
  assert config["balance_over"] == "global"
  clone = type(layer).from_config(config)
  assert clone.balance_over == "global"
  assert clone.get_config() == config


def test_moe_spec_passes_balance_over_to_the_layer():
  assert blocks.build_moe(_spec()).balance_over == "replica"
  spec = _spec(balance_over="global")
  assert spec["balance_over"] == "global"
  assert blocks.build_moe(spec).balance_over == "global"
  hier = blocks.moe_spec(
      kind="hierarchical",
      num_groups=2,
      experts_per_group=2,
      balance_over="global",
  )
  assert blocks.build_moe(hier).balance_over == "global"


def test_default_placement_keeps_one_calls_sums():
  sums = {"importance": ops.ones((4,))}
  placement = expert_placement.ExpertPlacement()
  assert placement.global_balance_sums(_flat(), sums) is sums


def _run(layer, x, noise, mask=None):
  """Training call: (added loss, {name: part}, d loss / d gate weights)."""
  with tf.GradientTape() as tape:
    layer(x, training=True, noise=noise, mask=mask)
    total = tf.add_n(layer.losses)
  gates = [
      v
      for v in layer.trainable_weights
      if v.path.split("/")[-1].startswith("w_")
  ]
  grads = tape.gradient(total, [v.value for v in gates])
  ((_, parts),) = layer.aux_loss_parts()
  return (
      float(total),
      {name: float(value) for name, value in parts.items()},
      {v.path.split("/")[-1]: g.numpy() for v, g in zip(gates, grads)},
  )


def test_flat_one_device_global_equals_replica_and_numpy():
  """Noisy top-k with a padding mask: eqs. (6)-(11) over the valid tokens."""
  rng = np.random.default_rng(7)
  n, num_tokens = 4, 24
  weights = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  noise = rng.normal(size=(num_tokens, n)).astype(np.float32)
  valid = np.arange(num_tokens) % 5 != 2
  want = ref.sparse_moe(x, weights, 2, noise=noise, valid=valid)
  results = {}
  for balance_over in ("replica", "global"):
    layer = _flat(balance_over=balance_over)
    layer.build((None, D))
    ref.assign_weights(layer, weights)
    results[balance_over] = _run(layer, x, noise, mask=valid)
    total, parts, _ = results[balance_over]
    np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
    np.testing.assert_allclose(
        parts[gating.IMPORTANCE_LOSS], want["importance_loss"], **LOSS_TOL
    )
    np.testing.assert_allclose(
        parts[gating.LOAD_LOSS], want["load_loss"], **LOSS_TOL
    )
  for name, grad in results["replica"][2].items():
    assert np.abs(grad).max() > 1e-4, name
    np.testing.assert_allclose(
        results["global"][2][name], grad, rtol=1e-6, atol=1e-9, err_msg=name
    )


def test_hierarchical_one_device_global_equals_replica_and_numpy():
  """Eqs. (13)-(14): Load_H rebuilt from its sums gives the same loss."""
  rng = np.random.default_rng(8)
  a, b, num_tokens = 3, 2, 20
  weights = ref.random_hier_weights(rng, D, a, b, H, D)
  x = rng.normal(size=(num_tokens, D)).astype(np.float32)
  noise = (
      rng.normal(size=(num_tokens, a)).astype(np.float32),
      rng.normal(size=(num_tokens, a, b)).astype(np.float32),
  )
  want = ref.hierarchical_moe(
      x, weights, 2, 1, primary_noise=noise[0], secondary_noise=noise[1]
  )
  results = {}
  for balance_over in ("replica", "global"):
    layer = _hier(balance_over=balance_over)
    layer.build((None, D))
    ref.assign_weights(layer, weights)
    results[balance_over] = _run(layer, x, noise)
    total, parts, _ = results[balance_over]
    np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
    np.testing.assert_allclose(
        parts[gating.LOAD_LOSS], want["load_loss"], **LOSS_TOL
    )
  for name, grad in results["replica"][2].items():
    np.testing.assert_allclose(
        results["global"][2][name], grad, rtol=1e-6, atol=1e-9, err_msg=name
    )
