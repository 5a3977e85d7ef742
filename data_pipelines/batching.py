"""Token-budget batching, per-epoch statistics and tf.data plumbing.

Pipelines in this package process text in *windows* (chunks) of lines with
vectorized TensorFlow ops, because per-element `tf.data` function calls cost
tens of microseconds each. A window goes through:

1. a parallel `map` that cleans, tokenizes, filters and length-sorts it and
   returns per-window statistics (`STAT_*` counters);
2. `count_and_log`, a sequential `scan` that sums the counters and logs them
   once per epoch (absl logging) into a `PipelineStats` object;
3. `emit_batches`, which cuts the sorted window into token-budget batches.

Batching by token budget ("length bucketing" by sorted windows): inside a
window, examples are sorted by length, longest first (stable, so the order is
deterministic), and cut greedily: a batch starting at an example of length L
takes `batch_tokens // L` examples. Every batch therefore satisfies
`batch_size * padded_length <= batch_tokens`, neighbours in a batch have
similar lengths (little padding), and only the last batch of a window is
partial. Batches from many windows are then shuffled.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from data_pipelines.errors import DataError

# Statistics counted by every pipeline (int64 vector, in this order).
STAT_LINES = "lines"
STAT_EMPTY = "empty_skipped"
STAT_INVALID_UTF8 = "invalid_utf8_replaced"
STAT_MALFORMED = "malformed_skipped"
STAT_TOO_LONG_DROPPED = "too_long_dropped"
STAT_TOO_LONG_TRUNCATED = "too_long_truncated"
STAT_EXAMPLES = "examples"
STAT_SOURCE_TOKENS = "source_tokens"
STAT_TOKENS = "target_tokens"
STAT_UNK = "unk_tokens"
STAT_NAMES = (
    STAT_LINES,
    STAT_EMPTY,
    STAT_INVALID_UTF8,
    STAT_MALFORMED,
    STAT_TOO_LONG_DROPPED,
    STAT_TOO_LONG_TRUNCATED,
    STAT_EXAMPLES,
    STAT_SOURCE_TOKENS,
    STAT_TOKENS,
    STAT_UNK,
)
NUM_STATS = len(STAT_NAMES)

# Length policies for examples longer than `max_length`.
LENGTH_POLICY_DROP = "drop"
LENGTH_POLICY_TRUNCATE = "truncate"
LENGTH_POLICIES = (LENGTH_POLICY_DROP, LENGTH_POLICY_TRUNCATE)

# Assumed mean example length (tokens) when sizing sort windows.
ASSUMED_MEAN_LENGTH = 24
# A sort window holds about this many batches worth of lines by default.
DEFAULT_WINDOW_BATCHES = 16
MIN_WINDOW_LINES = 256
MAX_WINDOW_LINES = 1 << 17
DEFAULT_BATCH_SHUFFLE_BUFFER = 64


def stats_vector(**counts) -> tf.Tensor:
  """Builds the int64 [NUM_STATS] counter vector from keyword counts.

  Args:
    **counts: a subset of STAT_NAMES mapped to scalar integer tensors.

  Returns:
    int64 tensor of shape [NUM_STATS], zero for the names not given.
  """
  unknown = set(counts) - set(STAT_NAMES)
  if unknown:
    raise ValueError(f"unknown statistics {sorted(unknown)}")
  return tf.stack(
      [tf.cast(counts.get(name, 0), tf.int64) for name in STAT_NAMES]
  )


class PipelineStats:
  """Per-epoch counts of one input pipeline, logged once per epoch.

  Attributes:
    name: label used in log lines, e.g. 'ptb/train'.
    epochs: list of dicts (one per finished epoch) mapping STAT_NAMES to ints.
  """

  def __init__(self, name: str):
    self.name = name
    self.epochs: List[Dict[str, int]] = []

  @property
  def last(self) -> Optional[Dict[str, int]]:
    """Counts of the last finished epoch, or None."""
    return self.epochs[-1] if self.epochs else None

  def record(self, counts) -> bool:
    """Stores and logs one epoch's counts (called from tf.py_function).

    The first epoch also warns, in one line, when more than
    `BAD_DATA_RATE` of the lines had invalid UTF-8 or of the target
    tokens are <UNK>.
    """
    values = np.asarray(counts).astype(np.int64).tolist()
    record = dict(zip(STAT_NAMES, values))
    self.epochs.append(record)
    rates = quality_rates(record)
    logging.info(
        "data %s epoch %d: %s, unk_rate=%.4f, invalid_utf8_rate=%.4f",
        self.name,
        len(self.epochs),
        ", ".join(f"{k}={v}" for k, v in record.items()),
        rates["unk_rate"],
        rates["invalid_utf8_rate"],
    )
    if len(self.epochs) == 1:
      warning = bad_data_warning(self.name, rates)
      # Once per split and content (evaluate builds a split twice).
      key = (self.name, tuple(values))
      if warning and key not in _WARNED:
        _WARNED.add(key)
        logging.warning("%s", warning)
    return True


_WARNED = set()


# A split is suspicious above this fraction of invalid lines / <UNK> tokens.
BAD_DATA_RATE = 0.1


def quality_rates(record: Dict[str, int]) -> Dict[str, float]:
  """<UNK> share of the target tokens and invalid-UTF-8 share of the lines.

  Args:
    record: one epoch's counts (STAT_NAMES -> int).

  Returns:
    {"unk_rate", "invalid_utf8_rate"} (0.0 for an empty split).
  """
  return {
      "unk_rate": record[STAT_UNK] / max(record[STAT_TOKENS], 1),
      "invalid_utf8_rate": (
          record[STAT_INVALID_UTF8] / max(record[STAT_LINES], 1)
      ),
  }


def bad_data_warning(name: str, rates: Dict[str, float]) -> Optional[str]:
  """One line saying why split `name` looks wrong, or None if it does not."""
  problems = []
  if rates["invalid_utf8_rate"] > BAD_DATA_RATE:
    problems.append(
        f"{rates['invalid_utf8_rate']:.1%} of the lines are not valid UTF-8"
    )
  if rates["unk_rate"] > BAD_DATA_RATE:
    problems.append(f"{rates['unk_rate']:.1%} of the target tokens are <UNK>")
  if not problems:
    return None
  return f"data {name}: {' and '.join(problems)}; is this the right text?"


def _zeros_for_spec(spec: tf.TensorSpec) -> tf.Tensor:
  shape = [0 if d is None else d for d in spec.shape.as_list()]
  if spec.dtype == tf.string:
    return tf.fill(shape, "")
  return tf.zeros(shape, spec.dtype)


def count_and_log(
    windows: tf.data.Dataset,
    stats: PipelineStats,
    *,
    epoch_lines: Optional[int] = None,
) -> tf.data.Dataset:
  """Sums per-window counters and logs them once per epoch.

  Args:
    windows: dataset of `(payload, counts)` where counts is int64
      [NUM_STATS] and payload a nest of dense tensors.
    stats: receives one record per epoch.
    epoch_lines: for infinite (repeated / mixed) streams, an "epoch" is logged
      each time this many lines have been read; None means the stream is
      finite and the record is written when it ends.

  Returns:
    Dataset of payloads, in the same order.
  """
  payload_spec = windows.element_spec[0]
  zeros_state = tf.zeros([NUM_STATS], tf.int64)
  tagged = windows.map(lambda payload, counts: (payload, counts, False))
  if epoch_lines is None:
    dummy = tf.nest.map_structure(_zeros_for_spec, payload_spec)
    tail = tf.data.Dataset.from_tensors((dummy, zeros_state, True))
    tagged = tagged.concatenate(tail)

  def _scan(state, element):
    payload, counts, is_end = element
    total = state + counts
    if epoch_lines is None:
      fire = is_end
    else:
      fire = total[0] >= epoch_lines

    def _log():
      logged = tf.py_function(stats.record, [total], tf.bool)
      with tf.control_dependencies([logged]):
        return tf.zeros_like(total)

    new_state = tf.cond(fire, _log, lambda: total)
    return new_state, (payload, is_end)

  scanned = tagged.scan(zeros_state, _scan)
  scanned = scanned.filter(lambda payload, is_end: tf.logical_not(is_end))
  return scanned.map(lambda payload, is_end: payload)


def check_length_policy(
    max_length: int, length_policy: str, batch_tokens: int
) -> None:
  """Validates max_length / length_policy / batch_tokens.

  Raises:
    ValueError: on an unknown policy, max_length < 2, or a budget too small
      to hold one example of max_length tokens.
  """
  if length_policy not in LENGTH_POLICIES:
    raise ValueError(
        f"length_policy={length_policy!r}; expected one of {LENGTH_POLICIES}"
    )
  if max_length < 2:
    raise ValueError(f"max_length={max_length} must be at least 2")
  if batch_tokens < max_length:
    raise ValueError(
        f"batch_tokens={batch_tokens} (per replica) is smaller than "
        f"max_length={max_length}; one example would not fit in a batch"
    )


def length_policy_masks(
    valid: tf.Tensor, too_long: tf.Tensor, length_policy: str
):
  """(keep, truncated) bool masks of a window's examples under the policy.

  Args:
    valid: bool [n], examples that are not skipped for other reasons.
    too_long: bool [n], valid examples longer than max_length.
    length_policy: 'drop' (too-long examples are not kept) or 'truncate'
      (they are kept, and counted as truncated).

  Returns:
    (keep, truncated), bool [n] each.
  """
  if length_policy == LENGTH_POLICY_DROP:
    return tf.logical_and(valid, tf.logical_not(too_long)), tf.zeros_like(
        too_long
    )
  return valid, too_long


def per_replica_tokens(
    batch_tokens: int, input_context: Optional[tf.distribute.InputContext]
) -> int:
  """Splits a global token budget across replicas.

  Args:
    batch_tokens: global budget per training step (all replicas).
    input_context: None for single-replica input.

  Returns:
    The per-replica budget (global // num_replicas_in_sync).
  """
  if input_context is None:
    return batch_tokens
  replicas = input_context.num_replicas_in_sync
  budget = batch_tokens // replicas
  if budget < 1:
    raise ValueError(
        f"batch_tokens={batch_tokens} is smaller than the number of replicas"
        f" ({replicas})"
    )
  return budget


def default_window_lines(batch_tokens: int) -> int:
  """Lines per sort window: about DEFAULT_WINDOW_BATCHES batches of text."""
  lines = DEFAULT_WINDOW_BATCHES * batch_tokens // ASSUMED_MEAN_LENGTH
  return int(min(max(lines, MIN_WINDOW_LINES), MAX_WINDOW_LINES))


def greedy_batch_bounds(
    sorted_lengths: tf.Tensor,
    batch_tokens: int,
    *,
    max_batch_size: Optional[int] = None,
    length_multiple: int = 1,
) -> tf.Tensor:
  """Cuts length-sorted (descending) examples into token-budget batches.

  Args:
    sorted_lengths: int32 [n], non-increasing padded-length of each example.
    batch_tokens: token budget per batch (batch_size * padded_length).
    max_batch_size: optional cap on examples per batch.
    length_multiple: padded lengths are rounded up to a multiple of this.

  Returns:
    int32 [K, 2] of (start, end) row ranges, covering [0, n) in order.
  """
  n = tf.size(sorted_lengths)
  budget = tf.constant(batch_tokens, tf.int32)
  multiple = tf.constant(length_multiple, tf.int32)

  def _cond(start, bounds):
    del bounds
    return start < n

  def _body(start, bounds):
    length = sorted_lengths[start]
    padded = (length + multiple - 1) // multiple * multiple
    size = rows_per_batch(padded, budget, max_batch_size)
    end = tf.minimum(start + size, n)
    return end, bounds.write(bounds.size(), tf.stack([start, end]))

  bounds = tf.TensorArray(
      tf.int32, size=0, dynamic_size=True, element_shape=[2]
  )
  _, bounds = tf.while_loop(_cond, _body, (tf.constant(0, tf.int32), bounds))
  return tf.reshape(bounds.stack(), [-1, 2])


def rows_per_batch(
    padded_length: tf.Tensor,
    batch_tokens,
    max_batch_size: Optional[int] = None,
) -> tf.Tensor:
  """The examples a batch of `padded_length` holds under the token budget.

  Args:
    padded_length: int32 scalar, the batch's padded length.
    batch_tokens: the token budget (int or int32 scalar).
    max_batch_size: optional cap on examples per batch.

  Returns:
    int32 scalar: batch_tokens // padded_length, at least 1, at most
    max_batch_size.
  """
  size = tf.maximum(batch_tokens // tf.maximum(padded_length, 1), 1)
  if max_batch_size is not None:
    size = tf.minimum(size, max_batch_size)
  return size


def sort_order(lengths: tf.Tensor) -> tf.Tensor:
  """Stable order of examples by decreasing length (int32 [n] indices)."""
  return tf.argsort(lengths, direction="DESCENDING", stable=True)


def round_up(length: tf.Tensor, multiple: int) -> tf.Tensor:
  """Rounds an int32 length up to a multiple."""
  if multiple == 1:
    return length
  return (length + multiple - 1) // multiple * multiple


def padded_width(lengths: tf.Tensor, multiple: int) -> tf.Tensor:
  """The longest of `lengths` (0 when empty), rounded up to `multiple`."""
  return round_up(tf.reduce_max(tf.concat([lengths, [0]], 0)), multiple)


def sorted_padded(
    rows: tf.RaggedTensor, order: tf.Tensor, width: tf.Tensor, pad_id: int
) -> tf.Tensor:
  """rows[order] as a dense [len(order), width] tensor padded with pad_id."""
  return tf.gather(rows, order).to_tensor(
      default_value=pad_id, shape=tf.stack([tf.size(order), width])
  )


def emit_batches(
    windows: tf.data.Dataset,
    make_batch: Callable[[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor], object],
) -> tf.data.Dataset:
  """Expands each window into its batches.

  Args:
    windows: dataset of dicts holding at least 'bounds' (int32 [K, 2]).
    make_batch: (window, start, end) -> one batch (a nest of tensors).

  Returns:
    Dataset of batches, window by window.
  """

  def _expand(window):
    bounds = window["bounds"]
    return tf.data.Dataset.from_tensor_slices(bounds).map(
        lambda b: make_batch(window, b[0], b[1])
    )

  return windows.flat_map(_expand)


def dataset_options(deterministic: bool) -> tf.data.Options:
  """tf.data options: deterministic ordering, default optimizations."""
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  return options


def stateless_choices(
    weights: Sequence[float], seed: int, *, block: int = 4096
) -> tf.data.Dataset:
  """An infinite, seeded stream of corpus indices drawn with `weights`.

  `Dataset.sample_from_datasets` calls a function per element; this draws
  blocks of indices with `tf.random.stateless_categorical` instead, for
  `Dataset.choose_from_datasets`.

  Args:
    weights: non-negative sampling weights (normalized here).
    seed: integer seed; the stream is a pure function of it.
    block: indices drawn per call.

  Returns:
    Dataset of int64 scalars in [0, len(weights)).
  """
  weights = np.asarray(weights, np.float64)
  if (
      weights.ndim != 1
      or not len(weights)
      or (weights < 0).any()
      or not (weights.sum() > 0)
  ):
    raise ValueError(f"invalid sampling weights {weights.tolist()}")
  probs = weights / weights.sum()
  with np.errstate(divide="ignore"):
    logits = tf.constant(np.log(probs)[None, :], tf.float32)

  def _draw(index):
    return tf.random.stateless_categorical(
        logits, block, seed=tf.stack([tf.cast(seed, tf.int64), index])
    )[0]

  return tf.data.Dataset.counter().map(_draw).unbatch()


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Resolved batching parameters of one pipeline (per replica).

  Attributes:
    batch_tokens: per-replica token budget (batch_size * padded_length).
    max_length: maximum example length in tokens (see the pipeline for what
      counts as the length).
    length_policy: 'drop' or 'truncate' for longer examples.
    window_lines: lines per sort window.
    max_batch_size: optional cap on examples per batch.
    length_multiple: padded lengths are rounded up to a multiple of this.
  """

  batch_tokens: int
  max_length: int
  length_policy: str
  window_lines: int
  max_batch_size: Optional[int] = None
  length_multiple: int = 1

  def batch_bounds(self, sorted_lengths: tf.Tensor) -> tf.Tensor:
    """`greedy_batch_bounds` of a window's sorted lengths under this spec."""
    return greedy_batch_bounds(
        sorted_lengths,
        self.batch_tokens,
        max_batch_size=self.max_batch_size,
        length_multiple=self.length_multiple,
    )

  @classmethod
  def create(
      cls,
      *,
      batch_tokens: int,
      max_length: int,
      length_policy: str,
      window_lines: Optional[int],
      input_context: Optional[tf.distribute.InputContext],
      max_batch_size: Optional[int] = None,
      length_multiple: int = 1,
  ) -> "BatchSpec":
    """Validates the arguments and splits the budget across replicas."""
    budget = per_replica_tokens(batch_tokens, input_context)
    if length_multiple < 1:
      raise ValueError(f"length_multiple={length_multiple} must be >= 1")
    check_length_policy(
        max_length, length_policy, budget // length_multiple * length_multiple
    )
    if max_length % length_multiple and budget < round_up(
        max_length, length_multiple
    ):
      raise ValueError(
          f"batch_tokens={budget} cannot hold max_length={max_length} rounded"
          f" up to a multiple of {length_multiple}"
      )
    if window_lines is None:
      window_lines = default_window_lines(budget)
    if window_lines < 1:
      raise ValueError(f"window_lines={window_lines} must be positive")
    return cls(
        batch_tokens=budget,
        max_length=max_length,
        length_policy=length_policy,
        window_lines=window_lines,
        max_batch_size=max_batch_size,
        length_multiple=length_multiple,
    )


# Structures of a batch: a (x, y, weights) tuple for `model.fit`, or a dict.
OUTPUT_KERAS = "keras"
OUTPUT_DICT = "dict"
OUTPUT_FORMATS = (OUTPUT_KERAS, OUTPUT_DICT)
DEFAULT_LINE_SHUFFLE_BUFFER = 1 << 16
# max_length of a corpus that does not name its own.
DEFAULT_MAX_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class Batching:
  """How a task's examples become batches: what every corpus shares.

  A corpus function says only what is its own (where its lines come from,
  its vocabulary, its splits, and its default budget); these options say how
  its examples are batched, as seqio separates a task from its feature
  conversion. The task kinds are `data_pipelines.lm.LmBatching` (gin
  `lm_batching`) and `data_pipelines.mt.MtBatching` (gin `mt_batching`),
  bound once in gin and passed as one value (`batching=`).

  Attributes:
    batch_tokens: global token budget per training step (B * T summed over
      replicas, divided among them); None: the corpus's default.
    eval_batch_tokens: the same for evaluation; None: batch_tokens.
    max_length: maximum example length in tokens (see the task kind for what
      counts); None: the corpus's default (DEFAULT_MAX_LENGTH unless it
      names one).
    length_policy: 'drop' or 'truncate' longer training examples.
    eval_length_policy: the same for evaluation.
    seed: seed of every shuffle and of corpus mixing; same seed, same
      batches.
    line_shuffle_buffer: lines in the line shuffle buffer (training).
    batch_shuffle_buffer: batches in the batch shuffle buffer (training).
    window_lines: lines per length-sorting window (None: ~16 batches).
    max_batch_size: optional cap on B.
    length_multiple: round padded lengths up to a multiple of this (fewer
      shapes).
    repeat: repeat the training data forever (stats still per epoch).
    deterministic: deterministic element order (tf.data option).
    output_format: 'keras' -> a tuple for `model.fit`; 'dict' -> a dict (see
      the task kind's module docstring).
  """

  GIN_NAME = "batching"  # the task kind's gin name

  batch_tokens: Optional[int] = None
  eval_batch_tokens: Optional[int] = None
  max_length: Optional[int] = None
  length_policy: str = LENGTH_POLICY_DROP
  eval_length_policy: str = LENGTH_POLICY_TRUNCATE
  seed: int = 0
  line_shuffle_buffer: int = DEFAULT_LINE_SHUFFLE_BUFFER
  batch_shuffle_buffer: int = DEFAULT_BATCH_SHUFFLE_BUFFER
  window_lines: Optional[int] = None
  max_batch_size: Optional[int] = None
  length_multiple: int = 1
  repeat: bool = False
  deterministic: bool = True
  output_format: str = OUTPUT_KERAS

  def __post_init__(self):
    for name in ("length_policy", "eval_length_policy"):
      if getattr(self, name) not in LENGTH_POLICIES:
        raise ValueError(
            f"{name}={getattr(self, name)!r}; expected one of"
            f" {LENGTH_POLICIES}"
        )
    if self.output_format not in OUTPUT_FORMATS:
      raise ValueError(
          f"output_format={self.output_format!r}; expected one of"
          f" {OUTPUT_FORMATS}"
      )

  @classmethod
  def resolve(
      cls,
      options,
      legacy: Dict[str, object],
      *,
      owner: str,
      batch_tokens: int,
      max_length: int = DEFAULT_MAX_LENGTH,
  ):
    """The options a corpus function batches with, its defaults filled in.

    Args:
      options: the corpus function's `batching` argument: None (then
        `cls()`, which takes the gin bindings of `cls`) or a `cls`.
      legacy: batching options passed to the corpus function by name, the
        way before they were one value (e.g. `ptb_lm_data.batch_tokens =
        4096` in the config.gin of an older run); they win over `options`.
      owner: the corpus function's name, for messages.
      batch_tokens: the corpus's default budget, where the options say None.
      max_length: the corpus's default max_length, where they say None.

    Returns:
      A `cls` whose batch_tokens and max_length are set.

    Raises:
      DataError: an argument that is not a batching option of `cls`, or
        `options` of another kind.
    """
    if options is None:
      options = cls()
    if not isinstance(options, cls):
      raise DataError(
          f"{owner}: batching must be a {cls.__name__}, got"
          f" {type(options).__name__}"
      )
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(legacy) - names)
    if unknown:
      raise DataError(
          f"{owner}: unknown argument(s) {', '.join(unknown)}; batching"
          f" options are {', '.join(sorted(names))}"
      )
    if legacy:
      logging.info(
          "%s: batching option(s) %s given to the corpus function (an older"
          " config); they are bound as %s.<name> now",
          owner,
          ", ".join(sorted(legacy)),
          cls.GIN_NAME,
      )
      options = dataclasses.replace(options, **legacy)
    return dataclasses.replace(
        options,
        batch_tokens=(
            batch_tokens
            if options.batch_tokens is None
            else options.batch_tokens
        ),
        max_length=(
            max_length if options.max_length is None else options.max_length
        ),
    )

  def for_split(self, training: bool):
    """The options of one split: evaluation takes eval_* and never repeats.

    Args:
      training: the training split (else evaluation).

    Returns:
      The same kind of options.

    Raises:
      ValueError: the options were not resolved (batch_tokens is None).
    """
    if self.batch_tokens is None or self.max_length is None:
      raise ValueError(
          "batch_tokens and max_length must be set (the corpus function"
          " resolves them)"
      )
    if training:
      return self
    return dataclasses.replace(
        self,
        batch_tokens=self.eval_batch_tokens or self.batch_tokens,
        length_policy=self.eval_length_policy,
        repeat=False,
    )

  def spec(
      self,
      input_context: Optional[tf.distribute.InputContext],
      max_length: Optional[int] = None,
  ) -> BatchSpec:
    """The per-replica BatchSpec of these (split) options.

    Args:
      input_context: tf.distribute.InputContext for the budget split.
      max_length: overrides max_length (e.g. an LM's pack_length).

    Returns:
      BatchSpec.
    """
    return BatchSpec.create(
        batch_tokens=self.batch_tokens,
        max_length=self.max_length if max_length is None else max_length,
        length_policy=self.length_policy,
        window_lines=self.window_lines,
        input_context=input_context,
        max_batch_size=self.max_batch_size,
        length_multiple=self.length_multiple,
    )

  def shuffle_lines(self, lines: tf.data.Dataset, training: bool):
    """Lines shuffled (seeded) in training when the buffer holds > 1."""
    if training and self.line_shuffle_buffer > 1:
      return lines.shuffle(
          self.line_shuffle_buffer,
          seed=self.seed,
          reshuffle_each_iteration=True,
      )
    return lines

  def finish(
      self, batches: tf.data.Dataset, training: bool, repeat: bool
  ) -> tf.data.Dataset:
    """Shuffles batches in training, repeats, prefetches, sets options.

    Args:
      batches: the batches of one pipeline.
      training: shuffle them (seeded with seed + 1).
      repeat: repeat forever.

    Returns:
      The dataset to hand to `model.fit`.
    """
    if training and self.batch_shuffle_buffer > 1:
      batches = batches.shuffle(
          self.batch_shuffle_buffer,
          seed=self.seed + 1,
          reshuffle_each_iteration=True,
      )
    if repeat:
      batches = batches.repeat()
    return batches.prefetch(tf.data.AUTOTUNE).with_options(
        dataset_options(self.deterministic)
    )
