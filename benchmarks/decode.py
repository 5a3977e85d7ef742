r"""Decoding speed of MoE-GNMT configs: sentences/s, greedy and beam 4.

  python benchmarks/decode.py \
      --gin_files=gin/mt/debian_en_fr/gnmt_dense.gin,gin/mt/debian_en_fr/moe_32.gin \
      [--model_dir=DIR --input_file=F]

Without --model_dir each config's model is built with random weights (no
corpus needed) and decodes `--sentences` random sources of
`--source_length` wordpieces into exactly `--target_length` pieces (the
[END] logit is masked, so every sentence has the same length and configs
compare at equal work). The search runs in full (log-softmax, argmax or
beam top-k, beam bookkeeping), but the decoder is fed random previous tokens
(a fixed table, one per row and step) instead of its own picks: a
random-weight decoder's greedy output collapses to two alternating tokens,
and MoE inputs that nearly repeat make the batchwise thresholds admit about
15 of 32 experts per token instead of k = 4 (3.7x the ops the configs are
compared at). With diverse inputs, as a trained model's, the thresholds
fitted by `randomize_gates` route about k; the table's "experts/token"
column is that number measured on one decoded batch (the decoder MoE), so
"equal ops per timestep" is checked, not assumed. With --model_dir the
trained model translates the lines of --input_file through the same
`Translator` that decode / export use (tokenization included), its own
picks and lengths.

Settings (config x search, and their SavedModel round trips) are timed in
`--rounds` alternating rounds, each decoding all `--sentences`; the table
gives the median sentences/s, its min-max, and each round's ratio to the
first config's same search in the same round (min-max over rounds): an
in-process row to its in-process decoder, a SavedModel row to its
SavedModel (`ratio_reference`).

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
from typing import List

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
BEAMS = (1, 4)
SAVED_MODEL_SUFFIX = " (SavedModel)"


def _random_model_decoder(model, beam_size, target_length, forced_ids):
  """tf.function: source ids [B, S] -> ids, with [END] masked out.

  Args:
    model: a random-weight GNMT training model.
    beam_size: 1 (greedy) or the beam width.
    target_length: decoding steps.
    forced_ids: int32 [R, target_length], R >= B * beam_size: the previous
      token fed to the decoder at each row and step (module doc).

  Returns:
    The tf.function.
  """
  layers = gnmt.layers_of(model)
  forced = tf.constant(forced_ids, tf.int32)

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
      # The search's own pick (ids) is replaced by the table's token, the
      # same cost: one [rows] gather.
      ids = tf.where(t > 0, forced[: tf.shape(ids)[0], t - 1], ids)
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

  run.search = search
  return run


def decoder_experts_per_token(model, run, source):
  """Experts the decoder MoE routes per token while `run` decodes `source`.

  Runs the search eagerly once, records the decoder MoE's inputs and applies
  its gating in numpy: batchwise gating at inference routes expert i when
  softmax(x W_g)_i > T_i (eq. 19); top-k gating routes k.

  Args:
    model: the GNMT training model `run` decodes with.
    run: a `_random_model_decoder` function.
    source: int32 [B, S].

  Returns:
    float, mean routed experts per decoded token; None without a flat
    decoder MoE.
  """
  moe = getattr(gnmt.layers_of(model), "decoder_moe", None)
  if moe is None or not hasattr(moe, "w_gate"):
    return None
  if getattr(moe, "gating", "") != "batchwise":
    return float(moe.k)
  seen = []
  call = moe.call

  def recording_call(x, *args, **kwargs):
    seen.append(np.asarray(x).reshape(-1, x.shape[-1]))
    return call(x, *args, **kwargs)

  moe.call = recording_call
  try:
    with mt_task.moe_stats_detached(model):
      run.search(tf.constant(source))
  finally:
    del moe.call
  return experts_per_token(moe, np.concatenate(seen))


def gate_probabilities(layer, x):
  """softmax(x W_g) of a flat MoE layer in numpy (eq. 15), [N, n]."""
  logits = x @ np.asarray(layer.w_gate)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def experts_per_token(layer, x):
  """Mean experts a flat MoE layer routes a row of x [N, d] to at inference.

  Batchwise gating: expert i when softmax(x W_g)_i > T_i (eq. 19); the
  top-k gatings route k.
  """
  if getattr(layer, "gating", "") != "batchwise":
    return float(layer.k)
  probs = gate_probabilities(layer, x)
  return float(np.mean(np.sum(probs > np.asarray(layer.thresholds), axis=1)))


def fit_batchwise_thresholds(layer, x):
  """T_i = the m-th largest gate value of expert i over x [N, d] (eq. 18).

  m = k N / n, so inference on rows like x routes about k experts per row.
  """
  probs = gate_probabilities(layer, x)
  m = max(1, layer.k * len(x) // layer.num_experts)
  layer.thresholds.assign(np.sort(probs, axis=0)[-m - 1].astype("float32"))


def randomize_gates(model, source, target_in, seed=0):
  """Random gating weights, and batchwise thresholds fitted to them.

  Freshly built MoE layers have W_g = 0 (the paper's initialization): every
  token would tie across experts, and batchwise thresholds of 0 admit every
  expert at inference. For a speed measurement that looks like a trained
  model, W_g is drawn at random and each batchwise threshold T_i is set to
  the m-th largest gate value of expert i over the MoE's inputs for
  `source` and teacher-forced `target_in` (m = k N / n, eq. 18), so
  inference on such inputs routes about k experts per token as trained
  thresholds would (eq. 19).

  Args:
    model: the GNMT training model (its MoE layers are changed in place).
    source: int32 [B, S] source ids.
    target_in: int32 [B, T] decoder inputs, [START] first.
    seed: of W_g.
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
  probe, slots = expert_stats.probe_model(model, layers)
  probed = probe({"source": source, "target_in": target_in})
  for layer, (input_index, _) in zip(layers, slots):
    if layer not in batchwise:
      continue
    x = np.asarray(probed[input_index])
    fit_batchwise_thresholds(layer, x.reshape(-1, x.shape[-1]))


def random_settings(gin_file, args):
  """The timed settings of one config with random weights.

  Args:
    gin_file: the config.
    args: parsed flags.

  Returns:
    (source int32 [sentences, S], [(name, search, fn, experts/token)]): fn
    maps a batch of sources to ids; the SavedModel round trip of each
    search follows it when --saved_model, and must decode the same ids.

  Raises:
    RuntimeError: the SavedModel decodes other ids.
  """
  gin.clear_config()
  # As `moe_keras.decode` and `export` build it (experiment.load_experiment).
  experiment.parse_gin(
      [gin_file], list(experiment.INFERENCE_BINDINGS) + args.gin_bindings
  )
  model = gnmt.gnmt_model(args.vocab_size)
  gin.clear_config()
  rng = np.random.default_rng(0)
  draw = lambda *shape: rng.integers(4, args.vocab_size, size=shape).astype(
      "int32"
  )
  source = draw(args.sentences, args.source_length)
  target_in = draw(args.sentences, args.target_length)
  target_in[:, 0] = START_ID
  randomize_gates(model, source, target_in)
  forced_ids = draw(args.batch_size * max(BEAMS), args.target_length)
  name = os.path.relpath(gin_file)
  settings = []
  for beam in BEAMS:
    run = _random_model_decoder(model, beam, args.target_length, forced_ids)
    search = "greedy" if beam == 1 else f"beam {beam}"
    batch = tf.constant(source[: args.batch_size])
    routed = decoder_experts_per_token(model, run, source[: args.batch_size])
    expected = run(batch).numpy()  # trace and warm up
    settings.append((name, search, run, routed))
    if args.saved_model:
      loaded = _round_trip(run, model)
      if not np.array_equal(loaded(batch).numpy(), expected):
        raise RuntimeError(
            f"{name} {search}: the loaded SavedModel decodes other ids than"
            " the in-process decoder"
        )
      settings.append((name + SAVED_MODEL_SUFFIX, search, loaded, routed))
  return source, settings


def time_rounds(sources, settings, args):
  """Times every setting in --rounds alternating rounds.

  Args:
    sources: per setting, int32 [sentences, S].
    settings: [(name, search, fn, experts/token)].
    args: parsed flags.

  Returns:
    [(name, search, experts/token, [sentences/s per round])].
  """
  speeds = [[] for _ in settings]
  for _ in range(args.rounds):
    for i, (source, (_, _, fn, _)) in enumerate(zip(sources, settings)):
      start = time.perf_counter()
      for j in range(0, args.sentences, args.batch_size):
        fn(tf.constant(source[j : j + args.batch_size])).numpy()
      speeds[i].append(args.sentences / (time.perf_counter() - start))
  return [(n, s, r, v) for (n, s, _, r), v in zip(settings, speeds)]


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
    tf.saved_model.save(module, export_dir, signatures={"serving_default": run})
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
  experiment.parse_gin([gin_file], args.gin_bindings)
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


def ratio_reference(rows, name: str, search: str) -> List[float]:
  """The per-round speeds a row's ratio divides by.

  The first config's row of the same search and the same form: in-process
  rows against its in-process decoder, SavedModel rows against its
  SavedModel (what "0.8x the dense model's speed for the exported model"
  compares: both sides loaded as a server loads them).

  Args:
    rows: (name, search, experts/token, per-round sentences/s) per setting,
      the first config's settings first.
    name: the row's name (SAVED_MODEL_SUFFIX marks the SavedModel form).
    search: "greedy" or "beam N".

  Returns:
    The reference's sentences/s, round by round.
  """
  saved = name.endswith(SAVED_MODEL_SUFFIX)
  return next(
      v
      for n, s, _, v in rows
      if s == search and n.endswith(SAVED_MODEL_SUFFIX) == saved
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--gin_files",
      default=",".join(
          f"gin/mt/debian_en_fr/{n}.gin"
          for n in ("gnmt_dense", "moe_32", "moe_32_h")
      ),
  )
  parser.add_argument(
      "--gin_bindings",
      action="append",
      default=[],
      help="A gin binding applied to every --gin_files config (repeatable),"
      " e.g. \"moe_spec.expert_variables = 'stacked'\".",
  )
  parser.add_argument("--model_dir", default=None)
  parser.add_argument("--input_file", default=None)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--sentences", type=int, default=512)
  parser.add_argument("--rounds", type=int, default=5)
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
  if args.rounds < 1 or args.sentences < 1 or args.batch_size < 1:
    parser.error("--rounds, --sentences and --batch_size must be >= 1")
  if args.model_dir and not args.input_file:
    parser.error("--model_dir needs --input_file")
  if args.model_dir:
    print(
        "| config | search | sentences/s | target pieces/s | ms per step"
        f" (batch {args.batch_size}) |"
    )
    print("|---|---|---:|---:|---:|")
    for name, search, sps, tps, ms in bench_model_dir(args):
      print(f"| {name} | {search} | {sps:.1f} | {tps:.0f} | {ms:.1f} |")
    return
  sources, settings = [], []
  for gin_file in args.gin_files.split(","):
    try:
      source, config_settings = random_settings(gin_file, args)
    except experiment.ExperimentError as e:
      parser.error(str(e))
    sources += [source] * len(config_settings)
    settings += config_settings
  rows = time_rounds(sources, settings, args)
  print(
      f"{args.rounds} alternating rounds of {args.sentences} sentences (batch"
      f" {args.batch_size}, {args.target_length} steps); ratio: sentences/s"
      f" over {rows[0][0]}'s same search in the same round, SavedModel"
      " rows over its SavedModel's"
  )
  print(
      "| config | search | experts/token | sentences/s (median) | min-max |"
      " ms per step | ratio (median) | ratio min-max |"
  )
  print("|---|---|---:|---:|---|---:|---:|---|")
  for name, search, routed, speeds in rows:
    ratios = [
        a / b for a, b in zip(speeds, ratio_reference(rows, name, search))
    ]
    ms = 1000 * args.batch_size / (np.median(speeds) * args.target_length)
    print(
        f"| {name} | {search} | {'-' if routed is None else f'{routed:.2f}'}"
        f" | {np.median(speeds):.1f} | {min(speeds):.1f}-{max(speeds):.1f}"
        f" | {ms:.2f} | {np.median(ratios):.2f} |"
        f" {min(ratios):.2f}-{max(ratios):.2f} |"
    )


if __name__ == "__main__":
  main()
