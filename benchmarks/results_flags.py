"""The results front ends' shared flags, and the grid they select.

`benchmarks/lm_results.py` and `benchmarks/mt_results.py` define these flags
(`define_seed_and_rate_flags`, `define_shared_flags`; `benchmarks/lm_gpu.py`
the first) with the same meaning and validation, read them into a
`results_lib.Grid` (`grid_from_flags`), and run it (`run_grid`: the
methodology's sweep and table runs, `results_lib.run_procedure`, or
--mode=speed's step times, `results_step_time`). `run_main` turns a
`results_lib.GridError` or `results_lib.RunFailed` into one line.
"""

import os
import re
import sys
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_step_time  # pylint: disable=g-import-not-at-top,wrong-import-position


def _positive_float(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


def _distinct_list(texts: List[str], parse, valid) -> bool:
  """Whether texts is non-empty, each parses and is valid, none repeated."""
  try:
    values = [parse(t) for t in texts]
  except ValueError:
    return False
  return (
      bool(values)
      and all(map(valid, values))
      and len(set(values)) == len(values)
  )


def define_seed_and_rate_flags(
    seeds: List[str], lrs: List[str], seeds_help: str, lrs_help: str
) -> None:
  """--seeds and --lrs, validated when the flags are parsed.

  A value that is not a number (or not a positive rate), an empty list or a
  repeated entry (which would count one run twice in a table's mean and
  spread) stops the program with a one-line flags error naming the flag.

  Args:
    seeds: the default seeds, as strings.
    lrs: the default peak learning rates, as strings.
    seeds_help, lrs_help: the flags' help.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_list("seeds", seeds, seeds_help)
  flags.register_validator(
      "seeds",
      lambda value: _distinct_list(value, int, lambda seed: True),
      message="--seeds must be distinct integers, e.g. 0,1,2",
  )
  flags.DEFINE_list("lrs", lrs, lrs_help)
  flags.register_validator(
      "lrs",
      lambda value: _distinct_list(value, float, lambda lr: lr > 0),
      message="--lrs must be distinct positive learning rates, e.g. 1e-3,2e-3",
  )


def define_shared_flags(task: str, speed_period: int) -> None:
  """The absl flags both front ends take, with the same meaning.

  --mode, --output_dir, --results_dir, --gin_bindings, --continue_from,
  --grid_lr, --table_lrs and --speed_*; `grid_from_flags` reads them.

  Args:
    task: "lm" or "mt", the prefix of the default directories
      (~/moe_keras_runs/<task>_<corpus>, results/<task>_<corpus>).
    speed_period: the front end's default --speed_period (steps).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum(
      "mode",
      "all",
      ["all", "sweep", "grid", "table", "speed"],
      "sweep: the rate sweep; grid: the table's runs; all: both; table:"
      " print; speed: measure each config's training step time"
      " (results_step_time.measure_step_times; on an idle machine), then"
      " print.",
  )
  flags.DEFINE_string(
      "output_dir",
      None,
      f"Model dirs (default ~/moe_keras_runs/{task}_<corpus>).",
  )
  flags.DEFINE_string(
      "results_dir", None, f"Summaries (default results/{task}_<corpus>)."
  )
  flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every run.")
  flags.DEFINE_integer(
      "continue_from",
      None,
      "A run not started yet starts from the finished run of the same config,"
      " rate and seed with this many steps (its checkpoints and curve:"
      " results_lib.continue_run), e.g. 2000-step runs from the 1000-step"
      " ones.",
      lower_bound=1,
  )
  flags.DEFINE_float(
      "grid_lr",
      None,
      "Grid and table runs of every config at this rate instead of the rate"
      " its sweep chose (e.g. every config at a second rate, when one sweep"
      " seed's choice is in doubt); the sweep itself is unchanged.",
  )
  flags.register_validator(
      "grid_lr",
      lambda value: value is None or value > 0,
      message="--grid_lr must be a positive learning rate",
  )
  flags.DEFINE_string(
      "plot_tag",
      None,
      "A name for this table's PNGs (curves_<N>steps..._<tag>_*.png), so"
      " that a table of other configs at the same lengths and rate writes its"
      " plots beside the existing ones; without it, plots that show configs"
      " this table lacks are kept and this table's not written"
      " (results_plots.check_plot_conflicts).",
  )
  flags.register_validator(
      "plot_tag",
      lambda value: value is None
      or bool(re.fullmatch(results_plots.PLOT_TAG_PATTERN, value)),
      message="--plot_tag must match " + results_plots.PLOT_TAG_PATTERN,
  )
  flags.DEFINE_list(
      "table_lrs",
      None,
      "Also print every config at each of these rates (grid runs made with"
      " --grid_lr, once per rate) and each config at its rate of lowest mean"
      " final dev perplexity over --seeds (results_tables.rate_grid_report).",
  )
  flags.register_validator(
      "table_lrs",
      lambda value: value is None or all(_positive_float(v) for v in value),
      message="--table_lrs must be positive learning rates",
  )
  flags.DEFINE_integer(
      "speed_period",
      speed_period,
      "--mode=speed: steps per timing period (3 periods run, the last 2"
      " timed).",
      lower_bound=1,
  )
  flags.DEFINE_integer(
      "speed_rounds", 3, "--mode=speed: alternating rounds.", lower_bound=1
  )


def grid_from_flags(
    flag_values,
    corpora: Dict[str, results_lib.Corpus],
    task: str,
    sweep_variants: bool,
) -> results_lib.Grid:
  """The `Grid` of a front end's flags (`define_shared_flags` and its own).

  Args:
    flag_values: the parsed flags (corpus, configs, sweep_configs, seeds,
      lrs, train_steps, sweep_steps, output_dir, results_dir, grid_lr).
    corpora: {--corpus value: Corpus}.
    task: "lm" or "mt", as `define_shared_flags`.
    sweep_variants: whether --sweep_configs defaults to every config (MT)
      or only those without @variants (LM: a variant takes its base's rate).

  Returns:
    The grid.

  Raises:
    GridError: a config or swept config without its gin file.
  """
  corpus = corpora[flag_values.corpus]
  configs = list(flag_values.configs)
  results_lib.check_configs(corpus, configs)
  sweep_configs = flag_values.sweep_configs or [
      c for c in configs if sweep_variants or "@" not in c
  ]
  results_lib.check_configs(corpus, sweep_configs)
  results_dir = flag_values.results_dir or os.path.join(
      results_lib.REPO, "results", f"{task}_{corpus.name}"
  )
  output_dir = os.path.expanduser(
      flag_values.output_dir or f"~/moe_keras_runs/{task}_{corpus.name}"
  )
  for name, path in (("results_dir", results_dir), ("output_dir", output_dir)):
    if os.path.exists(path) and not os.path.isdir(path):
      raise results_lib.GridError(
          f"--{name}={path} exists and is not a directory"
      )
  return results_lib.Grid(
      corpus=corpus,
      configs=configs,
      sweep_configs=list(sweep_configs),
      seeds=[int(s) for s in flag_values.seeds],
      lrs=[float(x) for x in flag_values.lrs],
      steps=flag_values.train_steps,
      sweep_steps=flag_values.sweep_steps or flag_values.train_steps,
      output_dir=output_dir,
      results_dir=results_dir,
      grid_lr=flag_values.grid_lr,
      plot_tag=flag_values.plot_tag,
  )


def execute_in_grid(
    grid: results_lib.Grid,
    run: results_lib.Run,
    flag_values,
    eval_flags,
    summarize,
):
  """`execute` with the grid's dirs and the flags' bindings and period.

  Args:
    grid: the front end's grid.
    run: one run of it.
    flag_values: the parsed flags (steps_per_eval, gin_bindings,
      continue_from).
    eval_flags, summarize: as `execute`.

  Returns:
    The run's summary, as `execute`.
  """
  return results_lib.execute(
      grid.corpus,
      run,
      output_dir=grid.output_dir,
      results_dir=grid.results_dir,
      steps_per_eval=flag_values.steps_per_eval,
      eval_flags=eval_flags,
      summarize=summarize,
      extra_bindings=flag_values.gin_bindings,
      continue_from=flag_values.continue_from,
  )


def run_grid(
    grid: results_lib.Grid, flag_values, execute_fn, lr_from=None
) -> Dict[str, float]:
  """--mode's runs (`run_procedure`), then --mode=speed's step times.

  Args:
    grid: the front end's grid.
    flag_values: the parsed flags (mode, speed_*, gin_bindings).
    execute_fn: trains and summarizes one `Run`.
    lr_from: as `run_procedure`.

  Returns:
    {config: its table rate}.
  """
  rates = results_lib.run_procedure(
      flag_values.mode,
      grid.configs,
      grid.sweep_configs,
      grid.seeds,
      grid.lrs,
      grid.steps,
      grid.results_dir,
      execute_fn,
      lr_from=lr_from,
      sweep_steps=grid.sweep_steps,
      grid_lr=grid.grid_lr,
  )
  if flag_values.mode == "speed":
    results_step_time.run_speed_mode(
        grid.corpus,
        grid.configs,
        rates,
        grid.results_dir,
        grid.output_dir,
        flag_values,
    )
  return rates


def run_main(main_fn: Callable[[], None], script: str) -> None:
  """Runs a front end's main; a `GridError` or `RunFailed` is one line."""
  try:
    main_fn()
  except (results_lib.GridError, results_lib.RunFailed) as e:
    sys.exit(f"{script}: error: {e}")
