"""benchmarks/op_profile.py: op times from hand-built traces and a real one."""

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import op_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


def _xspace(lines):
  """A serialized XSpace of one plane; lines: {line name: [(name, ps)]}."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  ids = {}
  for line_id, (line_name, events) in enumerate(lines.items()):
    line = plane.lines.add(id=line_id, name=line_name)
    for offset, (name, duration_ps) in enumerate(events):
      if name not in ids:
        ids[name] = len(ids) + 1
        plane.event_metadata[ids[name]].id = ids[name]
        plane.event_metadata[ids[name]].name = name
      line.events.add(
          metadata_id=ids[name], offset_ps=offset, duration_ps=duration_ps
      )
  return space.SerializeToString()


def test_op_times_sum_op_events_of_compute_threads_per_step():
  trace = _xspace(
      {
          "tf_Compute/1": [
              ("dense/MatMul:MatMul", 2_000_000_000),  # 2 ms
              ("ExecutorState::Process", 9_000_000_000),  # the executor's
              ("moe/Relu:Relu", 500_000_000),
              ("MemoryAllocation", 7_000_000_000),
          ],
          "tf_Compute/2": [("moe/MatMul_1:_MklMatMul", 1_000_000_000)],
          "python": [
              ("dense/MatMul:MatMul", 4_000_000_000)
          ],  # not a compute line
      }
  )
  times = op_profile.op_times_from_xspace(trace, steps=2)
  assert times == {
      "MatMul": op_profile.OpTime(ms=1.0, count=0.5),
      "_MklMatMul": op_profile.OpTime(ms=0.5, count=0.5),
      "Relu": op_profile.OpTime(ms=0.25, count=0.5),
  }


def test_zero_steps_is_an_error():
  with pytest.raises(ValueError, match="steps=0: must be >= 1"):
    op_profile.op_times_from_xspace(_xspace({}), steps=0)
  with pytest.raises(ValueError, match="steps=0: must be >= 1"):
    op_profile.op_times(lambda: None, steps=0)


def test_op_times_of_a_real_step_count_its_matmuls():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal((256, 128)), dtype=tf.float32)
  kernels = [
      tf.constant(rng.standard_normal((128, 128)), dtype=tf.float32)
      for _ in range(3)
  ]

  @tf.function
  def step(x):
    for kernel in kernels:
      x = tf.matmul(x, kernel)
    return tf.reduce_sum(x)

  step(x).numpy()  # trace and warm up
  times = op_profile.op_times(lambda: step(x).numpy(), steps=3)
  matmuls = [t for name, t in times.items() if "MatMul" in name]
  # Three MatMuls per step, whatever kernel (oneDNN or Eigen) ran them.
  assert sum(t.count for t in matmuls) == 3.0, times
  assert all(t.ms > 0.0 for t in matmuls), times
  assert times["Sum"].count == 1.0, times
