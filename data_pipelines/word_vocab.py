"""Word-level vocabulary for the language-model pipelines.

A `WordVocab` maps whitespace-separated words to int32 ids. It always contains
the three special tokens of the 1B Word benchmark: `<S>` (sentence start, only
ever an input), `</S>` (sentence end, only ever a target) and `<UNK>` (any word
not in the vocabulary). Vocabularies built here put them first (ids 0, 1, 2)
and then the words by decreasing count, ties broken alphabetically (so a build
is deterministic). The paper's 1B Word vocabulary is the three specials plus
every training word seen at least 3 times: 793,471 entries.

File format (`save` / `load`): UTF-8, one entry per line, the token optionally
followed by a tab and its count ("the\\t41240381"). Lines are ids in order.
Files with plain one-token-per-line (e.g. the released lm_1b vocabulary) also
load, as long as they contain the three specials.

Words are split on ASCII whitespace (space, \\t, \\n, \\r, \\v, \\f), the same
as `tf.strings.split`; other Unicode spaces stay inside tokens.
"""

import collections
from typing import AnyStr, Dict, Iterable, List, Mapping, Optional, Sequence

import tensorflow as tf

from data_pipelines import text_io
from data_pipelines.errors import DataError

BOS = "<S>"
EOS = "</S>"
UNK = "<UNK>"
SPECIAL_TOKENS = (BOS, EOS, UNK)
# Lines read per TensorFlow counting step in `count_words_in_files`.
COUNT_CHUNK_LINES = 1 << 16
# Characters treated as word separators (same as tf.strings.split(sep=None)).
ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


_WHITESPACE_TO_SPACE = str.maketrans({c: " " for c in ASCII_WHITESPACE})


def split_words(line: str) -> List[str]:
  """Splits a line into words on ASCII whitespace (tf.strings.split rules)."""
  return [w for w in line.translate(_WHITESPACE_TO_SPACE).split(" ") if w]


class TokenList:
  """An ordered token list (ids are positions); base of the vocabularies.

  Subclasses set `self._tokens` (list of str) and `self._index` (token ->
  id) in their constructor.
  """

  _tokens: List[str]
  _index: Dict[str, int]

  def __len__(self) -> int:
    return len(self._tokens)

  @property
  def size(self) -> int:
    return len(self._tokens)

  @property
  def tokens(self) -> List[str]:
    return list(self._tokens)

  @staticmethod
  def check_loaded(
      what: str, path: str, tokens: List[str], expected_size: Optional[int]
  ) -> None:
    """Raises DataError if a loaded token list is empty or of the wrong size.

    Args:
      what: e.g. "word vocabulary", for the message.
      path: the file read.
      tokens: its tokens.
      expected_size: None, or the exact number of entries required.
    """
    if not tokens:
      raise DataError(f"{what} file {path!r} is empty")
    if expected_size is not None and len(tokens) != expected_size:
      raise DataError(
          f"{what} {path!r} has {len(tokens)} entries but"
          f" {expected_size} were expected (mismatched vocabulary file)"
      )


class WordVocab(TokenList):
  """Word <-> id mapping with `<S>`, `</S>`, `<UNK>` and optional counts."""

  def __init__(
      self,
      tokens: Sequence[str],
      counts: Optional[Sequence[int]] = None,
      *,
      source: str = "<memory>",
  ):
    """Creates a vocabulary from tokens in id order.

    Args:
      tokens: the tokens; token i gets id i.
      counts: optional per-token counts (same length).
      source: where the tokens came from, used in error messages.

    Raises:
      DataError: on duplicates, empty / whitespace-containing tokens, missing
        special tokens, or counts of the wrong length.
    """
    tokens = list(tokens)
    index: Dict[str, int] = {}
    for i, token in enumerate(tokens):
      if not token or any(c in token for c in ASCII_WHITESPACE):
        raise DataError(
            f"vocabulary {source}: entry {i} ({token!r}) is empty or contains"
            " whitespace"
        )
      if token in index:
        raise DataError(
            f"vocabulary {source}: token {token!r} appears twice (ids "
            f"{index[token]} and {i})"
        )
      index[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in index]
    if missing:
      raise DataError(
          f"vocabulary {source} lacks the special tokens {missing}; a word"
          " vocabulary needs <S>, </S> and <UNK> (is this a wordpiece"
          " vocabulary?)"
      )
    if counts is not None and len(counts) != len(tokens):
      raise DataError(
          f"vocabulary {source}: {len(counts)} counts for {len(tokens)} tokens"
      )
    self._tokens = tokens
    self._index = index
    self._counts = list(counts) if counts is not None else None
    self._table = None
    self.source = source

  # ---------------------------------------------------------------- building
  @classmethod
  def from_counts(
      cls,
      counts: Mapping[str, int],
      *,
      min_count: int = 1,
      max_size: Optional[int] = None,
      exclude: Iterable[str] = (),
  ) -> "WordVocab":
    """Builds a vocabulary from word counts.

    Args:
      counts: word -> count.
      min_count: keep words seen at least this many times.
      max_size: optional cap on the total size, specials included.
      exclude: words never added (e.g. PTB's own '<unk>').

    Returns:
      Specials first, then words by decreasing count, ties alphabetical.
    """
    if min_count < 1:
      raise ValueError(f"min_count={min_count} must be >= 1")
    if max_size is not None and max_size < len(SPECIAL_TOKENS):
      raise ValueError(f"max_size={max_size} must be >= {len(SPECIAL_TOKENS)}")
    skip = set(exclude) | set(SPECIAL_TOKENS)
    words = [
        (w, c) for w, c in counts.items() if c >= min_count and w not in skip
    ]
    words.sort(key=lambda wc: (-wc[1], wc[0]))
    if max_size is not None:
      words = words[: max_size - len(SPECIAL_TOKENS)]
    special_counts = [int(counts.get(t, 0)) for t in SPECIAL_TOKENS]
    return cls(
        list(SPECIAL_TOKENS) + [w for w, _ in words],
        special_counts + [int(c) for _, c in words],
    )

  # ------------------------------------------------------------------ access
  @property
  def counts(self) -> Optional[List[int]]:
    return list(self._counts) if self._counts is not None else None

  @property
  def bos_id(self) -> int:
    return self._index[BOS]

  @property
  def eos_id(self) -> int:
    return self._index[EOS]

  @property
  def unk_id(self) -> int:
    return self._index[UNK]

  def token_to_id(self, token: str) -> int:
    return self._index.get(token, self.unk_id)

  def id_to_token(self, token_id: int) -> str:
    return self._tokens[token_id]

  def encode(self, words: Iterable[str]) -> List[int]:
    """Maps words to ids in Python (unknown words -> unk_id)."""
    return [self._index.get(w, self.unk_id) for w in words]

  def decode(self, ids: Iterable[int]) -> List[str]:
    return [self._tokens[int(i)] for i in ids]

  def lookup_table(self) -> tf.lookup.StaticHashTable:
    """A TF string -> int64 id table (unknown words -> unk_id), cached."""
    if self._table is None:
      with tf.init_scope():
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self._tokens),
                tf.range(len(self._tokens), dtype=tf.int64),
            ),
            default_value=self.unk_id,
        )
    return self._table

  # ------------------------------------------------------------------ files
  def save(self, path: str) -> None:
    """Writes the vocabulary (token[\\tcount] per line); creates parents."""
    if self._counts is None:
      text_io.write_lines(path, self._tokens)
    else:
      text_io.write_lines(
          path, (f"{t}\t{c}" for t, c in zip(self._tokens, self._counts))
      )

  @classmethod
  def load(
      cls, path: str, *, expected_size: Optional[int] = None
  ) -> "WordVocab":
    """Loads a vocabulary file written by `save` (or one token per line).

    Args:
      path: the vocabulary file.
      expected_size: if given, the file must have exactly this many entries.

    Returns:
      The vocabulary.

    Raises:
      DataError: if the file is missing, empty, malformed, lacks the special
        tokens, or has the wrong size.
    """
    if not tf.io.gfile.exists(path):
      raise DataError(
          f"word vocabulary file {path!r} does not exist (build it with"
          " WordVocab.from_counts(...).save(path) or the pipeline's"
          " create_vocab_if_missing=True)"
      )
    tokens, counts = [], []
    with tf.io.gfile.GFile(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        line = raw.decode("utf-8", errors="strict").rstrip("\n").rstrip("\r")
        fields = line.split("\t") if "\t" in line else line.split(" ")
        if len(fields) == 1:
          tokens.append(fields[0])
          counts.append(None)
        elif len(fields) == 2 and fields[1].isdigit():
          tokens.append(fields[0])
          counts.append(int(fields[1]))
        else:
          raise DataError(
              f"word vocabulary {path!r} line {line_no} is {line!r}; expected"
              ' "token" or "token<TAB>count"'
          )
    cls.check_loaded("word vocabulary", path, tokens, expected_size)
    have_counts = all(c is not None for c in counts)
    return cls(tokens, counts if have_counts else None, source=repr(path))


def count_words_in_lines(lines: Iterable[AnyStr]) -> collections.Counter:
  """Counts words of in-memory lines (Python, ASCII-whitespace split).

  Bytes lines are decoded with invalid UTF-8 replaced by U+FFFD, as the
  tf.data pipelines do.
  """
  counter = collections.Counter()
  for line in lines:
    if isinstance(line, bytes):
      line = line.decode("utf-8", errors="replace")
    counter.update(split_words(line))
  return counter


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _count_chunk(lines):
  fixed = tf.strings.unicode_transcode(
      lines, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
  )
  words = tf.strings.split(fixed).flat_values
  unique, _, unique_counts = tf.unique_with_counts(words)
  return unique, unique_counts


def _add_chunk(counter: collections.Counter, lines: tf.Tensor) -> int:
  unique, unique_counts = _count_chunk(lines)
  unique_counts = unique_counts.numpy()
  counter.update(
      dict(
          zip(
              (w.decode("utf-8") for w in unique.numpy()),
              unique_counts.tolist(),
          )
      )
  )
  return int(unique_counts.sum())


def count_words_in_batches(
    batches: tf.data.Dataset, *, what: str = "counting words"
) -> collections.Counter:
  """Counts words of a dataset of tf.string [n] line batches (with progress).

  Args:
    batches: dataset of 1-D tf.string tensors of lines.
    what: progress label.

  Returns:
    Counter of word -> count (invalid UTF-8 replaced by U+FFFD first).
  """
  counter = collections.Counter()
  progress = text_io.ProgressLogger(what, unit="lines")
  words = 0
  for lines in batches:
    words += _add_chunk(counter, lines)
    progress.update(int(lines.shape[0]), extra=f"{words} words")
  progress.done(extra=f"{words} words, {len(counter)} distinct")
  return counter


def count_words_in_files(
    files: Sequence[str], *, what: str = "counting words"
) -> collections.Counter:
  """Counts words of text files with TensorFlow ops, showing progress.

  Invalid UTF-8 is replaced by U+FFFD first, exactly as the LM pipelines do,
  so counts match what the pipelines will look up.

  Args:
    files: text files (optionally .gz).
    what: progress label.

  Returns:
    Counter of word -> count.
  """
  counter = collections.Counter()
  progress = text_io.ProgressLogger(what, total=len(files), unit="files")
  total_words = 0
  for path in files:
    lines = tf.data.TextLineDataset(
        path, compression_type=text_io.compression_of(path)
    ).batch(COUNT_CHUNK_LINES)
    for chunk in lines:
      total_words += _add_chunk(counter, chunk)
    progress.update(1, extra=f"{total_words} words, {len(counter)} distinct")
  progress.done(extra=f"{total_words} words, {len(counter)} distinct")
  return counter
