"""Bytes crossing devices per token, and the sharded layer's step overhead.

Part 1 (computed): for the paper's LM and MT configurations, the bytes one
token sends across devices through one MoE layer per training step, with a
fraction (E-1)/E crossing devices under uniform routing over E expert
devices. Flat MoE: each of the token's k assignments sends the d-dim input
to the expert's device and gets the d-dim output back (forward); the
backward pass sends the output gradient there and the input gradient back:
4 k d values. Hierarchical MoE (appendix B; k = k_primary * k_secondary):
"experts only" is the earlier placement (secondary gates in every replica,
each of the k expert assignments sent on its own, 4 k d); "this code" is
the paper's placement, each secondary MoE (gate and experts) on its
group's device: one row per selected group, carrying d inputs and its
primary gate there and d outputs back, and the same in the backward pass:
k_primary (4 d + 2) values. MACs per value moved (paper section 3): h for a
flat MoE; k_secondary h + b per hierarchical group row (b's gate MACs are
small next to the experts'; taken as 0 below).

Part 2 (measured): forward+backward step time of one SparseMoE layer, single
device vs experts in blocks on 8 logical CPU devices (`expert_devices`),
and of a small model on a batch:2,expert:4 mesh vs one device, TensorFlow.
The 8 "devices" share this machine's cores, so the numbers measure the
overhead of splitting and moving rows (no real network or parallelism).

Part 3 (measured, JAX, `--part=memory`): memory per worker. For W = 1, 2
and 4 (`--memory_workers`) it starts W real JAX processes on 127.0.0.1 (one
CPU device each, joined by `jax.distributed` through the KERAS_DISTRIBUTION_*
variables) that build, on the mesh `batch:1,expert:W` of
`make_distribution` (as `moe_keras.train` does), a Dense -> SparseMoE ->
Dense model whose experts hold almost all parameters, and run one Adam step
(which creates the optimizer state). Each process then reports what it
holds: the bytes of the addressable shards of every model and optimizer
variable, expert vs other, and its peak RSS. Expert bytes per worker must be
1/W of the total (else it fails). With `--memory_budget_mb` it also reports
for each W whether one worker's variables fit that budget.

Part 4 (measured, TF servers, `--part=tf_network`): bytes over the network
per step. It starts 2 `moe_keras.tf_server`s on free 127.0.0.1 ports
(`loopback_servers`) and a client process that builds Dense -> SparseMoE
-> Dense on `batch:1,expert:2` over them. For each T of
`--tf_network_tokens` and each phase (a `train_on_batch` step, then the
forward pass alone) the client runs one warm-up call and then reads the
bytes each TCP socket has sent (`ss -tinpH`, bytes_acked; sockets assigned
to client/server0/server1 by pid) before and after `--tf_network_steps`
calls. It prints per connection the measured bytes per step and per token
next to the BUILD.md formula's prediction, the per-token slope and fixed
part per direction (first to last T), and where the backward pass's ops
are placed.

Usage: python benchmarks/distribution.py [--repeats=5] [--tokens=4096]
       python benchmarks/distribution.py --part=memory [--memory_budget_mb=256]
       python benchmarks/distribution.py --part=tf_network --k=2 --num_experts=8
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NUM_DEVICES = 8
BYTES_PER_VALUE = 4  # float32 activations

# name, d, h, assignments per token (k), primary k for the paper placement
# (None = flat), expert devices assumed for the fraction that crosses.
PAPER_CONFIGS = (
    ("LM 8M-ops MoE-256 (flat, k=4)", 512, 1024, 4, None),
    ("LM 8M-ops MoE-4096-h (2x2)", 512, 1024, 4, 2),
    ("LM MoE-34M (h, 2x2)", 1024, 2048, 4, 2),
    ("LM MoE-143M (h, 2x2)", 1024, 8192, 4, 2),
    ("MT single pair MoE-32 (flat, k=4)", 512, 2048, 4, None),
    ("MT single pair 2048-h (2x2)", 512, 2048, 4, 2),
    ("MT multilingual (flat, k=2)", 512, 8192, 2, None),
)


def bytes_table(num_devices):
  """Bytes crossing devices per token per MoE layer per training step.

  Args:
    num_devices: E, expert devices (uniform routing: (E-1)/E crosses).

  Returns:
    rows of (name, d, h, k, bytes with experts-only placement, bytes with
    this code's placement, MACs per value moved by this code).
  """
  cross = (num_devices - 1) / num_devices
  rows = []
  for name, d, h, k, k_primary in PAPER_CONFIGS:
    experts_only = 4 * k * d * BYTES_PER_VALUE * cross
    if k_primary is None:
      here, macs = experts_only, h
    else:
      here = k_primary * (4 * d + 2) * BYTES_PER_VALUE * cross
      macs = (k // k_primary) * h
    rows.append((name, d, h, k, experts_only, here, macs))
  return rows


def print_bytes_table(num_devices):
  print(
      f"\nBytes crossing devices per token per MoE layer per training step"
      f" (float32, {num_devices} expert devices, uniform routing):\n"
  )
  print(
      "| config | d | h | k | bytes/token (experts-only placement) |"
      " bytes/token (this code) | fwd bytes/token (this code) | MACs per"
      " value moved |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, d, h, k, experts_only, here, macs in bytes_table(num_devices):
    print(
        f"| {name} | {d} | {h} | {k} | {experts_only:,.0f} | {here:,.0f} |"
        f" {here / 2:,.0f} | {macs} |"
    )


def setup_devices():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
  )
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def time_fn(fn, repeats):
  fn()  # trace and warm up
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1000.0


def layer_step_ms(devices, args, expert_devices, hierarchical=False):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import moe_keras.distribution  # pylint: disable=g-import-not-at-top,unused-import  # places expert_devices

  from moe_keras.layers import HierarchicalSparseMoE  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  del devices
  if hierarchical:  # groups of 4 experts, k = 2 * 2
    layer = HierarchicalSparseMoE(
        args.num_experts // 4,
        4,
        args.hidden,
        expert_devices=expert_devices,
        seed=0,
        track_metrics=False,
    )
  else:
    layer = SparseMoE(
        args.num_experts,
        args.k,
        args.hidden,
        gating="top_k",
        expert_devices=expert_devices,
        seed=0,
        track_metrics=False,
    )
  x = tf.constant(
      np.random.default_rng(0).normal(size=(args.tokens, args.dim)),
      tf.float32,
  )
  layer.build(x.shape)
  layer.w_gate.assign(np.random.default_rng(1).normal(size=layer.w_gate.shape))
  weights = [v.value for v in layer.trainable_weights]

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(x, training=True) ** 2)
      if layer.losses:
        loss += tf.add_n(layer.losses)
    return tape.gradient(loss, weights)

  return time_fn(
      lambda: [g.numpy() for g in step() if g is not None], args.repeats
  )


def dense_moe_dense(dist, shape, make_moe):
  """Dense -> MoE -> Dense on `dist`, compiled (Adam 1e-3, MSE), seed 0.

  Args:
    dist: the distribution (`make_distribution`'s); the model is built and
      compiled in its scope and wrapped by it.
    shape: one example's shape, (..., d).
    make_moe: makes the MoE layer (d in, d out); called in the scope,
      after the seed is set (its seed generator is a variable).

  Returns:
    The wrapped, compiled model.
  """
  import keras  # pylint: disable=g-import-not-at-top

  dim = shape[-1]
  with dist.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    hidden = keras.layers.Dense(dim, activation="tanh")(inputs)
    outputs = keras.layers.Dense(dim)(make_moe()(hidden))
    model = dist.wrap_model(keras.Model(inputs, outputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
  return model


def model_step_ms(mesh_shape, args):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  seq = 32
  batch = args.tokens // seq
  dist = make_distribution(mesh_shape)
  model = dense_moe_dense(
      dist,
      (seq, args.dim),
      lambda: SparseMoE(
          args.num_experts, args.k, args.hidden, track_metrics=False
      ),
  )
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, seq, args.dim)).astype("float32")
  y = rng.normal(size=(batch, seq, args.dim)).astype("float32")
  return time_fn(lambda: model.train_on_batch(x, y), args.repeats)


# -- Part 3: memory per worker (JAX processes) ----------------------------

MEMORY_WORKERS = (1, 2, 4)
MEMORY_TIMEOUT_S = 600  # per W, all its processes
MEMORY_ROW = "MEMORY_ROW "  # a worker's stdout line: this prefix, then JSON
MEMORY_SEQ = 8  # tokens per sequence of the step's batch
BYTES_PER_MB = 2**20
# Variable names (last path component) of the experts' weights and of
# their optimizer slots ("adam/sparse_mo_e_expert_kernel_1_momentum").
EXPERT_NAMES = ("expert_kernel", "expert_bias")


def is_expert_variable(path):
  """Whether a model or optimizer variable path belongs to the experts."""
  name = path.rsplit("/", 1)[-1]
  return any(expert in name for expert in EXPERT_NAMES)


def held_bytes(variables):
  """{"expert": bytes, "other": bytes} this process holds of `variables`.

  Args:
    variables: Keras variables on the JAX backend (duplicates counted once).

  Returns:
    The sums of `shard.data.nbytes` over each value's addressable shards
    (the buffers on this process's devices), split by `is_expert_variable`.
  """
  held = {"expert": 0, "other": 0}
  seen = set()
  for variable in variables:
    if id(variable) in seen:
      continue
    seen.add(id(variable))
    nbytes = sum(s.data.nbytes for s in variable.value.addressable_shards)
    held["expert" if is_expert_variable(variable.path) else "other"] += nbytes
  return held


def memory_worker(args):
  """One process of a memory measurement: builds, steps once, reports.

  Joins the cluster of the KERAS_DISTRIBUTION_* variables (none with W=1)
  through `make_distribution`, builds the model on `batch:1,expert:W`,
  runs one Adam step on a fixed batch and prints one `MEMORY_ROW` line.

  Args:
    args: the parsed flags (memory_* sizes, memory_worker = W).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  workers = args.memory_worker
  dist = make_distribution(f"batch:1,expert:{workers}")
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() != workers:
    raise RuntimeError(
        f"{jax.process_count()} JAX processes joined, expected {workers}"
    )
  dim = args.memory_dim
  model = dense_moe_dense(
      dist,
      (MEMORY_SEQ, dim),
      lambda: SparseMoE(
          args.memory_experts,
          args.k,
          args.memory_hidden,
          use_bias=True,
          track_metrics=False,
      ),
  )
  with dist.scope():
    rng = np.random.default_rng(0)
    batch = max(1, args.memory_tokens // MEMORY_SEQ)
    x = rng.normal(size=(batch, MEMORY_SEQ, dim)).astype("float32")
    y = rng.normal(size=(batch, MEMORY_SEQ, dim)).astype("float32")
    loss = model.train_on_batch(x, y)
  params = held_bytes(model.weights)
  slots = held_bytes(model.optimizer.variables)
  row = {
      "workers": workers,
      "process": jax.process_index(),
      "expert_param": params["expert"],
      "expert_optimizer": slots["expert"],
      "other_param": params["other"],
      "other_optimizer": slots["other"],
      # Linux reports ru_maxrss in KiB.
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "loss": float(np.asarray(loss).reshape(-1)[0]),
  }
  print(MEMORY_ROW + json.dumps(row), flush=True)


def last_error_line(log):
  """The last line naming an Error in a process's log file (else its last).

  Args:
    log: the file the process wrote its stderr to (read from the start).

  Returns:
    That line, stripped ("no output" for an empty log).
  """
  log.seek(0)
  lines = [l for l in log.read().splitlines() if l.strip()]
  errors = [l for l in lines if "Error" in l] or lines or ["no output"]
  return errors[-1].strip()


def _memory_env(workers, pid, port):
  """The environment of process `pid` of a W-process measurement."""
  env = dict(os.environ)
  env.update(
      KERAS_BACKEND="jax",
      JAX_PLATFORMS="cpu",
      CUDA_VISIBLE_DEVICES="",
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  from moe_keras.distribution import jax_cluster  # pylint: disable=g-import-not-at-top

  cluster = {
      jax_cluster.ADDRESSES_ENV: f"127.0.0.1:{port}",
      jax_cluster.NUM_PROCESSES_ENV: str(workers),
      jax_cluster.PROCESS_ID_ENV: str(pid),
      jax_cluster.TIMEOUT_ENV: "120",
  }
  for name, value in cluster.items():
    if workers > 1:
      env[name] = value
    else:
      env.pop(name, None)
  return env


def _memory_flags(args):
  return [
      f"--memory_experts={args.memory_experts}",
      f"--memory_dim={args.memory_dim}",
      f"--memory_hidden={args.memory_hidden}",
      f"--memory_tokens={args.memory_tokens}",
      f"--k={args.k}",
  ]


def measure_memory(args, workers):
  """Runs W = `workers` processes; returns their rows, by process.

  Args:
    args: the parsed flags (memory_* sizes).
    workers: W, the number of JAX processes.

  Returns:
    The `memory_worker` rows (dicts) of processes 0 .. W-1.

  Raises:
    RuntimeError: a process failed or ran past MEMORY_TIMEOUT_S (one line
      naming it and its last output line).
  """
  from moe_keras.distribution import loopback_servers  # pylint: disable=g-import-not-at-top

  port = loopback_servers.free_ports(1)[0]
  procs = []
  for pid in range(workers):
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--part=memory_worker",
            f"--memory_worker={workers}",
            *_memory_flags(args),
        ],
        env=_memory_env(workers, pid, port),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    procs.append((proc, log))
  rows = []
  deadline = time.time() + MEMORY_TIMEOUT_S
  try:
    for pid, (proc, log) in enumerate(procs):
      try:
        stdout, _ = proc.communicate(timeout=max(1, deadline - time.time()))
      except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"memory measurement: process {pid} of {workers} ran past"
            f" {MEMORY_TIMEOUT_S} s"
        ) from None
      found = [
          json.loads(line[len(MEMORY_ROW) :])
          for line in stdout.splitlines()
          if line.startswith(MEMORY_ROW)
      ]
      if proc.returncode != 0 or len(found) != 1:
        raise RuntimeError(
            f"memory measurement: process {pid} of {workers} failed (status"
            f" {proc.returncode}): {last_error_line(log)}"
        )
      rows.append(found[0])
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  return rows


def check_memory_scaling(rows_by_workers):
  """Fails unless every process holds 1/W of the expert bytes.

  The total (summed over the processes of one measurement) must be the
  same for every W, and each of the W processes must hold total / W.

  Args:
    rows_by_workers: {W: the rows of `measure_memory(args, W)`}.

  Raises:
    ValueError: a process holding another share (one line naming it).
  """
  totals = {}
  for workers, rows in rows_by_workers.items():
    for key in ("expert_param", "expert_optimizer"):
      totals.setdefault(key, sum(r[key] for r in rows))
      total = totals[key]
      for row in rows:
        if row[key] * workers != total:
          raise ValueError(
              f"{key} bytes do not fall as 1/W: process {row['process']} of"
              f" W={workers} holds {row[key]:,}, expected {total:,} / {workers}"
          )


def print_memory_table(args, rows_by_workers):
  """Prints the measured bytes per process, and the budget's verdict."""
  n, d, h = args.memory_experts, args.memory_dim, args.memory_hidden
  print(
      f"\nMeasured memory per worker, JAX, W processes on 127.0.0.1 (one CPU"
      f" device each), mesh batch:1,expert:W, Dense -> SparseMoE(n={n},"
      f" d={d}, h={h}, k={args.k}, biases) -> Dense, after one Adam step"
      f" (float32; bytes of each variable's addressable shards):\n"
  )
  print(
      "| workers | process | expert param bytes | expert optimizer bytes |"
      " other param bytes | other optimizer bytes | peak RSS MB | loss |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for workers, rows in rows_by_workers.items():
    for r in rows:
      print(
          f"| {workers} | {r['process']} | {r['expert_param']:,} |"
          f" {r['expert_optimizer']:,} | {r['other_param']:,} |"
          f" {r['other_optimizer']:,} | {r['peak_rss_mb']:,.0f} |"
          f" {r['loss']:.6f} |"
      )
  if args.memory_budget_mb is None:
    return
  budget = args.memory_budget_mb * BYTES_PER_MB
  print(
      f"\nBudget {args.memory_budget_mb:g} MB per worker for its variables"
      " (parameters + Adam state, expert and other):\n"
  )
  print("| workers | largest worker's variable bytes | fits |")
  print("|---:|---:|---|")
  for workers, rows in rows_by_workers.items():
    held = max(
        r["expert_param"]
        + r["expert_optimizer"]
        + r["other_param"]
        + r["other_optimizer"]
        for r in rows
    )
    verdict = "yes, trained one step" if held <= budget else "no"
    print(f"| {workers} | {held:,} | {verdict} |")


def memory_part(args):
  """Part 3: measures, checks and prints the memory per worker."""
  try:
    workers_list = [int(w) for w in args.memory_workers.split(",")]
  except ValueError:
    workers_list = []
  if not workers_list or min(workers_list) < 1:
    raise ValueError(
        f"--memory_workers must be integers >= 1, got {args.memory_workers!r}"
    )
  rows_by_workers = {}
  for workers in workers_list:
    start = time.time()
    rows_by_workers[workers] = measure_memory(args, workers)
    print(
        f"W={workers}: {len(rows_by_workers[workers])} processes in"
        f" {time.time() - start:.0f} s",
        file=sys.stderr,
    )
  check_memory_scaling(rows_by_workers)
  print_memory_table(args, rows_by_workers)
  return rows_by_workers


# -- Part 4: bytes over the network per step (TF servers) ------------------

TF_NETWORK_TOKENS = (1024, 2048)  # T, then 2T: separates per-token traffic
TF_NETWORK_STEPS = 3  # measured training steps per size
TF_NETWORK_TIMEOUT_S = 600  # the client, all sizes
TF_NETWORK_ROW = "TF_NETWORK_ROW "  # a client's stdout line: prefix, JSON
TF_NETWORK_PLACEMENT = "TF_NETWORK_PLACEMENT "  # gradient ops by device
TF_NETWORK_MESH = "batch:1,expert:2"
TF_NETWORK_SERVERS = 2  # E: one expert block per server
TF_NETWORK_ROLES = ("client", "server0", "server1")
# The connections of the table: (name, endpoint a, endpoint b).
TF_NETWORK_LINKS = (
    ("client <-> server0", "client", "server0"),
    ("client <-> server1", "client", "server1"),
    ("server0 <-> server1", "server0", "server1"),
)
_SS_PID = re.compile(r"pid=(\d+)")
_SS_COUNTER = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


def parse_ss(text):
  """The TCP sockets of `ss -tinpH state established`'s output.

  Args:
    text: the output (one line per socket, then its indented info line).

  Returns:
    A list of dicts: local and peer "host:port", local_port, peer_port,
    pid (the owning process's, None when ss shows none) and bytes_acked
    (bytes this end sent that the peer acknowledged; 0 when ss omits it).
  """
  sockets = []
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace():  # a socket: Recv-Q Send-Q local peer users
      fields = line.split()
      local, peer = fields[2], fields[3]
      pid = _SS_PID.search(line)
      sockets.append(
          {
              "local": local,
              "peer": peer,
              "local_port": int(local.rsplit(":", 1)[1]),
              "peer_port": int(peer.rsplit(":", 1)[1]),
              "pid": int(pid.group(1)) if pid else None,
              "bytes_acked": 0,
          }
      )
    elif sockets:
      counters = dict(_SS_COUNTER.findall(line))
      sockets[-1]["bytes_acked"] = int(counters.get("bytes_acked", 0))
  return sockets


def directed_bytes(sockets, roles):
  """Bytes sent between processes, by direction.

  Args:
    sockets: `parse_ss` rows (both ends of a loopback connection appear).
    roles: {pid: name} of the processes of interest.

  Returns:
    {(sender name, receiver name): bytes}, summed over the connections
    whose both ends belong to `roles`. Each end counts what it sent
    (bytes_acked), so each connection is counted once per direction.
  """
  port_owner = {s["local_port"]: s["pid"] for s in sockets if s["pid"] in roles}
  sent = {}
  for s in sockets:
    receiver = port_owner.get(s["peer_port"])
    if s["pid"] not in roles or receiver not in roles:
      continue
    key = (roles[s["pid"]], roles[receiver])
    sent[key] = sent.get(key, 0) + s["bytes_acked"]
  return sent


def snapshot_bytes(roles):
  """`directed_bytes` of the established TCP sockets now (runs ss).

  Raises:
    RuntimeError: ss is missing or fails (one line).
  """
  try:
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(f"cannot run ss (iproute2): {e}") from None
  return directed_bytes(parse_ss(out), roles)


def dense_values(d, n):
  """Values of the variables replicated from server 0 (all but experts).

  Dense(d) in, the gate's W_g and W_noise [d, n], Dense(d) out.
  """
  return 2 * (d * d + d) + 2 * d * n


def predicted_bytes(tokens, d, n, k, phase):
  """The BUILD.md formula's bytes per step per connection, with terms.

  Args:
    tokens: T, tokens in the step's batch (T/2 per replica).
    d: model dim (the MoE's input and output, and the model's output).
    n: experts (for the gate's weights).
    k: experts per token.
    phase: "train" (`train_on_batch`: forward, backward, Adam; the step's
      loss on server 0) or "forward" (the forward pass alone,
      training=True, its sum on the client).

  Returns:
    {link name: (bytes, terms as text)} for TF_NETWORK_LINKS.
  """
  s = BYTES_PER_VALUE
  cross = (TF_NETWORK_SERVERS - 1) / TF_NETWORK_SERVERS
  passes = 2 if phase == "train" else 1  # the backward repeats the rows
  tokens_bytes = passes * 2 * k * d * s * cross * tokens
  dense = passes * dense_values(d, n) * s  # weights there (gradients back)
  half = tokens / TF_NETWORK_SERVERS
  servers = (
      f"tokens {passes}·2·k·d·s·(E−1)/E·T = {tokens_bytes:,.0f}"
      f" + dense {passes}·\\|θ_dense\\|·s = {dense:,}"
  )
  if phase == "train":
    # The batch is split on the client: each replica's x half goes to its
    # server; y goes whole to server 0, where the loss is. Replica 1's
    # output goes to server 0 for the loss and its gradient comes back.
    outputs = 2 * d * s * cross * tokens
    return {
        "client <-> server0": (
            half * d * s + tokens * d * s,
            "x half, y: T/2·d·s + T·d·s",
        ),
        "client <-> server1": (half * d * s, "x half: T/2·d·s"),
        "server0 <-> server1": (
            tokens_bytes + outputs + dense,
            f"{servers} + loss input 2·d·s·(E−1)/E·T = {outputs:,.0f}",
        ),
    }
  # The forward: x halves to the replicas, their outputs back.
  client, client_terms = half * 2 * d * s, "x half, output: T/2·2·d·s"
  return {
      "client <-> server0": (client, client_terms),
      "client <-> server1": (client, client_terms),
      "server0 <-> server1": (tokens_bytes + dense, servers),
  }


def _measured_steps(fn, roles, steps):
  """Bytes each process sent to each other per call of `fn`, and seconds.

  Args:
    fn: one step (already warmed up).
    roles: {pid: name}, `snapshot_bytes`'s.
    steps: how many calls to average over.

  Returns:
    ({"a->b": bytes per step}, seconds per step, fn's last result).
  """
  before = snapshot_bytes(roles)
  start = time.perf_counter()
  for _ in range(steps):
    result = fn()
  seconds = (time.perf_counter() - start) / steps
  after = snapshot_bytes(roles)
  sent = {
      f"{a}->{b}": (after.get((a, b), 0) - before.get((a, b), 0)) / steps
      for a in TF_NETWORK_ROLES
      for b in TF_NETWORK_ROLES
      if a != b
  }
  return sent, seconds, result


def tf_network_client(args):
  """The client of a network measurement: builds, warms up, steps, reports.

  Connects to the servers of --tf_network_servers on TF_NETWORK_MESH,
  builds Dense -> SparseMoE (noisy top-k, dropless) -> Dense, and for
  each T of --tf_network_tokens and each phase (a training step, then the
  forward pass alone) runs one warm-up call (tracing and registering the
  functions on the servers), snapshots the bytes per TCP connection
  (`snapshot_bytes`), runs --tf_network_steps calls, snapshots again and
  prints one TF_NETWORK_ROW line.

  Args:
    args: the parsed flags.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  pids = [int(p) for p in args.tf_network_pids.split(",")]
  roles = {os.getpid(): "client"}
  roles.update({pid: f"server{i}" for i, pid in enumerate(pids)})
  dist = make_distribution(TF_NETWORK_MESH, tf_servers=args.tf_network_servers)
  d = args.dim
  model = dense_moe_dense(
      dist,
      (d,),
      lambda: SparseMoE(
          args.num_experts, args.k, args.hidden, track_metrics=False, seed=0
      ),
  )

  @tf.function
  def forward(x):
    return tf.reduce_sum(model(x, training=True))

  rng = np.random.default_rng(0)
  for tokens in parse_tokens(args.tf_network_tokens):
    x = rng.normal(size=(tokens, d)).astype("float32")
    y = rng.normal(size=(tokens, d)).astype("float32")
    phases = (
        ("train", lambda: model.train_on_batch(x, y)),
        ("forward", lambda: forward(x).numpy()),
    )
    for phase, fn in phases:
      with dist.scope():
        fn()  # warm-up: traces, sends the graphs to the servers
        sent, seconds, result = _measured_steps(
            fn, roles, args.tf_network_steps
        )
      row = {
          "tokens": tokens,
          "phase": phase,
          "steps": args.tf_network_steps,
          "step_s": seconds,
          "sent_per_step": sent,
          "result": float(np.asarray(result).reshape(-1)[0]),
      }
      print(TF_NETWORK_ROW + json.dumps(row), flush=True)
  print(
      TF_NETWORK_PLACEMENT
      + json.dumps(gradient_op_devices(model, x, tf, dist)),
      flush=True,
  )


def gradient_op_devices(model, x, tf, dist):
  """Where the ops of a GradientTape step's backward pass are placed.

  Traces loss = mean((model(x) - x)^2) and its gradients in a tf.function
  and counts the graph's ops whose names contain "gradient" (those
  GradientTape added) by requested device.

  Args:
    model: the wrapped model.
    x: a batch.
    tf: the tensorflow module.
    dist: the distribution (its scope is entered).

  Returns:
    {"task I" or "none (the client's default device)": op count}.
  """

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(x, training=True) - x))
    return tape.gradient(loss, [v.value for v in model.trainable_weights])

  with dist.scope():
    graph = step.get_concrete_function(tf.constant(x)).graph
  counts = {}
  for op in graph.get_operations():
    if "gradient" not in op.name.lower():
      continue
    task = re.search(r"/task:(\d+)/", op.device)
    where = (
        f"task {task.group(1)}"
        if task
        else "none (the client's default device)"
    )
    counts[where] = counts.get(where, 0) + 1
  return counts


def parse_tokens(text):
  """The token counts of --tf_network_tokens ("1024,2048").

  Raises:
    ValueError: not positive even integers (one line).
  """
  try:
    tokens = [int(t) for t in text.split(",")]
  except ValueError:
    tokens = []
  if not tokens or any(t < 2 or t % 2 for t in tokens):
    raise ValueError(
        f"--tf_network_tokens must be even integers >= 2 (each replica gets"
        f" half), got {text!r}"
    )
  return tokens


def measure_tf_network(args):
  """Starts 2 TF servers and the client; returns the client's rows.

  Args:
    args: the parsed flags (dim, hidden, num_experts, k, tf_network_*).

  Returns:
    The `tf_network_client` rows (dicts), one per token count.

  Raises:
    RuntimeError: ss missing, the client failing or running past
      TF_NETWORK_TIMEOUT_S (one line).
    ValueError: a bad option (one line).
  """
  parse_tokens(args.tf_network_tokens)
  if args.tf_network_steps < 1:
    raise ValueError(
        f"--tf_network_steps must be >= 1, got {args.tf_network_steps}"
    )
  if shutil.which("ss") is None:
    raise RuntimeError("ss (iproute2) is not installed; cannot count bytes")
  from moe_keras.distribution import loopback_servers  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
  env.pop("TF_CONFIG", None)
  env["PYTHONPATH"] = REPO
  servers = loopback_servers.LoopbackServers(
      count=TF_NETWORK_SERVERS, env=env, cwd=REPO
  )
  log = tempfile.TemporaryFile("w+")
  try:
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--part=tf_network_client",
            f"--tf_network_servers={servers.spec}",
            f"--tf_network_pids={','.join(str(p.pid) for p in servers.procs)}",
            f"--tf_network_tokens={args.tf_network_tokens}",
            f"--tf_network_steps={args.tf_network_steps}",
            f"--dim={args.dim}",
            f"--hidden={args.hidden}",
            f"--num_experts={args.num_experts}",
            f"--k={args.k}",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
      stdout, _ = proc.communicate(timeout=TF_NETWORK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      raise RuntimeError(
          f"tf_network: the client ran past {TF_NETWORK_TIMEOUT_S} s"
      ) from None
    rows = [
        json.loads(line[len(TF_NETWORK_ROW) :])
        for line in stdout.splitlines()
        if line.startswith(TF_NETWORK_ROW)
    ]
    if proc.returncode != 0 or not rows:
      raise RuntimeError(
          f"tf_network: the client failed (status {proc.returncode}):"
          f" {last_error_line(log)}"
      )
    for line in stdout.splitlines():
      if line.startswith(TF_NETWORK_PLACEMENT):
        placement = json.loads(line[len(TF_NETWORK_PLACEMENT) :])
        for row in rows:
          row["gradient_ops"] = placement
    return rows
  finally:
    log.close()
    servers.stop()


def link_bytes(row, a, b):
  """Bytes per step both ways between processes `a` and `b` of a row."""
  sent = row["sent_per_step"]
  return sent[f"{a}->{b}"] + sent[f"{b}->{a}"]


def per_token_slope(rows, a, b):
  """Bytes per extra token between `a` and `b`: first to last token count.

  Args:
    rows: one phase's rows, by increasing T.
    a: one process ("client", "server0", "server1").
    b: the other.

  Returns:
    The difference of their bytes per step over the difference of T: the
    fixed part of a step (weights, gradients, control) cancels.
  """
  first, last = rows[0], rows[-1]
  return (link_bytes(last, a, b) - link_bytes(first, a, b)) / (
      last["tokens"] - first["tokens"]
  )


def by_phase(rows):
  """{phase: its rows in order} of the client's rows."""
  phases = {}
  for row in rows:
    phases.setdefault(row["phase"], []).append(row)
  return phases


def print_tf_network_table(args, rows):
  """Prints measured vs predicted bytes per step per connection."""
  d, n, k = args.dim, args.num_experts, args.k
  print(
      f"\nMeasured bytes per step over TCP (ss bytes_acked, both"
      f" directions), TensorFlow, 2 TF servers on 127.0.0.1 (one CPU each),"
      f" client on {TF_NETWORK_MESH}, Dense -> SparseMoE(n={n}, k={k},"
      f" d={d}, h={args.hidden}, noisy top-k, dropless) -> Dense, float32;"
      f" train: `train_on_batch` (Adam), forward: `model(x, training=True)`;"
      f" mean of {rows[0]['steps']} steps after a warm-up step:\n"
  )
  print(
      "| phase | T | connection | measured bytes/step | measured bytes/token"
      " | predicted bytes/step | predicted terms | measured/predicted |"
  )
  print("|---|---:|---|---:|---:|---:|---|---:|")
  for row in rows:
    predicted = predicted_bytes(row["tokens"], d, n, k, row["phase"])
    for name, a, b in TF_NETWORK_LINKS:
      got = link_bytes(row, a, b)
      want, terms = predicted[name]
      print(
          f"| {row['phase']} | {row['tokens']} | {name} | {got:,.0f} |"
          f" {got / row['tokens']:,.1f} | {want:,.0f} | {terms} |"
          f" {got / want:.3f} |"
      )
  ops = rows[-1].get("gradient_ops", {})
  print(
      "\nOps a GradientTape step adds for the backward pass, by requested"
      f" device: {', '.join(f'{w}: {c}' for w, c in sorted(ops.items()))}"
  )
  phases = by_phase(rows)
  if len(phases["train"]) < 2:
    return
  print(
      "\nPer-token part (bytes per extra token from the first T to the last)"
      " by direction, and the fixed part (bytes/step at the first T minus"
      " slope x T):\n"
  )
  print(
      "| phase | from -> to | bytes/token (slope) | values of d per token |"
      " fixed bytes/step |"
  )
  print("|---|---|---:|---:|---:|")
  for phase, phase_rows in phases.items():
    first, last = phase_rows[0], phase_rows[-1]
    for key in first["sent_per_step"]:
      slope = (last["sent_per_step"][key] - first["sent_per_step"][key]) / (
          last["tokens"] - first["tokens"]
      )
      fixed = first["sent_per_step"][key] - slope * first["tokens"]
      print(
          f"| {phase} | {key} | {slope:,.1f} |"
          f" {slope / (d * BYTES_PER_VALUE):.2f} | {fixed:,.0f} |"
      )


def tf_network_part(args):
  """Part 4: measures and prints the bytes per step per connection."""
  rows = measure_tf_network(args)
  print_tf_network_table(args, rows)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--num_experts", type=int, default=32)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--skip_measure", action="store_true")
  parser.add_argument(
      "--skip_model", action="store_true", help="layers only, no model steps"
  )
  parser.add_argument(
      "--part",
      choices=(
          "steps",
          "memory",
          "memory_worker",
          "tf_network",
          "tf_network_client",
      ),
      default="steps",
      help="steps: parts 1 and 2 (bytes per token, step times, TF);"
      " memory: part 3 (memory per JAX worker); memory_worker: one of its"
      " processes (internal); tf_network: part 4 (bytes per step between"
      " 2 TF servers and the client); tf_network_client: its client"
      " (internal)",
  )
  parser.add_argument(
      "--memory_workers",
      default=",".join(map(str, MEMORY_WORKERS)),
      help="memory: the numbers of JAX processes W, comma-separated",
  )
  parser.add_argument(
      "--memory_experts", type=int, default=64, help="memory: n experts"
  )
  parser.add_argument(
      "--memory_dim", type=int, default=256, help="memory: model dim d"
  )
  parser.add_argument(
      "--memory_hidden", type=int, default=1024, help="memory: expert h"
  )
  parser.add_argument(
      "--memory_tokens",
      type=int,
      default=256,
      help="memory: tokens in the step's batch (k is --k)",
  )
  parser.add_argument(
      "--memory_budget_mb",
      type=float,
      default=None,
      help="report whether one worker's variables fit this many MB",
  )
  parser.add_argument(
      "--memory_worker",
      type=int,
      default=None,
      help="memory_worker: W of the measurement it belongs to (internal)",
  )
  parser.add_argument(
      "--tf_network_tokens",
      default=",".join(map(str, TF_NETWORK_TOKENS)),
      help="tf_network: tokens per step T, comma-separated (first to last"
      " gives the per-token slope)",
  )
  parser.add_argument(
      "--tf_network_steps",
      type=int,
      default=TF_NETWORK_STEPS,
      help="tf_network: measured steps per T",
  )
  parser.add_argument(
      "--tf_network_servers", default=None, help="tf_network_client (internal)"
  )
  parser.add_argument(
      "--tf_network_pids", default=None, help="tf_network_client (internal)"
  )
  args = parser.parse_args()
  # Internal parts run as they are; the others end a failure with one line.
  parts = {
      "tf_network_client": (tf_network_client, False),
      "tf_network": (tf_network_part, True),
      "memory_worker": (memory_worker, False),
      "memory": (memory_part, True),
  }
  if args.part in parts:
    run, one_line = parts[args.part]
    try:
      run(args)
    except (RuntimeError, ValueError) as e:
      if not one_line:
        raise
      sys.exit(f"distribution.py: error: {e}")
    return

  print_bytes_table(NUM_DEVICES)
  if args.skip_measure:
    return
  devices = setup_devices()
  print(
      f"\nMeasured step time (forward + backward), TensorFlow, 8 logical CPU"
      f" devices on {os.cpu_count()} cores, tokens={args.tokens},"
      f" d={args.dim}, h={args.hidden}, n={args.num_experts}, k={args.k},"
      f" median of {args.repeats}:\n"
  )
  print("| what | single device ms | sharded ms | overhead |")
  print("|---|---:|---:|---:|")
  single = layer_step_ms(devices, args, None)
  for blocks in (2, 8):
    sharded = layer_step_ms(devices, args, devices[:blocks])
    print(
        f"| SparseMoE layer, experts on {blocks} devices | {single:.1f} |"
        f" {sharded:.1f} | {sharded / single - 1:+.0%} |"
    )
  single = layer_step_ms(devices, args, None, hierarchical=True)
  for blocks in (2, 8):
    sharded = layer_step_ms(devices, args, devices[:blocks], hierarchical=True)
    print(
        f"| HierarchicalSparseMoE layer ({args.num_experts // 4} groups of 4,"
        f" k=2x2), groups on {blocks} devices | {single:.1f} |"
        f" {sharded:.1f} | {sharded / single - 1:+.0%} |"
    )
  if args.skip_model:
    return
  single = model_step_ms("batch:1,expert:1", args)
  for mesh_shape in ("batch:1,expert:8", "batch:2,expert:4"):
    sharded = model_step_ms(mesh_shape, args)
    print(
        f"| Dense+MoE+Dense model, Adam step, mesh {mesh_shape} |"
        f" {single:.1f} | {sharded:.1f} | {sharded / single - 1:+.0%} |"
    )


if __name__ == "__main__":
  main()
