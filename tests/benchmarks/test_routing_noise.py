"""benchmarks/routing_noise.py's statistics against hand-derived values."""

import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from benchmarks import routing_noise  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_gate_decides_when_gaps_dwarf_the_noise():
  # 3 tokens, d = 3 one-hot inputs, n = 4 experts, k = 2; W_noise = -50
  # gives a noise std of softplus(-50) ~ 2e-22, i.e. none.
  x = np.eye(3)
  w_gate = np.array(
      [[5.0, 4.0, 0.0, 0.0], [0.0, 6.0, 3.0, 1.0], [2.0, 0.0, 0.0, 9.0]]
  )
  s = routing_noise.routing_noise_stats(
      x, w_gate, np.full((3, 4), -50.0), 2, 0.0, np.random.default_rng(0)
  )
  assert s["overlap"] == 1.0
  assert s["noise_std"] < 1e-20
  # k-th minus (k+1)-th clean logit per token: 4-0, 3-1, 2-0 -> median 2.
  assert s["gap"] == 2.0
  # clean top-2: {0,1}, {1,2}, {3,0}: expert 0 and 1 twice of 6 picks, n=4
  # -> max/mean = 2 / (6 / 4).
  assert math.isclose(s["load_clean"], 2 / 1.5)
  assert math.isclose(s["load_noisy"], 2 / 1.5)
  spreads = [np.std(row) for row in w_gate]
  assert math.isclose(s["logit_spread"], np.mean(spreads))


def test_noise_decides_at_the_papers_initialization():
  # W_g = W_noise = 0: equal clean logits, noise std softplus(0) + eps, the
  # noisy top-k a uniform random k-subset: expected overlap k/n = 0.25.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((20000, 5))
  s = routing_noise.routing_noise_stats(
      x, np.zeros((5, 8)), np.zeros((5, 8)), 2, 0.01, np.random.default_rng(2)
  )
  assert math.isclose(s["noise_std"], math.log(2.0) + 0.01, rel_tol=1e-9)
  # std of the mean of 20000 overlaps (each in {0, .5, 1}) is < 0.003.
  assert abs(s["overlap"] - 0.25) < 0.015
  assert s["gap"] == 0.0 and s["logit_spread"] == 0.0
  # Clean ties all go to experts 0 and 1: max/mean = n / k = 4.
  assert math.isclose(s["load_clean"], 4.0)
  assert s["load_noisy"] < 1.1
