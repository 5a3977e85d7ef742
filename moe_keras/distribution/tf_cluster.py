"""TF servers on several hosts driven by one client: experts across hosts.

Every host runs a TensorFlow server (`python -m moe_keras.tf_server
--tf_servers=host0:2222,host1:2222 --task_index=I`, `serve`): job "worker",
task I, gRPC. One client process (the train or evaluate CLI with the same
`--tf_servers`) connects to all of them (`connect`); afterwards its
`tf.function`s run ops and keep variables on the servers' devices
('/job:worker/replica:0/task:I/device:CPU:0', ...) and TensorFlow moves the
tensors between them with gRPC send/recv. The mesh's devices are then the
servers' devices (`server_devices`), so the in-graph mesh of
`strategy.MeshDataParallel` spans the hosts: with `batch:1,expert:W` expert
block e and its Adam slots live on server e only, and each block's token
rows travel from the replica's server to the block's server and back (a
point-to-point all-to-all). A server may offer several devices
(`tf_server --devices=N` splits its CPU, `configure_server_devices`; a GPU
host offers its GPUs): with 2 servers x 2 devices and `batch:2,expert:2`,
device (b, e) is server e's device b, so block e lives on server e and
row 1 reads it there. BUILD.md "TensorFlow across hosts" has the picture.

Convention: the server list is the `--tf_servers` flag (comma-separated
host:port, task I = the I-th address), given identically to every server
and to the client. TF_CONFIG keeps selecting MultiWorkerMirroredStrategy
(every worker a client, experts copied per host); the two cannot be
combined.

A server that dies (killed, its host gone) does not fail the client's
step: measured with TF 2.21 on 127.0.0.1, a client whose server was killed
with SIGKILL waited in its step for 10 minutes and more (the other server
waits for tensors that never come, and nothing times out). So the CLIs
watch the servers (`watch_servers`): a thread connects to every server's
port every WATCH_INTERVAL_S seconds, and a server that refuses or does not
answer WATCH_FAILURES times in a row ends the client with one line
(`lost_server_message`) and status 1, within about WATCH_INTERVAL_S *
WATCH_FAILURES (+ CONNECT_TIMEOUT_S each when the host is silent).
A step that does raise a gRPC error becomes the same one line
(`lost_server_error`). The servers hold no state of their own that
survives the run: the client writes the checkpoints (to a temporary name,
then renamed), and rerunning the client with the restarted servers resumes
from the last one.
"""

import re
import socket
import threading
import time

JOB = "worker"
PROTOCOL = "grpc"
# `watch_servers`: seconds between checks, failed checks in a row that
# make a server gone, and the timeout of one check's TCP connect.
WATCH_INTERVAL_S = 2.0
WATCH_FAILURES = 3
CONNECT_TIMEOUT_S = 5.0
# Words of the errors a step raises when a server is gone.
LOST_SERVER_MARKERS = (
    "Socket closed",
    "Connection reset by peer",
    "Connection refused",
    "Failed to connect",
    "failed to connect",
    "UNAVAILABLE",
    "GOAWAY",
    "Broken pipe",
)
_ADDRESS_RE = re.compile(r"^([A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")
_TASK_RE = re.compile(r"/job:[^/]+/replica:\d+/task:(\d+)/")


def parse_servers(servers):
  """Parses "host:port,host:port" into the list of server addresses.

  Args:
    servers: str of comma-separated host:port (task I = the I-th), or a
      list of them.

  Returns:
    list of "host:port" str, in task order.

  Raises:
    ValueError: empty, a malformed address (no port, port out of range),
      or an address given twice.
  """
  if isinstance(servers, str):
    parts = [p.strip() for p in servers.split(",")]
  else:
    parts = [str(p).strip() for p in servers or ()]
  if not parts or not any(parts):
    raise ValueError(
        "--tf_servers is empty; expected host:port,host:port (one per"
        " TensorFlow server)"
    )
  addresses = []
  for part in parts:
    match = _ADDRESS_RE.match(part)
    if not match or not 0 < int(match.group(2)) < 65536:
      raise ValueError(
          f"malformed TF server address {part!r} in --tf_servers; expected"
          " host:port with a port in 1..65535"
      )
    if part in addresses:
      raise ValueError(f"TF server {part} appears twice in --tf_servers")
    addresses.append(part)
  return addresses


def cluster_spec(servers):
  """The tf.train.ClusterSpec of job JOB with `servers` as its tasks."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.train.ClusterSpec({JOB: parse_servers(servers)})


def parse_device_count(devices):
  """Parses a server's --devices: how many devices it offers.

  Args:
    devices: None or "" (not given), or an int or str of an int >= 1.

  Returns:
    int >= 1, or None when not given.

  Raises:
    ValueError: not an int, or below 1.
  """
  if devices is None or (isinstance(devices, str) and not devices.strip()):
    return None
  try:
    count = int(str(devices).strip())
  except ValueError:
    count = None
  if count is None or count < 1:
    raise ValueError(
        f"--devices={devices} is not a device count; expected an int >= 1"
    )
  return count


def server_device_plan(devices, num_gpus):
  """The devices a server offers: its GPUs, else its CPU split N ways.

  Args:
    devices: the parsed --devices (int >= 1, or None when not given).
    num_gpus: the host's GPU count.

  Returns:
    (count, kind): e.g. (2, "CPU"), or (4, "GPU") on a host with 4 GPUs.

  Raises:
    ValueError: on a GPU host, --devices other than its GPU count.
  """
  if num_gpus:
    if devices is not None and devices != num_gpus:
      raise ValueError(
          f"--devices={devices} contradicts this host's {num_gpus} GPUs (a"
          " TF server's devices are its GPUs); drop --devices or give"
          f" --devices={num_gpus}"
      )
    return num_gpus, "GPU"
  return devices or 1, "CPU"


def configure_server_devices(devices=None):
  """Gives this (server) process its devices; call before TF starts.

  On a host without GPUs the CPU is split into `devices` logical devices
  (`mesh.split_cpu`), which `make_server` then gives the server; on a GPU
  host the GPUs are the devices.

  Args:
    devices: the parsed --devices (int >= 1, or None: 1 CPU device, or
      the host's GPUs).

  Returns:
    (count, kind) as `server_device_plan`.

  Raises:
    ValueError: --devices contradicts the GPUs, or the CPU could not be
      split (TensorFlow already initialized).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  count, kind = server_device_plan(
      devices, len(tf.config.list_physical_devices("GPU"))
  )
  if kind == "CPU" and count > 1 and not mesh_lib.split_cpu(count):
    raise ValueError(
        f"could not split the CPU into {count} devices (TensorFlow was"
        " already initialized in this process)"
    )
  return count, kind


def check_task_index(servers, task_index):
  """The servers' addresses, once `task_index` is one of them.

  Args:
    servers: the cluster's addresses (see parse_servers).
    task_index: a server's index in them.

  Returns:
    list of "host:port" str, in task order.

  Raises:
    ValueError: bad addresses or a task_index outside them.
  """
  addresses = parse_servers(servers)
  if not 0 <= task_index < len(addresses):
    raise ValueError(
        f"--task_index={task_index} is not one of the {len(addresses)}"
        f" servers of --tf_servers (0..{len(addresses) - 1})"
    )
  return addresses


def make_server(servers, task_index):
  """Starts (without blocking) TF server `task_index` of `servers`.

  Args:
    servers: the cluster's addresses (see parse_servers).
    task_index: this server's index in them.

  Returns:
    The started tf.distribute.Server.

  Raises:
    ValueError: bad addresses or a task_index outside them.
  """
  addresses = check_task_index(servers, task_index)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.distribute.Server(
      cluster_spec(addresses),
      job_name=JOB,
      task_index=task_index,
      protocol=PROTOCOL,
      config=_server_config(),
      start=True,
  )


def _server_config():
  """The server's ConfigProto: as many CPU devices as this process has.

  A tf.distribute.Server makes its devices from its own ConfigProto, not
  from the eager context: with the CPU split into 2 logical devices
  (`configure_server_devices`) but no config, a client saw one CPU per
  server (measured, TF 2.21). So the split is passed on here.

  Returns:
    tf.compat.v1.ConfigProto, or None when the CPU is not split.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cpu = tf.config.list_physical_devices("CPU")[0]
  logical = tf.config.get_logical_device_configuration(cpu)
  if not logical or len(logical) < 2:
    return None
  return tf.compat.v1.ConfigProto(device_count={"CPU": len(logical)})


def serve(servers, task_index):
  """Runs TF server `task_index` of `servers` until the process ends."""
  make_server(servers, task_index).join()


_connected = None


def connect(servers):
  """Connects this process (the client) to the TF servers.

  Call it before any variable is created: connecting resets TensorFlow's
  eager context. A second call with the same servers does nothing.

  Args:
    servers: the servers' addresses (see parse_servers).

  Returns:
    The server devices, task-major (`server_devices`).

  Raises:
    ValueError: bad addresses, a second call with other servers, or a
      server that lists no device.
  """
  global _connected
  addresses = parse_servers(servers)
  if _connected is not None:
    if _connected != addresses:
      raise ValueError(
          f"already connected to TF servers {','.join(_connected)}, not"
          f" {','.join(addresses)}"
      )
    return server_devices(addresses)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # The ClusterSpec itself: a resolver without a master address silently
  # connects to nothing.
  tf.config.experimental_connect_to_cluster(
      cluster_spec(addresses), job_name="localhost", protocol=PROTOCOL
  )
  _connected = addresses
  return server_devices(addresses)


def connected_servers():
  """The addresses `connect` connected to, or None."""
  return _connected


def server_devices(servers):
  """The servers' devices, task-major: all of task 0's, then task 1's, ...

  Each server contributes its GPUs, else its CPUs.

  Args:
    servers: the connected servers' addresses.

  Returns:
    list of device names ('/job:worker/replica:0/task:I/device:CPU:0').

  Raises:
    ValueError: a server lists no device, or the servers differ in their
      device counts.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  addresses = parse_servers(servers)
  by_task = {i: {"GPU": [], "CPU": []} for i in range(len(addresses))}
  for device in tf.config.list_logical_devices():
    match = _TASK_RE.search(device.name)
    if (
        not device.name.startswith(f"/job:{JOB}/")
        or not match
        or device.device_type not in ("GPU", "CPU")
    ):
      continue
    task = int(match.group(1))
    if task in by_task:
      by_task[task][device.device_type].append(device.name)
  devices = []
  counts = []
  for task, kinds in sorted(by_task.items()):
    names = kinds["GPU"] or kinds["CPU"]
    if not names:
      raise ValueError(
          f"TF server {addresses[task]} (task {task}) lists no device"
      )
    names.sort(key=lambda n: int(n.rsplit(":", 1)[1]))
    counts.append(len(names))
    devices.extend(names)
  if len(set(counts)) != 1:
    raise ValueError(
        f"the TF servers have different device counts {counts}"
        f" ({','.join(addresses)})"
    )
  return devices


def task_of(device):
  """The task index of a '/job:worker/replica:0/task:I/...' device name."""
  match = _TASK_RE.search(device or "")
  return int(match.group(1)) if match else None


def lost_server_error(error, servers=None):
  """The one-line message for a step failed by a lost TF server.

  Args:
    error: an exception raised while the client ran (e.g. out of fit).
    servers: the servers' addresses; default those `connect` connected to.

  Returns:
    A str naming the server (when the error names one) and what to do,
    when the client is connected and `error` is a gRPC failure
    (`tf.errors.UnavailableError`, or an error naming a lost connection,
    `LOST_SERVER_MARKERS`); else None.
  """
  servers = servers or _connected
  if not servers:
    return None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  text = str(error)
  lost = isinstance(
      error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)
  ) or (
      isinstance(error, (tf.errors.OpError, RuntimeError))
      and any(marker in text for marker in LOST_SERVER_MARKERS)
  )
  if not lost:
    return None
  addresses = parse_servers(servers)
  named = [a for a in addresses if a in text]
  for match in re.finditer(r"/job:worker/replica:0/task:(\d+)", text):
    task = int(match.group(1))
    if task < len(addresses) and addresses[task] not in named:
      named.append(addresses[task])
  first = (text.strip().splitlines() or [type(error).__name__])[0]
  return lost_server_message(
      named, f"{type(error).__name__}: {first[:300]}", addresses
  )


def lost_server_message(named, cause, servers):
  """The one line for a lost server.

  Args:
    named: the addresses known to be gone (may be empty).
    cause: what showed it (one line).
    servers: all servers' addresses.

  Returns:
    str.
  """
  which = (
      f"server {named[0]}"
      if len(named) == 1
      else "a server (" + ",".join(named or servers) + ")"
  )
  return (
      f"{which} of the TF cluster is gone (killed, crashed or"
      " unreachable); restart it and rerun to resume from the last"
      f" checkpoint ({cause})"
  )


def _reachable(address, timeout):
  """Whether a TCP connection to host:port opens within `timeout` s."""
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout):
      return True, None
  except OSError as e:
    return False, e


def watch_servers(
    servers,
    on_lost,
    interval_s=WATCH_INTERVAL_S,
    failures=WATCH_FAILURES,
    timeout_s=CONNECT_TIMEOUT_S,
):
  """Calls `on_lost(message)` once a server stops accepting connections.

  A daemon thread opens (and closes) a TCP connection to every server
  every `interval_s` seconds; a server that fails `failures` checks in a
  row is gone, and `on_lost` gets `lost_server_message`'s line. Bounded
  detection: a killed server's port refuses at once, so about
  interval_s * failures; a silent host about (interval_s + timeout_s) *
  failures.

  Args:
    servers: the servers' addresses.
    on_lost: called (in the watching thread) with the one-line message;
      e.g. print it and end the process.
    interval_s: seconds between checks.
    failures: failed checks in a row that make a server gone.
    timeout_s: timeout of one connect.

  Returns:
    A threading.Event; set it to stop watching.
  """
  addresses = parse_servers(servers)
  stop = threading.Event()

  def watch():
    missed = dict.fromkeys(addresses, 0)
    while not stop.wait(interval_s):
      for address in addresses:
        ok, error = _reachable(address, timeout_s)
        missed[address] = 0 if ok else missed[address] + 1
        if missed[address] >= failures and not stop.is_set():
          stop.set()
          on_lost(
              lost_server_message(
                  [address],
                  f"no TCP connection in {failures} checks"
                  f" {interval_s:g} s apart: {error}",
                  addresses,
              )
          )
          return

  threading.Thread(target=watch, name="tf_server_watch", daemon=True).start()
  return stop
