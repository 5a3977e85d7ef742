"""Squares taps: a gather whose gradient also carries its pieces' squares.

References: gradients derived by hand for a loss whose pieces are known in
closed form (numpy), on TensorFlow in-process and on JAX in a subprocess.
"""

import json
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import layer_testlib
from moe_keras.layers import piece_squares
from moe_keras.models import softmax

# Row 1 is gathered three times, row 4 once, rows 0, 2 and 3 never.
IDS = np.array([[1, 4, 1], [1, 2, 2]], "int32")
TABLE = (np.arange(15, dtype="float32").reshape(5, 3) - 7.0) / 10.0
WEIGHTS = (np.arange(18, dtype="float32").reshape(2, 3, 3) - 8.0) / 9.0


def _reference():
  """For loss = sum(w * E[ids]^2): pieces 2 w E[id], summed and squared."""
  pieces = 2.0 * WEIGHTS * TABLE[IDS]
  summed = np.zeros(TABLE.shape, np.float64)
  squares = np.zeros(TABLE.shape, np.float64)
  for row, piece in zip(IDS.reshape(-1), pieces.reshape(-1, 3)):
    summed[row] += piece
    squares[row] += piece**2
  return summed, squares


_JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import keras
    import numpy as np
    from moe_keras.layers import piece_squares
    table = np.array(json.loads(sys.argv[1]), "float32")
    ids = np.array(json.loads(sys.argv[2]), "int32")
    weights = np.array(json.loads(sys.argv[3]), "float32")
    def loss(e, t):
      y = piece_squares.take_rows(e, ids, t)
      return keras.ops.sum(weights * y * y)
    g_e, g_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        table, np.zeros_like(table))
    print("RESULT", json.dumps([np.asarray(g_e).tolist(),
                                np.asarray(g_t).tolist()]))
""")


def test_take_rows_gradients_on_tensorflow():
  table = tf.Variable(TABLE)
  tap = tf.Variable(tf.zeros_like(TABLE))

  @tf.function
  def grads():
    with tf.GradientTape() as tape:
      y = piece_squares.take_rows(table, IDS, tap)
      loss = tf.reduce_sum(WEIGHTS * y * y)
    return y, tape.gradient(loss, [table, tap])

  y, (g_table, g_tap) = grads()
  summed, squares = _reference()
  np.testing.assert_allclose(y.numpy(), TABLE[IDS], rtol=1e-7)
  # Dense, not IndexedSlices: the rows are summed; the tap has the squares.
  assert not isinstance(g_table, tf.IndexedSlices)
  np.testing.assert_allclose(g_table.numpy(), summed, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g_tap.numpy(), squares, rtol=1e-6, atol=1e-7)
  # Row 1's three pieces: the squares' sum is not the square of the sum.
  assert abs(squares[1] - summed[1] ** 2).max() > 1e-2


def test_take_rows_gradients_on_jax():
  g_table, g_tap = layer_testlib.script_result(
      _JAX_SCRIPT,
      json.dumps(TABLE.tolist()),
      json.dumps(IDS.tolist()),
      json.dumps(WEIGHTS.tolist()),
      backend="jax",
  )
  summed, squares = _reference()
  np.testing.assert_allclose(g_table, summed, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g_tap, squares, rtol=1e-6, atol=1e-7)


def test_take_rows_without_tap_is_take():
  table = tf.Variable(TABLE)
  with tf.GradientTape() as tape:
    y = piece_squares.take_rows(table, IDS)
  assert isinstance(tape.gradient(y, table), tf.IndexedSlices)


def test_embedding_taps_its_table_and_computes_the_same():
  tapped = piece_squares.PieceSquaresEmbedding(5, 3, piece_squares=True)
  plain = piece_squares.PieceSquaresEmbedding(5, 3)
  tapped.build((None,))
  plain.build((None,))
  tapped.embeddings.assign(TABLE)
  plain.embeddings.assign(TABLE)
  assert [w.name for w in plain.weights] == ["embeddings"]
  tap = tapped.embeddings_piece_squares
  assert tap.path.endswith("/embeddings_piece_squares") and tap.trainable
  assert piece_squares.squares_target(tap) is tapped._embeddings
  assert piece_squares.squares_target(tapped.embeddings) is None
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(tap), 0.0)
  np.testing.assert_allclose(tapped(IDS).numpy(), TABLE[IDS], rtol=1e-7)
  np.testing.assert_allclose(plain(IDS).numpy(), TABLE[IDS], rtol=1e-7)
  restored = piece_squares.PieceSquaresEmbedding.from_config(
      tapped.get_config()
  )
  assert restored.piece_squares is True
  with pytest.raises(
      ValueError, match=r"^piece_squares='yes'; expected True or False$"
  ):
    piece_squares.PieceSquaresEmbedding(5, 3, piece_squares="yes")


def test_softmax_head_taps_only_a_sampled_softmax():
  hidden = keras.Input((None, 4))
  targets = keras.Input((None,), dtype="int32")
  sampled = softmax.SoftmaxHead(10, num_sampled=3, piece_squares=True)
  sampled([hidden, targets])
  assert sorted(w.name for w in sampled.weights) == [
      "bias",
      "bias_piece_squares",
      "kernel",
      "kernel_piece_squares",
  ]
  assert piece_squares.squares_target(sampled.kernel_piece_squares) is (
      sampled.kernel
  )
  # The exact softmax's gradient is dense already: nothing to tap.
  exact = softmax.SoftmaxHead(10, piece_squares=True)
  exact([hidden, targets])
  assert sorted(w.name for w in exact.weights) == ["bias", "kernel"]
  assert softmax.SoftmaxHead.from_config(sampled.get_config()).piece_squares
  with pytest.raises(ValueError, match=r"^piece_squares=1; expected True"):
    softmax.SoftmaxHead(10, piece_squares=1)


def test_sampled_nll_taps_count_every_gathered_row():
  # Targets [2, 2, 5] and samples [2, 7]: row 2 is gathered 3 times; the
  # taps hold the per-row sums of the squared pieces of kernel and bias.
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 4)).astype("float32")
  kernel = tf.Variable(rng.normal(size=(10, 4)).astype("float32"))
  bias = tf.Variable(rng.normal(size=(10,)).astype("float32"))
  taps = (tf.Variable(tf.zeros((10, 4))), tf.Variable(tf.zeros((10,))))
  targets = np.array([2, 2, 5], "int32")
  sampled = np.array([2, 7], "int32")
  with tf.GradientTape(persistent=True) as tape:
    plain = softmax.sampled_nll(
        hidden, targets, kernel, bias, None, None, sampled_ids=sampled
    )
    tapped = softmax.sampled_nll(
        hidden,
        targets,
        kernel,
        bias,
        None,
        None,
        sampled_ids=sampled,
        squares_taps=taps,
    )
    plain_loss = tf.reduce_sum(plain)
    tapped_loss = tf.reduce_sum(tapped)
  np.testing.assert_allclose(tapped.numpy(), plain.numpy(), rtol=1e-6)
  for variable, tap in zip((kernel, bias), taps):
    pieces = tape.gradient(plain_loss, variable)  # IndexedSlices
    assert isinstance(pieces, tf.IndexedSlices)
    values = pieces.values.numpy()
    rows = pieces.indices.numpy()
    summed = np.zeros(variable.shape)
    squares = np.zeros(variable.shape)
    np.add.at(summed, rows, values)
    np.add.at(squares, rows, values**2)
    assert sorted(rows.tolist()) == [2, 2, 2, 5, 7]
    np.testing.assert_allclose(
        tape.gradient(tapped_loss, variable).numpy(),
        summed,
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        tape.gradient(tapped_loss, tap).numpy(), squares, rtol=1e-5, atol=1e-6
    )


def test_a_tapped_lm_saves_and_restores_its_weights(tmp_path):
  from moe_keras.models import lm  # pylint: disable=g-import-not-at-top

  config = lm.lm_config(
      model_dim=4, layers=("lstm",), num_sampled=3, piece_squares=True
  )
  model = lm.build_lm(11, config)
  rng = np.random.default_rng(0)
  values = [rng.normal(size=w.shape).astype("float32") for w in model.weights]
  for w, value in zip(model.weights, values):
    w.assign(value)
  path = str(tmp_path / "lm.weights.h5")
  model.save_weights(path)
  restored = lm.build_lm(11, config)
  restored.load_weights(path)
  assert [w.path for w in restored.weights] == [w.path for w in model.weights]
  for w, value in zip(restored.weights, values):
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), value)
