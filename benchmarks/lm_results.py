r"""PTB results table: dense vs MoE LMs at equal ops/timestep and steps.

Trains every listed config for the same number of steps with
`python -m moe_keras.train` (one fresh process each; an interrupted table
resumes where it stopped), evaluates the test split with the exact softmax
(`python -m moe_keras.evaluate --split=test`), and prints a markdown table:
test perplexity, parameters and ops/timestep as the paper counts them, and
the expert-utilization statistics on the test split (CV of importance and
load, max/mean load; averaged over batches, as Table 6 reports them).

  python benchmarks/lm_results.py --output_dir=runs/ptb_table

Rows named NAME@nobalance train NAME with w_importance = w_load = 0 (the
first row of the paper's Table 6).
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_keras import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras.models import lm  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "configs",
    [
        "4xlstm_128",
        "moe_4",
        "moe_32",
        "moe_256",
        "moe_256_h",
        "moe_256@nobalance",
    ],
    "gin/lm/ptb/<name>.gin rows; NAME@nobalance trains without the"
    " balancing losses.",
)
flags.DEFINE_integer("train_steps", 1000, "Steps for every row.")
flags.DEFINE_string("output_dir", "runs/ptb_table", "One model_dir per row.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every row.")
flags.DEFINE_bool("train", True, "Train missing rows (else table only).")

NO_BALANCE = ("moe_spec.w_importance = 0.0", "moe_spec.w_load = 0.0")


def _row_setup(row):
  name, _, variant = row.partition("@")
  bindings = [f"training.train_steps = {FLAGS.train_steps}"]
  bindings += list(FLAGS.gin_bindings)
  if variant == "nobalance":
    bindings += list(NO_BALANCE)
  elif variant:
    raise ValueError(f"unknown row variant {variant!r} in {row!r}")
  return os.path.join(REPO, "gin", "lm", "ptb", f"{name}.gin"), bindings


def _run(args, log_path):
  with open(log_path, "a") as log:
    subprocess.run(
        [sys.executable, "-m"] + args,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        check=True,
    )


def main(argv):
  del argv
  rows = []
  for row in FLAGS.configs:
    gin_file, bindings = _row_setup(row)
    model_dir = os.path.join(FLAGS.output_dir, row.replace("@", "_"))
    os.makedirs(model_dir, exist_ok=True)
    log_path = os.path.join(model_dir, "run.log")
    result_path = os.path.join(model_dir, "eval_test.json")
    if FLAGS.train and not os.path.exists(result_path):
      binding_args = [f"--gin_bindings={b}" for b in bindings]
      _run(
          [
              "moe_keras.train",
              f"--gin_file={gin_file}",
              f"--model_dir={model_dir}",
              "--verbose=2",
          ]
          + binding_args,
          log_path,
      )
      _run(
          [
              "moe_keras.evaluate",
              f"--model_dir={model_dir}",
              "--split=test",
              "--plot",
          ],
          log_path,
      )
    if not os.path.exists(result_path):
      continue
    with open(result_path) as f:
      result = json.load(f)
    gin.clear_config()
    experiment.parse_gin([gin_file], bindings)
    counts = lm.count_lm(lm.lm_config())
    experts = next(iter(result.get("experts", {}).values()), None)
    rows.append((row, counts, result, experts))
    print(f"{row}: test perplexity {result['perplexity']:.2f}", flush=True)
  print()
  print(
      "| model | params excl. emb/softmax | ops/timestep | steps | test ppl |"
      " CV(importance) | CV(load) | max/mean load |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for row, counts, result, experts in rows:
    stats = (
        " | ".join(
            f"{experts[k]:.2f}"
            for k in (
                "batch_mean_cv_importance",
                "batch_mean_cv_load",
                "batch_mean_max_over_mean_load",
            )
        )
        if experts
        else "- | - | -"
    )
    print(
        f"| {row} | {counts['params_excl'] / 1e6:.2f}M |"
        f" {counts['ops_per_timestep'] / 1e3:.0f}k | {result['step']} |"
        f" {result['perplexity']:.2f} | {stats} |"
    )


if __name__ == "__main__":
  app.run(main)
