"""A tiny, learnable En->Fr corpus (number words) and gin bindings for it."""

import os
import random

EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
FR = ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit"]
REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def write_corpus(directory, train=400, dev=24, seed=0):
  """Writes train/dev '*.en-fr.tsv' files of word-by-word translations.

  Returns:
    (train path, dev path).
  """
  rng = random.Random(seed)
  paths = []
  for name, count in (("train", train), ("dev", dev)):
    path = os.path.join(directory, f"{name}.en-fr.tsv")
    with open(path, "w", encoding="utf-8") as f:
      for _ in range(count):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(1, 5))]
        en = " ".join(EN[i] for i in idx).capitalize() + "."
        fr = " ".join(FR[i] for i in idx).capitalize() + "."
        f.write(f"{en}\t{fr}\n")
    paths.append(path)
  return tuple(paths)


def bindings(directory, train_path, dev_path, steps=60):
  return [
      f"TRAIN_FILES = {train_path!r}",
      f"EVAL_FILES = {dev_path!r}",
      f"debian_mt_data.vocab_file = {os.path.join(directory, 'vocab.txt')!r}",
      "debian_mt_data.vocab_size = 80",
      f"TRAIN_STEPS = {steps}",
      f"STEPS_PER_CHECKPOINT = {steps}",
      "MODEL_DIM = 32",
      "LSTM_UNITS = 64",
      "LSTM_PROJECTION = 32",
      "PEAK_LEARNING_RATE = 0.02",
  ]
