"""A device mesh with a batch axis and an expert axis (paper section 3).

`Mesh("batch:2,expert:4")` lays 8 devices out row-major as a [batch, expert]
grid: device (b, e) is `devices[b * expert + e]`. Its meaning (the same on
both backends, see BUILD.md "Distribution"):

  * batch axis: data parallelism. The global batch is split along it.
  * expert axis: model parallelism. The n experts of an MoE layer are split
    into `expert` contiguous blocks of n / expert experts (block sharding,
    so a hierarchical MoE's group of b experts, rows i*b .. i*b + b - 1,
    stays on one device). Block e lives on the devices of column e.

With `batch:1,expert:d` every expert exists once, on one of d devices, and
receives the tokens of every data-parallel replica: the paper's mixed
data/model parallelism.
"""

import math
import re

import gin
import keras
import numpy as np

AXES = ("batch", "expert")
_AXIS_RE = re.compile(r"^\s*([a-z_]+)\s*:\s*(\d+)\s*$")


def parse_mesh_shape(mesh_shape):
  """Parses `"batch:2,expert:4"` into {"batch": 2, "expert": 4}.

  Both axes are optional (a missing axis has size 1); order is free.

  Args:
    mesh_shape: str like "batch:2,expert:4", or a dict {axis: size}.

  Returns:
    dict {"batch": int >= 1, "expert": int >= 1}.

  Raises:
    ValueError: a malformed string, unknown or repeated axis, size < 1.
  """
  if isinstance(mesh_shape, dict):
    items = list(mesh_shape.items())
  else:
    if not isinstance(mesh_shape, str) or not mesh_shape.strip():
      raise ValueError(
          f"mesh_shape must be a string like 'batch:2,expert:4', got"
          f" {mesh_shape!r}"
      )
    items = []
    for part in mesh_shape.split(","):
      match = _AXIS_RE.match(part)
      if not match:
        raise ValueError(
            f"malformed mesh_shape {mesh_shape!r}: {part.strip()!r} is not"
            " 'axis:size' (expected e.g. 'batch:2,expert:4')"
        )
      items.append((match.group(1), int(match.group(2))))
  shape = {}
  for axis, size in items:
    if axis not in AXES:
      raise ValueError(
          f"unknown mesh axis {axis!r} in {mesh_shape!r}; expected"
          f" {' and '.join(AXES)}"
      )
    if axis in shape:
      raise ValueError(f"mesh axis {axis!r} repeated in {mesh_shape!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(
          f"mesh axis {axis!r} must have an int size >= 1, got {size!r}"
      )
    shape[axis] = size
  return {axis: shape.get(axis, 1) for axis in AXES}


def available_devices(backend=None):
  """Device names of the accelerators (else CPUs) of this process.

  TensorFlow: logical GPUs if any, else logical CPUs ("/device:CPU:3"),
  so `tf.config.set_logical_device_configuration` splits one CPU into
  several. JAX: `jax.devices()` (platform default).

  Args:
    backend: "tensorflow" or "jax"; default the Keras backend.

  Returns:
    list of device names (TF) or jax Device objects (JAX).
  """
  backend = backend or keras.backend.backend()
  if backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top

    return list(jax.devices())
  raise ValueError(f"unsupported backend {backend!r} for a device mesh")


def split_cpu(num_devices):
  """On a host without GPUs, splits the CPU into `num_devices` devices.

  So that `--mesh_shape=batch:2,expert:4` runs (slowly, for checks) on a
  CPU-only machine, and a TF server (`moe_keras.tf_server --devices=N`)
  offers N devices. Only possible before TensorFlow initializes; otherwise,
  or when devices are already configured, nothing changes and `Mesh`
  reports a device count that does not match.

  Args:
    num_devices: the number of logical CPU devices wanted.

  Returns:
    True when this call split the CPU into `num_devices` devices, else
    False (fewer than 2 asked, a GPU host, the CPU already configured, or
    TensorFlow already initialized).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if num_devices < 2 or tf.config.list_physical_devices("GPU"):
    return False
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    if tf.config.get_logical_device_configuration(cpu):
      return False
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
    )
  except RuntimeError:  # TensorFlow already initialized
    return False
  return True


def process_spanning_order(devices, mesh_shape, process_of=None):
  """Orders devices of several processes so that "expert" spans processes.

  Plain row-major order puts each process's devices in whole batch rows,
  so the experts would be copied on every process. Here the P processes
  form a [P_b, P_e] grid with P_e = gcd(E, P): the expert axis is split over
  P_e processes first (each holds E/P_e blocks, on its own devices), and
  the batch axis over the remaining P_b = P / P_e. With `batch:1,expert:P`
  every expert block lives on exactly one process. One process: unchanged.

  Several devices per process, e.g. `batch:2,expert:2` on 2 TF servers x
  2 devices (P_e = 2, P_b = 1): device (b, e) is process e's device b, so
  column e (block e on (0, e), and row 1's replica (1, e)) is on process
  e only. Row b > 0 reads block e's weights from (0, e) and sends its
  gradients back there each step, within process e; only the dense
  weights (on (0, 0)) and the token rows cross between processes.

  Args:
    devices: jax devices (with `process_index`) of all processes, or any
      devices with `process_of`.
    mesh_shape: "batch:B,expert:E" string or dict.
    process_of: device -> its process (host) index; default
      `device.process_index`. TF servers: `tf_cluster.task_of`.

  Returns:
    The B*E devices, row-major for `Mesh` (device (b, e) at b*E + e).

  Raises:
    ValueError: processes with different device counts, or B*E not the
      total.
  """
  shape = parse_mesh_shape(mesh_shape)
  batch, expert = shape["batch"], shape["expert"]
  if process_of is None:
    process_of = lambda device: device.process_index
  by_process = {}
  for device in devices:
    by_process.setdefault(process_of(device), []).append(device)
  num = len(by_process)
  if num == 1:
    return list(devices)
  counts = sorted({len(d) for d in by_process.values()})
  if len(counts) != 1:
    raise ValueError(
        f"the {num} processes have different device counts {counts}"
    )
  local = counts[0]
  if batch * expert != num * local:
    raise ValueError(
        f"mesh batch:{batch},expert:{expert} needs {batch * expert} devices"
        f" but the {num} processes have {num * local}"
    )
  # E/P_e divides the local count L (as E | P*L), so a process's L
  # devices are a [B/P_b, E/P_e] block of the mesh.
  p_e = math.gcd(expert, num)
  p_b = num // p_e
  grid = np.empty((num, local), dtype=object)
  for row, process in enumerate(sorted(by_process)):
    for col, device in enumerate(by_process[process]):
      grid[row, col] = device
  grid = grid.reshape(p_b, p_e, batch // p_b, expert // p_e)
  return list(grid.transpose(0, 2, 1, 3).reshape(-1))


def process_batch_rows(mesh):
  """(index, count): this process holds batch rows index/count of the mesh.

  The mesh's batch axis splits into `count` equal parts over the processes
  (1 with one process or when only the expert axis spans processes); this
  process's devices hold part `index`, so it feeds that part of every
  global batch.

  Args:
    mesh: a Mesh of jax devices ordered by `process_spanning_order`.

  Returns:
    (index, count).
  """
  import jax  # pylint: disable=g-import-not-at-top

  me = jax.process_index()
  rows = [
      b
      for b in range(mesh.batch)
      if any(d.process_index == me for d in mesh.expert_devices(b))
  ]
  return rows[0] // len(rows), mesh.batch // len(rows)


@gin.configurable
def configured_mesh_shape(mesh_shape="batch:1,expert:1"):
  """The mesh shape chosen in gin (`configured_mesh_shape.mesh_shape = ...`).

  Validation happens in `Mesh` (outside gin, so errors stay one line).
  """
  return mesh_shape


class Mesh:
  """A [batch, expert] grid of devices.

  Attributes:
    shape: {"batch": B, "expert": E}.
    devices: the B*E devices, row-major (device (b, e) at b*E + e).
  """

  def __init__(self, mesh_shape="batch:1,expert:1", devices=None):
    """Builds the mesh.

    Args:
      mesh_shape: "batch:B,expert:E" string or dict (see parse_mesh_shape).
      devices: None (all available devices of the Keras backend, see
        `available_devices`), or an explicit list of B*E devices.

    Raises:
      ValueError: malformed shape, or B*E != the number of devices (any
        number of devices is fine for a 1x1 mesh).
    """
    self.shape = parse_mesh_shape(mesh_shape)
    if devices is None:
      devices = available_devices()
    devices = list(devices)
    if self.num_devices == 1:
      devices = devices[:1]  # a 1x1 mesh runs on the first device anywhere
    if self.num_devices != len(devices):
      raise ValueError(
          f"mesh {self.spec} needs {self.num_devices} devices but"
          f" {len(devices)} are available"
      )
    self.devices = devices

  @property
  def batch(self):
    return self.shape["batch"]

  @property
  def expert(self):
    return self.shape["expert"]

  @property
  def num_devices(self):
    return self.batch * self.expert

  @property
  def spec(self):
    return ",".join(f"{axis}:{self.shape[axis]}" for axis in AXES)

  def device(self, b, e):
    """The device at batch index b, expert index e."""
    return self.devices[b * self.expert + e]

  def expert_devices(self, row=0):
    """The E devices holding the expert blocks for batch row `row`."""
    return [self.device(row, e) for e in range(self.expert)]

  def check_num_experts(self, num_experts, group_size=1, name="layer"):
    """Raises ValueError unless n experts split into E whole blocks.

    Args:
      num_experts: n.
      group_size: experts that must stay on one device (a hierarchical
        MoE's b experts per group).
      name: for the message.
    """
    groups = num_experts // group_size
    if num_experts % (group_size * self.expert):
      what = (
          f"num_experts={num_experts}"
          if group_size == 1
          else f"num_groups={groups}"
      )
      raise ValueError(
          f"{name}: {what} is not divisible by the mesh's expert axis"
          f" ({self.expert})"
      )

  def __repr__(self):
    return f"Mesh({self.spec!r}, devices={len(self.devices)})"
