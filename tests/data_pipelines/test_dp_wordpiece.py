"""Tests of the shared wordpiece vocabulary and tokenizer."""

import dp_testlib as testlib
import pytest
import tensorflow as tf

from data_pipelines import word_vocab
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

HAND_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[START]",
    "[END]",
    "<2fr>",
    "!",
    "d",
    "e",
    "h",
    "l",
    "o",
    "r",
    "w",
    "##!",
    "##d",
    "##e",
    "##h",
    "##l",
    "##o",
    "##r",
    "##w",
    "hello",
    "world",
    "##llo",
    "wor",
]


def _corpus():
  texts = []
  for name in ("europarl-v7.fr-en", "commoncrawl.fr-en"):
    for lang in ("en", "fr"):
      texts += testlib.read_lines(
          testlib.WMT_DIR / "training" / f"{name}.{lang}"
      )
  return texts


@pytest.fixture(scope="module", name="learned")
def learned_fixture():
  return wordpiece.WordpieceVocab.learn(
      _corpus(),
      vocab_size=300,
      extra_reserved_tokens=["<2fr>", "<2en>"],
      lower_thresh=1,
  )


def test_tokenize_with_hand_vocabulary():
  tokenizer = wordpiece.WordpieceTokenizer(
      wordpiece.WordpieceVocab(HAND_VOCAB, num_reserved=5)
  )
  ids = tokenizer.tokenize(tf.constant(["hello  world!", "hello\u00a0wor", ""]))
  # 'world!' -> 'world' '##!'; NBSP is a space; 'wor' is a whole piece.
  assert ids.to_list() == [[21, 22, 13], [21, 24], []]
  assert ids.dtype == tf.int32
  # An unknown character makes the whole word [UNK].
  assert tokenizer.tokenize(tf.constant(["hellx world"])).to_list() == [[1, 22]]


def test_detokenize_stops_at_end_and_drops_reserved():
  tokenizer = wordpiece.WordpieceTokenizer(
      wordpiece.WordpieceVocab(HAND_VOCAB, num_reserved=5)
  )
  ids = tf.constant(
      [
          [
              4,
              2,
              21,
              22,
              13,
              3,
              21,
              0,
          ],  # <2fr> [START] hello world ##! [END] ...
          [21, 1, 0, 0, 0, 0, 0, 0],  # hello [UNK] [PAD]...
      ]
  )
  assert tokenizer.detokenize_to_strings(ids) == ["hello world!", "hello [UNK]"]
  ragged = tf.ragged.constant([[8, 17, 18, 12, 19]])  # h ##l ##o w ##r
  assert tokenizer.detokenize_to_strings(ragged) == ["hlo wr"]


def test_learned_vocabulary_layout(learned):
  tokens = learned.tokens
  assert tokens[:6] == ["[PAD]", "[UNK]", "[START]", "[END]", "<2fr>", "<2en>"]
  assert learned.num_reserved == 6
  assert len(tokens) <= 300 and len(set(tokens)) == len(tokens)
  chars = {c for text in _corpus() for c in text if not c.isspace()}
  for c in chars:
    assert c in learned and "##" + c in learned


def test_round_trip_restores_normalized_text(learned):
  tokenizer = wordpiece.WordpieceTokenizer(learned)
  texts = _corpus() + ["  Madame   la session.  ", "Wi-Fi, Parlement."]
  ids = tokenizer.tokenize(tf.constant(texts))
  assert wordpiece.UNK_ID not in ids.flat_values.numpy().tolist()
  assert tokenizer.detokenize_to_strings(ids) == [
      " ".join(t.split()) for t in texts
  ]
  # Pieces are shorter than words on average (the vocabulary is small).
  assert ids.flat_values.shape[0] > sum(len(t.split()) for t in texts)


def test_save_load_and_mismatches(tmp_path, learned):
  path = str(tmp_path / "wp.txt")
  learned.save(path)
  loaded = wordpiece.WordpieceVocab.load(path, required_tokens=["<2fr>"])
  assert loaded.tokens == learned.tokens and loaded.num_reserved == 6
  with pytest.raises(DataError, match="<2de>"):
    wordpiece.WordpieceVocab.load(path, required_tokens=["<2de>"])
  with pytest.raises(DataError, match="mismatched"):
    wordpiece.WordpieceVocab.load(path, expected_size=learned.size + 1)
  with pytest.raises(DataError, match="does not exist"):
    wordpiece.WordpieceVocab.load(str(tmp_path / "missing.txt"))
  word_path = str(tmp_path / "words.txt")
  word_vocab.WordVocab.from_counts({"a": 1}).save(word_path)
  with pytest.raises(DataError, match="mismatched") as err:
    wordpiece.WordpieceVocab.load(word_path)
  assert "\n" not in str(err.value)
  # And a wordpiece file is not a word vocabulary.
  with pytest.raises(DataError, match="wordpiece"):
    word_vocab.WordVocab.load(path)


def test_threshold_search_converges_in_few_probes():
  probes = []

  def probe(thresh):
    probes.append(thresh)
    return ["t"] * int(100000 / thresh**0.8)

  vocab = wordpiece._search_threshold(  # pylint: disable=protected-access
      probe, target=8000, slack=400, lower=1, upper=10**6, first_guess=50
  )
  assert 7600 <= len(vocab) <= 8000
  assert len(probes) <= 5
  # Unreachable target: returns the closest size not above the target.
  vocab = wordpiece._search_threshold(  # pylint: disable=protected-access
      lambda t: ["t"] * (100 if t < 5 else 10),
      target=50,
      slack=2,
      lower=1,
      upper=100,
      first_guess=10,
  )
  assert len(vocab) == 10
