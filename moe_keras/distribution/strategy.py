"""`make_distribution`: what the train CLI builds and fits a model under.

```python
dist = make_distribution("batch:2,expert:4")
with dist.scope():
  model = task.build_model()   # MoE layers shard their experts here
  model = dist.wrap_model(model)
  model.compile(...)
model.fit(dist.distribute_dataset(train_ds), ...)
dist.unwrap(model).save_weights(path)   # layout-independent checkpoint
```

TensorFlow, one host (`InGraphMesh`): one program over all devices of the
mesh. Dense layers and gates are data-parallel over all B*E devices (the
global batch is split B*E ways); each MoE layer's experts are split into E
blocks, block e existing once, on device (0, e); a replica of batch row b
sends its tokens for block e to device (b, e). Variables other than experts
live on device (0, 0) and their gradients are summed there.
TensorFlow, several hosts (TF_CONFIG with more than one worker): a
MultiWorkerMirroredStrategy with one replica per host; each host runs the
in-graph program over its local devices (the mesh's batch axis must be a
multiple of the number of workers; each host takes batch/workers rows).
TensorFlow, one client and TF servers on several hosts (`tf_servers`,
`tf_cluster`): the same in-graph program, over the servers' devices; the
mesh's expert axis spans the servers first, so with `batch:1,expert:W`
each expert block and its slots live on one server.
JAX: `keras.distribution.ModelParallel` over a DeviceMesh; the experts'
axis 0 is sharded on "expert" and the batch on "batch". Several JAX
processes (Keras's KERAS_DISTRIBUTION_* variables, `jax_cluster`) form one
mesh whose expert axis spans the processes first
(`mesh.process_spanning_order`): with `batch:1,expert:P` each expert block
lives on one process.

BUILD.md ("Distribution") explains the choices.
"""

import contextlib
import json
import os

from absl import logging
import keras

from moe_keras.distribution import jax_cluster
from moe_keras.distribution import mesh as mesh_lib
from moe_keras.distribution import optimizer as optimizer_lib
from moe_keras.distribution import sharded_experts
from moe_keras.distribution import tf_cluster
from moe_keras.models import task_model

# Expert variables sharded along their experts axis (axis 0) on JAX.
EXPERT_VARIABLE_PATTERNS = (
    "expert_kernel_1",
    "expert_kernel_2",
    "expert_bias_1",
    "expert_bias_2",
)


def _patch_keras_multi_worker_reduce():
  """Works around Keras 3 fit under MultiWorkerMirroredStrategy.

  Keras 3.15 reduces every per-step log value with
  `strategy.reduce("MEAN", v, axis=0)` on multi-worker strategies, which
  fails on scalars ("Invalid reduction dimension 0 for input with 0
  dimensions"; tensorflow/tensorflow#72388). This reduces scalars over the
  replicas (axis=None) and leaves everything else to Keras.
  """
  from keras.src.backend.tensorflow import trainer as tf_trainer  # pylint: disable=g-import-not-at-top

  original = tf_trainer.reduce_per_replica
  if getattr(original, "moe_keras_patched", False):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def reduce_per_replica(values, strategy, reduction):
    if reduction not in ("auto", "mean") or not (
        tf_trainer._collective_all_reduce_multi_worker(strategy)  # pylint: disable=protected-access
    ):
      return original(values, strategy, reduction)

    def reduce(v):
      local = strategy.experimental_local_results(v)[0]
      axis = None if local.shape.rank == 0 else 0
      return strategy.reduce("MEAN", v, axis=axis)

    return tf.nest.map_structure(reduce, values)

  reduce_per_replica.moe_keras_patched = True
  tf_trainer.reduce_per_replica = reduce_per_replica


def _tf_config_workers():
  """Number of workers in TF_CONFIG (1 without TF_CONFIG)."""
  raw = os.environ.get("TF_CONFIG")
  if not raw:
    return 1
  try:
    cluster = json.loads(raw).get("cluster", {})
  except ValueError as e:
    raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


@contextlib.contextmanager
def _variables_on(device):
  """Creates variables made outside any `tf.device` scope on `device`.

  Variables created under an explicit device scope (expert blocks, Adam
  slots by `colocate_slots`) keep it. Ops are not placed.

  Args:
    device: a device name.

  Yields:
    None.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top

  def creator(next_creator, **kwargs):
    if tf.executing_eagerly() and not context.context().device_name:
      with tf.device(device):
        return next_creator(**kwargs)
    return next_creator(**kwargs)

  with tf.variable_creator_scope(creator):
    yield


def _capture_on_their_devices(variables):
  """Captures each variable's handle into the graph being traced, on its device.

  `tf.gradients` sums a variable's gradients over its reads (one read per
  replica) in an op colocated with the variable's handle, the placeholder
  that captures the handle into the function graph. That placeholder takes
  the device scope it was captured in; captured outside any scope it has
  none, the colocation does not survive the function's conversion, and the
  sum ran on the function's default device: on TF servers the client
  (measured, `benchmarks/distribution.py --part=tf_network`: every dense
  gradient went from both servers to the client and the sum back to server
  0). Captured here first, under the variable's device, the sum runs
  there. Eager execution and variables already captured: no-op.

  Args:
    variables: tf.Variables (or anything with a `handle`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  graph = tf.compat.v1.get_default_graph()
  if tf.executing_eagerly() or not hasattr(graph, "capture"):
    return
  for variable in variables:
    handle = getattr(variable, "handle", None)
    if handle is None:
      continue
    with tf.device(variable.device):
      graph.capture(handle)


class MeshDataParallel(task_model.TaskLossMixin, keras.Model):
  """Runs `inner` once per mesh device on a slice of the batch (TF).

  Logs like the models it wraps: `loss` is the task loss, the MoE losses
  (summed over the replicas' calls) have their own names
  (`moe_keras.models.task_model`).

  Replica r = b*E + e (device (b, e)) gets the r-th of B*E near-equal slices
  of every input along axis 0; outputs are concatenated back in order, so
  losses and metrics see the global batch exactly as without the wrapper.
  Inner variables are shared: TF sums their gradients over the replicas.
  MoE balancing losses: the mean of the replicas' (balance_over="replica"),
  or those of the replicas' summed Importance/Load (balance_over="global",
  `sharded_experts.GlobalBalance`; under MultiWorkerMirroredStrategy the
  sums are all-reduced across the hosts too), equal to one device's on the
  global batch.
  Not serializable itself: save and load the inner model (save_weights and
  load_weights delegate to it), so checkpoints do not depend on the mesh.
  """

  def __init__(self, inner, mesh, step_device=None, **kwargs):
    """Wraps `inner` for `mesh`.

    Args:
      inner: the keras.Model each replica runs.
      mesh: the Mesh.
      step_device: the device the train/test step's unplaced ops (loss,
        metrics, optimizer) run on; with it, a graph train step takes its
        gradients from `tf.gradients`, colocated with their forward ops
        (`train_step`), and the batch is split and its size taken without
        a device, where the batch is (on TF servers the client). None:
        Keras's step, on the enclosing scope's device
        (one host: (0, 0), set by `Distribution.scope`). TF servers: device
        (0, 0), which that scope cannot set there because it would also
        move the client's tf.data ops to the server.
      **kwargs: keras.Model's.
    """
    super().__init__(name=kwargs.pop("name", f"{inner.name}_mesh"), **kwargs)
    self.inner = inner
    self.mesh = mesh
    self.step_device = step_device
    if inner.built:
      self.built = True

  def _on_step_device(self, step, data):
    if self.step_device is None:
      return step(data)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    with tf.device(self.step_device):
      return step(data)

  def train_step(self, data):
    """Keras's TF train_step; with a step device, gradients by `tf.gradients`.

    GradientTape gives the gradient ops it adds no device, so on TF servers
    replica r's backward pass and the sum of a variable's gradients over
    the replicas ran on the step device (measured with
    `benchmarks/distribution.py --part=tf_network`). In a graph,
    `tf.gradients` (TF2) colocates each gradient op with its forward op:
    replica r's backward runs on its device. A variable's gradient is
    summed over the replicas next to the variable's captured handle, which
    is captured first, on the variable's device
    (`_capture_on_their_devices`), so the sum runs there too.

    Args:
      data: the batch, (x, y, sample_weight) or a prefix of it.

    Returns:
      The metrics' results, as Keras's train_step.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if self.step_device is None or tf.executing_eagerly():
      return self._on_step_device(super().train_step, data)
    weights = self.trainable_weights
    _capture_on_their_devices([w.value for w in weights])
    with tf.device(self.step_device):
      x, y, y_pred, sample_weight, loss = self._forward_and_loss(
          data, training=True
      )
      if self.optimizer is not None:
        loss = self.optimizer.scale_loss(loss)
      gradients = tf.gradients(loss, [w.value for w in weights])
      self.optimizer.apply_gradients(zip(gradients, weights))
      return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

  def test_step(self, data):
    """Keras's TF test_step; with a step device, the batch size on the client.

    Args:
      data: the batch, (x, y, sample_weight) or a prefix of it.

    Returns:
      The metrics' results, as Keras's test_step.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if self.step_device is None or tf.executing_eagerly():
      return self._on_step_device(super().test_step, data)
    with tf.device(self.step_device):
      x, y, y_pred, sample_weight, _ = self._forward_and_loss(
          data, training=False
      )
      return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

  def _forward_and_loss(self, data, training):
    """The forward pass, the loss and its tracker, as Keras's TF steps.

    Args:
      data: the batch, (x, y, sample_weight) or a prefix of it.
      training: bool, the forward pass's mode.

    Returns:
      (x, y, y_pred, sample_weight, loss), loss the unscaled scalar.
    """
    from keras.src.losses import loss as loss_module  # pylint: disable=g-import-not-at-top

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = self(x, training=training)
    loss = self._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )
    self._loss_tracker.update_state(
        loss_module.unscale_loss_for_distribution(loss),
        sample_weight=self._logged_batch_size(x),
    )
    return x, y, y_pred, sample_weight, loss

  def _logged_batch_size(self, x):
    """The batch size that weights the logged means, computed where x is.

    Under the step device a Shape op of a batch whose size is not static
    (batches after the first shape: Keras retraces with a relaxed shape)
    would pull all of x from the client to the step device's server
    (measured: the whole x, 2 MB at T = 2048, with `--part=tf_network`).
    With a step device it runs unplaced, on the client, where x is.

    Args:
      x: the model's inputs.

    Returns:
      A scalar (int or int32 tensor), or None when x has no tensor.
    """
    if self.step_device is None:
      return super()._logged_batch_size(x)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    with tf.device(None):
      return super()._logged_batch_size(x)

  def call(self, inputs, training=None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    num = self.mesh.num_devices
    flat = tf.nest.flatten(inputs)
    # With a step device (TF servers) the batch is split where it is, on
    # the client, so each replica's slice goes straight to its server
    # rather than through the step device's server.
    where = (
        contextlib.nullcontext()
        if self.step_device is None
        else tf.device(None)
    )
    with where:
      batch = tf.shape(flat[0])[0]
      sizes = tf.stack([(batch + num - 1 - r) // num for r in range(num)])
      splits = [tf.split(t, sizes, num=num, axis=0) for t in flat]
    outputs = []
    with sharded_experts.global_balance_scope() as balance:
      for r in range(num):
        b, e = divmod(r, self.mesh.expert)
        shard = tf.nest.pack_sequence_as(inputs, [s[r] for s in splits])
        with tf.device(self.mesh.device(b, e)):
          with sharded_experts.replica_scope(b, num), balance.replica():
            outputs.append(self.inner(shard, training=training))
      # balance_over="global" layers: CV^2 of the replicas' summed
      # Importance/Load (all-reduced across hosts under MWMS), added once.
      with tf.device(self.mesh.device(0, 0)):
        balance.finish()
    return tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *outputs)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras 3.15's version, with the sample batch reduced per tensor.

    Keras reduces the whole (x, y) structure with one `strategy.reduce`,
    which MultiWorkerMirroredStrategy rejects ("Attempt to convert a value
    (PerReplica...)"); reducing each tensor works on every strategy.
    """
    if self._distribute_strategy is None or iterator is None:
      return super()._maybe_symbolic_build(iterator, data_batch)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    strategy = self.distribute_strategy
    for _, _, it in iterator:
      batch = next(it)
      data_batch = tf.nest.map_structure(
          lambda v: strategy.reduce("MEAN", v, axis=None)
          if isinstance(v, tf.distribute.DistributedValues)
          else v,
          batch,
      )
      break
    with strategy.scope():
      self._symbolic_build(data_batch=data_batch)

  def compile(self, optimizer="rmsprop", *args, **kwargs):
    """Model.compile; the optimizer keeps slots on their variable's device."""
    optimizer = optimizer_lib.colocate_slots(keras.optimizers.get(optimizer))
    super().compile(optimizer, *args, **kwargs)
    # The inner model's checkpoints then hold the optimizer state too, as
    # the checkpoints of the same model compiled without a mesh do.
    self.inner.optimizer = self.optimizer

  def save_weights(self, *args, **kwargs):
    """Saves the inner model's weights (same file as without the mesh)."""
    return self.inner.save_weights(*args, **kwargs)

  def load_weights(self, *args, **kwargs):
    return self.inner.load_weights(*args, **kwargs)


class Distribution:
  """What `make_distribution` returns (see the module docstring).

  Attributes:
    mesh: the Mesh (this host's devices).
    strategy: tf.distribute strategy or None.
    kind: "single" | "in_graph" | "multi_worker" | "tf_servers" | "jax".
  """

  def __init__(self, mesh, kind, strategy=None, keras_distribution=None):
    self.mesh = mesh
    self.kind = kind
    self.strategy = strategy
    self.keras_distribution = keras_distribution

  @contextlib.contextmanager
  def scope(self):
    """Build (and compile) the model inside this scope."""
    with contextlib.ExitStack() as stack:
      if self.strategy is not None:
        stack.enter_context(self.strategy.scope())
      if self.keras_distribution is not None:
        stack.enter_context(self.keras_distribution.scope())
      in_graph = self.kind in ("in_graph", "multi_worker")
      if (in_graph and self.mesh.num_devices > 1) or self.kind == "tf_servers":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        if self.kind == "tf_servers":
          # Variables on server (0, 0), but no default device for ops:
          # the client's input pipeline (tf.data) must stay on the client.
          stack.enter_context(_variables_on(self.mesh.device(0, 0)))
        else:
          stack.enter_context(tf.device(self.mesh.device(0, 0)))
        if self.mesh.expert > 1:
          stack.enter_context(
              sharded_experts.placement_scope(
                  sharded_experts.Placement(
                      self.mesh.expert_devices(0),
                      [
                          self.mesh.expert_devices(b)
                          for b in range(self.mesh.batch)
                      ],
                  )
              )
          )
      yield self

  def wrap_model(self, model):
    """The model to compile and fit (in-graph data parallelism on TF)."""
    if self.kind in ("multi_worker", "tf_servers") or (
        self.kind == "in_graph" and self.mesh.num_devices > 1
    ):
      step_device = None
      if self.kind == "tf_servers":
        step_device = self.mesh.device(0, 0)
      return MeshDataParallel(model, self.mesh, step_device=step_device)
    return model

  @staticmethod
  def unwrap(model):
    """The model whose weights form the (layout-independent) checkpoint."""
    return model.inner if isinstance(model, MeshDataParallel) else model

  def distribute_dataset(self, dataset):
    """The dataset to pass to fit (global batches in).

    Keras distributes datasets itself under a tf.distribute strategy;
    in-graph programs split the batch inside the model. On a JAX mesh with
    B > 1 every batch is padded with zero rows to a multiple of B (the
    pipelines' batches vary in size; zero rows are padding, weight 0), and
    with several processes each process keeps the rows its devices hold
    (`mesh.process_batch_rows`; all of them when only the expert axis
    spans the processes).

    Args:
      dataset: a tf.data.Dataset of global batches.

    Returns:
      The dataset this process feeds to fit.
    """
    if self.kind != "jax" or self.mesh.batch == 1:
      return dataset
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    multiple = self.mesh.batch
    index, count = mesh_lib.process_batch_rows(self.mesh)

    def pad_and_slice(*batch):
      size = tf.shape(tf.nest.flatten(batch)[0])[0]
      padded = (size + multiple - 1) // multiple * multiple
      part = padded // count

      def one(t):
        t = tf.convert_to_tensor(t)
        pads = [[0, padded - size]] + [[0, 0]] * (t.shape.rank - 1)
        return tf.pad(t, pads)[index * part : (index + 1) * part]

      out = tf.nest.map_structure(one, batch)
      return out[0] if len(out) == 1 else out

    return dataset.map(pad_and_slice)


def make_distribution(mesh_shape=None, backend=None, tf_servers=None):
  """The distribution for `mesh_shape` on this process's devices.

  Args:
    mesh_shape: "batch:B,expert:E" (or a dict); None takes the gin
      binding `configured_mesh_shape.mesh_shape` (default 1x1). With TF_CONFIG naming W > 1
      workers (TensorFlow), B must be a multiple of W and this host gets a
      "batch:B/W,expert:E" mesh of its own devices. On JAX with
      KERAS_DISTRIBUTION_* naming P > 1 processes (`jax_cluster`), B*E
      is the total over all processes, which join the cluster here.
    backend: "tensorflow" | "jax"; default the Keras backend.
    tf_servers: TensorFlow only: "host:port,host:port" of running TF
      servers (`moe_keras.tf_server`); this process connects to them as
      the client and B*E must be the number of servers times the devices
      of each. None: this process's devices (or TF_CONFIG's workers).

  Returns:
    Distribution.

  Raises:
    ValueError: malformed mesh_shape or a device count that does not match.
    jax_cluster.ClusterError (a ValueError): bad KERAS_DISTRIBUTION_*
      settings or a cluster that cannot be joined.
  """
  backend = backend or keras.backend.backend()
  if mesh_shape is None:
    mesh_shape = mesh_lib.configured_mesh_shape()
  shape = mesh_lib.parse_mesh_shape(mesh_shape)
  if tf_servers and backend != "tensorflow":
    raise ValueError(
        f"--tf_servers needs the TensorFlow backend, not {backend!r}"
    )
  if backend == "jax":
    # Before any JAX computation: the cluster's processes join first.
    jax_cluster.join_cluster_from_env()
    devices = mesh_lib.available_devices("jax")
    mesh = mesh_lib.Mesh(
        shape, devices=mesh_lib.process_spanning_order(devices, shape)
    )
    if mesh.num_devices == 1:
      return Distribution(mesh, "single")
    return Distribution(mesh, "jax", keras_distribution=jax_distribution(mesh))
  if backend != "tensorflow":
    raise ValueError(f"unsupported backend {backend!r} for distribution")
  if tf_servers:
    return _tf_servers_distribution(shape, tf_servers)
  workers = _tf_config_workers()
  if workers > 1:
    if shape["batch"] % workers:
      raise ValueError(
          f"mesh batch axis {shape['batch']} is not a multiple of the"
          f" {workers} workers in TF_CONFIG"
      )
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # One replica per host: the host's devices are used by the in-graph
    # program, not by MultiWorkerMirroredStrategy's per-GPU replicas.
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    local = dict(shape, batch=shape["batch"] // workers)
    if local["batch"] * local["expert"] > 1:
      resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
          resolver.cluster_spec(),
          task_type=resolver.task_type,
          task_id=resolver.task_id,
          rpc_layer=resolver.rpc_layer,
          num_accelerators={},
      )
    # Created before anything lists devices: the strategy configures the
    # runtime, which must not be initialized yet.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver
    )
    _patch_keras_multi_worker_reduce()
    # The cluster's devices are all visible now; the mesh is this host's.
    task = f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}/"
    local_devices = [
        d for d in mesh_lib.available_devices("tensorflow") if task in d
    ]
    mesh = mesh_lib.Mesh(local, devices=local_devices)
    return Distribution(mesh, "multi_worker", strategy=strategy)
  mesh_lib.split_cpu(shape["batch"] * shape["expert"])
  mesh = mesh_lib.Mesh(shape)
  kind = "single" if mesh.num_devices == 1 else "in_graph"
  logging.info("distribution: mesh %s (%s)", mesh.spec, kind)
  return Distribution(mesh, kind)


def _tf_servers_distribution(shape, tf_servers):
  """The in-graph mesh over the devices of TF servers (`tf_cluster`).

  The expert axis spans the servers first (`mesh.process_spanning_order`).
  With W servers x L devices (`tf_server --devices=L`) and
  `batch:L,expert:W`, device (b, e) is server e's device b: block e and
  its Adam slots on server e's device 0, and the rows b > 0 of column e
  on server e's other devices, reading block e from device 0 of the same
  server each step.

  Args:
    shape: the parsed mesh shape.
    tf_servers: the servers' addresses.

  Returns:
    Distribution of kind "tf_servers".

  Raises:
    ValueError: TF_CONFIG set too, bad addresses, or B*E not the servers'
      device count.
  """
  if os.environ.get("TF_CONFIG"):
    raise ValueError(
        "--tf_servers and TF_CONFIG exclude each other (TF_CONFIG runs"
        " MultiWorkerMirroredStrategy); unset TF_CONFIG for the client"
    )
  servers = tf_cluster.parse_servers(tf_servers)
  devices = tf_cluster.connect(servers)
  size = shape["batch"] * shape["expert"]
  per_server = len(devices) // len(servers)
  if size != len(devices):
    raise ValueError(
        f"mesh batch:{shape['batch']},expert:{shape['expert']} needs {size}"
        f" devices but the {len(servers)} TF servers have {len(devices)}"
        f" ({per_server} each)"
    )
  mesh = mesh_lib.Mesh(
      shape,
      devices=mesh_lib.process_spanning_order(
          devices, shape, process_of=tf_cluster.task_of
      ),
  )
  logging.info(
      "distribution: mesh %s over %d TF servers x %d devices (%s)",
      mesh.spec,
      len(servers),
      per_server,
      ",".join(servers),
  )
  return Distribution(mesh, "tf_servers")


def jax_distribution(mesh):
  """keras.distribution.ModelParallel for `mesh` (JAX).

  The experts' leading axis is sharded on "expert" (blocks of n/E experts,
  so hierarchical groups stay whole), and so is the groups axis of a
  hierarchical MoE's secondary gates [a, d, b] (each group's gate lives
  with its experts, the paper's placement); everything else (primary
  gates, dense layers) is replicated, and the batch is split on "batch".

  Args:
    mesh: Mesh with jax devices.

  Returns:
    keras.distribution.ModelParallel.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  device_mesh = keras.distribution.DeviceMesh(
      shape=(mesh.batch, mesh.expert),
      axis_names=("batch", "expert"),
      devices=np.asarray(mesh.devices).reshape(mesh.batch, mesh.expert),
  )
  layout_map = keras.distribution.LayoutMap(device_mesh)
  layout_map[r".*expert_kernel_[12]"] = ("expert", None, None)
  layout_map[r".*expert_bias_[12]"] = ("expert", None)
  layout_map[r".*w_(gate|noise)_secondary"] = ("expert", None, None)
  # `Distribution.distribute_dataset` gives each process its rows.
  return keras.distribution.ModelParallel(
      layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
  )
