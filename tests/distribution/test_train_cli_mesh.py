"""`moe_keras.train` / `moe_keras.evaluate --mesh_shape=...` on a tiny LM.

Trains on a 2x2 mesh (the CPU split into 4 devices), resumes on one device,
then on expert:4: the checkpoints do not depend on the mesh. A hierarchical
LM trained on a 2x2 mesh evaluates to the same numbers on one device and on
two other meshes.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

import dist_testlib

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "red"]


def _write_corpus(directory):
  rng = np.random.default_rng(0)
  for split, lines in (("train", 200), ("valid", 20)):
    with open(directory / f"{split}.txt", "w") as f:
      for _ in range(lines):
        f.write(" ".join(rng.choice(WORDS, rng.integers(3, 10))) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  directory = tmp_path_factory.mktemp("corpus")
  _write_corpus(directory)
  return directory


@pytest.fixture(scope="module")
def hierarchical_run(corpus, tmp_path_factory):
  """model_dir of a hierarchical LM trained 10 steps on batch:2,expert:2.

  Shared by the evaluate tests, which only read it (their results go to
  --output files elsewhere).
  """
  model_dir = tmp_path_factory.mktemp("hierarchical") / "run"
  proc = _train(
      corpus,
      model_dir,
      10,
      "--mesh_shape=batch:2,expert:2",
      gin_file="moe_hierarchical",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 experts in 2 blocks" in proc.stderr, proc.stderr[-3000:]
  return model_dir


def _run(module, *args):
  env = dict(dist_testlib.scenario_env(), PYTHONPATH=dist_testlib.REPO)
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=dist_testlib.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


def _train(
    corpus,
    model_dir,
    steps,
    *extra,
    gin_file="moe_flat",
    backend="tensorflow",
    env=None,
    popen=False,
):
  """Runs moe_keras.train on the tiny LM (`env` updates the environment).

  Returns:
    The CompletedProcess, or with popen=True the started Popen.
  """
  env = dict(
      dist_testlib.scenario_env(backend, env), PYTHONPATH=dist_testlib.REPO
  )
  run = subprocess.Popen if popen else subprocess.run
  kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not popen:
    kwargs["timeout"] = 300
  return run(
      [
          sys.executable,
          "-m",
          "moe_keras.train",
          f"--gin_file=gin/lm/tiny/{gin_file}.gin",
          f"--gin_bindings=TRAIN_FILES='{corpus}/train.txt'",
          f"--gin_bindings=EVAL_FILES='{corpus}/valid.txt'",
          f"--gin_bindings=training.train_steps={steps}",
          f"--model_dir={model_dir}",
          "--verbose=0",
          *extra,
      ],
      cwd=dist_testlib.REPO,
      env=env,
      **kwargs,
  )


def test_train_on_mesh_then_resume_on_other_layouts(corpus, tmp_path):
  model_dir = tmp_path / "run"
  for steps, extra, expect in (
      (10, ["--mesh_shape=batch:2,expert:2"], "4 experts in 2 blocks"),
      (15, [], "restored"),
      (20, ["--mesh_shape=expert:4"], "4 experts in 4 blocks"),
  ):
    proc = _train(corpus, model_dir, steps, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to step {steps}" in proc.stdout, proc.stdout
    assert expect in proc.stderr, proc.stderr[-3000:]
  assert "restored" in proc.stderr  # the expert:4 run resumed from step 15


def test_bad_mesh_shape_is_one_line(tmp_path):
  proc = _train(tmp_path, tmp_path / "run", 1, "--mesh_shape=batch:3,expert:2x")
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert lines and "malformed mesh_shape" in lines[-1], proc.stderr[-2000:]


def test_evaluate_on_meshes_matches_one_device(hierarchical_run, tmp_path):
  """Hierarchical LM saved on batch:2,expert:2; evaluated on 1 device,
  batch:1,expert:2 and batch:4,expert:2: the same eval JSON numbers."""
  model_dir = hierarchical_run
  results = {}
  for mesh in ("", "batch:1,expert:2", "batch:4,expert:2"):
    output = tmp_path / f"eval_{mesh or 'single'}.json"
    proc = _run(
        "moe_keras.evaluate",
        f"--model_dir={model_dir}",
        "--split=valid",
        f"--output={output}",
        *([f"--mesh_shape={mesh}"] if mesh else []),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mesh:
      assert "4 experts in 2 blocks" in proc.stderr, proc.stderr[-3000:]
    with open(output) as f:
      results[mesh] = json.load(f)
  want = results[""]
  assert want["step"] == 10 and want["tokens"] > 0
  for mesh in ("batch:1,expert:2", "batch:4,expert:2"):
    got = results[mesh]
    for key in ("step", "tokens", "sentences", "num_batches"):
      assert got[key] == want[key], (mesh, key, got[key], want[key])
    for key in ("perplexity", "mean_nll"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=mesh)
    assert got["experts"].keys() == want["experts"].keys()
    for layer, stats in want["experts"].items():
      for key, value in stats.items():
        np.testing.assert_allclose(
            got["experts"][layer][key],
            value,
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{mesh} {layer} {key}",
        )


def test_evaluate_bad_mesh_shape_is_one_line(hierarchical_run):
  proc = _run(
      "moe_keras.evaluate",
      f"--model_dir={hierarchical_run}",
      "--split=valid",
      "--mesh_shape=batch:2,expert:2x",
  )
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert lines and "malformed mesh_shape" in lines[-1], proc.stderr[-2000:]
