"""Unused experts and the experts carrying 90% of the load.

`experts_for_load_share` is checked against a brute force over every subset
of experts; `collect_expert_stats` on a layer whose gate is set by hand to
send every token to experts 0 and 1, so the expected counts are known
without running the layer.
"""

import itertools

import keras
import numpy as np
import pytest

from eval import expert_stats
from moe_keras.layers import SparseMoE

D, N, K = 4, 8, 2


def _brute_force(counts, share):
  """Smallest subset of experts whose counts sum to >= share of the total."""
  total = sum(counts)
  for size in range(len(counts) + 1):
    for subset in itertools.combinations(counts, size):
      if sum(subset) >= share * total:
        return size
  raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("share", [0.5, 0.9, 1.0])
def test_load_share_matches_brute_force(seed, share):
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 5, size=8) * rng.integers(0, 3, size=8)
  if counts.sum() == 0:
    counts[0] = 1
  assert expert_stats.experts_for_load_share(counts, share) == _brute_force(
      counts.tolist(), share
  )


def test_load_share_hand_cases():
  # 90 of 100 tokens: exactly experts 2 and 1 (80 + 10).
  assert expert_stats.experts_for_load_share([0, 10, 80, 10]) == 2
  assert expert_stats.experts_for_load_share([5] * 10) == 9
  assert expert_stats.experts_for_load_share([0, 0, 0]) == 0


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_bad_share_is_a_one_line_error(share):
  with pytest.raises(ValueError, match="share must be in"):
    expert_stats.experts_for_load_share([1, 2], share)


def test_negative_counts_are_an_error():
  with pytest.raises(ValueError, match="non-negative"):
    expert_stats.experts_for_load_share([1, -2])


def test_collapsed_gate_is_counted():
  inputs = keras.Input((None, D))
  layer = SparseMoE(
      num_experts=N, k=K, expert_hidden_dim=8, gating="top_k", name="moe"
  )
  model = keras.Model(inputs, layer(inputs))
  # Positive inputs and a gate that scores experts 0 and 1 highest for
  # every token: the top 2 are always {0, 1}, experts 2-7 get nothing.
  w_gate = np.full((D, N), -1.0, np.float32)
  w_gate[:, 0] = 2.0
  w_gate[:, 1] = 1.0
  layer.w_gate.assign(w_gate)
  rng = np.random.default_rng(0)
  batches = [
      (rng.uniform(0.5, 1.5, (3, 5, D)).astype(np.float32),) for _ in range(2)
  ]
  stats = expert_stats.collect_expert_stats(model, batches)["moe"]
  tokens = 2 * 3 * 5
  assert stats["token_counts"] == [tokens, tokens] + [0] * (N - 2)
  assert stats["unused_experts"] == N - 2
  assert stats["experts_for_90pct_load"] == 2


def test_no_batches_counts_every_expert_unused():
  inputs = keras.Input((None, D))
  layer = SparseMoE(num_experts=N, k=K, expert_hidden_dim=8, name="moe")
  model = keras.Model(inputs, layer(inputs))
  stats = expert_stats.collect_expert_stats(model, [])["moe"]
  assert stats["unused_experts"] == N
  assert stats["experts_for_90pct_load"] == 0
