"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 vs one process.

The default case trains the tiny MoE LM of gin/lm/tiny/moe_flat.gin
(made deterministic: no dropout, exact softmax, top-k gating without
noise, so no load loss; the importance loss with
moe_spec.balance_over='global') for 3 Adam steps on a global batch of 8
sequences. Each worker runs a 2x2 in-graph mesh (experts in 2 blocks)
and MWMS all-reduces across the workers: the gradients, and the Importance
sums of the global balancing loss. Losses must match the one-process run
within 1e-5 (float32 summation order), the final outputs too (without the
cross-host sum of Importance the outputs differ by 9e-3: measured). The
Dense -> MoE -> Dense model cases run with MOE_KERAS_SLOW_TESTS=1 (one to
three minutes each on a shared 2-core box); "tiny_global" has noisy top-k
gating (zero noise), both balancing losses with balance_over='global', and
compares the workers' total loss (without the cross-host sum: 9e-3 off).
"""

import os

import pytest

import dist_testlib

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"
_slow = pytest.mark.skipif(not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1")


@pytest.mark.parametrize(
    "mesh_shape,kind",
    [
        ("batch:4,expert:2", "lm"),
        pytest.param("batch:4,expert:2", "tiny", marks=_slow),
        pytest.param("batch:2,expert:1", "tiny", marks=_slow),
        pytest.param("batch:4,expert:2", "tiny_global", marks=_slow),
    ],
)
def test_two_workers_match_one_process(mesh_shape, kind):
  out = dist_testlib.run_scenario(
      "multi_worker", args=(mesh_shape, kind), timeout=300
  )
  assert out.count("ok worker") == 4, out
  assert out.count(f"{kind} losses") == 2 and out.count("final outputs") == 2
