"""benchmarks/decode_layer.py runs and compares at about k experts/token."""

import re

import bench_testlib


def test_table_rows_route_about_k_experts_per_token():
  result = bench_testlib.run_benchmark(
      "decode_layer.py",
      "--tokens=8,32",
      "--calls=2",
      "--rounds=1",
      "--num_experts=8",
      "--k=2",
      "--dim=16",
      "--expert_hidden=8",
  )
  assert result.returncode == 0, result.stderr
  rows = re.findall(
      r"^\| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
      result.stdout,
      flags=re.M,
  )
  assert [(t, g) for t, g, *_ in rows] == [
      ("8", "batchwise"),
      ("8", "top_k"),
      ("32", "batchwise"),
      ("32", "top_k"),
  ]
  for _, gating, experts, dense_ms, moe_ms in rows:
    if gating == "top_k":
      assert float(experts) == 2.0
    else:
      # Thresholds fitted on 4096 random tokens admit about k = 2 of 8.
      assert 1.0 <= float(experts) <= 3.0, result.stdout
    assert float(dense_ms) > 0.0 and float(moe_ms) > 0.0
  assert "expert weights 0.0 MB" in result.stdout  # 2*8*16*8*4 B = 8 KB
