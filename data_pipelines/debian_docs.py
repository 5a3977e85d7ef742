"""Debian's English documentation: a real LM corpus larger than PTB.

Debian main ships the English documentation of many projects as packages
(the Linux kernel and Python manuals, the Debian handbook, PostgreSQL, Perl,
...). apt can download them (`apt-get download`) without any other network
access, so this project can build a >10M-word English corpus offline. The
builder (`build_debian_docs`):

1. downloads a fixed list of packages (`DEFAULT_PACKAGES`, each with a regular
   expression selecting its English prose files) into `CACHE/debs` with
   `apt-get download` (a `.deb` already there is reused; an extracted package
   tree `CACHE/debs/NAME/` stands for a `.deb` too);
2. reads the selected files straight from the `.deb` (`dpkg-deb
   --fsys-tarfile`, `.gz` members decompressed) and keeps their prose
   paragraphs (`doc_markup`: HTML without navigation, code listings and
   tables; reStructuredText and plain text without code-like directives,
   literal blocks and inline markup; POD without verbatim paragraphs);
   files whose name says license/copyright are skipped;
3. splits the paragraphs into sentences, tokenizes them PTB-style and keeps
   the English prose sentences of 3 to 127 tokens (`english_sentences`,
   which drops code, option tables and the other languages of multilingual
   packages); a sentence seen before anywhere in the corpus is dropped
   (global deduplication, so no sentence is in two splits);
4. splits by document (file): a document goes to test / valid / train by a
   SHA-256 hash of `package:path` (`split_of`), 1.25% of the documents
   each for test and valid by default (about 120k words each on the default
   packages), deterministic and independent of the other documents;
5. shuffles the sentences of each split (seeded, `SHUFFLE_SEED`): the
   packages are read one after another, and a training stream in that order
   is not i.i.d. (a run of a few epochs' fraction sees the kernel docs, then
   Python, ..., and forgets; its dev curve measures which packages it has
   just seen), so, like the shuffled shards of the 1B Word benchmark, the
   files hold the sentences in random order (`shuffle_lines`);
6. writes `CACHE/{train,valid,test}.txt` (one sentence per line, tokens
   separated by spaces), `CACHE/vocab.txt` (`WordVocab`: `<S>`, `</S>`,
   `<UNK>` and the most frequent training words, `DEFAULT_VOCAB_SIZE`
   entries in all; built from train only) and `CACHE/manifest.json`
   (packages with versions and `.deb` SHA-256, words per package and split,
   vocabulary size, OOV rate per split). Everything is written to `.tmp`
   files first; the old manifest is removed, the files renamed, and the new
   manifest written last: the manifest marks a complete corpus, and a
   failed build leaves the previous corpus untouched.

Optionally (`include_descriptions=True`) the English package descriptions
(`Translation-en`, fetched as in `data_pipelines.debian_translations`) are
added as one document per package.

`debian_docs_lm_data` (gin: `gin/data/debian_docs.gin`) reads the built
splits; it never builds (the download is large): if the cache has no
manifest it raises a one-line `DataError` naming the build command.
"""

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import gin

from data_pipelines import debian_translations
from data_pipelines import doc_markup
from data_pipelines import english_sentences
from data_pipelines import lm
from data_pipelines import text_io
from data_pipelines import word_vocab as word_vocab_lib
from data_pipelines.errors import DataError

DEFAULT_CACHE_DIR = "~/.cache/moe_keras/debian_docs"
# Default global token budget per step.
LM_BATCH_TOKENS = 4096
BUILD_COMMAND = "python -m data_pipelines.build_debian_docs_corpus"
APT_GET = "apt-get"
DPKG_DEB = "dpkg-deb"
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.txt"
# 2: sentences in random order (1: in package order; rebuilt when found).
MANIFEST_FORMAT = 2
# Seed of the sentence order of the split files (`shuffle_lines`).
SHUFFLE_SEED = 20171
DEFAULT_VALID_FRACTION = 0.0125
DEFAULT_TEST_FRACTION = 0.0125
# Vocabulary entries, <S> </S> <UNK> included: what a small LSTM with a
# (sampled) softmax over words can afford; OOV rates are in the manifest.
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_MIN_TRAIN_WORDS = 10_000_000
DOCS_LAYOUT = (
    f"CACHE/{{train,valid,test}}.txt, CACHE/{VOCAB_FILE} and CACHE/{MANIFEST}"
    f" written by `{BUILD_COMMAND}`"
)


@dataclasses.dataclass(frozen=True)
class DocPackage:
  """A Debian package and the English prose files to read from it.

  Attributes:
    name: binary package name (`apt-get download NAME`).
    include: regular expression (`re.search`) on member paths such as
      `usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt`.
    exclude: optional regular expression of paths to skip.
    what: one-line description (README / manifest).
  """

  name: str
  include: str
  exclude: Optional[str] = None
  what: str = ""


# Debian 12 "bookworm" main. Sphinx manuals are read from their reST sources
# (`_sources/`), other manuals from HTML (English pages only), Perl from POD.
DEFAULT_PACKAGES: Tuple[DocPackage, ...] = (
    DocPackage(
        "linux-doc-6.1",
        r"/html/_sources/.*\.rst\.txt$",
        what="Linux kernel documentation (reST sources)",
    ),
    DocPackage(
        "python3.11-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/(whatsnew/changelog|license)\.",
        what="Python 3.11 documentation (reST sources)",
    ),
    DocPackage(
        "python-django-doc",
        r"/html/.*\.html$",
        exclude=r"/html/(_modules|releases|genindex|py-modindex|search)",
        what="Django documentation (HTML)",
    ),
    DocPackage(
        "python-sqlalchemy-doc",
        r"/html/.*\.html$",
        exclude=r"/html/(_modules|changelog|genindex|py-modindex|search)",
        what="SQLAlchemy documentation (HTML)",
    ),
    DocPackage(
        "sphinx-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/changes",
        what="Sphinx documentation (reST sources)",
    ),
    DocPackage(
        "postgresql-doc-15",
        r"/html/.*\.html$",
        exclude=r"/html/(release-|bookindex|biblio)",
        what="PostgreSQL 15 manual (HTML)",
    ),
    DocPackage(
        "perl-doc",
        r"/pod/perl[^/]*\.pod$",
        exclude=r"/pod/perl(\d+delta|artistic|gpl|toc|apio)\.pod$",
        what="Perl manual pages (POD)",
    ),
    DocPackage(
        "debian-handbook",
        r"/html/en-US/[^/]*\.html$",
        what="The Debian Administrator's Handbook (HTML, en-US)",
    ),
    DocPackage(
        "debian-reference-en",
        r"\.en\.html$",
        what="Debian Reference (HTML)",
    ),
    DocPackage(
        "developers-reference",
        r"\.html$",
        exclude=r"/(genindex|search|developers-reference)\.html$",
        what="Debian Developer's Reference (HTML)",
    ),
    DocPackage(
        "debian-policy",
        r"/debian-policy/.*\.html$",
        exclude=r"/(genindex|search)\.html$",
        what="Debian Policy Manual (HTML)",
    ),
    DocPackage(
        "maint-guide",
        r"\.en\.html$",
        what="Debian New Maintainers' Guide (HTML)",
    ),
    DocPackage(
        "git-doc",
        r"/git-doc/[^/]*\.html$",
        exclude=r"/RelNotes",
        what="Git manual (HTML)",
    ),
    DocPackage(
        "apache2-doc",
        r"/manual/en/.*\.html$",
        exclude=r"/manual/mod/(directives|quickreference)\.",
        what="Apache HTTP Server 2.4 manual (HTML, English)",
    ),
    DocPackage(
        "zsh-doc",
        r"/html/.*\.html$",
        what="Zsh manual and FAQ (HTML)",
    ),
    DocPackage(
        "bash-doc",
        r"/bashref\.html$",
        what="Bash reference manual (HTML)",
    ),
    DocPackage(
        "gnu-standards",
        r"\.html$",
        what="GNU coding standards and maintainer information (HTML)",
    ),
    DocPackage(
        "octave-doc",
        r"/octave\.html/.*\.html$",
        what="GNU Octave manual (HTML)",
    ),
    DocPackage(
        "lilypond-doc-html",
        r"/Documentation/(learning|notation|usage|essay|extending|"
        r"contributor|web)/[^/.]*\.html$",
        what="LilyPond manuals (HTML, English pages)",
    ),
    DocPackage(
        "rust-doc",
        r"/html/(book|reference|nomicon|edition-guide|rustdoc|cargo|"
        r"embedded-book|rust-by-example)/.*\.html$",
        exclude=r"/(print|toc)\.html$",
        what="Rust books: the Book, Reference, Nomicon, ... (HTML)",
    ),
    DocPackage(
        "gimp-help-en",
        r"/help/en/.*\.html$",
        what="GIMP user manual (HTML, English)",
    ),
    DocPackage(
        "python-scipy-doc",
        r"/html/.*\.html$",
        exclude=r"/html/(_modules|_sources|genindex|py-modindex|search"
        r"|release)",
        what="SciPy documentation (HTML)",
    ),
    DocPackage(
        "python-sklearn-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/(whats_new|auto_examples|modules/generated)",
        what="scikit-learn documentation (reST sources)",
    ),
    DocPackage(
        "python-astropy-doc",
        r"/html/.*\.html$",
        exclude=r"/html/(_modules|_sources|api/|genindex|py-modindex|search"
        r"|changelog|whatsnew)",
        what="Astropy documentation (HTML, without the API pages)",
    ),
    DocPackage(
        "python-pandas-doc",
        r"/html/(user_guide|getting_started|development)/.*\.html$",
        what="pandas user guide (HTML)",
    ),
    DocPackage(
        "python-celery-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/(changelog|history|reference|internals/reference)",
        what="Celery documentation (reST sources)",
    ),
    DocPackage(
        "python-tornado-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/releases",
        what="Tornado documentation (reST sources)",
    ),
    DocPackage(
        "python-flask-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/changes",
        what="Flask documentation (reST sources)",
    ),
    DocPackage(
        "python-pytest-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/(announce|changelog)",
        what="pytest documentation (reST sources)",
    ),
    DocPackage(
        "cython-doc",
        r"/html/_sources/.*\.rst\.txt$",
        what="Cython documentation (reST sources)",
    ),
    DocPackage(
        "nodejs-doc",
        r"/nodejs/api/[^/]*\.html$",
        exclude=r"/api/(all|index)\.html$",
        what="Node.js 18 API documentation (HTML)",
    ),
    DocPackage(
        "erlang-doc",
        r"/doc/html/[^/]*\.html$",
        exclude=r"/lib/wx-",
        what="Erlang/OTP user guides and reference (HTML, without wx)",
    ),
    DocPackage(
        "ghc-doc",
        r"/html/users_guide/.*\.html$",
        exclude=r"/users_guide/\d[^/]*-notes\.html$",
        what="GHC user's guide (HTML)",
    ),
    DocPackage(
        "wireshark-doc",
        r"/ws[ud]g_html_chunked/.*\.html$",
        what="Wireshark user's and developer's guides (HTML)",
    ),
    DocPackage(
        "gnuplot-doc",
        r"/htmldocs/.*\.html$",
        what="gnuplot manual (HTML)",
    ),
    DocPackage(
        "cmake-doc",
        r"/html/_sources/.*\.rst\.txt$",
        exclude=r"/_sources/release/",
        what="CMake documentation (reST sources)",
    ),
    DocPackage(
        "ffmpeg-doc",
        r"/ffmpeg/manual/.*\.html$",
        what="FFmpeg manuals (HTML)",
    ),
    DocPackage(
        "sqlite3-doc",
        r"/doc/sqlite3/[^/]*\.html$",
        # requirements.html restates the other pages' sentences as numbered
        # requirements (near-duplicates across splits).
        exclude=r"/(releaselog|changes|chronology|sitemap|keyword_index|toc"
        r"|requirements)",
        what="SQLite documentation (HTML)",
    ),
    DocPackage(
        "exim4-doc-html",
        r"/spec_html/.*\.html$",
        what="Exim 4 specification (HTML)",
    ),
    DocPackage(
        "gnutls-doc",
        r"/gnutls-doc/html/.*\.html$",
        what="GnuTLS manual (HTML)",
    ),
    DocPackage(
        "postfix-doc",
        r"/postfix/html/[^/]*\.html$",
        what="Postfix documentation (HTML)",
    ),
    DocPackage(
        "bind9-doc",
        r"/bind9-doc/arm/[^/]*\.html$",
        exclude=r"/(genindex|search|notes)\.html$",
        what="BIND 9 administrator reference manual (HTML)",
    ),
    DocPackage(
        "docutils-doc",
        r"/docutils-doc/.*\.html$",
        what="Docutils documentation (HTML)",
    ),
    DocPackage(
        "kicad-doc-en",
        r"/help/en/.*\.html$",
        what="KiCad manuals (HTML, English)",
    ),
    DocPackage(
        "debian-history",
        r"/docs/[^/]*\.en\.html$",
        what="A Brief History of Debian (HTML)",
    ),
)

_LICENSE_NAME_RE = re.compile(
    r"(?i)(^|[/_.-])(copyright|copying|licen[cs]e|gpl|gfdl|fdl|legal"
    r"|artistic)[^/]*$"
)
_VERSION_RE = re.compile(r"^Version:\s*(\S+)", re.M)


@dataclasses.dataclass
class PackageFile:
  """A downloaded package: a `.deb` or an extracted tree standing for one."""

  name: str
  path: str
  version: str
  sha256: str


@dataclasses.dataclass
class BuildResult:
  """Paths and manifest of a built corpus.

  Attributes:
    directory: the cache directory.
    files: {'train'|'valid'|'test': path}.
    vocab_file: the vocabulary file.
    manifest: the manifest (also in manifest.json).
  """

  directory: str
  files: Dict[str, str]
  vocab_file: str
  manifest: Dict[str, object]


# ------------------------------------------------------------ downloading
def _sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _find_local(debs_dir: str, name: str) -> Optional[PackageFile]:
  """A cached `NAME_*.deb` (newest name) or an extracted tree `NAME/`."""
  if not os.path.isdir(debs_dir):
    return None
  debs = sorted(
      f
      for f in os.listdir(debs_dir)
      if f.startswith(name + "_") and f.endswith(".deb")
  )
  if debs:
    path = os.path.join(debs_dir, debs[-1])
    out = subprocess.run(
        [DPKG_DEB, "--field", path, "Version"],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
      raise DataError(
          f"{path!r} is not a readable .deb: {out.stderr.strip()}"
          " (delete it to download it again)"
      )
    return PackageFile(name, path, out.stdout.strip(), _sha256_of(path))
  tree = os.path.join(debs_dir, name)
  if os.path.isdir(tree):
    version = "tree"
    control = os.path.join(tree, "DEBIAN", "control")
    if os.path.exists(control):
      with open(control, encoding="utf-8") as f:
        match = _VERSION_RE.search(f.read())
      version = match.group(1) if match else version
    return PackageFile(name, tree, version, "")
  return None


def download_package(name: str, debs_dir: str, *, download: bool = True):
  """Finds `name` in debs_dir or downloads it there with apt-get.

  Args:
    name: binary package name.
    debs_dir: directory of cached `.deb` files.
    download: allow `apt-get download`.

  Returns:
    PackageFile.

  Raises:
    DataError: if the package is not cached and cannot be downloaded.
  """
  found = _find_local(debs_dir, name)
  if found is not None:
    return found
  if not download:
    raise DataError(
        f"Debian package {name!r} is not in {debs_dir!r} and download=False"
    )
  if shutil.which(APT_GET) is None:
    raise DataError(
        f"downloading Debian package {name!r} needs apt-get (Debian/Ubuntu);"
        f" put {name}_*.deb into {debs_dir!r} instead"
    )
  os.makedirs(debs_dir, exist_ok=True)
  logging.info("apt-get download %s", name)
  out = subprocess.run(
      [APT_GET, "download", name],
      cwd=debs_dir,
      check=False,
      capture_output=True,
      text=True,
  )
  found = _find_local(debs_dir, name)
  if out.returncode != 0 or found is None:
    errors = [
        l.strip() for l in (out.stderr + out.stdout).splitlines() if l.strip()
    ]
    raise DataError(
        f"Debian package {name!r} is not downloadable (apt-get download exit"
        f" {out.returncode}: {errors[-1] if errors else 'no output'}); run"
        " `apt-get update` or remove it from the package list"
    )
  return found


# ---------------------------------------------------------- reading files
def _decompress(path: str, data: bytes) -> Tuple[str, bytes]:
  if path.endswith(".gz"):
    return path[:-3], gzip.decompress(data)
  return path, data


def _wanted(package: DocPackage, path: str) -> bool:
  logical = path[:-3] if path.endswith(".gz") else path
  if not re.search(package.include, logical):
    return False
  if package.exclude and re.search(package.exclude, logical):
    return False
  return not _LICENSE_NAME_RE.search(logical)


def package_documents(
    package: DocPackage, package_file: PackageFile
) -> Iterator[Tuple[str, str]]:
  """The selected files of a package, in archive order.

  Args:
    package: which files to read.
    package_file: the `.deb` (or extracted tree).

  Yields:
    (path inside the package without a leading './' and without '.gz',
    UTF-8 text with invalid bytes replaced).

  Raises:
    DataError: if the `.deb` cannot be read.
  """
  if os.path.isdir(package_file.path):
    root = package_file.path
    for base, dirs, files in os.walk(root):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(base, name)
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        if rel.startswith("DEBIAN/") or not _wanted(package, rel):
          continue
        with open(full, "rb") as f:
          rel, data = _decompress(rel, f.read())
        yield rel, data.decode("utf-8", errors="replace")
    return
  proc = subprocess.Popen(
      [DPKG_DEB, "--fsys-tarfile", package_file.path],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
  )
  try:
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
      for member in tar:
        rel = member.name[2:] if member.name.startswith("./") else member.name
        if not member.isfile() or not _wanted(package, rel):
          continue
        rel, data = _decompress(rel, tar.extractfile(member).read())
        yield rel, data.decode("utf-8", errors="replace")
  except tarfile.TarError as e:
    raise DataError(f"cannot read {package_file.path!r}: {e}") from e
  finally:
    proc.stdout.close()
    stderr = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.wait() != 0 and stderr:
      raise DataError(f"dpkg-deb cannot read {package_file.path!r}: {stderr}")


# ------------------------------------------------- sentences of a document
def document_sentences(path: str, text: str) -> Iterator[List[str]]:
  """Kept tokenized sentences of one document, in order (not deduplicated).

  Args:
    path: path inside the package (selects the format).
    text: the document.

  Yields:
    Token lists.
  """
  for paragraph in doc_markup.document_paragraphs(path, text):
    for sentence in english_sentences.split_sentences(
        english_sentences.normalize(paragraph)
    ):
      tokens = english_sentences.tokenize(sentence)
      if english_sentences.keep_sentence(tokens):
        yield tokens


# ---------------------------------------------------------------- splitting
def split_of(
    key: str,
    *,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> str:
  """The split of a document, from a hash of its key ('package:path').

  Args:
    key: the document key.
    valid_fraction: share of documents in valid.
    test_fraction: share of documents in test.

  Returns:
    'train', 'valid' or 'test'.
  """
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  if u < test_fraction:
    return "test"
  if u < test_fraction + valid_fraction:
    return "valid"
  return "train"


# ----------------------------------------------------------------- building
def corpus_files(cache_dir: str) -> Dict[str, str]:
  """The split files of a corpus in cache_dir."""
  return {s: os.path.join(cache_dir, f"{s}.txt") for s in SPLITS}


def _check_writable(cache_dir: str) -> None:
  try:
    os.makedirs(cache_dir, exist_ok=True)
    probe = os.path.join(cache_dir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise DataError(
        f"Debian docs cache {cache_dir!r} is not writable ({e.strerror});"
        " pass --cache_dir= with a writable directory"
    ) from e


def _description_documents(
    cache_dir: str, lists_dir: Optional[str], fetch: bool
) -> Tuple[List[Tuple[str, str]], Dict[str, object]]:
  """English package descriptions as (key, text) documents."""
  if lists_dir is None:
    lists_dir = os.path.join(cache_dir, "apt", "lists")
    if not any(
        f.endswith(("Translation-en", "Translation-en.lz4"))
        for f in (os.listdir(lists_dir) if os.path.isdir(lists_dir) else [])
    ):
      if not fetch:
        raise DataError(
            f"no Translation-en files in {lists_dir!r} and download=False"
        )
      debian_translations.fetch_translation_lists(cache_dir, ("en",))
  files = debian_translations.translation_files(lists_dir, "en")
  documents: Dict[str, List[str]] = {}
  for path in files:
    text = debian_translations.read_index_text(path)
    for entry in debian_translations.parse_translations(text, "en", path):
      if entry.package in documents:
        continue
      paragraphs = [entry.short.rstrip(".") + "."]
      for items in debian_translations.long_paragraphs(entry.long_lines):
        paragraphs.extend(items)
      documents[entry.package] = paragraphs
  info = {
      "files": [
          {"name": os.path.basename(p), "sha256": _sha256_of(p)} for p in files
      ],
      "descriptions": len(documents),
  }
  return [
      (f"Translation-en:{name}", "\n\n".join(pars))
      for name, pars in documents.items()
  ], info


def _read_manifest(cache_dir: str) -> Optional[Dict[str, object]]:
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class _SplitWriters:
  """The `.tmp` split files of a build and their counts."""

  def __init__(self, cache_dir: str):
    self.final = corpus_files(cache_dir)
    self.tmp = {s: p + ".tmp" for s, p in self.final.items()}
    self.files = {
        s: open(p, "w", encoding="utf-8", newline="\n")
        for s, p in self.tmp.items()
    }
    self.counts = {s: collections.Counter() for s in SPLITS}
    self.stats = {
        s: collections.Counter(documents=0, sentences=0, words=0)
        for s in SPLITS
    }

  def write(self, split: str, tokens: Sequence[str]) -> None:
    self.files[split].write(" ".join(tokens) + "\n")
    self.counts[split].update(tokens)
    self.stats[split]["sentences"] += 1
    self.stats[split]["words"] += len(tokens)

  def close(self) -> None:
    for f in self.files.values():
      if not f.closed:
        f.flush()
        os.fsync(f.fileno())
        f.close()

  def shuffle(self, seed: int) -> None:
    """Puts the lines of every (closed) `.tmp` split file in random order."""
    for split, path in self.tmp.items():
      shuffle_lines(path, seed=f"{seed}:{split}")

  def discard(self) -> None:
    for f in self.files.values():
      f.close()
    for p in self.tmp.values():
      if os.path.exists(p):
        os.remove(p)


def shuffle_lines(path: str, *, seed: str) -> None:
  """Rewrites a text file with its lines in a seeded random order.

  The whole file is read into memory (the default corpus's train split is
  ~70 MB); `random.Random(seed)` with a string seed gives the same order on
  every platform and Python 3 version.

  Args:
    path: the file; rewritten in place (callers pass a `.tmp` file).
    seed: string seed of the permutation.
  """
  with open(path, encoding="utf-8", newline="\n") as f:
    lines = f.readlines()
  random.Random(seed).shuffle(lines)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())


def _oov_rate(counts: collections.Counter, vocab) -> float:
  total = sum(counts.values())
  unknown = sum(c for w, c in counts.items() if vocab.token_to_id(w) == 2)
  return round(unknown / total, 6) if total else 0.0


def build_debian_docs(
    cache_dir: str = DEFAULT_CACHE_DIR,
    packages: Sequence[DocPackage] = DEFAULT_PACKAGES,
    *,
    debs_dir: Optional[str] = None,
    download: bool = True,
    include_descriptions: bool = False,
    lists_dir: Optional[str] = None,
    rebuild: bool = False,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_train_words: int = DEFAULT_MIN_TRAIN_WORDS,
) -> BuildResult:
  """Builds (or finds in the cache) the Debian documentation LM corpus.

  Args:
    cache_dir: output directory (corpus files, `debs/`, `apt/`).
    packages: the packages to read (see `DEFAULT_PACKAGES`).
    debs_dir: where `.deb` files are cached; default cache_dir/debs.
    download: allow `apt-get download` (and `apt-get update` for the
      descriptions).
    include_descriptions: add the English package descriptions.
    lists_dir: existing apt lists directory with Translation-en files.
    rebuild: rebuild even if the manifest exists (a corpus of another
      `MANIFEST_FORMAT` is always rebuilt).
    valid_fraction: share of documents in valid.
    test_fraction: share of documents in test.
    vocab_size: vocabulary entries including `<S>`, `</S>`, `<UNK>`.
    min_train_words: fail if the training split has fewer words.

  Returns:
    BuildResult.

  Raises:
    DataError: unwritable cache, a package that cannot be downloaded or
      read, a package without selected documents, or too few words.
  """
  cache_dir = os.path.expanduser(cache_dir)
  files = corpus_files(cache_dir)
  vocab_path = os.path.join(cache_dir, VOCAB_FILE)
  manifest_path = os.path.join(cache_dir, MANIFEST)
  existing = None if rebuild else _read_manifest(cache_dir)
  if existing is not None and existing.get("format") != MANIFEST_FORMAT:
    logging.info(
        "Debian docs corpus in %s has format %s, not %d: rebuilding",
        cache_dir,
        existing.get("format"),
        MANIFEST_FORMAT,
    )
    existing = None
  if existing is not None:
    logging.info("Debian docs corpus found in %s", cache_dir)
    return BuildResult(cache_dir, files, vocab_path, existing)
  _check_writable(cache_dir)
  debs_dir = os.path.expanduser(debs_dir or os.path.join(cache_dir, "debs"))
  start_time = time.time()
  package_files = [
      download_package(p.name, debs_dir, download=download) for p in packages
  ]
  writers = _SplitWriters(cache_dir)
  seen = set()
  dropped = collections.Counter()
  package_info = []
  try:
    sources: List[Tuple[str, Iterable[Tuple[str, str]], object]] = [
        (p.name, package_documents(p, f), f)
        for p, f in zip(packages, package_files)
    ]
    descriptions_info = None
    if include_descriptions:
      documents, descriptions_info = _description_documents(
          cache_dir, lists_dir, download
      )
      sources.append(("Translation-en", documents, None))
    progress = text_io.ProgressLogger(
        "building the Debian docs corpus", total=len(sources), unit="packages"
    )
    for name, documents, package_file in sources:
      stats = {s: collections.Counter() for s in SPLITS}
      num_documents = 0
      for path, text in documents:
        num_documents += 1
        key = path if name == "Translation-en" else f"{name}:{path}"
        split = split_of(
            key, valid_fraction=valid_fraction, test_fraction=test_fraction
        )
        wrote = 0
        for tokens in document_sentences(path, text):
          digest = hashlib.blake2b(
              " ".join(tokens).encode("utf-8"), digest_size=8
          ).digest()
          if digest in seen:
            dropped["duplicate_sentences"] += 1
            continue
          seen.add(digest)
          writers.write(split, tokens)
          stats[split]["words"] += len(tokens)
          stats[split]["sentences"] += 1
          wrote += 1
        if wrote:
          stats[split]["documents"] += 1
          writers.stats[split]["documents"] += 1
      if num_documents == 0:
        raise DataError(
            f"Debian package {name!r} has no file matching the selected"
            " paths (package list out of date?)"
        )
      info = {
          "name": name,
          "documents": num_documents,
          "words": sum(stats[s]["words"] for s in SPLITS),
          "sentences": sum(stats[s]["sentences"] for s in SPLITS),
          "words_per_split": {s: stats[s]["words"] for s in SPLITS},
      }
      if isinstance(package_file, PackageFile):
        info.update(
            version=package_file.version,
            sha256=package_file.sha256,
            file=os.path.basename(package_file.path),
        )
      package_info.append(info)
      progress.update(1, extra=f"{name}: {info['words']} words")
    progress.done()
    writers.close()
    writers.shuffle(SHUFFLE_SEED)
    train_words = writers.stats["train"]["words"]
    if train_words < min_train_words:
      raise DataError(
          f"the Debian docs corpus has {train_words} training words, fewer"
          f" than min_train_words={min_train_words} (add packages)"
      )
    vocab = word_vocab_lib.WordVocab.from_counts(
        writers.counts["train"], max_size=vocab_size
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "sentence_order": f"random (seed {SHUFFLE_SEED})",
        "packages": package_info,
        "splits": {
            s: dict(
                writers.stats[s],
                tokens_with_eos=writers.stats[s]["words"]
                + writers.stats[s]["sentences"],
                oov_rate=_oov_rate(writers.counts[s], vocab),
            )
            for s in SPLITS
        },
        "vocab_size": vocab.size,
        "train_types": len(writers.counts["train"]),
        "dropped": dict(dropped),
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "tokenization": (
            "lowercased PTB-style: punctuation split, clitics split, numbers"
            " -> N, URLs -> <url>, e-mails -> <email>; one sentence per line"
        ),
        "build_seconds": round(time.time() - start_time, 1),
    }
    if descriptions_info is not None:
      manifest["descriptions"] = descriptions_info
    vocab.save(vocab_path + ".tmp")
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
  except BaseException:
    writers.discard()
    for p in (vocab_path + ".tmp", manifest_path + ".tmp"):
      if os.path.exists(p):
        os.remove(p)
    raise
  # Commit: the manifest goes first and comes back last, so a corpus with a
  # manifest is always complete.
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  for split in SPLITS:
    os.replace(writers.tmp[split], files[split])
  os.replace(vocab_path + ".tmp", vocab_path)
  os.replace(manifest_path + ".tmp", manifest_path)
  logging.info(
      "Debian docs corpus in %s: %s, vocab %d",
      cache_dir,
      ", ".join(f"{s}={manifest['splits'][s]['words']} words" for s in SPLITS),
      vocab.size,
  )
  return BuildResult(cache_dir, files, vocab_path, manifest)


def require_corpus(cache_dir: str) -> BuildResult:
  """The built corpus in cache_dir, or a one-line DataError saying how.

  Raises:
    DataError: if the cache has no complete corpus, or one of another
      `MANIFEST_FORMAT` (older builds kept sentences in package order).
  """
  cache_dir = os.path.expanduser(cache_dir)
  manifest = _read_manifest(cache_dir)
  if manifest is None:
    raise DataError(
        f"no Debian docs corpus in {cache_dir!r} ({MANIFEST} missing); build"
        f" it with `{BUILD_COMMAND} --cache_dir={cache_dir}`"
    )
  if manifest.get("format") != MANIFEST_FORMAT:
    raise DataError(
        f"the Debian docs corpus in {cache_dir!r} has format"
        f" {manifest.get('format')}, not {MANIFEST_FORMAT} (format 1 holds"
        " training sentences in package order, not shuffled); rebuild it"
        f" with `{BUILD_COMMAND} --cache_dir={cache_dir}`"
    )
  return BuildResult(
      cache_dir,
      corpus_files(cache_dir),
      os.path.join(cache_dir, VOCAB_FILE),
      manifest,
  )


@gin.configurable
def debian_docs_lm_data(
    train_files=None,
    eval_files=None,
    *,
    cache_dir: str = DEFAULT_CACHE_DIR,
    eval_split: str = "valid",
    vocab_file: Optional[str] = None,
    expected_vocab_size: Optional[int] = None,
    cycle_length: int = text_io.DEFAULT_CYCLE_LENGTH,
    batching: Optional[lm.LmBatching] = None,
    **legacy_batching,
) -> lm.LmData:
  """LM data from the built Debian documentation corpus.

  Args:
    train_files: glob(s) (gin macro TRAIN_FILES); None reads
      cache_dir/train.txt.
    eval_files: glob(s) (EVAL_FILES); None reads cache_dir/{eval_split}.txt.
    cache_dir: the corpus built by `build_debian_docs`.
    eval_split: 'valid' or 'test'.
    vocab_file: word vocabulary; default cache_dir/vocab.txt.
    expected_vocab_size: fail unless the vocabulary has this size.
    cycle_length: files read concurrently.
    batching: LmBatching; None takes the gin-bound `lm_batching` (default
      budget LM_BATCH_TOKENS).
    **legacy_batching: LmBatching fields by name (older configs).

  Returns:
    LmData named 'debian_docs'.

  Raises:
    DataError: if the corpus is needed and not built (the message names the
      build command), or eval_split is unknown.
  """
  if eval_split not in ("valid", "test"):
    raise DataError(f"eval_split={eval_split!r}; expected 'valid' or 'test'")
  options = lm.LmBatching.resolve(
      batching,
      legacy_batching,
      owner="debian_docs_lm_data",
      batch_tokens=LM_BATCH_TOKENS,
  )
  if train_files is None or eval_files is None or vocab_file is None:
    built = require_corpus(cache_dir)
    train_files = train_files or built.files["train"]
    eval_files = eval_files or built.files[eval_split]
    vocab_file = vocab_file or built.vocab_file
  return lm.files_lm_data(
      name="debian_docs",
      train_files=train_files,
      eval_files=eval_files,
      layout=DOCS_LAYOUT,
      vocab_file=vocab_file,
      create_vocab_if_missing=False,
      min_count=1,
      max_vocab_size=None,
      expected_vocab_size=expected_vocab_size,
      vocab_max_files=None,
      cycle_length=cycle_length,
      options=options,
  )
