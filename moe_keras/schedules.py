"""Learning-rate schedules of the paper (appendices C and E).

* Language models (appendix C): linear warmup over the first 1000 steps,
  then decay proportional to 1/sqrt(step): `WarmupRsqrt`.
* Translation (appendix E): linear warmup over 2000 steps, constant for 8000
  more, then proportional to 1/sqrt(step): `WarmupConstantRsqrt`.

The paper does not state the peak (base) learning rates; they are gin
parameters of every config. `step` is the optimizer's 0-based iteration
count, so the first update uses step 1 of the formulas.
"""

import gin
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="moe_keras")
class WarmupRsqrt(keras.optimizers.schedules.LearningRateSchedule):
  """lr(s) = peak * min(s / warmup, sqrt(warmup / s)), s = step + 1."""

  def __init__(self, peak_learning_rate, warmup_steps=1000):
    if warmup_steps < 1:
      raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
    self.peak_learning_rate = float(peak_learning_rate)
    self.warmup_steps = int(warmup_steps)

  def __call__(self, step):
    s = ops.cast(step, "float32") + 1.0
    warmup = float(self.warmup_steps)
    return self.peak_learning_rate * ops.minimum(
        s / warmup, ops.sqrt(warmup / s)
    )

  def get_config(self):
    return {
        "peak_learning_rate": self.peak_learning_rate,
        "warmup_steps": self.warmup_steps,
    }


@keras.saving.register_keras_serializable(package="moe_keras")
class WarmupConstantRsqrt(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup, constant, then 1/sqrt decay (appendix E).

  lr(s) = peak * min(s / warmup, 1) * min(1, sqrt((warmup + constant) / s)),
  s = step + 1.
  """

  def __init__(
      self, peak_learning_rate, warmup_steps=2000, constant_steps=8000
  ):
    if warmup_steps < 1 or constant_steps < 0:
      raise ValueError(
          f"need warmup_steps >= 1 and constant_steps >= 0, got"
          f" {warmup_steps!r}, {constant_steps!r}"
      )
    self.peak_learning_rate = float(peak_learning_rate)
    self.warmup_steps = int(warmup_steps)
    self.constant_steps = int(constant_steps)

  def __call__(self, step):
    s = ops.cast(step, "float32") + 1.0
    warmup = float(self.warmup_steps)
    decay_start = float(self.warmup_steps + self.constant_steps)
    return (
        self.peak_learning_rate
        * ops.minimum(s / warmup, 1.0)
        * ops.minimum(1.0, ops.sqrt(decay_start / s))
    )

  def get_config(self):
    return {
        "peak_learning_rate": self.peak_learning_rate,
        "warmup_steps": self.warmup_steps,
        "constant_steps": self.constant_steps,
    }


@gin.configurable
def warmup_rsqrt(peak_learning_rate=gin.REQUIRED, warmup_steps=1000):
  """Gin factory of `WarmupRsqrt` (language models, appendix C)."""
  return WarmupRsqrt(peak_learning_rate, warmup_steps=warmup_steps)


@gin.configurable
def warmup_constant_rsqrt(
    peak_learning_rate=gin.REQUIRED, warmup_steps=2000, constant_steps=8000
):
  """Gin factory of `WarmupConstantRsqrt` (translation, appendix E)."""
  return WarmupConstantRsqrt(
      peak_learning_rate,
      warmup_steps=warmup_steps,
      constant_steps=constant_steps,
  )
