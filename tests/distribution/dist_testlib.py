"""Runs scenarios of `scenarios.py` in subprocesses with 8 devices."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NUM_DEVICES = 8
TIMEOUT_S = 240


def scenario_env(backend="tensorflow", extra=None):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO, HERE, os.path.join(REPO, "tests", "layers")]
      + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  env["KERAS_BACKEND"] = backend
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
  ).strip()
  env.pop("TF_CONFIG", None)
  env.update(extra or {})
  return env


def run_scenario(
    name,
    backend="tensorflow",
    args=(),
    timeout=TIMEOUT_S,
    script="scenarios.py",
):
  """Runs `script name args...` (default scenarios.py); fails the test with
  its output.

  Returns:
    the scenario's stdout.
  """
  cmd = [sys.executable, os.path.join(HERE, script), name, *args]
  proc = subprocess.run(
      cmd,
      env=scenario_env(backend),
      capture_output=True,
      text=True,
      timeout=timeout,
      cwd=REPO,
  )
  if proc.returncode != 0:
    raise AssertionError(
        f"scenario {name} failed (rc={proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
  return proc.stdout


# The frames `scenarios.scenario_several` prints around each scenario.
BEGIN = "=== begin scenario "
END = "=== end scenario "


class ScenarioOutputs:
  """The outputs of scenarios run in one process (`run_scenarios`)."""

  def __init__(self, names, stdout, stderr, problem=None):
    self.names = names
    self.stdout = stdout
    self.stderr = stderr
    self.problem = problem  # why the process ended early, or None

  def output(self, name):
    """The stdout of scenario `name`; fails the test if it failed.

    Args:
      name: one of the scenarios the process ran.

    Returns:
      the lines the scenario printed (between its frames).

    Raises:
      AssertionError: the scenario raised (its traceback), or the process
        ended before it finished (timeout, crash: the process's output).
    """
    assert name in self.names, (name, self.names)
    begin = f"{BEGIN}{name}\n"
    start = self.stdout.find(begin)
    end = self.stdout.find(f"{END}{name}: ", max(start, 0))
    if start < 0 or end < 0:
      raise AssertionError(
          f"scenario {name} did not finish ({self.problem}):\n"
          f"{self.stdout[-4000:]}\n{self.stderr[-6000:]}"
      )
    text = self.stdout[start + len(begin) : end]
    status = self.stdout[end:].split("\n", 1)[0]
    if not status.endswith(": ok"):
      raise AssertionError(
          f"scenario {name} failed:\n{text[-8000:]}\n{self.stderr[-3000:]}"
      )
    return text


def selected_scenarios(request, scenario_of):
  """The scenarios of the tests of the requesting module that will run.

  Args:
    request: a module-scoped fixture's request.
    scenario_of: {test function name: scenario name} of that module.

  Returns:
    scenario names in test order (`pytest -k ...` runs only those needed).
  """
  return list(
      dict.fromkeys(
          scenario_of[item.originalname]
          for item in request.session.items
          if item.module is request.module and item.originalname in scenario_of
      )
  )


def run_scenarios(names, backend="tensorflow", timeout_each=TIMEOUT_S):
  """Runs several scenarios in one process (`scenarios.py several ...`).

  They share one start-up; each still passes or fails on its own (a
  scenario that raises does not stop the next). Scenarios must have the
  same backend and device split.

  Args:
    names: scenario names, run in this order.
    backend: the Keras backend of all of them.
    timeout_each: seconds allowed per scenario (the process gets the sum).

  Returns:
    ScenarioOutputs.
  """
  names = list(names)
  cmd = [sys.executable, os.path.join(HERE, "scenarios.py"), "several", *names]
  try:
    proc = subprocess.run(
        cmd,
        env=scenario_env(backend),
        capture_output=True,
        text=True,
        timeout=timeout_each * len(names),
        cwd=REPO,
    )
  except subprocess.TimeoutExpired as e:
    return ScenarioOutputs(
        names,
        _text(e.stdout),
        _text(e.stderr),
        f"timed out after {e.timeout} s",
    )
  problem = None if proc.returncode == 0 else f"rc={proc.returncode}"
  return ScenarioOutputs(names, proc.stdout, proc.stderr, problem)


def _text(output):
  """A TimeoutExpired's partial output (None, bytes or str) as text."""
  if output is None:
    return ""
  if isinstance(output, bytes):
    return output.decode(errors="replace")
  return output
