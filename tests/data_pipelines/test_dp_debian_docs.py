"""Tests of the Debian documentation LM corpus builder (no network).

The package fixture `fixtures/debian_docs_pkg/alpha-doc` is the extracted tree
of a documentation package (DEBIAN/control, an HTML page, a Sphinx reST
source, a plain-text README, license files). The tests turn it into a real
`.deb` with `dpkg-deb -b` when dpkg-deb is available, else use the tree
itself (the builder accepts an extracted tree in place of a `.deb`).
"""

import hashlib
import json
import os
import random
import shutil
import subprocess

import dp_testlib as testlib
import gin
import pytest

from data_pipelines import debian_docs as dd
from data_pipelines import lm
from data_pipelines import word_vocab as word_vocab_lib
from data_pipelines.errors import DataError

PKG_TREE = testlib.DEBIAN_DOCS_PKG / "alpha-doc"
CORPUS_FIXTURE = testlib.DEBIAN_DOCS_CORPUS
ALPHA = dd.DocPackage(
    "alpha-doc", r"usr/share/doc/alpha-doc/.*\.(html|txt)$", what="fixture"
)
# Hand-derived from the fixture files, in archive order within each file.
ALPHA_SENTENCES = {
    "usr/share/doc/alpha-doc/README.txt": [
        "this is the plain text readme of the alpha package .",
        "it has two sentences in one paragraph .",
        "and a third one ?",
        "this indented line is kept as a block quote .",
    ],
    "usr/share/doc/alpha-doc/html/intro.html": [
        "introduction to alpha",
        "alpha is a small tool .",
        "it reads the input files , e.g. logs , and writes a report !",
        "use the alpha --fast option when you are in a hurry .",
        "the first item is a sentence of its own",
        "and so is the second item",
    ],
    "usr/share/doc/alpha-doc/html/_sources/guide/usage.rst.txt": [
        "alpha reads a configuration file and the --input files .",
        "see the home page for news .",
        "to run it , type :",
        "the report is written to the standard output .",
        "runs the tool on the given path .",
        "do n't panic if it does n't work at first .",
    ],
}
TOPICS = (
    "apples bridges candles doors engines forests gardens harbours islands"
    " jewels kettles lanterns meadows needles oceans pebbles quarries rivers"
    " saddles towers umbrellas valleys wagons yachts zebras"
).split()


def _make_deb(tree, debs_dir):
  """Packs an extracted package tree into debs_dir (or copies the tree)."""
  os.makedirs(debs_dir, exist_ok=True)
  name = os.path.basename(tree)
  if shutil.which("dpkg-deb") is None:
    shutil.copytree(tree, os.path.join(debs_dir, name))
    return
  with open(os.path.join(tree, "DEBIAN", "control")) as f:
    version = dd._VERSION_RE.search(f.read()).group(1)
  out = os.path.join(debs_dir, f"{name}_{version}_all.deb")
  subprocess.run(
      ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(tree), out],
      check=True,
      capture_output=True,
  )


def _many_docs_tree(root, num_docs=40):
  """A package tree with num_docs plain-text documents of unique sentences."""
  tree = root / "many-doc"
  shutil.copytree(PKG_TREE / "DEBIAN", tree / "DEBIAN")
  control = (tree / "DEBIAN" / "control").read_text()
  (tree / "DEBIAN" / "control").write_text(
      control.replace("alpha-doc", "many-doc")
  )
  docs = tree / "usr" / "share" / "doc" / "many-doc"
  docs.mkdir(parents=True)
  for i in range(num_docs):
    a, b = TOPICS[i % len(TOPICS)], TOPICS[(i * 7 + 3) % len(TOPICS)]
    (docs / f"doc{i:02d}.txt").write_text(
        f"The {a} of page{i} are next to the {b}.\n"
        f"Every word{i} in this page{i} is unique to it.\n"
    )
  return tree


MANY = dd.DocPackage("many-doc", r"/many-doc/doc\d+\.txt$")


def _build(tmp_path, packages=(ALPHA,), trees=(PKG_TREE,), **kwargs):
  debs = tmp_path / "debs"
  if not debs.exists():
    for tree in trees:
      _make_deb(tree, debs)
  kwargs.setdefault("min_train_words", 1)
  return dd.build_debian_docs(
      str(tmp_path / "cache"),
      packages,
      debs_dir=str(debs),
      download=False,
      **kwargs,
  )


def _lines(path):
  return testlib.read_lines(path)


# ---------------------------------------------------- sentences of a document
def test_document_sentences_of_fixture_package():
  package_file = dd._find_local(str(PKG_TREE.parent), "alpha-doc")
  got = {
      path: [" ".join(t) for t in dd.document_sentences(path, text)]
      for path, text in dd.package_documents(ALPHA, package_file)
  }
  # License / copyright files are never read.
  assert got == ALPHA_SENTENCES


# ---------------------------------------------------------------- building
def test_build_manifest_and_files(tmp_path):
  result = _build(tmp_path)
  manifest = json.loads((tmp_path / "cache" / dd.MANIFEST).read_text())
  assert manifest == result.manifest
  (package,) = manifest["packages"]
  assert package["name"] == "alpha-doc"
  assert manifest["format"] == dd.MANIFEST_FORMAT == 2
  assert package["version"] == "1.2-3"
  assert package["documents"] == 3
  if shutil.which("dpkg-deb"):
    deb = tmp_path / "debs" / package["file"]
    assert package["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
  lines = {s: _lines(p) for s, p in result.files.items()}
  expected = sorted(sum(ALPHA_SENTENCES.values(), []))
  assert sorted(sum(lines.values(), [])) == expected
  for split in dd.SPLITS:
    words = sum(len(l.split()) for l in lines[split])
    assert manifest["splits"][split]["words"] == words
    assert manifest["splits"][split]["sentences"] == len(lines[split])
  assert package["words"] == sum(len(s.split()) for s in expected)
  vocab = word_vocab_lib.WordVocab.load(result.vocab_file)
  assert manifest["vocab_size"] == vocab.size
  assert manifest["splits"]["train"]["oov_rate"] == 0.0
  assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]


def test_document_split_deterministic_disjoint_vocab_from_train(tmp_path):
  tree = _many_docs_tree(tmp_path)
  kwargs = dict(
      packages=(MANY,),
      trees=(tree,),
      valid_fraction=0.2,
      test_fraction=0.2,
  )
  first = _build(tmp_path / "a", **kwargs)
  second = _build(tmp_path / "b", **kwargs)
  for split in dd.SPLITS:
    a = open(first.files[split], "rb").read()
    assert a == open(second.files[split], "rb").read()
  lines = {s: _lines(p) for s, p in first.files.items()}
  assert all(lines[s] for s in dd.SPLITS)
  # Every sentence of a document is in the split its key hashes to.
  for i in range(40):
    key = f"many-doc:usr/share/doc/many-doc/doc{i:02d}.txt"
    split = dd.split_of(key, valid_fraction=0.2, test_fraction=0.2)
    mine = [l for s in dd.SPLITS for l in lines[s] if f"page{i} " in l]
    assert len(mine) == 2
    assert all(l in lines[split] for l in mine)
  assert not set(lines["train"]) & (set(lines["valid"]) | set(lines["test"]))
  vocab = word_vocab_lib.WordVocab.load(first.vocab_file)
  train_words = {w for l in lines["train"] for w in l.split()}
  assert set(vocab.tokens) - set(word_vocab_lib.SPECIAL_TOKENS) == train_words
  assert first.manifest["splits"]["test"]["oov_rate"] > 0


def test_split_files_hold_sentences_in_seeded_random_order(
    tmp_path, monkeypatch
):
  """Training streams are i.i.d.: no package or document order survives."""
  tree = _many_docs_tree(tmp_path, num_docs=120)
  result = _build(tmp_path, packages=(MANY,), trees=(tree,))
  train = _lines(result.files["train"])
  page = lambda line: int(line.split("page")[1].split()[0])
  # The training documents, from the fixture and the documented hash split.
  train_pages = {
      i
      for i in range(120)
      if dd.split_of(
          f"many-doc:usr/share/doc/many-doc/doc{i:02d}.txt",
          valid_fraction=dd.DEFAULT_VALID_FRACTION,
          test_fraction=dd.DEFAULT_TEST_FRACTION,
      )
      == "train"
  }
  assert sorted(map(page, train)) == sorted(2 * list(train_pages))
  assert len(train) >= 200
  # The two sentences of a page: adjacent in document order; after the
  # shuffle each pair is adjacent with probability 2 / len(train) (~1 pair).
  adjacent = sum(page(a) == page(b) for a, b in zip(train, train[1:]))
  assert adjacent <= 6
  # Both halves of the file hold early and late pages alike.
  half = len(train) // 2
  early = sum(page(l) < 60 for l in train[:half]) / half
  assert 0.3 < early < 0.7
  # The permutation is stdlib random with the documented string seed,
  # applied to the document-order file (a build without the shuffle).
  monkeypatch.setattr(dd, "shuffle_lines", lambda path, seed: None)
  unshuffled = _build(tmp_path / "plain", packages=(MANY,), trees=(tree,))
  in_order = _lines(unshuffled.files["train"])
  assert sum(page(a) == page(b) for a, b in zip(in_order, in_order[1:])) == (
      len(train) // 2
  )
  random.Random(f"{dd.SHUFFLE_SEED}:train").shuffle(in_order)
  assert train == in_order
  # Deterministic across builds.
  monkeypatch.undo()
  again = _build(tmp_path / "again", packages=(MANY,), trees=(tree,))
  assert _lines(again.files["train"]) == train


def test_corpus_of_an_older_format_is_rebuilt_or_refused(tmp_path):
  """Format 1 corpora (package order) are refused by readers, rebuilt."""
  _build(tmp_path)
  cache = tmp_path / "cache"
  manifest = json.loads((cache / dd.MANIFEST).read_text())
  manifest["format"] = 1
  (cache / dd.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(DataError) as e:
    dd.require_corpus(str(cache))
  message = str(e.value)
  assert "\n" not in message
  assert "format 1" in message and "package order" in message
  assert "python -m data_pipelines.build_debian_docs_corpus" in message
  rebuilt = _build(tmp_path)
  assert rebuilt.manifest["format"] == dd.MANIFEST_FORMAT
  assert dd.require_corpus(str(cache)).manifest["format"] == 2


def test_duplicate_sentences_dropped(tmp_path):
  tree = tmp_path / "twin-doc"
  shutil.copytree(PKG_TREE, tree)
  control = (tree / "DEBIAN" / "control").read_text()
  (tree / "DEBIAN" / "control").write_text(
      control.replace("alpha-doc", "twin-doc")
  )
  twin = dd.DocPackage("twin-doc", ALPHA.include)
  result = _build(tmp_path, packages=(ALPHA, twin), trees=(PKG_TREE, tree))
  all_lines = sum((_lines(p) for p in result.files.values()), [])
  assert sorted(all_lines) == sorted(sum(ALPHA_SENTENCES.values(), []))
  assert result.manifest["dropped"]["duplicate_sentences"] == len(all_lines)
  assert result.manifest["packages"][1]["words"] == 0


def test_package_descriptions_added_one_document_per_package(tmp_path):
  result = _build(
      tmp_path,
      include_descriptions=True,
      lists_dir=str(testlib.DEBIAN_HANDMADE_LISTS),
  )
  all_lines = sum((_lines(p) for p in result.files.values()), [])
  # Hand-derived from fixtures/debian_handmade (Translation-en): sentences
  # without an English function word ('foo frobnicates widgets .') or with
  # fewer than 3 words ('bar tool .') are dropped, repeats kept once.
  descriptions = [
      "frobnicate the widgets .",
      "it is fast .",
      "documentation for foo .",
      "this package contains the documentation .",
      "qux is a utility .",
      "it has options .",
      "not translated at all .",
      "nobody translated this .",
  ]
  assert sorted(all_lines) == sorted(
      sum(ALPHA_SENTENCES.values(), []) + descriptions
  )
  assert result.manifest["descriptions"]["descriptions"] == 6
  assert result.manifest["packages"][-1]["name"] == "Translation-en"


def test_rebuild_skipped_when_manifest_exists(tmp_path, monkeypatch):
  _build(tmp_path)

  def _fail(*args, **kwargs):
    raise AssertionError("read packages although the corpus is built")

  monkeypatch.setattr(dd, "package_documents", _fail)
  result = _build(tmp_path)
  assert result.manifest["packages"][0]["name"] == "alpha-doc"


def test_failed_rebuild_keeps_previous_corpus(tmp_path, monkeypatch):
  first = _build(tmp_path)
  cache = tmp_path / "cache"
  before = {f: (cache / f).read_bytes() for f in sorted(os.listdir(cache))}
  real = dd.document_sentences
  calls = []

  def _crash_on_second_document(path, text):
    calls.append(path)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return real(path, text)

  monkeypatch.setattr(dd, "document_sentences", _crash_on_second_document)
  with pytest.raises(RuntimeError, match="disk full"):
    _build(tmp_path, rebuild=True)
  after = {f: (cache / f).read_bytes() for f in sorted(os.listdir(cache))}
  assert after == before
  assert first.manifest == json.loads(before[dd.MANIFEST])


def test_too_few_words_is_a_one_line_error_and_writes_nothing(tmp_path):
  with pytest.raises(DataError, match="fewer than min_train_words") as e:
    _build(tmp_path, min_train_words=10**6)
  assert "\n" not in str(e.value)
  assert not [f for f in os.listdir(tmp_path / "cache") if f not in ("debs",)]


def test_package_not_downloadable(tmp_path, monkeypatch):
  fake = tmp_path / "apt-get"
  fake.write_text(
      "#!/bin/sh\necho 'E: Unable to locate package no-such-doc' >&2\nexit"
      " 100\n"
  )
  fake.chmod(0o755)
  monkeypatch.setattr(dd, "APT_GET", str(fake))
  with pytest.raises(DataError) as e:
    dd.build_debian_docs(
        str(tmp_path / "cache"), (dd.DocPackage("no-such-doc", "x"),)
    )
  message = str(e.value)
  assert "\n" not in message
  assert "'no-such-doc' is not downloadable" in message
  assert "Unable to locate package" in message
  with pytest.raises(DataError, match="download=False"):
    dd.build_debian_docs(
        str(tmp_path / "cache"),
        (dd.DocPackage("no-such-doc", "x"),),
        download=False,
    )


def test_unwritable_cache(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with pytest.raises(DataError, match="is not writable") as e:
    dd.build_debian_docs(str(blocker / "cache"), (ALPHA,), download=False)
  assert "\n" not in str(e.value)


def test_package_without_selected_files(tmp_path):
  empty = dd.DocPackage("alpha-doc", r"\.nothing$")
  with pytest.raises(DataError, match="no file matching") as e:
    _build(tmp_path, packages=(empty,))
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------ LM data
def test_missing_corpus_error_names_the_build_command(tmp_path):
  command = "python -m data_pipelines.build_debian_docs_corpus"
  with pytest.raises(DataError) as e:
    dd.require_corpus(str(tmp_path / "none"))
  assert "\n" not in str(e.value)
  assert command in str(e.value)
  # Through the gin configurable, gin appends its call context on a new line.
  with pytest.raises(DataError) as e:
    dd.debian_docs_lm_data(cache_dir=str(tmp_path / "none"))
  assert command in str(e.value).splitlines()[0]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_lm_data_reads_the_eval_split(split):
  data = dd.debian_docs_lm_data(
      cache_dir=str(CORPUS_FIXTURE),
      eval_split=split,
      batching=lm.LmBatching(batch_tokens=256),
  )
  assert isinstance(data, lm.LmData)
  vocab = data.vocab
  eos = vocab.eos_id
  targets = []
  for _, batch_targets, weights in data.eval_dataset():
    for row, w in zip(batch_targets.numpy(), weights.numpy()):
      targets.append(tuple(int(t) for t, x in zip(row, w) if x))
  expected = [
      tuple(vocab.encode(l.split())) + (eos,)
      for l in _lines(CORPUS_FIXTURE / f"{split}.txt")
  ]
  assert sorted(targets) == sorted(expected)
  inputs, _, _ = next(iter(data.train_dataset()))
  assert int(inputs.shape[0]) >= 1


def test_fixture_corpus_is_what_the_builder_writes(tmp_path):
  """fixtures/debian_docs is the build of alpha-doc + many-doc (20% / 20%)."""
  tree = _many_docs_tree(tmp_path)
  result = _build(
      tmp_path,
      packages=(ALPHA, MANY),
      trees=(PKG_TREE, tree),
      valid_fraction=0.2,
      test_fraction=0.2,
  )
  for split in dd.SPLITS:
    assert _lines(result.files[split]) == _lines(
        CORPUS_FIXTURE / f"{split}.txt"
    )
  assert _lines(result.vocab_file) == _lines(CORPUS_FIXTURE / dd.VOCAB_FILE)


@pytest.mark.parametrize(
    "binding",
    [
        "EVAL_SPLIT = '{split}'",
        # What `python -m moe_keras.evaluate --split=...` binds.
        "debian_docs_lm_data.eval_split = '{split}'",
    ],
)
def test_gin_config_evaluates_valid_and_test(binding):
  import data_pipelines  # pylint: disable=g-import-not-at-top

  for split in ("valid", "test"):
    gin.clear_config()
    try:
      gin.parse_config_files_and_bindings(
          [str(testlib.GIN_DIR / "debian_docs.gin")],
          [
              f"DEBIAN_DOCS_CACHE_DIR = '{CORPUS_FIXTURE}'",
              binding.format(split=split),
          ],
      )
      data = data_pipelines.get_data()
    finally:
      gin.clear_config()
    # Target tokens = words + </S> of exactly that split's file.
    num = sum(int(w.numpy().sum()) for _, _, w in data.eval_dataset())
    lines = _lines(CORPUS_FIXTURE / f"{split}.txt")
    assert num == sum(len(l.split()) + 1 for l in lines)
