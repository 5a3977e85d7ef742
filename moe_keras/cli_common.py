"""Flags and error handling shared by the moe_keras command-line tools."""

import os
import sys

# TF reads this when it starts. (Its BFC CPU allocator is already chosen by
# the package's __init__, moe_keras.tf_allocator, which runs first.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # pylint: disable=g-import-not-at-top
import re  # pylint: disable=g-import-not-at-top
import tempfile  # pylint: disable=g-import-not-at-top

from absl import flags  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS

# Lines TensorFlow's C++ libraries print while they load (no CUDA driver,
# CPU features, oneDNN) whatever TF_CPP_MIN_LOG_LEVEL says.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWE]\d{4} [\d:. ]+\d+ (cudart_stub|cuda_platform|cuda_dnn|cuda_fft"
    r"|cuda_blas|cuda_executor|cpu_feature_guard|port)\.cc:\d+\]"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|.*oneDNN custom operations are on)"
)


@contextlib.contextmanager
def quiet_startup():
  """Drops TensorFlow's start-up noise from stderr inside the block.

  Everything the block writes to file descriptor 2 (C++ and Python) is
  held back and replayed afterwards, less the lines of `_STARTUP_NOISE`.
  absl's --verbosity=1 (or higher) keeps them all.

  Yields:
    None.
  """
  if FLAGS.is_parsed() and FLAGS.verbosity >= 1:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode("utf-8", errors="replace")
      sys.stderr.write(
          "".join(
              line
              for line in text.splitlines(keepends=True)
              if not _STARTUP_NOISE.match(line)
          )
      )
      sys.stderr.flush()


def import_tensorflow_quietly():
  """Imports moe_keras.experiment (TF, Keras) and finds devices, quietly."""
  with quiet_startup():
    from moe_keras import experiment  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.list_physical_devices()
  return experiment


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


def define_tf_servers_flag():
  """--tf_servers: drive TF servers on several hosts (`tf_cluster`)."""
  flags.DEFINE_string(
      "tf_servers",
      None,
      "TensorFlow across hosts: host:port,host:port of running"
      " `python -m moe_keras.tf_server` processes (task I = the I-th); this"
      " process is their client and --mesh_shape spans their devices.",
  )


def watch_tf_servers(program):
  """With --tf_servers: a lost server ends this process with one line.

  A step whose server is gone waits forever (`tf_cluster`), so a thread
  watches the servers and, once one is gone, prints `program: error: ...`
  and leaves with status 1 at once (no exit handlers, which would wait for
  the remote servers too).

  Args:
    program: the CLI's name.
  """
  if not FLAGS.tf_servers:
    return
  from moe_keras.distribution import tf_cluster  # pylint: disable=g-import-not-at-top

  try:
    servers = tf_cluster.parse_servers(FLAGS.tf_servers)
  except ValueError:
    return  # make_distribution reports it
  tf_cluster.watch_servers(
      servers, lambda message: fail(program, message, skip_shutdown=True)
  )


def fail(program, error, status=1, skip_shutdown=False):
  """Prints `program: error: <one line>` to stderr and exits with `status`.

  Args:
    program: the CLI's name.
    error: an exception, or the message itself (a str).
    status: the exit status.
    skip_shutdown: end the process at once (`os._exit`: no atexit hooks),
      e.g. when another JAX process is gone and JAX's shutdown would wait
      for it, or after a stop signal once everything is saved.

  With MOE_KERAS_DEBUG=1 in the environment an exception is re-raised
  (full traceback) instead.
  """
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  if os.environ.get("MOE_KERAS_DEBUG") and isinstance(error, BaseException):
    raise error
  sys.stderr.write(f"{program}: error: {experiment.one_line(error)}\n")
  sys.stderr.flush()
  if skip_shutdown:
    from moe_keras.distribution import jax_cluster  # pylint: disable=g-import-not-at-top

    jax_cluster.exit_without_shutdown(status)
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
