"""DIR/curve.jsonl: written per checkpoint period, continued across resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_keras import learning_curve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "red"]


def _train(corpus, model_dir, steps):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "moe_keras.train",
          "--gin_file=gin/lm/tiny/moe_flat.gin",
          f"--gin_bindings=TRAIN_FILES='{corpus / 'train.txt'}'",
          f"--gin_bindings=EVAL_FILES='{corpus / 'valid.txt'}'",
          "--gin_bindings=training.steps_per_checkpoint=5",
          "--gin_bindings=training.steps_per_eval=10",
          f"--gin_bindings=training.train_steps={steps}",
          f"--model_dir={model_dir}",
          "--verbose=0",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_curve_continues_across_resume(tmp_path):
  rng = np.random.default_rng(0)
  lines = {}
  for split, count in (("train", 300), ("valid", 40)):
    lines[split] = [
        " ".join(rng.choice(WORDS, rng.integers(3, 10))) for _ in range(count)
    ]
    (tmp_path / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
  model_dir = tmp_path / "run"
  _train(tmp_path, model_dir, steps=10)
  first = learning_curve.read_curve(model_dir)
  # A record written after step 10's checkpoint by a run killed before the
  # next one: the resumed run must drop it.
  with open(model_dir / "curve.jsonl", "a") as f:
    f.write(json.dumps({"step": 15, "tokens": -1.0, "train_seconds": -1.0}))
    f.write("\n")
  _train(tmp_path, model_dir, steps=20)
  curve = learning_curve.read_curve(model_dir)
  assert [r["step"] for r in curve] == [5, 10, 15, 20]
  assert curve[:2] == first
  # Every word and every </S> of the valid file is a validation target.
  valid_tokens = sum(len(l.split()) + 1 for l in lines["valid"])
  assert [r.get("val_tokens") for r in curve] == [
      None,
      valid_tokens,
      None,
      valid_tokens,
  ]
  # Training tokens: cumulative, at most 256 (batch_tokens) per step, and
  # never the validation count (Keras's logs used to read a shared variable).
  tokens = [r["tokens"] for r in curve]
  increments = np.diff([0.0] + tokens)
  assert np.all(increments > 0)
  assert np.all(increments <= 5 * 256)
  seconds = [r["train_seconds"] for r in curve]
  assert np.all(np.diff([0.0] + seconds) > 0)
  assert all(np.isfinite(r["val_perplexity"]) for r in curve[1::2])


def test_truncate_and_append(tmp_path):
  for step in (5, 10, 15):
    learning_curve.append_record(
        tmp_path, {"step": step, "tokens": step * 2.0, "loss": float("nan")}
    )
  learning_curve.append_record(tmp_path, {"step": 10, "tokens": 7.0})
  assert [r["tokens"] for r in learning_curve.read_curve(tmp_path)] == [
      10.0,
      7.0,
      30.0,
  ]
  assert learning_curve.read_curve(tmp_path)[0]["loss"] is None  # NaN -> null
  assert learning_curve.truncate_curve(tmp_path, 12) == {
      "step": 10,
      "tokens": 7.0,
  }
  assert [r["step"] for r in learning_curve.read_curve(tmp_path)] == [5, 10]
  assert learning_curve.truncate_curve(tmp_path, 0) == {}
  (tmp_path / "curve.jsonl").write_text("{not json}\n")
  with pytest.raises(ValueError, match="curve.jsonl:1: not a curve record"):
    learning_curve.read_curve(tmp_path)


@pytest.mark.parametrize(
    "step, train_steps, expected",
    [
        # New run: one fit of 6 periods of 500 steps.
        (0, 3000, [(0, 0, 6, 500)]),
        # Resumed at a period end: the remaining periods 3..5.
        (1500, 3000, [(1500, 3, 6, 500)]),
        # Stopped by a signal at 1284: the rest of period 2 (216 steps,
        # epoch 2, ending at 1500), then periods 3..5 from step 1500.
        (1284, 3000, [(1284, 2, 3, 216), (1500, 3, 6, 500)]),
        # Stopped in the last, partial period (train_steps 2900): its rest
        # only; StepCallback stops it at 2900.
        (2600, 2900, [(2600, 5, 6, 400)]),
        # 1 step short of a period end.
        (9, 20, [(9, 1, 2, 1), (10, 2, 4, 5)]),
    ],
)
def test_fit_segments(step, train_steps, expected):
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  spc = 5 if train_steps == 20 else 500
  assert experiment.fit_segments(step, train_steps, spc) == expected
