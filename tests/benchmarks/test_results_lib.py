"""results_lib, results_tables, results_plots: runs, statistics, rate choice
and time-to-quality, hand-checked."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bench_testlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_tables  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_mean_std_is_the_sample_std():
  values = [170.0, 172.5, 168.25]
  mean, std = results_tables.mean_std(values)
  assert mean == pytest.approx(np.mean(values))
  assert std == pytest.approx(np.std(values, ddof=1))
  assert results_tables.mean_std([3.0]) == (3.0, 0.0)


def test_first_crossing_interpolates_linearly():
  curve = bench_testlib.curve(
      [
          (1, 100.0, 10.0, 300.0),
          (2, 200.0, 20.0, 200.0),
          (3, 300.0, 30.0, 100.0),
      ]
  )
  # 150 lies halfway between 200 (x=200) and 100 (x=300): x = 250.
  assert results_tables.first_crossing(curve, 150.0, "tokens") == 250.0
  assert results_tables.first_crossing(curve, 150.0, "train_seconds") == 25.0
  # Reached at the first point: that point's x, no extrapolation.
  assert results_tables.first_crossing(curve, 400.0, "tokens") == 100.0
  assert results_tables.first_crossing(curve, 50.0, "tokens") is None


def test_lr_choice_needs_every_rate_and_picks_the_lowest_dev(tmp_path):
  lrs = [1e-3, 2e-3, 4e-3]
  seed = results_lib.SWEEP_SEED
  for lr, dev in zip(lrs, [180.0, 170.0, 175.0]):
    bench_testlib.write_summary(
        tmp_path, results_lib.Run("dense", lr, seed, 100), dev, dev
    )
  for lr, dev in zip(lrs[:2], [150.0, 160.0]):  # one rate missing
    bench_testlib.write_summary(
        tmp_path, results_lib.Run("moe", lr, seed, 100), dev, dev
    )
  choice = results_lib.choose_lrs(tmp_path, ["dense", "moe"], lrs, 100)
  assert choice == {"dense": 2e-3}
  swept = results_tables.sweep_rows(tmp_path, ["dense", "moe"], lrs, 100)
  table = results_tables.sweep_table(swept, ["dense", "moe"], lrs)
  assert "| dense | 180.00 | 170.00 | 175.00 | 0.002 |" in table
  assert "| moe | 150.00 | 160.00 | - | - |" in table


def test_lowest_dev_rates_needs_a_dev_perplexity_at_every_rate():
  lrs = [1e-3, 2e-3]
  dev = {
      ("a", 1e-3): 50.0,
      ("a", 2e-3): 40.0,  # a: 2e-3
      ("b", 1e-3): 30.0,
      ("b", 2e-3): None,  # a run without a dev evaluation: no choice
      ("c", 1e-3): 60.0,  # c: one rate missing
      ("d", 1e-3): 70.0,
      ("d", 2e-3): 70.0,  # a tie goes to the first rate of lrs
  }
  got = results_lib.lowest_dev_rates(dev, ["a", "b", "c", "d"], lrs)
  assert got == {"a": 2e-3, "d": 1e-3}


def test_results_table_mean_spread_and_significance(tmp_path):
  lrs = {"dense": 2e-3, "moe": 2e-3, "close": 2e-3}
  values = {
      "dense": [170.0, 172.0, 174.0],  # mean 172, std 2
      "moe": [150.0, 151.0, 152.0],  # -12.8%, |22| > 2 * 2
      "close": [168.0, 169.0, 170.0],  # -1.7%, |3| < 2 * 2
  }
  for config, ppls in values.items():
    for seed, ppl in enumerate(ppls):
      bench_testlib.write_summary(
          tmp_path, results_lib.Run(config, 2e-3, seed, 100), ppl, ppl
      )
  rows = results_tables.collect_rows(
      tmp_path, list(values), [0, 1, 2], 100, lrs
  )
  table = results_tables.results_table(rows, "perplexity")
  lines = {l.split("|")[1].strip(): l for l in table.splitlines()[2:]}
  assert "| 172.00 | 2.00 | 170.00-174.00 | - | - |" in lines["dense"]
  change = 100 * (151.0 - 172.0) / 172.0
  assert f"| {change:+.1f}% | yes |" in lines["moe"]
  assert f"| {100 * (169.0 - 172.0) / 172.0:+.1f}% | no |" in lines["close"]


def test_results_table_second_reference_columns(tmp_path):
  values = {
      "dense": [170.0, 172.0, 174.0],  # mean 172, std 2
      "moe_4": [160.0, 161.0, 162.0],  # mean 161, std 1
      "moe_32": [150.0, 151.0, 152.0],  # mean 151, std 1
  }
  for config, ppls in values.items():
    for seed, ppl in enumerate(ppls):
      bench_testlib.write_summary(
          tmp_path, results_lib.Run(config, 2e-3, seed, 100), ppl, ppl
      )
  lrs = {c: 2e-3 for c in values}
  rows = results_tables.collect_rows(
      tmp_path, list(values), [0, 1, 2], 100, lrs
  )
  table = results_tables.results_table(
      rows, "perplexity", second_reference="moe_4"
  )
  header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
  assert header[6:10] == ["vs baseline", "> 2x std", "vs moe_4", "> 2x std"]
  lines = {l.split("|")[1].strip(): l for l in table.splitlines()[2:]}
  cells = [c.strip() for c in lines["moe_32"].split("|")[1:-1]]
  # vs dense: (151 - 172) / 172; vs moe_4: (151 - 161) / 161, |10| > 2 * 1.
  assert cells[6:10] == [
      f"{100 * (151.0 - 172.0) / 172.0:+.1f}%",
      "yes",
      f"{100 * (151.0 - 161.0) / 161.0:+.1f}%",
      "yes",
  ]
  cells = [c.strip() for c in lines["moe_4"].split("|")[1:-1]]
  assert cells[8:10] == ["-", "-"]
  head, rule = table.splitlines()[:2]
  assert len(rule.split("|")) == len(head.split("|"))
  # Without the reference present the table keeps its usual columns.
  plain = results_tables.results_table(
      rows[:1] + rows[2:], "perplexity", second_reference="moe_4"
  )
  assert "vs moe_4" not in plain


def test_results_table_one_seed_is_not_called_significant(tmp_path):
  # One seed each: a 10% difference with no measured spread is "n<2", not
  # "yes"; two seeds of the MoE against one of dense still are.
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("dense", 2e-3, 0, 100), 100.0, 100.0
  )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("moe", 2e-3, 0, 100), 90.0, 90.0
  )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("moe", 2e-3, 1, 100), 90.0, 90.0
  )
  lrs = {"dense": 2e-3, "moe": 2e-3}
  for seeds in ([0], [0, 1]):
    rows = results_tables.collect_rows(
        tmp_path, ["dense", "moe"], seeds, 100, lrs
    )
    table = results_tables.results_table(rows, "perplexity")
    line = [l for l in table.splitlines() if l.startswith("| moe |")][0]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[6:8] == ["-10.0%", "n<2"]


def test_time_to_quality_uses_the_baselines_mean_final_dev(tmp_path):
  lrs = {"dense": 1e-3, "moe": 1e-3}
  dense = bench_testlib.curve([(1, 1e6, 60.0, 200.0), (2, 2e6, 120.0, 100.0)])
  moe = bench_testlib.curve([(1, 1e6, 90.0, 150.0), (2, 2e6, 180.0, 80.0)])
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("dense", 1e-3, 0, 2), 100.0, 1.0, dense
  )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("moe", 1e-3, 0, 2), 80.0, 1.0, moe
  )
  rows = results_tables.collect_rows(tmp_path, ["dense", "moe"], [0], 2, lrs)
  table = results_tables.time_to_quality_table(rows)
  # MoE crosses 100 at 1e6 + (150 - 100) / (150 - 80) * 1e6 tokens.
  tokens = 1e6 + 50.0 / 70.0 * 1e6
  seconds = 90.0 + 50.0 / 70.0 * 90.0
  assert "| dense | 1 | 2.00M | 1.00x | 2.0 min | 1.00x |" in table
  assert (
      f"| moe | 1 | {tokens / 1e6:.2f}M | {tokens / 2e6:.2f}x |"
      f" {seconds / 60:.1f} min | {seconds / 120.0:.2f}x |"
  ) in table
  # At measured step times: dense 2,000 tokens/step at 0.5 s, MoE at 0.8 s.
  steps = {
      "dense": {"seconds_per_step": 0.5, "tokens_per_step": 2000.0},
      "moe": {"seconds_per_step": 0.8, "tokens_per_step": 2000.0},
  }
  table = results_tables.time_to_quality_table(rows, steps)
  dense_idle = 2e6 / 2000.0 * 0.5  # 500 s
  moe_idle = tokens / 2000.0 * 0.8
  assert (
      "| dense | 1 | 2.00M | 1.00x | 2.0 min | 1.00x | 8.3 min | 1.00x |"
      in (table)
  )
  assert (
      f" {seconds / 120.0:.2f}x | {moe_idle / 60:.1f} min |"
      f" {moe_idle / dense_idle:.2f}x |"
  ) in table
  # A config without a measured time gets dashes; none for the baseline:
  # no such columns.
  assert "| moe | 1 |" in results_tables.time_to_quality_table(
      rows, {"moe": steps["moe"]}
  )
  assert "at measured step time" not in results_tables.time_to_quality_table(
      rows, {"moe": steps["moe"]}
  )
  partial = results_tables.time_to_quality_table(
      rows, {"dense": steps["dense"]}
  )
  assert f" {seconds / 120.0:.2f}x | - | - |" in partial


def test_time_to_quality_ratios_use_the_baselines_own_first_crossing(
    tmp_path,
):
  # Dense's mean curve dips to 95 at 3M tokens and ends at 100: it first
  # reached its final quality at 2M + (110 - 100) / (110 - 95) * 1M tokens,
  # and the MoE's ratio is against that point, not against the 4M budget.
  lrs = {"dense": 1e-3, "moe": 1e-3}
  dense = bench_testlib.curve(
      [
          (1, 1e6, 60.0, 200.0),
          (2, 2e6, 120.0, 110.0),
          (3, 3e6, 180.0, 95.0),
          (4, 4e6, 240.0, 100.0),
      ]
  )
  moe = bench_testlib.curve([(1, 1e6, 60.0, 120.0), (2, 2e6, 120.0, 90.0)])
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("dense", 1e-3, 0, 4), 100.0, 1.0, dense
  )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("moe", 1e-3, 0, 4), 80.0, 1.0, moe
  )
  rows = results_tables.collect_rows(tmp_path, ["dense", "moe"], [0], 4, lrs)
  steps = {
      "dense": {"seconds_per_step": 0.5, "tokens_per_step": 1000.0},
      "moe": {"seconds_per_step": 1.0, "tokens_per_step": 1000.0},
  }
  table = results_tables.time_to_quality_table(rows, steps)
  dense_tokens = 2e6 + 10.0 / 15.0 * 1e6
  dense_seconds = 120.0 + 10.0 / 15.0 * 60.0
  moe_tokens = 1e6 + 20.0 / 30.0 * 1e6
  moe_seconds = 60.0 + 20.0 / 30.0 * 60.0
  assert (
      f"| dense | 1 | {dense_tokens / 1e6:.2f}M | 1.00x |"
      f" {dense_seconds / 60:.1f} min | 1.00x |"
  ) in table
  dense_idle = dense_tokens / 1000.0 * 0.5
  moe_idle = moe_tokens / 1000.0 * 1.0
  assert (
      f"| moe | 1 | {moe_tokens / 1e6:.2f}M | {moe_tokens / dense_tokens:.2f}x"
      f" | {moe_seconds / 60:.1f} min | {moe_seconds / dense_seconds:.2f}x |"
      f" {moe_idle / 60:.1f} min | {moe_idle / dense_idle:.2f}x |"
  ) in table


def test_margin_table_follows_the_curve_against_the_reference(tmp_path):
  lrs = {"dense": 1e-3, "moe": 1e-3, "late": 1e-3}
  dense = [
      bench_testlib.curve([(1, 1e6, 60.0, 200.0), (2, 2e6, 120.0, 100.0)]),
      bench_testlib.curve([(1, 1e6, 60.0, 220.0), (2, 2e6, 120.0, 110.0)]),
  ]
  moe = [bench_testlib.curve([(1, 1e6, 90.0, 231.0), (2, 2e6, 180.0, 94.5)])]
  late = [
      bench_testlib.curve([(2, 2e6, 180.0, 105.0)])
  ]  # validated at step 2 only
  for seed, curve in enumerate(dense):
    bench_testlib.write_summary(
        tmp_path, results_lib.Run("dense", 1e-3, seed, 2), 1.0, 1.0, curve
    )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("moe", 1e-3, 0, 2), 1.0, 1.0, moe[0]
  )
  bench_testlib.write_summary(
      tmp_path, results_lib.Run("late", 1e-3, 0, 2), 1.0, 1.0, late[0]
  )
  rows = results_tables.collect_rows(
      tmp_path, ["dense", "moe", "late"], [0, 1], 2, lrs
  )
  table = results_tables.margin_table(rows, rows[0])
  lines = table.splitlines()
  # Dense mean curve: 210 then 105. MoE: 231 / 210 = +10%, 94.5 / 105 = -10%.
  assert lines[0] == (
      "| dev ppl vs dense (n=2) | step 1 (1.0M tok) | step 2 (2.0M tok) |"
  )
  assert "| moe (n=1) | +10.0% | -10.0% |" in lines
  assert "| late (n=1) | - | +0.0% |" in lines
  assert not any(l.startswith("| dense") for l in lines)
  empty = results_tables.Row("none", None, [])
  assert results_tables.margin_table(rows, empty) == "(no none runs yet)"


def test_paired_table_compares_seed_with_seed(tmp_path):
  lrs = {"dense": 1e-3, "moe": 1e-3, "mixed": 1e-3, "one": 1e-3}
  values = {
      "dense": {0: 100.0, 1: 80.0, 2: 90.0},
      # -10%, -5%, -7.5%: mean -7.5, std 2.5, |7.5| > 2 * 2.5.
      "moe": {0: 90.0, 1: 76.0, 2: 83.25},
      # +1%, -2% (seed 2 missing): mean -0.5, std 2.12.
      "mixed": {0: 101.0, 1: 78.4},
      "one": {1: 72.0},  # -10%, one pair
  }
  for config, by_seed in values.items():
    for seed, ppl in by_seed.items():
      bench_testlib.write_summary(
          tmp_path, results_lib.Run(config, 1e-3, seed, 100), ppl, ppl
      )
  rows = results_tables.collect_rows(
      tmp_path, list(values), [0, 1, 2], 100, lrs
  )
  table = results_tables.paired_table(rows, "perplexity")
  lines = {l.split("|")[1].strip(): l for l in table.splitlines()[2:]}
  assert lines["moe"] == (
      "| moe | 3 | s0 -10.0%, s1 -5.0%, s2 -7.5% | -7.5% | 2.5 | yes | yes |"
  )
  std = float(np.std([1.0, -2.0], ddof=1))
  assert lines["mixed"] == (
      f"| mixed | 2 | s0 +1.0%, s1 -2.0% | -0.5% | {std:.1f} | no | no |"
  )
  assert lines["one"] == "| one | 1 | s1 -10.0% | -10.0% | 0.0 | n<2 | yes |"


def test_paired_margins_compare_seed_with_seed(tmp_path):
  lrs = {"dense": 1e-3, "moe": 1e-3}
  dense = {
      0: bench_testlib.curve([(1, 1e6, 60.0, 200.0), (2, 2e6, 120.0, 100.0)]),
      1: bench_testlib.curve([(1, 1e6, 60.0, 250.0), (2, 2e6, 120.0, 125.0)]),
      2: bench_testlib.curve([(1, 1e6, 60.0, 300.0), (2, 2e6, 120.0, 150.0)]),
  }
  # Seed 2 of the MoE is missing: only seeds 0 and 1 are paired.
  moe = {
      0: bench_testlib.curve([(1, 1e6, 90.0, 220.0), (2, 2e6, 180.0, 95.0)]),
      1: bench_testlib.curve([(1, 1e6, 90.0, 250.0), (2, 2e6, 180.0, 100.0)]),
  }
  for config, curves in (("dense", dense), ("moe", moe)):
    for seed, curve in curves.items():
      run = results_lib.Run(config, 1e-3, seed, 2)
      bench_testlib.write_summary(tmp_path, run, 1.0, 1.0, curve)
  rows = results_tables.collect_rows(
      tmp_path, ["dense", "moe"], [0, 1, 2], 2, lrs
  )
  got = results_tables.paired_margins(rows[1], rows[0])
  # Step 1: 220/200 - 1 = +10%, 250/250 - 1 = 0%; step 2: -5%, -20%.
  assert [p["step"] for p in got] == [1, 2]
  assert [p["seeds"] for p in got] == [2, 2]
  np.testing.assert_allclose([p["margin"] for p in got], [5.0, -12.5])
  np.testing.assert_allclose([p["low"] for p in got], [0.0, -20.0])
  np.testing.assert_allclose([p["high"] for p in got], [10.0, -5.0])
  np.testing.assert_allclose([p["tokens"] for p in got], [1e6, 2e6])
  assert (
      results_tables.paired_margins(rows[0], results_tables.Row("x", None, []))
      == []
  )
  plots = results_plots.write_plots(rows, [], str(tmp_path), "c", 2)
  assert "margins_2steps_tokens.png" in [os.path.basename(p) for p in plots]
  assert (
      os.path.getsize(os.path.join(tmp_path, "margins_2steps_tokens.png")) > 0
  )


def test_mean_curve_averages_the_seeds_at_common_steps():
  a = {
      "curve": bench_testlib.curve(
          [(1, 10.0, 1.0, 300.0), (2, 20.0, 2.0, 200.0)]
      )
  }
  b = {
      "curve": bench_testlib.curve(
          [(1, 12.0, 3.0, 100.0), (2, 22.0, 4.0, 100.0), (3, 30.0, 5.0, 90.0)]
      )
  }
  curve = results_tables.mean_curve([a, b])
  assert [p["step"] for p in curve] == [1, 2]
  assert curve[0] == {
      "step": 1,
      "tokens": 11.0,
      "train_seconds": 2.0,
      "dev_perplexity": 200.0,
      "dev_min": 100.0,
      "dev_max": 300.0,
  }


def test_bad_grid_is_one_line(tmp_path):
  corpus = results_lib.Corpus(name="ptb", gin_dir="gin/lm/ptb")
  with pytest.raises(results_lib.GridError, match="no config .*nope.gin"):
    results_lib.check_configs(corpus, ["nope"])
  with pytest.raises(results_lib.GridError, match="unknown variant 'x'"):
    results_lib.check_configs(corpus, ["moe_32@x"])


def test_run_bindings_set_steps_seed_rate_and_variant():
  corpus = results_lib.Corpus(
      name="ptb", gin_dir="gin/lm/ptb", data_seed_binding="ptb_lm_data.seed"
  )
  run = results_lib.Run("moe_256@nobalance", 4e-3, 2, 1000)
  bindings = results_lib.run_bindings(corpus, run, steps_per_eval=200)
  assert bindings == [
      "TRAIN_STEPS = 1000",
      "SEED = 2",
      "training.steps_per_checkpoint = 200",
      "training.steps_per_eval = 200",
      "PEAK_LEARNING_RATE = 0.004",
      "ptb_lm_data.seed = 2",
      "moe_spec.w_importance = 0.0",
      "moe_spec.w_load = 0.0",
  ]
  assert run.run_id == "moe_256-nobalance_lr0.004_s2_1000"


def test_rates_for_variants_and_unswept_configs():
  choice = {"dense": 1e-3, "moe_256": 4e-3}
  rates = results_lib.rates_for(
      ["dense", "moe_256@nobalance", "moe_1024_h", "other"],
      choice,
      lr_from="moe_256",
  )
  assert rates == {
      "dense": 1e-3,
      "moe_256@nobalance": 4e-3,
      "moe_1024_h": 4e-3,
      "other": 4e-3,
  }
  assert results_lib.rates_for(["x"], choice) == {}


def test_grid_without_a_chosen_rate_is_one_line(tmp_path):
  with pytest.raises(
      results_lib.GridError, match=r"no chosen rate for \['a'\]"
  ):
    results_lib.run_procedure(
        "grid", ["a"], ["a"], [0], [1e-3], 10, tmp_path, execute=print
    )


def test_grid_lr_runs_every_config_at_that_rate(tmp_path):
  """--grid_lr: the grid's runs at the given rate, whatever was chosen."""
  results_lib.write_lr_choice(tmp_path, {"a": 4e-3, "b": 1e-3}, [1e-3], 10)
  executed = []
  rates = results_lib.run_procedure(
      "grid",
      ["a", "b@nobalance"],
      ["a", "b"],
      [0, 1],
      [1e-3, 4e-3],
      10,
      tmp_path,
      executed.append,
      grid_lr=2e-3,
  )
  assert rates == {"a": 2e-3, "b@nobalance": 2e-3}
  assert [(r.config, r.lr, r.seed) for r in executed] == [
      ("a", 2e-3, 0),
      ("b@nobalance", 2e-3, 0),
      ("a", 2e-3, 1),
      ("b@nobalance", 2e-3, 1),
  ]
  # Without it, the chosen rates (and no runs in table mode).
  assert results_lib.run_procedure(
      "table", ["a"], ["a"], [0], [1e-3], 10, tmp_path, executed.append
  ) == {"a": 4e-3}
  assert len(executed) == 4


def test_longer_grid_takes_the_rate_chosen_at_the_sweeps_length(tmp_path):
  lrs = [1e-3, 2e-3]
  seed = results_lib.SWEEP_SEED
  executed = []

  def execute(run):
    executed.append(run)
    if run.seed == seed:  # the sweep: 2e-3 wins for "a", 1e-3 for "b"
      dev = {("a", 1e-3): 90.0, ("a", 2e-3): 80.0}.get(
          (run.config, run.lr), 70.0 if run.lr == 1e-3 else 75.0
      )
      bench_testlib.write_summary(tmp_path, run, dev, dev)

  rates = results_lib.run_procedure(
      "all",
      ["a", "b", "b@nobalance"],
      ["a", "b"],
      [0, 1],
      lrs,
      400,
      tmp_path,
      execute,
      sweep_steps=100,
  )
  assert rates == {"a": 2e-3, "b": 1e-3, "b@nobalance": 1e-3}
  sweep = [r for r in executed if r.seed == seed]
  grid = [r for r in executed if r.seed != seed]
  assert {r.steps for r in sweep} == {100} and len(sweep) == 4
  assert [(r.config, r.lr, r.seed, r.steps) for r in grid] == [
      ("a", 2e-3, 0, 400),
      ("b", 1e-3, 0, 400),
      ("b@nobalance", 1e-3, 0, 400),
      ("a", 2e-3, 1, 400),
      ("b", 1e-3, 1, 400),
      ("b@nobalance", 1e-3, 1, 400),
  ]
  with open(os.path.join(tmp_path, "lr_choice_100steps.json")) as f:
    assert json.load(f)["steps"] == 100


def test_plots_of_other_lengths_do_not_replace_each_other(tmp_path):
  """Sweeps and tables of 100 and 400 steps, in one results_dir."""
  for steps in (100, 400):
    curve = bench_testlib.curve([(100, 1e5, 10.0, 200.0)])
    if steps == 400:
      curve = bench_testlib.curve(
          [(100, 1e5, 10.0, 200.0), (400, 4e5, 40.0, 150.0)]
      )
    for seed in (results_lib.SWEEP_SEED, 0):
      bench_testlib.write_summary(
          tmp_path, results_lib.Run("a", 1e-3, seed, steps), 1.0, 1.0, curve
      )
    bench_testlib.write_summary(
        tmp_path,
        results_lib.Run("a", 2e-3, results_lib.SWEEP_SEED, steps),
        1.0,
        1.0,
        curve,
    )

  def write(steps, sweep_steps):
    rows = results_tables.collect_rows(tmp_path, ["a"], [0], steps, {"a": 1e-3})
    swept = results_tables.sweep_rows(
        tmp_path, ["a"], [1e-3, 2e-3], sweep_steps or steps
    )
    plots = results_plots.write_plots(
        rows, swept, str(tmp_path), "c", steps, sweep_steps=sweep_steps
    )
    return sorted(os.path.basename(p) for p in plots)

  axes = ("tokens", "wallclock")
  written = {
      (400, 100): write(400, 100),
      (100, None): write(100, None),
      (400, 400): write(400, 400),
  }
  assert written[(400, 100)] == sorted(
      [f"curves_sweep_100steps_{a}.png" for a in axes]
      + [f"curves_400steps_sweep100_{a}.png" for a in axes]
  )  # one seed per row: no margins plot
  assert written[(100, None)] == sorted(
      [f"curves_sweep_100steps_{a}.png" for a in axes]
      + [f"curves_100steps_{a}.png" for a in axes]
  )
  assert written[(400, 400)] == sorted(
      [f"curves_sweep_400steps_{a}.png" for a in axes]
      + [f"curves_400steps_{a}.png" for a in axes]
  )
  every = set(os.listdir(tmp_path)) - {"runs"}
  assert len(every) == len(set(sum(written.values(), []))) == 10
  assert results_plots.plot_names(400, 100)["margins"] == (
      "margins_400steps_sweep100_tokens.png"
  )


def test_a_sweep_is_shown_only_when_it_spans_two_rates(tmp_path):
  """A --grid_lr table's seed-SWEEP_SEED runs at one rate are no sweep."""
  curve = bench_testlib.curve([(100, 1e5, 10.0, 200.0)])
  for seed in (results_lib.SWEEP_SEED, 0):
    bench_testlib.write_summary(
        tmp_path, results_lib.Run("a", 1e-3, seed, 100), 1.0, 1.0, curve
    )
  rows = results_tables.collect_rows(tmp_path, ["a"], [0], 100, {"a": 1e-3})
  lrs = [5e-4, 1e-3, 2e-3]
  swept = results_tables.sweep_rows(tmp_path, ["a"], lrs, 100)
  assert results_tables.swept_rates(swept) == [1e-3]
  plots = results_plots.write_plots(
      rows, swept, str(tmp_path), "c", 100, grid_lr=1e-3
  )
  assert sorted(os.path.basename(p) for p in plots) == [
      "curves_100steps_lr0.001_tokens.png",
      "curves_100steps_lr0.001_wallclock.png",
  ]
  assert not [f for f in os.listdir(tmp_path) if "sweep" in f]
  section = results_tables.sweep_section(swept, ["a"], lrs, 100)
  assert section.splitlines()[1] == (
      "no rate sweep at 100 steps: the finished seed"
      f" {results_lib.SWEEP_SEED} runs span fewer than two rates."
  )
  # A second rate makes it a sweep: its table, and its plot.
  bench_testlib.write_summary(
      tmp_path,
      results_lib.Run("a", 2e-3, results_lib.SWEEP_SEED, 100),
      1.0,
      1.0,
      curve,
  )
  swept = results_tables.sweep_rows(tmp_path, ["a"], lrs, 100)
  assert results_tables.swept_rates(swept) == [1e-3, 2e-3]
  section = results_tables.sweep_section(swept, ["a"], lrs, 100)
  assert section.splitlines()[1].startswith("| config | lr 0.0005 | lr 0.001 |")
  plots = results_plots.write_plots(
      rows, swept, str(tmp_path), "c", 100, grid_lr=1e-3
  )
  assert "curves_sweep_100steps_tokens.png" in [
      os.path.basename(p) for p in plots
  ]
  assert results_plots.plot_names(400, 400, grid_lr=2e-3)["curves"] == (
      "curves_400steps_lr0.002"
  )


def test_sweeps_of_single_configs_keep_each_others_choice(tmp_path):
  lrs = [1e-3, 2e-3]
  results_lib.write_lr_choice(tmp_path, {"dense": 2e-3}, lrs, 100)
  results_lib.write_lr_choice(tmp_path, {"moe": 1e-3}, lrs, 100)
  assert results_lib.read_lr_choice(tmp_path, 100) == {
      "dense": 2e-3,
      "moe": 1e-3,
  }
  # A config swept again replaces its own choice only.
  results_lib.write_lr_choice(tmp_path, {"moe": 2e-3}, lrs, 100)
  assert results_lib.read_lr_choice(tmp_path, 100) == {
      "dense": 2e-3,
      "moe": 2e-3,
  }
  # Another length has its own choice and leaves the first length's.
  results_lib.write_lr_choice(tmp_path, {"moe": 1e-3}, lrs, 200)
  assert results_lib.read_lr_choice(tmp_path, 200) == {"moe": 1e-3}
  assert results_lib.read_lr_choice(tmp_path, 100) == {
      "dense": 2e-3,
      "moe": 2e-3,
  }
  # Other rates at a length replace that length's choices.
  results_lib.write_lr_choice(tmp_path, {"dense": 4e-3}, [2e-3, 4e-3], 200)
  assert results_lib.read_lr_choice(tmp_path, 200) == {"dense": 4e-3}
  assert results_lib.read_lr_choice(tmp_path, 300) == {}
  assert sorted(os.listdir(tmp_path)) == [
      "lr_choice_100steps.json",
      "lr_choice_200steps.json",
  ]


def test_margin_trend_fits_a_line_per_doubling_and_extrapolates(tmp_path):
  del tmp_path
  tokens = [1e6, 2e6, 4e6, 8e6, 16e6]

  def summary(seed, margins):
    curve = bench_testlib.curve(
        [
            (i + 1, t, 10.0 * (i + 1), 100.0 * (1.0 + m / 100.0))
            for i, (t, m) in enumerate(zip(tokens, margins))
        ]
    )
    return {"seed": seed, "curve": curve}

  def line(a, b):  # margin = a + b * log2(tokens / 1M)
    return [a + b * math.log2(t / 1e6) for t in tokens]

  reference = results_tables.Row(
      "dense", 1e-3, [summary(s, [0.0] * 5) for s in (0, 1)]
  )
  # Seed 0: 4 - 2 per doubling, but +50% at 1M (outside the fit window,
  # which starts at 16M / 4 = 4M); seed 1: 2 - 4 per doubling; seed 2 has
  # no dense partner.
  seed0 = line(4.0, -2.0)
  seed0[0] = 50.0
  moe = results_tables.Row(
      "moe",
      1e-3,
      [summary(0, seed0), summary(1, line(2.0, -4.0)), summary(2, [-90.0] * 5)],
  )
  flat = results_tables.Row("flat", 1e-3, [summary(0, [1.0] * 5)])
  # -0.1 per doubling from -4.9% at 16M: -5% one doubling on (32M), -15%
  # 101 doublings on.
  slow = results_tables.Row("slow", 1e-3, [summary(0, line(-4.5, -0.1))])
  # Shrinking by 1e-6 points per doubling from +3%: the targets lie ~8e6 and
  # ~1.8e7 doublings on, far past any float (2.0 ** 8e6 overflows).
  nearly_flat = results_tables.Row(
      "nearly_flat", 1e-3, [summary(0, line(3.0, -1e-6))]
  )
  table = results_tables.margin_trend_table(
      [reference, moe, flat, slow, nearly_flat], reference
  )
  lines = {l.split("|")[1].strip(): l for l in table.splitlines()[2:]}
  # Slopes -2 and -4 (mean -3); at 16M: -4% and -14% (mean -9%, already
  # past -5%); -15% is 2 doublings on at -3 per doubling: 64M, 4x.
  assert lines["moe"] == (
      "| moe | 2 | 4.0-16.0M tok | 3 | -3.00 pts | -4.00 to -2.00 | -9.0% |"
      " reached | 64M (4x) |"
  )
  assert lines["flat"].endswith(
      "| +0.00 pts | +0.00 to +0.00 | +1.0% | not on this trend | not on"
      " this trend |"
  )
  assert lines["slow"].endswith("| -4.9% | 32M (2x) | > 1000x |")
  assert lines["nearly_flat"].endswith("| +3.0% | > 1000x | > 1000x |")
  a, b = results_tables.fit_log2_line([2.0, 4.0, 8.0], [1.0, 3.0, 5.0])
  assert (a, b) == pytest.approx((-1.0, 2.0))
  with pytest.raises(ValueError, match="two distinct"):
    results_tables.fit_log2_line([4.0, 4.0], [1.0, 2.0])
  unpaired = results_tables.Row("x", 1e-3, [summary(5, [1.0] * 5)])
  assert "no seed" in results_tables.margin_trend_table([unpaired], reference)


def _append_curve(model_dir, steps):
  """Appends learning-curve records (100 tokens and 1 s per step)."""
  with open(os.path.join(model_dir, "curve.jsonl"), "a") as f:
    for step in steps:
      record = {"step": step, "tokens": 100.0 * step, "train_seconds": step}
      f.write(json.dumps(record) + "\n")


def _finished_run_dir(model_dir, steps):
  os.makedirs(os.path.join(model_dir, "checkpoints"))
  with open(
      os.path.join(model_dir, "checkpoints", f"ckpt-{steps}.h5"), "w"
  ) as f:
    f.write("weights")
  _append_curve(model_dir, range(5, steps + 1, 5))
  for name in ("eval_test.json", "translations_test.txt", "config.gin"):
    with open(os.path.join(model_dir, name), "w") as f:
      f.write(name)


def test_corpus_build_hashes_the_build_files_and_tables_note_a_mix(tmp_path):
  first, second = tmp_path / "manifest.json", tmp_path / "vocab.txt"
  first.write_bytes(b'{"packages": [], "build_seconds": 323.9}')
  second.write_bytes(b"<S>\n</S>\n")
  corpus = results_lib.Corpus(
      name="c", gin_dir="g", build_files=(str(first), str(second))
  )
  # SHA-256 of b'{"packages":[]}' (the manifest as compact JSON, without
  # its build time) then the vocabulary's bytes, 12 hex digits (hashlib).
  assert results_lib.corpus_build(corpus) == "fba2e5b47fdf"
  # The same build that took another time, written with other whitespace
  # and key order, is the same build; other contents are another.
  first.write_bytes(b'{\n "build_seconds": 136.4,\n "packages": []\n}')
  assert results_lib.corpus_build(corpus) == "fba2e5b47fdf"
  first.write_bytes(b'{"packages": [{"version": "2"}], "build_seconds": 1}')
  assert results_lib.corpus_build(corpus) != "fba2e5b47fdf"
  for bad, why in ((b'{"packages": [', "is not valid JSON"), (b"[]", "object")):
    first.write_bytes(bad)
    with pytest.raises(results_lib.GridError, match=why):
      results_lib.corpus_build(corpus)
  assert (
      results_lib.corpus_build(results_lib.Corpus(name="c", gin_dir="g"))
      is None
  )
  missing = results_lib.Corpus(
      name="c", gin_dir="g", build_files=(str(tmp_path / "nope"),)
  )
  assert results_lib.corpus_build(missing) is None

  def row(config, builds):
    return results_tables.Row(
        config, 1e-3, [{"corpus_build": b} if b else {} for b in builds]
    )

  assert results_tables.corpus_builds_note([row("a", ["x1", "x1"])]) is None
  assert results_tables.corpus_builds_note([row("a", [None])]) is None
  note = results_tables.corpus_builds_note(
      [row("a", ["x1", None]), row("b", ["x1"])]
  )
  assert note.startswith(
      "Note: these runs come from 2 corpus builds: unrecorded (1 runs),"
      " x1 (2 runs)"
  )


def test_a_longer_run_continues_the_finished_shorter_one(tmp_path, monkeypatch):
  manifest = tmp_path / "manifest.json"
  manifest.write_bytes(b'{"packages": []}')
  corpus = results_lib.Corpus(
      name="c", gin_dir="gin/mt/debian_en_fr", build_files=(str(manifest),)
  )
  output_dir = os.path.join(tmp_path, "runs")
  shorter = results_lib.Run("gnmt_dense", 1e-3, 0, 10)
  longer = results_lib.Run("gnmt_dense", 1e-3, 0, 20)
  _finished_run_dir(os.path.join(output_dir, shorter.run_id), 10)
  seen = {}

  def fake_subprocess(args, log_path):
    model_dir = os.path.dirname(log_path)
    if args[0] == "moe_keras.train":
      # What training finds in its model dir when it starts.
      seen["files"] = sorted(os.listdir(model_dir))
      seen["checkpoints"] = os.listdir(os.path.join(model_dir, "checkpoints"))
      _append_curve(model_dir, (15, 20))
    else:
      with open(os.path.join(model_dir, "eval_test.json"), "w") as f:
        json.dump({"perplexity": 5.0}, f)

  monkeypatch.setattr(results_lib, "_subprocess", fake_subprocess)
  summary = results_lib.execute(
      corpus,
      longer,
      output_dir=output_dir,
      results_dir=os.path.join(tmp_path, "results"),
      steps_per_eval=5,
      eval_flags=[],
      summarize=lambda r: r,
      continue_from=10,
  )
  # Training started from the shorter run's checkpoint and curve, without
  # its test results; the summary's curve runs from step 5 to 20.
  assert seen["files"] == ["checkpoints", "config.gin", "curve.jsonl"]
  assert seen["checkpoints"] == ["ckpt-10.h5"]
  assert [p["step"] for p in summary["curve"]] == [5, 10, 15, 20]
  # The corpus build it trained on: SHA-256 of b'{"packages":[]}'.
  assert summary["corpus_build"] == "454eea274ef7"
  assert not os.path.exists(
      os.path.join(output_dir, longer.run_id + ".partial")
  )
  # The shorter run is untouched.
  assert os.path.exists(
      os.path.join(output_dir, shorter.run_id, "eval_test.json")
  )


def test_continuing_an_unfinished_or_missing_run_is_one_line(tmp_path):
  longer = results_lib.Run("moe_32", 1e-3, 1, 20)
  with pytest.raises(results_lib.GridError, match="has no steps of 10"):
    results_lib.continue_run(str(tmp_path), longer, 10)
  _finished_run_dir(os.path.join(tmp_path, "moe_32_lr0.001_s1_10"), 5)
  with pytest.raises(results_lib.GridError, match="has 5 steps of 10: finish"):
    results_lib.continue_run(str(tmp_path), longer, 10)
  with pytest.raises(results_lib.GridError, match="not shorter"):
    results_lib.continue_run(str(tmp_path), longer, 20)
  assert sorted(os.listdir(tmp_path)) == ["moe_32_lr0.001_s1_10"]


@pytest.mark.parametrize("script", ["lm_results.py", "mt_results.py"])
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--grid_lr=0", "--grid_lr must be a positive learning rate"),
        (
            "--table_lrs=2e-3,fast",
            "--table_lrs must be positive learning rates",
        ),
        (
            "--table_lrs=2e-3,-1e-3",
            "--table_lrs must be positive learning rates",
        ),
        ("--lrs=1e-3,fast", "--lrs must be distinct positive learning rates"),
        ("--lrs=1e-3,0", "--lrs must be distinct positive learning rates"),
        ("--lrs=1e-3,0.001", "--lrs must be distinct positive learning rates"),
        ("--seeds=0,x", "--seeds must be distinct integers"),
        ("--seeds=0,1,0", "--seeds must be distinct integers"),
        ("--seeds=", "--seeds must be distinct integers"),
    ],
)
def test_rate_flags_that_are_not_positive_rates_are_one_line_flag_errors(
    script, flag, message
):
  done = subprocess.run(
      [
          sys.executable,
          os.path.join(results_lib.REPO, "benchmarks", script),
          "--mode=table",
          flag,
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert done.returncode != 0
  assert message in done.stderr
  assert "Traceback" not in done.stderr


def test_sweep_margins_are_per_rate_against_the_baseline(tmp_path):
  """Per swept rate, moe's dev margin vs dense: 100 * (ppl / dense - 1)."""
  sweep = results_lib.SWEEP_SEED
  # (config, lr): dev perplexity at step 100. At 2e-3: 90 vs 100 = -10.0%;
  # at 4e-3: 126 vs 120 = +5.0%. At 8e-3 only moe finished: no section.
  dev = {
      ("dense", 2e-3): 100.0,
      ("moe", 2e-3): 90.0,
      ("dense", 4e-3): 120.0,
      ("moe", 4e-3): 126.0,
      ("moe", 8e-3): 50.0,
  }
  for (config, lr), ppl in dev.items():
    bench_testlib.write_summary(
        tmp_path,
        results_lib.Run(config, lr, sweep, 100),
        ppl,
        ppl,
        bench_testlib.curve([(100, 1e5, 10.0, ppl)]),
    )
  lrs = [2e-3, 4e-3, 8e-3]
  swept = results_tables.sweep_rows(tmp_path, ["dense", "moe"], lrs, 100)
  assert [(r.config, r.lr) for r in swept] == [
      ("dense", 2e-3),
      ("moe", 2e-3),
      ("dense", 4e-3),
      ("moe", 4e-3),
      ("moe", 8e-3),
  ]
  sections = results_tables.sweep_margin_sections(swept, "dense")
  assert [s.splitlines()[0] for s in sections] == [
      f"Sweep, lr 0.002, seed {sweep}:",
      f"Sweep, lr 0.004, seed {sweep}:",
  ]
  assert sections[0].splitlines()[-1].split("|")[2].strip() == "-10.0%"
  assert sections[1].splitlines()[-1].split("|")[2].strip() == "+5.0%"
  # One rate is no sweep: no per-rate margins.
  one_rate = [r for r in swept if r.lr == 2e-3]
  assert not results_tables.sweep_margin_sections(one_rate, "dense")


def test_mt_results_prints_the_sweeps_margins_per_rate(tmp_path):
  """mt_results.py --mode=table: moe_32's dev margin vs gnmt_dense per rate."""
  sweep = results_lib.SWEEP_SEED
  # (config, lr): dev perplexity at steps 50 and 100. At 1e-3: 99/90 vs
  # 100/100 = -1.0%, -10.0%; at 2e-3: 84/96 vs 80/80 = +5.0%, +20.0%.
  dev = {
      ("gnmt_dense", 1e-3): (100.0, 100.0),
      ("moe_32", 1e-3): (99.0, 90.0),
      ("gnmt_dense", 2e-3): (80.0, 80.0),
      ("moe_32", 2e-3): (84.0, 96.0),
  }
  results_dir = tmp_path / "results"
  for (config, lr), (at_50, at_100) in dev.items():
    bench_testlib.write_summary(
        results_dir,
        results_lib.Run(config, lr, sweep, 100),
        at_100,
        at_100,
        bench_testlib.curve([(50, 5e4, 5.0, at_50), (100, 1e5, 10.0, at_100)]),
    )
  done = subprocess.run(
      [
          sys.executable,
          os.path.join(results_lib.REPO, "benchmarks", "mt_results.py"),
          "--mode=table",
          "--corpus=debian_en_fr",
          "--configs=gnmt_dense,moe_32",
          "--sweep_configs=gnmt_dense,moe_32",
          "--lrs=1e-3,2e-3",
          "--train_steps=100",
          "--seeds=0",
          f"--results_dir={results_dir}",
          f"--output_dir={tmp_path / 'runs'}",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
      env=dict(os.environ, HOME=str(tmp_path)),
  )
  lines = done.stdout.splitlines()
  for heading, margins in (
      (f"Sweep, lr 0.001, seed {sweep}:", ["-1.0%", "-10.0%"]),
      (f"Sweep, lr 0.002, seed {sweep}:", ["+5.0%", "+20.0%"]),
  ):
    row = lines[lines.index(heading) + 3]
    assert [c.strip() for c in row.split("|")[2:-1]] == margins, done.stdout


def _write_rate_grid(results_dir):
  """dense: 2e-3 wins on dev (mean 30 vs 40); moe: 4e-3 wins (20 vs 25).

  Dev and test differ on purpose: dense at 4e-3 has the better test mean
  (35 vs 45), so a choice made on test would pick the other rate.
  """
  # (config, lr): {seed: (final dev perplexity, test perplexity)}
  grid = {
      ("dense", 2e-3): {0: (28.0, 40.0), 1: (32.0, 50.0)},
      ("dense", 4e-3): {0: (38.0, 30.0), 1: (42.0, 40.0)},
      ("moe", 2e-3): {0: (24.0, 20.0), 1: (26.0, 22.0)},
      ("moe", 4e-3): {0: (19.0, 27.0), 1: (21.0, 35.0)},
      # Best dev of all, but seed 1 is missing: it must not compete.
      ("moe", 8e-3): {0: (5.0, 5.0)},
  }
  for (config, lr), by_seed in grid.items():
    for seed, (dev, test) in by_seed.items():
      bench_testlib.write_summary(
          results_dir, results_lib.Run(config, lr, seed, 100), dev, test
      )


def test_rate_grid_rows_are_config_major_with_missing_runs_kept(tmp_path):
  _write_rate_grid(tmp_path)
  rows = results_tables.rate_grid_rows(
      tmp_path, ["dense", "moe"], [2e-3, 4e-3, 8e-3], [0, 1], 100
  )
  assert [(r.config, r.lr, [s["seed"] for s in r.summaries]) for r in rows] == [
      ("dense", 2e-3, [0, 1]),
      ("dense", 4e-3, [0, 1]),
      ("dense", 8e-3, []),
      ("moe", 2e-3, [0, 1]),
      ("moe", 4e-3, [0, 1]),
      ("moe", 8e-3, [0]),
  ]


def test_dev_chosen_rows_pick_the_lowest_mean_dev_over_complete_rates(
    tmp_path,
):
  _write_rate_grid(tmp_path)
  rows = results_tables.rate_grid_rows(
      tmp_path, ["dense", "moe", "absent"], [2e-3, 4e-3, 8e-3], [0, 1], 100
  )
  chosen, incomplete = results_tables.dev_chosen_rows(rows, [0, 1])
  # dense: dev means 30 (2e-3) < 40 (4e-3), although 4e-3's test is better;
  # moe: 20 (4e-3) < 25 (2e-3); 8e-3 (dev 5, one seed) does not compete.
  assert [(r.config, r.lr) for r in chosen] == [("dense", 2e-3), ("moe", 4e-3)]
  assert incomplete == ["absent"]


def test_rate_grid_report_tables_the_dev_chosen_rows(tmp_path):
  _write_rate_grid(tmp_path)
  report = results_tables.rate_grid_report(
      tmp_path, ["dense", "moe"], [2e-3, 4e-3], [0, 1], 100, ["perplexity"]
  )
  assert "(dense 0.002, moe 0.004): test perplexity" in report
  # Chosen rows: dense test 40, 50 (mean 45); moe 27, 35 (mean 31).
  assert f"| {100 * (31.0 - 45.0) / 45.0:+.1f}% |" in report
  # Paired: s0 27/40 - 1 = -32.5%, s1 35/50 - 1 = -30.0%.
  assert "| moe | 2 | s0 -32.5%, s1 -30.0% | -31.2% |" in report
  grid_lines = [l for l in report.splitlines() if l.startswith("| moe | 0.002")]
  assert grid_lines and "| 21.00 | 1.41 | 20.00-22.00 |" in grid_lines[0]


def test_a_bad_summary_file_is_one_error_naming_it_and_is_left_alone(
    tmp_path,
):
  run = results_lib.Run("dense", 1e-3, 0, 100)
  bench_testlib.write_summary(tmp_path, run, 50.0, 51.0)
  assert results_lib.load_summary(tmp_path, run)["test"] == {"perplexity": 51.0}
  path = results_lib.summary_path(tmp_path, run)
  for content, why in (
      ('{"config": "den', "cannot read .*dense_lr0.001_s0_100.json"),
      ("[1, 2]", "dense_lr0.001_s0_100.json is not a results file.*object"),
      (
          '{"config": "dense", "lr": 0.001}',
          "not a results file of this tool: no seed, steps, curve,"
          " final_dev_perplexity, test, tokens, train_seconds$",
      ),
  ):
    with open(path, "w") as f:
      f.write(content)
    with pytest.raises(results_lib.GridError, match=why):
      results_lib.load_summary(tmp_path, run)
    with open(path) as f:
      assert f.read() == content
  assert results_lib.load_summary(tmp_path, results_lib.Run("x", 1, 0, 1)) is (
      None
  )


def test_a_bad_rate_choice_file_is_an_error_and_is_not_replaced(tmp_path):
  results_lib.write_lr_choice(tmp_path, {"dense": 2e-3}, [1e-3, 2e-3], 100)
  path = os.path.join(tmp_path, results_lib.LR_CHOICE_FILE.format(steps=100))
  with open(path, "w") as f:
    f.write('{"choice": ')
  with pytest.raises(results_lib.GridError, match="cannot read .*lr_choice"):
    results_lib.read_lr_choice(tmp_path, 100)
  with pytest.raises(results_lib.GridError, match="cannot read .*lr_choice"):
    results_lib.write_lr_choice(tmp_path, {"moe": 1e-3}, [1e-3, 2e-3], 100)
  with open(path) as f:
    assert f.read() == '{"choice": '


def test_plots_record_their_configs_and_refuse_other_configs(tmp_path):
  curve = bench_testlib.curve([(100, 1e5, 10.0, 200.0)])
  for config in ("a", "b"):
    for lr in (1e-3, 2e-3):
      bench_testlib.write_summary(
          tmp_path,
          results_lib.Run(config, lr, results_lib.SWEEP_SEED, 100),
          1.0,
          1.0,
          curve,
      )
    bench_testlib.write_summary(
        tmp_path, results_lib.Run(config, 1e-3, 0, 100), 1.0, 1.0, curve
    )

  def write(configs, sweep_configs, tag=None):
    rows = results_tables.collect_rows(
        tmp_path, configs, [0], 100, {c: 1e-3 for c in configs}
    )
    swept = results_tables.sweep_rows(
        tmp_path, sweep_configs, [1e-3, 2e-3], 100
    )
    return results_plots.write_plots(
        rows, swept, str(tmp_path), "c", 100, configs=configs, tag=tag
    )

  # A PNG from before the record (no text chunk) is replaced.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  legacy = os.path.join(tmp_path, "curves_100steps_tokens.png")
  plt.figure().savefig(legacy)
  assert results_plots.recorded_configs(legacy) is None
  assert results_plots.recorded_configs(str(tmp_path / "none.png")) is None
  cut_short = tmp_path / "cut_short.png"
  cut_short.write_bytes(b"\x89PNG\r\n")  # not an image PIL reads
  assert results_plots.recorded_configs(str(cut_short)) is None
  write(["a", "b"], ["a"])
  assert results_plots.recorded_configs(legacy) == ["a", "b"]
  sweep_png = os.path.join(tmp_path, "curves_sweep_100steps_wallclock.png")
  assert results_plots.recorded_configs(sweep_png) == ["a"]
  before = {
      name: (tmp_path / name).read_bytes()
      for name in os.listdir(tmp_path)
      if name.endswith(".png")
  }
  # Fewer configs at the same length: nothing written. The sweep's PNGs
  # (configs ["a"], as before) come first and pass.
  with pytest.raises(results_plots.PlotConflict) as conflict:
    write(["b"], ["a"])
  assert str(conflict.value) == (
      f"{tmp_path}/curves_100steps_tokens.png shows configs a,b, and this"
      " table's (b) lack a: --plot_tag=NAME writes its plots beside it"
  )
  with pytest.raises(
      results_plots.PlotConflict,
      match=r"curves_sweep_100steps_tokens.png shows configs a, and this"
      r" table's \(b\) lack a:",
  ):
    write(["a", "b"], ["b"])  # the sweep's PNGs lose "a"
  assert {
      name: (tmp_path / name).read_bytes()
      for name in os.listdir(tmp_path)
      if name.endswith(".png")
  } == before
  tagged = write(["b"], ["b"], tag="b_only")
  assert sorted(os.path.basename(p) for p in tagged) == [
      "curves_100steps_b_only_tokens.png",
      "curves_100steps_b_only_wallclock.png",
      "curves_sweep_100steps_b_only_tokens.png",
      "curves_sweep_100steps_b_only_wallclock.png",
  ]  # one row: no margins
  # The same configs in another order, or more, replace them.
  write(["b", "a"], ["b", "a"])
  assert results_plots.recorded_configs(legacy) == ["b", "a"]
  assert results_plots.recorded_configs(sweep_png) == ["b", "a"]
