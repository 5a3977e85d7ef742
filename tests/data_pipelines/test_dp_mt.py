"""Tests of the translation pipelines (WMT'14 layouts, TSV, batching)."""

import collections

import dp_testlib as testlib
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import mt
from data_pipelines import wmt14
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

TRAIN = testlib.WMT_DIR / "training"
TEST_SRC = testlib.WMT_DIR / "test-full" / "newstest2014-fren-src.en.sgm"
TEST_REF = testlib.WMT_DIR / "test-full" / "newstest2014-fren-ref.fr.sgm"
FR_EN_GLOB = str(TRAIN / "*.fr-en.*")


def _pairs(name):
  return list(
      zip(
          testlib.read_lines(TRAIN / f"{name}.en"),
          testlib.read_lines(TRAIN / f"{name}.fr"),
      )
  )


TRAIN_PAIRS = _pairs("commoncrawl.fr-en") + _pairs("europarl-v7.fr-en")


def _norm(text):
  return " ".join(text.split())


@pytest.fixture(scope="module", name="vocab_file")
def vocab_file_fixture(tmp_path_factory):
  texts = [t for pair in TRAIN_PAIRS for t in pair]
  texts += [
      t
      for line in testlib.read_lines(testlib.TSV_DIR / "pairs.en-fr.tsv")
      for t in line.split("\t")
  ]
  vocab = wordpiece.WordpieceVocab.learn(texts, vocab_size=400, lower_thresh=1)
  path = str(tmp_path_factory.mktemp("vocab") / "wp.txt")
  vocab.save(path)
  return path


def _data(vocab_file, train=FR_EN_GLOB, evals=str(TEST_SRC), **kwargs):
  options = testlib.pop_batching(
      mt.MtBatching, kwargs, batch_tokens=96, max_length=48
  )
  return wmt14.wmt14_mt_data(
      train, evals, vocab_file=vocab_file, batching=options, **kwargs
  )


def _decode(data, dataset):
  """Checks batch structure; returns [(source text, target text)] and shapes."""
  tok = data.tokenizer
  pairs, shapes = [], []
  for x, target_out, weights in dataset.as_numpy_iterator():
    source, target_in = x["source"], x["target_in"]
    assert source.dtype == target_in.dtype == target_out.dtype == np.int32
    assert target_in.shape == target_out.shape == weights.shape
    shapes.append((source.shape, target_in.shape))
    for row in range(source.shape[0]):
      n = int(weights[row].sum())
      assert target_in[row, 0] == wordpiece.START_ID
      assert target_out[row, n - 1] == wordpiece.END_ID
      np.testing.assert_array_equal(
          target_in[row, 1:n], target_out[row, : n - 1]
      )
      np.testing.assert_array_equal(target_out[row, n:], wordpiece.PAD_ID)
      np.testing.assert_array_equal(target_in[row, n:], wordpiece.PAD_ID)
      assert wordpiece.PAD_ID not in source[row, :1]
    src_text = tok.detokenize_to_strings(source)
    tgt_text = tok.detokenize_to_strings(target_out)
    pairs += list(zip(src_text, tgt_text))
  return pairs, shapes


def test_discover_text_sgm_and_tsv():
  corpora = wmt14.discover_corpora(
      [FR_EN_GLOB, str(TEST_SRC), str(testlib.TSV_DIR / "*.tsv")],
      source_lang="en",
      target_lang="fr",
      what="files",
  )
  summary = [(c.name, c.kind, c.num_lines) for c in corpora]
  assert summary == [
      ("pairs.en-fr.tsv", "tsv", 3),
      ("newstest2014-fren-src.en.sgm", "memory", 5),
      ("commoncrawl.fr-en", "text", 4),
      ("europarl-v7.fr-en", "text", 6),
  ]


def test_sgm_pairs_by_doc_and_segment():
  corpus = wmt14.sgm_corpus(str(TEST_SRC), str(TEST_REF))
  pairs = list(corpus.iter_pairs())
  assert pairs[0] == (
      "Spectacular Wingsuit Jump Over Bogota",
      'Spectaculaire saut en "wingsuit" au-dessus de Bogota',
  )
  assert pairs[3] == (
      '"It is a question of safety," he said.',
      "« C'est une question de sécurité », a-t-il déclaré.",
  )
  assert len(pairs) == 5


def test_sgm_mismatch_and_missing_partner(tmp_path):
  src = tmp_path / "newstest2014-fren-src.en.sgm"
  ref = tmp_path / "newstest2014-fren-ref.fr.sgm"
  src.write_text(TEST_SRC.read_text())
  lines = TEST_REF.read_text().splitlines()
  ref.write_text("\n".join(l for l in lines if 'seg id="3"' not in l))
  with pytest.raises(DataError) as err:
    wmt14.discover_corpora(
        str(src), source_lang="en", target_lang="fr", what="eval"
    )
  message = str(err.value)
  assert str(src) in message and str(ref) in message
  assert "5 segments" in message and "has 4" in message
  ref.unlink()
  with pytest.raises(DataError, match="partner"):
    wmt14.discover_corpora(
        str(src), source_lang="en", target_lang="fr", what="eval"
    )
  empty = tmp_path / "x-src.en.sgm"
  empty.write_text("<srcset>\n</srcset>\n")
  with pytest.raises(DataError, match="no <seg"):
    wmt14.parse_sgm(str(empty))


def test_text_pairs_errors(tmp_path):
  (tmp_path / "c.fr-en.en").write_text("a\nb\nc\n")
  (tmp_path / "c.fr-en.fr").write_text("x\ny\n")
  with pytest.raises(DataError) as err:
    wmt14.discover_corpora(
        str(tmp_path / "*.en"), source_lang="en", target_lang="fr", what="train"
    )
  assert "3 lines" in str(err.value) and "2 lines" in str(err.value)
  (tmp_path / "solo.fr-en.en").write_text("a\n")
  with pytest.raises(DataError, match="solo.fr-en.fr"):
    wmt14.discover_corpora(
        str(tmp_path / "solo*"),
        source_lang="en",
        target_lang="fr",
        what="train",
    )
  (tmp_path / "notes.txt").write_text("a\n")
  with pytest.raises(DataError, match="cannot tell the language"):
    wmt14.discover_corpora(
        str(tmp_path / "notes.txt"),
        source_lang="en",
        target_lang="fr",
        what="train",
    )


def test_epoch_covers_every_pair_once_within_budget(vocab_file):
  data = _data(vocab_file)
  pairs, shapes = _decode(data, data.train_dataset())
  expected = collections.Counter((_norm(s), _norm(t)) for s, t in TRAIN_PAIRS)
  assert collections.Counter(pairs) == expected
  for (b, s), (_, t) in shapes:
    assert b * max(s, t) <= 96
  stats = data.stats["wmt14/train"].last
  assert stats["lines"] == stats["examples"] == 10
  tok = data.tokenizer
  expected_tgt_tokens = sum(
      len(ids) + 1
      for ids in tok.tokenize(
          tf.constant([t for _, t in TRAIN_PAIRS])
      ).to_list()
  )
  assert stats["target_tokens"] == expected_tgt_tokens


def test_eval_pairs_and_eval_dataset(vocab_file):
  data = _data(vocab_file)
  assert [p[:2] for p in data.eval_pairs()] == list(
      wmt14.sgm_corpus(str(TEST_SRC), str(TEST_REF)).iter_pairs()
  )
  pairs, _ = _decode(data, data.eval_dataset())
  assert len(pairs) == 5


def test_dict_format_masks(vocab_file):
  data = _data(vocab_file, output_format="dict")
  for batch in data.train_dataset().as_numpy_iterator():
    assert set(batch) == {
        "source",
        "target_in",
        "target_out",
        "source_mask",
        "weights",
    }
    np.testing.assert_array_equal(batch["source_mask"], batch["source"] != 0)
    np.testing.assert_array_equal(
        batch["weights"] > 0, batch["target_out"] != 0
    )


def test_same_seed_same_batches(vocab_file):
  def run(seed):
    # Windows of 2 lines, so that the line shuffle decides the batches.
    ds = _data(vocab_file, seed=seed, window_lines=2).train_dataset()
    return [x["source"].tolist() for x, _, _ in ds.as_numpy_iterator()]

  assert run(1) == run(1)
  assert run(1) != run(2)


def test_replica_shards_disjoint_and_complete(vocab_file):
  data = _data(vocab_file)
  shards = []
  for index in range(2):
    context = tf.distribute.InputContext(2, index, 2)
    pairs, shapes = _decode(data, data.train_dataset(context))
    for (b, s), (_, t) in shapes:
      assert b * max(s, t) <= 48
    shards.append(collections.Counter(pairs))
  assert not set(shards[0]) & set(shards[1])
  assert shards[0] + shards[1] == collections.Counter(
      (_norm(s), _norm(t)) for s, t in TRAIN_PAIRS
  )


def test_corpus_weights_set_sampling_rates(vocab_file):
  data = _data(
      vocab_file,
      corpus_weights={"europarl": 3.0, "commoncrawl": 1.0},
      batch_tokens=512,
      max_length=64,
  )
  europarl = {_norm(s) for s, _ in _pairs("europarl-v7.fr-en")}
  counts = collections.Counter()
  for x, _, _ in data.train_dataset().take(150):
    for text in data.tokenizer.detokenize_to_strings(x["source"]):
      counts["europarl" if text in europarl else "commoncrawl"] += 1
  total = sum(counts.values())
  assert total > 2000
  assert abs(counts["europarl"] / total - 0.75) < 0.04
  with pytest.raises(DataError, match="corpus_weights"):
    _data(vocab_file, corpus_weights={"europarl": 1.0})


def test_bad_tsv_lines_are_counted(tmp_path, vocab_file):
  long_source = " ".join(["session"] * 30)
  content = (
      "Good morning.\tBonjour.\n"
      "no tab here\n"
      "too\tmany\ttabs\n"
      "\tLe chat est noir.\n"
      "\n"
      "The cat is black.\tLe chat est noir.\n" + long_source + "\tBonjour.\n"
  ).encode() + b"See you\xff tomorrow.\t\xc0 demain.\n"
  path = tmp_path / "bad.en-fr.tsv"
  path.write_bytes(content)
  for policy in ("drop", "truncate"):
    data = _data(
        vocab_file,
        train=str(path),
        evals=None,
        max_length=20,
        length_policy=policy,
    )
    pairs, _ = _decode(data, data.train_dataset())
    stats = data.stats["wmt14/train"].last
    assert stats["lines"] == 8
    assert stats["malformed_skipped"] == 2
    assert stats["empty_skipped"] == 2
    assert stats["invalid_utf8_replaced"] == 1
    assert ("Good morning.", "Bonjour.") in pairs
    if policy == "drop":
      assert stats["too_long_dropped"] == 1 and len(pairs) == 3
    else:
      assert stats["too_long_truncated"] == 1 and len(pairs) == 4
    # U+FFFD is outside the learned alphabet: its words become [UNK].
    assert ("See [UNK] tomorrow.", "[UNK] demain.") in pairs


def test_tsv_columns_swapped_by_file_name(vocab_file):
  tsv = str(testlib.TSV_DIR / "pairs.en-fr.tsv")
  data = _data(
      vocab_file, train=tsv, evals=None, source_lang="fr", target_lang="en"
  )
  pairs, _ = _decode(data, data.train_dataset())
  assert ("Le chat est noir.", "The cat is black.") in pairs


def test_mixing_without_weights_reads_each_corpus_once(vocab_file):
  corpora = wmt14.discover_corpora(
      FR_EN_GLOB, source_lang="en", target_lang="fr", what="train"
  )
  lines = mt.mixed_lines(
      corpora,
      weights=None,
      language_ids=None,
      training=True,
      seed=3,
      input_context=None,
  )
  got = [(s.decode(), t.decode()) for (s, t, _), _ in lines.as_numpy_iterator()]
  assert sorted(got) == sorted(TRAIN_PAIRS)
