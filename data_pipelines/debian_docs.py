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
   --fsys-tarfile`, `.gz` members decompressed) and extracts text:
   * HTML (stdlib `html.parser`): `<head>`, scripts, styles, `<pre>`,
     tables, navigation, headers/footers, sidebars, code listings and API
     signatures (by tag, class, role or id, see `SKIP_TAGS`,
     `SKIP_CLASS_RE`) are removed; block elements end paragraphs;
   * reStructuredText (Sphinx `_sources/*.rst.txt`) and plain text:
     comments, code-like directives (`code-block`, `kernel-doc`, `toctree`,
     tables, ...) and literal blocks (after `::`), doctests, tables, section
     adornments and option-list lines are removed, the bodies of prose
     directives (`note`, `function`, `versionadded`, ...) kept, inline markup
     reduced to its text (`` :ref:`Title <label>` `` -> `Title`);
   * POD (`perl-doc`): commands give headings/items, verbatim paragraphs
     are dropped, formatting codes reduced to their text;
   files whose name says license/copyright are skipped;
3. splits paragraphs into sentences (after `.`, `!`, `?` followed by a
   capital, a digit or an opening quote; not after `e.g.`, `i.e.`, `etc.`,
   initials, ...) and tokenizes them PTB-style (`tokenize`): lowercased,
   punctuation split into its own tokens, clitics split (`don't` -> `do
   n't`), numbers -> `N`, URLs -> `<url>`, e-mail addresses -> `<email>`;
   words joined by `.`, `-`, `_` or `'` stay one token (`os.path`,
   `x86-64`), and so do command-line options (`--input`) and `c++`. A
   sentence is kept if it has `MIN_SENTENCE_TOKENS` to
   `MAX_SENTENCE_TOKENS` tokens (so it fits `max_length=128` with `</S>`),
   at least half of its tokens are alphabetic words, and it contains an
   English function word (`ENGLISH_MARKERS`), which drops code, option
   tables, and the other languages of multilingual packages; a sentence
   seen before anywhere in the corpus is dropped (global deduplication, so
   no sentence is in two splits);
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
import html
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
import unicodedata
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import gin

from data_pipelines import debian_translations
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
MIN_SENTENCE_TOKENS = 3
# max_length 128 = tokens + </S>: every kept sentence fits.
MAX_SENTENCE_TOKENS = 127
# A sentence must contain one of these (lowercased) words to count as English.
ENGLISH_MARKERS = frozenset(
    "the a an is are was were be been to of and in on for with this that"
    " these it its as by or not can if you we they which from at will should"
    " must may has have".split()
)
# A sentence needs this share of alphabetic word tokens.
MIN_WORD_FRACTION = 0.5
NUMBER_TOKEN = "N"
URL_TOKEN = "<url>"
EMAIL_TOKEN = "<email>"
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


# -------------------------------------------------------- text extraction
BLOCK_TAGS = frozenset(
    "p div li ul ol dl dt dd h1 h2 h3 h4 h5 h6 br hr tr td th blockquote"
    " section article aside caption figcaption body main center".split()
)
SKIP_TAGS = frozenset(
    "head script style pre table nav header footer form select button"
    " textarea svg math noscript iframe object map sup".split()
)
SKIP_CLASS_RE = re.compile(
    r"(?:^|\s)(?:sphinxsidebar\w*|related|footer|header|navigation|nav\w*"
    r"|toc\w*|breadcrumbs?|headerlink|highlight[\w-]*|sig(?:nature)?"
    r"|sourceCode|programlisting|screen|synopsis|cmdsynopsis|funcsynopsis"
    r"|literallayout|example-contents|doctest|rst-footer-buttons|sidebar"
    r"|menu|footnotes?|index|contents|topic|example|lilypond\w*"
    r"|rustdoc-toggle|mobile-topbar|sidebar-elems|search\w*)(?:\s|$)"
)
SKIP_ID_RE = re.compile(
    r"^(?:sidebar|toc|nav\w*|footer|header|searchbox|menu|breadcrumbs?)$"
)
VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track"
    " wbr".split()
)


class _HtmlText(html.parser.HTMLParser):
  """Collects the paragraphs of an HTML page outside skipped elements."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: List[str] = []
    self._buffer: List[str] = []
    self._skip_tag: Optional[str] = None
    self._skip_depth = 0

  def _flush(self):
    text = " ".join("".join(self._buffer).split())
    if text:
      self.paragraphs.append(text)
    self._buffer = []

  def handle_starttag(self, tag, attrs):
    if tag in VOID_TAGS:
      if self._skip_tag is None and tag in BLOCK_TAGS:
        self._flush()
      return
    if self._skip_tag is not None:
      if tag == self._skip_tag:
        self._skip_depth += 1
      return
    attributes = dict(attrs) if tag not in ("html", "body") else {}
    if (
        tag in SKIP_TAGS
        or SKIP_CLASS_RE.search(attributes.get("class") or "")
        or SKIP_ID_RE.match(attributes.get("id") or "")
        or attributes.get("role") in ("navigation", "search", "banner")
    ):
      self._flush()
      self._skip_tag = tag
      self._skip_depth = 1
      return
    if tag in BLOCK_TAGS:
      self._flush()

  def handle_startendtag(self, tag, attrs):
    if self._skip_tag is None and tag in BLOCK_TAGS:
      self._flush()

  def handle_endtag(self, tag):
    if self._skip_tag is not None:
      if tag == self._skip_tag:
        self._skip_depth -= 1
        if self._skip_depth == 0:
          self._skip_tag = None
      return
    if tag in BLOCK_TAGS:
      self._flush()

  def handle_data(self, data):
    if self._skip_tag is None:
      self._buffer.append(data)

  def close(self):
    super().close()
    self._flush()


def html_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of an HTML page (see module docstring, step 2).

  Args:
    text: the page.

  Returns:
    Paragraphs with whitespace collapsed.
  """
  parser = _HtmlText()
  parser.feed(text)
  parser.close()
  return parser.paragraphs


# Directives whose body is prose (kept); every other directive is dropped
# with its indented body.
PROSE_DIRECTIVES = frozenset(
    "note warning seealso tip important attention caution danger error hint"
    " admonition versionadded versionchanged deprecated function method"
    " class attribute data exception decorator decoratormethod classmethod"
    " staticmethod describe object module currentmodule py:function py:method"
    " py:class py:attribute py:data py:exception py:module c:function"
    " c:macro c:type c:member c:var c:struct c:union c:enum c:enumerator"
    " cpp:function cpp:class cpp:type cpp:member envvar option cmdoption"
    " program rst:directive rst:role confval event opcode abstractmethod"
    " coroutinefunction coroutinemethod glossary topic sidebar rubric only"
    " container compound centered hlist".split()
)
# Directives whose argument on the directive line is text
# ('.. note:: Text.'); the version directives' argument starts with a version.
VERSION_DIRECTIVES = frozenset(("versionadded", "versionchanged", "deprecated"))
INLINE_TEXT_DIRECTIVES = VERSION_DIRECTIVES | frozenset(
    "note warning tip important attention caution danger hint"
    " seealso".split()
)
_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(.*)$")
_COMMENT_RE = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT_RE = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_SIMPLE_TABLE_RE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_GRID_TABLE_RE = re.compile(r"^\s*[+|]")
_OPTION_LINE_RE = re.compile(r"^\s*--?[A-Za-z0-9][\w-]*(?:[ =]\S+)?(\s{2,}|$)")
_FIELD_RE = re.compile(r"^\s*:[^:`\s][^:`]*:(\s+|$)")
_BULLET_RE = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)]|#\.|\(\w\))\s+")
_ROLE_TARGET_RE = re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`")
_ROLE_RE = re.compile(r":[\w:.+-]+:`[~!]?([^`]*)`")
_LINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_LITERAL_RE = re.compile(r"``([^`]*)``")
_INTERPRETED_RE = re.compile(r"`([^`]*)`_{0,2}")
_EMPHASIS_RE = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_FOOTNOTE_REF_RE = re.compile(r"\s*\[(?:#\w*|\*|\d+)\]_")
_SUBSTITUTION_RE = re.compile(r"\|([^|\s][^|]*)\|_{0,2}")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def rst_inline(text: str) -> str:
  """reST inline markup reduced to its text."""
  text = _ROLE_TARGET_RE.sub(r"\1", text)
  text = _ROLE_RE.sub(r"\1", text)
  text = _LINK_RE.sub(r"\1", text)
  text = _LITERAL_RE.sub(r"\1", text)
  text = _INTERPRETED_RE.sub(r"\1", text)
  text = _EMPHASIS_RE.sub(lambda m: m.group(1) or m.group(2), text)
  text = _FOOTNOTE_REF_RE.sub("", text)
  text = _SUBSTITUTION_RE.sub(r"\1", text)
  return text.replace("\\ ", "").replace("\\", "")


def rst_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of reStructuredText or plain text (module docstring).

  Args:
    text: the document.

  Returns:
    Paragraphs (inline markup reduced to text, whitespace collapsed).
  """
  lines = text.expandtabs(8).splitlines()
  paragraphs: List[str] = []
  current: List[str] = []
  literal_indent = None
  para_indent = 0

  def flush():
    joined = " ".join(" ".join(current).split())
    if joined:
      paragraphs.append(rst_inline(joined))
    current.clear()

  def skip_block(start: int, indent: int) -> int:
    """Index of the first line after the block indented more than indent."""
    j = start
    while j < len(lines) and (
        not lines[j].strip() or _indent(lines[j]) > indent
    ):
      j += 1
    return j

  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    if not stripped:
      flush()
      i += 1
      continue
    if literal_indent is not None:
      # The literal block: lines indented more than the paragraph that
      # ended with '::'.
      indent, literal_indent = literal_indent, None
      if _indent(line) > indent:
        i = skip_block(i, indent)
        continue
    directive = _DIRECTIVE_RE.match(line)
    if directive:
      flush()
      name = directive.group(2).lower()
      indent = _indent(line)
      if name in PROSE_DIRECTIVES:
        rest = directive.group(3).strip()
        i += 1
        # Options (':opt: value') directly after the directive line.
        while i < len(lines) and _FIELD_RE.match(lines[i]):
          i += 1
        if name in VERSION_DIRECTIVES:
          rest = " ".join(rest.split()[1:])  # drop the version number
        if rest and name in INLINE_TEXT_DIRECTIVES:
          current.append(rest)
        continue
      i = skip_block(i + 1, indent)
      continue
    if _COMMENT_RE.match(line):
      flush()
      i = skip_block(i + 1, _indent(line))
      continue
    if stripped.startswith(">>>"):
      flush()
      while i < len(lines) and lines[i].strip():
        i += 1
      continue
    if _SIMPLE_TABLE_RE.match(line):
      flush()
      i += 1
      while i < len(lines):
        if _SIMPLE_TABLE_RE.match(lines[i]) and (
            i + 1 >= len(lines) or not lines[i + 1].strip()
        ):
          i += 1
          break
        i += 1
      continue
    if _ADORNMENT_RE.match(line):
      flush()
      i += 1
      continue
    if _GRID_TABLE_RE.match(line) and (
        stripped.startswith("+-") or stripped.startswith("+=")
    ):
      flush()
      while i < len(lines) and lines[i].strip():
        i += 1
      continue
    if _OPTION_LINE_RE.match(line):
      flush()
      i += 1
      continue
    bullet = _BULLET_RE.match(line)
    if bullet:
      flush()
      line = line[bullet.end() :]
    field = _FIELD_RE.match(line)
    if field:
      flush()
      line = line[field.end() :]
    if line.rstrip().endswith("::"):
      body = line.rstrip()[:-2].rstrip()
      if not current:
        para_indent = _indent(lines[i])
      current.append(body + ":" if body else "")
      flush()
      literal_indent = para_indent
      i += 1
      continue
    if not current:
      para_indent = _indent(lines[i])
    current.append(line)
    i += 1
  flush()
  return paragraphs


_POD_CODE_RE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_MULTI_RE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
  code, body = match.group(1), match.group(2)
  if code in ("X", "Z"):
    return ""
  if code == "E":
    if body.isdigit():
      return chr(int(body))
    return _POD_ESCAPES.get(body, html.unescape(f"&{body};"))
  if code == "L":
    body = body.split("|", 1)[0] if "|" in body else body
    return body.replace("/", " ").replace('"', "").strip()
  return body


def pod_inline(text: str) -> str:
  """POD formatting codes reduced to their text."""
  text = _POD_MULTI_RE.sub(_pod_code, text)
  previous = None
  while previous != text:
    previous = text
    text = _POD_CODE_RE.sub(_pod_code, text)
  return text


def pod_paragraphs(text: str) -> List[str]:
  """Prose paragraphs of a POD document.

  Args:
    text: the document.

  Returns:
    Headings, items and text paragraphs (verbatim paragraphs, =begin/=end
    and =for blocks dropped), formatting codes reduced to text.
  """
  out = []
  in_begin = False
  for block in re.split(r"\n\s*\n", text):
    if not block.strip():
      continue
    if block.startswith("="):
      command, _, rest = block.partition(" ")
      command = command.split("\n", 1)[0]
      if command == "=begin":
        in_begin = True
      elif command == "=end":
        in_begin = False
      elif command in ("=head1", "=head2", "=head3", "=head4", "=item"):
        if not in_begin and rest.strip() not in ("*", ""):
          out.append(" ".join(pod_inline(rest).split()))
      continue
    if in_begin or block[0] in " \t":
      continue
    out.append(" ".join(pod_inline(block).split()))
  return [p for p in out if p]


def document_paragraphs(path: str, text: str) -> List[str]:
  """Paragraphs of one document, by file type (HTML, POD, else reST/text)."""
  lower = path.lower()
  if re.search(r"\.html?(\.[a-z]{2}(-[a-z]{2})?)?$", lower):
    return html_paragraphs(text)
  if lower.endswith(".pod"):
    return pod_paragraphs(text)
  return rst_paragraphs(text)


# ----------------------------------------------- sentences and tokenization
ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf mr mrs ms dr prof fig figs no nos sec ch approx eq"
    " st jr sr inc ltd co al resp ca viz esp vol pp op cit ex incl".split()
)
_SENTENCE_END_RE = re.compile(
    r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])"
)
_URL_RE = re.compile(r"\b(?:https?|ftp)://[^\s<>\"')\]]+|\bwww\.[^\s<>\"')\]]+")
_EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_TOKEN_RE = re.compile(
    r"<url>|<email>|(?<!\S)--?[^\W\d_][\w\-]*|[^\W\d_]\+\+"
    r"|[^\W_](?:\w|['.\-](?=[^\W_]))*|\.{2,}|-{2,}|\S"
)
_NUMBER_RE = re.compile(r"^\d+(?:[.,:\-]\d+)*$")
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ALPHA_RE = re.compile(r"^[^\W\d_][^\W\d_'\-]*(?:['\-][^\W\d_]+)*$")
_NORMALIZE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": "...",
        "\u00a0": " ",
        "\u00b6": " ",
    }
)


def normalize(text: str) -> str:
  """NFKC, ASCII quotes and dashes, URLs / e-mails as placeholder tokens."""
  text = unicodedata.normalize("NFKC", text).translate(_NORMALIZE)
  text = _URL_RE.sub(f" {URL_TOKEN} ", text)
  return _EMAIL_RE.sub(f" {EMAIL_TOKEN} ", text)


def split_sentences(paragraph: str) -> List[str]:
  """Sentences of one paragraph (see module docstring, step 3).

  Args:
    paragraph: text with whitespace collapsed.

  Returns:
    The sentences, stripped.
  """
  out = []
  start = 0
  for match in _SENTENCE_END_RE.finditer(paragraph):
    before = paragraph[start : match.start()].rsplit(None, 1)
    last = before[-1].lower() if before else ""
    last = last.lstrip("\"'([")
    if paragraph[match.start()] == "." and (
        last in ABBREVIATIONS or (len(last) == 1 and last.isalpha())
    ):
      continue
    out.append(paragraph[start : match.end()].strip())
    start = match.end()
  out.append(paragraph[start:].strip())
  return [s for s in out if s]


def tokenize(sentence: str) -> List[str]:
  """PTB-style tokens of one sentence (see module docstring, step 3).

  Args:
    sentence: raw sentence text (already normalized or not).

  Returns:
    Lowercased tokens: words, `N` for numbers, punctuation, `<url>`,
    `<email>`; clitics split.
  """
  tokens = []
  text = normalize(sentence)
  for match in _TOKEN_RE.finditer(text):
    token = match.group(0)
    end = match.end()
    lower = token.lower()
    if (
        lower in ABBREVIATIONS
        and end < len(text)
        and text[end] == "."
        and lower not in ("no", "co", "op", "ex", "al")
    ):
      # The abbreviation keeps its period ('e.g.'), so the '.' regex match
      # that follows is consumed here.
      tokens.append(lower + ".")
      continue
    if token == "." and tokens and tokens[-1].endswith(".") and (
        tokens[-1][:-1] in ABBREVIATIONS
    ) and match.start() > 0 and text[match.start() - 1] != " ":
      continue
    if _NUMBER_RE.match(token):
      tokens.append(NUMBER_TOKEN)
      continue
    clitic = _CLITIC_RE.match(lower)
    if clitic and _ALPHA_RE.match(clitic.group(1)):
      tokens.extend(clitic.groups())
      continue
    tokens.append(lower)
  return tokens


def keep_sentence(tokens: Sequence[str]) -> bool:
  """Whether a tokenized sentence is English prose (module docstring)."""
  if not MIN_SENTENCE_TOKENS <= len(tokens) <= MAX_SENTENCE_TOKENS:
    return False
  words = sum(1 for t in tokens if _ALPHA_RE.match(t))
  if words < MIN_SENTENCE_TOKENS or words < MIN_WORD_FRACTION * len(tokens):
    return False
  return any(t in ENGLISH_MARKERS for t in tokens)


def document_sentences(path: str, text: str) -> Iterator[List[str]]:
  """Kept tokenized sentences of one document, in order (not deduplicated).

  Args:
    path: path inside the package (selects the format).
    text: the document.

  Yields:
    Token lists.
  """
  for paragraph in document_paragraphs(path, text):
    for sentence in split_sentences(normalize(paragraph)):
      tokens = tokenize(sentence)
      if keep_sentence(tokens):
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
      ", ".join(
          f"{s}={manifest['splits'][s]['words']} words" for s in SPLITS
      ),
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
