"""English sentences of prose paragraphs, tokenized PTB-style.

`split_sentences` ends a sentence after `.`, `!`, `?` followed by a capital,
a digit or an opening quote; not after `e.g.`, `i.e.`, `etc.`, initials, ...
(`ABBREVIATIONS`). `tokenize` is PTB-style: lowercased, punctuation split
into its own tokens, clitics split (`don't` -> `do n't`), numbers -> `N`,
URLs -> `<url>`, e-mail addresses -> `<email>`; words joined by `.`, `-`,
`_` or `'` stay one token (`os.path`, `x86-64`), and so do command-line
options (`--input`) and `c++`. `keep_sentence` keeps a sentence of
`MIN_SENTENCE_TOKENS` to `MAX_SENTENCE_TOKENS` tokens (so it fits
`max_length=128` with `</S>`), at least `MIN_WORD_FRACTION` of them
alphabetic words, containing an English function word (`ENGLISH_MARKERS`),
which drops code, option tables, and other languages.

Used by `data_pipelines.debian_docs` on the paragraphs of `doc_markup`.
"""

import re
from typing import List, Sequence
import unicodedata

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

ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf mr mrs ms dr prof fig figs no nos sec ch approx eq"
    " st jr sr inc ltd co al resp ca viz esp vol pp op cit ex incl".split()
)
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
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
  """Sentences of one paragraph (module docstring).

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
  """PTB-style tokens of one sentence (module docstring).

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
    if (
        token == "."
        and tokens
        and tokens[-1].endswith(".")
        and (tokens[-1][:-1] in ABBREVIATIONS)
        and match.start() > 0
        and text[match.start() - 1] != " "
    ):
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
