"""Shared paths and helpers for the data_pipelines tests.

Imported by the test modules as `dp_testlib` (a unique name, so it cannot
collide with other test helpers); conftest.py puts this directory and the
repository root on sys.path.
"""

import dataclasses
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
LM1B_RELEASE = (
    FIXTURES / "lm1b" / "1-billion-word-language-modeling-benchmark-r13output"
)
LM1B_TRAIN_DIR = LM1B_RELEASE / "training-monolingual.tokenized.shuffled"
LM1B_HELDOUT_DIR = LM1B_RELEASE / "heldout-monolingual.tokenized.shuffled"
WMT_DIR = FIXTURES / "wmt14"
TSV_DIR = FIXTURES / "tsv"
DEBIAN_LISTS = FIXTURES / "debian" / "lists"
DEBIAN_HANDMADE_LISTS = FIXTURES / "debian_handmade" / "lists"
DEBIAN_DOCS_PKG = FIXTURES / "debian_docs_pkg"
DEBIAN_DOCS_CORPUS = FIXTURES / "debian_docs"
GIN_DIR = REPO_ROOT / "gin" / "data"


def pop_batching(options_cls, kwargs, **defaults):
  """Moves the `options_cls` fields out of `kwargs` into one options value.

  Args:
    options_cls: data_pipelines.lm.LmBatching or mt.MtBatching.
    kwargs: keyword arguments of a corpus call; its batching fields are
      removed.
    **defaults: field values used unless `kwargs` names them.

  Returns:
    An `options_cls`.
  """
  names = {field.name for field in dataclasses.fields(options_cls)}
  fields = dict(defaults)
  fields.update(
      {name: kwargs.pop(name) for name in list(kwargs) if name in names}
  )
  return options_cls(**fields)


def read_lines(path) -> list:
  """Lines of a UTF-8 file, without newlines (plain Python reference)."""
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()
