"""One Billion Word benchmark (Chelba et al. 2013) from the raw release.

Layout of the release (`1-billion-word-language-modeling-benchmark-r13output`):

  training-monolingual.tokenized.shuffled/news.en-000NN-of-00100
      (NN = 01..99; 99 training shards, ~30M sentences, ~0.8B words)
  heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050
      (NN = 00..49; held-out shard 00000 is the conventional test set)

Text is already tokenized (space-separated), one sentence per line. The
paper's vocabulary is `<S>`, `</S>`, `<UNK>` plus every training word seen at
least 3 times: 793,471 entries (`LM1B_VOCAB_SIZE`). Building it takes one
pass over the training shards (progress logged per shard); save it with
`vocab_file=... , create_vocab_if_missing=True` and it is loaded next time.

If TensorFlow Datasets' `lm1b` is prepared (`tfds.load('lm1b')`), set
`use_tfds=True` to read it instead of raw files (TFDS is optional and not a
dependency; its train split is the same 99 shards, its test split the 50
held-out shards, not just shard 0).
"""

import os
from typing import Dict, List, Optional

import gin

from data_pipelines import lm
from data_pipelines import text_io
from data_pipelines import word_vocab as word_vocab_lib
from data_pipelines.errors import DataError

RELEASE_DIR = "1-billion-word-language-modeling-benchmark-r13output"
TRAIN_SUBDIR = "training-monolingual.tokenized.shuffled"
HELDOUT_SUBDIR = "heldout-monolingual.tokenized.shuffled"
TRAIN_PATTERN = os.path.join(TRAIN_SUBDIR, "news.en-000??-of-00100")
HELDOUT_PATTERN = os.path.join(HELDOUT_SUBDIR, "news.en.heldout-000??-of-00050")
TEST_SHARD = os.path.join(HELDOUT_SUBDIR, "news.en.heldout-00000-of-00050")
VALID_SHARD = os.path.join(HELDOUT_SUBDIR, "news.en.heldout-00001-of-00050")
LM1B_MIN_COUNT = 3
# Default global token budget per step (paper: ~300k words).
BATCH_TOKENS = 300000
LM1B_VOCAB_SIZE = 793471
LM1B_LAYOUT = (
    f"{RELEASE_DIR}/{TRAIN_PATTERN} for training and"
    f" {RELEASE_DIR}/{TEST_SHARD} for evaluation"
)


def release_files(data_dir: str) -> Dict[str, List[str]]:
  """Files of an unpacked 1B Word release.

  Args:
    data_dir: the release directory (the one holding the two subdirectories).

  Returns:
    {'train': 99 training shards, 'valid': [held-out shard 1],
     'test': [held-out shard 0], 'heldout': all held-out shards}.

  Raises:
    DataError: if the training shards or held-out shard 0 are missing.
  """
  data_dir = os.path.expanduser(data_dir)
  train = text_io.resolve_files(
      os.path.join(data_dir, TRAIN_PATTERN),
      what="1B Word training shards",
      expected_layout=LM1B_LAYOUT,
  )
  heldout = text_io.resolve_files(
      os.path.join(data_dir, HELDOUT_PATTERN),
      what="1B Word held-out shards",
      expected_layout=LM1B_LAYOUT,
  )
  test = os.path.join(data_dir, TEST_SHARD)
  if test not in heldout:
    raise DataError(
        f"1B Word test shard {test!r} is missing; expected layout:"
        f" {LM1B_LAYOUT}"
    )
  valid = os.path.join(data_dir, VALID_SHARD)
  return {
      "train": train,
      "valid": [valid] if valid in heldout else [],
      "test": [test],
      "heldout": heldout,
  }


def tfds_line_source(split: str, data_dir: Optional[str]) -> lm.LineSource:
  """LineSource over TFDS `lm1b` (must already be prepared; never downloads).

  Raises:
    DataError: if tensorflow_datasets is missing or lm1b is not prepared.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        "use_tfds=True needs the optional package tensorflow_datasets with"
        " lm1b prepared; or set TRAIN_FILES/EVAL_FILES to the raw release"
        f" ({LM1B_LAYOUT})"
    ) from e
  try:
    builder = tfds.builder("lm1b", data_dir=data_dir)
    if not builder.is_prepared():
      raise DataError(
          f"TFDS lm1b is not prepared under data_dir={data_dir!r}; run"
          ' tfds.builder("lm1b").download_and_prepare() once, or use the raw'
          " files"
      )
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot open TFDS lm1b ({data_dir!r}): {e}") from e

  def _source(input_context, training, seed):
    read_config = tfds.ReadConfig(
        input_context=input_context, shuffle_seed=seed
    )
    ds = builder.as_dataset(
        split=split, shuffle_files=training, read_config=read_config
    )
    return ds.map(lambda example: example["text"])

  return _source


@gin.configurable
def lm1b_lm_data(
    train_files=None,
    eval_files=None,
    *,
    data_dir: Optional[str] = None,
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = False,
    min_count: int = LM1B_MIN_COUNT,
    expected_vocab_size: Optional[int] = None,
    use_tfds: bool = False,
    tfds_data_dir: Optional[str] = None,
    batching: Optional[lm.LmBatching] = None,
    **legacy_batching,
) -> lm.LmData:
  """1B Word benchmark LM data.

  Args:
    train_files: glob(s) of training shards (gin macro TRAIN_FILES); if None,
      derived from data_dir.
    eval_files: glob(s) of evaluation shards (gin macro EVAL_FILES); if None,
      held-out shard 00000 of data_dir.
    data_dir: the unpacked release directory (alternative to the globs).
    vocab_file: vocabulary to load (or create, see below); None builds it in
      memory from the training shards.
    create_vocab_if_missing: build and save vocab_file if it does not exist.
    min_count: keep training words seen at least this often (paper: 3).
    expected_vocab_size: fail unless the vocabulary has this size (793471 for
      the full release with min_count=3).
    use_tfds: read TFDS `lm1b` instead of raw files.
    tfds_data_dir: TFDS data_dir.
    batching: LmBatching; None takes the gin-bound `lm_batching` (default
      budget BATCH_TOKENS, the paper's ~300k words per step).
    **legacy_batching: LmBatching fields by name (older configs).

  Returns:
    LmData named 'lm1b'.
  """
  options = lm.LmBatching.resolve(
      batching, legacy_batching, owner="lm1b_lm_data", batch_tokens=BATCH_TOKENS
  )
  if use_tfds:
    train_source = tfds_line_source("train", tfds_data_dir)
    eval_source = tfds_line_source("test", tfds_data_dir)

    def _count():
      lines = train_source(None, False, 0).batch(
          word_vocab_lib.COUNT_CHUNK_LINES
      )
      return word_vocab_lib.count_words_in_batches(
          lines, what="lm1b (TFDS): counting training words"
      )

    vocab = lm.resolve_word_vocab(
        vocab_file=vocab_file,
        create_vocab_if_missing=create_vocab_if_missing,
        count_words=_count,
        min_count=min_count,
        max_size=None,
        expected_size=expected_vocab_size,
    )
    return lm.make_lm_data(
        name="lm1b",
        vocab=vocab,
        train_lines=train_source,
        eval_lines=eval_source,
        options=options,
    )
  if train_files is None or eval_files is None:
    if data_dir is None:
      raise DataError(
          "lm1b_lm_data needs TRAIN_FILES and EVAL_FILES (or data_dir);"
          f" expected layout: {LM1B_LAYOUT}"
      )
    files = release_files(data_dir)
    train_files = train_files or files["train"]
    eval_files = eval_files or files["test"]
  return lm.files_lm_data(
      name="lm1b",
      train_files=train_files,
      eval_files=eval_files,
      layout=LM1B_LAYOUT,
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      min_count=min_count,
      max_vocab_size=None,
      expected_vocab_size=expected_vocab_size,
      vocab_max_files=None,
      cycle_length=text_io.DEFAULT_CYCLE_LENGTH,
      options=options,
  )
