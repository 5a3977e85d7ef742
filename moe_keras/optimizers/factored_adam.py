"""Adam with a factored second moment for expert matrices (appendix D).

The paper trains its 100B-word language models (appendix D) with Adam whose
state for the expert parameters is cut down to fit up to a billion parameters
per GPU:

  * beta_1 = 0 for expert parameters: no first-moment slot at all (the
    update uses the current gradient).
  * For each expert weight matrix V (the EMA of the squared gradients, d_in x
    d_out) only a vector of row means r (d_in) and a vector of column means c
    (d_out) are kept; the second moment is estimated as
        V_hat = outer(r, c) / mean(r)
    ("the mean of either vector works": mean(r) = mean(c) = mean(V)).

Every other variable (gating weights, LSTMs, embeddings, expert biases and any
non-matrix expert variable) gets ordinary Adam with both moments. Bias
correction is Adam's, in the "epsilon hat" form of Kingma & Ba (section 2,
before 2.1) that `keras.optimizers.Adam` uses:

    alpha_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    theta  -= alpha_t * m / (sqrt(v) + epsilon)

with m = g and 1 - beta_1^t = 1 for the factored variables.

Row-sparse gradients (`tf.IndexedSlices` of embeddings and sampled softmax
rows) reach Keras's element-wise ops as they are (per-piece squares), unless
`sum_sparse_rows=True` sums them row by row first (`sparse_gradients`). A
variable with a squares tap (`moe_keras.layers.piece_squares`) gets the
per-piece squares in its second moment on every backend.

Optimizer state per expert matrix stack [n, d_in, d_out] is n * (d_in + d_out)
float32 numbers instead of Adam's 2 * n * d_in * d_out.
"""

import gin
import keras
from keras import ops

from moe_keras.optimizers import sparse_gradients

DEFAULT_FACTORED_PATTERNS = ("expert_kernel",)
# Floor on mean(r): an expert matrix whose squared-gradient EMA is all zero
# (an expert no token has reached yet) gets V_hat = 0 instead of 0 / 0.
MIN_MEAN = 1e-30


@keras.saving.register_keras_serializable(package="moe_keras")
class FactoredAdam(
    sparse_gradients.SumSparseRowsMixin, keras.optimizers.Optimizer
):
  """Adam; expert matrices get beta_1 = 0 and a factored 2nd moment (app. D).

  A trainable variable is factored when its `path` contains one of
  `factored_patterns` (default: the stacked expert kernels of
  `moe_keras.layers`, `.../expert_kernel_1` [n, d_in, h] and
  `.../expert_kernel_2` [n, h, d_out]) and it has rank >= 2. Its last two
  axes are the matrix; leading axes (the experts) index independent
  matrices. It then has two float32 slots, `row_velocity` [..., d_in] and
  `col_velocity` [..., d_out], and no momentum. All other variables have
  Adam's `momentum` and `velocity` slots (in the variable's dtype, as in
  `keras.optimizers.Adam`).

  Args:
    learning_rate: float, schedule or callable.
    beta_1: first-moment decay for the non-factored variables.
    beta_2: second-moment decay, all variables (the factored row and column
      means are EMAs with this decay).
    epsilon: "epsilon hat", added to sqrt(v) as in keras Adam.
    factored_patterns: substrings of `variable.path` selecting the factored
      variables.
    sum_sparse_rows: True: row-sparse gradients are summed per row first
      (Adam as written); False (default): Keras's per-piece squares.
    name: optimizer name.
    **kwargs: base optimizer arguments (weight_decay, clipnorm,
      global_clipnorm, use_ema, gradient_accumulation_steps, ...).

  Raises:
    ValueError: a sum_sparse_rows that is not a bool.
  """

  def __init__(
      self,
      learning_rate=0.001,
      beta_1=0.9,
      beta_2=0.999,
      epsilon=1e-7,
      factored_patterns=DEFAULT_FACTORED_PATTERNS,
      sum_sparse_rows=False,
      name="factored_adam",
      **kwargs,
  ):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self._init_sum_sparse_rows(sum_sparse_rows)
    if isinstance(factored_patterns, str):
      factored_patterns = (factored_patterns,)
    self.beta_1 = beta_1
    self.beta_2 = beta_2
    self.epsilon = epsilon
    self.factored_patterns = tuple(factored_patterns)

  def is_factored(self, variable):
    """True if `variable` gets the factored, momentum-free update."""
    path = getattr(variable, "path", None) or str(variable.name)
    return len(variable.shape) >= 2 and any(
        p in path for p in self.factored_patterns
    )

  def build(self, var_list):
    """Creates the slots; one entry per variable, None where unused.

    Args:
      var_list: the trainable variables.
    """
    if self.built:
      return
    super().build(var_list)
    self._momentums, self._velocities = [], []
    self._row_velocities, self._col_velocities = [], []
    for variable in var_list:
      momentum = velocity = row = col = None
      if self._overwrite_variable_with_gradient(variable):
        pass
      elif self.is_factored(variable):
        prefix = variable.path.replace("/", "_")
        shape = tuple(variable.shape)
        row = self.add_variable(
            shape=shape[:-1], dtype="float32", name=f"{prefix}_row_velocity"
        )
        col = self.add_variable(
            shape=shape[:-2] + shape[-1:],
            dtype="float32",
            name=f"{prefix}_col_velocity",
        )
        # Slots made without a reference variable: an optimizer that keeps
        # a slot -> variable index (moe_keras.distribution.optimizer, which
        # saves expert slots in the stacked layout) is told whose they are.
        register = getattr(self, "register_slot", None)
        if register is not None:
          register(row, variable, "row_velocity")
          register(col, variable, "col_velocity")
      else:
        momentum = self.add_variable_from_reference(variable, "momentum")
        velocity = self.add_variable_from_reference(variable, "velocity")
      self._momentums.append(momentum)
      self._velocities.append(velocity)
      self._row_velocities.append(row)
      self._col_velocities.append(col)

  def update_step(self, gradient, variable, learning_rate):
    """One update of `variable`; see the module docstring for the formulas."""
    index = self._get_variable_index(variable)
    if self._row_velocities[index] is not None:
      self._factored_update(
          gradient,
          variable,
          learning_rate,
          self._row_velocities[index],
          self._col_velocities[index],
      )
      return
    self.adam_update(
        gradient,
        variable,
        learning_rate,
        self._momentums[index],
        self._velocities[index],
    )

  def _factored_update(self, gradient, variable, learning_rate, row, col):
    """Appendix D update of one stack of expert matrices [..., d_in, d_out].

    r <- beta_2 r + (1 - beta_2) rowmean(g^2)          [..., d_in]
    c <- beta_2 c + (1 - beta_2) colmean(g^2)          [..., d_out]
    V_hat = outer(r, c) / mean(r)                      per matrix
    theta <- theta - lr sqrt(1 - beta_2^t) g / (sqrt(V_hat) + epsilon)

    Computed in float32 whatever the variable dtype (bfloat16 experts).
    """
    lr = ops.cast(learning_rate, "float32")
    g = ops.cast(gradient, "float32")
    step = ops.cast(self.iterations + 1, "float32")
    beta_2_power = ops.power(ops.cast(self.beta_2, "float32"), step)
    g2 = ops.cast(self.squared_gradient(g, variable), "float32")
    decay = 1 - self.beta_2
    self.assign_add(row, (ops.mean(g2, axis=-1) - row) * decay)
    self.assign_add(col, (ops.mean(g2, axis=-2) - col) * decay)
    mean_r = ops.maximum(ops.mean(row, axis=-1, keepdims=True), MIN_MEAN)
    # sqrt(outer(r, c) / mean(r)) = outer(sqrt(r / mean(r)), sqrt(c)).
    denom = (
        ops.expand_dims(ops.sqrt(row / mean_r), -1)
        * ops.expand_dims(ops.sqrt(col), -2)
        + self.epsilon
    )
    alpha = lr * ops.sqrt(1 - beta_2_power)
    # g * (alpha / denom): TF computes the quotient in the buffer of denom
    # and the product in place too, so one [..., d_in, d_out] temporary.
    self.assign_sub(variable, ops.cast(g * (alpha / denom), variable.dtype))

  def state_bytes(self):
    """Bytes of optimizer state (slots only; iterations etc. excluded).

    Returns:
      dict {"factored": bytes, "adam": bytes, "total": bytes}.
    """
    factored = adam = 0
    for slots, bucket in (
        (self._row_velocities + self._col_velocities, "f"),
        (self._momentums + self._velocities, "a"),
    ):
      for s in slots:
        if s is None:
          continue
        nbytes = _num_elements(s.shape) * _dtype_bytes(s.dtype)
        if bucket == "f":
          factored += nbytes
        else:
          adam += nbytes
    return {"factored": factored, "adam": adam, "total": factored + adam}

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "factored_patterns": list(self.factored_patterns),
            "sum_sparse_rows": self.sum_sparse_rows,
        }
    )
    return config


def _num_elements(shape):
  count = 1
  for dim in shape:
    count *= int(dim)
  return count


def _dtype_bytes(dtype):
  return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[
      keras.backend.standardize_dtype(dtype)
  ]


@gin.configurable
def factored_adam(
    learning_rate=0.001,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    factored_patterns=DEFAULT_FACTORED_PATTERNS,
    **kwargs,
):
  """gin factory of `FactoredAdam` (gin: `@factored_adam()`).

  Args:
    learning_rate: float or a `keras.optimizers.schedules` schedule.
    beta_1: first-moment decay of the non-expert variables.
    beta_2: second-moment decay.
    epsilon: "epsilon hat".
    factored_patterns: substrings of the variable paths to factor.
    **kwargs: base optimizer arguments (clipnorm, global_clipnorm, ...).

  Returns:
    FactoredAdam.
  """
  return FactoredAdam(
      learning_rate=learning_rate,
      beta_1=beta_1,
      beta_2=beta_2,
      epsilon=epsilon,
      factored_patterns=factored_patterns,
      **kwargs,
  )


def _make_optimizer_builder(
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    clipnorm,
    global_clipnorm,
    sum_sparse_rows=False,
):
  """`make_optimizer(name='factored_adam', ...)` builder."""
  return FactoredAdam(
      learning_rate=learning_rate,
      beta_1=beta_1,
      beta_2=beta_2,
      epsilon=epsilon,
      clipnorm=clipnorm,
      global_clipnorm=global_clipnorm,
      sum_sparse_rows=sum_sparse_rows,
  )


def _register_with_factory():
  """Registers 'factored_adam' with `moe_keras.optimizers.factory`."""
  try:
    from moe_keras.optimizers import factory  # pylint: disable=g-import-not-at-top
  except ImportError:  # the factory is not part of this checkout
    return
  factory.register_optimizer("factored_adam", _make_optimizer_builder)


_register_with_factory()
