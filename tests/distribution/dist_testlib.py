"""Runs a scenario of `scenarios.py` in a subprocess with 8 devices."""

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
    name, backend="tensorflow", args=(), timeout=TIMEOUT_S, script="scenarios.py"
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
