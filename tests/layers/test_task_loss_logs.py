"""TaskLossModel: `loss` is the task loss, every auxiliary loss has its name.

Keras logs compiled loss + add_loss terms as `loss`; moe_keras's models log
the compiled loss as `loss`, the MoE losses as moe_importance_loss /
moe_load_loss / moe_batchwise_loss (summed over layers), weight regularizers
as other_aux_loss and the minimized sum as total_loss. Values are checked
against the numpy reference of the layers.
"""

import textwrap

import keras
from keras import ops
import numpy as np
import pytest

from moe_keras.layers import SparseMoE
from moe_keras.models import task_model
import layer_testlib
import numpy_reference as ref

D, H, N = 8, 16, 64
TOL = dict(rtol=1e-4, atol=1e-6)


def _two_moe_model(rng, l2=0.0):
  """x -> MoE (batchwise, n=4, k=2) -> MoE (top_k, n=4, k=2), numpy weights."""
  w_a = ref.random_flat_weights(rng, D, 4, H, D, batchwise=True)
  w_b = ref.random_flat_weights(rng, D, 4, H, D)
  regularizer = keras.regularizers.L2(l2) if l2 else None
  inputs = keras.Input((D,))
  moe_a = SparseMoE(
      4, 2, H, gating="batchwise", w_importance=0.2, w_batchwise=0.5
  )
  moe_b = SparseMoE(
      4, 2, H, gating="top_k", w_importance=0.3, kernel_regularizer=regularizer
  )
  model = task_model.TaskLossModel(inputs, moe_b(moe_a(inputs)))
  ref.assign_weights(moe_a, w_a)
  ref.assign_weights(moe_b, w_b)
  return model, w_a, w_b


def _reference(x, w_a, w_b, training):
  a = ref.sparse_moe(
      x,
      w_a,
      2,
      gating="batchwise",
      training=training,
      w_importance=0.2,
      w_batchwise=0.5,
  )
  b = ref.sparse_moe(
      a["output"], w_b, 2, gating="top_k", training=training, w_importance=0.3
  )
  return a, b


def test_fit_logs_task_loss_and_each_aux_loss():
  rng = np.random.default_rng(21)
  model, w_a, w_b = _two_moe_model(rng)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = rng.normal(size=(N, D)).astype(np.float32)
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  history = model.fit(x, y, batch_size=N, epochs=1, verbose=0).history
  a, b = _reference(x, w_a, w_b, training=True)
  task = np.mean((b["output"] - y) ** 2)
  assert {name for name in history if name.endswith("loss")} == {
      "loss",
      "moe_importance_loss",
      "moe_batchwise_loss",
      "total_loss",
  }
  np.testing.assert_allclose(history["loss"][0], task, **TOL)
  importance = a["importance_loss"] + b["importance_loss"]
  np.testing.assert_allclose(
      history["moe_importance_loss"][0], importance, **TOL
  )
  assert a["batchwise_loss"] > 0
  np.testing.assert_allclose(
      history["moe_batchwise_loss"][0], a["batchwise_loss"], **TOL
  )
  np.testing.assert_allclose(
      history["total_loss"][0],
      task + importance + a["batchwise_loss"],
      **TOL,
  )
  # The optimizer still minimizes the sum: only L_batchwise trains T.
  moe_a = model.layers[1]
  np.testing.assert_allclose(
      ops.convert_to_numpy(moe_a.thresholds),
      w_a["thresholds"] - 0.1 * a["threshold_grad"],
      rtol=1e-5,
      atol=1e-7,
  )


def test_evaluate_reports_the_task_loss_and_no_aux_loss():
  rng = np.random.default_rng(22)
  model, w_a, w_b = _two_moe_model(rng)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = rng.normal(size=(N, D)).astype(np.float32)
  model.compile(optimizer="sgd", loss="mse")
  logs = model.evaluate(x, y, batch_size=N, verbose=0, return_dict=True)
  _, b = _reference(x, w_a, w_b, training=False)
  task = np.mean((b["output"] - y) ** 2)
  np.testing.assert_allclose(logs["loss"], task, **TOL)
  np.testing.assert_allclose(logs["total_loss"], task, **TOL)
  assert logs["moe_importance_loss"] == 0.0
  assert logs["moe_batchwise_loss"] == 0.0


def test_weight_regularizer_is_logged_as_other_aux_loss():
  rng = np.random.default_rng(23)
  model, w_a, w_b = _two_moe_model(rng, l2=0.01)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = rng.normal(size=(N, D)).astype(np.float32)
  model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
  history = model.fit(x, y, batch_size=N, epochs=1, verbose=0).history
  a, b = _reference(x, w_a, w_b, training=True)
  l2 = 0.01 * sum(
      np.sum(w_b[name].astype(np.float64) ** 2)
      for name in ("expert_kernel_1", "expert_kernel_2")
  )
  np.testing.assert_allclose(history["other_aux_loss"][0], l2, **TOL)
  task = np.mean((b["output"] - y) ** 2)
  np.testing.assert_allclose(history["loss"][0], task, **TOL)
  np.testing.assert_allclose(
      history["total_loss"][0],
      task
      + a["importance_loss"]
      + b["importance_loss"]
      + a["batchwise_loss"]
      + l2,
      **TOL,
  )


def test_noisy_top_k_logs_load_loss():
  inputs = keras.Input((D,))
  model = task_model.TaskLossModel(inputs, SparseMoE(4, 2, H)(inputs))
  model.compile(optimizer="sgd", loss="mse")
  assert [m.name for m in model.metrics][:4] == [
      "loss",
      "moe_importance_loss",
      "moe_load_loss",
      "total_loss",
  ]


@pytest.mark.parametrize("backend", ["jax"])
def test_other_backend_logs_the_same_names(backend):
  code = textwrap.dedent("""
      import sys
      sys.path.insert(0, "tests/layers")
      import keras, numpy as np
      import test_task_loss_logs as t
      rng = np.random.default_rng(21)
      model, w_a, w_b = t._two_moe_model(rng)
      x = rng.normal(size=(t.N, t.D)).astype(np.float32)
      y = rng.normal(size=(t.N, t.D)).astype(np.float32)
      model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
      h = model.fit(x, y, batch_size=t.N, epochs=1, verbose=0).history
      a, b = t._reference(x, w_a, w_b, training=True)
      print("BACKEND", keras.backend.backend())
      for name, want in (
          ("loss", np.mean((b["output"] - y) ** 2)),
          ("moe_importance_loss", a["importance_loss"] + b["importance_loss"]),
          ("moe_batchwise_loss", a["batchwise_loss"]),
      ):
        print("CHECK", name, h[name][0], want)
  """)
  proc = layer_testlib.run_script(code, backend=backend, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert f"BACKEND {backend}" in lines
  checks = [l.split() for l in lines if l.startswith("CHECK")]
  assert [c[1] for c in checks] == [
      "loss",
      "moe_importance_loss",
      "moe_batchwise_loss",
  ]
  for _, name, got, want in checks:
    np.testing.assert_allclose(float(got), float(want), err_msg=name, **TOL)
