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
"""

import keras


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

  def apply(self, grads, trainable_variables=None):
    """Keras's `apply`; with sum_sparse_rows, IndexedSlices summed first."""
    if self.sum_sparse_rows:
      variables = (
          self._trainable_variables
          if trainable_variables is None
          else trainable_variables
      )
      grads = [sum_duplicate_rows(g, v) for g, v in zip(grads, variables)]
    return super().apply(grads, trainable_variables)
