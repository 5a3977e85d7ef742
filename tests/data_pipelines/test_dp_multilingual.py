"""Tests of multilingual mixing with <2xx> target-language tokens."""

import collections

import dp_testlib as testlib
import pytest
import tensorflow as tf

from data_pipelines import mt
from data_pipelines import multilingual
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

TRAIN = testlib.WMT_DIR / "training"
FILES = {
    "en-fr": str(TRAIN / "europarl-v7.fr-en.en"),
    "fr-en": str(TRAIN / "europarl-v7.fr-en.fr"),
    "en-de": str(TRAIN / "europarl-v7.de-en.de"),
}


def _lines(name):
  return [" ".join(l.split()) for l in testlib.read_lines(TRAIN / name)]


EN_FR = list(
    zip(_lines("europarl-v7.fr-en.en"), _lines("europarl-v7.fr-en.fr"))
)
EN_DE = list(
    zip(_lines("europarl-v7.de-en.en"), _lines("europarl-v7.de-en.de"))
)
EXPECTED = {
    "<2fr>": collections.Counter(EN_FR),
    "<2en>": collections.Counter((f, e) for e, f in EN_FR),
    "<2de>": collections.Counter(EN_DE),
}


@pytest.fixture(scope="module", name="data")
def data_fixture():
  return multilingual.multilingual_mt_data(
      FILES,
      {"en-fr": FILES["en-fr"]},
      vocab_size=400,
      learn_kwargs={"lower_thresh": 1},
      batching=mt.MtBatching(batch_tokens=128, max_length=64),
  )


def _rows(data, dataset):
  """[(language token, source text, target text)] of every row."""
  tok, vocab = data.tokenizer, data.vocab
  rows = []
  for x, target_out, _ in dataset.as_numpy_iterator():
    sources = tok.detokenize_to_strings(x["source"])
    targets = tok.detokenize_to_strings(target_out)
    for i, first in enumerate(x["source"][:, 0].tolist()):
      rows.append((vocab.tokens[first], sources[i], targets[i]))
  return rows


def test_language_tokens_reserved_after_specials(data):
  assert data.language_tokens == ("<2de>", "<2en>", "<2fr>")
  assert data.vocab.tokens[:7] == [
      "[PAD]",
      "[UNK]",
      "[START]",
      "[END]",
      "<2de>",
      "<2en>",
      "<2fr>",
  ]


def test_every_row_starts_with_its_target_language(data):
  rows = _rows(data, data.train_dataset())
  got = collections.defaultdict(collections.Counter)
  for lang, src, tgt in rows:
    got[lang][(src, tgt)] += 1
  assert dict(got) == EXPECTED
  stats = data.stats["multilingual/train"].last
  assert stats["examples"] == len(rows) == 6 + 6 + 3


def test_eval_pairs_carry_the_language(data):
  assert data.eval_pairs() == [(s, t, "fr") for s, t in EN_FR]
  rows = _rows(data, data.eval_dataset())
  assert {lang for lang, _, _ in rows} == {"<2fr>"}


def test_encode_sources_prepends_token(data):
  ids = data.encode_sources(tf.constant(["Thank you very much."]), "de")
  assert ids.to_list()[0][0] == data.vocab.token_to_id("<2de>")
  plain = data.tokenizer.tokenize(tf.constant(["Thank you very much."]))
  assert ids.to_list()[0][1:] == plain.to_list()[0]


def test_pair_weights_set_direction_rates():
  data = multilingual.multilingual_mt_data(
      FILES,
      pair_weights={"en-fr": 2.0, "fr-en": 1.0, "en-de": 1.0},
      vocab_size=400,
      learn_kwargs={"lower_thresh": 1},
      batching=mt.MtBatching(batch_tokens=512, max_length=64),
  )
  counts = collections.Counter()
  for x, _, _ in data.train_dataset().take(120):
    counts.update(
        data.vocab.tokens[i] for i in x["source"][:, 0].numpy().tolist()
    )
  total = sum(counts.values())
  assert total > 2000
  assert abs(counts["<2fr>"] / total - 0.5) < 0.04
  assert abs(counts["<2en>"] / total - 0.25) < 0.04
  assert abs(counts["<2de>"] / total - 0.25) < 0.04


def test_errors(tmp_path):
  with pytest.raises(DataError, match="dict"):
    multilingual.multilingual_mt_data(FILES["en-fr"])
  with pytest.raises(DataError, match='"en-fr"'):
    multilingual.multilingual_mt_data({"en_fr": FILES["en-fr"]})
  with pytest.raises(DataError, match="no files"):
    multilingual.multilingual_mt_data(
        {"en-fr": FILES["en-fr"]}, pair_weights={"en-de": 1.0}
    )
  # A vocabulary without the language tokens is rejected.
  path = str(tmp_path / "wp.txt")
  wordpiece.WordpieceVocab(list(wordpiece.RESERVED_TOKENS) + ["a", "##a"]).save(
      path
  )
  with pytest.raises(DataError, match="<2fr>"):
    multilingual.multilingual_mt_data(
        {"en-fr": FILES["en-fr"]}, vocab_file=path
    )
