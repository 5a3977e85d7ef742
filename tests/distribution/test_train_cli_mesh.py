"""`python -m moe_keras.train --mesh_shape=...` end to end on a tiny LM.

Trains on a 2x2 mesh (the CPU split into 4 devices), resumes on one device,
then on expert:4, and evaluates: the checkpoints do not depend on the mesh.
"""

import os
import subprocess
import sys

import numpy as np

import dist_testlib

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "red"]


def _train(corpus, model_dir, steps, *extra):
  env = dict(dist_testlib.scenario_env(), PYTHONPATH=dist_testlib.REPO)
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "moe_keras.train",
          "--gin_file=gin/lm/tiny/moe_flat.gin",
          f"--gin_bindings=TRAIN_FILES='{corpus}/train.txt'",
          f"--gin_bindings=EVAL_FILES='{corpus}/valid.txt'",
          f"--gin_bindings=training.train_steps={steps}",
          f"--model_dir={model_dir}",
          "--verbose=0",
          *extra,
      ],
      cwd=dist_testlib.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_train_on_mesh_then_resume_on_other_layouts(tmp_path):
  rng = np.random.default_rng(0)
  for split, lines in (("train", 200), ("valid", 20)):
    with open(tmp_path / f"{split}.txt", "w") as f:
      for _ in range(lines):
        f.write(" ".join(rng.choice(WORDS, rng.integers(3, 10))) + "\n")
  model_dir = tmp_path / "run"
  for steps, extra, expect in (
      (10, ["--mesh_shape=batch:2,expert:2"], "4 experts in 2 blocks"),
      (15, [], "restored"),
      (20, ["--mesh_shape=expert:4"], "4 experts in 4 blocks"),
  ):
    proc = _train(tmp_path, model_dir, steps, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to step {steps}" in proc.stdout, proc.stdout
    assert expect in proc.stderr, proc.stderr[-3000:]
  assert "restored" in proc.stderr  # the expert:4 run resumed from step 15


def test_bad_mesh_shape_is_one_line(tmp_path):
  proc = _train(tmp_path, tmp_path / "run", 1, "--mesh_shape=batch:3,expert:2x")
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert lines and "malformed mesh_shape" in lines[-1], proc.stderr[-2000:]
