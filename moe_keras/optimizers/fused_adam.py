"""Adam whose dense updates run as one fused TensorFlow kernel.

Keras 3's Adam updates each variable with five element-wise passes (m, v,
the square, the division, the assignment), each a separate op that reads and
writes the whole variable. An MoE has most of its parameters in the experts
and every expert gets a gradient every step, so this dominated the optimizer
step (measured on PTB MoE-1024-h: 161 ms of a 511 ms step). `FusedAdam`
computes exactly Keras's Adam,

  alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
  m <- m + (g - m) (1 - beta_1),  v <- v + (g^2 - v) (1 - beta_2)
  var <- var - alpha m / (sqrt(v) + epsilon),

with TensorFlow's `ResourceApplyAdam` kernel (one multi-threaded pass) for
dense float gradients on the TensorFlow backend. AMSGrad and the other
backends take Keras's own path. The variables are Keras's Adam variables, so
checkpoints are interchangeable with `keras.optimizers.Adam`.

Row-sparse gradients (`tf.IndexedSlices`: embeddings, the sampled softmax's
rows) take Keras's path, which squares the pieces of a repeated row one by
one; with `sum_sparse_rows=True` they are first summed row by row into the
dense gradient they stand for (`sparse_gradients`), so that the second
moment squares each row's gradient, as in Kingma & Ba and on JAX, and the
update runs as the fused kernel. A variable with a squares tap
(`moe_keras.layers.piece_squares`) gets Keras's per-piece second moment on
every backend (`SumSparseRowsMixin.adam_update`).

`learning_rate_scales` (not in the paper; an ablation knob) multiplies the
learning rate of the variables whose path matches a regular expression, e.g.
`{"expert_(kernel|bias)": 0.25}` trains the experts at a quarter of the
schedule's rate and everything else at the full rate.
"""

import re

import keras

from moe_keras.optimizers import sparse_gradients


@keras.saving.register_keras_serializable(package="moe_keras")
class FusedAdam(sparse_gradients.SumSparseRowsMixin, keras.optimizers.Adam):
  """`keras.optimizers.Adam` with a fused dense update on TensorFlow.

  Args:
    learning_rate_scales: optional {regex: scale}; a variable whose path
      matches (`re.search`) a pattern gets the learning rate times its scale
      (the first matching pattern); the others get the learning rate.
    sum_sparse_rows: True: row-sparse gradients are summed per row first
      (Adam as written; JAX's gradients always are). False (default):
      Keras's TensorFlow behaviour, the squares of a repeated row's pieces
      summed (`sparse_gradients`).
    **kwargs: `keras.optimizers.Adam`'s arguments.

  Raises:
    ValueError: a pattern that does not compile, a scale <= 0, or a
      sum_sparse_rows that is not a bool.
  """

  def __init__(
      self, learning_rate_scales=None, sum_sparse_rows=False, **kwargs
  ):
    super().__init__(**kwargs)
    self._init_sum_sparse_rows(sum_sparse_rows)
    self.learning_rate_scales = dict(learning_rate_scales or {})
    self._scale_patterns = []
    for pattern, scale in self.learning_rate_scales.items():
      try:
        compiled = re.compile(pattern)
      except re.error as e:
        raise ValueError(
            f"learning_rate_scales: bad pattern {pattern!r}: {e}"
        ) from None
      if not float(scale) > 0:
        raise ValueError(
            f"learning_rate_scales: scale of {pattern!r} must be > 0, got"
            f" {scale!r}"
        )
      self._scale_patterns.append((compiled, float(scale)))

  def learning_rate_scale(self, path):
    """The factor on the learning rate of the variable at `path`."""
    for pattern, scale in self._scale_patterns:
      if pattern.search(path):
        return scale
    return 1.0

  def build(self, variables):
    super().build(variables)
    # Per variable index: update_step gets the backend's variable (on
    # TensorFlow a tf.Variable without the Keras path).
    self._variable_scales = [
        self.learning_rate_scale(v.path) for v in variables
    ]

  def update_step(self, gradient, variable, learning_rate):
    scale = (
        self._variable_scales[self._get_variable_index(variable)]
        if self._scale_patterns
        else 1.0
    )
    if scale != 1.0:
      learning_rate = learning_rate * scale
    if self.piece_squares_of(variable) is not None:
      index = self._get_variable_index(variable)
      return self.adam_update(
          gradient,
          variable,
          learning_rate,
          self._momentums[index],
          self._velocities[index],
      )
    if keras.backend.backend() != "tensorflow" or self.amsgrad:
      return super().update_step(gradient, variable, learning_rate)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable, learning_rate)
    dtype = variable.dtype
    local_step = tf.cast(self.iterations + 1, dtype)
    index = self._get_variable_index(variable)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle,
        m=self._momentums[index].handle,
        v=self._velocities[index].handle,
        beta1_power=tf.pow(tf.cast(self.beta_1, dtype), local_step),
        beta2_power=tf.pow(tf.cast(self.beta_2, dtype), local_step),
        lr=tf.cast(learning_rate, dtype),
        beta1=tf.cast(self.beta_1, dtype),
        beta2=tf.cast(self.beta_2, dtype),
        epsilon=tf.cast(self.epsilon, dtype),
        grad=tf.cast(gradient, dtype),
        use_locking=False,
    )

  def get_config(self):
    config = super().get_config()
    config["learning_rate_scales"] = dict(self.learning_rate_scales)
    config["sum_sparse_rows"] = self.sum_sparse_rows
    return config
