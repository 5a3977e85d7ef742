r"""Language-model results: dense vs MoE at equal ops/timestep, several seeds.

The methodology is `benchmarks/results_lib.py`'s (read its docstring): a
dev-set learning-rate sweep applied equally to every config, then every
config at its chosen rate with every seed, the same steps and batches;
mean, spread and budget per row, time-to-quality, learning-curve PNGs.

  # everything (sweep, then the table's seeds), resumable:
  python benchmarks/lm_results.py --corpus=ptb
  # only print the tables and plots of what has finished:
  python benchmarks/lm_results.py --corpus=ptb --mode=table

Rows NAME@nobalance train NAME with w_importance = w_load = 0 (Table 6's
first row); they use NAME's chosen rate. Summaries (one JSON per run) go to
--results_dir (committed with the repository); model directories to
--output_dir.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import lm_corpora  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_tables  # pylint: disable=g-import-not-at-top,wrong-import-position

CORPORA = lm_corpora.CORPORA

FLAGS = flags.FLAGS
flags.DEFINE_enum("corpus", "ptb", sorted(CORPORA), "Which corpus's configs.")
flags.DEFINE_list(
    "configs",
    ["4xlstm_128", "moe_4", "moe_32", "moe_256", "moe_256_h", "moe_1024_h"],
    "Table rows (gin/lm/<corpus>/<name>.gin; NAME@nobalance for no"
    " balancing losses). The first is the baseline.",
)
flags.DEFINE_integer(
    "train_steps", 1000, "Steps of every table run.", lower_bound=1
)
flags.DEFINE_integer(
    "sweep_steps",
    None,
    "Steps of the rate sweep's runs (default: --train_steps); longer table"
    " runs take the rates chosen at this length.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "steps_per_eval", 200, "Checkpoint + dev evaluation period (the curve)."
)
flags.DEFINE_list(
    "sweep_configs",
    None,
    "Configs swept (default: --configs without @variants). A config not"
    " swept uses the rate chosen for --lr_from.",
)
flags.DEFINE_string(
    "lr_from",
    None,
    "For configs not swept: use this swept config's rate (e.g. moe_256).",
)
results_flags.define_seed_and_rate_flags(
    seeds=["0", "1", "2"],
    lrs=["1e-3", "2e-3", "4e-3"],
    seeds_help="Seeds of the table.",
    lrs_help="Swept peak rates.",
)
results_flags.define_shared_flags(task="lm", speed_period=100)
flags.adopt_module_key_flags(results_flags)


def _counts(corpus, configs, extra_bindings):
  """{config: (params excl. embedding/softmax, ops/timestep)} as the paper.

  Counted for the model each row trains: its gin file with the corpus's
  bindings, the grid's `extra_bindings` (e.g. `MODEL_DIM = 32`) and the
  row's variant.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top
  from moe_keras.models import lm  # pylint: disable=g-import-not-at-top

  counts = {}
  for config in configs:
    gin.clear_config()
    variant = config.partition("@")[2]
    experiment.parse_gin(
        [results_lib.gin_file(corpus, config)],
        list(corpus.extra_bindings)
        + list(extra_bindings)
        + list(results_lib.VARIANTS.get(variant, ())),
    )
    c = lm.count_lm(lm.lm_config())
    counts[config] = (c["params_excl"], c["ops_per_timestep"])
  gin.clear_config()
  return counts


def _main():
  grid = results_flags.grid_from_flags(
      FLAGS, CORPORA, task="lm", sweep_variants=False
  )
  corpus, configs, seeds = grid.corpus, grid.configs, grid.seeds
  sweep_configs, lrs, steps = grid.sweep_configs, grid.lrs, grid.steps
  sweep_steps, results_dir = grid.sweep_steps, grid.results_dir

  def execute(run):
    summary = results_flags.execute_in_grid(
        grid,
        run,
        FLAGS,
        eval_flags=["--plot"],
        summarize=lambda r: {
            "perplexity": r["perplexity"],
            "tokens": r["tokens"],
            "experts": next(iter(r.get("experts", {}).values()), None),
        },
    )
    print(
        f"{run.run_id}: test perplexity {summary['test']['perplexity']:.2f},"
        f" final dev {summary['final_dev_perplexity']:.2f},"
        f" {summary['train_seconds'] / 60:.1f} min",
        flush=True,
    )

  rates = results_flags.run_grid(grid, FLAGS, execute, lr_from=FLAGS.lr_from)

  print()
  swept = results_tables.sweep_rows(
      results_dir, sweep_configs, lrs, sweep_steps
  )
  print(results_tables.sweep_section(swept, sweep_configs, lrs, sweep_steps))
  rows = results_tables.collect_rows(results_dir, configs, seeds, steps, rates)
  counts = _counts(corpus, configs, FLAGS.gin_bindings)
  print()
  print("| config | params excl. emb/softmax | ops/timestep |")
  print("|---|---:|---:|")
  for config in configs:
    params, ops = counts[config]
    print(f"| {config} | {params / 1e6:.2f}M | {ops / 1e3:.0f}k |")
  print()
  print(f"## Test perplexity, {corpus.name}, seeds {seeds}")
  # MoE-4 has the MoE models' architecture (LSTM, MoE, LSTM) with all 4
  # experts always used: MoE-n against it isolates the number of experts at
  # equal ops, as the paper's Table 7 does; against 4xLSTM, the whole change.
  print(
      results_tables.results_table(rows, "perplexity", second_reference="moe_4")
  )
  builds_note = results_tables.corpus_builds_note(rows)
  if builds_note:
    print(builds_note)
  print()
  print("Seed by seed (same data order), test perplexity:")
  print(results_tables.paired_table(rows, "perplexity"))
  results_tables.print_table_lrs_report(
      FLAGS,
      results_dir,
      configs,
      seeds,
      steps,
      metrics=("perplexity",),
      second_reference="moe_4",
  )
  print()
  print("## Margin along training (dev perplexity, mean over seeds)")
  by_name = {row.config: row for row in rows}
  # The baseline, and MoE-4 where it is a row and not the baseline itself.
  references = [
      by_name[c] for c in dict.fromkeys((configs[0], "moe_4")) if c in by_name
  ]
  for reference in references:
    print()
    print(results_tables.margin_table(rows, reference))
  for section in results_tables.trend_sections(
      rows, references, swept, configs[0]
  ):
    print()
    print(section)
  print()
  print("## Time to the baseline's quality")
  print(
      results_tables.time_to_quality_table(
          rows, results_step_time.read_step_times(results_dir)
      )
  )
  print()
  print(results_plots.write_grid_plots(rows, swept, grid, FLAGS.mode))


def main(argv):
  del argv
  results_flags.run_main(_main, "lm_results.py")


if __name__ == "__main__":
  app.run(main)
