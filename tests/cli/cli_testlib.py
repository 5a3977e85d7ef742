"""Shared helpers of the CLI tests: a tiny corpus, subprocess runs.

Imported by the test modules as `cli_testlib` (a unique name, so it cannot
clash with another test directory's helper module).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "red"]


def write_corpus(root):
  """Writes root/train.txt (300 lines) and root/valid.txt (40 lines)."""
  rng = np.random.default_rng(0)
  for split, lines in (("train", 300), ("valid", 40)):
    with open(root / f"{split}.txt", "w") as f:
      for _ in range(lines):
        f.write(" ".join(rng.choice(WORDS, rng.integers(3, 10))) + "\n")
  return root


def cli_env(**extra):
  """The environment a CLI subprocess runs in (repo on the path)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  env.pop("MOE_KERAS_DEBUG", None)
  env.update(extra)
  return env


def run(module, *args, check=True, timeout=300):
  """Runs `python -m module args` to completion; returns CompletedProcess."""
  proc = subprocess.run(
      [sys.executable, "-m", module] + list(args),
      cwd=REPO,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"{module} failed:\n{proc.stderr[-3000:]}")
  return proc


def train_args(corpus, model_dir, *extra, gin_file="gin/lm/tiny/moe_flat.gin"):
  """moe_keras.train flags for the tiny LM on `corpus`."""
  return [
      f"--gin_file={gin_file}",
      f"--gin_bindings=TRAIN_FILES='{corpus / 'train.txt'}'",
      f"--gin_bindings=EVAL_FILES='{corpus / 'valid.txt'}'",
      f"--model_dir={model_dir}",
      "--verbose=0",
      "--deterministic",
  ] + list(extra)


def start_train(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
  """Starts `python -m moe_keras.train args` in the background."""
  return subprocess.Popen(
      [sys.executable, "-m", "moe_keras.train"] + list(args),
      cwd=REPO,
      env=cli_env(),
      stdout=stdout,
      stderr=stderr,
  )


def checkpoint_step(model_dir):
  """The step of DIR's latest checkpoint, or None."""
  path = os.path.join(model_dir, "checkpoints", "state.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["step"]


def wait_for_checkpoint(proc, model_dir, step, timeout=240):
  """Waits until DIR has a checkpoint at >= step (fails if proc exits)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (checkpoint_step(model_dir) or 0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode})")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint at step {step} in {timeout}s")


def last_line(text):
  lines = text.strip().splitlines()
  return lines[-1] if lines else ""
