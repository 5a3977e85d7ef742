"""Machine-translation batches from parallel corpora (wordpieces + bucketing).

A *parallel corpus* (`ParallelCorpus`) is one source of sentence pairs: two
line-aligned text files, TSV files (`source<TAB>target` per line) or pairs in
memory (e.g. parsed from WMT SGML). `mt_dataset` mixes corpora, tokenizes with
the shared wordpiece vocabulary inside tf.data and yields, for `model.fit`:

  ({'source': int32 [B, S], 'target_in': int32 [B, T]},
   target_out int32 [B, T],
   weights float32 [B, T])

with `source` = (optional `<2xx>` target-language token) + source pieces,
`target_in` = [START] + target pieces, `target_out` = target pieces + [END],
padding id `PAD_ID` = 0 everywhere (the source mask is `source != 0`), and
weights 1.0 on real target positions. With output_format='dict' a batch is
{'source', 'target_in', 'target_out', 'source_mask' (bool [B, S]),
'weights' (float32 [B, T])}.

Length of a pair = max(S, T); pairs longer than `max_length` are dropped or
truncated (source to max_length, target to max_length - 1 pieces). Batches
respect `B * max(S, T) <= batch_tokens` (per replica), over length-sorted
windows (see `data_pipelines.batching`).

Mixing: with `weights=None` corpora are mixed in proportion to their sizes
and one epoch reads each exactly once; with weights, each corpus is repeated
forever and sampled with the given probabilities (an infinite stream: use
`steps_per_epoch`; statistics are then logged every "epoch-equivalent" of
sum-of-corpus-sizes lines).

Counts per epoch: lines (pairs) read, empty pairs skipped (either side
empty), pairs with invalid UTF-8 (replaced by U+FFFD), malformed TSV lines
skipped (not exactly one tab), too-long pairs dropped / truncated, source
and target tokens, [UNK] pieces.

Every batching option is a field of `MtBatching` (gin `mt_batching`), one
value for every MT corpus; a corpus function (`wmt14_mt_data`, ...) says
where its pairs come from and what its vocabulary is, and passes it on.
"""

import dataclasses
import os
from typing import (
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

from absl import logging
import gin
import tensorflow as tf

from data_pipelines import batching
from data_pipelines import text_io
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

PAD_ID = wordpiece.PAD_ID
OUTPUT_KERAS = batching.OUTPUT_KERAS
OUTPUT_DICT = batching.OUTPUT_DICT
OUTPUT_FORMATS = batching.OUTPUT_FORMATS
DEFAULT_LINE_SHUFFLE_BUFFER = batching.DEFAULT_LINE_SHUFFLE_BUFFER
# Lines per vectorized TSV-splitting step.
TSV_SPLIT_LINES = 512
NO_LANGUAGE = -1
KIND_TEXT = "text"
KIND_TSV = "tsv"
KIND_MEMORY = "memory"


@dataclasses.dataclass
class ParallelCorpus:
  """One source of sentence pairs.

  Attributes:
    name: label (file name) used in logs, errors and weight matching.
    kind: 'text' (paths = (source_file, target_file)), 'tsv' (paths = TSV
      files) or 'memory' (pairs in `pairs`).
    paths: files, see kind.
    num_lines: number of lines (pairs) in one pass.
    pairs: (sources, targets) lists of str for kind 'memory'.
    swap_tsv_columns: TSV columns are (target, source).
  """

  name: str
  kind: str
  paths: Tuple[str, ...] = ()
  num_lines: int = 0
  pairs: Optional[Tuple[List[str], List[str]]] = None
  swap_tsv_columns: bool = False

  def iter_pairs(self) -> Iterator[Tuple[str, str]]:
    """Yields (source, target) str pairs in Python (vocab learning, eval)."""
    if self.kind == KIND_MEMORY:
      yield from zip(*self.pairs)
    elif self.kind == KIND_TEXT:
      yield from zip(
          text_io.read_text_lines(self.paths[0]),
          text_io.read_text_lines(self.paths[1]),
      )
    else:
      for path in self.paths:
        for line in text_io.read_text_lines(path):
          fields = line.split("\t")
          if len(fields) == 2:
            yield (fields[1], fields[0]) if self.swap_tsv_columns else tuple(
                fields
            )

  def lines(
      self,
      input_context: Optional[tf.distribute.InputContext],
      *,
      deterministic: bool = True,
  ) -> tf.data.Dataset:
    """This pipeline's shard of (source, target, malformed) line triples.

    Returns:
      Dataset of (tf.string, tf.string, tf.bool) scalars.
    """
    num = input_context.num_input_pipelines if input_context else 1
    index = input_context.input_pipeline_id if input_context else 0
    if self.kind == KIND_MEMORY:
      ds = tf.data.Dataset.from_tensor_slices(
          (
              tf.constant(self.pairs[0], tf.string),
              tf.constant(self.pairs[1], tf.string),
              tf.zeros([len(self.pairs[0])], tf.bool),
          )
      )
      return ds.shard(num, index) if num > 1 else ds
    if self.kind == KIND_TEXT:
      src = tf.data.TextLineDataset(
          self.paths[0], compression_type=text_io.compression_of(self.paths[0])
      )
      tgt = tf.data.TextLineDataset(
          self.paths[1], compression_type=text_io.compression_of(self.paths[1])
      )
      ds = tf.data.Dataset.zip(
          (src, tgt, tf.data.Dataset.from_tensors(False).repeat())
      )
      return ds.shard(num, index) if num > 1 else ds
    lines = text_io.line_dataset(
        list(self.paths),
        input_context=input_context,
        deterministic=deterministic,
    )
    swap = self.swap_tsv_columns

    def _split(batch):
      fields = tf.strings.split(batch, "\t")
      blank = tf.equal(tf.strings.strip(batch), "")
      ok = tf.logical_or(tf.equal(fields.row_lengths(), 2), blank)
      cols = fields.to_tensor(
          default_value="", shape=tf.stack([tf.size(batch), 2])
      )
      cols = tf.where(ok[:, None], cols, tf.fill(tf.shape(cols), ""))
      first, second = cols[:, 0], cols[:, 1]
      if swap:
        first, second = second, first
      return first, second, tf.logical_not(ok)

    return lines.batch(TSV_SPLIT_LINES).map(_split).unbatch()


def _paired_languages(
    corpora: Sequence[ParallelCorpus], language_ids: Optional[Sequence[int]]
) -> List[int]:
  if language_ids is None:
    return [NO_LANGUAGE] * len(corpora)
  if len(language_ids) != len(corpora):
    raise ValueError("one language id per corpus is required")
  return list(language_ids)


def mixed_lines(
    corpora: Sequence[ParallelCorpus],
    *,
    weights: Optional[Sequence[float]],
    language_ids: Optional[Sequence[int]],
    training: bool,
    seed: int,
    input_context: Optional[tf.distribute.InputContext],
    deterministic: bool = True,
) -> tf.data.Dataset:
  """Mixes corpora into one stream of ((source, target, malformed), language).

  Args:
    corpora: the corpora.
    weights: sampling weights (infinite stream) or None (one epoch, mixed in
      proportion to sizes when training, concatenated otherwise).
    language_ids: per-corpus index of the target-language token to prepend
      (NO_LANGUAGE for none), or None.
    training: shuffle (seeded) and mix; otherwise read corpora in order.
    seed: mixing seed.
    input_context: per-replica sharding.
    deterministic: deterministic order.

  Returns:
    Dataset of ((tf.string source, tf.string target, tf.bool malformed),
    tf.int32 language) scalars.
  """
  if not corpora:
    raise DataError("no parallel corpora given")
  langs = _paired_languages(corpora, language_ids)
  streams = []
  for corpus, lang in zip(corpora, langs):
    lines = corpus.lines(input_context, deterministic=deterministic)
    lang_ds = tf.data.Dataset.from_tensors(tf.constant(lang, tf.int32)).repeat()
    # Nested ((source, target, malformed), language): zip needs no function.
    streams.append(tf.data.Dataset.zip((lines, lang_ds)))
  if len(streams) == 1 and weights is None:
    return streams[0]
  if not training and weights is None:
    out = streams[0]
    for s in streams[1:]:
      out = out.concatenate(s)
    return out
  if weights is None:
    sizes = [max(c.num_lines, 1) for c in corpora]
    choices = batching.stateless_choices(sizes, seed)
    return tf.data.Dataset.choose_from_datasets(
        streams, choices, stop_on_empty_dataset=False
    )
  if len(weights) != len(streams):
    raise ValueError(f"{len(weights)} weights for {len(streams)} corpora")
  kept = [(s, w) for s, w in zip(streams, weights) if w > 0]
  choices = batching.stateless_choices([w for _, w in kept], seed)
  return tf.data.Dataset.choose_from_datasets(
      [s.repeat() for s, _ in kept], choices, stop_on_empty_dataset=True
  )


def _window_pairs(
    sources: tf.Tensor,
    targets: tf.Tensor,
    langs: tf.Tensor,
    malformed: tf.Tensor,
    *,
    tokenizer: wordpiece.WordpieceTokenizer,
    language_token_ids: tf.Tensor,
    spec: batching.BatchSpec,
):
  """Cleans, tokenizes, filters and length-sorts one window of pairs.

  Args:
    sources: tf.string [n].
    targets: tf.string [n].
    langs: int32 [n], index into language_token_ids or NO_LANGUAGE.
    malformed: bool [n], malformed TSV lines.
    tokenizer: the wordpiece tokenizer.
    language_token_ids: int32 [L], vocab ids of the <2xx> tokens.
    spec: batching parameters.

  Returns:
    (payload, counts). payload: dict with 'source' int32 [m, Sw],
    'target_in' / 'target_out' int32 [m, Tw], 'source_lengths',
    'target_lengths', 'lengths' int32 [m] (sorted by decreasing 'lengths'),
    'bounds' int32 [K, 2].
  """

  def _fix(texts):
    fixed = tf.strings.unicode_transcode(
        texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
    )
    return fixed, tf.not_equal(fixed, texts)

  sources, bad_src = _fix(sources)
  targets, bad_tgt = _fix(targets)
  invalid = tf.logical_and(
      tf.logical_or(bad_src, bad_tgt), tf.logical_not(malformed)
  )
  src_ids = tokenizer.tokenize(sources)
  tgt_ids = tokenizer.tokenize(targets)
  empty = tf.logical_and(
      tf.logical_not(malformed),
      tf.logical_or(
          tf.equal(src_ids.row_lengths(), 0), tf.equal(tgt_ids.row_lengths(), 0)
      ),
  )
  valid = tf.logical_not(tf.logical_or(malformed, empty))
  has_lang = langs >= 0
  prefix = tf.RaggedTensor.from_row_lengths(
      tf.gather(language_token_ids, tf.boolean_mask(langs, has_lang)),
      tf.cast(has_lang, tf.int64),
  )
  src_ids = tf.concat([prefix, src_ids], axis=1)
  src_len = tf.cast(src_ids.row_lengths(), tf.int32)
  tgt_len = tf.cast(tgt_ids.row_lengths(), tf.int32) + 1
  too_long = tf.logical_and(
      valid,
      tf.logical_or(src_len > spec.max_length, tgt_len > spec.max_length),
  )
  keep, truncated = batching.length_policy_masks(
      valid, too_long, spec.length_policy
  )
  if spec.length_policy == batching.LENGTH_POLICY_TRUNCATE:
    src_ids = src_ids[:, : spec.max_length]
    tgt_ids = tgt_ids[:, : spec.max_length - 1]
  src_ids = tf.ragged.boolean_mask(src_ids, keep)
  tgt_ids = tf.ragged.boolean_mask(tgt_ids, keep)
  m = src_ids.nrows(out_type=tf.int32)
  src_len = tf.cast(src_ids.row_lengths(), tf.int32)
  tgt_len = tf.cast(tgt_ids.row_lengths(), tf.int32) + 1
  unk = tf.reduce_sum(
      tf.cast(tf.equal(src_ids.flat_values, wordpiece.UNK_ID), tf.int64)
  ) + tf.reduce_sum(
      tf.cast(tf.equal(tgt_ids.flat_values, wordpiece.UNK_ID), tf.int64)
  )

  def _count(mask):
    return tf.reduce_sum(tf.cast(mask, tf.int64))

  counts = batching.stats_vector(
      lines=tf.size(sources),
      empty_skipped=_count(empty),
      invalid_utf8_replaced=_count(invalid),
      malformed_skipped=_count(malformed),
      too_long_dropped=_count(tf.logical_and(too_long, tf.logical_not(keep))),
      too_long_truncated=_count(truncated),
      examples=m,
      source_tokens=tf.reduce_sum(src_len),
      target_tokens=tf.reduce_sum(tgt_len),
      unk_tokens=unk,
  )
  start = tf.fill([m, 1], wordpiece.START_ID)
  end = tf.fill([m, 1], wordpiece.END_ID)
  target_in = tf.concat([start, tgt_ids], axis=1)
  target_out = tf.concat([tgt_ids, end], axis=1)
  lengths = tf.maximum(src_len, tgt_len)
  order = batching.sort_order(lengths)
  sorted_lengths = tf.gather(lengths, order)
  src_len = tf.gather(src_len, order)
  tgt_len = tf.gather(tgt_len, order)
  src_width = batching.padded_width(src_len, spec.length_multiple)
  tgt_width = batching.padded_width(tgt_len, spec.length_multiple)
  payload = {
      "source": batching.sorted_padded(src_ids, order, src_width, PAD_ID),
      "target_in": batching.sorted_padded(target_in, order, tgt_width, PAD_ID),
      "target_out": batching.sorted_padded(
          target_out, order, tgt_width, PAD_ID
      ),
      "source_lengths": src_len,
      "target_lengths": tgt_len,
      "lengths": sorted_lengths,
      "bounds": spec.batch_bounds(sorted_lengths),
  }
  return payload, counts


@gin.configurable("mt_batching")
@dataclasses.dataclass(frozen=True)
class MtBatching(batching.Batching):
  """Batching options of every MT corpus (gin: `mt_batching.<field>`).

  The fields of `data_pipelines.batching.Batching`; max_length bounds S and
  T in pieces (S includes any <2xx> token, T the [START] / [END]), and
  `repeat` applies to unweighted mixing (weighted mixing never ends).
  """

  GIN_NAME = "mt_batching"


def mt_dataset(
    corpora: Sequence[ParallelCorpus],
    tokenizer: wordpiece.WordpieceTokenizer,
    options: MtBatching,
    *,
    weights: Optional[Sequence[float]] = None,
    language_ids: Optional[Sequence[int]] = None,
    language_tokens: Sequence[str] = (),
    training: bool = True,
    input_context: Optional[tf.distribute.InputContext] = None,
    stats: Optional[batching.PipelineStats] = None,
) -> tf.data.Dataset:
  """Batches parallel corpora for a sequence-to-sequence model.

  Args:
    corpora: the parallel corpora.
    tokenizer: shared source/target wordpiece tokenizer.
    options: the batching options, resolved (`MtBatching.resolve`); the
      budget is split across replicas.
    weights: per-corpus sampling weights (infinite stream) or None.
    language_ids: per-corpus index into `language_tokens` (multilingual), or
      None for no target-language token.
    language_tokens: the '<2xx>' tokens indexed by language_ids.
    training: shuffle and mix (seeded) and use the training budget, length
      policy and `repeat`; otherwise the eval_* ones, corpora in order.
    input_context: tf.distribute.InputContext (sharding and budget split).
    stats: receives the per-epoch counts.

  Returns:
    Dataset of batches (see module docstring for the structure).
  """
  options = options.for_split(training)
  seed, deterministic = options.seed, options.deterministic
  spec = options.spec(input_context)
  stats = stats or batching.PipelineStats("mt")
  tokenizer.vocab.require(language_tokens)
  language_token_ids = tf.constant(
      [tokenizer.vocab.token_to_id(t) for t in language_tokens] or [0],
      tf.int32,
  )
  lines = mixed_lines(
      corpora,
      weights=weights,
      language_ids=language_ids,
      training=training,
      seed=seed,
      input_context=input_context,
      deterministic=deterministic,
  )
  epoch_lines = None
  if weights is not None:
    pipelines = input_context.num_input_pipelines if input_context else 1
    epoch_lines = max(sum(c.num_lines for c in corpora) // pipelines, 1)
  lines = options.shuffle_lines(lines, training)

  def _window(line, langs):
    sources, targets, malformed = line
    return _window_pairs(
        sources,
        targets,
        langs,
        malformed,
        tokenizer=tokenizer,
        language_token_ids=language_token_ids,
        spec=spec,
    )

  windows = lines.batch(spec.window_lines).map(
      _window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
  )
  windows = batching.count_and_log(windows, stats, epoch_lines=epoch_lines)

  def _make_batch(window, start, end):
    src_width = batching.round_up(
        tf.reduce_max(window["source_lengths"][start:end]), spec.length_multiple
    )
    tgt_width = batching.round_up(
        tf.reduce_max(window["target_lengths"][start:end]), spec.length_multiple
    )
    source = window["source"][start:end, :src_width]
    target_in = window["target_in"][start:end, :tgt_width]
    target_out = window["target_out"][start:end, :tgt_width]
    weights_ = tf.sequence_mask(
        window["target_lengths"][start:end], tgt_width, dtype=tf.float32
    )
    if options.output_format == OUTPUT_KERAS:
      return {"source": source, "target_in": target_in}, target_out, weights_
    return {
        "source": source,
        "target_in": target_in,
        "target_out": target_out,
        "source_mask": tf.sequence_mask(
            window["source_lengths"][start:end], src_width
        ),
        "weights": weights_,
    }

  batches = batching.emit_batches(windows, _make_batch)
  return options.finish(
      batches, training, repeat=options.repeat and weights is None
  )


@dataclasses.dataclass
class MtData:
  """What a translation experiment needs from the data.

  Attributes:
    name: label used in logs.
    vocab: the shared wordpiece vocabulary (vocab.size = embedding/softmax).
    tokenizer: tokenize / detokenize with tensorflow-text ops.
    train_dataset: (input_context=None) -> tf.data.Dataset of batches.
    eval_dataset: same for the evaluation corpora, or None.
    eval_pairs: () -> list of (source str, reference str, target language or
      None) in corpus order, for BLEU.
    language_tokens: the '<2xx>' tokens in use (multilingual), else ().
    stats: PipelineStats of every dataset built so far, by 'name/split'.
  """

  name: str
  vocab: wordpiece.WordpieceVocab
  tokenizer: wordpiece.WordpieceTokenizer
  train_dataset: Callable[..., tf.data.Dataset]
  eval_dataset: Optional[Callable[..., tf.data.Dataset]]
  eval_pairs: Callable[[], List[Tuple[str, str, Optional[str]]]]
  language_tokens: Tuple[str, ...] = ()
  stats: Dict[str, batching.PipelineStats] = dataclasses.field(
      default_factory=dict
  )

  def encode_sources(
      self, texts: tf.Tensor, target_language: Optional[str] = None
  ) -> tf.RaggedTensor:
    """Source ids for inference, with the '<2xx>' token when multilingual.

    Args:
      texts: tf.string [n].
      target_language: language code (e.g. 'fr') for multilingual models.

    Returns:
      int32 RaggedTensor [n, None].
    """
    ids = self.tokenizer.tokenize(texts)
    if target_language is None:
      return ids
    token_id = self.vocab.token_to_id(wordpiece.language_token(target_language))
    prefix = tf.fill([ids.nrows(), 1], token_id)
    return tf.concat([prefix, ids], axis=1)


def resolve_wordpiece_vocab(
    *,
    vocab_file: Optional[str],
    create_vocab_if_missing: bool,
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    extra_reserved_tokens: Sequence[str] = (),
    expected_size: Optional[int] = None,
    learn_kwargs: Optional[Dict[str, object]] = None,
) -> wordpiece.WordpieceVocab:
  """Loads, or learns (and optionally saves), the shared wordpiece vocab.

  Args:
    vocab_file: vocabulary file, or None to learn in memory.
    create_vocab_if_missing: learn and save vocab_file if it is missing.
    texts: () -> iterable of training texts (both languages).
    vocab_size: target size when learning.
    extra_reserved_tokens: e.g. language tokens; required when loading.
    expected_size: if given, the exact size required when loading.
    learn_kwargs: extra `WordpieceVocab.learn` arguments.

  Returns:
    The vocabulary.

  Raises:
    DataError: missing file (and not allowed to create) or mismatch.
  """
  if vocab_file and (
      tf.io.gfile.exists(vocab_file) or not create_vocab_if_missing
  ):
    return wordpiece.WordpieceVocab.load(
        vocab_file,
        required_tokens=extra_reserved_tokens,
        expected_size=expected_size,
    )
  vocab = wordpiece.WordpieceVocab.learn(
      texts(),
      vocab_size=vocab_size,
      extra_reserved_tokens=extra_reserved_tokens,
      **(learn_kwargs or {}),
  )
  if vocab_file:
    vocab.save(vocab_file)
    logging.info("saved %d wordpieces to %s", vocab.size, vocab_file)
  return vocab


def sample_texts(
    corpora: Sequence[ParallelCorpus], max_pairs: Optional[int]
) -> Iterator[str]:
  """Source and target texts of the first pairs of each corpus.

  Args:
    corpora: corpora to read.
    max_pairs: total pairs to read, split evenly across corpora (None: all).

  Yields:
    source text, target text, source text, ...
  """
  per_corpus = None if max_pairs is None else max(max_pairs // len(corpora), 1)
  for corpus in corpora:
    for i, (src, tgt) in enumerate(corpus.iter_pairs()):
      if per_corpus is not None and i >= per_corpus:
        break
      yield src
      yield tgt


def make_mt_data(
    *,
    name: str,
    vocab: wordpiece.WordpieceVocab,
    train_corpora: Sequence[ParallelCorpus],
    eval_corpora: Sequence[ParallelCorpus],
    train_weights: Optional[Sequence[float]] = None,
    train_language_ids: Optional[Sequence[int]] = None,
    eval_language_ids: Optional[Sequence[int]] = None,
    language_tokens: Sequence[str] = (),
    eval_languages: Optional[Sequence[Optional[str]]] = None,
    options: MtBatching,
    max_bytes_per_word: int = wordpiece.DEFAULT_MAX_BYTES_PER_WORD,
) -> MtData:
  """Wires corpora, vocabulary and the (resolved) batching options."""
  tokenizer = wordpiece.WordpieceTokenizer(
      vocab, max_bytes_per_word=max_bytes_per_word
  )
  eval_corpora = list(eval_corpora)
  eval_langs = list(eval_languages or [None] * len(eval_corpora))

  def _eval_pairs():
    out = []
    for corpus, lang in zip(eval_corpora, eval_langs):
      out.extend((s, t, lang) for s, t in corpus.iter_pairs())
    return out

  data = MtData(
      name=name,
      vocab=vocab,
      tokenizer=tokenizer,
      train_dataset=None,
      eval_dataset=None,
      eval_pairs=_eval_pairs,
      language_tokens=tuple(language_tokens),
  )

  def _builder(split, corpora, training, weights, language_ids):
    def _build(input_context: Optional[tf.distribute.InputContext] = None):
      stats = batching.PipelineStats(f"{name}/{split}")
      data.stats[stats.name] = stats
      return mt_dataset(
          corpora,
          tokenizer,
          options,
          weights=weights,
          language_ids=language_ids,
          language_tokens=language_tokens,
          training=training,
          input_context=input_context,
          stats=stats,
      )

    return _build

  data.train_dataset = _builder(
      "train", list(train_corpora), True, train_weights, train_language_ids
  )
  if eval_corpora:
    data.eval_dataset = _builder(
        "eval", eval_corpora, False, None, eval_language_ids
    )
  return data


def corpus_weights_for(
    corpora: Sequence[ParallelCorpus], weights: Optional[Dict[str, float]]
) -> Optional[List[float]]:
  """Per-corpus weights from {name substring: weight}.

  Args:
    corpora: the corpora.
    weights: None (mix by size, one epoch) or a dict whose keys are
      substrings of corpus names (file names); the first matching key wins.

  Returns:
    None or a list of floats aligned with corpora.

  Raises:
    DataError: if a corpus matches no key.
  """
  if weights is None:
    return None
  out = []
  for corpus in corpora:
    match = [k for k in weights if k in corpus.name]
    if not match:
      raise DataError(
          f"corpus {corpus.name!r} matches none of the corpus_weights keys"
          f" {sorted(weights)}"
      )
    out.append(float(weights[match[0]]))
  return out


def tsv_corpora(
    files: Sequence[str], *, source_lang: str, target_lang: str
) -> List[ParallelCorpus]:
  """One corpus per TSV file; '*.{tgt}-{src}.tsv' files have swapped columns.

  Args:
    files: TSV files (optionally .gz).
    source_lang: source language code.
    target_lang: target language code.

  Returns:
    Corpora, with swap_tsv_columns set for files named '*.{tgt}-{src}.tsv'.
  """
  out = []
  for path in files:
    base = os.path.basename(path)
    stem = base[: -len(".gz")] if base.endswith(".gz") else base
    swap = stem.endswith(f".{target_lang}-{source_lang}.tsv")
    out.append(
        ParallelCorpus(
            name=base,
            kind=KIND_TSV,
            paths=(path,),
            num_lines=text_io.count_lines(path),
            swap_tsv_columns=swap,
        )
    )
  return out
