"""BLEU for the translation models: sacreBLEU and the paper's tokenized BLEU.

Two scores of one set of detokenized hypotheses against raw references:

* `sacre_bleu`: sacreBLEU's default corpus BLEU (13a tokenization inside
  sacreBLEU, mixed case, exponential smoothing), with its signature string,
  e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`. This is
  the comparable, reproducible number.
* `tokenized_bleu`: the paper's metric, "tokenized BLEU from Moses
  multi-bleu.pl" (section 7 of PAPER.md), computed as follows. Both sides are
  tokenized with sacreBLEU's 13a tokenizer (mteval-v13a rules: punctuation
  split off, `&quot;`-style entities unescaped; the Moses tokenizer.perl used
  by the paper is not installed here, so French clitics like "l'homme" stay
  one token); the token strings are joined by single spaces; then corpus BLEU
  is computed on whitespace tokens with `tokenize='none'` and
  `smooth_method='none'`, case-sensitive. That is multi-bleu.pl's arithmetic:
  clipped n-gram counts summed over the corpus, n = 1..4, geometric mean,
  brevity penalty exp(1 - r/c) when c < r, and 0 when any n-gram precision is
  0 (multi-bleu.pl takes log(0) as -9999999999).

Both raise `ValueError` with one line when the reference count differs from
the hypothesis count. `python -m eval.bleu --hypotheses=F --references=R`
prints both scores.
"""

import dataclasses
import json
import sys
from typing import List, Sequence

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

TOKENIZED_BLEU_TOKENIZER = "13a"


@dataclasses.dataclass
class BleuResult:
  """A corpus BLEU score.

  Attributes:
    score: BLEU in [0, 100].
    signature: sacreBLEU signature (for tokenized BLEU, it names the
      pre-tokenization, e.g. 'pretok:13a|nrefs:1|case:mixed|eff:no|tok:none|
      smooth:none|version:2.6.0').
    precisions: the four n-gram precisions in percent.
    brevity_penalty: BP.
    hyp_len, ref_len: corpus lengths in tokens.
  """

  score: float
  signature: str
  precisions: List[float]
  brevity_penalty: float
  hyp_len: int
  ref_len: int

  def as_dict(self):
    return dataclasses.asdict(self)


def check_counts(hypotheses: Sequence[str], references: Sequence[str]) -> None:
  """Raises ValueError (one line) unless there is one reference per line."""
  if len(hypotheses) != len(references):
    raise ValueError(
        f"reference has {len(references)} lines but there are"
        f" {len(hypotheses)} hypotheses; BLEU needs one reference per line"
    )
  if not hypotheses:
    raise ValueError("no hypotheses to score (empty input)")


def _result(score, signature: str) -> BleuResult:
  return BleuResult(
      score=float(score.score),
      signature=signature,
      precisions=[float(p) for p in score.precisions],
      brevity_penalty=float(score.bp),
      hyp_len=int(score.sys_len),
      ref_len=int(score.ref_len),
  )


def sacre_bleu(
    hypotheses: Sequence[str], references: Sequence[str]
) -> BleuResult:
  """sacreBLEU (default settings) of detokenized output vs raw references.

  Args:
    hypotheses: detokenized translations, one per segment.
    references: raw reference segments, aligned.

  Returns:
    BleuResult with sacreBLEU's signature.

  Raises:
    ValueError: different numbers of hypotheses and references, or none.
  """
  check_counts(hypotheses, references)
  metric = BLEU()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return _result(score, str(metric.get_signature()))


def tokenize_13a(lines: Sequence[str]) -> List[str]:
  """sacreBLEU's 13a tokenization of each line (tokens joined by spaces)."""
  tokenizer = Tokenizer13a()
  return [tokenizer(line.rstrip("\n")) for line in lines]


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str]
) -> BleuResult:
  """The paper's tokenized BLEU (multi-bleu.pl style; module docstring).

  Args:
    hypotheses: detokenized translations.
    references: raw references, aligned.

  Returns:
    BleuResult; the signature is sacreBLEU's for tok:none / smooth:none,
    prefixed with 'pretok:13a|'.

  Raises:
    ValueError: different numbers of hypotheses and references, or none.
  """
  check_counts(hypotheses, references)
  metric = BLEU(tokenize="none", smooth_method="none", force=True)
  score = metric.corpus_score(
      tokenize_13a(hypotheses), [tokenize_13a(references)]
  )
  signature = f"pretok:{TOKENIZED_BLEU_TOKENIZER}|{metric.get_signature()}"
  return _result(score, signature)


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """Both scores: {'sacrebleu': {...}, 'tokenized_bleu': {...}} (JSON-ready)."""
  return {
      "sacrebleu": sacre_bleu(hypotheses, references).as_dict(),
      "tokenized_bleu": tokenized_bleu(hypotheses, references).as_dict(),
  }


def read_lines(path: str) -> List[str]:
  """Lines of a UTF-8 file without newlines; invalid bytes become U+FFFD."""
  with open(path, "rb") as f:
    data = f.read()
  return data.decode("utf-8", errors="replace").splitlines()


def main(argv=None) -> int:
  """CLI: python -m eval.bleu --hypotheses=F --references=R."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hypotheses", required=True)
  parser.add_argument("--references", required=True)
  args = parser.parse_args(argv)
  try:
    scores = bleu_scores(
        read_lines(args.hypotheses), read_lines(args.references)
    )
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(scores, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
