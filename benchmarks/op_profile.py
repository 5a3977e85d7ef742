"""Where a TensorFlow step's time goes: op time by op type, from the profiler.

`op_times` runs a step under `tf.profiler` and sums the durations of the
executed ops by op type (`MatMul`, `InplaceUpdate`, ...), per step. The
profiler's trace (an XSpace proto) records every op kernel the executor runs
as an event named "<node name>:<op type>" on the line of the thread that ran
it ("tf_Compute/..." inter-op threads); the executor's own bookkeeping events
("ExecutorState::Process", "ThreadpoolListener::Record", ...) and memory
events carry other names and are not counted.

Op times are summed over threads: ops that ran at the same time on two cores
both count, so the total can exceed the step's wall time (by up to the number
of threads). They tell which ops a step spends its CPU time in, not its
critical path.
"""

import collections
import dataclasses
import glob
import os
import re
import tempfile
from typing import Callable, Dict

# "<node name>:<op type>", e.g. "sparse_mo_e/MatMul_1:_MklMatMul"; op types
# are identifiers, the executor's events ("ExecutorState::Process") are not.
OP_EVENT = re.compile(r"^[^:]+:(?P<op_type>[A-Za-z_][A-Za-z0-9_]*)$")
# Threads whose events are op kernels: TensorFlow's inter-op pool.
COMPUTE_LINE_PREFIX = "tf_Compute"


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One op type's share of a step.

  Attributes:
    ms: summed duration of its ops per step, milliseconds.
    count: ops executed per step.
  """

  ms: float
  count: float


def op_times_from_xspace(xspace_bytes: bytes, steps: int) -> Dict[str, OpTime]:
  """Op time by op type per step from a serialized XSpace trace.

  Args:
    xspace_bytes: the contents of a profiler `*.xplane.pb` file.
    steps: how many steps the trace holds (the sums are divided by it).

  Returns:
    {op type: OpTime}, op types of the events on `COMPUTE_LINE_PREFIX`
    lines whose names match `OP_EVENT`.

  Raises:
    ValueError: steps < 1.
  """
  # pylint: disable-next=g-import-not-at-top
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  if steps < 1:
    raise ValueError(f"steps={steps}: must be >= 1")
  space = xplane_pb2.XSpace()
  space.ParseFromString(xspace_bytes)
  durations_ps = collections.Counter()
  counts = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith(COMPUTE_LINE_PREFIX):
        continue
      for event in line.events:
        match = OP_EVENT.match(plane.event_metadata[event.metadata_id].name)
        if match is None:
          continue
        durations_ps[match["op_type"]] += event.duration_ps
        counts[match["op_type"]] += 1
  return {
      op_type: OpTime(
          ms=durations_ps[op_type] / 1e9 / steps, count=counts[op_type] / steps
      )
      for op_type in counts
  }


def op_times(run_step: Callable[[], object], steps: int) -> Dict[str, OpTime]:
  """Runs `run_step` `steps` times under the TF profiler; op time per step.

  Args:
    run_step: runs one step and blocks until its results exist (e.g. fetches
      an output); warm it up (trace, first allocations) before this call.
    steps: steps to profile, >= 1.

  Returns:
    {op type: OpTime} (`op_times_from_xspace`).

  Raises:
    ValueError: steps < 1.
    RuntimeError: the profiler wrote no trace.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if steps < 1:
    raise ValueError(f"steps={steps}: must be >= 1")
  with tempfile.TemporaryDirectory(prefix="op_profile_") as logdir:
    tf.profiler.experimental.start(logdir)
    try:
      for _ in range(steps):
        run_step()
    finally:
      tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"the TF profiler wrote no *.xplane.pb under {logdir}")
    with open(paths[0], "rb") as f:
      return op_times_from_xspace(f.read(), steps)
