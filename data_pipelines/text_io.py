"""File discovery, line counting, progress logging and sharded line reading.

This module holds the file-level plumbing shared by every corpus:

* `resolve_files` expands globs (or lists of globs) into a sorted file list and
  raises a one-line `DataError` naming the pattern and the expected on-disk
  layout when nothing matches.
* `count_lines` / `check_parallel_files` count lines with the same convention
  as `tf.data.TextLineDataset` (split on `\\n`; a final unterminated line
  counts) and reject parallel files whose line counts differ.
* `ProgressLogger` logs progress of long steps (corpus building, vocabulary
  learning, first passes over shards) at most every few seconds.
* `line_dataset` reads text files as a `tf.data.Dataset` of lines, sharded per
  input pipeline (`tf.distribute.InputContext`), with seeded file shuffling.

Sharding rule (used everywhere): with `P = num_input_pipelines` and pipeline
`p`, if there are at least `P` files, pipeline `p` reads files `p, p+P, ...` of
the sorted list; otherwise every pipeline reads all files and keeps lines
`p, p+P, ...`. Either way the shards are disjoint and their union is the
corpus.
"""

import bz2
import gzip
import lzma
import os
import time
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from absl import logging
import tensorflow as tf

from data_pipelines.errors import DataError

FilePatterns = Union[str, Sequence[str]]

# Seconds between two progress lines of a long step.
PROGRESS_INTERVAL_SECONDS = 10.0
# Bytes read per block when counting lines.
COUNT_BLOCK_BYTES = 1 << 24
# Parallel reads of files interleaved into one line stream.
DEFAULT_CYCLE_LENGTH = 4
# Read buffer of tf.data.TextLineDataset, in bytes.
TEXT_LINE_BUFFER_BYTES = 1 << 20
_COMPRESSION_BY_SUFFIX = {".gz": "GZIP"}
_UNSTREAMABLE_SUFFIXES = (".bz2", ".xz", ".lz4", ".zst")


class ProgressLogger:
  """Logs `done/total` progress of a long step at most every few seconds.

  Example:
    progress = ProgressLogger('counting words', total=len(files), unit='files')
    for f in files:
      ...
      progress.update(1, extra=f'{num_words} words')
    progress.done()
  """

  def __init__(
      self,
      what: str,
      *,
      total: Optional[int] = None,
      unit: str = "items",
      interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
  ):
    self._what = what
    self._total = total
    self._unit = unit
    self._interval = interval_seconds
    self._count = 0
    self._start = time.monotonic()
    self._last = self._start
    logging.info(
        "%s: started%s", what, f" ({total} {unit})" if total is not None else ""
    )

  @property
  def count(self) -> int:
    return self._count

  def update(self, increment: int = 1, *, extra: str = "") -> None:
    """Adds `increment` to the count; logs if the interval has passed."""
    self._count += increment
    now = time.monotonic()
    if now - self._last >= self._interval:
      self._last = now
      logging.info(
          "%s: %s%s", self._what, self._status(now), extra and f", {extra}"
      )

  def done(self, *, extra: str = "") -> None:
    """Logs the final count and elapsed time."""
    logging.info(
        "%s: done, %s%s",
        self._what,
        self._status(time.monotonic()),
        extra and f", {extra}",
    )

  def _status(self, now: float) -> str:
    elapsed = max(now - self._start, 1e-9)
    total = f"/{self._total}" if self._total is not None else ""
    return (
        f"{self._count}{total} {self._unit} in {elapsed:.1f}s "
        f"({self._count / elapsed:.1f} {self._unit}/s)"
    )


def as_pattern_list(patterns: Optional[FilePatterns]) -> List[str]:
  """Normalizes a glob, a comma-separated string of globs or a list of globs.

  Args:
    patterns: None, a string (one glob, or several separated by commas) or a
      sequence of strings.

  Returns:
    The list of non-empty glob strings (empty for None).
  """
  if patterns is None:
    return []
  if isinstance(patterns, (str, os.PathLike)):
    patterns = str(patterns).split(",")
  return [
      os.path.expanduser(str(p).strip()) for p in patterns if str(p).strip()
  ]


def resolve_files(
    patterns: Optional[FilePatterns], *, what: str, expected_layout: str
) -> List[str]:
  """Expands globs into a sorted, de-duplicated list of existing files.

  Args:
    patterns: a glob, comma-separated globs, or a list of globs / paths.
    what: a short description used in errors, e.g. 'LM1B training shards'.
    expected_layout: description of the expected on-disk layout for errors.

  Returns:
    Sorted list of matching regular files.

  Raises:
    DataError: if `patterns` is empty or any pattern matches no file.
  """
  pattern_list = as_pattern_list(patterns)
  if not pattern_list:
    raise DataError(
        f"no {what} given (set the TRAIN_FILES / EVAL_FILES gin macro); "
        f"expected layout: {expected_layout}"
    )
  files = set()
  for pattern in pattern_list:
    matches = [m for m in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(m)]
    if not matches:
      raise DataError(
          f"{what}: {pattern!r} matches no file; expected layout: "
          f"{expected_layout}"
      )
    files.update(matches)
  return sorted(files)


def compression_of(path: str) -> str:
  """Returns the tf.data compression type ('' or 'GZIP') for a file name.

  Raises:
    DataError: for compressions tf.data cannot stream (.bz2, .xz, .lz4, .zst).
  """
  for suffix, kind in _COMPRESSION_BY_SUFFIX.items():
    if path.endswith(suffix):
      return kind
  if path.endswith(_UNSTREAMABLE_SUFFIXES):
    raise DataError(
        f"{path!r} is compressed in a format tf.data cannot stream;"
        " decompress it or recompress it with gzip (.gz)"
    )
  return ""


def open_binary(path: str):
  """Opens a possibly compressed (.gz, .bz2, .xz) file for binary reading."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".bz2"):
    return bz2.open(path, "rb")
  if path.endswith(".xz"):
    return lzma.open(path, "rb")
  return tf.io.gfile.GFile(path, "rb")


def count_lines(path: str, *, progress: bool = True) -> int:
  """Counts lines the way `tf.data.TextLineDataset` splits them.

  Args:
    path: a text file (optionally .gz / .bz2 / .xz compressed).
    progress: log progress for large files.

  Returns:
    Number of `\\n`-terminated lines, plus one if the file ends with an
    unterminated line.

  Raises:
    DataError: if the file does not exist.
  """
  if not tf.io.gfile.exists(path):
    raise DataError(f"file {path!r} does not exist")
  size = tf.io.gfile.stat(path).length
  logger = None
  if progress and size > 16 * COUNT_BLOCK_BYTES:
    logger = ProgressLogger(
        f"counting lines of {path}", total=size >> 20, unit="MiB"
    )
  lines = 0
  last = b"\n"
  with open_binary(path) as f:
    while True:
      block = f.read(COUNT_BLOCK_BYTES)
      if not block:
        break
      lines += block.count(b"\n")
      last = block[-1:]
      if logger:
        logger.update(len(block) >> 20)
  if logger:
    logger.done(extra=f"{lines} lines")
  return lines + (0 if last == b"\n" else 1)


def check_parallel_files(source_path: str, target_path: str) -> int:
  """Checks that two line-aligned files have the same number of lines.

  Args:
    source_path: source-language file.
    target_path: target-language file.

  Returns:
    The common line count.

  Raises:
    DataError: naming both files and both counts if they differ.
  """
  source_lines = count_lines(source_path)
  target_lines = count_lines(target_path)
  if source_lines != target_lines:
    raise DataError(
        f"parallel files are not line-aligned: {source_path!r} has "
        f"{source_lines} lines but {target_path!r} has {target_lines} lines"
    )
  return source_lines


def shard_plan(
    num_files: int, input_context: Optional[tf.distribute.InputContext]
) -> Tuple[List[int], int, int]:
  """Decides how one input pipeline reads its shard of a file list.

  Args:
    num_files: number of files in the (sorted) list.
    input_context: the pipeline's `tf.distribute.InputContext` or None.

  Returns:
    (file_indices, line_shards, line_shard_index): the files this pipeline
    reads, and the line-level sharding to apply to their concatenated lines
    (`line_shards == 1` means none).
  """
  if input_context is None or input_context.num_input_pipelines == 1:
    return list(range(num_files)), 1, 0
  num = input_context.num_input_pipelines
  index = input_context.input_pipeline_id
  if num_files >= num:
    return list(range(index, num_files, num)), 1, 0
  return list(range(num_files)), num, index


def line_dataset(
    files: Sequence[str],
    *,
    input_context: Optional[tf.distribute.InputContext] = None,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
    cycle_length: int = DEFAULT_CYCLE_LENGTH,
    deterministic: bool = True,
) -> tf.data.Dataset:
  """Streams the lines of text files for one input pipeline.

  Files are never loaded whole: each is read with `tf.data.TextLineDataset`
  and up to `cycle_length` files are interleaved.

  Args:
    files: sorted file list (optionally .gz compressed).
    input_context: per-replica sharding (see module docstring), or None.
    shuffle_files: shuffle this pipeline's file order every epoch.
    seed: seed of the file shuffle.
    cycle_length: number of files read concurrently.
    deterministic: keep a deterministic interleave order.

  Returns:
    A dataset of scalar tf.string lines (without the trailing newline).
  """
  file_indices, line_shards, line_index = shard_plan(len(files), input_context)
  own_files = [files[i] for i in file_indices]
  if not own_files:
    raise DataError("internal: an input pipeline received no files")
  compressions = {compression_of(f) for f in own_files}
  if len(compressions) > 1:
    raise DataError(
        f"cannot mix compressed and uncompressed files in one corpus: "
        f"{own_files[:4]}"
    )
  compression = compressions.pop()
  file_ds = tf.data.Dataset.from_tensor_slices(own_files)
  if shuffle_files and len(own_files) > 1:
    file_ds = file_ds.shuffle(
        len(own_files), seed=seed, reshuffle_each_iteration=True
    )

  def _read(path):
    return tf.data.TextLineDataset(
        path, compression_type=compression, buffer_size=TEXT_LINE_BUFFER_BYTES
    )

  if len(own_files) == 1:
    lines = _read(own_files[0])
  else:
    lines = file_ds.interleave(
        _read,
        cycle_length=min(cycle_length, len(own_files)),
        block_length=16,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
  if line_shards > 1:
    lines = lines.shard(line_shards, line_index)
  return lines


def read_raw_lines(path: str) -> Iterable[bytes]:
  """Yields the lines of a (possibly compressed) file as bytes, without '\\n'.

  Invalid UTF-8 is kept, so a tf.data pipeline that replaces it can count
  the lines it replaced (`invalid_utf8_replaced`).
  """
  with open_binary(path) as f:
    for raw in f:
      yield raw.rstrip(b"\n")


def read_text_lines(path: str) -> Iterable[str]:
  """Yields the lines of a (possibly compressed) file as str, without '\\n'.

  Invalid UTF-8 bytes are replaced by U+FFFD, like the tf.data pipelines do.
  """
  with open_binary(path) as f:
    for raw in f:
      yield raw.rstrip(b"\n").decode("utf-8", errors="replace")


def write_lines(path: str, lines: Iterable[str]) -> None:
  """Writes `lines` (no newlines) to `path` atomically; creates parents.

  Through a temporary sibling (one per process, so two builders never
  share it) and a rename; when writing fails the temporary file is removed
  and `path` is left as it was.

  Args:
    path: the file (any tf.io.gfile path).
    lines: the lines.
  """
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with tf.io.gfile.GFile(tmp, "w") as f:
      for line in lines:
        f.write(line + "\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
