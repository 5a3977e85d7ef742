"""Fuzz matrix (no NaN/Inf), mixed precision, determinism, and argument errors."""

import re
import textwrap
import zlib

from keras import ops
import numpy as np
import pytest

from moe_keras.layers import HierarchicalSparseMoE, SparseMoE
import layer_testlib
import numpy_reference as ref

D, H = 8, 16


def _np(x):
  """Converts a backend tensor to a float32 numpy array (bf16-safe)."""
  return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def _assign(layer, weights):
  """Assigns float32 numpy weights, cast to each variable's dtype."""
  for name, value in weights.items():
    if name == "w_noise" and layer.gating != "noisy_top_k":
      continue  # only noisy top-k gating has W_noise
    if name in (layer.expert_parts or {}):
      layer.set_expert_weight(name, value)
      continue
    var = getattr(layer, name)
    var.assign(ops.cast(value, var.dtype))


def _check_finite(label, y, stats, losses):
  """Asserts outputs, stats and losses are finite and gating stats are float32."""
  assert np.all(np.isfinite(_np(y))), (label, "output")
  for key, v in stats.items():
    assert str(ops.dtype(v)) == "float32", (label, key, ops.dtype(v))
    assert np.all(np.isfinite(_np(v))), (label, key, _np(v))
  for l in losses:
    assert np.all(np.isfinite(_np(l))), (label, "loss", _np(l))


# ------------------------------------------------------------------ fuzz matrix


DTYPES = ["float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16"]
GATINGS = ["noisy_top_k", "top_k", "softmax", "batchwise"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("k", [1, 4])
def test_fuzz_no_nan_or_inf(dtype, gating, k):
  """k in {1, n}; random, tied (all-zero gate weights and zero noise),
  zero-input and all-padding batches; training and inference."""
  n, B, T = 4, 2, 8
  N = B * T
  rng = np.random.default_rng(zlib.crc32(f"{dtype}/{gating}/{k}".encode()))
  layer = SparseMoE(
      num_experts=n,
      k=k,
      expert_hidden_dim=H,
      gating=gating,
      dtype=dtype,
      use_bias=True,
  )
  layer.build((None, None, D))
  random_w = ref.random_flat_weights(
      rng, D, n, H, D, use_bias=True, batchwise=gating == "batchwise"
  )
  x_rand = rng.normal(size=(B, T, D)).astype(np.float32)
  ones = np.ones((B, T), bool)
  cases = {
      "random": (random_w, x_rand, ones),
      "tied": (
          {
              "w_gate": np.zeros((D, n), np.float32),
              "w_noise": np.zeros((D, n), np.float32),
          },
          x_rand,
          ones,
      ),
      "zero_inputs": (random_w, np.zeros((B, T, D), np.float32), ones),
      "all_padding": (random_w, x_rand, np.zeros((B, T), bool)),
  }
  for case, (w, x, mask) in cases.items():
    _assign(layer, w)
    for training in (True, False):
      label = (case, "train" if training else "infer")
      kw = (
          dict(noise=np.zeros((N, n), np.float32))
          if case == "tied" and training
          else {}
      )
      y, stats = layer(x, training=training, mask=mask, return_stats=True, **kw)
      assert tuple(y.shape) == (B, T, D)
      assert str(ops.dtype(y)) == layer.compute_dtype, (label, ops.dtype(y))
      _check_finite(label, y, stats, layer.losses)
      if case == "all_padding":
        np.testing.assert_array_equal(_np(y), 0.0, err_msg=str(label))
        continue
      counts = _np(stats["token_counts"])
      importance = _np(stats["importance"])
      if gating == "softmax":
        np.testing.assert_allclose(counts, np.full(n, N), err_msg=str(label))
      elif gating == "batchwise" and training:
        np.testing.assert_allclose(
            counts, np.full(n, k * N // n), err_msg=str(label)
        )
      elif gating != "batchwise":
        # Ties or not, every token gets exactly k experts, gates sum to 1.
        np.testing.assert_allclose(counts.sum(), k * N, err_msg=str(label))
      if gating != "batchwise":  # Batchwise may give a token no expert.
        np.testing.assert_allclose(
            importance.sum(), N, rtol=1e-5, err_msg=str(label)
        )


def test_k_equals_num_experts_load_is_one_per_token():
  """k = n: every expert is always in the top k, so P(x, i) = 1 and Load = N."""
  n, N = 4, 16
  rng = np.random.default_rng(5)
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = SparseMoE(num_experts=n, k=n, expert_hidden_dim=H)
  layer.build((None, D))
  ref.assign_weights(layer, w)
  y, stats = layer(x, training=True, noise=noise, return_stats=True)
  want = ref.sparse_moe(x, w, n, noise=noise)
  np.testing.assert_allclose(_np(stats["load"]), np.full(n, N), rtol=1e-6)
  np.testing.assert_allclose(_np(y), want["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,compute",
    [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
def test_mixed_precision_gating_math_is_float32(dtype, compute):
  """Gate statistics match a float64 reference fed the same low-precision
  inputs to float32 accuracy, which a low-precision gate matmul/softmax
  could not (bf16 has 8 mantissa bits: errors ~4e-3)."""
  n, k, N = 6, 2, 48
  rng = np.random.default_rng(11)
  w = ref.random_flat_weights(rng, D, n, H, D)
  x = rng.normal(size=(N, D)).astype(np.float32)
  noise = rng.normal(size=(N, n)).astype(np.float32)
  layer = SparseMoE(num_experts=n, k=k, expert_hidden_dim=H, dtype=dtype)
  layer.build((None, D))
  ref.assign_weights(layer, w)
  assert layer.w_gate.dtype == "float32"
  y, stats = layer(x, training=True, noise=noise, return_stats=True)
  assert str(ops.dtype(y)) == compute

  # Keras's Layer.__call__ casts every floating tensor argument (inputs AND
  # the `noise=` kwarg) to the compute dtype, so the reference is fed both
  # rounded; the gating arithmetic itself must then be float32-exact.
  def low(a):
    return _np(ops.cast(ops.cast(a, compute), "float32"))

  want = ref.sparse_moe(low(x), w, k, noise=low(noise))
  for key in ("importance", "load", "importance_loss", "load_loss"):
    assert str(ops.dtype(stats[key])) == "float32", key
  np.testing.assert_allclose(
      _np(stats["importance"]), want["importance"], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      _np(stats["load"]), want["load"], rtol=1e-5, atol=1e-5
  )
  for l in layer.losses:
    assert str(ops.dtype(l)) == "float32"
  np.testing.assert_allclose(
      float(sum(_np(l) for l in layer.losses)), want["total_loss"], rtol=1e-4
  )
  # Experts run in low precision: outputs only to that precision.
  scale = np.max(np.abs(want["output"]))
  np.testing.assert_allclose(_np(y), want["output"], atol=3e-2 * scale)


# ------------------------------------------------------------------ determinism


_DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    import tensorflow as tf
    import keras
    tf.config.experimental.enable_op_determinism()
    from moe_keras.layers import SparseMoE

    def run(noise_arg, capacity_factor):
      keras.utils.set_random_seed(1234)
      layer = SparseMoE(num_experts=8, k=2, expert_hidden_dim=16,
                        capacity_factor=capacity_factor)
      rng = np.random.default_rng(0)
      x = rng.normal(size=(4, 16, 8)).astype("float32")
      layer.build((None, None, 8))
      layer.w_gate.assign(rng.normal(size=(8, 8)).astype("float32"))
      layer.w_noise.assign(rng.normal(size=(8, 8)).astype("float32"))
      noise = rng.normal(size=(64, 8)).astype("float32") if noise_arg else None
      with tf.GradientTape() as tape:
        y = layer(x, training=True, noise=noise)
        loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
      grads = tape.gradient(loss, [v.value for v in layer.trainable_variables])
      h = hashlib.sha256(np.asarray(y).tobytes())
      for g in grads:
        h.update(np.asarray(g).tobytes())
      return h.hexdigest()

    for noise_arg in (True, False):
      for cf in (None, 1.0):
        a, b = run(noise_arg, cf), run(noise_arg, cf)
        assert a == b, ("in-process runs differ", noise_arg, cf)
        print("DIGEST", noise_arg, cf, a)
""")


def test_determinism_with_op_determinism_subprocess():
  outs = []
  for _ in range(2):
    proc = layer_testlib.run_script(_DETERMINISM_SCRIPT, backend="tensorflow")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    outs.append([l for l in proc.stdout.splitlines() if l.startswith("DIGEST")])
  assert len(outs[0]) == 4
  assert outs[0] == outs[1], outs


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (
            dict(num_experts=4, k=5),
            r"(?s)(?=.*\bk\b)(?=.*(num_experts|number of experts))",
        ),
        (dict(num_experts=4, k=0), r"\bk\b"),
        (dict(num_experts=4, k=-1), r"\bk\b"),
        (dict(num_experts=4, k=2, gating="bogus_gating"), r"bogus_gating"),
        (dict(num_experts=0, k=1), r"num_experts"),
        (dict(num_experts=4, k=2, capacity_factor=0.0), r"capacity_factor"),
        (dict(num_experts=4, k=2, capacity_factor=-1.0), r"capacity_factor"),
    ],
)
def test_constructor_errors(kwargs, pattern):
  with pytest.raises(ValueError) as err:
    SparseMoE(expert_hidden_dim=H, **kwargs)
  msg = str(err.value)
  assert re.search(pattern, msg), msg
  assert "\n" not in msg.strip(), f"message should be one line: {msg!r}"


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (
            dict(num_groups=2, experts_per_group=3, k_primary=3, k_secondary=1),
            r"k_primary",
        ),
        (
            dict(num_groups=2, experts_per_group=3, k_primary=1, k_secondary=4),
            r"k_secondary",
        ),
        (
            dict(num_groups=2, experts_per_group=3, k_primary=0, k_secondary=1),
            r"k_primary",
        ),
    ],
)
def test_hierarchical_constructor_errors(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    HierarchicalSparseMoE(expert_hidden_dim=H, **kwargs)


def test_rank1_input_error():
  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H)
  with pytest.raises(ValueError, match=r"(?i)rank|ndim|dimension"):
    layer(np.zeros((D,), np.float32))


@pytest.mark.parametrize("mask_shape", [(2, 4), (2, 5, 8), (10,)])
def test_mask_shape_mismatch_error(mask_shape):
  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=H)
  x = np.ones((2, 5, D), np.float32)
  with pytest.raises(ValueError, match=r"(?i)mask"):
    layer(x, mask=np.ones(mask_shape, bool))
