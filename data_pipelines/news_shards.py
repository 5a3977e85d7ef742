"""Sharded one-sentence-per-line news text (the paper's 100B-word setup).

Any glob (or list of globs) of text shards, streamed shard by shard with
`tf.data.TextLineDataset` (a few shards interleaved), never loaded whole into
memory. Per-replica input pipelines read disjoint shards (see
`data_pipelines.text_io`). The vocabulary is built on a first pass over the
shards (optionally only the first `vocab_max_files`, since counting 100B
words takes hours), with progress logged per shard, and saved to
`vocab_file` when `create_vocab_if_missing=True`.

The paper trains the 100B-word models for one pass; use `repeat=False` and
one epoch, or `repeat=True` with `steps_per_epoch`.
"""

from typing import Optional

import gin

from data_pipelines import lm
from data_pipelines import text_io

# Default global token budget per step (the gin file binds the paper's).
BATCH_TOKENS = 8192
NEWS_LAYOUT = (
    "a glob of UTF-8 text shards (optionally .gz), one tokenized sentence per"
    " line, e.g. /data/news/news.en-*-of-01000"
)


@gin.configurable
def news_lm_data(
    train_files=gin.REQUIRED,
    eval_files=None,
    *,
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = False,
    min_count: int = 1,
    max_vocab_size: Optional[int] = None,
    expected_vocab_size: Optional[int] = None,
    vocab_max_files: Optional[int] = None,
    cycle_length: int = text_io.DEFAULT_CYCLE_LENGTH,
    name: str = "news",
    batching: Optional[lm.LmBatching] = None,
    **legacy_batching,
) -> lm.LmData:
  """LM data streamed from sharded one-sentence-per-line text.

  Args:
    train_files: glob(s) of training shards (gin macro TRAIN_FILES).
    eval_files: glob(s) of evaluation shards (gin macro EVAL_FILES) or None.
    vocab_file: word vocabulary to load; None builds one from the shards.
    create_vocab_if_missing: build (first pass, with progress) and save
      vocab_file if it does not exist.
    min_count: when building, keep words seen at least this many times.
    max_vocab_size: when building, cap the size (specials included).
    expected_vocab_size: fail unless the vocabulary has exactly this size.
    vocab_max_files: count words on only the first N shards.
    cycle_length: shards read concurrently.
    name: label used in logs.
    batching: LmBatching; None takes the gin-bound `lm_batching` (default
      budget BATCH_TOKENS).
    **legacy_batching: LmBatching fields by name (older configs).

  Returns:
    LmData.
  """
  return lm.files_lm_data(
      name=name,
      train_files=train_files,
      eval_files=eval_files,
      layout=NEWS_LAYOUT,
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      min_count=min_count,
      max_vocab_size=max_vocab_size,
      expected_vocab_size=expected_vocab_size,
      vocab_max_files=vocab_max_files,
      cycle_length=cycle_length,
      options=lm.LmBatching.resolve(
          batching,
          legacy_batching,
          owner="news_lm_data",
          batch_tokens=BATCH_TOKENS,
      ),
  )
