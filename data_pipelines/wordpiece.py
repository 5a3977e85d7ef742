"""Shared source/target wordpiece vocabulary and tokenizer (tensorflow-text).

The paper's MT models use a 32k wordpiece vocabulary shared by source and
target. Here:

* `WordpieceVocab.learn` counts whitespace-separated words (after the same
  normalization the tokenizer applies) and learns the vocabulary with
  tensorflow-text's wordpiece learner
  (`tensorflow_text.tools.wordpiece_vocab.wordpiece_tokenizer_learner_lib`,
  the algorithm behind `bert_vocab_from_dataset`), logging each step of its
  threshold search.
* `WordpieceTokenizer` tokenizes and detokenizes inside tf.data with
  `tf_text.FastWordpieceTokenizer` (no pretokenization; we split words on
  whitespace ourselves, so punctuation stays attached as `##` pieces and
  detokenization restores the text exactly, up to whitespace normalization).

Id layout: `[PAD]`=0, `[UNK]`=1, `[START]`=2, `[END]`=3, then any extra
reserved tokens (the multilingual `<2xx>` target-language tokens), then
single characters and learned pieces (continuations carry the `##` prefix).

Text normalization: runs of Unicode whitespace become one ASCII space and the
ends are stripped. A word containing a character outside the learned alphabet
(or longer than `max_bytes_per_word` bytes) becomes a single `[UNK]`.

File format: UTF-8, one token per line, line i is id i (BERT vocab format).
"""

import collections
import math
import re
from typing import Iterable, List, Optional, Sequence, Union

from absl import logging
import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.tools.wordpiece_vocab import (
    wordpiece_tokenizer_learner_lib as learner,
)

from data_pipelines import text_io
from data_pipelines import word_vocab
from data_pipelines.errors import DataError

PAD = "[PAD]"
UNK = "[UNK]"
START = "[START]"
END = "[END]"
RESERVED_TOKENS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
SUFFIX_INDICATOR = "##"
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_MAX_BYTES_PER_WORD = 100
# Whitespace normalized to one ASCII space (RE2 syntax).
WHITESPACE_REGEX = r"[\s\x{0b}\x{85}\p{Z}]+"
# Extra reserved tokens recognized when loading a vocabulary file.
LANGUAGE_TOKEN_REGEX = re.compile(r"^<2[A-Za-z][A-Za-z0-9_-]*>$")
# Texts per TensorFlow word-counting step.
COUNT_CHUNK_TEXTS = 1 << 13


def language_token(language: str) -> str:
  """The target-language token prepended to multilingual sources: '<2fr>'."""
  return f"<2{language}>"


def normalize_text(texts: tf.Tensor) -> tf.Tensor:
  """Collapses Unicode whitespace runs to one space and strips the ends.

  Args:
    texts: tf.string tensor of any shape.

  Returns:
    tf.string tensor of the same shape.
  """
  return tf.strings.strip(
      tf.strings.regex_replace(texts, WHITESPACE_REGEX, " ")
  )


def split_words(texts: tf.Tensor) -> tf.RaggedTensor:
  """Normalizes and splits tf.string [n] into words: ragged [n, None]."""
  return tf.strings.split(normalize_text(texts))


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _count_chunk(texts):
  words = split_words(texts).flat_values
  unique, _, counts = tf.unique_with_counts(words)
  return unique, counts


def count_words(
    texts: Iterable[str], *, what: str = "counting words for wordpieces"
) -> collections.Counter:
  """Counts normalized whitespace words of texts (with progress logging).

  Args:
    texts: iterable of str (e.g. both sides of a parallel corpus).
    what: progress label.

  Returns:
    Counter word -> count, words split exactly as `WordpieceTokenizer` does.
  """
  counter = collections.Counter()
  progress = text_io.ProgressLogger(what, unit="texts")
  chunk = []

  def _flush():
    unique, counts = _count_chunk(tf.constant(chunk))
    counter.update(
        dict(
            zip(
                (w.decode("utf-8") for w in unique.numpy()),
                counts.numpy().tolist(),
            )
        )
    )
    progress.update(len(chunk), extra=f"{len(counter)} distinct words")
    chunk.clear()

  for text in texts:
    chunk.append(text)
    if len(chunk) >= COUNT_CHUNK_TEXTS:
      _flush()
  if chunk:
    _flush()
  progress.done(extra=f"{len(counter)} distinct words")
  return counter


def _first_guess(word_counts, vocab_size: int, lower: int, upper: int) -> int:
  """Count of the (vocab_size / 2)-th most frequent word: a threshold guess."""
  counts = sorted((c for _, c in word_counts), reverse=True)
  if not counts:
    return lower
  guess = counts[min(len(counts) - 1, max(vocab_size // 2, 1))]
  return int(min(max(guess, lower), upper))


def _search_threshold(probe, *, target, slack, lower, upper, first_guess):
  """Finds a count threshold whose vocabulary size is in [target-slack, target].

  The vocabulary size decreases with the threshold roughly as a power law, so
  this interpolates in log-log space inside a shrinking bracket (falling back
  to geometric bisection), needing a few probes where plain bisection (what
  `learner.learn_binary_search` does) needs a dozen. Each probe costs a full
  pass of the learner.

  Args:
    probe: thresh -> vocabulary list.
    target: wanted maximum size.
    slack: accepted shortfall below target.
    lower, upper: threshold search bounds (inclusive).
    first_guess: first threshold to try.

  Returns:
    The accepted vocabulary, or the closest one not above target (the one at
    `lower` if even that is above target).
  """
  # Bracket: `lo` gives more than target tokens, `hi` gives at most target.
  lo, lo_size = None, None
  hi, hi_size, hi_vocab = None, None, None
  thresh = first_guess
  while True:
    vocab = probe(thresh)
    size = len(vocab)
    if size <= target:
      if target - size <= slack:
        return vocab
      hi, hi_size, hi_vocab = thresh, size, vocab
    else:
      lo, lo_size = thresh, size
    left = lo + 1 if lo is not None else lower
    right = hi - 1 if hi is not None else upper
    if left > right:
      return hi_vocab if hi_vocab is not None else vocab
    if lo is not None and hi is not None:
      # Power-law interpolation between the bracket ends.
      slope = math.log(hi_size / lo_size) / math.log(hi / lo)
      aim = target - slack / 2.0
      guess = (
          lo * math.exp(math.log(aim / lo_size) / slope)
          if slope
          else (math.sqrt(lo * hi))
      )
    elif hi is not None:
      guess = hi / 4.0 if size < target / 2 else hi / 1.5
    else:
      guess = lo * 4.0 if size > target * 2 else lo * 1.5
    thresh = int(round(min(max(guess, left), right)))


class WordpieceVocab(word_vocab.TokenList):
  """An ordered wordpiece vocabulary with the reserved tokens first."""

  def __init__(
      self,
      tokens: Sequence[str],
      *,
      num_reserved: int = len(RESERVED_TOKENS),
      source: str = "<memory>",
  ):
    """Wraps a token list (token i has id i).

    Args:
      tokens: the vocabulary; must start with RESERVED_TOKENS.
      num_reserved: number of leading reserved tokens (RESERVED_TOKENS plus
        extra reserved tokens such as '<2fr>').
      source: where the tokens came from, used in error messages.

    Raises:
      DataError: if the reserved tokens are missing / misplaced or a token is
        duplicated, empty or contains whitespace.
    """
    tokens = list(tokens)
    head = tuple(tokens[: len(RESERVED_TOKENS)])
    if head != RESERVED_TOKENS:
      raise DataError(
          f"wordpiece vocabulary {source} starts with {list(head)}, expected"
          f" {list(RESERVED_TOKENS)} (mismatched vocabulary file: a word"
          " vocabulary, or one not made by data_pipelines.wordpiece?)"
      )
    seen = {}
    for i, token in enumerate(tokens):
      if not token or token != token.strip() or " " in token:
        raise DataError(
            f"wordpiece vocabulary {source}: entry {i} ({token!r}) is empty"
            " or contains whitespace"
        )
      if token in seen:
        raise DataError(
            f"wordpiece vocabulary {source}: token {token!r} appears twice"
            f" (ids {seen[token]} and {i})"
        )
      seen[token] = i
    self._tokens = tokens
    self._index = seen
    self.num_reserved = num_reserved
    self.source = source

  def token_to_id(self, token: str) -> int:
    """Id of a token; raises DataError if it is not in the vocabulary."""
    if token not in self._index:
      raise DataError(
          f"token {token!r} is not in wordpiece vocabulary {self.source}"
      )
    return self._index[token]

  def __contains__(self, token: str) -> bool:
    return token in self._index

  def require(self, tokens: Iterable[str]) -> None:
    """Raises DataError unless every token is in the vocabulary."""
    missing = [t for t in tokens if t not in self._index]
    if missing:
      raise DataError(
          f"wordpiece vocabulary {self.source} lacks the reserved tokens"
          f" {missing}; learn it again with extra_reserved_tokens={missing}"
      )

  @classmethod
  def learn(
      cls,
      texts: Union[Iterable[str], collections.Counter],
      *,
      vocab_size: int = DEFAULT_VOCAB_SIZE,
      extra_reserved_tokens: Sequence[str] = (),
      lower_thresh: int = 10,
      upper_thresh: int = int(1e7),
      num_iterations: int = 4,
      max_input_tokens: int = int(5e6),
      max_token_length: int = 50,
      max_unique_chars: int = 1000,
      slack_ratio: float = 0.05,
  ) -> "WordpieceVocab":
    """Learns a wordpiece vocabulary with tensorflow-text's learner.

    Like the learner's own `learn`, this searches a count threshold until the
    vocabulary size is within `slack_ratio` below `vocab_size`, but with
    log-log interpolation instead of bisection (see `_search_threshold`);
    each probe is logged.

    Args:
      texts: iterable of str (both languages for a shared vocabulary), or a
        Counter of words already produced by `count_words`.
      vocab_size: target (maximum) size, reserved tokens included.
      extra_reserved_tokens: tokens placed right after RESERVED_TOKENS, e.g.
        language tokens '<2fr>'.
      lower_thresh, upper_thresh, num_iterations, max_input_tokens,
        max_token_length, max_unique_chars, slack_ratio: see
        `wordpiece_tokenizer_learner_lib.learn`.

    Returns:
      The learned vocabulary: at most `vocab_size` tokens (when the text
      has more distinct characters than fit, only the most frequent are
      kept, with a warning).

    Raises:
      DataError: if there is no text, or no vocabulary of `vocab_size`
        tokens exists (the message gives the smallest size that does).
    """
    counts = (
        texts if isinstance(texts, collections.Counter) else count_words(texts)
    )
    if not counts:
      raise DataError("cannot learn a wordpiece vocabulary from empty text")
    reserved = list(RESERVED_TOKENS) + [
        t for t in extra_reserved_tokens if t not in RESERVED_TOKENS
    ]
    params = learner.Params(
        upper_thresh,
        lower_thresh,
        num_iterations,
        max_input_tokens,
        max_token_length,
        max_unique_chars,
        vocab_size,
        slack_ratio,
        True,
        SUFFIX_INDICATOR,
        reserved,
    )
    word_counts = sorted(counts.items())
    upper, lower = learner.get_search_threshs(
        word_counts, params.upper_thresh, params.lower_thresh
    )
    all_counts = learner.get_input_words(
        word_counts, params.reserved_tokens, params.max_token_length
    )
    allowed = learner.get_allowed_chars(all_counts, params.max_unique_chars)
    filtered = learner.filter_input_words(
        all_counts, allowed, params.max_input_tokens
    )
    progress = text_io.ProgressLogger(
        f"learning {vocab_size} wordpieces from {len(filtered)} words",
        unit="threshold probes",
        interval_seconds=0.0,
    )

    def _probe(thresh):
      vocab = learner.learn_with_thresh(filtered, thresh, params)
      progress.update(1, extra=f"threshold {thresh} -> {len(vocab)} tokens")
      return vocab

    vocab = _search_threshold(
        _probe,
        target=vocab_size,
        slack=max(int(params.slack_ratio * vocab_size), 0),
        lower=max(lower, 1),
        upper=max(upper, lower, 1),
        first_guess=_first_guess(filtered, vocab_size, lower, upper),
    )
    progress.done(extra=f"{len(vocab)} tokens")
    if len(vocab) > vocab_size:
      # Every allowed character is a token twice (c and ##c): keep only the
      # most frequent characters (the others become [UNK]) so the size fits.
      fitting_chars = (vocab_size - len(reserved)) // 3
      if fitting_chars < 1 or fitting_chars >= min(
          len(allowed), max_unique_chars
      ):
        raise DataError(
            f"cannot learn a {vocab_size}-token wordpiece vocabulary: the"
            f" smallest one learned has {len(vocab)} tokens ({len(allowed)}"
            f" distinct characters, {len(reserved)} reserved tokens); ask"
            f" for vocab_size >= {len(vocab)}"
        )
      logging.warning(
          "wordpiece vocabulary: %d distinct characters do not fit %d"
          " tokens; keeping the %d most frequent (the others become [UNK])",
          len(allowed),
          vocab_size,
          fitting_chars,
      )
      return cls.learn(
          counts,
          vocab_size=vocab_size,
          extra_reserved_tokens=extra_reserved_tokens,
          lower_thresh=lower_thresh,
          upper_thresh=upper_thresh,
          num_iterations=num_iterations,
          max_input_tokens=max_input_tokens,
          max_token_length=max_token_length,
          max_unique_chars=fitting_chars,
          slack_ratio=slack_ratio,
      )
    return cls(vocab, num_reserved=len(reserved))

  def save(self, path: str) -> None:
    """Writes one token per line (creates parent directories)."""
    text_io.write_lines(path, self._tokens)

  @classmethod
  def load(
      cls,
      path: str,
      *,
      required_tokens: Sequence[str] = (),
      expected_size: Optional[int] = None,
  ) -> "WordpieceVocab":
    """Loads a vocabulary file and checks it fits the pipeline.

    Args:
      path: vocabulary file (one token per line).
      required_tokens: tokens that must be present (e.g. '<2fr>').
      expected_size: if given, the exact number of entries required.

    Returns:
      The vocabulary.

    Raises:
      DataError: if the file is missing, empty, not a wordpiece vocabulary,
        lacks a required token, or has the wrong size.
    """
    if not tf.io.gfile.exists(path):
      raise DataError(
          f"wordpiece vocabulary file {path!r} does not exist (learn one with"
          " WordpieceVocab.learn(...).save(path) or set"
          " create_vocab_if_missing=True)"
      )
    with tf.io.gfile.GFile(path, "rb") as f:
      tokens = [raw.decode("utf-8").rstrip("\n").rstrip("\r") for raw in f]
    cls.check_loaded("wordpiece vocabulary", path, tokens, expected_size)
    num_reserved = len(RESERVED_TOKENS)
    while num_reserved < len(tokens) and LANGUAGE_TOKEN_REGEX.match(
        tokens[num_reserved]
    ):
      num_reserved += 1
    vocab = cls(tokens, num_reserved=num_reserved, source=repr(path))
    vocab.require(required_tokens)
    return vocab


class WordpieceTokenizer:
  """Tokenizes / detokenizes text with tensorflow-text inside tf.data.

  Example:
    tokenizer = WordpieceTokenizer(vocab)
    ids = tokenizer.tokenize(tf.constant(['Hello world!']))  # ragged [1, None]
    text = tokenizer.detokenize(ids)                          # ['Hello world!']
  """

  def __init__(
      self,
      vocab: WordpieceVocab,
      *,
      max_bytes_per_word: int = DEFAULT_MAX_BYTES_PER_WORD,
  ):
    self.vocab = vocab
    with tf.init_scope():
      self._fast = tf_text.FastWordpieceTokenizer(
          vocab=vocab.tokens,
          suffix_indicator=SUFFIX_INDICATOR,
          max_bytes_per_word=max_bytes_per_word,
          token_out_type=tf.int32,
          unknown_token=UNK,
          no_pretokenization=True,
          support_detokenization=True,
      )

  @property
  def vocab_size(self) -> int:
    return self.vocab.size

  def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """Wordpiece ids of texts.

    Args:
      texts: tf.string [n].

    Returns:
      int32 RaggedTensor [n, None] (no [START]/[END] added).
    """
    words = split_words(texts)
    pieces = self._fast.tokenize(words)
    return pieces.merge_dims(1, 2)

  def detokenize(self, ids: Union[tf.Tensor, tf.RaggedTensor]) -> tf.Tensor:
    """Text of id sequences (e.g. model outputs).

    Reading of each row stops at the first [END]; [PAD], [START] and extra
    reserved tokens (<2xx>) are dropped; [UNK] is kept and printed '[UNK]'.

    Args:
      ids: int [B, T] dense (padded with [PAD]) or RaggedTensor [B, None].

    Returns:
      tf.string [B].
    """
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_tensor(default_value=PAD_ID)
    ids = tf.cast(tf.convert_to_tensor(ids), tf.int32)
    after_end = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=-1) > 0
    regular = tf.logical_or(
        ids >= self.vocab.num_reserved, tf.equal(ids, UNK_ID)
    )
    keep = tf.logical_and(regular, tf.logical_not(after_end))
    return self._fast.detokenize(tf.ragged.boolean_mask(ids, keep))

  def detokenize_to_strings(self, ids) -> List[str]:
    """`detokenize` as a Python list of str (eager only)."""
    return [t.decode("utf-8") for t in self.detokenize(ids).numpy()]
