"""benchmarks/distribution.py --part=tf_network against independent counts.

The measurement (2 TF servers and a client, real processes on 127.0.0.1)
takes about a minute on a shared 2-core box and runs with
MOE_KERAS_SLOW_TESTS=1; the ss parsing and the bad options run always.
"""

import argparse
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import distribution  # pylint: disable=g-import-not-at-top,wrong-import-position

SLOW = os.environ.get("MOE_KERAS_SLOW_TESTS") == "1"
FLOAT32_BYTES = 4
SERVERS = 2  # E
# The routed rows that cross between the servers: a token's k assignments
# land on block 1 with probability q and its replica is server 0 or 1 with
# probability 1/2 each, so a row crosses with probability exactly 1/2 for
# any q (both replicas route alike). With T = 1024 and 2048 (k = 2) and 3
# steps per size, the slope's binomial noise is about 2.2% (sqrt(2048 p
# (1-p)) and sqrt(4096 p (1-p)) assignments over 1024 expected, / sqrt(3));
# measured slopes were 0.985 to 0.992 of the count (framing not resolved
# below that noise). 10% is about 4 sigma.
SLOPE_TOLERANCE = 0.10
# Per-step bytes at one T: the same routing noise (1.6% / sqrt(3)) on the
# token part, plus framing and control (3.3-3.6% of the weights' bytes):
# measured 0.996 to 1.008.
STEP_TOLERANCE = 0.05
# Client <-> server in the forward pass: x's half and the output's half,
# fixed sizes (measured 1.001 to 1.002: framing and control only).
CLIENT_TOLERANCE = 0.01
# Client <-> server in a training step: the same, plus the step's scalars
# (loss, metrics, the control of three partitions: about 11 kB to server 0
# and 2 kB to server 1 per step; measured 1.003 to 1.009).
TRAIN_CLIENT_TOLERANCE = 0.02

SS_SAMPLE = (
    "0      0      127.0.0.1:34344 127.0.0.1:37395"
    ' users:(("python",pid=11,fd=4))\n'
    "\t bbr wscale:10,10 rto:204 mss:35328 bytes_sent:1000 bytes_acked:1001"
    " segs_out:3\n"
    "0      0      127.0.0.1:37395 127.0.0.1:34344"
    ' users:(("python",pid=22,fd=5))\n'
    "\t bbr wscale:10,10 rto:208 bytes_received:1000 segs_out:1\n"
    "0      0      127.0.0.1:40000 127.0.0.1:37395"
    ' users:(("other",pid=33,fd=5))\n'
    "\t bbr bytes_acked:77 bytes_received:5\n"
)


def test_parse_ss_and_directed_bytes():
  sockets = distribution.parse_ss(SS_SAMPLE)
  assert [s["pid"] for s in sockets] == [11, 22, 33]
  assert [s["bytes_acked"] for s in sockets] == [1001, 0, 77]
  assert sockets[0]["peer_port"] == 37395
  sent = distribution.directed_bytes(sockets, {11: "client", 22: "server0"})
  # pid 33 is no role: left out.
  assert sent == {("client", "server0"): 1001, ("server0", "client"): 0}


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--tf_network_tokens=3", "--tf_network_tokens must be even"),
        ("--tf_network_tokens=abc", "--tf_network_tokens must be even"),
        ("--tf_network_steps=0", "--tf_network_steps must be >= 1, got 0"),
    ],
)
def test_bad_option_is_one_line(flag, message):
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "benchmarks", "distribution.py"),
          "--part=tf_network",
          flag,
      ],
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"distribution.py: error: {message}"), lines


def _slope(rows, sender, receiver):
  first, last = rows[0], rows[-1]
  key = f"{sender}->{receiver}"
  return (last["sent_per_step"][key] - first["sent_per_step"][key]) / (
      last["tokens"] - first["tokens"]
  )


@pytest.mark.skipif(not SLOW, reason="set MOE_KERAS_SLOW_TESTS=1")
def test_traffic_between_servers_and_client_matches_the_count():
  n, k, d, h = 8, 2, 256, 64
  args = argparse.Namespace(
      dim=d,
      hidden=h,
      num_experts=n,
      k=k,
      tf_network_tokens="1024,2048",
      tf_network_steps=3,
  )
  rows = distribution.tf_network_part(args)
  phases = distribution.by_phase(rows)
  assert [r["tokens"] for r in phases["forward"]] == [1024, 2048]
  forward = phases["forward"]
  # Each routed row crosses with probability (E-1)/E = 1/2; it carries d
  # values there and d back: per token k * 2d * (1/2) values, split evenly
  # between the two directions.
  per_token = k * 2 * d * FLOAT32_BYTES * (SERVERS - 1) / SERVERS
  both = _slope(forward, "server0", "server1") + _slope(
      forward, "server1", "server0"
  )
  assert abs(both / per_token - 1) < SLOPE_TOLERANCE, (both, per_token)
  # Replica 1 reads the replicated variables (two Dense(d), the gate's
  # W_g and W_noise [d, n]) from server 0 once per step.
  dense = (2 * (d * d + d) + 2 * d * n) * FLOAT32_BYTES
  for row in forward:
    got = distribution.link_bytes(row, "server0", "server1")
    want = per_token * row["tokens"] + dense
    assert abs(got / want - 1) < STEP_TOLERANCE, (row, want)
    for server in ("server0", "server1"):
      got = distribution.link_bytes(row, "client", server)
      want = row["tokens"] / SERVERS * 2 * d * FLOAT32_BYTES
      assert abs(got / want - 1) < CLIENT_TOLERANCE, (server, row, want)
  # Training step (`train_on_batch`, Keras's loss and Adam on server 0):
  # the routed rows cross forward and backward (twice the forward's count);
  # replica 1's output [T/2, d] goes to server 0 for the loss and its
  # gradient comes back (d values each way per token of replica 1); the
  # replicated weights go to server 1 and their gradients come back. No
  # expert block and no gradient crosses besides.
  train = phases["train"]
  assert [r["tokens"] for r in train] == [1024, 2048]
  loss_input = 2 * d * FLOAT32_BYTES * (SERVERS - 1) / SERVERS
  both = _slope(train, "server0", "server1") + _slope(
      train, "server1", "server0"
  )
  want_slope = 2 * per_token + loss_input
  assert abs(both / want_slope - 1) < SLOPE_TOLERANCE, (both, want_slope)
  for row in train:
    tokens = row["tokens"]
    got = distribution.link_bytes(row, "server0", "server1")
    want = want_slope * tokens + 2 * dense
    assert abs(got / want - 1) < STEP_TOLERANCE, (row, want)
    # The client splits the batch: x's half to each replica's server, y
    # whole to server 0 (the loss); only scalars come back.
    x_half = tokens / SERVERS * d * FLOAT32_BYTES
    y_all = tokens * d * FLOAT32_BYTES
    got = distribution.link_bytes(row, "client", "server0")
    assert abs(got / (x_half + y_all) - 1) < TRAIN_CLIENT_TOLERANCE, row
    got = distribution.link_bytes(row, "client", "server1")
    assert abs(got / x_half - 1) < TRAIN_CLIENT_TOLERANCE, row
