"""benchmarks/grouped_matmul.py: the TF layout and run; --groups checks."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import bench_testlib


def _padded_layouts(*group_sizes):
  """benchmarks.grouped_matmul.padded_layout of each list, in a subprocess.

  The module's absl flags (--repeats, ...) clash with other benchmarks'
  when imported into one pytest process, so it is imported in its own.
  """
  code = (
      "import json, sys\n"
      "import numpy as np\n"
      "from benchmarks import grouped_matmul\n"
      "out = []\n"
      "for sizes in json.loads(sys.argv[1]):\n"
      "  g, v = grouped_matmul.padded_layout(np.array(sizes))\n"
      "  out.append([g.tolist(), v.tolist()])\n"
      "print(json.dumps(out))\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", code, json.dumps(list(group_sizes))],
      capture_output=True,
      text=True,
      check=False,
      timeout=300,
      cwd=bench_testlib.REPO,
  )
  assert result.returncode == 0, result.stderr
  return [
      (np.array(g), np.array(v))
      for g, v in json.loads(result.stdout.strip().splitlines()[-1])
  ]


def test_padded_layout_matches_hand_derived_slots_and_round_trips():
  (gather, valid_slots), (gather_2, valid_2) = _padded_layouts(
      [2, 0, 3], [3, 1, 0, 4]
  )
  # Groups of 2, 0 and 3 rows (R = 5): largest group 3, so a [3, 3] layout;
  # slots past a group's size point at row 5 (the appended zero row).
  np.testing.assert_array_equal(gather, [[0, 1, 5], [5, 5, 5], [2, 3, 4]])
  np.testing.assert_array_equal(valid_slots, [0, 1, 6, 7, 8])
  # Gathered into the layout, a batched matmul and back: per-row matmuls.
  rng = np.random.default_rng(1)
  sizes = np.array([3, 1, 0, 4])
  rows = rng.standard_normal((8, 5))
  w = rng.standard_normal((4, 5, 2))
  padded = np.concatenate([rows, np.zeros((1, 5))])[gather_2]
  out = np.einsum("gck,gkn->gcn", padded, w).reshape(-1, 2)[valid_2]
  group = np.repeat(np.arange(4), sizes)
  expected = np.stack([rows[r] @ w[group[r]] for r in range(8)])
  np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_tensorflow_table_rows():
  result = bench_testlib.run_benchmark(
      "grouped_matmul.py",
      "--backend=tensorflow",
      "--rows=64",
      "--k_dim=8",
      "--n_dim=16",
      "--groups=4,8",
      "--group_sizes=multinomial",
      "--repeats=1",
  )
  assert result.returncode == 0, result.stderr
  for groups, per_group in ((4, 16), (8, 8)):
    row = re.search(
        rf"^\| {groups} \| {per_group} \|(.*)\|$", result.stdout, flags=re.M
    )
    assert row, result.stdout
    cells = [float(c) for c in row.group(1).split("|")]
    # largest, 3 ms, 3 GFLOP/s, 2 speed ratios, max abs diff.
    assert len(cells) == 10, cells
    assert cells[0] >= per_group
    assert all(c > 0 for c in cells[1:9]), cells
    # The padded BatchMatMul computes the per-group MatMuls' values.
    assert cells[9] < 1e-5, cells


def test_jax_table_times_the_loop_over_groups():
  result = bench_testlib.run_benchmark(
      "grouped_matmul.py",
      "--methods=tiled,ragged_dot,einsum",
      "--rows=64",
      "--k_dim=8",
      "--n_dim=16",
      "--groups=4",
      "--dtype=float32",
      "--repeats=1",
  )
  assert result.returncode == 0, result.stderr
  assert "| tiled ms | ragged_dot ms | einsum ms |" in result.stdout
  row = re.search(r"^\| 4 \| 16 \|(.*)\|$", result.stdout, flags=re.M)
  assert row, result.stdout
  cells = [float(c) for c in row.group(1).split("|")]
  # 3 ms, 2 ratios over einsum, the weight bound (0.000 ms at this size),
  # no Pallas check (nan).
  assert len(cells) == 7, cells
  assert all(c > 0 for c in cells[:5]), cells
  assert cells[5] >= 0 and np.isnan(cells[6]), cells


def test_unknown_jax_method_is_a_usage_error():
  result = bench_testlib.run_benchmark(
      "grouped_matmul.py", "--methods=tiledx,einsum", "--rows=64", "--groups=4"
  )
  assert result.returncode != 0
  assert (
      "--methods: unknown tiledx; choose from ragged_dot, pallas, tiled,"
      " einsum" in result.stderr
  )
  assert "| groups |" not in result.stdout


def test_tensorflow_backend_rejects_jax_flags():
  result = bench_testlib.run_benchmark(
      "grouped_matmul.py", "--backend=tensorflow", "--methods=einsum"
  )
  assert result.returncode != 0
  assert "--methods and --interpret are for --backend=jax" in result.stderr


@pytest.mark.parametrize(
    "backend, groups, message",
    [
        ("tensorflow", "0", "--groups must be in [1, --rows=64]: [0]"),
        ("jax", "4,65", "--groups must be in [1, --rows=64]: [4, 65]"),
        ("jax", "x", "--groups must be integers"),
    ],
)
def test_bad_groups_give_one_line_usage_error(backend, groups, message):
  result = bench_testlib.run_benchmark(
      "grouped_matmul.py",
      f"--backend={backend}",
      "--rows=64",
      f"--groups={groups}",
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  # Rejected before any table is started.
  assert "| groups |" not in result.stdout
