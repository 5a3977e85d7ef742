"""What keeps a training run safe: one writer, preemption, divergence.

* `RunLock`: one `moe_keras.train` per model_dir. An exclusive `flock` on
  DIR/.lock (which names the holder), held for the whole run and removed at
  its end; the kernel drops the lock when the process ends (SIGKILL
  included), so a lock file left by a killed run never blocks.
* `StopSignals`: SIGTERM / SIGINT during `fit` ask for a stop; the
  `GuardCallback` then checkpoints the current step and raises `Preempted`.
* `signals_during_startup`: SIGTERM / SIGINT before `fit` starts raise
  `Preempted` (step None), so a failed start removes what it made and
  says so in one line instead of dying with a half-made model_dir.
* `GuardCallback`: a NaN / Inf loss raises `Diverged` before anything of
  the step is saved; `check_finite` keeps NaN weights out of checkpoints.
* `ResumableTensorBoard`: Keras' TensorBoard callback whose `batch_*`
  scalars continue at the resumed step instead of restarting at 0 (and
  whose step-0 model summary is written by the first run only).
* `check_free_space`: a checkpoint that cannot fit is refused before a
  byte of it is written.
* `name_bad_binding`: names the gin binding behind a bad-value error.
"""

import contextlib
import errno
import fcntl
import math
import os
import re
import signal
import socket
import threading
import time

from absl import logging
import gin
import keras
import numpy as np

LOCK_FILE = ".lock"


class ModelDirBusy(ValueError):
  """Another live process is training the model_dir."""


class Diverged(ValueError):
  """The loss or the weights became NaN / Inf."""


class Preempted(Exception):
  """Training stopped on a signal after checkpointing the current step.

  Attributes:
    signum: the signal number.
    step: the step of the checkpoint written (None: stopped during
      start-up, before any step).
  """

  def __init__(self, signum, step, message):
    super().__init__(message)
    self.signum = signum
    self.step = step


# -- one writer per model_dir ---------------------------------------------


class RunLock:
  """An exclusive lock on a model_dir, held while this process trains it."""

  def __init__(self, model_dir):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._fd = None

  def acquire(self):
    """Takes the lock or raises ModelDirBusy naming the process holding it.

    Raises:
      ModelDirBusy: another live process holds the lock.
    """
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise ModelDirBusy(
            f"{os.path.dirname(self.path)} is being trained by another"
            f" process ({holder or 'unknown'}); wait for it to finish or"
            " stop it"
        ) from None
      # The holder may have removed the file between our open and flock.
      if os.path.exists(self.path) and (
          os.stat(self.path).st_ino == os.fstat(fd).st_ino
      ):
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(
        fd,
        f"pid {os.getpid()} on {socket.gethostname()} since"
        f" {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
        0,
    )
    self._fd = fd

  def release(self):
    """Deletes the lock file and drops the lock."""
    if self._fd is None:
      return
    if os.path.exists(self.path):
      os.remove(self.path)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


# -- preemption -------------------------------------------------------------


@contextlib.contextmanager
def signals_during_startup():
  """Within: SIGTERM / SIGINT raise `Preempted` (no checkpoint, step None).

  Only in the main thread (elsewhere signal handlers cannot be set); the
  previous handlers come back on exit. `StopSignals` replaces these while
  `fit` runs.

  Yields:
    None.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    name = signal.Signals(signum).name
    raise Preempted(
        signum,
        None,
        f"stopped by {name} outside the training loop (start-up or"
        " shut-down), no checkpoint written for it; rerun the same command"
        " to start or resume",
    )

  previous = {s: signal.signal(s, handle) for s in StopSignals.SIGNALS}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


class StopSignals:
  """Context manager: SIGTERM / SIGINT set `received` instead of killing.

  A second signal while the first is being handled raises
  KeyboardInterrupt (stop without a checkpoint).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning(
        "%s received: stopping after this step", signal.Signals(signum).name
    )

  def __enter__(self):
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    return False


# -- divergence ---------------------------------------------------------------


def check_finite(model, step):
  """Raises Diverged if a weight of `model` is NaN or Inf.

  Args:
    model: a built keras.Model.
    step: the step, for the message.

  Raises:
    Diverged: naming the first non-finite variable.
  """
  for variable in model.weights:
    value = keras.ops.convert_to_numpy(variable.value)
    if np.issubdtype(value.dtype, np.floating) and not np.all(
        np.isfinite(value)
    ):
      raise Diverged(
          f"training diverged at step {step}: weight {variable.path} is"
          " NaN/Inf"
      )


class GuardCallback(keras.callbacks.Callback):
  """Stops on a non-finite loss (Diverged) or a stop signal (Preempted).

  Runs after the StepCallback it guards in the callback list, so
  `step_callback.step` is the step just taken.
  """

  def __init__(self, step_callback, signals, describe_latest):
    """Creates the guard.

    Args:
      step_callback: the experiment's StepCallback (step counter; its
        `on_epoch_end` records the curve and writes the checkpoint).
      signals: a StopSignals.
      describe_latest: () -> a phrase naming the latest checkpoint.
    """
    super().__init__()
    self.step_callback = step_callback
    self.signals = signals
    self.describe_latest = describe_latest

  def on_train_batch_end(self, batch, logs=None):
    logs = logs or {}
    step = self.step_callback.step
    for key, value in logs.items():
      if key.endswith("loss") and not math.isfinite(float(value)):
        raise Diverged(
            f"training diverged at step {step}: {key} is {float(value)};"
            f" {self.describe_latest()}"
        )
    if self.signals.received is not None:
      # The checkpoint period ends here: curve record and checkpoint.
      self.step_callback.on_epoch_end(None, logs)
      name = signal.Signals(self.signals.received).name
      raise Preempted(
          self.signals.received,
          step,
          f"stopped by {name} at step {step}; {self.describe_latest()};"
          " rerun the same command to resume",
      )


# -- disk space -------------------------------------------------------------------

# Room kept free beyond a checkpoint's variables (HDF5 metadata, state.json).
CHECKPOINT_MARGIN_BYTES = 1 << 20


def check_free_space(directory, model):
  """Raises OSError(ENOSPC) unless `directory` has room for a checkpoint.

  A write that fails half-way inside HDF5 leaves the library in a state
  that can crash the process at exit; refusing before writing does not.

  Args:
    directory: where the checkpoint goes.
    model: the model (its weights and optimizer variables are saved).
  """
  variables = list(model.weights)
  if model.optimizer is not None:
    variables += list(model.optimizer.variables)
  needed = CHECKPOINT_MARGIN_BYTES + sum(
      int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables
  )
  stat = os.statvfs(directory)
  free = stat.f_bavail * stat.f_frsize
  if free < needed:
    raise OSError(
        errno.ENOSPC,
        f"No space left on device ({free / 2**20:.1f} MiB free, a checkpoint"
        f" needs {needed / 2**20:.1f} MiB)",
    )


def os_error_cause(error):
  """A one-line cause of an I/O error ('No space left on device', ...)."""
  if isinstance(error, OSError) and error.errno:
    plain = os.strerror(error.errno)
    if error.strerror and error.strerror.startswith(plain):
      return error.strerror
    return plain
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# -- TensorBoard ----------------------------------------------------------------


class ResumableTensorBoard(keras.callbacks.TensorBoard):
  """TensorBoard whose batch_* scalars continue at the resumed step."""

  def __init__(self, initial_step=0, **kwargs):
    super().__init__(**kwargs)
    self.initial_step = initial_step

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    self._global_train_batch = self.initial_step  # pylint: disable=attribute-defined-outside-init

  def _write_keras_model_summary(self):
    # The model's summary (tag 'keras', step 0) was written by the first run.
    if not self.initial_step:
      super()._write_keras_model_summary()


# -- naming the binding behind a bad value ----------------------------------------


def _gin_bindings():
  """(name, value) of every parsed binding, macros first."""
  config = getattr(gin.config, "_CONFIG", {})
  macros, others = [], []
  for (scope, selector), params in config.items():
    for name, value in params.items():
      if selector == "gin.macro":
        macros.append((scope, value))
      else:
        prefix = f"{scope}/" if scope else ""
        others.append((f"{prefix}{selector}.{name}", value))
  return macros + others


def name_bad_binding(error):
  """`error`'s first line, prefixed with the gin binding whose value it names.

  A binding is a candidate when its value appears in the message (a string
  as a word, a number as "=<value>"). Of the candidates, one whose name the
  message also spells (the part after the last "." or "/", in any case:
  STEPS_PER_CHECKPOINT as steps_per_checkpoint) is chosen, the earliest in
  the message; else the only candidate. Several candidates that share a
  value and none of whose names appears leave the message as it is, since
  naming one of them would be a guess.

  Args:
    error: an exception raised while gin-configured code ran.

  Returns:
    "bad value for <binding> = <value>: <message>", or the message.
  """
  text = str(error).strip()
  message = text.splitlines()[0] if text else type(error).__name__
  lowered = message.lower()
  candidates, named = [], []
  for name, value in _gin_bindings():
    if isinstance(value, str) and value.strip():
      pattern = rf"(?<![\w.]){re.escape(value)}(?![\w.])"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      pattern = rf"={re.escape(str(value))}(?![\w.])"  # "Received: x=-5"
    else:
      continue
    if not re.search(pattern, message):
      continue
    candidates.append((name, value))
    key = re.split(r"[./]", name)[-1].lower()
    spelled = re.search(
        rf"(?<![a-z0-9_]){re.escape(key)}(?![a-z0-9_])", lowered
    )
    if spelled:
      named.append((spelled.start(), len(named), name, value))
  if named:
    _, _, name, value = min(named)
  elif len(candidates) == 1:
    name, value = candidates[0]
  else:
    return message
  return f"bad value for {name} = {value!r}: {message}"
