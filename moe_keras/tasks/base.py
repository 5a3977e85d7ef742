"""The Task protocol: what `moe_keras.train` / `moe_keras.evaluate` drive.

A gin file selects the task with `get_task.task_cls = @LmTask` (or
`@MtTask`). The task receives the data object of `data_pipelines.get_data()`
and knows how to build, compile, feed and evaluate its model, so the CLIs stay
task-agnostic.
"""

import gin
import tensorflow as tf


class Task:
  """Base class of tasks.

  Attributes:
    data: what `data_pipelines.get_data()` returned (LmData or MtData).
  """

  name = "task"

  def __init__(self, data):
    self.data = data

  def build_model(self):
    """Returns the gin-configured keras.Model."""
    raise NotImplementedError

  def compile(self, model, optimizer):
    """Compiles `model` with the task's loss and metrics."""
    raise NotImplementedError

  @property
  def vocab_size(self):
    """Size of the data's vocabulary (the softmax)."""
    return self.data.vocab.size

  def to_keras(self, *batch):
    """Maps one batch of the data pipeline to the model's (x, y)."""
    raise NotImplementedError

  def train_dataset(self, input_context=None):
    """tf.data.Dataset of (x, y) batches for model.fit."""
    return self.data.train_dataset(input_context).map(
        self.to_keras, num_parallel_calls=tf.data.AUTOTUNE
    )

  def eval_dataset(self, input_context=None):
    """Same for the evaluation split, or None."""
    if self.data.eval_dataset is None:
      return None
    return self.data.eval_dataset(input_context).map(
        self.to_keras, num_parallel_calls=tf.data.AUTOTUNE
    )

  def evaluate(self, model, split, model_dir, **options):
    """Evaluates `model`; returns a JSON-serializable dict of results."""
    raise NotImplementedError


@gin.configurable
def get_task(data, task_cls=gin.REQUIRED):
  """Instantiates the gin-selected task on `data`."""
  return task_cls(data)
