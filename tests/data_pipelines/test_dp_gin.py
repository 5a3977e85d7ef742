"""Every gin/data/*.gin config runs on the fixtures through gin bindings alone.

This is exactly what a user does to point an experiment at their own files:
  --gin_bindings="TRAIN_FILES='/path/*.txt'"
"""

import dataclasses

import dp_testlib as testlib
import gin
import pytest

import data_pipelines
from data_pipelines import lm
from data_pipelines import mt
from data_pipelines.errors import DataError

WMT = testlib.WMT_DIR
LM1B_TRAIN = str(testlib.LM1B_TRAIN_DIR / "news.en-000??-of-00100")
LM1B_TEST = str(testlib.LM1B_HELDOUT_DIR / "news.en.heldout-00000-of-00050")
EUROPARL_FR = str(WMT / "training" / "europarl-v7.fr-en.en")
COMMONCRAWL_FR = str(WMT / "training" / "commoncrawl.fr-en.en")


def _cases(tmp):
  """gin file -> (bindings, expected data class)."""
  debian = [
      f"DEBIAN_CACHE_DIR = '{tmp}/debian'",
      f"debian_mt_data.lists_dir = '{testlib.DEBIAN_LISTS}'",
      "debian_mt_data.fetch = False",
      "debian_mt_data.vocab_size = 500",
      "debian_mt_data.learn_kwargs = {'lower_thresh': 2}",
      "mt_batching.batch_tokens = 512",
  ]
  return {
      "ptb.gin": ([], lm.LmData),
      "lm1b.gin": (
          [
              f"TRAIN_FILES = '{LM1B_TRAIN}'",
              f"EVAL_FILES = '{LM1B_TEST}'",
              f"LM1B_VOCAB_FILE = '{tmp}/lm1b_vocab.txt'",
              "lm_batching.batch_tokens = 256",
          ],
          lm.LmData,
      ),
      "news_shards.gin": (
          [
              f"TRAIN_FILES = ['{LM1B_TRAIN}']",
              f"EVAL_FILES = '{LM1B_TEST}'",
              f"NEWS_VOCAB_FILE = '{tmp}/news_vocab.txt'",
              "lm_batching.batch_tokens = 256",
          ],
          lm.LmData,
      ),
      "wmt14_en_fr.gin": (
          [
              f"TRAIN_FILES = ['{EUROPARL_FR}', '{COMMONCRAWL_FR}']",
              f"EVAL_FILES = '{WMT}/test-full/newstest2014-fren-src.en.sgm'",
              f"WMT_VOCAB_FILE = '{tmp}/wmt_fr.txt'",
              "wmt14_mt_data.vocab_size = 300",
              "wmt14_mt_data.learn_kwargs = {'lower_thresh': 1}",
              "mt_batching.batch_tokens = 256",
          ],
          mt.MtData,
      ),
      "wmt14_en_de.gin": (
          [
              f"TRAIN_FILES = '{WMT}/training/europarl-v7.de-en.*'",
              "EVAL_FILES = None",
              f"WMT_VOCAB_FILE = '{tmp}/wmt_de.txt'",
              "wmt14_mt_data.vocab_size = 300",
              "wmt14_mt_data.learn_kwargs = {'lower_thresh': 1}",
              "mt_batching.batch_tokens = 256",
          ],
          mt.MtData,
      ),
      "debian_docs.gin": (
          [
              f"DEBIAN_DOCS_CACHE_DIR = '{testlib.DEBIAN_DOCS_CORPUS}'",
              "lm_batching.batch_tokens = 256",
          ],
          lm.LmData,
      ),
      "debian_en_fr.gin": (debian, mt.MtData),
      "debian_en_de.gin": (debian, mt.MtData),
      "multilingual.gin": (
          [
              "TRAIN_FILES = {"
              f"'en-fr': '{EUROPARL_FR}', 'fr-en': '{EUROPARL_FR}'}}",
              "EVAL_FILES = None",
              f"MULTILINGUAL_VOCAB_FILE = '{tmp}/multi.txt'",
              "multilingual_mt_data.vocab_size = 300",
              "multilingual_mt_data.learn_kwargs = {'lower_thresh': 1}",
              "mt_batching.batch_tokens = 256",
          ],
          mt.MtData,
      ),
  }


def test_every_gin_file_has_a_case(tmp_path):
  files = sorted(p.name for p in testlib.GIN_DIR.glob("*.gin"))
  assert files == sorted(_cases(tmp_path))


@pytest.mark.parametrize("name", sorted(_cases("/tmp")))
def test_gin_config_builds_batches(tmp_path, name):
  bindings, kind = _cases(tmp_path)[name]
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(testlib.GIN_DIR / name)], bindings)
    data = data_pipelines.get_data()
  finally:
    gin.clear_config()
  assert isinstance(data, kind)
  batch = next(iter(data.train_dataset()))
  if kind is lm.LmData:
    inputs, targets, weights = batch
    assert inputs.shape == targets.shape == weights.shape
  else:
    x, target_out, weights = batch
    assert x["target_in"].shape == target_out.shape == weights.shape
    assert int(x["source"].shape[0]) >= 1


def _ptb_options(monkeypatch, bindings):
  """The resolved LmBatching that gin/data/ptb.gin + `bindings` builds."""
  seen = []
  make_lm_data = lm.make_lm_data

  def spy(**wiring):
    seen.append(wiring["options"])
    return make_lm_data(**wiring)

  monkeypatch.setattr(lm, "make_lm_data", spy)
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(testlib.GIN_DIR / "ptb.gin")], bindings
    )
    data_pipelines.get_data()
  finally:
    gin.clear_config()
  return seen[0]


def test_batching_is_one_gin_value_with_the_corpus_defaults(monkeypatch):
  options = _ptb_options(monkeypatch, [])
  assert options == lm.LmBatching(batch_tokens=4096, max_length=128)
  assert (
      lm.LmBatching.resolve(None, {}, owner="ptb_lm_data", batch_tokens=4096)
      == options
  )  # the gin file binds the defaults
  bound = _ptb_options(monkeypatch, ["lm_batching.batch_tokens = 512"])
  assert bound == dataclasses.replace(options, batch_tokens=512)


def test_older_run_configs_with_batching_on_the_corpus_still_load(
    monkeypatch,
):
  # The config.gin of a run trained before LmBatching names every option
  # on the corpus function; it must still build the same batching.
  legacy = _ptb_options(
      monkeypatch,
      ["ptb_lm_data.batch_tokens = 512", "ptb_lm_data.mode = 'packed'"],
  )
  assert legacy == lm.LmBatching(
      batch_tokens=512, max_length=128, mode="packed"
  )


def test_batching_errors_are_one_line(monkeypatch):
  with pytest.raises(DataError, match="unknown argument.*batch_tokenz"):
    _ptb_options(monkeypatch, ["ptb_lm_data.batch_tokenz = 512"])
  with pytest.raises(ValueError, match="mode='pack'"):
    lm.LmBatching(mode="pack")
  with pytest.raises(ValueError, match="length_policy='cut'"):
    mt.MtBatching(length_policy="cut")
  with pytest.raises(DataError, match="batching must be a MtBatching"):
    mt.MtBatching.resolve(
        lm.LmBatching(), {}, owner="wmt14_mt_data", batch_tokens=1
    )
