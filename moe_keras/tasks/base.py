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


def piece_squares_warning(backend, piece_squares, binding):
  """A one-line warning for a model trained on JAX without squares taps.

  On TensorFlow, Keras's Adam sums the squared pieces of a gathered row that
  a batch repeats (the embedding, a sampled softmax's rows); on JAX it
  squares their sum (Adam as written), which trains the PTB LMs 13-14% worse
  at the configs' rates (README "Adam on repeated rows"). Squares taps
  (`moe_keras.layers.piece_squares`) give JAX the former.

  Args:
    backend: `keras.backend.backend()`.
    piece_squares: the model's bound `piece_squares` (taps on or off).
    binding: the gin binding that turns the model's taps on.

  Returns:
    str or None (TensorFlow, or taps on).
  """
  if backend != "jax" or piece_squares:
    return None
  return (
      "on JAX, Adam squares a repeated embedding or softmax row's summed"
      " gradient, while the configs' learning rates and this project's"
      " results come from TensorFlow's per-piece squares (README 'Adam on"
      f" repeated rows'); --gin_bindings={binding} trains as TensorFlow does"
  )


def bound_value(parameter, default=False):
  """gin's value of `parameter` ('configurable.name'), or `default` when the
  configuration does not bind it."""
  try:
    return gin.query_parameter(parameter)
  except ValueError:
    return default


@gin.configurable
def get_task(data, task_cls=gin.REQUIRED):
  """Instantiates the gin-selected task on `data`."""
  return task_cls(data)
