"""A wordpiece vocabulary meets the requested size or says why not."""

import pytest

from data_pipelines import wordpiece
from data_pipelines.errors import DataError


def _many_characters_text():
  # 150 distinct letters (Greek, Cyrillic, Latin), each in a few words.
  letters = [chr(c) for c in range(0x3B1, 0x3C9)]
  letters += [chr(c) for c in range(0x430, 0x450)]
  letters += [chr(c) for c in range(0x100, 0x150)]
  letters += [chr(c) for c in range(ord("a"), ord("z") + 1)]
  words = [a + b + c for a, b, c in zip(letters, letters[1:], letters[2:])]
  return [" ".join(words[i : i + 7]) for i in range(len(words))] * 3


def test_many_characters_still_meet_the_size():
  texts = _many_characters_text()
  vocab = wordpiece.WordpieceVocab.learn(texts, vocab_size=200)
  assert len(vocab) <= 200


def test_unreachable_size_says_why():
  with pytest.raises(DataError, match=r"cannot learn a 6-token wordpiece"):
    wordpiece.WordpieceVocab.learn(["the cat sat"] * 20, vocab_size=6)
