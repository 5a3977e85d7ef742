"""`LmTask`: word-level language modelling (the paper's sections 5 and 8).

Batches of `data_pipelines.LmData` are `(inputs, targets, weights)`; the task
feeds them to the LM of `moe_keras.models.lm` as

  x = {'inputs', 'targets', 'weights'},  y = weights

so the compiled loss is the per-token mean NLL over real tokens
(`eval.perplexity.masked_mean_nll`). The optimizer minimizes it plus the MoE
balancing losses the layers add; the logs show it alone as `loss`, each
balancing loss under its own name and the sum as `total_loss`
(`moe_keras.models.task_model`). The `perplexity` metric is exp of the mean
NLL over everything seen.
"""

import time

import gin
import keras
from absl import logging
import numpy as np

from data_pipelines import batching
from data_pipelines import lm as lm_data
from eval import expert_stats
from eval import perplexity as perplexity_lib
from moe_keras import distribution as distribution_lib
from moe_keras.models import lm
from moe_keras.tasks import base

# The bindings that leave one batch shape per length (`data_pipelines.lm`).
STATIC_SHAPE_BINDINGS = (
    "lm_batching.length_multiple=16",
    "lm_batching.fill_rows=True",
)

# The binding that gives JAX TensorFlow's per-piece second moment.
PIECE_SQUARES_BINDING = "lm_config.piece_squares=True"


def _to_keras(inputs, targets, weights):
  return {"inputs": inputs, "targets": targets, "weights": weights}, weights


def shape_warning(backend, options):
  """A one-line warning for a JAX run whose batch shapes vary, or None.

  Keras's JAX trainer compiles a step for every new batch shape, which costs
  seconds each; 'sentences' batches have one shape per (rows, length) unless
  their lengths are rounded and their rows filled.

  Args:
    backend: `keras.backend.backend()`.
    options: the run's `data_pipelines.lm.LmBatching`.

  Returns:
    str or None.
  """
  if backend != "jax" or options.mode != lm_data.MODE_SENTENCES:
    return None
  if options.length_multiple > 1 and options.fill_rows:
    return None
  flags = " ".join(f"--gin_bindings={b}" for b in STATIC_SHAPE_BINDINGS)
  return (
      "JAX compiles a training step for every batch shape, and these"
      " 'sentences' batches vary in rows and length (137 shapes in the PTB"
      f" main job's 1600 steps); {flags} leave one shape per length (6 there)"
  )


@gin.configurable
class LmTask(base.Task):
  """Language modelling on an `LmData`."""

  name = "lm"

  def __init__(self, data, stats_batches=None):
    """Creates the task.

    Args:
      data: `data_pipelines.LmData`.
      stats_batches: expert statistics in `evaluate` over at most this many
        eval batches (None: the whole split).
    """
    super().__init__(data)
    self.stats_batches = stats_batches

  def build_model(self):
    return lm.build_lm(self.vocab_size)

  def train_dataset(self, input_context=None):
    backend = keras.backend.backend()
    for warning in (
        shape_warning(backend, lm_data.LmBatching()),
        base.piece_squares_warning(
            backend,
            base.bound_value("lm_config.piece_squares"),
            PIECE_SQUARES_BINDING,
        ),
    ):
      if warning:
        logging.warning(warning)
    return super().train_dataset(input_context)

  def compile(self, model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=perplexity_lib.masked_mean_nll,
        metrics=[perplexity_lib.Perplexity(), perplexity_lib.TokenCount()],
    )

  def to_keras(self, inputs, targets, weights):
    return _to_keras(inputs, targets, weights)

  def evaluate(self, model, split, model_dir, plot=False, **options):
    """Exact-softmax perplexity and expert statistics of one split.

    Args:
      model: the LM (restored).
      split: label of the split (for file names and the report).
      model_dir: where PNGs go with `plot`.
      plot: also write `DIR/experts_<split>_<layer>.png` per MoE layer.
      **options: unused.

    Returns:
      dict: split, perplexity, mean_nll, tokens, sentences, words_per_sec,
      num_batches, experts ({layer: statistics}), plots (paths).

    Raises:
      ValueError: the data has no evaluation split.
    """
    del options
    dataset = self.eval_dataset()
    if dataset is None:
      raise ValueError("the data has no evaluation split (EVAL_FILES)")
    accumulator = perplexity_lib.PerplexityAccumulator()
    sentences = 0
    start = time.time()
    num_batches = 0
    for x, weights in dataset:
      x = keras.tree.map_structure(np.asarray, x)  # any backend
      nll = model.predict_on_batch(x)
      w = np.asarray(weights)
      accumulator.add(nll, w)
      sentences += int(np.sum(w[:, 0] > 0))
      num_batches += 1
    elapsed = time.time() - start
    if accumulator.tokens == 0:
      raise ValueError(f"the {split} split is empty: no target tokens")
    stats = expert_stats.collect_expert_stats(
        distribution_lib.Distribution.unwrap(model),
        dataset,
        max_batches=self.stats_batches,
    )
    result = {
        "split": split,
        "perplexity": accumulator.perplexity,
        "mean_nll": accumulator.mean_nll,
        "tokens": int(accumulator.tokens),
        "sentences": sentences,
        "num_batches": num_batches,
        "words_per_sec": accumulator.tokens / max(elapsed, 1e-9),
        "experts": stats,
    }
    result.update(self._data_quality())
    if plot and stats:
      result["plots"] = expert_stats.plot_expert_stats(
          stats, model_dir, prefix=f"experts_{split}"
      )
    logging.info(
        "%s: perplexity %.3f over %d tokens, unk_rate %.4f",
        split,
        result["perplexity"],
        result["tokens"],
        result.get("unk_rate", float("nan")),
    )
    return result

  def _data_quality(self):
    """unk_rate / invalid_utf8_rate (+ counts) of the eval split's first pass.

    (The pipeline's own log line warns when either is above
    `batching.BAD_DATA_RATE`.)
    """
    pipeline = self.data.stats.get(f"{self.data.name}/eval")
    if pipeline is None or not pipeline.epochs:
      return {}
    record = pipeline.epochs[0]
    rates = batching.quality_rates(record)
    return dict(
        rates,
        unk_tokens=record[batching.STAT_UNK],
        invalid_utf8_lines=record[batching.STAT_INVALID_UTF8],
    )
