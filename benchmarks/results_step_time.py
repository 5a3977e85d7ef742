"""Training step time of each config on this machine (--mode=speed).

The results tables turn a run's training tokens into wall clock with the
step times measured here on an otherwise idle machine
(`results_tables.time_to_quality_table`): a grid run's own training seconds
include whatever else shared the machine. Each config trains through `moe_keras.train`, as
every grid run does (`results_lib.train`), and the learning curve's training
wall clock is read; the configs alternate within each round so that a
change of machine load hits all of them alike. The measurements go to
`STEP_TIME_FILE` in the results directory, with the machine they were taken
on.
"""

import os
import platform
import shutil
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras import learning_curve  # pylint: disable=g-import-not-at-top,wrong-import-position

STEP_TIME_FILE = "step_time.json"


def measure_step_time(
    corpus: results_lib.Corpus,
    config: str,
    lr: Optional[float],
    work_dir: str,
    period: int,
    extra_bindings: Sequence[str] = (),
) -> dict:
  """Seconds and tokens per training step of `config`, measured now.

  Trains 3 * `period` steps (seed 0, the real data pipeline, model and
  optimizer, through `moe_keras.train` as every grid run, without
  validation) in `work_dir`, which is removed afterwards, and reads the
  learning curve's training wall clock: the steps from `period` to
  3 * `period` (the first period, with tracing and warm-up, is left out;
  checkpoints are not in the curve's training seconds).

  Args:
    corpus: the corpus the config belongs to.
    config: NAME or NAME@VARIANT.
    lr: its rate (None: the config's own); it does not change the time.
    work_dir: a directory that does not exist yet.
    period: steps per curve point.
    extra_bindings: bindings of every run of the grid (--gin_bindings).

  Returns:
    {"seconds_per_step", "tokens_per_step"}.
  """
  if os.path.exists(work_dir):
    raise results_lib.GridError(
        f"step-time work dir {work_dir} exists already (left by an"
        " interrupted --mode=speed, or one running now): remove it and rerun"
    )
  run = results_lib.Run(config, lr, 0, 3 * period)
  os.makedirs(work_dir)
  try:
    results_lib.train(
        results_lib.gin_file(corpus, config),
        work_dir,
        results_lib.run_bindings(corpus, run, period)
        + list(extra_bindings)
        + ["training.steps_per_eval = None"],  # no validation
        os.path.join(work_dir, "run.log"),
    )
    points = {p["step"]: p for p in learning_curve.read_curve(work_dir)}
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)
  first, last = points[period], points[3 * period]
  steps = 2 * period
  return {
      "seconds_per_step": (
          (last["train_seconds"] - first["train_seconds"]) / steps
      ),
      "tokens_per_step": (last["tokens"] - first["tokens"]) / steps,
  }


def measure_step_times(
    corpus: results_lib.Corpus,
    configs: Sequence[str],
    rates: Dict[str, float],
    results_dir: str,
    work_dir: str,
    period: int,
    rounds: int,
    extra_bindings: Sequence[str] = (),
) -> Dict[str, dict]:
  """Step time of every config, `rounds` alternating rounds; writes a file.

  The configs alternate within each round, so that a change of machine load
  hits all of them alike; the median over rounds is kept. The result goes
  to `STEP_TIME_FILE` in results_dir with the machine it was measured on.
  Take it on an otherwise idle machine: it is what turns the tables' tokens
  into wall clock (`results_tables.time_to_quality_table`), where the runs'
  own training seconds include whatever else shared the machine.

  Returns:
    {config: {"seconds_per_step", "tokens_per_step", "rounds": [...],
    "timed_steps", "measured", "code"}}.
  """
  measured = {config: [] for config in configs}
  for r in range(rounds):
    for config in configs:
      measured[config].append(
          measure_step_time(
              corpus,
              config,
              rates.get(config),
              os.path.join(work_dir, f"step_time_{config}_{r}"),
              period,
              extra_bindings,
          )
      )
  # Each config's entry says when and how it was measured: a later
  # measurement of some configs keeps the others' entries.
  provenance = {
      "timed_steps": 2 * period,
      "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "code": results_lib.code_version(),
  }
  result = {
      config: {
          "seconds_per_step": statistics.median(
              m["seconds_per_step"] for m in values
          ),
          "tokens_per_step": statistics.median(
              m["tokens_per_step"] for m in values
          ),
          "rounds": [m["seconds_per_step"] for m in values],
          **provenance,
      }
      for config, values in measured.items()
  }
  os.makedirs(results_dir, exist_ok=True)
  configs_measured = read_step_times(results_dir)
  configs_measured.update(result)
  results_lib.write_json(
      os.path.join(results_dir, STEP_TIME_FILE),
      {
          "host": platform.node(),
          "cpus": os.cpu_count(),
          "configs": configs_measured,
      },
  )
  return result


def step_time_lines(step_times: Dict[str, dict]) -> str:
  """One line per config of `measure_step_times`' result."""
  return "\n".join(
      f"{config}: {t['seconds_per_step']:.3f} s/step (rounds:"
      f" {', '.join(f'{r:.3f}' for r in t['rounds'])}),"
      f" {t['tokens_per_step']:.0f} tokens/step"
      for config, t in step_times.items()
  )


def run_speed_mode(corpus, configs, rates, results_dir, work_dir, flag_values):
  """--mode=speed of the front ends: measures, writes and prints step times.

  Args:
    corpus, configs, rates, results_dir, work_dir: as `measure_step_times`.
    flag_values: the front end's flags (speed_period, speed_rounds,
      gin_bindings).
  """
  measured = measure_step_times(
      corpus,
      configs,
      rates,
      results_dir,
      work_dir,
      period=flag_values.speed_period,
      rounds=flag_values.speed_rounds,
      extra_bindings=flag_values.gin_bindings,
  )
  print(step_time_lines(measured), flush=True)


def read_step_times(results_dir) -> Dict[str, dict]:
  """{config: {"seconds_per_step", "tokens_per_step", ...}} or {}."""
  return results_lib.read_json_field(results_dir, STEP_TIME_FILE, "configs")
