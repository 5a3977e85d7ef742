"""HierarchicalSparseMoE vs the numpy reference: appendix B, eqs 12-14.

Tolerances as in test_sparse_moe.py (float32 layer vs float64 reference):
outputs/stats rtol 1e-5 atol 1e-5, losses rtol 1e-4; gradients vs float64
central finite differences rtol 2e-3.
"""

from keras import ops
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import HierarchicalSparseMoE
import numpy_reference as ref

D, H = 8, 16
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-7)


def _np(x):
  """Converts a backend tensor to a numpy array."""
  return np.asarray(ops.convert_to_numpy(x))


def make_layer(a, b, kp, ks, weights, **kwargs):
  """Builds a HierarchicalSparseMoE for D-dim inputs with the given weights."""
  layer = HierarchicalSparseMoE(
      num_groups=a,
      experts_per_group=b,
      k_primary=kp,
      k_secondary=ks,
      expert_hidden_dim=H,
      **kwargs,
  )
  layer.build((None, D))
  ref.assign_weights(layer, weights)
  return layer


def data(rng, a, b, n_tok):
  """Random tokens and primary/secondary noise."""
  x = rng.normal(size=(n_tok, D)).astype(np.float32)
  pn = rng.normal(size=(n_tok, a)).astype(np.float32)
  sn = rng.normal(size=(n_tok, a, b)).astype(np.float32)
  return x, pn, sn


@pytest.fixture
def rng():
  return np.random.default_rng(4242)


def test_variable_shapes():
  layer = HierarchicalSparseMoE(
      num_groups=3,
      experts_per_group=2,
      k_primary=2,
      k_secondary=1,
      expert_hidden_dim=H,
      expert_variables="stacked",
  )
  layer.build((None, D))
  assert tuple(layer.w_gate.shape) == (D, 3)
  assert tuple(layer.w_noise.shape) == (D, 3)
  assert tuple(layer.w_gate_secondary.shape) == (3, D, 2)
  assert tuple(layer.w_noise_secondary.shape) == (3, D, 2)
  assert tuple(layer.expert_kernel_1.shape) == (6, D, H)
  assert tuple(layer.expert_kernel_2.shape) == (6, H, D)


@pytest.mark.parametrize(
    "a,b,kp,ks", [(4, 4, 2, 2), (3, 2, 2, 1), (2, 3, 1, 2)]
)
def test_eqs_12_13_14_training(rng, a, b, kp, ks):
  n_tok = 48
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, pn, sn = data(rng, a, b, n_tok)
  layer = make_layer(a, b, kp, ks, w, w_importance=0.3, w_load=0.6)
  y, stats = layer(x, training=True, noise=(pn, sn), return_stats=True)
  total = float(sum(_np(l) for l in layer.losses))
  want = ref.hierarchical_moe(
      x,
      w,
      kp,
      ks,
      primary_noise=pn,
      secondary_noise=sn,
      w_importance=0.3,
      w_load=0.6,
  )
  # Every group must receive tokens, so eq 14's |X^(i)| is nonzero.
  assert np.all((want["primary_gates"] > 0).sum(axis=0) > 0)
  np.testing.assert_allclose(_np(y), want["output"], **OUT_TOL)
  np.testing.assert_allclose(
      _np(stats["importance"]), want["importance"], **OUT_TOL
  )
  np.testing.assert_allclose(_np(stats["load"]), want["load"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)
  np.testing.assert_allclose(
      _np(stats["importance_loss"]), want["importance_loss"], **LOSS_TOL
  )
  np.testing.assert_allclose(
      _np(stats["load_loss"]), want["load_loss"], **LOSS_TOL
  )
  # Eq 13 sums G_primary * G_i: the a*b importances sum to the number of tokens.
  np.testing.assert_allclose(want["importance"].sum(), n_tok, rtol=1e-12)


def test_noise_scale_both_levels(rng):
  """noise_scale multiplies the noise stddev of both gates (eqs. 4, 9, 14)."""
  a, b, n_tok, c = 4, 4, 48, 0.25
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, pn, sn = data(rng, a, b, n_tok)
  layer = make_layer(a, b, 2, 2, w, noise_scale=c)
  y, stats = layer(x, training=True, noise=(pn, sn), return_stats=True)
  total = float(sum(_np(l) for l in layer.losses))
  want = ref.hierarchical_moe(
      x, w, 2, 2, primary_noise=pn, secondary_noise=sn, noise_scale=c
  )
  paper = ref.hierarchical_moe(x, w, 2, 2, primary_noise=pn, secondary_noise=sn)
  assert not np.allclose(want["load"], paper["load"], rtol=1e-3)
  np.testing.assert_allclose(_np(y), want["output"], **OUT_TOL)
  np.testing.assert_allclose(_np(stats["load"]), want["load"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)


def test_load_h_is_not_the_simple_form(rng):
  """Guards eq 14: Load_H must include the Load_primary / |X^(i)| factor."""
  a, b, n_tok = 4, 4, 48
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, pn, sn = data(rng, a, b, n_tok)
  want = ref.hierarchical_moe(x, w, 2, 2, primary_noise=pn, secondary_noise=sn)
  layer = make_layer(a, b, 2, 2, w)
  _, stats = layer(x, training=True, noise=(pn, sn), return_stats=True)
  load = _np(stats["load"]).reshape(a, b)
  sizes = (want["primary_gates"] > 0).sum(axis=0)
  # Undo the factor: Load_i(X^(i)) = Load_H * |X^(i)| / Load_primary.
  simple = load * sizes[:, None] / want["load_primary"][:, None]
  assert not np.allclose(simple, load, rtol=1e-3)
  np.testing.assert_allclose(load, want["load"].reshape(a, b), **OUT_TOL)


def test_inference_no_noise_no_losses(rng):
  a, b = 3, 4
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, _, _ = data(rng, a, b, 32)
  layer = make_layer(a, b, 2, 2, w)
  y = _np(layer(x, training=False))
  assert len(layer.losses) == 0
  want = ref.hierarchical_moe(x, w, 2, 2, training=False)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)


def test_primary_gate_gets_gradient_through_load_h(rng):
  a, b, n_tok = 3, 3, 36
  w = ref.random_hier_weights(rng, D, a, b, H, D, gate_scale=0.5)
  x, pn, sn = data(rng, a, b, n_tok)
  layer = make_layer(a, b, 2, 2, w, w_importance=0.0, w_load=1.0)
  with tf.GradientTape() as tape:
    layer(x, training=True, noise=(pn, sn))
    aux = tf.add_n(layer.losses)
  variables = [layer.w_gate, layer.w_noise, layer.w_noise_secondary]
  grads = tape.gradient(aux, [v.value for v in variables])

  def loss(**over):
    return ref.hierarchical_moe(
        x,
        dict(w, **over),
        2,
        2,
        primary_noise=pn,
        secondary_noise=sn,
        w_importance=0.0,
        w_load=1.0,
    )["total_loss"]

  for var, name, g in zip(
      variables, ["w_gate", "w_noise", "w_noise_secondary"], grads
  ):
    assert g is not None, f"Load_H loss gives no gradient to {name}"
    g = _np(g)
    assert np.any(g != 0), name
    fd = np.zeros_like(w[name], np.float64)
    eps = 1e-4
    for idx in np.ndindex(w[name].shape):
      wp, wm = (
          w[name].astype(np.float64).copy(),
          w[name].astype(np.float64).copy(),
      )
      wp[idx] += eps
      wm[idx] -= eps
      fd[idx] = (loss(**{name: wp}) - loss(**{name: wm})) / (2 * eps)
    scale = np.max(np.abs(fd))
    assert scale > 1e-3
    np.testing.assert_allclose(
        g, fd, rtol=2e-3, atol=2e-3 * scale, err_msg=name
    )


def test_mask_rank3(rng):
  a, b, B, T = 3, 2, 2, 10
  n_tok = B * T
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, pn, sn = data(rng, a, b, n_tok)
  mask = np.ones((B, T), bool)
  mask[0, 7:] = False
  mask[1, 2:4] = False
  valid = mask.reshape(-1)
  layer = make_layer(a, b, 2, 2, w)
  y, stats = layer(
      x.reshape(B, T, D),
      training=True,
      noise=(pn, sn),
      mask=mask,
      return_stats=True,
  )
  total = float(sum(_np(l) for l in layer.losses))
  y = _np(y).reshape(n_tok, D)
  want = ref.hierarchical_moe(
      x, w, 2, 2, primary_noise=pn, secondary_noise=sn, valid=valid
  )
  assert np.all((want["primary_gates"][valid] > 0).sum(axis=0) > 0)
  np.testing.assert_array_equal(y[~valid], 0.0)
  np.testing.assert_allclose(y, want["output"], **OUT_TOL)
  np.testing.assert_allclose(
      _np(stats["importance"]), want["importance"], **OUT_TOL
  )
  np.testing.assert_allclose(_np(stats["load"]), want["load"], **OUT_TOL)
  np.testing.assert_allclose(total, want["total_loss"], **LOSS_TOL)


def test_all_padding_is_finite(rng):
  a, b = 2, 2
  w = ref.random_hier_weights(rng, D, a, b, H, D)
  x, pn, sn = data(rng, a, b, 8)
  layer = make_layer(a, b, 2, 2, w)
  y, stats = layer(
      x.reshape(2, 4, D),
      training=True,
      noise=(pn, sn),
      mask=np.zeros((2, 4), bool),
      return_stats=True,
  )
  np.testing.assert_array_equal(_np(y), 0.0)
  for l in layer.losses:
    assert np.isfinite(_np(l))
  for key, v in stats.items():
    assert np.all(np.isfinite(_np(v))), key
