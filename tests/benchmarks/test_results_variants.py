"""The results grids' named variants reach what they name."""

import os
import sys

import gin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras.models import lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras.optimizers import factory  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_summed_rows_variant_reaches_the_optimizer():
  config = os.path.join(REPO, "gin", "lm", "ptb", "moe_32.gin")
  try:
    for bindings, expected in (
        ((), False),
        (results_lib.VARIANTS["summed_rows"], True),
    ):
      gin.clear_config()
      experiment.parse_gin([config], list(bindings))
      assert factory.make_optimizer().sum_sparse_rows is expected
  finally:
    gin.clear_config()


def test_piece_squares_variant_taps_the_lm():
  config = os.path.join(REPO, "gin", "lm", "ptb", "moe_32.gin")
  try:
    for bindings, expected in (
        ((), False),
        (results_lib.VARIANTS["piece_squares"], True),
    ):
      gin.clear_config()
      experiment.parse_gin([config], list(bindings))
      model = lm.build_lm(vocab_size=10000)  # > num_sampled: sampled
      taps = sorted(w.path for w in model.weights if "piece_squares" in w.path)
      assert bool(taps) is expected
      if expected:
        assert taps == [
            "embedding/embeddings_piece_squares",
            "softmax/bias_piece_squares",
            "softmax/kernel_piece_squares",
        ]
  finally:
    gin.clear_config()
