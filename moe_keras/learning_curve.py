"""DIR/curve.jsonl: a run's learning curve, one JSON record per checkpoint.

`moe_keras.experiment.train` appends a record at the end of every checkpoint
period (before the checkpoint is written):

  {"step": 400,                 optimizer steps taken
   "tokens": 1638400.0,         training target tokens seen (non-padding)
   "train_seconds": 61.2,       wall clock spent in training steps, summed
                                over every process that trained the run
                                (validation and checkpoint writing excluded)
   "loss": 5.12, ...            the period's Keras training logs
   "val_perplexity": 210.3}     and the validation logs when it validated

A resumed run first drops the records past the step it restored, so the file
always describes one uninterrupted history. Every rewrite is atomic.
"""

import json
import math
import os
from typing import Dict, List

from moe_keras import atomic_file

CURVE_FILE = "curve.jsonl"


def curve_path(model_dir: str) -> str:
  return os.path.join(model_dir, CURVE_FILE)


def read_curve(model_dir: str) -> List[Dict[str, float]]:
  """The records of DIR/curve.jsonl in step order ([] when there is none).

  Args:
    model_dir: the run directory.

  Returns:
    list of dicts, one per step (the last record wins for a repeated step).

  Raises:
    ValueError: a line that is not a JSON object with an int "step".
  """
  path = curve_path(model_dir)
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record["step"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{number}: not a curve record ({e})") from e
      by_step[step] = record
  return [by_step[s] for s in sorted(by_step)]


def _write_records(path, records):
  atomic_file.write_text(
      path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
  )


def truncate_curve(model_dir: str, step: int) -> Dict[str, float]:
  """Drops the records after `step`; returns the record at `step` or {}.

  Args:
    model_dir: the run directory.
    step: the step a run resumes from.

  Returns:
    The last kept record ({} when none is kept), whose "tokens" and
    "train_seconds" the resumed run continues from.
  """
  records = read_curve(model_dir)
  kept = [r for r in records if int(r["step"]) <= step]
  if len(kept) != len(records):
    _write_records(curve_path(model_dir), kept)
  return kept[-1] if kept else {}


def append_record(model_dir: str, record: Dict[str, float]) -> None:
  """Appends one record (atomically: the file is rewritten whole)."""
  clean = {}
  for key, value in record.items():
    value = float(value) if key != "step" else int(value)
    clean[key] = value if math.isfinite(value) else None
  records = [r for r in read_curve(model_dir) if r["step"] != clean["step"]]
  _write_records(curve_path(model_dir), records + [clean])
