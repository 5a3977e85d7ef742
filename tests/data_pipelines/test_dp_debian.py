"""Tests of the Debian translations corpus builder (no network unless asked)."""

import json
import os

import dp_testlib as testlib
import pytest

from data_pipelines import debian_translations as debian
from data_pipelines import mt
from data_pipelines.errors import DataError

NETWORK_ENV = "MOE_KERAS_NETWORK_TESTS"

# Hand-derived from fixtures/debian_handmade (see module docstring of
# debian_translations for the alignment rules).
HANDMADE_PAIRS = [
    ("frobnicate the widgets", "frobnique les widgets"),
    ("Foo frobnicates widgets.", "Foo frobnique les widgets."),
    ("It is fast.", "Il est rapide."),
    ("Features:", "Fonctionnalités :"),
    ("* speed", "- vitesse ;"),
    ("* size", "- taille."),
    ("documentation for foo", "documentation pour foo"),
    (
        "This package contains the documentation.",
        "Ce paquet contient la documentation.",
    ),
    ("bar tool", "outil bar"),
    ("qux utility", "utilitaire qux"),
    ("Qux is a utility.", "Qux est un utilitaire."),
    ("It has options.", "Il a des options."),
]


def _read_tsv(path):
  return [tuple(l.split("\t")) for l in testlib.read_lines(path)]


def test_handmade_alignment_dedup_and_counts():
  pairs, counts = debian.build_pairs(
      str(testlib.DEBIAN_HANDMADE_LISTS), target_lang="fr"
  )
  assert [(s, t) for s, t, _ in pairs] == HANDMADE_PAIRS
  assert counts == {
      "source_descriptions": 6,
      "target_descriptions": 6,
      "target_without_source": 1,
      "paired_descriptions": 5,
      "raw_pairs": 16,
      "identical_dropped": 2,
      "duplicates_dropped": 2,
      "pairs": 12,
  }
  # The shared paragraph is recorded for both packages.
  assert dict(((s, t), p) for s, t, p in pairs)[
      ("It is fast.", "Il est rapide.")
  ] == ("foo", "foo-doc")


def test_split_keeps_package_groups_together(tmp_path):
  result = debian.build_debian_translations(
      str(tmp_path),
      target_lang="fr",
      lists_dir=str(testlib.DEBIAN_HANDMADE_LISTS),
      fetch=False,
      dev_fraction=0.1,
      test_fraction=0.1,
  )
  splits = {name: _read_tsv(path) for name, path in result.files.items()}
  assert sorted(sum(splits.values(), [])) == sorted(HANDMADE_PAIRS)
  # Groups: {foo, foo-doc} (9 pairs, share strings), {bar} (1), {qux} (3).
  groups = [HANDMADE_PAIRS[:8], HANDMADE_PAIRS[8:9], HANDMADE_PAIRS[9:]]
  for group in groups:
    homes = {name for name, rows in splits.items() for p in group if p in rows}
    assert len(homes) == 1
  assert splits["dev"] and splits["test"]
  assert (
      result.counts["train_pairs"]
      + result.counts["dev_pairs"]
      + (result.counts["test_pairs"])
      == 12
  )


def test_real_sample_no_leaks_and_deterministic(tmp_path):
  kwargs = dict(
      target_lang="fr",
      lists_dir=str(testlib.DEBIAN_LISTS),
      fetch=False,
      dev_fraction=0.1,
      test_fraction=0.1,
  )
  first = debian.build_debian_translations(str(tmp_path / "a"), **kwargs)
  second = debian.build_debian_translations(str(tmp_path / "b"), **kwargs)
  for split in debian.SPLITS:
    with open(first.files[split], "rb") as f1, open(
        second.files[split], "rb"
    ) as f2:
      assert f1.read() == f2.read()
  rows = {s: _read_tsv(p) for s, p in first.files.items()}
  assert all(
      len(r) == 2 and r[0] and r[1] and r[0] != r[1]
      for rs in rows.values()
      for r in rs
  )
  everything = sum(rows.values(), [])
  assert len(everything) == len(set(everything)) == first.counts["pairs"]
  for a in debian.SPLITS:
    for b in debian.SPLITS:
      if a < b:
        assert not {s for s, _ in rows[a]} & {s for s, _ in rows[b]}
        assert not {t for _, t in rows[a]} & {t for _, t in rows[b]}
  # 31 French descriptions in the sample, all with their English original.
  assert first.counts["target_descriptions"] == 31
  assert first.counts["paired_descriptions"] == 31
  # The line of ' \xa0' inside the French 389-ds-base-dev description
  # separates two paragraphs, so both paragraphs align with the English ones.
  assert (
      "This package contains development headers for the core libraries of"
      " the 389 Directory Server, useful for developing plugins without having"
      " to install the server itself.",
      "Ce paquet fournit les en-têtes de développement pour les bibliothèques"
      " principales de 389 Directory Server. Elles sont utiles pour développer"
      " des modules sans devoir installer le serveur.",
  ) in everything


def test_cache_is_reused_unless_rebuild(tmp_path):
  kwargs = dict(
      target_lang="de", lists_dir=str(testlib.DEBIAN_LISTS), fetch=False
  )
  result = debian.build_debian_translations(str(tmp_path), **kwargs)
  assert result.counts["paired_descriptions"] == 27
  with open(result.files["train"], "a", encoding="utf-8") as f:
    f.write("marker\tMarke\n")
  cached = debian.build_debian_translations(str(tmp_path), **kwargs)
  assert ("marker", "Marke") in _read_tsv(cached.files["train"])
  rebuilt = debian.build_debian_translations(
      str(tmp_path), rebuild=True, **kwargs
  )
  assert ("marker", "Marke") not in _read_tsv(rebuilt.files["train"])
  assert rebuilt.counts == result.counts


def test_an_interrupted_rebuild_is_not_taken_for_a_finished_one(
    tmp_path, monkeypatch
):
  kwargs = dict(
      target_lang="de", lists_dir=str(testlib.DEBIAN_LISTS), fetch=False
  )
  result = debian.build_debian_translations(str(tmp_path), **kwargs)
  stats = os.path.join(os.path.dirname(result.files["train"]), "stats.json")
  with open(stats) as f:
    assert json.load(f) == result.counts
  write_lines = debian.text_io.write_lines
  written = []

  def dies_on_the_second_file(path, lines):
    written.append(path)
    if len(written) == 2:
      raise KeyboardInterrupt("killed")
    write_lines(path, lines)

  monkeypatch.setattr(debian.text_io, "write_lines", dies_on_the_second_file)
  with pytest.raises(KeyboardInterrupt):
    debian.build_debian_translations(str(tmp_path), rebuild=True, **kwargs)
  monkeypatch.undo()
  # One split is new, the others old: no stats.json, so no cache hit.
  assert not os.path.exists(stats)
  again = debian.build_debian_translations(str(tmp_path), **kwargs)
  assert again.counts == result.counts
  assert os.path.exists(stats)
  assert not [n for n in os.listdir(os.path.dirname(stats)) if "tmp" in n]


def test_missing_lists_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match="Translation-fr"):
    debian.translation_files(str(tmp_path), "fr")
  with pytest.raises(DataError, match="fetch=False"):
    debian.build_debian_translations(
        str(tmp_path), target_lang="fr", fetch=False
    )
  bad = tmp_path / "x_i18n_Translation-fr"
  bad.write_text("Package: a\nDescription-md5: 1\n\n")
  with pytest.raises(DataError, match="Description-fr"):
    debian.parse_translations(bad.read_text(), "fr", str(bad))


def test_segmentation_helpers():
  assert debian.split_sentences(
      "It works. Version 2 is out! Ask e.g. me. ok."
  ) == ["It works.", "Version 2 is out!", "Ask e.g. me. ok."]
  paragraphs = debian.long_paragraphs(
      [" Intro:", "  * one", "    more", "  - two", " .", " Last."]
  )
  assert paragraphs == [["Intro:", "* one more", "- two"], ["Last."]]


def test_debian_mt_data_pipeline(tmp_path):
  data = debian.debian_mt_data(
      cache_dir=str(tmp_path),
      lists_dir=str(testlib.DEBIAN_LISTS),
      fetch=False,
      vocab_size=600,
      learn_kwargs={"lower_thresh": 2},
      batching=mt.MtBatching(batch_tokens=512, max_length=96),
  )
  rows = 0
  for x, target_out, weights in data.train_dataset().as_numpy_iterator():
    rows += x["source"].shape[0]
    assert (
        x["source"].shape[0] * max(x["source"].shape[1], target_out.shape[1])
        <= 512
    )
  stats = data.stats["debian_en_fr/train"].last
  train_lines = len(
      testlib.read_lines(os.path.join(tmp_path, "en-fr", "train.en-fr.tsv"))
  )
  assert stats["lines"] == train_lines
  assert rows == stats["examples"] == train_lines - stats["too_long_dropped"]
  assert os.path.exists(os.path.join(tmp_path, "en-fr", "wordpiece-600.txt"))


@pytest.mark.skipif(
    os.environ.get(NETWORK_ENV) != "1",
    reason=f"network test: set {NETWORK_ENV}=1 (needs root,"
    " apt and Debian mirrors)",
)
def test_real_build_with_apt(tmp_path):
  result = debian.build_debian_translations(str(tmp_path), target_lang="fr")
  assert result.counts["pairs"] > 20000
  lists = os.path.join(str(tmp_path), "apt", "lists")
  assert debian.translation_files(lists, "fr")
