"""benchmarks/distribution.py --part=memory against independent byte counts.

The measurement itself (real JAX processes on 127.0.0.1, W = 1 and 2, tiny
sizes) takes 1.5 to 3 minutes on a shared 2-core box and runs with
MOE_KERAS_SLOW_TESTS=1; the checks of its pieces run always.
"""

import argparse
import os
import sys

import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import distribution  # pylint: disable=g-import-not-at-top,wrong-import-position

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"

FLOAT32_BYTES = 4
ADAM_SLOTS = 2  # momentum and velocity per variable
INT32_BYTES = 4


def _expert_bytes(n, d, h):
  # Each expert: [d, h] kernel, [h] bias, [h, d] kernel, [d] bias.
  return n * (d * h + h + h * d + d) * FLOAT32_BYTES


def _other_bytes(n, d):
  # Dense(d) in, the gate's W_g and W_noise [d, n], Dense(d) out.
  return (2 * (d * d + d) + 2 * d * n) * FLOAT32_BYTES


@pytest.mark.skipif(not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1")
def test_measured_bytes_per_worker_match_the_count():
  n, d, h = 8, 16, 32
  args = argparse.Namespace(
      memory_workers="1,2",
      memory_experts=n,
      memory_dim=d,
      memory_hidden=h,
      memory_tokens=32,
      memory_budget_mb=0.08,  # between 1 and 2 workers' variable bytes
      k=2,
  )
  rows = distribution.memory_part(args)
  assert sorted(rows) == [1, 2]
  losses = set()
  for workers, processes in rows.items():
    assert [r["process"] for r in processes] == list(range(workers))
    for r in processes:
      expert = _expert_bytes(n // workers, d, h)
      assert r["expert_param"] == expert, (workers, r)
      assert r["expert_optimizer"] == ADAM_SLOTS * expert, (workers, r)
      # Dense layers and gates are replicated: every process holds them.
      other = _other_bytes(n, d)
      assert r["other_param"] == other, (workers, r)
      # Adam's slots, its int32 iteration count and float32 learning rate.
      assert r["other_optimizer"] == (
          ADAM_SLOTS * other + INT32_BYTES + FLOAT32_BYTES
      ), (workers, r)
      assert r["peak_rss_mb"] > 0
      losses.add(round(r["loss"], 5))
  # One step of the same model and batch: the same loss on every mesh.
  assert len(losses) == 1, losses


def _row(workers, process, expert):
  return {
      "workers": workers,
      "process": process,
      "expert_param": expert,
      "expert_optimizer": 2 * expert,
  }


def test_check_memory_scaling():
  good = {1: [_row(1, 0, 400)], 2: [_row(2, 0, 200), _row(2, 1, 200)]}
  distribution.check_memory_scaling(good)
  bad = {1: [_row(1, 0, 400)], 2: [_row(2, 0, 400), _row(2, 1, 0)]}
  with pytest.raises(ValueError, match="do not fall as 1/W: process 0 of W=2"):
    distribution.check_memory_scaling(bad)
  # Every process holding all experts: the total differs from W=1's.
  bad = {1: [_row(1, 0, 400)], 2: [_row(2, 0, 400), _row(2, 1, 400)]}
  with pytest.raises(ValueError, match="do not fall as 1/W"):
    distribution.check_memory_scaling(bad)


def test_is_expert_variable():
  for path in (
      "sparse_mo_e/expert_kernel_1",
      "sparse_mo_e/expert_bias_2",
      "adam/sparse_mo_e_expert_kernel_1_momentum",
      "adam/sparse_mo_e_expert_bias_1_velocity",
  ):
    assert distribution.is_expert_variable(path), path
  for path in (
      "sparse_mo_e/w_gate",
      "adam/sparse_mo_e_w_noise_velocity",
      "dense/kernel",
      "adam/iteration",
  ):
    assert not distribution.is_expert_variable(path), path


@pytest.mark.parametrize("workers", ["0", "abc", "1,-2", ""])
def test_bad_memory_workers_is_one_line(workers):
  args = argparse.Namespace(memory_workers=workers)
  with pytest.raises(
      ValueError, match=r"^--memory_workers must be integers >= 1, got "
  ):
    distribution.memory_part(args)
