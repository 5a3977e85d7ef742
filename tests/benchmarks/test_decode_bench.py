"""benchmarks/decode.py --saved_model: the exported decoder decodes the same.

The benchmark raises unless the SavedModel round trip of each random-weight
decoder (greedy and beam 4) returns the in-process decoder's ids; the tiny
MoE config's single-step batches (2 sentences x k experts) take the layer's
small-batch path, so this pins that path's `tf.cond` through export. The
experts/token column (batchwise gating, n = 4, k = 2) must show the decoder
MoE routing about k experts per token while decoding: the ops the configs
are compared at.
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
  decode.main(
      [
          "--gin_files=" + os.path.join(REPO, "gin/mt/tiny/moe_flat.gin"),
          "--vocab_size=64",
          "--sentences=16",
          "--rounds=2",
          "--batch_size=2",
          "--source_length=5",
          "--target_length=6",
          "--saved_model",
      ]
  )
  rows = [
      [cell.strip() for cell in line.split("|")[1:-1]]
      for line in capsys.readouterr().out.splitlines()
      if line.startswith("|") and "moe_flat.gin" in line
  ]
  searches = [("SavedModel" in row[0], row[1]) for row in rows]
  assert searches == [
      (False, "greedy"),
      (True, "greedy"),
      (False, "beam 4"),
      (True, "beam 4"),
  ]
  for _, _, experts_per_token, sentences_per_s, *_ in rows:
    assert 1.0 <= float(experts_per_token) <= 3.0, experts_per_token
    assert float(sentences_per_s) > 0


def test_ratios_compare_like_with_like():
  """Each ratio divides by the dense row of the same search and form."""
  saved = decode.SAVED_MODEL_SUFFIX
  rows = [
      ("dense", "greedy", None, [600.0, 500.0]),
      ("dense" + saved, "greedy", None, [550.0, 450.0]),
      ("dense", "beam 4", None, [180.0, 160.0]),
      ("dense" + saved, "beam 4", None, [170.0, 150.0]),
      ("moe", "greedy", 4.0, [480.0, 400.0]),
      ("moe" + saved, "greedy", 4.0, [440.0, 360.0]),
      ("moe" + saved, "beam 4", 4.0, [136.0, 120.0]),
  ]
  assert decode.ratio_reference(rows, "moe", "greedy") == [600.0, 500.0]
  assert decode.ratio_reference(rows, "moe" + saved, "greedy") == [
      550.0,
      450.0,
  ]
  assert decode.ratio_reference(rows, "moe" + saved, "beam 4") == [
      170.0,
      150.0,
  ]
  assert decode.ratio_reference(rows, "dense" + saved, "greedy") == [
      550.0,
      450.0,
  ]
