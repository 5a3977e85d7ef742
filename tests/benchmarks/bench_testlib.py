"""Shared by the benchmark tests: run a benchmarks/ script in a fresh process."""

import os
import subprocess
import sys

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def run_benchmark(script, *flags, timeout=300, env=None):
  """Runs benchmarks/`script` with `flags` under this interpreter.

  Args:
    script: file name under benchmarks/, e.g. "moe_layer.py".
    *flags: its command-line flags.
    timeout: seconds before the run is killed (subprocess.TimeoutExpired).
    env: the process's environment (None: this one's).

  Returns:
    subprocess.CompletedProcess with text stdout and stderr; the return code
    is not checked.
  """
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", script)] + list(flags),
      capture_output=True,
      text=True,
      check=False,
      timeout=timeout,
      env=env,
  )
