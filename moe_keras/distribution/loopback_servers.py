"""TF servers (`moe_keras.tf_server`) started as local processes on 127.0.0.1.

For tests and benchmarks that need a real TF cluster on one machine: each
server is its own `python -m moe_keras.tf_server` process on a free
loopback port, started together (each start of TensorFlow takes 10-30 s on
a shared 2-core box), and `stop` kills them.
"""

import signal
import socket
import subprocess
import sys
import threading

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
READY_WORDS = "serving at"  # in the line a server prints once it serves


def free_ports(count):
  """`count` distinct TCP ports free on 127.0.0.1 right now.

  Args:
    count: how many ports.

  Returns:
    A list of `count` port numbers (bound together, then released, so they
    differ; another process may still take one before it is used).
  """
  socks = []
  for _ in range(count):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


class LoopbackServers:
  """TF servers on free loopback ports; `stop` kills them.

  Args:
    count: the number of servers.
    devices: each server's --devices (None: not given, one CPU device).
    env: the servers' environment (None: this process's).
    cwd: the servers' working directory (None: this process's).
    start_timeout_s: seconds to wait for each server to serve.

  Attributes:
    addresses: "127.0.0.1:PORT" of server i at index i.
    spec: the --tf_servers value (addresses joined by commas).
    procs: the servers' `subprocess.Popen`s (None before a start).
    ready_lines: each server's "... serving at ..." line.

  Raises:
    AssertionError: a server did not serve within start_timeout_s (all are
      stopped first).
  """

  def __init__(
      self,
      count=2,
      devices=None,
      env=None,
      cwd=None,
      start_timeout_s=START_TIMEOUT_S,
  ):
    self.addresses = [f"127.0.0.1:{p}" for p in free_ports(count)]
    self.spec = ",".join(self.addresses)
    self.devices = devices
    self.env = env
    self.cwd = cwd
    self.start_timeout_s = start_timeout_s
    self.procs = [None] * count
    self.ready_lines = [None] * count
    # Started together (each start of TensorFlow takes 10-30 s).
    waits = [self._launch(index) for index in range(count)]
    for index, ready in enumerate(waits):
      self._wait(index, ready)

  @property
  def ports(self):
    """The servers' ports, server i at index i."""
    return [int(a.rsplit(":", 1)[1]) for a in self.addresses]

  def start(self, index):
    """Starts server `index` and waits until it serves."""
    self._wait(index, self._launch(index))

  def _launch(self, index):
    """Starts server `index`; returns the Event set once it serves."""
    devices = [] if self.devices is None else [f"--devices={self.devices}"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moe_keras.tf_server",
            f"--tf_servers={self.spec}",
            f"--task_index={index}",
            *devices,
        ],
        cwd=self.cwd,
        env=self.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    self.procs[index] = proc
    ready = threading.Event()

    def read():
      for line in proc.stdout:
        if READY_WORDS in line:
          self.ready_lines[index] = line.strip()
          ready.set()

    threading.Thread(target=read, daemon=True).start()
    return ready

  def _wait(self, index, ready):
    if not ready.wait(self.start_timeout_s):
      self.stop()
      raise AssertionError(f"TF server {index} did not start")

  def kill(self, index):
    """Kills server `index` with SIGKILL and reaps it."""
    self.procs[index].send_signal(signal.SIGKILL)
    self.procs[index].wait(STOP_TIMEOUT_S)

  def stop(self):
    """Kills every server still running."""
    for proc in self.procs:
      if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)
