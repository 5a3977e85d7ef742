"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 vs one process."""

import pytest

import dist_testlib


@pytest.mark.parametrize(
    "mesh_shape",
    [
        "batch:2,expert:1",  # one device per worker
        "batch:4,expert:2",  # per worker: 2x2 in-graph mesh, experts split
    ],
)
def test_two_workers_match_one_process(mesh_shape):
  out = dist_testlib.run_scenario(
      "multi_worker", args=(mesh_shape,), timeout=300
  )
  assert out.count("losses") == 2 and out.count("final outputs") == 2
