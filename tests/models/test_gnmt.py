"""MoE-GNMT: cached single-step decoding, padding, counts, training."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from moe_keras.models import blocks
from moe_keras.models import gnmt

V = 24


def _spec(kind):
  if kind == "batchwise":
    return blocks.moe_spec(
        kind="flat",
        num_experts=4,
        k=2,
        expert_hidden_dim=8,
        gating="batchwise",
        w_importance=0.01,
        w_load=0.01,
    )
  if kind == "noisy":
    return blocks.moe_spec(
        kind="flat",
        num_experts=4,
        k=2,
        expert_hidden_dim=8,
        w_importance=0.01,
        w_load=0.01,
    )
  if kind == "hierarchical":
    return blocks.moe_spec(
        kind="hierarchical",
        num_groups=2,
        experts_per_group=3,
        expert_hidden_dim=8,
        w_importance=0.01,
        w_load=0.01,
    )
  if kind == "ffn":
    return blocks.moe_spec(kind="ffn", hidden_dims=(16,))
  return None


def _model(kind, attention_kind="factored", projection=8):
  return gnmt.gnmt_model(
      V,
      model_dim=8,
      lstm_units=16 if projection else 8,
      lstm_projection=projection,
      moe=_spec(kind),
      dropout=0.2,
      seed=1,
      attention_kind=attention_kind,
  )


SRC = np.array([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0], [12, 0, 0, 0, 0]], np.int32)
TGT = np.array([[2, 4, 5, 6], [2, 6, 7, 0], [2, 8, 0, 0]], np.int32)


def test_reverse_within_length_numpy():
  x = np.arange(2 * 4).reshape(2, 4, 1).astype("float32")
  out = np.asarray(gnmt.reverse_within_length(x, np.array([3, 1])))[..., 0]
  np.testing.assert_array_equal(out, [[2, 1, 0, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize(
    "kind,attention_kind,projection",
    [
        ("batchwise", "factored", 8),
        ("noisy", "additive", 8),
        ("hierarchical", "factored", 8),
        ("ffn", "factored", None),
        (None, "factored", 8),
    ],
)
def test_decode_step_equals_teacher_forcing(kind, attention_kind, projection):
  model = _model(kind, attention_kind, projection)
  full = np.asarray(model({"source": SRC, "target_in": TGT}, training=False))
  assert full.shape == (3, 4, V)
  layers = gnmt.layers_of(model)
  encoded = layers.encode(SRC)
  state = layers.initial_state(3)
  for t in range(TGT.shape[1]):
    logits, state, context = layers.decode_step(TGT[:, t], state, encoded)
    assert context.shape == (3, 8)
    real = TGT[:, t] != 0
    np.testing.assert_allclose(
        np.asarray(logits)[real], full[real, t], atol=1e-5
    )


def test_source_padding_does_not_change_outputs():
  model = _model("batchwise")
  short = model({"source": SRC[1:2, :3], "target_in": TGT[1:2, :3]})
  long = model({"source": SRC[1:2], "target_in": TGT[1:2, :3]})
  np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-5)


def test_paper_config_counts():
  # MoE-2048 hierarchical, h = 2048: the paper reports 8.7B parameters.
  spec = blocks.moe_spec(
      kind="hierarchical",
      num_groups=32,
      experts_per_group=64,
      expert_hidden_dim=2048,
  )
  counts = gnmt.count_gnmt(512, 2048, 512, moe=spec)
  assert 8.6e9 < counts["params_excl"] < 8.8e9


def test_fit_reduces_loss_and_adds_moe_losses():
  keras.utils.set_random_seed(0)
  model = _model("batchwise")
  model.compile(
      optimizer=keras.optimizers.Adam(0.02),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  x = {"source": np.tile(SRC, (4, 1)), "target_in": np.tile(TGT, (4, 1))}
  y = np.concatenate([np.tile(TGT, (4, 1))[:, 1:], np.full((12, 1), 3)], 1)
  w = (np.tile(TGT, (4, 1)) != 0).astype("float32")
  hist = model.fit(x, y, sample_weight=w, epochs=15, batch_size=12, verbose=0)
  losses = hist.history["loss"]
  assert losses[-1] < 0.6 * losses[0]
  model({"source": SRC, "target_in": TGT}, training=True)
  assert len(model.losses) >= 2  # encoder and decoder MoE losses


def test_bad_widths_one_line_error():
  with pytest.raises(ValueError, match="must equal model_dim"):
    gnmt.gnmt_model(V, model_dim=8, lstm_units=16, lstm_projection=4)


def test_generate_greedy_matches_manual_greedy():
  model = _model("batchwise")
  greedy = gnmt.generate(model, SRC, beam_size=1, max_length_offset=4)
  beam = gnmt.generate(model, SRC, beam_size=3, max_length_offset=4)
  assert beam["ids"].shape[0] == 3 and beam["scores"].shape == (3,)
  # Manual greedy with decode_step (numpy argmax).
  layers = gnmt.layers_of(model)
  encoded = layers.encode(SRC)
  state = layers.initial_state(3)
  ids = np.full((3,), 2, np.int32)
  manual = []
  for _ in range(greedy["ids"].shape[1]):
    logits, state, _ = layers.decode_step(ids, state, encoded)
    ids = np.argmax(np.asarray(logits), -1).astype(np.int32)
    manual.append(ids)
  manual = np.stack(manual, 1)
  got = np.asarray(greedy["ids"])
  for b in range(3):
    n = int(np.sum(got[b] != 0))
    np.testing.assert_array_equal(got[b, :n], manual[b, :n])


_JAX_SCRIPT = """
import numpy as np
from moe_keras.models import blocks, gnmt
spec = blocks.moe_spec(kind="flat", num_experts=4, k=2, expert_hidden_dim=8,
                       gating="batchwise", capacity_factor=2.0)
m = gnmt.gnmt_model(24, model_dim=8, lstm_units=16, lstm_projection=8,
                    moe=spec, seed=1)
src = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
tin = np.array([[2, 4, 5], [2, 6, 0]], np.int32)
full = np.asarray(m({"source": src, "target_in": tin}, training=False))
layers = gnmt.layers_of(m)
enc, st = layers.encode(src), layers.initial_state(2)
for t in range(3):
  lg, st, _ = layers.decode_step(tin[:, t], st, enc)
  real = tin[:, t] != 0
  assert np.abs(np.asarray(lg)[real] - full[real, t]).max() < 1e-5
print("JAX_OK")
"""


def test_jax_backend_decode_step_equals_teacher_forcing():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  proc = subprocess.run(
      [sys.executable, "-c", _JAX_SCRIPT],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(
          os.environ,
          KERAS_BACKEND="jax",
          PYTHONPATH=os.path.abspath(repo),
      ),
  )
  assert "JAX_OK" in proc.stdout, proc.stderr[-2000:]
