"""The LM builder: .keras round trip, masking, exact eval, JAX backend."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from eval import perplexity
from moe_keras.models import blocks
from moe_keras.models import lm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _batch(rng, vocab=30, batch=3, steps=5):
  weights = np.ones((batch, steps), "float32")
  weights[0, 3:] = 0.0  # padding
  return {
      "inputs": rng.integers(0, vocab, (batch, steps)).astype("int32"),
      "targets": rng.integers(0, vocab, (batch, steps)).astype("int32"),
      "weights": weights,
  }


def _tiny(kind="flat", **kwargs):
  if kind == "hierarchical":
    moe = blocks.moe_spec(
        kind="hierarchical",
        num_groups=2,
        experts_per_group=2,
        expert_hidden_dim=8,
    )
  else:
    moe = blocks.moe_spec(num_experts=4, k=2, expert_hidden_dim=8)
  return lm.lm_config(model_dim=8, moe=moe, seed=0, **kwargs)


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_keras_round_trip(kind, tmp_path):
  keras.utils.set_random_seed(0)
  model = lm.build_lm(30, _tiny(kind, num_sampled=7))
  batch = _batch(np.random.default_rng(0))
  expected = keras.ops.convert_to_numpy(model(batch, training=False))
  path = str(tmp_path / "lm.keras")
  model.save(path)
  restored = keras.saving.load_model(
      path, custom_objects={"masked_mean_nll": perplexity.masked_mean_nll}
  )
  got = keras.ops.convert_to_numpy(restored(batch, training=False))
  np.testing.assert_array_equal(got, expected)


def test_eval_nll_is_exact_softmax_of_top_layer():
  """The model's eval output equals a numpy log-softmax of its top states."""
  keras.utils.set_random_seed(0)
  model = lm.build_lm(30, _tiny(num_sampled=5))
  batch = _batch(np.random.default_rng(1))
  top = keras.Model(model.inputs, model.get_layer("softmax").input[0])
  hidden = keras.ops.convert_to_numpy(top(batch, training=False))
  head = model.get_layer("softmax")
  kernel = keras.ops.convert_to_numpy(head.kernel).astype(np.float64)
  bias = keras.ops.convert_to_numpy(head.bias).astype(np.float64)
  logits = hidden.astype(np.float64) @ kernel.T + bias
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  log_z += logits.max(-1)
  expected = (
      log_z
      - np.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  )
  got = keras.ops.convert_to_numpy(model(batch, training=False))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_padding_is_not_routed():
  keras.utils.set_random_seed(0)
  model = lm.build_lm(30, _tiny())
  batch = _batch(np.random.default_rng(2))
  moe = model.get_layer("moe")
  # moe.input is [x, mask] (the mask is a call argument of the node).
  probe = keras.Model(model.inputs, moe.input[0])
  x = probe(batch, training=False)
  _, stats = moe(x, mask=batch["weights"] > 0, training=True, return_stats=True)
  real_tokens = int(batch["weights"].sum())
  assert float(np.sum(stats["token_counts"])) == 2 * real_tokens


def test_empty_rows_and_columns_change_nothing_real():
  # What lm_batching.fill_rows and length_multiple add: rows and columns of
  # weight 0. The real tokens' NLL, the loss and its gradients stay.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(0)
  model = lm.build_lm(30, _tiny())
  batch = _batch(np.random.default_rng(4))
  padded = {
      key: np.pad(value, [[0, 2], [0, 3]]) for key, value in batch.items()
  }
  results = []
  for b in (batch, padded):
    with tf.GradientTape() as tape:
      nll = model(b, training=False)
      loss = perplexity.masked_mean_nll(b["weights"], nll)
    grads = tape.gradient(loss, model.trainable_variables)
    results.append((nll, loss, grads))
  (nll, loss, grads), (nll_p, loss_p, grads_p) = results
  real = batch["weights"] > 0
  np.testing.assert_allclose(
      np.asarray(nll_p)[:3, :5][real], np.asarray(nll)[real], atol=1e-5
  )
  assert float(loss_p) == pytest.approx(float(loss), abs=1e-6)
  for g, g_p in zip(grads, grads_p):
    if g is None:  # the noise weights: no noise in evaluation
      assert g_p is None
      continue
    np.testing.assert_allclose(
        tf.convert_to_tensor(g_p), tf.convert_to_tensor(g), atol=1e-6
    )


def test_masked_mean_nll_is_per_token_mean():
  w = np.array([[1, 1, 0], [1, 0, 0]], "float32")
  nll = np.array([[1.0, 2.0, 100.0], [3.0, 50.0, 7.0]], "float32")
  got = float(perplexity.masked_mean_nll(w, nll))
  assert got == pytest.approx((1 + 2 + 3) / 3)


def test_jax_backend_trains_the_lm():
  code = textwrap.dedent("""
      import numpy as np, keras
      from moe_keras.models import lm, blocks
      from eval import perplexity
      keras.utils.set_random_seed(0)
      config = lm.lm_config(
          model_dim=8, num_sampled=6, seed=0,
          moe=blocks.moe_spec(num_experts=4, k=2, expert_hidden_dim=8,
                              capacity_factor=2.0))
      model = lm.build_lm(20, config)
      model.compile(keras.optimizers.Adam(0.05),
                    loss=perplexity.masked_mean_nll)
      rng = np.random.default_rng(0)
      ids = rng.integers(0, 20, (8, 6)).astype("int32")
      x = {"inputs": ids, "targets": ids, "weights": np.ones((8, 6), "float32")}
      first = model.evaluate(x, x["weights"], verbose=0, return_dict=True)
      history = model.fit(x, x["weights"], epochs=30, batch_size=8, verbose=0)
      last = model.evaluate(x, x["weights"], verbose=0, return_dict=True)
      print("LOSS", keras.backend.backend(), first["loss"], last["loss"])
      print("NAMES", *sorted(name for name in history.history
                             if name.endswith("loss")))
  """)
  env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOSS")][-1]
  _, backend, first, last = line.split()
  assert backend == "jax"
  assert float(last) < float(first) - 0.5
  # `loss` is the masked mean NLL; the MoE losses have their own names.
  names = [l for l in proc.stdout.splitlines() if l.startswith("NAMES")][-1]
  assert names.split()[1:] == [
      "loss",
      "moe_importance_loss",
      "moe_load_loss",
      "total_loss",
  ]


def test_moe_spec_passes_appendix_d_options():
  spec = blocks.moe_spec(
      num_experts=4,
      k=2,
      expert_hidden_dim=8,
      expert_dtype="bfloat16",
      recompute_expert_activations=True,
  )
  model = lm.build_lm(20, lm.lm_config(model_dim=8, moe=spec))
  moe = model.get_layer("moe")
  assert moe.recompute_expert_activations
  assert moe.expert_weight("expert_kernel_1").dtype == "bfloat16"
  assert moe.w_gate.dtype == "float32"  # gating stays float32
