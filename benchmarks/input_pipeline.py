"""Input-pipeline throughput: tokens/s of the MT and LM tf.data pipelines.

Prints a table of real (non-padding) tokens per second for

* MT: Debian En-Fr translations, shared wordpieces (tensorflow-text) +
  token-budget length bucketing (`data_pipelines.debian_translations`);
* LM: Penn Treebank (embedded), sentence batches and packed batches.

and, unless --noreference, the tokens/s that a small CPU-sized Keras model
(embedding + LSTM + softmax, the scale of this project's CPU experiments)
consumes in `model.fit` on the same batches, and the ratio between the two
(target: the pipeline is at least 10x faster than training needs).

Usage:
  python benchmarks/input_pipeline.py \
      [--debian_cache=~/.cache/moe_keras/debian_translations] \
      [--debian_lists=/path/to/apt/lists] [--epochs=2] [--noreference]

The Debian corpus is built on first use (needs root + apt, or --debian_lists
pointing at an apt lists directory with Translation-fr files); its 8k
wordpiece vocabulary is learned once (about two minutes) and cached.
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import tensorflow as tf

from data_pipelines import debian_translations
from data_pipelines import lm
from data_pipelines import mt
from data_pipelines import ptb

# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "debian_cache",
    debian_translations.DEFAULT_CACHE_DIR,
    "Debian corpus cache.",
)
flags.DEFINE_string("debian_lists", None, "Existing apt lists directory.")
flags.DEFINE_integer("epochs", 2, "Epochs timed per pipeline (after warm-up).")
flags.DEFINE_integer("mt_batch_tokens", 4096, "MT token budget per batch.")
flags.DEFINE_integer("lm_batch_tokens", 4096, "LM token budget per batch.")
flags.DEFINE_bool("reference", True, "Also time a small Keras model.")
flags.DEFINE_integer("reference_steps", 20, "Timed model steps.")

REFERENCE_UNITS = 256


def time_pipeline(make_dataset, count_tokens, epochs):
  """Iterates `epochs` epochs after one warm-up batch.

  Returns:
    dict with batches, real / padded tokens and seconds.
  """
  warm = make_dataset()
  next(iter(warm))  # traces the tf.data functions
  batches = real = source = padded = 0
  start = time.perf_counter()
  for _ in range(epochs):
    for batch in make_dataset():
      r, s, p = count_tokens(batch)
      batches += 1
      real += r
      source += s
      padded += p
  seconds = time.perf_counter() - start
  return dict(
      batches=batches, real=real, source=source, padded=padded, seconds=seconds
  )


def lm_tokens(batch):
  inputs, _, weights = batch
  return float(tf.reduce_sum(weights)), 0.0, int(tf.size(inputs))


def mt_tokens(batch):
  x, target_out, weights = batch
  source = float(tf.reduce_sum(tf.cast(x["source"] != 0, tf.float32)))
  return float(tf.reduce_sum(weights)), source, int(tf.size(target_out))


def reference_lm_model(vocab_size):
  inputs = keras.Input([None], dtype="int32")
  h = keras.layers.Embedding(vocab_size, REFERENCE_UNITS)(inputs)
  h = keras.layers.LSTM(REFERENCE_UNITS, return_sequences=True)(h)
  logits = keras.layers.Dense(vocab_size)(h)
  model = keras.Model(inputs, logits)
  model.compile(
      optimizer="adam",
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  return model


def reference_mt_model(vocab_size):
  source = keras.Input([None], dtype="int32", name="source")
  target_in = keras.Input([None], dtype="int32", name="target_in")
  embed = keras.layers.Embedding(vocab_size, REFERENCE_UNITS)
  _, h, c = keras.layers.LSTM(REFERENCE_UNITS, return_state=True)(embed(source))
  dec = keras.layers.LSTM(REFERENCE_UNITS, return_sequences=True)(
      embed(target_in), initial_state=[h, c]
  )
  logits = keras.layers.Dense(vocab_size)(dec)
  model = keras.Model({"source": source, "target_in": target_in}, logits)
  model.compile(
      optimizer="adam",
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  return model


def time_model(model, dataset, count_tokens, steps):
  """Target tokens/s of model.fit over `steps` batches (after 3 warm-up)."""
  batches = list(dataset.take(steps + 3))
  for batch in batches[:3]:
    model.train_on_batch(*batch)
  start = time.perf_counter()
  real = 0.0
  for batch in batches[3:]:
    model.train_on_batch(*batch)
    real += count_tokens(batch)[0]
  return real / (time.perf_counter() - start)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  ptb_data = ptb.ptb_lm_data(
      batching=lm.LmBatching(batch_tokens=FLAGS.lm_batch_tokens),
  )
  ptb_packed = ptb.ptb_lm_data(
      batching=lm.LmBatching(
          batch_tokens=FLAGS.lm_batch_tokens,
          mode="packed",
          pack_length=64,
      ),
  )
  debian_data = debian_translations.debian_mt_data(
      cache_dir=FLAGS.debian_cache,
      lists_dir=FLAGS.debian_lists,
      batching=mt.MtBatching(batch_tokens=FLAGS.mt_batch_tokens),
  )
  pipelines = [
      (
          "MT debian en-fr (wordpiece+bucket)",
          debian_data.train_dataset,
          mt_tokens,
          debian_data,
      ),
      (
          "LM ptb sentences (bucket)",
          ptb_data.train_dataset,
          lm_tokens,
          ptb_data,
      ),
      ("LM ptb packed (T=64)", ptb_packed.train_dataset, lm_tokens, ptb_packed),
  ]
  for name, make, count, data in pipelines:
    result = time_pipeline(make, count, FLAGS.epochs)
    model_rate = None
    if FLAGS.reference and "packed" not in name:
      vocab_size = data.vocab.size
      model = (
          reference_mt_model if name.startswith("MT") else reference_lm_model
      )(vocab_size)
      model_rate = time_model(model, make(), count, FLAGS.reference_steps)
    rows.append((name, result, model_rate))

  header = (
      f'{"pipeline":36s} {"budget":>6s} {"batches":>7s} {"tgt tok/s":>10s}'
      f' {"src+tgt tok/s":>13s} {"pad eff":>7s} {"ms/batch":>8s}'
      f' {"model tok/s":>11s} {"ratio":>6s}'
  )
  print(
      f"devices: {tf.config.list_physical_devices()}; "
      f"cores: {os.cpu_count()}; tf {tf.__version__}"
  )
  print(header)
  print("-" * len(header))
  for name, r, model_rate in rows:
    budget = (
        FLAGS.mt_batch_tokens
        if name.startswith("MT")
        else FLAGS.lm_batch_tokens
    )
    tgt_rate = r["real"] / r["seconds"]
    all_rate = (r["real"] + r["source"]) / r["seconds"]
    eff = r["real"] / max(r["padded"], 1)
    ms = 1000 * r["seconds"] / max(r["batches"], 1)
    model_col = f"{model_rate:11.0f}" if model_rate else f'{"-":>11s}'
    ratio = f"{tgt_rate / model_rate:6.0f}x" if model_rate else f'{"-":>6s}'
    print(
        f'{name:36s} {budget:6d} {r["batches"]:7d} {tgt_rate:10.0f}'
        f" {all_rate:13.0f} {eff:7.2f} {ms:8.2f} {model_col} {ratio}"
    )
  print(
      'tok/s counts real (non-padding) tokens; "pad eff" = real target'
      ' tokens / padded target positions; "model" = target tokens/s that'
      f" a {REFERENCE_UNITS}-unit embedding+LSTM(+LSTM)+softmax Keras model"
      " trains on with train_on_batch."
  )


if __name__ == "__main__":
  app.run(main)
