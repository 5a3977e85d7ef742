"""Shared helper of the layer tests: a Python script in a fresh process.

Backend choice (`KERAS_BACKEND`) happens once per process, so the tests of
the JAX backend (and of process-wide TensorFlow settings) run their checks as
a script in a child process. Imported by the test modules as `layer_testlib`
(a unique name, so it cannot clash with another test directory's helper).
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run_script(code, *args, backend, timeout=300, **extra_env):
  """Runs `python -c code args` under `backend`; returns the CompletedProcess.

  The child runs in the repository root with the repository and this
  directory (`numpy_reference`) on its path, on CPU (JAX_PLATFORMS=cpu), and
  with TensorFlow's C++ logging quiet unless extra_env says otherwise.

  Args:
    code: the script's source.
    *args: its command-line arguments (strings).
    backend: "jax" or "tensorflow".
    timeout: seconds.
    **extra_env: further environment variables of the child.

  Returns:
    subprocess.CompletedProcess with text stdout and stderr.
  """
  env = dict(
      os.environ,
      KERAS_BACKEND=backend,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="2",
      PYTHONPATH=os.pathsep.join(
          [REPO, HERE, os.environ.get("PYTHONPATH", "")]
      ),
  )
  env.update(extra_env)
  return subprocess.run(
      [sys.executable, "-c", code] + list(args),
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
