r"""Training words/s of the PTB language models, side by side.

For every config, builds the model exactly as `moe_keras.train` does (gin,
PTB batches of 4096 tokens, Adam) and times `model.fit` over a fixed, cached
set of `--steps` batches after an untimed pass (tracing). The
configs are measured in interleaved rounds (dense, MoE, dense, MoE, ...) so
that a change in machine load hits all of them alike; the table gives the
median over rounds. Target (issue 4): every MoE model >= 0.85x the words/s of
its compute-matched dense baseline (4xLSTM). "optimizer update ms" times one
update of all trainable variables alone: the per-step cost that grows with
the number of experts (parameters), not with k.

  python benchmarks/lm_training.py [--steps=20 --rounds=3]
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import gin
import keras
import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_keras import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras.models import lm  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "configs",
    [
        "4xlstm_128",
        "lstm_512_128",
        "moe_1_wide",
        "moe_1_deep",
        "moe_4",
        "moe_32",
        "moe_256",
        "moe_256_h",
        "moe_1024_h",
    ],
    "gin/lm/ptb/<name>.gin configs; the first is the baseline.",
)
flags.DEFINE_integer("steps", 20, "Timed steps per round.")
flags.DEFINE_integer(
    "warmup_rounds", 1, "Untimed passes over the batches (tracing) per model."
)
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_float("target", 0.85, "Target ratio of MoE to baseline words/s.")
flags.DEFINE_multi_string(
    "gin_bindings",
    [],
    "Extra gin bindings for every config, e.g."
    " \"moe_spec.dispatch_mode='grouped'\".",
)
flags.DEFINE_list(
    "variants",
    [],
    "NAME=BINDING entries: also time config NAME with one more gin binding,"
    " e.g. \"moe_256=moe_spec.dispatch_mode='grouped'\" (an A/B in the same"
    " interleaved rounds).",
)

PAIR_BASELINE = "4xlstm_128"


class Runner:
  """One model and a fixed, cached set of PTB batches, trained with fit."""

  def __init__(self, name, bindings=()):
    gin.clear_config()
    experiment.parse_gin(
        [os.path.join(REPO, "gin/lm/ptb", f"{name}.gin")],
        list(FLAGS.gin_bindings) + list(bindings),
    )
    keras.utils.set_random_seed(0)
    self.task, self.model = experiment.build_task_and_model()
    self.counts = lm.count_lm(lm.lm_config())
    self.dataset = self.task.train_dataset().take(FLAGS.steps).cache()
    self.words = sum(float(np.sum(y)) for _, y in self.dataset)
    # Traces the train step for the shapes of these batches.
    for _ in range(FLAGS.warmup_rounds):
      self.model.fit(self.dataset, epochs=1, verbose=0, shuffle=False)

  def time_round(self):
    """Returns (words/s of fit, ms of one optimizer update)."""
    start = time.perf_counter()
    self.model.fit(self.dataset, epochs=1, verbose=0, shuffle=False)
    rate = self.words / (time.perf_counter() - start)
    return rate, self.time_update()

  def time_update(self, repeats=5):
    """Milliseconds of one optimizer update of every trainable variable.

    The part of a training step whose cost grows with the parameter count,
    not with k: it is what keeps a many-expert model below its dense
    baseline at a small batch. Applied with zero gradients to a copy-free
    tf.function over the model's own optimizer (its step counter advances;
    the timed fit rounds above are unaffected in cost).
    """
    variables = self.model.trainable_variables
    optimizer = self.model.optimizer
    if not hasattr(self, "_update"):
      zeros = [keras.ops.zeros_like(v) for v in variables]
      self._update = tf.function(lambda: optimizer.apply(zeros, variables))
      self._update()
    start = time.perf_counter()
    for _ in range(repeats):
      self._update()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv):
  del argv
  for name in FLAGS.configs:  # flags are checked before any model is built
    if not os.path.exists(os.path.join(REPO, "gin/lm/ptb", f"{name}.gin")):
      raise app.UsageError(f"--configs: no gin/lm/ptb/{name}.gin")
  if PAIR_BASELINE not in FLAGS.configs:
    raise app.UsageError(f"--configs must include the baseline {PAIR_BASELINE}")
  variants = []
  for variant in FLAGS.variants:
    name, sep, binding = variant.partition("=")
    if not sep or name not in FLAGS.configs:
      raise app.UsageError(
          f"--variants entry {variant!r}: expected NAME=BINDING with NAME one"
          f" of --configs ({', '.join(FLAGS.configs)})"
      )
    variants.append((name, binding))
  runners = {name: Runner(name) for name in FLAGS.configs}
  for name, binding in variants:
    runners[f"{name} + {binding}"] = Runner(name, [binding])
  rates = {name: [] for name in runners}
  updates = {name: [] for name in runners}
  for _ in range(FLAGS.rounds):
    for name, runner in runners.items():
      rate, update_ms = runner.time_round()
      rates[name].append(rate)
      updates[name].append(update_ms)
  base = statistics.median(rates[PAIR_BASELINE])
  print(
      f"PTB training, batches of 4096 tokens, {FLAGS.steps} steps x"
      f" {FLAGS.rounds} interleaved rounds, TensorFlow"
      f" {keras.backend.backend()} backend"
  )
  print(
      "| config | params excl. | ops/timestep | words/s (median) | min-max |"
      f" step ms | optimizer update ms | vs {PAIR_BASELINE} | target |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
  for name in runners:
    rate = statistics.median(rates[name])
    counts = runners[name].counts
    is_moe = name.startswith("moe_")
    ratio = rate / base
    target = (
        f">= {FLAGS.target} {'met' if ratio >= FLAGS.target else 'MISSED'}"
        if is_moe
        else "-"
    )
    print(
        f"| {name} | {counts['params_excl'] / 1e6:.2f}M |"
        f" {counts['ops_per_timestep'] / 1e3:.0f}k | {rate:,.0f} |"
        f" {min(rates[name]):,.0f}-{max(rates[name]):,.0f} |"
        f" {runners[name].words / FLAGS.steps / rate * 1e3:.0f} |"
        f" {statistics.median(updates[name]):.0f} | {ratio:.2f} | {target} |"
    )


if __name__ == "__main__":
  app.run(main)
