"""Tiny end to end: train -> evaluate (BLEU) -> decode -> export round trip.

The corpus is mt_testlib's number-word translation task (word by word, so a
tiny GNMT learns it in a few hundred steps on a CPU, at mt_testlib's learning
rate).
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gin  # pylint: disable=g-import-not-at-top
import mt_testlib  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from eval import bleu  # pylint: disable=g-import-not-at-top
from moe_keras import decode  # pylint: disable=g-import-not-at-top
from moe_keras import experiment  # pylint: disable=g-import-not-at-top
from moe_keras import export  # pylint: disable=g-import-not-at-top
from moe_keras.tasks import mt_task  # pylint: disable=g-import-not-at-top

STEPS = 300
REPO = mt_testlib.REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("mt"))
  train_path, dev_path = mt_testlib.write_corpus(
      directory, train=mt_testlib.TRAIN_PAIRS
  )
  model_dir = os.path.join(directory, "model")
  gin.clear_config()
  experiment.parse_gin(
      ["gin/mt/tiny/moe_flat.gin"],
      mt_testlib.bindings(directory, train_path, dev_path, steps=STEPS),
  )
  result = experiment.train(model_dir, verbose=0)
  gin.clear_config()
  assert result["step"] == STEPS
  task, step, translator = experiment.load_translator(model_dir, 1, None, None)
  assert step == STEPS
  return {
      "dir": directory,
      "model_dir": model_dir,
      "dev": dev_path,
      "task": task,
      "translator": translator,
  }


def _dev(trained):
  pairs = [l.split("\t") for l in bleu.read_lines(trained["dev"])]
  return [s for s, _ in pairs], [t for _, t in pairs]


def test_evaluate_bleu_and_decode_agree(trained):
  task, translator = trained["task"], trained["translator"]
  result = task.evaluate(
      translator.model, "dev", trained["model_dir"], beam_size=1
  )
  # The toy task is learned (measured with this corpus and learning rate,
  # 300 steps: MoE BLEU 84.1 / 100.0 / 96.4 on seeds 0 / 1 / 2, the dense
  # model 94.1 / 75.8 / 71.0; see mt_testlib; untrained: about 0).
  assert result["bleu"] > 50.0, result["bleu"]
  assert result["bleu_signature"].startswith("nrefs:1|case:mixed")
  assert result["tokenized_bleu_signature"].startswith("pretok:13a|")
  assert result["perplexity"] < 1.5  # measured: 1.085
  assert set(result["experts"]) == {"encoder_moe", "decoder_moe"}
  # decode's functions give the same translations and the same BLEU.
  sources, refs = _dev(trained)
  src_file = os.path.join(trained["dir"], "src.txt")
  with open(src_file, "w", encoding="utf-8") as f:
    f.write("\n".join(sources) + "\n")
  texts, bad = decode.read_source_lines(src_file)
  assert bad == 0
  hyps = translator.translate_texts(texts)
  out = os.path.join(trained["dir"], "hyp.txt")
  decode.write_lines_atomic(out, hyps)
  assert bleu.read_lines(out) == bleu.read_lines(result["translations_file"])
  assert bleu.sacre_bleu(hyps, refs).score == pytest.approx(result["bleu"])


def _moe_layers(model):
  from moe_keras.layers import sparse_moe  # pylint: disable=g-import-not-at-top

  return [
      layer
      for layer in model._flatten_layers()  # pylint: disable=protected-access
      if isinstance(layer, sparse_moe.MoEBase)
  ]


def test_a_per_expert_run_decodes_with_stacked_experts(trained, tmp_path):
  """A run trained with one variable per expert (its config.gin says so)
  is rebuilt for inference with stacked experts (INFERENCE_BINDINGS); its
  checkpoint loads and translates as the stacked run's."""
  import shutil  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path / "per_expert")
  shutil.copytree(trained["model_dir"], model_dir)
  with open(os.path.join(model_dir, experiment.CONFIG_FILE), "a") as f:
    f.write("\nmoe_spec.expert_variables = 'per_expert'\n")
  # The run's own config builds per-expert variables ...
  gin.clear_config()
  experiment.parse_gin([os.path.join(model_dir, experiment.CONFIG_FILE)])
  try:
    task, model = experiment.build_task_and_model(compile_model=False)
    model(next(iter(task.eval_dataset()))[0], training=False)
  finally:
    gin.clear_config()
  moes = _moe_layers(model)
  assert len(moes) == 2 and all(moe.expert_parts is not None for moe in moes)
  # ... and the inference model stacked ones, translating as before.
  _, step, translator = experiment.load_translator(model_dir, 1, None, None)
  assert step == STEPS
  moes = _moe_layers(translator.model)
  assert len(moes) == 2 and all(moe.expert_parts is None for moe in moes)
  sources, _ = _dev(trained)
  assert translator.translate_texts(sources[:20]) == trained[
      "translator"
  ].translate_texts(sources[:20])


def test_odd_inputs(trained):
  translator = trained["translator"]
  out = translator.translate_texts(["", "   ", "One \ufffd two.", "one " * 60])
  assert out[0] == "" and out[1] == ""
  assert isinstance(out[2], str) and isinstance(out[3], str)
  path = os.path.join(trained["dir"], "bad.txt")
  with open(path, "wb") as f:
    f.write(b"One two.\nThree \xff four.\r\n\nFive.")
  texts, bad = decode.read_source_lines(path)
  assert texts == ["One two.", "Three \ufffd four.", "", "Five."] and bad == 1
  with open(path, "wb") as f:
    f.write(b"\n \n")
  with pytest.raises(mt_task.TranslationError, match="is empty"):
    decode.read_source_lines(path)


def test_export_round_trip(trained):
  translator = trained["translator"]
  export_dir = os.path.join(trained["dir"], "export")
  export.export_translator(translator, export_dir)
  with pytest.raises(export.ExportError, match="already exists"):
    export.export_translator(translator, export_dir)
  assert not [p for p in os.listdir(trained["dir"]) if p.startswith(".tmp")]
  sources, _ = _dev(trained)
  sources = sources[:8] + [""]
  loaded = tf.saved_model.load(export_dir)
  served = loaded.signatures["serving_default"](inputs=tf.constant(sources))
  served = [t.decode("utf-8") for t in served["translations"].numpy()]
  assert served == translator.translate_texts(sources, batch_size=len(sources))
  # saved_model_cli (with tensorflow_text's ops registered) gives the same.
  code = (
      "import sys, tensorflow_text; from tensorflow.python.tools import"
      " saved_model_cli; sys.argv[0] = 'saved_model_cli';"
      " sys.exit(saved_model_cli.main())"
  )
  proc = subprocess.run(
      [
          sys.executable,
          "-c",
          code,
          "run",
          "--dir",
          export_dir,
          "--tag_set",
          "serve",
          "--signature_def",
          "serving_default",
          "--input_exprs",
          f"inputs={sources[:3]!r}",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  text = proc.stdout.split("Result for output key translations:")[1]
  for expected in served[:3]:
    assert repr(expected.encode("utf-8"))[2:-1] in text


def test_decode_cli_empty_input_one_line_error(trained, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "moe_keras.decode",
          f"--model_dir={trained['model_dir']}",
          f"--input_file={empty}",
          f"--output_file={tmp_path / 'o.txt'}",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if "moe_keras.decode" in l]
  assert errors == [
      f"moe_keras.decode: error: input file {empty} is empty: nothing to"
      " translate"
  ]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("cli", ["evaluate", "decode", "export"])
def test_translation_on_jax_is_one_line_and_writes_nothing(
    trained, tmp_path, cli
):
  # The translator and the perplexity loop are TensorFlow graphs: on JAX
  # each CLI names the backend to use instead of failing in a traceback.
  source = tmp_path / "source.txt"
  source.write_text("one two\n")
  args = {
      "evaluate": ["--split=eval"],
      "decode": [f"--input_file={source}", f"--output_file={tmp_path / 'o'}"],
      "export": [f"--export_dir={tmp_path / 'o'}"],
  }[cli]
  before = sorted(os.listdir(trained["model_dir"]))
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          f"moe_keras.{cli}",
          f"--model_dir={trained['model_dir']}",
      ]
      + args,
      capture_output=True,
      text=True,
      timeout=300,
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO, KERAS_BACKEND="jax"),
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if f"moe_keras.{cli}" in l]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith(f"moe_keras.{cli}: error: translation")
  assert errors[0].endswith(
      "runs on TensorFlow only (its tokenizer and beam search are a"
      " TensorFlow graph), not on jax; rerun with KERAS_BACKEND=tensorflow,"
      " which loads this checkpoint"
  )
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "o").exists()
  assert sorted(os.listdir(trained["model_dir"])) == before


def test_multilingual_tiny(tmp_path):
  directory = str(tmp_path)
  train_path, dev_path = mt_testlib.write_corpus(directory, train=100, dev=6)
  model_dir = os.path.join(directory, "model")
  gin.clear_config()
  experiment.parse_gin(
      ["gin/mt/tiny/multilingual.gin"],
      [
          f"TRAIN_FILES = {{'en-fr': {train_path!r}, 'fr-en': {train_path!r}}}",
          f"EVAL_FILES = {{'en-fr': {dev_path!r}, 'fr-en': {dev_path!r}}}",
          "multilingual_mt_data.vocab_file ="
          f" {os.path.join(directory, 'vocab.txt')!r}",
          "multilingual_mt_data.create_vocab_if_missing = True",
          "TRAIN_STEPS = 4",
          "STEPS_PER_CHECKPOINT = 4",
      ],
  )
  experiment.train(model_dir, verbose=0)
  gin.clear_config()
  with pytest.raises(mt_task.TranslationError, match="multilingual"):
    experiment.load_translator(model_dir, 1, None, None)
  with pytest.raises(mt_task.TranslationError, match="not one of"):
    experiment.load_translator(model_dir, 1, None, "de")
  task, _, translator = experiment.load_translator(model_dir, 1, None, "fr")
  assert translator.language_token_id == task.data.vocab.token_to_id("<2fr>")
  result = task.evaluate(translator.model, "dev", model_dir, beam_size=1)
  assert result["sentences"] == 12  # 6 pairs in each direction
  assert 0.0 <= result["bleu"] <= 100.0
