"""moe_keras.atomic_file: a file is the old one or the new one, never half."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_keras import atomic_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_text_and_json_replace_the_file(tmp_path):
  path = tmp_path / "state.json"
  atomic_file.write_text(str(path), "old\n")
  assert path.read_text() == "old\n"
  value = {"step": 5, "name": "ckpt-5", "ratio": 0.25}
  atomic_file.write_json(str(path), value, indent=1, sort_keys=True)
  text = path.read_text()
  assert text.endswith("}\n") and json.loads(text) == value
  assert os.listdir(tmp_path) == ["state.json"]


def test_the_temporary_file_is_a_sibling_with_the_same_suffix(tmp_path):
  seen = []

  def write(tmp):
    seen.append(tmp)
    with open(tmp, "w") as f:
      f.write("x")

  atomic_file.write_atomic(str(tmp_path / "ckpt-5.weights.h5"), write)
  assert os.path.dirname(seen[0]) == str(tmp_path)
  assert os.path.basename(seen[0]).startswith(f".tmp-{os.getpid()}-")
  assert seen[0].endswith("ckpt-5.weights.h5")
  assert os.listdir(tmp_path) == ["ckpt-5.weights.h5"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "curve.jsonl"
  path.write_text("old\n")

  def half_then_fail(tmp):
    with open(tmp, "w") as f:
      f.write("half of the new")
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    atomic_file.write_atomic(str(path), half_then_fail)
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["curve.jsonl"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
  """SIGKILL in the middle of a write: no cleanup runs, the file is intact."""
  path = tmp_path / "result.json"
  atomic_file.write_json(str(path), {"old": True})
  started = tmp_path / "started"
  script = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from moe_keras import atomic_file

def slow(tmp):
  with open(tmp, "w") as f:
    f.write('{{"new": ')
    f.flush()
    open({str(started)!r}, "w").close()
    time.sleep(60)

atomic_file.write_atomic({str(path)!r}, slow)
"""
  proc = subprocess.Popen([sys.executable, "-c", script])
  try:
    deadline = time.time() + 60
    while not started.exists():
      assert proc.poll() is None, "the writer exited early"
      assert time.time() < deadline, "the writer did not start"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  with open(path) as f:
    assert json.load(f) == {"old": True}
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
  assert len(leftovers) == 1 and leftovers[0].endswith("-result.json")
