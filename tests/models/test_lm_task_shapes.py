"""LmTask warns a JAX run whose 'sentences' batches vary in shape."""

import logging

import keras
import pytest

from data_pipelines import lm as lm_data
from data_pipelines import ptb
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


def test_train_dataset_logs_the_warning_on_jax(monkeypatch, caplog):
  task = lm_task.LmTask(ptb.ptb_lm_data())
  monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  assert any(
      "JAX compiles a training step" in r.message for r in caplog.records
  )
  caplog.clear()
  monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
  with caplog.at_level(logging.WARNING):
    task.train_dataset()
  assert not any("JAX compiles" in r.message for r in caplog.records)
