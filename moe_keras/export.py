r"""Exports a trained MoE-GNMT as a TensorFlow SavedModel.

  python -m moe_keras.export --model_dir=DIR --export_dir=E \
      [--beam_size=4] [--alpha=0.6] [--target_lang=fr] [--overwrite]

The SavedModel's `serving_default` signature takes `inputs`: tf.string [B]
(raw source sentences) and returns `translations`: tf.string [B]
(detokenized), `ids`: int32 [B, T] (wordpieces, [END] included) and
`scores`: float32 [B]. Wordpiece tokenization and detokenization run inside
the graph (tensorflow-text ops), as do beam / greedy search, so it is the
same computation as `moe_keras.decode`:

  import tensorflow as tf, tensorflow_text  # the import registers the ops
  tf.saved_model.load(E).signatures['serving_default'](
      inputs=tf.constant(['Hello.']))['translations']

tensorflow-text's ops must be registered where the SavedModel is loaded (by
`import tensorflow_text`). `saved_model_cli` does not import it, so run it
with the import first (same arguments as `saved_model_cli`):

  python -c 'import sys, tensorflow_text
  from tensorflow.python.tools import saved_model_cli
  sys.argv[0] = "saved_model_cli"; sys.exit(saved_model_cli.main())' \
      run --dir E --tag_set serve --signature_def serving_default \
      --input_exprs 'inputs=["Hello."]'

The export is written to a temporary directory next to E and renamed into
place only when complete. An existing E is refused unless --overwrite, in
which case the old export is replaced in one rename (never partially).
"""

import os
import shutil

from moe_keras import cli_common  # sets the TF environment first

from absl import app  # pylint: disable=g-bad-import-order
from absl import flags

FLAGS = flags.FLAGS

PROGRAM = "moe_keras.export"


def define_flags():
  """Defines the flags; only when run as a program, so that the CLI modules
  can be imported together (tests import decode and export)."""
  cli_common.define_translation_flags()
  flags.adopt_module_key_flags(cli_common)
  flags.DEFINE_string("export_dir", None, "SavedModel directory to create.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export_dir.")
  flags.mark_flags_as_required(["model_dir", "export_dir"])


class ExportError(ValueError):
  """A refused export (one-line message)."""


def export_translator(translator, export_dir, overwrite=False):
  """Saves `translator` as a SavedModel at export_dir, atomically.

  Args:
    translator: a `moe_keras.tasks.mt_task.Translator`.
    export_dir: target directory (must not exist unless overwrite).
    overwrite: replace an existing export.

  Returns:
    export_dir.

  Raises:
    ExportError: export_dir exists (and not overwrite) or is a file.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  export_dir = os.path.abspath(export_dir)
  if os.path.exists(export_dir) and not overwrite:
    raise ExportError(
        f"export_dir {export_dir} already exists; pass --overwrite to replace"
        " it"
    )
  if os.path.isfile(export_dir):
    raise ExportError(f"export_dir {export_dir} is a file")
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(export_dir)
  tmp = os.path.join(parent, f".tmp-{os.getpid()}-{base}")
  old = os.path.join(parent, f".old-{os.getpid()}-{base}")
  try:
    signature = translator.translate.get_concrete_function()
    tf.saved_model.save(
        translator, tmp, signatures={"serving_default": signature}
    )
    if os.path.exists(export_dir):
      os.replace(export_dir, old)
    os.replace(tmp, export_dir)
  finally:
    for path in (tmp, old):
      if os.path.exists(path):
        shutil.rmtree(path)
  return export_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import data_pipelines  # pylint: disable=g-import-not-at-top
  from moe_keras.tasks import mt_task  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  try:
    export_dir = os.path.abspath(FLAGS.export_dir)
    if os.path.exists(export_dir) and not FLAGS.overwrite:
      raise ExportError(
          f"export_dir {export_dir} already exists; pass --overwrite to"
          " replace it"
      )
    _, step, translator = experiment.load_translator(
        FLAGS.model_dir,
        FLAGS.beam_size,
        FLAGS.alpha,
        FLAGS.target_lang,
        FLAGS.gin_bindings,
    )
    export_translator(translator, export_dir, overwrite=FLAGS.overwrite)
  except (
      ExportError,
      mt_task.TranslationError,
      experiment.ExperimentError,
      data_pipelines.DataError,
      ValueError,
      OSError,
  ) as e:
    cli_common.fail(PROGRAM, e)
  print(
      f"exported {FLAGS.model_dir} (step {step}, beam {translator.beam_size})"
      f" to {export_dir}"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
