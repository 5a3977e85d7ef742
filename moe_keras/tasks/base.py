"""The Task protocol: what `moe_keras.train` / `moe_keras.evaluate` drive.

A gin file selects the task with `get_task.task_cls = @LmTask` (or
`@MtTask`). The task receives the data object of `data_pipelines.get_data()`
and knows how to build, compile, feed and evaluate its model, so the CLIs stay
task-agnostic.
"""

import gin


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

  def train_dataset(self, input_context=None):
    """tf.data.Dataset of (x, y, sample_weight) or (x, y) for model.fit."""
    raise NotImplementedError

  def eval_dataset(self, input_context=None):
    """Same for the evaluation split, or None."""
    raise NotImplementedError

  def evaluate(self, model, split, model_dir, **options):
    """Evaluates `model`; returns a JSON-serializable dict of results."""
    raise NotImplementedError


@gin.configurable
def get_task(data, task_cls=gin.REQUIRED):
  """Instantiates the gin-selected task on `data`."""
  return task_cls(data)
