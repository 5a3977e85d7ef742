"""Error type raised by the data pipelines for bad input.

Every problem with user-supplied data (missing files, misaligned parallel
corpora, missing or mismatched vocabularies, malformed corpus files) raises
`DataError` with a one-line message that names the offending path or value and
says what was expected, so that the cause is visible in a training log without
reading a traceback.
"""


class DataError(ValueError):
  """Bad or missing input data; the message is one line naming the cause."""
