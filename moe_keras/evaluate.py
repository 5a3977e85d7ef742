r"""Evaluates a trained model_dir: perplexity (LM) or BLEU (MT), expert stats.

  python -m moe_keras.evaluate --model_dir=DIR [--split=test]
      [--eval_file=my_text.txt] [--plot] [--gin_bindings=...]
      [--mesh_shape=batch:2,expert:4]

Rebuilds the experiment from DIR/config.gin, restores the latest checkpoint
and calls the task's `evaluate`. Language models report per-word perplexity
with the exact softmax, the token count and per MoE layer the importance and
load of every expert (CV, max/mean). Results are printed and written to
DIR/eval_<split>.json; `--plot` also writes DIR/experts_<split>_<layer>.png.
"""

import inspect
import json

from moe_keras import cli_common  # sets TF environment first

from absl import app  # pylint: disable=g-bad-import-order
from absl import flags
import gin

from moe_keras import atomic_file

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A run directory of moe_keras.train.")
flags.DEFINE_string(
    "split",
    "test",
    "Split to evaluate: the corpus's named split where it has them (PTB:"
    " train/valid/test; Debian: train/dev/test), else a label for --eval_file"
    " or the configured EVAL_FILES.",
)
flags.DEFINE_string(
    "eval_file", None, "Evaluate on this text file (glob) instead."
)
flags.DEFINE_multi_string(
    "gin_bindings", [], "Bindings applied on top of DIR/config.gin."
)
flags.DEFINE_bool("plot", False, "Write a PNG of expert importance/load.")
flags.DEFINE_integer(
    "beam_size", None, "Translation: beam size (default: the config's)."
)
flags.DEFINE_float(
    "alpha", None, "Translation: GNMT length-penalty alpha (default: config)."
)
flags.DEFINE_integer(
    "max_sentences", None, "Translation: decode at most this many sentences."
)
flags.DEFINE_string(
    "output", None, "Results file (default DIR/eval_<split>.json)."
)
flags.DEFINE_string(
    "mesh_shape",
    None,
    "Device mesh, e.g. batch:2,expert:4 (moe_keras.distribution; default:"
    " the gin binding configured_mesh_shape.mesh_shape, else one device)."
    " Checkpoints load on any mesh.",
)
cli_common.define_tf_servers_flag()
flags.mark_flag_as_required("model_dir")

PROGRAM = "moe_keras.evaluate"


def _data_fn_name(config_path):
  """Name of the corpus function bound to get_data.data_fn in a config."""
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  experiment.parse_gin([config_path])
  reference = gin.query_parameter("get_data.data_fn")
  function = reference.configurable.wrapper
  name = reference.configurable.name
  gin.clear_config()
  return name, function


def split_bindings(config_path, split, eval_file):
  """Gin bindings that make the data's eval split `split` / `eval_file`."""
  name, function = _data_fn_name(config_path)
  parameters = inspect.signature(function).parameters
  bindings = []
  if eval_file:
    bindings.append(f"{name}.eval_files = {eval_file!r}")
  elif "eval_split" in parameters:
    bindings.append(f"{name}.eval_split = {split!r}")
  return bindings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import os  # pylint: disable=g-import-not-at-top

  experiment = cli_common.import_tensorflow_quietly()
  import data_pipelines  # pylint: disable=g-import-not-at-top

  model_dir = FLAGS.model_dir
  try:
    config_path = os.path.join(model_dir, experiment.CONFIG_FILE)
    if not os.path.isfile(config_path):
      raise experiment.ExperimentError(
          f"{model_dir} is not a trained model_dir: {config_path} is missing"
      )
    bindings = split_bindings(config_path, FLAGS.split, FLAGS.eval_file)
    bindings += FLAGS.gin_bindings
    from moe_keras import distribution  # pylint: disable=g-import-not-at-top

    cli_common.watch_tf_servers(PROGRAM)

    task, model, step = experiment.load_experiment(
        model_dir,
        bindings,
        distribution=lambda: distribution.make_distribution(
            FLAGS.mesh_shape, tf_servers=FLAGS.tf_servers
        ),
    )
    options = {
        name: getattr(FLAGS, name)
        for name in ("beam_size", "alpha", "max_sentences")
        if getattr(FLAGS, name) is not None
    }
    result = task.evaluate(
        model, FLAGS.split, model_dir, plot=FLAGS.plot, **options
    )
  except (experiment.ExperimentError, data_pipelines.DataError) as e:
    cli_common.fail(PROGRAM, e)
  except (ValueError, TypeError, OSError) as e:
    cli_common.fail(PROGRAM, e)
  except Exception as e:  # pylint: disable=broad-except
    from moe_keras.distribution import tf_cluster  # pylint: disable=g-import-not-at-top

    lost = tf_cluster.lost_server_error(e)  # a TF server died
    if lost is None:
      raise
    cli_common.fail(PROGRAM, lost, skip_shutdown=True)
  result.update(
      {"model_dir": model_dir, "step": step, "eval_file": FLAGS.eval_file}
  )
  output = FLAGS.output or os.path.join(model_dir, f"eval_{FLAGS.split}.json")
  atomic_file.write_json(output, result, indent=2, sort_keys=True)
  print(json.dumps(summary(result), indent=1))
  print(f"wrote {output}")


def summary(result):
  """The headline numbers of a result (printed; the file has everything)."""
  keys = (
      "split",
      "step",
      "perplexity",
      "tokens",
      "bleu",
      "bleu_signature",
      "tokenized_bleu",
  )
  short = {k: result[k] for k in keys if k in result}
  for name, stats in result.get("experts", {}).items():
    short[name] = {
        k: round(stats[k], 4)
        for k in ("cv_importance", "cv_load", "max_over_mean_load")
    }
    short[name]["unused_experts"] = stats["unused_experts"]
    short[name]["experts_for_90pct_load"] = stats["experts_for_90pct_load"]
  return short


if __name__ == "__main__":
  app.run(main)
