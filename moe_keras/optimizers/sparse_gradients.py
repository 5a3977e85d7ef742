"""Row-sparse gradients summed row by row before an optimizer sees them.

On TensorFlow the gradient of a gather (`keras.layers.Embedding`, the rows
of an importance-sampled softmax) is a `tf.IndexedSlices`: one piece per
gathered row, so a word that occurs r times in a batch has r pieces under
the same index. Its gradient is the sum of those pieces. Keras 3's
optimizers apply element-wise ops to the pieces one by one
(`keras.src.backend.tensorflow.sparse.elementwise_unary`), so Adam's
`square(gradient)` becomes the sum of the r squared pieces instead of the
square of their sum, and `clipnorm` measures the pieces instead of the
gradient. JAX has no such type: its gradients are dense, the sum.

Measured on the PTB LMs (stop 49): from the same weights and batches,
TensorFlow's second moment of the embedding row with the largest gradient
(id 2) was 27x smaller than Adam's after one step, so its update was about
5x larger, and the backends' losses parted from the third step on (9.059
against 9.113 after 30 steps of the dense model, exact softmax, no
dropout).

`sum_duplicate_rows` turns such a gradient into the dense tensor it stands
for, as TF1's optimizers did (`_deduplicate_indexed_slices`) and as the
Adam of Kingma & Ba is written, so that TensorFlow and JAX train alike.
Optimizers with `SumSparseRowsMixin` do so when built with
`sum_sparse_rows=True` (gin: `make_optimizer.sum_sparse_rows = True`).

It is not the default: every TensorFlow result and learning rate of this
project was measured with Keras's per-piece squares, which move a row
gathered r times up to sqrt(r) times as far per step (when its pieces
agree), and at those rates Adam as written trains the PTB models worse
(README "Adam on repeated rows"). On JAX the option changes nothing.

The other direction, per-piece squares on every backend: a model built with
squares taps (`moe_keras.layers.piece_squares`, `lm_config.piece_squares`)
hands the optimizer, beside each tapped variable's gradient, the per-row sum
of its squared pieces as the tap's gradient. `SumSparseRowsMixin.apply`
takes the taps out of the update and `squared_gradient` gives the tapped
variable's second-moment input, on TensorFlow and JAX alike.
"""

import keras
from keras import ops

from moe_keras.layers import piece_squares


def sum_duplicate_rows(gradient, variable):
  """The dense gradient of `variable`, each row the sum of its pieces.

  Args:
    gradient: a `tf.IndexedSlices` (values [P, ...], indices int [P] in
      0..V-1, possibly repeated), or anything else (returned unchanged).
    variable: the variable the gradient belongs to, [V, ...].

  Returns:
    A dense tensor shaped like `variable` (row v is the sum of the pieces
    whose index is v, zero where none) for an IndexedSlices; else
    `gradient` itself.
  """
  if gradient is None or keras.backend.backend() != "tensorflow":
    return gradient
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not isinstance(gradient, tf.IndexedSlices):
    return gradient
  return tf.math.unsorted_segment_sum(
      gradient.values, gradient.indices, num_segments=variable.shape[0]
  )


class SumSparseRowsMixin:
  """Lets an optimizer's `apply` sum row-sparse gradients row by row first.

  Mix in before the Keras optimizer class; the optimizer's `__init__` calls
  `_init_sum_sparse_rows(sum_sparse_rows)`. With False (the default of this
  project's optimizers) IndexedSlices reach Keras's element-wise ops as they
  are, as with any Keras optimizer.
  """

  def _init_sum_sparse_rows(self, sum_sparse_rows):
    """Sets the option.

    Args:
      sum_sparse_rows: bool.

    Raises:
      ValueError: not a bool.
    """
    if not isinstance(sum_sparse_rows, bool):
      raise ValueError(
          f"sum_sparse_rows={sum_sparse_rows!r}; expected True or False"
      )
    self.sum_sparse_rows = sum_sparse_rows
    # Variable index -> this step's per-piece squares (squares taps).
    self._step_piece_squares = {}

  def apply(self, grads, trainable_variables=None):
    """Keras's `apply`, after two optional rewrites of the gradients.

    Squares taps (`piece_squares.squares_target`) leave the update: a tap is
    never changed, and its gradient becomes its target's `squared_gradient`
    for this step. With sum_sparse_rows, IndexedSlices are summed per row.

    Args:
      grads: one gradient per variable (None where absent).
      trainable_variables: the variables (None: the optimizer's own).

    Returns:
      Keras's `apply` result.

    Raises:
      ValueError: squares taps with sum_sparse_rows=True or amsgrad, which
        contradict them.
    """
    variables = (
        self._trainable_variables
        if trainable_variables is None
        else trainable_variables
    )
    grads, variables = list(grads), list(variables)
    tapped = [piece_squares.squares_target(v) for v in variables]
    if any(target is not None for target in tapped):
      if self.sum_sparse_rows or getattr(self, "amsgrad", False):
        raise ValueError(
            "squares taps (piece_squares=True of lm_config or gnmt_model,"
            " per-piece second moments) contradict sum_sparse_rows=True and"
            " amsgrad; turn one of them off"
        )
      if not self.built:
        # All variables, taps included, as Keras's JAX trainer builds it.
        self.build(variables)
      self._step_piece_squares = {
          self._get_variable_index(target): g
          for g, target in zip(grads, tapped)
          if target is not None and g is not None
      }
      kept = [i for i, target in enumerate(tapped) if target is None]
      grads = [grads[i] for i in kept]
      trainable_variables = [variables[i] for i in kept]
      try:
        return super().apply(grads, trainable_variables)
      finally:
        self._step_piece_squares = {}
    if self.sum_sparse_rows:
      grads = [sum_duplicate_rows(g, v) for g, v in zip(grads, variables)]
    return super().apply(grads, trainable_variables)

  def _overwrite_variable_with_gradient(self, variable):
    """Keras's test for variables that get no optimizer slots; also taps.

    Keras builds no slots (None in the slot lists, indices kept) for
    variables it overwrites with their gradients. A squares tap needs none
    either (`apply` takes it out of the update), so its two Adam moments,
    each as large as the tapped embedding or softmax, are not built.
    """
    if piece_squares.squares_target(variable) is not None:
      return True
    return super()._overwrite_variable_with_gradient(variable)

  def piece_squares_of(self, variable):
    """This step's per-piece squares of `variable` (a tapped one), or None."""
    if not self._step_piece_squares:
      return None
    return self._step_piece_squares.get(self._get_variable_index(variable))

  def squared_gradient(self, gradient, variable):
    """The second moment's input for `variable`: its per-piece squares when
    it has a squares tap, else the square of `gradient`.

    Args:
      gradient: the variable's gradient this step.
      variable: the variable (Keras's or the backend's).

    Returns:
      A tensor shaped like `variable`.
    """
    squares = self.piece_squares_of(variable)
    if squares is None:
      return ops.square(gradient)
    return ops.cast(squares, gradient.dtype)

  def adam_update(self, gradient, variable, learning_rate, momentum, velocity):
    """Keras's Adam update; a tapped variable's second moment gets its
    per-piece squares.

    alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m <- m + (g - m)(1 - beta_1),  v <- v + (q - v)(1 - beta_2)
    var <- var - alpha m / (sqrt(v) + epsilon)

    with q = `squared_gradient`: g^2, or for a tapped variable the per-row
    sum of the squared pieces, which Keras's Adam computes on TensorFlow
    without taps from a `tf.IndexedSlices` gradient (g^2 of one there is
    the squared pieces, too).

    Args:
      gradient: the gradient g (for a tapped variable dense, each row the
        sum of its pieces).
      variable: the variable.
      learning_rate: the step's learning rate.
      momentum: m, the variable's first-moment slot.
      velocity: v, its second-moment slot.
    """
    dtype = variable.dtype
    lr = ops.cast(learning_rate, dtype)
    gradient = ops.cast(gradient, dtype)
    step = ops.cast(self.iterations + 1, dtype)
    beta_1_power = ops.power(ops.cast(self.beta_1, dtype), step)
    beta_2_power = ops.power(ops.cast(self.beta_2, dtype), step)
    alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    squares = self.squared_gradient(gradient, variable)
    self.assign_add(
        momentum,
        ops.multiply(ops.subtract(gradient, momentum), 1 - self.beta_1),
    )
    self.assign_add(
        velocity, ops.multiply(ops.subtract(squares, velocity), 1 - self.beta_2)
    )
    self.assign_sub(
        variable,
        ops.divide(
            ops.multiply(momentum, alpha),
            ops.add(ops.sqrt(velocity), self.epsilon),
        ),
    )
