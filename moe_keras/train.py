r"""Trains a gin-configured experiment; rerunning resumes where it stopped.

  python -m moe_keras.train --gin_file=gin/lm/ptb/moe_32.gin \
      --model_dir=/tmp/ptb_moe32 [--gin_bindings="training.train_steps=100"]

Writes DIR/config.gin (the operative config), checkpoints every
`training.steps_per_checkpoint` steps and at the end, TensorBoard summaries
under DIR/logs (loss, perplexity, words/s, per MoE layer CV and max/mean
load and importance/load histograms). See `moe_keras.experiment`.
"""

from moe_keras import cli_common  # sets TF environment first

from absl import app  # pylint: disable=g-bad-import-order
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
cli_common.define_gin_flags()
flags.DEFINE_string("model_dir", None, "Run directory (created if missing).")
flags.DEFINE_bool(
    "deterministic",
    False,
    "Enable TensorFlow op determinism (bit-identical reruns and resumes).",
)
flags.DEFINE_string(
    "verbose",
    "auto",
    "model.fit verbosity: auto (a progress bar on a terminal, else none:"
    " the log has a line every training.log_every_steps), 0, 1 (progress"
    " bar), 2.",
)
flags.DEFINE_string(
    "mesh_shape",
    None,
    "Device mesh, e.g. batch:2,expert:4 (moe_keras.distribution; default:"
    " the gin binding configured_mesh_shape.mesh_shape, else one device).",
)
cli_common.define_tf_servers_flag()
flags.mark_flag_as_required("model_dir")

PROGRAM = "moe_keras.train"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  experiment = cli_common.import_tensorflow_quietly()
  from moe_keras import reliability  # pylint: disable=g-import-not-at-top
  import data_pipelines  # pylint: disable=g-import-not-at-top

  if not FLAGS.gin_file:
    cli_common.fail(PROGRAM, "no --gin_file given")
  if FLAGS.deterministic:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.experimental.enable_op_determinism()
  verbose = cli_common.fit_verbosity(FLAGS.verbose)
  from moe_keras import distribution  # pylint: disable=g-import-not-at-top

  try:
    try:
      experiment.parse_gin(
          FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths
      )
      cli_common.watch_tf_servers(PROGRAM)
      result = experiment.train(
          FLAGS.model_dir,
          verbose=verbose,
          distribution=distribution.make_distribution(
              FLAGS.mesh_shape, tf_servers=FLAGS.tf_servers
          ),
      )
    except Exception as e:  # pylint: disable=broad-except
      # Another JAX process or a TF server died: one line, and no wait
      # for it at exit.
      lost = distribution.lost_process_error(
          e
      ) or distribution.lost_server_error(e)
      if lost is None:
        raise
      cli_common.fail(PROGRAM, lost, skip_shutdown=True)
  except reliability.Preempted as e:
    # 128 + signal number, as a shell reports a process killed by it. The
    # checkpoint, curve, logs and model-dir lock are written and closed by
    # now; end at once: tearing down a busy input pipeline (e.g. the MT
    # pipeline refilling its shuffle buffer at an epoch boundary) kept the
    # process alive 30-60 s after this line, past many schedulers' grace
    # period between SIGTERM and SIGKILL.
    cli_common.fail(PROGRAM, e, status=128 + e.signum, skip_shutdown=True)
  except (
      experiment.ExperimentError,
      data_pipelines.DataError,
      reliability.ModelDirBusy,
      reliability.Diverged,
      distribution.ClusterError,  # KERAS_DISTRIBUTION_* (JAX processes)
  ) as e:
    cli_common.fail(PROGRAM, e)
  except (ValueError, TypeError) as e:
    # Errors raised while gin calls a configurable (bad values).
    cli_common.fail(PROGRAM, reliability.name_bad_binding(e))
  logging.info("trained %s to step %d", FLAGS.model_dir, result["step"])
  print(f"trained {FLAGS.model_dir} to step {result['step']}")


if __name__ == "__main__":
  app.run(main)
