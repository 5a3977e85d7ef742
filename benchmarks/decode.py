r"""Decoding speed of MoE-GNMT configs: sentences/s, greedy and beam 4.

  python benchmarks/decode.py \
      --gin_files=gin/mt/debian_en_fr/gnmt_dense.gin,gin/mt/debian_en_fr/moe_32.gin \
      [--model_dir=DIR --input_file=F]

Without --model_dir each config's model is built with random weights (no
corpus needed) and decodes `--sentences` random sources of
`--source_length` wordpieces into exactly `--target_length` pieces (the
[END] logit is masked, so every sentence has the same length and configs
compare at equal work). With --model_dir the trained model translates the
lines of --input_file through the same `Translator` that decode / export use
(tokenization included), and lengths are the model's own.

`--saved_model` also times each random-weight decoder after a
`tf.saved_model` round trip (saved to a temporary directory, loaded back,
the loaded function called as a server would), and fails unless the loaded
decoder's ids equal the in-process ones: the exported graph keeps the
layer's size-chosen paths (the small-batch `tf.cond` included).

`--train_steps=N` instead times N training steps per config on synthetic
batches (the estimate of a config's training time).

Prints one table row per config and search: sentences/s, target
wordpieces/s and ms per decoding step (per batch). Tracing is excluded (one
warm-up call per setting).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from moe_keras import experiment  # pylint: disable=g-import-not-at-top
from moe_keras.models import beam_search  # pylint: disable=g-import-not-at-top
from moe_keras.models import gnmt  # pylint: disable=g-import-not-at-top
from moe_keras.tasks import mt_task  # pylint: disable=g-import-not-at-top

END_ID = 3
START_ID = 2


def _random_model_decoder(model, beam_size, target_length):
  """tf.function: source ids [B, S] -> ids, with [END] masked out."""
  layers = gnmt.layers_of(model)

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
  def run(source):
    # As the exported Translator: no training statistics while decoding.
    with mt_task.moe_stats_detached(model):
      return search(source)

  def search(source):
    encoded = layers.encode(source)
    if beam_size > 1:
      encoded = {k: tf.repeat(v, beam_size, 0) for k, v in encoded.items()}
    vocab = model.output_shape[-1]
    no_end = tf.one_hot(END_ID, vocab, on_value=-1e9, off_value=0.0)

    def step_fn(ids, state, t):
      del t
      logits, state, _ = layers.decode_step(ids, state, encoded)
      return tf.nn.log_softmax(logits + no_end), state

    batch = tf.shape(source)[0]
    lengths = tf.fill([batch], target_length)
    initial = layers.initial_state(batch)
    if beam_size == 1:
      return beam_search.greedy_search(
          step_fn, initial, lengths, start_id=START_ID, eos_id=END_ID
      )["ids"]
    return beam_search.beam_search(
        step_fn,
        initial,
        lengths,
        beam_size=beam_size,
        start_id=START_ID,
        eos_id=END_ID,
    )["ids"][:, 0]

  return run


def randomize_gates(model, source, seed=0):
  """Random gating weights, and batchwise thresholds fitted to them.

  Freshly built MoE layers have W_g = 0 (the paper's initialization): every
  token would tie across experts, and batchwise thresholds of 0 admit every
  expert at inference. For a speed measurement that looks like a trained
  model, W_g is drawn at random and each batchwise threshold T_i is set to
  the m-th largest gate value of expert i over the MoE's inputs for
  `source` (m = k N / n, eq. 18), so inference routes about k experts per
  token as trained thresholds would (eq. 19).
  """
  from eval import expert_stats  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  layers = expert_stats.moe_layers(model)
  for layer in layers:
    for var in (layer.w_gate, getattr(layer, "w_gate_secondary", None)):
      if var is not None:
        d = var.shape[-2]
        var.assign(rng.normal(0, 3.0 / np.sqrt(d), var.shape).astype("f"))
  batchwise = [l for l in layers if getattr(l, "gating", "") == "batchwise"]
  if not batchwise:
    return
  target_in = np.full_like(source, 5)
  target_in[:, 0] = START_ID
  probed = expert_stats._probe_model(model, layers)(  # pylint: disable=protected-access
      {"source": source, "target_in": target_in}
  )
  for i, layer in enumerate(layers):
    if layer not in batchwise:
      continue
    x = np.asarray(probed[2 * i])
    x = x.reshape(-1, x.shape[-1])
    logits = x @ np.asarray(layer.w_gate)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    m = max(1, layer.k * len(x) // layer.num_experts)
    layer.thresholds.assign(np.sort(probs, axis=0)[-m - 1].astype("float32"))


def bench_random(gin_file, args):
  """Rows for one config with random weights."""
  gin.clear_config()
  experiment.parse_gin([gin_file])
  model = gnmt.gnmt_model(args.vocab_size)
  gin.clear_config()
  rng = np.random.default_rng(0)
  source = rng.integers(
      4, args.vocab_size, size=(args.sentences, args.source_length)
  ).astype("int32")
  randomize_gates(model, source)
  rows = []
  for beam in (1, 4):
    run = _random_model_decoder(model, beam, args.target_length)
    search = "greedy" if beam == 1 else f"beam {beam}"
    variants = [(os.path.relpath(gin_file), run)]
    if args.saved_model:
      variants.append(
          (os.path.relpath(gin_file) + " (SavedModel)", _round_trip(run, model))
      )
    expected = None
    for name, fn in variants:
      ids = fn(tf.constant(source[: args.batch_size])).numpy()  # trace/warm
      if expected is None:
        expected = ids
      elif not np.array_equal(ids, expected):
        raise RuntimeError(
            f"{name} {search}: the loaded SavedModel decodes other ids than"
            " the in-process decoder"
        )
      start = time.perf_counter()
      for i in range(0, args.sentences, args.batch_size):
        fn(tf.constant(source[i : i + args.batch_size])).numpy()
      elapsed = time.perf_counter() - start
      batches = -(-args.sentences // args.batch_size)
      rows.append(
          (
              name,
              search,
              args.sentences / elapsed,
              args.sentences * args.target_length / elapsed,
              1000 * elapsed / (batches * args.target_length),
          )
      )
  return rows


def _round_trip(run, model):
  """`run` saved as a SavedModel and loaded back (its serving function).

  Args:
    run: a tf.function of one input signature, source ids [B, S] -> ids.
    model: the Keras model whose variables `run` reads (tracked by the
      saved module).

  Returns:
    The loaded SavedModel's `serving_default` signature as a function of
    source ids [B, S] -> ids.
  """
  module = tf.Module()
  # As the Translator: the model's variables tracked, not the Keras model
  # (whose own traced functions would update its metrics).
  module.model_variables = [v.value for v in model.variables]
  module.decode = run
  export_dir = tempfile.mkdtemp(prefix="decode_bench_")
  try:
    tf.saved_model.save(
        module, export_dir, signatures={"serving_default": run}
    )
    loaded = tf.saved_model.load(export_dir)
  finally:
    shutil.rmtree(export_dir, ignore_errors=True)
  signature = loaded.signatures["serving_default"]
  (output,) = signature.structured_outputs

  def call(source):
    return signature(source)[output]

  call.loaded = loaded  # keeps the loaded object alive
  return call


def bench_train_step(gin_file, args):
  """Seconds per training step on synthetic batches of the config's shape."""
  from moe_keras.optimizers import factory  # pylint: disable=g-import-not-at-top
  from moe_keras.tasks import mt_task  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  experiment.parse_gin([gin_file])
  model = gnmt.gnmt_model(args.vocab_size)
  model.compile(
      optimizer=factory.make_optimizer(),
      loss=mt_task.masked_token_nll,
      metrics=[mt_task.TokenPerplexity(), mt_task.TargetTokens()],
  )
  gin.clear_config()
  rng = np.random.default_rng(0)
  length = args.target_length
  batch = args.batch_tokens // length
  x = {
      "source": rng.integers(4, args.vocab_size, (batch, length - 2)),
      "target_in": rng.integers(4, args.vocab_size, (batch, length)),
  }
  y = mt_task.pack_targets(
      rng.integers(4, args.vocab_size, (batch, length)),
      np.ones((batch, length), "float32"),
  )
  model.train_on_batch(x, y)  # trace
  start = time.perf_counter()
  for _ in range(args.train_steps):
    model.train_on_batch(x, y)
  elapsed = (time.perf_counter() - start) / args.train_steps
  return (
      os.path.relpath(gin_file),
      batch,
      length,
      elapsed,
      batch * length / elapsed,
  )


def bench_model_dir(args):
  """Rows for a trained model_dir on real input lines."""
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  with open(args.input_file, encoding="utf-8", errors="replace") as f:
    texts = [line.rstrip("\n") for line in f][: args.sentences]
  rows = []
  for beam in (1, 4):
    _, _, translator = experiment.load_translator(
        args.model_dir, beam, None, None
    )
    translator.translate(tf.constant(texts[: args.batch_size]))  # trace
    start = time.perf_counter()
    pieces = 0
    steps = 0
    for i in range(0, len(texts), args.batch_size):
      out = translator.translate(tf.constant(texts[i : i + args.batch_size]))
      ids = out["ids"].numpy()
      pieces += int(np.sum(ids != 0))
      steps += ids.shape[1]
    elapsed = time.perf_counter() - start
    rows.append(
        (
            args.model_dir,
            "greedy" if beam == 1 else f"beam {beam}",
            len(texts) / elapsed,
            pieces / elapsed,
            1000 * elapsed / max(steps, 1),
        )
    )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--gin_files",
      default=",".join(
          f"gin/mt/debian_en_fr/{n}.gin"
          for n in ("gnmt_dense", "moe_32", "moe_32_h")
      ),
  )
  parser.add_argument("--model_dir", default=None)
  parser.add_argument("--input_file", default=None)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--sentences", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--source_length", type=int, default=20)
  parser.add_argument("--target_length", type=int, default=22)
  parser.add_argument(
      "--train_steps",
      type=int,
      default=0,
      help="Instead of decoding, time this many training steps per config"
      " on synthetic batches of --batch_tokens (B = batch_tokens //"
      " target_length).",
  )
  parser.add_argument("--batch_tokens", type=int, default=4096)
  parser.add_argument(
      "--saved_model",
      action="store_true",
      help="Random weights: also time each decoder loaded from a SavedModel.",
  )
  args = parser.parse_args(argv)
  if args.train_steps:
    print("| config | batch | length | s per step | target tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for gin_file in args.gin_files.split(","):
      name, b, t, sec, tps = bench_train_step(gin_file, args)
      print(f"| {name} | {b} | {t} | {sec:.2f} | {tps:.0f} |")
    return
  if args.model_dir and not args.input_file:
    parser.error("--model_dir needs --input_file")
  rows = []
  if args.model_dir:
    rows += bench_model_dir(args)
  else:
    for gin_file in args.gin_files.split(","):
      rows += bench_random(gin_file, args)
  print(
      "| config | search | sentences/s | target pieces/s | ms per step (batch"
      f" {args.batch_size}) |"
  )
  print("|---|---|---:|---:|---:|")
  for name, search, sps, tps, ms in rows:
    print(f"| {name} | {search} | {sps:.1f} | {tps:.0f} | {ms:.1f} |")


if __name__ == "__main__":
  main()
