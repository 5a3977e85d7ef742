"""Flags and error handling shared by the moe_keras command-line tools."""

import os
import sys

# TF reads these when it starts: the BFC allocator reuses the experts'
# gradient buffers instead of page-faulting them every step (BUILD.md).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS


def define_gin_flags():
  flags.DEFINE_multi_string("gin_file", [], "Gin config file(s).")
  flags.DEFINE_multi_string(
      "gin_bindings", [], 'Gin bindings, e.g. "training.train_steps=100".'
  )
  flags.DEFINE_multi_string(
      "gin_search_paths",
      [],
      "Directories searched for gin files and their includes (the"
      " repository root always is).",
  )


def fail(program, error, status=1):
  """Prints `program: error: <one line>` to stderr and exits with `status`.

  Args:
    program: the CLI's name.
    error: an exception, or the message itself (a str).
    status: the exit status.

  With MOE_KERAS_DEBUG=1 in the environment an exception is re-raised
  (full traceback) instead.
  """
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  if os.environ.get("MOE_KERAS_DEBUG") and isinstance(error, BaseException):
    raise error
  sys.stderr.write(f"{program}: error: {experiment.one_line(error)}\n")
  sys.stderr.flush()
  sys.exit(status)


def fit_verbosity(flag_value):
  """model.fit's `verbose` for a --verbose flag value.

  Args:
    flag_value: 'auto', or an int as a string.

  Returns:
    The int; 'auto' is 1 (a progress bar) when stdout is a terminal and 0
    otherwise, so a redirected log holds no '\\r' progress frames.
  """
  if flag_value != "auto":
    return int(flag_value)
  return 1 if sys.stdout.isatty() else 0


def define_translation_flags():
  """Flags shared by moe_keras.decode and moe_keras.export."""
  flags.DEFINE_string("model_dir", None, "A run directory of moe_keras.train.")
  flags.DEFINE_integer(
      "beam_size", None, "Beams (1 = greedy; default: config)."
  )
  flags.DEFINE_float(
      "alpha", None, "Length-penalty exponent (default: config)."
  )
  flags.DEFINE_string(
      "target_lang", None, "Target language of a multilingual model ('fr')."
  )
  flags.DEFINE_multi_string(
      "gin_bindings", [], "Bindings applied on top of DIR/config.gin."
  )
