"""Several JAX processes as one mesh: joining the cluster, primary, gathers.

A multi-process JAX run is configured with Keras's environment variables
(`keras.distribution.initialize`), set on every process:

  KERAS_DISTRIBUTION_JOB_ADDRESSES  host:port of process 0 (the
                                    coordinator), or every process's
                                    host:port, comma-separated
  KERAS_DISTRIBUTION_NUM_PROCESSES  the number of processes P
  KERAS_DISTRIBUTION_PROCESS_ID     this process, 0 .. P-1
  MOE_KERAS_JAX_INIT_TIMEOUT        seconds to wait for all processes to
                                    join (default 300)
  MOE_KERAS_JAX_HEARTBEAT_TIMEOUT   seconds after which the coordination
                                    service declares a silent process
                                    dead (default 60; JAX's own is 100)

`join_cluster_from_env` calls `jax.distributed.initialize` (CPU
collectives: gloo, jax's default) before any JAX computation; afterwards
`jax.devices()` lists every process's devices and one jitted program runs
over all of them. Process 0 is the primary: it alone writes the run
directory. Saving a weight sharded across processes needs its value on the
writing process: `host_local_values` gathers them (a collective, so every
process enters it).

A process that dies (killed, crashed, its host gone) ends the run of the
others, within a bound. A survivor inside a collective, which a training
step always is, fails at once: gloo sees the connection close and the step
raises. `lost_process_error` recognizes that error, and the CLI prints one
line and leaves with `exit_without_shutdown` (JAX's own shutdown would wait
at a barrier for the dead process, then abort with a stack trace). A
survivor outside any collective is aborted by JAX itself once the dead
process has missed its heartbeats for MOE_KERAS_JAX_HEARTBEAT_TIMEOUT
seconds (a fatal log, no exception). Checkpoints are written to a
temporary name and renamed, so the last complete one survives; rerunning
every process resumes from it.
"""

import contextlib
import os
import socket
import sys
import time

ADDRESSES_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"
TIMEOUT_ENV = "MOE_KERAS_JAX_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_ENV = "MOE_KERAS_JAX_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# Words of the errors a collective or the coordination service raises when
# another process of the cluster is gone (gloo: "Gloo all-reduce failed:
# ... Connection closed by peer [127.0.0.1]:20172").
LOST_PROCESS_MARKERS = (
    "Gloo",
    "Connection closed by peer",
    "Connection reset by peer",
    "heartbeat",
    "coordination service",
)


class ClusterError(ValueError):
  """Bad multi-process settings, or a cluster that cannot be joined."""


def _int_env(name, environ, minimum):
  raw = environ.get(name, "").strip()
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ClusterError(f"{name} must be an int >= {minimum}, got {raw!r}")
  return value


def cluster_from_env(environ=None):
  """The cluster the environment describes, or None (one process).

  Args:
    environ: a mapping like os.environ (default os.environ).

  Returns:
    None when none of the variables is set, else a dict with
    "coordinator" ("host:port"), "num_processes", "process_id",
    "timeout_s" and "heartbeat_timeout_s".

  Raises:
    ClusterError: a variable missing or malformed (one line).
  """
  environ = os.environ if environ is None else environ
  names = (ADDRESSES_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
  if not any(environ.get(n) for n in names):
    return None
  missing = [n for n in names if not environ.get(n)]
  if missing:
    raise ClusterError(
        f"a multi-process JAX run needs {', '.join(names)}; missing"
        f" {', '.join(missing)}"
    )
  num = _int_env(NUM_PROCESSES_ENV, environ, 1)
  pid = _int_env(PROCESS_ID_ENV, environ, 0)
  if pid >= num:
    raise ClusterError(
        f"{PROCESS_ID_ENV}={pid} is not below" f" {NUM_PROCESSES_ENV}={num}"
    )
  addresses = [a.strip() for a in environ[ADDRESSES_ENV].split(",")]
  if len(addresses) > 1 and len(addresses) != num:
    raise ClusterError(
        f"{ADDRESSES_ENV} names {len(addresses)} processes but"
        f" {NUM_PROCESSES_ENV}={num}"
    )
  for address in addresses:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ClusterError(
          f"{ADDRESSES_ENV}: {address!r} is not host:port (e.g."
          " 10.0.0.1:1234)"
      )
  timeout = DEFAULT_TIMEOUT_S
  if environ.get(TIMEOUT_ENV):
    timeout = _int_env(TIMEOUT_ENV, environ, 1)
  heartbeat = DEFAULT_HEARTBEAT_TIMEOUT_S
  if environ.get(HEARTBEAT_TIMEOUT_ENV):
    heartbeat = _int_env(HEARTBEAT_TIMEOUT_ENV, environ, 1)
  return {
      "coordinator": addresses[0],
      "num_processes": num,
      "process_id": pid,
      "timeout_s": timeout,
      "heartbeat_timeout_s": heartbeat,
  }


def _wait_for_coordinator(address, timeout_s):
  """Returns once address accepts TCP connections; else ClusterError."""
  host, _, port = address.rpartition(":")
  deadline = time.time() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.time() >= deadline:
        raise ClusterError(
            f"no JAX coordinator (process 0) answers at {address} within"
            f" {timeout_s} s: {e.strerror or e}"
        ) from None
      time.sleep(0.5)


def join_cluster_from_env(environ=None):
  """Joins the JAX cluster of the environment (once); returns it or None.

  Must run before any JAX computation of this process.

  Args:
    environ: a mapping like os.environ (default os.environ).

  Returns:
    The dict of `cluster_from_env`, or None without a cluster.

  Raises:
    ClusterError: bad settings, no coordinator answering within the
      timeout, or jax.distributed.initialize failing (one line each).
  """
  cluster = cluster_from_env(environ)
  if cluster is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return cluster
  if cluster["process_id"] > 0:
    # JAX aborts the process (no exception) when it cannot reach the
    # coordinator; a wrong address is reported here instead.
    _wait_for_coordinator(cluster["coordinator"], cluster["timeout_s"])
  try:
    jax.distributed.initialize(
        coordinator_address=cluster["coordinator"],
        num_processes=cluster["num_processes"],
        process_id=cluster["process_id"],
        initialization_timeout=cluster["timeout_s"],
        heartbeat_timeout_seconds=cluster["heartbeat_timeout_s"],
    )
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ClusterError(
        f"cannot join the JAX cluster at {cluster['coordinator']} as process"
        f" {cluster['process_id']} of {cluster['num_processes']}: {first}"
    ) from None
  return cluster


def process_count():
  """The number of JAX processes (1 unless a cluster was joined)."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_count() if jax.distributed.is_initialized() else 1


def lost_process_error(error):
  """The one-line ClusterError for a collective failed by a lost process.

  Args:
    error: an exception raised by a JAX computation (e.g. out of fit).

  Returns:
    A ClusterError naming this process and the first line of `error` when
    several JAX processes run and `error` is a collective or coordination
    failure (`LOST_PROCESS_MARKERS`); else None.
  """
  if "jax" not in sys.modules:  # TensorFlow runs never join a JAX cluster
    return None
  import jax  # pylint: disable=g-import-not-at-top

  if not jax.distributed.is_initialized():
    return None
  text = str(error)
  if not any(marker in text for marker in LOST_PROCESS_MARKERS):
    return None
  first = (text.strip().splitlines() or [type(error).__name__])[0]
  return ClusterError(
      f"another process of the JAX cluster is gone (killed or crashed), so"
      f" process {jax.process_index()} of {jax.process_count()} stops too;"
      f" rerun all processes to resume from the last checkpoint: {first}"
  )


def exit_without_shutdown(status):
  """Flushes stdout and stderr and ends the process now with `status`.

  Skips `jax.distributed`'s shutdown at exit, which waits at a barrier for
  every process (a dead one never comes) and then aborts with a fatal log.
  After the flush, file descriptor 2 points to /dev/null: what JAX's own
  threads log in the last moments (e.g. the coordination service's closed
  socket, when process 0 died) does not follow the error line written
  before.

  Args:
    status: the exit status.
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
  except OSError:
    pass
  os._exit(status)  # pylint: disable=protected-access


def is_primary():
  """Whether this process writes the run directory (process 0, or alone)."""
  import keras  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "jax":
    return True
  import jax  # pylint: disable=g-import-not-at-top

  return not jax.distributed.is_initialized() or jax.process_index() == 0


@contextlib.contextmanager
def host_local_values(variables):
  """Inside, every variable sharded across processes holds its full value.

  Each such variable's value is gathered from all processes
  (`multihost_utils.process_allgather`) into a numpy array on every
  process, and put back on exit. Every process must enter with the same
  variables in the same order. Nothing happens on one process.

  Args:
    variables: Keras variables (duplicates are gathered once).

  Yields:
    None.
  """
  if process_count() == 1:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  saved = {}
  try:
    for variable in variables:
      value = getattr(variable, "_value", None)
      if (
          id(variable) in saved
          or not isinstance(value, jax.Array)
          or value.is_fully_addressable
          or value.is_fully_replicated
      ):
        continue
      saved[id(variable)] = (variable, value)
      variable._value = multihost_utils.process_allgather(value, tiled=True)  # pylint: disable=protected-access
    yield
  finally:
    for variable, value in saved.values():
      variable._value = value  # pylint: disable=protected-access


@contextlib.contextmanager
def without_distribution():
  """Inside, no keras.distribution is set (one process's local work).

  Process 0 writes checkpoints alone; Keras creates variables while it
  saves (a placeholder optimizer), and under a multi-process distribution
  each of them would wait for the other processes.

  Yields:
    None.
  """
  import keras  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "jax":
    yield
    return
  previous = keras.distribution.distribution()
  keras.distribution.set_distribution(None)
  try:
    yield
  finally:
    keras.distribution.set_distribution(previous)
