"""results_step_time: step times read off the training curve, hand-checked."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_step_time  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_step_times_from_the_training_curve(tmp_path, monkeypatch):
  corpus = results_lib.Corpus(name="c", gin_dir="gin/mt/debian_en_fr")
  calls = []

  def fake_train(args, log_path):
    # The trainer's curve: the first period slow (tracing), then per
    # config a fixed time and tokens per step.
    model_dir = next(a for a in args if a.startswith("--model_dir="))
    model_dir = model_dir.split("=", 1)[1]
    config = os.path.basename(model_dir).split("_")[2]
    calls.append((config, args))
    per_step = {"dense": 0.5, "moe": 0.75}[config]
    with open(os.path.join(model_dir, "curve.jsonl"), "w") as f:
      for step, seconds in (
          (10, 30.0),
          (20, 30.0 + 10 * per_step),
          (30, 30.0 + 20 * per_step),
      ):
        f.write(
            json.dumps(
                {
                    "step": step,
                    "tokens": 4096.0 * step,
                    "train_seconds": seconds,
                }
            )
            + "\n"
        )
    assert os.path.dirname(log_path) == model_dir

  monkeypatch.setattr(results_lib, "_subprocess", fake_train)
  result = results_step_time.measure_step_times(
      corpus,
      ["dense", "moe"],
      {"dense": 1e-3},
      results_dir=os.path.join(tmp_path, "results"),
      work_dir=str(tmp_path),
      period=10,
      rounds=2,
  )
  assert [c for c, _ in calls] == ["dense", "moe", "dense", "moe"]
  assert "--gin_bindings=TRAIN_STEPS = 30" in calls[0][1]
  assert calls[0][1][-1] == "--gin_bindings=training.steps_per_eval = None"
  assert "--gin_bindings=PEAK_LEARNING_RATE = 0.001" in calls[0][1]
  assert not any("PEAK_LEARNING_RATE" in a for a in calls[1][1])
  assert result["dense"]["seconds_per_step"] == pytest.approx(0.5)
  assert result["moe"]["seconds_per_step"] == pytest.approx(0.75)
  assert result["moe"]["tokens_per_step"] == pytest.approx(4096.0)
  # The work dirs are gone; the file keeps every config.
  assert sorted(os.listdir(tmp_path)) == ["results"]
  assert results_step_time.read_step_times(
      os.path.join(tmp_path, "results")
  ) == (result)
  assert result["dense"]["timed_steps"] == 20
  # Measuring one config again keeps the other's entry, with its own
  # provenance.
  again = results_step_time.measure_step_times(
      corpus,
      ["moe"],
      {},
      results_dir=os.path.join(tmp_path, "results"),
      work_dir=str(tmp_path),
      period=10,
      rounds=1,
  )
  stored = results_step_time.read_step_times(os.path.join(tmp_path, "results"))
  assert stored == {"dense": result["dense"], "moe": again["moe"]}
  assert stored["moe"]["rounds"] == [pytest.approx(0.75)]


def test_step_time_refuses_a_leftover_work_dir(tmp_path):
  corpus = results_lib.Corpus(name="c", gin_dir="gin/mt/debian_en_fr")
  work_dir = os.path.join(tmp_path, "step_time_dense_0")
  os.makedirs(work_dir)
  with pytest.raises(results_lib.GridError, match="exists already.*remove it"):
    results_step_time.measure_step_time(
        corpus, "dense", None, work_dir, period=10
    )
  assert os.path.isdir(work_dir)  # not removed: it may be another run's
