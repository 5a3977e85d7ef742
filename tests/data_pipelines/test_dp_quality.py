"""Invalid UTF-8 and <UNK> rates of every LM reader, and the warning line."""

import logging

import numpy as np
import pytest

from data_pipelines import lm
from data_pipelines import news_shards
from data_pipelines import ptb


def _random_bytes(path, size=2000):
  path.write_bytes(np.random.default_rng(0).bytes(size))
  return path


def _one_pass(dataset):
  for _ in dataset:
    pass


@pytest.mark.parametrize("reader", ["ptb", "news"])
def test_invalid_utf8_is_counted_and_warned(reader, tmp_path, caplog):
  """PTB files used to be decoded before the counter saw them (always 0)."""
  garbage = _random_bytes(tmp_path / "garbage.txt")
  clean = tmp_path / "clean.txt"
  clean.write_text("the cat sat\nthe dog ran\n")
  if reader == "ptb":
    data = ptb.ptb_lm_data(
        train_files=str(garbage),
        eval_files=str(clean),
        batching=lm.LmBatching(batch_tokens=256),
    )
  else:
    data = news_shards.news_lm_data(
        str(garbage),
        batching=lm.LmBatching(batch_tokens=256),
    )
  caplog.set_level(logging.INFO)
  # Also absl's own logger: a module run earlier may have raised its level.
  caplog.set_level(logging.INFO, logger="absl")
  _one_pass(data.train_dataset())
  stats = data.stats[f"{reader}/train"].last
  assert stats["invalid_utf8_replaced"] > 0.5 * stats["lines"]
  warnings = [
      r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
  ]
  assert len(warnings) == 1
  assert warnings[0].startswith(f"data {reader}/train: ")
  assert "of the lines are not valid UTF-8" in warnings[0]
  assert "unk_rate=" in caplog.text


def test_unknown_words_are_warned(tmp_path, caplog):
  train = tmp_path / "train.txt"
  train.write_text("the cat sat\n" * 10)
  other = tmp_path / "other.txt"
  other.write_text("zebra ran far\nthe cat sat\n")
  data = ptb.ptb_lm_data(
      train_files=str(train),
      eval_files=str(other),
      batching=lm.LmBatching(batch_tokens=256),
  )
  caplog.set_level(logging.INFO)
  # Also absl's own logger: a module run earlier may have raised its level.
  caplog.set_level(logging.INFO, logger="absl")
  _one_pass(data.eval_dataset())
  stats = data.stats["ptb/eval"].last
  assert stats["unk_tokens"] == 3 and stats["invalid_utf8_replaced"] == 0
  warnings = [
      r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
  ]
  assert warnings == [
      "data ptb/eval: 37.5% of the target tokens are <UNK>; is this the"
      " right text?"
  ]
