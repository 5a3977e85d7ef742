"""TensorFlow's CPU allocator for MoE steps, arranged by `import moe_keras`.

TensorFlow's default CPU allocator takes every large buffer of a step (the
[n, d, h] expert-kernel gradients above all) fresh from the OS and
page-faults it again each step; its BFC allocator keeps and reuses them. A
MoE training step with many experts runs up to 2.5x faster with BFC
(BUILD.md, issue 15). TensorFlow reads `TF_CPU_ALLOCATOR_USE_BFC` once, when
its runtime context starts (the first op), not when it is imported, so
`import moe_keras` sets it whenever that has not happened yet, and otherwise
warns once, in one line. An explicit setting of the user is never changed.
"""

import logging
import os
import sys

ENV_VAR = "TF_CPU_ALLOCATOR_USE_BFC"
# configure() results.
SET = "set"
USER_SETTING = "user_setting"
TOO_LATE = "too_late"

_warned = False


def tf_context_initialized():
  """Whether TensorFlow's eager context (and so its allocator) has started.

  Returns:
    python bool; False when TensorFlow is not imported, without importing it.
  """
  context = sys.modules.get("tensorflow.python.eager.context")
  if context is None:
    return False
  ctx = context.context_safe()
  return ctx is not None and getattr(ctx, "_context_handle", None) is not None


def configure():
  """Selects TF's BFC CPU allocator if TF has not started and no one chose.

  Returns:
    SET (the variable is now "true"), USER_SETTING (it was already set; left
    as it is) or TOO_LATE (TensorFlow's context already started; one warning
    per process is logged).
  """
  global _warned
  if ENV_VAR in os.environ:
    return USER_SETTING
  if tf_context_initialized():
    if not _warned:
      _warned = True
      logging.getLogger("moe_keras").warning(
          "moe_keras: TensorFlow started before `import moe_keras`, so it"
          " keeps its default CPU allocator and large MoE steps may run up"
          " to 2.5x slower; import moe_keras first or set %s=true before"
          " TensorFlow starts.",
          ENV_VAR,
      )
    return TOO_LATE
  os.environ[ENV_VAR] = "true"
  return SET
