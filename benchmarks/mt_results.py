r"""Translation results: dense GNMT vs MoE at equal ops/timestep, seeds.

The MT counterpart of `benchmarks/lm_results.py`, with the same methodology
(`benchmarks/results_lib.py`): a dev-set learning-rate sweep applied
equally to every config, then every config at its chosen rate with every
seed; test sacreBLEU (beam search, the config's beam and alpha), tokenized
BLEU and test perplexity with mean, spread and budget; time-to-quality on
dev perplexity; learning-curve PNGs.

  python benchmarks/mt_results.py --corpus=debian_en_fr
  python benchmarks/mt_results.py --corpus=debian_en_fr --mode=table

Rows NAME@top_k / NAME@noisy_top_k / NAME@batchwise train NAME with that
gating (appendix F's strictly balanced gating is the configs' default).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_tables  # pylint: disable=g-import-not-at-top,wrong-import-position

CORPORA = {
    name: results_lib.Corpus(
        name=name,
        gin_dir=f"gin/mt/{name}",
        data_seed_binding="mt_batching.seed",
    )
    for name in ("debian_en_fr", "debian_en_de")
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("corpus", "debian_en_fr", sorted(CORPORA), "Which corpus.")
flags.DEFINE_list(
    "configs",
    ["gnmt_dense", "moe_32", "moe_32@noisy_top_k", "moe_32@top_k"],
    "Rows (gin/mt/<corpus>/<name>.gin, NAME@<gating>); the first is the"
    " baseline.",
)
flags.DEFINE_integer(
    "train_steps", 2000, "Steps of every table run.", lower_bound=1
)
flags.DEFINE_integer(
    "sweep_steps",
    None,
    "Steps of the rate sweep's runs (default: --train_steps); longer table"
    " runs take the rates chosen at this length.",
    lower_bound=1,
)
flags.DEFINE_integer("steps_per_eval", 250, "Checkpoint + dev period.")
flags.DEFINE_list("sweep_configs", None, "Configs swept (default: --configs).")
results_flags.define_seed_and_rate_flags(
    seeds=["0", "1"],
    lrs=["1e-3", "2e-3", "4e-3"],
    seeds_help="Seeds of the table.",
    lrs_help="Swept peak rates.",
)
results_flags.define_shared_flags(task="mt", speed_period=20)
flags.adopt_module_key_flags(results_flags)


def _summarize(result):
  return {
      "bleu": result["bleu"],
      "tokenized_bleu": result["tokenized_bleu"],
      "perplexity": result["perplexity"],
      "bleu_signature": result["bleu_signature"],
      "experts": next(iter(result.get("experts", {}).values()), None),
  }


def _main():
  grid = results_flags.grid_from_flags(
      FLAGS, CORPORA, task="mt", sweep_variants=True
  )
  configs, seeds, steps = grid.configs, grid.seeds, grid.steps
  sweep_configs, lrs = grid.sweep_configs, grid.lrs
  sweep_steps, results_dir = grid.sweep_steps, grid.results_dir

  def execute(run):
    summary = results_flags.execute_in_grid(
        grid, run, FLAGS, eval_flags=[], summarize=_summarize
    )
    print(
        f"{run.run_id}: test BLEU {summary['test']['bleu']:.2f}, perplexity"
        f" {summary['test']['perplexity']:.2f}",
        flush=True,
    )

  rates = results_flags.run_grid(grid, FLAGS, execute)

  swept = results_tables.sweep_rows(
      results_dir, sweep_configs, lrs, sweep_steps
  )
  print(results_tables.sweep_section(swept, sweep_configs, lrs, sweep_steps))
  rows = results_tables.collect_rows(results_dir, configs, seeds, steps, rates)
  for metric in ("bleu", "tokenized_bleu", "perplexity"):
    print()
    print(f"## Test {metric}, {grid.corpus.name}, seeds {seeds}")
    print(results_tables.results_table(rows, metric))
    print()
    print(f"Seed by seed (same data order), test {metric}:")
    print(results_tables.paired_table(rows, metric))
  results_tables.print_table_lrs_report(
      FLAGS,
      results_dir,
      configs,
      seeds,
      steps,
      metrics=("bleu", "tokenized_bleu", "perplexity"),
      second_reference=None,
  )
  print()
  print("## Time to the baseline's dev perplexity")
  print(
      results_tables.time_to_quality_table(
          rows, results_step_time.read_step_times(results_dir)
      )
  )
  for section in results_tables.trend_sections(
      rows, rows[:1], swept, configs[0]
  ):
    print()
    print(section)
  print(results_plots.write_grid_plots(rows, swept, grid, FLAGS.mode))


def main(argv):
  del argv
  results_flags.run_main(_main, "mt_results.py")


if __name__ == "__main__":
  app.run(main)
