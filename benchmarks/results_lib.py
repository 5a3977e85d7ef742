"""Results methodology, once: grids of configs x learning rates x seeds.

`benchmarks/lm_results.py` and `benchmarks/mt_results.py` are thin front
ends over this module. A grid is a list of `Run`s; each trains with
`python -m moe_keras.train` in a fresh process (one at a time: this is what
wall clock is measured on), validates every checkpoint period (the learning
curve, `moe_keras.learning_curve`), evaluates the test split, and writes one
summary JSON per run into the results directory. Rerunning the same command
skips finished runs and resumes interrupted ones from their last checkpoint
(the model directories live in --output_dir, outside the repository).

The procedure the tables follow:

1. Learning rates: a dev-set sweep (`--mode=sweep`) trains every config at
   every rate of `--lrs` with seed `SWEEP_SEED` (not one of the table's
   seeds, so the chosen rate's table rows are not the sweep's lucky draw)
   for the table's step budget, and picks per config the rate of lowest
   final dev perplexity; dense and MoE get the same rates and the same rule.
   The choice is written to `lr_choice_<steps>steps.json`, one file per
   sweep length, so a longer sweep does not replace a shorter one's.
2. The table (`--mode=grid`): every config at its chosen rate with every
   seed of `--seeds`, the same steps, batches and data for all.
3. Statistics (`--mode=table`, also printed after 1 and 2): per config the
   mean, sample standard deviation and range over seeds; the difference to
   the baseline in percent and whether it exceeds twice the larger of the
   two standard deviations; the budget (steps, training tokens, training
   wall clock); tokens and wall clock to reach the baseline's final dev
   perplexity; PNG learning curves (dev perplexity vs tokens and vs wall
   clock, mean over seeds with the seeds' range shaded).
"""

import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_keras import learning_curve  # pylint: disable=g-import-not-at-top,wrong-import-position

SWEEP_SEED = 100
SUMMARY_DIR = "runs"
# One rate choice per sweep length: lr_choice_<steps>steps.json.
LR_CHOICE_FILE = "lr_choice_{steps}steps.json"
STEP_TIME_FILE = "step_time.json"
# Named variants: NAME@VARIANT trains NAME with these extra bindings.
VARIANTS = {
    "nobalance": ("moe_spec.w_importance = 0.0", "moe_spec.w_load = 0.0"),
    "top_k": ("moe_spec.gating = 'top_k'",),
    "noisy_top_k": ("moe_spec.gating = 'noisy_top_k'",),
    "batchwise": ("moe_spec.gating = 'batchwise'",),
    # The gate noise of eq. (4) at a tenth of its standard deviation (the
    # paper's W_noise still learns it): is the routing in training decided
    # by the noise rather than by the gate (README "Results", MoE-1024-h)?
    "noise_x0.1": ("moe_spec.noise_scale = 0.1",),
    # 4x the tokens per step (the LM corpora's 4096 -> 16384-token batches;
    # dev batches unchanged): each of n experts sees 4x the ~k/n share of
    # the batch (section 3.1, the shrinking batch problem). Run it at 1/4
    # of the steps to compare at equal training tokens.
    "lm_batch_x4": (
        "lm_batching.batch_tokens = 16384",
        "lm_batching.eval_batch_tokens = 4096",
    ),
    # The experts (kernels and biases) at a fraction of the schedule's rate,
    # everything else at the full rate: does the expert part want a lower
    # rate than the dense part (each of n experts gets ~k/n of the batch)?
    # 0.125 and 0.354 are sqrt(k / n) for MoE-256 and MoE-32 (k = 4), the
    # square-root batch-size rule applied to an expert's share of the batch.
    **{
        f"expert_lr_x{scale}": (
            "make_optimizer.learning_rate_scales ="
            f" {{'expert_(kernel|bias)': {scale}}}",
        )
        for scale in ("0.25", "0.125", "0.354")
    },
}


class GridError(ValueError):
  """A bad grid specification (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Where a task's configs live and how a run is bound to it.

  Attributes:
    name: short name (results go to results/<task>_<name> by default).
    gin_dir: directory of the configs, relative to the repository.
    data_seed_binding: gin parameter of the data order seed, bound to the
      run's seed (None: the data order is the config's).
    extra_bindings: bindings every run of this corpus gets.
  """

  name: str
  gin_dir: str
  data_seed_binding: Optional[str] = None
  extra_bindings: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a grid."""

  config: str  # NAME or NAME@VARIANT
  lr: Optional[float]  # None: the config's own PEAK_LEARNING_RATE
  seed: int
  steps: int

  @property
  def run_id(self) -> str:
    lr = "default" if self.lr is None else f"{self.lr:g}"
    return f"{self.config.replace('@', '-')}_lr{lr}_s{self.seed}_{self.steps}"

  @property
  def base_config(self) -> str:
    return self.config.partition("@")[0]

  @property
  def variant(self) -> str:
    return self.config.partition("@")[2]


def check_configs(corpus: Corpus, configs: Sequence[str]) -> None:
  """Raises GridError for a config file that does not exist or a variant."""
  for config in configs:
    name, _, variant = config.partition("@")
    path = os.path.join(REPO, corpus.gin_dir, f"{name}.gin")
    if not os.path.exists(path):
      raise GridError(f"no config {path} for {config!r}")
    if variant and variant not in VARIANTS:
      raise GridError(
          f"unknown variant {variant!r} in {config!r} (one of"
          f" {sorted(VARIANTS)})"
      )


def run_bindings(corpus: Corpus, run: Run, steps_per_eval: int) -> List[str]:
  """The gin bindings that make `run` (steps, seed, rate, variant, evals)."""
  bindings = [
      f"TRAIN_STEPS = {run.steps}",
      f"SEED = {run.seed}",
      f"training.steps_per_checkpoint = {steps_per_eval}",
      f"training.steps_per_eval = {steps_per_eval}",
  ]
  if run.lr is not None:
    bindings.append(f"PEAK_LEARNING_RATE = {run.lr!r}")
  if corpus.data_seed_binding:
    bindings.append(f"{corpus.data_seed_binding} = {run.seed}")
  bindings += list(corpus.extra_bindings)
  if run.variant:
    bindings += list(VARIANTS[run.variant])
  return bindings


def _subprocess(args, log_path):
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with open(log_path, "a") as log:
    log.write(f"\n$ python -m {' '.join(args)}\n")
    log.flush()
    result = subprocess.run(
        [sys.executable, "-m"] + list(args),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        check=False,
    )
  if result.returncode:
    raise RuntimeError(
        f"python -m {args[0]} exited {result.returncode}; see {log_path}"
    )


def _train(gin_file, model_dir, bindings, log_path):
  """`python -m moe_keras.train` of one run (or its resumption)."""
  _subprocess(
      [
          "moe_keras.train",
          f"--gin_file={gin_file}",
          f"--model_dir={model_dir}",
          "--verbose=2",
      ]
      + [f"--gin_bindings={b}" for b in bindings],
      log_path,
  )


def code_version() -> str:
  """`git describe`-like id of the code a run trained with (+dirty)."""
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "moe_keras",
            "data_pipelines",
            "eval",
            "gin",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def _write_json(path, value):
  """Writes `value` to `path` atomically (a reader never sees half of it)."""
  tmp_path = f"{path}.tmp{os.getpid()}"
  with open(tmp_path, "w") as f:
    json.dump(value, f, indent=1)
    f.write("\n")
  os.replace(tmp_path, path)


def _read_json_field(results_dir, name, field):
  """results_dir/name's `field`, or {} when the file does not exist."""
  path = os.path.join(results_dir, name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)[field]


def summary_path(results_dir: str, run: Run) -> str:
  return os.path.join(results_dir, SUMMARY_DIR, f"{run.run_id}.json")


def load_summary(results_dir: str, run: Run) -> Optional[dict]:
  path = summary_path(results_dir, run)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def execute(
    corpus: Corpus,
    run: Run,
    output_dir: str,
    results_dir: str,
    steps_per_eval: int,
    eval_flags: Sequence[str],
    summarize: Callable[[dict], dict],
    extra_bindings: Sequence[str] = (),
    continue_from: Optional[int] = None,
) -> dict:
  """Trains (or resumes), evaluates the test split and writes the summary.

  Args:
    corpus: the corpus the configs belong to.
    run: what to train.
    output_dir: parent of the run's model_dir.
    results_dir: where the summary JSON goes (`runs/<run_id>.json`).
    steps_per_eval: checkpoint and validation period (the curve's points).
    eval_flags: extra `moe_keras.evaluate` flags.
    summarize: eval_test.json -> the metrics to keep (task-specific).
    extra_bindings: bindings given to every run of the grid (--gin_bindings).
    continue_from: None, or the steps of a shorter finished run of the same
      config, rate and seed that this run starts from (`continue_run`) when
      its model dir does not exist yet; runs of at most that many steps
      (e.g. the sweep's) train as usual.

  Returns:
    The summary dict (also written to results_dir).

  Raises:
    GridError: `continue_from`'s run is missing or unfinished.
  """
  existing = load_summary(results_dir, run)
  if existing is not None:
    return existing
  model_dir = os.path.join(output_dir, run.run_id)
  if (
      continue_from is not None
      and continue_from < run.steps
      and not os.path.exists(model_dir)
  ):
    continue_run(output_dir, run, continue_from)
  os.makedirs(model_dir, exist_ok=True)
  log_path = os.path.join(model_dir, "run.log")
  gin_file = os.path.join(REPO, corpus.gin_dir, f"{run.base_config}.gin")
  bindings = run_bindings(corpus, run, steps_per_eval) + list(extra_bindings)
  started = time.time()
  code = code_version()
  _train(gin_file, model_dir, bindings, log_path)
  _subprocess(
      ["moe_keras.evaluate", f"--model_dir={model_dir}", "--split=test"]
      + list(eval_flags),
      log_path,
  )
  with open(os.path.join(model_dir, "eval_test.json")) as f:
    test = json.load(f)
  curve = learning_curve.read_curve(model_dir)
  if not curve or curve[-1]["step"] != run.steps:
    raise RuntimeError(f"{model_dir}: the curve does not reach {run.steps}")
  summary = {
      "run_id": run.run_id,
      "config": run.config,
      "lr": run.lr,
      "seed": run.seed,
      "steps": run.steps,
      "gin_file": os.path.relpath(gin_file, REPO),
      "bindings": bindings,
      "tokens": curve[-1]["tokens"],
      "train_seconds": curve[-1]["train_seconds"],
      "final_dev_perplexity": curve[-1].get("val_perplexity"),
      "test": summarize(test),
      "curve": [
          {
              "step": r["step"],
              "tokens": r["tokens"],
              "train_seconds": r["train_seconds"],
              "dev_perplexity": r.get("val_perplexity"),
              "train_loss": r.get("loss"),
          }
          for r in curve
      ],
      "code": code,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "process_seconds": time.time() - started,
  }
  path = summary_path(results_dir, run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_json(path, summary)
  return summary


# Files of a finished run that describe its end, not its training state.
_END_OF_RUN_FILES = ("eval_test.json", "translations_test.txt")


def continue_run(output_dir: str, run: Run, shorter_steps: int) -> str:
  """Starts `run`'s model dir as a copy of its shorter finished run's.

  The learning-rate schedules and the data order are functions of the step,
  not of the run's length (TRAIN_STEPS), and a resumed run equals an
  uninterrupted one (`tests/cli/test_lm_cli.py::
  test_kill_and_resume_gives_the_same_weights`), so a 2000-step run that
  starts from the finished 1000-step run's last checkpoint and curve is the
  2000-step run, for half the compute. The copy (checkpoints, curve, config,
  logs; not the shorter run's test results) is made under a temporary name
  and renamed, so an interrupted copy leaves no model dir.

  Args:
    output_dir: parent of the model dirs.
    run: the longer run (its model dir must not exist).
    shorter_steps: the finished run's steps, < run.steps.

  Returns:
    The new model dir.

  Raises:
    GridError: no such finished run, or shorter_steps >= run.steps.
  """
  if shorter_steps >= run.steps:
    raise GridError(
        f"--continue_from={shorter_steps} is not shorter than the runs'"
        f" {run.steps} steps"
    )
  source = os.path.join(
      output_dir, dataclasses.replace(run, steps=shorter_steps).run_id
  )
  curve = learning_curve.read_curve(source) if os.path.isdir(source) else []
  if not curve or curve[-1]["step"] != shorter_steps:
    reached = curve[-1]["step"] if curve else "no"
    raise GridError(
        f"{run.run_id} continues {source}, which has {reached} steps of"
        f" {shorter_steps}: finish that run first (or drop --continue_from)"
    )
  target = os.path.join(output_dir, run.run_id)
  partial = target + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(
      source, partial, ignore=shutil.ignore_patterns(*_END_OF_RUN_FILES)
  )
  os.replace(partial, target)
  return target


# -- step time on this machine ---------------------------------------------


def measure_step_time(
    corpus: Corpus,
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
    raise GridError(
        f"step-time work dir {work_dir} exists already (left by an"
        " interrupted --mode=speed, or one running now): remove it and rerun"
    )
  run = Run(config, lr, 0, 3 * period)
  os.makedirs(work_dir)
  try:
    _train(
        os.path.join(REPO, corpus.gin_dir, f"{run.base_config}.gin"),
        work_dir,
        run_bindings(corpus, run, period)
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
    corpus: Corpus,
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
  into wall clock (`time_to_quality_table`), where the runs' own training
  seconds include whatever else shared the machine.

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
      "code": code_version(),
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
  _write_json(
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


def _positive_float(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


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
      " (results_lib.measure_step_times; on an idle machine), then print.",
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
  flags.DEFINE_list(
      "table_lrs",
      None,
      "Also print every config at each of these rates (grid runs made with"
      " --grid_lr, once per rate) and each config at its rate of lowest mean"
      " final dev perplexity over --seeds (results_lib.rate_grid_report).",
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


@dataclasses.dataclass(frozen=True)
class Grid:
  """What a front end's flags select: its configs, seeds, rates and dirs."""

  corpus: Corpus
  configs: List[str]  # the table's rows; the first is the baseline
  sweep_configs: List[str]
  seeds: List[int]
  lrs: List[float]
  steps: int  # of every table run
  sweep_steps: int  # of the sweep's runs
  output_dir: str  # model dirs
  results_dir: str  # summaries, rate choices, plots
  grid_lr: Optional[float] = None  # --grid_lr: every table run's rate


def grid_from_flags(
    flag_values, corpora: Dict[str, Corpus], task: str, sweep_variants: bool
) -> Grid:
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
  check_configs(corpus, configs)
  sweep_configs = flag_values.sweep_configs or [
      c for c in configs if sweep_variants or "@" not in c
  ]
  check_configs(corpus, sweep_configs)
  return Grid(
      corpus=corpus,
      configs=configs,
      sweep_configs=list(sweep_configs),
      seeds=[int(s) for s in flag_values.seeds],
      lrs=[float(x) for x in flag_values.lrs],
      steps=flag_values.train_steps,
      sweep_steps=flag_values.sweep_steps or flag_values.train_steps,
      output_dir=os.path.expanduser(
          flag_values.output_dir or f"~/moe_keras_runs/{task}_{corpus.name}"
      ),
      results_dir=flag_values.results_dir
      or os.path.join(REPO, "results", f"{task}_{corpus.name}"),
      grid_lr=flag_values.grid_lr,
  )


def execute_in_grid(grid: Grid, run: Run, flag_values, eval_flags, summarize):
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
  return execute(
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
    grid: Grid, flag_values, execute_fn, lr_from=None
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
  rates = run_procedure(
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
    run_speed_mode(
        grid.corpus,
        grid.configs,
        rates,
        grid.results_dir,
        grid.output_dir,
        flag_values,
    )
  return rates


def write_grid_plots(rows: List["Row"], grid: Grid) -> List[str]:
  """`write_plots` for the grid's sweep and table; returns the PNGs' paths."""
  return write_plots(
      rows,
      grid.results_dir,
      grid.corpus.name,
      grid.sweep_configs,
      grid.lrs,
      grid.steps,
      sweep_steps=grid.sweep_steps,
      grid_lr=grid.grid_lr,
  )


def run_main(main_fn: Callable[[], None], script: str) -> None:
  """Runs a front end's main; a `GridError` exits with one line."""
  try:
    main_fn()
  except GridError as e:
    sys.exit(f"{script}: error: {e}")


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
  return _read_json_field(results_dir, STEP_TIME_FILE, "configs")


# -- learning-rate choice ----------------------------------------------------


def sweep_runs(configs, lrs, steps) -> List[Run]:
  """Rate-major order: a partial sweep has every config at the first rates."""
  return [Run(c, lr, SWEEP_SEED, steps) for lr in lrs for c in configs]


def choose_lrs(results_dir, configs, lrs, steps) -> Dict[str, float]:
  """Per config the swept rate of lowest final dev perplexity (all present).

  Returns:
    {config: lr} for every config whose sweep runs are all finished.
  """
  choice = {}
  for config in configs:
    scores = {}
    for lr in lrs:
      summary = load_summary(results_dir, Run(config, lr, SWEEP_SEED, steps))
      if summary is None or summary["final_dev_perplexity"] is None:
        break
      scores[lr] = summary["final_dev_perplexity"]
    else:
      choice[config] = min(scores, key=scores.get)
  return choice


def write_lr_choice(results_dir, choice, lrs, steps):
  """Writes `choice` to the sweep length's file, keeping other choices.

  A sweep of some configs (e.g. one background lane per config) keeps the
  choices already written for other configs by a sweep of the same rates;
  a sweep of other rates replaces the file. Each sweep length has its own
  file (`LR_CHOICE_FILE`), so a 2000-step sweep leaves the 1000-step
  sweep's choice to the tables that use it.
  The file is replaced atomically, so a reader never sees half of it.

  Args:
    results_dir: where the lr_choice files are.
    choice: {config: rate} of this sweep.
    lrs: the swept rates.
    steps: the sweep runs' steps.
  """
  path = os.path.join(results_dir, LR_CHOICE_FILE.format(steps=steps))
  os.makedirs(results_dir, exist_ok=True)
  merged = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("steps") == steps and previous.get("lrs") == list(lrs):
      merged.update(previous.get("choice", {}))
  merged.update(choice)
  _write_json(
      path,
      {
          "rule": "lowest final dev perplexity",
          "seed": SWEEP_SEED,
          "steps": steps,
          "lrs": list(lrs),
          "choice": merged,
      },
  )


def read_lr_choice(results_dir, steps) -> Dict[str, float]:
  """{config: rate} chosen by the `steps`-step sweep, or {}."""
  return _read_json_field(
      results_dir, LR_CHOICE_FILE.format(steps=steps), "choice"
  )


def rates_for(configs, choice, lr_from=None) -> Dict[str, float]:
  """{config: rate} for the table's rows from the sweep's `choice`.

  NAME@VARIANT takes NAME's rate; a config not swept takes `lr_from`'s.
  """
  rates = {}
  for config in configs:
    base = config.partition("@")[0]
    for source in (config, base, lr_from):
      if source in choice:
        rates[config] = choice[source]
        break
  return rates


def run_procedure(
    mode,
    configs,
    sweep_configs,
    seeds,
    lrs,
    steps,
    results_dir,
    execute,
    lr_from=None,
    sweep_steps=None,
    grid_lr=None,
) -> Dict[str, float]:
  """Steps 1 and 2 of the module docstring; returns the table's rates.

  Args:
    mode: "sweep", "grid", "all" (both) or "table" (neither).
    configs: the table's rows.
    sweep_configs: the configs whose rate is swept.
    seeds: the table's seeds.
    lrs: the swept rates.
    steps: every grid run's steps.
    results_dir: where summaries and lr_choice files are.
    execute: Run -> None, trains/evaluates (or skips) one run.
    lr_from: the swept config whose rate unswept configs take.
    sweep_steps: the sweep runs' steps (None: `steps`). Longer grid runs
      than sweep runs take the rates chosen at the sweep's length (the
      schedules do not depend on the run's length, so a longer run passes
      through the swept one).
    grid_lr: None, or the rate of every grid (and table) run instead of
      the sweep's choice.

  Returns:
    {config: rate} for the configs that have one.

  Raises:
    GridError: a grid run of a config without a chosen rate.
  """
  sweep_steps = sweep_steps or steps
  if mode in ("all", "sweep"):
    for run in sweep_runs(sweep_configs, lrs, sweep_steps):
      execute(run)
    write_lr_choice(
        results_dir,
        choose_lrs(results_dir, sweep_configs, lrs, sweep_steps),
        lrs,
        sweep_steps,
    )
  if grid_lr is not None:
    rates = {config: grid_lr for config in configs}
  else:
    rates = rates_for(
        configs, read_lr_choice(results_dir, sweep_steps), lr_from
    )
  if mode in ("all", "grid"):
    missing = [c for c in configs if c not in rates]
    if missing:
      raise GridError(
          f"no chosen rate for {missing}: run --mode=sweep first (or set"
          " --lr_from)"
      )
    for seed in seeds:  # all configs at seed 0 first: partial tables compare
      for config in configs:
        execute(Run(config, rates[config], seed, steps))
  return rates


def sweep_table(results_dir, configs, lrs, steps) -> str:
  """Markdown: final dev perplexity per config (rows) and rate (columns)."""
  lines = [
      "| config | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
      "|---|" + "---:|" * (len(lrs) + 1),
  ]
  choice = choose_lrs(results_dir, configs, lrs, steps)
  for config in configs:
    cells = []
    for lr in lrs:
      s = load_summary(results_dir, Run(config, lr, SWEEP_SEED, steps))
      ppl = None if s is None else s["final_dev_perplexity"]
      cells.append("-" if ppl is None else f"{ppl:.2f}")
    chosen = choice.get(config)
    lines.append(
        f"| {config} | "
        + " | ".join(cells)
        + f" | {'-' if chosen is None else f'{chosen:g}'} |"
    )
  return "\n".join(lines)


# -- statistics ------------------------------------------------------------


def mean_std(values: Sequence[float]):
  """(mean, sample standard deviation; 0 for one value)."""
  values = [float(v) for v in values]
  if not values:
    return float("nan"), float("nan")
  return (
      statistics.fmean(values),
      statistics.stdev(values) if len(values) > 1 else 0.0,
  )


def first_crossing(curve, target, key):
  """`key` (tokens or train_seconds) where dev perplexity first <= target.

  Linear interpolation between the two curve points around the crossing;
  None when the curve never reaches the target.
  """
  previous = None
  for point in curve:
    ppl = point.get("dev_perplexity")
    if ppl is None:
      continue
    if ppl <= target:
      if previous is None or previous[1] == ppl:
        return point[key]
      x0, y0 = previous
      frac = (y0 - target) / (y0 - ppl)
      return x0 + frac * (point[key] - x0)
    previous = (point[key], ppl)
  return None


@dataclasses.dataclass
class Row:
  """One config's runs at its table rate, and the numbers the table shows."""

  config: str
  lr: Optional[float]
  summaries: List[dict]

  def metric(self, name):
    return [s["test"][name] for s in self.summaries]

  def field(self, name):
    return [s[name] for s in self.summaries]


def collect_rows(results_dir, configs, seeds, steps, lrs) -> List[Row]:
  rows = []
  for config in configs:
    lr = lrs.get(config)
    summaries = [
        s
        for s in (
            load_summary(results_dir, Run(config, lr, seed, steps))
            for seed in seeds
        )
        if s is not None
    ]
    rows.append(Row(config, lr, summaries))
  return rows


def rate_grid_rows(results_dir, configs, lrs, seeds, steps) -> List[Row]:
  """One Row per (config, rate) of a grid run at several rates.

  Args:
    results_dir: where the run summaries are.
    configs: the configs, in table order.
    lrs: the rates every config was run at (e.g. the two rates a sweep seed
      could not separate).
    seeds: the grid's seeds.
    steps: the runs' steps.

  Returns:
    Rows config-major (each config's rates in `lrs` order), each with the
    summaries of the seeds that finished (none: an empty row, which the
    tables print as missing).
  """
  return [
      collect_rows(results_dir, [config], seeds, steps, {config: lr})[0]
      for config in configs
      for lr in lrs
  ]


def dev_chosen_rows(rows: List[Row], seeds) -> Tuple[List[Row], List[str]]:
  """Each config's row at its rate of lowest mean final dev perplexity.

  Only rows with every seed of `seeds` compete, so a rate is never chosen
  on fewer seeds than another. The choice looks at dev perplexity only;
  the test metrics of the chosen rows are what a table of them reports
  (dev selects, test reports).

  Args:
    rows: `rate_grid_rows`' rows.
    seeds: the seeds a competing row must have.

  Returns:
    (the chosen rows in config order, the configs with no complete row).
  """
  wanted = set(int(s) for s in seeds)
  chosen, incomplete = [], []
  for config in dict.fromkeys(r.config for r in rows):
    complete = [
        r
        for r in rows
        if r.config == config and {s["seed"] for s in r.summaries} >= wanted
    ]
    if not complete:
      incomplete.append(config)
      continue
    chosen.append(
        min(
            complete,
            key=lambda r: mean_std(r.field("final_dev_perplexity"))[0],
        )
    )
  return chosen, incomplete


def rate_grid_report(
    results_dir,
    configs,
    lrs,
    seeds,
    steps,
    metrics: Sequence[str],
    second_reference: Optional[str] = None,
) -> str:
  """Markdown: every config at every rate of `lrs`, then each at its best.

  The front ends' `--table_lrs`: when one sweep seed's choice of rate is in
  doubt (e.g. the dense model's best rate changes with the seed), every
  config runs at each candidate rate on the grid seeds (`--grid_lr`, once
  per rate) and this compares them as a user would tune them: per config,
  the rate of lowest mean final dev perplexity over those seeds
  (`dev_chosen_rows`), then the chosen rows' test metrics, unpaired
  (`results_table`) and seed by seed (`paired_table`).

  Args:
    results_dir, configs, lrs, seeds, steps: as `rate_grid_rows`.
    metrics: the test metrics to tabulate.
    second_reference: as `results_table`.

  Returns:
    The report's markdown (headings and tables).
  """
  grid = rate_grid_rows(results_dir, configs, lrs, seeds, steps)
  chosen, incomplete = dev_chosen_rows(grid, seeds)
  rates = ", ".join(f"{lr:g}" for lr in lrs)
  parts = []
  for metric in metrics:
    parts.append(
        f"## Every config at rates {rates}: test {metric}, seeds"
        f" {list(seeds)}, {steps} steps (baseline: the first row)"
    )
    parts.append(results_table(grid, metric, second_reference))
  if incomplete:
    parts.append(
        f"No rate has all seeds {list(seeds)} for: {', '.join(incomplete)}"
        " (left out below)."
    )
  if chosen:
    choice = ", ".join(f"{r.config} {r.lr:g}" for r in chosen)
    for metric in metrics:
      parts.append(
          f"## Each config at its rate of lowest mean final dev perplexity"
          f" ({choice}): test {metric}"
      )
      parts.append(results_table(chosen, metric, second_reference))
      parts.append(f"Seed by seed (same data order), test {metric}:")
      parts.append(paired_table(chosen, metric))
  return "\n\n".join(parts)


def print_table_lrs_report(
    flag_values, results_dir, configs, seeds, steps, metrics, second_reference
) -> None:
  """--table_lrs of the front ends: prints `rate_grid_report` when it is set.

  Args:
    flag_values: the front end's flags (table_lrs).
    results_dir, configs, seeds, steps, metrics, second_reference: as
      `rate_grid_report`.
  """
  if not flag_values.table_lrs:
    return
  print()
  print(
      rate_grid_report(
          results_dir,
          configs,
          [float(x) for x in flag_values.table_lrs],
          seeds,
          steps,
          metrics=metrics,
          second_reference=second_reference,
      )
  )


def sweep_rows(results_dir, configs, lrs, steps) -> List[Row]:
  """One Row per swept (config, rate) that finished, for the sweep's plot."""
  rows = []
  for lr in lrs:
    for config in configs:
      summary = load_summary(results_dir, Run(config, lr, SWEEP_SEED, steps))
      if summary is not None:
        rows.append(Row(f"{config} lr {lr:g}", lr, [summary]))
  return rows


def _versus(row: Row, reference: Row, metric: str):
  """(change of row's mean vs reference's in %, |diff| > 2x the larger std).

  The second is "n<2" unless both rows have 2+ seeds: one seed has no
  spread, and its std of 0 would call any difference significant.
  """
  if row is reference or not reference.summaries:
    return "-", "-"
  values, ref_values = row.metric(metric), reference.metric(metric)
  mean, std = mean_std(values)
  ref_mean, ref_std = mean_std(ref_values)
  change = 100.0 * (mean - ref_mean) / ref_mean
  if min(len(values), len(ref_values)) < 2:
    return f"{change:+.1f}%", "n<2"
  significant = "yes" if abs(mean - ref_mean) > 2 * max(std, ref_std) else "no"
  return f"{change:+.1f}%", significant


def results_table(
    rows: List[Row], metric: str, second_reference: Optional[str] = None
) -> str:
  """Markdown table: metric over seeds, the difference to rows[0], budget.

  Args:
    rows: the table's rows; rows[0] is the baseline.
    metric: the summaries' test metric to tabulate.
    second_reference: a config among rows (e.g. the LM's moe_4, which has
      the MoE models' architecture with every expert always used) that gets
      its own difference and significance columns; None for none.

  Returns:
    The markdown table.
  """
  base = rows[0]
  second = next((r for r in rows if r.config == second_reference), None)
  extra_head = extra_rule = ""
  if second is not None:
    extra_head = f" vs {second.config} | > 2x std |"
    extra_rule = "---:|---|"
  lines = [
      f"| config | lr | seeds | test {metric} mean | std | min-max |"
      " vs baseline | > 2x std |" + extra_head + " dev ppl | steps | tokens |"
      " train wall clock |",
      "|---|---:|---:|---:|---:|---:|---:|---|"
      + extra_rule
      + "---:|---:|---:|---:|",
  ]
  for row in rows:
    if not row.summaries:
      lines.append(
          f"| {row.config} | - | 0 |" + " - |" * (9 + 2 * (second is not None))
      )
      continue
    values = row.metric(metric)
    mean, std = mean_std(values)
    versus, significant = _versus(row, base, metric)
    extra = ""
    if second is not None:
      extra = " {} | {} |".format(*_versus(row, second, metric))
    dev, _ = mean_std(
        [v for v in row.field("final_dev_perplexity") if v is not None]
    )
    tokens, _ = mean_std(row.field("tokens"))
    seconds, seconds_std = mean_std(row.field("train_seconds"))
    lr = "default" if row.lr is None else f"{row.lr:g}"
    lines.append(
        f"| {row.config} | {lr} | {len(values)} | {mean:.2f} | {std:.2f} |"
        f" {min(values):.2f}-{max(values):.2f} | {versus} | {significant} |"
        f"{extra} {dev:.2f} | {row.summaries[0]['steps']} |"
        f" {tokens / 1e6:.2f}M | {seconds / 60:.1f} +- {seconds_std / 60:.1f}"
        " min |"
    )
  return "\n".join(lines)


def paired_table(rows: List[Row], metric: str) -> str:
  """Markdown: each row against rows[0] seed by seed (same data order).

  A grid run's seed sets both its initialization and its data order
  (`Corpus.data_seed_binding`), so the baseline's and a row's runs of one
  seed saw the same batches in the same order; the per-seed difference
  leaves out the data-order part of the spread that `results_table`'s
  unpaired comparison carries. Only seeds both rows have are used.

  Args:
    rows: the table's rows; rows[0] is the baseline.
    metric: the summaries' test metric.

  Returns:
    The markdown table: per-seed relative differences, their mean and
    sample std, "> 2x std" (|mean| > 2x the std of the differences; "n<2"
    with fewer than two pairs) and whether every pair has the same sign.
  """
  base = rows[0]
  base_by_seed = {s["seed"]: s["test"][metric] for s in base.summaries}
  lines = [
      f"| vs {base.config} | pairs | per-seed change of test {metric} |"
      " mean | std | > 2x std | same sign |",
      "|---|---:|---|---:|---:|---|---|",
  ]
  for row in rows[1:]:
    changes = [
        (s["seed"], 100.0 * (s["test"][metric] / base_by_seed[s["seed"]] - 1))
        for s in row.summaries
        if base_by_seed.get(s["seed"])
    ]
    if not changes:
      lines.append(f"| {row.config} | 0 | - | - | - | - | - |")
      continue
    values = [c for _, c in changes]
    mean, std = mean_std(values)
    if len(values) < 2:
      significant = "n<2"
    else:
      significant = "yes" if abs(mean) > 2 * std else "no"
    same_sign = (
        "yes"
        if all(v < 0 for v in values) or all(v > 0 for v in values)
        else "no"
    )
    per_seed = ", ".join(f"s{seed} {c:+.1f}%" for seed, c in changes)
    lines.append(
        f"| {row.config} | {len(values)} | {per_seed} | {mean:+.1f}% |"
        f" {std:.1f} | {significant} | {same_sign} |"
    )
  return "\n".join(lines)


def mean_curve(summaries: List[dict]) -> List[dict]:
  """The seeds' curves averaged point by point (steps all seeds validated)."""
  if not summaries:
    return []
  steps = sorted(
      set.intersection(
          *[
              {p["step"] for p in s["curve"] if p.get("dev_perplexity")}
              for s in summaries
          ]
      )
  )
  curve = []
  for step in steps:
    points = [
        next(p for p in s["curve"] if p["step"] == step) for s in summaries
    ]
    curve.append(
        {
            "step": step,
            "tokens": statistics.fmean(p["tokens"] for p in points),
            "train_seconds": statistics.fmean(
                p["train_seconds"] for p in points
            ),
            "dev_perplexity": statistics.fmean(
                p["dev_perplexity"] for p in points
            ),
            "dev_min": min(p["dev_perplexity"] for p in points),
            "dev_max": max(p["dev_perplexity"] for p in points),
        }
    )
  return curve


def margin_table(rows: List[Row], reference: Row) -> str:
  """Markdown: each row's dev perplexity vs reference's along the curve.

  The margin as training proceeds, the trend a single final number hides:
  whether a model's advantage grows or shrinks with training tokens. Mean
  curves over each row's seeds (`mean_curve`), at the steps where both
  validated.

  Args:
    rows: the rows compared (reference itself is skipped).
    reference: the row every margin is against.

  Returns:
    The markdown table; a cell is 100 * (ppl / reference ppl - 1), so a
    negative margin means lower (better) perplexity than the reference.
  """
  ref_curve = {p["step"]: p for p in mean_curve(reference.summaries)}
  if not ref_curve:
    return f"(no {reference.config} runs yet)"
  curves = {
      row.config: {p["step"]: p for p in mean_curve(row.summaries)}
      for row in rows
      if row is not reference and row.summaries
  }
  steps = sorted(
      step for step in ref_curve if any(step in c for c in curves.values())
  )
  lines = [
      f"| dev ppl vs {reference.config} (n={len(reference.summaries)}) | "
      + " | ".join(
          f"step {s} ({ref_curve[s]['tokens'] / 1e6:.1f}M tok)" for s in steps
      )
      + " |",
      "|---|" + "---:|" * len(steps),
  ]
  for config, curve in curves.items():
    cells = []
    for step in steps:
      if step not in curve:
        cells.append("-")
        continue
      ratio = curve[step]["dev_perplexity"] / ref_curve[step]["dev_perplexity"]
      cells.append(f"{100.0 * (ratio - 1.0):+.1f}%")
    seeds = len(next(r for r in rows if r.config == config).summaries)
    lines.append(f"| {config} (n={seeds}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def paired_margins(row: Row, reference: Row) -> List[dict]:
  """A row's dev-perplexity margin vs the reference, seed by seed, per step.

  Seed s of a row is compared with seed s of the reference (the same data
  order: the data seed follows the run's seed), at the steps where both
  validated; a step enters when every seed the two rows share has it.

  Args:
    row: the compared row.
    reference: the baseline row.

  Returns:
    [{"step", "tokens", "margin", "low", "high", "seeds"}] in step order:
    margin = 100 * (mean over seeds of ppl_row / ppl_ref - 1), low / high
    the smallest and largest seed's margin; [] without a shared seed.
  """
  ref_by_seed = {s["seed"]: s for s in reference.summaries}
  pairs = [
      (s, ref_by_seed[s["seed"]])
      for s in row.summaries
      if s["seed"] in ref_by_seed
  ]
  if not pairs:
    return []

  def points(summary):
    return {p["step"]: p for p in summary["curve"] if p.get("dev_perplexity")}

  curves = [(points(a), points(b)) for a, b in pairs]
  steps = sorted(set.intersection(*[set(a) & set(b) for a, b in curves]))
  out = []
  for step in steps:
    margins = [
        100.0 * (a[step]["dev_perplexity"] / b[step]["dev_perplexity"] - 1.0)
        for a, b in curves
    ]
    out.append(
        {
            "step": step,
            "tokens": statistics.fmean(b[step]["tokens"] for _, b in curves),
            "margin": statistics.fmean(margins),
            "low": min(margins),
            "high": max(margins),
            "seeds": len(margins),
        }
    )
  return out


# The trend fit's window: points from this fraction of the final tokens on
# (1/4: the last two doublings of training tokens).
TREND_WINDOW = 0.25
# Extrapolations beyond this many times the measured tokens print as such.
TREND_HORIZON = 1000


def fit_log2_line(xs: Sequence[float], ys: Sequence[float]):
  """Least-squares y = a + b * log2(x); returns (a, b).

  Raises:
    ValueError: fewer than two distinct x.
  """
  logs = [math.log2(x) for x in xs]
  mean_x, mean_y = statistics.fmean(logs), statistics.fmean(ys)
  var = sum((u - mean_x) ** 2 for u in logs)
  if var == 0.0:
    raise ValueError("a trend needs two distinct token counts")
  slope = sum((u - mean_x) * (v - mean_y) for u, v in zip(logs, ys)) / var
  return mean_y - slope * mean_x, slope


def _tokens_to_reach(intercept, slope, target, tokens_end):
  """Where a + b log2(t) = target, in tokens; None if the line never gets
  there going forward (b >= 0 with the end above target); tokens_end if
  the line is already at or below target at the end."""
  at_end = intercept + slope * math.log2(tokens_end)
  if at_end <= target:
    return tokens_end
  if slope >= 0.0:
    return None
  return 2.0 ** ((target - intercept) / slope)


def margin_trend_table(
    rows: List[Row], reference: Row, targets=(-5.0, -15.0)
) -> str:
  """Markdown: each row's margin vs reference as a line in log2(tokens).

  Per seed pair (seed s of the row against seed s of the reference, as
  `paired_margins`), the dev-perplexity margin in percent at the validated
  steps from TREND_WINDOW of the final tokens on is fitted by least squares
  as margin = a + b * log2(tokens): b is the change per doubling of training
  tokens. The table gives b (mean over pairs, min-max), the fitted margin at
  the end, and the training tokens at which the mean line would reach each
  target margin: an extrapolation of the measured trend, not a measurement
  (it assumes the trend of the window holds, e.g. no new overfitting).

  Args:
    rows: the rows compared (reference itself is skipped).
    reference: the row every margin is against.
    targets: margins (percent, negative = better) to extrapolate to.

  Returns:
    The markdown table, or a one-line note without paired seeds.
  """
  ref_by_seed = {s["seed"]: s for s in reference.summaries}
  header = (
      f"| vs {reference.config} | pairs | fit window | points |"
      " change per doubling | min-max | fitted margin at end | "
      + " | ".join(f"tokens to {t:+.0f}%" for t in targets)
      + " |"
  )
  lines = [header, "|---|---:|---|---:|---:|---|---:|" + "---:|" * len(targets)]
  for row in rows:
    if row is reference:
      continue
    fits, windows = [], []
    for summary in row.summaries:
      base = ref_by_seed.get(summary["seed"])
      if base is None:
        continue
      ref = {p["step"]: p for p in base["curve"] if p.get("dev_perplexity")}
      points = [
          (
              ref[p["step"]]["tokens"],
              100.0
              * (p["dev_perplexity"] / ref[p["step"]]["dev_perplexity"] - 1.0),
          )
          for p in summary["curve"]
          if p.get("dev_perplexity") and p["step"] in ref
      ]
      if not points:
        continue
      end = max(t for t, _ in points)
      window = [(t, m) for t, m in points if t >= TREND_WINDOW * end]
      if len({t for t, _ in window}) < 2:
        continue
      fits.append(fit_log2_line(*zip(*window)))
      windows.append((min(t for t, _ in window), end, len(window)))
    if not fits:
      continue
    start = statistics.fmean(w[0] for w in windows)
    end = statistics.fmean(w[1] for w in windows)
    slopes = [b for _, b in fits]
    intercept = statistics.fmean(a for a, _ in fits)
    slope = statistics.fmean(slopes)
    cells = []
    for target in targets:
      tokens = _tokens_to_reach(intercept, slope, target, end)
      if tokens is None:
        cells.append("not on this trend")
      elif tokens == end:
        cells.append("reached")
      elif tokens > TREND_HORIZON * end:
        cells.append(f"> {TREND_HORIZON}x")
      else:
        cells.append(f"{tokens / 1e6:,.0f}M ({tokens / end:.0f}x)")
    lines.append(
        f"| {row.config} | {len(fits)} | {start / 1e6:.1f}-{end / 1e6:.1f}M"
        f" tok | {windows[0][2]} | {slope:+.2f} pts |"
        f" {min(slopes):+.2f} to {max(slopes):+.2f} |"
        f" {intercept + slope * math.log2(end):+.1f}% | "
        + " | ".join(cells)
        + " |"
    )
  if len(lines) == 2:
    return f"(no seed of a row is paired with a {reference.config} seed)"
  return "\n".join(lines)


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _banded_line(ax, xs, mid, low, high, label):
  """One line with its [low, high] band shaded in the line's colour."""
  (line,) = ax.plot(xs, mid, marker="o", ms=3, label=label)
  ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)


def _finish_plot(plt, fig, ax, path, title, xlabel, ylabel):
  """Labels, grid, legend (when there are lines); writes `path`."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_margins(rows: List[Row], path: str, title: str) -> List[str]:
  """Writes a PNG of each row's paired margin vs rows[0] against tokens.

  One line per row (`paired_margins`, the seeds' range shaded) and the zero
  line: below zero the row has the lower (better) dev perplexity. The trend
  with training tokens that a final number hides.

  Returns:
    [path], or [] when no row shares a seed with the baseline.
  """
  if not rows:
    return []
  reference = rows[0]
  margins = [(row, paired_margins(row, reference)) for row in rows[1:]]
  margins = [(row, m) for row, m in margins if m]
  if not margins:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row, points in margins:
    _banded_line(
        ax,
        [p["tokens"] / 1e6 for p in points],
        [p["margin"] for p in points],
        [p["low"] for p in points],
        [p["high"] for p in points],
        label=f"{row.config} (seeds paired: {points[0]['seeds']})",
    )
  ax.axhline(0.0, color="black", lw=0.8)
  _finish_plot(
      plt,
      fig,
      ax,
      path,
      title,
      "training tokens (millions)",
      f"dev perplexity vs {reference.config} (%)",
  )
  return [path]


def time_to_quality_table(
    rows: List[Row], step_times: Optional[Dict[str, dict]] = None
) -> str:
  """Tokens and wall clock for each config to reach rows[0]'s final dev ppl.

  On the mean-over-seeds curves: the target is the baseline's mean final
  dev perplexity, and every ratio is against the point where the baseline's
  own mean curve first reaches it (its last point unless the curve dipped
  below its final value earlier).

  Args:
    rows: the table's rows; rows[0] is the baseline.
    step_times: `read_step_times`' {config: {"seconds_per_step",
      "tokens_per_step"}}, measured on an idle machine; with it, two more
      columns give the time to the target at that speed: tokens to target /
      tokens per step x seconds per step (the runs' own wall clock counts
      whatever else shared the machine).

  Returns:
    The markdown table with a one-paragraph header.
  """
  step_times = step_times or {}
  base = rows[0]
  base_curve = mean_curve(base.summaries)
  if not base_curve:
    return "(no baseline runs yet)"
  target = base_curve[-1]["dev_perplexity"]

  def idle_seconds(config, tokens):
    speed = step_times.get(config)
    if speed is None:
      return None
    return tokens / speed["tokens_per_step"] * speed["seconds_per_step"]

  # The baseline's own first crossing, not its last point: a mean curve
  # that dips below its final value earlier reached that quality there, and
  # the ratios compare like with like.
  base_tokens = first_crossing(base_curve, target, "tokens")
  base_seconds = first_crossing(base_curve, target, "train_seconds")
  base_idle = idle_seconds(base.config, base_tokens)
  timed = base_idle is not None
  lines = [
      f"Target: the baseline's ({base.config}) final dev perplexity, mean"
      f" over its {len(base.summaries)} seeds: {target:.2f}. Crossings on"
      " the mean-over-seeds dev curves, linearly interpolated."
      + (
          " At measured step time: tokens to target at each config's"
          " seconds per step measured on an idle machine"
          f" ({STEP_TIME_FILE})."
          if timed
          else ""
      ),
      "",
      "| config | seeds | tokens to target | vs baseline |"
      " wall clock to target | vs baseline |"
      + (" at measured step time | vs baseline |" if timed else ""),
      "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else ""),
  ]
  for row in rows:
    curve = mean_curve(row.summaries)
    if not curve:
      continue
    tokens = first_crossing(curve, target, "tokens")
    if tokens is None:
      lines.append(
          f"| {row.config} | {len(row.summaries)} | not reached in"
          f" {curve[-1]['tokens'] / 1e6:.2f}M | - | - | -"
          + (" | - | - |" if timed else " |")
      )
      continue
    seconds = first_crossing(curve, target, "train_seconds")
    line = (
        f"| {row.config} | {len(row.summaries)} | {tokens / 1e6:.2f}M |"
        f" {tokens / base_tokens:.2f}x | {seconds / 60:.1f} min |"
        f" {seconds / base_seconds:.2f}x |"
    )
    if timed:
      idle = idle_seconds(row.config, tokens)
      line += (
          " - | - |"
          if idle is None
          else f" {idle / 60:.1f} min | {idle / base_idle:.2f}x |"
      )
    lines.append(line)
  return "\n".join(lines)


def plot_curves(rows: List[Row], path_prefix: str, title: str) -> List[str]:
  """Writes <prefix>_tokens.png and <prefix>_wallclock.png; returns paths."""
  written = []
  if not any(row.summaries for row in rows):
    return written
  plt = _pyplot()
  for key, label, scale in (
      ("tokens", "training tokens (millions)", 1e6),
      ("train_seconds", "training wall clock (minutes)", 60.0),
  ):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
      curve = mean_curve(row.summaries)
      if curve:
        _banded_line(
            ax,
            [p[key] / scale for p in curve],
            [p["dev_perplexity"] for p in curve],
            [p["dev_min"] for p in curve],
            [p["dev_max"] for p in curve],
            label=f"{row.config} (n={len(row.summaries)})",
        )
    ax.set_yscale("log")
    path = f"{path_prefix}_{'tokens' if key == 'tokens' else 'wallclock'}.png"
    _finish_plot(
        plt, fig, ax, path, title, label, "dev perplexity (exact softmax)"
    )
    written.append(path)
  return written


def plot_names(steps, sweep_steps=None, grid_lr=None):
  """The PNG names of a sweep of `sweep_steps` and a table of `steps`.

  Every name carries the lengths it shows, so a longer sweep or table does
  not replace a shorter one's plots: `curves_sweep_<S>steps_*.png` (the
  sweep), `curves_<N>steps_*.png` and `margins_<N>steps_tokens.png` (the
  table at the rates its own length's sweep chose), with `_sweep<S>` after
  `<N>steps` when the table takes the rates of a sweep of S != N steps, or
  `_lr<rate>` when every row runs at one given rate (`--grid_lr`).

  Args:
    steps: the table's runs' steps N.
    sweep_steps: the sweep runs' steps S (None: N).
    grid_lr: None, or the one rate of every row.

  Returns:
    {"sweep": prefix, "curves": prefix, "margins": file name}; the curve
    prefixes get `_tokens.png` / `_wallclock.png` (`plot_curves`).
  """
  sweep_steps = sweep_steps or steps
  table = f"{steps}steps"
  if grid_lr is not None:
    table += f"_lr{grid_lr:g}"
  elif sweep_steps != steps:
    table += f"_sweep{sweep_steps}"
  return {
      "sweep": f"curves_sweep_{sweep_steps}steps",
      "curves": f"curves_{table}",
      "margins": f"margins_{table}_tokens.png",
  }


def write_plots(
    rows,
    results_dir,
    corpus_name,
    sweep_configs,
    lrs,
    steps,
    sweep_steps=None,
    grid_lr=None,
):
  """The sweep's and the table's curve PNGs and the table's margin PNG.

  Args:
    rows: the table's rows (`collect_rows`).
    results_dir: where the PNGs go.
    corpus_name: for the titles.
    sweep_configs: the swept configs.
    lrs: the swept rates.
    steps: the table's runs' steps.
    sweep_steps: the sweep runs' steps (None: `steps`). The PNGs are
      named by both lengths (`plot_names`), so sweeps and tables of other
      lengths in one results_dir keep their own plots.
    grid_lr: None, or the one rate of every row (`--grid_lr`; in the
      table's names).

  Returns:
    The written PNGs' paths relative to the repository.
  """
  names = plot_names(steps, sweep_steps, grid_lr)
  sweep_steps = sweep_steps or steps
  plots = plot_curves(
      sweep_rows(results_dir, sweep_configs, lrs, sweep_steps),
      os.path.join(results_dir, names["sweep"]),
      f"{corpus_name}: dev perplexity of the rate sweep (seed {SWEEP_SEED},"
      f" {sweep_steps} steps)",
  )
  plots += plot_curves(
      rows,
      os.path.join(results_dir, names["curves"]),
      f"{corpus_name}: dev perplexity, mean over seeds (range shaded),"
      f" {steps} steps",
  )
  plots += plot_margins(
      rows,
      os.path.join(results_dir, names["margins"]),
      f"{corpus_name}: margin vs {rows[0].config} by seed pair (range"
      f" shaded), {steps} steps",
  )
  return [os.path.relpath(p, REPO) for p in plots]


def isfinite(value) -> bool:
  return value is not None and math.isfinite(value)
