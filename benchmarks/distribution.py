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

Usage: python benchmarks/distribution.py [--repeats=5] [--tokens=4096]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def model_step_ms(mesh_shape, args):
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top

  seq = 32
  batch = args.tokens // seq
  dist = make_distribution(mesh_shape)
  with dist.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((seq, args.dim))
    hidden = keras.layers.Dense(args.dim, activation="tanh")(inputs)
    hidden = SparseMoE(
        args.num_experts, args.k, args.hidden, track_metrics=False
    )(hidden)
    outputs = keras.layers.Dense(args.dim)(hidden)
    model = dist.wrap_model(keras.Model(inputs, outputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, seq, args.dim)).astype("float32")
  y = rng.normal(size=(batch, seq, args.dim)).astype("float32")
  return time_fn(lambda: model.train_on_batch(x, y), args.repeats)


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
  args = parser.parse_args()

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
