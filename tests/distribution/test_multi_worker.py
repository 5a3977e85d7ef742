"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 vs one process.

The default case covers both levels: each worker runs a 2x2 in-graph mesh
(experts in 2 blocks) and MWMS all-reduces across the workers. The plain
data-parallel case (one device per worker) runs with
MOE_KERAS_SLOW_TESTS=1 (about a minute per case on a shared 2-core box).
"""

import os

import pytest

import dist_testlib

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"


@pytest.mark.parametrize(
    "mesh_shape",
    [
        "batch:4,expert:2",
        pytest.param(
            "batch:2,expert:1",
            marks=pytest.mark.skipif(
                not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1"
            ),
        ),
    ],
)
def test_two_workers_match_one_process(mesh_shape):
  out = dist_testlib.run_scenario(
      "multi_worker", args=(mesh_shape,), timeout=300
  )
  assert out.count("losses") == 2 and out.count("final outputs") == 2
