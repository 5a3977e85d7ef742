"""Files written whole or not at all: a temporary sibling, then a rename.

Every file moe_keras writes for a later reader (checkpoints and their state,
the run's config and learning curve, evaluation results and plots, decoded
text, the results' summaries and plots) goes through `write_atomic`: a
reader, or a process that starts after an interruption, sees the previous
file or the new one, never half of one.
"""

import json
import os
from typing import Any, Callable


def write_atomic(path: str, write_fn: Callable[[str], Any]) -> None:
  """Calls write_fn(tmp), then renames tmp to `path`.

  The temporary file is `.tmp-<pid>-<name>` in `path`'s directory: on the
  same file system, so the rename is atomic, and it keeps `path`'s suffix,
  which writers such as Keras' `save_weights`, numpy's `savez` and
  matplotlib's `savefig` read to choose the format. It is removed when
  write_fn or the rename fails, and `path` is then left as it was.

  Args:
    path: the file to write; its directory must exist.
    write_fn: writes the whole content to the path it is given.
  """
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` with `write_atomic`."""

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  write_atomic(path, write)


def write_json(path: str, value: Any, **dump_kwargs) -> None:
  """Writes `value` as JSON and a final newline with `write_atomic`.

  Args:
    path: the file.
    value: a JSON-serializable value.
    **dump_kwargs: `json.dumps` options (indent, sort_keys).
  """
  write_text(path, json.dumps(value, **dump_kwargs) + "\n")
