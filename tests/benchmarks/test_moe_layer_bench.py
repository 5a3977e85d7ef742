"""benchmarks/moe_layer.py: its bounds against hand-derived values, its run."""

import os
import re
import sys

import numpy as np
import pytest

import bench_testlib

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import moe_layer  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_traffic_bound_ratio_is_dense_time_over_three_weight_passes():
  # 2 experts of a [4, 8] and an [8, 4] float32 kernel: 2 * 2 * 32 * 4 B =
  # 512 B; three passes at 1 GB/s take 1536 ns = 1.536e-3 ms.
  ratio = moe_layer.traffic_bound_ratio(
      dense_ms=100.0, num_experts=2, dim=4, hidden=8, read_gbs=1.0
  )
  np.testing.assert_allclose(ratio, 100.0 / 1.536e-3, rtol=1e-12)


def test_experts_alone_layer_equals_numpy():
  import keras  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 5)).astype(np.float32)
  layer = moe_layer._make_experts_alone(num_experts=2, k=2, hidden=3)
  layer.build(x.shape)
  w1 = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(2)]
  w2 = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)]
  for variable, value in zip(layer.w1 + layer.w2, w1 + w2):
    variable.assign(value)
  y = keras.ops.convert_to_numpy(layer(x))
  # Rows [x; x] split in two: expert 0 gets the first copy of every token,
  # expert 1 the second; the k = 2 copies of a token are summed.
  expected = sum(np.maximum(x @ w1[e], 0.0) @ w2[e] for e in range(2))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_gate_floor_layer_equals_numpy():
  import keras  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 5)).astype(np.float32)
  layer = moe_layer._make_gate_floor(num_experts=7, k=2)
  layer.build(x.shape)
  w_gate = rng.standard_normal((5, 7)).astype(np.float32)
  layer.w_gate.assign(w_gate)
  layer.w_noise.assign(np.zeros((5, 7), np.float32))  # noise * 0: no noise
  y = keras.ops.convert_to_numpy(layer(x))
  top = -np.sort(-(x.astype(np.float64) @ w_gate), axis=-1)[:, :3]
  np.testing.assert_allclose(
      y, x * top.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-5
  )
  # With noise the matmul x W_noise is on the gradient path.
  layer.w_noise.assign(rng.standard_normal((5, 7)).astype(np.float32))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer(tf.constant(x)))
  grads = tape.gradient(loss, layer.trainable_variables)
  assert len(grads) == 2 and all(np.any(g.numpy() != 0) for g in grads)


def _run_benchmark(*flags):
  return bench_testlib.run_benchmark("moe_layer.py", *flags)


# One row of 64 tokens on 8 small experts, one timed step.
TINY_ROW = (
    "--tokens=64",
    "--num_experts=8",
    "--rounds=1",
    "--repeats=1",
    "--dim=16",
    "--hidden=32",
)


def test_table_row_has_every_column():
  result = _run_benchmark(*TINY_ROW, "--bandwidth_mb=8")
  assert result.returncode == 0, result.stderr
  assert re.search(
      r"read bandwidth [\d.]+ GB/s \(8 MiB buffer\)", result.stdout
  )
  row = re.search(r"^\| 64 \| 8 \| 32 \|(.*)\|$", result.stdout, flags=re.M)
  assert row, result.stdout
  cells = [c.strip() for c in row.group(1).split("|")]
  # moe ms, dense ms, ratio, target, experts alone, + gate floor, traffic
  # bound, GFLOP/s, moe MB, dense MB, bound MB.
  assert len(cells) == 11, cells
  assert cells[3] == ">= 0.45"
  alone, floor, traffic = (float(c) for c in cells[4:7])
  assert alone > 0.0 and traffic > 0.0
  assert 0.0 < floor < alone  # the gate floor adds a step to the experts'
  assert "| + gate floor |" in result.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ("--expert_variables=stacked", "--weight_gradients=discard"),
        ("--expert_variables=per_expert",),
    ],
)
def test_layouts_and_what_if_run_and_say_so(flags):
  result = _run_benchmark(
      *TINY_ROW, "--bandwidth_mb=0", "--noexperts_alone", *flags
  )
  assert result.returncode == 0, result.stderr
  for flag in flags:
    assert f"{flag[2:]}," in result.stdout, result.stdout
  assert re.search(r"^\| 64 \| 8 \| 32 \|", result.stdout, flags=re.M)


@pytest.mark.parametrize(
    "flag", ["--capacity_factor=2.0", "--expert_variables=per_expert"]
)
def test_weight_gradients_what_if_needs_stacked_dropless(flag):
  result = _run_benchmark(
      "--tokens=64", "--num_experts=8", flag, "--weight_gradients=discard"
  )
  assert result.returncode != 0
  assert (
      "--weight_gradients=discard replaces TensorFlow's dropless grouped"
      " gradient of stacked experts"
  ) in result.stderr, result.stderr


def test_hierarchical_layer_runs_without_the_flat_gate_floor():
  result = _run_benchmark(
      *TINY_ROW, "--bandwidth_mb=0", "--hierarchical_groups=2"
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
      "HierarchicalSparseMoE (2 groups, k_primary=2, k_secondary=2)"
  ), result.stdout
  row = re.search(r"^\| 64 \| 8 \| 32 \|(.*)\|$", result.stdout, flags=re.M)
  assert row, result.stdout
  cells = [c.strip() for c in row.group(1).split("|")]
  assert len(cells) == 11, cells
  assert float(cells[2].split("-")[0]) > 0.0 and float(cells[4]) > 0.0
  assert cells[5] == ""  # the gate floor is the flat gate's


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ("--hierarchical_groups=3",),
            "--hierarchical_groups=3 must divide the 8 experts into groups of"
            " at least k / 2 = 2",
        ),
        (
            ("--hierarchical_groups=2", "--k=3", "--noexperts_alone"),
            "--hierarchical_groups needs an even --k",
        ),
    ],
)
def test_hierarchical_groups_errors_are_one_line(flags, message):
  result = _run_benchmark("--tokens=64", "--num_experts=8", *flags)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr


def test_unequal_expert_shares_are_a_one_line_error():
  result = _run_benchmark("--tokens=64", "--num_experts=7")
  assert result.returncode != 0
  assert (
      "--experts_alone needs tokens*k = 256 divisible by the 7 experts"
      in result.stderr
  ), result.stderr


def test_profile_lines_list_the_moes_largest_op_types_then_the_rest():
  moe = {"MatMul": (10.0, 8), "InplaceUpdate": (3.0, 4), "Relu": (1.0, 2)}
  alone = {"MatMul": (9.0, 8), "Relu": (1.5, 2), "AddN": (0.5, 1)}
  assert moe_layer.profile_lines(moe, alone, top=2) == [
      "| op type | MoE ms/step | MoE ops/step | experts alone ms/step |"
      " experts alone ops/step |",
      "|---|---:|---:|---:|---:|",
      "| MatMul | 10.0 | 8 | 9.0 | 8 |",
      "| InplaceUpdate | 3.0 | 4 | 0.0 | 0 |",
      # Relu (1.0 + 1.5) and AddN, which only the experts alone ran.
      "| other (2 op types) | 1.0 | 2 | 2.0 | 3 |",
      "| all ops | 14.0 | 14 | 11.0 | 11 |",
  ]
  assert moe_layer.profile_lines(moe, None, top=5)[-2:] == [
      "| Relu | 1.0 | 2 |",
      "| all ops | 14.0 | 14 |",
  ]


def test_profile_prints_each_rows_op_table():
  result = _run_benchmark(
      "--profile",
      "--tokens=256",
      "--num_experts=8",
      "--repeats=1",
      "--dim=16",
      "--hidden=32",
      "--profile_ops=1000",
  )
  assert result.returncode == 0, result.stderr
  assert (
      "256 tokens, 8 experts (128 tokens per expert): step " in result.stdout
  ), result.stdout
  rows = re.findall(
      r"^\| (\S+) \| [\d.]+ \| (\d+) \| [\d.]+ \| (\d+) \|$",
      result.stdout,
      flags=re.M,
  )
  ops = {name: (int(moe), int(alone)) for name, moe, alone in rows}
  # 1024 routed rows > small_batch_limit: the grouped path, whose weight
  # gradients are written in place (2 kernels x 8 experts); the experts
  # alone have separate weights and stack nothing.
  assert ops["InplaceUpdate"] == (16, 0), result.stdout
  assert "all ops" in result.stdout


def test_profile_on_jax_is_a_one_line_error():
  env = dict(os.environ, KERAS_BACKEND="jax")
  result = bench_testlib.run_benchmark(
      "moe_layer.py", "--profile", "--tokens=64", "--num_experts=8", env=env
  )
  assert result.returncode != 0
  assert "--profile reads TensorFlow's profiler" in result.stderr, result.stderr
