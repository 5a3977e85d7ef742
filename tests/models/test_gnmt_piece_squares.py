"""GNMT with squares taps (`gnmt_model.piece_squares`): JAX trains it as
TensorFlow's Keras Adam does, and MtTask warns a JAX run without them."""

import logging
import os
import sys
import textwrap

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.models import gnmt
from moe_keras.tasks import base
from moe_keras.tasks import mt_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# The layer tests' fresh-process helper (run_script).
sys.path.insert(0, os.path.join(REPO, "tests", "layers"))
import layer_testlib  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = dict(model_dim=8, lstm_units=16, lstm_projection=8, dropout=0.0)
TAP = "embedding/embeddings_piece_squares"


def _tiny(piece_squares, vocab_size=11):
  return gnmt.gnmt_model(vocab_size, piece_squares=piece_squares, **TINY)


def _plain_and_tapped():
  """An untapped tiny GNMT, a tapped one with its weights, and the tapped
  one's weights by path."""
  plain, tapped = _tiny(False), _tiny(True)
  by_path = {w.path: w for w in tapped.weights}
  for w in plain.weights:
    by_path[w.path].assign(w)
  return plain, tapped, by_path


def test_taps_change_no_forward_value_and_round_trip(tmp_path):
  plain, tapped, by_path = _plain_and_tapped()
  assert [
      w.path for w in plain.weights if w.path.endswith("_piece_squares")
  ] == []
  for w in plain.weights:
    tapped.get_layer(w.path.split("/")[0])  # the same layer names
  x = {
      "source": np.array([[5, 6, 7, 0], [4, 4, 4, 4]], "int32"),
      "target_in": np.array([[2, 5, 5], [2, 9, 0]], "int32"),
  }
  np.testing.assert_array_equal(
      keras.ops.convert_to_numpy(tapped(x)),
      keras.ops.convert_to_numpy(plain(x)),
  )
  # The tap is a weight of the checkpoint: a tapped GNMT restores all of it.
  by_path[TAP].assign(np.full((11, 8), 7.0, "float32"))
  path = str(tmp_path / "gnmt.weights.h5")
  tapped.save_weights(path)
  restored = _tiny(True)
  restored.load_weights(path)
  for w in restored.weights:
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(w),
        keras.ops.convert_to_numpy(by_path[w.path]),
    )


def test_tap_gradient_is_the_per_row_sum_of_squared_pieces():
  # The shared embedding is gathered by the source and by the target: its
  # tap's gradient sums each row's squared pieces over both lookups, which
  # are TensorFlow's IndexedSlices pieces of the untapped model.
  plain, tapped, _ = _plain_and_tapped()
  x = {
      "source": np.array([[5, 6, 5, 0], [4, 5, 4, 4]], "int32"),
      "target_in": np.array([[2, 5, 5], [2, 9, 0]], "int32"),
  }

  def gradients(model, names):
    variables = [w for w in model.trainable_weights if w.path in names]
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(model(x)))
    return tape.gradient(loss, variables)

  (pieces,) = gradients(plain, {"embedding/embeddings"})
  assert isinstance(pieces, tf.IndexedSlices)
  values, indices = pieces.values.numpy(), pieces.indices.numpy()
  assert len(indices) == 8 + 6 and len(set(indices.tolist())) < len(indices)
  want_sum = np.zeros((11, 8), "float32")
  want_squares = np.zeros((11, 8), "float32")
  for row, piece in zip(indices, values):
    want_sum[row] += piece
    want_squares[row] += piece**2
  table_grad, tap_grad = gradients(tapped, {"embedding/embeddings", TAP})
  np.testing.assert_allclose(
      tf.convert_to_tensor(table_grad), want_sum, rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(tap_grad, want_squares, rtol=1e-5, atol=1e-9)


_GNMT_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from moe_keras.models import gnmt
    from moe_keras.optimizers import fused_adam
    from moe_keras.tasks import mt_task
    data = np.load(sys.argv[1])
    model = gnmt.gnmt_model(
        11, model_dim=8, lstm_units=16, lstm_projection=8, dropout=0.0,
        piece_squares=bool(int(sys.argv[2])))
    for w in model.weights:
      key = w.path.replace("/", "__")
      if key in data:
        w.assign(data[key])
    model.compile(fused_adam.FusedAdam(learning_rate=0.05),
                  loss=mt_task.masked_token_nll)
    losses = []
    for source, target_in, target_out in zip(
        data["source"], data["target_in"], data["target_out"]):
      weights = (target_out != 0).astype("float32")
      y = np.stack([target_out.astype("float32"), weights], axis=-1)
      result = model.train_on_batch(
          {"source": source, "target_in": target_in}, y, return_dict=True)
      losses.append(float(result["loss"]))
    print("RESULT", json.dumps({
        "backend": keras.backend.backend(),
        "losses": losses,
        "weights": {w.path: keras.ops.convert_to_numpy(w).tolist()
                    for w in model.weights},
    }))
""")


def _train_gnmt(backend, data_path, taps):
  return layer_testlib.backend_result(_GNMT_SCRIPT, data_path, taps, backend)


def test_jax_with_squares_taps_trains_gnmt_as_tensorflow_does(tmp_path):
  # A tiny GNMT (11 wordpieces, no MoE, no dropout), 5 Adam steps from the
  # same weights on the same batches of 3 pairs whose wordpieces repeat:
  # JAX with the embedding's squares tap ends where TensorFlow's Keras Adam
  # ends; JAX without it (Adam as written) does not; TensorFlow with the tap
  # computes what it computes without it.
  rng = np.random.default_rng(0)
  init = _tiny(False)
  target = rng.integers(4, 11, size=(5, 3, 6)).astype("int32")
  target[:, 0, 4:] = 0  # padding, not a token
  target_in = np.concatenate(
      [np.full((5, 3, 1), 2, "int32"), target[:, :, :-1]], axis=2
  )
  target_in[:, 0, 5:] = 0
  source = rng.integers(4, 11, size=(5, 3, 7)).astype("int32")
  source[:, 1, 5:] = 0
  path = str(tmp_path / "gnmt.npz")
  np.savez(
      path,
      source=source,
      target_in=target_in,
      target_out=target,
      **layer_testlib.weight_arrays(init),
  )
  keras_tf = _train_gnmt("tensorflow", path, taps=False)
  jax_taps = _train_gnmt("jax", path, taps=True)
  np.testing.assert_allclose(jax_taps["losses"], keras_tf["losses"], rtol=1e-5)
  # Adam moves every weight about 0.05 a step whatever its gradient's size,
  # so a near-zero gradient's rounding shows at 1e-5; the embedding without
  # taps is off by more than 1e-3 (below).
  for name, value in keras_tf["weights"].items():
    if "seed_generator" not in name:
      np.testing.assert_allclose(
          jax_taps["weights"][name], value, rtol=1e-4, atol=1e-4, err_msg=name
      )
  tf_taps = _train_gnmt("tensorflow", path, taps=True)
  np.testing.assert_allclose(tf_taps["losses"], keras_tf["losses"], rtol=1e-6)
  np.testing.assert_array_equal(tf_taps["weights"][TAP], 0.0)
  np.testing.assert_array_equal(jax_taps["weights"][TAP], 0.0)
  jax_plain = _train_gnmt("jax", path, taps=False)
  assert np.abs(np.array(jax_plain["losses"]) - keras_tf["losses"]).max() > 1e-3
  table = "embedding/embeddings"
  assert (
      np.abs(
          np.array(jax_plain["weights"][table]) - keras_tf["weights"][table]
      ).max()
      > 1e-3
  )


class _Data:
  """The least of an MtData that `MtTask.train_dataset` reads."""

  def train_dataset(self, input_context=None):
    del input_context
    x = {"source": [[5, 6]], "target_in": [[2, 5]]}
    return tf.data.Dataset.from_tensors((x, [[5, 3]], [[1.0, 1.0]]))


def test_mt_task_warns_a_jax_run_without_taps(monkeypatch, caplog):
  task = mt_task.MtTask(_Data())
  monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  (warning,) = [
      r.message
      for r in caplog.records
      if mt_task.PIECE_SQUARES_BINDING in r.message
  ]
  assert "\n" not in warning
  assert f"--gin_bindings={mt_task.PIECE_SQUARES_BINDING}" in warning
  caplog.clear()
  with gin.unlock_config():
    gin.bind_parameter("gnmt_model.piece_squares", True)
  try:
    with caplog.at_level(logging.WARNING):
      task.train_dataset()
  finally:
    gin.clear_config()
  assert not caplog.records
  monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  assert not caplog.records


@pytest.mark.parametrize(
    "backend, piece_squares, warns",
    [("jax", False, True), ("jax", True, False), ("tensorflow", False, False)],
)
def test_piece_squares_warning(backend, piece_squares, warns):
  warning = base.piece_squares_warning(backend, piece_squares, "x.y=True")
  assert (warning is not None) is warns
  if warns:
    assert "\n" not in warning and "--gin_bindings=x.y=True" in warning


def test_bad_piece_squares_is_one_line():
  # (gin adds a line naming the configurable; the CLIs print the first.)
  with pytest.raises(
      ValueError, match="^piece_squares='yes'; expected True or False(\n|$)"
  ):
    gnmt.gnmt_model(11, piece_squares="yes", **TINY)
