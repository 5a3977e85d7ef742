"""Debian package-description translations: a real En-Fr / En-De corpus.

Debian's translators translate package descriptions; apt can download them
(`Translation-xx` index files) without any other network access. The builder:

1. fetches the files with
   `apt-get -o Dir::State::Lists=CACHE/apt/lists
   -o Acquire::Languages=en,fr,de update`
   (needs root; the system's apt state is not touched), or reads an existing
   lists directory (`lists_dir=`);
2. parses the RFC822 entries (`Package:`, `Description-md5:`,
   `Description-xx:` whose first line is the short description and whose
   continuation lines, with ` .` as paragraph break, the long description),
   decompressing `.lz4` with `/usr/lib/apt/apt-helper cat-file` (`.gz`,
   `.xz` and plain files are read directly);
3. pairs the English and the foreign entry of each `Description-md5`;
4. segments: the short descriptions form one pair; long descriptions are
   aligned paragraph by paragraph when their paragraph counts agree, then
   bullet item by item when item counts agree, then sentence by sentence when
   sentence counts agree (otherwise the item, or the paragraph if it has no
   more than `MAX_UNIT_CHARS` characters, is kept as one pair);
5. cleans (whitespace collapsed, untranslated pairs with identical sides
   dropped), deduplicates identical pairs, and splits train/dev/test *by
   package*: packages that share a source or a target string are joined into
   one group (union-find), and whole groups go to one split, so no string
   appears in two splits. Small groups are assigned to test, then dev, in the
   order of a hash of their first package name until each holds its
   fraction; everything else is training data;
6. writes `CACHE/en-fr/{train,dev,test}.en-fr.tsv` (source<TAB>target) and
   `CACHE/en-fr/stats.json`, deterministically (same input files, same
   output bytes).

Observed on Debian 12 "bookworm" main (May 2025 snapshot): see README.md.
"""

import collections
import dataclasses
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import gin

from data_pipelines import mt
from data_pipelines import text_io
from data_pipelines import wmt14
from data_pipelines.errors import DataError

APT_GET = "apt-get"
APT_HELPER = "/usr/lib/apt/apt-helper"
TRANSLATION_GLOB = "*_i18n_Translation-{lang}"
COMPRESSED_SUFFIXES = ("", ".lz4", ".gz", ".xz")
SPLITS = ("train", "dev", "test")
DEFAULT_DEV_FRACTION = 0.02
DEFAULT_TEST_FRACTION = 0.02
# Groups larger than this many pairs always go to training.
MAX_HELDOUT_GROUP_PAIRS = 40
# Unaligned paragraphs longer than this are not kept as one pair.
MAX_UNIT_CHARS = 600
DEFAULT_CACHE_DIR = "~/.cache/moe_keras/debian_translations"
DEBIAN_VOCAB_SIZE = 8192
# Default global token budget per step and max_length (pieces).
BATCH_TOKENS = 4096
MAX_LENGTH = 96
_BULLET_RE = re.compile(
    r"^\s*(?:[*+\-\u2022\u00b7\u2013\u2014\u2212o]|\d{1,2}[.)])\s+"
)
_SENTENCE_END_RE = re.compile(
    r'(?<=[.!?\u2026])\s+(?=[\u00ab"\u201c\u2018(\[]?\s?[A-Z0-9\u00c0-\u00de])'
)
_SPACE_RE = re.compile(r"\s+")


@dataclasses.dataclass
class Entry:
  """One Translation-xx entry."""

  package: str
  md5: str
  short: str
  long_lines: List[str]


@dataclasses.dataclass
class BuildResult:
  """Paths and counts of a built corpus.

  Attributes:
    directory: output directory.
    files: {'train'|'dev'|'test': TSV path}.
    counts: statistics (also written to stats.json).
  """

  directory: str
  files: Dict[str, str]
  counts: Dict[str, int]


# ----------------------------------------------------------------- fetching
def fetch_translation_lists(
    cache_dir: str, languages: Sequence[str] = ("en", "fr", "de")
) -> str:
  """Downloads Debian Translation-xx indexes with apt into cache_dir.

  Args:
    cache_dir: cache directory; lists go to cache_dir/apt/lists.
    languages: Acquire::Languages to fetch.

  Returns:
    The lists directory.

  Raises:
    DataError: if apt-get is missing, we are not root, or apt fails.
  """
  if shutil.which(APT_GET) is None:
    raise DataError(
        "fetching Debian translations needs apt-get (Debian/Ubuntu); pass"
        " lists_dir= with existing *_i18n_Translation-* files instead"
    )
  if hasattr(os, "geteuid") and os.geteuid() != 0:
    raise DataError(
        "fetching Debian translations runs `apt-get update` and needs root;"
        " run once as root or pass lists_dir= with Translation files"
    )
  base = os.path.join(os.path.expanduser(cache_dir), "apt")
  lists = os.path.join(base, "lists")
  os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
  os.makedirs(os.path.join(base, "cache", "archives", "partial"), exist_ok=True)
  command = [
      APT_GET,
      "-o",
      f"Dir::State::Lists={lists}",
      "-o",
      f'Dir::Cache={os.path.join(base, "cache")}',
      "-o",
      "Dir::Cache::pkgcache=",
      "-o",
      "Dir::Cache::srcpkgcache=",
      "-o",
      f'Acquire::Languages={",".join(languages)}',
      "update",
  ]
  progress = text_io.ProgressLogger(
      "fetching Debian translations", unit="lines"
  )
  logging.info("running %s", " ".join(command))
  proc = subprocess.Popen(
      command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  tail = collections.deque(maxlen=5)
  for line in proc.stdout:
    line = line.rstrip()
    tail.append(line)
    logging.info("apt: %s", line)
    progress.update(1)
  if proc.wait() != 0:
    raise DataError(
        f"apt-get update failed (exit {proc.returncode}): " + " | ".join(tail)
    )
  progress.done()
  return lists


def translation_files(lists_dir: str, language: str) -> List[str]:
  """Translation-xx index files for one language in an apt lists directory.

  Raises:
    DataError: if there is none.
  """
  pattern = os.path.join(lists_dir, TRANSLATION_GLOB.format(lang=language))
  files = sorted(
      f for suffix in COMPRESSED_SUFFIXES for f in glob.glob(pattern + suffix)
  )
  if not files:
    raise DataError(
        f"no Debian Translation-{language} file matches {pattern!r}[.lz4|.gz|"
        ".xz]; expected an apt lists directory fetched with"
        f" Acquire::Languages including {language}"
    )
  return files


def read_index_text(path: str) -> str:
  """Decompressed text of an apt index file (.lz4 via apt-helper)."""
  if path.endswith(".lz4"):
    if not os.path.exists(APT_HELPER):
      raise DataError(
          f"{path!r} is lz4-compressed and {APT_HELPER} (apt) is not"
          " available to decompress it"
      )
    out = subprocess.run(
        [APT_HELPER, "cat-file", path], check=False, capture_output=True
    )
    if out.returncode != 0:
      raise DataError(
          f"{APT_HELPER} cat-file {path!r} failed:"
          f' {out.stderr.decode(errors="replace").strip()}'
      )
    data = out.stdout
  elif path.endswith(".gz"):
    with gzip.open(path, "rb") as f:
      data = f.read()
  elif path.endswith(".xz"):
    with lzma.open(path, "rb") as f:
      data = f.read()
  else:
    with open(path, "rb") as f:
      data = f.read()
  return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------ parsing
def parse_translations(
    text: str, language: str, source: str = ""
) -> List[Entry]:
  """Parses the RFC822 entries of a Translation-xx file.

  Args:
    text: file contents.
    language: the xx of the `Description-xx` field.
    source: file name for error messages.

  Returns:
    Entries with a Description-md5 and a Description-xx field.

  Raises:
    DataError: if the text has entries but none with Description-xx.
  """
  entries = []
  field = f"description-{language}"
  paragraphs = 0
  # Entries are separated by empty lines. Only truly empty lines count: some
  # translations contain lines of non-ASCII spaces (e.g. ' \xa0'), which are
  # treated as paragraph breaks inside the description instead.
  for block in re.split(r"\n(?:[ \t]*\r?\n)+", text.replace("\r\n", "\n")):
    if not block.strip():
      continue
    paragraphs += 1
    fields: Dict[str, List[str]] = {}
    current = None
    for line in block.split("\n"):
      if line.startswith((" ", "\t")) and current is not None:
        fields[current].append(line)
      elif ":" in line:
        key, value = line.split(":", 1)
        current = key.strip().lower()
        fields[current] = [value.strip()]
    if field in fields and "description-md5" in fields:
      desc = fields[field]
      entries.append(
          Entry(
              package=fields.get("package", [""])[0],
              md5=fields["description-md5"][0],
              short=desc[0],
              long_lines=desc[1:],
          )
      )
  if paragraphs and not entries:
    raise DataError(
        f'{source or "Translation file"} has {paragraphs} entries but none'
        f" with Description-md5 and Description-{language}"
    )
  return entries


def _clean(text: str) -> str:
  return _SPACE_RE.sub(" ", text).strip()


def long_paragraphs(long_lines: Sequence[str]) -> List[List[str]]:
  """Splits a long description into paragraphs of items (bullets).

  Args:
    long_lines: continuation lines (each starting with a space); ' .' and
      lines of only (Unicode) whitespace separate paragraphs.

  Returns:
    Paragraphs; each a list of items (cleaned strings): the text before the
    first bullet (if any) and one item per bullet.
  """
  paragraphs = []
  items: List[List[str]] = []
  for raw in list(long_lines) + [" ."]:
    line = raw[1:] if raw.startswith(" ") else raw
    if line.strip() in (".", ""):
      cleaned = [_clean(" ".join(i)) for i in items]
      cleaned = [c for c in cleaned if c]
      if cleaned:
        paragraphs.append(cleaned)
      items = []
      continue
    if _BULLET_RE.match(line) or not items:
      items.append([line])
    else:
      items[-1].append(line)
  return paragraphs


def split_sentences(text: str) -> List[str]:
  """Sentences of a cleaned text (split after . ! ? … before a capital)."""
  return [s for s in _SENTENCE_END_RE.split(text) if s]


def align_description(src: Entry, tgt: Entry) -> List[Tuple[str, str]]:
  """Sentence pairs of one description (see module docstring, step 4)."""
  pairs = []
  if _clean(src.short) and _clean(tgt.short):
    pairs.append((_clean(src.short), _clean(tgt.short)))
  src_pars = long_paragraphs(src.long_lines)
  tgt_pars = long_paragraphs(tgt.long_lines)
  if len(src_pars) != len(tgt_pars):
    return pairs
  for src_items, tgt_items in zip(src_pars, tgt_pars):
    if len(src_items) != len(tgt_items):
      joined = (" ".join(src_items), " ".join(tgt_items))
      if max(len(joined[0]), len(joined[1])) <= MAX_UNIT_CHARS:
        pairs.append(joined)
      continue
    for s_item, t_item in zip(src_items, tgt_items):
      s_sents, t_sents = split_sentences(s_item), split_sentences(t_item)
      if len(s_sents) == len(t_sents):
        pairs.extend(zip(s_sents, t_sents))
      else:
        pairs.append((s_item, t_item))
  return pairs


# ---------------------------------------------------------------- splitting
class _UnionFind:

  def __init__(self):
    self.parent: Dict[str, str] = {}

  def find(self, x: str) -> str:
    self.parent.setdefault(x, x)
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a: str, b: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      if rb < ra:
        ra, rb = rb, ra
      self.parent[rb] = ra


def _stable_hash(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_by_package(
    pairs: Sequence[Tuple[str, str, Tuple[str, ...]]],
    *,
    dev_fraction: float,
    test_fraction: float,
) -> Dict[str, List[Tuple[str, str]]]:
  """Leak-free deterministic train/dev/test split of deduplicated pairs.

  Args:
    pairs: (source, target, packages) in a deterministic order, each
      (source, target) unique.
    dev_fraction: target share of pairs in dev.
    test_fraction: target share of pairs in test.

  Returns:
    {'train'|'dev'|'test': [(source, target), ...]} in input order.
  """
  uf = _UnionFind()
  first_package: Dict[str, str] = {}
  for src, tgt, packages in pairs:
    anchor = packages[0]
    for key in ("S\t" + src, "T\t" + tgt) + tuple("P\t" + p for p in packages):
      uf.union("P\t" + anchor, key)
  group_pairs: Dict[str, List[int]] = collections.defaultdict(list)
  for i, (_, _, packages) in enumerate(pairs):
    root = uf.find("P\t" + packages[0])
    group_pairs[root].append(i)
    first_package.setdefault(root, packages[0])
  order = sorted(group_pairs, key=lambda r: _stable_hash(first_package[r]))
  wanted = {
      "test": int(round(test_fraction * len(pairs))),
      "dev": int(round(dev_fraction * len(pairs))),
  }
  assignment: Dict[int, str] = {}
  filled = {"test": 0, "dev": 0}
  for root in order:
    members = group_pairs[root]
    split = "train"
    if len(members) <= MAX_HELDOUT_GROUP_PAIRS:
      for name in ("test", "dev"):
        if filled[name] < wanted[name]:
          split = name
          filled[name] += len(members)
          break
    for i in members:
      assignment[i] = split
  out = {name: [] for name in SPLITS}
  for i, (src, tgt, _) in enumerate(pairs):
    out[assignment[i]].append((src, tgt))
  return out


# ----------------------------------------------------------------- building
def _entries_by_md5(
    files: Sequence[str], language: str
) -> Tuple[Dict[str, Entry], Dict[str, List[str]]]:
  by_md5: Dict[str, Entry] = {}
  packages: Dict[str, List[str]] = collections.defaultdict(list)
  for path in files:
    for entry in parse_translations(read_index_text(path), language, path):
      by_md5.setdefault(entry.md5, entry)
      if entry.package not in packages[entry.md5]:
        packages[entry.md5].append(entry.package)
  return by_md5, packages


def build_pairs(
    lists_dir: str, *, source_lang: str = "en", target_lang: str = "fr"
) -> Tuple[List[Tuple[str, str, Tuple[str, ...]]], Dict[str, int]]:
  """Aligned, cleaned, deduplicated pairs from an apt lists directory.

  Args:
    lists_dir: directory with *_i18n_Translation-xx[.lz4] files.
    source_lang: 'en' (the original descriptions).
    target_lang: 'fr', 'de', ...

  Returns:
    (pairs, counts): pairs (source, target, packages) ordered by first
    appearance (package order of the target-language files); counts of
    entries, aligned descriptions, raw pairs, identical pairs dropped,
    duplicates dropped, and final pairs.
  """
  src_files = translation_files(lists_dir, source_lang)
  tgt_files = translation_files(lists_dir, target_lang)
  progress = text_io.ProgressLogger(
      f"reading Debian translations {source_lang}-{target_lang}",
      total=len(src_files) + len(tgt_files),
      unit="files",
  )
  src_entries, _ = _entries_by_md5(src_files, source_lang)
  progress.update(len(src_files))
  tgt_entries, tgt_packages = _entries_by_md5(tgt_files, target_lang)
  progress.update(len(tgt_files))
  progress.done(
      extra=f"{len(src_entries)} {source_lang} and {len(tgt_entries)}"
      f" {target_lang} descriptions"
  )
  counts = collections.Counter(
      source_descriptions=len(src_entries),
      target_descriptions=len(tgt_entries),
  )
  seen: Dict[Tuple[str, str], int] = {}
  pairs: List[Tuple[str, str, List[str]]] = []
  for md5, tgt in tgt_entries.items():
    src = src_entries.get(md5)
    if src is None:
      counts["target_without_source"] += 1
      continue
    counts["paired_descriptions"] += 1
    for s, t in align_description(src, tgt):
      counts["raw_pairs"] += 1
      s, t = s.replace("\t", " "), t.replace("\t", " ")
      if s == t:
        counts["identical_dropped"] += 1
        continue
      key = (s, t)
      if key in seen:
        counts["duplicates_dropped"] += 1
        known = pairs[seen[key]][2]
        for p in tgt_packages[md5]:
          if p not in known:
            known.append(p)
        continue
      seen[key] = len(pairs)
      pairs.append((s, t, list(tgt_packages[md5])))
  counts["pairs"] = len(pairs)
  return [(s, t, tuple(p)) for s, t, p in pairs], dict(counts)


def output_files(
    out_dir: str, source_lang: str, target_lang: str
) -> Dict[str, str]:
  """The TSV paths of a built corpus."""
  return {
      split: os.path.join(out_dir, f"{split}.{source_lang}-{target_lang}.tsv")
      for split in SPLITS
  }


@gin.configurable
def build_debian_translations(
    cache_dir: str = DEFAULT_CACHE_DIR,
    *,
    source_lang: str = "en",
    target_lang: str = "fr",
    lists_dir: Optional[str] = None,
    fetch: bool = True,
    rebuild: bool = False,
    dev_fraction: float = DEFAULT_DEV_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> BuildResult:
  """Builds (or finds in the cache) the Debian translation corpus.

  Args:
    cache_dir: cache directory; the corpus goes to cache_dir/{src}-{tgt}/.
    source_lang: 'en'.
    target_lang: 'fr' or 'de' (any language Debian translates).
    lists_dir: existing apt lists directory to read instead of fetching.
    fetch: run apt-get update into the cache if lists_dir is None and the
      cache has no Translation files yet.
    rebuild: rebuild even if the TSV files exist.
    dev_fraction: share of pairs for dev.
    test_fraction: share of pairs for test.

  Returns:
    BuildResult with the TSV paths and counts.

  Raises:
    DataError: if the translations cannot be fetched or read.
  """
  cache_dir = os.path.expanduser(cache_dir)
  out_dir = os.path.join(cache_dir, f"{source_lang}-{target_lang}")
  files = output_files(out_dir, source_lang, target_lang)
  stats_path = os.path.join(out_dir, "stats.json")
  if (
      not rebuild
      and all(os.path.exists(p) for p in files.values())
      and (os.path.exists(stats_path))
  ):
    with open(stats_path) as f:
      counts = json.load(f)
    logging.info(
        "Debian %s-%s corpus found in %s", source_lang, target_lang, out_dir
    )
    return BuildResult(out_dir, files, counts)
  if lists_dir is None:
    lists_dir = os.path.join(cache_dir, "apt", "lists")
    have = glob.glob(
        os.path.join(lists_dir, TRANSLATION_GLOB.format(lang=target_lang) + "*")
    )
    if not have:
      if not fetch:
        raise DataError(
            f"no Debian Translation-{target_lang} files in {lists_dir!r} and"
            " fetch=False"
        )
      fetch_translation_lists(cache_dir, ("en", source_lang, target_lang))
  pairs, counts = build_pairs(
      lists_dir, source_lang=source_lang, target_lang=target_lang
  )
  if not pairs:
    raise DataError(
        f"no {source_lang}-{target_lang} pairs found in {lists_dir!r}"
    )
  splits = split_by_package(
      pairs, dev_fraction=dev_fraction, test_fraction=test_fraction
  )
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(stats_path):  # a rebuild: the old build is unfinished
    os.remove(stats_path)
  for split, path in files.items():
    text_io.write_lines(path, (f"{src}\t{tgt}" for src, tgt in splits[split]))
    counts[f"{split}_pairs"] = len(splits[split])
  # Written last and whole: its presence marks a finished build.
  text_io.write_lines(
      stats_path, json.dumps(counts, indent=1, sort_keys=True).splitlines()
  )
  logging.info(
      "Debian %s-%s corpus: %s",
      source_lang,
      target_lang,
      ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
  )
  return BuildResult(out_dir, files, counts)


@gin.configurable
def debian_mt_data(
    train_files=None,
    eval_files=None,
    *,
    cache_dir: str = DEFAULT_CACHE_DIR,
    source_lang: str = "en",
    target_lang: str = "fr",
    eval_split: str = "dev",
    lists_dir: Optional[str] = None,
    fetch: bool = True,
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = True,
    vocab_size: int = DEBIAN_VOCAB_SIZE,
    expected_vocab_size: Optional[int] = None,
    learn_kwargs: Optional[Dict[str, object]] = None,
    batching: Optional[mt.MtBatching] = None,
    **legacy_batching,
) -> mt.MtData:
  """Translation data from the Debian description translations.

  Args:
    train_files: TSV glob(s) (gin macro TRAIN_FILES); None builds / reuses
      the corpus in cache_dir and trains on its train split.
    eval_files: TSV glob(s) (EVAL_FILES); None uses the built `eval_split`.
    cache_dir: corpus cache (see `build_debian_translations`).
    source_lang: 'en' (or 'fr'/'de' to translate into English: the TSV
      columns are swapped automatically from the file names).
    target_lang: 'fr' or 'de' (or 'en').
    eval_split: 'dev' or 'test'.
    lists_dir: existing apt lists directory (skips fetching).
    fetch: allow running apt-get update.
    vocab_file: wordpiece vocabulary; default
      cache_dir/{pair}/wordpiece-{N}.txt.
    create_vocab_if_missing: learn and save the vocabulary if missing.
    vocab_size: wordpiece vocabulary size (small corpus: 8k).
    expected_vocab_size: fail unless the vocabulary has this size.
    learn_kwargs: extra `WordpieceVocab.learn` arguments.
    batching: MtBatching; None takes the gin-bound `mt_batching` (default
      budget BATCH_TOKENS and max_length MAX_LENGTH).
    **legacy_batching: MtBatching fields by name (older configs).

  Returns:
    MtData named 'debian_{src}_{tgt}'.
  """
  options = mt.MtBatching.resolve(
      batching,
      legacy_batching,
      owner="debian_mt_data",
      batch_tokens=BATCH_TOKENS,
      max_length=MAX_LENGTH,
  )
  pair_langs = sorted({source_lang, target_lang} - {"en"})
  foreign = pair_langs[0] if pair_langs else target_lang
  if train_files is None or eval_files is None:
    if eval_split not in ("dev", "test"):
      raise ValueError(f"eval_split={eval_split!r}; expected dev or test")
    built = build_debian_translations(
        cache_dir,
        source_lang="en",
        target_lang=foreign,
        lists_dir=lists_dir,
        fetch=fetch,
    )
    train_files = train_files or built.files["train"]
    eval_files = eval_files or built.files[eval_split]
    if vocab_file is None:
      vocab_file = os.path.join(built.directory, f"wordpiece-{vocab_size}.txt")
  return wmt14.files_mt_data(
      name=f"debian_{source_lang}_{target_lang}",
      train_files=train_files,
      eval_files=eval_files,
      source_lang=source_lang,
      target_lang=target_lang,
      corpus_weights=None,
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      vocab_size=vocab_size,
      expected_vocab_size=expected_vocab_size,
      vocab_sample_pairs=None,
      learn_kwargs=learn_kwargs,
      options=options,
  )
