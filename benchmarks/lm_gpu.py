r"""The LM grid on a machine without TensorFlow: JAX, e.g. a lent GPU.

Issue 13's extra table: the Debian docs language models at the paper's
width (512) on a GPU, where the device has JAX but no TensorFlow (so no
tf.data and no `moe_keras.train`). Two steps:

  # here (TensorFlow present; the corpus built): the corpus as token ids
  python benchmarks/lm_gpu.py --mode=export --arrays=gpu_data/debian_docs_lm.npz
  # there (JAX only; gpu_data/ carried): the grid, results as JSON summaries
  KERAS_BACKEND=jax python benchmarks/lm_gpu.py --mode=train \
    --arrays=gpu_data/debian_docs_lm.npz --configs=4xlstm_128,moe_32 \
    --seeds=0,1 --lrs=4e-3 --train_steps=2000 --steps_per_eval=250 \
    --gin_bindings="MODEL_DIM = 512" \
    --gin_bindings="moe_spec.expert_hidden_dim = 1024" \
    --results_dir=results/lm_debian_docs_gpu512 --time_budget_s=480

(`bash benchmarks/gpu_lm.sh` is the second command as one device call.)

The models, optimizer and schedule are the CPU grid's: the same gin files
(gin/lm/debian_docs/NAME.gin, NAME@VARIANT with `results_lib.VARIANTS`, the
bindings of `results_lib.run_bindings`), parsed with `skip_unknown` so that
the TensorFlow-only modules they import (the task, the tf.data pipeline)
are skipped; the loss and metrics are `eval.perplexity`'s. What differs is
the batching, which must have one static shape for XLA: 'packed' rows as
in `data_pipelines.lm` (MODE_PACKED), each sentence `<S> w1 .. wn` as
inputs and `w1 .. wn </S>` as targets, concatenated in a seeded random
order per epoch (seed = the run's seed, as the CPU grid binds
lm_batching.seed) and cut into [rows, pack_length] batches; an epoch's
last partial batch is dropped. Dev and test are read in file order as
packed rows, the last batch padded with zero weights, with the exact
softmax. So the perplexities are of packed streams (the LSTMs carry state
across sentence boundaries within a row) and compare with each other, not
with the CPU tables' sentence batches.

Each finished run writes `results_dir/runs/<run_id>.json` in the format of
`results_lib.execute`'s summaries (curve of dev perplexity against training
tokens and seconds, test perplexity, budget), so
`benchmarks/lm_results.py --results_dir=... --mode=table` prints the full
tables and plots from them on any machine; this script prints the test
table and the margins along training itself. A run that fails (e.g. a
kernel the GPU does not take) is reported in one line and the grid goes
on; `--time_budget_s` skips the runs that would not finish in time.
"""

import json
import logging
import os
import sys
import time
import zipfile

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import lm_corpora  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras import atomic_file  # pylint: disable=g-import-not-at-top,wrong-import-position

ARRAYS_FORMAT = 1
SPLITS = ("train", "valid", "test")
DEFAULT_ARRAYS = "gpu_data/debian_docs_lm.npz"
# The corpus lm_results.py trains on this machine (its build is read from
# the export here, not from the manifest).
CORPUS = lm_corpora.CORPORA["debian_docs"]
# Modules whose gin configurables the LM needs (the gin files' other
# imports are TensorFlow-only and skipped).
GIN_MODULES = (
    "moe_keras.models.blocks",
    "moe_keras.models.lm",
    "moe_keras.optimizers.factory",
    "moe_keras.schedules",
)

FLAGS = flags.FLAGS


def define_flags():
  """Defines the flags; only when run as a program, so that importing this
  module (the tests do) defines none that could clash with another's."""
  flags.DEFINE_enum("mode", "train", ["export", "train"], "What to do.")
  flags.DEFINE_string("arrays", DEFAULT_ARRAYS, "The exported corpus (.npz).")
  flags.DEFINE_string(
      "cache_dir",
      "~/.cache/moe_keras/debian_docs",
      "export: the built corpus (`python -m"
      " data_pipelines.build_debian_docs_corpus`).",
  )
  flags.DEFINE_list("configs", ["4xlstm_128", "moe_32"], "NAME[@VARIANT]s.")
  results_flags.define_seed_and_rate_flags(
      seeds=["0"],
      lrs=["4e-3"],
      seeds_help="Seeds (init and data order).",
      lrs_help="Peak learning rates (each config at each).",
  )
  flags.DEFINE_integer("train_steps", 1000, "Steps per run.", lower_bound=1)
  flags.DEFINE_integer(
      "steps_per_eval", 250, "Dev evaluation period.", lower_bound=1
  )
  flags.DEFINE_integer("rows", 128, "Rows per training batch.", lower_bound=1)
  flags.DEFINE_integer("pack_length", 64, "Timesteps per row.", lower_bound=2)
  flags.DEFINE_integer(
      "eval_rows", None, "Rows per evaluation batch (default --rows)."
  )
  flags.DEFINE_multi_string(
      "gin_bindings", [], "Extra bindings for every run (e.g. MODEL_DIM = 512)."
  )
  flags.DEFINE_string(
      "results_dir",
      "results/lm_debian_docs_gpu512",
      "Summaries go to results_dir/runs/.",
  )
  flags.DEFINE_float(
      "time_budget_s",
      0.0,
      "Skip a run that the previous run's duration says would end past this"
      " many seconds from the start (0: no budget).",
  )
  flags.DEFINE_enum(
      "dtype_policy",
      "float32",
      ["float32", "mixed_bfloat16"],
      "Keras dtype policy of the models.",
  )


class LmGpuError(ValueError):
  """A bad request (one-line message)."""


def _split_ids(path, vocab):
  """(ids uint16 [W], offsets int64 [S + 1]) of one split's sentences.

  Args:
    path: one sentence per line (empty lines are skipped, as the pipeline
      does).
    vocab: `data_pipelines.word_vocab.WordVocab`.

  Returns:
    The words of every sentence in file order, and where each starts.
  """
  from data_pipelines import word_vocab  # pylint: disable=g-import-not-at-top

  ids, offsets = [], [0]
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      words = word_vocab.split_words(line)
      if words:
        ids.extend(vocab.encode(words))
        offsets.append(len(ids))
  return np.asarray(ids, np.uint16), np.asarray(offsets, np.int64)


def export_arrays(cache_dir, path):
  """Writes the built corpus's splits as token ids (atomically).

  Args:
    cache_dir: the corpus of `build_debian_docs` (train/valid/test.txt,
      vocab.txt).
    path: the .npz to write.

  Returns:
    dict: sentences and words per split, and the vocabulary size.

  Raises:
    LmGpuError: the corpus is not built or its vocabulary does not fit in
      uint16.
  """
  from data_pipelines import word_vocab  # pylint: disable=g-import-not-at-top

  cache_dir = os.path.expanduser(cache_dir)
  files = {s: os.path.join(cache_dir, f"{s}.txt") for s in SPLITS}
  vocab_file = os.path.join(cache_dir, "vocab.txt")
  for name in list(files.values()) + [vocab_file]:
    if not os.path.exists(name):
      raise LmGpuError(
          f"{name} does not exist: build the corpus first (python -m"
          " data_pipelines.build_debian_docs_corpus)"
      )
  vocab = word_vocab.WordVocab.load(vocab_file)
  if vocab.size > np.iinfo(np.uint16).max + 1:
    raise LmGpuError(f"vocabulary of {vocab.size} does not fit in uint16")
  build = results_lib.build_hash([os.path.join(cache_dir, "manifest.json")])
  arrays = {
      "format": np.asarray(ARRAYS_FORMAT),
      "corpus_build": np.asarray(build or ""),
      "vocab_size": np.asarray(vocab.size),
      "bos_id": np.asarray(vocab.bos_id),
      "eos_id": np.asarray(vocab.eos_id),
  }
  report = {"vocab_size": vocab.size, "corpus_build": build}
  for split, name in files.items():
    ids, offsets = _split_ids(name, vocab)
    arrays[f"{split}_ids"] = ids
    arrays[f"{split}_offsets"] = offsets
    report[split] = {"sentences": len(offsets) - 1, "words": len(ids)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp):
    with open(tmp, "wb") as f:  # a file object: no ".npz" appended
      np.savez_compressed(f, **arrays)

  atomic_file.write_atomic(path, write)
  return report


def load_arrays(path):
  """The exported corpus as a dict of numpy arrays.

  Raises:
    LmGpuError: missing, unreadable (empty, truncated) or another format.
  """
  if not os.path.exists(path):
    raise LmGpuError(
        f"{path} does not exist: export it with `python"
        f" benchmarks/lm_gpu.py --mode=export --arrays={path}`"
    )
  try:
    with np.load(path) as data:
      arrays = {key: data[key] for key in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise LmGpuError(
        f"{path} is not a readable .npz export ({type(e).__name__}); export"
        " it again"
    ) from None
  if int(arrays.get("format", -1)) != ARRAYS_FORMAT:
    raise LmGpuError(
        f"{path} is not an export of format {ARRAYS_FORMAT}; export it again"
    )
  return arrays


def packed_stream(ids, offsets, order, bos_id, eos_id):
  """The packed (inputs, targets) of the sentences in `order`.

  Sentence s (words ids[offsets[s]:offsets[s+1]]) gives inputs
  `<S> w1 .. wn` and targets `w1 .. wn </S>`; the sentences follow each
  other in `order` (MODE_PACKED of `data_pipelines.lm`).

  Args:
    ids: uint16 [W], every sentence's words.
    offsets: int64 [S + 1].
    order: int [S'], sentence indices.
    bos_id: id of <S>.
    eos_id: id of </S>.

  Returns:
    (inputs, targets), int32 [sum over order of (n_s + 1)] each.
  """
  order = np.asarray(order, np.int64)
  words = offsets[order + 1] - offsets[order]
  lengths = words + 1
  total = int(lengths.sum())
  starts = np.cumsum(lengths) - lengths
  sentence = np.repeat(order, lengths)
  position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
  first = offsets[sentence]
  last = np.repeat(words, lengths)
  word_ids = ids.astype(np.int32)
  inputs = np.where(
      position == 0, bos_id, word_ids[np.maximum(first + position - 1, 0)]
  )
  targets = np.where(
      position == last,
      eos_id,
      word_ids[np.minimum(first + position, len(ids) - 1)],
  )
  return inputs.astype(np.int32), targets.astype(np.int32)


class TrainBatches:
  """Step -> [rows, pack_length] training batch, epochs in seeded orders.

  Epoch e concatenates the training sentences in the permutation of
  `np.random.default_rng([seed, e])` and is cut into whole batches (the
  last partial one dropped); step i is the i-th batch of the sequence of
  epochs, so a run's data is a function of (seed, step) alone.
  """

  def __init__(self, arrays, seed, rows, pack_length):
    self._arrays = arrays
    self._seed = seed
    self._rows = rows
    self._length = pack_length
    num_tokens = len(arrays["train_ids"]) + len(arrays["train_offsets"]) - 1
    self.batches_per_epoch = num_tokens // (rows * pack_length)
    if self.batches_per_epoch < 1:
      raise LmGpuError(
          f"the training split has {num_tokens} tokens, fewer than one batch"
          f" of {rows} x {pack_length}"
      )
    self._epoch = None
    self._stream = None

  def _epoch_stream(self, epoch):
    if epoch != self._epoch:
      offsets = self._arrays["train_offsets"]
      order = np.random.default_rng([self._seed, epoch]).permutation(
          len(offsets) - 1
      )
      self._stream = packed_stream(
          self._arrays["train_ids"],
          offsets,
          order,
          int(self._arrays["bos_id"]),
          int(self._arrays["eos_id"]),
      )
      self._epoch = epoch
    return self._stream

  def batch(self, step):
    """({'inputs', 'targets', 'weights'}, weights) of one step."""
    epoch, index = divmod(step, self.batches_per_epoch)
    size = self._rows * self._length
    inputs, targets = self._epoch_stream(epoch)
    shape = (self._rows, self._length)
    x = {
        "inputs": inputs[index * size : (index + 1) * size].reshape(shape),
        "targets": targets[index * size : (index + 1) * size].reshape(shape),
        "weights": np.ones(shape, np.float32),
    }
    return x, x["weights"]


def eval_batches(arrays, split, rows, pack_length):
  """The whole split in file order as packed [rows, pack_length] batches.

  Returns:
    (x dict of [B, T] arrays, weights [B, T]); B a multiple of rows, the
    padding rows' and tail's weights 0.
  """
  offsets = arrays[f"{split}_offsets"]
  inputs, targets = packed_stream(
      arrays[f"{split}_ids"],
      offsets,
      np.arange(len(offsets) - 1),
      int(arrays["bos_id"]),
      int(arrays["eos_id"]),
  )
  size = rows * pack_length
  padded = -(-len(inputs) // size) * size
  weights = np.zeros(padded, np.float32)
  weights[: len(inputs)] = 1.0
  pad = lambda a: np.pad(a, (0, padded - len(a))).reshape(-1, pack_length)
  x = {
      "inputs": pad(inputs),
      "targets": pad(targets),
      "weights": weights.reshape(-1, pack_length),
  }
  return x, x["weights"]


def build_run_model(run, vocab_size, bindings):
  """The compiled LM of one run, configured by its gin file and bindings.

  Args:
    run: results_lib.Run (its config's gin file, its seed).
    vocab_size: V.
    bindings: every gin binding of the run.

  Returns:
    keras.Model compiled with the optimizer and schedule gin configures,
    the masked mean NLL loss and the perplexity metric.
  """
  import importlib  # pylint: disable=g-import-not-at-top

  import gin  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top

  for module in GIN_MODULES:
    importlib.import_module(module)
  from eval import perplexity  # pylint: disable=g-import-not-at-top
  from moe_keras.models import lm  # pylint: disable=g-import-not-at-top
  from moe_keras.optimizers import factory  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  # gin logs (with a traceback) each TensorFlow-only import it skips.
  root_logger = logging.getLogger()
  level = root_logger.level
  root_logger.setLevel(logging.WARNING)
  try:
    gin.parse_config_files_and_bindings(
        [results_lib.gin_file(CORPUS, run.config)],
        bindings,
        skip_unknown=True,
    )
  finally:
    root_logger.setLevel(level)
  keras.utils.set_random_seed(run.seed)
  model = lm.build_lm(vocab_size)
  model.compile(
      optimizer=factory.make_optimizer(),
      loss=perplexity.masked_mean_nll,
      metrics=[perplexity.Perplexity()],
  )
  return model


def _perplexity(model, batches, rows):
  x, y = batches
  result = model.evaluate(x, y, batch_size=rows, verbose=0, return_dict=True)
  return float(result["perplexity"])


def train_run(run, arrays, options):
  """Trains and evaluates one run; returns its summary (results format).

  Args:
    run: results_lib.Run.
    arrays: from `load_arrays`.
    options: dict with rows, pack_length, eval_rows, steps_per_eval,
      gin_bindings.

  Returns:
    dict: the fields of `results_lib.execute`'s summaries.
  """
  import keras  # pylint: disable=g-import-not-at-top

  rows, length = options["rows"], options["pack_length"]
  eval_rows = options["eval_rows"] or rows
  bindings = results_lib.run_bindings(
      CORPUS, run, options["steps_per_eval"]
  ) + list(options["gin_bindings"])
  model = build_run_model(run, int(arrays["vocab_size"]), bindings)
  train = TrainBatches(arrays, run.seed, rows, length)
  dev = eval_batches(arrays, "valid", eval_rows, length)
  curve, train_seconds, step = [], 0.0, 0
  process_start = time.process_time()
  while step < run.steps:
    n = min(options["steps_per_eval"], run.steps - step)
    start = step
    generator = (train.batch(i) for i in range(start, start + n))
    began = time.perf_counter()
    history = model.fit(
        generator, steps_per_epoch=n, epochs=1, verbose=0, shuffle=False
    )
    train_seconds += time.perf_counter() - began
    step += n
    point = {
        "step": step,
        "tokens": float(step * rows * length),
        "train_seconds": train_seconds,
        "dev_perplexity": _perplexity(model, dev, eval_rows),
        "train_loss": float(history.history["loss"][-1]),
    }
    curve.append(point)
    print(
        f"{run.run_id}: step {step} dev {point['dev_perplexity']:.2f}"
        f" ({train_seconds:.0f} s)",
        flush=True,
    )
  test = _perplexity(
      model, eval_batches(arrays, "test", eval_rows, length), eval_rows
  )
  import jax  # pylint: disable=g-import-not-at-top

  return {
      "run_id": run.run_id,
      "config": run.config,
      "lr": run.lr,
      "seed": run.seed,
      "steps": run.steps,
      "gin_file": os.path.relpath(
          results_lib.gin_file(CORPUS, run.config), results_lib.REPO
      ),
      "bindings": bindings,
      "tokens": curve[-1]["tokens"],
      "train_seconds": train_seconds,
      "final_dev_perplexity": curve[-1]["dev_perplexity"],
      "test": {
          "perplexity": test,
          # Every sentence's words and its </S>.
          "tokens": len(arrays["test_ids"]) + len(arrays["test_offsets"]) - 1,
      },
      "curve": curve,
      "code": results_lib.code_version(),
      "corpus_build": str(arrays.get("corpus_build", "")) or None,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "process_seconds": time.process_time() - process_start,
      "backend": keras.backend.backend(),
      "device": str(jax.devices()[0].device_kind),
      "batching": {"mode": "packed", "rows": rows, "pack_length": length},
  }


def _grid_runs():
  lrs = [float(lr) for lr in FLAGS.lrs]  # validated when parsed
  seeds = [int(seed) for seed in FLAGS.seeds]
  try:
    results_lib.check_configs(CORPUS, FLAGS.configs)
  except results_lib.GridError as e:
    raise LmGpuError(str(e)) from None
  return [
      results_lib.Run(config, lr, seed, FLAGS.train_steps)
      for lr in lrs
      for config in FLAGS.configs
      for seed in seeds
  ]


def run_grid():
  """Trains every run of the flags' grid not yet summarized; prints tables."""
  runs = _grid_runs()
  if os.environ.get("KERAS_BACKEND", "") != "jax":
    raise LmGpuError("--mode=train runs on KERAS_BACKEND=jax")
  import keras  # pylint: disable=g-import-not-at-top

  import gin  # pylint: disable=g-import-not-at-top

  keras.mixed_precision.set_dtype_policy(FLAGS.dtype_policy)
  # The gin files include each other by paths from the repository root.
  gin.add_config_file_search_path(REPO)
  arrays = load_arrays(FLAGS.arrays)
  options = {
      "rows": FLAGS.rows,
      "pack_length": FLAGS.pack_length,
      "eval_rows": FLAGS.eval_rows,
      "steps_per_eval": FLAGS.steps_per_eval,
      "gin_bindings": FLAGS.gin_bindings,
  }
  start, last_duration = time.perf_counter(), 0.0
  for run in runs:
    if results_lib.load_summary(FLAGS.results_dir, run) is not None:
      print(f"{run.run_id}: finished earlier")
      continue
    elapsed = time.perf_counter() - start
    if FLAGS.time_budget_s and elapsed + last_duration > FLAGS.time_budget_s:
      print(f"{run.run_id}: skipped, would end past --time_budget_s")
      continue
    began = time.perf_counter()
    try:
      summary = train_run(run, arrays, options)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{run.run_id}: failed: {type(e).__name__}: {str(e)[:300]}")
      continue
    last_duration = time.perf_counter() - began
    results_lib.write_summary(FLAGS.results_dir, run, summary)
    print(f"{run.run_id}: test perplexity {summary['test']['perplexity']:.2f}")
  _print_tables(runs)


def _print_tables(runs):
  seeds = sorted({run.seed for run in runs})
  for lr in sorted({run.lr for run in runs}):
    configs = list(dict.fromkeys(run.config for run in runs))
    rows = results_tables.collect_rows(
        FLAGS.results_dir,
        configs,
        seeds,
        FLAGS.train_steps,
        {config: lr for config in configs},
    )
    if not rows or not rows[0].summaries:
      continue
    print(f"\n## Test perplexity, lr {lr:g}, seeds {seeds}")
    print(results_tables.results_table(rows, "perplexity"))
    if len(rows) > 1:
      print("\n## Dev perplexity against the first config along training")
      print(results_tables.margin_table(rows, rows[0]))


def main(argv):
  del argv
  try:
    if FLAGS.mode == "export":
      report = export_arrays(FLAGS.cache_dir, FLAGS.arrays)
      print(json.dumps(report))
      size = os.path.getsize(FLAGS.arrays) / 2**20
      print(f"wrote {FLAGS.arrays} ({size:.1f} MiB)")
    else:
      run_grid()
  except LmGpuError as e:
    sys.exit(f"lm_gpu.py: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
