"""Multilingual translation: several language pairs in one stream.

Following Johnson et al. (2016), which the paper's multilingual MoE model
builds on, the target language is signalled by a token `<2xx>` prepended to
the source (`<2fr> Hello world` -> `Bonjour le monde`). One shared wordpiece
vocabulary covers every language and reserves the `<2xx>` tokens right after
`[PAD] [UNK] [START] [END]`.

Files are given per direction as a dict (gin):

  TRAIN_FILES = {'en-fr': '/data/en-fr/train.en-fr.tsv',
                 'fr-en': '/data/en-fr/train.en-fr.tsv',
                 'en-de': '/data/wmt14/training/*.de-en.en'}

Each value is anything `data_pipelines.wmt14.discover_corpora` accepts (text
pairs by language suffix, SGML pairs, TSV whose columns are swapped when the
file is named `*.{tgt}-{src}.tsv`), so one corpus can serve both directions.

`pair_weights={'en-fr': 1.0, 'en-de': 0.5, ...}` gives per-direction sampling
probabilities (normalized; within a direction its corpora are sampled by
size); the stream is then infinite. `pair_weights=None` mixes all corpora by
size, one epoch reading each once.
"""

from typing import Dict, List, Optional, Tuple

import gin

from data_pipelines import mt
from data_pipelines import wmt14
from data_pipelines import wordpiece
from data_pipelines.errors import DataError

PairFiles = Dict[str, object]


def parse_direction(key: str) -> Tuple[str, str]:
  """'en-fr' -> ('en', 'fr').

  Raises:
    DataError: if the key is not 'xx-yy' with two different codes.
  """
  parts = key.split("-")
  if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
    raise DataError(
        f'language direction {key!r} must look like "en-fr" (source-target)'
    )
  for code in parts:
    if not wordpiece.LANGUAGE_TOKEN_REGEX.match(wordpiece.language_token(code)):
      raise DataError(f"language code {code!r} in {key!r} is not valid")
  return parts[0], parts[1]


def _corpora_per_direction(
    files: PairFiles, what: str
) -> List[Tuple[str, str, List[mt.ParallelCorpus]]]:
  if not isinstance(files, dict) or not files:
    raise DataError(
        f'{what} must be a dict like {{"en-fr": "/path/*.tsv"}} (one glob per'
        " translation direction)"
    )
  out = []
  for key in sorted(files):
    source_lang, target_lang = parse_direction(key)
    corpora = wmt14.discover_corpora(
        files[key],
        source_lang=source_lang,
        target_lang=target_lang,
        what=f"{what} for {key}",
    )
    for corpus in corpora:
      corpus.name = f"{key}:{corpus.name}"
    out.append((source_lang, target_lang, corpora))
  return out


def direction_weights(
    directions: List[Tuple[str, str, List[mt.ParallelCorpus]]],
    pair_weights: Optional[Dict[str, float]],
) -> Optional[List[float]]:
  """Per-corpus weights: each direction's weight split by corpus size.

  Args:
    directions: (source, target, corpora) per direction.
    pair_weights: {'xx-yy': weight} or None.

  Returns:
    None (mix by size) or one weight per corpus, directions in order.

  Raises:
    DataError: if a direction has no weight or a weight names no direction.
  """
  if pair_weights is None:
    return None
  keys = {f"{s}-{t}" for s, t, _ in directions}
  unknown = sorted(set(pair_weights) - keys)
  if unknown:
    raise DataError(
        f"pair_weights names directions {unknown} that have no files"
        f" (directions: {sorted(keys)})"
    )
  total = sum(float(w) for w in pair_weights.values())
  if total <= 0:
    raise DataError(f"pair_weights {pair_weights} must have a positive sum")
  weights = []
  for s, t, corpora in directions:
    key = f"{s}-{t}"
    if key not in pair_weights:
      raise DataError(f"direction {key!r} has files but no pair_weights entry")
    size = sum(max(c.num_lines, 1) for c in corpora)
    for corpus in corpora:
      weights.append(
          float(pair_weights[key]) / total * max(corpus.num_lines, 1) / size
      )
  return weights


@gin.configurable
def multilingual_mt_data(
    train_files=gin.REQUIRED,
    eval_files=None,
    *,
    pair_weights: Optional[Dict[str, float]] = None,
    vocab_file: Optional[str] = None,
    create_vocab_if_missing: bool = False,
    vocab_size: int = wordpiece.DEFAULT_VOCAB_SIZE,
    expected_vocab_size: Optional[int] = None,
    vocab_sample_pairs: Optional[int] = wmt14.DEFAULT_VOCAB_SAMPLE_PAIRS,
    learn_kwargs: Optional[Dict[str, object]] = None,
    name: str = "multilingual",
    batching: Optional[mt.MtBatching] = None,
    **legacy_batching,
) -> mt.MtData:
  """Multilingual translation data with `<2xx>` target-language tokens.

  Args:
    train_files: {'xx-yy': glob(s)} (gin macro TRAIN_FILES).
    eval_files: {'xx-yy': glob(s)} (EVAL_FILES) or None.
    pair_weights: {'xx-yy': weight} sampling weights, or None (by size).
    vocab_file: shared wordpiece vocabulary (must contain every <2xx>).
    create_vocab_if_missing: learn and save vocab_file if missing.
    vocab_size: wordpiece vocabulary size when learning.
    expected_vocab_size: fail unless the loaded vocabulary has this size.
    vocab_sample_pairs: learn from the first N pairs (split across corpora).
    learn_kwargs: extra `WordpieceVocab.learn` arguments.
    name: label used in logs.
    batching: MtBatching; None takes the gin-bound `mt_batching` (default
      budget wmt14.BATCH_TOKENS).
    **legacy_batching: MtBatching fields by name (older configs).

  Returns:
    MtData with language_tokens set; `eval_pairs()` gives the target
    language of each pair and `encode_sources(texts, 'fr')` adds `<2fr>`.
  """
  options = mt.MtBatching.resolve(
      batching,
      legacy_batching,
      owner="multilingual_mt_data",
      batch_tokens=wmt14.BATCH_TOKENS,
  )
  train = _corpora_per_direction(train_files, f"{name} training files")
  evals = (
      _corpora_per_direction(eval_files, f"{name} evaluation files")
      if eval_files
      else []
  )
  targets = sorted({t for _, t, _ in train} | {t for _, t, _ in evals})
  language_tokens = [wordpiece.language_token(t) for t in targets]
  lang_index = {t: i for i, t in enumerate(targets)}
  train_corpora = [c for _, _, cs in train for c in cs]
  train_langs = [lang_index[t] for _, t, cs in train for _ in cs]
  eval_corpora = [c for _, _, cs in evals for c in cs]
  eval_langs = [lang_index[t] for _, t, cs in evals for _ in cs]
  vocab = mt.resolve_wordpiece_vocab(
      vocab_file=vocab_file,
      create_vocab_if_missing=create_vocab_if_missing,
      texts=lambda: mt.sample_texts(train_corpora, vocab_sample_pairs),
      vocab_size=vocab_size,
      extra_reserved_tokens=language_tokens,
      expected_size=expected_vocab_size,
      learn_kwargs=learn_kwargs,
  )
  return mt.make_mt_data(
      name=name,
      vocab=vocab,
      train_corpora=train_corpora,
      eval_corpora=eval_corpora,
      train_weights=direction_weights(train, pair_weights),
      train_language_ids=train_langs,
      eval_language_ids=eval_langs,
      language_tokens=language_tokens,
      eval_languages=[targets[i] for i in eval_langs],
      options=options,
  )
