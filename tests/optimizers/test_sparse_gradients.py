"""Row-sparse gradients: sum_sparse_rows sums a repeated row's pieces first.

The references are numpy Adam (Kingma & Ba, Keras's epsilon-hat form) on
gradients derived by hand, and the same model trained by the JAX backend in
a subprocess from the same weights and batches.
"""

import os
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_keras.layers import piece_squares
from moe_keras.models import lm
from moe_keras.optimizers import factored_adam
from moe_keras.optimizers import factory
from moe_keras.optimizers import fused_adam
from moe_keras.optimizers import sparse_gradients

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# The layer tests' fresh-process helper (run_script).
sys.path.insert(0, os.path.join(REPO, "tests", "layers"))
import layer_testlib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Row 3 is gathered three times, row 1 once, rows 0, 2 and 4 never.
IDS = np.array([[1, 3, 3, 3]], "int32")
TABLE = np.arange(10, dtype="float32").reshape(5, 2) / 10.0


def _embedding_pieces(table, ids):
  """d/dE of mean((E[ids] - 1)^2): one [2] piece per occurrence, by hand."""
  gathered = table[ids.reshape(-1)]
  return ids.reshape(-1), 2.0 * (gathered - 1.0) / gathered.size


def _numpy_adam_rows(steps, lr, summed, beta_1=0.9, beta_2=0.999, eps=1e-7):
  """numpy Adam on the embedding table; not summed: Keras's TF 2nd moment."""
  table = TABLE.astype(np.float64).copy()
  m = np.zeros_like(table)
  v = np.zeros_like(table)
  for t in range(1, steps + 1):
    rows, pieces = _embedding_pieces(table, IDS)
    g = np.zeros_like(table)
    np.add.at(g, rows, pieces)
    if summed:
      g2 = g * g
    else:
      g2 = np.zeros_like(table)
      np.add.at(g2, rows, pieces**2)
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    m += (g - m) * (1 - beta_1)
    v += (g2 - v) * (1 - beta_2)
    table -= alpha * m / (np.sqrt(v) + eps)
  return table


def _train_embedding(optimizer, steps, taps=False):
  embedding = (
      piece_squares.PieceSquaresEmbedding(5, 2, piece_squares=True)
      if taps
      else keras.layers.Embedding(5, 2)
  )
  model = keras.Sequential([keras.Input((4,), dtype="int32"), embedding])
  model.layers[0].embeddings.assign(TABLE)
  model.compile(optimizer, loss="mse")
  for _ in range(steps):
    model.train_on_batch(IDS, np.ones((1, 4, 2), "float32"))
  return keras.ops.convert_to_numpy(model.layers[0].embeddings)


def test_embedding_gradient_is_row_sparse_on_tensorflow():
  # What the optimizers must handle: the gather's gradient arrives as
  # IndexedSlices with row 3 three times.
  table = tf.Variable(TABLE)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean((tf.gather(table, IDS) - 1.0) ** 2)
  grad = tape.gradient(loss, table)
  assert isinstance(grad, tf.IndexedSlices)
  assert sorted(grad.indices.numpy().tolist()) == [1, 3, 3, 3]
  dense = sparse_gradients.sum_duplicate_rows(grad, table)
  rows, pieces = _embedding_pieces(TABLE, IDS)
  expected = np.zeros_like(TABLE)
  np.add.at(expected, rows, pieces)
  assert not isinstance(dense, tf.IndexedSlices)
  np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-6)
  dense_in = tf.ones((5, 2))
  assert sparse_gradients.sum_duplicate_rows(dense_in, table) is dense_in
  assert sparse_gradients.sum_duplicate_rows(None, table) is None


@pytest.mark.parametrize("summed", [False, True])
def test_fused_adam_on_repeated_rows(summed):
  optimizer = fused_adam.FusedAdam(learning_rate=0.1, sum_sparse_rows=summed)
  got = _train_embedding(optimizer, steps=3)
  np.testing.assert_allclose(
      got, _numpy_adam_rows(3, 0.1, summed), rtol=1e-5, atol=1e-6
  )
  # The two second moments differ on the repeated row only.
  other = _numpy_adam_rows(3, 0.1, not summed)
  assert np.abs(got[3] - other[3]).max() > 1e-3
  np.testing.assert_allclose(got[[0, 1, 2, 4]], other[[0, 1, 2, 4]], rtol=1e-5)


def test_clipnorm_measures_the_summed_gradient():
  # Row 3's gradient is 3 pieces of (2 (0.6 - 1) / 8, 2 (0.7 - 1) / 8) =
  # (-0.3, -0.225); row 1's is (-0.2, -0.175). Its norm is 0.4596, the
  # pieces' 0.3428: clipnorm 0.3 scales the gradient by 0.3 / 0.4596.
  rows, pieces = _embedding_pieces(TABLE, IDS)
  g = np.zeros((5, 2))
  np.add.at(g, rows, pieces)
  norm = np.linalg.norm(g)
  assert norm == pytest.approx(0.4596, abs=1e-4)
  clipped = g * 0.3 / norm
  optimizer = fused_adam.FusedAdam(
      learning_rate=0.1, clipnorm=0.3, sum_sparse_rows=True
  )
  model = keras.Sequential(
      [keras.Input((4,), dtype="int32"), keras.layers.Embedding(5, 2)]
  )
  model.layers[0].embeddings.assign(TABLE)
  optimizer.build(model.trainable_variables)
  grad = tf.IndexedSlices(
      tf.constant(pieces, tf.float32),
      tf.constant(rows),
      tf.constant([5, 2]),
  )
  optimizer.apply([grad], model.trainable_variables)
  # One Adam step from zero moments: m = 0.1 g, v = 0.001 g^2, alpha =
  # lr sqrt(0.001) / 0.1, so the step is lr g / (|g| + eps / sqrt(0.001)).
  expected = TABLE - 0.1 * clipped / (np.abs(clipped) + 1e-7 / np.sqrt(1e-3))
  np.testing.assert_allclose(
      keras.ops.convert_to_numpy(model.layers[0].embeddings),
      expected,
      rtol=1e-5,
      atol=1e-6,
  )


@pytest.mark.parametrize("summed", [False, True])
def test_factored_adam_on_repeated_rows(summed):
  # The embedding is not an expert matrix: plain Adam.
  optimizer = factored_adam.FactoredAdam(
      learning_rate=0.1, sum_sparse_rows=summed
  )
  got = _train_embedding(optimizer, steps=3)
  np.testing.assert_allclose(
      got, _numpy_adam_rows(3, 0.1, summed), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("name", ["adam", "factored_adam"])
def test_make_optimizer_passes_the_option_and_it_round_trips(name):
  for summed in (False, True):
    optimizer = factory.make_optimizer(name=name, sum_sparse_rows=summed)
    assert optimizer.sum_sparse_rows is summed
    restored = keras.optimizers.deserialize(
        keras.optimizers.serialize(optimizer)
    )
    assert restored.sum_sparse_rows is summed
  with pytest.raises(
      ValueError, match="^sum_sparse_rows='yes'; expected True or False\n"
  ):
    factory.make_optimizer(name=name, sum_sparse_rows="yes")


_BACKEND_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from moe_keras.optimizers import fused_adam
    data = np.load(sys.argv[1])
    model = keras.Sequential([
        keras.Input((12,), dtype="int32"),
        keras.layers.Embedding(7, 4),
        keras.layers.Dense(7),
    ])
    model.set_weights([data["embedding"], data["kernel"], data["bias"]])
    model.compile(
        fused_adam.FusedAdam(
            learning_rate=0.05, sum_sparse_rows=bool(int(sys.argv[2]))
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = [
        float(model.train_on_batch(data["ids"][i], data["targets"][i]))
        for i in range(len(data["ids"]))
    ]
    print("RESULT", json.dumps({
        "backend": keras.backend.backend(),
        "losses": losses,
        "weights": [w.tolist() for w in model.get_weights()],
    }))
""")


def _train_in_subprocess(backend, data_path, option, script=_BACKEND_SCRIPT):
  """Runs `script` (data path, 0/1 option) under `backend`; its RESULT."""
  return layer_testlib.backend_result(script, data_path, option, backend)


def test_tensorflow_and_jax_train_alike_with_summed_rows(tmp_path):
  # An embedding whose 7 rows repeat within every batch of 3 x 12 ids, 8
  # Adam steps from the same weights on the same batches: with
  # sum_sparse_rows both backends end at the same weights; without it (the
  # default) TensorFlow's repeated rows move further per step.
  rng = np.random.default_rng(0)
  path = str(tmp_path / "data.npz")
  np.savez(
      path,
      embedding=rng.normal(size=(7, 4)).astype("float32"),
      kernel=rng.normal(size=(4, 7)).astype("float32") * 0.5,
      bias=np.zeros(7, "float32"),
      ids=rng.integers(0, 7, size=(8, 3, 12)).astype("int32"),
      targets=rng.integers(0, 7, size=(8, 3, 12)).astype("int32"),
  )
  jax_run = _train_in_subprocess("jax", path, option=True)
  assert _train_in_subprocess("jax", path, option=False) == jax_run
  tf_run = _train_in_subprocess("tensorflow", path, option=True)
  np.testing.assert_allclose(tf_run["losses"], jax_run["losses"], rtol=1e-5)
  for a, b in zip(tf_run["weights"], jax_run["weights"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  keras_run = _train_in_subprocess("tensorflow", path, option=False)
  embedding_moved = np.abs(
      np.array(keras_run["weights"][0]) - np.array(jax_run["weights"][0])
  ).max()
  assert embedding_moved > 1e-3


@pytest.mark.parametrize(
    "make", [fused_adam.FusedAdam, factored_adam.FactoredAdam]
)
def test_squares_taps_give_the_per_piece_second_moment(make):
  # The embedding's squares tap hands the optimizer the sum of each row's
  # squared pieces: Keras's TensorFlow Adam on IndexedSlices, here from a
  # dense gradient (as on JAX); the tap itself never moves.
  got = _train_embedding(make(learning_rate=0.1), steps=3, taps=True)
  np.testing.assert_allclose(
      got, _numpy_adam_rows(3, 0.1, summed=False), rtol=1e-5, atol=1e-6
  )


def test_squares_taps_stay_zero_and_contradict_summed_rows():
  model = keras.Sequential(
      [
          keras.Input((4,), dtype="int32"),
          piece_squares.PieceSquaresEmbedding(5, 2, piece_squares=True),
      ]
  )
  model.compile(fused_adam.FusedAdam(learning_rate=0.1), loss="mse")
  model.train_on_batch(IDS, np.ones((1, 4, 2), "float32"))
  tap = model.layers[0].embeddings_piece_squares
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(tap), 0.0)
  model.compile(
      fused_adam.FusedAdam(learning_rate=0.1, sum_sparse_rows=True),
      loss="mse",
  )
  with pytest.raises(ValueError, match="contradict sum_sparse_rows=True"):
    model.train_on_batch(IDS, np.ones((1, 4, 2), "float32"))


_LM_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from moe_keras.models import lm
    from moe_keras.models import softmax
    from moe_keras.optimizers import fused_adam
    data = np.load(sys.argv[1])
    # The same candidates on both backends (their random streams differ).
    softmax.sample_log_uniform = (
        lambda num_sampled, vocab_size, seed: keras.ops.convert_to_tensor(
            data["sampled"]))
    model = lm.build_lm(13, lm.lm_config(
        model_dim=8, layers=("lstm",), num_sampled=5, dropout=0.0,
        piece_squares=bool(int(sys.argv[2]))))
    for w in model.weights:
      key = w.path.replace("/", "__")
      if key in data:
        w.assign(data[key])
    model.compile(fused_adam.FusedAdam(learning_rate=0.05),
                  loss=lambda y, nll: keras.ops.mean(nll))
    losses = []
    for ids, targets in zip(data["ids"], data["targets"]):
      result = model.train_on_batch(
          {"inputs": ids, "targets": targets,
           "weights": np.ones(ids.shape, "float32")},
          np.zeros(ids.shape, "float32"), return_dict=True)
      losses.append(float(result["loss"]))
    print("RESULT", json.dumps({
        "backend": keras.backend.backend(),
        "losses": losses,
        "weights": {w.path: keras.ops.convert_to_numpy(w).tolist()
                    for w in model.weights},
    }))
""")


def _train_lm(backend, data_path, taps):
  return _train_in_subprocess(
      backend, data_path, option=taps, script=_LM_SCRIPT
  )


def test_jax_with_squares_taps_trains_the_lm_as_tensorflow_does(tmp_path):
  # A 1-LSTM LM with a sampled softmax (13 words, 5 fixed candidates), 6
  # Adam steps from the same weights on the same batches of 4 x 7 tokens:
  # JAX with squares taps ends where TensorFlow's Keras Adam ends (per-piece
  # squares from IndexedSlices); JAX without them (Adam as written) does
  # not; TensorFlow with the taps computes what it computes without them.
  rng = np.random.default_rng(0)
  init = lm.build_lm(
      13,
      lm.lm_config(
          model_dim=8, layers=("lstm",), num_sampled=5, dropout=0.0, seed=3
      ),
  )
  path = str(tmp_path / "lm.npz")
  np.savez(
      path,
      ids=rng.integers(0, 13, size=(6, 4, 7)).astype("int32"),
      targets=rng.integers(0, 13, size=(6, 4, 7)).astype("int32"),
      sampled=np.array([0, 1, 1, 4, 9], "int32"),
      **layer_testlib.weight_arrays(init),
  )
  keras_tf = _train_lm("tensorflow", path, taps=False)
  jax_taps = _train_lm("jax", path, taps=True)
  np.testing.assert_allclose(jax_taps["losses"], keras_tf["losses"], rtol=1e-5)
  for name, value in keras_tf["weights"].items():
    if "seed_generator" not in name:
      np.testing.assert_allclose(
          jax_taps["weights"][name], value, rtol=1e-4, atol=1e-5
      )
  tf_taps = _train_lm("tensorflow", path, taps=True)
  np.testing.assert_allclose(tf_taps["losses"], keras_tf["losses"], rtol=1e-6)
  for name in (
      "embedding/embeddings_piece_squares",
      "softmax/kernel_piece_squares",
      "softmax/bias_piece_squares",
  ):
    np.testing.assert_array_equal(tf_taps["weights"][name], 0.0)
    np.testing.assert_array_equal(jax_taps["weights"][name], 0.0)
  jax_plain = _train_lm("jax", path, taps=False)
  assert np.abs(np.array(jax_plain["losses"]) - keras_tf["losses"]).max() > 1e-3


@pytest.mark.parametrize(
    "make", [fused_adam.FusedAdam, factored_adam.FactoredAdam]
)
def test_squares_taps_get_no_optimizer_slots(make):
  # A tap is never updated: the optimizer builds no moments for it, so a
  # tapped LM's optimizer state is as large as the untapped one's.
  def optimizer_sizes(taps):
    model = lm.build_lm(
        13,
        lm.lm_config(
            model_dim=8,
            layers=("lstm",),
            num_sampled=5,
            dropout=0.0,
            piece_squares=taps,
        ),
    )
    optimizer = make(learning_rate=0.05)
    optimizer.build(model.trainable_variables)
    return len(model.trainable_variables), sorted(
        tuple(v.shape) for v in optimizer.variables
    )

  plain_count, plain_slots = optimizer_sizes(False)
  tapped_count, tapped_slots = optimizer_sizes(True)
  assert tapped_count == plain_count + 3
  assert tapped_slots == plain_slots
