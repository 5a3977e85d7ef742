"""Killing one of two JAX processes mid-run, on 127.0.0.1 (real processes).

Two processes train the deterministic tiny LM of test_jax_processes.py on
`batch:1,expert:2` (each holds half of the experts) with a checkpoint every
2 steps. Once a checkpoint exists, process 1 is killed (SIGKILL). Process 0
must end within KILL_BOUND_S with status 1 and a one-line error naming the
lost process as its last stderr line (no hang at JAX's shutdown barrier, no
abort with a stack trace), and leave the last checkpoint complete (state.json
names a file holding every weight whole, no temporary file left). The
processes are rerun and, after a later checkpoint, process 0 (the
coordinator) is killed: process 1 ends within KILL_BOUND_S, with the one
line or aborted by JAX (SIGABRT, a fatal log, when the lost coordination
service is noticed before the failed step), the last checkpoint is complete
again, and a rerun of both processes resumes from it and finishes.

Four runs of two processes (each starts TensorFlow and JAX and compiles)
take 4 to 7 minutes on a shared 2-core box: MOE_KERAS_SLOW_TESTS=1.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import scenarios
import test_jax_processes
import test_train_cli_mesh

SLOW = test_jax_processes.SLOW
_slow = test_jax_processes._slow  # pylint: disable=protected-access

# Process 0 must be gone this long after process 1 is killed. A step in
# flight fails at once (gloo sees the connection close); outside a
# collective JAX aborts after the heartbeat timeout (default 60 s).
KILL_BOUND_S = 120
FIRST_CHECKPOINT_TIMEOUT_S = 420
# Far more steps than run before the kill: the run is cut, never finished.
KILLED_RUN_STEPS = 100000
STEPS_AFTER_RESUME = 4


def _state(model_dir):
  """The parsed checkpoints/state.json of model_dir, or None."""
  try:
    with open(os.path.join(model_dir, "checkpoints", "state.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class _Running:
  """A started process whose pipes a thread drains (no full-pipe stall)."""

  def __init__(self, proc):
    self.proc = proc
    self.output = None  # (stdout, stderr) once it ended
    self._thread = threading.Thread(target=self._drain, daemon=True)
    self._thread.start()

  def _drain(self):
    self.output = self.proc.communicate()

  def wait(self, timeout):
    """Its (stdout, stderr), or None if it still runs after `timeout` s."""
    self._thread.join(timeout)
    return None if self._thread.is_alive() else self.output

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self._thread.join(30)


def _train_two(corpus, model_dir, steps, port):
  """Starts both processes of `moe_keras.train`; returns them (_Running)."""
  train = test_train_cli_mesh._train  # pylint: disable=protected-access
  return [
      _Running(
          train(
              corpus,
              model_dir,
              steps,
              "--mesh_shape=batch:1,expert:2",
              *test_jax_processes.CLI_BINDINGS,
              backend="jax",
              env=test_jax_processes._cluster_env(port, pid),  # pylint: disable=protected-access
              popen=True,
          )
      )
      for pid in range(2)
  ]


def _stop(runs):
  for run in runs:
    run.stop()


def _kill_after_checkpoint(corpus, model_dir, victim, after_step):
  """Trains 2 processes, kills `victim` after a checkpoint past after_step.

  Args:
    corpus: the directory of train.txt and valid.txt.
    model_dir: the run directory.
    victim: the process to SIGKILL (0 or 1).
    after_step: kill once a checkpoint of a later step exists (None: any).

  Returns:
    (checkpoint step seen before the kill, seconds until the survivor
    ended, its exit status, its stderr).
  """
  port = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  runs = _train_two(corpus, model_dir, KILLED_RUN_STEPS, port)
  survivor = runs[1 - victim]
  try:
    deadline = time.time() + FIRST_CHECKPOINT_TIMEOUT_S
    while (_state(model_dir) or {"step": -1})["step"] <= (after_step or 0):
      assert time.time() < deadline, "no checkpoint written in time"
      ended = [r.wait(0) for r in runs if r.proc.poll() is not None]
      assert not ended, [out[1][-3000:] for out in ended if out]
      time.sleep(0.2)
    seen = _state(model_dir)["step"]
    runs[victim].proc.send_signal(signal.SIGKILL)
    killed = time.time()
    output = survivor.wait(KILL_BOUND_S)
    took = time.time() - killed
    assert output is not None, (
        f"process {1 - victim} still runs {KILL_BOUND_S} s after process"
        f" {victim} was killed"
    )
  finally:
    _stop(runs)
  lines = output[1].strip().splitlines() or [""]
  print(
      f"process {1 - victim} ended {took:.1f} s after process {victim} was"
      f" killed (status {survivor.proc.returncode}); last stderr line:"
      f" {lines[-1][:300]}"
  )
  print("  stderr tail:\n" + "\n".join(l[:300] for l in lines[-12:]))
  return seen, took, survivor.proc.returncode, output[1]


def _check_one_line(stderr):
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(
      "moe_keras.train: error: another process of the JAX" " cluster is gone"
  ), stderr[-3000:]
  assert "rerun all processes" in last, last


def _check_checkpoint(model_dir, seen):
  """Checks model_dir's latest checkpoint is complete; returns its step."""
  state = _state(model_dir)
  step, values = test_jax_processes._checkpoint(model_dir)  # pylint: disable=protected-access
  assert step >= seen and step % 2 == 0, (seen, state)
  assert all(np.all(np.isfinite(v)) for v in values.values())
  # Every weight of the architecture, in full (all experts, not one
  # process's half), and Adam's iteration count plus 2 slots per weight.
  want = sorted(tuple(shape) for _, shape in state["architecture"])
  got = sorted(v.shape for n, v in values.items() if n.startswith("layers/"))
  assert got == want, (got, want)
  slots = [n for n in values if n.startswith("optimizer/")]
  assert len(slots) == 1 + 2 * len(want), slots
  return step


@_slow
def test_killed_process_ends_the_run_and_a_rerun_resumes(tmp_path):
  test_train_cli_mesh._write_corpus(tmp_path)  # pylint: disable=protected-access
  model_dir = tmp_path / "run"
  # Process 1 dies: process 0 stops with one line.
  seen, _, status, stderr = _kill_after_checkpoint(tmp_path, model_dir, 1, None)
  assert status == 1, stderr[-3000:]
  _check_one_line(stderr)
  step = _check_checkpoint(model_dir, seen)
  directory = model_dir / "checkpoints"
  assert not [n for n in os.listdir(directory) if n.startswith(".tmp")]

  # Process 0, the coordinator and writer, dies after a later checkpoint.
  # Process 1 ends in bounded time: its step fails (the one line, status
  # 1), or JAX aborts it first because the coordination service is gone
  # (SIGABRT, a fatal log). The run directory keeps the last complete
  # checkpoint (a file process 0 was writing stays under a temporary name).
  seen, _, status, stderr = _kill_after_checkpoint(tmp_path, model_dir, 0, step)
  assert status in (1, -signal.SIGABRT), stderr[-3000:]
  if status == 1:
    _check_one_line(stderr)
  step = _check_checkpoint(model_dir, seen)

  # Both processes again: they resume from that step and finish.
  final = step + STEPS_AFTER_RESUME
  port = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  runs = _train_two(tmp_path, model_dir, final, port)
  try:
    outputs = [r.wait(400) for r in runs]
  finally:
    _stop(runs)
  assert None not in outputs, "the rerun did not finish in 400 s"
  for run, (stdout, stderr) in zip(runs, outputs):
    assert run.proc.returncode == 0, stderr[-3000:]
    assert f"to step {final}" in stdout, stdout
  assert f"(step {step})" in outputs[0][1], outputs[0][1][-3000:]
  assert _state(model_dir)["step"] == final


GLOO_ERROR = (
    "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/"
    "pair.cc:547] Connection closed by peer [127.0.0.1]:20172\nmore context"
)


def test_lost_process_error_is_one_line(monkeypatch):
  jax = pytest.importorskip("jax")
  from moe_keras.distribution import jax_cluster  # pylint: disable=g-import-not-at-top

  # Not in a cluster: nothing is a lost process.
  assert jax_cluster.lost_process_error(ValueError(GLOO_ERROR)) is None
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  error = jax_cluster.lost_process_error(ValueError(GLOO_ERROR))
  assert isinstance(error, jax_cluster.ClusterError)
  assert "\n" not in str(error)
  assert str(error).startswith(
      "another process of the JAX cluster is gone (killed or crashed), so"
      " process 0 of 2 stops too"
  )
  assert str(error).endswith("Connection closed by peer [127.0.0.1]:20172")
  # Other errors keep their own handling.
  assert jax_cluster.lost_process_error(ValueError("bad shape")) is None


def test_heartbeat_timeout_from_env():
  from moe_keras.distribution import jax_cluster  # pylint: disable=g-import-not-at-top

  environ = {
      jax_cluster.ADDRESSES_ENV: "127.0.0.1:1234",
      jax_cluster.NUM_PROCESSES_ENV: "2",
      jax_cluster.PROCESS_ID_ENV: "0",
  }
  got = jax_cluster.cluster_from_env(environ)
  assert got["heartbeat_timeout_s"] == jax_cluster.DEFAULT_HEARTBEAT_TIMEOUT_S
  environ[jax_cluster.HEARTBEAT_TIMEOUT_ENV] = "15"
  assert jax_cluster.cluster_from_env(environ)["heartbeat_timeout_s"] == 15
  environ[jax_cluster.HEARTBEAT_TIMEOUT_ENV] = "0"
  with pytest.raises(ValueError, match="HEARTBEAT_TIMEOUT must be an int >= 1"):
    jax_cluster.cluster_from_env(environ)
