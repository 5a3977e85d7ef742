"""Several JAX processes as one mesh, on 127.0.0.1 (real processes).

* `jax_processes.py` trains, on the global mesh `batch:1,expert:2` of two
  processes (one host device each) that joined one JAX cluster (gloo CPU
  collectives), the tiny flat MoE LM (3 Adam steps) and a Dense ->
  hierarchical MoE -> Dense model (2 Adam steps): the losses and final
  outputs must equal the one-process run within 1e-5, and each process's
  shards of the expert kernels and of their Adam moments must hold exactly
  its half of the experts.
* The train CLI: the deterministic tiny LM trained by two processes on
  `batch:1,expert:2` gives the checkpoint one process gives on
  `batch:2,expert:4` (8 host devices), and resumes on one process.
* Cluster settings and the device order, without starting JAX; the train
  CLI's one-line errors for bad settings and an unreachable coordinator.

The two runs of real training take 5 minutes each on a shared 2-core box
(about 2.5 minutes of CPU: three processes start TensorFlow, JAX and
compile); they run with MOE_KERAS_SLOW_TESTS=1.
"""

import collections
import json
import os

import h5py
import numpy as np
import pytest

import dist_testlib
import scenarios
import test_train_cli_mesh
from moe_keras.distribution import jax_cluster
from moe_keras.distribution import mesh as mesh_lib

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"
_slow = pytest.mark.skipif(not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1")


@_slow
def test_two_jax_processes_match_one_process_experts_split():
  out = dist_testlib.run_scenario(
      "compare",
      backend="jax",
      args=("batch:1,expert:2", "lm,hier"),
      timeout=420,
      script="jax_processes.py",
  )
  for kind in ("lm", "hier"):
    assert out.count(f"{kind} losses: max abs error") == 2, out
    assert out.count(f"{kind} final outputs: max abs error") == 2, out
    assert out.count(f"{kind} expert shards") == 2, out


# The deterministic tiny LM (scenarios.LM_BINDINGS) on packed rows: every
# batch is [16, 16], so JAX compiles one step.
CLI_BINDINGS = [
    f"--gin_bindings={b}"
    for b in scenarios.LM_BINDINGS + (
        "lm_batching.mode = 'packed'",
        "lm_batching.pack_length = 16",
        "training.steps_per_checkpoint = 2",
    )
]


def _checkpoint(model_dir):
  """(step, {h5 dataset name: array}) of model_dir's latest checkpoint."""
  directory = os.path.join(model_dir, "checkpoints")
  with open(os.path.join(directory, "state.json")) as f:
    state = json.load(f)
  values = {}
  with h5py.File(os.path.join(directory, state["latest"]), "r") as f:
    f.visititems(
        lambda name, obj: values.__setitem__(name, obj[()])
        if isinstance(obj, h5py.Dataset)
        else None
    )
  return state["step"], values


def _cluster_env(port, pid):
  return {
      jax_cluster.ADDRESSES_ENV: f"127.0.0.1:{port}",
      jax_cluster.NUM_PROCESSES_ENV: "2",
      jax_cluster.PROCESS_ID_ENV: str(pid),
      jax_cluster.TIMEOUT_ENV: "120",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
  }


@_slow
def test_train_cli_two_jax_processes_then_one(tmp_path):
  test_train_cli_mesh._write_corpus(tmp_path)  # pylint: disable=protected-access
  train = test_train_cli_mesh._train  # pylint: disable=protected-access
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  proc = train(
      tmp_path,
      one,
      4,
      "--mesh_shape=batch:2,expert:4",
      *CLI_BINDINGS,
      backend="jax",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  port = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  procs = [
      train(
          tmp_path,
          two,
          4,
          "--mesh_shape=batch:1,expert:2",
          *CLI_BINDINGS,
          backend="jax",
          env=_cluster_env(port, pid),
          popen=True,
      )
      for pid in range(2)
  ]
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
    assert "to step 4" in stdout, stdout
  step, got = _checkpoint(two)
  want_step, want = _checkpoint(one)
  assert step == want_step == 4
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, atol=2e-5, err_msg=name)
  # Process 0 alone wrote the run directory.
  assert len(os.listdir(two / "checkpoints")) == 5  # 2 steps x 2 + state
  # The 2-process checkpoint resumes on one process, on another mesh.
  proc = train(
      tmp_path,
      two,
      6,
      "--mesh_shape=batch:2,expert:4",
      *CLI_BINDINGS,
      backend="jax",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "to step 6" in proc.stdout and "restored" in proc.stderr


def test_train_cli_bad_cluster_is_one_line(tmp_path):
  train = test_train_cli_mesh._train  # pylint: disable=protected-access
  port = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  for pid, extra, message in (
      (2, {}, "KERAS_DISTRIBUTION_PROCESS_ID=2 is not below"),
      # Process 1 with nobody listening at the coordinator's address.
      (1, {jax_cluster.TIMEOUT_ENV: "2"}, "no JAX coordinator (process 0)"),
  ):
    env = dict(_cluster_env(port, pid), **extra)
    proc = train(
        tmp_path,
        tmp_path / "run",
        1,
        "--mesh_shape=batch:1,expert:2",
        backend="jax",
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert lines and message in lines[-1], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "environ, message",
    [
        ({jax_cluster.PROCESS_ID_ENV: "0"}, "missing"),
        (
            {
                jax_cluster.ADDRESSES_ENV: "localhost",
                jax_cluster.NUM_PROCESSES_ENV: "2",
                jax_cluster.PROCESS_ID_ENV: "0",
            },
            "is not host:port",
        ),
        (
            {
                jax_cluster.ADDRESSES_ENV: "a:1",
                jax_cluster.NUM_PROCESSES_ENV: "two",
                jax_cluster.PROCESS_ID_ENV: "0",
            },
            "must be an int >= 1",
        ),
        (
            {
                jax_cluster.ADDRESSES_ENV: "a:1",
                jax_cluster.NUM_PROCESSES_ENV: "2",
                jax_cluster.PROCESS_ID_ENV: "2",
            },
            "is not below",
        ),
        (
            {
                jax_cluster.ADDRESSES_ENV: "a:1,b:2,c:3",
                jax_cluster.NUM_PROCESSES_ENV: "2",
                jax_cluster.PROCESS_ID_ENV: "1",
            },
            "names 3 processes",
        ),
    ],
)
def test_bad_cluster_settings_are_one_line(environ, message):
  with pytest.raises(ValueError, match=message) as info:
    jax_cluster.cluster_from_env(environ)
  assert "\n" not in str(info.value)


def test_cluster_from_env():
  assert jax_cluster.cluster_from_env({}) is None
  got = jax_cluster.cluster_from_env(
      {
          jax_cluster.ADDRESSES_ENV: "10.0.0.1:1234,10.0.0.2:2345",
          jax_cluster.NUM_PROCESSES_ENV: "2",
          jax_cluster.PROCESS_ID_ENV: "1",
      }
  )
  assert got == {
      "coordinator": "10.0.0.1:1234",
      "num_processes": 2,
      "process_id": 1,
      "timeout_s": jax_cluster.DEFAULT_TIMEOUT_S,
      "heartbeat_timeout_s": jax_cluster.DEFAULT_HEARTBEAT_TIMEOUT_S,
  }


_Device = collections.namedtuple("_Device", "process_index id")


def _devices(processes, local):
  return [
      _Device(p, p * 100 + i) for p in range(processes) for i in range(local)
  ]


@pytest.mark.parametrize(
    "processes, local, mesh_shape, want",
    [
        # The expert axis spans the processes: block e on process e.
        (2, 1, "batch:1,expert:2", [[0, 1]]),
        (2, 2, "batch:2,expert:2", [[0, 1], [0, 1]]),
        (2, 2, "batch:1,expert:4", [[0, 0, 1, 1]]),
        # Fewer expert blocks than processes: the rest split the batch.
        (4, 1, "batch:2,expert:2", [[0, 1], [2, 3]]),
        (2, 1, "batch:2,expert:1", [[0], [1]]),
    ],
)
def test_process_spanning_order(processes, local, mesh_shape, want):
  devices = mesh_lib.process_spanning_order(
      _devices(processes, local), mesh_shape
  )
  mesh = mesh_lib.Mesh(mesh_shape, devices=devices)
  got = [
      [d.process_index for d in mesh.expert_devices(b)]
      for b in range(mesh.batch)
  ]
  assert got == want
  assert sorted(d.id for d in devices) == sorted(
      d.id for d in _devices(processes, local)
  )


def test_process_spanning_order_errors():
  with pytest.raises(ValueError, match="needs 2 devices but the 2 processes"):
    mesh_lib.process_spanning_order(_devices(2, 2), "batch:1,expert:2")
  uneven = _devices(2, 2)[:3]
  with pytest.raises(ValueError, match="different device counts"):
    mesh_lib.process_spanning_order(uneven, "batch:1,expert:3")
