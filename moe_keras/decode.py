r"""Translates a text file with a trained MoE-GNMT model_dir.

  python -m moe_keras.decode --model_dir=DIR --input_file=F --output_file=O \
      [--beam_size=4] [--alpha=0.6] [--target_lang=fr] [--batch_size=32]

Writes one detokenized translation per input line (O is written to a
temporary file and renamed, so it is never left half-written). Defaults for
the beam size and alpha come from the model's config (MtTask.beam_size /
MtTask.alpha); --beam_size=1 is greedy search.

Input handling (documented, not errors):
  * invalid UTF-8 bytes are replaced by U+FFFD (the count is logged);
  * an empty or all-whitespace line gives an empty output line;
  * a line longer than the model's maximum source length
    (MtTask.max_source_length wordpieces) is truncated to it (the count is
    logged);
  * line endings: '\n', '\r\n' and '\r' all end a line.
Errors (one line on stderr, exit status 1): a missing or empty input file, a
model_dir without a trained model, a multilingual model without
--target_lang. MOE_KERAS_DEBUG=1 shows the traceback.
"""

import os

from moe_keras import cli_common  # sets the TF environment first

from absl import app  # pylint: disable=g-bad-import-order
from absl import flags
from absl import logging

from moe_keras import atomic_file
from moe_keras.tasks import mt_task

FLAGS = flags.FLAGS

PROGRAM = "moe_keras.decode"


def define_flags():
  """Defines the flags; only when run as a program, so that the CLI modules
  can be imported together (tests import decode and export)."""
  cli_common.define_translation_flags()
  flags.adopt_module_key_flags(cli_common)
  flags.DEFINE_string("input_file", None, "Source sentences, one per line.")
  flags.DEFINE_string("output_file", None, "Where to write the translations.")
  flags.DEFINE_integer("batch_size", 32, "Sentences per decoding batch.")
  flags.mark_flags_as_required(["model_dir", "input_file", "output_file"])


def read_source_lines(path):
  """Lines of a file as str; invalid UTF-8 replaced by U+FFFD.

  Args:
    path: the input file.

  Returns:
    (lines, number of lines that had invalid UTF-8).

  Raises:
    TranslationError: missing or empty file.
  """
  if not os.path.isfile(path):
    raise mt_task.TranslationError(f"input file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise mt_task.TranslationError(
        f"input file {path} is empty: nothing to translate"
    )
  lines = raw.splitlines()
  texts, bad = [], 0
  for line in lines:
    try:
      texts.append(line.decode("utf-8"))
    except UnicodeDecodeError:
      texts.append(line.decode("utf-8", errors="replace"))
      bad += 1
  return texts, bad


def count_too_long(task, texts):
  """Number of texts longer than the task's max_source_length wordpieces."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  limit = task.max_source_length
  if not limit:
    return 0
  lengths = task.data.tokenizer.tokenize(tf.constant(texts)).row_lengths()
  return int(tf.reduce_sum(tf.cast(lengths > limit, tf.int32)))


def write_lines_atomic(path, lines):
  """Writes lines (newline-terminated, inner newlines as spaces) atomically."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_file.write_text(
      path,
      "".join(
          line.replace("\r", " ").replace("\n", " ") + "\n" for line in lines
      ),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import time  # pylint: disable=g-import-not-at-top

  import data_pipelines  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  try:
    texts, bad = read_source_lines(FLAGS.input_file)
    task, step, translator = experiment.load_translator(
        FLAGS.model_dir,
        FLAGS.beam_size,
        FLAGS.alpha,
        FLAGS.target_lang,
        FLAGS.gin_bindings,
    )
    if bad:
      logging.warning(
          "%d line(s) of %s had invalid UTF-8; bad bytes replaced by U+FFFD",
          bad,
          FLAGS.input_file,
      )
    too_long = count_too_long(task, texts)
    if too_long:
      logging.warning(
          "%d line(s) longer than %d wordpieces were truncated",
          too_long,
          task.max_source_length,
      )
    start = time.time()
    outputs = translator.translate_texts(texts, batch_size=FLAGS.batch_size)
    elapsed = time.time() - start
    write_lines_atomic(FLAGS.output_file, outputs)
  except (
      mt_task.TranslationError,
      experiment.ExperimentError,
      data_pipelines.DataError,
      ValueError,
      OSError,
  ) as e:
    cli_common.fail(PROGRAM, e)
  print(
      f"translated {len(texts)} lines with {FLAGS.model_dir} (step {step},"
      f" beam {translator.beam_size}) in {elapsed:.1f}s ->"
      f" {FLAGS.output_file}"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
