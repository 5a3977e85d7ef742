"""Tests of file resolution, line counting, sharding, word vocabularies and
the batching helpers."""

import collections
import gzip
import os

import dp_testlib as testlib
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import batching
from data_pipelines import text_io
from data_pipelines import word_vocab
from data_pipelines.errors import DataError


def test_resolve_files_sorted_and_deduplicated():
  train = testlib.LM1B_TRAIN_DIR
  files = text_io.resolve_files(
      [str(train / "news.en-0000[32]-of-00100"), str(train / "*00003*")],
      what="x",
      expected_layout="y",
  )
  assert files == [
      str(train / "news.en-00002-of-00100"),
      str(train / "news.en-00003-of-00100"),
  ]
  # Comma-separated string of globs.
  assert (
      text_io.resolve_files(
          f"{files[0]}, {files[1]}", what="x", expected_layout="y"
      )
      == files
  )


def test_resolve_files_no_match_names_pattern_and_layout(tmp_path):
  pattern = str(tmp_path / "missing-*.txt")
  with pytest.raises(DataError) as err:
    text_io.resolve_files(
        pattern, what="training files", expected_layout="one sentence per line"
    )
  message = str(err.value)
  assert pattern in message and "one sentence per line" in message
  assert "training files" in message and "\n" not in message
  with pytest.raises(DataError, match="TRAIN_FILES"):
    text_io.resolve_files(None, what="training files", expected_layout="z")


@pytest.mark.parametrize(
    "content, expected",
    [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\n\nb\n", 4), (b"\n", 1)],
)
def test_count_lines_matches_text_line_dataset(tmp_path, content, expected):
  path = tmp_path / "f.txt"
  path.write_bytes(content)
  assert text_io.count_lines(str(path)) == expected
  assert len(list(tf.data.TextLineDataset(str(path)))) == expected


def test_count_lines_gzip(tmp_path):
  path = tmp_path / "f.txt.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"x\ny\nz\n")
  assert text_io.count_lines(str(path)) == 3


def test_parallel_files_with_different_counts(tmp_path):
  src, tgt = tmp_path / "c.fr-en.en", tmp_path / "c.fr-en.fr"
  src.write_text("a\nb\nc\n")
  tgt.write_text("x\ny\n")
  with pytest.raises(DataError) as err:
    text_io.check_parallel_files(str(src), str(tgt))
  message = str(err.value)
  assert str(src) in message and str(tgt) in message
  assert "3 lines" in message and "2 lines" in message
  tgt.write_text("x\ny\nz\n")
  assert text_io.check_parallel_files(str(src), str(tgt)) == 3


@pytest.mark.parametrize("num_files, pipelines", [(5, 2), (2, 3), (4, 4)])
def test_line_dataset_shards_disjoint_and_complete(
    tmp_path, num_files, pipelines
):
  files, expected = [], []
  for i in range(num_files):
    lines = [f"file{i} line{j}" for j in range(7)]
    path = tmp_path / f"s{i}.txt"
    path.write_text("\n".join(lines) + "\n")
    files.append(str(path))
    expected += lines
  shards = []
  for p in range(pipelines):
    context = tf.distribute.InputContext(pipelines, p, pipelines)
    ds = text_io.line_dataset(
        files, input_context=context, shuffle_files=True, seed=1
    )
    shards.append([l.decode() for l in ds.as_numpy_iterator()])
  for a in range(pipelines):
    assert shards[a]  # every pipeline gets data
    for b in range(a + 1, pipelines):
      assert not set(shards[a]) & set(shards[b])
  assert sorted(sum(shards, [])) == sorted(expected)


def test_write_lines_is_whole_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "vocab.txt"
  text_io.write_lines(str(path), ["a", "b"])
  assert path.read_text() == "a\nb\n"

  def lines_then_failure():
    yield "half"
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    text_io.write_lines(str(path), lines_then_failure())
  assert path.read_text() == "a\nb\n"
  assert os.listdir(path.parent) == ["vocab.txt"]


def test_word_vocab_from_counts_order_cutoff_and_cap():
  counts = {"b": 5, "a": 5, "c": 2, "d": 1, "<UNK>": 7}
  vocab = word_vocab.WordVocab.from_counts(counts, min_count=2)
  # Specials first, then by count descending, ties alphabetical.
  assert vocab.tokens == ["<S>", "</S>", "<UNK>", "a", "b", "c"]
  assert vocab.counts == [0, 0, 7, 5, 5, 2]
  assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.encode(["a", "zzz", "c"]) == [3, 2, 5]
  capped = word_vocab.WordVocab.from_counts(counts, max_size=4)
  assert capped.tokens == ["<S>", "</S>", "<UNK>", "a"]


def test_word_vocab_save_load_round_trip(tmp_path):
  vocab = word_vocab.WordVocab.from_counts({"x": 3, "y": 1})
  path = str(tmp_path / "sub" / "vocab.txt")
  vocab.save(path)
  assert testlib.read_lines(path) == [
      "<S>\t0",
      "</S>\t0",
      "<UNK>\t0",
      "x\t3",
      "y\t1",
  ]
  loaded = word_vocab.WordVocab.load(path)
  assert loaded.tokens == vocab.tokens and loaded.counts == vocab.counts
  # Plain one-token-per-line files load too (ids from line order).
  plain = tmp_path / "plain.txt"
  plain.write_text("</S>\n<S>\n<UNK>\nthe\n")
  loaded = word_vocab.WordVocab.load(str(plain))
  assert (loaded.bos_id, loaded.eos_id, loaded.token_to_id("the")) == (1, 0, 3)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ("[PAD]\n[UNK]\n[START]\n[END]\nab\n", "wordpiece"),
        ("<S>\n</S>\n<UNK>\nthe\nthe\n", "twice"),
        ("<S>\n</S>\n<UNK>\nthe\t12\textra\n", "line 4"),
    ],
)
def test_word_vocab_bad_files(tmp_path, content, match):
  path = tmp_path / "v.txt"
  path.write_text(content)
  with pytest.raises(DataError, match=match) as err:
    word_vocab.WordVocab.load(str(path))
  assert "\n" not in str(err.value)


def test_word_vocab_missing_and_size_mismatch(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    word_vocab.WordVocab.load(str(tmp_path / "none.txt"))
  path = str(tmp_path / "v.txt")
  word_vocab.WordVocab.from_counts({"a": 1}).save(path)
  with pytest.raises(DataError, match="has 4 entries but 5"):
    word_vocab.WordVocab.load(path, expected_size=5)


def test_count_words_in_files_matches_python(tmp_path):
  files = sorted(str(p) for p in testlib.LM1B_TRAIN_DIR.iterdir())
  expected = collections.Counter()
  for path in files:
    for line in testlib.read_lines(path):
      expected.update(line.split())
  assert word_vocab.count_words_in_files(files) == expected
  # Tabs and repeated spaces separate words; invalid UTF-8 becomes U+FFFD.
  odd = tmp_path / "odd.txt"
  odd.write_bytes(b"a\tb  a\n\xff c\n")
  assert word_vocab.count_words_in_files([str(odd)]) == {
      "a": 2,
      "b": 1,
      "\ufffd": 1,
      "c": 1,
  }
  assert word_vocab.split_words("a\tb  a\x0bc") == ["a", "b", "a", "c"]


def _reference_bounds(lengths, budget, multiple=1, cap=None):
  bounds, start = [], 0
  while start < len(lengths):
    padded = -(-lengths[start] // multiple) * multiple
    size = max(budget // padded, 1)
    if cap:
      size = min(size, cap)
    end = min(start + size, len(lengths))
    bounds.append([start, end])
    start = end
  return bounds


@pytest.mark.parametrize(
    "lengths, budget, multiple, cap",
    [
        ([9, 9, 7, 5, 5, 5, 3, 2, 2, 2, 1], 20, 1, None),
        ([9, 9, 7, 5, 5, 5, 3, 2, 2, 2, 1], 20, 4, None),
        ([6, 6, 6, 6], 100, 1, 3),
        ([], 10, 1, None),
    ],
)
def test_greedy_batch_bounds(lengths, budget, multiple, cap):
  got = (
      batching.greedy_batch_bounds(
          tf.constant(lengths, tf.int32),
          budget,
          max_batch_size=cap,
          length_multiple=multiple,
      )
      .numpy()
      .tolist()
  )
  assert got == _reference_bounds(lengths, budget, multiple, cap)
  for start, end in got:
    padded = -(-lengths[start] // multiple) * multiple
    assert (end - start) * padded <= budget or end - start == 1


def test_stateless_choices_follow_weights_and_seed():
  draws = list(
      batching.stateless_choices([1.0, 3.0, 0.0], seed=5)
      .take(20000)
      .as_numpy_iterator()
  )
  freq = np.bincount(draws, minlength=3) / len(draws)
  assert abs(freq[0] - 0.25) < 0.02 and abs(freq[1] - 0.75) < 0.02
  assert freq[2] == 0.0
  again = list(
      batching.stateless_choices([1.0, 3.0, 0.0], seed=5)
      .take(100)
      .as_numpy_iterator()
  )
  assert again == draws[:100]
  with pytest.raises(ValueError):
    batching.stateless_choices([0.0, 0.0], seed=1)


def test_count_and_log_records_each_epoch():
  stats = batching.PipelineStats("unit")
  counts = [
      batching.stats_vector(lines=2, examples=1),
      batching.stats_vector(lines=3, empty_skipped=1),
  ]
  windows = tf.data.Dataset.from_tensor_slices(
      (tf.constant([[1], [2]]), tf.stack(counts))
  )
  out = batching.count_and_log(windows, stats).repeat(2)
  assert [x.tolist() for x in out.as_numpy_iterator()] == [[1], [2], [1], [2]]
  assert len(stats.epochs) == 2
  assert stats.last["lines"] == 5 and stats.last["empty_skipped"] == 1
  assert stats.last["examples"] == 1


def test_unstreamable_compression_is_rejected():
  assert text_io.compression_of("a.en.gz") == "GZIP"
  assert text_io.compression_of("a.en") == ""
  with pytest.raises(DataError, match="gzip"):
    text_io.compression_of("giga-fren.release2.fixed.en.xz")
