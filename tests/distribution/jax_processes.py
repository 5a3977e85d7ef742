"""Two JAX processes on 127.0.0.1 against one process (real processes).

`python jax_processes.py compare MESH KINDS` starts 2 processes that join
one JAX cluster (KERAS_DISTRIBUTION_* on a free loopback port, gloo CPU
collectives, `LOCAL_DEVICES` host devices each) and train on the global
mesh MESH, while this process trains the same models on one device (the
reference). For each kind (comma-separated):

  lm    the tiny flat MoE LM of gin/lm/tiny/moe_flat.gin made deterministic
        (`scenarios.LM_BINDINGS`: no dropout, exact softmax, top-k gating
        without noise), 3 Adam steps on a global batch of 8 sequences;
  hier  Dense -> hierarchical MoE (4 groups of 2, capacity 4, both
        balancing losses over the global batch, gating noise set to zero
        in every process) -> Dense, 2 Adam steps on 16 examples.

Every process feeds the global batch through `Distribution.
distribute_dataset` (with `batch:1` it keeps all rows). Checked: each
process's losses and final outputs equal the one-process run's within
`scenarios.TOL`, and each process's addressable shards of the expert
kernels (and of their Adam moments) hold exactly its own block of experts.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import scenarios

LOCAL_DEVICES = 1
EPOCHS = {"lm": 3, "hier": 2}


def _model(kind, dist):
  """(compiled model, x, y) of `kind` built under `dist`."""
  if kind == "lm":
    return scenarios.multi_worker_model("lm", dist)
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.layers import gating as gating_lib  # pylint: disable=g-import-not-at-top

  # Noise is drawn per device under a mesh; zeros keep it equal.
  gating_lib.standard_normal = lambda shape, seed: keras.ops.zeros(
      shape, "float32"
  )
  with dist.scope():
    model = scenarios.tiny_model(
        hierarchical=True,
        capacity_factor=4.0,
        w_importance=0.1,
        w_load=0.1,
        balance_over="global",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  return (model,) + scenarios.tiny_data(batch=16)


def _expert_shards(model, num_local_devices):
  """{variable path: [[first expert, end, n], ...]} of this process's shards."""
  import jax  # pylint: disable=g-import-not-at-top

  mine = set(jax.local_devices())
  found = {}
  variables = list(model.weights) + list(model.optimizer.variables)
  for variable in variables:
    if "expert_kernel_1" not in variable.path:
      continue
    value = variable.value
    rows = []
    for shard in value.addressable_shards:
      assert shard.device in mine, (variable.path, shard.device)
      index = shard.index[0]
      num = value.shape[0]
      rows.append([index.start or 0, index.stop or num, num])
    assert len(rows) == num_local_devices, (variable.path, rows)
    found[variable.path] = sorted(rows)
  return found


def process_main(mesh_shape, kinds, out_dir):
  """One process of the cluster (KERAS_DISTRIBUTION_* set by `compare`)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  # First: the processes join the cluster before any JAX computation.
  dist = make_distribution(mesh_shape)
  import jax  # pylint: disable=g-import-not-at-top

  assert dist.kind == "jax" and jax.process_count() == 2, dist.kind
  pid = jax.process_index()
  report = {}
  for kind in kinds.split(","):
    init = os.path.join(out_dir, f"init_{kind}.weights.h5")
    deadline = time.time() + 150
    while not os.path.exists(init) and time.time() < deadline:
      time.sleep(0.2)
    model, x, y = _model(kind, dist)
    model.load_weights(init)
    batch = len(y)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    with dist.scope():
      logs = model.fit(
          dist.distribute_dataset(dataset), epochs=EPOCHS[kind], verbose=0
      ).history
      outputs = model.predict(x, batch_size=batch, verbose=0)
    report[kind] = {
        "loss": logs["loss"],
        "outputs": np.asarray(outputs).tolist(),
        "shards": _expert_shards(model, LOCAL_DEVICES),
    }
    keras.backend.clear_session()
  with open(os.path.join(out_dir, f"process{pid}.json"), "w") as f:
    json.dump(report, f)


def compare(mesh_shape="batch:1,expert:2", kinds="lm,hier"):
  """2 processes on `mesh_shape` == 1 process, for each of `kinds`."""
  port = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  out_dir = tempfile.mkdtemp()
  procs = []
  for pid in range(2):
    env = dict(os.environ)
    env.update(
        KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
        KERAS_DISTRIBUTION_NUM_PROCESSES="2",
        KERAS_DISTRIBUTION_PROCESS_ID=str(pid),
        MOE_KERAS_JAX_INIT_TIMEOUT="120",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "process",
                mesh_shape,
                kinds,
                out_dir,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
  # The one-process references run while the processes start.
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  single = make_distribution("batch:1,expert:1")
  want = {}
  for kind in kinds.split(","):
    model, x, y = _model(kind, single)
    model.save_weights(os.path.join(out_dir, f"init_{kind}.weights.h5"))
    batch = len(y)
    history = model.fit(
        x, y, batch_size=batch, epochs=EPOCHS[kind], shuffle=False, verbose=0
    ).history["loss"]
    want[kind] = (history, model.predict(x, batch_size=batch, verbose=0))
    keras.backend.clear_session()
  scenarios.wait_processes(procs, 300, "process")
  for pid in range(2):
    with open(os.path.join(out_dir, f"process{pid}.json")) as f:
      got = json.load(f)
    for kind, (history, final) in want.items():
      print(f"process {pid} {kind} losses", got[kind]["loss"], "one", history)
      scenarios.check_close(
          f"process {pid} {kind} losses", got[kind]["loss"], history
      )
      scenarios.check_close(
          f"process {pid} {kind} final outputs", got[kind]["outputs"], final
      )
      shards = got[kind]["shards"]
      assert shards, (kind, got[kind])
      for path, rows in shards.items():
        ((start, end, num),) = rows
        # batch:1,expert:2: process p holds experts [p*n/2, (p+1)*n/2).
        assert (start, end) == (pid * num // 2, (pid + 1) * num // 2), (
            kind,
            path,
            rows,
        )
      print(f"ok process {pid} {kind} expert shards", shards)


if __name__ == "__main__":
  if sys.argv[1] == "process":
    process_main(*sys.argv[2:])
  else:
    compare(*sys.argv[2:])
