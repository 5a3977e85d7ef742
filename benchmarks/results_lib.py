"""Results methodology, once: grids of configs x learning rates x seeds.

`benchmarks/lm_results.py` and `benchmarks/mt_results.py` are thin front
ends over this module (running the grid), `results_flags` (their shared
flags), `results_step_time` (step times for the wall-clock view),
`results_tables` (statistics and tables) and `results_plots` (PNG curves).
A grid is a list of `Run`s; each trains with
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
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_keras import atomic_file  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras import learning_curve  # pylint: disable=g-import-not-at-top,wrong-import-position

SWEEP_SEED = 100
SUMMARY_DIR = "runs"
# One rate choice per sweep length: lr_choice_<steps>steps.json.
LR_CHOICE_FILE = "lr_choice_{steps}steps.json"
# Manifest keys that describe how a corpus build ran, not what it built
# (data_pipelines.debian_docs records its wall time): not part of its hash.
BUILD_TIMING_KEYS = ("build_seconds",)
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
    # Adam's second moment of row-sparse gradients (embedding and sampled
    # softmax rows on TensorFlow) from each row's summed gradient, as Adam
    # is written and as JAX computes it, instead of Keras's per-piece
    # squares (moe_keras.optimizers.sparse_gradients).
    "summed_rows": ("make_optimizer.sum_sparse_rows = True",),
    # The other direction: squares taps on the embedding and the sampled
    # softmax give Keras's per-piece squares on every backend (on
    # TensorFlow the same training as without; on JAX what TensorFlow
    # trains; moe_keras.layers.piece_squares).
    "piece_squares": ("lm_config.piece_squares = True",),
}


class GridError(ValueError):
  """A bad grid specification (one-line message)."""


class RunFailed(RuntimeError):
  """A run's training or evaluation process failed (one-line message).

  The message names the run's log and quotes the log's last line, where
  the CLIs write the cause (e.g. `moe_keras.train: error: ...`).
  """


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Where a task's configs live and how a run is bound to it.

  Attributes:
    name: short name (results go to results/<task>_<name> by default).
    gin_dir: directory of the configs, relative to the repository.
    data_seed_binding: gin parameter of the data order seed, bound to the
      run's seed (None: the data order is the config's).
    extra_bindings: bindings every run of this corpus gets.
    build_files: files that identify a build of the corpus ('~' allowed),
      e.g. the manifest listing every source package's version and hash:
      a corpus built from an archive that has moved on differs, and so does
      every seeded batch order. Their hash goes into each run's summary
      (`corpus_build`); () for corpora that do not change (PTB) or whose
      builds are not recorded.
  """

  name: str
  gin_dir: str
  data_seed_binding: Optional[str] = None
  extra_bindings: Sequence[str] = ()
  build_files: Sequence[str] = ()


def corpus_build(corpus: Corpus) -> Optional[str]:
  """The first 12 hex digits of SHA-256 over the corpus's build files.

  Returns:
    None when the corpus names no build files or one of them is missing.
  """
  return build_hash(corpus.build_files)


def build_hash(build_files: Sequence[str]) -> Optional[str]:
  """The first 12 hex digits of SHA-256 over what the build files say.

  A `.json` file (a corpus manifest) is hashed as its canonical JSON (keys
  sorted, no whitespace) without `BUILD_TIMING_KEYS`, so two builds of the
  same sources to the same files hash alike however long each took; any
  other file is hashed as its bytes.

  Args:
    build_files: paths ('~' allowed).

  Returns:
    None when there are no files or one of them is missing.

  Raises:
    GridError: a `.json` build file that is not a JSON object.
  """
  if not build_files:
    return None
  digest = hashlib.sha256()
  for name in build_files:
    path = os.path.expanduser(name)
    if not os.path.exists(path):
      return None
    with open(path, "rb") as f:
      content = f.read()
    if path.endswith(".json"):
      content = _canonical_manifest(content, path=path)
    digest.update(content)
  return digest.hexdigest()[:12]


def _canonical_manifest(content: bytes, *, path: str) -> bytes:
  """A JSON object's bytes, keys sorted, without `BUILD_TIMING_KEYS`."""
  try:
    manifest = json.loads(content)
  except ValueError as e:
    raise GridError(
        f"corpus build file {path} is not valid JSON: {e}"
    ) from None
  if not isinstance(manifest, dict):
    raise GridError(f"corpus build file {path} is not a JSON object")
  for key in BUILD_TIMING_KEYS:
    manifest.pop(key, None)
  return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


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
  plot_tag: Optional[str] = None  # --plot_tag: in the PNGs' names


def gin_file(corpus: Corpus, config: str) -> str:
  """The absolute path of `config`'s gin file (NAME@VARIANT: NAME's)."""
  return os.path.join(REPO, corpus.gin_dir, f"{config.partition('@')[0]}.gin")


def check_configs(corpus: Corpus, configs: Sequence[str]) -> None:
  """Raises GridError for a config file that does not exist or a variant."""
  for config in configs:
    variant = config.partition("@")[2]
    path = gin_file(corpus, config)
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


def _last_line(path):
  """The last non-blank line of the text file `path` ('' if none)."""
  with open(path, errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1] if lines else ""


def _subprocess(args, log_path):
  """`python -m ARGS` with its output appended to `log_path`.

  Raises:
    RunFailed: it exited with an error (the message quotes the log's last
      line, which says why).
  """
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
    raise RunFailed(
        f"python -m {args[0]} exited {result.returncode}:"
        f" {_last_line(log_path)} (log: {log_path})"
    )


def train(config_file, model_dir, bindings, log_path):
  """`python -m moe_keras.train` of one run (or its resumption)."""
  _subprocess(
      [
          "moe_keras.train",
          f"--gin_file={config_file}",
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


def write_json(path, value):
  """Writes `value` to `path` atomically (a reader never sees half of it)."""
  atomic_file.write_json(path, value, indent=1)


def _read_json(path, fields):
  """The JSON object in `path`, which must hold every key of `fields`.

  Args:
    path: a file this module wrote (`write_json`).
    fields: the keys its readers use.

  Returns:
    The object.

  Raises:
    GridError: the file cannot be read, is not a JSON object, or lacks a
      field (written by hand or by another tool; `write_json` never
      leaves half a file). The message names the file, so it can be
      removed or restored.
  """
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise GridError(f"cannot read {path}: {e}") from e
  if not isinstance(value, dict):
    raise GridError(f"{path} is not a results file of this tool: not an object")
  missing = [k for k in fields if k not in value]
  if missing:
    raise GridError(
        f"{path} is not a results file of this tool: no {', '.join(missing)}"
    )
  return value


def read_json_field(results_dir, name, field):
  """results_dir/name's `field`, or {} when the file does not exist."""
  path = os.path.join(results_dir, name)
  if not os.path.exists(path):
    return {}
  return _read_json(path, [field])[field]


def summary_path(results_dir: str, run: Run) -> str:
  return os.path.join(results_dir, SUMMARY_DIR, f"{run.run_id}.json")


def write_summary(results_dir: str, run: Run, summary: dict) -> None:
  """Writes a finished run's summary to `summary_path`, atomically."""
  path = summary_path(results_dir, run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json(path, summary)


# The fields of a run's summary that the tables, plots and resumption read.
SUMMARY_FIELDS = (
    "config",
    "lr",
    "seed",
    "steps",
    "curve",
    "final_dev_perplexity",
    "test",
    "tokens",
    "train_seconds",
)


def load_summary(results_dir: str, run: Run) -> Optional[dict]:
  """The run's summary, or None when it has not finished.

  Raises:
    GridError: the summary file exists but is unreadable or lacks one of
      `SUMMARY_FIELDS` (one line naming the file).
  """
  path = summary_path(results_dir, run)
  if not os.path.exists(path):
    return None
  return _read_json(path, SUMMARY_FIELDS)


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
    RunFailed: training or the test evaluation failed, or the curve does
      not reach `run.steps`.
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
  config_file = gin_file(corpus, run.config)
  bindings = run_bindings(corpus, run, steps_per_eval) + list(extra_bindings)
  started = time.time()
  code = code_version()
  train(config_file, model_dir, bindings, log_path)
  _subprocess(
      ["moe_keras.evaluate", f"--model_dir={model_dir}", "--split=test"]
      + list(eval_flags),
      log_path,
  )
  with open(os.path.join(model_dir, "eval_test.json")) as f:
    test = json.load(f)
  curve = learning_curve.read_curve(model_dir)
  if not curve or curve[-1]["step"] != run.steps:
    raise RunFailed(f"{model_dir}: the curve does not reach {run.steps}")
  summary = {
      "run_id": run.run_id,
      "config": run.config,
      "lr": run.lr,
      "seed": run.seed,
      "steps": run.steps,
      "gin_file": os.path.relpath(config_file, REPO),
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
      "corpus_build": corpus_build(corpus),
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "process_seconds": time.time() - started,
  }
  write_summary(results_dir, run, summary)
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


# -- learning-rate choice ----------------------------------------------------


def sweep_runs(configs, lrs, steps) -> List[Run]:
  """Rate-major order: a partial sweep has every config at the first rates."""
  return [Run(c, lr, SWEEP_SEED, steps) for lr in lrs for c in configs]


def choose_lrs(results_dir, configs, lrs, steps) -> Dict[str, float]:
  """`lowest_dev_rates` of the finished sweep runs in `results_dir`."""
  dev = {}
  for run in sweep_runs(configs, lrs, steps):
    summary = load_summary(results_dir, run)
    if summary is not None:
      dev[(run.config, run.lr)] = summary["final_dev_perplexity"]
  return lowest_dev_rates(dev, configs, lrs)


def lowest_dev_rates(dev, configs, lrs) -> Dict[str, float]:
  """Per config the swept rate of lowest final dev perplexity (all present).

  Args:
    dev: {(config, lr): final dev perplexity or None} of the finished sweep
      runs.
    configs: the swept configs.
    lrs: the swept rates.

  Returns:
    {config: lr} for every config with a dev perplexity at every rate.
  """
  choice = {}
  for config in configs:
    scores = {lr: dev.get((config, lr)) for lr in lrs}
    if all(score is not None for score in scores.values()):
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
    previous = _read_json(path, ())
    if previous.get("steps") == steps and previous.get("lrs") == list(lrs):
      merged.update(previous.get("choice", {}))
  merged.update(choice)
  write_json(
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
  return read_json_field(
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
