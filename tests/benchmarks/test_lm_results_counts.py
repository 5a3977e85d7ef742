"""lm_results.py --mode=table end to end: each row's model counted with the
grid's own bindings, the margin references, a bad summary file, and which
runs write or keep the plots."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

import bench_testlib  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_plots  # pylint: disable=g-import-not-at-top,wrong-import-position


def _lstm(d):
  """Weights of one LSTM layer of width d, input width d (4 gates)."""
  return 4 * (d + d) * d


def _table(tmp_path, *flags, check=True):
  """lm_results.py --mode=table on debian_docs with no runs; its result.

  A --mode among `flags` replaces --mode=table (absl keeps the last).
  """
  env = dict(os.environ, HOME=str(tmp_path))  # no corpus needed to count
  return subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "benchmarks", "lm_results.py"),
          "--corpus=debian_docs",
          "--mode=table",
          f"--results_dir={tmp_path / 'results'}",
          *flags,
      ],
      capture_output=True,
      text=True,
      check=check,
      timeout=300,
      env=env,
  )


def test_counts_follow_the_grids_width_bindings(tmp_path):
  result = _table(
      tmp_path,
      "--configs=4xlstm_128,moe_256,moe_256@nobalance",
      "--gin_bindings=MODEL_DIM = 32",
      "--gin_bindings=moe_spec.expert_hidden_dim = 64",
  )
  rows = dict(
      (name, (params, ops))
      for name, params, ops in re.findall(
          r"^\| (\S+) \| ([\d.]+)M \| (\d+)k \|$", result.stdout, flags=re.M
      )
  )
  d, h, n, k = 32, 64, 256, 4
  dense = 4 * _lstm(d)  # 32,768: four LSTM layers
  # Two LSTM layers, n experts of 2dh, W_g and W_noise of d x n each.
  moe_params = 2 * _lstm(d) + n * 2 * d * h + 2 * d * n  # 1,081,344
  moe_ops = 2 * _lstm(d) + k * 2 * d * h + 2 * d * n  # 49,152
  expected = (f"{dense / 1e6:.2f}", f"{dense / 1e3:.0f}")
  assert rows["4xlstm_128"] == expected == ("0.03", "33")
  moe = (f"{moe_params / 1e6:.2f}", f"{moe_ops / 1e3:.0f}")
  assert rows["moe_256"] == moe == ("1.08", "49")
  # The variant zeroes loss weights only: same model.
  assert rows["moe_256@nobalance"] == moe


def test_moe_4_as_the_baseline_is_one_reference_not_two(tmp_path):
  """The margins are against the baseline and MoE-4: once each, not twice."""
  result = _table(tmp_path, "--configs=moe_4,moe_32", "--grid_lr=1e-3")
  assert result.stdout.count("(no moe_4 runs yet)") == 1, result.stdout
  assert result.stdout.count("paired with a moe_4 seed") == 1, result.stdout


def test_a_corrupt_summary_is_one_line_naming_the_file(tmp_path):
  runs = tmp_path / "results" / "runs"
  runs.mkdir(parents=True)
  bad = runs / "4xlstm_128_lr0.001_s0_3000.json"
  bad.write_text('{"config": "4xl')  # e.g. cut short by a copy
  result = _table(
      tmp_path,
      "--configs=4xlstm_128",
      "--grid_lr=1e-3",
      "--seeds=0",
      "--train_steps=3000",
      check=False,
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith(f"lm_results.py: error: cannot read {bad}: ")
  ), result.stderr
  assert bad.read_text() == '{"config": "4xl'


def _write_finished_runs(results_dir, config, seeds):
  """Summaries of finished 100-step runs of `config` at 1e-3."""
  for seed in seeds:
    bench_testlib.write_summary(
        results_dir,
        results_lib.Run(config, 1e-3, seed, 100),
        final_dev=200.0 + seed,
        test_ppl=190.0 + seed,
        curve=bench_testlib.curve(
            [(50, 5e4, 50.0, 300.0 + seed), (100, 1e5, 100.0, 200.0 + seed)]
        ),
        seconds=100.0,
        tokens=1e5,
    )


def test_only_the_modes_of_the_whole_table_write_its_plots(tmp_path):
  """A --mode=grid lane of one config leaves the table's PNGs alone."""
  # 100: the sweep's seed (results_lib.SWEEP_SEED).
  _write_finished_runs(tmp_path / "results", "4xlstm_128", (0, 1, 100))
  flags = ("--configs=4xlstm_128", "--grid_lr=1e-3", "--seeds=0,1")
  flags += ("--train_steps=100",)
  for mode in ("grid", "sweep"):  # every run finished: nothing trains
    result = _table(tmp_path, *flags, f"--mode={mode}", "--lrs=1e-3")
    assert (
        f"plots: not written by --mode={mode} (it may run some of the table's"
        " configs); --mode=table writes them for the whole table"
    ) in result.stdout, result.stdout
    assert not list((tmp_path / "results").glob("*.png"))
  result = _table(tmp_path, *flags, "--lrs=1e-3")
  assert sorted(p.name for p in (tmp_path / "results").glob("*.png")) == [
      "curves_100steps_lr0.001_tokens.png",
      "curves_100steps_lr0.001_wallclock.png",
  ], result.stdout  # no margins: one row has no baseline to compare


def test_a_failing_run_is_one_line_with_the_cause_from_its_log(tmp_path):
  result = _table(
      tmp_path,
      "--configs=4xlstm_128",
      "--grid_lr=1e-3",
      "--seeds=0",
      "--train_steps=10",
      "--mode=grid",
      f"--output_dir={tmp_path / 'runs'}",
      "--gin_bindings=NOPE.x = 1",  # the trainer refuses it
      check=False,
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  log = tmp_path / "runs" / "4xlstm_128_lr0.001_s0_10" / "run.log"
  assert result.stderr.strip().splitlines()[-1] == (
      "lm_results.py: error: python -m moe_keras.train exited 1:"
      " moe_keras.train: error: bad gin config: No configurable matching"
      f" 'NOPE'. (log: {log})"
  ), result.stderr


def test_both_front_ends_list_the_shared_flags_in_their_short_help():
  """--helpshort shows results_flags' flags (key flags of each front end)."""
  for script in ("lm_results.py", "mt_results.py"):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", script),
            "--helpshort",
        ],
        capture_output=True,
        text=True,
        check=False,  # absl's --helpshort exits 1 after printing
        timeout=300,
    )
    for flag in ("--mode", "--seeds", "--lrs", "--grid_lr", "--results_dir"):
      assert f"\n  {flag}:" in result.stdout, (script, flag, result.stdout)


def test_a_table_of_fewer_configs_does_not_replace_the_plots(tmp_path):
  """Same lengths and rate: a subset is written beside (--plot_tag) or not."""
  _write_finished_runs(tmp_path / "results", "4xlstm_128", (0, 1))
  _write_finished_runs(tmp_path / "results", "moe_4", (0, 1))
  flags = ("--grid_lr=1e-3", "--seeds=0,1", "--train_steps=100", "--lrs=1e-3")
  results = tmp_path / "results"
  _table(tmp_path, "--configs=4xlstm_128,moe_4", *flags)
  pngs = {p.name: p.read_bytes() for p in results.glob("*.png")}
  assert sorted(pngs) == [
      "curves_100steps_lr0.001_tokens.png",
      "curves_100steps_lr0.001_wallclock.png",
      "margins_100steps_lr0.001_tokens.png",
  ]
  # One lane's configs (e.g. --mode=all of one config): tables, no plots.
  result = _table(tmp_path, "--configs=4xlstm_128", *flags)
  assert (
      f"plots: not written: {results}/curves_100steps_lr0.001_tokens.png"
      " shows configs 4xlstm_128,moe_4, and this table's (4xlstm_128) lack"
      " moe_4: --plot_tag=NAME writes its plots beside it"
  ) in result.stdout.splitlines(), result.stdout
  assert {p.name: p.read_bytes() for p in results.glob("*.png")} == pngs
  _table(tmp_path, "--configs=4xlstm_128", *flags, "--plot_tag=dense_only")
  assert sorted(p.name for p in results.glob("*.png")) == sorted(
      list(pngs)
      + [
          "curves_100steps_lr0.001_dense_only_tokens.png",
          "curves_100steps_lr0.001_dense_only_wallclock.png",
      ]
  )
  # The same configs or more (the whole table after a lane) replace them.
  result = _table(tmp_path, "--configs=moe_4,4xlstm_128,moe_32", *flags)
  assert "plots: not written" not in result.stdout, result.stdout
  assert results_plots.recorded_configs(
      str(results / "curves_100steps_lr0.001_tokens.png")
  ) == ["moe_4", "4xlstm_128", "moe_32"]
  bad = _table(
      tmp_path, "--configs=4xlstm_128", *flags, "--plot_tag=a/b", check=False
  )
  assert bad.returncode == 1
  assert "--plot_tag must match" in bad.stderr, bad.stderr
