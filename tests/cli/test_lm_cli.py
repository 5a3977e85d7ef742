"""End to end: train -> evaluate -> kill -> resume with the absl CLIs.

Each CLI runs in a subprocess, as a user runs it, on a tiny LM and a tiny
corpus written by the test.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import cli_testlib as lib

REPO = lib.REPO
_run = lib.run
_train_args = lib.train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return lib.write_corpus(tmp_path_factory.mktemp("corpus"))


def _weights(model_dir):
  with open(os.path.join(model_dir, "checkpoints", "state.json")) as f:
    state = json.load(f)
  values = {}
  with h5py.File(
      os.path.join(model_dir, "checkpoints", state["latest"]), "r"
  ) as f:
    f.visititems(
        lambda name, obj: values.__setitem__(name, obj[()])
        if isinstance(obj, h5py.Dataset)
        else None
    )
  return state["step"], values


def _digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
  _run("moe_keras.train", *_train_args(corpus, model_dir))
  return model_dir


def test_train_writes_layout(trained):
  assert (trained / "config.gin").exists()
  step, _ = _weights(trained)
  assert step == 20
  assert "moe_spec.num_experts = 4" in (trained / "config.gin").read_text()
  assert any(
      f.startswith("events")
      for _, _, fs in os.walk(trained / "logs")
      for f in fs
  )


def test_validation_passes_end_without_a_keras_warning(corpus, tmp_path):
  """Keras warns "Your input ran out of data; interrupting training" at the
  end of each validation pass over an eval set of unknown length; train
  silences that one warning (the pass's normal end), not the validation."""
  model_dir = tmp_path / "with_eval"
  proc = _run(
      "moe_keras.train",
      *_train_args(
          corpus,
          model_dir,
          "--gin_bindings=training.train_steps=20",
          "--gin_bindings=training.steps_per_eval=10",
      ),
  )
  assert "ran out of data" not in proc.stderr, proc.stderr[-3000:]
  # Both validation passes ran (Keras's TensorBoard logs them apart).
  validation = [
      f
      for root, _, files in os.walk(model_dir / "logs")
      if os.path.basename(root) == "validation"
      for f in files
      if f.startswith("events")
  ]
  assert validation, sorted(os.walk(model_dir / "logs"))


def test_evaluate_perplexity_and_expert_stats(trained, corpus):
  proc = _run(
      "moe_keras.evaluate",
      f"--model_dir={trained}",
      "--split=valid",
      "--plot",
  )
  with open(trained / "eval_valid.json") as f:
    result = json.load(f)
  valid_lines = (corpus / "valid.txt").read_text().splitlines()
  # Every word and every </S> is a target.
  assert result["tokens"] == sum(len(l.split()) + 1 for l in valid_lines)
  assert result["sentences"] == len(valid_lines)
  assert result["perplexity"] == pytest.approx(
      np.exp(result["mean_nll"]), rel=1e-9
  )
  # 10 words + </S> + <UNK>: a trained model beats uniform guessing.
  assert 1.0 < result["perplexity"] < 13.0
  moe = result["experts"]["moe"]
  assert sum(moe["token_counts"]) == 2 * result["tokens"]  # k = 2 per token
  counts = np.asarray(moe["token_counts"])
  assert moe["cv_load"] == pytest.approx(counts.std() / counts.mean())
  assert (trained / "experts_valid_moe.png").exists()
  assert '"perplexity"' in proc.stdout


def test_kill_and_resume_gives_the_same_weights(trained, corpus, tmp_path):
  """SIGKILL after a checkpoint, rerun: identical final weights."""
  model_dir = tmp_path / "killed"
  args = [sys.executable, "-m", "moe_keras.train"] + _train_args(
      corpus,
      model_dir,
      "--gin_bindings=training.steps_per_checkpoint=5",
      "--gin_bindings=training.train_steps=2000",
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  proc = subprocess.Popen(
      args,
      cwd=REPO,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  state_path = model_dir / "checkpoints" / "state.json"
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      if (
          state_path.exists()
          and json.loads(state_path.read_text())["step"] >= 10
      ):
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  killed_at = json.loads(state_path.read_text())["step"]
  assert 10 <= killed_at < 2000
  _run(
      "moe_keras.train",
      *_train_args(
          corpus, model_dir, "--gin_bindings=training.steps_per_checkpoint=5"
      ),
  )
  step_a, weights_a = _weights(trained)
  step_b, weights_b = _weights(model_dir)
  assert step_a == step_b == 20
  assert weights_a.keys() == weights_b.keys()
  for name in weights_a:
    np.testing.assert_array_equal(
        weights_a[name], weights_b[name], err_msg=name
    )


def test_rerun_of_finished_run_does_nothing(trained, corpus):
  before = _digest(trained / "checkpoints")
  _run("moe_keras.train", *_train_args(corpus, trained))
  assert _digest(trained / "checkpoints") == before


def test_other_architecture_is_refused_and_dir_untouched(trained, corpus):
  before = _digest(trained)
  proc = _run(
      "moe_keras.train",
      *_train_args(corpus, trained, gin_file="gin/lm/tiny/dense.gin"),
      check=False,
  )
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "holds a checkpoint of a different architecture" in last
  assert _digest(trained) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin_file=gin/lm/tiny/missing.gin"], "gin file not found"),
        (
            ["--gin_file=gin/lm/tiny/moe_flat.gin", "--gin_bindings=nope.x=1"],
            "bad gin config: No configurable matching 'nope'",
        ),
        (
            [
                "--gin_file=gin/lm/tiny/moe_flat.gin",
                "--gin_bindings=TRAIN_FILES='/no/such/*.txt'",
            ],
            "matches no file",
        ),
        (
            [
                "--gin_file=gin/lm/tiny/moe_flat.gin",
                "--gin_bindings=moe_spec.k = 9",
            ],
            "k=9 is larger than num_experts=4",
        ),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path):
  proc = _run(
      "moe_keras.train",
      f"--model_dir={tmp_path / 'run'}",
      *args,
      check=False,
  )
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("moe_keras.train: error: ")
  assert message in lines[-1]
  assert not (tmp_path / "run").exists()  # a failed start writes nothing


def test_evaluate_bad_inputs(tmp_path, trained):
  proc = _run("moe_keras.evaluate", f"--model_dir={tmp_path}", check=False)
  assert proc.returncode == 1
  assert "is not a trained model_dir" in proc.stderr.strip().splitlines()[-1]
  proc = _run(
      "moe_keras.evaluate",
      f"--model_dir={trained}",
      "--eval_file=/no/such/file.txt",
      check=False,
  )
  assert proc.returncode == 1
  assert "matches no file" in proc.stderr.strip().splitlines()[-1]


def test_evaluate_any_text_file(trained, tmp_path):
  text = tmp_path / "mine.txt"
  text.write_text("the cat sat\nzebra ran\n")
  proc = _run(
      "moe_keras.evaluate",
      f"--model_dir={trained}",
      "--split=mine",
      f"--eval_file={text}",
  )
  with open(trained / "eval_mine.json") as f:
    result = json.load(f)
  assert result["tokens"] == 4 + 3  # 5 words + 2 </S>
  # 'zebra' is not in the vocabulary: 1 of 7 targets, warned in one line.
  assert result["unk_rate"] == pytest.approx(1 / 7)
  assert result["invalid_utf8_rate"] == 0.0
  assert (
      "data ptb/eval: 14.3% of the target tokens are <UNK>; is this the"
      " right text?" in proc.stderr
  )
  assert result["eval_file"] == str(text)


# Steps of the JAX run. XLA compiles the train step once per batch shape
# (B, T), and the tiny corpus's batches nearly all differ (10 steps: 7
# shapes, 7 compiles); 2 steps still train on two shapes (a recompile) and
# checkpoint the last one.
JAX_TRAIN_STEPS = 2


def test_jax_backend_train_and_evaluate(corpus, tmp_path):
  """The same CLIs on KERAS_BACKEND=jax (capacity mode: static shapes)."""
  model_dir = tmp_path / "jax"
  env = dict(
      os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"
  )
  common = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  train = subprocess.run(
      [sys.executable, "-m", "moe_keras.train"]
      + _train_args(
          corpus,
          model_dir,
          f"--gin_bindings=training.train_steps={JAX_TRAIN_STEPS}",
          "--gin_bindings=moe_spec.capacity_factor=2.0",
      )[:-1],
      **common,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  evaluate = subprocess.run(
      [
          sys.executable,
          "-m",
          "moe_keras.evaluate",
          f"--model_dir={model_dir}",
          "--split=valid",
      ],
      **common,
  )
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  with open(model_dir / "eval_valid.json") as f:
    result = json.load(f)
  assert np.isfinite(result["perplexity"])
  assert result["step"] == JAX_TRAIN_STEPS


def test_evaluate_empty_file_is_one_line(trained, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  proc = _run(
      "moe_keras.evaluate",
      f"--model_dir={trained}",
      "--split=empty",
      f"--eval_file={empty}",
      check=False,
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert (
      last
      == "moe_keras.evaluate: error: the empty split is empty: no target tokens"
  )
  assert not (trained / "eval_empty.json").exists()
