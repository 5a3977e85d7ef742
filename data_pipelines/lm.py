"""Word-level language-model batches from one-sentence-per-line text.

Every LM corpus (1B Word, sharded news, Penn Treebank, your own files) ends up
in `lm_dataset`, which turns a dataset of text lines into batches for
`model.fit`:

  (inputs int32 [B, T], targets int32 [B, T], weights float32 [B, T])

Sentence scheme (1B Word convention, used for every corpus including PTB):
a line with words w1..wn becomes

  inputs  = <S> w1 ... wn
  targets = w1 ... wn </S>

so `T = n + 1`, every word and the end of sentence are predicted, and `<S>`
is never a target. Padding uses id `PAD_ID` = 0 (which is also `<S>` in
vocabularies built here) with weight 0: models must use `weights` (also the
input mask: position t is real iff weights[b, t] == 1) rather than
`mask_zero`. Perplexity = exp(sum(loss * weights) / sum(weights)).

Modes:
* 'sentences' (default): one sentence per row, batches by token budget
  (`B * T <= batch_tokens`) over length-sorted windows, longer sentences
  dropped or truncated to `max_length` (= n + 1) as configured.
  With `fill_rows`, every batch is padded with empty rows (weight 0) to
  `batch_tokens // T` rows, so that its shape depends on T alone: with
  `length_multiple` m there are at most ceil(max_length / m) shapes, which
  is what XLA (the JAX backend) compiles a step for each of. The PTB main
  job's 1600 steps have 137 shapes; 19 with m = 16; 6 with m = 16 and
  `fill_rows`.
* 'packed': sentences (with their <S>/</S>) are concatenated into one stream
  cut into rows of `pack_length` tokens, `B = batch_tokens // pack_length`
  rows per batch; only the final batch of an epoch has padding. Rows are not
  carried over between batches (no stateful RNN assumption).

Per-epoch counts (lines, empty lines skipped, invalid UTF-8 lines replaced
with U+FFFD, too-long sentences dropped / truncated, <UNK> tokens, target
tokens) are logged once per epoch and kept in `LmData.stats`.

Every batching option is a field of `LmBatching` (gin `lm_batching`), one
value for every LM corpus; a corpus function (`ptb_lm_data`, ...) says where
its lines come from and what its vocabulary is, and passes that value on.
"""

import dataclasses
from typing import Callable, Dict, Optional

import gin
import tensorflow as tf

from data_pipelines import batching
from data_pipelines import text_io
from data_pipelines import word_vocab as word_vocab_lib
from data_pipelines.errors import DataError

PAD_ID = 0
MODE_SENTENCES = "sentences"
MODE_PACKED = "packed"
MODES = (MODE_SENTENCES, MODE_PACKED)
OUTPUT_KERAS = batching.OUTPUT_KERAS
OUTPUT_DICT = batching.OUTPUT_DICT
OUTPUT_FORMATS = batching.OUTPUT_FORMATS
DEFAULT_LINE_SHUFFLE_BUFFER = batching.DEFAULT_LINE_SHUFFLE_BUFFER

# (input_context, training, seed) -> dataset of scalar tf.string lines for one
# input pipeline (already sharded, files shuffled when training).
LineSource = Callable[
    [Optional[tf.distribute.InputContext], bool, int], tf.data.Dataset
]


@gin.configurable("lm_batching")
@dataclasses.dataclass(frozen=True)
class LmBatching(batching.Batching):
  """Batching options of every LM corpus (gin: `lm_batching.<field>`).

  The fields of `data_pipelines.batching.Batching`, where max_length is the
  maximum T (= words + 1) in 'sentences' mode, and:

  Attributes:
    mode: 'sentences' or 'packed' (see the module docstring).
    pack_length: T in 'packed' mode.
    fill_rows: 'sentences' mode: pad each batch to batch_tokens // T rows
      (or max_batch_size) with empty rows of weight 0, so that a batch's
      shape is a function of its T.
  """

  GIN_NAME = "lm_batching"

  mode: str = MODE_SENTENCES
  pack_length: int = 64
  fill_rows: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")
    if not isinstance(self.fill_rows, bool):
      raise ValueError(f"fill_rows={self.fill_rows!r}; expected True or False")


@dataclasses.dataclass
class LmData:
  """What a language-model experiment needs from the data.

  Attributes:
    name: corpus label used in logs.
    vocab: the word vocabulary (vocab.size = softmax size).
    train_dataset: (input_context=None) -> tf.data.Dataset of batches; pass
      it to `strategy.distribute_datasets_from_function` for multi-replica.
    eval_dataset: same for the evaluation split, or None.
    stats: PipelineStats of every dataset built so far, by 'name/split'.
  """

  name: str
  vocab: word_vocab_lib.WordVocab
  train_dataset: Callable[..., tf.data.Dataset]
  eval_dataset: Optional[Callable[..., tf.data.Dataset]]
  stats: Dict[str, batching.PipelineStats] = dataclasses.field(
      default_factory=dict
  )


def _window_sentences(
    lines: tf.Tensor,
    *,
    table: tf.lookup.StaticHashTable,
    vocab: word_vocab_lib.WordVocab,
    spec: batching.BatchSpec,
    mode: str,
):
  """Cleans, looks up, filters and sorts one window of lines.

  Args:
    lines: tf.string [n].
    table: word -> id table.
    vocab: the vocabulary (special ids).
    spec: batching parameters.
    mode: MODE_SENTENCES or MODE_PACKED.

  Returns:
    (payload, counts[NUM_STATS]). Sentences mode payload: dict with
    'inputs'/'targets' int32 [m, Tw], 'lengths' int32 [m] (sorted
    decreasing) and 'bounds' int32 [K, 2]. Packed mode payload: dict with
    'inputs'/'targets' int32 [N] (the concatenated streams).
  """
  fixed = tf.strings.unicode_transcode(
      lines, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
  )
  invalid = tf.not_equal(fixed, lines)
  words = tf.strings.split(fixed)
  num_words = tf.cast(words.row_lengths(), tf.int32)
  nonempty = num_words > 0
  ids = tf.cast(tf.ragged.map_flat_values(table.lookup, words), tf.int32)
  lengths = num_words + 1  # <S> w1..wn  /  w1..wn </S>
  if mode == MODE_PACKED:
    too_long = tf.zeros_like(nonempty)
    keep = nonempty
    truncated = tf.zeros_like(nonempty)
  else:
    too_long = tf.logical_and(nonempty, lengths > spec.max_length)
    keep, truncated = batching.length_policy_masks(
        nonempty, too_long, spec.length_policy
    )
    if spec.length_policy == batching.LENGTH_POLICY_TRUNCATE:
      ids = ids[:, : spec.max_length - 1]
  ids = tf.ragged.boolean_mask(ids, keep)
  m = ids.nrows(out_type=tf.int32)
  kept_lengths = tf.cast(ids.row_lengths(), tf.int32) + 1
  counts = batching.stats_vector(
      lines=tf.size(lines),
      empty_skipped=tf.reduce_sum(tf.cast(tf.logical_not(nonempty), tf.int64)),
      invalid_utf8_replaced=tf.reduce_sum(tf.cast(invalid, tf.int64)),
      too_long_dropped=tf.reduce_sum(
          tf.cast(tf.logical_and(too_long, tf.logical_not(keep)), tf.int64)
      ),
      too_long_truncated=tf.reduce_sum(tf.cast(truncated, tf.int64)),
      examples=m,
      target_tokens=tf.reduce_sum(kept_lengths),
      unk_tokens=tf.reduce_sum(
          tf.cast(tf.equal(ids.flat_values, vocab.unk_id), tf.int64)
      ),
  )
  bos = tf.fill([m, 1], vocab.bos_id)
  eos = tf.fill([m, 1], vocab.eos_id)
  inputs = tf.concat([bos, ids], axis=1)
  targets = tf.concat([ids, eos], axis=1)
  if mode == MODE_PACKED:
    return {
        "inputs": inputs.flat_values,
        "targets": targets.flat_values,
    }, counts
  order = batching.sort_order(kept_lengths)
  sorted_lengths = tf.gather(kept_lengths, order)
  width = batching.padded_width(sorted_lengths, spec.length_multiple)
  payload = {
      "inputs": batching.sorted_padded(inputs, order, width, PAD_ID),
      "targets": batching.sorted_padded(targets, order, width, PAD_ID),
      "lengths": sorted_lengths,
      "bounds": spec.batch_bounds(sorted_lengths),
  }
  return payload, counts


def _format(inputs, targets, weights, output_format):
  if output_format == OUTPUT_KERAS:
    return inputs, targets, weights
  return {"inputs": inputs, "targets": targets, "weights": weights}


def lm_dataset(
    lines: tf.data.Dataset,
    vocab: word_vocab_lib.WordVocab,
    options: LmBatching,
    *,
    training: bool = True,
    input_context: Optional[tf.distribute.InputContext] = None,
    stats: Optional[batching.PipelineStats] = None,
) -> tf.data.Dataset:
  """Batches text lines for a word-level language model.

  Args:
    lines: dataset of scalar tf.string lines (already sharded for this input
      pipeline).
    vocab: word vocabulary with <S>, </S>, <UNK>.
    options: the batching options, resolved (`LmBatching.resolve`); the
      budget is divided by `input_context.num_replicas_in_sync`.
    training: shuffle lines and batches (seeded) and use the training
      budget, length policy and `repeat`; else the eval_* ones, once.
    input_context: tf.distribute.InputContext for the budget split.
    stats: receives per-epoch counts (a new one is made if None).

  Returns:
    Dataset of batches: inputs int32 [B, T], targets int32 [B, T], weights
    float32 [B, T] (1.0 on real tokens, 0.0 on padding); a dict
    {'inputs', 'targets', 'weights'} with output_format='dict'.
  """
  options = options.for_split(training)
  mode, pack_length, output_format = (
      options.mode,
      options.pack_length,
      options.output_format,
  )
  spec = options.spec(
      input_context, max_length=None if mode == MODE_SENTENCES else pack_length
  )
  stats = stats or batching.PipelineStats("lm")
  table = vocab.lookup_table()
  lines = options.shuffle_lines(lines, training)
  windows = lines.batch(spec.window_lines).map(
      lambda window: _window_sentences(
          window, table=table, vocab=vocab, spec=spec, mode=mode
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=options.deterministic,
  )
  windows = batching.count_and_log(windows, stats)

  if mode == MODE_SENTENCES:

    def _make_batch(window, start, end):
      width = batching.round_up(window["lengths"][start], spec.length_multiple)
      inputs = window["inputs"][start:end, :width]
      targets = window["targets"][start:end, :width]
      weights = tf.sequence_mask(
          window["lengths"][start:end], width, dtype=tf.float32
      )
      if options.fill_rows:
        # The rows batch_bounds gave this width, at most; the rest empty.
        rows = batching.rows_per_batch(
            width, spec.batch_tokens, spec.max_batch_size
        )
        pad = [[0, rows - (end - start)], [0, 0]]
        inputs = tf.pad(inputs, pad, constant_values=PAD_ID)
        targets = tf.pad(targets, pad, constant_values=PAD_ID)
        weights = tf.pad(weights, pad)
      return _format(inputs, targets, weights, output_format)

    batches = batching.emit_batches(windows, _make_batch)
  else:
    rows = max(spec.batch_tokens // pack_length, 1)
    if spec.max_batch_size:
      rows = min(rows, spec.max_batch_size)
    size = rows * pack_length

    def _pack(stream):
      n = tf.shape(stream["inputs"])[0]
      pad = [[0, size - n]]
      inputs = tf.reshape(tf.pad(stream["inputs"], pad), [rows, pack_length])
      targets = tf.reshape(tf.pad(stream["targets"], pad), [rows, pack_length])
      weights = tf.reshape(
          tf.sequence_mask(n, size, dtype=tf.float32), [rows, pack_length]
      )
      return _format(inputs, targets, weights, output_format)

    batches = windows.rebatch(size).map(_pack)
  return options.finish(batches, training, repeat=options.repeat)


def resolve_word_vocab(
    *,
    vocab_file: Optional[str],
    create_vocab_if_missing: bool,
    count_words: Callable[[], Dict[str, int]],
    min_count: int,
    max_size: Optional[int],
    expected_size: Optional[int],
    exclude=(),
) -> word_vocab_lib.WordVocab:
  """Loads, or builds (and optionally saves), a word vocabulary.

  Args:
    vocab_file: path of the vocabulary file, or None to build in memory.
    create_vocab_if_missing: build and save `vocab_file` if it is missing.
    count_words: () -> word counts of the training data (may be slow).
    min_count: keep words seen at least this often when building.
    max_size: optional size cap when building.
    expected_size: if given, the loaded / built vocab must have this size.
    exclude: words never added when building.

  Returns:
    The vocabulary.

  Raises:
    DataError: missing file (and not allowed to create), or size mismatch.
  """
  if vocab_file and tf.io.gfile.exists(vocab_file):
    return word_vocab_lib.WordVocab.load(
        vocab_file, expected_size=expected_size
    )
  if vocab_file and not create_vocab_if_missing:
    # Raises the one-line missing-file error.
    return word_vocab_lib.WordVocab.load(
        vocab_file, expected_size=expected_size
    )
  vocab = word_vocab_lib.WordVocab.from_counts(
      count_words(), min_count=min_count, max_size=max_size, exclude=exclude
  )
  if expected_size is not None and vocab.size != expected_size:
    raise DataError(
        f"built word vocabulary has {vocab.size} entries but {expected_size}"
        " were expected (different training files or min_count?)"
    )
  if vocab_file:
    vocab.save(vocab_file)
  return vocab


def make_lm_data(
    *,
    name: str,
    vocab: word_vocab_lib.WordVocab,
    train_lines: LineSource,
    eval_lines: Optional[LineSource],
    options: LmBatching,
) -> LmData:
  """Wires line sources and the (resolved) batching options into an LmData."""
  data = LmData(name=name, vocab=vocab, train_dataset=None, eval_dataset=None)

  def _builder(split, source, training):
    def _build(input_context: Optional[tf.distribute.InputContext] = None):
      stats = batching.PipelineStats(f"{name}/{split}")
      data.stats[stats.name] = stats
      lines = source(input_context, training, options.seed)
      return lm_dataset(
          lines,
          vocab,
          options,
          training=training,
          input_context=input_context,
          stats=stats,
      )

    return _build

  data.train_dataset = _builder("train", train_lines, True)
  if eval_lines is not None:
    data.eval_dataset = _builder("eval", eval_lines, False)
  return data


def file_line_source(
    files,
    *,
    cycle_length: int = text_io.DEFAULT_CYCLE_LENGTH,
    deterministic: bool = True,
) -> LineSource:
  """A LineSource reading (and sharding) a list of text files."""

  def _source(input_context, training, seed):
    return text_io.line_dataset(
        files,
        input_context=input_context,
        shuffle_files=training,
        seed=seed,
        cycle_length=cycle_length,
        deterministic=deterministic,
    )

  return _source


def memory_line_source(lines) -> LineSource:
  """A LineSource over an in-memory list of str lines (sharded by line)."""
  tensor = tf.constant(list(lines), tf.string)

  def _source(input_context, training, seed):
    del training, seed
    ds = tf.data.Dataset.from_tensor_slices(tensor)
    if input_context is not None and input_context.num_input_pipelines > 1:
      ds = ds.shard(
          input_context.num_input_pipelines, input_context.input_pipeline_id
      )
    return ds

  return _source


def files_lm_data(
    *,
    name: str,
    train_files,
    eval_files,
    layout: str,
    vocab_file: Optional[str],
    create_vocab_if_missing: bool,
    min_count: int,
    max_vocab_size: Optional[int],
    expected_vocab_size: Optional[int],
    vocab_max_files: Optional[int],
    cycle_length: int,
    options: LmBatching,
) -> LmData:
  """LmData over text files: resolves globs, gets the vocab, wires sources.

  Args:
    name: corpus label used in logs and errors.
    train_files: glob(s) of training files.
    eval_files: glob(s) of evaluation files, or None.
    layout: description of the expected layout (for errors).
    vocab_file, create_vocab_if_missing, min_count, max_vocab_size,
      expected_vocab_size: see `resolve_word_vocab`.
    vocab_max_files: count words on only the first N training files (sorted)
      when building the vocabulary; None counts all.
    cycle_length: files read concurrently.
    options: the resolved batching options.

  Returns:
    LmData.
  """
  train = text_io.resolve_files(
      train_files, what=f"{name} training files", expected_layout=layout
  )
  evals = None
  if eval_files:
    evals = text_io.resolve_files(
        eval_files, what=f"{name} evaluation files", expected_layout=layout
    )
  count_files = train[:vocab_max_files] if vocab_max_files else train
  vocab = resolve_word_vocab(
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      count_words=lambda: word_vocab_lib.count_words_in_files(
          count_files,
          what=f"{name}: counting words of {len(count_files)} training files",
      ),
      min_count=min_count,
      max_size=max_vocab_size,
      expected_size=expected_vocab_size,
  )
  deterministic = options.deterministic
  return make_lm_data(
      name=name,
      vocab=vocab,
      train_lines=file_line_source(
          train, cycle_length=cycle_length, deterministic=deterministic
      ),
      eval_lines=file_line_source(
          evals, cycle_length=cycle_length, deterministic=deterministic
      )
      if evals
      else None,
      options=options,
  )
