"""Experiments: gin parsing, the model_dir layout, checkpoints and training.

model_dir layout:

  DIR/config.gin                    the operative gin config of the run
  DIR/checkpoints/ckpt-<step>.weights.h5   model + optimizer variables
  DIR/checkpoints/ckpt-<step>.seeds.npz    random-generator states
  DIR/checkpoints/state.json        {"step", "latest", "checkpoints",
                                     "architecture": [[path, shape], ...]}
  DIR/logs/                         TensorBoard summaries
  DIR/curve.jsonl                   learning curve: step, tokens, training
                                    wall clock, train/validation logs per
                                    checkpoint period (`learning_curve`)
  DIR/eval_<split>.json             results of moe_keras.evaluate

Every file is written to a temporary name in its directory and renamed into
place, and `state.json` is replaced only after its checkpoint is complete, so
a run killed at any moment (SIGKILL included) leaves the previous checkpoint
usable and loses at most the steps since it. A model_dir whose checkpoint
was made by a different architecture is refused before anything in it is
written.
"""

import dataclasses
import json
import math
import os
import re
import time
from typing import List, Optional, Sequence
import warnings

from absl import logging
import gin
import keras
import numpy as np

import contextlib

import data_pipelines
from eval import expert_stats
from moe_keras import atomic_file
from moe_keras import distribution as distribution_lib
from moe_keras.distribution import optimizer as distributed_optimizer
from moe_keras import learning_curve
from moe_keras import reliability
from moe_keras.optimizers import factory as optimizer_factory
from moe_keras.tasks import base as task_base
from moe_keras.tasks import lm_task  # pylint: disable=unused-import
from moe_keras import schedules  # pylint: disable=unused-import

# The start of the warning Keras gives at the end of every validation pass
# over an eval set of unknown length (see `_train_locked`).
EVAL_END_WARNING = "Your input ran out of data"

CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
LOG_DIR = "logs"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.weights\.h5$")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExperimentError(ValueError):
  """A user error with a one-line message (bad flag, gin, model_dir...)."""


# How Keras's load_weights begins the warning for an optimizer state that
# does not fit (it then leaves the optimizer's variables as they are).
_KERAS_SKIPPED_OPTIMIZER = "Skipping variable loading for optimizer"
# Models rebuilt for inference (evaluate, decode, export) hold stacked
# experts whatever the run trained with: their checkpoints are the same
# under both layouts, and the small-batch decoding path gathers from the
# stacked [n, ...] kernels (per-expert variables would be stacked again
# every decoding step). Applied before the caller's bindings.
INFERENCE_BINDINGS = ("moe_spec.expert_variables = 'stacked'",)


def one_line(error):
  """The first line of an exception's message (gin appends context lines)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# -- gin ------------------------------------------------------------------


def _resolve_gin_file(path, search_paths):
  candidates = [path] + [os.path.join(p, path) for p in search_paths]
  for candidate in candidates:
    if os.path.isfile(os.path.expanduser(candidate)):
      return os.path.expanduser(candidate)
  raise ExperimentError(
      f"gin file not found: {path} (searched the current directory and"
      f" {', '.join(search_paths)})"
  )


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
):
  """Parses gin files and bindings; the repository root is a search path.

  Args:
    gin_files: config files (paths, or relative to a search path).
    gin_bindings: extra bindings, applied after the files.
    gin_search_paths: directories searched for files and `include`s.

  Raises:
    ExperimentError: a missing file or a malformed file or binding (one
      line naming the cause).
  """
  search_paths = list(
      dict.fromkeys(list(gin_search_paths) + [os.getcwd(), REPO_ROOT])
  )
  for path in search_paths:
    gin.add_config_file_search_path(path)
  files = [_resolve_gin_file(f, search_paths) for f in gin_files]
  try:
    gin.parse_config_files_and_bindings(
        files, list(gin_bindings), finalize_config=False
    )
  except (ValueError, SyntaxError, KeyError, ImportError, IOError) as e:
    raise ExperimentError(f"bad gin config: {one_line(e)}") from e


# -- training configuration -----------------------------------------------


@dataclasses.dataclass
class TrainingConfig:
  """How long to train and how often to checkpoint, evaluate and log."""

  train_steps: int
  steps_per_checkpoint: int
  steps_per_eval: Optional[int]
  eval_steps: Optional[int]
  keep_checkpoints: int
  seed: int
  log_every_steps: int


@gin.configurable
def training(
    train_steps=1000,
    steps_per_checkpoint=200,
    steps_per_eval=None,
    eval_steps=None,
    keep_checkpoints=3,
    seed=0,
    log_every_steps=50,
):
  """The training loop's settings (gin: `training.train_steps = ...`).

  Args:
    train_steps: total optimizer steps.
    steps_per_checkpoint: a checkpoint every this many steps (and at the
      end); also the length of a Keras "epoch" in the progress bar.
    steps_per_eval: validation on the eval split every this many steps (a
      multiple of steps_per_checkpoint), or None.
    eval_steps: batches per validation (None: the whole eval split).
    keep_checkpoints: how many recent checkpoints to keep.
    seed: global random seed (weights, dropout, noise, sampling).
    log_every_steps: words/s and TensorBoard scalars every this many steps.

  Returns:
    TrainingConfig.

  Raises:
    ValueError: non-positive values or an eval period that is not a
      multiple of the checkpoint period.
  """
  for name, value in (
      ("train_steps", train_steps),
      ("steps_per_checkpoint", steps_per_checkpoint),
      ("keep_checkpoints", keep_checkpoints),
      ("log_every_steps", log_every_steps),
  ):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"training.{name} must be an int >= 1, got {value!r}")
  if steps_per_eval is not None and steps_per_eval % steps_per_checkpoint:
    raise ValueError(
        f"training.steps_per_eval={steps_per_eval} must be a multiple of"
        f" steps_per_checkpoint={steps_per_checkpoint}"
    )
  return TrainingConfig(
      train_steps=train_steps,
      steps_per_checkpoint=steps_per_checkpoint,
      steps_per_eval=steps_per_eval,
      eval_steps=eval_steps,
      keep_checkpoints=keep_checkpoints,
      seed=seed,
      log_every_steps=log_every_steps,
  )


# -- checkpoints ----------------------------------------------------------


def architecture_signature(model):
  """[[variable path, shape], ...] of the model's weights.

  Expert blocks of a sharded MoE count as the unsharded [n, ...] weight,
  so a run resumes on any --mesh_shape.
  """
  return distribution_lib.logical_weight_signature(model)


def _seed_variables(model):
  """The states of the model's random generators (dropout, noise, sampler)."""
  found = []
  for layer in model._flatten_layers(include_self=True):  # pylint: disable=protected-access
    for generator in getattr(layer, "_seed_generators", ()):
      found.append(generator.state)
  return found


class CheckpointManager:
  """Saves and restores checkpoints in DIR/checkpoints (see module doc)."""

  def __init__(self, model_dir, keep=3):
    self.model_dir = model_dir
    self.directory = os.path.join(model_dir, CHECKPOINT_DIR)
    self.keep = keep

  @property
  def state_path(self):
    return os.path.join(self.directory, STATE_FILE)

  def state(self):
    """The parsed state.json, or None when there is no checkpoint."""
    if not os.path.exists(self.state_path):
      return None
    try:
      with open(self.state_path) as f:
        state = json.load(f)
      latest = os.path.join(self.directory, state["latest"])
    except (ValueError, KeyError, OSError) as e:
      raise ExperimentError(
          f"unreadable checkpoint state {self.state_path}: {one_line(e)}"
      ) from e
    if not os.path.exists(latest):
      raise ExperimentError(
          f"checkpoint state {self.state_path} names a missing file {latest}"
      )
    return state

  def check_architecture(self, model):
    """Raises ExperimentError if the checkpoint is of another architecture."""
    state = self.state()
    if state is None:
      return
    saved = [tuple((p, tuple(s))) for p, s in state["architecture"]]
    current = [(p, tuple(s)) for p, s in architecture_signature(model)]
    if saved != current:
      saved_d, current_d = dict(saved), dict(current)
      diff = next(
          (
              f"{p}: checkpoint {saved_d.get(p)} vs model {current_d.get(p)}"
              for p in list(saved_d) + list(current_d)
              if saved_d.get(p) != current_d.get(p)
          ),
          "variable order differs",
      )
      raise ExperimentError(
          f"{self.model_dir} holds a checkpoint of a different architecture"
          f" ({diff}); use a new --model_dir"
      )

  def restore(self, model, require_optimizer_state=True):
    """Restores the latest checkpoint into `model`; returns its step or 0.

    Args:
      model: the built model, compiled or not.
      require_optimizer_state: refuse a checkpoint whose optimizer state
        does not fit `model.optimizer` (Keras would skip loading it with a
        warning, and training would go on from fresh Adam moments). False
        where the optimizer does not matter (evaluation).

    Returns:
      The checkpoint's step, or 0 when there is none.

    Raises:
      ExperimentError: another architecture, an unreadable checkpoint, or
        (require_optimizer_state) an optimizer state that does not fit.
    """
    state = self.state()
    if state is None:
      return 0
    self.check_architecture(model)
    weights_path = os.path.join(self.directory, state["latest"])
    if model.optimizer is not None and not model.optimizer.built:
      model.optimizer.build(model.trainable_variables)
    try:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(weights_path)
    except (ValueError, OSError) as e:
      raise ExperimentError(
          f"cannot restore {weights_path}: {one_line(e)}"
      ) from e
    for warning in caught:
      message = one_line(warning.message)
      if not message.startswith(_KERAS_SKIPPED_OPTIMIZER):
        warnings.warn_explicit(
            warning.message,
            warning.category,
            warning.filename,
            warning.lineno,
        )
      elif require_optimizer_state:
        raise ExperimentError(
            f"cannot restore {weights_path}: its optimizer state does not"
            f" fit this run's optimizer ({message.rstrip('.')}); resume"
            " with the run's optimizer settings and expert layout (a run"
            " trained with stacked experts, e.g. before expert_variables"
            ' existed: --gin_bindings="moe_spec.expert_variables ='
            " 'stacked'\") or use a new --model_dir"
        )
    seeds_path = weights_path.replace(".weights.h5", ".seeds.npz")
    if os.path.exists(seeds_path):
      with np.load(seeds_path) as saved:
        variables = _seed_variables(model)
        if len(saved.files) == len(variables):
          for i, variable in enumerate(variables):
            variable.assign(saved[f"s{i}"])
    logging.info("restored %s (step %d)", weights_path, state["step"])
    return int(state["step"])

  def describe_latest(self):
    """'latest checkpoint <path> (step N)', or that there is none."""
    try:
      state = self.state()
    except ExperimentError as e:
      return one_line(e)
    if state is None:
      return "no checkpoint written yet"
    path = os.path.join(self.directory, state["latest"])
    return f"latest checkpoint {path} (step {state['step']})"

  def save(self, model, step):
    """Writes ckpt-<step> and then state.json; prunes old checkpoints.

    With several JAX processes every process must call this (the weights
    sharded across processes are gathered); process 0 writes.

    Returns:
      The checkpoint's path; None on a JAX process other than 0.

    Raises:
      reliability.Diverged: a weight is NaN/Inf (nothing is written).
      ExperimentError: a write failed (disk full, read-only directory);
        the previous checkpoint is left intact.
    """
    variables = list(model.weights)
    if model.optimizer is not None:
      variables += list(model.optimizer.variables)
    # Several JAX processes: every process gathers the weights sharded
    # across them (a collective), and process 0 alone writes.
    with distribution_lib.host_local_values(variables):
      reliability.check_finite(model, step)
      if not distribution_lib.is_primary():
        return None
      os.makedirs(self.directory, exist_ok=True)
      try:
        reliability.check_free_space(self.directory, model)
        with distribution_lib.without_distribution():
          return self._save(model, step)
      except (OSError, RuntimeError) as e:
        raise ExperimentError(
            f"cannot write the checkpoint of step {step} in {self.directory}:"
            f" {reliability.os_error_cause(e)}; {self.describe_latest()} is"
            " intact"
        ) from e

  def _save(self, model, step):
    name = f"ckpt-{step}.weights.h5"
    path = os.path.join(self.directory, name)
    atomic_file.write_atomic(path, model.save_weights)
    seeds = {
        f"s{i}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(_seed_variables(model))
    }
    seeds_path = path.replace(".weights.h5", ".seeds.npz")

    def write_seeds(tmp):
      with open(tmp, "wb") as f:
        np.savez(f, **seeds)

    atomic_file.write_atomic(seeds_path, write_seeds)
    previous = self.state()
    checkpoints = [
        c for c in (previous or {}).get("checkpoints", []) if c != name
    ]
    checkpoints.append(name)
    state = {
        "step": int(step),
        "latest": name,
        "checkpoints": checkpoints[-self.keep :],
        "architecture": architecture_signature(model),
        "time": time.time(),
    }
    atomic_file.write_json(self.state_path, state, indent=1)
    for old in checkpoints[: -self.keep]:
      for suffix in (".weights.h5", ".seeds.npz"):
        old_path = os.path.join(self.directory, old).replace(
            ".weights.h5", suffix
        )
        if os.path.exists(old_path):
          os.remove(old_path)
    logging.info("saved checkpoint %s", path)
    return path


# -- callbacks --------------------------------------------------------------


class StepCallback(keras.callbacks.Callback):
  """Checkpoints, stops at train_steps, logs words/s and expert histograms."""

  def __init__(
      self,
      checkpoints,
      config,
      initial_step,
      log_dir,
      probe_batch=None,
  ):
    super().__init__()
    self.checkpoints = checkpoints
    self.config = config
    self.step = initial_step
    self.last_saved = initial_step
    self.log_dir = log_dir
    self.probe_batch = probe_batch
    self._tokens_at_log = 0.0
    self._time_at_log = None
    self._writer = None
    self.words_per_sec = []
    # Only one process of a multi-process JAX run writes the curve.
    self.primary = distribution_lib.is_primary()
    # Learning-curve totals, continued from the record at the resumed step.
    resumed = {}
    if self.primary:
      resumed = learning_curve.truncate_curve(
          checkpoints.model_dir, initial_step
      )
    self.tokens_total = float(resumed.get("tokens") or 0.0)
    self.train_seconds = float(resumed.get("train_seconds") or 0.0)
    self._epoch_start = None
    self._epoch_train_end = None

  def _summary_writer(self):
    if self._writer is None and keras.backend.backend() == "tensorflow":
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      self._writer = tf.summary.create_file_writer(
          os.path.join(self.log_dir, "moe")
      )
    return self._writer

  def on_epoch_begin(self, epoch, logs=None):
    self._tokens_at_log = 0.0
    self._time_at_log = time.time()
    self._epoch_start = self._time_at_log
    self._epoch_train_end = None

  def on_test_begin(self, logs=None):
    # Validation inside fit: the period's training time ends here.
    if self._epoch_start is not None and self._epoch_train_end is None:
      self._epoch_train_end = time.time()

  def on_train_batch_end(self, batch, logs=None):
    self.step += 1
    logs = logs or {}
    if self.step % self.config.log_every_steps == 0 and "tokens" in logs:
      now = time.time()
      tokens = float(logs["tokens"])
      rate = (tokens - self._tokens_at_log) / max(now - self._time_at_log, 1e-9)
      self._tokens_at_log, self._time_at_log = tokens, now
      self.words_per_sec.append(rate)
      # `loss` is the task loss; the auxiliary losses and the minimized
      # total have their own names (moe_keras.models.task_model).
      aux = "".join(
          f", {name} {float(value):.4g}"
          for name, value in logs.items()
          if name != "loss" and name.endswith("_loss")
      )
      logging.info(
          "step %d: loss %.4f, perplexity %.2f%s, %.0f words/s",
          self.step,
          float(logs.get("loss", float("nan"))),
          float(logs.get("perplexity", float("nan"))),
          aux,
          rate,
      )
      writer = self._summary_writer()
      if writer is not None:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        with writer.as_default(step=self.step):
          tf.summary.scalar("words_per_sec", rate)
    if self.step >= self.config.train_steps:
      self.model.stop_training = True

  def _save_if_new(self):
    if self.step != self.last_saved:
      self.checkpoints.save(self.model, self.step)
      self.last_saved = self.step

  def on_epoch_end(self, epoch, logs=None):
    if self._epoch_start is not None:
      end = self._epoch_train_end or time.time()
      self.train_seconds += end - self._epoch_start
      self._epoch_start = None
    logs = dict(logs or {})
    self.tokens_total += float(logs.pop("tokens", 0.0))
    if self.step != self.last_saved and self.primary:
      record = {"step": self.step, "tokens": self.tokens_total}
      record["train_seconds"] = self.train_seconds
      for key, value in logs.items():
        if key != "step" and isinstance(value, (int, float, np.number)):
          record[key] = float(value)
      learning_curve.append_record(self.checkpoints.model_dir, record)
    self._save_if_new()
    self._write_expert_histograms()

  def on_train_end(self, logs=None):
    self._save_if_new()

  def _write_expert_histograms(self):
    writer = self._summary_writer()
    if writer is None or self.probe_batch is None:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    stats = expert_stats.collect_expert_stats(
        distribution_lib.Distribution.unwrap(self.model),
        [self.probe_batch],
        training=False,
    )
    with writer.as_default(step=self.step):
      for name, layer_stats in stats.items():
        for key in ("importance", "load"):
          tf.summary.histogram(f"{name}/{key}", np.asarray(layer_stats[key]))
        for key in (
            "cv_importance",
            "cv_load",
            "max_over_mean_load",
            "unused_experts",
        ):
          tf.summary.scalar(f"{name}/{key}", layer_stats[key])
    writer.flush()


# -- building and training --------------------------------------------------


def build_task_and_model(compile_model=True, distribution=None):
  """Builds data, task, model (and compiles it) from the parsed gin config.

  Args:
    compile_model: compile with the gin-configured optimizer.
    distribution: None, or a moe_keras.distribution.Distribution to build
      the model under (its model is the one to compile and fit).

  Returns:
    (task, model).
  """
  data = data_pipelines.get_data()
  task = task_base.get_task(data)

  def make_optimizer():
    # TensorFlow: optimizer state saved in the stacked expert layout, so a
    # checkpoint resumes on any mesh and under either `expert_variables`
    # (moe_keras.distribution.optimizer; unchanged on JAX).
    return distributed_optimizer.colocate_slots(
        optimizer_factory.make_optimizer()
    )

  if distribution is None:
    model = task.build_model()
    if compile_model:
      task.compile(model, make_optimizer())
    return task, model
  with distribution.scope():
    model = distribution.wrap_model(task.build_model())
    if compile_model:
      task.compile(model, make_optimizer())
  return task, model


def write_config(model_dir):
  """Writes the operative gin config to DIR/config.gin (atomically)."""
  path = os.path.join(model_dir, CONFIG_FILE)
  text = gin.operative_config_str()
  atomic_file.write_text(path, text)
  return path


def train(model_dir, verbose="auto", distribution=None):
  """Trains (or resumes) the gin-configured experiment in model_dir.

  gin must already be parsed (`parse_gin`).

  Args:
    model_dir: the run directory (created if missing).
    verbose: passed to `model.fit` ("auto": progress bar on a terminal).
    distribution: None (one device) or a Distribution from
      `moe_keras.distribution.make_distribution` (--mesh_shape). With
      several JAX processes all of them run this on the same model_dir
      (a shared file system); process 0 writes it, the others only read
      the checkpoint to resume.

  Returns:
    dict: step (final), resumed_from, history (Keras logs), words_per_sec.

  Raises:
    ExperimentError: a model_dir that is a file or of another architecture,
      unreadable checkpoints, empty training data, a failed checkpoint
      write.
    reliability.ModelDirBusy: another live process trains model_dir.
    reliability.Diverged: a NaN/Inf loss or weight (the latest checkpoint
      stays the last good one).
    reliability.Preempted: SIGTERM/SIGINT; the current step was saved.
  """
  config = training()
  keras.utils.set_random_seed(config.seed)
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ExperimentError(
        f"model_dir {model_dir} exists and is not a directory"
    )
  if not distribution_lib.is_primary():
    # A JAX process other than 0 reads model_dir (a shared file system)
    # and writes nothing; process 0 holds the lock.
    return _train_locked(model_dir, config, verbose, distribution)
  with reliability.signals_during_startup():
    created = not os.path.isdir(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    lock = reliability.RunLock(model_dir)
    try:
      lock.acquire()
    except BaseException:
      _remove_if_unstarted(model_dir, created, lock)
      raise
    try:
      return _train_locked(model_dir, config, verbose, distribution)
    except BaseException:
      _remove_if_unstarted(model_dir, created, lock)
      raise
    finally:
      lock.release()


def _remove_if_unstarted(model_dir, created, lock):
  """After a failed start: unlocks and removes the model_dir we created."""
  if os.path.isdir(model_dir) and set(os.listdir(model_dir)) <= {
      reliability.LOCK_FILE
  }:
    lock.release()
    if created:
      os.rmdir(model_dir)


def _train_locked(model_dir, config, verbose, distribution):
  """`train` once model_dir is locked."""
  task, model = build_task_and_model(distribution=distribution)
  checkpoints = CheckpointManager(model_dir, keep=config.keep_checkpoints)
  model.optimizer.build(model.trainable_variables)
  # Build the model's weights before comparing architectures.
  train_ds = task.train_dataset()
  first = next(iter(train_ds.take(1)), None)
  if first is None:
    raise ExperimentError(
        "the training split is empty: no target tokens (check TRAIN_FILES)"
    )
  probe_x = first[0]
  model(probe_x, training=False)
  checkpoints.check_architecture(model)
  step = checkpoints.restore(model)
  primary = distribution_lib.is_primary()
  if primary:
    write_config(model_dir)
  if step >= config.train_steps:
    logging.info(
        "%s is already trained to step %d (train_steps=%d)",
        model_dir,
        step,
        config.train_steps,
    )
    return {"step": step, "resumed_from": step, "history": {}}
  spc = config.steps_per_checkpoint
  eval_ds = None
  fit_kwargs = {}
  if config.steps_per_eval:
    eval_ds = task.eval_dataset()
    if eval_ds is not None:
      if config.eval_steps:
        eval_ds = eval_ds.take(config.eval_steps)
      if distribution is not None:
        eval_ds = distribution.distribute_dataset(eval_ds)
      fit_kwargs = {
          "validation_data": eval_ds,
          "validation_freq": config.steps_per_eval // spc,
      }
  log_dir = os.path.join(model_dir, LOG_DIR)
  step_callback = StepCallback(
      checkpoints, config, step, log_dir, probe_batch=probe_x
  )
  signals = reliability.StopSignals()
  callbacks = [
      step_callback,
      reliability.GuardCallback(
          step_callback, signals, checkpoints.describe_latest
      ),
  ]
  tensorboard = None
  if primary:  # one process of a multi-process JAX run writes the logs
    tensorboard = reliability.ResumableTensorBoard(
        initial_step=step,
        log_dir=log_dir,
        update_freq=config.log_every_steps,
    )
    callbacks.append(tensorboard)
  scope = (
      contextlib.nullcontext() if distribution is None else distribution.scope()
  )
  history = {}
  with scope, signals, warnings.catch_warnings():
    # Keras (3.15, EpochIterator.catch_stop_iteration) warns "Your input ran
    # out of data; interrupting training" whenever the validation pass
    # reaches the end of the eval set, a pipeline of unknown length: that is
    # the pass's normal end. The training data repeats, so the warning has
    # no other source here.
    warnings.filterwarnings(
        "ignore", message=EVAL_END_WARNING, category=UserWarning
    )
    for start, first_epoch, end_epoch, period in fit_segments(
        step, config.train_steps, spc
    ):
      if tensorboard is not None:
        tensorboard.initial_step = start
      # The data stream is a pure function of (seed, step): skipping the
      # steps already taken makes a resumed run see exactly the batches it
      # would have.
      dataset = train_ds.repeat().skip(start)
      if distribution is not None:
        dataset = distribution.distribute_dataset(dataset)
      segment = model.fit(
          dataset,
          epochs=end_epoch,
          initial_epoch=first_epoch,
          steps_per_epoch=period,
          callbacks=callbacks,
          verbose=verbose,
          shuffle=False,  # the pipeline shuffles (seeded)
          **fit_kwargs,
      )
      for key, values in segment.history.items():
        history.setdefault(key, []).extend(values)
  return {
      "step": step_callback.step,
      "resumed_from": step,
      "history": history,
      "words_per_sec": step_callback.words_per_sec,
  }


def fit_segments(step, train_steps, steps_per_checkpoint):
  """The `fit` calls that take a run from `step` to `train_steps`.

  Keras epochs are the checkpoint periods: epoch e ends at step (e + 1) *
  steps_per_checkpoint, where the checkpoint, the learning-curve record and
  (every steps_per_eval / steps_per_checkpoint epochs) the validation
  happen. A run stopped by a signal between two period ends resumes from
  its last step; the rest of that period is then a fit of its own (one
  shorter epoch), so that every later period, evaluation and curve point
  falls on the same steps as in an uninterrupted run.

  Args:
    step: the step the run resumes from (0 for a new run).
    train_steps: the last step.
    steps_per_checkpoint: steps per period (Keras epoch).

  Returns:
    list of (first step, initial_epoch, epochs, steps_per_epoch) for
    `model.fit`; StepCallback stops the last one at train_steps.
  """
  spc = steps_per_checkpoint
  segments = []
  if step % spc and step < train_steps:
    segments.append((step, step // spc, step // spc + 1, spc - step % spc))
    step += spc - step % spc
  if step < train_steps:
    segments.append((step, step // spc, math.ceil(train_steps / spc), spc))
  return segments


def load_experiment(
    model_dir,
    gin_bindings: Sequence[str] = (),
    compile_model=True,
    distribution=None,
):
  """Rebuilds a trained experiment from DIR/config.gin and its checkpoint.

  Args:
    model_dir: a directory written by `moe_keras.train`.
    gin_bindings: bindings applied on top of the saved config (e.g. another
      EVAL_FILES).
    compile_model: compile (and build the optimizer) so the checkpoint's
      optimizer state loads too.
    distribution: None (one device), a moe_keras.distribution.Distribution,
      or a function of no arguments returning one, called once the config
      is parsed (so a gin-bound mesh shape of the run applies). The
      checkpoint loads into any mesh layout.

  The model's experts are stacked (INFERENCE_BINDINGS) whatever the run
  trained with; the checkpoint, weights and optimizer state, loads into
  either layout.

  Returns:
    (task, model, step); on a mesh, `model` is the wrapped model
    (`Distribution.unwrap` gives the inner one).

  Raises:
    ExperimentError: no config, no checkpoint, or a mismatching one.
  """
  config_path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ExperimentError(
        f"{model_dir} is not a trained model_dir: {config_path} is missing"
    )
  checkpoints = CheckpointManager(model_dir)
  if checkpoints.state() is None:
    raise ExperimentError(f"{model_dir} has no checkpoint yet")
  gin.clear_config()
  parse_gin([config_path], list(INFERENCE_BINDINGS) + list(gin_bindings))
  if callable(distribution):
    distribution = distribution()
  task, model = build_task_and_model(
      compile_model=compile_model, distribution=distribution
  )
  # Build the weights on one batch: the eval split's, or the training
  # data's when the eval split is empty (evaluate then reports that).
  for dataset in (task.eval_dataset(), task.train_dataset()):
    batch = None if dataset is None else next(iter(dataset.take(1)), None)
    if batch is not None:
      model(batch[0], training=False)
      break
  step = checkpoints.restore(model, require_optimizer_state=False)
  return task, model, step


def latest_step(model_dir) -> Optional[int]:
  """The step of the latest checkpoint in model_dir, or None."""
  state = CheckpointManager(model_dir).state()
  return None if state is None else int(state["step"])


def list_checkpoints(model_dir) -> List[str]:
  """File names of the checkpoints present in DIR/checkpoints."""
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(
      (f for f in os.listdir(directory) if CHECKPOINT_PATTERN.match(f)),
      key=lambda f: int(CHECKPOINT_PATTERN.match(f).group(1)),
  )


def load_translator(model_dir, beam_size, alpha, target_lang, gin_bindings=()):
  """(task, step, Translator) of a trained MT model_dir.

  Args:
    model_dir: a directory written by `moe_keras.train` for an MtTask.
    beam_size: None (the task's) or an int >= 1.
    alpha: None (the task's) or the length-penalty alpha.
    target_lang: None or a language of a multilingual model ("fr").
    gin_bindings: bindings applied on top of the saved config.

  Returns:
    (task, step, `moe_keras.tasks.mt_task.Translator`).

  Raises:
    ExperimentError: no config or checkpoint.
    mt_task.TranslationError: not a translation experiment, a bad beam size
      or target language.
  """
  from moe_keras.tasks import mt_task  # pylint: disable=g-import-not-at-top

  task, model, step = load_experiment(model_dir, gin_bindings)
  if not isinstance(task, mt_task.MtTask):
    raise mt_task.TranslationError(
        f"{model_dir} is a {type(task).__name__} experiment, not translation"
    )
  if beam_size is not None and beam_size < 1:
    raise mt_task.TranslationError(f"--beam_size must be >= 1, got {beam_size}")
  mt_task.check_target_language(task, target_lang)
  translator = task.translator(
      model, beam_size=beam_size, alpha=alpha, target_language=target_lang
  )
  return task, step, translator
