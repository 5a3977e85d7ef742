"""LmTask warns a JAX run whose 'sentences' batches vary in shape, and one
whose Adam would square repeated rows' summed gradients (no squares taps)."""

import logging

import gin
import keras
import pytest

from data_pipelines import lm as lm_data
from data_pipelines import ptb
from moe_keras.tasks import base
from moe_keras.tasks import lm_task


@pytest.mark.parametrize(
    "backend, options, warns",
    [
        ("jax", lm_data.LmBatching(), True),
        ("jax", lm_data.LmBatching(length_multiple=16), True),
        ("jax", lm_data.LmBatching(fill_rows=True), True),
        ("jax", lm_data.LmBatching(length_multiple=16, fill_rows=True), False),
        ("jax", lm_data.LmBatching(mode="packed"), False),
        ("tensorflow", lm_data.LmBatching(), False),
    ],
)
def test_shape_warning(backend, options, warns):
  warning = lm_task.shape_warning(backend, options)
  assert (warning is not None) is warns
  if warns:
    assert "\n" not in warning
    for binding in lm_task.STATIC_SHAPE_BINDINGS:
      assert f"--gin_bindings={binding}" in warning


@pytest.mark.parametrize(
    "backend, piece_squares, warns",
    [("jax", False, True), ("jax", True, False), ("tensorflow", False, False)],
)
def test_piece_squares_warning(backend, piece_squares, warns):
  warning = base.piece_squares_warning(
      backend, piece_squares, lm_task.PIECE_SQUARES_BINDING
  )
  assert (warning is not None) is warns
  if warns:
    assert "\n" not in warning
    assert f"--gin_bindings={lm_task.PIECE_SQUARES_BINDING}" in warning


def test_train_dataset_logs_the_warnings_on_jax(monkeypatch, caplog):
  task = lm_task.LmTask(ptb.ptb_lm_data())
  monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  assert any(
      "JAX compiles a training step" in r.message for r in caplog.records
  )
  assert any(lm_task.PIECE_SQUARES_BINDING in r.message for r in caplog.records)
  caplog.clear()
  with gin.unlock_config():
    gin.bind_parameter("lm_config.piece_squares", True)
  try:
    with caplog.at_level(logging.WARNING):
      task.train_dataset()
  finally:
    gin.clear_config()
  assert any("JAX compiles" in r.message for r in caplog.records)
  assert not any(
      lm_task.PIECE_SQUARES_BINDING in r.message for r in caplog.records
  )
  caplog.clear()
  monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  assert not any("JAX compiles" in r.message for r in caplog.records)
  assert not any(
      lm_task.PIECE_SQUARES_BINDING in r.message for r in caplog.records
  )
