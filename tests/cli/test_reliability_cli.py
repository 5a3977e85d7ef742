"""Failures a user can cause or suffer end in one line; no run is lost.

Real `moe_keras.train` subprocesses, real signals, real file systems (issue
14): failed starts, preemption, divergence, two writers, a full disk, logs
without a terminal, TensorBoard steps across a resume.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest

import cli_testlib as lib

from moe_keras import learning_curve

STEPS = "--gin_bindings=training.steps_per_checkpoint=5"
LONG = "--gin_bindings=training.train_steps=2000"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return lib.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained_10(corpus, tmp_path_factory):
  """A model_dir trained 10 steps (its latest checkpoint: step 10).

  Trained once for the tests that start from such a run (divergence, full
  disk), which each used to train the same one (same flags, same corpus,
  --deterministic) themselves. Each works on a copy of its own
  (`_copy_of`): they change the run.
  """
  model_dir = tmp_path_factory.mktemp("trained_10") / "run"
  lib.run(
      "moe_keras.train",
      *lib.train_args(
          corpus, model_dir, "--gin_bindings=training.train_steps=10"
      ),
  )
  return model_dir


def _copy_of(model_dir, destination):
  """Copies a finished run.

  Args:
    model_dir: the run's model_dir (no live writer).
    destination: a path that does not exist yet.

  Returns:
    destination, the copy.
  """
  shutil.copytree(model_dir, destination)
  return destination


def _latest_weights(model_dir):
  with open(os.path.join(model_dir, "checkpoints", "state.json")) as f:
    state = json.load(f)
  values = []
  with h5py.File(
      os.path.join(model_dir, "checkpoints", state["latest"]), "r"
  ) as f:
    f.visititems(
        lambda name, obj: values.append(obj[()])
        if isinstance(obj, h5py.Dataset)
        else None
    )
  return state, values


def _fail(args):
  proc = lib.run("moe_keras.train", *args, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  return lib.last_line(proc.stderr)


def test_empty_train_file_is_one_line_and_writes_nothing(corpus, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  model_dir = tmp_path / "run"
  last = _fail(
      lib.train_args(corpus, model_dir, f"--gin_bindings=TRAIN_FILES='{empty}'")
  )
  assert last == (
      "moe_keras.train: error: the training split is empty: no target tokens"
      " (check TRAIN_FILES)"
  )
  assert not model_dir.exists()


def test_a_model_dir_that_is_a_file_is_one_line_and_left_alone(
    corpus, tmp_path
):
  a_file = tmp_path / "run"
  a_file.write_text("notes\n")
  last = _fail(lib.train_args(corpus, a_file))
  assert last == (
      f"moe_keras.train: error: model_dir {a_file} exists and is not a"
      " directory"
  )
  assert a_file.read_text() == "notes\n"


def test_no_tensorflow_startup_noise(corpus, tmp_path):
  proc = lib.run(
      "moe_keras.train",
      *lib.train_args(corpus, tmp_path / "run", "--gin_file=nope.gin"),
      check=False,
  )
  assert lib.last_line(proc.stderr).startswith(
      "moe_keras.train: error: gin file not found: nope.gin"
  )
  for noise in (
      "InitializeLog",
      "cuInit",
      "cudart_stub",
      "cpu_feature_guard",
      "oneDNN",
  ):
    assert noise not in proc.stderr, proc.stderr[-2000:]


def test_bad_macro_value_names_the_binding(corpus, tmp_path):
  model_dir = tmp_path / "run"
  last = _fail(
      lib.train_args(corpus, model_dir, "--gin_bindings=MODEL_DIM='sixteen'")
  )
  assert last.startswith(
      "moe_keras.train: error: bad value for MODEL_DIM = 'sixteen': "
  )
  assert not model_dir.exists()


def test_squares_taps_with_summed_rows_is_one_line_naming_both(
    corpus, tmp_path
):
  # Both options bound: the optimizer's first update refuses, naming the
  # two (the message holds no word of another binding's value, so it is
  # not attributed to one), and no checkpoint is written.
  model_dir = tmp_path / "run"
  last = _fail(
      lib.train_args(
          corpus,
          model_dir,
          "--gin_bindings=lm_config.piece_squares=True",
          "--gin_bindings=make_optimizer.sum_sparse_rows=True",
      )
  )
  assert last == (
      "moe_keras.train: error: squares taps (piece_squares=True of"
      " lm_config or gnmt_model, per-piece second moments) contradict"
      " sum_sparse_rows=True and amsgrad; turn one of them off"
  )
  assert lib.checkpoint_step(model_dir) is None


def _event_steps(log_dir):
  """{events file: {tag: [steps]}} of every events file under log_dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  found = {}
  for path in sorted(
      glob.glob(os.path.join(log_dir, "**", "events.*"), recursive=True)
  ):
    tags = {}
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
    found[path] = tags
  return found


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_signal_checkpoints_the_current_step_and_resumes(
    signum, corpus, tmp_path
):
  model_dir = tmp_path / "preempted"
  every_step = "--gin_bindings=training.log_every_steps=1"
  out, err = tmp_path / "stdout", tmp_path / "stderr"
  with open(out, "w") as stdout, open(err, "w") as stderr:
    proc = lib.start_train(
        [  # --verbose=auto, and not a terminal: no progress bar
            a
            for a in lib.train_args(corpus, model_dir, STEPS, LONG, every_step)
            if a != "--verbose=0"
        ],
        stdout=stdout,
        stderr=stderr,
    )
    try:
      lib.wait_for_checkpoint(proc, model_dir, 5)
      proc.send_signal(signum)
      assert proc.wait(timeout=120) == 128 + signum
    finally:
      proc.kill()
      proc.wait()
  name = signal.Signals(signum).name
  last = lib.last_line(err.read_text())
  match = re.fullmatch(
      rf"moe_keras\.train: error: stopped by {name} at step (\d+); latest"
      rf" checkpoint (\S+) \(step (\d+)\); rerun the same command to resume",
      last,
  )
  assert match, last
  step = int(match.group(1))
  assert int(match.group(3)) == step == lib.checkpoint_step(model_dir)
  assert match.group(2).endswith(f"ckpt-{step}.weights.h5")
  assert 5 <= step < 2000
  # Logs without a terminal: a line per log_every_steps, no '\r' frames.
  log = out.read_text() + err.read_text()
  assert "\r" not in log and "\x1b[" not in log
  assert re.search(
      r"step 3: loss \S+, perplexity \S+(, \w+_loss \S+)*, \d+ words/s", log
  )
  if signum != signal.SIGTERM:
    return
  # Rerun: resumes at `step`; every TensorBoard tag continues after it, and
  # the learning curve's records (checkpoint period ends) fall on multiples
  # of steps_per_checkpoint (5) again, as in an uninterrupted run.
  first_run = _event_steps(model_dir / "logs")
  boundary = (step // 5 + 1) * 5
  proc = lib.run(
      "moe_keras.train",
      *lib.train_args(
          corpus,
          model_dir,
          STEPS,
          every_step,
          f"--gin_bindings=training.train_steps={boundary + 5}",
      ),
  )
  assert f"to step {boundary + 5}" in proc.stdout
  curve_steps = [r["step"] for r in learning_curve.read_curve(model_dir)]
  assert [s for s in curve_steps if s > step] == [boundary, boundary + 5]
  assert lib.checkpoint_step(model_dir) == boundary + 5
  # The rerun's event files, their steps merged per directory (the rest of
  # the stopped period and the later periods are two `fit` calls: two files).
  second_run = {}
  for path, tags in _event_steps(model_dir / "logs").items():
    if path not in first_run:
      merged = second_run.setdefault(os.path.dirname(path), {})
      for tag, steps in tags.items():
        merged.setdefault(tag, []).extend(steps)
  assert second_run
  batch_tags = 0
  for tags in second_run.values():
    for tag, steps in tags.items():
      if tag.startswith("batch_") or tag == "words_per_sec":
        batch_tags += 1
        assert min(steps) == step + 1, (tag, steps)
      if not tag.startswith("epoch_"):
        assert min(steps) > step, (tag, steps)
  assert batch_tags >= 2


def test_two_writers_refused_and_stale_lock_ignored(corpus, tmp_path):
  model_dir = tmp_path / "shared"
  first = lib.start_train(lib.train_args(corpus, model_dir, STEPS, LONG))
  try:
    lib.wait_for_checkpoint(first, model_dir, 5)
    last = _fail(lib.train_args(corpus, model_dir, STEPS, LONG))
    assert last.startswith(
        f"moe_keras.train: error: {model_dir} is being trained by another"
        f" process (pid {first.pid} on {socket.gethostname()} since "
    ), last
    assert last.endswith("); wait for it to finish or stop it")
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The killed run's lock file is left behind; it does not block.
  assert f"pid {first.pid} " in (model_dir / ".lock").read_text()
  step = lib.checkpoint_step(model_dir)
  lib.run(
      "moe_keras.train",
      *lib.train_args(
          corpus,
          model_dir,
          STEPS,
          f"--gin_bindings=training.train_steps={step + 2}",
      ),
  )
  assert lib.checkpoint_step(model_dir) == step + 2
  assert not (model_dir / ".lock").exists()


def test_divergence_keeps_the_last_good_checkpoint(
    corpus, trained_10, tmp_path
):
  model_dir = _copy_of(trained_10, tmp_path / "diverged")
  # A real cause: a learning rate that sends the weights to Inf.
  last = _fail(
      lib.train_args(
          corpus,
          model_dir,
          "--gin_bindings=training.train_steps=30",
          "--gin_bindings=PEAK_LEARNING_RATE=1e30",
      )
  )
  assert re.fullmatch(
      r"moe_keras\.train: error: training diverged at step (1\d|2\d): (\w*loss"
      r" is (nan|inf|-inf)|weight \S+ is NaN/Inf); latest checkpoint \S+"
      r"ckpt-10\.weights\.h5 \(step 10\)",
      last,
  ), last
  state, weights = _latest_weights(model_dir)
  assert state["step"] == 10 and state["latest"] == "ckpt-10.weights.h5"
  assert all(np.all(np.isfinite(w)) for w in weights if w.dtype.kind == "f")


def _mount_tmpfs(path, size_bytes):
  os.makedirs(path, exist_ok=True)
  return (
      subprocess.run(
          [
              "mount",
              "-t",
              "tmpfs",
              "-o",
              f"size={size_bytes}",
              "tmpfs",
              str(path),
          ],
          capture_output=True,
      ).returncode
      == 0
  )


@pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tiny tmpfs needs root"
)
def test_full_disk_keeps_the_previous_checkpoint(corpus, trained_10, tmp_path):
  model_dir = _copy_of(trained_10, tmp_path / "full")
  checkpoints = model_dir / "checkpoints"
  used = sum(p.stat().st_size for p in checkpoints.iterdir())
  # Room for what is there and half of one more checkpoint.
  mount = tmp_path / "tmpfs"
  if not _mount_tmpfs(mount, (used * 3 // 2 // 4096 + 2) * 4096):
    pytest.skip("cannot mount a tmpfs here")
  try:
    for path in checkpoints.iterdir():
      (mount / path.name).write_bytes(path.read_bytes())
      path.unlink()
    checkpoints.rmdir()
    checkpoints.symlink_to(mount)
    last = _fail(
        lib.train_args(
            corpus, model_dir, "--gin_bindings=training.train_steps=20"
        )
    )
    assert re.fullmatch(
        r"moe_keras\.train: error: cannot write the checkpoint of step 20 in"
        r" \S+: .+; latest checkpoint \S+ckpt-10\.weights\.h5 \(step 10\) is"
        r" intact",
        last,
    ), last
    state, weights = _latest_weights(model_dir)
    assert state["step"] == 10 and weights
    assert sorted(os.listdir(mount)) == [
        "ckpt-10.seeds.npz",
        "ckpt-10.weights.h5",
        "state.json",
    ]
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_signal_during_startup_is_one_line_and_writes_nothing(corpus, tmp_path):
  """SIGTERM after the model_dir is locked but before fit: nothing is left."""
  model_dir = tmp_path / "startup"
  err = tmp_path / "stderr"
  with open(err, "w") as stderr:
    proc = lib.start_train(
        lib.train_args(corpus, model_dir, STEPS), stderr=stderr
    )
    try:
      deadline = time.time() + 240
      while not (model_dir / ".lock").exists() and time.time() < deadline:
        assert proc.poll() is None, err.read_text()[-2000:]
        time.sleep(0.01)
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
      proc.kill()
      proc.wait()
  assert lib.last_line(err.read_text()) == (
      "moe_keras.train: error: stopped by SIGTERM outside the training loop"
      " (start-up or shut-down), no checkpoint written for it; rerun the same"
      " command to start or resume"
  )
  assert not model_dir.exists()
