"""`make_optimizer`: the gin entry point that builds an experiment's optimizer.

The paper trains every model with Adam (appendices C-E); the 100B-word models
use Adam with a factored second moment and beta1 = 0 on the experts
(appendix D, `name='factored_adam'` once that optimizer is registered).
Adam's beta2 and epsilon are not stated in the paper; Keras's defaults apply
unless a config binds them.
"""

import gin

from moe_keras.optimizers import fused_adam

OPTIMIZER_BUILDERS = {}


def register_optimizer(name, builder):
  """Makes `make_optimizer(name=...)` call `builder(**kwargs)`."""
  OPTIMIZER_BUILDERS[name] = builder


def _adam(
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    clipnorm,
    global_clipnorm,
    learning_rate_scales=None,
    sum_sparse_rows=False,
):
  # Keras's Adam, with one fused kernel per dense update on TensorFlow.
  return fused_adam.FusedAdam(
      learning_rate_scales=learning_rate_scales,
      sum_sparse_rows=sum_sparse_rows,
      learning_rate=learning_rate,
      beta_1=beta_1,
      beta_2=beta_2,
      epsilon=epsilon,
      clipnorm=clipnorm,
      global_clipnorm=global_clipnorm,
  )


register_optimizer("adam", _adam)


@gin.configurable
def make_optimizer(
    name="adam",
    learning_rate=1e-3,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    clipnorm=None,
    global_clipnorm=None,
    learning_rate_scales=None,
    sum_sparse_rows=False,
):
  """Builds the optimizer an experiment trains with.

  Args:
    name: a registered optimizer ('adam' always).
    learning_rate: a float or a schedule (gin: `@warmup_rsqrt()`).
    beta_1: first-moment decay.
    beta_2: second-moment decay.
    epsilon: Adam's epsilon.
    clipnorm: per-variable gradient norm clip (None: off).
    global_clipnorm: global gradient norm clip (None: off).
    learning_rate_scales: {regex on variable paths: factor on the learning
      rate} (an ablation knob, not the paper's; 'adam' only), e.g.
      {'expert_(kernel|bias)': 0.25}.
    sum_sparse_rows: True sums each row of a row-sparse (TensorFlow
      IndexedSlices) gradient before the update, as Adam is written and as
      JAX computes; False (default) keeps Keras's per-piece squares, with
      which every TensorFlow result here was measured (`sparse_gradients`).

  Returns:
    keras.optimizers.Optimizer.

  Raises:
    ValueError: unknown optimizer name, learning_rate_scales with an
      optimizer other than 'adam', or a sum_sparse_rows that is not a bool.
  """
  if name not in OPTIMIZER_BUILDERS:
    raise ValueError(
        f"unknown optimizer {name!r}; expected one of"
        f" {', '.join(sorted(OPTIMIZER_BUILDERS))}"
    )
  kwargs = {}
  if learning_rate_scales:
    if name != "adam":
      raise ValueError(
          f"make_optimizer.learning_rate_scales is supported with name='adam'"
          f" only, not {name!r}"
      )
    kwargs["learning_rate_scales"] = learning_rate_scales
  if sum_sparse_rows is not False:  # the optimizer checks the value
    kwargs["sum_sparse_rows"] = sum_sparse_rows
  return OPTIMIZER_BUILDERS[name](
      learning_rate=learning_rate,
      beta_1=beta_1,
      beta_2=beta_2,
      epsilon=epsilon,
      clipnorm=clipnorm,
      global_clipnorm=global_clipnorm,
      **kwargs,
  )
