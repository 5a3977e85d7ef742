"""Experts across hosts on TensorFlow: one client, two TF servers (loopback).

Real processes on 127.0.0.1: two `python -m moe_keras.tf_server` processes
(one CPU device each) and a client with `--tf_servers` on
`batch:1,expert:2`, so expert block e and its Adam slots live on server e.

- The client scenario (`tf_cross_host_scenarios.py`): flat (dropless and
  capacity) and hierarchical MoE equal one device (outputs, loss, every
  gradient, 2 Adam steps), each server's variables only its experts.
- The train CLI on the servers; the checkpoint evaluates on one device to
  the numbers the servers give (layout-free).
- Two servers with `--devices=2` each and the train CLI on
  `batch:2,expert:2`: block e on server e (as the log of the blocks'
  variables shows); the checkpoint evaluates on one device and on a
  one-host `batch:1,expert:4` to the same numbers and resumes on one
  device.
- A server killed (SIGKILL) mid-run ends the client with one line and
  status 1 within KILL_BOUND_S; the last checkpoint is complete; with the
  server restarted, a rerun resumes from it and finishes.

Each start of TensorFlow takes 10-30 s on the shared 2-core box, so the
process tests run with MOE_KERAS_SLOW_TESTS=1 (1-3 min each); the parsing
(--tf_servers, --devices), device order, message and watchdog tests run
always.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import dist_testlib
import scenarios
import test_jax_kill_process
import test_train_cli_mesh

from moe_keras.distribution import loopback_servers
from moe_keras.distribution import tf_cluster

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"
_slow = pytest.mark.skipif(not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1")
MESH = "--mesh_shape=batch:1,expert:2"
SERVER_START_TIMEOUT_S = 180
# The client must be gone this long after a server is killed: the watchdog
# needs WATCH_FAILURES checks WATCH_INTERVAL_S apart (6 s; 5.3 s measured),
# plus slack for a loaded machine.
KILL_BOUND_S = 30


def _Servers(count=2, devices=None):  # pylint: disable=invalid-name
  """TF servers on free loopback ports (`loopback_servers`), test env."""
  return loopback_servers.LoopbackServers(
      count=count,
      devices=devices,
      env=dict(dist_testlib.scenario_env(), PYTHONPATH=dist_testlib.REPO),
      cwd=dist_testlib.REPO,
      start_timeout_s=SERVER_START_TIMEOUT_S,
  )


@pytest.fixture(scope="module")
def servers():
  running = _Servers()
  yield running
  running.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  directory = tmp_path_factory.mktemp("corpus")
  test_train_cli_mesh._write_corpus(directory)  # pylint: disable=protected-access
  return directory


def _train(corpus, model_dir, steps, *extra, popen=False):
  return test_train_cli_mesh._train(  # pylint: disable=protected-access
      corpus,
      model_dir,
      steps,
      "--gin_bindings=training.steps_per_checkpoint=2",
      *extra,
      popen=popen,
  )


def _evaluate(model_dir, output_dir, layouts):
  """Runs `moe_keras.evaluate` on the valid split once per layout.

  Args:
    model_dir: the run whose checkpoint is evaluated.
    output_dir: where the --output JSON files go.
    layouts: {label: the extra CLI arguments (mesh, servers)}.

  Returns:
    {label: the parsed evaluation JSON}.
  """
  results = {}
  for label, extra in layouts.items():
    output = output_dir / f"eval_{label.replace(' ', '_')}.json"
    proc = test_train_cli_mesh._run(  # pylint: disable=protected-access
        "moe_keras.evaluate",
        f"--model_dir={model_dir}",
        "--split=valid",
        f"--output={output}",
        *extra,
    )
    assert proc.returncode == 0, (label, proc.stderr[-3000:])
    with open(output) as f:
      results[label] = json.load(f)
  return results


def _assert_same_evaluation(got, want, step, rtol):
  """The same step, tokens, perplexity and mean NLL (within `rtol`)."""
  assert want["step"] == got["step"] == step
  assert want["tokens"] == got["tokens"] > 0
  for key in ("perplexity", "mean_nll"):
    np.testing.assert_allclose(got[key], want[key], rtol=rtol)


# -- always -------------------------------------------------------------------


def test_parse_servers():
  assert tf_cluster.parse_servers("a:1, b.c:2222,[::1]:3") == [
      "a:1",
      "b.c:2222",
      "[::1]:3",
  ]
  for bad, match in (
      ("", "empty"),
      (" , ", "empty"),
      ("host", "malformed TF server address 'host'"),
      ("host:0", "malformed"),
      ("host:70000", "malformed"),
      ("a:1,a:1", "a:1 appears twice"),
  ):
    with pytest.raises(ValueError, match=match) as raised:
      tf_cluster.parse_servers(bad)
    assert "\n" not in str(raised.value)


def test_server_devices_order_spans_servers_on_the_expert_axis():
  from moe_keras.distribution import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  devices = [
      f"/job:worker/replica:0/task:{t}/device:CPU:{d}"
      for t in range(2)
      for d in range(2)
  ]
  assert [tf_cluster.task_of(d) for d in devices] == [0, 0, 1, 1]
  # batch:2,expert:2 on 2 servers x 2 devices: column e on server e.
  order = mesh_lib.process_spanning_order(
      devices, "batch:2,expert:2", process_of=tf_cluster.task_of
  )
  mesh = mesh_lib.Mesh("batch:2,expert:2", devices=order)
  for b in range(2):
    assert [tf_cluster.task_of(d) for d in mesh.expert_devices(b)] == [0, 1]
  # Row 0 is every server's device 0, row 1 its device 1: device (b, e)
  # is server e's device b, so row 1 reads block e from its own server.
  assert order == [devices[0], devices[2], devices[1], devices[3]]
  with pytest.raises(ValueError, match="needs 8 devices but the 2 processes"):
    mesh_lib.process_spanning_order(
        devices, "batch:2,expert:4", process_of=tf_cluster.task_of
    )


def test_server_devices_lists_each_servers_devices_task_major(monkeypatch):
  """What `connect` returns for 2 servers x 2 CPUs (the client's view)."""
  import collections  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  device = collections.namedtuple("LogicalDevice", ["name", "device_type"])
  listed = [
      device(f"/job:{job}/replica:0/task:{t}/device:CPU:{d}", "CPU")
      for job, t, d in (
          ("worker", 1, 1),
          ("localhost", 0, 0),  # the client's own CPU: not a server's
          ("worker", 0, 1),
          ("worker", 1, 0),
          ("worker", 0, 0),
      )
  ]
  monkeypatch.setattr(tf.config, "list_logical_devices", lambda: listed)
  servers = ["127.0.0.1:1", "127.0.0.1:2"]
  assert tf_cluster.server_devices(servers) == [
      "/job:worker/replica:0/task:0/device:CPU:0",
      "/job:worker/replica:0/task:0/device:CPU:1",
      "/job:worker/replica:0/task:1/device:CPU:0",
      "/job:worker/replica:0/task:1/device:CPU:1",
  ]
  monkeypatch.setattr(tf.config, "list_logical_devices", lambda: listed[:-1])
  with pytest.raises(ValueError, match=r"different device counts \[1, 2\]"):
    tf_cluster.server_devices(servers)


def test_server_devices_flag_parsing_and_one_line_errors():
  assert tf_cluster.parse_device_count(None) is None
  assert tf_cluster.parse_device_count("") is None
  assert tf_cluster.parse_device_count(" 2 ") == 2
  assert tf_cluster.parse_device_count(3) == 3
  for bad in ("0", "-1", "two", "1.5"):
    with pytest.raises(ValueError) as raised:
      tf_cluster.parse_device_count(bad)
    assert str(raised.value) == (
        f"--devices={bad} is not a device count; expected an int >= 1"
    )
  # A CPU host: its CPU split N ways (default 1).
  assert tf_cluster.server_device_plan(None, num_gpus=0) == (1, "CPU")
  assert tf_cluster.server_device_plan(2, num_gpus=0) == (2, "CPU")
  # A GPU host: its GPUs; --devices may only repeat their count.
  assert tf_cluster.server_device_plan(None, num_gpus=4) == (4, "GPU")
  assert tf_cluster.server_device_plan(4, num_gpus=4) == (4, "GPU")
  with pytest.raises(ValueError) as raised:
    tf_cluster.server_device_plan(2, num_gpus=4)
  assert str(raised.value) == (
      "--devices=2 contradicts this host's 4 GPUs (a TF server's devices"
      " are its GPUs); drop --devices or give --devices=4"
  )


def test_tf_servers_with_tf_config_or_jax_is_one_line(monkeypatch):
  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="needs the TensorFlow backend"):
    make_distribution("expert:2", backend="jax", tf_servers="127.0.0.1:1")
  monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')
  with pytest.raises(ValueError, match="--tf_servers and TF_CONFIG exclude"):
    make_distribution(
        "expert:2", backend="tensorflow", tf_servers="127.0.0.1:1"
    )


def test_lost_server_error_is_one_line():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  servers = ["127.0.0.1:1234", "127.0.0.1:1235"]
  error = tf.errors.UnavailableError(
      None,
      None,
      "Socket closed\nAdditional GRPC error information from remote target"
      " /job:worker/replica:0/task:1",
  )
  message = tf_cluster.lost_server_error(error, servers)
  assert "\n" not in message
  assert message.startswith(
      "server 127.0.0.1:1235 of the TF cluster is gone"
  ), message
  assert "restart it and rerun to resume from the last checkpoint" in message
  # Other errors, and a process that is no client, keep their handling.
  assert tf_cluster.lost_server_error(ValueError("bad shape"), servers) is None
  assert tf_cluster.lost_server_error(error, None) is None


def test_watchdog_reports_a_closed_port_within_bound():
  listening = socket.socket()
  listening.bind(("127.0.0.1", 0))
  listening.listen()
  dead = scenarios._free_ports(1)[0]  # pylint: disable=protected-access
  addresses = [f"127.0.0.1:{listening.getsockname()[1]}", f"127.0.0.1:{dead}"]
  got = []
  done = threading.Event()
  start = time.time()
  tf_cluster.watch_servers(
      addresses,
      lambda message: (got.append(message), done.set()),
      interval_s=0.1,
      failures=3,
      timeout_s=1.0,
  )
  assert done.wait(10)
  listening.close()
  assert time.time() - start < 5
  assert got[0].startswith(f"server 127.0.0.1:{dead} of the TF cluster is gone")
  assert "Connection refused" in got[0] and "\n" not in got[0]


@pytest.mark.parametrize(
    "flag,message",
    [
        (
            "--task_index=2",
            "--task_index=2 is not one of the 2 servers of --tf_servers"
            " (0..1)",
        ),
        (
            "--devices=0",
            "--devices=0 is not a device count; expected an int >= 1",
        ),
    ],
    ids=["task_index", "devices"],
)
def test_tf_server_bad_flag_is_one_line(flag, message):
  env = dict(dist_testlib.scenario_env(), PYTHONPATH=dist_testlib.REPO)
  task_index = [] if flag.startswith("--task_index") else ["--task_index=0"]
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "moe_keras.tf_server",
          "--tf_servers=127.0.0.1:1,127.0.0.1:2",
          flag,
          *task_index,
      ],
      cwd=dist_testlib.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"moe_keras.tf_server: error: {message}"
  ), proc.stderr[-2000:]


# -- real processes (MOE_KERAS_SLOW_TESTS=1) ---------------------------------


@_slow
def test_client_on_two_servers_matches_one_device(servers):
  out = dist_testlib.run_scenario(
      "client",
      args=(servers.spec,),
      timeout=600,
      script="tf_cross_host_scenarios.py",
  )
  assert "ok client" in out, out
  for label in ("flat dropless", "flat capacity", "hierarchical"):
    assert f"ok {label} placement: task 1 holds only" in out, out
    assert f"ok {label} 2 Adam steps' losses" in out, out
  assert "flat capacity dropped fraction per step" in out, out


@_slow
def test_train_cli_on_servers_evaluates_on_one_device(
    servers, corpus, tmp_path
):
  model_dir = tmp_path / "run"
  proc = _train(corpus, model_dir, 4, MESH, f"--tf_servers={servers.spec}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "to step 4" in proc.stdout, proc.stdout
  assert "4 experts in 2 blocks on /job:worker/replica:0/task:0" in proc.stderr
  # A mesh that does not fit the servers: one line naming both.
  proc = _train(
      corpus,
      tmp_path / "bad",
      4,
      "--mesh_shape=batch:1,expert:4",
      f"--tf_servers={servers.spec}",
  )
  assert proc.returncode == 1
  assert (
      proc.stderr.strip()
      .splitlines()[-1]
      .endswith(
          "mesh batch:1,expert:4 needs 4 devices but the 2 TF servers have 2"
          " (1 each)"
      )
  ), proc.stderr[-2000:]
  results = _evaluate(
      model_dir,
      tmp_path,
      {
          "one device": [],
          "servers": [MESH, f"--tf_servers={servers.spec}"],
      },
  )
  want, got = results["one device"], results["servers"]
  _assert_same_evaluation(got, want, step=4, rtol=1e-6)
  for layer, stats in want["experts"].items():
    for key, value in stats.items():
      np.testing.assert_allclose(
          got["experts"][layer][key], value, rtol=1e-5, atol=1e-6
      )


@_slow
def test_two_servers_x_two_devices_train_2x2_checkpoint_is_layout_free(
    corpus, tmp_path
):
  """2 servers x 2 CPUs, batch:2,expert:2; evaluate on 1 and 4 devices.

  Device (b, e) is server e's CPU:b, so expert block e lives on server e
  (the blocks' variables report it in the train log); the checkpoint
  evaluates on one device and on a one-host batch:1,expert:4 to the same
  numbers, and training resumes from it on one device.
  """
  model_dir = tmp_path / "run"
  running = _Servers(devices=2)
  try:
    assert all(
        line.endswith("with 2 CPU devices") for line in running.ready_lines
    ), running.ready_lines
    proc = _train(
        corpus,
        model_dir,
        4,
        "--mesh_shape=batch:2,expert:2",
        f"--tf_servers={running.spec}",
    )
  finally:
    running.stop()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "to step 4" in proc.stdout, proc.stdout
  assert "over 2 TF servers x 2 devices" in proc.stderr, proc.stderr[-3000:]
  assert (
      "4 experts in 2 blocks on /job:worker/replica:0/task:0/device:CPU:0,"
      " /job:worker/replica:0/task:1/device:CPU:0"
  ) in proc.stderr, proc.stderr[-3000:]
  assert test_jax_kill_process._check_checkpoint(model_dir, 4) == 4  # pylint: disable=protected-access
  results = _evaluate(
      model_dir,
      tmp_path,
      {"one device": [], "expert:4": ["--mesh_shape=batch:1,expert:4"]},
  )
  _assert_same_evaluation(
      results["expert:4"], results["one device"], step=4, rtol=1e-5
  )
  proc = _train(corpus, model_dir, 6)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored" in proc.stderr, proc.stderr[-3000:]
  assert "(step 4)" in proc.stderr, proc.stderr[-3000:]
  assert "to step 6" in proc.stdout, proc.stdout


@_slow
def test_killed_server_ends_the_client_and_a_rerun_resumes(corpus, tmp_path):
  running = _Servers()
  model_dir = tmp_path / "run"
  state = test_jax_kill_process._state  # pylint: disable=protected-access
  try:
    client = test_jax_kill_process._Running(  # pylint: disable=protected-access
        _train(
            corpus,
            model_dir,
            100000,
            MESH,
            f"--tf_servers={running.spec}",
            popen=True,
        )
    )
    try:
      deadline = time.time() + 300
      while (state(model_dir) or {"step": -1})["step"] < 2:
        assert time.time() < deadline, "no checkpoint written in time"
        assert client.proc.poll() is None, client.wait(30)[1][-3000:]
        time.sleep(0.2)
      seen = state(model_dir)["step"]
      running.kill(1)
      killed = time.time()
      output = client.wait(KILL_BOUND_S + 30)
      took = time.time() - killed
    finally:
      client.stop()
    assert output is not None, "the client still runs after the kill"
    print(f"client ended {took:.1f} s after server 1 was killed")
    assert took < KILL_BOUND_S, took
    assert client.proc.returncode == 1, output[1][-3000:]
    last = output[1].strip().splitlines()[-1]
    assert last.startswith(
        f"moe_keras.train: error: server {running.addresses[1]} of the TF"
        " cluster is gone"
    ), output[1][-3000:]
    assert "restart it and rerun to resume from the last checkpoint" in last
    step = test_jax_kill_process._check_checkpoint(model_dir, seen)  # pylint: disable=protected-access

    # Server 1 again (server 0 serves on); the client resumes and finishes.
    running.start(1)
    final = step + 2
    proc = _train(
        corpus, model_dir, final, MESH, f"--tf_servers={running.spec}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(step {step})" in proc.stderr, proc.stderr[-3000:]
    assert f"to step {final}" in proc.stdout
    assert state(model_dir)["step"] == final
  finally:
    running.stop()
