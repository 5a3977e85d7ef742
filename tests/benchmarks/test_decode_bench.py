"""benchmarks/decode.py --saved_model: the exported decoder decodes the same.

The benchmark raises unless the SavedModel round trip of each random-weight
decoder (greedy and beam 4) returns the in-process decoder's ids; the tiny
MoE config's single-step batches (2 sentences x k experts) take the layer's
small-batch path, so this pins that path's `tf.cond` through export.
"""

import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

from benchmarks import decode  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_saved_model_rows_decode_the_same_ids(capsys):
  absl_level = logging.getLogger("absl").level
  try:
    _decode(capsys)
  finally:  # the benchmark's set-up raises absl's level; later tests log
    logging.getLogger("absl").setLevel(absl_level)


def _decode(capsys):
  decode.main([
      "--gin_files=" + os.path.join(REPO, "gin/mt/tiny/moe_flat.gin"),
      "--vocab_size=64",
      "--sentences=4",
      "--batch_size=2",
      "--source_length=5",
      "--target_length=6",
      "--saved_model",
  ])
  rows = [
      line for line in capsys.readouterr().out.splitlines()
      if "moe_flat.gin" in line
  ]
  searches = [(("SavedModel" in r), r.split("|")[2].strip()) for r in rows]
  assert searches == [
      (False, "greedy"), (True, "greedy"), (False, "beam 4"), (True, "beam 4")
  ]
  for row in rows:
    assert float(row.split("|")[3]) > 0  # sentences/s
