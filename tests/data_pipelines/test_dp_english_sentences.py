"""data_pipelines.english_sentences: sentences and PTB-style tokens."""

from data_pipelines import english_sentences


def test_tokenize_ptb_style():
  assert english_sentences.tokenize(
      "Don't use e.g. 3.5 GB, see https://example.org/x or mail a@b.org!"
  ) == [
      "do", "n't", "use", "e.g.", "N", "gb", ",", "see", "<url>", "or",
      "mail", "<email>", "!",
  ]  # fmt: skip
  assert english_sentences.tokenize(
      "It's the users' 2nd x86-64 os.path.join() call \u2014 \u201cfast\u201d"
      " --verbose..."
  ) == [
      "it", "'s", "the", "users", "'", "2nd", "x86-64", "os.path.join", "(",
      ")", "call", "--", '"', "fast", '"', "--verbose", "...",
  ]  # fmt: skip


def test_split_sentences():
  assert english_sentences.split_sentences(
      "It works, e.g. on Linux. See Fig. 3 for details! Does it? Yes."
      ' (J. R. R. Tolkien wrote it.) "Quoted." next one.'
  ) == [
      "It works, e.g. on Linux.",
      "See Fig. 3 for details!",
      "Does it?",
      "Yes.",
      "(J. R. R. Tolkien wrote it.)",
      '"Quoted." next one.',
  ]


def test_keep_sentence_drops_code_and_other_languages():
  assert english_sentences.keep_sentence(
      english_sentences.tokenize("The tool is fast.")
  )
  assert not english_sentences.keep_sentence(
      english_sentences.tokenize("x = 1; y = 2; z = [3, 4]")
  )
  assert not english_sentences.keep_sentence(
      english_sentences.tokenize("Das Werkzeug ist schnell.")
  )
  assert not english_sentences.keep_sentence(
      english_sentences.tokenize("Too short.")
  )
  assert not english_sentences.keep_sentence(
      ["the"] * (english_sentences.MAX_SENTENCE_TOKENS + 1)
  )
