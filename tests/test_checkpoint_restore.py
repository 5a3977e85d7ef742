"""CheckpointManager.restore refuses an optimizer state that does not fit.

Keras's `load_weights` only warns when a checkpoint's optimizer variables do
not match the optimizer's, and leaves the optimizer fresh: a resumed run
would go on from zero Adam moments without a word.
"""

import os

import keras
import numpy as np
import pytest

from moe_keras import experiment


def _model(optimizer):
  keras.utils.set_random_seed(0)
  # Fixed names: the architecture check compares the weights' paths.
  model = keras.Sequential(
      [
          keras.Input((3,)),
          keras.layers.Dense(4, name="hidden"),
          keras.layers.Dense(2, name="out"),
      ],
      name="net",
  )
  model.compile(optimizer=optimizer, loss="mse")
  return model


def _step(model):
  rng = np.random.default_rng(0)
  model.train_on_batch(
      rng.normal(size=(5, 3)).astype("float32"),
      rng.normal(size=(5, 2)).astype("float32"),
  )


def test_restore_refuses_an_optimizer_state_that_does_not_fit(tmp_path):
  trained = _model(keras.optimizers.Adam(1e-2))
  _step(trained)
  manager = experiment.CheckpointManager(str(tmp_path))
  manager.save(trained, step=1)
  files = sorted(os.listdir(manager.directory))

  # The same optimizer: weights and Adam moments come back.
  same = _model(keras.optimizers.Adam(1e-2))
  assert manager.restore(same) == 1
  for a, b in zip(same.optimizer.variables, trained.optimizer.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  # SGD with momentum has one slot per weight, Adam two: refused in one
  # line that names the cause, and the checkpoint is left as it was.
  other = _model(keras.optimizers.SGD(1e-2, momentum=0.9))
  with pytest.raises(experiment.ExperimentError) as raised:
    manager.restore(other)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(
      f"cannot restore {os.path.join(manager.directory, 'ckpt-1.weights.h5')}:"
      " its optimizer state does not fit this run's optimizer (Skipping"
      " variable loading for optimizer"
  )
  assert message.endswith(
      "; resume with the run's optimizer settings and expert layout (a run"
      " trained with stacked experts, e.g. before expert_variables existed:"
      " --gin_bindings=\"moe_spec.expert_variables = 'stacked'\") or use a"
      " new --model_dir"
  )
  assert sorted(os.listdir(manager.directory)) == files

  # Evaluation does not need the optimizer: the weights load.
  evaluated = _model(keras.optimizers.SGD(1e-2, momentum=0.9))
  assert manager.restore(evaluated, require_optimizer_state=False) == 1
  for a, b in zip(evaluated.weights, trained.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
