"""`import moe_keras` selects TF's BFC CPU allocator when it still can.

Real subprocesses: TensorFlow reads TF_CPU_ALLOCATOR_USE_BFC once per process,
when its context starts, so each case needs a fresh interpreter. Whether that
BFC allocator is in use is read from TensorFlow itself: its allocator
constructor logs (VLOG 1 of bfc_allocator.cc) the name of every BFC allocator
it creates, and the one TF_CPU_ALLOCATOR_USE_BFC selects is
"bfc_cpu_allocator_for_gpu" (TensorFlow's name for it). Memory statistics
cannot tell: where oneDNN is on, TensorFlow's default CPU allocator is a
pooling allocator of its own ("mklcpu") that keeps them too.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
VAR = "TF_CPU_ALLOCATOR_USE_BFC"
WARNING_TEXT = "moe_keras: TensorFlow started before `import moe_keras`"

BFC_LOG = "Creating new BFCAllocator named: bfc_cpu_allocator_for_gpu"
REPORT = """
import os
import tensorflow as tf
tf.ones([4]).numpy()
print("RESULT", os.environ.get("{var}"))
""".format(var=VAR)


def _run(code, env_value=None):
  """Runs `code` in a fresh interpreter.

  Args:
    code: Python source; it runs REPORT last.
    env_value: TF_CPU_ALLOCATOR_USE_BFC for the child (None: unset).

  Returns:
    ([the variable's value at the end, "True"/"False": the BFC allocator of
    TF_CPU_ALLOCATOR_USE_BFC was created], stderr).
  """
  env = {k: v for k, v in os.environ.items() if k != VAR}
  env["TF_CPP_MIN_LOG_LEVEL"] = "0"
  env["TF_CPP_VMODULE"] = "bfc_allocator=1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if env_value is not None:
    env[VAR] = env_value
  proc = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert len(lines) == 1, proc.stdout
  return lines[0].split()[1:] + [str(BFC_LOG in proc.stderr)], proc.stderr


def _warning_lines(stderr):
  return [line for line in stderr.splitlines() if WARNING_TEXT in line]


def test_import_before_tensorflow_selects_bfc():
  fields, stderr = _run("import moe_keras.layers\n" + REPORT)
  assert fields == ["true", "True"]
  assert not _warning_lines(stderr)


def test_import_after_tensorflow_import_but_before_first_op_selects_bfc():
  fields, stderr = _run(
      "import tensorflow, keras\nimport moe_keras.layers\n" + REPORT
  )
  assert fields == ["true", "True"]
  assert not _warning_lines(stderr)


@pytest.mark.parametrize("value,bfc", [("false", "False"), ("true", "True")])
def test_explicit_user_setting_is_kept(value, bfc):
  fields, stderr = _run("import moe_keras.layers\n" + REPORT, env_value=value)
  assert fields == [value, bfc]
  assert not _warning_lines(stderr)


def test_import_after_tensorflow_started_warns_once_in_one_line():
  code = (
      "import tensorflow as tf\n"
      "tf.ones([4]).numpy()\n"
      "import moe_keras\n"
      "import moe_keras.layers\n"
      "from moe_keras import tf_allocator\n"
      "assert tf_allocator.configure() == tf_allocator.TOO_LATE\n" + REPORT
  )
  fields, stderr = _run(code)
  assert fields == ["None", "False"]
  lines = _warning_lines(stderr)
  assert len(lines) == 1, stderr
  assert VAR in lines[0]
  # Nothing else of the warning on the following line.
  following = stderr.splitlines()[stderr.splitlines().index(lines[0]) + 1 :]
  assert not following or not following[0].startswith(" "), stderr


def test_no_warning_after_tensorflow_started_with_user_setting():
  code = (
      "import tensorflow as tf\n"
      "tf.ones([4]).numpy()\n"
      "import moe_keras.layers\n" + REPORT
  )
  fields, stderr = _run(code, env_value="false")
  assert fields == ["false", "False"]
  assert not _warning_lines(stderr)
