"""WMT'14 English-French / English-German from the raw distribution files.

Accepted files (TRAIN_FILES / EVAL_FILES globs may mix them):

* line-aligned text pairs, named by language suffix, e.g.
  `europarl-v7.fr-en.en` + `europarl-v7.fr-en.fr`,
  `commoncrawl.fr-en.{en,fr}`, `news-commentary-v9.fr-en.{en,fr}`,
  `giga-fren.release2.fixed.{en,fr}[.gz]`, `undoc.2000.fr-en.{en,fr}`,
  `newstest2013.{en,fr}`. A glob may match either side (or both); the
  partner is the same name with the other language suffix. Their line counts
  must agree (checked once, with progress for big files).
* SGML test sets: `newstest2014-fren-src.en.sgm` +
  `newstest2014-fren-ref.fr.sgm`
  (`<seg id="N">...</seg>` inside `<doc docid="...">`); segments are paired by
  (docid, seg id). Text is taken verbatim between the tags, like sacrebleu
  (no entity unescaping), so BLEU against sacrebleu references agrees.
* TSV files `source<TAB>target` (columns swapped for `*.{tgt}-{src}.tsv`).

Corpora are mixed in proportion to their sizes (one epoch = each corpus once)
or, with `corpus_weights={'europarl': 1.0, 'commoncrawl': 0.5, ...}` (keys
are substrings of file names), sampled with those weights forever.

The paper: En-Fr 36M pairs, En-De 5M, shared 32k wordpieces, newstest2014
test, newstest2012+2013 dev; ~16k words per GPU per batch.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

import gin

from data_pipelines import mt
from data_pipelines import text_io
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

SGM_SUFFIX = ".sgm"
TSV_SUFFIX = ".tsv"
_DOC_RE = re.compile(r'<doc\b[^>]*\bdocid="([^"]*)"', re.IGNORECASE)
_SEG_RE = re.compile(
    r'<seg\b[^>]*\bid\s*=\s*"?([^"\s>]+)"?[^>]*>(.*?)</seg>', re.IGNORECASE
)
WMT_LAYOUT = (
    "line-aligned text pairs *.{src} / *.{tgt} (e.g. europarl-v7.fr-en.en +"
    " europarl-v7.fr-en.fr), SGML pairs *-src.{src}.sgm / *-ref.{tgt}.sgm, or"
    " TSV files source<TAB>target"
)
DEFAULT_VOCAB_SAMPLE_PAIRS = 1000000
# Default global token budget per step (paper: ~16k words per GPU).
BATCH_TOKENS = 16384


def _layout(source_lang: str, target_lang: str) -> str:
  return WMT_LAYOUT.replace("{src}", source_lang).replace("{tgt}", target_lang)


def parse_sgm(path: str) -> List[Tuple[Tuple[str, str], str]]:
  """Reads the segments of a WMT SGML file.

  Args:
    path: an .sgm file.

  Returns:
    List of ((docid, segid), text) in file order; text stripped.

  Raises:
    DataError: if the file has no segments or repeats a (docid, segid).
  """
  segments = []
  seen = set()
  docid = ""
  for line in text_io.read_text_lines(path):
    doc = _DOC_RE.search(line)
    if doc:
      docid = doc.group(1)
    for seg in _SEG_RE.finditer(line):
      key = (docid, seg.group(1))
      if key in seen:
        raise DataError(
            f"SGML file {path!r} repeats segment id {key[1]!r} in doc"
            f" {key[0]!r}"
        )
      seen.add(key)
      segments.append((key, seg.group(2).strip()))
  if not segments:
    raise DataError(
        f'SGML file {path!r} has no <seg id="N">...</seg> lines; expected a'
        " WMT newstest .sgm file"
    )
  return segments


def sgm_corpus(source_path: str, reference_path: str) -> mt.ParallelCorpus:
  """Pairs the segments of a source and a reference SGML file.

  Raises:
    DataError: if the two files do not have the same (docid, segid) set.
  """
  src = parse_sgm(source_path)
  ref = dict(parse_sgm(reference_path))
  if len(src) != len(ref) or any(key not in ref for key, _ in src):
    missing = next((key for key, _ in src if key not in ref), None)
    raise DataError(
        f"SGML files do not match: {source_path!r} has {len(src)} segments,"
        f" {reference_path!r} has {len(ref)}"
        + (f"; segment {missing} has no reference" if missing else "")
    )
  sources = [text for _, text in src]
  targets = [ref[key] for key, _ in src]
  return mt.ParallelCorpus(
      name=os.path.basename(source_path),
      kind=mt.KIND_MEMORY,
      paths=(source_path, reference_path),
      num_lines=len(sources),
      pairs=(sources, targets),
  )


def _strip_gz(path: str) -> Tuple[str, str]:
  return (path[:-3], ".gz") if path.endswith(".gz") else (path, "")


def _sgm_partner(
    path: str, source_lang: str, target_lang: str
) -> Tuple[str, str]:
  """(source, reference) paths for either member of an SGML pair."""
  src_tail = f"-src.{source_lang}{SGM_SUFFIX}"
  ref_tail = f"-ref.{target_lang}{SGM_SUFFIX}"
  if path.endswith(src_tail):
    return path, path[: -len(src_tail)] + ref_tail
  if path.endswith(ref_tail):
    return path[: -len(ref_tail)] + src_tail, path
  raise DataError(
      f"cannot tell the role of SGML file {path!r}; expected *{src_tail} or"
      f" *{ref_tail}"
  )


def discover_corpora(
    patterns,
    *,
    source_lang: str,
    target_lang: str,
    what: str,
) -> List[mt.ParallelCorpus]:
  """Finds the parallel corpora named by globs (text pairs, SGML, TSV).

  Args:
    patterns: glob(s) (TRAIN_FILES / EVAL_FILES).
    source_lang: e.g. 'en'.
    target_lang: e.g. 'fr'.
    what: description used in errors.

  Returns:
    Corpora in sorted file order.

  Raises:
    DataError: on no match, a missing partner file, unknown file kinds, or
      misaligned pairs.
  """
  layout = _layout(source_lang, target_lang)
  files = text_io.resolve_files(patterns, what=what, expected_layout=layout)
  corpora = []
  done = set()
  for path in files:
    if path in done:
      continue
    stem, gz = _strip_gz(path)
    if stem.endswith(TSV_SUFFIX):
      corpora.extend(
          mt.tsv_corpora(
              [path], source_lang=source_lang, target_lang=target_lang
          )
      )
      done.add(path)
      continue
    if stem.endswith(SGM_SUFFIX):
      src, ref = _sgm_partner(path, source_lang, target_lang)
      for p in (src, ref):
        if not os.path.exists(p):
          raise DataError(
              f"{what}: {path!r} needs its partner {p!r}, which does not exist"
          )
      corpora.append(sgm_corpus(src, ref))
      done.update((src, ref))
      continue
    base, ext = os.path.splitext(stem)
    lang = ext[1:]
    if lang not in (source_lang, target_lang):
      raise DataError(
          f"{what}: cannot tell the language of {path!r}; expected layout:"
          f" {layout}"
      )
    src = f"{base}.{source_lang}{gz}"
    tgt = f"{base}.{target_lang}{gz}"
    for p in (src, tgt):
      if not os.path.exists(p):
        raise DataError(
            f"{what}: {path!r} needs its partner {p!r}, which does not exist"
        )
    num_lines = text_io.check_parallel_files(src, tgt)
    corpora.append(
        mt.ParallelCorpus(
            name=os.path.basename(base),
            kind=mt.KIND_TEXT,
            paths=(src, tgt),
            num_lines=num_lines,
        )
    )
    done.update((src, tgt))
  return corpora


def files_mt_data(
    *,
    name: str,
    train_files,
    eval_files,
    source_lang: str,
    target_lang: str,
    corpus_weights: Optional[Dict[str, float]],
    vocab_file: Optional[str],
    create_vocab_if_missing: bool,
    vocab_size: int,
    expected_vocab_size: Optional[int],
    vocab_sample_pairs: Optional[int],
    learn_kwargs: Optional[Dict[str, object]],
    options: mt.MtBatching,
) -> mt.MtData:
  """MtData over parallel files (see module docstring for the file kinds)."""
  train = discover_corpora(
      train_files,
      source_lang=source_lang,
      target_lang=target_lang,
      what=f"{name} training files",
  )
  evals = []
  if eval_files:
    evals = discover_corpora(
        eval_files,
        source_lang=source_lang,
        target_lang=target_lang,
        what=f"{name} evaluation files",
    )
  vocab = mt.resolve_wordpiece_vocab(
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      texts=lambda: mt.sample_texts(train, vocab_sample_pairs),
      vocab_size=vocab_size,
      expected_size=expected_vocab_size,
      learn_kwargs=learn_kwargs,
  )
  return mt.make_mt_data(
      name=name,
      vocab=vocab,
      train_corpora=train,
      eval_corpora=evals,
      train_weights=mt.corpus_weights_for(train, corpus_weights),
      options=options,
  )


@gin.configurable
def wmt14_mt_data(
    train_files=gin.REQUIRED,
    eval_files=None,
    *,
    source_lang: str = "en",
    target_lang: str = "fr",
    corpus_weights: Optional[Dict[str, float]] = None,
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = False,
    vocab_size: int = wordpiece.DEFAULT_VOCAB_SIZE,
    expected_vocab_size: Optional[int] = None,
    vocab_sample_pairs: Optional[int] = DEFAULT_VOCAB_SAMPLE_PAIRS,
    learn_kwargs: Optional[Dict[str, object]] = None,
    name: str = "wmt14",
    batching: Optional[mt.MtBatching] = None,
    **legacy_batching,
) -> mt.MtData:
  """WMT'14 (or any parallel files) translation data.

  Args:
    train_files: glob(s) of training files (gin macro TRAIN_FILES).
    eval_files: glob(s) of evaluation files (gin macro EVAL_FILES), e.g.
      newstest2014-fren-src.en.sgm.
    source_lang: source language code (file suffix).
    target_lang: target language code.
    corpus_weights: {file-name substring: weight} or None (see module doc).
    vocab_file: shared wordpiece vocabulary to load (or create).
    create_vocab_if_missing: learn and save vocab_file if missing.
    vocab_size: wordpiece vocabulary size when learning (paper: 32k).
    expected_vocab_size: fail unless the loaded vocabulary has this size.
    vocab_sample_pairs: learn from the first N pairs (split across corpora);
      None uses everything (slow: the learner is pure Python).
    learn_kwargs: extra `WordpieceVocab.learn` arguments.
    name: label used in logs.
    batching: MtBatching; None takes the gin-bound `mt_batching` (default
      budget BATCH_TOKENS; paper: ~16k per GPU).
    **legacy_batching: MtBatching fields by name (older configs).

  Returns:
    MtData.
  """
  return files_mt_data(
      name=name,
      train_files=train_files,
      eval_files=eval_files,
      source_lang=source_lang,
      target_lang=target_lang,
      corpus_weights=corpus_weights,
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      vocab_size=vocab_size,
      expected_vocab_size=expected_vocab_size,
      vocab_sample_pairs=vocab_sample_pairs,
      learn_kwargs=learn_kwargs,
      options=mt.MtBatching.resolve(
          batching,
          legacy_batching,
          owner="wmt14_mt_data",
          batch_tokens=BATCH_TOKENS,
      ),
  )
